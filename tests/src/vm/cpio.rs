//! A minimal writer of the "newc" cpio format the kernel unpacks as an initramfs.

pub const DIR: u32 = 0o040_755;
pub const FILE: u32 = 0o100_644;
pub const EXECUTABLE: u32 = 0o100_755;
pub const SYMLINK: u32 = 0o120_777;
pub const CHAR_DEVICE: u32 = 0o020_600;

#[derive(Default)]
pub struct Archive {
    bytes: Vec<u8>,
    inode: u32,
}

impl Archive {
    /// One entry; for a symlink `data` is its target, for a device `rdev` its (major, minor).
    pub fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.inode += 1;
        let name = path.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.bytes
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}
