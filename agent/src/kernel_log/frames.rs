//! Call-trace frames: parsing one console line into a function name, and
//! choosing the culprit among them.
//!
//! Frame lines, after [`super::strip_prefix`]:
//! - x86_64 `show_trace_log_lvl()`: ` tcp_v4_rcv+0x1234/0x2345 [mod]`, with
//!   ` ? foo+0x1/0x2` for unreliable entries (skipped), older kernels put
//!   `[<ffffffff81234567>]` before the name; syzkaller-symbolised logs add
//!   `net/ipv4/tcp_ipv4.c:1700` after it;
//! - arm64 `dump_backtrace()`: ` foo+0x1c/0x30`;
//! - arm32 `dump_backtrace_entry()`: `[<pc>] (foo) from [<lr>] (bar+0x1c/0x30)`,
//!   both functions taken; powerpc `[sp] [pc] foo+0x..`;
//! - the faulting instruction: x86 `RIP: 0010:foo+0x12/0x34` (older `IP:
//!   [<..>] foo+0x..`), arm64 `pc : foo+0x..`, riscv `epc : foo+0x..`, arm32
//!   `PC is at foo+0x..`, powerpc `NIP [..] foo+0x..`. The link register
//!   (`lr :`) is not a frame: the call trace has the caller.
//!
//! Compiler clones keep their suffix in [`Frame::function`] (`foo.isra.0`,
//! `foo.cold`); titles and signatures use the base name.

/// One function of a call trace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The symbol as printed, e.g. `tcp_v4_rcv` or `foo.isra.0`.
    pub function: String,
    /// The module in brackets after the offset, e.g. `nf_tables`.
    pub module: Option<String>,
}

impl Frame {
    pub fn new(function: &str, module: Option<&str>) -> Self {
        Self {
            function: function.to_owned(),
            module: module.map(str::to_owned),
        }
    }

    /// A reliable call-trace line, `func+0xoff/0xsize [module]` (with or without addresses in
    /// front), as the kernel prints one and the agent's stack symbolizer writes one.
    pub fn parse(line: &str) -> Option<Self> {
        parse_trace_frame(line).map(FrameRef::to_frame)
    }

    /// `function`, or `function [module]` for a module's frame.
    pub fn label(&self) -> String {
        match &self.module {
            Some(module) => format!("{} [{module}]", self.function),
            None => self.function.clone(),
        }
    }
}

/// A frame borrowed from its console line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameRef<'a> {
    pub function: &'a str,
    pub module: Option<&'a str>,
}

impl FrameRef<'_> {
    pub fn to_frame(self) -> Frame {
        Frame::new(self.function, self.module)
    }
}

/// The name without compiler clone suffixes (`.isra.0`, `.cold`, `.constprop.0`).
fn base_name(function: &str) -> &str {
    function.split('.').next().unwrap_or(function)
}

/// A reliable call-trace entry: `[<addr>] ` (up to two) then `func+0xoff/0xsize`.
/// `? func+...` entries and anything else give `None`.
pub(super) fn parse_trace_frame(message: &str) -> Option<FrameRef<'_>> {
    let mut s = message.trim_start_matches([' ', '\t']);
    for _ in 0..2 {
        match strip_address(s) {
            Some(rest) => s = rest.trim_start_matches(' '),
            None => break,
        }
    }
    match s.strip_prefix('(') {
        Some(arm) => parse_arm_frame(arm),
        None => parse_symbol(s),
    }
}

/// The caller named after ` from ` on an arm32 backtrace line: the only
/// place the outermost frame of a trace appears.
pub(super) fn parse_arm_caller(message: &str) -> Option<FrameRef<'_>> {
    let (_, caller) = message.split_once(") from ")?;
    let caller = strip_address(caller.trim_start())?.trim_start();
    parse_symbol(caller.strip_prefix('(')?)
}

/// arm32 `dump_backtrace_entry()`: `[<pc>] (foo) from [<lr>] (bar+0x1c/0x30)`;
/// the function is the one in the first parentheses.
fn parse_arm_frame(s: &str) -> Option<FrameRef<'_>> {
    let (function, rest) = s.split_once(')')?;
    let valid = rest.starts_with(" from ")
        && function
            .as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_')
        && function
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    valid.then_some(FrameRef {
        function,
        module: None,
    })
}

