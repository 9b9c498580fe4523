//! The Node's conditions: what each says ([`State`]) and the writer that applies them to the
//! Node's status, on change (rate-limited) and as a heartbeat.

use std::{collections::HashMap, fmt::Write as _, sync::Arc, time::Duration};

use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};

use super::{
    CNI_CONDITION, Clock, FIELD_MANAGER, HungThread, NETLINK_CONDITION, StuckCniCall, Thresholds,
    call_name, count, hang_summary, human, plural, rfc3339, thread_name,
};
use crate::{
    kube_retry::{self, Backoff, Class},
    metrics::AgentMetrics,
};

/// A change of a condition's status is written at most this soon after the previous write,
const MIN_TRANSITION_GAP: Duration = Duration::from_secs(1);
/// a change of its message only (another worst case, another count) this soon,
const MIN_UPDATE_GAP: Duration = Duration::from_secs(10);
/// and an unchanged state is written again, with a new `lastHeartbeatTime`, this often.
const HEARTBEAT: Duration = Duration::from_secs(300);

/// One condition as the agent wants it on the Node.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Condition {
    pub(super) state: State,
    /// When its status last changed, as this agent saw it; `None`: not since the agent started.
    pub(super) since: Option<Timestamp>,
}

/// What a condition says. Equal states make the same write, but for the durations its
/// message gives, which are rendered at the time of each write.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum State {
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
    pub(super) fn status(&self) -> bool {
        matches!(self, Self::Hung { .. } | Self::Stuck { .. })
    }

    pub(super) fn reason(&self) -> &'static str {
        match self {
            Self::NotHung { last: None } => "NoNetlinkRecvHang",
            Self::NotHung { last: Some(_) } => "NetlinkRecvHangCleared",
            Self::Hung { .. } => "ThreadBlockedInNetlinkRecv",
            Self::NotStuck { last: None } => "NoCNICallsStuck",
            Self::NotStuck { last: Some(_) } => "CNICallsCleared",
            Self::Stuck { .. } => "CNIPluginCallsStuck",
        }
    }

    pub(super) fn message(&self, thresholds: Thresholds, now: &Clock) -> String {
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
pub(super) struct Conditions {
    pub(super) netlink: Condition,
    pub(super) cni: Condition,
}

impl Conditions {
    pub(super) fn iter(&self) -> [(&'static str, &Condition); 2] {
        [
            (NETLINK_CONDITION, &self.netlink),
            (CNI_CONDITION, &self.cni),
        ]
    }

    pub(super) fn same_statuses(&self, other: &Self) -> bool {
        self.netlink.state.status() == other.netlink.state.status()
            && self.cni.state.status() == other.cni.state.status()
    }
}

/// Writes the desired conditions to the Node's status: on change (rate-limited) and as a
/// heartbeat, retrying failures with back-off. Only the newest desired state is written.
pub(super) struct ConditionWriter {
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
    pub(super) fn new(
        client: kube::Client,
        node: String,
        thresholds: Thresholds,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Self {
            api: Api::all(client),
            node,
            thresholds,
            started: Timestamp::now(),
            metrics,
        }
    }

    pub(super) async fn run(self, mut desired: watch::Receiver<Conditions>) {
        // Read once before the first write, to keep the transition times of unchanged statuses.
        let mut existing: Option<HashMap<String, Existing>> = None;
        let mut written: Option<(Conditions, Instant)> = None;
        // While writes fail: the delays before the next tries.
        let mut delays: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
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
                    // A refused write is not retried, but a new state is written.
                    if delays.is_none() {
                        retry_at = retry_at.min(Instant::now());
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
            let error = match result {
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
                    delays = None;
                    retry_at = Instant::now();
                    continue;
                }
                Err(error) => error,
            };
            count(&self.metrics, "node_conditions", "error", 1);
            match kube_retry::classify(&error) {
                // The Node may not be registered yet: as good as a transient failure.
                Class::Transient | Class::Gone => {
                    let wait = delays
                        .get_or_insert_with(|| Box::new(Backoff::SIGNALS.delays()))
                        .next()
                        .unwrap_or(Backoff::SIGNALS.max);
                    tracing::warn!(node = self.node, %error, retry_in = ?wait, "writing the node conditions failed");
                    retry_at = Instant::now() + wait;
                }
                // Retrying the same write cannot help: the next change or heartbeat tries again.
                Class::Conflict | Class::Refused => {
                    tracing::error!(node = self.node, %error, "the node conditions were refused; trying again on the next change or heartbeat");
                    delays = None;
                    retry_at = Instant::now() + HEARTBEAT;
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
            Err(error)
                if matches!(kube_retry::classify(&error), Class::Transient | Class::Gone) =>
            {
                Err(error)
            }
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

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::kube_mock::{self, ApiServer, Call};

    const NODE_STATUS: &str = "/api/v1/nodes/worker-3/status";

    fn thresholds() -> Thresholds {
        Thresholds {
            netlink: Duration::from_secs(30),
            cni: Duration::from_secs(60),
        }
    }

    fn quiet() -> Conditions {
        Conditions {
            netlink: Condition {
                state: State::NotHung { last: None },
                since: None,
            },
            cni: Condition {
                state: State::NotStuck { last: None },
                since: None,
            },
        }
    }

    fn hung(since: Timestamp) -> Conditions {
        let worst = HungThread {
            pid: 19246,
            tid: 19300,
            comm: "terwayd".into(),
            protocol: "route",
            syscall: "recvfrom",
            start_ns: 0,
            container: None,
        };
        Conditions {
            netlink: Condition {
                state: State::Hung { worst, count: 1 },
                since: Some(since),
            },
            ..quiet()
        }
    }

    fn start(desired: Conditions) -> (watch::Sender<Conditions>, ApiServer) {
        let (client, server) = kube_mock::client();
        let metrics = AgentMetrics::register(&mut Registry::default());
        let (desired, watched) = watch::channel(desired);
        let writer = ConditionWriter::new(client, "worker-3".into(), thresholds(), metrics);
        tokio::spawn(writer.run(watched));
        (desired, server)
    }

    /// The conditions of an apply, by type.
    fn applied(call: &Call) -> HashMap<String, Value> {
        assert_eq!((call.method.as_str(), call.path()), ("PATCH", NODE_STATUS));
        assert_eq!(call.query("fieldManager"), Some(FIELD_MANAGER));
        assert_eq!(call.query("force"), Some("true"));
        assert_eq!(
            call.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(call.body["kind"], "Node");
        assert_eq!(call.body["metadata"]["name"], "worker-3");
        call.body["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| (c["type"].as_str().unwrap().to_owned(), c.clone()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_write_keeps_the_transition_time_of_an_unchanged_status() {
        let (_desired, mut server) = start(quiet());
        let read = server.next().await;
        assert_eq!(
            (read.method.as_str(), read.uri.as_str()),
            ("GET", NODE_STATUS)
        );
        read.respond(
            200,
            json!({
                "apiVersion": "v1", "kind": "Node", "metadata": { "name": "worker-3" },
                "status": { "conditions": [
                    { "type": NETLINK_CONDITION, "status": "False", "reason": "NoNetlinkRecvHang",
                      "lastTransitionTime": "2026-01-02T03:04:05Z" },
                    { "type": CNI_CONDITION, "status": "True", "reason": "CNIPluginCallsStuck",
                      "lastTransitionTime": "2026-01-02T03:04:05Z" },
                    { "type": "Ready", "status": "True" },
                ]},
            }),
        );
        let apply = server.next().await;
        let conditions = applied(&apply);
        assert_eq!(conditions.len(), 2, "only our conditions: {conditions:?}");
        let netlink = &conditions[NETLINK_CONDITION];
        assert_eq!(netlink["status"], "False");
        assert_eq!(netlink["reason"], "NoNetlinkRecvHang");
        assert_eq!(
            netlink["message"],
            "No thread in a netlink recv call for longer than 30s."
        );
        assert_eq!(netlink["lastTransitionTime"], "2026-01-02T03:04:05Z");
        // The status changed from what was there: the transition is the writer's start.
        let cni = &conditions[CNI_CONDITION];
        assert_eq!(cni["status"], "False");
        assert_ne!(cni["lastTransitionTime"], "2026-01-02T03:04:05Z");
        assert_eq!(cni["lastHeartbeatTime"], netlink["lastHeartbeatTime"]);
        apply.ok();
    }

    #[tokio::test(start_paused = true)]
    async fn changes_wait_their_gap_failures_back_off_and_refusals_wait_for_the_heartbeat() {
        let (desired, mut server) = start(quiet());
        server.next().await.fail(404, "NotFound");
        // The Node is not registered yet: read again after a back-off.
        let failed = Instant::now();
        let read = server.next().await;
        let waited = failed.elapsed();
        assert!(waited >= Duration::from_secs(1) && waited <= Duration::from_secs(2));
        read.respond(
            200,
            json!({ "apiVersion": "v1", "kind": "Node", "metadata": {} }),
        );
        server.next().await.ok();
        let written = Instant::now();

        // A new status: no sooner than the transition gap after the last write.
        let since: Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        desired.send_replace(hung(since));
        let apply = server.next().await;
        assert!(
            written.elapsed() >= MIN_TRANSITION_GAP,
            "{:?}",
            written.elapsed()
        );
        let netlink = applied(&apply)[NETLINK_CONDITION].clone();
        assert_eq!(netlink["status"], "True");
        assert_eq!(netlink["reason"], "ThreadBlockedInNetlinkRecv");
        assert_eq!(netlink["lastTransitionTime"], "2026-01-02T03:04:05Z");
        assert!(
            netlink["message"]
                .as_str()
                .unwrap()
                .starts_with("1 thread blocked in a netlink recv call for longer than 30s; the longest: terwayd (pid 19246, tid 19300) in no known pod"),
            "{netlink}"
        );
        let body = apply.body.clone();

        // A server error: the same state again after a jittered back-off.
        apply.fail(500, "InternalError");
        let failed = Instant::now();
        let retry = server.next().await;
        let waited = failed.elapsed();
        assert!(waited >= Duration::from_secs(1) && waited <= Duration::from_secs(2));
        assert_eq!(
            retry.body["status"]["conditions"][0]["reason"],
            body["status"]["conditions"][0]["reason"]
        );
        retry.ok();
        let written = Instant::now();

        // Nothing changes: the heartbeat.
        let beat = server.next().await;
        assert_eq!(written.elapsed(), HEARTBEAT);
        // Refused: retrying cannot help; the next heartbeat tries again.
        beat.fail(403, "Forbidden");
        let refused = Instant::now();
        assert!(
            server
                .next_within(HEARTBEAT - Duration::from_secs(1))
                .await
                .is_none(),
            "a refused write was retried before the heartbeat"
        );
        let again = server.next().await;
        assert_eq!(refused.elapsed(), HEARTBEAT);
        again.ok();
    }
}
