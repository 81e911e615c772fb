//! Hosted sparse extents (KDMV): grain directory, grain tables, lookup,
//! grain allocation and metadata write-back.
//!
//! # Concurrency
//!
//! The grain directories are arrays of atomics. Grain tables live in a
//! bounded cache (`cache`, a read-write lock held only for map operations,
//! never for I/O) as `Arc<GrainTable>` whose entries are atomics. Readers
//! look entries up without any other lock and do their data I/O lock-free.
//! Every change of a grain table or directory entry happens under the
//! allocation mutex (`alloc`), after the grain's data was written, so a
//! reader never sees a mapping before its data. Lock order: `alloc`, then
//! `cache`, then `zcache`.
//!
//! Tables are written back on flush (and when too many are dirty): data is
//! synced first, then grain tables (primary and redundant copies), sync,
//! then the changed grain directory sectors, sync. A crash therefore loses
//! at most unflushed writes and leaks their space; it never makes a table
//! point at unwritten data.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian};
use parking_lot::{Mutex, RwLock};

use super::header::*;
use super::table::{GrainTable, TableCache};
use crate::codec::{self, ClusterCache, Codec};
use crate::device::ZeroMode;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

use crate::limits::VMDK_MAX_COMPRESSED_GRAIN_BYTES as MAX_COMPRESSED_GRAIN_BYTES;

/// What one grain of a sparse extent maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated: the parent's data, or zeros.
    Unallocated,
    /// A zeroed grain (GTE 1 with the zeroed-grain flag).
    Zero,
    /// Plain data at this byte offset of the extent file.
    Data {
        /// Host byte offset.
        host: u64,
    },
    /// A compressed grain whose marker (or data) starts at `host`.
    Compressed {
        /// Host byte offset of the grain marker.
        host: u64,
    },
}

/// Where unallocated grains read from, given by the device.
pub(crate) struct Fallback<'a> {
    /// Reads guest bytes of the parent (zeros without one).
    pub read: &'a dyn Fn(&mut [u8], u64) -> Result<()>,
    /// Whether a parent exists (unallocated grains may be non-zero).
    pub has_parent: bool,
    /// Guest offset of the extent's first byte.
    pub guest_base: u64,
}

/// Allocation state, guarded by the allocation mutex.
#[derive(Debug)]
pub(crate) struct AllocState {
    /// Byte offset where the next grain or table goes.
    pub next: u64,
    /// Grain directory entries changed since the last flush.
    pub dirty_gd: BTreeSet<u64>,
    /// Footer mode: something changed since the tail was last written.
    pub tail_dirty: bool,
}

/// An open hosted sparse extent.
#[derive(Debug)]
pub(crate) struct SparseExtent {
    /// The extent file.
    pub file: Arc<dyn Storage>,
    /// The effective header (the footer's copy when gdOffset is GD_AT_END).
    pub header: SparseHeader,
    /// Table geometry.
    pub geo: Geometry,
    /// The grain directory is described by a footer (stream layout).
    pub footer_mode: bool,
    /// Primary grain directory (sectors of grain tables).
    pub gd: Box<[AtomicU32]>,
    /// Redundant grain directory, when kept.
    pub rgd: Option<Box<[AtomicU32]>>,
    /// Grain table cache.
    pub cache: RwLock<TableCache>,
    /// Allocation state.
    pub alloc: Mutex<AllocState>,
    /// Logical file length (grows with allocations).
    pub file_len: AtomicU64,
    /// End of the fixed metadata (header, descriptor, directories): grains
    /// written in place must lie at or after it.
    pub meta_end: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Guest bytes this extent covers (≤ capacity).
    pub len: u64,
    /// Recently decompressed grains, by host offset.
    pub zcache: ClusterCache,
}

fn corrupt(msg: String, off: u64) -> Error {
    Error::corrupt(msg).with_offset(off)
}

