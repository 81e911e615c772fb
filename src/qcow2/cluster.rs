//! Guest-to-host mapping: L1 entry, L2 table (through the cache), L2
//! entry, and the contiguous run a lookup describes.
//!
//! Spec: `docs/interop/qcow2.txt`, "Cluster mapping". Lookups take the
//! mapping lock shared; a table missing from the cache is read with no lock
//! held and inserted unless the cache evicted something meanwhile (then the
//! lookup starts over). Writers get the table they may change through
//! [`Qcow2::l2_for_write`], which allocates or copies it so the image owns
//! it alone.

use std::sync::Arc;

use super::alloc::AllocState;
use super::l2::{check_l1_entry, L2Table, Mapping, L1E_RESERVED_MASK, OFFSET_MASK, OFLAG_COPIED};
use super::Qcow2;
use crate::error::{Error, Result};

/// An L1 table: its entries and where it lies (for messages). Lookups go
/// through the active one unless given a snapshot's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct L1Ref<'a> {
    /// The entries (native byte order).
    pub(crate) entries: &'a [u64],
    /// Host offset of the table.
    pub(crate) offset: u64,
}

impl Qcow2 {
    /// Loads (or finds in the cache) the L2 table at `l2_off` and runs `f`
    /// on it while the mapping lock is held shared.
    pub(crate) fn with_l2<T>(&self, l1_index: u64, f: impl Fn(Option<&L2Table>) -> Result<T>) -> Result<T> {
        self.with_l2_in(None, l1_index, f)
    }

    /// Refuses L1 entry `l1e` (index `l1_index` of the active table, or of
    /// `snap`) when it has reserved bits set.
    pub(crate) fn check_l1(&self, snap: Option<L1Ref<'_>>, l1e: u64, l1_index: u64) -> Result<()> {
        if l1e & L1E_RESERVED_MASK == 0 {
            return Ok(());
        }
        let table = match snap {
            Some(t) => t.offset,
            None => self.header.lock().l1_table_offset,
        };
        check_l1_entry(l1e, l1_index, table).map_err(|e| self.err(e))
    }

