//! Flushing metadata in a crash-safe order, applying queued frees, the
//! dirty and corrupt bits, and closing.
//!
//! # Ordering
//!
//! Data clusters are written directly; metadata changes go to caches and
//! reach the disk in [`Qcow2::flush`] in dependency order:
//!
//! 1. guest data is synced;
//! 2. refcount blocks are written (increments only), synced;
//! 3. the refcount table is written, synced;
//! 4. dirty L2 tables are written, synced;
//! 5. the L1 table is written, synced;
//! 6. queued refcount decrements (of clusters whose last pointer was removed
//!    in steps 4-5) are applied once every request that might still use the
//!    old mapping has finished, then written and synced.
//!
//! So a crash at any point leaves at worst leaked clusters: a refcount is
//! durable before anything points at the cluster, and a pointer is gone
//! before its refcount drops. Rare structural changes (growing the refcount
//! table or the L1 table, header changes) are written synchronously in the
//! same order.
//!
//! [`Qcow2::flush`]: crate::BlockDevice::flush

use std::sync::Arc;

use super::alloc::AllocState;
use super::header::{self, Header};
use super::table;
use super::Qcow2;
use crate::error::{Error, Result};

/// Queued frees beyond which a write triggers a flush to apply them.
const MAX_PENDING_FREES: usize = 1 << 16;

/// Whether so many frees are queued that the caller should flush (once it
/// holds no lock and no gate guard) to apply them.
pub(crate) fn frees_due(a: &AllocState) -> bool {
    a.pending.len() > MAX_PENDING_FREES
}

impl Qcow2 {
    /// Writes the header (cluster 0) from `h`.
    pub(crate) fn write_header_locked(&self, h: &mut Header) -> Result<()> {
        let bytes = h.encode()?;
        self.file.write_at(&bytes, 0)
    }

    /// Marks the image corrupt (header bit and in memory) after inconsistent
    /// metadata was found, so no further write can make it worse.
    pub(crate) fn mark_corrupt(&self, e: Error) -> Error {
        self.corrupt.store(true, std::sync::atomic::Ordering::Release);
        let mut h = self.header.lock();
        if h.version == 3 && h.incompatible_features & header::INCOMPAT_CORRUPT == 0 {
            h.incompatible_features |= header::INCOMPAT_CORRUPT;
            let _ = self.write_header_locked(&mut h).and_then(|_| self.file.sync());
        }
        self.err(e)
    }

    /// Sets the dirty bit before the first change when refcounts are lazy.
    pub(crate) fn mark_dirty_if_lazy(&self, a: &mut AllocState) -> Result<()> {
        if a.lazy && !a.marked_dirty {
            let mut h = self.header.lock();
            h.incompatible_features |= header::INCOMPAT_DIRTY;
            self.write_header_locked(&mut h)?;
            drop(h);
            self.file.sync()?;
            a.marked_dirty = true;
        }
        Ok(())
    }

    /// Writes every dirty metadata table in dependency order and syncs
    /// (steps 1-5 of the module docs). Queued frees stay queued.
    pub(crate) fn flush_meta(&self, a: &mut AllocState) -> Result<()> {
        let file = &*self.file;
        let l2_dirty = self.map.read().l2.dirty_tables();
        let rc_dirty = a.rc.is_dirty();
        if self.data_unsynced.swap(false, std::sync::atomic::Ordering::AcqRel) {
            a.data_written = true;
        }
        if !(a.data_written || rc_dirty || !l2_dirty.is_empty() || a.l1_dirty) {
            return Ok(());
        }
        let lazy = a.lazy && a.marked_dirty;
        let mut unsynced = a.data_written;
        if !Arc::ptr_eq(&self.data, &self.file) && a.data_written {
            self.data.sync()?;
        }
        if !lazy && rc_dirty && self.store_refcounts(a)? {
            unsynced = true;
        }
        if !l2_dirty.is_empty() {
            if unsynced {
                file.sync()?;
            }
            for t in &l2_dirty {
                file.write_at(&t.to_bytes(), t.offset)?;
                t.set_dirty(false);
            }
            unsynced = true;
        }
        if a.l1_dirty {
            if unsynced {
                file.sync()?;
            }
            let (bytes, off) = {
                let m = self.map.read();
                (table::encode(m.l1.iter().copied(), m.l1.len() * 8), self.header.lock().l1_table_offset)
            };
            file.write_at(&bytes, off)?;
            a.l1_dirty = false;
            unsynced = true;
        }
        if unsynced {
            file.sync()?;
        }
        a.data_written = false;
        self.map.write().l2.evict_clean();
        Ok(())
    }

