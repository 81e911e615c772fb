//! vmdk interop with QEMU 10 (`qemu-img`, `qemu-io`): images QEMU makes
//! read the same in vdisk, and images vdisk makes or writes read the same
//! in QEMU and pass `qemu-img check`.

#[path = "vmdk_common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vdisk::vmdk::{AdapterType, Subformat, VmdkCreateOptions};
use vdisk::{BlockDevice, ErrorKind, ExtentKind, Vmdk, ZeroMode};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const GRAIN: u64 = 64 << 10;

/// Unaligned writes that straddle grain boundaries (and the end).
fn small_writes(size: u64) -> Vec<Write> {
    vec![
        (0x11, 0, 300),
        (0x22, GRAIN - 100, 300),
        (0x33, 3 * GRAIN + 7, 2 * GRAIN + 1000),
        (0x44, 32 * MIB - 513, 1026), // crosses a grain-table boundary
        (0x55, size - 4097, 4097),
    ]
}

/// Writes around the 2 GiB extent boundary.
fn boundary_writes(size: u64) -> Vec<Write> {
    let mut w = small_writes(size);
    w.push((0x66, 2 * GIB - 5000, 10000));
    w.push((0x77, 2 * GIB + GRAIN - 3, 6));
    w
}

fn qemu_create(path: &Path, size: u64, opts: &str) {
    let s = size.to_string();
    let p = path.display().to_string();
    if opts.is_empty() {
        run("qemu-img", &["create", "-q", "-f", "vmdk", &p, &s]);
    } else {
        run("qemu-img", &["create", "-q", "-f", "vmdk", "-o", opts, &p, &s]);
    }
}

#[test]
fn qemu_made_images_read_the_same() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let small = 40 * MIB + 512;
    let big = 2 * GIB + 3 * MIB;
    let cases: &[(&str, u64)] = &[
        ("subformat=monolithicSparse", small),
        ("subformat=monolithicSparse,zeroed_grain=on", small),
        ("subformat=monolithicSparse,compat6=on,adapter_type=lsilogic", small),
        ("subformat=monolithicFlat,adapter_type=buslogic", small),
        ("subformat=twoGbMaxExtentSparse", big),
        ("subformat=twoGbMaxExtentSparse,zeroed_grain=on,adapter_type=legacyESX", big),
        ("subformat=twoGbMaxExtentFlat,hwversion=7", big),
    ];
    for (i, (opts, size)) in cases.iter().enumerate() {
        let img = p(dir.path(), &format!("q{i}.vmdk"));
        qemu_create(&img, *size, opts);
        let writes = if *size > 2 * GIB { boundary_writes(*size) } else { small_writes(*size) };
        let mut cmds = qemu_writes(&writes);
        // Zero writes: zeroed-grain entries where the image has the flag.
        cmds.push(format!("write -z {} {}", 8 * GRAIN, 2 * GRAIN));
        cmds.push(format!("write -z {} {}", 3 * GRAIN + 50, 100));
        qemu_io(&img, &cmds);
        let wins: Vec<(u64, u64)> = writes.iter().map(|(_, o, l)| (o.saturating_sub(GRAIN), l + 2 * GRAIN)).collect();
        assert_reads_like_qemu(&img, dir.path(), &wins);
        let v = open_vmdk(&img, true);
        let info = v.info();
        let vdisk::device::FormatDetails::Vmdk(d) = info.details else { panic!("no vmdk details") };
        let sub = opts.split(',').next().unwrap().trim_start_matches("subformat=");
        assert_eq!(d.create_type, sub, "{opts}");
        assert_eq!(d.parent_cid, 0xffff_ffff);
        assert!(!d.extents.is_empty());
        if opts.contains("zeroed_grain=on") {
            let e = v.map(8 * GRAIN, 2 * GRAIN).unwrap();
            assert_eq!(e.kind, ExtentKind::Zero { host_offset: None }, "{opts}");
            assert_eq!(e.length, 2 * GRAIN);
        }
        if sub.contains("Sparse") {
            let vdisk::Image::Vmdk(vm) = &v else { panic!("not a vmdk") };
            let r = vm.check().unwrap();
            assert!(r.is_clean(), "{opts}: {:?}", r.messages);
            assert!(r.allocated_grains > 0);
        }
    }
}

