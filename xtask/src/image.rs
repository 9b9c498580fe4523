//! `cargo xtask image`: the repository's `Dockerfile` built with podman and no registry.
//!
//! - The base (`BASE_IMAGE`, `debian:bookworm-slim`) is a Debian bookworm made by
//!   `debootstrap --variant=minbase` from the mirror the machine's apt uses, cached as a tarball
//!   outside `target/` and imported under the Dockerfile's default base name, so the same
//!   Dockerfile builds here and, from the real image, where a registry is reachable. Only its
//!   `apt-get` reaches the network (the Debian mirror).
//! - The binary is the one cargo builds here (`BINARY=prebuilt`): this must be a bookworm
//!   (glibc 2.36) machine, as the image's libraries are bookworm's.
//! - The image is exported as an OCI archive, which `ctr images import` loads into containerd.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

/// The name the image is tagged with, which the test overlay (`deploy/overlays/test-cluster`)
/// names too.
pub const IMAGE: &str = "localhost/lastgasp:dev";
/// The Dockerfile's default `BASE_IMAGE`, as podman spells it in full.
const BASE_IMAGE: &str = "docker.io/library/debian:bookworm-slim";
/// Programs used here, with their Debian packages. podman's default runtime (crun) refuses
/// hosts with hybrid cgroups; runc runs there.
const TOOLS: &[(&str, &str)] = &[
    ("podman", "podman"),
    ("runc", "runc"),
    ("debootstrap", "debootstrap"),
];

#[derive(clap::Args)]
pub struct ImageArgs {
    /// Where the OCI archive is written.
    #[arg(long, default_value = "target/image/lastgasp.oci.tar")]
    output: PathBuf,
}

pub fn main(args: ImageArgs) -> anyhow::Result<()> {
    let workspace = workspace_root()?;
    let output = workspace.join(&args.output);
    build(&workspace, &output)?;
    Ok(())
}

/// Builds the image tagged [`IMAGE`] and writes its OCI archive to `output`.
pub fn build(workspace: &Path, output: &Path) -> anyhow::Result<()> {
    crate::install_programs(TOOLS)?;
    let started = Instant::now();
    base_image()?;
    crate::run(
        Command::new("cargo")
            .args(["build", "--release", "--locked", "--package", "lastgasp"])
            .current_dir(workspace),
    )
    .context("building the lastgasp binary")?;
    let build_started = Instant::now();
    crate::run(
        podman()
            // The host's network for apt-get: no CNI bridge, netns or firewall rules of podman's.
            .args(["build", "--pull=never", "--network", "host"])
            .args(["--build-arg", "BINARY=prebuilt"])
            .args(["--tag", IMAGE, "--file", "Dockerfile", "."])
            .current_dir(workspace),
    )
    .context("podman build")?;
    let build_time = build_started.elapsed();
    let size = crate::output(
        "podman",
        &["image", "inspect", "--format", "{{.Size}}", IMAGE],
    )
    .context("podman image inspect")?;
    let size: u64 = size.trim().parse().context("podman's image size")?;
    if let Some(dir) = output.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = fs::remove_file(output);
    crate::run(
        podman()
            .args(["save", "--format", "oci-archive", "--output"])
            .arg(output)
            .arg(IMAGE),
    )
    .context("podman save")?;
    println!(
        "image: {IMAGE}, {:.1} MB ({:.1} MB the binary); podman build {:.0?}, {:.0?} in all; \
         OCI archive {}",
        size as f64 / 1e6,
        fs::metadata(workspace.join("target/release/lastgasp"))?.len() as f64 / 1e6,
        build_time,
        started.elapsed(),
        output.display()
    );
    Ok(())
}

/// podman with runc as its runtime (crun fails on hybrid cgroup hosts).
fn podman() -> Command {
    let mut podman = Command::new("podman");
    podman.args(["--runtime", "runc"]);
    podman
}

/// Imports the cached debootstrap tarball as [`BASE_IMAGE`] unless podman has that image;
/// makes the tarball first if it is not cached.
fn base_image() -> anyhow::Result<()> {
    if podman()
        .args(["image", "exists", BASE_IMAGE])
        .status()
        .is_ok_and(|status| status.success())
    {
        return Ok(());
    }
    let cache = crate::kube::bin_dir::cache_root()
        .context("no cache directory: set $HOME or $XDG_CACHE_HOME")?
        .join("debian-bookworm-minbase.tar");
    if !cache.is_file() {
        debootstrap(&cache)?;
    }
    crate::run(
        podman()
            .args(["import", "--change", "CMD [\"/bin/bash\"]"])
            .arg(&cache)
            .arg(BASE_IMAGE),
    )
    .context("podman import of the debootstrap base")
}

