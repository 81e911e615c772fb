//! The one module allowed `unsafe`: thin wrappers over the few system calls
//! std does not offer (hole punching, preallocation, SEEK_DATA/SEEK_HOLE,
//! byte-range open-file-description locks, statvfs, and the signal handlers
//! that let `vdisk serve` stop cleanly).
//!
//! Every function takes a borrowed file descriptor, so the descriptor is valid
//! for the whole call; each `unsafe` block says why the call is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Deallocates `[offset, offset + len)` of a regular file, keeping its size.
/// Reads of the range return zeros afterwards.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: fallocate only reads its integer arguments; fd is a live
        // descriptor borrowed for the duration of the call.
        let r = unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off(offset)?,
                off(len)?,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, offset, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Allocates host blocks for `[offset, offset + len)`, growing the file if the
/// range ends past its end.
pub fn fallocate(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as in punch_hole.
        let r = unsafe { libc::fallocate(fd.as_raw_fd(), 0, off(offset)?, off(len)?) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, offset, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Where data or a hole starts at or after `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whence {
    /// `SEEK_DATA`.
    Data,
    /// `SEEK_HOLE`.
    Hole,
}

/// `lseek(fd, offset, SEEK_DATA|SEEK_HOLE)`. `Ok(None)` when there is no data
/// at or after `offset` (ENXIO). The descriptor's file position moves, which
/// is harmless: all of vdisk's I/O is positional.
pub fn seek(fd: BorrowedFd<'_>, offset: u64, whence: Whence) -> io::Result<Option<u64>> {
    #[cfg(target_os = "linux")]
    {
        let w = match whence {
            Whence::Data => libc::SEEK_DATA,
            Whence::Hole => libc::SEEK_HOLE,
        };
        // SAFETY: lseek only reads its integer arguments.
        let r = unsafe { libc::lseek(fd.as_raw_fd(), off(offset)?, w) };
        if r >= 0 {
            Ok(Some(r as u64))
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, offset, whence);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// A byte-range lock request on an open file description (Linux OFD locks,
/// `F_OFD_SETLK`), the kind QEMU takes on image files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockType {
    /// A shared (read) lock.
    Shared,
    /// An exclusive (write) lock.
    Exclusive,
    /// Release the range.
    Unlock,
}

fn flock_struct(kind: LockType, start: u64, len: u64) -> io::Result<libc::flock> {
    // SAFETY: libc::flock is a plain C struct for which all-zero bytes are a
    // valid value (the OFD commands require l_pid == 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match kind {
        LockType::Shared => libc::F_RDLCK,
        LockType::Exclusive => libc::F_WRLCK,
        LockType::Unlock => libc::F_UNLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = off(start)?;
    fl.l_len = off(len)?;
    Ok(fl)
}

/// Sets (or releases) an OFD lock without waiting. Fails with
/// `WouldBlock`-like errors (EAGAIN/EACCES) when another description holds a
/// conflicting lock.
pub fn ofd_setlk(fd: BorrowedFd<'_>, kind: LockType, start: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let fl = flock_struct(kind, start, len)?;
        // SAFETY: fcntl(F_OFD_SETLK) reads the flock struct we pass by pointer,
        // which lives on this stack frame for the whole call.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl as *const libc::flock) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, kind, start, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Asks whether a lock of `kind` on the range would conflict with a lock held
/// through another open file description. `Ok(true)` when it would conflict.
pub fn ofd_conflicts(fd: BorrowedFd<'_>, kind: LockType, start: u64, len: u64) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        let mut fl = flock_struct(kind, start, len)?;
        // SAFETY: fcntl(F_OFD_GETLK) reads and writes the flock struct we pass
        // by pointer, which lives on this stack frame for the whole call.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl as *mut libc::flock) };
        if r == 0 {
            Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, kind, start, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Filesystem figures from `fstatvfs`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Total size (`f_blocks * f_frsize`).
    pub capacity: u64,
    /// Free for unprivileged users (`f_bavail * f_frsize`).
    pub available: u64,
    /// Free including root-reserved blocks (`f_bfree * f_frsize`).
    pub free: u64,
}

/// `fstatvfs` on an open file or directory.
pub fn fs_stats(fd: BorrowedFd<'_>) -> io::Result<FsStats> {
    // SAFETY: statvfs is a plain C struct; all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs writes into the struct we pass by pointer, which lives
    // on this stack frame for the whole call.
    let r = unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st as *mut libc::statvfs) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok(FsStats {
        capacity: (st.f_blocks as u64).saturating_mul(frsize),
        available: (st.f_bavail as u64).saturating_mul(frsize),
        free: (st.f_bfree as u64).saturating_mul(frsize),
    })
}

/// `openat(dirfd, name, flags, mode)` with `O_CLOEXEC` added. `name` is one
/// path component chosen by the caller; add `O_NOFOLLOW` to refuse a final
/// symlink.
pub fn openat(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: `name` is a NUL-terminated string that outlives the call, the
    // variadic mode argument is passed as the promoted unsigned int openat
    // reads when O_CREAT/O_TMPFILE is set, and dir is a live descriptor.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, libc::c_uint::from(mode)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `mkdirat(dirfd, name, mode)`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &std::ffi::CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: name is NUL-terminated and outlives the call; dir is live.
    let r = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `unlinkat(dirfd, name, 0)`, or with `dir = true` `AT_REMOVEDIR` (only
/// an empty directory is removed). A symlink is removed, never followed.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &std::ffi::CStr, remove_dir: bool) -> io::Result<()> {
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: name is NUL-terminated and outlives the call; dir is live.
    let r = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Renames `old` to `new`, both in the directory `dir`, **without replacing**
/// anything at `new` (`renameat2(RENAME_NOREPLACE)`; where the filesystem
/// cannot do that, `linkat` + `unlinkat`, which cannot replace either).
/// `AlreadyExists` when `new` exists, whatever it is (a dangling symlink too).
pub fn rename_noreplace(dir: BorrowedFd<'_>, old: &std::ffi::CStr, new: &std::ffi::CStr) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: both names are NUL-terminated and outlive the call; dir is live.
        let r = unsafe {
            libc::renameat2(dir.as_raw_fd(), old.as_ptr(), dir.as_raw_fd(), new.as_ptr(), libc::RENAME_NOREPLACE)
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    // SAFETY: as above; linkat with flags 0 does not follow `old` if it is
    // a symlink and fails with EEXIST when `new` exists.
    let r = unsafe { libc::linkat(dir.as_raw_fd(), old.as_ptr(), dir.as_raw_fd(), new.as_ptr(), 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    unlinkat(dir, old, false)
}

/// `flock(fd, LOCK_SH|LOCK_EX)`, waiting for it. Released when the
/// descriptor closes.
pub fn flock(fd: BorrowedFd<'_>, exclusive: bool) -> io::Result<()> {
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    loop {
        // SAFETY: flock only reads its integer arguments; fd is live.
        let r = unsafe { libc::flock(fd.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Broken-down local time: (year, month 1-12, day, hour, minute, second).
pub fn local_time(secs: i64) -> (i32, u32, u32, u32, u32, u32) {
    let t = secs as libc::time_t;
    // SAFETY: libc::tm is a plain C struct; all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and writes `tm`, both live on this stack
    // frame for the whole call; it is the thread-safe variant.
    let r = unsafe { libc::localtime_r(&t as *const libc::time_t, &mut tm as *mut libc::tm) };
    if r.is_null() {
        return (1970, 1, 1, 0, 0, 0);
    }
    (
        tm.tm_year + 1900,
        (tm.tm_mon + 1) as u32,
        tm.tm_mday as u32,
        tm.tm_hour as u32,
        tm.tm_min as u32,
        tm.tm_sec as u32,
    )
}

/// Set by the handler [`catch_stop_signals`] installs.
static STOP_SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    // Storing to an atomic is async-signal-safe.
    STOP_SIGNALLED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Makes SIGTERM, SIGINT and SIGHUP set a flag ([`stop_signalled`]) instead
/// of killing the process, so a server can close its images cleanly.
pub fn catch_stop_signals() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: an all-zero `sigaction` is a valid value of this plain C
        // struct (empty mask, no flags); the fields that matter are set below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa` is initialised and outlives the call; the handler only
        // stores to an atomic, which is async-signal-safe; a null old-action
        // pointer is allowed.
        let r = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether a signal [`catch_stop_signals`] catches has arrived.
pub fn stop_signalled() -> bool {
    STOP_SIGNALLED.load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        punch_hole(f.as_fd(), 0, 512 << 10).unwrap();
        let d = seek(f.as_fd(), 0, Whence::Data).unwrap();
        // Filesystems may keep the hole at block granularity; data starts at or
        // before the end of the punched range.
        assert!(d.unwrap() <= 512 << 10);
        let st = fs_stats(f.as_fd()).unwrap();
        assert!(st.capacity >= st.free && st.free >= st.available);
    }
}
