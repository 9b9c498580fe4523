//! The kernel-log watcher: a thread of its own that drains the `KERNEL_LOG` ring buffer,
//! classifies the first line of each printk record and, on a panic, sends the last gasp
//! without waiting for the async runtime.
//!
//! The `printk:console` tracepoint passes one record's text per event. Only its first line
//! can be a failure: a kernel message that echoes user text with a newline in it (a file or
//! device name) puts a well-formed `Kernel panic - not syncing:` at the start of a later
//! line, never at the start of the record. The later lines are context only. The tracepoint
//! carries no facility or level, so a `/dev/kmsg` writer (root) can still start a record
//! with a panic line; a `panic()` probe's report is sent all the same (see
//! [`LastGasp::on_panic`]).
//!
//! It drains the ring on a short timer instead of waiting for wake-ups: a panicking CPU runs
//! with interrupts off, so a ring-buffer wake-up (an irq_work) may never be delivered, and a
//! timer costs a log storm one wake-up per tick rather than one per line.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use aya::maps::{Array, MapData, RingBuf};
use lastgasp_common::{PanicCall, PanicProbe};
use tokio::sync::{broadcast, mpsc};

use super::{
    count_agent_drop,
    events::{AgentEvent, KernelEvent, KernelSource},
    kallsyms::Kallsyms,
    last_gasp::{LastGasp, Sent},
    records::{Record, c_text},
    terminations::console_lines::{ConsoleFact, Joiner},
};
use crate::{
    kernel_log::{self, KernelEventKind},
    metrics::{AgentMetrics, KindLabels},
    supervise::{Lifetime, Supervisor},
};

/// Frames of a `panic()` stack sent with the last gasp: past `panic()`, the die and exception
/// entry helpers, they reach the function that failed, and they fit a datagram.
const MAX_PANIC_FRAMES: usize = 16;

/// Time between two looks at the ring buffer.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

pub struct ConsoleWatcher {
    pub last_gasp: Option<LastGasp>,
    /// Names the return addresses of the stack a `panic()` probe took.
    pub kallsyms: Option<Kallsyms>,
    /// Where the panic probe waits for word that the last gasp is sent.
    pub panic_ack: Array<MapData, u64>,
    pub events: broadcast::Sender<AgentEvent>,
    pub metrics: Arc<AgentMetrics>,
    /// Where faults and OOM kills the console tells of go, when terminations are tracked.
    pub terminations: Option<mpsc::Sender<ConsoleFact>>,
    /// Joins the pieces of those lines.
    pub joiner: Joiner,
}

impl ConsoleWatcher {
    /// Runs the watcher on its own thread, supervised by `tasks`, until `stop` is set.
    pub fn spawn(
        self,
        ring: RingBuf<MapData>,
        stop: Arc<AtomicBool>,
        tasks: &mut Supervisor,
    ) -> std::io::Result<thread::JoinHandle<()>> {
        tasks.spawn_thread("kernel-log", Lifetime::Required, move || {
            self.run(ring, &stop);
        })
    }

