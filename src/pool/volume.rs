//! Volumes: the files of a pool, and what can be done to them (describe,
//! open as a block device, follow the backing chain, delete, wipe,
//! resize; upload and download are in `transfer.rs`).

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::{IoSlice, IoSliceMut, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::busy::{is_busy, BusyGuard};
use super::dir::{kind_name, open_nonblocking, PoolDir};
use super::headers::probe_file;
use super::lifecycle::Pool;
use super::name::TEMP_PREFIX;
use super::records::Record;
use super::scan::{probe_regular, Entry};
use super::volinfo::{build_info, FileStat, VolType, VolumeInfo};
use super::volxml::volume_xml;
use crate::crypto::Secret;
use crate::device::{BlockDevice, DeviceInfo, Extent, Format, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::open::{BackingPolicy, Image, OpenOptions};
use crate::storage::lock::{Access, LockMode};
use crate::storage::{FileStorage, Storage};

pub use crate::convert::Progress;

/// How to wipe (`vol-wipe --algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WipeAlgorithm {
    /// Zeros; a sparse file stays sparse (truncated to 0 and back).
    Zero,
    /// Random bytes from `/dev/urandom` over the whole file.
    Random,
}

impl WipeAlgorithm {
    /// Parses virsh's names; the `scrub` patterns are refused.
    pub fn from_name(s: &str) -> Result<WipeAlgorithm> {
        match s {
            "zero" => Ok(WipeAlgorithm::Zero),
            "random" => Ok(WipeAlgorithm::Random),
            "nnsa" | "dod" | "bsi" | "gutmann" | "schneier" | "pfitzner7" | "pfitzner33" | "trim" => {
                Err(Error::unsupported(format!("wipe algorithm '{s}' is not supported (zero, random)")))
            }
            other => Err(Error::invalid_argument(format!(
                "unknown wipe algorithm '{}' (zero, random)",
                other.escape_debug()
            ))),
        }
    }
}

/// Bytes read or written at a time.
pub(crate) const CHUNK: usize = 1 << 20;

/// A volume of a pool: a name in its directory.
#[derive(Debug, Clone)]
pub struct Volume {
    pool: Pool,
    name: OsString,
}

/// The (device, inode) of the volume file `f`, refused with
/// [`ErrorKind::Busy`] while a vdisk operation in this process uses it.
fn not_busy_here(f: &File, path: &Path) -> Result<(u64, u64)> {
    let md = f.metadata().map_err(|e| Error::io("cannot stat", e).with_path(path))?;
    let key = (md.dev(), md.ino());
    if is_busy(key) {
        return Err(
            Error::new(ErrorKind::Busy, "the volume is in use by a vdisk operation in this process").with_path(path)
        );
    }
    Ok(key)
}

impl Pool {
    /// The volume named `name` (which must exist; any existing name,
    /// including ones vdisk would not create).
    pub fn volume(&self, name: impl AsRef<OsStr>) -> Result<Volume> {
        let name = name.as_ref();
        self.require_active()?;
        let b = name.as_bytes();
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
            return Err(Error::invalid_argument(format!(
                "invalid volume name '{}'",
                name.to_string_lossy().escape_debug()
            )));
        }
        if b.starts_with(TEMP_PREFIX.as_bytes()) {
            return Err(self.no_volume(name));
        }
        let d = self.dir()?;
        match d.lstat(name)? {
            Some(_) => Ok(Volume::new(self.clone(), name.to_os_string())),
            None => Err(self.no_volume(name)),
        }
    }

    pub(crate) fn no_volume(&self, name: &OsStr) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "storage volume not found: no storage vol with matching name '{}' in pool '{}'",
                name.to_string_lossy(),
                self.name()
            ),
        )
    }
}

impl Volume {
    pub(crate) fn new(pool: Pool, name: OsString) -> Volume {
        Volume { pool, name }
    }

    /// The file name.
    pub fn name(&self) -> &OsStr {
        &self.name
    }

