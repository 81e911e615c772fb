//! LUKS both ways with QEMU: standalone `luks` volumes and qcow2 with
//! `encrypt.format=luks`, across every cipher, mode, IV generator and hash
//! qemu-img creates for AES; images qemu-img makes and qemu-io writes are
//! read exactly by vdisk, and what vdisk creates and writes is read exactly
//! by qemu-io and passes `qemu-img check`.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{have_qemu, run, run_status};
use vdisk::luks::{Luks, Luks1Params, LuksOptions};
use vdisk::{BlockDevice, ErrorKind, FileStorage, Format, OpenOptions, Secret, Storage};

const PASS: &str = "hunter2 x";
const OBJ: &str = "secret,id=sec0,data=hunter2 x";

const ALGS: [&str; 3] = ["aes-128", "aes-192", "aes-256"];
const MODES: [&str; 2] = ["xts", "cbc"];
const IVGENS: [&str; 3] = ["plain", "plain64", "essiv"];
const HASHES: [&str; 5] = ["sha1", "sha224", "sha256", "sha384", "sha512"];

/// Every (cipher-alg, cipher-mode, ivgen-alg, hash-alg) qemu-img makes.
/// QEMU 10.0 aborts on aes-192 in CBC mode (the key material of 24 x 4000
/// bytes is not whole sectors, and its sector helper asserts), so that
/// pair is left out (and vdisk refuses to create it).
fn matrix() -> Vec<[&'static str; 4]> {
    let mut v = Vec::new();
    for a in ALGS {
        for m in MODES {
            if (a, m) == ("aes-192", "cbc") {
                continue;
            }
            for i in IVGENS {
                for h in HASHES {
                    v.push([a, m, i, h]);
                }
            }
        }
    }
    v
}

fn opts_of(c: &[&str; 4], prefix: &str) -> String {
    let [a, m, i, h] = c;
    format!(
        "{prefix}cipher-alg={a},{prefix}cipher-mode={m},{prefix}ivgen-alg={i},{prefix}ivgen-hash-alg=sha256,{prefix}hash-alg={h},{prefix}iter-time=10"
    )
}

fn image_opts(fmt: &str, path: &Path) -> String {
    match fmt {
        "luks" => format!("driver=luks,file.filename={},key-secret=sec0", path.display()),
        _ => format!("driver=qcow2,file.filename={},encrypt.key-secret=sec0", path.display()),
    }
}

/// qemu-io commands on an encrypted image; fails on any verification error.
fn qemu_io(fmt: &str, path: &Path, cmds: &[String]) {
    let io = image_opts(fmt, path);
    let mut args = vec!["--object", OBJ, "--image-opts", &io];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run("qemu-io", &args);
    assert!(!out.contains("fail") && !out.contains("error"), "qemu-io: {out}");
}

fn qemu_check(fmt: &str, path: &Path) {
    if fmt == "qcow2" {
        let io = image_opts(fmt, path);
        run("qemu-img", &["check", "--object", OBJ, "--image-opts", &io]);
    }
}

fn open(fmt: &str, path: &Path, read_only: bool) -> vdisk::Image {
    OpenOptions::new()
        .format(if fmt == "luks" { Format::Luks } else { Format::Qcow2 })
        .read_only(read_only)
        .key(Secret::new(PASS))
        .open(path)
        .unwrap_or_else(|e| panic!("vdisk cannot open {}: {e}", path.display()))
}

/// What qemu writes in every image, and what vdisk writes.
const QEMU_WRITES: [(u8, u64, u64); 3] = [(0xab, 4096, 8192), (0xcd, 100_001, 777), (0x5a, 700_000, 70_000)];
const VDISK_WRITES: [(u8, u64, u64); 3] = [(0x11, 300_000, 5000), (0x22, 65_536, 65_536), (0x33, 1_048_575, 1)];

/// Whether `got` holds `writes`, and zeros elsewhere when `holes_zero`
/// (qcow2; a standalone volume's unwritten sectors decrypt to noise, with
/// QEMU as with vdisk).
fn holds(got: &[u8], writes: &[(u8, u64, u64)], holes_zero: bool) -> bool {
    if holes_zero {
        return got == model(writes, got.len());
    }
    writes.iter().all(|&(p, o, l)| got[o as usize..(o + l) as usize].iter().all(|&b| b == p))
}

fn model(writes: &[(u8, u64, u64)], size: usize) -> Vec<u8> {
    let mut m = vec![0u8; size];
    for &(p, o, l) in writes {
        m[o as usize..(o + l) as usize].fill(p);
    }
    m
}

