//! vmdk against a `Vec<u8>` model (proptest), hostile header fields,
//! truncated files, and `check` finding planted corruption.

#[path = "vmdk_common/mod.rs"]
mod common;

use std::sync::Arc;

use proptest::prelude::*;
use vdisk::vmdk::header::*;
use vdisk::vmdk::{Subformat, VmdkCreateOptions, VmdkOptions};
use vdisk::{BlockDevice, ErrorKind, MemStorage, Storage, Vmdk, ZeroMode};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u32, u8),
    Zero(u64, u32, bool),
    Flush,
    Reopen,
}

fn ops(window: u64) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => (0..window, 1u32..70_000, any::<u8>()).prop_map(|(o, l, p)| Op::Write(o, l, p)),
        2 => (0..window, 1u32..140_000, any::<bool>()).prop_map(|(o, l, a)| Op::Zero(o, l, a)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ];
    proptest::collection::vec(op, 1..24)
}

/// A hand-made monolithicSparse image in memory with tiny tables (4 KiB
/// grains, 4 entries per table, every directory entry 0), so tables are
/// allocated on demand and a small disk spans many tables.
fn tiny_tables_image(capacity_sectors: u64, zeroed: bool) -> Vec<u8> {
    let mut h = SparseHeader {
        version: if zeroed { 2 } else { 1 },
        flags: FLAG_NL_DETECT | FLAG_RGD | if zeroed { FLAG_ZERO_GRAIN } else { 0 },
        capacity: capacity_sectors,
        grain_size: 8,
        descriptor_offset: 1,
        descriptor_size: 4,
        num_gtes_per_gt: 4,
        rgd_offset: 5,
        gd_offset: 0,
        overhead: 0,
        unclean_shutdown: 0,
        nl_bytes: NL_BYTES,
        compress_algorithm: 0,
    };
    let gds = h.geometry().gd_sectors();
    h.gd_offset = h.rgd_offset + gds;
    h.overhead = h.gd_offset + gds;
    let mut b = vec![0u8; (h.overhead * 512) as usize];
    b[..512].copy_from_slice(&h.encode());
    let d = format!(
        "# Disk DescriptorFile\nversion=1\nCID=0000abcd\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\nRW {capacity_sectors} SPARSE \"tiny.vmdk\"\n"
    );
    b[512..512 + d.len()].copy_from_slice(d.as_bytes());
    b
}

fn open_mem(m: &Arc<MemStorage>) -> Vmdk {
    let s: Arc<dyn Storage> = m.clone();
    Vmdk::open(s, VmdkOptions::default()).unwrap()
}

/// Applies `ops` to `dev` (reopened by `reopen`) and to `model`, whose
/// first byte is guest offset `base`; checks every read.
fn run_ops(mut dev: Vmdk, reopen: &dyn Fn(Vmdk) -> Vmdk, model: &mut [u8], base: u64, ops: &[Op]) -> Vmdk {
    let win = model.len() as u64;
    for op in ops {
        match *op {
            Op::Write(o, l, p) => {
                let l = u64::from(l).min(win - o);
                dev.write_at(&vec![p; l as usize], base + o).unwrap();
                model[o as usize..(o + l) as usize].fill(p);
            }
            Op::Zero(o, l, alloc) => {
                let l = u64::from(l).min(win - o);
                let mode = if alloc { ZeroMode::Allocate } else { ZeroMode::MayUnmap };
                dev.write_zeroes(base + o, l, mode).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
            }
            Op::Flush => dev.flush().unwrap(),
            Op::Reopen => {
                dev.flush().unwrap();
                dev = reopen(dev);
            }
        }
    }
    let mut got = vec![0u8; model.len()];
    dev.read_at(&mut got, base).unwrap();
    if got != model {
        let i = got.iter().zip(model.iter()).position(|(a, b)| a != b).unwrap();
        panic!("byte {:#x}: device {:#x}, model {:#x}", base + i as u64, got[i], model[i]);
    }
    // map tiles the window and agrees with the data.
    let mut pos = base;
    while pos < base + win {
        let e = dev.map(pos, base + win - pos).unwrap();
        assert!(e.length > 0);
        if e.reads_as_zero() {
            let s = (pos - base) as usize;
            assert!(model[s..s + e.length as usize].iter().all(|&b| b == 0), "{e:?} is not zero");
        }
        pos += e.length;
    }
    dev.flush().unwrap();
    let r = dev.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
    dev
}

