//! Container terminations explained: which process of which pod ended, how (exit code,
//! crash signal, OOM kill, a signal and its sender), and when kubelet will start it again.
//!
//! Data flow: the probes' records (signal sent, OOM victim marked, process exited, a crash
//! line on the console) are correlated per process into one [`Termination`]; the report stage
//! writes it onto the Pod (Event, annotation), the log and the metrics.

pub mod backoff;
pub mod cgroupfs;
pub mod console_lines;
mod pipeline;
pub mod report;
pub mod track;

use std::time::SystemTime;

use serde::Serialize;

use super::pods::ContainerRef;

pub use self::pipeline::{Outputs, run};

/// One process of a pod's container that ended, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Termination {
    /// When the process exited (wall clock, from the probe's monotonic time).
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    /// The container's runtime id (from its cgroup path).
    pub container_id: String,
    /// Namespace, pod and container, once the pod watch has seen the container.
    #[serde(flatten)]
    pub container: Option<ContainerRef>,
    pub pid: u32,
    pub comm: String,
    /// The container's first process: its exit ends the container. Otherwise a child process
    /// died while the container keeps running (a death Kubernetes never shows).
    pub main_process: bool,
    pub cause: Cause,
}

/// How the process ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Cause {
    /// It called exit with this status.
    Exited { code: u8 },
    /// A fatal signal raised by its own fault (SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE, ...).
    Crashed {
        signal: u8,
        core_dumped: bool,
        /// The kernel's console line about the fault, when it printed one.
        fault: Option<Fault>,
    },
    /// Killed by the OOM killer.
    OomKilled(Box<OomKill>),
    /// Killed by a signal another process (or the kernel) sent.
    Killed { signal: u8, sender: Sender },
}

impl Cause {
    /// The metric label: a fixed, bounded set.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Exited { .. } => "exited",
            Self::Crashed { .. } => "crashed",
            Self::OomKilled(_) => "oom_killed",
            Self::Killed { .. } => "killed",
        }
    }
}

/// The kernel's report of a user-space fault: `segfault at ... ip ... in <lib>[...]` or a
/// `traps:` line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fault {
    /// `segfault`, `general protection fault`, `trap invalid opcode`, ...
    pub kind: String,
    /// The faulting address, when printed.
    pub address: Option<u64>,
    pub ip: Option<u64>,
    /// The mapping the instruction pointer was in, e.g. `libc.so.6`.
    pub location: Option<String>,
    /// The console line as printed.
    pub line: String,
}

/// What the OOM killer did and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OomKill {
    pub scope: OomScope,
    /// The victim's resident memory when it was chosen (anon + file + shmem), when the kernel
    /// reports it.
    pub rss_bytes: Option<u64>,
    pub oom_score_adj: Option<i16>,
    /// The memory limit of the cgroup that ran out (`memory.max` or `memory.limit_in_bytes`).
    pub limit_bytes: Option<u64>,
    /// The container cgroup's `memory.events` counters after the kill (cgroup v2 only).
    pub memory_events: Option<MemoryEvents>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OomScope {
    /// The container's own memory limit.
    Container,
    /// The pod's limit (the pod cgroup above the container's).
    Pod,
    /// The whole node ran out (no cgroup limit reached).
    Node,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryEvents {
    pub oom: u64,
    pub oom_kill: u64,
}

/// Who sent the fatal signal.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sender {
    /// The container runtime stopping the container on kubelet's request: SIGTERM, or
    /// SIGKILL when the grace period ran out after a SIGTERM.
    Runtime {
        pid: u32,
        comm: String,
        /// A SIGKILL after the runtime's SIGTERM to the same process: the grace period ran out.
        grace_period_expired: bool,
        /// Seconds from the SIGTERM to the SIGKILL, when both were seen.
        grace_seconds: Option<f64>,
    },
    /// Another process of the same pod.
    SamePod {
        pid: u32,
        comm: String,
        container: Option<String>,
    },
    /// A process of another pod.
    OtherPod {
        pid: u32,
        comm: String,
        #[serde(flatten)]
        container: Option<ContainerRef>,
        container_id: String,
    },
    /// A process on the host, outside any pod.
    Host {
        pid: u32,
        comm: String,
        /// Its cgroup path; `None` when it exited before the agent could read it.
        #[serde(skip_serializing_if = "Option::is_none")]
        cgroup: Option<String>,
    },
    /// The kernel itself (`SI_KERNEL`), other than the OOM killer.
    Kernel,
    /// The signal's sending was not seen: sent before the agent started, or lost when the
    /// probes' ring was full.
    Unknown,
}

/// `SystemTime` as RFC 3339 in JSON.
mod rfc3339 {
    use std::time::SystemTime;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(at: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(*at))
    }
}
