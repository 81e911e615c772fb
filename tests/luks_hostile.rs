//! Hostile LUKS headers, in the style of `qcow2_corrupt.rs`: fields of a
//! qemu-made LUKS1 header (standalone, and inside a qcow2 image) poked to
//! hostile values, each giving the expected error kind at open, quickly
//! (iteration counts are refused before any key derivation), never a panic.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{have_qemu, run};
use vdisk::{ErrorKind, Format, OpenOptions, Secret};

const OBJ: &str = "secret,id=sec0,data=pw";

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn text32(s: &str) -> Vec<u8> {
    let mut b = vec![0u8; 32];
    b[..s.len()].copy_from_slice(s.as_bytes());
    b
}

/// Key slot `i`'s field at `off` within its 48-byte entry.
fn slot(i: usize, off: usize) -> usize {
    208 + 48 * i + off
}

struct Poke {
    name: &'static str,
    /// (offset in the LUKS header, bytes).
    edits: Vec<(usize, Vec<u8>)>,
    expect: ErrorKind,
    /// Words the message must contain.
    says: &'static [&'static str],
}

fn pokes() -> Vec<Poke> {
    let p = |name, edits, expect, says| Poke { name, edits, expect, says };
    vec![
        p("magic", vec![(0, b"LUKX".to_vec())], ErrorKind::InvalidImage, &["magic"]),
        p("version 2", vec![(6, vec![0, 2])], ErrorKind::Unsupported, &["LUKS2"]),
        p("version 7", vec![(6, vec![0, 7])], ErrorKind::Unsupported, &["version"]),
        p("cipher twofish", vec![(8, text32("twofish"))], ErrorKind::Unsupported, &["twofish"]),
        p("cipher name not text", vec![(8, vec![0xff; 32])], ErrorKind::InvalidImage, &["cipher_name"]),
        p("mode ecb", vec![(40, text32("ecb"))], ErrorKind::Unsupported, &["ecb"]),
        p("ivgen benbi", vec![(40, text32("xts-benbi"))], ErrorKind::Unsupported, &["benbi"]),
        p("essiv hash unknown", vec![(40, text32("cbc-essiv:md5"))], ErrorKind::Unsupported, &["md5"]),
        p("hash ripemd160", vec![(72, text32("ripemd160"))], ErrorKind::Unsupported, &["ripemd160"]),
        p("key bytes 0", vec![(108, be32(0))], ErrorKind::InvalidImage, &["key"]),
        p("key bytes 17", vec![(108, be32(17))], ErrorKind::InvalidImage, &["17"]),
        p("key bytes huge", vec![(108, be32(u32::MAX))], ErrorKind::InvalidImage, &["key"]),
        p("mk digest iterations 0", vec![(164, be32(0))], ErrorKind::InvalidImage, &["iteration"]),
        p("mk digest iterations 2^31", vec![(164, be32(1 << 31))], ErrorKind::LimitExceeded, &["iteration", "limit"]),
        p("slot iterations 2^32-1", vec![(slot(0, 4), be32(u32::MAX))], ErrorKind::LimitExceeded, &["limit"]),
        p("slot iterations 0", vec![(slot(0, 4), be32(0))], ErrorKind::InvalidImage, &["iteration"]),
        p("slot state garbage", vec![(slot(3, 0), be32(0x1234))], ErrorKind::InvalidImage, &["slot 3"]),
        p("stripes 0", vec![(slot(0, 44), be32(0))], ErrorKind::InvalidImage, &["stripes"]),
        p("stripes 2^32-1", vec![(slot(0, 44), be32(u32::MAX))], ErrorKind::LimitExceeded, &["stripes"]),
        p("key offset in header", vec![(slot(0, 40), be32(0))], ErrorKind::InvalidImage, &["overlaps the header"]),
        p("key offset past payload", vec![(slot(7, 40), be32(0x7fff_0000))], ErrorKind::InvalidImage, &["slot 7"]),
        p("slots overlap", vec![(slot(1, 40), be32(9))], ErrorKind::InvalidImage, &["overlapping"]),
        p("payload inside key material", vec![(104, be32(100))], ErrorKind::InvalidImage, &["payload"]),
        p(
            "all slots inactive",
            (0..8).map(|i| (slot(i, 0), be32(0xdead))).collect(),
            ErrorKind::Crypto,
            &["passphrase"],
        ),
    ]
}

