//! The controller against the real kube-apiserver v1.20.2, as its own ServiceAccount under
//! `deploy/`'s RBAC: the real netconsole stream of a panic from node B's address marks B's pods
//! (annotations, `DisruptionTarget`, one Event each) and B (annotations and its Event, in
//! `kube-system`), then deletes them, leaving node A alone. Whatever the real server's
//! admission, validation or authorizer refuses would fail here.
//!
//! Needs the binaries of `cargo xtask kube`.

use std::{
    collections::HashMap,
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
    api::{ListParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use lastgasp::{
    controller::{Controller, policy::Policy, trust::DeletionEvidence},
    wire::AuthKey,
};
use lastgasp_tests::{
    fixtures::{controller_config, replay_sysrq_capture, wait_for},
    kube::{
        RealApiServer,
        seed::{create_deploy_rbac, create_node, create_running_pod},
    },
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
