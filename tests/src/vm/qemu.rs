//! QEMU (TCG: KVM is not usable on the machines this runs on) with the serial console on
//! stdio, user-mode networking (the host's 127.0.0.1 is 10.0.2.2 to the guest), one
//! virtio-net card, and a QMP socket to look at a guest that stopped making progress.

use std::{
    io::{BufRead as _, BufReader, Read, Write as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{INIT_READY, Initramfs, Kernel, cache_dir, require_tool};

const QEMU: &str = "qemu-system-x86_64";
/// Boots tried by [`Vm::boot_to_init`] before giving up.
pub const BOOT_ATTEMPTS: u32 = 3;

#[derive(Clone, Debug)]
pub struct VmOptions {
    pub memory_mib: u32,
    pub cpus: u32,
    /// Name of the console log file in `<cache>/logs/`.
    pub name: String,
    /// When the guest reboots (a panic with `panic=1`, `reboot -f`), qemu resets it and boots
    /// the same kernel and initramfs again, with its RAM as it was (so ramoops survives);
    /// otherwise (`-no-reboot`) qemu exits.
    pub reboot: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory_mib: 512,
            cpus: 1,
            name: "vm".into(),
            reboot: false,
        }
    }
}

/// A line of the guest's console and when the host read it.
#[derive(Clone, Debug)]
pub struct ConsoleLine {
    pub at: Instant,
    pub text: String,
}

#[derive(Default)]
struct Console {
    lines: Vec<ConsoleLine>,
    /// The unfinished last line.
    partial: String,
    /// qemu closed its stdout: it has exited.
    closed: bool,
}

/// A running guest; qemu is killed on drop.
pub struct Vm {
    child: Child,
    console: Arc<(Mutex<Console>, Condvar)>,
    pub started: Instant,
    pub log_path: PathBuf,
    /// qemu's QMP socket (JSON commands; see `lastgasp_tests::vm_diagnose`).
    pub qmp_path: PathBuf,
}

