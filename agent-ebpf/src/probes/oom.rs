//! OOM victims that are processes of pods, from the `oom:mark_victim` tracepoint.
//!
//! The tracepoint's fields changed with Linux 6.9 (only `pid` before; comm, memory, uid and
//! `oom_score_adj` since): the agent reads their offsets from the tracepoint's format file and
//! passes them in `CONFIG`. The filter is the signal probe's: the OOM killer sends its SIGKILL
//! before it marks the victim, and the signal probe notes the pod processes it went to.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::tracepoint,
    programs::TracePointContext,
};
use lastgasp_common::{
    Drop, EventHeader, EventKind, NO_FIELD, OomVictim, TASK_COMM_LEN, oom_present,
};

use crate::{
    config::config,
    maps::{OOM_PENDING, TERMINATIONS, count_drop},
};

#[tracepoint(category = "oom", name = "mark_victim")]
pub fn mark_victim(ctx: TracePointContext) -> u32 {
    try_mark_victim(&ctx);
    0
}

/// The field at `offset` of the tracepoint's record, if the kernel has it.
#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    if offset == NO_FIELD {
        return None;
    }
    // SAFETY: an offset from the tracepoint's format file, read with fault handling.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

#[inline(always)]
fn try_mark_victim(ctx: &TracePointContext) -> Option<()> {
    let fields = &config().oom_victim;
    let tid: u32 = field(ctx, fields.pid)?;
    // SAFETY: the value is copied out at once.
    let tgid = unsafe { OOM_PENDING.get(tid) }.copied()?;
    let _ = OOM_PENDING.remove(tid);

    let Some(mut event) = TERMINATIONS.reserve::<OomVictim>(0) else {
        count_drop(Drop::TerminationsRingFull);
        return None;
    };
    // SAFETY: reserved ring-buffer memory, written field by field before submit.
    let victim = unsafe { &mut *event.as_mut_ptr() };
    // SAFETY: helpers without preconditions.
    let (pid_tgid, now) = (bpf_get_current_pid_tgid(), unsafe { bpf_ktime_get_ns() });
    victim.header = EventHeader::new(EventKind::OomVictim, pid_tgid, now);
    victim.tid = tid;
    victim.tgid = tgid;
    victim.present = 0;
    victim._pad = 0;
    let rss = (
        field::<u64>(ctx, fields.total_vm),
        field::<u64>(ctx, fields.anon_rss),
        field::<u64>(ctx, fields.file_rss),
        field::<u64>(ctx, fields.shmem_rss),
        field::<u64>(ctx, fields.pgtables),
    );
    (
        victim.total_vm_kb,
        victim.anon_rss_kb,
        victim.file_rss_kb,
        victim.shmem_rss_kb,
        victim.pgtables_kb,
    ) = (0, 0, 0, 0, 0);
    if let (Some(total_vm), Some(anon), Some(file), Some(shmem), Some(pgtables)) = rss {
        victim.present |= oom_present::RSS;
        victim.total_vm_kb = total_vm;
        victim.anon_rss_kb = anon;
        victim.file_rss_kb = file;
        victim.shmem_rss_kb = shmem;
        victim.pgtables_kb = pgtables;
    }
    victim.uid = 0;
    if let Some(uid) = field::<u32>(ctx, fields.uid) {
        victim.present |= oom_present::UID;
        victim.uid = uid;
    }
    victim.oom_score_adj = 0;
    if let Some(adj) = field::<i16>(ctx, fields.oom_score_adj) {
        victim.present |= oom_present::SCORE_ADJ;
        victim.oom_score_adj = adj as i32;
    }
    victim.comm = [0; TASK_COMM_LEN];
    // A `__data_loc`: low 16 bits the string's offset in the record.
    if let Some(loc) = field::<u32>(ctx, fields.comm) {
        let at = ctx.as_ptr() as usize + (loc & 0xffff) as usize;
        // SAFETY: reads the tracepoint record's string with fault handling.
        if unsafe { bpf_probe_read_kernel_str_bytes(at as *const u8, &mut victim.comm) }.is_ok() {
            victim.present |= oom_present::COMM;
        }
    }
    // No wake-up: the agent drains this ring on a timer (see `maps::TERMINATIONS`).
    event.submit(BPF_RB_NO_WAKEUP as u64);
    Some(())
}
