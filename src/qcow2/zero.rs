//! `write_zeroes` and `discard`: zero flags (or zeroed subclusters) where
//! the format has them, unallocated entries where reads then see zeros,
//! and zeros written as data where neither works (v2 images over a
//! backing file, external data files, partial clusters).

use super::l2::{L2Entry, OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use super::Qcow2;
use crate::device::{check_request, BlockDevice, ZeroMode};
use crate::error::Result;

/// A discard or a write_zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroOp {
    /// Give the range back (reads then see zeros or the backing image).
    Discard,
    /// Make the range unallocated whatever it held, so it reads through
    /// to the backing image (emptying after a commit).
    Empty,
    /// Make the range read as zeros.
    Zero(ZeroMode),
}

impl Qcow2 {
    /// `write_zeroes` entry point.
    pub(crate) fn write_zeroes_impl(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.zero_or_discard(offset, len, ZeroOp::Zero(mode))
    }

    /// `discard` entry point.
    pub(crate) fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, ZeroOp::Discard)
    }

    /// Zeroes or discards `[offset, offset + len)`.
    pub(crate) fn zero_or_discard(&self, offset: u64, len: u64, op: ZeroOp) -> Result<()> {
        self.check_writable()?;
        check_request(offset, len, self.size())?;
        self.track_write(offset, len)?;
        self.zero_or_discard_in(offset, len, op, self.size())
    }

    /// [`zero_or_discard`](Self::zero_or_discard) of a range the caller
    /// checked against `size` (which may not be the visible size yet: a
    /// resize zeroes the new range before it becomes visible).
    pub(crate) fn zero_or_discard_in(&self, offset: u64, len: u64, op: ZeroOp, size: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        // Zeroes work per subcluster with extended L2; discards per cluster,
        // as QEMU's discard alignment.
        let granule = match op {
            ZeroOp::Zero(_) => self.geo_granule(),
            ZeroOp::Discard | ZeroOp::Empty => self.geo.cluster_size(),
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
            ZeroOp::Discard | ZeroOp::Empty => false,
        };
        if data_fallback {
            self.write_zero_data(astart, aend.min(end) - astart)?;
        } else {
            let _g = self.enter_active()?;
            let mut pos = astart;
            while pos < aend {
                pos = self.zero_batch(pos, aend, op)?;
            }
        }
        zero_data(aend.min(end).max(astart), end)?;
        self.maybe_flush_frees()
    }

    fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        crate::storage::write_zeros_with(offset, len, |buf, at| self.write_impl(buf, at))
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
        if l1e & OFFSET_MASK == 0 && (op == ZeroOp::Empty || (op == ZeroOp::Discard && !(backing && v3))) {
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
                    ZeroOp::Empty => false,
                    ZeroOp::Zero(_) => true,
                };
                let zero = if zero_set { (old.bitmap >> 32) | mask } else { (old.bitmap >> 32) & !mask };
                t.set(&geo, i, L2Entry { word: old.word, bitmap: alloc | (zero << 32) });
                continue;
            }
            let owned_host = old.host_offset(&geo).filter(|_| old.copied() && !old.is_compressed());
            let (new, keep) = match op {
                ZeroOp::Empty => (L2Entry { word: 0, bitmap: 0 }, false),
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

    /// Makes every cluster unallocated, so the whole image reads through
    /// to its backing file (what `qemu-img commit` does to the image it
    /// committed, unless `-d`). The space goes back to the host at the next
    /// flush.
    pub fn make_empty(&self) -> Result<()> {
        self.check_writable()?;
        let size = self.size();
        self.track_write(0, size)?;
        self.discard_all(0, size)
    }

    /// Makes every cluster of the range unallocated (the entries read
    /// through to the backing image, or as zeros without one).
    pub(crate) fn discard_all(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.enter_active()?;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            pos = self.zero_batch(pos, end, ZeroOp::Empty)?;
        }
        Ok(())
    }
}
