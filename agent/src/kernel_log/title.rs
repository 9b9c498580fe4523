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
//! Report headers matched (after [`super::strip_prefix`]), x86 and arm64:
//! - faults: `BUG: unable to handle page fault for address`, `BUG: unable to
//!   handle kernel paging request at`, `BUG: kernel NULL pointer dereference`,
//!   arm64 `Unable to handle kernel paging request|NULL pointer
//!   dereference|access to user memory at virtual address`, `general
//!   protection fault`, `stack segment:`, `divide error:`, `invalid opcode:`,
//!   `int3:`, `PANIC: double fault`, arm64 `Internal error:` and `Unhandled
//!   fault:`, a bare die header `Oops: 0000 [#1]`;
//! - `kernel BUG at file:line!`, `BUG: <what>` (lib/list_debug.c and
//!   mm/usercopy.c BUGs are named like their `BUG:` forms);
//! - `WARNING: CPU: n PID: n at file:line func+0x..` (older `WARNING: at ...`),
//!   subtyped by the warning's source file like syzkaller (refcount, ODEBUG,
//!   kmalloc, locking, ...), and the lockdep reports (`possible circular
//!   locking dependency detected`, `inconsistent lock state`, ...), also in
//!   their older `[ INFO: ... ]` form;
//! - sanitizers: `BUG: KASAN:`, `BUG: KFENCE:`, `BUG: KMSAN:`, `BUG: KCSAN:`,
//!   `UBSAN:`, and kmemleak's `BUG: memory leak`;
//! - stalls: `watchdog: BUG: soft lockup`, `Watchdog detected hard LOCKUP`,
//!   `INFO: task ... blocked for more than`, `[rcu: ]INFO: rcu_* detected
//!   stall`;
//! - `Kernel panic - not syncing: <why>` (the wrapper when it follows another
//!   report, the crash itself otherwise: `Attempted to kill init!`, `VFS:
//!   Unable to mount root fs`, `stack-protector: ...`, OOM panics, sysrq).

use std::fmt::Write as _;

pub use super::frames::Frame;
use super::frames::{
    FrameRef, GENERIC, hang_culprit, matches_any, parse_arm_caller, parse_ip_frame,
    parse_trace_frame, stall_culprit, title_name,
};
use super::strip_prefix;

/// The family of a kernel crash report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashKind {
    /// `Kernel panic - not syncing: ...` with no other report before it.
    Panic,
    /// A die header (`Oops: 0000 [#1]`, arm64 `Internal error: Oops`, `Unhandled fault`).
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
        if let Some(panic) = &self.panic {
            if !self.report_title.contains(panic.as_str()) {
                let _ = write!(title, " (panic: {panic})");
            }
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

/// Replaces every run of hex or decimal digits that starts with a digit by `N`
/// (`0xffff8880`, `CPU#3`, `loop0`).
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
        prev_word = c.is_ascii_alphabetic() || c == '_';
        out.push(c);
    }
    out
}

/// The longest report considered after its header line.
const MAX_REPORT_LINES: usize = 2000;

/// Titles the first kernel report among `lines`, which may carry printk
/// prefixes. `None` when no line starts a report.
pub fn crash_title<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<CrashTitle> {
    let mut lines = lines.into_iter().map(strip_prefix);
    let mut previous = "";
    let (first, header) = lines.by_ref().find_map(|m| {
        let found = match_header(m)
            .or_else(|| embedded_header(m))
            .map(|h| (m, h))
            .or_else(|| split_hung_task(previous, m));
        previous = m;
        found
    })?;
    let mut report = Vec::with_capacity(256);
    report.push(first);
    report.extend(lines.take(MAX_REPORT_LINES));
    Some(title_report(&report, header))
}

/// Titles a crash from the panic message and a symbolised stack taken at
/// `panic()` (innermost frame first), for when the console said nothing
/// useful. The culprit is the first frame that is not panic, die or oops
/// plumbing nor otherwise generic.
pub fn title_from_stack(panic_message: &str, frames: &[Frame]) -> CrashTitle {
    let header = panic_header(panic_message);
    let refs: Vec<FrameRef<'_>> = frames
        .iter()
        .map(|f| FrameRef {
            function: &f.function,
            module: f.module.as_deref(),
        })
        .collect();
    let candidates = candidates(&refs, header.skip);
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
    }
}

