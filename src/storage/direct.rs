//! Host files opened with `O_DIRECT` (QEMU's `cache=none`): I/O bypasses
//! the page cache. The kernel wants offsets, lengths and buffers aligned to
//! the device's block size; [`DirectFile`] sends requests that already are
//! (offset, length and buffer on 4 KiB boundaries) straight to the file,
//! without an `fstat` (it keeps a lower bound of the file's length), aligns
//! the others with bounce buffers, and serializes the
//! read-modify-write of partial blocks so
//! concurrent partial writes to one block do not lose each other's bytes
//! (a whole-block write racing a partial write of the same block may be
//! undone by it: overlapping writes in flight have no defined order).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{FileStorage, Storage};
use crate::error::{Error, Result};

/// Alignment of offsets, lengths and buffers.
pub const ALIGN: u64 = 4096;
const STRIPES: usize = 64;

/// A heap buffer whose usable part starts on an [`ALIGN`] boundary (page
/// aligned). `O_DIRECT` needs it, and the kernel copies into and out of an
/// aligned buffer several times faster than a misaligned one.
#[derive(Debug, Clone)]
pub struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + ALIGN as usize];
        let start = (ALIGN as usize - (raw.as_ptr() as usize % ALIGN as usize)) % ALIGN as usize;
        Aligned { raw, start, len }
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// A file opened with `O_DIRECT`.
#[derive(Debug)]
pub struct DirectFile {
    /// The `O_DIRECT` descriptor; operations that move no data go straight
    /// to it.
    inner: FileStorage,
    /// Serialize read-modify-write of partial blocks (by block number).
    stripes: Vec<Mutex<()>>,
    /// Serializes writes that extend the file.
    grow: Mutex<()>,
    /// The file's length as this descriptor last saw or made it: a write
    /// that ends inside it needs no `fstat` and no `grow` lock. Only ever
    /// too small (another process may have grown the file), which sends a
    /// write down the careful path that reads the real length.
    known_len: AtomicU64,
}

/// Whether `buf` and `offset` are on [`ALIGN`] boundaries, so `O_DIRECT`
/// takes the caller's buffer as it is.
fn aligned(buf: &[u8], offset: u64) -> bool {
    offset.is_multiple_of(ALIGN)
        && (buf.len() as u64).is_multiple_of(ALIGN)
        && (buf.as_ptr() as usize).is_multiple_of(ALIGN as usize)
}

impl DirectFile {
    /// Opens an existing file with `O_DIRECT`.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<DirectFile> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| Error::io("cannot open file with O_DIRECT", e).with_path(path))?;
        let inner = FileStorage::from_file(file, path, read_only)?;
        let known_len = AtomicU64::new(inner.len()?);
        Ok(DirectFile {
            inner,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            grow: Mutex::new(()),
            known_len,
        })
    }

    fn err(&self, what: &str, e: std::io::Error, offset: u64) -> Error {
        Error::io(what.to_string(), e).with_path(self.inner.file_path()).with_offset(offset)
    }

    /// Reads `[a0, a0 + buf.len())`, all aligned, zero-filling past EOF.
    fn read_aligned(&self, buf: &mut [u8], a0: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.inner.std_file().read_at(&mut buf[done..], a0 + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                // A short read at EOF may end unaligned; the rest is zeros.
                Ok(n) if n % ALIGN as usize != 0 => {
                    buf[done + n..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("O_DIRECT read failed", e, a0 + done as u64)),
            }
        }
        Ok(())
    }
}

fn span(offset: u64, len: usize) -> Result<(u64, u64)> {
    let end = offset.checked_add(len as u64).ok_or_else(|| Error::invalid_argument("offset overflows"))?;
    Ok((offset & !(ALIGN - 1), end.div_ceil(ALIGN) * ALIGN))
}

impl DirectFile {
    /// Takes the QEMU-compatible image locks (see [`FileStorage::lock`]).
    pub fn lock(&mut self, mode: crate::storage::lock::LockMode) -> Result<()> {
        self.inner.lock(mode)
    }

    /// Takes the locks of an inactive read-write open (see
    /// [`FileStorage::lock_inactive`]).
    pub fn lock_inactive(&mut self, mode: crate::storage::lock::LockMode) -> Result<()> {
        self.inner.lock_inactive(mode)
    }
}

impl Drop for DirectFile {
    /// Releases QEMU-style image locks (taken by `OpenOptions::open`) before
    /// the descriptor closes; see `FileStorage`'s `Drop`.
    fn drop(&mut self) {
        crate::storage::lock::release(self.inner.std_file());
    }
}

