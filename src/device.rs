//! The guest's view of an image: the [`BlockDevice`] trait every format
//! implements, and what it reports ([`DeviceInfo`], [`Extent`]).

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use crate::error::{Error, Result};

/// An image format vdisk knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Plain bytes: the guest disk is the file.
    Raw,
    /// QEMU copy-on-write v2 (compat 0.10) or v3 (compat 1.1).
    Qcow2,
    /// VMware virtual disk.
    Vmdk,
    /// Microsoft Virtual Hard Disk (VHD; QEMU calls the driver `vpc`).
    Vpc,
    /// VirtualBox Disk Image.
    Vdi,
    /// Hyper-V virtual hard disk v2.
    Vhdx,
    /// LUKS1 (QEMU's `luks` driver) or LUKS2 (cryptsetup's) encrypted volume.
    Luks,
}

impl Format {
    /// The name qemu-img uses (`raw`, `qcow2`, `vmdk`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vpc => "vpc",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
            Format::Luks => "luks",
        }
    }

    /// Parses a qemu-img format name.
    pub fn from_name(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vmdk" => Ok(Format::Vmdk),
            "vpc" => Ok(Format::Vpc),
            "vdi" => Ok(Format::Vdi),
            "vhdx" => Ok(Format::Vhdx),
            "luks" => Ok(Format::Luks),
            other => Err(Error::unsupported(format!("unknown or unsupported image format '{other}'"))),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        Format::from_name(s)
    }
}

/// How [`BlockDevice::write_zeroes`] may reach its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroMode {
    /// The range may be deallocated (holes, qcow2 zero clusters without a
    /// host cluster): cheapest, may give space back.
    #[default]
    MayUnmap,
    /// Host space stays (or becomes) allocated; later writes into the range
    /// need no allocation.
    Allocate,
}

/// What one contiguous run of the guest disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data stored in a file, starting at `host_offset` of that file
    /// (`None` where the format has no single host offset to report).
    Data {
        /// Byte offset in the file holding the data.
        host_offset: Option<u64>,
    },
    /// Reads as zeros without consulting lower layers. `host_offset` is set
    /// when host space is still allocated for it (qcow2 preallocated zero
    /// clusters).
    Zero {
        /// Host offset of preallocated space, if any.
        host_offset: Option<u64>,
    },
    /// Not allocated in any layer down to the end of the chain: reads as
    /// zeros.
    Unallocated,
    /// Compressed data (qcow2 compressed clusters, vmdk compressed grains).
    Compressed {
        /// Byte offset of the compressed data in the file.
        host_offset: u64,
    },
}

/// One contiguous run of the guest disk, as returned by [`BlockDevice::map`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset where the run starts.
    pub offset: u64,
    /// Length in bytes; never 0 before the end of the device.
    pub length: u64,
    /// What the run is.
    pub kind: ExtentKind,
    /// The layer of the backing chain that provides it: 0 is the image
    /// itself, 1 its backing image, and so on. For [`ExtentKind::Unallocated`]
    /// it is the number of layers searched.
    pub depth: u32,
    /// Whether the data is stored encrypted.
    pub encrypted: bool,
}

impl Extent {
    /// Whether the guest sees zeros here without reading data.
    pub fn reads_as_zero(&self) -> bool {
        matches!(self.kind, ExtentKind::Zero { .. } | ExtentKind::Unallocated)
    }
}

/// Format-specific facts for `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatDetails {
    /// No format-specific facts.
    None,
    /// qcow2 facts.
    Qcow2(Qcow2Details),
    /// vmdk facts.
    Vmdk(VmdkDetails),
    /// VHDX facts.
    Vhdx(crate::vhdx::VhdxDetails),
    /// LUKS facts.
    Luks(crate::luks::LuksDetails),
}

/// qcow2 facts for `info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Qcow2Details {
    /// "0.10" (v2) or "1.1" (v3).
    pub compat: &'static str,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// The dirty bit is set.
    pub dirty: bool,
    /// The corrupt bit is set.
    pub corrupt: bool,
    /// External data file name, if any.
    pub data_file: Option<String>,
    /// Whether the external data file is raw-readable.
    pub data_file_raw: bool,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// The persistent dirty bitmaps.
    pub bitmaps: Vec<crate::qcow2::bitmap::BitmapInfo>,
    /// The LUKS header's facts (`encrypt.format=luks`).
    pub luks: Option<crate::luks::LuksDetails>,
}

