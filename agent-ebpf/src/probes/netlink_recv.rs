//! Netlink recv calls in flight, from the `syscalls` tracepoints of recvfrom, recvmsg and recvmmsg.
//!
//! Enter: classify the socket (cached per thread), and for netlink remember when the call began.
//! Exit: feed the latency histogram; send calls slower than `slow_recv_ns` to userspace.
//! Userspace scans `RECV_THREADS` for calls still in flight: that is where hangs are found.
//! The per-thread slot is an array element updated in place: the verifier inlines array
//! lookups, so a call costs no helper call for its state and no map insert or delete.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use lastgasp_common::{
    Drop, EventHeader, EventKind, LATENCY_BUCKETS, NETLINK_PROTOCOLS, NOT_NETLINK, RECV_SLOTS,
    RecvSyscall, SlowRecv,
};

use super::kernel::{current_file, read};
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
    try_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvmsg")]
pub fn recvmsg_exit(ctx: TracePointContext) -> u32 {
    try_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvmmsg")]
pub fn recvmmsg_exit(ctx: TracePointContext) -> u32 {
    try_exit(&ctx);
    0
}

/// Reads a tracepoint field with a direct context load (cheaper than a helper call).
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: offsets come from the tracepoint's format file and lie inside its record.
    unsafe { *(ctx.as_ptr().add(offset) as *const T) }
}

#[inline(always)]
fn try_enter(ctx: &TracePointContext, syscall: RecvSyscall) -> Option<()> {
    let fd = field::<u64>(ctx, ENTER_FD_OFFSET) as i32;
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
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

#[inline(always)]
fn try_exit(ctx: &TracePointContext) -> Option<()> {
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
        ret: field::<i64>(ctx, EXIT_RET_OFFSET),
        fd: thread.fd,
        protocol,
        syscall: thread.syscall,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    });
    event.submit(0);
    Some(())
}
