//! Classifier for kernel console messages.
//!
//! The node agent feeds it the text of the printk `console` tracepoint and the
//! controller feeds it netconsole lines; both share this one matcher so a crash
//! is named the same way on either path.
//!
//! Matching works on the message after [`strip_prefix`] and compares it against
//! the literal formats printed by the kernel (x86 first, plus the arm64 fault
//! and die wording). Only the start of the message is anchored, so user text
//! that merely mentions "panic" or "BUG" somewhere is not matched. One crash
//! usually produces several matching lines (e.g. `BUG: kernel NULL pointer
//! dereference`, then the `Oops:` header, then `Kernel panic - not syncing:
//! Fatal exception`); callers decide how to group them.
//!
//! No regex, no allocation: a first-byte dispatch rejects most lines at once.
//!
//! [`crash_title`] goes further for one incident: over all of a sender's
//! recent lines it names the crash and its culprit function (see `title`).

use serde::Serialize;

mod frames;
mod headers;
mod title;

pub use title::{CrashKind, CrashTitle, Frame, crash_title, title_from_stack};

/// What kind of kernel failure a console line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelEventKind {
    /// `Kernel panic - not syncing: ...` (kernel/panic.c).
    Panic,
    /// A die() header such as `Oops: 0002 [#1] PREEMPT SMP NOPTI`.
    Oops,
    /// `BUG: unable to handle page fault ...` / `BUG: kernel NULL pointer dereference ...`.
    PageFault,
    /// The die() header of a general protection fault.
    GeneralProtectionFault,
    /// `kernel BUG at file:line!` and `BUG: ` lines without a more specific kind.
    KernelBug,
    /// `watchdog: BUG: soft lockup - CPU#N stuck for Ns! [comm:pid]`.
    SoftLockup,
    /// `Watchdog detected hard LOCKUP on cpu N`.
    HardLockup,
    /// `INFO: task comm:pid blocked for more than N seconds.`
    HungTask,
    /// `rcu: INFO: rcu_* detected stalls ...` / `... self-detected stall on CPU`.
    RcuStall,
    /// `Out of memory: Killed process ...` and the memory cgroup variant.
    OutOfMemory,
}

impl KernelEventKind {
    /// Every kind, in declaration order.
    pub const ALL: [Self; 10] = [
        Self::Panic,
        Self::Oops,
        Self::PageFault,
        Self::GeneralProtectionFault,
        Self::KernelBug,
        Self::SoftLockup,
        Self::HardLockup,
        Self::HungTask,
        Self::RcuStall,
        Self::OutOfMemory,
    ];

    /// The snake_case name, identical to the serde representation.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Panic => "panic",
            Self::Oops => "oops",
            Self::PageFault => "page_fault",
            Self::GeneralProtectionFault => "general_protection_fault",
            Self::KernelBug => "kernel_bug",
            Self::SoftLockup => "soft_lockup",
            Self::HardLockup => "hard_lockup",
            Self::HungTask => "hung_task",
            Self::RcuStall => "rcu_stall",
            Self::OutOfMemory => "out_of_memory",
        }
    }

    /// Only a panic stops the machine; the others may be survived.
    pub fn is_fatal(self) -> bool {
        matches!(self, Self::Panic)
    }

    /// PascalCase reason for Kubernetes events and node conditions.
    pub fn reason_code(self) -> &'static str {
        match self {
            Self::Panic => "KernelPanic",
            Self::Oops => "KernelOops",
            Self::PageFault => "KernelPageFault",
            Self::GeneralProtectionFault => "KernelGeneralProtectionFault",
            Self::KernelBug => "KernelBug",
            Self::SoftLockup => "KernelSoftLockup",
            Self::HardLockup => "KernelHardLockup",
            Self::HungTask => "KernelHungTask",
            Self::RcuStall => "KernelRCUStall",
            Self::OutOfMemory => "KernelOOMKill",
        }
    }
}

/// A console line recognised as a kernel failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified<'a> {
    pub kind: KernelEventKind,
    /// The line without timestamp, caller id and trailing newline.
    pub message: &'a str,
}

