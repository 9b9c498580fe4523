//! The guest's root: busybox-static and its applets, the kernel's network and netconsole
//! modules, and an `/init` that mounts the usual filesystems, loads those modules, then runs
//! the caller's script.

use std::{
    collections::{BTreeSet, HashMap},
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

use super::{Kernel, cache_dir, cpio, output, require_tool};

/// Modules loaded by `/init`, in this order (dependencies first); built-in ones are skipped.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "configfs",
    "netconsole",
];

/// Modules of [`MODULES`] that older kernels do not have: virtio_pci's library parts, split
/// out of it in Linux 5.14 and 5.15 (Debian 11's 5.10 has them inside virtio_pci).
const NEWER_MODULES: &[&str] = &["virtio_pci_modern_dev", "virtio_pci_legacy_dev"];

const BUSYBOX: &str = "/bin/busybox";

/// What `/init` prints once it runs the caller's script.
pub const INIT_READY: &str = "lastgasp-vm: init ready";

const PRELUDE: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for module in /lib/modules/*.ko; do
    insmod "$module" || echo "lastgasp-vm: insmod $module failed"
done
mount -t configfs configfs /sys/kernel/config
mount -t tracefs tracefs /sys/kernel/tracing
ip link set lo up
echo "lastgasp-vm: init ready"
"#;

const EPILOGUE: &str = r#"
echo "lastgasp-vm: init script finished"
poweroff -f
"#;

/// A gzip'd newc cpio image in the cache, deleted on drop.
pub struct Initramfs {
    pub path: PathBuf,
}

impl Initramfs {
    /// `init_script` runs under busybox `sh` after the prelude (proc, sysfs, devtmpfs, tmpfs on
    /// /tmp, configfs, tracefs mounted; [`MODULES`] loaded); the guest powers off when it ends.
    /// `extra_files` are `(guest path, host path)` pairs, copied with their executable bit.
    pub fn build(
        kernel: &Kernel,
        init_script: &str,
        extra_files: &[(&str, &Path)],
    ) -> anyhow::Result<Self> {
        Self::build_with_modules(kernel, init_script, extra_files, &[])
    }

    /// [`Initramfs::build`], plus `extra_modules` (dependencies first) put at
    /// `/lib/modules/extra/<name>.ko` and not loaded: the script loads them, with its own
    /// parameters (busybox `insmod` does not read `/proc/cmdline`). A module built into the
    /// kernel is left out.
    pub fn build_with_modules(
        kernel: &Kernel,
        init_script: &str,
        extra_files: &[(&str, &Path)],
        extra_modules: &[&str],
    ) -> anyhow::Result<Self> {
        require_tool(BUSYBOX)?;
        require_tool("gzip")?;
        let mut archive = Tree::default();
        for dir in ["dev", "proc", "sys", "tmp", "etc", "root", "lib/modules"] {
            archive.dir(dir);
        }
        archive.add("dev/console", cpio::CHAR_DEVICE, &[], (5, 1));
        let busybox = std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?;
        archive.add("bin/busybox", cpio::EXECUTABLE, &busybox, (0, 0));
        let applets = output(Command::new(BUSYBOX).arg("--list-full"))?;
        for applet in String::from_utf8_lossy(&applets).lines() {
            if applet != "bin/busybox" {
                archive.add(applet, cpio::SYMLINK, b"/bin/busybox", (0, 0));
            }
        }
        let (modules, builtin) = kernel_modules(kernel)?;
        for (index, name) in MODULES.iter().enumerate() {
            match modules.get(*name) {
                Some(path) => {
                    let image = module_image(path)?;
                    let guest = format!("lib/modules/{index:02}-{name}.ko");
                    archive.add(&guest, cpio::FILE, &image, (0, 0));
                }
                None if builtin.contains(*name) || NEWER_MODULES.contains(name) => {}
                None => bail!(
                    "module {name} is neither in {} nor built in",
                    kernel.package
                ),
            }
        }
        for name in extra_modules {
            match modules.get(*name) {
                Some(path) => {
                    let image = module_image(path)?;
                    archive.add(
                        &format!("lib/modules/extra/{name}.ko"),
                        cpio::FILE,
                        &image,
                        (0, 0),
                    );
                }
                None if builtin.contains(*name) => {}
                None => bail!(
                    "module {name} is neither in {} nor built in",
                    kernel.package
                ),
            }
        }
        let init = format!("{PRELUDE}{init_script}\n{EPILOGUE}");
        archive.add("init", cpio::EXECUTABLE, init.as_bytes(), (0, 0));
        for (guest, host) in extra_files {
            let data =
                std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
            let executable = host.metadata()?.permissions().mode() & 0o111 != 0;
            let mode = if executable {
                cpio::EXECUTABLE
            } else {
                cpio::FILE
            };
            archive.add(guest, mode, &data, (0, 0));
        }

        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = cache_dir().join("initramfs");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!(
            "{}-{}.cpio.gz",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        gzip(&archive.archive.finish(), &path)?;
        Ok(Self { path })
    }
}

impl Drop for Initramfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An archive that creates each entry's parent directories first.
#[derive(Default)]
struct Tree {
    archive: cpio::Archive,
    dirs: BTreeSet<String>,
}

impl Tree {
    fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_owned());
        self.archive.entry(path, cpio::DIR, &[], (0, 0));
    }

    fn add(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let path = path.trim_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.archive.entry(path, mode, data, rdev);
    }
}

/// The kernel's loadable modules by name, and the names of its built-in ones.
fn kernel_modules(kernel: &Kernel) -> anyhow::Result<(HashMap<String, PathBuf>, BTreeSet<String>)> {
    let mut modules = HashMap::new();
    let mut pending = vec![kernel.modules_dir.join("kernel")];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = module_name(&path) {
                modules.insert(name, path);
            }
        }
    }
    let builtin_list = kernel.modules_dir.join("modules.builtin");
    let builtin = std::fs::read_to_string(&builtin_list)
        .with_context(|| format!("reading {}", builtin_list.display()))?
        .lines()
        .filter_map(|line| module_name(Path::new(line)))
        .collect();
    Ok((modules, builtin))
}

/// `net/foo-bar.ko.xz` is module `foo_bar`.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// The module's ELF image; busybox `insmod` cannot load compressed modules.
fn module_image(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        require_tool("xz")?;
        output(Command::new("xz").arg("-dc").arg(path))
    } else if name.ends_with(".zst") {
        require_tool("zstd")?;
        output(Command::new("zstd").arg("-dc").arg(path))
    } else {
        Ok(std::fs::read(path)?)
    }
}

fn gzip(data: &[u8], to: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let mut child = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("starting gzip")?;
    child.stdin.take().context("gzip stdin")?.write_all(data)?;
    if !child.wait()?.success() {
        bail!("gzip failed writing {}", to.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_announces_itself_with_the_marker_callers_wait_for() {
        assert!(PRELUDE.contains(&format!("echo \"{INIT_READY}\"")));
    }
}
