//! Debian cloud kernels fetched with `apt-get download` and unpacked with `dpkg -x`, once.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{cache_dir, output, require_tool};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelVersion {
    /// Debian 11's 5.10 from bullseye and bullseye-security (`linux-image-5.10.0-<abi>-cloud-amd64`,
    /// the signed image: the `-unsigned` one is not on the mirrors), through the harness's own
    /// apt configuration (see [`apt`]).
    Debian510,
    /// bookworm's 6.1 (`linux-image-6.1.0-<abi>-cloud-amd64-unsigned`).
    Debian61,
    /// bookworm-security's 6.12 (`linux-image-6.12.<n>+deb12-cloud-amd64-unsigned`).
    Debian612,
}

impl KernelVersion {
    pub const ALL: [Self; 3] = [Self::Debian510, Self::Debian61, Self::Debian612];

    /// Package names look like `<prefix><number><suffix>`; the newest has the largest number.
    fn package_pattern(self) -> (&'static str, &'static str) {
        match self {
            Self::Debian510 => ("linux-image-5.10.0-", "-cloud-amd64"),
            Self::Debian61 => ("linux-image-6.1.0-", "-cloud-amd64-unsigned"),
            Self::Debian612 => ("linux-image-6.12.", "+deb12-cloud-amd64-unsigned"),
        }
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Debian510 => "5.10",
            Self::Debian61 => "6.1",
            Self::Debian612 => "6.12",
        })
    }
}

impl std::str::FromStr for KernelVersion {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|version| version.to_string() == s)
            .with_context(|| format!("unknown kernel {s:?}: use 5.10, 6.1 or 6.12"))
    }
}

/// What a fetch that was not a cache hit downloaded.
#[derive(Clone, Debug)]
pub struct Download {
    pub bytes: u64,
    pub took: Duration,
}

#[derive(Clone, Debug)]
pub struct Kernel {
    pub version: KernelVersion,
    pub package: String,
    /// The package's Debian version, e.g. `6.1.192-3`, recorded when it was downloaded.
    pub package_version: String,
    /// `uname -r` of the kernel, the directory name under `lib/modules`.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
    /// `None` when the kernel was already unpacked in the cache.
    pub downloaded: Option<Download>,
}

impl Kernel {
    /// The exact kernel, for logs: `<package> <version> (<release>)`. Debian replaces its
    /// kernels every few weeks, so every test that boots one prints this.
    pub fn identity(&self) -> String {
        format!(
            "{} {} ({})",
            self.package, self.package_version, self.release
        )
    }

    /// What [`Kernel::fetch`] did, for a log line: `<identity>: downloaded 25.5 MiB in 1.2s`,
    /// or `<identity>: cached`.
    pub fn fetched(&self) -> String {
        match &self.downloaded {
            Some(download) => format!(
                "{}: downloaded {:.1} MiB in {:.1?}",
                self.identity(),
                download.bytes as f64 / (1024.0 * 1024.0),
                download.took
            ),
            None => format!("{}: cached", self.identity()),
        }
    }

    /// The newest package of `version` that apt knows, downloaded and unpacked into the cache
    /// unless it is there already. Without apt lists, the newest one already cached is used.
    pub fn fetch(version: KernelVersion) -> anyhow::Result<Self> {
        let root = cache_dir().join("kernels");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let cached = newest(version, cached_packages(&root)?);
        let package = match newest(version, apt_packages(version)?) {
            Some(package) => package,
            None => cached.with_context(|| {
                format!(
                    "apt knows no {} package and none is cached in {}: run `apt-get update`",
                    version.package_pattern().0,
                    root.display()
                )
            })?,
        };
        let unpacked = root.join(&package);
        let downloaded = if unpacked.is_dir() {
            None
        } else {
            Some(download_and_unpack(version, &package, &root, &unpacked)?)
        };
        let package_version = std::fs::read_to_string(version_file(&root, &package))
            .map(|version| version.trim().to_owned())
            .unwrap_or_else(|_| "(version not recorded)".to_owned());
        let modules = unpacked.join("lib/modules");
        let release = std::fs::read_dir(&modules)
            .with_context(|| format!("reading {}", modules.display()))?
            .next()
            .context("no kernel in lib/modules")??
            .file_name()
            .to_string_lossy()
            .into_owned();
        Ok(Self {
            version,
            vmlinuz: unpacked.join(format!("boot/vmlinuz-{release}")),
            modules_dir: modules.join(&release),
            release,
            package,
            package_version,
            downloaded,
        })
    }
}

