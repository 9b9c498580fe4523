//! The agent's Prometheus metrics and the HTTP endpoint that serves them.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::health::Health;

/// Most distinct values a free-form label takes before new ones become `other`: ever, for
/// `comm` and `plugin`; at once, for `namespace`, `pod` and `container`.
pub const MAX_LABEL_VALUES: usize = 64;

/// A hung thread's series. `namespace`, `pod` and `container` name the thread's container in a
/// cluster and are empty otherwise.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HungThreadLabels {
    pub comm: String,
    pub protocol: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// A container's series, its labels capped by a [`PodLabelLimiter`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContainerLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniCallLabels {
    pub plugin: String,
    pub command: String,
    pub result: String,
}

/// A running CNI call's series. `namespace` and `pod` come from the call's `CNI_ARGS`
/// (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`) and are empty without them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniInFlightLabels {
    pub plugin: String,
    pub command: String,
    pub namespace: String,
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: String,
    pub mode: String,
    pub attached: String,
    /// `feature:missing_helper` pairs, comma-separated; empty when nothing is degraded.
    pub degraded: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubernetesWriteLabels {
    /// `node_conditions`, `event` or `pod_annotation`.
    pub object: String,
    /// `success`, `error` (a failed attempt), `dropped` (a write given up) or `rate_limited`
    /// (a termination Event beyond its pod's budget).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone)]
pub struct CniDurationBuckets;

impl MetricConstructor<Histogram> for CniDurationBuckets {
    fn new_metric(&self) -> Histogram {
        // 1 ms to ~4.4 min.
        Histogram::new(exponential_buckets(0.001, 2.0, 19))
    }
}

/// The metrics the agent's stages update; kernel-side counters are read by collectors at scrape time.
pub struct AgentMetrics {
    pub netlink_hung_threads: Family<HungThreadLabels, Gauge>,
    pub netlink_hangs: Family<ProtocolLabels, Counter>,
    pub cni_call_duration: Family<CniCallLabels, Histogram, CniDurationBuckets>,
    pub cni_calls_in_flight: Family<CniInFlightLabels, Gauge>,
    pub cni_calls_stuck: Family<CniInFlightLabels, Gauge>,
    pub kernel_events: Family<KindLabels, Counter>,
    pub probe_info: Family<ProbeLabels, Gauge>,
    pub agent_drops: Family<ReasonLabels, Counter>,
    pub last_gasp_datagrams: Family<ReasonLabels, Counter>,
    pub kubernetes_writes: Family<KubernetesWriteLabels, Counter>,
    pub netconsole_targets: Family<StateLabels, Gauge>,
    pub container_backoff: Family<ContainerLabels, Gauge<f64, AtomicU64>>,
    pub container_terminations: Family<CauseLabels, Counter>,
}

impl AgentMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self {
            netlink_hung_threads: Family::default(),
            netlink_hangs: Family::default(),
            cni_call_duration: Family::new_with_constructor(CniDurationBuckets),
            cni_calls_in_flight: Family::default(),
            cni_calls_stuck: Family::default(),
            kernel_events: Family::default(),
            probe_info: Family::default(),
            agent_drops: Family::default(),
            last_gasp_datagrams: Family::default(),
            kubernetes_writes: Family::default(),
            netconsole_targets: Family::default(),
            container_backoff: Family::default(),
            container_terminations: Family::default(),
        };
        registry.register(
            "netlink_recv_hung_threads",
            "Threads whose netlink recvfrom/recvmsg/recvmmsg call has been in flight longer than the hang threshold",
            metrics.netlink_hung_threads.clone(),
        );
        registry.register(
            "netlink_recv_hangs",
            "Netlink recv calls that crossed the hang threshold",
            metrics.netlink_hangs.clone(),
        );
        registry.register(
            "cni_call_duration_seconds",
            "Duration of completed CNI plugin calls, from exec to exit",
            metrics.cni_call_duration.clone(),
        );
        registry.register(
            "cni_calls_in_flight",
            "CNI plugin processes currently running",
            metrics.cni_calls_in_flight.clone(),
        );
        registry.register(
            "cni_calls_stuck",
            "CNI plugin processes running longer than the stuck threshold",
            metrics.cni_calls_stuck.clone(),
        );
        registry.register(
            "kernel_events",
            "Kernel panics, oopses, lockups, hung tasks, RCU stalls and OOM kills seen on the console",
            metrics.kernel_events.clone(),
        );
        registry.register(
            "probe_info",
            "Each probe, how it is attached (tracepoint, kprobe, fentry), whether it attached, \
             and which of its features are degraded for want of a BPF helper (feature:helper)",
            metrics.probe_info.clone(),
        );
        registry.register(
            "agent_dropped_events",
            "Events the agent's userspace dropped, by reason",
            metrics.agent_drops.clone(),
        );
        registry.register(
            "last_gasp_datagrams",
            "Last-gasp datagrams sent to the controller, by result",
            metrics.last_gasp_datagrams.clone(),
        );
        registry.register(
            "agent_kubernetes_writes",
            "In a cluster, the agent's writes of its Node conditions, Events and Pod annotations, by result",
            metrics.kubernetes_writes.clone(),
        );
        registry.register(
            "netconsole_targets",
            "Netconsole targets the agent was asked for, by state: enabled, failed (no route, \
             unresolved next hop, refused by the kernel), unavailable (no netconsole or configfs)",
            metrics.netconsole_targets.clone(),
        );
        registry.register(
            "container_backoff_seconds",
            "In a cluster, containers of this node's pods that kubelet holds back before \
             restarting them: the back-off delay, until the expected start",
            metrics.container_backoff.clone(),
        );
        registry.register(
            "container_terminations",
            "Processes of pods that ended (containers, and child processes killed while their \
             container lives), by cause: exited, crashed, oom_killed, killed",
            metrics.container_terminations.clone(),
        );
        Arc::new(metrics)
    }
}

