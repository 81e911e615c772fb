//! The reference walk of `check`: every reference to every host cluster
//! counted from the metadata (header, L1 and L2 tables of the active state
//! and of every snapshot, data and compressed clusters, refcount
//! structures, snapshot table, bitmaps), the active state's statistics,
//! the COPIED flags of its L2 entries, and the stored refcounts to compare
//! with.

use std::collections::HashMap;

use byteorder::{BigEndian, ByteOrder};

use super::check::CheckReport;
use super::header::{self, Header};
use super::l2::{
    Geometry, L2Entry, L1E_RESERVED_MASK, L2E_STD_RESERVED_MASK, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO,
};
use super::refcount::{get_entry, REFT_OFFSET_MASK};
use super::snapshot::Snapshot;
use super::table;
use crate::error::Result;
use crate::limits::*;
use crate::storage::Storage;

/// The reference counts found by walking the metadata.
pub(super) struct Refs {
    pub(super) counts: Vec<u64>,
    pub(super) cluster_bits: u32,
    /// References may end at most one cluster past this (the last cluster
    /// may be half written, as QEMU allows); further ones are corruption
    /// and are not counted, so nothing is sized or placed by them.
    pub(super) file_len: u64,
}

impl Refs {
    pub(super) fn add(&mut self, r: &mut CheckReport, offset: u64, len: u64, what: &str) {
        self.add_n(r, offset, len, 1, what);
    }

    /// Adds `times` references to every cluster of `[offset, offset + len)`.
    fn add_n(&mut self, r: &mut CheckReport, offset: u64, len: u64, times: u64, what: &str) {
        if len == 0 || times == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let end = offset.saturating_add(len);
        let last = (end - 1) >> self.cluster_bits;
        if end.saturating_sub(self.file_len) >= 1 << self.cluster_bits {
            r.corruptions = r.corruptions.saturating_add(times);
            r.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: {what} at offset {offset:#x} size {len:#x}"
            ));
            return;
        }
        if self.counts.len() as u64 <= last {
            self.counts.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            self.counts[c as usize] = self.counts[c as usize].saturating_add(times);
        }
    }
}

/// What one L2 table adds to the active state's statistics, so that a
/// table named by many L1 entries is read once.
#[derive(Debug, Clone, Copy, Default)]
struct L2Summary {
    allocated: u64,
    compressed: u64,
    /// Host offset of the first data cluster, if any.
    first: Option<u64>,
    /// Fragmentation among the table's own clusters (compressed clusters
    /// count as fragmented, as in QEMU).
    fragments: u64,
    /// One past the last data cluster.
    end: u64,
}

struct Walker<'a> {
    file: &'a dyn Storage,
    file_len: u64,
    geo: Geometry,

    refs: Refs,
    report: CheckReport,
    /// L2 tables named by L1 entries: offset → number of references, and
    /// whether the active L1 table names it.
    l2_uses: HashMap<u64, (u64, bool)>,
    /// The active L1 table's L2 tables, in its order, as runs of one table
    /// named by consecutive entries: (offset, entries). The statistics are
    /// gathered from them once every table was read.
    active_l2s: Vec<(u64, u64)>,
    /// Active-state statistics per L2 table.
    summaries: HashMap<u64, L2Summary>,
    /// Stored refcounts, when the walk also checks the active L2 entries'
    /// COPIED flags (so `check` reads each active table once).
    stored: Option<&'a [u64]>,
    /// Per active L2 table read: its entries whose COPIED flag disagrees
    /// with the stored refcount.
    copied: HashMap<u64, Vec<CopiedMismatch>>,
}

/// An L2 entry whose COPIED flag disagrees with its cluster's refcount:
/// (entry index, entry word, refcount).
pub(super) type CopiedMismatch = (usize, u64, u64);

/// The entries of L2 table `t` (`per` words each) whose COPIED flag
/// disagrees with the refcount `refcount` gives their cluster.
pub(super) fn copied_mismatches(t: &[u64], per: usize, cs: u64, refcount: impl Fn(u64) -> u64) -> Vec<CopiedMismatch> {
    let mut out = Vec::new();
    for (j, e) in t.chunks_exact(per).enumerate() {
        let w = e[0];
        if w & OFLAG_COMPRESSED != 0 {
            continue;
        }
        let off = w & OFFSET_MASK;
        if off == 0 || off & (cs - 1) != 0 {
            continue;
        }
        let rc = refcount(off);
        if (rc == 1) != (w & OFLAG_COPIED != 0) {
            out.push((j, w, rc));
        }
    }
    out
}

