//! Hangs and stuck CNI calls as Kubernetes-native signals, in the style of
//! node-problem-detector: the conditions `NetlinkRecvHung` and `CNICallsStuck` on the agent's
//! own Node, and Events on the Node and on the Pods involved. Only in a cluster.
//!
//! Data flows one way. The events loop publishes what the trackers see now ([`NodeHealth`],
//! on a watch channel: the latest state wins) → the [`observer`] turns each new state into the
//! desired conditions and into one Event per episode (a thread's hang, a call's stuck run) →
//! two writers, [`conditions`] for the Node's status and [`events`] for Events, each retrying
//! with back-off on its own ([`crate::kube_retry`]). A slow or failing API server delays
//! neither the trackers nor the other writer; Events beyond a bounded queue or a rate limit
//! are dropped and counted.

mod conditions;
mod events;
mod observer;

use std::{fmt::Write as _, sync::Arc, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use self::{conditions::ConditionWriter, observer::Observer};
use super::pods::{ContainerRef, PodIndex};
use crate::{
    metrics::{AgentMetrics, KubernetesWriteLabels},
    procfs,
    supervise::{Lifetime, Supervisor},
};

/// Field manager of the agent's server-side apply of its conditions.
pub const FIELD_MANAGER: &str = "lastgasp-agent";
/// `reportingController` of the agent's Events; `reportingInstance` is the node name.
pub const REPORTING_CONTROLLER: &str = "lastgasp.io/agent";
pub const NETLINK_CONDITION: &str = "NetlinkRecvHung";
pub const CNI_CONDITION: &str = "CNICallsStuck";

/// Events waiting for the writer; more are dropped.
const EVENT_QUEUE: usize = 256;
/// The API server refuses longer notes.
const NOTE_LIMIT: usize = 1024;

/// A thread in a netlink recv call past the hang threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct HungThread {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub protocol: &'static str,
    pub syscall: &'static str,
    /// `CLOCK_MONOTONIC` when the call began.
    pub start_ns: u64,
    pub container: Option<ContainerRef>,
}

/// A CNI plugin call running past the stuck threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct StuckCniCall {
    pub pid: u32,
    pub plugin: String,
    pub command: String,
    /// `CNI_CONTAINERID`: the sandbox being set up or torn down.
    pub container_id: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// `CLOCK_MONOTONIC` at the plugin's exec.
    pub start_ns: u64,
}

/// What the trackers see now. The events loop publishes it whenever it changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeHealth {
    pub hung_threads: Vec<HungThread>,
    pub stuck_cni_calls: Vec<StuckCniCall>,
}

pub struct NodeSignalsConfig {
    pub node: String,
    pub netlink_hang_threshold: Duration,
    pub cni_stuck_threshold: Duration,
}

/// Starts the observer and the two writers as tasks of `tasks`.
pub fn spawn(
    tasks: &mut Supervisor,
    client: Client,
    config: NodeSignalsConfig,
    pods: PodIndex,
    mut health: watch::Receiver<NodeHealth>,
    metrics: Arc<AgentMetrics>,
) {
    let thresholds = Thresholds {
        netlink: config.netlink_hang_threshold,
        cni: config.cni_stuck_threshold,
    };
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let mut observer = Observer::new(
        config.node.clone(),
        thresholds,
        pods,
        events_tx,
        metrics.clone(),
    );
    let (desired_tx, desired_rx) = watch::channel(observer.conditions.clone());
    tasks.spawn("node-signals", Lifetime::Required, async move {
        loop {
            let now = Clock::now();
            let state = health.borrow_and_update().clone();
            observer.update(&state, &now);
            desired_tx.send_if_modified(|desired| {
                let changed = *desired != observer.conditions;
                if changed {
                    desired.clone_from(&observer.conditions);
                }
                changed
            });
            if health.changed().await.is_err() {
                return;
            }
        }
    });
    tasks.spawn(
        "node-conditions",
        Lifetime::Required,
        ConditionWriter::new(
            client.clone(),
            config.node.clone(),
            thresholds,
            metrics.clone(),
        )
        .run(desired_rx),
    );
    tasks.spawn(
        "node-events",
        Lifetime::Required,
        events::write(client, config.node, events_rx, metrics),
    );
}

