//! Legacy AES encryption and internal snapshots, both ways with qemu:
//! qemu writes and vdisk reads; vdisk writes and qemu reads, checks and
//! applies.

mod common;

use std::path::Path;

use common::*;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{BackingPolicy, BlockDevice, ErrorKind, Format, Image, OpenOptions, Qcow2, Secret, ZeroMode};

const PASS: &str = "correct horse";

fn secret_args(pass: &str) -> String {
    format!("secret,id=sec0,data={pass}")
}

fn image_opts(img: &Path) -> String {
    format!("driver=qcow2,file.filename={},encrypt.key-secret=sec0", img.display())
}

/// qemu's view of an encrypted image, decrypted with the passphrase.
fn qemu_export_aes(img: &Path) -> Vec<u8> {
    let dir = tmp();
    let out = dir.path().join("dec.raw");
    qemu_img(&[
        "convert",
        "--object",
        &secret_args(PASS),
        "--image-opts",
        &image_opts(img),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

fn qemu_check_aes(img: &Path) {
    let (code, out, err) =
        run_status("qemu-img", &["check", "--object", &secret_args(PASS), "--image-opts", &image_opts(img)]);
    assert_eq!(code, 0, "qemu-img check of {}:\n{out}{err}", img.display());
}

fn open_aes(img: &Path, ro: bool) -> Qcow2 {
    match OpenOptions::new()
        .format(Format::Qcow2)
        .read_only(ro)
        .backing(BackingPolicy::Follow)
        .key(Secret::new(PASS))
        .open(img)
        .unwrap()
    {
        Image::Qcow2(q) => q,
        _ => unreachable!(),
    }
}

#[test]
fn aes_images_made_by_qemu_read_in_vdisk() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    for opts in ["cluster_size=65536", "cluster_size=4096,compat=0.10", "cluster_size=512"] {
        let img = p(dir.path(), "q.qcow2");
        let o = format!("encrypt.format=aes,encrypt.key-secret=sec0,{opts}");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &secret_args(PASS),
            "-o",
            &o,
            img.to_str().unwrap(),
            "4M",
        ]);
        for cmd in
            ["write -P 0x5a 1000 70000", "write -P 0x11 1M 4096", "write -z 2M 64k", "write -P 0x22 4193000 1304"]
        {
            let out = run("qemu-io", &["--object", &secret_args(PASS), "--image-opts", "-c", cmd, &image_opts(&img)]);
            assert!(out.contains("wrote"), "{out}");
        }
        let want = qemu_export_aes(&img);
        let q = open_aes(&img, true);
        assert!(q.encrypted());
        assert_same(opts, &read_all(&q), &want);
        // Unaligned reads decrypt whole sectors underneath.
        let mut b = vec![0u8; 777];
        q.read_at(&mut b, 999).unwrap();
        assert_eq!(&b[..], &want[999..999 + 777]);
    }
}

#[test]
fn aes_images_made_by_vdisk_read_in_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    for (name, cs, v) in [("a64", 65536u64, 3u32), ("a4k", 4096, 3), ("a512-v2", 512, 2)] {
        let img = p(dir.path(), &format!("{name}.qcow2"));
        let mut o = CreateOptions::new(4 << 20);
        o.cluster_size = cs;
        o.version = v;
        o.encrypt = Some(Secret::new(PASS));
        let q = vdisk::OpenOptions::new().create_qcow2(&img, &o).unwrap();
        let mut model = Model::new(4 << 20);
        let mut rng = Rng(11);
        for _ in 0..40 {
            let len = 1 + rng.below(100_000);
            let off = rng.below((4 << 20) - len);
            let buf = pattern(rng.next(), len as usize);
            q.write_at(&buf, off).unwrap();
            model.write(off, &buf);
        }
        q.write_zeroes(3 << 20, 200_000, ZeroMode::MayUnmap).unwrap();
        model.zero(3 << 20, 200_000);
        // Compressed writes into encrypted images are refused, as qemu does.
        let e = q.write_compressed(&vec![0u8; cs as usize], 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        q.close().unwrap();
        assert_same(name, &qemu_export_aes(&img), &model.data);
        qemu_check_aes(&img);
        let info = qemu_img(&["info", img.to_str().unwrap()]);
        assert!(info.contains("encrypted: yes"), "{info}");
    }
}

