//! The termination writer against the real kube-apiserver v1.20.2, as the agent's
//! ServiceAccount under `deploy/`'s RBAC, through the proxy: terminations built here (the
//! tracker that finds them in the kernel has tests of its own) become Events on their Pod,
//! with the back-off computed from a status written as kubelet writes it (through the status
//! subresource), the annotation `lastgasp.io/last-termination.<container>` by server-side
//! apply as `lastgasp-agent`, the back-off gauge, and the per-pod Event rate limit.
//!
//! Needs the binaries of `cargo xtask kube`.

use std::time::{Duration, SystemTime};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use lastgasp::{
    agent::{
        pods::{ContainerRef, PodIndex},
        terminations::{
            Cause, OomKill, OomScope, Sender, Termination,
            backoff::KubeletBackoff,
            report::{self, POD_EVENT_BURST, ReportConfig},
        },
    },
    metrics::{AgentMetrics, ContainerLabels, KubernetesWriteLabels},
};
use lastgasp_tests::kube::cluster::{Cluster, eventually};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const MI: u64 = 1 << 20;

/// `web-0` in `shop` on `node-a`, with the containers `app` and `sidecar`. Its uid.
async fn put_pod(cluster: &Cluster) -> String {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "web-0", "namespace": "shop" },
        "spec": { "nodeName": "node-a", "containers": [
            { "name": "app", "image": "app" },
            { "name": "sidecar", "image": "sidecar" },
        ]},
    });
    Api::<Pod>::namespaced(cluster.admin().clone(), "shop")
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod).unwrap(),
        )
        .await
        .expect("create a pod")
        .metadata
        .uid
        .expect("a uid")
}

/// What kubelet writes after `app`'s fifth run (restarted 4 times) ended at `finished` after
/// 5 s, killed by the OOM killer, while it holds the container back; `sidecar` runs since 100
/// s before, restarted once.
async fn write_status(cluster: &Cluster, finished: Timestamp) {
    let at = |seconds: i64| (finished + SignedDuration::from_secs(seconds)).to_string();
    let status = json!({ "status": {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": "app", "image": "app", "imageID": "", "ready": false, "restartCount": 4,
                "containerID": "containerd://app-run-5",
                "state": { "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off 1m20s restarting failed container=app pod=web-0_shop(uid)",
                }},
                "lastState": { "terminated": {
                    "containerID": "containerd://app-run-5", "exitCode": 137, "reason": "OOMKilled",
                    "startedAt": at(-5), "finishedAt": at(0),
                }},
            },
            {
                "name": "sidecar", "image": "sidecar", "imageID": "", "ready": true, "restartCount": 1,
                "containerID": "containerd://sidecar-run-2",
                "state": { "running": { "startedAt": at(-100) } },
            },
        ],
    }});
    Api::<Pod>::namespaced(cluster.admin().clone(), "shop")
        .patch_status("web-0", &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("write the pod's status");
}

fn termination(container: &str, id: &str, at: Timestamp, main: bool, cause: Cause) -> Termination {
    Termination {
        at: SystemTime::from(at),
        container_id: id.into(),
        container: Some(ContainerRef {
            namespace: "shop".into(),
            pod: "web-0".into(),
            container: container.into(),
        }),
        pid: 4242,
        comm: "server".into(),
        main_process: main,
        cause,
    }
}

async fn events(cluster: &Cluster, reason: &str) -> Vec<Event> {
    cluster
        .events_about("Pod", "web-0")
        .await
        .into_iter()
        .filter(|event| event.reason.as_deref() == Some(reason))
        .collect()
}

async fn annotation(cluster: &Cluster, key: &str) -> Option<Value> {
    let pod = cluster.get("pods", Some("shop"), "web-0").await?;
    let value = pod["metadata"]["annotations"][key].as_str()?;
    Some(serde_json::from_str(value).expect("JSON"))
}

fn writes(metrics: &AgentMetrics, object: &str, result: &str) -> u64 {
    metrics
        .kubernetes_writes
        .get_or_create(&KubernetesWriteLabels {
            object: object.into(),
            result: result.into(),
        })
        .get()
}

