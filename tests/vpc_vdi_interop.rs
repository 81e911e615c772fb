//! VHD (`vpc`) and VDI against qemu-img both ways: images qemu-img makes
//! (patterns written by qemu-io) read byte-exact by vdisk, images vdisk
//! makes and writes judged by `qemu-img compare` and `qemu-img check`,
//! writes through vdisk equal to qemu-io's, sizes and options as qemu-img
//! gives them, conversions through the CLI, and VDI check verdicts.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vdisk::vdi::{Vdi, VdiCreateOptions, VdiOptions};
use vdisk::vpc::{Vpc, VpcCreateOptions, VpcOptions};
use vdisk::{BlockDevice, FileStorage, Format, OpenOptions};

/// (format, -o options) of every subformat covered.
const CASES: &[(&str, &str)] = &[
    ("vpc", ""),
    ("vpc", "subformat=fixed"),
    ("vpc", "force_size=on"),
    ("vpc", "subformat=fixed,force_size=on"),
    ("vdi", ""),
    ("vdi", "static=on"),
    ("vpc", "subformat=fixed,preallocation=falloc"),
    ("vdi", "static=on,preallocation=full"),
];

fn fmt(name: &str) -> Format {
    Format::from_name(name).unwrap()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn qemu_create(f: &str, opts: &str, path: &Path, size: u64) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", f];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let ps = s(path);
    args.extend([ps.as_str(), size.as_str()]);
    qemu_img(&args);
}

