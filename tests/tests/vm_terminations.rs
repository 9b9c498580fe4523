//! Container terminations on cgroup v2 and on each kernel of the matrix: the static agent runs
//! inside a Debian cloud kernel under QEMU (TCG) whose guest mounts only the unified hierarchy,
//! with pod cgroups laid out as kubelet's cgroupfs driver lays them out and the memory
//! controller handed down to them. Three containers:
//!
//! - `sleep`, SIGKILLed by the script's shell: killed, with the shell named as the sender;
//! - `dd` reading 64 MiB at once under `memory.max` 32 MiB: OOM-killed by the container's
//!   limit, with the limit, the victim's RSS and `memory.events` (`oom_kill` at least 1);
//! - a shell whose `dd` child is OOM-killed the same way while the shell goes on and exits 0:
//!   the child's kill, which Kubernetes never shows, and the container's clean exit.
//!
//! The agent starts under a 64 KiB `RLIMIT_MEMLOCK` (the default before Linux 5.16), which it
//! lifts: Linux before 5.11 charges eBPF maps to it. Debian's 5.10.262 does not (the agent
//! loads there under 64 KiB without lifting it), so this checks the lift, not its need.
//!
//! On 5.10 the in-kernel filter reads `cgroup.ancestor_ids` (before 5.13: `ancestors`), and
//! up to 6.8 `oom:mark_victim` carries the pid alone: the RSS then comes from the console's
//! `Killed process` line. Run: `cargo xtask vm test --test vm_terminations` or
//! `cargo test -p lastgasp-tests --features vm --test vm_terminations`.

use std::time::Duration;

use lastgasp_tests::{
    vm::{Initramfs, Kernel, KernelVersion, Vm, VmOptions, static_agent},
    vm_console::{AGENT_FUNCTIONS, agent_log, events, metric, section},
};
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(400);
const DONE: &str = "lastgasp-vm: scenario done";
const LIMIT: u64 = 32 << 20;

const KILLED: &str = "a1";
const OOM: &str = "b2";
const CHILD_OOM: &str = "c3";

/// The 64-hex container id containerd would give, from a two-digit tag.
fn container_id(tag: &str) -> String {
    tag.repeat(32)
}

fn script() -> String {
    let [killed, oom, child_oom] = [KILLED, OOM, CHILD_OOM].map(container_id);
    format!(
        r#"mkdir -p /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
K=/sys/fs/cgroup/kubepods
POD=$K/burstable/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789
mkdir -p $POD
for dir in /sys/fs/cgroup $K $K/burstable $POD; do
    echo +memory > $dir/cgroup.subtree_control
done
# in_container ID MEMORY_MAX COMMAND: runs COMMAND in the background in container ID's cgroup.
in_container() {{
    mkdir -p $POD/$1
    echo $2 > $POD/$1/memory.max
    sh -c "echo \$\$ > $POD/$1/cgroup.procs; $3" &
}}
echo "lastgasp-vm: begin terminations"
sed 's/^/mark_victim format: /' /sys/kernel/debug/tracing/events/oom/mark_victim/format
run() {{
    echo "lastgasp-vm: memlock was $(ulimit -l) KiB"
    ulimit -l 64
    start_agent --pod-cgroup-root $K || return
    in_container {killed} max "exec sleep 60"
    victim=$!
    sleep 1
    echo "lastgasp-vm: kill pid=$victim sender=$$ comm=$(cat /proc/$$/comm)"
    kill -9 $victim
    wait $victim
    in_container {oom} {LIMIT} "exec dd if=/dev/zero of=/dev/null bs=64M count=1"
    echo "lastgasp-vm: container-oom pid=$!"
    wait $!
    in_container {child_oom} {LIMIT} "dd if=/dev/zero of=/dev/null bs=64M count=1; sleep 1"
    echo "lastgasp-vm: child-oom pid=$!"
    wait $!
    for id in {oom} {child_oom}; do
        echo "lastgasp-vm: memory.events $id $(tr '\n' ' ' < $POD/$id/memory.events)"
    done
    # The kill, the OOM kill, the child's OOM kill and its shell's exit.
    wait_count '"kind":"container_termination"' 4 60
}}
run || fail terminations
metrics terminations
stop_agent terminations
echo "lastgasp-vm: end terminations"
"#
    )
}

