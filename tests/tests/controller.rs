//! The controller against the real kube-apiserver v1.20.2, as its own ServiceAccount under
//! `deploy/`'s RBAC, through a [`FaultProxy`] that logs every call and injects API errors,
//! latency and dropped watches. It is fed real netconsole captures and real last-gasp datagrams
//! over UDP on loopback: node B's InternalIP is 127.0.0.2 and node A's 127.0.0.3, so
//! datagrams sent from those addresses come "from" them.
//!
//! Covered: what each kind of evidence (netconsole text, the agent's probe and console
//! reports, pstore records after a reboot) marks and deletes, and when; one incident from
//! several channels and replicas, without duplicate Events; what writes nothing (strangers,
//! forgeries, replays, reports from the wrong place, time or boot, dry run); the circuit
//! breaker; a flood from one node; retried API errors, a replaced pod's real UID-precondition
//! conflict, concurrent pod writes, a restarted controller, leader election and lost
//! leadership, dropped watches. Whatever the real server's admission, validation or
//! authorizer refuses fails here. Test reads and seeding go to the server as admin.
//!
//! Needs the binaries of `cargo xtask kube`.
//!
//! [`FaultProxy`]: lastgasp_tests::kube::proxy::FaultProxy

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Pod},
    events::v1::Event,
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
    runtime::watcher,
};
use lastgasp::{
    controller::{Controller, ControllerConfig, policy::Policy, trust::DeletionEvidence},
    wire::{self, AuthKey, Report, ReportKind, ReportSource},
};
use lastgasp_tests::{
    faults::Matcher,
    fixtures::{annotation, controller_config, now_ms, replay_sysrq_capture, wait_for},
    kube::cluster::{Cluster, Heartbeat, eventually},
    scrape, scrape_until,
};
use serde_json::{Value, json};

const PANIC: &str = "Kernel panic - not syncing: sysrq triggered crash";
/// What node-b's pods read: the crash title from the capture's call trace (or the agent's
/// stack at `panic()`), then where it happened.
const REASON_B: &str = "kernel panic: sysrq triggered crash in sysrq_handle_crash on node node-b";
const KEY: &[u8] = b"controller-test-key";
const B_PODS: [&str; 3] = ["b-0", "b-1", "b-2"];

/// A cluster with node-b (127.0.0.2) and node-a (127.0.0.3), both on boot `boot-1`, and
/// pods b-0..b-2 and a-0, a-1 in `team`.
async fn seeded() -> Cluster {
    let cluster = Cluster::start().await;
    cluster.namespace("team").await;
    cluster.node("node-a", "127.0.0.3", Some("boot-1")).await;
    cluster.node("node-b", "127.0.0.2", Some("boot-1")).await;
    for (pod, node) in [
        ("b-0", "node-b"),
        ("b-1", "node-b"),
        ("b-2", "node-b"),
        ("a-0", "node-a"),
        ("a-1", "node-a"),
    ] {
        cluster.pod("team", pod, node).await;
    }
    cluster
}

/// A controller as its ServiceAccount, through the proxy, with the shipped trust defaults,
/// `KEY`, and `configure`'s changes.
async fn start(cluster: &Cluster, configure: impl FnOnce(&mut ControllerConfig)) -> Controller {
    let mut config =
        controller_config(Policy::DeletePodsAndNode, AuthKey::HmacSha256(KEY.to_vec()));
    configure(&mut config);
    Controller::start(cluster.client_as("lastgasp-controller").await, config)
        .await
        .unwrap()
}

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

/// The agent's last gasp from its `panic()` kprobe, signed, sent now, for boot `boot-1`.
fn report(node: &str, seq: u64) -> Vec<u8> {
    wire::encode(
        &Report {
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
        },
        &AuthKey::HmacSha256(KEY.to_vec()),
    )
    .unwrap()
}

/// The agent's delayed report after the node's reboot: the pstore record of a panic at
/// `panicked_at` in boot `boot-1`, sent from the new boot `boot-2`.
fn pstore_report(node: &str, seq: u64, panicked_at: Option<jiff::Timestamp>) -> Vec<u8> {
    wire::encode(
        &Report {
            node: node.into(),
            boot_id: "boot-2".into(),
            seq,
            sent_at_ms: now_ms(),
            kind: ReportKind::KernelPanic,
            source: ReportSource::Pstore,
            message: PANIC.into(),
            // The record's last lines, as the kernel wrote them to pstore.
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
            // The crashed boot, from the agent's state directory: the one the Node still shows.
            event_boot_id: Some("boot-1".into()),
            frames: Vec::new(),
        },
        &AuthKey::HmacSha256(KEY.to_vec()),
    )
    .unwrap()
}

/// A signed report as the agent would send it, with every field the trust checks look at.
fn signed_report(
    node: &str,
    boot_id: &str,
    seq: u64,
    sent_at_ms: u64,
    source: ReportSource,
) -> Vec<u8> {
    wire::encode(
        &Report {
            node: node.into(),
            boot_id: boot_id.into(),
            seq,
            sent_at_ms,
            kind: ReportKind::KernelPanic,
            source,
            message: PANIC.into(),
            context: Vec::new(),
            kernel_release: None,
            event_at_ms: None,
            event_boot_id: None,
            frames: Vec::new(),
        },
        &AuthKey::HmacSha256(KEY.to_vec()),
    )
    .unwrap()
}

/// Sends a report from the address of the node it names, as that node's agent would (a
/// datagram that does not decode claims node-b).
fn send_report(datagram: &[u8], to: SocketAddr) {
    let node = [AuthKey::HmacSha256(KEY.to_vec()), AuthKey::None]
        .iter()
        .find_map(|key| wire::decode(datagram, key).ok())
        .map_or_else(|| "node-b".to_owned(), |report| report.node);
    let from = if node == "node-a" {
        "127.0.0.3"
    } else {
        "127.0.0.2"
    };
    send_from(from, datagram, to);
}

fn send_from(ip: &str, datagram: &[u8], to: SocketAddr) {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .send_to(datagram, to)
        .unwrap();
}

async fn pod(cluster: &Cluster, name: &str) -> Option<Value> {
    cluster.get("pods", Some("team"), name).await
}

