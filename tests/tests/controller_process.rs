//! The `lastgasp controller` process against the real kube-apiserver, as its ServiceAccount
//! under `deploy/`'s RBAC through the fault proxy: a supervised task that panics makes
//! `/healthz` answer 503 while the process stops, and the process exit with 1.
//!
//! Needs the binaries of `cargo xtask kube`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use lastgasp_tests::{
    fixtures::lastgasp_binary,
    kube::{User, cluster::Cluster},
};
use serde_json::Value;

/// Kills the process if the test fails before it exits.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` over plain HTTP/1.1: status code and body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// The netconsole ingest task panics (the test-only `--inject-task-panic`) a second after it
/// starts. Every API request takes 200 ms, so the controller's orderly stop (stepping down and
/// releasing its leader Lease) takes a few of them: meanwhile `/healthz` answers 503 naming the
/// task and the panic; then the process exits with 1, the Lease released.
#[test]
fn a_task_that_panics_makes_the_controller_unhealthy_then_exit() {
    // Its worker threads serve the proxy while the test waits on the process.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(async {
        let cluster = Cluster::start().await;
        cluster.node("node-a", "127.0.0.3", None).await;
        cluster
            .pod("lastgasp-system", "controller-0", "node-a")
            .await;
        cluster
    });
    let proxy = cluster.proxy();
    proxy.faults().set_latency(Duration::from_millis(200));
    let kubeconfig = std::env::temp_dir().join(format!(
        "lastgasp-process-{}.kubeconfig",
        std::process::id()
    ));
    let controller_account = User::service_account("lastgasp-system", "lastgasp-controller");
    std::fs::write(
        &kubeconfig,
        proxy.kubeconfig_yaml(&controller_account).unwrap(),
    )
    .unwrap();

    let mut controller = Running(
        Command::new(lastgasp_binary())
            .args([
                "controller",
                "--insecure-allow-unsigned",
                "--log-format",
                "json",
            ])
            .args([
                "--netconsole-addr",
                "127.0.0.1:0",
                "--report-addr",
                "127.0.0.1:0",
            ])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args([
                "--leader-election",
                "--leader-election-namespace",
                "lastgasp-system",
            ])
            .args(["--pod-name", "controller-0"])
            .args(["--inject-task-panic", "netconsole-ingest:1s"])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, lines) = mpsc::channel();
    let stdout = controller.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let next_json = |within: Duration| {
        let (at, line) = lines.recv_timeout(within).ok()?;
        let json: Value =
            serde_json::from_str(&line).unwrap_or_else(|error| panic!("{error}: {line}"));
        Some((at, json))
    };
    let wait_for = |message: &str| loop {
        let (at, line) =
            next_json(Duration::from_secs(20)).unwrap_or_else(|| panic!("no log line {message:?}"));
        assert_ne!(line["level"], "ERROR", "{line}");
        if line["message"] == message {
            break (at, line);
        }
    };
    let (_, listening) = wait_for("cluster cache synced; listening");
    let metrics_addr = listening["metrics_addr"].as_str().unwrap().to_owned();
    wait_for("gained leadership");
    assert_eq!(
        http_get(&metrics_addr, "/healthz").unwrap(),
        (200, "ok\n".into())
    );

    let failure = "task `netconsole-ingest` panicked: injected panic (--inject-task-panic)";
    let unhealthy = loop {
        let (status, body) = http_get(&metrics_addr, "/healthz").expect("/healthz answers");
        if status != 200 {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(unhealthy, (503, format!("{failure}\n")));
    let (failed_at, logged) = loop {
        let (at, line) = next_json(Duration::from_secs(5)).expect("the failure logged");
        if line["level"] == "ERROR" {
            break (at, line);
        }
    };
    assert_eq!(logged["task"], "netconsole-ingest");
    assert_eq!(logged["message"], failure);

    let status = loop {
        if let Some(status) = controller.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            failed_at.elapsed() < Duration::from_secs(10),
            "the controller still runs"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = failed_at.elapsed();
    println!("from the failure to the controller's exit: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    controller
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains(&format!("Error: {failure}")), "{stderr}");
    let lease = runtime
        .block_on(cluster.get("leases", Some("lastgasp-system"), "lastgasp-controller"))
        .expect("the leader Lease");
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "released on the way out: {lease}"
    );
    assert_eq!(cluster.refused(), Vec::<String>::new());
    std::fs::remove_file(&kubeconfig).unwrap();
}
