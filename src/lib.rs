//! # vdisk — virtual-machine disk images
//!
//! One format-agnostic [`BlockDevice`] trait (positional I/O on `&self`,
//! `Send + Sync`), with backends for raw, qcow2, vmdk, VHD ([`Vpc`]), VDI
//! ([`Vdi`]), VHDX ([`Vhdx`]) and LUKS1/LUKS2 ([`luks::Luks`]), an NBD server and
//! client ([`nbd`]), an opener with an
//! explicit backing-file policy, and a `vdisk` command-line tool in the
//! spirit of `qemu-img` (feature `cli`, on by default).
//!
//! ```
//! use std::sync::Arc;
//! use vdisk::{BlockDevice, MemStorage, Raw};
//!
//! let disk = Raw::create(Arc::new(MemStorage::new()), 1 << 20)?;
//! disk.write_at(b"hello", 4096)?;
//! let mut buf = [0u8; 5];
//! disk.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), vdisk::Error>(())
//! ```
//!
//! # Opening untrusted images
//!
//! Every byte of an image may be hostile. vdisk validates every header field
//! and table position before use, bounds every allocation by a documented
//! limit ([`limits`]), and never panics on bad input. These choices stay with
//! the caller:
//!
//! * **Name the format.** Probing ([`OpenOptions::probe`]) is opt-in: a
//!   guest can write a qcow2 header into its raw disk, and a host that probes
//!   the disk would then follow whatever backing file the guest named.
//! * **Choose a backing policy.** [`BackingPolicy::Never`] opens no other
//!   file; the default [`BackingPolicy::RecordedFormat`] follows backing files
//!   only with a format recorded in the image; [`OpenOptions::confine_to`]
//!   keeps them inside one directory.
//! * **vmdk extent files** named by a descriptor must lie inside the
//!   descriptor's directory (no absolute names, no `..` escapes) unless
//!   [`OpenOptions::allow_vmdk_external_extents`] says otherwise; a vmdk
//!   delta link's parent follows the backing policy.
//!
//! # Closing
//!
//! `close(self)` on [`Raw`], [`Qcow2`], [`Vmdk`] and [`Image`] flushes and
//! leaves the image clean (qcow2: lazy refcounts written, dirty bit
//! cleared) and reports a failure; dropping a device opened read-write does
//! the same, best effort. [`BlockDevice::make_clean`] does it without
//! closing.
//!
//! # Features
//!
//! * `cli` (default): the `vdisk` command-line tool (clap, serde_json).
//!   Library users take `default-features = false`.
//! * `test-utils`: `vdisk::testing` — `FaultyStorage` for crash tests and the
//!   fuzz target bodies; the integration tests and the fuzz crate turn it on.
//!
//! # Layers
//!
//! Data flows down; nothing points up.
//!
//! ```text
//!  vdisk CLI (src/bin/vdisk)      user code / hypervisor / backup tool
//!        |                                 |
//!  pool/      Pool, Volume: directories of images, libvirt XML
//!  nbd/       Server (exports any BlockDevice), Client (an export as one)
//!        |
//!  open.rs + probe.rs — the one place that opens by path: picks a format,
//!        |              opens backing / data / extent files under the
//!        |              caller's policy, and is the Resolver formats use
//!        |              when they create an image with a backing file
//!  raw | qcow2/ | vmdk/ | vpc/ | vdi/  — each a BlockDevice (convert.rs
//!        |                                 copies between them)
//!        |
//!  device.rs  — BlockDevice, Extent, DeviceInfo, Resolver
//!        |
//!  storage/   — Storage: FileStorage, MemStorage, DirectFile, image locks
//!        |
//!  sys.rs     — the one module allowed unsafe (crate-private)
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod codec;
pub mod convert;
mod crypto;
pub mod device;
pub mod error;
mod handoff;
pub mod limits;
pub mod luks;
pub mod nbd;
pub mod open;
mod overlap;
pub mod pool;
pub mod probe;
pub mod qcow2;
mod quiesce;
pub mod raw;
pub mod reader;
pub mod size;
pub mod storage;
pub(crate) mod sys;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

pub use crypto::Secret;
pub use device::{BlockDevice, DeviceCursor, DeviceInfo, Extent, ExtentKind, Format, ZeroMode};
pub use error::{Error, ErrorKind, Result};
pub use open::{open, BackingPolicy, CacheMode, Image, OpenOptions};
pub use qcow2::{Qcow2, Qcow2Options};
pub use raw::Raw;
pub use storage::lock::LockMode;
pub use storage::{FileStorage, MemStorage, Storage};
#[cfg(feature = "test-utils")]
pub use testing::{FaultMode, FaultyStorage, Survivors};
pub use vdi::{Vdi, VdiCreateOptions, VdiOptions};
pub use vhdx::{Vhdx, VhdxCreateOptions, VhdxOptions};
pub use vmdk::{Vmdk, VmdkCreateOptions, VmdkOptions};
pub use vpc::{Vpc, VpcCreateOptions, VpcOptions};