fn read_dir(file: &dyn Storage, sector: u64, geo: &Geometry, what: &str, file_len: u64) -> Result<Box<[AtomicU32]>> {
    let bytes = geo.gd_bytes();
    let off = sector.checked_mul(SECTOR).ok_or_else(|| Error::invalid(format!("{what} offset {sector} overflows")))?;
    match off.checked_add(bytes) {
        Some(end) if end <= file_len && off >= SECTOR => {}
        _ => {
            return Err(Error::invalid(format!(
                "{what} at sector {sector} ({bytes} bytes) lies outside the file of {file_len} bytes"
            ))
            .with_offset(off))
        }
    }
    // bytes ≤ VMDK_MAX_GD_BYTES (header validation) and ≤ the file length.
    let mut buf = vec![0u8; usize::try_from(bytes).map_err(|_| Error::limit("grain directory too large"))?];
    file.read_at(&mut buf, off).map_err(|e| e.context(format!("reading the {what}")))?;
    Ok(buf.chunks_exact(4).map(|c| AtomicU32::new(LittleEndian::read_u32(c))).collect())
}

/// Reads and checks the footer of a stream-layout extent: returns the
/// footer's header and the byte offset where the footer marker starts.
pub(crate) fn read_footer(file: &dyn Storage, file_len: u64) -> Result<(SparseHeader, u64)> {
    let end = file_len - file_len % SECTOR;
    let start = end.checked_sub(3 * SECTOR).filter(|&s| s >= SECTOR).ok_or_else(|| {
        Error::invalid(format!(
            "grain directory is at the end (GD_AT_END) but the file of {file_len} bytes is too short for a footer"
        ))
    })?;
    let mut b = [0u8; 1536];
    file.read_at(&mut b, start)?;
    let (_, msize, mtype) = decode_metadata_marker(&b[..16])?;
    let (eval, esize, etype) = decode_metadata_marker(&b[1024..1040])?;
    // The sanity checks of QEMU's vmdk_open_vmdk4 for a GD_AT_END header.
    if msize != 0 || mtype != MARKER_FOOTER {
        return Err(Error::invalid(format!(
            "invalid footer: the footer marker has size {msize} and type {mtype} (expected size 0, type {MARKER_FOOTER})"
        ))
        .with_field("footerMarker")
        .with_offset(start));
    }
    if eval != 0 || esize != 0 || etype != MARKER_EOS {
        return Err(Error::invalid(format!(
            "invalid footer: the end-of-stream marker has numSectors {eval}, size {esize} and type {etype} (expected 0, 0, {MARKER_EOS})"
        ))
        .with_field("endOfStreamMarker")
        .with_offset(start + 2 * SECTOR));
    }
    let h = SparseHeader::decode(&b[512..1024]).map_err(|e| e.context("footer"))?;
    if h.gd_offset == GD_AT_END {
        return Err(Error::invalid("the footer's grain directory offset is GD_AT_END too").with_field("gdOffset"));
    }
    Ok((h, start))
}

