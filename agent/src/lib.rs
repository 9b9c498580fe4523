//! lastgasp: an eBPF node agent and Kubernetes controller that explain why nodes die or hang.

pub mod agent;
pub mod controller;
pub mod health;
pub mod kernel_log;
pub mod kube_events;
#[cfg(test)]
mod kube_mock;
pub mod kube_retry;
pub mod metrics;
pub mod procfs;
pub mod supervise;
pub mod telemetry;
pub mod wire;