/// How a report's title text is made.
#[derive(Debug, Clone, Copy)]
enum Label<'a> {
    Fixed(&'static str),
    /// A fixed start and a word from the header, e.g. `KASAN: ` + `use-after-free`.
    Joined(&'static str, &'a str),
    /// A word from the header between two fixed texts.
    Around(&'static str, &'a str, &'static str),
}

impl Label<'_> {
    fn render(self, access: Option<&str>) -> String {
        let mut s = match self {
            Label::Fixed(text) => text.to_owned(),
            Label::Joined(start, word) => format!("{start}{word}"),
            Label::Around(start, word, end) => format!("{start}{word}{end}"),
        };
        if let Some(access) = access {
            s.push(' ');
            s.push_str(access);
        }
        s
    }
}

/// Where a report's culprit is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Culprit {
    /// The report has no culprit.
    None,
    /// The faulting instruction (`RIP:`/`pc :`) and the frames after it, then the call trace.
    Ip,
    /// The call trace after the header.
    Trace,
    /// The frames right after the header (KMSAN has no `Call Trace:` line).
    Following,
    /// A stall: the frame above the first work-dispatching one, from the
    /// instruction pointer on, else the call trace.
    Stall,
    /// An RCU stall: as `Stall`, from the interrupted context.
    RcuStall,
    /// A hung task: the first frame that is not a wait primitive.
    Hang,
    /// The frames after the first line containing the marker.
    After(&'static str),
    /// The function named right after the marker on its line.
    NamedAfter(&'static str),
    /// The lockdep `at: func+0x..` lines after the marker, then the call trace.
    LockAt(&'static str),
    /// The first `at:` frame after the marker, generic or not.
    FirstAt(&'static str),
}

#[derive(Debug, Clone, Copy)]
struct Header<'a> {
    kind: CrashKind,
    label: Label<'a>,
    culprit: Culprit,
    /// Frame patterns that are generic for this kind only.
    skip: &'static [&'static str],
    /// A function named on the header line itself (`BUG: KASAN: ... in foo`).
    named: Option<&'a str>,
    /// A die header or panic line that may follow another report.
    wrapper: bool,
    /// The report title names the culprit (not for bare panics, whose message says it).
    culprit_in_title: bool,
    /// Appended to the culprit in the title (`/usb_submit_urb`).
    culprit_suffix: &'static str,
}

impl<'a> Header<'a> {
    fn new(kind: CrashKind, label: Label<'a>, culprit: Culprit) -> Self {
        Self {
            kind,
            label,
            culprit,
            skip: &[],
            named: None,
            wrapper: false,
            culprit_in_title: true,
            culprit_suffix: "",
        }
    }

    fn fixed(kind: CrashKind, label: &'static str, culprit: Culprit) -> Self {
        Self::new(kind, Label::Fixed(label), culprit)
    }

    fn skip(self, skip: &'static [&'static str]) -> Self {
        Self { skip, ..self }
    }

    fn named(self, named: Option<&'a str>) -> Self {
        Self { named, ..self }
    }

    fn wrapper(self) -> Self {
        Self {
            wrapper: true,
            ..self
        }
    }

    fn untitled_culprit(self) -> Self {
        Self {
            culprit_in_title: false,
            ..self
        }
    }
}

