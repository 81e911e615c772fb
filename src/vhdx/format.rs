//! VHDX on-disk structures (Microsoft "VHDX Format Specification" v1.0):
//! the file identifier, the two headers, the region table, the metadata
//! table and its items, and CRC-32C.
//!
//! Every structure is little-endian. GUIDs are stored in Microsoft's mixed
//! layout (first three fields little-endian); [`Guid`] keeps the raw 16
//! bytes.

use crate::error::{Error, Result};

/// 1 MiB: the unit of region offsets, block sizes and BAT file offsets.
pub const MIB: u64 = 1 << 20;
/// The file type identifier's signature at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// First header, second header, first and second region table.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Region table copies.
pub const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes a header's checksum covers.
pub const HEADER_SIZE: usize = 4096;
/// Bytes a region table (and the metadata table) occupy.
pub const TABLE_SIZE: usize = 64 << 10;
/// Header signature "head".
const HEADER_SIG: &[u8; 4] = b"head";
/// Region table signature "regi".
const REGION_SIG: &[u8; 4] = b"regi";
/// Metadata table signature.
const METADATA_SIG: &[u8; 8] = b"metadata";
/// Most region and metadata table entries (spec: 2047).
pub const MAX_TABLE_ENTRIES: u32 = 2047;
/// Smallest and largest block size (spec: 1 MiB to 256 MiB).
pub const MIN_BLOCK: u32 = 1 << 20;
/// Largest block size.
pub const MAX_BLOCK: u32 = 256 << 20;
/// Largest virtual disk (spec: 64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Sectors one sector bitmap block describes (2^23: 1 MiB of bits).
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// A GUID in its on-disk byte order.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Guid(pub [u8; 16]);

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Guid {
    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, fields as Windows prints them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        let d1 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let d2 = u16::from_le_bytes([b[4], b[5]]);
        let d3 = u16::from_le_bytes([b[6], b[7]]);
        write!(f, "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-", b[8], b[9])?;
        for x in &b[10..] {
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

impl Guid {
    /// Builds a GUID from its printed fields.
    pub const fn new(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]])
    }

    /// The all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A fresh random (version 4) GUID.
    pub fn random() -> Guid {
        use std::hash::{BuildHasher, Hasher};
        let mut out = [0u8; 16];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
                h.write_u128(t.as_nanos());
            }
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
        out[7] = (out[7] & 0x0f) | 0x40;
        out[8] = (out[8] & 0x3f) | 0x80;
        Guid(out)
    }

    /// Parses `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional).
    pub fn parse(s: &str) -> Option<Guid> {
        let s = s.trim().trim_start_matches('{').trim_end_matches('}');
        let parts: Vec<&str> = s.split('-').collect();
        if parts.len() != 5 || parts.iter().map(|p| p.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
            return None;
        }
        let d1 = u32::from_str_radix(parts[0], 16).ok()?;
        let d2 = u16::from_str_radix(parts[1], 16).ok()?;
        let d3 = u16::from_str_radix(parts[2], 16).ok()?;
        let mut d4 = [0u8; 8];
        let tail = format!("{}{}", parts[3], parts[4]);
        for (i, b) in d4.iter_mut().enumerate() {
            *b = u8::from_str_radix(tail.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Guid::new(d1, d2, d3, d4))
    }

    fn read(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[..16]);
        Guid(g)
    }
}

/// Region: the block allocation table.
pub const BAT_GUID: Guid = Guid::new(0x2dc27766, 0xf623, 0x4200, [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08]);
/// Region: the metadata region.
pub const METADATA_GUID: Guid = Guid::new(0x8b7ca206, 0x4790, 0x4b9a, [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e]);
/// Metadata item: file parameters.
pub const FILE_PARAMS_GUID: Guid =
    Guid::new(0xcaa16737, 0xfa36, 0x4d43, [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b]);
/// Metadata item: virtual disk size.
pub const DISK_SIZE_GUID: Guid =
    Guid::new(0x2fa54224, 0xcd1b, 0x4876, [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8]);
/// Metadata item: page 83 data.
pub const PAGE83_GUID: Guid = Guid::new(0xbeca12ab, 0xb2e6, 0x4523, [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46]);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_GUID: Guid =
    Guid::new(0x8141bf1d, 0xa96f, 0x4709, [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f]);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_GUID: Guid =
    Guid::new(0xcda348c7, 0x445d, 0x4471, [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56]);
