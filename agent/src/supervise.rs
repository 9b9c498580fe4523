//! Supervised tasks. Every long-running task of the agent and of the controller runs in a
//! [`Supervisor`] under a name. A task that should run as long as the process and ends, or any
//! task that panics, is a failure: the supervisor marks the process unhealthy and reports which
//! task failed and why, and the process exits non-zero so that Kubernetes restarts it, rather
//! than running on half-working while `/healthz` says ok. Dropping a supervisor aborts its tasks.

use std::{
    any::Any,
    collections::HashMap,
    fmt,
    future::Future,
    panic::{self, AssertUnwindSafe},
    str::FromStr,
    sync::OnceLock,
    thread,
    time::Duration,
};

use tokio::{
    sync::oneshot,
    task::{AbortHandle, Id, JoinSet},
};

use crate::health::Health;

/// What a task's end means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Runs as long as the process: its end, however it comes, is a failure.
    Required,
    /// Does its work and ends (e.g. a one-shot report); only a panic is a failure.
    OneShot,
}

/// How a task failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// A [`Lifetime::Required`] task returned.
    Ended,
    /// The panic's message.
    Panicked(String),
    /// Aborted while the supervisor still expected it to run.
    Cancelled,
}

/// A supervised task that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFailure {
    pub task: &'static str,
    pub cause: Cause,
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Ended => write!(f, "task `{}` ended", self.task),
            Cause::Panicked(message) => write!(f, "task `{}` panicked: {message}", self.task),
            Cause::Cancelled => write!(f, "task `{}` was cancelled", self.task),
        }
    }
}

impl std::error::Error for TaskFailure {}

/// What a task's future returns: `Err` carries the panic message of a supervised thread.
type Outcome = Result<(), String>;

/// Tasks run under their names; see the module documentation.
pub struct Supervisor {
    tasks: JoinSet<Outcome>,
    names: HashMap<Id, (&'static str, Lifetime)>,
    health: Health,
}

impl Supervisor {
    /// A supervisor that marks `health` down when a task fails.
    pub fn new(health: Health) -> Self {
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            health,
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Runs `task` on the runtime as `name`.
    pub fn spawn<F>(&mut self, name: &'static str, lifetime: Lifetime, task: F) -> AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let injected = INJECTED
            .get()
            .filter(|injected| injected.task == name)
            .map(|injected| injected.after);
        self.insert(name, lifetime, async move {
            match injected {
                Some(after) => tokio::select! {
                    () = task => {}
                    () = tokio::time::sleep(after) => panic!("injected panic (--inject-task-panic)"),
                },
                None => task.await,
            }
            Ok(())
        })
    }

    /// Runs `body` on a thread of its own named `name`, for work that must not wait on the
    /// runtime. Its end and its panic are reported like a task's; aborting does not stop it
    /// (`body` must watch a stop flag of its own), so the handle is for joining it.
    pub fn spawn_thread<F>(
        &mut self,
        name: &'static str,
        lifetime: Lifetime,
        body: F,
    ) -> std::io::Result<thread::JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        let (done, ended) = oneshot::channel();
        let thread = thread::Builder::new().name(name.into()).spawn(move || {
            let outcome = panic::catch_unwind(AssertUnwindSafe(body)).map_err(panic_message);
            let _ = done.send(outcome);
        })?;
        self.insert(name, lifetime, async move {
            ended
                .await
                .unwrap_or_else(|_| Err("the thread ended without a word".into()))
        });
        Ok(thread)
    }

    fn insert<F>(&mut self, name: &'static str, lifetime: Lifetime, task: F) -> AbortHandle
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), (name, lifetime));
        handle
    }

    /// Waits for the first task to fail, marks the health down with the reason and logs it.
    /// Never returns while every task runs (or has ended as it may). Cancel-safe.
    pub async fn failed(&mut self) -> TaskFailure {
        loop {
            let Some(joined) = self.tasks.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, cause) = match joined {
                Ok((id, Ok(()))) => (id, Cause::Ended),
                Ok((id, Err(message))) => (id, Cause::Panicked(message)),
                Err(error) if error.is_panic() => (
                    error.id(),
                    Cause::Panicked(panic_message(error.into_panic())),
                ),
                Err(error) => (error.id(), Cause::Cancelled),
            };
            let Some((task, lifetime)) = self.names.remove(&id) else {
                continue;
            };
            if lifetime == Lifetime::OneShot && cause == Cause::Ended {
                continue;
            }
            let failure = TaskFailure { task, cause };
            self.health.set_down(task, failure.to_string());
            tracing::error!(task, "{failure}");
            return failure;
        }
    }

    /// Aborts every task; threads stop by their own stop flags.
    pub fn abort_all(&mut self) {
        self.tasks.abort_all();
    }
}

/// The message of a panic, from its payload.
pub fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => (*message).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}

