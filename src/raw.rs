//! The raw format: the guest disk is the host file, byte for byte.
//!
//! `map` reports holes found with `SEEK_DATA`/`SEEK_HOLE`; `discard` and
//! `write_zeroes` punch holes where the host can. Opening a file as raw never
//! looks at its content.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::device::{check_request, BlockDevice, DeviceInfo, Extent, ExtentKind, Format, ZeroMode};
use crate::error::{ErrorKind, Result};
use crate::storage::lock::{self, Held, LockPlan};
use crate::storage::{write_zeroes_slow, Storage};

/// A raw image over a [`Storage`].
#[derive(Debug)]
#[must_use = "call flush() to make writes durable"]
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    read_only: bool,
    /// Something was written since the last flush.
    unsynced: AtomicBool,
    /// Handed off to another host or process ([`BlockDevice::inactivate`]).
    inactive: AtomicBool,
    /// Writes enter this gate before they check `inactive`, so
    /// `inactivate` (which sets the flag, then waits for the writes inside)
    /// never flushes and lets the lock go under a write still running.
    gate: crate::quiesce::Quiesce,
}

impl Raw {
    /// Opens `storage` as a raw image whose size is the storage's length.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Raw> {
        let size = storage.len()?;
        let read_only = storage.is_read_only();
        Ok(Raw {
            storage,
            size: AtomicU64::new(size),
            read_only,
            unsynced: AtomicBool::new(false),
            inactive: AtomicBool::new(false),
            gate: crate::quiesce::Quiesce::new(),
        })
    }

    /// Opens `storage` as a raw image that starts inactive (the destination
    /// of a handoff; see [`BlockDevice::activate`]).
    pub fn open_inactive(storage: Arc<dyn Storage>) -> Result<Raw> {
        let r = Raw::open(storage)?;
        r.inactive.store(true, Ordering::Release);
        Ok(r)
    }

    /// Creates a raw image of `size` bytes (sparse) on an empty storage.
    pub fn create(storage: Arc<dyn Storage>, size: u64) -> Result<Raw> {
        storage.set_len(size)?;
        Raw::open(storage)
    }

    /// The storage underneath.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Flushes and closes the image, reporting a failure that dropping it
    /// (which flushes too) could not.
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    fn check_active(&self) -> Result<()> {
        if self.inactive.load(Ordering::Acquire) {
            return Err(crate::Error::new(
                ErrorKind::ReadOnly,
                "the image is inactive: it was handed off to another host or process (activate it to use it again)",
            )
            .with_format("raw"));
        }
        Ok(())
    }

    fn write_plan(&self) -> Option<(LockPlan, &std::fs::File)> {
        match self.storage.image_locks() {
            Held::Locked(plan) if !self.read_only => self.storage.file().map(|f| (plan, f)),
            _ => None,
        }
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        if self.read_only {
            return Err(crate::Error::read_only(what).with_format("raw"));
        }
        self.check_active()?;
        // A load first: writers on many threads then share the cache line
        // instead of bouncing it with a store on every request.
        if !self.unsynced.load(Ordering::Relaxed) {
            self.unsynced.store(true, Ordering::Release);
        }
        Ok(())
    }
}

impl Drop for Raw {
    /// Best effort flush of what was written and not flushed.
    fn drop(&mut self) {
        if self.unsynced.load(Ordering::Acquire) {
            let _ = self.storage.sync();
        }
    }
}

