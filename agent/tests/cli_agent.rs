//! The `lastgasp` agent as a user runs it: JSON event lines, clean detach on SIGTERM, a panic
//! left in pstore reported. Loads eBPF and writes /dev/kmsg, so it runs as root (the
//! `privileged` feature, which `cargo xtask test` enables).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

const BIN: &str = env!("CARGO_BIN_EXE_lastgasp");

/// Kills the agent if the test fails before it stops it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn json_log_has_one_object_per_event_with_its_kind() {
    let mut agent = Running(
        Command::new(BIN)
            .args([
                "agent",
                "--standalone",
                "--metrics-addr",
                "127.0.0.1:0",
                "--log-format",
                "json",
                // Not this machine's pstore, nor its /var/lib.
                "--pstore-dir",
                "/nonexistent/pstore",
                "--state-dir",
                std::env::temp_dir()
                    .join(format!("lastgasp-cli-state-{}", std::process::id()))
                    .to_str()
                    .unwrap(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, lines) = mpsc::channel();
    let stdout = agent.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_json = || {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a log line");
        serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    while next_json()["message"] != "serving metrics" {}

    let nonce = format!("lastgasp-cli-{}", std::process::id());
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .unwrap()
        .write_all(
            format!("<3>watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [{nonce}:1]\n")
                .as_bytes(),
        )
        .unwrap();
    let event = loop {
        let line = next_json();
        if line["kind"] == "kernel_soft_lockup"
            && line["message"].as_str().unwrap().contains(&nonce)
        {
            break line;
        }
    };
    assert_eq!(event["source"], "console");
    assert_eq!(event["target"], "lastgasp::event");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    while next_json()["message"] != "detaching probes" {}
    assert!(agent.0.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("lastgasp-cli-state-{}", std::process::id())),
    );
}

/// A kernel panic record of the previous boot in a pstore directory (the real
/// `dmesg-ramoops-0` of a Debian 6.1 kernel crashed with sysrq), found by the agent on start:
/// logged, sent to the controller as a delayed report and again a second later, archived in the
/// state directory and removed from pstore. Files that are no crash record are left alone.
#[test]
fn a_panic_left_in_pstore_is_reported_archived_and_removed() {
    use lastgasp::wire::{AuthKey, ReportKind, ReportSource, decode};
    use std::time::{SystemTime, UNIX_EPOCH};

    let root = std::env::temp_dir().join(format!("lastgasp-cli-pstore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (pstore, state) = (root.join("pstore"), root.join("state"));
    std::fs::create_dir_all(&pstore).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let panicked_ms = (SystemTime::now() - Duration::from_secs(90))
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let panicked = UNIX_EPOCH + Duration::from_millis(panicked_ms);
    let record = pstore.join("dmesg-ramoops-0");
    std::fs::write(
        &record,
        include_str!("data/debian-6.1-ramoops-sysrq-panic.txt"),
    )
    .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&record)
        .unwrap()
        .set_modified(panicked)
        .unwrap();
    std::fs::write(
        pstore.join("dmesg-ramoops-1"),
        "Shutdown#1 Part1\n<6>[ 9.0] reboot: Restarting system\n",
    )
    .unwrap();
    std::fs::write(
        pstore.join("console-ramoops-0"),
        "the previous boot's console\n",
    )
    .unwrap();
    // The agent ran in the boot that crashed, which began an hour before the panic.
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    std::fs::write(
        state.join("boots.json"),
        format!(
            r#"{{"current":{{"boot_id":"crashed-boot","booted_at_ms":{}}},"previous":null}}"#,
            panicked_ms - 3_600_000
        ),
    )
    .unwrap();
    let controller = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    controller
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let mut agent = Running(
        Command::new(BIN)
            .args(["agent", "--standalone", "--log-format", "json"])
            .args(["--metrics-addr", "127.0.0.1:0", "--node-name", "cli-node"])
            .args([
                "--controller",
                &controller.local_addr().unwrap().to_string(),
            ])
            .arg("--pstore-dir")
            .arg(&pstore)
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(agent.0.stdout.take().unwrap()).lines();
    let event = loop {
        let line = lines.next().expect("a log line").unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if json["kind"] == "previous_boot_panic" {
            break json;
        }
    };
    assert_eq!(event["level"], "ERROR");
    assert_eq!(event["failure"], "panic");
    assert_eq!(event["dump_reason"], "panic");
    assert_eq!(event["count"], 1);
    assert_eq!(event["parts"], serde_json::json!([1]));
    assert_eq!(event["backend"], "ramoops");
    assert_eq!(
        event["message"],
        "Kernel panic - not syncing: sysrq triggered crash"
    );
    assert_eq!(event["boot_id"], "crashed-boot");
    assert_eq!(
        event["panicked_at"],
        humantime::format_rfc3339_millis(panicked).to_string()
    );
    assert_eq!(event["removed"], true);

    let mut buffer = [0u8; 2048];
    let mut receive = || {
        let len = controller.recv(&mut buffer).expect("a delayed report");
        decode(&buffer[..len], &AuthKey::None).unwrap()
    };
    let first = receive();
    assert_eq!(first.node, "cli-node");
    assert_eq!(first.boot_id, boot_id.trim());
    assert_eq!(first.kind, ReportKind::KernelPanic);
    assert_eq!(first.source, ReportSource::Pstore);
    assert_eq!(
        first.message,
        "Kernel panic - not syncing: sysrq triggered crash"
    );
    assert_eq!(first.context.last().unwrap(), "sysrq: Trigger a crash");
    assert_eq!(first.event_at_ms, Some(panicked_ms));
    assert_eq!(first.event_boot_id.as_deref(), Some("crashed-boot"));
    assert_eq!(first.kernel_release, None);
    let resent = receive();
    assert!(resent.seq > first.seq);
    assert_eq!(resent.message, first.message);
    assert!(
        resent.sent_at_ms >= first.sent_at_ms + 900,
        "resent a second later"
    );

    assert!(!record.exists(), "the reported record is removed");
    assert!(
        pstore.join("dmesg-ramoops-1").exists(),
        "an orderly stop is left"
    );
    assert!(pstore.join("console-ramoops-0").exists());
    let archived: Vec<_> = std::fs::read_dir(state.join("pstore-archive"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert!(
        archived[0]
            .to_string_lossy()
            .ends_with("-ramoops-panic-1.txt")
    );
    let text = std::fs::read_to_string(&archived[0]).unwrap();
    assert!(text.contains("<0>[    3.687158] Kernel panic - not syncing: sysrq triggered crash"));
    let boots: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("boots.json")).unwrap()).unwrap();
    assert_eq!(boots["current"]["boot_id"], boot_id.trim());
    assert_eq!(boots["previous"]["boot_id"], "crashed-boot");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    assert!(agent.0.wait().unwrap().success());
    std::fs::remove_dir_all(&root).unwrap();
}

/// `GET path` over plain HTTP/1.1: status code and body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// A supervised task that panics (the events loop, made to panic by the test-only
/// `--inject-task-panic`) stops the agent at once with exit code 1, its log naming the task and
/// the panic's message.
#[test]
fn a_task_that_panics_stops_the_agent_with_an_error() {
    let state = std::env::temp_dir().join(format!("lastgasp-cli-panic-{}", std::process::id()));
    let mut agent = Running(
        Command::new(BIN)
            .args(["agent", "--standalone", "--log-format", "json"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--pstore-dir", "/nonexistent/pstore", "--state-dir"])
            .arg(&state)
            .args(["--inject-task-panic", "events:500ms"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, lines) = mpsc::channel();
    let stdout = agent.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send((std::time::Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let next_json = || {
        let (at, line) = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a log line");
        let json = serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|e| panic!("{e}: {line}"));
        (at, json)
    };
    let metrics_addr = loop {
        let (_, line) = next_json();
        if line["message"] == "serving metrics" {
            break line["metrics_addr"].as_str().unwrap().to_owned();
        }
    };
    assert_eq!(
        http_get(&metrics_addr, "/healthz").unwrap(),
        (200, "ok\n".into())
    );

    let (failed_at, failure) = loop {
        let (at, line) = next_json();
        if line["level"] == "ERROR" {
            break (at, line);
        }
    };
    assert_eq!(failure["task"], "events", "{failure}");
    assert_eq!(
        failure["message"],
        "task `events` panicked: injected panic (--inject-task-panic)"
    );
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            failed_at.elapsed() < Duration::from_secs(5),
            "the agent still runs"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = failed_at.elapsed();
    println!("from the failure to the agent's exit: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut agent.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("Error: task `events` panicked: injected panic (--inject-task-panic)"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&state);
}
