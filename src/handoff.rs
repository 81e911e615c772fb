//! The handoff state of a format whose metadata is small enough to reread
//! whole (VDI): an inactive flag and a gate every request passes, so that
//! [`BlockDevice::inactivate`](crate::BlockDevice::inactivate) waits for
//! the requests in flight before it flushes and lets the write locks go,
//! and [`activate`](crate::BlockDevice::activate) takes them back and
//! reloads the metadata before requests run again. The lock handling is
//! raw's and qcow2's (`storage::lock`): the inactive set (QEMU's
//! consistent-read byte) stays held throughout.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{RwLock, RwLockReadGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::lock::{self, Held};
use crate::storage::Storage;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    inactive: AtomicBool,
    gate: RwLock<()>,
}

impl Handoff {
    pub(crate) fn new(inactive: bool) -> Handoff {
        Handoff { inactive: AtomicBool::new(inactive), gate: RwLock::new(()) }
    }

    pub(crate) fn is_inactive(&self) -> bool {
        self.inactive.load(Ordering::Acquire)
    }

    /// Enters for one request (not reentrant: a request enters once, at
    /// the trait method); refused while inactive.
    pub(crate) fn enter(&self, format: &'static str) -> Result<RwLockReadGuard<'_, ()>> {
        let g = self.gate.read();
        if self.is_inactive() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the image is inactive: it was handed off to another host or process (activate it to use it again)",
            )
            .with_format(format));
        }
        Ok(g)
    }

    /// The write locks to hand over: those a read-write open holds.
    fn plan(storage: &dyn Storage, read_only: bool) -> Option<(lock::LockPlan, &std::fs::File)> {
        match storage.image_locks() {
            Held::Locked(plan) if !read_only => storage.file().map(|f| (plan, f)),
            _ => None,
        }
    }

    /// Waits for the requests in flight, runs `flush` (which must leave
    /// the image as a clean close leaves it), then releases the write
    /// locks. A failed flush leaves the image active.
    pub(crate) fn inactivate(
        &self,
        storage: &dyn Storage,
        read_only: bool,
        flush: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let _all = self.gate.write();
        if self.is_inactive() {
            return Ok(());
        }
        flush()?;
        self.inactive.store(true, Ordering::Release);
        if let Some((plan, f)) = Self::plan(storage, read_only) {
            lock::downgrade_to_inactive(f, plan);
        }
        Ok(())
    }

    /// Takes the write locks back (`Busy` while another process holds
    /// them) and runs `reload`, which rereads the metadata another host
    /// may have changed. On any failure the image stays inactive.
    pub(crate) fn activate(
        &self,
        storage: &dyn Storage,
        read_only: bool,
        format: &'static str,
        reload: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let _all = self.gate.write();
        if !self.is_inactive() {
            return Ok(());
        }
        let relock = Self::plan(storage, read_only);
        if let Some((plan, f)) = relock {
            let path = storage.path().map(|p| p.to_path_buf()).unwrap_or_default();
            lock::reactivate(f, &path, plan).map_err(|e| e.with_format(format))?;
        }
        if let Err(e) = reload() {
            if let Some((plan, f)) = relock {
                lock::downgrade_to_inactive(f, plan);
            }
            return Err(e);
        }
        self.inactive.store(false, Ordering::Release);
        Ok(())
    }

    /// Runs `reload` for [`BlockDevice::refresh`](crate::BlockDevice::refresh)
    /// of a read-only open, with no request in flight; a read-write open
    /// is refused (it owns the image: inactivate and activate hand it over).
    pub(crate) fn refresh(
        &self,
        read_only: bool,
        format: &'static str,
        reload: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if !read_only {
            return Err(Error::invalid_argument(
                "refresh rereads a read-only open; a read-write open owns the image (inactivate and activate hand it over)",
            )
            .with_format(format));
        }
        let _all = self.gate.write();
        if self.is_inactive() {
            return Err(Error::new(ErrorKind::ReadOnly, "the image is inactive").with_format(format));
        }
        reload()
    }
}
