//! Events (events.k8s.io/v1) as lastgasp writes them, the agent's and the controller's alike.
//!
//! An Event about a cluster-scoped object (a Node) goes in `kube-system`: Kubernetes 1.20
//! refuses it anywhere else (422, "involvedObject.namespace does not match event.namespace"),
//! newer servers accept `kube-system` as well as `default`. `kubectl describe node` finds it in
//! either. An Event about a namespaced object goes in that object's namespace.

use std::sync::atomic::{AtomicI64, Ordering};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};

/// Where Events about cluster-scoped objects go.
pub const CLUSTER_SCOPED_NAMESPACE: &str = "kube-system";

/// What an Event says, and who says it.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent<'a> {
    pub regarding: &'a ObjectReference,
    pub warning: bool,
    /// Machine-readable, e.g. `NodeKernelPanic`.
    pub reason: &'a str,
    /// What was done, e.g. `MarkedForDeletion`.
    pub action: &'a str,
    /// Within the API's 1 KiB.
    pub note: &'a str,
    pub time: Timestamp,
    pub reporting_controller: &'a str,
    pub reporting_instance: &'a str,
}

/// The namespace of an Event about `regarding`.
pub fn namespace_of(regarding: &ObjectReference) -> &str {
    regarding
        .namespace
        .as_deref()
        .filter(|namespace| !namespace.is_empty())
        .unwrap_or(CLUSTER_SCOPED_NAMESPACE)
}

impl NewEvent<'_> {
    /// The Event object, named `<object>.<hex ns>` like client-go's, the nanoseconds strictly
    /// increasing within the process so that no two names repeat.
    pub fn build(&self) -> Event {
        static LAST_NS: AtomicI64 = AtomicI64::new(0);
        let now = i64::try_from(Timestamp::now().as_nanosecond()).unwrap_or(i64::MAX);
        let previous = LAST_NS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        let ns = now.max(previous + 1);
        Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{ns:x}",
                    self.regarding.name.as_deref().unwrap_or("lastgasp")
                )),
                namespace: Some(namespace_of(self.regarding).to_owned()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(self.time)),
            type_: Some(if self.warning { "Warning" } else { "Normal" }.into()),
            reason: Some(self.reason.into()),
            action: Some(self.action.into()),
            note: Some(self.note.into()),
            regarding: Some(self.regarding.clone()),
            reporting_controller: Some(self.reporting_controller.into()),
            reporting_instance: Some(self.reporting_instance.into()),
            ..Event::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some("worker-3".into()),
            uid: Some("worker-3".into()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn node_events_go_to_kube_system_and_pod_events_to_the_pods_namespace() {
        assert_eq!(namespace_of(&node()), "kube-system");
        let pod = ObjectReference {
            namespace: Some("shop".into()),
            ..node()
        };
        assert_eq!(namespace_of(&pod), "shop");
    }

    #[test]
    fn names_never_repeat_within_the_process() {
        let regarding = node();
        let event = NewEvent {
            regarding: &regarding,
            warning: true,
            reason: "NodeKernelPanic",
            action: "MarkedForDeletion",
            note: "note",
            time: Timestamp::now(),
            reporting_controller: "lastgasp.io/controller",
            reporting_instance: "replica-0",
        };
        let names: std::collections::HashSet<String> = (0..1000)
            .map(|_| event.build().metadata.name.unwrap())
            .collect();
        assert_eq!(names.len(), 1000);
        let built = event.build();
        assert_eq!(built.metadata.namespace.as_deref(), Some("kube-system"));
        assert_eq!(built.type_.as_deref(), Some("Warning"));
        assert!(built.metadata.name.unwrap().starts_with("worker-3."));
    }
}