/// Caps how many distinct values a label takes; later newcomers are reported as `other`.
#[derive(Debug, Default)]
pub struct LabelLimiter {
    seen: Mutex<HashSet<String>>,
}

impl LabelLimiter {
    pub fn label(&self, value: &str) -> String {
        let mut seen = self.seen.lock().expect("label limiter lock");
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < MAX_LABEL_VALUES {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        "other".to_owned()
    }
}

/// Caps how many distinct values of a label are in use at once. A value is in use from
/// [`acquire`](Self::acquire) to the matching [`release`](Self::release), i.e. while a series
/// carries it; past [`MAX_LABEL_VALUES`] values in use, newcomers read `other` until some are
/// released. The empty value and `other` itself are never counted.
#[derive(Debug, Default)]
pub struct LiveLabelLimiter {
    in_use: HashMap<String, usize>,
}

impl LiveLabelLimiter {
    /// The label for `value`; release it when its series goes away.
    pub fn acquire(&mut self, value: &str) -> String {
        if value.is_empty() || value == "other" {
            return value.to_owned();
        }
        if let Some(users) = self.in_use.get_mut(value) {
            *users += 1;
            return value.to_owned();
        }
        if self.in_use.len() < MAX_LABEL_VALUES {
            self.in_use.insert(value.to_owned(), 1);
            return value.to_owned();
        }
        "other".to_owned()
    }

    /// Gives back a label that [`acquire`](Self::acquire) returned.
    pub fn release(&mut self, label: &str) {
        if let Some(users) = self.in_use.get_mut(label) {
            *users -= 1;
            if *users == 0 {
                self.in_use.remove(label);
            }
        }
    }
}

/// The `namespace`, `pod` and `container` labels of series about something in a pod, each
/// capped by its own [`LiveLabelLimiter`].
#[derive(Debug, Default)]
pub struct PodLabelLimiter {
    namespaces: LiveLabelLimiter,
    pods: LiveLabelLimiter,
    containers: LiveLabelLimiter,
}

/// Label values handed out by a [`PodLabelLimiter`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl PodLabelLimiter {
    pub fn acquire(&mut self, namespace: &str, pod: &str, container: &str) -> PodLabels {
        PodLabels {
            namespace: self.namespaces.acquire(namespace),
            pod: self.pods.acquire(pod),
            container: self.containers.acquire(container),
        }
    }

    /// Gives back the labels of a series that [`acquire`](Self::acquire) returned.
    pub fn release(&mut self, namespace: &str, pod: &str, container: &str) {
        self.namespaces.release(namespace);
        self.pods.release(pod);
        self.containers.release(container);
    }
}

/// Adds one to the gauge series of `labels`, creating it.
pub fn inc_series<S: Clone + Hash + Eq>(family: &Family<S, Gauge>, labels: &S) {
    family.get_or_create(labels).inc();
}

/// Takes one from the gauge series of `labels` and removes the series when it reaches zero,
/// so the family only has series for what is going on now. For families with one writer:
/// another's increment between the decrement and the removal would be lost.
pub fn dec_series<S: Clone + Hash + Eq>(family: &Family<S, Gauge>, labels: &S) {
    let left = family.get(labels).map(|gauge| gauge.dec() - 1);
    if left.is_some_and(|left| left <= 0) {
        family.remove(labels);
    }
}

