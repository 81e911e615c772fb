//! The hosted sparse extent header (VMware "Virtual Disk Format 1.1",
//! "Hosted Sparse Extent Header"), stream markers, and the grain
//! directory / grain table arithmetic.
//!
//! All integers are little-endian; sizes and offsets are in 512-byte
//! sectors unless a name says bytes.

use byteorder::{ByteOrder, LittleEndian};

use crate::error::{Error, Result};
use crate::limits::{VMDK_MAX_CAPACITY, VMDK_MAX_GD_BYTES, VMDK_MAX_GRAIN_SECTORS, VMDK_MAX_GTES_PER_GT};
use crate::reader::Reader;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// On-disk size of the header (one sector).
pub const HEADER_LEN: usize = 512;
/// `magicNumber` of a hosted sparse extent: "KDMV".
pub const SPARSE_MAGIC: u32 = 0x564d_444b;
/// Magic of a legacy ESX sparse extent (COWD).
pub const COWD_MAGIC: u32 = 0x4457_4f43;
/// Magic of an ESXi seSparse extent (const header, low 32 bits).
pub const SESPARSE_MAGIC: u32 = 0xcafe_babe;
/// `gdOffset` meaning "the grain directory is described by the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// flags bit 0: the newline-detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1;
/// flags bit 1: a redundant grain directory is kept.
pub const FLAG_RGD: u32 = 1 << 1;
/// flags bit 2: grain table entry 1 means "zeroed grain".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// flags bit 16: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// flags bit 17: grains and metadata carry markers.
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Every flag bit vdisk understands.
pub const KNOWN_FLAGS: u32 = FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS;
/// `compressAlgorithm`: none.
pub const COMPRESSION_NONE: u16 = 0;
/// `compressAlgorithm`: deflate in a zlib stream (RFC 1950).
pub const COMPRESSION_DEFLATE: u16 = 1;
/// The newline-detection bytes: `\n`, ` `, `\r`, `\n`.
pub const NL_BYTES: [u8; 4] = [b'\n', b' ', b'\r', b'\n'];
/// A grain table entry meaning "zeroed grain" (with [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;
/// Metadata marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Metadata marker type: grain table follows.
pub const MARKER_GT: u32 = 1;
/// Metadata marker type: grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Metadata marker type: footer follows.
pub const MARKER_FOOTER: u32 = 3;
/// Size of a grain marker before the compressed data: u64 lba + u32 size.
pub const GRAIN_MARKER_LEN: u64 = 12;

