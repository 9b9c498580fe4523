//! The controller against the in-repo Kubernetes API test server over real HTTP, fed real
//! netconsole captures and real last-gasp datagrams over UDP on loopback. Node B's InternalIP
//! is 127.0.0.2 and node A's 127.0.0.3, so datagrams sent from those addresses come "from" them.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lastgasp::{
    controller::{Controller, ControllerConfig, policy::Policy, trust::DeletionEvidence},
    wire::{self, AuthKey, Report, ReportKind, ReportSource},
};
use lastgasp_tests::{
    apiserver::{ApiServer, Matcher},
    fixtures::{
        annotation, controller_config, events_about, now_ms, put_booted_node, put_node, put_pod,
        renew_node_lease, replay_sysrq_capture, wait_for,
    },
    scrape,
};
use serde_json::{Value, json};

const PANIC: &str = "Kernel panic - not syncing: sysrq triggered crash";
/// What node-b's pods read: the crash title from the capture's call trace (or the agent's
/// stack at `panic()`), then where it happened.
const REASON_B: &str = "kernel panic: sysrq triggered crash in sysrq_handle_crash on node node-b";
const KEY: &[u8] = b"controller-test-key";

/// node-b (127.0.0.2) and node-a (127.0.0.3), both on boot `boot-1`, with pods.
fn seed(server: &ApiServer) {
    put_booted_node(server, "node-a", "127.0.0.3", "boot-1");
    put_booted_node(server, "node-b", "127.0.0.2", "boot-1");
    for (pod, node) in [
        ("b-0", "node-b"),
        ("b-1", "node-b"),
        ("b-2", "node-b"),
        ("a-0", "node-a"),
        ("a-1", "node-a"),
    ] {
        put_pod(server, "team", pod, node);
    }
}

async fn start(server: &ApiServer, policy: Policy, breaker_max_nodes: usize) -> Controller {
    start_configured(server, |config| {
        config.policy = policy;
        config.breaker_max_nodes = breaker_max_nodes;
    })
    .await
}

async fn start_configured(
    server: &ApiServer,
    configure: impl FnOnce(&mut ControllerConfig),
) -> Controller {
    let mut config =
        controller_config(Policy::DeletePodsAndNode, AuthKey::HmacSha256(KEY.to_vec()));
    configure(&mut config);
    Controller::start(server.client().await.unwrap(), config)
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
    UdpSocket::bind((from, 0))
        .unwrap()
        .send_to(datagram, to)
        .unwrap();
}

fn gone(server: &ApiServer, resource: &str, namespace: Option<&str>, name: &str) -> bool {
    server
        .get_json(resource, namespace, name)
        .unwrap()
        .is_none()
}

/// Writes (anything but reads) the controller made to one object, from the request log.
fn writes_to(server: &ApiServer, path_fragment: &str) -> Vec<String> {
    server
        .requests()
        .into_iter()
        .filter(|request| request.method != "GET" && request.uri.contains(path_fragment))
        .map(|request| format!("{} {}", request.method, request.uri))
        .collect()
}

