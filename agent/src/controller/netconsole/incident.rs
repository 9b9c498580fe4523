//! Turns records into kernel failure reports with the context that follows.
//!
//! Only the first line of a printk record can start an incident: a kernel message that echoes
//! user text with a newline in it (a file name, a device name) puts that text at the start of
//! a console line, but never at the start of a record. Extended netconsole shows record
//! boundaries, facility and level, so there the line must also be the kernel's own (facility 0)
//! at the level the kernel prints it ([`kernel_levels`]). Plain netconsole shows none of this:
//! every plain line counts as a first line, and the report says so ([`Framing::PlainLine`]).
//!
//! Each sender's last lines are kept ([`History`], bounded in lines and bytes) so that a crash
//! is titled from what came before its panic line as well as after: the oops that precedes
//! `Kernel panic - not syncing: Fatal exception` is the root. A report is titled when its
//! incident opens and again when it completes, not on every update.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use super::dedupe::Recent;
use super::parse::{Format, Record};
use crate::kernel_log::{self, Classified, CrashTitle, KernelEventKind};

/// Bounds of a [`PanicWatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchLimits {
    /// Lines collected after the triggering line (Netflix keeps 20).
    pub context_lines: usize,
    /// How long after the triggering line context is collected.
    pub context_time: Duration,
    /// How long a line is remembered to drop its copy from the other target.
    pub dedupe_window: Duration,
    /// Lines remembered per sender for that.
    pub max_recent_lines: usize,
    /// Senders tracked; a new one beyond this displaces the least recently
    /// active.
    pub max_senders: usize,
    /// Lines and bytes of each sender's history, from which a crash is titled.
    pub history_lines: usize,
    pub history_bytes: usize,
    /// How long a sender without an open incident keeps its history after its last line.
    pub history_window: Duration,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            context_lines: 20,
            context_time: Duration::from_secs(10),
            dedupe_window: Duration::from_secs(2),
            // Lookups cost the same however many are remembered; this bounds memory (some
            // 150 bytes a line). A line's two copies arrive milliseconds apart.
            max_recent_lines: 1024,
            max_senders: 4096,
            // A report and its call trace are some 40-100 lines; 200 lines reach back past
            // the oops, register dump and module list that precede a `Fatal exception`.
            history_lines: 200,
            history_bytes: 32 * 1024,
            history_window: Duration::from_secs(60),
        }
    }
}

/// How the line that opened an incident was framed on the wire: what the controller can tell
/// about whether the kernel itself printed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// The first line of an extended record with the kernel's facility (0) and the level the
    /// kernel prints this message at: no user text echoed by a kernel message and no
    /// `/dev/kmsg` writer can produce it.
    ExtendedRecord,
    /// A plain console line: no facility, level or record boundary, so a kernel message that
    /// echoes user text containing a newline can produce it. The weakest evidence.
    PlainLine,
}

impl Framing {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExtendedRecord => "extended_record",
            Self::PlainLine => "plain_line",
        }
    }
}

/// A kernel failure seen on one sender's console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelReport {
    pub kind: KernelEventKind,
    /// The triggering line without printk prefix.
    pub message: String,
    /// The lines that followed, without printk prefix, in arrival order.
    pub context: Vec<String>,
    /// True on the last report of an incident: the context is full, its
    /// time is up, or a panic superseded it.
    pub complete: bool,
    /// When the triggering line arrived; with the sender it identifies the
    /// incident across its updates.
    pub first_seen: Instant,
    /// Kernel release, if an extended target with `release` enabled sent it.
    pub release: Option<String>,
    /// How the triggering line was framed. An incident opened by a plain line becomes
    /// [`Framing::ExtendedRecord`] when the extended copy of that line arrives.
    pub framing: Framing,
    /// The crash title from the sender's history, computed when the incident opens and again
    /// when it completes.
    pub crash: Option<CrashTitle>,
}

/// Lines that matched a failure but were refused as a trigger; all only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// A line after the first of an extended record.
    pub not_first_line: u64,
    /// The first line of an extended record with another facility than the kernel's, another
    /// level than the kernel prints that message at, or the continuation flag.
    pub not_kernel_level: u64,
}

