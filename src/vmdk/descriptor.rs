//! The vmdk text descriptor (VMware "Virtual Disk Format 1.1", section
//! "The Descriptor File").
//!
//! A descriptor is a small text file (or a text area inside a hosted sparse
//! extent) with three parts: header keys (`version`, `CID`, `parentCID`,
//! `createType`, `parentFileNameHint`, ...), extent lines
//! (`ACCESS SIZE TYPE ["FILENAME" [OFFSET]]`) and the disk database
//! (`ddb.key = "value"`). Parsing keeps every header key and ddb entry in
//! order so that rewriting a descriptor (to bump the CID) loses nothing but
//! comments and blank lines.
//!
//! Hostile input: at most [`VMDK_MAX_DESCRIPTOR`] bytes, UTF-8 only (an
//! embedded descriptor ends at its first NUL byte), LF or CRLF line ends, at
//! most [`VMDK_MAX_EXTENTS`] extents whose sizes add up to at most
//! [`VMDK_MAX_CAPACITY`], file names of at most [`VMDK_MAX_FILENAME`] bytes.
//! Unlike QEMU, RDONLY, NOACCESS and ZERO lines are kept (QEMU drops them
//! and the disk silently gets shorter).

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::limits::{
    VMDK_MAX_CAPACITY, VMDK_MAX_DESCRIPTOR, VMDK_MAX_EXTENTS, VMDK_MAX_FILENAME, VMDK_MAX_PARENT_HINT,
};

/// `parentCID` value meaning "no parent".
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// The createType values a stand-alone descriptor file may have: the six
/// QEMU opens (`vmdk_open_desc_file`, compared case-sensitively) and
/// `custom`, which vdisk also opens (see the module docs of `vmdk`).
pub const STANDALONE_CREATE_TYPES: [&str; 7] =
    ["monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "custom"];

/// Access mode of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and write.
    ReadWrite,
    /// Read only: writes into the extent are refused.
    ReadOnly,
    /// No access: reads and writes fail.
    NoAccess,
}

impl Access {
    /// The descriptor keyword (`RW`, `RDONLY`, `NOACCESS`).
    pub fn keyword(self) -> &'static str {
        match self {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// Type of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Plain bytes at an offset of a file.
    Flat,
    /// A hosted sparse extent (KDMV).
    Sparse,
    /// No file: reads as zeros.
    Zero,
    /// An ESX flat extent (read as flat, no offset).
    Vmfs,
    /// An ESX sparse extent (COWD); refused when opened.
    VmfsSparse,
    /// An ESX raw device map; refused when opened.
    VmfsRdm,
    /// An ESX raw device; refused when opened.
    VmfsRaw,
    /// An ESXi 6.5+ space-efficient sparse extent; refused when opened.
    SeSparse,
}

impl ExtentType {
    /// The descriptor keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
            ExtentType::SeSparse => "SESPARSE",
        }
    }

    fn from_keyword(s: &str) -> Option<ExtentType> {
        Some(match s {
            "FLAT" => ExtentType::Flat,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            "SESPARSE" => ExtentType::SeSparse,
            _ => return None,
        })
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Guest size in 512-byte sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// File name as written (relative to the descriptor's directory); `None`
    /// for ZERO extents.
    pub file: Option<String>,
    /// Offset in sectors into the file (FLAT extents).
    pub offset: u64,
}

/// One `key=value` line of the header part.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeaderField {
    key: String,
    value: String,
    quoted: bool,
}

/// A parsed descriptor. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// Header keys in order (including `version`, `CID`, ...).
    header: Vec<HeaderField>,
    /// Extent lines in order.
    pub extents: Vec<ExtentLine>,
    /// Disk database entries (`ddb.*`) in order: (key, value without quotes).
    pub ddb: Vec<(String, String)>,
}

fn parse_hex_u32(s: &str, field: &'static str) -> Result<u32> {
    if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!(
            "descriptor {field} '{}' is not an 8-digit hexadecimal number",
            truncate(s, 40)
        ))
        .with_field(field));
    }
    u32::from_str_radix(s, 16)
        .map_err(|_| Error::invalid(format!("descriptor {field} '{s}' is not hexadecimal")).with_field(field))
}

/// Shortens `s` for an error message.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn bad_line(n: usize, line: &str, why: &str) -> Error {
    Error::invalid(format!("descriptor line {n} ('{}'): {why}", truncate(line, 80)))
}

