//! The deployment material in `deploy/`: the kustomizations render and validate against
//! Kubernetes' schemas, the controller's and the agent's RBAC, applied to the real
//! kube-apiserver v1.20.2, allow every API call the real controller and agent make as their
//! ServiceAccounts (and nothing they do not make), the alert rules pass promtool and its unit
//! tests, and every metric the dashboard and the alerts use is exported by the real agent and
//! controller.
//!
//! Needs, besides root (the agent loads eBPF): `kubectl` (for `kubectl kustomize`),
//! `kubernetes-validate` (PyPI), `promtool` (Debian package `prometheus`) and the binaries of
//! `cargo xtask kube`.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    net::{SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Pod, Secret},
};
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams},
};
use lastgasp::{
    agent::{
        Agent, AgentConfig,
        discovery::{NETCONSOLE_PORT, REPORTS_PORT, ServiceRef},
        events::AgentEvent,
        pods::ContainerRef,
        terminations::{Cause, Termination},
    },
    controller::{
        Controller, ControllerConfig,
        leader::{self, LeaderConfig, LeaderElection},
        policy::Policy,
    },
    metrics::{AgentMetrics, ReasonLabels},
    wire::{self, AuthKey, Report, ReportKind, ReportSource},
};
use lastgasp_tests::{
    blocking::{block_in_recvfrom, netlink_route_socket},
    fixtures::{agent_config, controller_config, now_ms, replay_sysrq_capture},
    kube::cluster::{Cluster, eventually},
    scrape, scrape_until,
};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

/// The newest Kubernetes release `kubernetes-validate` 1.37.0 ships schemas for.
const KUBERNETES_VERSION: &str = "1.37.0";
const NAMESPACE: &str = "lastgasp-system";
const CONTROLLER_SA: &str = "lastgasp-controller";
const AGENT_SA: &str = "lastgasp-agent";
const KEY: &[u8] = b"deploy-test-key";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// How to get each external tool, for the failure message when one is missing.
fn install_hint(program: &str) -> &'static str {
    match program {
        "kubectl" => "install kubectl (https://kubernetes.io/docs/tasks/tools/)",
        "kubernetes-validate" => "pip install kubernetes-validate==1.37.0",
        "promtool" => "apt-get install prometheus (Debian), or run `cargo xtask setup`",
        _ => "install it",
    }
}

/// Runs a tool from the workspace root, panicking with a clear message if it is missing or
/// fails.
fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run `{program}` ({error}): {}",
                install_hint(program)
            )
        });
    assert!(
        output.status.success(),
        "`{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `kubectl kustomize <dir>`: the rendered YAML and its documents.
fn kustomize(dir: &str) -> (String, Vec<Value>) {
    let yaml = String::from_utf8(run("kubectl", &["kustomize", dir]).stdout).unwrap();
    let documents = serde_saphyr::from_multiple(&yaml)
        .unwrap_or_else(|error| panic!("{dir} renders unparsable YAML: {error}"));
    (yaml, documents)
}

fn yaml_file(relative: &str) -> Value {
    let text = fs::read_to_string(repo().join(relative)).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|error| panic!("{relative}: {error}"))
}

fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn controller_args(documents: &[Value]) -> Vec<String> {
    let deployment = find(documents, "Deployment", "lastgasp-controller");
    serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap()
}

