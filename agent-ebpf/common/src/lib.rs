//! Types shared by lastgasp's eBPF programs and its userspace agent.
//!
//! Everything here is `#[repr(C)]` and crosses the kernel/user boundary through
//! maps, ring buffers or the `CONFIG` global, so both sides must agree byte for byte.
#![no_std]

/// Length of a task's `comm`, including the terminating NUL.
pub const TASK_COMM_LEN: usize = 16;
/// Netlink protocols are numbered below the kernel's `MAX_LINKS`.
pub const NETLINK_PROTOCOLS: usize = 32;
/// Latency histograms count durations in power-of-two nanosecond buckets:
/// bucket `b` holds durations in `[2^b, 2^(b+1))` ns; the last also holds everything longer.
pub const LATENCY_BUCKETS: usize = 48;
/// Most CNI binary directories the agent watches.
pub const CNI_DIRS: usize = 8;
/// Longest CNI directory path (with its trailing `/`) the probe can match.
pub const CNI_DIR_LEN: usize = 128;
/// Longest executable path the exec probe copies.
pub const FILENAME_LEN: usize = 256;
/// Bytes of a CNI plugin's environment copied at exec (the tail if the block is longer:
/// runtimes append the `CNI_*` variables after their own environment).
pub const CNI_ENV_LEN: usize = 8192;
/// Bytes of one console line copied from the printk `console` tracepoint.
pub const CONSOLE_LINE_LEN: usize = 512;
/// Bytes of a cgroup directory's name copied (a container's: `cri-containerd-<64 hex>.scope`
/// is 85).
pub const CGROUP_NAME_LEN: usize = 128;
/// Most pod cgroup roots (`kubepods`, `kubepods.slice`, ...) the probes filter on.
pub const POD_CGROUP_ROOTS: usize = 4;
/// A tracepoint field this kernel's format file does not have.
pub const NO_FIELD: u32 = u32::MAX;

/// Byte offsets inside kernel structures, read from the running kernel's BTF at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_struct_files: u32,
    pub task_struct_mm: u32,
    pub task_struct_exit_code: u32,
    pub files_struct_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_file: u32,
    pub socket_sk: u32,
    pub sock_family: u32,
    pub sock_protocol: u32,
    pub mm_struct_env_start: u32,
    pub mm_struct_env_end: u32,
    /// The syscall number in a task's saved user registers (`struct pt_regs`: `orig_ax` on
    /// x86_64, `syscallno` on arm64; read as its low 32 bits).
    pub pt_regs_syscall_nr: u32,
    /// The syscall's first argument there (`di` on x86_64, `orig_x0` on arm64).
    pub pt_regs_arg0: u32,
}

/// Byte offsets the pod cgroup filter reads, from BTF at load time, for the termination probes.
/// Kept apart from [`KernelOffsets`]: a kernel without one of these loses only those probes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupOffsets {
    pub task_struct_pid: u32,
    pub task_struct_tgid: u32,
    pub task_struct_comm: u32,
    pub task_struct_real_parent: u32,
    pub task_struct_cgroups: u32,
    /// `css_set.dfl_cgrp`: the task's cgroup in the unified (v2) hierarchy.
    pub css_set_dfl_cgrp: u32,
    /// `css_set.subsys`: the task's state per controller (v1 hierarchies).
    pub css_set_subsys: u32,
    pub cgroup_subsys_state_cgroup: u32,
    pub cgroup_level: u32,
    pub cgroup_kn: u32,
    /// `cgroup.ancestors` (pointers, Linux 6.1+) or `cgroup.ancestor_ids` (ids, before):
    /// indexed by level, the cgroup itself at its own level.
    pub cgroup_ancestors: u32,
    /// 1 when the ancestors are `ancestor_ids` (u64 kernfs ids), 0 for `ancestors` (pointers).
    pub ancestors_are_ids: u32,
    pub kernfs_node_id: u32,
    pub kernfs_node_name: u32,
    /// `kernel_siginfo.si_code`.
    pub kernel_siginfo_code: u32,
    /// `task_struct.thread_pid`, `pid.level`, `pid.numbers` and the size of its `struct
    /// upid` elements: a task's pid in its own pid namespace.
    pub task_struct_thread_pid: u32,
    pub pid_level: u32,
    pub pid_numbers: u32,
    pub upid_size: u32,
}