/// The faulting-instruction register line: `RIP: 0010:foo+0x..`, `IP: [<..>] foo+0x..`,
/// arm64 `pc : foo+0x..`, riscv `epc : foo+0x..`, arm32 `PC is at foo+0x..`,
/// powerpc `NIP [c000000000123456] foo+0x..`.
pub(super) fn parse_ip_frame(message: &str) -> Option<FrameRef<'_>> {
    let rest = message
        .strip_prefix("RIP: ")
        .or_else(|| message.strip_prefix("IP: "))
        .or_else(|| message.strip_prefix("pc : "))
        .or_else(|| message.strip_prefix("epc : "))
        .or_else(|| message.strip_prefix("PC is at "))
        .or_else(|| message.strip_prefix("NIP "))?;
    // Code segment selector `0010:`.
    let rest = match rest.split_once(':') {
        Some((segment, after))
            if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            after
        }
        _ => rest,
    };
    parse_trace_frame(rest)
}

/// `[<ffffffff81234567>]` (also with `0x`), returns what follows.
fn strip_address(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('[')?;
    let rest = rest.strip_prefix('<').unwrap_or(rest);
    let rest = rest.strip_prefix("0x").unwrap_or(rest);
    let n = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
    if n == 0 {
        return None;
    }
    let rest = &rest[n..];
    let rest = rest.strip_prefix('>').unwrap_or(rest);
    rest.strip_prefix(']')
}

