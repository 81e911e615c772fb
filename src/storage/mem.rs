//! [`MemStorage`]: bytes in memory, growable, with an optional size limit
//! (what fuzz targets and unit tests run on).

use parking_lot::RwLock;

use super::{range_end, Storage};
use crate::error::{Error, Result};

/// A growable byte vector: images kept in memory, tests and fuzz targets.
///
/// An optional length limit makes writes or `set_len` beyond it fail with
/// [`ErrorKind::LimitExceeded`](crate::ErrorKind::LimitExceeded), so a fuzz target cannot be driven into
/// allocating without bound.
#[derive(Debug)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    limit: u64,
    read_only: bool,
}

impl Default for MemStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStorage {
    /// An empty storage with no length limit.
    pub fn new() -> Self {
        Self::with_limit(u64::MAX)
    }

    /// An empty storage that refuses to grow past `limit` bytes.
    pub fn with_limit(limit: u64) -> Self {
        MemStorage { data: RwLock::new(Vec::new()), limit, read_only: false }
    }

    /// A storage holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        MemStorage { data: RwLock::new(bytes), limit: u64::MAX, read_only: false }
    }

    /// Sets the length limit.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    /// Makes the storage refuse writes.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().clone()
    }

    fn check_len(&self, end: u64) -> Result<usize> {
        if end > self.limit {
            return Err(Error::limit(format!("memory storage limit of {} bytes reached (wanted {end})", self.limit)));
        }
        usize::try_from(end).map_err(|_| Error::limit(format!("length {end} does not fit in memory")))
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        range_end(offset, buf.len())?;
        let data = self.data.read();
        copy_out(&data, buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write"));
        }
        let end = self.check_len(range_end(offset, buf.len())?)?;
        let mut data = self.data.write();
        if data.len() < end {
            data.resize(end, 0);
        }
        let start = end - buf.len();
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("truncate"));
        }
        let len = self.check_len(len)?;
        self.data.write().resize(len, 0);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("discard"));
        }
        let mut data = self.data.write();
        let dlen = data.len() as u64;
        let start = offset.min(dlen) as usize;
        let end = offset.saturating_add(len).min(dlen) as usize;
        data[start..end].fill(0);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// Copies `data[offset..]` into `buf`, zero-filling what lies past the end.
pub(crate) fn copy_out(data: &[u8], buf: &mut [u8], offset: u64) {
    let dlen = data.len() as u64;
    if offset >= dlen {
        buf.fill(0);
        return;
    }
    let start = offset as usize;
    let n = buf.len().min(data.len() - start);
    buf[..n].copy_from_slice(&data[start..start + n]);
    buf[n..].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn mem_reads_past_end_as_zero() {
        let m = MemStorage::from_vec(vec![1, 2, 3]);
        let mut b = [9u8; 5];
        m.read_at(&mut b, 1).unwrap();
        assert_eq!(b, [2, 3, 0, 0, 0]);
        m.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [0; 5]);
    }

    #[test]
    fn mem_limit() {
        let m = MemStorage::with_limit(10);
        m.write_at(&[1; 10], 0).unwrap();
        let e = m.write_at(&[1], 10).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::LimitExceeded);
        assert_eq!(m.set_len(11).unwrap_err().kind(), ErrorKind::LimitExceeded);
    }

    #[test]
    fn overflowing_offset_is_an_error() {
        let m = MemStorage::new();
        let mut b = [0u8; 2];
        assert!(m.read_at(&mut b, u64::MAX).is_err());
        assert!(m.write_at(&b, u64::MAX).is_err());
    }
}
