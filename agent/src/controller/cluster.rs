//! The controller's view of the cluster, kept by watches: nodes indexed by every address in
//! `status.addresses`, pods indexed by `spec.nodeName`. Decisions read it without API calls.
//!
//! Only what the controller reads is kept, so that a fleet fits in its memory: of a Node its
//! name, UID, creation time, lastgasp's annotations, addresses, `Ready` condition and boot
//! id; of a Pod a [`PodRecord`]. Everything else (managed fields, specs, images, statuses) is
//! dropped as each object arrives.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::{
    api::core::v1::{Node, NodeStatus, NodeSystemInfo, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

use crate::supervise::{Lifetime, Supervisor};

use super::reasons::{ANNOTATION_INCIDENT, ANNOTATION_PREFIX};

type PodKey = (String, String);

/// What the controller keeps of a pod: what its writes name and check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub created: Option<Timestamp>,
    /// The incident it is marked with (`lastgasp.io/incident`), if any.
    pub incident: Option<String>,
}

impl PodRecord {
    /// The pod's record, and the node it runs on if it is scheduled.
    pub fn of(pod: Pod) -> (Self, Option<String>) {
        let node = pod.spec.and_then(|spec| spec.node_name);
        let metadata = pod.metadata;
        let record = Self {
            namespace: metadata.namespace.unwrap_or_default(),
            name: metadata.name.unwrap_or_default(),
            uid: metadata.uid,
            created: metadata.creation_timestamp.map(|time| time.0),
            incident: metadata
                .annotations
                .and_then(|mut annotations| annotations.remove(ANNOTATION_INCIDENT)),
        };
        (record, node)
    }

    pub fn object_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            ..ObjectReference::default()
        }
    }
}

/// The part of a Node the controller reads; the rest is dropped.
fn slim_node(node: Node) -> Node {
    let metadata = node.metadata;
    let status = node.status.map(|status| NodeStatus {
        addresses: status.addresses,
        conditions: status.conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|condition| condition.type_ == "Ready")
                .collect()
        }),
        node_info: status.node_info.map(|info| NodeSystemInfo {
            boot_id: info.boot_id,
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    });
    Node {
        metadata: ObjectMeta {
            name: metadata.name,
            uid: metadata.uid,
            creation_timestamp: metadata.creation_timestamp,
            annotations: metadata.annotations.map(|annotations| {
                annotations
                    .into_iter()
                    .filter(|(key, _)| key.starts_with(ANNOTATION_PREFIX))
                    .collect()
            }),
            ..ObjectMeta::default()
        },
        spec: None,
        status,
    }
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<String, Arc<Node>>,
    by_address: HashMap<IpAddr, String>,
    pods_by_node: HashMap<String, BTreeMap<PodKey, Arc<PodRecord>>>,
    pod_nodes: HashMap<PodKey, String>,
}

impl State {
    fn reindex_addresses(&mut self) {
        self.by_address = self
            .nodes
            .iter()
            .flat_map(|(name, node)| addresses(node).map(move |ip| (ip, name.clone())))
            .collect();
    }

    /// Replaces a node and its addresses; a node's status changes often (its kubelet), so
    /// only its own addresses are re-indexed.
    fn upsert_node(&mut self, node: Node) {
        let name = node.name_any();
        self.remove_node(&name);
        for ip in addresses(&node) {
            self.by_address.insert(ip, name.clone());
        }
        self.nodes.insert(name, Arc::new(slim_node(node)));
    }

    fn remove_node(&mut self, name: &str) {
        if let Some(node) = self.nodes.remove(name) {
            for ip in addresses(&node) {
                if self.by_address.get(&ip).is_some_and(|owner| owner == name) {
                    self.by_address.remove(&ip);
                }
            }
        }
    }

    fn upsert_pod(&mut self, pod: Pod) {
        let (pod, node) = PodRecord::of(pod);
        self.insert_pod(pod, node);
    }

    fn insert_pod(&mut self, pod: PodRecord, node: Option<String>) {
        let key = (pod.namespace.clone(), pod.name.clone());
        self.remove_pod(&key);
        if let Some(node) = node {
            self.pods_by_node
                .entry(node.clone())
                .or_default()
                .insert(key.clone(), Arc::new(pod));
            self.pod_nodes.insert(key, node);
        }
    }

