//! Crash titles: what went wrong and where, from a console log.
//!
//! [`crash_title`] finds the first kernel report in a sender's recent lines,
//! names its kind and picks the culprit: the first call-trace frame that is
//! not generic reporting, allocation, locking or copying code. Titles follow
//! syzkaller's convention, `<kind> in <function>`, e.g. `general protection
//! fault in tcp_v4_rcv`, `WARNING: refcount bug in sctp_wfree`, `INFO: task
//! hung in blk_mq_freeze_queue`, `KASAN: use-after-free Read in
//! netlink_recvmsg`.
//!
//! The report formats and where each prints its culprit are in `headers`,
//! the frame formats in `frames`. A header is also found after other text
//! on its line (interleaved consoles). The report runs until a header of
//! another kind or `---[ end trace`, keeping only its own printk caller's
//! lines when they carry `[T123]`-style ids; the panic wrapper (anywhere in
//! the lines) and the `CPU: ... Comm:` line (release, taint) are read around
//! it. Titles use the function without clone suffixes and syscall wrapper
//! prefixes, like syzkaller.
//!
//! Lines before a report cost a first-byte dispatch and, for a few fixed
//! words, a substring search; nothing is allocated until a header matches.

use std::fmt::Write as _;

pub use super::frames::Frame;
use super::frames::{
    FrameRef, GENERIC, hang_culprit, matches_any, parse_arm_caller, parse_ip_frame,
    parse_trace_frame, stall_culprit, title_name,
};
use super::headers::{
    Culprit, Header, Label, embedded_header, match_header, panic_header, split_hung_task,
};
use super::{caller_id, strip_prefix};

/// The family of a kernel crash report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashKind {
    /// `Kernel panic - not syncing: ...` with no other report before it and a
    /// message that names none (`sysrq triggered crash`, a driver's panic).
    Panic,
    /// A die header (`Oops: 0000 [#1]`, arm64 `Internal error: Oops`,
    /// `Unhandled fault`), or a `Fatal exception` panic whose oops is missing.
    Oops,
    /// `BUG: unable to handle page fault|kernel paging request`, arm64 `Unable to handle kernel paging request`.
    PageFault,
    /// `BUG: kernel NULL pointer dereference` and its older and arm64 wordings.
    NullPointerDereference,
    /// `general protection fault` and `stack segment:` faults.
    GeneralProtectionFault,
    /// `kernel BUG at file:line!`.
    KernelBug,
    /// `invalid opcode:` and `int3:` traps.
    InvalidOpcode,
    /// `divide error:`.
    DivideError,
    /// Other `BUG: ...` reports: scheduling while atomic, bad page state,
    /// spinlock, corrupted list, bad usercopy, ...
    Bug,
    /// `WARNING: ...` and its subtypes (refcount, ODEBUG, kmalloc, ...).
    Warning,
    /// `BUG: KASAN: ...`.
    Kasan,
    /// `BUG: KFENCE: ...`.
    Kfence,
    /// `BUG: KMSAN: ...`.
    Kmsan,
    /// `BUG: KCSAN: ...`.
    Kcsan,
    /// `UBSAN: ...`.
    Ubsan,
    /// `BUG: soft lockup - CPU#n stuck for ns!`.
    SoftLockup,
    /// `Watchdog detected hard LOCKUP on cpu n`.
    HardLockup,
    /// `INFO: task comm:pid blocked for more than n seconds.`
    HungTask,
    /// `INFO: rcu_* detected stalls` / `self-detected stall`.
    RcuStall,
    /// A panic on memory exhaustion (`Out of memory`, `System is deadlocked on memory`).
    OutOfMemory,
    /// Kernel stack exhausted: `BUG: stack guard page was hit`, `kernel stack overflow`, `PANIC: double fault`.
    StackOverflow,
    /// Kernel stack corrupted: `stack-protector: Kernel stack is corrupted`, `corrupted stack end`.
    StackCorruption,
    /// lockdep: possible deadlock, inconsistent lock state, bad unlock balance, ...
    Lockdep,
    /// kmemleak's `BUG: memory leak`.
    MemoryLeak,
    /// `Kernel panic - not syncing: Attempted to kill init!`.
    KilledInit,
    /// `Kernel panic - not syncing: VFS: Unable to mount root fs`.
    RootMountFailure,
}

impl CrashKind {
    /// Stable snake_case name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Panic => "panic",
            Self::Oops => "oops",
            Self::PageFault => "page_fault",
            Self::NullPointerDereference => "null_pointer_dereference",
            Self::GeneralProtectionFault => "general_protection_fault",
            Self::KernelBug => "kernel_bug",
            Self::InvalidOpcode => "invalid_opcode",
            Self::DivideError => "divide_error",
            Self::Bug => "bug",
            Self::Warning => "warning",
            Self::Kasan => "kasan",
            Self::Kfence => "kfence",
            Self::Kmsan => "kmsan",
            Self::Kcsan => "kcsan",
            Self::Ubsan => "ubsan",
            Self::SoftLockup => "soft_lockup",
            Self::HardLockup => "hard_lockup",
            Self::HungTask => "hung_task",
            Self::RcuStall => "rcu_stall",
            Self::OutOfMemory => "out_of_memory",
            Self::StackOverflow => "stack_overflow",
            Self::StackCorruption => "stack_corruption",
            Self::Lockdep => "lockdep",
            Self::MemoryLeak => "memory_leak",
            Self::KilledInit => "killed_init",
            Self::RootMountFailure => "root_mount_failure",
        }
    }

    /// The generic title prefix of the kind; a report's own title may be
    /// more specific (`KASAN: use-after-free Read`, `WARNING: refcount bug`).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Panic => "kernel panic",
            Self::Oops => "Oops",
            Self::PageFault => "BUG: unable to handle kernel paging request",
            Self::NullPointerDereference => "BUG: unable to handle kernel NULL pointer dereference",
            Self::GeneralProtectionFault => "general protection fault",
            Self::KernelBug => "kernel BUG",
            Self::InvalidOpcode => "invalid opcode",
            Self::DivideError => "divide error",
            Self::Bug => "BUG",
            Self::Warning => "WARNING",
            Self::Kasan => "KASAN",
            Self::Kfence => "KFENCE",
            Self::Kmsan => "KMSAN",
            Self::Kcsan => "KCSAN",
            Self::Ubsan => "UBSAN",
            Self::SoftLockup => "BUG: soft lockup",
            Self::HardLockup => "hard LOCKUP",
            Self::HungTask => "INFO: task hung",
            Self::RcuStall => "INFO: rcu detected stall",
            Self::OutOfMemory => "kernel panic: Out of memory",
            Self::StackOverflow => "kernel stack overflow",
            Self::StackCorruption => "kernel panic: stack is corrupted",
            Self::Lockdep => "possible deadlock",
            Self::MemoryLeak => "memory leak",
            Self::KilledInit => "kernel panic: Attempted to kill init!",
            Self::RootMountFailure => "kernel panic: VFS: Unable to mount root fs",
        }
    }
}

