//! Turns records into kernel failure reports with the context that follows.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::parse::{Format, Record};
use crate::kernel_log::{self, KernelEventKind};

/// Bounds of a [`PanicWatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchLimits {
    /// Lines collected after the triggering line (Netflix keeps 20).
    pub context_lines: usize,
    /// How long after the triggering line context is collected.
    pub context_time: Duration,
    /// How long a line is remembered to drop its copy from the other target.
    pub dedupe_window: Duration,
    /// Lines remembered per sender for that.
    pub max_recent_lines: usize,
    /// Senders tracked; a new one beyond this displaces the least recently
    /// active.
    pub max_senders: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            context_lines: 20,
            context_time: Duration::from_secs(10),
            dedupe_window: Duration::from_secs(2),
            max_recent_lines: 256,
            max_senders: 4096,
        }
    }
}

/// A kernel failure seen on one sender's console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelReport {
    pub kind: KernelEventKind,
    /// The triggering line without printk prefix.
    pub message: String,
    /// The lines that followed, without printk prefix, in arrival order.
    pub context: Vec<String>,
    /// True on the last report of an incident: the context is full, its
    /// time is up, or a panic superseded a non-fatal incident.
    pub complete: bool,
    /// When the triggering line arrived; with the sender it identifies the
    /// incident across its updates.
    pub first_seen: Instant,
    /// Kernel release, if an extended target with `release` enabled sent it.
    pub release: Option<String>,
}

/// Recognises kernel failures per sender and collects their context.
///
/// Feed every record with [`PanicWatch::push`] and call [`PanicWatch::poll`]
/// periodically (e.g. every second). A report is returned as soon as the
/// triggering line arrives, again whenever its context or release changes
/// (at most once per pushed record), and a last time with `complete` set.
/// A line that [`kernel_log::classify`] recognises starts an incident unless
/// one is open; then it is context, except that a panic supersedes a
/// non-fatal incident (e.g. `BUG:` / `Oops:` / `Kernel panic - not syncing:
/// Fatal exception` give a page fault report and a panic report).
///
/// Key senders by node (e.g. source IP, not address and port) so that the
/// plain and extended copies of a line meet and one of them is dropped.
#[derive(Debug)]
pub struct PanicWatch<K> {
    limits: WatchLimits,
    senders: HashMap<K, Watched>,
}

impl<K: Clone + Eq + Hash> PanicWatch<K> {
    pub fn new(limits: WatchLimits) -> Self {
        Self {
            limits,
            senders: HashMap::new(),
        }
    }

    /// Processes one record from `sender`. Reports of other senders appear
    /// only when a new sender displaces one with an open incident.
    pub fn push(&mut self, sender: K, record: &Record, now: Instant) -> Vec<(K, KernelReport)> {
        let mut out = Vec::new();
        if !self.senders.contains_key(&sender) && self.senders.len() >= self.limits.max_senders {
            self.evict_oldest(&mut out);
        }
        let watched = self
            .senders
            .entry(sender.clone())
            .or_insert_with(|| Watched::new(now));
        let mut reports = Vec::new();
        watched.push(record, now, &self.limits, &mut reports);
        out.extend(reports.into_iter().map(|r| (sender.clone(), r)));
        out
    }

    /// Completes incidents whose context time is up and forgets idle senders.
    pub fn poll(&mut self, now: Instant) -> Vec<(K, KernelReport)> {
        let mut out = Vec::new();
        self.senders.retain(|sender, watched| {
            let mut reports = Vec::new();
            watched.close_if_due(now, &self.limits, &mut reports);
            out.extend(reports.into_iter().map(|r| (sender.clone(), r)));
            watched.open.is_some()
                || now.duration_since(watched.last_seen) < self.limits.dedupe_window
        });
        out
    }

