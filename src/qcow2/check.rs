//! Consistency check and repair, as `qemu-img check` does them.
//!
//! The check counts every reference to every host cluster (header, L1 and
//! L2 tables of the active state and of every snapshot, data and compressed
//! clusters, refcount table and blocks, snapshot table, bitmap directory and
//! tables) and compares the counts with the stored refcounts:
//!
//! * stored < counted: an error (a cluster could be handed out twice);
//! * stored > counted: a leak (wasted space, no harm to data).
//!
//! It also reports entries that are not cluster aligned, L1 and L2 entries
//! with reserved bits set, and COPIED flags that disagree with the
//! refcount, in the same words as QEMU. Repair:
//! [`Repair::Leaks`] lowers leaked refcounts in place; [`Repair::All`]
//! rebuilds the refcount structures from the counts (placing a new table and
//! blocks past the end of the image and switching the header to them) and
//! fixes COPIED flags.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::alloc::FreeOld;
use super::check_walk::{copied_mismatches, count_references, stored_refcounts, CopiedMismatch};
use super::header::{self, Header};
use super::l2::{OFFSET_MASK, OFLAG_COPIED};
use super::refcount::{set_entry, Refcounts};
use super::table::{self, HeaderTable};
use super::Qcow2;
use crate::error::{Error, Result};
use crate::limits::*;
use crate::storage::Storage;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Only check.
    #[default]
    None,
    /// Free leaked clusters.
    Leaks,
    /// Free leaks, rebuild wrong refcounts, fix COPIED flags.
    All,
}

/// What a check found, with QEMU's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors that stopped parts of the check (I/O errors).
    pub check_errors: u64,
    /// Metadata errors (refcounts too low, misaligned entries, wrong flags).
    pub corruptions: u64,
    /// Leaked clusters (refcounts too high).
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// One past the last byte of the image file in use.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active state.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// One line per finding, as `qemu-img check` prints them.
    pub messages: Vec<String>,
    /// Remarks that are not errors (bitmaps left in use), for the user.
    pub notes: Vec<String>,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 2 corrupted, 3 leaks only,
    /// 1 when the check itself failed.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

