//! Persistent dirty bitmaps (the qcow2 bitmaps extension; QEMU's
//! `docs/interop/qcow2.txt` "Bitmaps" and `block/qcow2-bitmap.c`).
//!
//! A bitmap records which guest ranges were written while it was enabled
//! (the `auto` flag on disk): the base of incremental backups. While the
//! image is open read-write its bitmaps live in memory (`DirtyBits`),
//! set by every guest write path from every thread at once; they reach the
//! disk when the image is closed (or made clean).
//!
//! # On disk, and what a crash leaves
//!
//! Before the first guest write of a session changes anything, every
//! bitmap stored on disk gets the `in_use` flag (a new copy of the
//! directory, switched to by one header write). A crash therefore leaves
//! the bitmaps `in_use`: inconsistent, which QEMU and vdisk report and
//! refuse to use until the bitmap is removed.
//!
//! Storing writes each bitmap's data clusters (only those with a bit set)
//! and table into new clusters, then a new directory, syncs the refcounts,
//! switches the header's extension to it in one write, and only then frees
//! the old directory and tables: a crash at any step leaves the old state or
//! the new one, and at worst leaked clusters.
//!
//! # Locking
//!
//! `bitmaps` (a read-write lock on `BitmapState`) comes before `alloc` in
//! the lock order. Writers take it shared to set bits; changing the list,
//! storing and resizing take it exclusively.

mod bits;
pub(crate) mod dir;

use std::sync::atomic::Ordering;

use byteorder::{BigEndian, ByteOrder};

use self::bits::DirtyBits;
use self::dir::{DirEntry, FLAG_AUTO, FLAG_IN_USE, TABLE_ALL_ONES, TABLE_OFFSET_MASK};
use super::header::{self, BitmapsExt, Header};
use super::Qcow2;
use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};
use crate::limits::*;
use crate::storage::Storage;

/// What `info` and the library tell about one persistent bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest disk one bit stands for.
    pub granularity: u64,
    /// Enabled: every write is recorded (the `auto` flag).
    pub enabled: bool,
    /// The `in_use` flag as the image file has it now.
    pub in_use: bool,
    /// Found `in_use` when the image was opened: its contents are unknown,
    /// it is not maintained, and only removal is allowed.
    pub inconsistent: bool,
}

impl BitmapInfo {
    /// The flags as `qemu-img info` names them (`in-use`, `auto`).
    pub fn flags(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.in_use {
            f.push("in-use");
        }
        if self.enabled {
            f.push("auto");
        }
        f
    }
}

/// A bitmap's dirty ranges taken out of an image, to merge into a bitmap of
/// another image ([`Qcow2::bitmap_merge_from`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRanges {
    /// Bytes one bit of the source stood for.
    pub granularity: u64,
    /// Dirty guest byte ranges `(offset, length)`, in order.
    pub ranges: Vec<(u64, u64)>,
}

/// One bitmap of an open image.
#[derive(Debug)]
pub(crate) struct Bitmap {
    name: String,
    /// The name's bytes as stored (see [`DirEntry::raw`]).
    raw: Vec<u8>,
    granularity_bits: u8,
    enabled: bool,
    inconsistent: bool,
    /// Its directory entry as on disk now (`None`: added in this session
    /// and not stored yet).
    disk: Option<DirEntry>,
    /// The bits (`None`: inconsistent, or not loaded in a read-only image).
    bits: Option<DirtyBits>,
}

/// The bitmaps of an open image.
#[derive(Debug, Default)]
pub(crate) struct BitmapState {
    list: Vec<Bitmap>,
    /// The list or some bits differ from the disk.
    changed: bool,
    /// The stored bitmaps carry this session's `in_use` flag.
    marked: bool,
    /// Directory entries of stored bitmaps removed in this session, whose
    /// clusters the next store frees (the directory on disk may no longer
    /// name them).
    removed: Vec<DirEntry>,
}

/// Most memory the bits loaded from one image may take (a hostile image
/// could mark every table entry "all ones").
const MAX_LOADED_BYTES: u64 = 1 << 30;

