//! A CNI plugin that hangs in netlink `recvfrom`, for real, on the single-node test cluster
//! (`lastgasp_tests::kube::node`) with `deploy/overlays/test-cluster` applied: the agent's
//! `NetlinkRecvHung` and `CNICallsStuck` conditions turn True on the Node with Warning Events
//! and one Event linking the stuck calls to the hung thread, the pod stays in
//! ContainerCreating, and once the plugin is out of the chain and killed the pod runs and
//! everything clears. kubelet's own Ready is recorded as it goes.
//!
//! Needs what `cluster_deploy.rs` needs. It runs about two minutes: the agent's default
//! thresholds (a 30 s netlink hang, a 1 min CNI call) are the deployed ones.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, Node, Pod},
    events::v1::Event,
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use lastgasp_tests::kube::{
    bin_dir,
    cluster::eventually,
    node::{LASTGASP_NAMESPACE, LocalCluster, NODE_NAME},
};
use serde_json::json;

const PLUGIN: &str = "lastgasp-hang";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The Node's condition `type_`: (status, message).
async fn condition(nodes: &Api<Node>, type_: &str) -> Option<(String, String)> {
    let node = nodes.get(NODE_NAME).await.ok()?;
    node.status?
        .conditions?
        .into_iter()
        .find(|condition| condition.type_ == type_)
        .map(|condition| (condition.status, condition.message.unwrap_or_default()))
}

/// Events with `reason` about objects named `name`, any namespace.
async fn events(client: &kube::Client, reason: &str, name: &str) -> Vec<Event> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|event| {
            event.reason.as_deref() == Some(reason)
                && event
                    .regarding
                    .as_ref()
                    .and_then(|object| object.name.as_deref())
                    == Some(name)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cni_plugin_hung_in_netlink_recv_shows_on_the_node_and_clears() {
    let archive = repo().join("target/image/lastgasp.oci.tar");
    assert!(archive.is_file(), "run `cargo xtask image` first");
    let mut cluster = LocalCluster::start(&[archive]).await.expect("the cluster");
    let admin = cluster.server().admin_client().await.unwrap();
    cluster.deploy_lastgasp().await.expect("deploy/ applied");
    let team: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": "team" } })).unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &team)
        .await
        .unwrap();
    let daemonsets = Api::<DaemonSet>::namespaced(admin.clone(), LASTGASP_NAMESPACE);
    let nodes = Api::<Node>::all(admin.clone());
    eventually(
        "the agent ready, its conditions written",
        Duration::from_secs(120),
        || async {
            daemonsets
                .get("lastgasp-agent")
                .await
                .ok()
                .and_then(|ds| ds.status)
                .is_some_and(|status| status.number_ready == 1)
                && condition(&nodes, "NetlinkRecvHung")
                    .await
                    .is_some_and(|(status, _)| status == "False")
        },
    )
    .await;

    cluster
        .add_cni_plugin(Path::new(env!("CARGO_BIN_EXE_lastgasp-hang-cni")), PLUGIN)
        .unwrap();
    // containerd reloads the conflist when it changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let team = Api::<Pod>::namespaced(admin.clone(), "team");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "stuck" },
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
    eventually("the pod created", Duration::from_secs(30), || async {
        team.create(&PostParams::default(), &pod).await.is_ok()
    })
    .await;
    let created = Instant::now();

    eventually("NetlinkRecvHung True", Duration::from_secs(90), || async {
        condition(&nodes, "NetlinkRecvHung")
            .await
            .is_some_and(|(status, message)| status == "True" && message.contains(PLUGIN))
    })
    .await;
    let hung_after = created.elapsed();
    eventually(
        "CNICallsStuck True for team/stuck",
        Duration::from_secs(90),
        || async {
            condition(&nodes, "CNICallsStuck")
                .await
                .is_some_and(|(status, message)| {
                    status == "True" && message.contains(PLUGIN) && message.contains("team/stuck")
                })
        },
    )
    .await;
    let stuck_after = created.elapsed();
    let pod_now = team.get("stuck").await.unwrap();
    let waiting = pod_now
        .status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .and_then(|statuses| statuses.first())
        .and_then(|status| status.state.as_ref()?.waiting.as_ref()?.reason.clone());
    assert_eq!(waiting.as_deref(), Some("ContainerCreating"), "{pod_now:?}");
    let ready = condition(&nodes, "Ready").await;
    assert!(
        !events(&admin, "NetlinkRecvHung", NODE_NAME)
            .await
            .is_empty()
    );
    assert!(!events(&admin, "CNICallsStuck", NODE_NAME).await.is_empty());
    assert!(!events(&admin, "CNICallStuck", "stuck").await.is_empty());
    // One Node Event ties the stuck calls to the hung thread: here the plugin call itself.
    let link = events(&admin, "CNICallsBehindNetlinkHang", NODE_NAME).await;
    assert_eq!(link.len(), 1, "{link:?}");
    let note = link[0].note.as_deref().unwrap_or_default();
    assert!(
        note.contains(&format!("The thread is the CNI plugin call {PLUGIN} ADD"))
            && note.contains("for pod team/stuck"),
        "{note}"
    );
    eprintln!(
        "NetlinkRecvHung after {hung_after:.0?}, CNICallsStuck after {stuck_after:.0?}; \
         the pod in ContainerCreating; kubelet's Ready: {ready:?}"
    );

    // Out of the chain and killed: the sandbox is retried without it.
    cluster.remove_cni_plugin(PLUGIN).unwrap();
    let unblocked = Instant::now();
    kill_plugin();
    eventually("the pod Running", Duration::from_secs(120), || async {
        team.get("stuck").await.is_ok_and(|pod| {
            pod.status.and_then(|status| status.phase).as_deref() == Some("Running")
        })
    })
    .await;
    let running_after = unblocked.elapsed();
    eventually("both conditions False", Duration::from_secs(60), || async {
        condition(&nodes, "NetlinkRecvHung")
            .await
            .is_some_and(|(status, _)| status == "False")
            && condition(&nodes, "CNICallsStuck")
                .await
                .is_some_and(|(status, _)| status == "False")
    })
    .await;
    assert!(
        !events(&admin, "NetlinkRecvHangCleared", NODE_NAME)
            .await
            .is_empty()
    );
    assert!(
        !events(&admin, "CNICallsCleared", NODE_NAME)
            .await
            .is_empty()
    );
    assert_eq!(
        condition(&nodes, "Ready")
            .await
            .map(|(status, _)| status)
            .as_deref(),
        Some("True")
    );
    eprintln!("unblocked: the pod Running after {running_after:.0?}, both conditions False");
}

/// SIGKILLs the hung plugin (containerd's child, in no pod).
fn kill_plugin() {
    let path = format!("/usr/lib/cni/{PLUGIN}");
    for entry in std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok())
    {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|byte| *byte == 0).next() == Some(path.as_bytes()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
