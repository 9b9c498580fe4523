//! The in-repo API server against real clients: kubectl (must be installed) and kube-rs.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::Resource;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, WatchEvent,
    WatchParams,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use lastgasp_tests::apiserver::{ApiServer, Matcher, Options};
use serde_json::{Value, json};

const KUBECTL: &str = "kubectl";

fn kubeconfig_file(server: &ApiServer) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "lastgasp-apiserver-{}-{}.kubeconfig",
        std::process::id(),
        server.addr().port()
    ));
    std::fs::write(&path, server.kubeconfig_yaml()).expect("write kubeconfig");
    path
}

fn kubectl_command(kubeconfig: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(KUBECTL);
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST");
    cmd
}

/// Runs kubectl off the async runtime's threads; panics clearly when kubectl is missing.
async fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = kubectl_command(kubeconfig, args);
    let stdin = stdin.map(str::to_string);
    let shown = args.join(" ");
    tokio::task::spawn_blocking(move || {
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run `{KUBECTL}` (is kubectl installed and on PATH?): {e}")
        });
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(input.as_bytes())
                .expect("write kubectl stdin");
        }
        child.wait_with_output().expect("kubectl runs")
    })
    .await
    .unwrap_or_else(|e| panic!("kubectl {shown}: {e}"))
}

async fn kubectl_ok(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(kubeconfig, args, stdin).await;
    assert!(
        out.status.success(),
        "kubectl {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
}

fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["items"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|i| i["metadata"]["name"].as_str().expect("named").to_string())
        .collect();
    names.sort();
    names
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const MANIFEST: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {lastgasp.io/role: worker}}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Pod
metadata: {name: pa, namespace: default}
spec: {nodeName: node-a, containers: [{name: c, image: busybox}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pb1, namespace: default}
spec: {nodeName: node-b, containers: [{name: c, image: busybox}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pb2, namespace: other}
spec: {nodeName: node-b, containers: [{name: c, image: busybox}]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_speaks_to_the_server() {
    let server = ApiServer::start().await.expect("server starts");
    let kc = kubeconfig_file(&server);

    let created = kubectl_ok(&kc, &["create", "-f", "-"], Some(MANIFEST)).await;
    assert!(created.contains("pod/pb2 created"), "{created}");
    // Plain apply works too: validation is left to the server through /openapi/v3.
    kubectl_ok(&kc, &["apply", "-f", "-"], Some(MANIFEST)).await;

    let nodes: Value =
        serde_json::from_str(&kubectl_ok(&kc, &["get", "nodes", "-o", "json"], None).await)
            .unwrap();
    assert_eq!(nodes["kind"], "List");
    assert_eq!(names(&nodes), ["node-a", "node-b"]);
    let on_b: Value = serde_json::from_str(
        &kubectl_ok(
            &kc,
            &[
                "get",
                "pods",
                "-A",
                "-o",
                "json",
                "--field-selector",
                "spec.nodeName=node-b",
            ],
            None,
        )
        .await,
    )
    .unwrap();
    assert_eq!(names(&on_b), ["pb1", "pb2"]);
    let labelled = kubectl_ok(
        &kc,
        &[
            "get",
            "nodes",
            "-l",
            "lastgasp.io/role=worker",
            "-o",
            "name",
        ],
        None,
    )
    .await;
    assert_eq!(labelled.trim(), "node/node-a");
    // Human output goes through the Table form.
    let table = kubectl_ok(&kc, &["get", "pods", "-A"], None).await;
    assert!(
        table.contains("NAMESPACE") && table.contains("pb2") && table.contains("node-b"),
        "{table}"
    );

    // A watch as a child process sees later changes.
    let mut watch = kubectl_command(&kc, &["get", "pods", "--watch", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get --watch starts");
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        let stdout = watch.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut seen = seen.lock().unwrap();
                seen.push_str(&line);
                seen.push('\n');
            }
        })
    };
    let seen_has = |needle: &'static str| {
        let seen = seen.clone();
        move || seen.lock().unwrap().contains(needle)
    };
    wait_for("the watch's initial pods", seen_has("\"name\": \"pb1\"")).await;
    kubectl_ok(
        &kc,
        &["annotate", "pod", "pa", "lastgasp.io/note=seen-by-watch"],
        None,
    )
    .await;
    wait_for(
        "the annotation in the watch",
        seen_has("\"lastgasp.io/note\": \"seen-by-watch\""),
    )
    .await;
    watch.kill().expect("stop kubectl watch");
    watch.wait().expect("reap kubectl watch");
    reader.join().expect("reader thread");

    // Status subresource: conditions change, the spec does not.
    kubectl_ok(
        &kc,
        &[
            "patch", "pod", "pa", "--subresource=status", "--type=merge", "-p",
            r#"{"spec":{"nodeName":"elsewhere"},"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
        ],
        None,
    )
    .await;
    let pa = server
        .get_json("pods", Some("default"), "pa")
        .unwrap()
        .expect("pa exists");
    assert_eq!(pa["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(pa["spec"]["nodeName"], "node-a");
    assert_eq!(
        pa["metadata"]["annotations"]["lastgasp.io/note"],
        "seen-by-watch"
    );

    // JSON patch and server-side apply from kubectl.
    kubectl_ok(
        &kc,
        &[
            "patch",
            "pod",
            "pa",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/metadata/labels","value":{"x":"y"}}]"#,
        ],
        None,
    )
    .await;
    let applied = "apiVersion: v1\nkind: Pod\nmetadata: {name: pa, namespace: default, labels: {ssa: \"yes\"}}\n";
    kubectl_ok(
        &kc,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "tester",
            "-f",
            "-",
        ],
        Some(applied),
    )
    .await;
    let pa = server
        .get_json("pods", Some("default"), "pa")
        .unwrap()
        .expect("pa exists");
    assert_eq!(pa["metadata"]["labels"], json!({ "x": "y", "ssa": "yes" }));
    assert!(
        pa["metadata"]["managedFields"]
            .to_string()
            .contains("tester")
    );

    kubectl_ok(
        &kc,
        &["delete", "pod", "pb1", "--grace-period=0", "--force"],
        None,
    )
    .await;
    assert_eq!(
        server.get_json("pods", Some("default"), "pb1").unwrap(),
        None
    );

    let missing = kubectl(&kc, &["get", "pod", "missing"], None).await;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("pods \"missing\" not found"),
        "{stderr}"
    );

    std::fs::remove_file(&kc).ok();
}

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "annotations": { "keep": "me" } },
        "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "busybox" }] },
    }))
    .unwrap()
}