impl Walker<'_> {
    /// Reads a table of up to `count` u64 entries. Entries past the end of
    /// the file would read as zeros, which every caller skips: they are
    /// left out, so a table claimed far past the end costs nothing.
    fn read_table(&mut self, offset: u64, count: u64, what: &str) -> Option<Vec<u64>> {
        let avail = self.file_len.saturating_sub(offset).min(count.saturating_mul(8)) / 8 * 8;
        let mut buf = vec![0u8; avail as usize];
        match self.file.read_at(&mut buf, offset) {
            Ok(()) => Some(table::decode(&buf).collect()),
            Err(e) => {
                self.report.check_errors += 1;
                self.report.messages.push(format!("ERROR: could not read {what} at {offset:#x}: {}", e.report()));
                None
            }
        }
    }

    /// Counts the references of one L1 table (named `times` times) and
    /// notes its L2 tables; `active` gathers the allocation statistics.
    fn walk_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool, times: u64) {
        let cs = self.geo.cluster_size();
        self.refs.add_n(&mut self.report, l1_offset, u64::from(l1_size) * 8, times, "L1 table");
        let Some(l1) = self.read_table(l1_offset, u64::from(l1_size), "the L1 table") else {
            return;
        };
        for &l1e in l1.iter() {
            if l1e & L1E_RESERVED_MASK != 0 {
                self.report.corruptions += times;
                self.report.messages.push(format!("ERROR found L1 entry with reserved bits set: {l1e:x}"));
            }
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if l2_off & (cs - 1) != 0 {
                self.report.corruptions += times;
                self.report
                    .messages
                    .push(format!("ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"));
                continue;
            }
            let u = self.l2_uses.entry(l2_off).or_default();
            u.0 += times;
            u.1 |= active;
            if active {
                match self.active_l2s.last_mut() {
                    Some((o, k)) if *o == l2_off => *k += 1,
                    _ => self.active_l2s.push((l2_off, 1)),
                }
            }
        }
    }

    /// Adds the active state's statistics, table by table in L1 order (the
    /// tables were summarized when [`walk_l2s`](Self::walk_l2s) read them).
    fn active_stats(&mut self) {
        let mut next_contiguous = 0u64;
        for (l2_off, k) in std::mem::take(&mut self.active_l2s) {
            let s = self.summaries.get(&l2_off).copied().unwrap_or_default();
            let r = &mut self.report;
            r.allocated_clusters = r.allocated_clusters.saturating_add(s.allocated.saturating_mul(k));
            r.compressed_clusters = r.compressed_clusters.saturating_add(s.compressed.saturating_mul(k));
            r.fragmented_clusters = r.fragmented_clusters.saturating_add(s.fragments.saturating_mul(k));
            if let Some(f) = s.first {
                // The first use of the run follows the previous table; each
                // repeat follows the same table's own end.
                if next_contiguous != 0 && f != next_contiguous {
                    r.fragmented_clusters += 1;
                }
                if f != s.end {
                    r.fragmented_clusters = r.fragmented_clusters.saturating_add(k - 1);
                }
                next_contiguous = s.end;
            }
        }
    }

    /// The active-state statistics of L2 table `t`.
    fn summary(&self, t: &[u64]) -> L2Summary {
        let cs = self.geo.cluster_size();
        let mut s = L2Summary::default();
        {
            let per = self.geo.words_per_entry();
            let mut next = 0u64;
            for e in t.chunks_exact(per) {
                let w = e[0];
                if w & OFLAG_COMPRESSED != 0 {
                    s.allocated += 1;
                    s.compressed += 1;
                    s.fragments += 1;
                    continue;
                }
                let off = w & OFFSET_MASK;
                if off == 0 || off & (cs - 1) != 0 || self.geo.data_file {
                    continue;
                }
                if self.geo.extended_l2 || w & OFLAG_ZERO == 0 {
                    s.allocated += 1;
                }
                match s.first {
                    None => s.first = Some(off),
                    Some(_) if off != next => s.fragments += 1,
                    _ => {}
                }
                next = off + cs;
                s.end = next;
            }
        }
        s
    }

    /// Counts the references of every L2 table the L1 walks noted, each
    /// table read once and its references multiplied by its uses.
    fn walk_l2s(&mut self) {
        let cs = self.geo.cluster_size();
        let mut tables: Vec<(u64, (u64, bool))> = self.l2_uses.drain().collect();
        tables.sort_unstable();
        for (l2_off, (n, active)) in tables {
            self.refs.add_n(&mut self.report, l2_off, cs, n, "L2 table");
            let Some(t) = self.read_table(l2_off, cs / 8, "an L2 table") else {
                continue;
            };
            let per = self.geo.words_per_entry();
            if active {
                // What the active state needs of this table, from this one
                // read: its statistics, and its COPIED flags.
                let s = self.summary(&t);
                self.summaries.insert(l2_off, s);
                if let Some(stored) = self.stored.filter(|_| !self.geo.data_file) {
                    let m = copied_mismatches(&t, per, cs, |off| stored.get((off / cs) as usize).copied().unwrap_or(0));
                    self.copied.insert(l2_off, m);
                }
            }
            for (j, e) in t.chunks_exact(per).enumerate() {
                let entry = L2Entry { word: e[0], bitmap: if per == 2 { e[1] } else { 0 } };
                if entry.word & OFLAG_COMPRESSED != 0 {
                    if entry.word & OFLAG_COPIED != 0 {
                        self.report.corruptions += n;
                        self.report.messages.push(format!(
                            "ERROR: coffset={:#x}: Compressed cluster has the COPIED flag",
                            entry.word & self.geo.compressed_offset_mask()
                        ));
                    }
                    if entry.bitmap != 0 {
                        self.report.corruptions += n;
                        self.report.messages.push(format!(
                            "ERROR compressed cluster {j} with non-zero subcluster allocation bitmap, entry={:#x}",
                            entry.word
                        ));
                    }
                    let (host, len) = entry.compressed(&self.geo);
                    self.refs.add_n(&mut self.report, host, len, n, "compressed cluster");
                    continue;
                }
                if entry.word & L2E_STD_RESERVED_MASK != 0 {
                    self.report.corruptions += n;
                    self.report.messages.push(format!("ERROR found l2 entry with reserved bits set: {:x}", entry.word));
                }
                let off = entry.word & OFFSET_MASK;
                if self.geo.extended_l2 {
                    let alloc = entry.bitmap & 0xffff_ffff;
                    let zero = entry.bitmap >> 32;
                    // Offset 0 is a real cluster of an external data file
                    // when COPIED is set (as QEMU's cluster types say).
                    let unallocated = entry.host_offset(&self.geo).is_none();
                    if alloc & zero != 0 || (unallocated && alloc != 0) {
                        self.report.corruptions += n;
                        self.report.messages.push(format!(
                            "ERROR invalid cluster entry found (L2 offset: {l2_off:#x}, L2 index: {j:#x})"
                        ));
                    }
                }
                if off == 0 {
                    continue;
                }
                if off & (cs - 1) != 0 {
                    self.report.corruptions += n;
                    self.report
                        .messages
                        .push(format!("ERROR offset={off:x}: Cluster is not properly aligned; L2 entry corrupted."));
                    continue;
                }
                if self.geo.data_file {
                    continue;
                }
                self.refs.add_n(&mut self.report, off, cs, n, "data cluster");
            }
        }
    }
}

