//! Per-sender state: rejoining plain lines split into 1000-byte datagrams and
//! reassembling extended records sent as `ncfrag` fragments.
//!
//! A sender is a source address and port; memory is budgeted per IP address too, so one
//! address sending from many ports evicts only its own partial data, never another node's.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::parse::{self, Fragment, Meta, ParseError, Record};

/// `MAX_PRINT_CHUNK` in drivers/net/netconsole.c: the largest datagram netconsole sends,
/// plain or extended, whole or a fragment (the `release` prefix and userdata included).
pub const MAX_PRINT_CHUNK: usize = 1000;

/// Memory and size bounds of a [`Reassembler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Larger datagrams are not the kernel's and are rejected unparsed.
    pub max_datagram_bytes: usize,
    /// Longest plain line buffered while waiting for its newline; a longer
    /// one is emitted in pieces of this size.
    pub max_line_bytes: usize,
    /// Fragmented extended records in flight per sender; starting another
    /// drops the oldest.
    pub max_pending_messages: usize,
    /// Largest `ncfrag` total accepted (the kernel's extended console buffer
    /// is 8 KiB).
    pub max_message_bytes: usize,
    /// How long an incomplete record or an unterminated line is kept.
    pub ttl: Duration,
    /// Senders with buffered data; beyond this the least recently active
    /// sender's data is dropped.
    pub max_senders: usize,
    /// Buffered bytes over all senders; beyond this the least recently
    /// active senders' data is dropped.
    pub max_buffered_bytes: usize,
    /// Senders (ports) with buffered data per IP address; beyond this the
    /// address's least recently active sender's data is dropped.
    pub max_senders_per_ip: usize,
    /// Buffered bytes per IP address; beyond this the address's least
    /// recently active senders' data is dropped (never the one just active).
    pub max_buffered_bytes_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_datagram_bytes: MAX_PRINT_CHUNK,
            max_line_bytes: 8 << 10,
            max_pending_messages: 64,
            max_message_bytes: 16 << 10,
            ttl: Duration::from_secs(5),
            max_senders: 4096,
            max_buffered_bytes: 32 << 20,
            // A node has a plain and an extended port per netconsole target.
            max_senders_per_ip: 16,
            // Above what one sender can hold (a line and `max_pending_messages`
            // records of `max_message_bytes`).
            max_buffered_bytes_per_ip: 2 << 20,
        }
    }
}

/// Counters for metrics; all only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub datagrams: u64,
    /// Datagrams rejected with a [`ParseError`].
    pub errors: u64,
    pub records: u64,
    /// Plain lines emitted in pieces because they exceeded `max_line_bytes`.
    pub lines_split: u64,
    /// Unterminated plain lines emitted by [`Reassembler::expire`].
    pub lines_flushed: u64,
    /// Incomplete fragmented records dropped by [`Reassembler::expire`].
    pub messages_expired: u64,
    /// Incomplete fragmented records dropped for `max_pending_messages` or
    /// because their sequence number arrived with another length.
    pub messages_dropped: u64,
    /// Senders whose buffered data was dropped for `max_senders` or
    /// `max_buffered_bytes`.
    pub senders_evicted: u64,
    /// Senders whose buffered data was dropped for their IP address's budget.
    pub senders_evicted_by_ip: u64,
}

/// Turns datagrams into [`Record`]s, keeping per-sender partial state.
///
/// The format is detected per datagram, so plain and extended targets may
/// share a source address. Call [`Reassembler::expire`] periodically (e.g.
/// every second) to drop stale fragments and flush unterminated lines.
#[derive(Debug)]
pub struct Reassembler {
    limits: Limits,
    senders: HashMap<SocketAddr, Sender>,
    /// Senders by last activity, oldest first, for eviction.
    lru: BTreeMap<u64, SocketAddr>,
    /// Senders and their bytes per IP address.
    by_ip: HashMap<IpAddr, IpUsage>,
    tick: u64,
    /// Heap bytes held by all senders.
    buffered: usize,
    stats: Stats,
}

