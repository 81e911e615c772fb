//! Handing an image between hosts (live migration) and rereading metadata
//! another host changed.
//!
//! QEMU ends a live migration with `bdrv_inactivate_all` on the source and
//! `bdrv_activate` on the destination; both QEMUs have the image open the
//! whole time (on shared storage), but only the active one may touch it.
//! [`BlockDevice::inactivate`](crate::BlockDevice::inactivate) here does the
//! source's part: new guest I/O is refused, in-flight requests finish,
//! everything is flushed and the image left clean (lazy refcounts written,
//! dirty bit cleared, bitmaps stored without `in_use`), cached L2 tables and
//! decompressed clusters are dropped and the write locks released; the
//! image stays open holding only the consistent-read byte, which shares
//! everything. [`activate`](crate::BlockDevice::activate) does the
//! destination's: it takes the write locks back (refused while another open
//! holds them) and rereads the header, L1 table, refcount table, snapshot
//! table and bitmap directory as the other side left them (rebuilding
//! refcounts when the other side crashed with lazy refcounts). A device
//! opened read-only rereads the same way on
//! [`refresh`](crate::BlockDevice::refresh).
//!
//! What an open fixed — cluster size, extended L2 entries, external data
//! file, version, compression type, encryption — must not have changed: the
//! image is then refused until reopened.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::alloc::AllocState;
use super::header::{self, Header};
use super::refcount::{self, Refcounts};
use super::snapshot::{self, Snapshot};
use super::table::{self, Reserved};
use super::{bitmap, Qcow2};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::lock::{self, Held};
use crate::storage::Storage;

/// The device serves guest I/O.
pub(crate) const ACTIVE: u8 = 0;
/// [`Qcow2::inactivate_impl`] is flushing: new guest I/O is refused.
pub(crate) const INACTIVATING: u8 = 1;
/// Handed off: guest I/O is refused and nothing is written.
pub(crate) const INACTIVE: u8 = 2;
/// [`Qcow2::activate_impl`] is rereading and repairing: guest I/O is still
/// refused (a write must not allocate from refcounts a crashed host left
/// behind).
pub(crate) const ACTIVATING: u8 = 3;

/// The metadata tables read from the image, as an open or an activation
/// finds them.
pub(super) struct Tables {
    pub l1: Vec<u64>,
    pub snapshots: Vec<Snapshot>,
    pub reserved: Reserved,
}

/// Reads and validates the L1 table and the snapshot table `h` names.
pub(super) fn read_tables(file: &dyn Storage, h: &Header) -> Result<Tables> {
    let cs = h.cluster_size();
    // Tables must lie inside the file: a table past the end means a
    // truncated or hostile image (QEMU would read zeros there).
    let file_len = file.len()?;
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    for (field, off, len) in [
        ("l1_table_offset", h.l1_table_offset, u64::from(h.l1_size) * 8),
        ("refcount_table_offset", h.refcount_table_offset, rt_bytes),
    ] {
        if len > 0 && off + len > file_len {
            return Err(Error::invalid(format!(
                "table at {off:#x} of {len} bytes runs past the end of the file ({file_len} bytes)"
            ))
            .with_field(field)
            .with_offset(off));
        }
    }
    let l1 = table::read_u64_table(file, h.l1_table_offset, h.l1_size as usize, "L1 table")?;
    // Snapshots (validated; their tables are read on demand).
    let (mut snapshots, snap_table_len) = snapshot::read_table(file, h.snapshots_offset, h.nb_snapshots, cs)?;
    // An entry without the disk size (extra data shorter than 16 bytes, old
    // QEMU) has the image's size, as QEMU reads it; recorded now so that
    // rewriting the table does not turn it into 0.
    for s in &mut snapshots {
        s.disk_size.get_or_insert(h.size);
    }
    let reserved = Reserved::new(h, &snapshots, snap_table_len);
    Ok(Tables { l1, snapshots, reserved })
}