impl Qcow2 {
    /// Checks the image's metadata, repairing what `repair` asks for.
    /// Repairs need the image open read-write.
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        if repair != Repair::None && self.alloc.is_none() {
            return Err(self.err(Error::read_only("repair")));
        }
        self.flush_impl()?;
        let mut guard = self.alloc.as_ref().map(|a| self.wait_all_inflight(a.lock()));
        // Lazy refcounts live only in memory until close: write them now so
        // the check compares the metadata with the refcounts as they are
        // (the dirty bit stays; writing refcounts early is always safe).
        if let Some(a) = guard.as_mut().filter(|a| a.marked_dirty) {
            self.write_refcounts(a)?;
        }
        let h = self.header.lock().clone();
        let snaps = self.snapshots.read().clone();
        let file = &*self.file;
        let cs = h.cluster_size();
        let snap_len = super::snapshot::encode_table(&snaps).len() as u64;
        let reftable = table::read_u64_table(
            file,
            h.refcount_table_offset,
            (u64::from(h.refcount_table_clusters) * cs / 8) as usize,
            "refcount table",
        )?;
        // The stored refcounts first, so the walk checks the COPIED flags
        // of each active L2 table as it reads it.
        let file_clusters = file.len()?.div_ceil(cs);
        let stored = stored_refcounts(file, &h, &reftable, file_clusters)?;
        let (refs, mut report, copied) = count_references(
            file,
            &h,
            (h.l1_table_offset, h.l1_size),
            &snaps,
            snap_len,
            true,
            &reftable,
            Some(&stored),
        )?;
        let n = (refs.counts.len() as u64).max(file_clusters);
        // References reaching into the cluster past the end need its stored
        // refcount too: read them again, and the COPIED flags with them.
        let (stored, copied) =
            if n > file_clusters { (stored_refcounts(file, &h, &reftable, n)?, None) } else { (stored, Some(copied)) };
        let mut leaked = Vec::new();
        let mut need_rebuild = false;
        let mut end = 0u64;
        for c in 0..n {
            let counted = refs.counts.get(c as usize).copied().unwrap_or(0);
            let s = stored[c as usize];
            if s > 0 || counted > 0 {
                end = c + 1;
            }
            if s == counted {
                continue;
            }
            if s < counted {
                report.corruptions += 1;
                need_rebuild = true;
                report.messages.push(format!("ERROR cluster {c} refcount={s} reference={counted}"));
            } else {
                report.leaks += 1;
                leaked.push((c, counted));
                report.messages.push(format!("Leaked cluster {c} refcount={s} reference={counted}"));
            }
        }
        report.image_end_offset = end * cs;
        // COPIED flags of the active tables.
        let copied_fixes = self.check_copied(&h, &stored, copied.as_ref(), &mut report)?;
        drop(guard);
        match repair {
            Repair::None => Ok(report),
            Repair::Leaks if !leaked.is_empty() => {
                self.fix_leaks(&leaked)?;
                report.leaks_fixed = leaked.len() as u64;
                self.finish_repair(report)
            }
            Repair::All if need_rebuild || !leaked.is_empty() || !copied_fixes.is_empty() => {
                let leaks = report.leaks;
                let corruptions = report.corruptions;
                if need_rebuild || !leaked.is_empty() {
                    self.rebuild_refcounts()?;
                }
                // COPIED flags follow the refcounts as they are now.
                let fixes = self.copied_fixes_now()?;
                self.fix_copied(&fixes)?;
                report.leaks_fixed = leaks;
                report.corruptions_fixed = corruptions.min(
                    copied_fixes.len() as u64
                        + report.messages.iter().filter(|m| m.starts_with("ERROR cluster")).count() as u64,
                );
                self.finish_repair(report)
            }
            _ => Ok(report),
        }
    }

    /// After a repair: a second check reports what is left, with the fixed
    /// counters of the first.
    fn finish_repair(&self, first: CheckReport) -> Result<CheckReport> {
        let mut after = self.check(Repair::None)?;
        after.leaks_fixed = first.leaks_fixed;
        after.corruptions_fixed = first.corruptions_fixed;
        let mut messages = first.messages;
        messages.extend(after.messages);
        after.messages = messages;
        Ok(after)
    }

    /// Lists active L1/L2 entries whose COPIED flag disagrees with the
    /// refcount: (is_l1, table offset or L1 index, entry index, want COPIED).
    /// `walked` holds the mismatches of the tables the reference walk
    /// already read (with the same `stored`); others are read here.
    fn check_copied(
        &self,
        h: &Header,
        stored: &[u64],
        walked: Option<&HashMap<u64, Vec<CopiedMismatch>>>,
        report: &mut CheckReport,
    ) -> Result<Vec<(bool, u64, usize, bool)>> {
        let mut fixes = Vec::new();
        if h.incompatible_features & header::INCOMPAT_DATA_FILE != 0 {
            return Ok(fixes);
        }
        let cs = h.cluster_size();
        let file = &*self.file;
        let refcount = |off: u64| -> u64 { stored.get((off / cs) as usize).copied().unwrap_or(0) };
        let l1 = table::read_u64_table(file, h.l1_table_offset, h.l1_size as usize, "L1 table")?;
        let per = if h.extended_l2() { 2 } else { 1 };
        let file_len = file.len()?;
        // Each L2 table is checked once, however many entries name it.
        let mut seen = HashSet::new();
        for (i, &l1e) in l1.iter().enumerate() {
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 || l2_off & (cs - 1) != 0 {
                continue;
            }
            let rc = refcount(l2_off);
            let want = rc == 1;
            if want != (l1e & OFLAG_COPIED != 0) {
                report.corruptions += 1;
                report
                    .messages
                    .push(format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"));
                fixes.push((true, i as u64, 0, want));
            }
            // A table past the end of the file reads as zeros: no entries.
            if l2_off >= file_len || !seen.insert(l2_off) {
                continue;
            }
            let read;
            let mismatches = match walked.and_then(|w| w.get(&l2_off)) {
                Some(m) => m,
                None => {
                    let t = table::read_u64_table(file, l2_off, (cs / 8) as usize, "L2 table")?;
                    read = copied_mismatches(&t, per, cs, refcount);
                    &read
                }
            };
            for &(j, w, rc) in mismatches {
                report.corruptions += 1;
                report.messages.push(format!("ERROR OFLAG_COPIED data cluster: l2_entry={w:x} refcount={rc}"));
                fixes.push((false, l2_off, j, rc == 1));
            }
        }
        Ok(fixes)
    }

    fn fix_copied(&self, fixes: &[(bool, u64, usize, bool)]) -> Result<()> {
        if fixes.is_empty() {
            return Ok(());
        }
        let mut a = self.alloc_lock()?;
        for &(is_l1, off, j, want) in fixes {
            if is_l1 {
                let mut m = self.map.write();
                if let Some(e) = m.l1.get_mut(off as usize) {
                    *e = if want { *e | OFLAG_COPIED } else { *e & !OFLAG_COPIED };
                }
                a.l1_dirty = true;
            } else {
                let t = self.load_l2(off)?;
                let mut e = t.get(&self.geo, j);
                e.word = if want { e.word | OFLAG_COPIED } else { e.word & !OFLAG_COPIED };
                t.set(&self.geo, j, e);
            }
        }
        self.flush_meta(&mut a)
    }

    /// Lowers the refcounts of leaked clusters to what is referenced.
    fn fix_leaks(&self, leaked: &[(u64, u64)]) -> Result<()> {
        let mut a = self.alloc_lock()?;
        let file = &*self.file;
        for &(c, counted) in leaked {
            a.rc.set(file, c, counted)?;
            if counted == 0 && c < a.rc.free_hint {
                a.rc.free_hint = c;
            }
        }
        a.rc.write_blocks(file)?;
        file.sync()?;
        Ok(())
    }

    /// Replaces the refcount table and blocks with ones rebuilt from the
    /// references, placed past everything in use; the old structures become
    /// free space.
    pub(crate) fn rebuild_refcounts(&self) -> Result<()> {
        let order = self.header.lock().refcount_order;
        self.rebuild_refcounts_as(order)
    }

    /// [`rebuild_refcounts`](Self::rebuild_refcounts) into refcounts of
    /// `2^order` bits; the header switches to the new table and width in
    /// one write, after the new structures are durable (a crash before
    /// leaves the old ones in use and the new ones past the end, unused).
    pub(crate) fn rebuild_refcounts_as(&self, order: u32) -> Result<()> {
        let a = self.alloc_lock()?;
        let mut a = self.wait_all_inflight(a);
        self.flush_meta(&mut a)?;
        let file = &*self.file;
        let h = self.header.lock().clone();
        let snaps = self.snapshots.read().clone();
        let cs = h.cluster_size();
        let snap_len = super::snapshot::encode_table(&snaps).len() as u64;
        let (mut refs, report, _) =
            count_references(file, &h, (h.l1_table_offset, h.l1_size), &snaps, snap_len, false, &[], None)?;
        if report.check_errors > 0 {
            return Err(self.err(Error::corrupt("cannot rebuild refcounts: the metadata could not be read")));
        }
        let max = if order == 6 { u64::MAX } else { (1u64 << (1 << order)) - 1 };
        if let Some(c) = refs.counts.iter().position(|&v| v > max) {
            return Err(self.err(Error::corrupt(format!(
                "cluster {c} is referenced {} times, more than {}-bit refcounts can hold",
                refs.counts[c],
                1u32 << order
            ))));
        }
        let epb = (cs * 8) >> order;
        let used_end = refs.counts.iter().rposition(|&v| v > 0).map_or(1, |p| p as u64 + 1);
        let e_start = used_end.max(file.len()?.div_ceil(cs));
        // The table and blocks go at e_start: table first, then blocks, the
        // blocks covering everything up to their own end.
        let mut nb = e_start.div_ceil(epb).max(1);
        let mut tc;
        loop {
            tc = (nb * 8).div_ceil(cs).max(1);
            let need = (e_start + tc + nb).div_ceil(epb);
            if need <= nb {
                break;
            }
            nb = need;
        }
        if tc * cs > QCOW2_MAX_REFTABLE_BYTES {
            return Err(self.err(Error::limit("the rebuilt refcount table would be too large")));
        }
        let table_off = e_start * cs;
        refs.file_len = (e_start + tc + nb) * cs;
        refs.add(&mut CheckReport::default(), table_off, (tc + nb) * cs, "new refcount structures");
        let mut table = vec![0u64; (tc * cs / 8) as usize];
        let mut block = vec![0u8; cs as usize];
        for b in 0..nb {
            block.fill(0);
            for i in 0..epb {
                let c = b * epb + i;
                if let Some(&v) = refs.counts.get(c as usize) {
                    if v > 0 {
                        set_entry(&mut block, order, i as usize, v);
                    }
                }
            }
            let off = (e_start + tc + b) * cs;
            file.write_at(&block, off)?;
            table[b as usize] = off;
        }
        // The blocks are written; the swap writes the table, then the header.
        let tbytes = table::encode(table, (tc * cs) as usize);
        self.swap_table(
            &mut a,
            HeaderTable::Refcount,
            table_off,
            &tbytes,
            |hh| {
                hh.refcount_table_offset = table_off;
                hh.refcount_table_clusters = tc as u32;
                hh.refcount_order = order;
            },
            FreeOld::Never,
        )?;
        let rc = Refcounts::load(file, order, h.cluster_bits, table_off, tc as u32, Arc::clone(&self.reserved))?;
        a.rc = rc;
        a.alloc_end = e_start + tc + nb;
        a.compressed_next = 0;
        Ok(())
    }

    /// The COPIED fixes the stored refcounts call for now.
    fn copied_fixes_now(&self) -> Result<Vec<(bool, u64, usize, bool)>> {
        self.flush_impl()?;
        let h = self.header.lock().clone();
        let file = &*self.file;
        let reftable = table::read_u64_table(
            file,
            h.refcount_table_offset,
            (u64::from(h.refcount_table_clusters) * h.cluster_size() / 8) as usize,
            "refcount table",
        )?;
        let n = file.len()?.div_ceil(h.cluster_size());
        let stored = stored_refcounts(file, &h, &reftable, n)?;
        let mut r = CheckReport::default();
        self.check_copied(&h, &stored, None, &mut r)
    }

    /// Rebuilds refcounts of an image opened read-write with the dirty bit
    /// set, then clears the bit.
    pub(crate) fn repair_dirty(&self) -> Result<()> {
        self.rebuild_refcounts()?;
        let fixes = self.copied_fixes_now()?;
        self.fix_copied(&fixes)?;
        let mut h = self.header.lock();
        h.incompatible_features &= !header::INCOMPAT_DIRTY;
        self.write_header_locked(&mut h)?;
        drop(h);
        self.file.sync()
    }
}