/// Serves `/metrics` (Prometheus text format) and `/healthz` until the task is dropped.
/// `/healthz` answers 200 `ok` while `health` has no problem, else 503 with one line per problem.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: Health,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(registry)
        .merge(
            Router::new()
                .route("/healthz", get(healthz_handler))
                .with_state(health),
        );
    axum::serve(listener, app).await
}

async fn healthz_handler(State(health): State<Health>) -> impl IntoResponse {
    let problems = health.problems();
    if problems.is_empty() {
        return (StatusCode::OK, "ok\n".to_owned());
    }
    let mut body = problems.join("\n");
    body.push('\n');
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics for scrapers that ask for it, the classic Prometheus text format otherwise.
async fn metrics_handler(
    State(registry): State<Arc<Registry>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let mut body = String::new();
    if encode(&mut body, &registry).is_err() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics encoding failed\n",
        )
            .into_response();
    }
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if wants_openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            openmetrics_to_prometheus_text(&body),
        )
            .into_response()
    }
}

/// Rewrites OpenMetrics text as the Prometheus 0.0.4 text format: a counter family is named
/// with its `_total` suffix there, and `# UNIT` and `# EOF` do not exist.
pub fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(help) = line.strip_prefix("# HELP ") {
            pending_help = Some(help);
            continue;
        }
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let (name, kind) = declared.split_once(' ').unwrap_or((declared, "untyped"));
            let family = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(help) = pending_help.take() {
                let text = help.split_once(' ').map_or("", |(_, text)| text);
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_take_their_total_name_in_prometheus_text() {
        let openmetrics = "# HELP a_events Events.\n# TYPE a_events counter\na_events_total{k=\"v\"} 1\n# HELP a_seconds Time.\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\na_seconds_count 0\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(openmetrics),
            "# HELP a_events_total Events.\n# TYPE a_events_total counter\na_events_total{k=\"v\"} 1\n# HELP a_seconds Time.\n# TYPE a_seconds histogram\na_seconds_count 0\n"
        );
    }

    #[test]
    fn label_limiter_caps_distinct_values() {
        let limiter = LabelLimiter::default();
        for i in 0..MAX_LABEL_VALUES {
            assert_eq!(limiter.label(&i.to_string()), i.to_string());
        }
        assert_eq!(limiter.label("newcomer"), "other");
        assert_eq!(limiter.label("0"), "0");
    }

    #[test]
    fn live_label_limiter_caps_values_in_use_and_frees_released_ones() {
        let mut limiter = LiveLabelLimiter::default();
        let labels: Vec<String> = (0..MAX_LABEL_VALUES)
            .map(|i| limiter.acquire(&format!("pod-{i}")))
            .collect();
        assert_eq!(labels[7], "pod-7");
        assert_eq!(
            limiter.acquire("pod-7"),
            "pod-7",
            "a value in use is shared"
        );
        assert_eq!(limiter.acquire("newcomer"), "other");
        assert_eq!(limiter.acquire(""), "", "empty is free");
        limiter.release("pod-7");
        assert_eq!(
            limiter.acquire("newcomer"),
            "other",
            "pod-7 is still used once"
        );
        limiter.release("pod-7");
        limiter.release("other");
        assert_eq!(limiter.acquire("newcomer"), "newcomer");
        assert_eq!(limiter.acquire("pod-7"), "other");
    }

    /// `GET path` over plain HTTP/1.1: status code and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, body.to_owned())
    }

    #[tokio::test]
    async fn healthz_says_what_is_down() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::default();
        let server = tokio::spawn(serve(listener, Arc::default(), health.clone()));
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        health.set_down("events", "task `events` panicked: boom");
        health.set_down("probes", "program `console` (id 7) is not loaded");
        assert_eq!(
            get(addr, "/healthz").await,
            (
                503,
                "task `events` panicked: boom\nprogram `console` (id 7) is not loaded\n".into()
            )
        );
        health.set_up("probes");
        assert_eq!(get(addr, "/healthz").await.0, 503);
        health.set_up("events");
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        assert_eq!(get(addr, "/metrics").await.0, 200);
        server.abort();
    }

    #[test]
    fn gauge_series_exist_only_while_above_zero() {
        let family: Family<ReasonLabels, Gauge> = Family::default();
        let labels = ReasonLabels { reason: "a".into() };
        inc_series(&family, &labels);
        inc_series(&family, &labels);
        dec_series(&family, &labels);
        assert_eq!(family.get(&labels).map(|gauge| gauge.get()), Some(1));
        dec_series(&family, &labels);
        assert!(family.get(&labels).is_none());
        dec_series(&family, &labels);
        assert!(
            family.get(&labels).is_none(),
            "a missing series stays missing"
        );
    }
}