/// Recognises a report's first line. First-byte dispatch, no allocation.
fn match_header(m: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    use Culprit as C;
    match *m.as_bytes().first()? {
        b'B' => {
            if let Some(rest) = m.strip_prefix("BUG: ") {
                bug_header(rest)
            } else if m.starts_with("Booting the kernel.") {
                Some(Header::fixed(K::Panic, "unexpected kernel reboot", C::None))
            } else {
                None
            }
        }
        b'W' => {
            if let Some(rest) = m.strip_prefix("WARNING: ") {
                warning_header(rest)
            } else {
                watchdog_header(m)
            }
        }
        b'w' => m.strip_prefix("watchdog: ").and_then(watchdog_header),
        b'N' => m.strip_prefix("NMI watchdog: ").and_then(watchdog_header),
        b'I' => {
            if let Some(rest) = m.strip_prefix("INFO: ") {
                info_header(rest)
            } else if m.starts_with("Internal error: ") {
                Some(Header::fixed(K::Oops, "Internal error", C::Ip).wrapper())
            } else {
                None
            }
        }
        b'r' => m.strip_prefix("rcu: INFO: ").and_then(info_header),
        // lockdep before 4.14: `[ INFO: possible circular locking dependency detected ]`.
        b'[' => {
            if let Some(rest) = m.strip_prefix("[ INFO: ") {
                old_lockdep_header(rest)
            } else {
                m.strip_prefix("[ BUG: ").and_then(bug_header)
            }
        }
        b'K' => {
            if let Some(message) = m.strip_prefix("Kernel panic - not syncing: ") {
                Some(panic_header(message))
            } else {
                m.strip_prefix("Kernel BUG ")
                    .map(|_| Header::fixed(K::KernelBug, "kernel BUG", C::Ip))
            }
        }
        b'k' => m.strip_prefix("kernel BUG at ").map(kernel_bug_header),
        b'U' => {
            if let Some(what) = m.strip_prefix("Unable to handle kernel ") {
                arm64_fault_header(what)
            } else if m.starts_with("Unhandled fault: ") {
                Some(Header::fixed(K::Oops, "Unhandled fault", C::Ip))
            } else if let Some(rest) = m.strip_prefix("UBSAN: ") {
                ubsan_header(rest)
            } else {
                None
            }
        }
        b'P' => m
            .starts_with("PANIC: double fault")
            .then(|| Header::fixed(K::StackOverflow, "PANIC: double fault", C::Ip)),
        b'u' => m
            .strip_prefix("unregister_netdevice: waiting for ")
            .filter(|rest| rest.contains(" to become free"))
            .map(|_| {
                Header::fixed(
                    K::Bug,
                    "unregister_netdevice: waiting for DEV to become free",
                    C::None,
                )
            }),
        b'V' => {
            if m.starts_with("VFS: Close: file count is 0") {
                Some(Header::fixed(
                    K::Bug,
                    "VFS: Close: file count is zero (use-after-free)",
                    C::None,
                ))
            } else if m.starts_with("VFS: Busy inodes after unmount") {
                Some(Header::fixed(
                    K::Bug,
                    "VFS: Busy inodes after unmount (use-after-free)",
                    C::None,
                ))
            } else {
                None
            }
        }
        _ => die_header(m),
    }
}

/// A hung task header whose task name held a newline: `INFO: task ab` then
/// `cd:123 blocked for more than 143 seconds.`
fn split_hung_task<'a>(previous: &'a str, m: &str) -> Option<(&'a str, Header<'a>)> {
    let split = previous.starts_with("INFO: task ") && m.contains(" blocked for more than ");
    split.then(|| {
        (
            previous,
            Header::fixed(CrashKind::HungTask, "INFO: task hung", Culprit::Hang),
        )
    })
}

/// A report header after other text on the same line, as when console
/// output from two sources interleaves (`login: [ 50.9] WARNING: ...`).
/// Only after a space or `]`, and only for the unambiguous report starts.
fn embedded_header(m: &str) -> Option<Header<'_>> {
    const STARTS: &[&str] = &[
        "BUG: ",
        "WARNING: ",
        "INFO: ",
        "Kernel panic - not syncing: ",
        "kernel BUG at ",
        "general protection fault",
        "Unable to handle kernel ",
    ];
    STARTS.iter().find_map(|start| {
        m.match_indices(start)
            .filter(|&(at, _)| at > 0 && matches!(m.as_bytes()[at - 1], b' ' | b']'))
            .find_map(|(at, _)| match_header(&m[at..]))
    })
}

/// `Kernel panic - not syncing: <message>`.
fn panic_header(message: &str) -> Header<'_> {
    use CrashKind as K;
    use Culprit as C;
    const PANIC_SKIP: &[&str] = &[
        "stack_chk",
        "^schedule",
        "retint_kernel",
        "bad_stack",
        "handle_stack_overflow",
    ];
    let header = if let Some(rest) =
        message.strip_prefix("stack-protector: Kernel stack is corrupted in: ")
    {
        let named = parse_trace_frame(rest).map(|f| f.function).or_else(|| {
            let name = rest.trim_end();
            (!name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
                && !name.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(name)
        });
        Header::fixed(
            K::StackCorruption,
            "kernel panic: stack is corrupted",
            C::Trace,
        )
        .named(named)
    } else if message.starts_with("corrupted stack end") {
        Header::fixed(
            K::StackCorruption,
            "kernel panic: corrupted stack end",
            C::Stall,
        )
    } else if message.starts_with("kernel stack overflow") {
        Header::fixed(K::StackOverflow, "kernel stack overflow", C::Stall)
    } else if message.starts_with("Attempted to kill init!") {
        Header::fixed(
            K::KilledInit,
            "kernel panic: Attempted to kill init!",
            C::Trace,
        )
        .untitled_culprit()
    } else if message.starts_with("VFS: Unable to mount root fs") {
        Header::new(
            K::RootMountFailure,
            Label::Joined("kernel panic: ", message),
            C::Trace,
        )
        .untitled_culprit()
    } else if message.starts_with("Out of memory")
        || message.starts_with("System is deadlocked on memory")
    {
        Header::new(
            K::OutOfMemory,
            Label::Joined("kernel panic: ", message),
            C::Trace,
        )
        .untitled_culprit()
    } else {
        Header::new(
            K::Panic,
            // `panic_on_warn set ...`
            Label::Joined(
                "kernel panic: ",
                message.trim_end().trim_end_matches("...").trim_end(),
            ),
            C::Trace,
        )
        .untitled_culprit()
    };
    header.skip(PANIC_SKIP).wrapper()
}