async fn node(cluster: &Cluster, name: &str) -> Option<Value> {
    cluster.get("nodes", None, name).await
}

async fn all_gone(cluster: &Cluster, pods: &[&str]) -> bool {
    for name in pods {
        if pod(cluster, name).await.is_some() {
            return false;
        }
    }
    true
}

async fn all_present(cluster: &Cluster, pods: &[&str]) -> bool {
    for name in pods {
        if pod(cluster, name).await.is_none() {
            return false;
        }
    }
    true
}

/// Whether each of `pods` has exactly `count` Events about it.
async fn events_on_each(cluster: &Cluster, pods: &[&str], count: usize) -> bool {
    for name in pods {
        if cluster.events_about("Pod", name).await.len() != count {
            return false;
        }
    }
    true
}

/// Writes (anything but reads) that reached the proxy: the controller's, and only theirs,
/// as tests write straight to the server.
fn writes(cluster: &Cluster) -> usize {
    cluster
        .proxy()
        .requests()
        .into_iter()
        .filter(|request| request.method != "GET")
        .count()
}

/// The node's `lastgasp.io/incident-record`.
fn incident_record(node: &Value) -> Value {
    serde_json::from_str(annotation(node, "lastgasp.io/incident-record").unwrap()).unwrap()
}

fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
        .parse()
        .unwrap()
}