impl SparseExtent {
    /// Opens the sparse extent in `file`. `len` is the guest size the
    /// descriptor gives it (`None`: the header's capacity).
    pub(crate) fn open(
        file: Arc<dyn Storage>,
        read_only: bool,
        len: Option<u64>,
        cache_tables: usize,
    ) -> Result<SparseExtent> {
        let file_len = file.len()?;
        let mut first = [0u8; HEADER_LEN];
        if file_len < HEADER_LEN as u64 {
            return Err(Error::invalid(format!("file of {file_len} bytes is too short for a sparse extent header")));
        }
        file.read_at(&mut first, 0)?;
        check_magic(&first)?;
        let h0 = SparseHeader::decode(&first)?;
        if h0.capacity == 0 && h0.descriptor_offset != 0 {
            // QEMU (vmdk_open_vmdk4) then reads the embedded descriptor as a
            // stand-alone descriptor naming other extents.
            return Err(Error::unsupported(format!(
                "capacity 0 with an embedded descriptor at sector {}: a sparse header that only carries a descriptor of other extents is not supported",
                h0.descriptor_offset
            ))
            .with_field("capacity"));
        }
        let (header, footer_start) = if h0.gd_offset == GD_AT_END {
            let (h, start) = read_footer(&*file, file_len)?;
            (h, Some(start))
        } else {
            (h0, None)
        };
        header.validate()?;
        // QEMU (vmdk_open_vmdk4): "File truncated, expecting at least N bytes"
        // when the file has fewer sectors (rounded up) than overHead.
        let file_sectors = file_len.div_ceil(SECTOR);
        if header.overhead > file_sectors {
            let need = header.overhead.saturating_mul(SECTOR);
            return Err(Error::invalid(format!(
                "overHead of {} sectors ({need} bytes) lies past the end of the file of {file_len} bytes: the file is truncated",
                header.overhead
            ))
            .with_field("overHead")
            .with_offset(need));
        }
        let read_only = read_only || file.is_read_only();
        if !read_only {
            if header.version == 3 && !header.compressed() {
                return Err(Error::unsupported(
                    "version 3 sparse extents without compression (VMware change tracking) can only be opened read-only",
                )
                .with_field("version"));
            }
            if header.compressed() && !header.markers() {
                return Err(
                    Error::unsupported("compressed grains without markers can only be read").with_field("flags")
                );
            }
        }
        if header.compressed() && header.geometry().grain_bytes() > MAX_COMPRESSED_GRAIN_BYTES {
            return Err(Error::unsupported(format!(
                "compressed grains of {} bytes (vdisk decompresses grains of at most {MAX_COMPRESSED_GRAIN_BYTES} bytes)",
                header.geometry().grain_bytes()
            ))
            .with_field("grainSize"));
        }
        let geo = header.geometry();
        let meta_limit = footer_start.unwrap_or(file_len);
        let gd = read_dir(&*file, header.gd_offset, &geo, "grain directory", meta_limit)?;
        let rgd = if header.has_rgd() && footer_start.is_none() {
            if header.rgd_offset == 0 {
                return Err(
                    Error::invalid("redundant grain directory flag set but its offset is 0").with_field("rgdOffset")
                );
            }
            Some(read_dir(&*file, header.rgd_offset, &geo, "redundant grain directory", meta_limit)?)
        } else {
            None
        };
        let cap = geo.capacity_bytes();
        let len = match len {
            Some(l) if l > cap => {
                return Err(Error::invalid(format!(
                    "the descriptor gives the extent {l} bytes but its header's capacity is {cap} bytes"
                ))
                .with_field("capacity"))
            }
            Some(l) => l,
            None => cap,
        };
        let dir_end =
            |sector: u64| sector.saturating_mul(SECTOR).saturating_add(geo.gd_sectors().saturating_mul(SECTOR));
        let desc_end = header.descriptor_offset.saturating_add(header.descriptor_size).saturating_mul(SECTOR);
        let mut meta_end = SECTOR.max(desc_end);
        if footer_start.is_none() {
            meta_end = meta_end.max(dir_end(header.gd_offset));
            if rgd.is_some() {
                meta_end = meta_end.max(dir_end(header.rgd_offset));
            }
        }
        // Every layout puts its up-front metadata (including the grain
        // tables QEMU and VMware preallocate) below overHead.
        let overhead = header.overhead.saturating_mul(SECTOR);
        if overhead <= file_len {
            meta_end = meta_end.max(overhead);
        }
        let next = match footer_start {
            Some(s) => s,
            None => file_len.div_ceil(SECTOR).saturating_mul(SECTOR),
        };
        Ok(SparseExtent {
            file,
            header,
            geo,
            footer_mode: footer_start.is_some(),
            gd,
            rgd,
            cache: RwLock::new(TableCache::new(cache_tables)),
            alloc: Mutex::new(AllocState { next, dirty_gd: BTreeSet::new(), tail_dirty: false }),
            file_len: AtomicU64::new(file_len),
            meta_end,
            read_only,
            len,
            zcache: ClusterCache::new(),
        })
    }

    /// Grain size in bytes.
    pub(crate) fn grain_bytes(&self) -> u64 {
        self.geo.grain_bytes()
    }

