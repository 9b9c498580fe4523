//! Loads the embedded eBPF object and attaches each probe in the best mode the kernel allows.
//! A probe that cannot attach is reported with the reason; the others keep working.

use std::{fmt, path::PathBuf, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramType, TracePoint},
    sys::{BpfHelper, is_helper_supported},
};
use clap::ValueEnum;
use lastgasp_common::{
    CNI_DIR_LEN, CNI_DIRS, CniDir, NO_FIELD, OomVictimFields, POD_CGROUP_ROOTS, PodCgroupRoot,
    PodCgroups, ProbeConfig, RecvSyscallNumbers, helpers,
};
use serde::Serialize;
use thiserror::Error;

use super::{btf, terminations::cgroupfs::PodRoots, tracepoint_format};

/// The probes, as compiled by `agent/build.rs` from `agent-ebpf/`.
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lastgasp-probes"));

/// Empty programs on the recv tracepoints (`agent-ebpf/src/bench_empty.rs`): the baseline
/// the probe-cost benchmark compares lastgasp's probes with.
pub static BENCH_BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-empty"));

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("CNI binary directory {0:?} is not an absolute path")]
    RelativeCniDir(PathBuf),
    #[error("CNI binary directory {0:?} is longer than {max} bytes", max = CNI_DIR_LEN - 1)]
    CniDirTooLong(PathBuf),
    #[error("at most {CNI_DIRS} CNI binary directories can be watched")]
    TooManyCniDirs,
    #[error(
        "loading the eBPF object failed (the agent needs root, or CAP_BPF with CAP_PERFMON): {0}"
    )]
    Load(#[from] aya::EbpfError),
}

/// How a probe is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    Tracepoint,
    /// A BTF tracepoint (`tp_btf`): a tracepoint whose program gets the tracepoint's
    /// arguments (kernel pointers included) instead of its formatted record.
    BtfTracepoint,
    Kprobe,
    Fentry,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tracepoint => "tracepoint",
            Self::BtfTracepoint => "tp_btf",
            Self::Kprobe => "kprobe",
            Self::Fentry => "fentry",
        }
    }
}

/// Which way in the netlink recv probe may use (`--netlink-probe`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum NetlinkProbeMode {
    /// The best the kernel allows: fentry/fexit, else kprobe/kretprobe, else tracepoints.
    #[default]
    Auto,
    /// fentry/fexit on `netlink_recvmsg`, or nothing.
    Fentry,
    /// kprobe/kretprobe on `netlink_recvmsg`, or nothing.
    Kprobe,
    /// The `syscalls` tracepoints of recvfrom, recvmsg and recvmmsg.
    Tracepoint,
}

impl NetlinkProbeMode {
    /// The modes to try, best first.
    fn candidates(self) -> &'static [AttachMode] {
        match self {
            Self::Auto => &[
                AttachMode::Fentry,
                AttachMode::Kprobe,
                AttachMode::Tracepoint,
            ],
            Self::Fentry => &[AttachMode::Fentry],
            Self::Kprobe => &[AttachMode::Kprobe],
            Self::Tracepoint => &[AttachMode::Tracepoint],
        }
    }
}

/// A BPF helper newer than the oldest kernel lastgasp supports (Linux 5.10). The loader
/// probes the kernel for each; one missing degrades one feature of one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OptionalHelper {
    /// `bpf_get_current_task_btf` (Linux 5.11).
    CurrentTaskBtf,
    /// `bpf_task_pt_regs` (Linux 5.15).
    TaskPtRegs,
    /// `bpf_loop` (Linux 5.17).
    Loop,
}

impl OptionalHelper {
    pub const ALL: [Self; 3] = [Self::CurrentTaskBtf, Self::TaskPtRegs, Self::Loop];

    pub fn name(self) -> &'static str {
        match self {
            Self::CurrentTaskBtf => "bpf_get_current_task_btf",
            Self::TaskPtRegs => "bpf_task_pt_regs",
            Self::Loop => "bpf_loop",
        }
    }

    /// The first kernel release that has it.
    pub fn since(self) -> &'static str {
        match self {
            Self::CurrentTaskBtf => "5.11",
            Self::TaskPtRegs => "5.15",
            Self::Loop => "5.17",
        }
    }

    fn id(self) -> BpfHelper {
        match self {
            Self::CurrentTaskBtf => BpfHelper::BPF_FUNC_get_current_task_btf,
            Self::TaskPtRegs => BpfHelper::BPF_FUNC_task_pt_regs,
            Self::Loop => BpfHelper::BPF_FUNC_loop,
        }
    }
}

