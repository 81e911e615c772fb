//! The qcow2 header (cluster 0): fixed v2/v3 fields, feature bits, the
//! backing file name, validation and encoding (the extensions between them
//! are `extension.rs`'s).
//!
//! Spec: QEMU `docs/interop/qcow2.txt`, "Header" and "Header extensions".
//! Every field is understood, validated or refused; limits mirror
//! `qcow2_do_open` and `qcow2_read_extensions`.

use byteorder::{BigEndian, ByteOrder};

use crate::codec::Codec;
use crate::error::{Error, ErrorKind, Result};
use crate::limits::*;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Size of the v2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Size of the mandatory v3 header.
pub const V3_HEADER_LEN: u32 = 104;
/// Size of the v3 header qemu writes (with the compression type byte and padding).
pub const V3_HEADER_LEN_COMPRESSION: u32 = 112;

/// Incompatible feature bit 0: refcounts may be stale.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: metadata found inconsistent.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: compression_type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit vdisk understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is raw-readable.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption (LUKS) header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (up to 46 bytes, NUL padded on disk).
    pub name: String,
}

/// The bitmaps extension (kept on round-trip; vdisk does not use bitmaps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Bitmap directory size in bytes.
    pub directory_size: u64,
    /// Bitmap directory offset.
    pub directory_offset: u64,
}

/// Legacy AES-CBC encryption (`crypt_method` 1).
pub const CRYPT_AES: u32 = 1;
/// LUKS encryption (`crypt_method` 2).
pub const CRYPT_LUKS: u32 = 2;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), qemu's "zlib".
    #[default]
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// The qemu-img option value.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    /// The codec that reads and writes it.
    pub(crate) fn codec(self) -> Codec {
        match self {
            CompressionType::Zlib => Codec::Deflate,
            CompressionType::Zstd => Codec::Zstd,
        }
    }
}

/// The parsed qcow2 header with its extensions and backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Offset 4: 2 or 3.
    pub version: u32,
    /// Offset 8: where the backing file name is (0: none).
    pub backing_file_offset: u64,
    /// Offset 16: length of the backing file name.
    pub backing_file_size: u32,
    /// Offset 20: log2 of the cluster size.
    pub cluster_bits: u32,
    /// Offset 24: virtual size in bytes.
    pub size: u64,
    /// Offset 32: 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Offset 36: entries in the active L1 table.
    pub l1_size: u32,
    /// Offset 40: active L1 table offset.
    pub l1_table_offset: u64,
    /// Offset 48: refcount table offset.
    pub refcount_table_offset: u64,
    /// Offset 56: refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Offset 60: number of snapshots.
    pub nb_snapshots: u32,
    /// Offset 64: snapshot table offset.
    pub snapshots_offset: u64,
    /// Offset 72 (v3): incompatible feature bits.
    pub incompatible_features: u64,
    /// Offset 80 (v3): compatible feature bits.
    pub compatible_features: u64,
    /// Offset 88 (v3): autoclear feature bits.
    pub autoclear_features: u64,
    /// Offset 96 (v3): refcount width is 1 << refcount_order bits.
    pub refcount_order: u32,
    /// Offset 100 (v3): header length (72 for v2).
    pub header_length: u32,
    /// Offset 104 (v3, if header_length > 104): compression type.
    pub compression_type: CompressionType,
    /// Header bytes past offset 112 that vdisk does not understand, kept.
    pub unknown_header_fields: Vec<u8>,
    /// Backing format extension.
    pub backing_format: Option<String>,
    /// Feature name table extension.
    pub feature_names: Vec<FeatureName>,
    /// External data file name extension.
    pub data_file: Option<String>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Full disk encryption header extension: (offset, length).
    pub crypto_header: Option<(u64, u64)>,
    /// Extensions vdisk does not understand: (type, data), kept in order.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
    /// The backing file name (raw bytes decoded lossily would hide bad
    /// names: it must be UTF-8).
    pub backing_file: Option<String>,
}

pub(super) fn bad(field: &'static str, msg: String) -> Error {
    Error::invalid(msg).with_field(field).with_format("qcow2")
}

