//! Every map the programs share with each other and with userspace.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lastgasp_common::{
    DROP_KINDS, Drop, LatencyHistogram, NETLINK_PROTOCOLS, RECV_SLOTS, RecvThread,
};

/// Per-thread recv state, slot `tid % RECV_SLOTS`; userspace reads it through mmap.
#[map]
pub static RECV_THREADS: Array<RecvThread> =
    Array::with_max_entries(RECV_SLOTS as u32, BPF_F_MMAPABLE);

/// Completed netlink recv latencies, indexed by netlink protocol.
#[map]
pub static RECV_LATENCY: PerCpuArray<LatencyHistogram> =
    PerCpuArray::with_max_entries(NETLINK_PROTOCOLS as u32, 0);

/// In-flight CNI plugin processes: thread-group id → exec time.
#[map]
pub static CNI_CALLS: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

/// Slow recv calls and CNI exec/exit events.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Console lines and panic() calls; separate so a log storm cannot crowd out other events.
#[map]
pub static KERNEL_LOG: RingBuf = RingBuf::with_byte_size(2 << 20, 0);

/// Signals, OOM victims and exits of pod processes; separate so a signal storm in a pod
/// cannot crowd out the other events. Written without wake-ups (a wake-up per signal cost a
/// signalled pod process several microseconds): the agent drains it every 100 ms, so it holds
/// 100 ms of records, some 1400 signals.
#[map]
pub static TERMINATIONS: RingBuf = RingBuf::with_byte_size(512 << 10, 0);

/// Threads of pod processes sent the OOM killer's SIGKILL (`SI_KERNEL`), thread id → thread
/// group id, until `oom:mark_victim` names them (the kernel sends the signal first). LRU: a
/// kill whose mark never comes is forgotten, not kept.
#[map]
pub static OOM_PENDING: LruHashMap<u32, u32> = LruHashMap::with_max_entries(1024, 0);

/// The timestamp of the last panic() call whose last gasp the agent has sent; written by
/// userspace, read by the panic probe while it holds the dying CPU.
#[map]
pub static PANIC_ACK: Array<u64> = Array::with_max_entries(1, 0);

/// Size of each of the two entries of [`PANIC_HOLD_PACE`].
pub const PANIC_HOLD_PACE_BYTES: usize = 128 << 10;

/// Scratch memory that paces the panic hold on kernels without `bpf_loop`: each of its
/// bounded number of checks is followed by copies of entry 0 over entry 1 (a map update, a
/// `memcpy` in the kernel), so that the checks last long enough to cover the agent's poll
/// interval. Its contents mean nothing.
#[map]
pub static PANIC_HOLD_PACE: Array<[u8; PANIC_HOLD_PACE_BYTES]> = Array::with_max_entries(2, 0);

/// Events lost inside the kernel, indexed by [`Drop`].
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_KINDS as u32, 0);

#[inline(always)]
pub fn count_drop(kind: Drop) {
    if let Some(counter) = DROPS.get_ptr_mut(kind as u32) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}
