//! In a cluster: each termination of a pod's process written onto its Pod.
//!
//! - An Event (events.k8s.io/v1) about the Pod per termination, its note one sentence
//!   ([`note`]): what ended the process, who sent the signal, and for a container's end when
//!   kubelet starts it again. At most [`POD_EVENT_BURST`] per pod at once, then one per
//!   [`POD_EVENT_REFILL`]; the others are counted
//!   (`lastgasp_agent_kubernetes_writes_total{object="event",result="rate_limited"}`).
//! - For a container's end (its main process): the annotation
//!   `lastgasp.io/last-termination.<container>` ([`annotation_key`]), JSON, by server-side
//!   apply as the agent's field manager; and while kubelet holds the container back, the
//!   gauge `lastgasp_container_backoff_seconds{namespace,pod,container}`, removed at the
//!   expected start.
//!
//! For a container's end the writer first waits, up to [`STATUS_WAIT`] after the exit, for
//! the Pod's status to show it (kubelet reports an exit within a second or two), so that the
//! back-off comes from kubelet's own `restartCount`, `startedAt` and `finishedAt`. If the
//! status never shows it, from the latest status read, and the note says it is an estimate.
//! A child process's death is never in the status: its Event is written at once.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::Write as _,
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::core::v1::{
        ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, ObjectReference, Pod,
    },
    api::events::v1::Event,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::{sync::mpsc, time::Instant};

use super::{
    Cause, Fault, OomKill, OomScope, Sender, Termination,
    backoff::{EndedRun, KubeletBackoff, NextStart},
};
use crate::{
    agent::{
        node_signals::{FIELD_MANAGER, REPORTING_CONTROLLER},
        pods::{ContainerRef, PodIndex},
    },
    kube_events::NewEvent,
    kube_retry::{self, Backoff, Ended, OnConflict},
    metrics::{AgentMetrics, ContainerLabels, KubernetesWriteLabels, PodLabelLimiter},
    supervise::{Lifetime, Supervisor},
};

/// The annotation key of a container's last termination, before the container's name.
pub const ANNOTATION_PREFIX: &str = "lastgasp.io/last-termination.";
/// Terminations waiting for the writer. A sender that must not wait (the tracker, which
/// drains the probes' ring) drops what does not fit.
pub const QUEUE: usize = 256;
/// How long after an exit the writer waits for the Pod's status to show it.
pub const STATUS_WAIT: Duration = Duration::from_secs(5);
const STATUS_POLL: Duration = Duration::from_millis(500);
/// A terminated state without a container id is this exit if it finished this close to it
/// (the status has whole seconds).
const SAME_EXIT: SignedDuration = SignedDuration::from_secs(3);
/// Events per pod: this many at once, then one more per [`POD_EVENT_REFILL`]. A container in
/// a crash loop dies at most every 10 s early on, then every 5 min: its Events all go out.
pub const POD_EVENT_BURST: u32 = 10;
pub const POD_EVENT_REFILL: Duration = Duration::from_secs(30);
/// Pods whose Event budget is tracked; a pod with a full budget is forgotten first.
const RATE_LIMITED_PODS: usize = 1024;
/// The API server refuses longer notes.
const NOTE_LIMIT: usize = 1024;
/// Most characters of the key's name part (after `lastgasp.io/`).
const KEY_NAME_LIMIT: usize = 63;

pub struct ReportConfig {
    /// `reportingInstance` of the Events.
    pub node: String,
    pub backoff: KubeletBackoff,
    /// This node's pods, to name the container of a termination the tracker could not.
    pub pods: PodIndex,
}

/// How long a termination whose container the pod watch does not know yet waits for it: a
/// container that dies within moments of starting (a crash loop's usual case) ends before
/// kubelet has put its id in the Pod's status.
const NAMING_WAIT: Duration = Duration::from_secs(10);
const NAMING_POLL: Duration = Duration::from_millis(100);

/// Starts [`write`] as a task of `tasks`; returns its queue, of [`QUEUE`] terminations.
pub fn spawn(
    tasks: &mut Supervisor,
    client: Client,
    config: ReportConfig,
    metrics: Arc<AgentMetrics>,
) -> mpsc::Sender<Termination> {
    let (terminations, queued) = mpsc::channel(QUEUE);
    tasks.spawn(
        "termination-reports",
        Lifetime::Required,
        write(client, config, queued, metrics),
    );
    terminations
}

/// Writes each termination onto its Pod, one at a time, until the queue closes; removes the
/// back-off gauges as their containers' expected starts pass.
pub async fn write(
    client: Client,
    config: ReportConfig,
    mut terminations: mpsc::Receiver<Termination>,
    metrics: Arc<AgentMetrics>,
) {
    let mut writer = Writer {
        client,
        config,
        limits: PodRateLimits::default(),
        gauges: BackoffGauges::default(),
        metrics,
    };
    // Terminations whose container the pod watch does not know yet, with their deadlines:
    // they wait here, not in front of the others.
    let mut unnamed: VecDeque<(Instant, Termination)> = VecDeque::new();
    loop {
        let expiry = writer.gauges.next_expiry();
        let retry = (!unnamed.is_empty()).then(|| Instant::now() + NAMING_POLL);
        tokio::select! {
            termination = terminations.recv() => match termination {
                Some(termination) if termination.container.is_none() => {
                    if unnamed.len() == QUEUE {
                        unnamed.pop_front();
                        count(&writer.metrics, "event", "dropped");
                    }
                    unnamed.push_back((Instant::now() + NAMING_WAIT, termination));
                }
                Some(termination) => writer.report(termination).await,
                None => return,
            },
            () = sleep_until(retry) => {
                let now = Instant::now();
                let mut waiting = VecDeque::with_capacity(unnamed.len());
                for (deadline, mut termination) in unnamed.drain(..) {
                    match writer.config.pods.container(&termination.container_id) {
                        Some(container) => {
                            termination.container = Some(container);
                            writer.report(termination).await;
                        }
                        None if now < deadline => waiting.push_back((deadline, termination)),
                        None => tracing::debug!(
                            container_id = %termination.container_id,
                            "termination in no pod of this node's: not written"
                        ),
                    }
                }
                unnamed = waiting;
            }
            () = sleep_until(expiry) => writer.gauges.expire(Instant::now(), &writer.metrics),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

struct Writer {
    client: Client,
    config: ReportConfig,
    limits: PodRateLimits,
    gauges: BackoffGauges,
    metrics: Arc<AgentMetrics>,
}

impl Writer {
    /// Writes a termination whose container is known.
    async fn report(&mut self, termination: Termination) {
        let Some(container) = termination.container.clone() else {
            return;
        };
        let Some(reason) = reason(&termination) else {
            return;
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &container.namespace);
        if termination.main_process {
            self.container_ended(&pods, &termination, &container, reason)
                .await;
        } else {
            self.process_died(&pods, &termination, &container, reason)
                .await;
        }
    }

    /// The Event, the annotation and the back-off gauge of a container's end.
    async fn container_ended(
        &mut self,
        pods: &Api<Pod>,
        termination: &Termination,
        container: &ContainerRef,
        reason: &'static str,
    ) {
        let Some((pod, shown)) = self.observe(pods, termination, container).await else {
            return;
        };
        let rules = self.config.backoff;
        let restart = restart_of(&pod, termination, &container.container, shown, rules);
        self.update_gauge(container, restart.as_ref());
        if self.take_event(container) {
            let note = note(termination, &container.container, restart.as_ref(), rules);
            self.create_event(&pod, container, termination, reason, &note)
                .await;
        }
        let key = annotation_key(&container.container);
        let value = last_termination(termination, &container.container, restart.as_ref(), rules);
        self.annotate(pods, &pod, key, value).await;
    }

    /// The Event of a child process's death; the container lives on.
    async fn process_died(
        &mut self,
        pods: &Api<Pod>,
        termination: &Termination,
        container: &ContainerRef,
        reason: &'static str,
    ) {
        // Refused before anything is read.
        if !self.take_event(container) {
            return;
        }
        let Some((pod, _)) = self.observe(pods, termination, container).await else {
            return;
        };
        let note = note(termination, &container.container, None, self.config.backoff);
        self.create_event(&pod, container, termination, reason, &note)
            .await;
    }

    fn take_event(&mut self, container: &ContainerRef) -> bool {
        let taken = self
            .limits
            .take(&container.namespace, &container.pod, Instant::now());
        if !taken {
            tracing::debug!(pod = %container.pod, namespace = %container.namespace, "per-pod Event rate limit reached; not publishing");
            count(&self.metrics, "event", "rate_limited");
        }
        taken
    }

    /// The Pod, and whether its status shows this exit: for a child process at its first
    /// read, for a container's end once the status shows it or [`STATUS_WAIT`] after the
    /// exit. `None` once the Pod is gone, or if it could not be read by then.
    async fn observe(
        &self,
        pods: &Api<Pod>,
        termination: &Termination,
        container: &ContainerRef,
    ) -> Option<(Pod, bool)> {
        let waited = SystemTime::now()
            .duration_since(termination.at)
            .unwrap_or_default();
        let deadline = Instant::now() + STATUS_WAIT.saturating_sub(waited);
        let mut latest = None;
        loop {
            match pods.get_opt(&container.pod).await {
                Ok(Some(pod)) => {
                    if !termination.main_process
                        || shown_exit(&pod, termination, &container.container).is_some()
                    {
                        return Some((pod, true));
                    }
                    latest = Some(pod);
                }
                Ok(None) => {
                    tracing::debug!(pod = %container.pod, namespace = %container.namespace, "the pod is gone; its termination is not written");
                    return None;
                }
                Err(error) => {
                    tracing::debug!(%error, pod = %container.pod, "reading the pod failed");
                }
            }
            if Instant::now() + STATUS_POLL > deadline {
                if latest.is_none() {
                    tracing::warn!(pod = %container.pod, namespace = %container.namespace, "the pod could not be read; its termination is not written");
                }
                return latest.map(|pod| (pod, false));
            }
            tokio::time::sleep(STATUS_POLL).await;
        }
    }

    /// Shows the container's delay while kubelet holds it back; removes it otherwise.
    fn update_gauge(&mut self, container: &ContainerRef, restart: Option<&Restart>) {
        let family = &self.metrics.container_backoff;
        let holding = restart.and_then(|restart| match &restart.outcome {
            Outcome::Restarts {
                next,
                started_again: None,
            } if !next.delay.is_zero() => {
                let left = next.at?.duration_since(Timestamp::now());
                Some((next.delay, Duration::try_from(left).ok()?))
            }
            _ => None,
        });
        match holding {
            Some((delay, left)) if !left.is_zero() => {
                self.gauges
                    .set(family, container, delay, Instant::now() + left);
            }
            _ => self.gauges.remove(family, container),
        }
    }

    async fn create_event(
        &self,
        pod: &Pod,
        container: &ContainerRef,
        termination: &Termination,
        reason: &'static str,
        note: &str,
    ) {
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(container.namespace.clone()),
            name: Some(container.pod.clone()),
            uid: pod.metadata.uid.clone(),
            field_path: Some(field_path(pod, &container.container)),
            ..ObjectReference::default()
        };
        let event = NewEvent {
            regarding: &regarding,
            warning: is_warning(&termination.cause),
            reason,
            action: "Explained",
            note,
            time: Timestamp::try_from(termination.at).unwrap_or_else(|_| Timestamp::now()),
            reporting_controller: REPORTING_CONTROLLER,
            reporting_instance: &self.config.node,
        }
        .build();
        let api = Api::<Event>::namespaced(self.client.clone(), &container.namespace);
        let params = PostParams::default();
        let created = kube_retry::call(
            Backoff::SIGNALS,
            // The name is this agent's own: taken means an earlier try was created.
            OnConflict::Moot,
            || api.create(&params, &event),
            |error, delay| {
                count(&self.metrics, "event", "error");
                tracing::warn!(%error, reason, retry_in = ?delay, "publishing a termination Event failed");
            },
        )
        .await;
        match created {
            Ok(_) | Err(Ended::Moot(_)) => count(&self.metrics, "event", "success"),
            Err(ended) => {
                tracing::warn!(%ended, reason, "termination Event refused; dropped");
                count(&self.metrics, "event", "error");
                count(&self.metrics, "event", "dropped");
            }
        }
    }

    /// Applies `key` with every other last-termination annotation the Pod has: an apply
    /// removes the fields its manager applied before and left out.
    async fn annotate(&self, pods: &Api<Pod>, pod: &Pod, key: String, value: String) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let mut annotations: BTreeMap<String, String> = pod
            .metadata
            .annotations
            .iter()
            .flatten()
            .filter(|(key, _)| key.starts_with(ANNOTATION_PREFIX))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        annotations.insert(key, value);
        // The uid: a pod replaced under the same name since it was read is not annotated (the
        // server refuses to change a uid, 422).
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": pod.metadata.namespace,
                "uid": pod.metadata.uid,
                "annotations": annotations,
            },
        });
        let (params, patch) = (
            PatchParams::apply(FIELD_MANAGER).force(),
            Patch::Apply(&patch),
        );
        let applied = kube_retry::call(
            Backoff::SIGNALS,
            OnConflict::Moot,
            || pods.patch(&name, &params, &patch),
            |error, delay| {
                count(&self.metrics, "pod_annotation", "error");
                tracing::warn!(%error, pod = %name, retry_in = ?delay, "annotating a pod failed");
            },
        )
        .await;
        match applied {
            Ok(_) => count(&self.metrics, "pod_annotation", "success"),
            Err(Ended::Gone | Ended::Moot(_)) => {}
            Err(Ended::Refused(kube::Error::Api(status))) if uid_changed(&status) => {
                tracing::debug!(pod = %name, "the pod was replaced since it was read; not annotated");
            }
            Err(ended) => {
                tracing::warn!(%ended, pod = %name, "pod annotation refused; dropped");
                count(&self.metrics, "pod_annotation", "error");
                count(&self.metrics, "pod_annotation", "dropped");
            }
        }
    }
}

