//! Whether the probes are still attached: the ids of the programs the agent loaded and of the
//! links attaching them, recorded after attaching, are looked for among the kernel's programs
//! and links every few seconds. A program or link gone makes `/healthz` answer 503 (a restarted
//! agent attaches again) until it is back.
//!
//! Another process cannot take them while the agent holds their descriptors, and the kernel
//! refuses `BPF_LINK_DETACH` for the perf-event links of tracepoints and kprobes, so what this
//! catches is the agent's own loss of a program or link.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use aya::{
    Ebpf,
    programs::{links::LinkError, loaded_links, loaded_programs},
    sys::SyscallError,
};

use crate::health::Health;

/// Time between two checks.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The [`Health`] entry of the probes.
const HEALTH_KEY: &str = "probes";

/// A program the agent loaded, and the links that attached it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Program {
    name: String,
    id: u32,
    links: Vec<u32>,
}

/// The programs of the loaded probes, as the kernel knew them after attaching.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attached {
    programs: Vec<Program>,
}

/// The kernel's loaded programs and links: program ids, and each link's program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelView {
    programs: HashSet<u32>,
    links: HashMap<u32, u32>,
}

impl KernelView {
    /// Every loaded program and link. Objects that go away while they are listed are left
    /// out; any other error (e.g. no `CAP_SYS_ADMIN` to open them by id) fails the whole view,
    /// which then proves nothing.
    pub fn read() -> Result<Self, SyscallError> {
        let mut view = Self::default();
        for program in loaded_programs() {
            match program {
                Ok(program) => {
                    view.programs.insert(program.id());
                }
                Err(aya::programs::ProgramError::SyscallError(error)) if vanished(&error) => {}
                Err(aya::programs::ProgramError::SyscallError(error)) => return Err(error),
                Err(error) => return Err(other_error("listing programs", error)),
            }
        }
        for link in loaded_links() {
            match link {
                Ok(link) => {
                    view.links.insert(link.id(), link.program_id());
                }
                Err(LinkError::SyscallError(error)) if vanished(&error) => {}
                Err(LinkError::SyscallError(error)) => return Err(error),
                Err(error) => return Err(other_error("listing links", error)),
            }
        }
        Ok(view)
    }

    fn links_of(&self, program: u32) -> Vec<u32> {
        let mut links: Vec<u32> = self
            .links
            .iter()
            .filter(|&(_, &attached)| attached == program)
            .map(|(&link, _)| link)
            .collect();
        links.sort_unstable();
        links
    }
}

fn vanished(error: &SyscallError) -> bool {
    error.io_error.raw_os_error() == Some(libc::ENOENT)
}

fn other_error(call: &'static str, error: impl std::error::Error) -> SyscallError {
    SyscallError {
        call,
        io_error: std::io::Error::other(error.to_string()),
    }
}

impl Attached {
    /// The loaded programs of `ebpf` (attached or not) and their links in `kernel`.
    pub fn record(ebpf: &Ebpf, kernel: &KernelView) -> Self {
        let loaded = ebpf.programs().filter_map(|(name, program)| {
            let id = program.info().ok()?.id();
            Some((name.to_owned(), id))
        });
        Self::of(loaded, kernel)
    }

    fn of(loaded: impl IntoIterator<Item = (String, u32)>, kernel: &KernelView) -> Self {
        let mut programs: Vec<Program> = loaded
            .into_iter()
            .map(|(name, id)| Program {
                links: kernel.links_of(id),
                name,
                id,
            })
            .collect();
        programs.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Self { programs }
    }

    /// What of the recorded programs and links `kernel` no longer has, one line each.
    pub fn lost(&self, kernel: &KernelView) -> Vec<String> {
        let mut lost = Vec::new();
        for program in &self.programs {
            if !kernel.programs.contains(&program.id) {
                lost.push(format!(
                    "probe program `{}` (id {}) is no longer loaded",
                    program.name, program.id
                ));
                continue;
            }
            for link in &program.links {
                if kernel.links.get(link) != Some(&program.id) {
                    lost.push(format!(
                        "probe program `{}` (id {}) lost its link {link}",
                        program.name, program.id
                    ));
                }
            }
        }
        lost
    }
}

