//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find
//! the byte offset of a struct member by name, following anonymous structs and unions,
//! and the value of an enumerator.
//!
//! The kernel programs are written in Rust, which emits no CO-RE relocations, so every
//! kernel struct field they read is located here, at start, on the running kernel.

use std::{collections::HashMap, path::Path};

use anyhow::{bail, ensure, Context as _, Result};

const BTF_MAGIC: u16 = 0xeb9f;

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

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    /// Size for sized kinds, referenced type for modifiers and pointers.
    size_or_type: u32,
    members: Vec<Member>,
    /// Element type of an array; number of parameters of a function prototype.
    array_elem: u32,
}

/// Where a member lives inside its outermost struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLocation {
    pub byte_offset: u32,
    /// Size in bytes of the member's type (after typedefs and qualifiers).
    pub size: u32,
    /// Non-zero for bitfields.
    pub bitfield_size: u32,
}

pub struct Btf {
    types: Vec<Type>, // index = type id; id 0 is void
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
    /// Enumerator name → value, for every enum (enumerator names are global in C).
    enumerators: HashMap<String, i64>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| {
            format!("reading kernel BTF from {} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)", path.display())
        })?;
        Self::parse(&data).with_context(|| format!("parsing BTF from {}", path.display()))
    }

    pub fn parse(data: &[u8]) -> Result<Self> {
        let u16_at = |off: usize| -> Result<u16> {
            let b = data.get(off..off + 2).context("BTF truncated")?;
            Ok(u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |off: usize| -> Result<u32> {
            let b = data.get(off..off + 4).context("BTF truncated")?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        ensure!(u16_at(0)? == BTF_MAGIC, "not little-endian BTF (bad magic)");
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?
            .to_vec();

        let mut types = vec![Type { name: 0, kind: 0, size_or_type: 0, members: Vec::new(), array_elem: 0 }];
        let mut enumerators = Vec::new();
        let mut pos = hdr_len + type_off;
        let end = pos + type_len;
        while pos < end {
            let name = u32_at(pos)?;
            let info = u32_at(pos + 4)?;
            let size_or_type = u32_at(pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type { name, kind, size_or_type, members: Vec::new(), array_elem: 0 };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => pos += 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | KIND_FLOAT | KIND_TYPE_TAG => {}
                KIND_ARRAY => {
                    ty.array_elem = u32_at(pos)?;
                    pos += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let offset = u32_at(m + 8)?;
                        let (bit_offset, bitfield_size) =
                            if kind_flag { (offset & 0xff_ffff, offset >> 24) } else { (offset, 0) };
                        ty.members.push(Member {
                            name: u32_at(m)?,
                            type_id: u32_at(m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    pos += vlen * 12;
                }
                KIND_ENUM => {
                    for i in 0..vlen {
                        let e = pos + i * 8;
                        let raw = u32_at(e + 4)?;
                        let value = if kind_flag { raw as i32 as i64 } else { raw as i64 };
                        enumerators.push((u32_at(e)?, value));
                    }
                    pos += vlen * 8;
                }
                KIND_ENUM64 => {
                    for i in 0..vlen {
                        let e = pos + i * 12;
                        let value = (u32_at(e + 4)? as u64 | (u32_at(e + 8)? as u64) << 32) as i64;
                        enumerators.push((u32_at(e)?, value));
                    }
                    pos += vlen * 12;
                }
                KIND_FUNC_PROTO => {
                    ty.array_elem = vlen as u32;
                    pos += vlen * 8;
                }
                KIND_DATASEC => pos += vlen * 12,
                other => bail!("unknown BTF kind {other}"),
            }
            types.push(ty);
        }

        let mut btf = Btf { types, strings, structs_by_name: HashMap::new(), enumerators: HashMap::new() };
        for (name, value) in enumerators {
            let name = btf.name(name).to_owned();
            btf.enumerators.entry(name).or_insert(value);
        }
        for id in 1..btf.types.len() as u32 {
            let ty = &btf.types[id as usize];
            if ty.kind == KIND_STRUCT && ty.size_or_type > 0 {
                let name = btf.name(ty.name).to_owned();
                btf.structs_by_name.entry(name).or_insert(id);
            }
        }
        Ok(btf)
    }

    /// The value of enumerator `name` (e.g. `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW`), if
    /// this kernel has it.
    pub fn enumerator(&self, name: &str) -> Option<i64> {
        self.enumerators.get(name).copied()
    }

    /// How many parameters kernel function `name` takes, if BTF describes it.
    pub fn function_params(&self, name: &str) -> Option<u32> {
        let func = self.types.iter().find(|t| t.kind == KIND_FUNC && self.name(t.name) == name)?;
        let proto = self.types.get(func.size_or_type as usize)?;
        (proto.kind == KIND_FUNC_PROTO).then_some(proto.array_elem)
    }

    fn name(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..len]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize).map(|t| t.kind) {
                Some(KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) => {
                    id = self.types[id as usize].size_or_type
                }
                _ => break,
            }
        }
        id
    }

    fn size_of(&self, id: u32) -> u32 {
        let id = self.resolve(id);
        let Some(ty) = self.types.get(id as usize) else { return 0 };
        match ty.kind {
            KIND_PTR => 8,
            KIND_ARRAY => 0, // not needed: arrays are read through their own offsets
            _ => ty.size_or_type,
        }
    }

    /// Finds `member` in struct/union `id`, looking through anonymous members.
    fn find_member(&self, id: u32, member: &str) -> Option<(u32, &Member)> {
        let ty = self.types.get(self.resolve(id) as usize)?;
        if ty.kind != KIND_STRUCT && ty.kind != KIND_UNION {
            return None;
        }
        for m in &ty.members {
            if self.name(m.name) == member {
                return Some((m.bit_offset, m));
            }
        }
        for m in ty.members.iter().filter(|m| m.name == 0) {
            if let Some((bits, found)) = self.find_member(m.type_id, member) {
                return Some((m.bit_offset + bits, found));
            }
        }
        None
    }

    /// Byte offset of `path` (members separated by dots, e.g.
    /// `"__sk_common.skc_family"`) inside `struct struct_name`.
    pub fn field(&self, struct_name: &str, path: &str) -> Result<FieldLocation> {
        let mut id = *self
            .structs_by_name
            .get(struct_name)
            .with_context(|| format!("struct {struct_name} not in the kernel's BTF"))?;
        let mut bits = 0;
        let mut last = None;
        for part in path.split('.') {
            let (offset, member) = self
                .find_member(id, part)
                .with_context(|| format!("no member {part} in struct {struct_name} (path {path})"))?;
            bits += offset;
            id = member.type_id;
            last = Some(member);
        }
        let member = last.context("empty member path")?;
        if member.bitfield_size == 0 {
            ensure!(bits % 8 == 0, "{struct_name}.{path} is not byte aligned");
        }
        Ok(FieldLocation {
            byte_offset: bits / 8,
            size: if member.bitfield_size > 0 { 0 } else { self.size_of(member.type_id) },
            bitfield_size: member.bitfield_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob by hand: struct outer { int a; union { int b; struct { short c;
    /// short d; }; }; }; enum reason { R_LOW = 2, R_HIGH = 7 }; int recv(int a, short b);
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0short\0outer\0a\0b\0c\0d\0reason\0R_LOW\0R_HIGH\0recv\0".to_vec();
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() as u32 + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: short
        push(&[s("short"), KIND_INT << 24, 2, 16]);
        // 3: anonymous struct { short c; short d; }
        push(&[0, KIND_STRUCT << 24 | 2, 4, s("c"), 2, 0, s("d"), 2, 16]);
        // 4: anonymous union { int b; struct 3; }
        push(&[0, KIND_UNION << 24 | 2, 4, s("b"), 1, 0, 0, 3, 0]);
        // 5: struct outer { int a; union 4; }
        push(&[s("outer"), KIND_STRUCT << 24 | 2, 8, s("a"), 1, 0, 0, 4, 32]);
        // 6: enum reason
        push(&[s("reason"), KIND_ENUM << 24 | 2, 4, s("R_LOW"), 2, s("R_HIGH"), 7]);
        // 7: prototype int (int a, short b); 8: function recv
        push(&[0, KIND_FUNC_PROTO << 24 | 2, 1, s("a"), 1, s("b"), 2]);
        push(&[s("recv"), KIND_FUNC << 24, 7]);
        let mut blob = Vec::new();
        for w in [0x0001_eb9fu32, 24, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_structs() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.field("outer", "a").unwrap().byte_offset, 0);
        assert_eq!(btf.field("outer", "b").unwrap().byte_offset, 4);
        assert_eq!(btf.field("outer", "c").unwrap(), FieldLocation { byte_offset: 4, size: 2, bitfield_size: 0 });
        assert_eq!(btf.field("outer", "d").unwrap().byte_offset, 6);
        assert!(btf.field("outer", "e").is_err());
        assert!(btf.field("missing", "a").is_err());
    }

    #[test]
    fn finds_enumerators() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.enumerator("R_LOW"), Some(2));
        assert_eq!(btf.enumerator("R_HIGH"), Some(7));
        assert_eq!(btf.enumerator("R_NONE"), None);
    }

    #[test]
    fn counts_function_parameters() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.function_params("recv"), Some(2));
        assert_eq!(btf.function_params("send"), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(&[0u8; 8]).is_err());
    }
}