/// The hosted sparse extent header (`SparseExtentHeader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    /// Offset 4: version, 1..=3.
    pub version: u32,
    /// Offset 8: flags (`FLAG_*`).
    pub flags: u32,
    /// Offset 12: capacity in sectors.
    pub capacity: u64,
    /// Offset 20: grain size in sectors (a power of two).
    pub grain_size: u64,
    /// Offset 28: embedded descriptor start, in sectors (0: none).
    pub descriptor_offset: u64,
    /// Offset 36: embedded descriptor size in sectors.
    pub descriptor_size: u64,
    /// Offset 44: grain table entries per grain table.
    pub num_gtes_per_gt: u32,
    /// Offset 48: redundant grain directory, in sectors.
    pub rgd_offset: u64,
    /// Offset 56: grain directory in sectors, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Offset 64: sectors before the first grain.
    pub overhead: u64,
    /// Offset 72: set while a VMware product has the disk open.
    pub unclean_shutdown: u8,
    /// Offset 73: the newline-detection bytes.
    pub nl_bytes: [u8; 4],
    /// Offset 77: compression algorithm.
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Decodes the first sector of an extent without judging the values.
    pub fn decode(buf: &[u8]) -> Result<SparseHeader> {
        let mut r = Reader::new(buf, "vmdk sparse header");
        let magic = r.le_u32()?;
        if magic != SPARSE_MAGIC {
            return Err(Error::invalid(format!("bad sparse extent magic {magic:#010x} (expected KDMV)"))
                .with_field("magicNumber"));
        }
        let version = r.le_u32()?;
        let flags = r.le_u32()?;
        let capacity = r.le_u64()?;
        let grain_size = r.le_u64()?;
        let descriptor_offset = r.le_u64()?;
        let descriptor_size = r.le_u64()?;
        let num_gtes_per_gt = r.le_u32()?;
        let rgd_offset = r.le_u64()?;
        let gd_offset = r.le_u64()?;
        let overhead = r.le_u64()?;
        let unclean_shutdown = r.u8()?;
        let nl = r.take(4)?;
        let nl_bytes = [
            nl.first().copied().unwrap_or(0),
            nl.get(1).copied().unwrap_or(0),
            nl.get(2).copied().unwrap_or(0),
            nl.get(3).copied().unwrap_or(0),
        ];
        let compress_algorithm = r.le_u16()?;
        Ok(SparseHeader {
            version,
            flags,
            capacity,
            grain_size,
            descriptor_offset,
            descriptor_size,
            num_gtes_per_gt,
            rgd_offset,
            gd_offset,
            overhead,
            unclean_shutdown,
            nl_bytes,
            compress_algorithm,
        })
    }

    /// Decodes and validates every field that does not depend on the file
    /// (the caller checks offsets against the file length).
    pub fn parse(buf: &[u8]) -> Result<SparseHeader> {
        let h = Self::decode(buf)?;
        h.validate()?;
        Ok(h)
    }

    /// Checks the fields that do not depend on the file.
    pub fn validate(&self) -> Result<()> {
        if self.version == 0 || self.version > 3 {
            return Err(Error::unsupported(format!("sparse extent version {} (vdisk reads 1 to 3)", self.version))
                .with_field("version"));
        }
        let unknown = self.flags & !KNOWN_FLAGS;
        if unknown != 0 {
            return Err(Error::unsupported(format!("unknown sparse extent flags {unknown:#x}")).with_field("flags"));
        }
        if self.flags & FLAG_NL_DETECT != 0 && self.nl_bytes != NL_BYTES {
            return Err(Error::invalid(format!(
                "newline-detection bytes are {:02x?} instead of 0a 20 0d 0a: the file was corrupted by a text-mode transfer",
                self.nl_bytes
            ))
            .with_field("singleEndLineChar"));
        }
        if self.capacity > VMDK_MAX_CAPACITY / SECTOR {
            return Err(Error::limit(format!(
                "capacity of {} sectors is more than vdisk's {VMDK_MAX_CAPACITY}-byte limit",
                self.capacity
            ))
            .with_field("capacity"));
        }
        if self.grain_size == 0 || !self.grain_size.is_power_of_two() || self.grain_size > VMDK_MAX_GRAIN_SECTORS {
            return Err(Error::invalid(format!(
                "grain size of {} sectors is not a power of two between 1 and {VMDK_MAX_GRAIN_SECTORS}",
                self.grain_size
            ))
            .with_field("grainSize"));
        }
        if self.num_gtes_per_gt == 0 || self.num_gtes_per_gt > VMDK_MAX_GTES_PER_GT {
            return Err(Error::invalid(format!(
                "{} grain table entries per grain table (must be 1 to {VMDK_MAX_GTES_PER_GT})",
                self.num_gtes_per_gt
            ))
            .with_field("numGTEsPerGT"));
        }
        match self.compress_algorithm {
            COMPRESSION_NONE | COMPRESSION_DEFLATE => {}
            other => {
                return Err(Error::unsupported(format!(
                    "compression algorithm {other} (vdisk knows 0 none and 1 deflate)"
                ))
                .with_field("compressAlgorithm"))
            }
        }
        if self.gd_offset == 0 {
            return Err(Error::invalid("grain directory offset is 0").with_field("gdOffset"));
        }
        let gd_bytes = self.geometry().gd_bytes();
        if gd_bytes > VMDK_MAX_GD_BYTES {
            return Err(Error::limit(format!(
                "grain directory of {gd_bytes} bytes is larger than the {VMDK_MAX_GD_BYTES}-byte limit"
            ))
            .with_field("capacity"));
        }
        Ok(())
    }

    /// Encodes the header into one sector.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        LittleEndian::write_u32(&mut b[0..4], SPARSE_MAGIC);
        LittleEndian::write_u32(&mut b[4..8], self.version);
        LittleEndian::write_u32(&mut b[8..12], self.flags);
        LittleEndian::write_u64(&mut b[12..20], self.capacity);
        LittleEndian::write_u64(&mut b[20..28], self.grain_size);
        LittleEndian::write_u64(&mut b[28..36], self.descriptor_offset);
        LittleEndian::write_u64(&mut b[36..44], self.descriptor_size);
        LittleEndian::write_u32(&mut b[44..48], self.num_gtes_per_gt);
        LittleEndian::write_u64(&mut b[48..56], self.rgd_offset);
        LittleEndian::write_u64(&mut b[56..64], self.gd_offset);
        LittleEndian::write_u64(&mut b[64..72], self.overhead);
        b[72] = self.unclean_shutdown;
        b[73..77].copy_from_slice(&self.nl_bytes);
        LittleEndian::write_u16(&mut b[77..79], self.compress_algorithm);
        b
    }

    /// Whether grains are compressed.
    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESSION_DEFLATE
    }

    /// Whether grains and metadata carry markers.
    pub fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// Whether GTE 1 means a zeroed grain.
    pub fn zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }

    /// Whether a redundant grain directory is kept.
    pub fn has_rgd(&self) -> bool {
        self.flags & FLAG_RGD != 0
    }

    /// Table geometry. Only meaningful on a validated header.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            capacity: self.capacity,
            grain_size: self.grain_size.max(1),
            gtes_per_gt: u64::from(self.num_gtes_per_gt.max(1)),
        }
    }
}

