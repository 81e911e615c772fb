//! Persistent dirty bitmaps, judged by QEMU: bitmaps QEMU made are
//! maintained by vdisk's writes (QEMU's own view of them through qemu-nbd
//! and nbdinfo equals the ranges written, rounded to the granularity),
//! bitmaps vdisk made are maintained by qemu-io, `vdisk bitmap` does what
//! `qemu-img bitmap` does, 32 writer threads lose no dirty bit, and a crash
//! at any write leaves the bitmaps `in_use` and nothing else wrong.

mod common;

use std::io::IoSlice;
use std::path::Path;
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{BlockDevice, FaultMode, FaultyStorage, MemStorage, Qcow2, Qcow2Options, Survivors, ZeroMode};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn have_nbdinfo() -> bool {
    std::process::Command::new("nbdinfo").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// QEMU's view of bitmap `name`: dirty ranges through qemu-nbd -B.
fn qemu_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let out = run(
        "nbdinfo",
        &[
            "--json",
            &format!("--map=qemu:dirty-bitmap:{name}"),
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            "-B",
            name,
            s(img),
            "]",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut r: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["type"].as_u64().unwrap() & 1 == 1 {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match r.last_mut() {
                Some(x) if x.0 + x.1 == o => x.1 += l,
                _ => r.push((o, l)),
            }
        }
    }
    r
}

/// The union of `writes` rounded out to `g`, clamped to `size`.
fn rounded(writes: &[(u64, u64)], g: u64, size: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> =
        writes.iter().map(|&(o, l)| (o / g * g, ((o + l).div_ceil(g) * g).min(size))).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(x) if x.1 >= a => x.1 = x.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out.into_iter().map(|(a, b)| (a, b - a)).collect()
}

fn vdisk_dirty(q: &Qcow2, name: &str) -> Vec<(u64, u64)> {
    q.bitmap_dirty_ranges(name, 0, u64::MAX).unwrap().ranges
}

fn open_q(img: &Path) -> Qcow2 {
    let st = Arc::new(vdisk::FileStorage::open(img, false).unwrap());
    Qcow2::open(st, Qcow2Options::default()).unwrap()
}

#[test]
fn bitmaps_qemu_made_are_maintained_by_every_vdisk_write_path() {
    if !have_qemu() || !have_nbdinfo() {
        eprintln!("skipped: qemu-img or nbdinfo missing");
        return;
    }
    let d = tmp();
    let img = p(d.path(), "a.qcow2");
    let size = 16u64 << 20;
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b64k"]);
    qemu_img(&["bitmap", "--add", "-g", "512", s(&img), "b512"]);
    qemu_img(&["bitmap", "--add", "--disable", s(&img), "off"]);
    // Earlier writes by QEMU are in the bitmaps already.
    run("qemu-io", &["-c", "write -P 3 12M 4k", s(&img)]);
    let q = open_q(&img);
    let writes = [(100_000u64, 5000u64), (1 << 20, 65536), (3 << 20, 131072), (5 << 20, 65536), (7 << 20, 3000)];
    q.write_at(&vec![1u8; 5000], 100_000).unwrap();
    q.write_zeroes(1 << 20, 65536, ZeroMode::MayUnmap).unwrap();
    q.discard(3 << 20, 131072).unwrap();
    q.write_compressed(&vec![7u8; 65536], 5 << 20).unwrap();
    let a = vec![2u8; 1000];
    let b = vec![3u8; 2000];
    q.write_vectored_at(&[IoSlice::new(&a), IoSlice::new(&b)], 7 << 20).unwrap();
    // While open, QEMU would see them in use.
    let info = qemu_img(&["info", "-U", "--output=json", s(&img)]);
    assert!(info.contains("in-use"), "{info}");
    q.close().unwrap();
    assert_qemu_clean(&img, "qcow2");
    let mut all = writes.to_vec();
    all.push((12 << 20, 4096));
    assert_eq!(qemu_dirty(&img, "b64k"), rounded(&all, 65536, size));
    assert_eq!(qemu_dirty(&img, "b512"), rounded(&all, 512, size));
    assert_eq!(qemu_dirty(&img, "off"), Vec::new());
    let info = qemu_img(&["info", "--output=json", s(&img)]);
    assert!(!info.contains("in-use"), "{info}");
    // And vdisk reads back what QEMU sees.
    let q = open_q(&img);
    assert_eq!(vdisk_dirty(&q, "b512"), rounded(&all, 512, size));
    drop(q);
    // Opening and closing without a write leaves the file untouched.
    let before = std::fs::read(&img).unwrap();
    open_q(&img).close().unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn a_bitmap_vdisk_added_is_maintained_by_qemu_and_managed_like_qemu_img() {
    if !have_qemu() || !have_nbdinfo() {
        eprintln!("skipped: qemu-img or nbdinfo missing");
        return;
    }
    let d = tmp();
    let q_img = p(d.path(), "q.qcow2");
    let v_img = p(d.path(), "v.qcow2");
    let other = p(d.path(), "other.qcow2");
    for i in [&q_img, &v_img, &other] {
        qemu_img(&["create", "-q", "-f", "qcow2", s(i), "8M"]);
    }
    qemu_img(&["bitmap", "--add", s(&other), "src"]);
    run("qemu-io", &["-c", "write 6M 8k", s(&other)]);
    // The same operations, through qemu-img on one copy and vdisk on the other.
    let steps: Vec<Vec<&str>> = vec![
        vec!["--add", "a"],
        vec!["--add", "-g", "4k", "--disable", "b"],
        vec!["--add", "--disable", "--enable", "c"],
        vec!["@write 0 4k", "@write 3M 70k"],
        vec!["--merge", "a", "b"],
        vec!["--clear", "a"],
        vec!["--enable", "b"],
        vec!["--merge", "src", "-b", "OTHER", "-F", "qcow2", "c"],
        vec!["@write 5M 512"],
        vec!["--add", "gone"],
        vec!["--remove", "gone"],
    ];
    for st in &steps {
        if st[0].starts_with('@') {
            for i in [&q_img, &v_img] {
                let cmds: Vec<String> = st.iter().map(|c| c[1..].to_string()).collect();
                qemu_io("qcow2", i, &cmds);
            }
            continue;
        }
        let name = st.last().unwrap();
        let ops: Vec<&str> = st[..st.len() - 1].iter().map(|&x| if x == "OTHER" { s(&other) } else { x }).collect();
        let mut qa = vec!["bitmap"];
        qa.extend(&ops);
        qa.extend([s(&q_img), name]);
        qemu_img(&qa);
        let mut va = vec!["bitmap"];
        va.extend(&ops);
        va.extend([s(&v_img), name]);
        let (code, out, err) = vdisk(&va);
        assert_eq!(code, 0, "{st:?}: {out}{err}");
    }
    let bitmaps = |i: &Path| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&qemu_img(&["info", "--output=json", s(i)])).unwrap();
        v["format-specific"]["data"]["bitmaps"].clone()
    };
    assert_eq!(bitmaps(&v_img), bitmaps(&q_img));
    for name in ["a", "b", "c"] {
        assert_eq!(qemu_dirty(&v_img, name), qemu_dirty(&q_img, name), "bitmap {name}");
    }
    // b took a's 64 KiB granules when a was merged in, then a 4 KiB one.
    let mut want = rounded(&[(0, 4096), (3 << 20, 70 << 10)], 65536, 8 << 20);
    want.push((5 << 20, 4096));
    assert_eq!(qemu_dirty(&v_img, "b"), want);
    assert_qemu_clean(&v_img, "qcow2");
    // --dump prints what QEMU sees.
    let (code, out, _) = vdisk(&["bitmap", "--dump", s(&v_img), "c"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dumped: Vec<(u64, u64)> = v["dirty"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dumped, qemu_dirty(&q_img, "c"));
    // Errors as qemu-img words them, exit code 1.
    for args in [vec!["--remove"], vec!["--add"], vec!["--clear"]] {
        let name = if args[0] == "--add" { "a" } else { "nope" };
        let mut va = vec!["bitmap"];
        va.extend(&args);
        va.extend([s(&v_img), name]);
        let (code, _, err) = vdisk(&va);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(name), "{err}");
    }
    let (code, _, _) = vdisk(&["bitmap", s(&v_img), "a"]);
    assert_ne!(code, 0);
    let v2 = p(d.path(), "v2.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", s(&v2), "1M"]);
    let (code, _, err) = vdisk(&["bitmap", "--add", s(&v2), "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("v2"), "{err}");
}

#[test]
fn convert_measure_resize_and_check_with_bitmaps() {
    if !have_qemu() || !have_nbdinfo() {
        eprintln!("skipped: qemu-img or nbdinfo missing");
        return;
    }
    let d = tmp();
    let img = p(d.path(), "src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "32M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "1k", "--disable", s(&img), "b1"]);
    run("qemu-io", &["-c", "write 1M 64k", "-c", "write 20M 1k", s(&img)]);
    qemu_img(&["bitmap", "--merge", "b0", s(&img), "b1"]);
    // measure prints the same bitmaps size.
    for o in ["cluster_size=65536", "cluster_size=4096", "cluster_size=2M"] {
        let q = qemu_img(&["measure", "--output=json", "-O", "qcow2", "-o", o, s(&img)]);
        let (code, v, err) = vdisk(&["measure", "--output=json", "-O", "qcow2", "-o", o, s(&img)]);
        assert_eq!(code, 0, "{err}");
        let qv: serde_json::Value = serde_json::from_str(&q).unwrap();
        let vv: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(vv["bitmaps"], qv["bitmaps"], "{o}");
        if o != "cluster_size=4096" {
            // (With clusters smaller than the source's, qemu-img counts only
            // the written part of a partly written source cluster.)
            assert_eq!(vv, qv, "{o}");
        }
    }
    // convert --bitmaps copies them.
    let out = p(d.path(), "out.qcow2");
    let (code, o, err) = vdisk(&["convert", "-O", "qcow2", "--bitmaps", s(&img), s(&out)]);
    assert_eq!(code, 0, "{o}{err}");
    assert_qemu_clean(&out, "qcow2");
    for b in ["b0", "b1"] {
        assert_eq!(qemu_dirty(&out, b), qemu_dirty(&img, b), "{b}");
    }
    let raw = p(d.path(), "out.raw");
    let (code, _, err) = vdisk(&["convert", "-O", "raw", "--bitmaps", s(&img), s(&raw)]);
    assert_eq!(code, 1, "{err}");
    // Resize keeps them (grown bits clear, cut bits gone), as QEMU does.
    let q = open_q(&out);
    q.resize(48 << 20).unwrap();
    q.write_at(&[1u8; 512], 40 << 20).unwrap();
    q.close().unwrap();
    assert_qemu_clean(&out, "qcow2");
    let want = rounded(&[(1 << 20, 65536), (20 << 20, 1024), (40 << 20, 512)], 65536, 48 << 20);
    assert_eq!(qemu_dirty(&out, "b0"), want);
    let q = open_q(&out);
    q.resize_with(16 << 20, true).unwrap();
    q.close().unwrap();
    assert_qemu_clean(&out, "qcow2");
    assert_eq!(qemu_dirty(&out, "b0"), vec![(1 << 20, 65536)]);
    assert_eq!(qemu_dirty(&out, "b1"), vec![(1 << 20, 65536)]);
}

/// Runs `writes` from `threads` threads at once on a fresh in-memory image
/// with one bitmap of granularity `g`, and returns its dirty ranges after a
/// close and reopen.
fn threaded(writes: &[(u64, u64)], threads: usize, g: u64) -> Vec<(u64, u64)> {
    let st = Arc::new(MemStorage::new());
    let q = Arc::new(Qcow2::create(st.clone(), &CreateOptions::new(8 << 20), Qcow2Options::default()).unwrap());
    q.bitmap_add("b", Some(g), true).unwrap();
    std::thread::scope(|sc| {
        for t in 0..threads {
            let q = q.clone();
            sc.spawn(move || {
                for (k, &(o, l)) in writes.iter().enumerate() {
                    if k % threads == t {
                        match k % 3 {
                            0 => q.write_at(&vec![k as u8; l as usize], o).unwrap(),
                            1 => q.write_zeroes(o, l, ZeroMode::MayUnmap).unwrap(),
                            _ => q.discard(o, l).unwrap(),
                        }
                    }
                }
            });
        }
    });
    Arc::try_unwrap(q).unwrap().close().unwrap();
    let q = Qcow2::open(Arc::new(MemStorage::from_vec(st.to_vec())), Qcow2Options::default()).unwrap();
    assert!(!q.bitmaps()[0].in_use);
    vdisk_dirty(&q, "b")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn thirty_two_writers_lose_no_dirty_bit(
        writes in proptest::collection::vec((0u64..(8 << 20) - 70_000, 1u64..70_000), 1..200),
        gbits in 9u32..18,
    ) {
        let g = 1u64 << gbits;
        let got = threaded(&writes, 32, g);
        prop_assert_eq!(got, rounded(&writes, g, 8 << 20));
    }
}

/// An image with one stored, enabled bitmap holding `(0, 4096)`.
fn base_image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(2 << 20);
    o.cluster_size = 4096;
    let q = Qcow2::create(st.clone(), &o, Qcow2Options::default()).unwrap();
    q.bitmap_add("b", Some(4096), true).unwrap();
    q.write_at(&[1u8; 4096], 0).unwrap();
    q.close().unwrap();
    st.to_vec()
}