/// Classifies one console line, or returns `None` for ordinary output.
pub fn classify(line: &str) -> Option<Classified<'_>> {
    let message = strip_prefix(line);
    match_kind(message.as_bytes()).map(|kind| Classified { kind, message })
}

/// Removes the printk prefixes and the trailing newline.
///
/// Handles a syslog priority `<6>` (as in pstore's dumps of the kernel log), a
/// timestamp `[   12.345678]`, a caller id `[    T1]` / `[  C0]`
/// (CONFIG_PRINTK_CALLER), both together with or without a space between them,
/// one space after them, and any trailing `\n` / `\r`. Anything else is left
/// untouched, e.g. `[drm] ...` keeps its bracket.
pub fn strip_prefix(line: &str) -> &str {
    let mut s = line.trim_end_matches(['\n', '\r']);
    if let Some(rest) = strip_priority(s) {
        s = rest;
    }
    if let Some(rest) = strip_bracketed(s, is_timestamp) {
        s = rest;
    }
    if let Some(rest) = strip_bracketed(s, is_caller_id) {
        s = rest;
    }
    s
}

/// The CONFIG_PRINTK_CALLER id of a line, `T123` (task) or `C1` (CPU in
/// interrupt context), when it has one.
fn caller_id(line: &str) -> Option<&str> {
    let s = strip_priority(line).unwrap_or(line);
    let s = strip_bracketed(s, is_timestamp).unwrap_or(s);
    let rest = s.strip_prefix('[')?;
    let inner = rest[..rest.find(']')?].trim_start_matches(' ');
    is_caller_id(inner.as_bytes()).then_some(inner)
}

/// Strips a syslog priority, `<` facility × 8 + level `>`: one to three digits.
fn strip_priority(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('<')?;
    let end = rest.find('>')?;
    ((1..=3).contains(&end) && all_digits(&rest.as_bytes()[..end])).then(|| &rest[end + 1..])
}

/// Strips `[inner]` plus one optional space when `inner` satisfies `accept`.
fn strip_bracketed(s: &str, accept: fn(&[u8]) -> bool) -> Option<&str> {
    let rest = s.strip_prefix('[')?;
    let end = rest.find(']')?;
    if !accept(&rest.as_bytes()[..end]) {
        return None;
    }
    let rest = &rest[end + 1..];
    Some(rest.strip_prefix(' ').unwrap_or(rest))
}

/// `   12.345678`: left padding, seconds, a dot, fraction.
fn is_timestamp(inner: &[u8]) -> bool {
    let digits = trim_leading_spaces(inner);
    let Some(dot) = digits.iter().position(|&b| b == b'.') else {
        return false;
    };
    let (secs, frac) = (&digits[..dot], &digits[dot + 1..]);
    all_digits(secs) && all_digits(frac)
}

/// `    T1` / `  C0`: left padding, `T` (task) or `C` (cpu), a number.
fn is_caller_id(inner: &[u8]) -> bool {
    match trim_leading_spaces(inner) {
        [b'T' | b'C', id @ ..] => all_digits(id),
        _ => false,
    }
}

fn trim_leading_spaces(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&c| c != b' ').unwrap_or(b.len());
    &b[start..]
}

/// Non-empty and ASCII digits only.
fn all_digits(b: &[u8]) -> bool {
    !b.is_empty() && b.iter().all(u8::is_ascii_digit)
}

