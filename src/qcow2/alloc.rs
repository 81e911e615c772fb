//! Host cluster allocation: the state behind the allocation lock, the
//! allocator over the refcount structures, growing the refcount table, and
//! the guest clusters in flight.
//!
//! Refcounts are raised (in the refcount cache) before anything points at
//! a new cluster and reach the disk before the pointer does (see `flush.rs`);
//! a pointer removed queues its cluster's decrement in
//! [`AllocState::pending`], applied once the removal is durable.

use parking_lot::MutexGuard;

use super::header::Header;
use super::l2::L2Entry;
use super::refcount::Refcounts;
use super::table::HeaderTable;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::limits::*;

/// State behind the allocation lock.
#[derive(Debug)]
pub(crate) struct AllocState {
    /// Refcount table and block cache.
    pub(crate) rc: Refcounts,
    /// Host clusters whose refcount drops by one once the pointers removed
    /// since the last flush are durable (one entry per reference).
    pub(crate) pending: Vec<u64>,
    /// Guest byte ranges of an external data file to punch after the flush.
    pub(crate) pending_punch: Vec<(u64, u64)>,
    /// Guest clusters being allocated by some request.
    pub(crate) inflight: InFlight,
    /// The in-memory L1 table differs from the disk.
    pub(crate) l1_dirty: bool,
    /// Guest data was written since the last sync.
    pub(crate) data_written: bool,
    /// Next free byte for compressed data (0: start a new cluster).
    pub(crate) compressed_next: u64,
    /// One past the highest cluster allocated in this session.
    pub(crate) alloc_end: u64,
    /// The image file's length when it was opened. With `alloc_end` it
    /// bounds the file's length from above (the file grows only into
    /// clusters this session allocated), which lets an allocating write
    /// know that its new cluster lies past the end, and reads as zeros,
    /// without an `fstat` (see [`AllocState::eof_bound`]).
    pub(crate) len_at_open: u64,
    /// Lazy refcounts: refcounts are written only on close.
    pub(crate) lazy: bool,
    /// The dirty bit was set on disk in this session (lazy refcounts).
    pub(crate) marked_dirty: bool,
}

/// The guest clusters allocating requests are writing, as one range per
/// request: a request plans a contiguous run of clusters, and waits (under
/// the allocation lock) until no other request's range meets its own before
/// inserting it, so the ranges never overlap. A handful of ranges at most
/// (one per request in flight): a scan beats hashing every cluster, and a
/// request of 512 clusters checks its range once, not cluster by cluster.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    /// Inclusive ranges `(first, last)` of guest cluster indexes.
    ranges: Vec<(u64, u64)>,
}

impl InFlight {
    /// Whether some request in flight writes a cluster of `[c0, c1]`.
    pub(crate) fn meets(&self, c0: u64, c1: u64) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= c1 && c0 <= b)
    }

    /// Marks `[c0, c1]` in flight; it must not meet a range in flight.
    pub(crate) fn insert(&mut self, c0: u64, c1: u64) {
        debug_assert!(!self.meets(c0, c1), "in-flight ranges overlap");
        self.ranges.push((c0, c1));
    }

    /// Ends the request that inserted `[c0, c1]`.
    pub(crate) fn remove(&mut self, c0: u64, c1: u64) {
        if let Some(i) = self.ranges.iter().position(|&r| r == (c0, c1)) {
            self.ranges.swap_remove(i);
        }
    }

    /// Whether no request is in flight.
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

impl AllocState {
    /// An upper bound of the image file's length: nothing this session
    /// wrote or will write lies past it except in clusters allocated after
    /// this call. Truncation only lowers the real length.
    pub(crate) fn eof_bound(&self, cluster_bits: u32) -> u64 {
        self.len_at_open.max(self.alloc_end << cluster_bits)
    }
}

