//! The qcow2 write path: allocation, copy-on-write, zeroing and discard,
//! compressed writes, resizing, and flushing metadata in a crash-safe order.
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
//! # Concurrency
//!
//! Overwrites of clusters the image owns (COPIED) go straight to the data
//! file without any lock. Allocating writes take the allocation lock to
//! reserve host clusters and mark the guest clusters in flight, release it
//! for the copy-on-write reads and the data write, and take it again to link
//! the new clusters into the L2 table: a reader never sees a mapping before
//! its data. Other writers of an in-flight cluster wait on a condition
//! variable.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::MutexGuard;

use super::header::{self, Header};
use super::l2::{L2Entry, L2Table, Mapping, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS};
use super::refcount::Refcounts;
use super::{crypt, Qcow2};
use crate::codec;
use crate::device::{check_request, BlockDevice, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::*;

/// Most guest clusters one allocating request handles at once.
const MAX_BATCH: u64 = 512;
/// Queued frees beyond which a write triggers a flush to apply them.
const MAX_PENDING_FREES: usize = 1 << 16;

/// State behind the allocation lock.
#[derive(Debug)]
pub(crate) struct AllocState {
    /// Refcount table and block cache.
    pub rc: Refcounts,
    /// Host clusters whose refcount drops by one once the pointers removed
    /// since the last flush are durable (one entry per reference).
    pub pending: Vec<u64>,
    /// Guest byte ranges of an external data file to punch after the flush.
    pub pending_punch: Vec<(u64, u64)>,
    /// Guest clusters being allocated by some request.
    pub inflight: HashSet<u64, crate::qcow2::l2::OffsetHash>,
    /// The in-memory L1 table differs from the disk.
    pub l1_dirty: bool,
    /// Guest data was written since the last sync.
    pub data_written: bool,
    /// Next free byte for compressed data (0: start a new cluster).
    pub compressed_next: u64,
    /// One past the highest cluster allocated in this session.
    pub alloc_end: u64,
    /// Lazy refcounts: refcounts are written only on close.
    pub lazy: bool,
    /// The dirty bit was set on disk in this session (lazy refcounts).
    pub marked_dirty: bool,
}

/// What an allocating request does with one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Write into the cluster the image already owns.
    InPlace(u64),
    /// Write a new host cluster (copy-on-write of what was there).
    New(u64),
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Guest cluster index.
    c: u64,
    /// Its L2 entry before the write.
    old: L2Entry,
    /// Written range inside the cluster.
    ws: u64,
    we: u64,
    action: Action,
    /// The new host cluster lies past the end of the file, so it reads as
    /// zeros without being written.
    fresh: bool,
}

/// A discard or a write_zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroOp {
    Discard,
    Zero(ZeroMode),
}

