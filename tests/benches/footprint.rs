//! Memory and CPU of the built `lastgasp` binary: idle, then under a storm of kernel log
//! lines written to /dev/kmsg. Needs root and a built binary (`cargo build --release -p
//! lastgasp`, or `LASTGASP_BIN`): `cargo bench -p lastgasp-tests --features privileged --bench
//! footprint`.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

const IDLE: Duration = Duration::from_secs(10);
const STORM: Duration = Duration::from_secs(10);
const STORM_RATE: u64 = 100_000;
/// The storm writes `STORM_RATE / BATCHES_PER_SECOND` lines, then sleeps until the next batch.
const BATCHES_PER_SECOND: u64 = 100;
const PRINTK: &str = "/proc/sys/kernel/printk";
const PRINTK_DEVKMSG: &str = "/proc/sys/kernel/printk_devkmsg";

fn main() -> anyhow::Result<()> {
    let binary = locate_binary()?;
    // Free a port for the agent; another process taking it meanwhile is unlikely.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut agent = Command::new(&binary)
        .args(["agent", "--standalone", "--log-format", "json"])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let result = measure(&agent, port);
    stop(&mut agent);
    let report = result?;
    println!("footprint of {}", binary.display());
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    for (measure, value) in report {
        println!("| {measure} | {value} |");
    }
    Ok(())
}

fn measure(agent: &Child, port: u16) -> anyhow::Result<Vec<(String, String)>> {
    let pid = agent.id();
    wait_attached(port)?;
    thread::sleep(Duration::from_secs(2));
    let mut report = Vec::new();

    let idle = Sample::take(pid)?;
    thread::sleep(IDLE);
    let idle_end = Sample::take(pid)?;
    report.push(("idle RSS".into(), mib(idle_end.rss_kib)));
    report.push((
        format!("idle CPU ({} s)", IDLE.as_secs()),
        format!("{:.2} % of one core", idle_end.cpu_percent_since(&idle)),
    ));

    let settings = StormSettings::apply()?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = thread::spawn({
        let stop = stop.clone();
        move || storm(&stop)
    });
    let storm_start = Sample::take(pid)?;
    let mut rss = Vec::new();
    while storm_start.at.elapsed() < STORM {
        thread::sleep(Duration::from_secs(1));
        rss.push(Sample::take(pid)?.rss_kib);
    }
    stop.store(true, Ordering::Relaxed);
    // The last batch may still be printing; the CPU window ends with it.
    let (written, elapsed) = writer.join().expect("storm thread")?;
    let storm_end = Sample::take(pid)?;
    let notes = settings.describe();
    drop(settings);
    // Let the agent drain its ring buffer before reading its counters.
    thread::sleep(Duration::from_secs(2));
    let metrics = scrape(port)?;

    report.push((
        "storm: lines written to /dev/kmsg".into(),
        format!(
            "{written} in {:.1} s = {:.0} lines/s (target {STORM_RATE})",
            elapsed.as_secs_f64(),
            written as f64 / elapsed.as_secs_f64()
        ),
    ));
    report.push((
        "storm: RSS min / max (1 s samples)".into(),
        format!(
            "{} / {}",
            mib(*rss.iter().min().context("no RSS sample")?),
            mib(*rss.iter().max().context("no RSS sample")?)
        ),
    ));
    report.push((
        "storm: CPU".into(),
        format!(
            "{:.2} % of one core",
            storm_end.cpu_percent_since(&storm_start)
        ),
    ));
    for (name, prefix) in [
        (
            "`lastgasp_ebpf_dropped_events_total{reason=\"kernel_log_ring_full\"}`",
            "lastgasp_ebpf_dropped_events_total{reason=\"kernel_log_ring_full\"}",
        ),
        (
            "`lastgasp_kernel_events_total`",
            "lastgasp_kernel_events_total",
        ),
    ] {
        report.push((name.into(), format!("{}", sum_metric(&metrics, prefix))));
    }
    report.push(("notes".into(), notes));
    Ok(report)
}

