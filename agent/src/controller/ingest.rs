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
    netconsole::{Framing, KernelReport, Limits, PanicWatch, Reassembler, WatchLimits},
    reasons::{Crash, Source},
    trust::{Freshness, Tier, freshness},
};
use crate::{
    kernel_log::{self, Frame, KernelEventKind},
    wire::{self, AuthKey, ReportKind, ReportSource, WireError},
};

const NETCONSOLE: &str = "netconsole";
const REPORT: &str = "report";

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
                // Netconsole carries no authentication: at best the kernel's own record.
                tier: match report.framing {
                    Framing::ExtendedRecord => Tier::KernelRecord,
                    Framing::PlainLine => Tier::ConsoleText,
                },
                crash: report.crash.as_ref().map(Crash::new),
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

/// Receives last-gasp reports: authenticated, fresh, not replayed, from an address of the known
/// node they name, for a boot that node has.
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
        match admit(&report, from, &key, &cluster) {
            Ok(admitted) => {
                if !replay.accept(&report.node, &report.boot_id, report.seq) {
                    tracing::debug!(%from, node = report.node, seq = report.seq, "replayed report rejected");
                    metrics.drop_datagram(REPORT, "replay");
                    continue;
                }
                let crash = report_crash(&report);
                let evidence_item = Evidence {
                    node: report.node,
                    boot_id: admitted.boot_id,
                    source: admitted.source,
                    tier: admitted.tier,
                    crash,
                    kind: admitted.kind,
                    message: report.message,
                    context: report.context,
                    first_datagram,
                    panicked_at: admitted.panicked_at,
                };
                if evidence.send(evidence_item).await.is_err() {
                    return;
                }
            }
            Err(reason) => {
                tracing::debug!(%from, node = report.node, reason = reason.as_str(), "report dropped");
                metrics.drop_datagram(REPORT, reason.as_str());
            }
        }
    }
}

/// The crash title of a report: from its console lines (the message and the context that came
/// with it) when they hold a report, else from the stack the `panic()` probe took.
fn report_crash(report: &wire::Report) -> Option<Crash> {
    let lines =
        std::iter::once(report.message.as_str()).chain(report.context.iter().map(String::as_str));
    let console = kernel_log::crash_title(lines);
    if console
        .as_ref()
        .is_some_and(|title| title.culprit.is_some())
    {
        return console.as_ref().map(Crash::new);
    }
    let frames: Vec<Frame> = report
        .frames
        .iter()
        .filter_map(|line| Frame::parse(line))
        .collect();
    if frames.is_empty() || report.kind != ReportKind::KernelPanic {
        return console.as_ref().map(Crash::new);
    }
    let message = report
        .message
        .split_once("Kernel panic - not syncing: ")
        .map_or(report.message.as_str(), |(_, message)| message);
    Some(Crash::new(&kernel_log::title_from_stack(message, &frames)))
}

/// Why an authentic-looking report was not taken; the `reason` label of the drop counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No Node of that name.
    UnknownNode,
    /// Sent from an address that is not one of the named node's.
    AddressMismatch,
    /// `sent_at_ms` older than the freshness window: a replay, or a node clock far behind.
    Stale,
    /// `sent_at_ms` (or a pstore report's `event_at_ms`) in the future.
    Future,
    /// A boot the node does not have (now, or just before a reboot the Node does not show yet).
    WrongBoot,
    /// A `kind` this build does not know.
    UnknownKind,
    Malformed,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownNode => "unknown_node",
            Self::AddressMismatch => "address_mismatch",
            Self::Stale => "stale",
            Self::Future => "future",
            Self::WrongBoot => "wrong_boot",
            Self::UnknownKind => "unknown_kind",
            Self::Malformed => "malformed",
        }
    }
}

/// What an admitted report is evidence of.
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    pub source: Source,
    pub tier: Tier,
    pub kind: KernelEventKind,
    pub boot_id: Option<String>,
    pub panicked_at: Option<Timestamp>,
}

/// Checks a decoded report against the cluster: who may have sent it, when, for which boot.
pub fn admit(
    report: &wire::Report,
    from: SocketAddr,
    key: &AuthKey,
    cluster: &ClusterCache,
) -> Result<Admitted, Refusal> {
    let node = cluster.node(&report.node).ok_or(Refusal::UnknownNode)?;
    if cluster.node_by_address(from.ip()).as_deref() != Some(report.node.as_str()) {
        return Err(Refusal::AddressMismatch);
    }
    let now_ms = Timestamp::now().as_millisecond().max(0) as u64;
    match freshness(report.sent_at_ms, now_ms) {
        Freshness::Fresh => {}
        Freshness::Stale => return Err(Refusal::Stale),
        Freshness::Future => return Err(Refusal::Future),
    }
    let kind = report.kind.kernel_kind().ok_or(Refusal::UnknownKind)?;
    // An empty boot id: a Node whose kubelet has not reported one; then no boot can be checked.
    let node_boot = node
        .status
        .as_ref()
        .and_then(|status| status.node_info.as_ref())
        .map(|info| info.boot_id.as_str())
        .filter(|boot| !boot.is_empty());
    if report.source == ReportSource::Pstore {
        // About an earlier boot: `boot_id` is the sender's boot, the crashed one is
        // `event_boot_id` (when the agent knew it), and the time is the record's. Right after
        // the reboot the Node may still show the crashed boot.
        let panicked_at = report
            .event_at_ms
            .and_then(|ms| Timestamp::from_millisecond(i64::try_from(ms).ok()?).ok())
            .ok_or(Refusal::Malformed)?;
        let age = Timestamp::now().duration_since(panicked_at);
        if age.is_negative() && age.unsigned_abs() > crate::controller::trust::REPORT_FRESHNESS {
            return Err(Refusal::Future);
        }
        if age.as_secs_f64() > DELAYED_REPORT_MAX_AGE.as_secs_f64() {
            return Err(Refusal::Stale);
        }
        if let Some(node_boot) = node_boot
            && node_boot != report.boot_id
            && report.event_boot_id.as_deref() != Some(node_boot)
        {
            return Err(Refusal::WrongBoot);
        }
        return Ok(Admitted {
            source: Source::Pstore,
            tier: Tier::KernelRecord,
            kind,
            boot_id: report.event_boot_id.clone(),
            panicked_at: Some(panicked_at),
        });
    }
    if node_boot.is_some_and(|node_boot| node_boot != report.boot_id) {
        return Err(Refusal::WrongBoot);
    }
    // Any other source, one this build does not know included, is a live report; only a
    // `panic()` probe's may rank above console text.
    let from_probe = report.source.is_panic_probe();
    let verified = matches!(key, AuthKey::HmacSha256(_)) && node_boot.is_some();
    let tier = match (from_probe && kind == KernelEventKind::Panic, verified) {
        (true, true) => Tier::PanicProbe,
        (true, false) => Tier::KernelRecord,
        (false, _) => Tier::ConsoleText,
    };
    Ok(Admitted {
        source: Source::Agent,
        tier,
        kind,
        boot_id: Some(report.boot_id.clone()),
        panicked_at: None,
    })
}

fn reject(metrics: &ControllerMetrics, from: SocketAddr, error: &WireError) {
    let reason = match error {
        WireError::BadMac => "bad_mac",
        WireError::AuthSchemeMismatch { .. } => "auth_scheme_mismatch",
        _ => "malformed",
    };
    // Counted; logged at debug only, so a flood of garbage cannot flood the log.
    tracing::debug!(%from, %error, "last-gasp datagram rejected");
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
}
