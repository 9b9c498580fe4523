//! Hangs and stuck CNI calls as Kubernetes-native signals, in the style of
//! node-problem-detector: the conditions `NetlinkRecvHung` and `CNICallsStuck` on the agent's
//! own Node, and Events on the Node and on the Pods involved. Only in a cluster.
//!
//! Data flows one way. The events loop publishes what the trackers see now ([`NodeHealth`],
//! on a watch channel: the latest state wins) → the observer turns each new state into the
//! desired conditions and into one Event per episode (a thread's hang, a call's stuck run) →
//! two writers, one for the Node's status and one for Events, each retrying with back-off on
//! its own. A slow or failing API server delays neither the trackers nor the other writer;
//! Events beyond a bounded queue or a rate limit are dropped and counted.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, ObjectReference},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

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

/// A change of a condition's status is written at most this soon after the previous write,
const MIN_TRANSITION_GAP: Duration = Duration::from_secs(1);
/// a change of its message only (another worst case, another count) this soon,
const MIN_UPDATE_GAP: Duration = Duration::from_secs(10);
/// and an unchanged state is written again, with a new `lastHeartbeatTime`, this often.
const HEARTBEAT: Duration = Duration::from_secs(300);
/// Failed writes are retried after 1 s, doubling up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Events waiting for the writer; more are dropped.
const EVENT_QUEUE: usize = 256;
/// Warning Events: this many at once, then one more per `EVENT_REFILL`. The Normal Event
/// that closes an episode is not limited: it is owed for every Warning that was published.
const EVENT_BURST: u32 = 25;
const EVENT_REFILL: Duration = Duration::from_secs(10);
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
        ConditionWriter {
            api: Api::all(client.clone()),
            node: config.node.clone(),
            thresholds,
            started: Timestamp::now(),
            metrics: metrics.clone(),
        }
        .run(desired_rx),
    );
    tasks.spawn(
        "node-events",
        Lifetime::Required,
        write_events(client, config.node, events_rx, metrics),
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

/// One condition as the agent wants it on the Node.
#[derive(Clone, Debug, PartialEq)]
struct Condition {
    state: State,
    /// When its status last changed, as this agent saw it; `None`: not since the agent started.
    since: Option<Timestamp>,
}

/// What a condition says. Equal states make the same write, but for the durations its
/// message gives, which are rendered at the time of each write.
#[derive(Clone, Debug, PartialEq)]
enum State {
    NotHung {
        /// The longest of the hangs whose end cleared the condition.
        last: Option<(HungThread, Duration)>,
    },
    Hung {
        /// The thread blocked longest.
        worst: HungThread,
        count: usize,
    },
    NotStuck {
        /// The oldest of the calls whose end cleared the condition.
        last: Option<(StuckCniCall, Duration)>,
    },
    Stuck {
        oldest: StuckCniCall,
        count: usize,
    },
}

impl State {
    fn status(&self) -> bool {
        matches!(self, Self::Hung { .. } | Self::Stuck { .. })
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::NotHung { last: None } => "NoNetlinkRecvHang",
            Self::NotHung { last: Some(_) } => "NetlinkRecvHangCleared",
            Self::Hung { .. } => "ThreadBlockedInNetlinkRecv",
            Self::NotStuck { last: None } => "NoCNICallsStuck",
            Self::NotStuck { last: Some(_) } => "CNICallsCleared",
            Self::Stuck { .. } => "CNIPluginCallsStuck",
        }
    }

    fn message(&self, thresholds: Thresholds, now: &Clock) -> String {
        match self {
            Self::NotHung { last } => {
                let mut message = format!(
                    "No thread in a netlink recv call for longer than {}.",
                    human(thresholds.netlink)
                );
                if let Some((thread, lasted)) = last {
                    let _ = write!(
                        message,
                        " The last hang: {}, netlink {} {}, ended after {}.",
                        thread_name(thread),
                        thread.protocol,
                        thread.syscall,
                        human(*lasted)
                    );
                }
                message
            }
            Self::Hung { worst, count } => format!(
                "{count} {} blocked in a netlink recv call for longer than {}; the longest: {}",
                plural(*count, "thread", "threads"),
                human(thresholds.netlink),
                hang_summary(worst, now)
            ),
            Self::NotStuck { last } => {
                let mut message = format!(
                    "No CNI plugin call running for longer than {}.",
                    human(thresholds.cni)
                );
                if let Some((call, lasted)) = last {
                    let _ = write!(
                        message,
                        " The last stuck call: {}, ended after {}.",
                        call_name(call),
                        human(*lasted)
                    );
                }
                message
            }
            Self::Stuck { oldest, count } => format!(
                "{count} CNI plugin {} running for longer than {}; the oldest: {}, running for {} (since {})",
                plural(*count, "call", "calls"),
                human(thresholds.cni),
                call_name(oldest),
                human(now.since(oldest.start_ns)),
                rfc3339(now.wall_of(oldest.start_ns))
            ),
        }
    }
}

