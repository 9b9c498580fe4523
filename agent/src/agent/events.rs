//! What the agent detects, typed: the one vocabulary of its logs, tests and reports.

use std::{io::Write, time::SystemTime};

use serde::Serialize;

use super::{
    pods::ContainerRef,
    pstore::DumpReason,
    terminations::{Cause, Termination},
};
use crate::{
    kernel_log::KernelEventKind,
    telemetry::LogFormat,
    wire::{ReportKind, ReportSource},
};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetlinkHang {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cmdline: String,
    pub cgroup: String,
    pub container_id: Option<String>,
    /// In a cluster: `pod_namespace`, `pod_name` and `container` of that container.
    #[serde(flatten)]
    pub container: Option<ContainerRef>,
    /// Netlink protocol name, e.g. `route`, `generic`.
    pub protocol: &'static str,
    pub protocol_number: i32,
    pub syscall: &'static str,
    pub fd: i32,
    /// How long the call has been in flight when reported.
    pub duration_seconds: f64,
    pub kernel_stack: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetlinkHangCleared {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub protocol: &'static str,
    pub syscall: &'static str,
    /// Total time the call was in flight.
    pub duration_seconds: f64,
    /// Measured by the probe when the call returned; false when the thread went away
    /// unseen and the duration is the agent's estimate.
    pub exact: bool,
    /// The syscall's return value (with the probe on `netlink_recvmsg`, that function's), when
    /// it was seen returning.
    pub ret: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CniCall {
    pub pid: u32,
    pub plugin: String,
    pub path: String,
    /// `CNI_COMMAND`: ADD, DEL, CHECK, VERSION, GC, STATUS.
    pub command: String,
    pub container_id: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub ifname: Option<String>,
    pub netns: Option<String>,
    /// False when the environment was longer than the probe copies and only its tail was read.
    pub environment_complete: bool,
    pub duration_seconds: f64,
    /// `success`, `error` (non-zero exit status) or `signal` (killed).
    pub result: &'static str,
    pub exit_status: Option<u8>,
    pub signal: Option<u8>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CniCallStuck {
    pub pid: u32,
    pub plugin: String,
    pub path: String,
    pub command: String,
    pub container_id: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub running_seconds: f64,
    pub kernel_stack: Vec<String>,
}

/// Where a kernel message was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelSource {
    /// The printk `console` tracepoint.
    Console,
    /// A kprobe on `panic()`.
    Kprobe,
    /// An fentry program on `panic()`.
    Fentry,
}

impl From<KernelSource> for ReportSource {
    fn from(source: KernelSource) -> Self {
        match source {
            KernelSource::Console => Self::Console,
            KernelSource::Kprobe => Self::Kprobe,
            KernelSource::Fentry => Self::Fentry,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelEvent {
    #[serde(skip)]
    pub kind: KernelEventKind,
    pub source: KernelSource,
    /// The message without printk's timestamp prefix.
    pub message: String,
}

/// A panic (or oops) of an earlier boot, found in pstore when the agent started.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PreviousBootPanic {
    /// What the record's failure line is: `panic`, `oops`, `page_fault`, ...
    pub failure: KernelEventKind,
    /// Why the kernel dumped its log: `panic` or `oops`.
    pub dump_reason: DumpReason,
    /// The dump's number within its boot (`Panic#1`).
    pub count: u32,
    /// The pstore backend: `ramoops`, `efi`, `erst`, ...
    pub backend: String,
    /// Part numbers joined.
    pub parts: Vec<u32>,
    /// The failure's line without printk prefixes.
    pub message: String,
    /// When the kernel wrote the record (RFC 3339), the time of the panic.
    pub panicked_at: Option<String>,
    /// The boot that crashed, when the agent's state directory remembers it.
    pub boot_id: Option<String>,
    /// The pstore files it came from.
    pub files: Vec<String>,
    /// Where its text was saved, if it was.
    pub archived_to: Option<String>,
    /// Whether the pstore files were removed.
    pub removed: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AgentEvent {
    NetlinkHang(NetlinkHang),
    NetlinkHangCleared(NetlinkHangCleared),
    CniCall(CniCall),
    CniCallStuck(CniCallStuck),
    Kernel(KernelEvent),
    PreviousBootPanic(PreviousBootPanic),
    ContainerTermination(Box<Termination>),
}

impl AgentEvent {
    /// The `kind` field of the event's log line.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NetlinkHang(_) => "netlink_hang",
            Self::NetlinkHangCleared(_) => "netlink_hang_cleared",
            Self::CniCall(_) => "cni_call",
            Self::CniCallStuck(_) => "cni_call_stuck",
            Self::Kernel(event) => ReportKind::from(event.kind).as_str(),
            Self::PreviousBootPanic(_) => "previous_boot_panic",
            Self::ContainerTermination(_) => "container_termination",
        }
    }

    /// The event as one flat JSON object with its `kind`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("events serialize");
        if let serde_json::Value::Object(fields) = &mut value {
            fields.insert("kind".into(), self.kind().into());
        }
        value
    }

    fn summary(&self) -> String {
        match self {
            Self::NetlinkHang(h) => format!(
                "netlink {} {} on fd {} in flight {:.1}s: pid {} tid {} ({}) in {}",
                h.protocol,
                h.syscall,
                h.fd,
                h.duration_seconds,
                h.pid,
                h.tid,
                h.comm,
                match (&h.container, &h.container_id) {
                    (Some(c), _) =>
                        format!("pod {}/{} container {}", c.namespace, c.pod, c.container),
                    (None, Some(id)) => format!("container {id}"),
                    (None, None) => "no container".to_owned(),
                },
            ),
            Self::NetlinkHangCleared(c) => format!(
                "netlink {} {} returned after {:.1}s: pid {} tid {} ({})",
                c.protocol, c.syscall, c.duration_seconds, c.pid, c.tid, c.comm
            ),
            Self::CniCall(c) => format!(
                "CNI {} {} for {}/{} took {:.3}s: {}",
                c.plugin,
                c.command,
                c.pod_namespace.as_deref().unwrap_or("-"),
                c.pod_name.as_deref().unwrap_or("-"),
                c.duration_seconds,
                c.result
            ),
            Self::CniCallStuck(c) => format!(
                "CNI {} {} for {}/{} running {:.1}s (pid {})",
                c.plugin,
                c.command,
                c.pod_namespace.as_deref().unwrap_or("-"),
                c.pod_name.as_deref().unwrap_or("-"),
                c.running_seconds,
                c.pid
            ),
            Self::Kernel(k) => {
                format!(
                    "{} ({}): {}",
                    k.kind.as_str(),
                    ReportSource::from(k.source).as_str(),
                    k.message
                )
            }
            Self::PreviousBootPanic(p) => format!(
                "previous boot {}: {} ({}#{} in pstore {}, written {}; {})",
                p.failure.as_str(),
                p.message,
                p.dump_reason,
                p.count,
                p.backend,
                p.panicked_at.as_deref().unwrap_or("at an unknown time"),
                match (&p.archived_to, p.removed) {
                    (Some(archive), true) => format!("archived to {archive}, removed from pstore"),
                    (Some(archive), false) => format!("archived to {archive}, left in pstore"),
                    (None, _) => "not archived, left in pstore".to_owned(),
                }
            ),
            Self::ContainerTermination(t) => format!(
                "{} {} ({}) in {}: {}",
                if t.main_process {
                    "container process"
                } else {
                    "child process"
                },
                t.pid,
                t.comm,
                match &t.container {
                    Some(c) => format!("pod {}/{} container {}", c.namespace, c.pod, c.container),
                    None => format!("container {}", t.container_id),
                },
                super::terminations::report::what_happened(&t.cause)
            ),
        }
    }
}

/// Writes each event to the log: a flat JSON object per line, or a readable line through tracing.
#[derive(Clone, Copy, Debug)]
pub struct EventLog {
    format: LogFormat,
}

impl EventLog {
    pub fn new(format: LogFormat) -> Self {
        Self { format }
    }

    pub fn write(&self, event: &AgentEvent) {
        match self.format {
            LogFormat::Json => {
                let mut value = event.to_json();
                if let serde_json::Value::Object(fields) = &mut value {
                    let now = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
                    fields.insert("timestamp".into(), now.into());
                    fields.insert("level".into(), self.level(event).into());
                    fields.insert("target".into(), "lastgasp::event".into());
                }
                let mut line = value.to_string();
                line.push('\n');
                // One write per line, under stdout's lock, so lines never interleave.
                let _ = std::io::stdout().lock().write_all(line.as_bytes());
            }
            LogFormat::Text => match self.level(event) {
                "INFO" => tracing::info!(kind = event.kind(), "{}", event.summary()),
                "ERROR" => tracing::error!(kind = event.kind(), "{}", event.summary()),
                _ => tracing::warn!(kind = event.kind(), "{}", event.summary()),
            },
        }
    }

    /// Completed calls are routine, hangs and kernel trouble are not, a panic is the worst.
    fn level(&self, event: &AgentEvent) -> &'static str {
        match event {
            AgentEvent::CniCall(call) if call.result == "success" => "INFO",
            AgentEvent::NetlinkHangCleared(_) => "INFO",
            AgentEvent::ContainerTermination(t) if t.cause == (Cause::Exited { code: 0 }) => "INFO",
            AgentEvent::Kernel(kernel) if kernel.kind.is_fatal() => "ERROR",
            AgentEvent::PreviousBootPanic(previous) if previous.failure.is_fatal() => "ERROR",
            _ => "WARN",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::agent::terminations::{OomKill, OomScope, Sender};

    fn termination(cause: Cause) -> AgentEvent {
        AgentEvent::ContainerTermination(Box::new(Termination {
            at: UNIX_EPOCH + Duration::from_millis(1_764_531_667_151),
            container_id: "abc".into(),
            container: Some(ContainerRef {
                namespace: "shop".into(),
                pod: "web-0".into(),
                container: "app".into(),
            }),
            pid: 7,
            comm: "app".into(),
            main_process: true,
            cause,
        }))
    }

    #[test]
    fn container_terminations_as_log_lines() {
        let killed = termination(Cause::Killed {
            signal: 9,
            sender: Sender::Runtime {
                pid: 51,
                comm: "runc".into(),
                grace_period_expired: true,
                grace_seconds: Some(30.0),
            },
        });
        let json = killed.to_json();
        assert_eq!(json["kind"], "container_termination");
        assert_eq!(json["at"], "2025-11-30T19:41:07.151Z");
        assert_eq!(json["pod_name"], "web-0");
        assert_eq!(json["cause"]["cause"], "killed");
        assert_eq!(json["cause"]["sender"]["kind"], "runtime");
        assert_eq!(json["cause"]["sender"]["grace_seconds"], 30.0);
        assert_eq!(
            killed.summary(),
            "container process 7 (app) in pod shop/web-0 container app: killed by SIGKILL from \
             runc (pid 51), the container runtime: the 30s grace period after its SIGTERM ran out"
        );
        let log = EventLog::new(LogFormat::Json);
        assert_eq!(log.level(&killed), "WARN");
        assert_eq!(log.level(&termination(Cause::Exited { code: 0 })), "INFO");
        let oom = termination(Cause::OomKilled(Box::new(OomKill {
            scope: OomScope::Container,
            rss_bytes: Some(1 << 20),
            oom_score_adj: Some(0),
            limit_bytes: Some(2 << 20),
            memory_events: None,
        })));
        assert_eq!(oom.to_json()["cause"]["scope"], "container");
        assert!(
            oom.summary()
                .ends_with("killed by the OOM killer (container limit 2Mi, rss 1Mi)"),
            "{}",
            oom.summary()
        );
    }
}
