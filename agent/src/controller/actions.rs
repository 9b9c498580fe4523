//! The Kubernetes writes of an incident, in order: the node's annotations and Event (the
//! durable record of the decision), then every pod concurrently — annotations, Event,
//! `DisruptionTarget` condition, deletion — then the node's deletion.
//!
//! Every step is idempotent, so running an incident again (after a merge, or after a
//! controller restart) finishes what is left without duplicate Events. Transient API errors
//! are retried with back-off until they succeed ([`kube_retry`]). Every patch and delete names the object's
//! UID: an object deleted and created again under the same name since the panic is another
//! object, and its 409 means the write is done (there is nothing left of the old one to write).

use std::{
    collections::HashSet,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, Resource as _, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::events::Reporter,
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde_json::json;

use super::{
    cluster::{ClusterCache, PodRecord},
    incidents::{Incident, IncidentRecord},
    metrics::{ControllerMetrics, ObjectLabels},
    policy::Plan,
    reasons::{
        ANNOTATION_INCIDENT, ANNOTATION_INCIDENT_RECORD, CONDITION_TYPE, FIELD_MANAGER, Verdict,
        event_note,
    },
};
use crate::{
    kube_events::{NewEvent, namespace_of},
    kube_retry::{self, Backoff, Ended, OnConflict},
};

pub struct Actions {
    client: Client,
    reporter: Reporter,
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
        reporter: Reporter,
        cluster: ClusterCache,
        metrics: Arc<ControllerMetrics>,
        concurrency: usize,
        dry_run: bool,
    ) -> Self {
        Self {
            client,
            reporter,
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
        let since = |at: Instant| at.duration_since(incident.first_datagram).as_millis() as u64;
        let started = Instant::now();
        self.write_marks(incident, plan).await;
        let marked = Instant::now();
        self.write_deletions(incident, plan).await;
        self.observe_last_write(incident);
        // Where an incident's time goes, from its first datagram.
        tracing::info!(
            node = incident.record.node,
            id = incident.record.id,
            started_ms = since(started),
            marked_ms = since(marked),
            done_ms = since(Instant::now()),
            "incident written"
        );
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
        let verdict = Verdict::of(record);
        if self.dry_run {
            self.log_dry_run(record, &verdict, plan);
            return;
        }
        let Some(node) = self.cluster.node(&record.node) else {
            tracing::info!(node = record.node, "node already gone; nothing to mark");
            return;
        };
        self.mark_node(&node, record, &verdict, plan).await;
        futures::stream::iter(self.affected_pods(record))
            .for_each_concurrent(self.concurrency, |pod| self.mark_pod(pod, record, &verdict))
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
                self.cluster
                    .forget_node(&record.node, node.uid().as_deref());
                self.count(&self.metrics.deleted, "node");
                tracing::info!(node = record.node, "node deleted");
            }
        }
    }

    /// The node's pods that were there when it failed: not those started since (on a node
    /// back from its reboot, or for an incident resumed long after).
    fn affected_pods(&self, record: &IncidentRecord) -> Vec<Arc<PodRecord>> {
        self.cluster
            .pods_on(&record.node)
            .into_iter()
            .filter(|pod| record.existed_at_panic(pod.created))
            .collect()
    }

    async fn mark_node(&self, node: &Node, record: &IncidentRecord, verdict: &Verdict, plan: Plan) {
        let api: Api<Node> = Api::all(self.client.clone());
        let mut annotations = verdict.annotations.clone();
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
        let marked = node
            .annotations()
            .get(ANNOTATION_INCIDENT)
            .map(String::as_str);
        if self.first_event(marked, record, "Node", &record.node) {
            self.count(&self.metrics.marked, "node");
            self.publish(&node.object_ref(&()), verdict, "MarkedForDeletion")
                .await;
        }
    }

    async fn mark_pod(&self, pod: Arc<PodRecord>, record: &IncidentRecord, verdict: &Verdict) {
        let (namespace, name) = (&pod.namespace, &pod.name);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);

        let patch = json!({
            "metadata": { "uid": pod.uid, "annotations": verdict.annotations }
        });
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let annotated = self
            .retry("annotate pod", || api.patch(name, &params, &patch))
            .await;
        if annotated.is_none() {
            return;
        }
        // The Event and the condition are independent: written at once.
        let key = format!("{namespace}/{name}");
        let event = async {
            if self.first_event(pod.incident.as_deref(), record, "Pod", &key) {
                self.count(&self.metrics.marked, "pod");
                self.publish(&pod.object_ref(), verdict, "Terminating")
                    .await;
            }
        };

        let condition = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": namespace, "uid": pod.uid },
            "status": { "conditions": [{
                "type": CONDITION_TYPE,
                "status": "True",
                "reason": verdict.condition_reason,
                "message": verdict.reason,
                "lastTransitionTime": verdict.termination_time,
            }]}
        });
        let (params, condition) = (
            PatchParams::apply(FIELD_MANAGER).force(),
            Patch::Apply(&condition),
        );
        // A refused condition is logged by `retry`; the pod may still be deleted: its reason
        // is already in its annotations.
        let condition = self.retry("set pod condition", || {
            api.patch_status(name, &params, &condition)
        });
        futures::join!(event, condition);
    }

    async fn delete_pod(&self, pod: Arc<PodRecord>) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let params = delete_now(pod.uid.clone());
        if self
            .retry("delete pod", || api.delete(&pod.name, &params))
            .await
            .is_some()
        {
            self.cluster.forget_pod(&pod);
            self.count(&self.metrics.deleted, "pod");
        }
    }

    /// Whether this object still needs its Event for this incident: not yet published by
    /// this process, and not marked with the incident by an earlier one.
    /// `marked`: the incident the object's annotation names.
    fn first_event(
        &self,
        marked: Option<&str>,
        record: &IncidentRecord,
        kind: &str,
        key: &str,
    ) -> bool {
        if marked == Some(record.id.as_str()) {
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
        verdict: &Verdict,
        action: &str,
    ) {
        self.publish_event(
            reference,
            &verdict.condition_reason,
            action,
            &verdict.event_note,
        )
        .await;
    }

    /// Creates a Warning Event about `reference` (a Node's in `kube-system`).
    async fn publish_event(
        &self,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let event = NewEvent {
            regarding: reference,
            warning: true,
            reason,
            action,
            note,
            time: k8s_openapi::jiff::Timestamp::now(),
            reporting_controller: &self.reporter.controller,
            reporting_instance: self
                .reporter
                .instance
                .as_deref()
                .unwrap_or(&self.reporter.controller),
        }
        .build();
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), namespace_of(reference));
        let params = PostParams::default();
        self.retry("publish event", || api.create(&params, &event))
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
        let note = event_note(format!(
            "{} marked the node and its pods but deleted nothing: {why}",
            record.kind().reason_code()
        ));
        self.publish_event(&node.object_ref(&()), "DeletionWithheld", "Withheld", &note)
            .await;
    }

    /// Runs a write until it succeeds; `None` when it failed for good or is moot. Every write
    /// names the object's UID (or is an Event, created once): a conflict is an object replaced
    /// under the same name, which never becomes writable.
    async fn retry<T, F, Fut>(&self, what: &str, write: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let retrying = |error: &kube::Error, delay: Duration| {
            self.metrics.write_retries.inc();
            tracing::warn!(%error, what, ?delay, "write failed; retrying");
        };
        match kube_retry::call(Backoff::WRITES, OnConflict::Moot, write, retrying).await {
            Ok(value) => Some(value),
            Err(Ended::Gone) => None,
            Err(Ended::Moot(message) | Ended::Conflict(message)) => {
                tracing::info!(what, message, "object replaced since the panic; leaving it");
                None
            }
            Err(Ended::Refused(error)) => {
                tracing::error!(%error, what, "write refused; giving up on it");
                None
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

    fn log_dry_run(&self, record: &IncidentRecord, verdict: &Verdict, plan: Plan) {
        let pods = self.affected_pods(record);
        tracing::info!(
            node = record.node,
            reason = verdict.reason,
            annotations = ?verdict.annotations,
            pods = pods.len(),
            delete_pods = plan.delete_pods,
            delete_node = plan.delete_node,
            "dry run: would annotate the node and its pods, set DisruptionTarget, publish Events"
        );
        for pod in pods {
            tracing::info!(
                node = record.node,
                pod = format!("{}/{}", pod.namespace, pod.name),
                "dry run: would mark{}",
                if plan.delete_pods { " and delete" } else { "" }
            );
        }
    }
}

/// When the object was created, from its metadata.
fn created<K: kube::Resource>(object: &K) -> Option<k8s_openapi::jiff::Timestamp> {
    object.meta().creation_timestamp.as_ref().map(|time| time.0)
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

/// The node's record of an incident: enough to finish it after a controller restart.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StoredIncident {
    pub record: IncidentRecord,
    pub plan: StoredPlan,
}

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
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
    use std::collections::{BTreeMap, BTreeSet};

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use kube::runtime::events::Reporter;
    use prometheus_client::registry::Registry;
    use serde_json::Value;
    use tokio::time::Instant;

    use super::*;
    use crate::{
        controller::{
            reasons::{ANNOTATION_REASON, Source},
            trust::Tier,
        },
        kube_mock::{self, ApiServer, Call},
    };

    const CREATED: &str = "2026-01-01T00:00:00Z";

    fn meta(name: &str, namespace: Option<&str>, uid: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(str::to_owned),
            uid: Some(uid.into()),
            creation_timestamp: Some(Time(CREATED.parse().unwrap())),
            ..ObjectMeta::default()
        }
    }

    fn pod(name: &str) -> Pod {
        Pod {
            metadata: meta(name, Some("shop"), &format!("uid-{name}")),
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some("worker-3".into()),
                ..Default::default()
            }),
            ..Pod::default()
        }
    }

    fn incident() -> Incident {
        Incident {
            record: IncidentRecord {
                id: "worker-3-1".into(),
                node: "worker-3".into(),
                boot_id: Some("boot-1".into()),
                code: "KernelPanic".into(),
                message: "Kernel panic - not syncing: Fatal exception".into(),
                sources: BTreeSet::from([Source::Agent]),
                tier: Tier::PanicProbe,
                crash: None,
                time: "2026-01-02T03:04:05.000Z".into(),
                panicked_at: None,
            },
            context: Vec::new(),
            first_datagram: std::time::Instant::now(),
        }
    }

    fn actions(pods: &[&str]) -> (Arc<Actions>, ApiServer, Arc<ControllerMetrics>) {
        let (client, server) = kube_mock::client();
        let node = Node {
            metadata: meta("worker-3", None, "uid-node"),
            ..Node::default()
        };
        let cluster = ClusterCache::of(vec![node], pods.iter().map(|name| pod(name)).collect());
        let metrics = ControllerMetrics::register(&mut Registry::default());
        let reporter = Reporter {
            controller: "lastgasp-controller".into(),
            instance: Some("replica-0".into()),
        };
        let actions = Actions::new(client, reporter, cluster, metrics.clone(), 16, false);
        (Arc::new(actions), server, metrics)
    }

    fn expect(call: &Call, method: &str, path: &str) {
        assert_eq!(
            (call.method.as_str(), call.path()),
            (method, path),
            "{}",
            call.body
        );
    }

    fn count(family: &Family<ObjectLabels, Counter>, object: &str) -> u64 {
        family
            .get_or_create(&ObjectLabels {
                object: object.into(),
            })
            .get()
    }

    #[tokio::test(start_paused = true)]
    async fn an_incident_marks_the_node_then_its_pods_then_deletes_them_by_uid() {
        let (actions, mut server, metrics) = actions(&["web-0"]);
        let incident = incident();
        let verdict = Verdict::of(&incident.record);
        let plan = Plan {
            delete_pods: true,
            delete_node: true,
        };
        let run = tokio::spawn({
            let (actions, incident) = (actions.clone(), incident.clone());
            async move { actions.execute(&incident, plan).await }
        });

        let annotate = server.next().await;
        expect(&annotate, "PATCH", "/api/v1/nodes/worker-3");
        assert_eq!(
            annotate.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(annotate.body["metadata"]["uid"], "uid-node");
        let annotations = &annotate.body["metadata"]["annotations"];
        assert_eq!(
            annotations[ANNOTATION_REASON],
            "node worker-3 kernel panic: Kernel panic - not syncing: Fatal exception"
        );
        let stored: Value =
            serde_json::from_str(annotations[ANNOTATION_INCIDENT_RECORD].as_str().unwrap())
                .unwrap();
        assert_eq!(
            stored["plan"],
            serde_json::json!({ "delete_pods": true, "delete_node": true })
        );
        // A server error: retried after 100-200 ms.
        annotate.fail(503, "ServiceUnavailable");
        let failed = Instant::now();
        let annotate = server.next().await;
        let waited = failed.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited <= Duration::from_millis(200),
            "{waited:?}"
        );
        expect(&annotate, "PATCH", "/api/v1/nodes/worker-3");
        annotate.ok();

        let event = server.next().await;
        expect(
            &event,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/kube-system/events",
        );
        assert_eq!(event.body["reason"], "NodeKernelPanic");
        assert_eq!(event.body["action"], "MarkedForDeletion");
        assert_eq!(event.body["note"], verdict.event_note);
        assert_eq!(event.body["regarding"]["uid"], "uid-node");
        event.ok();

        let annotate = server.next().await;
        expect(&annotate, "PATCH", "/api/v1/namespaces/shop/pods/web-0");
        assert_eq!(annotate.body["metadata"]["uid"], "uid-web-0");
        // The same verdict on the pod as on the node.
        let on_pod: BTreeMap<String, String> =
            serde_json::from_value(annotate.body["metadata"]["annotations"].clone()).unwrap();
        assert_eq!(on_pod, verdict.annotations);
        annotate.ok();
        let event = server.next().await;
        expect(
            &event,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/shop/events",
        );
        assert_eq!(event.body["action"], "Terminating");
        assert_eq!(event.body["regarding"]["uid"], "uid-web-0");
        event.ok();
        let condition = server.next().await;
        expect(
            &condition,
            "PATCH",
            "/api/v1/namespaces/shop/pods/web-0/status",
        );
        assert_eq!(condition.query("fieldManager"), Some(FIELD_MANAGER));
        assert_eq!(condition.query("force"), Some("true"));
        assert_eq!(
            condition.body["status"]["conditions"],
            serde_json::json!([{
                "type": CONDITION_TYPE,
                "status": "True",
                "reason": "NodeKernelPanic",
                "message": verdict.reason,
                "lastTransitionTime": "2026-01-02T03:04:05.000Z",
            }])
        );
        condition.ok();

        let delete = server.next().await;
        expect(&delete, "DELETE", "/api/v1/namespaces/shop/pods/web-0");
        assert_eq!(delete.body["gracePeriodSeconds"], 0);
        assert_eq!(delete.body["preconditions"]["uid"], "uid-web-0");
        delete.respond(200, serde_json::to_value(pod("web-0")).unwrap());
        let delete = server.next().await;
        expect(&delete, "DELETE", "/api/v1/nodes/worker-3");
        assert_eq!(delete.body["preconditions"]["uid"], "uid-node");
        delete.respond(
            200,
            serde_json::json!({ "apiVersion": "v1", "kind": "Node", "metadata": {} }),
        );
        run.await.unwrap();

        assert_eq!(count(&metrics.marked, "node"), 1);
        assert_eq!(count(&metrics.marked, "pod"), 1);
        assert_eq!(count(&metrics.deleted, "pod"), 1);
        assert_eq!(count(&metrics.deleted, "node"), 1);
        assert_eq!(metrics.write_retries.get(), 1);

        // Run again (the incident got a better title) before the watches report the
        // deletions: nothing deleted here is written to again.
        actions.execute(&incident, plan).await;
        let late = server.next_within(Duration::from_secs(5)).await;
        assert!(
            late.is_none(),
            "{:?}",
            late.map(|call| call.path().to_owned())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_replaced_since_the_panic_is_left_and_a_refused_write_is_not_retried() {
        let (actions, mut server, metrics) = actions(&["web-0"]);
        let incident = incident();
        let run = tokio::spawn(async move { actions.mark(&incident, Plan::MARK_ONLY).await });
        server.next().await.ok();
        server.next().await.ok();
        // The pod's UID precondition fails: another pod of that name; nothing more is written on it.
        let annotate = server.next().await;
        expect(&annotate, "PATCH", "/api/v1/namespaces/shop/pods/web-0");
        annotate.fail(409, "Conflict");
        run.await.unwrap();
        assert!(server.next_within(Duration::from_secs(60)).await.is_none());
        assert_eq!(count(&metrics.marked, "pod"), 0);
        assert_eq!(metrics.write_retries.get(), 0);

        // Forbidden: given up at once.
        let (actions, mut server, metrics) = self::actions(&[]);
        let incident = self::incident();
        let run = tokio::spawn(async move { actions.mark(&incident, Plan::MARK_ONLY).await });
        server.next().await.fail(403, "Forbidden");
        run.await.unwrap();
        assert!(server.next_within(Duration::from_secs(60)).await.is_none());
        assert_eq!(count(&metrics.marked, "node"), 0);
        assert_eq!(metrics.write_retries.get(), 0);
    }
}
