//! Real kernels crashing in different ways, end to end: a Debian cloud kernel under QEMU
//! (TCG) loads the crash module (`tests/guest/module/lastgasp_crash.c`, built against that
//! kernel's Debian headers), the agent sets up its netconsole target to the controller and
//! exits, and the module crashes the kernel: a NULL pointer dereference, `BUG()`,
//! `WARN_ON(1)` with `panic_on_warn`, or a task hung in uninterruptible sleep with
//! `hung_task_panic`. The controller, in this process against the real kube-apiserver (as its
//! ServiceAccount under `deploy/`'s RBAC), marks the node and its pods from the netconsole
//! stream alone, and names the crash:
//! `lastgasp.io/crash-title` (syzkaller's convention, `<kind> in <function>`) and
//! `lastgasp.io/crash-culprit` (the function).
//!
//! On 5.10, 6.1 and 6.12. Needs what `cargo xtask vm fetch` installs and downloads (qemu,
//! busybox-static, gcc-12, the kernels and their headers, and for 5.10 its gcc-10 from
//! bullseye), and builds the static agent.

use std::time::{Duration, Instant};

use lastgasp::{
    controller::{Controller, policy::Policy},
    wire::AuthKey,
};
use lastgasp_tests::{
    fixtures::{annotation, controller_config},
    kube::cluster::Cluster,
    scrape,
    vm::{
        CRASH_MODULE_GUEST_PATH, ConsoleLine, CrashModule, Initramfs, Kernel, KernelVersion, Vm,
        VmOptions, guest, static_agent,
    },
};
use serde_json::Value;

const NODE: &str = "vm-node";
const PODS: [&str; 2] = ["crash-0", "crash-1"];
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// From the crash marker to the panic line: the hung task needs a few detector periods.
const CRASH_TIMEOUT: Duration = Duration::from_secs(120);
const CRASH_MARKER: &str = "lastgasp-vm: crashing now";
const TITLE: &str = "lastgasp.io/crash-title";
const CULPRIT: &str = "lastgasp.io/crash-culprit";

/// One way to crash, and what it must produce.
struct Crash {
    /// The word written to `/proc/lastgasp_crash`.
    trigger: &'static str,
    /// Guest sysctls (`/proc/sys/kernel/<name>`) that turn the report into a panic.
    sysctls: &'static [(&'static str, &'static str)],
    /// The kernel's report on the console, before the panic.
    report: &'static str,
    /// In the `Kernel panic - not syncing: ...` line.
    panic: &'static str,
    /// The module function the crash happens in.
    function: &'static str,
    /// A word the crash title must contain.
    title_kind: &'static str,
}

const NULL_DEREF: Crash = Crash {
    trigger: "null",
    sysctls: &[("panic_on_oops", "1")],
    report: "BUG: kernel NULL pointer dereference",
    panic: "Kernel panic - not syncing: Fatal exception",
    function: "lastgasp_crash_null_deref",
    title_kind: "NULL pointer dereference",
};

const BUG: Crash = Crash {
    trigger: "bug",
    sysctls: &[("panic_on_oops", "1")],
    report: "kernel BUG at",
    panic: "Kernel panic - not syncing: Fatal exception",
    function: "lastgasp_crash_bug",
    title_kind: "kernel BUG",
};

const WARN: Crash = Crash {
    trigger: "warn",
    sysctls: &[("panic_on_warn", "1")],
    report: "WARNING: CPU:",
    panic: "panic_on_warn set",
    function: "lastgasp_crash_warn",
    title_kind: "WARNING",
};

/// A 3 s `hung_task_timeout_secs`: the detector wakes every 3 s too, so the panic comes 3–9 s
/// after the task went to sleep.
const HANG: Crash = Crash {
    trigger: "hang",
    sysctls: &[("hung_task_panic", "1"), ("hung_task_timeout_secs", "3")],
    report: "blocked for more than 3 seconds",
    panic: "Kernel panic - not syncing: hung_task: blocked tasks",
    function: "lastgasp_crash_hang",
    title_kind: "INFO: task hung",
};

async fn seed(cluster: &Cluster) {
    cluster.namespace("team").await;
    cluster.node(NODE, "127.0.0.1", None).await;
    for pod in PODS {
        cluster.pod("team", pod, NODE).await;
    }
}

/// Blocks this worker thread (the controller runs on the others) until the console shows
/// `pattern`.
fn console(vm: &Vm, pattern: &str, timeout: Duration) -> ConsoleLine {
    tokio::task::block_in_place(|| vm.wait_for_console(pattern, timeout)).unwrap()
}

