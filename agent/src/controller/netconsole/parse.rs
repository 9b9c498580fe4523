//! Parsing of one netconsole datagram in either wire format.

use thiserror::Error;

use crate::kernel_log;

/// The extended header is `[release,]prefix,seq,usec,flags[,key=value...]`;
/// the release is at most 64 bytes, so the `;` ending it comes early.
const MAX_HEADER: usize = 256;

/// Largest `<prefix>`: the facility is 8 bits (a `/dev/kmsg` writer may set
/// any), the level 3 bits.
const MAX_PREFIX: u16 = 0x7ff;

/// Which kind of netconsole target sent a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Raw console text.
    Plain,
    /// `/dev/kmsg`-style header, then the escaped message text.
    Extended,
}

/// One console line (plain) or one printk record (extended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub format: Format,
    /// Plain: the line as sent, printk prefix included, line ending removed.
    /// Extended: the unescaped message text; a multi-line record keeps its
    /// embedded newlines.
    pub text: String,
    /// Syslog level, extended only.
    pub level: Option<u8>,
    /// Syslog facility, extended only (0 kernel, 1 user, ...).
    pub facility: Option<u8>,
    /// printk sequence number, extended only.
    pub seq: Option<u64>,
    /// Extended only: the header's flag is not `-`. Since 4.9 `c` means the text began
    /// as a continuation (`pr_cont`) that could not join the record before it; older
    /// kernels flagged continuation fragments `+`.
    pub continuation: bool,
    /// Timestamp in microseconds since boot: the extended header field, or
    /// the `[secs.usecs]` prefix of a plain line when it has one.
    pub usec: Option<u64>,
    /// Kernel release, when the extended target has `release` enabled.
    pub release: Option<String>,
    /// The ` KEY=value` lines that follow an extended record's text
    /// (`SUBSYSTEM`, `DEVICE`, netconsole userdata), unescaped.
    pub dict: Vec<(String, String)>,
}

impl Record {
    /// The message without printk prefix and line ending, as
    /// [`kernel_log::strip_prefix`] leaves it. The same kernel message gives
    /// the same string in both formats, so this (with [`Record::usec`]) is
    /// the key to drop the copy that arrives through the other target.
    pub fn message(&self) -> &str {
        match self.format {
            Format::Plain => kernel_log::strip_prefix(&self.text),
            // No prefix on the wire; stripping could eat user text.
            Format::Extended => &self.text,
        }
    }

    /// The message split into console lines (more than one only for a
    /// multi-line extended record).
    pub fn lines(&self) -> std::str::Split<'_, char> {
        self.message().split('\n')
    }
}

/// Why a datagram was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("empty datagram")]
    Empty,
    /// printk text is NUL-terminated, so a NUL byte means this is not netconsole.
    #[error("NUL byte at offset {offset}: not console text")]
    Binary { offset: usize },
    #[error("malformed ncfrag field {0:?}")]
    BadNcfrag(String),
    #[error("fragment of {len} bytes at offset {offset} does not fit a {total}-byte message")]
    FragmentOutOfRange {
        offset: usize,
        len: usize,
        total: usize,
    },
    #[error("fragmented message of {total} bytes exceeds the {max}-byte limit")]
    MessageTooLarge { total: usize, max: usize },
    /// Netconsole never sends more than `MAX_PRINT_CHUNK` bytes in one datagram.
    #[error("datagram of {len} bytes or more exceeds the kernel's {max}-byte limit")]
    Oversized { len: usize, max: usize },
}

/// Header fields shared by every fragment of an extended record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub release: Option<String>,
    pub prefix: u16,
    pub seq: u64,
    pub usec: u64,
    pub continuation: bool,
}

/// Position of one fragment in the message body (`ncfrag=<offset>/<total>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fragment {
    pub offset: usize,
    pub total: usize,
}

/// An extended datagram: header fields and the (possibly partial) body.
#[derive(Debug)]
pub(crate) struct Extended<'a> {
    pub meta: Meta,
    pub frag: Option<Fragment>,
    pub body: &'a [u8],
}

/// Recognises an extended datagram; `Ok(None)` means plain console text.
///
/// Plain text can contain `;` and commas, so the header must match exactly:
/// numeric prefix, seq and usec, a one-character flag and only `key=value`
/// style extra fields, optionally after a release string without spaces.
pub(crate) fn extended(datagram: &[u8]) -> Result<Option<Extended<'_>>, ParseError> {
    let window = &datagram[..datagram.len().min(MAX_HEADER)];
    let Some(semi) = window.iter().position(|&b| b == b';') else {
        return Ok(None);
    };
    let Ok(header) = std::str::from_utf8(&datagram[..semi]) else {
        return Ok(None);
    };
    let body = &datagram[semi + 1..];
    let fields: Vec<&str> = header.split(',').collect();
    // A release string never parses as a prefix followed by seq, usec and a
    // flag, so trying the shorter form first is unambiguous.
    let parsed = Head::parse(&fields).map(|head| (None, head)).or_else(|| {
        let (release, rest) = fields.split_first()?;
        let head = is_token(release).then(|| Head::parse(rest))??;
        Some((Some(*release), head))
    });
    let Some((release, head)) = parsed else {
        return Ok(None);
    };
    let frag = head
        .ncfrag
        .map(|value| fragment(value, body.len()))
        .transpose()?;
    Ok(Some(Extended {
        meta: Meta {
            release: release.map(str::to_owned),
            prefix: head.prefix,
            seq: head.seq,
            usec: head.usec,
            continuation: head.continuation,
        },
        frag,
        body,
    }))
}

