//! The kernel's `panic()` itself, where the kernel lets us attach to it: fentry, else kprobe.
//! The console tracepoint sees the panic line too; this fires first, before anything is printed.
//!
//! A panicking CPU turns its interrupts off and, a few milliseconds later, stops every other
//! CPU, so the agent's userspace may never run again. The probe therefore holds the dying CPU,
//! spinning for at most `panic_hold_ns`, until the agent writes the call's timestamp into
//! `PANIC_ACK`: it has sent its last gasp. Other CPUs keep running meanwhile. The record
//! carries the kernel stack at `panic()`, which the agent names with `/proc/kallsyms`.
//!
//! Each way in comes twice: holding with `bpf_loop` (Linux 5.17), and, where that helper is
//! missing, with a loop the verifier walks through, which holds for at most
//! [`BOUNDED_HOLD_ITERATIONS`] checks, each followed by [`PACE_COPIES`] copies within a
//! scratch map to make them last. The loader picks one by probing for `bpf_loop`: a program
//! referring to its callback cannot even be loaded by an older kernel.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_stack, bpf_loop},
    },
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use lastgasp_common::{Drop, EventHeader, EventKind, PANIC_STACK_DEPTH, PanicCall, PanicProbe};

use crate::{
    config::config,
    maps::{KERNEL_LOG, PANIC_ACK, PANIC_HOLD_PACE, count_drop},
};

/// `bpf_loop`'s own limit on iterations; the time limit normally ends the loop first.
const MAX_HOLD_ITERATIONS: u32 = 1 << 23;

/// Checks of the hold without `bpf_loop`. The verifier walks every iteration, each with
/// its own state (the counter differs). The 5.10 verifier refused this loop at 4096
/// iterations once each carried the copies below (why is unknown: its log outgrew the
/// loader's largest buffer); at 1024 it loads.
const BOUNDED_HOLD_ITERATIONS: u32 = 1024;

/// Copies within [`PANIC_HOLD_PACE`] after each check of the bounded hold, to make the
/// checks last. A check alone (the clock and one load) is short: 4096 of them held a TCG
/// guest's CPU for under 7 ms, far short of the agent's 25 ms poll interval. Each copy is a
/// map update, a `memcpy` of [`PANIC_HOLD_PACE_BYTES`](crate::maps::PANIC_HOLD_PACE_BYTES),
/// a few instructions and no branch for the verifier (`bpf_probe_read_kernel` of the same
/// size, at 4096 iterations, was refused as well). Unacknowledged, 1024 checks held a 5.10
/// TCG guest for 212 ms; on hardware, copying 512 KiB per check should take tens of
/// microseconds, so tens of milliseconds in all (not measured). The deadline check still
/// ends the hold at `--panic-hold`.
const PACE_COPIES: usize = 4;

/// How the probe holds the dying CPU.
#[derive(Clone, Copy)]
enum HoldWith {
    BpfLoop,
    BoundedLoop,
}

#[fentry(function = "panic")]
pub fn panic_fentry(ctx: FEntryContext) -> u32 {
    let format: *const u8 = ctx.arg(0);
    try_panic(ctx.as_ptr(), format, PanicProbe::Fentry, HoldWith::BpfLoop);
    0
}

#[fentry(function = "panic")]
pub fn panic_fentry_bounded(ctx: FEntryContext) -> u32 {
    let format: *const u8 = ctx.arg(0);
    try_panic(
        ctx.as_ptr(),
        format,
        PanicProbe::Fentry,
        HoldWith::BoundedLoop,
    );
    0
}

#[kprobe]
pub fn panic_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(format) = ctx.arg::<*const u8>(0) {
        try_panic(ctx.as_ptr(), format, PanicProbe::Kprobe, HoldWith::BpfLoop);
    }
    0
}

#[kprobe]
pub fn panic_kprobe_bounded(ctx: ProbeContext) -> u32 {
    if let Some(format) = ctx.arg::<*const u8>(0) {
        try_panic(
            ctx.as_ptr(),
            format,
            PanicProbe::Kprobe,
            HoldWith::BoundedLoop,
        );
    }
    0
}

#[inline(always)]
fn try_panic(ctx: *mut c_void, format: *const u8, probe: PanicProbe, with: HoldWith) {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if report(ctx, format, probe, now).is_some() {
        match with {
            HoldWith::BpfLoop => hold(now),
            HoldWith::BoundedLoop => hold_bounded(now),
        }
    }
}