/// Checks every [`CHECK_INTERVAL`] that every recorded program and link is still there; marks
/// `health` down while some are not.
pub async fn check(attached: Attached, health: Health) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unreadable = false;
    let mut was_lost = Vec::new();
    loop {
        tick.tick().await;
        let kernel = match KernelView::read() {
            Ok(kernel) => kernel,
            Err(error) => {
                if !std::mem::replace(&mut unreadable, true) {
                    tracing::warn!(%error, "cannot list the kernel's BPF programs and links; a lost probe goes unnoticed");
                }
                continue;
            }
        };
        unreadable = false;
        let lost = attached.lost(&kernel);
        if lost != was_lost {
            if lost.is_empty() {
                tracing::info!("every probe program is attached again");
                health.set_up(HEALTH_KEY);
            } else {
                for what in &lost {
                    tracing::error!("{what}");
                }
                health.set_down(HEALTH_KEY, lost.join("\n"));
            }
            was_lost = lost;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(programs: &[u32], links: &[(u32, u32)]) -> KernelView {
        KernelView {
            programs: programs.iter().copied().collect(),
            links: links.iter().copied().collect(),
        }
    }

    fn attached(kernel: &KernelView) -> Attached {
        Attached::of(
            [
                ("console".to_owned(), 10),
                ("recvfrom_enter".to_owned(), 11),
                ("unattached".to_owned(), 12),
            ],
            kernel,
        )
    }

    #[test]
    fn records_each_program_with_its_links() {
        let at_start = kernel(
            &[3, 10, 11, 12],
            &[(100, 10), (101, 11), (102, 3), (103, 11)],
        );
        let attached = attached(&at_start);
        assert_eq!(
            attached.programs,
            [
                Program {
                    name: "console".into(),
                    id: 10,
                    links: vec![100]
                },
                Program {
                    name: "recvfrom_enter".into(),
                    id: 11,
                    links: vec![101, 103]
                },
                Program {
                    name: "unattached".into(),
                    id: 12,
                    links: vec![]
                },
            ]
        );
        assert!(attached.lost(&at_start).is_empty());
        let others_changed = kernel(
            &[10, 11, 12, 40],
            &[(100, 10), (101, 11), (103, 11), (104, 40)],
        );
        assert!(
            attached.lost(&others_changed).is_empty(),
            "other programs come and go"
        );
    }

    #[test]
    fn a_program_unloaded_or_a_link_gone_is_lost() {
        let attached = attached(&kernel(&[10, 11, 12], &[(100, 10), (101, 11)]));
        assert_eq!(
            attached.lost(&kernel(&[11, 12], &[(101, 11)])),
            ["probe program `console` (id 10) is no longer loaded"]
        );
        assert_eq!(
            attached.lost(&kernel(&[10, 11, 12], &[(100, 10)])),
            ["probe program `recvfrom_enter` (id 11) lost its link 101"]
        );
        assert_eq!(
            attached.lost(&kernel(&[10, 11, 12], &[(100, 10), (101, 12)])),
            ["probe program `recvfrom_enter` (id 11) lost its link 101"],
            "a link of that id now attaches another program"
        );
    }

    #[tokio::test]
    async fn health_is_down_while_a_probe_is_lost() {
        let health = Health::default();
        // No program has id 0.
        let lost = Attached::of([("console".to_owned(), 0)], &KernelView::default());
        let task = tokio::spawn(check(lost, health.clone()));
        if KernelView::read().is_ok() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while health.problems().is_empty() {
                assert!(tokio::time::Instant::now() < deadline, "not marked down");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(
                health.problems(),
                ["probe program `console` (id 0) is no longer loaded"]
            );
        } else {
            // Without the privilege to list programs nothing is concluded.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(health.problems().is_empty());
        }
        task.abort();
    }
}