/// Both conditions, as the observer wants them written.
#[derive(Clone, Debug, PartialEq)]
struct Conditions {
    netlink: Condition,
    cni: Condition,
}

impl Conditions {
    fn iter(&self) -> [(&'static str, &Condition); 2] {
        [
            (NETLINK_CONDITION, &self.netlink),
            (CNI_CONDITION, &self.cni),
        ]
    }

    fn same_statuses(&self, other: &Self) -> bool {
        self.netlink.state.status() == other.netlink.state.status()
            && self.cni.state.status() == other.cni.state.status()
    }
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq)]
struct EventSpec {
    regarding: ObjectReference,
    warning: bool,
    reason: &'static str,
    note: String,
    time: Timestamp,
}

impl EventSpec {
    fn action(&self) -> &'static str {
        if self.warning { "Detected" } else { "Cleared" }
    }
}

/// An episode seen and whether its Warning was published (so its end is too).
#[derive(Debug)]
struct Episode<T> {
    item: T,
    /// The Pod to tell too: the hung thread's, or the one the CNI call sets up, when the
    /// Pod is on this node (Events about it then carry its uid, so `kubectl describe` shows them).
    pod: Option<ObjectReference>,
    announced: bool,
}

/// Token bucket for Warning Events.
#[derive(Debug)]
struct RateLimit {
    tokens: u32,
    refilled: Instant,
}

impl RateLimit {
    fn new(now: Instant) -> Self {
        Self {
            tokens: EVENT_BURST,
            refilled: now,
        }
    }

    fn take(&mut self, wanted: u32, now: Instant) -> bool {
        let periods = (now.saturating_duration_since(self.refilled).as_nanos()
            / EVENT_REFILL.as_nanos())
        .min(u128::from(EVENT_BURST)) as u32;
        if periods > 0 {
            self.tokens = (self.tokens + periods).min(EVENT_BURST);
            self.refilled += EVENT_REFILL * periods;
            if self.tokens == EVENT_BURST {
                self.refilled = now;
            }
        }
        if self.tokens < wanted {
            return false;
        }
        self.tokens -= wanted;
        true
    }
}

/// Turns each published [`NodeHealth`] into desired conditions and Events.
struct Observer {
    node: String,
    thresholds: Thresholds,
    pods: PodIndex,
    hangs: HashMap<(u32, u64), Episode<HungThread>>,
    calls: HashMap<(u32, u64), Episode<StuckCniCall>>,
    /// Whether the Node's Warning for the current stuck-calls episode was published.
    cni_announced: bool,
    conditions: Conditions,
    limit: RateLimit,
    events: mpsc::Sender<EventSpec>,
    metrics: Arc<AgentMetrics>,
}

impl Observer {
    fn new(
        node: String,
        thresholds: Thresholds,
        pods: PodIndex,
        events: mpsc::Sender<EventSpec>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Self {
            node,
            thresholds,
            pods,
            hangs: HashMap::new(),
            calls: HashMap::new(),
            cni_announced: false,
            // False from the start: operators see the agent is watching.
            conditions: Conditions {
                netlink: Condition {
                    state: State::NotHung { last: None },
                    since: None,
                },
                cni: Condition {
                    state: State::NotStuck { last: None },
                    since: None,
                },
            },
            limit: RateLimit::new(Instant::now()),
            events,
            metrics,
        }
    }

    fn update(&mut self, health: &NodeHealth, now: &Clock) {
        self.update_hangs(&health.hung_threads, now);
        self.update_calls(&health.stuck_cni_calls, now);
    }

