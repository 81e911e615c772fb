//! [`FileStorage`]: a host file with positional I/O, holes, preallocation
//! and QEMU-compatible image locks.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use parking_lot::Mutex;

use super::lock::{self, Access, Held, LockMode};
use super::{range_end, Storage};
use crate::error::{Error, Result};
use crate::sys;

/// A host file accessed with positional I/O (`pread`/`pwrite`).
///
/// It also carries the file's QEMU-compatible image locks ([`crate::storage::lock`]):
/// they belong to its descriptor and are released when it is dropped.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    read_only: bool,
    lock: Held,
    /// The last run [`Storage::region`] found (see [`RunCache`]).
    run: RunCache,
}

/// The last data run `SEEK_DATA`/`SEEK_HOLE` found, as QEMU's file driver
/// keeps it: a walk over the file (convert, map) then asks the kernel once
/// per run instead of once per call. That matters because `SEEK_HOLE` from
/// inside data can cost time in proportion to the rest of the run (tmpfs
/// visits every page; NFS pays a round trip), which made a walk in fixed
/// steps over a file of data cost the square of its size.
///
/// Only data runs are kept: a write can turn a hole into data at any
/// moment, but data becomes a hole only through our own punch or truncate,
/// which forget what they touch. A stale "data" answer would still be
/// safe (data reads as what it is, zeros included); a stale "hole" would
/// not. `kind` lets the punch path see with one plain load that nothing
/// needs forgetting.
#[derive(Debug, Default)]
struct RunCache {
    /// `RUN_NONE` or `RUN_DATA`: whether `run` holds a data run.
    kind: AtomicU8,
    /// (start, end) of the cached run.
    run: Mutex<(u64, u64)>,
}

const RUN_NONE: u8 = 0;
const RUN_DATA: u8 = 1;

impl RunCache {
    /// The cached run holding `offset`: (is data, end).
    fn get(&self, offset: u64) -> Option<(bool, u64)> {
        let kind = self.kind.load(Ordering::Acquire);
        if kind == RUN_NONE {
            return None;
        }
        let run = self.run.lock();
        // Read again under the lock: a writer may have forgotten it.
        let kind = self.kind.load(Ordering::Acquire);
        (kind == RUN_DATA && run.0 <= offset && offset < run.1).then_some((true, run.1))
    }

    /// Keeps the data run `[start, end)`.
    fn put(&self, start: u64, end: u64) {
        let mut run = self.run.lock();
        *run = (start, end);
        self.kind.store(RUN_DATA, Ordering::Release);
    }

    /// Forgets the cached run if it is of `kind` and meets `[offset, end)`.
    fn forget(&self, kind: u8, offset: u64, end: u64) {
        if self.kind.load(Ordering::Acquire) != kind {
            return;
        }
        let run = self.run.lock();
        if run.0 < end && offset < run.1 {
            self.kind.store(RUN_NONE, Ordering::Release);
        }
    }

    fn forget_all(&self) {
        let _run = self.run.lock();
        self.kind.store(RUN_NONE, Ordering::Release);
    }
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io("cannot open file", e).with_path(path))?;
        Self::from_file(file, path, read_only)
    }

    /// Creates a new file; fails if it exists.
    pub fn create_new(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("cannot create file", e).with_path(path))?;
        let mut s = Self::from_file(file, path, false)?;
        s.lock(LockMode::Auto)?;
        Ok(s)
    }

    /// Creates a file, truncating it if it exists (like `qemu-img create`).
    /// Like QEMU, the write locks are taken *before* truncating, so an image
    /// in use by another process (a running VM) is refused with
    /// [`ErrorKind::Busy`](crate::ErrorKind::Busy) and left untouched.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io("cannot create file", e).with_path(path))?;
        let mut s = Self::from_file(file, path, false)?;
        s.lock(LockMode::Auto)?;
        s.set_len(0)?;
        Ok(s)
    }

    /// Opens an existing file and takes its image locks ([`crate::storage::lock`])
    /// for `mode`: a conflicting user makes this fail with
    /// [`ErrorKind::Busy`](crate::ErrorKind::Busy).
    pub fn open_locked(path: impl AsRef<Path>, read_only: bool, mode: LockMode) -> Result<Self> {
        let mut s = Self::open(path, read_only)?;
        s.lock(mode)?;
        Ok(s)
    }

    /// Takes the QEMU-compatible image locks for `mode` and this storage's
    /// access (read-only or read-write). Call once, right after opening.
    pub fn lock(&mut self, mode: LockMode) -> Result<()> {
        self.lock_as(mode, Access::from_read_only(self.read_only))
    }

    /// Takes the image locks of a user with `access`, which may be less
    /// than the descriptor allows: vmdk extent files are locked as readers
    /// (the descriptor carries the write lock), so a descriptor that names
    /// one file twice still opens.
    pub fn lock_as(&mut self, mode: LockMode, access: Access) -> Result<()> {
        if self.lock != Held::None {
            return Err(Error::internal("the file's image locks were already taken").with_path(&self.path));
        }
        self.lock = lock::lock_file(&self.file, &self.path, mode, access)?;
        Ok(())
    }

    /// Takes the image locks of a read-write open that starts inactive (the
    /// destination of a migration; see [`lock::lock_inactive`]).
    pub fn lock_inactive(&mut self, mode: LockMode) -> Result<()> {
        if self.lock != Held::None {
            return Err(Error::internal("the file's image locks were already taken").with_path(&self.path));
        }
        self.lock = lock::lock_inactive(&self.file, &self.path, mode)?;
        Ok(())
    }

    /// The image locks this storage's descriptor holds.
    pub fn held_locks(&self) -> Held {
        self.lock
    }

    /// Wraps an already open file. Fails on anything that is not a regular
    /// file or a block device.
    pub fn from_file(file: File, path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let path = path.as_ref();
        let ft = file.metadata().map_err(|e| Error::io("cannot stat file", e).with_path(path))?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(Error::invalid_argument("not a regular file or block device").with_path(path));
        }
        Ok(FileStorage { file, path: path.to_path_buf(), read_only, lock: Held::None, run: RunCache::default() })
    }

    /// The open file.
    pub(crate) fn std_file(&self) -> &File {
        &self.file
    }

    /// The path it was opened by.
    pub(crate) fn file_path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &str, e: std::io::Error, offset: u64) -> Error {
        Error::io(what.to_string(), e).with_path(&self.path).with_offset(offset)
    }
}

