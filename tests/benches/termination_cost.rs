//! What the termination probes add to the syscalls they fire on: `kill(2)` (the
//! `signal_generate` BTF tracepoint) and fork + exit + wait (`sched_process_exit`). Three
//! conditions: no agent; the agent (the release binary, a process of its own as in a
//! DaemonSet) without pod cgroup roots (its other probes, the exit probe's CNI part included,
//! with the termination probes off); the agent filtering on a test pod cgroup root. Cases: signals to this (host) process, which the in-kernel filter drops;
//! signals to a process of the test pod, each one a record for userspace; forks of a small
//! process (python3, not this one: the agent's mappings would make each fork copy more page
//! tables) on the host and in the pod, whose clean exits the filter drops. Needs root:
//! `cargo bench -p lastgasp-tests --features privileged --bench termination_cost`.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lastgasp_tests::{
    bench::{median, pin_to_last_cpu},
    container::ContainerCgroup,
    fixtures::lastgasp_binary,
};

const KILLS: u32 = 500_000;
const FORKS: u32 = 5_000;
const REPETITIONS: usize = 3;

#[derive(Clone, Copy)]
enum Condition {
    Bare,
    AgentWithoutPods,
    Agent,
}

/// In the order of the table's columns.
const CONDITIONS: [Condition; 3] = [
    Condition::Bare,
    Condition::AgentWithoutPods,
    Condition::Agent,
];

const CASES: [&str; 4] = [
    "kill(SIGUSR1) to a host process (ignored)",
    "kill(SIGUSR1) to a pod process (ignored)",
    "fork + exit + wait on the host",
    "fork + exit + wait in the pod",
];

fn main() -> anyhow::Result<()> {
    let binary = lastgasp_binary();
    let cpu = pin_to_last_cpu()?;
    let cgroup = ContainerCgroup::create_for_memory(&"be".repeat(32));
    // SAFETY: ignoring a signal has no memory preconditions.
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
    let mut pod_process = in_pod(&cgroup);
    println!(
        "termination_cost: {KILLS} kills and {FORKS} forks per measurement, median of \
         {REPETITIONS} repetitions, pinned to CPU {cpu}"
    );
    let measured = measure(&binary, &cgroup, pod_process.id());
    let killed = pod_process.kill();
    pod_process.wait()?;
    killed?;
    let samples = measured?;

    println!();
    println!(
        "| case | no agent ns/op | agent, no pod roots ns/op | agent, pod roots ns/op \
         | ratio to no agent | added by the termination probes (ns) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (case, name) in CASES.iter().enumerate() {
        let [bare, without, with] = [0, 1, 2].map(|condition| median(&samples[condition][case]));
        println!(
            "| {name} | {bare:.0} | {without:.0} | {with:.0} | {:.2} | {:.0} |",
            with / bare,
            with - without
        );
    }
    Ok(())
}

/// `samples[condition][case]`: ns per operation, one per repetition.
fn measure(
    binary: &Path,
    cgroup: &ContainerCgroup,
    pod_process: u32,
) -> anyhow::Result<Vec<Vec<Vec<f64>>>> {
    let mut samples = vec![vec![Vec::new(); CASES.len()]; CONDITIONS.len()];
    for repetition in 0..REPETITIONS {
        // Rotate the order of the conditions so drift does not favour one of them.
        for offset in 0..CONDITIONS.len() {
            let index = (repetition + offset) % CONDITIONS.len();
            let mut agent = match CONDITIONS[index] {
                Condition::Bare => None,
                Condition::AgentWithoutPods => Some(start(binary, None)?),
                Condition::Agent => Some(start(binary, Some(cgroup))?),
            };
            let measured = (|| -> anyhow::Result<()> {
                samples[index][0].push(kills(std::process::id()));
                samples[index][1].push(kills(pod_process));
                samples[index][2].push(forks(None)?);
                samples[index][3].push(forks(Some(cgroup))?);
                Ok(())
            })();
            if let Some(agent) = &mut agent {
                stop(agent);
            }
            measured?;
        }
    }
    Ok(samples)
}

/// The agent, once its probes are attached: the termination probes with the pod root, the
/// console probe without.
fn start(binary: &Path, pods: Option<&ContainerCgroup>) -> anyhow::Result<Child> {
    // A directory that is no cgroup keeps the termination probes off.
    let root = pods.map_or_else(std::env::temp_dir, |cgroup| cgroup.kubepods().to_owned());
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut agent = Command::new(binary)
        .args(["agent", "--standalone", "--metrics-addr"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--pod-cgroup-root")
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let attached = match pods {
        Some(_) => "lastgasp_probe_info{probe=\"signal\",mode=\"tp_btf\",attached=\"true\"",
        None => "lastgasp_probe_info{probe=\"console\",mode=\"tracepoint\",attached=\"true\"",
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if scrape(port).is_ok_and(|metrics| metrics.contains(attached)) {
            return Ok(agent);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(&mut agent);
    bail!("the agent did not show {attached} on /metrics within 30 s")
}

fn scrape(port: u16) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn stop(agent: &mut Child) {
    // SAFETY: signals our own child, which has not been reaped yet.
    unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
    if agent.wait().is_err() {
        let _ = agent.kill();
    }
}

/// A process of the test pod that ignores SIGUSR1.
fn in_pod(cgroup: &ContainerCgroup) -> Child {
    let child = cgroup.run_sh("trap '' USR1; exec sleep 600");
    std::thread::sleep(Duration::from_millis(300));
    child
}

/// Mean ns per `kill(pid, SIGUSR1)`.
fn kills(pid: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..KILLS {
        // SAFETY: kill(2) has no memory preconditions; the target ignores the signal.
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    }
    start.elapsed().as_nanos() as f64 / f64::from(KILLS)
}

/// Mean ns per fork of a child that exits at once, reaped, timed by a python3 process on the
/// host or in the pod (on this thread's CPU: it inherits the affinity).
fn forks(pod: Option<&ContainerCgroup>) -> anyhow::Result<f64> {
    let script = format!(
        "import os, time\n\
         start = time.perf_counter()\n\
         for _ in range({FORKS}):\n    \
             pid = os.fork()\n    \
             if pid == 0:\n        os._exit(0)\n    \
             os.waitpid(pid, 0)\n\
         print((time.perf_counter() - start) / {FORKS} * 1e9)\n"
    );
    let join = match pod {
        Some(cgroup) => format!("echo $$ > '{}' && ", cgroup.procs().display()),
        None => String::new(),
    };
    let output = std::process::Command::new("sh")
        .args(["-c", &format!("{join}exec python3 -c \"$0\""), &script])
        .output()?;
    anyhow::ensure!(output.status.success(), "python3: {output:?}");
    Ok(String::from_utf8(output.stdout)?.trim().parse()?)
}