    fn update_hangs(&mut self, threads: &[HungThread], now: &Clock) {
        let current: HashSet<(u32, u64)> = threads.iter().map(|t| (t.tid, t.start_ns)).collect();
        let ended: Vec<(u32, u64)> = self
            .hangs
            .keys()
            .filter(|key| !current.contains(key))
            .copied()
            .collect();
        let mut last: Option<(HungThread, Duration)> = None;
        for key in ended {
            let episode = self.hangs.remove(&key).expect("listed above");
            let lasted = now.since(episode.item.start_ns);
            if episode.announced {
                let note = truncate(format!(
                    "{}: netlink {} {} no longer blocked after {} (the call returned or the thread exited).",
                    thread_name(&episode.item),
                    episode.item.protocol,
                    episode.item.syscall,
                    human(lasted)
                ));
                let specs = self.about_thread(&episode, false, "NetlinkRecvHangCleared", note, now);
                self.conclude(specs);
            }
            if last.as_ref().is_none_or(|(_, longest)| lasted > *longest) {
                last = Some((episode.item, lasted));
            }
        }
        let mut new: Vec<&HungThread> = threads
            .iter()
            .filter(|t| !self.hangs.contains_key(&(t.tid, t.start_ns)))
            .collect();
        new.sort_by_key(|t| (t.start_ns, t.tid));
        for thread in new {
            let mut episode = Episode {
                pod: thread
                    .container
                    .as_ref()
                    .and_then(|c| self.pod(&c.namespace, &c.pod)),
                item: thread.clone(),
                announced: false,
            };
            let note = truncate(format!(
                "Thread blocked in a netlink recv call for longer than {}: {}. Its command line and kernel stack are in the lastgasp agent's netlink_hang log event.",
                human(self.thresholds.netlink),
                hang_summary(thread, now)
            ));
            let specs = self.about_thread(&episode, true, NETLINK_CONDITION, note, now);
            episode.announced = self.announce(specs, now);
            self.hangs.insert((thread.tid, thread.start_ns), episode);
        }
        let worst = threads.iter().min_by_key(|t| (t.start_ns, t.tid));
        let state = match (worst, &self.conditions.netlink.state) {
            (Some(worst), _) => State::Hung {
                worst: worst.clone(),
                count: threads.len(),
            },
            (None, State::Hung { .. }) => State::NotHung { last },
            (None, unchanged) => unchanged.clone(),
        };
        set(&mut self.conditions.netlink, state, now);
    }

    fn update_calls(&mut self, calls: &[StuckCniCall], now: &Clock) {
        let current: HashSet<(u32, u64)> = calls.iter().map(|c| (c.pid, c.start_ns)).collect();
        let ended: Vec<(u32, u64)> = self
            .calls
            .keys()
            .filter(|key| !current.contains(key))
            .copied()
            .collect();
        let mut last: Option<(StuckCniCall, Duration)> = None;
        for key in ended {
            let episode = self.calls.remove(&key).expect("listed above");
            let lasted = now.since(episode.item.start_ns);
            if episode.announced
                && let Some(pod) = episode.pod
            {
                let note = truncate(format!(
                    "CNI plugin {} no longer stuck after {} (it exited).",
                    call_name(&episode.item),
                    human(lasted)
                ));
                self.conclude(vec![EventSpec {
                    regarding: pod,
                    warning: false,
                    reason: "CNICallCleared",
                    note,
                    time: now.wall,
                }]);
            }
            if last
                .as_ref()
                .is_none_or(|(oldest, _)| episode.item.start_ns < oldest.start_ns)
            {
                last = Some((episode.item, lasted));
            }
        }
        let mut new: Vec<&StuckCniCall> = calls
            .iter()
            .filter(|c| !self.calls.contains_key(&(c.pid, c.start_ns)))
            .collect();
        new.sort_by_key(|c| (c.start_ns, c.pid));
        for call in new {
            let pod = match (&call.pod_namespace, &call.pod_name) {
                (Some(namespace), Some(name)) => self.pod(namespace, name),
                _ => None,
            };
            // Calls for no pod of this node are only counted in the Node's condition and Event.
            let announced = match pod.clone() {
                Some(pod) => {
                    let note = truncate(format!(
                        "CNI plugin {} for this pod running for longer than {}: {} so far (since {}). Its kernel stack is in the lastgasp agent's cni_call_stuck log event.",
                        call_name(call),
                        human(self.thresholds.cni),
                        human(now.since(call.start_ns)),
                        rfc3339(now.wall_of(call.start_ns))
                    ));
                    self.announce(
                        vec![EventSpec {
                            regarding: pod,
                            warning: true,
                            reason: "CNICallStuck",
                            note,
                            time: now.wall,
                        }],
                        now,
                    )
                }
                None => false,
            };
            self.calls.insert(
                (call.pid, call.start_ns),
                Episode {
                    item: call.clone(),
                    pod,
                    announced,
                },
            );
        }
        let oldest = calls.iter().min_by_key(|c| (c.start_ns, c.pid));
        let was_stuck = self.conditions.cni.state.status();
        let state = match (oldest, &self.conditions.cni.state) {
            (Some(oldest), _) => State::Stuck {
                oldest: oldest.clone(),
                count: calls.len(),
            },
            (None, State::Stuck { .. }) => State::NotStuck { last },
            (None, unchanged) => unchanged.clone(),
        };
        // The Node gets one Event per episode of the condition, not one per call: a CNI
        // daemon that hangs leaves thousands of plugin calls behind it.
        match (was_stuck, state.status()) {
            (false, true) => {
                let note = truncate(state.message(self.thresholds, now));
                let spec = self.about_node(true, CNI_CONDITION, note, now);
                self.cni_announced = self.announce(vec![spec], now);
            }
            (true, false) if self.cni_announced => {
                let note = truncate(state.message(self.thresholds, now));
                let spec = self.about_node(false, "CNICallsCleared", note, now);
                self.conclude(vec![spec]);
                self.cni_announced = false;
            }
            _ => {}
        }
        set(&mut self.conditions.cni, state, now);
    }