/// Metadata item: parent locator.
pub const PARENT_LOCATOR_GUID: Guid =
    Guid::new(0xa8d35f2d, 0xb30b, 0x454d, [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c]);
/// Parent locator type: a VHDX parent.
pub const VHDX_PARENT_TYPE_GUID: Guid =
    Guid::new(0xb04aefb7, 0xd19e, 0x4a81, [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13]);

const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Continues a CRC-32C (Castagnoli, reflected) over `data`; start with
/// `0xffff_ffff` and finish with `!crc`.
pub fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(0xffff_ffff, data)
}

/// CRC-32C of `buf` with its 4-byte checksum field at `at` read as zero.
pub fn checksum_with_hole(buf: &[u8], at: usize) -> u32 {
    let c = crc32c_update(0xffff_ffff, &buf[..at]);
    let c = crc32c_update(c, &[0; 4]);
    !crc32c_update(c, &buf[at + 4..])
}

/// Stores the checksum of `buf` at `at`.
pub fn seal(buf: &mut [u8], at: usize) {
    buf[at..at + 4].fill(0);
    let c = crc32c(buf);
    buf[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// One of the two headers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// The higher valid sequence number is the current header.
    pub sequence: u64,
    /// Changed before the first write to the file in a session.
    pub file_write_guid: Guid,
    /// Changed before the first write the guest can see.
    pub data_write_guid: Guid,
    /// Zero when the log is empty; log entries carry the same GUID.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Bytes of the log (a multiple of 1 MiB).
    pub log_length: u32,
    /// File offset of the log (a multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Decodes a 4 KiB header; `None` when the signature, checksum or
    /// version is wrong (the other header may still be good).
    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_SIZE || &b[0..4] != HEADER_SIG {
            return None;
        }
        if checksum_with_hole(&b[..HEADER_SIZE], 4) != le32(b, 4) {
            return None;
        }
        let h = Header {
            sequence: le64(b, 8),
            file_write_guid: Guid::read(&b[16..]),
            data_write_guid: Guid::read(&b[32..]),
            log_guid: Guid::read(&b[48..]),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        (h.version == 1).then_some(h)
    }

    /// Encodes into a sealed 4 KiB sector.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIG);
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }
}

/// Picks the current header from the two copies, as the spec (and QEMU)
/// do: the valid one, or of two valid ones the higher sequence number; two
/// valid headers with the same sequence number must be identical.
pub fn current_header(h1: Option<Header>, h2: Option<Header>) -> Result<(usize, Header)> {
    match (h1, h2) {
        (Some(a), None) => Ok((0, a)),
        (None, Some(b)) => Ok((1, b)),
        (None, None) => Err(Error::invalid("no valid VHDX header found (both copies fail their checksum)")
            .with_field("header")
            .with_offset(HEADER_OFFSETS[0])),
        (Some(a), Some(b)) => {
            if a.sequence > b.sequence {
                Ok((0, a))
            } else if b.sequence > a.sequence {
                Ok((1, b))
            } else if a == b {
                Ok((0, a))
            } else {
                Err(Error::invalid(format!("both VHDX headers have sequence number {} but differ", a.sequence))
                    .with_field("SequenceNumber"))
            }
        }
    }
}

/// One region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What the region is.
    pub guid: Guid,
    /// File offset (multiple of 1 MiB).
    pub offset: u64,
    /// Length (multiple of 1 MiB).
    pub length: u32,
    /// The reader must understand it.
    pub required: bool,
}

/// The region table: where the BAT and the metadata region are.
#[derive(Debug, Clone)]
pub struct RegionTable {
    /// The BAT region.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
    /// Every entry, in order.
    pub all: Vec<Region>,
}

