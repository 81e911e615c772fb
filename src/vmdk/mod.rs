//! VMDK, VMware's virtual disk format (spec: VMware "Virtual Disk Format
//! 1.1"; QEMU `block/vmdk.c` for what QEMU reads and writes).
//!
//! Supported, read and write: monolithicSparse, monolithicFlat,
//! twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized (both QEMU's
//! layout and VMware's footer layout; grains written once, whole), custom
//! descriptors mixing FLAT, SPARSE, ZERO and VMFS (read as flat) extents,
//! RDONLY extents (read), zeroed-grain entries, redundant grain
//! directories, and delta links (a child that names its parent with
//! `parentFileNameHint`).
//!
//! Refused by name: seSparse extents, COWD (vmfsSparse) extents, raw device
//! maps (VMFSRDM, VMFSRAW, vmfsRawDeviceMap createTypes), VMware-encrypted
//! disks, sparse headers with unknown flags or versions above 3.
//!
//! Unlike QEMU, RDONLY and ZERO extent lines are not dropped (ZERO reads
//! zeros, RDONLY reads and refuses writes), NOACCESS extents fail reads
//! with an error, and extent file names that leave the descriptor's
//! directory are refused unless [`VmdkOptions::allow_external_extents`].
//!
//! Open refuses what QEMU 10's `block/vmdk.c` refuses: a stand-alone
//! descriptor's createType must be written `createType="..."` and be one
//! of QEMU's six (`monolithicFlat`, `vmfs`, `vmfsSparse`, `seSparse`,
//! `twoGbMaxExtentSparse`, `twoGbMaxExtentFlat`, exact case) or `custom`;
//! a FLAT extent line needs its offset and no other type takes one (not
//! even 0); `parentFileNameHint` is quoted and at most 4095 bytes; a
//! sparse header's overHead must lie within the file, and a capacity of 0
//! with an embedded descriptor (which QEMU reads as a stand-alone
//! descriptor of other extents) is refused as unsupported. vdisk stays
//! more permissive than QEMU on purpose in three ways: createType
//! `custom`; descriptors without `CID` or `parentCID` (read as 0 and "no
//! parent"); and sparse files without an embedded descriptor (one is
//! synthesized). It is stricter in others (sparse header version 0,
//! unknown flags, unknown compressAlgorithm, grain sizes that are not a
//! power of two, directories outside the file are refused).
//!
//! Delta links: a write (the first of a session bumps the CID, as QEMU
//! does) is refused when the child's parentCID differs from its parent's
//! CID; reads go on and [`VmdkDetails::parent_cid_mismatch`] reports it.
//!
//! ```
//! use vdisk::{BlockDevice, Vmdk, VmdkCreateOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let opts = VmdkCreateOptions::parse("subformat=twoGbMaxExtentSparse,zeroed_grain=on")?;
//! let disk = Vmdk::create(&dir.path().join("disk.vmdk"), 3 << 30, &opts)?;
//! disk.write_at(b"across the 2 GiB extent boundary", (2 << 30) - 10)?;
//! disk.flush()?;
//! let mut buf = [0u8; 6];
//! disk.read_at(&mut buf, (2 << 30) - 10)?;
//! assert_eq!(&buf, b"across");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Locking
//!
//! Each sparse extent has its own allocation mutex and grain-table cache
//! (see `sparse.rs` for the lock order). The device adds the descriptor
//! mutex (`desc`), taken alone or under `cid_lock`. Data I/O to allocated
//! grains and flat extents takes no lock.

pub mod check;
pub mod create;
pub mod descriptor;
mod extent;
mod flat;
pub mod header;
pub mod sparse;
mod stream;
mod table;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::device::{
    check_request, BlockDevice, DeviceInfo, Extent, ExtentKind, Format, FormatDetails, VmdkDetails, VmdkExtentInfo,
    ZeroMode,
};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::VMDK_MAX_DESCRIPTOR;
use crate::storage::{FileStorage, Storage};

