//! The agent in a cluster, against the real kube-apiserver v1.20.2 as its own ServiceAccount
//! under `deploy/`'s RBAC, through a fault-injecting proxy: a thread hung in netlink
//! `recvfrom` inside a container's cgroup is named by namespace, pod and container, in its
//! event and its metric series; the cgroup is a real one, named as a container runtime names
//! it. The hang, and a stuck CNI plugin call, become conditions on the agent's Node and Events
//! on the Node and the Pod. The last gasp of a panic line in /dev/kmsg goes to the controller's
//! endpoints as its Service's EndpointSlices give them (discovery.k8s.io/v1beta1, all v1.20
//! serves), following them when they change.
//!
//! Every agent sees every hang on the machine, so the tests that make hangs run one at a time.
//! Needs root and the binaries of `cargo xtask kube`.

use std::{
    fs,
    io::Write as _,
    net::{SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
    },
};
use lastgasp::{
    agent::{
        Agent, AgentConfig,
        discovery::{ControllerEndpoints, ServiceRef},
        events::AgentEvent,
    },
    wire::{self, AuthKey, Report, ReportKind},
};
use lastgasp_tests::{
    container::{ContainerCgroup, pod_with_container},
    faults::Matcher,
    fixtures::agent_config,
    kube::cluster::{Cluster, eventually},
    scrape,
};
use serde_json::{Value, json};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A Pod in `shop` on `node` with one container, `app`, running as `container_id`: created,
/// then its status written as kubelet would. Its UID.
async fn put_pod(cluster: &Cluster, name: &str, node: &str, container_id: &str) -> String {
    let pod = pod_with_container("shop", name, node, "app", container_id);
    let pods: Api<Pod> = Api::namespaced(cluster.admin().clone(), "shop");
    let created = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod.clone()).unwrap(),
        )
        .await
        .expect("create a pod");
    let mut status = pod["status"].clone();
    status["phase"] = json!("Running");
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .expect("write a pod's status");
    created.metadata.uid.expect("a UID")
}

async fn start_agent(cluster: &Cluster, node: &str, cni_bin_dirs: Vec<PathBuf>) -> Agent {
    Agent::start(AgentConfig {
        cni_bin_dirs,
        cni_stuck_threshold: Duration::from_millis(500),
        cluster: Some(cluster.client_as("lastgasp-agent").await),
        ..agent_config(node)
    })
    .await
    .expect("agent starts (the tests must run as root)")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_thread_is_named_by_its_pod_and_container() {
    let _one = ONE_AT_A_TIME.lock().await;
    let container_id = format!("{:064x}", 0x1a57_9a59_u64 + u64::from(std::process::id()));
    let cluster = Cluster::start().await;
    cluster.namespace("shop").await;
    cluster
        .node("attribution-node", "10.0.0.1", Some("boot-1"))
        .await;
    put_pod(&cluster, "web-0", "attribution-node", &container_id).await;
    let agent = start_agent(&cluster, "attribution-node", Vec::new()).await;
    let mut events = agent.subscribe();
    let cgroup = ContainerCgroup::create(&container_id);

    // A process that joins the container's cgroup, then blocks in recvfrom on NETLINK_ROUTE.
    let mut child = cgroup.hang_in_netlink_recv(5);
    let pid = child.id();

    let deadline = Instant::now() + Duration::from_secs(8);
    let hang = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(AgentEvent::NetlinkHang(hang))) if hang.pid == pid => break hang,
            Ok(Ok(_)) => continue,
            other => panic!("no hang reported for pid {pid}: {other:?}"),
        }
    };
    // While it hangs, its series carries the pod's labels.
    let series = r#"lastgasp_netlink_recv_hung_threads{comm="python3",protocol="route",namespace="shop",pod="web-0",container="app"} 1"#;
    let metrics = scrape(agent.metrics_addr()).await;
    assert!(
        metrics.contains(series),
        "{series} missing from:\n{metrics}"
    );
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(AgentEvent::NetlinkHangCleared(cleared))) if cleared.pid == pid => break,
            Ok(Ok(_)) => continue,
            other => panic!("the hang of pid {pid} did not clear: {other:?}"),
        }
    }
    // Cleared, its series is gone rather than left at 0.
    let metrics = scrape(agent.metrics_addr()).await;
    assert!(
        !metrics.contains(r#"pod="web-0""#),
        "the cleared hang's series remains:\n{metrics}"
    );
    assert_eq!(hang.container_id.as_deref(), Some(container_id.as_str()));
    assert_eq!(hang.protocol, "route");
    let json = AgentEvent::NetlinkHang(hang.clone()).to_json();
    assert_eq!(json["pod_namespace"], "shop");
    assert_eq!(json["pod_name"], "web-0");
    assert_eq!(json["container"], "app");
    let container = hang.container.expect("attributed to a container");
    assert_eq!(
        (
            container.namespace.as_str(),
            container.pod.as_str(),
            container.container.as_str()
        ),
        ("shop", "web-0", "app")
    );
    agent.shutdown().await;
}

