//! VHDX interop with QEMU 10 (`qemu-img`, `qemu-io`): images QEMU makes in
//! every subformat and option read the same in vdisk; images vdisk makes
//! and writes read the same in QEMU and pass `qemu-img check`; writes
//! through vdisk into a QEMU-made image equal what `qemu-io` writes into a
//! copy; a log left unreplayed is applied as QEMU applies it.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vdisk::vhdx::format::{Header, HEADER_OFFSETS, MIB};
use vdisk::vhdx::log::LogWriter;
use vdisk::{BlockDevice, Format, OpenOptions, Vhdx, VhdxCreateOptions, ZeroMode};

/// Unaligned writes straddling blocks (of 1 MiB and more) and the end.
fn writes(size: u64) -> Vec<(u64, u64, u64)> {
    vec![
        (1, 0, 300),
        (2, MIB - 100, 300),
        (3, 3 * MIB + 7, 2 * MIB + 1000),
        (4, 17 * MIB - 513, 1026),
        (5, size - 4097, 4097),
    ]
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn qemu_create(path: &Path, size: u64, opts: &str) {
    let sz = size.to_string();
    if opts.is_empty() {
        qemu_img(&["create", "-q", "-f", "vhdx", &s(path), &sz]);
    } else {
        qemu_img(&["create", "-q", "-f", "vhdx", "-o", opts, &s(path), &sz]);
    }
}

#[test]
fn qemu_made_images_read_the_same() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let size = 18 * MIB + 512;
    for opts in [
        "",
        "block_state_zero=off",
        "subformat=fixed",
        "subformat=fixed,block_state_zero=off",
        "block_size=1M",
        "block_size=1M,block_state_zero=off,log_size=2M",
        "block_size=256M",
        "block_size=32M,subformat=fixed",
    ] {
        let img = p(dir.path(), "q.vhdx");
        let _ = std::fs::remove_file(&img);
        qemu_create(&img, size, opts);
        let cmds: Vec<String> = writes(size).iter().map(|(pat, o, l)| format!("write -P {pat} {o} {l}")).collect();
        qemu_io("vhdx", &img, &cmds);
        // A zero write over a whole block and part of another.
        qemu_io("vhdx", &img, &[format!("write -z {} {}", 3 * MIB, MIB + 10)]);
        let want = qemu_export(&img, "vhdx");
        let v = open_ro(&img, Format::Vhdx);
        assert_eq!(v.size(), want.len() as u64, "{opts}: size");
        assert_same(&format!("vdisk read of qemu image ({opts})"), &read_all(&v), &want);
        let info = v.info();
        let qinfo = qemu_img(&["info", "--output=json", &s(&img)]);
        assert!(
            qinfo.contains(&format!("\"cluster-size\": {}", info.cluster_size.unwrap())),
            "{opts}: block size differs from qemu's cluster-size:\n{qinfo}"
        );
    }
}

#[test]
fn vdisk_made_images_pass_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let size = 18 * MIB;
    for opts in [
        "",
        "block_state_zero=off",
        "subformat=fixed",
        "subformat=fixed,block_state_zero=off",
        "block_size=1M,log_size=2M",
        "block_size=256M",
        "block_size=1M,logical_sector_size=4096,physical_sector_size=4096",
        "subformat=fixed,block_state_zero=off,block_size=2M,logical_sector_size=4096",
    ] {
        let img = p(dir.path(), "v.vhdx");
        let _ = std::fs::remove_file(&img);
        let o = VhdxCreateOptions::parse(opts).unwrap();
        let v = Vhdx::create(&img, size, &o).unwrap();
        let mut model = Model::new(size);
        for (pat, off, len) in writes(size) {
            let d = pattern(pat, len as usize);
            v.write_at(&d, off).unwrap();
            model.write(off, &d);
        }
        v.write_zeroes(3 * MIB, MIB + 10, ZeroMode::MayUnmap).unwrap();
        model.zero(3 * MIB, MIB + 10);
        v.discard(14 * MIB, 2 * MIB).unwrap_or(()); // advisory: reads zeros or old data
        v.close().unwrap();
        // Discard is advisory: take what vdisk reads there now.
        let v = open_ro(&img, Format::Vhdx);
        let mut d = vec![0u8; 2 * MIB as usize];
        v.read_at(&mut d, 14 * MIB).unwrap();
        model.write(14 * MIB, &d);
        assert_same(&format!("vdisk reopen ({opts})"), &read_all(&v), &model.data);
        drop(v);
        if o.logical_sector_size != 512 {
            // QEMU reads 512-byte logical sectors only.
            let (code, _, err) = run_status("qemu-img", &["info", &s(&img)]);
            assert_ne!(code, 0, "qemu now reads 4 KiB-sector VHDX: extend this test ({err})");
            continue;
        }
        assert_qemu_clean(&img, "vhdx");
        assert_qemu_compare(&img, "vhdx", &model);
        let qinfo = qemu_img(&["info", "--output=json", &s(&img)]);
        assert!(qinfo.contains(&format!("\"virtual-size\": {size}")), "{opts}: {qinfo}");
    }
}