fn virtual_size(path: &Path, f: &str) -> u64 {
    let out = qemu_img(&["info", "-f", f, "--output=json", &s(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Writes (offset, length, pattern byte) that straddle VHD's 2 MiB blocks,
/// VDI's 1 MiB blocks and the last sector.
fn writes(size: u64) -> Vec<(u64, u64, u8)> {
    vec![
        (0, 4096, 0x11),
        ((1 << 20) - 512, 1024, 0x22),
        ((2 << 20) - 1536, 8192, 0x33),
        (5 << 20, 3 << 20, 0x44),
        (size - 512, 512, 0x55),
        (9 << 20, 512, 0x66),
    ]
}

#[test]
fn qemu_images_read_exact() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    for (f, opts) in CASES {
        let path = p(d.path(), &format!("q-{f}-{}.img", opts.replace([',', '='], "_")));
        qemu_create(f, opts, &path, (20 << 20) + 12345);
        let size = virtual_size(&path, f);
        let cmds: Vec<String> = writes(size).iter().map(|(o, l, b)| format!("write -P {b} {o} {l}")).collect();
        qemu_io(f, &path, &cmds);
        let img = open_ro(&path, fmt(f));
        assert_eq!(img.size(), size, "{f} {opts}: virtual size");
        assert_same(&format!("{f} {opts}"), &read_all(&img), &qemu_export(&path, f));
        // map: the data/zero classes qemu-img map reports, per 512 bytes.
        let (code, vmap, err) = vdisk(&["map", "-f", f, "--output=json", &s(&path)]);
        assert_eq!(code, 0, "{err}");
        let qmap = qemu_img(&["map", "-f", f, "--output=json", &s(&path)]);
        assert_eq!(map_classes(&vmap, size, 512), map_classes(&qmap, size, 512), "{f} {opts}: map");
        // Dynamic images: the same listing, host offsets included (fixed
        // and static ones also report the file's holes in qemu-img).
        if !opts.contains("fixed") && !opts.contains("static") {
            assert_eq!(vmap.trim(), qmap.trim(), "{f} {opts}: map --output=json");
        }
    }
}

#[test]
fn vdisk_images_pass_qemu() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    for (f, opts) in CASES {
        let path = p(d.path(), &format!("v-{f}-{}.img", opts.replace([',', '='], "_")));
        let dev: Box<dyn BlockDevice> = match *f {
            "vpc" => {
                Box::new(Vpc::create_file(&path, (20 << 20) + 12345, &VpcCreateOptions::parse(opts).unwrap()).unwrap())
            }
            _ => {
                Box::new(Vdi::create_file(&path, (20 << 20) + 12345, &VdiCreateOptions::parse(opts).unwrap()).unwrap())
            }
        };
        let size = dev.size();
        // The size qemu-img gives the same request.
        let q = p(d.path(), "same-size.img");
        qemu_create(f, opts, &q, (20 << 20) + 12345);
        assert_eq!(size, virtual_size(&q, f), "{f} {opts}: size differs from qemu-img's");
        let mut model = Model::new(size);
        let mut rng = Rng(0x5eed ^ size);
        for i in 0..40 {
            let off = rng.below(size);
            let len = (rng.below(300_000) + 1).min(size - off);
            let data = pattern(i, len as usize);
            dev.write_at(&data, off).unwrap();
            model.write(off, &data);
        }
        dev.make_clean().unwrap();
        drop(dev);
        assert_eq!(virtual_size(&path, f), size);
        assert_qemu_compare(&path, f, &model);
        if *f == "vdi" {
            assert_qemu_clean(&path, f);
        }
        // And vdisk reads back what it wrote.
        assert_same(&format!("{f} {opts} reopened"), &read_all(&open_ro(&path, fmt(f))), &model.data);
    }
}

#[test]
fn writes_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    for (f, opts) in CASES {
        let a = p(d.path(), "a.img");
        let b = p(d.path(), "b.img");
        qemu_create(f, opts, &a, 12 << 20);
        qemu_io(f, &a, &["write -P 0x77 1M 1M".to_string()]);
        std::fs::copy(&a, &b).unwrap();
        let size = virtual_size(&a, f);
        let ws = writes(size);
        let cmds: Vec<String> = ws.iter().map(|(o, l, bb)| format!("write -P {bb} {o} {l}")).collect();
        qemu_io(f, &a, &cmds);
        {
            let img = open_rw(&b, fmt(f));
            for (o, l, bb) in &ws {
                img.write_at(&vec![*bb; *l as usize], *o).unwrap();
            }
            img.close().unwrap();
        }
        assert_same(&format!("{f} {opts}"), &qemu_export(&b, f), &qemu_export(&a, f));
        if *f == "vdi" {
            assert_qemu_clean(&b, f);
        }
        // QEMU goes on allocating after vdisk's blocks.
        let more = ["write -P 0x88 11M 4k".to_string(), "write -P 0x99 3M 4k".to_string()];
        qemu_io(f, &a, &more);
        qemu_io(f, &b, &more);
        assert_same(&format!("{f} {opts}: qemu-io after vdisk"), &qemu_export(&b, f), &qemu_export(&a, f));
        assert_same(&format!("{f} {opts}: vdisk reads"), &read_all(&open_ro(&b, fmt(f))), &qemu_export(&a, f));
    }
}

#[test]
fn cli_create_convert_and_refusals() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let raw = p(d.path(), "src.raw");
    let mut data = vec![0u8; 6 << 20];
    data[..3 << 20].copy_from_slice(&pattern(7, 3 << 20));
    data[(5 << 20) + 100..(5 << 20) + 200].fill(0xee);
    std::fs::write(&raw, &data).unwrap();
    // raw -> vpc -> vdi -> qcow2 -> vmdk -> vpc fixed, each judged by qemu-img compare.
    let mut prev = (raw.clone(), "raw");
    for (i, (out, opts)) in
        [("vpc", ""), ("vdi", ""), ("qcow2", ""), ("vmdk", ""), ("vpc", "subformat=fixed"), ("vdi", "static=on")]
            .iter()
            .enumerate()
    {
        let dst = p(d.path(), &format!("c{i}.{out}"));
        let mut args = vec!["convert", "-f", prev.1, "-O", out];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let (ps, ds) = (s(&prev.0), s(&dst));
        args.extend([ps.as_str(), ds.as_str()]);
        let (code, _, err) = vdisk(&args);
        assert_eq!(code, 0, "convert to {out}: {err}");
        let (c, o, e) = run_status("qemu-img", &["compare", "-f", "raw", "-F", out, &s(&raw), &ds]);
        assert_eq!(c, 0, "{out} {opts}: {o}{e}");
        prev = (dst, out);
    }
    // qemu-made images convert out through vdisk.
    let q = p(d.path(), "q.vdi");
    qemu_img(&["convert", "-f", "raw", "-O", "vdi", &s(&raw), &s(&q)]);
    let back = p(d.path(), "back.raw");
    let (code, _, err) = vdisk(&["convert", "-f", "vdi", "-O", "raw", &s(&q), &s(&back)]);
    assert_eq!(code, 0, "{err}");
    assert_same("vdi -> raw", &std::fs::read(&back).unwrap(), &data);

    // Refusals, in qemu-img's words.
    let t = p(d.path(), "t.img");
    for (f, args, word) in [
        ("vpc", vec!["-o", "subformat=foo"], "does not accept value 'foo'"),
        ("vpc", vec!["-o", "block_size=1M"], "Invalid parameter 'block_size'"),
        ("vdi", vec!["-o", "subformat=fixed"], "Invalid parameter 'subformat'"),
        ("vpc", vec!["-b", "src.raw", "-F", "raw"], "Backing file not supported for file format 'vpc'"),
        ("vdi", vec!["-b", "src.raw", "-F", "raw"], "Backing file not supported for file format 'vdi'"),
    ] {
        let mut a = vec!["create", "-f", f];
        a.extend(args);
        let ts = s(&t);
        a.extend([ts.as_str(), "1M"]);
        let (code, _, err) = vdisk(&a);
        assert_ne!(code, 0);
        assert!(err.contains(word), "{a:?}: {err}");
    }
    // The "Formatting" line, word for word.
    for (f, o) in [
        ("vpc", "force_size=on,preallocation=full,subformat=fixed"),
        ("vpc", "subformat=dynamic"),
        ("vdi", "preallocation=full,static=on"),
        ("vdi", ""),
    ] {
        let mut a = vec!["create", "-f", f];
        if !o.is_empty() {
            a.extend(["-o", o]);
        }
        a.extend(["x.img", "1M"]);
        let run_in = |prog: &str| {
            let out = std::process::Command::new(prog).args(&a).current_dir(d.path()).output().unwrap();
            assert!(out.status.success(), "{prog} {a:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        assert_eq!(run_in(vdisk_bin().to_str().unwrap()), run_in("qemu-img"), "{f} {o}");
    }
    // Neither format can be resized or measured, in qemu-img either.
    for (f, img) in [("vpc", "c0.vpc"), ("vdi", "c1.vdi")] {
        let path = s(&p(d.path(), img));
        let (code, _, err) = vdisk(&["resize", "-f", f, &path, "+1M"]);
        let (qcode, _, qerr) = run_status("qemu-img", &["resize", "-f", f, &path, "+1M"]);
        assert_eq!((code != 0, qcode != 0), (true, true), "{err} / {qerr}");
        assert!(err.contains("does not support resize"), "{err}");
        let (code, _, err) = vdisk(&["measure", "-O", f, "--size", "1G"]);
        assert_ne!(code, 0);
        assert!(err.contains("does not support size measurement"), "{err}");
    }
    let (code, _, err) = vdisk(&["create", "-f", "vpc", &s(&t), "3T"]);
    assert_ne!(code, 0);
    assert!(err.contains("too large for file format 'vpc'"), "{err}");
    // Sizes qemu-img gives, for the creators' rules.
    for (opts, size) in [("", 1_000_001u64), ("force_size=on", 1_000_001), ("", 127 << 30), ("", 200 << 30)] {
        let mut a = vec!["create", "-q", "-f", "vpc"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        let (ts, ss) = (s(&t), size.to_string());
        a.extend([ts.as_str(), ss.as_str()]);
        let (code, _, err) = vdisk(&a);
        assert_eq!(code, 0, "{err}");
        let q = p(d.path(), "tq.vhd");
        qemu_create("vpc", opts, &q, size);
        assert_eq!(virtual_size(&t, "vpc"), virtual_size(&q, "vpc"), "{opts} {size}");
    }
}

#[test]
fn vdi_check_verdicts() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let img = p(d.path(), "c.vdi");
    qemu_create("vdi", "", &img, 100 << 20);
    qemu_io("vdi", &img, &["write 0 4k".into(), "write 5M 4k".into()]);
    let verdict = |path: &Path| {
        let (vc, vo, _) = vdisk(&["check", "-f", "vdi", "--output=json", &s(path)]);
        let (qc, qo, _) = run_status("qemu-img", &["check", "-f", "vdi", "--output=json", &s(path)]);
        let v: serde_json::Value = serde_json::from_str(&vo).unwrap();
        let q: serde_json::Value = serde_json::from_str(&qo).unwrap();
        assert_eq!(vc, qc, "exit codes differ: {vo} / {qo}");
        assert_eq!(v["corruptions"], q["corruptions"], "{vo} / {qo}");
        vc
    };
    assert_eq!(verdict(&img), 0);
    let poke = |off: u64, v: u32| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&v.to_le_bytes(), off).unwrap();
    };
    poke(0x200 + 4 * 5, 99); // block 5 -> an unused data block
    poke(0x200 + 4 * 7, 0); // block 7 shares block 0's data
    assert_eq!(verdict(&img), 2);
    poke(0x200 + 4 * 9, 5000); // past the image's blocks
    assert_eq!(verdict(&img), 2);
    let (_, vo, ve) = vdisk(&["check", "-f", "vdi", &s(&img)]);
    let (_, qo, qe) = run_status("qemu-img", &["check", "-f", "vdi", &s(&img)]);
    assert_eq!(vo, qo);
    assert_eq!(
        ve.lines().filter(|l| l.starts_with("ERROR")).count(),
        qe.lines().filter(|l| l.starts_with("ERROR")).count()
    );
    let (code, _, _) = vdisk(&["check", "-r", "all", "-f", "vdi", &s(&img)]);
    assert_eq!(code, run_status("qemu-img", &["check", "-r", "all", "-f", "vdi", &s(&img)]).0);
    let v = p(d.path(), "c.vhd");
    qemu_create("vpc", "", &v, 1 << 20);
    assert_eq!(vdisk(&["check", "-f", "vpc", &s(&v)]).0, run_status("qemu-img", &["check", "-f", "vpc", &s(&v)]).0);
}

