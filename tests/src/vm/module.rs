//! The crash module (`tests/guest/module/lastgasp_crash.c`), built against the Debian headers
//! of the kernel it runs on. Debian's kernels have no LKDTM, but they load unsigned modules.
//!
//! `linux-headers-<release>`, the `-common` and `linux-kbuild-` packages it depends on are
//! fetched with `apt-get download` and unpacked with `dpkg -x` into the cache, once per
//! release; the module is built there with the compiler the kernel was built with, and rebuilt
//! only when its source changes.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Kernel, KernelVersion, cache_dir, find_program, kernel::apt, output, require_tool};

/// The module's source files, compiled in so xtask and the tests build the same module.
const SOURCES: &[(&str, &str)] = &[
    (
        "lastgasp_crash.c",
        include_str!("../../guest/module/lastgasp_crash.c"),
    ),
    ("Kbuild", include_str!("../../guest/module/Kbuild")),
];

/// Beside the built module: what it was built from and how, to rebuild when either changes.
const STAMP: &str = "built-from";

/// The make variables [`build_module`] sets, besides `M=`.
fn make_variables(work: &Path) -> [String; 2] {
    [
        // No BTF for the module: it would need pahole, and nothing here reads it.
        "CONFIG_DEBUG_INFO_BTF_MODULES=".to_owned(),
        // `kernel BUG at lastgasp_crash.c:<line>!`, not at this host's build directory.
        format!("KCFLAGS=-fmacro-prefix-map={}/=", work.display()),
    ]
}

fn stamp() -> String {
    let mut stamp = format!("{:?}\n", make_variables(Path::new("<build dir>")));
    for (name, text) in SOURCES {
        stamp += &format!("--- {name}\n{text}");
    }
    stamp
}

/// Where the module goes in the guest (`insmod` it from the init script).
pub const CRASH_MODULE_GUEST_PATH: &str = "/lib/modules/extra/lastgasp_crash.ko";

#[derive(Clone, Debug)]
pub struct CrashModule {
    /// The built `lastgasp_crash.ko`.
    pub path: PathBuf,
    /// `<package> <version>` of each Debian package it was built against.
    pub packages: Vec<String>,
    /// How long fetching and unpacking the headers took, when they were not cached.
    pub headers_fetched_in: Option<Duration>,
    /// How long building the module took, when it was not cached.
    pub built_in: Option<Duration>,
}

impl CrashModule {
    /// The module for `kernel`, from the cache or fetched and built now.
    pub fn build(kernel: &Kernel) -> anyhow::Result<Self> {
        let root = cache_dir().join("headers");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let tree = root.join(&kernel.release);
        let headers_fetched_in = if tree.is_dir() {
            None
        } else {
            let started = Instant::now();
            fetch_headers(kernel.version, &kernel.release, &root, &tree)?;
            Some(started.elapsed())
        };
        let packages = std::fs::read_to_string(packages_file(&tree))?
            .lines()
            .map(str::to_owned)
            .collect();

        let dir = cache_dir().join("modules").join(&kernel.release);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("lastgasp_crash.ko");
        let up_to_date = path.is_file()
            && std::fs::read_to_string(dir.join(STAMP)).is_ok_and(|built| built == stamp());
        let built_in = if up_to_date {
            None
        } else {
            let started = Instant::now();
            build_module(kernel.version, &kernel.release, &tree, &dir)?;
            Some(started.elapsed())
        };
        Ok(Self {
            path,
            packages,
            headers_fetched_in,
            built_in,
        })
    }

    /// For a log line: the packages, and what was fetched and built or was cached.
    pub fn fetched(&self) -> String {
        let headers = match self.headers_fetched_in {
            Some(took) => format!("headers fetched in {took:.1?}"),
            None => "headers cached".to_owned(),
        };
        let module = match self.built_in {
            Some(took) => format!("module built in {took:.1?}"),
            None => "module cached".to_owned(),
        };
        format!(
            "lastgasp_crash.ko against {}: {headers}, {module}",
            self.packages.join(", ")
        )
    }
}

fn packages_file(tree: &Path) -> PathBuf {
    tree.join("packages")
}

/// A fresh private directory under `parent`, so concurrent fetches and builds never share one.
fn work_dir(parent: &Path, what: &str) -> anyhow::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let work = parent.join(format!(
        ".work-{}-{}-{what}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    Ok(work)
}

/// The packages to build modules for `release`: its headers, and the `-common` headers and
/// `linux-kbuild-` tools that package depends on.
fn header_packages(version: KernelVersion, release: &str) -> anyhow::Result<Vec<String>> {
    let headers = format!("linux-headers-{release}");
    let show = output(apt(version, "apt-cache")?.args(["show", "--no-all-versions", &headers]))
        .with_context(|| format!("apt knows no {headers}: run `apt-get update`"))?;
    let show = String::from_utf8_lossy(&show);
    let depends = show
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))
        .with_context(|| format!("{headers} has no Depends"))?;
    let mut packages = vec![headers.clone()];
    for dependency in depends.split(',') {
        let name = dependency.split_whitespace().next().unwrap_or_default();
        if name.starts_with("linux-kbuild-")
            || (name.starts_with("linux-headers-") && name.ends_with("-common"))
        {
            packages.push(name.to_owned());
        }
    }
    if packages.len() != 3 {
        bail!("expected -common and linux-kbuild- among the Depends of {headers}: {depends}");
    }
    Ok(packages)
}

