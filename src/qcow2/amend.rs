//! Changing an existing image's options (`qemu-img amend`): the compat
//! level (0.10 ↔ 1.1), lazy refcounts, the refcount width, the data file
//! name. Resizing and the backing file
//! name have their own calls ([`Qcow2::resize_with`],
//! [`Qcow2::set_backing_file`]).

use super::header::{self, CompressionType};
use super::l2::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO};
use super::table;
use super::Qcow2;
use crate::error::{Error, Result};

impl Qcow2 {
    /// Turns lazy refcounts on (compat 1.1 only) or off. Turning them off
    /// first writes every cached refcount and clears the dirty bit, so the
    /// image is consistent without them.
    pub fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        self.check_writable()?;
        if on && self.header.lock().version < 3 {
            return Err(self.err(
                Error::invalid_argument("lazy refcounts need compat=1.1 (amend -o compat=1.1 first)")
                    .with_field("lazy_refcounts"),
            ));
        }
        if !on {
            // Refcounts on disk, dirty bit cleared (what close does).
            self.close_impl()?;
        }
        let Some(alloc) = &self.alloc else {
            return Err(self.err(Error::read_only("amend")));
        };
        let mut a = alloc.lock();
        let mut h = self.header.lock();
        if on {
            h.compatible_features |= header::COMPAT_LAZY_REFCOUNTS;
        } else {
            h.compatible_features &= !header::COMPAT_LAZY_REFCOUNTS;
        }
        self.write_header_locked(&mut h)?;
        drop(h);
        self.file.sync()?;
        a.lazy = on;
        Ok(())
    }

    /// Changes the refcount width to `bits` (1, 2, 4, ..., 64; compat 1.1
    /// for anything but 16), as `qemu-img amend -o refcount_bits=N`: the
    /// refcounts are recounted from the references into new structures,
    /// which the header switches to in one write; the old ones become free
    /// space. Refused when a cluster is referenced more often than the new
    /// width can count (snapshots share clusters).
    pub fn set_refcount_bits(&self, bits: u64) -> Result<()> {
        self.check_writable()?;
        if !bits.is_power_of_two() || bits > 64 {
            return Err(self.err(
                Error::invalid_argument(format!("refcount width {bits} is not a power of two up to 64"))
                    .with_field("refcount_bits"),
            ));
        }
        let order = bits.trailing_zeros();
        {
            let h = self.header.lock();
            if h.refcount_order == order {
                return Ok(());
            }
            if h.version < 3 {
                return Err(self.err(
                    Error::invalid_argument(
                        "different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                    )
                    .with_field("refcount_bits"),
                ));
            }
        }
        // Queued frees applied and every table on disk: the recount sees
        // exactly what the image references.
        self.flush_impl()?;
        self.rebuild_refcounts_as(order)?;
        self.file.sync()
    }

    /// Renames the external data file the image records (`qemu-img amend
    /// -o data_file=NAME`): only for an image that has one; the file
    /// itself is neither moved nor checked, as QEMU does.
    pub fn set_data_file(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        if !self.geo.data_file {
            return Err(self.err(
                Error::invalid_argument("data-file can only be set for images that use an external data file")
                    .with_field("data_file"),
            ));
        }
        if name.is_empty() || name.len() > 1023 {
            return Err(self
                .err(Error::invalid_argument("the data file name must have 1 to 1023 bytes").with_field("data_file")));
        }
        self.flush_impl()?;
        let mut h = self.header.lock();
        let old = h.data_file.replace(name.to_string());
        let r = self.write_header_locked(&mut h).and_then(|_| self.file.sync());
        if r.is_err() {
            h.data_file = old;
        }
        r.map_err(|e| self.err(e))
    }

    /// Upgrades a compat 0.10 (version 2) image to compat 1.1 (version 3)
    /// in place: only the header changes (a version 2 image uses nothing
    /// version 3 reads differently). Reopen the image to use what version 3
    /// adds (zero clusters, lazy refcounts). Downgrading works as
    /// `qemu-img amend -o compat=0.10` does: refused, with QEMU's messages,
    /// for refcount widths other than 16 bits, a data file, extended L2
    /// entries and zstd-compressed clusters, and also for persistent
    /// bitmaps and snapshots holding zero clusters; zero clusters of the
    /// active layer keep their host cluster filled with zeros, or become
    /// unallocated (zeros as data over a backing file); lazy refcounts are
    /// written and turned off; the header is written last.
    pub fn set_compat(&self, compat: &str) -> Result<()> {
        self.check_writable()?;
        let h = self.header.lock();
        match (compat, h.version) {
            ("1.1" | "v3", 3) | ("0.10" | "v2", 2) => Ok(()),
            ("1.1" | "v3", 2) => {
                // Everything written so far is on disk before the header
                // announces the new version.
                drop(h);
                self.flush_impl()?;
                let mut h = self.header.lock();
                h.version = 3;
                h.refcount_order = 4;
                let r = self.write_header_locked(&mut h).and_then(|_| self.file.sync());
                if r.is_err() {
                    h.version = 2;
                }
                r.map_err(|e| self.err(e))
            }
            ("0.10" | "v2", _) => {
                drop(h);
                self.downgrade().map_err(|e| self.err(e))
            }
            (other, _) => {
                Err(self
                    .err(Error::invalid_argument(format!("compat '{other}' is not 0.10 or 1.1")).with_field("compat")))
            }
        }
    }

    /// Downgrades a compat 1.1 image to compat 0.10 (version 2), as
    /// `qemu-img amend -o compat=0.10`: refused, with QEMU's messages, for
    /// refcount widths other than 16 bits, a data file, extended L2 entries
    /// and zstd-compressed clusters; also refused (QEMU would leave them
    /// inconsistent) for persistent bitmaps, and (QEMU rewrites them) for
    /// internal snapshots holding zero clusters. Zero clusters of the
    /// active layer with a host cluster keep it, written with zeros; those
    /// without become unallocated (no backing file: they read as zeros
    /// either way) or clusters of zeros (over a backing file); lazy
    /// refcounts are written and turned off, and the header is written as
    /// version 2 last: a crash before that leaves a valid version 3 image
    /// with at most leaked clusters.
    fn downgrade(&self) -> Result<()> {
        {
            let h = self.header.lock();
            if h.refcount_order != 4 {
                return Err(
                    Error::invalid_argument("compat=0.10 requires refcount_bits=16").with_field("refcount_bits")
                );
            }
            if self.geo.data_file {
                return Err(
                    Error::invalid_argument("Cannot downgrade an image with a data file").with_field("data_file")
                );
            }
            let incompatible = h.incompatible_features
                & !(header::INCOMPAT_DIRTY | header::INCOMPAT_COMPRESSION | header::INCOMPAT_DATA_FILE);
            if incompatible != 0 {
                return Err(Error::invalid_argument(format!(
                    "Cannot downgrade an image with incompatible features {incompatible:#x} set"
                ))
                .with_field("incompatible_features"));
            }
        }
        let names: Vec<String> = self.bitmaps().into_iter().map(|b| b.name).collect();
        if !names.is_empty() {
            return Err(Error::invalid_argument(format!(
                "the image has persistent bitmaps ({}), which compat=0.10 cannot keep: remove them first (vdisk bitmap --remove)",
                names.join(", ")
            ))
            .with_field("bitmaps"));
        }
        // Everything on disk, refcounts written, the dirty bit cleared.
        self.close_impl()?;
        let (l1_offset, l1_size, zstd) = {
            let h = self.header.lock();
            (h.l1_table_offset, h.l1_size, h.compression_type == CompressionType::Zstd)
        };
        let snapshots: Vec<(String, u64, u32)> =
            self.snapshots.read().iter().map(|s| (s.name.clone(), s.l1_table_offset, s.l1_size)).collect();
        // Every table is looked at one L2 table at a time: nothing here
        // is sized by the number of clusters of the image.
        let mut compressed = false;
        for (name, off, n) in &snapshots {
            let mut zero = false;
            self.scan_l2_tables(*off, *n, &mut |_, t| {
                compressed |= t.iter().any(|&e| e & OFLAG_COMPRESSED != 0);
                zero |= t.iter().any(|&e| e & OFLAG_COMPRESSED == 0 && e & OFLAG_ZERO != 0);
                Ok(())
            })?;
            if zero {
                return Err(Error::invalid_argument(format!(
                    "snapshot '{name}' holds zero clusters, which compat=0.10 cannot express: delete the snapshot first"
                ))
                .with_field("snapshots"));
            }
        }
        if zstd {
            self.scan_l2_tables(l1_offset, l1_size, &mut |_, t| {
                compressed |= t.iter().any(|&e| e & OFLAG_COMPRESSED != 0);
                Ok(())
            })?;
            if compressed {
                return Err(Error::invalid_argument(
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters",
                )
                .with_field("compression_type"));
            }
        }
        // Zero clusters of the active layer, as runs of clusters within each
        // L2 table: those with a host cluster keep it, filled with zeros (a
        // preallocated image stays preallocated), as do all of them over a
        // backing file (which must not show through); the others become
        // unallocated. A table is read from the file before any of its
        // entries change, and changes touch only that table's entries.
        let cs = self.geo.cluster_size();
        let size = crate::device::BlockDevice::size(self);
        let backing = self.has_backing();
        self.scan_l2_tables(l1_offset, l1_size, &mut |first, t| {
            let mut runs: Vec<(u64, u64, bool)> = Vec::new();
            for (j, &e) in t.iter().enumerate() {
                if e & OFLAG_COMPRESSED != 0 || e & OFLAG_ZERO == 0 {
                    continue;
                }
                let off = (first + j as u64) * cs;
                let as_data = e & OFFSET_MASK != 0 || backing;
                match runs.last_mut() {
                    Some((s, l, d)) if *s + *l == off && *d == as_data => *l += cs,
                    _ => runs.push((off, cs, as_data)),
                }
            }
            for (off, len, as_data) in runs {
                let len = len.min(size.saturating_sub(off));
                if len == 0 {
                    continue;
                }
                if as_data {
                    crate::storage::write_zeros_with(off, len, |buf, at| self.write_impl(buf, at))?;
                } else {
                    self.discard_all(off, len)?;
                }
            }
            Ok(())
        })?;
        self.flush_impl()?;
        self.set_lazy_refcounts(false)?;
        let Some(alloc) = &self.alloc else {
            return Err(Error::read_only("amend"));
        };
        let _a = alloc.lock();
        let mut h = self.header.lock();
        let old = h.clone();
        h.version = 2;
        h.refcount_order = 4;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = CompressionType::Zlib;
        h.feature_names.clear();
        let r = self.write_header_locked(&mut h).and_then(|_| self.file.sync());
        if r.is_err() {
            *h = old;
            return r;
        }
        self.compression.store(0, std::sync::atomic::Ordering::Release);
        self.version.store(2, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Calls `f` with each L2 table an L1 table at `l1_offset` of
    /// `l1_size` entries points at, read from the file (the caller
    /// flushed), and the index of the table's first cluster.
    fn scan_l2_tables(&self, l1_offset: u64, l1_size: u32, f: &mut dyn FnMut(u64, &[u64]) -> Result<()>) -> Result<()> {
        let file = &*self.file;
        let l1 = table::read_u64_table(file, l1_offset, l1_size as usize, "L1 table")?;
        let n = self.geo.l2_entries();
        for (i, e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let t = table::read_u64_table(file, l2, n as usize, "L2 table")?;
            f(i as u64 * n, &t)?;
        }
        Ok(())
    }
}