/// Recognises kernel failures per sender and collects their context.
///
/// Feed every record with [`PanicWatch::push`] and call [`PanicWatch::poll`]
/// periodically (e.g. every second). A report is returned as soon as the
/// triggering line arrives, again whenever its context, release or framing
/// changes (at most once per pushed record), and a last time with `complete`
/// set. A line that [`kernel_log::classify`] recognises, and that may open an
/// incident (see the module docs), starts one unless one is open; then it is
/// context, except that a panic supersedes a non-fatal incident (e.g. `BUG:` /
/// `Oops:` / `Kernel panic - not syncing: Fatal exception` give a page fault
/// report and a panic report), and a panic from an extended record supersedes
/// any incident opened by a plain line that is not this same line.
///
/// Key senders by node (e.g. source IP, not address and port) so that the
/// plain and extended copies of a line meet and one of them is dropped.
#[derive(Debug)]
pub struct PanicWatch<K> {
    limits: WatchLimits,
    senders: HashMap<K, Watched>,
    stats: WatchStats,
}

impl<K: Clone + Eq + Hash> PanicWatch<K> {
    pub fn new(limits: WatchLimits) -> Self {
        Self {
            limits,
            senders: HashMap::new(),
            stats: WatchStats::default(),
        }
    }

    pub fn stats(&self) -> WatchStats {
        self.stats
    }

    /// Processes one record from `sender`. Reports of other senders appear
    /// only when a new sender displaces one with an open incident.
    pub fn push(&mut self, sender: K, record: &Record, now: Instant) -> Vec<(K, KernelReport)> {
        let mut out = Vec::new();
        if !self.senders.contains_key(&sender) && self.senders.len() >= self.limits.max_senders {
            self.evict_oldest(&mut out);
        }
        let watched = self
            .senders
            .entry(sender.clone())
            .or_insert_with(|| Watched::new(now, &self.limits));
        let mut reports = Vec::new();
        watched.push(record, now, &self.limits, &mut self.stats, &mut reports);
        out.extend(reports.into_iter().map(|r| (sender.clone(), r)));
        out
    }

    /// Completes incidents whose context time is up and forgets idle senders.
    pub fn poll(&mut self, now: Instant) -> Vec<(K, KernelReport)> {
        let mut out = Vec::new();
        self.senders.retain(|sender, watched| {
            let mut reports = Vec::new();
            watched.close_if_due(now, &self.limits, &mut reports);
            out.extend(reports.into_iter().map(|r| (sender.clone(), r)));
            let idle = now.duration_since(watched.last_seen);
            watched.open.is_some()
                || idle < self.limits.dedupe_window
                || (!watched.history.is_empty() && idle < self.limits.history_window)
        });
        out
    }

    fn evict_oldest(&mut self, out: &mut Vec<(K, KernelReport)>) {
        let oldest = self
            .senders
            .iter()
            .min_by_key(|(_, w)| w.last_seen)
            .map(|(k, _)| k.clone());
        if let Some(sender) = oldest
            && let Some(mut watched) = self.senders.remove(&sender)
        {
            let mut reports = Vec::new();
            watched.close(&mut reports);
            out.extend(reports.into_iter().map(|r| (sender.clone(), r)));
        }
    }
}

/// The syslog levels at which the kernel prints the line [`kernel_log::classify`] recognises
/// as `kind`; the first line of an extended record at another level is not that message.
pub fn kernel_levels(kind: KernelEventKind) -> RangeInclusive<u8> {
    use KernelEventKind as K;
    match kind {
        // kernel/panic.c panic(): pr_emerg("Kernel panic - not syncing: %s\n").
        K::Panic => 0..=0,
        // kernel/watchdog.c: pr_emerg("BUG: soft lockup - CPU#%d stuck for %us! ...").
        K::SoftLockup => 0..=0,
        // kernel/watchdog.c, watchdog_perf.c (watchdog_hld.c before 6.6): pr_emerg(
        // "... Watchdog detected hard LOCKUP on cpu %u"); kernels before 4.0 printed it
        // without prefix through WARN(), at KERN_WARNING.
        K::HardLockup => 0..=4,
        // arch/x86/mm/fault.c page_fault_oops(): pr_alert("BUG: kernel NULL pointer
        // dereference, ...") / pr_alert("BUG: unable to handle page fault ..."); arm64
        // die_kernel_fault(): pr_alert("Unable to handle kernel %s at virtual address ...").
        K::PageFault => 1..=1,
        // lib/bug.c report_bug(): pr_crit("kernel BUG at %s:%u!"); the other "BUG: " lines
        // come from KERN_EMERG (workqueue lockup) down to KERN_ERR (scheduling while atomic,
        // sleeping function called from invalid context, KASAN reports).
        K::KernelBug => 0..=3,
        // kernel/hung_task.c: pr_err("INFO: task %s:%d blocked for more than ...");
        // kernel/rcu/tree_stall.h, tree_exp.h, tasks.h: pr_err("INFO: %s detected stalls
        // ...") / pr_err("INFO: %s self-detected stall on CPU"); mm/oom_kill.c
        // __oom_kill_process(): pr_err("%s: Killed process %d (%s) ...").
        K::HungTask | K::RcuStall | K::OutOfMemory => 3..=3,
        // x86 __die_header(): printk(KERN_DEFAULT "%s: %04lx [#%d]..."), stored at the
        // node's default message level (kernel.printk, 4 unless changed), so any level;
        // arm64 die(): pr_emerg("Internal error: %s: %016lx [#%d]...").
        K::Oops | K::GeneralProtectionFault => 0..=7,
    }
}

