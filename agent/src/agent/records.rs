//! Ring-buffer records, checked and copied out of the kernel's bytes at the boundary.

use std::mem::size_of;

use lastgasp_common::{
    CniExec, CniExit, ConsoleLine, EventHeader, EventKind, OomVictim, PanicCall, PanicProbe,
    ProcessExit, SignalSent, SlowRecv,
};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("ring-buffer record of {0} bytes is shorter than its header")]
    NoHeader(usize),
    #[error("ring-buffer record has unknown kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record has {len} bytes, expected {expected}")]
    Truncated {
        kind: EventKind,
        len: usize,
        expected: usize,
    },
    #[error("panic() record names unknown probe {0}")]
    UnknownProbe(u32),
}

pub enum Record {
    SlowRecv(SlowRecv),
    CniExec(Box<CniExec>),
    CniExit(CniExit),
    ConsoleLine(Box<ConsoleLine>),
    PanicCall(Box<PanicCall>, PanicProbe),
    SignalSent(Box<SignalSent>),
    OomVictim(OomVictim),
    ProcessExit(Box<ProcessExit>),
}

impl Record {
    pub fn parse(bytes: &[u8]) -> Result<Self, RecordError> {
        let header: EventHeader = copy(bytes).ok_or(RecordError::NoHeader(bytes.len()))?;
        let kind = EventKind::from_u32(header.kind).ok_or(RecordError::UnknownKind(header.kind))?;
        Ok(match kind {
            EventKind::SlowRecv => Self::SlowRecv(read(kind, bytes)?),
            EventKind::CniExec => Self::CniExec(Box::new(read(kind, bytes)?)),
            EventKind::CniExit => Self::CniExit(read(kind, bytes)?),
            EventKind::ConsoleLine => Self::ConsoleLine(Box::new(read(kind, bytes)?)),
            EventKind::PanicCall => {
                let call: PanicCall = read(kind, bytes)?;
                let probe = match call.probe {
                    1 => PanicProbe::Kprobe,
                    2 => PanicProbe::Fentry,
                    other => return Err(RecordError::UnknownProbe(other)),
                };
                Self::PanicCall(Box::new(call), probe)
            }
            EventKind::SignalSent => Self::SignalSent(Box::new(read(kind, bytes)?)),
            EventKind::OomVictim => Self::OomVictim(read(kind, bytes)?),
            EventKind::ProcessExit => Self::ProcessExit(Box::new(read(kind, bytes)?)),
        })
    }
}

fn read<T: Copy>(kind: EventKind, bytes: &[u8]) -> Result<T, RecordError> {
    copy(bytes).ok_or(RecordError::Truncated {
        kind,
        len: bytes.len(),
        expected: size_of::<T>(),
    })
}

/// Copies a plain `#[repr(C)]` record out of `bytes` if they are long enough.
fn copy<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>())
        // SAFETY: the shared types are plain data valid for any bit pattern, and the length is checked.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The bytes of a NUL-terminated or full buffer, as (lossy) text.
pub fn c_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u32) -> EventHeader {
        EventHeader {
            kind,
            tgid: 7,
            tid: 8,
            _pad: 0,
            ktime_ns: 9,
        }
    }

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    #[test]
    fn parses_a_cni_exit() {
        let exit = CniExit {
            header: header(EventKind::CniExit as u32),
            exit_code: 0x100,
            _pad: 0,
        };
        match Record::parse(&bytes_of(&exit)).unwrap() {
            Record::CniExit(parsed) => {
                assert_eq!(parsed.exit_code, 0x100);
                assert_eq!(parsed.header.tgid, 7);
            }
            _ => panic!("wrong record"),
        }
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(Record::parse(&[0; 4]).err(), Some(RecordError::NoHeader(4)));
        assert_eq!(
            Record::parse(&bytes_of(&header(99))).err(),
            Some(RecordError::UnknownKind(99))
        );
        assert!(matches!(
            Record::parse(&bytes_of(&header(EventKind::SlowRecv as u32))),
            Err(RecordError::Truncated {
                kind: EventKind::SlowRecv,
                ..
            })
        ));
    }

    #[test]
    fn c_text_stops_at_nul() {
        assert_eq!(c_text(b"ip\0\0junk"), "ip");
        assert_eq!(c_text(b"full"), "full");
    }
}