#[test]
fn qemu_stream_optimized_reads_the_same() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let size = 20 * MIB + 1536; // last grain partial
    let src = p(dir.path(), "src.raw");
    let mut writes = small_writes(size);
    writes.push((0x99, 5 * MIB, 3 * MIB)); // long run
    write_model(&src, size, &writes);
    let img = p(dir.path(), "s.vmdk");
    run(
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
            &img.display().to_string(),
        ],
    );
    assert_reads_like_qemu(&img, dir.path(), &[]);
    let v = open_vmdk(&img, true);
    let e = v.map(0, GRAIN).unwrap();
    assert!(matches!(e.kind, ExtentKind::Compressed { .. }), "{e:?}");
    let e = v.map(20 * GRAIN, GRAIN).unwrap();
    assert_eq!(e.kind, ExtentKind::Unallocated);
    // QEMU's own layout can be appended to: write an unwritten grain.
    drop(v);
    let v = open_vmdk(&img, false);
    let g = vec![0xabu8; GRAIN as usize];
    v.write_at(&g, 300 * GRAIN).unwrap();
    let e = v.write_at(&g, 300 * GRAIN).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let e = v.write_at(&g[..100], 200 * GRAIN).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    v.flush().unwrap();
    drop(v);
    writes.push((0xab, 300 * GRAIN, GRAIN));
    write_model(&src, size, &writes);
    qemu_compare_raw(&img, &src);
    qemu_check_clean(&img);
}

fn create_opts(s: &str) -> VmdkCreateOptions {
    VmdkCreateOptions::parse(s).unwrap()
}

/// Descriptor text without its CID line (random on both sides).
fn desc_without_cid(text: &str) -> String {
    text.lines().filter(|l| !l.starts_with("CID=")).collect::<Vec<_>>().join("\n")
}

fn read_desc(path: &Path) -> String {
    let b = std::fs::read(path).unwrap();
    if b.starts_with(b"KDMV") {
        let d = &b[512..512 * 21];
        let end = d.iter().position(|&x| x == 0).unwrap_or(d.len());
        String::from_utf8(d[..end].to_vec()).unwrap()
    } else {
        String::from_utf8(b).unwrap()
    }
}