const NAMESPACE: &str = "lastgasp-system";
const SERVICE: &str = "lastgasp-controller-ingest";
const NETCONSOLE_PORT: u16 = 6666;

/// One EndpointSlice of the ingest Service, as v1.20's EndpointSlice controller writes it
/// (discovery.k8s.io/v1beta1): the Service's named UDP ports, the selected pods' addresses
/// with their readiness.
fn endpoint_slice(name: &str, reports_port: u16, endpoints: &[(&str, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| json!({ "addresses": [ip], "conditions": { "ready": ready } }))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": SERVICE,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [
            { "name": "netconsole", "port": NETCONSOLE_PORT, "protocol": "UDP" },
            { "name": "reports", "port": reports_port, "protocol": "UDP" },
        ],
        "endpoints": endpoints,
    })
}

fn endpoint_slices(cluster: &Cluster) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
    Api::namespaced_with(cluster.admin().clone(), NAMESPACE, &resource)
}

/// Creates or replaces a slice, as the admin.
async fn put_slice(cluster: &Cluster, slice: Value) {
    let name = slice["metadata"]["name"].as_str().unwrap().to_owned();
    endpoint_slices(cluster)
        .patch(
            &name,
            &PatchParams::apply("test-endpointslice-controller").force(),
            &Patch::Apply(&slice),
        )
        .await
        .unwrap_or_else(|error| panic!("write EndpointSlice {name}: {error}"));
}

/// Two controller pods on loopback, 127.0.0.1 and 127.0.0.2, listening on the same UDP port,
/// as two replicas of a Deployment do.
fn two_controller_sockets() -> (UdpSocket, UdpSocket) {
    for _ in 0..20 {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = UdpSocket::bind(("127.0.0.2", port)) {
            for socket in [&a, &b] {
                socket
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
            }
            return (a, b);
        }
    }
    panic!("no UDP port free on both 127.0.0.1 and 127.0.0.2");
}

fn write_kmsg(line: &str) {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut kmsg| kmsg.write_all(line.as_bytes()))
        .expect("write /dev/kmsg");
}

/// The next report at `socket` that mentions `needle` in its message or context, within `within`.
fn report_mentioning(
    socket: &UdpSocket,
    key: &AuthKey,
    needle: &str,
    within: Duration,
) -> Option<Report> {
    let deadline = Instant::now() + within;
    let mut datagram = [0u8; 2048];
    while Instant::now() < deadline {
        let Ok(len) = socket.recv(&mut datagram) else {
            continue;
        };
        let report = wire::decode(&datagram[..len], key).expect("a valid, authenticated report");
        if report.message.contains(needle)
            || report.context.iter().any(|line| line.contains(needle))
        {
            return Some(report);
        }
    }
    None
}

