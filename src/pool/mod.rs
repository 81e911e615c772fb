//! Storage pools and volumes over directories, the way libvirt's `dir`,
//! `fs` and `netfs` pools work, without a daemon.
//!
//! A libvirt user recognises every noun and verb: a [`Registry`] holds pool
//! definitions ([`PoolDef`], libvirt's `<pool>` XML, stored as libvirt
//! stores them); a [`Pool`] is built, started, refreshed, destroyed,
//! deleted and undefined; its files are [`Volume`]s that are created (raw,
//! qcow2, vmdk, linked clones), cloned, wiped, resized, uploaded,
//! downloaded, described as `<volume>` XML and opened as a
//! [`BlockDevice`](crate::BlockDevice). The `vdisk` CLI exposes them with
//! virsh's verbs (`pool-define-as`, `vol-create-as`, ...).
//!
//! ```no_run
//! use vdisk::pool::{PoolDef, Registry, RegistryPaths, VolumeSpec};
//! use vdisk::Format;
//!
//! let reg = Registry::open(RegistryPaths::new("/tmp/vdisk-config"))?;
//! let pool = reg.define(PoolDef::dir("images", "/tmp/images")?)?;
//! pool.build()?;
//! pool.start()?;
//! let vol = pool.create_volume(&VolumeSpec::new("vm1.qcow2", 8 << 30, Format::Qcow2)?, None)?;
//! println!("{}", vol.describe()?);
//! # Ok::<(), vdisk::Error>(())
//! ```
//!
//! # Safety rules
//!
//! * **Names** of new pools and volumes are checked ([`name`]): no `/`,
//!   NUL, control characters, `.`/`..`, leading `-`, more than 255 bytes,
//!   invalid UTF-8 or vdisk's temporary prefix.
//! * **Nothing reaches outside the pool directory**: volume operations use
//!   one directory descriptor and single-component names; files are opened
//!   with `O_NOFOLLOW` and their type is checked on the opened descriptor,
//!   so symlinks are never written through and FIFOs, sockets and devices
//!   are refused.
//! * **Create never overwrites**: a volume is built in a temporary
//!   directory `.vdisk-tmp-<random>/` inside the pool, then renamed into
//!   place with `renameat2(RENAME_NOREPLACE)` and the directory synced. A
//!   crash leaves only the temporary directory, which listings ignore and
//!   [`Pool::cleanup`] (run by start) removes once it is stale
//!   and unlocked. Of two creators of one name, exactly one wins.
//! * **In use means in use**: delete, wipe, resize and upload take the
//!   volume's write lock ([`crate::storage::lock`]), so a running VM's disk (or one a
//!   vdisk operation in this process uses) is refused with
//!   [`ErrorKind::Busy`](crate::ErrorKind::Busy).
//! * **Formats are recorded, not sniffed**: [`Volume::open`] uses the format
//!   the volume was created with ([`scan`]), never a probe that would turn
//!   a raw disk a guest wrote a qcow2 header into into a qcow2 image.
//!
//! # Where vdisk differs from libvirt, and why
//!
//! * **Symlinks** in a pool are listed but never written through (libvirt
//!   follows them for wipe, upload and resize); one pointing outside the
//!   pool is listed with an error and not probed. Delete removes the link.
//! * **Duplicate targets** are compared after resolving symlinks (libvirt
//!   compares strings, so `/a` and a link to `/a` could be two pools).
//! * **Listing is incremental**: every listing rescans the directory
//!   (libvirt shows a cached list until `pool-refresh`), re-probing only
//!   files whose (device, inode, size, mtime, ctime) changed.
//! * **vol-delete of a volume a VM uses is refused** (libvirt deletes it).
//! * **qcow2 defaults to compat 1.1** (libvirt: 0.10), as qemu-img does.
//! * **A backing volume needs its format** (`--backing-vol-format`); libvirt
//!   probes it. A new volume with a backing store defaults to qcow2.
//! * **Pool `available`** is `f_bavail` (what unprivileged users can still
//!   allocate; libvirt uses `f_bfree`), allocation is `capacity - f_bfree`.
//! * **fs and netfs pools** mount their source on start and unmount it on
//!   destroy, as libvirt does (`mount.rs`); vdisk does not mkfs.
//! * **Wipe** zeroes (or randomises) the whole file like libvirt, and the
//!   volume is raw afterwards (its header is gone); the record follows.
//! * **vmdk volumes** are created monolithicSparse (one file), so a volume
//!   is one directory entry.

mod busy;
mod config;
mod create;
pub mod def;
mod dir;
mod headers;
mod lifecycle;
mod mount;
pub mod name;
mod probe_cache;
mod records;
pub mod registry;
pub mod scan;
mod spec;
mod statefile;
mod temp;
mod transfer;
pub mod units;
pub mod uuid;
mod volinfo;
mod volume;
pub mod volxml;
pub mod xml;

pub use config::Origin;
pub use create::CloneOptions;
pub use def::{Permissions, PoolDef, PoolSource, PoolType};
pub use lifecycle::{Pool, PoolInfo, PoolState, STALE_TEMP_AGE};
pub use registry::{PoolList, Registry, RegistryPaths};
pub use scan::ScanReport;
pub use spec::{BackingSpec, VolumeEncryption, VolumeSpec};
pub use transfer::{DownloadOptions, UploadOptions};
pub use uuid::Uuid;
pub use volinfo::{Backing, FileStat, VolType, VolumeInfo};
pub use volume::{Progress, Volume, VolumeDevice, WipeAlgorithm};