impl BlockDevice for Raw {
    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new(Format::Raw, self.size(), self.read_only);
        info.path = self.storage.path().map(|p| p.to_path_buf());
        info
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size())?;
        self.check_active()?;
        self.storage.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _g = self.gate.enter();
        self.check_writable("write")?;
        check_request(offset, buf.len() as u64, self.size())?;
        self.storage.write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let _g = self.gate.enter();
        self.check_writable("write_zeroes")?;
        check_request(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        if mode == ZeroMode::MayUnmap {
            match self.storage.punch_hole(offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Unsupported => {}
                Err(e) => return Err(e),
            }
        }
        write_zeroes_slow(&*self.storage, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.gate.enter();
        self.check_writable("discard")?;
        check_request(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        self.storage.punch_hole(offset, len)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.size();
        check_request(offset, 0, size)?;
        let max = max_len.min(size - offset);
        self.check_active()?;
        let (data, end) = if max == 0 { (true, offset) } else { self.storage.region(offset)? };
        // Past the end of a shorter storage reads as zeros.
        let len = end.saturating_sub(offset).clamp(max.min(1), max);
        let kind = if data {
            ExtentKind::Data { host_offset: Some(offset) }
        } else {
            ExtentKind::Zero { host_offset: Some(offset) }
        };
        Ok(Extent { offset, length: len, kind, depth: 0, encrypted: false })
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.unsynced.store(false, Ordering::Release);
        self.storage.sync().inspect_err(|_| self.unsynced.store(true, Ordering::Release))
    }

    fn inactivate(&self) -> Result<()> {
        if self.inactive.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Writes that passed the check before the flag changed finish
        // first: the flush covers them and none lands after the lock is
        // given to another host.
        self.gate.wait_for_readers();
        if let Err(e) = self.flush() {
            self.inactive.store(false, Ordering::Release);
            return Err(e);
        }
        if let Some((plan, f)) = self.write_plan() {
            lock::downgrade_to_inactive(f, plan);
        }
        Ok(())
    }

    fn activate(&self) -> Result<()> {
        if !self.inactive.load(Ordering::Acquire) {
            return Ok(());
        }
        let relock = self.write_plan();
        if let Some((plan, f)) = relock {
            let path = self.storage.path().map(|p| p.to_path_buf()).unwrap_or_default();
            lock::reactivate(f, &path, plan).map_err(|e| e.with_format("raw"))?;
        }
        // Another host may have resized the file.
        match self.storage.len() {
            Ok(len) => self.size.store(len, Ordering::Release),
            Err(e) => {
                if let Some((plan, f)) = relock {
                    lock::downgrade_to_inactive(f, plan);
                }
                return Err(e);
            }
        }
        self.inactive.store(false, Ordering::Release);
        Ok(())
    }

    fn is_inactive(&self) -> bool {
        self.inactive.load(Ordering::Acquire)
    }

    fn refresh(&self) -> Result<()> {
        self.check_active()?;
        if !self.read_only {
            return Err(crate::Error::invalid_argument(
                "refresh rereads a read-only open; a read-write open owns the image (inactivate and activate hand it over)",
            )
            .with_format("raw"));
        }
        self.size.store(self.storage.len()?, Ordering::Release);
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        let _g = self.gate.enter();
        self.check_writable("resize")?;
        self.storage.set_len(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// Memory storage whose writes take a while.
    #[derive(Debug)]
    struct Slow(MemStorage);

    impl Storage for Slow {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            std::thread::sleep(std::time::Duration::from_millis(200));
            self.0.write_at(buf, offset)
        }
        fn len(&self) -> Result<u64> {
            self.0.len()
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.0.set_len(len)
        }
        fn sync(&self) -> Result<()> {
            self.0.sync()
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn inactivate_waits_for_writes_in_flight() {
        let mem = MemStorage::new();
        mem.set_len(1 << 20).unwrap();
        let r = Raw::open(Arc::new(Slow(mem))).unwrap();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                r.write_at(&[7; 512], 0).unwrap();
                done.store(true, Ordering::Release);
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            r.inactivate().unwrap();
            assert!(done.load(Ordering::Acquire), "inactivate returned while a write was still running");
        });
        assert!(r.write_at(&[1; 512], 0).is_err());
    }

    #[test]
    fn read_write_bounds() {
        let r = Raw::create(Arc::new(MemStorage::new()), 4096).unwrap();
        r.write_at(&[1, 2, 3], 100).unwrap();
        let mut b = [0u8; 3];
        r.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert_eq!(r.read_at(&mut b, 4094).unwrap_err().kind(), ErrorKind::OutOfBounds);
        assert_eq!(r.write_at(&b, 4094).unwrap_err().kind(), ErrorKind::OutOfBounds);
        r.write_zeroes(100, 2, ZeroMode::MayUnmap).unwrap();
        r.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [0, 0, 3]);
        let e = r.map(0, u64::MAX).unwrap();
        assert_eq!(e.length, 4096);
        r.resize(8192).unwrap();
        assert_eq!(r.size(), 8192);
    }
}