    fn evict_oldest(&mut self, out: &mut Vec<(K, KernelReport)>) {
        let oldest = self
            .senders
            .iter()
            .min_by_key(|(_, w)| w.last_seen)
            .map(|(k, _)| k.clone());
        if let Some(sender) = oldest
            && let Some(mut watched) = self.senders.remove(&sender)
        {
            let mut reports = Vec::new();
            watched.close(&mut reports);
            out.extend(reports.into_iter().map(|r| (sender.clone(), r)));
        }
    }
}

/// One sender's recent lines and open incident.
#[derive(Debug)]
struct Watched {
    recent: VecDeque<Seen>,
    open: Option<KernelReport>,
    /// `open` changed since it was last reported.
    dirty: bool,
    release: Option<String>,
    last_seen: Instant,
}

/// A line remembered for deduplication.
#[derive(Debug)]
struct Seen {
    format: Format,
    text: String,
    usec: Option<u64>,
    seq: Option<u64>,
    at: Instant,
    /// Its copy from the other format has been dropped already.
    matched: bool,
}

impl Watched {
    fn new(now: Instant) -> Self {
        Self {
            recent: VecDeque::new(),
            open: None,
            dirty: false,
            release: None,
            last_seen: now,
        }
    }

    fn push(
        &mut self,
        record: &Record,
        now: Instant,
        limits: &WatchLimits,
        out: &mut Vec<KernelReport>,
    ) {
        self.last_seen = now;
        self.close_if_due(now, limits, out);
        // Taken even from a copy that is dropped below: the plain copy of
        // the triggering line may have come first.
        if let Some(release) = &record.release {
            self.release = Some(release.clone());
            if let Some(open) = &mut self.open
                && open.release.is_none()
            {
                open.release = Some(release.clone());
                self.dirty = true;
            }
        }
        while self
            .recent
            .front()
            .is_some_and(|seen| now.duration_since(seen.at) > limits.dedupe_window)
        {
            self.recent.pop_front();
        }
        for line in record.lines() {
            if !self.is_copy(record, line, now, limits) {
                self.line(line, now, limits, out);
            }
        }
        if self.dirty
            && let Some(open) = &self.open
        {
            out.push(open.clone());
        }
        self.dirty = false;
    }

    /// Remembers `line` and tells whether it repeats one already seen: the
    /// same message from the other format (same text, and same timestamp
    /// when both have one), or the same extended record again.
    fn is_copy(&mut self, record: &Record, line: &str, now: Instant, limits: &WatchLimits) -> bool {
        // Each line matches one copy at most, so repeated identical lines
        // (common in stack traces) survive.
        let twin = self.recent.iter_mut().find(|seen| {
            !seen.matched
                && seen.format != record.format
                && seen.text == line
                && seen.usec.zip(record.usec).is_none_or(|(a, b)| a == b)
        });
        if let Some(twin) = twin {
            twin.matched = true;
            return true;
        }
        if record.seq.is_some()
            && self.recent.iter().any(|seen| {
                seen.format == record.format && seen.seq == record.seq && seen.text == line
            })
        {
            return true;
        }
        if self.recent.len() >= limits.max_recent_lines {
            self.recent.pop_front();
        }
        self.recent.push_back(Seen {
            format: record.format,
            text: line.to_owned(),
            usec: record.usec,
            seq: record.seq,
            at: now,
            matched: false,
        });
        false
    }

    fn line(
        &mut self,
        line: &str,
        now: Instant,
        limits: &WatchLimits,
        out: &mut Vec<KernelReport>,
    ) {
        if let Some(c) = kernel_log::classify(line)
            && self
                .open
                .as_ref()
                .is_none_or(|open| c.kind.is_fatal() && !open.kind.is_fatal())
        {
            self.close(out);
            self.open = Some(KernelReport {
                kind: c.kind,
                message: c.message.to_owned(),
                context: Vec::new(),
                complete: false,
                first_seen: now,
                release: self.release.clone(),
            });
            self.dirty = true;
        } else if let Some(open) = &mut self.open {
            open.context.push(line.to_owned());
            self.dirty = true;
        }
        if self
            .open
            .as_ref()
            .is_some_and(|open| open.context.len() >= limits.context_lines)
        {
            self.close(out);
        }
    }

