//! The agent's console watcher against a forged panic line, for real: the agent's eBPF loaded
//! into this kernel (root required), one multi-line record written to /dev/kmsg, and a UDP
//! socket standing in for the controller.

use std::{
    fs,
    io::Write as _,
    net::UdpSocket,
    time::{Duration, Instant},
};

use lastgasp::{
    agent::{Agent, AgentConfig, events::AgentEvent},
    wire::{self, AuthKey, ReportKind},
};
use lastgasp_tests::fixtures::agent_config;
use tokio::sync::broadcast;

const KEY: &[u8] = b"injection-test-key";

/// One write is one printk record, newlines and all.
fn write_kmsg(record: &str) {
    fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut kmsg| kmsg.write_all(record.as_bytes()))
        .expect("write /dev/kmsg");
}

/// The messages of the kernel events seen until one contains `until`, or 10 s.
async fn kernel_events_until(
    events: &mut broadcast::Receiver<AgentEvent>,
    until: &str,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.iter().any(|message: &String| message.contains(until)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(AgentEvent::Kernel(kernel))) => seen.push(kernel.message),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_line_after_the_first_of_a_record_sends_nothing() {
    let controller = UdpSocket::bind("127.0.0.1:0").unwrap();
    controller
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let agent = Agent::start(AgentConfig {
        controller: Some(controller.local_addr().unwrap()),
        auth_key: AuthKey::HmacSha256(KEY.to_vec()),
        ..agent_config("injection-node")
    })
    .await
    .expect("agent starts (the tests must run as root)");
    let mut events = agent.subscribe();
    let nonce = std::process::id();

    // What a kernel message echoing a user-controlled string with a newline prints.
    let forged = format!("Kernel panic - not syncing: forged {nonce}");
    write_kmsg(&format!("lastgasp-test: hi\n{forged}\n"));
    // Then a record whose first line is a panic line: it is reported, and only it.
    let first_line = format!("Kernel panic - not syncing: first line {nonce}");
    write_kmsg(&format!("<0>{first_line}\n"));

    let seen = kernel_events_until(&mut events, &first_line).await;
    assert_eq!(seen, [first_line.as_str()], "kernel events");
    let mut datagram = [0u8; 4096];
    let len = controller
        .recv(&mut datagram)
        .expect("a last-gasp datagram");
    let report = wire::decode(&datagram[..len], &AuthKey::HmacSha256(KEY.to_vec())).unwrap();
    assert_eq!(
        (report.kind, report.message.as_str()),
        (ReportKind::KernelPanic, first_line.as_str()),
        "the first datagram is about the record's first line, none about the forged one"
    );
    agent.shutdown().await;
}