/// The optional helpers the kernel offers the probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Helpers(Vec<OptionalHelper>);

impl Helpers {
    /// Asks the kernel for each helper (by loading a program that calls it, as `bpftool
    /// feature probe` does), except those in `ignore`, which count as missing. All three are
    /// tracing helpers, so a tracepoint program stands in for every attach mode.
    pub fn probe(ignore: &[OptionalHelper]) -> Self {
        let present = OptionalHelper::ALL
            .into_iter()
            .filter(|helper| !ignore.contains(helper))
            .filter(
                |helper| match is_helper_supported(ProgramType::TracePoint, helper.id()) {
                    Ok(present) => present,
                    Err(error) => {
                        tracing::warn!(%error, helper = helper.name(), "probing for a BPF helper failed; taken as missing");
                        false
                    }
                },
            )
            .collect();
        Self(present)
    }

    pub fn new(present: &[OptionalHelper]) -> Self {
        Self(present.to_vec())
    }

    pub fn has(&self, helper: OptionalHelper) -> bool {
        self.0.contains(&helper)
    }

    /// The bits of `ProbeConfig::helpers`; `bpf_loop` has none: it picks whole programs.
    fn config_bits(&self) -> u32 {
        let mut bits = 0;
        if self.has(OptionalHelper::CurrentTaskBtf) {
            bits |= helpers::CURRENT_TASK_BTF;
        }
        if self.has(OptionalHelper::TaskPtRegs) {
            bits |= helpers::TASK_PT_REGS;
        }
        bits
    }
}

/// A feature of an attached probe that works less well for want of a helper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Degraded {
    /// Short name, for the `degraded` label of `lastgasp_probe_info`.
    pub feature: &'static str,
    /// What is lost.
    pub effect: &'static str,
    pub missing: OptionalHelper,
}

impl fmt::Display for Degraded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): no {} (Linux {})",
            self.feature,
            self.effect,
            self.missing.name(),
            self.missing.since()
        )
    }
}

/// The outcome of attaching one probe.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeStatus {
    pub probe: &'static str,
    /// The mode it attached in, or `None` when unavailable.
    pub mode: Option<AttachMode>,
    /// Why it is unavailable, or which better modes were refused.
    pub detail: Option<String>,
    /// What works less well in the mode it attached in, for want of a helper.
    pub degraded: Vec<Degraded>,
}

impl ProbeStatus {
    /// The `degraded` label: `feature:helper` pairs, comma-separated; empty if nothing is.
    pub fn degraded_label(&self) -> String {
        self.degraded
            .iter()
            .map(|degraded| format!("{}:{}", degraded.feature, degraded.missing.name()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Display for ProbeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.mode, &self.detail) {
            (Some(mode), None) => write!(f, "{}: attached ({})", self.probe, mode.as_str())?,
            (Some(mode), Some(detail)) => {
                write!(f, "{}: attached ({}); {detail}", self.probe, mode.as_str())?
            }
            (None, detail) => {
                return write!(
                    f,
                    "{}: unavailable: {}",
                    self.probe,
                    detail.as_deref().unwrap_or("unknown reason")
                );
            }
        }
        for degraded in &self.degraded {
            write!(f, "; degraded: {degraded}")?;
        }
        Ok(())
    }
}

pub struct LoadedProbes {
    pub ebpf: Ebpf,
    pub status: Vec<ProbeStatus>,
    /// The pod cgroup roots the termination probes filter on, when they are known (the exit
    /// probe records pod processes from then on, with or without the signal probe).
    pub pod_roots: Option<PodRoots>,
}

/// What the probes need to know before they are verified.
pub struct ProbeSettings<'a> {
    /// Netlink recv calls at least this long are reported by the kernel when they return.
    pub slow_recv: Duration,
    pub cni_bin_dirs: &'a [PathBuf],
    /// How long the panic probe may hold the dying CPU for the agent's last gasp; zero does not.
    pub panic_hold: Duration,
    pub netlink_probe: NetlinkProbeMode,
    /// Helpers to treat as missing even if the kernel has them (to exercise the fallbacks).
    pub ignore_helpers: &'a [OptionalHelper],
    /// The pod cgroup roots for the termination probes; empty: kubelet's defaults that exist.
    pub pod_cgroup_roots: &'a [PathBuf],
}

