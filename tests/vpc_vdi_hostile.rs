//! VHD (`vpc`) and VDI under hostile bytes and power loss: a corruption
//! table per format (each poked field gives a clean error of the expected
//! kind, at open or on use, never a panic), truncation at many lengths, and
//! a crash at every write of an allocating workload (the image still opens
//! in vdisk and in qemu-img, every byte reads as before or after its write,
//! and later allocations do not disturb what was there).

mod common;

use std::sync::Arc;

use common::*;
use vdisk::testing::{FaultMode, FaultyStorage, Survivors};
use vdisk::vdi::{Vdi, VdiCreateOptions, VdiOptions};
use vdisk::vpc::{Vpc, VpcCreateOptions, VpcOptions};
use vdisk::{BlockDevice, ErrorKind, MemStorage, Storage};

const SIZE: u64 = 8 << 20; // four VHD blocks, eight VDI blocks

fn vpc_image(opts: &str) -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let v = Vpc::create(st.clone(), SIZE, &VpcCreateOptions::parse(opts).unwrap()).unwrap();
    v.write_at(&[0xcdu8; 4096], 4 << 20).unwrap();
    v.close().unwrap();
    st.to_vec()
}

fn vdi_image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let v = Vdi::create(st.clone(), SIZE, &VdiCreateOptions::default()).unwrap();
    v.write_at(&[0xcdu8; 4096], 4 << 20).unwrap();
    v.close().unwrap();
    st.to_vec()
}

fn open_vpc(b: Vec<u8>) -> vdisk::Result<Vpc> {
    Vpc::open(Arc::new(MemStorage::from_vec(b)), VpcOptions::default())
}

fn open_vdi(b: Vec<u8>) -> vdisk::Result<Vdi> {
    Vdi::open(Arc::new(MemStorage::from_vec(b)), VdiOptions::default())
}

/// Opens, reads everything and maps everything; the first error's kind.
fn exercise(dev: vdisk::Result<Box<dyn BlockDevice>>) -> Result<(), ErrorKind> {
    let dev = dev.map_err(|e| e.kind())?;
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).map_err(|e| e.kind())?;
    let mut pos = 0;
    while pos < dev.size() {
        let e = dev.map(pos, u64::MAX).map_err(|e| e.kind())?;
        assert!(e.length > 0);
        pos += e.length;
    }
    dev.write_at(&[1u8; 512], SIZE - 512).map_err(|e| e.kind())?;
    Ok(())
}

fn put_be32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_be64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
fn put_le32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the footer checksum at `at` and the dynamic header's at 512.
fn fix_vpc_sums(b: &mut [u8]) {
    let fix = |b: &mut [u8], start: usize, len: usize, field: usize| {
        put_be32(b, start + field, 0);
        let sum: u32 = b[start..start + len].iter().map(|&x| u32::from(x)).fold(0, u32::wrapping_add);
        put_be32(b, start + field, !sum);
    };
    let end = b.len() - 512;
    fix(b, end, 512, 64);
    fix(b, 0, 512, 64);
    fix(b, 512, 1024, 36);
}

