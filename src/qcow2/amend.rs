//! Changing an existing image's options (`qemu-img amend`): the compat
//! level (0.10 → 1.1) and lazy refcounts. Resizing and the backing file
//! name have their own calls ([`Qcow2::resize_with`],
//! [`Qcow2::set_backing_file`]).

use super::header;
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
    /// adds (zero clusters, lazy refcounts). Downgrading is refused.
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
            ("0.10" | "v2", _) => Err(self.err(
                Error::unsupported("downgrading an image to compat=0.10 is not supported by vdisk")
                    .with_field("compat"),
            )),
            (other, _) => {
                Err(self
                    .err(Error::invalid_argument(format!("compat '{other}' is not 0.10 or 1.1")).with_field("compat")))
            }
        }
    }
}