impl RegionTable {
    /// Decodes and validates a 64 KiB region table.
    pub fn decode(b: &[u8]) -> Result<RegionTable> {
        if b.len() < TABLE_SIZE || &b[0..4] != REGION_SIG {
            return Err(Error::invalid("VHDX region table signature is not 'regi'").with_field("Signature"));
        }
        if checksum_with_hole(&b[..TABLE_SIZE], 4) != le32(b, 4) {
            return Err(Error::invalid("VHDX region table checksum mismatch").with_field("Checksum"));
        }
        let count = le32(b, 8);
        if count > MAX_TABLE_ENTRIES {
            return Err(Error::invalid(format!(
                "VHDX region table has {count} entries, more than {MAX_TABLE_ENTRIES}"
            ))
            .with_field("EntryCount"));
        }
        let mut all: Vec<Region> = Vec::with_capacity(count as usize);
        let (mut bat, mut metadata) = (None, None);
        for i in 0..count as usize {
            let e = &b[16 + 32 * i..16 + 32 * (i + 1)];
            let r = Region {
                guid: Guid::read(e),
                offset: le64(e, 16),
                length: le32(e, 24),
                required: le32(e, 28) & 1 != 0,
            };
            if !r.offset.is_multiple_of(MIB)
                || r.offset < MIB
                || !u64::from(r.length).is_multiple_of(MIB)
                || r.length == 0
            {
                return Err(Error::invalid(format!(
                    "VHDX region {} at {} with length {} is not 1 MiB-aligned past the header area",
                    r.guid, r.offset, r.length
                ))
                .with_field("FileOffset"));
            }
            let end =
                r.offset.checked_add(u64::from(r.length)).ok_or_else(|| Error::invalid("VHDX region end overflows"))?;
            if all.iter().any(|o| r.offset < o.offset + u64::from(o.length) && o.offset < end) {
                return Err(Error::invalid(format!("VHDX region {} at {} overlaps another region", r.guid, r.offset))
                    .with_field("FileOffset"));
            }
            if r.guid == BAT_GUID || r.guid == METADATA_GUID {
                let slot = if r.guid == BAT_GUID { &mut bat } else { &mut metadata };
                if slot.is_some() {
                    return Err(Error::invalid(format!("VHDX region {} appears twice", r.guid)).with_field("Guid"));
                }
                *slot = Some(r);
            } else if r.required {
                return Err(Error::unsupported(format!("VHDX region {} is required and unknown", r.guid)));
            }
            all.push(r);
        }
        match (bat, metadata) {
            (Some(bat), Some(metadata)) => Ok(RegionTable { bat, metadata, all }),
            _ => Err(Error::invalid("VHDX region table lacks the BAT or the metadata region").with_field("Guid")),
        }
    }

    /// Encodes a table of `regions` into a sealed 64 KiB buffer.
    pub fn encode(regions: &[Region]) -> Vec<u8> {
        let mut b = vec![0u8; TABLE_SIZE];
        b[0..4].copy_from_slice(REGION_SIG);
        b[8..12].copy_from_slice(&(regions.len() as u32).to_le_bytes());
        for (i, r) in regions.iter().enumerate() {
            let e = &mut b[16 + 32 * i..16 + 32 * (i + 1)];
            e[0..16].copy_from_slice(&r.guid.0);
            e[16..24].copy_from_slice(&r.offset.to_le_bytes());
            e[24..28].copy_from_slice(&r.length.to_le_bytes());
            e[28..32].copy_from_slice(&u32::from(r.required).to_le_bytes());
        }
        seal(&mut b, 4);
        b
    }
}

/// One metadata table entry.
#[derive(Debug, Clone, Copy)]
pub struct MetaEntry {
    /// Item id.
    pub guid: Guid,
    /// Offset from the start of the metadata region (≥ 64 KiB).
    pub offset: u32,
    /// Item length.
    pub length: u32,
    /// Flags: bit 0 IsUser, 1 IsVirtualDisk, 2 IsRequired.
    pub flags: u32,
}

/// Decodes the metadata table (the first 64 KiB of the metadata region).
pub fn decode_metadata_table(b: &[u8], region_len: u32) -> Result<Vec<MetaEntry>> {
    if b.len() < TABLE_SIZE || &b[0..8] != METADATA_SIG {
        return Err(Error::invalid("VHDX metadata table signature is not 'metadata'").with_field("Signature"));
    }
    let count = u32::from(le16(b, 10));
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::invalid(format!("VHDX metadata table has {count} entries, more than {MAX_TABLE_ENTRIES}"))
            .with_field("EntryCount"));
    }
    let mut out: Vec<MetaEntry> = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let e = &b[32 + 32 * i..32 + 32 * (i + 1)];
        let m = MetaEntry { guid: Guid::read(e), offset: le32(e, 16), length: le32(e, 20), flags: le32(e, 24) };
        if out.iter().any(|o| o.guid == m.guid) {
            return Err(Error::invalid(format!("VHDX metadata item {} appears twice", m.guid)).with_field("ItemId"));
        }
        if m.length > 0
            && (m.offset < TABLE_SIZE as u32 || u64::from(m.offset) + u64::from(m.length) > u64::from(region_len))
        {
            return Err(Error::invalid(format!(
                "VHDX metadata item {} at {} (length {}) lies outside its region of {region_len} bytes",
                m.guid, m.offset, m.length
            ))
            .with_field("Offset"));
        }
        out.push(m);
    }
    Ok(out)
}