/// A die header on its own: `Oops: 0002 [#1] ...`, `general protection fault: 0000 [#1]`,
/// `invalid opcode: 0000 [#1]`, or one of the traps without it.
fn die_header(m: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    use Culprit as C;
    let first = *m.as_bytes().first()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    let desc = m.strip_prefix("Oops: ").unwrap_or(m);
    let header = if desc.starts_with("general protection fault") {
        // Not the user-space `traps:` line, which has no `: ` before `error:`.
        if !(super::is_die_header(m.as_bytes()) || desc.starts_with("general protection fault:")) {
            return None;
        }
        Header::fixed(K::GeneralProtectionFault, "general protection fault", C::Ip)
    } else if desc.starts_with("stack segment: ") {
        Header::fixed(K::GeneralProtectionFault, "stack segment fault", C::Ip)
    } else if desc.starts_with("divide error: ") || desc.starts_with("divide_error: ") {
        Header::fixed(K::DivideError, "divide error", C::Ip)
    } else if desc.starts_with("invalid opcode: ") {
        Header::fixed(K::InvalidOpcode, "invalid opcode", C::Ip)
    } else if desc.starts_with("int3: ") {
        Header::fixed(K::InvalidOpcode, "int3", C::Ip)
    } else if super::is_die_header(m.as_bytes()) {
        Header::fixed(K::Oops, "Oops", C::Ip)
    } else {
        return None;
    };
    Some(header.wrapper())
}

/// arm64 `die_kernel_fault()`: `Unable to handle kernel <what> at virtual address`.
fn arm64_fault_header(what: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    use Culprit as C;
    let (kind, label) = if what.starts_with("paging request") {
        (K::PageFault, "BUG: unable to handle kernel paging request")
    } else if what.starts_with("NULL pointer dereference") {
        (
            K::NullPointerDereference,
            "BUG: unable to handle kernel NULL pointer dereference",
        )
    } else if what.starts_with("access to user memory") {
        (
            K::PageFault,
            "BUG: unable to handle kernel access to user memory",
        )
    } else if what.starts_with("execute from non-executable memory") {
        (
            K::PageFault,
            "BUG: unable to handle kernel execute from non-executable memory",
        )
    } else {
        return None;
    };
    Some(Header::fixed(kind, label, C::Ip))
}

/// `kernel BUG at <file>:<line>!`.
fn kernel_bug_header(at: &str) -> Header<'_> {
    use CrashKind as K;
    use Culprit as C;
    if at.starts_with("mm/usercopy.c") {
        Header::fixed(K::Bug, "BUG: bad usercopy", C::Trace).skip(&["usercopy", "__check"])
    } else if at.starts_with("lib/list_debug.c") {
        Header::fixed(K::Bug, "BUG: corrupted list", C::Trace)
    } else {
        Header::fixed(K::KernelBug, "kernel BUG", C::Ip).skip(&["^skb_"])
    }
}

/// `UBSAN: <what> in <file>:<line>`.
fn ubsan_header(rest: &str) -> Option<Header<'_>> {
    const SKIP: &[&str] = &["ubsan", "overflow"];
    let label = if rest.starts_with("Undefined behaviour in") {
        Label::Fixed("UBSAN: undefined-behaviour")
    } else {
        let (what, _) = rest.split_once(" in ")?;
        Label::Joined("UBSAN: ", what)
    };
    Some(Header::new(CrashKind::Ubsan, label, Culprit::Trace).skip(SKIP))
}

/// Lines after `watchdog: ` / `NMI watchdog: `, or a bare hard lockup line.
fn watchdog_header(rest: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    use Culprit as C;
    if rest.starts_with("BUG: soft lockup") {
        return Some(Header::fixed(K::SoftLockup, "BUG: soft lockup", C::Stall));
    }
    let rest = match rest.strip_prefix("CPU") {
        Some(after) => after.split_once(": ").map_or(rest, |(_, r)| r),
        None => rest,
    };
    rest.starts_with("Watchdog detected hard LOCKUP")
        .then(|| Header::fixed(K::HardLockup, "hard LOCKUP", C::Stall))
}