/// The guest script: the agent (as in vm_scenarios.rs) creates its netconsole target, extended
/// and enabled, to the controller's port and exits, leaving it; then the module is loaded, the
/// sysctls set, and the crash triggered.
fn script(crash: &Crash, netconsole_port: u16) -> String {
    let sysctls: String = crash
        .sysctls
        .iter()
        .map(|(name, value)| {
            format!(
                "echo {value} > /proc/sys/kernel/{name}\n\
                 echo \"lastgasp-vm: {name}=$(cat /proc/sys/kernel/{name})\"\n"
            )
        })
        .collect();
    format!(
        "{network}{agent}run_agent netconsole --node-name {NODE} --netconsole-target {host}:{netconsole_port}
await_log 'netconsole target lastgasp-.* (created|not configured)|netconsole is unavailable'
stop_agent TERM
t=/sys/kernel/config/netconsole/lastgasp-{host}-{netconsole_port}
echo \"lastgasp-vm: target extended=$(cat $t/extended) enabled=$(cat $t/enabled)\"
insmod {CRASH_MODULE_GUEST_PATH} && echo 'lastgasp-vm: crash module loaded'
{sysctls}echo \"{CRASH_MARKER}: {trigger}\"
echo {trigger} > /proc/lastgasp_crash
echo 'lastgasp-vm: still alive after the crash trigger'
",
        network = guest::NETWORK_UP,
        agent = guest::AGENT,
        host = guest::HOST,
        trigger = crash.trigger,
    )
}

async fn object(cluster: &Cluster, resource: &str, namespace: Option<&str>, name: &str) -> Value {
    cluster
        .get(resource, namespace, name)
        .await
        .unwrap_or_else(|| panic!("{resource} {name} is gone"))
}