    fn close_if_due(&mut self, now: Instant, limits: &WatchLimits, out: &mut Vec<KernelReport>) {
        if self
            .open
            .as_ref()
            .is_some_and(|open| now.duration_since(open.first_seen) >= limits.context_time)
        {
            self.close(out);
        }
    }

    /// Emits the open incident as complete.
    fn close(&mut self, out: &mut Vec<KernelReport>) {
        if let Some(mut report) = self.open.take() {
            report.complete = true;
            out.push(report);
        }
        self.dirty = false;
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;
    use KernelEventKind as K;

    fn plain(usec: u64, message: &str) -> Record {
        let line = format!("[{:5}.{:06}] {message}", usec / 1_000_000, usec % 1_000_000);
        parse::plain_record(line.as_bytes())
    }

    fn ext(release: Option<&str>, seq: u64, usec: u64, message: &str) -> Record {
        let release = release.map(|r| format!("{r},")).unwrap_or_default();
        let datagram = format!("{release}4,{seq},{usec},-;{message}\n");
        let e = parse::extended(datagram.as_bytes()).unwrap().unwrap();
        e.meta.record(e.body)
    }

    fn watch() -> PanicWatch<&'static str> {
        PanicWatch::new(WatchLimits::default())
    }

    /// Pushes records at `now`, returning the reports without sender.
    fn push_all(
        w: &mut PanicWatch<&'static str>,
        records: &[Record],
        now: Instant,
    ) -> Vec<KernelReport> {
        records
            .iter()
            .flat_map(|r| w.push("node", r, now))
            .map(|(_, report)| report)
            .collect()
    }

