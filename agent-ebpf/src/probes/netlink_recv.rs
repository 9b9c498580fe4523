//! Netlink recv calls in flight. The loader attaches one of two ways in:
//!
//! - the kernel function `netlink_recvmsg` (fentry/fexit, else kprobe/kretprobe): it runs only
//!   for netlink sockets, so other sockets' calls cost nothing and the socket needs no
//!   classification. Every recvfrom, recvmsg and recvmmsg on a netlink socket goes through it
//!   (recvmmsg once per message), and the call blocks inside it (`skb_recv_datagram`).
//! - the `syscalls` tracepoints of recvfrom, recvmsg and recvmmsg, where the kernel has neither:
//!   they fire for every socket, so enter classifies the fd's socket (cached per thread).
//!
//! Enter remembers when a netlink call began; exit feeds the latency histogram and sends calls
//! slower than `slow_recv_ns` to userspace. Userspace scans `RECV_THREADS` for calls still in
//! flight: that is where hangs are found. The per-thread slot is an array element updated in
//! place: the verifier inlines array lookups, so a call costs no helper call for its state and
//! no map insert or delete.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
        bpf_task_pt_regs,
    },
    macros::{fentry, fexit, kprobe, kretprobe, tracepoint},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext},
};
use lastgasp_common::{
    Drop, EventHeader, EventKind, LATENCY_BUCKETS, NETLINK_PROTOCOLS, NOT_NETLINK, RECV_SLOTS,
    RecvSyscall, RecvThread, SlowRecv, helpers,
};

use super::kernel::{current_file, has_helper, load, read};
use crate::{
    config::{config, offsets},
    maps::{EVENTS, RECV_LATENCY, RECV_THREADS, count_drop},
};

/// `fd` in /sys/kernel/tracing/events/syscalls/sys_enter_{recvfrom,recvmsg,recvmmsg}/format
/// ("field:int fd; offset:16; size:8").
const ENTER_FD_OFFSET: usize = 16;
/// `ret` in /sys/kernel/tracing/events/syscalls/sys_exit_{recvfrom,recvmsg,recvmmsg}/format
/// ("field:long ret; offset:16; size:8").
const EXIT_RET_OFFSET: usize = 16;

const AF_NETLINK: u16 = 16;

/// `int netlink_recvmsg(struct socket *sock, struct msghdr *msg, size_t len, int flags)`:
/// fexit sees the return value after the four arguments.
const NETLINK_RECVMSG_ARGS: usize = 4;

// --- netlink_recvmsg: fentry/fexit ---

#[fentry(function = "netlink_recvmsg")]
pub fn netlink_recvmsg_fentry(ctx: FEntryContext) -> u32 {
    // A BTF-typed `struct socket *`: its fields are read with inlined loads.
    let sock: u64 = ctx.arg(0);
    let o = offsets();
    let sk: u64 = load(sock, o.socket_sk);
    if sk != 0 {
        enter_netlink(load::<u16>(sk, o.sock_protocol));
    }
    0
}

#[fexit(function = "netlink_recvmsg")]
pub fn netlink_recvmsg_fexit(ctx: FExitContext) -> u32 {
    // The return value is an `int`; only its low half is defined.
    let ret = ctx.arg::<u64>(NETLINK_RECVMSG_ARGS) as i32;
    exit(ret as i64);
    0
}

// --- netlink_recvmsg: kprobe/kretprobe ---

#[kprobe]
pub fn netlink_recvmsg_kprobe(ctx: ProbeContext) -> u32 {
    let o = offsets();
    let protocol = ctx
        .arg::<u64>(0)
        .and_then(|sock| read::<u64>(sock + o.socket_sk as u64))
        .and_then(|sk| read::<u16>(sk + o.sock_protocol as u64));
    if let Some(protocol) = protocol {
        enter_netlink(protocol);
    }
    0
}

#[kretprobe]
pub fn netlink_recvmsg_kretprobe(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>() as i32;
    exit(ret as i64);
    0
}

