//! Every line the kernel writes to its consoles, from the `printk:console` tracepoint.
//! Classification happens in userspace, with the one classifier the controller also uses.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use lastgasp_common::{CONSOLE_LINE_LEN, ConsoleLine, Drop, EventHeader, EventKind};

use crate::maps::{KERNEL_LOG, count_drop};

/// `msg` in /sys/kernel/tracing/events/printk/console/format
/// ("field:__data_loc char[] msg; offset:8; size:4"): low 16 bits offset, high 16 bits length.
const MSG_LOC_OFFSET: usize = 8;

#[tracepoint(category = "printk", name = "console")]
pub fn console(ctx: TracePointContext) -> u32 {
    try_console(&ctx);
    0
}

#[inline(always)]
fn try_console(ctx: &TracePointContext) -> Option<()> {
    // SAFETY: offset from the tracepoint's format file, inside its record.
    let loc = unsafe { *(ctx.as_ptr().add(MSG_LOC_OFFSET) as *const u32) };
    let msg = ctx.as_ptr() as usize + (loc & 0xffff) as usize;
    let len = (loc >> 16) as usize;

    let Some(mut event) = KERNEL_LOG.reserve::<ConsoleLine>(0) else {
        count_drop(Drop::KernelLogRingFull);
        return None;
    };
    // SAFETY: reserved ring-buffer memory, written field by field before submit.
    let line = unsafe { &mut *event.as_mut_ptr() };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    line.header = EventHeader::new(EventKind::ConsoleLine, bpf_get_current_pid_tgid(), now);
    line.len = len as u32;
    line._pad = 0;
    // The verifier must see the copy's size bounded on the very register passed to the
    // helper: a constant for long lines, a mask the compiler cannot drop for short ones.
    let copied = if len >= CONSOLE_LINE_LEN {
        // SAFETY: copies the tracepoint record's text with fault handling.
        unsafe { bpf_probe_read_kernel_buf(msg as *const u8, &mut line.text) }
    } else {
        let short = core::hint::black_box(len) & (CONSOLE_LINE_LEN - 1);
        // SAFETY: as above; `short` < CONSOLE_LINE_LEN.
        unsafe { bpf_probe_read_kernel_buf(msg as *const u8, &mut line.text[..short]) }
    };
    if len == 0 || copied.is_err() {
        event.discard(0);
        return None;
    }
    // No wake-up: the reader drains the ring on a short timer, so a log storm costs the
    // agent one wake-up per tick instead of one per line.
    event.submit(BPF_RB_NO_WAKEUP as u64);
    Some(())
}