proptest! {
    // VMDK_CASES raises the case count for a longer local run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("VMDK_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn sparse_tiny_tables_vs_model(ops in ops(1 << 20), zeroed in any::<bool>()) {
        let size = (1u64 << 20) - 1536; // last grain partial
        let m = Arc::new(MemStorage::from_vec(tiny_tables_image(size / 512, zeroed)));
        let dev = open_mem(&m);
        let mut model = vec![0u8; size as usize];
        let ops: Vec<Op> = ops.into_iter().map(|o| match o {
            Op::Write(x, l, p) => Op::Write(x.min(size - 1), l, p),
            Op::Zero(x, l, a) => Op::Zero(x.min(size - 1), l, a),
            o => o,
        }).collect();
        let m2 = m.clone();
        let dev = run_ops(dev, &move |d| { drop(d); open_mem(&m2) }, &mut model, 0, &ops);
        drop(dev);
    }

    #[test]
    fn two_gb_extents_vs_model(ops in ops(2 * MIB), flat in any::<bool>(), zeroed in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.vmdk");
        let size = 2 * GIB + MIB;
        let opts = VmdkCreateOptions {
            subformat: if flat { Subformat::TwoGbMaxExtentFlat } else { Subformat::TwoGbMaxExtentSparse },
            zeroed_grain: zeroed,
            ..Default::default()
        };
        let dev = Vmdk::create(&path, size, &opts).unwrap();
        let base = 2 * GIB - MIB;
        let mut model = vec![0u8; (2 * MIB) as usize];
        let p2 = path.clone();
        let reopen = move |d: Vmdk| {
            drop(d);
            let f: Arc<dyn Storage> = Arc::new(vdisk::FileStorage::open(&p2, false).unwrap());
            Vmdk::open(f, VmdkOptions::default()).unwrap()
        };
        let dev = run_ops(dev, &reopen, &mut model, base, &ops);
        // Nothing leaked outside the window.
        let mut b = vec![0u8; 65536];
        dev.read_at(&mut b, 0).unwrap();
        prop_assert!(b.iter().all(|&x| x == 0));
        dev.read_at(&mut b, base - 65536).unwrap();
        prop_assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn monolithic_sparse_vs_model(ops in ops(3 * MIB)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.vmdk");
        let size = 3 * MIB;
        let dev = Vmdk::create(&path, size, &VmdkCreateOptions::default()).unwrap();
        let mut model = vec![0u8; size as usize];
        let p2 = path.clone();
        let reopen = move |d: Vmdk| {
            drop(d);
            let f: Arc<dyn Storage> = Arc::new(vdisk::FileStorage::open(&p2, false).unwrap());
            Vmdk::open(f, VmdkOptions::default()).unwrap()
        };
        drop(run_ops(dev, &reopen, &mut model, 0, &ops));
    }
}

/// A small monolithicSparse image with data, made by vdisk, in memory.
fn sample_sparse() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.vmdk");
    let v = Vmdk::create(&path, 4 * MIB, &VmdkCreateOptions::default()).unwrap();
    v.write_at(&[0xaa; 70_000], 1000).unwrap();
    v.write_at(&[0xbb; 512], 3 * MIB).unwrap();
    v.flush().unwrap();
    drop(v);
    std::fs::read(&path).unwrap()
}

fn sample_stream() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("st.vmdk");
    let o = VmdkCreateOptions::parse("subformat=streamOptimized").unwrap();
    let v = Vmdk::create(&path, 2 * MIB, &o).unwrap();
    v.write_at(&[0xcc; 3 * 65536], 65536).unwrap();
    v.flush().unwrap();
    drop(v);
    std::fs::read(&path).unwrap()
}

