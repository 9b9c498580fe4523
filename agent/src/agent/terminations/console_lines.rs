//! The kernel's console lines about a process's end: user-space faults (`segfault at`,
//! `traps:`) and the OOM killer's (`oom-kill:constraint=...`, `Killed process ...`).
//!
//! Every kernel prints these, so they give what older tracepoints lack (the OOM victim's RSS
//! and score before Linux 6.9, the cgroup whose limit was hit on every kernel). They are
//! hostile input: the comm and cgroup paths in them are chosen by whoever names a process or
//! creates a cgroup, so fields are found from the fixed parts of the format, values are
//! bounded, and anything unexpected makes the line not match.

use super::Fault;
use crate::kernel_log;

/// Longest line considered (the console probe copies 512 bytes).
const LINE_MAX: usize = 1024;
/// Longest cgroup path kept.
const PATH_MAX: usize = 512;

/// What a console line says about a process's end.
#[derive(Clone, Debug, PartialEq)]
pub enum ConsoleFact {
    /// A fault in user space, for the thread `pid` (a thread id).
    Fault { pid: u32, fault: Fault },
    /// `oom-kill:constraint=...`: which cgroup's limit the kill was for.
    OomConstraint(OomConstraint),
    /// `... Killed process <pid> (<comm>) total-vm:...kB, anon-rss:...`.
    OomKilled(OomKilledLine),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomConstraint {
    /// `CONSTRAINT_NONE` (the whole machine), `CONSTRAINT_MEMCG`, `CONSTRAINT_CPUSET`, ...
    pub constraint: String,
    /// The memory cgroup that ran out (only with `CONSTRAINT_MEMCG`).
    pub oom_memcg: Option<String>,
    /// The victim's memory cgroup.
    pub task_memcg: String,
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomKilledLine {
    pub pid: u32,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub oom_score_adj: Option<i16>,
}

/// Joins the pieces of the lines parsed here. Since Linux 5.19 the console tracepoint fires
/// for each printk call as its text is formatted, so a line built from several calls
/// (`pr_cont`) arrives in pieces, one record each, from the task that printed it: the fault
/// line, then ` in <lib>[...]`; `oom-kill:constraint=...`, then `,cpuset=...`,
/// `,oom_memcg=...`, `,task=...,uid=...`. Older kernels pass whole lines, with their prefixes.
#[derive(Debug, Default)]
pub struct Joiner {
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    tid: u32,
    text: String,
    /// It was already held when the previous drain of the ring ended.
    aged: bool,
}

impl Joiner {
    /// The facts completed by one console record, printed by thread `tid`.
    pub fn on_record(&mut self, tid: u32, text: &str) -> Vec<ConsoleFact> {
        let mut facts = Vec::new();
        if let Some(held) = &mut self.held
            && held.tid == tid
        {
            if is_continuation(&held.text, text) && held.text.len() + text.len() <= LINE_MAX {
                held.text.push_str(text);
                if is_complete(&held.text) {
                    facts.extend(self.finish());
                }
                return facts;
            }
            facts.extend(self.finish());
        }
        for line in text.lines() {
            let line = kernel_log::strip_prefix(line);
            if self.held.is_none() && starts_a_fact(line) && !is_complete(line) {
                self.held = Some(Held {
                    tid,
                    text: line.to_owned(),
                    aged: false,
                });
            } else {
                facts.extend(parse(line));
            }
        }
        facts
    }

    /// At the end of a drain of the ring: a line held since the previous drain has no more
    /// pieces to come.
    pub fn on_drained(&mut self) -> Option<ConsoleFact> {
        match &mut self.held {
            Some(held) if held.aged => self.finish(),
            Some(held) => {
                held.aged = true;
                None
            }
            None => None,
        }
    }

    fn finish(&mut self) -> Option<ConsoleFact> {
        parse(&self.held.take()?.text)
    }
}

fn starts_a_fact(line: &str) -> bool {
    line.starts_with("oom-kill:") || line.starts_with("traps: ") || line.contains("]: segfault at ")
}

/// Whether `text`, printed by the task that printed the held line, continues it. The OOM
/// killer's line is pieces up to its `,uid=` (a cgroup path is a piece of its own); a
/// fault's mapping is the piece ` in <lib>[...]`.
fn is_continuation(held: &str, text: &str) -> bool {
    if held.starts_with("oom-kill:") {
        !text.contains('\n')
    } else {
        text.starts_with(" in ") || text.starts_with(" likely on CPU")
    }
}

/// Whether a line has the piece that ends what is parsed of it.
fn is_complete(line: &str) -> bool {
    if line.starts_with("oom-kill:") {
        line.contains(",uid=")
    } else {
        line.contains(" in ")
    }
}

/// The fact in a console line (printk prefixes already stripped), if it states one.
pub fn parse(line: &str) -> Option<ConsoleFact> {
    if line.len() > LINE_MAX {
        return None;
    }
    if let Some(rest) = line.strip_prefix("oom-kill:") {
        return oom_constraint(rest).map(ConsoleFact::OomConstraint);
    }
    if let Some(at) = line.find("Killed process ") {
        return oom_killed(&line[at + "Killed process ".len()..]).map(ConsoleFact::OomKilled);
    }
    if let Some(rest) = line.strip_prefix("traps: ") {
        return trap(line, rest);
    }
    if line.contains("]: segfault at ") {
        return segfault(line);
    }
    None
}

/// `<comm>[<pid>]: segfault at <addr> ip <ip> sp <sp> error <n> in <lib>[<base>+<size>] ...`
fn segfault(line: &str) -> Option<ConsoleFact> {
    // The comm may hold anything, `]: segfault at ` too: the kernel's text is the last one.
    let at = line.rfind("]: segfault at ")?;
    let pid = pid_before(&line[..at])?;
    let rest = &line[at + "]: segfault at ".len()..];
    let address = hex(rest.split(' ').next()?)?;
    let ip = after(rest, " ip ").and_then(hex);
    Some(ConsoleFact::Fault {
        pid,
        fault: Fault {
            kind: "segfault".into(),
            address: Some(address),
            ip,
            location: location(rest),
            line: line.into(),
        },
    })
}

/// `traps: <comm>[<pid>] <kind> ip:<ip> sp:<sp> error:<n> in <lib>[...]`, kind e.g.
/// `general protection fault`, `trap invalid opcode`, `trap divide error`.
fn trap(line: &str, rest: &str) -> Option<ConsoleFact> {
    let ip_at = rest.rfind(" ip:")?;
    let head = &rest[..ip_at];
    // `<comm>[<pid>] <kind>`: the kind is the text after the last `[digits] `.
    let (pid, kind) = head.rmatch_indices("] ").find_map(|(at, _)| {
        let pid = pid_before(&head[..at])?;
        Some((pid, &head[at + 2..]))
    })?;
    if kind.is_empty()
        || kind.len() > 64
        || !kind.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return None;
    }
    let tail = &rest[ip_at..];
    Some(ConsoleFact::Fault {
        pid,
        fault: Fault {
            kind: kind.into(),
            address: None,
            ip: after(tail, " ip:").and_then(hex),
            location: location(tail),
            line: line.into(),
        },
    })
}

/// The pid of `...[<digits>` at the end of `text`.
fn pid_before(text: &str) -> Option<u32> {
    let open = text.rfind('[')?;
    let digits = &text[open + 1..];
    if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The word after the last `key` in `text`.
fn after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.rfind(key)?;
    text[at + key.len()..].split(' ').next()
}

fn hex(text: &str) -> Option<u64> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// The mapping in ` in <name>[...]`, as `print_vma_addr` prints it after the registers.
fn location(text: &str) -> Option<String> {
    let at = text.rfind(" in ")?;
    let name = &text[at + 4..];
    let name = &name[..name.find('[')?];
    (!name.is_empty() && name.len() <= 255 && !name.contains(' ')).then(|| name.to_owned())
}

/// `constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/a,
/// task_memcg=/a/b,task=x,pid=1,uid=0`: fixed keys in a fixed order; the values the kernel
/// does not control (paths, comm) are found between the keys around them, from the end.
fn oom_constraint(rest: &str) -> Option<OomConstraint> {
    let rest = rest.strip_prefix("constraint=")?;
    let constraint = rest.split(',').next()?;
    if constraint.is_empty()
        || !constraint
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'_')
    {
        return None;
    }
    let uid_at = rest.rfind(",uid=")?;
    let pid_at = rest[..uid_at].rfind(",pid=")?;
    let pid = rest[pid_at + ",pid=".len()..uid_at].parse().ok()?;
    let task_at = rest[..pid_at].rfind(",task=")?;
    let task_memcg_at = rest[..task_at].find(",task_memcg=")?;
    let task_memcg = &rest[task_memcg_at + ",task_memcg=".len()..task_at];
    let oom_memcg = rest[..task_memcg_at]
        .find(",oom_memcg=")
        .map(|at| &rest[at + ",oom_memcg=".len()..task_memcg_at]);
    let path =
        |path: &str| (path.starts_with('/') && path.len() <= PATH_MAX).then(|| path.to_owned());
    Some(OomConstraint {
        constraint: constraint.into(),
        oom_memcg: match oom_memcg {
            Some(memcg) => Some(path(memcg)?),
            None => None,
        },
        task_memcg: path(task_memcg)?,
        pid,
    })
}