/// The server refused an apply because the object's uid is not the one applied.
fn uid_changed(status: &kube::core::Status) -> bool {
    status.code == 422
        && status
            .details
            .iter()
            .flat_map(|details| &details.causes)
            .any(|cause| cause.field == "metadata.uid")
}

fn count(metrics: &AgentMetrics, object: &str, result: &str) {
    metrics
        .kubernetes_writes
        .get_or_create(&KubernetesWriteLabels {
            object: object.into(),
            result: result.into(),
        })
        .inc();
}

/// The Event's reason; `None` for a child process that exited (processes do all the time).
pub fn reason(termination: &Termination) -> Option<&'static str> {
    Some(match (termination.main_process, &termination.cause) {
        (true, Cause::Exited { .. }) => "ContainerExited",
        (true, Cause::Crashed { .. }) => "ContainerCrashed",
        (true, Cause::OomKilled(_)) => "ContainerOOMKilled",
        (true, Cause::Killed { .. }) => "ContainerKilled",
        (false, Cause::Exited { .. }) => return None,
        (false, Cause::Crashed { .. }) => "ProcessCrashed",
        (false, Cause::OomKilled(_)) => "ProcessOOMKilled",
        (false, Cause::Killed { .. }) => "ProcessKilled",
    })
}

/// Every termination is a Warning but a clean exit.
fn is_warning(cause: &Cause) -> bool {
    !matches!(cause, Cause::Exited { code: 0 })
}

/// The annotation key of `container`'s last termination. The name part (after
/// `lastgasp.io/`) may have 63 characters: a container name of up to 46 fits whole; a longer
/// one is cut to 37 and followed by `-` and 8 hex digits of its SHA-256. The JSON value
/// names the container in full.
pub fn annotation_key(container: &str) -> String {
    let name = ANNOTATION_PREFIX
        .split_once('/')
        .map_or(ANNOTATION_PREFIX, |(_, name)| name);
    if name.len() + container.len() <= KEY_NAME_LIMIT {
        return format!("{ANNOTATION_PREFIX}{container}");
    }
    let digest = Sha256::digest(container.as_bytes());
    let hash: String = digest[..4]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let keep = KEY_NAME_LIMIT - name.len() - 1 - hash.len();
    let cut: String = container.chars().take(keep).collect();
    format!("{ANNOTATION_PREFIX}{cut}-{hash}")
}

/// What kubelet does after a container's end, read from its Pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Restart {
    /// The container's `restartCount` while the run that ended was its latest.
    pub restart_count: u32,
    pub outcome: Outcome,
    /// The delay is kubelet's own, from its `CrashLoopBackOff` message, not recomputed.
    pub delay_from_kubelet: bool,
    /// The status never showed this exit: the count and the run's start are from the latest
    /// status read, the end is the probe's.
    pub estimated: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Restarts {
        next: NextStart,
        /// The status already shows the container running again since then.
        started_again: Option<Timestamp>,
    },
    /// Kubelet does not start it again, for this reason.
    Stays(&'static str),
}

/// The container's status and whether it is an init container that is not a sidecar, or
/// an ephemeral one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Regular,
    Init,
    /// An init container with `restartPolicy: Always`.
    Sidecar,
    Ephemeral,
}

fn container_status<'a>(pod: &'a Pod, name: &str) -> Option<(&'a ContainerStatus, Kind)> {
    let status = pod.status.as_ref()?;
    let find = |statuses: &'a Option<Vec<ContainerStatus>>| {
        statuses.iter().flatten().find(|status| status.name == name)
    };
    if let Some(found) = find(&status.container_statuses) {
        return Some((found, Kind::Regular));
    }
    if let Some(found) = find(&status.init_container_statuses) {
        let sidecar = pod
            .spec
            .iter()
            .flat_map(|spec| spec.init_containers.iter().flatten())
            .any(|c| c.name == name && c.restart_policy.as_deref() == Some("Always"));
        return Some((found, if sidecar { Kind::Sidecar } else { Kind::Init }));
    }
    find(&status.ephemeral_container_statuses).map(|found| (found, Kind::Ephemeral))
}

/// `spec.containers{name}` as kubelet names a container in its Events.
fn field_path(pod: &Pod, name: &str) -> String {
    let list = match container_status(pod, name).map(|(_, kind)| kind) {
        Some(Kind::Init | Kind::Sidecar) => "initContainers",
        Some(Kind::Ephemeral) => "ephemeralContainers",
        Some(Kind::Regular) | None => "containers",
    };
    format!("spec.{list}{{{name}}}")
}

