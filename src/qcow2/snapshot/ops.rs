//! Snapshot operations on an open image: create, apply (revert), delete.
//!
//! Every operation keeps the crash-safe order of the write path: refcounts
//! are raised and durable before a new table points at anything, the header
//! switches to a new snapshot table (or L1 table) in one write, and
//! refcounts drop only after the pointers are gone. A crash leaves either
//! the old or the new snapshot table, and at worst leaked clusters.

use super::table::{encode_table, Snapshot};
use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};
use crate::limits::*;
use crate::qcow2::alloc::AllocState;
use crate::qcow2::alloc::FreeOld;
use crate::qcow2::cluster::L1Ref;
use crate::qcow2::header;
use crate::qcow2::l2::{L2Entry, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::qcow2::table::{self, HeaderTable};
use crate::qcow2::Qcow2;

impl Qcow2 {
    pub(crate) fn find_snapshot(&self, key: &str) -> Result<Snapshot> {
        let snaps = self.snapshots.read();
        snaps
            .iter()
            .find(|s| s.name == key)
            .or_else(|| snaps.iter().find(|s| s.id == key))
            .cloned()
            .ok_or_else(|| self.err(Error::new(ErrorKind::NotFound, format!("no snapshot with name or id '{key}'"))))
    }

    fn check_snapshots_allowed(&self) -> Result<()> {
        if self.geo.data_file {
            return Err(self.err(Error::unsupported("internal snapshots are not supported with an external data file")));
        }
        Ok(())
    }

    /// Fails, changing nothing, when one more reference through `l1`
    /// would overflow a refcount (narrow refcount widths hold few
    /// snapshots; 1-bit refcounts none).
    fn check_refcount_room(&self, a: &mut AllocState, l1: L1Ref<'_>) -> Result<()> {
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let geo = self.geo;
        let max = a.rc.max_refcount();
        let bits = 1u32 << a.rc.order;
        let mut compressed: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        // A cluster beyond what the refcount table covers has no
        // refcount to raise: metadata pointing there is corrupt.
        let covered = |rc: &crate::qcow2::refcount::Refcounts, c: u64| -> Result<()> {
            if rc.covers(c) {
                return Ok(());
            }
            Err(self.mark_corrupt(
                Error::corrupt(format!(
                    "a snapshot would reference cluster {c}, which the refcount table does not cover"
                ))
                .with_offset(c.saturating_mul(cs)),
            ))
        };
        let full = |c: u64, rc: u64, n: u64| -> Result<()> {
            if rc.saturating_add(n) > max {
                return Err(self.err(Error::limit(format!(
                    "cluster {c} already has {rc} references: {bits}-bit refcounts cannot hold another snapshot"
                ))));
            }
            Ok(())
        };
        for (i, &l1e) in l1.entries.iter().enumerate() {
            self.check_l1(Some(l1), l1e, i as u64)?;
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            covered(&a.rc, l2_off / cs)?;
            full(l2_off / cs, a.rc.get(file, l2_off / cs)?, 1)?;
            let t = self.load_l2(l2_off)?;
            for i in 0..t.len(&geo) {
                let e = t.get(&geo, i);
                if e.is_compressed() {
                    let (host, len) = e.compressed(&geo);
                    for c in host / cs..=(host + len - 1) / cs {
                        *compressed.entry(c).or_default() += 1;
                    }
                } else if let Some(h) = e.host_offset(&geo) {
                    covered(&a.rc, h / cs)?;
                    full(h / cs, a.rc.get(file, h / cs)?, 1)?;
                }
            }
        }
        for (c, n) in compressed {
            covered(&a.rc, c)?;
            full(c, a.rc.get(file, c)?, n)?;
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of every L2 table and host cluster
    /// `l1` reaches. Increments apply at once; decrements are queued.
    fn l1_refs(&self, a: &mut AllocState, l1: L1Ref<'_>, delta: i64) -> Result<()> {
        if delta > 0 {
            self.check_refcount_room(a, l1)?;
        }
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let geo = self.geo;
        for (i, &l1e) in l1.entries.iter().enumerate() {
            self.check_l1(Some(l1), l1e, i as u64)?;
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if l2_off & (cs - 1) != 0 {
                return Err(
                    self.mark_corrupt(Error::corrupt(format!("L2 table offset {l2_off:#x} is not cluster aligned")))
                );
            }
            let t = self.load_l2(l2_off)?;
            let mut clusters = Vec::new();
            for i in 0..t.len(&geo) {
                let e = t.get(&geo, i);
                if e.is_compressed() {
                    let (host, len) = e.compressed(&geo);
                    clusters.extend(host / cs..=(host + len - 1) / cs);
                } else if let Some(h) = e.host_offset(&geo) {
                    clusters.push(h / cs);
                }
            }
            clusters.push(l2_off / cs);
            for c in clusters {
                if delta > 0 {
                    a.rc.add(file, c, delta)?;
                } else {
                    for _ in 0..delta.unsigned_abs() {
                        a.pending.push(c);
                    }
                }
            }
            if self.map.read().l2.over_capacity() {
                self.flush_meta(a)?;
            }
        }
        Ok(())
    }

    /// Sets the COPIED flag of every active L1 and L2 entry to
    /// "refcount is one", as the spec requires.
    fn fix_active_copied(&self, a: &mut AllocState) -> Result<()> {
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let geo = self.geo;
        let l1 = self.map.read().l1.clone();
        for (i, &l1e) in l1.iter().enumerate() {
            self.check_l1(None, l1e, i as u64)?;
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let want = a.rc.get(file, l2_off / cs)? == 1;
            if want != (l1e & OFLAG_COPIED != 0) {
                let mut m = self.map.write();
                if let Some(e) = m.l1.get_mut(i) {
                    *e = if want { l1e | OFLAG_COPIED } else { l1e & !OFLAG_COPIED };
                }
                a.l1_dirty = true;
            }
            let t = self.load_l2(l2_off)?;
            for j in 0..t.len(&geo) {
                let e = t.get(&geo, j);
                if e.word & OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let Some(h) = e.host_offset(&geo) else {
                    continue;
                };
                let want = a.rc.get(file, h / cs)? == 1;
                if want != e.copied() {
                    let word = if want { e.word | OFLAG_COPIED } else { e.word & !OFLAG_COPIED };
                    t.set(&geo, j, L2Entry { word, bitmap: e.bitmap });
                }
            }
            if self.map.read().l2.over_capacity() {
                self.flush_meta(a)?;
            }
        }
        Ok(())
    }

    /// Writes `snaps` as a new snapshot table and switches the header to
    /// it; the old table's clusters are freed after the next flush.
    fn write_snapshot_table(&self, a: &mut AllocState, snaps: Vec<Snapshot>) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut bytes = encode_table(&snaps);
        if bytes.len() as u64 > QCOW2_MAX_SNAPSHOTS_BYTES {
            return Err(Error::limit("the snapshot table would be larger than 64 MiB"));
        }
        let new_off = if snaps.is_empty() {
            0
        } else {
            let clusters = (bytes.len() as u64).div_ceil(cs);
            bytes.resize((clusters * cs) as usize, 0);
            self.alloc_clusters(a, clusters)?
        };
        // Whatever the new entries point at is durable first.
        self.flush_meta(a)?;
        let n = snaps.len() as u32;
        self.swap_table(
            a,
            HeaderTable::Snapshots,
            new_off,
            &bytes,
            |h| {
                h.snapshots_offset = new_off;
                h.nb_snapshots = n;
            },
            FreeOld::AfterFlush,
        )?;
        self.reserved.write().set_snapshot_l1s(&snaps);
        *self.snapshots.write() = snaps;
        Ok(())
    }

    /// Runs a snapshot operation with the dirty bit set (v3): the
    /// COPIED flags and refcounts it changes live in different clusters,
    /// so a crash in the middle can leave them disagreeing. The dirty
    /// bit tells vdisk and QEMU to rebuild refcounts and flags when the
    /// image is next opened read-write.
    fn snapshot_transaction(&self, op: impl FnOnce() -> Result<()>) -> Result<()> {
        self.check_writable()?;
        let set = {
            let mut h = self.header.lock();
            if h.version == 3 && h.incompatible_features & header::INCOMPAT_DIRTY == 0 {
                h.incompatible_features |= header::INCOMPAT_DIRTY;
                self.write_header_locked(&mut h)?;
                drop(h);
                self.file.sync()?;
                true
            } else {
                false
            }
        };
        op()?;
        // (The guard of the condition is dropped before the block runs.)
        if set && !self.alloc_lock()?.marked_dirty {
            self.flush_impl()?;
            // Decided again under the allocation lock, held while the bit is
            // cleared: a lazy-refcount write that started in between owns
            // the dirty bit now and keeps it set.
            let a = self.alloc_lock()?;
            if !a.marked_dirty {
                let mut h = self.header.lock();
                h.incompatible_features &= !header::INCOMPAT_DIRTY;
                self.write_header_locked(&mut h)?;
                drop(h);
                self.file.sync()?;
            }
        }
        Ok(())
    }

    /// Creates an internal snapshot of the current state named `name`
    /// (`qemu-img snapshot -c`).
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        self.snapshot_transaction(|| self.snapshot_create_inner(name))
    }

    fn snapshot_create_inner(&self, name: &str) -> Result<()> {
        self.check_snapshots_allowed()?;
        if name.is_empty() || name.len() > u16::MAX as usize {
            return Err(Error::invalid_argument("a snapshot name must be 1 to 65535 bytes long"));
        }
        let mut snaps = self.snapshots.read().clone();
        if snaps.iter().any(|s| s.name == name) {
            return Err(
                self.err(Error::new(ErrorKind::AlreadyExists, format!("a snapshot named '{name}' already exists")))
            );
        }
        if snaps.len() as u32 >= QCOW2_MAX_SNAPSHOTS {
            return Err(self.err(Error::limit("the image already has the most snapshots allowed (65536)")));
        }
        let id = (1..).map(|n: u64| n.to_string()).find(|id| !snaps.iter().any(|s| &s.id == id)).unwrap_or_default();
        let a = self.alloc_lock()?;
        let mut a = self.wait_all_inflight(a);
        self.flush_meta(&mut a)?;
        let cs = self.geo.cluster_size();
        let l1 = self.map.read().l1.clone();
        // 1. Everything the active L1 reaches gets one more reference.
        let l1_table = self.header.lock().l1_table_offset;
        self.l1_refs(&mut a, L1Ref { entries: &l1, offset: l1_table }, 1)?;
        // 2. Shared now: no COPIED flags; durable with the refcounts.
        self.fix_active_copied(&mut a)?;
        self.flush_meta(&mut a)?;
        a.rc.write_blocks(&*self.file)?;
        // 3. The snapshot's copy of the L1 table.
        let l1_clusters = (l1.len() as u64 * 8).div_ceil(cs).max(1);
        let l1_off = self.alloc_clusters(&mut a, l1_clusters)?;
        let bytes = table::encode(l1.iter().map(|e| e & !OFLAG_COPIED), (l1_clusters * cs) as usize);
        self.file.write_at(&bytes, l1_off)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        snaps.push(Snapshot {
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            id,
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size()),
            icount: Some(0),
            unknown_extra: Vec::new(),
        });
        // 4. The new table, then the header.
        self.write_snapshot_table(&mut a, snaps)?;
        drop(a);
        self.flush_impl()
    }

    /// Deletes the snapshot named (or with id) `key` (`qemu-img snapshot -d`).
    pub fn snapshot_delete(&self, key: &str) -> Result<()> {
        self.snapshot_transaction(|| self.snapshot_delete_inner(key))
    }

    fn snapshot_delete_inner(&self, key: &str) -> Result<()> {
        let snap = self.find_snapshot(key)?;
        {
            let a = self.alloc_lock()?;
            let mut a = self.wait_all_inflight(a);
            self.flush_meta(&mut a)?;
            let snaps: Vec<Snapshot> = self.snapshots.read().iter().filter(|s| s.id != snap.id).cloned().collect();
            // The table without the entry is durable first ...
            self.write_snapshot_table(&mut a, snaps)?;
            // ... then the snapshot's references go (queued frees).
            let l1 =
                table::read_u64_table(&*self.file, snap.l1_table_offset, snap.l1_size as usize, "snapshot L1 table")?;
            self.l1_refs(&mut a, L1Ref { entries: &l1, offset: snap.l1_table_offset }, -1)?;
            let cs = self.geo.cluster_size();
            let first = snap.l1_table_offset / cs;
            for c in first..first + (u64::from(snap.l1_size) * 8).div_ceil(cs).max(1) {
                a.pending.push(c);
            }
        }
        // Apply the frees, then give clusters now owned alone their
        // COPIED flag back.
        self.flush_impl()?;
        let mut a = self.alloc_lock()?;
        self.fix_active_copied(&mut a)?;
        self.flush_meta(&mut a)
    }

    /// Makes the snapshot named (or with id) `key` the current state
    /// (`qemu-img snapshot -a`). The current state is lost unless another
    /// snapshot keeps it.
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        // The guest's whole disk changes: every enabled bitmap says so.
        self.find_snapshot(key)?;
        self.track_everything()?;
        self.snapshot_transaction(|| self.snapshot_apply_inner(key))?;
        self.resize_bitmaps(self.size());
        Ok(())
    }

    fn snapshot_apply_inner(&self, key: &str) -> Result<()> {
        let snap = self.find_snapshot(key)?;
        let a = self.alloc_lock()?;
        let mut a = self.wait_all_inflight(a);
        self.flush_meta(&mut a)?;
        let file = &*self.file;
        let cs = self.geo.cluster_size();
        let snap_l1 = table::read_u64_table(file, snap.l1_table_offset, snap.l1_size as usize, "snapshot L1 table")?;
        let new_size = snap.disk_size.unwrap_or_else(|| self.size());
        let needed = self.header.lock().l1_entries_for(new_size).max(snap_l1.len() as u64);
        if needed > QCOW2_MAX_L1_BYTES / 8 {
            return Err(Error::limit("the snapshot's L1 table is too large"));
        }
        // 1. The snapshot's tables and clusters get the active state's
        //    reference.
        self.l1_refs(&mut a, L1Ref { entries: &snap_l1, offset: snap.l1_table_offset }, 1)?;
        self.flush_meta(&mut a)?;
        // 2. A new active L1 table with the snapshot's entries (shared,
        //    so without COPIED), which the header switches to in one write
        //    (with the snapshot's size); the old one is freed after the
        //    next flush.
        let mut l1: Vec<u64> = snap_l1.iter().map(|e| e & !OFLAG_COPIED).collect();
        l1.resize(needed as usize, 0);
        let l1_clusters = (needed * 8).div_ceil(cs).max(1);
        let l1_off = self.alloc_clusters(&mut a, l1_clusters)?;
        let bytes = table::encode(l1.iter().copied(), (l1_clusters * cs) as usize);
        let old_l1_table = self.header.lock().l1_table_offset;
        self.swap_table(
            &mut a,
            HeaderTable::L1,
            l1_off,
            &bytes,
            |h| {
                h.l1_table_offset = l1_off;
                h.l1_size = needed as u32;
                h.size = new_size;
            },
            FreeOld::AfterFlush,
        )?;
        // 3. The old active state's references go.
        let old_l1 = std::mem::replace(&mut self.map.write().l1, l1);
        self.size.store(new_size, std::sync::atomic::Ordering::Release);
        self.l1_refs(&mut a, L1Ref { entries: &old_l1, offset: old_l1_table }, -1)?;
        drop(a);
        self.zcache.clear();
        self.flush_impl()?;
        let mut a = self.alloc_lock()?;
        self.fix_active_copied(&mut a)?;
        self.flush_meta(&mut a)
    }
}