    pub(crate) fn gd_entry(&self, gdi: u64) -> u32 {
        usize::try_from(gdi).ok().and_then(|i| self.gd.get(i)).map_or(0, |e| e.load(Ordering::Acquire))
    }

    fn rgd_entry(&self, gdi: u64) -> u32 {
        self.rgd
            .as_ref()
            .and_then(|r| usize::try_from(gdi).ok().and_then(|i| r.get(i)))
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// Checks a grain table location from the directory.
    fn gt_offset(&self, gdi: u64, sector: u32) -> Result<u64> {
        let off = u64::from(sector) * SECTOR;
        let end = off.saturating_add(self.geo.gt_bytes());
        let flen = self.file_len.load(Ordering::Acquire);
        if off < SECTOR || end > flen {
            return Err(corrupt(
                format!("grain table {gdi} at byte {off:#x} lies outside the file of {flen} bytes"),
                off,
            ));
        }
        Ok(off)
    }

    /// The grain table for directory entry `gdi`, loaded if needed;
    /// `None` when the directory entry is 0.
    pub(crate) fn table(&self, gdi: u64) -> Result<Option<Arc<GrainTable>>> {
        loop {
            let generation = {
                let c = self.cache.read();
                if let Some(t) = c.get(gdi) {
                    return Ok(Some(t.clone()));
                }
                c.generation
            };
            let sector = self.gd_entry(gdi);
            if sector == 0 {
                return Ok(None);
            }
            let off = self.gt_offset(gdi, sector)?;
            let mut buf = vec![0u8; usize::try_from(self.geo.gt_bytes()).unwrap_or(0)];
            self.file.read_at(&mut buf, off).map_err(|e| e.context(format!("reading grain table {gdi}")))?;
            let t = Arc::new(GrainTable::from_bytes(&buf));
            let mut c = self.cache.write();
            if c.generation == generation {
                return Ok(Some(c.insert(gdi, t)));
            }
        }
    }

    /// Decodes grain table entry `gte` of grain `grain` (index in the extent).
    pub(crate) fn decode(&self, gte: u32, grain: u64) -> Result<Mapping> {
        if gte == 0 {
            return Ok(Mapping::Unallocated);
        }
        if gte == GTE_ZEROED && self.header.zero_grain() {
            return Ok(Mapping::Zero);
        }
        let host = u64::from(gte) * SECTOR;
        let flen = self.file_len.load(Ordering::Acquire);
        if host >= flen {
            return Err(corrupt(
                format!(
                    "grain {grain} (extent byte {:#x}) points at byte {host:#x}, past the end of the file ({flen} bytes)",
                    grain.saturating_mul(self.grain_bytes())
                ),
                host,
            ));
        }
        Ok(if self.header.compressed() { Mapping::Compressed { host } } else { Mapping::Data { host } })
    }

    /// What extent byte `off` maps to and for how many bytes (at least 1,
    /// at most `max`, never past the extent or its grain table) the same
    /// kind of mapping continues contiguously. For `Data`, `host` is the
    /// host offset of `off` itself.
    pub(crate) fn lookup(&self, off: u64, max: u64) -> Result<(Mapping, u64)> {
        let gb = self.grain_bytes();
        let (gdi, gti) = self.geo.locate(off);
        let span = self.geo.gt_span();
        let table_end = gdi.saturating_add(1).saturating_mul(span);
        let limit = off.saturating_add(max).min(table_end).min(self.len);
        if limit <= off {
            return Err(Error::internal(format!("sparse lookup at {off:#x} past the extent")));
        }
        let Some(t) = self.table(gdi)? else {
            return Ok((Mapping::Unallocated, limit - off));
        };
        let grain0 = off / gb;
        let first = self.decode(t.get(gti), grain0)?;
        let grain_end = (grain0 + 1).saturating_mul(gb);
        if let Mapping::Compressed { .. } = first {
            return Ok((first, grain_end.min(limit) - off));
        }
        let mut end = grain_end;
        let mut i = gti + 1;
        let mut g = grain0 + 1;
        while end < limit {
            let m = self.decode(t.get(i), g)?;
            let same = match (first, m) {
                (Mapping::Data { host: h0 }, Mapping::Data { host }) => host == h0.saturating_add(end - grain0 * gb),
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            end = end.saturating_add(gb);
            i += 1;
            g += 1;
        }
        let m = match first {
            Mapping::Data { host } => Mapping::Data { host: host + off % gb },
            other => other,
        };
        Ok((m, end.min(limit) - off))
    }

    /// Reads extent bytes `[off, off + buf.len())`. Compressed grains are
    /// decompressed last, all together: a large read spreads them over the
    /// cores (see [`codec::decompress_units`]).
    pub(crate) fn read(&self, buf: &mut [u8], off: u64, fb: &Fallback<'_>) -> Result<()> {
        let total = buf.len();
        let mut rest = buf;
        let mut pos = 0usize;
        let gb = self.grain_bytes();
        // Whole compressed grains, read and waiting to be inflated (with
        // their marker offsets and grain numbers).
        let mut units = Vec::new();
        let mut grains = Vec::new();
        let mut unit_bytes = 0usize;
        while pos < total {
            let cur = off + pos as u64;
            let (m, n) = self.lookup(cur, (total - pos) as u64)?;
            let n = usize::try_from(n).unwrap_or(usize::MAX).min(total - pos);
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            match m {
                Mapping::Data { host } => self.file.read_at(chunk, host)?,
                Mapping::Zero => chunk.fill(0),
                Mapping::Unallocated => (fb.read)(chunk, fb.guest_base + cur)?,
                Mapping::Compressed { host } => {
                    let start = (cur % gb) as usize;
                    if start == 0 && n as u64 == gb {
                        // A whole grain: inflated straight into place below,
                        // with the others of this request.
                        units.push(codec::Unit { input: self.grain_input(host, cur / gb)?, out: chunk });
                        grains.push((host, cur / gb));
                        unit_bytes += n;
                    } else {
                        let grain = self.read_compressed(host, cur / gb)?;
                        let src = grain
                            .get(start..start + n)
                            .ok_or_else(|| Error::internal("compressed grain shorter than a grain"))?;
                        chunk.copy_from_slice(src);
                    }
                }
            }
            pos += n;
        }
        if units.is_empty() {
            return Ok(());
        }
        let decode = codec::Decode { codec: Codec::Zlib, stream: true, what: "grain" };
        for (r, (host, grain)) in codec::decompress_units(decode, units, unit_bytes).into_iter().zip(grains) {
            self.check_inflated(host, grain, r)?;
        }
        Ok(())
    }

    /// Reads and decompresses the grain whose marker starts at `host`.
    pub(crate) fn read_compressed(&self, host: u64, grain: u64) -> Result<Arc<[u8]>> {
        self.zcache.get_or_load(host, || self.decompress_grain(host, grain))
    }

    /// Reads and decompresses the grain whose marker starts at `host`,
    /// into a new buffer of one grain.
    fn decompress_grain(&self, host: u64, grain: u64) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.grain_bytes() as usize];
        self.decompress_grain_into(host, grain, &mut out)?;
        Ok(out)
    }

