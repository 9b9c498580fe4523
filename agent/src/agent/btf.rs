//! Minimal reader for the kernel's BTF, used to find struct member offsets at
//! load time so the eBPF programs carry no compiled-in kernel layouts.
//!
//! Format: the kernel's Documentation/bpf/btf.rst. Only STRUCT/UNION names are
//! indexed; every other kind is just skipped over (or followed when it is a
//! typedef/qualifier chain).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lastgasp_common::{CgroupOffsets, KernelOffsets};

const SYS_FS_PATH: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;
/// Bound on typedef chains and anonymous-member nesting, so cyclic input cannot hang us.
const MAX_DEPTH: usize = 32;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("{path} not found: the kernel lacks CONFIG_DEBUG_INFO_BTF")]
    NoKernelBtf { path: PathBuf },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not BTF data: magic is {found:#06x}, expected 0xeb9f")]
    BadMagic { found: u16 },
    #[error("unsupported BTF version {0}")]
    UnsupportedVersion(u8),
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("BTF type id {id} has unknown kind {kind}")]
    UnknownKind { id: u32, kind: u32 },
    #[error("BTF has no struct named \"{type_name}\"")]
    NoSuchType { type_name: String },
    #[error("BTF has no enum named \"{enum_name}\"")]
    NoSuchEnum { enum_name: String },
    #[error("struct \"{type_name}\" has no member \"{member}\"")]
    NoSuchMember { type_name: String, member: String },
    #[error(
        "struct \"{type_name}\": member \"{member}\" differs between the {count} structs of that name"
    )]
    Ambiguous {
        type_name: String,
        member: String,
        count: usize,
    },
    #[error("struct \"{type_name}\": \"{member}\" is not a struct or union, cannot look inside it")]
    NotAggregate { type_name: String, member: String },
    #[error("struct \"{type_name}\": member \"{member}\" is a bitfield, not byte-addressable")]
    BitfieldMember { type_name: String, member: String },
    #[error("struct \"{type_name}\": member \"{member}\" has a type without a size")]
    Unsized { type_name: String, member: String },
    #[error(
        "struct \"{type_name}\": member \"{member}\" is {found} bytes, the eBPF code reads {expected}"
    )]
    SizeMismatch {
        type_name: String,
        member: String,
        expected: u32,
        found: u32,
    },
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

/// Parsed BTF blob.
#[derive(Debug)]
pub struct Btf {
    data: Vec<u8>,
    big_endian: bool,
    /// Absolute offset in `data` of each type record; index is type id - 1 (id 0 is void).
    types: Vec<u32>,
    /// Start and end of the string section in `data`.
    strings: (usize, usize),
    /// STRUCT/UNION name -> type ids (vmlinux has a few duplicate names).
    aggregates: HashMap<Box<[u8]>, Vec<u32>>,
    /// ENUM name -> type id.
    enums: HashMap<Box<[u8]>, u32>,
    /// Size of `long`, used as the pointer size (BTF does not record one).
    long_size: Option<u32>,
}

