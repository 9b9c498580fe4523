//! The kernel's `panic()` itself, where the kernel lets us attach to it: fentry, else kprobe.
//! The console tracepoint sees the panic line too; this fires first, before anything is printed.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use lastgasp_common::{Drop, EventHeader, EventKind, PanicCall, PanicProbe};

use crate::maps::{KERNEL_LOG, count_drop};

#[fentry(function = "panic")]
pub fn panic_fentry(ctx: FEntryContext) -> u32 {
    let format: *const u8 = ctx.arg(0);
    report(format, PanicProbe::Fentry);
    0
}

#[kprobe]
pub fn panic_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(format) = ctx.arg::<*const u8>(0) {
        report(format, PanicProbe::Kprobe);
    }
    0
}

#[inline(always)]
fn report(format: *const u8, probe: PanicProbe) -> Option<()> {
    let Some(mut event) = KERNEL_LOG.reserve::<PanicCall>(0) else {
        count_drop(Drop::KernelLogRingFull);
        return None;
    };
    // SAFETY: reserved ring-buffer memory, written field by field before submit.
    let call = unsafe { &mut *event.as_mut_ptr() };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    call.header = EventHeader::new(EventKind::PanicCall, bpf_get_current_pid_tgid(), now);
    call.probe = probe as u32;
    call._pad = 0;
    // SAFETY: reads a kernel string with fault handling.
    if unsafe { bpf_probe_read_kernel_str_bytes(format, &mut call.format) }.is_err() {
        call.format[0] = 0;
    }
    event.submit(BPF_RB_NO_WAKEUP as u64);
    Some(())
}
