//! The VHD hard disk footer (spec: "Virtual Hard Disk Image Format
//! Specification" 1.0, "Hard Disk Footer Format"), its checksum, the CHS
//! geometry QEMU computes for new images, and the rule QEMU uses to pick
//! the guest-visible size (geometry or `current_size`) by creator app.

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, Result};

/// Size of the footer (and of its copy at the start of dynamic images).
pub const FOOTER_LEN: usize = 512;
/// The footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// `disk_type` of a fixed disk.
pub const TYPE_FIXED: u32 = 2;
/// `disk_type` of a dynamic disk.
pub const TYPE_DYNAMIC: u32 = 3;
/// `disk_type` of a differencing disk.
pub const TYPE_DIFFERENCING: u32 = 4;
/// `data_offset` of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Largest geometry: 65535 cylinders, 16 heads, 255 sectors (QEMU's
/// `VHD_MAX_GEOMETRY`). An image with this geometry is sized by
/// `current_size` whatever its creator.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

/// The 512-byte footer. Offsets are those of the spec's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// 8: feature bits (0x2, "reserved", is always set).
    pub features: u32,
    /// 12: file format version (0x00010000).
    pub version: u32,
    /// 16: offset of the dynamic disk header; all ones for fixed disks.
    pub data_offset: u64,
    /// 24: seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// 28: creator application (`qemu`, `qem2`, `vpc `, `win `, `d2v `, ...).
    pub creator_app: [u8; 4],
    /// 32: creator version.
    pub creator_version: u32,
    /// 36: creator host OS (`Wi2k`, `Mac `).
    pub creator_os: [u8; 4],
    /// 40: size at creation.
    pub original_size: u64,
    /// 48: current size in bytes.
    pub current_size: u64,
    /// 56: cylinders.
    pub cylinders: u16,
    /// 58: heads.
    pub heads: u8,
    /// 59: sectors per track.
    pub sectors: u8,
    /// 60: 2 fixed, 3 dynamic, 4 differencing.
    pub disk_type: u32,
    /// 64: one's complement of the byte sum of the footer without this field.
    pub checksum: u32,
    /// 68: unique id.
    pub uuid: [u8; 16],
    /// 84: saved state flag.
    pub saved_state: u8,
    /// 85..512: reserved bytes, kept as read (zeros in new images).
    pub reserved: [u8; 427],
}

/// One's complement of the sum of `bytes`, skipping the 4 checksum bytes at
/// `skip` (the footer's and the dynamic header's checksum rule).
pub fn checksum(bytes: &[u8], skip: usize) -> u32 {
    let mut sum = 0u32;
    for (i, b) in bytes.iter().enumerate() {
        if !(skip..skip + 4).contains(&i) {
            sum = sum.wrapping_add(u32::from(*b));
        }
    }
    !sum
}

impl Footer {
    /// Whether `b` starts with the footer cookie.
    pub fn has_cookie(b: &[u8]) -> bool {
        b.get(..8) == Some(&COOKIE[..])
    }

    /// Parses and validates a footer: cookie, checksum, disk type.
    pub fn decode(b: &[u8; FOOTER_LEN]) -> Result<Footer> {
        if !Self::has_cookie(b) {
            return Err(Error::invalid("no 'conectix' footer cookie").with_field("cookie"));
        }
        let f = Footer {
            features: BigEndian::read_u32(&b[8..]),
            version: BigEndian::read_u32(&b[12..]),
            data_offset: BigEndian::read_u64(&b[16..]),
            timestamp: BigEndian::read_u32(&b[24..]),
            creator_app: [b[28], b[29], b[30], b[31]],
            creator_version: BigEndian::read_u32(&b[32..]),
            creator_os: [b[36], b[37], b[38], b[39]],
            original_size: BigEndian::read_u64(&b[40..]),
            current_size: BigEndian::read_u64(&b[48..]),
            cylinders: BigEndian::read_u16(&b[56..]),
            heads: b[58],
            sectors: b[59],
            disk_type: BigEndian::read_u32(&b[60..]),
            checksum: BigEndian::read_u32(&b[64..]),
            uuid: b[68..84].try_into().unwrap_or([0; 16]),
            saved_state: b[84],
            reserved: b[85..].try_into().unwrap_or([0; 427]),
        };
        let want = checksum(b, 64);
        if f.checksum != want {
            return Err(Error::invalid(format!(
                "footer checksum is {:#010x}, the footer's bytes sum to {want:#010x}",
                f.checksum
            ))
            .with_field("checksum"));
        }
        match f.disk_type {
            TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING => {}
            t => {
                return Err(Error::unsupported(format!("disk type {t} (2 fixed, 3 dynamic, 4 differencing)"))
                    .with_field("disk_type"))
            }
        }
        Ok(f)
    }

    /// Writes the footer, with a freshly computed checksum.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[..8].copy_from_slice(COOKIE);
        BigEndian::write_u32(&mut b[8..], self.features);
        BigEndian::write_u32(&mut b[12..], self.version);
        BigEndian::write_u64(&mut b[16..], self.data_offset);
        BigEndian::write_u32(&mut b[24..], self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        BigEndian::write_u32(&mut b[32..], self.creator_version);
        b[36..40].copy_from_slice(&self.creator_os);
        BigEndian::write_u64(&mut b[40..], self.original_size);
        BigEndian::write_u64(&mut b[48..], self.current_size);
        BigEndian::write_u16(&mut b[56..], self.cylinders);
        b[58] = self.heads;
        b[59] = self.sectors;
        BigEndian::write_u32(&mut b[60..], self.disk_type);
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        b[85..].copy_from_slice(&self.reserved);
        let c = checksum(&b, 64);
        BigEndian::write_u32(&mut b[64..], c);
        b
    }