/// The status's record of an exit.
struct ShownExit<'a> {
    terminated: &'a ContainerStateTerminated,
    /// The container's restart count while the run that ended was its latest.
    restart_count: u32,
    started_again: Option<Timestamp>,
    /// Kubelet's own delay, from its Waiting message while it holds the container back.
    kubelet_delay: Option<Duration>,
}

fn shown_exit<'a>(
    pod: &'a Pod,
    termination: &Termination,
    container: &str,
) -> Option<ShownExit<'a>> {
    let (status, _) = container_status(pod, container)?;
    let count = u32::try_from(status.restart_count).unwrap_or(0);
    let current = status.state.as_ref();
    if let Some(terminated) = current.and_then(|state| state.terminated.as_ref())
        && same_exit(terminated, termination)
    {
        return Some(ShownExit {
            terminated,
            restart_count: count,
            started_again: None,
            kubelet_delay: None,
        });
    }
    let last = status
        .last_state
        .as_ref()
        .and_then(|state| state.terminated.as_ref())
        .filter(|terminated| same_exit(terminated, termination))?;
    // Waiting (in back-off): the latest instance is still the one that ended. Running or
    // ended again: a later instance, counted one more.
    let since = match current {
        Some(state) if state.waiting.is_some() => {
            return Some(ShownExit {
                terminated: last,
                restart_count: count,
                started_again: None,
                kubelet_delay: state.waiting.as_ref().and_then(kubelet_delay),
            });
        }
        Some(state) => state
            .running
            .as_ref()
            .and_then(|running| running.started_at.as_ref())
            .or_else(|| state.terminated.as_ref()?.started_at.as_ref()),
        None => None,
    };
    Some(ShownExit {
        terminated: last,
        restart_count: count.saturating_sub(1),
        started_again: since.map(|time| time.0),
        kubelet_delay: None,
    })
}

/// The delay in kubelet's `CrashLoopBackOff` message: `back-off 1m20s restarting failed
/// container=app pod=web-0_shop(...)` (`Back-off` in old kubelets).
fn kubelet_delay(waiting: &ContainerStateWaiting) -> Option<Duration> {
    if waiting.reason.as_deref() != Some("CrashLoopBackOff") {
        return None;
    }
    let message = waiting.message.as_deref()?;
    let message = message
        .strip_prefix("back-off ")
        .or_else(|| message.strip_prefix("Back-off "))?;
    let (delay, _) = message.split_once(' ')?;
    go_duration(delay)
}

/// Go's `time.Duration` text as kubelet prints it: `10s`, `1m20s`, `5m0s`, `1.5s`.
fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut seconds = 0.0;
    while !rest.is_empty() {
        let number = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|end| *end > 0)?;
        let value: f64 = rest[..number].parse().ok()?;
        rest = &rest[number..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        seconds += value * scale;
        rest = &rest[unit..];
    }
    (!text.is_empty())
        .then(|| Duration::try_from_secs_f64(seconds).ok())
        .flatten()
}

fn same_exit(terminated: &ContainerStateTerminated, termination: &Termination) -> bool {
    match terminated
        .container_id
        .as_deref()
        .and_then(|id| id.split_once("://"))
    {
        Some((_, id)) => id == termination.container_id,
        None => match (&terminated.finished_at, Timestamp::try_from(termination.at)) {
            (Some(finished), Ok(at)) => finished.0.duration_since(at).abs() <= SAME_EXIT,
            _ => false,
        },
    }
}

/// What kubelet does after the container of `termination` ended, from `pod` (whose status
/// shows the exit if `shown`). `None` if the status has no such container.
pub fn restart_of(
    pod: &Pod,
    termination: &Termination,
    container: &str,
    shown: bool,
    rules: KubeletBackoff,
) -> Option<Restart> {
    let (status, kind) = container_status(pod, container)?;
    let at = Timestamp::try_from(termination.at).ok();
    let (run, exit_code, started_again, kubelet_delay, estimated) = match shown
        .then(|| shown_exit(pod, termination, container))
        .flatten()
    {
        Some(exit) => (
            EndedRun {
                restart_count: exit.restart_count,
                started_at: exit.terminated.started_at.as_ref().map(|time| time.0),
                finished_at: exit.terminated.finished_at.as_ref().map(|time| time.0),
            },
            exit.terminated.exit_code,
            exit.started_again,
            exit.kubelet_delay,
            false,
        ),
        // The status still shows the run that ended as running, or nothing of it.
        None => (
            EndedRun {
                restart_count: u32::try_from(status.restart_count).unwrap_or(0),
                started_at: status
                    .state
                    .as_ref()
                    .and_then(|state| state.running.as_ref()?.started_at.as_ref())
                    .map(|time| time.0)
                    .filter(|started| at.is_none_or(|at| *started <= at)),
                finished_at: at,
            },
            exit_code(&termination.cause),
            None,
            None,
            true,
        ),
    };
    let spec = pod.spec.as_ref();
    let policy = spec
        .and_then(|spec| spec.restart_policy.as_deref())
        .unwrap_or("Always");
    let stays = if pod.metadata.deletion_timestamp.is_some() {
        Some("the pod is being deleted")
    } else {
        match (kind, policy, exit_code) {
            (Kind::Ephemeral, _, _) => Some("ephemeral containers are not restarted"),
            (Kind::Sidecar, _, _) => None,
            (Kind::Regular | Kind::Init, "Never", _) => Some("restartPolicy Never"),
            (Kind::Init, _, 0) => Some("the init container completed"),
            (Kind::Regular, "OnFailure", 0) => Some("restartPolicy OnFailure and exit code 0"),
            _ => None,
        }
    };
    let outcome = match stays {
        Some(why) => Outcome::Stays(why),
        None => Outcome::Restarts {
            next: match kubelet_delay {
                // Kubelet's figure is right where the recomputation cannot be (after an
                // earlier reset, or a kubelet restart).
                Some(delay) => NextStart {
                    delay,
                    at: run.finished_at.and_then(|finished| {
                        finished
                            .checked_add(SignedDuration::try_from(delay).ok()?)
                            .ok()
                    }),
                    reset: false,
                    ..rules.next_start(&run)
                },
                None => rules.next_start(&run),
            },
            started_again,
        },
    };
    Some(Restart {
        restart_count: run.restart_count,
        outcome,
        delay_from_kubelet: kubelet_delay.is_some(),
        estimated,
    })
}

/// The exit code the runtime reports for a cause: 128 + the signal for a signal's death.
fn exit_code(cause: &Cause) -> i32 {
    match cause {
        Cause::Exited { code } => i32::from(*code),
        Cause::Crashed { signal, .. } | Cause::Killed { signal, .. } => 128 + i32::from(*signal),
        Cause::OomKilled(_) => 128 + libc::SIGKILL,
    }
}

/// The Event's note: `restart 5 of container app: killed by the OOM killer (container limit
/// 256Mi, rss 255Mi); kubelet waits 80s (next start ≈ 12:04:10 UTC); the delay resets after
/// 10 min of running`.
pub fn note(
    termination: &Termination,
    container: &str,
    restart: Option<&Restart>,
    rules: KubeletBackoff,
) -> String {
    let what = what_happened(&termination.cause);
    let mut note = if !termination.main_process {
        format!(
            "process {} (pid {}) of container {container} {what}; the container keeps running",
            termination.comm, termination.pid
        )
    } else {
        match restart.map(|restart| &restart.outcome) {
            Some(Outcome::Restarts { next, .. }) => {
                format!("restart {} of container {container}: {what}", next.restart)
            }
            _ => format!("container {container} {what}"),
        }
    };
    if let Some(restart) = restart {
        note.push_str("; ");
        note.push_str(&what_kubelet_does(restart, rules));
        if restart.estimated {
            let _ = write!(
                note,
                " (estimated from restartCount {}: kubelet's status did not show this exit within {}s)",
                restart.restart_count,
                STATUS_WAIT.as_secs()
            );
        }
    }
    truncate(note)
}

fn what_kubelet_does(restart: &Restart, rules: KubeletBackoff) -> String {
    let (next, started_again) = match &restart.outcome {
        Outcome::Stays(why) => return format!("{why}: kubelet does not start it again"),
        Outcome::Restarts {
            next,
            started_again,
        } => (next, started_again),
    };
    let mut said = if next.reset {
        format!(
            "it ran longer than {}, so the back-off reset: kubelet starts it again at once",
            minutes(rules.reset_after())
        )
    } else if next.delay.is_zero() {
        "kubelet starts it again at once (no delay before a first restart)".to_owned()
    } else {
        let mut waits = format!("kubelet waits {}", seconds(next.delay));
        if let Some(at) = next.at {
            let _ = write!(waits, " (next start ≈ {})", clock(at));
        }
        let _ = write!(
            waits,
            "; the delay resets after {} of running",
            minutes(rules.reset_after())
        );
        waits
    };
    if let Some(started) = started_again {
        let _ = write!(said, "; it started again at {}", clock(*started));
    }
    said
}