impl Reassembler {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Limits {
                // Zero would never make progress when splitting lines.
                max_line_bytes: limits.max_line_bytes.max(1),
                ..limits
            },
            senders: HashMap::new(),
            lru: BTreeMap::new(),
            by_ip: HashMap::new(),
            tick: 0,
            buffered: 0,
            stats: Stats::default(),
        }
    }

    /// Parses one datagram into the records it completes (zero or more).
    pub fn push(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Vec<Record>, ParseError> {
        self.stats.datagrams += 1;
        let result = self.parse(from, datagram, now);
        match &result {
            Ok(records) => self.stats.records += records.len() as u64,
            Err(_) => self.stats.errors += 1,
        }
        result
    }

    /// Drops fragmented records older than the TTL and emits plain lines
    /// that have waited that long for their newline (e.g. the last output of
    /// a node that died mid-line).
    pub fn expire(&mut self, now: Instant) -> Vec<(SocketAddr, Record)> {
        let ttl = self.limits.ttl;
        let mut flushed = Vec::new();
        let mut emptied = Vec::new();
        for (&from, sender) in &mut self.senders {
            let before = sender.bytes();
            let pending = sender.pending.len();
            sender.pending.retain(|p| now.duration_since(p.since) < ttl);
            self.stats.messages_expired += (pending - sender.pending.len()) as u64;
            if !sender.line.is_empty() && now.duration_since(sender.line_at) >= ttl {
                flushed.push((from, parse::plain_record(&sender.line)));
                sender.line.clear();
                self.stats.lines_flushed += 1;
            }
            self.buffered -= before - sender.bytes();
            if let Some(usage) = self.by_ip.get_mut(&from.ip()) {
                usage.bytes -= before - sender.bytes();
            }
            if sender.is_empty() {
                emptied.push((from, sender.tick));
            }
        }
        for (from, tick) in emptied {
            if let Some(sender) = self.senders.remove(&from) {
                self.buffered -= sender.bytes();
                self.unaccount(from, sender.bytes());
            }
            self.lru.remove(&tick);
        }
        self.stats.records += flushed.len() as u64;
        flushed
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Heap bytes currently buffered for partial lines and fragments.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Senders that currently have buffered data.
    pub fn senders(&self) -> usize {
        self.senders.len()
    }

    /// Senders from `ip` that currently have buffered data.
    pub fn senders_of(&self, ip: IpAddr) -> usize {
        self.by_ip.get(&ip).map_or(0, |usage| usage.senders.len())
    }

    fn parse(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Vec<Record>, ParseError> {
        if datagram.is_empty() {
            return Err(ParseError::Empty);
        }
        if datagram.len() > self.limits.max_datagram_bytes {
            return Err(ParseError::Oversized {
                len: datagram.len(),
                max: self.limits.max_datagram_bytes,
            });
        }
        if let Some(offset) = datagram.iter().position(|&b| b == 0) {
            return Err(ParseError::Binary { offset });
        }
        let Some(ext) = parse::extended(datagram)? else {
            let mut sender = self.take(from, now);
            let records = sender.plain(datagram, now, &self.limits, &mut self.stats);
            self.put(from, sender);
            return Ok(records);
        };
        let Some(frag) = ext.frag else {
            return Ok(vec![ext.meta.record(ext.body)]);
        };
        let max = self.limits.max_message_bytes;
        if frag.total > max {
            return Err(ParseError::MessageTooLarge {
                total: frag.total,
                max,
            });
        }
        let mut sender = self.take(from, now);
        let record = sender.fragment(ext.meta, frag, ext.body, now, &self.limits, &mut self.stats);
        self.put(from, sender);
        Ok(record.into_iter().collect())
    }

    /// Removes a sender's state for updating (or starts empty state).
    fn take(&mut self, from: SocketAddr, now: Instant) -> Sender {
        match self.senders.remove(&from) {
            Some(sender) => {
                self.lru.remove(&sender.tick);
                self.buffered -= sender.bytes();
                self.unaccount(from, sender.bytes());
                sender
            }
            None => Sender::new(now),
        }
    }

    /// Stores a sender's state as most recently active, then evicts the
    /// least recently active senders until the limits hold: first those of
    /// the same IP address for its budget, then any for the global one.
    fn put(&mut self, from: SocketAddr, mut sender: Sender) {
        if sender.is_empty() {
            return;
        }
        self.tick += 1;
        sender.tick = self.tick;
        self.buffered += sender.bytes();
        let usage = self.by_ip.entry(from.ip()).or_default();
        usage.bytes += sender.bytes();
        usage.senders.push(from);
        self.lru.insert(sender.tick, from);
        self.senders.insert(from, sender);
        while let Some(usage) = self.by_ip.get(&from.ip())
            && (usage.senders.len() > self.limits.max_senders_per_ip
                || usage.bytes > self.limits.max_buffered_bytes_per_ip)
        {
            // At most `max_senders_per_ip` + 1 to look at.
            let victim = usage
                .senders
                .iter()
                .filter(|&&other| other != from)
                .min_by_key(|other| self.senders.get(other).map_or(0, |s| s.tick))
                .copied();
            let Some(victim) = victim else {
                break;
            };
            self.evict(victim);
            self.stats.senders_evicted_by_ip += 1;
        }
        while self.senders.len() > self.limits.max_senders
            || self.buffered > self.limits.max_buffered_bytes
        {
            let Some(&victim) = self.lru.first_key_value().map(|(_, victim)| victim) else {
                break;
            };
            self.evict(victim);
            self.stats.senders_evicted += 1;
        }
    }

    fn evict(&mut self, victim: SocketAddr) {
        if let Some(evicted) = self.senders.remove(&victim) {
            self.lru.remove(&evicted.tick);
            self.buffered -= evicted.bytes();
            self.unaccount(victim, evicted.bytes());
        }
    }

    /// Removes a sender and its bytes from its IP address's usage.
    fn unaccount(&mut self, from: SocketAddr, bytes: usize) {
        let ip = from.ip();
        if let Some(usage) = self.by_ip.get_mut(&ip) {
            usage.bytes -= bytes;
            usage.senders.retain(|&other| other != from);
            if usage.senders.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }
}

/// What one IP address holds.
#[derive(Debug, Default)]
struct IpUsage {
    /// Its senders with buffered data, at most `max_senders_per_ip` + 1.
    senders: Vec<SocketAddr>,
    bytes: usize,
}

/// Partial data from one source address.
#[derive(Debug)]
struct Sender {
    /// Position in [`Reassembler::lru`].
    tick: u64,
    /// Plain text after the last newline.
    line: Vec<u8>,
    /// When `line` last grew.
    line_at: Instant,
    pending: Vec<Pending>,
}

impl Sender {
    fn new(now: Instant) -> Self {
        Self {
            tick: 0,
            line: Vec::new(),
            line_at: now,
            pending: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.line.is_empty() && self.pending.is_empty()
    }

    /// Heap bytes held, counted by capacity.
    fn bytes(&self) -> usize {
        self.line.capacity() + self.pending.iter().map(Pending::bytes).sum::<usize>()
    }

    /// Appends plain text, emitting every line it completes.
    fn plain(
        &mut self,
        data: &[u8],
        now: Instant,
        limits: &Limits,
        stats: &mut Stats,
    ) -> Vec<Record> {
        let mut records = Vec::new();
        for piece in data.split_inclusive(|&b| b == b'\n') {
            let (mut text, newline) = match piece.split_last() {
                Some((b'\n', text)) => (text, true),
                _ => (piece, false),
            };
            while self.line.len() + text.len() > limits.max_line_bytes {
                let (head, tail) = text.split_at(limits.max_line_bytes - self.line.len());
                self.line.extend_from_slice(head);
                records.push(parse::plain_record(&self.line));
                self.line.clear();
                stats.lines_split += 1;
                text = tail;
            }
            self.line.extend_from_slice(text);
            if newline {
                records.push(parse::plain_record(&self.line));
                self.line.clear();
            }
        }
        if !self.line.is_empty() {
            self.line_at = now;
        }
        records
    }

    /// Adds one `ncfrag` fragment, returning the record it completes.
    fn fragment(
        &mut self,
        meta: Meta,
        frag: Fragment,
        chunk: &[u8],
        now: Instant,
        limits: &Limits,
        stats: &mut Stats,
    ) -> Option<Record> {
        let found = self.pending.iter().position(|p| p.meta.seq == meta.seq);
        let index = match found {
            Some(i) if self.pending[i].body.len() == frag.total => i,
            _ => {
                // Same seq with another length: a different record (e.g.
                // after a reboot), so the old one can never complete.
                if let Some(i) = found {
                    self.pending.swap_remove(i);
                    stats.messages_dropped += 1;
                }
                if self.pending.len() >= limits.max_pending_messages
                    && let Some(oldest) =
                        (0..self.pending.len()).min_by_key(|&i| self.pending[i].since)
                {
                    self.pending.swap_remove(oldest);
                    stats.messages_dropped += 1;
                }
                self.pending.push(Pending::new(meta, frag.total, now));
                self.pending.len() - 1
            }
        };
        if self.pending[index].insert(frag.offset, chunk) {
            let done = self.pending.swap_remove(index);
            return Some(done.meta.record(&done.body));
        }
        None
    }
}

/// An extended record whose fragments are still arriving.
#[derive(Debug)]
struct Pending {
    meta: Meta,
    body: Vec<u8>,
    /// One bit per body byte received; duplicates and overlaps count once.
    have: Vec<u64>,
    received: usize,
    since: Instant,
}

impl Pending {
    fn new(meta: Meta, total: usize, now: Instant) -> Self {
        Self {
            meta,
            body: vec![0; total],
            have: vec![0; total.div_ceil(64)],
            received: 0,
            since: now,
        }
    }

    fn bytes(&self) -> usize {
        self.body.capacity() + self.have.capacity() * 8
    }

    /// Copies a fragment in (bounds were checked when parsing); true once
    /// every byte has arrived.
    fn insert(&mut self, offset: usize, chunk: &[u8]) -> bool {
        self.body[offset..offset + chunk.len()].copy_from_slice(chunk);
        for i in offset..offset + chunk.len() {
            let (word, bit) = (i / 64, 1u64 << (i % 64));
            if self.have[word] & bit == 0 {
                self.have[word] |= bit;
                self.received += 1;
            }
        }
        self.received == self.body.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_log;
    use parse::Format;

    /// MAX_PRINT_CHUNK in drivers/net/netconsole.c.
    const CHUNK: usize = 1000;

    fn addr(n: u32) -> SocketAddr {
        SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 6665))
    }

    /// What netconsole's send_ext_msg_udp() sends for one `<header>;<body>`.
    fn ext_datagrams(release: Option<&str>, msg: &str) -> Vec<Vec<u8>> {
        let release = release.map(|r| format!("{r},")).unwrap_or_default();
        if release.len() + msg.len() <= CHUNK {
            return vec![format!("{release}{msg}").into_bytes()];
        }
        let (header, body) = msg.split_once(';').unwrap();
        let mut datagrams = Vec::new();
        let mut offset = 0;
        while offset < body.len() {
            let head = format!("{release}{header},ncfrag={offset}/{};", body.len());
            let n = (body.len() - offset).min(CHUNK - head.len());
            let mut datagram = head.into_bytes();
            datagram.extend_from_slice(&body.as_bytes()[offset..offset + n]);
            datagrams.push(datagram);
            offset += n;
        }
        datagrams
    }

    #[test]
    fn plain_line_split_at_1000_bytes() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(Limits::default());
        // One console write, cut by write_msg() every 1000 bytes; the "é"
        // straddles the first cut.
        let long = format!("[    7.000001] {}é{}", "x".repeat(984), "y".repeat(600));
        let write = format!("{long}\n[    7.000002] second\n");
        let chunks: Vec<&[u8]> = write.as_bytes().chunks(CHUNK).collect();
        assert_eq!(chunks.len(), 2);
        assert!(std::str::from_utf8(chunks[0]).is_err());

        assert!(r.push(addr(1), chunks[0], t0).unwrap().is_empty());
        assert_eq!(r.senders(), 1);
        // Another sender, and an extended target on the same address, do
        // not disturb the partial line.
        let other = r.push(addr(2), b"[    1.000000] other\n", t0).unwrap();
        assert_eq!(other[0].message(), "other");
        let ext = r.push(addr(1), b"6,5,7000000,-;ext;text\n", t0).unwrap();
        assert_eq!(
            (ext[0].format, ext[0].text.as_str()),
            (Format::Extended, "ext;text")
        );

        let records = r.push(addr(1), chunks[1], t0).unwrap();
        let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, [long.as_str(), "[    7.000002] second"]);
        assert_eq!(records[0].usec, Some(7_000_001));
        assert_eq!(r.senders(), 0);
        assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn overlong_plain_line_is_emitted_in_pieces() {
        let limits = Limits {
            max_line_bytes: 10,
            ..Limits::default()
        };
        let mut r = Reassembler::new(limits);
        let t0 = Instant::now();
        assert!(r.push(addr(1), b"0123456", t0).unwrap().is_empty());
        let records = r
            .push(addr(1), b"789abcdefghijklmnopqrstu\nv\n", t0)
            .unwrap();
        let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["0123456789", "abcdefghij", "klmnopqrst", "u", "v"]);
        assert_eq!(r.stats().lines_split, 3);
    }

    #[test]
    fn ncfrag_reassembly_out_of_order() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(Limits::default());
        let text = format!("Kernel panic - not syncing: {}", "\\x5c".repeat(600));
        let msg = format!("0,500,4755680,-;{text}\n SUBSYSTEM=x\n");
        let mut first = ext_datagrams(Some("6.1.0-27-cloud-amd64"), &msg);
        assert_eq!(first.len(), 3);
        assert!(first.iter().all(|d| d.len() <= CHUNK));
        let second = ext_datagrams(None, &format!("4,501,4755700,-;{}\n", "z".repeat(1500)));
        assert_eq!(second.len(), 2);

        first.reverse();
        // A duplicate fragment and an interleaved record are harmless.
        let mut order = vec![&first[0], &second[1], &first[0], &first[1], &second[0]];
        order.push(&first[2]);
        let mut records = Vec::new();
        for datagram in order {
            records.extend(r.push(addr(1), datagram, t0).unwrap());
        }
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].seq, records[0].text.len()), (Some(501), 1500));
        let panic = &records[1];
        assert_eq!(panic.seq, Some(500));
        assert_eq!(panic.release.as_deref(), Some("6.1.0-27-cloud-amd64"));
        assert_eq!(
            panic.text,
            format!("Kernel panic - not syncing: {}", "\\".repeat(600))
        );
        assert_eq!(panic.dict, [("SUBSYSTEM".to_owned(), "x".to_owned())]);
        let classified = kernel_log::classify(panic.message()).unwrap();
        assert!(classified.kind.is_fatal());
        assert_eq!((r.senders(), r.buffered_bytes()), (0, 0));
    }

    #[test]
    fn incomplete_fragments_expire() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut r = Reassembler::new(Limits {
            ttl,
            ..Limits::default()
        });
        let fragments = ext_datagrams(None, &format!("4,7,1,-;{}\n", "q".repeat(1200)));
        assert!(r.push(addr(1), &fragments[0], t0).unwrap().is_empty());
        assert!(r.buffered_bytes() >= 1200);

        assert!(r.expire(t0 + ttl / 2).is_empty());
        assert_eq!(r.senders(), 1);
        assert!(r.expire(t0 + ttl).is_empty());
        assert_eq!((r.senders(), r.buffered_bytes()), (0, 0));
        assert_eq!(r.stats().messages_expired, 1);

        // The rest alone cannot complete the record.
        assert!(r.push(addr(1), &fragments[1], t0 + ttl).unwrap().is_empty());
        assert!(r.expire(t0 + ttl * 2).is_empty());
        assert_eq!(r.stats().messages_expired, 2);
    }

    #[test]
    fn unterminated_line_is_flushed_on_expiry() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(Limits::default());
        assert!(
            r.push(addr(3), b"[    9.000000] last wo", t0)
                .unwrap()
                .is_empty()
        );
        assert!(
            r.push(addr(3), b"rds", t0 + Duration::from_secs(3))
                .unwrap()
                .is_empty()
        );
        // The TTL counts from the last piece.
        assert!(r.expire(t0 + Duration::from_secs(6)).is_empty());
        let flushed = r.expire(t0 + Duration::from_secs(8));
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].0, addr(3));
        assert_eq!(flushed[0].1.message(), "last words");
        assert_eq!(r.stats().lines_flushed, 1);
        assert_eq!((r.senders(), r.buffered_bytes()), (0, 0));
    }

    #[test]
    fn garbage_is_rejected_or_read_as_text() {
        let t0 = Instant::now();
        let limits = Limits::default();
        let mut r = Reassembler::new(limits.clone());
        assert_eq!(r.push(addr(1), b"", t0), Err(ParseError::Empty));
        assert_eq!(
            r.push(addr(1), b"\x7fELF\x02\x01\x01\x00\x00", t0),
            Err(ParseError::Binary { offset: 7 })
        );
        assert_eq!(
            r.push(addr(1), b"6,1,1,-,ncfrag=5/3;abc", t0),
            Err(ParseError::FragmentOutOfRange {
                offset: 5,
                len: 3,
                total: 3
            })
        );
        let huge = format!("6,1,1,-,ncfrag=0/{};abc", limits.max_message_bytes + 1);
        assert!(matches!(
            r.push(addr(1), huge.as_bytes(), t0),
            Err(ParseError::MessageTooLarge { .. })
        ));
        // Without NUL bytes, binary is indistinguishable from odd console
        // text: it is decoded lossily rather than dropped.
        let records = r.push(addr(1), b"\xff\xfe\x01\x02;\n", t0).unwrap();
        assert_eq!(records[0].text, "\u{fffd}\u{fffd}\u{1}\u{2};");
        let stats = r.stats();
        assert_eq!((stats.datagrams, stats.errors, stats.records), (5, 4, 1));
        assert_eq!(r.senders(), 0);
    }

    /// xorshift64*, enough to vary the fuzz input.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    #[test]
    fn memory_caps_hold_under_random_input() {
        let limits = Limits {
            max_datagram_bytes: 1400,
            max_line_bytes: 512,
            max_pending_messages: 4,
            max_message_bytes: 4096,
            ttl: Duration::from_secs(2),
            max_senders: 64,
            max_buffered_bytes: 128 << 10,
            max_senders_per_ip: 4,
            // Above what one sender can hold.
            max_buffered_bytes_per_ip: 32 << 10,
        };
        let mut r = Reassembler::new(limits.clone());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let t0 = Instant::now();
        for i in 0..20_000u64 {
            let now = t0 + Duration::from_millis(i);
            let from = SocketAddr::new(addr(rng.below(30) as u32).ip(), 6665 + rng.below(8) as u16);
            let datagram = match rng.below(4) {
                // Plain text, mostly without newline.
                0 => (0..rng.below(1200))
                    .map(|_| if rng.below(300) == 0 { b'\n' } else { b'a' })
                    .collect(),
                // A fragment of a record that rarely completes.
                1 => {
                    let total = 1 + rng.below(5000);
                    let offset = rng.below(total as u64);
                    let len = 1 + rng.below((total - offset) as u64);
                    let seq = rng.below(20);
                    let mut d = format!("4,{seq},{i},-,ncfrag={offset}/{total};").into_bytes();
                    d.resize(d.len() + len, b'f');
                    d
                }
                // Arbitrary bytes.
                2 => (0..rng.below(1500)).map(|_| rng.next() as u8).collect(),
                // Plausible header prefixes with random tails.
                _ => {
                    let mut d = b"6,1,2,-".to_vec();
                    d.extend((0..rng.below(40)).map(|_| b",;=/0123456789nfrag"[rng.below(19)]));
                    d
                }
            };
            let _ = r.push(from, &datagram, now);
            if i % 500 == 0 {
                r.expire(now);
            }
            assert!(r.senders() <= limits.max_senders);
            assert!(r.buffered_bytes() <= limits.max_buffered_bytes);
            let held: usize = r.senders.values().map(Sender::bytes).sum();
            assert_eq!(held, r.buffered_bytes());
            assert_eq!(r.lru.len(), r.senders());
            for sender in r.senders.values() {
                assert!(sender.line.len() <= limits.max_line_bytes);
                assert!(sender.pending.len() <= limits.max_pending_messages);
            }
            for (ip, usage) in &r.by_ip {
                assert!(usage.senders.len() <= limits.max_senders_per_ip);
                assert!(usage.bytes <= limits.max_buffered_bytes_per_ip);
                let held: usize = usage.senders.iter().map(|s| r.senders[s].bytes()).sum();
                assert_eq!(held, usage.bytes);
                assert!(usage.senders.iter().all(|s| s.ip() == *ip));
            }
            let accounted: usize = r.by_ip.values().map(|usage| usage.senders.len()).sum();
            assert_eq!(accounted, r.senders());
        }
        let stats = r.stats();
        assert!(stats.errors > 0 && stats.records > 0 && stats.senders_evicted > 0);
        assert!(stats.senders_evicted_by_ip > 0);
        r.expire(t0 + Duration::from_secs(3600));
        assert_eq!((r.senders(), r.buffered_bytes()), (0, 0));
        assert!(r.by_ip.is_empty());
    }

    #[test]
    fn datagrams_larger_than_the_kernel_sends_are_rejected() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(Limits::default());
        let header = "0,1,1,-;Kernel panic - not syncing: x";
        let fits = format!("{header}{}\n", "y".repeat(CHUNK - header.len() - 1));
        assert_eq!(fits.len(), CHUNK);
        assert_eq!(r.push(addr(1), fits.as_bytes(), t0).unwrap().len(), 1);
        // What the storm sent: 64 KiB of short escaped lines in one extended datagram.
        let storm = format!("4,2,2,-;{}\n", "a\\x0a".repeat(13_000));
        assert!(storm.len() > 64_000);
        for datagram in [fits.as_bytes(), storm.as_bytes()] {
            let mut over = datagram.to_vec();
            over.push(b'\n');
            assert!(matches!(
                r.push(addr(1), &over, t0),
                Err(ParseError::Oversized { max: CHUNK, .. })
            ));
        }
        // Plain too: the kernel cuts every console write into 1000-byte datagrams.
        let plain = vec![b'p'; CHUNK + 1];
        assert!(matches!(
            r.push(addr(1), &plain, t0),
            Err(ParseError::Oversized { .. })
        ));
        assert_eq!((r.senders(), r.stats().errors), (0, 3));
    }

    #[test]
    fn many_ports_of_one_address_evict_only_their_own_lines() {
        let t0 = Instant::now();
        let limits = Limits::default();
        let mut r = Reassembler::new(limits.clone());
        let victim = SocketAddr::from(([10, 0, 0, 2], 6665));
        assert!(
            r.push(victim, b"[   9.000000] Kernel panic - not sy", t0)
                .unwrap()
                .is_empty()
        );
        // Fragments too: the first half of an extended record.
        let fragments = ext_datagrams(None, &format!("0,7,1,-;{}\n", "q".repeat(1200)));
        let victim_ext = SocketAddr::from(([10, 0, 0, 2], 6666));
        assert!(r.push(victim_ext, &fragments[0], t0).unwrap().is_empty());

        // The attacker: every port, partial lines and fragments of huge records.
        let attacker = [10, 0, 0, 3];
        for port in 1..=20_000u16 {
            let from = SocketAddr::from((attacker, port));
            let now = t0 + Duration::from_micros(u64::from(port));
            let pending = format!("4,{port},1,-,ncfrag=0/{};x", limits.max_message_bytes);
            r.push(from, pending.as_bytes(), now).unwrap();
            r.push(from, &[b'z'; 999], now).unwrap();
        }
        let attacker_ip = SocketAddr::from((attacker, 0)).ip();
        assert_eq!(r.senders_of(attacker_ip), limits.max_senders_per_ip);
        assert!(r.stats().senders_evicted_by_ip > 19_000);
        assert_eq!(r.stats().senders_evicted, 0);

        let later = t0 + Duration::from_secs(1);
        let records = r.push(victim, b"ncing: the rest\n", later).unwrap();
        assert_eq!(records[0].message(), "Kernel panic - not syncing: the rest");
        let records = r.push(victim_ext, &fragments[1], later).unwrap();
        assert_eq!(records[0].seq, Some(7));
    }
}
