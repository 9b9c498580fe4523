//! Incidents: one per node and boot, however many channels report it. The first report opens
//! it and starts the actions; later ones merge into it.
//!
//! Live evidence (the agent's last gasp, netconsole) is about now: it joins an open incident of
//! the same node and boot from the last [`MERGE_WINDOW`]. Delayed evidence (the agent's pstore
//! report after a reboot) is about a past panic: it joins the incident of the same boot, or when
//! a boot id is missing on either side, the one whose panic time is within [`SAME_PANIC`] of
//! its own. Live evidence never joins an incident that delayed evidence opened.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{
    reasons::{Crash, Source, incident_reason, kind_from_code},
    trust::Tier,
};
use crate::kernel_log::KernelEventKind;

/// A kernel failure reported for a node by one channel.
#[derive(Clone, Debug)]
pub struct Evidence {
    pub node: String,
    /// The boot that failed, when known: the agent's live reports say, netconsole does not,
    /// a delayed report says when the agent remembered the boot.
    pub boot_id: Option<String>,
    pub source: Source,
    /// How far it can be trusted; decides whether it may delete.
    pub tier: Tier,
    pub kind: KernelEventKind,
    pub message: String,
    pub context: Vec<String>,
    /// The crash title, when the channel's lines (or the agent's stack) gave one.
    pub crash: Option<Crash>,
    /// When the first datagram carrying it arrived.
    pub first_datagram: Instant,
    /// Delayed evidence (a pstore record found after a reboot): when the kernel failed, by
    /// the node's clock. `None` for live evidence, which is about now.
    pub panicked_at: Option<Timestamp>,
}

impl Evidence {
    pub fn is_delayed(&self) -> bool {
        self.panicked_at.is_some()
    }
}

/// What is remembered of an incident, on the controller and in the node's annotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentRecord {
    pub id: String,
    pub node: String,
    pub boot_id: Option<String>,
    /// The reason code, e.g. `KernelPanic`.
    pub code: String,
    pub message: String,
    pub sources: BTreeSet<Source>,
    /// The best evidence heard so far (records stored before tiers existed read as the lowest).
    #[serde(default)]
    pub tier: Tier,
    /// The best crash title heard so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<Crash>,
    /// When the controller first heard of it, RFC 3339.
    pub time: String,
    /// Set when delayed evidence opened the incident: when the kernel failed, by the node's
    /// clock. A live incident happened at `time`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panicked_at: Option<Timestamp>,
}

impl IncidentRecord {
    pub fn kind(&self) -> KernelEventKind {
        kind_from_code(&self.code).unwrap_or(KernelEventKind::Panic)
    }

    /// The reason written on the node and its pods, led by the crash title when there is one.
    pub fn reason(&self) -> String {
        incident_reason(&self.node, self.kind(), &self.message, self.crash.as_ref())
    }

    /// When the node's kernel failed: `panicked_at`, else `time`.
    pub fn panic_time(&self) -> Option<Timestamp> {
        self.panicked_at.or_else(|| self.time.parse().ok())
    }

    /// Whether an object created at `created` was there when the node failed, and so is part
    /// of the incident; when either time is unknown, it is.
    pub fn existed_at_panic(&self, created: Option<Timestamp>) -> bool {
        match (created, self.panic_time()) {
            (Some(created), Some(panicked)) => created <= panicked,
            _ => true,
        }
    }