/// How a process ended, in words: `killed by the OOM killer (container limit 256Mi, rss
/// 255Mi)`, `killed by SIGKILL from host process kill (pid 4242, ...)`.
pub fn what_happened(cause: &Cause) -> String {
    match cause {
        Cause::Exited { code } => format!("exited with code {code}"),
        Cause::Crashed {
            signal,
            core_dumped,
            fault,
        } => {
            let mut details: Vec<String> = fault.iter().map(fault_summary).collect();
            if *core_dumped {
                details.push("core dumped".into());
            }
            let mut said = format!("crashed with {}", signal_name(*signal));
            if !details.is_empty() {
                let _ = write!(said, " ({})", details.join(", "));
            }
            said
        }
        Cause::OomKilled(oom) => format!("killed by the OOM killer ({})", oom_summary(oom)),
        Cause::Killed { signal, sender } => {
            format!(
                "killed by {} from {}",
                signal_name(*signal),
                sender_name(sender)
            )
        }
    }
}

fn fault_summary(fault: &Fault) -> String {
    match &fault.location {
        Some(location) => format!("{} in {location}", fault.kind),
        None => fault.kind.clone(),
    }
}

fn oom_summary(oom: &OomKill) -> String {
    let limit = |scope: &str| match oom.limit_bytes {
        Some(limit) => format!("{scope} limit {}", quantity(limit)),
        None => format!("{scope} limit"),
    };
    let mut said = match oom.scope {
        OomScope::Container => limit("container"),
        OomScope::Pod => limit("pod"),
        OomScope::Node => "the node ran out of memory".to_owned(),
    };
    if let Some(rss) = oom.rss_bytes {
        let _ = write!(said, ", rss {}", quantity(rss));
    }
    said
}

fn sender_name(sender: &Sender) -> String {
    match sender {
        Sender::Runtime {
            pid,
            comm,
            grace_period_expired,
            grace_seconds,
        } => {
            let runtime = format!("{comm} (pid {pid}), the container runtime");
            if !grace_period_expired {
                return format!("{runtime} stopping it");
            }
            let grace = grace_seconds.map_or(String::new(), |seconds| format!("{seconds:.0}s "));
            let term = signal_name(libc::SIGTERM as u8);
            format!("{runtime}: the {grace}grace period after its {term} ran out")
        }
        Sender::SamePod {
            pid,
            comm,
            container,
        } => match container {
            Some(container) => format!("{comm} (pid {pid}) in container {container} of this pod"),
            None => format!("{comm} (pid {pid}) in this pod"),
        },
        Sender::OtherPod {
            pid,
            comm,
            container,
            container_id,
        } => match container {
            Some(other) => format!(
                "{comm} (pid {pid}) in pod {}/{} (container {})",
                other.namespace, other.pod, other.container
            ),
            None => {
                let id: String = container_id.chars().take(12).collect();
                format!("{comm} (pid {pid}) in another pod's container {id}")
            }
        },
        Sender::Host { pid, comm, cgroup } => match cgroup {
            Some(cgroup) => format!("host process {comm} (pid {pid}, cgroup {cgroup})"),
            None => format!("host process {comm} (pid {pid}, exited before its cgroup was read)"),
        },
        Sender::Kernel => "the kernel".to_owned(),
        Sender::Unknown => "a sender lastgasp did not see (before it started, or lost)".to_owned(),
    }
}

/// `SIGKILL`, or `signal 40` for one without a name.
pub fn signal_name(signal: u8) -> Cow<'static, str> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match usize::from(signal)
        .checked_sub(1)
        .and_then(|i| NAMES.get(i))
    {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(format!("signal {signal}")),
    }
}

/// Bytes in the binary units Kubernetes writes quantities in: `256Mi`, `1.5Gi`, `255.3Mi`.
pub fn quantity(bytes: u64) -> String {
    const UNITS: [(&str, u64); 6] = [
        ("Ei", 1 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes < size {
            continue;
        }
        if bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
        let value = format!("{:.1}", bytes as f64 / size as f64);
        return format!("{}{unit}", value.strip_suffix(".0").unwrap_or(&value));
    }
    bytes.to_string()
}

fn seconds(duration: Duration) -> String {
    let value = format!("{:.1}", duration.as_secs_f64());
    format!("{}s", value.strip_suffix(".0").unwrap_or(&value))
}

/// `10 min`, or seconds when not whole minutes.
fn minutes(duration: Duration) -> String {
    if duration.as_secs().is_multiple_of(60) && duration.subsec_nanos() == 0 {
        format!("{} min", duration.as_secs() / 60)
    } else {
        seconds(duration)
    }
}

fn clock(time: Timestamp) -> String {
    time.strftime("%H:%M:%S UTC").to_string()
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

/// The annotation's JSON.
#[derive(Serialize)]
struct LastTermination<'a> {
    #[serde(with = "super::rfc3339")]
    time: SystemTime,
    container: &'a str,
    container_id: &'a str,
    pid: u32,
    comm: &'a str,
    cause: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<Cow<'static, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    core_dumped: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fault: Option<&'a Fault>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sender: Option<&'a Sender>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oom: Option<&'a OomKill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    back_off: Option<BackOff>,
    /// Why kubelet does not start it again.
    #[serde(skip_serializing_if = "Option::is_none")]
    not_restarted: Option<&'static str>,
}

#[derive(Serialize)]
struct BackOff {
    rules: String,
    restart: u32,
    delay_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_start: Option<String>,
    reset: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_again: Option<String>,
    delay_from_kubelet: bool,
    estimated: bool,
}

/// The value of `lastgasp.io/last-termination.<container>`.
pub fn last_termination(
    termination: &Termination,
    container: &str,
    restart: Option<&Restart>,
    rules: KubeletBackoff,
) -> String {
    let cause = &termination.cause;
    let (exit_code, signal, core_dumped, fault, sender, oom) = match cause {
        Cause::Exited { code } => (Some(*code), None, None, None, None, None),
        Cause::Crashed {
            signal,
            core_dumped,
            fault,
        } => (
            None,
            Some(*signal),
            Some(*core_dumped),
            fault.as_ref(),
            None,
            None,
        ),
        Cause::OomKilled(oom) => (
            None,
            Some(libc::SIGKILL as u8),
            None,
            None,
            None,
            Some(&**oom),
        ),
        Cause::Killed { signal, sender } => (None, Some(*signal), None, None, Some(sender), None),
    };
    let (back_off, not_restarted) = match restart.map(|restart| (restart, &restart.outcome)) {
        Some((
            restart,
            Outcome::Restarts {
                next,
                started_again,
            },
        )) => (
            Some(BackOff {
                rules: rules.to_string(),
                restart: next.restart,
                delay_seconds: next.delay.as_secs_f64(),
                next_start: next.at.map(|at| at.to_string()),
                reset: next.reset,
                started_again: started_again.map(|at| at.to_string()),
                delay_from_kubelet: restart.delay_from_kubelet,
                estimated: restart.estimated,
            }),
            None,
        ),
        Some((_, Outcome::Stays(why))) => (None, Some(*why)),
        None => (None, None),
    };
    let annotation = LastTermination {
        time: termination.at,
        container,
        container_id: &termination.container_id,
        pid: termination.pid,
        comm: &termination.comm,
        cause: cause.label(),
        exit_code,
        signal: signal.map(signal_name),
        core_dumped,
        fault,
        sender,
        oom,
        restart_count: restart.map(|restart| restart.restart_count),
        back_off,
        not_restarted,
    };
    serde_json::to_string(&annotation).expect("the annotation serializes")
}

/// Token buckets of Events per pod, for at most [`RATE_LIMITED_PODS`] pods.
#[derive(Debug, Default)]
struct PodRateLimits {
    buckets: HashMap<(String, String), Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    refilled: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let periods = (now.saturating_duration_since(self.refilled).as_nanos()
            / POD_EVENT_REFILL.as_nanos())
        .min(u128::from(POD_EVENT_BURST)) as u32;
        if periods > 0 {
            self.tokens = (self.tokens + periods).min(POD_EVENT_BURST);
            self.refilled += POD_EVENT_REFILL * periods;
        }
        if self.tokens == POD_EVENT_BURST {
            self.refilled = now;
        }
    }
}

impl PodRateLimits {
    /// Takes one Event of `namespace/pod`'s budget, if there is one left.
    fn take(&mut self, namespace: &str, pod: &str, now: Instant) -> bool {
        let key = (namespace.to_owned(), pod.to_owned());
        if !self.buckets.contains_key(&key) && self.buckets.len() >= RATE_LIMITED_PODS {
            // A full bucket is as good as none.
            self.buckets.retain(|_, bucket| {
                bucket.refill(now);
                bucket.tokens < POD_EVENT_BURST
            });
            if self.buckets.len() >= RATE_LIMITED_PODS
                && let Some(oldest) = self
                    .buckets
                    .iter()
                    .min_by_key(|(_, bucket)| bucket.refilled)
                    .map(|(key, _)| key.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: POD_EVENT_BURST,
            refilled: now,
        });
        bucket.refill(now);
        if bucket.tokens == 0 {
            return false;
        }
        bucket.tokens -= 1;
        true
    }
}