async fn endpoints_become(agent: &Agent, want: &ControllerEndpoints) {
    let mut endpoints = agent.controller_endpoints();
    tokio::time::timeout(
        Duration::from_secs(10),
        endpoints.wait_for(|now| now == want),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the agent's controller endpoints are {:?}, not {want:?}",
            *agent.controller_endpoints().borrow()
        )
    })
    .expect("the EndpointSlice watch runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_gasp_follows_the_controller_endpoints() {
    let cluster = Cluster::start().await;
    let (a, b) = two_controller_sockets();
    let port = a.local_addr().unwrap().port();
    // The leader on 127.0.0.1; the other replica's slice is not there yet.
    put_slice(
        &cluster,
        endpoint_slice("ingest-a", port, &[("127.0.0.1", true)]),
    )
    .await;
    // Another Service's slice in the same namespace is not the controller's.
    let mut other = endpoint_slice("metrics-x", port, &[("127.0.0.9", true)]);
    other["metadata"]["labels"]["kubernetes.io/service-name"] =
        json!("lastgasp-controller-metrics");
    put_slice(&cluster, other).await;

    let key = AuthKey::HmacSha256(b"discovery-test-key".to_vec());
    let agent = Agent::start(AgentConfig {
        controller_service: Some(ServiceRef {
            namespace: NAMESPACE.into(),
            name: SERVICE.into(),
        }),
        auth_key: key.clone(),
        netlink_hang_threshold: Duration::from_secs(30),
        cluster: Some(cluster.client_as("lastgasp-agent").await),
        ..agent_config("discovery-node")
    })
    .await
    .expect("agent starts (the tests must run as root)");
    let at = |ip: &str, port: u16| SocketAddr::new(ip.parse().unwrap(), port);
    endpoints_become(
        &agent,
        &ControllerEndpoints {
            reports: vec![at("127.0.0.1", port)],
            netconsole: vec![at("127.0.0.1", NETCONSOLE_PORT)],
        },
    )
    .await;

    let nonce = format!("lastgasp discovery test {}", std::process::id());
    write_kmsg(&format!("<0>Kernel panic - not syncing: {nonce}\n"));
    // Context too: had another panic line on this machine come first, this one is context.
    write_kmsg(&format!("<0>{nonce}: to A\n"));
    let report = report_mentioning(&a, &key, &nonce, Duration::from_secs(5))
        .expect("a last-gasp datagram at the leader's endpoint");
    assert_eq!(report.node, "discovery-node");
    assert_eq!(report.kind, ReportKind::KernelPanic);

    // Leadership moves: the old leader's endpoint is not ready any more, the new leader's
    // endpoint comes in a second slice.
    put_slice(
        &cluster,
        endpoint_slice("ingest-a", port, &[("127.0.0.1", false)]),
    )
    .await;
    put_slice(
        &cluster,
        endpoint_slice("ingest-b", port, &[("127.0.0.2", true)]),
    )
    .await;
    endpoints_become(
        &agent,
        &ControllerEndpoints {
            reports: vec![at("127.0.0.2", port)],
            netconsole: vec![at("127.0.0.2", NETCONSOLE_PORT)],
        },
    )
    .await;
    let marker = format!("{nonce}: to B");
    write_kmsg(&format!("<0>{marker}\n"));
    let report = report_mentioning(&b, &key, &marker, Duration::from_secs(5))
        .expect("the next datagram at the new leader's endpoint");
    assert_eq!(report.node, "discovery-node");
    assert!(
        report_mentioning(&a, &key, &marker, Duration::from_millis(500)).is_none(),
        "the old leader's endpoint still gets datagrams"
    );

    // No ready endpoint at all: the channel says so.
    endpoint_slices(&cluster)
        .delete("ingest-b", &DeleteParams::default())
        .await
        .expect("delete ingest-b");
    endpoints_become(&agent, &ControllerEndpoints::default()).await;
    agent.shutdown().await;
    // The agent's watch, as its ServiceAccount: v1beta1, the only version served, allowed.
    let slice_calls: Vec<_> = cluster
        .proxy()
        .requests()
        .into_iter()
        .filter(|request| request.resource.as_deref() == Some("endpointslices"))
        .collect();
    assert!(
        slice_calls
            .iter()
            .any(|request| request.verb.as_deref() == Some("watch")),
        "{slice_calls:#?}"
    );
    for request in &slice_calls {
        assert!(
            request.uri.starts_with(
                "/apis/discovery.k8s.io/v1beta1/namespaces/lastgasp-system/endpointslices?"
            ) && request.status == 200,
            "{request:#?}"
        );
    }
}