fn match_kind(m: &[u8]) -> Option<KernelEventKind> {
    use KernelEventKind as K;

    let first = *m.first()?;
    let specific = match first {
        b'K' => {
            if m.starts_with(b"Kernel panic - not syncing: ") {
                Some(K::Panic)
            } else if m.starts_with(b"Kernel BUG at ") {
                // lib/bug.c without CONFIG_DEBUG_BUGVERBOSE file info.
                Some(K::KernelBug)
            } else {
                None
            }
        }
        b'k' => m.starts_with(b"kernel BUG at ").then_some(K::KernelBug),
        b'B' => m.strip_prefix(b"BUG: ").map(bug_kind),
        // pr_fmt of kernel/watchdog.c ("watchdog: "), of watchdog_hld.c /
        // watchdog_perf.c and older watchdog.c ("NMI watchdog: "); very old
        // kernels print the hard lockup line with no prefix.
        b'w' => m.strip_prefix(b"watchdog: ").and_then(watchdog_kind),
        b'N' => m.strip_prefix(b"NMI watchdog: ").and_then(watchdog_kind),
        b'W' => watchdog_kind(m),
        // Older kernels print the RCU and hung task lines without "rcu: ".
        b'I' => m.strip_prefix(b"INFO: ").and_then(info_kind),
        b'r' => m.strip_prefix(b"rcu: INFO: ").and_then(info_kind),
        b'O' => m
            .strip_prefix(b"Out of memory")
            .and_then(|rest| is_oom_kill(rest).then_some(K::OutOfMemory)),
        b'M' => m
            .strip_prefix(b"Memory cgroup out of memory")
            .and_then(|rest| is_oom_kill(rest).then_some(K::OutOfMemory)),
        // arm64 arch/arm64/mm/fault.c: die_kernel_fault().
        b'U' => m
            .starts_with(b"Unable to handle kernel ")
            .then_some(K::PageFault),
        _ => None,
    };
    specific.or_else(|| {
        // The die() header can start with any die string ("Oops", "invalid
        // opcode", "general protection fault, ...", arm64 "Internal error").
        if !first.is_ascii_alphabetic() || !is_die_header(m) {
            return None;
        }
        let desc = m.strip_prefix(b"Oops: ").unwrap_or(m);
        Some(if desc.starts_with(b"general protection fault") {
            K::GeneralProtectionFault
        } else {
            K::Oops
        })
    })
}

/// Kind of a `BUG: ` line, given the text after `BUG: `.
fn bug_kind(rest: &[u8]) -> KernelEventKind {
    // x86 fault.c: "unable to handle page fault for address:" since 4.20,
    // "unable to handle kernel paging request at" / "... NULL pointer
    // dereference at" before.
    if rest.starts_with(b"unable to handle ")
        || rest.starts_with(b"kernel NULL pointer dereference")
    {
        KernelEventKind::PageFault
    } else if rest.starts_with(b"soft lockup") {
        KernelEventKind::SoftLockup
    } else {
        KernelEventKind::KernelBug
    }
}

/// Kind of a watchdog line, given the text after its pr_fmt prefix.
fn watchdog_kind(rest: &[u8]) -> Option<KernelEventKind> {
    const HARD: &[u8] = b"Watchdog detected hard LOCKUP on cpu ";
    if rest.starts_with(b"BUG: soft lockup") {
        return Some(KernelEventKind::SoftLockup);
    }
    // Newer kernels name the reporting CPU first: "CPU3: Watchdog detected ...".
    let rest = match rest.strip_prefix(b"CPU") {
        Some(after) => {
            let n = after.iter().take_while(|b| b.is_ascii_digit()).count();
            after[n..].strip_prefix(b": ").filter(|_| n > 0)?
        }
        None => rest,
    };
    rest.starts_with(HARD)
        .then_some(KernelEventKind::HardLockup)
}

/// Kind of an `INFO: ` line (hung task or RCU stall), given the text after it.
fn info_kind(rest: &[u8]) -> Option<KernelEventKind> {
    if let Some(task) = rest.strip_prefix(b"task ") {
        // comm may contain spaces, so search rather than parse.
        return contains(task, b" blocked for more than ").then_some(KernelEventKind::HungTask);
    }
    if !rest.starts_with(b"rcu") {
        return None;
    }
    // Flavour name (rcu_sched, rcu_preempt, rcu_tasks, ...) then the verb.
    let space = rest.iter().position(|&b| b == b' ')?;
    let verb = &rest[space + 1..];
    (verb.starts_with(b"detected stalls")
        || verb.starts_with(b"self-detected stall")
        || verb.starts_with(b"detected expedited stalls"))
    .then_some(KernelEventKind::RcuStall)
}

