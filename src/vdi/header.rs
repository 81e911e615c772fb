//! The VDI pre-header and header, version 1.1 (VirtualBox `VDICore.h`;
//! QEMU `block/vdi.c` for what QEMU accepts). Little-endian.

use byteorder::{ByteOrder, LittleEndian};

use crate::error::{Error, Result};
use crate::limits::{VDI_BLOCKS_IN_IMAGE_MAX, VDI_BLOCK_SIZE, VDI_MAX_BMAP_BYTES};

/// The signature at offset 0x40.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Bytes read and written for the header.
pub const HEADER_LEN: usize = 512;
/// `image_type` of a dynamic (growing) image.
pub const TYPE_DYNAMIC: u32 = 1;
/// `image_type` of a static (preallocated) image.
pub const TYPE_STATIC: u32 = 2;
/// Block map entry of a block never written.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// Block map entry of a discarded block (reads as zeros).
pub const DISCARDED: u32 = 0xffff_fffe;
/// The text QEMU writes at the start of its images.
pub const QEMU_TEXT: &str = "<<< QEMU VM Virtual Disk Image >>>\n";

/// Whether a block map entry points at data.
pub fn is_allocated(e: u32) -> bool {
    e < DISCARDED
}

/// The VDI header. Offsets are byte offsets in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 0x00: free text (64 bytes).
    pub text: [u8; 64],
    /// 0x48: header size after the pre-header.
    pub header_size: u32,
    /// 0x4c: 1 dynamic, 2 static.
    pub image_type: u32,
    /// 0x50: flags.
    pub image_flags: u32,
    /// 0x54: description (256 bytes).
    pub description: [u8; 256],
    /// 0x154: byte offset of the block map.
    pub offset_bmap: u32,
    /// 0x158: byte offset of block 0's data.
    pub offset_data: u32,
    /// 0x15c: legacy geometry: cylinders.
    pub cylinders: u32,
    /// 0x160: heads.
    pub heads: u32,
    /// 0x164: sectors.
    pub sectors: u32,
    /// 0x168: sector size (512).
    pub sector_size: u32,
    /// 0x170: guest size in bytes.
    pub disk_size: u64,
    /// 0x178: block size (1 MiB).
    pub block_size: u32,
    /// 0x17c: extra bytes before each block's data.
    pub block_extra: u32,
    /// 0x180: blocks in the image.
    pub blocks_in_image: u32,
    /// 0x184: blocks allocated.
    pub blocks_allocated: u32,
    /// 0x188: the image's UUID.
    pub uuid_image: [u8; 16],
    /// 0x198: UUID of the last snapshot.
    pub uuid_last_snap: [u8; 16],
    /// 0x1a8: link UUID (differencing images).
    pub uuid_link: [u8; 16],
    /// 0x1b8: parent UUID (differencing images).
    pub uuid_parent: [u8; 16],
    /// Bytes 0x1c8..0x200 as read, written back unchanged.
    pub rest: [u8; 56],
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

