//! A per-address budget of parsing work: one node flooding the netconsole port gets its share
//! of the controller's time, and the datagrams beyond it are dropped before any parsing, so
//! the socket keeps being drained and other nodes' datagrams are not lost.
//!
//! Work is counted in bytes, plus [`LINE_COST`] per line parsed: each line costs the watch
//! about the same whatever its length, so a flood of short lines is charged for them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Bytes charged per line parsed, on top of the line's bytes.
pub const LINE_COST: u64 = 64;

/// Token bucket sizes of a [`ByteBudget`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Bytes per second each address may have parsed, on average.
    pub bytes_per_second: u64,
    /// Bytes an address may have parsed at once after a quiet time.
    pub burst_bytes: u64,
}

impl Default for BudgetLimits {
    fn default() -> Self {
        // Some 3,600 console lines of 80 bytes a second, 14,000 at once: a kernel's panic
        // report is about 100 lines. A flood of 1000-byte datagrams of `a\x0a` lines (200
        // lines, 14 KB of work each) gets 37 datagrams a second.
        Self {
            bytes_per_second: 512 << 10,
            burst_bytes: 2 << 20,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per source address.
#[derive(Debug)]
pub struct ByteBudget {
    limits: BudgetLimits,
    buckets: HashMap<IpAddr, Bucket>,
}

impl ByteBudget {
    pub fn new(limits: BudgetLimits) -> Self {
        Self {
            limits,
            buckets: HashMap::new(),
        }
    }

    /// Takes `bytes` from `ip`'s budget if it has them.
    pub fn admit(&mut self, ip: IpAddr, bytes: usize, now: Instant) -> bool {
        let burst = self.limits.burst_bytes as f64;
        let bucket = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill =
            now.duration_since(bucket.at).as_secs_f64() * self.limits.bytes_per_second as f64;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens < bytes as f64 {
            return false;
        }
        bucket.tokens -= bytes as f64;
        true
    }

    /// Charges `ip` for `lines` parsed, after the fact: the budget may go into debt, down to
    /// minus a burst, and the address's next datagrams wait until it is paid.
    pub fn charge_lines(&mut self, ip: IpAddr, lines: usize) {
        if let Some(bucket) = self.buckets.get_mut(&ip) {
            let debt = -(self.limits.burst_bytes as f64);
            bucket.tokens = (bucket.tokens - (lines as u64 * LINE_COST) as f64).max(debt);
        }
    }

    /// Forgets the addresses whose budget is full again: they are as if never seen.
    pub fn forget_refilled(&mut self, now: Instant) {
        let limits = &self.limits;
        self.buckets.retain(|_, bucket| {
            let missing = limits.burst_bytes as f64 - bucket.tokens;
            let refill = Duration::from_secs_f64(missing.max(0.0) / limits.bytes_per_second as f64);
            now.duration_since(bucket.at) < refill
        });
    }

    /// Addresses currently tracked.
    pub fn addresses(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut budget = ByteBudget::new(BudgetLimits {
            bytes_per_second: 1000,
            burst_bytes: 3000,
        });
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert!(budget.admit(a, 1000, t0));
        }
        assert!(!budget.admit(a, 1000, t0));
        // Another address is not affected.
        assert!(budget.admit(b, 1000, t0));
        // Half a second refills half a datagram; a whole second one.
        assert!(!budget.admit(a, 1000, t0 + Duration::from_millis(500)));
        assert!(budget.admit(a, 1000, t0 + Duration::from_secs(1)));
        assert!(!budget.admit(a, 1000, t0 + Duration::from_secs(1)));

        // b took 1000 bytes at t0, refilled a second later; a is empty at t0 + 1 s.
        budget.forget_refilled(t0 + Duration::from_secs(2));
        assert_eq!(budget.addresses(), 1);
        budget.forget_refilled(t0 + Duration::from_secs(4));
        assert_eq!(budget.addresses(), 0);
        assert!(budget.admit(a, 3000, t0 + Duration::from_secs(4)));
    }

    #[test]
    fn lines_are_charged_after_the_fact_into_debt() {
        let t0 = Instant::now();
        let limits = BudgetLimits {
            bytes_per_second: 1000,
            burst_bytes: 3000,
        };
        let mut budget = ByteBudget::new(limits);
        let a = IpAddr::from([10, 0, 0, 1]);
        assert!(budget.admit(a, 100, t0));
        // 200 short lines in those 100 bytes: far over budget, down to minus a burst.
        budget.charge_lines(a, 200);
        assert!(!budget.admit(a, 1, t0 + Duration::from_secs(2)));
        assert!(budget.admit(a, 1, t0 + Duration::from_millis(3002)));
    }
}
