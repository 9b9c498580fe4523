//! Thread and process exits, from the `sched:sched_process_exit` tracepoint: frees the
//! thread's recv state and ends the CNI call of a plugin process.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use lastgasp_common::{CniExit, Drop, EventHeader, EventKind, RECV_SLOTS};

use super::kernel::{current_task, read};
use crate::{
    config::offsets,
    maps::{CNI_CALLS, EVENTS, RECV_THREADS, count_drop},
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
    // A process's CNI call ends when its thread-group leader exits.
    if tid != tgid {
        return None;
    }
    // SAFETY: the value is only read to test presence.
    unsafe { CNI_CALLS.get(tgid) }?;
    let _ = CNI_CALLS.remove(tgid);
    let exit_code: u32 = read(current_task() + offsets().task_struct_exit_code as u64).unwrap_or(0);
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