/// Where the Debian version of a downloaded package is kept, beside its unpacked tree.
fn version_file(root: &Path, package: &str) -> PathBuf {
    root.join(format!("{package}.version"))
}

/// The package with the largest number in its name among those matching `version`.
fn newest(version: KernelVersion, names: Vec<String>) -> Option<String> {
    let (prefix, suffix) = version.package_pattern();
    names
        .into_iter()
        .filter_map(|name| {
            let number: u32 = name
                .strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse()
                .ok()?;
            Some((number, name))
        })
        .max()
        .map(|(_, name)| name)
}

/// Suites the host's apt sources do not have, configured for the harness alone: a sources
/// list, package lists and cache under the VM cache, refreshed at most daily. The host's
/// own apt configuration is left alone.
const OWN_APT: &[(KernelVersion, &str)] = &[(
    KernelVersion::Debian510,
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
     http://deb.debian.org/debian bullseye main\n\
     deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
     http://deb.debian.org/debian-security bullseye-security main\n",
)];

/// `program` (`apt-get` or `apt-cache`) reading the package lists `version` comes from.
pub(super) fn apt(version: KernelVersion, program: &str) -> anyhow::Result<Command> {
    require_tool("apt-get")?;
    let mut command = Command::new(program);
    let Some((_, sources)) = OWN_APT.iter().find(|(own, _)| *own == version) else {
        return Ok(command);
    };
    let dir = cache_dir().join(format!("apt-{version}"));
    for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let list = dir.join("sources.list");
    std::fs::write(&list, sources)?;
    let options = [
        format!("Dir::Etc::SourceList={}", list.display()),
        format!(
            "Dir::Etc::SourceParts={}",
            dir.join("sources.list.d").display()
        ),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
        format!("Dir::Cache={}", dir.join("cache").display()),
    ];
    let with_options = |command: &mut Command| {
        for option in &options {
            command.arg("-o").arg(option);
        }
    };
    let stamp = dir.join("updated");
    let fresh = std::fs::metadata(&stamp)
        .and_then(|meta| meta.modified())
        .is_ok_and(|at| {
            at.elapsed()
                .is_ok_and(|age| age < Duration::from_secs(24 * 3600))
        });
    if !fresh {
        let mut update = Command::new("apt-get");
        with_options(&mut update);
        match output(update.args(["-q", "update"])) {
            Ok(_) => std::fs::write(&stamp, b"")?,
            // Stale lists still name packages; without any, the fetch says what is missing.
            Err(error) => eprintln!("apt-get update for {version}: {error:#}"),
        }
    }
    with_options(&mut command);
    Ok(command)
}

fn apt_packages(version: KernelVersion) -> anyhow::Result<Vec<String>> {
    let (prefix, suffix) = version.package_pattern();
    let regex = format!(
        "^{}[0-9]+{}$",
        prefix.replace('.', "\\."),
        suffix.replace('+', "\\+")
    );
    let out = output(apt(version, "apt-cache")?.args(["search", "--names-only", &regex]))?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect())
}

fn cached_packages(root: &Path) -> anyhow::Result<Vec<String>> {
    Ok(std::fs::read_dir(root)?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().is_dir())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect())
}

/// Downloads into a private directory and unpacks next to `unpacked`, then renames, so
/// concurrent fetches of the same kernel cannot see half a kernel.
fn download_and_unpack(
    version: KernelVersion,
    package: &str,
    root: &Path,
    unpacked: &Path,
) -> anyhow::Result<Download> {
    require_tool("dpkg")?;
    let work = root.join(format!(".work-{}-{package}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let started = Instant::now();
    output(
        apt(version, "apt-get")?
            .args(["download", package])
            .current_dir(&work),
    )
    .with_context(|| format!("downloading {package}"))?;
    let took = started.elapsed();
    let deb = std::fs::read_dir(&work)?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let bytes = deb.metadata()?.len();
    let version = output(
        Command::new("dpkg-deb")
            .arg("--field")
            .arg(&deb)
            .arg("Version"),
    )
    .with_context(|| format!("reading the version of {}", deb.display()))?;
    std::fs::write(
        version_file(root, package),
        String::from_utf8_lossy(&version).trim(),
    )?;
    let tree = work.join("tree");
    output(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    if let Err(error) = std::fs::rename(&tree, unpacked)
        && !unpacked.is_dir()
    {
        bail!(
            "moving {} to {}: {error}",
            tree.display(),
            unpacked.display()
        );
    }
    std::fs::remove_dir_all(&work)?;
    Ok(Download { bytes, took })
}