#[test]
fn created_images_match_qemu_img_create() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, u64)] = &[
        ("subformat=monolithicSparse", 4 * MIB),
        ("subformat=monolithicSparse,zeroed_grain=on,adapter_type=lsilogic", 100 * MIB + 512),
        ("subformat=monolithicFlat,compat6=on", 3 * MIB),
        ("subformat=twoGbMaxExtentSparse,adapter_type=buslogic", 5 * GIB),
        ("subformat=twoGbMaxExtentFlat,adapter_type=legacyESX,hwversion=7", 2 * GIB + MIB),
    ];
    for (i, (opts, size)) in cases.iter().enumerate() {
        let sub = p(dir.path(), &format!("q{i}"));
        let mine = p(dir.path(), &format!("m{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::create_dir_all(&mine).unwrap();
        let q = sub.join("disk.vmdk");
        let m = mine.join("disk.vmdk");
        qemu_create(&q, *size, opts);
        let v = Vmdk::create(&m, *size, &create_opts(opts)).unwrap();
        v.flush().unwrap();
        drop(v);
        assert_eq!(desc_without_cid(&read_desc(&q)), desc_without_cid(&read_desc(&m)), "{opts}");
        let mut qnames: Vec<_> = std::fs::read_dir(&sub).unwrap().map(|e| e.unwrap().file_name()).collect();
        let mut mnames: Vec<_> = std::fs::read_dir(&mine).unwrap().map(|e| e.unwrap().file_name()).collect();
        qnames.sort();
        mnames.sort();
        assert_eq!(qnames, mnames, "{opts}");
        for n in &qnames {
            let a = std::fs::read(sub.join(n)).unwrap();
            let b = std::fs::read(mine.join(n)).unwrap();
            if n == "disk.vmdk" && !a.starts_with(b"KDMV") {
                continue; // the descriptor, compared above (its CID may differ in length)
            }
            assert_eq!(a.len(), b.len(), "{opts}: length of {n:?}");
            if a.starts_with(b"KDMV") {
                // Header and directories equal; descriptor area differs in CID only.
                assert_eq!(a[..512], b[..512], "{opts}: header of {n:?}");
                assert_eq!(a[21 * 512..], b[21 * 512..], "{opts}: tables of {n:?}");
            }
        }
        if opts.contains("Sparse") {
            qemu_check_clean(&m);
        }
    }
    // streamOptimized uses VMware's footer layout instead of QEMU's: a fresh
    // one (no grains yet) must already be a valid stream for QEMU.
    let st = p(dir.path(), "fresh-stream.vmdk");
    let v = Vmdk::create(&st, 10 * MIB + 512, &create_opts("subformat=streamOptimized,adapter_type=lsilogic")).unwrap();
    drop(v);
    qemu_check_clean(&st);
    assert_reads_like_qemu(&st, dir.path(), &[]);
    let info = run("qemu-img", &["info", "-f", "vmdk", &st.display().to_string()]);
    assert!(info.contains("create type: streamOptimized"), "{info}");
    assert!(info.contains("compressed: true"), "{info}");
}

#[test]
fn vdisk_writes_read_back_in_qemu() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let small = 40 * MIB + 512;
    let big = 2 * GIB + 3 * MIB;
    let cases: &[(&str, u64)] = &[
        ("subformat=monolithicSparse", small),
        ("subformat=monolithicSparse,zeroed_grain=on", small),
        ("subformat=monolithicFlat", small),
        ("subformat=twoGbMaxExtentSparse,zeroed_grain=on", big),
        ("subformat=twoGbMaxExtentFlat", big),
    ];
    for (i, (opts, size)) in cases.iter().enumerate() {
        let img = p(dir.path(), &format!("w{i}.vmdk"));
        let model = p(dir.path(), &format!("w{i}.raw"));
        let mut writes = if *size > 2 * GIB { boundary_writes(*size) } else { small_writes(*size) };
        // Overwrite inside already allocated grains, and a big write.
        writes.push((0xa1, GRAIN - 50, 10));
        writes.push((0xa2, 10 * MIB + 3, 3 * MIB));
        let v = Vmdk::create(&img, *size, &create_opts(opts)).unwrap();
        for (pat, o, l) in &writes {
            v.write_at(&vec![*pat; *l as usize], *o).unwrap();
        }
        // Zero a whole grain and a partial one.
        v.write_zeroes(10 * MIB + GRAIN, 2 * GRAIN, ZeroMode::MayUnmap).unwrap();
        v.write_zeroes(GRAIN - 60, 20, ZeroMode::MayUnmap).unwrap();
        writes.push((0, 10 * MIB + GRAIN, 2 * GRAIN));
        writes.push((0, GRAIN - 60, 20));
        if opts.contains("zeroed_grain=on") {
            let e = v.map(10 * MIB + GRAIN, 2 * GRAIN).unwrap();
            assert_eq!(e.kind, ExtentKind::Zero { host_offset: None }, "{opts}");
        }
        v.flush().unwrap();
        let r = v.check().unwrap();
        assert!(r.is_clean(), "{opts}: {:?}", r.messages);
        drop(v);
        write_model(&model, *size, &writes);
        qemu_compare_raw(&img, &model);
        if opts.contains("Sparse") {
            qemu_check_clean(&img);
        }
        // Reopened through open(): the same content.
        let v = open_vmdk(&img, true);
        let m = vdisk::Raw::open(Arc::new(vdisk::FileStorage::open(&model, true).unwrap())).unwrap();
        assert_eq!(vdisk::convert::compare(&v, &m, true).unwrap(), None, "{opts}");
    }
}

