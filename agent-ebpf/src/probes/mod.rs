//! One file per kernel hook.

pub mod cni_exec;
pub mod console;
pub mod kernel;
pub mod netlink_recv;
pub mod oom;
pub mod panic;
pub mod pod_cgroup;
pub mod process_exit;
pub mod signal;