fn open_bytes(b: Vec<u8>, read_only: bool) -> vdisk::Result<(Vmdk, Arc<MemStorage>)> {
    let m = Arc::new(MemStorage::from_vec(b));
    let s: Arc<dyn Storage> = m.clone();
    let v = Vmdk::open(s, VmdkOptions { read_only, ..Default::default() })?;
    Ok((v, m))
}

/// Reads the whole device; returns the first error.
fn read_all(v: &Vmdk) -> vdisk::Result<Vec<u8>> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0)?;
    let mut pos = 0;
    while pos < v.size() {
        let e = v.map(pos, u64::MAX)?;
        assert!(e.length > 0);
        pos += e.length;
    }
    Ok(b)
}

#[test]
fn header_corruption_table() {
    let good = sample_sparse();
    let le32 = |v: u32| v.to_le_bytes().to_vec();
    let le64 = |v: u64| v.to_le_bytes().to_vec();
    // (what, offset, bytes, expected error at open (None: opens))
    let cases: Vec<(&str, usize, Vec<u8>, Option<ErrorKind>)> = vec![
        ("magic", 0, b"XDMV".to_vec(), Some(ErrorKind::InvalidImage)),
        ("version 4", 4, le32(4), Some(ErrorKind::Unsupported)),
        ("unknown flag", 8, le32(0x3 | 0x100), Some(ErrorKind::Unsupported)),
        ("capacity huge", 12, le64(u64::MAX / 2), Some(ErrorKind::LimitExceeded)),
        // The header's capacity rules a monolithic file (as in QEMU).
        ("capacity below descriptor", 12, le64(4), None),
        ("grain 3 sectors", 20, le64(3), Some(ErrorKind::InvalidImage)),
        ("grain 0", 20, le64(0), Some(ErrorKind::InvalidImage)),
        ("descriptor offset past EOF", 28, le64(1 << 40), Some(ErrorKind::InvalidImage)),
        ("descriptor size huge", 36, le64(1 << 40), Some(ErrorKind::LimitExceeded)),
        ("gtes 0", 44, le32(0), Some(ErrorKind::InvalidImage)),
        ("gtes 4096", 44, le32(4096), Some(ErrorKind::InvalidImage)),
        ("rgd past EOF", 48, le64(1 << 40), Some(ErrorKind::InvalidImage)),
        ("gd past EOF", 56, le64(u64::MAX - 1), Some(ErrorKind::InvalidImage)),
        ("gd 0", 56, le64(0), Some(ErrorKind::InvalidImage)),
        ("gd at end without footer", 56, le64(u64::MAX), Some(ErrorKind::InvalidImage)),
        ("newline bytes", 73, vec![b'\n', b' ', b'\n', 0], Some(ErrorKind::InvalidImage)),
        ("compression 7", 77, vec![7, 0], Some(ErrorKind::Unsupported)),
        ("descriptor not utf-8", 512 + 30, vec![0xff, 0xfe], Some(ErrorKind::InvalidImage)),
        ("descriptor version", 512 + 22, b"version=7".to_vec(), Some(ErrorKind::Unsupported)),
    ];
    for (what, off, bytes, expect) in cases {
        let mut b = good.clone();
        b[off..off + bytes.len()].copy_from_slice(&bytes);
        match (open_bytes(b, true), expect) {
            (Err(e), Some(k)) => assert_eq!(e.kind(), k, "{what}: {e}"),
            (Ok(_), Some(k)) => panic!("{what}: opened, expected {k:?}"),
            (Err(e), None) => panic!("{what}: {e}"),
            (Ok(_), None) => {}
        }
    }
}

