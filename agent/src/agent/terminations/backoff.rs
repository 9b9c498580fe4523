//! Kubelet's restart back-off, recomputed from what a Pod's status shows.
//!
//! Kubelet keeps one back-off entry per container (key: pod name, namespace, uid, container
//! name and hash) in memory (`flowcontrol.Backoff`):
//!
//! - The first exit has no entry: the container starts again at once, and the entry starts
//!   at the initial delay.
//! - Every later exit waits the entry's delay, counted from the exit (`finishedAt`); the
//!   restart then doubles the entry, capped at the maximum.
//! - An exit more than twice the maximum after the entry's last update (the restart that
//!   started the container) finds the entry expired: the container starts again at once and
//!   the entry starts over. With the classic rules, after 10 min of running.
//!
//! The rules: classic (10 s doubling to 300 s); `ReduceDefaultCrashLoopBackOffDecay` (1 s to
//! 60 s); `KubeletCrashLoopBackOffMax` with `crashLoopBackOff.maxContainerRestartPeriod`
//! (1-300 s), which replaces the maximum of either and lowers the initial delay to it when it
//! is smaller (kubelet's `newCrashLoopBackOff`).
//!
//! The status has `restartCount`, which never goes down, while kubelet's entry is forgotten
//! on a reset and when kubelet restarts: the estimate assumes neither happened since the
//! restarts counted, i.e. that the container crash-loops. The run that just ended is the one
//! run whose length the status shows (`startedAt` to `finishedAt`), so its reset is seen.

use std::{fmt, str::FromStr, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

const CLASSIC_INITIAL: Duration = Duration::from_secs(10);
const CLASSIC_MAX: Duration = Duration::from_secs(300);
const REDUCED_INITIAL: Duration = Duration::from_secs(1);
const REDUCED_MAX: Duration = Duration::from_secs(60);
/// Kubelet's bounds on `crashLoopBackOff.maxContainerRestartPeriod`.
const MAX_RESTART_PERIOD: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(300);

/// The back-off rules of the node's kubelet (`--kubelet-backoff`): `classic`, `reduced`,
/// `max=DUR`, or `reduced,max=DUR`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KubeletBackoff {
    /// `ReduceDefaultCrashLoopBackOffDecay` is on.
    reduced: bool,
    /// `KubeletCrashLoopBackOffMax` is on, with this `maxContainerRestartPeriod`.
    max_restart_period: Option<Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackoffSpecError {
    #[error("{0:?} is not one of classic, reduced, max=DUR, reduced,max=DUR")]
    Unknown(String),
    #[error("max={value}: not a duration ({reason}); e.g. max=30s")]
    BadDuration { value: String, reason: String },
    #[error("max={0:?}: kubelet allows a maxContainerRestartPeriod of 1s to 300s")]
    OutOfRange(Duration),
}

impl FromStr for KubeletBackoff {
    type Err = BackoffSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (reduced, max) = match spec.split_once(',') {
            Some(("reduced", max)) => (true, Some(max)),
            None if spec == "classic" => (false, None),
            None if spec == "reduced" => (true, None),
            None => (false, Some(spec)),
            Some(_) => return Err(BackoffSpecError::Unknown(spec.to_owned())),
        };
        let max_restart_period = match max {
            None => None,
            Some(max) => {
                let value = max
                    .strip_prefix("max=")
                    .ok_or_else(|| BackoffSpecError::Unknown(spec.to_owned()))?;
                let period = humantime::parse_duration(value).map_err(|error| {
                    BackoffSpecError::BadDuration {
                        value: value.to_owned(),
                        reason: error.to_string(),
                    }
                })?;
                if !MAX_RESTART_PERIOD.contains(&period) {
                    return Err(BackoffSpecError::OutOfRange(period));
                }
                Some(period)
            }
        };
        Ok(Self {
            reduced,
            max_restart_period,
        })
    }
}

impl fmt::Display for KubeletBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.reduced, self.max_restart_period) {
            (false, None) => f.write_str("classic"),
            (true, None) => f.write_str("reduced"),
            (reduced, Some(max)) => {
                if reduced {
                    f.write_str("reduced,")?;
                }
                write!(f, "max={}", humantime::format_duration(max))
            }
        }
    }
}

