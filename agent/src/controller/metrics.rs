//! The controller's Prometheus metrics.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindSourceLabels {
    pub kind: String,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindFramingLabels {
    pub kind: String,
    pub framing: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    pub channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub channel: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub object: String,
}

/// A crash signature's labels: the same bug on many nodes is one series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CrashLabels {
    pub kind: String,
    pub culprit: String,
    pub kernel_release: String,
}

/// Distinct crash signatures with a series of their own; later ones count as `other`, so a
/// fleet of random crashes (or forged ones) cannot grow the metric without bound.
pub const MAX_CRASH_SIGNATURES: usize = 50;

pub struct ControllerMetrics {
    pub incidents: Family<KindSourceLabels, Counter>,
    pub kernel_reports: Family<KindSourceLabels, Counter>,
    pub netconsole_incidents: Family<KindFramingLabels, Counter>,
    pub marked: Family<ObjectLabels, Counter>,
    pub deleted: Family<ObjectLabels, Counter>,
    pub time_to_last_write: Histogram,
    pub datagrams: Family<ChannelLabels, Counter>,
    pub dropped: Family<DropLabels, Counter>,
    pub write_retries: Counter,
    pub breaker_open: Gauge,
    pub breaker_held_back: Counter,
    pub leader: Gauge,
    pub crashes: Family<CrashLabels, Counter>,
    pub executor_panics: Counter,
    /// The signatures that have their own series (at most [`MAX_CRASH_SIGNATURES`]).
    crash_signatures: Mutex<HashSet<CrashLabels>>,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self {
            incidents: Family::default(),
            kernel_reports: Family::default(),
            netconsole_incidents: Family::default(),
            marked: Family::default(),
            deleted: Family::default(),
            // 10 ms to ~5.5 min.
            time_to_last_write: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            datagrams: Family::default(),
            dropped: Family::default(),
            write_retries: Counter::default(),
            breaker_open: Gauge::default(),
            breaker_held_back: Counter::default(),
            leader: Gauge::default(),
            crashes: Family::default(),
            executor_panics: Counter::default(),
            crash_signatures: Mutex::new(HashSet::new()),
        };
        registry.register(
            "controller_incidents",
            "Node incidents (kernel panics) opened, by kind and by each channel that reported them",
            metrics.incidents.clone(),
        );
        registry.register(
            "controller_kernel_reports",
            "Kernel failures reported for known nodes, fatal or not, by kind and channel",
            metrics.kernel_reports.clone(),
        );
        registry.register(
            "controller_netconsole_incidents",
            "Kernel failures recognised on a node's netconsole stream, by kind and by the framing \
             of the line that opened them (extended_record: the first line of a kernel record at \
             the kernel's level; plain_line: a plain console line)",
            metrics.netconsole_incidents.clone(),
        );
        registry.register(
            "controller_marked_objects",
            "Pods and nodes given a termination reason",
            metrics.marked.clone(),
        );
        registry.register(
            "controller_deleted_objects",
            "Pods and nodes deleted",
            metrics.deleted.clone(),
        );
        registry.register(
            "controller_incident_last_write_seconds",
            "Time from an incident's first datagram to its last Kubernetes write",
            metrics.time_to_last_write.clone(),
        );
        registry.register(
            "controller_datagrams_received",
            "UDP datagrams received, by channel (netconsole, report)",
            metrics.datagrams.clone(),
        );
        registry.register(
            "controller_datagrams_dropped",
            "UDP datagrams dropped, by channel and reason. For netconsole, not_first_line and \
             not_kernel_level count datagrams whose failure line was refused as a trigger (the \
             rest of their text may still be context of an open incident)",
            metrics.dropped.clone(),
        );
        registry.register(
            "controller_write_retries",
            "Kubernetes writes retried after a transient error",
            metrics.write_retries.clone(),
        );
        registry.register(
            "controller_circuit_breaker_open",
            "1 while the circuit breaker holds back deletions",
            metrics.breaker_open.clone(),
        );
        registry.register(
            "controller_circuit_breaker_held_back",
            "Incidents only marked because the circuit breaker was open",
            metrics.breaker_held_back.clone(),
        );
        registry.register(
            "controller_leader",
            "1 while this replica is the leader and may write",
            metrics.leader.clone(),
        );
        registry.register(
            "controller_crashes",
            "Node crashes by signature (kind, culprit function, kernel release), counted once the \
             culprit is named; the first 50 signatures have their own series, later ones other",
            metrics.crashes.clone(),
        );
        registry.register(
            "controller_executor_panics",
            "Incident executors that panicked, leaving their node's incident unfinished",
            metrics.executor_panics.clone(),
        );
        Arc::new(metrics)
    }

    /// Counts one node's crash under its signature, or under `other` once
    /// [`MAX_CRASH_SIGNATURES`] signatures have their series.
    pub fn count_crash(&self, kind: &str, culprit: &str, kernel_release: Option<&str>) {
        let labels = CrashLabels {
            kind: kind.to_owned(),
            culprit: culprit.to_owned(),
            kernel_release: kernel_release.unwrap_or("unknown").to_owned(),
        };
        let mut signatures = self.crash_signatures.lock().expect("crash signatures lock");
        let labels = if signatures.contains(&labels) || signatures.len() < MAX_CRASH_SIGNATURES {
            signatures.insert(labels.clone());
            labels
        } else {
            CrashLabels {
                kind: "other".into(),
                culprit: "other".into(),
                kernel_release: "other".into(),
            }
        };
        self.crashes.get_or_create(&labels).inc();
    }

    pub fn drop_datagram(&self, channel: &str, reason: &str) {
        self.dropped
            .get_or_create(&DropLabels {
                channel: channel.into(),
                reason: reason.into(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_signatures_are_bounded() {
        let metrics = ControllerMetrics::register(&mut Registry::default());
        for n in 0..MAX_CRASH_SIGNATURES + 10 {
            metrics.count_crash("oops", &format!("f{n}"), Some("6.1.0-57-cloud-amd64"));
        }
        metrics.count_crash("oops", "f0", Some("6.1.0-57-cloud-amd64"));
        let series = |culprit: &str| {
            metrics
                .crashes
                .get_or_create(&CrashLabels {
                    kind: if culprit == "other" { "other" } else { "oops" }.into(),
                    culprit: culprit.into(),
                    kernel_release: if culprit == "other" {
                        "other".into()
                    } else {
                        "6.1.0-57-cloud-amd64".into()
                    },
                })
                .get()
        };
        assert_eq!(series("f0"), 2, "a known signature keeps its series");
        assert_eq!(series("other"), 10);
    }
}