    /// Sectors the CHS geometry covers.
    pub fn geometry_sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }

    /// Whether the creator sizes disks by `current_size` rather than by
    /// geometry. As in QEMU 10, only Virtual PC (`vpc `) and QEMU without
    /// `force_size` (`qemu`) use the geometry; Hyper-V (`win `), disk2vhd
    /// (`d2v `), QEMU with `force_size` (`qem2`), XenServer (`tap\0`),
    /// XenConverter (`CTXS`) and every other creator use `current_size`
    /// (measured with qemu-img 10.0.2, unknown creators included).
    pub fn sized_by_current_size(&self) -> bool {
        !matches!(&self.creator_app, b"vpc " | b"qemu")
    }

    /// The guest-visible size in bytes, as QEMU computes it: the CHS
    /// geometry for Virtual PC's and QEMU's images (unless the geometry is
    /// the maximum), `current_size` rounded down to whole sectors for the
    /// creators of [`sized_by_current_size`](Self::sized_by_current_size).
    pub fn virtual_size(&self) -> u64 {
        let chs = self.geometry_sectors();
        let sectors =
            if self.sized_by_current_size() || chs == MAX_GEOMETRY_SECTORS { self.current_size / 512 } else { chs };
        sectors * 512
    }
}

/// The geometry QEMU gives `total_sectors` (the VHD spec's algorithm with
/// QEMU's cap at 65535·16·255): `(cylinders, heads, sectors per track)`.
/// It may cover fewer sectors than asked.
pub fn calculate_geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(MAX_GEOMETRY_SECTORS);
    let (spt, heads, cth): (u64, u64, u64);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    // cth / heads <= 65535 by the cap above.
    ((cth / heads).min(65535) as u16, heads as u8, spt as u8)
}

/// The geometry and size QEMU's `vpc` driver gives a new image of `size`
/// bytes: without `force_size`, the smallest geometry covering the size
/// (the size becomes the geometry's, possibly larger), or the exact size
/// when that needs the maximum geometry; with `force_size`, the size
/// rounded down to whole sectors and the maximum geometry.
pub fn create_geometry(size: u64, force_size: bool) -> Result<((u16, u8, u8), u64)> {
    let total_sectors = size / 512;
    if force_size {
        return Ok(((65535, 16, 255), total_sectors * 512));
    }
    let want = total_sectors.min(MAX_GEOMETRY_SECTORS);
    let mut geo = (0u16, 0u8, 0u8);
    let mut i = 0u64;
    while want > u64::from(geo.0) * u64::from(geo.1) * u64::from(geo.2) {
        geo = calculate_geometry(want + i);
        i += 1;
    }
    let chs = u64::from(geo.0) * u64::from(geo.1) * u64::from(geo.2);
    let sectors = if chs == MAX_GEOMETRY_SECTORS { total_sectors } else { chs };
    Ok((geo, sectors * 512))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_qemu() {
        // Sizes and virtual sizes printed by qemu-img 10 for `create -f vpc`.
        assert_eq!(create_geometry(100 << 20, false).unwrap().1, 104_865_792);
        assert_eq!(create_geometry(100 << 20, false).unwrap().0, (1004, 12, 17));
        assert_eq!(create_geometry(100 << 20, true).unwrap().1, 100 << 20);
    }

    #[test]
    fn footer_round_trip_and_checksum() {
        let f = Footer {
            features: 2,
            version: 0x10000,
            data_offset: 512,
            timestamp: 7,
            creator_app: *b"qemu",
            creator_version: 0x50003,
            creator_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            cylinders: 20,
            heads: 4,
            sectors: 17,
            disk_type: TYPE_DYNAMIC,
            checksum: 0,
            uuid: [9; 16],
            saved_state: 0,
            reserved: [0; 427],
        };
        let b = f.encode();
        let g = Footer::decode(&b).unwrap();
        assert_eq!(g.encode(), b);
        let mut bad = b;
        bad[100] ^= 1;
        assert_eq!(Footer::decode(&bad).unwrap_err().field(), Some("checksum"));
    }

    #[test]
    fn size_by_creator() {
        let mut f = Footer::decode(&{
            let mut t = Footer {
                features: 2,
                version: 0x10000,
                data_offset: NO_DATA_OFFSET,
                timestamp: 0,
                creator_app: *b"vpc ",
                creator_version: 0,
                creator_os: *b"Wi2k",
                original_size: 0,
                current_size: 10 << 20,
                cylinders: 100,
                heads: 4,
                sectors: 17,
                disk_type: TYPE_FIXED,
                checksum: 0,
                uuid: [0; 16],
                saved_state: 0,
                reserved: [0; 427],
            };
            t.checksum = 0;
            t.encode()
        })
        .unwrap();
        assert_eq!(f.virtual_size(), 100 * 4 * 17 * 512);
        for app in [b"win ", b"d2v ", b"qem2", b"CTXS", b"tap\0", b"vbox"] {
            f.creator_app = *app;
            assert_eq!(f.virtual_size(), 10 << 20);
        }
        f.creator_app = *b"qemu";
        (f.cylinders, f.heads, f.sectors) = (65535, 16, 255);
        assert_eq!(f.virtual_size(), 10 << 20);
    }
}