impl Qcow2 {
    pub(crate) fn alloc_lock(&self) -> Result<MutexGuard<'_, AllocState>> {
        match &self.alloc {
            Some(a) => Ok(a.lock()),
            None => Err(self.err(Error::read_only("write"))),
        }
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
        // In use from now on, so inside the bound of the file's length.
        a.alloc_end = a.alloc_end.max(c + 1);
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
        a.rc.table = table;
        a.rc.table_offset = e_start * cs;
        a.rc.table_clusters = tc as u32;
        for c in e_start..area_end {
            a.rc.add(file, c, 1)?;
        }
        a.alloc_end = a.alloc_end.max(area_end);
        // The swap writes the new table (and the blocks before it).
        a.rc.table_dirty = false;
        let (offset, clusters) = (a.rc.table_offset, a.rc.table_clusters);
        let bytes = a.rc.table_bytes();
        self.swap_table(
            a,
            HeaderTable::Refcount,
            offset,
            &bytes,
            |h| {
                h.refcount_table_offset = offset;
                h.refcount_table_clusters = clusters;
            },
            FreeOld::Now,
        )
    }

    /// Queues the release of whatever host storage `e` references.
    pub(crate) fn release_entry(&self, a: &mut AllocState, e: L2Entry, guest_cluster: u64) {
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

    /// Waits until none of the guest clusters `[c0, c1]` is in flight.
    pub(crate) fn wait_inflight<'a>(
        &'a self,
        mut a: MutexGuard<'a, AllocState>,
        c0: u64,
        c1: u64,
    ) -> MutexGuard<'a, AllocState> {
        while a.inflight.meets(c0, c1) {
            self.alloc_cv.wait(&mut a);
        }
        a
    }

    pub(crate) fn wait_all_inflight<'a>(&'a self, mut a: MutexGuard<'a, AllocState>) -> MutexGuard<'a, AllocState> {
        while !a.inflight.is_empty() {
            self.alloc_cv.wait(&mut a);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::InFlight;

    #[test]
    fn in_flight_ranges() {
        let mut f = InFlight::default();
        assert!(f.is_empty());
        f.insert(10, 12);
        f.insert(20, 20);
        for (c0, c1, meets) in [
            (0, 9, false),
            (0, 10, true),
            (12, 15, true),
            (13, 19, false),
            (20, 20, true),
            (21, 99, false),
            (5, 30, true),
        ] {
            assert_eq!(f.meets(c0, c1), meets, "[{c0}, {c1}]");
        }
        // Removing a range that is not in flight changes nothing.
        f.remove(10, 11);
        assert!(f.meets(11, 11));
        f.remove(10, 12);
        assert!(!f.meets(0, 19));
        assert!(f.meets(20, 20));
        f.remove(20, 20);
        assert!(f.is_empty());
    }
}

/// What becomes of the clusters of a table once the header no longer
/// points at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FreeOld {
    /// Their refcounts drop now: nothing but the header pointed at them.
    Now,
    /// Their refcounts drop after the next flush (queued frees), once no
    /// request can still be using them.
    AfterFlush,
    /// They were never counted (refcounts rebuilt from the references).
    Never,
}

impl Qcow2 {
    /// Replaces table `t` by `bytes` (the whole table, padded or not) at
    /// host offset `offset`, which the caller allocated; `switch` points
    /// the header at it. In the one order that survives a crash:
    ///
    /// 1. the refcounts raised so far (those of the new table and of
    ///    whatever it points at) reach the disk, blocks before a changed
    ///    refcount table;
    /// 2. the new table is written and synced;
    /// 3. the header switches to it in one write, synced;
    /// 4. the reserved ranges follow the header;
    /// 5. the old table's clusters are freed as `free` says.
    ///
    /// A crash before step 3 leaves the old table in use and the new one
    /// leaked; after it, the new table in use and at worst the old one
    /// leaked. An empty `bytes` (no snapshots left) writes no table.
    pub(crate) fn swap_table(
        &self,
        a: &mut AllocState,
        t: HeaderTable,
        offset: u64,
        bytes: &[u8],
        switch: impl FnOnce(&mut Header),
        free: FreeOld,
    ) -> Result<()> {
        let file = &*self.file;
        self.store_refcounts(a)?;
        if !bytes.is_empty() {
            file.write_at(bytes, offset)?;
        }
        file.sync()?;
        {
            let mut h = self.header.lock();
            switch(&mut h);
            self.write_header_locked(&mut h)?;
        }
        file.sync()?;
        let old = {
            let mut r = self.reserved.write();
            let old = r.clusters(t);
            r.set(t, offset, bytes.len() as u64);
            old
        };
        match free {
            FreeOld::Now => {
                for c in old {
                    a.rc.add(file, c, -1)?;
                }
            }
            FreeOld::AfterFlush => a.pending.extend(old),
            FreeOld::Never => {}
        }
        Ok(())
    }
}
