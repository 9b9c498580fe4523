//! Recovery after a reboot: the previous boot's panic, as the kernel's pstore kept it.
//!
//! When the kernel panics (or oopses) it writes the tail of its log to a persistent store
//! (ramoops in reserved RAM that survives a warm reboot, EFI variables, ACPI ERST) before it
//! stops. After the reboot the records appear as files in pstorefs, `/sys/fs/pstore`:
//! `dmesg-ramoops-0`, `dmesg-efi-<n>`, `dmesg-erst-<n>`. Each holds one part of one dump: a
//! header line `Panic#1 Part1` (reason, the dump's number in its boot, the part), then console
//! lines with their syslog prefix, `<0>[   12.345678] Kernel panic - not syncing: ...`. Part 1
//! is the newest text; higher parts go back in time. The file's mtime is when the kernel wrote
//! it (wall clock), which is the time of the panic.
//!
//! On start the agent joins the parts of each dump, names the panic with the one classifier of
//! kernel messages ([`crate::kernel_log`]), sends the controller a delayed report (source
//! `pstore`, with `event_at_ms` and, when the state directory remembers it, the crashed boot's
//! id in `event_boot_id`) several times over a minute, copies the text to
//! `<state-dir>/pstore-archive/` and removes the pstore files, so a record is reported once and
//! the persistent store has room for the next one.

use std::{
    ffi::CString,
    fmt, fs, io,
    os::unix::ffi::{OsStrExt as _, OsStringExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::{
    events::{AgentEvent, PreviousBootPanic},
    last_gasp::{MAX_CONTEXT_LINES, ReportSender},
};
use crate::{
    kernel_log::{self, Frame, KernelEventKind},
    metrics::AgentMetrics,
    procfs,
    wire::{self, Report, ReportSource},
};

/// Where the records are and where the agent keeps what it needs across reboots.
#[derive(Clone, Debug)]
pub struct PstoreConfig {
    /// pstorefs; mounted there by the agent if nothing is mounted and the directory is empty.
    pub dir: PathBuf,
    /// The agent's own state: the boots it has seen and the archive of reported records.
    pub state_dir: PathBuf,
}

/// Pauses before each resend of a delayed report: sent at once, then 1, 3, 7, 15, 31 and 63 s
/// later. A UDP report is never acknowledged and the controller may still be coming up when the
/// node is; the controller merges the copies into one incident.
pub const RESEND_DELAYS: [Duration; 6] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
    Duration::from_secs(32),
];

/// Archived records kept in `<state-dir>/pstore-archive/`; the oldest go first.
pub const MAX_ARCHIVED: usize = 64;

/// Why the kernel dumped its log (`kmsg_dump_reason`), as the header line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DumpReason {
    Panic,
    Oops,
    Emergency,
    /// 5.8 and later name every orderly stop `Shutdown`; earlier kernels said which.
    Shutdown,
    Restart,
    Halt,
    Poweroff,
    Kexec,
    Unknown,
}

impl DumpReason {
    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "Panic" => Self::Panic,
            "Oops" => Self::Oops,
            "Emergency" => Self::Emergency,
            "Shutdown" => Self::Shutdown,
            "Restart" => Self::Restart,
            "Halt" => Self::Halt,
            "Poweroff" => Self::Poweroff,
            "Kexec" => Self::Kexec,
            "Unknown" => Self::Unknown,
            _ => return None,
        })
    }

    /// Panics and oopses are what the agent reports; the rest are orderly stops.
    pub fn is_crash(self) -> bool {
        matches!(self, Self::Panic | Self::Oops)
    }
}

