//! The corruption table, in the style of QEMU's iotest 080: header fields and
//! table entries of a qemu-made image poked to hostile values, each giving the
//! expected error kind (at open, or at the read that meets it), never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use vdisk::{BackingPolicy, BlockDevice, ErrorKind, Format, OpenOptions};

fn be(v: u64, width: usize) -> Vec<u8> {
    v.to_be_bytes()[8 - width..].to_vec()
}

fn read_be(bytes: &[u8], off: usize, width: usize) -> u64 {
    let mut b = [0u8; 8];
    b[8 - width..].copy_from_slice(&bytes[off..off + width]);
    u64::from_be_bytes(b)
}

/// A 4 MiB image with 64 KiB clusters: guest cluster 0 and 1 data, cluster 2
/// compressed.
fn base(dir: &Path) -> PathBuf {
    let img = p(dir, "base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    qemu_io("qcow2", &img, &["write -c -P 0x33 128k 64k".into(), "write -P 0x5a 0 128k".into()]);
    img
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Opening read-only fails with this kind.
    Open(ErrorKind),
    /// Opening works; reading the first 192 KiB fails with this kind.
    Read(ErrorKind),
    /// Opening read-write fails with this kind, read-only works.
    OpenRw(ErrorKind),
    /// As `Read`, and the message says each of these.
    ReadSays(ErrorKind, &'static [&'static str]),
}

/// Computes (offset, bytes) edits from the original image.
type Edit = fn(&[u8]) -> Vec<(usize, Vec<u8>)>;

struct Poke {
    name: &'static str,
    /// The edits.
    edit: Edit,
    expect: Expect,
}

fn l1(img: &[u8]) -> usize {
    read_be(img, 40, 8) as usize
}
fn l2(img: &[u8]) -> usize {
    (read_be(img, l1(img), 8) & 0x00ff_ffff_ffff_fe00) as usize
}
/// Sets `bits` in the 8-byte entry at `off`.
fn set_bits(img: &[u8], off: usize, bits: u64) -> Vec<(usize, Vec<u8>)> {
    vec![(off, be(read_be(img, off, 8) | bits, 8))]
}