/// Line `index` of `record` as a trigger: its classification and framing when it may open an
/// incident, counting it in `stats` when it matched but may not.
fn trigger<'a>(
    record: &Record,
    index: usize,
    line: &'a str,
    stats: &mut WatchStats,
) -> Option<(Classified<'a>, Framing)> {
    let classified = kernel_log::classify(line)?;
    match record.format {
        Format::Plain => Some((classified, Framing::PlainLine)),
        Format::Extended if index > 0 => {
            stats.not_first_line += 1;
            None
        }
        Format::Extended => {
            let kernel = record.facility == Some(0)
                && !record.continuation
                && record
                    .level
                    .is_some_and(|level| kernel_levels(classified.kind).contains(&level));
            if !kernel {
                stats.not_kernel_level += 1;
                return None;
            }
            Some((classified, Framing::ExtendedRecord))
        }
    }
}

/// One sender's recent lines and open incident.
#[derive(Debug)]
struct Watched {
    recent: Recent,
    history: History,
    open: Option<KernelReport>,
    /// The printk timestamp of the line that opened `open`, if it had one.
    open_usec: Option<u64>,
    /// `open` changed since it was last reported.
    dirty: bool,
    release: Option<String>,
    last_seen: Instant,
}

impl Watched {
    fn new(now: Instant, limits: &WatchLimits) -> Self {
        Self {
            recent: Recent::new(limits.dedupe_window, limits.max_recent_lines),
            history: History::new(limits.history_lines, limits.history_bytes),
            open: None,
            open_usec: None,
            dirty: false,
            release: None,
            last_seen: now,
        }
    }

    fn push(
        &mut self,
        record: &Record,
        now: Instant,
        limits: &WatchLimits,
        stats: &mut WatchStats,
        out: &mut Vec<KernelReport>,
    ) {
        self.last_seen = now;
        self.close_if_due(now, limits, out);
        // Taken even from a copy that is dropped below: the plain copy of
        // the triggering line may have come first.
        if let Some(release) = &record.release {
            self.release = Some(release.clone());
            if let Some(open) = &mut self.open
                && open.release.is_none()
            {
                open.release = Some(release.clone());
                self.dirty = true;
            }
        }
        for (index, line) in record.lines().enumerate() {
            let trigger = trigger(record, index, line, stats);
            let copy = self
                .recent
                .seen(record.format, record.seq, record.usec, index, line, now);
            if !copy {
                self.history.push(line);
            }
            if let Some((classified, Framing::ExtendedRecord)) = trigger
                && let Some(open) = &mut self.open
                && open.framing == Framing::PlainLine
            {
                if open.message == classified.message
                    && self.open_usec.zip(record.usec).is_none_or(|(a, b)| a == b)
                {
                    // The extended copy of the plain line that opened the incident.
                    open.framing = Framing::ExtendedRecord;
                    self.dirty = true;
                    continue;
                }
                if classified.kind.is_fatal() {
                    // Even when a copy: its plain twin was only context of the plain incident.
                    self.start(classified, Framing::ExtendedRecord, record.usec, now, out);
                    self.close_if_full(limits, out);
                    continue;
                }
            }
            if !copy {
                self.line(line, trigger, record.usec, now, limits, out);
            }
        }
        if self.dirty
            && let Some(open) = &self.open
        {
            out.push(open.clone());
        }
        self.dirty = false;
    }

