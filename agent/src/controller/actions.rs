//! The Kubernetes writes of an incident, in order: the node's annotations and Event (the
//! durable record of the decision), then every pod concurrently — annotations, Event,
//! `DisruptionTarget` condition, deletion — then the node's deletion.
//!
//! Every step is idempotent, so running an incident again (after a merge, or after a
//! controller restart) finishes what is left without duplicate Events. Transient API errors
//! are retried with back-off until they succeed. Every patch and delete names the object's
//! UID: an object deleted and created again under the same name since the panic is another
//! object, and its 409 means the write is done (there is nothing left of the old one to write).

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, Resource as _, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::events::{Event, EventType, Recorder},
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde_json::json;

use super::{
    cluster::ClusterCache,
    incidents::{Incident, IncidentRecord},
    metrics::{ControllerMetrics, ObjectLabels},
    policy::Plan,
    reasons::{
        ANNOTATION_CRASH_CULPRIT, ANNOTATION_CRASH_TITLE, ANNOTATION_INCIDENT,
        ANNOTATION_INCIDENT_RECORD, ANNOTATION_KERNEL_RELEASE, ANNOTATION_KERNEL_TAINT,
        ANNOTATION_REASON, ANNOTATION_REASON_CODE, ANNOTATION_SOURCE, ANNOTATION_TIME,
        CONDITION_TYPE, FIELD_MANAGER, condition_reason, sources_label,
    },
};

const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub struct Actions {
    client: Client,
    recorder: Recorder,
    cluster: ClusterCache,
    metrics: Arc<ControllerMetrics>,
    concurrency: usize,
    dry_run: bool,
    /// Objects this process already published an Event for, by incident id; objects marked
    /// by an earlier process are recognised by their annotation instead.
    evented: Mutex<HashSet<(String, String)>>,
}

impl Actions {
    pub fn new(
        client: Client,
        recorder: Recorder,
        cluster: ClusterCache,
        metrics: Arc<ControllerMetrics>,
        concurrency: usize,
        dry_run: bool,
    ) -> Self {
        Self {
            client,
            recorder,
            cluster,
            metrics,
            concurrency: concurrency.max(1),
            dry_run,
            evented: Mutex::new(HashSet::new()),
        }
    }

    /// Carries out an incident's plan: [`Actions::mark`], then [`Actions::delete`]. Returns once
    /// every write has succeeded or is moot.
    pub async fn execute(&self, incident: &Incident, plan: Plan) {
        self.write_marks(incident, plan).await;
        self.write_deletions(incident, plan).await;
        self.observe_last_write(incident);
    }

    /// Writes the reason on the node (with the plan, to resume from) and on every pod that was
    /// there: annotations, Events, the `DisruptionTarget` condition.
    pub async fn mark(&self, incident: &Incident, plan: Plan) {
        self.write_marks(incident, plan).await;
        self.observe_last_write(incident);
    }

    /// Deletes what `plan` says: the pods that were there, then the node.
    pub async fn delete(&self, incident: &Incident, plan: Plan) {
        self.write_deletions(incident, plan).await;
        self.observe_last_write(incident);
    }

    fn observe_last_write(&self, incident: &Incident) {
        if !self.dry_run {
            self.metrics
                .time_to_last_write
                .observe(incident.first_datagram.elapsed().as_secs_f64());
        }
    }

    async fn write_marks(&self, incident: &Incident, plan: Plan) {
        let record = &incident.record;
        if self.dry_run {
            self.log_dry_run(record, plan);
            return;
        }
        let Some(node) = self.cluster.node(&record.node) else {
            tracing::info!(node = record.node, "node already gone; nothing to mark");
            return;
        };
        self.mark_node(&node, record, plan).await;
        futures::stream::iter(self.affected_pods(record))
            .for_each_concurrent(self.concurrency, |pod| self.mark_pod(pod, record))
            .await;
    }

