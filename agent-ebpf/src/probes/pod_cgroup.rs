//! The in-kernel filter of the termination probes: is a task in a pod's cgroup?
//!
//! The agent passes the kernfs id (the directory's inode number) and level of each pod cgroup
//! root (`kubepods`, `kubepods.slice`, ...) in one hierarchy: the unified one, or a v1
//! controller's (on a v1 or hybrid host, kubelet's cgroupfs driver makes `kubepods` in each).
//! A task is a pod's when its cgroup in that hierarchy (`css_set.dfl_cgrp`, or
//! `css_set.subsys[id].cgroup`) lies below a root: its ancestor at the root's level is the
//! root. Ancestors are an array indexed by level in every cgroup, so the test is a few reads
//! and no walk.

use aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes;
use lastgasp_common::{CGROUP_NAME_LEN, CgroupRef, POD_CGROUP_ROOTS, PodCgroups, TASK_COMM_LEN};

use super::kernel::read;
use crate::config::config;

#[inline(always)]
fn pods() -> &'static PodCgroups {
    &config().pod_cgroups
}

/// Whether the agent configured any pod cgroup root (and found the offsets to test them).
#[inline(always)]
pub fn enabled() -> bool {
    pods().count != 0
}

/// The task's `struct cgroup *` in the pod roots' hierarchy.
#[inline(always)]
pub fn task_cgroup(task: u64) -> Option<u64> {
    let pods = pods();
    let o = &pods.offsets;
    let css_set: u64 = read(task + o.task_struct_cgroups as u64)?;
    if pods.hierarchy == 0 {
        return read(css_set + o.css_set_dfl_cgrp as u64);
    }
    let subsys = css_set + o.css_set_subsys as u64 + (pods.hierarchy as u64 - 1) * 8;
    let css: u64 = read(subsys)?;
    read(css + o.cgroup_subsys_state_cgroup as u64)
}

/// A cgroup's kernfs id.
#[inline(always)]
fn kernfs_id(cgroup: u64) -> Option<u64> {
    let o = &pods().offsets;
    let kn: u64 = read(cgroup + o.cgroup_kn as u64)?;
    read(kn + o.kernfs_node_id as u64)
}

/// The kernfs id of the cgroup's ancestor at `level` (its own at its level).
#[inline(always)]
fn ancestor_id(cgroup: u64, level: u32) -> Option<u64> {
    let o = &pods().offsets;
    let slot = cgroup + o.cgroup_ancestors as u64 + level as u64 * 8;
    if o.ancestors_are_ids != 0 {
        read(slot)
    } else {
        kernfs_id(read(slot)?)
    }
}

/// Whether the cgroup lies strictly below one of the pod roots.
#[inline(always)]
pub fn in_pod(cgroup: u64) -> bool {
    let pods = pods();
    let Some(level) = read::<i32>(cgroup + pods.offsets.cgroup_level as u64) else {
        return false;
    };
    for root in pods.roots.iter().take(POD_CGROUP_ROOTS) {
        if root.id == 0 {
            break;
        }
        if level > root.level as i32 && ancestor_id(cgroup, root.level) == Some(root.id) {
            return true;
        }
    }
    false
}

/// Fills `out` with the cgroup's id, its parent's and its directory name.
#[inline(always)]
pub fn describe(cgroup: u64, out: &mut CgroupRef) {
    let o = &pods().offsets;
    out.id = kernfs_id(cgroup).unwrap_or(0);
    out.parent_id = 0;
    if let Some(level) = read::<i32>(cgroup + o.cgroup_level as u64)
        && level > 0
        && level < 256
    {
        out.parent_id = ancestor_id(cgroup, level as u32 - 1).unwrap_or(0);
    }
    out.name = [0; CGROUP_NAME_LEN];
    let name = read::<u64>(cgroup + o.cgroup_kn as u64)
        .and_then(|kn| read::<u64>(kn + o.kernfs_node_name as u64));
    if let Some(name) = name {
        // SAFETY: copies a kernel string with fault handling into a buffer we own.
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut out.name) };
    }
}

/// A task's pid (thread id) and thread group id.
#[inline(always)]
pub fn task_ids(task: u64) -> (u32, u32) {
    let o = &pods().offsets;
    (
        read::<u32>(task + o.task_struct_pid as u64).unwrap_or(0),
        read::<u32>(task + o.task_struct_tgid as u64).unwrap_or(0),
    )
}

/// Whether the task is pid 1 of its pid namespace, or in the initial one (level 0).
#[inline(always)]
pub fn is_namespace_init_or_host(task: u64) -> bool {
    let o = &pods().offsets;
    let Some(pid) = read::<u64>(task + o.task_struct_thread_pid as u64) else {
        return false;
    };
    let Some(level) = read::<u32>(pid + o.pid_level as u64) else {
        return false;
    };
    if level == 0 {
        return true;
    }
    let nr = pid + o.pid_numbers as u64 + (level.min(64) as u64) * o.upid_size as u64;
    read::<i32>(nr) == Some(1)
}

/// A task's comm.
#[inline(always)]
pub fn task_comm(task: u64) -> [u8; TASK_COMM_LEN] {
    read(task + pods().offsets.task_struct_comm as u64).unwrap_or([0; TASK_COMM_LEN])
}

/// The cgroup of the task's parent (`real_parent`), in the same hierarchy.
#[inline(always)]
pub fn parent_cgroup(task: u64) -> Option<(u32, u64)> {
    let parent: u64 = read(task + pods().offsets.task_struct_real_parent as u64)?;
    Some((task_ids(parent).1, task_cgroup(parent)?))
}
