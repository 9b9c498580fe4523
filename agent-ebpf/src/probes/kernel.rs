//! Reads of kernel memory shared by the probes, at offsets resolved from BTF at load time.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel};

use lastgasp_common::helpers;

use crate::config::{config, offsets};

/// Reads a `T` at kernel address `addr`; `None` if the read faults.
#[inline(always)]
pub fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copies with fault handling; any address is safe to try.
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_task() }
}

/// Loads a `T` at `offset` from a pointer the verifier knows by its BTF type. The load is
/// inlined (no helper call) and a fault reads zeros; the offset is a constant from `CONFIG`.
#[inline(always)]
pub fn load<T: Copy>(base: u64, offset: u32) -> T {
    // SAFETY: `base` comes from BTF-typed kernel pointers; the verifier checks the access
    // against the type and the JIT turns a fault into zeros.
    unsafe { *((base + offset as u64) as *const T) }
}

/// The `struct file *` behind `fd` in the current task's file table.
///
/// With `bpf_get_current_task_btf` the walk is inlined loads from BTF-typed pointers; without
/// it (before Linux 5.11), `bpf_probe_read_kernel` calls at the same offsets.
#[inline(always)]
pub fn current_file(fd: i32) -> Option<u64> {
    let typed = has_helper(helpers::CURRENT_TASK_BTF);
    let task = if typed {
        // SAFETY: helper without preconditions; the result is a trusted BTF pointer.
        unsafe { bpf_get_current_task_btf() as u64 }
    } else {
        current_task()
    };
    let o = offsets();
    let files: u64 = member(typed, task, o.task_struct_files)?;
    if files == 0 {
        return None;
    }
    let fdt: u64 = member(typed, files, o.files_struct_fdt)?;
    if fdt == 0 {
        return None;
    }
    let max_fds: u32 = member(typed, fdt, o.fdtable_max_fds)?;
    if fd < 0 || fd as u32 >= max_fds {
        return None;
    }
    let fd_array: u64 = member(typed, fdt, o.fdtable_fd)?;
    read(fd_array + (fd as u64) * 8)
}

/// Whether the kernel has the optional helper `bit` (see [`helpers`]). The verifier knows
/// the answer while verifying, so a call behind a clear bit is never checked nor kept.
#[inline(always)]
pub fn has_helper(bit: u32) -> bool {
    config().helpers & bit != 0
}

/// A member of the structure at `base`: an inlined load if `base` is BTF-typed, else a read.
#[inline(always)]
fn member<T: Copy>(typed: bool, base: u64, offset: u32) -> Option<T> {
    if typed {
        Some(load(base, offset))
    } else {
        read(base + offset as u64)
    }
}