    async fn write_deletions(&self, incident: &Incident, plan: Plan) {
        let record = &incident.record;
        if self.dry_run || !(plan.delete_pods || plan.delete_node) {
            return;
        }
        let Some(node) = self.cluster.node(&record.node) else {
            return;
        };
        if plan.delete_pods {
            futures::stream::iter(self.affected_pods(record))
                .for_each_concurrent(self.concurrency, |pod| self.delete_pod(pod))
                .await;
        }
        // Not a Node object registered again since the panic.
        if plan.delete_node && record.existed_at_panic(created(node.as_ref())) {
            let api: Api<Node> = Api::all(self.client.clone());
            let params = delete_now(node.uid());
            if self
                .retry("delete node", || api.delete(&record.node, &params))
                .await
                .is_some()
            {
                self.count(&self.metrics.deleted, "node");
                tracing::info!(node = record.node, "node deleted");
            }
        }
    }

    /// The node's pods that were there when it failed: not those started since (on a node
    /// back from its reboot, or for an incident resumed long after).
    fn affected_pods(&self, record: &IncidentRecord) -> Vec<Arc<Pod>> {
        self.cluster
            .pods_on(&record.node)
            .into_iter()
            .filter(|pod| record.existed_at_panic(created(pod.as_ref())))
            .collect()
    }

    async fn mark_node(&self, node: &Node, record: &IncidentRecord, plan: Plan) {
        let api: Api<Node> = Api::all(self.client.clone());
        let mut annotations = reason_annotations(record);
        annotations.insert(
            ANNOTATION_INCIDENT_RECORD.into(),
            serde_json::to_string(&StoredIncident {
                record: record.clone(),
                plan: plan.into(),
            })
            .expect("records serialize"),
        );
        let patch = json!({ "metadata": { "uid": node.uid(), "annotations": annotations } });
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let marked = self
            .retry("annotate node", || api.patch(&record.node, &params, &patch))
            .await
            .is_some();
        if !marked {
            return;
        }
        if self.first_event(node.annotations(), record, "Node", &record.node) {
            self.count(&self.metrics.marked, "node");
            self.publish(&node.object_ref(&()), record, "MarkedForDeletion")
                .await;
        }
    }

    async fn mark_pod(&self, pod: Arc<Pod>, record: &IncidentRecord) {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);

        let patch = json!({
            "metadata": { "uid": pod.uid(), "annotations": reason_annotations(record) }
        });
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let annotated = self
            .retry("annotate pod", || api.patch(&name, &params, &patch))
            .await;
        if annotated.is_none() {
            return;
        }
        let key = format!("{namespace}/{name}");
        if self.first_event(pod.annotations(), record, "Pod", &key) {
            self.count(&self.metrics.marked, "pod");
            self.publish(&pod.object_ref(&()), record, "Terminating")
                .await;
        }

