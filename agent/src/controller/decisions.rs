//! The decision stage, without a server: evidence in, [`Command`]s for the node executors out.
//! It merges evidence into incidents, applies the policy and the circuit breaker, and counts
//! what it saw; the caller runs the commands (`super::Decisions`).

use std::{sync::Arc, time::Instant};

use super::{
    actions::StoredIncident,
    incidents::{Evidence, Incident, Incidents, Observed},
    metrics::{ControllerMetrics, KindSourceLabels},
    policy::{CircuitBreaker, Plan, Policy},
};

/// What the executors are to do.
#[derive(Debug)]
pub enum Command {
    /// Run the incident with this plan on its node's executor, replacing what it ran.
    Execute { incident: Incident, plan: Plan },
    /// The incident the node's executor runs has changed: run it again, with its plan.
    Update(Incident),
}

/// What the decider needs to know of the node an evidence is about.
#[derive(Debug, Default)]
pub struct NodeState {
    /// The incident recorded on the Node by a controller that acted on it, if any.
    pub stored: Option<StoredIncident>,
    /// The id of the incident this process' executor for the node is running, if one runs.
    pub running: Option<String>,
}

pub struct Decider {
    incidents: Incidents,
    breaker: CircuitBreaker,
    policy: Policy,
    metrics: Arc<ControllerMetrics>,
}

impl Decider {
    pub fn new(policy: Policy, breaker: CircuitBreaker, metrics: Arc<ControllerMetrics>) -> Self {
        Self {
            incidents: Incidents::default(),
            breaker,
            policy,
            metrics,
        }
    }

    /// Takes back an incident recorded on a node: a restart finishes the job with the plan
    /// decided then.
    pub fn resume(&mut self, stored: StoredIncident, now: Instant) -> Command {
        tracing::info!(
            node = stored.record.node,
            id = stored.record.id,
            "resuming incident"
        );
        Command::Execute {
            incident: self.incidents.resume(stored.record, now),
            plan: stored.plan.into(),
        }
    }

    /// Forgets incidents past the merge window.
    pub fn expire(&mut self, now: Instant) {
        self.incidents.expire(now);
    }

    pub fn breaker_open(&self, now: Instant) -> bool {
        self.breaker.is_open(now)
    }

