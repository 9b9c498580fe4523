//! Incidents: one per node and boot, however many channels report it. The first report opens
//! it and starts the actions; later ones merge into it.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::reasons::{Source, kind_from_code};
use crate::kernel_log::KernelEventKind;

/// A kernel failure reported for a node by one channel.
#[derive(Clone, Debug)]
pub struct Evidence {
    pub node: String,
    /// Known when the agent reported it; netconsole does not say.
    pub boot_id: Option<String>,
    pub source: Source,
    pub kind: KernelEventKind,
    pub message: String,
    pub context: Vec<String>,
    /// When the first datagram carrying it arrived.
    pub first_datagram: Instant,
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
    /// When the controller first heard of it, RFC 3339.
    pub time: String,
}

impl IncidentRecord {
    pub fn kind(&self) -> KernelEventKind {
        kind_from_code(&self.code).unwrap_or(KernelEventKind::Panic)
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
    /// More detail or another channel for an open incident.
    Merged { new_source: bool },
}

/// Evidence within this long of an incident's start, for the same node and boot, is the same incident.
pub const MERGE_WINDOW: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Default)]
pub struct Incidents {
    by_node: HashMap<String, Incident>,
}

impl Incidents {
    pub fn observe(&mut self, evidence: Evidence) -> (Observed, Incident) {
        if let Some(open) = self.by_node.get_mut(&evidence.node)
            && same_incident(open, &evidence)
        {
            let new_source = open.record.sources.insert(evidence.source);
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
            return (Observed::Merged { new_source }, open.clone());
        }
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let incident = Incident {
            record: IncidentRecord {
                id: format!("{}-{}", evidence.node, time),
                node: evidence.node.clone(),
                boot_id: evidence.boot_id,
                code: evidence.kind.reason_code().to_owned(),
                message: evidence.message,
                sources: BTreeSet::from([evidence.source]),
                time,
            },
            context: evidence.context,
            first_datagram: evidence.first_datagram,
        };
        self.by_node.insert(evidence.node, incident.clone());
        (Observed::New, incident)
    }

    /// Takes back an incident found recorded on a node (after a controller restart).
    pub fn resume(&mut self, record: IncidentRecord, now: Instant) -> Incident {
        let incident = Incident {
            record,
            context: Vec::new(),
            first_datagram: now,
        };
        self.by_node
            .insert(incident.record.node.clone(), incident.clone());
        incident
    }

    /// Forgets incidents older than the merge window.
    pub fn expire(&mut self, now: Instant) {
        self.by_node
            .retain(|_, incident| now.duration_since(incident.first_datagram) < MERGE_WINDOW);
    }
}

fn same_incident(open: &Incident, evidence: &Evidence) -> bool {
    let same_boot = match (&open.record.boot_id, &evidence.boot_id) {
        (Some(open), Some(new)) => open == new,
        _ => true,
    };
    same_boot && evidence.first_datagram.duration_since(open.first_datagram) < MERGE_WINDOW
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(source: Source, boot: Option<&str>, at: Instant) -> Evidence {
        Evidence {
            node: "node-b".into(),
            boot_id: boot.map(str::to_owned),
            source,
            kind: KernelEventKind::Panic,
            message: "Kernel panic - not syncing: sysrq triggered crash".into(),
            context: vec![],
            first_datagram: at,
        }
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
        assert_eq!(second, Observed::Merged { new_source: true });
        assert_eq!(merged.record.id, opened.record.id);
        assert_eq!(merged.record.boot_id.as_deref(), Some("boot-1"));
        assert_eq!(merged.record.sources.len(), 2);
        let (third, _) = incidents.observe(evidence(Source::Agent, Some("boot-1"), now));
        assert_eq!(third, Observed::Merged { new_source: false });
    }

    #[test]
    fn another_boot_is_another_incident() {
        let now = Instant::now();
        let mut incidents = Incidents::default();
        incidents.observe(evidence(Source::Agent, Some("boot-1"), now));
        let (next, _) = incidents.observe(evidence(Source::Agent, Some("boot-2"), now));
        assert_eq!(next, Observed::New);
    }
}
