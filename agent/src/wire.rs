//! The last-gasp datagram a node agent sends to the controller over UDP.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "LGSP" (0x4c 0x47 0x53 0x50)
//! 4       1     version, currently 1
//! 5       1     auth scheme: 0 = none, 1 = HMAC-SHA256
//! 6       2     payload length N, unsigned big-endian
//! 8       N     payload: UTF-8 JSON object (below)
//! 8+N     M     authentication tag: M = 0 for scheme 0; M = 32 for scheme 1,
//!               HMAC-SHA256 with the shared key over bytes [0, 8+N)
//! ```
//!
//! The payload is one JSON object:
//!
//! ```text
//! {"node": string, "boot_id": string, "seq": u64, "sent_at_ms": u64 (Unix ms),
//!  "kind": string ("kernel_panic" | "kernel_oops" | "kernel_page_fault" | "kernel_gpf" |
//!          "kernel_bug" | "kernel_soft_lockup" | "kernel_hard_lockup" | "kernel_hung_task" |
//!          "kernel_rcu_stall" | "kernel_oom_kill"),
//!  "source": string ("console" | "kprobe" | "fentry" | "pstore"),
//!  "message": string, "context": [string], "kernel_release": string | null,
//!  "event_at_ms": u64 (Unix ms, optional), "event_boot_id": string (optional)}
//! ```
//!
//! `node`, `boot_id` and `seq` name the sender: its current boot, whose sequence
//! numbers strictly increase. A live report (`console`, `kprobe`, `fentry`) is about
//! that boot, now. A delayed report (`pstore`: a crash record the kernel kept across a
//! reboot and the agent found on start) is about an earlier boot: `event_at_ms` is
//! when the kernel wrote the record (by the node's clock), and `event_boot_id`, when
//! the agent knows it, is the boot that crashed. For a delayed report `context`
//! holds the lines before `message` and `kernel_release` is null (the crashed
//! kernel's release is not known). Both fields are left out of live reports.
//!
//! Receivers ignore unknown fields, and treat a missing `context` as empty and
//! missing `kernel_release`, `event_at_ms` and `event_boot_id` as null. A `kind` or
//! `source` string they do not know decodes as [`ReportKind::Unknown`] or
//! [`ReportSource::Unknown`] (any other JSON type there is a decoding error); neither is
//! ever encoded.
//!
//! A whole datagram is at most [`MAX_DATAGRAM`] (1400) bytes, which fits an
//! unfragmented packet on a 1500-byte MTU. When a report does not fit,
//! [`encode`] drops `context` lines from the end until it does, and if it still
//! does not fit with no context left, cuts `message` at a UTF-8 character
//! boundary. If the remaining fields alone are too large, encoding fails.
//! [`decode`] rejects datagrams longer than the limit.
//!
//! The auth scheme is fixed by configuration: a receiver with a key rejects
//! unauthenticated datagrams and one without a key rejects authenticated ones.
//! The tag is verified in constant time. Replay protection is not part of the
//! format; the controller tracks `(node, boot_id, seq)`.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::kernel_log::KernelEventKind;

/// First four bytes of every datagram.
pub const MAGIC: [u8; 4] = *b"LGSP";
/// Format version written and accepted.
pub const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 8;
/// Upper bound on a whole datagram, header and tag included.
pub const MAX_DATAGRAM: usize = 1400;
/// Length of an HMAC-SHA256 tag.
pub const HMAC_SHA256_TAG_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// One last-gasp report: the datagram payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    pub boot_id: String,
    /// Per-boot sequence number.
    pub seq: u64,
    /// Unix time in milliseconds when the agent built the datagram.
    pub sent_at_ms: u64,
    pub kind: ReportKind,
    pub source: ReportSource,
    pub message: String,
    /// Console lines around the event, oldest first.
    #[serde(default)]
    pub context: Vec<String>,
    pub kernel_release: Option<String>,
    /// Delayed reports: Unix time in milliseconds when the reported event happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_at_ms: Option<u64>,
    /// Delayed reports: the boot the event happened in, when the agent knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_boot_id: Option<String>,
    /// The kernel stack at `panic()` as the `panic()` probe saw it, innermost first, each
    /// symbolised like a call-trace line: `tcp_v4_rcv+0x1c/0x2e0 [module]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<String>,
}