/// The text after `BUG: `.
fn bug_header(rest: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    use Culprit as C;
    if let Some(what) = rest.strip_prefix("KASAN: ") {
        return Some(kasan_header(what));
    }
    if let Some(what) = rest.strip_prefix("KFENCE: ") {
        let (label, named) = match what.split_once(" in ") {
            Some((label, func)) => (label, Some(func)),
            None => (what, None),
        };
        let named = named.map(|f| f.split([' ', '+']).next().unwrap_or(f));
        return Some(
            Header::new(K::Kfence, Label::Joined("KFENCE: ", label), C::Following).named(named),
        );
    }
    if let Some(what) = rest.strip_prefix("KMSAN: ") {
        let label = what.split_once(" in ").map_or(what, |(l, _)| l);
        const SKIP: &[&str] = &[
            "alloc_skb",
            "netlink_ack",
            "netlink_rcv_skb",
            "_encrypt$",
            "^crypto_",
            "^cipher_",
            "^drbg_",
            "^rng_",
            "usb_start_wait_urb",
            "usb_bulk_msg",
            "usb_interrupt_msg",
        ];
        return Some(
            Header::new(K::Kmsan, Label::Joined("KMSAN: ", label), C::Following).skip(SKIP),
        );
    }
    if let Some(what) = rest.strip_prefix("KCSAN: ") {
        let (label, named) = match what.split_once(" in ") {
            Some((label, funcs)) => (label, Some(funcs)),
            None => (what, None),
        };
        return Some(Header::new(K::Kcsan, Label::Joined("KCSAN: ", label), C::None).named(named));
    }
    let header = if rest.starts_with("unable to handle kernel paging request")
        || rest.starts_with("unable to handle page fault")
        || rest.starts_with("Unable to handle kernel data access")
    {
        Header::fixed(
            K::PageFault,
            "BUG: unable to handle kernel paging request",
            C::Ip,
        )
    } else if rest.starts_with("unable to handle kernel NULL pointer dereference")
        || rest.starts_with("kernel NULL pointer dereference")
        || rest.starts_with("Kernel NULL pointer dereference")
    {
        Header::fixed(
            K::NullPointerDereference,
            "BUG: unable to handle kernel NULL pointer dereference",
            C::Ip,
        )
    } else if rest.starts_with("unable to handle kernel") {
        // The rest of the line went missing.
        Header::fixed(K::PageFault, "BUG: unable to handle kernel", C::Ip)
    } else if rest.starts_with("soft lockup") {
        Header::fixed(K::SoftLockup, "BUG: soft lockup", C::Stall)
    } else if let Some(lock) = rest
        .strip_prefix("spinlock ")
        .or_else(|| rest.strip_prefix("rwlock "))
    {
        let label = if rest.starts_with("spinlock ") {
            "BUG: spinlock "
        } else {
            "BUG: rwlock "
        };
        let what = lock
            .find(" on CPU")
            .or_else(|| lock.find(':'))
            .map_or(lock, |end| &lock[..end]);
        Header::new(K::Bug, Label::Joined(label, what), C::Trace)
            .skip(&["spin_", "_lock", "_unlock"])
    } else if rest.starts_with("scheduling while atomic") {
        Header::fixed(K::Bug, "BUG: scheduling while atomic", C::Trace).skip(&["schedule"])
    } else if rest.starts_with("sleeping function called from invalid context") {
        Header::fixed(
            K::Bug,
            "BUG: sleeping function called from invalid context",
            C::Trace,
        )
    } else if let Some(what) = rest
        .strip_prefix("using ")
        .filter(|w| w.contains("() in preemptible"))
    {
        let func = &what[..what.find("()").unwrap_or(0)];
        Header::new(
            K::Bug,
            Label::Around("BUG: using ", func, "() in preemptible code"),
            C::Trace,
        )
        .skip(&[
            "dump_stack",
            "preemption",
            "preempt",
            "debug_",
            "processor_id",
            "this_cpu",
        ])
    } else if rest.starts_with("Bad page state") || rest.starts_with("Bad page cache") {
        const SKIP: &[&str] = &[
            "free_page",
            "put_page",
            "get_page",
            "update_page",
            "release_page",
            "free_unref",
            "folio",
            "truncate_inode_pages",
            "page_frag_free",
            "alloc",
            "vmap",
            "page_owner",
        ];
        let label = if rest.starts_with("Bad page state") {
            "BUG: Bad page state"
        } else {
            "BUG: Bad page cache"
        };
        Header::fixed(K::Bug, label, C::After("page last allocated")).skip(SKIP)
    } else if rest.starts_with("Bad page map") {
        Header::fixed(K::Bug, "BUG: Bad page map", C::None)
    } else if rest.starts_with("Bad rss-counter state") {
        Header::fixed(K::Bug, "BUG: Bad rss-counter state", C::None)
    } else if rest.starts_with("workqueue lockup") {
        Header::fixed(K::Bug, "BUG: workqueue lockup", C::None)
    } else if rest.starts_with("workqueue leaked lock or atomic") {
        Header::fixed(
            K::Bug,
            "BUG: workqueue leaked lock or atomic",
            C::NamedAfter("last function:"),
        )
    } else if rest.starts_with("memory leak") {
        const SKIP: &[&str] = &[
            "kmemleak",
            "mmap",
            "kmem",
            "slab",
            "alloc",
            "create_object",
            "idr_get",
            "list_lru_init",
            "kasprintf",
            "kvasprintf",
            "pcpu_create",
            "strdup",
            "strndup",
            "memdup",
        ];
        Header::fixed(K::MemoryLeak, "memory leak", C::After("backtrace")).skip(SKIP)
    } else if rest.contains("stack guard page was hit") {
        Header::fixed(K::StackOverflow, "BUG: stack guard page was hit", C::Stall)
    } else if rest.starts_with("Invalid wait context") {
        Header::fixed(K::Lockdep, "WARNING: locking bug", C::Trace)
            .skip(&["lock_sock", "release_sock"])
    } else if rest.starts_with("Dentry ") && rest.contains(" still in use") {
        // `BUG: Dentry ffff..{i=..,n=..}  still in use (1) [unmount of proc proc]`
        let label = if rest.contains("[unmount of ") {
            "BUG: Dentry still in use in unmount"
        } else {
            "BUG: Dentry still in use"
        };
        Header::fixed(K::Bug, label, C::None)
    } else if rest.contains("still has locks held!") {
        Header::fixed(
            K::Lockdep,
            "BUG: still has locks held",
            C::LockAt("locks held"),
        )
    } else if rest.starts_with("bad unlock balance detected!") {
        Header::fixed(
            K::Lockdep,
            "BUG: bad unlock balance",
            C::LockAt("release lock"),
        )
    } else if rest.starts_with("held lock freed!") {
        Header::fixed(
            K::Lockdep,
            "BUG: held lock freed",
            C::LockAt("is freeing memory"),
        )
    } else if rest.starts_with("lock held when returning to user space") {
        Header::fixed(
            K::Lockdep,
            "BUG: lock held when returning to user space",
            C::LockAt("locks still held"),
        )
    } else {
        return generic_bug_header(rest);
    };
    Some(header)
}

