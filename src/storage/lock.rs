//! Image locking that QEMU respects.
//!
//! QEMU's file driver (`block/file-posix.c`) announces what it does with an
//! image through byte-range **open-file-description locks** (`F_OFD_SETLK`),
//! all of them *shared* (read) locks of one byte:
//!
//! * byte `100 + p` held: "I use permission `p`";
//! * byte `200 + p` held: "I do not let anyone else use permission `p`"
//!   (QEMU calls these the "shared" bytes; they really mean *not* shared).
//!
//! The permissions are consistent-read (0), write (1), write-unchanged (2),
//! resize (3) and, in QEMU before 7.0, graph-mod (4). Before taking a set,
//! QEMU first locks its bytes and then tests, with `F_OFD_GETLK` for a
//! *write* lock, that nobody else holds `200 + p` for a permission it wants
//! ("Failed to get "write" lock") nor `100 + p` for a permission it refuses to
//! share ("Failed to get shared "write" lock"). `F_OFD_GETLK` ignores the
//! caller's own description, so only other opens count, including other
//! opens in the same process.
//!
//! What QEMU 10 holds, observed in `/proc/locks` while `qemu-io` held a
//! qcow2 image: read-write 100, 101, 103 + 201, 203; `-r` 100 + 201, 203;
//! `-r -U` 100 only. vdisk takes the same sets ([`LockPlan`]):
//!
//! | vdisk open | holds | refuses to share | like |
//! |---|---|---|---|
//! | read-write | read, write, resize (100, 101, 103) | write, resize (201, 203) | `qemu-io`, a running VM |
//! | read-only | read (100) | write, resize (201, 203) | `qemu-img info`, a backing file |
//! | [`LockMode::ForceShare`] | read (100) | nothing | `qemu-img -U` |
//! | [`LockMode::Off`] | nothing | nothing | `locking=off` |
//!
//! So while a VM writes an image, vdisk refuses to open it (read-write or
//! read-only) with [`ErrorKind::Busy`], and while vdisk writes it, QEMU
//! refuses with its usual "Failed to get shared "write" lock". Force-share
//! opens, like `qemu-img -U`, hold byte 100 and check only byte 200 (a
//! process that refuses to share consistent reads, which ordinary QEMU
//! users never do); they read whatever is on disk, possibly mid-update.
//!
//! Byte 0 is left alone: libvirt's virtlockd uses it.
//!
//! OFD locks belong to the open file description: they live exactly as long
//! as the [`FileStorage`](crate::FileStorage) (or `DirectFile`) that holds them, which releases
//! them explicitly when dropped (a child process forked by another thread
//! shares the description until it `exec`s, so closing alone could leave
//! them held for a moment). Filesystems (or kernels) without OFD locks answer
//! `EINVAL`/`EOPNOTSUPP`/`ENOLCK`; [`LockMode::Auto`] then goes on without
//! locks, [`LockMode::On`] fails.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::sys::{self, LockType};

/// Byte of the first "I use permission" lock.
pub const PERM_BASE: u64 = 100;
/// Byte of the first "I do not share permission" lock.
pub const SHARED_BASE: u64 = 200;
/// Permission bits QEMU has used (consistent-read .. graph-mod).
const PERM_COUNT: u32 = 5;

/// QEMU's permission: read with a consistent view of the image.
pub const PERM_CONSISTENT_READ: u8 = 1 << 0;
/// QEMU's permission: change guest-visible content.
pub const PERM_WRITE: u8 = 1 << 1;
/// QEMU's permission: write without changing content (block jobs).
pub const PERM_WRITE_UNCHANGED: u8 = 1 << 2;
/// QEMU's permission: change the image size.
pub const PERM_RESIZE: u8 = 1 << 3;
/// QEMU's permission before 7.0: change the block graph.
pub const PERM_GRAPH_MOD: u8 = 1 << 4;

/// QEMU's name of permission bit `i` (as in its error messages).
fn perm_name(i: u32) -> &'static str {
    match i {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        3 => "resize",
        _ => "change children",
    }
}

/// Whether and how an open takes QEMU-compatible image locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Take the locks for the access asked for; where the filesystem cannot
    /// lock, go on without (like QEMU's `locking=auto`). The default.
    #[default]
    Auto,
    /// Take the locks; fail where the filesystem cannot lock (`locking=on`).
    On,
    /// Read-only only: share everything and ignore others' locks, like
    /// `qemu-img -U` / `force-share=on`. For metadata reads that must never
    /// block on or disturb a running VM; the data may be mid-update.
    ForceShare,
    /// Take and check no locks at all (`locking=off`), for filesystems where
    /// locks misbehave.
    Off,
}