/// A netlink call begins: the socket is netlink by construction; which syscall and fd it came
/// from are read from the task's saved user registers.
#[inline(always)]
fn enter_netlink(protocol: u16) -> Option<()> {
    if protocol as usize >= NETLINK_PROTOCOLS {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let thread = claim_slot(pid_tgid as u32)?;
    let (syscall, fd) = current_syscall();
    thread.tgid = (pid_tgid >> 32) as u32;
    thread.fd = fd;
    thread.protocol = protocol as i32;
    thread.syscall = syscall;
    // SAFETY: helper without preconditions.
    thread.start_ns = unsafe { bpf_ktime_get_ns() };
    Some(())
}

/// The [`RecvSyscall`] the current task is in (0 if another) and its fd argument (-1 then).
/// Both stay unknown without `bpf_task_pt_regs` (before Linux 5.15), which finds the task's
/// saved user registers.
#[inline(always)]
fn current_syscall() -> (u32, i32) {
    if !(has_helper(helpers::TASK_PT_REGS) && has_helper(helpers::CURRENT_TASK_BTF)) {
        return (0, -1);
    }
    let c = config();
    // SAFETY: helpers without preconditions; both return trusted BTF pointers, read with
    // inlined loads at offsets from BTF.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    let nr: u32 = load(regs, c.offsets.pt_regs_syscall_nr);
    let syscall = if nr == c.recv_syscalls.recvfrom {
        RecvSyscall::Recvfrom as u32
    } else if nr == c.recv_syscalls.recvmsg {
        RecvSyscall::Recvmsg as u32
    } else if nr == c.recv_syscalls.recvmmsg {
        RecvSyscall::Recvmmsg as u32
    } else {
        return (0, -1);
    };
    (syscall, load::<u64>(regs, c.offsets.pt_regs_arg0) as i32)
}

// --- syscall tracepoints ---

#[tracepoint(category = "syscalls", name = "sys_enter_recvfrom")]
pub fn recvfrom_enter(ctx: TracePointContext) -> u32 {
    try_enter(&ctx, RecvSyscall::Recvfrom);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_recvmsg")]
pub fn recvmsg_enter(ctx: TracePointContext) -> u32 {
    try_enter(&ctx, RecvSyscall::Recvmsg);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_recvmmsg")]
pub fn recvmmsg_enter(ctx: TracePointContext) -> u32 {
    try_enter(&ctx, RecvSyscall::Recvmmsg);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvfrom")]
pub fn recvfrom_exit(ctx: TracePointContext) -> u32 {
    exit(field::<i64>(&ctx, EXIT_RET_OFFSET));
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvmsg")]
pub fn recvmsg_exit(ctx: TracePointContext) -> u32 {
    exit(field::<i64>(&ctx, EXIT_RET_OFFSET));
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvmmsg")]
pub fn recvmmsg_exit(ctx: TracePointContext) -> u32 {
    exit(field::<i64>(&ctx, EXIT_RET_OFFSET));
    0
}

/// Reads a tracepoint field with a direct context load (cheaper than a helper call).
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: offsets come from the tracepoint's format file and lie inside its record.
    unsafe { *(ctx.as_ptr().add(offset) as *const T) }
}

/// The current thread's slot, taken over if another thread owned it with no call in flight.
#[inline(always)]
fn claim_slot(tid: u32) -> Option<&'static mut RecvThread> {
    // SAFETY: array value pointer; a slot is written only by the thread that owns it.
    let thread = unsafe { &mut *RECV_THREADS.get_ptr_mut(tid % RECV_SLOTS as u32)? };
    if thread.tid != tid {
        if thread.start_ns != 0 {
            // Another thread's call is in flight here; it may be the hang we are looking for.
            count_drop(Drop::RecvSlotBusy);
            return None;
        }
        thread.tid = tid;
        thread.cached_file = 0;
        thread.cached_protocol = NOT_NETLINK;
    }
    Some(thread)
}

#[inline(always)]
fn try_enter(ctx: &TracePointContext, syscall: RecvSyscall) -> Option<()> {
    let fd = field::<u64>(ctx, ENTER_FD_OFFSET) as i32;
    let pid_tgid = bpf_get_current_pid_tgid();
    let thread = claim_slot(pid_tgid as u32)?;
    let file = current_file(fd).unwrap_or(0);
    if file != thread.cached_file {
        thread.cached_file = file;
        thread.cached_protocol = netlink_protocol(file);
    }
    let protocol = thread.cached_protocol;
    if protocol == NOT_NETLINK {
        thread.start_ns = 0;
        return None;
    }
    thread.tgid = (pid_tgid >> 32) as u32;
    thread.fd = fd;
    thread.protocol = protocol;
    thread.syscall = syscall as u32;
    // SAFETY: helper without preconditions.
    thread.start_ns = unsafe { bpf_ktime_get_ns() };
    Some(())
}

/// The netlink protocol of the socket behind `file`, or [`NOT_NETLINK`].
#[inline(always)]
fn netlink_protocol(file: u64) -> i32 {
    if file == 0 {
        return NOT_NETLINK;
    }
    let o = offsets();
    let Some(socket) = read::<u64>(file + o.file_private_data as u64) else {
        return NOT_NETLINK;
    };
    // A socket's file points back at it; other files' private_data is something else.
    if read::<u64>(socket + o.socket_file as u64) != Some(file) {
        return NOT_NETLINK;
    }
    let Some(sk) = read::<u64>(socket + o.socket_sk as u64) else {
        return NOT_NETLINK;
    };
    if read::<u16>(sk + o.sock_family as u64) != Some(AF_NETLINK) {
        return NOT_NETLINK;
    }
    match read::<u16>(sk + o.sock_protocol as u64) {
        Some(protocol) if (protocol as usize) < NETLINK_PROTOCOLS => protocol as i32,
        _ => NOT_NETLINK,
    }
}

// --- the end of a call, for every way in ---

/// The current thread's netlink call returned `ret`.
#[inline(always)]
fn exit(ret: i64) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    // SAFETY: array value pointer; a slot is written only by the thread that owns it.
    let thread = unsafe { &mut *RECV_THREADS.get_ptr_mut(tid % RECV_SLOTS as u32)? };
    let start_ns = thread.start_ns;
    if start_ns == 0 || thread.tid != tid {
        return None;
    }
    thread.start_ns = 0;
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let duration_ns = now.saturating_sub(start_ns);
    let protocol = thread.protocol;

    if let Some(histogram) = RECV_LATENCY.get_ptr_mut(protocol as u32) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        let histogram = unsafe { &mut *histogram };
        let bucket = (63 - duration_ns.max(1).leading_zeros()) as usize;
        let bucket = bucket.min(LATENCY_BUCKETS - 1);
        histogram.buckets[bucket] += 1;
        histogram.sum_ns += duration_ns;
    }

    if duration_ns < config().slow_recv_ns {
        return Some(());
    }
    let Some(mut event) = EVENTS.reserve::<SlowRecv>(0) else {
        count_drop(Drop::EventsRingFull);
        return None;
    };
    event.write(SlowRecv {
        header: EventHeader::new(EventKind::SlowRecv, pid_tgid, now),
        duration_ns,
        ret,
        fd: thread.fd,
        protocol,
        syscall: thread.syscall,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    });
    event.submit(0);
    Some(())
}