/// `BUG: <text>` for reports not named above: the text up to the first
/// detail (`:` or `(`), with the call trace.
fn generic_bug_header(rest: &str) -> Option<Header<'_>> {
    let end = rest.find([':', '(', '[']).unwrap_or(rest.len());
    let what = rest[..end].trim_end();
    let plausible = what.len() >= 4 && what.as_bytes()[0].is_ascii_alphabetic();
    plausible.then(|| Header::new(CrashKind::Bug, Label::Joined("BUG: ", what), Culprit::Trace))
}

/// `BUG: KASAN: <type> in <func>` and the invalid-free forms.
fn kasan_header(what: &str) -> Header<'_> {
    let (bug, func) = match what.split_once(" in ") {
        Some((bug, func)) => (bug, Some(func)),
        None => (what.split_once(" on ").map_or(what, |(b, _)| b), None),
    };
    let named = func.map(|f| f.split([' ', '+']).next().unwrap_or(f));
    if matches!(
        bug,
        "double-free or invalid-free" | "double-free" | "invalid-free"
    ) {
        return Header::fixed(CrashKind::Kasan, "KASAN: invalid-free", Culprit::Trace)
            .named(named)
            .skip(&["slab_", "kfree", "vunmap", "vfree"]);
    }
    Header::new(
        CrashKind::Kasan,
        Label::Joined("KASAN: ", bug),
        Culprit::Trace,
    )
    .named(named)
    .skip(&["kernel_fault", "tag_check", "mem_abort", "^el1_", "^el1h_"])
}