impl Storage for DirectFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if aligned(buf, offset) {
            // No bounce buffer: the kernel reads into the caller's memory.
            return self.read_aligned(buf, offset);
        }
        let (a0, a1) = span(offset, buf.len())?;
        let mut b = Aligned::new((a1 - a0) as usize);
        self.read_aligned(b.as_mut_slice(), a0)?;
        let s = (offset - a0) as usize;
        buf.copy_from_slice(&b.as_slice()[s..s + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.inner.is_read_only() {
            return Err(Error::read_only("write").with_path(self.inner.file_path()));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let (a0, a1) = span(offset, buf.len())?;
        let end = offset + buf.len() as u64;
        if aligned(buf, offset) {
            if end <= self.known_len.load(Ordering::Acquire) {
                // Whole blocks inside the file: straight from the caller's
                // buffer, no fstat, no lock.
                return self
                    .inner
                    .std_file()
                    .write_all_at(buf, offset)
                    .map_err(|e| self.err("O_DIRECT write failed", e, offset));
            }
            // Whole blocks reaching past what this descriptor knows of the
            // file (a new qcow2 cluster): still straight from the caller's
            // buffer and without fstat, since the file ends at least at
            // `end` afterwards. Under `grow`, so a concurrent `set_len`
            // cannot come between the write and the length noted.
            let _grow = self.grow.lock();
            self.inner
                .std_file()
                .write_all_at(buf, offset)
                .map_err(|e| self.err("O_DIRECT write failed", e, offset))?;
            self.known_len.fetch_max(end, Ordering::AcqRel);
            return Ok(());
        }
        let partial = a0 != offset || a1 != end;
        // Lock the stripes of partial edge blocks, in order.
        let mut idx: Vec<usize> = if partial {
            [a0 / ALIGN, (a1 - 1) / ALIGN].iter().map(|&b| (b % STRIPES as u64) as usize).collect()
        } else {
            Vec::new()
        };
        idx.sort_unstable();
        idx.dedup();
        let _guards: Vec<_> = idx.iter().map(|&i| self.stripes[i].lock()).collect();
        // Writes that may reach past the end are serialized, and see the
        // length they will extend (one fstat); the others lie inside the
        // known length, so the file is at least `a1` long.
        let grows = a1 > self.known_len.load(Ordering::Acquire);
        let _grow = grows.then(|| self.grow.lock());
        let old_len = if grows { self.len()? } else { a1 };
        let mut b = Aligned::new((a1 - a0) as usize);
        if partial {
            self.read_aligned(b.as_mut_slice(), a0)?;
        }
        let s = (offset - a0) as usize;
        b.as_mut_slice()[s..s + buf.len()].copy_from_slice(buf);
        self.inner.std_file().write_all_at(b.as_slice(), a0).map_err(|e| self.err("O_DIRECT write failed", e, a0))?;
        if a1 > old_len.max(end) {
            // The aligned write went past the intended end: cut it back.
            let len_now = self.len()?;
            let want = old_len.max(end);
            if len_now > want {
                self.inner.set_len(want)?;
            }
        }
        if grows {
            // Only under `grow`, so a concurrent set_len cannot be undone.
            self.known_len.fetch_max(old_len.max(end), Ordering::AcqRel);
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let _g = self.grow.lock();
        // Shrink what aligned writes trust first, so later ones take the
        // careful path. (A write already in flight may still land past the
        // new end and extend the file again: a write racing a truncate of
        // the same range has no defined order.)
        self.known_len.fetch_min(len, Ordering::AcqRel);
        self.inner.set_len(len)?;
        self.known_len.store(len, Ordering::Release);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.punch_hole(offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.grow.lock();
        self.inner.allocate(offset, len)?;
        self.known_len.fetch_max(offset.saturating_add(len), Ordering::AcqRel);
        Ok(())
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn file(&self) -> Option<&File> {
        self.inner.file()
    }

    fn image_locks(&self) -> crate::storage::lock::Held {
        self.inner.image_locks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_io_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, vec![1u8; 10_000]).unwrap();
        let d = match DirectFile::open(&p, false) {
            Ok(d) => d,
            // tmpfs and some filesystems refuse O_DIRECT.
            Err(_) => return,
        };
        d.write_at(&[7u8; 100], 4090).unwrap();
        let mut b = [0u8; 120];
        d.read_at(&mut b, 4080).unwrap();
        assert_eq!(&b[..10], &[1u8; 10]);
        assert_eq!(&b[10..110], &[7u8; 100]);
        assert_eq!(&b[110..], &[1u8; 10]);
        // Writing past the end grows the file to exactly the write's end.
        d.write_at(&[9u8; 10], 10_000).unwrap();
        assert_eq!(d.len().unwrap(), 10_010);
        let mut t = [0u8; 20];
        d.read_at(&mut t, 9_995).unwrap();
        assert_eq!(&t[..5], &[1u8; 5]);
        assert_eq!(&t[5..15], &[9u8; 10]);
        assert_eq!(&t[15..], &[0u8; 5]);
    }

    #[test]
    fn aligned_requests_skip_the_bounce_buffer_and_stay_correct() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, vec![3u8; 64 << 10]).unwrap();
        let Ok(d) = DirectFile::open(&p, false) else { return };
        let mut a = Aligned::new(8192);
        a.as_mut_slice().fill(0x42);
        d.write_at(a.as_slice(), 16384).unwrap();
        // Aligned, past the end: the careful path grows the file.
        d.write_at(a.as_slice(), 64 << 10).unwrap();
        assert_eq!(d.len().unwrap(), (64 << 10) + 8192);
        // Then an aligned write inside the new length takes the fast path.
        d.write_at(&a.as_slice()[..4096], 64 << 10).unwrap();
        let mut r = Aligned::new(12288);
        d.read_at(r.as_mut_slice(), 12288).unwrap();
        assert!(r.as_slice()[..4096].iter().all(|&b| b == 3));
        assert!(r.as_slice()[4096..].iter().all(|&b| b == 0x42));
        // A shrink is respected by later aligned writes (careful path again).
        d.set_len(8192).unwrap();
        d.write_at(a.as_slice(), 16384).unwrap();
        assert_eq!(d.len().unwrap(), 16384 + 8192);
        let mut gap = Aligned::new(8192);
        d.read_at(gap.as_mut_slice(), 8192).unwrap();
        assert!(gap.as_slice().iter().all(|&b| b == 0));
    }
}