/// The pod cgroup roots the termination probes filter on, all in one hierarchy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PodCgroups {
    pub offsets: CgroupOffsets,
    /// The hierarchy: 0 for the unified one (`css_set.dfl_cgrp`), else a v1 controller's
    /// `cgroup_subsys_id` + 1 (`css_set.subsys[id]`).
    pub hierarchy: u32,
    /// How many entries of `roots` are set; 0 disables the termination probes.
    pub count: u32,
    /// Each root's kernfs id (its directory's inode number) and level below the hierarchy's root.
    pub roots: [PodCgroupRoot; POD_CGROUP_ROOTS],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PodCgroupRoot {
    pub id: u64,
    pub level: u32,
    pub _pad: u32,
}

/// Where the `oom:mark_victim` tracepoint keeps the fields the probe reads, from its format
/// file at load time: only `pid` up to Linux 6.8, the victim's memory and score since 6.9 (with
/// its comm, uid, total_vm and pgtables, which the agent does not need). A missing field is
/// [`NO_FIELD`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OomVictimFields {
    pub pid: u32,
    /// `unsigned long`s, in kB.
    pub anon_rss: u32,
    pub file_rss: u32,
    pub shmem_rss: u32,
    /// `short`.
    pub oom_score_adj: u32,
    pub _pad: u32,
}

impl OomVictimFields {
    pub const NONE: Self = Self {
        pid: NO_FIELD,
        anon_rss: NO_FIELD,
        file_rss: NO_FIELD,
        shmem_rss: NO_FIELD,
        oom_score_adj: NO_FIELD,
        _pad: 0,
    };
}

/// This architecture's numbers of the traced receive syscalls, for the probe on
/// `netlink_recvmsg`, which learns the syscall it was called from through the task's saved
/// registers. `u32::MAX` matches nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvSyscallNumbers {
    pub recvfrom: u32,
    pub recvmsg: u32,
    pub recvmmsg: u32,
    pub _pad: u32,
}

impl RecvSyscallNumbers {
    pub const NONE: Self = Self {
        recvfrom: u32::MAX,
        recvmsg: u32::MAX,
        recvmmsg: u32::MAX,
        _pad: 0,
    };
}

/// One CNI binary directory, as bytes ending in `/`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CniDir {
    pub len: u32,
    pub path: [u8; CNI_DIR_LEN],
}

/// The read-only global `CONFIG`, set by the loader before the programs are verified.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    pub offsets: KernelOffsets,
    /// The optional helpers this kernel has, as [`helpers`] bits. The programs call one only
    /// behind its bit: the verifier reads this read-only global as a constant and never
    /// visits the call when the bit is clear. (Also keeps the struct free of implicit
    /// padding: `offsets` is 60 bytes, then a u64.)
    pub helpers: u32,
    /// A netlink recv call lasting at least this long is sent to userspace when it returns.
    pub slow_recv_ns: u64,
    /// How long the panic probe holds the dying CPU for the agent's acknowledgement
    /// (`PANIC_ACK`) that its last gasp is sent; 0 does not hold.
    pub panic_hold_ns: u64,
    pub cni_dirs: [CniDir; CNI_DIRS],
    pub recv_syscalls: RecvSyscallNumbers,
    pub pod_cgroups: PodCgroups,
    pub oom_victim: OomVictimFields,
}