    /// The Node's Event about a hung thread, and its Pod's when the thread is in one.
    fn about_thread(
        &self,
        episode: &Episode<HungThread>,
        warning: bool,
        reason: &'static str,
        note: String,
        now: &Clock,
    ) -> Vec<EventSpec> {
        let mut specs = vec![self.about_node(warning, reason, note.clone(), now)];
        if let Some(pod) = &episode.pod {
            specs.push(EventSpec {
                regarding: pod.clone(),
                warning,
                reason,
                note,
                time: now.wall,
            });
        }
        specs
    }

    /// A reference to this node's Pod `namespace/name`, if the pod watch knows it.
    fn pod(&self, namespace: &str, name: &str) -> Option<ObjectReference> {
        Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: Some(self.pods.uid(namespace, name)?),
            ..ObjectReference::default()
        })
    }

    fn about_node(
        &self,
        warning: bool,
        reason: &'static str,
        note: String,
        now: &Clock,
    ) -> EventSpec {
        EventSpec {
            regarding: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(self.node.clone()),
                // As kubelet and node-problem-detector name their node in Events.
                uid: Some(self.node.clone()),
                ..ObjectReference::default()
            },
            warning,
            reason,
            note,
            time: now.wall,
        }
    }

    /// Publishes an episode's Warning Events if the rate limit allows all of them.
    fn announce(&mut self, specs: Vec<EventSpec>, now: &Clock) -> bool {
        if !self.limit.take(specs.len() as u32, now.instant) {
            tracing::debug!(
                events = specs.len(),
                "Event rate limit reached; not publishing"
            );
            self.count("event", "dropped", specs.len() as u64);
            return false;
        }
        self.conclude(specs);
        true
    }

    /// Queues Events without a rate limit (the Normal ones closing published episodes).
    fn conclude(&mut self, specs: Vec<EventSpec>) {
        for spec in specs {
            if self.events.try_send(spec).is_err() {
                tracing::warn!("Event queue full; an Event is dropped");
                self.count("event", "dropped", 1);
            }
        }
    }

    fn count(&self, object: &str, result: &str, by: u64) {
        count(&self.metrics, object, result, by);
    }
}

/// Replaces a condition's state, noting when its status changes.
fn set(condition: &mut Condition, state: State, now: &Clock) {
    if condition.state.status() != state.status() {
        condition.since = Some(now.wall);
    }
    condition.state = state;
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

fn backoff(failures: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(failures.saturating_sub(1).min(16)))
        .min(MAX_BACKOFF)
}

/// Writes the desired conditions to the Node's status: on change (rate-limited) and as a
/// heartbeat, retrying failures with back-off. Only the newest desired state is written.
struct ConditionWriter {
    api: Api<Node>,
    node: String,
    thresholds: Thresholds,
    /// When the agent started watching: the transition time of a status it has not seen change.
    started: Timestamp,
    metrics: Arc<AgentMetrics>,
}