/// What a report is about: the kernel failure of its `message`, one name for each
/// [`KernelEventKind`]. These are also the `kind` of the agent's log lines about them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportKind {
    KernelPanic,
    KernelOops,
    KernelPageFault,
    KernelGpf,
    KernelBug,
    KernelSoftLockup,
    KernelHardLockup,
    KernelHungTask,
    KernelRcuStall,
    KernelOomKill,
    /// A name this build does not know (a newer agent's, or made up): decoded so the receiver
    /// can refuse it as such; never encoded.
    #[serde(other, skip_serializing)]
    Unknown,
}

impl ReportKind {
    /// The name on the wire; `unknown` for [`ReportKind::Unknown`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KernelPanic => "kernel_panic",
            Self::KernelOops => "kernel_oops",
            Self::KernelPageFault => "kernel_page_fault",
            Self::KernelGpf => "kernel_gpf",
            Self::KernelBug => "kernel_bug",
            Self::KernelSoftLockup => "kernel_soft_lockup",
            Self::KernelHardLockup => "kernel_hard_lockup",
            Self::KernelHungTask => "kernel_hung_task",
            Self::KernelRcuStall => "kernel_rcu_stall",
            Self::KernelOomKill => "kernel_oom_kill",
            Self::Unknown => "unknown",
        }
    }

    /// The kernel failure it names; `None` for [`ReportKind::Unknown`].
    pub fn kernel_kind(self) -> Option<KernelEventKind> {
        Some(match self {
            Self::KernelPanic => KernelEventKind::Panic,
            Self::KernelOops => KernelEventKind::Oops,
            Self::KernelPageFault => KernelEventKind::PageFault,
            Self::KernelGpf => KernelEventKind::GeneralProtectionFault,
            Self::KernelBug => KernelEventKind::KernelBug,
            Self::KernelSoftLockup => KernelEventKind::SoftLockup,
            Self::KernelHardLockup => KernelEventKind::HardLockup,
            Self::KernelHungTask => KernelEventKind::HungTask,
            Self::KernelRcuStall => KernelEventKind::RcuStall,
            Self::KernelOomKill => KernelEventKind::OutOfMemory,
            Self::Unknown => return None,
        })
    }
}

impl From<KernelEventKind> for ReportKind {
    fn from(kind: KernelEventKind) -> Self {
        match kind {
            KernelEventKind::Panic => Self::KernelPanic,
            KernelEventKind::Oops => Self::KernelOops,
            KernelEventKind::PageFault => Self::KernelPageFault,
            KernelEventKind::GeneralProtectionFault => Self::KernelGpf,
            KernelEventKind::KernelBug => Self::KernelBug,
            KernelEventKind::SoftLockup => Self::KernelSoftLockup,
            KernelEventKind::HardLockup => Self::KernelHardLockup,
            KernelEventKind::HungTask => Self::KernelHungTask,
            KernelEventKind::RcuStall => Self::KernelRcuStall,
            KernelEventKind::OutOfMemory => Self::KernelOomKill,
        }
    }
}

/// Where the agent saw what it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportSource {
    /// A console line (the printk `console` tracepoint); a live report.
    Console,
    /// The kprobe on `panic()`; a live report.
    Kprobe,
    /// The fentry program on `panic()`; a live report.
    Fentry,
    /// A pstore record of an earlier boot, found after the reboot; a delayed report.
    Pstore,
    /// A name this build does not know: decoded so the receiver can take it as a live report
    /// it trusts least, like `console`; never encoded.
    #[serde(other, skip_serializing)]
    Unknown,
}

impl ReportSource {
    /// The name on the wire; `unknown` for [`ReportSource::Unknown`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Console => "console",
            Self::Kprobe => "kprobe",
            Self::Fentry => "fentry",
            Self::Pstore => "pstore",
            Self::Unknown => "unknown",
        }
    }

    /// A probe on `panic()` itself, as opposed to console text or a record.
    pub fn is_panic_probe(self) -> bool {
        matches!(self, Self::Kprobe | Self::Fentry)
    }
}

