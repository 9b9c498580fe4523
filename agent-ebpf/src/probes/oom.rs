//! OOM victims that are processes of pods, from the `oom:mark_victim` tracepoint.
//!
//! The tracepoint's fields changed with Linux 6.9 (only `pid` before; comm, memory, uid and
//! `oom_score_adj` since; the probe reads the RSS and the score): the agent reads their offsets from the tracepoint's format file and
//! passes them in `CONFIG`. The filter is the signal probe's: the OOM killer sends its SIGKILL
//! before it marks the victim, and the signal probe notes the pod processes it went to.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use lastgasp_common::{Drop, EventHeader, EventKind, NO_FIELD, OomVictim, oom_present};

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
    victim.anon_rss_kb = 0;
    victim.file_rss_kb = 0;
    victim.shmem_rss_kb = 0;
    let rss = (
        field::<u64>(ctx, fields.anon_rss),
        field::<u64>(ctx, fields.file_rss),
        field::<u64>(ctx, fields.shmem_rss),
    );
    if let (Some(anon), Some(file), Some(shmem)) = rss {
        victim.present |= oom_present::RSS;
        victim.anon_rss_kb = anon;
        victim.file_rss_kb = file;
        victim.shmem_rss_kb = shmem;
    }
    victim.oom_score_adj = 0;
    if let Some(adj) = field::<i16>(ctx, fields.oom_score_adj) {
        victim.present |= oom_present::SCORE_ADJ;
        victim.oom_score_adj = adj as i32;
    }
    // No wake-up: the agent drains this ring on a timer (see `maps::TERMINATIONS`).
    event.submit(BPF_RB_NO_WAKEUP as u64);
    Some(())
}