#[test]
fn stream_optimized_written_by_vdisk() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let size = 12 * MIB + 512 * 3; // partial last grain
    let img = p(dir.path(), "st.vmdk");
    let model = p(dir.path(), "st.raw");
    let src_path = p(dir.path(), "src.raw");
    let mut writes: Vec<Write> = vec![(0x10, 0, GRAIN), (0x20, 5 * GRAIN, 4 * GRAIN), (0x30, 100 * GRAIN, 10 * GRAIN)];
    write_model(&src_path, size, &writes);
    // Compress on several threads through convert.
    let src = vdisk::Raw::open(Arc::new(vdisk::FileStorage::open(&src_path, true).unwrap())).unwrap();
    let v = Vmdk::create(&img, size, &create_opts("subformat=streamOptimized")).unwrap();
    let opts = vdisk::convert::ConvertOptions { threads: 3, unit: 4 * GRAIN, compress: true, ..Default::default() };
    vdisk::convert::convert(&src, &v, &opts).unwrap();
    // The last, partial grain.
    let tail = size - size % GRAIN;
    v.write_compressed(&vec![0x40; (size - tail) as usize], tail).unwrap();
    writes.push((0x40, tail, size - tail));
    v.flush().unwrap();
    drop(v);
    write_model(&model, size, &writes);
    qemu_compare_raw(&img, &model);
    qemu_check_clean(&img);
    // Footer layout: header says GD_AT_END, the file ends with footer + EOS.
    let b = std::fs::read(&img).unwrap();
    assert_eq!(&b[56..64], &[0xff; 8]);
    let n = b.len();
    assert_eq!(&b[n - 512..], &[0u8; 512][..]);
    assert_eq!(u32::from_le_bytes(b[n - 1536 + 12..n - 1536 + 16].try_into().unwrap()), 3);
    assert_eq!(&b[n - 1024..n - 1020], b"KDMV");
    // Reopen, append more grains, flush again: both layouts still agree.
    let v = open_vmdk(&img, false);
    v.write_at(&vec![0x50; 2 * GRAIN as usize], 150 * GRAIN).unwrap();
    assert_eq!(v.write_at(&vec![1; GRAIN as usize], 0).unwrap_err().kind(), ErrorKind::Unsupported);
    v.flush().unwrap();
    drop(v);
    writes.push((0x50, 150 * GRAIN, 2 * GRAIN));
    write_model(&model, size, &writes);
    qemu_compare_raw(&img, &model);
    qemu_check_clean(&img);
    assert_reads_like_qemu(&img, dir.path(), &[]);
}

/// A VMware-style stream file built by hand: grains out of order, a grain
/// table marker + table, a directory marker + directory, footer, EOS.
#[test]
fn hand_built_vmware_stream_layout() {
    require_qemu!();
    use vdisk::vmdk::header::*;
    let deflate = |data: &[u8]| {
        vdisk::testing::codec::compress(
            vdisk::testing::codec::Codec::Zlib,
            data,
            vdisk::testing::codec::deflate_bound(data.len()),
        )
        .map(|z| z.expect("fits the bound"))
    };
    let dir = tempfile::tempdir().unwrap();
    let capacity = 2048u64; // 1 MiB, 8 grains of 128 sectors (gtes 4 → 2 tables)
    let h = SparseHeader {
        version: 3,
        flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity,
        grain_size: 128,
        descriptor_offset: 1,
        descriptor_size: 2,
        num_gtes_per_gt: 4,
        rgd_offset: 0,
        gd_offset: GD_AT_END,
        overhead: 3,
        unclean_shutdown: 0,
        nl_bytes: NL_BYTES,
        compress_algorithm: COMPRESSION_DEFLATE,
    };
    let mut f = h.encode().to_vec();
    let desc = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\nRW 2048 SPARSE \"vm.vmdk\"\n\nddb.adapterType = \"lsilogic\"\n";
    let mut d = desc.as_bytes().to_vec();
    d.resize(1024, 0);
    f.extend_from_slice(&d);
    let mut gt = [0u32; 8];
    let mut model = vec![0u8; (capacity * 512) as usize];
    for grain in [5u64, 0, 2] {
        let data: Vec<u8> = (0..65536u32).map(|i| (i as u8) ^ (grain as u8 * 37)).collect();
        model[(grain * 65536) as usize..][..65536].copy_from_slice(&data);
        let z = deflate(&data).unwrap();
        gt[grain as usize] = (f.len() / 512) as u32;
        f.extend_from_slice(&(grain * 128).to_le_bytes());
        f.extend_from_slice(&(z.len() as u32).to_le_bytes());
        f.extend_from_slice(&z);
        f.resize(f.len().div_ceil(512) * 512, 0);
    }
    let mut gd = [0u32; 2];
    for t in 0..2 {
        f.extend_from_slice(&encode_metadata_marker(1, MARKER_GT));
        gd[t] = (f.len() / 512) as u32;
        let mut s = [0u8; 512];
        for i in 0..4 {
            s[i * 4..i * 4 + 4].copy_from_slice(&gt[t * 4 + i].to_le_bytes());
        }
        f.extend_from_slice(&s);
    }
    f.extend_from_slice(&encode_metadata_marker(1, MARKER_GD));
    let gd_sector = f.len() / 512;
    let mut s = [0u8; 512];
    s[..4].copy_from_slice(&gd[0].to_le_bytes());
    s[4..8].copy_from_slice(&gd[1].to_le_bytes());
    f.extend_from_slice(&s);
    f.extend_from_slice(&encode_metadata_marker(1, MARKER_FOOTER));
    let mut footer = h;
    footer.gd_offset = gd_sector as u64;
    f.extend_from_slice(&footer.encode());
    f.extend_from_slice(&[0u8; 512]);
    let img = p(dir.path(), "vm.vmdk");
    std::fs::write(&img, &f).unwrap();
    let v = open_vmdk(&img, true);
    let mut got = vec![0u8; model.len()];
    v.read_at(&mut got, 0).unwrap();
    assert!(got == model, "vdisk misreads the VMware stream layout");
    let vdisk::device::FormatDetails::Vmdk(dt) = v.info().details else { panic!() };
    assert_eq!(dt.cid, 0x12345678);
    assert!(dt.extents[0].compressed);
    assert_reads_like_qemu(&img, dir.path(), &[]);
}

