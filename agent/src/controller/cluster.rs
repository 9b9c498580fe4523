//! The controller's view of the cluster, kept by watches: nodes indexed by every address in
//! `status.addresses`, pods indexed by `spec.nodeName`. Decisions read it without API calls.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

use crate::supervise::{Lifetime, Supervisor};

type PodKey = (String, String);

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<String, Arc<Node>>,
    by_address: HashMap<IpAddr, String>,
    pods_by_node: HashMap<String, BTreeMap<PodKey, Arc<Pod>>>,
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

    fn upsert_pod(&mut self, pod: Pod) {
        let key = (pod.namespace().unwrap_or_default(), pod.name_any());
        self.remove_pod(&key);
        if let Some(node) = pod.spec.as_ref().and_then(|spec| spec.node_name.clone()) {
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

    pub fn pods_on(&self, node: &str) -> Vec<Arc<Pod>> {
        self.read()
            .pods_by_node
            .get(node)
            .map(|pods| pods.values().cloned().collect())
            .unwrap_or_default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("cluster cache lock")
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
                relist.insert(node.name_any(), Arc::new(node));
            }
            watcher::Event::InitDone => {
                state.nodes = std::mem::take(&mut relist);
                synced.send_modify(|(nodes, _)| *nodes = true);
            }
            watcher::Event::Apply(node) => {
                state.nodes.insert(node.name_any(), Arc::new(node));
            }
            watcher::Event::Delete(node) => {
                state.nodes.remove(&node.name_any());
            }
        }
        state.reindex_addresses();
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
            watcher::Event::InitApply(pod) => relist.push(pod),
            watcher::Event::InitDone => {
                state.pods_by_node.clear();
                state.pod_nodes.clear();
                for pod in relist.drain(..) {
                    state.upsert_pod(pod);
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