    fn line(
        &mut self,
        line: &str,
        trigger: Option<(Classified<'_>, Framing)>,
        usec: Option<u64>,
        now: Instant,
        limits: &WatchLimits,
        out: &mut Vec<KernelReport>,
    ) {
        if let Some((c, framing)) = trigger
            && self
                .open
                .as_ref()
                .is_none_or(|open| c.kind.is_fatal() && !open.kind.is_fatal())
        {
            self.start(c, framing, usec, now, out);
        } else if let Some(open) = &mut self.open {
            open.context.push(line.to_owned());
            self.dirty = true;
        }
        self.close_if_full(limits, out);
    }

    /// Closes the open incident, if any, and opens one for `c`.
    fn start(
        &mut self,
        c: Classified<'_>,
        framing: Framing,
        usec: Option<u64>,
        now: Instant,
        out: &mut Vec<KernelReport>,
    ) {
        self.close(out);
        self.open = Some(KernelReport {
            kind: c.kind,
            message: c.message.to_owned(),
            context: Vec::new(),
            complete: false,
            first_seen: now,
            release: self.release.clone(),
            framing,
            crash: kernel_log::crash_title(self.history.lines()),
        });
        self.open_usec = usec;
        self.dirty = true;
    }

    fn close_if_full(&mut self, limits: &WatchLimits, out: &mut Vec<KernelReport>) {
        if self
            .open
            .as_ref()
            .is_some_and(|open| open.context.len() >= limits.context_lines)
        {
            self.close(out);
        }
    }

    fn close_if_due(&mut self, now: Instant, limits: &WatchLimits, out: &mut Vec<KernelReport>) {
        if self
            .open
            .as_ref()
            .is_some_and(|open| now.duration_since(open.first_seen) >= limits.context_time)
        {
            self.close(out);
        }
    }

    /// Emits the open incident as complete, titled again with the lines that followed.
    fn close(&mut self, out: &mut Vec<KernelReport>) {
        if let Some(mut report) = self.open.take() {
            report.complete = true;
            if report.kind.is_fatal() {
                report.crash = kernel_log::crash_title(self.history.lines()).or(report.crash);
            }
            out.push(report);
        }
        self.dirty = false;
    }
}

/// A sender's last lines, bounded in count and bytes. The strings of evicted lines are
/// reused, so a steady stream allocates nothing once the history is full.
#[derive(Debug)]
struct History {
    lines: VecDeque<String>,
    bytes: usize,
    max_lines: usize,
    max_bytes: usize,
}

impl History {
    fn new(max_lines: usize, max_bytes: usize) -> Self {
        Self {
            lines: VecDeque::new(),
            bytes: 0,
            max_lines: max_lines.max(1),
            max_bytes,
        }
    }

    fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    fn push(&mut self, line: &str) {
        // A line longer than the whole budget keeps its start.
        let mut end = line.len().min(self.max_bytes);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        let line = &line[..end];
        let mut spare = None;
        while self.lines.len() >= self.max_lines || self.bytes + line.len() > self.max_bytes {
            let Some(oldest) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= oldest.len();
            spare = Some(oldest);
        }
        let mut kept = spare.unwrap_or_default();
        kept.clear();
        kept.push_str(line);
        self.bytes += kept.len();
        self.lines.push_back(kept);
    }

    fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;
    use KernelEventKind as K;

    fn plain(usec: u64, message: &str) -> Record {
        let line = format!("[{:5}.{:06}] {message}", usec / 1_000_000, usec % 1_000_000);
        parse::plain_record(line.as_bytes())
    }

    /// An extended record from the kernel: facility 0, at the level the kernel prints a
    /// failure line at, else KERN_WARNING.
    fn ext(release: Option<&str>, seq: u64, usec: u64, message: &str) -> Record {
        let level = kernel_log::classify(message).map_or(4, |c| *kernel_levels(c.kind).start());
        ext_at(release, u16::from(level), seq, usec, message)
    }

    fn ext_at(release: Option<&str>, prefix: u16, seq: u64, usec: u64, message: &str) -> Record {
        let release = release.map(|r| format!("{r},")).unwrap_or_default();
        let datagram = format!("{release}{prefix},{seq},{usec},-;{message}\n");
        let e = parse::extended(datagram.as_bytes()).unwrap().unwrap();
        e.meta.record(e.body)
    }