/// The run of a container that just ended, as the Pod's status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndedRun {
    /// `restartCount` of the container while this run was its latest: the restarts before it.
    pub restart_count: u32,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

/// When kubelet starts the container again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextStart {
    /// The restart to come: `restart_count + 1`.
    pub restart: u32,
    /// From the exit to the start; zero for the first restart and after a reset.
    pub delay: Duration,
    /// `finishedAt + delay`; unknown without `finishedAt`. Kubelet starts the container at
    /// its first sync of the pod after it, so the start may come later.
    pub at: Option<Timestamp>,
    /// The run lasted long enough for kubelet to forget the back-off.
    pub reset: bool,
}

impl KubeletBackoff {
    pub fn initial(&self) -> Duration {
        let initial = if self.reduced {
            REDUCED_INITIAL
        } else {
            CLASSIC_INITIAL
        };
        initial.min(self.max())
    }

    pub fn max(&self) -> Duration {
        match (self.max_restart_period, self.reduced) {
            (Some(max), _) => max,
            (None, true) => REDUCED_MAX,
            (None, false) => CLASSIC_MAX,
        }
    }

    /// A run longer than this resets the back-off: twice the maximum.
    pub fn reset_after(&self) -> Duration {
        self.max() * 2
    }

    /// The delay before restart `restart`, if every run before it was short.
    fn delay_before(&self, restart: u32) -> Duration {
        if restart <= 1 {
            return Duration::ZERO;
        }
        let doublings = restart - 2;
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        self.initial()
            .checked_mul(factor)
            .map_or(self.max(), |delay| delay.min(self.max()))
    }

