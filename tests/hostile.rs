//! Bounded resources on hostile images: each image below claims something
//! huge (tables, snapshot tables, grain directories, decompressed data,
//! backing chains). Opening it, reading it and checking it must fail
//! cleanly or succeed, within a memory cap (measured by a counting global
//! allocator in this test binary) and a time cap (the case runs in a thread
//! that must finish in a few seconds).
//!
//! The images are built with vdisk and poked, or written header by header;
//! building happens before the measured part.
// The counting allocator is the one unsafe item of this test binary: it
// forwards to the system allocator and only adds bookkeeping.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vdisk::qcow2::create::CreateOptions;
use vdisk::qcow2::header::CompressionType;
use vdisk::testing::codec::Codec;
use vdisk::{
    BackingPolicy, BlockDevice, ErrorKind, FileStorage, Format, MemStorage, OpenOptions, Qcow2, Qcow2Options, Storage,
    Vmdk, VmdkCreateOptions, VmdkOptions,
};

/// L2 entry bit 62: the cluster is compressed.
const OFLAG_COMPRESSED: u64 = 1 << 62;

/// The codec of a qcow2 compression type.
fn codec_of(ty: CompressionType) -> Codec {
    match ty {
        CompressionType::Zlib => Codec::Deflate,
        CompressionType::Zstd => Codec::Zstd,
    }
}

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged and only updates two counters, so `System`'s guarantees hold.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One test at a time (the counters are global): each test holds this
/// from its start, so no other test builds images while it measures.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const MIB: usize = 1 << 20;

/// Runs `f` in a thread; fails if it takes longer than `secs`, if the
/// peak of live allocations grows by more than `cap_mib` MiB meanwhile, or
/// if what `f` returned (a description of the outcome: "opened",
/// "refused (Kind: message)", ...) does not contain `expect`.
fn capped(name: &str, cap_mib: usize, secs: u64, expect: &str, f: impl FnOnce() -> String + Send + 'static) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let out = f();
        let _ = tx.send(out);
    });
    let out = match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(o) => o,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{name}: still running after {secs} s")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{name}: the case panicked"),
    };
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!("{name}: {out} ({} ms, peak {:.1} MiB)", start.elapsed().as_millis(), peak as f64 / MIB as f64);
    assert!(out.contains(expect), "{name}: expected an outcome with '{expect}', got: {out}");
    assert!(
        peak <= cap_mib * MIB,
        "{name}: peak allocation {:.1} MiB exceeds the cap of {cap_mib} MiB",
        peak as f64 / MIB as f64
    );
}

/// Reads a bounded sample of the device: `map` walk and the start of each
/// extent. Returns how many calls failed.
fn exercise(dev: &dyn BlockDevice) -> usize {
    let size = dev.size();
    let mut off = 0u64;
    let mut errors = 0;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..64 {
        if off >= size {
            break;
        }
        match dev.map(off, size - off) {
            Ok(e) => {
                let n = e.length.min(buf.len() as u64) as usize;
                if dev.read_at(&mut buf[..n], off).is_err() {
                    errors += 1;
                }
                off += e.length;
            }
            Err(_) => {
                errors += 1;
                off = off.saturating_add(1 << 20);
            }
        }
    }
    errors
}

fn outcome<T>(r: &vdisk::Result<T>) -> String {
    match r {
        Ok(_) => "opened".into(),
        Err(e) => format!("refused ({:?}: {e})", e.kind()),
    }
}

// ---------------------------------------------------------------------------
// qcow2 helpers

/// A fresh qcow2 image's bytes.
fn qcow2_bytes(o: &CreateOptions, prep: impl FnOnce(&Qcow2)) -> Vec<u8> {
    let m = Arc::new(MemStorage::new());
    let q = Qcow2::create(m.clone(), o, Qcow2Options::default()).unwrap();
    prep(&q);
    q.close().unwrap();
    m.to_vec()
}

fn put_be32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_be64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn open_qcow2_mem(bytes: Vec<u8>, read_only: bool) -> vdisk::Result<Qcow2> {
    let m: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes).limit(256 << 20));
    Qcow2::open(m, Qcow2Options { read_only, ..Default::default() })
}

