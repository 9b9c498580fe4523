//! End to end in a VM: a Debian cloud kernel under QEMU (TCG) runs the agent, which
//! configures the kernel's netconsole itself; the kernel crashes with sysrq, and the
//! controller, in this process against the real kube-apiserver as its ServiceAccount, marks
//! the node's pods. The in-cluster agent reaches the same server through the test's fault
//! proxy (plain HTTP on the host's loopback, which qemu's network maps into the guest).
//!
//! The guest reaches the host's loopback through qemu's user-mode network, so its datagrams
//! arrive from 127.0.0.1: the guest's Node lists 127.0.0.1 as its InternalIP.
//! Needs qemu-system-x86, busybox-static and apt access to Debian's kernels
//! (`cargo xtask vm fetch` installs and downloads all of it), and builds the static agent (a
//! release build, minutes when not up to date); without them the tests fail.

use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use lastgasp::{
    controller::{Controller, policy::Policy},
    wire::{self, AuthKey, ReportKind},
};
use lastgasp_tests::{
    fixtures::{annotation, controller_config},
    kube::{User, cluster::Cluster},
    scrape,
    vm::{ConsoleLine, Initramfs, Kernel, KernelVersion, Vm, VmOptions, guest, static_agent},
    vm_diagnose::{self, KallsymsReceiver, Symbols, TcpSink},
};
use serde_json::{Value, json};

const NODE: &str = "vm-node";
const PANIC: &str = "Kernel panic - not syncing: sysrq triggered crash";
/// The crash title (from netconsole's call trace, the agent's stack at `panic()` or the pstore
/// record's lines) and where it happened.
const REASON: &str = "kernel panic: sysrq triggered crash in sysrq_handle_crash on node vm-node";
const CRASH_MARKER: &str = "lastgasp-vm: crashing now";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const PODS: [&str; 3] = ["vm-0", "vm-1", "vm-2"];
/// Debian's CA bundle (package ca-certificates), copied into the guest at the same path.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

async fn seed(cluster: &Cluster) {
    cluster.namespace("team").await;
    cluster.node(NODE, "127.0.0.1", None).await;
    cluster.node("other", "127.0.0.9", None).await;
    for (pod, node) in [
        ("vm-0", NODE),
        ("vm-1", NODE),
        ("vm-2", NODE),
        ("other-0", "other"),
        ("other-1", "other"),
    ] {
        cluster.pod("team", pod, node).await;
    }
}

/// The controller with the Annotate policy, so marked pods stay readable.
async fn start_controller(cluster: &Cluster) -> Controller {
    let config = controller_config(Policy::Annotate, AuthKey::None);
    Controller::start(cluster.client_as("lastgasp-controller").await, config)
        .await
        .unwrap()
}

fn fetch(version: KernelVersion) -> Kernel {
    let kernel = Kernel::fetch(version).unwrap();
    println!("kernel {}", kernel.fetched());
    kernel
}

/// Boots `kernel` with the static agent at /bin/lastgasp and `script` after the network, the
/// agent's shell functions ([`guest::AGENT`]) and a shell variable `t` naming the agent's
/// netconsole target directory for `netconsole_port`.
fn boot(kernel: &Kernel, name: &str, netconsole_port: u16, script: &str) -> Vm {
    // Another build of the agent, to compare two (`LASTGASP_VM_AGENT=<static binary>`).
    let agent = std::env::var_os("LASTGASP_VM_AGENT").map_or_else(
        || tokio::task::block_in_place(static_agent).unwrap(),
        PathBuf::from,
    );
    let script = format!(
        "{}{}t=/sys/kernel/config/netconsole/lastgasp-{}-{netconsole_port}\n{script}",
        guest::NETWORK_UP,
        guest::AGENT,
        guest::HOST,
    );
    // As in the agent's image: kube's TLS client refuses to start without system CA roots.
    let initramfs = Initramfs::build(
        kernel,
        &script,
        &[
            ("/bin/lastgasp", agent.as_path()),
            (CA_BUNDLE, Path::new(CA_BUNDLE)),
        ],
    )
    .unwrap();
    let options = VmOptions {
        name: format!("{name}-{}", kernel.version),
        // The agent needs a CPU while the panicking one prints its last words.
        cpus: 2,
        memory_mib: 1024,
        ..VmOptions::default()
    };
    let (vm, ready) = tokio::task::block_in_place(|| {
        Vm::boot_to_init(kernel, &initramfs, "", &options, BOOT_TIMEOUT)
    })
    .unwrap();
    println!(
        "{}: boot to shell {:?}",
        kernel.version,
        ready.at - vm.started
    );
    vm
}

/// Where each vCPU of a guest that stopped making progress is, one line each, named from the
/// symbols the guest sent.
fn where_cpus_are(vm: &Vm, symbols: &Symbols) -> anyhow::Result<Vec<String>> {
    Ok(vm_diagnose::cpu_states(&vm.qmp_path, symbols)?
        .into_iter()
        .map(|cpu| {
            format!(
                "CPU {}{}: at {}; stack words: {}",
                cpu.cpu,
                if cpu.halted { " (halted)" } else { "" },
                cpu.rip,
                cpu.stack.join(" ")
            )
        })
        .collect())
}

