//! The VHD dynamic disk header (spec: "Dynamic Disk Header Format") and
//! the parent locators of differencing disks.

use byteorder::{BigEndian, ByteOrder};

use super::footer::checksum;
use crate::error::{Error, Result};
use crate::limits::{VPC_MAX_BLOCK_SIZE, VPC_MAX_PARENT_LOCATOR};

/// Size of the dynamic disk header.
pub const DYN_HEADER_LEN: usize = 1024;
/// The dynamic header cookie.
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// A BAT entry for a block that is not allocated.
pub const BAT_UNALLOCATED: u32 = 0xffff_ffff;
/// The default block size: 2 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;

/// One parent locator entry (offset 576 + 24·i).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Platform code (`W2ru`, `W2ku`, `Wi2r`, `Wi2k`, `Mac `, `MacX`, or 0).
    pub code: [u8; 4],
    /// Sectors reserved for the locator data.
    pub data_space: u32,
    /// Bytes of locator data.
    pub data_len: u32,
    /// Byte offset of the locator data in the file.
    pub data_offset: u64,
}

/// The 1024-byte dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    /// 8: next structure (unused, all ones).
    pub data_offset: u64,
    /// 16: byte offset of the block allocation table.
    pub table_offset: u64,
    /// 24: header version (0x00010000).
    pub version: u32,
    /// 28: BAT entries.
    pub max_table_entries: u32,
    /// 32: block size in bytes (a power of two, 2 MiB by default).
    pub block_size: u32,
    /// 36: checksum.
    pub checksum: u32,
    /// 40: the parent's unique id (differencing disks).
    pub parent_uuid: [u8; 16],
    /// 56: the parent's modification time.
    pub parent_timestamp: u32,
    /// 64: the parent's file name, UTF-16 big-endian (512 bytes).
    pub parent_name: String,
    /// 576: parent locators.
    pub locators: [ParentLocator; 8],
}

impl DynHeader {
    /// Parses and validates the header: cookie, checksum, block size.
    pub fn decode(b: &[u8; DYN_HEADER_LEN]) -> Result<DynHeader> {
        if b[..8] != DYN_COOKIE[..] {
            return Err(Error::invalid("no 'cxsparse' dynamic header cookie").with_field("dynamic_header"));
        }
        let stored = BigEndian::read_u32(&b[36..]);
        let want = checksum(b, 36);
        if stored != want {
            return Err(Error::invalid(format!(
                "dynamic header checksum is {stored:#010x}, the header's bytes sum to {want:#010x}"
            ))
            .with_field("checksum"));
        }
        let block_size = BigEndian::read_u32(&b[32..]);
        if !block_size.is_power_of_two() || block_size < 512 || u64::from(block_size) > VPC_MAX_BLOCK_SIZE {
            return Err(Error::invalid(format!(
                "block size {block_size} is not a power of two between 512 and {VPC_MAX_BLOCK_SIZE}"
            ))
            .with_field("block_size"));
        }
        let units: Vec<u16> = b[64..576].chunks_exact(2).map(BigEndian::read_u16).take_while(|&u| u != 0).collect();
        let mut locators = [ParentLocator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let e = &b[576 + 24 * i..600 + 24 * i];
            *l = ParentLocator {
                code: [e[0], e[1], e[2], e[3]],
                data_space: BigEndian::read_u32(&e[4..]),
                data_len: BigEndian::read_u32(&e[8..]),
                data_offset: BigEndian::read_u64(&e[16..]),
            };
        }
        Ok(DynHeader {
            data_offset: BigEndian::read_u64(&b[8..]),
            table_offset: BigEndian::read_u64(&b[16..]),
            version: BigEndian::read_u32(&b[24..]),
            max_table_entries: BigEndian::read_u32(&b[28..]),
            block_size,
            checksum: stored,
            parent_uuid: b[40..56].try_into().unwrap_or([0; 16]),
            parent_timestamp: BigEndian::read_u32(&b[56..]),
            parent_name: String::from_utf16_lossy(&units),
            locators,
        })
    }

