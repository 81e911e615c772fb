//! Creating qcow2 images with the options `qemu-img create -f qcow2 -o ...`
//! takes, refusing the combinations QEMU refuses.

use std::sync::Arc;

use super::header::{self, CompressionType, Header};
use super::l2::{L2Entry, OFLAG_COPIED};
use super::refcount::set_entry;
use super::table;
use super::{Qcow2, Qcow2Options};
use crate::crypto::luks1::Luks1Params;
use crate::crypto::Secret;
use crate::device::{BlockDevice, Format, Resolver};
use crate::error::{Error, Result};
use crate::limits::*;
use crate::storage::Storage;

/// How much space to reserve at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing: clusters are allocated on first write.
    #[default]
    Off,
    /// L2 tables and data clusters allocated, the file extended sparsely.
    Metadata,
    /// As metadata, and the file's blocks reserved with `fallocate`.
    Falloc,
    /// As metadata, and zeros written over the whole file.
    Full,
}

impl Preallocation {
    /// qemu-img's name (`off`, `metadata`, `falloc`, `full`).
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }

    /// Parses qemu-img's names.
    pub fn from_name(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            other => Err(Error::invalid_argument(format!(
                "preallocation '{other}' is not one of off, metadata, falloc, full"
            ))),
        }
    }
}

/// Options of a new qcow2 image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512, as qemu-img does).
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// 2 (compat 0.10) or 3 (compat 1.1, the default).
    pub version: u32,
    /// Refcount width: 1, 2, 4, 8, 16 (default), 32 or 64 bits.
    pub refcount_bits: u32,
    /// Lazy refcounts (v3 only).
    pub lazy_refcounts: bool,
    /// Extended L2 entries (v3, clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// Compression type (zstd needs v3).
    pub compression_type: CompressionType,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name, as recorded in the image.
    pub backing_file: Option<String>,
    /// Backing file format (required with a backing file unless
    /// `allow_unknown_backing_format`).
    pub backing_format: Option<String>,
    /// Create an overlay whose backing format is not recorded.
    pub allow_unknown_backing_format: bool,
    /// External data file name.
    pub data_file: Option<String>,
    /// The external data file is valid raw (guest offset == file offset).
    pub data_file_raw: bool,
    /// Encryption with this passphrase: legacy AES, or LUKS when `luks`
    /// is set.
    pub encrypt: Option<Secret>,
    /// `encrypt.format=luks` with its `encrypt.*` parameters.
    pub luks: Option<Luks1Params>,
}