/// For tests of the process: which task panics, and how long after it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedPanic {
    pub task: String,
    pub after: Duration,
}

/// `TASK` or `TASK:DELAY` (e.g. `events:500ms`).
impl FromStr for InjectedPanic {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (task, after) = match text.split_once(':') {
            Some((task, after)) => (
                task,
                humantime::parse_duration(after).map_err(|error| error.to_string())?,
            ),
            None => (text, Duration::ZERO),
        };
        if task.is_empty() {
            return Err("no task named".into());
        }
        Ok(Self {
            task: task.to_owned(),
            after,
        })
    }
}

static INJECTED: OnceLock<InjectedPanic> = OnceLock::new();

/// Makes the task named in `injected` panic in every supervisor of this process (set once,
/// before the tasks start). For tests only.
pub fn inject_panic(injected: InjectedPanic) {
    let _ = INJECTED.set(injected);
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    const SOON: Duration = Duration::from_secs(5);

    async fn failure(supervisor: &mut Supervisor) -> TaskFailure {
        tokio::time::timeout(SOON, supervisor.failed())
            .await
            .expect("a failure reported")
    }

    #[tokio::test]
    async fn a_panicking_task_is_named_with_its_message() {
        let health = Health::default();
        let mut supervisor = Supervisor::new(health.clone());
        supervisor.spawn("steady", Lifetime::Required, std::future::pending());
        supervisor.spawn("pod-watch", Lifetime::Required, async {
            tokio::task::yield_now().await;
            std::hint::black_box(None::<u32>).expect("pod index lock");
        });
        let failure = failure(&mut supervisor).await;
        assert_eq!(
            failure,
            TaskFailure {
                task: "pod-watch",
                cause: Cause::Panicked("pod index lock".into()),
            }
        );
        assert_eq!(
            failure.to_string(),
            "task `pod-watch` panicked: pod index lock"
        );
        assert_eq!(health.problems(), [failure.to_string()]);
    }

    #[tokio::test]
    async fn a_required_task_that_ends_is_a_failure() {
        let mut supervisor = Supervisor::new(Health::default());
        supervisor.spawn("events", Lifetime::Required, async {});
        assert_eq!(
            failure(&mut supervisor).await,
            TaskFailure {
                task: "events",
                cause: Cause::Ended,
            }
        );
    }

    #[tokio::test]
    async fn a_one_shot_task_may_end_but_not_panic() {
        let health = Health::default();
        let mut supervisor = Supervisor::new(health.clone());
        supervisor.spawn("report", Lifetime::OneShot, async {});
        let waited = tokio::time::timeout(Duration::from_millis(100), supervisor.failed()).await;
        assert!(waited.is_err(), "no failure: {waited:?}");
        assert!(health.problems().is_empty());

        supervisor.spawn("report", Lifetime::OneShot, async { panic!("bad record") });
        assert_eq!(
            failure(&mut supervisor).await.cause,
            Cause::Panicked("bad record".into())
        );
    }

    #[tokio::test]
    async fn a_thread_is_supervised_like_a_task() {
        let mut supervisor = Supervisor::new(Health::default());
        let thread = supervisor
            .spawn_thread("kernel-log", Lifetime::Required, || {
                panic!("ring {} unreadable", 7)
            })
            .unwrap();
        assert_eq!(
            failure(&mut supervisor).await,
            TaskFailure {
                task: "kernel-log",
                cause: Cause::Panicked("ring 7 unreadable".into()),
            }
        );
        assert!(thread.join().is_ok(), "the panic was caught");

        supervisor
            .spawn_thread("kernel-log", Lifetime::Required, || {})
            .unwrap();
        assert_eq!(failure(&mut supervisor).await.cause, Cause::Ended);
    }

    #[tokio::test]
    async fn dropping_the_supervisor_aborts_its_tasks() {
        /// Set when the task's future is dropped.
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let mut supervisor = Supervisor::new(Health::default());
        let guard = Dropped(dropped.clone());
        supervisor.spawn("forever", Lifetime::Required, async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(supervisor);
        let deadline = tokio::time::Instant::now() + SOON;
        while !dropped.load(Ordering::SeqCst) {
            assert!(tokio::time::Instant::now() < deadline, "task not aborted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn injected_panics_name_a_task_and_a_delay() {
        assert_eq!(
            "events".parse(),
            Ok(InjectedPanic {
                task: "events".into(),
                after: Duration::ZERO,
            })
        );
        assert_eq!(
            "netconsole-ingest:1s".parse(),
            Ok(InjectedPanic {
                task: "netconsole-ingest".into(),
                after: Duration::from_secs(1),
            })
        );
        assert!("".parse::<InjectedPanic>().is_err());
        assert!("events:soon".parse::<InjectedPanic>().is_err());
    }
}