pub use check::VmdkCheckReport;
pub use create::{AdapterType, Subformat, VmdkCreateOptions};
pub use descriptor::{Access, Descriptor, ExtentLine, ExtentType, NO_PARENT_CID};
use extent::{file_name, read_embedded, synthesized, Backend, VExtent};
use header::{SparseHeader, HEADER_LEN, SPARSE_MAGIC};
use sparse::{Fallback, Mapping, SparseExtent};

/// Default grain table cache: 4096 tables (8 MiB, 128 GiB of 64 KiB grains).
const DEFAULT_GT_CACHE_TABLES: usize = 4096;

/// How to open a vmdk image.
#[derive(Debug, Clone, Default)]
pub struct VmdkOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// The opened parent (delta link), if the image names one and the
    /// caller's policy opened it. When the image names a parent and this is
    /// `None`, reads that fall through to it fail.
    pub parent: Option<Arc<dyn BlockDevice>>,
    /// Allow extent file names that are absolute or climb out of the
    /// descriptor's directory with `..`. Only for trusted images.
    pub allow_external_extents: bool,
    /// Grain tables kept in each sparse extent's cache (default 4096).
    pub gt_cache_tables: Option<usize>,
}

/// Opens an extent file: (resolved path, read-only) → storage.
pub type ExtentOpener<'a> = &'a dyn Fn(&Path, bool) -> Result<Arc<dyn Storage>>;

/// Where the descriptor is stored (for CID updates).
#[derive(Debug)]
enum DescLocation {
    /// Inside a sparse extent: (file, byte offset, area size).
    Embedded(Arc<dyn Storage>, u64, u64),
    /// A stand-alone text file.
    File(Arc<dyn Storage>),
}

/// An open vmdk image.
#[derive(Debug)]
#[must_use = "call flush() to make writes durable"]
pub struct Vmdk {
    path: Option<PathBuf>,
    desc: Mutex<Descriptor>,
    desc_loc: Option<DescLocation>,
    extents: Vec<VExtent>,
    size: u64,
    read_only: bool,
    parent: Option<Arc<dyn BlockDevice>>,
    /// The parent's CID, when the parent is an open vmdk.
    parent_actual_cid: Option<u32>,
    /// `parentFileNameHint` (immutable; kept out of the descriptor lock so
    /// the I/O paths take no device-wide lock).
    parent_hint: Option<String>,
    cid_updated: AtomicBool,
    cid_lock: Mutex<()>,
}

fn verr(e: Error, path: Option<&Path>) -> Error {
    let e = e.with_format("vmdk");
    match path {
        Some(p) => e.with_path(p),
        None => e,
    }
}

/// A content id different from `old` and from "no parent".
pub(crate) fn new_cid(old: u32) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(old);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    let mut v = h.finish() as u32;
    if v == old || v == NO_PARENT_CID {
        v = v.wrapping_add(1) & 0x7fff_ffff;
    }
    v
}

impl Vmdk {
    /// Reads the descriptor of the image in `file` (embedded in a sparse
    /// extent, or the file itself), without opening extents. Callers use it
    /// to learn the parent before opening.
    pub fn read_descriptor(file: &dyn Storage) -> Result<Descriptor> {
        Self::read_descriptor_inner(file).map_err(|e| verr(e, file.path()))
    }

    fn read_descriptor_inner(file: &dyn Storage) -> Result<Descriptor> {
        let flen = file.len()?;
        let mut first = [0u8; HEADER_LEN];
        file.read_at(&mut first, 0)?;
        let magic = u32::from_le_bytes([first[0], first[1], first[2], first[3]]);
        if magic == SPARSE_MAGIC {
            let h = SparseHeader::decode(&first)?;
            let d = match read_embedded(file, &h)?.0 {
                Some(d) => d,
                None => synthesized(&h, &file_name(file)),
            };
            d.check_parent_hint()?;
            return Ok(d);
        }
        if magic == header::COWD_MAGIC || magic == header::SESPARSE_MAGIC {
            sparse::check_magic(&first)?;
        }
        if flen > VMDK_MAX_DESCRIPTOR {
            return Err(Error::limit(format!(
                "descriptor file of {flen} bytes is larger than the {VMDK_MAX_DESCRIPTOR}-byte limit"
            )));
        }
        let mut buf = vec![0u8; flen as usize];
        file.read_at(&mut buf, 0)?;
        let d = Descriptor::parse(&buf)?;
        d.check_parent_hint()?;
        Ok(d)
    }