#[test]
fn vdisk_writes_into_qemu_images_like_qemu_io() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let size = 24 * MIB;
    for opts in ["", "subformat=fixed", "block_size=1M,block_state_zero=off"] {
        let a = p(dir.path(), "a.vhdx");
        let b = p(dir.path(), "b.vhdx");
        let _ = std::fs::remove_file(&a);
        qemu_create(&a, size, opts);
        qemu_io("vhdx", &a, &["write -P 9 5M 2M".to_string()]);
        std::fs::copy(&a, &b).unwrap();
        let w = [(7u64, 100u64, 5000u64), (8, 6 * MIB - 3, 9), (10, 12 * MIB, 3 * MIB)];
        let cmds: Vec<String> = w.iter().map(|(pat, o, l)| format!("write -P {pat} {o} {l}")).collect();
        qemu_io("vhdx", &a, &cmds);
        let v = open_rw(&b, Format::Vhdx);
        for (pat, o, l) in w {
            v.write_at(&vec![pat as u8; l as usize], o).unwrap();
        }
        v.close().unwrap();
        assert_qemu_clean(&b, "vhdx");
        let (code, out, err) = run_status("qemu-img", &["compare", "-f", "vhdx", "-F", "vhdx", &s(&a), &s(&b)]);
        assert_eq!(code, 0, "{opts}: {out}{err}");
    }
}

/// Pokes a log entry into a qemu-made image: the BAT sector and a data
/// sector updated through the log only, the header naming the log.
fn poke_log(img: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut hb = vec![0u8; 4096];
    f.read_exact_at(&mut hb, HEADER_OFFSETS[0]).unwrap();
    let h1 = Header::decode(&hb);
    f.read_exact_at(&mut hb, HEADER_OFFSETS[1]).unwrap();
    let h2 = Header::decode(&hb);
    let (cur, h) = vdisk::vhdx::format::current_header(h1, h2).unwrap();
    // The image was made with block_size=1M, block_state_zero=off: its BAT
    // is at 2 MiB (log at 1 MiB of 1 MiB), block 0 is allocated by qemu-io.
    let bat_off = 2 * MIB;
    let mut bat = vec![0u8; 4096];
    f.read_exact_at(&mut bat, bat_off).unwrap();
    let e0 = u64::from_le_bytes(bat[0..8].try_into().unwrap());
    assert_eq!(e0 & 7, 6, "block 0 is fully present");
    // The log moves block 0's data to block 5 (block 0 becomes unallocated)
    // and rewrites one sector of it.
    bat[0..8].fill(0);
    bat[40..48].copy_from_slice(&e0.to_le_bytes());
    let data_sector = vec![0x5a; 4096];
    let flen = f.metadata().unwrap().len();
    let g = vdisk::vhdx::format::Guid::random();
    let mut w = LogWriter::new(h.log_offset, u64::from(h.log_length), g);
    let st = vdisk::FileStorage::open(img, false).unwrap();
    w.write(&st, &[(bat_off, &bat), ((e0 & !(MIB - 1)) + 8192, &data_sector)], flen, 0).unwrap();
    let nh = Header { sequence: h.sequence + 1, log_guid: g, ..h };
    f.write_all_at(&nh.encode(), HEADER_OFFSETS[1 - cur]).unwrap();
    f.sync_all().unwrap();
    data_sector
}