        let condition = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": namespace, "uid": pod.uid() },
            "status": { "conditions": [{
                "type": CONDITION_TYPE,
                "status": "True",
                "reason": condition_reason(record.kind()),
                "message": record.reason(),
                "lastTransitionTime": termination_time(record),
            }]}
        });
        let (params, condition) = (
            PatchParams::apply(FIELD_MANAGER).force(),
            Patch::Apply(&condition),
        );
        // A refused condition is logged by `retry`; the pod may still be deleted: its reason
        // is already in its annotations.
        self.retry("set pod condition", || {
            api.patch_status(&name, &params, &condition)
        })
        .await;
    }

    async fn delete_pod(&self, pod: Arc<Pod>) {
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let (name, params) = (pod.name_any(), delete_now(pod.uid()));
        if self
            .retry("delete pod", || api.delete(&name, &params))
            .await
            .is_some()
        {
            self.count(&self.metrics.deleted, "pod");
        }
    }

    /// Whether this object still needs its Event for this incident: not yet published by
    /// this process, and not marked with the incident by an earlier one.
    fn first_event(
        &self,
        annotations: &BTreeMap<String, String>,
        record: &IncidentRecord,
        kind: &str,
        key: &str,
    ) -> bool {
        if annotations.get(ANNOTATION_INCIDENT) == Some(&record.id) {
            return false;
        }
        self.evented
            .lock()
            .expect("evented lock")
            .insert((record.id.clone(), format!("{kind}/{key}")))
    }

    async fn publish(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        record: &IncidentRecord,
        action: &str,
    ) {
        let event = Event {
            type_: EventType::Warning,
            reason: condition_reason(record.kind()),
            note: Some(event_note(record.reason())),
            action: action.into(),
            secondary: None,
        };
        self.retry("publish event", || self.recorder.publish(&event, reference))
            .await;
    }

    /// Says on the node, once per incident and process, why nothing was deleted.
    pub async fn withheld(&self, incident: &Incident, why: &str) {
        let record = &incident.record;
        if self.dry_run {
            tracing::info!(
                node = record.node,
                why,
                "dry run: would publish DeletionWithheld"
            );
            return;
        }
        let Some(node) = self.cluster.node(&record.node) else {
            return;
        };
        if !self
            .evented
            .lock()
            .expect("evented lock")
            .insert((record.id.clone(), "withheld".into()))
        {
            return;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "DeletionWithheld".into(),
            note: Some(event_note(format!(
                "{} marked the node and its pods but deleted nothing: {why}",
                record.kind().reason_code()
            ))),
            action: "Withheld".into(),
            secondary: None,
        };
        let reference = node.object_ref(&());
        self.retry("publish event", || {
            self.recorder.publish(&event, &reference)
        })
        .await;
    }

    /// Runs a write until it succeeds; `None` when it failed for good or the object is gone.
    async fn retry<T, F, Fut>(&self, what: &str, mut write: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match write().await {
                Ok(value) => return Some(value),
                Err(kube::Error::Api(status)) if status.code == 404 => return None,
                // Every write names the object's UID (or is an Event, created once): a conflict
                // is an object replaced under the same name, which never becomes writable.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::info!(
                        what,
                        message = status.message,
                        "object replaced since the panic; leaving it"
                    );
                    return None;
                }
                Err(error) if transient(&error) => {
                    self.metrics.write_retries.inc();
                    tracing::warn!(%error, what, ?backoff, "write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(error) => {
                    tracing::error!(%error, what, "write refused; giving up on it");
                    return None;
                }
            }
        }
    }

    fn count(&self, family: &Family<ObjectLabels, Counter>, object: &str) {
        family
            .get_or_create(&ObjectLabels {
                object: object.into(),
            })
            .inc();
    }

    fn log_dry_run(&self, record: &IncidentRecord, plan: Plan) {
        let pods = self.affected_pods(record);
        tracing::info!(
            node = record.node,
            reason = record.reason(),
            annotations = ?reason_annotations(record),
            pods = pods.len(),
            delete_pods = plan.delete_pods,
            delete_node = plan.delete_node,
            "dry run: would annotate the node and its pods, set DisruptionTarget, publish Events"
        );
        for pod in pods {
            tracing::info!(
                node = record.node,
                pod = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
                "dry run: would mark{}",
                if plan.delete_pods { " and delete" } else { "" }
            );
        }
    }
}

/// Conflicts, throttling, server errors and connection trouble pass; the rest does not.
fn transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// When the object was created, from its metadata.
fn created<K: kube::Resource>(object: &K) -> Option<k8s_openapi::jiff::Timestamp> {
    object.meta().creation_timestamp.as_ref().map(|time| time.0)
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

fn delete_now(uid: Option<String>) -> DeleteParams {
    DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::default()
    }
}

fn reason_annotations(record: &IncidentRecord) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        (ANNOTATION_REASON.to_owned(), record.reason()),
        (ANNOTATION_REASON_CODE.to_owned(), record.code.clone()),
        (ANNOTATION_SOURCE.to_owned(), sources_label(&record.sources)),
        (ANNOTATION_TIME.to_owned(), termination_time(record)),
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
    annotations
}

/// The node's record of an incident: enough to finish it after a controller restart.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StoredIncident {
    pub record: IncidentRecord,
    pub plan: StoredPlan,
}

#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct StoredPlan {
    pub delete_pods: bool,
    pub delete_node: bool,
}

impl From<Plan> for StoredPlan {
    fn from(plan: Plan) -> Self {
        Self {
            delete_pods: plan.delete_pods,
            delete_node: plan.delete_node,
        }
    }
}

impl From<StoredPlan> for Plan {
    fn from(plan: StoredPlan) -> Self {
        Self {
            delete_pods: plan.delete_pods,
            delete_node: plan.delete_node,
        }
    }
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
}