/// Bits of [`ProbeConfig::helpers`]: helpers newer than the oldest kernel lastgasp supports.
pub mod helpers {
    /// `bpf_get_current_task_btf` (Linux 5.11): the current task as a BTF-typed pointer.
    pub const CURRENT_TASK_BTF: u32 = 1 << 0;
    /// `bpf_task_pt_regs` (Linux 5.15): a task's saved user registers.
    pub const TASK_PT_REGS: u32 = 1 << 1;
}

// The fields' sizes add up to the struct's: it has no padding (its `aya::Pod` needs none).
const _: () = assert!(
    size_of::<ProbeConfig>()
        == size_of::<KernelOffsets>()
            + size_of::<u32>()
            + 2 * size_of::<u64>()
            + size_of::<[CniDir; CNI_DIRS]>()
            + size_of::<RecvSyscallNumbers>()
            + size_of::<PodCgroups>()
            + size_of::<OomVictimFields>()
);

/// The receive syscalls traced for netlink hangs. A call of `netlink_recvmsg` from anything
/// else (io_uring, a 32-bit syscall) is recorded with 0: unknown.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvSyscall {
    Recvfrom = 1,
    Recvmsg = 2,
    Recvmmsg = 3,
}

impl RecvSyscall {
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Recvfrom),
            2 => Some(Self::Recvmsg),
            3 => Some(Self::Recvmmsg),
            _ => None,
        }
    }
}

/// A socket that is not AF_NETLINK, or a file that is not a socket.
pub const NOT_NETLINK: i32 = -1;

/// Slots of the per-thread recv state; a thread uses slot `tid % RECV_SLOTS`.
pub const RECV_SLOTS: usize = 16384;

/// Per-thread state of the recv probes: one slot of the mmap-able array `RECV_THREADS`,
/// indexed by `tid % RECV_SLOTS`, updated in place on every call, with no map insert or
/// delete. A thread takes its slot over when the slot's owner has no call in flight, so
/// an in-flight call (a hang) is never evicted; a colliding thread's call is then not
/// traced and counted as a drop. The slot is released when its thread exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecvThread {
    /// `bpf_ktime_get_ns` when the in-flight netlink call began; 0 when none is in flight.
    pub start_ns: u64,
    /// The `struct file *` classified last, and what it was: a one-entry cache that
    /// spares the socket walk for threads that keep receiving on the same socket (syscall
    /// tracepoints only; the probe on `netlink_recvmsg` needs no classification).
    pub cached_file: u64,
    pub cached_protocol: i32,
    /// The thread owning the slot; 0 when free.
    pub tid: u32,
    pub tgid: u32,
    /// The call's file descriptor; -1 when unknown (a call not from a traced syscall).
    pub fd: i32,
    /// Netlink protocol of the in-flight call.
    pub protocol: i32,
    /// [`RecvSyscall`] of the in-flight call; 0 when unknown.
    pub syscall: u32,
}

/// Completed netlink recv latencies for one protocol (per-CPU array `RECV_LATENCY`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LatencyHistogram {
    pub buckets: [u64; LATENCY_BUCKETS],
    pub sum_ns: u64,
}

/// Indexes of the per-CPU `DROPS` counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// The events ring buffer was full.
    EventsRingFull = 0,
    /// The kernel-log ring buffer was full.
    KernelLogRingFull = 1,
    /// A thread's recv slot was held by another thread's in-flight call.
    RecvSlotBusy = 2,
    /// The in-flight CNI call map refused a new call.
    CniCallsFull = 3,
    /// The terminations ring buffer was full.
    TerminationsRingFull = 4,
}

pub const DROP_KINDS: usize = 5;

impl Drop {
    pub const ALL: [Drop; DROP_KINDS] = [
        Drop::EventsRingFull,
        Drop::KernelLogRingFull,
        Drop::RecvSlotBusy,
        Drop::CniCallsFull,
        Drop::TerminationsRingFull,
    ];
}