/// The harness's view of a guest that no longer makes progress: a kernel that panicked with
/// `panic=0` spins in `panic()` on one CPU for ever, and has stopped the other.
#[test]
fn a_stopped_guest_shows_where_each_cpu_is() {
    let kernel = fetch(KernelVersion::Debian612);
    let kallsyms = KallsymsReceiver::start();
    let script = format!(
        "{}{}echo \"{CRASH_MARKER}\"\ntaskset 2 sh -c 'sleep 1; echo c > /proc/sysrq-trigger'\n",
        guest::NETWORK_UP,
        vm_diagnose::send_kallsyms(guest::HOST, kallsyms.port)
    );
    let initramfs = Initramfs::build(&kernel, &script, &[]).unwrap();
    let options = VmOptions {
        name: format!("stopped-{}", kernel.version),
        cpus: 2,
        ..VmOptions::default()
    };
    // The last `panic=` wins: the kernel loops in panic() instead of rebooting.
    let (vm, _) = Vm::boot_to_init(&kernel, &initramfs, "panic=0", &options, BOOT_TIMEOUT).unwrap();
    vm.wait_for_console("end Kernel panic", BOOT_TIMEOUT)
        .unwrap();
    let symbols = kallsyms.take().expect("the guest's kallsyms");
    println!("{} text symbols from the guest", symbols.len());
    let cpus = where_cpus_are(&vm, &symbols).unwrap();
    for cpu in &cpus {
        println!("{cpu}");
    }
    assert_eq!(cpus.len(), 2);
    assert!(
        cpus.iter().any(|cpu| cpu.contains(" panic+")),
        "one CPU spins in panic(): {cpus:#?}"
    );
    // CPU 1 panics (`taskset 2`), a second after the shell that started it went to sleep;
    // CPU 0, stopped by its IPI while idle: the IPI's frames on the IRQ stack, then those of
    // CPU 0's idle task, whose stack is in the kernel image. (An interrupt taken in user mode
    // stays on the task's stack: had the shell still been running, no `|`.)
    assert!(
        cpus.iter().any(|cpu| cpu.contains("(halted)")
            && cpu.contains("stop_this_cpu")
            && cpu.contains(" | ")
            && cpu.contains("do_idle")),
        "the other was stopped: {cpus:#?}"
    );
}

/// Blocks this worker thread (the controller runs on the others) until the console shows `pattern`.
fn console(vm: &Vm, pattern: &str) -> ConsoleLine {
    tokio::task::block_in_place(|| vm.wait_for_console(pattern, BOOT_TIMEOUT)).unwrap()
}

/// Prints, for the guest shell, every attribute of the agent's target `$t`, each as
/// `lastgasp-vm: <attribute>=<value>`.
const SHOW_TARGET: &str =
    "for a in dev_name local_ip remote_ip remote_port remote_mac extended enabled; do
    echo \"lastgasp-vm: $a=$(cat $t/$a)\"
done
";

/// Waits for the console lines [`SHOW_TARGET`] prints and checks them: the agent's target
/// sends extended records from eth0 and the guest's address to the host's `port`, through
/// slirp's gateway MAC (the host is on-link), and is enabled.
fn assert_target_shown(vm: &Vm, port: u16) {
    for expected in [
        "dev_name=eth0".to_owned(),
        format!("local_ip={}", guest::ADDRESS),
        format!("remote_ip={}", guest::HOST),
        format!("remote_port={port}"),
        format!("remote_mac={}", guest::GATEWAY_MAC),
        "extended=1".to_owned(),
        "enabled=1".to_owned(),
    ] {
        console(vm, &format!("lastgasp-vm: {expected}"));
    }
}

async fn pod(cluster: &Cluster, name: &str) -> Value {
    cluster
        .get("pods", Some("team"), name)
        .await
        .unwrap_or_else(|| panic!("pod {name} is gone"))
}

async fn fully_marked(cluster: &Cluster, name: &str) -> bool {
    let pod = pod(cluster, name).await;
    annotation(&pod, "lastgasp.io/termination-reason") == Some(REASON)
        && annotation(&pod, "lastgasp.io/termination-source")
            .is_some_and(|source| source.contains("netconsole"))
        && pod["status"]["conditions"]
            .as_array()
            .is_some_and(|conditions| conditions.iter().any(|c| c["type"] == "DisruptionTarget"))
        && cluster.events_about("Pod", name).await.len() == 1
}

/// Waits until the node and its pods carry everything the controller writes, with netconsole
/// among the sources; the failure message carries the guest's console.
async fn wait_for_marks(cluster: &Cluster, vm: &Vm, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let node = cluster.get("nodes", None, NODE).await.unwrap();
        let mut done = annotation(&node, "lastgasp.io/termination-reason") == Some(REASON)
            && cluster.events_about("Node", NODE).await.len() == 1;
        for pod in PODS {
            done &= fully_marked(cluster, pod).await;
        }
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the controller did not mark {NODE} and its pods from netconsole within {within:?}; \
             node: {node}\nguest console:\n{}",
            vm.console_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// When the controller (or the in-cluster agent) last wrote to the API server.
fn last_write(cluster: &Cluster) -> Instant {
    cluster
        .proxy()
        .requests()
        .into_iter()
        .filter(|request| request.method != "GET")
        .map(|request| request.at)
        .max()
        .expect("the controller wrote")
}

/// From one console line to another in milliseconds, by the kernel's timestamps on them.
fn kernel_millis_between(from: &ConsoleLine, to: &ConsoleLine) -> f64 {
    let stamp = |line: &ConsoleLine| -> f64 {
        let text = line.text.trim_start();
        let inner = &text[text.find('[').unwrap() + 1..text.find(']').unwrap()];
        inner.trim().parse().unwrap()
    };
    (stamp(to) - stamp(from)) * 1000.0
}

/// `to - from` in milliseconds, negative when `to` came first.
fn millis_between(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(after) => after.as_secs_f64() * 1e3,
        None => -(from - to).as_secs_f64() * 1e3,
    }
}

