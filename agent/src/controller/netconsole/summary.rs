//! Rate-limited logging of dropped netconsole datagrams: a flood must not turn into a flood of
//! log lines. Counts by reason over an interval, logged as one line when the interval ends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Drops counted since the last summary.
#[derive(Debug)]
pub struct DropSummary {
    interval: Duration,
    since: Instant,
    counts: BTreeMap<&'static str, u64>,
    /// The sender of the last drop, as an example.
    last_from: Option<SocketAddr>,
}

impl DropSummary {
    pub fn new(interval: Duration, now: Instant) -> Self {
        Self {
            interval,
            since: now,
            counts: BTreeMap::new(),
            last_from: None,
        }
    }

    pub fn count(&mut self, reason: &'static str, from: SocketAddr) {
        *self.counts.entry(reason).or_default() += 1;
        self.last_from = Some(from);
    }

    /// When the interval is over: the counts as `reason=count` pairs, the last sender and the
    /// interval's length, then a fresh interval. `None` before, or when nothing was dropped.
    pub fn take_due(&mut self, now: Instant) -> Option<(String, SocketAddr, Duration)> {
        let elapsed = now.duration_since(self.since);
        if elapsed < self.interval {
            return None;
        }
        self.since = now;
        let counts = std::mem::take(&mut self.counts);
        let last_from = self.last_from.take()?;
        let text = counts
            .iter()
            .map(|(reason, count)| format!("{reason}={count}"))
            .collect::<Vec<_>>()
            .join(" ");
        Some((text, last_from, elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_summary_per_interval_with_counts_by_reason() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(10);
        let from: SocketAddr = "127.0.0.2:6666".parse().unwrap();
        let mut summary = DropSummary::new(interval, t0);
        for _ in 0..3000 {
            summary.count("oversized", from);
        }
        summary.count("unparsable", from);
        assert_eq!(summary.take_due(t0 + interval / 2), None);
        let (text, last, elapsed) = summary.take_due(t0 + interval).unwrap();
        assert_eq!(text, "oversized=3000 unparsable=1");
        assert_eq!((last, elapsed), (from, interval));
        // Nothing dropped since: nothing to say.
        assert_eq!(summary.take_due(t0 + interval * 3), None);
    }
}
