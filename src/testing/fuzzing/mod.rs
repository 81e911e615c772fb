//! Bodies of the fuzz targets in `fuzz/`, kept in the library so that a
//! plain `cargo test` replays every corpus and regression file through the
//! same code (`tests/fuzz_replay.rs`), without cargo-fuzz or nightly.
//!
//! Each function takes the raw fuzzer input and panics only on a bug: a
//! broken invariant (an `Internal` error, a `map` extent of length 0 before
//! the end, a read that disagrees with `map`, a model mismatch on an image
//! vdisk created itself, a header or descriptor that does not survive
//! being written back). Errors on hostile input are the expected outcome.
//!
//! Every storage is in memory with a length limit, and every walk over a
//! device is bounded (a few hundred `map` calls, a few MiB of reads), so a
//! run takes milliseconds even when an image claims 2^60 bytes.
//!
//! Compiled only with the `test-utils` feature; not part of the stable API.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::device::{BlockDevice, ExtentKind, ZeroMode};
use crate::error::{ErrorKind, Result};
use crate::qcow2::check::Repair;
use crate::qcow2::create::{CreateOptions, Preallocation};
use crate::qcow2::header::{CompressionType, Header};
use crate::storage::{MemStorage, Storage};
use crate::vmdk::descriptor::{resolve_extent, Descriptor};
use crate::vmdk::header::SparseHeader;
use crate::{Qcow2, Qcow2Options, Raw, Secret, Vmdk, VmdkOptions};

mod images;
mod luks;
mod luks2;
mod nbd;
mod ops;
mod vhdx;
mod vpcvdi;

pub use images::{open_qcow2, open_vmdk, pool_xml, probe, split_files, vmdk_descriptor, FILE_MARKER};
pub use luks::luks_header;
pub use luks2::luks2_header;
pub use nbd::{nbd_client, nbd_client_reads, nbd_server, nbd_server_export};
pub use ops::qcow2_ops;
pub use vhdx::{open_vhdx, vhdx_image, vhdx_runs};
pub use vpcvdi::open_vpc_vdi;

/// The target names, as in `fuzz/fuzz_targets/` and `fuzz/corpus/`.
pub const TARGETS: &[&str] = &[
    "open_qcow2",
    "open_vmdk",
    "vmdk_descriptor",
    "probe",
    "qcow2_ops",
    "pool_xml",
    "open_vpc_vdi",
    "open_vhdx",
    "nbd_server",
    "nbd_client",
    "luks_header",
    "luks2_header",
];

/// Runs the target called `name` on `data`; `false` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "open_qcow2" => open_qcow2(data),
        "open_vmdk" => open_vmdk(data),
        "vmdk_descriptor" => vmdk_descriptor(data),
        "probe" => probe(data),
        "qcow2_ops" => qcow2_ops(data),
        "pool_xml" => pool_xml(data),
        "open_vpc_vdi" => open_vpc_vdi(data),
        "open_vhdx" => open_vhdx(data),
        "nbd_server" => nbd_server(data),
        "nbd_client" => nbd_client(data),
        "luks_header" => luks_header(data),
        "luks2_header" => luks2_header(data),
        _ => return false,
    }
    true
}

/// The passphrase of the AES images in the corpus.
pub const PASSPHRASE: &str = "vdisk-fuzz";

/// Most `map` calls one walk over a device makes.
pub(crate) const MAX_MAP_CALLS: usize = 256;
/// Most bytes one walk reads.
pub(crate) const READ_BUDGET: usize = 4 << 20;
/// Most bytes read at the start of one extent.
pub(crate) const READ_PER_EXTENT: u64 = 64 << 10;

/// Panics on an `Internal` error: vdisk documents those as bugs.
pub(crate) fn no_internal<T>(what: &str, r: Result<T>) -> Result<T> {
    if let Err(e) = &r {
        assert!(e.kind() != ErrorKind::Internal, "{what}: internal error (a bug): {e}");
    }
    r
}