    fn watch() -> PanicWatch<&'static str> {
        PanicWatch::new(WatchLimits::default())
    }

    /// Pushes records at `now`, returning the reports without sender.
    fn push_all(
        w: &mut PanicWatch<&'static str>,
        records: &[Record],
        now: Instant,
    ) -> Vec<KernelReport> {
        records
            .iter()
            .flat_map(|r| w.push("node", r, now))
            .map(|(_, report)| report)
            .collect()
    }

    #[test]
    fn copies_from_the_other_format_are_dropped_once() {
        let t0 = Instant::now();
        let mut w = watch();
        let lines = [
            "Kernel panic - not syncing: test",
            " ? do_syscall_64+0x69/0x90",
            " ? do_syscall_64+0x69/0x90",
            " </TASK>",
        ];
        let mut records = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let (seq, usec) = (100 + i as u64, 5_000_000 + i as u64);
            // Extended copies arrive before or after the plain ones.
            if i % 2 == 0 {
                records.extend([plain(usec, line), ext(None, seq, usec, line)]);
            } else {
                records.extend([ext(None, seq, usec, line), plain(usec, line)]);
            }
        }
        // A repeated extended datagram (same seq) is a copy too.
        records.push(ext(None, 103, 5_000_003, " </TASK>"));
        push_all(&mut w, &records, t0);
        let done = w.poll(t0 + Duration::from_secs(10));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].1.context, &lines[1..]);

        // Without plain timestamps the text alone pairs the copies.
        let mut w = watch();
        let untimed: Vec<Record> = lines
            .iter()
            .map(|l| parse::plain_record(l.as_bytes()))
            .collect();
        let extended: Vec<Record> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| ext(None, i as u64, i as u64, l))
            .collect();
        push_all(&mut w, &untimed, t0);
        push_all(&mut w, &extended, t0);
        let done = w.poll(t0 + Duration::from_secs(10));
        assert_eq!(done[0].1.context, &lines[1..]);
    }

    #[test]
    fn multi_line_extended_record_matches_plain_lines() {
        let t0 = Instant::now();
        let mut w = watch();
        let reports = push_all(
            &mut w,
            &[
                ext(None, 7, 42, "Kernel panic - not syncing: x\\x0asecond line"),
                plain(42, "Kernel panic - not syncing: x"),
                plain(42, "second line"),
            ],
            t0,
        );
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].context, ["second line"]);
    }

    #[test]
    fn panic_supersedes_an_open_oops() {
        let t0 = Instant::now();
        let mut w = watch();
        let reports = push_all(
            &mut w,
            &[
                plain(
                    1,
                    "BUG: kernel NULL pointer dereference, address: 0000000000000008",
                ),
                plain(2, "#PF: supervisor write access in kernel mode"),
                plain(3, "Oops: 0002 [#1] PREEMPT SMP NOPTI"),
                plain(4, "Kernel panic - not syncing: Fatal exception"),
                plain(5, "Kernel Offset: disabled"),
            ],
            t0,
        );
        let summary: Vec<(K, bool, usize)> = reports
            .iter()
            .map(|r| (r.kind, r.complete, r.context.len()))
            .collect();
        assert_eq!(
            summary,
            [
                (K::PageFault, false, 0),
                (K::PageFault, false, 1),
                // The Oops header is context of the page fault.
                (K::PageFault, false, 2),
                (K::PageFault, true, 2),
                (K::Panic, false, 0),
                (K::Panic, false, 1),
            ]
        );
        assert_eq!(reports[3].context[1], "Oops: 0002 [#1] PREEMPT SMP NOPTI");
        assert_eq!(
            reports[4].message,
            "Kernel panic - not syncing: Fatal exception"
        );
    }

    #[test]
    fn context_is_bounded_by_lines_and_time() {
        let t0 = Instant::now();
        let limits = WatchLimits {
            context_lines: 3,
            ..WatchLimits::default()
        };
        let mut w = PanicWatch::new(limits.clone());
        let mut records = vec![plain(
            0,
            "INFO: task kworker/0:1:42 blocked for more than 120 seconds.",
        )];
        records.extend((1..6).map(|i| plain(i, &format!("line {i}"))));
        let reports: Vec<KernelReport> = records
            .iter()
            .flat_map(|r| w.push("node", r, t0))
            .map(|(_, r)| r)
            .collect();
        let last = reports.last().unwrap();
        assert!(last.complete);
        assert_eq!((last.kind, last.context.len()), (K::HungTask, 3));
        assert_eq!(reports.iter().filter(|r| r.complete).count(), 1);

        // Time bound: polled, or noticed by the next push.
        let panic = plain(10, "Kernel panic - not syncing: x");
        assert_eq!(w.push("node", &panic, t0).len(), 1);
        assert!(w.poll(t0 + limits.context_time / 2).is_empty());
        let done = w.poll(t0 + limits.context_time);
        assert!(done[0].1.complete && done[0].1.context.is_empty());

        let mut w = PanicWatch::new(limits.clone());
        w.push("node", &panic, t0);
        let late = w.push("node", &plain(11, "late"), t0 + limits.context_time);
        assert_eq!(late.len(), 1);
        assert!(late[0].1.complete && late[0].1.context.is_empty());
    }

    #[test]
    fn release_comes_from_the_extended_copy() {
        let t0 = Instant::now();
        let mut w = watch();
        let line = "Kernel panic - not syncing: sysrq triggered crash";
        let first = w.push("node", &plain(9, line), t0);
        assert_eq!(first[0].1.release, None);
        let update = w.push("node", &ext(Some("6.1.0-27-cloud-amd64"), 1, 9, line), t0);
        assert_eq!(update.len(), 1);
        assert_eq!(update[0].1.release.as_deref(), Some("6.1.0-27-cloud-amd64"));
        assert!(update[0].1.context.is_empty());
    }

    #[test]
    fn senders_are_bounded() {
        let t0 = Instant::now();
        let mut w = PanicWatch::new(WatchLimits {
            max_senders: 2,
            ..WatchLimits::default()
        });
        let panic = plain(1, "Kernel panic - not syncing: x");
        w.push("a", &panic, t0);
        w.push("b", &panic, t0 + Duration::from_millis(1));
        let reports = w.push("c", &panic, t0 + Duration::from_millis(2));
        let who: Vec<(&str, bool)> = reports.iter().map(|(k, r)| (*k, r.complete)).collect();
        assert_eq!(who, [("a", true), ("c", false)]);
        assert_eq!(w.senders.len(), 2);

        // Idle senders without an open incident are forgotten once their history is too old
        // to title a crash.
        let later = t0 + Duration::from_secs(30);
        assert_eq!(w.poll(later).len(), 2);
        assert_eq!(w.senders.len(), 2, "history kept for the history window");
        assert!(w.poll(t0 + Duration::from_secs(61)).is_empty());
        assert!(w.senders.is_empty());
    }

    #[test]
    fn a_panic_is_titled_from_the_oops_before_it_and_history_is_bounded() {
        let t0 = Instant::now();
        let mut w = watch();
        let log = [
            "BUG: kernel NULL pointer dereference, address: 0000000000000000",
            "#PF: supervisor read access in kernel mode",
            "Oops: 0000 [#1] PREEMPT SMP NOPTI",
            "CPU: 1 PID: 4242 Comm: sh Not tainted 6.1.0-57-cloud-amd64 #1  Debian 6.1.192-3",
            "RIP: 0010:lastgasp_crash_null_deref+0x11/0x20 [lastgasp_crash]",
            "Call Trace:",
            " <TASK>",
            " lastgasp_crash_write+0x4a/0x80 [lastgasp_crash]",
            " vfs_write+0xb8/0x3f0",
            " ksys_write+0x6f/0xf0",
            " do_syscall_64+0x5c/0xc0",
            " </TASK>",
            "---[ end trace 0000000000000000 ]---",
            "Kernel panic - not syncing: Fatal exception",
        ];
        let mut reports = Vec::new();
        for (n, line) in log.iter().enumerate() {
            reports.extend(push_all(
                &mut w,
                &[ext(None, n as u64, 1000 + n as u64, line)],
                t0,
            ));
        }
        let panic = reports
            .iter()
            .find(|report| report.kind == K::Panic)
            .expect("a panic report");
        let crash = panic.crash.as_ref().expect("titled when it opened");
        assert_eq!(
            crash.culprit.as_ref().map(|frame| frame.function.as_str()),
            Some("lastgasp_crash_null_deref")
        );
        assert_eq!(crash.release.as_deref(), Some("6.1.0-57-cloud-amd64"));

        let mut history = History::new(3, 10);
        for line in ["aaaa", "bbbb", "cccc", "dd"] {
            history.push(line);
        }
        assert_eq!(
            history.lines().collect::<Vec<_>>(),
            ["bbbb", "cccc", "dd"],
            "3 lines, 10 bytes"
        );
        history.push("a line far longer than the budget");
        assert_eq!(history.lines().collect::<Vec<_>>(), ["a line far"]);
    }

    #[test]
    fn only_the_kernels_first_line_of_an_extended_record_opens_an_incident() {
        let t0 = Instant::now();
        let mut w = watch();
        let forged = "Kernel panic - not syncing: forged";
        let records = [
            // A kernel message echoing user text with a newline.
            ext(None, 1, 10, &format!("innocent\\x0a{forged}")),
            // A /dev/kmsg writer: facility 1 (user), even at KERN_EMERG.
            ext_at(None, 8, 2, 11, forged),
            // Facility 0 at another level than panic() prints at.
            ext_at(None, 4, 3, 12, forged),
        ];
        assert!(push_all(&mut w, &records, t0).is_empty());
        // A continuation fragment that starts a record.
        let datagram = format!("0,4,13,c;{forged}\n");
        let cont = parse::extended(datagram.as_bytes()).unwrap().unwrap();
        assert!(w.push("node", &cont.meta.record(cont.body), t0).is_empty());
        assert_eq!(
            w.stats(),
            WatchStats {
                not_first_line: 1,
                not_kernel_level: 3
            }
        );
        assert!(w.poll(t0 + Duration::from_secs(60)).is_empty());

        // Levels are per kind: a page fault is KERN_ALERT, not KERN_EMERG.
        let fault = "BUG: kernel NULL pointer dereference, address: 0000000000000008";
        assert!(
            w.push("node", &ext_at(None, 0, 5, 14, fault), t0)
                .is_empty()
        );
        let opened = w.push("node", &ext_at(None, 1, 6, 15, fault), t0);
        assert_eq!(opened[0].1.kind, K::PageFault);
        assert_eq!(opened[0].1.framing, Framing::ExtendedRecord);
    }

    #[test]
    fn an_extended_panic_supersedes_an_incident_a_plain_line_opened() {
        let t0 = Instant::now();
        let forged = "Kernel panic - not syncing: forged";
        let real = "Kernel panic - not syncing: sysrq triggered crash";

        // The plain copy of the real panic comes first: context of the forged incident,
        // until its extended copy supersedes it.
        for real_plain_first in [false, true] {
            let mut w = watch();
            let opened = push_all(&mut w, &[plain(1, forged)], t0);
            assert_eq!(opened[0].framing, Framing::PlainLine);
            let mut records = vec![ext(None, 9, 5, real), plain(5, real)];
            if real_plain_first {
                records.reverse();
            }
            records.push(plain(6, "Kernel Offset: disabled"));
            let reports = push_all(&mut w, &records, t0);
            let closed: Vec<&KernelReport> = reports.iter().filter(|r| r.complete).collect();
            assert_eq!(closed.len(), 1);
            assert_eq!(closed[0].message, forged);
            let last = reports.last().unwrap();
            assert_eq!(
                (last.message.as_str(), last.framing),
                (real, Framing::ExtendedRecord)
            );
            assert_eq!(last.context, ["Kernel Offset: disabled"]);
        }

        // The extended copy of the very line that opened the incident upgrades it.
        let mut w = watch();
        push_all(&mut w, &[plain(5, real), plain(6, "CPU: 0 PID: 1")], t0);
        let upgraded = push_all(&mut w, &[ext(None, 9, 5, real)], t0);
        assert_eq!(upgraded.len(), 1);
        assert_eq!(upgraded[0].framing, Framing::ExtendedRecord);
        assert!(!upgraded[0].complete);
        assert_eq!(upgraded[0].context, ["CPU: 0 PID: 1"]);
        // A plain panic does not supersede an extended one.
        let mut w = watch();
        push_all(&mut w, &[ext(None, 9, 5, real)], t0);
        let later = push_all(&mut w, &[plain(7, forged)], t0);
        assert_eq!(later[0].message, real);
        assert_eq!(later[0].context, [forged]);
    }
}