/// The title of one crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashTitle {
    pub kind: CrashKind,
    /// syzkaller's convention: `<kind prefix> in <culprit>`, or the prefix
    /// alone for reports without a culprit; `in corrupted` when the report's
    /// stack is missing.
    pub report_title: String,
    pub culprit: Option<Frame>,
    /// Up to five culprit candidates, generic frames skipped, culprit first.
    pub frames: Vec<Frame>,
    /// The panic wrapper message, e.g. `Fatal exception in interrupt`.
    pub panic: Option<String>,
    /// Kernel release from the `CPU: n PID: n Comm: x ... 6.1.0-13-amd64 #1` line.
    pub release: Option<String>,
    /// `Not tainted` or the taint flags, e.g. `G W`.
    pub taint: Option<String>,
    /// The report is truncated or interleaved so that no culprit was found.
    pub corrupted: bool,
    /// The report's first lines, as printed without printk prefixes: at most
    /// [`MAX_EXCERPT_LINES`] lines and [`MAX_EXCERPT_BYTES`] bytes. Empty for
    /// a title made from a stack.
    pub excerpt: Vec<String>,
}

/// Bounds of [`CrashTitle::excerpt`], which is kept in the node's incident record.
pub const MAX_EXCERPT_LINES: usize = 40;
pub const MAX_EXCERPT_BYTES: usize = 4096;

/// The first lines of `body` within the excerpt bounds.
fn excerpt(body: &[&str]) -> Vec<String> {
    let mut bytes = 0;
    body.iter()
        .take(MAX_EXCERPT_LINES)
        .take_while(|line| {
            bytes += line.len() + 1;
            bytes <= MAX_EXCERPT_BYTES
        })
        .map(|line| (*line).to_owned())
        .collect()
}

impl CrashTitle {
    /// The report title, the culprit when the report title has none (bare
    /// panics), and the panic wrapper when it says something else:
    /// `general protection fault in tcp_v4_rcv (panic: Fatal exception in interrupt)`.
    pub fn title(&self) -> String {
        let mut title = self.report_title.clone();
        if let Some(culprit) = self
            .culprit
            .as_ref()
            .filter(|_| !self.report_title.contains(" in "))
        {
            let _ = write!(title, " in {}", title_name(&culprit.function));
        }
        if let Some(panic) = self
            .panic
            .as_ref()
            .filter(|p| !self.report_title.contains(p.as_str()))
        {
            let _ = write!(title, " (panic: {panic})");
        }
        title
    }

    /// Fleet signature: kind plus the report title with every number
    /// replaced by `N` and the culprit's base name, so one bug on many nodes
    /// is one value: `general_protection_fault: general protection fault in tcp_v4_rcv`.
    pub fn signature(&self) -> String {
        let mut text = self.report_title.clone();
        if let Some(culprit) = self
            .culprit
            .as_ref()
            .filter(|_| !self.report_title.contains(" in "))
        {
            let _ = write!(text, " in {}", title_name(&culprit.function));
        }
        format!("{}: {}", self.kind.as_str(), replace_numbers(&text))
    }
}

/// Replaces every number that does not continue a word by `N`: `0xffff8880`,
/// `CPU#3`, `(8,1)`; `ip6_fragment` and `loop0` stay.
fn replace_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let mut prev_word = false;
    while let Some((_, c)) = chars.next() {
        if c.is_ascii_digit() && !prev_word {
            out.push('N');
            if c == '0' && chars.peek().is_some_and(|&(_, x)| x == 'x') {
                chars.next();
            }
            while chars.peek().is_some_and(|&(_, x)| x.is_ascii_hexdigit()) {
                chars.next();
            }
            prev_word = false;
            continue;
        }
        prev_word = c.is_ascii_alphanumeric() || c == '_';
        out.push(c);
    }
    out
}

/// How many culprit candidates a title keeps.
const MAX_CANDIDATES: usize = 5;

/// The longest report considered after its header line (a panic is looked
/// for further).
const MAX_REPORT_LINES: usize = 2000;

/// Titles the first kernel report among `lines`, which may carry printk
/// prefixes. `None` when no line starts a report.
pub fn crash_title<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<CrashTitle> {
    let mut lines = lines.into_iter();
    let mut previous = "";
    let (context, first, header) = lines.by_ref().find_map(|line| {
        let m = strip_prefix(line);
        let found = match_header(m)
            .or_else(|| embedded_header(m))
            .map(|h| (m, h))
            .or_else(|| split_hung_task(previous, m));
        previous = m;
        found.map(|(first, header)| (caller_id(line), first, header))
    })?;
    // With CONFIG_PRINTK_CALLER, other tasks' lines interleave: the report
    // is its own context's lines, plus CPU contexts once the kernel sends
    // NMIs for all CPUs' backtraces (RCU stalls, lockups). The panic that
    // ended it all may come later than the report's end.
    let mut panic = panic_message(first);
    let mut report = Vec::with_capacity(256);
    report.push(first);
    let mut cpu_backtraces = false;
    for (i, line) in lines.enumerate() {
        let m = strip_prefix(line);
        panic = panic.or_else(|| panic_message(m));
        if i >= MAX_REPORT_LINES {
            if panic.is_some() {
                break;
            }
            continue;
        }
        let line_context = caller_id(line);
        cpu_backtraces |= m.starts_with("Sending NMI from CPU");
        if context.is_none()
            || line_context == context
            || cpu_backtraces && line_context.is_some_and(|c| c.starts_with('C'))
        {
            report.push(m);
        }
    }
    Some(title_report(&report, panic, header))
}