/// Read-only or read-write, for choosing which locks to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading only.
    ReadOnly,
    /// Reading and writing (including resizing).
    ReadWrite,
}

impl Access {
    /// `ReadOnly` when `read_only`, else `ReadWrite`.
    pub fn from_read_only(read_only: bool) -> Self {
        if read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        }
    }
}

/// The permission bytes an open holds and refuses to share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockPlan {
    /// Permissions used: bytes `100 + bit`.
    pub held: u8,
    /// Permissions not shared with others: bytes `200 + bit`.
    pub unshared: u8,
}

impl LockPlan {
    /// The set vdisk takes for `mode` and `access` (`None`: no locks).
    pub fn for_open(mode: LockMode, access: Access) -> Option<LockPlan> {
        match (mode, access) {
            (LockMode::Off, _) => None,
            (LockMode::ForceShare, _) => Some(LockPlan { held: PERM_CONSISTENT_READ, unshared: 0 }),
            (_, Access::ReadOnly) => Some(LockPlan { held: PERM_CONSISTENT_READ, unshared: PERM_WRITE | PERM_RESIZE }),
            (_, Access::ReadWrite) => Some(LockPlan {
                held: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                unshared: PERM_WRITE | PERM_RESIZE,
            }),
        }
    }

    fn bytes(self) -> impl Iterator<Item = u64> {
        (0..PERM_COUNT)
            .filter_map(move |i| {
                let bit = 1u8 << i;
                (self.held & bit != 0).then_some(PERM_BASE + u64::from(i))
            })
            .chain((0..PERM_COUNT).filter_map(move |i| {
                let bit = 1u8 << i;
                (self.unshared & bit != 0).then_some(SHARED_BASE + u64::from(i))
            }))
    }
}

/// What an open holds after [`lock_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Held {
    /// No locks: [`LockMode::Off`], or not attempted.
    #[default]
    None,
    /// The filesystem cannot lock; [`LockMode::Auto`] went on without.
    Unsupported,
    /// These bytes are locked on the file's description.
    Locked(LockPlan),
}

fn unsupported_errno(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOLCK))
        || e.kind() == io::ErrorKind::Unsupported
}

fn busy(path: &Path, what: String) -> Error {
    Error::new(
        ErrorKind::Busy,
        format!("the image is in use by another process: {what}; is another process (a running VM?) using it? force-share (-U) reads it anyway"),
    )
    .with_path(path)
}

/// Releases every QEMU lock byte this description holds.
pub fn release(file: &File) {
    let fd = file.as_fd();
    let _ = sys::ofd_setlk(fd, LockType::Unlock, PERM_BASE, u64::from(PERM_COUNT));
    let _ = sys::ofd_setlk(fd, LockType::Unlock, SHARED_BASE, u64::from(PERM_COUNT));
}

/// Takes the locks for `mode` and `access` on `file` (whose description must
/// not hold vdisk locks yet), the way QEMU does: lock the bytes, then test
/// for conflicts with every other open file description. On a conflict the
/// bytes are released again and the error is [`ErrorKind::Busy`], naming
/// `path` and the permission, in QEMU's words.
pub fn lock_file(file: &File, path: &Path, mode: LockMode, access: Access) -> Result<Held> {
    if mode == LockMode::ForceShare && access == Access::ReadWrite {
        return Err(Error::invalid_argument("force-share (-U) is only allowed for read-only opens").with_path(path));
    }
    let Some(plan) = LockPlan::for_open(mode, access) else {
        return Ok(Held::None);
    };
    take_plan(file, path, mode, plan)
}

/// The set an inactive read-write open holds: consistent read, sharing
/// everything (what QEMU's inactive block nodes hold).
const INACTIVE_PLAN: LockPlan = LockPlan { held: PERM_CONSISTENT_READ, unshared: 0 };

/// Takes the locks of a read-write open that starts *inactive* — the
/// destination of a migration, while the source still writes: only the
/// inactive set ([`downgrade_to_inactive`]) is taken, and the answer names
/// the full read-write plan, which [`reactivate`] takes on activation.
pub fn lock_inactive(file: &File, path: &Path, mode: LockMode) -> Result<Held> {
    if mode == LockMode::ForceShare {
        return Err(Error::invalid_argument("force-share (-U) is only allowed for read-only opens").with_path(path));
    }
    let Some(plan) = LockPlan::for_open(mode, Access::ReadWrite) else {
        return Ok(Held::None);
    };
    Ok(match take_plan(file, path, mode, INACTIVE_PLAN)? {
        Held::Locked(_) => Held::Locked(plan),
        other => other,
    })
}