#[test]
fn probing_and_info() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    for (f, opts, probed) in [
        ("vpc", "", Format::Vpc),
        ("vdi", "", Format::Vdi),
        ("vdi", "static=on", Format::Vdi),
        ("vpc", "subformat=fixed", Format::Raw),
    ] {
        let path = p(d.path(), &format!("p.{f}"));
        qemu_create(f, opts, &path, 4 << 20);
        // A fixed VHD's footer is at the end: qemu-img probes it as raw too.
        let img = OpenOptions::new().probe(true).read_only(true).open(&path).unwrap();
        assert_eq!(img.format(), probed, "{f} {opts}");
        let (code, out, err) = vdisk(&["info", "-f", f, "--output=json", &s(&path)]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let q: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "-f", f, "--output=json", &s(&path)])).unwrap();
        for k in ["virtual-size", "format", "cluster-size", "dirty-flag"] {
            assert_eq!(v[k], q[k], "{f} {opts}: {k}");
        }
    }
}

#[test]
fn uuids_kept_and_read_only_differencing_refused() {
    let d = tmp();
    let path = p(d.path(), "u.vdi");
    let v = Vdi::create_file(&path, 4 << 20, &VdiCreateOptions::default()).unwrap();
    let h = v.header();
    v.write_at(&[1u8; 4096], 3 << 20).unwrap();
    v.close().unwrap();
    let v = Vdi::open(Arc::new(FileStorage::open(&path, false).unwrap()), VdiOptions::default()).unwrap();
    let h2 = v.header();
    assert_eq!((h.uuid_image, h.uuid_last_snap), (h2.uuid_image, h2.uuid_last_snap));
    assert_eq!(h2.blocks_allocated, 1);
    let path = p(d.path(), "u.vhd");
    let v = Vpc::create_file(&path, 4 << 20, &VpcCreateOptions::default()).unwrap();
    let uuid = v.footer().uuid;
    v.write_at(&[1u8; 4096], 3 << 20).unwrap();
    v.close().unwrap();
    let v = Vpc::open(Arc::new(FileStorage::open(&path, true).unwrap()), VpcOptions::default()).unwrap();
    assert_eq!(v.footer().uuid, uuid);
}

