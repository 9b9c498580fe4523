//! What /proc and /sys tell about a process or the machine, parsed at the edge.
//!
//! What a process controls is read with a byte cap (its command line can be megabytes, and
//! the agent reads it for every hung thread); the cut is said, never silent.

use std::{
    fs,
    io::{self, Read as _},
    path::Path,
};

/// Bytes read of a command line.
pub const CMDLINE_MAX: usize = 4 << 10;
/// Bytes read of a kernel stack or a cgroup list (both far smaller in practice).
pub const LISTING_MAX: usize = 16 << 10;
/// Bytes read of a one-line file (`comm`, `syscall`).
const LINE_MAX: usize = 512;
/// Appended where a read was cut at its cap.
pub const TRUNCATED: &str = "[truncated]";

/// At most `max` bytes of a file, and whether it had more.
fn read_capped(path: &str, max: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)?;
    let truncated = bytes.len() > max;
    bytes.truncate(max);
    Ok((bytes, truncated))
}

fn read_capped_string(path: &str, max: usize) -> io::Result<(String, bool)> {
    let (bytes, truncated) = read_capped(path, max)?;
    Ok((String::from_utf8_lossy(&bytes).into_owned(), truncated))
}

/// A thread's name, from `/proc/<pid>/task/<tid>/comm`.
pub fn thread_comm(pid: u32, tid: u32) -> io::Result<String> {
    let (text, _) = read_capped_string(&format!("/proc/{pid}/task/{tid}/comm"), LINE_MAX)?;
    Ok(text.trim_end().to_owned())
}

/// The process's command line with its NUL separators turned into spaces: the first
/// [`CMDLINE_MAX`] bytes, then ` [truncated]` if there was more.
pub fn cmdline(pid: u32) -> io::Result<String> {
    let (raw, truncated) = read_capped(&format!("/proc/{pid}/cmdline"), CMDLINE_MAX)?;
    Ok(cmdline_text(&raw, truncated))
}

fn cmdline_text(raw: &[u8], truncated: bool) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut text = text.trim_end_matches('\0').replace('\0', " ");
    if truncated {
        text.push(' ');
        text.push_str(TRUNCATED);
    }
    text
}

/// The process's cgroup path that says most: one naming a container (on hybrid hosts the v1
/// hierarchies may name it while the unified entry is `/`), else the v2 unified entry, else
/// the first v1 hierarchy's.
pub fn cgroup(pid: u32) -> io::Result<String> {
    // A cut last line has no path field, or a cut one: only complete lines count.
    let (text, truncated) = read_capped_string(&format!("/proc/{pid}/cgroup"), LISTING_MAX)?;
    let complete = if truncated {
        text.rsplit_once('\n').map_or("", |(lines, _)| lines)
    } else {
        &text
    };
    Ok(parse_cgroup(complete).unwrap_or_default().to_owned())
}

fn parse_cgroup(text: &str) -> Option<&str> {
    let entries: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let id = fields.next()?;
            let _controllers = fields.next()?;
            Some((id, fields.next()?))
        })
        .collect();
    entries
        .iter()
        .find(|(_, path)| container_id(path).is_some())
        .or_else(|| entries.iter().find(|(id, _)| *id == "0"))
        .or_else(|| entries.first())
        .map(|(_, path)| *path)
}

/// The container id in a cgroup path: the last 64-hex-digit run, as containerd, CRI-O
/// and docker name their cgroups (`cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, `/<id>`).
pub fn container_id(cgroup_path: &str) -> Option<&str> {
    cgroup_path
        .split(|c: char| !c.is_ascii_hexdigit())
        .rev()
        .find(|part| part.len() == 64)
}