/// qemu makes and writes `c`; vdisk reads every byte, writes, and qemu
/// reads vdisk's writes back.
fn qemu_then_vdisk(fmt: &str, dir: &Path, n: usize, c: &[&str; 4]) {
    let p = dir.join(format!("q{n}.{fmt}"));
    let ps = p.display().to_string();
    let o = if fmt == "luks" {
        format!("key-secret=sec0,{}", opts_of(c, ""))
    } else {
        format!("encrypt.format=luks,encrypt.key-secret=sec0,{}", opts_of(c, "encrypt."))
    };
    run("qemu-img", &["create", "-q", "--object", OBJ, "-f", fmt, "-o", &o, &ps, "1M"]);
    let w: Vec<String> = QEMU_WRITES.iter().map(|(p, o, l)| format!("write -P {p} {o} {l}")).collect();
    qemu_io(fmt, &p, &w);
    let size = 1 << 20;
    {
        let img = open(fmt, &p, false);
        let mut got = vec![0u8; size];
        img.read_at(&mut got, 0).unwrap();
        assert!(holds(&got, &QEMU_WRITES, fmt == "qcow2"), "{fmt} {c:?}: vdisk reads differ from what qemu wrote");
        for &(pat, off, len) in &VDISK_WRITES {
            img.write_at(&vec![pat; len as usize], off).unwrap();
        }
        img.close().unwrap();
    }
    let r: Vec<String> = VDISK_WRITES.iter().map(|(p, o, l)| format!("read -P {p} {o} {l}")).collect();
    qemu_io(fmt, &p, &r);
    qemu_io(fmt, &p, &["read -P 0xab 4096 8192".to_string()]);
    qemu_check(fmt, &p);
    std::fs::remove_file(&p).unwrap();
}

/// vdisk creates and writes `c`; qemu reads every byte and checks.
fn vdisk_then_qemu(fmt: &str, dir: &Path, n: usize, c: &[&str; 4]) {
    let p = dir.join(format!("v{n}.{fmt}"));
    let ps = p.display().to_string();
    let size = 1usize << 20;
    if fmt == "luks" {
        let mut params = Luks1Params::default();
        for kv in opts_of(c, "").split(',') {
            let (k, v) = kv.split_once('=').unwrap();
            assert!(params.set(k, v).unwrap());
        }
        let st = Arc::new(FileStorage::create(&p).unwrap());
        let l = Luks::create(st, None, size as u64, &params, &Secret::new(PASS)).unwrap();
        for &(pat, off, len) in &VDISK_WRITES {
            l.write_at(&vec![pat; len as usize], off).unwrap();
        }
        l.close().unwrap();
    } else {
        let mut o = vdisk::qcow2::CreateOptions::new(size as u64);
        o.set("encrypt.format", "luks").unwrap();
        for kv in opts_of(c, "encrypt.").split(',') {
            let (k, v) = kv.split_once('=').unwrap();
            o.set(k, v).unwrap();
        }
        o.encrypt = Some(Secret::new(PASS));
        let q = vdisk::Qcow2::create_file(&p, &o).unwrap();
        for &(pat, off, len) in &VDISK_WRITES {
            q.write_at(&vec![pat; len as usize], off).unwrap();
        }
        q.close().unwrap();
    }
    let out = p.with_extension("raw");
    let io = image_opts(fmt, &p);
    run("qemu-img", &["convert", "--object", OBJ, "--image-opts", &io, "-O", "raw", &out.display().to_string()]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), size);
    assert!(holds(&got, &VDISK_WRITES, fmt == "qcow2"), "{fmt} {c:?}: qemu reads differ from what vdisk wrote");
    qemu_check(fmt, &p);
    let info = run("qemu-img", &["info", "--output=json", &ps]);
    assert!(info.contains(&format!("\"cipher-alg\": \"{}\"", c[0])), "{info}");
    assert!(info.contains(&format!("\"hash-alg\": \"{}\"", c[3])), "{info}");
    std::fs::remove_file(&p).unwrap();
    std::fs::remove_file(&out).unwrap();
}

/// Every payload cipher (alg, mode, ivgen) once, the hash cycling through
/// the five: qemu-img spends a second benchmarking PBKDF2 at each create
/// whatever `iter-time` says, so its side covers each payload cipher and
/// each hash rather than their product (the hash only feeds PBKDF2 and the
/// anti-forensic split, independent of the payload cipher).
fn cipher_matrix() -> Vec<[&'static str; 4]> {
    let mut v = Vec::new();
    let mut n = 0;
    for a in ALGS {
        for m in MODES {
            if (a, m) == ("aes-192", "cbc") {
                continue;
            }
            for i in IVGENS {
                v.push([a, m, i, HASHES[n % HASHES.len()]]);
                n += 1;
            }
        }
    }
    v
}

