//! The write path: overwrites in place, and allocating writes with
//! copy-on-write of partly written clusters.
//!
//! # Concurrency
//!
//! Overwrites of clusters the image owns (COPIED) go straight to the data
//! file without any lock. An allocating write takes the allocation lock
//! twice. The first time it looks its L2 table up (once: the table is
//! allocated or copied if the image does not own it), plans every cluster
//! from the entries, reserves host clusters (refcounts raised) and marks
//! the guest clusters in flight (one range per request); then it releases
//! the lock for the
//! copy-on-write reads and the data write. The second time it links the
//! new clusters into the same table, after checking, under the mapping
//! lock, that the table is still the cached one its L1 entry names (a
//! flush may have written and evicted it meanwhile; only then does it look
//! the table up again, and links under the mapping lock all the same, so
//! a table just read back, clean, cannot be evicted between the look and
//! the link). A reader never sees a mapping before its data.
//! Other writers of an in-flight cluster wait on a condition variable.

use std::sync::Arc;

use super::alloc::AllocState;
use super::flush::frees_due;
use super::l2::{L2Entry, L2Table, OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS};
use super::{crypt, Qcow2};
use crate::device::{check_request, BlockDevice};
use crate::error::Result;

/// Most guest clusters one allocating request handles at once.
const MAX_BATCH: u64 = 512;

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

impl Qcow2 {
    /// `write_at` entry point.
    pub(crate) fn write_at_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_request(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.track_write(offset, buf.len() as u64)?;
        self.write_impl(buf, offset)
    }