/// Checks what the controller wrote on the pods and returns their termination source
/// (`netconsole`, or `agent,netconsole` when the agent's report made it too).
async fn assert_pods_marked(cluster: &Cluster) -> String {
    let mut sources = Vec::new();
    for name in PODS {
        let pod = pod(cluster, name).await;
        assert_eq!(
            annotation(&pod, "lastgasp.io/termination-reason"),
            Some(REASON)
        );
        assert_eq!(
            annotation(&pod, "lastgasp.io/termination-reason-code"),
            Some("KernelPanic")
        );
        sources.push(
            annotation(&pod, "lastgasp.io/termination-source")
                .unwrap()
                .to_owned(),
        );
        let conditions = pod["status"]["conditions"].as_array().unwrap();
        let disruption = conditions
            .iter()
            .find(|c| c["type"] == "DisruptionTarget")
            .expect("DisruptionTarget condition");
        assert_eq!(disruption["status"], "True");
        assert_eq!(disruption["reason"], "NodeKernelPanic");
        assert!(conditions.iter().any(|c| c["type"] == "Ready"));
        assert_eq!(
            cluster.events_about("Pod", name).await.len(),
            1,
            "one Event on {name}"
        );
    }
    let node = cluster.get("nodes", None, NODE).await.unwrap();
    let node_source = annotation(&node, "lastgasp.io/termination-source")
        .unwrap()
        .to_owned();
    assert!(
        sources.iter().all(|source| *source == node_source),
        "node {node_source}, pods {sources:?}"
    );
    node_source
}

async fn assert_other_untouched(cluster: &Cluster) {
    for name in ["other-0", "other-1"] {
        let pod = pod(cluster, name).await;
        assert!(pod["metadata"]["annotations"].is_null(), "{pod}");
        assert_eq!(cluster.events_about("Pod", name).await.len(), 0);
    }
    let other = cluster.get("nodes", None, "other").await.unwrap();
    assert!(other["metadata"]["annotations"].is_null(), "{other}");
}

/// The channels the controller opened or confirmed the incident through, from its metrics.
async fn channels(controller: &Controller) -> Vec<String> {
    let metrics = scrape(controller.metrics_addr()).await;
    // The agent's empty priming datagram came from the node's address: not a parse error.
    // (Other drops are not asserted: other tests on this host may send to a reused port.)
    assert!(
        !metrics.contains(
            r#"lastgasp_controller_datagrams_dropped_total{channel="netconsole",reason="unparsable"}"#
        ),
        "{metrics}"
    );
    metrics
        .lines()
        .filter(|line| line.starts_with("lastgasp_controller_incidents_total{"))
        .map(str::to_owned)
        .collect()
}