    /// What to do about `evidence`. `node` is read only when needed (a delayed report the
    /// controller does not remember, or a merge).
    pub fn decide(
        &mut self,
        evidence: Evidence,
        node: impl FnOnce() -> NodeState,
        now: Instant,
    ) -> Option<Command> {
        let labels = KindSourceLabels {
            kind: evidence.kind.as_str().into(),
            source: evidence.source.as_str().into(),
        };
        self.metrics.kernel_reports.get_or_create(&labels).inc();
        if !evidence.kind.is_fatal() {
            tracing::warn!(
                node = evidence.node,
                kind = evidence.kind.as_str(),
                message = evidence.message,
                "non-fatal kernel failure reported; the node is left alone"
            );
            return None;
        }
        let source = evidence.source;
        let delayed = evidence.is_delayed();
        let known = self.incidents.knows(&evidence);
        let named_before = self.incidents.culprit_named(&evidence);
        // Read the node only if an unknown delayed report or a merge needs it.
        let mut node = Some(node);
        let mut state = || node.take().map(|read| read()).unwrap_or_default();
        let mut node_state = None;
        // A delayed report may be about an incident acted on longer ago than this process
        // remembers (or by another process): the node's record of it says.
        let mut recorded_plan = None;
        if delayed && !known {
            let read = node_state.insert(state());
            if let Some(stored) = read.stored.take()
                && stored.record.matches(&evidence)
            {
                recorded_plan = Some(Plan::from(stored.plan));
                self.incidents.resume(stored.record, now);
            }
        }
        let (observed, incident) = self.incidents.observe(evidence);
        // Each node's crash counts once under its signature, when its culprit is first named.
        if let Some(crash) = incident.record.crash.as_ref()
            && let Some(culprit) = crash.culprit.as_deref()
            && !named_before
        {
            self.metrics
                .count_crash(&crash.kind, culprit, crash.kernel_release.as_deref());
        }
        let record = &incident.record;
        match observed {
            Observed::New if delayed => {
                // The node is back up and its pods restarted: mark what the panic disrupted,
                // delete nothing (README, "Delayed reports").
                self.metrics.incidents.get_or_create(&labels).inc();
                tracing::error!(
                    node = record.node,
                    id = record.id,
                    panicked_at = ?record.panicked_at,
                    message = record.message,
                    "kernel panic before the node's reboot, recovered from pstore: marking"
                );
                Some(Command::Execute {
                    incident,
                    plan: Plan::MARK_ONLY,
                })
            }
            Observed::New => {
                self.metrics.incidents.get_or_create(&labels).inc();
                let plan = if self.breaker.admit(now) {
                    Plan::from_policy(self.policy)
                } else {
                    self.metrics.breaker_held_back.inc();
                    tracing::warn!(
                        node = record.node,
                        "circuit breaker open: marking only, nothing is deleted"
                    );
                    Plan::MARK_ONLY
                };
                tracing::error!(
                    node = record.node,
                    id = record.id,
                    source = source.as_str(),
                    message = record.message,
                    "kernel panic: acting on the node"
                );
                Some(Command::Execute { incident, plan })
            }
            Observed::Merged {
                new_source,
                changed: true,
            } => {
                if new_source {
                    self.metrics.incidents.get_or_create(&labels).inc();
                    tracing::info!(
                        node = record.node,
                        source = source.as_str(),
                        "another channel confirms the incident"
                    );
                }
                let node = node_state.unwrap_or_else(state);
                match node.running {
                    Some(running) if running == record.id => Some(Command::Update(incident)),
                    // An older incident of the node: remembered, its marks stay.
                    Some(_) => None,
                    // Acted on by another process: write the new source with the recorded
                    // plan, which touches only what existed at the panic.
                    None => Some(Command::Execute {
                        incident,
                        plan: recorded_plan.unwrap_or(Plan::MARK_ONLY),
                    }),
                }
            }
            Observed::Merged { changed: false, .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::jiff::Timestamp;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        controller::{actions::StoredPlan, reasons::Source, trust::Tier},
        kernel_log::KernelEventKind,
    };

    fn decider(max_nodes: usize) -> Decider {
        let metrics = ControllerMetrics::register(&mut Registry::default());
        Decider::new(
            Policy::default(),
            CircuitBreaker::new(max_nodes, Duration::from_secs(600)),
            metrics,
        )
    }

    fn evidence(node: &str, source: Source, at: Instant) -> Evidence {
        Evidence {
            node: node.into(),
            boot_id: Some("boot-1".into()),
            source,
            tier: Tier::PanicProbe,
            kind: KernelEventKind::Panic,
            message: "Kernel panic - not syncing: Fatal exception".into(),
            context: Vec::new(),
            crash: None,
            first_datagram: at,
            panicked_at: None,
        }
    }

    fn unread() -> NodeState {
        panic!("the node was read without need")
    }

    fn plan_of(command: Option<Command>) -> Plan {
        match command {
            Some(Command::Execute { plan, .. }) => plan,
            other => panic!("not an Execute: {other:?}"),
        }
    }

    #[test]
    fn a_new_panic_runs_the_policy_until_the_breaker_opens() {
        let mut decider = decider(2);
        let now = Instant::now();
        let policy = Plan::from_policy(Policy::default());
        for node in ["a", "b"] {
            let command = decider.decide(evidence(node, Source::Agent, now), unread, now);
            assert_eq!(plan_of(command), policy, "{node}");
        }
        let third = decider.decide(evidence("c", Source::Agent, now), unread, now);
        assert_eq!(plan_of(third), Plan::MARK_ONLY);
        assert!(decider.breaker_open(now));
    }

    #[test]
    fn non_fatal_reports_and_repeats_decide_nothing() {
        let mut decider = decider(10);
        let now = Instant::now();
        let warning = Evidence {
            kind: KernelEventKind::HungTask,
            ..evidence("a", Source::Netconsole, now)
        };
        assert!(decider.decide(warning, unread, now).is_none());
        assert!(
            decider
                .decide(evidence("a", Source::Agent, now), unread, now)
                .is_some()
        );
        let repeat = decider.decide(evidence("a", Source::Agent, now), unread, now);
        assert!(repeat.is_none(), "{repeat:?}");
    }

    #[test]
    fn a_second_channel_updates_the_running_executor_or_starts_one() {
        let mut decider = decider(10);
        let now = Instant::now();
        let Some(Command::Execute { incident, .. }) =
            decider.decide(evidence("a", Source::Agent, now), unread, now)
        else {
            panic!("a new incident executes");
        };
        let running = || NodeState {
            stored: None,
            running: Some(incident.record.id.clone()),
        };
        match decider.decide(evidence("a", Source::Netconsole, now), running, now) {
            Some(Command::Update(updated)) => {
                assert_eq!(updated.record.id, incident.record.id);
                assert_eq!(updated.record.sources.len(), 2);
            }
            other => panic!("not an Update: {other:?}"),
        }
        // No executor runs it (another replica acted): the new source is only marked.
        let mut decider = self::decider(10);
        decider.decide(evidence("a", Source::Agent, now), unread, now);
        let merged = decider.decide(
            evidence("a", Source::Netconsole, now),
            NodeState::default,
            now,
        );
        assert_eq!(plan_of(merged), Plan::MARK_ONLY);
    }

    #[test]
    fn a_delayed_report_marks_only_unless_the_node_recorded_a_plan() {
        let mut decider = decider(10);
        let now = Instant::now();
        let panicked_at: Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        let delayed = Evidence {
            source: Source::Pstore,
            tier: Tier::KernelRecord,
            panicked_at: Some(panicked_at),
            ..evidence("a", Source::Pstore, now)
        };
        let first = decider.decide(delayed.clone(), NodeState::default, now);
        assert_eq!(plan_of(first), Plan::MARK_ONLY);

        // Acted on by an earlier process, which recorded its plan on the node: the pstore
        // source is written with that plan.
        let mut decider = self::decider(10);
        let mut record = match decider.decide(evidence("a", Source::Agent, now), unread, now) {
            Some(Command::Execute { incident, .. }) => incident.record,
            other => panic!("{other:?}"),
        };
        record.panicked_at = Some(panicked_at);
        let mut fresh = self::decider(10);
        let stored = || NodeState {
            stored: Some(StoredIncident {
                record: record.clone(),
                plan: StoredPlan {
                    delete_pods: true,
                    delete_node: false,
                },
            }),
            running: None,
        };
        let recorded = fresh.decide(delayed, stored, now);
        assert_eq!(
            plan_of(recorded),
            Plan {
                delete_pods: true,
                delete_node: false
            }
        );
    }
}
