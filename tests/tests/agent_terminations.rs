//! Container terminations explained, for real: processes in cgroups laid out as kubelet lays
//! them out (in the memory controller's hierarchy, for the limits), killed, OOM-killed,
//! crashed and exited on this kernel, with the agent's probes attached (root required).

use std::{
    process::Child,
    time::{Duration, Instant},
};

use lastgasp::agent::{
    Agent, AgentConfig,
    events::AgentEvent,
    terminations::{Cause, OomScope, Sender, Termination},
};
use lastgasp_tests::{container::ContainerCgroup, fixtures::agent_config, scrape};
use tokio::sync::broadcast;

/// A container id as containerd's cgroups carry it, distinct per test.
fn container_id(test: u8) -> String {
    format!("{test:02x}{}", "c0ffee".repeat(11))[..64].to_owned()
}

async fn start_agent(cgroup: &ContainerCgroup) -> Agent {
    Agent::start(AgentConfig {
        pod_cgroup_roots: vec![cgroup.kubepods().to_owned()],
        ..agent_config("terminations-node")
    })
    .await
    .expect("agent starts (the tests must run as root)")
}

/// The termination of process `pid`, waiting up to `within`.
async fn termination_of(
    events: &mut broadcast::Receiver<AgentEvent>,
    pid: u32,
    within: Duration,
) -> Termination {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(AgentEvent::ContainerTermination(termination))) if termination.pid == pid => {
                return *termination;
            }
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => {
                panic!("no termination of pid {pid} within {within:?}")
            }
        }
    }
}

/// Sends `signal` to `pid` from a thread named `comm` of this (host) process.
fn send_from(comm: &str, pid: u32, signal: i32) {
    std::thread::Builder::new()
        .name(comm.into())
        .spawn(move || {
            // SAFETY: kill(2) has no memory preconditions.
            assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
        })
        .unwrap()
        .join()
        .unwrap();
}

