//! How large a qcow2 image would be (`qemu-img measure -O qcow2`): the
//! metadata of a fully allocated image of that size, plus the data clusters
//! a source actually uses.
//!
//! Mirrors QEMU's `qcow2_measure`, `qcow2_calc_prealloc_size` and
//! `qcow2_refcount_metadata_size` (block/qcow2.c, block/qcow2-refcount.c),
//! so the figures agree byte for byte with qemu-img's.

use super::create::{CreateOptions, Preallocation};
use crate::device::BlockDevice;
use crate::error::{Error, Result};

/// What `qemu-img measure` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// Bytes the new image needs for the data it would hold and all of its
    /// metadata (metadata is counted as for a fully allocated image).
    pub required: u64,
    /// Bytes of the image if every cluster were allocated.
    pub fully_allocated: u64,
    /// Bytes of persistent bitmaps to copy: `Some` when both the source and
    /// the new image could hold bitmaps (qemu-img then prints the line).
    pub bitmaps: Option<u64>,
}

/// Refcount table and block bytes for `clusters` clusters, counting the
/// refcount structures' own clusters (`qcow2_refcount_metadata_size`).
fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_bits: u64) -> Option<u64> {
    let blocks_per_table_cluster = cluster_size / 8;
    let refcounts_per_block = cluster_size.checked_mul(8)? / refcount_bits;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = clusters.checked_add(table)?.checked_add(blocks)?.div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters.checked_add(blocks)?.checked_add(table)?;
        if n == last {
            return blocks.checked_add(table)?.checked_mul(cluster_size);
        }
    }
}

/// Bytes of a fully allocated image of `size` bytes
/// (`qcow2_calc_prealloc_size`): header, L2 and L1 tables, refcounts, data.
fn prealloc_size(size: u64, o: &CreateOptions) -> Option<u64> {
    let cs = o.cluster_size;
    let l2e_size: u64 = if o.extended_l2 { 16 } else { 8 };
    let aligned = size.checked_next_multiple_of(cs)?;
    let mut meta = cs;
    let nl2e = (aligned / cs).checked_next_multiple_of(cs / l2e_size)?;
    meta = meta.checked_add(nl2e.checked_mul(l2e_size)?)?;
    let nl1e = (nl2e * l2e_size / cs).checked_next_multiple_of(cs / 8)?;
    meta = meta.checked_add(nl1e.checked_mul(8)?)?;
    let clusters = meta.checked_add(aligned)? / cs;
    meta = meta.checked_add(refcount_metadata_size(clusters, cs, u64::from(o.refcount_bits))?)?;
    meta.checked_add(aligned)
}

/// Measures a qcow2 image made with `opts` (its `size` when there is no
/// `source`), holding `source`'s data when one is given.
pub fn measure(opts: &CreateOptions, source: Option<&dyn BlockDevice>) -> Result<Measure> {
    let mut o = opts.clone();
    if let Some(s) = source {
        o.size = s.size();
    }
    o.validate()?;
    let cs = o.cluster_size;
    let too_big = || Error::invalid_argument(format!("virtual size {} is too large to measure", o.size));
    let virtual_size = o.size.checked_next_multiple_of(cs).ok_or_else(too_big)?;
    let mut required = 0u64;
    if let Some(src) = source {
        if o.backing_file.is_some() {
            // The new backing file may share nothing with the source.
            required = virtual_size;
        } else {
            let size = src.size();
            let mut off = 0u64;
            while off < size {
                let e = src.map(off, size - off)?;
                let n = e.length.max(1).min(size - off);
                if !e.reads_as_zero() {
                    // Whole clusters, and the next extent starts past them.
                    let end = (off + n).checked_next_multiple_of(cs).ok_or_else(too_big)?.min(virtual_size);
                    required += off % cs + (end - off);
                    off = end;
                    continue;
                }
                off += n;
            }
        }
    }
    if matches!(o.preallocation, Preallocation::Full | Preallocation::Falloc) {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(virtual_size, &o).ok_or_else(too_big)?;
    let bitmaps = match source.map(|s| s.info().details) {
        Some(crate::device::FormatDetails::Qcow2(d)) if o.version >= 3 && d.compat == "1.1" => {
            // As qemu-img counts them: every bitmap fully allocated, its
            // table, and the directory, in clusters of the new image.
            let cs = o.cluster_size;
            let size = source.map_or(virtual_size, |s| s.size());
            let mut total = 0u64;
            let mut dir_len = 0u64;
            for b in &d.bitmaps {
                let clusters = size.div_ceil(b.granularity).div_ceil(8).div_ceil(cs);
                total += clusters * cs + (clusters * 8).div_ceil(cs) * cs;
                dir_len += crate::qcow2::bitmap::dir::entry_len(b.name.as_bytes());
            }
            Some(total + dir_len.div_ceil(cs) * cs)
        }
        _ => None,
    };
    Ok(Measure { required: fully_allocated - virtual_size + required, fully_allocated, bitmaps })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Figures `qemu-img measure -O qcow2 [-o ...] --size N` printed (10.0.2).
    #[test]
    fn sizes_agree_with_qemu_img() {
        let mut o = CreateOptions::new(1 << 30);
        let m = measure(&o, None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (393216, 1074135040));
        o.size = 100 << 30;
        o.cluster_size = 4096;
        let m = measure(&o, None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (262795264, 107636977664));
        let mut o = CreateOptions::new(1 << 40);
        let m = measure(&o, None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (168034304, 1099679662080));
        o.size = 123456789;
        o.cluster_size = 2 << 20;
        o.refcount_bits = 1;
        o.extended_l2 = true;
        let m = measure(&o, None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (10485760, 134217728));
        let mut o = CreateOptions::new(1 << 30);
        o.preallocation = Preallocation::Full;
        assert_eq!(measure(&o, None).unwrap().required, 1074135040);
    }
}