#[test]
fn vpc_corruption_table() {
    type Poke = fn(&mut Vec<u8>);
    let end = |b: &Vec<u8>| b.len() - 512;
    let cases: Vec<(&str, Poke, Option<ErrorKind>)> = vec![
        ("intact", |_| {}, None),
        (
            "footer checksum only at the end (copy at 0 used)",
            |b| {
                let e = b.len() - 1;
                b[e - 500] ^= 1;
            },
            None,
        ),
        (
            "both footers' checksums",
            |b| {
                let e = b.len() - 1;
                b[e - 500] ^= 1;
                b[12] ^= 1;
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "disk type 5",
            |b| {
                let e = b.len() - 512;
                put_be32(b, e + 60, 5);
                put_be32(b, 60, 5);
                fix_vpc_sums(b);
            },
            Some(ErrorKind::Unsupported),
        ),
        (
            "dynamic header cookie",
            |b| {
                b[512] = b'X';
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "dynamic header checksum",
            |b| {
                b[600] ^= 1;
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "block size 3000",
            |b| {
                put_be32(b, 512 + 32, 3000);
                fix_vpc_sums(b);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "block size 1 GiB",
            |b| {
                put_be32(b, 512 + 32, 1 << 30);
                fix_vpc_sums(b);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "BAT too small",
            |b| {
                put_be32(b, 512 + 28, 1);
                fix_vpc_sums(b);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "BAT of 2^32 entries",
            |b| {
                put_be32(b, 512 + 28, u32::MAX);
                fix_vpc_sums(b);
            },
            Some(ErrorKind::LimitExceeded),
        ),
        (
            "BAT outside the file",
            |b| {
                put_be64(b, 512 + 16, 1 << 40);
                fix_vpc_sums(b);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "dynamic header outside",
            |b| {
                let e = b.len() - 512;
                put_be64(b, e + 16, u64::MAX - 5);
                put_be64(b, 16, u64::MAX - 5);
                fix_vpc_sums(b);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "BAT entry past the file",
            |b| {
                put_be32(b, 1536 + 8, 0x00ff_ffff);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "BAT entry over the BAT",
            |b| {
                put_be32(b, 1536 + 8, 3);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "two BAT entries sharing a block",
            |b| {
                let e: [u8; 4] = b[1536 + 8..1536 + 12].try_into().unwrap();
                b[1536..1540].copy_from_slice(&e);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "BAT entry over the footer copy",
            |b| {
                put_be32(b, 1536 + 8, 0);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "size above 2040 GiB",
            |b| {
                for at in [0, b.len() - 512] {
                    put_be64(b, at + 48, 4 << 40);
                    b[at + 28..at + 32].copy_from_slice(b"win ");
                }
                fix_vpc_sums(b);
            },
            Some(ErrorKind::LimitExceeded),
        ),
        (
            "no footer anywhere",
            |b| {
                let e = b.len() - 512;
                b[e] = 0;
                b[0] = 0;
            },
            Some(ErrorKind::InvalidImage),
        ),
    ];
    let _ = end;
    // Shared blocks are named as such (a write to one would change the other).
    let mut b = vpc_image("");
    let e: [u8; 4] = b[1536 + 8..1536 + 12].try_into().unwrap();
    b[1536..1540].copy_from_slice(&e);
    let err = open_vpc(b).err().unwrap().to_string();
    assert!(err.contains("BAT entries 0 and 2 put blocks at overlapping places"), "{err}");
    for (what, poke, want) in cases {
        let mut b = vpc_image("");
        poke(&mut b);
        let got = exercise(open_vpc(b).map(|v| Box::new(v) as Box<dyn BlockDevice>));
        assert_eq!(got.err(), want, "{what}");
    }
    // Fixed: the data must fit before the footer.
    let mut b = vpc_image("subformat=fixed");
    let e = b.len() - 512;
    put_be64(&mut b, e + 48, 1 << 30);
    b[e + 28..e + 32].copy_from_slice(b"win ");
    let sum: u32 = {
        put_be32(&mut b, e + 64, 0);
        b[e..].iter().map(|&x| u32::from(x)).fold(0, u32::wrapping_add)
    };
    put_be32(&mut b, e + 64, !sum);
    assert_eq!(open_vpc(b).err().map(|e| e.kind()), Some(ErrorKind::InvalidImage));
}

#[test]
fn vdi_corruption_table() {
    type Poke = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Poke, Option<ErrorKind>)> = vec![
        ("intact", |_| {}, None),
        ("signature", |b| b[0x40] ^= 1, Some(ErrorKind::InvalidImage)),
        ("version 1.2", |b| put_le32(b, 0x44, 0x0001_0002), Some(ErrorKind::Unsupported)),
        ("image type 4 (differencing)", |b| put_le32(b, 0x4c, 4), Some(ErrorKind::Unsupported)),
        ("unaligned block map", |b| put_le32(b, 0x154, 0x201), Some(ErrorKind::Unsupported)),
        ("unaligned data", |b| put_le32(b, 0x158, 0x401), Some(ErrorKind::Unsupported)),
        ("sector size 4096", |b| put_le32(b, 0x168, 4096), Some(ErrorKind::Unsupported)),
        ("block size 2 MiB", |b| put_le32(b, 0x178, 2 << 20), Some(ErrorKind::Unsupported)),
        (
            "disk size past the block map",
            |b| b[0x170..0x178].copy_from_slice(&(1u64 << 40).to_le_bytes()),
            Some(ErrorKind::Unsupported),
        ),
        ("parent UUID", |b| b[0x1b8] = 1, Some(ErrorKind::Unsupported)),
        ("too many blocks", |b| put_le32(b, 0x180, u32::MAX), Some(ErrorKind::Unsupported)),
        (
            "block map past the file",
            |b| {
                put_le32(b, 0x180, 0x1000_0000);
                b[0x170..0x178].copy_from_slice(&0u64.to_le_bytes());
            },
            Some(ErrorKind::LimitExceeded),
        ),
        ("block map over the data", |b| put_le32(b, 0x158, 0x200), Some(ErrorKind::InvalidImage)),
        ("block map entry past the blocks", |b| put_le32(b, 0x200 + 16, 5000), Some(ErrorKind::Corrupt)),
        (
            "two block map entries sharing a block",
            |b| {
                let e: [u8; 4] = b[0x200 + 16..0x200 + 20].try_into().unwrap();
                b[0x200..0x204].copy_from_slice(&e);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "blocks_allocated full",
            |b| {
                put_le32(b, 0x184, 8);
            },
            Some(ErrorKind::Corrupt),
        ),
    ];
    // Shared blocks: refused read-write, read (and checked) read-only.
    let mut b = vdi_image();
    let e: [u8; 4] = b[0x200 + 16..0x200 + 20].try_into().unwrap();
    b[0x200..0x204].copy_from_slice(&e);
    let ro =
        Vdi::open(Arc::new(MemStorage::from_vec(b)), VdiOptions { read_only: true, ..Default::default() }).unwrap();
    let rep = ro.check().unwrap();
    assert!(rep.messages.iter().any(|m| m.contains("also used by")), "{:?}", rep.messages);
    for (what, poke, want) in cases {
        let mut b = vdi_image();
        poke(&mut b);
        let got = exercise(open_vdi(b).map(|v| Box::new(v) as Box<dyn BlockDevice>));
        assert_eq!(got.err(), want, "{what}");
    }
}

#[test]
fn truncated_images_fail_cleanly() {
    for (name, img) in [("vpc", vpc_image("")), ("vpc fixed", vpc_image("subformat=fixed")), ("vdi", vdi_image())] {
        let len = img.len();
        let mut cuts: Vec<usize> = (0..64).map(|i| i * 37).collect();
        cuts.extend([511, 512, 1023, 1024, 1535, 1536, 2047, 2048, 4096, len / 2, len - 513, len - 512, len - 1]);
        for cut in cuts.into_iter().filter(|&c| c < len) {
            let b = img[..cut].to_vec();
            let r = if name.starts_with("vpc") {
                open_vpc(b).map(|v| Box::new(v) as Box<dyn BlockDevice>)
            } else {
                open_vdi(b).map(|v| Box::new(v) as Box<dyn BlockDevice>)
            };
            // Opening may fail or succeed; using it must not panic.
            let _ = exercise(r);
        }
    }
}

/// The allocating workload: non-overlapping writes, each into a new block
/// (two straddle a block boundary), then a flush.
const WRITES: &[(u64, usize, u8)] =
    &[(100, 3000, 0x21), ((2 << 20) - 700, 1400, 0x42), ((4 << 20) + 512, 70_000, 0x63)];

fn workload(dev: &dyn BlockDevice) -> vdisk::Result<()> {
    for &(off, len, b) in WRITES {
        dev.write_at(&vec![b; len], off)?;
    }
    dev.flush()
}

fn open_any(vdi: bool, st: Arc<dyn Storage>) -> vdisk::Result<Box<dyn BlockDevice>> {
    Ok(if vdi {
        Box::new(Vdi::open(st, VdiOptions::default())?)
    } else {
        Box::new(Vpc::open(st, VpcOptions::default())?)
    })
}

#[test]
fn crash_at_every_write_of_allocating_writes() {
    let qemu = have_qemu();
    let dir = tmp();
    for vdi in [false, true] {
        let base = if vdi { vdi_image() } else { vpc_image("") };
        let before = {
            let d = open_any(vdi, Arc::new(MemStorage::from_vec(base.clone()))).unwrap();
            read_all(&*d)
        };
        let mut after = before.clone();
        for &(off, len, b) in WRITES {
            after[off as usize..off as usize + len].fill(b);
        }
        let total = {
            let st = Arc::new(FaultyStorage::new(base.clone(), None, FaultMode::PowerLoss));
            workload(&*open_any(vdi, st.clone()).unwrap()).unwrap();
            st.ops()
        };
        assert!(total >= 9, "the workload should write several times ({total})");
        for budget in 0..=total {
            let st = Arc::new(FaultyStorage::new(base.clone(), Some(budget), FaultMode::PowerLoss));
            if let Ok(d) = open_any(vdi, st.clone()) {
                let _ = workload(&*d);
            }
            for surv in [Survivors::All, Survivors::None, Survivors::Some(budget + 1)] {
                let what = format!("{} budget {budget} {surv:?}", if vdi { "vdi" } else { "vpc" });
                let img = st.crashed_image(surv);
                let mem = Arc::new(MemStorage::from_vec(img.clone()));
                let d = open_any(vdi, mem.clone()).unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
                let got = read_all(&*d);
                // Outside the writes nothing changed; inside, each byte is old or new.
                let mut masked = got.clone();
                for &(off, len, _) in WRITES {
                    let r = off as usize..off as usize + len;
                    for (i, ((g, b), a)) in
                        got[r.clone()].iter().zip(&before[r.clone()]).zip(&after[r.clone()]).enumerate()
                    {
                        assert!(
                            g == b || g == a,
                            "{what}: byte {:#x} is {g:#x}, neither {b:#x} nor {a:#x}",
                            off as usize + i
                        );
                    }
                    masked[r.clone()].copy_from_slice(&before[r]);
                }
                assert!(masked == before, "{what}: bytes outside the writes changed");
                // A later allocation keeps everything that was readable.
                d.write_at(&[0x99u8; 512], 7 << 20).unwrap();
                d.flush().unwrap();
                drop(d);
                let d = open_any(vdi, Arc::new(MemStorage::from_vec(mem.to_vec()))).unwrap();
                let mut again = read_all(&*d);
                again[(7 << 20) as usize..(7 << 20) as usize + 512]
                    .copy_from_slice(&got[(7 << 20) as usize..(7 << 20) as usize + 512]);
                assert_same(&format!("{what}: after a later allocation"), &again, &got);
                if qemu && surv == Survivors::Some(budget + 1) {
                    let path = dir.path().join("crash.img");
                    std::fs::write(&path, &img).unwrap();
                    let f = if vdi { "vdi" } else { "vpc" };
                    assert_same(&format!("{what}: qemu-img reads"), &qemu_export(&path, f), &got);
                    if vdi {
                        // At worst the leaked block: the header counts one
                        // block more than the map points at.
                        let (code, _, err) =
                            run_status("qemu-img", &["check", "-f", "vdi", &path.display().to_string()]);
                        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("ERROR")).collect();
                        assert!(
                            code == 0 || (errors.len() == 1 && errors[0].contains("allocated blocks mismatch")),
                            "{what}: qemu-img check: {err}"
                        );
                    }
                }
            }
        }
    }
}