#[test]
fn kustomizations_render_and_validate() {
    for dir in [
        "deploy/base",
        "deploy/overlays/annotate-only",
        "deploy/overlays/test-cluster",
    ] {
        let (yaml, documents) = kustomize(dir);
        assert!(documents.len() > 10, "{dir} renders only {documents:?}");
        let file = std::env::temp_dir().join(format!(
            "lastgasp-deploy-{}-{}.yaml",
            dir.replace('/', "-"),
            std::process::id()
        ));
        fs::write(&file, &yaml).unwrap();
        let output = run(
            "kubernetes-validate",
            &[
                "--kubernetes-version",
                KUBERNETES_VERSION,
                "--strict",
                "--quiet",
                file.to_str().unwrap(),
            ],
        );
        fs::remove_file(&file).unwrap();
        // A kind without a schema is only a warning there: nothing in these may go unchecked.
        let report =
            String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        assert!(
            !report.contains("WARN") && !report.contains("ERROR"),
            "{dir}: {report}"
        );
    }
    // The monitoring objects need the Prometheus Operator's CRDs, which have no schemas
    // there: they must render, and their Grafana ConfigMap carries the dashboard as it is.
    let (_, documents) = kustomize("deploy/monitoring");
    let dashboard = find(&documents, "ConfigMap", "lastgasp-dashboard");
    assert_eq!(
        dashboard["data"]["lastgasp.json"].as_str().unwrap(),
        fs::read_to_string(repo().join("deploy/monitoring/dashboard/lastgasp.json")).unwrap()
    );
}

#[test]
fn annotate_only_overlay_sets_the_policy_and_the_base_does_not() {
    let base = controller_args(&kustomize("deploy/base").1);
    let overlay = controller_args(&kustomize("deploy/overlays/annotate-only").1);
    assert!(
        !base.iter().any(|arg| arg.starts_with("--policy")),
        "base sets a policy: {base:?}"
    );
    assert!(
        overlay
            .windows(2)
            .any(|pair| pair[0] == "--policy" && pair[1] == "annotate"),
        "overlay args lack `--policy annotate`: {overlay:?}"
    );
    assert_eq!(&overlay[..base.len()], &base[..], "the overlay only adds");
}

#[test]
fn alert_rules_pass_promtool_and_match_the_prometheus_rule() {
    run(
        "promtool",
        &[
            "check",
            "rules",
            "deploy/monitoring/rules/lastgasp.rules.yml",
        ],
    );
    run(
        "promtool",
        &[
            "test",
            "rules",
            "deploy/monitoring/rules/lastgasp.rules.test.yml",
        ],
    );
    let rules = yaml_file("deploy/monitoring/rules/lastgasp.rules.yml");
    let prometheus_rule = yaml_file("deploy/monitoring/prometheusrule.yaml");
    assert_eq!(prometheus_rule["kind"], "PrometheusRule");
    assert_eq!(
        prometheus_rule["spec"]["groups"], rules["groups"],
        "the PrometheusRule's groups differ from rules/lastgasp.rules.yml"
    );
    let alerts: BTreeSet<&str> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .filter_map(|rule| rule["alert"].as_str())
        .collect();
    assert_eq!(
        alerts,
        BTreeSet::from([
            "LastgaspAgentDown",
            "LastgaspCNICallsStuck",
            "LastgaspControllerCircuitBreakerOpen",
            "LastgaspCrashSignatureOnManyNodes",
            "LastgaspNetconsoleTargetsNotEnabled",
            "LastgaspNetlinkRecvHung",
            "LastgaspNodeKernelPanic",
        ])
    );
}

// ---- Metric names: the dashboard's and the alerts' against the live binary's. ----

/// Every `lastgasp_*` identifier in a PromQL expression.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for (start, _) in expr.match_indices("lastgasp_") {
        if expr[..start].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let name: String = expr[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        into.insert(name);
    }
}

/// Every string under an `expr` key, at any depth.
fn exprs(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => into.push(expr.clone()),
                    _ => exprs(value, into),
                }
            }
        }
        Value::Array(values) => values.iter().for_each(|value| exprs(value, into)),
        _ => {}
    }
}

