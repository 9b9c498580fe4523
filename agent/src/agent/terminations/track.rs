//! Correlates the termination probes' records and the kernel's console lines, per pod process,
//! into one [`Termination`] when the process exits.
//!
//! A process's state holds the last signals it was sent (and a runtime's SIGTERM, to tell a
//! SIGKILL after the grace period), whether the OOM killer chose it, and is consumed by its
//! exit record. A death by signal waits [`CONSOLE_WAIT`] before it is explained: the console
//! lines about it (the fault's library, the OOM kill's cgroup) come through another ring.
//! Every table is capped and its entries expire.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    time::{Duration, SystemTime},
};

use lastgasp_common::{CgroupRef, OomVictim, ProcessExit, SignalSent, oom_present};

use super::{
    Cause, Fault, OomKill, OomScope, Sender, Termination,
    cgroupfs::{self, PodRoots},
    console_lines::{ConsoleFact, OomConstraint, OomKilledLine},
};
use crate::{
    agent::{pods::PodIndex, records::c_text},
    procfs,
};

/// How long a death by signal waits for its console lines.
pub const CONSOLE_WAIT: Duration = Duration::from_millis(300);
/// Pod processes with state (signals received, OOM marks) at once.
const MAX_PROCESSES: usize = 4096;
/// Console facts kept at once, and for how long.
const MAX_CONSOLE_FACTS: usize = 256;
const CONSOLE_FACT_TTL_NS: u64 = 60_000_000_000;
/// A signal received this long ago is forgotten.
const PROCESS_TTL_NS: u64 = 600_000_000_000;
/// Signals remembered per process.
const SIGNALS_KEPT: usize = 4;
/// Deaths waiting for their console lines.
const MAX_PENDING: usize = 1024;

const SIGTERM: u8 = 15;
const SIGKILL: u8 = 9;
const SI_KERNEL: i32 = 0x80;

/// Signals a process raises by its own fault (or its own `abort()`).
const CRASH_SIGNALS: [u8; 7] = [4, 5, 6, 7, 8, 11, 31];

/// The container runtimes, by comm (15 bytes at most): runc and its init stages, crun,
/// youki, gVisor, containerd and its shims, CRI-O and conmon, dockerd. This is by name only:
/// a host process can take any of these names, and is then reported as the runtime.
pub fn is_runtime(comm: &str) -> bool {
    matches!(
        comm,
        "runc" | "crun" | "youki" | "runsc" | "containerd" | "crio" | "conmon" | "dockerd"
    ) || comm.starts_with("containerd-shim")
        || comm.starts_with("runc:")
}

/// A cgroup as a probe recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CgroupSeen {
    id: u64,
    /// The pod's cgroup, for a container's.
    parent_id: u64,
    name: String,
}

impl From<&CgroupRef> for CgroupSeen {
    fn from(cgroup: &CgroupRef) -> Self {
        Self {
            id: cgroup.id,
            parent_id: cgroup.parent_id,
            name: c_text(&cgroup.name),
        }
    }
}

impl CgroupSeen {
    /// The container id in the cgroup's name; a name without one (a cgroup nested inside a
    /// container) stands for itself.
    fn container_id(&self) -> String {
        procfs::container_id(&self.name)
            .unwrap_or(&self.name)
            .to_owned()
    }
}

#[derive(Clone, Debug)]
struct SignalSeen {
    at_ns: u64,
    sig: u8,
    code: i32,
    target_tid: u32,
    sender_pid: u32,
    sender_comm: String,
    /// The sender's cgroup when it is a pod's.
    sender_cgroup: Option<CgroupSeen>,
}

impl SignalSeen {
    fn by_runtime(&self) -> bool {
        self.sender_cgroup.is_none() && is_runtime(&self.sender_comm)
    }
}

/// The OOM victim as `oom:mark_victim` reported it.
#[derive(Clone, Copy, Debug)]
struct OomMark {
    tid: u32,
    rss_bytes: Option<u64>,
    oom_score_adj: Option<i16>,
}