#[test]
fn table_corruption_is_detected() {
    let good = sample_sparse();
    let h = SparseHeader::parse(&good[..512]).unwrap();
    let gd = (h.gd_offset * 512) as usize;
    let gt0 = u32::from_le_bytes(good[gd..gd + 4].try_into().unwrap()) as usize * 512;
    let flen = good.len() as u64;
    // GD entry past EOF: reads of its range fail as corrupt.
    let mut b = good.clone();
    b[gd..gd + 4].copy_from_slice(&((flen / 512 + 10) as u32).to_le_bytes());
    let (v, _) = open_bytes(b, true).unwrap();
    assert_eq!(read_all(&v).unwrap_err().kind(), ErrorKind::Corrupt);
    let r = v.check().unwrap();
    assert!(r.errors > 0);
    // GTE past EOF.
    let mut b = good.clone();
    b[gt0..gt0 + 4].copy_from_slice(&((flen / 512 + 1) as u32).to_le_bytes());
    let (v, _) = open_bytes(b, true).unwrap();
    assert_eq!(read_all(&v).unwrap_err().kind(), ErrorKind::Corrupt);
    assert!(v.check().unwrap().errors > 0);
    // Two grains share one host grain: check reports it.
    let mut b = good.clone();
    let e0 = b[gt0..gt0 + 4].to_vec();
    b[gt0 + 40..gt0 + 44].copy_from_slice(&e0);
    let (v, _) = open_bytes(b, true).unwrap();
    let r = v.check().unwrap();
    assert_eq!(r.errors, 1, "{:?}", r.messages);
    assert!(r.messages[0].contains("another grain"), "{:?}", r.messages);
    // A grain pointing into the metadata (the grain directory): reads work,
    // writes are refused and leave the directory alone.
    let mut b = good.clone();
    b[gt0 + 8..gt0 + 12].copy_from_slice(&(h.gd_offset as u32).to_le_bytes());
    let (v, m) = open_bytes(b, false).unwrap();
    let before = m.to_vec()[gd..gd + 512].to_vec();
    let mut r = vec![0u8; 16];
    v.read_at(&mut r, 2 * 65536).unwrap();
    let e = v.write_at(&[1; 16], 2 * 65536).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(m.to_vec()[gd..gd + 512] == before[..], "the directory was overwritten");
    // Same for a grain aimed at a preallocated grain table (below overHead).
    let mut b = good.clone();
    b[gt0 + 12..gt0 + 16].copy_from_slice(&((gt0 / 512) as u32).to_le_bytes());
    let (v2, m2) = open_bytes(b, false).unwrap();
    let before = m2.to_vec()[gt0..gt0 + 2048].to_vec();
    let e = v2.write_at(&[1; 16], 3 * 65536).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(m2.to_vec()[gt0..gt0 + 2048] == before[..], "the grain table was overwritten");
    assert!(v.check().unwrap().errors > 0);
}

#[test]
fn truncated_images_fail_cleanly() {
    let mut samples = vec![("vdisk sparse", sample_sparse()), ("vdisk stream", sample_stream())];
    if common::have_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        common::write_model(&src, 2 * MIB, &[(0x42, 1000, 300_000)]);
        let q = dir.path().join("q.vmdk");
        common::run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                &src.display().to_string(),
                &q.display().to_string(),
            ],
        );
        samples.push(("qemu stream", std::fs::read(&q).unwrap()));
        let q2 = dir.path().join("q2.vmdk");
        common::run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "zeroed_grain=on",
                &src.display().to_string(),
                &q2.display().to_string(),
            ],
        );
        samples.push(("qemu sparse", std::fs::read(&q2).unwrap()));
    }
    for (name, img) in samples {
        let full = read_all(&open_bytes(img.clone(), true).unwrap().0).unwrap();
        let n = img.len();
        let mut cuts: Vec<usize> = (0..97).map(|i| n * i / 97).collect();
        cuts.extend([1, 4, 80, 511, 512, 513, 1024, 10_752, 11_264, 65_535, 65_536, n - 1536, n - 513, n - 1]);
        let mut errors = 0;
        for cut in cuts {
            let t = img[..cut.min(n)].to_vec();
            match open_bytes(t.clone(), true) {
                Err(_) => errors += 1,
                Ok((v, _)) => match read_all(&v) {
                    Err(_) => errors += 1,
                    // Grains that start inside the file but end past it read
                    // zeros for the missing part, as in QEMU.
                    Ok(data) => assert_eq!(data.len(), full.len(), "{name}"),
                },
            }
            // Writable open of the truncated copy must not panic either.
            if let Ok((v, _)) = open_bytes(t, false) {
                let _ = v.write_at(&[9u8; 65536], 0);
                let _ = v.flush();
            }
        }
        assert!(errors > 50, "{name}: only {errors} cuts failed");
    }
}