/// The series names a scrape can contain: every sample's name, and for every family (its
/// `# TYPE` line) the names of its type. A family without samples is not printed at all, so
/// the scraped process must have had the activity that creates them.
fn exported_series(exposition: &str, into: &mut BTreeSet<String>) {
    for line in exposition.lines() {
        if let Some(declaration) = line.strip_prefix("# TYPE ") {
            let (family, kind) = declaration.split_once(' ').unwrap();
            match kind {
                "counter" => {
                    let base = family.strip_suffix("_total").unwrap_or(family);
                    into.insert(format!("{base}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        into.insert(format!("{family}{suffix}"));
                    }
                }
                _ => {
                    into.insert(family.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            into.insert(line[..end].to_owned());
        }
    }
}

/// The agent, driven so that its families have samples: a CNI plugin call that gets stuck,
/// a netlink recvfrom that hangs, and a panic line in /dev/kmsg (a kernel event and a
/// last-gasp datagram). Scraped twice: while the call is stuck and the thread hung (their
/// gauges have series only then), and after the call has finished (its duration histogram).
async fn agent_exposition() -> String {
    let root = std::env::temp_dir().join(format!("lastgasp-deploy-cni-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    let plugin = root.join("bridge");
    fs::write(&plugin, "#!/bin/sh\nsleep 4\n").unwrap();
    fs::set_permissions(&plugin, fs::Permissions::from_mode(0o755)).unwrap();
    let gasps = UdpSocket::bind("127.0.0.1:0").unwrap();
    gasps
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    let agent = Agent::start(AgentConfig {
        controller: Some(gasps.local_addr().unwrap()),
        auth_key: AuthKey::HmacSha256(KEY.to_vec()),
        netlink_hang_threshold: Duration::from_millis(300),
        cni_bin_dirs: vec![root.clone()],
        cni_stuck_threshold: Duration::from_millis(300),
        ..agent_config("deploy-test")
    })
    .await
    .expect("agent starts (the tests must run as root)");
    let mut events = agent.subscribe();
    let mut cni = Command::new(&plugin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=team;K8S_POD_NAME=deploy-0")
        .spawn()
        .unwrap();
    let (_, netlink) =
        block_in_recvfrom("lg-nl-deploy", netlink_route_socket, Duration::from_secs(4));
    let panic = format!(
        "Kernel panic - not syncing: lastgasp deploy test {}",
        std::process::id()
    );
    fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut kmsg| {
            std::io::Write::write_all(&mut kmsg, format!("<0>{panic}\n").as_bytes())
        })
        .expect("write /dev/kmsg");
    gasps
        .recv(&mut [0u8; 2048])
        .expect("a last-gasp datagram for the panic line");

    let mut seen = BTreeSet::new();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while seen.len() < 4 {
            match events.recv().await {
                Ok(AgentEvent::CniCallStuck(_)) => seen.insert("cni_call_stuck"),
                Ok(AgentEvent::CniCall(_)) => seen.insert("cni_call"),
                Ok(AgentEvent::NetlinkHang(_)) => seen.insert("netlink_hang"),
                Ok(AgentEvent::Kernel(kernel)) if kernel.message == panic => seen.insert("panic"),
                _ => false,
            };
            let active = ["cni_call_stuck", "netlink_hang", "panic"];
            if body.is_empty() && active.iter().all(|kind| seen.contains(kind)) {
                body = scrape(agent.metrics_addr()).await;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("agent activity not all reported, only {seen:?}"));
    assert!(
        !body.is_empty(),
        "the CNI call ended before it was scraped stuck"
    );
    assert!(cni.wait().unwrap().success());
    netlink.join().unwrap();

    body.push_str(&scrape(agent.metrics_addr()).await);
    agent.shutdown().await;
    fs::remove_dir_all(&root).unwrap();
    body
}

/// `lastgasp_agent_dropped_events_total` counts records lost in the ring buffer, which a test
/// cannot cause on purpose: its name comes from the agent's own registration code instead.
fn agent_drops_exposition() -> String {
    let mut registry = Registry::with_prefix("lastgasp");
    let metrics = AgentMetrics::register(&mut registry);
    metrics
        .agent_drops
        .get_or_create(&ReasonLabels {
            reason: "bad_record".into(),
        })
        .inc();
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();
    body
}

/// A real server with `deploy/`'s RBAC, node-b (127.0.0.2, booted as `boot-1`), two pods on
/// node-b, and this controller replica's own pod (on another node).
async fn seeded_cluster() -> Cluster {
    let cluster = Cluster::start().await;
    cluster.namespace("team").await;
    cluster.node("node-b", "127.0.0.2", Some("boot-1")).await;
    for (name, namespace, node) in [
        ("b-0", "team", "node-b"),
        ("b-1", "team", "node-b"),
        ("lastgasp-controller-0", NAMESPACE, "node-c"),
    ] {
        cluster.pod(namespace, name, node).await;
    }
    cluster
}

/// The requests that reached the proxy that RBAC authorizes (resource requests), as RBAC
/// sees them; panics if any was refused (403) or failed otherwise.
fn accesses(cluster: &Cluster) -> BTreeSet<Access> {
    let requests = cluster.proxy().requests();
    let failed: Vec<_> = requests
        .iter()
        .filter(|request| request.status == 403 || request.status >= 500)
        .collect();
    assert!(failed.is_empty(), "calls refused or failed: {failed:#?}");
    requests
        .into_iter()
        .filter_map(|request| {
            Some(access(
                request.verb.as_deref()?,
                request.resource.as_deref()?,
                &request.uri,
            ))
        })
        .collect()
}

/// The status of a call that failed; panics on success.
fn api_error_code<T: std::fmt::Debug>(result: kube::Result<T>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// The controller, with one authenticated last-gasp report that it acts on (marking and
/// deleting pods) and one malformed datagram that it drops.
async fn controller_exposition() -> String {
    let cluster = seeded_cluster().await;
    let cluster = &cluster;
    let controller = Controller::start(
        cluster.client_as(CONTROLLER_SA).await,
        controller_config_with_key(Policy::DeletePods),
    )
    .await
    .unwrap();
    let datagram = wire::encode(
        &Report {
            node: "node-b".into(),
            boot_id: "boot-1".into(),
            seq: 1,
            sent_at_ms: now_ms(),
            kind: ReportKind::KernelPanic,
            source: ReportSource::Kprobe,
            message: "Kernel panic - not syncing: sysrq triggered crash".into(),
            context: Vec::new(),
            kernel_release: None,
            event_at_ms: None,
            event_boot_id: None,
            // The probe's named stack, which names the culprit (and so counts the crash).
            frames: vec![
                "panic+0x0/0x2c0".into(),
                "sysrq_handle_crash+0x16/0x20".into(),
            ],
        },
        &AuthKey::HmacSha256(KEY.to_vec()),
    )
    .unwrap();
    // From node-b's address, as its agent sends.
    let sender = UdpSocket::bind("127.0.0.2:0").unwrap();
    sender
        .send_to(b"not a report", controller.report_addr())
        .unwrap();
    sender.send_to(&datagram, controller.report_addr()).unwrap();
    eventually("node-b's pods deleted", Duration::from_secs(10), || async {
        cluster.get("pods", Some("team"), "b-0").await.is_none()
            && cluster.get("pods", Some("team"), "b-1").await.is_none()
    })
    .await;
    // The controller counts a deletion once the API server has answered it, which can be
    // after the pod is already gone: wait for the count, not only for the pods.
    scrape_until(
        controller.metrics_addr(),
        &[r#"lastgasp_controller_deleted_objects_total{object="pod"} 2"#],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    let mut expressions = Vec::new();
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(repo().join("deploy/monitoring/dashboard/lastgasp.json")).unwrap(),
    )
    .unwrap();
    exprs(&dashboard, &mut expressions);
    exprs(
        &yaml_file("deploy/monitoring/rules/lastgasp.rules.yml"),
        &mut expressions,
    );
    let mut used = BTreeSet::new();
    for expr in &expressions {
        metric_names(expr, &mut used);
    }
    assert!(used.len() > 20, "too few metrics found: {used:?}");

    let mut exported = BTreeSet::new();
    let agent = agent_exposition().await;
    let controller = controller_exposition().await;
    exported_series(&agent, &mut exported);
    exported_series(&agent_drops_exposition(), &mut exported);
    exported_series(&controller, &mut exported);
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "used in deploy/monitoring but not exported: {unknown:?}\nexported: {exported:?}"
    );
}

// ---- RBAC: every request of a real controller is allowed by the rendered roles. ----

/// One API request as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Access {
    verb: String,
    group: String,
    /// With the subresource, e.g. `pods/status`.
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

/// Reads group, namespace and name from a request's path, the way the API server routes it.
fn access(verb: &str, resource: &str, uri: &str) -> Access {
    let path = uri.split('?').next().unwrap();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("not a resource path: {uri}"),
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, tail @ ..] if !tail.is_empty() => (Some(*namespace), tail),
        _ => (None, rest),
    };
    Access {
        verb: verb.to_owned(),
        group: group.to_owned(),
        resource: resource.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: rest.get(1).map(|name| (*name).to_owned()),
    }
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|values| values.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_allows(rule: &Value, access: &Access) -> bool {
    let has = |field: &str, wanted: &str| {
        strings(&rule[field])
            .iter()
            .any(|value| *value == "*" || *value == wanted)
    };
    let names = strings(&rule["resourceNames"]);
    has("apiGroups", &access.group)
        && has("resources", &access.resource)
        && has("verbs", &access.verb)
        && (names.is_empty()
            || access
                .name
                .as_deref()
                .is_some_and(|name| names.contains(&name)))
}

/// The rendered rules that apply to a ServiceAccount of ours, with the namespace they apply
/// in (`None`: every namespace, and cluster-scoped resources).
fn rules_of(documents: &[Value], service_account: &str) -> Vec<(Option<String>, Value)> {
    let binds_controller = |binding: &Value| {
        binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|subject| {
                subject["kind"] == "ServiceAccount"
                    && subject["name"] == service_account
                    && subject["namespace"] == NAMESPACE
            })
    };
    let role = |kind: &str, name: &str, namespace: Option<&str>| {
        documents
            .iter()
            .find(|doc| {
                doc["kind"] == kind
                    && doc["metadata"]["name"] == name
                    && doc["metadata"]["namespace"].as_str() == namespace
            })
            .unwrap_or_else(|| panic!("binding to missing {kind} {name}"))
    };
    let mut rules = Vec::new();
    for binding in documents.iter().filter(|doc| binds_controller(doc)) {
        let role_ref = &binding["roleRef"];
        let (kind, name) = (
            role_ref["kind"].as_str().unwrap(),
            role_ref["name"].as_str().unwrap(),
        );
        let (scope, role) = match binding["kind"].as_str().unwrap() {
            "ClusterRoleBinding" => (None, role("ClusterRole", name, None)),
            "RoleBinding" => {
                let namespace = binding["metadata"]["namespace"].as_str().unwrap();
                let role = match kind {
                    "Role" => role("Role", name, Some(namespace)),
                    _ => role("ClusterRole", name, None),
                };
                (Some(namespace.to_owned()), role)
            }
            other => panic!("{other} binds {service_account}"),
        };
        for rule in role["rules"].as_array().unwrap() {
            rules.push((scope.clone(), rule.clone()));
        }
    }
    rules
}

fn allowed(rules: &[(Option<String>, Value)], access: &Access) -> bool {
    rules.iter().any(|(scope, rule)| {
        (scope.is_none() || *scope == access.namespace) && rule_allows(rule, access)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_rbac_allows_every_call_and_nothing_unused() {
    let cluster = seeded_cluster().await;
    let cluster = &cluster;
    // node-b's heartbeat Lease, never renewed again: netconsole evidence marks, the controller
    // reads the Lease until it has seen it unchanged for --node-dead-after, then deletes.
    let renewed = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(600);
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "node-b", "namespace": "kube-node-lease" },
        "spec": {
            "holderIdentity": "node-b",
            "leaseDurationSeconds": 40,
            "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        }
    }))
    .unwrap();
    Api::<Lease>::namespaced(cluster.admin().clone(), "kube-node-lease")
        .create(&PostParams::default(), &lease)
        .await
        .expect("node-b's Lease");

    // What `lastgasp controller --leader-election --node-dead-after 1s` runs, with the
    // default lease name and this replica's pod, as the controller's ServiceAccount.
    let election = LeaderElection::start(
        cluster.client_as(CONTROLLER_SA).await,
        LeaderConfig {
            namespace: NAMESPACE.into(),
            lease_name: "lastgasp-controller".into(),
            identity: "lastgasp-controller-0".into(),
            lease_duration: Duration::from_secs(2),
            renew_interval: Duration::from_millis(200),
            retry_interval: Duration::from_millis(100),
        },
    );
    let labeller = tokio::spawn(leader::label_own_pod(
        cluster.client_as(CONTROLLER_SA).await,
        NAMESPACE.into(),
        "lastgasp-controller-0".into(),
        election.is_leader(),
    ));
    let mut config = controller_config_with_key(Policy::DeletePodsAndNode);
    config.node_dead_after = Duration::from_secs(1);
    config.leader = Some(election.is_leader());
    let controller_client = cluster.client_as(CONTROLLER_SA).await;
    let controller = Controller::start(controller_client.clone(), config)
        .await
        .unwrap();
    eventually(
        "own pod labelled leader",
        Duration::from_secs(10),
        || async {
            cluster
                .get("pods", Some(NAMESPACE), "lastgasp-controller-0")
                .await
                .unwrap()["metadata"]["labels"][leader::LEADER_LABEL]
                == "true"
        },
    )
    .await;

    replay_sysrq_capture("127.0.0.2", controller.netconsole_addr());
    eventually(
        "node-b and its pods deleted",
        Duration::from_secs(15),
        || async {
            cluster.get("nodes", None, "node-b").await.is_none()
                && cluster.get("pods", Some("team"), "b-0").await.is_none()
                && cluster.get("pods", Some("team"), "b-1").await.is_none()
        },
    )
    .await;
    // A renewal (an update of the Lease) after the take-over (its create).
    tokio::time::sleep(Duration::from_millis(500)).await;
    election.stop().await;
    labeller.abort();
    drop(controller);

    let made = accesses(cluster);
    let (_, documents) = kustomize("deploy/base");
    let rules = rules_of(&documents, CONTROLLER_SA);
    let refused: Vec<&Access> = made
        .iter()
        .filter(|access| !allowed(&rules, access))
        .collect();
    assert!(refused.is_empty(), "RBAC refuses: {refused:#?}");

    // Least privilege: every granted verb is used.
    let mut used: HashMap<(String, String), BTreeSet<String>> = HashMap::new();
    for access in &made {
        used.entry((access.group.clone(), access.resource.clone()))
            .or_default()
            .insert(access.verb.clone());
    }
    for (_, rule) in &rules {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    assert!(
                        used.get(&(group.to_owned(), resource.to_owned()))
                            .is_some_and(|verbs| verbs.contains(verb)),
                        "RBAC grants `{verb}` on {group}/{resource}, which the controller never used"
                    );
                }
            }
        }
    }

    // What the grants leave out, the real authorizer refuses.
    let secrets: Api<Secret> = Api::namespaced(controller_client, NAMESPACE);
    assert_eq!(
        api_error_code(secrets.list(&ListParams::default()).await),
        403
    );
}

#[test]
fn access_reads_group_namespace_and_name() {
    assert_eq!(
        access(
            "patch",
            "pods/status",
            "/api/v1/namespaces/team/pods/b-0/status?force=true"
        ),
        Access {
            verb: "patch".into(),
            group: String::new(),
            resource: "pods/status".into(),
            namespace: Some("team".into()),
            name: Some("b-0".into()),
        }
    );
    assert_eq!(
        access("watch", "nodes", "/api/v1/nodes?watch=true"),
        Access {
            verb: "watch".into(),
            group: String::new(),
            resource: "nodes".into(),
            namespace: None,
            name: None,
        }
    );
    assert_eq!(
        access(
            "create",
            "leases",
            "/apis/coordination.k8s.io/v1/namespaces/lastgasp-system/leases"
        ),
        Access {
            verb: "create".into(),
            group: "coordination.k8s.io".into(),
            resource: "leases".into(),
            namespace: Some("lastgasp-system".into()),
            name: None,
        }
    );
}

#[test]
fn metric_names_are_read_from_promql() {
    let mut names = BTreeSet::new();
    metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(lastgasp_a_bucket{x="lastgasp-agent"}[5m]))) / my_lastgasp_b + lastgasp_c_total"#,
        &mut names,
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "lastgasp_a_bucket".to_owned(),
            "lastgasp_c_total".to_owned()
        ])
    );
}