#[derive(Debug, Default)]
struct ProcessState {
    signals: VecDeque<SignalSeen>,
    /// When a runtime last sent SIGTERM.
    runtime_term_ns: Option<u64>,
    oom: Option<OomMark>,
}

/// An OOM constraint line with the limit of the cgroup it names, read when it came.
#[derive(Clone, Debug)]
struct OomConstraintSeen {
    line: OomConstraint,
    limit_bytes: Option<u64>,
}

/// A process's exit, waiting for its console lines.
#[derive(Debug)]
struct Pending {
    due_ns: u64,
    exit: ExitSeen,
    state: ProcessState,
}

#[derive(Clone, Debug)]
struct ExitSeen {
    at_ns: u64,
    tgid: u32,
    comm: String,
    exit_code: u32,
    main_process: bool,
    cgroup: CgroupSeen,
}

pub struct TerminationTracker {
    roots: PodRoots,
    pods: Option<PodIndex>,
    processes: Capped<u32, ProcessState>,
    faults: Capped<u32, Fault>,
    oom_constraints: Capped<u32, OomConstraintSeen>,
    oom_killed: Capped<u32, OomKilledLine>,
    pending: VecDeque<Pending>,
    /// Records and facts dropped for want of room.
    dropped: u64,
}

impl TerminationTracker {
    pub fn new(roots: PodRoots, pods: Option<PodIndex>) -> Self {
        Self {
            roots,
            pods,
            processes: Capped::new(MAX_PROCESSES),
            faults: Capped::new(MAX_CONSOLE_FACTS),
            oom_constraints: Capped::new(MAX_CONSOLE_FACTS),
            oom_killed: Capped::new(MAX_CONSOLE_FACTS),
            pending: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Entries dropped so far because a table was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn on_signal(&mut self, sent: &SignalSent) {
        let Ok(sig) = u8::try_from(sent.sig) else {
            return;
        };
        let seen = SignalSeen {
            at_ns: sent.header.ktime_ns,
            sig,
            code: sent.code,
            target_tid: sent.target_tid,
            sender_pid: sent.header.tgid,
            sender_comm: c_text(&sent.sender_comm),
            sender_cgroup: (sent.sender_in_pod != 0).then(|| (&sent.sender_cgroup).into()),
        };
        let now = seen.at_ns;
        let state = self.state(sent.target_tgid, now);
        if seen.sig == SIGTERM && seen.by_runtime() {
            state.runtime_term_ns = Some(seen.at_ns);
        }
        if state.signals.len() == SIGNALS_KEPT {
            state.signals.pop_front();
        }
        state.signals.push_back(seen);
    }

    pub fn on_oom_victim(&mut self, victim: &OomVictim) {
        let rss = (victim.present & oom_present::RSS != 0).then(|| {
            (victim.anon_rss_kb + victim.file_rss_kb + victim.shmem_rss_kb).saturating_mul(1024)
        });
        let score = (victim.present & oom_present::SCORE_ADJ != 0)
            .then(|| i16::try_from(victim.oom_score_adj).ok())
            .flatten();
        let mark = OomMark {
            tid: victim.tid,
            rss_bytes: rss,
            oom_score_adj: score,
        };
        self.state(victim.tgid, victim.header.ktime_ns).oom = Some(mark);
    }

    pub fn on_console(&mut self, fact: ConsoleFact, now_ns: u64) {
        let full = match fact {
            ConsoleFact::Fault { pid, fault } => self.faults.insert(pid, fault, now_ns),
            ConsoleFact::OomConstraint(line) => {
                let limit_bytes = match (&line.oom_memcg, self.roots.memory.as_ref()) {
                    (Some(memcg), Some(memory)) => self
                        .roots
                        .memory_dir(memcg)
                        .and_then(|dir| cgroupfs::memory_limit(&dir, memory.unified)),
                    _ => None,
                };
                let pid = line.pid;
                self.oom_constraints
                    .insert(pid, OomConstraintSeen { line, limit_bytes }, now_ns)
            }
            ConsoleFact::OomKilled(line) => self.oom_killed.insert(line.pid, line, now_ns),
        };
        self.count_eviction(full);
    }

    /// A pod process exited: a clean exit is explained at once, a death by signal once its
    /// console lines had time to come.
    pub fn on_exit(&mut self, exit: &ProcessExit) -> Option<Termination> {
        let seen = ExitSeen {
            at_ns: exit.header.ktime_ns,
            tgid: exit.header.tgid,
            comm: c_text(&exit.comm),
            exit_code: exit.exit_code,
            main_process: exit.main_process != 0,
            cgroup: (&exit.cgroup).into(),
        };
        let state = self.processes.remove(&seen.tgid).unwrap_or_default();
        if is_runtime_stage(&seen.comm) {
            return None;
        }
        if seen.exit_code & 0x7f == 0 {
            // Only a container's end is news when clean (the probe sends no other).
            return seen.main_process.then(|| self.termination(&seen, &state));
        }
        if self.pending.len() == MAX_PENDING {
            self.pending.pop_front();
            self.dropped += 1;
        }
        self.pending.push_back(Pending {
            due_ns: seen.at_ns + CONSOLE_WAIT.as_nanos() as u64,
            exit: seen,
            state,
        });
        None
    }

    /// The deaths whose wait for console lines is over, explained; forgets expired state.
    pub fn flush(&mut self, now_ns: u64) -> Vec<Termination> {
        let mut done = Vec::new();
        while self.pending.front().is_some_and(|p| p.due_ns <= now_ns) {
            let pending = self.pending.pop_front().expect("checked");
            done.push(self.termination(&pending.exit, &pending.state));
        }
        self.processes.expire(now_ns.saturating_sub(PROCESS_TTL_NS));
        let facts_before = now_ns.saturating_sub(CONSOLE_FACT_TTL_NS);
        self.faults.expire(facts_before);
        self.oom_constraints.expire(facts_before);
        self.oom_killed.expire(facts_before);
        done
    }

    fn state(&mut self, tgid: u32, now_ns: u64) -> &mut ProcessState {
        let (state, evicted) = self.processes.entry(tgid, now_ns);
        if evicted {
            self.dropped += 1;
        }
        state
    }

    fn count_eviction(&mut self, evicted: bool) {
        if evicted {
            self.dropped += 1;
        }
    }

    fn termination(&mut self, exit: &ExitSeen, state: &ProcessState) -> Termination {
        let container_id = exit.cgroup.container_id();
        Termination {
            at: wall_clock(exit.at_ns),
            container: self
                .pods
                .as_ref()
                .and_then(|pods| pods.container(&container_id)),
            container_id,
            pid: exit.tgid,
            comm: exit.comm.clone(),
            main_process: exit.main_process,
            cause: self.cause(exit, state),
        }
    }

    fn cause(&mut self, exit: &ExitSeen, state: &ProcessState) -> Cause {
        let signal = (exit.exit_code & 0x7f) as u8;
        if signal == 0 {
            return Cause::Exited {
                code: ((exit.exit_code >> 8) & 0xff) as u8,
            };
        }
        let core_dumped = exit.exit_code & 0x80 != 0;
        let sent = state.signals.iter().rev().find(|seen| seen.sig == signal);
        if signal == SIGKILL
            && let Some(oom) = self.oom_kill(exit, state, sent)
        {
            return Cause::OomKilled(Box::new(oom));
        }
        // A fault's signal comes from the kernel with a positive si_code, an abort() from
        // the process itself; another sender makes it a kill, whatever the signal.
        let own = sent.is_none_or(|seen| seen.code > 0 || seen.sender_pid == exit.tgid);
        if CRASH_SIGNALS.contains(&signal) && own {
            let tid = sent.map_or(exit.tgid, |seen| seen.target_tid);
            let fault = self
                .faults
                .remove(&tid)
                .or_else(|| self.faults.remove(&exit.tgid));
            return Cause::Crashed {
                signal,
                core_dumped,
                fault,
            };
        }
        let sender = match sent {
            Some(seen) => self.sender(seen, exit, state),
            None => Sender::Unknown,
        };
        Cause::Killed { signal, sender }
    }

    /// An OOM kill: the probe's mark or a console line names the process.
    fn oom_kill(
        &mut self,
        exit: &ExitSeen,
        state: &ProcessState,
        sent: Option<&SignalSeen>,
    ) -> Option<OomKill> {
        let tids = [
            state.oom.map(|mark| mark.tid),
            sent.map(|seen| seen.target_tid),
            Some(exit.tgid),
        ];
        let mut constraint = None;
        let mut killed = None;
        for tid in tids.into_iter().flatten() {
            constraint = constraint.or_else(|| self.oom_constraints.remove(&tid));
            killed = killed.or_else(|| self.oom_killed.remove(&tid));
        }
        if state.oom.is_none() && constraint.is_none() && killed.is_none() {
            return None;
        }
        let rss_bytes = state.oom.and_then(|mark| mark.rss_bytes).or_else(|| {
            killed.as_ref().map(|line| {
                (line.anon_rss_kb + line.file_rss_kb + line.shmem_rss_kb).saturating_mul(1024)
            })
        });
        let oom_score_adj = state
            .oom
            .and_then(|mark| mark.oom_score_adj)
            .or_else(|| killed.as_ref().and_then(|line| line.oom_score_adj));
        let (scope, limit_bytes) = match &constraint {
            Some(seen) => (scope_of(&seen.line), seen.limit_bytes),
            None => (scope_from_sender(exit, sent), None),
        };
        let memory_events = match (&constraint, self.roots.memory.as_ref()) {
            (Some(seen), Some(memory)) if memory.unified => self
                .roots
                .memory_dir(&seen.line.task_memcg)
                .and_then(|dir| cgroupfs::memory_events(&dir)),
            _ => None,
        };
        Some(OomKill {
            scope,
            rss_bytes,
            oom_score_adj,
            limit_bytes,
            memory_events,
        })
    }

    fn sender(&self, seen: &SignalSeen, exit: &ExitSeen, state: &ProcessState) -> Sender {
        if seen.code == SI_KERNEL {
            // SI_KERNEL is the kernel's own signal, whatever task ran when it was sent.
            return Sender::Kernel;
        }
        if let Some(cgroup) = &seen.sender_cgroup {
            let container_id = cgroup.container_id();
            let container = self
                .pods
                .as_ref()
                .and_then(|pods| pods.container(&container_id));
            if cgroup.parent_id == exit.cgroup.parent_id {
                return Sender::SamePod {
                    pid: seen.sender_pid,
                    comm: seen.sender_comm.clone(),
                    container: Some(container.map_or(container_id, |c| c.container)),
                };
            }
            return Sender::OtherPod {
                pid: seen.sender_pid,
                comm: seen.sender_comm.clone(),
                container,
                container_id,
            };
        }
        if seen.by_runtime() {
            let term = state
                .runtime_term_ns
                .filter(|&term| seen.sig == SIGKILL && term <= seen.at_ns);
            return Sender::Runtime {
                pid: seen.sender_pid,
                comm: seen.sender_comm.clone(),
                grace_period_expired: term.is_some(),
                grace_seconds: term.map(|term| (seen.at_ns - term) as f64 / 1e9),
            };
        }
        Sender::Host {
            pid: seen.sender_pid,
            comm: seen.sender_comm.clone(),
            // The sender may be gone already: then its cgroup is unknown.
            cgroup: procfs::cgroup(seen.sender_pid).ok(),
        }
    }
}

/// The scope of an OOM kill from the kernel's `oom-kill:` line: the cgroup that ran out is
/// the victim's (its container), its parent (the pod), or none or one higher (the node: the
/// machine, or `kubepods`, whose limit is the node's allocatable memory).
fn scope_of(line: &OomConstraint) -> OomScope {
    let Some(oom_memcg) = line.oom_memcg.as_deref() else {
        return OomScope::Node;
    };
    if line.constraint != "CONSTRAINT_MEMCG" {
        return OomScope::Node;
    }
    let task = line.task_memcg.trim_end_matches('/');
    let oom = oom_memcg.trim_end_matches('/');
    if oom == task {
        OomScope::Container
    } else if task
        .rsplit_once('/')
        .is_some_and(|(parent, _)| parent == oom)
    {
        OomScope::Pod
    } else {
        OomScope::Node
    }
}

/// Without the console line, a guess from who ran into the limit (the task running when the
/// OOM killer sent its SIGKILL): a charge from the victim's own container points at its
/// limit, one from its pod at the pod's, anything else at the node.
fn scope_from_sender(exit: &ExitSeen, sent: Option<&SignalSeen>) -> OomScope {
    match sent.and_then(|seen| seen.sender_cgroup.as_ref()) {
        Some(cgroup) if cgroup.id == exit.cgroup.id => OomScope::Container,
        Some(cgroup) if cgroup.parent_id == exit.cgroup.parent_id => OomScope::Pod,
        _ => OomScope::Node,
    }
}

/// The wall-clock time of a `bpf_ktime_get_ns` (CLOCK_MONOTONIC) instant.
fn wall_clock(ktime_ns: u64) -> SystemTime {
    let ago = procfs::monotonic_ns().saturating_sub(ktime_ns);
    SystemTime::now() - Duration::from_nanos(ago)
}

/// A map with a cap on its entries, each stamped with when it was last written: when full, the
/// oldest goes.
#[derive(Debug)]
struct Capped<K, V> {
    entries: HashMap<K, (u64, V)>,
    cap: usize,
}

impl<K: Copy + Eq + Hash, V: Default> Capped<K, V> {
    /// The entry for `key`, made if missing; and whether another was evicted for it.
    fn entry(&mut self, key: K, now_ns: u64) -> (&mut V, bool) {
        let evicted = self.make_room(&key);
        let entry = self.entries.entry(key).or_insert((now_ns, V::default()));
        entry.0 = now_ns;
        (&mut entry.1, evicted)
    }
}

impl<K: Copy + Eq + Hash, V> Capped<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            entries: HashMap::new(),
            cap,
        }
    }

    /// Inserts or replaces; returns whether another entry was evicted for it.
    fn insert(&mut self, key: K, value: V, now_ns: u64) -> bool {
        let evicted = self.make_room(&key);
        self.entries.insert(key, (now_ns, value));
        evicted
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        self.entries.remove(key).map(|(_, value)| value)
    }

    /// Drops the entries last written before `before_ns`.
    fn expire(&mut self, before_ns: u64) {
        self.entries.retain(|_, (stamp, _)| *stamp >= before_ns);
    }

    fn make_room(&mut self, key: &K) -> bool {
        if self.entries.len() < self.cap || self.entries.contains_key(key) {
            return false;
        }
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, (stamp, _))| *stamp)
            .map(|(key, _)| *key);
        if let Some(oldest) = oldest {
            self.entries.remove(&oldest);
        }
        true
    }
}