/// Opens stand-alone descriptor `text` with in-memory extent files.
fn open_desc(
    text: &[u8],
    files: &std::collections::HashMap<String, Arc<MemStorage>>,
    read_only: bool,
) -> vdisk::Result<Vmdk> {
    let d: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(text.to_vec()));
    let opener = |p: &std::path::Path, _ro: bool| -> vdisk::Result<Arc<dyn Storage>> {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        match files.get(&name) {
            Some(m) => Ok(m.clone() as Arc<dyn Storage>),
            None => Err(vdisk::Error::new(ErrorKind::NotFound, format!("no file {name}"))),
        }
    };
    Vmdk::open_with(d, VmdkOptions { read_only, ..Default::default() }, &opener)
}

#[test]
fn descriptor_corruption_table() {
    let mut files = std::collections::HashMap::new();
    files.insert("f.img".to_string(), Arc::new(MemStorage::new()));
    files.insert("s.vmdk".to_string(), Arc::new(MemStorage::from_vec(tiny_tables_image(2040, true))));
    files.insert("junk.vmdk".to_string(), Arc::new(MemStorage::from_vec(vec![7u8; 4096])));
    let mut cowd = vec![0u8; 4096];
    cowd[..4].copy_from_slice(b"COWD");
    files.insert("cowd.vmdk".to_string(), Arc::new(MemStorage::from_vec(cowd)));
    let head = "version=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"custom\"\n";
    let base = format!("{head}RW 2048 FLAT \"f.img\" 0\nRW 2040 SPARSE \"s.vmdk\"\n");
    let many: String = (0..1500).map(|_| "RW 1 FLAT \"f.img\" 0\n").collect();
    let long = format!("{base}{}", "# padding padding padding\n".repeat(200_000));
    let cases: Vec<(String, Option<ErrorKind>)> = vec![
        (base.clone(), None),
        (base.replace('\n', "\r\n"), None),
        (base.trim_end().to_string(), None),
        (format!("{head}RW 4096 SPARSE \"s.vmdk\"\n"), Some(ErrorKind::InvalidImage)),
        (format!("{head}RW 8 FLAT \"missing.img\" 0\n"), Some(ErrorKind::NotFound)),
        (format!("{head}RW 8 SPARSE \"junk.vmdk\"\n"), Some(ErrorKind::InvalidImage)),
        (format!("{head}RW 8 VMFSSPARSE \"cowd.vmdk\"\n"), Some(ErrorKind::Unsupported)),
        (format!("{head}RW 8 FLAT \"../f.img\" 0\n"), Some(ErrorKind::InvalidImage)),
        (format!("{head}RW 8 FLAT \"/f.img\" 0\n"), Some(ErrorKind::InvalidImage)),
        (format!("{head}RW 999999999999999 FLAT \"f.img\" 0\n"), Some(ErrorKind::LimitExceeded)),
        (format!("{head}{many}"), Some(ErrorKind::LimitExceeded)),
        (long, Some(ErrorKind::LimitExceeded)),
        (format!("{head}RW 8 FLAT \"f\u{e9}.img\" 0\n"), Some(ErrorKind::NotFound)),
        ("version=1\0createType=\"custom\"\nRW 8 FLAT \"f.img\" 0\n".to_string(), Some(ErrorKind::InvalidImage)),
        (head.to_string(), Some(ErrorKind::InvalidImage)),
        (format!("{head}RW 8 VMFSRAW \"f.img\"\n"), Some(ErrorKind::Unsupported)),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        match (open_desc(text.as_bytes(), &files, true), expect) {
            (Ok(v), None) => assert_eq!(v.size(), 4088 * 512, "case {i}"),
            (Err(e), Some(k)) => assert_eq!(e.kind(), *k, "case {i}: {e}"),
            (Ok(_), Some(k)) => panic!("case {i}: opened, expected {k:?}"),
            (Err(e), None) => panic!("case {i}: {e}"),
        }
    }
    let mut bad = base.clone().into_bytes();
    bad.extend_from_slice(b"ddb.x = \"\xff\"\n");
    assert_eq!(open_desc(&bad, &files, true).unwrap_err().kind(), ErrorKind::InvalidImage);
    // Mixed FLAT + SPARSE: a write across the boundary, reopened.
    let v = open_desc(base.as_bytes(), &files, false).unwrap();
    let b = 2048 * 512;
    v.write_at(&[0x3c; 10_000], b - 5000).unwrap();
    v.flush().unwrap();
    let cid = v.descriptor().cid();
    assert_ne!(cid, 1, "the first write gives a new CID");
    drop(v);
    let v = open_desc(base.as_bytes(), &files, true).unwrap();
    let mut r = vec![0u8; 10_002];
    v.read_at(&mut r, b - 5001).unwrap();
    assert_eq!(r[0], 0);
    assert!(r[1..10_001].iter().all(|&x| x == 0x3c));
    assert_eq!(r[10_001], 0);
}

