//! Project tasks: `cargo xtask setup | run | test | lint | kube | image | cluster | vm`.
//!
//! `setup` installs what building the eBPF programs needs (the nightly pinned in
//! `agent-ebpf/rust-toolchain.toml` with rust-src, bpf-linker 0.10.3) and, for the tests,
//! promtool, kubernetes-validate, the real kube-apiserver, etcd, kubelet, kube-scheduler and
//! kube-controller-manager (`cargo xtask kube`, built once into a cache outside `target/`), the
//! single-node cluster's Debian packages (containerd, runc, CNI plugins, podman, debootstrap)
//! and images (`cargo xtask image`, the pause image), and the VM harness's qemu,
//! busybox-static and kernels;
//! `run`, `test` and `lint` call it first, so a fresh machine needs nothing else.

mod cluster;
mod image;
mod kube;
#[path = "../../agent-ebpf/toolchain.rs"]
mod toolchain;
mod vm;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// bpf-linker 0.10.3 links with rustc's own LLVM; newer releases need a system LLVM.
const BPF_LINKER_VERSION: &str = "0.10.3";
/// Validates the rendered manifests offline; 1.37.0 ships the newest Kubernetes schemas.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// The features of the test tiers beyond plain `cargo test` (README, "Tests").
const ALL_TIERS: &str = "lastgasp/privileged,lastgasp-tests/privileged,lastgasp-tests/tools,lastgasp-tests/vm,lastgasp-tests/kube";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain pieces and the test tools that are missing.
    Setup,
    /// Build (release) and run `lastgasp` with the given arguments, e.g. `-- agent --standalone`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test, all tiers: what plain `cargo test` runs, the tests that need root on this
    /// kernel or other programs, and the VM scenarios. Every test binary runs even when one
    /// fails; the task fails at the end if any did.
    Test,
    /// `cargo fmt --check`, and clippy with `-D warnings` on the host crates and, with the pinned
    /// nightly, on the eBPF programs.
    Lint,
    /// Build kube-apiserver, kubelet, kube-scheduler, kube-controller-manager v1.20.2 and fetch
    /// etcd for the tests of `tests/src/kube/`, once:
    /// they are cached outside `target/` (`$XDG_CACHE_HOME/lastgasp/kubernetes-1.20.2/`, else
    /// `~/.cache/lastgasp/...`, or `$LASTGASP_KUBE_BIN_DIR`). Prints the binaries' paths.
    Kube,
    /// Build the container image from `Dockerfile` with podman and no registry (the binary
    /// cargo builds here, a debootstrap base cached outside `target/`); prints its size and
    /// writes an OCI archive.
    Image(image::ImageArgs),
    /// The single-node test cluster (kubelet, containerd, control plane as plain processes) in
    /// the background: `up` starts it and prints its KUBECONFIG, `down` stops it and restores
    /// the host.
    #[command(subcommand)]
    Cluster(cluster::ClusterTask),
    /// The VM end-to-end harness: Debian kernels under QEMU.
    #[command(subcommand)]
    Vm(vm::VmTask),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(true),
        Task::Run { args } => {
            setup(false)?;
            let mut cargo = Command::new("cargo");
            cargo.args(["run", "--release", "--package", "lastgasp", "--"]);
            cargo.args(args);
            run(&mut cargo)
        }
        Task::Test => {
            setup(true)?;
            vm::fetch()?;
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                bail!("the tests load eBPF programs into the kernel: run them as root");
            }
            run(Command::new("cargo").args(["test", "--no-fail-fast", "--features", ALL_TIERS]))
        }
        Task::Lint => {
            setup(false)?;
            run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
            // Every feature, so the targets of every test tier are linted too.
            run(Command::new("cargo").args([
                "clippy",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(Command::new("cargo").args([
                &format!("+{}", toolchain::ebpf_toolchain()),
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--package",
                "lastgasp-ebpf",
                "--",
                "-D",
                "warnings",
            ]))
        }
        Task::Kube => kube::main(),
        Task::Image(args) => image::main(args),
        Task::Cluster(task) => cluster::main(task),
        Task::Vm(task) => vm::main(task),
    }
}

fn setup(for_tests: bool) -> anyhow::Result<()> {
    let nightly = toolchain::ebpf_toolchain();
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", nightly, "--installed"],
    )
    .unwrap_or_default();
    if !["rust-src", "clippy"]
        .iter()
        .all(|component| installed.lines().any(|line| line.starts_with(component)))
    {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            nightly,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--component",
            "clippy",
        ]))
        .with_context(|| {
            format!("installing {nightly} with rust-src and clippy (eBPF builds need it)")
        })?;
    }
    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        run(Command::new("cargo").args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]))
        .context("installing bpf-linker")?;
    }
    if for_tests && output("kubernetes-validate", &["--version"]).is_none() {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
        ]))
        .context("installing kubernetes-validate (PyPI) for the manifest tests")?;
    }
    if for_tests {
        kube::ensure()
            .context("building the real API server for the tests (`cargo xtask kube`)")?;
        cluster::ensure().context(
            "preparing the single-node cluster's packages and images for the tests \
             (`cargo xtask cluster up` does the same)",
        )?;
    }
    if for_tests && output("promtool", &["--version"]).is_none() {
        run(Command::new("apt-get").arg("update")).context("apt-get update")?;
        run(Command::new("apt-get").args([
            "install",
            "-y",
            "--no-install-recommends",
            "prometheus",
        ]))
        .context("installing promtool (Debian package prometheus)")?;
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    })
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Installs with apt-get the Debian packages of the `(program, package)` pairs whose program is
/// not on `PATH`.
fn install_programs(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(program, _)| find_program(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    apt_install(&missing)
}

/// `apt-get install` of `packages` (none: nothing is run).
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    println!("installing {}", packages.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"])).context("apt-get update")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages))
    .with_context(|| format!("installing {}", packages.join(" ")))
}

fn find_program(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
