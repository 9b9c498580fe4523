//! The controller's netconsole parsing path in-process, without sockets: reassembly and the
//! per-sender watch (classification, dedupe, history, crash titles) for 1,000 senders sending
//! ordinary plain and extended lines, with one node panicking in the middle. Prints lines/s with
//! each sender's history (from which crashes are titled) and with it reduced to one empty line,
//! so the cost of keeping history shows as a ratio from one run.
//! `cargo bench -p lastgasp-tests --bench netconsole_ingest`.

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use lastgasp::controller::netconsole::{Limits, PanicWatch, Reassembler, WatchLimits};

const SENDERS: u32 = 1_000;
const LINES: u64 = 1_000_000;
const RUNS: usize = 5;

fn sender(n: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 6665)
}

/// Every line as the kernel would send it: odd senders plain, even ones extended.
fn datagrams() -> Vec<(SocketAddr, Vec<u8>)> {
    (0..LINES)
        .map(|i| {
            let n = (i % u64::from(SENDERS)) as u32;
            let usec = 1_000_000 + i;
            let text = if i == LINES / 2 {
                "Kernel panic - not syncing: Fatal exception".to_owned()
            } else {
                format!("eth0: link up, 1000 Mbps, full duplex, message {i}")
            };
            let level = if i == LINES / 2 { 0 } else { 6 };
            let bytes = if n.is_multiple_of(2) {
                format!("{level},{i},{usec},-;{text}\n")
            } else {
                format!("[{:5}.{:06}] {text}\n", usec / 1_000_000, usec % 1_000_000)
            };
            (sender(n), bytes.into_bytes())
        })
        .collect()
}

/// Lines per second through reassembly and the watch.
fn run(datagrams: &[(SocketAddr, Vec<u8>)], limits: &WatchLimits) -> f64 {
    let mut reassembler = Reassembler::new(Limits::default());
    let mut watch: PanicWatch<IpAddr> = PanicWatch::new(limits.clone());
    let start = Instant::now();
    let mut reports = 0;
    for (from, bytes) in datagrams {
        // One clock read per datagram, as the ingest loop does.
        let now = Instant::now();
        let records = reassembler
            .push(*from, bytes, now)
            .expect("kernel datagrams parse");
        for record in &records {
            reports += watch.push(from.ip(), record, now).len();
        }
    }
    black_box(reports);
    datagrams.len() as f64 / start.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let datagrams = datagrams();
    let with_history = WatchLimits::default();
    let without_history = WatchLimits {
        history_lines: 1,
        history_bytes: 0,
        history_window: Duration::ZERO,
        ..WatchLimits::default()
    };
    let mut with = Vec::new();
    let mut without = Vec::new();
    // Alternated, so drift on a busy machine hits both alike.
    for _ in 0..RUNS {
        with.push(run(&datagrams, &with_history));
        without.push(run(&datagrams, &without_history));
    }
    let (with, without) = (median(with), median(without));
    println!("netconsole lines/s, {SENDERS} senders, {LINES} lines, median of {RUNS}:");
    println!("  history of 200 lines / 32 KiB per sender (crash titles): {with:.0}");
    println!("  history reduced to one empty line:                       {without:.0}");
    println!("  ratio: {:.2}", with / without);
}
