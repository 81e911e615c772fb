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
//! Not part of the public API: the module is hidden from the docs and may
//! change at any time.

use std::collections::HashMap;
use std::path::Path;
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

/// The target names, as in `fuzz/fuzz_targets/` and `fuzz/corpus/`.
pub const TARGETS: &[&str] = &["open_qcow2", "open_vmdk", "vmdk_descriptor", "probe", "qcow2_ops", "pool_xml"];

/// Runs the target called `name` on `data`; `false` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "open_qcow2" => open_qcow2(data),
        "open_vmdk" => open_vmdk(data),
        "vmdk_descriptor" => vmdk_descriptor(data),
        "probe" => probe(data),
        "qcow2_ops" => qcow2_ops(data),
        "pool_xml" => pool_xml(data),
        _ => return false,
    }
    true
}

/// The passphrase of the AES images in the corpus.
pub const PASSPHRASE: &str = "vdisk-fuzz";

/// Most `map` calls one walk over a device makes.
const MAX_MAP_CALLS: usize = 256;
/// Most bytes one walk reads.
const READ_BUDGET: usize = 4 << 20;
/// Most bytes read at the start of one extent.
const READ_PER_EXTENT: u64 = 64 << 10;

/// Panics on an `Internal` error: vdisk documents those as bugs.
fn no_internal<T>(what: &str, r: Result<T>) -> Result<T> {
    if let Err(e) = &r {
        assert!(e.kind() != ErrorKind::Internal, "{what}: internal error (a bug): {e}");
    }
    r
}

