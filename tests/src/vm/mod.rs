//! VM end-to-end harness: a Debian cloud kernel booted under QEMU (TCG) with a busybox
//! initramfs, its serial console captured so a test can wait for lines on it.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lastgasp_tests::vm::{Initramfs, Kernel, KernelVersion, Vm, VmOptions};
//! let kernel = Kernel::fetch(KernelVersion::Debian61)?;
//! let initramfs = Initramfs::build(&kernel, "echo hello from the guest", &[])?;
//! let vm = Vm::boot(&kernel, &initramfs, "", &VmOptions::default())?;
//! vm.wait_for_console("hello from the guest", std::time::Duration::from_secs(60))?;
//! # Ok(())
//! # }
//! ```
//!
//! Only std and anyhow are used here, so `xtask` compiles this module too (`#[path]`).
//! Host tools come from Debian packages: `apt-get` and `dpkg` fetch kernels,
//! `qemu-system-x86_64` (qemu-system-x86) runs them, `/bin/busybox` (busybox-static) is the
//! guest's userland, `gzip` and `xz` pack and unpack, `make` and `gcc-12` build the crash
//! module against Debian's headers. `cargo xtask vm fetch` installs them.

mod agent;
mod cpio;
mod initramfs;
mod kernel;
mod module;
mod qemu;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub use agent::{guest_tool, static_agent};
pub use initramfs::{INIT_READY, Initramfs, MODULES};
pub use kernel::{Download, Kernel, KernelVersion};
pub use module::{CRASH_MODULE_GUEST_PATH, CrashModule};
pub use qemu::{BOOT_ATTEMPTS, ConsoleLine, Vm, VmOptions};

/// Where kernels, initramfs images and console logs go: `$LASTGASP_VM_CACHE`, else
/// `target/vm-cache` in the workspace.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("LASTGASP_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/vm-cache")
                .components()
                .collect()
        })
}

/// Host programs the harness runs, with the Debian package that provides each.
pub const HOST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    ("apt-get", "apt"),
    ("dpkg", "dpkg"),
    ("gzip", "gzip"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    // Build the crash module against a kernel's headers, with the compiler the kernel was built
    // with: both Debian kernels name gcc-12, 6.12 by its target-prefixed name.
    ("make", "make"),
    ("gcc-12", "gcc-12"),
    ("x86_64-linux-gnu-gcc-12", "gcc-12"),
    // The system CA roots, copied into guests whose agent uses kube's TLS client.
    ("/etc/ssl/certs/ca-certificates.crt", "ca-certificates"),
];

/// Fails with the package to install when `program` is not on this host.
pub fn require_tool(program: &str) -> anyhow::Result<()> {
    let package = HOST_TOOLS
        .iter()
        .find(|(tool, _)| *tool == program)
        .map_or(program, |(_, package)| package);
    if find_program(program).is_none() {
        anyhow::bail!(
            "`{program}` is missing on this host: install it with `apt-get install {package}` \
             (or run `cargo xtask vm fetch`)"
        );
    }
    Ok(())
}

/// `program` itself if it is a path, else its location on `$PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| program.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// Runs `command` and returns its stdout, or an error with its stderr.
fn output(command: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = command
        .output()
        .map_err(|error| anyhow::anyhow!("starting {command:?}: {error}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Shell snippets for init scripts of guests on qemu's user-mode network.
pub mod guest {
    /// The guest's address.
    pub const ADDRESS: &str = "10.0.2.15";
    /// The host's 127.0.0.1 as the guest reaches it.
    pub const HOST: &str = "10.0.2.2";
    /// The MAC of qemu's (slirp's) gateway, which owns [`HOST`].
    pub const GATEWAY_MAC: &str = "52:55:0a:00:02:02";

    /// Brings eth0 (the virtio-net card) up as [`ADDRESS`]/24.
    pub const NETWORK_UP: &str = "ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
";

    /// Shell functions to run the agent (`/bin/lastgasp`, see [`super::static_agent`]) in the
    /// guest, after mounting bpffs and debugfs:
    /// - `run_agent NAME FLAG...` starts `lastgasp agent --standalone --metrics-addr
    ///   127.0.0.1:9465 FLAG...` with its output on the console and in `/tmp/NAME.log`, which
    ///   ends with `lastgasp-vm: NAME exited (STATUS)` (`export AGENT_MODE=` first runs it in
    ///   cluster mode instead of `--standalone`, with the cluster in `$KUBECONFIG`);
    /// - `await_log REGEX` waits until that log matches (extended regex); after two minutes it
    ///   prints `lastgasp-vm: NAME never logged REGEX` and powers off;
    /// - `stop_agent SIGNAL` signals the agent and waits for it to exit;
    /// - `show_metric NAME` waits until the agent serves metrics, then prints its metric lines
    ///   that start with NAME, each as `lastgasp-vm: metric <line>`.
    pub const AGENT: &str = r#"mkdir -p /sys/fs/bpf /run
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug
cat > /tmp/run-agent <<'EOF'
#!/bin/sh
name=$1
shift
NO_COLOR=1 /bin/lastgasp agent ${AGENT_MODE---standalone} --metrics-addr 127.0.0.1:9465 "$@" &
echo $! > /tmp/$name.pid
wait $!
echo "lastgasp-vm: $name exited ($?)"
EOF
chmod +x /tmp/run-agent
run_agent() {
    agent_name=$1
    rm -f /tmp/$agent_name.pid
    # The log exists before anything waits on it; tee appends, so it never truncates lines
    # a wait has already seen.
    : > /tmp/$agent_name.log
    /tmp/run-agent "$@" 2>&1 | tee -a /tmp/$agent_name.log &
    until [ -s /tmp/$agent_name.pid ]; do sleep 0.1; done
    agent_pid=$(cat /tmp/$agent_name.pid)
}
await_log() {
    tries=0
    until grep -qE "$1" /tmp/$agent_name.log; do
        tries=$((tries + 1))
        if [ $tries -gt 1200 ]; then
            echo "lastgasp-vm: $agent_name never logged $1"
            poweroff -f
        fi
        sleep 0.1
    done
}
stop_agent() {
    kill -$1 $agent_pid
    await_log "lastgasp-vm: $agent_name exited"
}
show_metric() {
    await_log 'serving metrics'
    wget -qO- http://127.0.0.1:9465/metrics | grep "^$1" | sed 's/^/lastgasp-vm: metric /'
}
"#;

    /// Kernel command line for ramoops: 1 MiB at 496 MiB reserved from the kernel's use, so
    /// a warm reboot (qemu's reset keeps RAM) finds there what the panicking kernel wrote.
    pub const RAMOOPS_CMDLINE: &str = "memmap=1M$0x1f000000";

    /// Modules for [`RAMOOPS`], dependencies first: put them in with
    /// `Initramfs::build_with_modules`.
    pub const RAMOOPS_MODULES: &[&str] = &["reed_solomon", "ramoops"];

    /// Loads ramoops on the reserved memory (a module on Debian's kernels: pstore itself is
    /// built in). It registers as pstore's backend and, on the boot after a panic, shows the
    /// panic's record in pstorefs.
    pub const RAMOOPS: &str = "insmod /lib/modules/extra/reed_solomon.ko
insmod /lib/modules/extra/ramoops.ko mem_address=0x1f000000 mem_size=0x100000 || echo 'lastgasp-vm: insmod ramoops failed'
";
}