    /// Reads and decompresses the grain whose marker starts at `host` into
    /// `out` (one grain).
    fn decompress_grain_into(&self, host: u64, grain: u64, out: &mut [u8]) -> Result<()> {
        let input = self.grain_input(host, grain)?;
        self.check_inflated(host, grain, codec::decompress_stream(Codec::Zlib, &input, out, "grain"))
    }

    /// Reads the compressed bytes of the grain whose marker starts at
    /// `host`, checking the marker.
    fn grain_input(&self, host: u64, grain: u64) -> Result<Vec<u8>> {
        let gb = self.grain_bytes();
        let flen = self.file_len.load(Ordering::Acquire);
        let grain_start = grain.saturating_mul(gb);
        let (data_off, data_len) = if self.header.markers() {
            let mut mb = [0u8; GRAIN_MARKER_LEN as usize];
            self.file.read_at(&mut mb, host)?;
            let m = GrainMarker::decode(&mb)?;
            let size = u64::from(m.size);
            if size == 0 || size > 2 * gb {
                return Err(corrupt(
                    format!(
                        "grain marker at {host:#x} gives a compressed size of {size} bytes (must be 1 to {})",
                        2 * gb
                    ),
                    host,
                ));
            }
            let expect_lba = grain_start / SECTOR;
            if m.lba != expect_lba {
                return Err(corrupt(
                    format!(
                        "grain marker at {host:#x} is for sector {} but the grain table puts it at sector {expect_lba}",
                        m.lba
                    ),
                    host,
                ));
            }
            let d = host + GRAIN_MARKER_LEN;
            if d.saturating_add(size) > flen {
                return Err(corrupt(
                    format!("compressed grain at {host:#x} ({size} bytes) runs past the end of the file"),
                    host,
                ));
            }
            (d, size)
        } else {
            (host, (2 * gb).min(flen - host))
        };
        // data_len ≤ 2 grains ≤ 32 MiB (MAX_COMPRESSED_GRAIN_BYTES).
        let mut input = vec![0u8; data_len as usize];
        self.file.read_at(&mut input, data_off)?;
        Ok(input)
    }

