//! Container terminations on a real kubelet and containerd: the single-node test cluster
//! (`lastgasp_tests::kube::node`) with `deploy/overlays/test-cluster` applied. A container
//! SIGKILLed by a host process twice (restarted by kubelet at once, then after its back-off), a
//! container OOM-killed by its `resources.limits.memory`, and a child process OOM-killed while
//! its container runs on, and a container that sleeps through SIGTERM, stopped by kubelet
//! after a failed liveness probe: each gets the agent's Event on its Pod, naming who or what
//! killed it (for the last, the runtime once the grace period ran out), and the restart's
//! back-off is compared with the one kubelet actually used.
//!
//! Needs what `cluster_deploy.rs` needs; runs about two minutes.

use std::{path::PathBuf, process::Command, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ContainerStatus, Namespace, Pod},
        events::v1::Event,
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ListParams, LogParams, PostParams},
};
use lastgasp_tests::kube::{
    bin_dir,
    cluster::{eventually, eventually_some},
    node::{LASTGASP_NAMESPACE, LocalCluster},
};
use serde_json::{Value, json};

const TEAM: &str = "team";

fn image_archive() -> PathBuf {
    let archive =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/image/lastgasp.oci.tar");
    assert!(archive.is_file(), "run `cargo xtask image` first");
    archive
}

/// A pod of one container `app` running `command` from the test image, limited to 32Mi.
fn pod(name: &str, command: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "containers": [{
                "name": "app",
                "image": bin_dir::PAUSE_IMAGE,
                "command": command,
                "imagePullPolicy": "Never",
                "resources": { "limits": { "memory": "32Mi" } },
            }],
            "terminationGracePeriodSeconds": 0,
        },
    }))
    .unwrap()
}

/// A pod whose container ignores SIGTERM and fails its liveness probe (nothing listens on
/// its port): kubelet stops it with SIGTERM, then SIGKILL once the 2 s grace period is over.
fn slow_stop_pod() -> Pod {
    let mut pod = pod("slow-stop", &["/pause", "ignore-term"]);
    let spec = pod.spec.as_mut().unwrap();
    spec.termination_grace_period_seconds = Some(2);
    spec.containers[0].liveness_probe = Some(
        serde_json::from_value(json!({
            "tcpSocket": { "port": 9 },
            "initialDelaySeconds": 2,
            "periodSeconds": 2,
            "failureThreshold": 1,
        }))
        .unwrap(),
    );
    pod
}

fn app_status(pod: &Pod) -> Option<ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()
        .cloned()
}

fn running_with_restarts(pod: &Pod, restarts: i32) -> bool {
    app_status(pod).is_some_and(|status| {
        status.restart_count == restarts
            && status
                .state
                .as_ref()
                .is_some_and(|state| state.running.is_some())
    })
}

/// The host pids in the container whose runtime id is `id` (from their cgroup paths).
fn container_pids(id: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|cgroup| cgroup.contains(id))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs the container's process with `kill(1)`, a host process; returns kill's pid.
fn kill_container(pod: &Pod) -> u32 {
    let id = app_status(pod)
        .and_then(|status| status.container_id)
        .expect("a container id");
    let id = id.split_once("://").expect("runtime://id").1;
    let pids = container_pids(id);
    assert_eq!(pids.len(), 1, "the pause container's processes: {pids:?}");
    let mut kill = Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .spawn()
        .expect("kill(1)");
    let sender = kill.id();
    assert!(kill.wait().unwrap().success());
    sender
}

async fn events(client: &Client, pod: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), TEAM)
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|event| {
            event.reason.as_deref() == Some(reason)
                && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
        })
        .collect()
}

/// The note of the one Event `reason` about `pod` whose note contains `marker`.
async fn note_with(client: &Client, pod: &str, reason: &str, marker: &str) -> Option<String> {
    events(client, pod, reason)
        .await
        .into_iter()
        .filter_map(|event| event.note)
        .find(|note| note.contains(marker))
}