/// `func+0xoff/0xsize` with an optional ` [module]` after it (possibly after
/// a source location).
fn parse_symbol(s: &str) -> Option<FrameRef<'_>> {
    let name_len = s
        .bytes()
        .take_while(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        .count();
    if name_len == 0 || !s.as_bytes()[0].is_ascii_alphabetic() && s.as_bytes()[0] != b'_' {
        return None;
    }
    let (function, rest) = s.split_at(name_len);
    let rest = rest.strip_prefix("+0x")?;
    let n = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
    let rest = &rest[n..];
    if n == 0 {
        return None;
    }
    let module = rest
        .find(" [")
        .map(|at| &rest[at + 2..])
        .and_then(|m| m.split_once(']'))
        .map(|(m, _)| m)
        .filter(|m| {
            !m.is_empty()
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    Some(FrameRef { function, module })
}

/// A name pattern: `^x` prefix, `x$` suffix, `^x$` exact, otherwise substring.
fn pattern_matches(pattern: &str, name: &str) -> bool {
    match (pattern.strip_prefix('^'), pattern.strip_suffix('$')) {
        (Some(p), _) if p.ends_with('$') => name == &p[..p.len() - 1],
        (Some(p), _) => name.starts_with(p),
        (None, Some(p)) => name.ends_with(p),
        (None, None) => name.contains(pattern),
    }
}

pub(super) fn matches_any(patterns: &[&str], name: &str) -> bool {
    patterns.iter().any(|p| pattern_matches(p, name))
}

/// Functions that report, allocate, lock, copy or dispatch rather than cause
/// a crash: never the culprit of any report.
pub(super) const GENERIC: &[&str] = &[
    // Reporting and trap handling.
    "dump_stack",
    "show_stack",
    "show_trace",
    "walk_stack",
    "dump_backtrace",
    "panic",
    "^die",
    "oops_",
    "^__die",
    "do_trap",
    "_trap$",
    "do_error",
    "invalid_op",
    "report_bug",
    "fixup_bug",
    "handle_bug",
    "__warn",
    "warn_slowpath",
    "warn_alloc",
    "warn_bogus",
    "print_report",
    "print_address_description",
    "print_usage_bug",
    "print_unlock",
    "printk",
    "vprintk",
    "print_tainted",
    "^get_taint$",
    "^exc_",
    "^asm_exc_",
    "^error_entry",
    "hex_dump",
    "stack_trace_",
    "arch_stack_walk",
    "check_panic_on_warn",
    "^bug_handler",
    "^call_break_hook",
    "^brk_handler",
    "__fortify_report",
    "fortify_panic",
    "assertfail",
    // Sanitizers.
    "kasan",
    "__asan",
    "hwasan",
    "__msan",
    "kmsan",
    "__sanitizer",
    "kcsan_setup_watchpoint",
    "ubsan",
    "check_memory_region",
    "check_heap_object",
    "check_object",
    "_once_nocheck",
    "read_word_at_a_time",
    "__phys_addr",
    // Allocators.
    "alloc_page",
    "malloc",
    "zalloc",
    "calloc",
    "krealloc",
    "kmem_cache",
    "allocate_slab",
    "slab_",
    "seqprop_assert",
    "scnprintf",
    "sk_stop_timer_sync",
    "cleanup_srcu_struct",
    "i2c_del_adapter",
    "__unregister_client",
    "hwrng_unregister",
    "tty_unregister_device",
    "extract_user_to_sg",
    "extract_iter_to_sg",
    "find_lock_entries",
    "truncate_inode_pages_range",
    "do_read_cache_folio",
    "logic_in",
    "logic_out",
    "crc_itu_t",
    "^copyin$",
    "^copyout$",
    "program_check_",
    "_once_word_nocheck",
    "^kfree$",
    "^kvfree$",
    "kfree_skb",
    "__alloc_frozen_pages",
    "folio_alloc",
    "folio_unlock",
    "filemap_alloc_folio",
    "__filemap_get_folio",
    "find_or_create_page",
    "read_cache_page",
    "pagecache_get_page",
    "grab_cache_page_write_begin",
    "memdup",
    "strdup",
    "strndup",
    // Locking and scheduling.
    "lockdep",
    "lock_acquire",
    "lock_release",
    "lock_class",
    "mark_lock",
    "held_locks",
    "raw_spin_rq",
    "spin_lock",
    "spin_trylock",
    "spin_unlock",
    "read_lock",
    "read_trylock",
    "write_lock",
    "write_trylock",
    "read_unlock",
    "write_unlock",
    "^down$",
    "down_read",
    "down_write",
    "down_trylock",
    "up_read",
    "up_write",
    "^mutex_",
    "^__mutex_",
    "^rt_mutex_",
    "osq_lock",
    "osq_unlock",
    "owner_on_cpu",
    "bh_enable",
    "bh_disable",
    "trace_hardirq",
    "trace_softirq",
    "lockdep_hardirq",
    "lockdep_softirq",
    "^lock_page",
    "^unlock_page",
    "__might_sleep",
    "might_sleep",
    "__might_fault",
    "might_fault",
    "__might_resched",
    "__wake_up",
    "^complete$",
    "wait_for_completion",
    "finish_wait",
    "perf_trace",
    // Atomics, refcounts and containers.
    "atomic_dec",
    "atomic_inc",
    "atomic_read",
    "atomic_set",
    "atomic_or",
    "atomic_xor",
    "atomic_and",
    "atomic_add",
    "atomic_sub",
    "atomic_fetch",
    "atomic_xchg",
    "atomic_cmpxchg",
    "atomic_try",
    "atomic64_dec",
    "atomic64_inc",
    "atomic64_read",
    "atomic64_set",
    "atomic64_or",
    "atomic64_xor",
    "atomic64_and",
    "atomic64_add",
    "atomic64_sub",
    "atomic64_fetch",
    "atomic64_xchg",
    "atomic64_cmpxchg",
    "atomic64_try",
    "set_bit",
    "clear_bit",
    "change_bit",
    "test_bit",
    "^refcount_",
    "^kref_",
    "ref_tracker",
    "list_add",
    "list_del",
    "list_replace",
    "list_move",
    "list_splice",
    "^rb_",
    "^__rb_",
    "^klist_",
    "xas_",
    "ida_free",
    "rhashtable_lookup",
    // String and user copies.
    "memcpy",
    "memcmp",
    "memset",
    "memchr",
    "memmove",
    "strcmp",
    "strncmp",
    "strcpy",
    "strlcpy",
    "strncpy",
    "strscpy",
    "strlen",
    "strnlen",
    "strstr",
    "strnstr",
    "strchr",
    "copy_to_user",
    "copy_from_user",
    "copy_to_iter",
    "copy_from_iter",
    "copy_page_to_iter",
    "copy_page_from_iter",
    "copy_folio_to_iter",
    "put_user",
    "get_user",
    "string",
    "pointer",
    "snprintf",
    "kasprintf",
    "kvasprintf",
    "va_format",
    "_indirect_thunk_",
    // Device-model and workqueue plumbing.
    "dev_info",
    "dev_notice",
    "dev_warn",
    "dev_err",
    "dev_alert",
    "dev_crit",
    "dev_emerg",
    "debug_object",
    "timer_is_static_object",
    "work_is_static_object",
    "del_timer",
    "__timer_delete_sync",
    "lock_timer_base",
    "__mod_timer",
    "flush_work",
    "__cancel_work_timer",
    "cancel_work_sync",
    "try_to_grab_pending",
    "flush_workqueue",
    "drain_workqueue",
    "destroy_workqueue",
    "queue_work",
    "insert_work",
    "__queue_delayed_work",
    "queue_delayed_work_on",
    "kthread_stop",
    "kobject_",
    "add_uevent_var",
    "get_device_parent",
    "device_add",
    "device_del",
    "device_unregister",
    "device_destroy",
    "device_release",
    "devres_release_all",
    "device_for_each_child",
    "^put_device$",
    "sysfs_remove",
    "device_remove_file",
    "usb_kill_urb",
    "usb_kill_anchored_urbs",
    "usb_control_msg",
    "usb_hcd_submit_urb",
    "usb_submit_urb",
    "dummy_urb_enqueue",
    "rollback_registered",
    "unregister_netdev",
    // MMIO accessors, checksums, inode and dentry references.
    "readb$",
    "readw$",
    "readl$",
    "readq$",
    "writeb$",
    "writew$",
    "writel$",
    "writeq$",
    "^crc",
    "^iput$",
    "^iput_final$",
    "^ihold$",
    "dput",
    "drop_nlink",
    "mark_buffer_dirty",
    // arm64 exception entry.
    "do_kernel_fault",
    "do_translation_fault",
    "do_mem_abort",
    "el1_abort",
    "el1h_64_sync",
];

/// Syscall wrappers whose prefix titles drop (`__x64_sys_read` is `read`'s
/// `sys_read`, `__do_sys_foo` is `foo`); the shortest result wins.
const SYSCALL_PREFIXES: &[&str] = &[
    "SYSC_",
    "SyS_",
    "sys_",
    "__x64_",
    "__ia32_",
    "__arm64_",
    "____sys_",
    "___sys_",
    "__sys_",
    "__se_",
    "__se_sys_",
    "__do_sys_",
    "compat_SYSC_",
    "compat_SyS_",
    "ksys_",
];

/// The name a title uses for a frame: base name without a syscall wrapper prefix.
pub(super) fn title_name(function: &str) -> &str {
    let base = base_name(function);
    SYSCALL_PREFIXES
        .iter()
        .filter_map(|p| base.strip_prefix(p))
        .filter(|s| !s.is_empty())
        .min_by_key(|s| s.len())
        .unwrap_or(base)
}

/// Functions that dispatch work: in a stall the frame called by the first of
/// them (counting from the top) identifies the looping code.
const STALL_ANCHORS: &[&str] = &[
    "process_one_work",
    "do_syscall_",
    "do_fast_syscall_",
    "sysenter_dispatch",
    "tracesys_phase2",
    "el0_svc_handler",
    "invoke_syscall",
    "ret_fast_syscall",
    "netif_receive_skb",
    "do_softirq",
    "call_timer_fn",
    "_run_timers",
    "run_timer_softirq",
    "hrtimer_run",
    "run_ksoftirqd",
    "smpboot_thread_fn",
    "^kthread$",
    "start_secondary",
    "cpu_startup_entry",
    "ret_from_fork",
    "vfs_write",
    "vfs_read",
    "vfs_iter_read",
    "vfs_iter_write",
    "do_iter_read",
    "do_iter_write",
    "call_read_iter",
    "call_write_iter",
    "new_sync_read",
    "new_sync_write",
    "vfs_ioctl",
    "ksys_ioctl",
    "compat_ioctl",
    "blkdev_ioctl",
    "do_iter_readv_writev",
    "^call_mmap",
    "mmap_region",
    "do_mmap",
    "do_dentry_open",
    "vfs_open",
    "^sock_sendmsg",
    "^sock_recvmsg",
    "^sock_release",
    "^__sock_release",
    "^setsockopt$",
    "kernel_setsockopt",
    "sock_common_setsockopt",
    "^listen$",
    "kernel_listen",
    "sk_common_release",
    "^sock_mmap",
    "^accept$",
    "kernel_accept",
    "^sock_do_ioctl",
    "^sock_ioctl",
    "^compat_sock_ioctl",
    "^nfnetlink_rcv_msg",
    "^rtnetlink_rcv_msg",
    "^netlink_dump",
    "^socketpair",
    "^connect",
    "^ioctl",
    "^sys_socketpair",
    "^sys_connect",
    "^sys_ioctl",
    "__do_fault",
    "do_page_fault",
    "^page_fault$",
    "__fput",
    "task_work_run",
    "exit_to_usermode",
    "smp_call_function",
    "tasklet_action",
    "tasklet_hi_action",
];

/// Stall culprit: the frame just above the first dispatching anchor, or the
/// anchor itself when it is the top frame or `smp_call_function`.
pub(super) fn stall_culprit(names: &[&str]) -> Option<usize> {
    let anchor = names
        .iter()
        .position(|n| matches_any(STALL_ANCHORS, title_name(n)))?;
    if anchor == 0 || names[anchor].contains("smp_call_function") {
        return Some(anchor);
    }
    Some(anchor - 1)
}

/// Hung task culprit: hangs in `synchronize_rcu`-like and `rtnl_lock` waits
/// group together; otherwise the first frame that is not a wait primitive.
pub(super) fn hang_culprit(names: &[&str]) -> Option<usize> {
    const ANCHORS: &[&str] = &[
        "rtnl_lock",
        "synchronize_rcu",
        "synchronize_srcu",
        "synchronize_net",
        "synchronize_sched",
    ];
    const WAITS: &[&str] = &[
        "sched",
        "_lock",
        "_slowlock",
        "down",
        "rwsem",
        "completion",
        "kthread",
        "wait",
        "synchronize",
        "context_switch",
        "__switch_to",
        "cancel_delayed_work",
        "rcu_barrier",
    ];
    names
        .iter()
        .position(|n| ANCHORS.iter().any(|a| n.contains(a)))
        .or_else(|| {
            names
                .iter()
                .position(|n| !WAITS.iter().any(|w| n.contains(w)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(line: &str) -> Option<(&str, Option<&str>)> {
        parse_trace_frame(line).map(|f| (f.function, f.module))
    }

    #[test]
    fn parses_trace_lines() {
        assert_eq!(
            trace(" tcp_v4_rcv+0x1234/0x2345"),
            Some(("tcp_v4_rcv", None))
        );
        assert_eq!(
            trace("  dump_stack_lvl+0x44/0x5c"),
            Some(("dump_stack_lvl", None))
        );
        assert_eq!(
            trace(" nft_do_chain+0x1a/0x4c0 [nf_tables]"),
            Some(("nft_do_chain", Some("nf_tables")))
        );
        assert_eq!(
            trace(" [<ffffffff8156a3e1>] foo.isra.0+0x12/0x40 [mod_x]"),
            Some(("foo.isra.0", Some("mod_x")))
        );
        assert_eq!(
            trace(" [<ffffffff81234567>] [<ffffffff81234567>] bar+0x1/0x2"),
            Some(("bar", None))
        );
        assert_eq!(trace(" foo.cold+0x5/0x9"), Some(("foo.cold", None)));
        assert_eq!(
            trace(" ip_rcv+0x4f/0x60 net/ipv4/ip_input.c:492"),
            Some(("ip_rcv", None))
        );
        assert_eq!(
            trace(" el0t_64_sync+0x190/0x194"),
            Some(("el0t_64_sync", None))
        );
        // Unreliable entries, markers and other text are not frames.
        assert_eq!(trace(" ? _printk+0x68/0x83"), None);
        assert_eq!(trace(" <TASK>"), None);
        assert_eq!(trace("Workqueue: events_unbound foo_fn"), None);
        assert_eq!(trace(" __dump_stack lib/dump_stack.c:17 [inline]"), None);
        assert_eq!(trace("Code: 48 89 e5 <0f> 0b"), None);
        assert_eq!(trace("RSP: 0018:ffffc90000ab7e48 EFLAGS: 00010246"), None);
        assert_eq!(trace(" 0x1234+0x10/0x20"), None);
    }

    #[test]
    fn parses_instruction_pointer_lines() {
        let ip = |l| parse_ip_frame(l).map(|f| f.function);
        assert_eq!(
            ip("RIP: 0010:sysrq_handle_crash+0x16/0x20"),
            Some("sysrq_handle_crash")
        );
        assert_eq!(
            ip("RIP: 0010:[<ffffffff81234567>]  [<ffffffff81234567>] foo+0x1/0x2"),
            Some("foo")
        );
        assert_eq!(ip("IP: [<ffffffff81234567>] bar+0x1/0x2"), Some("bar"));
        assert_eq!(ip("pc : clear_page+0x10/0x80"), Some("clear_page"));
        assert_eq!(ip("PC is at baz+0x4/0x8"), Some("baz"));
        assert_eq!(
            ip("epc : io_ring_exit_work+0x44c/0xbc0"),
            Some("io_ring_exit_work")
        );
        assert_eq!(
            ip("NIP [c00000000022d79c] partition_sched_domains_locked+0x1ac/0x5f0"),
            Some("partition_sched_domains_locked")
        );
        assert_eq!(
            ip("NIP:  c00000000022d79c LR: c00000000022d784 CTR: 0"),
            None
        );
        assert_eq!(ip("RIP: 0033:0x7f1234567890"), None);
        assert_eq!(ip("lr : foo+0x4/0x8"), None);
    }

    #[test]
    fn title_names_drop_suffixes_and_syscall_wrappers() {
        assert_eq!(title_name("foo.isra.0"), "foo");
        assert_eq!(title_name("foo.constprop.0.cold"), "foo");
        assert_eq!(title_name("__x64_sys_read"), "sys_read");
        assert_eq!(title_name("__do_sys_bpf"), "bpf");
        assert_eq!(title_name("__se_sys_ioctl"), "ioctl");
        assert_eq!(title_name("ksys_write"), "write");
        assert_eq!(title_name("tcp_v4_rcv"), "tcp_v4_rcv");
    }

    #[test]
    fn generic_patterns() {
        assert!(matches_any(GENERIC, "dump_stack_lvl"));
        assert!(matches_any(GENERIC, "kfree"));
        assert!(!matches_any(GENERIC, "kfree_rcu_work"));
        assert!(matches_any(GENERIC, "_raw_spin_lock_irqsave"));
        assert!(matches_any(GENERIC, "mutex_lock_nested"));
        assert!(!matches_any(GENERIC, "tcp_v4_rcv"));
        assert!(!matches_any(GENERIC, "sysrq_handle_crash"));
    }

    #[test]
    fn stall_and_hang_extractors() {
        let names = [
            "native_safe_halt",
            "loop_fn",
            "process_one_work",
            "worker_thread",
        ];
        assert_eq!(stall_culprit(&names), Some(1));
        let names = ["cpu_relax", "smp_call_function_many", "on_each_cpu"];
        assert_eq!(stall_culprit(&names), Some(1));
        let names = [
            "__schedule",
            "schedule",
            "rwsem_down_read_slowpath",
            "ext4_sync",
            "vfs_fsync",
        ];
        assert_eq!(hang_culprit(&names), Some(3));
        let names = ["__schedule", "synchronize_rcu_expedited", "foo"];
        assert_eq!(hang_culprit(&names), Some(1));
    }
}
