//! Changing the virtual size, and growing the L1 table with it.

use super::alloc::AllocState;
use super::alloc::FreeOld;
use super::table::{self, HeaderTable};
use super::zero::ZeroOp;
use super::{bitmap, Qcow2};
use crate::device::{BlockDevice, ZeroMode};
use crate::error::{Error, Result};
use crate::limits::*;

impl Qcow2 {
    /// Changes the virtual size. Shrinking requires the range beyond the new
    /// size to be unallocated, unless `discard_tail` allows discarding it.
    pub fn resize_with(&self, new_size: u64, discard_tail: bool) -> Result<()> {
        self.check_writable()?;
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid_argument(format!("size {new_size} is too large")));
        }
        let old = self.size();
        if new_size != old {
            self.bitmaps_resizable(new_size)?;
            // Stored bitmaps are sized for the old disk: they must say
            // in_use before the header's size changes (a crash between the
            // two would leave bitmaps neither vdisk nor QEMU can load).
            self.mark_bitmaps_for_change()?;
        }
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
        // Held until the bits follow the new size, so no write into the new
        // range can set a bit the resize would then drop (bitmaps come
        // before alloc in the lock order; nothing below records writes).
        let mut bitmaps = self.bitmaps.write();
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
        drop(_a);
        bitmap::resize_bits(&mut bitmaps, new_size);
        Ok(())
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
        let bytes = table::encode(l1.iter().copied(), (clusters * cs) as usize);
        self.swap_table(
            a,
            HeaderTable::L1,
            off,
            &bytes,
            |h| {
                h.l1_table_offset = off;
                h.l1_size = needed as u32;
            },
            FreeOld::Now,
        )?;
        self.map.write().l1 = l1;
        Ok(())
    }
}
