//! `cargo xtask vm fetch | boot | test`: the VM end-to-end harness of `tests/src/vm/`, whose
//! source is compiled into xtask too (it needs only std and anyhow).

use std::process::Command;

use anyhow::Context as _;
use clap::Subcommand;

// xtask uses the fetching and booting half; the rest (console waits, re-exports) is for the tests.
#[allow(dead_code, unused_imports)]
#[path = "../../tests/src/vm/mod.rs"]
mod harness;

use harness::{
    CRASH_MODULE_GUEST_PATH, CrashModule, HOST_TOOLS, Initramfs, Kernel, KernelVersion, Vm,
    VmOptions, find_program, guest, guest_tool, static_agent,
};

#[derive(Subcommand)]
pub enum VmTask {
    /// Install qemu, busybox-static and gcc-12 if missing, download the 5.10, 6.1 and 6.12
    /// kernels and their headers, and build the crash module for each (for 5.10 with its
    /// gcc-10, unpacked from bullseye's packages).
    Fetch,
    /// Boot a kernel to a shell on this terminal (network up; `poweroff -f` or Ctrl-A X quits).
    Boot {
        /// 5.10, 6.1 or 6.12.
        #[arg(long, default_value = "6.1")]
        kernel: KernelVersion,
        /// Also build the static `lastgasp` and put it at /bin/lastgasp in the guest, with the
        /// scenarios' tools (`tests/guest`): /bin/block-recv and /bin/recv-cost.
        #[arg(long)]
        agent: bool,
        /// ramoops on reserved RAM and a warm reboot on panic (`panic=1`, RAM kept): after
        /// `echo c > /proc/sysrq-trigger` the next boot's shell finds the record in /sys/fs/pstore.
        #[arg(long)]
        pstore: bool,
        /// Load the crash module: `echo null|bug|warn|hang > /proc/lastgasp_crash` crashes the
        /// kernel (with the sysctl of tests/tests/vm_crashes.rs that makes it a panic).
        #[arg(long)]
        crash_module: bool,
    },
    /// Fetch, then run the VM scenarios (tests/tests/vm_scenarios.rs, vm_pstore.rs, vm_hangs.rs,
    /// vm_crashes.rs and vm_terminations.rs).
    Test {
        /// Arguments for the test binary, e.g. a test name.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub fn main(task: VmTask) -> anyhow::Result<()> {
    match task {
        VmTask::Fetch => fetch(),
        VmTask::Boot {
            kernel,
            agent,
            pstore,
            crash_module,
        } => boot(kernel, agent, pstore, crash_module),
        VmTask::Test { args } => {
            fetch()?;
            // The controller in these tests talks to the real API server.
            crate::kube::ensure()?;
            crate::run(
                Command::new("cargo")
                    .args([
                        "test",
                        "--no-fail-fast",
                        "--package",
                        "lastgasp-tests",
                        "--features",
                        "vm,kube",
                        "--test",
                        "vm_scenarios",
                        "--test",
                        "vm_pstore",
                        "--test",
                        "vm_hangs",
                        "--test",
                        "vm_crashes",
                        "--test",
                        "vm_terminations",
                        "--",
                    ])
                    .args(args),
            )
        }
    }
}

/// Installs the host tools the harness needs and downloads the kernels (once; then cached).
pub fn fetch() -> anyhow::Result<()> {
    let missing: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(tool, _)| find_program(tool).is_none())
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        crate::run(Command::new("apt-get").arg("update")).context("apt-get update")?;
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing),
        )
        .with_context(|| format!("installing {}", missing.join(" ")))?;
    }
    for version in KernelVersion::ALL {
        let kernel = Kernel::fetch(version)?;
        println!("{}", kernel.fetched());
        println!(
            "{}: {}",
            kernel.release,
            CrashModule::build(&kernel)?.fetched()
        );
    }
    Ok(())
}

fn boot(
    version: KernelVersion,
    with_agent: bool,
    pstore: bool,
    crash_module: bool,
) -> anyhow::Result<()> {
    let mut extra = Vec::new();
    if with_agent {
        extra.push(("/bin/lastgasp", static_agent()?));
        for (guest, tool) in [
            ("/bin/block-recv", "block-recv"),
            ("/bin/recv-cost", "recv-cost"),
        ] {
            extra.push((guest, guest_tool(tool)?));
        }
    }
    let kernel = Kernel::fetch(version)?;
    let mut script = guest::NETWORK_UP.to_owned();
    if crash_module {
        extra.push((CRASH_MODULE_GUEST_PATH, CrashModule::build(&kernel)?.path));
        script += &format!("insmod {CRASH_MODULE_GUEST_PATH}\n");
    }
    if with_agent {
        script += "mkdir -p /sys/fs/bpf /run\nmount -t bpf bpf /sys/fs/bpf\n";
        script += "mount -t debugfs debugfs /sys/kernel/debug\n";
    }
    if pstore {
        script += guest::RAMOOPS;
    }
    script += &format!(
        "echo \"lastgasp-vm: shell on {}; 'poweroff -f' or Ctrl-A X quits\"\nsetsid cttyhack sh\n",
        kernel.package
    );
    let extra: Vec<_> = extra
        .iter()
        .map(|(guest, host)| (*guest, host.as_path()))
        .collect();
    let modules = if pstore { guest::RAMOOPS_MODULES } else { &[] };
    let initramfs = Initramfs::build_with_modules(&kernel, &script, &extra, modules)?;
    let options = VmOptions {
        name: format!("boot-{version}"),
        memory_mib: if with_agent || pstore { 1024 } else { 512 },
        reboot: pstore,
        ..VmOptions::default()
    };
    let cmdline = if pstore { guest::RAMOOPS_CMDLINE } else { "" };
    Vm::run_interactive(&kernel, &initramfs, cmdline, &options)?;
    Ok(())
}
