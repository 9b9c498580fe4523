//! Fixtures shared by the agent, controller, deploy and VM tests: an agent configuration for
//! tests, a controller configuration on loopback, the real sysrq netconsole capture, and the
//! `lastgasp` binary.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lastgasp::{
    agent::{AgentConfig, loader::NetlinkProbeMode, terminations::backoff::KubeletBackoff},
    controller::{ControllerConfig, policy::Policy, trust::DeletionEvidence},
    health::Health,
    wire::AuthKey,
};
use serde_json::Value;

/// An agent for tests on this host, named `node`: standalone, metrics on an ephemeral loopback
/// port, no controller, no netconsole or pstore, a 500 ms netlink hang threshold, the best
/// netlink probe mode, no panic hold. Tests override what they exercise.
pub fn agent_config(node: &str) -> AgentConfig {
    AgentConfig {
        node_name: node.into(),
        node_ip: None,
        metrics_addr: "127.0.0.1:0".parse().expect("a socket address"),
        controller: None,
        controller_service: None,
        netconsole_targets: Vec::new(),
        auth_key: AuthKey::None,
        netlink_hang_threshold: Duration::from_millis(500),
        netlink_probe: NetlinkProbeMode::Auto,
        ignore_helpers: Vec::new(),
        cni_bin_dirs: Vec::new(),
        cni_stuck_threshold: Duration::from_secs(60),
        panic_hold: Duration::ZERO,
        cluster: None,
        pstore: None,
        kubelet_backoff: KubeletBackoff::default(),
        pod_cgroup_roots: Vec::new(),
    }
}

/// The `lastgasp` binary, built (if it is not up to date) with the profile of these tests.
pub fn lastgasp_binary() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cargo = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
    cargo
        .args(["build", "--package", "lastgasp", "--bin", "lastgasp"])
        .current_dir(&workspace);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        cargo.arg("--release");
        "release"
    };
    let status = cargo.status().expect("cargo runs");
    assert!(status.success(), "building lastgasp failed: {status}");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    target_dir.join(profile).join("lastgasp")
}

/// Unix time now in milliseconds, as reports carry it.
pub fn now_ms() -> u64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond() as u64
}

/// A controller on loopback ports chosen by the kernel, with the shipped trust defaults: only a
/// verified `panic()` report deletes at once; other evidence waits up to 2 min for the node to
/// be seen dead (40 s of unchanged Lease).
pub fn controller_config(policy: Policy, auth_key: AuthKey) -> ControllerConfig {
    ControllerConfig {
        netconsole_addr: "127.0.0.1:0".parse().expect("valid"),
        report_addr: "127.0.0.1:0".parse().expect("valid"),
        metrics_addr: "127.0.0.1:0".parse().expect("valid"),
        auth_key,
        policy,
        dry_run: false,
        concurrency: 8,
        breaker_max_nodes: 3,
        breaker_window: Duration::from_secs(600),
        deletion_evidence: DeletionEvidence::Verified,
        node_dead_after: Duration::from_secs(40),
        mark_wait: Duration::from_secs(120),
        leader: None,
        reporter: "lastgasp-controller".to_owned().into(),
        health: Health::default(),
    }
}

pub fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object["metadata"]["annotations"][key].as_str()
}

/// Polls `done` every 20 ms; fails the test after `within`.
pub async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real netconsole capture of a Debian 6.1 cloud kernel crashed with sysrq, datagram by
/// datagram: (format, payload), from the shared test data beside the repository.
pub fn sysrq_capture() -> Vec<(String, Vec<u8>)> {
    use base64::Engine as _;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/testdata/netconsole/debian-6.1-cloud-sysrq-crash.jsonl"
    );
    std::fs::read_to_string(path)
        .expect("the shared netconsole capture")
        .lines()
        .map(|line| {
            let datagram: Value = serde_json::from_str(line).expect("a JSON datagram");
            (
                datagram["format"].as_str().expect("a format").to_owned(),
                base64::engine::general_purpose::STANDARD
                    .decode(datagram["payload_b64"].as_str().expect("a payload"))
                    .expect("base64"),
            )
        })
        .collect()
}

/// Sends [`sysrq_capture`] from `ip` to `to` as the kernel does: the plain and the extended
/// target from two ports, 200 µs apart.
pub fn replay_sysrq_capture(ip: &str, to: std::net::SocketAddr) {
    let plain = std::net::UdpSocket::bind((ip, 0)).expect("a socket on the node's address");
    let extended = std::net::UdpSocket::bind((ip, 0)).expect("a socket on the node's address");
    for (format, payload) in sysrq_capture() {
        let socket = if format == "plain" { &plain } else { &extended };
        socket.send_to(&payload, to).expect("a datagram sent");
        std::thread::sleep(Duration::from_micros(200));
    }
}
