//! One node's recent console lines, to drop the copy of a line that arrives through the other
//! netconsole format and an extended record that arrives twice. O(1) per line, whatever the
//! number of lines remembered.
//!
//! Lines are remembered by 64-bit SipHash keys with this process's random keys, so a sender
//! cannot choose lines that collide; the text itself is not kept.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use super::parse::Format;

/// A remembered line.
#[derive(Debug)]
struct Entry {
    at: Instant,
    /// Key in [`Recent::exact`]: format, text and timestamp (or its absence).
    exact: u64,
    /// Key in [`Recent::by_text`]: format and text.
    text: u64,
    /// Key in [`Recent::repeats`], for extended lines.
    repeat: Option<u64>,
    /// Its copy from the other format has been dropped already.
    matched: bool,
}

/// Lines of one sender from the last `window`, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct Recent {
    hasher: RandomState,
    window: Duration,
    capacity: usize,
    /// In arrival order; the front has id `first_id`, ids count up from there.
    entries: VecDeque<Entry>,
    first_id: u64,
    /// Ids per key, oldest first. Matched or forgotten ids are removed lazily: when they
    /// reach the front, or when their entry is forgotten.
    exact: HashMap<u64, VecDeque<u64>>,
    by_text: HashMap<u64, VecDeque<u64>>,
    /// Extended lines by (seq, line number, text), with how many are remembered.
    repeats: HashMap<u64, u32>,
}