    /// When kubelet starts the container of `run` again (if its restart policy restarts it).
    /// Without `startedAt` the run counts as short: no reset.
    pub fn next_start(&self, run: &EndedRun) -> NextStart {
        let restart = run.restart_count.saturating_add(1);
        let ran = match (run.started_at, run.finished_at) {
            (Some(started), Some(finished)) => Some(finished.duration_since(started)),
            _ => None,
        };
        let reset = ran.is_some_and(|ran| {
            ran > SignedDuration::try_from(self.reset_after()).unwrap_or(SignedDuration::MAX)
        });
        let delay = if reset {
            Duration::ZERO
        } else {
            self.delay_before(restart)
        };
        let at = run.finished_at.and_then(|finished| {
            finished
                .checked_add(SignedDuration::try_from(delay).ok()?)
                .ok()
        });
        NextStart {
            restart,
            delay,
            at,
            reset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    /// A run of `ran` seconds ending at 1000 s, after `restart_count` restarts.
    fn run(restart_count: u32, ran: i64) -> EndedRun {
        EndedRun {
            restart_count,
            started_at: Some(time(1000 - ran)),
            finished_at: Some(time(1000)),
        }
    }

    fn delays(rules: KubeletBackoff, restarts: u32) -> Vec<u64> {
        (0..restarts)
            .map(|count| rules.next_start(&run(count, 5)).delay.as_secs())
            .collect()
    }

    #[test]
    fn classic_rules_double_from_10s_to_300s_after_an_immediate_first_restart() {
        let classic = KubeletBackoff::default();
        assert_eq!(delays(classic, 9), [0, 10, 20, 40, 80, 160, 300, 300, 300]);
        let fifth = classic.next_start(&run(4, 5));
        assert_eq!(
            fifth,
            NextStart {
                restart: 5,
                delay: Duration::from_secs(80),
                at: Some(time(1080)),
                reset: false,
            }
        );
        // Far into a crash loop the doubling cannot overflow.
        assert_eq!(
            classic.next_start(&run(u32::MAX, 5)).delay,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn a_run_longer_than_twice_the_maximum_resets_the_delay() {
        let classic = KubeletBackoff::default();
        assert_eq!(classic.reset_after(), Duration::from_secs(600));
        // Exactly 10 min is not expired: kubelet compares with `>`.
        let ten_minutes = classic.next_start(&run(6, 600));
        assert_eq!(
            (ten_minutes.delay, ten_minutes.reset),
            (Duration::from_secs(300), false)
        );
        let longer = classic.next_start(&run(6, 601));
        assert_eq!(
            (longer.delay, longer.at, longer.reset),
            (Duration::ZERO, Some(time(1000)), true)
        );
        // A run shorter than the reset keeps the delay however long it was.
        assert_eq!(
            classic.next_start(&run(3, 599)).delay,
            Duration::from_secs(40)
        );
    }

    #[test]
    fn reduced_and_max_rules_cap_as_kubelet_configures_them() {
        let reduced: KubeletBackoff = "reduced".parse().unwrap();
        assert_eq!(delays(reduced, 10), [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(reduced.reset_after(), Duration::from_secs(120));
        assert!(reduced.next_start(&run(5, 121)).reset);

        let max: KubeletBackoff = "max=30s".parse().unwrap();
        assert_eq!(delays(max, 6), [0, 10, 20, 30, 30, 30]);
        assert_eq!(max.reset_after(), Duration::from_secs(60));

        // A maximum below the initial delay lowers the initial delay to it.
        let below: KubeletBackoff = "max=5s".parse().unwrap();
        assert_eq!(
            (below.initial(), below.max()),
            (Duration::from_secs(5), Duration::from_secs(5))
        );
        assert_eq!(delays(below, 4), [0, 5, 5, 5]);

        // Both gates: the reduced initial delay, the configured maximum.
        let both: KubeletBackoff = "reduced,max=2m".parse().unwrap();
        assert_eq!(delays(both, 10), [0, 1, 2, 4, 8, 16, 32, 64, 120, 120]);
    }

    #[test]
    fn the_first_restart_and_missing_timestamps() {
        let classic = KubeletBackoff::default();
        let first = classic.next_start(&run(0, 5));
        assert_eq!(
            first,
            NextStart {
                restart: 1,
                delay: Duration::ZERO,
                at: Some(time(1000)),
                reset: false,
            }
        );
        // No finishedAt: the delay is known, its end is not.
        let unfinished = classic.next_start(&EndedRun {
            restart_count: 2,
            started_at: Some(time(0)),
            finished_at: None,
        });
        assert_eq!(
            (unfinished.delay, unfinished.at, unfinished.reset),
            (Duration::from_secs(20), None, false)
        );
        // No startedAt: the run counts as short.
        let unstarted = classic.next_start(&EndedRun {
            restart_count: 2,
            started_at: None,
            finished_at: Some(time(1000)),
        });
        assert_eq!(
            (unstarted.delay, unstarted.at, unstarted.reset),
            (Duration::from_secs(20), Some(time(1020)), false)
        );
        // A finishedAt before startedAt (clock skew) is no reset either.
        assert!(!classic.next_start(&run(2, -30)).reset);
    }

    #[test]
    fn the_flag_parses_into_rules_or_says_what_is_wrong() {
        for spec in ["classic", "reduced", "max=30s", "reduced,max=5m"] {
            let rules: KubeletBackoff = spec.parse().unwrap();
            assert_eq!(rules.to_string(), spec);
        }
        assert_eq!(
            "fast".parse::<KubeletBackoff>(),
            Err(BackoffSpecError::Unknown("fast".into()))
        );
        assert_eq!(
            "classic,max=30s".parse::<KubeletBackoff>(),
            Err(BackoffSpecError::Unknown("classic,max=30s".into()))
        );
        assert_eq!(
            "max=301s".parse::<KubeletBackoff>(),
            Err(BackoffSpecError::OutOfRange(Duration::from_secs(301)))
        );
        assert_eq!(
            "max=500ms".parse::<KubeletBackoff>(),
            Err(BackoffSpecError::OutOfRange(Duration::from_millis(500)))
        );
        let bad = "max=soon".parse::<KubeletBackoff>().unwrap_err();
        assert!(matches!(bad, BackoffSpecError::BadDuration { .. }), "{bad}");
        assert!(bad.to_string().starts_with("max=soon: not a duration"));
    }
}