/// Authentication scheme carried in header byte 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AuthScheme {
    None = 0,
    HmacSha256 = 1,
}

impl AuthScheme {
    /// Parses the header byte.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::None),
            1 => Some(Self::HmacSha256),
            _ => None,
        }
    }

    /// Length of the tag that follows the payload.
    pub fn tag_len(self) -> usize {
        match self {
            Self::None => 0,
            Self::HmacSha256 => HMAC_SHA256_TAG_LEN,
        }
    }
}

impl fmt::Display for AuthScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::HmacSha256 => "hmac-sha256",
        })
    }
}

/// Key material for the configured scheme.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthKey {
    /// No authentication (scheme 0).
    None,
    /// Shared secret for HMAC-SHA256 (scheme 1).
    HmacSha256(Vec<u8>),
}

/// The shortest HMAC key accepted: a key an attacker can guess signs reports for them.
pub const MIN_KEY_LEN: usize = 16;

/// Why a key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the key has {0} bytes; at least {MIN_KEY_LEN} are needed (e.g. `head -c 32 /dev/urandom`)"
)]
pub struct KeyTooShort(pub usize);

impl AuthKey {
    /// An HMAC-SHA256 key of at least [`MIN_KEY_LEN`] bytes.
    pub fn hmac(secret: Vec<u8>) -> Result<Self, KeyTooShort> {
        if secret.len() < MIN_KEY_LEN {
            return Err(KeyTooShort(secret.len()));
        }
        Ok(Self::HmacSha256(secret))
    }

    /// The scheme this key produces and requires.
    pub fn scheme(&self) -> AuthScheme {
        match self {
            Self::None => AuthScheme::None,
            Self::HmacSha256(_) => AuthScheme::HmacSha256,
        }
    }
}

// Never print the secret.
impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("AuthKey::None"),
            Self::HmacSha256(_) => f.write_str("AuthKey::HmacSha256(<redacted>)"),
        }
    }
}

/// Why a datagram could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("datagram too short for its header and tag")]
    TooShort,
    #[error("bad magic, not a last-gasp datagram")]
    BadMagic,
    #[error("unsupported datagram version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown auth scheme {0}")]
    UnknownAuthScheme(u8),
    #[error("auth scheme mismatch: expected {expected}, got {got}")]
    AuthSchemeMismatch {
        expected: AuthScheme,
        got: AuthScheme,
    },
    #[error("payload length mismatch: header declares {declared} bytes, datagram carries {actual}")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("authentication tag does not match")]
    BadMac,
    #[error("invalid payload JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("datagram exceeds {MAX_DATAGRAM} bytes")]
    TooLarge,
}

/// Builds a datagram for `report`, shrinking it to [`MAX_DATAGRAM`] bytes as
/// described in the module documentation.
pub fn encode(report: &Report, key: &AuthKey) -> Result<Vec<u8>, WireError> {
    let scheme = key.scheme();
    let payload = fit_payload(report, MAX_DATAGRAM - HEADER_LEN - scheme.tag_len())?;
    // fit_payload keeps the payload under MAX_DATAGRAM, far below u16::MAX.
    let len = payload.len() as u16;

    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + scheme.tag_len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(scheme as u8);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
    if let AuthKey::HmacSha256(secret) = key {
        let mut mac = new_mac(secret);
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
    }
    Ok(out)
}

