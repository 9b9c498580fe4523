//! One file per kernel hook.

pub mod cni_exec;
pub mod console;
pub mod kernel;
pub mod netlink_recv;
pub mod panic;
pub mod process_exit;