fn take_plan(file: &File, path: &Path, mode: LockMode, plan: LockPlan) -> Result<Held> {
    let fd = file.as_fd();
    for byte in plan.bytes() {
        if let Err(e) = sys::ofd_setlk(fd, LockType::Shared, byte, 1) {
            release(file);
            if unsupported_errno(&e) {
                if mode == LockMode::Auto {
                    return Ok(Held::Unsupported);
                }
                return Err(Error::unsupported("the filesystem does not support OFD locks (open with locking off)")
                    .with_path(path)
                    .with_source(e));
            }
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                return Err(busy(path, format!("failed to lock byte {byte}")));
            }
            return Err(Error::io(format!("cannot lock byte {byte}"), e).with_path(path));
        }
    }
    if let Err(e) = check(file, path, plan) {
        release(file);
        return Err(e);
    }
    Ok(Held::Locked(plan))
}

fn check(file: &File, path: &Path, plan: LockPlan) -> Result<()> {
    let fd = file.as_fd();
    let test = |byte: u64| -> Result<bool> {
        sys::ofd_conflicts(fd, LockType::Exclusive, byte, 1)
            .map_err(|e| Error::io(format!("cannot test the lock on byte {byte}"), e).with_path(path))
    };
    for i in 0..PERM_COUNT {
        if plan.held & (1 << i) != 0 && test(SHARED_BASE + u64::from(i))? {
            return Err(busy(path, format!("failed to get \"{}\" lock", perm_name(i))));
        }
    }
    for i in 0..PERM_COUNT {
        if plan.unshared & (1 << i) != 0 && test(PERM_BASE + u64::from(i))? {
            return Err(busy(path, format!("failed to get shared \"{}\" lock", perm_name(i))));
        }
    }
    Ok(())
}

/// The locks an *inactive* image keeps while another host (or process)
/// owns it during a migration handoff: consistent read (byte 100) only,
/// sharing everything, like QEMU's inactive block nodes. Bytes of
/// `plan` beyond that are released. Never conflicts.
pub fn downgrade_to_inactive(file: &File, plan: LockPlan) {
    let fd = file.as_fd();
    for byte in plan.bytes() {
        if byte != PERM_BASE {
            let _ = sys::ofd_setlk(fd, LockType::Unlock, byte, 1);
        }
    }
}

/// Takes `plan`'s bytes again on a description that holds the inactive
/// set ([`downgrade_to_inactive`]) and checks for conflicts the way
/// [`lock_file`] does. On a conflict the description is left holding the
/// inactive set and the error is [`ErrorKind::Busy`], naming `path`.
pub fn reactivate(file: &File, path: &Path, plan: LockPlan) -> Result<()> {
    let fd = file.as_fd();
    let back = |file: &File| downgrade_to_inactive(file, plan);
    for byte in plan.bytes() {
        if let Err(e) = sys::ofd_setlk(fd, LockType::Shared, byte, 1) {
            back(file);
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                return Err(busy(path, format!("failed to lock byte {byte}")));
            }
            return Err(Error::io(format!("cannot lock byte {byte}"), e).with_path(path));
        }
    }
    if let Err(e) = check(file, path, plan) {
        back(file);
        return Err(e);
    }
    Ok(())
}

/// What other opens of a file announce through QEMU's lock bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Users {
    /// Permissions someone else holds (bytes 100..=104).
    pub held: u8,
    /// Permissions someone else refuses to share (bytes 200..=204).
    pub unshared: u8,
}

impl Users {
    /// Whether anyone else has the file open with QEMU-style locks.
    pub fn in_use(self) -> bool {
        self.held != 0 || self.unshared != 0
    }

    /// Whether someone else holds the write permission (a running VM, a
    /// `qemu-img` or `vdisk` writing).
    pub fn writer(self) -> bool {
        self.held & PERM_WRITE != 0
    }

    /// Whether a read-write open would be refused.
    pub fn blocks_write(self) -> bool {
        self.held & (PERM_WRITE | PERM_RESIZE) != 0
            || self.unshared & (PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE) != 0
    }
}

/// Which QEMU lock bytes other open file descriptions of `file` hold (this
/// description's own locks are not counted). Takes no lock.
pub fn users_of(file: &File) -> io::Result<Users> {
    let fd = file.as_fd();
    let mut u = Users::default();
    for i in 0..PERM_COUNT {
        if sys::ofd_conflicts(fd, LockType::Exclusive, PERM_BASE + u64::from(i), 1)? {
            u.held |= 1 << i;
        }
        if sys::ofd_conflicts(fd, LockType::Exclusive, SHARED_BASE + u64::from(i), 1)? {
            u.unshared |= 1 << i;
        }
    }
    Ok(u)
}

