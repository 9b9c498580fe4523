//! Turns each published [`NodeHealth`] into the conditions the Node should show and into
//! Events: one Warning per episode and object (rate-limited), one Normal when it ends.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::ObjectReference;
use tokio::{sync::mpsc, time::Instant};

use super::{
    CNI_CONDITION, Clock, HungThread, NETLINK_CONDITION, NodeHealth, StuckCniCall, Thresholds,
    call_name,
    conditions::{Condition, Conditions, State},
    count,
    events::EventSpec,
    hang_summary, human, plural, rfc3339, thread_name, truncate,
};
use crate::{agent::pods::PodIndex, metrics::AgentMetrics};

/// Warning Events: this many at once, then one more per `EVENT_REFILL`. The Normal Event
/// that closes an episode is not limited: it is owed for every Warning that was published.
const EVENT_BURST: u32 = 25;
const EVENT_REFILL: Duration = Duration::from_secs(10);
/// The reason of the Node Event linking stuck CNI calls to a thread hung in netlink recv.
pub const CNI_HANG_LINK_REASON: &str = "CNICallsBehindNetlinkHang";

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
pub(super) struct Observer {
    node: String,
    thresholds: Thresholds,
    pods: PodIndex,
    hangs: HashMap<(u32, u64), Episode<HungThread>>,
    calls: HashMap<(u32, u64), Episode<StuckCniCall>>,
    /// Whether the Node's Warning for the current stuck-calls episode was published.
    cni_announced: bool,
    /// Whether the current stuck-calls episode was linked to a hung thread (one Event each).
    cni_linked: bool,
    pub(super) conditions: Conditions,
    limit: RateLimit,
    events: mpsc::Sender<EventSpec>,
    metrics: Arc<AgentMetrics>,
}

impl Observer {
    pub(super) fn new(
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
            cni_linked: false,
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

    pub(super) fn update(&mut self, health: &NodeHealth, now: &Clock) {
        self.update_hangs(&health.hung_threads, now);
        self.update_calls(&health.stuck_cni_calls, now);
        self.link_calls_to_hang(health, now);
    }

    /// The Alibaba chain: a CNI daemon's thread blocked in netlink recv holds what every
    /// plugin call needs, and the calls pile up. When calls are stuck and a thread is hung, one
    /// Node Event per stuck-calls episode names the thread blocked first next to the oldest
    /// call, and says how they relate: the same process, or a hang that began before the calls.
    fn link_calls_to_hang(&mut self, health: &NodeHealth, now: &Clock) {
        if health.stuck_cni_calls.is_empty() {
            self.cni_linked = false;
            return;
        }
        let (Some(thread), Some(oldest)) = (
            health
                .hung_threads
                .iter()
                .min_by_key(|t| (t.start_ns, t.tid)),
            health
                .stuck_cni_calls
                .iter()
                .min_by_key(|c| (c.start_ns, c.pid)),
        ) else {
            return;
        };
        if self.cni_linked {
            return;
        }
        let calls = health.stuck_cni_calls.len();
        let relation = if let Some(call) =
            health.stuck_cni_calls.iter().find(|c| c.pid == thread.pid)
        {
            format!(
                "The thread is the CNI plugin call {} itself.",
                call_name(call)
            )
        } else if thread.start_ns <= oldest.start_ns {
            format!(
                "It was blocked {} before the oldest stuck call began: the calls are likely waiting on it (e.g. a lock its daemon holds).",
                human(Duration::from_nanos(oldest.start_ns - thread.start_ns))
            )
        } else {
            "It was blocked after the oldest stuck call began: it may be a consequence rather than the cause.".to_owned()
        };
        let note = truncate(format!(
            "{calls} CNI plugin {} stuck (the oldest: {}, running for {}) while {} {} blocked in a netlink recv call; the longest: {}. {relation}",
            plural(calls, "call", "calls"),
            call_name(oldest),
            human(now.since(oldest.start_ns)),
            health.hung_threads.len(),
            plural(health.hung_threads.len(), "thread is", "threads are"),
            hang_summary(thread, now),
        ));
        let spec = self.about_node(true, CNI_HANG_LINK_REASON, note, now);
        self.cni_linked = self.announce(vec![spec], now);
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

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use prometheus_client::registry::Registry;

    use super::{super::EVENT_QUEUE, *};
    use crate::{agent::pods::ContainerRef, metrics::KubernetesWriteLabels};

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
    fn stuck_calls_behind_a_hung_thread_are_linked_once_per_episode() {
        let (mut observer, mut rx, _) = observer();
        let base = Instant::now();
        let hung = thread(19300, 0, Some(("kube-system", "terway-x")));
        let chain = NodeHealth {
            hung_threads: vec![hung.clone()],
            stuck_cni_calls: vec![call(10, 5, Some("web-0")), call(11, 8, None)],
        };
        observer.update(&chain, &at(66, base));
        let events = drain(&mut rx);
        let link: Vec<_> = events
            .iter()
            .filter(|e| e.reason == CNI_HANG_LINK_REASON)
            .collect();
        assert_eq!(link.len(), 1, "{:?}", summary(&events));
        assert_eq!(link[0].regarding.kind.as_deref(), Some("Node"));
        assert!(link[0].warning);
        assert_eq!(
            link[0].note,
            "2 CNI plugin calls stuck (the oldest: terway DEL (pid 10) for pod shop/web-0, \
             running for 1m 1s) while 1 thread is blocked in a netlink recv call; the longest: \
             terwayd (pid 19246, tid 19300) in pod kube-system/terway-x container terway, \
             netlink route recvfrom in flight for 1m 6s (since 2025-11-23T10:00:00Z). It was \
             blocked 5.0s before the oldest stuck call began: the calls are likely waiting on \
             it (e.g. a lock its daemon holds)."
        );
        // The same episode later: no second link.
        observer.update(&chain, &at(90, base));
        assert!(
            drain(&mut rx)
                .iter()
                .all(|e| e.reason != CNI_HANG_LINK_REASON)
        );

        // The calls end; a new episode whose stuck call is the hung process itself.
        observer.update(
            &NodeHealth {
                hung_threads: vec![hung.clone()],
                stuck_cni_calls: vec![],
            },
            &at(100, base),
        );
        drain(&mut rx);
        let mut itself = call(19246, 120, None);
        itself.plugin = "lastgasp-hang".into();
        itself.command = "ADD".into();
        observer.update(
            &NodeHealth {
                hung_threads: vec![hung],
                stuck_cni_calls: vec![itself],
            },
            &at(181, base),
        );
        let events = drain(&mut rx);
        let link = events
            .iter()
            .find(|e| e.reason == CNI_HANG_LINK_REASON)
            .expect("a link for the new episode");
        assert!(
            link.note.ends_with(
                "The thread is the CNI plugin call lastgasp-hang ADD (pid 19246) for sandbox \
                 0123456789ab itself."
            ),
            "{}",
            link.note
        );
    }

    #[test]
    fn a_hang_without_stuck_calls_links_nothing() {
        let (mut observer, mut rx, _) = observer();
        let base = Instant::now();
        let health = NodeHealth {
            hung_threads: vec![thread(1, 0, None)],
            stuck_cni_calls: vec![],
        };
        observer.update(&health, &at(40, base));
        assert!(
            drain(&mut rx)
                .iter()
                .all(|e| e.reason != CNI_HANG_LINK_REASON)
        );
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
}