/// Runs `f` over the full matrix on two threads.
fn over_matrix(f: impl Fn(usize, &[&str; 4]) + Sync) {
    over(matrix(), f)
}

fn over(m: Vec<[&'static str; 4]>, f: impl Fn(usize, &[&str; 4]) + Sync) {
    std::thread::scope(|s| {
        for part in 0..2 {
            let m = &m;
            let f = &f;
            s.spawn(move || {
                for (n, c) in m.iter().enumerate().filter(|(n, _)| n % 2 == part) {
                    f(n, c);
                }
            });
        }
    });
}

#[test]
fn standalone_luks_made_by_qemu_every_cipher() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    over(cipher_matrix(), |n, c| qemu_then_vdisk("luks", d.path(), n, c));
}

#[test]
fn standalone_luks_made_by_vdisk_every_combination() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    over_matrix(|n, c| vdisk_then_qemu("luks", d.path(), n, c));
}

#[test]
fn qcow2_luks_made_by_qemu_every_cipher() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    over(cipher_matrix(), |n, c| qemu_then_vdisk("qcow2", d.path(), n, c));
}

#[test]
fn qcow2_luks_made_by_vdisk_every_combination() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    over_matrix(|n, c| vdisk_then_qemu("qcow2", d.path(), n, c));
}

#[test]
fn wrong_passphrase_is_a_crypto_error_and_writes_nothing() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for fmt in ["luks", "qcow2"] {
        let p = d.path().join(format!("w.{fmt}"));
        let ps = p.display().to_string();
        let o = if fmt == "luks" {
            "key-secret=sec0,iter-time=10"
        } else {
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
        };
        run("qemu-img", &["create", "-q", "--object", OBJ, "-f", fmt, "-o", o, &ps, "1M"]);
        let before = std::fs::read(&p).unwrap();
        let e = OpenOptions::new()
            .format(if fmt == "luks" { Format::Luks } else { Format::Qcow2 })
            .key(Secret::new("wrong"))
            .open(&p)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Crypto, "{e}");
        assert!(e.to_string().contains("passphrase"), "{e}");
        // No key at all: a clear error too, and inspection works.
        let e =
            OpenOptions::new().format(if fmt == "luks" { Format::Luks } else { Format::Qcow2 }).open(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Crypto, "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before, "a failed open changed the file");
        // The CLI says so too, and exits non-zero.
        let bad = image_opts(fmt, &p);
        let (code, _, err) = run_status(
            env!("CARGO_BIN_EXE_vdisk"),
            &["io", "--object", "secret,id=sec0,data=nope", "--image-opts", &bad, "-c", "read 0 512"],
        );
        assert_ne!(code, 0);
        assert!(err.contains("passphrase"), "{err}");
    }
}

/// Whether cryptsetup is there (installed by `scripts/test.sh`).
fn have_cryptsetup() -> bool {
    if run_status("cryptsetup", &["--version"]).0 == 0 {
        return true;
    }
    if std::env::var("VDISK_SKIP_CRYPTSETUP").as_deref() == Ok("1") {
        return false;
    }
    panic!("cryptsetup is needed: apt-get install -y --no-install-recommends cryptsetup-bin");
}