/// The kernel stack of a thread, one frame a line, from `/proc/<pid>/task/<tid>/stack`; a
/// last line [`TRUNCATED`] if it was longer than [`LISTING_MAX`].
pub fn kernel_stack(pid: u32, tid: u32) -> io::Result<Vec<String>> {
    let (text, truncated) =
        read_capped_string(&format!("/proc/{pid}/task/{tid}/stack"), LISTING_MAX)?;
    Ok(stack_lines(&text, truncated))
}

fn stack_lines(text: &str, truncated: bool) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if truncated {
        // The last frame was cut.
        lines.pop();
        lines.push(TRUNCATED.to_owned());
    }
    lines
}

/// What a thread is doing, from `/proc/<pid>/task/<tid>/syscall`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadSyscall {
    /// Blocked in this syscall (its number).
    In(i64),
    /// Blocked, but not in a syscall (e.g. a page fault).
    NotInSyscall,
    /// On a CPU right now: the kernel cannot say.
    Running,
}

pub fn thread_syscall(pid: u32, tid: u32) -> io::Result<ThreadSyscall> {
    let (text, _) = read_capped_string(&format!("/proc/{pid}/task/{tid}/syscall"), LINE_MAX)?;
    parse_syscall(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/task/{tid}/syscall: {text:?}"),
        )
    })
}

fn parse_syscall(text: &str) -> Option<ThreadSyscall> {
    match text.split_whitespace().next()? {
        "running" => Some(ThreadSyscall::Running),
        "-1" => Some(ThreadSyscall::NotInSyscall),
        number => number.parse().ok().map(ThreadSyscall::In),
    }
}

/// This boot's id, as the kernel names it.
pub fn boot_id() -> io::Result<String> {
    read_trimmed(Path::new("/proc/sys/kernel/random/boot_id"))
}

pub fn kernel_release() -> io::Result<String> {
    read_trimmed(Path::new("/proc/sys/kernel/osrelease"))
}

pub fn hostname() -> io::Result<String> {
    read_trimmed(Path::new("/proc/sys/kernel/hostname"))
}

/// When this boot began, by the wall clock: `btime` of `/proc/stat`, in whole seconds.
pub fn boot_time() -> io::Result<std::time::SystemTime> {
    let stat = fs::read_to_string("/proc/stat")?;
    parse_btime(&stat)
        .map(|secs| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/stat has no btime line"))
}

fn parse_btime(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|secs| secs.trim().parse().ok())
}

/// Whether a netconsole console is registered (`netcon0`, `netcon_ext1`, ... in
/// `/proc/consoles`), whoever configured it. An unreadable file counts as yes: the answer
/// decides whether sending more risks the panicking CPU's netconsole writes.
pub fn netconsole_registered() -> bool {
    fs::read_to_string("/proc/consoles").map_or(true, |consoles| has_netconsole(&consoles))
}

fn has_netconsole(consoles: &str) -> bool {
    consoles
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|name| name.starts_with("netcon"))
}