/// Everything the controller writes on a pod for an incident: reason, source, condition, one Event.
async fn pod_marked(cluster: &Cluster, name: &str, source: &str) -> bool {
    pod(cluster, name).await.is_some_and(|pod| {
        annotation(&pod, "lastgasp.io/termination-reason") == Some(REASON_B)
            && annotation(&pod, "lastgasp.io/termination-source") == Some(source)
            && pod["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "DisruptionTarget"))
    }) && cluster.events_about("Pod", name).await.len() == 1
}

async fn b_pods_marked(cluster: &Cluster, source: &str) -> bool {
    for name in B_PODS {
        if !pod_marked(cluster, name, source).await {
            return false;
        }
    }
    true
}

/// Watches pods and nodes (as admin, straight to the server) from before the controller acts,
/// to see their last state on deletion.
struct LastStates {
    deleted: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LastStates {
    async fn start(cluster: &Cluster) -> Self {
        let client = cluster.admin().clone();
        let deleted = Arc::new(Mutex::new(Vec::new()));
        let listed = Arc::new(AtomicUsize::new(0));
        let pods = deletions(Api::<Pod>::all(client.clone()), listed.clone());
        let nodes = deletions(Api::<Node>::all(client), listed.clone());
        let sink = deleted.clone();
        let task = tokio::spawn(async move {
            let mut both = std::pin::pin!(futures::stream::select(pods, nodes));
            while let Some(object) = both.next().await {
                sink.lock().unwrap().push(object);
            }
        });
        wait_for("the watches' first lists", Duration::from_secs(10), || {
            listed.load(Ordering::SeqCst) >= 2
        })
        .await;
        Self { deleted, task }
    }

    fn last_state(&self, name: &str) -> Value {
        self.deleted
            .lock()
            .unwrap()
            .iter()
            .find(|object| object["metadata"]["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no deletion of {name} was seen"))
    }
}

impl Drop for LastStates {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The objects `api`'s watch sees deleted, in their last state; counts each complete list
/// of it in `listed`.
fn deletions<K>(api: Api<K>, listed: Arc<AtomicUsize>) -> impl futures::Stream<Item = Value>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize,
    K: std::fmt::Debug + Send + 'static,
{
    watcher(api, watcher::Config::default()).filter_map(move |event| {
        let listed = listed.clone();
        async move {
            match event {
                Ok(watcher::Event::Delete(object)) => Some(serde_json::to_value(object).unwrap()),
                Ok(watcher::Event::InitDone) => {
                    listed.fetch_add(1, Ordering::SeqCst);
                    None
                }
                _ => None,
            }
        }
    })
}

/// With `--deletion-evidence any` (the opt-in Titus behaviour), netconsole text deletes at once.
#[tokio::test(flavor = "multi_thread")]
async fn with_any_evidence_a_netconsole_panic_marks_and_deletes_the_node_and_its_pods_only() {
    let cluster = seeded().await;
    let watch = LastStates::start(&cluster).await;
    let controller = start(&cluster, |config| {
        config.policy = Policy::DeletePodsAndNode;
        config.deletion_evidence = DeletionEvidence::Any;
    })
    .await;

    // What an agent sends to resolve its netconsole next hop: not a parse error.
    send_from("127.0.0.2", &[], controller.netconsole_addr());
    let sent = Instant::now();
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    eventually("node-b deleted", Duration::from_secs(15), || async {
        node(&cluster, "node-b").await.is_none()
    })
    .await;
    println!("replay start to node deleted: {:?}", sent.elapsed());
    wait_for("the watch to see node-b go", Duration::from_secs(5), || {
        watch.deleted.lock().unwrap().len() >= 4
    })
    .await;

    // Deleting at once, the pods may go with the title of the lines up to the panic line
    // (sysrq's call trace, which names the culprit, follows it).
    let early_reason = |reason: Option<&str>| {
        reason.is_some_and(|reason| {
            reason.starts_with("kernel panic: sysrq triggered crash")
                && reason.ends_with(" on node node-b")
        })
    };
    for name in B_PODS {
        assert!(pod(&cluster, name).await.is_none(), "{name} deleted");
        let last = watch.last_state(name);
        let reason = annotation(&last, "lastgasp.io/termination-reason");
        assert!(early_reason(reason), "{reason:?}");
        assert_eq!(
            annotation(&last, "lastgasp.io/termination-reason-code"),
            Some("KernelPanic")
        );
        assert_eq!(
            annotation(&last, "lastgasp.io/termination-source"),
            Some("netconsole")
        );
        assert!(annotation(&last, "lastgasp.io/termination-time").is_some());
        let conditions = last["status"]["conditions"].as_array().unwrap();
        let disruption = conditions
            .iter()
            .find(|c| c["type"] == "DisruptionTarget")
            .expect("DisruptionTarget, written before the deletion");
        assert_eq!(disruption["status"], "True");
        assert_eq!(disruption["reason"], "NodeKernelPanic");
        assert!(
            conditions.iter().any(|c| c["type"] == "Ready"),
            "kubelet's own conditions are untouched"
        );
        let events = cluster.events_about("Pod", name).await;
        assert_eq!(events.len(), 1, "one Event on {name}");
        assert_eq!(events[0].metadata.namespace.as_deref(), Some("team"));
        assert_eq!(events[0].type_.as_deref(), Some("Warning"));
        assert_eq!(events[0].reason.as_deref(), Some("NodeKernelPanic"));
        assert!(
            early_reason(events[0].note.as_deref()),
            "{:?}",
            events[0].note
        );
        // Annotations are written before the deletion.
        let writes = cluster.writes_to(&format!("/pods/{name}"));
        let annotated = writes.iter().position(|w| w.starts_with("PATCH")).unwrap();
        let deleted = writes.iter().position(|w| w.starts_with("DELETE")).unwrap();
        assert!(annotated < deleted, "{writes:?}");
    }
    let last = watch.last_state("node-b");
    let reason = annotation(&last, "lastgasp.io/termination-reason");
    assert!(early_reason(reason), "{reason:?}");
    let node_events = cluster.events_about("Node", "node-b").await;
    assert_eq!(node_events.len(), 1, "{node_events:?}");
    // A v1.20 server takes an Event about a cluster-scoped object only in `kube-system`.
    assert_eq!(
        node_events[0].metadata.namespace.as_deref(),
        Some("kube-system")
    );
    assert_eq!(node_events[0].action.as_deref(), Some("MarkedForDeletion"));

    for name in ["a-0", "a-1"] {
        let untouched = pod(&cluster, name).await.unwrap();
        assert!(annotation(&untouched, "lastgasp.io/termination-reason").is_none());
        assert!(cluster.writes_to(&format!("/pods/{name}")).is_empty());
    }
    assert!(node(&cluster, "node-a").await.is_some());
    assert!(cluster.events_about("Node", "node-a").await.is_empty());

    // A deletion is counted once the API server has answered it: wait for the count.
    let metrics = scrape_until(
        controller.metrics_addr(),
        &[
            r#"lastgasp_controller_incidents_total{kind="panic",source="netconsole"} 1"#,
            r#"lastgasp_controller_deleted_objects_total{object="pod"} 3"#,
            r#"lastgasp_controller_deleted_objects_total{object="node"} 1"#,
        ],
    )
    .await;
    // Written again when the complete report named the culprit: one or two runs.
    assert!(metrics.contains("lastgasp_controller_incident_last_write_seconds_count "));
    assert!(
        !metrics.contains(r#"dropped_total{channel="netconsole",reason="unparsable"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_report_acts_too_and_both_channels_make_one_incident() {
    let cluster = seeded().await;
    let controller = start(&cluster, |config| config.policy = Policy::Annotate).await;

    send_report(&report("node-b", 1), controller.report_addr());
    eventually(
        "pods marked from the agent report",
        Duration::from_secs(10),
        || async {
            pod(&cluster, "b-2").await.is_some_and(|pod| {
                annotation(&pod, "lastgasp.io/termination-reason") == Some(REASON_B)
            })
        },
    )
    .await;
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    eventually(
        "netconsole merged into the incident",
        Duration::from_secs(10),
        || async {
            let mut merged = true;
            for name in B_PODS {
                let pod = pod(&cluster, name).await.unwrap();
                merged &=
                    annotation(&pod, "lastgasp.io/termination-source") == Some("agent,netconsole");
            }
            merged
        },
    )
    .await;
    // Let any late duplicate writes land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for name in B_PODS {
        let pod = pod(&cluster, name).await.unwrap();
        let conditions = pod["status"]["conditions"].as_array().unwrap();
        assert_eq!(
            conditions
                .iter()
                .filter(|c| c["type"] == "DisruptionTarget")
                .count(),
            1
        );
        assert_eq!(
            cluster.events_about("Pod", name).await.len(),
            1,
            "one Event on {name}"
        );
    }
    let record = incident_record(&node(&cluster, "node-b").await.unwrap());
    assert_eq!(record["record"]["sources"], json!(["agent", "netconsole"]));
    assert_eq!(record["record"]["boot_id"], "boot-1");
    assert_eq!(cluster.events_about("Node", "node-b").await.len(), 1);
    assert!(cluster.writes_to("/pods/a-").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn strangers_bad_macs_and_replays_write_nothing() {
    let cluster = seeded().await;
    let controller = start(&cluster, |config| config.policy = Policy::Annotate).await;

    // 127.0.0.9 is no node's address.
    replay_sysrq_capture("127.0.0.9", controller.netconsole_addr());
    let mut forged = report("node-b", 1);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    send_report(&forged, controller.report_addr());
    let unsigned = wire::encode(
        &wire::decode(&report("node-b", 2), &AuthKey::HmacSha256(KEY.to_vec())).unwrap(),
        &AuthKey::None,
    )
    .unwrap();
    send_report(&unsigned, controller.report_addr());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        writes(&cluster),
        0,
        "nothing written for strangers and forgeries"
    );

    let genuine = report("node-b", 10);
    send_report(&genuine, controller.report_addr());
    eventually(
        "the genuine report acted on",
        Duration::from_secs(10),
        || async { !cluster.events_about("Pod", "b-2").await.is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_genuine = writes(&cluster);
    send_report(&genuine, controller.report_addr());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        writes(&cluster),
        after_genuine,
        "a replayed report writes nothing"
    );

    scrape_until(
        controller.metrics_addr(),
        &[
            r#"lastgasp_controller_datagrams_dropped_total{channel="netconsole",reason="unknown_sender"}"#,
            r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="bad_mac"} 1"#,
            r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="auth_scheme_mismatch"} 1"#,
            r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="replay"} 1"#,
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_from_one_node_does_not_delay_a_panic_from_another() {
    let cluster = seeded().await;
    let controller = start(&cluster, |config| config.policy = Policy::DeletePods).await;
    let target = controller.netconsole_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = stop.clone();
    let flood = std::thread::spawn(move || {
        let socket = UdpSocket::bind(("127.0.0.3", 0)).unwrap();
        let mut sent = 0u64;
        // About 50,000 datagrams a second, far more than a kernel console can print.
        while !flooding.load(Ordering::Relaxed) && sent < 200_000 {
            let line = format!("[ 1.{sent:06}] eth0: link flapping, message {sent}\n");
            let _ = socket.send_to(line.as_bytes(), target);
            sent += 1;
            if sent.is_multiple_of(50) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    replay_sysrq_capture("127.0.0.2", target);
    // Netconsole evidence marks at once (deleting waits for the node to be seen dead).
    eventually(
        "node-b's pods marked during the flood",
        Duration::from_secs(15),
        || events_on_each(&cluster, &B_PODS, 1),
    )
    .await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let flooded = flood.join().unwrap();
    println!("panic acted on in {took:?} while node-a flooded {flooded} datagrams");
    assert!(
        flooded > 1000,
        "the flood ran alongside ({flooded} datagrams)"
    );
    assert!(pod(&cluster, "a-0").await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn api_errors_are_retried_until_done() {
    let cluster = seeded().await;
    let faults = cluster.proxy().faults();
    faults.fail_next(Matcher::any().verb("patch").resource("pods"), 4, 500);
    faults.fail_next(Matcher::any().verb("delete").resource("pods"), 2, 503);
    let controller = start(&cluster, |config| config.policy = Policy::DeletePods).await;
    send_report(&report("node-b", 1), controller.report_addr());
    eventually(
        "pods deleted despite errors",
        Duration::from_secs(30),
        || all_gone(&cluster, &B_PODS),
    )
    .await;
    assert_eq!(faults.injected(), 6, "every injected fault was hit");
    assert!(
        events_on_each(&cluster, &B_PODS, 1).await,
        "one Event per pod"
    );
    let metrics = scrape(controller.metrics_addr()).await;
    let retries = metric(&metrics, "lastgasp_controller_write_retries_total");
    // kube's client retries a 503 itself (its default retry policy) before the controller
    // sees it: only the 500s are sure to be the controller's retries.
    assert!(retries >= 4, "{retries} retries");
    assert!(
        node(&cluster, "node-b").await.is_some(),
        "DeletePods keeps the node"
    );
    assert!(all_present(&cluster, &["a-0", "a-1"]).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_breaker_caps_nodes_acted_on() {
    let cluster = seeded().await;
    let controller = start(&cluster, |config| {
        config.policy = Policy::DeletePodsAndNode;
        config.breaker_max_nodes = 1;
    })
    .await;
    send_report(&report("node-b", 1), controller.report_addr());
    eventually("node-b deleted", Duration::from_secs(10), || async {
        node(&cluster, "node-b").await.is_none()
    })
    .await;
    send_report(&report("node-a", 1), controller.report_addr());
    eventually("node-a marked", Duration::from_secs(10), || async {
        let mut marked = true;
        for name in ["a-0", "a-1"] {
            marked &= pod(&cluster, name)
                .await
                .is_some_and(|pod| annotation(&pod, "lastgasp.io/termination-reason").is_some());
        }
        marked
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(node(&cluster, "node-a").await.is_some());
    assert!(all_present(&cluster, &["a-0", "a-1"]).await);
    assert!(
        !cluster
            .writes_to("/pods/a-")
            .iter()
            .any(|write| write.starts_with("DELETE")),
        "{:?}",
        cluster.writes_to("/pods/a-")
    );
    let metrics = scrape(controller.metrics_addr()).await;
    assert!(metrics.contains("lastgasp_controller_circuit_breaker_open 1"));
    assert!(metrics.contains("lastgasp_controller_circuit_breaker_held_back_total 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_controller_finishes_the_job_without_duplicates() {
    let cluster = seeded().await;
    // The first controller can mark but not delete.
    cluster
        .proxy()
        .faults()
        .fail_next(Matcher::any().verb("delete").resource("pods"), 10_000, 500);
    let first = start(&cluster, |_| {}).await;
    send_report(&report("node-b", 1), first.report_addr());
    eventually(
        "pods marked by the first controller",
        Duration::from_secs(15),
        || events_on_each(&cluster, &B_PODS, 1),
    )
    .await;
    first.shutdown();
    cluster.proxy().faults().clear();

    let second = start(&cluster, |_| {}).await;
    eventually(
        "the second controller finishes",
        Duration::from_secs(30),
        || async { node(&cluster, "node-b").await.is_none() },
    )
    .await;
    assert!(all_gone(&cluster, &B_PODS).await);
    assert!(
        events_on_each(&cluster, &B_PODS, 1).await,
        "no duplicate Event on the pods"
    );
    assert_eq!(cluster.events_about("Node", "node-b").await.len(), 1);
    drop(second);
}

/// Netconsole is not authenticated: a host that spoofs node-b's address can send it. By
/// default it marks at once and deletes only once the controller sees node-b's heartbeat stop.
#[tokio::test(flavor = "multi_thread")]
async fn netconsole_evidence_marks_and_deletes_only_once_the_heartbeat_stops() {
    let cluster = seeded().await;
    let heartbeat = Heartbeat::start(&cluster, "node-b").await;
    let controller = start(&cluster, |config| {
        config.policy = Policy::DeletePods;
        config.node_dead_after = Duration::from_secs(2);
    })
    .await;
    let sent = Instant::now();
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    eventually("pods marked", Duration::from_secs(15), || {
        events_on_each(&cluster, &B_PODS, 1)
    })
    .await;
    println!("netconsole replay to pods marked: {:?}", sent.elapsed());
    // Titled from the capture's lines: the call trace after the panic line names the culprit.
    eventually(
        "the crash named on node-b and its pods",
        Duration::from_secs(15),
        || async {
            let mut objects = vec![node(&cluster, "node-b").await.unwrap()];
            for name in B_PODS {
                objects.push(pod(&cluster, name).await.unwrap());
            }
            objects.iter().all(|object| {
                annotation(object, "lastgasp.io/crash-culprit") == Some("sysrq_handle_crash")
            })
        },
    )
    .await;
    // The condition is written after the annotations: let the last pod's land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for object in [
        node(&cluster, "node-b").await.unwrap(),
        pod(&cluster, "b-1").await.unwrap(),
    ] {
        assert_eq!(
            annotation(&object, "lastgasp.io/crash-title"),
            Some("kernel panic: sysrq triggered crash in sysrq_handle_crash")
        );
        assert_eq!(
            annotation(&object, "lastgasp.io/termination-reason"),
            Some(REASON_B)
        );
        assert!(
            annotation(&object, "lastgasp.io/kernel-release")
                .is_some_and(|r| r.starts_with("6.1.0-"))
        );
        assert!(annotation(&object, "lastgasp.io/kernel-taint").is_some());
    }
    let record = incident_record(&node(&cluster, "node-b").await.unwrap());
    let crash = &record["record"]["crash"];
    assert_eq!(crash["frames"][0], "sysrq_handle_crash");
    assert!(!crash["excerpt"].as_array().unwrap().is_empty());
    assert_eq!(record["record"]["tier"], "kernel_record");
    let metrics = scrape(controller.metrics_addr()).await;
    assert!(
        metrics.contains(r#"lastgasp_controller_crashes_total{kind="panic",culprit="sysrq_handle_crash",kernel_release="6.1.0-"#)
            || metrics.contains(r#"culprit="sysrq_handle_crash""#),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        all_present(&cluster, &B_PODS).await,
        "pods kept while node-b's heartbeat goes on"
    );
    let marks = cluster.writes_to("/pods/b-0").len();
    drop(heartbeat);
    let stopped = Instant::now();
    eventually(
        "pods deleted once the heartbeat stopped",
        Duration::from_secs(15),
        || all_gone(&cluster, &B_PODS),
    )
    .await;
    let waited = stopped.elapsed();
    println!("heartbeat stopped to pods deleted: {waited:?}");
    // Timed from the last renewal the controller saw, which may be a poll (1 s) before the stop.
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    // Marked once while waiting, then deleted: one more write, the delete.
    let writes = cluster.writes_to("/pods/b-0");
    assert_eq!(writes.len(), marks + 1, "{writes:?}");
    assert!(writes.last().unwrap().starts_with("DELETE"), "{writes:?}");
    assert!(events_on_each(&cluster, &B_PODS, 1).await);
}

/// A node whose heartbeat goes on is alive: after `mark_wait` the controller gives up deleting,
/// says why on the node, and writes nothing more.
#[tokio::test(flavor = "multi_thread")]
async fn spoofed_netconsole_from_a_live_node_deletes_nothing_and_says_why() {
    let cluster = seeded().await;
    let _heartbeat = Heartbeat::start(&cluster, "node-b").await;
    let controller = start(&cluster, |config| {
        config.policy = Policy::DeletePodsAndNode;
        config.node_dead_after = Duration::from_secs(2);
        config.mark_wait = Duration::from_secs(3);
    })
    .await;
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    let withheld = |events: Vec<Event>| {
        events
            .into_iter()
            .find(|event| event.reason.as_deref() == Some("DeletionWithheld"))
    };
    eventually("the give-up Event", Duration::from_secs(15), || async {
        withheld(cluster.events_about("Node", "node-b").await).is_some()
    })
    .await;
    let withheld = withheld(cluster.events_about("Node", "node-b").await).unwrap();
    assert_eq!(withheld.metadata.namespace.as_deref(), Some("kube-system"));
    let note = withheld.note.unwrap_or_default();
    assert!(note.contains("deleted nothing"), "{note}");
    assert!(
        note.contains("heartbeat Lease kept being renewed"),
        "{note}"
    );
    let writes = cluster.writes_to("/pods/b-");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cluster.writes_to("/pods/b-"),
        writes,
        "nothing more written"
    );
    assert!(all_present(&cluster, &B_PODS).await);
    assert!(node(&cluster, "node-b").await.is_some());
    for name in B_PODS {
        let pod = pod(&cluster, name).await.unwrap();
        assert_eq!(
            annotation(&pod, "lastgasp.io/termination-reason"),
            Some(REASON_B),
            "marked all the same"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_writes_nothing() {
    let cluster = seeded().await;
    let controller = start(&cluster, |config| config.dry_run = true).await;
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    send_report(&report("node-b", 1), controller.report_addr());
    scrape_until(
        controller.metrics_addr(),
        &[r#"lastgasp_controller_incidents_total{kind="panic",source="agent"} 1"#],
    )
    .await;
    // Had it written, the writes would have followed the incident at once.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let writes = cluster.writes_to("/");
    assert!(writes.is_empty(), "{writes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_of_a_node_are_written_concurrently() {
    let cluster = seeded().await;
    let many: Vec<String> = (0..110).map(|i| format!("many-{i}")).collect();
    futures::future::join_all(many.iter().map(|name| cluster.pod("team", name, "node-b"))).await;
    let controller = start(&cluster, |config| {
        config.policy = Policy::DeletePods;
        config.concurrency = 16;
    })
    .await;
    cluster
        .proxy()
        .faults()
        .set_latency(Duration::from_millis(100));
    let started = Instant::now();
    send_report(&report("node-b", 1), controller.report_addr());
    eventually("113 pods deleted", Duration::from_secs(60), || async {
        cluster
            .list("pods", Some("team"))
            .await
            .iter()
            .all(|pod| pod["spec"]["nodeName"] != "node-b")
    })
    .await;
    println!(
        "113 pods marked and deleted in {:?} with 100 ms per request",
        started.elapsed()
    );
    // Serialised, the pod annotations alone would take 113 × 100 ms; concurrently, many
    // arrive within one request's latency of each other.
    let annotations: Vec<Instant> = cluster
        .proxy()
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.resource.as_deref() == Some("pods"))
        .map(|r| r.at)
        .collect();
    assert_eq!(annotations.len(), 113);
    let most_in_flight = annotations
        .iter()
        .map(|start| {
            annotations
                .iter()
                .filter(|other| other.duration_since(*start) < Duration::from_millis(50))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most_in_flight >= 8,
        "at most {most_in_flight} pod writes overlapped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_writes() {
    use lastgasp::controller::leader::{LeaderConfig, LeaderElection};
    let cluster = seeded().await;
    let mut replicas = Vec::new();
    for identity in ["replica-1", "replica-2"] {
        let election = LeaderElection::start(
            cluster.client_as("lastgasp-controller").await,
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
        let controller = start(&cluster, |config| {
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
    let datagram = report("node-b", 1);
    for (_, _, controller) in &replicas {
        send_report(&datagram, controller.report_addr());
    }
    eventually("pods marked", Duration::from_secs(15), || async {
        let mut marked = true;
        for name in B_PODS {
            marked &= !cluster.events_about("Pod", name).await.is_empty();
        }
        marked
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for name in B_PODS {
        let events = cluster.events_about("Pod", name).await;
        assert_eq!(events.len(), 1, "one Event on {name}");
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

#[tokio::test(flavor = "multi_thread")]
async fn a_pstore_report_marks_the_node_and_the_pods_that_were_there_and_deletes_nothing() {
    let cluster = seeded().await;
    let panicked_at = jiff::Timestamp::now();
    // The node rebooted and took a new pod before its agent reported; more than a second
    // later, as creation times have whole seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    cluster.pod("team", "b-late", "node-b").await;
    let controller = start(&cluster, |_| {}).await;

    // Reports that cannot be acted on: no panic time, a panic two days ago.
    send_report(&pstore_report("node-b", 1, None), controller.report_addr());
    let two_days = jiff::SignedDuration::from_hours(48);
    send_report(
        &pstore_report("node-b", 2, Some(panicked_at - two_days)),
        controller.report_addr(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        cluster.writes_to("/").is_empty(),
        "{:?}",
        cluster.writes_to("/")
    );

    // The agent sends its report several times.
    let sent = Instant::now();
    for seq in 3..6 {
        send_report(
            &pstore_report("node-b", seq, Some(panicked_at)),
            controller.report_addr(),
        );
    }
    eventually(
        "node-b's pods marked from pstore",
        Duration::from_secs(15),
        || b_pods_marked(&cluster, "pstore"),
    )
    .await;
    println!("pstore report to pods marked: {:?}", sent.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let panic_time = panicked_at.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    for name in B_PODS {
        let pod = pod(&cluster, name).await.unwrap();
        assert_eq!(
            annotation(&pod, "lastgasp.io/termination-time"),
            Some(panic_time.as_str()),
            "the termination time is the panic's"
        );
        assert_eq!(
            cluster.events_about("Pod", name).await.len(),
            1,
            "one Event on {name}"
        );
    }
    let node_b = node(&cluster, "node-b").await.unwrap();
    assert_eq!(
        annotation(&node_b, "lastgasp.io/termination-source"),
        Some("pstore")
    );
    assert_eq!(cluster.events_about("Node", "node-b").await.len(), 1);
    let record = incident_record(&node_b);
    assert_eq!(
        record["plan"],
        json!({"delete_pods": false, "delete_node": false})
    );
    assert_eq!(record["record"]["sources"], json!(["pstore"]));
    assert!(record["record"]["panicked_at"].is_string(), "{record}");

    // Created after the panic, or on another node: untouched. Nothing deleted.
    assert!(cluster.writes_to("/pods/b-late").is_empty());
    assert!(cluster.events_about("Pod", "b-late").await.is_empty());
    assert!(cluster.writes_to("/pods/a-").is_empty());
    let deletes: Vec<_> = cluster
        .writes_to("/")
        .into_iter()
        .filter(|write| write.starts_with("DELETE"))
        .collect();
    assert!(deletes.is_empty(), "{deletes:?}");
    assert!(all_present(&cluster, &B_PODS).await);
    assert!(node(&cluster, "node-b").await.is_some());

    let metrics = scrape_until(
        controller.metrics_addr(),
        &[
            r#"lastgasp_controller_incidents_total{kind="panic",source="pstore"} 1"#,
            r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="malformed"} 1"#,
            r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="stale"} 1"#,
            r#"lastgasp_controller_marked_objects_total{object="pod"} 3"#,
        ],
    )
    .await;
    assert!(!metrics.contains("lastgasp_controller_circuit_breaker_held_back_total 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pstore_report_after_netconsole_merges_without_duplicate_events() {
    let cluster = seeded().await;
    let controller = start(&cluster, |config| config.policy = Policy::Annotate).await;
    let panicked_at = jiff::Timestamp::now();
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    eventually(
        "pods marked from netconsole",
        Duration::from_secs(10),
        || b_pods_marked(&cluster, "netconsole"),
    )
    .await;
    let node_b = node(&cluster, "node-b").await.unwrap();
    let incident = annotation(&node_b, "lastgasp.io/incident")
        .unwrap()
        .to_owned();

    // The node's clock is a few seconds off the controller's; the report is resent.
    let skewed = panicked_at - jiff::SignedDuration::from_secs(4);
    for seq in 1..4 {
        send_report(
            &pstore_report("node-b", seq, Some(skewed)),
            controller.report_addr(),
        );
    }
    eventually("the pstore source merged", Duration::from_secs(10), || {
        b_pods_marked(&cluster, "netconsole,pstore")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    for name in B_PODS {
        assert_eq!(
            cluster.events_about("Pod", name).await.len(),
            1,
            "no second Event on {name}"
        );
        let pod = pod(&cluster, name).await.unwrap();
        assert_eq!(
            annotation(&pod, "lastgasp.io/incident"),
            Some(incident.as_str())
        );
    }
    assert_eq!(cluster.events_about("Node", "node-b").await.len(), 1);
    let metrics = scrape(controller.metrics_addr()).await;
    assert!(
        metrics
            .contains(r#"lastgasp_controller_incidents_total{kind="panic",source="netconsole"} 1"#)
    );
    assert!(
        metrics.contains(r#"lastgasp_controller_incidents_total{kind="panic",source="pstore"} 1"#)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pstore_report_to_a_replica_that_missed_the_panic_follows_the_node_record() {
    let cluster = seeded().await;
    // Two writers, as during a leader hand-over: the first heard the panic on netconsole,
    // the second (started before it) only gets the agent's report after the reboot.
    let first = start(&cluster, |config| config.policy = Policy::Annotate).await;
    let second = start(&cluster, |config| config.policy = Policy::Annotate).await;
    let panicked_at = jiff::Timestamp::now();
    replay_sysrq_capture("127.0.0.2", first.netconsole_addr());
    eventually(
        "pods marked from netconsole",
        Duration::from_secs(10),
        || b_pods_marked(&cluster, "netconsole"),
    )
    .await;
    // Let the second replica's watch see the node's incident record.
    tokio::time::sleep(Duration::from_millis(300)).await;

    send_report(
        &pstore_report("node-b", 1, Some(panicked_at)),
        second.report_addr(),
    );
    eventually("the pstore source merged", Duration::from_secs(10), || {
        b_pods_marked(&cluster, "netconsole,pstore")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        events_on_each(&cluster, &B_PODS, 1).await,
        "no second Event on the pods"
    );
    assert_eq!(cluster.events_about("Node", "node-b").await.len(), 1);
    let record = incident_record(&node(&cluster, "node-b").await.unwrap());
    assert_eq!(record["record"]["sources"], json!(["netconsole", "pstore"]));
    assert!(
        record["record"]["panicked_at"].is_null(),
        "still the live incident: {record}"
    );
    drop((first, second));
}

/// Reports that are signed but cannot be this node's panic now are dropped, each for its
/// counted reason: sent from another node's address, stale or future, for another boot.
#[tokio::test(flavor = "multi_thread")]
async fn signed_reports_from_the_wrong_place_time_or_boot_write_nothing() {
    let cluster = seeded().await;
    let controller = start(&cluster, |_| {}).await;
    let to = controller.report_addr();
    let now = now_ms();
    // node-a's agent (or anything on node-a) naming node-b.
    send_from(
        "127.0.0.3",
        &signed_report("node-b", "boot-1", 1, now, ReportSource::Kprobe),
        to,
    );
    // Captured ten minutes ago and replayed; and one dated in the future.
    send_from(
        "127.0.0.2",
        &signed_report("node-b", "boot-1", 2, now - 600_000, ReportSource::Kprobe),
        to,
    );
    send_from(
        "127.0.0.2",
        &signed_report("node-b", "boot-1", 3, now + 600_000, ReportSource::Kprobe),
        to,
    );
    // A boot node-b does not have.
    send_from(
        "127.0.0.2",
        &signed_report("node-b", "boot-0", 4, now, ReportSource::Kprobe),
        to,
    );
    let lines = ["address_mismatch", "stale", "future", "wrong_boot"].map(|reason| {
        format!(
            r#"lastgasp_controller_datagrams_dropped_total{{channel="report",reason="{reason}"}} 1"#
        )
    });
    scrape_until(
        controller.metrics_addr(),
        &lines.each_ref().map(String::as_str),
    )
    .await;
    assert_eq!(writes(&cluster), 0, "nothing written");
}

/// Only the `panic()` probe's report deletes at once; the agent's console-path report (text
/// that a kernel message echoing user input could fake) and a probe report whose boot cannot
/// be checked mark only.
#[tokio::test(flavor = "multi_thread")]
async fn console_text_and_unverifiable_reports_mark_and_a_verified_panic_report_deletes() {
    let cluster = seeded().await;
    // node-c publishes no boot id.
    cluster.node("node-c", "127.0.0.4", None).await;
    cluster.pod("team", "c-0", "node-c").await;
    let controller = start(&cluster, |config| {
        config.policy = Policy::DeletePods;
        config.mark_wait = Duration::from_secs(2);
    })
    .await;
    let to = controller.report_addr();
    send_from(
        "127.0.0.2",
        &signed_report("node-b", "boot-1", 1, now_ms(), ReportSource::Console),
        to,
    );
    send_from(
        "127.0.0.4",
        &signed_report("node-c", "boot-9", 1, now_ms(), ReportSource::Kprobe),
        to,
    );
    eventually("both marked", Duration::from_secs(10), || {
        events_on_each(&cluster, &["b-0", "c-0"], 1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(all_present(&cluster, &B_PODS).await);
    assert!(pod(&cluster, "c-0").await.is_some());

    // Then node-b's kprobe report: the same incident, now verified, deletes.
    send_from(
        "127.0.0.2",
        &signed_report("node-b", "boot-1", 2, now_ms(), ReportSource::Kprobe),
        to,
    );
    eventually("node-b's pods deleted", Duration::from_secs(10), || {
        all_gone(&cluster, &B_PODS)
    })
    .await;
    let record = incident_record(&node(&cluster, "node-b").await.unwrap());
    assert_eq!(record["record"]["tier"], "panic_probe");
    assert!(pod(&cluster, "c-0").await.is_some());
}

/// A report captured and replayed after the controller restarted (its replay memory gone)
/// is the incident already recorded on the node: nothing new is written, and a pod scheduled
/// on the node since is left alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_report_replayed_after_a_restart_writes_nothing_new() {
    let cluster = seeded().await;
    let first = start(&cluster, |config| config.policy = Policy::DeletePods).await;
    let datagram = signed_report("node-b", "boot-1", 1, now_ms(), ReportSource::Kprobe);
    send_from("127.0.0.2", &datagram, first.report_addr());
    eventually("node-b's pods deleted", Duration::from_secs(10), || {
        all_gone(&cluster, &B_PODS)
    })
    .await;
    first.shutdown();
    // Creation times have whole seconds: a pod of the panic's second counts as there before.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    cluster.pod("team", "b-new", "node-b").await;

    let second = start(&cluster, |config| config.policy = Policy::DeletePods).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = writes(&cluster);
    send_from("127.0.0.2", &datagram, second.report_addr());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(writes(&cluster), before, "nothing written for the replay");
    let b_new = pod(&cluster, "b-new").await.unwrap();
    assert!(annotation(&b_new, "lastgasp.io/termination-reason").is_none());
    assert!(cluster.events_about("Pod", "b-new").await.is_empty());
}

/// A pod deleted and created again under the same name while its node's incident waited is
/// another pod: the delete's UID precondition fails with the real server's 409, which means
/// done, and the controller goes on to the node instead of retrying forever. Also: the node is
/// seen dead by its Ready condition alone, and Event notes stay within the API's 1 KiB limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_pod_is_left_alone_and_the_node_is_still_deleted() {
    let cluster = seeded().await;
    let controller = start(&cluster, |_| {}).await;
    // Console text is not a verified panic: the pods are marked, and deleted only once the
    // node is seen dead.
    let mut console =
        wire::decode(&report("node-b", 1), &AuthKey::HmacSha256(KEY.to_vec())).unwrap();
    console.source = ReportSource::Console;
    console.message = format!("Kernel panic - not syncing: {}", "x".repeat(3000));
    let datagram = wire::encode(&console, &AuthKey::HmacSha256(KEY.to_vec())).unwrap();
    send_from("127.0.0.2", &datagram, controller.report_addr());
    eventually("pods marked", Duration::from_secs(15), || {
        events_on_each(&cluster, &B_PODS, 1)
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
    let pods: Api<Pod> = Api::namespaced(cluster.admin().clone(), "team");
    let uid_of = |pod: Option<Value>| pod.unwrap()["metadata"]["uid"].clone();
    pods.delete("b-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually("the old b-0 gone", Duration::from_secs(10), || async {
        pod(&cluster, "b-0").await.is_none()
    })
    .await;
    cluster.pod("team", "b-0", "node-b").await;
    let replaced = uid_of(pod(&cluster, "b-0").await);
    // And b-1 replaced where the controller's cache cannot see it: its pod watch dropped and
    // every new list or watch of pods failing. Its delete names the old UID: the real server
    // answers with the 409 of a failed precondition.
    let faults = cluster.proxy().faults();
    faults.fail_next(Matcher::any().verb("list").resource("pods"), 100_000, 500);
    faults.fail_next(Matcher::any().verb("watch").resource("pods"), 100_000, 500);
    faults.drop_watches();
    tokio::time::sleep(Duration::from_millis(300)).await;
    pods.delete("b-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually("the old b-1 gone", Duration::from_secs(10), || async {
        pod(&cluster, "b-1").await.is_none()
    })
    .await;
    cluster.pod("team", "b-1", "node-b").await;
    let unseen = uid_of(pod(&cluster, "b-1").await);
    // The node lifecycle controller's verdict.
    let unknown = json!({ "status": { "conditions": [{
        "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
        "message": "Kubelet stopped posting node status.",
    }]}});
    Api::<Node>::all(cluster.admin().clone())
        .patch_status("node-b", &PatchParams::default(), &Patch::Merge(unknown))
        .await
        .unwrap();
    eventually("node-b deleted", Duration::from_secs(20), || async {
        node(&cluster, "node-b").await.is_none()
    })
    .await;
    for (name, new) in [("b-0", &replaced), ("b-1", &unseen)] {
        let pod = pod(&cluster, name)
            .await
            .unwrap_or_else(|| panic!("the new {name} is still there"));
        assert_eq!(&pod["metadata"]["uid"], new);
        assert!(annotation(&pod, "lastgasp.io/termination-reason").is_none());
    }
    assert!(pod(&cluster, "b-2").await.is_none(), "b-2 deleted");
    let b1_deletes: Vec<_> = cluster
        .writes_to("/pods/b-1")
        .into_iter()
        .filter(|write| write.starts_with("DELETE"))
        .collect();
    assert_eq!(b1_deletes.len(), 1, "{b1_deletes:?}");
    assert!(b1_deletes[0].ends_with(" 409"), "{b1_deletes:?}");
    let injected_deletes = cluster
        .proxy()
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

/// A replica that loses leadership stops writing at once, in the middle of an incident (its
/// lease is still valid then, so no other replica writes yet), and finishes the job when it
/// leads again.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_loses_leadership_stops_writing_mid_incident() {
    let cluster = seeded().await;
    let (leading, leader) = tokio::sync::watch::channel(true);
    let controller = start(&cluster, |config| {
        config.policy = Policy::DeletePods;
        config.concurrency = 1;
        config.leader = Some(leader);
    })
    .await;
    // Slow writes, so the incident is still being written when leadership goes.
    let faults = cluster.proxy().faults();
    faults.set_latency(Duration::from_millis(200));
    send_report(&report("node-b", 1), controller.report_addr());
    eventually("the first write", Duration::from_secs(10), || async {
        writes(&cluster) > 0
    })
    .await;
    leading.send_replace(false);
    let lost = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_loss: Vec<String> = cluster
        .proxy()
        .requests()
        .into_iter()
        // A request already sent may still land, logged when the server answers it: after its
        // 200 ms of latency.
        .filter(|request| request.method != "GET" && request.at > lost + Duration::from_millis(400))
        .map(|request| format!("{} {}", request.method, request.uri))
        .collect();
    assert!(
        after_loss.is_empty(),
        "written after losing leadership: {after_loss:?}"
    );
    assert!(
        !all_gone(&cluster, &B_PODS).await,
        "the incident was cut short"
    );

    faults.set_latency(Duration::ZERO);
    leading.send_replace(true);
    eventually(
        "the job finished once leading again",
        Duration::from_secs(15),
        || all_gone(&cluster, &B_PODS),
    )
    .await;
}

/// Watches the proxy ends (a load balancer's idle timeout, a server restart) are resumed: a
/// pod created after the drop is known to the controller and acted on with the others.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_watches_are_resumed() {
    let cluster = seeded().await;
    let controller = start(&cluster, |config| config.policy = Policy::DeletePods).await;
    let watches = |since: usize| {
        cluster.proxy().requests()[since..]
            .iter()
            .filter(|request| request.verb.as_deref() == Some("watch"))
            .count()
    };
    // Let the controller's watches open, then end them all.
    eventually(
        "the controller's watches",
        Duration::from_secs(10),
        || async { watches(0) >= 2 },
    )
    .await;
    let before = cluster.proxy().requests().len();
    cluster.proxy().faults().drop_watches();
    cluster.pod("team", "b-3", "node-b").await;
    eventually("the watches resumed", Duration::from_secs(15), || async {
        watches(before) >= 2
    })
    .await;
    send_report(&report("node-b", 1), controller.report_addr());
    eventually(
        "node-b's pods deleted, b-3 too",
        Duration::from_secs(20),
        || all_gone(&cluster, &["b-0", "b-1", "b-2", "b-3"]),
    )
    .await;
    assert_eq!(cluster.events_about("Pod", "b-3").await.len(), 1);
    assert!(all_present(&cluster, &["a-0", "a-1"]).await);
}