#[test]
fn a_crash_at_any_write_leaves_the_bitmap_in_use_or_exact() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let base = base_image();
    let writes = [(0u64, 4096u64), (100_000, 8192), (1 << 20, 4096), (1_500_000, 70_000)];
    let full = rounded(&writes, 4096, 2 << 20);
    let mut budget = 0u64;
    loop {
        budget += 1;
        let fs = Arc::new(FaultyStorage::new(base.clone(), Some(budget), FaultMode::PowerLoss));
        let finished = (|| -> vdisk::Result<()> {
            let q = Qcow2::open(fs.clone(), Qcow2Options::default())?;
            for &(o, l) in &writes[1..] {
                q.write_at(&vec![9u8; l as usize], o)?;
            }
            q.flush()?;
            q.close()
        })()
        .is_ok();
        for (k, surv) in [Survivors::All, Survivors::None, Survivors::Some(budget)].into_iter().enumerate() {
            let bytes = fs.crashed_image(surv);
            let f = p(d.path(), &format!("crash-{budget}-{k}.qcow2"));
            std::fs::write(&f, &bytes).unwrap();
            let (code, out) = qemu_check(&f, "qcow2");
            assert!(code == 0 || code == 3, "budget {budget} {surv:?}: {out}");
            let q = Qcow2::open(Arc::new(MemStorage::from_vec(bytes)), Qcow2Options::default()).unwrap();
            let info = q.bitmaps();
            assert_eq!(info.len(), 1, "budget {budget}");
            if info[0].inconsistent {
                assert!(q.bitmap_dirty_ranges("b", 0, u64::MAX).is_err());
                assert!(q.bitmap_clear("b").is_err());
                q.bitmap_remove("b").unwrap();
                q.close().unwrap();
            } else {
                let got = vdisk_dirty(&q, "b");
                assert!(got == vec![(0, 4096)] || got == full, "budget {budget} {surv:?}: {got:?}");
            }
        }
        if finished {
            assert!(budget > 5);
            break;
        }
    }
}