/// Encodes a metadata table.
pub fn encode_metadata_table(entries: &[MetaEntry]) -> Vec<u8> {
    let mut b = vec![0u8; TABLE_SIZE];
    b[0..8].copy_from_slice(METADATA_SIG);
    b[10..12].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    for (i, m) in entries.iter().enumerate() {
        let e = &mut b[32 + 32 * i..32 + 32 * (i + 1)];
        e[0..16].copy_from_slice(&m.guid.0);
        e[16..20].copy_from_slice(&m.offset.to_le_bytes());
        e[20..24].copy_from_slice(&m.length.to_le_bytes());
        e[24..28].copy_from_slice(&m.flags.to_le_bytes());
    }
    b
}

/// The parent locator of a differencing image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentLocator {
    /// Key/value pairs in file order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Decodes the locator item.
    pub fn decode(b: &[u8]) -> Result<ParentLocator> {
        if b.len() < 20 {
            return Err(Error::invalid("VHDX parent locator is shorter than its header").with_field("ParentLocator"));
        }
        let ty = Guid::read(b);
        if ty != VHDX_PARENT_TYPE_GUID {
            return Err(Error::unsupported(format!("VHDX parent locator type {ty} is not a VHDX parent")));
        }
        let count = usize::from(le16(b, 18));
        if 20 + 12 * count > b.len() {
            return Err(Error::invalid(format!("VHDX parent locator claims {count} entries past its end"))
                .with_field("KeyValueCount"));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let e = &b[20 + 12 * i..];
            let (ko, vo) = (le32(e, 0) as usize, le32(e, 4) as usize);
            let (kl, vl) = (usize::from(le16(e, 8)), usize::from(le16(e, 10)));
            let key = utf16(b, ko, kl)?;
            let value = utf16(b, vo, vl)?;
            entries.push((key, value));
        }
        Ok(ParentLocator { entries })
    }

    /// Encodes the locator item.
    pub fn encode(&self) -> Vec<u8> {
        let mut head = Vec::new();
        head.extend_from_slice(&VHDX_PARENT_TYPE_GUID.0);
        head.extend_from_slice(&0u16.to_le_bytes());
        head.extend_from_slice(&(self.entries.len() as u16).to_le_bytes());
        let mut strings = Vec::new();
        let base = 20 + 12 * self.entries.len();
        for (k, v) in &self.entries {
            let k16: Vec<u8> = k.encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
            let v16: Vec<u8> = v.encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
            let ko = base + strings.len();
            strings.extend_from_slice(&k16);
            let vo = base + strings.len();
            strings.extend_from_slice(&v16);
            head.extend_from_slice(&(ko as u32).to_le_bytes());
            head.extend_from_slice(&(vo as u32).to_le_bytes());
            head.extend_from_slice(&(k16.len() as u16).to_le_bytes());
            head.extend_from_slice(&(v16.len() as u16).to_le_bytes());
        }
        head.extend_from_slice(&strings);
        head
    }
}

fn utf16(b: &[u8], off: usize, len: usize) -> Result<String> {
    let end = off.checked_add(len).filter(|&e| e <= b.len() && len.is_multiple_of(2));
    let Some(end) = end else {
        return Err(Error::invalid(format!(
            "VHDX parent locator string at {off} (length {len}) lies outside the item"
        ))
        .with_field("ParentLocator"));
    };
    let units: Vec<u16> = b[off..end].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    String::from_utf16(&units)
        .map_err(|_| Error::invalid("VHDX parent locator string is not UTF-16").with_field("ParentLocator"))
}

/// BAT entry states (bits 0..2).
pub mod state {
    /// Payload: not present (reads from the parent, or zeros).
    pub const NOT_PRESENT: u64 = 0;
    /// Payload: undefined content (reads as zeros).
    pub const UNDEFINED: u64 = 1;
    /// Payload: zeros.
    pub const ZERO: u64 = 2;
    /// Payload: unmapped (reads as zeros).
    pub const UNMAPPED: u64 = 3;
    /// Payload: unmapped, as written by pre-release implementations.
    pub const UNMAPPED_V095: u64 = 5;
    /// Payload: every sector stored here.
    pub const FULLY_PRESENT: u64 = 6;
    /// Payload: some sectors stored here, per the sector bitmap.
    pub const PARTIALLY_PRESENT: u64 = 7;
    /// Sector bitmap block present.
    pub const SB_PRESENT: u64 = 6;
}

