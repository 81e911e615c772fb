//! qcow2, QEMU's copy-on-write format (spec: QEMU `docs/interop/qcow2.txt`).
//!
//! Supported: versions 2 (compat 0.10) and 3 (compat 1.1); cluster sizes
//! 512 B to 2 MiB; refcount widths 1 to 64 bits; unallocated, zero (with and
//! without a preallocated host cluster) and compressed clusters (zlib and
//! zstd); extended L2 entries (subclusters); backing chains; external data
//! files; internal snapshots; persistent dirty bitmaps; legacy AES and
//! LUKS encryption; the dirty and corrupt bits; the migration handoff
//! (inactivate / activate).
//!
//! Refused: unknown incompatible feature bits (named from the image's
//! feature table), and encrypted images without their key (except to look
//! at metadata). An image with the corrupt bit opens read-only only.
//!
//! # Locking
//!
//! `map` (L1 table + L2 cache) is a read-write lock: lookups take it shared
//! for a few nanoseconds; inserting a table or changing the L1 table takes it
//! exclusively. L2 entries are atomics, stored only by a thread holding the
//! allocation lock (`alloc`), after the data they point at is written. Lock
//! order: `bitmaps` (persistent bitmap state) before `alloc` before `map`
//! before `header` before `snapshots` (the
//! snapshot table; `info` reads it under `header`); `reserved` (where the
//! header's tables lie, shared with the allocator) is a leaf: nothing else
//! is acquired while it is held. Data I/O never runs under `map`, `header`
//! or `reserved`.
//!
//! # Files
//!
//! `header` and `extension` (cluster 0), `table` (the u64 table codec, the
//! reserved ranges), `l2` (entries, tables) and `cache` (the L2 cache),
//! `refcount` (refcount table and blocks) and `alloc` (the allocator, the
//! state behind the allocation lock, `swap_table`), `cluster` (lookup),
//! `read`, `write` (allocating writes, copy-on-write), `compressed`, `zero`
//! (write_zeroes, discard, make_empty), `flush` (metadata order, frees,
//! close), `resize`, `snapshot/` (table, operations, view), `check`,
//! `check_walk` (its reference walk), `create`, `measure` (qemu-img measure), `rebase` (backing file changes),
//! `amend` (compat, lazy refcounts, refcount width, data file name),
//! `bitmap/` (persistent dirty bitmaps), `crypt` (how qcow2 uses the legacy
//! AES and LUKS ciphers), `handoff` (inactivate, activate, refresh).

mod alloc;
mod amend;
pub mod bitmap;
mod cache;
pub mod check;
mod check_walk;
mod cluster;
mod compressed;
pub mod create;
pub mod crypt;
mod extension;
mod flush;
mod handoff;
pub mod header;
pub(crate) mod l2;
pub mod measure;
mod read;
mod rebase;
pub(crate) mod refcount;
mod resize;
pub(crate) mod snapshot;
mod table;
mod write;
mod zero;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::codec::ClusterCache;
use crate::crypto::Secret;
use crate::device::{check_request, BlockDevice, DeviceInfo, Extent, ExtentKind, Format, FormatDetails, Qcow2Details};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::*;
use crate::quiesce::Quiesce;
use crate::storage::Storage;
use alloc::AllocState;
use cache::L2Cache;

use l2::{Geometry, Mapping};
pub use snapshot::Snapshot;
use table::Reserved;

pub use check::{CheckReport, Repair};
pub use create::{CreateOptions, Preallocation};
pub use header::{CompressionType, Header};
pub use snapshot::SnapshotView;

/// How to open a qcow2 image.
#[derive(Debug, Clone, Default)]
pub struct Qcow2Options {
    /// Refuse writes.
    pub read_only: bool,
    /// L2 cache size in bytes (default: enough for the whole image, at most
    /// 32 MiB, like QEMU).
    pub l2_cache_bytes: Option<u64>,
    /// The opened backing image, if the image has one and the caller's
    /// policy opened it. When the image names a backing file and this is
    /// `None`, reads that would fall through to it fail.
    pub backing: Option<Arc<dyn BlockDevice>>,
    /// The opened external data file, for images that need one.
    pub data_file: Option<Arc<dyn Storage>>,
    /// The passphrase of an encrypted (legacy AES) image.
    pub key: Option<Secret>,
    /// Open an encrypted image without its key, for looking at metadata
    /// (`info`, `map`, snapshot lists): guest data reads then fail.
    pub inspect_only: bool,
    /// Start inactive, as the destination of a handoff (live migration)
    /// while another process still writes the image: nothing is written and
    /// guest I/O is refused until [`BlockDevice::activate`].
    pub inactive: bool,
}