/// A condition of ours already on the Node when the agent started.
#[derive(Debug)]
struct Existing {
    status: String,
    last_transition_time: Option<String>,
}

impl ConditionWriter {
    async fn run(self, mut desired: watch::Receiver<Conditions>) {
        // Read once before the first write, to keep the transition times of unchanged statuses.
        let mut existing: Option<HashMap<String, Existing>> = None;
        let mut written: Option<(Conditions, Instant)> = None;
        let mut failures = 0u32;
        let mut retry_at = Instant::now();
        loop {
            let due = {
                let want = desired.borrow_and_update();
                let due = match &written {
                    None => retry_at,
                    Some((done, at)) if !want.same_statuses(done) => *at + MIN_TRANSITION_GAP,
                    Some((done, at)) if *want != *done => *at + MIN_UPDATE_GAP,
                    Some((_, at)) => *at + HEARTBEAT,
                };
                due.max(retry_at)
            };
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = tokio::time::sleep_until(due) => {}
            }
            let want = desired.borrow_and_update().clone();
            let result = match existing.as_ref() {
                Some(existing) => self.write(&want, existing).await,
                None => match self.read().await {
                    Ok(read) => self.write(&want, existing.insert(read)).await,
                    Err(error) => Err(error),
                },
            };
            match result {
                Ok(()) => {
                    count(&self.metrics, "node_conditions", "success", 1);
                    if written
                        .as_ref()
                        .is_none_or(|(done, _)| !want.same_statuses(done))
                    {
                        tracing::info!(
                            node = self.node,
                            netlink_recv_hung = want.netlink.state.status(),
                            cni_calls_stuck = want.cni.state.status(),
                            "node conditions written"
                        );
                    }
                    written = Some((want, Instant::now()));
                    failures = 0;
                    retry_at = Instant::now();
                }
                Err(error) => {
                    count(&self.metrics, "node_conditions", "error", 1);
                    failures += 1;
                    let wait = backoff(failures);
                    tracing::warn!(node = self.node, %error, retry_in = ?wait, "writing the node conditions failed");
                    retry_at = Instant::now() + wait;
                }
            }
        }
    }

    /// Our conditions as they are on the Node now. A missing Node is an error (it may be
    /// registered later); a refusal to read is not: the write then sets fresh transition times.
    async fn read(&self) -> Result<HashMap<String, Existing>, kube::Error> {
        match self.api.get_status(&self.node).await {
            Ok(node) => Ok(node
                .status
                .and_then(|status| status.conditions)
                .unwrap_or_default()
                .into_iter()
                .filter(|c| c.type_ == NETLINK_CONDITION || c.type_ == CNI_CONDITION)
                .map(|c| {
                    (
                        c.type_,
                        Existing {
                            status: c.status,
                            last_transition_time: c.last_transition_time.map(|t| rfc3339(t.0)),
                        },
                    )
                })
                .collect()),
            Err(error) if retryable(&error) || is_not_found(&error) => Err(error),
            Err(error) => {
                tracing::warn!(node = self.node, %error, "cannot read the node's conditions; transition times start now");
                Ok(HashMap::new())
            }
        }
    }

    async fn write(
        &self,
        want: &Conditions,
        existing: &HashMap<String, Existing>,
    ) -> Result<(), kube::Error> {
        let now = Clock::now();
        let heartbeat = rfc3339(now.wall);
        let conditions: Vec<Value> = want
            .iter()
            .into_iter()
            .map(|(type_, condition)| {
                let status = if condition.state.status() {
                    "True"
                } else {
                    "False"
                };
                let transition = match condition.since {
                    Some(since) => rfc3339(since),
                    None => existing
                        .get(type_)
                        .filter(|e| e.status == status)
                        .and_then(|e| e.last_transition_time.clone())
                        .unwrap_or_else(|| rfc3339(self.started)),
                };
                json!({
                    "type": type_,
                    "status": status,
                    "reason": condition.state.reason(),
                    "message": condition.state.message(self.thresholds, &now),
                    "lastHeartbeatTime": heartbeat,
                    "lastTransitionTime": transition,
                })
            })
            .collect();
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": self.node },
            "status": { "conditions": conditions },
        });
        self.api
            .patch_status(
                &self.node,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(drop)
    }
}

