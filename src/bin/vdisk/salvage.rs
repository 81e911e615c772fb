//! `convert --salvage`: a read-only view of a source that keeps going past
//! read errors, as qemu-img's option does. A read that fails is retried
//! sector by sector; sectors that still fail read as zeros and are reported
//! on standard error. A `map` that fails reports data (so it is read, and
//! salvaged where it can be).

use std::sync::atomic::{AtomicU64, Ordering};

use vdisk::{BlockDevice, DeviceInfo, Extent, ExtentKind, Result};

/// The salvaging view of a device.
#[derive(Debug)]
pub struct Salvage<'a> {
    inner: &'a dyn BlockDevice,
    errors: AtomicU64,
}

impl<'a> Salvage<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a dyn BlockDevice) -> Salvage<'a> {
        Salvage { inner, errors: AtomicU64::new(0) }
    }

    /// Bytes that could not be read and were given as zeros.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

impl BlockDevice for Salvage<'_> {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.inner.read_at(buf, offset).is_ok() {
            return Ok(());
        }
        for (k, sector) in buf.chunks_mut(512).enumerate() {
            let off = offset + k as u64 * 512;
            if let Err(e) = self.inner.read_at(sector, off) {
                eprintln!("vdisk: warning: error while reading offset {off}: {e}");
                sector.fill(0);
                self.errors.fetch_add(sector.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        match self.inner.map(offset, max_len) {
            Ok(e) => Ok(e),
            Err(_) => Ok(Extent {
                offset,
                length: max_len.min(self.size().saturating_sub(offset)).min(1 << 20),
                kind: ExtentKind::Data { host_offset: None },
                depth: 0,
                encrypted: false,
            }),
        }
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.inner.backing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device whose bytes in `[bad, bad + 1024)` cannot be read.
    #[derive(Debug)]
    struct Flaky {
        bad: u64,
    }

    impl BlockDevice for Flaky {
        fn info(&self) -> DeviceInfo {
            DeviceInfo::new(vdisk::Format::Raw, 8192, true)
        }
        fn size(&self) -> u64 {
            8192
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if offset < self.bad + 1024 && offset + buf.len() as u64 > self.bad {
                return Err(vdisk::Error::invalid("bad sector").with_offset(offset));
            }
            buf.fill(7);
            Ok(())
        }
        fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
            Err(vdisk::Error::invalid("no map").with_offset(offset + max_len))
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn unreadable_sectors_read_as_zeros_and_are_counted() {
        let f = Flaky { bad: 2048 };
        let s = Salvage::new(&f);
        let mut buf = vec![1u8; 8192];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..2048].iter().all(|&b| b == 7));
        assert!(buf[2048..3072].iter().all(|&b| b == 0));
        assert!(buf[3072..].iter().all(|&b| b == 7));
        assert_eq!(s.errors(), 1024);
        assert!(matches!(s.map(0, 8192).unwrap().kind, ExtentKind::Data { .. }));
    }
}
