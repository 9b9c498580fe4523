//! What the controller writes on pods and nodes: annotation keys, the human-readable reason,
//! the reason codes, and the record of an incident kept on the node.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::incidents::IncidentRecord;
use crate::kernel_log::{CrashTitle, KernelEventKind};

/// Every annotation the controller writes starts with it.
pub const ANNOTATION_PREFIX: &str = "lastgasp.io/";
pub const ANNOTATION_REASON: &str = "lastgasp.io/termination-reason";
pub const ANNOTATION_REASON_CODE: &str = "lastgasp.io/termination-reason-code";
pub const ANNOTATION_SOURCE: &str = "lastgasp.io/termination-source";
pub const ANNOTATION_TIME: &str = "lastgasp.io/termination-time";
/// The incident id, on pods and the node.
pub const ANNOTATION_INCIDENT: &str = "lastgasp.io/incident";
/// On the node: the incident and the plan decided for it, as JSON, to resume from.
pub const ANNOTATION_INCIDENT_RECORD: &str = "lastgasp.io/incident-record";
/// The crash title, e.g. `general protection fault in tcp_v4_rcv (panic: Fatal exception)`.
pub const ANNOTATION_CRASH_TITLE: &str = "lastgasp.io/crash-title";
/// The culprit function, with ` [module]` when it is in a module.
pub const ANNOTATION_CRASH_CULPRIT: &str = "lastgasp.io/crash-culprit";
pub const ANNOTATION_KERNEL_RELEASE: &str = "lastgasp.io/kernel-release";
/// `Not tainted`, or the taint flags of the `Tainted:` line.
pub const ANNOTATION_KERNEL_TAINT: &str = "lastgasp.io/kernel-taint";
/// Field manager of the controller's server-side applies.
pub const FIELD_MANAGER: &str = "lastgasp-controller";
pub const CONDITION_TYPE: &str = "DisruptionTarget";

/// The channel that reported a kernel failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The agent's last-gasp datagram, sent while the kernel panicked.
    Agent,
    /// The kernel's own netconsole stream.
    Netconsole,
    /// The agent's delayed report after a reboot: the kernel's pstore record of the panic.
    Pstore,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Netconsole => "netconsole",
            Self::Pstore => "pstore",
        }
    }
}

/// `agent`, `netconsole`, `pstore`, or several joined by commas, e.g. `agent,netconsole`.
pub fn sources_label(sources: &BTreeSet<Source>) -> String {
    sources
        .iter()
        .map(|source| source.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// What an incident's crash title says, as written on the node and its pods and kept in the
/// node's incident record: computed once per incident from the sender's console lines (or the
/// agent's stack at `panic()`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crash {
    /// The full title, e.g. `general protection fault in tcp_v4_rcv (panic: Fatal exception)`.
    pub title: String,
    /// The crash kind's metric label, e.g. `general_protection_fault`.
    pub kind: String,
    /// `function` or `function [module]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub culprit: Option<String>,
    /// The fleet signature: kind and culprit without addresses, offsets or numbers.
    pub signature: String,
    /// Up to five culprit candidates, culprit first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_taint: Option<String>,
    /// The first lines of the report (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excerpt: Vec<String>,
}

impl Crash {
    pub fn new(title: &CrashTitle) -> Self {
        Self {
            title: title.title(),
            kind: title.kind.as_str().to_owned(),
            culprit: title.culprit.as_ref().map(|frame| frame.label()),
            signature: title.signature(),
            frames: title.frames.iter().map(|frame| frame.label()).collect(),
            kernel_release: title.release.clone(),
            kernel_taint: title.taint.clone(),
            excerpt: title.excerpt.clone(),
        }
    }

    /// Whether this names the crash better than `other`: a culprit beats none, a report found
    /// on the console (with its lines) beats one made from a stack alone.
    pub fn better_than(&self, other: &Self) -> bool {
        let rank = |crash: &Self| (crash.culprit.is_some(), !crash.excerpt.is_empty());
        rank(self) > rank(other)
    }
}

/// The reason text: the crash title when there is one, and where it happened,
/// `general protection fault in tcp_v4_rcv (panic: Fatal exception) on node worker-3`; else
/// `node worker-3 kernel panic: Kernel panic - not syncing: ...`.
pub fn incident_reason(
    node: &str,
    kind: KernelEventKind,
    message: &str,
    crash: Option<&Crash>,
) -> String {
    match crash {
        Some(crash) => format!("{} on node {node}", crash.title),
        None => reason_text(node, kind, message),
    }
}

/// The reason text without a crash title: `node worker-3 kernel panic: Kernel panic - not syncing: ...`.
pub fn reason_text(node: &str, kind: KernelEventKind, message: &str) -> String {
    let what = match kind {
        KernelEventKind::Panic => "kernel panic",
        KernelEventKind::Oops => "kernel oops",
        KernelEventKind::PageFault => "kernel page fault",
        KernelEventKind::GeneralProtectionFault => "kernel general protection fault",
        KernelEventKind::KernelBug => "kernel BUG",
        KernelEventKind::SoftLockup => "kernel soft lockup",
        KernelEventKind::HardLockup => "kernel hard lockup",
        KernelEventKind::HungTask => "kernel hung task",
        KernelEventKind::RcuStall => "kernel RCU stall",
        KernelEventKind::OutOfMemory => "kernel OOM kill",
    };
    format!("node {node} {what}: {message}")
}

/// The kind named by a reason code, as stored in an incident record.
pub fn kind_from_code(code: &str) -> Option<KernelEventKind> {
    KernelEventKind::ALL
        .into_iter()
        .find(|kind| kind.reason_code() == code)
}

/// The reason of the pod condition and Events: `NodeKernelPanic`, `NodeKernelOops`, ...
pub fn condition_reason(kind: KernelEventKind) -> String {
    format!("Node{}", kind.reason_code())
}

/// What an incident says, computed once per run of its writes and written alike on the node
/// and on every pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The reason text: the pods' condition message, and the Events' note before its cut.
    pub reason: String,
    /// The reason of the `DisruptionTarget` condition and of the Events: `NodeKernelPanic`, ...
    pub condition_reason: String,
    pub annotations: BTreeMap<String, String>,
    /// The Events' note, within [`EVENT_NOTE_MAX`].
    pub event_note: String,
    /// When the pods were terminated: the condition's `lastTransitionTime`.
    pub termination_time: String,
}