    /// Turns the result of inflating grain `grain` (marker at `host`) into
    /// an error unless it produced the bytes the grain must hold.
    fn check_inflated(&self, host: u64, grain: u64, inflated: Result<usize>) -> Result<()> {
        let gb = self.grain_bytes();
        let valid = self.len.saturating_sub(grain.saturating_mul(gb)).min(gb);
        let produced = inflated.map_err(|e| e.with_offset(host))?;
        if (produced as u64) < valid {
            return Err(corrupt(
                format!("compressed grain at {host:#x} inflates to {produced} bytes, less than the {valid} bytes it must hold"),
                host,
            ));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write"));
        }
        Ok(())
    }

    /// Writes into an allocated grain range at `host`, refusing hosts inside
    /// the fixed metadata.
    fn write_in_place(&self, data: &[u8], host: u64) -> Result<()> {
        if host < self.meta_end {
            return Err(corrupt(
                format!(
                    "grain at host byte {host:#x} overlaps the extent's metadata (which ends at {:#x}); refusing to write",
                    self.meta_end
                ),
                host,
            ));
        }
        self.file.write_at(data, host)
    }

    /// Writes extent bytes `[off, off + buf.len())` (not compressed extents).
    pub(crate) fn write(&self, buf: &[u8], off: u64, fb: &Fallback<'_>) -> Result<()> {
        self.check_writable()?;
        if self.header.compressed() {
            return self.write_stream(buf, off, fb);
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let cur = off + pos as u64;
            let (m, n) = self.lookup(cur, (buf.len() - pos) as u64)?;
            match m {
                Mapping::Data { host } => {
                    let n = (n as usize).min(buf.len() - pos);
                    self.write_in_place(&buf[pos..pos + n], host)?;
                    pos += n;
                }
                _ => pos += self.write_alloc(&buf[pos..], cur, fb)?,
            }
        }
        Ok(())
    }

