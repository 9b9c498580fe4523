//! The release controller at fleet scale against the real kube-apiserver v1.20.2 (see README,
//! "Performance"):
//!
//! 1. `NODES` Nodes and `PODS` small Pods (about 1 KB of JSON each) created in bulk; the
//!    controller started on them: its startup sync time and its RSS once synced.
//! 2. `PANICS` panics, one after the other, each on its own node with `VICTIM_PODS` pods: the
//!    real netconsole stream of a sysrq crash replayed from the node's address, timed from its
//!    first datagram to the watch event of the node's deletion (the last write); p50 and p99.
//! 3. Netconsole ingest with the controller on one core: plain lines from 1,000 nodes'
//!    addresses as fast as one sender core sends them, in datagrams/s the controller counted,
//!    while another node panics in the middle of the flood and is acted on.
//!
//! `cargo xtask kube && cargo bench -p lastgasp-tests --features kube --bench controller_scale`
//! (as root: ingest pins the controller to one core). `LASTGASP_SCALE_NODES`,
//! `LASTGASP_SCALE_PODS` and `LASTGASP_SCALE_PANICS` shrink it for a quick run.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use lastgasp_tests::{
    fixtures::{lastgasp_binary, replay_sysrq_capture},
    kube::{RealApiServer, User},
};
use serde_json::{Value, json};

const VICTIM_PODS: usize = 110;
const INGEST_SENDERS: usize = 1_000;
const INGEST_FLOOD: Duration = Duration::from_secs(5);
const SEND_BATCH: usize = 8;
/// Creates in flight at once while seeding.
const SEED_CONCURRENCY: usize = 48;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Node `i`'s InternalIP: 127.10.0.0/16 is loopback, so the bench can send from it.
fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 10 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

fn node_name(i: usize) -> String {
    format!("scale-{i:05}")
}

fn node(i: usize) -> Node {
    // v1.20 keeps the status sent on create: one call per node.
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": node_name(i), "labels": {
            "kubernetes.io/hostname": node_name(i), "node.kubernetes.io/instance-type": "m6i.large",
            "topology.kubernetes.io/zone": format!("zone-{}", i % 3),
        }},
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": node_ip(i).to_string() },
                { "type": "Hostname", "address": node_name(i) },
            ],
            "nodeInfo": { "bootID": format!("boot-{i}"), "machineID": "", "systemUUID": "",
                "kernelVersion": "6.1.0-57-cloud-amd64", "osImage": "Debian GNU/Linux 12",
                "containerRuntimeVersion": "containerd://1.6.20", "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64" },
        },
    }))
    .expect("a Node")
}

/// A pod of about 1 KB of JSON, as a small Deployment's replica looks.
fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "default",
            "labels": { "app": "shop", "pod-template-hash": "7d9f8c6b5", "tier": "web" } },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "web", "image": "registry.example/shop/web:1.42.0",
                "ports": [{ "containerPort": 8080, "name": "http" }],
                "env": [{ "name": "LOG_LEVEL", "value": "info" },
                        { "name": "UPSTREAM", "value": "http://catalog.shop.svc:8080" }],
                "resources": { "requests": { "cpu": "50m", "memory": "64Mi" },
                               "limits": { "memory": "128Mi" } },
                "readinessProbe": { "httpGet": { "path": "/ready", "port": 8080 } },
            }],
            "tolerations": [{ "key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300 }],
        },
    }))
    .expect("a Pod")
}