/// The text after `WARNING: `.
fn warning_header(rest: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    use Culprit as C;
    if let Some(header) = lockdep_header(rest) {
        return Some(header);
    }
    if rest.starts_with("kernel stack regs") || rest.starts_with("kernel stack frame pointer") {
        return Some(Header::fixed(
            K::Warning,
            "WARNING: kernel stack regs has bad value",
            C::None,
        ));
    }
    // `CPU: 0 PID: 1 at kernel/x.c:12 func+0x..`, `at kernel/x.c:12 func()`, `kernel/x.c:12 at func`.
    let src = warning_source(rest)?;
    const ODEBUG_SKIP: &[&str] = &[
        "debug_",
        "rcu",
        "hrtimer_",
        "timer_",
        "work_",
        "percpu_",
        "vunmap",
        "vfree",
        "__free_",
        "debug_check",
        "kobject_",
    ];
    let header = if src.starts_with("lib/debugobjects.c") {
        Header::fixed(K::Warning, "WARNING: ODEBUG bug", C::Ip).skip(ODEBUG_SKIP)
    } else if src.starts_with("mm/usercopy.c") {
        Header::fixed(K::Warning, "WARNING: bad usercopy", C::Ip).skip(&["usercopy", "__check"])
    } else if src.starts_with("lib/kobject.c") {
        Header::fixed(K::Warning, "WARNING: kobject bug", C::Ip).skip(&["kobject_"])
    } else if src.starts_with("fs/proc/generic.c") {
        Header::fixed(K::Warning, "WARNING: proc registration bug", C::Ip).skip(&["proc_"])
    } else if src.starts_with("lib/refcount.c") {
        Header::fixed(K::Warning, "WARNING: refcount bug", C::Ip).skip(&["refcount", "kobject_"])
    } else if src.starts_with("kernel/locking/lockdep.c") && rest.contains("lock_") {
        Header::fixed(K::Lockdep, "WARNING: locking bug", C::Ip)
            .skip(&["lock_sock", "release_sock"])
    } else if src.starts_with("mm/vmalloc.c") && rest.contains("__vmalloc_node") {
        Header::fixed(K::Warning, "WARNING: zero-size vmalloc", C::Ip)
    } else if rest.contains(" usb_submit_urb") {
        // Bad URBs: the driver that submitted it is the culprit.
        Header {
            culprit_suffix: "/usb_submit_urb",
            ..Header::fixed(K::Warning, "WARNING", C::Ip).skip(&[
                "usb_submit_urb",
                "usb_start_wait_urb",
                "usb_bulk_msg",
                "usb_interrupt_msg",
                "usb_control_msg",
            ])
        }
    } else if src.starts_with("mm/") && is_kmalloc_warning(rest) {
        Header::fixed(K::Warning, "WARNING: kmalloc bug", C::Ip)
            .skip(&["kmalloc", "krealloc", "slab", "kmem"])
    } else {
        Header::fixed(K::Warning, "WARNING", C::Ip)
    };
    Some(header)
}

/// A word with `malloc` at most two characters in (`kmalloc`, `kvmalloc`, `__kmalloc` is not).
fn is_kmalloc_warning(rest: &str) -> bool {
    rest.split(' ')
        .any(|word| word.find("malloc").is_some_and(|at| at <= 2))
}

/// The `file.c:line` of a WARNING header.
fn warning_source(rest: &str) -> Option<&str> {
    rest.split(' ').find(|word| {
        word.split_once(':').is_some_and(|(file, line)| {
            file.contains('.') && !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit())
        })
    })
}

/// lockdep's report headers, after `WARNING: ` or the older `[ INFO: `.
fn lockdep_header(rest: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    use Culprit as C;
    const WORKQUEUE: &[&str] = &[
        "process_one_work",
        "flush_workqueue",
        "drain_workqueue",
        "destroy_workqueue",
    ];
    let header = if rest.starts_with("possible circular locking dependency detected") {
        Header::fixed(
            K::Lockdep,
            "possible deadlock",
            C::LockAt("is trying to acquire lock"),
        )
        .skip(WORKQUEUE)
    } else if rest.starts_with("possible irq lock inversion dependency detected") {
        Header::fixed(
            K::Lockdep,
            "possible deadlock",
            C::LockAt("just changed the state of lock"),
        )
    } else if rest.contains("-safe -> ") && rest.contains("-unsafe lock order detected") {
        Header::fixed(K::Lockdep, "possible deadlock", C::After("which became"))
    } else if rest.starts_with("possible recursive locking detected") {
        Header::fixed(
            K::Lockdep,
            "possible deadlock",
            C::LockAt("is trying to acquire lock"),
        )
    } else if rest.starts_with("inconsistent lock state") {
        Header::fixed(K::Lockdep, "inconsistent lock state", C::Trace)
    } else if rest.starts_with("suspicious RCU usage") {
        Header::fixed(K::Lockdep, "WARNING: suspicious RCU usage", C::Trace)
            .skip(&["rcu", "kmem", "slab"])
    } else if rest.starts_with("bad unlock balance detected!") {
        Header::fixed(
            K::Lockdep,
            "WARNING: bad unlock balance",
            C::LockAt("release lock"),
        )
    } else if rest.starts_with("held lock freed!") {
        Header::fixed(
            K::Lockdep,
            "WARNING: held lock freed",
            C::LockAt("is freeing memory"),
        )
    } else if rest.contains("still has locks held!") {
        Header::fixed(
            K::Lockdep,
            "WARNING: still has locks held",
            C::LockAt("locks held"),
        )
    } else if rest.starts_with("Nested lock was not taken") {
        Header::fixed(
            K::Lockdep,
            "WARNING: nested lock was not taken",
            C::LockAt("is trying to lock"),
        )
    } else if rest.starts_with("lock held when returning to user space") {
        Header::fixed(
            K::Lockdep,
            "WARNING: lock held when returning to user space",
            C::LockAt("locks still held"),
        )
    } else {
        return None;
    };
    Some(header)
}

