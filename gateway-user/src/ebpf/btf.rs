//! Member offsets of kernel structs, read from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The Unix connect hook reads the connecting address out of `struct bpf_sock_addr_kern`,
//! which is not part of any stable interface. BTF describes the running kernel's types, so
//! the daemon checks the offsets the program reads against it before attaching it.
//!
//! Only what that needs is decoded (the header, and each type's size so the walk can skip
//! it; the members of structs). Pure: takes the bytes, returns offsets.

use std::collections::HashMap;

/// Where the running kernel publishes its BTF.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;
/// Past the last kind this decoder knows how to skip.
const KIND_MAX: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF (bad magic or header)")]
    Header,
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    #[error("BTF type kind {0} unknown to this daemon")]
    UnknownKind(u32),
    #[error("struct {0} not in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("{0}.{1} is a bit field")]
    BitField(String, String),
}

/// `(struct, member)` → byte offset, for each pair asked for, in one walk over the types.
pub fn member_offsets(
    btf: &[u8],
    wanted: &[(&str, &str)],
) -> Result<HashMap<(String, String), u32>, BtfError> {
    let r = Reader(btf);
    if btf.len() < 24 || r.u16(0)? != MAGIC {
        return Err(BtfError::Header);
    }
    let hdr_len = r.u32(4)? as usize;
    let type_off = r.u32(8)? as usize;
    let type_len = r.u32(12)? as usize;
    let str_off = r.u32(16)? as usize;
    let str_len = r.u32(20)? as usize;
    let types = hdr_len.checked_add(type_off).ok_or(BtfError::Header)?;
    let types_end = types.checked_add(type_len).ok_or(BtfError::Header)?;
    let strings = hdr_len.checked_add(str_off).ok_or(BtfError::Header)?;
    let strings_end = strings.checked_add(str_len).ok_or(BtfError::Header)?;
    if types_end > btf.len() || strings_end > btf.len() {
        return Err(BtfError::Truncated(btf.len()));
    }
    let name = |off: u32| -> &[u8] {
        let start = strings + off as usize;
        if start >= strings_end {
            return b"";
        }
        let s = &btf[start..strings_end];
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    };
    let mut found = HashMap::new();
    let mut at = types;
    while at < types_end && found.len() < wanted.len() {
        let name_off = r.u32(at)?;
        let info = r.u32(at + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let body = at + 12;
        let extra = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
            KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
            k if k <= KIND_MAX => 0,
            k => return Err(BtfError::UnknownKind(k)),
        };
        if kind == KIND_STRUCT {
            let struct_name = name(name_off);
            for &(s, member) in wanted {
                if s.as_bytes() != struct_name || found.contains_key(&(s.into(), member.into())) {
                    continue;
                }
                let mut offset = None;
                for m in 0..vlen {
                    let m_at = body + 12 * m;
                    if name(r.u32(m_at)?) == member.as_bytes() {
                        let raw = r.u32(m_at + 8)?;
                        // With kind_flag the top byte is a bit field's size.
                        let (bits, size) = if kind_flag {
                            (raw & 0x00ff_ffff, raw >> 24)
                        } else {
                            (raw, 0)
                        };
                        if size != 0 || bits % 8 != 0 {
                            return Err(BtfError::BitField(s.into(), member.into()));
                        }
                        offset = Some(bits / 8);
                        break;
                    }
                }
                let offset = offset.ok_or_else(|| BtfError::NoMember(s.into(), member.into()))?;
                found.insert((s.into(), member.into()), offset);
            }
        }
        at = body + extra;
    }
    for &(s, m) in wanted {
        if !found.contains_key(&(s.into(), m.into())) {
            return Err(BtfError::NoStruct(s.into()));
        }
    }
    Ok(found)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&self, at: usize) -> Result<u32, BtfError> {
        let b = self.0.get(at..at + 4).ok_or(BtfError::Truncated(at))?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u16(&self, at: usize) -> Result<u16, BtfError> {
        let b = self.0.get(at..at + 2).ok_or(BtfError::Truncated(at))?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with one int and the given structs (name, members (name, bit offset)).
    fn blob(structs: &[(&str, &[(&str, u32)])]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut add = |s: &str| {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let mut types = Vec::new();
        let int = add("int");
        for v in [int, KIND_INT << 24, 4, 32] {
            types.extend_from_slice(&v.to_le_bytes());
        }
        for (name, members) in structs {
            let n = add(name);
            for v in [n, (KIND_STRUCT << 24) | members.len() as u32, 64] {
                types.extend_from_slice(&v.to_le_bytes());
            }
            for (m, bits) in *members {
                for v in [add(m), 1, *bits] {
                    types.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn offsets_of_the_members_asked_for() {
        let b = blob(&[
            ("other", &[("uaddr", 0)]),
            (
                "bpf_sock_addr_kern",
                &[("sk", 0), ("uaddr", 64), ("uaddrlen", 256)],
            ),
        ]);
        let o = member_offsets(
            &b,
            &[
                ("bpf_sock_addr_kern", "uaddr"),
                ("bpf_sock_addr_kern", "uaddrlen"),
            ],
        )
        .expect("found");
        let at = |m: &str| o[&("bpf_sock_addr_kern".to_owned(), m.to_owned())];
        assert_eq!((at("uaddr"), at("uaddrlen")), (8, 32));
    }

    #[test]
    fn what_is_missing_or_malformed_is_an_error() {
        let b = blob(&[("unix_sock", &[("sk", 0)])]);
        assert_eq!(
            member_offsets(&b, &[("unix_sock", "addr")]),
            Err(BtfError::NoMember("unix_sock".into(), "addr".into()))
        );
        assert_eq!(
            member_offsets(&b, &[("unix_address", "len")]),
            Err(BtfError::NoStruct("unix_address".into()))
        );
        assert_eq!(
            member_offsets(&b, &[("unix_sock", "sk")]).map(|m| m.len()),
            Ok(1)
        );
        assert_eq!(
            member_offsets(&b[..30], &[("unix_sock", "sk")]),
            Err(BtfError::Truncated(30))
        );
        assert_eq!(
            member_offsets(b"not btf at all, no, not at all", &[]),
            Err(BtfError::Header)
        );
        let bits = blob(&[("unix_sock", &[("addr", 3)])]);
        assert!(matches!(
            member_offsets(&bits, &[("unix_sock", "addr")]),
            Err(BtfError::BitField(..))
        ));
    }
}