impl Recent {
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            hasher: RandomState::new(),
            window,
            capacity: capacity.max(1),
            entries: VecDeque::new(),
            first_id: 0,
            exact: HashMap::new(),
            by_text: HashMap::new(),
            repeats: HashMap::new(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Remembers line `index` of a record and tells whether it repeats one already seen: the
    /// same message from the other format (same text, and the same timestamp when both have
    /// one), or the same extended record again (same seq, line and text). A line matches one
    /// copy at most, so repeated identical lines (common in stack traces) survive.
    pub(crate) fn seen(
        &mut self,
        format: Format,
        seq: Option<u64>,
        usec: Option<u64>,
        index: usize,
        line: &str,
        now: Instant,
    ) -> bool {
        self.forget_older_than(now);
        let text = self.hasher.hash_one(line);
        let other = match format {
            Format::Plain => Format::Extended,
            Format::Extended => Format::Plain,
        };
        let twin = match usec {
            // The other copy's timestamp, or an untimed plain line.
            Some(_) => self
                .unmatched(Index::Exact, self.exact_key(other, text, usec))
                .or_else(|| self.unmatched(Index::Exact, self.exact_key(other, text, None))),
            None => self.unmatched(Index::Text, self.text_key(other, text)),
        };
        if let Some(id) = twin {
            self.entries[(id - self.first_id) as usize].matched = true;
            return true;
        }
        let repeat = seq.map(|seq| self.hasher.hash_one((2u8, format, seq, index, text)));
        if repeat.is_some_and(|key| self.repeats.contains_key(&key)) {
            return true;
        }
        if self.entries.len() >= self.capacity {
            self.forget_oldest();
        }
        let id = self.first_id + self.entries.len() as u64;
        let entry = Entry {
            at: now,
            exact: self.exact_key(format, text, usec),
            text: self.text_key(format, text),
            repeat,
            matched: false,
        };
        self.exact.entry(entry.exact).or_default().push_back(id);
        self.by_text.entry(entry.text).or_default().push_back(id);
        if let Some(key) = repeat {
            *self.repeats.entry(key).or_default() += 1;
        }
        self.entries.push_back(entry);
        false
    }

    fn exact_key(&self, format: Format, text: u64, usec: Option<u64>) -> u64 {
        self.hasher.hash_one((0u8, format, text, usec))
    }

    fn text_key(&self, format: Format, text: u64) -> u64 {
        self.hasher.hash_one((1u8, format, text))
    }

    /// The oldest unmatched remembered line under `key`, dropping dead ids on the way.
    fn unmatched(&mut self, index: Index, key: u64) -> Option<u64> {
        let map = match index {
            Index::Exact => &mut self.exact,
            Index::Text => &mut self.by_text,
        };
        let ids = map.get_mut(&key)?;
        while let Some(&id) = ids.front() {
            if !self.entries[(id - self.first_id) as usize].matched {
                return Some(id);
            }
            ids.pop_front();
        }
        map.remove(&key);
        None
    }

    fn forget_older_than(&mut self, now: Instant) {
        while self
            .entries
            .front()
            .is_some_and(|entry| now.duration_since(entry.at) > self.window)
        {
            self.forget_oldest();
        }
    }

    /// Forgets the front entry. Ids in a key's list grow, and every older entry is gone, so
    /// the entry's ids are at the front of its lists.
    fn forget_oldest(&mut self) {
        let Some(entry) = self.entries.pop_front() else {
            return;
        };
        let id = self.first_id;
        self.first_id += 1;
        for (map, key) in [
            (&mut self.exact, entry.exact),
            (&mut self.by_text, entry.text),
        ] {
            if let Some(ids) = map.get_mut(&key) {
                while ids.front().is_some_and(|&front| front <= id) {
                    ids.pop_front();
                }
                if ids.is_empty() {
                    map.remove(&key);
                }
            }
        }
        if let Some(key) = entry.repeat
            && let Some(count) = self.repeats.get_mut(&key)
        {
            *count -= 1;
            if *count == 0 {
                self.repeats.remove(&key);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Index {
    Exact,
    Text,
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(2);

    fn plain(r: &mut Recent, usec: Option<u64>, line: &str, now: Instant) -> bool {
        r.seen(Format::Plain, None, usec, 0, line, now)
    }

    fn ext(r: &mut Recent, seq: u64, usec: u64, index: usize, line: &str, now: Instant) -> bool {
        r.seen(Format::Extended, Some(seq), Some(usec), index, line, now)
    }

    #[test]
    fn copies_pair_once_across_formats() {
        let t0 = Instant::now();
        let mut r = Recent::new(WINDOW, 256);
        assert!(!plain(&mut r, Some(5), " ? foo+0x1/0x2", t0));
        assert!(!plain(&mut r, Some(5), " ? foo+0x1/0x2", t0));
        // Each extended copy takes one plain line; a third is new.
        assert!(ext(&mut r, 1, 5, 0, " ? foo+0x1/0x2", t0));
        assert!(ext(&mut r, 2, 5, 0, " ? foo+0x1/0x2", t0));
        assert!(!ext(&mut r, 3, 5, 0, " ? foo+0x1/0x2", t0));
        // Another timestamp is another message; the same format never pairs.
        assert!(!ext(&mut r, 4, 6, 0, "x", t0));
        assert!(!plain(&mut r, Some(7), "x", t0));
        assert!(plain(&mut r, Some(6), "x", t0));
        assert!(!ext(&mut r, 5, 8, 0, "y", t0));
        assert!(!ext(&mut r, 6, 8, 0, "y", t0));
    }

    #[test]
    fn untimed_plain_lines_pair_by_text() {
        let t0 = Instant::now();
        let mut r = Recent::new(WINDOW, 256);
        assert!(!ext(&mut r, 1, 100, 0, "a", t0));
        assert!(plain(&mut r, None, "a", t0));
        assert!(!plain(&mut r, None, "b", t0));
        assert!(ext(&mut r, 2, 200, 0, "b", t0));
        assert!(!plain(&mut r, None, "a", t0));
    }

    #[test]
    fn a_repeated_extended_record_is_a_copy_but_not_its_repeated_lines() {
        let t0 = Instant::now();
        let mut r = Recent::new(WINDOW, 256);
        assert!(!ext(&mut r, 9, 1, 0, "first", t0));
        assert!(!ext(&mut r, 9, 1, 1, "same", t0));
        assert!(!ext(&mut r, 9, 1, 2, "same", t0));
        for (index, line) in ["first", "same", "same"].into_iter().enumerate() {
            assert!(ext(&mut r, 9, 1, index, line, t0), "{index}");
        }
        assert!(!ext(&mut r, 10, 1, 0, "first", t0));
    }

    #[test]
    fn lines_are_forgotten_after_the_window_or_beyond_capacity() {
        let t0 = Instant::now();
        let mut r = Recent::new(WINDOW, 3);
        assert!(!plain(&mut r, Some(1), "old", t0));
        assert!(!ext(&mut r, 1, 1, 0, "old", t0 + WINDOW * 2));
        assert_eq!(r.len(), 1);
        for i in 0..10u64 {
            assert!(!plain(&mut r, Some(i), "many", t0 + WINDOW * 2));
        }
        assert_eq!(r.len(), 3);
        // Only the last three are left to pair with.
        let later = t0 + WINDOW * 2;
        assert!(!ext(&mut r, 2, 0, 0, "many", later));
        assert!(ext(&mut r, 3, 9, 0, "many", later));
        // Everything forgotten: the indexes are empty too.
        r.forget_older_than(later + WINDOW * 2);
        assert_eq!(r.len(), 0);
        assert!(r.exact.is_empty() && r.by_text.is_empty() && r.repeats.is_empty());
    }

    #[test]
    fn cost_per_line_does_not_grow_with_what_is_remembered() {
        let t0 = Instant::now();
        let mut r = Recent::new(Duration::from_secs(3600), 1 << 20);
        let lines: Vec<String> = (0..200_000).map(|i| format!("line {i}")).collect();
        let started = Instant::now();
        for (i, line) in lines.iter().enumerate() {
            assert!(!ext(&mut r, i as u64, i as u64, 0, line, t0));
        }
        for (i, line) in lines.iter().enumerate() {
            assert!(plain(&mut r, Some(i as u64), line, t0));
        }
        // Compared against every remembered line, this would be 4e10 comparisons.
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(r.len(), lines.len());
    }
}