/// Grain directory / grain table arithmetic of one sparse extent.
///
/// All fields are validated (grain size ≤ 2^21 sectors, at most 512 GTEs
/// per GT, capacity ≤ 2^37 sectors), so the products below cannot overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Capacity in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_size: u64,
    /// Grain table entries per grain table.
    pub gtes_per_gt: u64,
}

#[allow(clippy::arithmetic_side_effects)] // bounded by validation, see the struct docs
impl Geometry {
    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }
    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR
    }
    /// Number of grains (the last may be partial).
    pub fn grains(&self) -> u64 {
        self.capacity.div_ceil(self.grain_size)
    }
    /// Entries in the grain directory.
    pub fn gd_entries(&self) -> u64 {
        self.grains().div_ceil(self.gtes_per_gt)
    }
    /// Grain directory size in bytes (entries only).
    pub fn gd_bytes(&self) -> u64 {
        self.gd_entries() * 4
    }
    /// Grain directory size in whole sectors.
    pub fn gd_sectors(&self) -> u64 {
        self.gd_bytes().div_ceil(SECTOR)
    }
    /// Grain table size in bytes (entries only).
    pub fn gt_bytes(&self) -> u64 {
        self.gtes_per_gt * 4
    }
    /// Grain table size in whole sectors.
    pub fn gt_sectors(&self) -> u64 {
        self.gt_bytes().div_ceil(SECTOR)
    }
    /// Guest bytes covered by one grain table.
    pub fn gt_span(&self) -> u64 {
        self.gtes_per_gt * self.grain_bytes()
    }
    /// (grain directory index, grain table index) of extent byte `off`.
    pub fn locate(&self, off: u64) -> (u64, u64) {
        let g = off / self.grain_bytes();
        (g / self.gtes_per_gt, g % self.gtes_per_gt)
    }
}

/// A decoded grain marker: the guest sector (LBA) of the grain and the size
/// of the compressed data that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrainMarker {
    /// Sector of the grain in the extent.
    pub lba: u64,
    /// Compressed data bytes after the marker (0 for a metadata marker).
    pub size: u32,
}

impl GrainMarker {
    /// Decodes the first 12 bytes.
    pub fn decode(b: &[u8]) -> Result<GrainMarker> {
        let mut r = Reader::new(b, "vmdk grain marker");
        Ok(GrainMarker { lba: r.le_u64()?, size: r.le_u32()? })
    }
}

/// A metadata marker sector (`size` 0): `num_sectors` of metadata of type
/// `kind` (`MARKER_*`) follow.
pub fn encode_metadata_marker(num_sectors: u64, kind: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    LittleEndian::write_u64(&mut b[0..8], num_sectors);
    LittleEndian::write_u32(&mut b[8..12], 0);
    LittleEndian::write_u32(&mut b[12..16], kind);
    b
}