    /// Allocates and writes at least one grain at `off`; returns the bytes
    /// of `data` consumed.
    fn write_alloc(&self, data: &[u8], off: u64, fb: &Fallback<'_>) -> Result<usize> {
        let mut st = self.alloc.lock();
        let (m, n) = self.lookup(off, data.len() as u64)?;
        let n = (n as usize).min(data.len());
        let gb = self.grain_bytes();
        match m {
            Mapping::Data { host } => {
                self.write_in_place(&data[..n], host)?;
                return Ok(n);
            }
            Mapping::Compressed { .. } => return Err(Error::internal("compressed grain in an uncompressed extent")),
            Mapping::Unallocated | Mapping::Zero => {}
        }
        let grain0 = off / gb;
        let in_grain = off % gb;
        let host = st.next;
        let (count, used) = if in_grain == 0 && n as u64 >= gb {
            let k = n as u64 / gb;
            let used = (k * gb) as usize;
            self.file.write_at(&data[..used], host)?;
            (k, used)
        } else {
            let mut g = vec![0u8; gb as usize];
            let grain_start = grain0 * gb;
            let valid = self.len.saturating_sub(grain_start).min(gb) as usize;
            if m == Mapping::Unallocated && fb.has_parent {
                (fb.read)(&mut g[..valid], fb.guest_base + grain_start)?;
            }
            let w = (gb - in_grain).min(n as u64) as usize;
            g[in_grain as usize..in_grain as usize + w].copy_from_slice(&data[..w]);
            self.file.write_at(&g, host)?;
            (1, w)
        };
        st.next = host + count * gb;
        self.file_len.fetch_max(st.next, Ordering::AcqRel);
        let first_sector = host / SECTOR;
        for i in 0..count {
            let sector = u32::try_from(first_sector + i * self.geo.grain_size).map_err(|_| {
                Error::limit("the extent file would grow past 2 TiB, which grain table entries cannot address")
            })?;
            self.set_gte(&mut st, grain0 + i, sector)?;
        }
        Ok(used)
    }

    /// Stores grain table entry `value` for `grain` (allocating its table
    /// if needed). Caller holds the allocation lock.
    pub(crate) fn set_gte(&self, st: &mut AllocState, grain: u64, value: u32) -> Result<()> {
        let gdi = grain / self.geo.gtes_per_gt;
        let gti = grain % self.geo.gtes_per_gt;
        let t = match self.table(gdi)? {
            Some(t) => t,
            None => self.new_table(st, gdi)?,
        };
        let mut c = self.cache.write();
        let t = c.insert(gdi, t);
        t.set(gti, value);
        let over = c.tables.len() > c.capacity.saturating_mul(2);
        drop(c);
        if self.footer_mode {
            st.tail_dirty = true;
        }
        if over && !self.footer_mode {
            self.flush_locked(st)?;
        }
        Ok(())
    }

    /// Creates the grain table for directory entry `gdi` (which is 0).
    fn new_table(&self, st: &mut AllocState, gdi: u64) -> Result<Arc<GrainTable>> {
        let t = Arc::new(GrainTable::zeroed(self.geo.gtes_per_gt as usize));
        let t = self.cache.write().insert(gdi, t);
        if self.footer_mode {
            st.tail_dirty = true;
            return Ok(t);
        }
        let size = self.geo.gt_sectors() * SECTOR;
        let mut place = || -> Result<u32> {
            let at = st.next;
            st.next = at + size;
            self.file_len.fetch_max(st.next, Ordering::AcqRel);
            u32::try_from(at / SECTOR)
                .map_err(|_| Error::limit("grain table beyond the 2 TiB a directory entry can address"))
        };
        let primary = place()?;
        let redundant = if self.rgd.is_some() { Some(place()?) } else { None };
        let i = gdi as usize;
        if let Some(e) = self.gd.get(i) {
            e.store(primary, Ordering::Release);
        }
        if let (Some(r), Some(v)) = (&self.rgd, redundant) {
            if let Some(e) = r.get(i) {
                e.store(v, Ordering::Release);
            }
        }
        st.dirty_gd.insert(gdi);
        Ok(t)
    }