/// Opens read-only and read-write, exercises and checks whatever opens.
fn qcow2_case(bytes: Vec<u8>) -> String {
    let mut out = Vec::new();
    for ro in [true, false] {
        let r = open_qcow2_mem(bytes.clone(), ro);
        match r {
            Ok(q) => {
                let failed = exercise(&q);
                let check = match q.check(vdisk::qcow2::check::Repair::None) {
                    Ok(r) if r.corruptions > 0 => "check: corrupt",
                    Ok(_) => "check: clean",
                    Err(_) => "check: refused",
                };
                out.push(format!("opened, {failed} reads failed, {check}"));
            }
            Err(_) => out.push(outcome(&r)),
        }
    }
    out.join("; ")
}

#[test]
fn qcow2_huge_l1_claimed() {
    let _serial = serial();
    let img = qcow2_bytes(&CreateOptions::new(1 << 20), |_| {});
    // l1_size far past the limit, and just under it in a tiny file.
    for (name, l1_size, expect) in [
        (
            "l1 4G entries",
            u32::MAX,
            "refused (InvalidImage: qcow2: active L1 table of 4294967295 entries is too large (field l1_size",
        ),
        (
            "l1 32 MiB",
            4 << 20,
            "refused (InvalidImage: qcow2: table at 0x30000 of 33554432 bytes runs past the end of the file",
        ),
    ] {
        let mut b = img.clone();
        put_be32(&mut b, 36, l1_size);
        capped(name, 16, 5, expect, move || qcow2_case(b));
    }
    // A virtual size that needs a huge L1 table.
    let mut b = img.clone();
    put_be64(&mut b, 24, 1 << 62);
    capped(
        "size 2^62",
        16,
        5,
        "refused (InvalidImage: qcow2: image of 4611686018427387904 bytes is too big",
        move || qcow2_case(b),
    );
}

#[test]
fn qcow2_huge_refcount_table_claimed() {
    let _serial = serial();
    let img = qcow2_bytes(&CreateOptions::new(1 << 20), |_| {});
    for (name, clusters, expect) in [
        (
            "reftable 4G clusters",
            u32::MAX,
            "refused (InvalidImage: qcow2: reference count table of 4294967295 clusters",
        ),
        ("reftable 8 MiB", 128, "refused (InvalidImage: qcow2: table at 0x100000 of 8388608 bytes runs past the end"),
    ] {
        let mut b = img.clone();
        put_be32(&mut b, 56, clusters);
        put_be64(&mut b, 48, 1 << 20);
        capped(name, 16, 5, expect, move || qcow2_case(b));
    }
    // Every refcount table entry points at its own far-away block.
    let mut b = img.clone();
    let rt = be64(&b, 48) as usize;
    for i in 0..8192 {
        put_be64(&mut b, rt + 8 * i, (1 << 40) + ((i as u64) << 16));
    }
    // Opens (refblocks are read on demand, as QEMU does); both opens succeed.
    capped("refblocks far past EOF", 32, 5, "opened, 0 reads failed, check: corrupt", move || qcow2_case(b));
}