/// [`note_with`] once it is there; after `within`, fails with every Event of the pod and the
/// agent's `container_termination` lines.
async fn wait_note(client: &Client, pod: &str, reason: &str, marker: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(note) = note_with(client, pod, reason, marker).await {
            return note;
        }
        if std::time::Instant::now() > deadline {
            let seen: Vec<String> = Api::<Event>::namespaced(client.clone(), TEAM)
                .list(&ListParams::default())
                .await
                .map(|list| list.items)
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
                .map(|e| format!("{:?}: {:?}", e.reason, e.note))
                .collect();
            let log = agent_log(client).await;
            let lines: Vec<&str> = log
                .lines()
                .filter(|line| line.contains("container_termination"))
                .collect();
            panic!(
                "no {reason} Event about {pod} with {marker:?}; its Events: {seen:#?}\n\
                 the agent's terminations:\n{}",
                lines.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn time(text: &str) -> Timestamp {
    text.parse().unwrap()
}

/// kubelet's delay before a restart: from the last exit to the new container's start.
fn restart_delay(status: &ContainerStatus) -> Duration {
    let finished = status
        .last_state
        .as_ref()
        .and_then(|state| state.terminated.as_ref())
        .and_then(|terminated| terminated.finished_at.as_ref())
        .expect("lastState.terminated.finishedAt");
    let started = status
        .state
        .as_ref()
        .and_then(|state| state.running.as_ref())
        .and_then(|running| running.started_at.as_ref())
        .expect("state.running.startedAt");
    let between = time(&started.0.to_string()).duration_since(time(&finished.0.to_string()));
    Duration::try_from(between).unwrap_or_default()
}

async fn agent_log(client: &Client) -> String {
    let api = Api::<Pod>::namespaced(client.clone(), LASTGASP_NAMESPACE);
    let Ok(list) = api.list(&ListParams::default()).await else {
        return String::new();
    };
    let Some(agent) = list
        .items
        .into_iter()
        .find(|pod| pod.name_any().starts_with("lastgasp-agent-"))
    else {
        return String::new();
    };
    api.logs(&agent.name_any(), &LogParams::default())
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn container_kills_and_ooms_on_a_real_kubelet_are_explained_on_their_pods() {
    let cluster = LocalCluster::start(&[image_archive()])
        .await
        .expect("the single-node cluster (see `cargo xtask cluster up`)");
    let admin = cluster.server().admin_client().await.unwrap();
    cluster.deploy_lastgasp().await.expect("deploy/ applied");
    let daemonsets = Api::<DaemonSet>::namespaced(admin.clone(), LASTGASP_NAMESPACE);
    eventually(
        "the agent ready with its termination probes",
        Duration::from_secs(120),
        || async {
            let ready = daemonsets
                .get("lastgasp-agent")
                .await
                .ok()
                .and_then(|ds| ds.status)
                .is_some_and(|status| status.number_ready == 1);
            let log = agent_log(&admin).await;
            ready && log.contains("signal: attached") && log.contains("oom: attached")
        },
    )
    .await;

    let team: Namespace = serde_json::from_value(json!({ "metadata": { "name": TEAM } })).unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &team)
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(admin.clone(), TEAM);
    // Refused until the token controller has given the namespace's ServiceAccount its token.
    for pod in [
        pod("killed", &["/pause"]),
        pod("oom", &["/memhog"]),
        pod("child-oom", &["/memhog", "child"]),
        slow_stop_pod(),
    ] {
        eventually("a test pod created", Duration::from_secs(30), || async {
            pods.create(&PostParams::default(), &pod).await.is_ok()
        })
        .await;
    }

    // Killed by a host process: kubelet restarts it at once, then, killed again, after 10 s.
    let mut senders = Vec::new();
    for restarts in 0..2 {
        let running = eventually_some(
            "the pause container running",
            Duration::from_secs(60),
            || async {
                let pod = pods.get("killed").await.ok()?;
                running_with_restarts(&pod, restarts).then_some(pod)
            },
        )
        .await;
        senders.push(kill_container(&running));
    }
    let restarted = eventually_some(
        "the pause container running after two restarts",
        Duration::from_secs(60),
        || async {
            let pod = pods.get("killed").await.ok()?;
            running_with_restarts(&pod, 2).then_some(pod)
        },
    )
    .await;
    let status = app_status(&restarted).unwrap();
    let actual = restart_delay(&status);
    wait_note(&admin, "killed", "ContainerKilled", "restart 2 ").await;
    let first = note_with(&admin, "killed", "ContainerKilled", "restart 1 ")
        .await
        .expect("restart 1's Event");
    let second = note_with(&admin, "killed", "ContainerKilled", "restart 2 ")
        .await
        .expect("restart 2's Event");
    for (note, sender) in [(&first, senders[0]), (&second, senders[1])] {
        assert!(note.contains("killed by"), "{note}");
        assert!(
            note.contains(&format!("host process kill (pid {sender}")),
            "{note}"
        );
    }
    assert!(first.contains("kubelet starts it again at once"), "{first}");
    assert!(
        second.contains("kubelet waits 10s (next start ≈ "),
        "{second}"
    );
    // kubelet never starts early; how much later it starts is its sync loop's, and reported.
    assert!(
        actual >= Duration::from_secs(9),
        "restarted after {actual:?}"
    );
    eprintln!(
        "back-off: lastgasp said 10s; kubelet restarted after {actual:?} (second granularity)"
    );

    let annotation = pods
        .get("killed")
        .await
        .unwrap()
        .annotations()
        .get("lastgasp.io/last-termination.app")
        .cloned()
        .expect("the last-termination annotation");
    let annotation: Value = serde_json::from_str(&annotation).unwrap();
    assert_eq!(annotation["cause"], "killed", "{annotation}");
    assert_eq!(annotation["sender"]["comm"], "kill", "{annotation}");

    // OOM-killed by its memory limit: kubelet says OOMKilled; lastgasp adds the limit and RSS.
    let oom_note = wait_note(
        &admin,
        "oom",
        "ContainerOOMKilled",
        "killed by the OOM killer",
    )
    .await;
    assert!(
        // The pod's cgroup has the same 32Mi limit plus the sandbox's few pages: the kernel
        // names whichever limit was hit first, never the node.
        oom_note.contains("container limit 32Mi, rss ")
            || oom_note.contains("pod limit 32Mi, rss "),
        "{oom_note}"
    );
    let oom_pod = pods.get("oom").await.unwrap();
    let kubelet_reason = app_status(&oom_pod).and_then(|status| {
        let state = status.last_state.or(status.state)?;
        state.terminated?.reason
    });
    assert_eq!(kubelet_reason.as_deref(), Some("OOMKilled"), "{oom_pod:?}");

    // A child OOM-killed while the container lives: kubelet shows nothing, lastgasp does.
    let child_note = wait_note(
        &admin,
        "child-oom",
        "ProcessOOMKilled",
        "the container keeps running",
    )
    .await;
    assert!(child_note.contains("process memhog (pid "), "{child_note}");
    assert!(
        child_note.contains("killed by the OOM killer"),
        "{child_note}"
    );
    let child_pod = pods.get("child-oom").await.unwrap();
    assert!(running_with_restarts(&child_pod, 0), "{child_pod:?}");

    // Stopped by kubelet: SIGTERM ignored, SIGKILL from the runtime after the grace period.
    let stop_note = wait_note(
        &admin,
        "slow-stop",
        "ContainerKilled",
        "grace period after its SIGTERM ran out",
    )
    .await;
    assert!(stop_note.contains("the container runtime"), "{stop_note}");
    let annotation = eventually_some(
        "the slow-stop annotation",
        Duration::from_secs(30),
        || async {
            let pod = pods.get("slow-stop").await.ok()?;
            let annotation = pod.annotations().get("lastgasp.io/last-termination.app")?;
            serde_json::from_str::<Value>(annotation).ok()
        },
    )
    .await;
    let sender = &annotation["sender"];
    assert_eq!(sender["kind"], "runtime", "{annotation}");
    assert_eq!(sender["grace_period_expired"], true, "{annotation}");
    let grace = sender["grace_seconds"]
        .as_f64()
        .expect("the grace period seen");
    assert!((1.5..5.0).contains(&grace), "{annotation}");
    eprintln!("kill: {second}\nOOM: {oom_note}\nchild OOM: {child_note}\nslow stop: {stop_note}");
}