/// The agent runs in the guest in node mode, with the controller's report and netconsole
/// addresses; it mounts configfs (unmounted first), configures its netconsole target, and the
/// kernel crashes with sysrq while it runs. Both channels report it: the kernel's netconsole
/// stream, and the agent's last gasp, which leaves before the panicking CPU stops the others
/// because the agent's `panic()` kprobe holds that CPU until the report is sent.
async fn agent_sysrq_crash(version: KernelVersion) {
    let started = Instant::now();
    let kernel = fetch(version);
    let cluster = Cluster::start().await;
    seed(&cluster).await;
    let controller = start_controller(&cluster).await;
    let report_port = controller.report_addr().port();
    let netconsole_port = controller.netconsole_addr().port();

    let script = format!(
        "umount /sys/kernel/config
run_agent agent --node-name {NODE} --controller {host}:{report_port} \
    --netconsole-target {host}:{netconsole_port}
await_log 'netconsole target lastgasp-.* (created|not configured)|netconsole is unavailable'
await_log 'panic: (attached|unavailable)'
{SHOW_TARGET}show_metric lastgasp_netconsole_targets
echo 'lastgasp-vm: agent ready'
sleep 1
echo \"{CRASH_MARKER}\"
echo c > /proc/sysrq-trigger
",
        host = guest::HOST,
    );
    let vm = boot(&kernel, "agent-crash", netconsole_port, &script);
    let agent_ready = console(&vm, "lastgasp-vm: agent ready");
    println!(
        "{version}: agent and its netconsole target up {:?} after boot",
        agent_ready.at - vm.started
    );
    let log = vm.console_log();
    let configured = log
        .lines()
        .find(|line| line.contains("netconsole target lastgasp-"))
        .unwrap();
    println!("{version}: {configured}");
    assert!(
        configured.contains(&format!(
            "netconsole target lastgasp-10.0.2.2-{netconsole_port} created: 10.0.2.15 -> \
             10.0.2.2:{netconsole_port} via eth0 (on-link), extended, enabled"
        )),
        "{log}"
    );
    // Nothing in the guest had talked to the host: the agent made the kernel resolve its MAC.
    assert!(configured.contains("primed=true"), "{configured}");
    assert!(
        log.contains("mounted configfs at /sys/kernel/config"),
        "{log}"
    );
    assert_target_shown(&vm, netconsole_port);
    console(
        &vm,
        r#"lastgasp-vm: metric lastgasp_netconsole_targets{state="enabled"} 1"#,
    );
    let panic_probe = console(&vm, "panic: attached (");
    println!("{version}: {}", panic_probe.text);
    if version == KernelVersion::Debian510 {
        // No bpf_loop: the hold is the bounded loop, and the status says so.
        assert!(
            panic_probe.text.contains("degraded: panic_hold"),
            "{}",
            panic_probe.text
        );
    } else {
        assert!(
            panic_probe.text.contains("(kprobe)"),
            "{}",
            panic_probe.text
        );
    }

    let crash = console(&vm, CRASH_MARKER);
    let panic = console(&vm, PANIC);
    wait_for_marks(&cluster, &vm, Duration::from_secs(60)).await;
    // Both channels' datagrams are in before the marks are complete; give the second one's
    // merge a moment to be counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = last_write(&cluster);
    println!(
        "{version}: panic line on the console to the controller's last write: {:.1} ms \
         (crash marker to last write: {:.1} ms)",
        millis_between(panic.at, written),
        millis_between(crash.at, written)
    );
    let source = assert_pods_marked(&cluster).await;
    let channels = channels(&controller).await;
    println!("{version}: termination source {source:?}; incidents by channel: {channels:?}");
    for channel in ["netconsole", "agent"] {
        let line =
            format!(r#"lastgasp_controller_incidents_total{{kind="panic",source="{channel}"}} 1"#);
        assert!(
            channels.contains(&line),
            "{channel} did not report the panic: {channels:?}\nguest console:\n{}",
            vm.console_log()
        );
    }
    // With netconsole registered, the last gasp is the agent's only datagram: the lines after
    // the panic are netconsole's to send (see agent/src/agent/last_gasp.rs).
    let reports = r#"lastgasp_controller_datagrams_received_total{channel="report"}"#;
    let metrics = scrape(controller.metrics_addr()).await;
    let received: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with(reports))
        .collect();
    assert_eq!(received, [format!("{reports} 1")], "{metrics}");
    assert_other_untouched(&cluster).await;
    println!("{version}: scenario took {:?}", started.elapsed());
    controller.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_configured_netconsole_reports_a_sysrq_crash() {
    agent_sysrq_crash(KernelVersion::Debian61).await;
}

/// Not a test but a count: `LASTGASP_SYSRQ_BOOTS` (20) boots of `LASTGASP_SYSRQ_KERNEL` (5.10),
/// each crashed with sysrq while the agent runs with a controller address, counting the boots
/// whose last-gasp datagram reached the host before the guest died; each boot's line gives the
/// time from the sysrq line to the panic line by the kernel's clock (mostly the panic hold).
/// Nothing is asserted: the outcome is a race, and the numbers are what the README reports.
///
/// `cargo test -p lastgasp-tests --features vm,kube --test vm_scenarios -- --ignored
/// last_gasp_over_sysrq_boots --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement over many boots; run by hand"]
async fn last_gasp_over_sysrq_boots() {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let version: KernelVersion = env("LASTGASP_SYSRQ_KERNEL", "5.10").parse().unwrap();
    let boots: u32 = env("LASTGASP_SYSRQ_BOOTS", "20").parse().unwrap();
    let kernel = fetch(version);
    let mut arrived = 0;
    let mut not_rebooting = 0;
    for run in 1..=boots {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let port = socket.local_addr().unwrap().port();
        let script = format!(
            "run_agent agent --node-name {NODE} --controller {host}:{port}
await_log 'panic: (attached|unavailable)'
sleep 1
echo \"{CRASH_MARKER}\"
echo c > /proc/sysrq-trigger
",
            host = guest::HOST,
        );
        let vm = boot(&kernel, &format!("sysrq-count-{run}"), 0, &script);
        let probe = console(&vm, "panic: ");
        // The kernel's own lines, with their timestamps (the agent logs the panic line too).
        let sysrq = console(&vm, "] sysrq: Trigger a crash");
        let panic = console(&vm, &format!("] {PANIC}"));
        // The guest is dead or dying; give a datagram in flight through qemu a moment.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut source = None;
        let mut buf = [0u8; 65536];
        while let Ok(len) = socket.recv(&mut buf) {
            if let Ok(report) = wire::decode(&buf[..len], &AuthKey::None)
                && report.kind == ReportKind::KernelPanic
            {
                source.get_or_insert(report.source);
            }
        }
        // The panic's last line: a guest without it died (or stalled) while panicking.
        let rebooting = vm.console_log().contains("Rebooting in");
        drop(vm);
        arrived += u32::from(source.is_some());
        not_rebooting += u32::from(!rebooting);
        println!(
            "{version}: boot {run}/{boots}: last gasp {}{}; {:.1} ms from the sysrq line to the \
             panic line ({})",
            source.map_or("lost".to_owned(), |source| format!(
                "arrived via {source:?}"
            )),
            if rebooting { "" } else { "; no `Rebooting in`" },
            kernel_millis_between(&sysrq, &panic),
            probe.text.trim()
        );
    }
    println!(
        "{version}: the last gasp arrived in {arrived} of {boots} sysrq boots; \
         {not_rebooting} did not reach `Rebooting in`"
    );
}

/// Not a test but a measurement: how long the panic probe holds the dying CPU when nothing
/// acknowledges, on `LASTGASP_SYSRQ_KERNEL` (5.10, where the hold is the bounded loop). The
/// agent is stopped before the crash, with `--panic-hold 10s`, so the hold ends when its
/// checks run out; the kernel's own timestamps on `sysrq: Trigger a crash` and the panic line
/// bracket it.
///
/// `cargo test -p lastgasp-tests --features vm,kube --test vm_scenarios -- --ignored
/// unacknowledged_panic_hold --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn unacknowledged_panic_hold() {
    let version: KernelVersion = std::env::var("LASTGASP_SYSRQ_KERNEL")
        .unwrap_or_else(|_| "5.10".into())
        .parse()
        .unwrap();
    let kernel = fetch(version);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let script = format!(
        "run_agent agent --node-name {NODE} --controller {host}:{port} --panic-hold 10s
await_log 'panic: (attached|unavailable)'
kill -STOP $agent_pid
echo \"{CRASH_MARKER}\"
echo c > /proc/sysrq-trigger
",
        host = guest::HOST,
    );
    let vm = boot(&kernel, "panic-hold", 0, &script);
    println!("{version}: {}", console(&vm, "panic: ").text.trim());
    let sysrq = console(&vm, "sysrq: Trigger a crash");
    let panic = console(&vm, PANIC);
    println!(
        "{version}: unacknowledged hold: {:.1} ms from the sysrq line to the panic line \
         (kernel clock), {:.1} ms on the host's",
        kernel_millis_between(&sysrq, &panic),
        millis_between(sysrq.at, panic.at)
    );
}

