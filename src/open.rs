//! Opening images by path: explicit format or opt-in probing, and the
//! backing-file policy that decides which other host files an image may make
//! vdisk open.

use std::collections::HashSet;
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::{BlockDevice, DeviceInfo, Extent, Format, Resolver, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::MAX_BACKING_DEPTH;
use crate::qcow2::{Qcow2, Qcow2Options};
use crate::raw::Raw;
use crate::storage::lock::LockMode;
use crate::storage::{FileStorage, Storage};
use crate::vdi::{Vdi, VdiOptions};
use crate::vhdx::{Vhdx, VhdxOptions};
use crate::vmdk::{Vmdk, VmdkOptions};
use crate::vpc::{Vpc, VpcOptions};

/// Which backing (and external data) files an image may make vdisk open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Follow backing files whose format the image records (qcow2's backing
    /// format extension); an image that names a backing file without its
    /// format is an error. Never probes. The default.
    #[default]
    RecordedFormat,
    /// Follow backing files, probing the format where the image does not
    /// record it, as `qemu-img` does. Only for trusted images.
    Follow,
    /// Open no other file. Reads that fall through to a backing file fail;
    /// `info` and `map` still work.
    Never,
}

/// How to open an image. Built with chained setters:
///
/// ```
/// use vdisk::{OpenOptions, Format, BackingPolicy};
/// let opts = OpenOptions::new().format(Format::Qcow2).read_only(true).backing(BackingPolicy::Never);
/// # let _ = opts;
/// ```
#[derive(Debug, Clone)]
pub struct OpenOptions {
    format: Option<Format>,
    probe: bool,
    read_only: bool,
    backing: BackingPolicy,
    l2_cache_bytes: Option<u64>,
    max_depth: usize,
    confine_to: Option<PathBuf>,
    vmdk_external_extents: bool,
    key: Option<crate::crypto::Secret>,
    /// A LUKS volume's detached header file.
    luks_header: Option<PathBuf>,
    inspect_only: bool,
    lock: LockMode,
    cache: CacheMode,
    vhdx_for_check: bool,
    inactive: bool,
}