    /// Writes the header with a fresh checksum.
    pub fn encode(&self) -> [u8; DYN_HEADER_LEN] {
        let mut b = [0u8; DYN_HEADER_LEN];
        b[..8].copy_from_slice(DYN_COOKIE);
        BigEndian::write_u64(&mut b[8..], self.data_offset);
        BigEndian::write_u64(&mut b[16..], self.table_offset);
        BigEndian::write_u32(&mut b[24..], self.version);
        BigEndian::write_u32(&mut b[28..], self.max_table_entries);
        BigEndian::write_u32(&mut b[32..], self.block_size);
        b[40..56].copy_from_slice(&self.parent_uuid);
        BigEndian::write_u32(&mut b[56..], self.parent_timestamp);
        for (i, u) in self.parent_name.encode_utf16().take(256).enumerate() {
            BigEndian::write_u16(&mut b[64 + 2 * i..], u);
        }
        for (i, l) in self.locators.iter().enumerate() {
            let e = &mut b[576 + 24 * i..600 + 24 * i];
            e[..4].copy_from_slice(&l.code);
            BigEndian::write_u32(&mut e[4..], l.data_space);
            BigEndian::write_u32(&mut e[8..], l.data_len);
            BigEndian::write_u64(&mut e[16..], l.data_offset);
        }
        let c = checksum(&b, 36);
        BigEndian::write_u32(&mut b[36..], c);
        b
    }

    /// Bytes of the sector bitmap before each block's data: one bit per
    /// sector, rounded up to whole sectors.
    pub fn bitmap_len(&self) -> u64 {
        (u64::from(self.block_size) / 512).div_ceil(8).next_multiple_of(512)
    }
}

/// Decodes the data of a parent locator: UTF-16 little-endian for the
/// Windows codes `W2ru`/`W2ku`, UTF-8 (a `file://` URL) for `MacX`.
/// Backslashes become slashes and a leading `.\` or `./` is dropped.
/// `None` for codes vdisk does not read.
pub fn locator_name(code: &[u8; 4], data: &[u8]) -> Option<String> {
    if data.len() > VPC_MAX_PARENT_LOCATOR {
        return None;
    }
    let s = match code {
        b"W2ru" | b"W2ku" => {
            let units: Vec<u16> =
                data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
            String::from_utf16(&units).ok()?
        }
        b"MacX" => {
            let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
            s.strip_prefix("file://").unwrap_or(s).to_string()
        }
        _ => return None,
    };
    let s = s.replace('\\', "/");
    let s = s.strip_prefix("./").map(str::to_string).unwrap_or(s);
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = DynHeader {
            data_offset: u64::MAX,
            table_offset: 1536,
            version: 0x10000,
            max_table_entries: 51,
            block_size: DEFAULT_BLOCK_SIZE,
            checksum: 0,
            parent_uuid: [1; 16],
            parent_timestamp: 5,
            parent_name: "base.vhd".into(),
            locators: [ParentLocator { code: *b"W2ru", data_space: 1, data_len: 16, data_offset: 4096 }; 8],
        };
        let b = h.encode();
        let g = DynHeader::decode(&b).unwrap();
        assert_eq!(g.encode(), b);
        assert_eq!(g.parent_name, "base.vhd");
        assert_eq!(g.bitmap_len(), 512);
        let mut bad = b;
        BigEndian::write_u32(&mut bad[32..], 3000);
        let c = checksum(&bad, 36);
        BigEndian::write_u32(&mut bad[36..], c);
        assert_eq!(DynHeader::decode(&bad).unwrap_err().field(), Some("block_size"));
    }

    #[test]
    fn locator_names() {
        let w: Vec<u8> = ".\\dir\\base.vhd".encode_utf16().flat_map(u16::to_le_bytes).collect();
        assert_eq!(locator_name(b"W2ru", &w).as_deref(), Some("dir/base.vhd"));
        assert_eq!(locator_name(b"MacX", b"file:///x/b.vhd").as_deref(), Some("/x/b.vhd"));
        assert_eq!(locator_name(b"Mac ", b"x"), None);
    }
}