impl fmt::Display for DumpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Panic => "Panic",
            Self::Oops => "Oops",
            Self::Emergency => "Emergency",
            Self::Shutdown => "Shutdown",
            Self::Restart => "Restart",
            Self::Halt => "Halt",
            Self::Poweroff => "Poweroff",
            Self::Kexec => "Kexec",
            Self::Unknown => "Unknown",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PstoreError {
    #[error(
        "{0} does not exist: this kernel has no pstore, or it is not mounted into the container"
    )]
    NoDirectory(PathBuf),
    #[error("mounting pstore on {dir}: {source}")]
    Mount { dir: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{0}: compressed, and the kernel could not decompress it (its compression is not built in)"
    )]
    Compressed(PathBuf),
    #[error("{path}: the first line {line:?} is not a `<Reason>#<n> Part<m>` header")]
    BadHeader { path: PathBuf, line: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PstoreError + '_ {
    move |source| PstoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One file: one part of one dump.
#[derive(Clone, Debug, PartialEq)]
pub struct DumpPart {
    pub path: PathBuf,
    /// The pstore backend: `ramoops`, `efi`, `erst`, ...
    pub backend: String,
    pub reason: DumpReason,
    /// The dump's number within its boot.
    pub count: u32,
    pub part: u32,
    /// When the kernel wrote it; `None` when the backend did not say.
    pub written: Option<SystemTime>,
    /// The console lines after the header.
    pub text: String,
}

/// Parses the header line `Panic#1 Part1` into (reason, count, part).
pub fn parse_header(line: &str) -> Option<(DumpReason, u32, u32)> {
    let (reason, rest) = line.split_once('#')?;
    let (count, part) = rest.split_once(" Part")?;
    Some((
        DumpReason::parse(reason)?,
        count.parse().ok()?,
        part.trim_end().parse().ok()?,
    ))
}

impl DumpPart {
    /// Parses one file's contents; `written` is its mtime.
    pub fn parse(
        path: &Path,
        backend: &str,
        bytes: &[u8],
        written: Option<SystemTime>,
    ) -> Result<Self, PstoreError> {
        let text = String::from_utf8_lossy(bytes);
        let (header, body) = text.split_once('\n').unwrap_or((&text, ""));
        let (reason, count, part) = parse_header(header).ok_or_else(|| PstoreError::BadHeader {
            path: path.to_owned(),
            line: header.chars().take(80).collect(),
        })?;
        Ok(Self {
            path: path.to_owned(),
            backend: backend.to_owned(),
            reason,
            count,
            part,
            written,
            text: body.to_owned(),
        })
    }
}

/// One dump, its parts joined.
#[derive(Clone, Debug, PartialEq)]
pub struct Dump {
    pub backend: String,
    pub reason: DumpReason,
    pub count: u32,
    /// Part numbers present, ascending.
    pub parts: Vec<u32>,
    pub files: Vec<PathBuf>,
    /// When the kernel wrote the dump's first part.
    pub written: Option<SystemTime>,
    /// The whole text, oldest line first.
    pub text: String,
}

/// Joins parts into dumps. Parts of one dump are written one after the other, Part1 first, so
/// in the order they were written a dump is a run of parts with the same backend, reason and
/// count whose part numbers go up by one; another Part1 starts the next dump (a dump of an
/// earlier boot has the same count when no one removed it).
pub fn join(mut parts: Vec<DumpPart>) -> Vec<Dump> {
    parts.sort_by(|a, b| {
        (&a.backend, a.written, file_order(&a.path)).cmp(&(
            &b.backend,
            b.written,
            file_order(&b.path),
        ))
    });
    let mut runs: Vec<Vec<DumpPart>> = Vec::new();
    for part in parts {
        match runs.last_mut() {
            Some(run)
                if run.last().is_some_and(|last| {
                    last.backend == part.backend
                        && last.reason == part.reason
                        && last.count == part.count
                        && last.part + 1 == part.part
                }) =>
            {
                run.push(part);
            }
            _ => runs.push(vec![part]),
        }
    }
    runs.into_iter()
        .map(|mut run| {
            let first = &run[0];
            let (backend, reason, count, written) = (
                first.backend.clone(),
                first.reason,
                first.count,
                first.written,
            );
            // Oldest text first: the highest part number leads.
            run.sort_by_key(|part| std::cmp::Reverse(part.part));
            let mut text = String::new();
            for part in &run {
                text.push_str(&part.text);
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
            }
            let mut parts: Vec<u32> = run.iter().map(|part| part.part).collect();
            parts.sort_unstable();
            Dump {
                backend,
                reason,
                count,
                parts,
                files: run.into_iter().map(|part| part.path).collect(),
                written,
                text,
            }
        })
        .collect()
}

/// `dmesg-ramoops-10` after `dmesg-ramoops-9`: numbers in the name compare as numbers.
fn file_order(path: &Path) -> (String, u64) {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, number) = name.split_at(name.len() - digits);
    (stem.to_owned(), number.parse().unwrap_or(0))
}

/// Frames of a dump's call trace sent with its delayed report: enough to pass the panic and
/// oops helpers, few enough to leave room for the context lines in a datagram.
const MAX_REPORT_FRAMES: usize = 12;

