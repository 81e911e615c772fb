//! qcow2 read path against qemu: images made by qemu-img/qemu-io across the
//! feature matrix read back byte for byte as `qemu-img convert -O raw`
//! exports them, and `vdisk map` agrees with `qemu-img map` on data/zero.

mod common;

use std::path::Path;

use common::*;
use proptest::prelude::*;
use vdisk::{BlockDevice, Format};

/// A qemu-io script that exercises every kind of cluster: compressed
/// (written first: qemu 10.0.2 mis-accounts compressed writes after normal
/// allocations with 512-byte clusters), unaligned data straddling clusters,
/// zero clusters with and without a host cluster, discards, the last bytes.
fn script(cs: u64, size: u64, compressed: bool) -> Vec<String> {
    let mut s = Vec::new();
    if compressed {
        s.push(format!("write -c -P 0x11 {} {}", 2 * cs, 2 * cs));
        s.push(format!("write -c -P 0x12 {} {}", 16 * cs, cs));
    }
    s.push(format!("write -P 0x22 {} 300", cs - 100));
    s.push(format!("write -P 0x33 {} {}", 5 * cs + 7, 2 * cs + 1000));
    s.push(format!("write -P 0x44 {} {}", 10 * cs, 4 * cs));
    s.push(format!("write -z {} {}", 11 * cs, cs));
    s.push(format!("write -z -u {} {}", 12 * cs, cs));
    s.push(format!("discard {} {}", 13 * cs, cs));
    s.push(format!("write -z {} {}", 20 * cs, 2 * cs));
    s.push(format!("write -P 0x55 {} 700", size - 700));
    // A long write crossing L2-table boundaries for small clusters.
    s.push(format!("write -P 0x66 {} {}", 30 * cs + 3, 70_000));
    s
}

struct Case {
    name: &'static str,
    opts: &'static str,
    cs: u64,
    compressed: bool,
}

const CASES: &[Case] = &[
    Case { name: "v2-64k", opts: "compat=0.10", cs: 65536, compressed: true },
    Case { name: "v2-512", opts: "compat=0.10,cluster_size=512", cs: 512, compressed: false },
    Case { name: "v3-512-rc1", opts: "cluster_size=512,refcount_bits=1", cs: 512, compressed: true },
    Case { name: "v3-4k-rc64", opts: "cluster_size=4096,refcount_bits=64", cs: 4096, compressed: true },
    Case { name: "v3-64k-rc16", opts: "cluster_size=65536", cs: 65536, compressed: true },
    Case { name: "v3-2m", opts: "cluster_size=2M", cs: 2 << 20, compressed: true },
    Case { name: "v3-zstd", opts: "compression_type=zstd", cs: 65536, compressed: true },
    Case {
        name: "v3-zstd-4k",
        opts: "compression_type=zstd,cluster_size=4096,refcount_bits=2",
        cs: 4096,
        compressed: true,
    },
    Case { name: "v3-extl2-64k", opts: "extended_l2=on", cs: 65536, compressed: true },
    Case { name: "v3-extl2-16k", opts: "extended_l2=on,cluster_size=16k", cs: 16384, compressed: false },
    Case { name: "v3-prealloc-meta", opts: "preallocation=metadata,cluster_size=4096", cs: 4096, compressed: false },
    Case { name: "v3-lazy", opts: "lazy_refcounts=on,refcount_bits=8", cs: 65536, compressed: true },
];

fn make(dir: &Path, c: &Case) -> (std::path::PathBuf, u64) {
    let size = (8u64 << 20).max(40 * c.cs);
    let img = p(dir, &format!("{}.qcow2", c.name));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", c.opts, img.to_str().unwrap(), &size.to_string()]);
    qemu_io("qcow2", &img, &script(c.cs, size, c.compressed));
    (img, size)
}

