//! Consistency check of sparse extents (what `qemu-img check` looks at,
//! and more): grain tables and grains pointing past the end of the file,
//! the same grain or table referenced twice, tables and grains overlapping
//! the header, descriptor, directories or each other, redundant directory
//! copies that disagree, and descriptor sizes that differ from the header.
//!
//! The work is bounded by the file: each distinct table inside the file is
//! read once, so a hostile directory cannot make the check loop for long.

use std::collections::{HashMap, HashSet};

use super::header::*;
use super::sparse::SparseExtent;
use crate::error::Result;

/// Most messages kept in a report (counts keep counting).
const MAX_MESSAGES: usize = 100;

/// What [`super::Vmdk::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmdkCheckReport {
    /// Inconsistencies that make data unreadable or wrong.
    pub errors: u64,
    /// Oddities that do not lose data (size mismatches, stale copies).
    pub warnings: u64,
    /// Grains with data (plain or compressed).
    pub allocated_grains: u64,
    /// Compressed grains among them.
    pub compressed_grains: u64,
    /// Zeroed-grain entries.
    pub zeroed_grains: u64,
    /// Grain tables referenced by the directories.
    pub grain_tables: u64,
    /// The first messages, one per finding.
    pub messages: Vec<String>,
}

impl VmdkCheckReport {
    /// Whether no error was found.
    pub fn is_clean(&self) -> bool {
        self.errors == 0
    }

    pub(crate) fn error(&mut self, m: String) {
        self.errors += 1;
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(format!("error: {m}"));
        }
    }

    pub(crate) fn warn(&mut self, m: String) {
        self.warnings += 1;
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(format!("warning: {m}"));
        }
    }
}

/// Checks one sparse extent (`idx` and `name` for messages, `len` its guest
/// size from the descriptor).
pub(crate) fn check_sparse(s: &SparseExtent, idx: usize, name: &str, len: u64, r: &mut VmdkCheckReport) -> Result<()> {
    let geo = s.geo;
    let flen = s.file.len()?;
    let tag = format!("extent {idx} ('{name}')");
    if geo.capacity_bytes() != len {
        r.warn(format!(
            "{tag}: header capacity {} bytes differs from the descriptor's {len} bytes",
            geo.capacity_bytes()
        ));
    }
    // Fixed metadata ranges: header, descriptor, directories.
    let mut meta: Vec<(u64, u64, String)> = vec![(0, SECTOR, "header".into())];
    let h = &s.header;
    if h.descriptor_offset != 0 && h.descriptor_size != 0 {
        let a = h.descriptor_offset.saturating_mul(SECTOR);
        meta.push((a, a.saturating_add(h.descriptor_size.saturating_mul(SECTOR)), "descriptor".into()));
    }
    let gd_len = geo.gd_sectors() * SECTOR;
    let gd_at = h.gd_offset.saturating_mul(SECTOR);
    meta.push((gd_at, gd_at.saturating_add(gd_len), "grain directory".into()));
    if s.rgd.is_some() {
        let a = h.rgd_offset.saturating_mul(SECTOR);
        meta.push((a, a.saturating_add(gd_len), "redundant grain directory".into()));
    }
    let gt_len = geo.gt_sectors() * SECTOR;
    let mut tables: HashMap<u32, u64> = HashMap::new();
    let mut table_list: Vec<(u64, u64)> = Vec::new();
    for gdi in 0..geo.gd_entries() {
        let sector = s.gd_entry(gdi);
        if let Some(rgd) = &s.rgd {
            let rs = rgd.get(gdi as usize).map_or(0, |e| e.load(std::sync::atomic::Ordering::Acquire));
            if (rs == 0) != (sector == 0) {
                r.warn(format!("{tag}: grain directory entry {gdi} is {sector} but the redundant copy is {rs}"));
            }
            if rs != 0 {
                let a = u64::from(rs) * SECTOR;
                table_list.push((a, a + gt_len));
                if a + gt_len > flen {
                    r.error(format!("{tag}: redundant grain table {gdi} at {a:#x} lies past the end of the file"));
                }
            }
        }
        if sector == 0 {
            continue;
        }
        let a = u64::from(sector) * SECTOR;
        if a + gt_len > flen {
            r.error(format!("{tag}: grain table {gdi} at {a:#x} lies past the end of the file ({flen} bytes)"));
            continue;
        }
        if let Some(other) = tables.insert(sector, gdi) {
            r.error(format!("{tag}: grain tables {other} and {gdi} are the same table at {a:#x}"));
            continue;
        }
        table_list.push((a, a + gt_len));
    }
    r.grain_tables += tables.len() as u64;
    for (a, b, what) in &meta {
        for &(ta, tb) in &table_list {
            if ta < *b && *a < tb {
                r.error(format!("{tag}: grain table at {ta:#x} overlaps the {what}"));
            }
        }
    }
    let mut sorted = table_list.clone();
    sorted.sort_unstable();
    sorted.dedup();
    for w in sorted.windows(2) {
        if let [x, y] = w {
            if y.0 < x.1 {
                r.error(format!("{tag}: grain tables at {:#x} and {:#x} overlap", x.0, y.0));
            }
        }
    }
    let overlaps_meta = |a: u64, b: u64| -> Option<String> {
        for (ma, mb, what) in &meta {
            if a < *mb && *ma < b {
                return Some(what.clone());
            }
        }
        let i = sorted.partition_point(|t| t.1 <= a);
        match sorted.get(i) {
            Some(t) if t.0 < b => Some("a grain table".into()),
            _ => None,
        }
    };
    let gb = geo.grain_bytes();
    let mut seen: HashSet<u32> = HashSet::new();
    let mut order: Vec<(u64, u64)> = tables.iter().map(|(s, g)| (*g, u64::from(*s))).collect();
    order.sort_unstable();
    for (gdi, _) in order {
        let Some(t) = s.table(gdi)? else { continue };
        for gti in 0..geo.gtes_per_gt {
            let grain = gdi * geo.gtes_per_gt + gti;
            if grain >= geo.grains() {
                break;
            }
            let gte = t.get(gti);
            if gte == 0 {
                continue;
            }
            if gte == GTE_ZEROED && h.zero_grain() {
                r.zeroed_grains += 1;
                continue;
            }
            r.allocated_grains += 1;
            if h.compressed() {
                r.compressed_grains += 1;
            }
            let a = u64::from(gte) * SECTOR;
            let goff = grain * gb;
            if a >= flen {
                r.error(format!("{tag}: grain at extent offset {goff:#x} points at {a:#x}, past the end of the file"));
                continue;
            }
            if !seen.insert(gte) {
                r.error(format!(
                    "{tag}: grain at extent offset {goff:#x} uses host sector {gte}, which another grain uses too"
                ));
            }
            let end = if h.compressed() { a + SECTOR } else { a + gb };
            if let Some(what) = overlaps_meta(a, end) {
                r.error(format!("{tag}: grain at extent offset {goff:#x} (host {a:#x}) overlaps {what}"));
            }
        }
    }
    Ok(())
}