#[test]
fn unreplayed_log_is_applied_as_qemu_applies_it() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "log.vhdx");
    qemu_create(&img, 8 * MIB, "block_size=1M,block_state_zero=off");
    qemu_io("vhdx", &img, &["write -P 0x33 0 1M".to_string()]);
    let before = std::fs::read(&img).unwrap();
    let sector = poke_log(&img);
    // QEMU refuses a read-only open of an image that needs a replay.
    let (code, _, err) = run_status("qemu-img", &["info", &s(&img)]);
    assert_ne!(code, 0, "qemu opens a dirty log read-only?");
    assert!(err.contains("log"), "{err}");
    // vdisk read-only: the log applied in memory, the file untouched.
    let poked = std::fs::read(&img).unwrap();
    let v = open_ro(&img, Format::Vhdx);
    let ours = read_all(&v);
    drop(v);
    assert_eq!(std::fs::read(&img).unwrap(), poked, "a read-only open wrote to the file");
    assert_ne!(poked, before);
    let b5 = 5 * MIB as usize;
    assert_eq!(&ours[b5 + 8192..b5 + 12288], &sector[..]);
    assert!(ours[b5..b5 + 8192].iter().all(|&x| x == 0x33), "block 5 now holds block 0's data");
    assert!(ours[..MIB as usize].iter().all(|&x| x == 0), "block 0 is unallocated");
    // QEMU's replay (check -r all) of a copy agrees byte for byte.
    let copy = p(dir.path(), "copy.vhdx");
    std::fs::copy(&img, &copy).unwrap();
    let (code, out, err) = run_status("qemu-img", &["check", "-r", "all", &s(&copy)]);
    assert!(code == 0 || code == 3, "qemu-img check -r all: {out}{err}");
    assert_same("vdisk in-memory replay vs qemu replay", &ours, &qemu_export(&copy, "vhdx"));
    // vdisk's check without -r refuses like QEMU; with -r all it replays.
    let (code, _, err) = vdisk(&["check", &s(&img)]);
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = vdisk(&["check", "-r", "all", &s(&img)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 corruptions"), "{out}");
    assert_qemu_clean(&img, "vhdx");
    assert_same("vdisk replay vs qemu replay", &qemu_export(&img, "vhdx"), &ours);
}

#[test]
fn cli_create_and_check_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    for (opts, size) in [
        ("subformat=fixed,block_state_zero=off,block_size=1M,log_size=2M", "8M"),
        ("block_state_zero=on,log_size=1536K", "8M"),
        ("", "1000"),
    ] {
        let a = s(&p(dir.path(), "a.vhdx"));
        let b = s(&p(dir.path(), "b.vhdx"));
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        let mut qa = vec!["create", "-f", "vhdx"];
        let mut va = vec!["create", "-f", "vhdx"];
        if !opts.is_empty() {
            qa.extend(["-o", opts]);
            va.extend(["-o", opts]);
        }
        let q = qemu_img(&[qa.as_slice(), &[a.as_str(), size]].concat());
        let (code, out, err) = vdisk(&[va.as_slice(), &[b.as_str(), size]].concat());
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.replace(&b, "X"), q.replace(&a, "X"), "create line for {opts}");
        let qi = qemu_img(&["info", "--output=json", &a]);
        let (_, vi, _) = vdisk(&["info", "--output=json", &b]);
        for key in ["\"virtual-size\"", "\"cluster-size\"", "\"format\""] {
            let pick = |t: &str| {
                t.lines().find(|l| l.starts_with(&format!("    {key}"))).map(|l| l.trim_end_matches(',').to_string())
            };
            assert_eq!(pick(&vi), pick(&qi), "{key} for {opts}");
        }
        assert_qemu_clean(Path::new(&b), "vhdx");
    }
    // Refusals, with qemu-img's words.
    for (opts, size, words) in [
        ("block_size=3M", "8M", "power of two"),
        ("log_size=0", "8M", "multiple of 1 MB"),
        ("log_size=5000000000", "8M", "smaller than 4 GB"),
        ("subformat=differencing", "8M", "does not accept value"),
        ("", "65T", "max of 64TB"),
    ] {
        // qemu-img leaves the file it failed to format; vdisk removes it.
        let a = s(&p(dir.path(), "q-refused.vhdx"));
        let b = s(&p(dir.path(), "r.vhdx"));
        let mut args = vec!["create", "-f", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let (qc, _, qe) = run_status("qemu-img", &[args.as_slice(), &[a.as_str(), size]].concat());
        let (vc, _, ve) = vdisk(&[args.as_slice(), &[b.as_str(), size]].concat());
        assert_ne!(qc, 0);
        assert_eq!(vc, 1, "{opts}: {ve}");
        assert!(qe.contains(words) && ve.contains(words), "{opts}: qemu said {qe}, vdisk said {ve}");
        assert!(!Path::new(&b).exists(), "a refused create leaves no file");
    }
    // check: a truncated image is corrupt for both, with exit code 2.
    let t = p(dir.path(), "t.vhdx");
    qemu_create(&t, 16 * MIB, "block_size=1M");
    qemu_io("vhdx", &t, &["write -P 1 10M 1M".to_string()]);
    let len = std::fs::metadata(&t).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&t).unwrap().set_len(len - MIB).unwrap();
    let (qc, qo, _) = run_status("qemu-img", &["check", &s(&t)]);
    let (vc, vo, ve) = vdisk(&["check", &s(&t)]);
    assert_eq!((vc, qc), (2, 2), "{vo}{ve}");
    assert!(vo.contains("1 errors were found") && qo.contains("1 errors were found"), "{vo}\n{qo}");
}