/// Watches pods and nodes from before the controller acts, to see their last state on deletion.
struct LastStates {
    deleted: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LastStates {
    async fn start(server: &ApiServer) -> Self {
        use futures::StreamExt as _;
        use k8s_openapi::api::core::v1::{Node, Pod};
        use kube::{Api, runtime::watcher};
        let client = server.client().await.unwrap();
        let deleted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = deleted.clone();
        let task = tokio::spawn(async move {
            let pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
                .filter_map(|event| async move {
                    match event {
                        Ok(watcher::Event::Delete(pod)) => serde_json::to_value(pod).ok(),
                        _ => None,
                    }
                });
            let nodes = watcher(Api::<Node>::all(client), watcher::Config::default()).filter_map(
                |event| async move {
                    match event {
                        Ok(watcher::Event::Delete(node)) => serde_json::to_value(node).ok(),
                        _ => None,
                    }
                },
            );
            let mut both = std::pin::pin!(futures::stream::select(pods, nodes));
            while let Some(object) = both.next().await {
                sink.lock().unwrap().push(object);
            }
        });
        // Let the watches list before anything changes.
        tokio::time::sleep(Duration::from_millis(300)).await;
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

#[tokio::test(flavor = "multi_thread")]
/// With `--deletion-evidence any` (the opt-in Titus behaviour), netconsole text deletes at once.
async fn with_any_evidence_a_netconsole_panic_marks_and_deletes_the_node_and_its_pods_only() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let watch = LastStates::start(&server).await;
    let controller = start_configured(&server, |config| {
        config.policy = Policy::DeletePodsAndNode;
        config.deletion_evidence = DeletionEvidence::Any;
    })
    .await;

    // What an agent sends to resolve its netconsole next hop: not a parse error.
    UdpSocket::bind("127.0.0.2:0")
        .unwrap()
        .send_to(&[], controller.netconsole_addr())
        .unwrap();
    let sent = Instant::now();
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    wait_for("node-b deleted", Duration::from_secs(15), || {
        gone(&server, "nodes", None, "node-b")
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
    for pod in ["b-0", "b-1", "b-2"] {
        assert!(gone(&server, "pods", Some("team"), pod), "{pod} deleted");
        let last = watch.last_state(pod);
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
            .expect("DisruptionTarget condition");
        assert_eq!(disruption["status"], "True");
        assert_eq!(disruption["reason"], "NodeKernelPanic");
        assert!(
            conditions.iter().any(|c| c["type"] == "Ready"),
            "kubelet's own conditions are untouched"
        );
        let events = events_about(&server, "Pod", pod);
        assert_eq!(events.len(), 1, "one Event on {pod}");
        assert_eq!(events[0]["type"], "Warning");
        assert_eq!(events[0]["reason"], "NodeKernelPanic");
        assert!(
            early_reason(events[0]["note"].as_str()),
            "{}",
            events[0]["note"]
        );
        // Annotations are written before the deletion.
        let writes = writes_to(&server, &format!("/pods/{pod}"));
        let annotated = writes.iter().position(|w| w.starts_with("PATCH")).unwrap();
        let deleted = writes.iter().position(|w| w.starts_with("DELETE")).unwrap();
        assert!(annotated < deleted, "{writes:?}");
    }
    let node = watch.last_state("node-b");
    let reason = annotation(&node, "lastgasp.io/termination-reason");
    assert!(early_reason(reason), "{reason:?}");
    assert_eq!(events_about(&server, "Node", "node-b").len(), 1);

    for pod in ["a-0", "a-1"] {
        let untouched = server.get_json("pods", Some("team"), pod).unwrap().unwrap();
        assert!(annotation(&untouched, "lastgasp.io/termination-reason").is_none());
        assert!(writes_to(&server, &format!("/pods/{pod}")).is_empty());
    }
    assert!(server.get_json("nodes", None, "node-a").unwrap().is_some());

    let metrics = scrape(controller.metrics_addr()).await;
    assert!(
        metrics
            .contains(r#"lastgasp_controller_incidents_total{kind="panic",source="netconsole"} 1"#)
    );
    assert!(metrics.contains(r#"lastgasp_controller_deleted_objects_total{object="pod"} 3"#));
    assert!(metrics.contains(r#"lastgasp_controller_deleted_objects_total{object="node"} 1"#));
    // Written again when the complete report named the culprit: one or two runs.
    assert!(metrics.contains("lastgasp_controller_incident_last_write_seconds_count "));
    assert!(
        !metrics.contains(r#"dropped_total{channel="netconsole",reason="unparsable"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_report_acts_too_and_both_channels_make_one_incident() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let controller = start(&server, Policy::Annotate, 3).await;

    send_report(&report("node-b", 1), controller.report_addr());
    wait_for(
        "pods marked from the agent report",
        Duration::from_secs(10),
        || {
            server
                .get_json("pods", Some("team"), "b-2")
                .unwrap()
                .is_some_and(|pod| {
                    annotation(&pod, "lastgasp.io/termination-reason") == Some(REASON_B)
                })
        },
    )
    .await;
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    wait_for(
        "netconsole merged into the incident",
        Duration::from_secs(10),
        || {
            ["b-0", "b-1", "b-2"].iter().all(|pod| {
                let pod = server.get_json("pods", Some("team"), pod).unwrap().unwrap();
                annotation(&pod, "lastgasp.io/termination-source") == Some("agent,netconsole")
            })
        },
    )
    .await;
    // Let any late duplicate writes land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for pod in ["b-0", "b-1", "b-2"] {
        let pod_json = server.get_json("pods", Some("team"), pod).unwrap().unwrap();
        let conditions = pod_json["status"]["conditions"].as_array().unwrap();
        assert_eq!(
            conditions
                .iter()
                .filter(|c| c["type"] == "DisruptionTarget")
                .count(),
            1
        );
        assert_eq!(
            events_about(&server, "Pod", pod).len(),
            1,
            "one Event on {pod}"
        );
    }
    let node = server.get_json("nodes", None, "node-b").unwrap().unwrap();
    let record: Value =
        serde_json::from_str(annotation(&node, "lastgasp.io/incident-record").unwrap()).unwrap();
    assert_eq!(record["record"]["sources"], json!(["agent", "netconsole"]));
    assert_eq!(record["record"]["boot_id"], "boot-1");
    assert_eq!(events_about(&server, "Node", "node-b").len(), 1);
    assert!(writes_to(&server, "/pods/a-").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn strangers_bad_macs_and_replays_write_nothing() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let controller = start(&server, Policy::Annotate, 3).await;

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
    let writes = || {
        server
            .requests()
            .into_iter()
            .filter(|request| request.method != "GET")
            .count()
    };
    assert_eq!(writes(), 0, "nothing written for strangers and forgeries");

    let genuine = report("node-b", 10);
    send_report(&genuine, controller.report_addr());
    wait_for(
        "the genuine report acted on",
        Duration::from_secs(10),
        || !events_about(&server, "Pod", "b-2").is_empty(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_genuine = writes();
    send_report(&genuine, controller.report_addr());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(writes(), after_genuine, "a replayed report writes nothing");

    let metrics = scrape(controller.metrics_addr()).await;
    for dropped in [
        r#"lastgasp_controller_datagrams_dropped_total{channel="netconsole",reason="unknown_sender"}"#,
        r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="bad_mac"} 1"#,
        r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="auth_scheme_mismatch"} 1"#,
        r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="replay"} 1"#,
    ] {
        assert!(
            metrics.contains(dropped),
            "{dropped} missing from:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_from_one_node_does_not_delay_a_panic_from_another() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let controller = start(&server, Policy::DeletePods, 3).await;
    let target = controller.netconsole_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = stop.clone();
    let flood = std::thread::spawn(move || {
        let socket = UdpSocket::bind(("127.0.0.3", 0)).unwrap();
        let mut sent = 0u64;
        // About 50,000 datagrams a second, far more than a kernel console can print.
        while !flooding.load(std::sync::atomic::Ordering::Relaxed) && sent < 200_000 {
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
    wait_for(
        "node-b's pods marked during the flood",
        Duration::from_secs(15),
        || {
            ["b-0", "b-1", "b-2"]
                .iter()
                .all(|pod| events_about(&server, "Pod", pod).len() == 1)
        },
    )
    .await;
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flooded = flood.join().unwrap();
    println!("panic acted on in {took:?} while node-a flooded {flooded} datagrams");
    assert!(
        flooded > 1000,
        "the flood ran alongside ({flooded} datagrams)"
    );
    assert!(
        server
            .get_json("pods", Some("team"), "a-0")
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn api_errors_are_retried_until_done() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    server
        .faults()
        .fail_next(Matcher::any().verb("patch").resource("pods"), 4, 500);
    server
        .faults()
        .fail_next(Matcher::any().verb("delete").resource("pods"), 2, 503);
    let controller = start(&server, Policy::DeletePods, 3).await;
    send_report(&report("node-b", 1), controller.report_addr());
    wait_for(
        "pods deleted despite errors",
        Duration::from_secs(20),
        || {
            ["b-0", "b-1", "b-2"]
                .iter()
                .all(|pod| gone(&server, "pods", Some("team"), pod))
        },
    )
    .await;
    for pod in ["b-0", "b-1", "b-2"] {
        assert_eq!(events_about(&server, "Pod", pod).len(), 1);
    }
    let metrics = scrape(controller.metrics_addr()).await;
    let retries: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("lastgasp_controller_write_retries_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(retries >= 4, "{retries} retries");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_breaker_caps_nodes_acted_on() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let controller = start(&server, Policy::DeletePodsAndNode, 1).await;
    send_report(&report("node-b", 1), controller.report_addr());
    wait_for("node-b deleted", Duration::from_secs(10), || {
        gone(&server, "nodes", None, "node-b")
    })
    .await;
    send_report(&report("node-a", 1), controller.report_addr());
    wait_for("node-a marked", Duration::from_secs(10), || {
        ["a-0", "a-1"].iter().all(|pod| {
            server
                .get_json("pods", Some("team"), pod)
                .unwrap()
                .is_some_and(|pod| annotation(&pod, "lastgasp.io/termination-reason").is_some())
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.get_json("nodes", None, "node-a").unwrap().is_some());
    assert!(
        server
            .get_json("pods", Some("team"), "a-0")
            .unwrap()
            .is_some()
    );
    let metrics = scrape(controller.metrics_addr()).await;
    assert!(metrics.contains("lastgasp_controller_circuit_breaker_open 1"));
    assert!(metrics.contains("lastgasp_controller_circuit_breaker_held_back_total 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_controller_finishes_the_job_without_duplicates() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    // The first controller can mark but not delete.
    server
        .faults()
        .fail_next(Matcher::any().verb("delete").resource("pods"), 10_000, 500);
    let first = start(&server, Policy::DeletePodsAndNode, 3).await;
    send_report(&report("node-b", 1), first.report_addr());
    wait_for(
        "pods marked by the first controller",
        Duration::from_secs(10),
        || {
            ["b-0", "b-1", "b-2"]
                .iter()
                .all(|pod| events_about(&server, "Pod", pod).len() == 1)
        },
    )
    .await;
    first.shutdown();
    server.faults().clear();

    let second = start(&server, Policy::DeletePodsAndNode, 3).await;
    wait_for(
        "the second controller finishes",
        Duration::from_secs(15),
        || gone(&server, "nodes", None, "node-b"),
    )
    .await;
    for pod in ["b-0", "b-1", "b-2"] {
        assert!(gone(&server, "pods", Some("team"), pod));
        assert_eq!(
            events_about(&server, "Pod", pod).len(),
            1,
            "no duplicate Event on {pod}"
        );
    }
    assert_eq!(events_about(&server, "Node", "node-b").len(), 1);
    drop(second);
}

/// Renews `node`'s heartbeat Lease every 200 ms through the API, as its kubelet would, until
/// dropped.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    async fn start(server: &ApiServer, node: &'static str) -> Self {
        use k8s_openapi::api::coordination::v1::Lease;
        use kube::{
            Api,
            api::{Patch, PatchParams},
        };
        renew_node_lease(server, node);
        let leases: Api<Lease> = Api::namespaced(server.client().await.unwrap(), "kube-node-lease");
        Self(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ");
                let renew = json!({ "spec": { "renewTime": now.to_string() } });
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

fn pods_b_present(server: &ApiServer) -> bool {
    ["b-0", "b-1", "b-2"].iter().all(|pod| {
        server
            .get_json("pods", Some("team"), pod)
            .unwrap()
            .is_some()
    })
}

/// Netconsole is not authenticated: a host that spoofs node-b's address can send it. By
/// default it marks at once and deletes only once the controller sees node-b's heartbeat stop.
#[tokio::test(flavor = "multi_thread")]
async fn netconsole_evidence_marks_and_deletes_only_once_the_heartbeat_stops() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let heartbeat = Heartbeat::start(&server, "node-b").await;
    let controller = start_configured(&server, |config| {
        config.policy = Policy::DeletePods;
        config.node_dead_after = Duration::from_secs(2);
    })
    .await;
    let sent = Instant::now();
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    wait_for("pods marked", Duration::from_secs(10), || {
        ["b-0", "b-1", "b-2"]
            .iter()
            .all(|pod| events_about(&server, "Pod", pod).len() == 1)
    })
    .await;
    println!("netconsole replay to pods marked: {:?}", sent.elapsed());
    // Titled from the capture's lines: the call trace after the panic line names the culprit.
    wait_for(
        "the crash named on node-b and its pods",
        Duration::from_secs(15),
        || {
            let mut objects = vec![server.get_json("nodes", None, "node-b").unwrap().unwrap()];
            for pod in ["b-0", "b-1", "b-2"] {
                objects.push(server.get_json("pods", Some("team"), pod).unwrap().unwrap());
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
        server.get_json("nodes", None, "node-b").unwrap().unwrap(),
        server
            .get_json("pods", Some("team"), "b-1")
            .unwrap()
            .unwrap(),
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
    let node = server.get_json("nodes", None, "node-b").unwrap().unwrap();
    let record: Value =
        serde_json::from_str(annotation(&node, "lastgasp.io/incident-record").unwrap()).unwrap();
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
        pods_b_present(&server),
        "pods kept while node-b's heartbeat goes on"
    );
    let marks = writes_to(&server, "/pods/b-0").len();
    drop(heartbeat);
    let stopped = Instant::now();
    wait_for(
        "pods deleted once the heartbeat stopped",
        Duration::from_secs(10),
        || {
            ["b-0", "b-1", "b-2"]
                .iter()
                .all(|pod| gone(&server, "pods", Some("team"), pod))
        },
    )
    .await;
    let waited = stopped.elapsed();
    println!("heartbeat stopped to pods deleted: {waited:?}");
    // Timed from the last renewal the controller saw, which may be a poll (1 s) before the stop.
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    // Marked once while waiting, then deleted: one annotation patch, one condition, one delete.
    assert_eq!(
        writes_to(&server, "/pods/b-0").len(),
        marks + 1,
        "{:?}",
        writes_to(&server, "/pods/b-0")
    );
    for pod in ["b-0", "b-1", "b-2"] {
        assert_eq!(events_about(&server, "Pod", pod).len(), 1);
    }
}

/// A node whose heartbeat goes on is alive: after `mark_wait` the controller gives up deleting,
/// says why on the node, and writes nothing more.
#[tokio::test(flavor = "multi_thread")]
async fn spoofed_netconsole_from_a_live_node_deletes_nothing_and_says_why() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let _heartbeat = Heartbeat::start(&server, "node-b").await;
    let controller = start_configured(&server, |config| {
        config.policy = Policy::DeletePodsAndNode;
        config.node_dead_after = Duration::from_secs(2);
        config.mark_wait = Duration::from_secs(3);
    })
    .await;
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    wait_for("the give-up Event", Duration::from_secs(15), || {
        events_about(&server, "Node", "node-b")
            .iter()
            .any(|event| event["reason"] == "DeletionWithheld")
    })
    .await;
    let withheld = events_about(&server, "Node", "node-b")
        .into_iter()
        .find(|event| event["reason"] == "DeletionWithheld")
        .unwrap();
    let note = withheld["note"].as_str().unwrap();
    assert!(note.contains("deleted nothing"), "{note}");
    assert!(
        note.contains("heartbeat Lease kept being renewed"),
        "{note}"
    );
    let writes = writes_to(&server, "/pods/b-");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        writes_to(&server, "/pods/b-"),
        writes,
        "nothing more written"
    );
    assert!(pods_b_present(&server));
    assert!(server.get_json("nodes", None, "node-b").unwrap().is_some());
    for pod in ["b-0", "b-1", "b-2"] {
        let pod = server.get_json("pods", Some("team"), pod).unwrap().unwrap();
        assert_eq!(
            annotation(&pod, "lastgasp.io/termination-reason"),
            Some(REASON_B),
            "marked all the same"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_writes_nothing() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let controller = start_configured(&server, |config| config.dry_run = true).await;
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    send_report(&report("node-b", 1), controller.report_addr());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let metrics = scrape(controller.metrics_addr()).await;
    assert!(
        metrics.contains(r#"lastgasp_controller_incidents_total{kind="panic",source="agent"} 1"#)
    );
    let writes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|request| request.method != "GET")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_of_a_node_are_written_concurrently() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    for i in 0..110 {
        server
            .put_json(
                "pods",
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "name": format!("many-{i}"), "namespace": "team" },
                    "spec": { "nodeName": "node-b", "containers": [{ "name": "app", "image": "app" }] },
                }),
            )
            .unwrap();
    }
    let controller = start_configured(&server, |config| {
        config.policy = Policy::DeletePods;
        config.concurrency = 16;
    })
    .await;
    server.faults().set_latency(Duration::from_millis(100));
    let started = Instant::now();
    send_report(&report("node-b", 1), controller.report_addr());
    wait_for("113 pods deleted", Duration::from_secs(60), || {
        server
            .list_json("pods", Some("team"))
            .unwrap()
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
    let annotations: Vec<Instant> = server
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
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let mut replicas = Vec::new();
    for identity in ["replica-1", "replica-2"] {
        let election = LeaderElection::start(
            server.client().await.unwrap(),
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
        let controller = start_configured(&server, |config| {
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
    wait_for("a leader", Duration::from_secs(5), || {
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
    wait_for("pods marked", Duration::from_secs(10), || {
        ["b-0", "b-1", "b-2"]
            .iter()
            .all(|pod| !events_about(&server, "Pod", pod).is_empty())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for pod in ["b-0", "b-1", "b-2"] {
        let events = events_about(&server, "Pod", pod);
        assert_eq!(events.len(), 1, "one Event on {pod}");
        assert_eq!(
            events[0]["reportingInstance"], leader,
            "written by the leader"
        );
    }
    for (_, election, _) in replicas {
        election.stop().await;
    }
}

/// Everything the controller writes on a pod for an incident: reason, source, condition, one Event.
fn pod_marked(server: &ApiServer, pod: &str, source: &str) -> bool {
    server
        .get_json("pods", Some("team"), pod)
        .unwrap()
        .is_some_and(|pod_json| {
            annotation(&pod_json, "lastgasp.io/termination-reason") == Some(REASON_B)
                && annotation(&pod_json, "lastgasp.io/termination-source") == Some(source)
                && pod_json["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "DisruptionTarget"))
        })
        && events_about(server, "Pod", pod).len() == 1
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pstore_report_marks_the_node_and_the_pods_that_were_there_and_deletes_nothing() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let panicked_at = jiff::Timestamp::now();
    // The node rebooted and took a new pod before its agent reported; more than a second
    // later, as creation times have whole seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    put_pod(&server, "team", "b-late", "node-b");
    let controller = start(&server, Policy::DeletePodsAndNode, 3).await;

    // Reports that cannot be acted on: no panic time, a panic two days ago.
    send_report(&pstore_report("node-b", 1, None), controller.report_addr());
    let two_days = jiff::SignedDuration::from_hours(48);
    send_report(
        &pstore_report("node-b", 2, Some(panicked_at - two_days)),
        controller.report_addr(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        writes_to(&server, "/").is_empty(),
        "{:?}",
        writes_to(&server, "/")
    );

    // The agent sends its report several times.
    let sent = Instant::now();
    for seq in 3..6 {
        send_report(
            &pstore_report("node-b", seq, Some(panicked_at)),
            controller.report_addr(),
        );
    }
    wait_for(
        "node-b's pods marked from pstore",
        Duration::from_secs(10),
        || {
            ["b-0", "b-1", "b-2"]
                .iter()
                .all(|pod| pod_marked(&server, pod, "pstore"))
        },
    )
    .await;
    println!("pstore report to pods marked: {:?}", sent.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let panic_time = panicked_at.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    for pod in ["b-0", "b-1", "b-2"] {
        let pod_json = server.get_json("pods", Some("team"), pod).unwrap().unwrap();
        assert_eq!(
            annotation(&pod_json, "lastgasp.io/termination-time"),
            Some(panic_time.as_str()),
            "the termination time is the panic's"
        );
        assert_eq!(
            events_about(&server, "Pod", pod).len(),
            1,
            "one Event on {pod}"
        );
    }
    let node = server.get_json("nodes", None, "node-b").unwrap().unwrap();
    assert_eq!(
        annotation(&node, "lastgasp.io/termination-source"),
        Some("pstore")
    );
    assert_eq!(events_about(&server, "Node", "node-b").len(), 1);
    let record: Value =
        serde_json::from_str(annotation(&node, "lastgasp.io/incident-record").unwrap()).unwrap();
    assert_eq!(
        record["plan"],
        json!({"delete_pods": false, "delete_node": false})
    );
    assert_eq!(record["record"]["sources"], json!(["pstore"]));
    assert!(record["record"]["panicked_at"].is_string(), "{record}");

    // Created after the panic, or on another node: untouched. Nothing deleted.
    assert!(writes_to(&server, "/pods/b-late").is_empty());
    assert!(events_about(&server, "Pod", "b-late").is_empty());
    assert!(writes_to(&server, "/pods/a-").is_empty());
    let deletes: Vec<_> = writes_to(&server, "/")
        .into_iter()
        .filter(|write| write.starts_with("DELETE"))
        .collect();
    assert!(deletes.is_empty(), "{deletes:?}");

    let metrics = scrape(controller.metrics_addr()).await;
    for line in [
        r#"lastgasp_controller_incidents_total{kind="panic",source="pstore"} 1"#,
        r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="malformed"} 1"#,
        r#"lastgasp_controller_datagrams_dropped_total{channel="report",reason="stale"} 1"#,
        r#"lastgasp_controller_marked_objects_total{object="pod"} 3"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    assert!(!metrics.contains("lastgasp_controller_circuit_breaker_held_back_total 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pstore_report_after_netconsole_merges_without_duplicate_events() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let controller = start(&server, Policy::Annotate, 3).await;
    let panicked_at = jiff::Timestamp::now();
    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    wait_for(
        "pods marked from netconsole",
        Duration::from_secs(10),
        || {
            ["b-0", "b-1", "b-2"]
                .iter()
                .all(|pod| pod_marked(&server, pod, "netconsole"))
        },
    )
    .await;
    let node = server.get_json("nodes", None, "node-b").unwrap().unwrap();
    let incident = annotation(&node, "lastgasp.io/incident")
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
    wait_for("the pstore source merged", Duration::from_secs(10), || {
        ["b-0", "b-1", "b-2"]
            .iter()
            .all(|pod| pod_marked(&server, pod, "netconsole,pstore"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    for pod in ["b-0", "b-1", "b-2"] {
        assert_eq!(
            events_about(&server, "Pod", pod).len(),
            1,
            "no second Event on {pod}"
        );
        let pod_json = server.get_json("pods", Some("team"), pod).unwrap().unwrap();
        assert_eq!(
            annotation(&pod_json, "lastgasp.io/incident"),
            Some(incident.as_str())
        );
    }
    assert_eq!(events_about(&server, "Node", "node-b").len(), 1);
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
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    // Two writers, as during a leader hand-over: the first heard the panic on netconsole,
    // the second (started before it) only gets the agent's report after the reboot.
    let first = start(&server, Policy::Annotate, 3).await;
    let second = start(&server, Policy::Annotate, 3).await;
    let panicked_at = jiff::Timestamp::now();
    replay_sysrq_capture("127.0.0.2", first.netconsole_addr());
    wait_for(
        "pods marked from netconsole",
        Duration::from_secs(10),
        || {
            ["b-0", "b-1", "b-2"]
                .iter()
                .all(|pod| pod_marked(&server, pod, "netconsole"))
        },
    )
    .await;
    // Let the second replica's watch see the node's incident record.
    tokio::time::sleep(Duration::from_millis(300)).await;

    send_report(
        &pstore_report("node-b", 1, Some(panicked_at)),
        second.report_addr(),
    );
    wait_for("the pstore source merged", Duration::from_secs(10), || {
        ["b-0", "b-1", "b-2"]
            .iter()
            .all(|pod| pod_marked(&server, pod, "netconsole,pstore"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for pod in ["b-0", "b-1", "b-2"] {
        assert_eq!(
            events_about(&server, "Pod", pod).len(),
            1,
            "no second Event on {pod}"
        );
    }
    assert_eq!(events_about(&server, "Node", "node-b").len(), 1);
    let node = server.get_json("nodes", None, "node-b").unwrap().unwrap();
    let record: Value =
        serde_json::from_str(annotation(&node, "lastgasp.io/incident-record").unwrap()).unwrap();
    assert_eq!(record["record"]["sources"], json!(["netconsole", "pstore"]));
    assert!(
        record["record"]["panicked_at"].is_null(),
        "still the live incident: {record}"
    );
    drop((first, second));
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

fn send_from(ip: &str, datagram: &[u8], to: SocketAddr) {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .send_to(datagram, to)
        .unwrap();
}

fn non_get_requests(server: &ApiServer) -> usize {
    server
        .requests()
        .into_iter()
        .filter(|request| request.method != "GET")
        .count()
}

/// Reports that are signed but cannot be this node's panic now are dropped, each for its
/// counted reason: sent from another node's address, stale or future, for another boot.
#[tokio::test(flavor = "multi_thread")]
async fn signed_reports_from_the_wrong_place_time_or_boot_write_nothing() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let controller = start(&server, Policy::DeletePodsAndNode, 3).await;
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
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(non_get_requests(&server), 0, "nothing written");
    let metrics = scrape(controller.metrics_addr()).await;
    for reason in ["address_mismatch", "stale", "future", "wrong_boot"] {
        let line = format!(
            r#"lastgasp_controller_datagrams_dropped_total{{channel="report",reason="{reason}"}} 1"#
        );
        assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");
    }
}

/// Only the `panic()` probe's report deletes at once; the agent's console-path report (text
/// that a kernel message echoing user input could fake) and a probe report whose boot cannot
/// be checked mark only.
#[tokio::test(flavor = "multi_thread")]
async fn console_text_and_unverifiable_reports_mark_and_a_verified_panic_report_deletes() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    put_node(&server, "node-c", "127.0.0.4");
    put_pod(&server, "team", "c-0", "node-c");
    let controller = start_configured(&server, |config| {
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
    // node-c publishes no boot id.
    send_from(
        "127.0.0.4",
        &signed_report("node-c", "boot-9", 1, now_ms(), ReportSource::Kprobe),
        to,
    );
    wait_for("both marked", Duration::from_secs(10), || {
        events_about(&server, "Pod", "b-0").len() == 1
            && events_about(&server, "Pod", "c-0").len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(pods_b_present(&server));
    assert!(!gone(&server, "pods", Some("team"), "c-0"));

    // Then node-b's kprobe report: the same incident, now verified, deletes.
    send_from(
        "127.0.0.2",
        &signed_report("node-b", "boot-1", 2, now_ms(), ReportSource::Kprobe),
        to,
    );
    wait_for("node-b's pods deleted", Duration::from_secs(10), || {
        ["b-0", "b-1", "b-2"]
            .iter()
            .all(|pod| gone(&server, "pods", Some("team"), pod))
    })
    .await;
    let node = server.get_json("nodes", None, "node-b").unwrap().unwrap();
    let record: Value =
        serde_json::from_str(annotation(&node, "lastgasp.io/incident-record").unwrap()).unwrap();
    assert_eq!(record["record"]["tier"], "panic_probe");
}

/// A report captured and replayed after the controller restarted (its replay memory gone)
/// is the incident already recorded on the node: nothing new is written, and a pod scheduled
/// on the node since is left alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_report_replayed_after_a_restart_writes_nothing_new() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let first = start(&server, Policy::DeletePods, 3).await;
    let datagram = signed_report("node-b", "boot-1", 1, now_ms(), ReportSource::Kprobe);
    send_from("127.0.0.2", &datagram, first.report_addr());
    wait_for("node-b's pods deleted", Duration::from_secs(10), || {
        ["b-0", "b-1", "b-2"]
            .iter()
            .all(|pod| gone(&server, "pods", Some("team"), pod))
    })
    .await;
    first.shutdown();
    // Creation times have whole seconds: a pod of the panic's second counts as there before.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    put_pod(&server, "team", "b-new", "node-b");

    let second = start(&server, Policy::DeletePods, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = non_get_requests(&server);
    send_from("127.0.0.2", &datagram, second.report_addr());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        non_get_requests(&server),
        before,
        "nothing written for the replay"
    );
    let pod = server
        .get_json("pods", Some("team"), "b-new")
        .unwrap()
        .unwrap();
    assert!(annotation(&pod, "lastgasp.io/termination-reason").is_none());
}

/// A pod deleted and created again under the same name while its node's incident waited is
/// another pod: the delete's UID precondition fails with 409, which means done, and the
/// controller goes on to the node instead of retrying forever. Also: the node is seen dead by
/// its Ready condition alone, and Event notes stay within the API's 1 KiB limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_pod_is_left_alone_and_the_node_is_still_deleted() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let controller = start_configured(&server, |config| {
        config.policy = Policy::DeletePodsAndNode;
    })
    .await;
    let long = format!("Kernel panic - not syncing: {}", "x".repeat(3000));
    let mut report =
        wire::decode(&report("node-b", 1), &AuthKey::HmacSha256(KEY.to_vec())).unwrap();
    report.source = ReportSource::Console;
    report.message = long;
    let datagram = wire::encode(&report, &AuthKey::HmacSha256(KEY.to_vec())).unwrap();
    send_from("127.0.0.2", &datagram, controller.report_addr());
    wait_for("pods marked", Duration::from_secs(10), || {
        ["b-0", "b-1", "b-2"]
            .iter()
            .all(|pod| events_about(&server, "Pod", pod).len() == 1)
    })
    .await;
    let note = events_about(&server, "Pod", "b-0")[0]["note"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(note.len() <= 1024, "{}", note.len());

    // b-0 replaced behind the controller's back, in a later second than the panic's (creation
    // times have whole seconds); then the node lifecycle controller's verdict.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server.delete_json("pods", Some("team"), "b-0").unwrap();
    put_pod(&server, "team", "b-0", "node-b");
    let replaced_uid = server
        .get_json("pods", Some("team"), "b-0")
        .unwrap()
        .unwrap()["metadata"]["uid"]
        .clone();
    // And one more pod's delete answered with the 409 of a failed UID precondition (a
    // replacement the controller's cache has not seen yet).
    server
        .faults()
        .fail_next(Matcher::any().verb("delete").resource("pods"), 1, 409);
    let mut node = server.get_json("nodes", None, "node-b").unwrap().unwrap();
    node["status"]["conditions"] = json!([{
        "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
        "message": "Kubelet stopped posting node status.",
    }]);
    server.put_json("nodes", node).unwrap();
    wait_for("node-b deleted", Duration::from_secs(15), || {
        gone(&server, "nodes", None, "node-b")
    })
    .await;
    let pod = server
        .get_json("pods", Some("team"), "b-0")
        .unwrap()
        .unwrap();
    assert_eq!(
        pod["metadata"]["uid"], replaced_uid,
        "the new b-0 is still there"
    );
    assert!(annotation(&pod, "lastgasp.io/termination-reason").is_none());
    let left = ["b-1", "b-2"]
        .iter()
        .filter(|pod| !gone(&server, "pods", Some("team"), pod))
        .count();
    assert_eq!(left, 1, "the pod whose delete got a 409 is not retried");
    let metrics = scrape(controller.metrics_addr()).await;
    assert!(
        !metrics.contains("lastgasp_controller_write_retries_total 1"),
        "{metrics}"
    );
}

/// A replica that loses leadership stops writing at once, in the middle of an incident (its
/// lease is still valid then, so no other replica writes yet), and finishes the job when it
/// leads again.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_loses_leadership_stops_writing_mid_incident() {
    let server = ApiServer::start().await.unwrap();
    seed(&server);
    let (leading, leader) = tokio::sync::watch::channel(true);
    let controller = start_configured(&server, |config| {
        config.policy = Policy::DeletePods;
        config.concurrency = 1;
        config.leader = Some(leader);
    })
    .await;
    // Slow writes, so the incident is still being written when leadership goes.
    server.faults().set_latency(Duration::from_millis(200));
    send_report(&report("node-b", 1), controller.report_addr());
    wait_for("the first write", Duration::from_secs(10), || {
        non_get_requests(&server) > 0
    })
    .await;
    leading.send_replace(false);
    let lost = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_loss: Vec<String> = server
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
        !["b-0", "b-1", "b-2"]
            .iter()
            .all(|pod| gone(&server, "pods", Some("team"), pod)),
        "the incident was cut short"
    );

    server.faults().set_latency(Duration::ZERO);
    leading.send_replace(true);
    wait_for(
        "the job finished once leading again",
        Duration::from_secs(15),
        || {
            ["b-0", "b-1", "b-2"]
                .iter()
                .all(|pod| gone(&server, "pods", Some("team"), pod))
        },
    )
    .await;
}