pub fn load(settings: &ProbeSettings<'_>) -> Result<LoadedProbes, LoadError> {
    mount_tracefs();
    lift_memlock_limit();
    let kernel_btf = btf::Btf::from_sys_fs();
    let offsets = kernel_btf
        .as_ref()
        .map_err(|error| error.to_string())
        .and_then(|btf| btf::kernel_offsets(btf).map_err(|error| error.to_string()));
    let pod_cgroups = kernel_btf
        .as_ref()
        .map_err(|error| error.to_string())
        .and_then(|btf| pod_cgroups(btf, settings.pod_cgroup_roots));
    drop(kernel_btf);
    let oom_victim = oom_victim_fields();
    let helpers = Helpers::probe(settings.ignore_helpers);
    let config = ProbeConfig {
        offsets: offsets.as_ref().copied().unwrap_or_default(),
        helpers: helpers.config_bits(),
        slow_recv_ns: u64::try_from(settings.slow_recv.as_nanos()).unwrap_or(u64::MAX),
        panic_hold_ns: u64::try_from(settings.panic_hold.as_nanos()).unwrap_or(u64::MAX),
        cni_dirs: cni_dirs(settings.cni_bin_dirs)?,
        recv_syscalls: recv_syscall_numbers(),
        pod_cgroups: pod_cgroups
            .as_ref()
            .map(|(config, _)| *config)
            .unwrap_or_default(),
        oom_victim: oom_victim
            .as_ref()
            .copied()
            .unwrap_or(OomVictimFields::NONE),
    };
    // The programs carry no CO-RE relocations (offsets come through CONFIG), so the loader
    // need not parse the kernel's BTF a second time.
    let mut ebpf = EbpfLoader::new()
        .btf(None)
        .override_global("CONFIG", &config, true)
        .load(PROBES_OBJECT)?;

    let mut status = Vec::new();
    // Probes that walk kernel structures need the offsets from BTF.
    let needs_btf = |probe: &'static str| match &offsets {
        Ok(_) => None,
        Err(error) => Some(ProbeStatus {
            probe,
            mode: None,
            detail: Some(format!("needs kernel BTF: {error}")),
            degraded: Vec::new(),
        }),
    };
    // aya's BTF for fentry/fexit, parsed once and only if a probe tries fentry.
    let mut kernel_btf = KernelBtf::default();
    status.push(needs_btf("netlink_recv").unwrap_or_else(|| {
        attach_netlink_recv(&mut ebpf, &mut kernel_btf, settings.netlink_probe, &helpers)
    }));
    status.push(needs_btf("cni_exec").unwrap_or_else(|| {
        tracepoints(
            &mut ebpf,
            "cni_exec",
            &[("sched_process_exec", "sched", "sched_process_exec")],
        )
    }));
    status.push(needs_btf("process_exit").unwrap_or_else(|| {
        tracepoints(
            &mut ebpf,
            "process_exit",
            &[("sched_process_exit", "sched", "sched_process_exit")],
        )
    }));
    status.push(tracepoints(
        &mut ebpf,
        "console",
        &[("console", "printk", "console")],
    ));
    status.push(attach_panic(&mut ebpf, &mut kernel_btf, &helpers));
    let signal = match &pod_cgroups {
        Ok(_) => attach_signal(&mut ebpf, &mut kernel_btf),
        Err(error) => unavailable("signal", error),
    };
    let signal_attached = signal.mode.is_some();
    status.push(signal);
    status.push(match (&oom_victim, signal_attached) {
        (Ok(fields), true) => {
            let mut status =
                tracepoints(&mut ebpf, "oom", &[("mark_victim", "oom", "mark_victim")]);
            if status.mode.is_some() && fields.anon_rss == NO_FIELD {
                status.detail = Some(
                    "oom:mark_victim has the pid only (before Linux 6.9): the victim's RSS and \
                     oom_score_adj come from the console's `Killed process` line"
                        .into(),
                );
            }
            status
        }
        (Ok(_), false) => unavailable("oom", "needs the signal probe"),
        (Err(error), _) => unavailable("oom", error),
    });
    drop(kernel_btf);
    release_freed_memory();
    Ok(LoadedProbes {
        ebpf,
        status,
        pod_roots: pod_cgroups.ok().map(|(_, roots)| roots),
    })
}

