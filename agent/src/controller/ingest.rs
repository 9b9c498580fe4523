//! The two UDP inputs: the kernel's netconsole stream and the agents' last-gasp reports.
//! Both turn datagrams into [`Evidence`] for known nodes; everything else is counted and dropped.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::jiff::Timestamp;
use tokio::{net::UdpSocket, sync::mpsc};

use super::{
    cluster::ClusterCache,
    incidents::Evidence,
    metrics::{ChannelLabels, ControllerMetrics},
    netconsole::{KernelReport, Limits, PanicWatch, Reassembler, WatchLimits},
    reasons::Source,
};
use crate::{
    kernel_log::KernelEventKind,
    wire::{self, AuthKey, WireError},
};

const NETCONSOLE: &str = "netconsole";
const REPORT: &str = "report";
/// The `source` of the agent's delayed reports.
const PSTORE: &str = "pstore";

/// A delayed (pstore) report of a panic longer ago than this is logged and dropped: pods
/// running since then have long been restarted, and marking them now would mislead. An agent
/// installed on a node with an old record reports it too.
pub const DELAYED_REPORT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Receives netconsole datagrams; only those from a node's address, within its byte budget,
/// are parsed. Drops are counted in metrics and logged as one summary line per 10 s, not one
/// line each: a flood costs little more than reading it.
pub async fn netconsole(
    socket: UdpSocket,
    cluster: ClusterCache,
    evidence: mpsc::Sender<Evidence>,
    metrics: Arc<ControllerMetrics>,
) {
    use prometheus_client::metrics::counter::Counter;

    use super::{
        metrics::{DropLabels, KindFramingLabels},
        netconsole::{BudgetLimits, ByteBudget, DropSummary, MAX_PRINT_CHUNK},
    };
    // One byte more than the kernel ever sends: a larger datagram is cut to this, and
    // rejected as oversized without copying the rest of it.
    let mut buffer = vec![0u8; MAX_PRINT_CHUNK + 1];
    let mut reassembler = Reassembler::new(Limits::default());
    let mut watch: PanicWatch<String> = PanicWatch::new(WatchLimits::default());
    let mut budget = ByteBudget::new(BudgetLimits::default());
    let mut drops = DropSummary::new(Duration::from_secs(10), Instant::now());
    // Counters looked up once (a series appears with its first drop), not per datagram.
    let datagrams = metrics
        .datagrams
        .get_or_create(&ChannelLabels {
            channel: NETCONSOLE.into(),
        })
        .clone();
    let mut drop_counters: HashMap<&'static str, Counter> = HashMap::new();
    let mut dropped = |drops: &mut DropSummary, reason: &'static str, from: SocketAddr| {
        drop_counters
            .entry(reason)
            .or_insert_with(|| {
                metrics
                    .dropped
                    .get_or_create(&DropLabels {
                        channel: NETCONSOLE.into(),
                        reason: reason.into(),
                    })
                    .clone()
            })
            .inc();
        drops.count(reason, from);
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let reports = tokio::select! {
            ready = socket.readable() => {
                if ready.is_err() {
                    continue;
                }
                let mut reports: Vec<(String, KernelReport)> = Vec::new();
                // Drain what is queued without a wake-up per datagram (a flood must not
                // outrun the reading), a bounded batch so the tick still runs.
                for _ in 0..256 {
                    let (len, from) = match socket.try_recv_from(&mut buffer) {
                        Ok(received) => received,
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    datagrams.inc();
                    // The kernel never sends an empty one; an agent does, to make its kernel
                    // resolve the next hop's MAC for netconsole (agent/src/agent/netconsole/).
                    if len == 0 {
                        continue;
                    }
                    let Some(node) = cluster.node_by_address(from.ip()) else {
                        dropped(&mut drops, "unknown_sender", from);
                        continue;
                    };
                    if len > MAX_PRINT_CHUNK {
                        dropped(&mut drops, "oversized", from);
                        continue;
                    }
                    let now = Instant::now();
                    if !budget.admit(from.ip(), len, now) {
                        dropped(&mut drops, "rate_limited", from);
                        continue;
                    }
                    let Ok(records) = reassembler.push(from, &buffer[..len], now) else {
                        dropped(&mut drops, "unparsable", from);
                        continue;
                    };
                    let lines = records.iter().map(|record| record.lines().count()).sum();
                    budget.charge_lines(from.ip(), lines);
                    let before = watch.stats();
                    for record in &records {
                        reports.extend(watch.push(node.clone(), record, now));
                    }
                    let after = watch.stats();
                    if after.not_kernel_level > before.not_kernel_level {
                        dropped(&mut drops, "not_kernel_level", from);
                    } else if after.not_first_line > before.not_first_line {
                        dropped(&mut drops, "not_first_line", from);
                    }
                }
                reports
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let mut reports: Vec<(String, KernelReport)> = Vec::new();
                for (from, record) in reassembler.expire(now) {
                    if let Some(node) = cluster.node_by_address(from.ip()) {
                        reports.extend(watch.push(node, &record, now));
                    }
                }
                reports.extend(watch.poll(now));
                budget.forget_refilled(now);
                if let Some((counts, last_from, over)) = drops.take_due(now) {
                    tracing::warn!(%counts, %last_from, ?over, "netconsole datagrams dropped");
                }
                reports
            }
        };
        for (node, report) in reports {
            if report.complete {
                metrics
                    .netconsole_incidents
                    .get_or_create(&KindFramingLabels {
                        kind: report.kind.as_str().into(),
                        framing: report.framing.as_str().into(),
                    })
                    .inc();
            }
            // Each update of a panic adds context to its incident; a non-fatal failure is
            // only logged, so it goes once, complete, not once per context line.
            if !report.kind.is_fatal() && !report.complete {
                continue;
            }
            let evidence_item = Evidence {
                node,
                boot_id: None,
                source: Source::Netconsole,
                kind: report.kind,
                message: report.message,
                context: report.context,
                first_datagram: report.first_seen,
                panicked_at: None,
            };
            if evidence.send(evidence_item).await.is_err() {
                return;
            }
        }
    }
}