    /// Applies queued refcount decrements: the pointers are gone from the
    /// disk and no request started before can still use them.
    fn apply_frees(&self, a: &mut AllocState, frees: Vec<u64>, punches: Vec<(u64, u64)>) -> Result<()> {
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let mut freed = Vec::new();
        for c in frees {
            if a.rc.add(file, c, -1)? == 0 {
                freed.push(c);
                if a.compressed_next != 0 && a.compressed_next / cs == c {
                    a.compressed_next = 0;
                }
            }
        }
        if !(a.lazy && a.marked_dirty) && a.rc.is_dirty() {
            a.rc.write_blocks(file)?;
            file.sync()?;
        }
        // Nothing cached may describe a freed cluster: it can be reused.
        if !freed.is_empty() {
            let mut m = self.map.write();
            for &c in &freed {
                m.l2.remove(c * cs);
            }
            drop(m);
            self.zcache.clear();
        }
        // Give the space back: punch holes, and cut free clusters off the
        // end of the file.
        freed.sort_unstable();
        freed.dedup();
        let len = file.len()?;
        let mut end_cluster = len.div_ceil(cs);
        // Never while an allocating write is in flight: its new cluster may
        // lie past the end the file has now, and cutting the file would
        // drop the data it is writing there (those writes hold no lock).
        while a.inflight.is_empty() && end_cluster > 1 && freed.binary_search(&(end_cluster - 1)).is_ok() {
            end_cluster -= 1;
        }
        if end_cluster * cs < len {
            file.set_len(end_cluster * cs)?;
        }
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                j += 1;
            }
            let (s, e) = (freed[i], freed[j - 1] + 1);
            if s < end_cluster {
                match file.punch_hole(s * cs, (e.min(end_cluster) - s) * cs) {
                    Ok(()) | Err(_) => {}
                }
            }
            i = j;
        }
        for (off, len) in punches {
            let _ = self.data.punch_hole(off, len);
        }
        Ok(())
    }

    /// The full flush: metadata in order, then queued frees.
    pub(crate) fn flush_impl(&self) -> Result<()> {
        let Some(alloc) = &self.alloc else {
            return Ok(());
        };
        let (frees, punches) = {
            let mut a = alloc.lock();
            self.flush_meta(&mut a)?;
            (std::mem::take(&mut a.pending), std::mem::take(&mut a.pending_punch))
        };
        if !frees.is_empty() || !punches.is_empty() {
            self.gate.wait_for_readers();
            let mut a = alloc.lock();
            self.apply_frees(&mut a, frees, punches)?;
        }
        Ok(())
    }

    /// Flushes when too many frees are queued (called with no gate guard).
    pub(crate) fn maybe_flush_frees(&self) -> Result<()> {
        let many = self.alloc.as_ref().is_some_and(|a| frees_due(&a.lock()));
        if many {
            self.flush_impl()?;
        }
        Ok(())
    }

    /// Writes the cached refcount blocks, then (after a sync, so the table
    /// never names a block not yet on disk) a moved refcount table. Returns
    /// whether anything was written; the caller syncs.
    pub(crate) fn store_refcounts(&self, a: &mut AllocState) -> Result<bool> {
        let file = &*self.file;
        let mut wrote = a.rc.write_blocks(file)?;
        if a.rc.table_dirty {
            file.sync()?;
            file.write_at(&a.rc.table_bytes(), a.rc.table_offset)?;
            a.rc.table_dirty = false;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Writes the cached refcounts and syncs: how lazy refcounts reach the
    /// disk.
    pub(crate) fn write_refcounts(&self, a: &mut AllocState) -> Result<()> {
        self.store_refcounts(a)?;
        self.file.sync()
    }

    /// Flushes, writes lazy refcounts and clears the dirty bit: the clean
    /// way to close an image opened read-write, with the error reported.
    /// Dropping the image does the same but cannot report a failure.
    pub fn close(self) -> Result<()> {
        self.close_impl()
    }

    /// What [`Qcow2::close`] and `Drop` do; the device stays usable (a
    /// later lazy-refcount write sets the dirty bit again).
    pub(crate) fn close_impl(&self) -> Result<()> {
        if self.inactive() {
            // Handed off: the image belongs to someone else now.
            return Ok(());
        }
        if self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            // Nothing more is written to an image found corrupt; say so.
            return Err(self.err(Error::corrupt(
                "the image was found corrupt while open: it was left as it is (qemu-img check -r all repairs it)",
            )));
        }
        self.flush_impl()?;
        self.store_bitmaps()?;
        if let Some(alloc) = &self.alloc {
            let mut a = alloc.lock();
            if a.marked_dirty {
                let file = &*self.file;
                self.write_refcounts(&mut a)?;
                let mut h = self.header.lock();
                h.incompatible_features &= !header::INCOMPAT_DIRTY;
                self.write_header_locked(&mut h)?;
                drop(h);
                file.sync()?;
                a.marked_dirty = false;
            }
        }
        Ok(())
    }
}
