//! Creating volumes: new images, linked clones and full copies, built in a
//! temporary directory inside the pool and renamed into place without
//! replacing anything.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::def::Permissions;
use super::dir::PoolDir;
use super::name::{check_volume_name, TEMP_PREFIX};
use super::scan::Record;
use super::uuid::random_hex;
use super::{Pool, Volume};
use crate::convert::{ConvertOptions, Progress};
use crate::device::{BlockDevice, Format};
use crate::error::{Error, ErrorKind, Result};
use crate::open::{BackingPolicy, Image, OpenOptions};
use crate::qcow2::create::{CreateOptions, Preallocation};
use crate::qcow2::crypt::Secret;
use crate::qcow2::{Qcow2, Qcow2Options};
use crate::raw::Raw;
use crate::storage::{FileStorage, Storage};
use crate::vmdk::{Vmdk, VmdkCreateOptions};

/// The backing store of a linked clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSpec {
    /// The backing volume's path (its key), recorded as is in the new image.
    pub path: PathBuf,
    /// Its format: required, never probed, recorded in the new image.
    pub format: Format,
}

/// What to create: `vol-create-as` arguments or a `<volume>` document.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// The new volume's name.
    pub name: String,
    /// Guest-visible size in bytes (0 with a backing store: the backing
    /// volume's size). Rounded up to 512 for qcow2 and vmdk.
    pub capacity: u64,
    /// Host bytes to reserve for raw volumes: `Some(0)` sparse (virsh
    /// `vol-create-as` without `--allocation`), `None` fully allocated
    /// (volume XML without `<allocation>`), as libvirt does.
    pub allocation: Option<u64>,
    /// raw, qcow2 or vmdk.
    pub format: Format,
    /// A linked clone's backing volume (qcow2 overlays; vmdk delta links
    /// need a vmdk backing volume).
    pub backing: Option<BackingSpec>,
    /// Mode (default 0600), owner and group of the new file.
    pub permissions: Permissions,
    /// `--prealloc-metadata` (qcow2: `preallocation=metadata`).
    pub prealloc_metadata: bool,
    /// qcow2 `-o` options (`compat`, `cluster_size`, `lazy_refcounts`,
    /// `refcount_bits`, `extended_l2`, `compression_type`, `preallocation`).
    pub qcow2_options: Vec<(String, String)>,
    /// Legacy AES encryption of a qcow2 volume with this passphrase.
    pub encryption: Option<Secret>,
}

impl VolumeSpec {
    /// A sparse volume of `capacity` bytes.
    pub fn new(name: &str, capacity: u64, format: Format) -> Result<VolumeSpec> {
        Ok(VolumeSpec {
            name: check_volume_name(name)?,
            capacity,
            allocation: Some(0),
            format,
            backing: None,
            permissions: Permissions::default(),
            prealloc_metadata: false,
            qcow2_options: Vec::new(),
            encryption: None,
        })
    }

    /// Adds a backing volume (builder style).
    pub fn backing(mut self, path: impl Into<PathBuf>, format: Format) -> Self {
        self.backing = Some(BackingSpec { path: path.into(), format });
        self
    }

    /// Adds a qcow2 option (builder style).
    pub fn qcow2_option(mut self, key: &str, value: &str) -> Self {
        self.qcow2_options.push((key.to_string(), value.to_string()));
        self
    }

    fn validate(&self) -> Result<()> {
        check_volume_name(&self.name)?;
        match self.format {
            Format::Raw => {
                if self.backing.is_some() {
                    return Err(Error::unsupported("backing storage not supported for raw volumes"));
                }
                if self.prealloc_metadata {
                    return Err(Error::unsupported("metadata preallocation is not supported for raw volumes"));
                }
                if self.encryption.is_some() {
                    return Err(Error::unsupported(
                        "encrypted raw volumes (LUKS) are not supported: use qcow2 with legacy AES",
                    ));
                }
            }
            Format::Vmdk => {
                if self.encryption.is_some() || self.prealloc_metadata || !self.qcow2_options.is_empty() {
                    return Err(Error::unsupported(
                        "encryption, metadata preallocation and qcow2 options apply to qcow2 volumes only",
                    ));
                }
                if let Some(b) = &self.backing {
                    if b.format != Format::Vmdk {
                        return Err(Error::unsupported(
                            "a vmdk volume's backing volume (delta link parent) must be vmdk",
                        ));
                    }
                }
            }
            Format::Qcow2 => {
                if self.prealloc_metadata && self.backing.is_some() {
                    return Err(Error::unsupported("metadata preallocation conflicts with a backing store"));
                }
            }
        }
        if self.capacity == 0 && self.backing.is_none() {
            return Err(Error::invalid_argument("a volume needs a capacity above 0"));
        }
        Ok(())
    }
}