/// Loads the refcount structures and a fresh allocator state for a
/// read-write open.
pub(super) fn load_alloc(
    file: &dyn Storage,
    h: &Header,
    reserved: &Arc<parking_lot::RwLock<Reserved>>,
) -> Result<AllocState> {
    let cs = h.cluster_size();
    let rc = Refcounts::load(
        file,
        h.refcount_order,
        h.cluster_bits,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        Arc::clone(reserved),
    )?;
    for (i, &e) in rc.table.iter().enumerate() {
        let off = e & refcount::REFT_OFFSET_MASK;
        if off != 0 && reserved.read().overlaps(off, cs) {
            return Err(Error::corrupt(format!("refcount block {i} at {off:#x} overlaps the image's metadata"))
                .with_field("refcount table"));
        }
    }
    Ok(AllocState {
        rc,
        pending: Vec::new(),
        pending_punch: Vec::new(),
        inflight: super::alloc::InFlight::default(),
        l1_dirty: false,
        data_written: false,
        compressed_next: 0,
        alloc_end: 0,
        len_at_open: file.len()?,
        lazy: h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
        marked_dirty: false,
    })
}

impl Qcow2 {
    /// Enters the I/O gate and then checks that the image is active: in this
    /// order, so a request is either refused or waited for by `inactivate`
    /// (which changes the state, then waits for the requests inside the gate).
    #[inline]
    pub(crate) fn enter_active(&self) -> Result<crate::quiesce::Guard<'_>> {
        let g = self.gate.enter();
        self.check_active()?;
        Ok(g)
    }

    /// Refuses guest I/O on an inactive (handed-off) image.
    #[inline]
    pub(crate) fn check_active(&self) -> Result<()> {
        if self.activity.load(Ordering::Acquire) != ACTIVE {
            return Err(self.err(Error::new(
                ErrorKind::ReadOnly,
                "the image is inactive: it was handed off to another host or process (activate it to use it again)",
            )));
        }
        Ok(())
    }

    /// Whether the image is handed off.
    pub(crate) fn inactive(&self) -> bool {
        self.activity.load(Ordering::Acquire) == INACTIVE
    }

    /// The files whose write locks a handoff drops and takes back: the
    /// image file and an external data file.
    fn handoff_locks(&self) -> Vec<(lock::LockPlan, &std::fs::File, &std::path::Path)> {
        if self.alloc.is_none() {
            return Vec::new();
        }
        let mut v = Vec::new();
        let data = (!Arc::ptr_eq(&self.file, &self.data)).then_some(&self.data);
        for st in std::iter::once(&self.file).chain(data) {
            if let (Held::Locked(plan), Some(f)) = (st.image_locks(), st.file()) {
                v.push((plan, f, st.path().unwrap_or(std::path::Path::new(""))));
            }
        }
        v
    }

    fn downgrade_locks(&self) {
        for (plan, f, _) in self.handoff_locks() {
            lock::downgrade_to_inactive(f, plan);
        }
    }

    pub(crate) fn inactivate_impl(&self) -> Result<()> {
        match self.activity.compare_exchange(ACTIVE, INACTIVATING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {}
            Err(INACTIVE) => return Ok(()),
            Err(_) => return Err(self.err(Error::new(ErrorKind::Busy, "the image is being activated or inactivated"))),
        }
        // Requests that got past the check before it changed finish first.
        self.gate.wait_for_readers();
        if let Err(e) = self.close_impl() {
            self.activity.store(ACTIVE, Ordering::Release);
            return Err(e);
        }
        self.drop_caches();
        self.downgrade_locks();
        self.activity.store(INACTIVE, Ordering::Release);
        Ok(())
    }

    pub(crate) fn activate_impl(&self) -> Result<()> {
        match self.activity.compare_exchange(INACTIVE, ACTIVATING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {}
            Err(ACTIVE) => return Ok(()),
            Err(_) => return Err(self.err(Error::new(ErrorKind::Busy, "the image is being activated or inactivated"))),
        }
        let back = |e: Error| -> Result<()> {
            self.drop_caches();
            self.downgrade_locks();
            self.activity.store(INACTIVE, Ordering::Release);
            Err(self.err(e))
        };
        for (plan, f, path) in self.handoff_locks() {
            if let Err(e) = lock::reactivate(f, path, plan) {
                return back(e);
            }
        }
        if let Err(e) = self.reload() {
            return back(e);
        }
        // Another host may have crashed with lazy refcounts: rebuild them
        // before any guest write may allocate, as an open does. If that
        // fails the image is handed back rather than used with doubtful
        // refcounts.
        if self.alloc.is_some() && self.header.lock().incompatible_features & header::INCOMPAT_DIRTY != 0 {
            if let Err(e) = self.repair_dirty() {
                return back(e);
            }
        }
        self.activity.store(ACTIVE, Ordering::Release);
        Ok(())
    }

    pub(crate) fn refresh_impl(&self) -> Result<()> {
        if self.alloc.is_some() {
            return Err(self.err(Error::invalid_argument(
                "refresh rereads the metadata of a read-only open; a read-write open owns the image (inactivate and activate hand it over)",
            )));
        }
        self.check_active()?;
        self.reload().map_err(|e| self.err(e))
    }

    fn drop_caches(&self) {
        self.map.write().l2.clear();
        self.zcache.clear();
    }

    /// Rereads the header and every table from the file, replacing what is
    /// cached. Nothing dirty may be cached (the image is inactive, or
    /// read-only).
    fn reload(&self) -> Result<()> {
        let h = Self::read_header(&*self.file)?;
        {
            let old = self.header.lock();
            for (field, was, now) in [
                ("cluster_bits", u64::from(old.cluster_bits), u64::from(h.cluster_bits)),
                ("version", u64::from(old.version), u64::from(h.version)),
                ("crypt_method", u64::from(old.crypt_method), u64::from(h.crypt_method)),
                ("extended L2 entries", u64::from(old.extended_l2()), u64::from(h.extended_l2())),
                ("compression_type", old.compression_type as u64, h.compression_type as u64),
                (
                    "external data file",
                    u64::from(old.incompatible_features & header::INCOMPAT_DATA_FILE != 0),
                    u64::from(h.incompatible_features & header::INCOMPAT_DATA_FILE != 0),
                ),
            ] {
                if was != now {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("{field} changed from {was} to {now} while the image was shared: reopen it"),
                    )
                    .with_field(field));
                }
            }
            for (field, was, now) in
                [("backing file", &old.backing_file, &h.backing_file), ("data file", &old.data_file, &h.data_file)]
            {
                if was != now {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("the {field} changed from {was:?} to {now:?} while the image was shared: reopen it"),
                    )
                    .with_field(field));
                }
            }
        }
        let writable = self.alloc.is_some();
        if writable && h.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
            return Err(Error::corrupt(
                "another host marked the image corrupt: open it read-only, or repair it with check -r all",
            )
            .with_field("incompatible_features"));
        }
        let t = read_tables(&*self.file, &h)?;
        let cs = h.cluster_size();
        let dir = bitmap::read_directory(&*self.file, &h)?;
        let bitmaps = bitmap::BitmapState::open(&*self.file, dir, h.size, cs, writable)?;
        let drop_stale_bitmaps =
            writable && h.bitmaps.is_some() && h.autoclear_features & header::AUTOCLEAR_BITMAPS == 0;
        // Lock order: bitmaps, alloc, map, header, snapshots; reserved is a
        // leaf.
        let mut bm = self.bitmaps.write();
        let mut a = self.alloc.as_ref().map(|a| a.lock());
        if let Some(a) = a.as_deref_mut() {
            let old_reserved = std::mem::replace(&mut *self.reserved.write(), t.reserved);
            match load_alloc(&*self.file, &h, &self.reserved) {
                Ok(fresh) => *a = fresh,
                Err(e) => {
                    *self.reserved.write() = old_reserved;
                    return Err(e);
                }
            }
        } else {
            *self.reserved.write() = t.reserved;
        }
        let mut m = self.map.write();
        m.l1 = t.l1;
        m.l2.clear();
        self.bitmaps_tracking.store(writable && bitmaps.tracking(), Ordering::Release);
        *bm = bitmaps;
        self.size.store(h.size, Ordering::Release);
        let mut hg = self.header.lock();
        *hg = h;
        if drop_stale_bitmaps {
            hg.bitmaps = None;
            self.write_header_locked(&mut hg)?;
            self.file.sync()?;
        }
        *self.snapshots.write() = t.snapshots;
        drop((hg, m, a, bm));
        self.zcache.clear();
        Ok(())
    }
}
