//! The controller against the real kube-apiserver v1.20.2, as its own ServiceAccount under
//! `deploy/`'s RBAC: the real netconsole stream of a panic from node B's address marks B's pods
//! (annotations, `DisruptionTarget`, one Event each) and B (annotations and its Event, in
//! `kube-system`), then deletes them, leaving node A alone. Whatever the real server's
//! admission, validation or authorizer refuses would fail here.
//!
//! The other scenarios are ports of `controller.rs` (which runs them on the in-repo server),
//! with the controller's client going through a [`FaultProxy`] that injects API errors:
//! retries of 5xx, a replaced pod's real UID-precondition conflict, a restarted controller,
//! the Lease-gated deletion of netconsole evidence, leader election, a pstore report, dropped
//! watches.
//!
//! Needs the binaries of `cargo xtask kube`.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    events::v1::Event,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use lastgasp::{
    controller::{Controller, ControllerConfig, policy::Policy, trust::DeletionEvidence},
    wire::{self, AuthKey, Report, ReportKind, ReportSource},
};
use lastgasp_tests::{
    faults::Matcher,
    fixtures::{controller_config, now_ms, replay_sysrq_capture, wait_for},
    kube::{
        RealApiServer,
        proxy::FaultProxy,
        seed::{create_deploy_rbac, create_node, create_running_pod},
    },
    scrape,
};
use serde_json::json;

/// Every pod's last state seen by a watch, deleted ones included.
#[derive(Clone, Default)]
struct LastStates(Arc<Mutex<HashMap<String, (Pod, bool)>>>);

impl LastStates {
    fn start(client: Client) -> Self {
        let states = Self::default();
        let seen = states.0.clone();
        tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client, "team");
            let mut events =
                std::pin::pin!(watcher(pods, watcher::Config::default()).default_backoff());
            while let Ok(Some(event)) = events.try_next().await {
                let (pod, deleted) = match event {
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => (pod, false),
                    watcher::Event::Delete(pod) => (pod, true),
                    _ => continue,
                };
                seen.lock().unwrap().insert(pod.name_any(), (pod, deleted));
            }
        });
        states
    }

    fn get(&self, pod: &str) -> Option<(Pod, bool)> {
        self.0.lock().unwrap().get(pod).cloned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_netconsole_panic_marks_then_deletes_node_b_and_its_pods_under_deploy_rbac() {
    let server = RealApiServer::start().await.expect("the real API server");
    let admin = server.admin_client().await.unwrap();
    create_deploy_rbac(&admin).await.unwrap();
    let namespace = serde_json::from_value::<Namespace>(json!({ "metadata": { "name": "team" } }));
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &namespace.unwrap())
        .await
        .unwrap();
    create_node(&admin, "node-a", "127.0.0.3").await.unwrap();
    create_node(&admin, "node-b", "127.0.0.2").await.unwrap();
    for (pod, node) in [
        ("a-0", "node-a"),
        ("a-1", "node-a"),
        ("b-0", "node-b"),
        ("b-1", "node-b"),
        ("b-2", "node-b"),
    ] {
        create_running_pod(&admin, "team", pod, node).await.unwrap();
    }
    let states = LastStates::start(admin.clone());

    let client = server
        .client_as("lastgasp-system", "lastgasp-controller")
        .await
        .unwrap();
    let mut config = controller_config(Policy::DeletePodsAndNode, AuthKey::None);
    config.deletion_evidence = DeletionEvidence::Any;
    let controller = Controller::start(client, config).await.unwrap();

    let sent = Instant::now();
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    let nodes: Api<Node> = Api::all(admin.clone());
    for _ in 0..1500 {
        if nodes.get_opt("node-b").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        nodes.get_opt("node-b").await.unwrap().is_none(),
        "node-b deleted"
    );
    println!("replay start to node-b deleted: {:?}", sent.elapsed());
    wait_for(
        "the watch to see b-0..b-2 deleted",
        Duration::from_secs(10),
        || {
            ["b-0", "b-1", "b-2"]
                .iter()
                .all(|pod| states.get(pod).is_some_and(|(_, deleted)| deleted))
        },
    )
    .await;

    let events: Vec<Event> = Api::<Event>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let about = |kind: &str, name: &str| -> Vec<&Event> {
        events
            .iter()
            .filter(|event| {
                event.regarding.as_ref().is_some_and(|regarding| {
                    regarding.kind.as_deref() == Some(kind)
                        && regarding.name.as_deref() == Some(name)
                })
            })
            .collect()
    };
    for pod in ["b-0", "b-1", "b-2"] {
        let (last, _) = states.get(pod).unwrap();
        let annotations = last.annotations();
        assert!(
            annotations["lastgasp.io/termination-reason"].ends_with(" on node node-b"),
            "{annotations:?}"
        );
        assert_eq!(
            annotations["lastgasp.io/termination-reason-code"],
            "KernelPanic"
        );
        let conditions = last.status.unwrap().conditions.unwrap_or_default();
        let disruption = conditions
            .iter()
            .find(|c| c.type_ == "DisruptionTarget")
            .expect("DisruptionTarget, written before the deletion");
        assert_eq!(
            (disruption.status.as_str(), disruption.reason.as_deref()),
            ("True", Some("NodeKernelPanic"))
        );
        let pod_events = about("Pod", pod);
        assert_eq!(pod_events.len(), 1, "one Event on {pod}");
        assert_eq!(pod_events[0].metadata.namespace.as_deref(), Some("team"));
        assert_eq!(pod_events[0].reason.as_deref(), Some("NodeKernelPanic"));
    }
    let node_events = about("Node", "node-b");
    assert_eq!(node_events.len(), 1, "{node_events:?}");
    assert_eq!(
        node_events[0].metadata.namespace.as_deref(),
        Some("kube-system")
    );
    assert_eq!(node_events[0].action.as_deref(), Some("MarkedForDeletion"));

    assert!(nodes.get_opt("node-a").await.unwrap().is_some());
    for pod in ["a-0", "a-1"] {
        let (last, deleted) = states.get(pod).unwrap();
        assert!(!deleted);
        assert!(
            !last
                .annotations()
                .contains_key("lastgasp.io/termination-reason")
        );
    }
    assert!(about("Node", "node-a").is_empty());
}

