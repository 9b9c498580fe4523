//! Kernel report headers: which line starts a report, its title text and
//! where its culprit is printed.
//!
//! Headers matched (after `strip_prefix`), x86 and arm64 wording:
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
//!   Unable to mount root fs`, `stack-protector: ...`, OOM panics, sysrq);
//! - reports without a stack: `unregister_netdevice: waiting for ... to become
//!   free`, `VFS: Close: file count is 0`, `VFS: Busy inodes after unmount`,
//!   and the decompressor's `Booting the kernel.` (a restart with no report).

use super::frames::parse_trace_frame;
use super::title::CrashKind;

/// How a report's title text is made.
#[derive(Debug, Clone, Copy)]
pub(super) enum Label<'a> {
    Fixed(&'static str),
    /// A fixed start and a word from the header, e.g. `KASAN: ` + `use-after-free`.
    Joined(&'static str, &'a str),
    /// A word from the header between two fixed texts.
    Around(&'static str, &'a str, &'static str),
}

impl Label<'_> {
    pub(super) fn render(self, access: Option<&str>) -> String {
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
pub(super) enum Culprit {
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
pub(super) struct Header<'a> {
    pub(super) kind: CrashKind,
    pub(super) label: Label<'a>,
    pub(super) culprit: Culprit,
    /// Frame patterns that are generic for this kind only.
    pub(super) skip: &'static [&'static str],
    /// A function named on the header line itself (`BUG: KASAN: ... in foo`).
    pub(super) named: Option<&'a str>,
    /// A die header or panic line that may follow another report.
    pub(super) wrapper: bool,
    /// The report title names the culprit (not for bare panics, whose message says it).
    pub(super) culprit_in_title: bool,
    /// Appended to the culprit in the title (`/usb_submit_urb`).
    pub(super) culprit_suffix: &'static str,
    /// A `BUG:` line of no known form: may be user text, has no stack to
    /// be missing.
    pub(super) unknown: bool,
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
            unknown: false,
        }
    }

    fn fixed(kind: CrashKind, label: &'static str, culprit: Culprit) -> Self {
        Self::new(kind, Label::Fixed(label), culprit)
    }

    /// Titled with the kind's own prefix.
    fn of(kind: CrashKind, culprit: Culprit) -> Self {
        Self::fixed(kind, kind.prefix(), culprit)
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
pub(super) fn match_header(m: &str) -> Option<Header<'_>> {
    use CrashKind as K;
    use Culprit as C;
    match *m.as_bytes().first()? {
        b'B' => {
            if let Some(rest) = m.strip_prefix("BUG: ") {
                bug_header(rest)
            } else if m.starts_with("Booting the kernel.") {
                // The decompressor on a serial console: the machine restarted
                // without printing a report.
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
                    .map(|_| Header::of(K::KernelBug, C::Ip))
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
pub(super) fn split_hung_task<'a>(previous: &'a str, m: &str) -> Option<(&'a str, Header<'a>)> {
    let split = previous.starts_with("INFO: task ") && m.contains(" blocked for more than ");
    split.then(|| (previous, Header::of(CrashKind::HungTask, Culprit::Hang)))
}

/// A report header after other text on the same line, as when console
/// output from two sources interleaves (`login: [ 50.9] WARNING: ...`).
/// Only after a space or `]` (a panic line after anything), only for the
/// unambiguous report starts, and a `BUG:` of no known form only right
/// after a printk timestamp.
pub(super) fn embedded_header(m: &str) -> Option<Header<'_>> {
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
            .filter(|&(at, _)| {
                at > 0
                    && (matches!(m.as_bytes()[at - 1], b' ' | b']')
                        || start.starts_with("Kernel panic"))
            })
            .find_map(|(at, _)| {
                let header = match_header(&m[at..])?;
                (!header.unknown || m[..at].ends_with("] ")).then_some(header)
            })
    })
}

/// `Kernel panic - not syncing: <message>`.
pub(super) fn panic_header(message: &str) -> Header<'_> {
    use CrashKind as K;
    use Culprit as C;
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
        Header::of(K::StackCorruption, C::Trace)
            .named(named)
            .skip(&["stack_chk"])
    } else if message.starts_with("corrupted stack end") {
        Header::fixed(
            K::StackCorruption,
            "kernel panic: corrupted stack end",
            C::Stall,
        )
        .skip(&["^schedule", "retint_kernel"])
    } else if message.starts_with("kernel stack overflow") {
        Header::of(K::StackOverflow, C::Stall).skip(&["bad_stack", "handle_stack_overflow"])
    } else if message.starts_with("Attempted to kill init!") {
        Header::of(K::KilledInit, C::Trace).untitled_culprit()
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
        .skip(&["oom", "out_of_memory", "alloc"])
    } else {
        Header::new(
            wrapper_kind(message),
            // `panic_on_warn set ...`
            Label::Joined(
                "kernel panic: ",
                message.trim_end().trim_end_matches("...").trim_end(),
            ),
            C::Trace,
        )
        .untitled_culprit()
    };
    header.wrapper()
}