fn read_trimmed(path: &Path) -> io::Result<String> {
    Ok(fs::read_to_string(path)?.trim().to_owned())
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netconsole_is_found_among_the_consoles() {
        let serial =
            "ttyS0                -W- (EC p a)    4:64\ntty0                 -WU (E  p  )    4:7\n";
        assert!(!has_netconsole(serial));
        assert!(has_netconsole(&format!(
            "{serial}netcon0              -W- (E     )\n"
        )));
        assert!(has_netconsole("netcon_ext1          -W- (E     )\n"));
        assert!(!has_netconsole(""));
    }

    const ID: &str = "4d3f0c5a1b2e4f6a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a";

    #[test]
    fn container_ids_from_every_runtime_layout() {
        for path in [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5678.slice/crio-{ID}.scope"
            ),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods/burstable/pod0a1b2c3d-0000-1111-2222-333344445555/{ID}"),
        ] {
            assert_eq!(container_id(&path), Some(ID), "{path}");
        }
        assert_eq!(
            container_id("/user.slice/user-0.slice/session-1.scope"),
            None
        );
    }

    #[test]
    fn cgroup_prefers_a_container_then_the_unified_hierarchy() {
        let v1 = "12:pids:/kubepods/pod1/abc\n11:memory:/kubepods/pod1/abc\n";
        assert_eq!(parse_cgroup(v1), Some("/kubepods/pod1/abc"));
        let hybrid = "1:name=systemd:/init.scope\n0::/system.slice/containerd.service\n";
        assert_eq!(
            parse_cgroup(hybrid),
            Some("/system.slice/containerd.service")
        );
        let hybrid_container = format!("4:memory:/kubepods/besteffort/pod1/{ID}\n0::/\n");
        assert_eq!(
            parse_cgroup(&hybrid_container),
            Some(format!("/kubepods/besteffort/pod1/{ID}").as_str())
        );
    }

    #[test]
    fn syscall_lines() {
        assert_eq!(
            parse_syscall("45 0x3 0x7ffd 0x1000 0x0 0x0 0x0 0x7ffc 0x7f12\n"),
            Some(ThreadSyscall::In(45))
        );
        assert_eq!(parse_syscall("running\n"), Some(ThreadSyscall::Running));
        assert_eq!(
            parse_syscall("-1 0x7ffc 0x4011d6\n"),
            Some(ThreadSyscall::NotInSyscall)
        );
        assert_eq!(parse_syscall(""), None);
        assert_eq!(parse_syscall("x"), None);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(!thread_comm(pid, pid).unwrap().is_empty());
        assert!(cmdline(pid).unwrap().contains("lastgasp"));
        assert_eq!(boot_id().unwrap().len(), 36);
        let booted = boot_time().unwrap();
        assert!(booted < std::time::SystemTime::now());
    }

    #[test]
    fn a_huge_command_line_is_read_up_to_its_cap() {
        // 1.5 MiB of arguments (one may be 128 KiB at most, all a quarter of the stack
        // limit): read 4 KiB of them. The shell ignores them and waits on its stdin until it
        // is killed (sleep would reject them and could exit before it is read).
        let arg = "a".repeat(64 << 10);
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line", "sh"])
            .args(std::iter::repeat_n(&arg, 24))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Until the exec is done the command line is not the shell's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let text = loop {
            let text = cmdline(child.id()).unwrap();
            if text.starts_with("sh -c") || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(text.starts_with("sh -c read line sh aaa"), "{text:.30}");
        assert!(text.ends_with(" [truncated]"));
        assert_eq!(text.len(), CMDLINE_MAX + " [truncated]".len());
        // A short one is whole.
        assert_eq!(cmdline_text(b"sleep\x0030\x00", false), "sleep 30");
    }

    #[test]
    fn capped_reads_say_they_were_cut() {
        let path = std::env::temp_dir().join(format!("lastgasp-capped-{}", std::process::id()));
        let frames: String = (0..2000)
            .map(|i| format!("[<0>] frame_{i}+0x10/0x20\n"))
            .collect();
        std::fs::write(&path, &frames).unwrap();
        let path_text = path.to_str().unwrap();
        let (text, truncated) = read_capped_string(path_text, LISTING_MAX).unwrap();
        assert!(truncated && text.len() == LISTING_MAX);
        let lines = stack_lines(&text, truncated);
        assert_eq!(lines.last().map(String::as_str), Some(TRUNCATED));
        assert!(
            lines[..lines.len() - 1]
                .iter()
                .all(|l| l.ends_with("+0x10/0x20"))
        );
        let (whole, truncated) = read_capped_string(path_text, frames.len()).unwrap();
        assert!(!truncated && whole == frames);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn btime_is_found_among_the_stat_lines() {
        let stat = "cpu  1 2 3\nintr 5\nctxt 77\nbtime 1763900000\nprocesses 12\n";
        assert_eq!(parse_btime(stat), Some(1_763_900_000));
        assert_eq!(parse_btime("cpu 1\n"), None);
    }
}