#[test]
fn qcow2_snapshot_table_of_maximum_size() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // 65536 minimal entries (64 bytes each: 24 bytes of extra data, empty
    // id and name) in a 512-byte-cluster image.
    let mut o = CreateOptions::new(1 << 20);
    o.cluster_size = 512;
    let mut img = qcow2_bytes(&o, |_| {});
    let table_off = 1u64 << 20;
    put_be32(&mut img, 60, 65536);
    put_be64(&mut img, 64, table_off);
    let mut entry = [0u8; 64];
    put_be32(&mut entry, 36, 24);
    let p = dir.path().join("many.qcow2");
    std::fs::write(&p, &img).unwrap();
    {
        let f = FileStorage::open(&p, false).unwrap();
        let table: Vec<u8> = entry.repeat(65536);
        f.write_at(&table, table_off).unwrap();
    }
    let p2 = p.clone();
    capped("65536 snapshots", 64, 10, "opened", move || {
        let f: Arc<dyn Storage> = Arc::new(FileStorage::open(&p2, true).unwrap());
        let r = Qcow2::open(f, Qcow2Options::default());
        let s = outcome(&r);
        if let Ok(q) = &r {
            assert_eq!(q.snapshots().len(), 65536);
            exercise(q);
            let _ = q.check(vdisk::qcow2::check::Repair::None);
        }
        s
    });
    // 65536 snapshots that each have their own one-entry L1 table: a
    // read-write open and a few writes must not slow down with the count.
    let many_l1 = dir.path().join("many-l1.qcow2");
    std::fs::write(&many_l1, &img).unwrap();
    {
        let f = FileStorage::open(&many_l1, false).unwrap();
        let mut table = Vec::with_capacity(65536 * 64);
        for i in 0..65536u64 {
            let mut e = entry;
            put_be64(&mut e, 0, (8 << 20) + i * 512);
            put_be32(&mut e, 8, 1);
            table.extend_from_slice(&e);
        }
        f.write_at(&table, table_off).unwrap();
        f.set_len((8 << 20) + 65536 * 512).unwrap();
    }
    capped("65536 snapshot L1 tables, writes", 64, 10, "opened, wrote and flushed", move || {
        let f: Arc<dyn Storage> = Arc::new(FileStorage::open(&many_l1, false).unwrap());
        let q = Qcow2::open(f, Qcow2Options::default()).unwrap();
        for i in 0..16u64 {
            q.write_at(&[7u8; 4096], i * 65536).unwrap();
        }
        q.flush().unwrap();
        "opened, wrote and flushed".into()
    });
    // 65536 entries of 65 KiB each (64 KiB names, 1 KiB extra data): the
    // table passes 64 MiB after about a thousand entries and is refused.
    // Memory holds what was read up to the limit (64 MiB of names), no
    // more.
    let big = dir.path().join("big.qcow2");
    std::fs::write(&big, &img).unwrap();
    {
        let f = FileStorage::open(&big, false).unwrap();
        let mut e = [0u8; 40];
        e[12..14].copy_from_slice(&0u16.to_be_bytes());
        e[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        put_be32(&mut e, 36, 1024);
        let step = (40 + 1024 + 0xffff + 7) / 8 * 8;
        for i in 0..1100u64 {
            f.write_at(&e, table_off + i * step as u64).unwrap();
        }
        f.set_len(table_off + 1100 * step as u64 + 4096).unwrap();
    }
    capped("snapshot table past 64 MiB", 96, 10, "refused (LimitExceeded", move || {
        let f: Arc<dyn Storage> = Arc::new(FileStorage::open(&big, true).unwrap());
        let r = Qcow2::open(f, Qcow2Options::default());
        assert_eq!(r.as_ref().map(|_| ()).unwrap_err().kind(), ErrorKind::LimitExceeded);
        outcome(&r)
    });
}

#[test]
fn qcow2_compressed_cluster_inflating_past_a_cluster() {
    let _serial = serial();
    for ty in [CompressionType::Zlib, CompressionType::Zstd] {
        let mut o = CreateOptions::new(1 << 20);
        o.cluster_size = 65536;
        o.compression_type = ty;
        let mut img = qcow2_bytes(&o, |q| {
            q.write_compressed(&[0x5a; 65536], 0).unwrap();
        });
        // 64 MiB of zeros compress to ~64 KiB (zlib) or a few KiB (zstd):
        // a "cluster" that inflates a thousand times past its size.
        let bomb = vdisk::testing::codec::compress(codec_of(ty), &vec![0u8; 64 << 20], 120 << 10)
            .unwrap()
            .expect("compressible");
        let host = img.len() as u64;
        img.extend_from_slice(&bomb);
        img.resize(img.len().div_ceil(65536) * 65536, 0);
        // Point guest cluster 0's L2 entry at it (sector count at most 256).
        let l1 = be64(&img, 40) as usize;
        let l2 = (be64(&img, l1) & 0x00ff_ffff_ffff_fe00) as usize;
        let sectors = (bomb.len() as u64).div_ceil(512).min(256) - 1;
        put_be64(&mut img, l2, OFLAG_COMPRESSED | host | (sectors << 54));
        capped(&format!("{} bomb", ty.name()), 16, 5, "read one cluster of it", move || {
            let r = open_qcow2_mem(img, true);
            let q = r.unwrap();
            let mut buf = vec![0u8; 65536];
            let r = q.read_at(&mut buf, 0);
            match r {
                Ok(()) => {
                    assert!(buf.iter().all(|&b| b == 0));
                    "read one cluster of it".into()
                }
                Err(e) => format!("refused ({e})"),
            }
        });
    }
}

