//! Creating volumes: new images, linked clones and full copies, built in a
//! temporary directory inside the pool and renamed into place without
//! replacing anything.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use super::lifecycle::Pool;
use super::records::Record;
use super::spec::{VolumeEncryption, VolumeSpec};
use super::temp::TempBuild;
use super::volume::Volume;
use crate::convert::{ConvertOptions, Progress};
use crate::device::{BlockDevice, Format};
use crate::error::{Error, ErrorKind, Result};
use crate::luks::{Luks, Luks1Params};
use crate::open::{BackingPolicy, Image, OpenOptions};
use crate::qcow2::create::{CreateOptions, Preallocation};
use crate::qcow2::{Qcow2, Qcow2Options};
use crate::raw::Raw;
use crate::storage::{FileStorage, Storage};
use crate::vmdk::VmdkCreateOptions;

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
        let dev: Box<dyn BlockDevice> = match spec.file_format() {
            Format::Luks => {
                let key = spec
                    .encryption
                    .as_ref()
                    .ok_or_else(|| Error::invalid_argument("a luks volume needs a passphrase (--passphrase-file)"))?;
                let mut params = Luks1Params::default();
                for (k, v) in &spec.qcow2_options {
                    let key = k.strip_prefix("encrypt.").unwrap_or(k);
                    if !params.set(key, v).map_err(|e| e.context(format!("luks option {k}")))? {
                        return Err(Error::unsupported(format!("option '{k}' does not apply to luks volumes")));
                    }
                }
                // Sparse, as `qemu-img create -f luks` leaves the payload.
                let s = raw_file(&path)?;
                Box::new(Luks::create(Arc::new(s), None, capacity, &params, key).map_err(|e| e.with_path(&final_path))?)
            }
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
                if spec.encryption.is_some() && spec.encryption_format == VolumeEncryption::Luks {
                    o.set("encrypt.format", "luks")?;
                }
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
                // The parent is opened by the crate's opener, vmdk named:
                // the volume's recorded format, never probed.
                Box::new(OpenOptions::new().create_vmdk(&path, capacity, &o)?)
            }
            Format::Vpc => {
                drop(backing);
                Box::new(crate::vpc::Vpc::create_file(&path, capacity, &crate::vpc::VpcCreateOptions::default())?)
            }
            Format::Vdi => {
                drop(backing);
                Box::new(crate::vdi::Vdi::create_file(&path, capacity, &crate::vdi::VdiCreateOptions::default())?)
            }
            Format::Vhdx => {
                return Err(Error::unsupported("pools do not create VHDX volumes (libvirt has no such format)"))
            }
        };
        if let Some(src) = fill {
            let opts = ConvertOptions { threads: 2, progress, ..ConvertOptions::default() };
            crate::convert::convert(src, &*dev, &opts)?;
        }
        // Clean before it is published, the error reported: everything
        // flushed, qcow2 lazy refcounts written and the dirty bit cleared.
        // Nothing writes through `dev` after this.
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
        // Already clean: dropping only releases the image's locks.
        drop(dev);
        self.record(OsStr::new(name), Some(Record::of(&md, spec.file_format())))?;
        Ok(Volume::new(self.clone(), OsString::from(name)))
    }
}