impl Header {
    /// Parses and validates the header as QEMU does, plus the layout
    /// checks QEMU leaves out (block map inside the file and before the
    /// data, no `block_extra`).
    pub fn decode(b: &[u8; HEADER_LEN], file_len: u64) -> Result<Header> {
        let sig = LittleEndian::read_u32(&b[0x40..]);
        if sig != SIGNATURE {
            return Err(
                Error::invalid(format!("Image not in VDI format (bad signature {sig:08x})")).with_field("signature")
            );
        }
        let version = LittleEndian::read_u32(&b[0x44..]);
        if version != VERSION_1_1 {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (version {}.{})",
                version >> 16,
                version & 0xffff
            ))
            .with_field("version"));
        }
        let h = Header {
            text: arr(&b[0..]),
            header_size: LittleEndian::read_u32(&b[0x48..]),
            image_type: LittleEndian::read_u32(&b[0x4c..]),
            image_flags: LittleEndian::read_u32(&b[0x50..]),
            description: arr(&b[0x54..]),
            offset_bmap: LittleEndian::read_u32(&b[0x154..]),
            offset_data: LittleEndian::read_u32(&b[0x158..]),
            cylinders: LittleEndian::read_u32(&b[0x15c..]),
            heads: LittleEndian::read_u32(&b[0x160..]),
            sectors: LittleEndian::read_u32(&b[0x164..]),
            sector_size: LittleEndian::read_u32(&b[0x168..]),
            disk_size: LittleEndian::read_u64(&b[0x170..]),
            block_size: LittleEndian::read_u32(&b[0x178..]),
            block_extra: LittleEndian::read_u32(&b[0x17c..]),
            blocks_in_image: LittleEndian::read_u32(&b[0x180..]),
            blocks_allocated: LittleEndian::read_u32(&b[0x184..]),
            uuid_image: arr(&b[0x188..]),
            uuid_last_snap: arr(&b[0x198..]),
            uuid_link: arr(&b[0x1a8..]),
            uuid_parent: arr(&b[0x1b8..]),
            rest: arr(&b[0x1c8..]),
        };
        let unsup = |m: String, f: &'static str| Err(Error::unsupported(m).with_field(f));
        if !matches!(h.image_type, TYPE_DYNAMIC | TYPE_STATIC) {
            return unsup(
                format!("unsupported VDI image (type {}; 1 dynamic and 2 static are supported)", h.image_type),
                "image_type",
            );
        }
        if !h.offset_bmap.is_multiple_of(512) {
            return unsup(
                format!("unsupported VDI image (unaligned block map offset {:#x})", h.offset_bmap),
                "offset_bmap",
            );
        }
        if !h.offset_data.is_multiple_of(512) {
            return unsup(format!("unsupported VDI image (unaligned data offset {:#x})", h.offset_data), "offset_data");
        }
        if h.sector_size != 512 {
            return unsup(format!("unsupported VDI image (sector size {} is not 512)", h.sector_size), "sector_size");
        }
        if h.block_size != VDI_BLOCK_SIZE {
            return unsup(
                format!("unsupported VDI image (block size {} is not {VDI_BLOCK_SIZE})", h.block_size),
                "block_size",
            );
        }
        if h.block_extra != 0 {
            return unsup(format!("unsupported VDI image (block extra {} is not 0)", h.block_extra), "block_extra");
        }
        let room = u64::from(h.blocks_in_image) * u64::from(h.block_size);
        if h.disk_size > room {
            return unsup(
                format!("unsupported VDI image (disk size {}, image bitmap has room for {room})", h.disk_size),
                "disk_size",
            );
        }
        if h.uuid_link != [0; 16] {
            return unsup("unsupported VDI image (non-NULL link UUID)".into(), "uuid_link");
        }
        if h.uuid_parent != [0; 16] {
            return unsup("unsupported VDI image (non-NULL parent UUID)".into(), "uuid_parent");
        }
        if h.blocks_in_image > VDI_BLOCKS_IN_IMAGE_MAX {
            return unsup(
                format!(
                    "unsupported VDI image (too many blocks {}, max is {VDI_BLOCKS_IN_IMAGE_MAX})",
                    h.blocks_in_image
                ),
                "blocks_in_image",
            );
        }
        let bmap = h.bmap_bytes();
        if bmap > VDI_MAX_BMAP_BYTES {
            return Err(Error::limit(format!(
                "block map of {bmap} bytes is larger than the {VDI_MAX_BMAP_BYTES}-byte limit"
            ))
            .with_field("blocks_in_image"));
        }
        let bmap_end = u64::from(h.offset_bmap) + bmap;
        if u64::from(h.offset_bmap) < HEADER_LEN as u64 || bmap_end > u64::from(h.offset_data) || bmap_end > file_len {
            return Err(Error::invalid(format!(
                "block map at {:#x} ({bmap} bytes) overlaps the header or the data at {:#x}, or lies past the end of the file ({file_len} bytes)",
                h.offset_bmap, h.offset_data
            ))
            .with_field("offset_bmap"));
        }
        Ok(h)
    }

    /// Bytes of the block map on disk (4 per block, whole sectors).
    pub fn bmap_bytes(&self) -> u64 {
        (u64::from(self.blocks_in_image) * 4).next_multiple_of(512)
    }

    /// Writes the header back (512 bytes).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..64].copy_from_slice(&self.text);
        LittleEndian::write_u32(&mut b[0x40..], SIGNATURE);
        LittleEndian::write_u32(&mut b[0x44..], VERSION_1_1);
        LittleEndian::write_u32(&mut b[0x48..], self.header_size);
        LittleEndian::write_u32(&mut b[0x4c..], self.image_type);
        LittleEndian::write_u32(&mut b[0x50..], self.image_flags);
        b[0x54..0x154].copy_from_slice(&self.description);
        LittleEndian::write_u32(&mut b[0x154..], self.offset_bmap);
        LittleEndian::write_u32(&mut b[0x158..], self.offset_data);
        LittleEndian::write_u32(&mut b[0x15c..], self.cylinders);
        LittleEndian::write_u32(&mut b[0x160..], self.heads);
        LittleEndian::write_u32(&mut b[0x164..], self.sectors);
        LittleEndian::write_u32(&mut b[0x168..], self.sector_size);
        LittleEndian::write_u64(&mut b[0x170..], self.disk_size);
        LittleEndian::write_u32(&mut b[0x178..], self.block_size);
        LittleEndian::write_u32(&mut b[0x17c..], self.block_extra);
        LittleEndian::write_u32(&mut b[0x180..], self.blocks_in_image);
        LittleEndian::write_u32(&mut b[0x184..], self.blocks_allocated);
        b[0x188..0x198].copy_from_slice(&self.uuid_image);
        b[0x198..0x1a8].copy_from_slice(&self.uuid_last_snap);
        b[0x1a8..0x1b8].copy_from_slice(&self.uuid_link);
        b[0x1b8..0x1c8].copy_from_slice(&self.uuid_parent);
        b[0x1c8..].copy_from_slice(&self.rest);
        b
    }
}