/// State guarded by the `map` lock.
#[derive(Debug)]
struct MapState {
    /// Active L1 entries (native byte order).
    l1: Vec<u64>,
    /// The L2 table cache.
    l2: L2Cache,
}

/// An open qcow2 image.
#[derive(Debug)]
#[must_use = "call flush() to make writes durable"]
pub struct Qcow2 {
    /// The image file.
    file: Arc<dyn Storage>,
    /// Where guest data lives: the image file or the external data file.
    data: Arc<dyn Storage>,
    /// The backing image, if opened.
    backing: Option<Arc<dyn BlockDevice>>,
    /// The header names a backing file (kept with the header's field, so
    /// an allocating write need not take the header lock to ask).
    backing_named: AtomicBool,
    /// Decoding geometry (immutable).
    geo: Geometry,
    /// Compression type (immutable).
    /// The codec of compressed clusters (zstd may become zlib at a
    /// downgrade): 0 zlib, 1 zstd.
    compression: std::sync::atomic::AtomicU8,
    /// Header version (2 or 3, immutable).
    /// 2 or 3; 2 after a downgrade (`amend -o compat=0.10`).
    version: std::sync::atomic::AtomicU32,
    /// Writes refused.
    read_only: bool,
    /// Corruption was detected: writes refused from now on.
    corrupt: AtomicBool,
    /// The AES cipher of an encrypted image.
    crypt: Option<crypt::Cipher>,
    /// The image is encrypted but was opened without its key.
    key_missing: bool,
    /// Allocation state (refcounts, in-flight clusters); `None` read-only.
    alloc: Option<Mutex<AllocState>>,
    /// Data was overwritten in place since the last flush.
    data_unsynced: AtomicBool,
    /// Signalled when in-flight allocations complete.
    alloc_cv: Condvar,
    /// Host ranges of fixed metadata (header, L1, refcount table, snapshots),
    /// shared with the refcount structures' allocator.
    reserved: Arc<RwLock<Reserved>>,
    /// The current header (rewritten on metadata changes).
    header: Mutex<Header>,
    /// Guest-visible size.
    size: AtomicU64,
    /// L1 table and L2 cache.
    map: RwLock<MapState>,
    /// Snapshot table.
    snapshots: RwLock<Vec<Snapshot>>,
    /// Persistent dirty bitmaps.
    bitmaps: RwLock<bitmap::BitmapState>,
    /// Some bitmap exists: guest writes must be recorded.
    bitmaps_tracking: AtomicBool,
    /// Gate that delays reuse of freed clusters until in-flight I/O ends.
    gate: Quiesce,
    /// Recently decompressed clusters, by descriptor host offset.
    zcache: ClusterCache,
    /// Path of the image file, for messages.
    path: Option<PathBuf>,
    /// Active, inactivating or inactive (handed off; see `handoff`).
    activity: AtomicU8,
}

fn qerr(e: Error, path: Option<&Path>) -> Error {
    let e = e.with_format("qcow2");
    match path {
        Some(p) => e.with_path(p),
        None => e,
    }
}

impl Qcow2 {
    /// Reads and validates the header of the qcow2 image in `file`, without
    /// opening anything else. Callers use it to learn the backing file and
    /// data file names before deciding what to open.
    pub fn read_header(file: &dyn Storage) -> Result<Header> {
        let mut first = [0u8; 512];
        file.read_at(&mut first, 0).map_err(|e| qerr(e, file.path()))?;
        let len = file.len()?;
        if len < u64::from(header::V2_HEADER_LEN) {
            return Err(qerr(
                Error::invalid(format!("file of {len} bytes is too short for a qcow2 header")),
                file.path(),
            ));
        }
        let cluster_bits = header::peek_cluster_bits(&first).map_err(|e| qerr(e, file.path()))?;
        let mut c0 = vec![0u8; 1 << cluster_bits];
        file.read_at(&mut c0, 0)?;
        Header::parse(&c0).map_err(|e| qerr(e, file.path()))
    }

    /// Opens the qcow2 image in `file`.
    pub fn open(file: Arc<dyn Storage>, opts: Qcow2Options) -> Result<Qcow2> {
        let path = file.path().map(Path::to_path_buf);
        Self::open_inner(file, opts).map_err(|e| qerr(e, path.as_deref()))
    }