/// What a dump says happened.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub kind: KernelEventKind,
    /// The failure's line without printk prefixes.
    pub message: String,
    /// Up to [`MAX_CONTEXT_LINES`] lines before it, oldest first, without prefixes.
    pub context: Vec<String>,
    /// The call trace of the dump's first report (its frames as printed), which names the
    /// culprit when the lines before the failure line do not (a bare panic prints its trace
    /// after its line).
    pub frames: Vec<String>,
}

impl Dump {
    /// The failure in a crash dump: for a panic, its last `Kernel panic - not syncing:` line;
    /// for an oops, its last classified line (the die header). Without such a line, a message
    /// naming the record. `None` for an orderly stop.
    pub fn finding(&self) -> Option<Finding> {
        if !self.reason.is_crash() {
            return None;
        }
        let lines: Vec<&str> = self.text.lines().collect();
        let classified = |want: fn(KernelEventKind) -> bool| {
            lines.iter().enumerate().rev().find_map(|(index, line)| {
                kernel_log::classify(line)
                    .filter(|c| want(c.kind))
                    .map(|c| (index, c.kind, c.message.to_owned()))
            })
        };
        let found = match self.reason {
            DumpReason::Panic => classified(|kind| kind == KernelEventKind::Panic),
            _ => classified(|kind| kind != KernelEventKind::Panic),
        }
        .or_else(|| classified(|_| true));
        let default_kind = match self.reason {
            DumpReason::Panic => KernelEventKind::Panic,
            _ => KernelEventKind::Oops,
        };
        let (end, kind, message) = found.unwrap_or_else(|| {
            let message = format!(
                "{}#{} recorded by pstore ({}) with no recognised failure line",
                self.reason, self.count, self.backend
            );
            (lines.len(), default_kind, message)
        });
        let kind = if self.reason == DumpReason::Panic {
            KernelEventKind::Panic
        } else {
            kind
        };
        let context = lines[end.saturating_sub(MAX_CONTEXT_LINES)..end]
            .iter()
            .map(|line| kernel_log::strip_prefix(line).to_owned())
            .collect();
        let frames = kernel_log::crash_title(lines.iter().copied())
            .map(|title| {
                title
                    .excerpt
                    .iter()
                    .filter(|line| Frame::parse(line).is_some())
                    .map(|line| line.trim().to_owned())
                    .take(MAX_REPORT_FRAMES)
                    .collect()
            })
            .unwrap_or_default();
        Some(Finding {
            kind,
            message,
            context,
            frames,
        })
    }

    /// The file name in the archive: `<time>-<backend>-<reason>-<count>.txt`.
    fn archive_name(&self) -> String {
        let time = self.written.map_or_else(
            || "unknown-time".to_owned(),
            |at| humantime::format_rfc3339_millis(at).to_string(),
        );
        format!(
            "{time}-{}-{}-{}.txt",
            self.backend,
            self.reason.to_string().to_lowercase(),
            self.count
        )
    }
}

/// Every part in the directory; files that are not dmesg dumps (console, pmsg, ftrace) are
/// left out, unreadable ones come back as errors.
pub fn read_parts(dir: &Path) -> Result<(Vec<DumpPart>, Vec<PstoreError>), PstoreError> {
    let mut parts = Vec::new();
    let mut errors = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("dmesg-") else {
            continue;
        };
        if name.ends_with(".enc.z") {
            errors.push(PstoreError::Compressed(path));
            continue;
        }
        let backend = rest.split('-').next().unwrap_or(rest);
        let read = fs::read(&path).map_err(io_error(&path)).and_then(|bytes| {
            let written = entry
                .metadata()
                .ok()
                .and_then(|meta| meta.modified().ok())
                .filter(|&at| at > UNIX_EPOCH);
            DumpPart::parse(&path, backend, &bytes, written)
        });
        match read {
            Ok(part) => parts.push(part),
            Err(error) => errors.push(error),
        }
    }
    Ok((parts, errors))
}