fn vdisk_map_json(img: &Path) -> String {
    let (code, out, err) = vdisk(&["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()]);
    assert_eq!(code, 0, "vdisk map failed: {err}");
    out
}

fn check_map(img: &Path, fmt: &str, size: u64) {
    let q = qemu_img(&["map", "--output=json", "-f", fmt, img.to_str().unwrap()]);
    let v = vdisk_map_json(img);
    let (cq, cv) = (map_classes(&q, size, 512), map_classes(&v, size, 512));
    if let Some(i) = cq.iter().zip(&cv).position(|(a, b)| a != b) {
        panic!("{}: map disagrees at {:#x}:\nqemu:\n{q}\nvdisk:\n{v}", img.display(), i as u64 * 512);
    }
}

#[test]
fn matrix_reads_equal_qemu_export() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    for c in CASES {
        let (img, size) = make(dir.path(), c);
        let want = qemu_export(&img, "qcow2");
        let dev = open_ro(&img, Format::Qcow2);
        assert_eq!(dev.size(), size);
        let got = read_all(&dev);
        assert_same(c.name, &got, &want);
        check_map(&img, "qcow2", size);
    }
}

#[test]
fn convert_to_raw_matches_qemu_byte_for_byte() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    for c in CASES.iter().filter(|c| ["v2-64k", "v3-4k-rc64", "v3-zstd", "v3-extl2-64k"].contains(&c.name)) {
        let (img, _) = make(dir.path(), c);
        let want = qemu_export(&img, "qcow2");
        let out = p(dir.path(), &format!("{}.out.raw", c.name));
        let (code, _, err) =
            vdisk(&["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert_same(c.name, &std::fs::read(&out).unwrap(), &want);
        // Holes are kept: far less is allocated than the virtual size.
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&out).unwrap();
        assert!(md.blocks() * 512 < md.len() / 2, "{}: output is not sparse", c.name);
        let (code, stdout, _) =
            vdisk(&["compare", "-f", "qcow2", "-F", "raw", img.to_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(code, 0, "{stdout}");
    }
}

/// raw base <- qcow2 mid <- qcow2 top (larger than the base), plus an
/// extended-L2 overlay whose partially written clusters show the backing
/// data in unwritten subclusters.
fn make_chain(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = p(dir, "base.raw");
    let mid = p(dir, "mid.qcow2");
    let top = p(dir, "top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "4M"]);
    qemu_io("raw", &base, &["write -P 0xa1 0 1M".into(), "write -P 0xa2 3000000 500000".into()]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "-o",
        "cluster_size=4096",
        mid.to_str().unwrap(),
        "6M",
    ]);
    qemu_io(
        "qcow2",
        &mid,
        &[
            "write -P 0xb1 4095 5000".into(),
            "write -z 65536 65536".into(),
            "write -P 0xb2 4000000 300000".into(),
            "discard 8192 4096".into(),
        ],
    );
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top.to_str().unwrap(), "8M"]);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0xc1 100000 200000".into(),
            "write -c -P 0xc2 1048576 65536".into(),
            "write -z 2097152 65536".into(),
            "write -P 0xc3 7000000 10".into(),
        ],
    );
    let ext = p(dir, "ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "-o",
        "extended_l2=on",
        ext.to_str().unwrap(),
        "6M",
    ]);
    qemu_io(
        "qcow2",
        &ext,
        &["write -P 0xd1 2048 2048".into(), "write -P 0xd2 70000 100".into(), "write -z 200704 4096".into()],
    );
    (top, ext)
}

#[test]
fn backing_chain_reads_equal_qemu_export() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let (top, ext) = make_chain(dir.path());
    for img in [&top, &ext] {
        let want = qemu_export(img, "qcow2");
        let dev = open_ro(img, Format::Qcow2);
        assert_same(&img.display().to_string(), &read_all(&dev), &want);
        check_map(img, "qcow2", dev.size());
    }
    // The chain is reported, depth by depth.
    let dev = open_ro(&top, Format::Qcow2);
    let mut depth = 0;
    let mut cur: Option<&dyn BlockDevice> = Some(&dev);
    while let Some(d) = cur {
        depth += 1;
        cur = d.backing();
    }
    assert_eq!(depth, 3);
}

#[test]
fn external_data_file() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    for raw in ["off", "on"] {
        let img = p(dir.path(), &format!("df-{raw}.qcow2"));
        let data = p(dir.path(), &format!("df-{raw}.data"));
        let opts = format!("data_file={},data_file_raw={raw}", data.display());
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, img.to_str().unwrap(), "4M"]);
        qemu_io("qcow2", &img, &["write -P 0x77 1000 100000".into(), "write -z 300000 65536".into()]);
        let want = qemu_export(&img, "qcow2");
        let dev = open_ro(&img, Format::Qcow2);
        assert_same("data file", &read_all(&dev), &want);
        // With backing policy Never the data file is not opened and reads fail.
        let never = vdisk::OpenOptions::new()
            .format(Format::Qcow2)
            .read_only(true)
            .backing(vdisk::BackingPolicy::Never)
            .open(&img)
            .unwrap();
        let mut b = [0u8; 16];
        assert!(never.read_at(&mut b, 1000).is_err());
    }
}

fn prop_image() -> &'static (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    use std::sync::OnceLock;
    static IMG: OnceLock<(tempfile::TempDir, std::path::PathBuf, Vec<u8>)> = OnceLock::new();
    IMG.get_or_init(|| {
        let dir = tmp();
        let (top, _) = make_chain(dir.path());
        let want = qemu_export(&top, "qcow2");
        (dir, top, want)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// Random reads, including empty and one-byte ones and ranges crossing
    /// cluster, L2-table and backing-image boundaries, equal the export.
    #[test]
    fn random_reads_equal_export(off in 0u64..(8 << 20), len in prop_oneof![Just(0u64), Just(1u64), 0u64..5000, 0u64..300_000]) {
        if !have_qemu() {
            return Ok(());
        }
        let (_, top, want) = prop_image();
        let dev = open_ro(top, Format::Qcow2);
        let size = dev.size();
        let off = off.min(size);
        let len = len.min(size - off);
        let mut buf = vec![0u8; len as usize];
        dev.read_at(&mut buf, off).unwrap();
        prop_assert_eq!(&buf[..], &want[off as usize..(off + len) as usize]);
        // Past the end is an error.
        let mut one = [0u8; 1];
        prop_assert!(dev.read_at(&mut one, size).is_err());
    }
}
