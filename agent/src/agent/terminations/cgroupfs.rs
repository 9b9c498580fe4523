//! The pod cgroup roots the termination probes filter on, and the memory files of a pod's
//! cgroups, read from cgroupfs. Everything read here is parsed at the edge and capped.

use std::{
    fs,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use lastgasp_common::{POD_CGROUP_ROOTS, PodCgroupRoot};
use thiserror::Error;

use super::MemoryEvents;

/// Where kubelet puts pods when `--pod-cgroup-root` is not given, by cgroup driver: cgroupfs
/// (`kubepods`) and systemd (`kubepods.slice`), in the unified hierarchy on a v2 host, in the
/// memory controller's on a v1 or hybrid one (kubelet makes the roots in every controller's
/// hierarchy; the memory one is the one OOM kills are about).
pub const DEFAULT_ROOTS_V2: [&str; 2] =
    ["/sys/fs/cgroup/kubepods.slice", "/sys/fs/cgroup/kubepods"];
pub const DEFAULT_ROOTS_V1: [&str; 2] = [
    "/sys/fs/cgroup/memory/kubepods.slice",
    "/sys/fs/cgroup/memory/kubepods",
];

/// Bytes read of a cgroupfs file or of mountinfo.
const FILE_MAX: usize = 64 << 10;

#[derive(Debug, Error)]
pub enum RootError {
    #[error("no pod cgroup root found (looked for {0})")]
    NoneFound(String),
    #[error("at most {POD_CGROUP_ROOTS} pod cgroup roots can be watched")]
    TooMany,
    #[error("pod cgroup root {0:?}: {1}")]
    Unreadable(PathBuf, std::io::Error),
    #[error("pod cgroup root {0:?} is not on a cgroup filesystem")]
    NotCgroupfs(PathBuf),
    #[error("pod cgroup root {path:?} is in another hierarchy than {first:?}")]
    Hierarchies { path: PathBuf, first: PathBuf },
    #[error("pod cgroup root {0:?} is in a v1 hierarchy without a controller the kernel names")]
    NoController(PathBuf),
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(std::io::Error),
}

/// A cgroup filesystem mounted on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    pub mount_point: PathBuf,
    /// cgroup2; else a v1 hierarchy.
    pub unified: bool,
    /// Its super options without `rw`/`ro` and `key=value` ones: a v1 hierarchy's controllers
    /// are among them (`memory`, `cpu`, ...), with flags such as `xattr`.
    pub options: Vec<String>,
}

/// The pod cgroup roots, resolved.
#[derive(Clone, Debug)]
pub struct PodRoots {
    pub mount: CgroupMount,
    pub paths: Vec<PathBuf>,
    pub roots: Vec<PodCgroupRoot>,
    /// The hierarchy with the memory controller (the roots' own, or on a v1 host where the
    /// roots are in another controller's, the memory one), for limits and `memory.events`.
    pub memory: Option<CgroupMount>,
}

impl PodRoots {
    /// Resolves `wanted`, or the default roots that exist when it is empty.
    pub fn resolve(wanted: &[PathBuf]) -> Result<Self, RootError> {
        let paths: Vec<PathBuf> = if wanted.is_empty() {
            let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
            let defaults = if unified {
                DEFAULT_ROOTS_V2
            } else {
                DEFAULT_ROOTS_V1
            };
            let found: Vec<PathBuf> = defaults
                .iter()
                .map(PathBuf::from)
                .filter(|path| path.is_dir())
                .collect();
            if found.is_empty() {
                return Err(RootError::NoneFound(defaults.join(", ")));
            }
            found
        } else {
            wanted.to_vec()
        };
        if paths.len() > POD_CGROUP_ROOTS {
            return Err(RootError::TooMany);
        }
        let mounts = cgroup_mounts(
            &read_capped(Path::new("/proc/self/mountinfo")).map_err(RootError::Mountinfo)?,
        );
        let mut mount: Option<CgroupMount> = None;
        let mut roots = Vec::new();
        for path in &paths {
            let metadata =
                fs::metadata(path).map_err(|error| RootError::Unreadable(path.clone(), error))?;
            let (this_mount, level) =
                mount_of(&mounts, path).ok_or_else(|| RootError::NotCgroupfs(path.clone()))?;
            match &mount {
                Some(first) if first != this_mount => {
                    return Err(RootError::Hierarchies {
                        path: path.clone(),
                        first: first.mount_point.clone(),
                    });
                }
                _ => mount = Some(this_mount.clone()),
            }
            roots.push(PodCgroupRoot {
                // A kernfs node's inode number is its id on 64-bit machines.
                id: metadata.ino(),
                level,
                _pad: 0,
            });
        }
        let mount = mount.expect("at least one root");
        let memory = if mount.unified || mount.options.iter().any(|c| c == "memory") {
            Some(mount.clone())
        } else {
            mounts
                .iter()
                .find(|m| !m.unified && m.options.iter().any(|c| c == "memory"))
                .cloned()
        };
        Ok(Self {
            mount,
            paths,
            roots,
            memory,
        })
    }

