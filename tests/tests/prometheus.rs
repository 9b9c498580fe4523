//! A real Prometheus server (Debian's `prometheus`) scrapes an in-cluster agent on loopback
//! and answers, over its HTTP API, which threads are hung in a netlink `recvfrom`: one in a
//! pod's container, named by the pod's labels, and one of the host, with none; and that a
//! cleared hang's series goes away. The agent watches its node's pods on the real
//! kube-apiserver, as its ServiceAccount under `deploy/`'s RBAC through the fault proxy.
//!
//! Needs the binaries of `cargo xtask kube`.

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use lastgasp::agent::{Agent, AgentConfig};
use lastgasp_tests::{
    blocking::{block_in_recvfrom, netlink_route_socket},
    container::{ContainerCgroup, pod_with_container},
    fixtures::agent_config,
    kube::cluster::Cluster,
    scrape,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Stops Prometheus and removes its data when the test ends, passed or not.
struct Prometheus {
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    /// What Prometheus logged, for a failure's message.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Scrapes `target` as deploy/monitoring's ServiceMonitor has the Prometheus Operator scrape
/// an agent: with `honor_labels`, and the agent pod's own `namespace`, `pod` and `container`
/// as target labels.
fn start_prometheus(target: SocketAddr) -> (Prometheus, SocketAddr) {
    let dir = std::env::temp_dir().join(format!("lastgasp-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lastgasp-agent\n    honor_labels: true\n    static_configs:\n      - targets: ['{target}']\n        labels: {{namespace: {AGENT_NAMESPACE}, pod: {AGENT_POD}, container: agent}}\n"
        ),
    )
    .unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package prometheus) is installed");
    (Prometheus { child, dir }, web)
}

/// An instant PromQL query over Prometheus' HTTP API; the `data.result` array.
async fn query(web: SocketAddr, promql: &str) -> Option<Vec<Value>> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut stream = tokio::net::TcpStream::connect(web).await.ok()?;
    let request = format!("GET /api/v1/query?query={encoded} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let body = response.split_once("\r\n\r\n")?.1;
    // An HTTP/1.0 request: the body is never chunked and ends with the connection.
    let json: Value = serde_json::from_str(body).ok()?;
    json["data"]["result"].as_array().cloned()
}

const AGENT_NAMESPACE: &str = "lastgasp-system";
const AGENT_POD: &str = "lastgasp-agent-x7k2p";
const NODE: &str = "prometheus-node";

/// The pod `shop/web-0` on [`NODE`], its container `app` running as `container_id`: created,
/// then given the container's status through the status subresource, as kubelet would (a
/// create resets a pod's status).
async fn create_pod_with_container(cluster: &Cluster, container_id: &str) {
    let pod = pod_with_container("shop", "web-0", NODE, "app", container_id);
    let pods: Api<Pod> = Api::namespaced(cluster.admin().clone(), "shop");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod.clone()).unwrap(),
    )
    .await
    .expect("create the pod");
    let status = json!({ "status": pod["status"] });
    pods.patch_status("web-0", &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("write the pod's container status");
}

/// Polls an instant query until its result satisfies `done`, for at most `within`.
async fn query_until(
    web: SocketAddr,
    promql: &str,
    within: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Option<Vec<Value>> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(result) = query(web, promql).await
            && done(&result)
        {
            return Some(result);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_finds_the_hung_netlink_threads_and_their_pods() {
    let container_id = format!("{:064x}", 0x9e0_u64 + u64::from(std::process::id()));
    let cluster = Cluster::start().await;
    // As kubelet registers it: the agent writes its hang conditions on it.
    cluster.node(NODE, "127.0.0.4", Some("boot-1")).await;
    cluster.namespace("shop").await;
    create_pod_with_container(&cluster, &container_id).await;
    let agent = Agent::start(AgentConfig {
        cluster: Some(cluster.client_as("lastgasp-agent").await),
        ..agent_config(NODE)
    })
    .await
    .expect("agent starts (the tests must run as root)");
    let (prometheus, web) = start_prometheus(agent.metrics_addr());
    // The hangs last seconds: start them only once Prometheus has scraped the agent, however
    // long a loaded machine takes to start it.
    query_until(
        web,
        r#"up{job="lastgasp-agent"} == 1"#,
        Duration::from_secs(60),
        |result| !result.is_empty(),
    )
    .await
    .unwrap_or_else(|| {
        panic!(
            "Prometheus scrapes the agent; it logged:\n{}",
            prometheus.log()
        )
    });

    let cgroup = ContainerCgroup::create(&container_id);
    let mut in_pod = cgroup.hang_in_netlink_recv(10);
    let (_, on_host) = block_in_recvfrom(
        "lg-prom-hang",
        netlink_route_socket,
        Duration::from_secs(10),
    );
    let hung = |result: &[Value]| !result.is_empty();

    let host = query_until(
        web,
        r#"lastgasp_netlink_recv_hung_threads{comm="lg-prom-hang"} > 0"#,
        Duration::from_secs(9),
        hung,
    )
    .await;
    let Some(host) = host else {
        let exposed = scrape(agent.metrics_addr()).await;
        let hung: Vec<&str> = exposed
            .lines()
            .filter(|line| line.starts_with("lastgasp_netlink_recv"))
            .collect();
        panic!(
            "Prometheus returns the hung host thread; the agent exposes: {hung:#?}\nPrometheus logged:\n{}",
            prometheus.log()
        );
    };
    let series = &host[0];
    assert_eq!(series["metric"]["protocol"], "route");
    assert_eq!(series["metric"]["job"], "lastgasp-agent");
    assert_eq!(series["value"][1], "1");
    // Not in a pod: no pod labels at all, rather than the agent pod's.
    for label in ["namespace", "pod", "container"] {
        assert!(
            series["metric"].get(label).is_none(),
            "the host thread's series has {label}: {series}"
        );
    }

    let pod = query_until(
        web,
        r#"lastgasp_netlink_recv_hung_threads{pod="web-0"} > 0"#,
        Duration::from_secs(9),
        hung,
    )
    .await
    .expect("Prometheus returns the thread hung in the pod");
    let series = &pod[0]["metric"];
    assert_eq!(
        (&series["namespace"], &series["container"], &series["comm"]),
        (&"shop".into(), &"app".into(), &"python3".into()),
        "{series}"
    );
    // Families without pod labels keep the agent pod's target labels.
    let info = query(web, r#"lastgasp_probe_info{probe="console"}"#)
        .await
        .expect("a query result");
    assert_eq!(info[0]["metric"]["pod"], AGENT_POD, "{info:?}");

    // Cleared, the hang's series ends: the next scrape marks it stale.
    in_pod.wait().unwrap();
    query_until(
        web,
        r#"lastgasp_netlink_recv_hung_threads{pod="web-0"}"#,
        Duration::from_secs(10),
        <[Value]>::is_empty,
    )
    .await
    .expect("the cleared hang's series is gone from Prometheus");
    on_host.join().unwrap();
    agent.shutdown().await;
    assert_eq!(cluster.refused(), Vec::<String>::new());
}