/// `debootstrap --variant=minbase bookworm` into a directory beside `tarball`, without apt's
/// downloaded packages and lists, packed into `tarball`.
fn debootstrap(tarball: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = tarball.with_extension("rootfs");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::create_dir_all(root.parent().context("no parent")?)?;
    let mirror = crate::kube::debian_mirror()?;
    println!("image: debootstrap bookworm from {mirror} (once)");
    crate::run(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&root)
            .arg(&mirror),
    )
    .context("debootstrap")?;
    // apt's package caches, lists and downloaded .debs: a Dockerfile runs apt-get update.
    for dir in [
        "var/cache/apt",
        "var/cache/apt/archives",
        "var/lib/apt/lists",
    ] {
        for entry in fs::read_dir(root.join(dir))? {
            let path = entry?.path();
            if path.is_file() {
                fs::remove_file(&path)?;
            }
        }
    }
    let partial = tarball.with_extension("partial");
    crate::run(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["--numeric-owner", "-cf"])
            .arg(&partial)
            .arg("."),
    )
    .context("packing the debootstrap tree")?;
    fs::rename(&partial, tarball)?;
    fs::remove_dir_all(&root)?;
    println!(
        "image: base made in {:.0?}, {:.0} MB, cached in {}",
        started.elapsed(),
        fs::metadata(tarball)?.len() as f64 / 1e6,
        tarball.display()
    );
    Ok(())
}

/// The workspace root: the parent of xtask's own manifest directory.
pub fn workspace_root() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    if !root.join("Dockerfile").is_file() {
        bail!("{} has no Dockerfile", root.display());
    }
    Ok(root.to_owned())
}

/// The sandbox ("pause") image of the test cluster's containerd, tagged [`PAUSE_IMAGE`], `FROM
/// scratch` with static C programs: `/pause` sleeps in `pause()`, reaps children and exits on
/// SIGINT or SIGTERM (`/pause ignore-term`: not on SIGTERM, as a container that does not stop
/// within its grace period); for the tests' containers, `/netlink-recv` blocks a thread in
/// NETLINK_ROUTE `recvfrom` (nothing is ever sent to its socket) until SIGTERM, and
/// `/memhog` touches memory until the OOM killer stops it (`/memhog child`: a child does, while
/// the first process waits). Its OCI archive is cached beside the Kubernetes binaries.
pub fn pause_image() -> anyhow::Result<PathBuf> {
    let archive = crate::kube::bin_dir::cache_root()
        .context("no cache directory: set $HOME or $XDG_CACHE_HOME")?
        .join(crate::kube::bin_dir::PAUSE_ARCHIVE);
    if archive.is_file() {
        return Ok(archive);
    }
    crate::install_programs(&[("gcc", "gcc")])?;
    if !Path::new("/usr/include/signal.h").is_file() {
        crate::apt_install(&["libc6-dev"])?;
    }
    crate::install_programs(TOOLS)?;
    let dir = archive.with_extension("build");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY pause netlink-recv memhog /\nENTRYPOINT [\"/pause\"]\n",
    )?;
    for (program, source) in [
        ("pause", PAUSE_C),
        ("netlink-recv", NETLINK_RECV_C),
        ("memhog", MEMHOG_C),
    ] {
        let file = format!("{program}.c");
        fs::write(dir.join(&file), source)?;
        crate::run(
            Command::new("gcc")
                .args(["-static", "-O2", "-o", program, &file])
                .current_dir(&dir),
        )
        .with_context(|| format!("compiling {program}"))?;
    }
    crate::run(
        podman()
            .args(["build", "--pull=never", "--tag", PAUSE_IMAGE, "."])
            .current_dir(&dir),
    )
    .context("podman build of the pause image")?;
    let partial = archive.with_extension("partial");
    let _ = fs::remove_file(&partial);
    crate::run(
        podman()
            .args(["save", "--format", "oci-archive", "--output"])
            .arg(&partial)
            .arg(PAUSE_IMAGE),
    )
    .context("podman save of the pause image")?;
    fs::rename(&partial, &archive)?;
    fs::remove_dir_all(&dir)?;
    Ok(archive)
}

use crate::kube::bin_dir::PAUSE_IMAGE;

const PAUSE_C: &str = r#"#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv) {
    int ignore_term = argc > 1 && strcmp(argv[1], "ignore-term") == 0;
    signal(SIGINT, stop);
    signal(SIGTERM, ignore_term ? SIG_IGN : stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"#;

const NETLINK_RECV_C: &str = r#"#include <linux/netlink.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    int fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    struct sockaddr_nl local = {.nl_family = AF_NETLINK};
    if (fd < 0 || bind(fd, (struct sockaddr *)&local, sizeof local) < 0) return 1;
    char buf[4096];
    for (;;) recvfrom(fd, buf, sizeof buf, 0, NULL, NULL);
}
"#;

const MEMHOG_C: &str = r#"#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static void hog(void) {
    for (;;) {
        char *mib = malloc(1 << 20);
        if (mib) memset(mib, 1, 1 << 20);
    }
}

int main(int argc, char **argv) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    if (argc > 1 && strcmp(argv[1], "child") == 0) {
        signal(SIGCHLD, reap);
        if (fork() == 0) hog();
        for (;;) pause();
    }
    hog();
}
"#;