fn unavailable(probe: &'static str, why: impl fmt::Display) -> ProbeStatus {
    ProbeStatus {
        probe,
        mode: None,
        detail: Some(why.to_string()),
        degraded: Vec::new(),
    }
}

/// The termination probes' filter: the pod cgroup roots, and the kernel's offsets to test a
/// task against them.
fn pod_cgroups(btf: &btf::Btf, wanted: &[PathBuf]) -> Result<(PodCgroups, PodRoots), String> {
    let roots = PodRoots::resolve(wanted).map_err(|error| error.to_string())?;
    let offsets = btf::cgroup_offsets(btf).map_err(|error| format!("needs kernel BTF: {error}"))?;
    let hierarchy = if roots.mount.unified {
        0
    } else {
        // The first controller of the hierarchy the kernel has an id for.
        let id = roots
            .mount
            .options
            .iter()
            .find_map(|controller| btf::cgroup_subsys_id(btf, controller).ok())
            .ok_or_else(|| {
                format!(
                    "pod cgroup roots in {:?}: a v1 hierarchy without a known controller",
                    roots.mount.mount_point
                )
            })?;
        id + 1
    };
    tracing::info!(
        ancestors = if offsets.ancestors_are_ids != 0 {
            "cgroup.ancestor_ids"
        } else {
            "cgroup.ancestors"
        },
        hierarchy,
        "pod cgroup filter: a task's cgroup at each root's level must be that root"
    );
    let mut slots = [PodCgroupRoot::default(); POD_CGROUP_ROOTS];
    for (slot, root) in slots.iter_mut().zip(&roots.roots) {
        *slot = *root;
    }
    Ok((
        PodCgroups {
            offsets,
            hierarchy,
            count: roots.roots.len() as u32,
            roots: slots,
        },
        roots,
    ))
}

/// The fields of `oom:mark_victim` on this kernel, from its format file.
fn oom_victim_fields() -> Result<OomVictimFields, String> {
    let path = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(|tracefs| std::path::Path::new(tracefs).join("events/oom/mark_victim/format"))
        .find(|path| path.exists())
        .ok_or("no tracepoint oom:mark_victim under tracefs")?;
    let format = std::fs::read_to_string(&path)
        .map_err(|error| format!("reading {}: {error}", path.display()))?;
    tracepoint_format::oom_victim_fields(&format)
        .map_err(|error| format!("{}: {error}", path.display()))
}

/// `signal:signal_generate` as a BTF tracepoint: it hands the program the target task.
fn attach_signal(ebpf: &mut Ebpf, btf: &mut KernelBtf) -> ProbeStatus {
    let attached = btf.get().and_then(|btf| {
        let program: &mut BtfTracePoint = program(ebpf, "signal_generate")?;
        program.load("signal_generate", btf)?;
        program.attach()?;
        Ok(())
    });
    match attached {
        Ok(()) => ProbeStatus {
            probe: "signal",
            mode: Some(AttachMode::BtfTracepoint),
            detail: None,
            degraded: Vec::new(),
        },
        Err(error) => unavailable("signal", one_line(&error)),
    }
}

/// Tracepoints are attached by their ids under tracefs; a host (or a fresh container's
/// hostPath) may not have it mounted yet. Mounts it where the kernel documents it, if needed.
fn mount_tracefs() {
    const TRACEFS: &str = "/sys/kernel/tracing";
    let mounted = |dir: &str| std::path::Path::new(dir).join("events").is_dir();
    if mounted(TRACEFS) || mounted("/sys/kernel/debug/tracing") {
        return;
    }
    // SAFETY: NUL-terminated literals; mount(2) has no other preconditions.
    let result = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result == 0 {
        tracing::info!("mounted tracefs at {TRACEFS}");
    } else {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "tracefs is not mounted and mounting it at {TRACEFS} failed: tracepoints cannot attach");
    }
}