/// Boots `version`, runs the script and returns the console once it is done.
fn run_guest(version: KernelVersion) -> String {
    let agent = static_agent().unwrap();
    let kernel = Kernel::fetch(version).unwrap();
    println!("kernel {}", kernel.fetched());
    let script = format!("{AGENT_FUNCTIONS}{}\necho \"{DONE}\"\n", script());
    let initramfs =
        Initramfs::build(&kernel, &script, &[("/bin/lastgasp", agent.as_path())]).unwrap();
    let options = VmOptions {
        name: format!("terminations-{version}"),
        cpus: 1,
        memory_mib: 1024,
        ..VmOptions::default()
    };
    // Not `quiet`: at the default log level the console shows the OOM killer's `oom-kill:`
    // line (KERN_INFO), which names the cgroup whose limit was reached.
    let (vm, ready) = Vm::boot_to_init(&kernel, &initramfs, "", &options, BOOT_TIMEOUT).unwrap();
    let done = vm.wait_for_console(DONE, SCRIPT_TIMEOUT).unwrap();
    println!(
        "{version}: terminations took {:?} after boot",
        done.at - ready.at
    );
    vm.console_log()
}

/// `lastgasp-vm: <what> key=value ...` on the console: the value of `key`.
fn script_value(lines: &[&str], what: &str, key: &str) -> String {
    let marker = format!("lastgasp-vm: {what} ");
    lines
        .iter()
        .filter_map(|line| line.split_once(&marker).map(|(_, rest)| rest))
        .flat_map(str::split_whitespace)
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, value)| value.to_owned())
        .unwrap_or_else(|| panic!("no {what} {key}= on the console"))
}