    fn remove_pod(&mut self, key: &PodKey) {
        if let Some(node) = self.pod_nodes.remove(key)
            && let Some(pods) = self.pods_by_node.get_mut(&node)
        {
            pods.remove(key);
            if pods.is_empty() {
                self.pods_by_node.remove(&node);
            }
        }
    }
}

/// Every IP address a node lists; host names are skipped.
fn addresses(node: &Node) -> impl Iterator<Item = IpAddr> + '_ {
    node.status
        .iter()
        .flat_map(|status| status.addresses.iter().flatten())
        .filter_map(|address| address.address.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
}

#[derive(Clone, Debug)]
pub struct ClusterCache {
    state: Arc<RwLock<State>>,
    synced: watch::Receiver<(bool, bool)>,
}

impl ClusterCache {
    /// Starts watching nodes and pods in tasks of `tasks`.
    pub fn start(client: Client, tasks: &mut Supervisor) -> Self {
        let state = Arc::new(RwLock::new(State::default()));
        let (synced_tx, synced) = watch::channel((false, false));
        let synced_tx = Arc::new(synced_tx);
        tasks.spawn(
            "node-watch",
            Lifetime::Required,
            watch_nodes(
                watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
                    .default_backoff(),
                state.clone(),
                synced_tx.clone(),
            ),
        );
        tasks.spawn(
            "pod-watch",
            Lifetime::Required,
            watch_pods(
                watcher(Api::<Pod>::all(client), watcher::Config::default()).default_backoff(),
                state.clone(),
                synced_tx,
            ),
        );
        Self { state, synced }
    }

    /// A cache holding these objects, synced, watching nothing: for tests of its readers.
    #[cfg(test)]
    pub fn of(nodes: Vec<Node>, pods: Vec<Pod>) -> Self {
        let mut state = State::default();
        for node in nodes {
            state
                .nodes
                .insert(node.name_any(), Arc::new(slim_node(node)));
        }
        state.reindex_addresses();
        for pod in pods {
            state.upsert_pod(pod);
        }
        Self {
            state: Arc::new(RwLock::new(state)),
            synced: watch::channel((true, true)).1,
        }
    }

    /// Waits until both watches have listed everything once.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|&(nodes, pods)| nodes && pods).await;
    }

    pub fn node_by_address(&self, ip: IpAddr) -> Option<String> {
        self.read().by_address.get(&ip.to_canonical()).cloned()
    }

    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.read().nodes.get(name).cloned()
    }

    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.read().nodes.values().cloned().collect()
    }

    pub fn pods_on(&self, node: &str) -> Vec<Arc<PodRecord>> {
        self.read()
            .pods_by_node
            .get(node)
            .map(|pods| pods.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Drops a pod this process just deleted, before its watch event arrives: a rerun of the
    /// incident (a better title, a merge) then writes nothing to it.
    pub fn forget_pod(&self, pod: &PodRecord) {
        let key = (pod.namespace.clone(), pod.name.clone());
        let mut state = self.write();
        let same = state
            .pod_nodes
            .get(&key)
            .and_then(|node| state.pods_by_node.get(node)?.get(&key))
            .is_some_and(|cached| cached.uid == pod.uid);
        if same {
            state.remove_pod(&key);
        }
    }

    /// Drops a node this process just deleted, as [`Self::forget_pod`].
    pub fn forget_node(&self, name: &str, uid: Option<&str>) {
        let mut state = self.write();
        if state
            .nodes
            .get(name)
            .is_some_and(|node| node.metadata.uid.as_deref() == uid)
        {
            state.remove_node(name);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("cluster cache lock")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().expect("cluster cache lock")
    }
}

async fn watch_nodes(
    events: impl Stream<Item = watcher::Result<watcher::Event<Node>>>,
    state: Arc<RwLock<State>>,
    synced: Arc<watch::Sender<(bool, bool)>>,
) {
    let mut events = std::pin::pin!(events);
    let mut relist = HashMap::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "node watch failed; retrying");
                continue;
            }
        };
        let mut state = state.write().expect("cluster cache lock");
        match event {
            watcher::Event::Init => relist.clear(),
            watcher::Event::InitApply(node) => {
                relist.insert(node.name_any(), Arc::new(slim_node(node)));
            }
            watcher::Event::InitDone => {
                state.nodes = std::mem::take(&mut relist);
                state.reindex_addresses();
                synced.send_modify(|(nodes, _)| *nodes = true);
            }
            watcher::Event::Apply(node) => state.upsert_node(node),
            watcher::Event::Delete(node) => state.remove_node(&node.name_any()),
        }
    }
}