fn nbits(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1 << granularity_bits)
}

fn not_found(name: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("dirty bitmap '{name}' not found")).with_field("bitmap name")
}

fn inconsistent(name: &str) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("bitmap '{name}' is inconsistent (left in use by a program that did not close the image) and cannot be used: remove it"),
    )
    .with_field("bitmap flags")
}

/// Reads and validates the bitmap directory the header names (an empty
/// list when the extension is absent or not consistent).
pub(crate) fn read_directory(file: &dyn Storage, h: &Header) -> Result<Vec<DirEntry>> {
    let Some(ext) = h.bitmaps else { return Ok(Vec::new()) };
    if h.autoclear_features & header::AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    if ext.directory_size == 0 {
        return Err(Error::invalid("the bitmap directory size is zero").with_field("bitmaps extension"));
    }
    let len = file.len()?;
    if ext.directory_offset.checked_add(ext.directory_size).is_none_or(|e| e > len) {
        return Err(Error::invalid(format!(
            "the bitmap directory at {:#x} of {} bytes runs past the end of the file ({len} bytes)",
            ext.directory_offset, ext.directory_size
        ))
        .with_field("bitmaps extension")
        .with_offset(ext.directory_offset));
    }
    let mut d = vec![0u8; ext.directory_size as usize];
    file.read_at(&mut d, ext.directory_offset)?;
    dir::parse(&d, ext.nb_bitmaps, h.size, h.cluster_size())
}

/// Reads the bitmap table of `e`.
fn read_table(file: &dyn Storage, e: &DirEntry, cluster_size: u64) -> Result<Vec<u64>> {
    let bytes = u64::from(e.table_size) * 8;
    let len = file.len()?;
    if e.table_offset.checked_add(bytes).is_none_or(|end| end > len) {
        return Err(Error::invalid(format!(
            "the table of bitmap '{}' at {:#x} runs past the end of the file",
            e.name, e.table_offset
        ))
        .with_field("bitmap table")
        .with_offset(e.table_offset));
    }
    let mut b = vec![0u8; bytes as usize];
    file.read_at(&mut b, e.table_offset)?;
    let t: Vec<u64> = b.chunks_exact(8).map(BigEndian::read_u64).collect();
    for (i, &x) in t.iter().enumerate() {
        dir::check_table_entry(x, cluster_size)
            .map_err(|err| err.context(format!("entry {i} of the table of bitmap '{}'", e.name)))?;
    }
    Ok(t)
}

/// Checks that the table of `e` can be read and has valid entries.
pub(crate) fn check_table(file: &dyn Storage, e: &DirEntry, cluster_size: u64) -> Result<()> {
    read_table(file, e, cluster_size).map(|_| ())
}

/// Loads the bits of the consistent bitmap `e` for a disk of `size` bytes;
/// `budget` is the memory still allowed.
fn load_bits(file: &dyn Storage, e: &DirEntry, size: u64, cluster_size: u64, budget: &mut u64) -> Result<DirtyBits> {
    let n = nbits(size, e.granularity_bits);
    let want = dir::data_bytes(size, e.granularity_bits).div_ceil(cluster_size);
    if want != u64::from(e.table_size) {
        return Err(Error::invalid(format!(
            "bitmap '{}' has a table of {} entries where a disk of {size} bytes needs {want}",
            e.name, e.table_size
        ))
        .with_field("bitmap table"));
    }
    if DirtyBits::index_bytes(n) > *budget {
        return Err(Error::limit(format!(
            "the bitmaps of this image would take more than {MAX_LOADED_BYTES} bytes of memory"
        ))
        .with_field("bitmap table"));
    }
    let table = read_table(file, e, cluster_size)?;
    let bits = DirtyBits::new(n);
    let words_per_cluster = cluster_size / 8;
    let mut buf = vec![0u8; cluster_size as usize];
    for (i, &entry) in table.iter().enumerate() {
        let w0 = i as u64 * words_per_cluster;
        let off = entry & TABLE_OFFSET_MASK;
        if off == 0 && entry & TABLE_ALL_ONES == 0 {
            continue;
        }
        if off == 0 {
            bits.set_words(w0, w0 + words_per_cluster);
        } else {
            file.read_at(&mut buf, off).map_err(|err| err.context(format!("reading bitmap '{}'", e.name)))?;
            bits.deserialize_or(w0, &buf);
        }
        if bits.memory() > *budget {
            return Err(Error::limit(format!(
                "the bitmaps of this image would take more than {MAX_LOADED_BYTES} bytes of memory"
            ))
            .with_field("bitmap table"));
        }
    }
    *budget -= bits.memory();
    Ok(bits)
}