impl Verdict {
    pub fn of(record: &IncidentRecord) -> Self {
        let reason = record.reason();
        let termination_time = termination_time(record);
        let mut annotations = BTreeMap::from([
            (ANNOTATION_REASON.to_owned(), reason.clone()),
            (ANNOTATION_REASON_CODE.to_owned(), record.code.clone()),
            (ANNOTATION_SOURCE.to_owned(), sources_label(&record.sources)),
            (ANNOTATION_TIME.to_owned(), termination_time.clone()),
            (ANNOTATION_INCIDENT.to_owned(), record.id.clone()),
        ]);
        if let Some(crash) = &record.crash {
            annotations.insert(ANNOTATION_CRASH_TITLE.into(), crash.title.clone());
            for (key, value) in [
                (ANNOTATION_CRASH_CULPRIT, &crash.culprit),
                (ANNOTATION_KERNEL_RELEASE, &crash.kernel_release),
                (ANNOTATION_KERNEL_TAINT, &crash.kernel_taint),
            ] {
                if let Some(value) = value {
                    annotations.insert(key.into(), value.clone());
                }
            }
        }
        Self {
            event_note: event_note(reason.clone()),
            condition_reason: condition_reason(record.kind()),
            reason,
            annotations,
            termination_time,
        }
    }
}

/// When the pods were terminated: the panic time of a delayed report, else when the
/// controller first heard of the panic.
fn termination_time(record: &IncidentRecord) -> String {
    record.panicked_at.map_or_else(
        || record.time.clone(),
        |at| at.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
    )
}

/// The API's limit on an Event's `note` (events.k8s.io/v1), in bytes: longer notes are refused
/// with 422, and with them the Event.
pub const EVENT_NOTE_MAX: usize = 1024;

/// `note` cut to [`EVENT_NOTE_MAX`] bytes at a character boundary, ending in `…` when cut.
pub fn event_note(mut note: String) -> String {
    if note.len() > EVENT_NOTE_MAX {
        let mut end = EVENT_NOTE_MAX - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notes_fit_the_api_limit() {
        assert_eq!(event_note("short".into()), "short");
        let long = "é".repeat(EVENT_NOTE_MAX);
        let cut = event_note(long);
        assert!(cut.len() <= EVENT_NOTE_MAX, "{}", cut.len());
        assert!(cut.ends_with('…'));
        let exact = "x".repeat(EVENT_NOTE_MAX);
        assert_eq!(event_note(exact.clone()), exact);
    }

    #[test]
    fn texts_read_as_the_issue_shows_them() {
        assert_eq!(
            reason_text(
                "worker-3",
                KernelEventKind::Panic,
                "Kernel panic - not syncing: sysrq triggered crash"
            ),
            "node worker-3 kernel panic: Kernel panic - not syncing: sysrq triggered crash"
        );
        assert_eq!(condition_reason(KernelEventKind::Panic), "NodeKernelPanic");
        assert_eq!(kind_from_code("KernelPanic"), Some(KernelEventKind::Panic));
        assert_eq!(kind_from_code("Nonsense"), None);
        let both = BTreeSet::from([Source::Netconsole, Source::Agent]);
        assert_eq!(sources_label(&both), "agent,netconsole");
        let late = BTreeSet::from([Source::Pstore, Source::Netconsole]);
        assert_eq!(sources_label(&late), "netconsole,pstore");
    }
}
