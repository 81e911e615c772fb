//! What vdisk says about one volume: [`VolumeInfo`], built from the
//! entry's `stat`, its header [`Facts`] and its recorded format, as
//! listings, `vol-info` and `vol-dumpxml` show it.

use std::ffi::{OsStr, OsString};
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::headers::Facts;
use crate::device::Format;

/// What kind of directory entry a volume is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolType {
    /// A regular file.
    File,
    /// A directory (listed, as libvirt does; not an image).
    Dir,
    /// A symlink (listed; never written through).
    Symlink,
    /// A FIFO, socket or device node: listed with an error, never opened.
    Other,
}

impl VolType {
    /// libvirt's name (`file`, `dir`); symlinks and others report `file`.
    pub fn libvirt_name(self) -> &'static str {
        match self {
            VolType::Dir => "dir",
            _ => "file",
        }
    }
}

/// `stat` facts of a volume file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStat {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Length in bytes (`physical`).
    pub size: u64,
    /// Allocated bytes (`st_blocks * 512`).
    pub allocated: u64,
    /// Mode bits with the file type.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, i64),
    /// Modification time.
    pub mtime: (i64, i64),
    /// Status change time.
    pub ctime: (i64, i64),
}

impl FileStat {
    /// From metadata.
    pub fn of(md: &Metadata) -> FileStat {
        FileStat {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            allocated: md.blocks().saturating_mul(512),
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            atime: (md.atime(), md.atime_nsec()),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// A backing file named by an image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// The name as recorded in the image.
    pub name: String,
    /// The name resolved the way QEMU does (relative to the image's
    /// directory).
    pub path: PathBuf,
    /// The backing format recorded in the image, if any.
    pub format: Option<String>,
}

/// One volume as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// File name in the pool directory (may be any bytes for files vdisk
    /// did not create).
    pub name: OsString,
    /// Absolute path, which is also the volume key (as in libvirt's dir
    /// pools).
    pub path: PathBuf,
    /// Kind of entry.
    pub kind: VolType,
    /// The format vdisk opens it with (the recorded one).
    pub format: Option<Format>,
    /// The format its header shows now.
    pub probed_format: Option<Format>,
    /// Guest-visible size in bytes.
    pub capacity: u64,
    /// Host bytes allocated (`st_blocks * 512`, vmdk extent files included).
    pub allocation: u64,
    /// File length in bytes.
    pub physical: u64,
    /// The backing file named in the header (one level; see
    /// [`Volume::chain`](super::Volume::chain) for the whole chain).
    pub backing: Option<Backing>,
    /// Encryption (`qcow` for legacy AES, `luks`), if any.
    pub encryption: Option<String>,
    /// qcow2 compat level.
    pub compat: Option<String>,
    /// qcow2 cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2 lazy refcounts.
    pub lazy_refcounts: bool,
    /// Why the file could not be parsed (it is listed anyway).
    pub error: Option<String>,
    /// Something to know (format changed since it was recorded, ...).
    pub warning: Option<String>,
    /// stat facts.
    pub stat: FileStat,
}

impl VolumeInfo {
    /// The name for display (lossy for non-UTF-8 names).
    pub fn name_lossy(&self) -> String {
        self.name.to_string_lossy().into_owned()
    }
}

/// Builds the listing entry from stat, probe facts and the record.
pub(crate) fn build_info(
    dir_path: &Path,
    name: &OsStr,
    kind: VolType,
    stat: FileStat,
    facts: &Facts,
    recorded: Option<Format>,
    extent_alloc: u64,
) -> VolumeInfo {
    let path = dir_path.join(name);
    let format = recorded.or(facts.format);
    let mut warning = None;
    let mut capacity = facts.capacity;
    let mut backing = facts.backing.clone();
    let mut error = facts.error.clone();
    if let (Some(r), Some(p)) = (recorded, facts.format) {
        if r != p {
            warning = Some(format!(
                "the header now looks like {p}, but the volume was recorded as {r}: vdisk keeps opening it as {r}"
            ));
            if r == Format::Raw {
                capacity = stat.size;
                backing = None;
                error = None;
            } else {
                error = Some(format!("no valid {r} header found (the file looks like {p})"));
            }
        }
    }
    let image_dir = path.parent().unwrap_or(dir_path);
    VolumeInfo {
        name: name.to_os_string(),
        path: path.clone(),
        kind,
        format,
        probed_format: facts.format,
        capacity,
        allocation: stat.allocated.saturating_add(extent_alloc),
        physical: stat.size,
        backing: backing.map(|(n, f)| {
            let p = Path::new(&n);
            Backing { path: if p.is_absolute() { p.to_path_buf() } else { image_dir.join(p) }, name: n, format: f }
        }),
        encryption: facts.encryption.clone(),
        compat: facts.compat.clone(),
        cluster_size: facts.cluster_size,
        lazy_refcounts: facts.lazy_refcounts,
        error,
        warning,
        stat,
    }
}