#[derive(Clone, Copy, Debug)]
struct Thresholds {
    netlink: Duration,
    cni: Duration,
}

/// Both clocks at one instant: the trackers' monotonic one and the wall clock.
#[derive(Clone, Copy, Debug)]
struct Clock {
    monotonic_ns: u64,
    wall: Timestamp,
    instant: Instant,
}

impl Clock {
    fn now() -> Self {
        Self {
            monotonic_ns: procfs::monotonic_ns(),
            wall: Timestamp::now(),
            instant: Instant::now(),
        }
    }

    fn since(&self, start_ns: u64) -> Duration {
        Duration::from_nanos(self.monotonic_ns.saturating_sub(start_ns))
    }

    /// The wall-clock time of a monotonic one.
    fn wall_of(&self, start_ns: u64) -> Timestamp {
        let ago = SignedDuration::try_from(self.since(start_ns)).unwrap_or(SignedDuration::ZERO);
        self.wall.checked_sub(ago).unwrap_or(self.wall)
    }
}

fn thread_name(thread: &HungThread) -> String {
    let mut name = format!("{} (pid {}, tid {})", thread.comm, thread.pid, thread.tid);
    match &thread.container {
        Some(c) => {
            let _ = write!(
                name,
                " in pod {}/{} container {}",
                c.namespace, c.pod, c.container
            );
        }
        None => name.push_str(" in no known pod"),
    }
    name
}

fn hang_summary(thread: &HungThread, now: &Clock) -> String {
    format!(
        "{}, netlink {} {} in flight for {} (since {})",
        thread_name(thread),
        thread.protocol,
        thread.syscall,
        human(now.since(thread.start_ns)),
        rfc3339(now.wall_of(thread.start_ns))
    )
}

fn call_name(call: &StuckCniCall) -> String {
    let command = if call.command.is_empty() {
        "(no CNI_COMMAND)"
    } else {
        &call.command
    };
    let mut name = format!("{} {command} (pid {})", call.plugin, call.pid);
    match (&call.pod_namespace, &call.pod_name) {
        (Some(namespace), Some(pod)) => {
            let _ = write!(name, " for pod {namespace}/{pod}");
        }
        _ if !call.container_id.is_empty() => {
            let id: String = call.container_id.chars().take(12).collect();
            let _ = write!(name, " for sandbox {id}");
        }
        _ => {}
    }
    name
}

fn plural<'a>(count: usize, one: &'a str, many: &'a str) -> &'a str {
    if count == 1 { one } else { many }
}

/// Whole seconds below a minute are kept, tenths below ten seconds: `1h 35m 2s`, `4.2s`.
fn human(duration: Duration) -> String {
    if duration < Duration::from_secs(10) {
        return format!("{:.1}s", duration.as_secs_f64());
    }
    humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
}

fn rfc3339(time: Timestamp) -> String {
    time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn truncate(mut note: String) -> String {
    if note.len() > NOTE_LIMIT {
        let mut end = NOTE_LIMIT - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

fn count(metrics: &AgentMetrics, object: &str, result: &str, by: u64) {
    metrics
        .kubernetes_writes
        .get_or_create(&KubernetesWriteLabels {
            object: object.into(),
            result: result.into(),
        })
        .inc_by(by);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_fit_the_api_limit_and_durations_read_well() {
        let note = truncate("é".repeat(NOTE_LIMIT));
        assert!(note.len() <= NOTE_LIMIT && note.ends_with("..."));
        assert_eq!(human(Duration::from_millis(4_250)), "4.2s");
        assert_eq!(human(Duration::from_secs(1595 * 60)), "1day 2h 35m");
    }
}