impl Drop for FileStorage {
    /// Releases the image locks explicitly before the descriptor closes.
    /// OFD locks belong to the open file description, which a child forked
    /// by another thread (between `fork` and `exec`) may still share for a
    /// moment; closing our descriptor alone would leave the locks held in
    /// that window and make a new open here fail with `Busy`.
    fn drop(&mut self) {
        if let Held::Locked(_) = self.lock {
            lock::release(&self.file);
        }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> Result<()> {
        range_end(offset, buf.len())?;
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("read failed", e, offset)),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write").with_path(&self.path));
        }
        range_end(offset, buf.len())?;
        self.file.write_all_at(buf, offset).map_err(|e| self.err("write failed", e, offset))
    }

    fn len(&self) -> Result<u64> {
        use std::os::unix::fs::FileTypeExt;
        let md = self.file.metadata().map_err(|e| self.err("stat failed", e, 0))?;
        if md.file_type().is_block_device() {
            use std::io::Seek;
            let mut f = &self.file;
            return f.seek(std::io::SeekFrom::End(0)).map_err(|e| self.err("seek failed", e, 0));
        }
        Ok(md.len())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("truncate").with_path(&self.path));
        }
        if len > crate::limits::MAX_FILE_SIZE {
            return Err(Error::limit(format!(
                "file size {len} is larger than the largest a file can have ({})",
                crate::limits::MAX_FILE_SIZE
            ))
            .with_path(&self.path));
        }
        self.run.forget_all();
        self.file.set_len(len).map_err(|e| self.err("truncate failed", e, len))
    }

    fn sync(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.err("fsync failed", e, 0))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("discard").with_path(&self.path));
        }
        self.run.forget(RUN_DATA, offset, offset.saturating_add(len));
        sys::punch_hole(self.file.as_fd(), offset, len).map_err(|e| self.err("punching a hole failed", e, offset))
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("preallocate").with_path(&self.path));
        }
        sys::fallocate(self.file.as_fd(), offset, len).map_err(|e| self.err("fallocate failed", e, offset))
    }

    fn region(&self, offset: u64) -> Result<(bool, u64)> {
        let len = self.len()?;
        if offset >= len {
            return Ok((false, offset));
        }
        if let Some((data, end)) = self.run.get(offset) {
            return Ok((data, end.min(len)));
        }
        let fd = self.file.as_fd();
        let (data, end) = match sys::seek(fd, offset, sys::Whence::Data) {
            Ok(None) => (false, len),
            Ok(Some(d)) if d > offset => (false, d.min(len)),
            Ok(Some(_)) => match sys::seek(fd, offset, sys::Whence::Hole) {
                Ok(Some(h)) => (true, h.clamp(offset + 1, len)),
                _ => (true, len),
            },
            // SEEK_DATA not supported here: everything is data.
            Err(_) => (true, len),
        };
        if data {
            self.run.put(offset, end);
        }
        Ok((data, end))
    }

    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks().saturating_mul(512))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn image_locks(&self) -> Held {
        self.lock
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn file_storage_roundtrip_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create_new(&p).unwrap();
        s.set_len(4 << 20).unwrap();
        s.write_at(&[7u8; 4096], 2 << 20).unwrap();
        let mut b = [0u8; 4096];
        s.read_at(&mut b, 2 << 20).unwrap();
        assert_eq!(b, [7u8; 4096]);
        let (data, end) = s.region(0).unwrap();
        assert!(!data && end <= 2 << 20);
        let (data, _) = s.region(2 << 20).unwrap();
        assert!(data);
        assert!(FileStorage::create_new(&p).is_err());
        let ro = FileStorage::open(&p, true).unwrap();
        assert_eq!(ro.write_at(&[1], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
    }

    #[test]
    fn region_cache_follows_punches_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create_new(dir.path().join("f")).unwrap();
        s.set_len(8 << 20).unwrap();
        s.write_at(&[1u8; 4 << 20], 2 << 20).unwrap();
        let (data, end) = s.region(3 << 20).unwrap();
        if !data {
            return; // a filesystem without SEEK_HOLE reports no holes at all
        }
        assert_eq!(end, 6 << 20);
        // Served from the cache, then forgotten by a punch inside it.
        assert_eq!(s.region(4 << 20).unwrap(), (true, 6 << 20));
        if s.punch_hole(4 << 20, 1 << 20).is_ok() {
            let (data, end) = s.region(4 << 20).unwrap();
            assert!(!data && end <= 5 << 20, "{data} {end}");
            assert_eq!(s.region(3 << 20).unwrap(), (true, 4 << 20));
        }
        // A truncate forgets it too.
        s.set_len(3 << 20).unwrap();
        assert_eq!(s.region(2 << 20).unwrap(), (true, 3 << 20));
        // A write into a hole is seen at once (holes are never cached).
        s.set_len(8 << 20).unwrap();
        assert!(!s.region(7 << 20).unwrap().0);
        s.write_at(&[2u8; 4096], 7 << 20).unwrap();
        assert!(s.region(7 << 20).unwrap().0);
    }
}