#[test]
fn hostile_bitmap_directories_are_refused_with_an_error() {
    let base = base_image();
    let q = Qcow2::open(Arc::new(MemStorage::from_vec(base.clone()).read_only()), Qcow2Options::default()).unwrap();
    let h = q.header();
    let ext = h.bitmaps.unwrap();
    drop(q);
    let dir = ext.directory_offset as usize;
    // Each corruption of the directory entry: open fails with a message
    // naming the bitmap directory, never a panic.
    let cases: Vec<(usize, Vec<u8>)> = vec![
        (dir + 17, vec![40]),                     // granularity bits
        (dir + 12, vec![0xff, 0xff, 0xff, 0xfc]), // reserved flags
        (dir + 20, vec![0, 0, 0, 8]),             // extra data
        (dir + 8, vec![0, 0, 0, 0]),              // no table
        (dir + 8, vec![0x08, 0, 0, 0]),           // huge table
        (dir, vec![0, 0, 0, 0, 0, 0, 0x10, 1]),   // misaligned table
        (dir + 16, vec![2]),                      // type
        (dir + 18, vec![0xff, 0xff]),             // name runs past the directory
    ];
    for (off, bytes) in cases {
        let mut img = base.clone();
        img[off..off + bytes.len()].copy_from_slice(&bytes);
        let e = Qcow2::open(Arc::new(MemStorage::from_vec(img)), Qcow2Options::default()).unwrap_err();
        assert!(e.to_string().contains("bitmap"), "{off}: {e}");
    }
    // A bitmap table entry with reserved bits: the bitmap cannot be loaded.
    let mut img = base.clone();
    let q = Qcow2::open(Arc::new(MemStorage::from_vec(base.clone()).read_only()), Qcow2Options::default()).unwrap();
    let _ = q;
    let table = u64::from_be_bytes(img[dir..dir + 8].try_into().unwrap()) as usize;
    img[table] = 0xff;
    assert!(Qcow2::open(Arc::new(MemStorage::from_vec(img)), Qcow2Options::default()).is_err());
}

