//! Empty programs on the same tracepoints as the recv probes: the baseline of the
//! probe-cost benchmark, measuring what a tracepoint program costs before it does anything.
#![no_std]
#![no_main]

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

#[tracepoint(category = "syscalls", name = "sys_enter_recvfrom")]
pub fn empty_recvfrom_enter(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvfrom")]
pub fn empty_recvfrom_exit(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_recvmsg")]
pub fn empty_recvmsg_enter(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvmsg")]
pub fn empty_recvmsg_exit(_ctx: TracePointContext) -> u32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