/// How image files use the host's page cache (QEMU's `cache=` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the page cache; `flush` syncs (QEMU's `writeback`).
    #[default]
    Writeback,
    /// `O_DIRECT`: around the page cache (QEMU's `none`); I/O is aligned
    /// to 4 KiB with bounce buffers.
    Direct,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenOptions {
    /// Read-write, no format chosen (set one, or allow probing), backing
    /// files followed only with a recorded format.
    pub fn new() -> Self {
        OpenOptions {
            format: None,
            probe: false,
            read_only: false,
            backing: BackingPolicy::RecordedFormat,
            l2_cache_bytes: None,
            max_depth: MAX_BACKING_DEPTH,
            confine_to: None,
            vmdk_external_extents: false,
            key: None,
            luks_header: None,
            inspect_only: false,
            lock: LockMode::Auto,
            cache: CacheMode::Writeback,
            vhdx_for_check: false,
            inactive: false,
        }
    }

    /// The cache mode of the top image file.
    pub fn cache(mut self, mode: CacheMode) -> Self {
        self.cache = mode;
        self
    }

    /// Opens read-only for looking at metadata: encrypted images open
    /// without their passphrase (their data cannot be read).
    pub fn inspect_only(mut self, inspect: bool) -> Self {
        self.inspect_only = inspect;
        if inspect {
            self.read_only = true;
        }
        self
    }

    /// The detached header of a LUKS volume (QEMU's `header=` of the `luks`
    /// driver): the header is read from this file, the payload is the
    /// opened file from its first byte.
    pub fn luks_header(mut self, path: impl Into<PathBuf>) -> Self {
        self.luks_header = Some(path.into());
        self
    }

    /// The passphrase for encrypted (legacy AES or LUKS) images.
    pub fn key(mut self, key: crate::crypto::Secret) -> Self {
        self.key = Some(key);
        self
    }

    /// Sets or clears the passphrase.
    pub fn key_opt(mut self, key: Option<crate::crypto::Secret>) -> Self {
        self.key = key;
        self
    }

    /// The image's format. A file opened as raw is never looked at.
    pub fn format(mut self, format: Format) -> Self {
        self.format = Some(format);
        self
    }

    /// Sets or clears the format.
    pub fn format_opt(mut self, format: Option<Format>) -> Self {
        self.format = format;
        self
    }

    /// Allows guessing the format from the file's magic when none is set.
    /// Never use it on a file a guest can write (see [`crate::probe`]).
    pub fn probe(mut self, probe: bool) -> Self {
        self.probe = probe;
        self
    }

    /// Opens read-only.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The backing-file policy.
    pub fn backing(mut self, policy: BackingPolicy) -> Self {
        self.backing = policy;
        self
    }

    /// L2 cache size in bytes for qcow2 images (each layer gets its own).
    pub fn l2_cache_bytes(mut self, bytes: u64) -> Self {
        self.l2_cache_bytes = Some(bytes);
        self
    }

    /// Deepest backing chain to open (default 10).
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth;
        self
    }

    /// Refuses backing and data files that resolve outside `dir`.
    pub fn confine_to(mut self, dir: impl Into<PathBuf>) -> Self {
        self.confine_to = Some(dir.into());
        self
    }

    /// Allows vmdk extent file names that are absolute or climb out of the
    /// descriptor's directory (`..`). Off by default: a hostile descriptor
    /// could otherwise expose any host file or device as guest data. Only
    /// for trusted images; [`confine_to`](Self::confine_to) still applies.
    pub fn allow_vmdk_external_extents(mut self, allow: bool) -> Self {
        self.vmdk_external_extents = allow;
        self
    }

    /// QEMU-compatible image locking ([`crate::storage::lock`]; default
    /// [`LockMode::Auto`]). The top image and qcow2 external data files are
    /// locked for their access (read-only or read-write); backing files and
    /// vmdk extent files as read-only users (the vmdk descriptor carries the
    /// write lock). While another process (a running VM, `qemu-io`, another
    /// vdisk) uses the image in a conflicting way, [`open`](Self::open)
    /// fails with [`ErrorKind::Busy`].
    /// [`LockMode::ForceShare`] (read-only only) is `qemu-img -U`.
    pub fn lock(mut self, mode: LockMode) -> Self {
        self.lock = mode;
        self
    }

    /// Opens a read-write image *inactive*, as the destination of a live
    /// migration does while the source still writes it: only a shared read
    /// lock is taken, nothing is written, guest I/O is refused until
    /// [`BlockDevice::activate`] takes the write lock and rereads the
    /// metadata. raw, qcow2, vdi, vpc and luks (not with a detached header).
    pub fn inactive(mut self, inactive: bool) -> Self {
        self.inactive = inactive;
        self
    }

    /// Opens the image at `path`.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<Image> {
        if self.inactive && self.read_only {
            return Err(Error::invalid_argument(
                "an inactive open is a read-write open handed over later; drop read-only",
            )
            .with_path(path.as_ref()));
        }
        if self.lock == LockMode::ForceShare && !self.read_only {
            return Err(Error::invalid_argument("force-share (-U) is only allowed for read-only opens")
                .with_path(path.as_ref()));
        }
        let mut seen = HashSet::new();
        self.open_layer(path.as_ref(), self.format, self.read_only, 0, &mut seen)
    }

    fn open_layer(
        &self,
        path: &Path,
        format: Option<Format>,
        read_only: bool,
        depth: usize,
        seen: &mut HashSet<(u64, u64)>,
    ) -> Result<Image> {
        if depth > self.max_depth {
            return Err(Error::limit(format!("backing chain is deeper than {} images", self.max_depth)).with_path(path));
        }
        let inactive = self.inactive && depth == 0;
        let storage: Arc<dyn Storage> = if depth == 0 && self.cache == CacheMode::Direct {
            let mut d = crate::storage::direct::DirectFile::open(path, read_only)?;
            if inactive {
                d.lock_inactive(self.lock)?;
            } else {
                d.lock(self.lock)?;
            }
            Arc::new(d)
        } else if inactive {
            let mut f = FileStorage::open(path, read_only)?;
            f.lock_inactive(self.lock)?;
            Arc::new(f)
        } else {
            Arc::new(FileStorage::open_locked(path, read_only, self.lock)?)
        };
        if let Some(f) = storage.file() {
            use std::os::unix::fs::MetadataExt;
            let md = f.metadata().map_err(|e| Error::io("cannot stat file", e).with_path(path))?;
            if !seen.insert((md.dev(), md.ino())) {
                return Err(Error::invalid(format!("backing chain loops back to {}", path.display())).with_path(path));
            }
        }
        let format = match format {
            Some(f) => f,
            None if self.probe || depth > 0 => crate::probe::probe(&*storage)?,
            None => {
                return Err(Error::invalid_argument(
                    "no image format given; name one (or enable probing for trusted images)",
                )
                .with_path(path))
            }
        };
        match format {
            Format::Raw if inactive => Ok(Image::Raw(Raw::open_inactive(storage)?)),
            Format::Raw => Ok(Image::Raw(Raw::open(storage)?)),
            // Not handed off: vmdk (several extent files, each locked on
            // its own, and sparse extents whose grain directories would all
            // have to be reread), vhdx (activation would have to replay the
            // log the other side left and inactivation empty it; not
            // written), luks with a detached header (a second file to
            // relock).
            Format::Luks if inactive && self.luks_header.is_some() => {
                Err(Error::unsupported("luks: a volume with a detached header is not handed off (two files to relock)")
                    .with_path(path))
            }
            f if inactive && !matches!(f, Format::Qcow2 | Format::Vdi | Format::Vpc | Format::Luks) => {
                Err(Error::unsupported(format!(
                    "{f}: opening an image inactive (for a handoff) is supported for raw, qcow2, vpc, vdi and luks only"
                ))
                .with_path(path))
            }
            Format::Qcow2 => {
                let h = Qcow2::read_header(&*storage)?;
                let dir = path.parent().unwrap_or(Path::new("."));
                let mut opts = Qcow2Options {
                    read_only,
                    l2_cache_bytes: self.l2_cache_bytes,
                    key: self.key.clone(),
                    inspect_only: self.inspect_only,
                    inactive,
                    ..Default::default()
                };
                if let Some(name) = &h.backing_file {
                    opts.backing = self.open_backing(path, dir, name, h.backing_format.as_deref(), depth, seen)?;
                }
                if let (Some(name), true) =
                    (&h.data_file, h.incompatible_features & crate::qcow2::header::INCOMPAT_DATA_FILE != 0)
                {
                    if self.backing != BackingPolicy::Never {
                        let p = self.resolve(path, dir, name, "data file")?;
                        opts.data_file = Some(Arc::new(if inactive {
                            let mut f = FileStorage::open(&p, read_only)?;
                            f.lock_inactive(self.lock)?;
                            f
                        } else {
                            FileStorage::open_locked(&p, read_only, self.lock)?
                        }));
                    }
                }
                Ok(Image::Qcow2(Qcow2::open(storage, opts)?))
            }
            Format::Vmdk => {
                let desc = Vmdk::read_descriptor(&*storage)?;
                let dir = path.parent().unwrap_or(Path::new("."));
                let mut opts =
                    VmdkOptions { read_only, allow_external_extents: self.vmdk_external_extents, ..Default::default() };
                if let Some(hint) = desc.parent_hint() {
                    // A delta link's parent is vmdk by definition.
                    opts.parent = self.open_backing(path, dir, hint, Some("vmdk"), depth, seen)?;
                }
                let opener = |p: &Path, ro: bool| -> Result<Arc<dyn Storage>> {
                    let p = self.confine(path, p, "extent file")?;
                    let mut st = FileStorage::open(p, ro)?;
                    st.lock_as(self.lock, crate::storage::lock::Access::ReadOnly)?;
                    Ok(Arc::new(st))
                };
                Ok(Image::Vmdk(Vmdk::open_with(storage, opts, &opener)?))
            }
            Format::Vpc => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let mut opts = VpcOptions { read_only, inactive, ..Default::default() };
                if let Some(name) = Vpc::parent_name(&*storage)? {
                    // A differencing disk's parent is a VHD by definition.
                    opts.parent = self.open_backing(path, dir, &name, Some("vpc"), depth, seen)?;
                }
                Ok(Image::Vpc(Vpc::open(storage, opts)?))
            }
            Format::Vdi => Ok(Image::Vdi(Vdi::open(storage, VdiOptions { read_only, inactive })?)),
            Format::Vhdx => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let mut opts = VhdxOptions { read_only, for_check: self.vhdx_for_check, ..Default::default() };
                if let Some(hint) = Vhdx::read_parent_hint(&storage)? {
                    let name = hint.path().ok_or_else(|| {
                        Error::invalid("differencing VHDX image whose parent locator has no relative_path")
                            .with_path(path)
                            .with_field("ParentLocator")
                    })?;
                    // A differencing VHDX's parent is VHDX by definition.
                    opts.parent = self.open_backing(path, dir, &name, Some("vhdx"), depth, seen)?;
                }
                Ok(Image::Vhdx(Vhdx::open(storage, opts)?))
            }
            Format::Luks => {
                let header: Option<Arc<dyn Storage>> = match &self.luks_header {
                    Some(p) if depth == 0 => Some(Arc::new(FileStorage::open_locked(p, read_only, self.lock)?)),
                    _ => None,
                };
                let opts = crate::luks::LuksOptions {
                    read_only,
                    key: self.key.clone(),
                    inspect_only: self.inspect_only,
                    header,
                    inactive,
                };
                Ok(Image::Luks(crate::luks::Luks::open(storage, opts)?))
            }
        }
    }

    /// Creates a qcow2 image file at `path`; a backing file or data file
    /// named in `opts` is opened or created under these options' policy
    /// (see the [`Resolver`] impl).
    pub fn create_qcow2(&self, path: impl AsRef<Path>, opts: &crate::qcow2::create::CreateOptions) -> Result<Qcow2> {
        Qcow2::create_file_with(path.as_ref(), opts, self)
    }

    /// Creates a VHDX image at `path`; a parent named in `opts`
    /// (`backing_file`, a differencing image) is opened under these
    /// options' policy.
    pub fn create_vhdx(&self, path: impl AsRef<Path>, size: u64, opts: &crate::VhdxCreateOptions) -> Result<Vhdx> {
        Vhdx::create_with(path.as_ref(), size, opts, self)
    }

    /// Opens VHDX images for `check`: BAT entries pointing outside the
    /// file or into metadata are counted by the check instead of failing
    /// the open (QEMU's `BDRV_O_CHECK`).
    pub fn vhdx_for_check(mut self, on: bool) -> Self {
        self.vhdx_for_check = on;
        self
    }

    /// Creates a vmdk image at `path`; a parent named in `opts` is opened
    /// under these options' policy (see the [`Resolver`] impl).
    pub fn create_vmdk(&self, path: impl AsRef<Path>, size: u64, opts: &crate::VmdkCreateOptions) -> Result<Vmdk> {
        Vmdk::create_with(path.as_ref(), size, opts, self)
    }

    fn resolve(&self, image: &Path, dir: &Path, name: &str, what: &str) -> Result<PathBuf> {
        if name.starts_with("json:") || name.contains("://") {
            return Err(Error::unsupported(format!("{what} '{name}' is not a plain file name")).with_path(image));
        }
        let p = Path::new(name);
        let p = if p.is_absolute() { p.to_path_buf() } else { dir.join(p) };
        self.confine(image, &p, what)
    }

    /// Applies [`confine_to`](Self::confine_to) to an already resolved path.
    fn confine(&self, image: &Path, p: &Path, what: &str) -> Result<PathBuf> {
        if let Some(root) = &self.confine_to {
            let canon = p
                .canonicalize()
                .map_err(|e| Error::io(format!("cannot resolve {what} '{}'", p.display()), e).with_path(image))?;
            let root = root.canonicalize().map_err(|e| Error::io("cannot resolve the confinement directory", e))?;
            if !canon.starts_with(&root) {
                return Err(Error::new(
                    ErrorKind::InvalidImage,
                    format!("{what} '{}' resolves outside {}", p.display(), root.display()),
                )
                .with_path(image));
            }
        }
        Ok(p.to_path_buf())
    }

    fn open_backing(
        &self,
        image: &Path,
        dir: &Path,
        name: &str,
        recorded: Option<&str>,
        depth: usize,
        seen: &mut HashSet<(u64, u64)>,
    ) -> Result<Option<Arc<dyn BlockDevice>>> {
        let format = match (self.backing, recorded) {
            (BackingPolicy::Never, _) => return Ok(None),
            (_, Some(f)) => Some(Format::from_name(f).map_err(|e| e.with_path(image).with_field("backing_format"))?),
            (BackingPolicy::RecordedFormat, None) => {
                return Err(Error::invalid(format!(
                    "the backing file '{name}' has no recorded format; pass a backing policy that allows probing for trusted images"
                ))
                .with_path(image)
                .with_field("backing_format"))
            }
            (BackingPolicy::Follow, None) => None,
        };
        let p = self.resolve(image, dir, name, "backing file")?;
        let img = self
            .open_layer(&p, format, true, depth + 1, seen)
            .map_err(|e| e.context(format!("opening backing file '{name}'")))?;
        Ok(Some(Arc::new(img)))
    }
}

