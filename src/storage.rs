//! Host bytes: the [`Storage`] trait under every format, and its
//! implementations.
//!
//! A format never touches `std::fs::File` directly; it holds an
//! `Arc<dyn Storage>`. That lets the same qcow2 code run on a file
//! ([`FileStorage`]), in memory under a fuzzer ([`MemStorage`]), and on a
//! storage that "loses power" after the N-th write in crash tests
//! ([`FaultyStorage`]).
//!
//! Reads past the end of the storage return zeros, as QEMU's file layer does:
//! a qcow2 compressed cluster may legally run past the end of the file.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::error::{Error, ErrorKind, Result};
use crate::lock::{self, Access, Held, LockMode};
use crate::sys;

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
}

fn range_end(offset: u64, len: usize) -> Result<u64> {
    offset
        .checked_add(len as u64)
        .ok_or_else(|| Error::new(ErrorKind::OutOfBounds, format!("offset {offset} + length {len} overflows")))
}

/// A host file accessed with positional I/O (`pread`/`pwrite`).
///
/// It also carries the file's QEMU-compatible image locks ([`crate::lock`]):
/// they belong to its descriptor and are released when it is dropped.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    read_only: bool,
    lock: Held,
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
    /// [`ErrorKind::Busy`] and left untouched.
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

    /// Opens an existing file and takes its image locks ([`crate::lock`])
    /// for `mode`: a conflicting user makes this fail with
    /// [`ErrorKind::Busy`].
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
        Ok(FileStorage { file, path: path.to_path_buf(), read_only, lock: Held::None })
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
        let fd = self.file.as_fd();
        match sys::seek(fd, offset, sys::Whence::Data) {
            Ok(None) => Ok((false, len)),
            Ok(Some(d)) if d > offset => Ok((false, d.min(len))),
            Ok(Some(_)) => match sys::seek(fd, offset, sys::Whence::Hole) {
                Ok(Some(h)) => Ok((true, h.clamp(offset + 1, len))),
                _ => Ok((true, len)),
            },
            // SEEK_DATA not supported here: everything is data.
            Err(_) => Ok((true, len)),
        }
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
}

/// A growable byte vector: images kept in memory, tests and fuzz targets.
///
/// An optional length limit makes writes or `set_len` beyond it fail with
/// [`ErrorKind::LimitExceeded`], so a fuzz target cannot be driven into
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
fn copy_out(data: &[u8], buf: &mut [u8], offset: u64) {
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

/// How a [`FaultyStorage`] misbehaves once its budget of operations is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Every later write, truncate, punch or sync fails with an I/O error, as
    /// a failing disk would.
    Error,
    /// The machine "loses power": every later operation fails and
    /// [`FaultyStorage::crashed_image`] tells what the disk holds.
    PowerLoss,
}

/// Which un-synced writes survive a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survivors {
    /// All writes issued before the crash reached the disk.
    All,
    /// None of the writes since the last sync reached the disk.
    None,
    /// A pseudo-random subset (by seed) of the writes since the last sync
    /// reached the disk, in any order: the disk may reorder writes.
    Some(u64),
}

#[derive(Debug, Clone)]
enum PendingOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Punch(u64, u64),
}

#[derive(Debug)]
struct FaultyState {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<PendingOp>,
    ops: u64,
    budget: Option<u64>,
    failed: bool,
}

/// A test double for crash and fault tests: an in-memory storage that fails
/// (or "loses power") after a budget of mutating operations (writes,
/// truncations, hole punches and syncs each count as one).
///
/// It remembers which writes were made durable by a sync, so after a power
/// loss [`crashed_image`](Self::crashed_image) returns the bytes the disk
/// could hold: everything synced, plus any subset of later writes.
#[derive(Debug)]
pub struct FaultyStorage {
    state: Mutex<FaultyState>,
    mode: FaultMode,
}