/// Waits until the node and `pods` carry `key`; the failure message carries the node, the
/// controller's metrics and the guest's console.
async fn wait_for_annotation(
    cluster: &Cluster,
    controller: &Controller,
    vm: &Vm,
    key: &str,
    pods: &[&str],
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let node = object(cluster, "nodes", None, NODE).await;
        let mut all = annotation(&node, key).is_some();
        for pod in pods {
            all &= annotation(&object(cluster, "pods", Some("team"), pod).await, key).is_some();
        }
        if all {
            return;
        }
        if Instant::now() >= deadline {
            let metrics = scrape(controller.metrics_addr()).await;
            let metrics: Vec<&str> = metrics
                .lines()
                .filter(|line| {
                    line.starts_with("lastgasp_controller_") && !line.contains("_bucket")
                })
                .collect();
            panic!(
                "the controller did not write {key} on {NODE} and pods {pods:?} within {within:?}; \
                 node: {node}\ncontroller metrics:\n{}\nguest console:\n{}",
                metrics.join("\n"),
                vm.console_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Boots the guest and waits until its console shows the crash's report and panic lines.
fn crash_once(
    kernel: &Kernel,
    initramfs: &Initramfs,
    options: &VmOptions,
    crash: &Crash,
    version: KernelVersion,
) -> Vm {
    let (vm, _) = tokio::task::block_in_place(|| {
        Vm::boot_to_init(kernel, initramfs, "", options, BOOT_TIMEOUT)
    })
    .unwrap();

    console(
        &vm,
        "lastgasp-vm: target extended=1 enabled=1",
        BOOT_TIMEOUT,
    );
    console(&vm, "lastgasp-vm: crash module loaded", BOOT_TIMEOUT);
    for (name, value) in crash.sysctls {
        console(&vm, &format!("lastgasp-vm: {name}={value}"), BOOT_TIMEOUT);
    }
    let marker = console(&vm, CRASH_MARKER, BOOT_TIMEOUT);
    let report = console(&vm, crash.report, CRASH_TIMEOUT);
    let panic = console(&vm, crash.panic, CRASH_TIMEOUT);
    println!("{version} {}: {}", crash.trigger, report.text.trim());
    println!("{version} {}: {}", crash.trigger, panic.text.trim());
    println!(
        "{version} {}: crash marker to panic line {:?}",
        crash.trigger,
        panic.at - marker.at
    );
    vm
}

/// How often a crash is tried when netconsole loses its panic line.
const CRASH_ATTEMPTS: usize = 2;

/// Whether the controller received a panic through netconsole within `within`.
async fn panic_reported(controller: &Controller, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let metrics = scrape(controller.metrics_addr()).await;
        if metrics.contains(
            r#"lastgasp_controller_kernel_reports_total{kind="panic",source="netconsole"}"#,
        ) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn crash_and_name_it(version: KernelVersion, crash: Crash) {
    let started = Instant::now();
    let kernel = tokio::task::block_in_place(|| Kernel::fetch(version)).unwrap();
    println!("kernel {}", kernel.fetched());
    let module = tokio::task::block_in_place(|| CrashModule::build(&kernel)).unwrap();
    println!("{version}: {}", module.fetched());
    let agent = tokio::task::block_in_place(static_agent).unwrap();

    let cluster = Cluster::start().await;
    seed(&cluster).await;
    let config = controller_config(Policy::Annotate, AuthKey::None);
    let controller = Controller::start(cluster.client_as("lastgasp-controller").await, config)
        .await
        .unwrap();
    let port = controller.netconsole_addr().port();

    let initramfs = Initramfs::build(
        &kernel,
        &script(&crash, port),
        &[
            ("/bin/lastgasp", agent.as_path()),
            (CRASH_MODULE_GUEST_PATH, module.path.as_path()),
        ],
    )
    .unwrap();
    let options = VmOptions {
        name: format!("crash-{}-{version}", crash.trigger),
        // One vCPU: no agent runs at the crash, and with two the netconsole stream of 6.12 lost
        // its tail twice in 24 runs (10 of ~60 datagrams arrived, none of the panic).
        cpus: 1,
        memory_mib: 1024,
        ..VmOptions::default()
    };
    // Netconsole is UDP from a dying kernel: once in some forty runs on 6.12 its tail was lost
    // (the report arrived, the panic line never did). Such a run says nothing about naming the
    // crash, so it boots once more, saying so; a second loss fails the test.
    let mut attempt = 0;
    let vm = loop {
        attempt += 1;
        let vm = crash_once(&kernel, &initramfs, &options, &crash, version);
        if panic_reported(&controller, CRASH_TIMEOUT).await || attempt == CRASH_ATTEMPTS {
            break vm;
        }
        println!(
            "{version} {}: the panic line never reached the controller through netconsole; \
             booting again",
            crash.trigger
        );
    };
    let log = vm.console_log();
    assert!(
        log.lines()
            .skip_while(|line| !line.contains(crash.report))
            .any(|line| line.contains(crash.function)),
        "{} is not in the call trace after {:?}:\n{log}",
        crash.function,
        crash.report
    );

    wait_for_annotation(
        &cluster,
        &controller,
        &vm,
        "lastgasp.io/termination-reason",
        &PODS,
        CRASH_TIMEOUT,
    )
    .await;
    let node = object(&cluster, "nodes", None, NODE).await;
    println!(
        "{version} {}: termination reason {:?}, code {:?}, source {:?}",
        crash.trigger,
        annotation(&node, "lastgasp.io/termination-reason"),
        annotation(&node, "lastgasp.io/termination-reason-code"),
        annotation(&node, "lastgasp.io/termination-source"),
    );

    // The crash's name. The marks above may come from the first report line, the title with
    // the rest of the report: give it a moment.
    wait_for_annotation(
        &cluster,
        &controller,
        &vm,
        TITLE,
        &PODS[..1],
        Duration::from_secs(30),
    )
    .await;
    let node = object(&cluster, "nodes", None, NODE).await;
    let pod = object(&cluster, "pods", Some("team"), PODS[0]).await;
    for (what, object) in [("node", &node), ("pod", &pod)] {
        let title = annotation(object, TITLE).unwrap_or_default();
        let culprit = annotation(object, CULPRIT).unwrap_or_default();
        println!(
            "{version} {}: {what} crash title {title:?}, culprit {culprit:?}",
            crash.trigger
        );
        assert!(
            title.contains(crash.title_kind),
            "{what} title {title:?} lacks {:?}",
            crash.title_kind
        );
        if crash.trigger == "hang" {
            // The task sleeps in the scheduler; whether the culprit is schedule() or the module
            // function depends on which frames count as generic.
            assert!(
                title.starts_with("INFO: task hung"),
                "{what} title {title:?}"
            );
            assert!(!culprit.is_empty(), "{what} has no culprit");
        } else {
            assert!(
                title.contains(crash.function),
                "{what} title {title:?} lacks {}",
                crash.function
            );
            assert!(
                culprit.contains(crash.function),
                "{what} culprit {culprit:?} lacks {}",
                crash.function
            );
        }
    }
    println!("{version} {}: took {:?}", crash.trigger, started.elapsed());
    controller.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn null_pointer_dereference_is_named_5_10() {
    crash_and_name_it(KernelVersion::Debian510, NULL_DEREF).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn null_pointer_dereference_is_named_6_1() {
    crash_and_name_it(KernelVersion::Debian61, NULL_DEREF).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn null_pointer_dereference_is_named_6_12() {
    crash_and_name_it(KernelVersion::Debian612, NULL_DEREF).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_bug_is_named_5_10() {
    crash_and_name_it(KernelVersion::Debian510, BUG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_bug_is_named_6_1() {
    crash_and_name_it(KernelVersion::Debian61, BUG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_bug_is_named_6_12() {
    crash_and_name_it(KernelVersion::Debian612, BUG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warning_with_panic_on_warn_is_named_5_10() {
    crash_and_name_it(KernelVersion::Debian510, WARN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warning_with_panic_on_warn_is_named_6_1() {
    crash_and_name_it(KernelVersion::Debian61, WARN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warning_with_panic_on_warn_is_named_6_12() {
    crash_and_name_it(KernelVersion::Debian612, WARN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_task_with_hung_task_panic_is_named_5_10() {
    crash_and_name_it(KernelVersion::Debian510, HANG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_task_with_hung_task_panic_is_named_6_1() {
    crash_and_name_it(KernelVersion::Debian61, HANG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_task_with_hung_task_panic_is_named_6_12() {
    crash_and_name_it(KernelVersion::Debian612, HANG).await;
}
