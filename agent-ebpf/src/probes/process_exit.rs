//! Thread and process exits, from the `sched:sched_process_exit` tracepoint: frees the
//! thread's recv state, ends the CNI call of a plugin process, and records how a pod's
//! process ended.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use lastgasp_common::{CniExit, Drop, EventHeader, EventKind, ProcessExit, RECV_SLOTS};

use super::{
    kernel::{current_task, read},
    pod_cgroup,
};
use crate::{
    config::offsets,
    maps::{CNI_CALLS, EVENTS, RECV_THREADS, TERMINATIONS, count_drop},
};

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    try_exit();
    0
}

#[inline(always)]
fn try_exit() -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if let Some(slot) = RECV_THREADS.get_ptr_mut(tid % RECV_SLOTS as u32) {
        // SAFETY: array value pointer; the exiting thread owns its slot.
        let slot = unsafe { &mut *slot };
        if slot.tid == tid {
            slot.tid = 0;
            slot.start_ns = 0;
        }
    }
    // A process's CNI call, and a pod process, end when its thread-group leader exits.
    if tid != tgid {
        return None;
    }
    let exit_code: u32 = read(current_task() + offsets().task_struct_exit_code as u64).unwrap_or(0);
    end_cni_call(pid_tgid, exit_code);
    record_pod_exit(pid_tgid, exit_code)
}

#[inline(always)]
fn end_cni_call(pid_tgid: u64, exit_code: u32) -> Option<()> {
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: the value is only read to test presence.
    unsafe { CNI_CALLS.get(tgid) }?;
    let _ = CNI_CALLS.remove(tgid);
    let Some(mut event) = EVENTS.reserve::<CniExit>(0) else {
        count_drop(Drop::EventsRingFull);
        return None;
    };
    event.write(CniExit {
        // SAFETY: helper without preconditions.
        header: EventHeader::new(EventKind::CniExit, pid_tgid, unsafe { bpf_ktime_get_ns() }),
        exit_code,
        _pad: 0,
    });
    event.submit(0);
    Some(())
}

/// A pod process's exit. Its container's first process (whose parent is outside its cgroup:
/// the runtime's shim) always; any other only when a signal ended it, so that the clean
/// exits of a shell's children never reach userspace.
#[inline(always)]
fn record_pod_exit(pid_tgid: u64, exit_code: u32) -> Option<()> {
    if !pod_cgroup::enabled() {
        return None;
    }
    let task = current_task();
    let cgroup = pod_cgroup::task_cgroup(task)?;
    if !pod_cgroup::in_pod(cgroup) {
        return None;
    }
    let parent = pod_cgroup::parent_cgroup(task);
    let main_process = parent.is_none_or(|(_, parent_cgroup)| parent_cgroup != cgroup)
        && pod_cgroup::is_namespace_init_or_host(task);
    if !main_process && exit_code & 0x7f == 0 {
        return None;
    }
    let Some(mut event) = TERMINATIONS.reserve::<ProcessExit>(0) else {
        count_drop(Drop::TerminationsRingFull);
        return None;
    };
    // SAFETY: reserved ring-buffer memory, written field by field before submit.
    let exit = unsafe { &mut *event.as_mut_ptr() };
    // SAFETY: helper without preconditions.
    exit.header = EventHeader::new(EventKind::ProcessExit, pid_tgid, unsafe {
        bpf_ktime_get_ns()
    });
    exit.exit_code = exit_code;
    exit.parent_tgid = parent.map_or(0, |(tgid, _)| tgid);
    exit.main_process = main_process as u32;
    exit._pad = 0;
    exit.comm = pod_cgroup::task_comm(task);
    pod_cgroup::describe(cgroup, &mut exit.cgroup);
    // No wake-up: the agent drains this ring on a timer (see `maps::TERMINATIONS`).
    event.submit(BPF_RB_NO_WAKEUP as u64);
    Some(())
}