/// One type record's fixed part.
#[derive(Clone, Copy)]
struct Type {
    /// Offset of the record in `data`.
    at: usize,
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` or `type`, depending on kind.
    size_or_type: u32,
}

/// A member found by name: its bit offset (from the start of the struct searched) and type.
struct Found {
    bit_offset: u32,
    type_id: u32,
    bitfield: bool,
}

impl Btf {
    /// Reads the running kernel's BTF from /sys/kernel/btf/vmlinux.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_path(Path::new(SYS_FS_PATH))
    }

    fn from_path(path: &Path) -> Result<Self, BtfError> {
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BtfError::NoKernelBtf { path: path.into() }
            } else {
                BtfError::Io {
                    path: path.into(),
                    source,
                }
            }
        })?;
        Self::parse(bytes)
    }

    /// Parses a raw BTF blob (either byte order), indexing STRUCT/UNION names.
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let Some(&[m0, m1]) = data.get(..2) else {
            return Err(malformed("shorter than the header"));
        };
        let big_endian = match u16::from_le_bytes([m0, m1]) {
            MAGIC => false,
            m if m.swap_bytes() == MAGIC => true,
            found => return Err(BtfError::BadMagic { found }),
        };
        let mut btf = Btf {
            data,
            big_endian,
            types: Vec::new(),
            strings: (0, 0),
            aggregates: HashMap::new(),
            enums: HashMap::new(),
            long_size: None,
        };
        if btf.data.len() < HEADER_LEN {
            return Err(malformed("shorter than the header"));
        }
        if btf.data[2] != 1 {
            return Err(BtfError::UnsupportedVersion(btf.data[2]));
        }
        let hdr_len = btf.u32_at(4) as usize;
        if hdr_len < HEADER_LEN || hdr_len > btf.data.len() {
            return Err(malformed(format!("header length {hdr_len} out of range")));
        }
        let types = btf.section(hdr_len, 8, "type")?;
        btf.strings = btf.section(hdr_len, 16, "string")?;
        btf.index_types(types)?;
        Ok(btf)
    }

    /// Bounds of the section whose (offset, length) pair sits at header byte `field`.
    fn section(
        &self,
        hdr_len: usize,
        field: usize,
        name: &str,
    ) -> Result<(usize, usize), BtfError> {
        let off = self.u32_at(field) as usize;
        let len = self.u32_at(field + 4) as usize;
        let start = hdr_len + off;
        match start.checked_add(len) {
            Some(end) if end <= self.data.len() => Ok((start, end)),
            _ => Err(malformed(format!(
                "{name} section (offset {off}, length {len}) exceeds the {} byte blob",
                self.data.len()
            ))),
        }
    }

    /// Walks the type section once, recording where each type starts.
    fn index_types(&mut self, (start, end): (usize, usize)) -> Result<(), BtfError> {
        let mut at = start;
        while at < end {
            if end - at < TYPE_LEN {
                return Err(malformed("type section ends inside a type"));
            }
            let id = self.types.len() as u32 + 1;
            let at32 = u32::try_from(at).map_err(|_| malformed("blob larger than 4 GiB"))?;
            self.types.push(at32);
            let ty = self.type_at(at);
            let extra = match ty.kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * ty.vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * ty.vlen as usize,
                kind => return Err(BtfError::UnknownKind { id, kind }),
            };
            let next = at + TYPE_LEN + extra;
            if next > end {
                return Err(malformed(format!("type {id} runs past the type section")));
            }
            match ty.kind {
                KIND_STRUCT | KIND_UNION if ty.name_off != 0 => {
                    let name = self.str_at(ty.name_off)?;
                    self.aggregates.entry(name.into()).or_default().push(id);
                }
                KIND_ENUM if ty.name_off != 0 => {
                    let name = self.str_at(ty.name_off)?;
                    self.enums.entry(name.into()).or_insert(id);
                }
                KIND_INT if self.long_size.is_none() => {
                    // GCC's names, and clang's (kernels built with LLVM=1).
                    let name = self.str_at(ty.name_off)?;
                    if matches!(
                        name,
                        b"long int" | b"long unsigned int" | b"long" | b"unsigned long"
                    ) {
                        self.long_size = Some(ty.size_or_type);
                    }
                }
                _ => {}
            }
            at = next;
        }
        Ok(())
    }

    /// Byte offset of `field` inside struct/union `type_name`. `field` may be a
    /// dotted path through named members; anonymous struct/union members are
    /// searched transparently. Bitfields are rejected.
    pub fn member_offset(&self, type_name: &str, field: &str) -> Result<u32, BtfError> {
        let found = self.find_unique(type_name, field)?;
        Ok(found.bit_offset / 8)
    }

    /// Size in bytes of the member's type, looking through typedefs and
    /// qualifiers. Pointers take the size of `long`. Bitfields are rejected.
    pub fn member_size(&self, type_name: &str, field: &str) -> Result<u32, BtfError> {
        let found = self.find_unique(type_name, field)?;
        self.type_size(found.type_id, MAX_DEPTH)?
            .ok_or_else(|| BtfError::Unsized {
                type_name: type_name.into(),
                member: field.into(),
            })
    }

    /// The value of `enumerator` in the (32-bit) enum `enum_name`.
    pub fn enum_value(&self, enum_name: &str, enumerator: &str) -> Result<i64, BtfError> {
        let id = *self
            .enums
            .get(enum_name.as_bytes())
            .ok_or_else(|| BtfError::NoSuchEnum {
                enum_name: enum_name.into(),
            })?;
        let ty = self.type_by_id(id)?;
        for i in 0..ty.vlen as usize {
            let at = ty.at + TYPE_LEN + 8 * i;
            if self.str_at(self.u32_at(at))? == enumerator.as_bytes() {
                let value = self.u32_at(at + 4);
                return Ok(if ty.kind_flag {
                    i64::from(value as i32)
                } else {
                    i64::from(value)
                });
            }
        }
        Err(BtfError::NoSuchMember {
            type_name: enum_name.into(),
            member: enumerator.into(),
        })
    }

    /// Whether struct `type_name` has a member `field`.
    pub fn has_member(&self, type_name: &str, field: &str) -> bool {
        self.find_unique(type_name, field).is_ok()
    }

    /// Looks `field` up in every struct named `type_name`; all that have it must agree.
    fn find_unique(&self, type_name: &str, field: &str) -> Result<Found, BtfError> {
        let ids = self
            .aggregates
            .get(type_name.as_bytes())
            .map_or(&[][..], Vec::as_slice);
        let mut best: Option<Result<Found, BtfError>> = None;
        for &id in ids {
            let this = self.find_path(id, type_name, field);
            best = Some(match (best, this) {
                (Some(Ok(prev)), Ok(f))
                    if (prev.bit_offset, prev.type_id) != (f.bit_offset, f.type_id) =>
                {
                    return Err(BtfError::Ambiguous {
                        type_name: type_name.into(),
                        member: field.into(),
                        count: ids.len(),
                    });
                }
                (Some(Ok(prev)), _) => Ok(prev),
                (Some(Err(e)), Err(_)) => Err(e),
                (_, this) => this,
            });
        }
        let found = best.unwrap_or_else(|| {
            Err(BtfError::NoSuchType {
                type_name: type_name.into(),
            })
        })?;
        if found.bitfield || found.bit_offset % 8 != 0 {
            return Err(BtfError::BitfieldMember {
                type_name: type_name.into(),
                member: field.into(),
            });
        }
        Ok(found)
    }

    /// Walks a dotted member path from struct `struct_id`.
    fn find_path(&self, struct_id: u32, type_name: &str, field: &str) -> Result<Found, BtfError> {
        let mut found = Found {
            bit_offset: 0,
            type_id: struct_id,
            bitfield: false,
        };
        let mut walked = 0;
        for part in field.split('.') {
            let (container, ty) = self.resolve(found.type_id, MAX_DEPTH)?;
            if found.bitfield || !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
                return Err(BtfError::NotAggregate {
                    type_name: type_name.into(),
                    member: field[..walked - 1].into(),
                });
            }
            let member = self
                .find_member(container, part.as_bytes(), MAX_DEPTH)?
                .ok_or_else(|| BtfError::NoSuchMember {
                    type_name: type_name.into(),
                    member: field.into(),
                })?;
            let bit_offset = found
                .bit_offset
                .checked_add(member.bit_offset)
                .ok_or_else(|| malformed("member offset overflows"))?;
            found = Found {
                bit_offset,
                ..member
            };
            walked += part.len() + 1;
        }
        Ok(found)
    }

    /// Finds a member by name in struct/union `id`, descending into anonymous members.
    /// The returned bit offset is relative to `id`.
    fn find_member(&self, id: u32, name: &[u8], depth: usize) -> Result<Option<Found>, BtfError> {
        if depth == 0 {
            return Err(malformed("anonymous members nested too deeply"));
        }
        let ty = self.type_by_id(id)?;
        for i in 0..ty.vlen as usize {
            let at = ty.at + TYPE_LEN + 12 * i;
            let (name_off, type_id, raw_offset) =
                (self.u32_at(at), self.u32_at(at + 4), self.u32_at(at + 8));
            let (bit_offset, bitfield_size) = if ty.kind_flag {
                (raw_offset & 0xff_ffff, raw_offset >> 24)
            } else {
                (raw_offset, 0)
            };
            let member_name = self.str_at(name_off)?;
            if !member_name.is_empty() && member_name == name {
                let bitfield = bitfield_size != 0 || self.is_int_bitfield(type_id)?;
                return Ok(Some(Found {
                    bit_offset,
                    type_id,
                    bitfield,
                }));
            }
            if member_name.is_empty() {
                let (inner_id, inner) = self.resolve(type_id, MAX_DEPTH)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(found) = self.find_member(inner_id, name, depth - 1)?
                {
                    let bit_offset = bit_offset
                        .checked_add(found.bit_offset)
                        .ok_or_else(|| malformed("member offset overflows"))?;
                    return Ok(Some(Found {
                        bit_offset,
                        ..found
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Without kind_flag, a bitfield shows as an INT whose bit count or bit offset
    /// does not fill its storage.
    fn is_int_bitfield(&self, type_id: u32) -> Result<bool, BtfError> {
        let (_, ty) = self.resolve(type_id, MAX_DEPTH)?;
        if ty.kind != KIND_INT {
            return Ok(false);
        }
        let enc = self.u32_at(ty.at + TYPE_LEN);
        let (bits, offset) = (enc & 0xff, (enc >> 16) & 0xff);
        Ok(offset != 0 || u64::from(bits) != u64::from(ty.size_or_type) * 8)
    }

    /// Size of type `id` in bytes, or None for types without one (void, functions, forward decls).
    fn type_size(&self, id: u32, depth: usize) -> Result<Option<u32>, BtfError> {
        if depth == 0 {
            return Err(malformed("array element types nested too deeply"));
        }
        if id == 0 {
            return Ok(None);
        }
        let (_, ty) = self.resolve(id, MAX_DEPTH)?;
        Ok(match ty.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT
            | KIND_DATASEC => Some(ty.size_or_type),
            KIND_PTR => Some(
                self.long_size
                    .ok_or_else(|| malformed("no `long` type to size pointers by"))?,
            ),
            KIND_ARRAY => {
                let elem = self.u32_at(ty.at + TYPE_LEN);
                let nelems = self.u32_at(ty.at + TYPE_LEN + 8);
                match self.type_size(elem, depth - 1)? {
                    Some(size) => Some(
                        size.checked_mul(nelems)
                            .ok_or_else(|| malformed("array size overflows"))?,
                    ),
                    None => None,
                }
            }
            _ => None,
        })
    }

    /// Follows typedefs, qualifiers and type tags to the underlying type.
    fn resolve(&self, mut id: u32, depth: usize) -> Result<(u32, Type), BtfError> {
        for _ in 0..depth {
            let ty = self.type_by_id(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Ok((id, ty)),
            }
        }
        Err(malformed(format!(
            "typedef chain through type {id} too long"
        )))
    }

    /// Type id 0 (void) gets a kind-0 placeholder with no members.
    fn type_by_id(&self, id: u32) -> Result<Type, BtfError> {
        if id == 0 {
            return Ok(Type {
                at: 0,
                name_off: 0,
                kind: 0,
                vlen: 0,
                kind_flag: false,
                size_or_type: 0,
            });
        }
        let at = self
            .types
            .get(id as usize - 1)
            .ok_or_else(|| malformed(format!("reference to missing type id {id}")))?;
        Ok(self.type_at(*at as usize))
    }

    /// Decodes the fixed part of a record; caller has checked it is in bounds.
    fn type_at(&self, at: usize) -> Type {
        let info = self.u32_at(at + 4);
        Type {
            at,
            name_off: self.u32_at(at),
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(at + 8),
        }
    }

    /// NUL-terminated string at `off` in the string section.
    fn str_at(&self, off: u32) -> Result<&[u8], BtfError> {
        let (start, end) = self.strings;
        let s = start
            .checked_add(off as usize)
            .filter(|&s| s < end)
            .ok_or_else(|| malformed(format!("string offset {off} out of range")))?;
        let len = self.data[s..end]
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed(format!("string at offset {off} is not terminated")))?;
        Ok(&self.data[s..s + len])
    }

    fn u32_at(&self, at: usize) -> u32 {
        let b: [u8; 4] = self.data[at..at + 4].try_into().expect("4-byte slice");
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }
}

/// The members of `struct pt_regs` holding the syscall number and its first argument while
/// a task is in a syscall, with their sizes; `None` where the probes do not know them.
#[cfg(target_arch = "x86_64")]
const PT_REGS_SYSCALL: Option<[(&str, u32); 2]> = Some([("orig_ax", 8), ("di", 8)]);
#[cfg(target_arch = "aarch64")]
const PT_REGS_SYSCALL: Option<[(&str, u32); 2]> = Some([("syscallno", 4), ("orig_x0", 8)]);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const PT_REGS_SYSCALL: Option<[(&str, u32); 2]> = None;

/// The offset of a member that must be `expected` bytes long, as the programs read it.
fn sized_offset(btf: &Btf, type_name: &str, field: &str, expected: u32) -> Result<u32, BtfError> {
    let found = btf.member_size(type_name, field)?;
    if found != expected {
        return Err(BtfError::SizeMismatch {
            type_name: type_name.into(),
            member: field.into(),
            expected,
            found,
        });
    }
    btf.member_offset(type_name, field)
}

/// Resolves every offset the eBPF programs use, checking each member has the
/// size the programs read.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    const PTR: u32 = 8;
    let at =
        |type_name: &str, field: &str, expected: u32| sized_offset(btf, type_name, field, expected);
    let (pt_regs_syscall_nr, pt_regs_arg0) = match PT_REGS_SYSCALL {
        Some([(nr, nr_size), (arg0, arg0_size)]) => {
            (at("pt_regs", nr, nr_size)?, at("pt_regs", arg0, arg0_size)?)
        }
        None => (0, 0),
    };
    Ok(KernelOffsets {
        task_struct_files: at("task_struct", "files", PTR)?,
        task_struct_mm: at("task_struct", "mm", PTR)?,
        task_struct_exit_code: at("task_struct", "exit_code", 4)?,
        files_struct_fdt: at("files_struct", "fdt", PTR)?,
        fdtable_max_fds: at("fdtable", "max_fds", 4)?,
        fdtable_fd: at("fdtable", "fd", PTR)?,
        file_private_data: at("file", "private_data", PTR)?,
        socket_file: at("socket", "file", PTR)?,
        socket_sk: at("socket", "sk", PTR)?,
        sock_family: at("sock", "__sk_common.skc_family", 2)?,
        sock_protocol: at("sock", "sk_protocol", 2)?,
        mm_struct_env_start: at("mm_struct", "env_start", 8)?,
        mm_struct_env_end: at("mm_struct", "env_end", 8)?,
        pt_regs_syscall_nr,
        pt_regs_arg0,
    })
}

/// The offsets the pod cgroup filter of the termination probes reads.
pub fn cgroup_offsets(btf: &Btf) -> Result<CgroupOffsets, BtfError> {
    const PTR: u32 = 8;
    let at =
        |type_name: &str, field: &str, expected: u32| sized_offset(btf, type_name, field, expected);
    // Linux 6.1 replaced the ids of a cgroup's ancestors by pointers to them; both are
    // flexible arrays indexed by level, so only their offset is checked.
    let (cgroup_ancestors, ancestors_are_ids) = if btf.has_member("cgroup", "ancestors") {
        (btf.member_offset("cgroup", "ancestors")?, 0)
    } else {
        (btf.member_offset("cgroup", "ancestor_ids")?, 1)
    };
    Ok(CgroupOffsets {
        task_struct_pid: at("task_struct", "pid", 4)?,
        task_struct_tgid: at("task_struct", "tgid", 4)?,
        task_struct_comm: at("task_struct", "comm", 16)?,
        task_struct_real_parent: at("task_struct", "real_parent", PTR)?,
        task_struct_cgroups: at("task_struct", "cgroups", PTR)?,
        css_set_dfl_cgrp: at("css_set", "dfl_cgrp", PTR)?,
        css_set_subsys: btf.member_offset("css_set", "subsys")?,
        cgroup_subsys_state_cgroup: at("cgroup_subsys_state", "cgroup", PTR)?,
        cgroup_level: at("cgroup", "level", 4)?,
        cgroup_kn: at("cgroup", "kn", PTR)?,
        cgroup_ancestors,
        ancestors_are_ids,
        kernfs_node_id: at("kernfs_node", "id", 8)?,
        kernfs_node_name: at("kernfs_node", "name", PTR)?,
        kernel_siginfo_code: at("kernel_siginfo", "si_code", 4)?,
        task_struct_thread_pid: at("task_struct", "thread_pid", PTR)?,
        pid_level: at("pid", "level", 4)?,
        pid_numbers: btf.member_offset("pid", "numbers")?,
        // `struct upid { int nr; struct pid_namespace *ns; }`: `numbers` is a flexible array
        // (an array of one before 6.x), so the element size is not the member's.
        upid_size: at("upid", "ns", PTR)? + PTR,
    })
}

/// The `css_set.subsys` index of the v1 controller `name` (`memory`, `pids`, ...): its
/// `cgroup_subsys_id`, if the array has room for it.
pub fn cgroup_subsys_id(btf: &Btf, name: &str) -> Result<u32, BtfError> {
    let id = btf.enum_value("cgroup_subsys_id", &format!("{name}_cgrp_id"))?;
    let slots = btf.member_size("css_set", "subsys")? / 8;
    u32::try_from(id)
        .ok()
        .filter(|&id| id < slots)
        .ok_or_else(|| malformed(format!("cgroup_subsys_id {id} of {name} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Assembles small BTF blobs; type ids are handed out in call order from 1.
    struct Builder {
        big_endian: bool,
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                big_endian: false,
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn word(&self, out: &mut Vec<u8>, v: u32) {
            let b = if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            out.extend_from_slice(&b);
        }

        fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        /// Adds a raw type record with `extra` trailing words; returns its id.
        fn ty(
            &mut self,
            name: &str,
            kind: u32,
            flag: bool,
            vlen: u32,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.name(name);
            let info = (u32::from(flag) << 31) | (kind << 24) | vlen;
            let mut out = std::mem::take(&mut self.types);
            for w in [name_off, info, st].iter().chain(extra) {
                self.word(&mut out, *w);
            }
            self.types = out;
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32, bits: u32) -> u32 {
            self.ty(name, KIND_INT, false, 0, size, &[bits])
        }

        /// `members` are (name, type id, raw offset word).
        fn aggregate(
            &mut self,
            kind: u32,
            name: &str,
            flag: bool,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(m, t, off) in members {
                extra.extend([self.name(m), t, off]);
            }
            self.ty(name, kind, flag, members.len() as u32, size, &extra)
        }

        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.aggregate(KIND_STRUCT, name, false, size, members)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            let magic = if self.big_endian {
                MAGIC.to_be_bytes()
            } else {
                MAGIC.to_le_bytes()
            };
            out.extend_from_slice(&magic);
            out.extend_from_slice(&[1, 0]);
            let types_len = self.types.len() as u32;
            for w in [24, 0, types_len, types_len, self.strings.len() as u32] {
                self.word(&mut out, w);
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// The structs of an x86_64 6.18 kernel that kernel_offsets reads, compiled by clang
    /// (tests/data/btf/kernel.c says how).
    fn fixture() -> Btf {
        Btf::parse(include_bytes!("../../tests/data/btf/kernel.btf").to_vec()).unwrap()
    }

    /// A blob with one type of every kind ahead of the struct that tests look up.
    fn every_kind(big_endian: bool) -> Builder {
        let mut b = Builder::new();
        b.big_endian = big_endian;
        let int = b.int("int", 4, 32); // 1
        let long = b.int("long int", 8, 64); // 2
        b.ty("", KIND_PTR, false, 0, int, &[]); // 3
        b.ty("", KIND_ARRAY, false, 0, 0, &[int, int, 4]); // 4
        b.ty("u", KIND_UNION, false, 1, 4, &[0, int, 0]); // 5
        b.ty("e", KIND_ENUM, false, 2, 4, &[0, 1, 0, 2]); // 6
        b.ty("f", KIND_FWD, false, 0, 0, &[]); // 7
        b.ty("td", KIND_TYPEDEF, false, 0, long, &[]); // 8
        b.ty("", KIND_VOLATILE, false, 0, 8, &[]); // 9
        b.ty("", KIND_CONST, false, 0, 9, &[]); // 10
        b.ty("", KIND_RESTRICT, false, 0, 3, &[]); // 11
        b.ty("", KIND_FUNC_PROTO, false, 2, int, &[0, int, 0, long]); // 12
        b.ty("fn", KIND_FUNC, false, 0, 12, &[]); // 13
        b.ty("v", KIND_VAR, false, 0, int, &[1]); // 14
        b.ty(".data", KIND_DATASEC, false, 1, 4, &[14, 0, 4]); // 15
        b.ty("double", KIND_FLOAT, false, 0, 8, &[]); // 16
        b.ty("tag", KIND_DECL_TAG, false, 0, 13, &[u32::MAX]); // 17
        b.ty("rcu", KIND_TYPE_TAG, false, 0, 3, &[]); // 18
        b.ty("e64", KIND_ENUM64, false, 1, 8, &[0, 1, 0]); // 19
        let anon = b.aggregate(
            KIND_UNION,
            "",
            false,
            8,
            &[("inner", 10, 0), ("other", int, 0)],
        ); // 20
        b.strukt(
            "s",
            40,
            &[
                ("a", int, 0),
                ("", anon, 64),
                ("p", 18, 128),
                ("arr", 4, 192),
                ("q", 11, 256),
            ],
        );
        b
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fixture_kernel_offsets() {
        assert_eq!(
            kernel_offsets(&fixture()).unwrap(),
            KernelOffsets {
                task_struct_files: 1824,
                task_struct_mm: 1136,
                task_struct_exit_code: 1164,
                files_struct_fdt: 32,
                fdtable_max_fds: 0,
                fdtable_fd: 8,
                file_private_data: 24,
                socket_file: 16,
                socket_sk: 24,
                sock_family: 16,
                sock_protocol: 532,
                mm_struct_env_start: 496,
                mm_struct_env_end: 504,
                pt_regs_syscall_nr: 120,
                pt_regs_arg0: 112,
            }
        );
    }

    #[test]
    fn fixture_anonymous_nested_and_sized_members() {
        let btf = fixture();
        for (type_name, member, offset, size) in [
            // mm_struct's fields all sit in an anonymous struct.
            ("mm_struct", "env_start", 496, 8),
            ("mm_struct", "env_end", 504, 8),
            // A flexible array has no elements.
            ("mm_struct", "cpu_bitmap", 512, 0),
            // Through the named member, and through anonymous unions and structs.
            ("sock", "__sk_common.skc_family", 16, 2),
            ("sock_common", "skc_family", 16, 2),
            ("sock_common", "skc_rcv_saddr", 4, 4),
            ("sock_common", "skc_num", 14, 2),
            ("sock", "__sk_common", 0, 136),
            ("sock", "sk_protocol", 532, 2),
            // Pointers take the size of clang's `unsigned long`.
            ("task_struct", "files", 1824, 8),
            ("fdtable", "fd", 8, 8),
            ("files_struct", "resize_wait", 8, 24),
            // Typedefs: of an enum, of an integer, of an array's element.
            ("socket", "state", 0, 4),
            ("sock_common", "skc_u16hashes", 8, 4),
            ("pt_regs", "di", 112, 8),
            ("pt_regs", "orig_ax", 120, 8),
        ] {
            assert_eq!(
                (
                    btf.member_offset(type_name, member).unwrap(),
                    btf.member_size(type_name, member).unwrap()
                ),
                (offset, size),
                "{type_name}.{member}"
            );
        }
    }

    #[test]
    fn fixture_error_messages() {
        let btf = fixture();
        let err = |t: &str, f: &str| btf.member_offset(t, f).unwrap_err().to_string();
        assert_eq!(
            err("fdtable_nope", "fd"),
            r#"BTF has no struct named "fdtable_nope""#
        );
        assert_eq!(
            err("sock", "sk_protocl"),
            r#"struct "sock" has no member "sk_protocl""#
        );
        assert_eq!(
            err("sock", "__sk_common.nope"),
            r#"struct "sock" has no member "__sk_common.nope""#
        );
        assert_eq!(
            err("task_struct", "sched_reset_on_fork"),
            r#"struct "task_struct": member "sched_reset_on_fork" is a bitfield, not byte-addressable"#
        );
        // A bitfield at a whole byte is still a bitfield.
        assert!(matches!(
            btf.member_size("sock", "sk_gso_disabled"),
            Err(BtfError::BitfieldMember { .. })
        ));
        assert_eq!(
            err("sock", "sk_protocol.x"),
            r#"struct "sock": "sk_protocol" is not a struct or union, cannot look inside it"#
        );
    }

    #[test]
    fn missing_file_names_path_and_config() {
        let msg = Btf::from_path(Path::new("/nonexistent/btf/vmlinux"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "/nonexistent/btf/vmlinux not found: the kernel lacks CONFIG_DEBUG_INFO_BTF"
        );
        let msg = Btf::from_path(Path::new("/")).unwrap_err().to_string();
        assert!(msg.starts_with("reading /: "), "{msg}");
    }

    #[test]
    fn skips_every_kind_in_both_byte_orders() {
        for big_endian in [false, true] {
            let btf = Btf::parse(every_kind(big_endian).build()).unwrap();
            assert_eq!(btf.types.len(), 21);
            assert_eq!(btf.member_offset("s", "a").unwrap(), 0);
            // Through the anonymous union, a const volatile typedef of long.
            assert_eq!(btf.member_offset("s", "inner").unwrap(), 8);
            assert_eq!(btf.member_size("s", "inner").unwrap(), 8);
            assert_eq!(btf.member_offset("s", "other").unwrap(), 8);
            // Type-tagged and restrict pointers take the size of long.
            assert_eq!(btf.member_size("s", "p").unwrap(), 8);
            assert_eq!(btf.member_size("s", "q").unwrap(), 8);
            assert_eq!(btf.member_offset("s", "arr").unwrap(), 24);
            assert_eq!(btf.member_size("s", "arr").unwrap(), 16);
            assert_eq!(
                btf.member_offset("u", "").unwrap_err().to_string(),
                r#"struct "u" has no member """#
            );
        }
    }

    #[test]
    fn kind_flag_bitfield_offsets() {
        let mut b = Builder::new();
        let uint = b.int("unsigned int", 4, 32);
        let ushort = b.int("short unsigned int", 2, 16);
        let three_bits = b.int("unsigned int", 4, 3);
        let inner = b.aggregate(
            KIND_STRUCT,
            "",
            true,
            8,
            &[("bf", uint, (5 << 24) | 3), ("after", ushort, 16)],
        );
        b.aggregate(
            KIND_STRUCT,
            "flagged",
            true,
            0x1000,
            &[
                ("low", uint, 3 << 24),
                ("whole", uint, 32),
                ("far", ushort, 0x7f00 * 8),
                ("", inner, 64),
                ("odd", ushort, 12),
            ],
        );
        b.strukt("plain", 8, &[("old_bf", three_bits, 0), ("x", uint, 32)]);
        let btf = Btf::parse(b.build()).unwrap();
        assert_eq!(btf.member_offset("flagged", "whole").unwrap(), 4);
        assert_eq!(btf.member_offset("flagged", "far").unwrap(), 0x7f00);
        assert_eq!(btf.member_size("flagged", "far").unwrap(), 2);
        assert_eq!(btf.member_offset("flagged", "after").unwrap(), 10);
        assert_eq!(btf.member_offset("plain", "x").unwrap(), 4);
        for (t, f) in [
            ("flagged", "low"),
            ("flagged", "bf"),
            ("flagged", "odd"),
            ("plain", "old_bf"),
        ] {
            assert!(
                matches!(
                    btf.member_offset(t, f),
                    Err(BtfError::BitfieldMember { .. })
                ),
                "{t}.{f}"
            );
        }
    }

    #[test]
    fn duplicate_struct_names() {
        let mut b = Builder::new();
        let int = b.int("int", 4, 32);
        b.strukt("dup", 8, &[("a", int, 0), ("b", int, 32)]);
        b.strukt("dup", 8, &[("a", int, 0), ("b", int, 0), ("c", int, 32)]);
        let btf = Btf::parse(b.build()).unwrap();
        assert_eq!(btf.member_offset("dup", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("dup", "c").unwrap(), 4);
        assert!(matches!(
            btf.member_offset("dup", "b"),
            Err(BtfError::Ambiguous { count: 2, .. })
        ));
    }

    /// The structs kernel_offsets reads, with sk_protocol of `protocol_size` bytes.
    fn fake_kernel(protocol_size: u32) -> Btf {
        let mut b = Builder::new();
        let long = b.int("long int", 8, 64); // 1
        let uint = b.int("unsigned int", 4, 32); // 2
        let proto = b.int("proto", protocol_size, protocol_size * 8); // 3
        let ptr = b.ty("", KIND_PTR, false, 0, 0, &[]); // 4
        let ushort = b.int("short unsigned int", 2, 16); // 5
        b.strukt(
            "task_struct",
            64,
            &[("mm", ptr, 0), ("exit_code", uint, 64), ("files", ptr, 128)],
        );
        b.strukt("files_struct", 16, &[("fdt", ptr, 64)]);
        b.strukt("fdtable", 16, &[("max_fds", uint, 0), ("fd", ptr, 64)]);
        b.strukt("file", 32, &[("private_data", ptr, 192)]);
        b.strukt("socket", 32, &[("file", ptr, 128), ("sk", ptr, 192)]);
        let common = b.strukt("sock_common", 24, &[("skc_family", ushort, 128)]);
        b.strukt(
            "sock",
            64,
            &[("__sk_common", common, 0), ("sk_protocol", proto, 256)],
        );
        b.strukt(
            "mm_struct",
            16,
            &[("env_start", long, 0), ("env_end", long, 64)],
        );
        // Both architectures' names, so the test runs on either.
        let int = b.int("int", 4, 32);
        b.strukt(
            "pt_regs",
            48,
            &[
                ("di", long, 64),
                ("orig_ax", long, 128),
                ("orig_x0", long, 256),
                ("syscallno", int, 320),
            ],
        );
        Btf::parse(b.build()).unwrap()
    }

    #[test]
    fn kernel_offsets_on_fake_kernel() {
        let off = kernel_offsets(&fake_kernel(2)).unwrap();
        assert_eq!(
            off,
            KernelOffsets {
                task_struct_files: 16,
                task_struct_mm: 0,
                task_struct_exit_code: 8,
                files_struct_fdt: 8,
                fdtable_max_fds: 0,
                fdtable_fd: 8,
                file_private_data: 24,
                socket_file: 16,
                socket_sk: 24,
                sock_family: 16,
                sock_protocol: 32,
                mm_struct_env_start: 0,
                mm_struct_env_end: 8,
                #[cfg(target_arch = "x86_64")]
                pt_regs_syscall_nr: 16,
                #[cfg(target_arch = "x86_64")]
                pt_regs_arg0: 8,
                #[cfg(target_arch = "aarch64")]
                pt_regs_syscall_nr: 40,
                #[cfg(target_arch = "aarch64")]
                pt_regs_arg0: 32,
                #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
                pt_regs_syscall_nr: 0,
                #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
                pt_regs_arg0: 0,
            }
        );
        assert_eq!(
            kernel_offsets(&fake_kernel(1)).unwrap_err().to_string(),
            r#"struct "sock": member "sk_protocol" is 1 bytes, the eBPF code reads 2"#
        );
    }

    /// The cgroup structures, with `ancestors` (6.1+) or `ancestor_ids` (older).
    fn fake_cgroups(ancestors: &str) -> Btf {
        let mut b = Builder::new();
        let long = b.int("long int", 8, 64);
        let int = b.int("int", 4, 32);
        let ptr = b.ty("", KIND_PTR, false, 0, 0, &[]);
        let comm = b.ty("", KIND_ARRAY, false, 0, 0, &[long, long, 2]);
        let subsys = b.ty("", KIND_ARRAY, false, 0, 0, &[ptr, long, 14]);
        let flexible = b.ty("", KIND_ARRAY, false, 0, 0, &[ptr, long, 0]);
        b.strukt(
            "task_struct",
            128,
            &[
                ("pid", int, 0),
                ("tgid", int, 32),
                ("comm", comm, 64),
                ("real_parent", ptr, 192),
                ("cgroups", ptr, 256),
                ("thread_pid", ptr, 320),
            ],
        );
        let upids = b.ty("", KIND_ARRAY, false, 0, 0, &[long, long, 0]);
        b.strukt("pid", 16, &[("level", int, 0), ("numbers", upids, 64)]);
        b.strukt("upid", 16, &[("nr", int, 0), ("ns", ptr, 64)]);
        b.strukt(
            "css_set",
            128,
            &[("subsys", subsys, 0), ("dfl_cgrp", ptr, 896)],
        );
        b.strukt("cgroup_subsys_state", 8, &[("cgroup", ptr, 0)]);
        b.strukt(
            "cgroup",
            24,
            &[
                ("level", int, 0),
                ("kn", ptr, 64),
                (ancestors, flexible, 128),
            ],
        );
        b.strukt("kernfs_node", 16, &[("id", long, 0), ("name", ptr, 64)]);
        let fields = b.strukt(
            "",
            12,
            &[
                ("si_signo", int, 0),
                ("si_errno", int, 32),
                ("si_code", int, 64),
            ],
        );
        b.strukt("kernel_siginfo", 12, &[("", fields, 0)]);
        let memory = b.name("memory_cgrp_id");
        let pids = b.name("pids_cgrp_id");
        b.ty(
            "cgroup_subsys_id",
            KIND_ENUM,
            false,
            2,
            4,
            &[memory, 4, pids, 11],
        );
        Btf::parse(b.build()).unwrap()
    }

    #[test]
    fn cgroup_offsets_of_both_ancestor_layouts() {
        let new = cgroup_offsets(&fake_cgroups("ancestors")).unwrap();
        assert_eq!((new.cgroup_ancestors, new.ancestors_are_ids), (16, 0));
        assert_eq!((new.task_struct_cgroups, new.css_set_dfl_cgrp), (32, 112));
        assert_eq!((new.kernfs_node_name, new.kernel_siginfo_code), (8, 8));
        assert_eq!(
            (new.task_struct_thread_pid, new.pid_numbers, new.upid_size),
            (40, 8, 16)
        );
        let old = cgroup_offsets(&fake_cgroups("ancestor_ids")).unwrap();
        assert_eq!((old.cgroup_ancestors, old.ancestors_are_ids), (16, 1));
        assert!(cgroup_offsets(&fake_cgroups("neither")).is_err());
        let btf = fake_cgroups("ancestors");
        assert_eq!(cgroup_subsys_id(&btf, "memory").unwrap(), 4);
        assert_eq!(cgroup_subsys_id(&btf, "pids").unwrap(), 11);
        assert!(matches!(
            cgroup_subsys_id(&btf, "xattr"),
            Err(BtfError::NoSuchMember { .. })
        ));
    }

    fn set_u32(blob: &mut [u8], at: usize, v: u32) {
        blob[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn malformed_msg(blob: Vec<u8>) -> String {
        match Btf::parse(blob) {
            Err(e @ BtfError::Malformed(_)) => e.to_string(),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_headers_are_errors() {
        let good = every_kind(false).build();
        assert!(matches!(Btf::parse(vec![]), Err(BtfError::Malformed(_))));
        assert!(matches!(
            Btf::parse(good[..20].to_vec()),
            Err(BtfError::Malformed(_))
        ));
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(
            Btf::parse(bad).unwrap_err().to_string(),
            "not BTF data: magic is 0xeb00, expected 0xeb9f"
        );
        let mut bad = good.clone();
        bad[2] = 2;
        assert!(matches!(
            Btf::parse(bad),
            Err(BtfError::UnsupportedVersion(2))
        ));
        let mut bad = good.clone();
        set_u32(&mut bad, 4, 1 << 30);
        assert!(malformed_msg(bad).contains("header length"));
        let mut bad = good.clone();
        set_u32(&mut bad, 12, u32::MAX);
        assert!(
            malformed_msg(bad)
                .starts_with("malformed BTF: type section (offset 0, length 4294967295) exceeds")
        );
        let mut bad = good.clone();
        set_u32(&mut bad, 16, good.len() as u32);
        assert!(malformed_msg(bad).contains("string section"));
        // Cut the type section mid-record, and mid-member-list.
        let mut bad = good.clone();
        set_u32(&mut bad, 12, 18);
        assert!(malformed_msg(bad).contains("ends inside a type"));
        let mut bad = good.clone();
        set_u32(&mut bad, 12, 68 + 12 + 4);
        assert!(malformed_msg(bad).contains("type 5 runs past"));
    }

    #[test]
    fn corrupt_types_are_errors() {
        let mut b = Builder::new();
        b.ty("", 20, false, 0, 0, &[]);
        assert_eq!(
            Btf::parse(b.build()).unwrap_err().to_string(),
            "BTF type id 1 has unknown kind 20"
        );

        let mut b = Builder::new();
        b.ty("", KIND_STRUCT, false, 0, 0, &[]);
        let mut blob = b.build();
        set_u32(&mut blob, 24, 1000); // name_off past the strings
        assert!(malformed_msg(blob).contains("string offset 1000 out of range"));

        let mut b = Builder::new();
        b.strukt("s", 4, &[]);
        let mut blob = b.build();
        blob.pop(); // drop the final NUL
        let str_len = blob.len() as u32 - 24 - 12;
        set_u32(&mut blob, 20, str_len);
        assert!(malformed_msg(blob).contains("not terminated"));

        // A typedef cycle and a dangling type id surface as errors at lookup.
        let mut b = Builder::new();
        b.ty("loop", KIND_TYPEDEF, false, 0, 1, &[]);
        b.strukt("s", 8, &[("", 1, 0), ("x", 99, 0)]);
        let btf = Btf::parse(b.build()).unwrap();
        assert!(
            btf.member_offset("s", "x")
                .unwrap_err()
                .to_string()
                .contains("too long")
        );
        let mut b = Builder::new();
        b.strukt("s", 8, &[("x", 99, 0)]);
        let btf = Btf::parse(b.build()).unwrap();
        assert!(
            btf.member_size("s", "x")
                .unwrap_err()
                .to_string()
                .contains("missing type id 99")
        );

        // A struct that contains itself anonymously.
        let mut b = Builder::new();
        b.strukt("s", 8, &[("", 1, 0)]);
        let btf = Btf::parse(b.build()).unwrap();
        assert!(
            btf.member_offset("s", "x")
                .unwrap_err()
                .to_string()
                .contains("nested too deeply")
        );
    }

    #[test]
    fn mangled_blobs_never_panic() {
        let good = every_kind(false).build();
        let probe = |blob: Vec<u8>| {
            if let Ok(btf) = Btf::parse(blob) {
                for f in ["a", "inner", "p", "arr", "q", "nope"] {
                    let _ = btf.member_offset("s", f);
                    let _ = btf.member_size("s", f);
                }
            }
        };
        for len in 0..good.len() {
            probe(good[..len].to_vec());
        }
        for at in 0..good.len() {
            for v in [0x00, 0x01, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[at] = v;
                probe(bad);
            }
        }
    }
}
