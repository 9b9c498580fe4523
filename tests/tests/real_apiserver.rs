//! The real kube-apiserver v1.20.2 fixture (`lastgasp_tests::kube`): an admin seeds Nodes and
//! Pods; `deploy/`'s RBAC, applied as is, lets the controller's and the agent's
//! ServiceAccounts make their calls and refuses others with 403; what v1.20 does differently
//! from newer servers; nothing is left running after drop.
//!
//! Needs the binaries of `cargo xtask kube`.

use std::time::Instant;

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod, Secret},
    events::v1::Event,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use lastgasp_tests::{
    faults::Matcher,
    kube::{
        RealApiServer, User,
        proxy::FaultProxy,
        seed::{create_deploy_rbac, create_node, create_running_pod},
    },
};
use serde_json::json;

const NAMESPACE: &str = "lastgasp-system";

async fn start() -> RealApiServer {
    let started = Instant::now();
    let server = RealApiServer::start().await.expect("the real API server");
    eprintln!("kube-apiserver ready in {:?}", started.elapsed());
    server
}

/// The HTTP status of a refused call; panics on success.
fn refused<T: std::fmt::Debug>(result: kube::Result<T>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_admin_seeds_nodes_and_pods_and_drop_stops_everything() {
    let server = start().await;
    let admin = server.admin_client().await.expect("admin client");
    let version = admin.apiserver_version().await.expect("/version");
    assert_eq!(version.git_version, "v1.20.2");

    for (node, ip) in [("node-a", "10.0.0.1"), ("node-b", "10.0.0.2")] {
        create_node(&admin, node, ip).await.expect("a node");
    }
    create_running_pod(&admin, "default", "web-a", "node-a")
        .await
        .expect("a pod");
    create_running_pod(&admin, "default", "web-b", "node-b")
        .await
        .expect("a pod");

    let node = Api::<Node>::all(admin.clone())
        .get("node-a")
        .await
        .expect("get node");
    let addresses = node.status.and_then(|status| status.addresses);
    assert_eq!(addresses.expect("addresses")[0].address, "10.0.0.1");
    // The agent's list: the pods bound to its node, by field selector.
    let on_a = Api::<Pod>::all(admin.clone())
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .expect("list pods");
    let names: Vec<_> = on_a
        .items
        .iter()
        .map(|pod| pod.metadata.name.clone())
        .collect();
    assert_eq!(names, [Some("web-a".to_owned())]);
    let phase = on_a.items[0].status.as_ref().and_then(|s| s.phase.clone());
    assert_eq!(phase.as_deref(), Some("Running"));

    let port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();
    let dir = server.dir().to_owned();
    drop(server);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "kube-apiserver still listens after drop"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn deploy_rbac_allows_the_service_accounts_calls_and_refuses_others() {
    let server = start().await;
    let admin = server.admin_client().await.expect("admin client");
    create_deploy_rbac(&admin).await.expect("deploy/'s RBAC");
    create_node(&admin, "node-a", "10.0.0.1").await.unwrap();
    create_running_pod(&admin, "default", "web", "node-a")
        .await
        .unwrap();
    let secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "lastgasp-auth", "namespace": NAMESPACE },
        "stringData": { "key": "k" },
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .expect("a secret");

    let controller: Client = server
        .client_as(NAMESPACE, "lastgasp-controller")
        .await
        .expect("the controller's client");
    let nodes = Api::<Node>::all(controller.clone());
    // Granted: the watches' lists, the reason annotation, the leader Lease.
    nodes
        .list(&ListParams::default())
        .await
        .expect("list nodes");
    Api::<Pod>::all(controller.clone())
        .list(&ListParams::default())
        .await
        .expect("list pods");
    let annotate =
        Patch::Merge(json!({ "metadata": { "annotations": { "lastgasp.io/test": "x" } } }));
    nodes
        .patch("node-a", &PatchParams::default(), &annotate)
        .await
        .expect("annotate a node");
    let leases = Api::<Lease>::namespaced(controller.clone(), NAMESPACE);
    let lease = serde_json::from_value(json!({
        "metadata": { "name": "lastgasp-controller" },
        "spec": { "holderIdentity": "a", "leaseDurationSeconds": 15 },
    }))
    .unwrap();
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create the leader lease");
    leases.get("lastgasp-controller").await.expect("get it");

    // Refused: anything outside the grants.
    let secrets = Api::<Secret>::namespaced(controller.clone(), NAMESPACE);
    assert_eq!(refused(secrets.list(&ListParams::default()).await), 403);
    assert_eq!(
        refused(
            secrets
                .delete("lastgasp-auth", &DeleteParams::default())
                .await
        ),
        403
    );
    assert_eq!(refused(nodes.get("node-a").await), 403, "no `get` on nodes");
    assert_eq!(
        refused(leases.get("someone-else").await),
        403,
        "resourceNames"
    );
    Api::<Secret>::namespaced(admin.clone(), NAMESPACE)
        .get("lastgasp-auth")
        .await
        .expect("the secret is still there");

    // The agent may write its Node's status but not delete pods.
    let agent = server
        .client_as(NAMESPACE, "lastgasp-agent")
        .await
        .expect("the agent's client");
    let condition = Patch::Merge(json!({ "status": { "conditions": [{
        "type": "NetlinkRecvHung", "status": "False", "reason": "NoHang",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }]}}));
    Api::<Node>::all(agent.clone())
        .patch_status("node-a", &PatchParams::default(), &condition)
        .await
        .expect("patch nodes/status");
    assert_eq!(
        refused(
            Api::<Pod>::namespaced(agent, "default")
                .delete("web", &DeleteParams::default())
                .await
        ),
        403
    );
}

#[tokio::test]
async fn what_v1_20_does_differently() {
    let server = start().await;
    let admin = server.admin_client().await.expect("admin client");

    // EndpointSlices: discovery.k8s.io/v1beta1 only.
    let groups = admin.list_api_groups().await.expect("API groups");
    let discovery = groups
        .groups
        .iter()
        .find(|group| group.name == "discovery.k8s.io")
        .expect("discovery.k8s.io");
    let versions: Vec<_> = discovery
        .versions
        .iter()
        .map(|v| v.version.as_str())
        .collect();
    assert_eq!(versions, ["v1beta1"]);

    // Node status sent on create is kept.
    let node = serde_json::from_value(json!({
        "metadata": { "name": "node-a" },
        "status": { "addresses": [{ "type": "InternalIP", "address": "10.0.0.1" }] },
    }))
    .unwrap();
    let created = Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &node)
        .await
        .expect("a node");
    assert!(created.status.and_then(|s| s.addresses).is_some());

    // An events.k8s.io/v1 Event about a Node: refused in `default`, accepted in `kube-system`.
    let event = |namespace: &str| -> Event {
        serde_json::from_value(json!({
            "metadata": { "name": "node-a.hang", "namespace": namespace },
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "reportingController": "lastgasp.io/agent",
            "reportingInstance": "lastgasp-agent-node-a",
            "action": "Observed",
            "reason": "NetlinkRecvHung",
            "type": "Warning",
            "note": "a hang",
            "regarding": { "apiVersion": "v1", "kind": "Node", "name": "node-a" },
        }))
        .unwrap()
    };
    let in_default = Api::<Event>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &event("default"))
        .await;
    assert_eq!(refused(in_default), 422);
    Api::<Event>::namespaced(admin, "kube-system")
        .create(&PostParams::default(), &event("kube-system"))
        .await
        .expect("an Event about a Node in kube-system");
}