#[inline(always)]
fn report(ctx: *mut c_void, format: *const u8, probe: PanicProbe, now: u64) -> Option<()> {
    let Some(mut event) = KERNEL_LOG.reserve::<PanicCall>(0) else {
        count_drop(Drop::KernelLogRingFull);
        return None;
    };
    // SAFETY: reserved ring-buffer memory, written field by field before submit.
    let call = unsafe { &mut *event.as_mut_ptr() };
    call.header = EventHeader::new(EventKind::PanicCall, bpf_get_current_pid_tgid(), now);
    call.probe = probe as u32;
    // SAFETY: reads a kernel string with fault handling.
    if unsafe { bpf_probe_read_kernel_str_bytes(format, &mut call.format) }.is_err() {
        call.format[0] = 0;
    }
    // The kernel stack (flags 0), so the agent can name the function that failed even when
    // the console says nothing useful. SAFETY: `ctx` is this program's context and `stack`
    // is reserved memory of the size given.
    let filled = unsafe {
        bpf_get_stack(
            ctx,
            call.stack.as_mut_ptr().cast(),
            (PANIC_STACK_DEPTH * 8) as u32,
            0,
        )
    };
    call.stack_bytes = u32::try_from(filled).unwrap_or(0);
    event.submit(BPF_RB_NO_WAKEUP as u64);
    Some(())
}

/// What one step of the hold loop compares against.
#[repr(C)]
struct Hold {
    /// The panic() call's timestamp, which the agent echoes back.
    called_at: u64,
    deadline: u64,
}

#[inline(always)]
fn hold(called_at: u64) {
    let hold_ns = config().panic_hold_ns;
    if hold_ns == 0 {
        return;
    }
    let mut hold = Hold {
        called_at,
        deadline: called_at.saturating_add(hold_ns),
    };
    // SAFETY: `hold_step` has the callback signature bpf_loop expects and only reads `hold`,
    // which lives on this stack for the whole call.
    unsafe {
        bpf_loop(
            MAX_HOLD_ITERATIONS,
            hold_step as *mut c_void,
            (&raw mut hold).cast(),
            0,
        )
    };
}

/// Returns 1 (stop) once the agent has acknowledged this call or the deadline has passed.
#[inline(never)]
extern "C" fn hold_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `hold` gave it.
    let hold = unsafe { &*ctx.cast::<Hold>() };
    let acknowledged = PANIC_ACK
        .get_ptr(0)
        // SAFETY: a valid map value; volatile because userspace writes it concurrently.
        .map_or(0, |ack| unsafe { core::ptr::read_volatile(ack) });
    i64::from(released(hold, acknowledged))
}

/// The hold without `bpf_loop`: the same check, at most [`BOUNDED_HOLD_ITERATIONS`] times.
#[inline(always)]
fn hold_bounded(called_at: u64) {
    let hold_ns = config().panic_hold_ns;
    if hold_ns == 0 {
        return;
    }
    let hold = Hold {
        called_at,
        deadline: called_at.saturating_add(hold_ns),
    };
    // Looked up once, outside the loop: each branch the loop adds is one more for the
    // verifier to walk per iteration.
    let Some(ack) = PANIC_ACK.get_ptr(0) else {
        return;
    };
    let Some(pace) = PANIC_HOLD_PACE.get_ptr(0) else {
        return;
    };
    // SAFETY: a valid map value, only ever read as the source of a copy.
    let pace = unsafe { &*pace };
    for _ in 0..BOUNDED_HOLD_ITERATIONS {
        // SAFETY: a valid map value; volatile because userspace writes it concurrently.
        let acknowledged = unsafe { core::ptr::read_volatile(ack) };
        if released(&hold, acknowledged) {
            return;
        }
        for _ in 0..PACE_COPIES {
            // Only the time it takes matters; an update of an existing array entry succeeds.
            let _ = PANIC_HOLD_PACE.set(1, pace, 0);
        }
    }
}

/// Whether the agent has acknowledged this call or the deadline has passed.
#[inline(always)]
fn released(hold: &Hold, acknowledged: u64) -> bool {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    acknowledged >= hold.called_at || now >= hold.deadline
}