/// Old lockdep headers name the culprit at the first `at:` after the
/// sentence that introduces the lock, with no frame skipped.
fn old_lockdep_header(rest: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    let (label, marker) = if rest.starts_with("possible circular locking dependency detected")
        || rest.starts_with("possible recursive locking detected")
    {
        ("possible deadlock", "is trying to acquire")
    } else if rest.starts_with("possible irq lock inversion dependency detected") {
        ("possible deadlock", "just changed the state of lock")
    } else if rest.contains("-safe -> ") && rest.contains("-unsafe lock order detected") {
        ("possible deadlock", "is trying to acquire")
    } else if rest.starts_with("inconsistent lock state") {
        ("inconsistent lock state", "takes")
    } else {
        return info_header(rest);
    };
    Some(Header::fixed(K::Lockdep, label, Culprit::FirstAt(marker)))
}

/// The text after `INFO: `.
fn info_header(rest: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    use Culprit as C;
    if let Some(task) = rest.strip_prefix("task ") {
        if task.contains(" blocked for more than ")
            || task.contains(" blocked in I/O wait for more than ")
        {
            return Some(Header::fixed(K::HungTask, "INFO: task hung", C::Hang));
        }
        if task.contains(" can't die for more than ") {
            return Some(
                Header::fixed(K::HungTask, "INFO: task can't die", C::Trace).skip(&["schedule"]),
            );
        }
        return None;
    }
    if rest.starts_with("rcu_") || rest.starts_with("rcu ") {
        let verb = rest.split_once(' ')?.1;
        let stall = verb.starts_with("detected stall")
            || verb.starts_with("self-detected stall")
            || verb.starts_with("detected expedited stall");
        return stall.then(|| {
            Header::fixed(K::RcuStall, "INFO: rcu detected stall", C::RcuStall)
                .skip(&["apic_timer_interrupt", "rcu"])
        });
    }
    if rest.starts_with("trying to register non-static key") {
        return Some(
            Header::fixed(
                K::Lockdep,
                "INFO: trying to register non-static key",
                C::Trace,
            )
            .skip(&["stack", "lock", "IRQ"]),
        );
    }
    if rest.starts_with("suspicious RCU usage") {
        return Some(
            Header::fixed(K::Lockdep, "INFO: suspicious RCU usage", C::Trace)
                .skip(&["rcu", "kmem", "slab"]),
        );
    }
    lockdep_header(rest)
}

/// Titles the report that starts at `report[0]`.
fn title_report(report: &[&str], header: Header<'_>) -> CrashTitle {
    let end = report_end(report, &header);
    let body = &report[..end];
    let panic = report
        .iter()
        .find_map(|m| m.strip_prefix("Kernel panic - not syncing: "))
        .map(|p| p.trim_end().to_owned());
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
        Culprit::FirstAt(_) => frames.frames.iter().map(|f| f.to_frame()).collect(),
        _ => candidates(&frames.frames, header.skip),
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
            None => (format!("{label} in corrupted"), None, true),
        },
    };
    let mut frames_out = candidates;
    frames_out.truncate(5);
    CrashTitle {
        kind: header.kind,
        report_title,
        culprit,
        frames: frames_out,
        panic,
        release,
        taint,
        corrupted,
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

/// Frames of a report in the order a culprit is looked for.
struct ReportFrames<'a> {
    frames: Vec<FrameRef<'a>>,
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

fn culprit_frames<'a>(body: &[&'a str], header: &Header<'a>) -> ReportFrames<'a> {
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
    ReportFrames { frames }
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