/// The kind of report a generic panic message wraps, for when the report
/// itself is missing (as in the agent's stack taken at `panic()`).
fn wrapper_kind(message: &str) -> CrashKind {
    const WRAPPERS: &[(&str, CrashKind)] = &[
        ("Fatal exception", CrashKind::Oops),
        ("panic_on_warn set", CrashKind::Warning),
        ("kernel: panic_on_warn set", CrashKind::Warning),
        ("softlockup: hung tasks", CrashKind::SoftLockup),
        ("Hard LOCKUP", CrashKind::HardLockup),
        ("hung_task: blocked tasks", CrashKind::HungTask),
        ("RCU Stall", CrashKind::RcuStall),
    ];
    // arm64 prefixes its die string: `Oops: Fatal exception`.
    let message = message.strip_prefix("Oops: ").unwrap_or(message);
    WRAPPERS
        .iter()
        .find(|(start, _)| message.starts_with(start))
        .map_or(CrashKind::Panic, |&(_, kind)| kind)
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
        Header::of(K::GeneralProtectionFault, C::Ip)
    } else if desc.starts_with("stack segment: ") {
        Header::fixed(K::GeneralProtectionFault, "stack segment fault", C::Ip)
    } else if desc.starts_with("divide error: ") || desc.starts_with("divide_error: ") {
        Header::of(K::DivideError, C::Ip)
    } else if desc.starts_with("invalid opcode: ") {
        Header::of(K::InvalidOpcode, C::Ip)
    } else if desc.starts_with("int3: ") {
        Header::fixed(K::InvalidOpcode, "int3", C::Ip)
    } else if super::is_die_header(m.as_bytes()) {
        Header::of(K::Oops, C::Ip)
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
        Header::of(K::KernelBug, C::Ip).skip(&["^skb_"])
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
        return Some(Header::of(K::SoftLockup, C::Stall));
    }
    let rest = match rest.strip_prefix("CPU") {
        Some(after) => after.split_once(": ").map_or(rest, |(_, r)| r),
        None => rest,
    };
    rest.starts_with("Watchdog detected hard LOCKUP")
        .then(|| Header::of(K::HardLockup, C::Stall))
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
        Header::of(K::PageFault, C::Ip)
    } else if rest.starts_with("unable to handle kernel NULL pointer dereference")
        || rest.starts_with("kernel NULL pointer dereference")
        || rest.starts_with("Kernel NULL pointer dereference")
    {
        Header::of(K::NullPointerDereference, C::Ip)
    } else if rest.starts_with("unable to handle kernel") {
        // The rest of the line went missing.
        Header::fixed(K::PageFault, "BUG: unable to handle kernel", C::Ip)
    } else if rest.starts_with("soft lockup") {
        Header::of(K::SoftLockup, C::Stall)
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
        Header::of(K::MemoryLeak, C::After("backtrace")).skip(SKIP)
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
    plausible.then(|| Header {
        unknown: true,
        ..Header::new(CrashKind::Bug, Label::Joined("BUG: ", what), Culprit::Trace)
    })
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
    let Some(src) = warning_source(rest) else {
        // Without CONFIG_DEBUG_BUGVERBOSE: `WARNING: CPU: 0 PID: 1 at func+0x12/0x40`.
        let at = rest.strip_prefix("CPU: ")?.split_once(" at ")?.1;
        return parse_trace_frame(at).map(|_| Header::of(K::Warning, C::Ip));
    };
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
            ..Header::of(K::Warning, C::Ip).skip(&[
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
        Header::of(K::Warning, C::Ip)
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
        Header::of(K::Lockdep, C::LockAt("is trying to acquire lock")).skip(WORKQUEUE)
    } else if rest.starts_with("possible irq lock inversion dependency detected") {
        Header::of(K::Lockdep, C::LockAt("just changed the state of lock"))
    } else if rest.contains("-safe -> ") && rest.contains("-unsafe lock order detected") {
        Header::of(K::Lockdep, C::After("which became"))
    } else if rest.starts_with("possible recursive locking detected") {
        Header::of(K::Lockdep, C::LockAt("is trying to acquire lock"))
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
            return Some(Header::of(K::HungTask, C::Hang));
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
        return stall
            .then(|| Header::of(K::RcuStall, C::RcuStall).skip(&["apic_timer_interrupt", "rcu"]));
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