impl FaultyStorage {
    /// Starts from `bytes` (already durable), failing after `budget`
    /// mutating operations (`None`: never).
    pub fn new(bytes: Vec<u8>, budget: Option<u64>, mode: FaultMode) -> Self {
        FaultyStorage {
            state: Mutex::new(FaultyState {
                durable: bytes.clone(),
                current: bytes,
                pending: Vec::new(),
                ops: 0,
                budget,
                failed: false,
            }),
            mode,
        }
    }

    /// Mutating operations performed so far (including the failed one).
    pub fn ops(&self) -> u64 {
        self.state.lock().ops
    }

    /// Whether the budget ran out.
    pub fn has_failed(&self) -> bool {
        self.state.lock().failed
    }

    /// What the storage holds now, as seen by readers before a crash.
    pub fn current(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    /// The bytes on "disk" after a power loss now: the synced state plus the
    /// chosen survivors among the writes since the last sync.
    pub fn crashed_image(&self, survivors: Survivors) -> Vec<u8> {
        let st = self.state.lock();
        let mut img = st.durable.clone();
        let mut rng = match survivors {
            Survivors::Some(seed) => seed | 1,
            _ => 0,
        };
        for op in &st.pending {
            let keep = match survivors {
                Survivors::All => true,
                Survivors::None => false,
                Survivors::Some(_) => {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng & 1 == 1
                }
            };
            if keep {
                apply(&mut img, op);
            }
        }
        img
    }

    fn begin(&self, st: &mut FaultyState) -> Result<()> {
        if st.failed {
            return Err(fault_error());
        }
        st.ops += 1;
        if let Some(b) = st.budget {
            if st.ops > b {
                st.failed = true;
                return Err(fault_error());
            }
        }
        Ok(())
    }
}

fn fault_error() -> Error {
    Error::io("injected fault", std::io::Error::other("FaultyStorage: operation budget exhausted"))
}

fn apply(img: &mut Vec<u8>, op: &PendingOp) {
    match op {
        PendingOp::Write(off, data) => {
            let start = *off as usize;
            let end = start + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[start..end].copy_from_slice(data);
        }
        PendingOp::SetLen(len) => img.resize(*len as usize, 0),
        PendingOp::Punch(off, len) => {
            let l = img.len() as u64;
            let s = (*off).min(l) as usize;
            let e = off.saturating_add(*len).min(l) as usize;
            img[s..e].fill(0);
        }
    }
}

impl Storage for FaultyStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        range_end(offset, buf.len())?;
        let st = self.state.lock();
        if st.failed && self.mode == FaultMode::PowerLoss {
            return Err(fault_error());
        }
        copy_out(&st.current, buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = range_end(offset, buf.len())?;
        if end > 1 << 34 {
            return Err(Error::limit("FaultyStorage holds at most 16 GiB"));
        }
        let mut st = self.state.lock();
        self.begin(&mut st)?;
        let op = PendingOp::Write(offset, buf.to_vec());
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.state.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if len > 1 << 34 {
            return Err(Error::limit("FaultyStorage holds at most 16 GiB"));
        }
        let mut st = self.state.lock();
        self.begin(&mut st)?;
        let op = PendingOp::SetLen(len);
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut st = self.state.lock();
        self.begin(&mut st)?;
        st.durable = st.current.clone();
        st.pending.clear();
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.state.lock();
        self.begin(&mut st)?;
        let op = PendingOp::Punch(offset, len);
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        false
    }
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
}

/// Writes zeros over `[offset, offset + len)` in bounded chunks.
pub(crate) fn write_zeroes_slow(s: &dyn Storage, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        s.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn faulty_power_loss() {
        let f = FaultyStorage::new(vec![0; 4], Some(3), FaultMode::PowerLoss);
        f.write_at(&[1], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2], 1).unwrap();
        assert!(f.write_at(&[3], 2).is_err());
        assert!(f.has_failed());
        assert_eq!(f.crashed_image(Survivors::None), vec![1, 0, 0, 0]);
        assert_eq!(f.crashed_image(Survivors::All), vec![1, 2, 0, 0]);
    }

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
}