    /// Opens the image in `file`; extent files are opened from the
    /// descriptor's directory with [`FileStorage`].
    pub fn open(file: Arc<dyn Storage>, opts: VmdkOptions) -> Result<Vmdk> {
        let opener = |p: &Path, ro: bool| -> Result<Arc<dyn Storage>> { Ok(Arc::new(FileStorage::open(p, ro)?)) };
        Self::open_with(file, opts, &opener)
    }

    /// Opens the image in `file`, opening extent files with `opener` (which
    /// receives the resolved path and whether to open read-only).
    pub fn open_with(file: Arc<dyn Storage>, opts: VmdkOptions, opener: ExtentOpener<'_>) -> Result<Vmdk> {
        let path = file.path().map(Path::to_path_buf);
        Self::open_inner(file, opts, opener).map_err(|e| verr(e, path.as_deref()))
    }

    fn open_inner(file: Arc<dyn Storage>, opts: VmdkOptions, opener: ExtentOpener<'_>) -> Result<Vmdk> {
        let read_only = opts.read_only || file.is_read_only();
        let cache = opts.gt_cache_tables.unwrap_or(DEFAULT_GT_CACHE_TABLES);
        let path = file.path().map(Path::to_path_buf);
        let mut first = [0u8; HEADER_LEN];
        file.read_at(&mut first, 0)?;
        let magic = u32::from_le_bytes([first[0], first[1], first[2], first[3]]);
        let (desc, desc_loc, extents) = if magic == SPARSE_MAGIC {
            let h0 = SparseHeader::decode(&first)?;
            let (d, area) = read_embedded(&*file, &h0)?;
            let sp = SparseExtent::open(file.clone(), read_only, None, cache)?;
            let name = file_name(&*file);
            let d = d.unwrap_or_else(|| synthesized(&sp.header, &name));
            let ext_name = d.extents.first().and_then(|e| e.file.clone()).unwrap_or(name);
            let len = sp.len;
            let loc = area.map(|(o, s)| DescLocation::Embedded(file.clone(), o, s));
            let ext = VExtent {
                start: 0,
                len,
                access: Access::ReadWrite,
                kind: ExtentType::Sparse,
                file: ext_name,
                backend: Backend::Sparse(Box::new(sp)),
            };
            (d, loc, vec![ext])
        } else {
            let d = Self::read_descriptor_inner(&*file)?;
            let exts = extent::open_extents(&d, &*file, path.as_deref(), read_only, &opts, cache, opener)?;
            (d, Some(DescLocation::File(file.clone())), exts)
        };
        desc.check_parent_hint()?;
        if let Some(ct) = desc.create_type() {
            if ct.eq_ignore_ascii_case("vmfsRawDeviceMap") || ct.eq_ignore_ascii_case("vmfsPassthroughRawDeviceMap") {
                return Err(Error::unsupported(format!("createType '{ct}': raw device maps are not supported"))
                    .with_field("createType"));
            }
        }
        let size = extents.last().map_or(0, |e| e.start + e.len);
        let parent_actual_cid = opts.parent.as_ref().and_then(|p| match p.info().details {
            FormatDetails::Vmdk(v) => Some(v.cid),
            _ => None,
        });
        Ok(Vmdk {
            path,
            parent_hint: desc.parent_hint().map(str::to_string),
            desc: Mutex::new(desc),
            desc_loc,
            extents,
            size,
            read_only,
            parent: opts.parent,
            parent_actual_cid,
            cid_updated: AtomicBool::new(false),
            cid_lock: Mutex::new(()),
        })
    }

    /// A copy of the descriptor as it is now.
    pub fn descriptor(&self) -> Descriptor {
        self.desc.lock().clone()
    }

    /// Whether the child's parentCID differs from the open parent's CID.
    pub fn parent_cid_mismatch(&self) -> bool {
        match self.parent_actual_cid {
            Some(c) => c != self.desc.lock().parent_cid(),
            None => false,
        }
    }