/// A field of the fixed qcow2 header (spec: `docs/interop/qcow2.txt`,
/// "Header"): its name as the spec writes it and its byte offset, from one
/// table, so an error about a header field always names both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderField {
    /// `magic`, at byte 0.
    Magic,
    /// `version`, at byte 4.
    Version,
    /// `backing_file_offset`, at byte 8.
    BackingFileOffset,
    /// `backing_file_size`, at byte 16.
    BackingFileSize,
    /// `cluster_bits`, at byte 20.
    ClusterBits,
    /// `size`, at byte 24.
    Size,
    /// `crypt_method`, at byte 32.
    CryptMethod,
    /// `l1_size`, at byte 36.
    L1Size,
    /// `l1_table_offset`, at byte 40.
    L1TableOffset,
    /// `refcount_table_offset`, at byte 48.
    RefcountTableOffset,
    /// `refcount_table_clusters`, at byte 56.
    RefcountTableClusters,
    /// `nb_snapshots`, at byte 60.
    NbSnapshots,
    /// `snapshots_offset`, at byte 64.
    SnapshotsOffset,
    /// `incompatible_features`, at byte 72.
    IncompatibleFeatures,
    /// `compatible_features`, at byte 80 (no bit of it is refused).
    #[allow(dead_code)]
    CompatibleFeatures,
    /// `autoclear_features`, at byte 88.
    AutoclearFeatures,
    /// `refcount_order`, at byte 96.
    RefcountOrder,
    /// `header_length`, at byte 100.
    HeaderLength,
    /// `compression_type`, at byte 104.
    CompressionType,
}

impl HeaderField {
    /// (spec name, byte offset).
    const fn entry(self) -> (&'static str, u64) {
        match self {
            HeaderField::Magic => ("magic", 0),
            HeaderField::Version => ("version", 4),
            HeaderField::BackingFileOffset => ("backing_file_offset", 8),
            HeaderField::BackingFileSize => ("backing_file_size", 16),
            HeaderField::ClusterBits => ("cluster_bits", 20),
            HeaderField::Size => ("size", 24),
            HeaderField::CryptMethod => ("crypt_method", 32),
            HeaderField::L1Size => ("l1_size", 36),
            HeaderField::L1TableOffset => ("l1_table_offset", 40),
            HeaderField::RefcountTableOffset => ("refcount_table_offset", 48),
            HeaderField::RefcountTableClusters => ("refcount_table_clusters", 56),
            HeaderField::NbSnapshots => ("nb_snapshots", 60),
            HeaderField::SnapshotsOffset => ("snapshots_offset", 64),
            HeaderField::IncompatibleFeatures => ("incompatible_features", 72),
            HeaderField::CompatibleFeatures => ("compatible_features", 80),
            HeaderField::AutoclearFeatures => ("autoclear_features", 88),
            HeaderField::RefcountOrder => ("refcount_order", 96),
            HeaderField::HeaderLength => ("header_length", 100),
            HeaderField::CompressionType => ("compression_type", 104),
        }
    }

    /// The field's name as the spec writes it.
    pub(crate) const fn name(self) -> &'static str {
        self.entry().0
    }

    /// The field's byte offset in the header.
    pub(crate) const fn offset(self) -> u64 {
        self.entry().1
    }
}

/// An invalid-header error naming `field` and its byte offset.
pub(super) fn hbad(field: HeaderField, msg: String) -> Error {
    bad(field.name(), msg).with_offset(field.offset())
}

/// Names of the known incompatible bits, for messages.
fn known_incompat_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        0 => "dirty bit",
        1 => "corrupt bit",
        2 => "external data file",
        3 => "compression type",
        4 => "extended L2 entries",
        _ => return None,
    })
}

