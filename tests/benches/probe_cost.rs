//! What lastgasp's recv probes add to a `recvfrom`/`recvmsg` call, next to empty tracepoint
//! programs on the same tracepoints. Non-blocking calls on empty sockets return EAGAIN at
//! once, so the probes' cost is a large share of each call. Needs root:
//! `cargo bench -p lastgasp-tests --features privileged --bench probe_cost`. The agent's netlink
//! probe attaches in the best mode the kernel allows;
//! `LASTGASP_NETLINK_PROBE=fentry|kprobe|tracepoint` forces one (the empty programs stay on the
//! syscall tracepoints).

use std::{
    net::UdpSocket,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::{Ebpf, programs::TracePoint};
use clap::ValueEnum as _;
use lastgasp::agent::{
    Agent, AgentConfig,
    loader::{BENCH_BASELINE_OBJECT, NetlinkProbeMode},
};
use lastgasp_tests::{
    bench::{median, pin_to_last_cpu},
    fixtures::agent_config,
};
use tokio::runtime::Runtime;

const ITERATIONS: u32 = 2_000_000;
const WARM_UP: u32 = 200_000;
const REPETITIONS: usize = 5;

#[derive(Clone, Copy)]
enum Condition {
    Bare,
    Empty,
    Lastgasp,
}

const CONDITIONS: [Condition; 3] = [Condition::Bare, Condition::Empty, Condition::Lastgasp];

#[derive(Clone, Copy)]
enum Syscall {
    Recvfrom,
    Recvmsg,
}

impl Syscall {
    fn name(self) -> &'static str {
        match self {
            Self::Recvfrom => "recvfrom",
            Self::Recvmsg => "recvmsg",
        }
    }
}

struct Case {
    socket: &'static str,
    syscall: Syscall,
    fd: RawFd,
    /// ns/call per condition (indexed like `CONDITIONS`), one entry per repetition.
    samples: [Vec<f64>; 3],
}

/// The probes attached for one condition; dropping the baseline or shutting down the agent
/// detaches them.
#[derive(Default)]
struct Probes {
    _baseline: Option<Ebpf>,
    agent: Option<Agent>,
}

fn main() -> anyhow::Result<()> {
    // The runtime's workers are spawned before pinning, so only this thread is pinned.
    let runtime = Runtime::new()?;
    let netlink_probe = match std::env::var("LASTGASP_NETLINK_PROBE") {
        Ok(mode) => NetlinkProbeMode::from_str(&mode, true)
            .map_err(|error| anyhow::anyhow!("LASTGASP_NETLINK_PROBE={mode}: {error}"))?,
        Err(_) => NetlinkProbeMode::Auto,
    };
    let cpu = pin_to_last_cpu()?;
    let cni_dir = std::env::temp_dir().join(format!("lastgasp-bench-cni-{}", std::process::id()));
    std::fs::create_dir_all(&cni_dir)?;

    let udp = UdpSocket::bind("127.0.0.1:0")?;
    let netlink = netlink_route_socket()?;
    let mut cases = Vec::new();
    for (socket, fd) in [
        ("UDP 127.0.0.1", udp.as_raw_fd()),
        ("netlink (NETLINK_ROUTE)", netlink.as_raw_fd()),
    ] {
        for syscall in [Syscall::Recvfrom, Syscall::Recvmsg] {
            ensure_eagain(fd, syscall)?;
            cases.push(Case {
                socket,
                syscall,
                fd,
                samples: Default::default(),
            });
        }
    }

    println!(
        "probe_cost: {ITERATIONS} calls per measurement after {WARM_UP} warm-up calls, \
         median of {REPETITIONS} repetitions, pinned to CPU {cpu}"
    );
    let mut foreign = Vec::new();
    for repetition in 0..REPETITIONS {
        // Rotate the order of the conditions so drift does not favour one of them.
        for offset in 0..CONDITIONS.len() {
            let index = (repetition + offset) % CONDITIONS.len();
            let bare = matches!(CONDITIONS[index], Condition::Bare);
            if bare {
                foreign.extend(foreign_programs(repetition));
            }
            let probes = attach(CONDITIONS[index], &runtime, &cni_dir, netlink_probe)?;
            if let Some(agent) = &probes.agent
                && repetition == 0
            {
                let netlink = agent.probes().iter().find(|p| p.probe == "netlink_recv");
                println!("lastgasp's {}", netlink.expect("reported"));
            }
            for case in &mut cases {
                case.samples[index].push(measure(case.fd, case.syscall));
            }
            if bare {
                foreign.extend(foreign_programs(repetition));
            }
            if let Some(agent) = probes.agent {
                runtime.block_on(agent.shutdown());
            }
        }
    }
    std::fs::remove_dir_all(&cni_dir)?;
    foreign.dedup();
    for warning in &foreign {
        println!("WARNING: {warning}: the numbers are not clean, rerun on a quiet machine");
    }

    println!();
    println!(
        "| socket | syscall | bare ns/call | empty-program ns/call | lastgasp ns/call \
         | added by empty (ns) | added by lastgasp (ns) | lastgasp-added / empty-added \
         | lastgasp extra over empty (ns) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for case in &cases {
        let [bare, empty, lastgasp] = case.samples.each_ref().map(|samples| median(samples));
        let (added_empty, added_lastgasp) = (empty - bare, lastgasp - bare);
        let ratio = if added_empty > 0.0 {
            format!("{:.2}", added_lastgasp / added_empty)
        } else {
            "n/a".into()
        };
        println!(
            "| {} | {} | {bare:.1} | {empty:.1} | {lastgasp:.1} | {added_empty:.1} \
             | {added_lastgasp:.1} | {ratio} | {:.1} |",
            case.socket,
            case.syscall.name(),
            lastgasp - empty,
        );
    }
    println!();
    println!("Repetitions (ns/call, in run order; conditions rotate between repetitions):");
    for case in &cases {
        for (condition, samples) in ["bare", "empty", "lastgasp"].iter().zip(&case.samples) {
            let samples: Vec<String> = samples.iter().map(|ns| format!("{ns:.1}")).collect();
            println!(
                "  {} {} {condition}: {}",
                case.socket,
                case.syscall.name(),
                samples.join(" ")
            );
        }
    }
    Ok(())
}