/// `vdisk serve -B NAME` offers `qemu:dirty-bitmap:NAME` as `qemu-nbd -B`
/// does, and a write through the export shows in it at once.
#[test]
fn serve_offers_a_bitmap_as_qemu_nbd_does() {
    if !have_qemu() || !have_nbdinfo() {
        eprintln!("skipped: qemu-img or nbdinfo missing");
        return;
    }
    let d = tmp();
    let img = p(d.path(), "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", s(&img), "b"]);
    run("qemu-io", &["-c", "write 4k 4k", "-c", "write 1M 100k", s(&img)]);
    let want = qemu_dirty(&img, "b");
    assert_eq!(want, vec![(4096, 4096), (1 << 20, 102400)]);
    let sock = p(d.path(), "s.sock");
    let mut server = std::process::Command::new(vdisk_bin())
        .args(["serve", "-t", "-f", "qcow2", "-B", "b", "-k", s(&sock), s(&img)])
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    let map = |uri: &str| -> Vec<(u64, u64)> {
        let out = run("nbdinfo", &["--json", "--map=qemu:dirty-bitmap:b", uri]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"].as_u64().unwrap() & 1 == 1)
            .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(map(&uri), want);
    run("qemu-io", &["-f", "raw", "-c", "write 6M 4k", &uri]);
    let mut after = want.clone();
    after.push((6 << 20, 4096));
    assert_eq!(map(&uri), after);
    server.kill().unwrap();
    let _ = server.wait();
}

fn with_bitmap(size: u64, cs: u64, g: u64) -> (Arc<MemStorage>, Qcow2) {
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(size);
    o.cluster_size = cs;
    let q = Qcow2::create(st.clone(), &o, Qcow2Options::default()).unwrap();
    q.bitmap_add("b", Some(g), true).unwrap();
    (st, q)
}

#[test]
fn bitmaps_and_empty_disks_are_refused_rather_than_stored_unloadable() {
    let st = Arc::new(MemStorage::new());
    let q = Qcow2::create(st, &CreateOptions::new(0), Qcow2Options::default()).unwrap();
    assert!(q.bitmap_add("b", None, true).is_err());
    let (_, q) = with_bitmap(1 << 20, 65536, 65536);
    assert!(q.resize(0).is_err());
    // A grow that would make a bitmap larger than a qcow2 bitmap may be
    // (512 MiB of data here: 4 TiB at 512-byte granularity) is refused; the
    // image stays as it was and opens again.
    let (st, q) = with_bitmap(1 << 40, 65536, 512);
    let e = q.resize(4 << 40).unwrap_err();
    assert!(e.to_string().contains("bitmap 'b'"), "{e}");
    assert_eq!(q.size(), 1 << 40);
    q.resize(2 << 40).unwrap();
    q.close().unwrap();
    let q = Qcow2::open(st, Qcow2Options::default()).unwrap();
    assert_eq!(q.bitmaps().len(), 1);
    assert_eq!(q.size(), 2 << 40);
}

/// A crash right after a resize (no guest write, so nothing had marked the
/// bitmaps before) leaves an image vdisk and QEMU open.
#[test]
fn a_crash_after_a_resize_leaves_loadable_bitmaps() {
    for (from, to) in [(2u64 << 20, 256u64 << 20), (256 << 20, 2 << 20)] {
        let (st, q) = with_bitmap(from, 4096, 4096);
        q.close().unwrap();
        let st = Arc::new(MemStorage::from_vec(st.to_vec()));
        let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
        q.resize_with(to, true).unwrap();
        let crashed = st.to_vec();
        std::mem::forget(q);
        let q = Qcow2::open(Arc::new(MemStorage::from_vec(crashed.clone())), Qcow2Options::default()).unwrap();
        assert!(q.bitmaps()[0].inconsistent, "{from} -> {to}");
        if have_qemu() {
            let d = tmp();
            let f = p(d.path(), "crashed.qcow2");
            std::fs::write(&f, &crashed).unwrap();
            qemu_img(&["info", s(&f)]);
        }
    }
}

/// Writes racing a grow into the new range keep their dirty bits.
#[test]
fn writes_racing_a_grow_keep_their_bits() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let base = 1u64 << 20;
    let (_st, q) = with_bitmap(base, 65536, 512);
    let q = Arc::new(q);
    for _ in 0..50 {
        let go = Arc::new(AtomicBool::new(false));
        let hs: Vec<_> = (0..4u64)
            .map(|k| {
                let (q, go) = (q.clone(), go.clone());
                std::thread::spawn(move || {
                    while !go.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                    let off = base + k * 4096;
                    while q.write_at(&[1u8; 512], off).is_err() {}
                    off
                })
            })
            .collect();
        go.store(true, Ordering::Relaxed);
        q.resize(base * 2).unwrap();
        for h in hs {
            let off = h.join().unwrap();
            assert!(!q.bitmap_dirty_ranges("b", off, 512).unwrap().ranges.is_empty(), "bit of {off} lost");
        }
        q.resize_with(base, true).unwrap();
    }
}