/// The back-off gauge's series: one per container in back-off, its labels capped like the
/// hang series' ([`PodLabelLimiter`]); containers sharing capped labels share a series, which
/// shows the longest of their delays.
#[derive(Debug, Default)]
struct BackoffGauges {
    labels: PodLabelLimiter,
    /// By namespace, pod and container.
    live: HashMap<(String, String, String), Live>,
}

#[derive(Debug)]
struct Live {
    labels: ContainerLabels,
    delay: Duration,
    until: Instant,
}

type BackoffFamily = prometheus_client::metrics::family::Family<
    ContainerLabels,
    prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
>;

impl BackoffGauges {
    fn set(
        &mut self,
        family: &BackoffFamily,
        container: &ContainerRef,
        delay: Duration,
        until: Instant,
    ) {
        self.remove(family, container);
        let key = key_of(container);
        let labels =
            self.labels
                .acquire(&container.namespace, &container.pod, &container.container);
        let labels = ContainerLabels {
            namespace: labels.namespace,
            pod: labels.pod,
            container: labels.container,
        };
        self.live.insert(
            key,
            Live {
                labels: labels.clone(),
                delay,
                until,
            },
        );
        self.publish(family, &labels);
    }

    fn remove(&mut self, family: &BackoffFamily, container: &ContainerRef) {
        if let Some(live) = self.live.remove(&key_of(container)) {
            let labels = &live.labels;
            self.labels
                .release(&labels.namespace, &labels.pod, &labels.container);
            self.publish(family, labels);
        }
    }

    fn publish(&self, family: &BackoffFamily, labels: &ContainerLabels) {
        let longest = self
            .live
            .values()
            .filter(|live| live.labels == *labels)
            .map(|live| live.delay)
            .max();
        match longest {
            Some(delay) => {
                family.get_or_create(labels).set(delay.as_secs_f64());
            }
            None => {
                family.remove(labels);
            }
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.live.values().map(|live| live.until).min()
    }

    fn expire(&mut self, now: Instant, metrics: &AgentMetrics) {
        let ended: Vec<ContainerRef> = self
            .live
            .iter()
            .filter(|(_, live)| live.until <= now)
            .map(|((namespace, pod, container), _)| ContainerRef {
                namespace: namespace.clone(),
                pod: pod.clone(),
                container: container.clone(),
            })
            .collect();
        for container in ended {
            self.remove(&metrics.container_backoff, &container);
        }
    }
}

fn key_of(container: &ContainerRef) -> (String, String, String) {
    (
        container.namespace.clone(),
        container.pod.clone(),
        container.container.clone(),
    )
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;
    use serde_json::Value;

    use super::*;
    use crate::kube_mock;

    const EXIT: &str = "2026-01-02T12:02:50Z";

    fn time(rfc3339: &str) -> Timestamp {
        rfc3339.parse().unwrap()
    }

    fn app() -> ContainerRef {
        ContainerRef {
            namespace: "shop".into(),
            pod: "web-0".into(),
            container: "app".into(),
        }
    }

    fn termination(main_process: bool, cause: Cause) -> Termination {
        Termination {
            at: SystemTime::from(time(EXIT)),
            container_id: "c0ffee".into(),
            container: Some(app()),
            pid: 4242,
            comm: "server".into(),
            main_process,
            cause,
        }
    }

    fn oom(scope: OomScope, limit: Option<u64>, rss: Option<u64>) -> Cause {
        Cause::OomKilled(Box::new(OomKill {
            scope,
            rss_bytes: rss,
            oom_score_adj: Some(984),
            limit_bytes: limit,
            memory_events: None,
        }))
    }

    fn killed(signal: i32, sender: Sender) -> Cause {
        Cause::Killed {
            signal: signal as u8,
            sender,
        }
    }

    const MI: u64 = 1 << 20;

    /// Kubelet's view after the run of `ran` seconds ended at [`EXIT`], with `restart_count`
    /// restarts before it.
    fn restarting(restart_count: u32, ran: i64) -> Restart {
        let finished = time(EXIT);
        let run = EndedRun {
            restart_count,
            started_at: Some(finished - SignedDuration::from_secs(ran)),
            finished_at: Some(finished),
        };
        Restart {
            restart_count,
            outcome: Outcome::Restarts {
                next: KubeletBackoff::default().next_start(&run),
                started_again: None,
            },
            delay_from_kubelet: false,
            estimated: false,
        }
    }

    fn main_note(cause: Cause, restart: &Restart) -> String {
        note(
            &termination(true, cause),
            "app",
            Some(restart),
            KubeletBackoff::default(),
        )
    }

    #[test]
    fn a_containers_end_says_what_ended_it_and_when_kubelet_starts_it_again() {
        assert_eq!(
            main_note(
                oom(OomScope::Container, Some(256 * MI), Some(255 * MI)),
                &restarting(4, 5)
            ),
            "restart 5 of container app: killed by the OOM killer (container limit 256Mi, \
             rss 255Mi); kubelet waits 80s (next start ≈ 12:04:10 UTC); the delay resets \
             after 10 min of running"
        );
        assert_eq!(
            main_note(Cause::Exited { code: 3 }, &restarting(0, 5)),
            "restart 1 of container app: exited with code 3; kubelet starts it again at once \
             (no delay before a first restart)"
        );
        let crashed = Cause::Crashed {
            signal: libc::SIGSEGV as u8,
            core_dumped: true,
            fault: Some(Fault {
                kind: "segfault".into(),
                address: Some(0),
                ip: Some(0x7f00_0000_1234),
                location: Some("libc.so.6".into()),
                line: "server[4242]: segfault at 0 ip 00007f0000001234 sp 00007ffd00000000 error 4 in libc.so.6[7f0000000000+195000]".into(),
            }),
        };
        assert_eq!(
            main_note(crashed, &restarting(1, 5)),
            "restart 2 of container app: crashed with SIGSEGV (segfault in libc.so.6, core \
             dumped); kubelet waits 10s (next start ≈ 12:03:00 UTC); the delay resets after 10 \
             min of running"
        );
        let aborted = Cause::Crashed {
            signal: libc::SIGABRT as u8,
            core_dumped: false,
            fault: None,
        };
        assert_eq!(
            main_note(aborted, &restarting(9, 601)),
            "restart 10 of container app: crashed with SIGABRT; it ran longer than 10 min, so \
             the back-off reset: kubelet starts it again at once"
        );
    }

    #[test]
    fn a_containers_end_says_when_kubelet_does_not_restart_it_or_already_did() {
        let completed = Restart {
            restart_count: 0,
            outcome: Outcome::Stays("restartPolicy OnFailure and exit code 0"),
            delay_from_kubelet: false,
            estimated: false,
        };
        assert_eq!(
            main_note(Cause::Exited { code: 0 }, &completed),
            "container app exited with code 0; restartPolicy OnFailure and exit code 0: kubelet \
             does not start it again"
        );
        let mut restarted = restarting(0, 5);
        let Outcome::Restarts { started_again, .. } = &mut restarted.outcome else {
            unreachable!()
        };
        *started_again = Some(time("2026-01-02T12:02:51Z"));
        assert!(
            main_note(Cause::Exited { code: 1 }, &restarted)
                .ends_with("(no delay before a first restart); it started again at 12:02:51 UTC"),
        );
        let estimated = Restart {
            estimated: true,
            ..restarting(2, 5)
        };
        assert!(main_note(Cause::Exited { code: 1 }, &estimated).ends_with(
            "of running (estimated from restartCount 2: kubelet's status did not show this \
                 exit within 5s)"
        ));
        // A pod the writer could not read the status of: what ended, nothing of kubelet.
        assert_eq!(
            note(
                &termination(true, Cause::Exited { code: 2 }),
                "app",
                None,
                KubeletBackoff::default()
            ),
            "container app exited with code 2"
        );
    }

    fn child_note(cause: Cause) -> String {
        note(
            &termination(false, cause),
            "app",
            None,
            KubeletBackoff::default(),
        )
    }

    #[test]
    fn a_child_processs_death_names_the_sender_of_every_kind() {
        let kill = |sender| child_note(killed(libc::SIGKILL, sender));
        assert_eq!(
            kill(Sender::Runtime {
                pid: 812,
                comm: "containerd-shim".into(),
                grace_period_expired: true,
                grace_seconds: Some(30.02),
            }),
            "process server (pid 4242) of container app killed by SIGKILL from containerd-shim \
             (pid 812), the container runtime: the 30s grace period after its SIGTERM ran out; \
             the container keeps running"
        );
        assert_eq!(
            child_note(killed(
                libc::SIGTERM,
                Sender::Runtime {
                    pid: 812,
                    comm: "runc".into(),
                    grace_period_expired: false,
                    grace_seconds: None,
                }
            )),
            "process server (pid 4242) of container app killed by SIGTERM from runc (pid 812), \
             the container runtime stopping it; the container keeps running"
        );
        let what = |note: String| {
            note.strip_prefix("process server (pid 4242) of container app killed by SIGKILL from ")
                .and_then(|rest| rest.strip_suffix("; the container keeps running"))
                .map(str::to_owned)
                .unwrap_or(note)
        };
        assert_eq!(
            what(kill(Sender::SamePod {
                pid: 77,
                comm: "sh".into(),
                container: Some("sidecar".into()),
            })),
            "sh (pid 77) in container sidecar of this pod"
        );
        assert_eq!(
            what(kill(Sender::SamePod {
                pid: 77,
                comm: "sh".into(),
                container: None,
            })),
            "sh (pid 77) in this pod"
        );
        assert_eq!(
            what(kill(Sender::OtherPod {
                pid: 91,
                comm: "kubectl".into(),
                container: Some(ContainerRef {
                    namespace: "ops".into(),
                    pod: "debugger".into(),
                    container: "shell".into(),
                }),
                container_id: "abcdef0123456789".into(),
            })),
            "kubectl (pid 91) in pod ops/debugger (container shell)"
        );
        assert_eq!(
            what(kill(Sender::OtherPod {
                pid: 91,
                comm: "kubectl".into(),
                container: None,
                container_id: "abcdef0123456789".into(),
            })),
            "kubectl (pid 91) in another pod's container abcdef012345"
        );
        assert_eq!(
            what(kill(Sender::Host {
                pid: 900,
                comm: "pkill".into(),
                cgroup: Some("/system.slice/ssh.service".into()),
            })),
            "host process pkill (pid 900, cgroup /system.slice/ssh.service)"
        );
        assert_eq!(
            child_note(killed(libc::SIGBUS, Sender::Kernel)),
            "process server (pid 4242) of container app killed by SIGBUS from the kernel; the \
             container keeps running"
        );
    }

    #[test]
    fn oom_kills_say_whose_limit_or_the_nodes_memory() {
        assert_eq!(
            child_note(oom(OomScope::Pod, Some(3 * (1 << 29)), Some(700 * MI))),
            "process server (pid 4242) of container app killed by the OOM killer (pod limit \
             1.5Gi, rss 700Mi); the container keeps running"
        );
        assert!(
            child_note(oom(OomScope::Node, None, None))
                .contains("killed by the OOM killer (the node ran out of memory);")
        );
        assert!(
            child_note(oom(OomScope::Container, None, Some(255 * MI + 300 * 1024)))
                .contains("(container limit, rss 255.3Mi)")
        );
        for (bytes, quantity_) in [
            (0, "0"),
            (1023, "1023"),
            (1024, "1Ki"),
            (1536, "1.5Ki"),
            (256 * MI, "256Mi"),
            (5 << 30, "5Gi"),
            (3 << 40, "3Ti"),
            // cgroup v1's "no limit".
            (0x7FFF_FFFF_FFFF_F000, "8Ei"),
        ] {
            assert_eq!(quantity(bytes), quantity_);
        }
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(31), "SIGSYS");
        assert_eq!(signal_name(40), "signal 40");
        assert_eq!(signal_name(0), "signal 0");
    }