/// Rewrites the creator app, current size and geometry of every footer of
/// a VHD file (with fresh checksums).
fn poke_footer(path: &Path, app: &[u8; 4], current: u64, chs: Option<(u16, u8, u8)>) {
    let mut b = std::fs::read(path).unwrap();
    let end = b.len() - 512;
    for at in [0, end] {
        if &b[at..at + 8] != b"conectix" {
            continue;
        }
        b[at + 28..at + 32].copy_from_slice(app);
        b[at + 48..at + 56].copy_from_slice(&current.to_be_bytes());
        if let Some((c, h, s)) = chs {
            b[at + 56..at + 58].copy_from_slice(&c.to_be_bytes());
            b[at + 58] = h;
            b[at + 59] = s;
        }
        b[at + 64..at + 68].fill(0);
        let sum = b[at..at + 512].iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
        b[at + 64..at + 68].copy_from_slice(&(!sum).to_be_bytes());
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn size_by_creator_app_as_qemu() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let apps: [&[u8; 4]; 8] = [b"win ", b"d2v ", b"qem2", b"tap\0", b"CTXS", b"vpc ", b"qemu", b"xyz "];
    for sub in ["dynamic", "fixed"] {
        for app in apps {
            for chs in [None, Some((65535, 16, 255))] {
                let path = p(d.path(), "c.vhd");
                qemu_create("vpc", &format!("subformat={sub}"), &path, 20 << 20);
                // Hyper-V style: current_size below the geometry's size.
                poke_footer(&path, app, (15 << 20) + 512, chs);
                let q = virtual_size(&path, "vpc");
                let v = open_ro(&path, Format::Vpc);
                assert_eq!(v.size(), q, "{sub} {:?} {chs:?}", String::from_utf8_lossy(app));
            }
        }
    }
}

/// Turns the dynamic VHD at `child` (made by vdisk, block 0 written) into a
/// differencing disk of `parent_name` whose block 0 holds only its first 8
/// sectors (bitmap bits), the rest falling through to the parent.
fn make_differencing(child: &Path, parent_name: &str) {
    let mut b = std::fs::read(child).unwrap();
    let l = b.len();
    let bat0 = u32::from_be_bytes(b[1536..1540].try_into().unwrap()) as usize * 512;
    b[bat0] = 0xff;
    b[bat0 + 1..bat0 + 512].fill(0);
    let name: Vec<u8> = format!(".\\{parent_name}").encode_utf16().flat_map(u16::to_le_bytes).collect();
    // Locator 0 (W2ru) at 576 in the dynamic header, its data where the
    // footer was; the footer moves 512 bytes on.
    let loc = 512 + 576;
    b[loc..loc + 4].copy_from_slice(b"W2ru");
    b[loc + 4..loc + 8].copy_from_slice(&1u32.to_be_bytes());
    b[loc + 8..loc + 12].copy_from_slice(&(name.len() as u32).to_be_bytes());
    b[loc + 16..loc + 24].copy_from_slice(&((l - 512) as u64).to_be_bytes());
    b[512 + 36..512 + 40].fill(0);
    let sum = b[512..1536].iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
    b[512 + 36..512 + 40].copy_from_slice(&(!sum).to_be_bytes());
    let mut footer = b[l - 512..].to_vec();
    footer[60..64].copy_from_slice(&4u32.to_be_bytes());
    footer[64..68].fill(0);
    let sum = footer.iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
    footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
    b[l - 512..].fill(0);
    b[l - 512..l - 512 + name.len()].copy_from_slice(&name);
    b.extend_from_slice(&footer);
    b[..512].copy_from_slice(&footer);
    std::fs::write(child, b).unwrap();
}

#[test]
fn differencing_vhd_through_the_backing_policy() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let sub = p(d.path(), "vms");
    std::fs::create_dir(&sub).unwrap();
    let parent = p(&sub, "base.vhd");
    qemu_create("vpc", "", &parent, 6 << 20);
    qemu_io("vpc", &parent, &["write -P 0x5c 0 6M".into()]);
    let child = p(&sub, "child.vhd");
    let v = Vpc::create_file(&child, 6 << 20, &VpcCreateOptions::default()).unwrap();
    v.write_at(&[0xaa; 8192], 0).unwrap();
    v.close().unwrap();
    make_differencing(&child, "base.vhd");
    let mut want = qemu_export(&parent, "vpc");
    want[..4096].fill(0xaa);
    // The parent is a VHD by definition: the default policy follows it.
    let img = OpenOptions::new().format(Format::Vpc).read_only(true).open(&child).unwrap();
    assert_eq!(img.info().backing_file.as_deref(), Some("base.vhd"));
    assert_same("differencing", &read_all(&img), &want);
    let (code, out, err) = vdisk(&["map", "-f", "vpc", "--output=json", &s(&child)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"depth\": 1"), "{out}");
    drop(img);
    // What falls through to the parent is the parent's data to a copy and
    // a compare (map asks the parent), not a hole.
    let flat = p(d.path(), "flat.raw");
    let (code, _, err) = vdisk(&["convert", "-f", "vpc", "-O", "raw", &s(&child), &s(&flat)]);
    assert_eq!(code, 0, "{err}");
    assert_same("converted differencing", &std::fs::read(&flat).unwrap()[..want.len()], &want);
    std::fs::write(&flat, vec![0u8; want.len()]).unwrap();
    let (code, out, _) = vdisk(&["compare", "-f", "vpc", "-F", "raw", &s(&child), &s(&flat)]);
    assert_eq!(code, 1, "compare must see the parent's data: {out}");
    // Never: metadata works, reads that need the parent fail.
    let img = OpenOptions::new()
        .format(Format::Vpc)
        .read_only(true)
        .backing(vdisk::BackingPolicy::Never)
        .open(&child)
        .unwrap();
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(img.read_at(&mut buf, 8192).unwrap_err().kind(), vdisk::ErrorKind::NotFound);
    drop(img);
    // A parent outside the confinement directory is refused.
    let other = p(d.path(), "other");
    std::fs::create_dir(&other).unwrap();
    assert!(OpenOptions::new().format(Format::Vpc).read_only(true).confine_to(&other).open(&child).is_err());
    // Writes are refused: differencing disks are read-only here.
    let img = OpenOptions::new().format(Format::Vpc).open(&child).unwrap();
    assert_eq!(img.write_at(&[1], 0).unwrap_err().kind(), vdisk::ErrorKind::ReadOnly);
}

