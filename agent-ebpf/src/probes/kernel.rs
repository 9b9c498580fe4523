//! Reads of kernel memory shared by the probes, at offsets resolved from BTF at load time.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::config::offsets;

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

/// The `struct file *` behind `fd` in the current task's file table.
#[inline(always)]
pub fn current_file(fd: i32) -> Option<u64> {
    let o = offsets();
    let files: u64 = read(current_task() + o.task_struct_files as u64)?;
    let fdt: u64 = read(files + o.files_struct_fdt as u64)?;
    let max_fds: u32 = read(fdt + o.fdtable_max_fds as u64)?;
    if fd < 0 || fd as u32 >= max_fds {
        return None;
    }
    let fd_array: u64 = read(fdt + o.fdtable_fd as u64)?;
    read(fd_array + (fd as u64) * 8)
}