/// Linux before 5.11 charges eBPF maps and programs to the loader's `RLIMIT_MEMLOCK`, 64 KiB by
/// default there: less than the agent's ring buffers. Lifts it to unlimited (raising the hard
/// limit needs CAP_SYS_RESOURCE). Later kernels, and Debian's 5.10.262, charge the memory
/// cgroup instead, where this changes nothing the agent allocates.
fn lift_memlock_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        tracing::info!(
            was_bytes = limit.rlim_cur,
            "lifted RLIMIT_MEMLOCK: kernels before 5.11 charge eBPF maps to it"
        );
    } else {
        let error = std::io::Error::last_os_error();
        tracing::warn!(
            %error,
            bytes = limit.rlim_cur,
            "RLIMIT_MEMLOCK could not be lifted: on kernels before 5.11 the probes' maps may not fit in it"
        );
    }
}

/// Parsing the kernel's BTF (megabytes, twice) leaves freed heap behind; hand it back to
/// the system so the agent's resident size reflects what it keeps.
fn release_freed_memory() {
    // SAFETY: glibc's malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
}

fn cni_dirs(dirs: &[PathBuf]) -> Result<[CniDir; CNI_DIRS], LoadError> {
    let mut out = [CniDir {
        len: 0,
        path: [0; CNI_DIR_LEN],
    }; CNI_DIRS];
    if dirs.len() > CNI_DIRS {
        return Err(LoadError::TooManyCniDirs);
    }
    for (slot, dir) in out.iter_mut().zip(dirs) {
        if !dir.is_absolute() {
            return Err(LoadError::RelativeCniDir(dir.clone()));
        }
        // The probe matches the directory with its trailing slash as a prefix of the exec'd path.
        let mut bytes = dir.as_os_str().as_encoded_bytes().to_vec();
        while bytes.len() > 1 && bytes.ends_with(b"/") {
            bytes.pop();
        }
        if bytes != b"/" {
            bytes.push(b'/');
        }
        if bytes.len() >= CNI_DIR_LEN {
            return Err(LoadError::CniDirTooLong(dir.clone()));
        }
        slot.path[..bytes.len()].copy_from_slice(&bytes);
        slot.len = bytes.len() as u32;
    }
    Ok(out)
}

/// The receive syscalls' numbers on the architecture the agent runs on.
fn recv_syscall_numbers() -> RecvSyscallNumbers {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        RecvSyscallNumbers {
            recvfrom: libc::SYS_recvfrom as u32,
            recvmsg: libc::SYS_recvmsg as u32,
            recvmmsg: libc::SYS_recvmmsg as u32,
            _pad: 0,
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        RecvSyscallNumbers::NONE
    }
}

/// The kernel's BTF as aya parses it (for fentry/fexit), parsed on first use.
#[derive(Default)]
struct KernelBtf(Option<Result<aya::Btf, String>>);

impl KernelBtf {
    fn get(&mut self) -> anyhow::Result<&aya::Btf> {
        self.0
            .get_or_insert_with(|| aya::Btf::from_sys_fs().map_err(|error| error.to_string()))
            .as_ref()
            .map_err(|error| anyhow::anyhow!("kernel BTF: {error}"))
    }
}

/// Verifier output lines kept in a refusal; a longer log keeps its first and last lines.
const REFUSAL_LINES: usize = 6;

/// An attach error with its causes, on one line, for the probe's status: the verifier's
/// output, which aya includes in a refused load, comes one line each, and its statistics
/// (`processed ... insns`, `verification time`, `stack depth`) say nothing about the cause.
fn one_line(error: &anyhow::Error) -> String {
    let text = format!("{error:#}");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("verification time ")
                && !line.starts_with("stack depth ")
                && !line.starts_with("processed ")
        })
        .collect();
    let join = |lines: &[&str]| {
        lines.iter().fold(String::new(), |mut joined, line| {
            // The next cause in the chain, after a log that ended in a newline.
            if !joined.is_empty() && !line.starts_with(':') {
                joined.push(' ');
            }
            joined.push_str(line);
            joined
        })
    };
    if lines.len() <= REFUSAL_LINES {
        return join(&lines);
    }
    let tail = REFUSAL_LINES - 2;
    format!(
        "{} [{} verifier lines left out] {}",
        join(&lines[..2]),
        lines.len() - REFUSAL_LINES,
        join(&lines[lines.len() - tail..])
    )
}