// ---- Node conditions and Events ----

/// The Node's condition of `type_`.
async fn condition(cluster: &Cluster, node: &str, type_: &str) -> Option<Value> {
    cluster.get("nodes", None, node).await?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|condition| condition["type"] == type_)
        .cloned()
}

fn field<'a>(condition: &'a Option<Value>, name: &str) -> &'a str {
    condition
        .as_ref()
        .and_then(|condition| condition[name].as_str())
        .unwrap_or_default()
}

fn timestamp(text: &str) -> jiff::Timestamp {
    text.parse()
        .unwrap_or_else(|error| panic!("{text:?} is not a time: {error}"))
}

/// Every Event (events.k8s.io/v1) about `kind`/`name`, as JSON.
async fn events_about(cluster: &Cluster, kind: &str, name: &str) -> Vec<Value> {
    cluster
        .list("events", None)
        .await
        .into_iter()
        .filter(|event| event["regarding"]["kind"] == kind && event["regarding"]["name"] == name)
        .collect()
}

/// The Events about `kind`/`name` of `type_` and `reason` that mention `needle`.
async fn events_with(
    cluster: &Cluster,
    kind: &str,
    name: &str,
    type_: &str,
    reason: &str,
    needle: &str,
) -> Vec<Value> {
    events_about(cluster, kind, name)
        .await
        .into_iter()
        .filter(|event| {
            event["type"] == type_
                && event["reason"] == reason
                && event["note"]
                    .as_str()
                    .is_some_and(|note| note.contains(needle))
        })
        .collect()
}

