//! In-cluster attribution: the pods bound to this node (one watch, field selector
//! `spec.nodeName`), indexed by container id, so a hung thread is named by namespace, pod
//! and container from the container id in its cgroup path, and by name, for the uid an
//! Event about a pod must carry.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::Serialize;

use crate::supervise::{Lifetime, Supervisor};

/// The container a process runs in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    #[serde(rename = "pod_namespace")]
    pub namespace: String,
    #[serde(rename = "pod_name")]
    pub pod: String,
    pub container: String,
}

/// Container ids and uids of this node's pods.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    index: Arc<RwLock<Index>>,
}

#[derive(Debug, Default)]
struct Index {
    by_container: HashMap<String, ContainerRef>,
    /// `(namespace, name)` to uid.
    uids: HashMap<(String, String), String>,
}

impl PodIndex {
    /// Watches the pods bound to `node` in a task of `tasks`.
    pub fn start(client: Client, node: &str, tasks: &mut Supervisor) -> Self {
        let index = Self::default();
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let events = watcher(Api::<Pod>::all(client), config).default_backoff();
        let shared = index.index.clone();
        tasks.spawn("pod-watch", Lifetime::Required, async move {
            let mut pods: HashMap<(String, String), Watched> = HashMap::new();
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Init) => pods.clear(),
                    Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod)) => {
                        let watched = Watched {
                            uid: pod.uid().unwrap_or_default(),
                            containers: containers(&pod),
                        };
                        pods.insert(key(&pod), watched);
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        pods.remove(&key(&pod));
                    }
                    Ok(watcher::Event::InitDone) => {}
                    Err(error) => {
                        tracing::warn!(%error, "pod watch failed; retrying");
                        continue;
                    }
                }
                *shared.write().expect("pod index lock") = Index {
                    by_container: pods
                        .values()
                        .flat_map(|pod| pod.containers.iter().cloned())
                        .collect(),
                    uids: pods
                        .iter()
                        .map(|(key, pod)| (key.clone(), pod.uid.clone()))
                        .collect(),
                };
            }
        });
        index
    }

    pub fn container(&self, container_id: &str) -> Option<ContainerRef> {
        self.index
            .read()
            .expect("pod index lock")
            .by_container
            .get(container_id)
            .cloned()
    }

    /// For tests: a pod the watch would have seen.
    #[cfg(test)]
    pub(crate) fn insert_uid(&self, namespace: &str, name: &str, uid: &str) {
        self.index
            .write()
            .expect("pod index lock")
            .uids
            .insert((namespace.into(), name.into()), uid.into());
    }

    /// For tests: a container the watch would have seen.
    #[cfg(test)]
    pub(crate) fn insert_container(&self, container_id: &str, container: ContainerRef) {
        self.index
            .write()
            .expect("pod index lock")
            .by_container
            .insert(container_id.into(), container);
    }

    /// The uid of this node's pod `namespace/name`, if the watch has seen it.
    pub fn uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.index
            .read()
            .expect("pod index lock")
            .uids
            .get(&(namespace.to_owned(), name.to_owned()))
            .filter(|uid| !uid.is_empty())
            .cloned()
    }
}

/// What the watch keeps of a pod.
struct Watched {
    uid: String,
    /// Container id and container.
    containers: Vec<(String, ContainerRef)>,
}

fn key(pod: &Pod) -> (String, String) {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

/// Every container of the pod that has an id: `<runtime>://<id>` in its status, for its
/// current run and for the last one that ended (a restarted container's previous id, which a
/// termination reported late still carries).
fn containers(pod: &Pod) -> Vec<(String, ContainerRef)> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ]
    .into_iter()
    .flatten()
    .flatten()
    .flat_map(|container| {
        let last = container
            .last_state
            .as_ref()
            .and_then(|state| state.terminated.as_ref())
            .and_then(|terminated| terminated.container_id.as_deref());
        [container.container_id.as_deref(), last]
            .into_iter()
            .flatten()
            .filter_map(|id| {
                let (_runtime, id) = id.split_once("://")?;
                Some((
                    id.to_owned(),
                    ContainerRef {
                        namespace: pod.namespace().unwrap_or_default(),
                        pod: pod.name_any(),
                        container: container.name.clone(),
                    },
                ))
            })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_come_from_every_kind_of_container_status() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web-0", "namespace": "shop" },
            "status": {
                "containerStatuses": [
                    { "name": "app", "containerID": "containerd://aaaa", "image": "", "imageID": "", "ready": true, "restartCount": 1,
                      "lastState": { "terminated": { "containerID": "containerd://9999", "exitCode": 137 } } },
                    { "name": "starting", "image": "", "imageID": "", "ready": false, "restartCount": 0 }
                ],
                "initContainerStatuses": [
                    { "name": "init", "containerID": "cri-o://bbbb", "image": "", "imageID": "", "ready": false, "restartCount": 0 }
                ]
            }
        }))
        .unwrap();
        let found: HashMap<_, _> = containers(&pod).into_iter().collect();
        assert_eq!(found.len(), 3);
        assert_eq!(found["aaaa"].container, "app");
        assert_eq!(found["9999"].container, "app");
        assert_eq!(found["bbbb"].pod, "web-0");
        assert_eq!(found["bbbb"].namespace, "shop");
    }
}
