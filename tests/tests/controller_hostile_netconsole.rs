//! The controller's netconsole input under attack, for real: a controller against the real
//! kube-apiserver, as its ServiceAccount under `deploy/`'s RBAC through the fault proxy,
//! datagrams over UDP on loopback. Node B's InternalIP is 127.0.0.2 and node A's 127.0.0.3;
//! node A plays the attacker, node B the victim.
//!
//! Needs the binaries of `cargo xtask kube`.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lastgasp::{
    controller::{Controller, policy::Policy},
    wire::AuthKey,
};
use lastgasp_tests::{
    fixtures::{annotation, controller_config, sysrq_capture},
    kube::cluster::{Cluster, eventually},
    scrape,
};

const VICTIM: &str = "127.0.0.2";
const ATTACKER: &str = "127.0.0.3";
/// What the genuine panic's reason says, in its crash title or as its panic wrapper.
const GENUINE: &str = "sysrq triggered crash";

/// The real server with the two nodes (no boot id reported yet) and their pods in `team`.
async fn seeded() -> Cluster {
    let cluster = Cluster::start().await;
    cluster.namespace("team").await;
    cluster.node("node-a", ATTACKER, None).await;
    cluster.node("node-b", VICTIM, None).await;
    for (pod, node) in [("b-0", "node-b"), ("b-1", "node-b"), ("a-0", "node-a")] {
        cluster.pod("team", pod, node).await;
    }
    cluster
}

async fn start(cluster: &Cluster, policy: Policy) -> Controller {
    Controller::start(
        cluster.client_as("lastgasp-controller").await,
        controller_config(policy, AuthKey::HmacSha256(b"key".to_vec())),
    )
    .await
    .unwrap()
}

async fn termination_reason(cluster: &Cluster, pod: &str) -> Option<String> {
    let pod = cluster
        .get("pods", Some("team"), pod)
        .await
        .expect("the pod");
    annotation(&pod, "lastgasp.io/termination-reason").map(str::to_owned)
}