impl CreateOptions {
    /// qemu-img's defaults for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            allow_unknown_backing_format: false,
            data_file: None,
            data_file_raw: false,
            encrypt: None,
            luks: None,
        }
    }

    /// Applies one `-o key=value` option. Keys and values are qemu-img's.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bool_of = |v: &str| -> Result<bool> {
            match v {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(Error::invalid_argument(format!("option {key} takes on or off, not '{v}'"))),
            }
        };
        match key {
            "size" => self.size = crate::size::parse(value)?,
            "cluster_size" => self.cluster_size = crate::size::parse(value)?,
            "compat" => {
                self.version = match value {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    other => return Err(Error::invalid_argument(format!("compat '{other}' is not 0.10 or 1.1"))),
                }
            }
            "refcount_bits" => {
                self.refcount_bits = value
                    .parse()
                    .map_err(|_| Error::invalid_argument(format!("refcount_bits '{value}' is not a number")))?
            }
            "lazy_refcounts" => self.lazy_refcounts = bool_of(value)?,
            "extended_l2" => self.extended_l2 = bool_of(value)?,
            "compression_type" => {
                self.compression_type = match value {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    other => {
                        return Err(Error::invalid_argument(format!("compression_type '{other}' is not zlib or zstd")))
                    }
                }
            }
            "preallocation" => self.preallocation = Preallocation::from_name(value)?,
            "backing_file" => self.backing_file = Some(value.to_string()),
            "backing_fmt" => self.backing_format = Some(value.to_string()),
            "data_file" => self.data_file = Some(value.to_string()),
            "data_file_raw" => self.data_file_raw = bool_of(value)?,
            "encryption" => {
                if bool_of(value)? {
                    return Err(Error::invalid_argument(
                        "encryption=on is deprecated: use encrypt.format=aes with encrypt.key-secret",
                    ));
                }
            }
            "encrypt.format" => match value {
                // The key arrives separately (encrypt.key-secret).
                "aes" => self.luks = None,
                "luks" => {
                    self.luks.get_or_insert_with(Luks1Params::default);
                }
                _ => return Err(Error::unsupported(format!("encrypt.format={value} is not supported (aes, luks)"))),
            },
            k if k.starts_with("encrypt.") => {
                let p = self.luks.as_mut().ok_or_else(|| {
                    Error::invalid_argument(format!("option {k} needs encrypt.format=luks before it"))
                })?;
                if !p.set(&k["encrypt.".len()..], value)? {
                    return Err(Error::invalid_argument(format!("unknown qcow2 option '{k}'")));
                }
            }
            other => return Err(Error::invalid_argument(format!("unknown qcow2 option '{other}'"))),
        }
        Ok(())
    }

    /// Checks the combination the way qemu-img does.
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Error::invalid_argument(format!(
                "cluster size must be a power of two between 512 and 2M, not {cs}"
            )));
        }
        if !(self.version == 2 || self.version == 3) {
            return Err(Error::invalid_argument(format!("version {} is not 2 or 3", self.version)));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::invalid_argument(format!(
                "refcount width must be a power of two and may not exceed 64 bits, not {}",
                self.refcount_bits
            )));
        }
        if self.version == 2 {
            if self.refcount_bits != 16 {
                return Err(Error::invalid_argument(
                    "different refcount widths than 16 bits require compatibility level 1.1 or above",
                ));
            }
            if self.lazy_refcounts {
                return Err(Error::invalid_argument(
                    "lazy refcounts only supported with compatibility level 1.1 and above",
                ));
            }
            if self.extended_l2 {
                return Err(Error::invalid_argument(
                    "extended L2 tables are only supported with compatibility level 1.1 and above",
                ));
            }
            if self.compression_type != CompressionType::Zlib {
                return Err(Error::invalid_argument("compression_type requires compatibility level 1.1 or above"));
            }
            if self.data_file.is_some() {
                return Err(Error::invalid_argument("data-file requires compatibility level 1.1 or above"));
            }
        }
        if self.extended_l2 && cs < 16384 {
            return Err(Error::invalid_argument(
                "extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::invalid_argument("data_file_raw requires data_file"));
        }
        if self.backing_file.is_some() && self.data_file_raw {
            return Err(Error::invalid_argument("backing file and data_file_raw can not be used at the same time"));
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off && !self.extended_l2 {
            return Err(Error::invalid_argument(
                "backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if self.backing_file.is_some() && self.backing_format.is_none() && !self.allow_unknown_backing_format {
            return Err(Error::invalid_argument(
                "the backing file format must be given (backing_fmt), or allowed to stay unknown explicitly",
            ));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(Error::invalid_argument("backing_fmt needs backing_file"));
        }
        if let Some(f) = &self.backing_format {
            if f.len() as u32 > QCOW2_MAX_BACKING_FORMAT {
                return Err(Error::invalid_argument(format!("backing format '{f}' is too long")));
            }
        }
        if self.encrypt.is_some() && self.version == 2 && self.preallocation != Preallocation::Off {
            return Err(Error::invalid_argument("preallocation of an encrypted compat 0.10 image is not supported"));
        }
        if self.luks.is_some() && self.encrypt.is_none() {
            return Err(Error::invalid_argument("encrypt.format=luks needs a passphrase (encrypt.key-secret)"));
        }
        if self.encrypt.is_some() && self.data_file.is_some() {
            return Err(Error::invalid_argument("encryption and an external data file cannot be combined"));
        }
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid_argument(format!("image size {} is too large", self.size)));
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Creates a qcow2 image in `file` (which should be empty; it is
    /// truncated) and opens it read-write. `extra` carries the opened backing
    /// image and data file, if any.
    pub fn create(file: Arc<dyn Storage>, opts: &CreateOptions, mut extra: Qcow2Options) -> Result<Qcow2> {
        opts.validate()?;
        let size = opts.size.div_ceil(512) * 512;
        let cs = opts.cluster_size;
        let cluster_bits = cs.trailing_zeros();
        let mut h = Header {
            version: opts.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: match (&opts.encrypt, &opts.luks) {
                (Some(_), Some(_)) => header::CRYPT_LUKS,
                (Some(_), None) => header::CRYPT_AES,
                (None, _) => 0,
            },
            l1_size: 0,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: opts.refcount_bits.trailing_zeros(),
            header_length: if opts.version == 3 { header::V3_HEADER_LEN_COMPRESSION } else { header::V2_HEADER_LEN },
            compression_type: opts.compression_type,
            unknown_header_fields: Vec::new(),
            backing_format: opts.backing_format.clone(),
            feature_names: if opts.version == 3 { Header::default_feature_names() } else { Vec::new() },
            data_file: opts.data_file.clone(),
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: Vec::new(),
            backing_file: opts.backing_file.clone(),
        };
        if opts.extended_l2 {
            h.incompatible_features |= header::INCOMPAT_EXTL2;
        }
        if opts.data_file.is_some() {
            h.incompatible_features |= header::INCOMPAT_DATA_FILE;
            if opts.data_file_raw {
                h.autoclear_features |= header::AUTOCLEAR_DATA_FILE_RAW;
            }
        }
        if opts.lazy_refcounts {
            h.compatible_features |= header::COMPAT_LAZY_REFCOUNTS;
        }
        let l1_entries = h.l1_entries_for(size);
        if l1_entries > QCOW2_MAX_L1_BYTES / 8 {
            return Err(Error::invalid_argument(format!(
                "image of {size} bytes needs an L1 table larger than 32 MiB with {cs}-byte clusters"
            )));
        }
        h.l1_size = l1_entries as u32;
        let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
        // LUKS: the header area follows the L1 table.
        let luks = match (&opts.luks, &opts.encrypt) {
            (Some(p), Some(key)) => {
                let p = Luks1Params { detached: false, ..p.clone() };
                let (lh, _mk, (off, mat)) = crate::crypto::luks1::create(&p, key)?;
                let len = lh.payload_bytes();
                let at = (3 + l1_clusters) * cs;
                h.crypto_header = Some((at, len));
                Some((at, len, lh.encode(), off, mat))
            }
            _ => None,
        };
        let luks_clusters = luks.as_ref().map_or(0, |l| l.1.div_ceil(cs));
        let hbytes = h.encode()?;
        // Cluster 0 header, 1 refcount table, 2 refcount block, 3.. L1.
        file.set_len(0)?;
        let mut c0 = hbytes;
        c0.resize(cs as usize, 0);
        file.write_at(&c0, 0)?;
        let epb = (cs * 8) >> h.refcount_order;
        file.write_at(&table::encode([2 * cs], cs as usize), cs)?;
        let mut block = vec![0u8; cs as usize];
        let first_clusters = (3 + l1_clusters + luks_clusters).min(epb);
        for c in 0..first_clusters {
            set_entry(&mut block, h.refcount_order, c as usize, 1);
        }
        file.write_at(&block, 2 * cs)?;
        file.write_at(&vec![0u8; (l1_clusters * cs) as usize], 3 * cs)?;
        if let Some((at, _, hdr, off, mat)) = &luks {
            file.write_at(&vec![0u8; (luks_clusters * cs) as usize], *at)?;
            file.write_at(hdr, *at)?;
            file.write_at(mat, at + off)?;
        }
        file.sync()?;
        extra.read_only = false;
        if opts.encrypt.is_some() {
            extra.key = opts.encrypt.clone();
        }
        let q = Qcow2::open(file, extra)?;
        // L1 (and LUKS) clusters beyond the first refcount block's range.
        if 3 + l1_clusters + luks_clusters > epb {
            let mut a = q.alloc_lock()?;
            for c in epb..3 + l1_clusters + luks_clusters {
                q.mark_used(&mut a, c)?;
            }
            q.flush_meta(&mut a)?;
        }
        if opts.preallocation != Preallocation::Off {
            q.preallocate(opts.preallocation)?;
        }
        q.flush()?;
        Ok(q)
    }

    /// Allocates every L2 table and data cluster (`preallocation`).
    fn preallocate(&self, mode: Preallocation) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let l2e = geo.l2_entries();
        let clusters = self.size().div_ceil(cs);
        let backing = self.backing.is_some();
        let mut c = 0u64;
        let mut data_ranges = Vec::new();
        while c < clusters {
            let l1_index = c / l2e;
            let n = (l2e - c % l2e).min(clusters - c);
            let mut a = self.alloc_lock()?;
            let t = self.l2_for_write(&mut a, l1_index)?;
            let host = if geo.data_file { c * cs } else { self.alloc_clusters(&mut a, n)? };
            // Encrypted data would not read as zeros from holes: mark the
            // clusters zero (keeping their host space) instead.
            let enc = self.crypt.is_some();
            for k in 0..n {
                let bitmap = match (geo.extended_l2, backing, enc) {
                    (false, _, _) => 0,
                    (true, true, _) => 0,
                    (true, false, true) => 0xffff_ffff << 32,
                    (true, false, false) => 0xffff_ffff,
                };
                let zero = if enc && !geo.extended_l2 { super::l2::OFLAG_ZERO } else { 0 };
                t.set(&geo, ((c + k) % l2e) as usize, L2Entry { word: (host + k * cs) | OFLAG_COPIED | zero, bitmap });
            }
            data_ranges.push((host, n * cs));
            if self.map.read().l2.over_capacity() {
                self.flush_meta(&mut a)?;
            }
            drop(a);
            c += n;
        }
        {
            let mut a = self.alloc_lock()?;
            self.flush_meta(&mut a)?;
        }
        let data = &*self.data;
        let end = data_ranges.iter().map(|&(h, l)| h + l).max().unwrap_or(0);
        if data.len()? < end {
            data.set_len(end)?;
        }
        match mode {
            Preallocation::Falloc => {
                for &(h, l) in &data_ranges {
                    if let Err(e) = data.allocate(h, l) {
                        if e.kind() != crate::ErrorKind::Unsupported {
                            return Err(e);
                        }
                    }
                }
            }
            Preallocation::Full => {
                for &(h, l) in &data_ranges {
                    crate::storage::write_zeroes_slow(data, h, l)?;
                }
            }
            _ => {}
        }
        data.sync()
    }
}

impl Qcow2 {
    /// Creates a qcow2 image file at `path` (replacing any file there, as
    /// qemu-img does) and opens it read-write. An image that names a
    /// backing file or an external data file needs
    /// [`create_file_with`](Self::create_file_with): this one opens no other
    /// file and refuses them.
    pub fn create_file(path: &std::path::Path, opts: &CreateOptions) -> Result<Qcow2> {
        if opts.backing_file.is_some() || opts.data_file.is_some() {
            return Err(Error::invalid_argument(
                "an image with a backing file or data file is created with Qcow2::create_file_with (or OpenOptions::create_qcow2), which opens them under a policy",
            )
            .with_path(path));
        }
        Self::create_file_inner(path, opts, None)
    }

    /// [`create_file`](Self::create_file) for an image that names a
    /// backing file (opened read-only through `resolver`, with
    /// `opts.backing_format` or as the resolver decides; with a size of 0
    /// the backing image's size is used, and reads fall through to it) or
    /// an external data file (created through `resolver`). The format opens
    /// no file by path itself: [`crate::OpenOptions`] is the usual resolver.
    pub fn create_file_with(path: &std::path::Path, opts: &CreateOptions, resolver: &dyn Resolver) -> Result<Qcow2> {
        Self::create_file_inner(path, opts, Some(resolver))
    }

    fn create_file_inner(
        path: &std::path::Path,
        opts: &CreateOptions,
        resolver: Option<&dyn Resolver>,
    ) -> Result<Qcow2> {
        opts.validate()?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        let mut opts = opts.clone();
        let mut extra = Qcow2Options::default();
        let need = |what: &str| Error::internal(format!("no resolver for the {what}"));
        if let Some(b) = &opts.backing_file {
            let format = opts.backing_format.as_deref().map(Format::from_name).transpose()?;
            let backing = resolver.ok_or_else(|| need("backing file"))?.open_backing(dir, b, format)?;
            if opts.size == 0 {
                opts.size = backing.size();
            }
            extra.backing = Some(backing);
        }
        if let Some(d) = &opts.data_file {
            let ds = resolver.ok_or_else(|| need("data file"))?.create_data_file(dir, d)?;
            ds.set_len(opts.size.div_ceil(512) * 512)?;
            extra.data_file = Some(ds);
        }
        let file = crate::storage::FileStorage::create(path)?;
        Qcow2::create(Arc::new(file), &opts, extra).map_err(|e| e.with_path(path))
    }
}