/// One internal snapshot, as `qemu-img snapshot -l` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotInfo {
    /// Unique id string ("1", "2", ...).
    pub id: String,
    /// Name.
    pub name: String,
    /// VM state size in bytes.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size at the time of the snapshot.
    pub disk_size: u64,
    /// Instruction count, if recorded.
    pub icount: Option<u64>,
}

impl SnapshotInfo {
    /// The creation time in local time, as `qemu-img snapshot -l` prints it
    /// (`YYYY-MM-DD HH:MM:SS`).
    pub fn local_date(&self) -> String {
        let (y, mo, d, h, mi, se) = crate::sys::local_time(i64::from(self.date_sec));
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{se:02}")
    }
}

/// vmdk facts for `info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmdkDetails {
    /// createType from the descriptor.
    pub create_type: String,
    /// Content id.
    pub cid: u32,
    /// Parent content id (0xffffffff: none).
    pub parent_cid: u32,
    /// Extents: (file name, type, size in bytes, compressed).
    pub extents: Vec<VmdkExtentInfo>,
    /// The open parent's CID differs from `parent_cid` (writes are refused).
    pub parent_cid_mismatch: bool,
}

/// One vmdk extent for `info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmdkExtentInfo {
    /// File name as written in the descriptor ("" for ZERO extents).
    pub filename: String,
    /// FLAT, SPARSE, ZERO, VMFS, ...
    pub kind: String,
    /// RW, RDONLY or NOACCESS.
    pub access: String,
    /// Size in bytes of the guest range it covers.
    pub virtual_size: u64,
    /// Grain size in bytes for sparse extents.
    pub cluster_size: Option<u64>,
    /// Compressed grains.
    pub compressed: bool,
}

/// What [`BlockDevice::info`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The image format.
    pub format: Format,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// Allocation unit (cluster, grain) in bytes, if the format has one.
    pub cluster_size: Option<u64>,
    /// Data is stored encrypted.
    pub encrypted: bool,
    /// The backing file name as recorded in the image, if any.
    pub backing_file: Option<String>,
    /// The backing format as recorded in the image, if any.
    pub backing_format: Option<String>,
    /// Format-specific facts.
    pub details: FormatDetails,
    /// Path of the image file, where there is one.
    pub path: Option<std::path::PathBuf>,
}

impl DeviceInfo {
    /// A minimal info for `format` and `virtual_size`.
    pub fn new(format: Format, virtual_size: u64, read_only: bool) -> Self {
        DeviceInfo {
            format,
            virtual_size,
            read_only,
            cluster_size: None,
            encrypted: false,
            backing_file: None,
            backing_format: None,
            details: FormatDetails::None,
            path: None,
        }
    }
}

/// Checks a guest request against the device size: `Ok(())` when
/// `[offset, offset + len)` lies inside `[0, size]`.
pub fn check_request(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::out_of_bounds(offset, len, size)),
    }
}