/// qemu-img 10.0 cannot create a detached header (`detached-header` is
/// refused by its option parser), so cryptsetup makes one (`--header`,
/// payload offset 0) and QEMU writes through it; vdisk makes one with its
/// CLI and QEMU writes through that.
#[test]
fn detached_header_both_ways() {
    if !have_qemu() || !have_cryptsetup() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let hdr = d.path().join("h.luks");
    let data = d.path().join("d.raw");
    let pass = d.path().join("pass");
    std::fs::write(&pass, PASS).unwrap();
    let (hs, ds) = (hdr.display().to_string(), data.display().to_string());
    run("qemu-img", &["create", "-q", "-f", "raw", &ds, "1M"]);
    run(
        "cryptsetup",
        &[
            "luksFormat",
            "-q",
            "--type",
            "luks1",
            "--iter-time",
            "10",
            "--key-file",
            &pass.display().to_string(),
            "--header",
            &hs,
            &ds,
        ],
    );
    let io = format!("driver=luks,file.filename={ds},header.driver=file,header.filename={hs},key-secret=sec0");
    run("qemu-io", &["--object", OBJ, "--image-opts", &io, "-c", "write -P 0x77 1000 5000"]);
    let img = OpenOptions::new().format(Format::Luks).luks_header(&hdr).key(Secret::new(PASS)).open(&data).unwrap();
    assert_eq!(img.size(), 1 << 20);
    let mut b = vec![0u8; 5000];
    img.read_at(&mut b, 1000).unwrap();
    assert_eq!(b, vec![0x77; 5000]);
    img.write_at(&[0x66; 512], 8192).unwrap();
    img.close().unwrap();
    let out = run("qemu-io", &["--object", OBJ, "--image-opts", &io, "-c", "read -P 0x66 8192 512"]);
    assert!(!out.contains("fail"), "{out}");
    // The payload file holds no header.
    assert_ne!(&std::fs::read(&data).unwrap()[..6], b"LUKS\xba\xbe");

    // vdisk makes the header with the CLI; qemu uses it, vdisk reads back.
    let hdr2 = d.path().join("h2.luks");
    let h2 = hdr2.display().to_string();
    run(
        env!("CARGO_BIN_EXE_vdisk"),
        &[
            "create",
            "-q",
            "--object",
            OBJ,
            "-f",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10,detached-header=on",
            &h2,
            "0",
        ],
    );
    // (qemu-img info cannot open a header file alone: its payload offset
    // of 0 "overlaps the header"; cryptsetup reads it.)
    let dump = run("cryptsetup", &["luksDump", &h2]);
    assert!(dump.contains("Payload offset:\t0"), "{dump}");
    let io2 = format!("driver=luks,file.filename={ds},header.driver=file,header.filename={h2},key-secret=sec0");
    run("qemu-io", &["--object", OBJ, "--image-opts", &io2, "-c", "write -P 0x55 0 4096"]);
    let v =
        run(env!("CARGO_BIN_EXE_vdisk"), &["io", "--object", OBJ, "--image-opts", &io2, "-c", "read -P 0x55 0 4096"]);
    assert!(v.contains("read 4096/4096"), "{v}");
}

#[test]
fn cryptsetup_luks1_header_reads() {
    // cryptsetup formats LUKS1 on a plain file; vdisk unlocks it with the
    // passphrase and its payload cipher matches the volume key cryptsetup
    // reports (checked by decrypting what vdisk wrote with that key).
    if !have_cryptsetup() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.img");
    let pass = d.path().join("pass");
    std::fs::write(&pass, PASS).unwrap();
    std::fs::write(&p, vec![0u8; 4 << 20]).unwrap();
    let ps = p.display().to_string();
    let kf = pass.display().to_string();
    run(
        "cryptsetup",
        &[
            "luksFormat",
            "-q",
            "--type",
            "luks1",
            "--iter-time",
            "10",
            "--key-file",
            &kf,
            "--cipher",
            "aes-cbc-essiv:sha256",
            "--key-size",
            "256",
            &ps,
        ],
    );
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, false).unwrap());
    let l = Luks::open(st, LuksOptions { key: Some(Secret::new(PASS)), ..Default::default() }).unwrap();
    let h = l.header().unwrap();
    assert_eq!(h.cipher_mode, "cbc-essiv:sha256");
    assert_eq!(l.size(), (4 << 20) - h.payload_bytes());
    l.write_at(&[0x42; 4096], 0).unwrap();
    l.close().unwrap();
    // qemu reads the cryptsetup volume with what vdisk wrote.
    let io = image_opts("luks", &p);
    let out = run("qemu-io", &["--object", OBJ, "--image-opts", &io, "-c", "read -P 0x42 0 4096"]);
    assert!(!out.contains("fail"), "{out}");
    let (c, _, _) = run_status("cryptsetup", &["open", "--test-passphrase", "--key-file", &kf, &ps]);
    assert_eq!(c, 0);
}