fn two_bitmaps(lazy: bool) -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(16 << 20);
    o.lazy_refcounts = lazy;
    let q = Qcow2::create(st.clone(), &o, Qcow2Options::default()).unwrap();
    q.bitmap_add("first", Some(65536), true).unwrap();
    q.bitmap_add("second", Some(65536), true).unwrap();
    q.write_at(&[1u8; 65536], 1 << 20).unwrap();
    q.close().unwrap();
    st.to_vec()
}

/// `check` and the lazy-refcount repair count every bitmap's clusters (a
/// miscount would free the second bitmap's, and guest data would land on
/// them).
#[test]
fn check_and_lazy_repair_count_every_bitmap() {
    let q =
        Qcow2::open(Arc::new(MemStorage::from_vec(two_bitmaps(false)).read_only()), Qcow2Options::default()).unwrap();
    let r = q.check(vdisk::qcow2::check::Repair::None).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
    // A crash with lazy refcounts, the repair on the next open, more writes,
    // the second bitmap removed, and more writes: nothing overwritten.
    let st = Arc::new(MemStorage::from_vec(two_bitmaps(true)));
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    q.write_at(&[2u8; 65536], 2 << 20).unwrap();
    let crashed = st.to_vec();
    std::mem::forget(q);
    let st = Arc::new(MemStorage::from_vec(crashed));
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    for k in 0..4u64 {
        q.write_at(&vec![10 + k as u8; 65536], (4 + k) << 20).unwrap();
    }
    q.bitmap_remove("second").unwrap();
    q.close().unwrap();
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    for k in 0..4u64 {
        q.write_at(&vec![100 + k as u8; 65536], (10 + k) << 20).unwrap();
    }
    for k in 0..4u64 {
        let mut b = vec![0u8; 65536];
        q.read_at(&mut b, (4 + k) << 20).unwrap();
        assert!(b.iter().all(|&x| x == 10 + k as u8), "guest data at {} overwritten", (4 + k) << 20);
    }
    q.close().unwrap();
    if have_qemu() {
        let d = tmp();
        let f = p(d.path(), "lazy.qcow2");
        std::fs::write(&f, st.to_vec()).unwrap();
        assert_qemu_clean(&f, "qcow2");
    }
}