/// A virtual disk: positional I/O on `&self`, safe to share between threads.
///
/// Every method that takes `(offset, len)` (or a buffer at `offset`) fails
/// with [`crate::ErrorKind::OutOfBounds`] when the range does not lie inside
/// the device or `offset + len` overflows, and does nothing for an empty
/// range. After an error part of the range may have been written (as with a
/// failed `pwrite`); nothing outside it is touched.
///
/// Optional operations have default implementations that return
/// [`crate::ErrorKind::Unsupported`]; none silently succeeds. Dropping a device
/// does not flush: call [`flush`](BlockDevice::flush) to make writes durable.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// Format, size and format-specific facts.
    fn info(&self) -> DeviceInfo;

    /// Guest-visible size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with guest data from `offset`. Unallocated ranges read as
    /// zeros or from the backing device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`: any alignment, any length.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        Err(Error::unsupported("this device does not support writes"))
    }

    /// Makes `[offset, offset + len)` read as zeros, without writing data
    /// where the format can.
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        let _ = (offset, len, mode);
        Err(Error::unsupported("this device does not support write_zeroes"))
    }

    /// Gives the space of `[offset, offset + len)` back to the host where the
    /// format can. Afterwards the range reads as zeros or as the backing
    /// device, as the format defines. Advisory: ranges smaller than the
    /// allocation unit may be left untouched.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::unsupported("this device does not support discard"))
    }

    /// Describes the contiguous run starting at `offset`, at most `max_len`
    /// bytes long (clipped to the device). The returned length is at least 1
    /// when `offset < size()` and `max_len > 0`.
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent>;

    /// Makes everything written so far durable, metadata in a safe order.
    fn flush(&self) -> Result<()>;

    /// Leaves the image clean on disk, as closing it does: everything
    /// flushed, and what a format defers written too (qcow2 lazy refcounts,
    /// with the dirty bit cleared), so `qemu-img check` finds no error. The
    /// device stays open and usable; a later write may make it dirty again.
    /// The formats' `close(self)` and their `Drop` (best effort, for devices
    /// opened read-write) call it. Defaults to [`flush`](Self::flush).
    fn make_clean(&self) -> Result<()> {
        self.flush()
    }

    /// Writes whole clusters compressed (qcow2, streamOptimized vmdk).
    /// `offset` and `buf.len()` must be multiples of the allocation unit
    /// (the last unit may end at the device's end). Data that does not
    /// shrink is stored uncompressed.
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        Err(Error::unsupported("this device does not support compressed writes"))
    }

    /// Changes the guest-visible size.
    fn resize(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        Err(Error::unsupported("this device cannot be resized"))
    }

    /// The device unallocated ranges fall through to (the backing image),
    /// if one is open.
    fn backing(&self) -> Option<&dyn BlockDevice> {
        None
    }

    /// Hands the image over to another host or process, as QEMU's
    /// `bdrv_inactivate_all` does at the end of a live migration: flushes
    /// everything and leaves the image clean (qcow2: lazy refcounts written,
    /// dirty bit cleared, persistent bitmaps stored), drops cached metadata,
    /// and releases the write lock while keeping the image open with a
    /// shared read lock. While inactive, guest I/O is refused. Inactivating
    /// an inactive device does nothing. `Unsupported` for formats that
    /// cannot hand off.
    fn inactivate(&self) -> Result<()> {
        Err(Error::unsupported(format!("{}: handing the image off (inactivate) is not supported", self.info().format)))
    }

    /// Takes the image back after [`BlockDevice::inactivate`] (QEMU's
    /// `bdrv_activate`): takes the write lock again and rereads the header
    /// and every table, since another host may have written. Fails with
    /// [`ErrorKind::Busy`](crate::ErrorKind::Busy) while another process
    /// holds the image; the device then stays inactive. Activating an
    /// active device does nothing.
    fn activate(&self) -> Result<()> {
        Err(Error::unsupported(format!("{}: taking the image back (activate) is not supported", self.info().format)))
    }

    /// Whether the device is inactive (handed off; see
    /// [`BlockDevice::inactivate`]).
    fn is_inactive(&self) -> bool {
        false
    }

    /// Rereads the image's metadata, for a read-only open shared with a
    /// writer elsewhere (force-share, `-U`): data that writer has flushed
    /// becomes visible. The view may be mid-update if the writer has not
    /// flushed. `Unsupported` for formats that cannot.
    fn refresh(&self) -> Result<()> {
        Err(Error::unsupported(format!("{}: rereading the metadata (refresh) is not supported", self.info().format)))
    }

    /// Scatter read: fills the buffers in order from `offset`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_request(offset, total, self.size())?;
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    /// Gather write: writes the buffers in order from `offset`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_request(offset, total, self.size())?;
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
}

/// How a format reaches the other files an image it creates names: the
/// backing image (qcow2 backing file, vmdk parent) and an external data
/// file. Formats never open files by path themselves; [`crate::OpenOptions`]
/// implements this under the caller's policy (format named or probed,
/// confinement, locks), which keeps probing opt-in and in one place.
pub trait Resolver {
    /// Opens the backing image recorded as `name` (relative names are
    /// relative to `dir`, the new image's directory), read-only. `format`
    /// is the recorded backing format; `None` asks the resolver to decide
    /// (probe, or refuse).
    fn open_backing(&self, dir: &std::path::Path, name: &str, format: Option<Format>) -> Result<Arc<dyn BlockDevice>>;

    /// Creates (or truncates) the external data file recorded as `name`,
    /// relative to `dir`, for writing.
    fn create_data_file(&self, dir: &std::path::Path, name: &str) -> Result<Arc<dyn crate::storage::Storage>>;
}