    /// Writes `buf` at guest `offset`; the range was checked.
    pub(crate) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        // Set when an allocating write queued more frees than a flush
        // should wait for (only allocating writes queue frees).
        let mut frees_due = false;
        {
            let _g = self.enter_active()?;
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
                let (n, due) = self.write_slow(&buf[pos..], guest)?;
                frees_due |= due;
                pos += n as usize;
            }
        }
        if frees_due {
            self.flush_impl()?;
        }
        Ok(())
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

    /// Handles the allocating part of a write starting at `guest`, at most
    /// up to the end of its L2 table. Returns the bytes written, and whether
    /// the frees it queued call for a flush.
    fn write_slow(&self, buf: &[u8], guest: u64) -> Result<(u64, bool)> {
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
        let mut plan_buf = Plans::new();
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
            plan_buf.push(Plan { c, old, ws, we, action, fresh: false });
        }
        let plans = plan_buf.as_mut_slice();
        if allocs > 0 {
            // Clusters at or past this bound lie past the end of the file
            // and read as zeros (asked before the allocation moves it).
            let eof = a.eof_bound(geo.cluster_bits);
            let mut host = self.alloc_clusters(&mut a, allocs)?;
            for p in plans.iter_mut() {
                if p.action == Action::New(0) {
                    p.action = Action::New(host);
                    p.fresh = host >= eof;
                    host += cs;
                }
            }
        }
        a.inflight.insert(c0, c_last);
        drop(a);
        let plans = &*plans;

        let result = self.write_plans(plans, buf, guest);

        let mut a = self.alloc_lock()?;
        a.inflight.remove(c0, c_last);
        self.alloc_cv.notify_all();
        if let Err(e) = result {
            // Nothing points at the new clusters yet: give them back.
            if !geo.data_file {
                for p in plans {
                    if let Action::New(h) = p.action {
                        let _ = a.rc.add(&*self.file, h / cs, -1);
                    }
                }
            }

            return Err(e);
        }
        let link = |a: &mut AllocState, t: &L2Table| {
            for p in plans {
                if let Action::New(_) = p.action {
                    self.release_entry(a, p.old, p.c);
                }
                t.set(&geo, (p.c % l2e) as usize, self.new_entry(p));
            }
        };
        // The planned table, if it is still the cached one the L1 entry
        // names: checked and changed under the mapping lock, which keeps
        // the cache from evicting it in between.
        let is_current = |m: &super::MapState, t: &Arc<L2Table>| {
            m.l1.get(l1_index as usize).is_some_and(|&e| e & OFFSET_MASK == t.offset && e & OFLAG_COPIED != 0)
                && m.l2.get(t.offset).is_some_and(|c| Arc::ptr_eq(c, t))
        };
        let (linked, over) = {
            let m = self.map.read();
            let current = is_current(&m, &t);
            if current {
                link(&mut a, &t);
            }
            (current, m.l2.over_capacity())
        };
        drop(t);
        let over = if linked {
            over
        } else {
            // The table left the cache: look it up again and link under
            // the mapping lock too. A table just read back from the disk is
            // clean, and a reader's insert could evict it between the look
            // and the link; the entries would then go into a copy nothing
            // writes (the write lost at the next open, its cluster leaked).
            loop {
                let t = self.l2_for_write(&mut a, l1_index)?;
                let m = self.map.read();
                if is_current(&m, &t) {
                    link(&mut a, &t);
                    break m.l2.over_capacity();
                }
            }
        };
        a.data_written = true;
        if over {
            self.flush_meta(&mut a)?;
        }
        Ok((end - guest, frees_due(&a)))
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
        if !p.ws.is_multiple_of(sg) {
            partial |= 1 << first;
        }
        if !p.we.is_multiple_of(sg) {
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
    fn cow_source(&self, c: u64) -> Result<crate::storage::Aligned> {
        let cs = self.geo.cluster_size();
        let mut buf = crate::storage::Aligned::new(cs as usize);
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
}

/// The plans of one request: a single cluster (the common allocating
/// write) without a heap allocation, more in a vector.
enum Plans {
    One(Option<Plan>),
    Many(Vec<Plan>),
}

impl Plans {
    fn new() -> Self {
        Plans::One(None)
    }

    fn push(&mut self, p: Plan) {
        match self {
            Plans::One(slot @ None) => *slot = Some(p),
            Plans::One(Some(first)) => *self = Plans::Many(vec![*first, p]),
            Plans::Many(v) => v.push(p),
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Plan] {
        match self {
            Plans::One(slot) => slot.as_mut_slice(),
            Plans::Many(v) => v,
        }
    }
}

impl Plan {
    fn action_host(&self) -> u64 {
        match self.action {
            Action::InPlace(h) | Action::New(h) => h,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::check::Repair;
    use super::super::create::CreateOptions;
    use super::super::{Qcow2, Qcow2Options};
    use crate::device::BlockDevice;
    use crate::error::Result;
    use crate::storage::{MemStorage, Storage};

    /// Memory whose whole-cluster writes (guest data) take a while, so that
    /// other threads run between an allocating write's plan and its link.
    #[derive(Debug, Default)]
    struct SlowData(MemStorage);

    impl Storage for SlowData {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            if buf.len() == 512 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            self.0.write_at(buf, offset)
        }
        fn len(&self) -> Result<u64> {
            self.0.len()
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.0.set_len(len)
        }
        fn sync(&self) -> Result<()> {
            self.0.sync()
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    /// A table found in the cache (a read loaded it) is still checked
    /// against the image's fixed metadata before the first write changes
    /// it: an L1 entry pointing at the refcount table must not let a write
    /// store L2 entries over it.
    #[test]
    fn cached_table_inside_metadata_is_refused_for_writes() {
        let m = Arc::new(MemStorage::new());
        let o = CreateOptions::new(4 << 20);
        let q = Qcow2::create(m.clone(), &o, Qcow2Options::default()).unwrap();
        q.write_at(&[7u8; 512], 0).unwrap();
        let h = q.header();
        q.close().unwrap();
        // L1 entry 0 -> the refcount table's cluster, marked COPIED.
        let bad = h.refcount_table_offset | (1 << 63);
        m.write_at(&bad.to_be_bytes(), h.l1_table_offset).unwrap();
        let reftable_before = {
            let mut b = vec![0u8; 512];
            m.read_at(&mut b, h.refcount_table_offset).unwrap();
            b
        };
        let q = Qcow2::open(m.clone(), Qcow2Options::default()).unwrap();
        // The read loads the "table" into the cache (its entries, refcount
        // block offsets, look like plain unowned clusters).
        let mut buf = vec![0u8; 512];
        q.read_at(&mut buf, 0).unwrap();
        let e = q.write_at(&[1u8; 512], 5 * 65536).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
        drop(q);
        let mut after = vec![0u8; 512];
        m.read_at(&mut after, h.refcount_table_offset).unwrap();
        assert_eq!(after, reftable_before, "the refcount table was written over");
    }

    /// Allocating writes link into the table they planned with, unless it
    /// left the cache meanwhile. With a cache of two tables, threads that
    /// share tables, reads that load other tables and flushes that make
    /// tables clean evict planned tables between plan and link; every
    /// write must still land, and the metadata stay consistent.
    #[test]
    fn allocating_writes_survive_evictions_between_plan_and_link() {
        let m: Arc<dyn Storage> = Arc::new(SlowData::default());
        let mut o = CreateOptions::new(4 << 20);
        // 512-byte clusters: an L2 table maps 32 KiB, the disk 128 tables.
        o.cluster_size = 512;
        let opts = Qcow2Options { l2_cache_bytes: Some(1024), ..Qcow2Options::default() };
        let q = Arc::new(Qcow2::create(m.clone(), &o, opts.clone()).unwrap());
        let threads = 4u64;
        let clusters = (4u64 << 20) / 512;
        let written: std::collections::HashSet<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|k| {
                    let q = q.clone();
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ k;
                        let mut buf = vec![0u8; 512];
                        for step in 0..400u64 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            // Thread k owns the clusters c with c % threads == k.
                            let c = (x % (clusters / threads)) * threads + k;
                            buf.fill((c % 251) as u8 + 1);
                            q.write_at(&buf, c * 512).unwrap();
                            mine.push(c);
                            let other = (x >> 32) % clusters;
                            q.read_at(&mut buf, other * 512).unwrap();
                            if step % 97 == 0 {
                                q.flush().unwrap();
                            }
                        }
                        mine
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let check = |q: &Qcow2| {
            let mut buf = vec![0u8; 512];
            for c in 0..clusters {
                q.read_at(&mut buf, c * 512).unwrap();
                let want = if written.contains(&c) { (c % 251) as u8 + 1 } else { 0 };
                assert!(buf.iter().all(|&b| b == want), "cluster {c} holds {}, not {want}", buf[0]);
            }
            let r = q.check(Repair::None).unwrap();
            assert!(r.is_clean(), "{r:?}");
        };
        check(&q);
        Arc::try_unwrap(q).unwrap().close().unwrap();
        check(&Qcow2::open(m, opts).unwrap());
    }
}