/// The fields every Event of the agent carries.
fn assert_from_agent(event: &Value, node: &str) {
    assert_eq!(
        event["reportingController"], "lastgasp.io/agent",
        "{event:#}"
    );
    assert_eq!(event["reportingInstance"], node, "{event:#}");
    assert!(event["eventTime"].is_string(), "{event:#}");
    assert!(event["action"].is_string(), "{event:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hang_is_a_node_condition_and_events_on_node_and_pod_until_it_ends() {
    let _one = ONE_AT_A_TIME.lock().await;
    let node = "signals-node";
    let test_start = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1);
    let container_id = format!("{:064x}", 0x5194_a150_u64 + u64::from(std::process::id()));
    let cluster = Cluster::start().await;
    let cluster = &cluster;
    cluster.namespace("shop").await;
    cluster.node(node, "10.0.0.2", Some("boot-1")).await;
    // The Node as kubelet and an earlier agent left it: Ready; no hang since 2020 (a status
    // that does not change keeps its transition time); CNI calls stuck (the new agent sees
    // none, so that changes now).
    Api::<k8s_openapi::api::core::v1::Node>::all(cluster.admin().clone())
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "conditions": [
                { "type": "Ready", "status": "True", "reason": "KubeletReady" },
                { "type": "NetlinkRecvHung", "status": "False", "reason": "NoNetlinkRecvHang",
                  "lastTransitionTime": "2020-01-01T00:00:00Z", "lastHeartbeatTime": "2020-01-01T00:00:00Z" },
                { "type": "CNICallsStuck", "status": "True", "reason": "CNIPluginCallsStuck",
                  "lastTransitionTime": "2020-01-01T00:00:00Z", "lastHeartbeatTime": "2020-01-01T00:00:00Z" },
            ]}})),
        )
        .await
        .expect("write the Node's conditions");
    let pod_uid = put_pod(cluster, "web-0", node, &container_id).await;
    let agent = start_agent(cluster, node, Vec::new()).await;

    // Both conditions False from the start: the agent is watching.
    eventually("both conditions False", Duration::from_secs(10), || async {
        let cni = condition(cluster, node, "CNICallsStuck").await;
        field(
            &condition(cluster, node, "NetlinkRecvHung").await,
            "lastHeartbeatTime",
        ) != "2020-01-01T00:00:00Z"
            && field(&cni, "status") == "False"
    })
    .await;
    let netlink = condition(cluster, node, "NetlinkRecvHung").await;
    assert_eq!(field(&netlink, "status"), "False");
    assert_eq!(field(&netlink, "reason"), "NoNetlinkRecvHang");
    assert_eq!(
        field(&netlink, "message"),
        "No thread in a netlink recv call for longer than 0.5s."
    );
    assert_eq!(
        field(&netlink, "lastTransitionTime"),
        "2020-01-01T00:00:00Z"
    );
    assert!(timestamp(field(&netlink, "lastHeartbeatTime")) >= test_start);
    let cni = condition(cluster, node, "CNICallsStuck").await;
    assert_eq!(field(&cni, "reason"), "NoCNICallsStuck");
    assert!(timestamp(field(&cni, "lastTransitionTime")) >= test_start);
    assert_eq!(
        field(&condition(cluster, node, "Ready").await, "reason"),
        "KubeletReady",
        "kubelet's condition is untouched"
    );
    let managed =
        cluster.get("nodes", None, node).await.unwrap()["metadata"]["managedFields"].clone();
    assert!(
        managed.as_array().unwrap().iter().any(|entry| {
            entry["manager"] == "lastgasp-agent"
                && entry["operation"] == "Apply"
                && entry["fieldsV1"]["f:status"]["f:conditions"]["k:{\"type\":\"NetlinkRecvHung\"}"]
                    .is_object()
        }),
        "server-side apply by lastgasp-agent: {managed:#}"
    );
    // v1.20 does not name the subresource in managedFields: the proxy saw where it went.
    let writes = cluster.writes_to(&format!("/nodes/{node}"));
    assert!(
        !writes.is_empty()
            && writes.iter().all(|write| {
                write.starts_with(&format!("PATCH /api/v1/nodes/{node}/status?"))
                    && write.contains("fieldManager=lastgasp-agent")
            }),
        "{writes:#?}"
    );

    // The API server fails the next two status writes and the next Event (with 500: kube's
    // client retries a 503 itself): both are retried, and neither holds up the other.
    let faults = cluster.proxy().faults();
    faults.fail_next(
        Matcher::any().verb("patch").resource("nodes/status"),
        2,
        500,
    );
    faults.fail_next(Matcher::any().verb("create").resource("events"), 1, 500);

    let cgroup = ContainerCgroup::create(&container_id);
    let mut child = cgroup.hang_in_netlink_recv(60);
    let pid = child.id();
    let thread = format!("python3 (pid {pid}, tid {pid}) in pod shop/web-0 container app");
    let thread = thread.as_str();
    eventually(
        "NetlinkRecvHung=True naming the thread",
        Duration::from_secs(20),
        || async {
            let netlink = condition(cluster, node, "NetlinkRecvHung").await;
            field(&netlink, "status") == "True" && field(&netlink, "message").contains(thread)
        },
    )
    .await;
    let hung = condition(cluster, node, "NetlinkRecvHung").await;
    assert_eq!(field(&hung, "reason"), "ThreadBlockedInNetlinkRecv");
    let message = field(&hung, "message");
    assert!(
        message.starts_with(
            "1 thread blocked in a netlink recv call for longer than 0.5s; the longest: "
        ) && message.contains("netlink route recvfrom in flight for "),
        "{message}"
    );
    let hung_since = timestamp(field(&hung, "lastTransitionTime"));
    assert!(hung_since >= test_start, "{hung:#?}");
    assert_eq!(faults.injected(), 3, "the failed writes were retried");

    let pid_text = format!("pid {pid},");
    let pid_text = pid_text.as_str();
    eventually(
        "Warnings on the Node and the Pod",
        Duration::from_secs(10),
        || async {
            !events_with(
                cluster,
                "Node",
                node,
                "Warning",
                "NetlinkRecvHung",
                pid_text,
            )
            .await
            .is_empty()
                && !events_with(
                    cluster,
                    "Pod",
                    "web-0",
                    "Warning",
                    "NetlinkRecvHung",
                    pid_text,
                )
                .await
                .is_empty()
        },
    )
    .await;
    // Many scans later, still one Warning per object for this hang.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let on_node = events_with(
        cluster,
        "Node",
        node,
        "Warning",
        "NetlinkRecvHung",
        pid_text,
    )
    .await;
    let on_pod = events_with(
        cluster,
        "Pod",
        "web-0",
        "Warning",
        "NetlinkRecvHung",
        pid_text,
    )
    .await;
    assert_eq!(
        (on_node.len(), on_pod.len()),
        (1, 1),
        "{on_node:#?} {on_pod:#?}"
    );
    let (on_node, on_pod) = (&on_node[0], &on_pod[0]);
    assert_from_agent(on_node, node);
    assert_from_agent(on_pod, node);
    assert_eq!(on_node["metadata"]["namespace"], "kube-system");
    assert_eq!(on_node["regarding"]["uid"], node);
    assert_eq!(on_pod["metadata"]["namespace"], "shop");
    assert_eq!(on_pod["regarding"]["namespace"], "shop");
    assert_eq!(
        on_pod["regarding"]["uid"], pod_uid,
        "kubectl describe pod finds it"
    );
    assert!(
        on_pod["note"].as_str().unwrap().contains(thread),
        "{on_pod:#}"
    );

    // The process ends: the condition clears, each object gets a Normal Event.
    child.kill().unwrap();
    child.wait().unwrap();
    eventually("NetlinkRecvHung=False", Duration::from_secs(10), || async {
        field(&condition(cluster, node, "NetlinkRecvHung").await, "status") == "False"
    })
    .await;
    let cleared = condition(cluster, node, "NetlinkRecvHung").await;
    assert_eq!(field(&cleared, "reason"), "NetlinkRecvHangCleared");
    assert!(
        field(&cleared, "message").contains(&format!("The last hang: {thread}")),
        "{cleared:#?}"
    );
    assert!(timestamp(field(&cleared, "lastTransitionTime")) >= hung_since);
    eventually(
        "Normal Events on the Node and the Pod",
        Duration::from_secs(10),
        || async {
            events_with(
                cluster,
                "Node",
                node,
                "Normal",
                "NetlinkRecvHangCleared",
                pid_text,
            )
            .await
            .len()
                == 1
                && events_with(
                    cluster,
                    "Pod",
                    "web-0",
                    "Normal",
                    "NetlinkRecvHangCleared",
                    pid_text,
                )
                .await
                .len()
                    == 1
        },
    )
    .await;

    let metrics = scrape(agent.metrics_addr()).await;
    for line in [
        r#"lastgasp_agent_kubernetes_writes_total{object="node_conditions",result="error"} 2"#,
        r#"lastgasp_agent_kubernetes_writes_total{object="event",result="error"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    agent.shutdown().await;
    // Every call the agent made was allowed by deploy/'s RBAC.
    let refused: Vec<_> = cluster
        .proxy()
        .requests()
        .into_iter()
        .filter(|request| request.status == 403)
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
}