/// Key slots: added and removed with vdisk, unlocked by qemu; added and
/// removed with qemu-img amend, unlocked by vdisk; the last slot is never
/// erased without --force.
#[test]
fn keyslots_both_ways() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let vd = env!("CARGO_BIN_EXE_vdisk");
    let objs = ["--object", OBJ, "--object", "secret,id=sec1,data=second", "--object", "secret,id=sec2,data=third"];
    for fmt in ["luks", "qcow2"] {
        let p = d.path().join(format!("k.{fmt}"));
        let ps = p.display().to_string();
        let (pre, o) = if fmt == "luks" {
            ("", "key-secret=sec0,iter-time=10")
        } else {
            ("encrypt.", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10")
        };
        run(vd, &["create", "-q", "--object", OBJ, "-f", fmt, "-o", o, &ps, "1M"]);
        let with = |id: &str| match fmt {
            "luks" => format!("driver=luks,file.filename={ps},key-secret={id}"),
            _ => format!("driver=qcow2,file.filename={ps},encrypt.key-secret={id}"),
        };
        let amend = |tool: &str, id: &str, opts: String, force: bool| {
            let io = with(id);
            let mut args: Vec<&str> = vec!["amend"];
            args.extend(objs);
            args.extend(["--image-opts", &io, "-o", &opts]);
            if force {
                args.push("--force");
            }
            run_status(tool, &args)
        };
        let qemu_opens = |id: &str| {
            let io = with(id);
            let mut args: Vec<&str> = objs.to_vec();
            args.extend(["--image-opts", &io, "-c", "read 0 512"]);
            run_status("qemu-io", &args).0 == 0
        };
        let vdisk_opens = |id: &str| {
            let io = with(id);
            let mut args: Vec<&str> = vec!["io"];
            args.extend(objs);
            args.extend(["--image-opts", &io, "-c", "read 0 512"]);
            run_status(vd, &args).0 == 0
        };
        // vdisk adds sec1, qemu opens with it.
        let r = amend(vd, "sec0", format!("{pre}state=active,{pre}new-secret=sec1,{pre}iter-time=10"), false);
        assert_eq!(r.0, 0, "{r:?}");
        assert!(qemu_opens("sec1") && qemu_opens("sec0"));
        // vdisk removes sec0 by passphrase; qemu no longer opens with it.
        let r = amend(vd, "sec1", format!("{pre}state=inactive,{pre}old-secret=sec0"), false);
        assert_eq!(r.0, 0, "{r:?}");
        assert!(!qemu_opens("sec0") && qemu_opens("sec1"));
        // The last slot stays unless forced.
        let r = amend(vd, "sec1", format!("{pre}state=inactive,{pre}keyslot=1"), false);
        assert_ne!(r.0, 0);
        assert!(r.2.contains("last active key slot"), "{}", r.2);
        assert!(vdisk_opens("sec1"));
        // qemu-img amend adds sec2 in slot 5 and removes sec1; vdisk follows.
        let r = amend(
            "qemu-img",
            "sec1",
            format!("{pre}state=active,{pre}new-secret=sec2,{pre}iter-time=10,{pre}keyslot=5"),
            false,
        );
        assert_eq!(r.0, 0, "{r:?}");
        assert!(vdisk_opens("sec2") && vdisk_opens("sec1"));
        let r = amend("qemu-img", "sec2", format!("{pre}state=inactive,{pre}keyslot=1"), false);
        assert_eq!(r.0, 0, "{r:?}");
        assert!(vdisk_opens("sec2") && !vdisk_opens("sec1"));
        // vdisk refuses to overwrite qemu's active slot 5.
        let r = amend(
            vd,
            "sec2",
            format!("{pre}state=active,{pre}new-secret=sec1,{pre}keyslot=5,{pre}iter-time=10"),
            false,
        );
        assert_ne!(r.0, 0);
        if fmt == "qcow2" {
            let io = with("sec2");
            let mut args: Vec<&str> = vec!["check"];
            args.extend(objs);
            args.extend(["--image-opts", &io]);
            assert_eq!(run_status("qemu-img", &args).0, 0);
        }
    }
}

/// `vdisk info` (no passphrase) shows the LUKS facts `qemu-img info` shows.
#[test]
fn info_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (fmt, o) in [
        ("luks", "key-secret=sec0,iter-time=10,cipher-mode=cbc,ivgen-alg=essiv"),
        ("qcow2", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"),
    ] {
        let p = d.path().join(format!("i.{fmt}"));
        let ps = p.display().to_string();
        run("qemu-img", &["create", "-q", "--object", OBJ, "-f", fmt, "-o", o, &ps, "1M"]);
        // The image's own format-specific object (the child file nodes have
        // theirs), compared as JSON values.
        let fs = |s: String| -> serde_json::Value {
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"));
            v["format-specific"].clone()
        };
        let q = fs(run("qemu-img", &["info", "--output=json", &ps]));
        let v = fs(run(env!("CARGO_BIN_EXE_vdisk"), &["info", "--output=json", &ps]));
        assert_eq!(q, v, "\nqemu:  {q}\nvdisk: {v}");
        let v = v.to_string();
        assert!(v.contains("\"payload-offset\""), "{v}");
    }
}