impl Vm {
    /// Boots `kernel` with `initramfs`; `cmdline_extra` is appended to the kernel command line.
    pub fn boot(
        kernel: &Kernel,
        initramfs: &Initramfs,
        cmdline_extra: &str,
        options: &VmOptions,
    ) -> anyhow::Result<Self> {
        let logs = cache_dir().join("logs");
        std::fs::create_dir_all(&logs)?;
        let log_path = logs.join(format!("{}-{}.log", options.name, std::process::id()));
        let mut log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        // The exact kernel heads the test's output and the console log, so a failure that
        // comes with a new Debian kernel says so.
        println!("{}: booting {}", options.name, kernel.identity());
        writeln!(log, "lastgasp-vm harness: booting {}", kernel.identity())?;
        // Under the temporary directory: a socket's path is limited to 108 bytes.
        static BOOTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let boot = BOOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let qmp_path =
            std::env::temp_dir().join(format!("lastgasp-qmp-{}-{boot}", std::process::id()));
        let mut child = command(kernel, initramfs, cmdline_extra, options)?
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp_path.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {QEMU}"))?;
        let started = Instant::now();
        let console = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        let mut stdout = child.stdout.take().context("qemu stdout")?;
        let stderr = child.stderr.take().context("qemu stderr")?;
        let sink = console.clone();
        std::thread::spawn(move || {
            let mut buffer = [0; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buffer) {
                let _ = log.write_all(&buffer[..n]);
                let (lock, changed) = &*sink;
                let mut console = lock.lock().unwrap();
                console.partial += &String::from_utf8_lossy(&buffer[..n]);
                while let Some((line, rest)) = console.partial.split_once('\n') {
                    let text = line.trim_end_matches('\r').to_owned();
                    let rest = rest.to_owned();
                    console.lines.push(ConsoleLine {
                        at: Instant::now(),
                        text,
                    });
                    console.partial = rest;
                }
                changed.notify_all();
            }
            let (lock, changed) = &*sink;
            lock.lock().unwrap().closed = true;
            changed.notify_all();
        });
        // qemu's own errors join the console, marked as such.
        let sink = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let (lock, changed) = &*sink;
                lock.lock().unwrap().lines.push(ConsoleLine {
                    at: Instant::now(),
                    text: format!("[qemu] {line}"),
                });
                changed.notify_all();
            }
        });
        Ok(Self {
            child,
            console,
            started,
            log_path,
            qmp_path,
        })
    }

    /// Boots as [`Vm::boot`] and waits until the guest's `/init` runs ([`INIT_READY`]). A guest
    /// whose kernel dies before that, when none of the caller's code has run yet, is booted
    /// again, at most [`BOOT_ATTEMPTS`] times in all, saying why. Seen: Debian's 6.12 kernel
    /// under TCG with two vCPUs, an `Oops: int3` in boot-time code patching, once in a few
    /// dozen boots.
    pub fn boot_to_init(
        kernel: &Kernel,
        initramfs: &Initramfs,
        cmdline_extra: &str,
        options: &VmOptions,
        timeout: Duration,
    ) -> anyhow::Result<(Self, ConsoleLine)> {
        let mut options = options.clone();
        let name = options.name.clone();
        for attempt in 1.. {
            let vm = Self::boot(kernel, initramfs, cmdline_extra, &options)?;
            match vm.wait_for_console(INIT_READY, timeout) {
                Ok(ready) => return Ok((vm, ready)),
                Err(error) if attempt < BOOT_ATTEMPTS && vm.exited() => {
                    let log = vm.console_log();
                    let why = log
                        .lines()
                        .find(|line| line.contains("Oops") || line.contains("Kernel panic"))
                        .unwrap_or("qemu exited");
                    eprintln!(
                        "{name}: the guest died before its init ran ({why}; {}), booting again",
                        vm.log_path.display()
                    );
                    options.name = format!("{name}-boot{}", attempt + 1);
                    drop(error);
                }
                Err(error) => return Err(error),
            }
        }
        unreachable!("the loop returns")
    }

    /// qemu has exited.
    pub fn exited(&self) -> bool {
        self.console.0.lock().unwrap().closed
    }

    /// Boots with the console on this terminal and waits for qemu to exit.
    pub fn run_interactive(
        kernel: &Kernel,
        initramfs: &Initramfs,
        cmdline_extra: &str,
        options: &VmOptions,
    ) -> anyhow::Result<ExitStatus> {
        command(kernel, initramfs, cmdline_extra, options)?
            .status()
            .with_context(|| format!("starting {QEMU}"))
    }

    /// The first console line containing `pattern`, waiting up to `timeout` for it. The error
    /// (timeout, or qemu gone) carries the whole console log.
    pub fn wait_for_console(
        &self,
        pattern: &str,
        timeout: Duration,
    ) -> anyhow::Result<ConsoleLine> {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.console;
        let mut console = lock.lock().unwrap();
        loop {
            if let Some(line) = console
                .lines
                .iter()
                .find(|line| line.text.contains(pattern))
            {
                return Ok(line.clone());
            }
            let now = Instant::now();
            let why = if console.closed {
                "qemu exited".to_owned()
            } else if now >= deadline {
                format!("timed out after {timeout:?}")
            } else {
                console = changed.wait_timeout(console, deadline - now).unwrap().0;
                continue;
            };
            anyhow::bail!(
                "the guest console never showed {pattern:?}: {why}. Console log ({}):\n{}\n{}",
                self.log_path.display(),
                console
                    .lines
                    .iter()
                    .map(|line| line.text.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
                console.partial
            );
        }
    }

    /// Everything the console showed so far.
    pub fn console_log(&self) -> String {
        let console = self.console.0.lock().unwrap();
        let mut log: String = console
            .lines
            .iter()
            .map(|line| line.text.clone() + "\n")
            .collect();
        log += &console.partial;
        log
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp_path);
    }
}

fn command(
    kernel: &Kernel,
    initramfs: &Initramfs,
    cmdline_extra: &str,
    options: &VmOptions,
) -> anyhow::Result<Command> {
    require_tool(QEMU)?;
    let mut qemu = Command::new(QEMU);
    qemu.args(["-accel", "tcg", "-nographic"])
        .args((!options.reboot).then_some("-no-reboot"))
        .args(["-m", &options.memory_mib.to_string()])
        .args(["-smp", &options.cpus.to_string()])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs.path)
        .args([
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0",
        ])
        .args([
            "-append",
            &format!("console=ttyS0 rdinit=/init panic=1 {cmdline_extra}"),
        ]);
    Ok(qemu)
}