#[test]
fn qcow2_l2_tables_far_past_eof() {
    let _serial = serial();
    // 2 MiB clusters, and every L1 entry names its own L2 table far past
    // the end of the file: reads cost at most one table each.
    let mut o = CreateOptions::new(1 << 40);
    o.cluster_size = 2 << 20;
    let mut img = qcow2_bytes(&o, |_| {});
    let l1 = be64(&img, 40) as usize;
    let n = u32::from_be_bytes(img[36..40].try_into().unwrap()) as usize;
    for i in 0..n {
        put_be64(&mut img, l1 + 8 * i, (1 << 50) + ((i as u64) << 21));
    }
    // Tables past the end read as zeros (as QEMU's file layer does): the
    // guest sees zeros, and check calls the image corrupt.
    capped("L2 past EOF", 64, 10, "opened, 0 reads failed, check: corrupt", move || qcow2_case(img));
}

#[test]
fn qcow2_check_walks_shared_tables_once() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // 2000 snapshots whose entries all name one L1 table of 4 Mi entries
    // (32 MiB, past the end of the file): check and a read-write open
    // (which rebuilds refcounts of a dirty image) must not read it 2000
    // times.
    let mut o = CreateOptions::new(1 << 20);
    o.cluster_size = 512;
    let mut img = qcow2_bytes(&o, |_| {});
    let table_off = 1u64 << 20;
    put_be32(&mut img, 60, 2000);
    put_be64(&mut img, 64, table_off);
    put_be64(&mut img, 72, 1); // dirty: a read-write open rebuilds refcounts
    img.resize(table_off as usize, 0);
    for _ in 0..2000 {
        let mut e = [0u8; 64];
        put_be64(&mut e, 0, 64 << 20);
        put_be32(&mut e, 8, 4 << 20);
        put_be32(&mut e, 36, 24);
        img.extend_from_slice(&e);
    }
    let b = img.clone();
    capped("2000 snapshots sharing a 32 MiB L1", 80, 10, "opened, 0 reads failed, check: corrupt", move || {
        qcow2_case(b)
    });
    // An active L1 table of 4 Mi entries (in the file) that all name one
    // 64 KiB L2 table, whose entries all name one data cluster.
    let mut o = CreateOptions::new(1 << 40);
    o.cluster_size = 65536;
    let img = qcow2_bytes(&o, |q| q.write_at(&[1; 512], 0).unwrap());
    let p = dir.path().join("shared-l2.qcow2");
    std::fs::write(&p, &img).unwrap();
    {
        let f = FileStorage::open(&p, false).unwrap();
        let l1 = be64(&img, 40);
        let e0 = be64(&img, l1 as usize);
        let l2 = (e0 & 0x00ff_ffff_ffff_fe00) as usize;
        let d0 = be64(&img, l2);
        let mut b = vec![0u8; 8];
        put_be64(&mut b, 0, d0);
        f.write_at(&b.repeat(8192), l2 as u64).unwrap();
        put_be64(&mut b, 0, e0);
        let n = 4usize << 20;
        // A new L1 table past everything, and the header pointing at it.
        let new_l1 = img.len().div_ceil(65536) as u64 * 65536;
        f.write_at(&b.repeat(n), new_l1).unwrap();
        let mut h = vec![0u8; 16];
        put_be32(&mut h, 0, n as u32);
        put_be64(&mut h, 4, new_l1);
        f.write_at(&h[..12], 36).unwrap();
        let mut sz = [0u8; 8];
        put_be64(&mut sz, 0, (n as u64) << 29);
        f.write_at(&sz, 24).unwrap();
    }
    capped("4 Mi L1 entries naming one L2", 128, 10, "opened", move || {
        let f: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, true).unwrap());
        let r = Qcow2::open(f, Qcow2Options::default());
        let s = outcome(&r);
        if let Ok(q) = r {
            exercise(&q);
            let _ = q.check(vdisk::qcow2::check::Repair::None);
        }
        s
    });
}