impl Resolver for OpenOptions {
    /// Opens a backing image for a create: with the recorded format, or,
    /// without one, probed only if these options allow probing
    /// ([`probe`](Self::probe) or [`BackingPolicy::Follow`]); confined and
    /// locked as these options say; its own backing chain follows the
    /// policy.
    fn open_backing(&self, dir: &Path, name: &str, format: Option<Format>) -> Result<Arc<dyn BlockDevice>> {
        let image = dir.join(name);
        if self.backing == BackingPolicy::Never {
            return Err(Error::invalid_argument(format!(
                "the backing file '{name}' would have to be opened, and the backing policy is Never"
            )));
        }
        if format.is_none() && !(self.probe || self.backing == BackingPolicy::Follow) {
            return Err(Error::invalid_argument(format!(
                "the backing file '{name}' has no format given; name it (backing_fmt, -F), or allow probing for trusted images"
            ))
            .with_field("backing_format"));
        }
        let p = self.resolve(&image, dir, name, "backing file")?;
        let mut seen = HashSet::new();
        let img = self
            .open_layer(&p, format, true, 1, &mut seen)
            .map_err(|e| e.context(format!("opening backing file '{name}'")))?;
        Ok(Arc::new(img))
    }

    fn create_data_file(&self, dir: &Path, name: &str) -> Result<Arc<dyn Storage>> {
        let image = dir.join(name);
        if name.starts_with("json:") || name.contains("://") {
            return Err(Error::unsupported(format!("data file '{name}' is not a plain file name")));
        }
        let p = if Path::new(name).is_absolute() { PathBuf::from(name) } else { dir.join(name) };
        // The file does not exist yet: confine the directory it goes into.
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        self.confine(&image, parent, "data file directory")?;
        Ok(Arc::new(FileStorage::create(&p)?))
    }
}