/// Waits until the process has joined the cgroup (the shell writes its pid first).
fn joined(cgroup: &ContainerCgroup, child: &Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let procs = std::fs::read_to_string(cgroup.procs()).unwrap_or_default();
        if procs.lines().any(|line| line == child.id().to_string()) {
            // Past the `echo`: the exec (or the script) follows at once.
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("pid {} never joined {:?}", child.id(), cgroup.dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkill_from_a_host_process_names_the_sender() {
    let cgroup = ContainerCgroup::create_for_memory(&container_id(0xa));
    let agent = start_agent(&cgroup).await;
    let mut events = agent.subscribe();
    let mut child = cgroup.run_sh("exec sleep 30");
    joined(&cgroup, &child);
    send_from("lg-killer", child.id(), libc::SIGKILL);
    child.wait().unwrap();

    let termination = termination_of(&mut events, child.id(), Duration::from_secs(5)).await;
    assert_eq!(termination.container_id, container_id(0xa));
    assert!(termination.main_process);
    assert_eq!(termination.comm, "sleep");
    match termination.cause {
        Cause::Killed {
            signal: 9,
            sender: Sender::Host { pid, comm, cgroup },
        } => {
            assert_eq!(pid, std::process::id());
            assert_eq!(comm, "lg-killer");
            // The sender lives on: its cgroup is read, and it is not a pod's.
            assert!(
                cgroup
                    .as_ref()
                    .is_some_and(|cgroup| !cgroup.contains("kubepods-lastgasp")),
                "{cgroup:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    agent.shutdown().await;
}

/// The filter on the unified hierarchy (`css_set.dfl_cgrp`), as on a cgroup v2 host; on a
/// hybrid host the v2 hierarchy without controllers.
#[tokio::test(flavor = "multi_thread")]
async fn the_unified_hierarchy_finds_pod_processes_too() {
    let cgroup = ContainerCgroup::create_unified(&container_id(0x2));
    let agent = start_agent(&cgroup).await;
    let mut events = agent.subscribe();
    let mut child = cgroup.run_sh("exec sleep 30");
    joined(&cgroup, &child);
    send_from("lg-killer", child.id(), libc::SIGKILL);
    child.wait().unwrap();

    let termination = termination_of(&mut events, child.id(), Duration::from_secs(5)).await;
    assert_eq!(termination.container_id, container_id(0x2));
    assert!(
        matches!(
            &termination.cause,
            Cause::Killed {
                signal: 9,
                sender: Sender::Host { comm, .. }
            } if comm == "lg-killer"
        ),
        "{:?}",
        termination.cause
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oom_kill_by_the_container_limit_has_the_limit_and_rss() {
    const LIMIT: u64 = 64 << 20;
    let cgroup = ContainerCgroup::create_for_memory(&container_id(0xb));
    cgroup.limit_memory(LIMIT);
    let agent = start_agent(&cgroup).await;
    let mut events = agent.subscribe();
    // Writes 256 MiB, four times the limit.
    let mut child = cgroup.run_sh("exec python3 -c \"a = b'x' * (256 << 20)\"");
    child.wait().unwrap();

    let termination = termination_of(&mut events, child.id(), Duration::from_secs(10)).await;
    assert!(termination.main_process);
    let Cause::OomKilled(oom) = termination.cause else {
        panic!("{:?}", termination.cause)
    };
    assert_eq!(oom.scope, OomScope::Container);
    assert_eq!(oom.limit_bytes, Some(LIMIT), "{oom:?}");
    let rss = oom.rss_bytes.expect("the victim's RSS");
    assert!(rss > LIMIT / 2 && rss <= LIMIT + (8 << 20), "rss {rss}");
    assert!(oom.oom_score_adj.is_some());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_oom_killed_while_the_container_lives_is_reported() {
    let cgroup = ContainerCgroup::create_for_memory(&container_id(0xc));
    cgroup.limit_memory(64 << 20);
    let agent = start_agent(&cgroup).await;
    let mut events = agent.subscribe();
    // The shell (the container's first process) outlives its child, and exits 0.
    let mut child = cgroup.run_sh("python3 -c \"a = b'x' * (256 << 20)\"; sleep 1");
    let main_pid = child.id();

    let deadline = Instant::now() + Duration::from_secs(10);
    let killed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(AgentEvent::ContainerTermination(t)))
                if t.container_id == container_id(0xc) && t.pid != main_pid =>
            {
                break *t;
            }
            Ok(_) => continue,
            Err(_) => panic!("no child termination"),
        }
    };
    assert!(!killed.main_process);
    assert_eq!(killed.comm, "python3");
    assert!(
        matches!(&killed.cause, Cause::OomKilled(oom) if oom.scope == OomScope::Container),
        "{:?}",
        killed.cause
    );
    child.wait().unwrap();
    let main = termination_of(&mut events, main_pid, Duration::from_secs(5)).await;
    assert!(main.main_process);
    assert_eq!(main.cause, Cause::Exited { code: 0 });
    agent.shutdown().await;
}

/// `debug.exception-trace` set for the test: the kernel prints `segfault at` lines only then.
struct ExceptionTrace(String);

impl ExceptionTrace {
    const PATH: &str = "/proc/sys/debug/exception-trace";

    fn enable() -> Self {
        let before = std::fs::read_to_string(Self::PATH).expect("debug.exception-trace");
        std::fs::write(Self::PATH, "1").unwrap();
        Self(before.trim().to_owned())
    }
}

impl Drop for ExceptionTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segfault_is_a_crash_with_the_faulting_library() {
    let _trace = ExceptionTrace::enable();
    let cgroup = ContainerCgroup::create_for_memory(&container_id(0xd));
    let agent = start_agent(&cgroup).await;
    let mut events = agent.subscribe();
    // strlen() of a NULL pointer, inside libc.
    let mut child = cgroup.run_sh("exec python3 -c 'import ctypes; ctypes.string_at(0)'");
    child.wait().unwrap();

    let termination = termination_of(&mut events, child.id(), Duration::from_secs(5)).await;
    let Cause::Crashed {
        signal: 11, fault, ..
    } = termination.cause
    else {
        panic!("{:?}", termination.cause)
    };
    let fault = fault.expect("the console's segfault line");
    assert_eq!(fault.kind, "segfault");
    assert_eq!(fault.address, Some(0));
    let library = fault.location.expect("the faulting mapping");
    assert!(library.starts_with("libc"), "{library}: {}", fault.line);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_3_is_a_clean_exit_with_its_code() {
    let cgroup = ContainerCgroup::create_for_memory(&container_id(0xe));
    let agent = start_agent(&cgroup).await;
    let mut events = agent.subscribe();
    let mut child = cgroup.run_sh("exit 3");
    child.wait().unwrap();

    let termination = termination_of(&mut events, child.id(), Duration::from_secs(5)).await;
    assert!(termination.main_process);
    assert_eq!(termination.cause, Cause::Exited { code: 3 });
    let json = AgentEvent::ContainerTermination(Box::new(termination)).to_json();
    assert_eq!(json["kind"], "container_termination");
    assert_eq!(json["cause"]["cause"], "exited");
    let metrics = scrape(agent.metrics_addr()).await;
    assert!(
        metrics.contains("lastgasp_container_terminations_total{cause=\"exited\"}"),
        "{metrics}"
    );
    for probe in ["signal", "oom", "process_exit"] {
        assert!(
            metrics.contains(&format!("lastgasp_probe_info{{probe=\"{probe}\",")),
            "{probe}"
        );
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkill_after_the_runtimes_sigterm_says_the_grace_period_ran_out() {
    let cgroup = ContainerCgroup::create_for_memory(&container_id(0xf));
    let agent = start_agent(&cgroup).await;
    let mut events = agent.subscribe();
    // Ignores SIGTERM, as a process that does not stop in time.
    let mut child = cgroup.run_sh("trap '' TERM; exec sleep 30");
    joined(&cgroup, &child);
    send_from("runc", child.id(), libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send_from("runc", child.id(), libc::SIGKILL);
    child.wait().unwrap();

    let termination = termination_of(&mut events, child.id(), Duration::from_secs(5)).await;
    match termination.cause {
        Cause::Killed {
            signal: 9,
            sender:
                Sender::Runtime {
                    pid,
                    comm,
                    grace_period_expired: true,
                    grace_seconds: Some(seconds),
                },
        } => {
            assert_eq!((pid, comm.as_str()), (std::process::id(), "runc"));
            assert!((1.4..3.0).contains(&seconds), "{seconds}");
        }
        other => panic!("{other:?}"),
    }
    agent.shutdown().await;
}