/// A temporary CNI directory with one plugin that runs until killed.
struct StuckPlugin {
    dir: PathBuf,
}

impl StuckPlugin {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("lastgasp-signals-cni-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let plugin = dir.join("stuck-plugin");
        fs::write(&plugin, "#!/bin/sh\nexec sleep 60\n").unwrap();
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    fn invoke(&self, pod: &str) -> Child {
        Command::new(self.dir.join("stuck-plugin"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("sandbox-{pod}"))
            .env("CNI_NETNS", "/var/run/netns/test")
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod}"),
            )
            .spawn()
            .unwrap()
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for StuckPlugin {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stuck_cni_calls_are_a_node_condition_and_events_until_they_end() {
    let _one = ONE_AT_A_TIME.lock().await;
    let node = "cni-signals-node";
    let cluster = Cluster::start().await;
    let cluster = &cluster;
    cluster.namespace("shop").await;
    cluster.node(node, "10.0.0.3", Some("boot-1")).await;
    let pod_uid = put_pod(cluster, "web-1", node, &format!("{:064x}", 1)).await;
    let plugins = StuckPlugin::new();
    let agent = start_agent(cluster, node, vec![plugins.path().to_owned()]).await;
    eventually(
        "CNICallsStuck=False at start",
        Duration::from_secs(10),
        || async {
            field(&condition(cluster, node, "CNICallsStuck").await, "reason") == "NoCNICallsStuck"
        },
    )
    .await;

    // Two calls stuck: one setting up web-1, then one for a pod the agent does not know.
    let first = plugins.invoke("web-1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut calls = [first, plugins.invoke("ghost")];
    let pids = calls.each_ref().map(Child::id);
    eventually("CNICallsStuck=True", Duration::from_secs(15), || async {
        field(&condition(cluster, node, "CNICallsStuck").await, "message")
            .starts_with("2 CNI plugin calls")
    })
    .await;
    let stuck = condition(cluster, node, "CNICallsStuck").await;
    assert_eq!(field(&stuck, "status"), "True");
    assert_eq!(field(&stuck, "reason"), "CNIPluginCallsStuck");
    let message = field(&stuck, "message");
    assert!(
        message.starts_with(&format!(
            "2 CNI plugin calls running for longer than 0.5s; the oldest: stuck-plugin ADD (pid {}) for pod shop/web-1, running for ",
            pids[0]
        )),
        "{message}"
    );
    eventually(
        "Warnings on the Node and on web-1",
        Duration::from_secs(10),
        || async {
            !events_with(
                cluster,
                "Node",
                node,
                "Warning",
                "CNICallsStuck",
                "stuck-plugin ADD",
            )
            .await
            .is_empty()
                && !events_with(
                    cluster,
                    "Pod",
                    "web-1",
                    "Warning",
                    "CNICallStuck",
                    "stuck-plugin ADD",
                )
                .await
                .is_empty()
        },
    )
    .await;
    let on_pod = events_with(
        cluster,
        "Pod",
        "web-1",
        "Warning",
        "CNICallStuck",
        "stuck-plugin ADD",
    )
    .await;
    assert_eq!(on_pod.len(), 1, "{on_pod:#?}");
    assert_from_agent(&on_pod[0], node);
    assert_eq!(on_pod[0]["regarding"]["uid"], pod_uid);
    // One Node Event for the episode, however many calls pile up; the unknown pod gets none
    // of its own (its Event would have no uid to be found by).
    assert_eq!(
        events_with(cluster, "Node", node, "Warning", "CNICallsStuck", "")
            .await
            .len(),
        1
    );
    assert!(events_about(cluster, "Pod", "ghost").await.is_empty());

    for call in &mut calls {
        call.kill().unwrap();
        call.wait().unwrap();
    }
    eventually("CNICallsStuck=False", Duration::from_secs(10), || async {
        field(&condition(cluster, node, "CNICallsStuck").await, "status") == "False"
    })
    .await;
    let cleared = condition(cluster, node, "CNICallsStuck").await;
    assert_eq!(field(&cleared, "reason"), "CNICallsCleared");
    assert!(
        field(&cleared, "message").contains("The last stuck call: stuck-plugin ADD"),
        "{cleared:#?}"
    );
    assert!(
        timestamp(field(&cleared, "lastTransitionTime"))
            >= timestamp(field(&stuck, "lastTransitionTime"))
    );
    eventually(
        "Normal Events on the Node and on web-1",
        Duration::from_secs(10),
        || async {
            events_with(cluster, "Node", node, "Normal", "CNICallsCleared", "")
                .await
                .len()
                == 1
                && events_with(
                    cluster,
                    "Pod",
                    "web-1",
                    "Normal",
                    "CNICallCleared",
                    "stuck-plugin ADD",
                )
                .await
                .len()
                    == 1
        },
    )
    .await;
    agent.shutdown().await;
    let refused: Vec<_> = cluster
        .proxy()
        .requests()
        .into_iter()
        .filter(|request| request.status == 403)
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
}