    fn open_inner(file: Arc<dyn Storage>, opts: Qcow2Options) -> Result<Qcow2> {
        let h = Self::read_header(&*file)?;
        let read_only = opts.read_only || file.is_read_only();
        let crypt = crypt::cipher_for(&h, &*file, &opts, read_only)?;
        if h.incompatible_features & header::INCOMPAT_CORRUPT != 0 && !read_only {
            return Err(Error::corrupt(
                "the image is marked corrupt: open it read-only, or repair it with check -r all",
            )
            .with_field("incompatible_features"));
        }
        let cs = h.cluster_size();
        let geo = Geometry {
            cluster_bits: h.cluster_bits,
            extended_l2: h.extended_l2(),
            data_file: h.incompatible_features & header::INCOMPAT_DATA_FILE != 0,
        };
        let data = match (&h.data_file, opts.data_file) {
            (Some(_), Some(d)) if geo.data_file => d,
            (Some(name), None) if geo.data_file => Arc::new(crate::storage::Unopened::new(format!(
                "the image keeps its data in the external file '{name}', which was not opened"
            ))),

            _ => file.clone(),
        };
        let handoff::Tables { l1, snapshots: snaps, reserved } = handoff::read_tables(&*file, &h)?;
        let cache_bytes = opts.l2_cache_bytes.unwrap_or_else(|| {
            let needed = h.size.div_ceil(cs) * h.l2_entry_size();
            needed.min(QCOW2_DEFAULT_L2_CACHE_BYTES)
        });
        let tables = (cache_bytes / cs).max(QCOW2_MIN_L2_CACHE_TABLES as u64) as usize;
        let path = file.path().map(Path::to_path_buf);
        // Fixed metadata the allocator must never hand out.
        let reserved = Arc::new(RwLock::new(reserved));
        let alloc = if read_only { None } else { Some(Mutex::new(handoff::load_alloc(&*file, &h, &reserved)?)) };
        let dirty = h.incompatible_features & header::INCOMPAT_DIRTY != 0;
        // Bitmaps: loaded (and then maintained) when the image is writable;
        // an extension without its autoclear bit was left by a program that
        // did not maintain it, and is dropped on the first write (QEMU does
        // the same; its clusters leak until check -r).
        let bitmap_dir = bitmap::read_directory(&*file, &h)?;
        let drop_stale_bitmaps =
            !read_only && h.bitmaps.is_some() && h.autoclear_features & header::AUTOCLEAR_BITMAPS == 0;
        let bitmaps = bitmap::BitmapState::open(&*file, bitmap_dir, h.size, cs, !read_only)?;
        let q = Qcow2 {
            data,
            backing: opts.backing,
            backing_named: AtomicBool::new(h.backing_file.is_some()),
            geo,
            compression: std::sync::atomic::AtomicU8::new(u8::from(h.compression_type == CompressionType::Zstd)),
            version: std::sync::atomic::AtomicU32::new(h.version),
            corrupt: AtomicBool::new(false),
            key_missing: h.crypt_method != 0 && crypt.is_none(),
            crypt,
            alloc,
            alloc_cv: Condvar::new(),
            data_unsynced: AtomicBool::new(false),
            reserved,
            read_only,
            size: AtomicU64::new(h.size),
            map: RwLock::new(MapState { l1, l2: L2Cache::new(tables) }),
            snapshots: RwLock::new(snaps),
            bitmaps_tracking: AtomicBool::new(!read_only && bitmaps.tracking()),
            bitmaps: RwLock::new(bitmaps),
            gate: Quiesce::new(),
            zcache: ClusterCache::new(),
            header: Mutex::new(h),
            path,
            file,
            activity: AtomicU8::new(if opts.inactive { handoff::INACTIVE } else { handoff::ACTIVE }),
        };
        if !read_only && !q.inactive() {
            if dirty {
                // Refcounts may be stale (lazy refcounts, crash): rebuild
                // them before anything is allocated.
                q.repair_dirty()?;
            }
            if drop_stale_bitmaps {
                let mut h = q.header.lock();
                h.bitmaps = None;
                q.write_header_locked(&mut h)?;
                drop(h);
                q.file.sync()?;
            }
        }
        Ok(q)
    }

    /// Whether guest data is encrypted.
    pub fn encrypted(&self) -> bool {
        self.crypt.is_some()
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.header.lock().clone()
    }