/// Whether `/proc/self/mountinfo` shows a pstore filesystem mounted on `dir`.
fn is_pstore_mount(mountinfo: &str, dir: &Path) -> bool {
    mountinfo.lines().any(|line| {
        let Some((mount, fs)) = line.split_once(" - ") else {
            return false;
        };
        let mount_point = mount.split(' ').nth(4).map(unescape_mount_path);
        fs.split(' ').next() == Some("pstore") && mount_point.as_deref() == Some(dir)
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match octal.and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok())
        {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Makes sure `dir` shows pstore: mounts it there when nothing is mounted and the directory
/// is empty (a directory with files is read as it is). Returns whether it mounted.
pub fn ensure_mounted(dir: &Path) -> Result<bool, PstoreError> {
    if !dir.is_dir() {
        return Err(PstoreError::NoDirectory(dir.to_owned()));
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_error(Path::new("/proc/self/mountinfo")))?;
    let canonical = dir.canonicalize().map_err(io_error(dir))?;
    if is_pstore_mount(&mountinfo, &canonical) {
        return Ok(false);
    }
    if fs::read_dir(dir).map_err(io_error(dir))?.next().is_some() {
        return Ok(false);
    }
    let target =
        CString::new(canonical.as_os_str().as_bytes()).map_err(|_| PstoreError::Mount {
            dir: dir.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"),
        })?;
    let pstore = c"pstore";
    // SAFETY: NUL-terminated strings that outlive the call; no mount data.
    let mounted = unsafe {
        libc::mount(
            pstore.as_ptr(),
            target.as_ptr(),
            pstore.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if mounted != 0 {
        return Err(PstoreError::Mount {
            dir: dir.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(true)
}

/// A boot as the state file remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    pub boot_id: String,
    /// When it began, Unix ms (whole seconds).
    pub booted_at_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct BootsFile {
    current: Option<BootRecord>,
    previous: Option<BootRecord>,
}

const BOOTS_FILE: &str = "boots.json";

/// Records `current` in `<state-dir>/boots.json` and returns the boot before it, if the file
/// knew it. An agent restarted within a boot keeps the same previous boot.
pub fn record_boot(state_dir: &Path, current: BootRecord) -> io::Result<Option<BootRecord>> {
    let path = state_dir.join(BOOTS_FILE);
    let known: BootsFile = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(path = %path.display(), %error, "unreadable boot record; starting afresh");
            BootsFile::default()
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => BootsFile::default(),
        Err(error) => return Err(error),
    };
    let previous = match known.current {
        Some(seen) if seen.boot_id == current.boot_id => known.previous,
        seen => seen,
    };
    let file = BootsFile {
        current: Some(current),
        previous: previous.clone(),
    };
    write_atomically(
        &path,
        &serde_json::to_vec_pretty(&file).expect("boot records serialize"),
    )?;
    Ok(previous)
}

fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    fs::write(&temporary, data)?;
    fs::rename(&temporary, path)
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// The boot a dump was written in, when the state file knows: the previous boot, if the dump
/// is not older than its start.
fn crashed_boot(written: Option<SystemTime>, previous: Option<&BootRecord>) -> Option<String> {
    let (written, previous) = (written?, previous?);
    (unix_ms(written) >= previous.booted_at_ms).then(|| previous.boot_id.clone())
}

/// What recovery found: events to log and reports to send.
#[derive(Default)]
pub struct Recovered {
    pub events: Vec<AgentEvent>,
    pub reports: Vec<Report>,
}

/// Reads the previous boot's records, archives and removes those it reports, and builds their
/// events and (with a sender) their delayed reports. Problems are logged, never fatal: the
/// agent's other work does not depend on this.
pub fn recover(config: &PstoreConfig, boot_id: &str, sender: Option<&ReportSender>) -> Recovered {
    let mut recovered = Recovered::default();
    let current = BootRecord {
        boot_id: boot_id.to_owned(),
        booted_at_ms: procfs::boot_time().map_or(0, unix_ms),
    };
    if let Err(error) = fs::create_dir_all(&config.state_dir) {
        tracing::warn!(dir = %config.state_dir.display(), %error, "cannot create the state directory");
    }
    let previous = record_boot(&config.state_dir, current).unwrap_or_else(|error| {
        tracing::warn!(dir = %config.state_dir.display(), %error, "cannot record this boot; the previous boot's id stays unknown");
        None
    });
    match ensure_mounted(&config.dir) {
        Ok(true) => tracing::info!(dir = %config.dir.display(), "mounted pstore"),
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(%error, "pstore unavailable: a panic before this boot cannot be recovered");
            return recovered;
        }
    }
    let (parts, errors) = match read_parts(&config.dir) {
        Ok(read) => read,
        Err(error) => {
            tracing::warn!(%error, "cannot read pstore");
            return recovered;
        }
    };
    for error in errors {
        tracing::warn!(%error, "pstore record skipped");
    }
    for dump in join(parts) {
        let Some(finding) = dump.finding() else {
            tracing::info!(
                reason = %dump.reason,
                count = dump.count,
                backend = dump.backend,
                "pstore holds a dump of an orderly stop; not a crash, left alone"
            );
            continue;
        };
        let crashed_boot = crashed_boot(dump.written, previous.as_ref());
        let archived = archive(&config.state_dir, &dump);
        let removed = match &archived {
            Ok(_) => remove(&dump),
            Err(error) => {
                tracing::warn!(%error, "cannot archive the pstore record; it stays in pstore and is reported again on the next start");
                false
            }
        };
        if let Some(sender) = sender {
            let mut report = sender.report(
                finding.kind.into(),
                ReportSource::Pstore,
                finding.message.clone(),
                finding.context.clone(),
            );
            report.kernel_release = None;
            report.frames = finding.frames.clone();
            report.event_at_ms = dump.written.map(unix_ms);
            report.event_boot_id = crashed_boot.clone();
            if let Err(error) = wire::keep_latest_context(&mut report, sender.key()) {
                tracing::warn!(%error, "delayed report does not fit a datagram");
            }
            recovered.reports.push(report);
        }
        recovered
            .events
            .push(AgentEvent::PreviousBootPanic(PreviousBootPanic {
                failure: finding.kind,
                dump_reason: dump.reason,
                count: dump.count,
                backend: dump.backend.clone(),
                parts: dump.parts.clone(),
                message: finding.message,
                panicked_at: dump
                    .written
                    .map(|at| humantime::format_rfc3339_millis(at).to_string()),
                boot_id: crashed_boot,
                files: dump
                    .files
                    .iter()
                    .map(|path| path.display().to_string())
                    .collect(),
                archived_to: archived.ok().map(|path| path.display().to_string()),
                removed,
            }));
    }
    recovered
}

/// Writes the dump's text to `<state-dir>/pstore-archive/`, then prunes the oldest beyond
/// [`MAX_ARCHIVED`].
fn archive(state_dir: &Path, dump: &Dump) -> Result<PathBuf, PstoreError> {
    let dir = state_dir.join("pstore-archive");
    fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let path = dir.join(dump.archive_name());
    let files: Vec<String> = dump
        .files
        .iter()
        .map(|file| file.display().to_string())
        .collect();
    let content = format!(
        "# {}#{} from pstore ({}), parts {:?}, files {}\n{}",
        dump.reason,
        dump.count,
        dump.backend,
        dump.parts,
        files.join(" "),
        dump.text
    );
    write_atomically(&path, content.as_bytes()).map_err(io_error(&path))?;
    let mut archived: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(io_error(&dir))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "txt"))
        .collect();
    archived.sort();
    for old in archived
        .iter()
        .take(archived.len().saturating_sub(MAX_ARCHIVED))
    {
        let _ = fs::remove_file(old);
    }
    Ok(path)
}

/// Unlinks the dump's files, which frees their space in the persistent store.
fn remove(dump: &Dump) -> bool {
    let mut all = true;
    for file in &dump.files {
        if let Err(error) = fs::remove_file(file) {
            tracing::warn!(file = %file.display(), %error, "cannot remove the reported pstore record");
            all = false;
        }
    }
    all
}

/// Sends each delayed report at once and again after each of [`RESEND_DELAYS`].
pub async fn send_reports(
    sender: ReportSender,
    mut reports: Vec<Report>,
    metrics: Arc<AgentMetrics>,
) {
    let delays = std::iter::once(Duration::ZERO).chain(RESEND_DELAYS);
    let sends = RESEND_DELAYS.len() + 1;
    for (attempt, delay) in delays.enumerate() {
        tokio::time::sleep(delay).await;
        for report in &mut reports {
            let sent = sender.send(report);
            if sent.sent == 0 {
                tracing::warn!(attempt = attempt + 1, "delayed report not sent");
            }
            sent.count(&metrics);
        }
    }
    tracing::info!(
        reports = reports.len(),
        sends,
        "the previous boot's crash reported; no more resends"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const PANIC_PART1: &str = "Panic#1 Part1
<6>[    3.901234] lastgasp-vm: crashing now
<6>[    3.902345] sysrq: Trigger a crash
<0>[    3.903456] Kernel panic - not syncing: sysrq triggered crash
<4>[    3.904567] CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0-56-cloud-amd64 #1  Debian 6.1.192-2
<4>[    3.905678] Call Trace:
";

    fn part(path: &str, text: &str, secs: u64) -> DumpPart {
        DumpPart::parse(
            Path::new(path),
            "ramoops",
            text.as_bytes(),
            Some(UNIX_EPOCH + Duration::from_secs(secs)),
        )
        .unwrap()
    }

    /// `dmesg-ramoops-0` as a Debian 6.1 cloud kernel left it in QEMU after
    /// `echo c > /proc/sysrq-trigger` and a warm reboot (ramoops, deflate compression).
    const DEBIAN_61_RECORD: &str =
        include_str!("../../tests/data/debian-6.1-ramoops-sysrq-panic.txt");

    #[test]
    fn a_real_ramoops_record() {
        let written = UNIX_EPOCH + Duration::from_millis(1_795_445_308_123);
        let part = DumpPart::parse(
            Path::new("/sys/fs/pstore/dmesg-ramoops-0"),
            "ramoops",
            DEBIAN_61_RECORD.as_bytes(),
            Some(written),
        )
        .unwrap();
        assert_eq!(
            (part.reason, part.count, part.part),
            (DumpReason::Panic, 1, 1)
        );
        let dumps = join(vec![part]);
        assert_eq!(dumps.len(), 1);
        assert_eq!(
            dumps[0].archive_name(),
            "2026-11-23T14:48:28.123Z-ramoops-panic-1.txt"
        );
        let finding = dumps[0].finding().unwrap();
        assert_eq!(finding.kind, KernelEventKind::Panic);
        assert_eq!(
            finding.message,
            "Kernel panic - not syncing: sysrq triggered crash"
        );
        assert_eq!(finding.context.len(), MAX_CONTEXT_LINES);
        assert_eq!(finding.context.last().unwrap(), "sysrq: Trigger a crash");
        assert_eq!(
            finding.context[MAX_CONTEXT_LINES - 2],
            "ramoops: using 0x100000@0x1f000000, ecc: 0"
        );
        // In a datagram, the lines nearest the panic are the ones kept.
        let mut report = Report {
            node: "worker-3".into(),
            boot_id: "6f1c0000-0000-4000-8000-000000000000".into(),
            seq: 1_795_445_310_000_000,
            sent_at_ms: 1_795_445_310_000,
            kind: finding.kind.into(),
            source: ReportSource::Pstore,
            message: finding.message.clone(),
            context: finding.context.clone(),
            kernel_release: None,
            event_at_ms: Some(1_795_445_308_123),
            event_boot_id: Some("0b6f5c2e-6f0e-4d6a-9a43-3c7b1c9e2f10".into()),
            frames: Vec::new(),
        };
        let key = crate::wire::AuthKey::HmacSha256(b"k".to_vec());
        wire::keep_latest_context(&mut report, &key).unwrap();
        assert!(!report.context.is_empty());
        assert_eq!(report.context.last().unwrap(), "sysrq: Trigger a crash");
        let datagram = wire::encode(&report, &key).unwrap();
        assert_eq!(wire::decode(&datagram, &key).unwrap(), report);
    }

    #[test]
    fn headers_of_every_reason() {
        assert_eq!(
            parse_header("Panic#1 Part1"),
            Some((DumpReason::Panic, 1, 1))
        );
        assert_eq!(
            parse_header("Oops#12 Part3\r"),
            Some((DumpReason::Oops, 12, 3))
        );
        for (word, reason) in [
            ("Emergency", DumpReason::Emergency),
            ("Shutdown", DumpReason::Shutdown),
            ("Restart", DumpReason::Restart),
            ("Halt", DumpReason::Halt),
            ("Poweroff", DumpReason::Poweroff),
            ("Kexec", DumpReason::Kexec),
            ("Unknown", DumpReason::Unknown),
        ] {
            assert_eq!(
                parse_header(&format!("{word}#2 Part1")),
                Some((reason, 2, 1))
            );
            assert!(!reason.is_crash());
        }
        for bad in [
            "",
            "Panic",
            "Panic#1",
            "Panic#x Part1",
            "Panic#1 Part",
            "Crash#1 Part1",
            "====1.2-D",
        ] {
            assert_eq!(parse_header(bad), None, "{bad:?}");
        }
        let error = DumpPart::parse(
            Path::new("/p/dmesg-ramoops-0"),
            "ramoops",
            b"\x01\x02garbage",
            None,
        )
        .unwrap_err();
        assert!(error.to_string().contains("dmesg-ramoops-0"), "{error}");
        assert!(error.to_string().contains("header"), "{error}");
    }

    #[test]
    fn a_single_part_panic() {
        let dumps = join(vec![part("/p/dmesg-ramoops-0", PANIC_PART1, 100)]);
        assert_eq!(dumps.len(), 1);
        let finding = dumps[0].finding().unwrap();
        assert_eq!(finding.kind, KernelEventKind::Panic);
        assert_eq!(
            finding.message,
            "Kernel panic - not syncing: sysrq triggered crash"
        );
        assert_eq!(
            finding.context,
            ["lastgasp-vm: crashing now", "sysrq: Trigger a crash"]
        );
        assert_eq!(
            dumps[0].written,
            Some(UNIX_EPOCH + Duration::from_secs(100))
        );
    }

    #[test]
    fn parts_are_joined_oldest_first_and_dumps_kept_apart() {
        let parts = vec![
            // A later boot's dump, also Panic#1: a Part1 starts a new dump.
            part(
                "/p/dmesg-ramoops-3",
                "Panic#1 Part1\n<0>[ 9.0] Kernel panic - not syncing: second\n",
                900,
            ),
            part(
                "/p/dmesg-ramoops-1",
                "Panic#1 Part2\n<6>[ 1.0] older line\n<1>[ 1.5] BUG: kernel NULL pointer dereference, address: 0000000000000008\n",
                101,
            ),
            part(
                "/p/dmesg-ramoops-0",
                "Panic#1 Part1\n<4>[ 2.0] Oops: 0002 [#1] PREEMPT SMP NOPTI\n<0>[ 2.1] Kernel panic - not syncing: Fatal exception\n",
                100,
            ),
            part(
                "/p/dmesg-ramoops-2",
                "Panic#1 Part3\n<6>[ 0.5] oldest line\n",
                102,
            ),
        ];
        let dumps = join(parts);
        assert_eq!(dumps.len(), 2, "{dumps:#?}");
        let first = &dumps[0];
        assert_eq!(first.parts, [1, 2, 3]);
        assert_eq!(first.written, Some(UNIX_EPOCH + Duration::from_secs(100)));
        assert_eq!(
            first.text.lines().collect::<Vec<_>>(),
            [
                "<6>[ 0.5] oldest line",
                "<6>[ 1.0] older line",
                "<1>[ 1.5] BUG: kernel NULL pointer dereference, address: 0000000000000008",
                "<4>[ 2.0] Oops: 0002 [#1] PREEMPT SMP NOPTI",
                "<0>[ 2.1] Kernel panic - not syncing: Fatal exception",
            ]
        );
        let finding = first.finding().unwrap();
        assert_eq!(
            finding.message,
            "Kernel panic - not syncing: Fatal exception"
        );
        assert_eq!(finding.context.len(), 4);
        assert_eq!(finding.context[3], "Oops: 0002 [#1] PREEMPT SMP NOPTI");
        assert_eq!(dumps[1].parts, [1]);
        assert_eq!(
            dumps[1].finding().unwrap().message,
            "Kernel panic - not syncing: second"
        );
    }

    #[test]
    fn an_oops_is_named_by_its_die_header_and_stops_are_not_crashes() {
        let oops = join(vec![part(
            "/p/dmesg-ramoops-0",
            "Oops#1 Part1\n<1>[ 5.0] BUG: kernel NULL pointer dereference, address: 0000000000000008\n<4>[ 5.1] #PF: supervisor write access in kernel mode\n<4>[ 5.2] Oops: 0002 [#1] PREEMPT SMP NOPTI\n<4>[ 5.3] RIP: 0010:0xffff\n",
            5,
        )]);
        let finding = oops[0].finding().unwrap();
        assert_eq!(finding.kind, KernelEventKind::Oops);
        assert_eq!(finding.message, "Oops: 0002 [#1] PREEMPT SMP NOPTI");
        assert_eq!(finding.context.len(), 2);

        let stop = join(vec![part(
            "/p/dmesg-ramoops-0",
            "Shutdown#1 Part1\n<6>[ 1.0] reboot: Restarting system\n",
            5,
        )]);
        assert_eq!(stop[0].finding(), None);

        // A panic dump whose panic line was lost still reports a panic.
        let cut = join(vec![part(
            "/p/dmesg-ramoops-0",
            "Panic#2 Part1\n<6>[ 1.0] nothing special\n",
            5,
        )]);
        let finding = cut[0].finding().unwrap();
        assert_eq!(finding.kind, KernelEventKind::Panic);
        assert!(finding.message.contains("Panic#2"), "{}", finding.message);
        assert_eq!(finding.context, ["nothing special"]);
    }

    #[test]
    fn context_is_the_last_lines_before_the_panic() {
        let mut text = String::from("Panic#1 Part1\n");
        for i in 0..50 {
            text += &format!("<6>[ {i}.0] line {i}\n");
        }
        text += "<0>[ 51.0] Kernel panic - not syncing: x\n<4>[ 52.0] after\n";
        let finding = join(vec![part("/p/dmesg-ramoops-0", &text, 1)])[0]
            .finding()
            .unwrap();
        assert_eq!(finding.context.len(), MAX_CONTEXT_LINES);
        assert_eq!(finding.context[0], "line 30");
        assert_eq!(finding.context[19], "line 49");
        assert!(finding.frames.is_empty(), "no call trace");
    }

    #[test]
    fn the_trace_after_a_bare_panic_goes_as_frames() {
        let text = [
            "Panic#1 Part1",
            "<6>[ 7.5] sysrq: Trigger a crash",
            "<0>[ 7.6] Kernel panic - not syncing: sysrq triggered crash",
            "<4>[ 7.6] CPU: 1 PID: 1 Comm: init Not tainted 6.1.0-57-cloud-amd64 #1  Debian 6.1.192-3",
            "<4>[ 7.6] Call Trace:",
            "<4>[ 7.6]  <TASK>",
            "<4>[ 7.6]  dump_stack_lvl+0x44/0x5c",
            "<4>[ 7.6]  panic+0x118/0x2f4",
            "<4>[ 7.6]  sysrq_handle_crash+0x16/0x20",
            "<4>[ 7.6]  __handle_sysrq.cold+0x44/0x11c",
            "<4>[ 7.6]  ? vfs_write+0x235/0x3f0",
            "<4>[ 7.6]  </TASK>",
        ]
        .join("\n");
        let finding = join(vec![part("/p/dmesg-ramoops-0", &text, 1)])[0]
            .finding()
            .unwrap();
        assert_eq!(
            finding.frames,
            [
                "dump_stack_lvl+0x44/0x5c",
                "panic+0x118/0x2f4",
                "sysrq_handle_crash+0x16/0x20",
                "__handle_sysrq.cold+0x44/0x11c"
            ]
        );
        let frames: Vec<Frame> = finding
            .frames
            .iter()
            .filter_map(|f| Frame::parse(f))
            .collect();
        let title = kernel_log::title_from_stack("sysrq triggered crash", &frames);
        assert_eq!(
            title.title(),
            "kernel panic: sysrq triggered crash in sysrq_handle_crash"
        );
    }

    #[test]
    fn mountinfo_is_matched_on_path_and_type() {
        let mountinfo = "22 26 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 22 0:26 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:12 - pstore pstore rw
40 26 0:40 / /tmp/a\\040dir rw - pstore pstore rw
";
        assert!(is_pstore_mount(mountinfo, Path::new("/sys/fs/pstore")));
        assert!(is_pstore_mount(mountinfo, Path::new("/tmp/a dir")));
        assert!(!is_pstore_mount(mountinfo, Path::new("/sys")));
        assert!(!is_pstore_mount(mountinfo, Path::new("/sys/fs")));
    }

    #[test]
    fn the_previous_boot_is_remembered_across_restarts_and_boots() {
        let dir = std::env::temp_dir().join(format!("lastgasp-boots-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let boot = |id: &str, at| BootRecord {
            boot_id: id.into(),
            booted_at_ms: at,
        };
        assert_eq!(record_boot(&dir, boot("a", 1_000)).unwrap(), None);
        // An agent restart within boot a.
        assert_eq!(record_boot(&dir, boot("a", 1_000)).unwrap(), None);
        assert_eq!(
            record_boot(&dir, boot("b", 5_000)).unwrap(),
            Some(boot("a", 1_000))
        );
        assert_eq!(
            record_boot(&dir, boot("b", 5_000)).unwrap(),
            Some(boot("a", 1_000))
        );
        assert_eq!(
            record_boot(&dir, boot("c", 9_000)).unwrap(),
            Some(boot("b", 5_000))
        );
        fs::write(dir.join(BOOTS_FILE), "{not json").unwrap();
        assert_eq!(record_boot(&dir, boot("d", 9_500)).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();

        let previous = boot("b", 5_000);
        let at = |ms| Some(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(
            crashed_boot(at(6_000), Some(&previous)).as_deref(),
            Some("b")
        );
        assert_eq!(
            crashed_boot(at(4_000), Some(&previous)),
            None,
            "older than boot b"
        );
        assert_eq!(crashed_boot(None, Some(&previous)), None);
        assert_eq!(crashed_boot(at(6_000), None), None);
    }
}