#[tokio::test(flavor = "multi_thread")]
async fn terminations_become_events_annotations_and_back_off_on_the_pod() {
    let cluster = Cluster::start().await;
    cluster.namespace("shop").await;
    cluster.node("node-a", "127.0.0.2", None).await;
    let uid = put_pod(&cluster).await;
    // Whole seconds, as the status has them.
    let finished = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
    write_status(&cluster, finished).await;

    let metrics = AgentMetrics::register(&mut Registry::default());
    let (queue, queued) = mpsc::channel(report::QUEUE);
    let writer = tokio::spawn(report::write(
        cluster.client_as("lastgasp-agent").await,
        ReportConfig {
            node: "node-a".into(),
            backoff: KubeletBackoff::default(),
            pods: PodIndex::default(),
        },
        queued,
        metrics.clone(),
    ));

    // The container's end the status shows: kubelet's restartCount and finishedAt.
    let oom = Cause::OomKilled(Box::new(OomKill {
        scope: OomScope::Container,
        rss_bytes: Some(255 * MI),
        oom_score_adj: Some(984),
        limit_bytes: Some(256 * MI),
        memory_events: None,
    }));
    queue
        .send(termination("app", "app-run-5", finished, true, oom))
        .await
        .unwrap();
    eventually("the OOM kill's Event", Duration::from_secs(10), || async {
        !events(&cluster, "ContainerOOMKilled").await.is_empty()
    })
    .await;
    let event = events(&cluster, "ContainerOOMKilled").await.remove(0);
    let next_start = finished + SignedDuration::from_secs(80);
    assert_eq!(
        event.note.as_deref(),
        Some(
            format!(
                "restart 5 of container app: killed by the OOM killer (container limit 256Mi, \
                 rss 255Mi); kubelet waits 80s (next start ≈ {}); the delay resets after 10 \
                 min of running",
                next_start.strftime("%H:%M:%S UTC")
            )
            .as_str()
        )
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.action.as_deref(), Some("Explained"));
    assert_eq!(event.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(
        event.reporting_controller.as_deref(),
        Some("lastgasp.io/agent")
    );
    assert_eq!(event.reporting_instance.as_deref(), Some("node-a"));
    let regarding = event.regarding.expect("regarding");
    assert_eq!(regarding.uid.as_deref(), Some(uid.as_str()));
    assert_eq!(
        regarding.field_path.as_deref(),
        Some("spec.containers{app}")
    );

    let app_key = "lastgasp.io/last-termination.app";
    eventually("app's annotation", Duration::from_secs(10), || async {
        annotation(&cluster, app_key).await.is_some()
    })
    .await;
    let app = annotation(&cluster, app_key).await.unwrap();
    assert_eq!(app["cause"], "oom_killed");
    assert_eq!(app["signal"], "SIGKILL");
    assert_eq!(app["container_id"], "app-run-5");
    assert_eq!(app["oom"]["limit_bytes"], 256 * MI);
    assert_eq!(app["restart_count"], 4);
    assert_eq!(
        app["back_off"],
        json!({
            "rules": "classic", "restart": 5, "delay_seconds": 80.0,
            "next_start": next_start.to_string(), "reset": false,
            // The status's CrashLoopBackOff message has kubelet's own figure.
            "delay_from_kubelet": true, "estimated": false,
        })
    );
    // Kubelet holds it back until the expected start.
    let backoff = |container: &str| {
        metrics
            .container_backoff
            .get(&ContainerLabels {
                namespace: "shop".into(),
                pod: "web-0".into(),
                container: container.into(),
            })
            .map(|gauge| gauge.get())
    };
    assert_eq!(backoff("app"), Some(80.0));

    // The sidecar's end that the status never shows (it still runs there): after the bounded
    // wait (the exit was 4 s ago), an estimate from the latest status.
    let exited = Timestamp::now() - SignedDuration::from_secs(4);
    let host_kill = Cause::Killed {
        signal: 9,
        sender: Sender::Host {
            pid: 900,
            comm: "pkill".into(),
            cgroup: Some("/system.slice/ssh.service".into()),
        },
    };
    queue
        .send(termination(
            "sidecar",
            "sidecar-run-2",
            exited,
            true,
            host_kill,
        ))
        .await
        .unwrap();
    eventually("the sidecar's Event", Duration::from_secs(15), || async {
        !events(&cluster, "ContainerKilled").await.is_empty()
    })
    .await;
    let note = events(&cluster, "ContainerKilled")
        .await
        .remove(0)
        .note
        .unwrap();
    assert!(
        note.starts_with(
            "restart 2 of container sidecar: killed by SIGKILL from host process pkill (pid \
             900, cgroup /system.slice/ssh.service); kubelet waits 10s (next start ≈ "
        ),
        "{note}"
    );
    assert!(
        note.ends_with(
            "(estimated from restartCount 1: kubelet's status did not show this exit within 5s)"
        ),
        "{note}"
    );
    let sidecar_key = "lastgasp.io/last-termination.sidecar";
    eventually(
        "the sidecar's annotation",
        Duration::from_secs(10),
        || async { annotation(&cluster, sidecar_key).await.is_some() },
    )
    .await;
    let sidecar = annotation(&cluster, sidecar_key).await.unwrap();
    assert_eq!(sidecar["sender"]["kind"], "host");
    assert_eq!(sidecar["back_off"]["estimated"], true);
    // One manager applied both: the second apply kept the first's annotation.
    assert_eq!(annotation(&cluster, app_key).await, Some(app));
    let pod = cluster.get("pods", Some("shop"), "web-0").await.unwrap();
    let applied: Vec<&Value> = pod["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|fields| fields["manager"] == "lastgasp-agent")
        .collect();
    assert_eq!(applied.len(), 1, "{applied:#?}");
    assert_eq!(applied[0]["operation"], "Apply");
    let owned = &applied[0]["fieldsV1"]["f:metadata"]["f:annotations"];
    assert!(owned.get(format!("f:{app_key}")).is_some(), "{owned}");
    assert!(owned.get(format!("f:{sidecar_key}")).is_some(), "{owned}");

    // A storm of child processes killed: the pod's budget (less the two Events above) goes
    // out, the rest is counted, not written.
    let storm = 12;
    for pid in 0..storm {
        let mut killed = termination(
            "app",
            "app-run-6",
            Timestamp::now(),
            false,
            Cause::Killed {
                signal: 15,
                sender: Sender::Kernel,
            },
        );
        killed.pid = 5000 + pid;
        queue.send(killed).await.unwrap();
    }
    let published = u64::from(POD_EVENT_BURST) - 2;
    eventually("the storm's limit", Duration::from_secs(15), || async {
        writes(&metrics, "event", "rate_limited") == u64::from(storm) - published
    })
    .await;
    let process_events = events(&cluster, "ProcessKilled").await;
    assert_eq!(process_events.len() as u64, published);
    assert!(process_events[0].note.as_deref().unwrap().ends_with(
        "of container app killed by SIGTERM from the kernel; the container keeps running"
    ));
    assert_eq!(writes(&metrics, "event", "success"), 2 + published);
    assert_eq!(writes(&metrics, "pod_annotation", "success"), 2);

    drop(queue);
    writer.await.unwrap();
    assert_eq!(cluster.refused(), Vec::<String>::new());

    // The uid in the apply keeps a pod replaced under the same name since the writer read it
    // from being annotated: the server refuses to change it (the writer takes that as moot).
    let replaced = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-0", "namespace": "shop", "uid": "00000000-0000-0000-0000-000000000000",
            "annotations": { app_key: "{}" },
        },
    });
    let stale = Api::<Pod>::namespaced(cluster.client_as("lastgasp-agent").await, "shop")
        .patch(
            "web-0",
            &PatchParams::apply("lastgasp-agent").force(),
            &Patch::Apply(&replaced),
        )
        .await;
    match stale {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            let causes = status
                .details
                .map(|details| details.causes)
                .unwrap_or_default();
            assert!(
                causes.iter().any(|cause| cause.field == "metadata.uid"),
                "{causes:?}"
            );
        }
        other => panic!("a stale uid was applied: {other:?}"),
    }
}