fn attach(
    condition: Condition,
    runtime: &Runtime,
    cni_dir: &Path,
    netlink_probe: NetlinkProbeMode,
) -> anyhow::Result<Probes> {
    Ok(match condition {
        Condition::Bare => Probes::default(),
        Condition::Empty => {
            let mut ebpf = Ebpf::load(BENCH_BASELINE_OBJECT)?;
            for (program, tracepoint) in [
                ("empty_recvfrom_enter", "sys_enter_recvfrom"),
                ("empty_recvfrom_exit", "sys_exit_recvfrom"),
                ("empty_recvmsg_enter", "sys_enter_recvmsg"),
                ("empty_recvmsg_exit", "sys_exit_recvmsg"),
            ] {
                let program: &mut TracePoint = ebpf
                    .program_mut(program)
                    .with_context(|| format!("{program} missing from the baseline object"))?
                    .try_into()?;
                program.load()?;
                program.attach("syscalls", tracepoint)?;
            }
            Probes {
                _baseline: Some(ebpf),
                agent: None,
            }
        }
        Condition::Lastgasp => {
            let agent = runtime
                .block_on(Agent::start(AgentConfig {
                    netlink_hang_threshold: Duration::from_secs(30),
                    netlink_probe,
                    cni_bin_dirs: vec![cni_dir.to_path_buf()],
                    ..agent_config("bench")
                }))
                .context("starting the agent (the benchmark must run as root)")?;
            let netlink = agent.probes().iter().find(|p| p.probe == "netlink_recv");
            if netlink.is_none_or(|p| p.mode.is_none()) {
                bail!("lastgasp's netlink_recv probe did not attach: {netlink:?}");
            }
            Probes {
                _baseline: None,
                agent: Some(agent),
            }
        }
    })
}

/// Tracepoint programs loaded while this benchmark has none: someone else's probes, which
/// would slow every syscall of every condition. Our detached programs are freed by then.
fn foreign_programs(repetition: usize) -> Option<String> {
    std::thread::sleep(Duration::from_millis(200));
    let names: Vec<String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| format!("{:?}", program.program_type()).ends_with("TRACEPOINT"))
        .map(|program| program.name_as_str().unwrap_or("?").to_owned())
        .collect();
    (!names.is_empty()).then(|| {
        format!(
            "repetition {}: other tracepoint programs loaded: {}",
            repetition + 1,
            names.join(", ")
        )
    })
}

/// Mean ns per call over `ITERATIONS` calls, after a warm-up.
fn measure(fd: RawFd, syscall: Syscall) -> f64 {
    let mut buf = [0u8; 64];
    for _ in 0..WARM_UP {
        recv(fd, syscall, &mut buf);
    }
    let start = Instant::now();
    for _ in 0..ITERATIONS {
        recv(fd, syscall, &mut buf);
    }
    start.elapsed().as_nanos() as f64 / f64::from(ITERATIONS)
}

fn recv(fd: RawFd, syscall: Syscall, buf: &mut [u8]) -> isize {
    match syscall {
        // SAFETY: a valid buffer and length; no source address requested.
        Syscall::Recvfrom => unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        },
        Syscall::Recvmsg => {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: an all-zero msghdr is valid; it then points at one live iovec.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // SAFETY: `msg` and its buffer outlive the call.
            unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) }
        }
    }
}

fn ensure_eagain(fd: RawFd, syscall: Syscall) -> anyhow::Result<()> {
    let result = recv(fd, syscall, &mut [0u8; 64]);
    let error = std::io::Error::last_os_error();
    ensure!(
        result == -1 && error.raw_os_error() == Some(libc::EAGAIN),
        "{} returned {result} ({error}), not EAGAIN",
        syscall.name()
    );
    Ok(())
}

fn netlink_route_socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    ensure!(
        fd >= 0,
        "netlink socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