    fn run(mut self, mut ring: RingBuf<MapData>, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            thread::sleep(POLL_INTERVAL);
            while let Some(item) = ring.next() {
                let record = Record::parse(&item);
                drop(item);
                match record {
                    Ok(Record::ConsoleLine(line)) => {
                        // The kernel's length counts the string's NUL.
                        let len = (line.len as usize).min(line.text.len());
                        let text = c_text(&line.text[..len]);
                        let mut lines = text.lines();
                        if let Some(first) = lines.next() {
                            self.on_line(first);
                        }
                        for line in lines {
                            self.on_context(line);
                        }
                        self.note_termination_facts(line.header.tid, &text);
                    }
                    Ok(Record::PanicCall(call, probe)) => {
                        let source = match probe {
                            PanicProbe::Kprobe => KernelSource::Kprobe,
                            PanicProbe::Fentry => KernelSource::Fentry,
                        };
                        let format = c_text(&call.format);
                        let message = format!("Kernel panic - not syncing: {}", format.trim_end());
                        let frames = self.name_stack(&call);
                        self.on_panic_call(source, &message, frames);
                        self.release_panic_hold(call.header.ktime_ns);
                    }
                    Ok(_) => self.count_drop("unexpected_kernel_log_record"),
                    Err(error) => {
                        tracing::warn!(%error, "bad kernel-log record");
                        self.count_drop("bad_record");
                    }
                }
            }
            let held = self.joiner.on_drained();
            self.send_termination_facts(held);
        }
    }

    /// Faults and OOM kills, for the terminations tracker: any line of the record.
    fn note_termination_facts(&mut self, tid: u32, text: &str) {
        if self.terminations.is_some() {
            let facts = self.joiner.on_record(tid, text);
            self.send_termination_facts(facts);
        }
    }

    fn send_termination_facts(&self, facts: impl IntoIterator<Item = ConsoleFact>) {
        let Some(terminations) = &self.terminations else {
            return;
        };
        for fact in facts {
            if terminations.try_send(fact).is_err() {
                self.count_drop("console_facts_full");
            }
        }
    }

    /// The first line of a record: may be a failure.
    fn on_line(&mut self, line: &str) {
        let Some(classified) = kernel_log::classify(line) else {
            self.on_context(line);
            return;
        };
        let message = classified.message.to_owned();
        self.on_kernel_event(classified.kind, KernelSource::Console, &message);
    }

    /// Any other line: context of an open last gasp, never a failure of its own.
    fn on_context(&mut self, line: &str) {
        if let Some(last_gasp) = &mut self.last_gasp {
            let sent = last_gasp.on_line(kernel_log::strip_prefix(line));
            self.count_send(sent);
        }
    }

    /// The stack of a `panic()` call as call-trace lines, innermost first; empty without
    /// kernel symbols.
    fn name_stack(&self, call: &PanicCall) -> Vec<String> {
        let Some(kallsyms) = &self.kallsyms else {
            return Vec::new();
        };
        let filled = (call.stack_bytes as usize / 8).min(call.stack.len());
        call.stack[..filled]
            .iter()
            .filter_map(|&address| kallsyms.frame(address))
            .take(MAX_PANIC_FRAMES)
            .collect()
    }

    /// The kernel's own `panic()` call: its last gasp carries the named stack.
    fn on_panic_call(&mut self, source: KernelSource, message: &str, frames: Vec<String>) {
        if let Some(last_gasp) = &mut self.last_gasp {
            // The datagram first: nothing else matters if the machine is about to stop.
            let sent = last_gasp.on_panic(message, source, frames);
            self.count_send(sent);
        }
        self.note_kernel_event(KernelEventKind::Panic, source, message);
    }

    fn on_kernel_event(&mut self, kind: KernelEventKind, source: KernelSource, message: &str) {
        if let Some(last_gasp) = &mut self.last_gasp {
            // The datagram first: nothing else matters if the machine is about to stop.
            let sent = if kind.is_fatal() {
                last_gasp.on_panic(message, source, Vec::new())
            } else {
                last_gasp.on_line(message)
            };
            self.count_send(sent);
        }
        self.note_kernel_event(kind, source, message);
    }

    /// Counts and publishes a kernel event (after any datagram is sent).
    fn note_kernel_event(&mut self, kind: KernelEventKind, source: KernelSource, message: &str) {
        self.metrics
            .kernel_events
            .get_or_create(&KindLabels {
                kind: kind.as_str().into(),
            })
            .inc();
        let _ = self.events.send(AgentEvent::Kernel(KernelEvent {
            kind,
            source,
            message: message.to_owned(),
        }));
    }

    /// Lets the panicking CPU go on: the last gasp for the panic() call made at `called_at`
    /// is sent (or could not be).
    fn release_panic_hold(&mut self, called_at: u64) {
        if let Err(error) = self.panic_ack.set(0, called_at, 0) {
            tracing::warn!(%error, "could not release the panic hold");
        }
    }

    fn count_send(&self, outcome: Sent) {
        outcome.count(&self.metrics);
    }

    fn count_drop(&self, reason: &str) {
        count_agent_drop(&self.metrics, reason);
    }
}