/// Reads `cluster_bits` from the first bytes of a file, so the caller knows
/// how much of cluster 0 to read. Validates magic, version and the range.
pub(crate) fn peek_cluster_bits(first: &[u8]) -> Result<u32> {
    if first.len() < V2_HEADER_LEN as usize {
        return Err(Error::invalid(format!("file is too short for a qcow2 header ({} bytes)", first.len()))
            .with_format("qcow2"));
    }
    let magic = BigEndian::read_u32(&first[0..4]);
    if magic != MAGIC {
        return Err(hbad(HeaderField::Magic, format!("bad magic {magic:#010x}, expected {MAGIC:#010x}")));
    }
    let version = BigEndian::read_u32(&first[4..8]);
    if version != 2 && version != 3 {
        return Err(Error::unsupported(format!("unsupported qcow2 version {version}"))
            .with_format("qcow2")
            .with_field(HeaderField::Version.name())
            .with_offset(HeaderField::Version.offset()));
    }
    let cluster_bits = BigEndian::read_u32(&first[20..24]);
    if !(QCOW2_MIN_CLUSTER_BITS..=QCOW2_MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(hbad(
            HeaderField::ClusterBits,
            format!(
                "cluster_bits {cluster_bits} is outside {QCOW2_MIN_CLUSTER_BITS}..={QCOW2_MAX_CLUSTER_BITS} (cluster sizes 512 B to 2 MiB)"
            ),
        ));
    }
    Ok(cluster_bits)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether extended L2 entries are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// L1 entries needed to map `size` bytes with this geometry.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l1 = self.cluster_size() * self.l2_entries();
        size.div_ceil(per_l1)
    }

    /// Parses and validates cluster 0 (`buf` holds the whole first cluster,
    /// zero-filled past the end of the file).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let cluster_bits = peek_cluster_bits(buf)?;
        let cluster_size = 1u64 << cluster_bits;
        if (buf.len() as u64) < cluster_size {
            return Err(Error::internal("header buffer shorter than a cluster"));
        }
        let be32 = |o: usize| BigEndian::read_u32(&buf[o..o + 4]);
        let be64 = |o: usize| BigEndian::read_u64(&buf[o..o + 8]);
        let version = be32(4);
        let mut h = Header {
            version,
            backing_file_offset: be64(8),
            backing_file_size: be32(16),
            cluster_bits,
            size: be64(24),
            crypt_method: be32(32),
            l1_size: be32(36),
            l1_table_offset: be64(40),
            refcount_table_offset: be64(48),
            refcount_table_clusters: be32(56),
            nb_snapshots: be32(60),
            snapshots_offset: be64(64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            unknown_header_fields: Vec::new(),
            backing_format: None,
            feature_names: Vec::new(),
            data_file: None,
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            h.incompatible_features = be64(72);
            h.compatible_features = be64(80);
            h.autoclear_features = be64(88);
            h.refcount_order = be32(96);
            h.header_length = be32(100);
            if h.header_length < V3_HEADER_LEN {
                return Err(hbad(HeaderField::HeaderLength, format!("header_length {} is below 104", h.header_length)));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(hbad(
                    HeaderField::HeaderLength,
                    format!("header_length {} is not a multiple of 8", h.header_length),
                ));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(hbad(
                    HeaderField::HeaderLength,
                    format!("header_length {} is larger than the cluster size {cluster_size}", h.header_length),
                ));
            }
            if h.header_length > V3_HEADER_LEN {
                h.compression_type = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(hbad(HeaderField::CompressionType, format!("unknown compression type {other}")));
                    }
                };
            }
            if h.header_length > V3_HEADER_LEN_COMPRESSION {
                h.unknown_header_fields = buf[V3_HEADER_LEN_COMPRESSION as usize..h.header_length as usize].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(hbad(
                HeaderField::RefcountOrder,
                format!("refcount_order {} is above 6 (64-bit refcounts)", h.refcount_order),
            ));
        }
        h.parse_extensions(buf)?;
        h.validate()?;
        // Backing file name.
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset as usize;
            let len = h.backing_file_size as usize;
            let name = &buf[off..off + len];
            let name = std::str::from_utf8(name)
                .map_err(|_| hbad(HeaderField::BackingFileOffset, "backing file name is not valid UTF-8".into()))?;
            if name.is_empty() {
                // qemu treats an empty name as no backing file.
            } else {
                if name.contains('\0') {
                    return Err(hbad(HeaderField::BackingFileOffset, "backing file name contains a NUL byte".into()));
                }
                h.backing_file = Some(name.to_string());
            }
        }
        Ok(h)
    }

    fn validate(&self) -> Result<()> {
        let cs = self.cluster_size();
        if self.version == 2 {
            // v2 has no feature fields; nothing else to check here.
        }
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let mut names = Vec::new();
            for bit in 0..64u32 {
                if unknown & (1 << bit) != 0 {
                    let n = self
                        .feature_names
                        .iter()
                        .find(|f| f.kind == 0 && u32::from(f.bit) == bit)
                        .map(|f| f.name.clone())
                        .unwrap_or_else(|| format!("unknown incompatible feature {bit}"));
                    names.push(n);
                }
            }
            return Err(Error::unsupported(format!("unsupported qcow2 feature(s): {}", names.join(", ")))
                .with_format("qcow2")
                .with_field(HeaderField::IncompatibleFeatures.name())
                .with_offset(HeaderField::IncompatibleFeatures.offset()));
        }
        let has_ct_bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (self.compression_type, has_ct_bit) {
            (CompressionType::Zlib, true) => {
                return Err(hbad(
                    HeaderField::CompressionType,
                    "compression type incompatible feature bit must not be set with zlib compression".into(),
                ))
            }
            (CompressionType::Zstd, false) => {
                return Err(hbad(
                    HeaderField::CompressionType,
                    "compression type incompatible feature bit must be set with zstd compression".into(),
                ))
            }
            _ => {}
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(hbad(
                HeaderField::ClusterBits,
                format!("extended L2 entries need clusters of at least 16 KiB, not {cs} bytes"),
            ));
        }
        if self.crypt_method > CRYPT_LUKS {
            return Err(hbad(HeaderField::CryptMethod, format!("unknown encryption method {}", self.crypt_method)));
        }
        if self.crypto_header.is_some() && self.crypt_method != CRYPT_LUKS {
            return Err(bad(
                "crypto_header",
                "encryption header extension is only expected with LUKS encryption".into(),
            ));
        }
        if self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
            && self.incompatible_features & INCOMPAT_DATA_FILE == 0
        {
            return Err(hbad(
                HeaderField::AutoclearFeatures,
                "data-file-raw is set without an external data file".into(),
            ));
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 && self.data_file.is_none() {
            return Err(bad("data_file", "the image needs an external data file but names none".into()));
        }
        // Backing file name: at most 1023 bytes and inside the first cluster.
        if self.backing_file_offset != 0 {
            let room = cs - self.backing_file_offset;
            let max = room.min(u64::from(QCOW2_MAX_BACKING_NAME));
            if u64::from(self.backing_file_size) > max {
                return Err(hbad(
                    HeaderField::BackingFileSize,
                    format!("backing file name of {} bytes is too long (at most {max} here)", self.backing_file_size),
                ));
            }
            if self.backing_file_offset < u64::from(self.header_length) {
                return Err(hbad(
                    HeaderField::BackingFileOffset,
                    format!("backing file name at {} overlaps the header", self.backing_file_offset),
                ));
            }
        }
        // Virtual size and the L1 table.
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(hbad(HeaderField::Size, format!("virtual size {} is too large", self.size)));
        }
        let needed = self.l1_entries_for(self.size);
        if needed > i32::MAX as u64 || needed > QCOW2_MAX_L1_BYTES / 8 {
            return Err(hbad(
                HeaderField::Size,
                format!("image of {} bytes is too big for this cluster size", self.size),
            ));
        }
        if u64::from(self.l1_size) > QCOW2_MAX_L1_BYTES / 8 {
            return Err(hbad(HeaderField::L1Size, format!("active L1 table of {} entries is too large", self.l1_size)));
        }
        if u64::from(self.l1_size) < needed {
            return Err(hbad(
                HeaderField::L1Size,
                format!("L1 table of {} entries is too small for {} bytes (needs {needed})", self.l1_size, self.size),
            ));
        }
        if self.l1_size > 0 {
            check_header_table(HeaderField::L1TableOffset, self.l1_table_offset, u64::from(self.l1_size) * 8, cs)?;
        }
        // Refcount table.
        if self.refcount_table_clusters == 0 {
            return Err(hbad(
                HeaderField::RefcountTableClusters,
                "image does not contain a reference count table".into(),
            ));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > QCOW2_MAX_REFTABLE_BYTES {
            return Err(hbad(
                HeaderField::RefcountTableClusters,
                format!("reference count table of {} clusters is too large", self.refcount_table_clusters),
            ));
        }
        check_header_table(HeaderField::RefcountTableOffset, self.refcount_table_offset, rt_bytes, cs)?;
        // Snapshots.
        if self.nb_snapshots > QCOW2_MAX_SNAPSHOTS {
            return Err(hbad(
                HeaderField::NbSnapshots,
                format!("{} snapshots is more than {QCOW2_MAX_SNAPSHOTS}", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 {
            check_header_table(HeaderField::SnapshotsOffset, self.snapshots_offset, 1, cs)?;
        }
        // Tables must not overlap the header cluster.
        for (field, off, len) in [
            (HeaderField::L1TableOffset, self.l1_table_offset, u64::from(self.l1_size) * 8),
            (HeaderField::RefcountTableOffset, self.refcount_table_offset, rt_bytes),
            (HeaderField::SnapshotsOffset, self.snapshots_offset, u64::from(self.nb_snapshots.min(1))),
        ] {
            if len > 0 && off < cs {
                return Err(hbad(field, format!("table at {off:#x} overlaps the header cluster")));
            }
        }
        // The active L1 table and the refcount table must not overlap.
        if self.l1_size > 0 {
            let l1_end = self.l1_table_offset + u64::from(self.l1_size) * 8;
            let rt_end = self.refcount_table_offset + rt_bytes;
            if self.l1_table_offset < rt_end && self.refcount_table_offset < l1_end {
                return Err(hbad(HeaderField::L1TableOffset, "the L1 table overlaps the refcount table".into()));
            }
        }
        Ok(())
    }

    /// Encodes the header, its extensions and the backing file name into
    /// the bytes of cluster 0 (without padding to the cluster size).
    /// Updates `header_length`, `backing_file_offset` and `backing_file_size`
    /// to match what was written. Fails if it does not fit in one cluster.
    pub fn encode(&mut self) -> Result<Vec<u8>> {
        match self.encode_with(false) {
            // The feature name table is optional: QEMU leaves it out when
            // it does not fit (small clusters with a backing file name).
            Err(e) if e.kind() == ErrorKind::LimitExceeded && !self.feature_names.is_empty() => self.encode_with(true),
            other => other,
        }
    }

    fn encode_with(&mut self, skip_feature_table: bool) -> Result<Vec<u8>> {
        let mut b = vec![0u8; if self.version == 2 { 72 } else { 112 + self.unknown_header_fields.len() }];
        if self.version == 3 {
            self.header_length = b.len() as u32;
            if self.compression_type == CompressionType::Zstd {
                self.incompatible_features |= INCOMPAT_COMPRESSION;
            } else {
                self.incompatible_features &= !INCOMPAT_COMPRESSION;
            }
        } else {
            self.header_length = V2_HEADER_LEN;
        }
        let put32 = |b: &mut [u8], o: usize, v: u32| BigEndian::write_u32(&mut b[o..o + 4], v);
        let put64 = |b: &mut [u8], o: usize, v: u64| BigEndian::write_u64(&mut b[o..o + 8], v);
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            b[104] = match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            };
            b[112..].copy_from_slice(&self.unknown_header_fields);
        }
        self.encode_extensions(&mut b, skip_feature_table);
        match &self.backing_file {
            Some(name) => {
                if name.len() as u32 > QCOW2_MAX_BACKING_NAME {
                    return Err(Error::invalid_argument(format!(
                        "backing file name of {} bytes is longer than {QCOW2_MAX_BACKING_NAME}",
                        name.len()
                    )));
                }
                self.backing_file_offset = b.len() as u64;
                self.backing_file_size = name.len() as u32;
                b.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        if b.len() as u64 > self.cluster_size() {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!(
                    "header and extensions ({} bytes) do not fit in one {}-byte cluster",
                    b.len(),
                    self.cluster_size()
                ),
            ));
        }
        Ok(b)
    }

    /// Names of the incompatible features set, for messages.
    pub fn incompatible_names(&self) -> Vec<&'static str> {
        (0..5).filter(|b| self.incompatible_features & (1 << b) != 0).filter_map(known_incompat_name).collect()
    }
}