fn api_code(err: kube::Error) -> u16 {
    match err {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_client_round_trips() {
    let server = ApiServer::start().await.expect("server starts");
    let client = server.client().await.expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // A watcher on node-b's pods sees creation, change and deletion.
    let selected = watcher::Config::default().fields("spec.nodeName=node-b");
    let mut events = watcher(pods.clone(), selected).boxed();
    assert!(matches!(
        events.try_next().await.unwrap(),
        Some(watcher::Event::Init)
    ));
    assert!(matches!(
        events.try_next().await.unwrap(),
        Some(watcher::Event::InitDone)
    ));
    pods.create(&PostParams::default(), &pod("w", "node-b"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("elsewhere", "node-a"))
        .await
        .unwrap();
    let Some(watcher::Event::Apply(added)) = events.try_next().await.unwrap() else {
        panic!("expected Apply for the new pod")
    };
    assert_eq!(added.metadata.name.as_deref(), Some("w"));
    pods.patch(
        "w",
        &PatchParams::default(),
        &Patch::Strategic(json!({ "metadata": { "annotations": { "new": "1" } } })),
    )
    .await
    .unwrap();
    let Some(watcher::Event::Apply(changed)) = events.try_next().await.unwrap() else {
        panic!("expected Apply for the change")
    };
    let annotations = changed.metadata.annotations.unwrap();
    assert_eq!(
        annotations["keep"], "me",
        "strategic merge keeps other annotations"
    );
    assert_eq!(annotations["new"], "1");
    pods.delete("w", &DeleteParams::default()).await.unwrap();
    assert!(
        matches!(events.try_next().await.unwrap(), Some(watcher::Event::Delete(p)) if p.metadata.name.as_deref() == Some("w"))
    );

    // Server-side apply of a condition merges by type and leaves the kubelet's alone.
    pods.create(&PostParams::default(), &pod("victim", "node-b"))
        .await
        .unwrap();
    let ready = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "victim" },
        "status": { "conditions": [{ "type": "Ready", "status": "True" }] } });
    pods.patch_status(
        "victim",
        &PatchParams::apply("kubelet"),
        &Patch::Apply(&ready),
    )
    .await
    .unwrap();
    let disruption = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "victim" },
        "status": { "conditions": [{ "type": "DisruptionTarget", "status": "True", "reason": "NodeLost" }] } });
    let patched = pods
        .patch_status(
            "victim",
            &PatchParams::apply("lastgasp").force(),
            &Patch::Apply(&disruption),
        )
        .await
        .unwrap();
    let conditions = patched.status.unwrap().conditions.unwrap();
    let types: Vec<&str> = conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Ready", "DisruptionTarget"]);
    let managers: Vec<String> = patched
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, ["kubelet", "lastgasp"]);

    // Preconditions and the NotFound shape.
    let stale = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("not-the-uid".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(
        api_code(pods.delete("victim", &stale).await.unwrap_err()),
        409
    );
    match pods.get("nope").await.unwrap_err() {
        kube::Error::Api(status) => {
            assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
            assert_eq!(status.message, "pods \"nope\" not found");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }

    // Events through the runtime's Recorder.
    let victim = pods.get("victim").await.unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "lastgasp".into(),
            instance: None,
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "NodeLost".into(),
        note: Some("the node went dark".into()),
        action: "MarkDisrupted".into(),
        secondary: None,
    };
    recorder
        .publish(&event, &victim.object_ref(&()))
        .await
        .unwrap();
    recorder
        .publish(&event, &victim.object_ref(&()))
        .await
        .unwrap();
    let recorded = Api::<K8sEvent>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(recorded.items.len(), 1);
    let recorded = &recorded.items[0];
    assert_eq!(recorded.reason.as_deref(), Some("NodeLost"));
    assert_eq!(
        recorded.regarding.as_ref().unwrap().name.as_deref(),
        Some("victim")
    );
    assert_eq!(
        recorded.series.as_ref().map(|s| s.count),
        Some(2),
        "second publish patches a series"
    );

    // Leases: optimistic concurrency on replace.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": { "name": "node-b" }, "spec": { "holderIdentity": "node-b", "leaseDurationSeconds": 40 },
    }))
    .unwrap();
    let first = leases.create(&PostParams::default(), &lease).await.unwrap();
    assert_eq!(
        api_code(
            leases
                .create(&PostParams::default(), &lease)
                .await
                .unwrap_err()
        ),
        409
    );
    let mut renewed = first.clone();
    renewed.spec.as_mut().unwrap().lease_duration_seconds = Some(10);
    leases
        .replace("node-b", &PostParams::default(), &renewed)
        .await
        .unwrap();
    assert_eq!(
        api_code(
            leases
                .replace("node-b", &PostParams::default(), &renewed)
                .await
                .unwrap_err()
        ),
        409
    );
}

