//! Signals sent to processes of pods, from the `signal:signal_generate` tracepoint as a BTF
//! tracepoint (`tp_btf`, Linux 5.5+).
//!
//! The tracepoint runs in the sender's context and its classic form names the target by pid
//! and comm only; the filter needs the target's cgroup. The BTF form gets the target's
//! `struct task_struct *` as an argument, so the target's cgroup is read directly: no map of
//! pod processes to fill at fork and exec (which would cost every fork on the node, and miss
//! processes started before the agent). It is also cheaper than the classic form, which
//! formats a trace record before calling the program.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use lastgasp_common::{Drop, EventHeader, EventKind, SignalSent};

use super::{
    kernel::{current_task, read},
    pod_cgroup,
};
use crate::{
    config::config,
    maps::{OOM_PENDING, TERMINATIONS, count_drop},
};

const SIGKILL: i32 = 9;
/// `si_code` of a signal the kernel sends on its own behalf (the OOM killer's SIGKILL).
const SI_KERNEL: i32 = 0x80;
/// `si_code` of kill(2).
const SI_USER: i32 = 0;
/// The kernel's `SEND_SIG_NOINFO` and `SEND_SIG_PRIV`: `info` values that are no pointer.
const SEND_SIG_NOINFO: u64 = 0;
const SEND_SIG_PRIV: u64 = 1;

/// The signals recorded: those whose default action ends the process (SIGHUP to SIGTERM,
/// SIGSTKFLT, SIGXCPU, SIGXFSZ, SIGPWR, SIGSYS), except the periodic ones that programs
/// handle (SIGALRM, SIGVTALRM, SIGPROF, SIGIO) and so could flood the ring. Job-control and
/// notification signals (SIGCHLD, SIGCONT, SIGSTOP, SIGURG — Go's preemption signal —,
/// SIGWINCH, ...) and real-time signals never end a process by default and are not recorded.
const RECORDED: u64 = bits(&[
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 24, 25, 30, 31,
]);

const fn bits(signals: &[u32]) -> u64 {
    let mut mask = 0;
    let mut i = 0;
    while i < signals.len() {
        mask |= 1 << signals[i];
        i += 1;
    }
    mask
}

/// `TP_PROTO(int sig, struct kernel_siginfo *info, struct task_struct *task, int group,
/// int result)` in include/trace/events/signal.h.
#[btf_tracepoint(function = "signal_generate")]
pub fn signal_generate(ctx: BtfTracePointContext) -> u32 {
    try_signal(&ctx);
    0
}

#[inline(always)]
fn try_signal(ctx: &BtfTracePointContext) -> Option<()> {
    if !pod_cgroup::enabled() {
        return None;
    }
    let sig: i32 = ctx.arg(0);
    if !(1..64).contains(&sig) || RECORDED & (1 << sig) == 0 {
        return None;
    }
    let task: u64 = ctx.arg(2);
    let target_cgroup = pod_cgroup::task_cgroup(task)?;
    if !pod_cgroup::in_pod(target_cgroup) {
        return None;
    }
    // As the tracepoint's TP_STORE_SIGINFO reads it.
    let info: u64 = ctx.arg(1);
    let code = match info {
        SEND_SIG_NOINFO => SI_USER,
        SEND_SIG_PRIV => SI_KERNEL,
        info => read::<i32>(info + config().pod_cgroups.offsets.kernel_siginfo_code as u64)
            .unwrap_or(SI_USER),
    };
    let (target_tid, target_tgid) = pod_cgroup::task_ids(task);
    if sig == SIGKILL && code == SI_KERNEL {
        let _ = OOM_PENDING.insert(target_tid, target_tgid, 0);
    }

    let Some(mut event) = TERMINATIONS.reserve::<SignalSent>(0) else {
        count_drop(Drop::TerminationsRingFull);
        return None;
    };
    // SAFETY: reserved ring-buffer memory, written field by field before submit.
    let sent = unsafe { &mut *event.as_mut_ptr() };
    // SAFETY: helpers without preconditions.
    let (pid_tgid, now) = (bpf_get_current_pid_tgid(), unsafe { bpf_ktime_get_ns() });
    sent.header = EventHeader::new(EventKind::SignalSent, pid_tgid, now);
    sent.sig = sig;
    sent.code = code;
    sent.group = ctx.arg(3);
    sent.result = ctx.arg(4);
    sent.target_tid = target_tid;
    sent.target_tgid = target_tgid;
    sent._pad = 0;
    sent.target_comm = pod_cgroup::task_comm(task);
    pod_cgroup::describe(target_cgroup, &mut sent.target_cgroup);
    let sender = current_task();
    sent.sender_comm = pod_cgroup::task_comm(sender);
    sent.sender_in_pod = 0;
    match pod_cgroup::task_cgroup(sender) {
        Some(cgroup) if pod_cgroup::in_pod(cgroup) => {
            sent.sender_in_pod = 1;
            pod_cgroup::describe(cgroup, &mut sent.sender_cgroup);
        }
        _ => {
            sent.sender_cgroup.id = 0;
            sent.sender_cgroup.parent_id = 0;
            sent.sender_cgroup.name = [0; lastgasp_common::CGROUP_NAME_LEN];
        }
    }
    // No wake-up: the agent drains this ring on a timer (see `maps::TERMINATIONS`).
    event.submit(BPF_RB_NO_WAKEUP as u64);
    Some(())
}