macro_rules! forward_block_device {
    ($t:ty) => {
        impl<D: BlockDevice + ?Sized> BlockDevice for $t {
            fn info(&self) -> DeviceInfo {
                (**self).info()
            }
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
                (**self).write_at(buf, offset)
            }
            fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
                (**self).write_zeroes(offset, len, mode)
            }
            fn discard(&self, offset: u64, len: u64) -> Result<()> {
                (**self).discard(offset, len)
            }
            fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
                (**self).map(offset, max_len)
            }
            fn flush(&self) -> Result<()> {
                (**self).flush()
            }
            fn make_clean(&self) -> Result<()> {
                (**self).make_clean()
            }
            fn resize(&self, new_size: u64) -> Result<()> {
                (**self).resize(new_size)
            }
            fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
                (**self).write_compressed(buf, offset)
            }
            fn backing(&self) -> Option<&dyn BlockDevice> {
                (**self).backing()
            }
            fn inactivate(&self) -> Result<()> {
                (**self).inactivate()
            }
            fn activate(&self) -> Result<()> {
                (**self).activate()
            }
            fn is_inactive(&self) -> bool {
                (**self).is_inactive()
            }
            fn refresh(&self) -> Result<()> {
                (**self).refresh()
            }
            fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
                (**self).read_vectored_at(bufs, offset)
            }
            fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
                (**self).write_vectored_at(bufs, offset)
            }
        }
    };
}

forward_block_device!(Box<D>);
forward_block_device!(Arc<D>);
forward_block_device!(&D);

/// Adapts any [`BlockDevice`] to `Read + Write + Seek`, for the rest of the
/// Rust ecosystem. Reads stop at the end of the device (short read, then 0);
/// writes past the end fail.
#[derive(Debug)]
pub struct DeviceCursor<D: BlockDevice> {
    dev: D,
    pos: u64,
}

impl<D: BlockDevice> DeviceCursor<D> {
    /// A cursor at offset 0.
    pub fn new(dev: D) -> Self {
        DeviceCursor { dev, pos: 0 }
    }

    /// The current position.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The device.
    pub fn get_ref(&self) -> &D {
        &self.dev
    }

    /// Gives the device back.
    pub fn into_inner(self) -> D {
        self.dev
    }
}

impl<D: BlockDevice> Read for DeviceCursor<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.dev.size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - self.pos) as usize;
        self.dev.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: BlockDevice> Write for DeviceCursor<D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let size = self.dev.size();
        if self.pos >= size {
            return Err(Error::out_of_bounds(self.pos, buf.len() as u64, size).into());
        }
        let n = (buf.len() as u64).min(size - self.pos) as usize;
        self.dev.write_at(&buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.dev.flush().map_err(Into::into)
    }
}

impl<D: BlockDevice> Seek for DeviceCursor<D> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.dev.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(io::ErrorKind::InvalidInput, "seek to a negative or overflowing position")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bounds() {
        assert!(check_request(0, 10, 10).is_ok());
        assert!(check_request(10, 0, 10).is_ok());
        assert!(check_request(10, 1, 10).is_err());
        assert!(check_request(u64::MAX, 2, u64::MAX).is_err());
    }

    #[test]
    fn format_names() {
        for f in [Format::Raw, Format::Qcow2, Format::Vmdk, Format::Vpc, Format::Vdi, Format::Vhdx] {
            assert_eq!(Format::from_name(f.name()).unwrap(), f);
        }
        assert!(Format::from_name("qed").is_err());
    }
}

#[cfg(test)]
mod cursor_tests {
    use super::*;
    use crate::raw::Raw;
    use crate::storage::MemStorage;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn cursor_reads_writes_and_seeks() {
        let dev = Raw::create(Arc::new(MemStorage::new()), 100).unwrap();
        let mut c = DeviceCursor::new(dev);
        c.write_all(b"hello").unwrap();
        assert_eq!(c.position(), 5);
        c.seek(SeekFrom::End(-2)).unwrap();
        c.write_all(b"!!").unwrap();
        assert!(c.write(b"x").is_err(), "writing past the end fails");
        c.seek(SeekFrom::Start(0)).unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 100);
        assert_eq!(&all[..5], b"hello");
        assert_eq!(&all[98..], b"!!");
        assert!(c.seek(SeekFrom::Current(-1000)).is_err());
    }
}