    /// Makes `[off, off + len)` read as zeros.
    pub(crate) fn write_zeroes(&self, off: u64, len: u64, mode: ZeroMode, fb: &Fallback<'_>) -> Result<()> {
        self.check_writable()?;
        let gb = self.grain_bytes();
        let end = off + len;
        let mut cur = off;
        while cur < end {
            let (m, n) = self.lookup(cur, end - cur)?;
            let already_zero = m == Mapping::Zero || (m == Mapping::Unallocated && !fb.has_parent);
            let grain_start = cur - cur % gb;
            let grain_end = (grain_start + gb).min(self.len);
            let whole = cur == grain_start && end >= grain_end;
            if already_zero && mode == ZeroMode::MayUnmap {
                cur += n;
                continue;
            }
            if whole && mode == ZeroMode::MayUnmap && self.header.zero_grain() {
                let mut st = self.alloc.lock();
                self.set_gte(&mut st, cur / gb, GTE_ZEROED)?;
                cur = grain_end;
                continue;
            }
            if self.header.compressed() {
                return Err(Error::unsupported(
                    "streamOptimized extents cannot zero a grain that is already written or comes from a parent",
                ));
            }
            let stop = if whole { grain_end } else { grain_end.min(end) };
            let step = (stop - cur).min(n).clamp(1, 1 << 20);
            let zeros = vec![0u8; step as usize];
            self.write(&zeros, cur, fb)?;
            cur += step;
        }
        Ok(())
    }

    /// Writes back dirty metadata in a safe order. Caller holds `alloc`.
    pub(crate) fn flush_locked(&self, st: &mut AllocState) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.footer_mode {
            return self.write_tail(st);
        }
        let dirty = self.cache.read().dirty();
        if dirty.is_empty() && st.dirty_gd.is_empty() {
            return self.file.sync();
        }
        // 1. The data the new entries point at.
        self.file.sync()?;
        // 2. Grain tables, both copies.
        let gts = self.geo.gt_sectors();
        for (gdi, t) in &dirty {
            let bytes = t.encode(gts);
            for sector in [self.gd_entry(*gdi), self.rgd_entry(*gdi)] {
                if sector != 0 {
                    let off = self.gt_offset(*gdi, sector)?;
                    // Whole sectors: tables are sector-addressed, so the
                    // padding belongs to the table.
                    self.file.write_at(&bytes, off)?;
                }
            }
        }
        self.file.sync()?;
        // 3. Changed grain directory sectors, both copies.
        let per_sector = SECTOR / 4;
        let sectors: BTreeSet<u64> = st.dirty_gd.iter().map(|g| g / per_sector).collect();
        for s in sectors {
            for (dir, base) in [(Some(&self.gd), self.header.gd_offset), (self.rgd.as_ref(), self.header.rgd_offset)] {
                let Some(dir) = dir else { continue };
                let first = (s * per_sector) as usize;
                let last = (first + per_sector as usize).min(dir.len());
                let mut b = vec![0u8; (last - first) * 4];
                for (c, e) in b.chunks_exact_mut(4).zip(dir.get(first..last).unwrap_or_default()) {
                    LittleEndian::write_u32(c, e.load(Ordering::Acquire));
                }
                self.file.write_at(&b, base * SECTOR + s * SECTOR)?;
            }
        }
        self.file.sync()?;
        for (_, t) in &dirty {
            t.set_clean();
        }
        st.dirty_gd.clear();
        self.cache.write().evict_clean();
        Ok(())
    }

    /// Flushes this extent.
    pub(crate) fn flush(&self) -> Result<()> {
        let mut st = self.alloc.lock();
        self.flush_locked(&mut st)
    }

    /// Host bytes allocated by the extent file.
    pub(crate) fn allocated_bytes(&self) -> Option<u64> {
        self.file.allocated_bytes()
    }
}

/// Refuses the extent formats vdisk knows by name but does not read.
pub(crate) fn check_magic(first: &[u8]) -> Result<()> {
    let magic = first.get(..4).map_or(0, LittleEndian::read_u32);
    match magic {
        SPARSE_MAGIC => Ok(()),
        COWD_MAGIC => Err(Error::unsupported("COWD (ESX vmfsSparse / VMDK3) extents are not supported")),
        SESPARSE_MAGIC => Err(Error::unsupported("seSparse extents (ESXi 6.5+, magic 0xcafebabe) are not supported")),
        other => {
            Err(Error::new(ErrorKind::InvalidImage, format!("bad sparse extent magic {other:#010x} (expected KDMV)"))
                .with_field("magicNumber"))
        }
    }
}