    /// The snapshot table.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.snapshots.read().clone()
    }

    /// The image file.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    fn err(&self, e: Error) -> Error {
        qerr(e, self.path.as_deref())
    }

    fn details(&self) -> Qcow2Details {
        let h = self.header.lock();
        let size = h.size;
        Qcow2Details {
            compat: if h.version == 2 { "0.10" } else { "1.1" },
            refcount_bits: h.refcount_bits(),
            compression_type: h.compression_type.name(),
            lazy_refcounts: h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
            extended_l2: h.extended_l2(),
            dirty: h.incompatible_features & header::INCOMPAT_DIRTY != 0,
            corrupt: h.incompatible_features & header::INCOMPAT_CORRUPT != 0,
            data_file: h.data_file.clone(),
            data_file_raw: h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW != 0,
            snapshots: self.snapshots.read().iter().map(|s| s.info(size)).collect(),
            bitmaps: self.bitmaps(),
            luks: (h.crypt_method == header::CRYPT_LUKS)
                .then(|| crypt::luks_header(&h, &*self.file).ok())
                .flatten()
                .map(|l| crate::luks::LuksDetails::of(&l, false)),
        }
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only || self.alloc.is_none() {
            return Err(self.err(Error::read_only("write")));
        }
        self.check_active()?;
        if self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            return Err(self.err(Error::new(
                ErrorKind::ReadOnly,
                "the image was found corrupt and is now read-only; repair it with check -r all",
            )));
        }
        Ok(())
    }

    pub(crate) fn geo_granule(&self) -> u64 {
        1 << self.geo.granule_bits()
    }

    pub(crate) fn has_backing(&self) -> bool {
        self.backing.is_some() || self.backing_named.load(Ordering::Acquire)
    }

    /// How compressed clusters are compressed.
    pub(crate) fn compression(&self) -> CompressionType {
        match self.compression.load(std::sync::atomic::Ordering::Acquire) {
            0 => CompressionType::Zlib,
            _ => CompressionType::Zstd,
        }
    }

    pub(crate) fn is_v3(&self) -> bool {
        self.version.load(std::sync::atomic::Ordering::Acquire) == 3
    }
}

impl BlockDevice for Qcow2 {
    fn info(&self) -> DeviceInfo {
        let h = self.header.lock();
        let mut info = DeviceInfo::new(Format::Qcow2, self.size(), self.read_only);
        info.cluster_size = Some(h.cluster_size());
        info.encrypted = h.crypt_method != 0;
        info.backing_file = h.backing_file.clone();
        info.backing_format = h.backing_format.clone();
        drop(h);
        info.path = self.path.clone();
        info.details = FormatDetails::Qcow2(self.details());
        info
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size())?;
        if self.key_missing {
            return Err(self.err(Error::new(
                ErrorKind::Crypto,
                "the image is encrypted and was opened without its passphrase: data cannot be read",
            )));
        }
        let _g = self.enter_active()?;
        self.read_mapped(buf, offset)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.size();
        check_request(offset, 0, size)?;
        let max = max_len.min(size - offset);
        if max == 0 {
            return Ok(Extent { offset, length: 0, kind: ExtentKind::Unallocated, depth: 0, encrypted: false });
        }
        let _g = self.enter_active()?;
        let (m, len) = self.lookup(offset, max)?;
        let encrypted = self.crypt.is_some();
        let kind = match m {
            Mapping::Data { host } => ExtentKind::Data { host_offset: Some(host) },
            Mapping::Zero { prealloc } => ExtentKind::Zero { host_offset: prealloc },
            Mapping::Compressed { host, .. } => ExtentKind::Compressed { host_offset: host },
            Mapping::Unallocated => {
                if let Some(b) = &self.backing {
                    let bsize = b.size();
                    if offset < bsize {
                        let e = b.map(offset, len.min(bsize - offset))?;
                        return Ok(Extent { depth: e.depth + 1, ..e });
                    }
                    // Past the backing image's end: reads as zeros.
                    return Ok(Extent { offset, length: len, kind: ExtentKind::Unallocated, depth: 1, encrypted });
                }
                ExtentKind::Unallocated
            }
        };
        Ok(Extent { offset, length: len, kind, depth: 0, encrypted })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at_impl(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: crate::device::ZeroMode) -> Result<()> {
        self.write_zeroes_impl(offset, len, mode)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_impl(offset, len)
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_compressed_impl(buf, offset)
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_with(new_size, false)
    }

    fn flush(&self) -> Result<()> {
        self.flush_impl()
    }

    fn make_clean(&self) -> Result<()> {
        self.close_impl()
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }

    fn inactivate(&self) -> Result<()> {
        self.inactivate_impl()
    }

    fn activate(&self) -> Result<()> {
        self.activate_impl()
    }

    fn is_inactive(&self) -> bool {
        self.inactive()
    }

    fn refresh(&self) -> Result<()> {
        self.refresh_impl()
    }
}

impl Drop for Qcow2 {
    /// Best effort [`Qcow2::close`] for an image opened read-write: a
    /// failure here cannot be reported (call `close` to see it).
    fn drop(&mut self) {
        if self.alloc.is_some() {
            let _ = self.close_impl();
        }
    }
}
