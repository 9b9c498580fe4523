//! Scenario 3, in a VM: a panic that nothing reports while it happens is recovered after the
//! reboot from pstore.
//!
//! The guest (a Debian cloud kernel under QEMU, ramoops on reserved RAM) boots twice from the
//! same initramfs: qemu resets it on the panic (`panic=1`, no `-no-reboot`) and keeps its RAM.
//! First boot: the agent starts, the network is cut (`ip link set eth0 down`) so nothing can
//! reach the controller, and the kernel is crashed with sysrq; ramoops keeps the panic's log.
//! Second boot: the agent finds `dmesg-ramoops-0` in pstore, sends the delayed report, archives
//! the record and removes it. The controller (in this process, against the real kube-apiserver
//! as its ServiceAccount) marks the node and the pods that were there at the panic, with source `pstore` and the
//! panic's line; it deletes nothing, and a pod created after the panic is left alone.
//! The init script tells the boots apart by whether pstore holds a record.
//!
//! Needs qemu-system-x86, busybox-static and apt access to Debian's kernels (`cargo xtask vm
//! fetch`), and builds the static agent (a release build, minutes when not up to date).

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use lastgasp::{
    controller::{Controller, policy::Policy},
    wire::AuthKey,
};
use lastgasp_tests::{
    fixtures::{annotation, controller_config},
    kube::cluster::Cluster,
    vm::{ConsoleLine, Initramfs, Kernel, KernelVersion, Vm, VmOptions, guest, static_agent},
};
use serde_json::Value;

const NODE: &str = "vm-node";
const PANIC: &str = "Kernel panic - not syncing: sysrq triggered crash";
/// The crash title (from netconsole's call trace, the agent's stack at `panic()` or the pstore
/// record's lines) and where it happened.
const REASON: &str = "kernel panic: sysrq triggered crash in sysrq_handle_crash on node vm-node";
const CRASH_MARKER: &str = "lastgasp-vm: crashing now";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

async fn seed(cluster: &Cluster) {
    cluster.namespace("team").await;
    cluster.node(NODE, "127.0.0.1", None).await;
    cluster.node("other", "127.0.0.9", None).await;
    for (pod, node) in [
        ("vm-0", NODE),
        ("vm-1", NODE),
        ("vm-2", NODE),
        ("other-0", "other"),
    ] {
        cluster.pod("team", pod, node).await;
    }
}