async fn create_all<K>(api: &Api<K>, objects: Vec<K>, what: &str)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let started = Instant::now();
    let count = objects.len();
    futures::stream::iter(objects)
        .map(|object| async move {
            let params = PostParams::default();
            loop {
                match api.create(&params, &object).await {
                    Ok(_) => return,
                    // Throttled or timed out under the load: try again.
                    Err(error) => {
                        eprintln!("  retrying a {what} create: {error}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .collect::<()>()
        .await;
    let took = started.elapsed();
    println!(
        "created {count} {what} in {:.0} s ({:.0}/s)",
        took.as_secs_f64(),
        count as f64 / took.as_secs_f64()
    );
}

/// Where one pass over an incident spent its time, in ms from its first datagram, from the
/// controller's `incident written` log line.
#[derive(Clone, Copy, Debug)]
struct Pass {
    started: u64,
    marked: u64,
    done: u64,
}

/// The controller process; killed on drop.
struct Controller {
    child: Child,
    /// Every pass the controller logged, by node, in order.
    passes: Arc<Mutex<HashMap<String, Vec<Pass>>>>,
    netconsole: SocketAddr,
    metrics: SocketAddr,
    synced_after: Duration,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Controller {
    fn start(kubeconfig: &std::path::Path) -> Self {
        let binary = lastgasp_binary();
        let started = Instant::now();
        let mut child = Command::new(binary)
            .args([
                "--log-format",
                "json",
                "controller",
                "--insecure-allow-unsigned",
            ])
            .args([
                "--netconsole-addr",
                "127.0.0.1:0",
                "--report-addr",
                "127.0.0.1:0",
            ])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--deletion-evidence",
                "any",
            ])
            .args(["--breaker-max-nodes", "100000"])
            .env("KUBECONFIG", kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the controller starts");
        let stdout = child.stdout.take().expect("its stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let passes = Arc::new(Mutex::new(HashMap::<String, Vec<Pass>>::new()));
        let logged = passes.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let Ok(json) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if json["message"] == "cluster cache synced; listening" {
                    let _ = tx.send(json);
                } else if json["message"] == "incident written" {
                    let ms = |key: &str| json[key].as_u64().unwrap_or_default();
                    let pass = Pass {
                        started: ms("started_ms"),
                        marked: ms("marked_ms"),
                        done: ms("done_ms"),
                    };
                    let node = json["node"].as_str().unwrap_or_default().to_owned();
                    logged.lock().unwrap().entry(node).or_default().push(pass);
                }
            }
        });
        let synced = rx
            .recv_timeout(Duration::from_secs(1800))
            .expect("the controller synced its cache");
        let address = |key: &str| synced[key].as_str().unwrap().parse().unwrap();
        Self {
            passes,
            netconsole: address("netconsole_addr"),
            metrics: address("metrics_addr"),
            synced_after: started.elapsed(),
            child,
        }
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the controller's status");
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib / 1024.0
    }

    /// A counter of `/metrics`, summed over the series whose labels contain `labels`.
    fn counter(&self, name: &str, labels: &str) -> f64 {
        let body = http_get(self.metrics, "/metrics");
        body.lines()
            .filter(|line| line.starts_with(name) && line.contains(labels))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn http_get(address: SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).expect("the metrics server");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// Replays the sysrq capture from `victim`'s address and waits for the node's deletion:
/// the time from the first datagram to that watch event.
async fn panic_and_wait(client: &Client, controller: &Controller, victim: usize) -> Duration {
    let nodes: Api<Node> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={}", node_name(victim)));
    let mut events = std::pin::pin!(watcher(nodes, config).default_backoff());
    // The watch is listed and running before the first datagram.
    while let Some(event) = events.try_next().await.expect("the node watch") {
        if matches!(event, watcher::Event::InitDone) {
            break;
        }
    }
    let to = controller.netconsole;
    let ip = node_ip(victim).to_string();
    let first = Instant::now();
    std::thread::spawn(move || replay_sysrq_capture(&ip, to));
    loop {
        match tokio::time::timeout(Duration::from_secs(120), events.try_next()).await {
            Ok(Ok(Some(watcher::Event::Delete(_)))) => return first.elapsed(),
            Ok(Ok(Some(_))) => {}
            other => panic!("node {} not deleted: {other:?}", node_name(victim)),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Floods the controller with plain netconsole lines from the first `INGEST_SENDERS` bystander
/// nodes' addresses, with `victim` panicking halfway; returns datagrams sent and counted.
/// Returns when the victim's first datagram left.
fn flood(controller: &Controller, bystanders: std::ops::Range<usize>, victim: usize) -> Instant {
    // The sender on CPU 0, this thread only.
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity only read and
    // write the set given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
    let to = controller.netconsole;
    let sockets: Vec<UdpSocket> = bystanders
        .map(|i| {
            let socket = UdpSocket::bind((node_ip(i), 0)).expect("a socket on a node's address");
            socket.connect(to).expect("connected to the controller");
            socket
        })
        .collect();
    let payloads: Vec<Vec<u8>> = (0..sockets.len())
        .map(|i| format!("[ 1234.{i:06}] eth0: link up, 1000 Mbps, full duplex\n").into_bytes())
        .collect();
    // `SEND_BATCH` copies of each sender's line per sendmmsg(2): one sender core then sends
    // more than the controller's target rate.
    let mut iovecs: Vec<[libc::iovec; SEND_BATCH]> = payloads
        .iter()
        .map(|payload| {
            [libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            }; SEND_BATCH]
        })
        .collect();
    let mut messages: Vec<[libc::mmsghdr; SEND_BATCH]> = iovecs
        .iter_mut()
        .map(|iovecs| {
            std::array::from_fn(|k| {
                // SAFETY: all zeroes is a valid mmsghdr (null name and control, no flags).
                let mut message: libc::mmsghdr = unsafe { std::mem::zeroed() };
                message.msg_hdr.msg_iov = &mut iovecs[k];
                message.msg_hdr.msg_iovlen = 1;
                message
            })
        })
        .collect();
    let before = controller.counter("lastgasp_controller_datagrams_received_total", "netconsole");
    let started = Instant::now();
    let mut sent = 0u64;
    let mut panicked = None;
    while started.elapsed() < INGEST_FLOOD {
        for (socket, batch) in sockets.iter().zip(messages.iter_mut()) {
            use std::os::fd::AsRawFd as _;
            // SAFETY: each mmsghdr points at one iovec of `iovecs`, which points into
            // `payloads`; both outlive the call and are not moved while it runs.
            let count = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    batch.as_mut_ptr(),
                    SEND_BATCH as libc::c_uint,
                    0,
                )
            };
            if count > 0 {
                sent += count as u64;
            }
        }
        if panicked.is_none() && started.elapsed() >= INGEST_FLOOD / 2 {
            panicked = Some(Instant::now());
            let ip = node_ip(victim).to_string();
            std::thread::spawn(move || replay_sysrq_capture(&ip, to));
        }
    }
    let took = started.elapsed();
    // Let the controller drain its socket.
    std::thread::sleep(Duration::from_secs(2));
    let counted =
        controller.counter("lastgasp_controller_datagrams_received_total", "netconsole") - before;
    println!(
        "ingest: {sent} plain datagrams sent from {} addresses in {:.1} s ({:.0}/s); the controller \
         counted {counted:.0} ({:.0}/s over the flood; the rest overflowed its socket)",
        sockets.len(),
        took.as_secs_f64(),
        sent as f64 / took.as_secs_f64(),
        counted / took.as_secs_f64(),
    );
    panicked.expect("the victim panicked during the flood")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nodes_total = setting("LASTGASP_SCALE_NODES", 5_000);
    let pods_total = setting("LASTGASP_SCALE_PODS", 150_000);
    let panics = setting("LASTGASP_SCALE_PANICS", 20);
    // Victims: one per panic, and one more panicking during the ingest flood.
    let victims = panics + 1;
    assert!(
        nodes_total > victims + INGEST_SENDERS && pods_total >= victims * VICTIM_PODS,
        "too small a cluster for {panics} panics"
    );
    println!(
        "controller at scale: {nodes_total} nodes, {pods_total} pods, {panics} panics of nodes with \
         {VICTIM_PODS} pods"
    );

    let server = RealApiServer::start().await?;
    let admin = server.admin_client().await?;
    let kubeconfig = server.dir().join("admin.kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml(&User::Admin)?)?;

    create_all(
        &Api::all(admin.clone()),
        (0..nodes_total).map(node).collect(),
        "nodes",
    )
    .await;
    let others = pods_total - victims * VICTIM_PODS;
    let pods: Vec<Pod> = (0..victims)
        .flat_map(|v| (0..VICTIM_PODS).map(move |p| pod(&format!("v{v}-{p}"), &node_name(v))))
        .chain((0..others).map(|p| {
            let node = victims + p % (nodes_total - victims);
            pod(&format!("p{p}"), &node_name(node))
        }))
        .collect();
    create_all(&Api::namespaced(admin.clone(), "default"), pods, "pods").await;

    let controller = Controller::start(&kubeconfig);
    println!(
        "controller synced in {:.1} s; RSS {:.0} MiB",
        controller.synced_after.as_secs_f64(),
        controller.rss_mib()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = controller.rss_mib();
    println!(
        "RSS 5 s later: {rss:.0} MiB ({:.1} KiB per pod)",
        rss * 1024.0 / pods_total as f64
    );

    let pods_api: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let mut times = Vec::new();
    let mut phases = Vec::new();
    for victim in 0..panics {
        let took = panic_and_wait(&admin, &controller, victim).await;
        let left = pods_api
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", node_name(victim))))
            .await?
            .items
            .len();
        assert_eq!(left, 0, "pods of {} left", node_name(victim));
        let first_pass = controller
            .passes
            .lock()
            .unwrap()
            .get(&node_name(victim))
            .and_then(|passes| passes.first().copied());
        println!(
            "panic {victim}: first datagram → node deleted {took:?}; the controller's first pass \
             (ms from the datagram it received): {first_pass:?}"
        );
        times.push(took);
        phases.extend(first_pass);
    }
    let median = |phase: fn(&Pass) -> u64| {
        let mut values: Vec<u64> = phases.iter().map(phase).collect();
        values.sort();
        values.get(values.len() / 2).copied().unwrap_or_default()
    };
    println!(
        "where the time goes (medians, ms from the first datagram received): executor started \
         {}, node and pods marked {}, pods and node deleted {}",
        median(|pass| pass.started),
        median(|pass| pass.marked),
        median(|pass| pass.done)
    );
    times.sort();
    println!(
        "first datagram → last write over {panics} panics: p50 {:?}, p99 {:?}, max {:?}",
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        times.last().unwrap()
    );

    // Ingest: the controller on CPU 1 alone, the sender here on CPU 0.
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &controller.child.id().to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    println!("controller pinned to one core: {pinned}");
    let flood_victim = panics;
    let bystanders = victims..victims + INGEST_SENDERS;
    let (deleted_tx, deleted) = tokio::sync::oneshot::channel();
    let watch = {
        let client = admin.clone();
        let config = watcher::Config::default()
            .fields(&format!("metadata.name={}", node_name(flood_victim)));
        tokio::spawn(async move {
            let mut events =
                std::pin::pin!(watcher(Api::<Node>::all(client), config).default_backoff());
            while let Ok(Some(event)) = events.try_next().await {
                if matches!(event, watcher::Event::Delete(_)) {
                    let _ = deleted_tx.send(Instant::now());
                    return;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let panicked = tokio::task::block_in_place(|| flood(&controller, bystanders, flood_victim));
    match tokio::time::timeout(Duration::from_secs(60), deleted).await {
        Ok(Ok(at)) => println!(
            "the node that panicked in the middle of the flood: first datagram → node deleted {:?}",
            at - panicked
        ),
        _ => println!("the node that panicked during the flood was NOT acted on within 60 s"),
    }
    watch.abort();
    Ok(())
}
