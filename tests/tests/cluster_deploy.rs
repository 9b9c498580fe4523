//! `deploy/` on a real single-node Kubernetes v1.20.2 cluster (`lastgasp_tests::kube::node`):
//! `kubectl apply -k deploy/overlays/test-cluster` with the image `cargo xtask image` built,
//! then the agent's pod and both controller replicas run, the agent attaches its probes, the
//! real CNI plugins containerd runs for a test pod are reported, and a panic-format line in
//! this host's /dev/kmsg travels from the agent's pod to the leader's and marks the Node and
//! the test pod.
//!
//! Needs root, `kubectl`, the binaries of `cargo xtask kube`, and the images and Debian packages
//! of `cargo xtask cluster up` (`cargo xtask test` prepares all of them). It writes a panic line
//! to the kernel log of this machine: any other lastgasp agent running here sees it too.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    coordination::v1::Lease,
    core::v1::{Namespace, Node, Pod},
    events::v1::Event,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, LogParams, PostParams},
};
use lastgasp_tests::kube::{
    bin_dir,
    cluster::eventually,
    node::{LASTGASP_NAMESPACE, LocalCluster, NODE_IP, NODE_NAME},
};
use serde_json::json;

const AGENT_METRICS_PORT: u16 = 9465;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The OCI archive of `cargo xtask image`.
fn image_archive() -> PathBuf {
    let archive = repo().join("target/image/lastgasp.oci.tar");
    assert!(
        archive.is_file(),
        "{} is missing: run `cargo xtask image` (`cargo xtask test` does)",
        archive.display()
    );
    archive
}

async fn pods(client: &Client, namespace: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default()
}

fn running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        == Some("Running")
}

/// The agent pod's log so far.
async fn agent_log(client: &Client) -> String {
    logs(client, "lastgasp-agent-").await
}

/// The logs so far of lastgasp's pods whose names start with `prefix`, one after another.
async fn logs(client: &Client, prefix: &str) -> String {
    let api = Api::<Pod>::namespaced(client.clone(), LASTGASP_NAMESPACE);
    let mut logs = String::new();
    for pod in pods(client, LASTGASP_NAMESPACE).await {
        let name = pod.metadata.name.unwrap_or_default();
        if name.starts_with(prefix) {
            let log = api.logs(&name, &LogParams::default()).await;
            logs += &format!("--- {name}\n{}\n", log.unwrap_or_else(|e| e.to_string()));
        }
    }
    logs
}

/// [`eventually`], and on a timeout the agent's and the controllers' logs in the failure.
async fn eventually_or_logs<F, Fut>(client: &Client, what: &str, within: Duration, done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if tokio::time::timeout(within, wait_until(done))
        .await
        .is_err()
    {
        panic!(
            "timed out waiting for {what}\n{}{}",
            logs(client, "lastgasp-agent-").await,
            logs(client, "lastgasp-controller-").await
        );
    }
}