/// mm/oom_kill.c prints `"%s: Killed process %d (%s) ..."` with the message
/// "Out of memory", "Out of memory (oom_kill_allocating_task)" or
/// "Memory cgroup out of memory"; `rest` is what follows the fixed start.
fn is_oom_kill(rest: &[u8]) -> bool {
    let rest = rest
        .strip_prefix(b" (oom_kill_allocating_task)")
        .unwrap_or(rest);
    rest.starts_with(b": Killed process ")
}

/// True for a die() header: `<str>: <hex> [#<n>]...`.
///
/// x86 prints `%04lx` (6.10+ prefixes the line with `Oops: `), arm64
/// `Internal error: %s: %016lx [#%d]`, so 1 to 16 hex digits are accepted.
fn is_die_header(m: &[u8]) -> bool {
    let mut from = 0;
    while let Some(pos) = find(&m[from..], b" [#") {
        let at = from + pos;
        if die_counter_follows(&m[at + 3..]) && hex_error_code_before(&m[..at]) {
            return true;
        }
        from = at + 3;
    }
    false
}

/// `<digits>]` follows the `[#`.
fn die_counter_follows(after: &[u8]) -> bool {
    let n = after.iter().take_while(|b| b.is_ascii_digit()).count();
    n > 0 && after.get(n) == Some(&b']')
}