/// Opens `path` read-only without following a final symlink, refuses
/// anything but a regular file (checked on the opened descriptor), and
/// reports who holds QEMU lock bytes on it: "is this image in use by another
/// process?" without opening it as an image. Opens in this process through
/// other descriptors count as other users.
pub fn users(path: &Path) -> Result<Users> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io("cannot open file", e).with_path(path))?;
    let md = file.metadata().map_err(|e| Error::io("cannot stat file", e).with_path(path))?;
    if !md.file_type().is_file() {
        return Err(Error::invalid_argument("not a regular file").with_path(path));
    }
    users_of(&file).map_err(|e| Error::io("cannot test locks", e).with_path(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(p: &Path, rw: bool) -> File {
        std::fs::OpenOptions::new().read(true).write(rw).open(p).unwrap()
    }

    #[test]
    fn plans_match_qemu() {
        let rw = LockPlan::for_open(LockMode::Auto, Access::ReadWrite).unwrap();
        assert_eq!(rw.bytes().collect::<Vec<_>>(), [100, 101, 103, 201, 203]);
        let ro = LockPlan::for_open(LockMode::On, Access::ReadOnly).unwrap();
        assert_eq!(ro.bytes().collect::<Vec<_>>(), [100, 201, 203]);
        let fs = LockPlan::for_open(LockMode::ForceShare, Access::ReadOnly).unwrap();
        assert_eq!(fs.bytes().collect::<Vec<_>>(), [100]);
        assert!(LockPlan::for_open(LockMode::Off, Access::ReadWrite).is_none());
    }

    #[test]
    fn writers_exclude_each_other_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let w = open(&p, true);
        assert!(matches!(lock_file(&w, &p, LockMode::Auto, Access::ReadWrite).unwrap(), Held::Locked(_)));
        let w2 = open(&p, true);
        let e = lock_file(&w2, &p, LockMode::Auto, Access::ReadWrite).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        // A reader does not share write either: refused while a writer is in.
        let r = open(&p, false);
        let e = lock_file(&r, &p, LockMode::Auto, Access::ReadOnly).unwrap_err();
        assert!(e.to_string().contains("shared \"write\""), "{e}");
        // Force-share reads anyway; Off takes nothing.
        assert!(lock_file(&r, &p, LockMode::ForceShare, Access::ReadOnly).is_ok());
        let r2 = open(&p, false);
        assert_eq!(lock_file(&r2, &p, LockMode::Off, Access::ReadOnly).unwrap(), Held::None);
        let u = users(&p).unwrap();
        assert!(u.writer() && u.in_use() && u.blocks_write());
        release(&w);
        release(&r);
        drop(w);
        drop(r);
        assert!(!users(&p).unwrap().in_use());
        // Two readers coexist; they keep writers out.
        let r1 = open(&p, false);
        let r2 = open(&p, false);
        lock_file(&r1, &p, LockMode::Auto, Access::ReadOnly).unwrap();
        lock_file(&r2, &p, LockMode::Auto, Access::ReadOnly).unwrap();
        let w3 = open(&p, true);
        let e = lock_file(&w3, &p, LockMode::Auto, Access::ReadWrite).unwrap_err();
        assert!(e.to_string().contains("failed to get \"write\" lock"), "{e}");
        // The failed attempt left nothing behind.
        release(&r1);
        release(&r2);
        drop(r1);
        drop(r2);
        assert!(!users(&p).unwrap().in_use());
        assert_eq!(
            lock_file(&w3, &p, LockMode::ForceShare, Access::ReadWrite).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn handoff_downgrades_and_reactivates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let a = open(&p, true);
        let Held::Locked(plan) = lock_file(&a, &p, LockMode::Auto, Access::ReadWrite).unwrap() else {
            panic!("no locks on a local file");
        };
        let b = open(&p, true);
        assert_eq!(lock_file(&b, &p, LockMode::Auto, Access::ReadWrite).unwrap_err().kind(), ErrorKind::Busy);
        downgrade_to_inactive(&a, plan);
        let u = users(&p).unwrap();
        assert_eq!((u.held, u.unshared), (PERM_CONSISTENT_READ, 0));
        // The other side takes the image; A cannot take it back meanwhile.
        lock_file(&b, &p, LockMode::Auto, Access::ReadWrite).unwrap();
        let e = reactivate(&a, &p, plan).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        // The failed attempt left A inactive, not half-locked.
        downgrade_to_inactive(&b, plan);
        let u = users(&p).unwrap();
        assert_eq!((u.held, u.unshared), (PERM_CONSISTENT_READ, 0));
        reactivate(&a, &p, plan).unwrap();
        assert_eq!(reactivate(&b, &p, plan).unwrap_err().kind(), ErrorKind::Busy);
    }
}