    /// [`with_l2`](Self::with_l2) over the active L1 table (`snap` None) or
    /// a snapshot's L1 table.
    fn with_l2_in<T>(
        &self,
        snap: Option<L1Ref<'_>>,
        l1_index: u64,
        f: impl Fn(Option<&L2Table>) -> Result<T>,
    ) -> Result<T> {
        loop {
            let st = self.map.read();
            let l1e = match snap {
                None => st.l1.get(l1_index as usize).copied().unwrap_or(0),
                Some(t) => t.entries.get(l1_index as usize).copied().unwrap_or(0),
            };
            self.check_l1(snap, l1e, l1_index)?;
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                return f(None);
            }
            if l2_off & (self.geo.cluster_size() - 1) != 0 {
                return Err(self.err(
                    Error::corrupt(format!(
                        "L2 table offset {l2_off:#x} in L1 entry {l1_index} is not cluster aligned"
                    ))
                    .with_offset(l2_off),
                ));
            }
            if let Some(t) = st.l2.get(l2_off) {
                return f(Some(t));
            }
            let generation = st.l2.generation();
            drop(st);
            let mut buf = vec![0u8; self.geo.cluster_size() as usize];
            self.file.read_at(&mut buf, l2_off)?;
            let table = L2Table::from_bytes(l2_off, &buf);
            if self.alloc.is_some() {
                self.validate_l2(&table)?;
            }
            table.detect_linear(&self.geo);
            let mut st = self.map.write();
            if st.l2.generation() == generation {
                let t = st.l2.insert(table);
                return f(Some(&t));
            }
        }
    }

    /// What the guest range starting at `guest` maps to, and for how many
    /// bytes (at least 1, at most `max`) that mapping continues contiguously.
    /// For `Data` the host offset is that of `guest` itself.
    pub(crate) fn lookup(&self, guest: u64, max: u64) -> Result<(Mapping, u64)> {
        self.lookup_in(None, guest, max)
    }

    /// [`lookup`](Self::lookup) in the active state or a snapshot.
    pub(crate) fn lookup_in(&self, snap: Option<L1Ref<'_>>, guest: u64, max: u64) -> Result<(Mapping, u64)> {
        let geo = &self.geo;
        let cb = geo.cluster_bits;
        let gb = geo.granule_bits();
        let cidx = guest >> cb;
        let l2e = geo.l2_entries();
        let l1_index = cidx / l2e;
        let table_end = (l1_index + 1).saturating_mul(geo.l2_span());
        let limit = guest.saturating_add(max).min(table_end);
        self.with_l2_in(snap, l1_index, |t| {
            let Some(t) = t else {
                return Ok((Mapping::Unallocated, limit - guest));
            };
            if let Some(base) = t.linear_base() {
                // Every entry maps its cluster at base + its index: no entry
                // needs reading, and the run lasts to the table's end.
                let host = base + (guest - l1_index * geo.l2_span());
                return Ok((Mapping::Data { host }, limit - guest));
            }
            let granule = 1u64 << gb;
            let mut g = guest & !(granule - 1);
            let entry = |g: u64| -> Result<Mapping> {
                let c = g >> cb;
                let sc = ((g >> gb) & ((1 << (cb - gb)) - 1)) as u32;
                let i = (c % l2e) as usize;
                let e = t.get(geo, i);
                e.check_reserved(geo, t.offset, i).map_err(|e| self.err(e))?;
                e.mapping(geo, sc, c)
            };
            let first = entry(g)?;
            let mut next_host = match first {
                Mapping::Compressed { .. } => {
                    let end = ((guest >> cb) + 1) << cb;
                    return Ok((first, end.min(limit) - guest));
                }
                Mapping::Data { host } => host + granule,
                _ => 0,
            };
            g += granule;
            while g < limit {
                let m = entry(g)?;
                let same = match (first, m) {
                    (Mapping::Data { .. }, Mapping::Data { host }) => {
                        let ok = host == next_host;
                        next_host = host + granule;
                        ok
                    }
                    (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                    (Mapping::Unallocated, Mapping::Unallocated) => true,
                    _ => false,
                };
                if !same {
                    break;
                }
                g += granule;
            }
            let len = g.min(limit) - guest;
            let m = match first {
                Mapping::Data { host } => Mapping::Data { host: host + (guest & (granule - 1)) },
                other => other,
            };
            Ok((m, len))
        })
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

    /// Checks a freshly loaded table of an image open read-write, before
    /// anything can change it: no entry has reserved bits set, and none
    /// points into the image's fixed metadata (header, L1, refcount table,
    /// snapshots), which marks the image corrupt.
    fn validate_l2(&self, t: &L2Table) -> Result<()> {
        if self.alloc.is_none() {
            return Ok(());
        }
        let geo = &self.geo;
        let cs = geo.cluster_size();
        let overlap = {
            let reserved = self.reserved.read();
            let mut overlap = None;
            for i in 0..t.len(geo) {
                let e = t.get(geo, i);
                e.check_reserved(geo, t.offset, i).map_err(|e| self.err(e))?;
                let off = e.word & OFFSET_MASK;
                if !e.is_compressed() && !geo.data_file && off != 0 && reserved.overlaps(off, cs) {
                    overlap = Some((i, off));
                    break;
                }
            }
            overlap
        };
        if let Some((i, off)) = overlap {
            return Err(self.mark_corrupt(
                Error::corrupt(format!(
                    "L2 table at {:#x} entry {i} points at {off:#x}, inside the image's metadata",
                    t.offset
                ))
                .with_offset(t.offset),
            ));
        }
        Ok(())
    }

    /// The L2 table for `l1_index`, allocated or copied so the image owns it.
    pub(crate) fn l2_for_write(&self, a: &mut AllocState, l1_index: u64) -> Result<Arc<L2Table>> {
        // The common case, an owned table in the cache that an earlier
        // write already checked, in one look under the mapping lock.
        let (l1e, owned) = {
            let m = self.map.read();
            let Some(&e) = m.l1.get(l1_index as usize) else {
                return Err(Error::internal(format!("L1 index {l1_index} is beyond the L1 table")));
            };
            let off = e & OFFSET_MASK;
            let owned = (off != 0 && e & OFLAG_COPIED != 0 && e & L1E_RESERVED_MASK == 0)
                .then(|| m.l2.get(off).filter(|t| t.write_checked()).cloned())
                .flatten();
            (e, owned)
        };
        if let Some(t) = owned {
            return Ok(t);
        }
        self.check_l1(None, l1e, l1_index)?;
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
                let t = self.load_l2(off)?;
                t.set_write_checked();
                return Ok(t);
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
}