fn locate_binary() -> anyhow::Result<PathBuf> {
    if let Some(binary) = std::env::var_os("LASTGASP_BIN") {
        let binary = PathBuf::from(binary);
        ensure!(
            binary.is_file(),
            "LASTGASP_BIN={} is not a file",
            binary.display()
        );
        return Ok(binary);
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    ["release", "debug"]
        .iter()
        .map(|profile| target.join(profile).join("lastgasp"))
        .find(|binary| binary.is_file())
        .context(
            "no lastgasp binary in target/release or target/debug: run \
             `cargo build --release -p lastgasp` first, or point LASTGASP_BIN at one",
        )
}

/// Waits for /metrics to answer and show the console probe attached.
fn wait_attached(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let attached = "lastgasp_probe_info{probe=\"console\",mode=\"tracepoint\",attached=\"true\"} 1";
    while Instant::now() < deadline {
        if scrape(port).is_ok_and(|metrics| metrics.contains(attached)) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("the agent did not show its console probe attached on /metrics within 30 s")
}

fn scrape(port: u16) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    ensure!(
        response.starts_with("HTTP/1.1 200"),
        "GET /metrics: {response:.80}"
    );
    Ok(response)
}

/// Sums the series whose line starts with `prefix` (0 when there is none).
fn sum_metric(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn stop(agent: &mut Child) {
    // SAFETY: signals our own child, which has not been reaped yet.
    unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = agent.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("the agent ignored SIGTERM for 5 s; killing it");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Writes numbered err-level lines to /dev/kmsg at `STORM_RATE` until `stop`; returns how
/// many writes succeeded and how long it took.
fn storm(stop: &AtomicBool) -> anyhow::Result<(u64, Duration)> {
    let mut kmsg = fs::OpenOptions::new().write(true).open("/dev/kmsg")?;
    let batch = STORM_RATE / BATCHES_PER_SECOND;
    let period = Duration::from_secs(1) / BATCHES_PER_SECOND as u32;
    let start = Instant::now();
    let mut written = 0u64;
    let mut next = start;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..batch {
            // One write is one record.
            kmsg.write_all(format!("<3>lastgasp-bench storm line {written}\n").as_bytes())?;
            written += 1;
        }
        next += period;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok((written, start.elapsed()))
}

/// Kernel log settings changed for the storm, restored on drop.
struct StormSettings {
    printk: String,
    devkmsg: String,
    raised_loglevel: bool,
    devkmsg_on: Result<bool, String>,
}

impl StormSettings {
    fn apply() -> anyhow::Result<Self> {
        let printk = fs::read_to_string(PRINTK)?.trim().to_owned();
        let console_loglevel: u32 = printk
            .split_whitespace()
            .next()
            .and_then(|level| level.parse().ok())
            .with_context(|| format!("{PRINTK}: {printk:?}"))?;
        // Only lines below the console loglevel reach the consoles and the console tracepoint.
        let raised_loglevel = console_loglevel <= 3;
        if raised_loglevel {
            fs::write(PRINTK, "8\n")?;
        }
        // By default writes to /dev/kmsg are rate-limited (10 lines per 5 s per opener).
        let devkmsg = fs::read_to_string(PRINTK_DEVKMSG)?.trim().to_owned();
        let devkmsg_on = if devkmsg == "on" {
            Ok(false)
        } else {
            fs::write(PRINTK_DEVKMSG, "on\n")
                .map(|()| true)
                .map_err(|error| error.to_string())
        };
        Ok(Self {
            printk,
            devkmsg,
            raised_loglevel,
            devkmsg_on,
        })
    }

    fn describe(&self) -> String {
        let mut notes = vec![format!("{PRINTK} was `{}`", self.printk)];
        if self.raised_loglevel {
            notes.push(
                "console_loglevel raised to 8 during the storm so <3> lines reach the console"
                    .into(),
            );
        } else {
            notes.push("<3> lines reach the console at this console_loglevel".into());
        }
        match &self.devkmsg_on {
            Ok(true) => notes.push(format!(
                "printk_devkmsg was `{}`, set to `on` during the storm",
                self.devkmsg
            )),
            Ok(false) => {}
            Err(error) => notes.push(format!(
                "printk_devkmsg `{}` could not be set to `on` ({error}): most written lines were dropped by the rate limit",
                self.devkmsg
            )),
        }
        notes.join("; ")
    }
}

impl Drop for StormSettings {
    fn drop(&mut self) {
        if self.raised_loglevel {
            let _ = fs::write(PRINTK, format!("{}\n", self.printk));
        }
        if self.devkmsg_on == Ok(true) {
            let _ = fs::write(PRINTK_DEVKMSG, format!("{}\n", self.devkmsg));
        }
    }
}

struct Sample {
    at: Instant,
    cpu_ticks: u64,
    rss_kib: u64,
}

impl Sample {
    fn take(pid: u32) -> anyhow::Result<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name start with field 3 (state);
        // utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("malformed /proc/<pid>/stat")?
            .1
            .split_whitespace()
            .collect();
        let cpu_ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
        Ok(Self {
            at: Instant::now(),
            cpu_ticks,
            rss_kib,
        })
    }

    fn cpu_percent_since(&self, earlier: &Self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu_seconds = (self.cpu_ticks - earlier.cpu_ticks) as f64 / ticks_per_second;
        100.0 * cpu_seconds / (self.at - earlier.at).as_secs_f64()
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