async fn watch_pods(
    events: impl Stream<Item = watcher::Result<watcher::Event<Pod>>>,
    state: Arc<RwLock<State>>,
    synced: Arc<watch::Sender<(bool, bool)>>,
) {
    let mut events = std::pin::pin!(events);
    let mut relist = Vec::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "pod watch failed; retrying");
                continue;
            }
        };
        let mut state = state.write().expect("cluster cache lock");
        match event {
            watcher::Event::Init => relist.clear(),
            // Kept slim at once: a relist of a big cluster holds every pod until it is done.
            watcher::Event::InitApply(pod) => relist.push(PodRecord::of(pod)),
            watcher::Event::InitDone => {
                state.pods_by_node.clear();
                state.pod_nodes.clear();
                for (pod, node) in relist.drain(..) {
                    state.insert_pod(pod, node);
                }
                synced.send_modify(|(_, pods)| *pods = true);
            }
            watcher::Event::Apply(pod) => state.upsert_pod(pod),
            watcher::Event::Delete(pod) => {
                state.remove_pod(&(pod.namespace().unwrap_or_default(), pod.name_any()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_what_the_controller_reads_is_kept() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": "worker-3", "uid": "uid-node", "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": { "kubernetes.io/hostname": "worker-3" },
                "annotations": { "lastgasp.io/incident": "i-1", "node.alpha.kubernetes.io/ttl": "0" },
                "managedFields": [{ "manager": "kubelet", "operation": "Update" }],
            },
            "spec": { "podCIDR": "10.0.0.0/24" },
            "status": {
                "addresses": [{ "type": "InternalIP", "address": "10.1.2.3" }],
                "conditions": [
                    { "type": "MemoryPressure", "status": "False" },
                    { "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown" },
                ],
                "nodeInfo": { "bootID": "boot-1", "machineID": "m", "kernelVersion": "6.1",
                    "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "",
                    "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
                    "systemUUID": "" },
                "images": [{ "names": ["registry/app:1"], "sizeBytes": 1 }],
            },
        }))
        .unwrap();
        let slim = serde_json::to_value(slim_node(node)).unwrap();
        assert_eq!(
            slim,
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {
                    "name": "worker-3", "uid": "uid-node",
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                    "annotations": { "lastgasp.io/incident": "i-1" },
                },
                "status": {
                    "addresses": [{ "type": "InternalIP", "address": "10.1.2.3" }],
                    "conditions": [
                        { "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown" },
                    ],
                    "nodeInfo": { "bootID": "boot-1", "machineID": "", "kernelVersion": "",
                        "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "",
                        "kubeProxyVersion": "", "operatingSystem": "", "architecture": "",
                        "systemUUID": "" },
                },
            })
        );

        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "uid-web-0",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "annotations": { "lastgasp.io/incident": "i-1", "kubectl.kubernetes.io/last-applied-configuration": "{}" },
            },
            "spec": { "nodeName": "worker-3", "containers": [{ "name": "web", "image": "web:1" }] },
            "status": { "phase": "Running" },
        }))
        .unwrap();
        let (record, node) = PodRecord::of(pod);
        assert_eq!(node.as_deref(), Some("worker-3"));
        assert_eq!(
            record,
            PodRecord {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: Some("uid-web-0".into()),
                created: Some("2026-01-01T00:00:00Z".parse().unwrap()),
                incident: Some("i-1".into()),
            }
        );
    }
}