/// A VDI laid out as VirtualBox lays it out (its own text, header size
/// 0x190, data at 1 MiB, blocks in another order than the guest's, a
/// discarded block), made from a qemu-made image: qemu-img and vdisk read
/// the same bytes, vdisk writes into it and qemu-img check stays clean.
#[test]
fn virtualbox_layout_vdi() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let q = p(d.path(), "q.vdi");
    qemu_create("vdi", "", &q, 8 << 20);
    qemu_io("vdi", &q, &["write -P 0x31 0 1M".into(), "write -P 0x32 3M 1M".into(), "write -P 0x33 6M 4k".into()]);
    let b = std::fs::read(&q).unwrap();
    let le = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let (bmap_off, data_off) = (le(0x154) as usize, le(0x158) as usize);
    let blocks = le(0x180) as usize;
    let mut out = vec![0u8; 1 << 20];
    out[..512].copy_from_slice(&b[..512]);
    let text = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
    out[..64].fill(0);
    out[..text.len()].copy_from_slice(text);
    out[0x48..0x4c].copy_from_slice(&0x190u32.to_le_bytes());
    out[0x158..0x15c].copy_from_slice(&(1u32 << 20).to_le_bytes());
    // Blocks stored in reverse order of allocation; block 1 discarded.
    let mut order: Vec<(usize, u32)> =
        (0..blocks).filter_map(|i| Some((i, le(bmap_off + 4 * i))).filter(|(_, e)| *e < 0xffff_fffe)).collect();
    order.reverse();
    let mut bmap = vec![0xffu8; blocks * 4];
    bmap[4..8].copy_from_slice(&0xffff_fffeu32.to_le_bytes());
    for (n, (i, e)) in order.iter().enumerate() {
        bmap[4 * i..4 * i + 4].copy_from_slice(&(n as u32).to_le_bytes());
        let src = data_off + (*e as usize) * (1 << 20);
        out.extend_from_slice(&b[src..src + (1 << 20)]);
    }
    out[0x200..0x200 + bmap.len()].copy_from_slice(&bmap);
    let path = p(d.path(), "vbox.vdi");
    std::fs::write(&path, &out).unwrap();
    assert_same("virtualbox layout", &read_all(&open_ro(&path, Format::Vdi)), &qemu_export(&path, "vdi"));
    assert_same("same guest data", &qemu_export(&path, "vdi"), &qemu_export(&q, "vdi"));
    assert_qemu_clean(&path, "vdi");
    {
        let img = open_rw(&path, Format::Vdi);
        img.write_at(&[0x44; 4096], (1 << 20) + 512).unwrap(); // the discarded block
        img.write_at(&[0x45; 512], 3 << 20).unwrap();
        img.close().unwrap();
    }
    qemu_io("vdi", &q, &["write -P 0x44 1049088 4k".into(), "write -P 0x45 3M 512".into()]);
    assert_same("after writes", &qemu_export(&path, "vdi"), &qemu_export(&q, "vdi"));
    assert_qemu_clean(&path, "vdi");
    let out = std::fs::read(&path).unwrap();
    assert_eq!(&out[..text.len()], text, "the header text is kept");
}
