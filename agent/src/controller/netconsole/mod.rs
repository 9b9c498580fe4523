//! Netconsole ingest: UDP datagrams from dying nodes to kernel failure reports.
//!
//! Two wire formats (kernel `Documentation/networking/netconsole.rst`,
//! `drivers/net/netconsole.c`), detected per datagram, neither ever sent in
//! datagrams over 1000 bytes (`MAX_PRINT_CHUNK`; larger ones are rejected):
//!
//! * Plain: raw console text. A console write longer than 1000 bytes
//!   (`MAX_PRINT_CHUNK`) is cut into datagrams with no header, so lines are
//!   rejoined per source address until their newline.
//! * Extended: `[release,]<facility*8+level>,<seq>,<usec>,<flags>[,...];<text>`
//!   with non-printable bytes as `\xNN` and ` KEY=value` dictionary lines
//!   after the text. A longer record is sent as fragments carrying
//!   `ncfrag=<offset>/<total>` and reassembled per (source address, seq).
//!
//! [`ByteBudget`] bounds the parsing work (bytes and lines) per source address
//! and second, so a flood from one node is dropped cheaply instead of starving
//! the others.
//! [`Reassembler`] turns datagrams into [`Record`]s, within per-address and
//! global memory budgets; [`PanicWatch`] turns records into [`KernelReport`]s,
//! classifying with [`crate::kernel_log`] only the line that starts a record
//! (and on extended records only the kernel's own, at the kernel's level: see
//! [`Framing`]), and dropping the copy of a message that arrives through the
//! other format.
//!
//! ```text
//! if !budget.admit(from.ip(), datagram.len(), now) { /* drop */ }
//! let records = reassembler.push(from, &datagram, now)?;
//! budget.charge_lines(from.ip(), /* lines in records */);
//! for record in &records {
//!     for (node, report) in watch.push(from.ip(), record, now) { /* act */ }
//! }
//! // Every second or so:
//! for (from, record) in reassembler.expire(now) { /* push as above */ }
//! for (node, report) in watch.poll(now) { /* act */ }
//! ```

mod budget;
mod dedupe;
mod incident;
mod parse;
mod reassembly;
mod summary;