/// A deterministic, cheap filler so scripts need not carry their data.
pub(crate) fn pattern(seed: u8, pos: u64, out: &mut [u8]) {
    let mut x = (u64::from(seed) << 56) ^ pos.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1;
    for (i, b) in out.iter_mut().enumerate() {
        if seed & 0x80 != 0 {
            // Compressible: runs of one byte.
            *b = seed ^ ((pos + i as u64) >> 9) as u8;
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
}

/// Walks `dev` with `map` from the start (bounded), checking that extents
/// tile the device and that ranges said to read as zeros do, and reads the
/// start of each extent and the last bytes of the device.
pub(crate) fn walk(dev: &dyn BlockDevice) {
    let size = dev.size();
    let mut off = 0u64;
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; READ_PER_EXTENT as usize];
    for _ in 0..MAX_MAP_CALLS {
        if off >= size {
            break;
        }
        let e = match no_internal("map", dev.map(off, size - off)) {
            Ok(e) => e,
            Err(_) => {
                // Skip ahead past the failing spot.
                off = off.saturating_add(64 << 10).min(size);
                continue;
            }
        };
        assert_eq!(e.offset, off, "map returned an extent at another offset");
        assert!(e.length > 0 && e.length <= size - off, "map({off:#x}) returned length {} (size {size})", e.length);
        let n = e.length.min(READ_PER_EXTENT).min(budget as u64) as usize;
        if n > 0 {
            budget -= n;
            let b = &mut buf[..n];
            if no_internal("read", dev.read_at(b, off)).is_ok() {
                // Depth 0: nothing below answered for the range.
                let zero = matches!(e.kind, ExtentKind::Zero { .. } | ExtentKind::Unallocated);
                if zero && e.depth == 0 {
                    assert!(b.iter().all(|&x| x == 0), "map says {:?} at {off:#x} but the data is not zero", e.kind);
                }
            }
        }
        off += e.length;
    }
    // Empty and end-of-device requests describe nothing.
    for (at, max) in [(0, 0), (size, 1 << 20)] {
        if let Ok(e) = no_internal("map", dev.map(at, max)) {
            assert_eq!(e.length, 0, "map({at:#x}, {max}) returned {e:?} (size {size})");
        }
    }
    // The last bytes, and a read across the end must fail cleanly.
    if size > 0 {
        let n = size.min(4096) as usize;
        let _ = no_internal("read tail", dev.read_at(&mut buf[..n], size - n as u64));
    }
    assert!(dev.read_at(&mut [0u8; 1], size).is_err(), "a read past the end succeeded");
}

/// Storage in memory whose writes may not grow it past a limit; records
/// when the limit was hit (the model is unknown after that).
#[derive(Debug)]
pub(crate) struct Capped {
    inner: MemStorage,
    hit: AtomicBool,
}

impl Capped {
    fn new(bytes: Vec<u8>, limit: u64) -> Arc<Capped> {
        Arc::new(Capped { inner: MemStorage::from_vec(bytes).limit(limit), hit: AtomicBool::new(false) })
    }

    fn note<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if e.kind() == ErrorKind::LimitExceeded {
                self.hit.store(true, Ordering::Relaxed);
            }
        }
        r
    }
}

impl Storage for Capped {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.note(self.inner.write_at(buf, offset))
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.note(self.inner.set_len(len))
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

/// A raw device filled with a pattern, standing in for backing files.
/// Read-only, so one per (size, seed) is made per process and shared.
pub(crate) fn pattern_device(size: u64, seed: u8) -> Arc<dyn BlockDevice> {
    type Devices = Vec<((u64, u8), Arc<dyn BlockDevice>)>;
    static MADE: std::sync::Mutex<Devices> = std::sync::Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = made.iter().find(|(k, _)| *k == (size, seed)) {
        return d.clone();
    }
    let mut v = vec![0u8; size as usize];
    pattern(seed, 0, &mut v);
    let raw = Raw::open(Arc::new(MemStorage::from_vec(v).read_only())).expect("raw over memory");
    let d: Arc<dyn BlockDevice> = Arc::new(raw);
    made.push(((size, seed), d.clone()));
    d
}
