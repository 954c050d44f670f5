//! The few facts the `tp_btf` programs need from the kernel's BTF (`/sys/kernel/btf/vmlinux`):
//! where `struct request` keeps its sector, length and flags, how to reach the disk's device
//! number, and which bits of `cmd_flags` are FUA, PREFLUSH and SYNC. Rust aya programs have no
//! CO-RE relocations, so these offsets are resolved here at load time and handed to the programs
//! as read-only globals ([`BtfLayout`]); nothing is hard-coded per kernel.
//!
//! The BTF format (`Documentation/bpf/btf.rst`): a header, then the type section, a sequence of
//! 12-byte `btf_type` records (`name_off`, `info` = kind << 24 | vlen, `size_or_type`) each
//! followed by kind-specific data, numbered from 1; then the string section.

use drv_ebpf_common::BtfLayout;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("kernel BTF: {0}")]
    Malformed(String),
    #[error("kernel BTF has no {0}")]
    Missing(String),
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// Struct members: (name, type, bit offset); enum values: (name, value, 0).
    members: Vec<(u32, u32, u32)>,
}

/// A parsed type section with its strings.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| BtfError::Malformed(format!("truncated at byte {at}")))
}

impl Btf {
    pub fn parse(b: &[u8]) -> Result<Btf, BtfError> {
        if b.len() < 24 || b[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)".into()));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let section = |off: usize, len: usize| {
            b.get(hdr_len + off..hdr_len + off + len).ok_or_else(|| BtfError::Malformed("section past the end".into()))
        };
        let (t, strings) = (section(type_off, type_len)?, section(str_off, str_len)?.to_vec());
        let mut types = vec![Type { kind: 0, name: 0, kind_flag: false, size_or_type: 0, members: Vec::new() }];
        let mut at = 0;
        while at < t.len() {
            let (name, info, size_or_type) = (u32_at(t, at)?, u32_at(t, at + 4)?, u32_at(t, at + 8)?);
            at += 12;
            let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                4 | 5 => {
                    // STRUCT, UNION
                    for i in 0..vlen {
                        let m = at + i * 12;
                        members.push((u32_at(t, m)?, u32_at(t, m + 4)?, u32_at(t, m + 8)?));
                    }
                    12 * vlen
                }
                6 => {
                    for i in 0..vlen {
                        members.push((u32_at(t, at + i * 8)?, u32_at(t, at + i * 8 + 4)?, 0));
                    }
                    8 * vlen
                }
                13 => 8 * vlen,  // FUNC_PROTO
                15 => 12 * vlen, // DATASEC
                19 => {
                    for i in 0..vlen {
                        members.push((u32_at(t, at + i * 12)?, u32_at(t, at + i * 12 + 4)?, 0));
                    }
                    12 * vlen
                }
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                k => return Err(BtfError::Malformed(format!("unknown kind {k} at type {}", types.len()))),
            };
            at += extra;
            types.push(Type { kind, name, kind_flag, size_or_type, members });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
    }

    fn find(&self, kind: u32, name: &str) -> Result<&Type, BtfError> {
        self.types
            .iter()
            .find(|t| t.kind == kind && !t.members.is_empty() && self.name(t.name) == name.as_bytes())
            .ok_or_else(|| BtfError::Missing(format!("{} {name}", if kind == KIND_STRUCT { "struct" } else { "enum" })))
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> &Type {
        loop {
            let t = &self.types[id as usize];
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.size_or_type,
                _ => return t,
            }
        }
    }

    /// Byte offset of member `member` of struct `strukt` and its type (resolved), refusing
    /// bitfields.
    fn member(&self, strukt: &str, member: &str) -> Result<(u32, &Type), BtfError> {
        let s = self.find(KIND_STRUCT, strukt)?;
        let &(_, ty, off) = s
            .members
            .iter()
            .find(|(n, _, _)| self.name(*n) == member.as_bytes())
            .ok_or_else(|| BtfError::Missing(format!("member {member} in struct {strukt}")))?;
        let bits = if s.kind_flag { off & 0xff_ffff } else { off };
        if bits % 8 != 0 || (s.kind_flag && off >> 24 != 0) {
            return Err(BtfError::Malformed(format!("{strukt}.{member} is a bitfield")));
        }
        Ok((bits / 8, self.resolve(ty)))
    }

    fn scalar(&self, strukt: &str, member: &str, size: u32) -> Result<u32, BtfError> {
        let (off, t) = self.member(strukt, member)?;
        if t.kind != KIND_INT && t.kind != KIND_ENUM || t.size_or_type != size {
            return Err(BtfError::Malformed(format!("{strukt}.{member} is not a {size}-byte integer")));
        }
        Ok(off)
    }

    fn pointer(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let (off, t) = self.member(strukt, member)?;
        if t.kind != KIND_PTR {
            return Err(BtfError::Malformed(format!("{strukt}.{member} is not a pointer")));
        }
        Ok(off)
    }

    fn enum_value(&self, enumeration: &str, name: &str) -> Result<u32, BtfError> {
        let e = self
            .types
            .iter()
            .find(|t| (t.kind == KIND_ENUM || t.kind == KIND_ENUM64) && self.name(t.name) == enumeration.as_bytes())
            .ok_or_else(|| BtfError::Missing(format!("enum {enumeration}")))?;
        e.members
            .iter()
            .find(|(n, _, _)| self.name(*n) == name.as_bytes())
            .map(|m| m.1)
            .ok_or_else(|| BtfError::Missing(format!("{name} in enum {enumeration}")))
    }

    /// What the `tp_btf` programs read, from this kernel's types.
    pub fn layout(&self) -> Result<BtfLayout, BtfError> {
        let bit = |name: &str| -> Result<u32, BtfError> {
            let b = self.enum_value("req_flag_bits", name)?;
            if b >= 32 {
                return Err(BtfError::Malformed(format!("{name} is bit {b}, past the 32-bit cmd_flags")));
            }
            Ok(b)
        };
        Ok(BtfLayout {
            rq_q: self.pointer("request", "q")?,
            rq_sector: self.scalar("request", "__sector", 8)?,
            rq_data_len: self.scalar("request", "__data_len", 4)?,
            rq_cmd_flags: self.scalar("request", "cmd_flags", 4)?,
            q_disk: self.pointer("request_queue", "disk")?,
            disk_major: self.scalar("gendisk", "major", 4)?,
            disk_first_minor: self.scalar("gendisk", "first_minor", 4)?,
            fua_bit: bit("__REQ_FUA")?,
            preflush_bit: bit("__REQ_PREFLUSH")?,
            sync_bit: bit("__REQ_SYNC")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF, where there is one (the host here has it; the layout must come
    /// out whole and plausible).
    #[test]
    fn the_running_kernels_request_layout_resolves() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("no kernel BTF here: nothing to check");
            return;
        };
        let l = Btf::parse(&data).unwrap().layout().unwrap();
        assert!(l.rq_sector > l.rq_q && l.rq_cmd_flags > l.rq_q, "{l:?}");
        assert!(l.fua_bit > 8 && l.preflush_bit > 8 && l.sync_bit > 8, "flags above the 8 op bits: {l:?}");
        assert_ne!(l.fua_bit, l.preflush_bit);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(matches!(Btf::parse(b"not btf at all, clearly"), Err(BtfError::Malformed(_))));
        let mut hdr = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 100, 100, 10] {
            hdr.extend_from_slice(&v.to_le_bytes());
        }
        let e = Btf::parse(&hdr).err().unwrap();
        assert!(e.to_string().contains("past the end"), "{e}");
    }
}