/// Tag at the start of every record in the `EVENTS` and `KERNEL_LOG` ring buffers.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    SlowRecv = 1,
    CniExec = 2,
    CniExit = 3,
    ConsoleLine = 4,
    PanicCall = 5,
    SignalSent = 6,
    OomVictim = 7,
    ProcessExit = 8,
}

impl EventKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::SlowRecv),
            2 => Some(Self::CniExec),
            3 => Some(Self::CniExit),
            4 => Some(Self::ConsoleLine),
            5 => Some(Self::PanicCall),
            6 => Some(Self::SignalSent),
            7 => Some(Self::OomVictim),
            8 => Some(Self::ProcessExit),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` when the event was made.
    pub ktime_ns: u64,
}

impl EventHeader {
    /// A header for the current task, from `bpf_get_current_pid_tgid`'s value.
    pub const fn new(kind: EventKind, pid_tgid: u64, ktime_ns: u64) -> Self {
        Self {
            kind: kind as u32,
            tgid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            _pad: 0,
            ktime_ns,
        }
    }
}

/// A netlink recv call that lasted at least `slow_recv_ns`, sent when it returned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SlowRecv {
    pub header: EventHeader,
    pub duration_ns: u64,
    /// The syscall's return value; with the probe on `netlink_recvmsg`, that function's
    /// (the same for recvfrom and recvmsg; one message's for recvmmsg).
    pub ret: i64,
    pub fd: i32,
    pub protocol: i32,
    pub syscall: u32,
    pub _pad: u32,
    pub comm: [u8; TASK_COMM_LEN],
}

/// An exec of a binary in a CNI directory.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CniExec {
    pub header: EventHeader,
    pub filename_len: u32,
    pub env_len: u32,
    /// True when the environment was longer than [`CNI_ENV_LEN`] and only its tail was copied.
    pub env_truncated: u32,
    pub _pad: u32,
    pub filename: [u8; FILENAME_LEN],
    /// The new program's environment block: NUL-separated `KEY=value` strings.
    pub env: [u8; CNI_ENV_LEN],
}

/// The exit of a process that was exec'd from a CNI directory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CniExit {
    pub header: EventHeader,
    /// The kernel's `task_struct.exit_code`: exit status in bits 8..16, fatal signal in bits 0..7.
    pub exit_code: u32,
    pub _pad: u32,
}

/// One line the kernel wrote to its consoles.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConsoleLine {
    pub header: EventHeader,
    /// Length of the line in the kernel; only `CONSOLE_LINE_LEN` bytes are copied.
    pub len: u32,
    pub _pad: u32,
    pub text: [u8; CONSOLE_LINE_LEN],
}

/// A cgroup in the pod cgroups' hierarchy: its kernfs id, its parent's (the pod's, for a
/// container), and its directory name (a container's names the container).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgroupRef {
    pub id: u64,
    pub parent_id: u64,
    pub name: [u8; CGROUP_NAME_LEN],
}

/// A signal generated for a process of a pod, from `signal:signal_generate`; the header is
/// the sender's (the current task).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SignalSent {
    pub header: EventHeader,
    pub sig: i32,
    /// `si_code`: `SI_USER` (0) for kill(2), `SI_KERNEL` (0x80), `SI_TKILL` (-6), a fault's
    /// code (> 0), ...
    pub code: i32,
    /// `TRACE_SIGNAL_DELIVERED` (0), `_IGNORED`, `_ALREADY_PENDING`, `_OVERFLOW_FAIL`, `_LOSE_INFO`.
    pub result: i32,
    /// Sent to the whole thread group.
    pub group: i32,
    pub target_tid: u32,
    pub target_tgid: u32,
    /// 1 when the sender is in a pod cgroup too (then `sender_cgroup` is its cgroup).
    pub sender_in_pod: u32,
    pub _pad: u32,
    pub sender_comm: [u8; TASK_COMM_LEN],
    pub target_comm: [u8; TASK_COMM_LEN],
    pub target_cgroup: CgroupRef,
    pub sender_cgroup: CgroupRef,
}

/// The OOM killer's victim, from `oom:mark_victim`, when the kill's SIGKILL went to a process
/// of a pod. Fields the kernel's tracepoint lacks are 0 and flagged absent in `present`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomVictim {
    pub header: EventHeader,
    pub tid: u32,
    pub tgid: u32,
    /// [`oom_present`] bits.
    pub present: u32,
    pub oom_score_adj: i32,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
}

/// Bits of [`OomVictim::present`].
pub mod oom_present {
    pub const RSS: u32 = 1 << 0;
    pub const SCORE_ADJ: u32 = 1 << 1;
}

/// The exit of a pod process's thread-group leader, from `sched:sched_process_exit`: every
/// container's first process, the others only when a signal ended them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessExit {
    pub header: EventHeader,
    /// `task_struct.exit_code`: exit status in bits 8..16, fatal signal in bits 0..7, core
    /// dumped bit 7.
    pub exit_code: u32,
    pub parent_tgid: u32,
    /// 1 for the container's first process: its parent is in another cgroup (the runtime's
    /// shim), and it is pid 1 of its pid namespace, or in the host's (no namespace of its own).
    pub main_process: u32,
    pub _pad: u32,
    pub comm: [u8; TASK_COMM_LEN],
    pub cgroup: CgroupRef,
}

/// How `panic()` itself was probed.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanicProbe {
    Kprobe = 1,
    Fentry = 2,
}

/// Kernel stack frames kept of a `panic()` call: enough to pass `panic()`, the die/oops
/// helpers and the exception entry and reach the function that failed.
pub const PANIC_STACK_DEPTH: usize = 32;

/// A call of the kernel's `panic()`, seen by a kprobe or fentry program.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PanicCall {
    pub header: EventHeader,
    /// [`PanicProbe`].
    pub probe: u32,
    /// Bytes of `stack` that `bpf_get_stack` filled (a multiple of 8); 0 when it failed.
    pub stack_bytes: u32,
    /// `panic()`'s format string (the message itself when it has no arguments).
    pub format: [u8; CONSOLE_LINE_LEN],
    /// The kernel stack at `panic()`, innermost first: return addresses to symbolise.
    pub stack: [u64; PANIC_STACK_DEPTH],
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: #[repr(C)], fifteen u32 and no padding; any bytes are a valid value.
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: #[repr(C)], a u32 and a byte array (132 bytes, align 4, no padding); any bytes
    // are a valid value.
    unsafe impl aya::Pod for CniDir {}
    // SAFETY: #[repr(C)], four u32 and no padding; any bytes are a valid value.
    unsafe impl aya::Pod for RecvSyscallNumbers {}
    // SAFETY: #[repr(C)], twenty u32 and no padding; any bytes are a valid value.
    unsafe impl aya::Pod for CgroupOffsets {}
    // SAFETY: #[repr(C)], a u64 and two u32 (16 bytes, no padding); any bytes are valid.
    unsafe impl aya::Pod for PodCgroupRoot {}
    // SAFETY: #[repr(C)], the Pod types above and two u32 (80 + 8 bytes before the 8-aligned
    // roots), no padding; any bytes are a valid value.
    unsafe impl aya::Pod for PodCgroups {}
    // SAFETY: #[repr(C)], six u32 and no padding; any bytes are a valid value.
    unsafe impl aya::Pod for OomVictimFields {}
    // SAFETY: #[repr(C)], made of the Pod types above, integers and `_pad` (which fills the
    // gap before the u64s), so no padding; any bytes are a valid value.
    unsafe impl aya::Pod for ProbeConfig {}
    // SAFETY: #[repr(C)], two u64 then six 32-bit integers (40 bytes, align 8, no padding);
    // any bytes are a valid value.
    unsafe impl aya::Pod for RecvThread {}
    // SAFETY: #[repr(C)], u64s only, no padding; any bytes are a valid value.
    unsafe impl aya::Pod for LatencyHistogram {}
}
