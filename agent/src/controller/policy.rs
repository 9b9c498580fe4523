//! How far the controller goes, and the circuit breaker that caps how many nodes it acts on.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Mark pods and the node (annotations, condition, Events) and delete nothing.
    Annotate,
    /// Mark, then delete the node's pods.
    DeletePods,
    /// Mark, delete the pods, then delete the node.
    #[default]
    DeletePodsAndNode,
}

/// What one incident's actions include, after policy and breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub delete_pods: bool,
    pub delete_node: bool,
}

impl Plan {
    pub fn from_policy(policy: Policy) -> Self {
        Self {
            delete_pods: policy != Policy::Annotate,
            delete_node: policy == Policy::DeletePodsAndNode,
        }
    }

    pub const MARK_ONLY: Self = Self {
        delete_pods: false,
        delete_node: false,
    };
}

/// Lets at most `max_nodes` incidents per `window` delete anything; past that, incidents are
/// only marked, so a bug or a flood of forged reports cannot empty the cluster.
#[derive(Debug)]
pub struct CircuitBreaker {
    max_nodes: usize,
    window: Duration,
    admitted: VecDeque<Instant>,
}

impl CircuitBreaker {
    pub fn new(max_nodes: usize, window: Duration) -> Self {
        Self {
            max_nodes,
            window,
            admitted: VecDeque::new(),
        }
    }

    /// Whether a node may be acted on now; counts it if so.
    pub fn admit(&mut self, now: Instant) -> bool {
        while self
            .admitted
            .front()
            .is_some_and(|&at| now.duration_since(at) >= self.window)
        {
            self.admitted.pop_front();
        }
        if self.admitted.len() >= self.max_nodes {
            return false;
        }
        self.admitted.push_back(now);
        true
    }

    pub fn is_open(&self, now: Instant) -> bool {
        self.admitted
            .iter()
            .filter(|&&at| now.duration_since(at) < self.window)
            .count()
            >= self.max_nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_plans() {
        assert_eq!(Plan::from_policy(Policy::Annotate), Plan::MARK_ONLY);
        assert!(Plan::from_policy(Policy::DeletePods).delete_pods);
        assert!(!Plan::from_policy(Policy::DeletePods).delete_node);
        assert!(Plan::from_policy(Policy::DeletePodsAndNode).delete_node);
    }

    #[test]
    fn breaker_caps_nodes_per_window() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(2, Duration::from_secs(60));
        assert!(breaker.admit(start));
        assert!(breaker.admit(start + Duration::from_secs(1)));
        assert!(breaker.is_open(start + Duration::from_secs(2)));
        assert!(!breaker.admit(start + Duration::from_secs(2)));
        assert!(breaker.admit(start + Duration::from_secs(61)));
    }
}