/// Formats a UUID the usual way (`xxxxxxxx-xxxx-...`), in the byte order
/// VirtualBox stores (the first three fields little-endian).
pub fn uuid_string(u: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u[3], u[2], u[1], u[0], u[5], u[4], u[7], u[6], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut text = [0u8; 64];
        text[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT.as_bytes());
        Header {
            text,
            header_size: 0x180,
            image_type: TYPE_DYNAMIC,
            image_flags: 0,
            description: [0; 256],
            offset_bmap: 0x200,
            offset_data: 0x400,
            cylinders: 0,
            heads: 0,
            sectors: 0,
            sector_size: 512,
            disk_size: 100 << 20,
            block_size: VDI_BLOCK_SIZE,
            block_extra: 0,
            blocks_in_image: 100,
            blocks_allocated: 0,
            uuid_image: [1; 16],
            uuid_last_snap: [2; 16],
            uuid_link: [0; 16],
            uuid_parent: [0; 16],
            rest: [0; 56],
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let h = sample();
        let b = h.encode();
        assert_eq!(Header::decode(&b, 1024).unwrap(), h);
        let field = |f: fn(&mut Header)| {
            let mut h = sample();
            f(&mut h);
            Header::decode(&h.encode(), 1024).unwrap_err().field()
        };
        assert_eq!(field(|h| h.block_size = 4096), Some("block_size"));
        assert_eq!(field(|h| h.disk_size = 101 << 20), Some("disk_size"));
        assert_eq!(field(|h| h.uuid_parent = [3; 16]), Some("uuid_parent"));
        assert_eq!(field(|h| h.offset_bmap = 0x300), Some("offset_bmap"));
        assert_eq!(field(|h| h.image_type = 4), Some("image_type"));
        assert_eq!(uuid_string(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 9, 9, 9, 9, 9, 9, 9, 9]).len(), 36);
    }
}