const KEY: &[u8] = b"controller-test-key";
const PANIC: &str = "Kernel panic - not syncing: sysrq triggered crash";
/// The kernel stack the `panic()` probe takes on a sysrq crash, symbolised by the agent.
const SYSRQ_STACK: &[&str] = &[
    "panic+0x0/0x2c0",
    "sysrq_handle_crash+0x16/0x20",
    "__handle_sysrq.cold+0x43/0x11b",
    "write_sysrq_trigger+0x24/0x40",
    "proc_reg_write+0x55/0xa0",
    "vfs_write+0xc4/0x3f0",
    "ksys_write+0x5f/0xe0",
    "do_syscall_64+0x58/0xc0",
    "entry_SYSCALL_64_after_hwframe+0x64/0xce",
];

/// The real server under `deploy/`'s RBAC with `controller.rs`'s objects: node-b
/// (127.0.0.2) and node-a (127.0.0.3) on boot `boot-1`, pods b-0..b-2 and a-0, a-1 in `team`;
/// a proxy in front of it for the controller.
struct Cluster {
    // Dropped first: the proxy, then the server.
    proxy: FaultProxy,
    admin: Client,
    _server: RealApiServer,
}

impl Cluster {
    async fn start() -> Self {
        let server = RealApiServer::start().await.expect("the real API server");
        let admin = server.admin_client().await.unwrap();
        create_deploy_rbac(&admin).await.unwrap();
        let namespace =
            serde_json::from_value::<Namespace>(json!({ "metadata": { "name": "team" } }));
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &namespace.unwrap())
            .await
            .unwrap();
        for (node, ip) in [("node-a", "127.0.0.3"), ("node-b", "127.0.0.2")] {
            create_node(&admin, node, ip).await.unwrap();
            set_boot_id(&admin, node, "boot-1").await;
        }
        for (pod, node) in [
            ("b-0", "node-b"),
            ("b-1", "node-b"),
            ("b-2", "node-b"),
            ("a-0", "node-a"),
            ("a-1", "node-a"),
        ] {
            create_running_pod(&admin, "team", pod, node).await.unwrap();
        }
        let proxy = FaultProxy::start(&server).await.expect("the proxy");
        Self {
            proxy,
            admin,
            _server: server,
        }
    }

    /// A controller as its ServiceAccount, through the proxy, with the shipped trust
    /// defaults, `KEY` and `configure`'s changes.
    async fn controller(&self, configure: impl FnOnce(&mut ControllerConfig)) -> Controller {
        let client = self
            .proxy
            .client_as("lastgasp-system", "lastgasp-controller")
            .await
            .unwrap();
        let mut config =
            controller_config(Policy::DeletePodsAndNode, AuthKey::HmacSha256(KEY.to_vec()));
        configure(&mut config);
        Controller::start(client, config).await.unwrap()
    }

    async fn pod(&self, name: &str) -> Option<Pod> {
        Api::<Pod>::namespaced(self.admin.clone(), "team")
            .get_opt(name)
            .await
            .unwrap()
    }

    async fn node(&self, name: &str) -> Option<Node> {
        Api::<Node>::all(self.admin.clone())
            .get_opt(name)
            .await
            .unwrap()
    }

    /// Every Event about the object `kind`/`name`, in any namespace.
    async fn events_about(&self, kind: &str, name: &str) -> Vec<Event> {
        Api::<Event>::all(self.admin.clone())
            .list(&ListParams::default())
            .await
            .unwrap()
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
}

