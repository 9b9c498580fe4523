//! `cargo xtask cluster up|down`: the single-node test cluster (`tests/src/kube/node.rs`) in
//! the background, for trying lastgasp by hand.
//!
//! `up` builds what it needs once (the Kubernetes binaries of `cargo xtask kube`, the pause
//! image, the lastgasp image of `cargo xtask image`), installs containerd, runc and the CNI
//! plugins from Debian if missing, starts `lastgasp-cluster` in its own session and returns
//! once the Node is Ready. `down` stops it; it restores the host as it found it.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Where the running cluster's pid, log and kubeconfig are.
const STATE_DIR: &str = "/run/lastgasp-cluster";
/// The programs the cluster runs, with their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("ip", "iproute2"),
];

#[derive(clap::Subcommand)]
pub enum ClusterTask {
    /// Start the cluster in the background; prints its KUBECONFIG.
    Up,
    /// Stop it and restore the host.
    Down,
}

pub fn main(task: ClusterTask) -> anyhow::Result<()> {
    match task {
        ClusterTask::Up => up(),
        ClusterTask::Down => down(),
    }
}

/// What the cluster and the tests that start one need: binaries, tools and images.
pub fn ensure() -> anyhow::Result<Vec<PathBuf>> {
    crate::kube::ensure()?;
    install()?;
    let workspace = crate::image::workspace_root()?;
    let image = workspace.join("target/image/lastgasp.oci.tar");
    crate::image::build(&workspace, &image)?;
    Ok(vec![crate::image::pause_image()?, image])
}

/// containerd, runc, `ip` and the CNI plugins, from Debian.
fn install() -> anyhow::Result<()> {
    crate::install_programs(TOOLS)?;
    if !Path::new("/usr/lib/cni/bridge").is_file() {
        crate::apt_install(&["containernetworking-plugins"])?;
    }
    Ok(())
}

fn up() -> anyhow::Result<()> {
    let state = Path::new(STATE_DIR);
    if let Some(pid) = running_pid()? {
        bail!("a cluster runs already (pid {pid}); `cargo xtask cluster down` stops it");
    }
    let images = ensure()?;
    let workspace = crate::image::workspace_root()?;
    crate::run(
        Command::new("cargo")
            .args([
                "build",
                "--package",
                "lastgasp-tests",
                "--bin",
                "lastgasp-cluster",
            ])
            .current_dir(&workspace),
    )?;
    fs::create_dir_all(state).with_context(|| format!("creating {STATE_DIR}"))?;
    let _ = fs::remove_file(state.join("ready"));
    let log = fs::File::create(state.join("cluster.log"))?;
    let mut command = Command::new(workspace.join("target/debug/lastgasp-cluster"));
    command.arg("--state-dir").arg(state);
    for image in &images {
        command.arg("--image").arg(image);
    }
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let mut child = command.spawn().context("starting lastgasp-cluster")?;
    fs::write(state.join("pid"), child.id().to_string())?;
    let started = Instant::now();
    while !state.join("ready").exists() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "lastgasp-cluster exited ({status}); its log:\n{}",
                fs::read_to_string(state.join("cluster.log")).unwrap_or_default()
            );
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the cluster is not ready after 5 minutes; see {STATE_DIR}/cluster.log");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "cluster: ready in {:.0?}\nexport KUBECONFIG={STATE_DIR}/admin.kubeconfig\n\
         (log: {STATE_DIR}/cluster.log; stop with `cargo xtask cluster down`)",
        started.elapsed()
    );
    Ok(())
}

fn down() -> anyhow::Result<()> {
    let Some(pid) = running_pid()? else {
        println!("cluster: none running");
        return Ok(());
    };
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("lastgasp-cluster (pid {pid}) still runs after 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    print!(
        "{}",
        fs::read_to_string(Path::new(STATE_DIR).join("cluster.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("left host state") || line.starts_with("  "))
            .map(|line| format!("{line}\n"))
            .collect::<String>()
    );
    fs::remove_dir_all(STATE_DIR).with_context(|| format!("removing {STATE_DIR}"))?;
    println!("cluster: stopped in {:.0?}", started.elapsed());
    Ok(())
}

/// The pid in the state directory, if that process still runs `lastgasp-cluster`.
fn running_pid() -> anyhow::Result<Option<libc::pid_t>> {
    let Ok(pid) = fs::read_to_string(PathBuf::from(STATE_DIR).join("pid")) else {
        return Ok(None);
    };
    let pid: libc::pid_t = pid.trim().parse().context("the pid file")?;
    let running = fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("lastgasp-cluster"));
    Ok(running.then_some(pid))
}