/// Loads and attaches every program of a probe; the probe is unavailable if any fails.
fn tracepoints(
    ebpf: &mut Ebpf,
    probe: &'static str,
    programs: &[(&str, &str, &str)],
) -> ProbeStatus {
    match attach_tracepoints(ebpf, programs) {
        Ok(()) => ProbeStatus {
            probe,
            mode: Some(AttachMode::Tracepoint),
            detail: None,
            degraded: Vec::new(),
        },
        Err(error) => ProbeStatus {
            probe,
            mode: None,
            detail: Some(one_line(&error)),
            degraded: Vec::new(),
        },
    }
}

fn attach_tracepoints(ebpf: &mut Ebpf, programs: &[(&str, &str, &str)]) -> anyhow::Result<()> {
    for &(program, category, name) in programs {
        attach_tracepoint(ebpf, program, category, name)
            .map_err(|error| anyhow::anyhow!("tracepoint {category}:{name}: {error:#}"))?;
    }
    Ok(())
}

/// The kernel function every netlink recv goes through.
const NETLINK_RECVMSG: &str = "netlink_recvmsg";

/// The netlink recv probe in the first of `mode`'s candidates the kernel accepts.
fn attach_netlink_recv(
    ebpf: &mut Ebpf,
    btf: &mut KernelBtf,
    mode: NetlinkProbeMode,
    helpers: &Helpers,
) -> ProbeStatus {
    let mut refused = Vec::new();
    for &candidate in mode.candidates() {
        let attached = match candidate {
            AttachMode::Fentry => attach_netlink_fentry(ebpf, btf),
            AttachMode::Kprobe => attach_netlink_kprobe(ebpf),
            AttachMode::BtfTracepoint => Err(anyhow::anyhow!("no BTF tracepoint for netlink recv")),
            AttachMode::Tracepoint => attach_tracepoints(
                ebpf,
                &[
                    ("recvfrom_enter", "syscalls", "sys_enter_recvfrom"),
                    ("recvfrom_exit", "syscalls", "sys_exit_recvfrom"),
                    ("recvmsg_enter", "syscalls", "sys_enter_recvmsg"),
                    ("recvmsg_exit", "syscalls", "sys_exit_recvmsg"),
                    ("recvmmsg_enter", "syscalls", "sys_enter_recvmmsg"),
                    ("recvmmsg_exit", "syscalls", "sys_exit_recvmmsg"),
                ],
            ),
        };
        match attached {
            Ok(()) => {
                return ProbeStatus {
                    probe: "netlink_recv",
                    mode: Some(candidate),
                    detail: (!refused.is_empty()).then(|| refused.join("; ")),
                    degraded: netlink_degraded(candidate, helpers),
                };
            }
            Err(error) => refused.push(format!(
                "{} refused: {}",
                candidate.as_str(),
                one_line(&error)
            )),
        }
    }
    if mode != NetlinkProbeMode::Auto {
        refused.push(format!(
            "--netlink-probe {} allows no other mode",
            mode.to_possible_value()
                .expect("no skipped variants")
                .get_name()
        ));
    }
    ProbeStatus {
        probe: "netlink_recv",
        mode: None,
        detail: Some(refused.join("; ")),
        degraded: Vec::new(),
    }
}

/// What the netlink recv probe loses in `mode` without the helpers it prefers.
fn netlink_degraded(mode: AttachMode, helpers: &Helpers) -> Vec<Degraded> {
    let missing =
        |wanted: &[OptionalHelper]| wanted.iter().copied().find(|&helper| !helpers.has(helper));
    match mode {
        // The syscall and fd come from the task's saved user registers.
        AttachMode::Fentry | AttachMode::Kprobe => {
            missing(&[OptionalHelper::TaskPtRegs, OptionalHelper::CurrentTaskBtf]).map(|missing| {
                Degraded {
                    feature: "recv_syscall_fd",
                    effect: "hung calls are reported without their syscall and fd; \
                             --netlink-probe tracepoint has them",
                    missing,
                }
            })
        }
        // The fd argument is the tracepoint's; its file is found by walking the task's table.
        AttachMode::Tracepoint | AttachMode::BtfTracepoint => {
            missing(&[OptionalHelper::CurrentTaskBtf]).map(|missing| Degraded {
                feature: "fd_lookup",
                effect: "each recv syscall walks the file table with bpf_probe_read_kernel \
                     calls instead of inlined loads",
                missing,
            })
        }
    }
    .into_iter()
    .collect()
}

