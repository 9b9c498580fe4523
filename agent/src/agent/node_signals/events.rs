//! Publishes the observer's Events (events.k8s.io/v1), one at a time, retrying transient
//! failures with back-off.

use std::sync::Arc;

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::mpsc;

use super::{REPORTING_CONTROLLER, count};
use crate::{
    kube_events::{NewEvent, namespace_of},
    kube_retry::{self, Backoff, Ended, OnConflict},
    metrics::AgentMetrics,
};

/// An Event to publish.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct EventSpec {
    pub(super) regarding: ObjectReference,
    pub(super) warning: bool,
    pub(super) reason: &'static str,
    pub(super) note: String,
    pub(super) time: Timestamp,
}

impl EventSpec {
    fn action(&self) -> &'static str {
        if self.warning { "Detected" } else { "Cleared" }
    }
}

/// Creates each queued Event, retrying transient failures with back-off; while it waits,
/// the queue fills and the observer drops (and counts) what does not fit.
pub(super) async fn write(
    client: Client,
    node: String,
    mut queue: mpsc::Receiver<EventSpec>,
    metrics: Arc<AgentMetrics>,
) {
    while let Some(spec) = queue.recv().await {
        let event = NewEvent {
            regarding: &spec.regarding,
            warning: spec.warning,
            reason: spec.reason,
            action: spec.action(),
            note: &spec.note,
            time: spec.time,
            reporting_controller: REPORTING_CONTROLLER,
            reporting_instance: &node,
        }
        .build();
        let namespace = namespace_of(&spec.regarding);
        let (api, params) = (
            Api::<Event>::namespaced(client.clone(), namespace),
            PostParams::default(),
        );
        let created = kube_retry::call(
            Backoff::SIGNALS,
            // The name is this agent's own: taken means an earlier try was created.
            OnConflict::Moot,
            || api.create(&params, &event),
            |error, delay| {
                count(&metrics, "event", "error", 1);
                tracing::warn!(%error, reason = spec.reason, retry_in = ?delay, "publishing an Event failed");
            },
        )
        .await;
        match created {
            Ok(_) | Err(Ended::Moot(_)) => count(&metrics, "event", "success", 1),
            Err(ended) => {
                tracing::warn!(%ended, reason = spec.reason, "Event refused; dropped");
                count(&metrics, "event", "error", 1);
                count(&metrics, "event", "dropped", 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;
    use tokio::time::Instant;

    use super::*;
    use crate::{kube_mock, metrics::KubernetesWriteLabels};

    fn on_pod() -> EventSpec {
        EventSpec {
            regarding: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some("shop".into()),
                name: Some("web-0".into()),
                uid: Some("uid-web-0".into()),
                ..ObjectReference::default()
            },
            warning: true,
            reason: "NetlinkRecvHung",
            note: "terwayd (pid 1, tid 2) blocked".into(),
            time: "2026-01-02T03:04:05Z".parse().unwrap(),
        }
    }

    fn on_node() -> EventSpec {
        EventSpec {
            regarding: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some("worker-3".into()),
                uid: Some("worker-3".into()),
                ..ObjectReference::default()
            },
            warning: false,
            ..on_pod()
        }
    }

    fn writes(metrics: &AgentMetrics, result: &str) -> u64 {
        metrics
            .kubernetes_writes
            .get_or_create(&KubernetesWriteLabels {
                object: "event".into(),
                result: result.into(),
            })
            .get()
    }

    #[tokio::test(start_paused = true)]
    async fn each_event_is_created_once_retried_on_server_errors_and_dropped_when_refused() {
        let (client, mut server) = kube_mock::client();
        let metrics = AgentMetrics::register(&mut Registry::default());
        let (queue, queued) = mpsc::channel(8);
        let writer = tokio::spawn(write(client, "worker-3".into(), queued, metrics.clone()));

        queue.send(on_pod()).await.unwrap();
        let create = server.next().await;
        assert_eq!(
            (create.method.as_str(), create.path()),
            ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events")
        );
        let body = create.body.clone();
        assert!(
            body["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("web-0.")
        );
        assert_eq!(body["metadata"]["namespace"], "shop");
        assert_eq!(body["type"], "Warning");
        assert_eq!(body["reason"], "NetlinkRecvHung");
        assert_eq!(body["action"], "Detected");
        assert_eq!(body["note"], "terwayd (pid 1, tid 2) blocked");
        assert_eq!(body["eventTime"], "2026-01-02T03:04:05.000000Z");
        assert_eq!(body["regarding"]["uid"], "uid-web-0");
        assert_eq!(body["reportingController"], REPORTING_CONTROLLER);
        assert_eq!(body["reportingInstance"], "worker-3");

        // Throttled: the same Event, same name, after a jittered back-off of 1-2 s.
        create.fail(429, "TooManyRequests");
        let throttled = Instant::now();
        let retry = server.next().await;
        let waited = throttled.elapsed();
        assert!(waited >= Duration::from_secs(1) && waited <= Duration::from_secs(2));
        assert_eq!(retry.body, body);
        // Taken: an earlier try was created after all.
        retry.fail(409, "AlreadyExists");

        // A Node's Event goes to `kube-system`; a refusal drops it and the writer goes on.
        queue.send(on_node()).await.unwrap();
        let refused = server.next().await;
        assert_eq!(
            refused.path(),
            "/apis/events.k8s.io/v1/namespaces/kube-system/events"
        );
        assert_eq!(refused.body["type"], "Normal");
        assert_eq!(refused.body["action"], "Cleared");
        let refused_name = refused.body["metadata"]["name"].clone();
        refused.fail(422, "Invalid");
        queue.send(on_node()).await.unwrap();
        let next = server.next().await;
        assert_ne!(next.body["metadata"]["name"], refused_name);
        next.ok();
        drop(queue);
        writer.await.unwrap();

        assert_eq!(writes(&metrics, "success"), 2);
        assert_eq!(writes(&metrics, "dropped"), 1);
        // One failed try retried, one refused.
        assert_eq!(writes(&metrics, "error"), 2);
    }
}