/// Mask of the file offset bits of a BAT entry (bits 20..63, in MiB).
pub const BAT_OFFSET_MASK: u64 = !(MIB - 1);

/// The geometry the metadata gives: sizes and BAT shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Guest size in bytes.
    pub size: u64,
    /// Payload block size.
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector: u32,
    /// 512 or 4096.
    pub physical_sector: u32,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks.
    pub data_blocks: u64,
    /// BAT entries (payload and sector bitmap).
    pub bat_entries: u64,
    /// A differencing image.
    pub has_parent: bool,
}

impl Geometry {
    /// Validates the metadata values and derives the BAT shape.
    pub fn new(
        size: u64,
        block_size: u32,
        logical_sector: u32,
        physical_sector: u32,
        has_parent: bool,
    ) -> Result<Geometry> {
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(Error::invalid(format!(
                "VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB"
            ))
            .with_field("BlockSize"));
        }
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(Error::invalid(format!("VHDX logical sector size {logical_sector} is not 512 or 4096"))
                .with_field("LogicalSectorSize"));
        }
        if physical_sector != 512 && physical_sector != 4096 {
            return Err(Error::invalid(format!("VHDX physical sector size {physical_sector} is not 512 or 4096"))
                .with_field("PhysicalSectorSize"));
        }
        if size > MAX_DISK_SIZE {
            return Err(Error::limit(format!("VHDX virtual disk size {size} is larger than 64 TiB"))
                .with_field("VirtualDiskSize"));
        }
        let chunk_ratio = SECTORS_PER_BITMAP * u64::from(logical_sector) / u64::from(block_size);
        let data_blocks = size.div_ceil(u64::from(block_size));
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let bat_entries = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        Ok(Geometry {
            size,
            block_size,
            logical_sector,
            physical_sector,
            chunk_ratio,
            data_blocks,
            bat_entries,
            has_parent,
        })
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap entry of the chunk holding `block`.
    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Whether BAT index `i` is a sector bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        (i + 1).is_multiple_of(self.chunk_ratio + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 B.4 test vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn guid_text_round_trip() {
        let s = "2dc27766-f623-4200-9d64-115e9bfd4a08";
        assert_eq!(BAT_GUID.to_string(), s);
        assert_eq!(Guid::parse(&format!("{{{s}}}")), Some(BAT_GUID));
        assert_eq!(Guid::parse("nope"), None);
        let r = Guid::random();
        assert_eq!(Guid::parse(&r.to_string()), Some(r));
    }

    #[test]
    fn header_round_trip_and_choice() {
        let h = Header { sequence: 7, version: 1, log_length: 1 << 20, log_offset: 1 << 20, ..Default::default() };
        let mut b = h.encode();
        assert_eq!(Header::decode(&b), Some(h.clone()));
        let older = Header { sequence: 3, ..h.clone() };
        assert_eq!(current_header(Some(older.clone()), Some(h.clone())).unwrap().0, 1);
        assert!(current_header(None, None).is_err());
        let other = Header { log_length: 2 << 20, ..h.clone() };
        assert!(current_header(Some(h.clone()), Some(other)).is_err());
        b[100] ^= 1;
        assert_eq!(Header::decode(&b), None);
    }

    #[test]
    fn geometry_shapes() {
        let g = Geometry::new(1 << 30, 32 << 20, 512, 4096, false).unwrap();
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.data_blocks, 32);
        assert_eq!(g.bat_entries, 32);
        let g = Geometry::new(10 << 30, 1 << 20, 512, 512, true).unwrap();
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(g.bat_entries, 3 * 4097);
        assert_eq!(g.payload_index(4096), 4097);
        assert_eq!(g.bitmap_index(4095), 4096);
        assert!(g.is_bitmap_index(4096));
        assert!(Geometry::new(1 << 20, 3 << 20, 512, 512, false).is_err());
        assert!(Geometry::new(1 << 20, 1 << 20, 1024, 512, false).is_err());
    }

    #[test]
    fn locator_round_trip() {
        let l = ParentLocator {
            entries: vec![("parent_linkage".into(), "{x}".into()), ("relative_path".into(), "..\\b.vhdx".into())],
        };
        let d = ParentLocator::decode(&l.encode()).unwrap();
        assert_eq!(d, l);
        assert_eq!(d.get("relative_path"), Some("..\\b.vhdx"));
        let mut bad = l.encode();
        bad[20] = 0xff;
        assert!(ParentLocator::decode(&bad).is_err());
    }
}
