//! Execs of CNI plugins, from the `sched:sched_process_exec` tracepoint.
//!
//! The new program's environment is copied here, before the plugin runs a single
//! instruction, so even a plugin that exits within a millisecond keeps its
//! `CNI_COMMAND`, `CNI_CONTAINERID` and `CNI_ARGS`.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user_buf,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use lastgasp_common::{
    CNI_DIR_LEN, CNI_DIRS, CNI_ENV_LEN, CniExec, Drop, EventHeader, EventKind, FILENAME_LEN,
};

use super::kernel::{current_task, read};
use crate::{
    config::{config, offsets},
    maps::{CNI_CALLS, EVENTS, count_drop},
};

/// `filename` in /sys/kernel/tracing/events/sched/sched_process_exec/format
/// ("field:__data_loc char[] filename; offset:8; size:4"): low 16 bits offset, high 16 bits length.
const FILENAME_LOC_OFFSET: usize = 8;

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    try_exec(&ctx);
    0
}

#[inline(always)]
fn try_exec(ctx: &TracePointContext) -> Option<()> {
    // SAFETY: offset from the tracepoint's format file, inside its record.
    let loc = unsafe { *(ctx.as_ptr().add(FILENAME_LOC_OFFSET) as *const u32) };
    let filename_ptr = ctx.as_ptr() as usize + (loc & 0xffff) as usize;

    let mut filename = [0u8; FILENAME_LEN];
    // SAFETY: reads the tracepoint record's string with fault handling.
    let filename_len =
        unsafe { bpf_probe_read_kernel_str_bytes(filename_ptr as *const u8, &mut filename) }
            .ok()?
            .len();
    if !in_cni_dir(&filename) {
        return None;
    }

    let Some(mut event) = EVENTS.reserve::<CniExec>(0) else {
        count_drop(Drop::EventsRingFull);
        return None;
    };
    // SAFETY: reserved ring-buffer memory, written field by field before submit.
    let exec = unsafe { &mut *event.as_mut_ptr() };
    // SAFETY: as above, straight into the event.
    if unsafe { bpf_probe_read_kernel_str_bytes(filename_ptr as *const u8, &mut exec.filename) }
        .is_err()
    {
        event.discard(0);
        return None;
    }

    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if CNI_CALLS.insert(tgid, now, 0).is_err() {
        count_drop(Drop::CniCallsFull);
        warn!(
            ctx,
            "CNI call table full: the exit of pid {} will not be seen", tgid
        );
    }
    exec.header = EventHeader::new(EventKind::CniExec, pid_tgid, now);
    exec.filename_len = filename_len as u32;
    exec._pad = 0;
    copy_environment(exec);
    event.submit(0);
    Some(())
}

/// Whether `filename` starts with one of the configured directories (each ends in `/`).
#[inline(always)]
fn in_cni_dir(filename: &[u8; FILENAME_LEN]) -> bool {
    let dirs = &config().cni_dirs;
    for dir in dirs.iter().take(CNI_DIRS) {
        let len = dir.len as usize;
        if len == 0 || len > CNI_DIR_LEN {
            continue;
        }
        let matched = filename
            .iter()
            .zip(dir.path.iter())
            .take(len)
            .all(|(name, prefix)| name == prefix);
        if matched {
            return true;
        }
    }
    false
}

/// Copies the current task's environment block (its tail, if longer than the buffer).
#[inline(always)]
fn copy_environment(exec: &mut CniExec) {
    exec.env_len = 0;
    exec.env_truncated = 0;
    let o = offsets();
    let Some(mm) = read::<u64>(current_task() + o.task_struct_mm as u64) else {
        return;
    };
    let (Some(start), Some(end)) = (
        read::<u64>(mm + o.mm_struct_env_start as u64),
        read::<u64>(mm + o.mm_struct_env_end as u64),
    ) else {
        return;
    };
    if end <= start {
        return;
    }
    let mut len = end - start;
    let mut from = start;
    if len > CNI_ENV_LEN as u64 {
        from = end - CNI_ENV_LEN as u64;
        len = CNI_ENV_LEN as u64;
        exec.env_truncated = 1;
    }
    let len = len as usize;
    if len == 0 || len > CNI_ENV_LEN {
        return;
    }
    // SAFETY: copies user memory with fault handling into the reserved buffer.
    if unsafe { bpf_probe_read_user_buf(from as *const u8, &mut exec.env[..len]) }.is_ok() {
        exec.env_len = len as u32;
    }
}