/// The message of a `Kernel panic - not syncing: ` line, also after other text.
fn panic_message(m: &str) -> Option<&str> {
    m.split_once("Kernel panic - not syncing: ")
        .map(|(_, message)| message.trim_end())
}

/// Titles a crash from the panic message and a symbolised stack taken at
/// `panic()` (innermost frame first), for when the console said nothing
/// useful. The culprit is the first frame that is not panic, die or oops
/// plumbing nor otherwise generic.
pub fn title_from_stack(panic_message: &str, frames: &[Frame]) -> CrashTitle {
    let header = panic_header(panic_message);
    // The stack-protector message names the function itself.
    let named = header.named.map(|function| FrameRef {
        function,
        module: None,
    });
    let refs: Vec<FrameRef<'_>> = named
        .into_iter()
        .chain(frames.iter().map(|f| FrameRef {
            function: &f.function,
            module: f.module.as_deref(),
        }))
        .collect();
    let mut candidates = candidates(&refs, header.skip);
    candidates.truncate(MAX_CANDIDATES);
    let culprit = candidates.first().cloned();
    CrashTitle {
        kind: header.kind,
        report_title: header.label.render(None),
        culprit,
        frames: candidates,
        panic: Some(panic_message.to_owned()),
        release: None,
        taint: None,
        corrupted: false,
        excerpt: Vec::new(),
    }
}

/// Titles the report that starts at `report[0]`.
fn title_report(report: &[&str], panic: Option<&str>, header: Header<'_>) -> CrashTitle {
    let end = report_end(report, &header);
    let body = &report[..end];
    let panic = panic.map(str::to_owned);
    let (release, taint) = body
        .iter()
        .find_map(|m| parse_cpu_line(m))
        .map_or((None, None), |(r, t)| (r, Some(t)));

    let access = (header.kind == CrashKind::Kasan && matches!(header.label, Label::Joined(..)))
        .then(|| kasan_access(body))
        .flatten();
    let label = header.label.render(access);

    let frames = culprit_frames(body, &header);
    let candidates = match header.culprit {
        Culprit::FirstAt(_) => frames.iter().map(|f| f.to_frame()).collect(),
        _ => candidates(&frames, header.skip),
    };
    let chosen = match header.culprit {
        Culprit::Stall | Culprit::RcuStall => {
            let names: Vec<&str> = candidates.iter().map(|f| f.function.as_str()).collect();
            stall_culprit(&names).map(|i| candidates[i].clone())
        }
        Culprit::Hang => {
            let names: Vec<&str> = candidates.iter().map(|f| f.function.as_str()).collect();
            hang_culprit(&names).map(|i| candidates[i].clone())
        }
        _ => candidates.first().cloned(),
    };

    let wants_culprit = header.culprit != Culprit::None || header.named.is_some();
    let (report_title, culprit, corrupted) = match (header.kind, header.named) {
        (CrashKind::Kcsan, Some(funcs)) => {
            (format!("{label} in {}", funcs.trim_end()), None, false)
        }
        _ if !wants_culprit || !header.culprit_in_title => (label, chosen, false),
        _ => match chosen {
            Some(frame) => (
                format!(
                    "{label} in {}{}",
                    title_name(&frame.function),
                    header.culprit_suffix
                ),
                Some(frame),
                false,
            ),
            None if header.unknown => (label, None, false),
            None => (format!("{label} in corrupted"), None, true),
        },
    };
    let mut frames_out = candidates;
    frames_out.truncate(MAX_CANDIDATES);
    CrashTitle {
        kind: header.kind,
        report_title,
        culprit,
        frames: frames_out,
        panic,
        release,
        taint,
        corrupted,
        excerpt: excerpt(body),
    }
}

/// The report ends before another report of a different kind starts or
/// after the kernel's `---[ end trace` marker.
fn report_end(report: &[&str], header: &Header<'_>) -> usize {
    report
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, m)| {
            m.starts_with("---[ end trace")
                || match_header(m).is_some_and(|h| !h.wrapper && h.kind != header.kind)
        })
        .map_or(report.len(), |(i, _)| i)
}

/// Lines that start a new stack: the culprit's stack ends there.
fn starts_stack(m: &str) -> bool {
    is_call_trace(m)
        || m.starts_with("Allocated by task")
        || m.starts_with("Freed by task")
        || m.starts_with("Allocated:")
        || m.starts_with("Freed:")
        || m.starts_with("Uninit was stored to memory at")
        || m.starts_with("Uninit was created at")
        || m.starts_with("Local variable")
        || m.trim_start().starts_with("backtrace")
}

/// Trace frames from `from` until the next stack starts.
fn trace_from<'a>(body: &[&'a str], from: usize) -> Vec<FrameRef<'a>> {
    let mut frames = Vec::new();
    for m in body.iter().skip(from).take_while(|m| !starts_stack(m)) {
        frames.extend(parse_trace_frame(m));
        frames.extend(parse_arm_caller(m));
    }
    // An arm32 caller is the next line's frame.
    frames.dedup_by(|a, b| a.function == b.function);
    frames
}

/// Frames after the first line for which `is_start` holds.
fn frames_after<'a>(body: &[&'a str], is_start: impl Fn(&str) -> bool) -> Vec<FrameRef<'a>> {
    body.iter()
        .position(|m| is_start(m))
        .map(|at| trace_from(body, at + 1))
        .unwrap_or_default()
}

fn call_trace<'a>(body: &[&'a str]) -> Vec<FrameRef<'a>> {
    frames_after(body, is_call_trace)
}

/// `Call Trace:` (x86, also after other text on the line), `Call trace:`
/// (arm64), `Backtrace:` (arm32).
fn is_call_trace(m: &str) -> bool {
    m.contains("Call Trace:") || m.starts_with("Call trace:") || m.starts_with("Backtrace:")
}

/// The faulting instruction's frame and the frames printed after it.
fn ip_and_following<'a>(body: &[&'a str], from: usize) -> Vec<FrameRef<'a>> {
    let Some(at) = body
        .iter()
        .skip(from)
        .position(|m| parse_ip_frame(m).is_some())
    else {
        return Vec::new();
    };
    let at = from + at;
    let mut frames = vec![parse_ip_frame(body[at]).expect("checked above")];
    frames.extend(trace_from(body, at + 1));
    frames
}