    /// Host bytes allocated by every extent file.
    pub fn allocated_bytes(&self) -> Option<u64> {
        let mut total = 0u64;
        let mut any = false;
        for e in &self.extents {
            let v = match &e.backend {
                Backend::Sparse(s) => s.allocated_bytes(),
                Backend::Flat(f) => f.file.allocated_bytes(),
                _ => None,
            };
            if let Some(v) = v {
                total = total.saturating_add(v);
                any = true;
            }
        }
        any.then_some(total)
    }

    /// Grain size of the first sparse extent.
    pub fn grain_size(&self) -> Option<u64> {
        self.extents.iter().find_map(|e| match &e.backend {
            Backend::Sparse(s) => Some(s.grain_bytes()),
            _ => None,
        })
    }

    fn err(&self, e: Error) -> Error {
        verr(e, self.path.as_deref())
    }

    /// Index of the extent holding guest byte `off` (`off < size`).
    fn extent_at(&self, off: u64) -> usize {
        self.extents.partition_point(|e| e.start + e.len <= off).min(self.extents.len().saturating_sub(1))
    }

    /// Calls `f(extent, extent-relative offset, range in the request)` for
    /// each extent piece of `[off, off + len)`.
    fn for_pieces(
        &self,
        off: u64,
        len: u64,
        mut f: impl FnMut(&VExtent, u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let mut pos = 0u64;
        let mut i = self.extent_at(off);
        while pos < len {
            let e = self.extents.get(i).ok_or_else(|| Error::internal("request past the last extent"))?;
            let cur = off + pos;
            let rel = cur - e.start;
            let n = (e.len - rel).min(len - pos);
            f(e, rel, pos as usize..(pos + n) as usize)?;
            pos += n;
            i += 1;
        }
        Ok(())
    }

    /// Reads guest bytes of the parent (zeros past its end or without one).
    fn read_parent(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        match &self.parent {
            Some(p) => {
                let psize = p.size();
                let n = if guest >= psize { 0 } else { (psize - guest).min(buf.len() as u64) as usize };
                if n > 0 {
                    p.read_at(&mut buf[..n], guest)?;
                }
                buf[n..].fill(0);
                Ok(())
            }
            None => {
                if let Some(name) = &self.parent_hint {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("guest offset {guest:#x} falls through to the parent '{name}', which was not opened"),
                    )
                    .with_offset(guest));
                }
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn has_parent(&self) -> bool {
        self.parent.is_some() || self.parent_hint.is_some()
    }

    fn no_access(e: &VExtent) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!("extent '{}' (guest bytes {:#x}..{:#x}) is NOACCESS", e.file, e.start, e.start + e.len),
        )
        .with_offset(e.start)
    }

    fn check_extent_writable(e: &VExtent) -> Result<()> {
        match (e.access, &e.backend) {
            (Access::NoAccess, _) => Err(Self::no_access(e)),
            (Access::ReadOnly, _) => {
                Err(Error::read_only(&format!("write to RDONLY extent '{}' at guest {:#x}", e.file, e.start)))
            }
            (_, Backend::Zero) => Err(Error::unsupported(format!(
                "a ZERO extent (guest bytes {:#x}..{:#x}) cannot hold data",
                e.start,
                e.start + e.len
            ))),
            _ => Ok(()),
        }
    }