/// The suffix of a configuration of [`reboots_after_sysrq_with_and_without_lastgasp`] whose
/// guest streams TCP from its other CPU while it crashes.
const UNDER_TRAFFIC: &str = " under traffic";

/// What one crashed boot of [`reboots_after_sysrq_with_and_without_lastgasp`] came to.
#[derive(Clone, Default)]
struct RebootCount {
    boots: u32,
    /// Killed 60 s after the crash without `Rebooting in` on the console.
    hung: u32,
    /// qemu exited (a reset) before `Rebooting in`.
    exited: u32,
    last_gasps: u32,
    /// Boots whose netconsole stream carried the panic line.
    netconsole_panics: u32,
    /// Boots whose netconsole stream went on to `Rebooting in`.
    netconsole_whole: u32,
    /// Netconsole datagrams from the sysrq line on, over all boots.
    netconsole_lines: usize,
}

/// Not a test but a count: does a panicking guest always reboot, with lastgasp and without?
/// `LASTGASP_SYSRQ_BOOTS` (30) boots of `LASTGASP_SYSRQ_KERNEL` (6.1) in each of three
/// configurations, in turn, each crashed with `echo c > /proc/sysrq-trigger` (`panic=1`, so a
/// kernel that finishes panicking prints `Rebooting in 1 seconds..` and qemu exits):
///
/// - with lastgasp: the agent runs with a controller address on the host, configures a
///   netconsole target to the host and holds the panicking CPU (`--panic-hold`, 200 ms);
/// - netconsole only: the agent configures the same target and exits (the target stays), so
///   the kernel's netconsole runs without the agent's last gasp and hold;
/// - without lastgasp: no agent, the netconsole module unloaded.
///
/// Each may run `under traffic`: the guest streams TCP to a sink on the host from its second
/// CPU (`yes | nc`) while the first one crashes, as a node with traffic would.
///
/// A boot whose console does not show `Rebooting in` within 60 s of the crash is killed and
/// counted, with its last console lines, whether it got as far as `Kernel Offset:` and where
/// each vCPU is (named from the `/proc/kallsyms` each guest sends first); the
/// agent's datagrams and the netconsole lines that reached the host are counted too, and a
/// netconsole stream that stops short of `Rebooting in` is shown with its last line. Nothing is asserted: the outcome is a race, and the numbers are what the README
/// reports.
///
/// `LASTGASP_SYSRQ_CONFIGURATIONS` picks some of them by name, comma-separated (e.g. `with
/// lastgasp`, for the hundreds of boots a rare hang needs); `LASTGASP_VM_AGENT` runs another
/// static build of the agent (an older commit's, to compare).
///
/// `LASTGASP_SYSRQ_KERNEL=6.12 cargo test -p lastgasp-tests --features vm,kube --test
/// vm_scenarios -- --ignored reboots_after_sysrq_with_and_without_lastgasp --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement over many boots; run by hand"]
async fn reboots_after_sysrq_with_and_without_lastgasp() {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let version: KernelVersion = env("LASTGASP_SYSRQ_KERNEL", "6.1").parse().unwrap();
    let boots: u32 = env("LASTGASP_SYSRQ_BOOTS", "30").parse().unwrap();
    let kernel = fetch(version);
    let reports = UdpSocket::bind("127.0.0.1:0").unwrap();
    reports
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let report_port = reports.local_addr().unwrap().port();
    let netconsole = Collector::start();
    let all = ["with lastgasp", "netconsole only", "without lastgasp"];
    let chosen = env("LASTGASP_SYSRQ_CONFIGURATIONS", &all.join(","));
    let configurations: Vec<&str> = chosen.split(',').map(str::trim).collect();
    assert!(
        configurations
            .iter()
            .all(|name| all.contains(&name.trim_end_matches(UNDER_TRAFFIC))),
        "LASTGASP_SYSRQ_CONFIGURATIONS: {chosen:?}; known: {all:?}, each also{UNDER_TRAFFIC}"
    );
    let kallsyms = KallsymsReceiver::start();
    let sink = TcpSink::start();
    let mut counts = vec![RebootCount::default(); configurations.len()];
    for run in 1..=boots {
        for (&name, count) in configurations.iter().zip(&mut counts) {
            let started = Instant::now();
            let base = name.trim_end_matches(UNDER_TRAFFIC);
            let agent = base == "with lastgasp";
            let with_netconsole = base != "without lastgasp";
            let host = guest::HOST;
            let target = format!(
                "--netconsole-target {host}:{}
await_log 'netconsole target lastgasp-.* (created|not configured)|netconsole is unavailable'
",
                netconsole.port
            );
            let setup = match base {
                "with lastgasp" => format!(
                    "run_agent agent --node-name {NODE} --controller {host}:{report_port} \
                     {target}await_log 'panic: (attached|unavailable)'
"
                ),
                "netconsole only" => format!(
                    "run_agent agent --node-name {NODE} {target}stop_agent TERM
"
                ),
                _ => "rmmod netconsole\n".to_owned(),
            };
            let traffic = if name == base {
                String::new()
            } else {
                format!(
                    "taskset 2 sh -c 'yes | nc {host} {}' &
sleep 1
echo \"lastgasp-vm: eth0 tx_bytes $(cat /sys/class/net/eth0/statistics/tx_bytes)\"
",
                    sink.port
                )
            };
            let script = format!(
                "{}{setup}{traffic}sleep 1
echo \"{CRASH_MARKER}\"
taskset 1 sh -c 'echo c > /proc/sysrq-trigger'
",
                vm_diagnose::send_kallsyms(host, kallsyms.port)
            );
            let vm = boot(
                &kernel,
                &format!("reboots-{}-{run}", name.replace(' ', "-")),
                netconsole.port,
                &script,
            );
            // The kernel's line: the shell's marker before it can be cut short by it.
            let crash = console(&vm, "] sysrq: Trigger a crash");
            if agent && run == 1 {
                let log = vm.console_log();
                for line in log.lines().filter(|line| {
                    line.contains("netconsole target lastgasp-") || line.contains("panic: ")
                }) {
                    println!("{version}: {}", line.trim());
                }
            }
            let rebooting = tokio::task::block_in_place(|| {
                vm.wait_for_console("Rebooting in", Duration::from_secs(60))
            });
            let outcome = match &rebooting {
                Ok(line) => format!(
                    "`Rebooting in` {:.2} s after the sysrq line",
                    millis_between(crash.at, line.at) / 1e3
                ),
                Err(_) => {
                    let log = vm.console_log();
                    let tail: Vec<&str> = log.lines().rev().take(3).collect();
                    if vm.exited() {
                        count.exited += 1;
                    } else {
                        count.hung += 1;
                        let cpus = kallsyms
                            .take()
                            .ok_or_else(|| anyhow::anyhow!("the guest sent no kallsyms"))
                            .and_then(|symbols| where_cpus_are(&vm, &symbols));
                        match cpus {
                            Ok(cpus) => {
                                for cpu in cpus {
                                    println!("{version} {name}: boot {run}: {cpu}");
                                }
                            }
                            Err(error) => println!("{version} {name}: boot {run}: {error:#}"),
                        }
                    }
                    format!(
                        "NO `Rebooting in` ({}; `Kernel Offset:` {}reached; last lines {tail:?}; \
                         console log {})",
                        if vm.exited() {
                            "qemu exited"
                        } else {
                            "killed after 60 s"
                        },
                        if log.contains("Kernel Offset:") {
                            ""
                        } else {
                            "not "
                        },
                        vm.log_path.display()
                    )
                }
            };
            // Datagrams in flight through qemu get a moment before the guest goes.
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(vm);
            count.boots += 1;
            let mut gasp = None;
            let mut buf = [0u8; 65536];
            while let Ok(len) = reports.recv(&mut buf) {
                if let Ok(report) = wire::decode(&buf[..len], &AuthKey::None)
                    && report.kind == ReportKind::KernelPanic
                {
                    gasp.get_or_insert(report.source);
                }
            }
            let received = netconsole.take();
            let lines = received
                .iter()
                .position(|datagram| datagram.contains("Trigger a crash"))
                .map_or(0, |first| received.len() - first);
            let panic_line = received.iter().any(|datagram| datagram.contains(PANIC));
            let whole = received
                .iter()
                .any(|datagram| datagram.contains("Rebooting in"));
            count.last_gasps += u32::from(gasp.is_some());
            let mut channels = if agent {
                let gasp = gasp.map_or("lost".to_owned(), |source| format!("via {source:?}"));
                format!("; last gasp {gasp}")
            } else {
                String::new()
            };
            if with_netconsole {
                count.netconsole_panics += u32::from(panic_line);
                count.netconsole_lines += lines;
                count.netconsole_whole += u32::from(whole);
                channels += &format!(
                    "; netconsole: {lines} lines from the sysrq line on, panic line {}, {}",
                    if panic_line { "in" } else { "missing" },
                    if whole {
                        "`Rebooting in` in".to_owned()
                    } else {
                        format!(
                            "no `Rebooting in`: the stream ended with {:?}",
                            received.last().map_or("", |last| last.trim())
                        )
                    }
                );
            }
            println!(
                "{version} {name}: boot {run}/{boots}: {outcome}{channels} ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    for (name, count) in configurations.into_iter().zip(&counts) {
        let channels = if name.trim_end_matches(UNDER_TRAFFIC) == "without lastgasp" {
            String::new()
        } else {
            format!(
                "; the last gasp arrived in {}, netconsole's panic line in {}, its \
                 `Rebooting in` in {} ({} netconsole lines from the sysrq line on)",
                count.last_gasps,
                count.netconsole_panics,
                count.netconsole_whole,
                count.netconsole_lines
            )
        };
        println!(
            "{version} {name}: {} sysrq boots, {} did not reach `Rebooting in` within \
             60 s ({} hung, {} qemu exited){channels}",
            count.boots,
            count.hung + count.exited,
            count.hung,
            count.exited
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_configured_netconsole_reports_a_sysrq_crash_5_10() {
    agent_sysrq_crash(KernelVersion::Debian510).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_configured_netconsole_reports_a_sysrq_crash_6_12() {
    agent_sysrq_crash(KernelVersion::Debian612).await;
}

/// Datagrams arriving on a host UDP socket, collected by a thread.
struct Collector {
    port: u16,
    received: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 65536];
            while let Ok(len) = socket.recv(&mut buffer) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buffer[..len]).into_owned());
            }
        });
        Self { port, received }
    }

    /// The datagrams received so far, leaving none.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }

    fn contains(&self, text: &str) -> bool {
        self.received
            .lock()
            .unwrap()
            .iter()
            .any(|datagram| datagram.contains(text))
    }
}