/// Frames of a report in the order a culprit is looked for.
fn culprit_frames<'a>(body: &[&'a str], header: &Header<'a>) -> Vec<FrameRef<'a>> {
    let named = header.named.and_then(|n| {
        let function = n.split([' ', '+', '/']).next().unwrap_or(n);
        (!function.is_empty()).then_some(FrameRef {
            function,
            module: None,
        })
    });
    let mut frames: Vec<FrameRef<'a>> = named.into_iter().collect();
    match header.culprit {
        Culprit::None => {}
        Culprit::Ip | Culprit::Stall => {
            frames.extend(ip_and_following(body, 0));
            frames.extend(call_trace(body));
        }
        Culprit::RcuStall => {
            let irq = body.iter().position(|m| {
                m.contains("apic_timer_interrupt")
                    || m.contains("Exception stack")
                    || m.contains("el1h_64_irq")
            });
            match irq {
                Some(at) => {
                    let ip = ip_and_following(body, at);
                    if ip.is_empty() {
                        frames.extend(trace_from(body, at + 1));
                    } else {
                        frames.extend(ip);
                    }
                }
                None => frames.extend(call_trace(body)),
            }
        }
        Culprit::Trace | Culprit::Hang => frames.extend(call_trace(body)),
        Culprit::Following => frames.extend(trace_from(body, 1)),
        Culprit::After(marker) => frames.extend(frames_after(body, |m| m.contains(marker))),
        Culprit::NamedAfter(marker) => frames.extend(
            body.iter()
                .find_map(|m| m.split_once(marker))
                .and_then(|(_, name)| parse_symbol_or_name(name.trim_start_matches([':', ' ']))),
        ),
        Culprit::FirstAt(marker) => {
            if let Some(at) = body.iter().position(|m| m.contains(marker)) {
                frames.extend(body[at..].iter().find_map(|m| lock_site(m)));
            }
        }
        Culprit::LockAt(marker) => {
            // The lock being taken, the lock held, then the stack printed
            // after them (lockdep's dependency chain), then the call trace.
            if let Some(at) = body.iter().position(|m| m.contains(marker)) {
                let mut sites = body
                    .iter()
                    .enumerate()
                    .skip(at)
                    .filter_map(|(i, m)| lock_site(m).map(|f| (i, f)))
                    .take(2);
                let first = sites.next();
                let second = sites.next();
                for (_, site) in first.into_iter().chain(second) {
                    frames.push(site);
                }
                if let Some((i, _)) = second {
                    frames.extend(trace_from(body, i + 1));
                }
            }
            frames.extend(call_trace(body));
        }
    }
    frames
}

/// A lock site: `... at: [<pc>] func+0x..` or, when `at:` ended the line
/// before, `[<pc>] func+0x..`.
fn lock_site(m: &str) -> Option<FrameRef<'_>> {
    match m.split_once("at: ") {
        Some((_, site)) => parse_trace_frame(site),
        None if m.trim_start().starts_with("[<") => parse_trace_frame(m),
        None => None,
    }
}

/// `func+0x..` or a bare identifier (`last function: foo_work_fn`).
fn parse_symbol_or_name(text: &str) -> Option<FrameRef<'_>> {
    parse_trace_frame(text).or_else(|| {
        let name = text.split_whitespace().next()?;
        let ok = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            && name.as_bytes()[0].is_ascii_alphabetic() | (name.as_bytes()[0] == b'_');
        ok.then_some(FrameRef {
            function: name,
            module: None,
        })
    })
}

/// The frames that may be the culprit, generic ones removed, duplicates kept once.
fn candidates(frames: &[FrameRef<'_>], skip: &[&str]) -> Vec<Frame> {
    let mut out: Vec<Frame> = Vec::new();
    for f in frames {
        if matches_any(GENERIC, f.function) || matches_any(skip, f.function) {
            continue;
        }
        out.push(f.to_frame());
    }
    out
}

/// `Read` or `Write` from KASAN's `Read of size 8 at addr ...` line.
fn kasan_access(body: &[&str]) -> Option<&'static str> {
    body.iter().take(30).find_map(|m| {
        let m = m.trim_start();
        if m.starts_with("Read of size") || m.starts_with("Read at addr") {
            Some("Read")
        } else if m.starts_with("Write of size") || m.starts_with("Write at addr") {
            Some("Write")
        } else {
            None
        }
    })
}

/// Release and taint from `CPU: 0 PID: 1 Comm: x Not tainted 6.1.0-13-amd64 #1 Debian ...`
/// or `... Tainted: G        W          6.1.0 #1` (`UID: n` after the CPU on 6.12+).
fn parse_cpu_line(m: &str) -> Option<(Option<String>, String)> {
    if !m.starts_with("CPU: ") {
        return None;
    }
    let (taint, after) = if let Some((_, after)) = m.split_once(" Not tainted ") {
        ("Not tainted".to_owned(), after)
    } else {
        let (_, after) = m.split_once(" Tainted: ")?;
        let mut flags = Vec::new();
        let mut rest = after;
        loop {
            rest = rest.trim_start();
            let word = rest.split(' ').next().unwrap_or("");
            if word.is_empty() || word.as_bytes()[0].is_ascii_digit() {
                break;
            }
            flags.push(word);
            rest = &rest[word.len()..];
        }
        (flags.join(" "), rest)
    };
    let release = after
        .split_whitespace()
        .next()
        .filter(|r| r.as_bytes()[0].is_ascii_digit())
        .map(str::to_owned);
    Some((release, taint))
}

#[cfg(test)]
mod tests {
    use super::*;
    use CrashKind as K;
    use base64::Engine as _;

    fn title(log: &str) -> CrashTitle {
        crash_title(log.lines()).unwrap_or_else(|| panic!("no title for {log:?}"))
    }

