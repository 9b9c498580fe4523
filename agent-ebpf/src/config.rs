//! The read-only `CONFIG` global, filled in by the loader before verification.

use lastgasp_common::{
    CNI_DIR_LEN, CNI_DIRS, CgroupOffsets, CniDir, KernelOffsets, OomVictimFields, POD_CGROUP_ROOTS,
    PodCgroupRoot, PodCgroups, ProbeConfig, RecvSyscallNumbers,
};

#[unsafe(no_mangle)]
static CONFIG: ProbeConfig = ProbeConfig {
    offsets: KernelOffsets {
        task_struct_files: 0,
        task_struct_mm: 0,
        task_struct_exit_code: 0,
        files_struct_fdt: 0,
        fdtable_max_fds: 0,
        fdtable_fd: 0,
        file_private_data: 0,
        socket_file: 0,
        socket_sk: 0,
        sock_family: 0,
        sock_protocol: 0,
        mm_struct_env_start: 0,
        mm_struct_env_end: 0,
        pt_regs_syscall_nr: 0,
        pt_regs_arg0: 0,
    },
    helpers: 0,
    slow_recv_ns: u64::MAX,
    panic_hold_ns: 0,
    cni_dirs: [CniDir {
        len: 0,
        path: [0; CNI_DIR_LEN],
    }; CNI_DIRS],
    recv_syscalls: RecvSyscallNumbers::NONE,
    pod_cgroups: PodCgroups {
        offsets: CgroupOffsets {
            task_struct_pid: 0,
            task_struct_tgid: 0,
            task_struct_comm: 0,
            task_struct_real_parent: 0,
            task_struct_cgroups: 0,
            css_set_dfl_cgrp: 0,
            css_set_subsys: 0,
            cgroup_subsys_state_cgroup: 0,
            cgroup_level: 0,
            cgroup_kn: 0,
            cgroup_ancestors: 0,
            ancestors_are_ids: 0,
            kernfs_node_id: 0,
            kernfs_node_name: 0,
            kernel_siginfo_code: 0,
            task_struct_thread_pid: 0,
            pid_level: 0,
            pid_numbers: 0,
            upid_size: 0,
        },
        hierarchy: 0,
        count: 0,
        roots: [PodCgroupRoot {
            id: 0,
            level: 0,
            _pad: 0,
        }; POD_CGROUP_ROOTS],
    },
    oom_victim: OomVictimFields::NONE,
};

/// Reads the global through a volatile load so the compiler cannot fold in the defaults above.
#[inline(always)]
pub fn config() -> &'static ProbeConfig {
    // SAFETY: CONFIG is a valid static; the volatile read only defeats constant folding.
    unsafe { &*core::ptr::read_volatile(&&raw const CONFIG) }
}

#[inline(always)]
pub fn offsets() -> &'static KernelOffsets {
    &config().offsets
}
