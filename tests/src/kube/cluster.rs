//! A real API server set up as lastgasp's tests need it: `deploy/`'s namespace and RBAC
//! applied, a [`FaultProxy`] in front for the code under test, an admin client for the test's
//! own reads and writes, and the objects kubelet would have written (Nodes with addresses and
//! a boot id, running Pods, node heartbeat Leases).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use lastgasp_tests::kube::cluster::Cluster;
//! let cluster = Cluster::start().await;
//! cluster.namespace("team").await;
//! cluster.node("node-b", "127.0.0.2", Some("boot-1")).await;
//! cluster.pod("team", "b-0", "node-b").await;
//! let controller = cluster.client_as("lastgasp-controller").await;
//! assert!(cluster.get("pods", Some("team"), "b-0").await.is_some());
//! # Ok(()) }
//! ```

use std::{
    future::Future,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Node},
    events::v1::Event,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use super::{
    RealApiServer,
    proxy::FaultProxy,
    seed::{create_deploy_rbac, create_node, create_running_pod},
};

/// A started server with `deploy/`'s RBAC; everything stops on drop.
pub struct Cluster {
    // Dropped first: the proxy, then the server.
    proxy: FaultProxy,
    admin: Client,
    server: RealApiServer,
}

impl Cluster {
    /// Starts the server, applies `deploy/base`'s namespace and RBAC, and starts the proxy.
    pub async fn start() -> Self {
        let server = RealApiServer::start().await.expect("the real API server");
        let admin = server.admin_client().await.expect("an admin client");
        create_deploy_rbac(&admin).await.expect("deploy/'s RBAC");
        let proxy = FaultProxy::start(&server).await.expect("the proxy");
        Self {
            proxy,
            admin,
            server,
        }
    }

    pub fn server(&self) -> &RealApiServer {
        &self.server
    }

    pub fn proxy(&self) -> &FaultProxy {
        &self.proxy
    }

    /// A client as `admin` straight to the server (not through the proxy).
    pub fn admin(&self) -> &Client {
        &self.admin
    }

    /// A client as the ServiceAccount `lastgasp-system/<name>` through the proxy.
    pub async fn client_as(&self, name: &str) -> Client {
        self.proxy
            .client_as("lastgasp-system", name)
            .await
            .expect("a ServiceAccount client")
    }

    pub async fn namespace(&self, name: &str) {
        let namespace =
            serde_json::from_value::<Namespace>(json!({ "metadata": { "name": name } }))
                .expect("a Namespace");
        Api::<Namespace>::all(self.admin.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create a namespace");
    }

    /// A Node whose InternalIP is `ip` (datagrams from that address come "from" it), with
    /// `boot_id` in `status.nodeInfo` as kubelet reports it, or none yet.
    pub async fn node(&self, name: &str, ip: &str, boot_id: Option<&str>) {
        create_node(&self.admin, name, ip)
            .await
            .expect("create a node");
        if let Some(boot_id) = boot_id {
            self.set_boot_id(name, boot_id).await;
        }
    }

    /// What kubelet reports in `status.nodeInfo` of `node`, with `boot_id`.
    pub async fn set_boot_id(&self, node: &str, boot_id: &str) {
        let status = json!({ "status": { "nodeInfo": {
            "architecture": "amd64", "bootID": boot_id, "containerRuntimeVersion": "containerd://1.6.20",
            "kernelVersion": "6.1.0-57-cloud-amd64", "kubeProxyVersion": "v1.20.2",
            "kubeletVersion": "v1.20.2", "machineID": node, "operatingSystem": "linux",
            "osImage": "Debian GNU/Linux 12 (bookworm)", "systemUUID": node,
        }}});
        Api::<Node>::all(self.admin.clone())
            .patch_status(node, &PatchParams::default(), &Patch::Merge(status))
            .await
            .expect("write a node's nodeInfo");
    }

    /// A running, ready Pod bound to `node`.
    pub async fn pod(&self, namespace: &str, name: &str, node: &str) {
        create_running_pod(&self.admin, namespace, name, node)
            .await
            .expect("create a pod");
    }

    /// Creates `node`'s heartbeat Lease in `kube-node-lease`, or renews it, now.
    pub async fn renew_node_lease(&self, node: &str) {
        let leases: Api<Lease> = Api::namespaced(self.admin.clone(), "kube-node-lease");
        let renew = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": node, "namespace": "kube-node-lease" },
            "spec": { "holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now() },
        });
        leases
            .patch(
                node,
                &PatchParams::apply("test-kubelet").force(),
                &Patch::Apply(&renew),
            )
            .await
            .expect("renew a node lease");
    }