fn apply(img: &Path, base: usize, edits: &[(usize, Vec<u8>)]) {
    let mut b = std::fs::read(img).unwrap();
    for (o, v) in edits {
        b[base + o..base + o + v.len()].copy_from_slice(v);
    }
    std::fs::write(img, b).unwrap();
}

fn check(fmt: Format, img: &Path, poke: &Poke) {
    let t = Instant::now();
    let r = OpenOptions::new().format(fmt).key(Secret::new("pw")).open(img);
    let e = match r {
        Ok(_) => panic!("{fmt} {}: opened", poke.name),
        Err(e) => e,
    };
    assert!(t.elapsed() < Duration::from_secs(5), "{fmt} {}: took {:?}", poke.name, t.elapsed());
    // A qcow2 image that keeps a key slot past the payload still opens its
    // header area; the LUKS parse errors are what matter.
    // A standalone volume is read as LUKS2 (whose header pair the poked
    // LUKS1 bytes are not); qcow2 keeps LUKS1 only, as QEMU.
    let expect = if poke.name == "version 2" && fmt == Format::Luks { ErrorKind::InvalidImage } else { poke.expect };
    assert_eq!(e.kind(), expect, "{fmt} {}: {e}", poke.name);
    for w in poke.says {
        assert!(e.to_string().contains(w), "{fmt} {}: '{e}' does not say '{w}'", poke.name);
    }
    // Inspection (no key) refuses the same header, except where only the
    // passphrase was at stake.
    let i = OpenOptions::new().format(fmt).read_only(true).inspect_only(true).open(img);
    if poke.expect != ErrorKind::Crypto {
        assert!(i.is_err(), "{fmt} {}: inspection accepted the header", poke.name);
    }
}

#[test]
fn hostile_standalone_headers() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let orig = d.path().join("orig.luks");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            OBJ,
            "-f",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10",
            orig.to_str().unwrap(),
            "64k",
        ],
    );
    for poke in pokes() {
        let img = d.path().join("poked.luks");
        std::fs::copy(&orig, &img).unwrap();
        apply(&img, 0, &poke.edits);
        check(Format::Luks, &img, &poke);
    }
}

#[test]
fn hostile_qcow2_luks_headers() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let orig = d.path().join("orig.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            OBJ,
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            orig.to_str().unwrap(),
            "1M",
        ],
    );
    let base =
        vdisk::Qcow2::read_header(&vdisk::FileStorage::open(&orig, true).unwrap()).unwrap().crypto_header.unwrap().0
            as usize;
    for poke in pokes() {
        // The payload offset is unused inside qcow2.
        if poke.name == "payload inside key material" || poke.name == "key offset past payload" {
            continue;
        }
        let img = d.path().join("poked.qcow2");
        std::fs::copy(&orig, &img).unwrap();
        apply(&img, base, &poke.edits);
        check(Format::Qcow2, &img, &poke);
    }
}

#[test]
fn truncated_volumes_are_refused() {
    if !have_qemu() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let orig = d.path().join("orig.luks");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            OBJ,
            "-f",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10",
            orig.to_str().unwrap(),
            "64k",
        ],
    );
    let full = std::fs::read(&orig).unwrap();
    for cut in [0usize, 6, 100, 591, 592, 4096, 100_000, full.len() - 65536 - 1] {
        let img = d.path().join("cut.luks");
        std::fs::write(&img, &full[..cut]).unwrap();
        let e = OpenOptions::new().format(Format::Luks).key(Secret::new("pw")).open(&img).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidImage, "cut at {cut}: {e}");
    }
}