    /// The memory hierarchy's directory of a memory cgroup path as the kernel prints it
    /// (`/kubepods/...`, from the hierarchy's root). `None` for a path that leaves it.
    pub fn memory_dir(&self, kernel_path: &str) -> Option<PathBuf> {
        let relative = kernel_path.trim_start_matches('/');
        if relative.split('/').any(|part| part == "..") {
            return None;
        }
        Some(self.memory.as_ref()?.mount_point.join(relative))
    }
}

/// The cgroup mounts in mountinfo's text.
pub fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `id parent maj:min root mount-point options [optional...] - fstype source super-options`
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let mut after = after.split(' ');
            let fstype = after.next()?;
            let _source = after.next()?;
            let super_options = after.next().unwrap_or("");
            let unified = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                unified,
                options: super_options
                    .split(',')
                    .filter(|option| !matches!(*option, "rw" | "ro") && !option.contains('='))
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes
                .get(i + 1..i + 4)
                .and_then(|digits| std::str::from_utf8(digits).ok())
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount a path is on (the longest mount point it is under) and its level below it.
fn mount_of<'a>(mounts: &'a [CgroupMount], path: &Path) -> Option<(&'a CgroupMount, u32)> {
    let mount = mounts
        .iter()
        .filter(|mount| path.starts_with(&mount.mount_point))
        .max_by_key(|mount| mount.mount_point.components().count())?;
    let level = path
        .strip_prefix(&mount.mount_point)
        .ok()?
        .components()
        .count();
    Some((mount, u32::try_from(level).ok()?))
}

fn read_capped(path: &Path) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(FILE_MAX as u64)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A cgroup's memory limit: `memory.max` (v2) or `memory.limit_in_bytes` (v1); `None` when
/// unlimited or unreadable.
pub fn memory_limit(dir: &Path, unified: bool) -> Option<u64> {
    let file = if unified {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    parse_limit(&read_capped(&dir.join(file)).ok()?)
}

/// v1 says "no limit" with the largest page-aligned `i64` (or more); v2 with `max`.
fn parse_limit(text: &str) -> Option<u64> {
    const UNLIMITED_V1: u64 = 1 << 62;
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|&limit| limit < UNLIMITED_V1)
}

/// A v2 cgroup's `memory.events` counters `oom` and `oom_kill`.
pub fn memory_events(dir: &Path) -> Option<MemoryEvents> {
    parse_memory_events(&read_capped(&dir.join("memory.events")).ok()?)
}

fn parse_memory_events(text: &str) -> Option<MemoryEvents> {
    let counter = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<u64>().ok())?
        })
    };
    Some(MemoryEvents {
        oom: counter("oom")?,
        oom_kill: counter("oom_kill")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 31 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
40 35 0:35 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
41 35 0:36 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
42 35 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
43 35 0:38 / /mnt/odd\\040dir rw - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_gives_the_cgroup_hierarchies() {
        let mounts = cgroup_mounts(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        assert!(mounts[0].unified);
        assert_eq!(mounts[1].options, ["memory"]);
        assert_eq!(mounts[2].options, ["cpu", "cpuacct"]);
        assert_eq!(mounts[3].options, ["xattr"]);
        assert_eq!(mounts[4].mount_point, PathBuf::from("/mnt/odd dir"));
        let (mount, level) = mount_of(
            &mounts,
            Path::new("/sys/fs/cgroup/memory/kubepods/burstable"),
        )
        .unwrap();
        assert_eq!(
            (mount.options.as_slice(), level),
            (&["memory".to_owned()][..], 2)
        );
        assert!(mount_of(&mounts, Path::new("/sys/fs/cgroup")).is_none());
        // Hostile lines are skipped.
        assert!(cgroup_mounts("garbage\n1 2 - cgroup\n - \n").is_empty());
    }

    #[test]
    fn limits_and_events() {
        assert_eq!(parse_limit("268435456\n"), Some(268_435_456));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit(""), None);
        assert_eq!(
            parse_memory_events("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n"),
            Some(MemoryEvents {
                oom: 2,
                oom_kill: 1
            })
        );
        assert_eq!(parse_memory_events("oom x\noom_kill 1\n"), None);
    }
}