    /// The object as JSON, or `None` once it is gone. `resource` is one of `pods`, `nodes`,
    /// `leases`, `events` (events.k8s.io/v1) or `configmaps`.
    pub async fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let path = format!("{}/{name}", collection_path(resource, namespace));
        let request = http::Request::get(&path)
            .body(Vec::new())
            .expect("a request");
        match self.admin.request::<Value>(request).await {
            Ok(object) => Some(object),
            Err(kube::Error::Api(status)) if status.code == 404 => None,
            Err(error) => panic!("GET {path}: {error}"),
        }
    }

    /// Every object of `resource` (as for [`Self::get`]), in `namespace` or all of them.
    pub async fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let path = collection_path(resource, namespace);
        let request = http::Request::get(&path)
            .body(Vec::new())
            .expect("a request");
        let list: Value = self
            .admin
            .request(request)
            .await
            .unwrap_or_else(|error| panic!("GET {path}: {error}"));
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// Every Event about the object `kind`/`name`, in any namespace.
    pub async fn events_about(&self, kind: &str, name: &str) -> Vec<Event> {
        Api::<Event>::all(self.admin.clone())
            .list(&ListParams::default())
            .await
            .expect("list Events")
            .items
            .into_iter()
            .filter(|event| {
                event.regarding.as_ref().is_some_and(|regarding| {
                    regarding.kind.as_deref() == Some(kind)
                        && regarding.name.as_deref() == Some(name)
                })
            })
            .collect()
    }

    /// Writes (anything but reads) that reached the proxy, to paths containing `fragment`,
    /// as `METHOD URI STATUS`.
    pub fn writes_to(&self, fragment: &str) -> Vec<String> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|request| request.method != "GET" && request.uri.contains(fragment))
            .map(|request| format!("{} {} {}", request.method, request.uri, request.status))
            .collect()
    }

    /// Requests through the proxy that the server refused (401, 403) or found invalid (400,
    /// 422), as `METHOD URI STATUS`: what the real authorizer or validation turned down.
    pub fn refused(&self) -> Vec<String> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|request| matches!(request.status, 400 | 401 | 403 | 422))
            .map(|request| format!("{} {} {}", request.method, request.uri, request.status))
            .collect()
    }
}

/// The API path of a collection: `/api/v1/...` for the core group, `/apis/<group>/v1/...`.
fn collection_path(resource: &str, namespace: Option<&str>) -> String {
    let prefix = match resource {
        "leases" => "/apis/coordination.k8s.io/v1",
        "events" => "/apis/events.k8s.io/v1",
        "pods" | "nodes" | "configmaps" | "namespaces" | "serviceaccounts" => "/api/v1",
        other => panic!("no path known for {other}"),
    };
    match namespace {
        Some(namespace) => format!("{prefix}/namespaces/{namespace}/{resource}"),
        None => format!("{prefix}/{resource}"),
    }
}

/// An RFC 3339 `MicroTime` for now.
fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// Renews `node`'s heartbeat Lease every 200 ms, as its kubelet would, until dropped.
pub struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    pub async fn start(cluster: &Cluster, node: &'static str) -> Self {
        cluster.renew_node_lease(node).await;
        let leases: Api<Lease> = Api::namespaced(cluster.admin.clone(), "kube-node-lease");
        Self(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let renew = json!({ "spec": { "renewTime": now() } });
                let _ = leases
                    .patch(node, &PatchParams::default(), &Patch::Merge(&renew))
                    .await;
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The first `Some` of `found`, polled like [`eventually`].
pub async fn eventually_some<T, F, Fut>(what: &str, within: Duration, mut found: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = found().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `done` every 50 ms; fails the test after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
