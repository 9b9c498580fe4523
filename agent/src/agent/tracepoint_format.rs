//! A tracepoint's `format` file under tracefs: where each field of its record is. Read at
//! load time for tracepoints whose fields changed between kernels.

use lastgasp_common::{NO_FIELD, OomVictimFields};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("the format has no field {0}")]
    Missing(&'static str),
    #[error("field {name} is {size} bytes, the probe reads {expected}")]
    Size {
        name: &'static str,
        size: u32,
        expected: u32,
    },
}

/// One `field:<type> <name>; offset:<n>; size:<n>; signed:<n>;` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// The fields of a format file; lines that are no well-formed field are skipped.
pub fn fields(format: &str) -> Vec<Field> {
    format
        .lines()
        .filter_map(|line| {
            let mut parts = line.trim().split(';').map(str::trim);
            let declaration = parts.next()?.strip_prefix("field:")?;
            // `__data_loc char[] comm`, `unsigned long total_vm`, `char comm[16]`.
            let name = declaration.rsplit(' ').next()?;
            let name = name.split('[').next()?.to_owned();
            let mut number =
                |key: &str| -> Option<u32> { parts.next()?.strip_prefix(key)?.parse().ok() };
            let offset = number("offset:")?;
            let size = number("size:")?;
            Some(Field { name, offset, size })
        })
        .collect()
}

/// Where `oom:mark_victim` keeps each field the probe reads on this kernel.
pub fn oom_victim_fields(format: &str) -> Result<OomVictimFields, FormatError> {
    let fields = fields(format);
    let find = |name: &'static str, expected: u32| -> Result<u32, FormatError> {
        let Some(field) = fields.iter().find(|field| field.name == name) else {
            return Err(FormatError::Missing(name));
        };
        if field.size != expected {
            return Err(FormatError::Size {
                name,
                size: field.size,
                expected,
            });
        }
        Ok(field.offset)
    };
    // Every field but `pid` is optional: a kernel without it, or with another size, is read
    // without it.
    let optional = |name: &'static str, expected: u32| find(name, expected).unwrap_or(NO_FIELD);
    Ok(OomVictimFields {
        pid: find("pid", 4)?,
        anon_rss: optional("anon_rss", 8),
        file_rss: optional("file_rss", 8),
        shmem_rss: optional("shmem_rss", 8),
        oom_score_adj: optional("oom_score_adj", 2),
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux 6.9+ (this format is 6.18's).
    const NEW: &str = "name: mark_victim
ID: 609
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long anon_rss;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned long file_rss;\toffset:32;\tsize:8;\tsigned:0;
\tfield:unsigned long shmem_rss;\toffset:40;\tsize:8;\tsigned:0;
\tfield:uid_t uid;\toffset:48;\tsize:4;\tsigned:0;
\tfield:unsigned long pgtables;\toffset:56;\tsize:8;\tsigned:0;
\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;

print fmt: \"pid=%d comm=%s\", REC->pid, __get_str(comm)
";

    /// Up to Linux 6.8.
    const OLD: &str = "name: mark_victim
format:
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;

print fmt: \"pid=%d\", REC->pid
";

    #[test]
    fn both_layouts_of_mark_victim() {
        let new = oom_victim_fields(NEW).unwrap();
        assert_eq!((new.pid, new.anon_rss, new.file_rss), (8, 24, 32));
        assert_eq!((new.shmem_rss, new.oom_score_adj), (40, 64));
        let old = oom_victim_fields(OLD).unwrap();
        assert_eq!(old.pid, 8);
        assert_eq!(
            [old.anon_rss, old.file_rss, old.shmem_rss, old.oom_score_adj],
            [NO_FIELD; 4]
        );
    }

    #[test]
    fn hostile_formats() {
        assert_eq!(oom_victim_fields(""), Err(FormatError::Missing("pid")));
        assert_eq!(
            oom_victim_fields("\tfield:long pid;\toffset:8;\tsize:8;\tsigned:1;"),
            Err(FormatError::Size {
                name: "pid",
                size: 8,
                expected: 4
            })
        );
        assert!(
            fields("field:int pid; offset:x; size:4;\nfield:\nfield:int a; size:4; offset:0;")
                .is_empty()
        );
        let wide =
            "\tfield:int pid;\toffset:8;\tsize:4;\n\tfield:int anon_rss;\toffset:12;\tsize:4;";
        assert_eq!(oom_victim_fields(wide).unwrap().anon_rss, NO_FIELD);
    }
}