/// A deterministic, cheap filler so scripts need not carry their data.
fn pattern(seed: u8, pos: u64, out: &mut [u8]) {
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
fn walk(dev: &dyn BlockDevice) {
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
struct Capped {
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
fn pattern_device(size: u64, seed: u8) -> Arc<dyn BlockDevice> {
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

// ---------------------------------------------------------------------------
// open_qcow2

/// `open_qcow2`: opens hostile bytes as qcow2 (read-only, with a backing
/// device and data file standing in for the named ones), walks the device,
/// lists and views snapshots, runs `check`, and checks that the header and
/// snapshot table survive being encoded again.
pub fn open_qcow2(data: &[u8]) {
    header_roundtrip(data);
    let file: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(data.to_vec()).limit(data.len() as u64).read_only());
    let Ok(h) = no_internal("read_header", Qcow2::read_header(&*file)) else {
        return;
    };
    let opts = Qcow2Options {
        read_only: true,
        l2_cache_bytes: Some(1 << 20),
        backing: h.backing_file.as_ref().map(|_| pattern_device(1 << 20, 0x11)),
        data_file: h.data_file.as_ref().map(|_| {
            let mut v = vec![0u8; 1 << 20];
            pattern(0x22, 0, &mut v);
            Arc::new(MemStorage::from_vec(v).read_only()) as Arc<dyn Storage>
        }),
        key: Some(Secret::new(PASSPHRASE)),
        inspect_only: false,
    };
    let Ok(q) = no_internal("open", Qcow2::open(file.clone(), opts)) else {
        return;
    };
    let _ = q.info();
    walk(&q);
    snapshot_table_roundtrip(&q, &h);
    for s in q.snapshots().iter().take(4) {
        if let Ok(v) = no_internal("snapshot_view", q.snapshot_view(&s.id)) {
            let _ = v.info();
            walk(&v);
        }
    }
    let _ = no_internal("check", q.check(Repair::None));
}

/// A header that parses must encode into one that parses to the same
/// values (vdisk rewrites the header on every metadata change).
fn header_roundtrip(data: &[u8]) {
    let Ok(cb) = crate::qcow2::header::peek_cluster_bits(data) else {
        return;
    };
    let mut c0 = vec![0u8; 1 << cb];
    let n = data.len().min(c0.len());
    c0[..n].copy_from_slice(&data[..n]);
    let Ok(h) = no_internal("header parse", Header::parse(&c0)) else {
        return;
    };
    let mut h2 = h.clone();
    let Ok(bytes) = no_internal("header encode", h2.encode()) else {
        return;
    };
    assert!(bytes.len() <= c0.len(), "encoded header exceeds a cluster");
    let mut c1 = vec![0u8; c0.len()];
    c1[..bytes.len()].copy_from_slice(&bytes);
    let back = Header::parse(&c1).unwrap_or_else(|e| panic!("an encoded header does not parse again: {e}\n{h:?}"));
    assert_eq!(back, h2, "header changed across encode/parse");
    let norm = |mut x: Header| {
        x.header_length = 0;
        x.backing_file_offset = 0;
        x.backing_file_size = 0;
        x.feature_names.clear();
        x
    };
    assert_eq!(norm(back), norm(h), "header values changed when encoded");
}

/// The snapshot table read at open must encode into a table that reads
/// back the same (vdisk rewrites it on every snapshot operation).
fn snapshot_table_roundtrip(q: &Qcow2, h: &Header) {
    let snaps = q.snapshots();
    if snaps.is_empty() {
        return;
    }
    let bytes = crate::qcow2::snapshot::encode_table(&snaps);
    let m = MemStorage::new();
    let off = h.cluster_size();
    m.write_at(&bytes, off).expect("memory write");
    let (back, len) = crate::qcow2::snapshot::read_table(&m, off, snaps.len() as u32, h.cluster_size())
        .unwrap_or_else(|e| panic!("an encoded snapshot table does not read again: {e}"));
    assert_eq!(len as usize, bytes.len());
    let size = q.size();
    for (a, b) in snaps.iter().zip(&back) {
        assert_eq!(a.info(size), b.info(size), "snapshot changed across encode/read");
    }
}

// ---------------------------------------------------------------------------
// open_vmdk

/// Separator that starts another named file in an `open_vmdk` input:
/// `\n--vdisk-fuzz-file NAME\n`.
pub const FILE_MARKER: &[u8] = b"\n--vdisk-fuzz-file ";

/// Splits an `open_vmdk` input into the main file and named extra files.
pub fn split_files(data: &[u8]) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let mut parts = Vec::new();
    let mut rest = data;
    let mut name: Option<String> = None;
    loop {
        match find(rest, FILE_MARKER) {
            Some(i) => {
                parts.push((name.take(), &rest[..i]));
                let after = &rest[i + FILE_MARKER.len()..];
                let nl = after.iter().position(|&b| b == b'\n').unwrap_or(after.len());
                name = Some(String::from_utf8_lossy(&after[..nl]).into_owned());
                rest = after.get(nl + 1..).unwrap_or_default();
            }
            None => {
                parts.push((name.take(), rest));
                break;
            }
        }
    }
    let mut files = HashMap::new();
    let mut main = Vec::new();
    for (n, bytes) in parts {
        match n {
            None => main = bytes.to_vec(),
            Some(n) => {
                files.insert(n, bytes.to_vec());
            }
        }
    }
    (main, files)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `open_vmdk`: opens hostile bytes as vmdk (a sparse or stream extent, or
/// a descriptor whose extents are the other named files of the input),
/// walks the device, runs `check`, then writes a little into a writable
/// copy, flushes and reopens it.
pub fn open_vmdk(data: &[u8]) {
    let (main, files) = split_files(data);
    if main.len() >= 512 {
        if let Ok(h) = SparseHeader::decode(&main[..512]) {
            let back = SparseHeader::decode(&h.encode()).expect("encoded header decodes");
            assert_eq!(back, h, "sparse header changed across encode/decode");
        }
    }
    let files: HashMap<String, Arc<MemStorage>> = files
        .into_iter()
        .map(|(n, b)| {
            let len = b.len() as u64;
            (n, Arc::new(MemStorage::from_vec(b).limit(len + (1 << 20))))
        })
        .collect();
    let main_len = main.len() as u64;
    let main = Arc::new(MemStorage::from_vec(main).limit(main_len + (8 << 20)));
    // Read-only pass.
    let ro_files: HashMap<String, Arc<dyn Storage>> = files
        .iter()
        .map(|(n, m)| (n.clone(), Arc::new(MemStorage::from_vec(m.to_vec()).read_only()) as Arc<dyn Storage>))
        .collect();
    let opener = |p: &Path, _ro: bool| -> Result<Arc<dyn Storage>> {
        let name = p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        ro_files
            .get(&name)
            .cloned()
            .ok_or_else(|| crate::Error::new(ErrorKind::NotFound, format!("no file '{name}' in the input")))
    };
    let parent =
        Vmdk::read_descriptor(&*main).ok().and_then(|d| d.parent_hint().map(|_| pattern_device(1 << 20, 0x33)));
    let ro_main: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(main.to_vec()).read_only());
    let opts = VmdkOptions {
        read_only: true,
        parent: parent.clone(),
        allow_external_extents: false,
        gt_cache_tables: Some(16),
    };
    let Ok(v) = no_internal("vmdk open", Vmdk::open_with(ro_main, opts, &opener)) else {
        return;
    };
    let _ = v.info();
    walk(&v);
    let _ = no_internal("vmdk check", v.check());
    drop(v);

    // Write pass on a copy.
    let rw_opener = |p: &Path, _ro: bool| -> Result<Arc<dyn Storage>> {
        let name = p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        files
            .get(&name)
            .map(|m| m.clone() as Arc<dyn Storage>)
            .ok_or_else(|| crate::Error::new(ErrorKind::NotFound, format!("no file '{name}' in the input")))
    };
    let opts = VmdkOptions {
        read_only: false,
        parent: parent.clone(),
        allow_external_extents: false,
        gt_cache_tables: Some(16),
    };
    let Ok(v) = no_internal("vmdk open rw", Vmdk::open_with(main.clone(), opts.clone(), &rw_opener)) else {
        return;
    };
    let size = v.size();
    let seed = data.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    let mut buf = vec![0u8; 3000];
    for (i, at) in [0, size / 2, size.saturating_sub(1500)].iter().enumerate() {
        let at = (*at).min(size);
        let n = (size - at).min(buf.len() as u64) as usize;
        pattern(seed.wrapping_add(i as u8), at, &mut buf[..n]);
        let _ = no_internal("vmdk write", v.write_at(&buf[..n], at));
    }
    if size > 0 {
        let _ = no_internal("vmdk write_zeroes", v.write_zeroes(0, size.min(1 << 20), ZeroMode::MayUnmap));
    }
    let _ = no_internal("vmdk flush", v.flush());
    drop(v);
    if let Ok(v) = no_internal("vmdk reopen", Vmdk::open_with(main, opts, &rw_opener)) {
        walk(&v);
    }
}

// ---------------------------------------------------------------------------
// vmdk_descriptor

/// `vmdk_descriptor`: parses hostile bytes as a descriptor; what parses
/// must encode into text that parses to the same descriptor, and extent
/// names must never resolve outside the descriptor's directory.
pub fn vmdk_descriptor(data: &[u8]) {
    let Ok(d) = no_internal("descriptor parse", Descriptor::parse(data)) else {
        return;
    };
    let text = d.encode();
    let back = Descriptor::parse(text.as_bytes())
        .unwrap_or_else(|e| panic!("an encoded descriptor does not parse again: {e}\n--- text ---\n{text}"));
    assert_eq!(back, d, "descriptor changed across encode/parse");
    assert_eq!(back.encode(), text, "encoding is not stable");
    let _ = (d.cid(), d.parent_cid(), d.create_type(), d.total_sectors());
    let dir = Path::new("/vdisk-fuzz/dir");
    for e in &d.extents {
        if let Some(name) = &e.file {
            if let Ok(p) = no_internal("resolve", resolve_extent(dir, name, false)) {
                let mut depth = 0i64;
                for c in p.strip_prefix(dir).expect("inside dir").components() {
                    match c {
                        std::path::Component::ParentDir => depth -= 1,
                        std::path::Component::Normal(_) => depth += 1,
                        std::path::Component::CurDir => {}
                        other => panic!("resolved extent name has component {other:?}"),
                    }
                    assert!(depth >= 0, "extent name '{name}' escapes the directory");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// pool_xml

/// `pool_xml`: libvirt pool and volume XML from hostile bytes. Whatever
/// parses as a pool definition must write back to XML that parses to the
/// same definition; the generic XML tree must round-trip too; a volume
/// document either gives a spec or an error.
pub fn pool_xml(data: &[u8]) {
    use crate::pool::def::PoolDef;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(tree) = no_internal("xml parse", crate::pool::xml::parse(text, "fuzz input")) {
        let again = tree.to_xml();
        let back = crate::pool::xml::parse(&again, "re-encoded")
            .unwrap_or_else(|e| panic!("re-encoded XML does not parse: {e}\n{again}"));
        assert_eq!(back.to_xml(), again, "XML encoding is not stable");
    }
    if let Ok(def) = no_internal("pool parse", PoolDef::from_xml(text, "fuzz")) {
        let xml = def.to_xml();
        let back = PoolDef::from_xml(&xml, "fuzz")
            .unwrap_or_else(|e| panic!("a written pool definition does not parse: {e}\n{xml}"));
        assert_eq!(back.to_xml(), xml, "pool XML changed across write/parse");
    }
    let _ = no_internal("volume parse", crate::pool::volxml::spec_from_xml(text, None));
}

// ---------------------------------------------------------------------------
// probe

/// `probe`: format probing on any bytes; the storage-level probe agrees
/// with the byte-level one, and only a qcow2 magic makes qcow2.
pub fn probe(data: &[u8]) {
    use crate::device::Format;
    let f = crate::probe::probe_bytes(data);
    let head = &data[..data.len().min(crate::probe::PROBE_LEN)];
    let g = crate::probe::probe(&MemStorage::from_vec(data.to_vec())).expect("memory probe");
    assert_eq!(g, crate::probe::probe_bytes(head));
    if f == Format::Qcow2 {
        assert!(data.starts_with(b"QFI\xfb"), "qcow2 without its magic");
    }
}

// ---------------------------------------------------------------------------
// qcow2_ops

/// A cursor that yields zeros once the input runs out.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let s = self.pos.min(self.data.len());
        let e = self.pos.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[s..e]
    }
}

/// `VDISK_FUZZ_TRACE=1` prints each `qcow2_ops` operation (debugging).
fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("VDISK_FUZZ_TRACE").is_some())
}

/// Most operations one script runs.
const MAX_OPS: usize = 48;
/// Storage limit for `qcow2_ops` images.
const OPS_STORAGE_LIMIT: u64 = 96 << 20;
/// Largest virtual size a script can reach.
const OPS_MAX_SIZE: u64 = 4 << 20;

/// What a fresh image is created with, decoded from four bytes.
fn fresh_options(inp: &mut Input<'_>) -> (CreateOptions, bool) {
    let a = inp.u8();
    let b = inp.u8();
    let size = (u64::from(inp.u16()) % 4096 + 1) * 512;
    let mut o = CreateOptions::new(size);
    o.cluster_size = [512, 4096, 16384, 65536][usize::from(a & 3)];
    o.version = if a & 4 != 0 { 2 } else { 3 };
    if o.version == 3 {
        o.extended_l2 = a & 8 != 0 && o.cluster_size >= 16384;
        o.lazy_refcounts = a & 16 != 0;
        if a & 32 != 0 {
            o.compression_type = CompressionType::Zstd;
        }
        o.refcount_bits = 1 << (b & 7).min(6);
    }
    let backing = b & 8 != 0;
    if backing {
        o.backing_file = Some("backing.raw".into());
        o.backing_format = Some("raw".into());
    }
    if b & 16 != 0 && (!backing || o.extended_l2) {
        o.preallocation = Preallocation::Metadata;
    }
    if b & 32 != 0 && !(o.version == 2 && o.preallocation != Preallocation::Off) {
        o.encrypt = Some(Secret::new(PASSPHRASE));
    } else if b & 64 != 0 && o.version == 3 {
        o.data_file = Some("data.raw".into());
        o.data_file_raw = b & 128 != 0 && !backing;
    }
    (o, backing)
}

/// The state a valid image must be in.
#[derive(Debug, Clone)]
struct Model {
    data: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
}

struct Ops<'a> {
    file: Arc<Capped>,
    extra: Qcow2Options,
    q: Option<Qcow2>,
    /// `None` once the content is unknown (hostile start, storage limit).
    model: Option<Model>,
    backing: Option<&'a dyn BlockDevice>,
    v2: bool,
}

impl Ops<'_> {
    fn q(&self) -> &Qcow2 {
        self.q.as_ref().expect("image open")
    }

    fn reopen(&mut self) -> bool {
        match no_internal("reopen", Qcow2::open(self.file.clone(), self.extra.clone())) {
            Ok(q) => {
                self.q = Some(q);
                true
            }
            Err(e) => {
                assert!(
                    self.model.is_none() || self.file.hit.load(Ordering::Relaxed),
                    "a valid image does not reopen: {e}"
                );
                false
            }
        }
    }

    /// Reads `[off, off + len)` and compares it with the model.
    fn verify(&self, off: u64, len: u64, what: &str) {
        let Some(m) = &self.model else {
            let mut b = vec![0u8; len.min(1 << 20) as usize];
            let _ = no_internal("read", self.q().read_at(&mut b, off));
            return;
        };
        let q = self.q();
        assert_eq!(q.size(), m.data.len() as u64, "{what}: size differs");
        let mut b = vec![0u8; len as usize];
        q.read_at(&mut b, off).unwrap_or_else(|e| panic!("{what}: read of a valid image failed: {e}"));
        if let Some(i) = b.iter().zip(&m.data[off as usize..(off + len) as usize]).position(|(x, y)| x != y) {
            panic!(
                "{what}: guest byte {:#x} is {:#04x}, the model says {:#04x}",
                off + i as u64,
                b[i],
                m.data[off as usize + i]
            );
        }
    }

    /// Handles the result of an operation: errors on a valid image must be
    /// refusals of the expected kinds (which change nothing).
    fn outcome(&mut self, what: &str, r: Result<()>, allowed: &[ErrorKind]) -> bool {
        let r = no_internal(what, r);
        match r {
            Ok(()) => true,
            Err(e) => {
                if self.file.hit.load(Ordering::Relaxed) {
                    self.model = None;
                }
                if self.model.is_some() && !allowed.contains(&e.kind()) {
                    panic!("{what} failed on a valid image: {e} ({:?})", e.kind());
                }
                false
            }
        }
    }

    fn backing_bytes(&self, off: u64, out: &mut [u8]) {
        out.fill(0);
        if let Some(b) = self.backing {
            let bs = b.size();
            if off < bs {
                let n = (bs - off).min(out.len() as u64) as usize;
                b.read_at(&mut out[..n], off).expect("backing read");
            }
        }
    }

    fn step(&mut self, inp: &mut Input<'_>) {
        let at = inp.pos;
        let op = inp.u8() % 16;
        let size = self.q().size();
        let cs = self.q().cluster_size();
        if trace() {
            let args = &inp.data[at..(at + 9).min(inp.data.len())];
            eprintln!("op {op} size {size:#x} args {args:02x?}");
        }
        let pick_off = |inp: &mut Input<'_>| {
            if size == 0 {
                0
            } else {
                u64::from(inp.u32()) % size
            }
        };
        match op {
            0 | 1 => {
                let off = pick_off(inp);
                let len = (u64::from(inp.u16()) * 4 + u64::from(op) * 3).min(size - off);
                let seed = inp.u8();
                let mut buf = vec![0u8; len as usize];
                pattern(seed, off, &mut buf);
                let r = self.q().write_at(&buf, off);
                if self.outcome("write", r, &[]) {
                    if let Some(m) = &mut self.model {
                        m.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
                    }
                }
                self.verify(off, len, "after write");
            }
            2 | 3 => {
                let off = pick_off(inp);
                let len = u64::from(inp.u32()) % (size - off + 1).min(16 << 20);
                let mode = if op == 2 { ZeroMode::MayUnmap } else { ZeroMode::Allocate };
                let r = self.q().write_zeroes(off, len, mode);
                if self.outcome("write_zeroes", r, &[]) {
                    if let Some(m) = &mut self.model {
                        m.data[off as usize..(off + len) as usize].fill(0);
                    }
                }
                self.verify(off, len, "after write_zeroes");
            }
            4 => {
                let off = pick_off(inp);
                let len = u64::from(inp.u32()) % (size - off + 1).min(16 << 20);
                let r = self.q().discard(off, len);
                if self.outcome("discard", r, &[]) && len > 0 {
                    // Whole clusters in the range (and a final partial
                    // cluster at the end of the disk) read as zeros, or as
                    // the backing file on v2 images; the rest is kept.
                    let end = off + len;
                    let aend = if end == size { end.div_ceil(cs) * cs } else { end / cs * cs };
                    let astart = off.div_ceil(cs) * cs;
                    if aend > astart {
                        let e = aend.min(size);
                        let mut fill = vec![0u8; (e - astart) as usize];
                        if self.v2 && !self.q().header().extended_l2() {
                            self.backing_bytes(astart, &mut fill);
                        }
                        if let Some(m) = &mut self.model {
                            m.data[astart as usize..e as usize].copy_from_slice(&fill);
                        }
                    }
                }
                self.verify(off, len, "after discard");
            }
            5 => {
                let first = if size == 0 { 0 } else { u64::from(inp.u16()) % size.div_ceil(cs) };
                let n = u64::from(inp.u8() % 4) + 1;
                let off = first * cs;
                let len = (n * cs).min(size - off);
                let seed = inp.u8();
                let mut buf = vec![0u8; len as usize];
                pattern(seed, off, &mut buf);
                let r = self.q().write_compressed(&buf, off);
                if self.outcome("write_compressed", r, &[ErrorKind::Unsupported]) {
                    if let Some(m) = &mut self.model {
                        m.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
                    }
                }
                self.verify(off, len, "after write_compressed");
            }
            6 => {
                let new = (u64::from(inp.u16()) % (OPS_MAX_SIZE / 512) + 1) * 512;
                let r = self.q().resize(new);
                if self.outcome("resize", r, &[ErrorKind::InvalidArgument, ErrorKind::Unsupported]) {
                    if let Some(m) = &mut self.model {
                        m.data.resize(new as usize, 0);
                    }
                }
                self.verify(0, self.q().size().min(64 << 10), "after resize");
            }
            7 => {
                let name = format!("s{}", inp.u8() % 6);
                let r = self.q().snapshot_create(&name);
                if self.outcome(
                    "snapshot_create",
                    r,
                    &[ErrorKind::AlreadyExists, ErrorKind::LimitExceeded, ErrorKind::Unsupported],
                ) {
                    if let Some(m) = &mut self.model {
                        let d = m.data.clone();
                        m.snaps.push((name, d));
                    }
                }
            }
            8 | 9 => {
                let key = self.snapshot_key(inp);
                let r = if op == 8 { self.q().snapshot_apply(&key) } else { self.q().snapshot_delete(&key) };
                let what = if op == 8 { "snapshot_apply" } else { "snapshot_delete" };
                // Applying adds a reference to every cluster of the
                // snapshot: narrow refcounts may refuse it (nothing changes).
                let allowed = [ErrorKind::NotFound, ErrorKind::Unsupported, ErrorKind::LimitExceeded];
                if self.outcome(what, r, &allowed[..if op == 8 { 3 } else { 2 }]) {
                    if let Some(m) = &mut self.model {
                        let i = m.snaps.iter().position(|(n, _)| *n == key).expect("model snapshot");
                        if op == 8 {
                            m.data = m.snaps[i].1.clone();
                        } else {
                            m.snaps.remove(i);
                        }
                    }
                }
                self.verify(0, self.q().size().min(64 << 10), what);
            }
            10 => {
                let key = self.snapshot_key(inp);
                let Ok(v) = no_internal("snapshot_view", self.q().snapshot_view(&key)) else {
                    assert!(
                        !self.model.as_ref().is_some_and(|m| m.snaps.iter().any(|(n, _)| *n == key)),
                        "snapshot view of an existing snapshot failed"
                    );
                    return;
                };
                let vs = v.size();
                let mut b = vec![0u8; vs.min(OPS_MAX_SIZE) as usize];
                let r = no_internal("view read", v.read_at(&mut b, 0));
                if let Some(m) = &self.model {
                    r.unwrap_or_else(|e| panic!("snapshot view read failed: {e}"));
                    let (_, want) = m.snaps.iter().find(|(n, _)| *n == key).expect("snap");
                    let n = want.len().min(b.len());
                    assert!(b[..n] == want[..n], "snapshot view '{key}' differs from the model");
                }
            }
            11 => {
                let r = self.q().flush();
                self.outcome("flush", r, &[]);
            }
            12 => {
                let q = self.q.take().expect("open");
                let r = q.close();
                self.outcome("close", r, &[]);
                if !self.reopen() {
                    return;
                }
                let s = self.q().size();
                self.verify(0, s.min(OPS_MAX_SIZE), "after reopen");
            }
            13 => {
                // Flush, then drop without close (lazy refcounts stay dirty
                // and are rebuilt on the next open).
                let r = self.q().flush();
                self.outcome("flush", r, &[]);
                self.q = None;
                if !self.reopen() {
                    return;
                }
                let s = self.q().size();
                self.verify(0, s.min(OPS_MAX_SIZE), "after drop and reopen");
            }
            _ => {
                let off = pick_off(inp);
                let len = u64::from(inp.u16()).min(size - off);
                self.verify(off, len, "read");
            }
        }
    }

    fn snapshot_key(&self, inp: &mut Input<'_>) -> String {
        let b = inp.u8();
        if self.model.is_some() {
            return format!("s{}", b % 6);
        }
        let snaps = self.q().snapshots();
        if snaps.is_empty() || b & 0x80 != 0 {
            return format!("s{}", b % 6);
        }
        snaps[usize::from(b) % snaps.len()].id.clone()
    }
}

/// `qcow2_ops`: a script of operations on a qcow2 image, either created by
/// vdisk from a few option bits (then checked against a `Vec<u8>` model,
/// reopened at the end, and required to pass `check`) or given as hostile
/// bytes (then only required not to panic, hang or exhaust memory).
///
/// Input: byte 0 bit 0 chooses. Fresh: four option bytes, then the
/// script. Hostile: a little-endian u16 image length, the image, then the
/// script. Each operation is one opcode byte and its arguments.
pub fn qcow2_ops(data: &[u8]) {
    let mut inp = Input { data, pos: 0 };
    let mode = inp.u8();
    let backing_dev = pattern_device(3 << 20, 0x44);
    let data_file: Arc<Capped> = Capped::new(Vec::new(), OPS_STORAGE_LIMIT);
    let (file, extra, model, backing, v2) = if mode & 1 == 0 {
        let (o, backing) = fresh_options(&mut inp);
        let file = Capped::new(Vec::new(), OPS_STORAGE_LIMIT);
        let extra = Qcow2Options {
            backing: backing.then(|| backing_dev.clone()),
            data_file: o.data_file.as_ref().map(|_| data_file.clone() as Arc<dyn Storage>),
            key: o.encrypt.clone(),
            ..Qcow2Options::default()
        };
        let q = Qcow2::create(file.clone(), &o, extra.clone())
            .unwrap_or_else(|e| panic!("create failed for valid options {o:?}: {e}"));
        drop(q);
        let size = o.size.div_ceil(512) * 512;
        let mut m = vec![0u8; size as usize];
        if backing {
            let n = size.min(backing_dev.size()) as usize;
            backing_dev.read_at(&mut m[..n], 0).expect("backing");
        }
        let model = Model { data: m, snaps: Vec::new() };
        (file, extra, Some(model), backing, o.version == 2)
    } else {
        let n = usize::from(inp.u16());
        let img = inp.take(n).to_vec();
        let file = Capped::new(img, OPS_STORAGE_LIMIT);
        let h = Qcow2::read_header(&*file).ok();
        let has_backing = h.as_ref().is_some_and(|h| h.backing_file.is_some());
        let extra = Qcow2Options {
            backing: has_backing.then(|| backing_dev.clone()),
            data_file: h.as_ref().and_then(|h| h.data_file.as_ref()).map(|_| data_file.clone() as Arc<dyn Storage>),
            key: Some(Secret::new(PASSPHRASE)),
            ..Qcow2Options::default()
        };
        let v2 = h.as_ref().is_some_and(|h| h.version == 2);
        (file, extra, None, has_backing, v2)
    };
    let mut ops = Ops { file, extra, q: None, model, backing: backing.then_some(&*backing_dev), v2 };
    if !ops.reopen() {
        return;
    }
    for _ in 0..MAX_OPS {
        if inp.done() {
            break;
        }
        ops.step(&mut inp);
        if ops.q.is_none() {
            return;
        }
        if ops.file.hit.load(Ordering::Relaxed) {
            ops.model = None;
        }
    }
    // Final judgement: content, check, close, reopen, content and check.
    let size = ops.q().size();
    ops.verify(0, size, "at the end");
    let valid = ops.model.is_some();
    let report = no_internal("check", ops.q().check(Repair::None));
    if valid {
        let r = report.unwrap_or_else(|e| panic!("check failed on a valid image: {e}"));
        assert!(r.corruptions == 0 && r.check_errors == 0, "check finds corruption in a valid image: {r:?}");
    }
    let q = ops.q.take().expect("open");
    let r = q.close();
    if !ops.outcome("close", r, &[]) {
        return;
    }
    if !ops.reopen() {
        return;
    }
    ops.verify(0, size, "after the final reopen");
    let snaps = ops.model.as_ref().map(|m| m.snaps.clone()).unwrap_or_default();
    for (name, want) in snaps {
        let v = ops.q().snapshot_view(&name).unwrap_or_else(|e| panic!("snapshot '{name}' is gone after reopen: {e}"));
        let mut b = vec![0u8; v.size().min(want.len() as u64) as usize];
        v.read_at(&mut b, 0).expect("snapshot view read");
        assert!(b[..] == want[..b.len()], "snapshot '{name}' differs from the model after reopen");
    }
    let report = no_internal("check", ops.q().check(Repair::None));
    if ops.model.is_some() {
        let r = report.unwrap_or_else(|e| panic!("check failed on a valid image: {e}"));
        assert!(r.is_clean(), "check after reopen is not clean on a valid image: {r:?}");
    }
}