/// `...: <hex>` ends right before the ` [#`.
fn hex_error_code_before(before: &[u8]) -> bool {
    let n = before
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_hexdigit())
        .count();
    (1..=16).contains(&n) && before[..before.len() - n].ends_with(b": ")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use KernelEventKind as K;
    use base64::Engine as _;

    fn kind(line: &str) -> Option<KernelEventKind> {
        classify(line).map(|c| c.kind)
    }

    /// Real-format lines: (line without prefix, expected kind).
    const POSITIVE: &[(&str, KernelEventKind)] = &[
        // kernel/panic.c
        (
            "Kernel panic - not syncing: sysrq triggered crash",
            K::Panic,
        ),
        ("Kernel panic - not syncing: Fatal exception", K::Panic),
        (
            "Kernel panic - not syncing: Fatal exception in interrupt",
            K::Panic,
        ),
        ("Kernel panic - not syncing: Hard LOCKUP", K::Panic),
        (
            "Kernel panic - not syncing: softlockup: hung tasks",
            K::Panic,
        ),
        (
            "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
            K::Panic,
        ),
        (
            "Kernel panic - not syncing: System is deadlocked on memory",
            K::Panic,
        ),
        // x86 __die_header(), 6.1 (no "Oops: " prefix for other die strings)
        ("Oops: 0002 [#1] PREEMPT SMP NOPTI", K::Oops),
        ("Oops: 0000 [#1] SMP", K::Oops),
        ("Oops: 0010 [#2] SMP PTI", K::Oops),
        ("invalid opcode: 0000 [#1] PREEMPT SMP NOPTI", K::Oops),
        ("divide error: 0000 [#1] PREEMPT SMP KASAN NOPTI", K::Oops),
        (
            "general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] PREEMPT SMP NOPTI",
            K::GeneralProtectionFault,
        ),
        (
            "general protection fault: 0000 [#1] SMP PTI",
            K::GeneralProtectionFault,
        ),
        // x86 __die_header(), 6.10+ ("Oops: " prefix on every die string)
        ("Oops: Oops: 0002 [#1] PREEMPT SMP NOPTI", K::Oops),
        (
            "Oops: Oops: 0000 [#1] PREEMPT SMP DEBUG_PAGEALLOC NOPTI",
            K::Oops,
        ),
        ("Oops: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI", K::Oops),
        (
            "Oops: general protection fault, probably for non-canonical address 0xdffffc0000000002: 0000 [#1] SMP KASAN NOPTI",
            K::GeneralProtectionFault,
        ),
        (
            "Oops: general protection fault, maybe for address 0xff402836c095900c: 0000 [#1] PREEMPT SMP NOPTI",
            K::GeneralProtectionFault,
        ),
        // arm64 die()
        (
            "Internal error: Oops: 0000000096000004 [#1] PREEMPT SMP",
            K::Oops,
        ),
        (
            "Internal error: Oops - BUG: 00000000f2000800 [#1] SMP",
            K::Oops,
        ),
        // x86 fault.c (4.20+) and older wording, arm64 die_kernel_fault()
        (
            "BUG: unable to handle page fault for address: ffffc90000a3b000",
            K::PageFault,
        ),
        (
            "BUG: kernel NULL pointer dereference, address: 0000000000000008",
            K::PageFault,
        ),
        (
            "BUG: unable to handle kernel NULL pointer dereference at 0000000000000008",
            K::PageFault,
        ),
        (
            "BUG: unable to handle kernel paging request at ffffffffc0a3b000",
            K::PageFault,
        ),
        (
            "Unable to handle kernel NULL pointer dereference at virtual address 0000000000000008",
            K::PageFault,
        ),
        // lib/bug.c and generic BUG: lines
        ("kernel BUG at mm/slub.c:431!", K::KernelBug),
        (
            "Kernel BUG at fs_reclaim_acquire+0x3b/0x40 [verbose debug info unavailable]",
            K::KernelBug,
        ),
        (
            "BUG: scheduling while atomic: swapper/0/0/0x00000002",
            K::KernelBug,
        ),
        (
            "BUG: sleeping function called from invalid context at kernel/locking/mutex.c:283",
            K::KernelBug,
        ),
        (
            "BUG: KASAN: slab-use-after-free in kfree+0x60/0x140",
            K::KernelBug,
        ),
        (
            "BUG: workqueue lockup - pool cpus=1 node=0 flags=0x0 nice=0 stuck for 33s!",
            K::KernelBug,
        ),
        // kernel/watchdog.c
        (
            "watchdog: BUG: soft lockup - CPU#3 stuck for 23s! [stress-ng:1234]",
            K::SoftLockup,
        ),
        (
            "NMI watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [kworker/0:1:42]",
            K::SoftLockup,
        ),
        (
            "BUG: soft lockup - CPU#1 stuck for 67s! [insmod:2260]",
            K::SoftLockup,
        ),
        // 6.1 watchdog_hld.c, 6.6+ watchdog.c (perf and buddy), later with reporter CPU
        (
            "NMI watchdog: Watchdog detected hard LOCKUP on cpu 2",
            K::HardLockup,
        ),
        (
            "watchdog: Watchdog detected hard LOCKUP on cpu 2",
            K::HardLockup,
        ),
        (
            "watchdog: CPU1: Watchdog detected hard LOCKUP on cpu 2",
            K::HardLockup,
        ),
        ("Watchdog detected hard LOCKUP on cpu 0", K::HardLockup),
        // kernel/hung_task.c
        (
            "INFO: task kworker/u8:2:123 blocked for more than 120 seconds.",
            K::HungTask,
        ),
        (
            "INFO: task jbd2/sda1-8:245 blocked for more than 122 seconds.",
            K::HungTask,
        ),
        (
            "INFO: task my comm:77 blocked for more than 480 seconds.",
            K::HungTask,
        ),
        // kernel/rcu/tree_stall.h, tree_exp.h, tasks.h
        (
            "rcu: INFO: rcu_sched detected stalls on CPUs/tasks:",
            K::RcuStall,
        ),
        (
            "rcu: INFO: rcu_preempt self-detected stall on CPU",
            K::RcuStall,
        ),
        (
            "rcu: INFO: rcu_preempt detected expedited stalls on CPUs/tasks: { 3-... } 21003 jiffies s: 1289 root: 0x8/.",
            K::RcuStall,
        ),
        (
            "rcu: INFO: rcu_tasks detected stalls on tasks:",
            K::RcuStall,
        ),
        ("INFO: rcu_sched self-detected stall on CPU", K::RcuStall),
        // mm/oom_kill.c
        (
            "Out of memory: Killed process 4242 (stress) total-vm:2105388kB, anon-rss:1955688kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:3872kB oom_score_adj:0",
            K::OutOfMemory,
        ),
        (
            "Memory cgroup out of memory: Killed process 31337 (java) total-vm:4194304kB, anon-rss:1048576kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:2400kB oom_score_adj:985",
            K::OutOfMemory,
        ),
        (
            "Out of memory (oom_kill_allocating_task): Killed process 99 (a.out) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:1kB oom_score_adj:0",
            K::OutOfMemory,
        ),
    ];

    const NEGATIVE: &[&str] = &[
        "",
        "\n",
        "myapp: recovered from panic in handler",
        "panic: runtime error: invalid memory address or nil pointer dereference",
        "Kernel panic is something we want to avoid",
        "---[ end Kernel panic - not syncing: sysrq triggered crash ]---",
        "sysrq: Trigger a crash",
        "Kernel Offset: 0x5e00000 from 0xffffffff81000000 (relocation range: 0xffffffff80000000-0xffffffffbfffffff)",
        "CPU: 0 PID: 1 Comm: init Not tainted 6.1.0-56-cloud-amd64 #1  Debian 6.1.192-2",
        " dump_stack_lvl+0x44/0x5c",
        " ? _printk+0x68/0x83",
        "Oops: something in a user message",
        "Oops",
        "traps: a.out[1234] general protection fault ip:401136 sp:7ffd0 error:0 in a.out[401000+1000]",
        "General protection fault in user access. Non-canonical address?",
        "BUG",
        "a BUG: in the middle",
        "watchdog: Disabling watchdog on nohz_full cores by default",
        "NMI watchdog: Enabled. Permanently consumes one hw-PMU counter.",
        "watchdog: CPU: Watchdog detected hard LOCKUP on cpu 2",
        "INFO: task list updated",
        "INFO: rcu_sched is fine",
        "rcu: Hierarchical RCU implementation.",
        "rcu: INFO: something else",
        "stress invoked oom-killer: gfp_mask=0x140dca(GFP_HIGHUSER_MOVABLE|__GFP_COMP|__GFP_ZERO), order=0, oom_score_adj=0",
        "Out of memory and no killable processes...",
        "Memory cgroup stats for /kubepods.slice:",
        "[drm] Initialized bochs-drm 1.0.0 20130925 for 0000:00:02.0 on minor 0",
        "Unable to find swap-space signature",
        "foo: 0000 [#x]",
        "foo: [#1]",
    ];

    #[test]
    fn classifies_every_real_format() {
        for &(line, want) in POSITIVE {
            assert_eq!(kind(line), Some(want), "{line:?}");
            let c = classify(line).unwrap();
            assert_eq!(c.message, line);
        }
        // Every kind is covered by the table.
        for k in KernelEventKind::ALL {
            assert!(POSITIVE.iter().any(|&(_, w)| w == k), "{k:?} untested");
        }
    }

    #[test]
    fn classifies_with_every_prefix_form() {
        let prefixes = [
            "",
            "<0>",
            "<6>[    0.000000] ",
            "<12>[   62.099024][  T662] ",
            "[   12.345678] ",
            "[69848.706327] ",
            "[    T1] ",
            "[  C0] ",
            "[   62.099024][  T662] ",
            "[ 1949.678369] [   T3930] ",
            "[    5.160240][    C3] ",
        ];
        for &(line, want) in POSITIVE {
            for prefix in prefixes {
                for suffix in ["", "\n", "\r\n"] {
                    let full = format!("{prefix}{line}{suffix}");
                    let c = classify(&full).unwrap_or_else(|| panic!("{full:?}"));
                    assert_eq!(c.kind, want, "{full:?}");
                    assert_eq!(c.message, line, "{full:?}");
                }
            }
        }
    }

    #[test]
    fn rejects_ordinary_lines() {
        for line in NEGATIVE {
            assert_eq!(kind(line), None, "{line:?}");
            let stamped = format!("[    4.755680] {line}\n");
            assert_eq!(kind(&stamped), None, "{stamped:?}");
        }
    }

    #[test]
    fn soft_lockup_is_not_a_kernel_bug() {
        assert_eq!(
            kind("[   48.123456] watchdog: BUG: soft lockup - CPU#3 stuck for 23s! [yes:812]"),
            Some(K::SoftLockup)
        );
        assert_eq!(kind("BUG: soft lockup - CPU#3 stuck"), Some(K::SoftLockup));
    }

    #[test]
    fn caller_ids() {
        assert_eq!(caller_id("[   62.099024][  T662] x"), Some("T662"));
        assert_eq!(caller_id("<4>[    5.160240][    C3] x"), Some("C3"));
        assert_eq!(caller_id("[ 1949.678369] [   T3930] x"), Some("T3930"));
        assert_eq!(caller_id("[    T1] x"), Some("T1"));
        assert_eq!(caller_id("[   12.345678] x"), None);
        assert_eq!(caller_id("x"), None);
    }

    #[test]
    fn strip_prefix_forms() {
        assert_eq!(strip_prefix("[    4.755680] hello\n"), "hello");
        assert_eq!(strip_prefix("[    T1] hello"), "hello");
        assert_eq!(strip_prefix("[    4.755680][    T1] hello"), "hello");
        assert_eq!(strip_prefix("[    4.755680] [    T1] hello"), "hello");
        // Only one separator space is removed: stack lines keep their indent.
        assert_eq!(
            strip_prefix("[    4.758964]  dump_stack_lvl+0x44/0x5c\n"),
            " dump_stack_lvl+0x44/0x5c"
        );
        assert_eq!(strip_prefix("[drm] hello"), "[drm] hello");
        assert_eq!(strip_prefix("[    1.000000] [drm] hello"), "[drm] hello");
        assert_eq!(strip_prefix("[1.] x"), "[1.] x");
        assert_eq!(strip_prefix("[ T] x"), "[ T] x");
        assert_eq!(strip_prefix("[    4.7"), "[    4.7");
        assert_eq!(strip_prefix("no prefix\r\n"), "no prefix");
        assert_eq!(strip_prefix("<6>[    4.755680] hello\n"), "hello");
        assert_eq!(strip_prefix("<0>hello"), "hello");
        assert_eq!(strip_prefix("<html> x"), "<html> x");
        assert_eq!(strip_prefix("<> x"), "<> x");
        assert_eq!(strip_prefix("<1234>x"), "<1234>x");
        assert_eq!(strip_prefix(""), "");
    }

    #[test]
    fn kind_names_are_consistent() {
        for k in KernelEventKind::ALL {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
            assert_eq!(k.is_fatal(), k == K::Panic);
            assert!(k.reason_code().starts_with("Kernel"));
        }
        assert_eq!(K::RcuStall.reason_code(), "KernelRCUStall");
        assert_eq!(K::OutOfMemory.reason_code(), "KernelOOMKill");
    }

    /// Plain netconsole payloads captured from a Debian 6.1 cloud kernel
    /// crashed with `echo c > /proc/sysrq-trigger`.
    #[test]
    fn netconsole_capture_has_exactly_one_panic() {
        const CAPTURE: &str = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/testdata/netconsole/debian-6.1-cloud-sysrq-crash.jsonl"
        );
        let text = std::fs::read_to_string(CAPTURE).expect("read capture");
        let mut lines = 0;
        let mut hits = Vec::new();
        for record in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(record).expect("json record");
            if v["format"] != "plain" {
                continue;
            }
            let b64 = v["payload_b64"].as_str().expect("payload_b64");
            let payload = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64");
            let payload = String::from_utf8(payload).expect("utf-8 payload");
            for line in payload.split_inclusive('\n') {
                lines += 1;
                if let Some(c) = classify(line) {
                    hits.push((c.kind, c.message.to_owned()));
                }
            }
        }
        assert!(lines > 40, "only {lines} lines decoded");
        assert_eq!(
            hits,
            [(
                K::Panic,
                "Kernel panic - not syncing: sysrq triggered crash".to_owned()
            )]
        );
    }
}