impl BitmapState {
    /// The bitmaps found in the directory `entries`; their bits are loaded
    /// when `load` (an image opened read-write maintains them).
    pub(crate) fn open(
        file: &dyn Storage,
        entries: Vec<DirEntry>,
        size: u64,
        cluster_size: u64,
        load: bool,
    ) -> Result<BitmapState> {
        let mut budget = MAX_LOADED_BYTES;
        let mut list = Vec::with_capacity(entries.len());
        for e in entries {
            let inconsistent = e.flags & FLAG_IN_USE != 0;
            let bits =
                if load && !inconsistent { Some(load_bits(file, &e, size, cluster_size, &mut budget)?) } else { None };
            list.push(Bitmap {
                name: e.name.clone(),
                raw: e.raw.clone(),
                granularity_bits: e.granularity_bits,
                enabled: e.flags & FLAG_AUTO != 0,
                inconsistent,
                disk: Some(e),
                bits,
            });
        }
        Ok(BitmapState { list, changed: false, marked: false, removed: Vec::new() })
    }

    /// Whether some bitmap must see every write.
    pub(crate) fn tracking(&self) -> bool {
        !self.list.is_empty()
    }

    fn find(&self, name: &str) -> Result<usize> {
        self.list.iter().position(|b| b.name == name).ok_or_else(|| not_found(name))
    }

    fn usable(&self, name: &str) -> Result<usize> {
        let i = self.find(name)?;
        if self.list[i].inconsistent {
            return Err(inconsistent(name));
        }
        Ok(i)
    }

    fn info(&self) -> Vec<BitmapInfo> {
        self.list
            .iter()
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: 1 << b.granularity_bits,
                enabled: b.enabled,
                in_use: b.disk.as_ref().is_some_and(|d| d.flags & FLAG_IN_USE != 0),
                inconsistent: b.inconsistent,
            })
            .collect()
    }
}