#[test]
fn delta_links() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let parent = p(dir.path(), "parent.vmdk");
    let child = p(dir.path(), "child.vmdk");
    qemu_create(&parent, size, "");
    let pw: Vec<Write> = vec![(0x61, 0, 3 * GRAIN), (0x62, 2 * MIB - 10, 20)];
    qemu_io(&parent, &qemu_writes(&pw));
    run("qemu-img", &["create", "-q", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk", &child.display().to_string()]);
    let cw: Vec<Write> = vec![(0x71, GRAIN + 100, 50)];
    qemu_io(&child, &qemu_writes(&cw));
    assert_reads_like_qemu(&child, dir.path(), &[]);
    let v = open_vmdk(&child, true);
    assert_eq!(v.info().backing_file.as_deref(), Some("parent.vmdk"));
    let e = v.map(0, GRAIN).unwrap();
    assert_eq!(e.depth, 1, "{e:?}");
    assert!(matches!(e.kind, ExtentKind::Data { .. }));
    let e = v.map(GRAIN, GRAIN).unwrap();
    assert_eq!(e.depth, 0);
    drop(v);
    // vdisk writes into the child: partial grains copy the parent's data.
    let v = open_vmdk(&child, false);
    v.write_at(&[0x81; 10], 2 * GRAIN + 5).unwrap();
    v.write_at(&[0x82; 10], 2 * MIB - 5).unwrap();
    v.flush().unwrap();
    drop(v);
    let model = p(dir.path(), "model.raw");
    let mut all = pw.clone();
    all.extend(&cw);
    all.push((0x81, 2 * GRAIN + 5, 10));
    all.push((0x82, 2 * MIB - 5, 10));
    write_model(&model, size, &all);
    qemu_compare_raw(&child, &model);
    qemu_check_clean(&child);
    // A child vdisk creates reads through to the parent in qemu.
    let c2 = p(dir.path(), "child2.vmdk");
    let v = vdisk::OpenOptions::new()
        .create_vmdk(&c2, 0, &create_opts("backing_file=parent.vmdk,zeroed_grain=on"))
        .unwrap();
    assert_eq!(v.size(), size);
    v.write_at(&[0x91; 3], GRAIN - 1).unwrap();
    v.flush().unwrap();
    drop(v);
    let mut all2 = pw.clone();
    all2.push((0x91, GRAIN - 1, 3));
    write_model(&model, size, &all2);
    qemu_compare_raw(&c2, &model);
    qemu_check_clean(&c2);
    // Writing the parent changes its CID: the children's parentCID no
    // longer matches. Reads go on (with the mismatch reported), writes stop.
    qemu_io(&parent, &qemu_writes(&[(0x63, 7 * MIB, 512)]));
    let v = open_vmdk(&c2, false);
    let vdisk::device::FormatDetails::Vmdk(d) = v.info().details else { panic!() };
    assert!(d.parent_cid_mismatch);
    let mut b = [0u8; 3];
    v.read_at(&mut b, GRAIN - 1).unwrap();
    assert_eq!(b, [0x91; 3]);
    let e = v.write_at(&[1], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.to_string().contains("parent CID mismatch"), "{e}");
    // BackingPolicy::Never: info works, reads that need the parent fail.
    let v = vdisk::OpenOptions::new()
        .format(vdisk::Format::Vmdk)
        .read_only(true)
        .backing(vdisk::BackingPolicy::Never)
        .open(&child)
        .unwrap();
    let mut b = [0u8; 4];
    assert_eq!(v.read_at(&mut b, 0).unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn qcow2_over_vmdk_backing() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let base = p(dir.path(), "base.vmdk");
    qemu_create(&base, 4 * MIB, "subformat=monolithicFlat");
    qemu_io(&base, &qemu_writes(&[(0x5a, 1000, 70000)]));
    let ov = p(dir.path(), "ov.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", &ov.display().to_string()]);
    let img = vdisk::OpenOptions::new().format(vdisk::Format::Qcow2).read_only(true).open(&ov).unwrap();
    let mut b = vec![0u8; 70002];
    img.read_at(&mut b, 999).unwrap();
    assert_eq!(b[0], 0);
    assert!(b[1..70001].iter().all(|&x| x == 0x5a));
    assert_eq!(b[70001], 0);
    let e = img.map(1000, 10).unwrap();
    assert_eq!(e.depth, 1);
}

#[test]
fn multi_threaded_writes() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let img = p(dir.path(), "mt.vmdk");
    let v = Arc::new(Vmdk::create(&img, size, &create_opts("")).unwrap());
    let threads = 4u64;
    let region = size / threads;
    let mut hs = Vec::new();
    for t in 0..threads {
        let v = v.clone();
        hs.push(std::thread::spawn(move || {
            let base = t * region;
            // Odd-sized writes that straddle grains, interleaved with reads.
            let mut off = base + 123;
            let mut i = 0u64;
            while off + 50_000 < base + region {
                let len = 1000 + (i * 7919) % 40_000;
                let pat = (t * 50 + i % 50) as u8 | 1;
                v.write_at(&vec![pat; len as usize], off).unwrap();
                let mut back = vec![0u8; len as usize];
                v.read_at(&mut back, off).unwrap();
                assert!(back.iter().all(|&b| b == pat));
                off += len + (i * 104_729) % 200_000;
                i += 1;
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    v.flush().unwrap();
    // Rebuild the model with the same sequence.
    let mut writes = Vec::new();
    for t in 0..threads {
        let base = t * region;
        let mut off = base + 123;
        let mut i = 0u64;
        while off + 50_000 < base + region {
            let len = 1000 + (i * 7919) % 40_000;
            writes.push(((t * 50 + i % 50) as u8 | 1, off, len));
            off += len + (i * 104_729) % 200_000;
            i += 1;
        }
    }
    let r = v.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
    drop(v);
    let model = p(dir.path(), "mt.raw");
    write_model(&model, size, &writes);
    qemu_compare_raw(&img, &model);
    qemu_check_clean(&img);
}

#[test]
fn refused_and_restricted_extents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("data.raw"), vec![0x5au8; 4096]).unwrap();
    let open = |name: &str, text: &str| {
        let path = d.join(name);
        std::fs::write(&path, text).unwrap();
        vdisk::OpenOptions::new().format(vdisk::Format::Vmdk).open(&path)
    };
    // Mixed extents: RDONLY flat, ZERO, NOACCESS, VMFS.
    let img = open(
        "mixed.vmdk",
        "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"custom\"\nRDONLY 4 FLAT \"data.raw\" 2\nRW 8 ZERO\nNOACCESS 8 FLAT \"missing.raw\" 0\nRW 4 VMFS \"data.raw\"\n",
    )
    .unwrap();
    assert_eq!(img.size(), 24 * 512);
    let mut b = vec![0u8; 2048];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    img.read_at(&mut b[..512], 2048).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0));
    let e = img.read_at(&mut b[..512], 6144).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("NOACCESS"), "{e}");
    img.read_at(&mut b[..512], 20 * 512).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0x5a));
    assert_eq!(img.write_at(&[1], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(img.write_at(&[1], 2048).unwrap_err().kind(), ErrorKind::Unsupported);
    img.write_at(&[7], 20 * 512).unwrap();
    assert_eq!(img.map(2048, 10000).unwrap().kind, ExtentKind::Zero { host_offset: None });
    assert_eq!(img.map(2048, 10000).unwrap().length, 4096);
    // Escaping extent names are refused unless allowed.
    let sub = d.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let text = "version=1\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"../data.raw\" 0\n";
    std::fs::write(sub.join("esc.vmdk"), text).unwrap();
    let e = vdisk::OpenOptions::new().format(vdisk::Format::Vmdk).open(sub.join("esc.vmdk")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.to_string().contains("outside"), "{e}");
    let ok = vdisk::OpenOptions::new()
        .format(vdisk::Format::Vmdk)
        .read_only(true)
        .allow_vmdk_external_extents(true)
        .open(sub.join("esc.vmdk"))
        .unwrap();
    ok.read_at(&mut b[..10], 0).unwrap();
    assert_eq!(b[0], 7, "written through the VMFS extent above");
    assert_eq!(b[1], 0x5a);
    // confine_to also applies to extents: a symlink inside the directory
    // that points out of it is refused.
    std::os::unix::fs::symlink(d.join("data.raw"), sub.join("link.raw")).unwrap();
    std::fs::write(sub.join("ln.vmdk"), "version=1\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"link.raw\" 0\n")
        .unwrap();
    let confined = vdisk::OpenOptions::new().format(vdisk::Format::Vmdk).read_only(true).confine_to(&sub);
    let e = confined.open(sub.join("ln.vmdk")).unwrap_err();
    assert!(e.to_string().contains("resolves outside"), "{e}");
    assert!(vdisk::OpenOptions::new().format(vdisk::Format::Vmdk).read_only(true).open(sub.join("ln.vmdk")).is_ok());
    let e = open("abs.vmdk", "version=1\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/hostname\" 0\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    // Raw device maps, seSparse, encryption, COWD are refused by name.
    let e = open("rdm.vmdk", "version=1\ncreateType=\"vmfsRawDeviceMap\"\nRW 8 VMFSRDM \"data.raw\"\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("raw device"), "{e}");
    let e = open("se.vmdk", "version=1\ncreateType=\"seSparse\"\nRW 8 SESPARSE \"data.raw\"\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let e = open(
        "enc.vmdk",
        "version=1\ncreateType=\"monolithicFlat\"\nencryption.keySafe=\"vmware:key\"\nRW 8 FLAT \"data.raw\" 0\n",
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Crypto);
    let mut se = vec![0u8; 4096];
    se[..8].copy_from_slice(&0xcafe_babeu64.to_le_bytes());
    std::fs::write(d.join("se.bin"), &se).unwrap();
    let e = open("se2.vmdk", "version=1\ncreateType=\"monolithicSparse\"\nRW 8 SPARSE \"se.bin\"\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("seSparse"), "{e}");
    let mut cowd = vec![0u8; 4096];
    cowd[..4].copy_from_slice(b"COWD");
    std::fs::write(d.join("c.vmdk"), &cowd).unwrap();
    let e = vdisk::OpenOptions::new().format(vdisk::Format::Vmdk).open(d.join("c.vmdk")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("COWD"), "{e}");
    let e = open("noext.vmdk", "version=1\ncreateType=\"monolithicFlat\"\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
}

#[test]
fn create_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let e = Vmdk::create(&dir.path().join("a.vmdk"), MIB, &create_opts("compat6=on,hwversion=7")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = Vmdk::create(&dir.path().join("b.vmdk"), 0, &VmdkCreateOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let o = VmdkCreateOptions {
        subformat: Subformat::MonolithicFlat,
        adapter_type: AdapterType::LsiLogic,
        ..Default::default()
    };
    let v = Vmdk::create(&dir.path().join("c.vmdk"), 1000, &o).unwrap();
    assert_eq!(v.size(), 1024);
}