/// A bitmap removed, then a guest write (which rewrites the directory
/// without it), then close: its clusters are freed, not leaked.
#[test]
fn a_removed_bitmap_is_freed_even_after_a_write() {
    let st = Arc::new(MemStorage::from_vec(two_bitmaps(false)));
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    q.bitmap_remove("second").unwrap();
    q.write_at(&[5u8; 4096], 3 << 20).unwrap();
    q.close().unwrap();
    let q = Qcow2::open(Arc::new(MemStorage::from_vec(st.to_vec()).read_only()), Qcow2Options::default()).unwrap();
    let r = q.check(vdisk::qcow2::check::Repair::None).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
    assert_eq!(q.bitmaps().len(), 1);
}

/// Bitmap names are bytes in qcow2 (QEMU does not require UTF-8): names
/// that are not UTF-8 are written back exactly as they were, and a long one
/// is measured in bytes, not in the characters that show it.
#[test]
fn bitmap_names_that_are_not_utf8_survive_a_write_session() {
    use std::os::unix::ffi::OsStrExt;
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let img = p(d.path(), "names.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let long = std::ffi::OsStr::from_bytes(&[0xffu8; 400]);
    for name in [latin1, long] {
        let st =
            std::process::Command::new("qemu-img").arg("bitmap").arg("--add").arg(&img).arg(name).status().unwrap();
        assert!(st.success());
    }
    let (code, out, err) = vdisk(&["io", "-c", "write -P 1 0 64k", s(&img)]);
    assert_eq!(code, 0, "{out}{err}");
    assert_qemu_clean(&img, "qcow2");
    for name in [latin1, long] {
        let st =
            std::process::Command::new("qemu-img").arg("bitmap").arg("--remove").arg(&img).arg(name).status().unwrap();
        assert!(st.success(), "qemu-img no longer finds a bitmap vdisk kept");
    }
}