/// One guest, the agent started four times, then the kernel panics with no agent running:
///
/// 1. no netconsole module and configfs unmounted: the agent names what is missing, keeps
///    running, and its metric says `unavailable`;
/// 2. module back: the agent mounts configfs and creates a target at a wrong port (a host socket
///    that receives a /dev/kmsg marker through it); on SIGTERM it leaves the target enabled;
/// 3. a new agent pointed at the controller re-points: it creates the controller's target, then
///    removes the one at the wrong port; it is killed with SIGKILL;
/// 4. the target's MAC is made stale behind the agent's back; the next agent disables, fixes
///    and enables it again, and is killed with SIGKILL too.
///
/// Then `echo c > /proc/sysrq-trigger`: the netconsole target alone marks the node and pods.
async fn netconsole_outlives_the_agent(version: KernelVersion) {
    let started = Instant::now();
    let kernel = fetch(version);
    let cluster = Cluster::start().await;
    seed(&cluster).await;
    let controller = start_controller(&cluster).await;
    let port = controller.netconsole_addr().port();
    let wrong = Collector::start();
    let wrong_port = wrong.port;

    let script = format!(
        "umount /sys/kernel/config
rmmod netconsole
run_agent no-netconsole --node-name {NODE} --netconsole-target {host}:{wrong_port}
await_log 'netconsole is unavailable'
show_metric lastgasp_netconsole_targets
stop_agent TERM
insmod /lib/modules/*-netconsole.ko

run_agent wrong-port --node-name {NODE} --netconsole-target {host}:{wrong_port}
await_log 'netconsole target lastgasp-.* (created|not configured)'
echo 'lastgasp-vm: marker for the wrong port' > /dev/kmsg
stop_agent TERM
echo \"lastgasp-vm: after exit: $(ls /sys/kernel/config/netconsole | wc -l) target(s): \\
$(ls /sys/kernel/config/netconsole) \\
enabled=$(cat /sys/kernel/config/netconsole/lastgasp-{host}-{wrong_port}/enabled)\"

run_agent repointed --node-name {NODE} --netconsole-target {host}:{port}
await_log 'netconsole target lastgasp-{host}-{wrong_port} (removed|not removed)'
stop_agent KILL
echo \"lastgasp-vm: re-pointed: $(ls /sys/kernel/config/netconsole | wc -l) target(s): \\
$(ls /sys/kernel/config/netconsole)\"

echo 0 > $t/enabled
echo 02:00:00:00:00:01 > $t/remote_mac
echo 1 > $t/enabled
echo \"lastgasp-vm: made stale: remote_mac=$(cat $t/remote_mac) enabled=$(cat $t/enabled)\"
run_agent fixed --node-name {NODE} --netconsole-target {host}:{port}
await_log 'netconsole target lastgasp-.* (updated|adopted|not configured)'
stop_agent KILL

echo \"lastgasp-vm: $(ls /sys/kernel/config/netconsole | wc -l) target(s): \\
$(ls /sys/kernel/config/netconsole)\"
{SHOW_TARGET}echo \"{CRASH_MARKER}\"
echo c > /proc/sysrq-trigger
",
        host = guest::HOST,
    );
    let vm = boot(&kernel, "netconsole-outlives", port, &script);

    // 1. Nothing to configure netconsole with.
    let unavailable = console(&vm, "netconsole is unavailable");
    println!("{version}: {}", unavailable.text);
    assert!(
        unavailable
            .text
            .contains("the netconsole module is not loaded (/sys/module/netconsole is missing)")
            && unavailable.text.contains("`modprobe netconsole` failed"),
        "{}",
        unavailable.text
    );
    console(
        &vm,
        r#"lastgasp-vm: metric lastgasp_netconsole_targets{state="unavailable"} 1"#,
    );
    console(&vm, "lastgasp-vm: no-netconsole exited (0)");

    // 2. A target at the wrong port, live, and left behind on exit.
    let wrong_target = format!("lastgasp-10.0.2.2-{wrong_port}");
    console(&vm, &format!("netconsole target {wrong_target} created"));
    console(&vm, "lastgasp-vm: wrong-port exited (0)");
    console(
        &vm,
        "leaving the netconsole targets enabled: they report a panic while no agent runs",
    );
    console(
        &vm,
        &format!("lastgasp-vm: after exit: 1 target(s): {wrong_target} enabled=1"),
    );
    assert!(
        wrong.contains("lastgasp-vm: marker for the wrong port"),
        "the first target sent nothing to its port"
    );

    // 3. Re-pointed at the controller: the new target first, then the old one removed.
    let target = format!("lastgasp-10.0.2.2-{port}");
    let created = console(&vm, &format!("netconsole target {target} created"));
    let removed = console(&vm, &format!("netconsole target {wrong_target} removed"));
    assert!(created.at <= removed.at);
    console(
        &vm,
        &format!("lastgasp-vm: re-pointed: 1 target(s): {target}"),
    );

    // 4. The stale MAC fixed: disabled, edited, enabled.
    console(
        &vm,
        "lastgasp-vm: made stale: remote_mac=02:00:00:00:00:01 enabled=1",
    );
    let updated = console(&vm, &format!("netconsole target {target} updated"));
    assert!(
        updated
            .text
            .contains("changed=remote_mac 02:00:00:00:00:01 -> 52:55:0a:00:02:02"),
        "{}",
        updated.text
    );
    console(&vm, "lastgasp-vm: fixed exited (137)");
    console(&vm, &format!("lastgasp-vm: 1 target(s): {target}"));
    assert_target_shown(&vm, port);

    // The panic, with no agent running.
    let crash = console(&vm, CRASH_MARKER);
    let panic = console(&vm, PANIC);
    wait_for_marks(&cluster, &vm, Duration::from_secs(60)).await;
    let written = last_write(&cluster);
    println!(
        "{version}: panic line on the console to the controller's last write: {:.1} ms \
         (crash marker to last write: {:.1} ms)",
        millis_between(panic.at, written),
        millis_between(crash.at, written)
    );
    assert_eq!(assert_pods_marked(&cluster).await, "netconsole");
    println!(
        "{version}: incidents by channel: {:?}",
        channels(&controller).await
    );
    assert!(
        !wrong.contains("Kernel panic"),
        "the removed target still sent the panic to the wrong port"
    );
    assert_other_untouched(&cluster).await;
    println!("{version}: scenario took {:?}", started.elapsed());
    controller.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn netconsole_configured_by_the_agent_reports_a_panic_after_the_agent_is_killed() {
    netconsole_outlives_the_agent(KernelVersion::Debian61).await;
}

/// Writes the ingest Service's EndpointSlice as v1.20's EndpointSlice controller would
/// (discovery.k8s.io/v1beta1) for a leader reached at the host (as the guest sees it) on these
/// ports.
async fn put_ingest_slice(cluster: &Cluster, netconsole_port: u16, report_port: u16) {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "discovery.k8s.io",
        "v1beta1",
        "EndpointSlice",
    ));
    let slices: Api<DynamicObject> =
        Api::namespaced_with(cluster.admin().clone(), "lastgasp-system", &resource);
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {
            "name": "lastgasp-controller-ingest-x7k2p", "namespace": "lastgasp-system",
            "labels": {
                "kubernetes.io/service-name": "lastgasp-controller-ingest",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [
            { "name": "netconsole", "port": netconsole_port, "protocol": "UDP" },
            { "name": "reports", "port": report_port, "protocol": "UDP" },
        ],
        "endpoints": [{ "addresses": [guest::HOST], "conditions": { "ready": true } }],
    });
    slices
        .patch(
            "lastgasp-controller-ingest-x7k2p",
            &PatchParams::apply("endpointslice-controller.k8s.io").force(),
            &Patch::Apply(&slice),
        )
        .await
        .expect("write the ingest EndpointSlice");
}

/// The agent in cluster mode, as the DaemonSet runs it, as its ServiceAccount: the guest's
/// kubeconfig points at the real API server through the fault proxy and qemu's network, and the
/// agent finds the controller from the ingest Service's EndpointSlices. First they name an old leader (a host socket that receives a
/// /dev/kmsg marker through the netconsole target made for it); then the leader moves and the
/// agent re-points netconsole while it runs: the new target is created, the old one removed.
/// The crash reaches the controller through both channels, nothing of it the old leader, and
/// the agent's Node carries its conditions.
async fn in_cluster_agent_follows_the_controller(version: KernelVersion) {
    let started = Instant::now();
    let kernel = fetch(version);
    let cluster = Cluster::start().await;
    seed(&cluster).await;
    let controller = start_controller(&cluster).await;
    let report_port = controller.report_addr().port();
    let netconsole_port = controller.netconsole_addr().port();
    let old_leader = Collector::start();
    put_ingest_slice(&cluster, old_leader.port, report_port).await;

    let kubeconfig = cluster
        .proxy()
        .kubeconfig_yaml(&User::service_account("lastgasp-system", "lastgasp-agent"))
        .unwrap()
        .replace("127.0.0.1", guest::HOST);
    let script = format!(
        "cat > /tmp/kubeconfig <<'KUBECONFIG_END'
{kubeconfig}KUBECONFIG_END
export KUBECONFIG=/tmp/kubeconfig AGENT_MODE=
run_agent agent --node-name {NODE}
await_log 'netconsole target lastgasp-{host}-{old} created'
echo 'lastgasp-vm: to the old leader' > /dev/kmsg
echo 'lastgasp-vm: old leader target up'
await_log 'netconsole target lastgasp-{host}-{netconsole_port} created'
await_log 'netconsole target lastgasp-{host}-{old} removed'
await_log 'panic: (attached|unavailable)'
echo 'lastgasp-vm: agent ready'
sleep 1
echo \"{CRASH_MARKER}\"
echo c > /proc/sysrq-trigger
",
        host = guest::HOST,
        old = old_leader.port,
    );
    let vm = boot(&kernel, "in-cluster", netconsole_port, &script);
    console(&vm, "lastgasp-vm: old leader target up");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !old_leader.contains("lastgasp-vm: to the old leader") {
        assert!(
            Instant::now() < deadline,
            "the old leader's target delivered nothing; guest console:\n{}",
            vm.console_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The leader moves: the slice now lists the controller's ports.
    let moved = Instant::now();
    put_ingest_slice(&cluster, netconsole_port, report_port).await;
    let ready = console(&vm, "lastgasp-vm: agent ready");
    println!(
        "{version}: slice changed to netconsole re-pointed (and panic probe seen): {:?}",
        ready.at.saturating_duration_since(moved)
    );
    let crash = console(&vm, CRASH_MARKER);
    console(&vm, PANIC);
    wait_for_marks(&cluster, &vm, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "{version}: crash marker to the controller's last write: {:.1} ms",
        millis_between(crash.at, last_write(&cluster))
    );
    assert_pods_marked(&cluster).await;
    let channels = channels(&controller).await;
    for channel in ["netconsole", "agent"] {
        let line =
            format!(r#"lastgasp_controller_incidents_total{{kind="panic",source="{channel}"}} 1"#);
        assert!(
            channels.contains(&line),
            "{channel} did not report the panic: {channels:?}\nguest console:\n{}",
            vm.console_log()
        );
    }
    assert!(
        !old_leader.contains("Kernel panic"),
        "the removed target still sent the panic"
    );
    // Deleted by the controller or not, the Node got the agent's conditions first.
    let condition_writes = cluster
        .proxy()
        .requests()
        .into_iter()
        .filter(|request| request.resource.as_deref() == Some("nodes/status"))
        .count();
    assert!(
        condition_writes > 0,
        "the in-cluster agent wrote no node conditions"
    );
    assert_other_untouched(&cluster).await;
    println!("{version}: scenario took {:?}", started.elapsed());
    controller.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_cluster_agent_points_netconsole_and_last_gasp_at_the_moving_controller() {
    in_cluster_agent_follows_the_controller(KernelVersion::Debian612).await;
}