/// How [`Pool::clone_volume`] copies.
#[derive(Clone, Copy, Default)]
pub struct CloneOptions<'a> {
    /// Format of the copy (default: the source's).
    pub format: Option<Format>,
    /// Called as the copy progresses: (bytes done, total).
    pub progress: Option<Progress<'a>>,
}

impl std::fmt::Debug for CloneOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneOptions").field("format", &self.format).finish()
    }
}

/// A temporary build directory in the pool, removed on drop unless
/// published.
struct TempBuild<'a> {
    dir: &'a PoolDir,
    tmp: OsString,
    name: OsString,
    done: bool,
}

impl<'a> TempBuild<'a> {
    fn new(dir: &'a PoolDir, name: &str) -> Result<TempBuild<'a>> {
        let tmp = OsString::from(format!("{TEMP_PREFIX}{}", random_hex(8)?));
        dir.mkdir(&tmp, 0o700)?;
        Ok(TempBuild { dir, tmp, name: OsString::from(name), done: false })
    }

    fn file_path(&self) -> PathBuf {
        self.dir.join(&self.tmp).join(&self.name)
    }

    fn publish(&mut self) -> Result<()> {
        let rel = Path::new(&self.tmp).join(&self.name);
        self.dir.publish(&rel, &self.name)?;
        self.done = true;
        self.dir.sync()?;
        let _ = self.dir.remove(&self.tmp, true);
        Ok(())
    }
}

impl Drop for TempBuild<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(self.file_path());
            let _ = self.dir.remove(&self.tmp, true);
        }
    }
}

fn exists_error(pool: &Pool, name: &str, path: &Path) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!("storage volume '{name}' exists already in pool '{}' ({})", pool.name(), path.display()),
    )
}

fn raw_file(path: &Path) -> Result<FileStorage> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io("cannot create", e).with_path(path))?;
    let mut s = FileStorage::from_file(f, path, false)?;
    s.lock(crate::LockMode::Auto)?;
    Ok(s)
}