fn check(version: KernelVersion) {
    let console = run_guest(version);
    let lines = section(&console, "terminations");
    let log = agent_log(&lines, "terminations");
    let context = || format!("{version}:\n{}", lines.join("\n"));
    // Linux 6.1 replaced the ids of a cgroup's ancestors by pointers to them.
    let filter = log
        .iter()
        .find(|entry| {
            entry["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("pod cgroup filter"))
        })
        .unwrap_or_else(|| panic!("no pod cgroup filter line; {}", context()));
    let ancestors = match version {
        KernelVersion::Debian510 => "cgroup.ancestor_ids",
        _ => "cgroup.ancestors",
    };
    assert_eq!(filter["ancestors"], ancestors, "{filter}");
    let memlock = log
        .iter()
        .find(|entry| {
            entry["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("lifted RLIMIT_MEMLOCK"))
        })
        .unwrap_or_else(|| panic!("no lifted RLIMIT_MEMLOCK line; {}", context()));
    assert_eq!(memlock["was_bytes"], 64 << 10, "{memlock}");
    // Before 6.9 the tracepoint has the pid only (some stable kernels have the rest
    // backported), and the agent says which it found.
    let pid_only = !lines
        .iter()
        .any(|line| line.contains("mark_victim format: ") && line.contains(" anon_rss;"));
    let oom_probe = log
        .iter()
        .filter_map(|entry| entry["message"].as_str())
        .find(|message| message.starts_with("oom: "))
        .unwrap_or_else(|| panic!("no oom probe line; {}", context()));
    assert!(
        oom_probe.starts_with("oom: attached (tracepoint)"),
        "{oom_probe}"
    );
    assert_eq!(oom_probe.contains("pid only"), pid_only, "{oom_probe}");
    println!("{version}: {oom_probe}");
    let terminations = events(&log, "container_termination");
    for termination in &terminations {
        println!("{version}: {termination}");
    }
    let of = |tag: &str| -> Vec<&Value> {
        terminations
            .iter()
            .copied()
            .filter(|t| t["container_id"] == container_id(tag))
            .collect()
    };

    // Killed by the script's shell, a host process.
    let [killed] = of(KILLED)[..] else {
        panic!("one termination in the killed container; {}", context())
    };
    let victim: u64 = script_value(&lines, "kill", "pid").parse().unwrap();
    assert_eq!(killed["pid"], victim);
    assert_eq!(killed["comm"], "sleep");
    assert_eq!(killed["main_process"], true);
    let cause = &killed["cause"];
    assert_eq!(cause["cause"], "killed", "{cause}");
    assert_eq!(cause["signal"], 9);
    let sender = &cause["sender"];
    assert_eq!(sender["kind"], "host", "{sender}");
    let shell: u64 = script_value(&lines, "kill", "sender").parse().unwrap();
    assert_eq!(sender["pid"], shell);
    assert_eq!(
        sender["comm"],
        script_value(&lines, "kill", "comm").as_str()
    );

    // OOM-killed by the container's own limit.
    let [oom] = of(OOM)[..] else {
        panic!("one termination in the OOM container; {}", context())
    };
    let pid: u64 = script_value(&lines, "container-oom", "pid")
        .parse()
        .unwrap();
    assert_eq!(oom["pid"], pid);
    assert_eq!(oom["comm"], "dd");
    assert_eq!(oom["main_process"], true);
    check_oom_kill(&oom["cause"]);

    // A child OOM-killed, then the container's own clean exit.
    let child_oom = of(CHILD_OOM);
    let main: u64 = script_value(&lines, "child-oom", "pid").parse().unwrap();
    let child = child_oom
        .iter()
        .find(|t| t["pid"] != main)
        .unwrap_or_else(|| panic!("the child's OOM kill; {}", context()));
    assert_eq!(child["comm"], "dd");
    assert_eq!(child["main_process"], false);
    check_oom_kill(&child["cause"]);
    let shell = child_oom
        .iter()
        .find(|t| t["pid"] == main)
        .unwrap_or_else(|| panic!("the container's exit; {}", context()));
    assert_eq!(shell["main_process"], true);
    assert_eq!(shell["cause"]["cause"], "exited");
    assert_eq!(shell["cause"]["code"], 0);

    for (cause, count) in [("killed", 1.0), ("oom_killed", 2.0), ("exited", 1.0)] {
        assert_eq!(
            metric(
                &lines,
                "terminations",
                "lastgasp_container_terminations_total",
                &[("cause", cause)]
            ),
            Some(count),
            "{cause}; {}",
            context()
        );
    }
}

/// An OOM kill by a container's 32 MiB `memory.max`, as cgroup v2 reports it.
fn check_oom_kill(cause: &Value) {
    assert_eq!(cause["cause"], "oom_killed", "{cause}");
    assert_eq!(cause["scope"], "container", "{cause}");
    assert_eq!(cause["limit_bytes"], LIMIT, "{cause}");
    let rss = cause["rss_bytes"].as_u64().expect("the victim's RSS");
    assert!(rss > LIMIT / 2 && rss <= LIMIT + (8 << 20), "rss {rss}");
    let events = &cause["memory_events"];
    assert!(events["oom_kill"].as_u64() >= Some(1), "{cause}");
    assert!(events["oom"].as_u64() >= Some(1), "{cause}");
}

#[test]
fn terminations_on_cgroup_v2_5_10() {
    check(KernelVersion::Debian510);
}

#[test]
fn terminations_on_cgroup_v2_6_1() {
    check(KernelVersion::Debian61);
}

#[test]
fn terminations_on_cgroup_v2_6_12() {
    check(KernelVersion::Debian612);
}