/// A qcow2 image at `path` naming `backing` as its qcow2 backing file.
fn qcow2_overlay(path: &Path, backing: &str) {
    let mut o = CreateOptions::new(1 << 20);
    o.backing_file = Some(backing.into());
    o.backing_format = Some("qcow2".into());
    let bytes = qcow2_bytes(&o, |_| {});
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn backing_chains_that_loop() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_overlay(&d.join("self.qcow2"), "self.qcow2");
    qcow2_overlay(&d.join("a.qcow2"), "b.qcow2");
    qcow2_overlay(&d.join("b.qcow2"), "a.qcow2");
    // A chain of 15 distinct files: deeper than the limit of 10.
    for i in 0..15 {
        qcow2_overlay(&d.join(format!("c{i}.qcow2")), &format!("c{}.qcow2", i + 1));
    }
    std::fs::write(d.join("c15.qcow2"), qcow2_bytes(&CreateOptions::new(1 << 20), |_| {})).unwrap();
    // A vmdk delta link naming itself as its parent.
    let vopts = VmdkCreateOptions::default();
    let v = Vmdk::create(&d.join("v.vmdk"), 1 << 20, &vopts).unwrap();
    v.close().unwrap();
    let mut vb = std::fs::read(d.join("v.vmdk")).unwrap();
    let text = b"parentCID=ffffffff";
    let i = vb.windows(text.len()).position(|w| w == text).unwrap();
    let hint = b"parentCID=00000000\nparentFileNameHint=\"v.vmdk\"";
    vb.splice(i..i + text.len(), hint.iter().copied());
    vb.truncate(vb.len() - (hint.len() - text.len()));
    std::fs::write(d.join("v.vmdk"), vb).unwrap();
    for (name, fmt) in [
        ("self.qcow2", Format::Qcow2),
        ("a.qcow2", Format::Qcow2),
        ("c0.qcow2", Format::Qcow2),
        ("v.vmdk", Format::Vmdk),
    ] {
        for policy in [BackingPolicy::Follow, BackingPolicy::RecordedFormat] {
            let p = d.join(name);
            let expect = if name == "c0.qcow2" { "refused (LimitExceeded" } else { "backing chain loops back to" };
            capped(&format!("{name} {policy:?}"), 64, 5, expect, move || {
                let r = OpenOptions::new().format(fmt).read_only(true).backing(policy).open(&p);
                assert!(r.is_err(), "{name}: a looping or too deep chain opened");
                outcome(&r)
            });
        }
    }
}

// ---------------------------------------------------------------------------
// vmdk

/// A hosted sparse header with the given geometry, and nothing else.
fn vmdk_header(capacity: u64, grain: u64, gtes: u32, gd_offset: u64, overhead: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0..4].copy_from_slice(b"KDMV");
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..20].copy_from_slice(&capacity.to_le_bytes());
    b[20..28].copy_from_slice(&grain.to_le_bytes());
    b[44..48].copy_from_slice(&gtes.to_le_bytes());
    b[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    b[64..72].copy_from_slice(&overhead.to_le_bytes());
    b[73..77].copy_from_slice(b"\n \r\n");
    b
}