pub use budget::{BudgetLimits, ByteBudget};
pub use incident::{Framing, KernelReport, PanicWatch, WatchLimits, WatchStats, kernel_levels};
pub use parse::{Format, ParseError, Record};
pub use reassembly::{Limits, MAX_PRINT_CHUNK, Reassembler, Stats};
pub use summary::DropSummary;

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};
    use std::time::{Duration, Instant};

    use base64::Engine as _;

    use super::*;
    use crate::kernel_log::KernelEventKind;

    const PANIC: &str = "Kernel panic - not syncing: sysrq triggered crash";

    struct Datagram {
        format: Format,
        payload: Vec<u8>,
        offset: Duration,
    }

    fn capture(name: &str) -> Vec<Datagram> {
        let path = format!(
            "{}/../../shared/testdata/netconsole/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json");
                let format = match v["format"].as_str() {
                    Some("plain") => Format::Plain,
                    Some("extended") => Format::Extended,
                    other => panic!("format {other:?}"),
                };
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(v["payload_b64"].as_str().expect("payload_b64"))
                    .expect("base64");
                let offset =
                    Duration::from_secs_f64(v["offset_ms"].as_f64().expect("offset_ms") / 1e3);
                Datagram {
                    format,
                    payload,
                    offset,
                }
            })
            .collect()
    }

    /// Replays the datagrams of the given formats, plain from port 6665 and
    /// extended from 6666 as two targets would send them; returns the
    /// records and every report.
    fn replay(name: &str, formats: &[Format]) -> (Vec<Record>, Vec<KernelReport>) {
        let node = IpAddr::from([10, 0, 2, 15]);
        let start = Instant::now();
        let mut reassembler = Reassembler::new(Limits::default());
        let mut watch = PanicWatch::new(WatchLimits::default());
        let (mut records, mut reports) = (Vec::new(), Vec::new());
        for d in capture(name).iter().filter(|d| formats.contains(&d.format)) {
            let port = if d.format == Format::Plain {
                6665
            } else {
                6666
            };
            let now = start + d.offset;
            let parsed = reassembler
                .push(SocketAddr::new(node, port), &d.payload, now)
                .expect("valid datagram");
            assert_eq!(parsed.len(), 1, "{:?}", String::from_utf8_lossy(&d.payload));
            for record in parsed {
                assert_eq!(record.format, d.format, "{record:?}");
                for (from, report) in watch.push(node, &record, now) {
                    assert_eq!(from, node);
                    reports.push(report);
                }
                records.push(record);
            }
        }
        let later = start + Duration::from_secs(60);
        assert!(reassembler.expire(later).is_empty());
        assert_eq!(reassembler.stats().errors, 0);
        reports.extend(watch.poll(later).into_iter().map(|(_, r)| r));
        (records, reports)
    }

    /// Exactly one panic incident, reported at once and completed once;
    /// returns its final report.
    fn one_panic(reports: &[KernelReport]) -> KernelReport {
        assert!(!reports.is_empty());
        for r in reports {
            assert_eq!(
                (r.kind, r.message.as_str()),
                (KernelEventKind::Panic, PANIC)
            );
            assert_eq!(r.first_seen, reports[0].first_seen, "one incident");
        }
        assert!(reports[0].context.is_empty() && !reports[0].complete);
        let complete: Vec<_> = reports.iter().filter(|r| r.complete).collect();
        assert_eq!(complete.len(), 1);
        assert_eq!(reports.last(), Some(complete[0]));
        complete[0].clone()
    }

    #[test]
    fn captures_give_one_panic_whatever_the_formats() {
        for name in [
            "debian-6.1-cloud-sysrq-crash.jsonl",
            "debian-6.1-cloud-kmsg-and-sysrq.jsonl",
        ] {
            let (_, plain) = replay(name, &[Format::Plain]);
            let (_, extended) = replay(name, &[Format::Extended]);
            let (_, both) = replay(name, &[Format::Plain, Format::Extended]);
            let mut plain = one_panic(&plain);
            let extended = one_panic(&extended);
            let both = one_panic(&both);

            assert_eq!(plain.context.len(), 20, "{name}");
            assert_eq!(plain.context[..3], ["CPU: 0 PID: 1 Comm: init Not tainted 6.1.0-56-cloud-amd64 #1  Debian 6.1.192-2".to_owned(), "Hardware name: QEMU Standard PC (i440FX + PIIX, 1996), BIOS 1.16.2-debian-1.16.2-1 04/01/2014".to_owned(), "Call Trace:".to_owned()]);
            assert!(
                plain
                    .context
                    .iter()
                    .any(|l| l == " sysrq_handle_crash+0x16/0x20")
            );
            assert!(plain.context.iter().any(|l| l == " panic+0x118/0x2f4"));
            assert_eq!(plain.release, None);
            // The real kernel prints the panic at facility 0, KERN_EMERG; the plain copy
            // cannot tell, and when both arrive the extended copy upgrades the incident.
            assert_eq!(plain.framing, Framing::PlainLine);
            assert_eq!(extended.framing, Framing::ExtendedRecord);
            assert_eq!(both.framing, Framing::ExtendedRecord);

            // Identical apart from when the first copy arrived and the framing.
            plain.framing = Framing::ExtendedRecord;
            plain.first_seen = extended.first_seen;
            assert_eq!(plain, extended, "{name}");
            plain.first_seen = both.first_seen;
            assert_eq!(plain, both, "{name}");
        }
    }

    #[test]
    fn kmsg_user_line_has_facility_and_level() {
        let (records, _) = replay(
            "debian-6.1-cloud-kmsg-and-sysrq.jsonl",
            &[Format::Plain, Format::Extended],
        );
        let user: Vec<&Record> = records
            .iter()
            .filter(|r| r.message() == "short-test hello")
            .collect();
        assert_eq!(user.len(), 2);
        let (plain, extended) = (user[0], user[1]);
        assert_eq!(plain.format, Format::Plain);
        assert_eq!((plain.facility, plain.level, plain.seq), (None, None, None));
        assert_eq!(extended.format, Format::Extended);
        assert_eq!((extended.facility, extended.level), (Some(1), Some(4)));
        assert_eq!(extended.seq, Some(365));
        // The dedupe key: same message and timestamp in both formats.
        assert_eq!(plain.usec, Some(4_066_547));
        assert_eq!(extended.usec, plain.usec);
    }
}