/// Decodes a metadata marker: (numSectors, size, type).
pub fn decode_metadata_marker(b: &[u8]) -> Result<(u64, u32, u32)> {
    let mut r = Reader::new(b, "vmdk metadata marker");
    Ok((r.le_u64()?, r.le_u32()?, r.le_u32()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_header() -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: 8192,
            grain_size: 128,
            descriptor_offset: 1,
            descriptor_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 26,
            overhead: 128,
            unclean_shutdown: 0,
            nl_bytes: NL_BYTES,
            compress_algorithm: 0,
        }
    }

    #[test]
    fn round_trip_and_qemu_bytes() {
        let h = qemu_header();
        let b = h.encode();
        // First 0x50 bytes of `qemu-img create -f vmdk a.vmdk 4M`.
        let expect: [u8; 0x50] = [
            0x4b, 0x44, 0x4d, 0x56, 0x01, 0, 0, 0, 0x03, 0, 0, 0, 0, 0x20, 0, 0, //
            0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, //
            0, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, //
            0x15, 0, 0, 0, 0, 0, 0, 0, 0x1a, 0, 0, 0, 0, 0, 0, 0, //
            0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a, 0x20, 0x0d, 0x0a, 0, 0, 0,
        ];
        assert_eq!(&b[..0x50], &expect[..]);
        assert_eq!(SparseHeader::parse(&b).unwrap(), h);
    }

    type Poke = (fn(&mut SparseHeader), crate::ErrorKind);

    #[test]
    fn rejects_bad_fields() {
        let cases: Vec<Poke> = vec![
            (|h| h.version = 4, crate::ErrorKind::Unsupported),
            (|h| h.version = 0, crate::ErrorKind::Unsupported),
            (|h| h.flags |= 1 << 5, crate::ErrorKind::Unsupported),
            (|h| h.nl_bytes = [b'\n', b' ', b'\n', 0], crate::ErrorKind::InvalidImage),
            (|h| h.grain_size = 3, crate::ErrorKind::InvalidImage),
            (|h| h.grain_size = 0, crate::ErrorKind::InvalidImage),
            (|h| h.grain_size = 1 << 22, crate::ErrorKind::InvalidImage),
            (|h| h.num_gtes_per_gt = 0, crate::ErrorKind::InvalidImage),
            (|h| h.num_gtes_per_gt = 513, crate::ErrorKind::InvalidImage),
            (|h| h.compress_algorithm = 2, crate::ErrorKind::Unsupported),
            (|h| h.capacity = u64::MAX, crate::ErrorKind::LimitExceeded),
            (|h| h.gd_offset = 0, crate::ErrorKind::InvalidImage),
            (
                |h| {
                    h.grain_size = 1;
                    h.num_gtes_per_gt = 1;
                    h.capacity = 1 << 37;
                },
                crate::ErrorKind::LimitExceeded,
            ),
        ];
        for (i, (f, kind)) in cases.into_iter().enumerate() {
            let mut h = qemu_header();
            f(&mut h);
            let e = SparseHeader::parse(&h.encode()).unwrap_err();
            assert_eq!(e.kind(), kind, "case {i}: {e}");
        }
        let mut b = qemu_header().encode();
        b[0] = b'C';
        assert!(SparseHeader::parse(&b).is_err());
        assert!(SparseHeader::parse(&b[..40]).is_err());
    }

    #[test]
    fn geometry_math() {
        let g = qemu_header().geometry();
        assert_eq!(g.grain_bytes(), 65536);
        assert_eq!(g.grains(), 64);
        assert_eq!(g.gd_entries(), 1);
        assert_eq!(g.gt_sectors(), 4);
        assert_eq!(g.locate(65536 * 513), (1, 1));
        // 2 GiB extent: 32768 grains, 64 tables, one GD sector.
        let g = Geometry { capacity: 4 << 20, grain_size: 128, gtes_per_gt: 512 };
        assert_eq!(g.gd_entries(), 64);
        assert_eq!(g.gd_sectors(), 1);
        let g = Geometry { capacity: 1000, grain_size: 128, gtes_per_gt: 3 };
        assert_eq!(g.grains(), 8);
        assert_eq!(g.gd_entries(), 3);
        assert_eq!(g.gt_sectors(), 1);
    }

    #[test]
    fn markers() {
        let m = encode_metadata_marker(4, MARKER_GT);
        assert_eq!(decode_metadata_marker(&m).unwrap(), (4, 0, MARKER_GT));
        let gm = GrainMarker::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0]).unwrap();
        assert_eq!(gm, GrainMarker { lba: 1, size: 9 });
        assert!(GrainMarker::decode(&[0; 5]).is_err());
    }
}