fn vmdk_case(storage: Arc<dyn Storage>) -> String {
    let no_files = |p: &Path, _: bool| -> vdisk::Result<Arc<dyn Storage>> {
        Err(vdisk::Error::new(ErrorKind::NotFound, format!("{} not served", p.display())))
    };
    let opts = VmdkOptions { read_only: true, ..Default::default() };
    let r = Vmdk::open_with(storage, opts, &no_files);
    let s = outcome(&r);
    if let Ok(v) = r {
        exercise(&v);
        let _ = v.check();
    }
    s
}

#[test]
fn vmdk_grain_directory_claiming_terabytes() {
    let _serial = serial();
    // 64 TiB of 64 KiB grains: an 8 MiB directory, in a one-sector file.
    let h = vmdk_header((64 << 40) / 512, 128, 512, 1, 1);
    capped("vmdk 64 TiB, tiny file", 16, 5, "refused (InvalidImage", move || {
        vmdk_case(Arc::new(MemStorage::from_vec(h).read_only()))
    });
    // 64 TiB of 512-byte grains, one entry per table: a directory of
    // 512 GiB claimed.
    let h = vmdk_header((64 << 40) / 512, 1, 1, 1, 1);
    capped(
        "vmdk 512 GiB directory",
        16,
        5,
        "refused (LimitExceeded: vmdk: grain directory of 549755813888 bytes",
        move || vmdk_case(Arc::new(MemStorage::from_vec(h).read_only())),
    );
    // The 8 MiB directory really is there (a sparse file of 9 MiB), every
    // entry naming the same grain table, whose entries name grains far
    // past the end.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.vmdk");
    {
        let f = FileStorage::create_new(&p).unwrap();
        f.write_at(&vmdk_header((64 << 40) / 512, 128, 512, 1, 20000), 0).unwrap();
        let gd: Vec<u8> = 18000u32.to_le_bytes().repeat(2 << 20);
        f.write_at(&gd, 512).unwrap();
        let gt: Vec<u8> = 0x7fff_0000u32.to_le_bytes().repeat(512);
        f.write_at(&gt, 18000 * 512).unwrap();
        f.set_len(20000 * 512).unwrap();
    }
    capped("vmdk 8 MiB directory present", 48, 10, "opened", move || {
        vmdk_case(Arc::new(FileStorage::open(&p, true).unwrap()))
    });
}

#[test]
fn vmdk_compressed_grain_inflating_past_a_grain() {
    let _serial = serial();
    // 64 MiB of zeros deflate to ~64 KiB: within the 2-grain limit.
    let zeros = vec![0u8; 64 << 20];
    let bomb = vdisk::testing::codec::compress(Codec::Zlib, &zeros, vdisk::testing::codec::deflate_bound(zeros.len()))
        .unwrap()
        .unwrap();
    assert!(bomb.len() < 2 * 65536, "bomb of {} bytes", bomb.len());
    for markers in [false, true] {
        // One 64 KiB grain: header, directory at sector 1, table at sector
        // 2, the compressed grain at sector 8.
        let mut img = vmdk_header(128, 128, 512, 1, 8);
        let flags: u32 = 1 | 1 << 16 | if markers { 1 << 17 } else { 0 };
        img[8..12].copy_from_slice(&flags.to_le_bytes());
        img[77..79].copy_from_slice(&1u16.to_le_bytes());
        img.resize(8 * 512, 0);
        img[512..516].copy_from_slice(&2u32.to_le_bytes());
        img[1024..1028].copy_from_slice(&8u32.to_le_bytes());
        if markers {
            img.extend_from_slice(&0u64.to_le_bytes());
            img.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
        }
        img.extend_from_slice(&bomb);
        img.resize(img.len().div_ceil(512) * 512, 0);
        let name = format!("vmdk zlib bomb (markers: {markers})");
        capped(&name, 16, 5, "refused (vmdk: compressed grain inflates to more than one grain", move || {
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img).read_only());
            let v = Vmdk::open(s, VmdkOptions::default()).unwrap();
            let mut buf = vec![0u8; 65536];
            match v.read_at(&mut buf, 0) {
                Ok(()) => {
                    assert!(buf.iter().all(|&b| b == 0));
                    "read one grain of it".into()
                }
                Err(e) => format!("refused ({e})"),
            }
        });
    }
}