impl Qcow2 {
    /// The persistent bitmaps, in directory order.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.bitmaps.read().info()
    }

    /// Records a guest write of `[offset, offset + len)` in every enabled
    /// bitmap; before the first one of a session, marks the stored bitmaps
    /// `in_use` on disk. Called by every guest write path before it
    /// changes anything.
    pub(crate) fn track_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.bitmaps_tracking.load(Ordering::Acquire) || len == 0 {
            return Ok(());
        }
        loop {
            let st = self.bitmaps.read();
            if !st.marked {
                drop(st);
                self.mark_bitmaps_in_use()?;
                continue;
            }
            for b in st.list.iter().filter(|b| b.enabled) {
                if let Some(bits) = &b.bits {
                    let g = b.granularity_bits;
                    bits.set_range(offset >> g, (offset + len).div_ceil(1 << g));
                }
            }
            return Ok(());
        }
    }

    /// Sets `in_use` on every stored consistent bitmap: a copy of the
    /// directory with the flags set is written to new clusters, the refcounts
    /// reach the disk, and the header switches to the copy in one write
    /// (QEMU rewrites the directory in place with the autoclear bit off,
    /// where a crash loses every bitmap; this order loses none, at worst
    /// leaking the old directory's clusters).
    fn mark_bitmaps_in_use(&self) -> Result<()> {
        let mut st = self.bitmaps.write();
        if st.marked {
            return Ok(());
        }
        // A write that got here after a handoff began (it is checked
        // against the gate only later) must not write the header of an
        // image another host may own by now: inactivation changes the
        // state before it stores the bitmaps under this lock.
        self.check_active()?;
        st.changed = true;
        let needs: bool = st.list.iter().any(|b| b.disk.as_ref().is_some_and(|d| d.flags & FLAG_IN_USE == 0));
        if !needs {
            st.marked = true;
            return Ok(());
        }
        let mut entries: Vec<DirEntry> = st.list.iter().filter_map(|b| b.disk.clone()).collect();
        for e in &mut entries {
            e.flags |= FLAG_IN_USE;
        }
        let bytes = dir::encode(&entries);
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let mut a = self.alloc_lock()?;
        let off = self.alloc_clusters(&mut a, (bytes.len() as u64).div_ceil(cs))?;
        file.write_at(&bytes, off)?;
        self.store_refcounts(&mut a)?;
        file.sync()?;
        let old = {
            let mut h = self.header.lock();
            let old = h.bitmaps;
            h.bitmaps = Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                directory_size: bytes.len() as u64,
                directory_offset: off,
            });
            h.autoclear_features |= header::AUTOCLEAR_BITMAPS;
            self.write_header_locked(&mut h)?;
            old
        };
        file.sync()?;
        self.reserved.write().set_bitmap_directory(Some((off, bytes.len() as u64)));
        if let Some(e) = old {
            for c in e.directory_offset / cs..(e.directory_offset + e.directory_size).div_ceil(cs) {
                a.rc.add(file, c, -1)?;
            }
        }
        drop(a);
        let mut k = 0;
        for b in st.list.iter_mut() {
            if b.disk.is_some() {
                b.disk = Some(entries[k].clone());
                k += 1;
            }
        }
        st.marked = true;
        Ok(())
    }

    /// Writes the bitmaps to the image if anything changed since they were
    /// last stored (part of closing; see the module docs for the order).
    pub(crate) fn store_bitmaps(&self) -> Result<()> {
        let mut st = self.bitmaps.write();
        if !st.changed || self.alloc.is_none() {
            return Ok(());
        }
        let size = self.size();
        let cs = self.geo.cluster_size();
        let file = &*self.file;
        let mut a = self.wait_all_inflight(self.alloc_lock()?);
        let old_ext = self.header.lock().bitmaps;
        let old_dir = read_directory(file, &self.header.lock())?;
        let mut new_entries = Vec::with_capacity(st.list.len());
        for b in &st.list {
            let Some(bits) = b.bits.as_ref().filter(|_| !b.inconsistent) else {
                // Inconsistent: kept exactly as found.
                if let Some(d) = &b.disk {
                    new_entries.push(d.clone());
                }
                continue;
            };
            let tb_size = dir::data_bytes(size, b.granularity_bits).div_ceil(cs).max(1);
            let words_per_cluster = cs / 8;
            let mut table = vec![0u64; tb_size as usize];
            let mut buf = vec![0u8; cs as usize];
            for (i, slot) in table.iter_mut().enumerate() {
                let w0 = i as u64 * words_per_cluster;
                if !bits.any_in_words(w0, w0 + words_per_cluster) {
                    continue;
                }
                let off = self.alloc_clusters(&mut a, 1)?;
                bits.serialize(w0, &mut buf);
                file.write_at(&buf, off)?;
                *slot = off;
            }
            let tbytes = (tb_size * 8).div_ceil(cs) * cs;
            let toff = self.alloc_clusters(&mut a, tbytes / cs)?;
            file.write_at(&super::table::encode(table.iter().copied(), tbytes as usize), toff)?;
            new_entries.push(DirEntry {
                table_offset: toff,
                table_size: tb_size as u32,
                flags: if b.enabled { FLAG_AUTO } else { 0 },
                granularity_bits: b.granularity_bits,
                name: b.name.clone(),
                raw: b.raw.clone(),
            });
        }
        // Old tables nothing in the new directory uses (re-stored bitmaps,
        // removed ones); inconsistent bitmaps keep theirs.
        let mut old_tables: Vec<DirEntry> = Vec::new();
        for d in old_dir.into_iter().chain(st.removed.iter().cloned()) {
            let in_use = new_entries.iter().chain(&old_tables).any(|n| n.table_offset == d.table_offset);
            if !in_use {
                old_tables.push(d);
            }
        }
        // The new directory.
        let new_ext = if new_entries.is_empty() {
            None
        } else {
            let bytes = dir::encode(&new_entries);
            let off = self.alloc_clusters(&mut a, (bytes.len() as u64).div_ceil(cs))?;
            file.write_at(&bytes, off)?;
            Some(BitmapsExt {
                nb_bitmaps: new_entries.len() as u32,
                directory_size: bytes.len() as u64,
                directory_offset: off,
            })
        };
        // Refcounts and everything written, then the header in one write.
        self.store_refcounts(&mut a)?;
        file.sync()?;
        {
            let mut h = self.header.lock();
            h.bitmaps = new_ext;
            if new_ext.is_some() {
                h.autoclear_features |= header::AUTOCLEAR_BITMAPS;
            } else {
                h.autoclear_features &= !header::AUTOCLEAR_BITMAPS;
            }
            self.write_header_locked(&mut h)?;
        }
        file.sync()?;
        self.reserved.write().set_bitmap_directory(new_ext.map(|e| (e.directory_offset, e.directory_size)));
        // Nothing points at the old clusters any more.
        let mut frees: Vec<u64> = Vec::new();
        if let Some(e) = old_ext {
            let first = e.directory_offset / cs;
            frees.extend(first..(e.directory_offset + e.directory_size).div_ceil(cs));
        }
        for d in &old_tables {
            if let Ok(t) = read_table(file, d, cs) {
                frees.extend(t.iter().map(|x| x & TABLE_OFFSET_MASK).filter(|&o| o != 0).map(|o| o / cs));
            }
            let first = d.table_offset / cs;
            frees.extend(first..(d.table_offset + u64::from(d.table_size) * 8).div_ceil(cs));
        }
        for c in frees {
            a.rc.add(file, c, -1)?;
        }
        if !(a.lazy && a.marked_dirty) {
            self.store_refcounts(&mut a)?;
            file.sync()?;
        }
        drop(a);
        let mut k = 0;
        for b in st.list.iter_mut() {
            if b.bits.is_some() && !b.inconsistent || b.disk.is_some() {
                b.disk = Some(new_entries[k].clone());
                k += 1;
            }
        }
        st.changed = false;
        st.marked = false;
        st.removed.clear();
        Ok(())
    }

    fn bitmap_op<T>(&self, op: impl FnOnce(&mut BitmapState) -> Result<T>) -> Result<T> {
        self.check_writable()?;
        let mut st = self.bitmaps.write();
        let r = op(&mut st)?;
        st.changed = true;
        self.bitmaps_tracking.store(st.tracking(), Ordering::Release);
        Ok(r)
    }

    /// Adds a bitmap named `name` of `granularity` bytes per bit (`None`:
    /// QEMU's default, the cluster size within 4 KiB..64 KiB), enabled or
    /// not. It is stored when the image is closed.
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        if !self.is_v3() {
            return Err(self.err(Error::unsupported("cannot store dirty bitmaps in qcow2 v2 (compat 0.10) files")));
        }
        let cs = self.geo.cluster_size();
        let size = self.size();
        if size == 0 {
            return Err(self.err(Error::unsupported("cannot add a bitmap to a disk of 0 bytes")));
        }
        let g = granularity.unwrap_or(cs.clamp(4096, 65536));
        let gbits = dir::check_new(name, g, size, cs).map_err(|e| self.err(e))?;
        self.bitmap_op(|st| {
            if st.list.iter().any(|b| b.raw == name.as_bytes()) {
                return Err(Error::new(ErrorKind::AlreadyExists, format!("bitmap already exists: {name}")));
            }
            if st.list.len() as u64 >= u64::from(QCOW2_MAX_BITMAPS) {
                return Err(Error::limit(format!("the image already has {QCOW2_MAX_BITMAPS} bitmaps")));
            }
            let dir_len: u64 =
                st.list.iter().map(|b| dir::entry_len(&b.raw)).sum::<u64>() + dir::entry_len(name.as_bytes());
            if dir_len > QCOW2_MAX_BITMAP_DIRECTORY {
                return Err(Error::limit("not enough space in the bitmap directory"));
            }
            st.list.push(Bitmap {
                name: name.to_string(),
                raw: name.as_bytes().to_vec(),
                granularity_bits: gbits,
                enabled,
                inconsistent: false,
                disk: None,
                bits: Some(DirtyBits::new(nbits(size, gbits))),
            });
            Ok(())
        })
    }

    /// Removes the bitmap `name` (inconsistent ones too).
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.bitmap_op(|st| {
            let i = st.find(name)?;
            let b = st.list.remove(i);
            st.removed.extend(b.disk);
            Ok(())
        })
    }

    /// Clears every bit of the bitmap `name`.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.bitmap_op(|st| {
            let i = st.usable(name)?;
            if let Some(b) = st.list[i].bits.as_mut() {
                b.clear();
            }
            Ok(())
        })
    }

    /// Enables (`true`) or disables the bitmap `name`.
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.bitmap_op(|st| {
            let i = st.usable(name)?;
            st.list[i].enabled = enabled;
            Ok(())
        })
    }

    /// The dirty ranges of the bitmap `name` within `[offset, offset +
    /// len)`, clamped to it, as `(offset, length)` in guest bytes (each
    /// bit's whole granule, cut at the range's ends and the disk's end).
    pub fn bitmap_dirty_ranges(&self, name: &str, offset: u64, len: u64) -> Result<DirtyRanges> {
        let end = offset.saturating_add(len).min(self.size());
        self.with_bits(name, |bits, g| ranges_of(bits, g, offset, end))
    }

    /// Runs `f` on the bits and granularity bits of the usable bitmap
    /// `name`, loading them first in a read-only image (which loads bits on
    /// demand only).
    fn with_bits<T>(&self, name: &str, f: impl FnOnce(&DirtyBits, u8) -> T) -> Result<T> {
        {
            let st = self.bitmaps.read();
            let i = st.usable(name)?;
            if let Some(bits) = &st.list[i].bits {
                return Ok(f(bits, st.list[i].granularity_bits));
            }
        }
        let mut st = self.bitmaps.write();
        let i = st.usable(name)?;
        if st.list[i].bits.is_none() {
            let e = st.list[i].disk.clone().ok_or_else(|| Error::internal("bitmap without bits or entry"))?;
            let mut budget = MAX_LOADED_BYTES;
            let bits = load_bits(&*self.file, &e, self.size(), self.geo.cluster_size(), &mut budget)
                .map_err(|e| self.err(e))?;
            st.list[i].bits = Some(bits);
        }
        let b = &st.list[i];
        Ok(f(b.bits.as_ref().expect("loaded above"), b.granularity_bits))
    }

    /// Whether guest offset `offset` is dirty in the bitmap `name`, and for
    /// how many bytes from there (at most `max_len`, at least 1 when
    /// `max_len > 0` and `offset` is inside the disk) that stays so: what an
    /// NBD `qemu:dirty-bitmap` block status answers.
    pub fn bitmap_extent(&self, name: &str, offset: u64, max_len: u64) -> Result<(u64, bool)> {
        let end = offset.saturating_add(max_len).min(self.size());
        if offset >= end {
            return Ok((0, false));
        }
        self.with_bits(name, |bits, g| {
            let first = offset >> g;
            match bits.runs(first, end.div_ceil(1 << g), 1).first() {
                Some(&(s, e)) if s <= first => ((e << g).min(end) - offset, true),
                Some(&(s, _)) => ((s << g).min(end) - offset, false),
                None => (end - offset, false),
            }
        })
    }

    /// Marks every range of `src` dirty in the bitmap `name` (of any
    /// granularity: a source bit marks every bit it overlaps).
    pub fn bitmap_merge_from(&self, name: &str, src: &DirtyRanges) -> Result<()> {
        self.bitmap_op(|st| {
            let i = st.usable(name)?;
            let g = st.list[i].granularity_bits;
            if let Some(bits) = &st.list[i].bits {
                for &(o, l) in &src.ranges {
                    bits.set_range(o >> g, o.saturating_add(l).div_ceil(1 << g));
                }
            }
            Ok(())
        })
    }

    /// Marks the whole disk dirty in every enabled bitmap (the guest's view
    /// changed wholesale: a snapshot was applied).
    pub(crate) fn track_everything(&self) -> Result<()> {
        self.track_write(0, self.size())
    }

    /// Marks the stored bitmaps `in_use` (if any) before a change other
    /// than a guest write makes them stale on disk (a resize).
    pub(crate) fn mark_bitmaps_for_change(&self) -> Result<()> {
        if self.bitmaps_tracking.load(Ordering::Acquire) {
            self.mark_bitmaps_in_use()?;
        }
        Ok(())
    }

    /// Checks that every bitmap can follow a resize to `new_size` (QEMU
    /// refuses one with inconsistent bitmaps; a bitmap of an empty disk
    /// cannot be stored).
    pub(crate) fn bitmaps_resizable(&self, new_size: u64) -> Result<()> {
        let st = self.bitmaps.read();
        if new_size == 0 && !st.list.is_empty() {
            return Err(self.err(Error::unsupported(
                "cannot resize an image with persistent bitmaps to 0 bytes: remove them first",
            )));
        }
        if let Some(b) = st.list.iter().find(|b| b.inconsistent) {
            return Err(self.err(Error::unsupported(format!(
                "cannot resize an image whose bitmap '{}' is inconsistent: remove it first",
                b.name
            ))));
        }
        // A bitmap grown past what the format allows could not be stored,
        // and the image would not open again (here or in QEMU).
        let cs = self.geo.cluster_size();
        for b in &st.list {
            let bytes = dir::data_bytes(new_size, b.granularity_bits);
            if bytes > dir::MAX_DATA_BYTES || bytes > dir::MAX_TABLE_ENTRIES * cs {
                return Err(self.err(
                    Error::invalid_argument(format!(
                        "cannot resize to {new_size} bytes: bitmap '{}' (granularity {}) would take {bytes} bytes, more than a qcow2 bitmap may; remove it or merge it into one of a larger granularity first",
                        b.name,
                        1u64 << b.granularity_bits
                    ))
                    .with_field("size"),
                ));
            }
        }
        Ok(())
    }

    /// Gives every bitmap the length of a disk of `size` bytes (new bits
    /// clear).
    pub(crate) fn resize_bitmaps(&self, size: u64) {
        resize_bits(&mut self.bitmaps.write(), size);
    }
}

/// [`Qcow2::resize_bitmaps`] under a lock the caller holds.
pub(crate) fn resize_bits(st: &mut BitmapState, size: u64) {
    if st.list.is_empty() {
        return;
    }
    for b in st.list.iter_mut() {
        let n = nbits(size, b.granularity_bits);
        if let Some(bits) = b.bits.as_mut() {
            bits.resize(n);
        }
    }
    st.changed = true;
}

fn ranges_of(bits: &DirtyBits, g: u8, offset: u64, end: u64) -> DirtyRanges {
    let mut ranges = Vec::new();
    if offset < end {
        for (b0, b1) in bits.runs(offset >> g, end.div_ceil(1 << g), usize::MAX) {
            let s = (b0 << g).max(offset);
            let e = (b1 << g).min(end);
            if s < e {
                ranges.push((s, e - s));
            }
        }
    }
    DirtyRanges { granularity: 1 << g, ranges }
}