/// Downloads and unpacks the header packages into one tree, fixes it up to build from where
/// it is, and renames it to `tree` once complete.
fn fetch_headers(
    version: KernelVersion,
    release: &str,
    root: &Path,
    tree: &Path,
) -> anyhow::Result<()> {
    let packages = header_packages(version, release)?;
    let work = work_dir(root, release)?;
    let identities = download_and_unpack_all(version, &packages, &work)?;
    let unpacked = work.join("tree");
    // The per-flavour Makefile includes the common one by its absolute path under /usr/src;
    // make runs in the per-flavour directory (`make -C`), so a relative path finds it in this
    // tree wherever the tree is. The scripts and tools symlinks are relative already.
    let makefile = unpacked.join(format!("usr/src/linux-headers-{release}/Makefile"));
    let text = std::fs::read_to_string(&makefile)
        .with_context(|| format!("reading {}", makefile.display()))?;
    std::fs::write(&makefile, text.replace("include /usr/src/", "include ../"))?;
    std::fs::write(packages_file(&unpacked), identities.join("\n") + "\n")?;
    if let Err(error) = std::fs::rename(&unpacked, tree)
        && !tree.is_dir()
    {
        bail!(
            "moving {} to {}: {error}",
            unpacked.display(),
            tree.display()
        );
    }
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Downloads `packages` from the suite `version` comes from into `work` and unpacks them all
/// into `work/tree`; returns `<package> <version>` of each, sorted.
fn download_and_unpack_all(
    version: KernelVersion,
    packages: &[String],
    work: &Path,
) -> anyhow::Result<Vec<String>> {
    require_tool("dpkg")?;
    output(
        apt(version, "apt-get")?
            .arg("download")
            .args(packages)
            .current_dir(work),
    )
    .with_context(|| format!("downloading {}", packages.join(" ")))?;
    let unpacked = work.join("tree");
    let mut identities = Vec::new();
    for entry in std::fs::read_dir(work)? {
        let deb = entry?.path();
        if deb.extension().is_none_or(|ext| ext != "deb") {
            continue;
        }
        let fields = output(
            Command::new("dpkg-deb")
                .arg("--show")
                .arg("--showformat=${Package} ${Version}")
                .arg(&deb),
        )?;
        identities.push(String::from_utf8_lossy(&fields).trim().to_owned());
        output(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))
            .with_context(|| format!("unpacking {}", deb.display()))?;
    }
    identities.sort();
    if identities.len() != packages.len() {
        bail!(
            "apt-get download {} left {identities:?}",
            packages.join(" ")
        );
    }
    Ok(identities)
}

/// A directory whose `usr/bin` has `compiler` (`gcc-<N>`, maybe target-prefixed) when this
/// host lacks it: Debian's packages of that gcc from the suite `version` comes from,
/// unpacked into the cache once (5.10 was built with gcc-10, which bookworm does not ship).
/// The unpacked driver finds its own `cc1` relative to itself; it runs on the host's
/// libraries (gmp, mpfr, mpc, isl, zstd), which the check below proves present.
fn foreign_compiler(version: KernelVersion, compiler: &str) -> anyhow::Result<Option<PathBuf>> {
    if find_program(compiler).is_some() {
        return Ok(None);
    }
    let name = compiler.trim_start_matches("x86_64-linux-gnu-");
    let Some(major) = name
        .strip_prefix("gcc-")
        .filter(|major| major.bytes().all(|b| b.is_ascii_digit()))
    else {
        require_tool(compiler)?;
        return Ok(None);
    };
    let root = cache_dir().join("compilers");
    let dir = root.join(name);
    let driver = dir.join("usr/bin").join(compiler);
    if !dir.is_dir() {
        std::fs::create_dir_all(&root)?;
        let work = work_dir(&root, name)?;
        let packages = [
            format!("gcc-{major}"),
            format!("cpp-{major}"),
            format!("gcc-{major}-base"),
            format!("libgcc-{major}-dev"),
        ];
        download_and_unpack_all(version, &packages, &work)?;
        if let Err(error) = std::fs::rename(work.join("tree"), &dir)
            && !dir.is_dir()
        {
            bail!("moving the unpacked {name} to {}: {error}", dir.display());
        }
        std::fs::remove_dir_all(&work)?;
    }
    output(Command::new(&driver).arg("--version"))
        .with_context(|| format!("{} does not run on this host", driver.display()))?;
    Ok(Some(dir.join("usr/bin")))
}

/// The compiler the kernel was built with, from `CONFIG_CC_VERSION_TEXT` in the headers'
/// `.config` (e.g. `gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0`): its first word.
fn kernel_compiler(headers: &Path) -> anyhow::Result<String> {
    let config = headers.join(".config");
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("CONFIG_CC_VERSION_TEXT=\""))
        .and_then(|version| version.split_whitespace().next())
        .map(str::to_owned)
        .with_context(|| format!("no CONFIG_CC_VERSION_TEXT in {}", config.display()))
}

/// Builds the module in a private directory and moves the `.ko` into `dir`, with its stamp.
fn build_module(
    version: KernelVersion,
    release: &str,
    tree: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let headers = tree.join(format!("usr/src/linux-headers-{release}"));
    require_tool("make")?;
    let mut make = Command::new("make");
    if let Some(bin) = foreign_compiler(version, &kernel_compiler(&headers)?)? {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(bin).chain(std::env::split_paths(&path));
        make.env("PATH", std::env::join_paths(paths)?);
    }
    let work = work_dir(dir, "build")?;
    for (name, text) in SOURCES {
        std::fs::write(work.join(name), text)?;
    }
    output(
        make.arg("-C")
            .arg(&headers)
            .arg(format!("M={}", work.display()))
            .args(make_variables(&work))
            .arg("modules"),
    )
    .with_context(|| format!("building lastgasp_crash.ko for {release}"))?;
    std::fs::rename(
        work.join("lastgasp_crash.ko"),
        dir.join("lastgasp_crash.ko"),
    )?;
    std::fs::write(dir.join(STAMP), stamp())?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