/// fexit first, then fentry: an entry seen without its exit would leave a call in flight
/// forever. If fentry fails, fexit is detached again.
fn attach_netlink_fentry(ebpf: &mut Ebpf, btf: &mut KernelBtf) -> anyhow::Result<()> {
    let btf = btf.get()?;
    let exit: &mut FExit = program(ebpf, "netlink_recvmsg_fexit")?;
    exit.load(NETLINK_RECVMSG, btf)?;
    exit.attach()?;
    let entry = program::<FEntry>(ebpf, "netlink_recvmsg_fentry").and_then(|entry| {
        entry.load(NETLINK_RECVMSG, btf)?;
        entry.attach()?;
        Ok(())
    });
    if entry.is_err() {
        let _ = program::<FExit>(ebpf, "netlink_recvmsg_fexit").map(FExit::unload);
    }
    entry
}

/// kretprobe first, then kprobe, for the same reason as [`attach_netlink_fentry`].
fn attach_netlink_kprobe(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let exit: &mut KProbe = program(ebpf, "netlink_recvmsg_kretprobe")?;
    exit.load()?;
    exit.attach(NETLINK_RECVMSG, 0)?;
    let entry = program::<KProbe>(ebpf, "netlink_recvmsg_kprobe").and_then(|entry| {
        entry.load()?;
        entry.attach(NETLINK_RECVMSG, 0)?;
        Ok(())
    });
    if entry.is_err() {
        let _ = program::<KProbe>(ebpf, "netlink_recvmsg_kretprobe").map(KProbe::unload);
    }
    entry
}

/// A program of the object as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow::anyhow!("program {name} missing from the object"))?
        .try_into()?)
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    name: &str,
) -> anyhow::Result<()> {
    let program: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow::anyhow!("program {program} missing from the object"))?
        .try_into()?;
    program.load()?;
    program.attach(category, name).map_err(|error| {
        anyhow::anyhow!(
            "{error} (is tracefs mounted, and the tracepoint compiled into this kernel?)"
        )
    })?;
    Ok(())
}

/// `panic()` itself: fentry where the kernel has BPF trampolines, else a kprobe. Without
/// `bpf_loop` the programs whose hold is a bounded loop stand in.
fn attach_panic(ebpf: &mut Ebpf, btf: &mut KernelBtf, helpers: &Helpers) -> ProbeStatus {
    let bounded = !helpers.has(OptionalHelper::Loop);
    let suffix = if bounded { "_bounded" } else { "" };
    let degraded: Vec<Degraded> = bounded
        .then_some(Degraded {
            feature: "panic_hold",
            effect: "the dying CPU is held for a bounded number of checks, which may end \
                     before --panic-hold",
            missing: OptionalHelper::Loop,
        })
        .into_iter()
        .collect();
    let fentry_error = match attach_panic_fentry(ebpf, btf, &format!("panic_fentry{suffix}")) {
        Ok(()) => {
            return ProbeStatus {
                probe: "panic",
                mode: Some(AttachMode::Fentry),
                detail: None,
                degraded,
            };
        }
        Err(error) => error,
    };
    match attach_panic_kprobe(ebpf, &format!("panic_kprobe{suffix}")) {
        Ok(()) => ProbeStatus {
            probe: "panic",
            mode: Some(AttachMode::Kprobe),
            detail: Some(format!("fentry refused: {}", one_line(&fentry_error))),
            degraded,
        },
        Err(kprobe_error) => ProbeStatus {
            probe: "panic",
            mode: None,
            detail: Some(format!(
                "fentry refused: {}; kprobe refused: {}; \
                 panics are still seen on the console tracepoint",
                one_line(&fentry_error),
                one_line(&kprobe_error)
            )),
            degraded: Vec::new(),
        },
    }
}

fn attach_panic_fentry(ebpf: &mut Ebpf, btf: &mut KernelBtf, name: &str) -> anyhow::Result<()> {
    let btf = btf.get()?;
    let program: &mut FEntry = program(ebpf, name)?;
    program.load("panic", btf)?;
    program.attach()?;
    Ok(())
}

