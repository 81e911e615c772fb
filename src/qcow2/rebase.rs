//! Changing an image's backing file (`qemu-img rebase`).
//!
//! Safe mode ([`Qcow2::rebase`]) first copies into the image every range it
//! does not hold itself whose bytes differ between the old and the new
//! backing chain, then rewrites the backing file name and format in the
//! header. A crash before the header write leaves the image on its old
//! backing file with some ranges copied that read the same there: the guest
//! sees the same bytes at every moment. [`Qcow2::set_backing_file`] alone is
//! unsafe mode (`-u`): only the header changes.

use super::Qcow2;
use crate::device::{BlockDevice, ExtentKind, ZeroMode};
use crate::error::{Error, Result};
use crate::limits::QCOW2_MAX_BACKING_NAME;
use crate::storage::Aligned;

impl Qcow2 {
    /// Rewrites the backing file name and format in the header (`None`: no
    /// backing file), and syncs. Nothing else changes: the guest sees the
    /// new backing file's bytes wherever the image holds none (qemu-img
    /// rebase `-u`). The open device keeps reading its old backing image;
    /// reopen it to read through the new one.
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        if let Some(n) = name {
            if n.is_empty() || n.contains('\0') || n.len() > QCOW2_MAX_BACKING_NAME as usize {
                return Err(self.err(Error::invalid_argument(format!(
                    "backing file name '{n}' is empty, holds a NUL byte or is longer than {QCOW2_MAX_BACKING_NAME} bytes"
                ))));
            }
        }
        if let Some(f) = format {
            crate::device::Format::from_name(f).map_err(|e| self.err(e.with_field("backing_fmt")))?;
        }
        let mut h = self.header.lock();
        let old = (h.backing_file.clone(), h.backing_format.clone());
        h.backing_file = name.map(str::to_string);
        h.backing_format = name.and(format).map(str::to_string);
        let r = self.write_header_locked(&mut h).and_then(|_| self.file.sync());
        if r.is_err() {
            // Keep the in-memory header what the disk most likely holds.
            (h.backing_file, h.backing_format) = old;
        }
        self.backing_named.store(h.backing_file.is_some(), std::sync::atomic::Ordering::Release);
        drop(h);
        r.map_err(|e| self.err(e))
    }

    /// Moves the image onto `new_backing` (opened by the caller; `None`
    /// for no backing file), recorded as `name` with `format`, keeping what
    /// the guest sees: every range the image does not hold itself and that
    /// reads differently through `new_backing` is copied into the image
    /// first (zeros as zero clusters). Then the header changes, and the
    /// image is closed cleanly. `self` must have its current backing image
    /// open (the copy reads through it).
    pub fn rebase(self, new_backing: Option<&dyn BlockDevice>, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.rebase_with(new_backing, name, format, false)
    }

    /// [`rebase`](Self::rebase), writing the copied whole clusters
    /// compressed when `compress` (`qemu-img rebase -c`; a partial cluster
    /// is written as it is).
    pub fn rebase_with(
        self,
        new_backing: Option<&dyn BlockDevice>,
        name: Option<&str>,
        format: Option<&str>,
        compress: bool,
    ) -> Result<()> {
        self.check_writable()?;
        if compress && (self.crypt.is_some() || self.geo.data_file) {
            return Err(self.err(Error::unsupported(
                "compressed writes are not supported for encrypted images or images with an external data file",
            )));
        }
        if self.has_backing() && self.backing.is_none() {
            return Err(self.err(Error::invalid_argument(
                "the image's current backing file is not open: a safe rebase reads through it (open with a backing policy that follows it, or rebase unsafely)",
            )));
        }
        let size = self.size();
        let cs = self.geo.cluster_size();
        // Whole clusters per piece, at least 1 MiB.
        let piece = (1u64 << 20).div_ceil(cs) * cs;
        let mut old = Aligned::new(piece as usize);
        let mut new = Aligned::new(piece as usize);
        let mut pos = 0u64;
        while pos < size {
            let e = self.map(pos, size - pos)?;
            let len = e.length.max(1).min(size - pos);
            let own = e.depth == 0 && e.kind != ExtentKind::Unallocated;
            if !own {
                let mut at = pos;
                while at < pos + len {
                    let n = piece.min(pos + len - at);
                    self.copy_if_different(
                        new_backing,
                        at,
                        &mut old.as_mut_slice()[..n as usize],
                        new.as_mut_slice(),
                        compress,
                    )?;
                    at += n;
                }
            }
            pos += len;
        }
        self.flush_impl()?;
        self.set_backing_file(name, format)?;
        self.close()
    }

    /// Writes into the image the parts of `[at, at + old.len())` where the
    /// current view (through the old backing) differs from `new_backing`,
    /// compared cluster by cluster (the range starts on a cluster boundary
    /// or at an extent boundary inside one).
    fn copy_if_different(
        &self,
        new_backing: Option<&dyn BlockDevice>,
        at: u64,
        old: &mut [u8],
        new: &mut [u8],
        compress: bool,
    ) -> Result<()> {
        let n = old.len();
        self.read_at(old, at)?;
        let new = &mut new[..n];
        new.fill(0);
        if let Some(b) = new_backing {
            let bsize = b.size();
            if at < bsize {
                let m = (bsize - at).min(n as u64) as usize;
                b.read_at(&mut new[..m], at)?;
            }
        }
        let cs = self.geo.cluster_size();
        let mut i = 0usize;
        while i < n {
            let next = (((at + i as u64) / cs + 1) * cs - at) as usize;
            let j = next.min(n);
            if old[i..j] != new[i..j] {
                let off = at + i as u64;
                let whole = off.is_multiple_of(cs) && ((j - i) as u64 == cs || off + (j - i) as u64 == self.size());
                if old[i..j].iter().all(|&b| b == 0) {
                    self.write_zeroes(off, (j - i) as u64, ZeroMode::MayUnmap)?;
                } else if compress && whole {
                    self.write_compressed(&old[i..j], off)?;
                } else {
                    self.write_at(&old[i..j], off)?;
                }
            }
            i = j;
        }
        Ok(())
    }
}
