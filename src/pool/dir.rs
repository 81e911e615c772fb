//! The pool directory: every volume operation goes through one open
//! directory descriptor and single-component names, so nothing reaches
//! outside the pool.
//!
//! * Names never contain `/` (checked before they get here), so `*at`
//!   calls relative to the directory descriptor cannot climb out.
//! * Files are opened with `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`, and the
//!   file type is checked on the *opened descriptor*: a symlink, FIFO,
//!   socket or device node is refused whatever the name looked like when it
//!   was listed.
//! * New names appear only through `renameat2(RENAME_NOREPLACE)`, which
//!   never replaces anything (a dangling symlink included).

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use super::name::c_name;
use crate::error::{Error, ErrorKind, Result};
use crate::sys;

/// An open pool directory.
#[derive(Debug)]
pub(crate) struct PoolDir {
    fd: File,
    path: PathBuf,
}

/// What kind of directory entry a name is.
pub(crate) fn kind_name(md: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Opens `path` read-only without blocking (a FIFO without a writer does
/// not hang us) and without acquiring a controlling terminal: for files
/// named from outside the pool directory (state files, symlink targets,
/// backing files). The caller checks the file type on the descriptor.
pub(crate) fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)
}

impl PoolDir {
    /// Opens `path` (which must be a directory, not a symlink to one).
    pub fn open(path: &Path) -> Result<PoolDir> {
        use std::os::unix::fs::OpenOptionsExt;
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Error::io("cannot open the pool directory", e).with_path(path))?;
        Ok(PoolDir { fd, path: path.to_path_buf() })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in the directory (for messages and keys).
    pub fn join(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    /// `lstat` of `name` (a symlink is described, not followed); `None`
    /// when nothing is there.
    pub fn lstat(&self, name: &OsStr) -> Result<Option<Metadata>> {
        match std::fs::symlink_metadata(self.join(name)) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("cannot stat", e).with_path(self.join(name))),
        }
    }

    /// Whether `name` is still the regular file `key` (device, inode)
    /// identified when it was opened: not replaced, not swapped for a
    /// symlink.
    pub fn is_same_file(&self, name: &OsStr, key: (u64, u64)) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        Ok(matches!(self.lstat(name)?, Some(m) if m.is_file() && (m.dev(), m.ino()) == key))
    }

    /// Opens the regular file `name` (read-only or read-write), never
    /// through a symlink, and refuses anything that is not a regular file,
    /// checked on the descriptor.
    pub fn open_file(&self, name: &OsStr, write: bool) -> Result<File> {
        let path = self.join(name);
        let c = c_name(name)?;
        let acc = if write { libc::O_RDWR } else { libc::O_RDONLY };
        let fd = sys::openat(self.fd.as_fd(), &c, acc | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => {
                    Error::new(ErrorKind::InvalidArgument, "is a symlink: vdisk does not open volumes through symlinks")
                        .with_path(&path)
                }
                Some(libc::ENXIO) => {
                    Error::new(ErrorKind::InvalidArgument, "is a socket or FIFO without a writer, not a regular file")
                        .with_path(&path)
                }
                _ => Error::io("cannot open", e).with_path(&path),
            })?;
        let file = File::from(fd);
        let md = file.metadata().map_err(|e| Error::io("cannot stat", e).with_path(&path))?;
        if !md.file_type().is_file() {
            return Err(Error::new(ErrorKind::InvalidArgument, format!("is a {}, not a regular file", kind_name(&md)))
                .with_path(&path));
        }
        Ok(file)
    }

    /// Makes the directory `name` with `mode`.
    pub fn mkdir(&self, name: &OsStr, mode: u32) -> Result<()> {
        let c = c_name(name)?;
        sys::mkdirat(self.fd.as_fd(), &c, mode as libc::mode_t)
            .map_err(|e| Error::io("cannot make directory", e).with_path(self.join(name)))
    }

    /// Removes `name` (a symlink is removed, not followed); with `dir` only
    /// an empty directory.
    pub fn remove(&self, name: &OsStr, dir: bool) -> Result<()> {
        let c = c_name(name)?;
        sys::unlinkat(self.fd.as_fd(), &c, dir).map_err(|e| Error::io("cannot remove", e).with_path(self.join(name)))
    }

    /// Renames `old` (relative to the directory; may be `tmpdir/name`) to
    /// `new` without replacing anything.
    pub fn publish(&self, old: &Path, new: &OsStr) -> Result<()> {
        let o = c_name(old.as_os_str())?;
        let n = c_name(new)?;
        sys::rename_noreplace(self.fd.as_fd(), &o, &n).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Error::new(ErrorKind::AlreadyExists, "a volume of that name already exists").with_path(self.join(new))
            } else {
                Error::io("cannot rename the new volume into place", e).with_path(self.join(new))
            }
        })
    }

    /// `fsync` of the directory, making renames and removals durable.
    pub fn sync(&self) -> Result<()> {
        self.fd.sync_all().map_err(|e| Error::io("cannot sync the pool directory", e).with_path(&self.path))
    }

    /// Filesystem figures of the directory.
    pub fn fs_stats(&self) -> Result<sys::FsStats> {
        sys::fs_stats(self.fd.as_fd()).map_err(|e| Error::io("statvfs failed", e).with_path(&self.path))
    }
}