/// Validates a table position the way `qcow2_validate_table` does: cluster
/// aligned and `offset + len` not overflowing a signed 64-bit file offset.
/// Errors name `field`; callers that know where the pointer is stored add
/// its offset ([`check_header_table`] for the header's own tables).
pub(crate) fn check_table(field: &'static str, offset: u64, len: u64, cluster_size: u64) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(bad(field, format!("table offset {offset:#x} is not aligned to the cluster size {cluster_size}")));
    }
    match offset.checked_add(len) {
        Some(end) if end <= QCOW2_MAX_HOST_OFFSET => Ok(()),
        _ => Err(bad(field, format!("table at {offset:#x} of {len} bytes ends beyond the largest file offset"))),
    }
}

/// [`check_table`] for a table the header points at: the error carries the
/// header field's offset too.
fn check_header_table(field: HeaderField, offset: u64, len: u64, cluster_size: u64) -> Result<()> {
    check_table(field.name(), offset, len, cluster_size).map_err(|e| e.with_offset(field.offset()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: CompressionType::Zlib,
            unknown_header_fields: Vec::new(),
            backing_format: Some("raw".into()),
            feature_names: Header::default_feature_names(),
            data_file: None,
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
            backing_file: Some("base.raw".into()),
        }
    }

    fn roundtrip(mut h: Header) -> Header {
        let enc = h.encode().unwrap();
        let mut buf = vec![0u8; h.cluster_size() as usize];
        buf[..enc.len()].copy_from_slice(&enc);
        let p = Header::parse(&buf).unwrap();
        assert_eq!(p, h);
        p
    }

    #[test]
    fn roundtrip_v3_and_v2() {
        roundtrip(sample());
        let mut h = sample();
        h.version = 2;
        h.header_length = 72;
        h.feature_names.clear();
        h.backing_format = None;
        roundtrip(h);
        let mut h = sample();
        h.compression_type = CompressionType::Zstd;
        h.incompatible_features = INCOMPAT_COMPRESSION;
        roundtrip(h);
    }

    #[test]
    fn refuses_unknown_incompatible_bits_by_name() {
        let mut h = sample();
        h.feature_names.push(FeatureName { kind: 0, bit: 9, name: "future thing".into() });
        h.incompatible_features = 1 << 9 | 1 << 10;
        let enc = h.encode().unwrap();
        let mut buf = vec![0u8; 65536];
        buf[..enc.len()].copy_from_slice(&enc);
        let e = Header::parse(&buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("future thing"), "{e}");
        assert!(e.to_string().contains("unknown incompatible feature 10"), "{e}");
    }

    /// Found by fuzzing (open_qcow2): a feature name with bytes that are not
    /// UTF-8 was decoded lossily (3-byte replacement characters), so the
    /// header vdisk wrote back carried a different, cut-off name.
    #[test]
    fn non_ascii_feature_names_survive_a_rewrite() {
        let mut h = sample();
        let enc = h.encode().unwrap();
        let mut buf = vec![0u8; h.cluster_size() as usize];
        buf[..enc.len()].copy_from_slice(&enc);
        let i = buf.windows(9).position(|w| w == b"dirty bit").unwrap();
        buf[i..i + 46].fill(0xff);
        let p = Header::parse(&buf).unwrap();
        assert_eq!(p.feature_names[0].name, "?".repeat(46));
        roundtrip(p);
    }

    #[test]
    fn l1_too_small() {
        let mut h = sample();
        h.l1_size = 1;
        let enc = h.encode().unwrap();
        let mut buf = vec![0u8; 65536];
        buf[..enc.len()].copy_from_slice(&enc);
        let e = Header::parse(&buf).unwrap_err();
        assert_eq!(e.field(), Some("l1_size"));
    }
}