/// Remembers the highest sequence number accepted per (node, boot), so a captured datagram
/// sent again is rejected. Bounded: the oldest boots are forgotten first.
#[derive(Debug)]
pub struct ReplayGuard {
    highest: HashMap<(String, String), u64>,
    order: VecDeque<(String, String)>,
    capacity: usize,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> Self {
        Self {
            highest: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Accepts `seq` if it is above every one seen for this node and boot.
    pub fn accept(&mut self, node: &str, boot_id: &str, seq: u64) -> bool {
        let key = (node.to_owned(), boot_id.to_owned());
        match self.highest.get_mut(&key) {
            Some(highest) if seq <= *highest => false,
            Some(highest) => {
                *highest = seq;
                true
            }
            None => {
                if self.order.len() >= self.capacity
                    && let Some(oldest) = self.order.pop_front()
                {
                    self.highest.remove(&oldest);
                }
                self.order.push_back(key.clone());
                self.highest.insert(key, seq);
                true
            }
        }
    }
}

fn kind_of(report_kind: &str) -> Option<KernelEventKind> {
    KernelEventKind::ALL
        .into_iter()
        .find(|kind| kind.event_kind() == report_kind)
}

/// Receives last-gasp reports: authenticated, not replayed, about a known node.
pub async fn reports(
    socket: UdpSocket,
    key: AuthKey,
    cluster: ClusterCache,
    evidence: mpsc::Sender<Evidence>,
    metrics: Arc<ControllerMetrics>,
) {
    let mut replay = ReplayGuard::new(65536);
    let mut buffer = vec![0u8; 65536];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        let first_datagram = Instant::now();
        metrics
            .datagrams
            .get_or_create(&ChannelLabels {
                channel: REPORT.into(),
            })
            .inc();
        let report = match wire::decode(&buffer[..len], &key) {
            Ok(report) => report,
            Err(error) => {
                reject(&metrics, from, &error);
                continue;
            }
        };
        if cluster.node(&report.node).is_none() {
            tracing::warn!(%from, node = report.node, "report about a node that does not exist");
            metrics.drop_datagram(REPORT, "unknown_node");
            continue;
        }
        if !replay.accept(&report.node, &report.boot_id, report.seq) {
            tracing::warn!(%from, node = report.node, seq = report.seq, "replayed report rejected");
            metrics.drop_datagram(REPORT, "replay");
            continue;
        }
        let Some(kind) = kind_of(&report.kind) else {
            metrics.drop_datagram(REPORT, "unknown_kind");
            continue;
        };
        let (source, boot_id, panicked_at) = if report.source == PSTORE {
            // About an earlier boot: `boot_id` is the sender's boot, the crashed one is
            // `event_boot_id` (when the agent knew it), and the time is the record's.
            let Some(panicked_at) = report
                .event_at_ms
                .and_then(|ms| Timestamp::from_millisecond(ms as i64).ok())
            else {
                tracing::warn!(%from, node = report.node, "pstore report without a valid event_at_ms");
                metrics.drop_datagram(REPORT, "malformed");
                continue;
            };
            let age = Timestamp::now().duration_since(panicked_at);
            if age.as_secs_f64() > DELAYED_REPORT_MAX_AGE.as_secs_f64() {
                tracing::warn!(
                    %from,
                    node = report.node,
                    %panicked_at,
                    message = report.message,
                    "pstore report of a panic too long ago to act on"
                );
                metrics.drop_datagram(REPORT, "stale");
                continue;
            }
            (Source::Pstore, report.event_boot_id, Some(panicked_at))
        } else {
            (Source::Agent, Some(report.boot_id), None)
        };
        let evidence_item = Evidence {
            node: report.node,
            boot_id,
            source,
            kind,
            message: report.message,
            context: report.context,
            first_datagram,
            panicked_at,
        };
        if evidence.send(evidence_item).await.is_err() {
            return;
        }
    }
}

fn reject(metrics: &ControllerMetrics, from: SocketAddr, error: &WireError) {
    let reason = match error {
        WireError::BadMac => "bad_mac",
        WireError::AuthSchemeMismatch { .. } => "auth_scheme_mismatch",
        _ => "malformed",
    };
    tracing::warn!(%from, %error, "last-gasp datagram rejected");
    metrics.drop_datagram(REPORT, reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_guard_takes_each_sequence_once_and_forgets_oldest_boots() {
        let mut guard = ReplayGuard::new(2);
        assert!(guard.accept("a", "boot", 5));
        assert!(!guard.accept("a", "boot", 5));
        assert!(!guard.accept("a", "boot", 4));
        assert!(guard.accept("a", "boot", 6));
        assert!(guard.accept("a", "other-boot", 1));
        assert!(guard.accept("b", "boot", 1));
        // ("a", "boot") was the oldest and is forgotten.
        assert!(guard.accept("a", "boot", 1));
    }

    #[test]
    fn report_kinds_map_back_to_kernel_kinds() {
        assert_eq!(kind_of("kernel_panic"), Some(KernelEventKind::Panic));
        assert_eq!(
            kind_of("kernel_oom_kill"),
            Some(KernelEventKind::OutOfMemory)
        );
        assert_eq!(kind_of("nonsense"), None);
    }
}