/// runc's set-up stages (`runc:[0:PARENT]`, `runc:[1:CHILD]`) join the container's cgroup
/// before its process starts, from outside its pid namespace, and exit when it has: their ends
/// are the runtime's, not the container's (known by name, like the runtime's signals).
fn is_runtime_stage(comm: &str) -> bool {
    comm.starts_with("runc:[")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use lastgasp_common::{CGROUP_NAME_LEN, EventHeader, EventKind, TASK_COMM_LEN};

    use super::*;
    use crate::agent::terminations::{
        cgroupfs::CgroupMount,
        console_lines::{self, OomConstraint},
    };

    const CONTAINER: &str = "4d3f0c5a1b2e4f6a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a";
    const OTHER: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const POD: u64 = 100;
    const SECOND: u64 = 1_000_000_000;

    fn tracker() -> TerminationTracker {
        let mount = CgroupMount {
            mount_point: PathBuf::from("/nonexistent/cgroup"),
            unified: false,
            options: vec!["memory".into()],
        };
        TerminationTracker::new(
            PodRoots {
                mount: mount.clone(),
                paths: Vec::new(),
                roots: Vec::new(),
                memory: Some(mount),
            },
            None,
        )
    }

    fn bytes<const N: usize>(text: &str) -> [u8; N] {
        let mut out = [0; N];
        out[..text.len()].copy_from_slice(text.as_bytes());
        out
    }

    fn cgroup(id: u64, parent_id: u64, name: &str) -> CgroupRef {
        CgroupRef {
            id,
            parent_id,
            name: bytes::<CGROUP_NAME_LEN>(&format!("cri-containerd-{name}.scope")),
        }
    }

    fn header(kind: EventKind, tgid: u32, at: u64) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            tgid,
            tid: tgid,
            _pad: 0,
            ktime_ns: at,
        }
    }

    /// `sig` with `code` from process `sender` (`comm`), in the pod cgroup `from` if any, to
    /// process 42 of the container.
    fn signal(
        at: u64,
        sig: i32,
        code: i32,
        sender: u32,
        comm: &str,
        from: Option<CgroupRef>,
    ) -> SignalSent {
        SignalSent {
            header: header(EventKind::SignalSent, sender, at),
            sig,
            code,
            result: 0,
            group: 1,
            target_tid: 42,
            target_tgid: 42,
            sender_in_pod: from.is_some() as u32,
            _pad: 0,
            sender_comm: bytes::<TASK_COMM_LEN>(comm),
            target_comm: bytes::<TASK_COMM_LEN>("app"),
            target_cgroup: cgroup(1, POD, CONTAINER),
            sender_cgroup: from.unwrap_or(cgroup(0, 0, "")),
        }
    }

    fn exit(at: u64, exit_code: u32, main_process: bool) -> ProcessExit {
        ProcessExit {
            header: header(EventKind::ProcessExit, 42, at),
            exit_code,
            parent_tgid: 1,
            main_process: main_process as u32,
            _pad: 0,
            comm: bytes::<TASK_COMM_LEN>("app"),
            cgroup: cgroup(1, POD, CONTAINER),
        }
    }

    /// The cause of process 42's death by a signal, once its console wait is over.
    fn cause_after(tracker: &mut TerminationTracker, exit_code: u32, at: u64) -> Cause {
        assert_eq!(tracker.on_exit(&exit(at, exit_code, true)), None);
        assert!(tracker.flush(at + 1).is_empty(), "waits for the console");
        let mut done = tracker.flush(at + SECOND);
        assert_eq!(done.len(), 1);
        let termination = done.remove(0);
        assert_eq!(
            (termination.pid, termination.container_id.as_str()),
            (42, CONTAINER)
        );
        termination.cause
    }

    #[test]
    fn the_runtimes_set_up_stages_are_not_the_container() {
        let mut tracker = tracker();
        for stage in ["runc:[0:PARENT]", "runc:[1:CHILD]"] {
            let mut ended = exit(SECOND, 0, true);
            ended.comm = bytes::<TASK_COMM_LEN>(stage);
            assert_eq!(tracker.on_exit(&ended), None, "{stage}");
        }
        assert!(tracker.flush(10 * SECOND).is_empty());
    }

    #[test]
    fn clean_exits_of_containers_are_explained_at_once_and_of_children_never() {
        let mut tracker = tracker();
        let done = tracker.on_exit(&exit(SECOND, 3 << 8, true)).unwrap();
        assert_eq!(done.cause, Cause::Exited { code: 3 });
        assert!(done.main_process);
        assert_eq!(tracker.on_exit(&exit(SECOND, 0, false)), None);
        assert!(tracker.flush(10 * SECOND).is_empty());
    }

    #[test]
    fn senders_are_classified() {
        let mut tracker = tracker();
        tracker.on_signal(&signal(SECOND, 9, 0, std::process::id(), "kill", None));
        match cause_after(&mut tracker, 9, 2 * SECOND) {
            Cause::Killed {
                signal: 9,
                sender: Sender::Host { pid, comm, cgroup },
            } => {
                assert_eq!((pid, comm.as_str()), (std::process::id(), "kill"));
                // A live sender's cgroup is read from /proc.
                assert!(
                    cgroup.as_ref().is_some_and(|c| c.starts_with('/')),
                    "{cgroup:?}"
                );
            }
            other => panic!("{other:?}"),
        }

        tracker.on_signal(&signal(
            SECOND,
            15,
            0,
            7,
            "sidecar",
            Some(cgroup(2, POD, OTHER)),
        ));
        assert_eq!(
            cause_after(&mut tracker, 15, 2 * SECOND),
            Cause::Killed {
                signal: 15,
                sender: Sender::SamePod {
                    pid: 7,
                    comm: "sidecar".into(),
                    container: Some(OTHER.into()),
                }
            }
        );

        tracker.on_signal(&signal(
            SECOND,
            15,
            -6,
            8,
            "chaos",
            Some(cgroup(3, POD + 1, OTHER)),
        ));
        assert_eq!(
            cause_after(&mut tracker, 15, 2 * SECOND),
            Cause::Killed {
                signal: 15,
                sender: Sender::OtherPod {
                    pid: 8,
                    comm: "chaos".into(),
                    container: None,
                    container_id: OTHER.into(),
                }
            }
        );

        // SI_KERNEL without any OOM evidence: the kernel, whichever task ran.
        tracker.on_signal(&signal(
            SECOND,
            9,
            0x80,
            9,
            "app",
            Some(cgroup(1, POD, CONTAINER)),
        ));
        assert_eq!(
            cause_after(&mut tracker, 9, 2 * SECOND),
            Cause::Killed {
                signal: 9,
                sender: Sender::Kernel
            }
        );

        // Nothing seen of the signal.
        assert_eq!(
            cause_after(&mut tracker, 15, 2 * SECOND),
            Cause::Killed {
                signal: 15,
                sender: Sender::Unknown
            }
        );
    }

    #[test]
    fn the_runtimes_sigkill_after_its_sigterm_ran_out_the_grace_period() {
        let mut tracker = tracker();
        tracker.on_signal(&signal(SECOND, 15, 0, 50, "containerd-shim", None));
        tracker.on_signal(&signal(31 * SECOND, 9, 0, 51, "runc", None));
        assert_eq!(
            cause_after(&mut tracker, 9, 32 * SECOND),
            Cause::Killed {
                signal: 9,
                sender: Sender::Runtime {
                    pid: 51,
                    comm: "runc".into(),
                    grace_period_expired: true,
                    grace_seconds: Some(30.0),
                }
            }
        );
        // A SIGTERM that was enough.
        tracker.on_signal(&signal(SECOND, 15, 0, 50, "runc", None));
        assert_eq!(
            cause_after(&mut tracker, 15, 2 * SECOND),
            Cause::Killed {
                signal: 15,
                sender: Sender::Runtime {
                    pid: 50,
                    comm: "runc".into(),
                    grace_period_expired: false,
                    grace_seconds: None,
                }
            }
        );
        // In a pod, a runtime's name is just a name.
        tracker.on_signal(&signal(
            SECOND,
            9,
            0,
            52,
            "runc",
            Some(cgroup(2, POD, OTHER)),
        ));
        assert!(matches!(
            cause_after(&mut tracker, 9, 2 * SECOND),
            Cause::Killed {
                sender: Sender::SamePod { .. },
                ..
            }
        ));
    }

    #[test]
    fn crashes_are_own_faults_and_carry_the_console_line() {
        let mut tracker = tracker();
        // SEGV_MAPERR from the kernel to the faulting thread, the console's line about it.
        tracker.on_signal(&signal(
            SECOND,
            11,
            1,
            42,
            "app",
            Some(cgroup(1, POD, CONTAINER)),
        ));
        tracker.on_console(
            console_lines::parse(
                "app[42]: segfault at 0 ip 0000000000401126 sp 00007ffc error 4 in libfoo.so[400000+1000]",
            )
            .unwrap(),
            SECOND,
        );
        match cause_after(&mut tracker, 11 | 0x80, 2 * SECOND) {
            Cause::Crashed {
                signal: 11,
                core_dumped: true,
                fault: Some(fault),
            } => assert_eq!(fault.location.as_deref(), Some("libfoo.so")),
            other => panic!("{other:?}"),
        }
        // abort() with no signal seen is a crash still, without a line.
        assert_eq!(
            cause_after(&mut tracker, 6, 2 * SECOND),
            Cause::Crashed {
                signal: 6,
                core_dumped: false,
                fault: None
            }
        );
        // SIGSEGV sent by another process is a kill.
        tracker.on_signal(&signal(SECOND, 11, 0, 77, "kill", None));
        assert!(matches!(
            cause_after(&mut tracker, 11, 2 * SECOND),
            Cause::Killed {
                signal: 11,
                sender: Sender::Host { pid: 77, .. }
            }
        ));
    }

    fn constraint(oom_memcg: Option<&str>) -> ConsoleFact {
        ConsoleFact::OomConstraint(OomConstraint {
            constraint: if oom_memcg.is_some() {
                "CONSTRAINT_MEMCG"
            } else {
                "CONSTRAINT_NONE"
            }
            .into(),
            oom_memcg: oom_memcg.map(Into::into),
            task_memcg: "/kubepods/burstable/pod1/c1".into(),
            pid: 42,
        })
    }

    #[test]
    fn oom_kills_have_their_scope_rss_and_score() {
        let victim = OomVictim {
            header: header(EventKind::OomVictim, 42, SECOND),
            tid: 42,
            tgid: 42,
            present: oom_present::RSS | oom_present::SCORE_ADJ,
            oom_score_adj: 999,
            anon_rss_kb: 60 << 10,
            file_rss_kb: 3 << 10,
            shmem_rss_kb: 1 << 10,
        };
        for (memcg, scope) in [
            (Some("/kubepods/burstable/pod1/c1"), OomScope::Container),
            (Some("/kubepods/burstable/pod1"), OomScope::Pod),
            (Some("/kubepods"), OomScope::Node),
            (None, OomScope::Node),
        ] {
            let mut tracker = tracker();
            tracker.on_signal(&signal(SECOND, 9, 0x80, 42, "app", None));
            tracker.on_oom_victim(&victim);
            tracker.on_console(constraint(memcg), SECOND);
            let Cause::OomKilled(oom) = cause_after(&mut tracker, 9, 2 * SECOND) else {
                panic!("not an OOM kill")
            };
            assert_eq!(oom.scope, scope, "{memcg:?}");
            assert_eq!(oom.rss_bytes, Some(64 << 20));
            assert_eq!(oom.oom_score_adj, Some(999));
            // The cgroup files are not there.
            assert_eq!((oom.limit_bytes, oom.memory_events), (None, None));
        }

        // Before Linux 6.9 the mark has no RSS: the console's line has.
        let mut tracker = tracker();
        tracker.on_signal(&signal(
            SECOND,
            9,
            0x80,
            42,
            "app",
            Some(cgroup(1, POD, CONTAINER)),
        ));
        tracker.on_oom_victim(&OomVictim {
            present: 0,
            ..victim
        });
        tracker.on_console(
            console_lines::parse(
                "Memory cgroup out of memory: Killed process 42 (app) total-vm:9kB, anon-rss:1024kB, \
                 file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:1kB oom_score_adj:5",
            )
            .unwrap(),
            SECOND,
        );
        let Cause::OomKilled(oom) = cause_after(&mut tracker, 9, 2 * SECOND) else {
            panic!("not an OOM kill")
        };
        assert_eq!((oom.rss_bytes, oom.oom_score_adj), (Some(1 << 20), Some(5)));
        // No constraint line: the scope from who ran into the limit, the container itself.
        assert_eq!(oom.scope, OomScope::Container);
    }

    #[test]
    fn state_is_capped_and_expires() {
        let mut tracker = tracker();
        for tgid in 0..(MAX_PROCESSES as u32 + 10) {
            let mut sent = signal(SECOND + u64::from(tgid), 15, 0, 1, "kill", None);
            sent.target_tgid = tgid;
            tracker.on_signal(&sent);
        }
        assert_eq!(tracker.processes.entries.len(), MAX_PROCESSES);
        assert_eq!(tracker.dropped(), 10);
        // The oldest went.
        assert!(!tracker.processes.entries.contains_key(&0));
        tracker.flush(SECOND + PROCESS_TTL_NS + MAX_PROCESSES as u64 + 10);
        assert!(tracker.processes.entries.is_empty());
        assert!(is_runtime("containerd-shim") && is_runtime("runc:[2:INIT]"));
        assert!(!is_runtime("bash"));
    }
}
