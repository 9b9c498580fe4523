//! The server's processes, owned by one thread: each in its own process group, killed with
//! the group when the [`Supervisor`] is dropped, and reaped.
//!
//! `PR_SET_PDEATHSIG` kills a child when the *thread* that forked it ends, so the children are
//! forked by this long-lived thread (not by whichever tokio worker starts the server): they
//! die with it, at drop or when the test process dies in any way.

use std::{
    collections::HashMap,
    io,
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::Duration,
};

enum Request {
    Spawn {
        name: String,
        command: Box<Command>,
        reply: mpsc::Sender<io::Result<u32>>,
    },
}

pub struct Supervisor {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    exited: Arc<Mutex<HashMap<String, ExitStatus>>>,
}

impl Supervisor {
    pub fn new() -> Self {
        let (requests, inbox) = mpsc::channel();
        let exited = Arc::new(Mutex::new(HashMap::new()));
        let seen = exited.clone();
        let thread = std::thread::Builder::new()
            .name("kube-processes".to_owned())
            .spawn(move || supervise(&inbox, &seen))
            .expect("a thread for the server's processes");
        Self {
            requests: Some(requests),
            thread: Some(thread),
            exited,
        }
    }

    /// Starts `command` as `name`; returns its pid.
    pub fn spawn(&self, name: &str, command: Command) -> io::Result<u32> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .as_ref()
            .expect("running")
            .send(Request::Spawn {
                name: name.to_owned(),
                command: Box::new(command),
                reply,
            })
            .map_err(|_| io::Error::other("the process thread is gone"))?;
        answer
            .recv()
            .map_err(|_| io::Error::other("the process thread is gone"))?
    }

    /// How `name` exited, if it has.
    pub fn exit_status(&self, name: &str) -> Option<ExitStatus> {
        self.exited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    /// Kills every process group (the last started first) and reaps the processes.
    pub fn stop(&mut self) {
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn supervise(inbox: &mpsc::Receiver<Request>, exited: &Mutex<HashMap<String, ExitStatus>>) {
    let mut children: Vec<(String, Child)> = Vec::new();
    loop {
        match inbox.recv_timeout(Duration::from_millis(100)) {
            Ok(Request::Spawn {
                name,
                mut command,
                reply,
            }) => {
                let result = spawn(&mut command).map(|child| {
                    let pid = child.id();
                    children.push((name, child));
                    pid
                });
                let _ = reply.send(result);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let mut exited = exited.lock().unwrap_or_else(|e| e.into_inner());
        for (name, child) in &mut children {
            if !exited.contains_key(name)
                && let Ok(Some(status)) = child.try_wait()
            {
                exited.insert(name.clone(), status);
            }
        }
    }
    for (_, child) in children.iter_mut().rev() {
        if let Ok(None) = child.try_wait() {
            // SAFETY: kill has no memory-safety preconditions; the negative pid names the
            // child's own process group (it is the group's leader, `process_group(0)`).
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        }
        let _ = child.wait();
    }
}

fn spawn(command: &mut Command) -> io::Result<Child> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    command.process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls, allocating nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would kill this process.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}
