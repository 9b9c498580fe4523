//! The terminations task: drains the probes' `TERMINATIONS` ring and the console facts into
//! the tracker, and publishes each [`Termination`]: the `container_termination` log line, the
//! counter, and the writer's channel.

use std::{sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{broadcast, mpsc},
};

use super::{Termination, console_lines::ConsoleFact, track::TerminationTracker};
use crate::{
    agent::{count_agent_drop, events::AgentEvent, records::Record},
    metrics::{AgentMetrics, CauseLabels},
    procfs,
};

/// How often the ring is drained (the probes write it without wake-ups) and deaths waiting
/// for their console lines are looked at.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Where terminations go.
pub struct Outputs {
    pub events: broadcast::Sender<AgentEvent>,
    pub metrics: Arc<AgentMetrics>,
    /// The Kubernetes writer (Pod Event, annotation), when one is connected. Sends never
    /// wait: a full channel drops the termination for the writer (counted), not for the log.
    pub writer: Option<mpsc::Sender<Termination>>,
}

pub async fn run(
    mut ring: AsyncFd<RingBuf<MapData>>,
    mut facts: mpsc::Receiver<ConsoleFact>,
    mut tracker: TerminationTracker,
    outputs: Outputs,
) {
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dropped = tracker.dropped();
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(error) => {
                        tracing::error!(%error, "the terminations ring is unreadable");
                        return;
                    }
                };
                drain(guard.get_inner_mut(), &mut tracker, &outputs);
                guard.clear_ready();
            }
            Some(fact) = facts.recv() => tracker.on_console(fact, procfs::monotonic_ns()),
            _ = flush.tick() => {
                drain(ring.get_mut(), &mut tracker, &outputs);
                for termination in tracker.flush(procfs::monotonic_ns()) {
                    publish(termination, &outputs);
                }
            }
        }
        for _ in dropped..tracker.dropped() {
            count_agent_drop(&outputs.metrics, "terminations_table_full");
        }
        dropped = tracker.dropped();
    }
}

fn drain(ring: &mut RingBuf<MapData>, tracker: &mut TerminationTracker, outputs: &Outputs) {
    while let Some(item) = ring.next() {
        match Record::parse(&item) {
            Ok(Record::SignalSent(sent)) => tracker.on_signal(&sent),
            Ok(Record::OomVictim(victim)) => tracker.on_oom_victim(&victim),
            Ok(Record::ProcessExit(exit)) => {
                if let Some(termination) = tracker.on_exit(&exit) {
                    publish(termination, outputs);
                }
            }
            Ok(_) => count_agent_drop(&outputs.metrics, "unexpected_terminations_record"),
            Err(error) => {
                tracing::warn!(%error, "bad terminations record");
                count_agent_drop(&outputs.metrics, "bad_record");
            }
        }
    }
}

fn publish(termination: Termination, outputs: &Outputs) {
    outputs
        .metrics
        .container_terminations
        .get_or_create(&CauseLabels {
            cause: termination.cause.label().into(),
        })
        .inc();
    if let Some(writer) = &outputs.writer
        && writer.try_send(termination.clone()).is_err()
    {
        count_agent_drop(&outputs.metrics, "termination_writer_full");
    }
    let _ = outputs
        .events
        .send(AgentEvent::ContainerTermination(Box::new(termination)));
}
