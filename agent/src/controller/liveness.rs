//! Whether a node is dead, judged by this controller's own clock, never by the node's.
//!
//! Two signals, either enough:
//! - the node's heartbeat Lease (`kube-node-lease/<node>`): its `renewTime` seen unchanged for
//!   `--node-dead-after`, timed from when this controller last saw it change (as client-go's
//!   leader election times another holder's lease), so clock skew between the kubelet and the
//!   controller cannot make a live node look dead. A missing or unreadable Lease proves nothing.
//!   The first reading counts as a change: a node is never dead sooner than `--node-dead-after`
//!   after the controller started looking.
//! - the node's `Ready` condition not True with the reason the node lifecycle controller writes
//!   when the kubelet stopped posting status (`NodeStatusUnknown`).

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Node},
    jiff::Timestamp,
};
use kube::{Api, Client};

/// The reason kube-controller-manager's node lifecycle controller gives a node whose kubelet
/// stopped posting status.
pub const NODE_STATUS_UNKNOWN: &str = "NodeStatusUnknown";

/// Times a Lease's `renewTime` from this controller's observations of it.
#[derive(Debug)]
pub struct HeartbeatClock {
    last_seen: Option<Timestamp>,
    changed_at: Instant,
}

impl HeartbeatClock {
    /// Starts timing at `now`: a renewal seen for the first time counts as a change.
    pub fn new(now: Instant) -> Self {
        Self {
            last_seen: None,
            changed_at: now,
        }
    }

    /// Records `renew_time` as read at `now`.
    pub fn observe(&mut self, renew_time: Timestamp, now: Instant) {
        if self.last_seen != Some(renew_time) {
            self.last_seen = Some(renew_time);
            self.changed_at = now;
        }
    }

    /// How long the Lease has been seen unchanged; `None` before it was seen at all.
    pub fn silent_for(&self, now: Instant) -> Option<Duration> {
        self.last_seen?;
        Some(now.duration_since(self.changed_at))
    }
}

/// Whether the node lifecycle controller has marked the node's kubelet as gone.
pub fn not_ready_by_lifecycle_controller(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|condition| {
            condition.type_ == "Ready"
                && condition.status != "True"
                && condition.reason.as_deref() == Some(NODE_STATUS_UNKNOWN)
        })
}

/// The node Lease's `renewTime`, `Ok(None)` when the Lease or the field is missing.
pub async fn lease_renew_time(
    client: &Client,
    node: &str,
) -> Result<Option<Timestamp>, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    Ok(leases
        .get_opt(node)
        .await?
        .and_then(|lease| lease.spec)
        .and_then(|spec| spec.renew_time)
        .map(|time| time.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_timed_from_the_last_change_seen() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let renewed: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut clock = HeartbeatClock::new(start);
        assert_eq!(clock.silent_for(at(5)), None, "no Lease seen: no verdict");
        clock.observe(renewed, at(6));
        clock.observe(renewed, at(16));
        assert_eq!(clock.silent_for(at(16)), Some(Duration::from_secs(10)));
        // A renewal, whatever time it names (a skewed kubelet clock included), restarts it.
        let skewed: Timestamp = "2020-01-01T00:00:00Z".parse().unwrap();
        clock.observe(skewed, at(18));
        assert_eq!(clock.silent_for(at(26)), Some(Duration::from_secs(8)));
    }

    #[test]
    fn only_the_lifecycle_controllers_verdict_counts() {
        let node = |status: &str, reason: &str| -> Node {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "n" },
                "status": { "conditions": [
                    { "type": "Ready", "status": status, "reason": reason }
                ]}
            }))
            .unwrap()
        };
        assert!(not_ready_by_lifecycle_controller(&node(
            "Unknown",
            NODE_STATUS_UNKNOWN
        )));
        // The kubelet itself reporting NotReady is alive enough to report.
        assert!(!not_ready_by_lifecycle_controller(&node(
            "False",
            "KubeletNotReady"
        )));
        assert!(!not_ready_by_lifecycle_controller(&node(
            "True",
            "KubeletReady"
        )));
    }
}
