//! Just enough of a BTF reader to find struct member offsets in the running kernel's
//! `/sys/kernel/btf/vmlinux`, so the eBPF programs read `struct net_device` and friends at the
//! offsets this kernel uses (aya-ebpf has no CO-RE relocations; the offsets go in as globals).
//!
//! Format: `include/uapi/linux/btf.h` (stable since Linux 5.2).
use std::{collections::HashMap, path::Path};

use thiserror::Error;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error(
        "cannot read {path}: {message}. Kernel BTF (CONFIG_DEBUG_INFO_BTF) is needed to classify NIC events"
    )]
    Read { path: String, message: String },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("{0} is a bitfield; only whole members can be read")]
    Bitfield(String),
}

const MAGIC: u16 = 0xeb9f;

/// Anonymous structs and unions nest a few levels in real kernels (`net_device` has 2).
const MAX_ANONYMOUS_DEPTH: u32 = 16;
/// Members one lookup may visit: real structs have hundreds, and a malformed blob whose anonymous
/// members share types could otherwise make a lookup visit exponentially many.
const MAX_MEMBER_VISITS: u32 = 100_000;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A member of a struct or union, decoded when looked at.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield: bool,
}

/// A type record's header, decoded when looked at.
#[derive(Clone, Copy, Debug)]
struct Type {
    kind: u32,
    name_off: u32,
    /// The referenced type for PTR, TYPEDEF, CONST, VOLATILE, RESTRICT, TYPE_TAG; element type for ARRAY.
    target: u32,
    /// Where a struct's or union's members start in the type section, and how many there are.
    members_at: usize,
    vlen: usize,
    kind_flag: bool,
}

/// What a member is, as far as the programs care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Pointer,
    Array,
    Other,
}

/// A member's byte offset from the start of the outermost struct, and its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub offset: u32,
    pub shape: Shape,
}

/// The kernel's BTF, read once and decoded only where a lookup goes: the type section is walked
/// once to know where each type starts, and struct names are indexed; members and other names
/// are decoded when a lookup reaches them (vmlinux has over 100,000 types, of which a few dozen
/// are ever looked at).
pub struct Btf {
    data: Vec<u8>,
    /// The type and string sections' places in `data`.
    types: std::ops::Range<usize>,
    strings: std::ops::Range<usize>,
    /// Where type id `i` starts in the type section (`offsets[0]` stands for `void`).
    offsets: Vec<u32>,
    /// Named structs with members: name -> type id (the first, if several share a name).
    structs: HashMap<Box<[u8]>, u32>,
}