#[test]
fn convert_to_and_from_every_format() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let src = p(dir.path(), "src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&src), "20M"]);
    qemu_io("qcow2", &src, &["write -P 3 1M 3M".to_string(), "write -P 4 15M 100k".to_string()]);
    let want = qemu_export(&src, "qcow2");
    let vh = p(dir.path(), "out.vhdx");
    let (code, _, err) = vdisk(&["convert", "-f", "qcow2", "-O", "vhdx", "-o", "block_size=2M", &s(&src), &s(&vh)]);
    assert_eq!(code, 0, "{err}");
    assert_qemu_clean(&vh, "vhdx");
    assert_same("qcow2 -> vhdx", &qemu_export(&vh, "vhdx"), &want);
    for fmt in ["raw", "qcow2", "vmdk", "vhdx"] {
        let out = p(dir.path(), &format!("back.{fmt}"));
        let (code, _, err) = vdisk(&["convert", "-f", "vhdx", "-O", fmt, &s(&vh), &s(&out)]);
        assert_eq!(code, 0, "{fmt}: {err}");
        assert_same(&format!("vhdx -> {fmt}"), &qemu_export(&out, fmt), &want);
    }
}

#[test]
fn differencing_images_read_through_their_parent() {
    let dir = tmp();
    let base = p(dir.path(), "base.vhdx");
    let b = Vhdx::create(&base, 8 * MIB, &VhdxCreateOptions::parse("block_size=1M").unwrap()).unwrap();
    let mut model = Model::new(8 * MIB);
    let d = pattern(1, 3 * MIB as usize);
    b.write_at(&d, MIB / 2).unwrap();
    model.write(MIB / 2, &d);
    b.close().unwrap();
    let child = p(dir.path(), "child.vhdx");
    let o = VhdxCreateOptions::parse("backing_file=base.vhdx,backing_fmt=vhdx").unwrap();
    let o = VhdxCreateOptions { block_size: MIB, ..o };
    let c = OpenOptions::new().create_vhdx(&child, 0, &o).unwrap();
    let d = pattern(2, 1000);
    c.write_at(&d, MIB + 10).unwrap();
    model.write(MIB + 10, &d);
    c.write_zeroes(3 * MIB, MIB, ZeroMode::MayUnmap).unwrap();
    model.zero(3 * MIB, MIB);
    c.close().unwrap();
    let v = OpenOptions::new().format(Format::Vhdx).read_only(true).open(&child).unwrap();
    assert_eq!(v.info().backing_file.as_deref(), Some("base.vhdx"));
    assert_same("child", &read_all(&v), &model.data);
    let m = v.map(0, 8 * MIB).unwrap();
    assert_eq!(m.depth, 1, "block 0 comes from the parent: {m:?}");
    drop(v);
    // The parent changed: its DataWriteGuid no longer matches the link.
    let b = open_rw(&base, Format::Vhdx);
    b.write_at(b"x", 0).unwrap();
    b.close().unwrap();
    let e = OpenOptions::new().format(Format::Vhdx).read_only(true).open(&child).unwrap_err();
    assert!(e.to_string().contains("parent_linkage"), "{e}");
    // Without a parent the policy may refuse; with Never the image opens
    // and reads falling through fail.
    let v = OpenOptions::new()
        .format(Format::Vhdx)
        .read_only(true)
        .backing(vdisk::BackingPolicy::Never)
        .open(&child)
        .unwrap();
    let mut buf = [0u8; 10];
    assert!(v.read_at(&mut buf, 0).is_err());
    v.read_at(&mut buf, MIB + 10).unwrap();
    let _ = Arc::new(0);
}