const POKES: &[Poke] = &[
    Poke { name: "bad magic", edit: |_| vec![(0, be(0x1234_5678, 4))], expect: Expect::Open(ErrorKind::InvalidImage) },
    Poke { name: "version 4", edit: |_| vec![(4, be(4, 4))], expect: Expect::Open(ErrorKind::Unsupported) },
    Poke { name: "cluster_bits 8", edit: |_| vec![(20, be(8, 4))], expect: Expect::Open(ErrorKind::InvalidImage) },
    Poke { name: "cluster_bits 22", edit: |_| vec![(20, be(22, 4))], expect: Expect::Open(ErrorKind::InvalidImage) },
    Poke { name: "size 2^62", edit: |_| vec![(24, be(1 << 62, 8))], expect: Expect::Open(ErrorKind::InvalidImage) },
    Poke {
        name: "crypt_method 1 without key",
        edit: |_| vec![(32, be(1, 4))],
        expect: Expect::Open(ErrorKind::Crypto),
    },
    Poke {
        // LUKS without the encryption header extension that locates it.
        name: "crypt_method 2 (luks) without its header",
        edit: |_| vec![(32, be(2, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke { name: "crypt_method 3", edit: |_| vec![(32, be(3, 4))], expect: Expect::Open(ErrorKind::InvalidImage) },
    Poke {
        name: "l1_size huge",
        edit: |_| vec![(36, be(0x1000_0000, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke { name: "l1_size 0 for 4 MiB", edit: |_| vec![(36, be(0, 4))], expect: Expect::Open(ErrorKind::InvalidImage) },
    Poke {
        name: "l1 offset unaligned",
        edit: |i| vec![(40, be(l1(i) as u64 + 1, 8))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "l1 offset past EOF",
        edit: |_| vec![(40, be(1 << 40, 8))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "l1 offset 0 (header)",
        edit: |_| vec![(40, be(0, 8))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "refcount table overlaps header",
        edit: |_| vec![(48, be(0, 8))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "refcount table unaligned",
        edit: |_| vec![(48, be(0x10200, 8))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "refcount_table_clusters 0",
        edit: |_| vec![(56, be(0, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "refcount table too large",
        edit: |_| vec![(56, be(0x10000, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "nb_snapshots 70000",
        edit: |_| vec![(60, be(70000, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "snapshot table unaligned",
        edit: |_| vec![(60, be(1, 4)), (64, be(0x10008, 8))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "snapshot table past EOF",
        edit: |_| vec![(60, be(1, 4)), (64, be(1 << 40, 8))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "unknown incompatible bit",
        edit: |_| vec![(72, be(1 << 20, 8))],
        expect: Expect::Open(ErrorKind::Unsupported),
    },
    Poke {
        name: "data file bit without a name",
        edit: |_| vec![(72, be(1 << 2, 8))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "zstd bit with zlib type",
        edit: |_| vec![(72, be(1 << 3, 8))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke { name: "compression type 5", edit: |_| vec![(104, vec![5])], expect: Expect::Open(ErrorKind::InvalidImage) },
    Poke { name: "refcount_order 7", edit: |_| vec![(96, be(7, 4))], expect: Expect::Open(ErrorKind::InvalidImage) },
    Poke {
        name: "header_length 100",
        edit: |_| vec![(100, be(100, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "header_length 0x20000",
        edit: |_| vec![(100, be(0x20000, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "extension runs past the cluster",
        edit: |_| vec![(112, be(0x1234_5678, 4)), (116, be(0xffff, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "backing name offset past the first cluster",
        edit: |_| vec![(8, be(0x20000, 8)), (16, be(10, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke {
        name: "backing name too long",
        edit: |_| vec![(8, be(0x400, 8)), (16, be(2000, 4))],
        expect: Expect::Open(ErrorKind::InvalidImage),
    },
    Poke { name: "corrupt bit", edit: |_| vec![(72, be(1 << 1, 8))], expect: Expect::OpenRw(ErrorKind::Corrupt) },
    Poke {
        name: "L1 entry points at an unaligned L2 table",
        edit: |i| vec![(l1(i), be((l2(i) as u64 + 0x200) | 1 << 63, 8))],
        expect: Expect::Read(ErrorKind::Corrupt),
    },
    Poke {
        name: "L2 entry unaligned",
        edit: |i| {
            let e = read_be(i, l2(i), 8);
            vec![(l2(i), be(e + 0x1000, 8))]
        },
        expect: Expect::Read(ErrorKind::Corrupt),
    },
    Poke {
        name: "compressed descriptor past EOF",
        edit: |i| {
            // Guest cluster 2 is compressed: keep the flag and the sector
            // count, move the offset far past the end of the file.
            let off = l2(i) + 16;
            let e = read_be(i, off, 8);
            let x = 62 - (16 - 8);
            let offset_mask = (1u64 << x) - 1;
            vec![(off, be((e & !offset_mask) | (1 << 40), 8))]
        },
        expect: Expect::Read(ErrorKind::Corrupt),
    },
    Poke {
        name: "compressed descriptor over garbage",
        edit: |i| {
            let off = l2(i) + 16;
            let e = read_be(i, off, 8);
            let x = 62 - (16 - 8);
            let offset_mask = (1u64 << x) - 1;
            // Point it at the L1 table: not a deflate stream.
            vec![(off, be((e & !offset_mask) | l1(i) as u64, 8))]
        },
        expect: Expect::Read(ErrorKind::Corrupt),
    },
    // Reserved bits (QEMU's L1E_RESERVED_MASK, L2E_STD_RESERVED_MASK, and
    // COPIED in a compressed descriptor): `qemu-img check` counts them as
    // corruption; vdisk refuses to use such an entry.
    Poke {
        name: "L1 entry with reserved bit 56",
        edit: |i| set_bits(i, l1(i), 1 << 56),
        expect: Expect::ReadSays(ErrorKind::Corrupt, &["L1 entry 0", "reserved bits 0x100000000000000"]),
    },
    Poke {
        name: "L1 entry with reserved bit 0",
        edit: |i| set_bits(i, l1(i), 1),
        expect: Expect::ReadSays(ErrorKind::Corrupt, &["L1 entry 0", "reserved bits 0x1 "]),
    },
    Poke {
        name: "L2 entry with reserved bit 1",
        edit: |i| set_bits(i, l2(i), 1 << 1),
        expect: Expect::ReadSays(ErrorKind::Corrupt, &["L2 entry 0", "reserved bits 0x2 "]),
    },
    Poke {
        name: "L2 entry with reserved bit 61",
        edit: |i| set_bits(i, l2(i) + 8, 1 << 61),
        expect: Expect::ReadSays(ErrorKind::Corrupt, &["L2 entry 1", "reserved bits 0x2000000000000000"]),
    },
    Poke {
        name: "compressed descriptor with COPIED",
        edit: |i| set_bits(i, l2(i) + 16, 1 << 63),
        expect: Expect::ReadSays(ErrorKind::Corrupt, &["L2 entry 2", "COPIED", "0x8000000000000000"]),
    },
];

fn open(path: &Path, ro: bool) -> vdisk::Result<vdisk::Image> {
    OpenOptions::new().format(Format::Qcow2).read_only(ro).backing(BackingPolicy::Never).open(path)
}

#[test]
fn poke_table() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = base(dir.path());
    let orig = std::fs::read(&img).unwrap();
    for (n, poke) in POKES.iter().enumerate() {
        let mut bytes = orig.clone();
        for (off, val) in (poke.edit)(&orig) {
            bytes[off..off + val.len()].copy_from_slice(&val);
        }
        let path = p(dir.path(), &format!("poke{n}.qcow2"));
        std::fs::write(&path, &bytes).unwrap();
        match poke.expect {
            Expect::Open(kind) => {
                let e = open(&path, true).expect_err(poke.name);
                assert_eq!(e.kind(), kind, "{}: {e}", poke.name);
                assert!(!e.to_string().is_empty());
            }
            Expect::OpenRw(kind) => {
                let e = open(&path, false).expect_err(poke.name);
                assert_eq!(e.kind(), kind, "{}: {e}", poke.name);
                open(&path, true).unwrap_or_else(|e| panic!("{}: read-only open failed: {e}", poke.name));
            }
            Expect::Read(kind) | Expect::ReadSays(kind, _) => {
                let dev = open(&path, true).unwrap_or_else(|e| panic!("{}: open failed: {e}", poke.name));
                let mut buf = vec![0u8; 192 << 10];
                let e = dev.read_at(&mut buf, 0).expect_err(poke.name);
                assert_eq!(e.kind(), kind, "{}: {e}", poke.name);
                if let Expect::ReadSays(_, says) = poke.expect {
                    for s in says {
                        assert!(e.to_string().contains(s), "{}: '{e}' does not say '{s}'", poke.name);
                    }
                }
            }
        }
    }
}

#[test]
fn error_messages_name_the_field() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = base(dir.path());
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[20..24].copy_from_slice(&be(8, 4));
    std::fs::write(&img, &bytes).unwrap();
    let e = open(&img, true).unwrap_err();
    assert_eq!(e.field(), Some("cluster_bits"));
    let s = e.to_string();
    assert!(s.contains("cluster_bits 8") && s.contains("base.qcow2"), "{s}");
}

/// A reserved bit in an L1 and in an L2 entry: the error names the field,
/// the entry's value and its host offset, opening read-write refuses the
/// same reads without marking the image corrupt, and vdisk's check counts
/// the corruption as `qemu-img check` does.
#[test]
fn reserved_bits_name_the_entry_and_agree_with_qemu_check() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = base(dir.path());
    let orig = std::fs::read(&img).unwrap();
    let (l1_off, l2_off) = (l1(&orig), l2(&orig));
    let cases: [(&str, usize, u64, &str); 3] = [
        ("l1.qcow2", l1_off, 1 << 57, "L1 entry"),
        ("l2.qcow2", l2_off + 8, 1 << 3, "L2 entry"),
        ("c.qcow2", l2_off + 16, 1 << 63, "L2 entry"),
    ];
    for (name, at, bit, field) in cases {
        let mut bytes = orig.clone();
        for (off, val) in set_bits(&orig, at, bit) {
            bytes[off..off + val.len()].copy_from_slice(&val);
        }
        let path = p(dir.path(), name);
        std::fs::write(&path, &bytes).unwrap();
        let value = format!("{:#018x}", read_be(&bytes, at, 8));
        for ro in [true, false] {
            let dev = open(&path, ro).unwrap_or_else(|e| panic!("{name}: open (read-only {ro}) failed: {e}"));
            let mut buf = vec![0u8; 192 << 10];
            let e = dev.read_at(&mut buf, 0).expect_err(name);
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
            assert_eq!(e.field(), Some(field), "{name}: {e}");
            assert_eq!(e.offset(), Some(at as u64), "{name}: {e}");
            assert!(e.to_string().contains(&value), "{name}: '{e}' does not name the value {value}");
        }
        // Nothing was marked corrupt: the header is as poked.
        assert_eq!(std::fs::read(&path).unwrap()[..4096], bytes[..4096], "{name}: the header changed");
        let q = vdisk::Qcow2::open(
            std::sync::Arc::new(vdisk::FileStorage::open(&path, true).unwrap()),
            vdisk::Qcow2Options { read_only: true, ..Default::default() },
        )
        .unwrap();
        let report = q.check(vdisk::qcow2::Repair::None).unwrap();
        let (code, json) = qemu_check(&path, "qcow2");
        assert_eq!(code, 2, "{name}: qemu-img check:\n{json}");
        let key = "\"corruptions\": ";
        let at = json.find(key).unwrap_or_else(|| panic!("{name}: no corruptions in {json}")) + key.len();
        let qemu: u64 = json[at..].split([',', '\n', '}']).next().unwrap().trim().parse().unwrap();
        assert_eq!(report.corruptions, qemu, "{name}: vdisk {:?} vs qemu-img {json}", report.messages);
        assert!(
            report.messages.iter().any(|m| m.contains("reserved bits") || m.contains("COPIED")),
            "{name}: {report:?}"
        );
    }
}

#[test]
fn backing_loops_and_depth() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    // An image that names itself as its backing file.
    let me = p(dir.path(), "self.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", me.to_str().unwrap(), "1M"]);
    qemu_img(&["rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", me.to_str().unwrap()]);
    let e = OpenOptions::new().format(Format::Qcow2).read_only(true).open(&me).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
    assert!(e.to_string().contains("loops"), "{e}");
    // A loop of two.
    let a = p(dir.path(), "a.qcow2");
    let b = p(dir.path(), "b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "1M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b.to_str().unwrap()]);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a.to_str().unwrap()]);
    let e = OpenOptions::new().format(Format::Qcow2).read_only(true).open(&b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
    // A chain of 12 is deeper than the limit of 10.
    let mut prev = "c0.qcow2".to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", p(dir.path(), &prev).to_str().unwrap(), "1M"]);
    for i in 1..12 {
        let name = format!("c{i}.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", &prev, "-F", "qcow2", p(dir.path(), &name).to_str().unwrap()]);
        prev = name;
    }
    let e = OpenOptions::new().format(Format::Qcow2).read_only(true).open(p(dir.path(), &prev)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    // Policy: a backing file without a recorded format is refused by default.
    let nf = p(dir.path(), "nofmt.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "c0.qcow2", "-F", "qcow2", nf.to_str().unwrap()]);
    // Turn the backing format extension into an unknown one.
    let mut bytes = std::fs::read(&nf).unwrap();
    let at = bytes.windows(4).position(|w| w == [0xE2, 0x79, 0x2A, 0xCA]).unwrap();
    bytes[at..at + 4].copy_from_slice(&[0x0A, 0x0B, 0x0C, 0x0D]);
    std::fs::write(&nf, &bytes).unwrap();

    let e = OpenOptions::new().format(Format::Qcow2).read_only(true).open(&nf).unwrap_err();
    assert_eq!(e.field(), Some("backing_format"), "{e}");
    // ...and followed with probing when the caller allows it.
    let dev =
        OpenOptions::new().format(Format::Qcow2).read_only(true).backing(BackingPolicy::Follow).open(&nf).unwrap();
    assert!(dev.backing().is_some());
    // confine_to keeps backing files inside a directory.
    let sub = p(dir.path(), "sub");
    std::fs::create_dir(&sub).unwrap();
    let esc = p(&sub, "escape.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "../c0.qcow2", "-F", "qcow2", esc.to_str().unwrap()]);
    let e = OpenOptions::new().format(Format::Qcow2).read_only(true).confine_to(&sub).open(&esc).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
}

#[test]
fn probing_never_upgrades_raw() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    // A raw disk whose first sector a guest filled with a qcow2 header that
    // names a host file as backing file.
    let q = p(dir.path(), "trap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", q.to_str().unwrap(), "1M"]);
    let raw = p(dir.path(), "guest.raw");
    let mut bytes = std::fs::read(&q).unwrap();
    bytes.resize(1 << 20, 0);
    std::fs::write(&raw, &bytes).unwrap();
    let dev = OpenOptions::new().format(Format::Raw).read_only(true).open(&raw).unwrap();
    assert_eq!(dev.format(), Format::Raw);
    assert_eq!(dev.size(), 1 << 20);
    let mut head = [0u8; 4];
    dev.read_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"QFI\xfb");
    // Without a format and without opting in to probing, nothing is guessed.
    let e = OpenOptions::new().read_only(true).open(&raw).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}