/// The fixed header fields after the optional release.
struct Head<'a> {
    prefix: u16,
    seq: u64,
    usec: u64,
    continuation: bool,
    ncfrag: Option<&'a str>,
}

impl<'a> Head<'a> {
    fn parse(fields: &[&'a str]) -> Option<Self> {
        let [prefix, seq, usec, flags, extra @ ..] = fields else {
            return None;
        };
        // "-" normal, "c" continuation; older kernels also printed "+".
        if !matches!(*flags, "-" | "c" | "+") || !extra.iter().all(|f| is_token(f)) {
            return None;
        }
        let prefix = number(prefix).filter(|&p| p <= u64::from(MAX_PREFIX))?;
        Some(Self {
            prefix: u16::try_from(prefix).ok()?,
            seq: number(seq)?,
            usec: number(usec)?,
            continuation: *flags != "-",
            ncfrag: extra.iter().find_map(|f| f.strip_prefix("ncfrag=")),
        })
    }
}

/// Non-empty, printable, no spaces: a release string or a `key=value` field.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Decimal digits only (`str::parse` would also take a leading `+`).
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn fragment(value: &str, len: usize) -> Result<Fragment, ParseError> {
    let bad = || ParseError::BadNcfrag(value.to_owned());
    let (offset, total) = value.split_once('/').ok_or_else(bad)?;
    let offset = number(offset).and_then(|n| usize::try_from(n).ok());
    let total = number(total).and_then(|n| usize::try_from(n).ok());
    let (Some(offset), Some(total)) = (offset, total) else {
        return Err(bad());
    };
    // The kernel never sends an empty fragment.
    if len == 0 || offset.checked_add(len).is_none_or(|end| end > total) {
        return Err(ParseError::FragmentOutOfRange { offset, len, total });
    }
    Ok(Fragment { offset, total })
}

impl Meta {
    /// Builds the record from the complete body: the escaped text up to the
    /// first newline, then ` KEY=value` lines.
    pub(crate) fn record(&self, body: &[u8]) -> Record {
        let mut lines = body.split(|&b| b == b'\n');
        let text = unescape(lines.next().unwrap_or_default());
        // Text newlines are escaped, so anything else after the first
        // newline that is not a dictionary line is not part of the format.
        let dict = lines
            .filter_map(|line| line.strip_prefix(b" "))
            .filter_map(|kv| {
                let kv = unescape(kv);
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect();
        Record {
            format: Format::Extended,
            text,
            level: Some((self.prefix & 7) as u8),
            facility: u8::try_from(self.prefix >> 3).ok(),
            seq: Some(self.seq),
            continuation: self.continuation,
            usec: Some(self.usec),
            release: self.release.clone(),
            dict,
        }
    }
}

/// Reverses the kernel's `\xNN` escaping of control, non-ASCII and `\` bytes.
fn unescape(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if let [b'\\', b'x', hi, lo, ..] = s[i..]
            && let (Some(hi), Some(lo)) = (hex(hi), hex(lo))
        {
            out.push(hi << 4 | lo);
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// One plain console line (without its newline) as a record.
pub(crate) fn plain_record(line: &[u8]) -> Record {
    let text = String::from_utf8_lossy(line)
        .trim_end_matches(['\n', '\r'])
        .to_owned();
    Record {
        format: Format::Plain,
        usec: timestamp_usec(&text),
        text,
        level: None,
        facility: None,
        seq: None,
        continuation: false,
        release: None,
        dict: Vec::new(),
    }
}

/// The `[secs.usecs]` printk timestamp in microseconds, read from the prefix
/// that [`kernel_log::strip_prefix`] recognised (so its digits are checked).
fn timestamp_usec(line: &str) -> Option<u64> {
    let prefix = &line[..line.len() - kernel_log::strip_prefix(line).len()];
    let (inner, _) = prefix.strip_prefix('[')?.split_once(']')?;
    let (secs, frac) = inner.trim_start().split_once('.')?;
    // printk prints "%5lu.%06lu".
    if frac.len() != 6 {
        return None;
    }
    number(secs)?
        .checked_mul(1_000_000)?
        .checked_add(number(frac)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(datagram: &str) -> Extended<'_> {
        extended(datagram.as_bytes()).unwrap().unwrap()
    }

    fn record(datagram: &str) -> Record {
        let e = ext(datagram);
        assert_eq!(e.frag, None);
        e.meta.record(e.body)
    }

    #[test]
    fn extended_header_fields() {
        let r = record("12,365,4066547,-;short-test hello\n");
        assert_eq!(r.text, "short-test hello");
        assert_eq!((r.facility, r.level), (Some(1), Some(4)));
        assert_eq!((r.seq, r.usec), (Some(365), Some(4066547)));
        assert_eq!(r.release, None);
        assert_eq!(r.message(), "short-test hello");

        assert!(!r.continuation);

        // Continuation flag and a CONFIG_PRINTK_CALLER field.
        let r = record("4,9,10,c,caller=T1;more\n");
        assert_eq!((r.text.as_str(), r.seq), ("more", Some(9)));
        assert!(r.continuation);
    }

    #[test]
    fn release_prefix() {
        let r = record("6.1.0-27-cloud-amd64,0,368,4755680,-;Kernel panic - not syncing: x\n");
        assert_eq!(r.release.as_deref(), Some("6.1.0-27-cloud-amd64"));
        assert_eq!((r.level, r.facility, r.seq), (Some(0), Some(0), Some(368)));
        assert_eq!(r.text, "Kernel panic - not syncing: x");
        // A purely numeric release still parses as one.
        let r = record("6,6,1,2,-;x\n");
        assert_eq!(
            (r.release.as_deref(), r.level, r.seq),
            (Some("6"), Some(6), Some(1))
        );
    }

    #[test]
    fn dictionary_lines_are_not_text() {
        let r = record(
            "3,1000,99,-;e1000e 0000:00:19.0 eth0: Link is Down\n SUBSYSTEM=pci\n DEVICE=+pci:0000:00:19.0\n",
        );
        assert_eq!(r.text, "e1000e 0000:00:19.0 eth0: Link is Down");
        assert_eq!(r.lines().collect::<Vec<_>>(), [r.text.as_str()]);
        assert_eq!(
            r.dict,
            [
                ("SUBSYSTEM".to_owned(), "pci".to_owned()),
                ("DEVICE".to_owned(), "+pci:0000:00:19.0".to_owned())
            ]
        );
    }

    #[test]
    fn escapes_are_decoded() {
        let r = record("6,1,1,-;a\\x5cb\\x09c\\x0anext line \\xc3\\xa9 \\xzz\n");
        assert_eq!(r.text, "a\\b\tc\nnext line é \\xzz");
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            ["a\\b\tc", "next line é \\xzz"]
        );
        // A lone invalid byte becomes U+FFFD instead of failing.
        assert_eq!(record("6,1,1,-;\\xff\n").text, "\u{fffd}");
    }

    #[test]
    fn plain_text_is_not_mistaken_for_a_header() {
        for plain in [
            "[    4.755680] foo; bar\n",
            "1,2,3;x\n",
            "1,2,3,-x;x\n",
            "1,2,3,-,with space;x\n",
            "a b,1,2,3,-;x\n",
            "+1,2,3,-;x\n",
            "99999,2,3,-;x\n",
            "no header at all\n",
            "",
        ] {
            assert!(extended(plain.as_bytes()).unwrap().is_none(), "{plain:?}");
        }
        let late = format!("{}1,2,3,-;x", "x".repeat(MAX_HEADER));
        assert!(extended(late.as_bytes()).unwrap().is_none());
    }

    #[test]
    fn ncfrag_fields() {
        let e = ext("6,416,1758426,-,ncfrag=16/31; the 2nd chunk.");
        assert_eq!(
            e.frag,
            Some(Fragment {
                offset: 16,
                total: 31
            })
        );
        assert_eq!(e.body, b" the 2nd chunk.");
        assert_eq!(
            extended(b"6,1,1,-,ncfrag=x/31;abc").unwrap_err(),
            ParseError::BadNcfrag("x/31".to_owned())
        );
        assert_eq!(
            extended(b"6,1,1,-,ncfrag=30/31;abc").unwrap_err(),
            ParseError::FragmentOutOfRange {
                offset: 30,
                len: 3,
                total: 31
            }
        );
        assert!(matches!(
            extended(b"6,1,1,-,ncfrag=0/31;"),
            Err(ParseError::FragmentOutOfRange { len: 0, .. })
        ));
    }

    #[test]
    fn plain_records() {
        let r = plain_record(b"[    4.755680] Kernel panic - not syncing: sysrq triggered crash\r");
        assert_eq!(
            r.message(),
            "Kernel panic - not syncing: sysrq triggered crash"
        );
        assert_eq!(r.usec, Some(4_755_680));
        let r = plain_record(b"[   62.099024][  T662]  dump_stack_lvl+0x44/0x5c");
        assert_eq!(
            (r.message(), r.usec),
            (" dump_stack_lvl+0x44/0x5c", Some(62_099_024))
        );
        for untimed in ["[  T1] x", "no prefix", "[1.5] user text", ""] {
            assert_eq!(plain_record(untimed.as_bytes()).usec, None, "{untimed:?}");
        }
        assert_eq!(plain_record(b"caf\xe9").text, "caf\u{fffd}");
    }
}