#[test]
fn aes_overlay_copies_on_write_from_plain_backing() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let base = p(dir.path(), "base.raw");
    std::fs::write(&base, pattern(5, 2 << 20)).unwrap();
    let img = p(dir.path(), "ov.qcow2");
    let mut o = CreateOptions::new(0);
    o.backing_file = Some("base.raw".into());
    o.backing_format = Some("raw".into());
    o.encrypt = Some(Secret::new(PASS));
    let q = vdisk::OpenOptions::new().create_qcow2(&img, &o).unwrap();
    let mut model = Model { data: std::fs::read(&base).unwrap() };
    for (off, len) in [(100u64, 50u64), (70_000, 3), (1 << 20, 200_000)] {
        let buf = pattern(off, len as usize);
        q.write_at(&buf, off).unwrap();
        model.write(off, &buf);
    }
    q.discard(512 << 10, 128 << 10).unwrap();
    model.zero(512 << 10, 128 << 10);
    q.close().unwrap();
    assert_same("overlay", &qemu_export_aes(&img), &model.data);
    qemu_check_aes(&img);
}

#[test]
fn aes_without_key_and_with_a_wrong_key() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "k.qcow2");
    let mut o = CreateOptions::new(1 << 20);
    o.encrypt = Some(Secret::new(PASS));
    let q = vdisk::OpenOptions::new().create_qcow2(&img, &o).unwrap();
    q.write_at(&[0x42; 4096], 0).unwrap();
    q.close().unwrap();
    // No key: a clear error that says a passphrase is needed.
    let e = OpenOptions::new().format(Format::Qcow2).read_only(true).open(&img).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Crypto);
    assert!(e.to_string().contains("passphrase"), "{e}");
    // info works without it and says so.
    let (code, out, err) = vdisk(&["info", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("encrypted: yes"), "{out}");
    // A wrong passphrase cannot be detected by this format: reads succeed
    // and return garbage (QEMU behaves the same).
    let q = match OpenOptions::new().format(Format::Qcow2).read_only(true).key(Secret::new("wrong")).open(&img).unwrap()
    {
        Image::Qcow2(q) => q,
        _ => unreachable!(),
    };
    let mut b = vec![0u8; 4096];
    q.read_at(&mut b, 0).unwrap();
    assert_ne!(b, vec![0x42; 4096]);
    // The CLI takes qemu's secret forms and vdisk's passphrase file.
    let pf = p(dir.path(), "pass.txt");
    std::fs::write(&pf, format!("{PASS}\n")).unwrap();
    let (code, out, _) = vdisk(&[
        "io",
        "--passphrase-file",
        pf.to_str().unwrap(),
        "-r",
        "-c",
        "read -P 0x42 0 4096",
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let io = image_opts(&img);
    let (code, out, _) =
        vdisk(&["io", "--object", &secret_args(PASS), "--image-opts", "-r", "-c", "read -P 0x42 0 4096", &io]);
    assert_eq!(code, 0, "{out}");
    // Decrypting convert to raw, and encrypting convert from raw.
    let plain = p(dir.path(), "plain.raw");
    let (code, _, err) =
        vdisk(&["convert", "--object", &secret_args(PASS), "--image-opts", "-O", "raw", &io, plain.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(&std::fs::read(&plain).unwrap()[..4096], &[0x42; 4096][..]);
    let enc = p(dir.path(), "enc.qcow2");
    let (code, _, err) = vdisk(&[
        "convert",
        "--object",
        &secret_args(PASS),
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        plain.to_str().unwrap(),
        enc.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(&qemu_export_aes(&enc)[..4096], &[0x42; 4096][..]);
}

#[test]
fn snapshots_made_by_qemu_read_in_vdisk() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img.to_str().unwrap(), "4M"]);
    qemu_io("qcow2", &img, &["write -P 0x01 0 1M".into()]);
    qemu_img(&["snapshot", "-c", "first boot", img.to_str().unwrap()]);
    qemu_io("qcow2", &img, &["write -P 0x02 512k 1M".into(), "write -c -P 0x03 3M 64k".into()]);
    qemu_img(&["snapshot", "-c", "second", img.to_str().unwrap()]);
    qemu_io("qcow2", &img, &["write -P 0x04 0 8k".into()]);
    let q = open_ro(&img, Format::Qcow2);
    let Image::Qcow2(q) = q else { unreachable!() };
    let names: Vec<String> = q.snapshots().iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["first boot", "second"]);
    for name in ["first boot", "second"] {
        let out = p(dir.path(), "snap.raw");
        qemu_img(&[
            "convert",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let want = std::fs::read(&out).unwrap();
        assert_same(name, &read_all(&q.snapshot_view(name).unwrap()), &want);
        // The CLI exports it the same way.
        let mine = p(dir.path(), "mine.raw");
        let (code, _, err) = vdisk(&[
            "convert",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            img.to_str().unwrap(),
            mine.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        assert_same(name, &std::fs::read(&mine).unwrap(), &want);
    }
    // `vdisk snapshot -l` lays the list out as qemu-img does (dates aside).
    let (_, mine, _) = vdisk(&["snapshot", "-l", img.to_str().unwrap()]);
    let theirs = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    let strip =
        |s: &str| s.lines().map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>();
    assert_eq!(strip(&mine), strip(&theirs));
    assert_eq!(mine.lines().nth(1), theirs.lines().nth(1), "header line");
}

#[test]
fn snapshots_made_by_vdisk_applied_by_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    for (name, tweak) in [
        ("default", (|_: &mut CreateOptions| {}) as fn(&mut CreateOptions)),
        ("512-rc4", |o: &mut CreateOptions| {
            o.cluster_size = 512;
            o.refcount_bits = 4;
        }),
        ("4k-rc64-v2", |o: &mut CreateOptions| {
            o.cluster_size = 4096;
            o.version = 2;
        }),
        ("extl2", |o: &mut CreateOptions| o.extended_l2 = true),
        ("aes", |o: &mut CreateOptions| o.encrypt = Some(Secret::new(PASS))),
    ] {
        let img = p(dir.path(), &format!("{name}.qcow2"));
        let mut o = CreateOptions::new(4 << 20);
        tweak(&mut o);
        let aes = o.encrypt.is_some();
        let q = vdisk::OpenOptions::new().create_qcow2(&img, &o).unwrap();
        q.write_at(&pattern(1, 1 << 20), 0).unwrap();
        if !aes {
            q.write_compressed(&vec![7u8; (o.cluster_size * 2) as usize], 2 << 20).unwrap();
        }
        let s1 = read_all(&q);
        q.snapshot_create("s1").unwrap();
        q.write_at(&pattern(2, 100_000), 50_000).unwrap();
        q.write_at(&pattern(3, 5000), (2 << 20) + 100).unwrap();
        let s2 = read_all(&q);
        q.snapshot_create("s2").unwrap();
        q.write_at(&pattern(4, 3000), 0).unwrap();
        q.close().unwrap();
        if aes {
            qemu_check_aes(&img);
            continue;
        }
        assert_qemu_clean(&img, "qcow2");
        let list = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
        assert!(list.contains(" s1 ") && list.contains(" s2 "), "{list}");
        qemu_img(&["snapshot", "-a", "s1", img.to_str().unwrap()]);
        assert_same(&format!("{name}: qemu applied s1"), &qemu_export(&img, "qcow2"), &s1);
        qemu_img(&["snapshot", "-a", "s2", img.to_str().unwrap()]);
        assert_same(&format!("{name}: qemu applied s2"), &qemu_export(&img, "qcow2"), &s2);
        assert_qemu_clean(&img, "qcow2");
        // vdisk deletes one qemu applied from; qemu still agrees.
        let q = open_rw(&img, Format::Qcow2);
        let Image::Qcow2(q) = q else { unreachable!() };
        q.snapshot_delete("s1").unwrap();
        q.snapshot_apply("s2").unwrap();
        assert_same(name, &read_all(&q), &s2);
        q.close().unwrap();
        assert_qemu_clean(&img, "qcow2");
    }
}

#[test]
fn snapshot_names_ids_and_limits() {
    let st = std::sync::Arc::new(vdisk::MemStorage::new());
    let q = Qcow2::create(st, &CreateOptions::new(1 << 20), Default::default()).unwrap();
    q.snapshot_create("a").unwrap();
    assert_eq!(q.snapshot_create("a").unwrap_err().kind(), ErrorKind::AlreadyExists);
    q.snapshot_create("b").unwrap();
    q.snapshot_delete("a").unwrap();
    q.snapshot_create("c").unwrap();
    let ids: Vec<String> = q.snapshots().iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, ["2", "1"], "ids stay unique and reuse freed ones like qemu");
    assert_eq!(q.snapshot_apply("nope").unwrap_err().kind(), ErrorKind::NotFound);
    // By id works too.
    q.snapshot_apply("2").unwrap();
    // 1-bit refcounts hold no snapshot: refused before anything changes.
    let st = std::sync::Arc::new(vdisk::MemStorage::new());
    let mut o = CreateOptions::new(1 << 20);
    o.refcount_bits = 1;
    let q = Qcow2::create(st, &o, Default::default()).unwrap();
    q.write_at(&[1; 4096], 0).unwrap();
    assert_eq!(q.snapshot_create("x").unwrap_err().kind(), ErrorKind::LimitExceeded);
    assert!(q.snapshots().is_empty());
    assert!(q.check(vdisk::qcow2::check::Repair::None).unwrap().is_clean());
}

#[test]
fn snapshot_with_vm_state_is_kept_accounted() {
    if !have_qemu() {
        return;
    }
    // qemu-img cannot save VM state, so make one: data beyond the snapshot's
    // disk size inside its L1 table is what a savevm leaves there.
    let dir = tmp();
    let img = p(dir.path(), "vm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img.to_str().unwrap(), "64M"]);
    qemu_io("qcow2", &img, &["write -P 0x31 0 64k".into(), "write -P 0x99 40M 128k".into()]);
    qemu_img(&["snapshot", "-c", "with-vm", img.to_str().unwrap()]);
    // Mark it: disk size 4 MiB (extra data +8), VM state 128 KiB (+0 and
    // the 32-bit field).
    let mut b = std::fs::read(&img).unwrap();
    let so = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    b[so + 32..so + 36].copy_from_slice(&(128u32 << 10).to_be_bytes());
    b[so + 40..so + 48].copy_from_slice(&(128u64 << 10).to_be_bytes());
    b[so + 48..so + 56].copy_from_slice(&(4u64 << 20).to_be_bytes());
    std::fs::write(&img, b).unwrap();
    assert_qemu_clean(&img, "qcow2");
    let q = open_rw(&img, Format::Qcow2);
    let Image::Qcow2(q) = q else { unreachable!() };
    let s = &q.snapshots()[0];
    assert_eq!((s.vm_state_size, s.disk_size), (128 << 10, Some(4 << 20)));
    q.snapshot_create("plain").unwrap();
    q.write_at(&[1u8; 4096], 0).unwrap();
    q.snapshot_delete("plain").unwrap();
    q.close().unwrap();
    // The VM state clusters are still counted: no leaks, no errors.
    assert_qemu_clean(&img, "qcow2");
    let list = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    assert!(list.contains("128 KiB"), "{list}");
}
