//! What evidence may make the controller delete. Trust is decided here, in one place: each
//! piece of evidence gets a [`Tier`] from what produced it and whether a pod or a log line could
//! have forged it; only the top tier, or the node observed dead by this controller's own clock
//! ([`super::liveness`]), lets an incident's plan delete. Everything else marks and waits.

use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// How far a piece of evidence can be trusted, lowest first.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Console text without the kernel's record framing: a plain netconsole line, or the
    /// agent's console-tracepoint report. Anything that gets a line printed (a kernel message
    /// echoing user text) or any host that can send UDP from the node's address can make it.
    #[default]
    ConsoleText,
    /// The first line of a printk record at the kernel's own facility and level (extended
    /// netconsole), a pstore record, or a `panic()` probe report the controller could not
    /// verify (unsigned, or the Node publishes no boot id). Not forgeable through console
    /// text, but netconsole carries no authentication: anything that can spoof the node's
    /// address can still send it.
    KernelRecord,
    /// A report from the agent's `panic()` probe, authenticated with the shared key, sent from
    /// an address of the node it names, for that node's current boot, and fresh.
    PanicProbe,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConsoleText => "console_text",
            Self::KernelRecord => "kernel_record",
            Self::PanicProbe => "panic_probe",
        }
    }
}

/// Which evidence may delete without the node being observed dead (`--deletion-evidence`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DeletionEvidence {
    /// Only a verified `panic()` report ([`Tier::PanicProbe`]); anything else deletes only once
    /// the node is observed dead.
    #[default]
    Verified,
    /// Any evidence, netconsole text included, deletes at once (the Titus behaviour). Anyone
    /// who can send UDP from a node's address, or get a panic-looking line onto its console,
    /// can then make the controller delete that node and its pods: opt in knowingly.
    Any,
}

impl DeletionEvidence {
    /// Whether evidence of `tier` lets a plan delete without waiting for the node to be seen dead.
    pub fn deletes_at_once(self, tier: Tier) -> bool {
        self == Self::Any || tier == Tier::PanicProbe
    }
}

/// How long a report's `sent_at_ms` may be from the controller's clock, either way. Node
/// clocks are synchronised far better than this; a captured report replayed later is older.
pub const REPORT_FRESHNESS: Duration = Duration::from_secs(60);

/// How a report's send time compares with now, both Unix milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    Stale,
    Future,
}

pub fn freshness(sent_at_ms: u64, now_ms: u64) -> Freshness {
    let window = REPORT_FRESHNESS.as_millis() as u64;
    if sent_at_ms > now_ms.saturating_add(window) {
        Freshness::Future
    } else if sent_at_ms.saturating_add(window) < now_ms {
        Freshness::Stale
    } else {
        Freshness::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_verified_panic_report_deletes_by_default() {
        let verified = DeletionEvidence::Verified;
        assert!(verified.deletes_at_once(Tier::PanicProbe));
        assert!(!verified.deletes_at_once(Tier::KernelRecord));
        assert!(!verified.deletes_at_once(Tier::ConsoleText));
        assert!(DeletionEvidence::Any.deletes_at_once(Tier::ConsoleText));
        assert!(Tier::ConsoleText < Tier::KernelRecord && Tier::KernelRecord < Tier::PanicProbe);
    }

    #[test]
    fn reports_are_fresh_within_a_minute_either_way() {
        let now = 1_700_000_000_000;
        assert_eq!(freshness(now, now), Freshness::Fresh);
        assert_eq!(freshness(now - 59_000, now), Freshness::Fresh);
        assert_eq!(freshness(now + 59_000, now), Freshness::Fresh);
        assert_eq!(freshness(now - 61_000, now), Freshness::Stale);
        assert_eq!(freshness(now + 61_000, now), Freshness::Future);
        assert_eq!(freshness(0, now), Freshness::Stale);
    }
}