    /// First write of the session: check the parent's CID and give the
    /// image a new CID, as QEMU does.
    fn begin_write(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write"));
        }
        if self.cid_updated.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.cid_lock.lock();
        if self.cid_updated.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut d = self.desc.lock();
        if let Some(actual) = self.parent_actual_cid {
            if actual != d.parent_cid() {
                return Err(Error::invalid(format!(
                    "parent CID mismatch: this image's parentCID is {:08x} but its parent's CID is {actual:08x}; the parent changed after this delta link was made, so writes are refused",
                    d.parent_cid()
                ))
                .with_field("parentCID"));
            }
        }
        let mut nd = d.clone();
        nd.set_cid(new_cid(d.cid()));
        self.write_descriptor(&nd)?;
        *d = nd;
        self.cid_updated.store(true, Ordering::Release);
        Ok(())
    }

    fn write_descriptor(&self, d: &Descriptor) -> Result<()> {
        let text = d.encode();
        match &self.desc_loc {
            Some(DescLocation::Embedded(f, off, size)) => {
                if text.len() as u64 >= *size {
                    return Err(Error::limit(format!(
                        "the descriptor ({} bytes) no longer fits the embedded area of {size} bytes",
                        text.len()
                    )));
                }
                let mut b = vec![0u8; *size as usize];
                b[..text.len()].copy_from_slice(text.as_bytes());
                f.write_at(&b, *off)
            }
            Some(DescLocation::File(f)) => {
                f.write_at(text.as_bytes(), 0)?;
                f.set_len(text.len() as u64)
            }
            None => Ok(()),
        }
    }

    fn fallback<'a>(
        &self,
        e: &VExtent,
        read: &'a dyn Fn(&mut [u8], u64) -> Result<()>,
        has_parent: bool,
    ) -> Fallback<'a> {
        Fallback { read, has_parent, guest_base: e.start }
    }

    fn details(&self) -> VmdkDetails {
        let d = self.desc.lock();
        VmdkDetails {
            create_type: d.create_type().unwrap_or("").to_string(),
            cid: d.cid(),
            parent_cid: d.parent_cid(),
            parent_cid_mismatch: self.parent_actual_cid.is_some_and(|c| c != d.parent_cid()),
            extents: self
                .extents
                .iter()
                .map(|e| VmdkExtentInfo {
                    filename: e.file.clone(),
                    kind: e.kind.keyword().to_string(),
                    access: e.access.keyword().to_string(),
                    virtual_size: e.len,
                    cluster_size: match &e.backend {
                        Backend::Sparse(s) => Some(s.grain_bytes()),
                        _ => None,
                    },
                    compressed: match &e.backend {
                        Backend::Sparse(s) => s.header.compressed(),
                        _ => false,
                    },
                })
                .collect(),
        }
    }

    /// Checks every sparse extent's metadata (see [`VmdkCheckReport`]).
    pub fn check(&self) -> Result<VmdkCheckReport> {
        let mut r = VmdkCheckReport::default();
        for (i, e) in self.extents.iter().enumerate() {
            match &e.backend {
                Backend::Sparse(s) => check::check_sparse(s, i + 1, &e.file, e.len, &mut r).map_err(|e| self.err(e))?,
                Backend::Flat(f) => {
                    let flen = f.file.len()?;
                    if flen < f.offset.saturating_add(f.len) {
                        r.warn(format!(
                            "extent {} ('{}'): file of {flen} bytes is shorter than the extent's end at {} (the rest reads as zeros)",
                            i + 1,
                            e.file,
                            f.offset + f.len
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok(r)
    }

    /// Flushes and closes the image, reporting a failure that dropping it
    /// (which flushes too) could not.
    pub fn close(self) -> Result<()> {
        self.flush()
    }
}

impl BlockDevice for Vmdk {
    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new(Format::Vmdk, self.size, self.read_only);
        info.cluster_size = self.grain_size();
        info.path = self.path.clone();
        {
            let d = self.desc.lock();
            if let Some(h) = d.parent_hint() {
                info.backing_file = Some(h.to_string());
                info.backing_format = Some("vmdk".to_string());
            }
        }
        info.details = FormatDetails::Vmdk(self.details());
        info
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size)?;
        let read = |b: &mut [u8], g: u64| self.read_parent(b, g);
        let has_parent = self.has_parent();
        let len = buf.len() as u64;
        self.for_pieces(offset, len, |e, rel, r| {
            let chunk = &mut buf[r];
            match &e.backend {
                Backend::Sparse(s) => s.read(chunk, rel, &self.fallback(e, &read, has_parent)),
                Backend::Flat(f) => f.read(chunk, rel),
                Backend::Zero => {
                    chunk.fill(0);
                    Ok(())
                }
                Backend::NoAccess => Err(Self::no_access(e)),
            }
        })
        .map_err(|e| self.err(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.begin_write().map_err(|e| self.err(e))?;
        let read = |b: &mut [u8], g: u64| self.read_parent(b, g);
        let has_parent = self.has_parent();
        self.for_pieces(offset, buf.len() as u64, |e, rel, r| {
            Self::check_extent_writable(e)?;
            let chunk = &buf[r];
            match &e.backend {
                Backend::Sparse(s) => s.write(chunk, rel, &self.fallback(e, &read, has_parent)),
                Backend::Flat(f) => f.write(chunk, rel),
                _ => Err(Error::internal("write to an extent without storage")),
            }
        })
        .map_err(|e| self.err(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        check_request(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.begin_write().map_err(|e| self.err(e))?;
        let read = |b: &mut [u8], g: u64| self.read_parent(b, g);
        let has_parent = self.has_parent();
        self.for_pieces(offset, len, |e, rel, r| {
            let n = (r.end - r.start) as u64;
            if matches!(e.backend, Backend::Zero) && e.access != Access::NoAccess {
                return Ok(());
            }
            Self::check_extent_writable(e)?;
            match &e.backend {
                Backend::Sparse(s) => s.write_zeroes(rel, n, mode, &self.fallback(e, &read, has_parent)),
                Backend::Flat(f) => f.write_zeroes(rel, n, mode),
                _ => Err(Error::internal("zeroing an extent without storage")),
            }
        })
        .map_err(|e| self.err(e))
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_request(offset, 0, self.size)?;
        let max = max_len.min(self.size - offset);
        let mk = |length, kind, depth| Extent { offset, length, kind, depth, encrypted: false };
        if max == 0 {
            return Ok(mk(0, ExtentKind::Unallocated, 0));
        }
        let e = &self.extents[self.extent_at(offset)];
        let rel = offset - e.start;
        let max = max.min(e.len - rel);
        match &e.backend {
            Backend::Flat(f) => Ok(mk(max, ExtentKind::Data { host_offset: Some(f.host(rel)) }, 0)),
            Backend::Zero => Ok(mk(max, ExtentKind::Zero { host_offset: None }, 0)),
            Backend::NoAccess => Ok(mk(max, ExtentKind::Data { host_offset: None }, 0)),
            Backend::Sparse(s) => {
                let (m, n) = s.lookup(rel, max).map_err(|e| self.err(e))?;
                let kind = match m {
                    Mapping::Data { host } => ExtentKind::Data { host_offset: Some(host) },
                    Mapping::Zero => ExtentKind::Zero { host_offset: None },
                    Mapping::Compressed { host } => ExtentKind::Compressed { host_offset: host },
                    Mapping::Unallocated => {
                        if let Some(p) = &self.parent {
                            let psize = p.size();
                            if offset < psize {
                                let pe = p.map(offset, n.min(psize - offset))?;
                                return Ok(Extent { depth: pe.depth + 1, ..pe });
                            }
                            return Ok(mk(n, ExtentKind::Unallocated, 1));
                        }
                        ExtentKind::Unallocated
                    }
                };
                Ok(mk(n, kind, 0))
            }
        }
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        for e in &self.extents {
            match &e.backend {
                Backend::Sparse(s) if !s.read_only => s.flush().map_err(|err| self.err(err))?,
                Backend::Flat(f) if e.access == Access::ReadWrite => f.file.sync()?,
                _ => {}
            }
        }
        if let Some(DescLocation::File(f)) = &self.desc_loc {
            if self.cid_updated.load(Ordering::Acquire) {
                f.sync()?;
            }
        }
        Ok(())
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let all_stream = {
            let mut ok = true;
            self.for_pieces(offset, buf.len() as u64, |e, _, _| {
                if !matches!(&e.backend, Backend::Sparse(s) if s.header.compressed()) {
                    ok = false;
                }
                Ok(())
            })?;
            ok
        };
        if !all_stream {
            return Err(
                self.err(Error::unsupported("compressed writes need a streamOptimized (compressed) vmdk extent"))
            );
        }
        self.write_at(buf, offset)
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.parent.as_deref()
    }
}

impl Drop for Vmdk {
    /// Best effort flush for an image opened read-write (call
    /// [`Vmdk::close`] to see a failure).
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.flush();
        }
    }
}