/// What kubelet reports in `status.nodeInfo`, with `boot_id`.
async fn set_boot_id(client: &Client, node: &str, boot_id: &str) {
    let status = json!({ "status": { "nodeInfo": {
        "architecture": "amd64", "bootID": boot_id, "containerRuntimeVersion": "containerd://1.6.20",
        "kernelVersion": "6.1.0-57-cloud-amd64", "kubeProxyVersion": "v1.20.2",
        "kubeletVersion": "v1.20.2", "machineID": node, "operatingSystem": "linux",
        "osImage": "Debian GNU/Linux 12 (bookworm)", "systemUUID": node,
    }}});
    Api::<Node>::all(client.clone())
        .patch_status(node, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

/// Polls `done` every 50 ms; fails the test after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut done: F)
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

/// The agent's last gasp from its `panic()` kprobe, signed, sent now, for boot `boot-1`.
fn report(node: &str, seq: u64) -> Report {
    Report {
        node: node.into(),
        boot_id: "boot-1".into(),
        seq,
        sent_at_ms: now_ms(),
        kind: ReportKind::KernelPanic,
        source: ReportSource::Kprobe,
        message: PANIC.into(),
        context: vec!["CPU: 0 PID: 1 Comm: sh".into()],
        frames: SYSRQ_STACK
            .iter()
            .map(|frame| (*frame).to_owned())
            .collect(),
        kernel_release: None,
        event_at_ms: None,
        event_boot_id: None,
    }
}

/// Signs `report` and sends it from `ip`, as the agent of the node with that address would.
fn send_from(ip: &str, report: &Report, to: SocketAddr) {
    let datagram = wire::encode(report, &AuthKey::HmacSha256(KEY.to_vec())).unwrap();
    UdpSocket::bind((ip, 0))
        .unwrap()
        .send_to(&datagram, to)
        .unwrap();
}

fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
        .parse()
        .unwrap()
}

async fn b_pods_gone(cluster: &Cluster) -> bool {
    for pod in ["b-0", "b-1", "b-2"] {
        if cluster.pod(pod).await.is_some() {
            return false;
        }
    }
    true
}

async fn b_pods_have_one_event(cluster: &Cluster) -> bool {
    for pod in ["b-0", "b-1", "b-2"] {
        if cluster.events_about("Pod", pod).await.len() != 1 {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn api_errors_are_retried_until_done() {
    let cluster = Cluster::start().await;
    let faults = cluster.proxy.faults();
    faults.fail_next(Matcher::any().verb("patch").resource("pods"), 4, 500);
    faults.fail_next(Matcher::any().verb("delete").resource("pods"), 2, 503);
    let controller = cluster
        .controller(|config| config.policy = Policy::DeletePods)
        .await;
    send_from("127.0.0.2", &report("node-b", 1), controller.report_addr());
    eventually(
        "pods deleted despite errors",
        Duration::from_secs(30),
        || b_pods_gone(&cluster),
    )
    .await;
    assert_eq!(faults.injected(), 6, "every injected fault was hit");
    assert!(b_pods_have_one_event(&cluster).await, "one Event per pod");
    let metrics = scrape(controller.metrics_addr()).await;
    let retries = metric(&metrics, "lastgasp_controller_write_retries_total");
    // kube's client retries a 503 itself (its default retry policy) before the controller
    // sees it: only the 500s are sure to be the controller's retries.
    assert!(retries >= 4, "{retries} retries");
    assert!(
        cluster.node("node-b").await.is_some(),
        "DeletePods keeps the node"
    );
    for pod in ["a-0", "a-1"] {
        assert!(cluster.pod(pod).await.is_some());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_pod_is_left_alone_and_the_node_is_still_deleted() {
    let cluster = Cluster::start().await;
    let controller = cluster.controller(|_| {}).await;
    // Console text is not a verified panic: the pods are marked, and deleted only once the
    // node is seen dead.
    let mut console = report("node-b", 1);
    console.source = ReportSource::Console;
    console.message = format!("Kernel panic - not syncing: {}", "x".repeat(3000));
    send_from("127.0.0.2", &console, controller.report_addr());
    eventually("pods marked", Duration::from_secs(15), || {
        b_pods_have_one_event(&cluster)
    })
    .await;
    let note = cluster.events_about("Pod", "b-0").await[0]
        .note
        .clone()
        .unwrap_or_default();
    assert!(note.len() <= 1024, "{}", note.len());

    // b-0 replaced behind the controller's back, in a later second than the panic's
    // (creation times have whole seconds): the real server answers the controller's delete
    // with the 409 of the failed UID precondition, if its cache has not seen the new pod.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let pods: Api<Pod> = Api::namespaced(cluster.admin.clone(), "team");
    pods.delete("b-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually("the old b-0 gone", Duration::from_secs(10), || async {
        cluster.pod("b-0").await.is_none()
    })
    .await;
    let replaced = create_running_pod(&cluster.admin, "team", "b-0", "node-b")
        .await
        .unwrap();
    // And b-1 replaced where the controller's cache cannot see it: its pod watch dropped and
    // every new list or watch of pods failing. Its delete names the old UID: the real server
    // answers with the 409 of a failed precondition.
    let faults = cluster.proxy.faults();
    faults.fail_next(Matcher::any().verb("list").resource("pods"), 100_000, 500);
    faults.fail_next(Matcher::any().verb("watch").resource("pods"), 100_000, 500);
    faults.drop_watches();
    tokio::time::sleep(Duration::from_millis(300)).await;
    pods.delete("b-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually("the old b-1 gone", Duration::from_secs(10), || async {
        cluster.pod("b-1").await.is_none()
    })
    .await;
    let unseen = create_running_pod(&cluster.admin, "team", "b-1", "node-b")
        .await
        .unwrap();
    // The node lifecycle controller's verdict.
    let unknown = json!({ "status": { "conditions": [{
        "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
        "message": "Kubelet stopped posting node status.",
    }]}});
    Api::<Node>::all(cluster.admin.clone())
        .patch_status("node-b", &PatchParams::default(), &Patch::Merge(unknown))
        .await
        .unwrap();
    eventually("node-b deleted", Duration::from_secs(20), || async {
        cluster.node("node-b").await.is_none()
    })
    .await;
    for (name, new) in [("b-0", &replaced), ("b-1", &unseen)] {
        let pod = cluster
            .pod(name)
            .await
            .unwrap_or_else(|| panic!("the new {name} is still there"));
        assert_eq!(pod.metadata.uid, new.metadata.uid);
        assert!(
            !pod.annotations()
                .contains_key("lastgasp.io/termination-reason")
        );
    }
    assert!(cluster.pod("b-2").await.is_none(), "b-2 deleted");
    let b1_deletes: Vec<_> = writes_to(&cluster.proxy, "/pods/b-1")
        .into_iter()
        .filter(|write| write.starts_with("DELETE"))
        .collect();
    assert_eq!(b1_deletes.len(), 1, "{b1_deletes:?}");
    assert!(b1_deletes[0].ends_with(" 409"), "{b1_deletes:?}");
    let injected_deletes = cluster
        .proxy
        .requests()
        .iter()
        .filter(|request| request.verb.as_deref() == Some("delete") && request.injected)
        .count();
    assert_eq!(injected_deletes, 0, "the 409 is the real server's");
    let metrics = scrape(controller.metrics_addr()).await;
    assert_eq!(
        metric(&metrics, "lastgasp_controller_write_retries_total"),
        0,
        "a 409 is not retried"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_controller_finishes_the_job_without_duplicates() {
    let cluster = Cluster::start().await;
    // The first controller can mark but not delete.
    cluster
        .proxy
        .faults()
        .fail_next(Matcher::any().verb("delete").resource("pods"), 10_000, 500);
    let first = cluster.controller(|_| {}).await;
    send_from("127.0.0.2", &report("node-b", 1), first.report_addr());
    eventually(
        "pods marked by the first controller",
        Duration::from_secs(15),
        || b_pods_have_one_event(&cluster),
    )
    .await;
    first.shutdown();
    cluster.proxy.faults().clear();

    let second = cluster.controller(|_| {}).await;
    eventually(
        "the second controller finishes",
        Duration::from_secs(30),
        || async { cluster.node("node-b").await.is_none() },
    )
    .await;
    assert!(b_pods_gone(&cluster).await);
    assert!(
        b_pods_have_one_event(&cluster).await,
        "no duplicate Event on the pods"
    );
    assert_eq!(cluster.events_about("Node", "node-b").await.len(), 1);
    drop(second);
}

/// Writes (anything but reads) that reached the server through the proxy, to objects whose
/// path contains `fragment`.
fn writes_to(proxy: &FaultProxy, fragment: &str) -> Vec<String> {
    proxy
        .requests()
        .into_iter()
        .filter(|request| request.method != "GET" && request.uri.contains(fragment))
        .map(|request| format!("{} {} {}", request.method, request.uri, request.status))
        .collect()
}

/// Renews `node`'s heartbeat Lease in `kube-node-lease` every 200 ms, as its kubelet would,
/// until dropped.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    async fn start(client: &Client, node: &'static str) -> Self {
        use k8s_openapi::api::coordination::v1::Lease;
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        let now = || {
            jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string()
        };
        let lease = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": node, "namespace": "kube-node-lease" },
            "spec": { "holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now() },
        }))
        .unwrap();
        leases.create(&PostParams::default(), &lease).await.unwrap();
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

/// Netconsole is not authenticated: by default its text marks at once and deletes only once
/// the controller sees the node's heartbeat Lease stop.
#[tokio::test(flavor = "multi_thread")]
async fn netconsole_evidence_marks_and_deletes_only_once_the_heartbeat_stops() {
    let cluster = Cluster::start().await;
    let heartbeat = Heartbeat::start(&cluster.admin, "node-b").await;
    let controller = cluster
        .controller(|config| {
            config.policy = Policy::DeletePods;
            config.node_dead_after = Duration::from_secs(2);
        })
        .await;
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    eventually("pods marked", Duration::from_secs(15), || {
        b_pods_have_one_event(&cluster)
    })
    .await;
    eventually(
        "the crash named on node-b's pods",
        Duration::from_secs(15),
        || async {
            let mut named = true;
            for pod in ["b-0", "b-1", "b-2"] {
                let pod = cluster.pod(pod).await.unwrap();
                named &= pod
                    .annotations()
                    .get("lastgasp.io/crash-culprit")
                    .is_some_and(|culprit| culprit == "sysrq_handle_crash");
            }
            named
        },
    )
    .await;
    let node = cluster.node("node-b").await.unwrap();
    assert_eq!(
        node.annotations()
            .get("lastgasp.io/crash-culprit")
            .map(String::as_str),
        Some("sysrq_handle_crash")
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    for pod in ["b-0", "b-1", "b-2"] {
        assert!(
            cluster.pod(pod).await.is_some(),
            "{pod} kept while node-b's heartbeat goes on"
        );
    }
    let marks = writes_to(&cluster.proxy, "/pods/b-0").len();
    drop(heartbeat);
    let stopped = Instant::now();
    eventually(
        "pods deleted once the heartbeat stopped",
        Duration::from_secs(15),
        || b_pods_gone(&cluster),
    )
    .await;
    let waited = stopped.elapsed();
    println!("heartbeat stopped to pods deleted: {waited:?}");
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    // Marked once while waiting, then deleted: one more write, the delete.
    let writes = writes_to(&cluster.proxy, "/pods/b-0");
    assert_eq!(writes.len(), marks + 1, "{writes:?}");
    assert!(writes.last().unwrap().starts_with("DELETE"), "{writes:?}");
    for pod in ["b-0", "b-1", "b-2"] {
        assert_eq!(cluster.events_about("Pod", pod).await.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_writes() {
    use lastgasp::controller::leader::{LeaderConfig, LeaderElection};
    let cluster = Cluster::start().await;
    let mut replicas = Vec::new();
    for identity in ["replica-1", "replica-2"] {
        let election = LeaderElection::start(
            cluster
                .proxy
                .client_as("lastgasp-system", "lastgasp-controller")
                .await
                .unwrap(),
            LeaderConfig {
                namespace: "lastgasp-system".into(),
                lease_name: "lastgasp-controller".into(),
                identity: identity.into(),
                lease_duration: Duration::from_secs(2),
                renew_interval: Duration::from_millis(300),
                retry_interval: Duration::from_millis(100),
            },
        );
        let leader = election.is_leader();
        let controller = cluster
            .controller(|config| {
                config.policy = Policy::Annotate;
                config.leader = Some(leader);
                config.reporter = kube::runtime::events::Reporter {
                    controller: "lastgasp-controller".into(),
                    instance: Some(identity.into()),
                };
            })
            .await;
        replicas.push((identity, election, controller));
    }
    wait_for("a leader", Duration::from_secs(10), || {
        replicas
            .iter()
            .any(|(_, election, _)| *election.is_leader().borrow())
    })
    .await;
    let leader = replicas
        .iter()
        .find(|(_, election, _)| *election.is_leader().borrow())
        .map(|(identity, _, _)| *identity)
        .unwrap();
    // Datagrams may reach any replica: send the report to both.
    let report = report("node-b", 1);
    for (_, _, controller) in &replicas {
        send_from("127.0.0.2", &report, controller.report_addr());
    }
    eventually("pods marked", Duration::from_secs(15), || {
        b_pods_have_one_event(&cluster)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for pod in ["b-0", "b-1", "b-2"] {
        let events = cluster.events_about("Pod", pod).await;
        assert_eq!(events.len(), 1, "one Event on {pod}");
        assert_eq!(
            events[0].reporting_instance.as_deref(),
            Some(leader),
            "written by the leader"
        );
    }
    for (_, election, _) in replicas {
        election.stop().await;
    }
}

/// The agent's delayed report after the node's reboot: the pstore record of a panic at
/// `panicked_at` in boot `boot-1`, sent from the new boot `boot-2`.
fn pstore_report(node: &str, seq: u64, panicked_at: Option<jiff::Timestamp>) -> Report {
    Report {
        node: node.into(),
        boot_id: "boot-2".into(),
        seq,
        sent_at_ms: now_ms(),
        kind: ReportKind::KernelPanic,
        source: ReportSource::Pstore,
        message: PANIC.into(),
        context: [
            "sysrq: Trigger a crash",
            PANIC,
            "CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0-57-cloud-amd64 #1  Debian 6.1.192-3",
            "Call Trace:",
            " <TASK>",
            " dump_stack_lvl+0x44/0x5c",
            " panic+0x118/0x2ed",
            " sysrq_handle_crash+0x16/0x20",
            " __handle_sysrq.cold+0x43/0x11b",
            " write_sysrq_trigger+0x24/0x40",
            " proc_reg_write+0x55/0xa0",
            " vfs_write+0xc4/0x3f0",
            " ksys_write+0x5f/0xe0",
            " do_syscall_64+0x58/0xc0",
            " </TASK>",
        ]
        .map(str::to_owned)
        .to_vec(),
        kernel_release: None,
        event_at_ms: panicked_at.map(|at| at.as_millisecond() as u64),
        event_boot_id: Some("boot-1".into()),
        frames: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pstore_report_marks_the_node_and_the_pods_that_were_there_and_deletes_nothing() {
    let cluster = Cluster::start().await;
    let panicked_at = jiff::Timestamp::now();
    // The node rebooted and took a new pod before its agent reported; more than a second
    // later, as creation times have whole seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    create_running_pod(&cluster.admin, "team", "b-late", "node-b")
        .await
        .unwrap();
    let controller = cluster.controller(|_| {}).await;
    let to = controller.report_addr();

    // Reports that cannot be acted on: no panic time, a panic two days ago.
    send_from("127.0.0.2", &pstore_report("node-b", 1, None), to);
    let two_days = jiff::SignedDuration::from_hours(48);
    send_from(
        "127.0.0.2",
        &pstore_report("node-b", 2, Some(panicked_at - two_days)),
        to,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        writes_to(&cluster.proxy, "/").is_empty(),
        "{:?}",
        writes_to(&cluster.proxy, "/")
    );

    // The agent sends its report several times.
    for seq in 3..6 {
        send_from(
            "127.0.0.2",
            &pstore_report("node-b", seq, Some(panicked_at)),
            to,
        );
    }
    let marked = |pod: Pod| {
        let annotations = pod.annotations();
        annotations
            .get("lastgasp.io/termination-source")
            .is_some_and(|source| source == "pstore")
            && pod
                .status
                .and_then(|status| status.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "DisruptionTarget"))
    };
    eventually(
        "node-b's pods marked from pstore",
        Duration::from_secs(15),
        || async {
            let mut all = b_pods_have_one_event(&cluster).await;
            for pod in ["b-0", "b-1", "b-2"] {
                all &= cluster.pod(pod).await.is_some_and(marked);
            }
            all
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let panic_time = panicked_at.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    for pod in ["b-0", "b-1", "b-2"] {
        let pod = cluster.pod(pod).await.unwrap();
        assert_eq!(
            pod.annotations()
                .get("lastgasp.io/termination-time")
                .map(String::as_str),
            Some(panic_time.as_str()),
            "the termination time is the panic's"
        );
    }
    assert!(b_pods_have_one_event(&cluster).await);
    let node = cluster.node("node-b").await.unwrap();
    assert_eq!(
        node.annotations()
            .get("lastgasp.io/termination-source")
            .map(String::as_str),
        Some("pstore")
    );
    assert_eq!(cluster.events_about("Node", "node-b").await.len(), 1);
    let record: serde_json::Value =
        serde_json::from_str(&node.annotations()["lastgasp.io/incident-record"]).unwrap();
    assert_eq!(
        record["plan"],
        json!({"delete_pods": false, "delete_node": false})
    );
    assert_eq!(record["record"]["sources"], json!(["pstore"]));

    // Created after the panic, or on another node: untouched. Nothing deleted.
    assert!(writes_to(&cluster.proxy, "/pods/b-late").is_empty());
    assert!(cluster.events_about("Pod", "b-late").await.is_empty());
    assert!(writes_to(&cluster.proxy, "/pods/a-").is_empty());
    let deletes: Vec<_> = writes_to(&cluster.proxy, "/")
        .into_iter()
        .filter(|write| write.starts_with("DELETE"))
        .collect();
    assert!(deletes.is_empty(), "{deletes:?}");
    assert!(cluster.pod("b-0").await.is_some());
    assert!(cluster.node("node-b").await.is_some());
}

/// Watches the proxy ends (a load balancer's idle timeout, a server restart) are resumed: a
/// pod created after the drop is known to the controller and acted on with the others.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_watches_are_resumed() {
    let cluster = Cluster::start().await;
    let controller = cluster
        .controller(|config| config.policy = Policy::DeletePods)
        .await;
    // Let the controller's watches open, then end them all.
    eventually(
        "the controller's watches",
        Duration::from_secs(10),
        || async {
            let watches = cluster
                .proxy
                .requests()
                .iter()
                .filter(|request| request.verb.as_deref() == Some("watch"))
                .count();
            watches >= 2
        },
    )
    .await;
    let before = cluster.proxy.requests().len();
    cluster.proxy.faults().drop_watches();
    create_running_pod(&cluster.admin, "team", "b-3", "node-b")
        .await
        .unwrap();
    eventually("the watches resumed", Duration::from_secs(15), || async {
        cluster.proxy.requests()[before..]
            .iter()
            .filter(|request| request.verb.as_deref() == Some("watch"))
            .count()
            >= 2
    })
    .await;
    send_from("127.0.0.2", &report("node-b", 1), controller.report_addr());
    eventually(
        "node-b's pods deleted, b-3 too",
        Duration::from_secs(20),
        || async { b_pods_gone(&cluster).await && cluster.pod("b-3").await.is_none() },
    )
    .await;
    assert_eq!(cluster.events_about("Pod", "b-3").await.len(), 1);
    for pod in ["a-0", "a-1"] {
        assert!(cluster.pod(pod).await.is_some());
    }
}