/// The guest's init, the same on both boots.
fn init_script(report_port: u16) -> String {
    format!(
        "{network}{ramoops}mkdir -p /sys/fs/bpf /run /var/lib/lastgasp /tmp/pstore-peek
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug
# Which boot is this? pstore is looked at through a mount of the script's own, so the agent
# finds /sys/fs/pstore empty and mounts it there itself.
mount -t pstore pstore /tmp/pstore-peek
records=$(ls /tmp/pstore-peek)
umount /tmp/pstore-peek
# The agent's output goes to the console and to /tmp/agent.log through one tee, so every line
# the script waits for has also reached the console, whatever runs first.
: > /tmp/agent.log
NO_COLOR=1 /bin/lastgasp agent --standalone --log-format json --node-name {NODE} \
    --controller {host}:{report_port} --metrics-addr 127.0.0.1:9465 \
    --pstore-dir /sys/fs/pstore --state-dir /var/lib/lastgasp 2>&1 | tee -a /tmp/agent.log &
if [ -z \"$records\" ]; then
    echo 'lastgasp-vm: first boot, pstore is empty'
    tries=0
    while ! grep -qE 'panic: (attached|unavailable)' /tmp/agent.log; do
        tries=$((tries + 1))
        [ $tries -gt 600 ] && echo 'lastgasp-vm: the agent never reported its panic probe' && exit 1
        sleep 0.5
    done
    ip link set eth0 down
    echo 'lastgasp-vm: network down'
    echo \"{CRASH_MARKER}\"
    echo c > /proc/sysrq-trigger
else
    echo \"lastgasp-vm: second boot, pstore holds: $records\"
    tries=0
    while ! grep -q previous_boot_panic /tmp/agent.log; do
        tries=$((tries + 1))
        [ $tries -gt 600 ] && echo 'lastgasp-vm: the agent reported no previous boot panic' && exit 1
        sleep 0.5
    done
    echo \"lastgasp-vm: pstore after the agent: [$(ls /sys/fs/pstore)]\"
    echo \"lastgasp-vm: archived: [$(ls /var/lib/lastgasp/pstore-archive)]\"
    # Keep the agent resending until the test is done with the guest.
    sleep 600
fi
",
        network = guest::NETWORK_UP,
        ramoops = guest::RAMOOPS,
        host = guest::HOST,
    )
}

fn fetch(version: KernelVersion) -> Kernel {
    let kernel = Kernel::fetch(version).unwrap();
    println!("kernel {}", kernel.fetched());
    kernel
}

/// Blocks this worker thread (the controller runs on the others) until the console shows `pattern`.
fn console(vm: &Vm, pattern: &str, timeout: Duration) -> ConsoleLine {
    tokio::task::block_in_place(|| vm.wait_for_console(pattern, timeout)).unwrap()
}

async fn get(cluster: &Cluster, resource: &str, namespace: Option<&str>, name: &str) -> Value {
    cluster
        .get(resource, namespace, name)
        .await
        .unwrap_or_else(|| panic!("{resource} {name} is gone"))
}

fn marked(object: &Value) -> bool {
    annotation(object, "lastgasp.io/termination-reason") == Some(REASON)
}

/// Writes (anything but reads) the controller made so far.
fn writes(cluster: &Cluster) -> Vec<(Instant, String)> {
    cluster
        .proxy()
        .requests()
        .into_iter()
        .filter(|request| request.method != "GET")
        .map(|request| (request.at, format!("{} {}", request.method, request.uri)))
        .collect()
}

async fn pstore_recovery(version: KernelVersion) {
    let started = Instant::now();
    let agent = tokio::task::block_in_place(static_agent).unwrap();
    let kernel = fetch(version);
    let cluster = Cluster::start().await;
    seed(&cluster).await;
    // The policy that deletes most: a delayed report must still delete nothing.
    let config = controller_config(Policy::DeletePodsAndNode, AuthKey::None);
    let controller = Controller::start(cluster.client_as("lastgasp-controller").await, config)
        .await
        .unwrap();

    let initramfs = Initramfs::build_with_modules(
        &kernel,
        &init_script(controller.report_addr().port()),
        &[("/bin/lastgasp", agent.as_path())],
        guest::RAMOOPS_MODULES,
    )
    .unwrap();
    let options = VmOptions {
        name: format!("pstore-{version}"),
        memory_mib: 1024,
        reboot: true,
        ..VmOptions::default()
    };
    let (vm, _) = tokio::task::block_in_place(|| {
        Vm::boot_to_init(
            &kernel,
            &initramfs,
            guest::RAMOOPS_CMDLINE,
            &options,
            BOOT_TIMEOUT,
        )
    })
    .unwrap();

    let first = console(&vm, "lastgasp-vm: first boot", BOOT_TIMEOUT);
    println!("{version}: first boot to shell {:?}", first.at - vm.started);
    console(&vm, "lastgasp-vm: network down", BOOT_TIMEOUT);
    let crash = console(&vm, CRASH_MARKER, BOOT_TIMEOUT);
    console(&vm, PANIC, BOOT_TIMEOUT);
    let second = console(&vm, "lastgasp-vm: second boot", BOOT_TIMEOUT);
    println!(
        "{version}: crash to the second boot's shell {:?}; {}",
        second.at - crash.at,
        second.text
    );
    assert!(
        second.text.contains("dmesg-ramoops-0"),
        "pstore holds the record: {}",
        second.text
    );
    assert!(
        writes(&cluster).is_empty(),
        "nothing reached the controller while the guest was cut off: {:?}",
        writes(&cluster)
    );
    // A pod scheduled to the node after the panic: the panic did not touch it.
    cluster.pod("team", "vm-late", NODE).await;

    let event = console(&vm, "previous_boot_panic", BOOT_TIMEOUT);
    println!(
        "{version}: second boot's shell to the agent's previous_boot_panic {:?}",
        event.at - second.at
    );
    let logged: Value = serde_json::from_str(&event.text[event.text.find('{').unwrap()..])
        .unwrap_or_else(|error| panic!("{error}: {}", event.text));
    assert_eq!(logged["kind"], "previous_boot_panic");
    assert_eq!(logged["failure"], "panic");
    assert_eq!(logged["dump_reason"], "panic");
    assert_eq!(logged["backend"], "ramoops");
    assert_eq!(logged["message"], PANIC);
    assert_eq!(logged["removed"], true);
    assert!(
        vm.console_log().contains("\"mounted pstore\""),
        "the agent mounted pstore itself"
    );
    let after = console(&vm, "lastgasp-vm: pstore after the agent:", BOOT_TIMEOUT);
    assert!(
        after.text.ends_with("pstore after the agent: []"),
        "the record was removed: {}",
        after.text
    );
    let archived = console(&vm, "lastgasp-vm: archived:", BOOT_TIMEOUT);
    assert!(
        archived.text.contains("-ramoops-panic-1.txt"),
        "{}",
        archived.text
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = marked(&get(&cluster, "nodes", None, NODE).await);
        for pod in ["vm-0", "vm-1", "vm-2"] {
            done &= marked(&get(&cluster, "pods", Some("team"), pod).await)
                && cluster.events_about("Pod", pod).await.len() == 1;
        }
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the controller did not mark {NODE} and its pods; guest console:\n{}",
            vm.console_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (last_write, _) = writes(&cluster)
        .into_iter()
        .max_by_key(|(at, _)| *at)
        .unwrap();
    println!(
        "{version}: second boot's shell to the controller's last write {:?}; crash to last write {:?}",
        last_write - second.at,
        last_write - crash.at
    );

    for name in ["vm-0", "vm-1", "vm-2"] {
        let pod = get(&cluster, "pods", Some("team"), name).await;
        assert_eq!(
            annotation(&pod, "lastgasp.io/termination-source"),
            Some("pstore")
        );
        assert_eq!(
            annotation(&pod, "lastgasp.io/termination-reason-code"),
            Some("KernelPanic")
        );
        let disruption = pod["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "DisruptionTarget")
            .cloned()
            .expect("DisruptionTarget condition");
        assert_eq!(disruption["reason"], "NodeKernelPanic");
        assert_eq!(cluster.events_about("Pod", name).await.len(), 1);
    }
    let node = get(&cluster, "nodes", None, NODE).await;
    assert_eq!(cluster.events_about("Node", NODE).await.len(), 1);
    let record: Value =
        serde_json::from_str(annotation(&node, "lastgasp.io/incident-record").unwrap()).unwrap();
    assert_eq!(record["record"]["sources"], serde_json::json!(["pstore"]));
    assert_eq!(
        record["plan"]["delete_pods"], false,
        "a delayed report deletes nothing"
    );
    // The panic's time is the guest's clock when ramoops wrote the record: the crash, give or
    // take the guest clock's start from the RTC's whole second.
    let panicked: Timestamp = record["record"]["panicked_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let panicked_ago = Timestamp::now().duration_since(panicked).as_secs_f64();
    let crash_ago = crash.at.elapsed().as_secs_f64();
    println!("{version}: recorded panic {panicked_ago:.1}s ago, crash marker {crash_ago:.1}s ago");
    assert!(
        (panicked_ago - crash_ago).abs() < 3.0,
        "panicked_at {panicked} is not the crash's time"
    );

    let late = get(&cluster, "pods", Some("team"), "vm-late").await;
    assert!(late["metadata"]["annotations"].is_null(), "{late}");
    assert!(cluster.events_about("Pod", "vm-late").await.is_empty());
    let other = get(&cluster, "pods", Some("team"), "other-0").await;
    assert!(other["metadata"]["annotations"].is_null(), "{other}");
    let deletes: Vec<_> = writes(&cluster)
        .into_iter()
        .filter(|(_, write)| write.starts_with("DELETE"))
        .collect();
    assert!(deletes.is_empty(), "{deletes:?}");
    println!("{version}: scenario took {:?}", started.elapsed());
    controller.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pstore_record_of_an_unreported_panic_marks_node_and_pods_after_reboot() {
    pstore_recovery(KernelVersion::Debian61).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pstore_record_of_an_unreported_panic_marks_node_and_pods_after_reboot_5_10() {
    pstore_recovery(KernelVersion::Debian510).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pstore_record_of_an_unreported_panic_marks_node_and_pods_after_reboot_6_12() {
    pstore_recovery(KernelVersion::Debian612).await;
}