/// Sends the capture's datagrams of the given formats from `ip`, one port per format.
fn replay(ip: &str, formats: &[&str], to: SocketAddr) {
    let plain = UdpSocket::bind((ip, 0)).unwrap();
    let extended = UdpSocket::bind((ip, 0)).unwrap();
    for (format, payload) in sysrq_capture() {
        if !formats.contains(&format.as_str()) {
            continue;
        }
        let socket = if format == "plain" { &plain } else { &extended };
        socket.send_to(&payload, to).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The value of one exact series, 0 when absent.
fn value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn metric(controller: &Controller, series: &str) -> u64 {
    value(&scrape(controller.metrics_addr()).await, series)
}

async fn wait_for_metric(controller: &Controller, series: &str, at_least: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = metric(controller, series).await;
        if now >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {now}, not {at_least}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn dropped(reason: &str) -> String {
    format!(
        r#"lastgasp_controller_datagrams_dropped_total{{channel="netconsole",reason="{reason}"}}"#
    )
}

fn netconsole_incidents(framing: &str) -> String {
    kind_incidents("panic", framing)
}

fn kind_incidents(kind: &str, framing: &str) -> String {
    format!(
        r#"lastgasp_controller_netconsole_incidents_total{{kind="{kind}",framing="{framing}"}}"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_panic_lines_open_no_incident_and_a_plain_one_says_so() {
    let cluster = seeded().await;
    let controller = start(&cluster, Policy::Annotate).await;
    let to = controller.netconsole_addr();
    let extended = UdpSocket::bind((VICTIM, 0)).unwrap();
    let plain = UdpSocket::bind((VICTIM, 0)).unwrap();

    let forged = "Kernel panic - not syncing: forged";
    for datagram in [
        // A kernel message echoing a user string with a newline: the kernel escapes it.
        format!("6,100,5000000,-;innocent\\x0a{forged}\n"),
        // A /dev/kmsg writer asking for KERN_EMERG: facility 1 (user).
        format!("8,101,5000001,-;{forged}\n"),
        // Facility 0 but KERN_WARNING, not the KERN_EMERG of panic().
        format!("4,102,5000002,-;{forged}\n"),
        // A continuation fragment that starts a record.
        format!("0,103,5000003,c;{forged}\n"),
    ] {
        extended.send_to(datagram.as_bytes(), to).unwrap();
    }
    wait_for_metric(
        &controller,
        &dropped("not_kernel_level"),
        3,
        Duration::from_secs(5),
    )
    .await;
    wait_for_metric(
        &controller,
        &dropped("not_first_line"),
        1,
        Duration::from_secs(5),
    )
    .await;
    // Longer than an incident's first report takes (it is sent on the triggering line).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cluster.writes_to("/"),
        Vec::<String>::new(),
        "nothing written"
    );
    let metrics = scrape(controller.metrics_addr()).await;
    assert!(
        !metrics.contains("lastgasp_controller_netconsole_incidents_total{"),
        "{metrics}"
    );

    // Plain netconsole cannot tell an injected line: it opens an incident that says so.
    plain
        .send_to(format!("[    6.000000] {forged}\n").as_bytes(), to)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The genuine panic's extended record, from the same node, still opens its own incident,
    // which closes the plain one.
    replay(VICTIM, &["extended"], to);
    wait_for_metric(
        &controller,
        &netconsole_incidents("plain_line"),
        1,
        Duration::from_secs(5),
    )
    .await;
    wait_for_metric(
        &controller,
        &netconsole_incidents("extended_record"),
        1,
        Duration::from_secs(15),
    )
    .await;
    let metrics = scrape(controller.metrics_addr()).await;
    assert_eq!(value(&metrics, &netconsole_incidents("plain_line")), 1);
    assert_eq!(value(&metrics, &netconsole_incidents("extended_record")), 1);
    println!(
        "b-0 termination reason after both: {:?}",
        termination_reason(&cluster, "b-0").await
    );
    assert_eq!(termination_reason(&cluster, "a-0").await, None);
    assert_eq!(cluster.refused(), Vec::<String>::new());
}

/// The review's attack: one node floods extended datagrams of 64 KiB of short escaped lines
/// while another node panics.
#[tokio::test(flavor = "multi_thread")]
async fn an_escape_storm_does_not_hide_another_nodes_panic() {
    storm(65_000, "oversized").await;
}

/// The same with the largest datagrams the controller accepts: every line of every datagram
/// goes through the watch of the attacking node.
#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_kernel_sized_datagrams_does_not_hide_another_nodes_panic() {
    storm(1000, "rate_limited").await;
}

/// Floods extended datagrams of `size` bytes of `ab\x0a` lines from the attacker, at most
/// 100,000 in 6 s and 10,000/s, while the victim's captured panic is sent; prints the rates and
/// the victim's latency. `reason` is how the controller drops the storm's datagrams, if it does.
///
/// The rate stays below what this test's debug build reads on a loaded 2-core machine (about
/// 32,000/s at worst): beyond what the controller reads, the kernel drops datagrams from the
/// full socket buffer whoever sent them, the victim's included (README, "Under a storm").
async fn storm(size: usize, reason: &str) {
    const STORM_DATAGRAMS: u64 = 100_000;
    const STORM_TIME: Duration = Duration::from_secs(6);
    const STORM_RATE: f64 = 10_000.0;
    let cluster = seeded().await;
    let controller = start(&cluster, Policy::Annotate).await;
    let to = controller.netconsole_addr();
    let received = r#"lastgasp_controller_datagrams_received_total{channel="netconsole"}"#;
    let before = metric(&controller, received).await;

    let storm = std::thread::spawn(move || {
        let socket = UdpSocket::bind((ATTACKER, 0)).unwrap();
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < STORM_DATAGRAMS && started.elapsed() < STORM_TIME {
            while sent as f64 > STORM_RATE * started.elapsed().as_secs_f64() {
                std::thread::sleep(Duration::from_micros(50));
            }
            // Another record each time, so none is a repeat; exactly `size` bytes.
            let mut datagram = format!("4,{sent},{sent},-;").into_bytes();
            while datagram.len() + 7 <= size {
                datagram.extend_from_slice(b"ab\\x0a");
            }
            datagram.resize(size - 1, b'c');
            datagram.push(b'\n');
            if socket.send_to(&datagram, to).is_ok() {
                sent += 1;
            }
        }
        (sent, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let panicked = Instant::now();
    replay(VICTIM, &["plain", "extended"], to);
    let victim_datagrams = sysrq_capture().len() as u64;
    while !victim_marked(&cluster).await && panicked.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let latency = panicked.elapsed();
    let (sent, took) = storm.join().unwrap();
    // Let the controller drain what the kernel queued before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = scrape(controller.metrics_addr()).await;
    // The kernel drops what does not fit the socket's receive buffer; the rest is read.
    let read = (value(&metrics, received) - before).saturating_sub(victim_datagrams);
    println!(
        "storm of {size}-byte datagrams: {sent} sent from one address in {took:.2?} ({:.0}/s); \
         the controller read {read} of them ({:.0}/s, {:.1} %), dropped {} as {reason}; the \
         victim's panic was marked {latency:.2?} after its first datagram",
        sent as f64 / took.as_secs_f64(),
        read as f64 / took.as_secs_f64(),
        100.0 * read as f64 / sent as f64,
        value(&metrics, &dropped(reason)),
    );
    assert!(sent > 1000, "the storm ran ({sent} datagrams)");
    assert!(read > 0);
    assert!(latency < Duration::from_secs(5), "{latency:?}");
    assert_eq!(termination_reason(&cluster, "a-0").await, None);
    assert_eq!(cluster.refused(), Vec::<String>::new());
}

/// Both of node B's pods carry the genuine panic's reason.
async fn victim_marked(cluster: &Cluster) -> bool {
    for pod in ["b-0", "b-1"] {
        let reason = termination_reason(cluster, pod).await;
        if !reason.is_some_and(|reason| reason.contains(GENUINE)) {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn many_ports_of_one_address_cannot_evict_another_nodes_partial_line() {
    const PORTS: usize = 6000;
    let cluster = seeded().await;
    let controller = start(&cluster, Policy::Annotate).await;
    let to = controller.netconsole_addr();

    // The victim's plain target has sent half a line when the attack starts, its extended
    // target the first fragment of a record too long for one datagram.
    let victim = UdpSocket::bind((VICTIM, 0)).unwrap();
    victim
        .send_to(b"[    9.000000] Kernel panic - not sy", to)
        .unwrap();
    let victim_extended = UdpSocket::bind((VICTIM, 0)).unwrap();
    let body = format!(
        "watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [x:1] {}\n",
        "p".repeat(1500)
    );
    let header = |offset: usize| format!("0,500,8000000,-,ncfrag={offset}/{};", body.len());
    let cut = 1000 - header(0).len();
    let first = format!("{}{}", header(0), &body[..cut]);
    let second = format!("{}{}", header(cut), &body[cut..]);
    victim_extended.send_to(first.as_bytes(), to).unwrap();
    let started = Instant::now();
    // More ports than the controller tracks senders in all (4096), each with a partial line
    // of one byte (well within the address's byte budget).
    let attack = std::thread::spawn(move || {
        for port in 0..PORTS {
            let socket = UdpSocket::bind((ATTACKER, 0)).unwrap();
            socket.send_to(b"z", to).unwrap();
            if port % 500 == 0 {
                // Let the controller keep up rather than have the kernel drop datagrams.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    attack.join().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "within the line's 5 s lifetime: {took:?}"
    );

    victim_extended.send_to(second.as_bytes(), to).unwrap();
    victim
        .send_to(b"ncing: sysrq triggered crash\n", to)
        .unwrap();
    for i in 0..20 {
        victim
            .send_to(format!("[    9.00001{i}] context {i}\n").as_bytes(), to)
            .unwrap();
    }
    // Both survived: the record completed (the panic superseded it), the line was a panic.
    wait_for_metric(
        &controller,
        &kind_incidents("soft_lockup", "extended_record"),
        1,
        Duration::from_secs(5),
    )
    .await;
    wait_for_metric(
        &controller,
        &netconsole_incidents("plain_line"),
        1,
        Duration::from_secs(5),
    )
    .await;
    eventually("node-b's pods marked", Duration::from_secs(10), || {
        victim_marked(&cluster)
    })
    .await;
    assert_eq!(termination_reason(&cluster, "a-0").await, None);
    assert_eq!(cluster.refused(), Vec::<String>::new());
}