    /// Small logs in the kernel's own wording: (log, kind, report title).
    const CASES: &[(&str, CrashKind, &str)] = &[
        (
            "[   50.1] BUG: kernel NULL pointer dereference, address: 0000000000000008
[   50.1] #PF: supervisor write access in kernel mode
[   50.1] Oops: 0002 [#1] PREEMPT SMP NOPTI
[   50.1] CPU: 1 PID: 812 Comm: modprobe Tainted: G           OE      6.1.0-13-amd64 #1  Debian 6.1.55-1
[   50.1] RIP: 0010:mydrv_probe+0x1d/0x60 [mydrv]
[   50.1] Call Trace:
[   50.1]  <TASK>
[   50.1]  ? __die+0x23/0x70
[   50.1]  do_one_initcall+0x5b/0x320
[   50.1] Kernel panic - not syncing: Fatal exception",
            K::NullPointerDereference,
            "BUG: unable to handle kernel NULL pointer dereference in mydrv_probe",
        ),
        (
            "BUG: unable to handle page fault for address: ffffc90000a3b000
Oops: 0000 [#1] SMP PTI
RIP: 0010:memcpy_orig+0x10/0x120
Call Trace:
 ext4_read_block_bitmap+0x40/0x90
 ext4_mb_load_buddy+0x1a/0x30",
            K::PageFault,
            "BUG: unable to handle kernel paging request in ext4_read_block_bitmap",
        ),
        (
            "Unable to handle kernel paging request at virtual address ffff800009c3b000
Internal error: Oops: 0000000096000007 [#1] PREEMPT SMP
pc : nvme_irq+0x44/0x1a0 [nvme]
lr : __handle_irq_event_percpu+0x60/0x1e0
Call trace:
 nvme_irq+0x44/0x1a0 [nvme]
 __handle_irq_event_percpu+0x60/0x1e0",
            K::PageFault,
            "BUG: unable to handle kernel paging request in nvme_irq",
        ),
        (
            "Unable to handle kernel NULL pointer dereference at virtual address 0000000000000010
Internal error: Oops: 0000000096000006 [#1] SMP
pc : fsl_probe+0x20/0x80
Call trace:
 fsl_probe+0x20/0x80",
            K::NullPointerDereference,
            "BUG: unable to handle kernel NULL pointer dereference in fsl_probe",
        ),
        (
            "Internal error: Oops - BUG: 00000000f2000800 [#1] SMP
pc : skb_panic+0x58/0x5c
Call trace:
 skb_panic+0x58/0x5c
 skb_put+0x60/0x64
 tun_xmit+0x88/0x100",
            K::Oops,
            "Internal error in skb_put",
        ),
        (
            "Unhandled fault: page domain fault (0x01b) at 0x00000e30
PC is at n_tty_set_termios+0x4c/0x78",
            K::Oops,
            "Unhandled fault in n_tty_set_termios",
        ),
        (
            "general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI
CPU: 3 PID: 0 Comm: swapper/3 Not tainted 6.1.0-13-amd64 #1
RIP: 0010:tcp_v4_rcv+0x5d1/0xd60
Call Trace:
 <IRQ>
 ip_protocol_deliver_rcu+0x3c/0x1f0
Kernel panic - not syncing: Fatal exception in interrupt",
            K::GeneralProtectionFault,
            "general protection fault in tcp_v4_rcv",
        ),
        (
            "------------[ cut here ]------------
kernel BUG at mm/slub.c:431!
invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
RIP: 0010:__slab_free+0x2d4/0x2e0
Call Trace:
 kfree+0x1d8/0x2a0
 xfs_inode_free+0x20/0x40 [xfs]",
            K::KernelBug,
            "kernel BUG in xfs_inode_free",
        ),
        (
            "kernel BUG at lib/list_debug.c:53!
RIP: 0010:__list_del_entry_valid.cold+0x1d/0x47
Call Trace:
 ath9k_htc_wait_for_target+0x30/0x90",
            K::Bug,
            "BUG: corrupted list in ath9k_htc_wait_for_target",
        ),
        (
            "invalid opcode: 0000 [#1] SMP
RIP: 0010:bad_insn_fn+0x2/0x10",
            K::InvalidOpcode,
            "invalid opcode in bad_insn_fn",
        ),
        (
            "divide error: 0000 [#1] PREEMPT SMP KASAN
RIP: 0010:fbcon_set_font+0x30/0x90",
            K::DivideError,
            "divide error in fbcon_set_font",
        ),
        (
            "BUG: scheduling while atomic: swapper/0/0/0x00000002
Call Trace:
 dump_stack_lvl+0x44/0x5c
 __schedule_bug+0x60/0x80
 __schedule+0x6a/0x700
 schedule+0x5d/0xe0
 mydrv_wait+0x30/0x60",
            K::Bug,
            "BUG: scheduling while atomic in mydrv_wait",
        ),
        (
            "BUG: Bad page state in process kswapd0  pfn:12345
page last allocated via order 0, migratetype Movable
 post_alloc_hook+0x1/0x2
 get_page_from_freelist+0x1/0x2
 __alloc_pages+0x1/0x2
 ntfs_fill_super+0x1/0x2",
            K::Bug,
            "BUG: Bad page state in ntfs_fill_super",
        ),
        (
            "BUG: spinlock already unlocked on CPU#1, syz/123
Call Trace:
 do_raw_spin_unlock+0x1/0x2
 _raw_spin_unlock+0x1/0x2
 snd_timer_close+0x1/0x2",
            K::Bug,
            "BUG: spinlock already unlocked in snd_timer_close",
        ),
        (
            "------------[ cut here ]------------
WARNING: CPU: 1 PID: 42 at kernel/workqueue.c:1438 __queue_work+0x3b9/0x520
Modules linked in:
RIP: 0010:__queue_work+0x3b9/0x520
Call Trace:
 queue_work_on+0x24/0x40
 mydrv_kick+0x10/0x20",
            K::Warning,
            "WARNING in mydrv_kick",
        ),
        (
            "refcount_t: underflow; use-after-free.
WARNING: CPU: 0 PID: 7 at lib/refcount.c:28 refcount_warn_saturate+0xba/0x110
RIP: 0010:refcount_warn_saturate+0xba/0x110
Call Trace:
 sctp_wfree+0x1c0/0x200",
            K::Warning,
            "WARNING: refcount bug in sctp_wfree",
        ),
        (
            "BUG: KASAN: slab-use-after-free in netlink_recvmsg+0x1a/0x400
Read of size 8 at addr ffff888012345678 by task syz/123
Call Trace:
 <TASK>
 dump_stack_lvl+0x1/0x2
 print_report+0x1/0x2
 kasan_report+0x1/0x2
 netlink_recvmsg+0x1a/0x400
Allocated by task 1:
 other_fn+0x1/0x2",
            K::Kasan,
            "KASAN: slab-use-after-free Read in netlink_recvmsg",
        ),
        (
            "BUG: KFENCE: out-of-bounds read in test_out_of_bounds_read+0x8c/0x194

Out-of-bounds read at 0xffff8c3f2e291fff (1B left of kfence-#72):
 test_out_of_bounds_read+0x8c/0x194
 kunit_try_run_case+0x51/0x90",
            K::Kfence,
            "KFENCE: out-of-bounds read in test_out_of_bounds_read",
        ),
        (
            "BUG: KMSAN: uninit-value in tipc_nl_compat_link_set+0x1/0x2
 tipc_nl_compat_link_set+0x1/0x2
 __tipc_nl_compat_doit+0x1/0x2",
            K::Kmsan,
            "KMSAN: uninit-value in tipc_nl_compat_link_set",
        ),
        (
            "BUG: KCSAN: data-race in netlink_recvmsg / netlink_recvmsg
write to 0xffff8880 of 4 bytes by task 1 on cpu 0:
 netlink_recvmsg+0x1/0x2",
            K::Kcsan,
            "KCSAN: data-race in netlink_recvmsg / netlink_recvmsg",
        ),
        (
            "UBSAN: shift-out-of-bounds in net/sched/sch_fq.c:123:4
shift exponent 32 is too large for 32-bit type 'int'
Call Trace:
 dump_stack_lvl+0x1/0x2
 __ubsan_handle_shift_out_of_bounds+0x1/0x2
 fq_change+0x1/0x2",
            K::Ubsan,
            "UBSAN: shift-out-of-bounds in fq_change",
        ),
        (
            "watchdog: BUG: soft lockup - CPU#3 stuck for 23s! [stress-ng:1234]
RIP: 0010:spin_loop_fn+0x10/0x20
Call Trace:
 <IRQ>
 </IRQ>
 busy_worker+0x30/0x40
 process_one_work+0x1f4/0x3e0
 worker_thread+0x50/0x3a0",
            K::SoftLockup,
            "BUG: soft lockup in busy_worker",
        ),
        (
            "NMI watchdog: Watchdog detected hard LOCKUP on cpu 2
RIP: 0010:stuck_fn+0x4/0x10
Call Trace:
 mydrv_ioctl+0x1/0x2
 __x64_sys_ioctl+0x1/0x2
 do_syscall_64+0x1/0x2",
            K::HardLockup,
            "hard LOCKUP in mydrv_ioctl",
        ),
        (
            "INFO: task kworker/u8:2:123 blocked for more than 120 seconds.
      Not tainted 6.1.0-13-amd64 #1
Call Trace:
 <TASK>
 __schedule+0x1/0x2
 schedule+0x1/0x2
 io_schedule+0x1/0x2
 blk_mq_freeze_queue_wait+0x1/0x2
 blk_mq_freeze_queue+0x1/0x2
 loop_set_status+0x1/0x2",
            K::HungTask,
            "INFO: task hung in blk_mq_freeze_queue",
        ),
        (
            "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:
NMI backtrace for cpu 1
Call Trace:
 <IRQ>
 rcu_dump_cpu_stacks+0x1/0x2
 asm_sysvec_apic_timer_interrupt+0x1a/0x20
RIP: 0010:looping_fn+0x10/0x20
 tcp_setsockopt+0x1/0x2
 __sys_setsockopt+0x1/0x2
 do_syscall_64+0x1/0x2",
            K::RcuStall,
            "INFO: rcu detected stall in tcp_setsockopt",
        ),
        (
            "BUG: stack guard page was hit at ffffc90000b3ff78 (stack is ffffc90000b40000..ffffc90000b47fff)
kernel stack overflow (double-fault): 0000 [#1] PREEMPT SMP KASAN
RIP: 0010:recursive_fn+0x10/0x20
Call Trace:
 recursive_fn+0x1/0x2
 rtnl_newlink+0x1/0x2
 rtnetlink_rcv_msg+0x1/0x2",
            K::StackOverflow,
            "BUG: stack guard page was hit in rtnl_newlink",
        ),
        (
            "PANIC: double fault, error_code: 0x0
RIP: 0010:kvm_async_pf_task_wait+0x1/0x2",
            K::StackOverflow,
            "PANIC: double fault in kvm_async_pf_task_wait",
        ),
        (
            "Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in: br_dev_xmit+0x1/0x2",
            K::StackCorruption,
            "kernel panic: stack is corrupted in br_dev_xmit",
        ),
        (
            "======================================================
WARNING: possible circular locking dependency detected
6.1.0 #1 Not tainted
------------------------------------------------------
syz/123 is trying to acquire lock:
ffff8880 (&mm->mmap_lock){++++}-{3:3}, at: __might_fault+0x1/0x2

but task is already holding lock:
ffff8881 (&pipe->mutex){+.+.}-{3:3}, at: pipe_write+0x1/0x2
",
            K::Lockdep,
            "possible deadlock in pipe_write",
        ),
        (
            "================================
WARNING: inconsistent lock state
{IN-SOFTIRQ-W} -> {SOFTIRQ-ON-W} usage.
syz/5076 [HC0[0]:SC0[0]:HE1:SE1] takes:
ffff8880 (&hashinfo->lock){+.?.}-{2:2}, at: inet_ehash_insert+0x1/0x2
Call Trace:
 lock_acquire+0x1/0x2
 _raw_spin_lock+0x1/0x2
 inet_ehash_insert+0x1/0x2",
            K::Lockdep,
            "inconsistent lock state in inet_ehash_insert",
        ),
        (
            "BUG: memory leak
unreferenced object 0xffff880039a55260 (size 64):
  backtrace:
    [<ffffffff848a2f5f>] sock_kmalloc+0x7f/0xc0
    [<ffffffff84e5bea0>] do_ipv6_setsockopt.isra.7+0x15d0/0x2830",
            K::MemoryLeak,
            "memory leak in do_ipv6_setsockopt",
        ),
        (
            "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009
CPU: 0 PID: 1 Comm: init Not tainted 6.1.0 #1",
            K::KilledInit,
            "kernel panic: Attempted to kill init!",
        ),
        (
            "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
            K::RootMountFailure,
            "kernel panic: VFS: Unable to mount root fs on unknown-block(0,0)",
        ),
        (
            "Kernel panic - not syncing: Out of memory and no killable processes...",
            K::OutOfMemory,
            "kernel panic: Out of memory and no killable processes...",
        ),
        (
            "[  1.2] BUG: MAX_LOCKDEP_KEYS too low!
[  1.2] turning off the locking correctness validator.",
            K::Bug,
            "BUG: MAX_LOCKDEP_KEYS too low!",
        ),
    ];

    #[test]
    fn titles_every_kind() {
        for &(log, kind, report_title) in CASES {
            let t = title(log);
            assert_eq!(
                (t.kind, t.report_title.as_str()),
                (kind, report_title),
                "{log}"
            );
            assert!(!t.corrupted, "{log}");
        }
    }

    #[test]
    fn panic_wrapper_and_release() {
        let t = title(CASES[0].0);
        assert_eq!(t.panic.as_deref(), Some("Fatal exception"));
        assert_eq!(t.release.as_deref(), Some("6.1.0-13-amd64"));
        assert_eq!(t.taint.as_deref(), Some("G OE"));
        let culprit = t.culprit.as_ref().unwrap();
        assert_eq!(culprit.function, "mydrv_probe");
        assert_eq!(culprit.module.as_deref(), Some("mydrv"));
        assert_eq!(
            t.title(),
            "BUG: unable to handle kernel NULL pointer dereference in mydrv_probe (panic: Fatal exception)"
        );

        let gpf = CASES
            .iter()
            .find(|c| c.1 == K::GeneralProtectionFault)
            .unwrap();
        let t = title(gpf.0);
        assert_eq!(
            t.title(),
            "general protection fault in tcp_v4_rcv (panic: Fatal exception in interrupt)"
        );
        assert_eq!(t.taint.as_deref(), Some("Not tainted"));
        assert_eq!(t.release.as_deref(), Some("6.1.0-13-amd64"));
    }

    #[test]
    fn cpu_line_forms() {
        let parse = |l| parse_cpu_line(l).unwrap();
        assert_eq!(
            parse("CPU: 0 PID: 1 Comm: init Not tainted 6.1.0-56-cloud-amd64 #1  Debian 6.1.192-2"),
            (Some("6.1.0-56-cloud-amd64".into()), "Not tainted".into())
        );
        assert_eq!(
            parse(
                "CPU: 2 UID: 0 PID: 9 Comm: kworker/2:1 Tainted: G        W          6.12.9+bpo-amd64 #1"
            ),
            (Some("6.12.9+bpo-amd64".into()), "G W".into())
        );
        // syzkaller's kernels print no release in the CPU line.
        assert_eq!(
            parse(
                "CPU: 0 UID: 0 PID: 1 Comm: kworker Tainted: G             L      syzkaller #0 PREEMPT"
            ),
            (None, "G L syzkaller #0 PREEMPT".into())
        );
        assert_eq!(parse_cpu_line("Hardware name: QEMU"), None);
    }

    #[test]
    fn bare_panic_names_its_caller() {
        let log = "Kernel panic - not syncing: sysrq triggered crash
CPU: 0 PID: 1 Comm: init Not tainted 6.1.0-56-cloud-amd64 #1  Debian 6.1.192-2
Call Trace:
 dump_stack_lvl+0x44/0x5c
 panic+0x118/0x2f4
 sysrq_handle_crash+0x16/0x20
 __handle_sysrq.cold+0x44/0x11c";
        let t = title(log);
        assert_eq!(t.kind, K::Panic);
        assert_eq!(t.report_title, "kernel panic: sysrq triggered crash");
        assert_eq!(t.panic.as_deref(), Some("sysrq triggered crash"));
        assert_eq!(
            t.title(),
            "kernel panic: sysrq triggered crash in sysrq_handle_crash"
        );
        assert_eq!(t.frames[1].function, "__handle_sysrq.cold");
    }

    #[test]
    fn quiet_logs_have_no_title() {
        let quiet = "[    0.000000] Linux version 6.1.0-13-amd64
[    3.1] traps: a.out[1234] general protection fault ip:401136 sp:7ffd0 error:0 in a.out[401000+1000]
[    4.2] XFS (loop4): WARNING: Reset corrupted AGFL on AG 0. 1 blocks leaked.
[    4.3] INFO: NMI handler (perf_event_nmi_handler) took too long to run: 1.356 msecs
[    4.4] Spectre V2 : WARNING: Unprivileged eBPF is enabled with eIBRS on
[    5.0] Out of memory: Killed process 4242 (stress) total-vm:2105388kB
[    5.1] sysrq: Trigger a crash
[    6.0] myapp: BUG: cache miss in handler";
        assert_eq!(crash_title(quiet.lines()), None);
        assert_eq!(crash_title(std::iter::empty()), None);
    }

    #[test]
    fn oom_panic_names_the_allocating_caller() {
        let log = "Kernel panic - not syncing: Out of memory: system-wide panic_on_oom is enabled
Call Trace:
 dump_stack_lvl+0x1/0x2
 panic+0x1/0x2
 out_of_memory.cold+0x1/0x2
 __alloc_pages_slowpath.constprop.0+0x1/0x2
 __alloc_pages+0x1/0x2
 filemap_fault+0x1/0x2";
        let t = title(log);
        assert_eq!(t.kind, K::OutOfMemory);
        assert_eq!(
            t.culprit.map(|f| f.function),
            Some("filemap_fault".to_owned())
        );
    }

    #[test]
    fn report_after_interleaved_text() {
        let log = "syzkaller login: [   50.9] WARNING: CPU: 0 PID: 3081 at mm/slab_common.c:971 kmalloc_slab+0x5d/0x70
[   50.9] Kernel panic - not syncing: panic_on_warn set ...
[   50.9] RIP: 0010:kmalloc_slab+0x5d/0x70
[   50.9]  __kmalloc+0x1/0x2
[   50.9]  relay_open_buf+0x1/0x2";
        let t = title(log);
        assert_eq!(t.report_title, "WARNING: kmalloc bug in relay_open_buf");
        assert_eq!(
            t.title(),
            "WARNING: kmalloc bug in relay_open_buf (panic: panic_on_warn set ...)"
        );
    }

    #[test]
    fn other_tasks_lines_are_left_out() {
        let log = "[  310.0][T12234] INFO: trying to register non-static key.
[  310.0][T12234] Call Trace:
[  310.0][T12234]  dump_stack+0x1db/0x2d0
[  310.0][T12227] WARNING: CPU: 1 PID: 12227 at kernel/locking/lockdep.c:3553 lock_downgrade+0x4d2/0x910
[  310.0][T12227]  other_task_fn+0x1/0x2
[  310.0][T12234]  register_lock_class+0x19dc/0x1e60
[  310.0][T12234]  flush_work+0x18/0x20
[  310.0][T12234]  vkms_atomic_crtc_destroy_state+0x2d/0x40
[  310.0][T12227] Kernel panic - not syncing: panic_on_warn set ...";
        let t = title(log);
        assert_eq!(
            t.report_title,
            "INFO: trying to register non-static key in vkms_atomic_crtc_destroy_state"
        );
        assert_eq!(t.panic.as_deref(), Some("panic_on_warn set ..."));
        let t = title("executing programKernel panic - not syncing: Fatal exception");
        assert_eq!(t.kind, K::Oops);
        assert_eq!(t.panic.as_deref(), Some("Fatal exception"));
    }

    #[test]
    fn warning_without_source_file() {
        let log = "WARNING: CPU: 2 PID: 77 at mydrv_tx+0x12/0x40 [mydrv]
RIP: 0010:mydrv_tx+0x12/0x40 [mydrv]";
        let t = title(log);
        assert_eq!(
            (t.kind, t.report_title.as_str()),
            (K::Warning, "WARNING in mydrv_tx")
        );
        assert_eq!(crash_title(["WARNING: CPU: 2 PID: 77 at boot"]), None);
    }

    #[test]
    fn missing_stack_is_corrupted() {
        let t = title("general protection fault: 0000 [#1] SMP KASAN\nModules linked in:");
        assert!(t.corrupted);
        assert_eq!(t.report_title, "general protection fault in corrupted");
        assert_eq!(t.culprit, None);
    }

    #[test]
    fn signature_ignores_addresses_numbers_and_clones() {
        let a = title(
            "[  1.0] BUG: unable to handle page fault for address: ffffc90000a3b000
[  1.0] CPU: 3 PID: 77 Comm: a Not tainted 6.1.0 #1
[  1.0] RIP: 0010:foo.isra.0+0x10/0x120",
        );
        let b = title(
            "[  9.0] BUG: unable to handle page fault for address: ffffc900deadb000
[  9.0] CPU: 1 PID: 4242 Comm: b Not tainted 6.1.0 #1
[  9.0] RIP: 0010:foo.cold+0x22/0x40",
        );
        assert_eq!(a.signature(), b.signature());
        assert_eq!(
            a.signature(),
            "page_fault: BUG: unable to handle kernel paging request in foo"
        );
        let c =
            title("Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(8,1)");
        assert_eq!(
            c.signature(),
            "root_mount_failure: kernel panic: VFS: Unable to mount root fs on unknown-block(N,N)"
        );
        assert_eq!(
            replace_numbers("CPU#3 0xffff8880 loop0 x86_64"),
            "CPU#N N loop0 x86_64"
        );
    }

    #[test]
    fn stack_from_the_agent() {
        let frames: Vec<Frame> = [
            "panic",
            "oops_end",
            "die",
            "do_trap",
            "exc_invalid_op",
            "asm_exc_invalid_op",
            "nf_hook_slow",
            "ip_rcv",
        ]
        .iter()
        .map(|f| Frame::new(f, None))
        .collect();
        let t = title_from_stack("Fatal exception", &frames);
        assert_eq!(t.kind, K::Oops);
        assert_eq!(
            t.culprit.as_ref().map(|f| f.function.as_str()),
            Some("nf_hook_slow")
        );
        assert_eq!(t.frames.len(), 2);
        assert_eq!(t.title(), "kernel panic: Fatal exception in nf_hook_slow");
        let t = title_from_stack(
            "stack-protector: Kernel stack is corrupted in: br_dev_xmit+0x1/0x2",
            &frames,
        );
        assert_eq!(t.kind, K::StackCorruption);
        assert_eq!(
            t.culprit.as_ref().map(|f| f.function.as_str()),
            Some("br_dev_xmit")
        );
        assert_eq!(title_from_stack("Oops: Fatal exception", &[]).kind, K::Oops);
        let t = title_from_stack("Hard LOCKUP", &[]);
        assert_eq!(t.kind, K::HardLockup);
        assert_eq!(t.culprit, None);
        assert_eq!(t.title(), "kernel panic: Hard LOCKUP");
    }

    #[test]
    fn kind_names_are_stable() {
        assert_eq!(
            K::GeneralProtectionFault.as_str(),
            "general_protection_fault"
        );
        assert_eq!(
            K::NullPointerDereference.prefix(),
            "BUG: unable to handle kernel NULL pointer dereference"
        );
        assert_eq!(K::RcuStall.as_str(), "rcu_stall");
    }

    /// netconsole payloads from a Debian 6.1 cloud kernel crashed with
    /// `echo c > /proc/sysrq-trigger`.
    #[test]
    fn debian_sysrq_capture() {
        const CAPTURE: &str = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/testdata/netconsole/debian-6.1-cloud-sysrq-crash.jsonl"
        );
        let text = std::fs::read_to_string(CAPTURE).expect("read capture");
        let mut payloads = Vec::new();
        for record in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(record).expect("json record");
            if v["format"] != "plain" {
                continue;
            }
            let b64 = v["payload_b64"].as_str().expect("payload_b64");
            let payload = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64");
            payloads.push(String::from_utf8(payload).expect("utf-8 payload"));
        }
        let t =
            crash_title(payloads.iter().flat_map(|p| p.split_inclusive('\n'))).expect("a title");
        assert_eq!(t.kind, K::Panic);
        assert_eq!(
            t.culprit.as_ref().map(|f| f.function.as_str()),
            Some("sysrq_handle_crash")
        );
        assert_eq!(
            t.title(),
            "kernel panic: sysrq triggered crash in sysrq_handle_crash"
        );
        assert_eq!(t.release.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(t.taint.as_deref(), Some("Not tainted"));
        assert_eq!(
            t.signature(),
            "panic: kernel panic: sysrq triggered crash in sysrq_handle_crash"
        );
    }
}