/// The full reference walk over an image's metadata. Every distinct L1
/// and L2 table is read once however many snapshots or entries name it
/// (an active L2 table gives its references, the statistics and, given
/// the stored refcounts, its COPIED mismatches from that one read), and
/// nothing past the end of the file is read or allocated, so the work is
/// bounded by the file's size and the snapshot count.
#[allow(clippy::too_many_arguments)]
pub(super) fn count_references(
    file: &dyn Storage,
    h: &Header,
    l1: (u64, u32),
    snaps: &[Snapshot],
    snap_table_len: u64,
    include_refcount_structures: bool,
    reftable: &[u64],
    stored: Option<&[u64]>,
) -> Result<(Refs, CheckReport, HashMap<u64, Vec<CopiedMismatch>>)> {
    let cs = h.cluster_size();
    let file_len = file.len()?;
    let file_clusters = file_len.div_ceil(cs);
    let geo = Geometry {
        cluster_bits: h.cluster_bits,
        extended_l2: h.extended_l2(),
        data_file: h.incompatible_features & header::INCOMPAT_DATA_FILE != 0,
    };
    let mut w = Walker {
        file,
        file_len,
        geo,

        refs: Refs { counts: vec![0; file_clusters as usize], cluster_bits: h.cluster_bits, file_len },
        report: CheckReport::default(),
        l2_uses: HashMap::new(),
        active_l2s: Vec::new(),
        summaries: HashMap::new(),
        stored,
        copied: HashMap::new(),
    };
    w.report.total_clusters = h.size.div_ceil(cs);
    w.refs.add(&mut w.report, 0, cs, "header");
    w.walk_l1(l1.0, l1.1, true, 1);
    let mut snap_l1s: HashMap<(u64, u32), u64> = HashMap::new();
    for s in snaps {
        *snap_l1s.entry((s.l1_table_offset, s.l1_size)).or_default() += 1;
    }
    let mut snap_l1s: Vec<((u64, u32), u64)> = snap_l1s.into_iter().collect();
    snap_l1s.sort_unstable();
    for ((off, size), n) in snap_l1s {
        w.walk_l1(off, size, false, n);
    }
    w.walk_l2s();
    w.active_stats();
    if h.nb_snapshots > 0 {
        w.refs.add(&mut w.report, h.snapshots_offset, snap_table_len, "snapshot table");
    }
    if let Some((o, l)) = h.crypto_header {
        w.refs.add(&mut w.report, o, l, "LUKS header");
    }
    if let (Some(b), true) = (h.bitmaps, h.autoclear_features & header::AUTOCLEAR_BITMAPS != 0) {
        count_bitmaps(&mut w, b.directory_offset, b.directory_size);
        verify_bitmaps(&mut w.report, w.file, h);
    } else if let Some(b) = h.bitmaps {
        // Inconsistent bitmaps are still stored and referenced.
        count_bitmaps(&mut w, b.directory_offset, b.directory_size);
    }
    if include_refcount_structures {
        w.refs.add(&mut w.report, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs, "refcount table");
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off & (cs - 1) != 0 {
                w.report.corruptions += 1;
                w.report
                    .messages
                    .push(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                continue;
            }
            if off >> h.cluster_bits >= file_clusters {
                w.report.corruptions += 1;
                w.report.messages.push(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            w.refs.add(&mut w.report, off, cs, "refcount block");
        }
    }
    Ok((w.refs, w.report, w.copied))
}

/// Checks the bitmap directory and tables against the constraints QEMU
/// enforces; a bitmap left `in_use` is reported (it is not an error of the
/// image: QEMU ignores its contents, and removing it is the way out).
fn verify_bitmaps(report: &mut CheckReport, file: &dyn Storage, h: &Header) {
    match super::bitmap::read_directory(file, h) {
        Err(e) => {
            report.corruptions += 1;
            report.messages.push(format!("ERROR bitmap directory: {e}"));
        }
        Ok(entries) => {
            for e in entries {
                if let Err(err) = super::bitmap::check_table(file, &e, h.cluster_size()) {
                    report.corruptions += 1;
                    report.messages.push(format!("ERROR bitmap '{}': {err}", e.name));
                } else if e.flags & super::bitmap::dir::FLAG_IN_USE != 0 {
                    report.notes.push(format!(
                        "Bitmap '{}' is in use (left inconsistent by a program that did not close the image); remove it with: bitmap --remove",
                        e.name
                    ));
                }
            }
        }
    }
}

/// Counts the bitmap directory, bitmap tables and bitmap data clusters.
fn count_bitmaps(w: &mut Walker<'_>, dir_off: u64, dir_size: u64) {
    let cs = w.geo.cluster_size();
    if dir_size > QCOW2_MAX_BITMAP_DIRECTORY || !dir_off.is_multiple_of(cs) {
        return;
    }
    w.refs.add(&mut w.report, dir_off, dir_size, "bitmap directory");
    let mut dir = vec![0u8; dir_size as usize];
    if w.file.read_at(&mut dir, dir_off).is_err() {
        w.report.check_errors += 1;
        return;
    }
    let mut pos = 0usize;
    while pos + 24 <= dir.len() {
        let table_off = BigEndian::read_u64(&dir[pos..pos + 8]);
        let table_size = u64::from(BigEndian::read_u32(&dir[pos + 8..pos + 12]));
        // Entry layout: table offset (8), table size (4), flags (4), type
        // (1), granularity bits (1), name size (2), extra data size (4).
        let name_size = usize::from(BigEndian::read_u16(&dir[pos + 18..pos + 20]));
        let extra = BigEndian::read_u32(&dir[pos + 20..pos + 24]) as usize;
        if table_off % cs == 0 && table_size <= QCOW2_MAX_L1_BYTES / 8 {
            w.refs.add(&mut w.report, table_off, table_size * 8, "bitmap table");
            if let Some(t) = w.read_table(table_off, table_size, "a bitmap table") {
                for e in t {
                    let off = e & 0x00ff_ffff_ffff_fe00;
                    if off != 0 {
                        w.refs.add(&mut w.report, off, cs, "bitmap data");
                    }
                }
            }
        }
        pos += (24 + extra + name_size).div_ceil(8) * 8;
    }
}

/// Reads stored refcounts for clusters `0..n`.
pub(super) fn stored_refcounts(file: &dyn Storage, h: &Header, reftable: &[u64], n: u64) -> Result<Vec<u64>> {
    let cs = h.cluster_size();
    let epb = (cs * 8) >> h.refcount_order;
    let mut out = vec![0u64; n as usize];
    let mut block = vec![0u8; cs as usize];
    for (ti, &e) in reftable.iter().enumerate() {
        let start = ti as u64 * epb;
        if start >= n {
            break;
        }
        let off = e & REFT_OFFSET_MASK;
        if off == 0 || off & (cs - 1) != 0 {
            continue;
        }
        file.read_at(&mut block, off)?;
        for i in 0..epb.min(n - start) {
            out[(start + i) as usize] = get_entry(&block, h.refcount_order, i as usize);
        }
    }
    Ok(out)
}