    #[test]
    fn reasons_tell_a_containers_end_from_a_child_processs_death() {
        let causes = [
            Cause::Exited { code: 1 },
            Cause::Crashed {
                signal: 11,
                core_dumped: false,
                fault: None,
            },
            oom(OomScope::Container, None, None),
            killed(9, Sender::Kernel),
        ];
        let reasons = |main| -> Vec<Option<&str>> {
            causes
                .iter()
                .map(|cause| reason(&termination(main, cause.clone())))
                .collect()
        };
        assert_eq!(
            reasons(true),
            [
                Some("ContainerExited"),
                Some("ContainerCrashed"),
                Some("ContainerOOMKilled"),
                Some("ContainerKilled")
            ]
        );
        assert_eq!(
            reasons(false),
            [
                None,
                Some("ProcessCrashed"),
                Some("ProcessOOMKilled"),
                Some("ProcessKilled")
            ]
        );
        assert!(!is_warning(&Cause::Exited { code: 0 }));
        assert!(is_warning(&Cause::Exited { code: 1 }));
        assert!(is_warning(&killed(15, Sender::Kernel)));
    }

    #[test]
    fn annotation_keys_stay_within_the_name_limit() {
        assert_eq!(annotation_key("app"), "lastgasp.io/last-termination.app");
        let fits = "a".repeat(46);
        assert_eq!(
            annotation_key(&fits),
            format!("lastgasp.io/last-termination.{fits}")
        );
        let long = format!("{}-x", "b".repeat(60));
        let key = annotation_key(&long);
        let name = key.strip_prefix("lastgasp.io/").unwrap();
        assert_eq!(name.len(), 63);
        assert!(name.starts_with(&format!("last-termination.{}-", "b".repeat(37))));
        assert!(name.chars().last().unwrap().is_ascii_alphanumeric());
        // Names alike in their first 37 characters get different keys.
        assert_ne!(key, annotation_key(&format!("{}-y", "b".repeat(60))));
        assert_eq!(key, annotation_key(&long), "stable");
    }