    /// The name for display.
    pub fn name_lossy(&self) -> String {
        self.name.to_string_lossy().into_owned()
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The absolute path (the target with symlinks resolved, plus the name).
    pub fn path(&self) -> PathBuf {
        self.pool.canonical_target().join(&self.name)
    }

    /// The key: the path, as in libvirt's dir pools.
    pub fn key(&self) -> PathBuf {
        self.path()
    }

    pub(crate) fn dir(&self) -> Result<PoolDir> {
        self.pool.require_active()?;
        self.pool.dir()
    }

    /// Re-probes the volume (never the cache) and describes it.
    pub fn info(&self) -> Result<VolumeInfo> {
        let d = self.dir()?;
        let md = d.lstat(&self.name)?.ok_or_else(|| self.pool.no_volume(&self.name))?;
        let entry = Entry::read(&d, &self.name, &md, |_| probe_regular(&d, &self.name))?;
        let recorded = match (entry.kind, &entry.file) {
            (VolType::File, Some(s)) => self.pool.records()?.format_of(&self.name, s),
            _ => None,
        };
        let info = entry.info(&d, &self.name, recorded, |x| {
            d.lstat(x).ok().flatten().filter(|m| m.is_file()).map(|m| m.blocks().saturating_mul(512))
        });
        Ok(info)
    }

    /// The format vdisk opens the volume with: the recorded one, or (for a
    /// file vdisk never saw) the probed one, recorded from now on.
    pub fn recorded_format(&self) -> Result<Format> {
        let info = self.info()?;
        if info.kind != VolType::File {
            return Err(Error::invalid_argument(format!("volume '{}' is not a regular file", self.name_lossy()))
                .with_path(&info.path));
        }
        let Some(f) = info.format else {
            return Err(Error::invalid_argument("cannot tell the volume's format").with_path(&info.path));
        };
        if self.pool.records()?.format_of(&self.name, &info.stat).is_none() {
            // First sight of this file: what it is now is what it stays.
            self.pool.record(&self.name, Some(Record::of_stat(&info.stat, f)))?;
        }
        Ok(f)
    }

    /// `vol-dumpxml`: libvirt's `<volume>` document (re-probed).
    pub fn describe(&self) -> Result<String> {
        let info = self.info()?;
        let backing_stat =
            info.backing.as_ref().and_then(|b| std::fs::metadata(&b.path).ok().map(|m| FileStat::of(&m)));
        Ok(volume_xml(&info, backing_stat.as_ref()))
    }

    /// Opens the volume as a block device with its recorded format (never a
    /// fresh probe), QEMU-compatible locks, and backing files followed only
    /// with their recorded format. The volume counts as in use (delete,
    /// wipe, resize and upload refuse) while the device lives.
    pub fn open(&self, read_only: bool) -> Result<VolumeDevice> {
        self.open_with(read_only, LockMode::Auto, None)
    }

    /// [`open`](Self::open) with a lock mode and the passphrase of an
    /// encrypted (legacy AES) qcow2 volume.
    pub fn open_with(&self, read_only: bool, mode: LockMode, key: Option<Secret>) -> Result<VolumeDevice> {
        self.open_opts(read_only, mode, key, false)
    }

    /// Opens the volume read-write but inactive, as the destination of a
    /// live migration while the source host still writes it (see
    /// [`OpenOptions::inactive`](crate::OpenOptions::inactive)): nothing is written and only the shared
    /// lock is held until [`BlockDevice::activate`].
    pub fn open_inactive(&self, key: Option<Secret>) -> Result<VolumeDevice> {
        self.open_opts(false, LockMode::Auto, key, true)
    }

    fn open_opts(&self, read_only: bool, mode: LockMode, key: Option<Secret>, inactive: bool) -> Result<VolumeDevice> {
        let format = self.recorded_format()?;
        let d = self.dir()?;
        let path = d.join(&self.name);
        // Refuses symlinks and special files on the descriptor.
        let pre =
            d.open_file(&self.name, false)?.metadata().map_err(|e| Error::io("cannot stat", e).with_path(&path))?;
        let key_id = (pre.dev(), pre.ino());
        let image = OpenOptions::new()
            .format(format)
            .read_only(read_only)
            .lock(mode)
            .key_opt(key)
            .backing(BackingPolicy::RecordedFormat)
            .inactive(inactive)
            .open(&path)?;
        // The name must still be the file checked above (no swap to a
        // symlink in between).
        if !d.is_same_file(&self.name, key_id)? {
            // Nothing was written through it; close it all the same rather
            // than leave a read-write image to a silent drop.
            let _ = image.close();
            return Err(Error::invalid_argument("the volume changed while it was opened").with_path(&path));
        }
        Ok(VolumeDevice { image, _busy: BusyGuard::new(key_id) })
    }

    /// The backing chain as recorded in the headers, this volume first:
    /// each element probed (never opened as an image), loops detected by
    /// (device, inode), at most 64 deep.
    pub fn chain(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = vec![self.info()?];
        let mut seen = vec![(out[0].stat.dev, out[0].stat.ino)];
        while let Some(b) = out.last().and_then(|i| i.backing.clone()) {
            if out.len() >= 64 {
                return Err(Error::limit("backing chain deeper than 64").with_path(&b.path));
            }
            // Without blocking: a FIFO named by a hostile header must not hang us.
            let f =
                open_nonblocking(&b.path).map_err(|e| Error::io("cannot open backing file", e).with_path(&b.path))?;
            let md = f.metadata().map_err(|e| Error::io("cannot stat", e).with_path(&b.path))?;
            if !md.is_file() {
                return Err(Error::invalid_argument("backing file is not a regular file").with_path(&b.path));
            }
            if seen.contains(&(md.dev(), md.ino())) {
                return Err(Error::invalid("the backing chain loops").with_path(&b.path));
            }
            seen.push((md.dev(), md.ino()));
            let facts = probe_file(f, &b.path);
            let dir = b.path.parent().unwrap_or(Path::new("/")).to_path_buf();
            let name = b.path.file_name().unwrap_or_default().to_os_string();
            let recorded = b.format.as_deref().and_then(|x| Format::from_name(x).ok());
            out.push(build_info(&dir, &name, VolType::File, FileStat::of(&md), &facts, recorded, 0));
        }
        Ok(out)
    }

    /// Opens the file for a mutation: no symlink, regular file, not in use
    /// here, write lock against other processes.
    pub(crate) fn open_for_change(&self, d: &PoolDir) -> Result<(FileStorage, BusyGuard)> {
        let path = d.join(&self.name);
        let f = d.open_file(&self.name, true)?;
        let key = not_busy_here(&f, &path)?;
        let mut st = FileStorage::from_file(f, &path, false)?;
        st.lock_as(LockMode::Auto, Access::ReadWrite)?;
        Ok((st, BusyGuard::new(key)))
    }

    /// `vol-delete`: removes the file, refused while the volume is in use
    /// (by a vdisk operation here, or by a process holding QEMU locks such
    /// as a running VM). A symlink is removed, never followed; a vmdk
    /// descriptor's extent files stay (as in libvirt).
    pub fn delete(&self) -> Result<()> {
        let d = self.dir()?;
        let path = d.join(&self.name);
        let Some(md) = d.lstat(&self.name)? else {
            // Already gone: libvirt counts that as success.
            return Ok(());
        };
        if md.file_type().is_symlink() {
            d.remove(&self.name, false)?;
        } else if md.is_dir() {
            d.remove(&self.name, true)?;
        } else if md.is_file() {
            let (st, _busy) = self.open_for_change(&d)?;
            let opened = file_md(&st, &path)?;
            if !d.is_same_file(&self.name, (opened.dev(), opened.ino()))? {
                return Err(Error::invalid_argument("the volume changed while it was deleted").with_path(&path));
            }
            d.remove(&self.name, false)?;
        } else {
            return Err(Error::invalid_argument(format!(
                "is a {}, not a volume: vdisk does not delete it",
                kind_name(&md)
            ))
            .with_path(&path));
        }
        d.sync()?;
        self.pool.forget_cached(&self.name);
        self.pool.record(&self.name, None)
    }

    /// `vol-wipe`: overwrites the whole file (zeros keep a sparse file
    /// sparse). Like libvirt, the volume is raw afterwards: its header is
    /// gone. Refused while in use.
    pub fn wipe(&self, alg: WipeAlgorithm, progress: Option<Progress<'_>>) -> Result<()> {
        let d = self.dir()?;
        let (st, _busy) = self.open_for_change(&d)?;
        let len = st.len()?;
        let alloc = st.allocated_bytes().unwrap_or(len);
        match alg {
            WipeAlgorithm::Zero if alloc < len => {
                st.set_len(0)?;
                st.set_len(len)?;
            }
            _ => {
                let mut buf = vec![0u8; CHUNK];
                let mut urandom = match alg {
                    WipeAlgorithm::Random => {
                        Some(File::open("/dev/urandom").map_err(|e| Error::io("cannot open /dev/urandom", e))?)
                    }
                    WipeAlgorithm::Zero => None,
                };
                let mut off = 0;
                while off < len {
                    let n = (len - off).min(CHUNK as u64) as usize;
                    if let Some(r) = urandom.as_mut() {
                        r.read_exact(&mut buf[..n]).map_err(|e| Error::io("cannot read /dev/urandom", e))?;
                    }
                    st.write_at(&buf[..n], off)?;
                    off += n as u64;
                    if let Some(p) = progress {
                        p(off, len);
                    }
                }
            }
        }
        st.sync()?;
        let md = st.file().and_then(|f| f.metadata().ok());
        if let Some(md) = md {
            self.pool.record(&self.name, Some(Record::of(&md, Format::Raw)))?;
        }
        self.pool.forget_cached(&self.name);
        Ok(())
    }

    /// `vol-resize`: sets the capacity. Shrinking needs `shrink`. Refused
    /// while in use. Returns the new capacity.
    pub fn resize(&self, capacity: u64, shrink: bool) -> Result<u64> {
        let info = self.info()?;
        if capacity < info.capacity && !shrink {
            return Err(Error::invalid_argument(
                "can't shrink capacity below current capacity unless shrink flag explicitly specified",
            )
            .with_path(&info.path));
        }
        if capacity == 0 {
            return Err(Error::invalid_argument("a volume cannot be resized to 0 bytes"));
        }
        let d = self.dir()?;
        // Refuse here first (clear message), then the device takes the locks.
        not_busy_here(&d.open_file(&self.name, false)?, &info.path)?;
        let dev = self.open(false)?;
        let resized = dev.resize(capacity).map(|()| dev.size());
        // Closed whether or not the resize worked, so the image is left
        // clean (lazy refcounts written, dirty bit cleared) either way; a
        // resize error is the one reported.
        let closed = dev.close();
        self.pool.forget_cached(&self.name);
        let size = resized?;
        closed?;
        Ok(size)
    }
}

/// The metadata of the file behind `st`.
pub(crate) fn file_md(st: &FileStorage, path: &Path) -> Result<Metadata> {
    st.file()
        .ok_or_else(|| Error::internal("file storage without a file"))?
        .metadata()
        .map_err(|e| Error::io("cannot stat", e).with_path(path))
}

/// A volume opened as a block device. While it lives the volume counts as
/// in use (and its image locks are held).
#[derive(Debug)]
pub struct VolumeDevice {
    image: Image,
    _busy: BusyGuard,
}

impl VolumeDevice {
    /// The opened image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Flushes and closes the volume, leaving its image clean (see
    /// [`Image::close`]); dropping does the same without reporting a failure.
    pub fn close(self) -> Result<()> {
        self.image.close()
    }
}

impl BlockDevice for VolumeDevice {
    fn info(&self) -> DeviceInfo {
        self.image.info()
    }
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.image.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.image.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.image.write_zeroes(offset, len, mode)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.image.discard(offset, len)
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.image.map(offset, max_len)
    }
    fn flush(&self) -> Result<()> {
        self.image.flush()
    }
    fn make_clean(&self) -> Result<()> {
        self.image.make_clean()
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        self.image.resize(new_size)
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.image.write_compressed(buf, offset)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.image.backing()
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.image.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.image.write_vectored_at(bufs, offset)
    }
    fn inactivate(&self) -> Result<()> {
        self.image.inactivate()
    }
    fn activate(&self) -> Result<()> {
        self.image.activate()
    }
    fn is_inactive(&self) -> bool {
        self.image.is_inactive()
    }
    fn refresh(&self) -> Result<()> {
        self.image.refresh()
    }
}
