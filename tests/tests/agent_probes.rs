//! The agent's probes for real: loaded into this kernel (root required), driven by real
//! netlink and UDP sockets, real execs of CNI plugins and real lines in /dev/kmsg.

use std::{
    fs,
    io::Write as _,
    net::{SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lastgasp::{
    agent::{
        Agent, AgentConfig,
        events::{AgentEvent, CniCall},
    },
    kernel_log::KernelEventKind,
    procfs,
    wire::{self, AuthKey, ReportKind, ReportSource},
};
use lastgasp_tests::{
    blocking::{block_in_recvfrom, netlink_route_socket, udp_socket},
    fixtures::agent_config,
    scrape,
};
use tokio::sync::broadcast;

const HANG_THRESHOLD: Duration = Duration::from_millis(500);

async fn start_agent(cni_dir: Option<&Path>, controller: Option<SocketAddr>) -> Agent {
    Agent::start(AgentConfig {
        controller,
        auth_key: AuthKey::HmacSha256(b"test-key".to_vec()),
        netlink_hang_threshold: HANG_THRESHOLD,
        cni_bin_dirs: cni_dir.into_iter().map(Path::to_path_buf).collect(),
        cni_stuck_threshold: Duration::from_secs(1),
        ..agent_config("test-node")
    })
    .await
    .expect("agent starts (the tests must run as root)")
}

/// Collects events until `deadline`, or until `done` says enough.
async fn collect_until(
    events: &mut broadcast::Receiver<AgentEvent>,
    within: Duration,
    mut done: impl FnMut(&[AgentEvent]) -> bool,
) -> Vec<AgentEvent> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(event)) => seen.push(event),
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn netlink_recv_hang_is_reported_and_cleared_but_udp_is_not() {
    let agent = start_agent(None, None).await;
    netlink_hang_is_reported_and_cleared(&agent).await;
    agent.shutdown().await;
}

/// As on a kernel older than every optional helper (Linux 5.10): the recv tracepoints walk
/// the file table with helper reads, find the same hang, and the metrics say what is degraded.
#[tokio::test(flavor = "multi_thread")]
async fn without_optional_helpers_hangs_are_found_and_the_degradation_is_reported() {
    use lastgasp::agent::loader::{NetlinkProbeMode, OptionalHelper};

    let agent = Agent::start(AgentConfig {
        netlink_hang_threshold: HANG_THRESHOLD,
        netlink_probe: NetlinkProbeMode::Tracepoint,
        ignore_helpers: OptionalHelper::ALL.to_vec(),
        ..agent_config("old-kernel-node")
    })
    .await
    .expect("agent starts (the tests must run as root)");
    netlink_hang_is_reported_and_cleared(&agent).await;
    let body = scrape(agent.metrics_addr()).await;
    let info = |probe: &str| {
        body.lines()
            .find(|line| line.starts_with(&format!("lastgasp_probe_info{{probe=\"{probe}\"")))
            .unwrap_or_else(|| panic!("no probe_info for {probe} in:\n{body}"))
            .to_owned()
    };
    assert_eq!(
        info("netlink_recv"),
        "lastgasp_probe_info{probe=\"netlink_recv\",mode=\"tracepoint\",attached=\"true\",\
         degraded=\"fd_lookup:bpf_get_current_task_btf\"} 1"
    );
    for probe in ["cni_exec", "process_exit", "console"] {
        assert!(
            info(probe).ends_with(",attached=\"true\",degraded=\"\"} 1"),
            "{}",
            info(probe)
        );
    }
    agent.shutdown().await;
}

/// The panic program without `bpf_loop`, whose hold is a loop the verifier unrolls, passes
/// this kernel's verifier (and attaches, where this kernel lets `panic()` be probed).
#[test]
fn the_bounded_panic_hold_passes_the_verifier() {
    use aya::programs::KProbe;
    use lastgasp::agent::loader::{self, NetlinkProbeMode, OptionalHelper, ProbeSettings};

    let mut loaded = loader::load(&ProbeSettings {
        slow_recv: HANG_THRESHOLD,
        cni_bin_dirs: &[],
        panic_hold: Duration::from_millis(200),
        netlink_probe: NetlinkProbeMode::Tracepoint,
        ignore_helpers: &OptionalHelper::ALL,
        pod_cgroup_roots: &[],
    })
    .expect("the probes load (the tests must run as root)");
    let panic = loaded.status.iter().find(|status| status.probe == "panic");
    if let Some(mode) = panic.and_then(|status| status.mode) {
        assert_eq!(
            panic.unwrap().degraded_label(),
            "panic_hold:bpf_loop",
            "{mode:?}"
        );
        return;
    }
    // The loader loaded it before this kernel refused the attach; else load it here.
    let program: &mut KProbe = loaded
        .ebpf
        .program_mut("panic_kprobe_bounded")
        .unwrap()
        .try_into()
        .unwrap();
    if program.fd().is_err() {
        program
            .load()
            .expect("the verifier accepts the bounded hold");
    }
    assert!(program.fd().is_ok());
}

async fn netlink_hang_is_reported_and_cleared(agent: &Agent) {
    let mut events = agent.subscribe();
    let blocked_for = Duration::from_millis(2500);
    let (netlink_tid, netlink) = block_in_recvfrom("lg-nl-hang", netlink_route_socket, blocked_for);
    let (udp_tid, udp) = block_in_recvfrom("lg-udp-block", udp_socket, blocked_for);

    let seen = collect_until(&mut events, Duration::from_secs(10), |seen| {
        seen.iter().any(|event| {
            matches!(event, AgentEvent::NetlinkHangCleared(cleared) if cleared.tid == netlink_tid)
        })
    })
    .await;
    netlink.join().unwrap();
    udp.join().unwrap();

    let hang = seen
        .iter()
        .find_map(|event| match event {
            AgentEvent::NetlinkHang(hang) if hang.tid == netlink_tid => Some(hang),
            _ => None,
        })
        .expect("the netlink recvfrom is reported as a hang");
    assert_eq!(hang.pid, std::process::id());
    assert_eq!(hang.comm, "lg-nl-hang");
    assert_eq!(hang.protocol, "route");
    assert_eq!(hang.protocol_number, 0);
    assert_eq!(hang.syscall, "recvfrom");
    assert!(hang.duration_seconds >= HANG_THRESHOLD.as_secs_f64());
    assert!(hang.duration_seconds < blocked_for.as_secs_f64());
    assert!(hang.cmdline.contains("agent_probes"), "{}", hang.cmdline);
    assert!(
        hang.kernel_stack
            .iter()
            .any(|frame| frame.contains("netlink_recvmsg")
                || frame.contains("skb_recv")
                || frame.contains("recvfrom")),
        "kernel stack names the recv path: {:?}",
        hang.kernel_stack
    );

    let cleared = seen
        .iter()
        .find_map(|event| match event {
            AgentEvent::NetlinkHangCleared(cleared) if cleared.tid == netlink_tid => Some(cleared),
            _ => None,
        })
        .expect("the hang clears when the call returns");
    assert!(cleared.exact);
    assert_eq!(cleared.protocol, "route");
    assert_eq!(cleared.ret, Some(-(libc::EAGAIN as i64)));
    assert!(cleared.duration_seconds >= blocked_for.as_secs_f64() - 0.05);

    assert!(
        !seen.iter().any(|event| matches!(
            event,
            AgentEvent::NetlinkHang(h) if h.tid == udp_tid
        ) || matches!(
            event,
            AgentEvent::NetlinkHangCleared(c) if c.tid == udp_tid
        )),
        "a thread blocked on UDP is not a netlink hang"
    );
}

struct CniBin {
    root: PathBuf,
}

impl CniBin {
    fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("lastgasp-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("cni/bin")).unwrap();
        fs::create_dir_all(root.join("elsewhere")).unwrap();
        Self { root }
    }

    fn dir(&self) -> PathBuf {
        self.root.join("cni/bin")
    }

    fn script(&self, relative: &str, body: &str) -> PathBuf {
        let path = self.root.join(relative);
        let mut file = fs::File::create(&path).unwrap();
        writeln!(file, "#!/bin/sh\n{body}").unwrap();
        drop(file);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for CniBin {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn invoke_plugin(path: &Path, command: &str, pod: &str) -> std::process::Child {
    Command::new(path)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("ctr-{pod}"))
        .env("CNI_NETNS", "/var/run/netns/test")
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME={pod};K8S_POD_UID=1"),
        )
        .spawn()
        .unwrap()
}

fn cni_call<'a>(seen: &'a [AgentEvent], plugin: &str) -> Option<&'a CniCall> {
    seen.iter().find_map(|event| match event {
        AgentEvent::CniCall(call) if call.plugin == plugin => Some(call),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn cni_plugin_calls_are_timed_with_command_and_pod() {
    let bin = CniBin::new("cni");
    let slow = bin.script("cni/bin/slow-plugin", "sleep 0.3");
    let fast = bin.script("cni/bin/fast-plugin", "exit 0");
    let failing = bin.script("cni/bin/failing-plugin", "exit 3");
    let stuck = bin.script("cni/bin/stuck-plugin", "sleep 2");
    let outside = bin.script("elsewhere/outside-plugin", "exit 0");
    let agent = start_agent(Some(&bin.dir()), None).await;
    let mut events = agent.subscribe();

    let children: Vec<_> = [
        invoke_plugin(&slow, "ADD", "web-0"),
        invoke_plugin(&fast, "DEL", "web-1"),
        invoke_plugin(&failing, "CHECK", "web-2"),
        invoke_plugin(&stuck, "ADD", "web-3"),
        invoke_plugin(&outside, "ADD", "web-4"),
    ]
    .into_iter()
    .collect();
    let mut seen = collect_until(&mut events, Duration::from_secs(10), |seen| {
        seen.iter().any(
            |event| matches!(event, AgentEvent::CniCallStuck(stuck) if stuck.plugin == "stuck-plugin"),
        )
    })
    .await;
    // While stuck, the call's series carry its pod; once it exits they are gone, not 0.
    let stuck_metrics = scrape(agent.metrics_addr()).await;
    seen.extend(
        collect_until(&mut events, Duration::from_secs(10), |seen| {
            cni_call(seen, "stuck-plugin").is_some()
        })
        .await,
    );
    for mut child in children {
        child.wait().unwrap();
    }

    let call = cni_call(&seen, "slow-plugin").expect("the slow plugin's call");
    assert_eq!(call.command, "ADD");
    assert_eq!(call.container_id, "ctr-web-0");
    assert_eq!(call.pod_namespace.as_deref(), Some("team-a"));
    assert_eq!(call.pod_name.as_deref(), Some("web-0"));
    assert_eq!(call.ifname.as_deref(), Some("eth0"));
    assert_eq!(call.path, slow.to_string_lossy());
    assert!(call.duration_seconds >= 0.3, "{}", call.duration_seconds);
    assert_eq!(call.result, "success");

    let call = cni_call(&seen, "fast-plugin").expect("the fast plugin's call");
    assert_eq!(call.command, "DEL");
    assert_eq!(call.pod_name.as_deref(), Some("web-1"));
    assert!(call.duration_seconds < 0.3, "{}", call.duration_seconds);

    let call = cni_call(&seen, "failing-plugin").expect("the failing plugin's call");
    assert_eq!((call.result, call.exit_status), ("error", Some(3)));

    let stuck_report = seen
        .iter()
        .find_map(|event| match event {
            AgentEvent::CniCallStuck(stuck) if stuck.plugin == "stuck-plugin" => Some(stuck),
            _ => None,
        })
        .expect("the plugin running past the stuck threshold is reported");
    assert_eq!(stuck_report.pod_name.as_deref(), Some("web-3"));
    assert!(stuck_report.running_seconds >= 1.0);

    assert!(
        cni_call(&seen, "outside-plugin").is_none(),
        "a binary outside the CNI directories is ignored"
    );

    for series in [
        r#"lastgasp_cni_calls_stuck{plugin="stuck-plugin",command="ADD",namespace="team-a",pod="web-3"} 1"#,
        r#"lastgasp_cni_calls_in_flight{plugin="stuck-plugin",command="ADD",namespace="team-a",pod="web-3"} 1"#,
    ] {
        assert!(
            stuck_metrics.contains(series),
            "{series} missing from:\n{stuck_metrics}"
        );
    }
    let metrics = scrape(agent.metrics_addr()).await;
    assert!(metrics.contains(
        r#"lastgasp_cni_call_duration_seconds_count{plugin="slow-plugin",command="ADD",result="success"} 1"#
    ));
    assert!(
        !metrics.contains(r#"pod="web-3""#),
        "the finished call's series remain:\n{metrics}"
    );
    agent.shutdown().await;
}

fn write_kmsg(line: &str) {
    fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut kmsg| kmsg.write_all(line.as_bytes()))
        .expect("write /dev/kmsg");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_line_sends_a_last_gasp_datagram() {
    let controller = UdpSocket::bind("127.0.0.1:0").unwrap();
    controller
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let agent = start_agent(None, Some(controller.local_addr().unwrap())).await;
    let mut events = agent.subscribe();
    let nonce = format!("lastgasp test {}", std::process::id());
    let panic_message = format!("Kernel panic - not syncing: {nonce}");
    write_kmsg(&format!("<0>{panic_message}\n"));
    write_kmsg("<0>lastgasp test context line\n");

    let mut datagram = [0u8; 2048];
    let len = controller
        .recv(&mut datagram)
        .expect("a last-gasp datagram");
    let key = AuthKey::HmacSha256(b"test-key".to_vec());
    let first = wire::decode(&datagram[..len], &key).expect("a valid, authenticated report");
    assert_eq!(first.kind, ReportKind::KernelPanic);
    assert_eq!(first.message, panic_message);
    assert_eq!(first.node, "test-node");
    assert_eq!(first.boot_id, procfs::boot_id().unwrap());
    assert_eq!(first.source, ReportSource::Console);

    let len = controller.recv(&mut datagram).expect("a context update");
    let second = wire::decode(&datagram[..len], &key).unwrap();
    assert_eq!(second.seq, first.seq + 1);
    assert_eq!(second.message, panic_message);
    assert!(
        second
            .context
            .iter()
            .any(|line| line.contains("lastgasp test context line")),
        "{:?}",
        second.context
    );
    assert!(wire::decode(&datagram[..len], &AuthKey::HmacSha256(b"wrong".to_vec())).is_err());

    let seen = collect_until(&mut events, Duration::from_secs(5), |seen| {
        seen.iter()
            .any(|event| matches!(event, AgentEvent::Kernel(k) if k.message == panic_message))
    })
    .await;
    let panic = seen
        .iter()
        .find_map(|event| match event {
            AgentEvent::Kernel(kernel) if kernel.message == panic_message => Some(kernel),
            _ => None,
        })
        .expect("a kernel_panic event");
    assert_eq!(panic.kind, KernelEventKind::Panic);
    assert_eq!(
        AgentEvent::Kernel(panic.clone()).to_json()["kind"],
        "kernel_panic"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_pass_promtool_check() {
    let bin = CniBin::new("metrics");
    let plugin = bin.script("cni/bin/bridge", "exit 0");
    let agent = start_agent(Some(&bin.dir()), None).await;
    let mut events = agent.subscribe();
    let running = bin.script("cni/bin/portmap", "sleep 3");
    // Some traffic first, so the histograms and labelled families have samples; a call still
    // running has the in-flight gauge's series.
    invoke_plugin(&plugin, "ADD", "metrics-0").wait().unwrap();
    let mut running = invoke_plugin(&running, "ADD", "metrics-1");
    let (_, netlink) = block_in_recvfrom(
        "lg-nl-metrics",
        netlink_route_socket,
        Duration::from_millis(20),
    );
    netlink.join().unwrap();
    collect_until(&mut events, Duration::from_secs(5), |seen| {
        cni_call(seen, "bridge").is_some()
    })
    .await;

    let mut body = scrape(agent.metrics_addr()).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while !body.contains("lastgasp_cni_calls_in_flight{") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        body = scrape(agent.metrics_addr()).await;
    }
    running.kill().unwrap();
    running.wait().unwrap();
    for family in [
        "lastgasp_netlink_recv_duration_seconds_bucket{",
        "lastgasp_cni_call_duration_seconds_bucket{",
        "lastgasp_cni_calls_in_flight{",
        "lastgasp_probe_info{",
        "lastgasp_ebpf_dropped_events_total{",
    ] {
        assert!(body.contains(family), "{family} missing from:\n{body}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n{body}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    agent.shutdown().await;
}

/// `GET /healthz`: status code and body.
async fn healthz(addr: SocketAddr) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_owned())
}

/// The probe check on this kernel: the programs the loader attached are recorded with their
/// links and all found again. A link detached and a program unloaded (by the test, through
/// aya, in this process: another process cannot detach them) are reported lost, and `/healthz`
/// answers 503 naming them.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_probe_makes_healthz_unhealthy() {
    use aya::programs::TracePoint;
    use lastgasp::{
        agent::{
            attached::{self, Attached, KernelView},
            loader::{self, NetlinkProbeMode, ProbeSettings},
        },
        health::Health,
        metrics,
    };

    // Without the recv syscall tracepoints, which the test attaches itself: one link to detach.
    let mut loaded = loader::load(&ProbeSettings {
        slow_recv: HANG_THRESHOLD,
        cni_bin_dirs: &[],
        panic_hold: Duration::ZERO,
        netlink_probe: NetlinkProbeMode::Fentry,
        ignore_helpers: &[],
        pod_cgroup_roots: &[],
    })
    .expect("the probes load (the tests must run as root)");
    let recv: &mut TracePoint = loaded
        .ebpf
        .program_mut("recvfrom_enter")
        .unwrap()
        .try_into()
        .unwrap();
    recv.load().unwrap();
    let link = recv.attach("syscalls", "sys_enter_recvfrom").unwrap();
    let kernel = KernelView::read().unwrap();
    let attached = Attached::record(&loaded.ebpf, &kernel);
    assert_eq!(attached.lost(&kernel), Vec::<String>::new());

    let health = Health::default();
    let listener = metrics::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(metrics::serve(listener, Default::default(), health.clone()));
    let check = tokio::spawn(attached::check(attached.clone(), health.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(healthz(addr).await, (200, "ok\n".into()));

    let recv: &mut TracePoint = loaded
        .ebpf
        .program_mut("recvfrom_enter")
        .unwrap()
        .try_into()
        .unwrap();
    recv.detach(link).unwrap();
    let exec: &mut TracePoint = loaded
        .ebpf
        .program_mut("sched_process_exec")
        .unwrap()
        .try_into()
        .unwrap();
    exec.unload().unwrap();
    let lost = attached.lost(&KernelView::read().unwrap());
    assert_eq!(lost.len(), 2, "{lost:?}");
    assert!(
        lost[0].starts_with("probe program `recvfrom_enter` (id ")
            && lost[0].contains(") lost its link "),
        "{lost:?}"
    );
    assert!(
        lost[1].starts_with("probe program `sched_process_exec` (id ")
            && lost[1].ends_with(") is no longer loaded"),
        "{lost:?}"
    );

    let deadline = Instant::now() + attached::CHECK_INTERVAL + Duration::from_secs(5);
    let unhealthy = loop {
        let answer = healthz(addr).await;
        if answer.0 != 200 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(unhealthy, (503, format!("{}\n", lost.join("\n"))));
    check.abort();
    server.abort();
}