/// Creates each queued Event, retrying transient failures with back-off; while it waits,
/// the queue fills and the observer drops (and counts) what does not fit.
async fn write_events(
    client: Client,
    node: String,
    mut queue: mpsc::Receiver<EventSpec>,
    metrics: Arc<AgentMetrics>,
) {
    let mut last_ns = 0i128;
    while let Some(spec) = queue.recv().await {
        // Names `<object>.<hex ns>` like client-go's; strictly increasing so none repeats.
        last_ns = (last_ns + 1).max(Timestamp::now().as_nanosecond());
        let namespace = spec
            .regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    spec.regarding.name.as_deref().unwrap_or("lastgasp-agent"),
                    last_ns
                )),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(spec.time)),
            type_: Some(if spec.warning { "Warning" } else { "Normal" }.into()),
            reason: Some(spec.reason.into()),
            action: Some(spec.action().into()),
            note: Some(spec.note.clone()),
            regarding: Some(spec.regarding.clone()),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(node.clone()),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
        let mut failures = 0u32;
        loop {
            match api.create(&PostParams::default(), &event).await {
                Ok(_) => {
                    count(&metrics, "event", "success", 1);
                    break;
                }
                Err(error) => {
                    count(&metrics, "event", "error", 1);
                    if !retryable(&error) {
                        tracing::warn!(%error, reason = spec.reason, "Event refused; dropped");
                        count(&metrics, "event", "dropped", 1);
                        break;
                    }
                    failures += 1;
                    let wait = backoff(failures);
                    tracing::warn!(%error, reason = spec.reason, retry_in = ?wait, "publishing an Event failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Throttling, server errors and connection trouble. Unlike the controller's patches, a 409
/// here is final: for a create it means the name is taken.
fn retryable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn observer() -> (Observer, mpsc::Receiver<EventSpec>, Arc<AgentMetrics>) {
        let metrics = AgentMetrics::register(&mut Registry::default());
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let thresholds = Thresholds {
            netlink: Duration::from_secs(30),
            cni: Duration::from_secs(60),
        };
        let pods = PodIndex::default();
        pods.insert_uid("kube-system", "terway-x", "uid-terway-x");
        pods.insert_uid("shop", "web-0", "uid-web-0");
        let observer = Observer::new("worker-3".into(), thresholds, pods, tx, metrics.clone());
        (observer, rx, metrics)
    }

    /// A clock `seconds` into the test, on both time lines.
    fn at(seconds: u64, base: Instant) -> Clock {
        Clock {
            monotonic_ns: 1_000 * SECOND + seconds * SECOND,
            wall: "2025-11-23T10:00:00Z".parse::<Timestamp>().unwrap()
                + SignedDuration::from_secs(seconds as i64),
            instant: base + Duration::from_secs(seconds),
        }
    }

    fn thread(tid: u32, started_at: u64, pod: Option<(&str, &str)>) -> HungThread {
        HungThread {
            pid: 19246,
            tid,
            comm: "terwayd".into(),
            protocol: "route",
            syscall: "recvfrom",
            start_ns: 1_000 * SECOND + started_at * SECOND,
            container: pod.map(|(namespace, pod)| ContainerRef {
                namespace: namespace.into(),
                pod: pod.into(),
                container: "terway".into(),
            }),
        }
    }

    fn call(pid: u32, started_at: u64, pod: Option<&str>) -> StuckCniCall {
        StuckCniCall {
            pid,
            plugin: "terway".into(),
            command: "DEL".into(),
            container_id: "0123456789abcdef0123".into(),
            pod_namespace: pod.map(|_| "shop".to_owned()),
            pod_name: pod.map(str::to_owned),
            start_ns: 1_000 * SECOND + started_at * SECOND,
        }
    }

    fn drain(rx: &mut mpsc::Receiver<EventSpec>) -> Vec<EventSpec> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn summary(events: &[EventSpec]) -> Vec<(bool, &str, &str)> {
        events
            .iter()
            .map(|e| {
                (
                    e.warning,
                    e.reason,
                    e.regarding.kind.as_deref().unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn a_hang_is_one_warning_per_object_then_one_normal_when_it_ends() {
        let (mut observer, mut rx, _) = observer();
        let base = Instant::now();
        let hung = NodeHealth {
            hung_threads: vec![thread(19300, 0, Some(("kube-system", "terway-x")))],
            stuck_cni_calls: vec![],
        };
        observer.update(&hung, &at(31, base));
        let events = drain(&mut rx);
        assert_eq!(
            summary(&events),
            [
                (true, NETLINK_CONDITION, "Node"),
                (true, NETLINK_CONDITION, "Pod")
            ]
        );
        assert_eq!(events[0].regarding.name.as_deref(), Some("worker-3"));
        assert_eq!(events[0].regarding.uid.as_deref(), Some("worker-3"));
        assert_eq!(
            events[1].regarding.namespace.as_deref(),
            Some("kube-system")
        );
        assert_eq!(events[1].regarding.name.as_deref(), Some("terway-x"));
        assert_eq!(events[1].regarding.uid.as_deref(), Some("uid-terway-x"));
        assert!(
            events[0].note.contains(
                "terwayd (pid 19246, tid 19300) in pod kube-system/terway-x container terway, \
                 netlink route recvfrom in flight for 31s (since 2025-11-23T10:00:00Z)"
            ),
            "{}",
            events[0].note
        );
        let condition = &observer.conditions.netlink;
        assert!(condition.state.status());
        assert_eq!(condition.state.reason(), "ThreadBlockedInNetlinkRecv");
        let since = condition.since.expect("a transition");

        // The same hang at every later scan: no more Events, the transition time stays.
        observer.update(&hung, &at(95, base));
        assert!(drain(&mut rx).is_empty());
        assert_eq!(observer.conditions.netlink.since, Some(since));
        assert_eq!(
            observer
                .conditions
                .netlink
                .state
                .message(observer.thresholds, &at(95, base)),
            "1 thread blocked in a netlink recv call for longer than 30s; the longest: \
             terwayd (pid 19246, tid 19300) in pod kube-system/terway-x container terway, \
             netlink route recvfrom in flight for 1m 35s (since 2025-11-23T10:00:00Z)"
        );

        observer.update(&NodeHealth::default(), &at(100, base));
        let events = drain(&mut rx);
        assert_eq!(
            summary(&events),
            [
                (false, "NetlinkRecvHangCleared", "Node"),
                (false, "NetlinkRecvHangCleared", "Pod")
            ]
        );
        assert!(events[0].note.contains("no longer blocked after 1m 40s"));
        let condition = &observer.conditions.netlink;
        assert!(!condition.state.status());
        assert_eq!(condition.state.reason(), "NetlinkRecvHangCleared");
        assert_eq!(condition.since, Some(at(100, base).wall));
        assert!(
            condition
                .state
                .message(observer.thresholds, &at(100, base))
                .contains("The last hang: terwayd (pid 19246, tid 19300)")
        );
    }

    #[test]
    fn the_condition_names_the_longest_hang_and_counts_them() {
        let (mut observer, mut rx, _) = observer();
        let base = Instant::now();
        let health = NodeHealth {
            hung_threads: vec![thread(2, 20, None), thread(1, 5, None), thread(3, 40, None)],
            stuck_cni_calls: vec![],
        };
        observer.update(&health, &at(80, base));
        // A thread in no known pod: only the Node hears of it.
        assert_eq!(drain(&mut rx).len(), 3);
        let State::Hung { worst, count } = &observer.conditions.netlink.state else {
            panic!("not hung: {:?}", observer.conditions.netlink.state);
        };
        assert_eq!((worst.tid, *count), (1, 3));
        assert!(
            observer
                .conditions
                .netlink
                .state
                .message(observer.thresholds, &at(80, base))
                .starts_with("3 threads blocked")
        );
    }

    #[test]
    fn stuck_calls_warn_each_pod_and_the_node_once() {
        let (mut observer, mut rx, _) = observer();
        let base = Instant::now();
        let two = NodeHealth {
            hung_threads: vec![],
            stuck_cni_calls: vec![
                call(10, 0, Some("web-0")),
                call(11, 3, None),
                call(12, 4, Some("gone-1")),
            ],
        };
        observer.update(&two, &at(61, base));
        let events = drain(&mut rx);
        assert_eq!(
            summary(&events),
            [(true, "CNICallStuck", "Pod"), (true, CNI_CONDITION, "Node")]
        );
        assert_eq!(events[0].regarding.name.as_deref(), Some("web-0"));
        assert!(
            events[0]
                .note
                .contains("terway DEL (pid 10) for pod shop/web-0")
        );
        assert_eq!(
            events[1].note,
            "3 CNI plugin calls running for longer than 1m; the oldest: terway DEL (pid 10) \
             for pod shop/web-0, running for 1m 1s (since 2025-11-23T10:00:00Z)"
        );
        assert_eq!(
            observer.conditions.cni.state.reason(),
            "CNIPluginCallsStuck"
        );

        // Only web-0 is a pod of this node: the others' Events would find no pod.
        assert_eq!(events[0].regarding.uid.as_deref(), Some("uid-web-0"));

        // The pod's calls end; the other is still stuck.
        let one = NodeHealth {
            hung_threads: vec![],
            stuck_cni_calls: vec![call(11, 3, None)],
        };
        observer.update(&one, &at(70, base));
        assert_eq!(summary(&drain(&mut rx)), [(false, "CNICallCleared", "Pod")]);
        let State::Stuck { oldest, count } = &observer.conditions.cni.state else {
            panic!("not stuck");
        };
        assert_eq!((oldest.pid, *count), (11, 1));
        assert!(call_name(oldest).ends_with("for sandbox 0123456789ab"));

        observer.update(&NodeHealth::default(), &at(75, base));
        let events = drain(&mut rx);
        assert_eq!(summary(&events), [(false, "CNICallsCleared", "Node")]);
        assert_eq!(
            events[0].note,
            "No CNI plugin call running for longer than 1m. The last stuck call: terway DEL \
             (pid 11) for sandbox 0123456789ab, ended after 1m 12s."
        );
        assert_eq!(observer.conditions.cni.state.reason(), "CNICallsCleared");
    }

    #[test]
    fn warnings_beyond_the_rate_limit_are_dropped_and_never_cleared() {
        let (mut observer, mut rx, metrics) = observer();
        let base = Instant::now();
        let many = NodeHealth {
            hung_threads: (0..30).map(|tid| thread(tid, 0, None)).collect(),
            stuck_cni_calls: vec![],
        };
        observer.update(&many, &at(31, base));
        assert_eq!(drain(&mut rx).len(), EVENT_BURST as usize);
        let dropped = || {
            metrics
                .kubernetes_writes
                .get_or_create(&KubernetesWriteLabels {
                    object: "event".into(),
                    result: "dropped".into(),
                })
                .get()
        };
        assert_eq!(dropped(), 5);
        // All 30 count in the condition.
        assert!(matches!(
            observer.conditions.netlink.state,
            State::Hung { count: 30, .. }
        ));
        // Only the published episodes get their closing Event, and the limit does not apply to those.
        observer.update(&NodeHealth::default(), &at(40, base));
        let events = drain(&mut rx);
        assert_eq!(events.len(), EVENT_BURST as usize);
        assert!(events.iter().all(|e| !e.warning));
    }

    #[test]
    fn the_rate_limit_refills_one_token_per_period_up_to_the_burst() {
        let base = Instant::now();
        let mut limit = RateLimit::new(base);
        assert!(limit.take(EVENT_BURST, base));
        assert!(!limit.take(1, base + EVENT_REFILL / 2));
        assert!(limit.take(1, base + EVENT_REFILL));
        assert!(!limit.take(1, base + EVENT_REFILL * 3 / 2));
        assert!(limit.take(2, base + EVENT_REFILL * 3));
        assert!(!limit.take(1, base + EVENT_REFILL * 3));
        // A long quiet spell refills to the burst, no more.
        assert!(limit.take(EVENT_BURST, base + EVENT_REFILL * 1000));
        assert!(!limit.take(1, base + EVENT_REFILL * 1000));
    }

    #[test]
    fn the_conditions_start_false() {
        let (observer, _, _) = observer();
        let now = at(0, Instant::now());
        for (type_, condition) in observer.conditions.iter() {
            assert!(!condition.state.status(), "{type_}");
            assert_eq!(condition.since, None);
        }
        assert_eq!(
            observer.conditions.netlink.state.reason(),
            "NoNetlinkRecvHang"
        );
        assert_eq!(observer.conditions.cni.state.reason(), "NoCNICallsStuck");
        assert_eq!(
            observer
                .conditions
                .netlink
                .state
                .message(observer.thresholds, &now),
            "No thread in a netlink recv call for longer than 30s."
        );
    }

    #[test]
    fn notes_fit_the_api_limit_and_durations_read_well() {
        let note = truncate("é".repeat(NOTE_LIMIT));
        assert!(note.len() <= NOTE_LIMIT && note.ends_with("..."));
        assert_eq!(human(Duration::from_millis(4_250)), "4.2s");
        assert_eq!(human(Duration::from_secs(1595 * 60)), "1day 2h 35m");
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