/// The proxy forwards as the caller (RBAC applies to the token sent), fails what its faults
/// select with a `Status` before the server sees it, delays, and ends open watches on demand.
#[tokio::test(flavor = "multi_thread")]
async fn the_fault_proxy_forwards_fails_delays_and_drops_watches() {
    use futures::StreamExt as _;
    use kube::api::WatchParams;
    let server = start().await;
    let proxy = FaultProxy::start(&server).await.expect("the proxy");
    assert!(proxy.url().starts_with("http://127.0.0.1:"));
    let admin = proxy.client(&User::Admin).await.unwrap();
    assert_eq!(
        admin.apiserver_version().await.unwrap().git_version,
        "v1.20.2"
    );
    create_node(&admin, "node-a", "10.0.0.1").await.unwrap();
    create_running_pod(&admin, "default", "web", "node-a")
        .await
        .unwrap();
    // Forwarded with the caller's token: a ServiceAccount without RBAC is refused.
    let agent = proxy
        .client_as("lastgasp-system", "lastgasp-agent")
        .await
        .unwrap();
    let listed = Api::<Pod>::all(agent).list(&ListParams::default()).await;
    assert_eq!(refused(listed), 403);

    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    proxy
        .faults()
        .fail_next(Matcher::any().verb("patch").resource("pods/status"), 1, 500);
    let status = json!({ "status": { "phase": "Failed" } });
    let failed = pods
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await;
    match failed {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (500, "InternalError")
            );
        }
        other => panic!("expected the injected Status, got {other:?}"),
    }
    // A patch of the pod itself is not `pods/status`: it goes through.
    let label = json!({ "metadata": { "labels": { "app": "web" } } });
    pods.patch("web", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    assert_eq!(proxy.faults().injected(), 1);
    let requests = proxy.requests();
    let injected: Vec<_> = requests.iter().filter(|r| r.injected).collect();
    assert_eq!(injected.len(), 1);
    assert_eq!(
        (injected[0].verb.as_deref(), injected[0].resource.as_deref()),
        (Some("patch"), Some("pods/status"))
    );

    proxy
        .faults()
        .set_latency(std::time::Duration::from_millis(300));
    let delayed = Instant::now();
    pods.get("web").await.unwrap();
    assert!(delayed.elapsed() >= std::time::Duration::from_millis(300));
    proxy.faults().clear();

    // A watch streams through, and ends when the faults drop it.
    let mut watch = pods
        .watch(&WatchParams::default().timeout(290), "0")
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), watch.next())
        .await
        .expect("the existing pod streamed");
    assert!(first.is_some());
    assert!(
        proxy
            .requests()
            .iter()
            .any(|r| r.verb.as_deref() == Some("watch") && r.resource.as_deref() == Some("pods"))
    );
    proxy.faults().drop_watches();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(event) = watch.next().await {
            if event.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch ended");
}
