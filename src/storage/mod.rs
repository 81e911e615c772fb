//! Host bytes: the [`Storage`] trait under every format, and its
//! implementations.
//!
//! A format never touches `std::fs::File` directly; it holds an
//! `Arc<dyn Storage>`. That lets the same qcow2 code run on a file
//! ([`FileStorage`]), in memory under a fuzzer ([`MemStorage`]), and on a
//! storage that "loses power" after the N-th write in crash tests
//! (`FaultyStorage`, feature `test-utils`).
//!
//! Reads past the end of the storage return zeros, as QEMU's file layer does:
//! a qcow2 compressed cluster may legally run past the end of the file.

pub mod direct;
mod file;
pub mod lock;
mod mem;

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

pub use direct::{Aligned, DirectFile, ALIGN};
pub use file::FileStorage;
#[cfg(feature = "test-utils")]
pub(crate) use mem::copy_out;
pub use mem::MemStorage;

/// Positional access to the bytes of one host file (or a stand-in for one).
///
/// Implementations are `Send + Sync`; every method takes `&self` and may be
/// called from many threads at once.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Fills `buf` with the bytes at `offset`. Bytes past the end of the
    /// storage read as zeros. An empty `buf` is a no-op.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// The current length in bytes.
    fn len(&self) -> Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    fn sync(&self) -> Result<()>;

    /// Deallocates `[offset, offset + len)`, which then reads as zeros; the
    /// length does not change. `Unsupported` where the host cannot do it; the
    /// caller then writes zeros itself if it needs them.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::unsupported("punching holes is not supported by this storage"))
    }

    /// Reserves host space for `[offset, offset + len)` (growing the storage
    /// if the range ends past its end). `Unsupported` where the host cannot.
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::unsupported("preallocation is not supported by this storage"))
    }

    /// Describes the run that starts at `offset` (which must be below
    /// `len()`): whether it holds data (`true`) or is a hole that reads as
    /// zeros (`false`), and where the run ends. The default says "data up to
    /// the end", which is always a safe answer.
    fn region(&self, offset: u64) -> Result<(bool, u64)> {
        Ok((true, self.len()?.max(offset)))
    }

    /// Host bytes really allocated (`st_blocks * 512` for files), if known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;

    /// The file path, for error messages and relative backing names.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// The open file, where there is one (used for image locking).
    fn file(&self) -> Option<&File> {
        None
    }

    /// The QEMU-compatible image locks taken on [`Storage::file`] when it
    /// was opened (what a migration handoff drops and takes back).
    fn image_locks(&self) -> lock::Held {
        lock::Held::None
    }
}

pub(crate) fn range_end(offset: u64, len: usize) -> Result<u64> {
    offset
        .checked_add(len as u64)
        .ok_or_else(|| Error::new(ErrorKind::OutOfBounds, format!("offset {offset} + length {len} overflows")))
}

/// Stands in for a file the caller's policy did not open (an external data
/// file under `BackingPolicy::Never`): every access fails with the reason.
#[derive(Debug)]
pub struct Unopened {
    reason: String,
}

impl Unopened {
    /// A stand-in whose accesses fail with `reason`.
    pub fn new(reason: String) -> Self {
        Unopened { reason }
    }

    fn err(&self) -> Error {
        Error::new(ErrorKind::NotFound, self.reason.clone())
    }
}

impl Storage for Unopened {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(self.err())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(self.err())
    }
    fn len(&self) -> Result<u64> {
        Err(self.err())
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(self.err())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

impl<S: Storage + ?Sized> Storage for Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn len(&self) -> Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        (**self).set_len(len)
    }
    fn sync(&self) -> Result<()> {
        (**self).sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        (**self).allocate(offset, len)
    }
    fn region(&self, offset: u64) -> Result<(bool, u64)> {
        (**self).region(offset)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        (**self).allocated_bytes()
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn path(&self) -> Option<&Path> {
        (**self).path()
    }
    fn file(&self) -> Option<&File> {
        (**self).file()
    }
    fn image_locks(&self) -> lock::Held {
        (**self).image_locks()
    }
}

/// Writes zeros over `[offset, offset + len)` in bounded chunks.
pub(crate) fn write_zeroes_slow(s: &dyn Storage, offset: u64, len: u64) -> Result<()> {
    write_zeros_with(offset, len, |buf, at| s.write_at(buf, at))
}

/// Writes zeros over `[offset, offset + len)` through `write`, in pieces of
/// at most 1 MiB: how a file or a format without a cheaper way zeroes.
pub(crate) fn write_zeros_with(offset: u64, len: u64, mut write: impl FnMut(&[u8], u64) -> Result<()>) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        write(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}