/// Checks and parses a datagram received from an agent.
pub fn decode(datagram: &[u8], key: &AuthKey) -> Result<Report, WireError> {
    let Some((header, rest)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(WireError::TooShort);
    };
    if header[..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    if header[4] != VERSION {
        return Err(WireError::UnsupportedVersion(header[4]));
    }
    let got = AuthScheme::from_byte(header[5]).ok_or(WireError::UnknownAuthScheme(header[5]))?;
    let expected = key.scheme();
    if got != expected {
        return Err(WireError::AuthSchemeMismatch { expected, got });
    }
    if datagram.len() > MAX_DATAGRAM {
        return Err(WireError::TooLarge);
    }
    let Some(actual) = rest.len().checked_sub(got.tag_len()) else {
        return Err(WireError::TooShort);
    };
    let declared = usize::from(u16::from_be_bytes([header[6], header[7]]));
    if declared != actual {
        return Err(WireError::LengthMismatch { declared, actual });
    }
    let (payload, tag) = rest.split_at(declared);
    if let AuthKey::HmacSha256(secret) = key {
        let mut mac = new_mac(secret);
        mac.update(&datagram[..HEADER_LEN + declared]);
        mac.verify_slice(tag).map_err(|_| WireError::BadMac)?;
    }
    Ok(serde_json::from_slice(payload)?)
}

fn new_mac(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length")
}

/// Drops `context` lines from the front (the oldest) until `report` encodes with `key`
/// without losing any more, for reports whose last lines say most: a delayed report's
/// lines leading up to the panic. ([`encode`] itself keeps the first lines.)
pub fn keep_latest_context(report: &mut Report, key: &AuthKey) -> Result<(), WireError> {
    let budget = MAX_DATAGRAM - HEADER_LEN - key.scheme().tag_len();
    let context = std::mem::take(&mut report.context);
    let total = context.len();
    // Measured with the widest `seq` and `sent_at_ms`, which the sender stamps later: else
    // the stamped report may not fit, and `encode` would cut the newest lines instead.
    let mut widest = report.clone();
    (widest.seq, widest.sent_at_ms) = (u64::MAX, u64::MAX);
    let keep = largest_fitting(total, |n| {
        widest.context = context[total - n..].to_vec();
        Ok(serde_json::to_vec(&widest)?.len() <= budget)
    })?
    .unwrap_or(0);
    report.context = context[total - keep..].to_vec();
    Ok(())
}

/// Serialises `report` in at most `budget` bytes: keeps the longest prefix of
/// `context` that fits, else no context and the longest prefix of `frames` (innermost
/// first), else neither and the longest `message` prefix.
fn fit_payload(report: &Report, budget: usize) -> Result<Vec<u8>, WireError> {
    let full = serde_json::to_vec(report)?;
    if full.len() <= budget {
        return Ok(full);
    }

    let mut trimmed = report.clone();
    let context = std::mem::take(&mut trimmed.context);
    let keep = largest_fitting(context.len(), |n| {
        trimmed.context = context[..n].to_vec();
        Ok(serde_json::to_vec(&trimmed)?.len() <= budget)
    })?;
    if let Some(n) = keep {
        trimmed.context = context[..n].to_vec();
        return Ok(serde_json::to_vec(&trimmed)?);
    }

    trimmed.context.clear();
    let frames = std::mem::take(&mut trimmed.frames);
    let keep = largest_fitting(frames.len(), |n| {
        trimmed.frames = frames[..n].to_vec();
        Ok(serde_json::to_vec(&trimmed)?.len() <= budget)
    })?;
    if let Some(n) = keep {
        trimmed.frames = frames[..n].to_vec();
        return Ok(serde_json::to_vec(&trimmed)?);
    }

    trimmed.frames.clear();
    let message = std::mem::take(&mut trimmed.message);
    let keep = largest_fitting(message.len(), |n| {
        trimmed.message = message[..message.floor_char_boundary(n)].to_owned();
        Ok(serde_json::to_vec(&trimmed)?.len() <= budget)
    })?;
    let n = keep.ok_or(WireError::TooLarge)?;
    trimmed.message = message[..message.floor_char_boundary(n)].to_owned();
    Ok(serde_json::to_vec(&trimmed)?)
}

/// Largest `n` in `0..=max` for which `fits(n)` holds, by binary search;
/// `fits` must be monotone (true up to some `n`, false after). `None` when
/// even `fits(0)` is false.
fn largest_fitting(
    max: usize,
    mut fits: impl FnMut(usize) -> Result<bool, WireError>,
) -> Result<Option<usize>, WireError> {
    if !fits(0)? {
        return Ok(None);
    }
    // Invariant: fits(lo), and nothing at or above `hi` is known to fit.
    let (mut lo, mut hi) = (0, max + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuthKey {
        AuthKey::HmacSha256(b"correct horse battery staple".to_vec())
    }

    fn report() -> Report {
        Report {
            node: "node-a".into(),
            boot_id: "0b6f5c2e-6f0e-4d6a-9a43-3c7b1c9e2f10".into(),
            seq: 7,
            sent_at_ms: 1_732_000_000_123,
            kind: ReportKind::KernelPanic,
            source: ReportSource::Console,
            message: "Kernel panic - not syncing: sysrq triggered crash".into(),
            context: vec![
                "sysrq: Trigger a crash".into(),
                "CPU: 0 PID: 1 Comm: init Not tainted 6.1.0-56-cloud-amd64 #1".into(),
            ],
            kernel_release: Some("6.1.0-56-cloud-amd64".into()),
            event_at_ms: None,
            event_boot_id: None,
            frames: Vec::new(),
        }
    }

    /// A datagram with an arbitrary payload, authenticated when `key` is.
    fn raw(payload: &[u8], key: &AuthKey) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(VERSION);
        out.push(key.scheme() as u8);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        if let AuthKey::HmacSha256(secret) = key {
            let mut mac = new_mac(secret);
            mac.update(&out);
            out.extend_from_slice(&mac.finalize().into_bytes());
        }
        out
    }

    #[test]
    fn round_trip_both_schemes() {
        for key in [AuthKey::None, key()] {
            let bytes = encode(&report(), &key).unwrap();
            assert_eq!(&bytes[..4], b"LGSP");
            assert_eq!(bytes[4], 1);
            assert_eq!(bytes[5], key.scheme() as u8);
            let n = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
            assert_eq!(bytes.len(), HEADER_LEN + n + key.scheme().tag_len());
            assert_eq!(decode(&bytes, &key).unwrap(), report());
        }
    }

    #[test]
    fn round_trip_without_optional_values() {
        let r = Report {
            context: Vec::new(),
            kernel_release: None,
            ..report()
        };
        assert_eq!(decode(&encode(&r, &key()).unwrap(), &key()).unwrap(), r);
    }

    #[test]
    fn encode_matches_known_answer() {
        // Expected bytes computed independently (Python hmac/hashlib).
        let r = Report {
            node: "n1".into(),
            boot_id: "b1".into(),
            seq: 1,
            sent_at_ms: 2,
            kind: ReportKind::KernelPanic,
            source: ReportSource::Console,
            message: "m".into(),
            context: vec!["c".into()],
            kernel_release: None,
            event_at_ms: None,
            event_boot_id: None,
            frames: Vec::new(),
        };
        let payload = br#"{"node":"n1","boot_id":"b1","seq":1,"sent_at_ms":2,"kind":"kernel_panic","source":"console","message":"m","context":["c"],"kernel_release":null}"#;
        let bytes = encode(&r, &AuthKey::HmacSha256(b"k".to_vec())).unwrap();
        assert_eq!(bytes[..8], [b'L', b'G', b'S', b'P', 1, 1, 0, 144]);
        assert_eq!(&bytes[8..152], payload);
        let tag: String = bytes[152..].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            tag,
            "120f17b74d859bfd03fbd322a1daf2bfe3df04821f8f319f350f513c8b682746"
        );
    }

    #[test]
    fn round_trip_delayed_report() {
        let r = Report {
            source: ReportSource::Pstore,
            kernel_release: None,
            event_at_ms: Some(1_731_999_000_456),
            event_boot_id: Some("9a8b7c6d-0000-4000-8000-000000000001".into()),
            frames: Vec::new(),
            ..report()
        };
        let bytes = encode(&r, &key()).unwrap();
        let payload = String::from_utf8_lossy(&bytes[HEADER_LEN..bytes.len() - 32]).into_owned();
        assert!(
            payload.contains(r#""event_at_ms":1731999000456"#),
            "{payload}"
        );
        assert_eq!(decode(&bytes, &key()).unwrap(), r);
        // A live report carries neither field, so older receivers see the same bytes as before.
        let live = encode(&report(), &AuthKey::None).unwrap();
        assert!(!String::from_utf8_lossy(&live).contains("event_"));
    }

    #[test]
    fn keep_latest_context_drops_the_oldest_lines() {
        let mut r = report();
        r.context = (0..200)
            .map(|i| format!("[  {i:3}.000000] line {i} before the panic"))
            .collect();
        let all = r.context.clone();
        for key in [AuthKey::None, key()] {
            let mut trimmed = r.clone();
            keep_latest_context(&mut trimmed, &key).unwrap();
            let kept = trimmed.context.len();
            assert!(kept > 0 && kept < all.len());
            assert_eq!(trimmed.context, all[all.len() - kept..]);
            // Nothing more is lost on the wire, and one more line would not have fit.
            assert_eq!(
                decode(&encode(&trimmed, &key).unwrap(), &key).unwrap(),
                trimmed
            );
            // (Measured as the sender will stamp it: the widest sequence number and time.)
            let mut more = trimmed.clone();
            more.context.insert(0, all[all.len() - kept - 1].clone());
            (more.seq, more.sent_at_ms) = (u64::MAX, u64::MAX);
            let budget = MAX_DATAGRAM - HEADER_LEN - key.scheme().tag_len();
            assert!(serde_json::to_vec(&more).unwrap().len() > budget);
            let mut stamped = trimmed.clone();
            (stamped.seq, stamped.sent_at_ms) = (u64::MAX, u64::MAX);
            assert_eq!(
                decode(&encode(&stamped, &key).unwrap(), &key).unwrap(),
                stamped,
                "still whole once stamped"
            );
        }
        // A report that fits keeps every line.
        let mut small = report();
        keep_latest_context(&mut small, &AuthKey::None).unwrap();
        assert_eq!(small, report());
    }

    #[test]
    fn ignores_unknown_fields_and_defaults_optional_ones() {
        let json = br#"{"node":"n","boot_id":"b","seq":1,"sent_at_ms":2,"kind":"kernel_oops",
            "source":"kprobe","message":"m","future_field":{"x":[1,2]}}"#;
        let r = decode(&raw(json, &AuthKey::None), &AuthKey::None).unwrap();
        assert_eq!(r.node, "n");
        assert_eq!(
            (r.kind, r.source),
            (ReportKind::KernelOops, ReportSource::Kprobe)
        );
        assert!(r.context.is_empty());
        assert_eq!(r.kernel_release, None);
        assert_eq!((r.event_at_ms, r.event_boot_id), (None, None));
    }

    /// The names every agent so far has sent, byte for byte.
    const KINDS: [(ReportKind, &str); 10] = [
        (ReportKind::KernelPanic, "kernel_panic"),
        (ReportKind::KernelOops, "kernel_oops"),
        (ReportKind::KernelPageFault, "kernel_page_fault"),
        (ReportKind::KernelGpf, "kernel_gpf"),
        (ReportKind::KernelBug, "kernel_bug"),
        (ReportKind::KernelSoftLockup, "kernel_soft_lockup"),
        (ReportKind::KernelHardLockup, "kernel_hard_lockup"),
        (ReportKind::KernelHungTask, "kernel_hung_task"),
        (ReportKind::KernelRcuStall, "kernel_rcu_stall"),
        (ReportKind::KernelOomKill, "kernel_oom_kill"),
    ];
    const SOURCES: [(ReportSource, &str); 4] = [
        (ReportSource::Console, "console"),
        (ReportSource::Kprobe, "kprobe"),
        (ReportSource::Fentry, "fentry"),
        (ReportSource::Pstore, "pstore"),
    ];

    #[test]
    fn kind_and_source_names_are_unchanged() {
        for (kind, name) in KINDS {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<ReportKind>(&format!("\"{name}\"")).unwrap(),
                kind
            );
            assert_eq!(kind.as_str(), name);
        }
        for (source, name) in SOURCES {
            assert_eq!(
                serde_json::to_string(&source).unwrap(),
                format!("\"{name}\"")
            );
            assert_eq!(
                serde_json::from_str::<ReportSource>(&format!("\"{name}\"")).unwrap(),
                source
            );
            assert_eq!(source.as_str(), name);
        }
        // Each kernel failure has its own name, and maps back to itself.
        for kernel in KernelEventKind::ALL {
            let kind = ReportKind::from(kernel);
            assert!(KINDS.iter().any(|&(k, _)| k == kind), "{kind:?}");
            assert_eq!(kind.kernel_kind(), Some(kernel));
        }
        assert_eq!(ReportKind::Unknown.kernel_kind(), None);
    }

    #[test]
    fn unknown_names_decode_as_unknown_and_never_encode() {
        let json = br#"{"node":"n","boot_id":"b","seq":1,"sent_at_ms":2,"kind":"kernel_warning",
            "source":"tracepoint","message":"m"}"#;
        let r = decode(&raw(json, &key()), &key()).unwrap();
        assert_eq!(
            (r.kind, r.source),
            (ReportKind::Unknown, ReportSource::Unknown)
        );
        // Names are case-sensitive, as before.
        let json = br#"{"node":"n","boot_id":"b","seq":1,"sent_at_ms":2,"kind":"KERNEL_PANIC",
            "source":"Console","message":"m"}"#;
        let r = decode(&raw(json, &key()), &key()).unwrap();
        assert_eq!(
            (r.kind, r.source),
            (ReportKind::Unknown, ReportSource::Unknown)
        );
        for r in [
            Report {
                kind: ReportKind::Unknown,
                ..report()
            },
            Report {
                source: ReportSource::Unknown,
                ..report()
            },
        ] {
            assert!(matches!(encode(&r, &key()), Err(WireError::Json(_))));
        }
    }

    #[test]
    fn kind_and_source_of_another_json_type_are_errors() {
        for (kind, source) in [
            ("5", r#""console""#),
            ("null", r#""console""#),
            (r#"{"kernel_panic":1}"#, r#""console""#),
            (r#"["kernel_panic"]"#, r#""console""#),
            (r#""kernel_panic""#, "true"),
            (r#""kernel_panic""#, r#"{"pstore":1}"#),
        ] {
            let json = format!(
                r#"{{"node":"n","boot_id":"b","seq":1,"sent_at_ms":2,"kind":{kind},"source":{source},"message":"m"}}"#
            );
            assert!(
                matches!(
                    decode(&raw(json.as_bytes(), &AuthKey::None), &AuthKey::None),
                    Err(WireError::Json(_))
                ),
                "{json}"
            );
        }
    }

    #[test]
    fn too_short() {
        for len in 0..HEADER_LEN {
            let bytes = encode(&report(), &AuthKey::None).unwrap();
            assert!(matches!(
                decode(&bytes[..len], &AuthKey::None),
                Err(WireError::TooShort)
            ));
        }
        // Header of an authenticated datagram, but no room for the tag.
        let bytes = encode(&report(), &key()).unwrap();
        assert!(matches!(
            decode(&bytes[..HEADER_LEN + 31], &key()),
            Err(WireError::TooShort)
        ));
    }

    #[test]
    fn bad_magic() {
        let mut bytes = encode(&report(), &AuthKey::None).unwrap();
        bytes[0] = b'X';
        assert!(matches!(
            decode(&bytes, &AuthKey::None),
            Err(WireError::BadMagic)
        ));
    }

    #[test]
    fn unsupported_version() {
        let mut bytes = encode(&report(), &AuthKey::None).unwrap();
        bytes[4] = 2;
        assert!(matches!(
            decode(&bytes, &AuthKey::None),
            Err(WireError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn unknown_auth_scheme() {
        let mut bytes = encode(&report(), &AuthKey::None).unwrap();
        bytes[5] = 9;
        assert!(matches!(
            decode(&bytes, &AuthKey::None),
            Err(WireError::UnknownAuthScheme(9))
        ));
    }

    #[test]
    fn auth_scheme_mismatch_both_ways() {
        let plain = encode(&report(), &AuthKey::None).unwrap();
        assert!(matches!(
            decode(&plain, &key()),
            Err(WireError::AuthSchemeMismatch {
                expected: AuthScheme::HmacSha256,
                got: AuthScheme::None
            })
        ));
        let signed = encode(&report(), &key()).unwrap();
        assert!(matches!(
            decode(&signed, &AuthKey::None),
            Err(WireError::AuthSchemeMismatch {
                expected: AuthScheme::None,
                got: AuthScheme::HmacSha256
            })
        ));
    }

    #[test]
    fn length_mismatch() {
        for key in [AuthKey::None, key()] {
            let bytes = encode(&report(), &key).unwrap();
            let declared = bytes.len() - HEADER_LEN - key.scheme().tag_len();

            let mut longer = bytes.clone();
            longer.push(0);
            match decode(&longer, &key) {
                Err(WireError::LengthMismatch {
                    declared: d,
                    actual,
                }) => {
                    assert_eq!((d, actual), (declared, declared + 1));
                }
                other => panic!("{other:?}"),
            }
            match decode(&bytes[..bytes.len() - 1], &key) {
                Err(WireError::LengthMismatch {
                    declared: d,
                    actual,
                }) => {
                    assert_eq!((d, actual), (declared, declared - 1));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bad_mac_with_wrong_key() {
        let bytes = encode(&report(), &key()).unwrap();
        let other = AuthKey::HmacSha256(b"another key".to_vec());
        assert!(matches!(decode(&bytes, &other), Err(WireError::BadMac)));
    }

    #[test]
    fn tampering_any_byte_is_rejected() {
        let bytes = encode(&report(), &key()).unwrap();
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80] {
                let mut t = bytes.clone();
                t[i] ^= flip;
                let err = decode(&t, &key()).unwrap_err();
                // Payload and tag bytes are caught by the MAC itself; header
                // bytes fail their own checks first (the MAC covers them too).
                if i >= HEADER_LEN {
                    assert!(matches!(err, WireError::BadMac), "byte {i}: {err:?}");
                }
            }
        }
    }

    #[test]
    fn json_errors() {
        for key in [AuthKey::None, key()] {
            for payload in [&b"not json"[..], b"{\"node\":\"n\"}", b"\xff\xfe"] {
                assert!(matches!(
                    decode(&raw(payload, &key), &key),
                    Err(WireError::Json(_))
                ));
            }
        }
    }

    #[test]
    fn too_large() {
        let oversized = raw(&[b' '; MAX_DATAGRAM], &AuthKey::None);
        assert!(matches!(
            decode(&oversized, &AuthKey::None),
            Err(WireError::TooLarge)
        ));
        // Fields that are never shortened cannot exceed the limit.
        let r = Report {
            node: "n".repeat(MAX_DATAGRAM),
            ..report()
        };
        assert!(matches!(
            encode(&r, &AuthKey::None),
            Err(WireError::TooLarge)
        ));
    }

    #[test]
    fn drops_trailing_context_first() {
        let mut r = report();
        r.context = (0..200)
            .map(|i| format!("[  {i:3}.000000] call trace line {i} \"quoted\"\t"))
            .collect();
        for key in [AuthKey::None, key()] {
            let bytes = encode(&r, &key).unwrap();
            assert!(bytes.len() <= MAX_DATAGRAM, "{}", bytes.len());
            let got = decode(&bytes, &key).unwrap();
            assert_eq!(got.message, r.message);
            let kept = got.context.len();
            assert!(kept > 0 && kept < r.context.len());
            assert_eq!(got.context, r.context[..kept]);
            // One more line would not have fit.
            let mut more = got.clone();
            more.context.push(r.context[kept].clone());
            let budget = MAX_DATAGRAM - HEADER_LEN - key.scheme().tag_len();
            assert!(serde_json::to_vec(&more).unwrap().len() > budget);
        }
    }

    #[test]
    fn truncates_message_at_char_boundary() {
        let mut r = report();
        r.message = "Kernel panic - not syncing: ".to_owned() + &"é€😀\"\n".repeat(400);
        for key in [AuthKey::None, key()] {
            let bytes = encode(&r, &key).unwrap();
            assert!(bytes.len() <= MAX_DATAGRAM, "{}", bytes.len());
            // Within one escaped character of the limit.
            assert!(bytes.len() > MAX_DATAGRAM - 8, "{}", bytes.len());
            let got = decode(&bytes, &key).unwrap();
            assert!(got.context.is_empty());
            assert!(got.message.len() > 100);
            assert!(r.message.starts_with(&got.message));
            assert_eq!(got.node, r.node);
        }
    }

    #[test]
    fn debug_hides_the_key() {
        let shown = format!("{:?}", key());
        assert!(!shown.contains("horse"), "{shown}");
    }
}