async fn wait_until<F, Fut>(mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    while !done().await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape_agent() -> String {
    lastgasp_tests::scrape(SocketAddr::from((NODE_IP, AGENT_METRICS_PORT))).await
}

/// The `_count` of the agent's CNI call histogram for `plugin` and `command`.
fn cni_calls(exposition: &str, plugin: &str, command: &str) -> u64 {
    let prefix = format!(
        "lastgasp_cni_call_duration_seconds_count{{plugin=\"{plugin}\",command=\"{command}\",result=\"success\"}} "
    );
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// The agent's `cni_call` events (JSON log lines) for `command` on pod `namespace/name`.
fn cni_events(log: &str, command: &str, namespace: &str, name: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| {
            event["kind"] == "cni_call"
                && event["command"] == command
                && event["pod_namespace"] == namespace
                && event["pod_name"] == name
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_runs_on_a_real_node_and_a_panic_line_marks_it() {
    let cluster = LocalCluster::start(&[image_archive()])
        .await
        .expect("the single-node cluster (see `cargo xtask cluster up`)");
    let admin = cluster
        .server()
        .admin_client()
        .await
        .expect("an admin client");

    // The Namespace and the authentication key, as deploy/README.md says, then deploy/.
    cluster.deploy_lastgasp().await.expect("deploy/ applied");

    // Both workloads run: one agent on the node, both controller replicas, one leading.
    let daemonsets = Api::<DaemonSet>::namespaced(admin.clone(), LASTGASP_NAMESPACE);
    let deployments = Api::<Deployment>::namespaced(admin.clone(), LASTGASP_NAMESPACE);
    eventually(
        "the agent and both controllers Running and ready",
        Duration::from_secs(120),
        || async {
            let agent_ready = daemonsets
                .get("lastgasp-agent")
                .await
                .ok()
                .and_then(|ds| ds.status)
                .is_some_and(|status| status.number_ready == 1);
            let controllers_ready = deployments
                .get("lastgasp-controller")
                .await
                .ok()
                .and_then(|deployment| deployment.status)
                .is_some_and(|status| status.ready_replicas == Some(2));
            agent_ready
                && controllers_ready
                && pods(&admin, LASTGASP_NAMESPACE)
                    .await
                    .iter()
                    .filter(|pod| running(pod))
                    .count()
                    == 3
        },
    )
    .await;
    let leases = Api::<Lease>::namespaced(admin.clone(), LASTGASP_NAMESPACE);
    eventually("a controller leads", Duration::from_secs(60), || async {
        leases
            .get_opt("lastgasp-controller")
            .await
            .ok()
            .flatten()
            .and_then(|lease| lease.spec?.holder_identity)
            .is_some()
    })
    .await;

    // The agent attached its probes (tracepoints at least, on this kernel) and found the
    // leader's ingest endpoint through the v1beta1 EndpointSlices of v1.20.
    eventually(
        "the agent's start-up lines",
        Duration::from_secs(60),
        || async {
            let log = agent_log(&admin).await;
            [
                "cni_exec: attached",
                "process_exit: attached",
                "console: attached",
                "netlink_recv: attached",
            ]
            .iter()
            .all(|line| log.contains(line))
                && log.contains("discovery.k8s.io/v1beta1")
                && log.contains("controller endpoints changed")
        },
    )
    .await;

    // A pod of the test: containerd runs the real CNI plugins for its sandbox.
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "team" } })).unwrap(),
        )
        .await
        .unwrap();
    let team = Api::<Pod>::namespaced(admin.clone(), "team");
    let victim: Pod = serde_json::from_value(json!({
        "metadata": { "name": "victim" },
        "spec": {
            "containers": [{
                "name": "app",
                "image": bin_dir::PAUSE_IMAGE,
                "imagePullPolicy": "Never",
            }],
            "terminationGracePeriodSeconds": 0,
        },
    }))
    .unwrap();
    // Refused until the token controller has given the namespace's `default` ServiceAccount
    // its token.
    eventually("the test pod created", Duration::from_secs(30), || async {
        team.create(&PostParams::default(), &victim).await.is_ok()
    })
    .await;
    eventually("the test pod Running", Duration::from_secs(60), || async {
        team.get("victim").await.is_ok_and(|pod| running(&pod))
    })
    .await;
    eventually(
        "the agent's ADD calls of the test pod",
        Duration::from_secs(30),
        || async {
            let log = agent_log(&admin).await;
            let events = cni_events(&log, "ADD", "team", "victim");
            ["loopback", "bridge", "host-local"]
                .iter()
                .all(|plugin| events.iter().any(|event| event["plugin"] == *plugin))
        },
    )
    .await;
    let exposition = scrape_agent().await;
    for plugin in ["loopback", "bridge", "host-local"] {
        assert!(
            cni_calls(&exposition, plugin, "ADD") >= 1,
            "no ADD of {plugin} counted:\n{exposition}"
        );
    }
    for event in cni_events(&agent_log(&admin).await, "ADD", "team", "victim") {
        assert!(
            event["duration_seconds"].as_f64().is_some_and(|d| d > 0.0),
            "{event}"
        );
        assert_eq!(event["result"], "success", "{event}");
    }

    // A container whose thread blocks in netlink `recvfrom`: past the agent's 30 s threshold
    // it is named with its pod and container, in the log and in an Event on the Pod.
    let stuck: Pod = serde_json::from_value(json!({
        "metadata": { "name": "stuck" },
        "spec": {
            "containers": [{
                "name": "netlink",
                "image": bin_dir::PAUSE_IMAGE,
                "command": ["/netlink-recv"],
                "imagePullPolicy": "Never",
            }],
            "terminationGracePeriodSeconds": 0,
        },
    }))
    .unwrap();
    team.create(&PostParams::default(), &stuck).await.unwrap();

    // A panic line in this host's kernel log: the agent's console probe sees it and sends a
    // last gasp to the leader's pod address; the leader marks the Node and the pods on it.
    fs_write_kmsg("<0>Kernel panic - not syncing: lastgasp cluster test\n");
    let nodes = Api::<Node>::all(admin.clone());
    let marked = Duration::from_secs(60);
    eventually_or_logs(&admin, "the Node marked", marked, || async {
        nodes.get(NODE_NAME).await.is_ok_and(|node| {
            node.metadata
                .annotations
                .unwrap_or_default()
                .contains_key("lastgasp.io/incident")
        })
    })
    .await;
    eventually_or_logs(&admin, "the test pod marked", marked, || async {
        team.get("victim").await.is_ok_and(|pod| {
            let annotated = pod
                .metadata
                .annotations
                .unwrap_or_default()
                .get("lastgasp.io/termination-reason")
                .is_some_and(|reason| reason.contains("panic"));
            let condition = pod
                .status
                .and_then(|status| status.conditions)
                .unwrap_or_default()
                .iter()
                .any(|condition| {
                    condition.type_ == "DisruptionTarget" && condition.status == "True"
                });
            annotated && condition
        })
    })
    .await;
    // Marks only (the annotate-only policy): the Node and the pod are still there.
    assert!(nodes.get_opt(NODE_NAME).await.unwrap().is_some());
    assert!(team.get_opt("victim").await.unwrap().is_some());

    eventually(
        "the stuck container's hang named with its pod",
        Duration::from_secs(90),
        || async {
            agent_log(&admin)
                .await
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .any(|event| {
                    event["kind"] == "netlink_hang"
                        && event["comm"] == "netlink-recv"
                        && event["syscall"] == "recvfrom"
                        && event["protocol"] == "route"
                        && event["pod_namespace"] == "team"
                        && event["pod_name"] == "stuck"
                        && event["container"] == "netlink"
                })
        },
    )
    .await;
    let stuck_uid = team.get("stuck").await.unwrap().metadata.uid;
    eventually(
        "the hang's Event on the Pod",
        Duration::from_secs(30),
        || async {
            Api::<Event>::namespaced(admin.clone(), "team")
                .list(&ListParams::default())
                .await
                .map(|list| list.items)
                .unwrap_or_default()
                .iter()
                .any(|event| {
                    event.reason.as_deref() == Some("NetlinkRecvHung")
                        && event.regarding.as_ref().and_then(|r| r.uid.clone()) == stuck_uid
                        && event.note.as_deref().is_some_and(|note| {
                            note.contains("in pod team/stuck container netlink")
                        })
                })
        },
    )
    .await;

    // Deleting the pod makes containerd run the plugins' DEL, reported too.
    team.delete("victim", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the agent's DEL calls of the test pod",
        Duration::from_secs(60),
        || async {
            let log = agent_log(&admin).await;
            let events = cni_events(&log, "DEL", "team", "victim");
            ["bridge", "host-local"]
                .iter()
                .all(|plugin| events.iter().any(|event| event["plugin"] == *plugin))
        },
    )
    .await;
    let exposition = scrape_agent().await;
    assert!(cni_calls(&exposition, "bridge", "DEL") >= 1, "{exposition}");
    drop(cluster);
    assert!(
        !Path::new("/sys/class/net/lg-cni0").exists()
            && !Path::new("/sys/class/net/lg-node0").exists(),
        "the cluster's bridges outlived it"
    );
}

/// One write to /dev/kmsg is one record.
fn fs_write_kmsg(record: &str) {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut kmsg| kmsg.write_all(record.as_bytes()))
        .expect("write /dev/kmsg");
}