fn u16_at(data: &[u8], at: usize) -> Result<u16, BtfError> {
    data.get(at..at + 2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path)
            .map_err(|e| BtfError::Read { path: path.display().to_string(), message: e.to_string() })?;
        Self::index(data)
    }

    /// The running kernel's BTF.
    pub fn vmlinux() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    /// Parses little-endian BTF (x86_64 and arm64 kernels are little-endian).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        Self::index(data.to_vec())
    }

    fn index(data: Vec<u8>) -> Result<Self, BtfError> {
        if u16_at(&data, 0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let section = |off: usize, len: usize| -> Result<std::ops::Range<usize>, BtfError> {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Malformed("section offset overflows"))?;
            let end = start.checked_add(len).ok_or(BtfError::Malformed("section length overflows"))?;
            data.get(start..end).map(|_| start..end).ok_or(BtfError::Malformed("section out of bounds"))
        };
        let types = section(u32_at(&data, 8)? as usize, u32_at(&data, 12)? as usize)
            .map_err(|_| BtfError::Malformed("type section out of bounds"))?;
        let strings = section(u32_at(&data, 16)? as usize, u32_at(&data, 20)? as usize)
            .map_err(|_| BtfError::Malformed("string section out of bounds"))?;
        let mut btf = Self { data, types, strings, offsets: vec![0], structs: HashMap::new() };
        let end = btf.types.len();
        let mut at = 0;
        while at < end {
            let id = u32::try_from(btf.offsets.len()).map_err(|_| BtfError::Malformed("too many types"))?;
            btf.offsets.push(u32::try_from(at).map_err(|_| BtfError::Malformed("type section too large"))?);
            let ty = btf.header(at)?;
            at += 12;
            at += match ty.kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * ty.vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * ty.vlen,
                _ => 0,
            };
            if ty.kind == KIND_STRUCT && ty.vlen > 0 && ty.name_off != 0 {
                let name: Box<[u8]> = btf.name(ty.name_off).into();
                btf.structs.entry(name).or_insert(id);
            }
        }
        if at > end {
            return Err(BtfError::Malformed("truncated"));
        }
        Ok(btf)
    }

    /// The type record starting at `at` in the type section.
    fn header(&self, at: usize) -> Result<Type, BtfError> {
        let types = &self.data[self.types.clone()];
        let info = u32_at(types, at + 4)?;
        let size_or_type = u32_at(types, at + 8)?;
        let kind = (info >> 24) & 0x1f;
        let target = match kind {
            KIND_ARRAY => u32_at(types, at + 12)?,
            KIND_PTR | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                size_or_type
            }
            _ => 0,
        };
        Ok(Type {
            kind,
            name_off: u32_at(types, at)?,
            target,
            members_at: at + 12,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
        })
    }

    /// A name from the string section (empty when out of range).
    fn name(&self, offset: u32) -> &[u8] {
        let strings = &self.data[self.strings.clone()];
        let rest = strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Member `index` of a struct or union.
    fn member_of(&self, ty: &Type, index: usize) -> Result<Member, BtfError> {
        let types = &self.data[self.types.clone()];
        let at = ty.members_at + 12 * index;
        let offset = u32_at(types, at + 8)?;
        Ok(Member {
            name_off: u32_at(types, at)?,
            type_id: u32_at(types, at + 4)?,
            bit_offset: if ty.kind_flag { offset & 0x00ff_ffff } else { offset },
            bitfield: ty.kind_flag && offset >> 24 != 0,
        })
    }

    fn ty(&self, id: u32) -> Result<Type, BtfError> {
        if id == 0 {
            // `void`.
            return Ok(Type { kind: 0, name_off: 0, target: 0, members_at: 0, vlen: 0, kind_flag: false });
        }
        let at = self.offsets.get(id as usize).ok_or(BtfError::Malformed("type id out of range"))?;
        self.header(*at as usize)
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Result<Type, BtfError> {
        for _ in 0..32 {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = ty.target,
                _ => return Ok(ty),
            }
        }
        Err(BtfError::Malformed("type chain too long"))
    }

    /// Finds `member` in `ty`, looking inside anonymous struct and union members (at most
    /// [`MAX_ANONYMOUS_DEPTH`] deep: a malformed blob can make a type contain itself).
    fn find_member(
        &self,
        ty: &Type,
        member: &str,
        base_bits: u32,
        depth: u32,
        visits: &mut u32,
    ) -> Result<Option<(u32, u32, bool)>, BtfError> {
        if depth > MAX_ANONYMOUS_DEPTH {
            return Err(BtfError::Malformed("anonymous members nested too deep (a cycle?)"));
        }
        if !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
            return Ok(None);
        }
        for index in 0..ty.vlen {
            *visits += 1;
            if *visits > MAX_MEMBER_VISITS {
                return Err(BtfError::Malformed("too many members visited (shared anonymous members?)"));
            }
            let m = self.member_of(ty, index)?;
            let bits =
                base_bits.checked_add(m.bit_offset).ok_or(BtfError::Malformed("member offset overflows"))?;
            let name = self.name(m.name_off);
            if name == member.as_bytes() {
                return Ok(Some((bits, m.type_id, m.bitfield)));
            }
            if name.is_empty() {
                let inner = self.resolve(m.type_id)?;
                if let Some(found) = self.find_member(&inner, member, bits, depth + 1, visits)? {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    /// The byte offset of a member path such as `dev.kobj.name` inside `struct strukt`; every
    /// step but the last must be an embedded struct or union.
    pub fn member(&self, strukt: &str, path: &str) -> Result<MemberInfo, BtfError> {
        let id = *self.structs.get(strukt.as_bytes()).ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut ty = self.ty(id)?;
        let mut bits = 0;
        let mut shape = Shape::Other;
        let steps: Vec<&str> = path.split('.').collect();
        for (i, step) in steps.iter().enumerate() {
            let (offset, type_id, bitfield) =
                self.find_member(&ty, step, bits, 0, &mut 0)?.ok_or_else(|| BtfError::NoMember {
                    strukt: format!("{strukt} ({})", steps[..i].join(".")),
                    member: (*step).to_owned(),
                })?;
            if bitfield {
                return Err(BtfError::Bitfield(format!("{strukt}.{path}")));
            }
            bits = offset;
            let resolved = self.resolve(type_id)?;
            shape = match resolved.kind {
                KIND_PTR => Shape::Pointer,
                KIND_ARRAY => Shape::Array,
                _ => Shape::Other,
            };
            ty = resolved;
        }
        if bits % 8 != 0 {
            return Err(BtfError::Bitfield(format!("{strukt}.{path}")));
        }
        Ok(MemberInfo { offset: bits / 8, shape })
    }
}

/// BTF blobs built in tests: a string table and type records, little-endian.
#[cfg(test)]
pub(crate) mod test_blob {
    use super::{KIND_ARRAY, KIND_INT, KIND_STRUCT, KIND_UNION, MAGIC};

    /// A member's type in [`structure`].
    #[derive(Clone, Copy)]
    pub enum Member {
        U64,
    }

    #[derive(Default)]
    struct Builder {
        strings: Vec<u8>,
        types: Vec<u32>,
        count: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self { strings: vec![0], ..Self::default() }
        }

        fn string(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend(name.as_bytes());
            self.strings.push(0);
            at
        }

        /// Adds a type record; returns its id.
        fn add(&mut self, record: &[u32]) -> u32 {
            self.types.extend(record);
            self.count += 1;
            self.count
        }

        fn u64(&mut self) -> u32 {
            let name = self.string("u64");
            self.add(&[name, KIND_INT << 24, 8, 64])
        }

        /// A struct or union of `(name, type id, byte offset)` members.
        fn aggregate(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let name = self.string(name);
            let mut record = vec![name, (kind << 24) | members.len() as u32, size];
            for (member, ty, offset) in members {
                let member = self.string(member);
                record.extend([member, *ty, offset * 8]);
            }
            self.add(&record)
        }

        fn finish(self) -> Vec<u8> {
            assemble(&self.types, &self.strings)
        }
    }

    /// A BTF blob: the header, then the type records (`u32` words) and the string table.
    pub fn assemble(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend(MAGIC.to_le_bytes());
        blob.extend([1u8, 0]); // version, flags
        blob.extend(24u32.to_le_bytes()); // hdr_len
        blob.extend(0u32.to_le_bytes()); // type_off
        blob.extend((type_bytes.len() as u32).to_le_bytes());
        blob.extend((type_bytes.len() as u32).to_le_bytes()); // str_off
        blob.extend((strings.len() as u32).to_le_bytes());
        blob.extend(type_bytes);
        blob.extend(strings);
        blob
    }

    /// `struct <name> { u64 <member>; ... }`, members in order.
    pub fn structure(name: &str, members: &[(&str, Member)]) -> Vec<u8> {
        let mut b = Builder::new();
        let u64 = b.u64();
        let laid: Vec<(&str, u32, u32)> = members
            .iter()
            .enumerate()
            .map(|(i, (member, Member::U64))| (*member, u64, i as u32 * 8))
            .collect();
        b.aggregate(KIND_STRUCT, name, members.len() as u32 * 8, &laid);
        b.finish()
    }

    /// arm64's `struct pt_regs { union { struct user_pt_regs user_regs; struct { u64 regs[31];
    /// u64 sp; u64 pc; u64 pstate; }; }; u64 orig_x0; ... }`.
    pub fn arm64_pt_regs() -> Vec<u8> {
        let mut b = Builder::new();
        let u64 = b.u64();
        let int = {
            let name = b.string("int");
            b.add(&[name, KIND_INT << 24, 4, 32])
        };
        let regs = b.add(&[0, KIND_ARRAY << 24, 0, u64, int, 31]);
        let fields = [("regs", regs, 0), ("sp", u64, 248), ("pc", u64, 256), ("pstate", u64, 264)];
        let user = b.aggregate(KIND_STRUCT, "user_pt_regs", 272, &fields);
        let anonymous = b.aggregate(KIND_STRUCT, "", 272, &fields);
        let union = b.aggregate(KIND_UNION, "", 272, &[("user_regs", user, 0), ("", anonymous, 0)]);
        b.aggregate(KIND_STRUCT, "pt_regs", 336, &[("", union, 0), ("orig_x0", u64, 272)]);
        b.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: `struct inner { int a; char *p; }`,
    /// `struct outer { int x; struct inner in; union { int u; }; char arr[4]; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0p\0outer\0x\0in\0u\0arr\0char\0";
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            let pos = strings.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap_or(0);
            (pos + 1) as u32
        };
        let mut types: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        // 1: int
        types.extend([s("int"), info(KIND_INT, 0), 4, 32]);
        // 2: char
        types.extend([s("char"), info(KIND_INT, 0), 1, 8]);
        // 3: char *
        types.extend([0, info(KIND_PTR, 0), 2]);
        // 4: struct inner { int a @0; char *p @64 }
        types.extend([s("inner"), info(KIND_STRUCT, 2), 16, s("a"), 1, 0, s("p"), 3, 64]);
        // 5: union { int u }
        types.extend([0, info(KIND_UNION, 1), 4, s("u"), 1, 0]);
        // 6: char[4]
        types.extend([0, info(KIND_ARRAY, 0), 0, 2, 1, 4]);
        // 7: struct outer { int x @0; struct inner in @64; union @192; char arr[4] @224 }
        types.extend([
            s("outer"),
            info(KIND_STRUCT, 4),
            32,
            s("x"),
            1,
            0,
            s("in"),
            4,
            64,
            0,
            5,
            192,
            s("arr"),
            6,
            224,
        ]);
        test_blob::assemble(&types, strings)
    }

    #[test]
    fn finds_nested_anonymous_and_array_members() -> Result<(), BtfError> {
        let btf = Btf::parse(&sample())?;
        assert_eq!(btf.member("outer", "x")?, MemberInfo { offset: 0, shape: Shape::Other });
        assert_eq!(btf.member("outer", "in.p")?, MemberInfo { offset: 16, shape: Shape::Pointer });
        assert_eq!(btf.member("outer", "u")?, MemberInfo { offset: 24, shape: Shape::Other });
        assert_eq!(btf.member("outer", "arr")?, MemberInfo { offset: 28, shape: Shape::Array });
        Ok(())
    }

    #[test]
    fn a_type_that_contains_itself_is_an_error_not_a_stack_overflow() {
        // Found by the `btf` fuzz target: an anonymous member whose type is its own struct.
        let strings = b"\0outer\0x\0";
        let mut types: Vec<u32> = Vec::new();
        // 1: struct outer { <anonymous> struct outer @0 }
        types.extend([1, (KIND_STRUCT << 24) | 1, 4, 0, 1, 0]);
        let blob = test_blob::assemble(&types, strings);
        let btf = Btf::parse(&blob);
        let Ok(btf) = btf else { panic!("the blob itself is well formed") };
        assert!(matches!(btf.member("outer", "x"), Err(BtfError::Malformed(_))));
    }

    #[test]
    fn shared_anonymous_members_cost_a_bounded_lookup_and_truncation_is_caught() {
        // Twelve levels of structs, each holding three anonymous members of the next: 3^12
        // paths to a member that is not there, unless the lookup stops counting.
        let strings = b"\0outer\0z\0";
        let mut types: Vec<u32> = Vec::new();
        for level in 1..12 {
            let name = if level == 1 { 1 } else { 0 };
            types.extend([name, (KIND_STRUCT << 24) | 3, 4]);
            for _ in 0..3 {
                types.extend([0, level + 1, 0]);
            }
        }
        types.extend([0, (KIND_STRUCT << 24) | 1, 4, 7, 0, 0]);
        let Ok(btf) = Btf::parse(&test_blob::assemble(&types, strings)) else { panic!("well formed") };
        assert_eq!(
            btf.member("outer", "x"),
            Err(BtfError::Malformed("too many members visited (shared anonymous members?)"))
        );
        // A struct that says it has two members and holds one.
        let truncated = [1, (KIND_STRUCT << 24) | 2, 4, 7, 0, 0];
        assert_eq!(
            Btf::parse(&test_blob::assemble(&truncated, strings)).err(),
            Some(BtfError::Malformed("truncated"))
        );
    }

    #[test]
    fn names_what_is_missing() -> Result<(), BtfError> {
        let btf = Btf::parse(&sample())?;
        assert_eq!(btf.member("nope", "x"), Err(BtfError::NoStruct("nope".into())));
        assert!(
            matches!(btf.member("outer", "in.zz"), Err(BtfError::NoMember { ref member, .. }) if member == "zz")
        );
        assert!(matches!(Btf::parse(b"nope"), Err(BtfError::Malformed(_))));
        Ok(())
    }

    #[test]
    fn reads_the_running_kernels_net_device_when_present() -> Result<(), BtfError> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("SKIPPED: no /sys/kernel/btf/vmlinux on this kernel");
            return Ok(());
        }
        let btf = Btf::vmlinux()?;
        let ifindex = btf.member("net_device", "ifindex")?;
        let name = btf.member("net_device", "name")?;
        assert_eq!(name.shape, Shape::Array);
        assert_ne!(ifindex.offset, name.offset);
        assert_eq!(btf.member("device", "kobj.name")?.shape, Shape::Pointer);
        Ok(())
    }
}