/// A LUKS qcow2 overlay (extended L2, 16 KiB clusters) over a raw backing
/// file, and an internal snapshot: partial writes copy on write from the
/// backing file and from snapshot-shared clusters, re-encrypted at their
/// new host offsets; qemu and vdisk read each other's results exactly.
#[test]
fn qcow2_luks_backing_extended_l2_and_snapshots() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    let img = d.path().join("o.qcow2");
    let (bs, is) = (base.display().to_string(), img.display().to_string());
    run("qemu-img", &["create", "-q", "-f", "raw", &bs, "1M"]);
    run("qemu-io", &["-f", "raw", &bs, "-c", "write -P 0x61 0 1M"]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            OBJ,
            "-f",
            "qcow2",
            "-b",
            &bs,
            "-F",
            "raw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,extended_l2=on,cluster_size=16k",
            &is,
        ],
    );
    qemu_io("qcow2", &img, &["write -P 0x62 5000 3000".into()]);
    let want = |img: &Path| {
        let out = img.with_extension("raw");
        let io = image_opts("qcow2", img);
        run("qemu-img", &["convert", "--object", OBJ, "--image-opts", &io, "-O", "raw", &out.display().to_string()]);
        std::fs::read(&out).unwrap()
    };
    let open_rw = || {
        OpenOptions::new()
            .format(Format::Qcow2)
            .key(Secret::new(PASS))
            .backing(vdisk::BackingPolicy::Follow)
            .open(&img)
            .unwrap()
    };
    let exported = want(&img);
    {
        let v = open_rw();
        let mut got = vec![0u8; 1 << 20];
        v.read_at(&mut got, 0).unwrap();
        assert!(got == exported, "vdisk reads differ from qemu's export");
        // Partial writes: inside qemu's cluster, and into clusters that
        // still read from the backing file.
        v.write_at(&[0x63; 700], 6000).unwrap();
        v.write_at(&[0x64; 9000], 100_000).unwrap();
        // A long run of new clusters: encrypted on several threads.
        v.write_at(&[0x66; 400 << 10], 600_000).unwrap();
        let mut back = vec![0u8; 400 << 10];
        v.read_at(&mut back, 600_000).unwrap();
        assert!(back.iter().all(|&b| b == 0x66));
        v.close().unwrap();
    }
    let mut model = vec![0x61u8; 1 << 20];
    model[5000..8000].fill(0x62);
    model[6000..6700].fill(0x63);
    model[100_000..109_000].fill(0x64);
    model[600_000..600_000 + (400 << 10)].fill(0x66);
    assert!(want(&img) == model, "qemu reads differ from what vdisk wrote");
    qemu_check("qcow2", &img);
    // A snapshot, then a partial write to a shared cluster (copy on write).
    let io = image_opts("qcow2", &img);
    run("qemu-img", &["snapshot", "--object", OBJ, "--image-opts", &io, "-c", "s1"]);
    {
        let v = open_rw();
        v.write_at(&[0x65; 100], 5100).unwrap();
        v.close().unwrap();
    }
    model[5100..5200].fill(0x65);
    assert!(want(&img) == model, "qemu reads differ after the copy on write");
    qemu_check("qcow2", &img);
    let snap = d.path().join("snap.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            OBJ,
            "--image-opts",
            "-l",
            "snapshot.name=s1",
            &io,
            "-O",
            "raw",
            &snap.display().to_string(),
        ],
    );
    let s = std::fs::read(&snap).unwrap();
    assert_eq!(&s[5100..5200], &[0x62u8; 100][..], "the snapshot lost its data");
    assert_eq!(&s[6000..6700], &[0x63u8; 700][..], "the snapshot lost its data");
}

/// A volume qemu-img makes with its default two-second `iter-time` (about
/// nine million PBKDF2 iterations on a current CPU) opens: the hostile-header
/// limits leave room for what QEMU writes.
#[test]
fn default_iter_time_volumes_open() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("default.luks");
    let ps = p.display().to_string();
    run("qemu-img", &["create", "-q", "--object", OBJ, "-f", "luks", "-o", "key-secret=sec0", &ps, "1M"]);
    qemu_io("luks", &p, &["write -P 0x42 0 64k".to_string()]);
    let img = open("luks", &p, true);
    let mut b = vec![0u8; 65536];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x42));
}