impl Qcow2 {
    pub(crate) fn alloc_lock(&self) -> Result<MutexGuard<'_, AllocState>> {
        match &self.alloc {
            Some(a) => Ok(a.lock()),
            None => Err(self.err(Error::read_only("write"))),
        }
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only || self.alloc.is_none() {
            return Err(self.err(Error::read_only("write")));
        }
        if self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            return Err(self.err(Error::new(
                ErrorKind::ReadOnly,
                "the image was found corrupt and is now read-only; repair it with check -r all",
            )));
        }
        Ok(())
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

    /// Writes the header (cluster 0) from `h`.
    pub(crate) fn write_header_locked(&self, h: &mut Header) -> Result<()> {
        let bytes = h.encode()?;
        self.file.write_at(&bytes, 0)
    }

    fn geo_granule(&self) -> u64 {
        1 << self.geo.granule_bits()
    }

    fn has_backing(&self) -> bool {
        self.backing.is_some() || self.header.lock().backing_file.is_some()
    }

    fn is_v3(&self) -> bool {
        self.version == 3
    }

    /// Loads the L2 table at `off` into the cache (or finds it there).
    pub(crate) fn load_l2(&self, off: u64) -> Result<Arc<L2Table>> {
        if let Some(t) = self.map.read().l2.get(off) {
            return Ok(t.clone());
        }
        let mut buf = vec![0u8; self.geo.cluster_size() as usize];
        self.file.read_at(&mut buf, off)?;
        let table = L2Table::from_bytes(off, &buf);
        self.validate_l2(&table)?;
        table.detect_linear(&self.geo);
        Ok(self.map.write().l2.insert(table))
    }

    /// Checks that no entry of a freshly loaded table points into the
    /// image's fixed metadata (header, L1, refcount table, snapshots).
    pub(crate) fn validate_l2(&self, t: &L2Table) -> Result<()> {
        if self.alloc.is_none() || self.geo.data_file {
            return Ok(());
        }
        let reserved = self.reserved.read();
        let cs = self.geo.cluster_size();
        for i in 0..t.len(&self.geo) {
            let e = t.get(&self.geo, i);
            if e.is_compressed() {
                continue;
            }
            let off = e.word & OFFSET_MASK;
            if off != 0 && reserved.overlaps(off, cs) {
                return Err(self.mark_corrupt(
                    Error::corrupt(format!(
                        "L2 table at {:#x} entry {i} points at {off:#x}, inside the image's metadata",
                        t.offset
                    ))
                    .with_offset(t.offset),
                ));
            }
        }
        Ok(())
    }

    /// Allocates `n` contiguous new host clusters (refcount 1 each).
    ///
    /// Refcount blocks missing for the run are placed right after it (the
    /// search asks for room for them), so a run never has to be split.
    pub(crate) fn alloc_clusters(&self, a: &mut AllocState, n: u64) -> Result<u64> {
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let epb = a.rc.entries_per_block();
        let mut extra = 0u64;
        for _ in 0..64 {
            let total = n + extra;
            let start = a.rc.find_free(file, total)?;
            let last = start + total - 1;
            if !a.rc.covers(last) {
                self.grow_reftable(a, last)?;
                continue;
            }
            let missing: Vec<u64> = ((start / epb)..=(last / epb))
                .filter(|&ti| a.rc.table.get(ti as usize).is_none_or(|&e| e == 0))
                .collect();
            if missing.len() as u64 > extra {
                extra = missing.len() as u64;
                continue;
            }
            for (i, &ti) in missing.iter().enumerate() {
                a.rc.create_block_at(file, ti, (start + n + i as u64) * cs)?;
            }
            for c in start..start + n + missing.len() as u64 {
                a.rc.add(file, c, 1)?;
            }
            a.alloc_end = a.alloc_end.max(start + n + missing.len() as u64);
            return Ok(start << self.geo.cluster_bits);
        }
        Err(Error::internal("cluster allocation did not converge"))
    }

    /// Gives cluster `c` (which is not free-listed: reserved metadata) a
    /// refcount of one, growing the refcount structures as needed.
    pub(crate) fn mark_used(&self, a: &mut AllocState, c: u64) -> Result<()> {
        if !a.rc.covers(c) {
            self.grow_reftable(a, c)?;
        }
        let file = &*self.file;
        let ti = c / a.rc.entries_per_block();
        if a.rc.table.get(ti as usize).is_some_and(|&e| e == 0) {
            // The block goes wherever the allocator finds room: the range
            // itself may be all metadata (a large L1 table of small clusters).
            let off = self.alloc_clusters(a, 1)?;
            if a.rc.table.get(ti as usize).is_some_and(|&e| e == 0) {
                a.rc.create_block_at(file, ti, off)?;
            } else {
                // The allocation created that block itself.
                a.rc.add(file, off >> self.geo.cluster_bits, -1)?;
            }
        }
        a.rc.add(file, c, 1)?;
        Ok(())
    }

    /// Replaces the refcount table with a larger one covering `need_cluster`,
    /// placed (with the refcount blocks it needs) past everything allocated.
    fn grow_reftable(&self, a: &mut AllocState, need_cluster: u64) -> Result<()> {
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let epb = a.rc.entries_per_block();
        let old_len = a.rc.table.len() as u64;
        let file_end = file.len()?.div_ceil(cs);
        let e_start = file_end.max(a.alloc_end).max(need_cluster + 1);
        let mut new_len = (need_cluster / epb + 1).max(old_len + old_len / 2 + 1);
        let mut nb = 0u64;
        let mut tc;
        loop {
            tc = (new_len * 8).div_ceil(cs);
            let area_end = e_start + tc + nb;
            let ranges = (e_start / epb)..=((area_end - 1) / epb);
            let needed = ranges.clone().filter(|&r| a.rc.table.get(r as usize).is_none_or(|&e| e == 0)).count() as u64;
            let need_len = new_len.max(*ranges.end() + 1);
            if needed == nb && need_len == new_len {
                break;
            }
            nb = needed;
            new_len = need_len;
        }
        if tc * cs > QCOW2_MAX_REFTABLE_BYTES {
            return Err(Error::limit(format!("the refcount table would grow past {QCOW2_MAX_REFTABLE_BYTES} bytes")));
        }
        let area_end = e_start + tc + nb;
        let mut table = a.rc.table.clone();
        table.resize((tc * cs / 8) as usize, 0);
        let mut next_block = e_start + tc;
        for r in (e_start / epb)..=((area_end - 1) / epb) {
            if table[r as usize] == 0 {
                let off = next_block * cs;
                table[r as usize] = off;
                a.rc.insert_new_block(file, off)?;
                next_block += 1;
            }
        }
        let old_off = a.rc.table_offset;
        let old_clusters = u64::from(a.rc.table_clusters);
        a.rc.table = table;
        a.rc.table_offset = e_start * cs;
        a.rc.table_clusters = tc as u32;
        for c in e_start..area_end {
            a.rc.add(file, c, 1)?;
        }
        a.alloc_end = a.alloc_end.max(area_end);
        // Blocks, then the table, then the header, each durable before the
        // next points at it.
        a.rc.write_blocks(file)?;
        file.write_at(&a.rc.table_bytes(), a.rc.table_offset)?;
        file.sync()?;
        {
            let mut h = self.header.lock();
            h.refcount_table_offset = a.rc.table_offset;
            h.refcount_table_clusters = a.rc.table_clusters;
            self.write_header_locked(&mut h)?;
        }
        file.sync()?;
        a.rc.table_dirty = false;
        {
            let mut r = self.reserved.write();
            r.remove(old_off);
            r.add(a.rc.table_offset, tc * cs);
        }
        a.rc.reserved = self.reserved.read().clone();
        for c in (old_off / cs)..(old_off / cs + old_clusters) {
            a.rc.add(file, c, -1)?;
        }
        Ok(())
    }

    /// The L2 table for `l1_index`, allocated or copied so the image owns it.
    pub(crate) fn l2_for_write(&self, a: &mut AllocState, l1_index: u64) -> Result<Arc<L2Table>> {
        let l1e = {
            let m = self.map.read();
            match m.l1.get(l1_index as usize) {
                Some(&e) => e,
                None => {
                    return Err(Error::internal(format!("L1 index {l1_index} is beyond the L1 table")));
                }
            }
        };
        let off = l1e & OFFSET_MASK;
        let cs = self.geo.cluster_size();
        if off != 0 {
            if off & (cs - 1) != 0 || self.reserved.read().overlaps(off, cs) {
                return Err(self.mark_corrupt(
                    Error::corrupt(format!("L1 entry {l1_index} points at {off:#x}, which is not a valid L2 table"))
                        .with_offset(off),
                ));
            }
            if l1e & OFLAG_COPIED != 0 {
                return self.load_l2(off);
            }
        }
        let new_off = self.alloc_clusters(a, 1)?;
        let table = if off == 0 {
            L2Table::zeroed(new_off, (cs / 8) as usize)
        } else {
            let old = self.load_l2(off)?;
            let t = old.copy_to(new_off);
            // The old table stays with the snapshots that share it.
            a.pending.push(off / cs);
            t
        };
        let t = {
            let mut m = self.map.write();
            let t = m.l2.replace(table);
            if let Some(e) = m.l1.get_mut(l1_index as usize) {
                *e = new_off | OFLAG_COPIED;
            }
            t
        };
        a.l1_dirty = true;
        Ok(t)
    }

    /// Sets the dirty bit before the first change when refcounts are lazy.
    fn mark_dirty_if_lazy(&self, a: &mut AllocState) -> Result<()> {
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

    /// Queues the release of whatever host storage `e` references.
    fn release_entry(&self, a: &mut AllocState, e: L2Entry, guest_cluster: u64) {
        let cs = self.geo.cluster_size();
        if e.is_compressed() {
            let (host, len) = e.compressed(&self.geo);
            let first = host / cs;
            let last = (host + len - 1) / cs;
            a.pending.extend(first..=last);
        } else if let Some(h) = e.host_offset(&self.geo) {
            if self.geo.data_file {
                a.pending_punch.push((guest_cluster * cs, cs));
            } else {
                a.pending.push(h / cs);
            }
        }
    }

    /// The run of owned, allocated granules starting at `guest` that can be
    /// overwritten in place: (host offset of `guest`, length).
    fn overwrite_run(&self, guest: u64, max: u64) -> Result<Option<(u64, u64)>> {
        let geo = self.geo;
        let cb = geo.cluster_bits;
        let gb = geo.granule_bits();
        let granule = 1u64 << gb;
        let l2e = geo.l2_entries();
        let l1_index = (guest >> cb) / l2e;
        let table_end = (l1_index + 1).saturating_mul(geo.l2_span());
        let limit = guest.saturating_add(max).min(table_end);
        self.with_l2(l1_index, |t| {
            let Some(t) = t else { return Ok(None) };
            let mut g = guest & !(granule - 1);
            let mut first_host = None;
            let mut next = 0u64;
            while g < limit {
                let c = g >> cb;
                let e = t.get(&geo, (c % l2e) as usize);
                if !e.copied() || e.is_compressed() {
                    break;
                }
                let Some(h) = e.host_offset(&geo) else { break };
                if h & (geo.cluster_size() - 1) != 0 {
                    break;
                }
                let host = if geo.extended_l2 {
                    let sc = ((g >> gb) & u64::from(SUBCLUSTERS - 1)) as u32;
                    if e.bitmap & (1 << sc) == 0 || e.bitmap & (1 << (32 + sc)) != 0 {
                        break;
                    }
                    h + u64::from(sc) * granule
                } else {
                    if e.word & OFLAG_ZERO != 0 {
                        break;
                    }
                    h
                };
                match first_host {
                    None => first_host = Some(host),
                    Some(_) if host != next => break,
                    _ => {}
                }
                next = host + granule;
                g += granule;
            }
            Ok(first_host.map(|h| (h + (guest & (granule - 1)), g.min(limit) - guest)).filter(|r| r.1 > 0))
        })
    }

    /// Writes `buf` at guest `offset`; the range was checked.
    pub(crate) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        {
            let _g = self.gate.enter();
            let mut pos = 0usize;
            while pos < buf.len() {
                let guest = offset + pos as u64;
                let rem = (buf.len() - pos) as u64;
                if !self.encrypted() {
                    if let Some((host, n)) = self.overwrite_run(guest, rem)? {
                        self.data.write_at(&buf[pos..pos + n as usize], host)?;
                        // The next flush must sync this data, although no
                        // metadata changed.
                        if !self.data_unsynced.load(std::sync::atomic::Ordering::Relaxed) {
                            self.data_unsynced.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        pos += n as usize;
                        continue;
                    }
                }
                pos += self.write_slow(&buf[pos..], guest)? as usize;
            }
        }
        self.maybe_flush_frees()
    }

    /// Flushes when too many frees are queued (called with no gate guard).
    fn maybe_flush_frees(&self) -> Result<()> {
        let many = self.alloc.as_ref().is_some_and(|a| a.lock().pending.len() > MAX_PENDING_FREES);
        if many {
            self.flush_impl()?;
        }
        Ok(())
    }

    /// Waits until none of the guest clusters `[c0, c1]` is in flight.
    fn wait_inflight<'a>(&'a self, mut a: MutexGuard<'a, AllocState>, c0: u64, c1: u64) -> MutexGuard<'a, AllocState> {
        while (c0..=c1).any(|c| a.inflight.contains(&c)) {
            self.alloc_cv.wait(&mut a);
        }
        a
    }

    /// Handles the allocating part of a write starting at `guest`, at most
    /// up to the end of its L2 table. Returns the bytes written.
    fn write_slow(&self, buf: &[u8], guest: u64) -> Result<u64> {
        let geo = self.geo;
        let cb = geo.cluster_bits;
        let cs = geo.cluster_size();
        let l2e = geo.l2_entries();
        let c0 = guest >> cb;
        let l1_index = c0 / l2e;
        let end = (guest + buf.len() as u64).min((l1_index + 1) * geo.l2_span()).min((c0 + MAX_BATCH) << cb);
        let c_last = (end - 1) >> cb;
        let a = self.alloc_lock()?;
        let mut a = self.wait_inflight(a, c0, c_last);
        self.mark_dirty_if_lazy(&mut a)?;
        let t = self.l2_for_write(&mut a, l1_index)?;
        let mut plans = Vec::with_capacity((c_last - c0 + 1) as usize);
        let mut allocs = 0u64;
        for c in c0..=c_last {
            let old = t.get(&geo, (c % l2e) as usize);
            let base = c << cb;
            let ws = guest.max(base) - base;
            let we = end.min(base + cs) - base;
            let action = match old.host_offset(&geo) {
                Some(h) if old.copied() && !old.is_compressed() => Action::InPlace(h),
                _ => {
                    if geo.data_file {
                        Action::New(base)
                    } else {
                        allocs += 1;
                        Action::New(0)
                    }
                }
            };
            plans.push(Plan { c, old, ws, we, action, fresh: false });
        }
        drop(t);
        if allocs > 0 {
            let mut host = self.alloc_clusters(&mut a, allocs)?;
            let file_len = self.data.len()?;
            for p in plans.iter_mut() {
                if p.action == Action::New(0) {
                    p.action = Action::New(host);
                    p.fresh = host >= file_len;
                    host += cs;
                }
            }
        }
        for p in &plans {
            a.inflight.insert(p.c);
        }
        drop(a);

        let result = self.write_plans(&plans, buf, guest);

        let mut a = self.alloc_lock()?;
        for p in &plans {
            a.inflight.remove(&p.c);
        }
        self.alloc_cv.notify_all();
        if let Err(e) = result {
            // Nothing points at the new clusters yet: give them back.
            if !geo.data_file {
                for p in &plans {
                    if let Action::New(h) = p.action {
                        let _ = a.rc.add(&*self.file, h / cs, -1);
                    }
                }
            }

            return Err(e);
        }
        let t = self.l2_for_write(&mut a, l1_index)?;
        for p in &plans {
            let i = (p.c % l2e) as usize;
            let new = self.new_entry(p);
            if let Action::New(_) = p.action {
                self.release_entry(&mut a, p.old, p.c);
            }
            t.set(&geo, i, new);
        }
        a.data_written = true;
        if self.map.read().l2.over_capacity() {
            self.flush_meta(&mut a)?;
        }
        Ok(end - guest)
    }

    /// The L2 entry a plan leaves behind.
    fn new_entry(&self, p: &Plan) -> L2Entry {
        let geo = &self.geo;
        let host = p.action_host();
        let word = host | OFLAG_COPIED;
        if !geo.extended_l2 {
            return L2Entry { word, bitmap: 0 };
        }
        let (touched, _) = self.touched_subclusters(p);
        let old_alloc = if p.old.is_compressed() { 0 } else { p.old.bitmap & 0xffff_ffff };
        let old_zero = if p.old.is_compressed() { 0 } else { p.old.bitmap >> 32 };
        let (alloc, zero) = match p.action {
            Action::InPlace(_) => (old_alloc | touched, old_zero & !touched),
            Action::New(_) => {
                if p.old.is_compressed() {
                    // The whole cluster was copied out of the compressed one.
                    (0xffff_ffff, 0)
                } else {
                    (old_alloc | touched, old_zero & !touched)
                }
            }
        };
        L2Entry { word, bitmap: alloc | (zero << 32) }
    }

    /// Bitmask of the subclusters a plan writes, and of those it writes only
    /// partly.
    fn touched_subclusters(&self, p: &Plan) -> (u64, u64) {
        let sg = self.geo_granule();
        let first = p.ws / sg;
        let last = (p.we - 1) / sg;
        let mut touched = 0u64;
        for s in first..=last {
            touched |= 1 << s;
        }
        let mut partial = 0u64;
        if p.ws % sg != 0 {
            partial |= 1 << first;
        }
        if p.we % sg != 0 {
            partial |= 1 << last;
        }
        (touched, partial)
    }

    /// Whether the guest cluster of a plan reads as zeros everywhere outside
    /// the written range (so a fresh cluster needs no copy-on-write).
    fn cow_reads_zero(&self, p: &Plan) -> bool {
        if self.crypt.is_some() || p.old.is_compressed() || p.old.host_offset(&self.geo).is_some() {
            return false;
        }
        if !self.geo.extended_l2 && p.old.word & OFLAG_ZERO != 0 {
            return true;
        }
        // Unallocated (or zero subclusters): zeros unless a backing file
        // covers the cluster.
        match &self.backing {
            None => !self.has_backing(),
            Some(b) => (p.c << self.geo.cluster_bits) >= b.size(),
        }
    }

    /// The bytes of guest cluster `c` as they read before a write: what a
    /// copy-on-write starts from.
    fn cow_source(&self, c: u64) -> Result<crate::direct::Aligned> {
        let cs = self.geo.cluster_size();
        let mut buf = crate::direct::Aligned::new(cs as usize);
        // Read it through the mapping, which handles every kind of entry
        // (and subclusters) the way a guest read does.
        let size = self.size();
        let base = c * cs;
        let n = cs.min(size.saturating_sub(base));
        if n > 0 {
            self.read_mapped(&mut buf.as_mut_slice()[..n as usize], base)?;
        }
        Ok(buf)
    }

    /// The data phase of an allocating write: copy-on-write and data I/O,
    /// with no lock held.
    fn write_plans(&self, plans: &[Plan], buf: &[u8], guest: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cb = geo.cluster_bits;
        let mut i = 0;
        while i < plans.len() {
            let p = plans[i];
            let base = p.c << cb;
            let src = &buf[(base + p.ws - guest) as usize..(base + p.we - guest) as usize];
            let full = p.ws == 0 && p.we == cs;
            match p.action {
                Action::New(h) if full && !self.encrypted() => {
                    // Coalesce following full clusters with contiguous hosts.
                    let mut j = i + 1;
                    while j < plans.len()
                        && plans[j].ws == 0
                        && plans[j].we == cs
                        && plans[j].action == Action::New(h + (j - i) as u64 * cs)
                    {
                        j += 1;
                    }
                    let len = (j - i) as u64 * cs;
                    let off = (base - guest) as usize;
                    self.write_data(&buf[off..off + len as usize], h, base)?;
                    i = j;
                    continue;
                }
                Action::New(h) if p.fresh && self.cow_reads_zero(&p) => {
                    // The rest of the new cluster is a hole past the old end
                    // of the file and reads as zeros already.
                    self.write_data(src, h + p.ws, base + p.ws)?;
                }
                Action::New(h) => {
                    let mut data = self.cow_source(p.c)?;
                    data.as_mut_slice()[p.ws as usize..p.we as usize].copy_from_slice(src);
                    self.write_data(data.as_slice(), h, base)?;
                }
                Action::InPlace(h) => {
                    if geo.extended_l2 {
                        self.write_in_place_ext(&p, h, src)?;
                    } else if p.old.word & OFLAG_ZERO != 0 || self.encrypted() && !crypt::sector_aligned(p.ws, p.we) {
                        // A preallocated zero cluster (or an unaligned
                        // encrypted write): rewrite the whole cluster.
                        let mut data = self.cow_source(p.c)?;
                        data.as_mut_slice()[p.ws as usize..p.we as usize].copy_from_slice(src);
                        self.write_data(data.as_slice(), h, base)?;
                    } else {
                        self.write_data(src, h + p.ws, base + p.ws)?;
                    }
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// Writes subclusters of an owned extended-L2 cluster: partly written
    /// subclusters that were not allocated start from what they read as.
    fn write_in_place_ext(&self, p: &Plan, h: u64, src: &[u8]) -> Result<()> {
        let sg = self.geo_granule();
        let base = p.c << self.geo.cluster_bits;
        let first = p.ws / sg;
        let last = (p.we - 1) / sg;
        let start = first * sg;
        let end = (last + 1) * sg;
        let alloc = p.old.bitmap & 0xffff_ffff;
        let needs_base = |s: u64| alloc & (1 << s) == 0;
        let mut data = vec![0u8; (end - start) as usize];
        let (_, partial) = self.touched_subclusters(p);
        for s in [first, last] {
            if partial & (1 << s) != 0 {
                let o = ((s - first) * sg) as usize;
                let chunk = &mut data[o..o + sg as usize];
                if needs_base(s) {
                    // Reads as zeros or the backing file: fetch that view.
                    let g = base + s * sg;
                    let n = sg.min(self.size().saturating_sub(g)) as usize;
                    self.read_mapped(&mut chunk[..n], g)?;
                } else {
                    self.read_data(chunk, h + s * sg, base + s * sg)?;
                }
            }
        }
        data[(p.ws - start) as usize..(p.we - start) as usize].copy_from_slice(src);
        self.write_data(&data, h + start, base + start)
    }

    /// Zeroes or discards `[offset, offset + len)`.
    fn zero_or_discard(&self, offset: u64, len: u64, op: ZeroOp) -> Result<()> {
        self.check_writable()?;
        check_request(offset, len, self.size())?;
        self.zero_or_discard_in(offset, len, op, self.size())
    }

    /// [`zero_or_discard`](Self::zero_or_discard) of a range the caller
    /// checked against `size` (which may not be the visible size yet: a
    /// resize zeroes the new range before it becomes visible).
    fn zero_or_discard_in(&self, offset: u64, len: u64, op: ZeroOp, size: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        // Zeroes work per subcluster with extended L2; discards per cluster,
        // as QEMU's discard alignment.
        let granule = match op {
            ZeroOp::Zero(_) => self.geo_granule(),
            ZeroOp::Discard => self.geo.cluster_size(),
        };

        // A final partial cluster at the end of the disk counts as whole.
        let round_end = if end == size { end.div_ceil(granule) * granule } else { end / granule * granule };
        let astart = offset.div_ceil(granule) * granule;
        let aend = round_end.max(astart);
        let zero_data = |a: u64, b: u64| -> Result<()> {
            if b > a {
                if let ZeroOp::Zero(_) = op {
                    self.write_zero_data(a, b - a)?;
                }
            }
            Ok(())
        };
        if astart >= aend {
            return zero_data(offset, end);
        }
        zero_data(offset, astart)?;
        // v2 images have no zero flag; with a backing file (or when host
        // space must stay allocated) zeros are written as data.
        let data_fallback = match op {
            ZeroOp::Zero(mode) => {
                (!self.is_v3() && (self.has_backing() || mode == ZeroMode::Allocate)) || self.geo.data_file
            }
            ZeroOp::Discard => false,
        };
        if data_fallback {
            self.write_zero_data(astart, aend.min(end) - astart)?;
        } else {
            let _g = self.gate.enter();
            let mut pos = astart;
            while pos < aend {
                pos = self.zero_batch(pos, aend, op)?;
            }
        }
        zero_data(aend.min(end).max(astart), end)?;
        self.maybe_flush_frees()
    }

    fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_impl(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Zeroes or discards whole granules from `start` up to `end` within one
    /// L2 table. Returns where it stopped.
    fn zero_batch(&self, start: u64, end: u64, op: ZeroOp) -> Result<u64> {
        let geo = self.geo;
        let cb = geo.cluster_bits;
        let cs = geo.cluster_size();
        let l2e = geo.l2_entries();
        let c0 = start >> cb;
        let l1_index = c0 / l2e;
        let stop = end.min((l1_index + 1) * geo.l2_span());
        let c_last = (stop - 1) >> cb;
        let a = self.alloc_lock()?;
        let mut a = self.wait_inflight(a, c0, c_last);
        let backing = self.has_backing();
        let v3 = self.is_v3();
        // Discarding into a missing L2 table without a backing file changes
        // nothing: skip allocating one.
        let l1e = self.map.read().l1.get(l1_index as usize).copied().unwrap_or(0);
        if l1e & OFFSET_MASK == 0 && (op == ZeroOp::Discard && !(backing && v3)) {
            return Ok(stop);
        }
        self.mark_dirty_if_lazy(&mut a)?;
        let t = self.l2_for_write(&mut a, l1_index)?;
        let mut deferred = Vec::new();
        for c in c0..=c_last {
            let i = (c % l2e) as usize;
            let old = t.get(&geo, i);
            let base = c << cb;
            let ws = start.max(base) - base;

            let we = stop.min(base + cs) - base;
            let whole = ws == 0 && we == cs;
            if geo.extended_l2 && !whole {
                if old.is_compressed() {
                    // Subclusters of a compressed cluster cannot be zeroed
                    // in the metadata: write zeros (after the batch).
                    if let ZeroOp::Zero(_) = op {
                        deferred.push((base + ws, we - ws));
                    }
                    continue;
                }

                let sg = self.geo_granule();
                let mut mask = 0u64;
                for s in (ws / sg)..(we / sg) {
                    mask |= 1 << s;
                }
                let alloc = (old.bitmap & 0xffff_ffff) & !mask;
                let zero_set = match op {
                    ZeroOp::Discard => backing,
                    ZeroOp::Zero(_) => true,
                };
                let zero = if zero_set { (old.bitmap >> 32) | mask } else { (old.bitmap >> 32) & !mask };
                t.set(&geo, i, L2Entry { word: old.word, bitmap: alloc | (zero << 32) });
                continue;
            }
            let owned_host = old.host_offset(&geo).filter(|_| old.copied() && !old.is_compressed());
            let (new, keep) = match op {
                ZeroOp::Discard => {
                    if geo.extended_l2 {
                        (L2Entry { word: 0, bitmap: if backing { 0xffff_ffff << 32 } else { 0 } }, false)
                    } else if backing && v3 {
                        (L2Entry { word: OFLAG_ZERO, bitmap: 0 }, false)
                    } else {
                        (L2Entry { word: 0, bitmap: 0 }, false)
                    }
                }
                ZeroOp::Zero(mode) => {
                    let keep = mode == ZeroMode::Allocate && owned_host.is_some();
                    if geo.extended_l2 {
                        match (keep, owned_host) {
                            (true, Some(h)) => (L2Entry { word: h | OFLAG_COPIED, bitmap: 0xffff_ffff << 32 }, true),
                            _ => (L2Entry { word: 0, bitmap: 0xffff_ffff << 32 }, false),
                        }
                    } else if !v3 {
                        // v2 without a backing file: unallocated reads zeros.
                        (L2Entry { word: 0, bitmap: 0 }, false)
                    } else {
                        match (keep, owned_host) {
                            (true, Some(h)) => (L2Entry { word: h | OFLAG_COPIED | OFLAG_ZERO, bitmap: 0 }, true),
                            _ => (L2Entry { word: OFLAG_ZERO, bitmap: 0 }, false),
                        }
                    }
                }
            };
            if !keep {
                self.release_entry(&mut a, old, c);
            }
            t.set(&geo, i, new);
        }
        if self.map.read().l2.over_capacity() {
            self.flush_meta(&mut a)?;
        }
        drop(a);
        for (off, len) in deferred {
            self.write_zero_data(off, len)?;
        }
        Ok(stop)
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
        if !lazy && rc_dirty {
            if a.rc.write_blocks(file)? {
                unsynced = true;
            }
            if a.rc.table_dirty {
                file.sync()?;
                file.write_at(&a.rc.table_bytes(), a.rc.table_offset)?;
                a.rc.table_dirty = false;
                unsynced = true;
            }
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
                let mut b = vec![0u8; m.l1.len() * 8];
                for (c, e) in b.chunks_exact_mut(8).zip(&m.l1) {
                    c.copy_from_slice(&e.to_be_bytes());
                }
                (b, self.header.lock().l1_table_offset)
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
        while end_cluster > 1 && freed.binary_search(&(end_cluster - 1)).is_ok() {
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

    /// Writes the cached refcounts (blocks, then a moved table) and syncs:
    /// how lazy refcounts reach the disk.
    pub(crate) fn write_refcounts(&self, a: &mut AllocState) -> Result<()> {
        let file = &*self.file;
        a.rc.write_blocks(file)?;
        if a.rc.table_dirty {
            file.sync()?;
            file.write_at(&a.rc.table_bytes(), a.rc.table_offset)?;
            a.rc.table_dirty = false;
        }
        file.sync()
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
        if self.corrupt.load(std::sync::atomic::Ordering::Acquire) {
            // Nothing more is written to an image found corrupt.
            return Ok(());
        }
        self.flush_impl()?;
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

    /// Writes whole clusters compressed; see [`crate::BlockDevice::write_compressed`].
    pub(crate) fn write_compressed_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let size = self.size();
        check_request(offset, buf.len() as u64, size)?;
        let cs = self.geo.cluster_size();
        if offset % cs != 0 || (buf.len() as u64 % cs != 0 && offset + buf.len() as u64 != size) {
            return Err(Error::invalid_argument(format!(
                "compressed writes must cover whole clusters of {cs} bytes (offset {offset}, length {})",
                buf.len()
            )));
        }
        if self.crypt.is_some() {
            return Err(self.err(Error::unsupported("compressed writes are not supported for encrypted images")));
        }
        if self.geo.data_file {
            return Err(self.err(Error::unsupported("compressed writes are not supported with an external data file")));
        }
        for (k, chunk) in buf.chunks(cs as usize).enumerate() {
            let guest = offset + k as u64 * cs;
            let mut cluster = chunk.to_vec();
            cluster.resize(cs as usize, 0);
            match codec::compress(self.compression.codec(), &cluster, cs as usize - 1)? {
                None => self.write_impl(chunk, guest)?,
                Some(z) => self.link_compressed(guest, &z)?,
            }
        }
        self.maybe_flush_frees()
    }

    fn link_compressed(&self, guest: u64, z: &[u8]) -> Result<()> {
        let geo = self.geo;
        let cb = geo.cluster_bits;
        let c = guest >> cb;
        let l2e = geo.l2_entries();
        let _g = self.gate.enter();
        let a = self.alloc_lock()?;
        let mut a = self.wait_inflight(a, c, c);
        self.mark_dirty_if_lazy(&mut a)?;
        let t = self.l2_for_write(&mut a, c / l2e)?;
        let host = self.alloc_bytes(&mut a, z.len() as u64)?;
        if host > geo.compressed_offset_mask() {
            return Err(Error::limit("compressed data would lie beyond the offsets a descriptor can hold"));
        }
        self.file.write_at(z, host)?;
        let nb = ((host + z.len() as u64 - 1) >> 9) - (host >> 9);
        let word = OFLAG_COMPRESSED | host | (nb << geo.csize_shift());
        let i = (c % l2e) as usize;
        let old = t.get(&geo, i);
        self.release_entry(&mut a, old, c);
        t.set(&geo, i, L2Entry { word, bitmap: 0 });
        a.data_written = true;
        if self.map.read().l2.over_capacity() {
            self.flush_meta(&mut a)?;
        }
        Ok(())
    }

    /// Allocates `len` (< one cluster) bytes for compressed data, packing
    /// them after the previous compressed cluster; each host cluster's
    /// refcount counts the compressed clusters that touch it.
    fn alloc_bytes(&self, a: &mut AllocState, len: u64) -> Result<u64> {
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let cur = a.compressed_next;
        if cur != 0 && cur % cs != 0 {
            let cl = cur / cs;
            let rc = a.rc.get(file, cl)?;
            // A full refcount (narrow widths) starts a new cluster, as QEMU does.
            if rc > 0 && rc < a.rc.max_refcount() {
                let end = cur + len;
                if end <= (cl + 1) * cs {
                    a.rc.add(file, cl, 1)?;
                    a.compressed_next = end;
                    return Ok(cur);
                }
                let next = self.alloc_clusters(a, 1)?;
                if next == (cl + 1) * cs {
                    a.rc.add(file, cl, 1)?;
                    a.compressed_next = end;
                    return Ok(cur);
                }
                a.compressed_next = next + len;
                return Ok(next);
            }
        }
        let c = self.alloc_clusters(a, 1)?;
        a.compressed_next = c + len;
        Ok(c)
    }

    /// Changes the virtual size. Shrinking requires the range beyond the new
    /// size to be unallocated, unless `discard_tail` allows discarding it.
    pub fn resize_with(&self, new_size: u64, discard_tail: bool) -> Result<()> {
        self.check_writable()?;
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid_argument(format!("size {new_size} is too large")));
        }
        let old = self.size();
        if new_size < old {
            if !self.snapshots.read().is_empty() {
                return Err(self.err(Error::unsupported("cannot shrink an image that has internal snapshots")));
            }
            let mut pos = new_size;
            while pos < old {
                let e = crate::device::BlockDevice::map(self, pos, old - pos)?;
                if e.depth == 0 && !matches!(e.kind, crate::device::ExtentKind::Unallocated) {
                    if !discard_tail {
                        return Err(self.err(Error::invalid_argument(format!(
                            "cannot shrink to {new_size} bytes: guest offset {pos:#x} is allocated (ask to discard it)"
                        ))));
                    }
                    break;
                }
                pos += e.length.max(1);
            }
            if discard_tail {
                // Zero the tail of the last kept cluster, then drop the rest.
                let cs = self.geo.cluster_size();
                let cut = new_size.div_ceil(cs) * cs;
                if cut > new_size {
                    self.zero_or_discard(new_size, cut.min(old) - new_size, ZeroOp::Zero(ZeroMode::MayUnmap))?;
                }
                if cut < old {
                    self.discard_all(cut, old - cut)?;
                }
            }
        }
        let a = self.alloc_lock()?;
        let mut a = self.wait_all_inflight(a);
        let needed = self.header.lock().l1_entries_for(new_size);
        if needed > self.map.read().l1.len() as u64 {
            self.grow_l1(&mut a, needed)?;
        }
        // Growing over a longer backing image: the new range must read as
        // zeros, not as the backing image's data (QEMU zero-fills it too).
        // Zeroed and durable before the new size is.
        let backing_end = self.backing.as_ref().map_or(0, |b| b.size());
        let _a = if new_size > old && backing_end > old {
            drop(a);
            let end = new_size.min(backing_end);
            self.zero_or_discard_in(old, end - old, ZeroOp::Zero(ZeroMode::MayUnmap), new_size)?;
            self.flush_impl()?;
            self.wait_all_inflight(self.alloc_lock()?)
        } else {
            a
        };
        let mut h = self.header.lock();
        h.size = new_size;
        self.write_header_locked(&mut h)?;
        drop(h);
        self.file.sync()?;
        self.size.store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Discards every cluster of the range, even without a backing file
    /// (the entries become unallocated).
    fn discard_all(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.gate.enter();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            pos = self.zero_batch(pos, end, ZeroOp::Discard)?;
        }
        Ok(())
    }

    pub(crate) fn wait_all_inflight<'a>(&'a self, mut a: MutexGuard<'a, AllocState>) -> MutexGuard<'a, AllocState> {
        while !a.inflight.is_empty() {
            self.alloc_cv.wait(&mut a);
        }
        a
    }

    /// Replaces the L1 table by one of `needed` entries.
    fn grow_l1(&self, a: &mut AllocState, needed: u64) -> Result<()> {
        if needed > QCOW2_MAX_L1_BYTES / 8 {
            return Err(Error::limit(format!("an L1 table of {needed} entries is too large")));
        }
        // Everything the new table copies must be durable first.
        self.flush_meta(a)?;
        let cs = self.geo.cluster_size();
        let clusters = (needed * 8).div_ceil(cs);
        let off = self.alloc_clusters(a, clusters)?;
        let mut l1 = self.map.read().l1.clone();
        l1.resize(needed as usize, 0);
        let mut bytes = vec![0u8; (clusters * cs) as usize];
        for (c, e) in bytes.chunks_exact_mut(8).zip(&l1) {
            c.copy_from_slice(&e.to_be_bytes());
        }
        let file = &*self.file;
        a.rc.write_blocks(file)?;
        if a.rc.table_dirty {
            file.sync()?;
            file.write_at(&a.rc.table_bytes(), a.rc.table_offset)?;
            a.rc.table_dirty = false;
        }
        file.write_at(&bytes, off)?;
        file.sync()?;
        let (old_off, old_len) = {
            let mut h = self.header.lock();
            let old = (h.l1_table_offset, u64::from(h.l1_size));
            h.l1_table_offset = off;
            h.l1_size = needed as u32;
            self.write_header_locked(&mut h)?;
            old
        };
        file.sync()?;
        self.map.write().l1 = l1;
        {
            let mut r = self.reserved.write();
            r.remove(old_off);
            r.add(off, clusters * cs);
        }
        a.rc.reserved = self.reserved.read().clone();
        if old_len > 0 {
            for c in (old_off / cs)..(old_off / cs + (old_len * 8).div_ceil(cs)) {
                a.rc.add(file, c, -1)?;
            }
        }
        Ok(())
    }

    /// `write_zeroes` entry point.
    pub(crate) fn write_zeroes_impl(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.zero_or_discard(offset, len, ZeroOp::Zero(mode))
    }

    /// `discard` entry point.
    pub(crate) fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, ZeroOp::Discard)
    }

    /// `write_at` entry point.
    pub(crate) fn write_at_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_request(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.write_impl(buf, offset)
    }

    /// What guest cluster `c` maps to now (for tests and tools).
    pub fn cluster_mapping(&self, guest: u64) -> Result<Mapping> {
        Ok(self.lookup(guest, 1)?.0)
    }
}

impl Plan {
    fn action_host(&self) -> u64 {
        match self.action {
            Action::InPlace(h) | Action::New(h) => h,
        }
    }
}