/// The status of node-b's condition `type_`.
async fn node_b_condition(cluster: &Cluster, type_: &str) -> Option<String> {
    let node = cluster.get("nodes", None, "node-b").await?;
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|condition| condition["type"] == type_)
        .and_then(|condition| condition["status"].as_str())
        .map(str::to_owned)
}

/// The value after `flag` in the agent DaemonSet's container args.
fn agent_arg(documents: &[Value], flag: &str) -> Option<String> {
    let daemonset = find(documents, "DaemonSet", "lastgasp-agent");
    let args: Vec<String> = serde_json::from_value(
        daemonset["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
    )
    .unwrap();
    args.windows(2)
        .find(|pair| pair[0] == flag)
        .map(|pair| pair[1].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_rbac_allows_exactly_its_calls() {
    let (_, documents) = kustomize("deploy/base");
    assert_eq!(
        agent_arg(&documents, "--controller"),
        None,
        "the DaemonSet finds the controller from its Service, not a fixed address"
    );
    let service: ServiceRef = agent_arg(&documents, "--controller-service")
        .expect("the DaemonSet names the controller's Service")
        .parse()
        .unwrap();
    // The Service it names is the controller's UDP ingest, with the port names the agent reads.
    let ingest = documents
        .iter()
        .find(|doc| {
            doc["kind"] == "Service"
                && doc["metadata"]["namespace"] == service.namespace.as_str()
                && doc["metadata"]["name"] == service.name.as_str()
        })
        .unwrap_or_else(|| panic!("no Service {service} rendered"));
    let ports: BTreeSet<(&str, &str)> = ingest["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|port| {
            (
                port["name"].as_str().unwrap(),
                port["protocol"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from([(NETCONSOLE_PORT, "UDP"), (REPORTS_PORT, "UDP")])
    );

    let cluster = seeded_cluster().await;
    let cluster = &cluster;
    // The Service's slice as v1.20's EndpointSlice controller writes it: v1beta1, the only
    // version that server has.
    let gvk = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
    let slices = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
    let slice: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-x7k2p", service.name), "namespace": service.namespace,
            "labels": {
                "kubernetes.io/service-name": service.name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{ "name": REPORTS_PORT, "port": 6667, "protocol": "UDP" }],
        "endpoints": [{ "addresses": ["127.0.0.1"], "conditions": { "ready": true } }],
    }))
    .unwrap();
    Api::<DynamicObject>::namespaced_with(cluster.admin().clone(), &service.namespace, &slices)
        .create(&PostParams::default(), &slice)
        .await
        .expect("the ingest Service's EndpointSlice");
    // What the DaemonSet runs: the in-cluster agent as its ServiceAccount, watching its own
    // node's pods and the controller Service's EndpointSlices, writing its node's conditions
    // and Events, through a netlink hang that comes and goes.
    let agent_client = cluster.client_as(AGENT_SA).await;
    let agent = Agent::start(AgentConfig {
        controller_service: Some(service.clone()),
        netlink_hang_threshold: Duration::from_millis(300),
        cluster: Some(agent_client.clone()),
        ..agent_config("node-b")
    })
    .await
    .expect("agent starts (the tests must run as root)");
    eventually(
        "the agent's two watches",
        Duration::from_secs(10),
        || async {
            let requests = cluster.proxy().requests();
            ["pods", "endpointslices"].iter().all(|resource| {
                requests.iter().any(|request| {
                    request.verb.as_deref() == Some("watch")
                        && request.resource.as_deref() == Some(*resource)
                })
            })
        },
    )
    .await;
    let mut endpoints = agent.controller_endpoints();
    tokio::time::timeout(
        Duration::from_secs(5),
        endpoints.wait_for(|endpoints| {
            endpoints.reports == ["127.0.0.1:6667".parse::<SocketAddr>().unwrap()]
        }),
    )
    .await
    .expect("the slice's endpoint")
    .unwrap();
    let (_, hang) = block_in_recvfrom("lg-nl-rbac", netlink_route_socket, Duration::from_secs(4));
    eventually("NetlinkRecvHung=True", Duration::from_secs(10), || async {
        node_b_condition(cluster, "NetlinkRecvHung")
            .await
            .as_deref()
            == Some("True")
    })
    .await;
    hang.join().unwrap();
    eventually("NetlinkRecvHung=False", Duration::from_secs(10), || async {
        node_b_condition(cluster, "NetlinkRecvHung")
            .await
            .as_deref()
            == Some("False")
    })
    .await;
    eventually("the hang's Events", Duration::from_secs(10), || async {
        let events = cluster.list("events", Some("kube-system")).await;
        ["Warning", "Normal"].iter().all(|type_| {
            events
                .iter()
                .any(|event| event["type"] == *type_ && event["regarding"]["name"] == "node-b")
        })
    })
    .await;
    // A container of b-0 exits, as the termination tracker reports it: the writer reads the
    // Pod (its status never shows the exit here), publishes an Event and annotates the Pod.
    let terminations = agent
        .terminations()
        .expect("the termination writer, in a cluster");
    terminations
        .send(Termination {
            at: SystemTime::now(),
            container_id: "b-0-app".into(),
            container: Some(ContainerRef {
                namespace: "team".into(),
                pod: "b-0".into(),
                container: "app".into(),
            }),
            pid: 4242,
            comm: "app".into(),
            main_process: true,
            cause: Cause::Exited { code: 1 },
        })
        .await
        .unwrap();
    eventually(
        "b-0's termination annotation",
        Duration::from_secs(15),
        || async {
            cluster
                .get("pods", Some("team"), "b-0")
                .await
                .is_some_and(|pod| {
                    pod["metadata"]["annotations"]["lastgasp.io/last-termination.app"].is_string()
                })
        },
    )
    .await;
    agent.shutdown().await;

    let made = accesses(cluster);
    let rules = rules_of(&documents, AGENT_SA);
    let refused: Vec<&Access> = made.iter().filter(|a| !allowed(&rules, a)).collect();
    assert!(refused.is_empty(), "RBAC refuses the agent: {refused:#?}");
    // Where (every namespace, or one), which group and resource, which verb.
    type Grant = (Option<String>, String, String, String);
    let granted: BTreeSet<Grant> = rules
        .iter()
        .flat_map(|(scope, rule)| {
            let mut grants = Vec::new();
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        grants.push((
                            scope.clone(),
                            group.to_owned(),
                            resource.to_owned(),
                            verb.to_owned(),
                        ));
                    }
                }
            }
            grants
        })
        .collect();
    // A call is scoped as the grant that allows it: an Event created in `kube-system` under a
    // ClusterRole is a cluster-wide grant in use.
    let used: BTreeSet<Grant> = made
        .iter()
        .map(|a| {
            let scope = rules
                .iter()
                .find(|(scope, rule)| {
                    (scope.is_none() || *scope == a.namespace) && rule_allows(rule, a)
                })
                .and_then(|(scope, _)| scope.clone());
            (scope, a.group.clone(), a.resource.clone(), a.verb.clone())
        })
        .collect();
    assert_eq!(
        granted, used,
        "the agent is granted exactly what it uses, where it uses it"
    );

    // What the grants leave out, the real authorizer refuses.
    let pods: Api<Pod> = Api::namespaced(agent_client, "team");
    assert_eq!(
        api_error_code(pods.delete("b-0", &DeleteParams::default()).await),
        403
    );
}

#[test]
fn the_agent_service_monitor_keeps_the_agents_pod_labels() {
    // The agent's hang and CNI gauges name the pod concerned in `namespace`, `pod` and
    // `container`: with honorLabels they stay as exported (an empty one drops the label)
    // instead of becoming `exported_*` beside the agent pod's own target labels.
    let (_, documents) = kustomize("deploy/monitoring");
    let monitor = find(&documents, "ServiceMonitor", "lastgasp-agent");
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
}

fn controller_config_with_key(policy: Policy) -> ControllerConfig {
    controller_config(policy, AuthKey::HmacSha256(KEY.to_vec()))
}