fn attach_panic_kprobe(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let program: &mut KProbe = program(ebpf, name)?;
    program.load()?;
    program.attach("panic", 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_dirs_end_in_one_slash() {
        let dirs = cni_dirs(&["/opt/cni/bin/".into(), "/usr/libexec/cni".into()]).unwrap();
        assert_eq!(&dirs[0].path[..dirs[0].len as usize], b"/opt/cni/bin/");
        assert_eq!(&dirs[1].path[..dirs[1].len as usize], b"/usr/libexec/cni/");
        assert_eq!(dirs[2].len, 0);
    }

    #[test]
    fn cni_dirs_are_validated() {
        assert!(matches!(
            cni_dirs(&["opt/cni".into()]),
            Err(LoadError::RelativeCniDir(_))
        ));
        let long = PathBuf::from(format!("/{}", "a".repeat(CNI_DIR_LEN)));
        assert!(matches!(
            cni_dirs(&[long]),
            Err(LoadError::CniDirTooLong(_))
        ));
        let many: Vec<PathBuf> = (0..=CNI_DIRS).map(|i| format!("/d{i}").into()).collect();
        assert!(matches!(cni_dirs(&many), Err(LoadError::TooManyCniDirs)));
    }

    #[test]
    fn status_lines_name_mode_and_reason() {
        let attached = ProbeStatus {
            probe: "console",
            mode: Some(AttachMode::Tracepoint),
            detail: None,
            degraded: Vec::new(),
        };
        assert_eq!(attached.to_string(), "console: attached (tracepoint)");
        assert_eq!(attached.degraded_label(), "");
        let missing = ProbeStatus {
            probe: "panic",
            mode: None,
            detail: Some("kprobe refused: ENOENT".into()),
            degraded: Vec::new(),
        };
        assert_eq!(
            missing.to_string(),
            "panic: unavailable: kprobe refused: ENOENT"
        );
    }

    #[test]
    fn refusals_fit_on_one_line() {
        let error = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EINVAL)).context(
            "the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: \
             The function panic with variable args is unsupported.\nverification time 139 \
             usec\nstack depth 0\nprocessed 0 insns (limit 1000000) max_states_per_insn 0 \
             total_states 0 peak_states 0 mark_read 0\n",
        );
        assert_eq!(
            one_line(&error),
            "the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: \
             The function panic with variable args is unsupported.: Invalid argument (os error \
             22)"
        );
        let long = anyhow::anyhow!(
            "{}",
            (1..=10)
                .map(|line| format!("line {line}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(
            one_line(&long),
            "line 1 line 2 [4 verifier lines left out] line 7 line 8 line 9 line 10"
        );
    }

    #[test]
    fn degraded_features_name_the_missing_helper() {
        let old = Helpers::new(&[]);
        let status = ProbeStatus {
            probe: "netlink_recv",
            mode: Some(AttachMode::Kprobe),
            detail: Some("fentry refused: EINVAL".into()),
            degraded: netlink_degraded(AttachMode::Kprobe, &old),
        };
        assert_eq!(status.degraded_label(), "recv_syscall_fd:bpf_task_pt_regs");
        assert!(
            status.to_string().starts_with(
                "netlink_recv: attached (kprobe); fentry refused: EINVAL; degraded: \
                 recv_syscall_fd (hung calls are reported without their syscall and fd;"
            ),
            "{status}"
        );
        assert!(
            status
                .to_string()
                .ends_with("no bpf_task_pt_regs (Linux 5.15)")
        );
        assert_eq!(
            netlink_degraded(AttachMode::Tracepoint, &old)[0].feature,
            "fd_lookup"
        );
        let all = Helpers::new(&OptionalHelper::ALL);
        assert_eq!(netlink_degraded(AttachMode::Fentry, &all), Vec::new());
        assert_eq!(netlink_degraded(AttachMode::Tracepoint, &all), Vec::new());
        let only_task_btf = Helpers::new(&[OptionalHelper::CurrentTaskBtf]);
        assert_eq!(
            netlink_degraded(AttachMode::Tracepoint, &only_task_btf),
            Vec::new()
        );
        assert_eq!(
            netlink_degraded(AttachMode::Fentry, &only_task_btf)[0].missing,
            OptionalHelper::TaskPtRegs
        );
        assert_eq!(
            all.config_bits(),
            helpers::CURRENT_TASK_BTF | helpers::TASK_PT_REGS
        );
        assert_eq!(old.config_bits(), 0);
    }
}
