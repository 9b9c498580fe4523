//! Kernel symbols from `/proc/kallsyms`, read once at start, to name the return addresses of
//! the stack the `panic()` probe captures. At panic time there is no time to read the file
//! (the dying CPU is held for milliseconds), so the text symbols are kept in memory, compactly:
//! one sorted address table and one string arena.

use std::{io, path::Path};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum KallsymsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    /// `kernel.kptr_restrict` hides addresses from this process (they read as 0).
    #[error("{0} shows no addresses (kernel.kptr_restrict, or not privileged)")]
    Hidden(String),
}

/// Text symbols of the running kernel and its modules, sorted by address.
#[derive(Debug, Default)]
pub struct Kallsyms {
    /// (address, offset of `name` or `name [module]` in `names`, its length).
    symbols: Vec<(u64, u32, u32)>,
    names: String,
}

impl Kallsyms {
    pub fn load(path: &Path) -> Result<Self, KallsymsError> {
        let text = std::fs::read_to_string(path).map_err(|source| KallsymsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let symbols = Self::parse(&text);
        if symbols.symbols.is_empty() {
            return Err(KallsymsError::Hidden(path.display().to_string()));
        }
        Ok(symbols)
    }

    /// Keeps the text symbols (`t`/`T`) of `address type name [module]` lines with a non-zero
    /// address; anything else is skipped.
    pub fn parse(text: &str) -> Self {
        let mut table = Self::default();
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace();
            let (Some(address), Some(kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if !matches!(kind, "t" | "T") {
                continue;
            }
            let Ok(address) = u64::from_str_radix(address, 16) else {
                continue;
            };
            if address == 0 {
                continue;
            }
            let start = table.names.len();
            table.names.push_str(name);
            if let Some(module) = fields.next() {
                table.names.push(' ');
                table.names.push_str(module);
            }
            let (Ok(start), Ok(len)) = (
                u32::try_from(start),
                u32::try_from(table.names.len() - start),
            ) else {
                break;
            };
            table.symbols.push((address, start, len));
        }
        table.symbols.sort_unstable_by_key(|&(address, ..)| address);
        table.symbols.shrink_to_fit();
        table.names.shrink_to_fit();
        table
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// `address` as a call-trace frame, `function+0xoff/0xsize [module]`, the way the kernel
    /// prints one; `None` below the first symbol or past the last one's end.
    pub fn frame(&self, address: u64) -> Option<String> {
        let index = self
            .symbols
            .partition_point(|&(start, ..)| start <= address)
            .checked_sub(1)?;
        let (start, name_at, name_len) = self.symbols[index];
        // The next symbol bounds this one; the last symbol has no known end.
        let size = self.symbols.get(index + 1)?.0 - start;
        let name = &self.names[name_at as usize..(name_at + name_len) as usize];
        let (function, module) = match name.split_once(' ') {
            Some((function, module)) => (function, Some(module)),
            None => (name, None),
        };
        let mut frame = format!("{function}+{:#x}/{size:#x}", address - start);
        if let Some(module) = module {
            frame.push(' ');
            frame.push_str(module);
        }
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff810a0000 T panic
ffffffff810a0400 t panic_print_sys_info
ffffffff810a0400 D not_text
ffffffffc0a01000 t lastgasp_crash_null_deref\t[lastgasp_crash]
ffffffffc0a01080 t lastgasp_crash_write\t[lastgasp_crash]
0000000000000000 T hidden
";

    #[test]
    fn addresses_become_kernel_style_frames() {
        let symbols = Kallsyms::parse(SAMPLE);
        assert_eq!(symbols.len(), 5);
        assert_eq!(
            symbols.frame(0xffffffff810a0012).as_deref(),
            Some("panic+0x12/0x400")
        );
        assert_eq!(
            symbols.frame(0xffffffffc0a01017).as_deref(),
            Some("lastgasp_crash_null_deref+0x17/0x80 [lastgasp_crash]")
        );
        assert_eq!(symbols.frame(0x1000), None, "below every symbol");
        assert_eq!(
            symbols.frame(0xffffffffc0a01090),
            None,
            "the last has no known end"
        );
    }

    #[test]
    fn named_frames_read_back_as_call_trace_frames_and_name_the_culprit() {
        use crate::kernel_log::{Frame, title_from_stack};
        let symbols = Kallsyms::parse(SAMPLE);
        let frames: Vec<Frame> = [0xffffffff810a0010, 0xffffffffc0a01011, 0xffffffffc0a01040]
            .iter()
            .filter_map(|&address| symbols.frame(address))
            .filter_map(|line| Frame::parse(&line))
            .collect();
        assert_eq!(
            frames[1],
            Frame::new("lastgasp_crash_null_deref", Some("lastgasp_crash"))
        );
        let title = title_from_stack("Fatal exception", &frames);
        assert_eq!(
            title.culprit.map(|frame| frame.function),
            Some("lastgasp_crash_null_deref".to_owned())
        );
    }

    #[test]
    fn hidden_addresses_are_an_error() {
        let dir = std::env::temp_dir().join(format!("lastgasp-kallsyms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kallsyms");
        std::fs::write(
            &path,
            "0000000000000000 T _stext\n0000000000000000 T panic\n",
        )
        .unwrap();
        assert!(matches!(
            Kallsyms::load(&path),
            Err(KallsymsError::Hidden(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