    #[test]
    fn copies_from_the_other_format_are_dropped_once() {
        let t0 = Instant::now();
        let mut w = watch();
        let lines = [
            "Kernel panic - not syncing: test",
            " ? do_syscall_64+0x69/0x90",
            " ? do_syscall_64+0x69/0x90",
            " </TASK>",
        ];
        let mut records = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let (seq, usec) = (100 + i as u64, 5_000_000 + i as u64);
            // Extended copies arrive before or after the plain ones.
            if i % 2 == 0 {
                records.extend([plain(usec, line), ext(None, seq, usec, line)]);
            } else {
                records.extend([ext(None, seq, usec, line), plain(usec, line)]);
            }
        }
        // A repeated extended datagram (same seq) is a copy too.
        records.push(ext(None, 103, 5_000_003, " </TASK>"));
        push_all(&mut w, &records, t0);
        let done = w.poll(t0 + Duration::from_secs(10));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].1.context, &lines[1..]);

        // Without plain timestamps the text alone pairs the copies.
        let mut w = watch();
        let untimed: Vec<Record> = lines
            .iter()
            .map(|l| parse::plain_record(l.as_bytes()))
            .collect();
        let extended: Vec<Record> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| ext(None, i as u64, i as u64, l))
            .collect();
        push_all(&mut w, &untimed, t0);
        push_all(&mut w, &extended, t0);
        let done = w.poll(t0 + Duration::from_secs(10));
        assert_eq!(done[0].1.context, &lines[1..]);
    }

    #[test]
    fn multi_line_extended_record_matches_plain_lines() {
        let t0 = Instant::now();
        let mut w = watch();
        let reports = push_all(
            &mut w,
            &[
                ext(None, 7, 42, "Kernel panic - not syncing: x\\x0asecond line"),
                plain(42, "Kernel panic - not syncing: x"),
                plain(42, "second line"),
            ],
            t0,
        );
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].context, ["second line"]);
    }

    #[test]
    fn panic_supersedes_an_open_oops() {
        let t0 = Instant::now();
        let mut w = watch();
        let reports = push_all(
            &mut w,
            &[
                plain(
                    1,
                    "BUG: kernel NULL pointer dereference, address: 0000000000000008",
                ),
                plain(2, "#PF: supervisor write access in kernel mode"),
                plain(3, "Oops: 0002 [#1] PREEMPT SMP NOPTI"),
                plain(4, "Kernel panic - not syncing: Fatal exception"),
                plain(5, "Kernel Offset: disabled"),
            ],
            t0,
        );
        let summary: Vec<(K, bool, usize)> = reports
            .iter()
            .map(|r| (r.kind, r.complete, r.context.len()))
            .collect();
        assert_eq!(
            summary,
            [
                (K::PageFault, false, 0),
                (K::PageFault, false, 1),
                // The Oops header is context of the page fault.
                (K::PageFault, false, 2),
                (K::PageFault, true, 2),
                (K::Panic, false, 0),
                (K::Panic, false, 1),
            ]
        );
        assert_eq!(reports[3].context[1], "Oops: 0002 [#1] PREEMPT SMP NOPTI");
        assert_eq!(
            reports[4].message,
            "Kernel panic - not syncing: Fatal exception"
        );
    }

    #[test]
    fn context_is_bounded_by_lines_and_time() {
        let t0 = Instant::now();
        let limits = WatchLimits {
            context_lines: 3,
            ..WatchLimits::default()
        };
        let mut w = PanicWatch::new(limits.clone());
        let mut records = vec![plain(
            0,
            "INFO: task kworker/0:1:42 blocked for more than 120 seconds.",
        )];
        records.extend((1..6).map(|i| plain(i, &format!("line {i}"))));
        let reports: Vec<KernelReport> = records
            .iter()
            .flat_map(|r| w.push("node", r, t0))
            .map(|(_, r)| r)
            .collect();
        let last = reports.last().unwrap();
        assert!(last.complete);
        assert_eq!((last.kind, last.context.len()), (K::HungTask, 3));
        assert_eq!(reports.iter().filter(|r| r.complete).count(), 1);

        // Time bound: polled, or noticed by the next push.
        let panic = plain(10, "Kernel panic - not syncing: x");
        assert_eq!(w.push("node", &panic, t0).len(), 1);
        assert!(w.poll(t0 + limits.context_time / 2).is_empty());
        let done = w.poll(t0 + limits.context_time);
        assert!(done[0].1.complete && done[0].1.context.is_empty());

        let mut w = PanicWatch::new(limits.clone());
        w.push("node", &panic, t0);
        let late = w.push("node", &plain(11, "late"), t0 + limits.context_time);
        assert_eq!(late.len(), 1);
        assert!(late[0].1.complete && late[0].1.context.is_empty());
    }

    #[test]
    fn release_comes_from_the_extended_copy() {
        let t0 = Instant::now();
        let mut w = watch();
        let line = "Kernel panic - not syncing: sysrq triggered crash";
        let first = w.push("node", &plain(9, line), t0);
        assert_eq!(first[0].1.release, None);
        let update = w.push("node", &ext(Some("6.1.0-27-cloud-amd64"), 1, 9, line), t0);
        assert_eq!(update.len(), 1);
        assert_eq!(update[0].1.release.as_deref(), Some("6.1.0-27-cloud-amd64"));
        assert!(update[0].1.context.is_empty());
    }

    #[test]
    fn senders_are_bounded() {
        let t0 = Instant::now();
        let mut w = PanicWatch::new(WatchLimits {
            max_senders: 2,
            ..WatchLimits::default()
        });
        let panic = plain(1, "Kernel panic - not syncing: x");
        w.push("a", &panic, t0);
        w.push("b", &panic, t0 + Duration::from_millis(1));
        let reports = w.push("c", &panic, t0 + Duration::from_millis(2));
        let who: Vec<(&str, bool)> = reports.iter().map(|(k, r)| (*k, r.complete)).collect();
        assert_eq!(who, [("a", true), ("c", false)]);
        assert_eq!(w.senders.len(), 2);

        // Idle senders without an open incident are forgotten.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(w.poll(later).len(), 2);
        assert!(w.senders.is_empty());
    }
}