const ENDPOINT_SLICES: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ingest-abcde
  namespace: lastgasp-system
  labels: {kubernetes.io/service-name: ingest}
addressType: IPv4
ports:
  - {name: netconsole, port: 6666, protocol: UDP}
  - {name: reports, port: 6667, protocol: UDP}
endpoints:
  - addresses: [10.0.1.7]
    conditions: {ready: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-fghij
  namespace: lastgasp-system
  labels: {kubernetes.io/service-name: other}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints: [{addresses: [10.0.9.9]}]
"#;

/// discovery.k8s.io/v1 EndpointSlices: discovery, label-selected list, get --watch and the
/// table from kubectl; a label-selected watcher and validation errors from kube's client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_by_service_label() {
    let server = ApiServer::start().await.expect("server starts");
    let kc = kubeconfig_file(&server);

    let resources = kubectl_ok(
        &kc,
        &[
            "api-resources",
            "--api-group=discovery.k8s.io",
            "-o",
            "wide",
        ],
        None,
    )
    .await;
    assert!(
        resources.contains("endpointslices")
            && resources.contains("discovery.k8s.io/v1")
            && resources.contains("EndpointSlice"),
        "{resources}"
    );
    kubectl_ok(&kc, &["apply", "-f", "-"], Some(ENDPOINT_SLICES)).await;
    let selected: Value = serde_json::from_str(
        &kubectl_ok(
            &kc,
            &[
                "get",
                "endpointslices",
                "-n",
                "lastgasp-system",
                "-l",
                "kubernetes.io/service-name=ingest",
                "-o",
                "json",
            ],
            None,
        )
        .await,
    )
    .unwrap();
    assert_eq!(names(&selected), ["ingest-abcde"]);
    assert_eq!(selected["items"][0]["metadata"]["generation"], 1);
    let table = kubectl_ok(
        &kc,
        &[
            "get",
            "endpointslices.discovery.k8s.io",
            "-n",
            "lastgasp-system",
        ],
        None,
    )
    .await;
    assert!(
        table.contains("ADDRESSTYPE") && table.contains("6666,6667") && table.contains("10.0.1.7"),
        "{table}"
    );

    // kube's client: a watcher selecting one Service's slices, as the agent runs it.
    let client = server.client().await.expect("client");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "lastgasp-system");
    let config = watcher::Config::default().labels("kubernetes.io/service-name=ingest");
    let mut events = watcher(slices.clone(), config).boxed();
    assert!(matches!(
        events.try_next().await.unwrap(),
        Some(watcher::Event::Init)
    ));
    let Some(watcher::Event::InitApply(initial)) = events.try_next().await.unwrap() else {
        panic!("expected the existing slice")
    };
    assert_eq!(initial.endpoints[0].addresses, ["10.0.1.7"]);
    assert_eq!(
        initial.ports.as_ref().unwrap()[1].name.as_deref(),
        Some("reports")
    );
    assert!(matches!(
        events.try_next().await.unwrap(),
        Some(watcher::Event::InitDone)
    ));
    // The leader moves: the endpoint changes, the generation follows; the other Service's
    // slice changes unseen.
    let moved =
        json!({ "endpoints": [{ "addresses": ["10.0.2.8"], "conditions": { "ready": true } }] });
    let patched = slices
        .patch(
            "ingest-abcde",
            &PatchParams::default(),
            &Patch::Merge(&moved),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    slices
        .patch(
            "other-fghij",
            &PatchParams::default(),
            &Patch::Merge(&moved),
        )
        .await
        .unwrap();
    let Some(watcher::Event::Apply(changed)) = events.try_next().await.unwrap() else {
        panic!("expected Apply for the moved endpoint")
    };
    assert_eq!(changed.endpoints[0].addresses, ["10.0.2.8"]);
    // A slice relabelled away from the Service leaves the selection.
    let unlabelled = json!({ "metadata": { "labels": { "kubernetes.io/service-name": "gone" } } });
    slices
        .patch(
            "ingest-abcde",
            &PatchParams::default(),
            &Patch::Merge(&unlabelled),
        )
        .await
        .unwrap();
    assert!(
        matches!(events.try_next().await.unwrap(), Some(watcher::Event::Delete(s)) if s.metadata.name.as_deref() == Some("ingest-abcde"))
    );

    // Validation as the real server does it.
    let invalid = |body: Value| {
        let slices = slices.clone();
        async move {
            let slice: EndpointSlice = serde_json::from_value(body).unwrap();
            match slices.create(&PostParams::default(), &slice).await {
                Err(kube::Error::Api(status)) => (status.code, status.message),
                other => panic!("expected an API error, got {other:?}"),
            }
        }
    };
    let (code, message) = invalid(json!({
        "metadata": { "name": "bad-type" }, "addressType": "IPv5", "endpoints": []
    }))
    .await;
    assert_eq!(code, 422);
    assert!(
        message.contains("addressType: Unsupported value"),
        "{message}"
    );
    let (code, message) = invalid(json!({
        "metadata": { "name": "bad-address" }, "addressType": "IPv4",
        "endpoints": [{ "addresses": ["fd00::1"] }]
    }))
    .await;
    assert_eq!(code, 422);
    assert!(
        message.contains("endpoints[0].addresses[0]") && message.contains("valid IPv4"),
        "{message}"
    );
    let retyped = json!({ "addressType": "IPv6" });
    match slices
        .patch(
            "other-fghij",
            &PatchParams::default(),
            &Patch::Merge(&retyped),
        )
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422);
            assert!(
                status.message.contains("field is immutable"),
                "{}",
                status.message
            );
        }
        other => panic!("changing addressType must fail, got {other:?}"),
    }
    std::fs::remove_file(&kc).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_wire_details() {
    let server = ApiServer::start_with(Options {
        history_limit: 5,
        ..Options::default()
    })
    .await
    .unwrap();
    let client = server.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for i in 0..10 {
        pods.create(&PostParams::default(), &pod(&format!("p{i}"), "node-a"))
            .await
            .unwrap();
    }
    // Too old for the kept history: an ERROR event with 410 Expired.
    let mut stream = pods
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410, got {other:?}"),
    }
    // Recent enough: the missed change is replayed.
    let rv = server
        .get_json("pods", Some("default"), "p8")
        .unwrap()
        .unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(p)) => assert_eq!(p.metadata.name.as_deref(), Some("p9")),
        other => panic!("expected p9, got {other:?}"),
    }
    // kube allows bookmarks by default; one arrives after the interval.
    assert!(matches!(
        stream.try_next().await.unwrap(),
        Some(WatchEvent::Bookmark(_))
    ));
    assert_eq!(server.list_json("pods", None).unwrap().len(), 10);

    // Unsupported patch content type: 415.
    let request = axum::http::Request::patch("/api/v1/namespaces/default/pods/p1")
        .header("content-type", "application/x-nonsense")
        .body(b"{}".to_vec())
        .unwrap();
    assert_eq!(
        api_code(client.request::<Pod>(request).await.unwrap_err()),
        415
    );
    // Kind mismatch on create: 422 Invalid.
    let request = axum::http::Request::post("/api/v1/namespaces/default/pods")
        .header("content-type", "application/json")
        .body(
            serde_json::to_vec(
                &json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "x" } }),
            )
            .unwrap(),
        )
        .unwrap();
    assert_eq!(
        api_code(client.request::<Pod>(request).await.unwrap_err()),
        422
    );
    // Discovery as kubectl and kube read it.
    let discovery = kube::discovery::Discovery::new(client.clone())
        .run()
        .await
        .unwrap();
    let kinds: Vec<String> = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .map(|(ar, _)| ar.kind)
        .collect();
    for kind in ["Node", "Pod", "Event", "Lease"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_and_latency() {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &pod("target", "node-a"))
        .await
        .unwrap();
    let gets = |server: &ApiServer| {
        server
            .requests()
            .iter()
            .filter(|r| r.verb.as_deref() == Some("get") && r.resource.as_deref() == Some("pods"))
            .count()
    };

    // 503 is retried by kube's own default retry layer: the call just succeeds.
    server
        .faults()
        .fail_next(Matcher::any().verb("get").resource("pods"), 2, 503);
    pods.get("target").await.expect("kube retries 503 itself");
    assert_eq!(server.faults().injected(), 2);
    assert_eq!(gets(&server), 3);

    // 500 is not: a caller's retry loop with back-off gets through on the third try.
    server
        .faults()
        .fail_next(Matcher::any().verb("get").resource("pods"), 2, 500);
    let mut attempts = 0;
    let mut backoff = Duration::from_millis(10);
    let got = loop {
        attempts += 1;
        match pods.get("target").await {
            Ok(pod) => break pod,
            Err(kube::Error::Api(status)) if status.code == 500 && attempts < 5 => {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    };
    assert_eq!(got.metadata.name.as_deref(), Some("target"));
    assert_eq!(attempts, 3);
    // Other verbs and resources were not touched by the rule.
    server
        .faults()
        .fail_next(Matcher::any().verb("delete"), 1, 500);
    pods.get("target").await.unwrap();
    server.faults().clear();

    server.faults().set_latency(Duration::from_millis(300));
    let started = Instant::now();
    pods.get("target").await.unwrap();
    let slow = started.elapsed();
    server.faults().set_latency(Duration::ZERO);
    let started = Instant::now();
    pods.get("target").await.unwrap();
    let fast = started.elapsed();
    assert!(
        slow >= Duration::from_millis(300),
        "latency not applied: {slow:?}"
    );
    assert!(
        fast < Duration::from_millis(300),
        "latency not cleared: {fast:?}"
    );

    // Open watches end when the faults drop them.
    let mut watch = pods
        .watch(&kube::api::WatchParams::default().timeout(290), "0")
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
    assert!(first.expect("the existing pod streamed").is_some());
    server.faults().drop_watches();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = watch.next().await {
            if event.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch ended");
}