/// `<pid> (<comm>) total-vm:<n>kB, anon-rss:<n>kB, file-rss:<n>kB, shmem-rss:<n>kB, UID:<n>
/// pgtables:<n>kB oom_score_adj:<n>`.
fn oom_killed(rest: &str) -> Option<OomKilledLine> {
    let (pid, rest) = rest.split_once(" (")?;
    let pid = pid.parse().ok()?;
    // The comm may hold `) total-vm:`: the kernel's is the last.
    let numbers = &rest[rest.rfind(") total-vm:")?..];
    let kb = |key: &str| -> Option<u64> {
        let value = after(numbers, key)?;
        value.trim_end_matches(',').strip_suffix("kB")?.parse().ok()
    };
    Some(OomKilledLine {
        pid,
        anon_rss_kb: kb(" anon-rss:")?,
        file_rss_kb: kb(" file-rss:")?,
        shmem_rss_kb: kb(" shmem-rss:")?,
        oom_score_adj: after(numbers, " oom_score_adj:").and_then(|adj| adj.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault_of(line: &str) -> (u32, Fault) {
        match parse(line) {
            Some(ConsoleFact::Fault { pid, fault }) => (pid, fault),
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn segfault_lines_of_several_kernels() {
        // Linux 6.x: the mapping's start and size, then the CPU.
        let line = "crasher[4242]: segfault at 0 ip 00007f3c1a2b3c4d sp 00007ffd5e6f7a80 error 6 \
                    in libfoo.so[7f3c1a2b3000+1000] likely on CPU 1 (core 1, socket 0)";
        let (pid, fault) = fault_of(line);
        assert_eq!(pid, 4242);
        assert_eq!(fault.kind, "segfault");
        assert_eq!(fault.address, Some(0));
        assert_eq!(fault.ip, Some(0x7f3c_1a2b_3c4d));
        assert_eq!(fault.location.as_deref(), Some("libfoo.so"));
        // Linux 5.10, and an ip outside any mapping (no ` in `).
        let (_, old) = fault_of(
            "a.out[7]: segfault at 10 ip 0000000000401126 sp 00007ffc error 4 in a.out[400000+1000]",
        );
        assert_eq!(old.location.as_deref(), Some("a.out"));
        let (_, unmapped) =
            fault_of("x[8]: segfault at dead ip 0000000000000000 sp 00007ffc error 14");
        assert_eq!((unmapped.address, unmapped.location), (Some(0xdead), None));
    }

    #[test]
    fn trap_lines() {
        let (pid, gp) = fault_of(
            "traps: worker[311] general protection fault ip:7f01d2c3 sp:7ffe1c20 error:0 in libc.so.6[7f01d000+195000]",
        );
        assert_eq!((pid, gp.kind.as_str()), (311, "general protection fault"));
        assert_eq!(gp.ip, Some(0x7f01_d2c3));
        assert_eq!(gp.location.as_deref(), Some("libc.so.6"));
        let (_, ud) = fault_of(
            "traps: a [b][9] x[12] trap invalid opcode ip:401000 sp:7ffc error:0 in a.out[400000+1000]",
        );
        assert_eq!(ud.kind, "trap invalid opcode");
    }

    #[test]
    fn oom_lines() {
        let constraint = "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,\
                          oom_memcg=/kubepods/burstable/pod1/abc,task_memcg=/kubepods/burstable/pod1/abc,\
                          task=python3,pid=4321,uid=0";
        assert_eq!(
            parse(constraint),
            Some(ConsoleFact::OomConstraint(OomConstraint {
                constraint: "CONSTRAINT_MEMCG".into(),
                oom_memcg: Some("/kubepods/burstable/pod1/abc".into()),
                task_memcg: "/kubepods/burstable/pod1/abc".into(),
                pid: 4321,
            }))
        );
        let node = "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,\
                    global_oom,task_memcg=/kubepods/pod2/def,task=a,pid=b,c,pid=77,uid=1000";
        match parse(node) {
            Some(ConsoleFact::OomConstraint(c)) => {
                assert_eq!(
                    (c.pid, c.oom_memcg, c.task_memcg.as_str()),
                    (77, None, "/kubepods/pod2/def")
                );
            }
            other => panic!("{other:?}"),
        }
        let killed = "Memory cgroup out of memory: Killed process 4321 (python3) total-vm:290040kB, \
                      anon-rss:261232kB, file-rss:5120kB, shmem-rss:0kB, UID:0 pgtables:560kB oom_score_adj:-997";
        assert_eq!(
            parse(killed),
            Some(ConsoleFact::OomKilled(OomKilledLine {
                pid: 4321,
                anon_rss_kb: 261_232,
                file_rss_kb: 5120,
                shmem_rss_kb: 0,
                oom_score_adj: Some(-997),
            }))
        );
        // A comm that imitates the format: the kernel's numbers win.
        let tricky = "Out of memory: Killed process 9 (x) total-vm:1kB) total-vm:2kB, anon-rss:3kB, \
                      file-rss:4kB, shmem-rss:5kB, UID:0 pgtables:6kB oom_score_adj:0";
        match parse(tricky) {
            Some(ConsoleFact::OomKilled(k)) => assert_eq!((k.pid, k.anon_rss_kb), (9, 3)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pieces_of_a_line_are_joined_per_task() {
        let mut joiner = Joiner::default();
        assert!(
            joiner
                .on_record(
                    7,
                    "crasher[7]: segfault at 0 ip 00007f6d18d74219 sp 00007fffe556b3c8 error 4"
                )
                .is_empty()
        );
        // Another task's line in between is its own.
        assert!(joiner.on_record(8, "eth0: link up").is_empty());
        let facts = joiner.on_record(7, " in libc.so.6[156219,7f6d18c44000+156000]");
        match facts.as_slice() {
            [ConsoleFact::Fault { pid: 7, fault }] => {
                assert_eq!(fault.location.as_deref(), Some("libc.so.6"));
                assert!(fault.line.ends_with("+156000]"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            joiner
                .on_record(7, " likely on CPU 0 (core 0, socket 0)")
                .is_empty()
        );

        for piece in [
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null)",
            ",cpuset=/,mems_allowed=0",
            ",oom_memcg=",
            "/kubepods/pod1/abc",
            ",task_memcg=",
            "/kubepods/pod1/abc",
        ] {
            assert!(joiner.on_record(9, piece).is_empty(), "{piece}");
        }
        match joiner.on_record(9, ",task=python3,pid=9,uid=0").as_slice() {
            [ConsoleFact::OomConstraint(c)] => {
                assert_eq!(
                    (c.pid, c.oom_memcg.as_deref()),
                    (9, Some("/kubepods/pod1/abc"))
                )
            }
            other => panic!("{other:?}"),
        }

        // A fault outside any mapping has no ` in `: it is given up two drains later.
        assert!(
            joiner
                .on_record(3, "x[3]: segfault at 0 ip 0000000000000000 sp 0 error 14")
                .is_empty()
        );
        assert_eq!(joiner.on_drained(), None);
        assert!(matches!(
            joiner.on_drained(),
            Some(ConsoleFact::Fault { pid: 3, .. })
        ));
        // Whole lines with their prefixes (older kernels) need no joining.
        let whole = "[ 12.5] a.out[4]: segfault at 10 ip 0000000000401126 sp 00007ffc error 4 in a.out[400000+1000]";
        assert!(matches!(
            joiner.on_record(4, whole).as_slice(),
            [ConsoleFact::Fault { pid: 4, .. }]
        ));
        // Pieces never grow a line past the cap.
        assert!(
            joiner
                .on_record(5, "oom-kill:constraint=CONSTRAINT_NONE")
                .is_empty()
        );
        for _ in 0..20 {
            joiner.on_record(5, &format!(",{}", "a".repeat(100)));
        }
        assert!(
            joiner
                .held
                .as_ref()
                .is_none_or(|held| held.text.len() <= LINE_MAX)
        );
    }

    #[test]
    fn hostile_and_truncated_lines_do_not_match() {
        for line in [
            "",
            "segfault at 0",
            "x[]: segfault at 0 ip 0 sp 0 error 4",
            "x[99999999999]: segfault at 0 ip 0",
            "x[1]: segfault at zz ip 0",
            "x[1]: segfault at 11112222333344445555 ip 0",
            "traps: x[1] ip:0",
            "traps: x[1] \u{7}bell ip:0 sp:0",
            "oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/a,task_memcg=/a,task=x,pid=1",
            "oom-kill:constraint=lower,task_memcg=/a,task=x,pid=1,uid=0",
            "oom-kill:constraint=CONSTRAINT_MEMCG,task_memcg=relative,task=x,pid=1,uid=0",
            "Killed process 12 (x) total-vm:1kB, anon-rss:",
            "Killed process x (y) total-vm:1kB, anon-rss:1kB, file-rss:1kB, shmem-rss:1kB",
            "Killed process 12 (x",
        ] {
            assert_eq!(parse(line), None, "{line}");
        }
        let long = format!(
            "x[1]: segfault at 0 ip 0 sp 0 error 4 in {}[0+1]",
            "a".repeat(2000)
        );
        assert_eq!(parse(&long), None);
        // Cut where the console probe cuts: what is there is kept, the rest is absent.
        let (_, cut) =
            fault_of("x[1]: segfault at 8 ip 0000000000401126 sp 00007ffc error 4 in liba");
        assert_eq!((cut.address, cut.location), (Some(8), None));
    }
}