/// Opens the image at `path` with `options`.
pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Image> {
    options.open(path)
}

/// An opened image of any format.
// One per open image and long-lived: the size difference between the
// variants does not matter enough to box them.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
#[non_exhaustive]
pub enum Image {
    /// A raw image.
    Raw(Raw),
    /// A qcow2 image.
    Qcow2(Qcow2),
    /// A vmdk image.
    Vmdk(Vmdk),
    /// A VHD image.
    Vpc(Vpc),
    /// A VDI image.
    Vdi(Vdi),
    /// A VHDX image.
    Vhdx(Vhdx),
    /// An NBD export (its guest bytes, as raw).
    Nbd(crate::nbd::Client),
    /// A LUKS volume.
    Luks(crate::luks::Luks),
}

impl Image {
    fn dev(&self) -> &dyn BlockDevice {
        match self {
            Image::Raw(d) => d,
            Image::Qcow2(d) => d,
            Image::Vmdk(d) => d,
            Image::Vpc(d) => d,
            Image::Vdi(d) => d,
            Image::Vhdx(d) => d,
            Image::Nbd(d) => d,
            Image::Luks(d) => d,
        }
    }

    /// The format.
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
            Image::Vmdk(_) => Format::Vmdk,
            Image::Vpc(_) => Format::Vpc,
            Image::Vdi(_) => Format::Vdi,
            Image::Vhdx(_) => Format::Vhdx,
            Image::Nbd(_) => Format::Raw,
            Image::Luks(_) => Format::Luks,
        }
    }

    /// Flushes and closes the image, leaving it clean (qcow2: lazy
    /// refcounts written, dirty bit cleared). Dropping an image does the
    /// same, best effort, but cannot report a failure.
    pub fn close(self) -> Result<()> {
        match self {
            Image::Raw(d) => d.close(),
            Image::Qcow2(d) => d.close(),
            Image::Vmdk(d) => d.close(),
            Image::Vpc(d) => d.close(),
            Image::Vdi(d) => d.close(),
            Image::Vhdx(d) => d.close(),
            Image::Nbd(d) => d.flush(),
            Image::Luks(d) => d.close(),
        }
    }

    /// Host bytes allocated by the image file (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> Option<u64> {
        match self {
            Image::Raw(r) => r.storage().allocated_bytes(),
            Image::Qcow2(q) => q.file().allocated_bytes(),
            Image::Vmdk(v) => v.allocated_bytes(),
            Image::Vpc(v) => v.file().allocated_bytes(),
            Image::Vdi(v) => v.file().allocated_bytes(),
            Image::Vhdx(v) => v.allocated_bytes(),
            Image::Nbd(_) => None,
            Image::Luks(l) => l.payload_file().allocated_bytes(),
        }
    }
}

impl BlockDevice for Image {
    fn info(&self) -> DeviceInfo {
        self.dev().info()
    }
    fn size(&self) -> u64 {
        self.dev().size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.dev().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.dev().write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.dev().write_zeroes(offset, len, mode)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.dev().discard(offset, len)
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.dev().map(offset, max_len)
    }
    fn flush(&self) -> Result<()> {
        self.dev().flush()
    }
    fn make_clean(&self) -> Result<()> {
        self.dev().make_clean()
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        self.dev().resize(new_size)
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.dev().write_compressed(buf, offset)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.dev().backing()
    }
    fn inactivate(&self) -> Result<()> {
        self.dev().inactivate()
    }
    fn activate(&self) -> Result<()> {
        self.dev().activate()
    }
    fn is_inactive(&self) -> bool {
        self.dev().is_inactive()
    }
    fn refresh(&self) -> Result<()> {
        self.dev().refresh()
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.dev().read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.dev().write_vectored_at(bufs, offset)
    }
}