/// Reserves `[0, len)` with fallocate, writing zeros where the filesystem
/// cannot.
fn allocate(s: &FileStorage, len: u64) -> Result<()> {
    match s.allocate(0, len) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            let zeros = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < len {
                let n = (len - off).min(zeros.len() as u64);
                s.write_at(&zeros[..n as usize], off)?;
                off += n;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

impl Pool {
    /// Creates a volume (`vol-create-as` / `vol-create`). The name must be
    /// new: nothing at that name is ever replaced, and of two creators of
    /// one name (threads or processes) exactly one wins; the other gets
    /// [`ErrorKind::AlreadyExists`]. `progress` is told about preallocation.
    pub fn create_volume(&self, spec: &VolumeSpec, progress: Option<Progress<'_>>) -> Result<Volume> {
        self.build_volume(spec, None, progress)
    }

    /// Copies `src` (from any pool) into a new volume `name` of this pool
    /// (`vol-clone`, `vol-create-from`): the guest content, holes kept,
    /// backing chain flattened, optionally converted to another format.
    pub fn clone_volume(&self, src: &Volume, name: &str, opts: &CloneOptions<'_>) -> Result<Volume> {
        let dev = src.open(true)?;
        let format = match opts.format {
            Some(f) => f,
            None => src.recorded_format()?,
        };
        let spec = VolumeSpec::new(name, dev.size(), format)?;
        if spec.capacity == 0 {
            return Err(Error::invalid_argument("cannot clone an empty volume"));
        }
        self.build_volume(&spec, Some(&dev), opts.progress)
    }

    fn build_volume(
        &self,
        spec: &VolumeSpec,
        fill: Option<&dyn BlockDevice>,
        progress: Option<Progress<'_>>,
    ) -> Result<Volume> {
        self.require_active()?;
        spec.validate()?;
        let d = self.dir()?;
        let name = spec.name.as_str();
        let final_path = d.join(OsStr::new(name));
        if d.lstat(OsStr::new(name))?.is_some() {
            return Err(exists_error(self, name, &final_path));
        }
        let backing: Option<Image> = match &spec.backing {
            Some(b) => Some(
                OpenOptions::new()
                    .format(b.format)
                    .read_only(true)
                    .backing(BackingPolicy::RecordedFormat)
                    .open(&b.path)
                    .map_err(|e| e.context(format!("opening backing volume {}", b.path.display())))?,
            ),
            None => None,
        };
        let capacity = match (&backing, spec.capacity) {
            (Some(b), 0) => b.size(),
            (_, c) => c,
        };
        let mut tmp = TempBuild::new(&d, name)?;
        let path = tmp.file_path();
        let dev: Box<dyn BlockDevice> = match spec.format {
            Format::Raw => {
                let s = raw_file(&path)?;
                s.set_len(capacity)?;
                let alloc = match spec.allocation {
                    None => capacity,
                    Some(a) => a.min(capacity),
                };
                if alloc > 0 && fill.is_none() {
                    allocate(&s, alloc)?;
                    if let Some(p) = progress {
                        p(alloc, alloc);
                    }
                }
                Box::new(Raw::open(Arc::new(s))?)
            }
            Format::Qcow2 => {
                let mut o = CreateOptions::new(capacity);
                for (k, v) in &spec.qcow2_options {
                    o.set(k, v).map_err(|e| e.context(format!("qcow2 option {k}")))?;
                }
                if spec.prealloc_metadata {
                    o.preallocation = Preallocation::Metadata;
                }
                if let Some(b) = &spec.backing {
                    o.backing_file = Some(b.path.to_string_lossy().into_owned());
                    o.backing_format = Some(b.format.name().to_string());
                }
                o.encrypt = spec.encryption.clone();
                let s = raw_file(&path)?;
                let extra = Qcow2Options {
                    backing: backing.map(|b| Arc::new(b) as Arc<dyn BlockDevice>),
                    key: spec.encryption.clone(),
                    ..Default::default()
                };
                Box::new(Qcow2::create(Arc::new(s), &o, extra).map_err(|e| e.with_path(&final_path))?)
            }
            Format::Vmdk => {
                drop(backing);
                let o = VmdkCreateOptions {
                    backing_file: spec.backing.as_ref().map(|b| b.path.to_string_lossy().into_owned()),
                    ..Default::default()
                };
                Box::new(Vmdk::create(&path, capacity, &o)?)
            }
        };
        if let Some(src) = fill {
            let opts = ConvertOptions { threads: 2, progress, ..ConvertOptions::default() };
            crate::convert::convert(src, &*dev, &opts)?;
        }
        dev.make_clean()?;
        // Mode and owner on the new file, then make it durable.
        let mode = spec.permissions.mode.unwrap_or(0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("cannot set the volume mode", e).with_path(&path))?;
        if spec.permissions.owner.is_some() || spec.permissions.group.is_some() {
            std::os::unix::fs::lchown(&path, spec.permissions.owner, spec.permissions.group)
                .map_err(|e| Error::io("cannot set the volume owner", e).with_path(&path))?;
        }
        let md = std::fs::symlink_metadata(&path).map_err(|e| Error::io("cannot stat", e).with_path(&path))?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("cannot sync the new volume", e).with_path(&path))?;
        // Still locked by `dev` while it moves into place.
        tmp.publish().map_err(|e| {
            if e.kind() == ErrorKind::AlreadyExists {
                exists_error(self, name, &final_path)
            } else {
                e
            }
        })?;
        drop(dev);
        self.record(OsStr::new(name), Some(Record { dev: md.dev(), ino: md.ino(), format: spec.format }))?;
        Ok(Volume::new(self.clone(), OsString::from(name)))
    }
}