    /// Whether `evidence` reports this incident's failure (leaving aside how long ago the
    /// controller heard of it): the same boot when both name one, else for delayed evidence a
    /// panic time within [`SAME_PANIC`]; live evidence is never about a delayed incident.
    pub fn matches(&self, evidence: &Evidence) -> bool {
        if let (Some(ours), Some(theirs)) = (&self.boot_id, &evidence.boot_id) {
            return ours == theirs;
        }
        match evidence.panicked_at {
            Some(at) => self.panic_time().is_some_and(|ours| {
                (ours.as_millisecond() - at.as_millisecond()).unsigned_abs()
                    <= SAME_PANIC.as_millis() as u64
            }),
            None => self.panicked_at.is_none(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Incident {
    pub record: IncidentRecord,
    pub context: Vec<String>,
    pub first_datagram: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Observed {
    /// A new incident: act on it.
    New,
    /// More detail for an open incident: `new_source` when another channel reported it,
    /// `changed` when that, better evidence or a better crash title changes what is written
    /// or allowed.
    Merged { new_source: bool, changed: bool },
}

/// Evidence within this long of an incident's start, for the same node and boot, is the same incident.
pub const MERGE_WINDOW: Duration = Duration::from_secs(30 * 60);

/// Two panic times of one node this close are one panic, when boot ids cannot tell: the time
/// in a pstore record is the node's clock when the kernel wrote it, the time of a live incident
/// the controller's when the first datagram came.
pub const SAME_PANIC: Duration = Duration::from_secs(120);

/// Incidents remembered per node: a delayed report may come for a panic older than the latest.
const PER_NODE: usize = 4;

#[derive(Debug, Default)]
pub struct Incidents {
    by_node: HashMap<String, Vec<Incident>>,
}

impl Incidents {
    /// Whether an incident this controller remembers is the one `evidence` reports.
    pub fn knows(&self, evidence: &Evidence) -> bool {
        self.by_node.get(&evidence.node).is_some_and(|open| {
            open.iter()
                .any(|incident| same_incident(incident, evidence))
        })
    }

    /// Whether the incident `evidence` reports is known and its crash's culprit already named.
    pub fn culprit_named(&self, evidence: &Evidence) -> bool {
        self.by_node.get(&evidence.node).is_some_and(|open| {
            open.iter().any(|incident| {
                same_incident(incident, evidence)
                    && incident
                        .record
                        .crash
                        .as_ref()
                        .is_some_and(|crash| crash.culprit.is_some())
            })
        })
    }

    pub fn observe(&mut self, evidence: Evidence) -> (Observed, Incident) {
        let open = self.by_node.entry(evidence.node.clone()).or_default();
        if let Some(open) = open
            .iter_mut()
            .rev()
            .find(|incident| same_incident(incident, &evidence))
        {
            let new_source = open.record.sources.insert(evidence.source);
            let better = evidence.tier > open.record.tier;
            open.record.tier = open.record.tier.max(evidence.tier);
            let named = match (&evidence.crash, &open.record.crash) {
                (Some(new), Some(old)) => new.better_than(old),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if named {
                open.record.crash = evidence.crash;
            }
            if open.record.boot_id.is_none() {
                open.record.boot_id = evidence.boot_id;
            }
            if evidence.context.len() > open.context.len() {
                open.context = evidence.context;
            }
            // The agent's `panic()` probe may report only a format string; prefer the printed line.
            if evidence.source == Source::Netconsole
                && !open.record.sources.contains(&Source::Agent)
            {
                open.record.message = evidence.message;
            }
            return (
                Observed::Merged {
                    new_source,
                    changed: new_source || better || named,
                },
                open.clone(),
            );
        }
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let incident = Incident {
            record: IncidentRecord {
                id: format!("{}-{}", evidence.node, time),
                node: evidence.node,
                boot_id: evidence.boot_id,
                code: evidence.kind.reason_code().to_owned(),
                message: evidence.message,
                sources: BTreeSet::from([evidence.source]),
                tier: evidence.tier,
                crash: evidence.crash,
                time,
                panicked_at: evidence.panicked_at,
            },
            context: evidence.context,
            first_datagram: evidence.first_datagram,
        };
        remember(open, incident.clone());
        (Observed::New, incident)
    }

    /// Takes back an incident found recorded on a node (after a controller restart).
    pub fn resume(&mut self, record: IncidentRecord, now: Instant) -> Incident {
        let incident = Incident {
            record,
            context: Vec::new(),
            first_datagram: now,
        };
        remember(
            self.by_node
                .entry(incident.record.node.clone())
                .or_default(),
            incident.clone(),
        );
        incident
    }

    /// Forgets incidents older than the merge window.
    pub fn expire(&mut self, now: Instant) {
        self.by_node.retain(|_, open| {
            open.retain(|incident| now.duration_since(incident.first_datagram) < MERGE_WINDOW);
            !open.is_empty()
        });
    }
}

fn remember(open: &mut Vec<Incident>, incident: Incident) {
    open.push(incident);
    if open.len() > PER_NODE {
        open.remove(0);
    }
}

fn same_incident(open: &Incident, evidence: &Evidence) -> bool {
    open.record.matches(evidence)
        && (evidence.is_delayed()
            || evidence.first_datagram.duration_since(open.first_datagram) < MERGE_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(source: Source, boot: Option<&str>, at: Instant) -> Evidence {
        Evidence {
            node: "node-b".into(),
            boot_id: boot.map(str::to_owned),
            source,
            tier: Tier::ConsoleText,
            kind: KernelEventKind::Panic,
            message: "Kernel panic - not syncing: sysrq triggered crash".into(),
            context: vec![],
            crash: None,
            first_datagram: at,
            panicked_at: None,
        }
    }

    fn delayed(boot: Option<&str>, panicked_at: Timestamp) -> Evidence {
        Evidence {
            source: Source::Pstore,
            panicked_at: Some(panicked_at),
            ..evidence(Source::Netconsole, boot, Instant::now())
        }
    }

    fn seconds(n: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_secs(n)
    }

    #[test]
    fn both_channels_make_one_incident() {
        let now = Instant::now();
        let mut incidents = Incidents::default();
        let (first, opened) = incidents.observe(evidence(Source::Netconsole, None, now));
        assert_eq!(first, Observed::New);
        let (second, merged) = incidents.observe(evidence(
            Source::Agent,
            Some("boot-1"),
            now + Duration::from_millis(5),
        ));
        assert_eq!(
            second,
            Observed::Merged {
                new_source: true,
                changed: true
            }
        );
        assert_eq!(merged.record.id, opened.record.id);
        assert_eq!(merged.record.boot_id.as_deref(), Some("boot-1"));
        assert_eq!(merged.record.sources.len(), 2);
        let (third, _) = incidents.observe(evidence(Source::Agent, Some("boot-1"), now));
        assert_eq!(
            third,
            Observed::Merged {
                new_source: false,
                changed: false
            }
        );
        // Better evidence on a known channel upgrades the incident, and says so.
        let (fourth, upgraded) = incidents.observe(Evidence {
            tier: Tier::PanicProbe,
            ..evidence(Source::Agent, Some("boot-1"), now)
        });
        assert_eq!(
            fourth,
            Observed::Merged {
                new_source: false,
                changed: true
            }
        );
        assert_eq!(upgraded.record.tier, Tier::PanicProbe);
        let (fifth, kept) = incidents.observe(evidence(Source::Netconsole, None, now));
        assert_eq!(
            fifth,
            Observed::Merged {
                new_source: false,
                changed: false
            }
        );
        assert_eq!(kept.record.tier, Tier::PanicProbe, "never downgraded");
    }

    #[test]
    fn another_boot_is_another_incident() {
        let now = Instant::now();
        let mut incidents = Incidents::default();
        incidents.observe(evidence(Source::Agent, Some("boot-1"), now));
        let (next, _) = incidents.observe(evidence(Source::Agent, Some("boot-2"), now));
        assert_eq!(next, Observed::New);
    }

    #[test]
    fn a_delayed_report_joins_the_live_incident_of_its_panic() {
        let mut incidents = Incidents::default();
        let (_, live) = incidents.observe(evidence(Source::Netconsole, None, Instant::now()));
        let panicked = live.record.panic_time().unwrap();
        // The node's clock a little behind the controller's.
        let report = delayed(None, panicked - seconds(3));
        assert!(incidents.knows(&report));
        let (observed, merged) = incidents.observe(report);
        assert_eq!(
            observed,
            Observed::Merged {
                new_source: true,
                changed: true
            }
        );
        assert_eq!(merged.record.id, live.record.id);
        assert_eq!(merged.record.panicked_at, None, "still a live incident");
        assert_eq!(
            merged.record.sources,
            BTreeSet::from([Source::Netconsole, Source::Pstore])
        );
    }

    #[test]
    fn a_delayed_report_of_another_panic_is_another_incident() {
        let mut incidents = Incidents::default();
        let (_, live) = incidents.observe(evidence(Source::Agent, Some("boot-1"), Instant::now()));
        let panicked = live.record.panic_time().unwrap();
        // Same time, another boot: the boot decides.
        assert!(!incidents.knows(&delayed(Some("boot-0"), panicked)));
        // No boot id: ten minutes earlier is another panic.
        let earlier = delayed(None, panicked - seconds(600));
        assert!(!incidents.knows(&earlier));
        let (observed, opened) = incidents.observe(earlier);
        assert_eq!(observed, Observed::New);
        assert_eq!(opened.record.panicked_at, Some(panicked - seconds(600)));
        assert_eq!(opened.record.sources, BTreeSet::from([Source::Pstore]));
        // Both are remembered: the live incident still takes its own channels.
        let (again, merged) = incidents.observe(evidence(Source::Netconsole, None, Instant::now()));
        assert_eq!(
            again,
            Observed::Merged {
                new_source: true,
                changed: true
            }
        );
        assert_eq!(merged.record.id, live.record.id);
        // And a resent delayed report joins the delayed incident, by boot once it is known.
        let (resent, merged) = incidents.observe(delayed(Some("boot-0"), panicked - seconds(599)));
        assert_eq!(
            resent,
            Observed::Merged {
                new_source: false,
                changed: false
            }
        );
        assert_eq!(merged.record.id, opened.record.id);
        assert_eq!(merged.record.boot_id.as_deref(), Some("boot-0"));
    }

    #[test]
    fn live_evidence_never_joins_an_incident_about_the_past() {
        let mut incidents = Incidents::default();
        let now = Instant::now();
        incidents.observe(Evidence {
            first_datagram: now,
            ..delayed(None, Timestamp::now() - seconds(60))
        });
        let (observed, _) = incidents.observe(evidence(Source::Netconsole, None, now));
        assert_eq!(observed, Observed::New);
    }

    #[test]
    fn objects_created_after_the_panic_are_not_part_of_it() {
        let mut incidents = Incidents::default();
        let panicked: Timestamp = "2025-11-23T10:00:00.500Z".parse().unwrap();
        let (_, incident) = incidents.observe(delayed(None, panicked));
        let record = &incident.record;
        assert!(record.existed_at_panic(Some("2025-11-23T10:00:00Z".parse().unwrap())));
        assert!(record.existed_at_panic(Some("2025-11-22T10:00:00Z".parse().unwrap())));
        assert!(!record.existed_at_panic(Some("2025-11-23T10:00:01Z".parse().unwrap())));
        assert!(record.existed_at_panic(None));
        // A live incident's panic is when the controller heard of it.
        let (_, live) = incidents.observe(evidence(Source::Netconsole, None, Instant::now()));
        assert!(
            live.record
                .existed_at_panic(Some(Timestamp::now() - seconds(5)))
        );
        assert!(
            !live
                .record
                .existed_at_panic(Some(Timestamp::now() + seconds(5)))
        );
    }

    #[test]
    fn records_stored_before_panicked_at_existed_still_load() {
        let json = r#"{"id":"n-1","node":"n","boot_id":null,"code":"KernelPanic","message":"m",
            "sources":["netconsole"],"time":"2025-11-23T10:00:00.000Z"}"#;
        let record: IncidentRecord = serde_json::from_str(json).unwrap();
        assert_eq!(record.panicked_at, None);
        assert_eq!(
            record.panic_time(),
            Some("2025-11-23T10:00:00Z".parse().unwrap())
        );
        let delayed = IncidentRecord {
            panicked_at: Some("2025-11-23T09:00:00.250Z".parse().unwrap()),
            ..record
        };
        let stored = serde_json::to_string(&delayed).unwrap();
        assert!(
            stored.contains(r#""panicked_at":"2025-11-23T09:00:00.25Z""#),
            "{stored}"
        );
        assert_eq!(
            serde_json::from_str::<IncidentRecord>(&stored).unwrap(),
            delayed
        );
    }
}