/// A grain's table entry becomes visible only after its data is written:
/// a reader racing a writer sees each new grain either unallocated (zeros)
/// or complete, never half-written.
#[test]
fn new_grains_appear_whole_to_concurrent_readers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.vmdk");
    let grain = 65536usize;
    let grains = 256u64;
    let v = Arc::new(Vmdk::create(&path, grains * grain as u64, &VmdkCreateOptions::default()).unwrap());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (v, done) = (v.clone(), done.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; grain];
                let mut seen = 0u64;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    for g in (r..grains).step_by(2) {
                        v.read_at(&mut buf, g * grain as u64).unwrap();
                        let want = (g % 250) as u8 + 1;
                        let first = buf[0];
                        assert!(first == 0 || first == want, "grain {g}: byte {first}");
                        assert!(buf.iter().all(|&b| b == first), "grain {g} is half written");
                        seen += u64::from(first != 0);
                    }
                }
                seen
            })
        })
        .collect();
    for g in 0..grains {
        v.write_at(&vec![(g % 250) as u8 + 1; grain], g * grain as u64).unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    for r in readers {
        r.join().unwrap();
    }
    v.flush().unwrap();
    assert!(v.check().unwrap().is_clean());
}

/// Power loss at every point of a write + flush sequence: the image always
/// opens, data flushed before stays, and each new grain reads as either
/// its old content (zeros) or its new content.
#[test]
fn power_loss_keeps_flushed_data() {
    use vdisk::{FaultMode, FaultyStorage, Survivors};
    let base = sample_sparse();
    let grain = 65536u64;
    let mut total_ops = None;
    for budget in 0..200u64 {
        let f = Arc::new(FaultyStorage::new(base.clone(), Some(budget), FaultMode::PowerLoss));
        let s: Arc<dyn Storage> = f.clone();
        let Ok(v) = Vmdk::open(s, VmdkOptions::default()) else {
            continue;
        };
        let r = (|| -> vdisk::Result<()> {
            for g in 10..20u64 {
                v.write_at(&vec![g as u8; grain as usize], g * grain)?;
            }
            v.write_at(&[0x77; 100], 2 * MIB + 50)?;
            v.flush()
        })();
        drop(v);
        if r.is_ok() && !f.has_failed() {
            total_ops = Some(budget);
            break;
        }
        for seed in [Survivors::None, Survivors::All, Survivors::Some(budget * 7 + 1)] {
            let img = f.crashed_image(seed);
            let (v, _) = open_bytes(img, true).unwrap_or_else(|e| panic!("budget {budget}: {e}"));
            let mut b = vec![0u8; 70_000];
            v.read_at(&mut b, 1000).unwrap();
            assert!(b.iter().all(|&x| x == 0xaa), "budget {budget}: flushed data lost");
            for g in 10..20u64 {
                let mut gb = vec![0u8; grain as usize];
                v.read_at(&mut gb, g * grain).unwrap();
                let first = gb[0];
                assert!(first == 0 || first == g as u8, "budget {budget}: grain {g} reads {first}");
                assert!(gb.iter().all(|&x| x == first), "budget {budget}: grain {g} torn");
            }
        }
    }
    assert!(total_ops.is_some(), "the sequence never completed within 200 operations");
}