impl Descriptor {
    /// Parses descriptor bytes. An embedded descriptor ends at its first NUL
    /// byte; a stand-alone one at the end of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Descriptor> {
        if bytes.len() as u64 > VMDK_MAX_DESCRIPTOR {
            return Err(Error::limit(format!(
                "descriptor of {} bytes is larger than the {VMDK_MAX_DESCRIPTOR}-byte limit",
                bytes.len()
            )));
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = std::str::from_utf8(bytes.get(..end).unwrap_or_default())
            .map_err(|e| Error::invalid(format!("descriptor is not valid UTF-8 (byte offset {})", e.valid_up_to())))?;
        let mut d = Descriptor::default();
        let mut total: u64 = 0;
        for (i, raw) in text.split('\n').enumerate() {
            let n = i + 1;
            let line = raw.strip_suffix('\r').unwrap_or(raw).trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_ascii_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                if d.extents.len() >= VMDK_MAX_EXTENTS {
                    return Err(Error::limit(format!("descriptor has more than {VMDK_MAX_EXTENTS} extents")));
                }
                let e = parse_extent(n, line)?;
                total = total.checked_add(e.sectors).filter(|&t| t <= VMDK_MAX_CAPACITY / 512).ok_or_else(|| {
                    Error::limit(format!("descriptor extents add up to more than {VMDK_MAX_CAPACITY} bytes (line {n})"))
                })?;
                d.extents.push(e);
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(bad_line(n, line, "neither an extent nor key=value"));
            };
            let key = k.trim();
            let v = v.trim();
            if key.is_empty() || key.bytes().any(|b| b.is_ascii_whitespace() || b == b'"') {
                return Err(bad_line(n, line, "bad key"));
            }
            let (value, quoted) = match v.strip_prefix('"') {
                Some(rest) => match rest.strip_suffix('"') {
                    Some(inner) if !inner.contains('"') => (inner, true),
                    _ => return Err(bad_line(n, line, "unterminated or nested quotes")),
                },
                None => (v, false),
            };
            if key.starts_with("ddb.") {
                d.ddb.push((key.to_string(), value.to_string()));
            } else {
                if d.header.iter().any(|f| f.key == key) {
                    return Err(bad_line(n, line, "key appears twice"));
                }
                d.header.push(HeaderField { key: key.to_string(), value: value.to_string(), quoted });
            }
        }
        d.validate()?;
        Ok(d)
    }

    fn validate(&self) -> Result<()> {
        match self.get("version") {
            Some("1" | "2" | "3") => {}
            Some(v) => {
                return Err(Error::unsupported(format!(
                    "descriptor version '{}' (only 1, 2 and 3 exist)",
                    truncate(v, 20)
                ))
                .with_field("version"))
            }
            None => return Err(Error::invalid("descriptor has no 'version' line").with_field("version")),
        }
        if let Some(c) = self.get("CID") {
            parse_hex_u32(c, "CID")?;
        }
        if let Some(c) = self.get("parentCID") {
            parse_hex_u32(c, "parentCID")?;
        }
        for f in &self.header {
            let k = f.key.to_ascii_lowercase();
            if k.starts_with("encryption") || k.contains("encrypt") {
                return Err(Error::new(
                    ErrorKind::Crypto,
                    format!(
                        "the disk is encrypted by VMware (descriptor key '{}'); encrypted vmdk disks are not supported",
                        truncate(&f.key, 40)
                    ),
                ));
            }
        }
        for (k, _) in &self.ddb {
            if k.to_ascii_lowercase().contains("encrypt") {
                return Err(Error::new(
                    ErrorKind::Crypto,
                    format!(
                        "the disk is encrypted by VMware (descriptor key '{}'); encrypted vmdk disks are not supported",
                        truncate(k, 40)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The raw value of header key `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.header.iter().find(|f| f.key == key).map(|f| f.value.as_str())
    }

    /// Sets header key `key` (kept in place if present, else appended).
    pub fn set(&mut self, key: &str, value: &str, quoted: bool) {
        match self.header.iter_mut().find(|f| f.key == key) {
            Some(f) => {
                f.value = value.to_string();
                f.quoted = quoted;
            }
            None => self.header.push(HeaderField { key: key.to_string(), value: value.to_string(), quoted }),
        }
    }

    /// The value of ddb key `key`.
    pub fn ddb_get(&self, key: &str) -> Option<&str> {
        self.ddb.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Content id (0 when the descriptor has none; QEMU refuses such a
    /// descriptor, vdisk opens it).
    pub fn cid(&self) -> u32 {
        self.get("CID").and_then(|c| parse_hex_u32(c, "CID").ok()).unwrap_or(0)
    }

    /// Sets the content id.
    pub fn set_cid(&mut self, cid: u32) {
        self.set("CID", &format!("{cid:08x}"), false);
    }

    /// Parent content id ([`NO_PARENT_CID`] when absent).
    pub fn parent_cid(&self) -> u32 {
        self.get("parentCID").and_then(|c| parse_hex_u32(c, "parentCID").ok()).unwrap_or(NO_PARENT_CID)
    }

    /// `createType`, if present.
    pub fn create_type(&self) -> Option<&str> {
        self.get("createType")
    }

    fn field(&self, key: &str) -> Option<&HeaderField> {
        self.header.iter().find(|f| f.key == key)
    }

    /// Checks the createType of a stand-alone descriptor file as QEMU's
    /// `vmdk_open_desc_file` does: present, written `createType="..."`, and
    /// one of [`STANDALONE_CREATE_TYPES`] (exact case).
    pub fn check_standalone_create_type(&self) -> Result<()> {
        let Some(f) = self.field("createType") else {
            return Err(Error::invalid("descriptor has no createType").with_field("createType"));
        };
        let ct = truncate(&f.value, 40);
        if !f.quoted {
            return Err(Error::invalid(format!(
                "createType value '{ct}' is not in double quotes (a descriptor reads createType=\"...\")"
            ))
            .with_field("createType"));
        }
        if STANDALONE_CREATE_TYPES.contains(&f.value.as_str()) {
            return Ok(());
        }
        let v = f.value.as_str();
        if v.eq_ignore_ascii_case("vmfsRawDeviceMap") || v.eq_ignore_ascii_case("vmfsPassthroughRawDeviceMap") {
            return Err(Error::unsupported(format!("createType '{ct}': raw device maps are not supported"))
                .with_field("createType"));
        }
        if v == "monolithicSparse" || v == "streamOptimized" {
            return Err(Error::invalid(format!(
                "createType '{ct}' belongs to a descriptor embedded in a sparse extent, not to a stand-alone descriptor file"
            ))
            .with_field("createType"));
        }
        Err(Error::unsupported(format!(
            "createType '{ct}' (a stand-alone descriptor opens with {}; names are case-sensitive)",
            STANDALONE_CREATE_TYPES.join(", ")
        ))
        .with_field("createType"))
    }

    /// Checks `parentFileNameHint` as QEMU's `vmdk_parent_open` does: a
    /// quoted value of at most [`VMDK_MAX_PARENT_HINT`] bytes.
    pub fn check_parent_hint(&self) -> Result<()> {
        let Some(f) = self.field("parentFileNameHint") else {
            return Ok(());
        };
        if !f.quoted && !f.value.is_empty() {
            return Err(Error::invalid(format!(
                "parentFileNameHint value '{}' is not in double quotes",
                truncate(&f.value, 60)
            ))
            .with_field("parentFileNameHint"));
        }
        if f.value.len() > VMDK_MAX_PARENT_HINT {
            return Err(Error::limit(format!(
                "parentFileNameHint of {} bytes ('{}') is longer than {VMDK_MAX_PARENT_HINT} bytes",
                f.value.len(),
                truncate(&f.value, 40)
            ))
            .with_field("parentFileNameHint"));
        }
        Ok(())
    }

    /// `parentFileNameHint`, if present and not empty.
    pub fn parent_hint(&self) -> Option<&str> {
        self.get("parentFileNameHint").filter(|s| !s.is_empty())
    }

    /// Sum of the extent sizes in sectors (bounded by the parser).
    pub fn total_sectors(&self) -> u64 {
        self.extents.iter().fold(0u64, |a, e| a.saturating_add(e.sectors))
    }

    /// A new descriptor with the given header keys, as QEMU writes them.
    pub fn new(cid: u32, parent_cid: u32, create_type: &str, parent_hint: Option<&str>) -> Self {
        let mut d = Descriptor::default();
        d.set("version", "1", false);
        d.set_cid(cid);
        d.set("parentCID", &format!("{parent_cid:08x}"), false);
        d.set("createType", create_type, true);
        if let Some(p) = parent_hint {
            d.set("parentFileNameHint", p, true);
        }
        d
    }

    /// Encodes the descriptor in QEMU's layout (header, extents, ddb).
    pub fn encode(&self) -> String {
        let mut s = String::from("# Disk DescriptorFile\n");
        for f in &self.header {
            // A value holding a quote can only have been read unquoted (a
            // quoted value cannot contain one): written back the same way.
            if f.quoted && !f.value.contains('"') {
                let _ = writeln!(s, "{}=\"{}\"", f.key, f.value);
            } else {
                let _ = writeln!(s, "{}={}", f.key, f.value);
            }
        }
        s.push_str("\n# Extent description\n");
        for e in &self.extents {
            let _ = write!(s, "{} {} {}", e.access.keyword(), e.sectors, e.kind.keyword());
            if let Some(f) = &e.file {
                let _ = write!(s, " \"{f}\"");
                if e.kind == ExtentType::Flat {
                    let _ = write!(s, " {}", e.offset);
                }
            }
            s.push('\n');
        }
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        for (k, v) in &self.ddb {
            if v.contains('"') {
                let _ = writeln!(s, "{k} = {v}");
            } else {
                let _ = writeln!(s, "{k} = \"{v}\"");
            }
        }
        s
    }
}

fn parse_extent(n: usize, line: &str) -> Result<ExtentLine> {
    let (access_s, rest) = split_word(line);
    let access = match access_s {
        "RW" => Access::ReadWrite,
        "RDONLY" => Access::ReadOnly,
        _ => Access::NoAccess,
    };
    let (size_s, rest) = split_word(rest);
    let sectors: u64 =
        size_s.parse().map_err(|_| bad_line(n, line, "extent size is not a number of sectors").with_field("size"))?;
    if sectors == 0 {
        return Err(bad_line(n, line, "extent size is 0 sectors").with_field("size"));
    }
    let (type_s, rest) = split_word(rest);
    let kind = ExtentType::from_keyword(type_s).ok_or_else(|| {
        Error::unsupported(format!("descriptor line {n}: unknown extent type '{}'", truncate(type_s, 20)))
            .with_field("type")
    })?;
    let rest = rest.trim_start();
    let (file, rest) = if let Some(r) = rest.strip_prefix('"') {
        let Some(close) = r.find('"') else {
            return Err(bad_line(n, line, "unterminated file name").with_field("fileName"));
        };
        let name = r.get(..close).unwrap_or_default();
        if name.is_empty() {
            return Err(bad_line(n, line, "empty file name").with_field("fileName"));
        }
        if name.len() > VMDK_MAX_FILENAME {
            return Err(Error::limit(format!(
                "descriptor line {n}: extent file name of {} bytes is longer than {VMDK_MAX_FILENAME}",
                name.len()
            ))
            .with_field("fileName"));
        }
        (Some(name.to_string()), r.get(close + 1..).unwrap_or_default())
    } else {
        (None, rest)
    };
    let (off_s, rest) = split_word(rest);
    let has_offset = !off_s.is_empty();
    let offset: u64 = if has_offset {
        off_s.parse().map_err(|_| bad_line(n, line, "extent offset is not a number of sectors").with_field("offset"))?
    } else {
        0
    };
    if !rest.trim().is_empty() {
        return Err(bad_line(n, line, "trailing text after the extent offset"));
    }
    match (kind, &file) {
        (ExtentType::Zero, Some(_)) => {
            return Err(bad_line(n, line, "a ZERO extent takes no file name").with_field("fileName"))
        }
        (ExtentType::Zero, None) => {}
        (_, None) => return Err(bad_line(n, line, "the extent has no file name").with_field("fileName")),
        _ => {}
    }
    // QEMU (vmdk_parse_extents) takes exactly "ACCESS SIZE TYPE "NAME" OFFSET"
    // for FLAT and no offset at all (not even 0) for every other type.
    if kind == ExtentType::Flat && !has_offset {
        return Err(
            bad_line(n, line, "a FLAT extent needs an offset (in sectors) after its file name").with_field("offset")
        );
    }
    if has_offset && kind != ExtentType::Flat {
        return Err(bad_line(
            n,
            line,
            &format!(
                "only FLAT extents take an offset; a {} extent has offset '{}'",
                kind.keyword(),
                truncate(off_s, 24)
            ),
        )
        .with_field("offset"));
    }
    if offset.checked_add(sectors).and_then(|e| e.checked_mul(512)).is_none() {
        return Err(bad_line(n, line, "extent offset + size overflows").with_field("offset"));
    }
    Ok(ExtentLine { access, sectors, kind, file, offset })
}

/// Splits off the first whitespace-separated word.
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(|c: char| c.is_ascii_whitespace()) {
        Some(i) => (s.get(..i).unwrap_or_default(), s.get(i..).unwrap_or_default()),
        None => (s, ""),
    }
}

/// Resolves extent file `name` against the descriptor's directory `dir`.
/// Unless `allow_outside` is set, absolute names and names whose `..`
/// components climb out of `dir` are refused.
pub fn resolve_extent(dir: &Path, name: &str, allow_outside: bool) -> Result<PathBuf> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::invalid(format!("extent file name '{}' is empty or contains NUL", truncate(name, 60))));
    }
    let p = Path::new(name);
    if !allow_outside {
        let mut depth: usize = 0;
        for c in p.components() {
            match c {
                Component::Normal(_) => depth = depth.saturating_add(1),
                Component::CurDir => {}
                Component::ParentDir => {
                    depth = depth.checked_sub(1).ok_or_else(|| escape_error(name))?;
                }
                Component::RootDir | Component::Prefix(_) => return Err(escape_error(name)),
            }
        }
    }
    Ok(if p.is_absolute() { p.to_path_buf() } else { dir.join(p) })
}

fn escape_error(name: &str) -> Error {
    Error::invalid(format!(
        "extent file '{}' lies outside the descriptor's directory; allow external extents only for trusted images",
        truncate(name, 200)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: &str = "# Disk DescriptorFile\nversion=1\nCID=a87e1861\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\n# Extent description\nRW 8192 SPARSE \"a.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"8\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\nddb.toolsVersion = \"2147483647\"\n";

    #[test]
    fn round_trip_qemu_descriptor() {
        let d = Descriptor::parse(QEMU.as_bytes()).unwrap();
        assert_eq!(d.cid(), 0xa87e1861);
        assert_eq!(d.parent_cid(), NO_PARENT_CID);
        assert_eq!(d.create_type(), Some("monolithicSparse"));
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].sectors, 8192);
        assert_eq!(d.ddb_get("ddb.adapterType"), Some("ide"));
        assert_eq!(d.encode(), QEMU);
        let mut d2 = d.clone();
        d2.set_cid(0x1234);
        let again = Descriptor::parse(d2.encode().as_bytes()).unwrap();
        assert_eq!(again.cid(), 0x1234);
        assert_eq!(again.ddb, d.ddb);
    }

    /// Found by fuzzing (vmdk_descriptor): an unquoted ddb value with a
    /// quote inside (`ddb.x = a"b`) was written back quoted
    /// (`ddb.x = "a"b"`), which does not parse: the first write to such an
    /// image (it rewrites the descriptor to bump the CID) made it unopenable.
    #[test]
    fn values_with_quotes_survive_a_rewrite() {
        let d = Descriptor::parse(b"version=1\nkey=a\"b\"\nddb.x = a\"b\n").unwrap();
        assert_eq!(d.ddb_get("ddb.x"), Some("a\"b"));
        let back = Descriptor::parse(d.encode().as_bytes()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn crlf_no_newline_and_nul_end() {
        let t = "version=1\r\nCID=1\r\ncreateType=\"monolithicFlat\"\r\nRW 10 FLAT \"x y.img\" 5\r\nRDONLY 4 ZERO\r\nNOACCESS 2 VMFS \"v\"";
        let mut b = t.as_bytes().to_vec();
        b.extend_from_slice(&[0, 0, 0xff]);
        let d = Descriptor::parse(&b).unwrap();
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("x y.img"));
        assert_eq!(d.extents[0].offset, 5);
        assert_eq!(d.extents[1].access, Access::ReadOnly);
        assert_eq!(d.extents[1].kind, ExtentType::Zero);
        assert_eq!(d.extents[2].access, Access::NoAccess);
        assert_eq!(d.total_sectors(), 16);
    }

    #[test]
    fn hostile_descriptors() {
        let huge = format!("version=1\nRW {} FLAT \"a\" 0\n", u64::MAX);
        let many: String = std::iter::once("version=1\n".to_string())
            .chain((0..2000).map(|i| format!("RW 1 FLAT \"f{i}\" 0\n")))
            .collect();
        let sum = "version=1\nRW 137438953472 ZERO\nRW 137438953472 ZERO\n".to_string();
        let long_name = format!("version=1\nRW 1 FLAT \"{}\" 0\n", "a".repeat(600));
        let big = vec![b'#'; (VMDK_MAX_DESCRIPTOR + 1) as usize];
        let cases: Vec<(Vec<u8>, ErrorKind)> = vec![
            (b"CID=1\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=9\n".to_vec(), ErrorKind::Unsupported),
            (b"version=1\nCID=xyz\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nparentCID=123456789\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW ten FLAT \"a\" 0\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 0 FLAT \"a\" 0\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 1 BOGUS \"a\"\n".to_vec(), ErrorKind::Unsupported),
            (b"version=1\nRW 1 FLAT \"a\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 1 FLAT\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 1 ZERO \"a\"\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 1 SPARSE \"a\" 7\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 1 SPARSE \"a\" 0\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 1 VMFS \"a\" 0\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 1 FLAT \"a\"\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRDONLY 1 FLAT \"a\"\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 1 FLAT \"a\" 0 junk\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nRW 1 FLAT \"a\" 18446744073709551615\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\ngarbage line\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nversion=1\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nx=\"a\"b\"\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\n\xff\xfe\n".to_vec(), ErrorKind::InvalidImage),
            (b"version=1\nencryption.keySafe=\"x\"\n".to_vec(), ErrorKind::Crypto),
            (b"version=1\nddb.encryption = \"x\"\n".to_vec(), ErrorKind::Crypto),
            (huge.into_bytes(), ErrorKind::InvalidImage),
            (many.into_bytes(), ErrorKind::LimitExceeded),
            (sum.into_bytes(), ErrorKind::LimitExceeded),
            (long_name.into_bytes(), ErrorKind::LimitExceeded),
            (big, ErrorKind::LimitExceeded),
        ];
        for (i, (bytes, kind)) in cases.iter().enumerate() {
            match Descriptor::parse(bytes) {
                Ok(d) => panic!("case {i} parsed: {d:?}"),
                Err(e) => assert_eq!(e.kind(), *kind, "case {i}: {e}"),
            }
        }
    }

    #[test]
    fn standalone_create_type_and_parent_hint() {
        let d = |t: &str| Descriptor::parse(format!("version=1\n{t}\n").as_bytes()).unwrap();
        for ct in STANDALONE_CREATE_TYPES {
            d(&format!("createType=\"{ct}\"")).check_standalone_create_type().unwrap();
        }
        let cases = [
            ("", ErrorKind::InvalidImage),
            ("createType=monolithicFlat", ErrorKind::InvalidImage),
            ("createType=\"monolithicSparse\"", ErrorKind::InvalidImage),
            ("createType=\"streamOptimized\"", ErrorKind::InvalidImage),
            ("createType=\"MonolithicFlat\"", ErrorKind::Unsupported),
            ("createType=\"fullDevice\"", ErrorKind::Unsupported),
            ("createType=\"vmfsRawDeviceMap\"", ErrorKind::Unsupported),
        ];
        for (t, kind) in cases {
            let e = d(t).check_standalone_create_type().unwrap_err();
            assert_eq!((e.kind(), e.field()), (kind, Some("createType")), "{t}: {e}");
        }
        d("parentFileNameHint=\"\"").check_parent_hint().unwrap();
        d(&format!("parentFileNameHint=\"{}\"", "p".repeat(4095))).check_parent_hint().unwrap();
        let e = d(&format!("parentFileNameHint=\"{}\"", "p".repeat(4096))).check_parent_hint().unwrap_err();
        assert_eq!((e.kind(), e.field()), (ErrorKind::LimitExceeded, Some("parentFileNameHint")));
        let e = d("parentFileNameHint=p.vmdk").check_parent_hint().unwrap_err();
        assert_eq!((e.kind(), e.field()), (ErrorKind::InvalidImage, Some("parentFileNameHint")));
    }

    #[test]
    fn extent_paths() {
        let dir = Path::new("/images");
        assert_eq!(resolve_extent(dir, "a-flat.vmdk", false).unwrap(), Path::new("/images/a-flat.vmdk"));
        assert!(resolve_extent(dir, "sub/../b.vmdk", false).is_ok());
        for bad in ["/etc/passwd", "../x", "a/../../x", "./../x", ""] {
            assert!(resolve_extent(dir, bad, false).is_err(), "{bad}");
        }
        assert_eq!(resolve_extent(dir, "/dev/sda", true).unwrap(), Path::new("/dev/sda"));
        assert!(resolve_extent(dir, "../x", true).is_ok());
    }
}