    fn pod(status: Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web-0", "namespace": "shop", "uid": "uid-web-0" },
            "spec": { "containers": [{ "name": "app", "image": "app" }] },
            "status": status,
        }))
        .unwrap()
    }

    fn terminated(id: Option<&str>, started: &str, finished: &str, code: i32) -> Value {
        let mut state = serde_json::json!({
            "exitCode": code, "reason": "Error", "startedAt": started, "finishedAt": finished,
        });
        if let Some(id) = id {
            state["containerID"] = format!("containerd://{id}").into();
        }
        state
    }

    fn app_status(restart_count: u32, state: Value, last_state: Value) -> Value {
        serde_json::json!({ "containerStatuses": [{
            "name": "app", "image": "app", "imageID": "", "ready": false,
            "restartCount": restart_count, "state": state, "lastState": last_state,
        }]})
    }

    fn restart_from(pod: &Pod, cause: Cause) -> Option<Restart> {
        let termination = termination(true, cause);
        let shown = shown_exit(pod, &termination, "app").is_some();
        restart_of(pod, &termination, "app", shown, KubeletBackoff::default())
    }

    fn next(restart: &Restart) -> (NextStart, Option<Timestamp>) {
        match &restart.outcome {
            Outcome::Restarts {
                next,
                started_again,
            } => (*next, *started_again),
            Outcome::Stays(why) => panic!("not restarted: {why}"),
        }
    }

    #[test]
    fn the_back_off_comes_from_the_status_that_shows_the_exit() {
        let ended = terminated(Some("c0ffee"), "2026-01-02T12:02:45Z", EXIT, 137);
        // Just ended: the dead run is the latest, counted 4.
        let now = pod(app_status(
            4,
            serde_json::json!({ "terminated": ended }),
            Value::Null,
        ));
        let restart = restart_from(&now, Cause::Exited { code: 1 }).unwrap();
        assert_eq!((restart.restart_count, restart.estimated), (4, false));
        let (next_start, started_again) = next(&restart);
        assert_eq!(next_start.delay, Duration::from_secs(80));
        assert_eq!(next_start.at, Some(time("2026-01-02T12:04:10Z")));
        assert_eq!(started_again, None);

        // In back-off: still the latest run.
        let waiting = serde_json::json!({ "waiting": { "reason": "CrashLoopBackOff" } });
        let backing_off = pod(app_status(
            4,
            waiting,
            serde_json::json!({ "terminated": ended }),
        ));
        assert_eq!(
            restart_from(&backing_off, Cause::Exited { code: 1 }),
            Some(restart.clone())
        );

        // Running again: a later run, counted once more.
        let running = serde_json::json!({ "running": { "startedAt": "2026-01-02T12:04:12Z" } });
        let again = pod(app_status(
            5,
            running,
            serde_json::json!({ "terminated": ended }),
        ));
        let restarted = restart_from(&again, Cause::Exited { code: 1 }).unwrap();
        assert_eq!(restarted.restart_count, 4);
        assert_eq!(
            next(&restarted),
            (next_start, Some(time("2026-01-02T12:04:12Z")))
        );

        // Without a container id, a finish within 3 s of the probe's exit is the same exit.
        let unnamed = terminated(None, "2026-01-02T12:02:45Z", "2026-01-02T12:02:52Z", 1);
        let by_time = pod(app_status(
            4,
            serde_json::json!({ "terminated": unnamed }),
            Value::Null,
        ));
        assert!(
            !restart_from(&by_time, Cause::Exited { code: 1 })
                .unwrap()
                .estimated
        );
        let older = terminated(None, "2026-01-02T12:00:00Z", "2026-01-02T12:01:00Z", 1);
        let stale = pod(app_status(
            4,
            serde_json::json!({ "terminated": older }),
            Value::Null,
        ));
        assert!(
            restart_from(&stale, Cause::Exited { code: 1 })
                .unwrap()
                .estimated
        );

        // Another container's exit is not this one's.
        let other = terminated(Some("beef"), "2026-01-02T12:02:45Z", EXIT, 1);
        let elsewhere = pod(app_status(
            4,
            serde_json::json!({ "terminated": other }),
            Value::Null,
        ));
        assert!(
            restart_from(&elsewhere, Cause::Exited { code: 1 })
                .unwrap()
                .estimated
        );

        assert_eq!(
            restart_from(&pod(Value::Null), Cause::Exited { code: 1 }),
            None
        );
    }

    #[test]
    fn kubelets_own_delay_wins_over_the_recomputed_one() {
        let ended = terminated(Some("c0ffee"), "2026-01-02T12:02:45Z", EXIT, 1);
        // Restarted 4 times, but kubelet forgot the back-off since (a reset, a restart of
        // kubelet): it waits 20 s, not 80 s.
        let waiting = serde_json::json!({ "waiting": {
            "reason": "CrashLoopBackOff",
            "message": "back-off 20s restarting failed container=app pod=web-0_shop(uid-web-0)",
        }});
        let pod = pod(app_status(
            4,
            waiting,
            serde_json::json!({ "terminated": ended }),
        ));
        let restart = restart_from(&pod, Cause::Exited { code: 1 }).unwrap();
        assert!(restart.delay_from_kubelet);
        let (next_start, _) = next(&restart);
        assert_eq!(
            (next_start.restart, next_start.delay, next_start.at),
            (
                5,
                Duration::from_secs(20),
                Some(time("2026-01-02T12:03:10Z"))
            )
        );
        for (text, seconds) in [
            ("10s", 10.0),
            ("1m20s", 80.0),
            ("5m0s", 300.0),
            ("1.5s", 1.5),
            ("1h0m0s", 3600.0),
            ("500ms", 0.5),
        ] {
            assert_eq!(
                go_duration(text),
                Some(Duration::from_secs_f64(seconds)),
                "{text}"
            );
        }
        for bad in ["", "s", "10", "10x", "1m-2s"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
        let waiting = |reason: &str, message: &str| ContainerStateWaiting {
            reason: Some(reason.into()),
            message: Some(message.into()),
        };
        assert_eq!(
            kubelet_delay(&waiting(
                "CrashLoopBackOff",
                "Back-off 5m0s restarting failed container=app pod=web-0_shop(uid)"
            )),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            kubelet_delay(&waiting(
                "ImagePullBackOff",
                "Back-off pulling image \"app\""
            )),
            None
        );
    }

    #[test]
    fn a_status_that_never_caught_up_gives_an_estimate() {
        // Still running since 12:00:00 as far as the status knows, restarted twice before.
        let running = serde_json::json!({ "running": { "startedAt": "2026-01-02T12:00:00Z" } });
        let behind = pod(app_status(2, running, Value::Null));
        let restart = restart_from(&behind, oom(OomScope::Container, None, None)).unwrap();
        assert_eq!((restart.restart_count, restart.estimated), (2, true));
        let (next_start, _) = next(&restart);
        assert_eq!(
            (next_start.restart, next_start.delay, next_start.at),
            (
                3,
                Duration::from_secs(20),
                Some(time("2026-01-02T12:03:10Z"))
            )
        );
        // A start after the exit is a later run's, not the ended one's: no run length, no reset.
        let later = serde_json::json!({ "running": { "startedAt": "2026-01-02T12:05:00Z" } });
        let restart = restart_from(
            &pod(app_status(2, later, Value::Null)),
            Cause::Exited { code: 1 },
        );
        assert_eq!(next(&restart.unwrap()).0.delay, Duration::from_secs(20));
    }

    #[test]
    fn restart_policies_deletion_and_container_kinds_decide_whether_it_restarts() {
        let ended = |code| serde_json::json!({ "terminated": terminated(Some("c0ffee"), "2026-01-02T12:02:45Z", EXIT, code) });
        let with = |spec: Value, status: Value, deleting: bool| -> Pod {
            let mut pod = pod(status);
            pod.spec = Some(serde_json::from_value(spec).unwrap());
            if deleting {
                pod.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(time(EXIT)),
                );
            }
            pod
        };
        let outcome = |pod: &Pod| restart_from(pod, Cause::Exited { code: 0 }).map(|r| r.outcome);
        let stays = |why| Some(Outcome::Stays(why));
        let regular = |policy: &str| serde_json::json!({ "restartPolicy": policy, "containers": [{ "name": "app" }] });

        assert_eq!(
            outcome(&with(
                regular("Never"),
                app_status(0, ended(1), Value::Null),
                false
            )),
            stays("restartPolicy Never")
        );
        assert_eq!(
            outcome(&with(
                regular("OnFailure"),
                app_status(0, ended(0), Value::Null),
                false
            )),
            stays("restartPolicy OnFailure and exit code 0")
        );
        assert!(matches!(
            outcome(&with(
                regular("OnFailure"),
                app_status(0, ended(1), Value::Null),
                false
            )),
            Some(Outcome::Restarts { .. })
        ));
        assert!(matches!(
            outcome(&with(
                regular("Always"),
                app_status(0, ended(0), Value::Null),
                false
            )),
            Some(Outcome::Restarts { .. })
        ));
        assert_eq!(
            outcome(&with(
                regular("Always"),
                app_status(0, ended(137), Value::Null),
                true
            )),
            stays("the pod is being deleted")
        );

        let init_status = |code| {
            serde_json::json!({ "initContainerStatuses": [{
                "name": "app", "image": "app", "imageID": "", "ready": false, "restartCount": 0, "state": ended(code),
            }]})
        };
        let init = |policy: Option<&str>| serde_json::json!({ "containers": [{ "name": "main" }], "initContainers": [{ "name": "app", "restartPolicy": policy }] });
        assert_eq!(
            outcome(&with(init(None), init_status(0), false)),
            stays("the init container completed")
        );
        assert!(matches!(
            outcome(&with(init(None), init_status(1), false)),
            Some(Outcome::Restarts { .. })
        ));
        assert!(matches!(
            outcome(&with(init(Some("Always")), init_status(0), false)),
            Some(Outcome::Restarts { .. })
        ));
        assert_eq!(
            field_path(&with(init(None), init_status(0), false), "app"),
            "spec.initContainers{app}"
        );
        assert_eq!(field_path(&pod(Value::Null), "app"), "spec.containers{app}");
    }

    #[test]
    fn the_annotation_has_the_cause_the_sender_and_the_back_off() {
        let rules = KubeletBackoff::default();
        let oom_killed = last_termination(
            &termination(
                true,
                oom(OomScope::Container, Some(256 * MI), Some(255 * MI)),
            ),
            "app",
            Some(&restarting(4, 5)),
            rules,
        );
        let value: Value = serde_json::from_str(&oom_killed).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "time": "2026-01-02T12:02:50.000Z",
                "container": "app",
                "container_id": "c0ffee",
                "pid": 4242,
                "comm": "server",
                "cause": "oom_killed",
                "signal": "SIGKILL",
                "oom": {
                    "scope": "container", "rss_bytes": 255 * MI, "oom_score_adj": 984,
                    "limit_bytes": 256 * MI, "memory_events": null,
                },
                "restart_count": 4,
                "back_off": {
                    "rules": "classic", "restart": 5, "delay_seconds": 80.0,
                    "next_start": "2026-01-02T12:04:10Z", "reset": false,
                    "delay_from_kubelet": false, "estimated": false,
                },
            })
        );
        let sender = Sender::Host {
            pid: 900,
            comm: "pkill".into(),
            cgroup: Some("/system.slice/ssh.service".into()),
        };
        let stays = Restart {
            restart_count: 0,
            outcome: Outcome::Stays("restartPolicy Never"),
            delay_from_kubelet: false,
            estimated: false,
        };
        let value: Value = serde_json::from_str(&last_termination(
            &termination(true, killed(libc::SIGKILL, sender)),
            "app",
            Some(&stays),
            rules,
        ))
        .unwrap();
        assert_eq!(value["cause"], "killed");
        assert_eq!(value["signal"], "SIGKILL");
        assert_eq!(
            value["sender"],
            serde_json::json!({ "kind": "host", "pid": 900, "comm": "pkill", "cgroup": "/system.slice/ssh.service" })
        );
        assert_eq!(value["not_restarted"], "restartPolicy Never");
        assert!(value.get("back_off").is_none());
        let exited: Value = serde_json::from_str(&last_termination(
            &termination(true, Cause::Exited { code: 3 }),
            "app",
            None,
            rules,
        ))
        .unwrap();
        assert_eq!(
            (exited["exit_code"].clone(), exited.get("signal")),
            (3.into(), None)
        );
    }

    fn pod_json(status: Value) -> Value {
        serde_json::to_value(pod(status)).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_writer_waits_for_the_status_then_writes_the_event_and_applies_the_annotation() {
        let (client, mut server) = kube_mock::client();
        let metrics = AgentMetrics::register(&mut Registry::default());
        let (queue, queued) = mpsc::channel(QUEUE);
        let config = ReportConfig {
            node: "worker-3".into(),
            backoff: KubeletBackoff::default(),
            pods: PodIndex::default(),
        };
        let writer = tokio::spawn(write(client, config, queued, metrics.clone()));
        let started = Instant::now();
        let ended = Termination {
            at: SystemTime::now(),
            ..termination(true, Cause::Exited { code: 1 })
        };
        queue.send(ended).await.unwrap();

        // The status still shows the container running: read again 500 ms later.
        let running = serde_json::json!({ "running": { "startedAt": "2026-01-02T12:00:00Z" } });
        let read = server.next().await;
        assert_eq!(
            (read.method.as_str(), read.path()),
            ("GET", "/api/v1/namespaces/shop/pods/web-0")
        );
        read.respond(200, pod_json(app_status(0, running, Value::Null)));
        let reread = server.next().await;
        assert_eq!(started.elapsed(), STATUS_POLL);
        let exit = terminated(Some("c0ffee"), "2026-01-02T12:00:00Z", EXIT, 1);
        reread.respond(
            200,
            pod_json(app_status(
                0,
                serde_json::json!({ "terminated": exit }),
                Value::Null,
            )),
        );

        let event = server.next().await;
        assert_eq!(
            (event.method.as_str(), event.path()),
            ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events")
        );
        assert_eq!(event.body["reason"], "ContainerExited");
        assert_eq!(event.body["regarding"]["uid"], "uid-web-0");
        assert_eq!(event.body["regarding"]["fieldPath"], "spec.containers{app}");
        assert_eq!(
            event.body["note"],
            "restart 1 of container app: exited with code 1; kubelet starts it again at once \
             (no delay before a first restart)"
        );
        event.ok();

        let apply = server.next().await;
        assert_eq!(
            (apply.method.as_str(), apply.path()),
            ("PATCH", "/api/v1/namespaces/shop/pods/web-0")
        );
        assert_eq!(apply.query("fieldManager"), Some(FIELD_MANAGER));
        assert_eq!(apply.query("force"), Some("true"));
        assert_eq!(
            apply.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(apply.body["metadata"]["uid"], "uid-web-0");
        let value = apply.body["metadata"]["annotations"]["lastgasp.io/last-termination.app"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            serde_json::from_str::<Value>(&value).unwrap()["back_off"]["restart"],
            1
        );
        apply.ok();

        // A child process of a pod that is gone: one read, nothing written.
        queue
            .send(termination(false, killed(libc::SIGKILL, Sender::Kernel)))
            .await
            .unwrap();
        server.next().await.fail(404, "NotFound");
        drop(queue);
        writer.await.unwrap();
        assert!(server.next_within(Duration::from_secs(60)).await.is_none());
        assert_eq!(
            metrics
                .kubernetes_writes
                .get_or_create(&KubernetesWriteLabels {
                    object: "pod_annotation".into(),
                    result: "success".into(),
                })
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unnamed_container_waits_for_the_pod_watch_beside_the_queue() {
        let (client, mut server) = kube_mock::client();
        let metrics = AgentMetrics::register(&mut Registry::default());
        let (queue, queued) = mpsc::channel(QUEUE);
        let pods = PodIndex::default();
        let config = ReportConfig {
            node: "worker-3".into(),
            backoff: KubeletBackoff::default(),
            pods: pods.clone(),
        };
        let writer = tokio::spawn(write(client, config, queued, metrics));
        let started = Instant::now();
        // Children's deaths in two containers the pod watch does not know yet, then one in a
        // known container.
        let unnamed = |container_id: &str| Termination {
            at: SystemTime::now(),
            container_id: container_id.into(),
            container: None,
            ..termination(false, killed(libc::SIGKILL, Sender::Kernel))
        };
        queue.send(unnamed("fresh")).await.unwrap();
        queue.send(unnamed("never")).await.unwrap();
        queue
            .send(Termination {
                at: SystemTime::now(),
                ..termination(false, killed(libc::SIGKILL, Sender::Kernel))
            })
            .await
            .unwrap();

        // The known one is written at once: the unnamed ones wait beside the queue.
        let web = |name: &str| {
            serde_json::json!({
                "metadata": { "name": name, "namespace": "shop", "uid": format!("uid-{name}") },
                "spec": { "containers": [{ "name": "app", "image": "app" }] },
            })
        };
        let read = server.next().await;
        assert_eq!(read.path(), "/api/v1/namespaces/shop/pods/web-0");
        read.respond(200, web("web-0"));
        let event = server.next().await;
        assert_eq!(event.body["regarding"]["name"], "web-0");
        event.ok();
        assert!(started.elapsed() < NAMING_POLL, "{:?}", started.elapsed());

        // The watch learns of the first container 2 s later: it is written within a poll.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let web_1 = ContainerRef {
            pod: "web-1".into(),
            ..app()
        };
        pods.insert_container("fresh", web_1);
        let read = server.next().await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited <= Duration::from_secs(2) + NAMING_POLL,
            "{waited:?}"
        );
        assert_eq!(read.path(), "/api/v1/namespaces/shop/pods/web-1");
        read.respond(200, web("web-1"));
        let event = server.next().await;
        assert_eq!(event.body["reason"], "ProcessKilled");
        assert_eq!(event.body["regarding"]["uid"], "uid-web-1");
        event.ok();

        // The other is given up once the wait is over: a watch that learns of it later
        // writes nothing.
        tokio::time::sleep_until(started + NAMING_WAIT + NAMING_POLL).await;
        let web_2 = ContainerRef {
            pod: "web-2".into(),
            ..app()
        };
        pods.insert_container("never", web_2);
        assert!(server.next_within(Duration::from_secs(60)).await.is_none());
        drop(queue);
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_that_never_shows_the_exit_is_read_until_the_bounded_wait_ends() {
        let (client, mut server) = kube_mock::client();
        let metrics = AgentMetrics::register(&mut Registry::default());
        let (queue, queued) = mpsc::channel(QUEUE);
        let config = ReportConfig {
            node: "worker-3".into(),
            backoff: KubeletBackoff::default(),
            pods: PodIndex::default(),
        };
        let writer = tokio::spawn(write(client, config, queued, metrics));
        let started = Instant::now();
        queue
            .send(Termination {
                at: SystemTime::now(),
                ..termination(true, Cause::Exited { code: 1 })
            })
            .await
            .unwrap();
        let running = serde_json::json!({ "running": { "startedAt": "2026-01-02T12:00:00Z" } });
        let mut reads = 0;
        let event = loop {
            let call = server.next().await;
            if call.method != "GET" {
                break call;
            }
            reads += 1;
            call.respond(200, pod_json(app_status(3, running.clone(), Value::Null)));
        };
        assert_eq!(reads, 10, "a read every 500 ms for 5 s");
        assert!(started.elapsed() <= STATUS_WAIT);
        let note = event.body["note"].as_str().unwrap().to_owned();
        assert!(
            note.ends_with(
                "(estimated from restartCount 3: kubelet's status did not show this exit within 5s)"
            ),
            "{note}"
        );
        event.ok();
        server.next().await.ok();
        drop(queue);
        writer.await.unwrap();
    }

    #[test]
    fn each_pod_has_its_own_event_budget_and_the_map_stays_bounded() {
        let start = Instant::now();
        let mut limits = PodRateLimits::default();
        for _ in 0..POD_EVENT_BURST {
            assert!(limits.take("shop", "web-0", start));
        }
        assert!(!limits.take("shop", "web-0", start));
        assert!(limits.take("shop", "web-1", start), "another pod's budget");
        assert!(!limits.take(
            "shop",
            "web-0",
            start + POD_EVENT_REFILL - Duration::from_millis(1)
        ));
        assert!(limits.take("shop", "web-0", start + POD_EVENT_REFILL));
        assert!(!limits.take("shop", "web-0", start + POD_EVENT_REFILL));

        for i in 0..RATE_LIMITED_PODS * 2 {
            limits.take("many", &format!("pod-{i}"), start);
        }
        assert!(limits.buckets.len() <= RATE_LIMITED_PODS);
    }

    #[test]
    fn back_off_series_live_until_the_expected_start() {
        let metrics = AgentMetrics::register(&mut Registry::default());
        let family = &metrics.container_backoff;
        let mut gauges = BackoffGauges::default();
        let start = Instant::now();
        let labels = |pod: &str| ContainerLabels {
            namespace: "shop".into(),
            pod: pod.into(),
            container: "app".into(),
        };
        let web = |pod: &str| ContainerRef {
            pod: pod.into(),
            ..app()
        };
        gauges.set(
            family,
            &web("web-0"),
            Duration::from_secs(80),
            start + Duration::from_secs(80),
        );
        gauges.set(
            family,
            &web("web-1"),
            Duration::from_secs(10),
            start + Duration::from_secs(10),
        );
        assert_eq!(family.get(&labels("web-0")).unwrap().get(), 80.0);
        assert_eq!(gauges.next_expiry(), Some(start + Duration::from_secs(10)));
        gauges.expire(start + Duration::from_secs(10), &metrics);
        assert!(family.get(&labels("web-1")).is_none());
        assert!(family.get(&labels("web-0")).is_some());
        // A newer exit replaces the delay.
        gauges.set(
            family,
            &web("web-0"),
            Duration::from_secs(160),
            start + Duration::from_secs(170),
        );
        assert_eq!(family.get(&labels("web-0")).unwrap().get(), 160.0);
        gauges.remove(family, &web("web-0"));
        assert!(family.get(&labels("web-0")).is_none());
        assert_eq!(gauges.next_expiry(), None);

        // Past the label cap, containers share the `other` series: it shows the longest delay.
        for i in 0..crate::metrics::MAX_LABEL_VALUES + 2 {
            let delay = Duration::from_secs(10 + i as u64);
            gauges.set(family, &web(&format!("pod-{i}")), delay, start + delay);
        }
        let other = labels("other");
        let over = crate::metrics::MAX_LABEL_VALUES as f64;
        assert_eq!(family.get(&other).unwrap().get(), 10.0 + over + 1.0);
        gauges.expire(
            start + Duration::from_secs(10) + Duration::from_secs(over as u64 + 1),
            &metrics,
        );
        assert!(family.get(&other).is_none());
    }
}
