//! VHDX against a `Vec<u8>` model (proptest) in every subformat, and a
//! corruption table: each hostile field gets a clear error (or the spare
//! copy is used), never a panic.

mod common;

use std::sync::Arc;

use common::{pattern, read_all};
use proptest::prelude::*;
use vdisk::vhdx::format::{seal, HEADER_OFFSETS, MIB, REGION_OFFSETS};
use vdisk::{BlockDevice, ErrorKind, MemStorage, Storage, Vhdx, VhdxCreateOptions, VhdxOptions, ZeroMode};

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u32, u8),
    Zero(u64, u32, bool),
    Discard(u64, u32),
    Flush,
    Reopen,
}

fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => (0..size, 1u32..1_500_000, any::<u8>()).prop_map(|(o, l, p)| Op::Write(o, l, p)),
        2 => (0..size, 1u32..3_000_000, any::<bool>()).prop_map(|(o, l, a)| Op::Zero(o, l, a)),
        1 => (0..size, 1u32..3_000_000).prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ];
    proptest::collection::vec(op, 1..16)
}

fn run_model(opts: &str, size: u64, ops: &[Op], parent_data: Option<&[u8]>) {
    let o = VhdxCreateOptions::parse(opts).unwrap();
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut model = vec![0u8; size as usize];
    let parent: Option<Arc<dyn BlockDevice>> = parent_data.map(|d| {
        let p = vdisk::Raw::open(Arc::new(MemStorage::from_vec(d.to_vec()))).unwrap();
        Arc::new(p) as Arc<dyn BlockDevice>
    });
    let mut v = match &parent {
        None => Vhdx::create_on(st.clone(), size, &o).unwrap(),
        Some(p) => {
            // A differencing image: made on a file, then reopened in memory.
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("base.vhdx");
            let b = Vhdx::create(&base, size, &VhdxCreateOptions::default()).unwrap();
            b.write_at(parent_data.unwrap(), 0).unwrap();
            b.close().unwrap();
            let child = dir.path().join("child.vhdx");
            let co = VhdxCreateOptions { backing_file: Some("base.vhdx".into()), ..o.clone() };
            let c = vdisk::OpenOptions::new().create_vhdx(&child, 0, &co).unwrap();
            c.close().unwrap();
            st.write_at(&std::fs::read(&child).unwrap(), 0).unwrap();
            model.copy_from_slice(parent_data.unwrap());
            Vhdx::open(st.clone(), VhdxOptions { parent: Some(p.clone()), ..Default::default() }).unwrap()
        }
    };
    let reopen = |st: &Arc<dyn Storage>| {
        Vhdx::open(st.clone(), VhdxOptions { parent: parent.clone(), ..Default::default() }).unwrap()
    };
    for op in ops {
        match *op {
            Op::Write(off, len, pat) => {
                let len = (len as u64).min(size - off) as usize;
                let d = pattern(u64::from(pat) + off, len);
                v.write_at(&d, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&d);
            }
            Op::Zero(off, len, alloc) => {
                let len = (len as u64).min(size - off);
                let mode = if alloc { ZeroMode::Allocate } else { ZeroMode::MayUnmap };
                v.write_zeroes(off, len, mode).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard(off, len) => {
                let len = (len as u64).min(size - off);
                v.discard(off, len).unwrap();
                // Advisory: whatever it reads now must be the old data or zeros.
                let mut got = vec![0u8; len as usize];
                v.read_at(&mut got, off).unwrap();
                for (i, g) in got.iter().enumerate() {
                    let m = &mut model[off as usize + i];
                    assert!(*g == *m || *g == 0, "discard left {g:#x} where {m:#x} or 0 was expected");
                    *m = *g;
                }
            }
            Op::Flush => v.flush().unwrap(),
            Op::Reopen => {
                v.close().unwrap();
                v = reopen(&st);
            }
        }
    }
    assert!(read_all(&v) == model, "{opts}: contents differ from the model after {ops:?}");
    v.close().unwrap();
    let v = reopen(&st);
    assert!(read_all(&v) == model, "{opts}: contents differ from the model after reopening");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn dynamic_matches_the_model(ops in ops(6 * MIB)) {
        run_model("block_size=1M,block_state_zero=off", 6 * MIB, &ops, None);
    }

    #[test]
    fn fixed_matches_the_model(ops in ops(5 * MIB)) {
        run_model("subformat=fixed,block_size=1M", 5 * MIB, &ops, None);
    }

    #[test]
    fn four_k_sectors_match_the_model(ops in ops(5 * MIB)) {
        run_model("block_size=2M,logical_sector_size=4096,physical_sector_size=4096", 5 * MIB, &ops, None);
    }

    #[test]
    fn differencing_matches_the_model(ops in ops(4 * MIB)) {
        let base = pattern(77, 4 << 20);
        run_model("block_size=1M", 4 * MIB, &ops, Some(&base));
    }
}

// ---------------------------------------------------------------------------
// Corruption table.

fn image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let v = Vhdx::create_on(st.clone(), 4 * MIB, &VhdxCreateOptions::parse("block_size=1M").unwrap()).unwrap();
    v.write_at(&pattern(5, 5000), MIB - 100).unwrap();
    v.close().unwrap();
    st.to_vec()
}

// Layout of `image()`: log at 1 MiB, BAT at 2 MiB, metadata at 3 MiB,
// metadata items from 3 MiB + 64 KiB, 8-byte aligned, in the order file
// parameters (8), disk size (8), page 83 (16), logical (4), physical (4).
const BAT: usize = 2 << 20;
const META: usize = 3 << 20;
const ITEMS: usize = META + (64 << 10);

fn le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn reseal_regions(b: &mut [u8]) {
    for r in REGION_OFFSETS {
        let r = r as usize;
        seal(&mut b[r..r + (64 << 10)], 4);
    }
}
fn reseal_headers(b: &mut [u8]) {
    for h in HEADER_OFFSETS {
        let h = h as usize;
        seal(&mut b[h..h + 4096], 4);
    }
}

fn open(b: Vec<u8>, read_only: bool) -> vdisk::Result<Vhdx> {
    Vhdx::open(Arc::new(MemStorage::from_vec(b)), VhdxOptions { read_only, ..Default::default() })
}

#[test]
fn corruption_table() {
    type Poke = fn(&mut Vec<u8>);
    let cases: &[(&str, Poke, Option<ErrorKind>)] = &[
        ("file signature", |b| b[0] = b'X', Some(ErrorKind::InvalidImage)),
        (
            "both header checksums",
            |b| {
                b[64 << 10 | 100] ^= 1;
                b[128 << 10 | 100] ^= 1;
            },
            Some(ErrorKind::InvalidImage),
        ),
        ("first header checksum (the second is used)", |b| b[64 << 10 | 100] ^= 1, None),
        ("first region table (the second is used)", |b| b[(192 << 10) + 20] ^= 1, None),
        (
            "both region tables",
            |b| {
                b[(192 << 10) + 20] ^= 1;
                b[(256 << 10) + 20] ^= 1;
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "region count 5000",
            |b| {
                le32(b, (192 << 10) + 8, 5000);
                le32(b, (256 << 10) + 8, 5000);
                reseal_regions(b);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "regions overlap",
            |b| {
                for r in REGION_OFFSETS {
                    let first = u64::from_le_bytes(b[r as usize + 32..r as usize + 40].try_into().unwrap());
                    le64(b, r as usize + 48 + 16, first);
                }
                reseal_regions(b);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "unknown required region",
            |b| {
                for r in REGION_OFFSETS {
                    let r = r as usize;
                    le32(b, r + 8, 3);
                    b[r + 80..r + 96].copy_from_slice(&[7; 16]);
                    le64(b, r + 96, 40 << 20);
                    le32(b, r + 104, 1 << 20);
                    le32(b, r + 108, 1);
                }
                reseal_regions(b);
            },
            Some(ErrorKind::Unsupported),
        ),
        ("block size 3 MiB", |b| le32(b, ITEMS, 3 << 20), Some(ErrorKind::InvalidImage)),
        ("block size 512 MiB", |b| le32(b, ITEMS, 512 << 20), Some(ErrorKind::InvalidImage)),
        ("logical sector 1024", |b| le32(b, ITEMS + 32, 1024), Some(ErrorKind::InvalidImage)),
        ("physical sector 0", |b| le32(b, ITEMS + 40, 0), Some(ErrorKind::InvalidImage)),
        ("virtual size 65 TiB", |b| le64(b, ITEMS + 8, 65 << 40), Some(ErrorKind::LimitExceeded)),
        ("virtual size beyond the BAT", |b| le64(b, ITEMS + 8, 1 << 40), Some(ErrorKind::InvalidImage)),
        ("metadata signature", |b| b[META] = b'X', Some(ErrorKind::InvalidImage)),
        ("metadata items missing", |b| b[META + 10] = 2, Some(ErrorKind::InvalidImage)),
        ("metadata item outside its region", |b| le32(b, META + 32 + 16, 2 << 20), Some(ErrorKind::InvalidImage)),
        (
            "unknown required metadata item",
            |b| {
                b[META + 10] = 6;
                let e = META + 32 + 5 * 32;
                b[e..e + 16].copy_from_slice(&[9; 16]);
                le32(b, e + 16, 70 << 10);
                le32(b, e + 20, 8);
                le32(b, e + 24, 4);
            },
            Some(ErrorKind::Unsupported),
        ),
        ("HasParent without a locator", |b| le32(b, ITEMS + 4, 2), Some(ErrorKind::InvalidImage)),
        ("BAT entry past the end of the file", |b| le64(b, BAT, (1 << 40) | 6), Some(ErrorKind::Corrupt)),
        ("BAT entry into the header area", |b| le64(b, BAT, 6), Some(ErrorKind::Corrupt)),
        ("BAT entry onto the BAT", |b| le64(b, BAT, (2 << 20) | 6), Some(ErrorKind::Corrupt)),
        (
            "two BAT entries sharing a block",
            |b| {
                let e: [u8; 8] = b[BAT..BAT + 8].try_into().unwrap();
                b[BAT + 8..BAT + 16].copy_from_slice(&e);
            },
            Some(ErrorKind::Corrupt),
        ),
        (
            "log version 1",
            |b| {
                b[(64 << 10) + 64] = 1;
                b[(128 << 10) + 64] = 1;
                b[(64 << 10) + 48] = 1;
                b[(128 << 10) + 48] = 1;
                reseal_headers(b);
            },
            Some(ErrorKind::Unsupported),
        ),
        (
            "log of 2 GiB",
            |b| {
                for h in HEADER_OFFSETS {
                    le32(b, h as usize + 68, 2 << 30);
                    b[h as usize + 48] = 1;
                }
                reseal_headers(b);
            },
            Some(ErrorKind::LimitExceeded),
        ),
        (
            "log GUID without entries (nothing to replay)",
            |b| {
                for h in HEADER_OFFSETS {
                    b[h as usize + 48] = 0x77;
                }
                reseal_headers(b);
            },
            None,
        ),
        (
            "log offset near 2^64",
            |b| {
                for h in HEADER_OFFSETS {
                    le64(b, h as usize + 72, u64::MAX - (1 << 20) + 1);
                }
                reseal_headers(b);
            },
            Some(ErrorKind::InvalidImage),
        ),
        (
            "log offset inside the header area",
            |b| {
                for h in HEADER_OFFSETS {
                    le64(b, h as usize + 72, 4096);
                }
                reseal_headers(b);
            },
            Some(ErrorKind::InvalidImage),
        ),
        ("truncated at 1.5 MiB", |b| b.truncate(3 << 19), Some(ErrorKind::InvalidImage)),
    ];
    let good = image();
    let want = read_all(&open(good.clone(), true).unwrap());
    for (what, poke, kind) in cases {
        let mut b = good.clone();
        poke(&mut b);
        for ro in [true, false] {
            match (open(b.clone(), ro), kind) {
                (Ok(v), None) => assert_eq!(read_all(&v), want, "{what}: reads differ"),
                (Ok(_), Some(k)) => panic!("{what}: opened, expected {k:?}"),
                (Err(e), Some(k)) => assert_eq!(e.kind(), *k, "{what}: {e}"),
                (Err(e), None) => panic!("{what}: {e}"),
            }
        }
    }
}

#[test]
fn invalid_block_state_fails_reads_of_that_block_only() {
    let mut b = image();
    le64(&mut b, BAT + 3 * 8, 4);
    let v = open(b, true).unwrap();
    let mut buf = [0u8; 16];
    let e = v.read_at(&mut buf, 3 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    v.read_at(&mut buf, MIB).unwrap();
    assert!(v.map(3 * MIB, MIB).is_err());
}

#[test]
fn bat_entries_near_the_top_of_the_offset_space_are_errors() {
    // Opened for check (bad entries allowed): reads and maps of the block
    // end in an error or zeros, never an overflow.
    let mut b = image();
    le64(&mut b, BAT, !((1u64 << 20) - 1) | 6);
    let st = Arc::new(MemStorage::from_vec(b));
    let v = Vhdx::open(st, VhdxOptions { read_only: true, for_check: true, ..Default::default() }).unwrap();
    let mut buf = [0u8; 4096];
    let _ = v.read_at(&mut buf, (1 << 20) - 4096);
    let _ = v.map(0, 4 << 20);
    assert_eq!(v.check().corruptions, 1);
}

#[test]
fn check_counts_bad_bat_entries() {
    let mut b = image();
    le64(&mut b, BAT + 2 * 8, (1 << 40) | 6);
    le64(&mut b, BAT + 3 * 8, (1 << 20) | 6);
    let st = Arc::new(MemStorage::from_vec(b));
    let v = Vhdx::open(st, VhdxOptions { read_only: true, for_check: true, ..Default::default() }).unwrap();
    let r = v.check();
    assert_eq!(r.corruptions, 2, "{r:?}");
    assert_eq!(r.exit_code(), 2);
}

#[test]
fn overlapping_log_entries_do_not_hang() {
    // Every log sector claims to start an entry as long as the log, with a
    // bad checksum: the scan stays bounded.
    let mut b = image();
    let guid = [0x42u8; 16];
    for s in 0..256usize {
        let at = (1 << 20) + s * 4096;
        b[at..at + 4].copy_from_slice(b"loge");
        le32(&mut b, at + 8, 1 << 20);
        le64(&mut b, at + 16, s as u64 + 1);
        b[at + 32..at + 48].copy_from_slice(&guid);
    }
    for h in HEADER_OFFSETS {
        b[h as usize + 48..h as usize + 64].copy_from_slice(&guid);
    }
    reseal_headers(&mut b);
    let t = std::time::Instant::now();
    let v = open(b, true).unwrap();
    assert!(!v.log_replayed());
    assert!(t.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn partially_present_blocks_read_through_their_sector_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let b = Vhdx::create(&base, 4 * MIB, &VhdxCreateOptions::parse("block_size=1M").unwrap()).unwrap();
    let parent_data = pattern(3, 4 << 20);
    b.write_at(&parent_data, 0).unwrap();
    b.close().unwrap();
    let child = dir.path().join("child.vhdx");
    let o = VhdxCreateOptions::parse("backing_file=base.vhdx,block_size=1M").unwrap();
    vdisk::OpenOptions::new().create_vhdx(&child, 0, &o).unwrap().close().unwrap();
    // Poke a partially present block 1: payload at the end of the file,
    // its sector bitmap after it; sectors 0..8 and 16 present.
    let mut img = std::fs::read(&child).unwrap();
    let end = (img.len() as u64).next_multiple_of(MIB);
    let (payload, bitmap) = (end, end + MIB);
    img.resize((end + 2 * MIB) as usize, 0);
    img[payload as usize..(payload + MIB) as usize].fill(0xaa);
    // Block 1 is the second block of chunk 0: its sectors start at bit 2048.
    let bits = bitmap as usize + 2048 / 8;
    img[bits] = 0xff; // sectors 0..8
    img[bits + 2] = 0x01; // sector 16
    le64(&mut img, BAT + 8, payload | 7);
    le64(&mut img, BAT + 4096 * 8, bitmap | 6); // the chunk's sector bitmap entry
    std::fs::write(&child, &img).unwrap();
    let v = vdisk::OpenOptions::new().format(vdisk::Format::Vhdx).read_only(true).open(&child).unwrap();
    let got = read_all(&v);
    let mut want = parent_data.clone();
    let s = MIB as usize;
    want[s..s + 8 * 512].fill(0xaa);
    want[s + 16 * 512..s + 17 * 512].fill(0xaa);
    assert!(got == want, "partially present block reads wrong");
    let m = v.map(MIB, MIB).unwrap();
    assert_eq!((m.length, m.depth), (8 * 512, 0), "{m:?}");
    let m = v.map(MIB + 8 * 512, MIB).unwrap();
    assert_eq!((m.length, m.depth), (8 * 512, 1), "{m:?}");
    drop(v);
    // A write into it makes the block fully present with the same content
    // around the write.
    let v = vdisk::OpenOptions::new().format(vdisk::Format::Vhdx).open(&child).unwrap();
    v.write_at(&[0x55; 100], MIB + 20 * 512).unwrap();
    want[s + 20 * 512..s + 20 * 512 + 100].fill(0x55);
    assert!(read_all(&v) == want, "copy of a partially present block lost data");
    v.close().unwrap();
    let v = vdisk::OpenOptions::new().format(vdisk::Format::Vhdx).read_only(true).open(&child).unwrap();
    assert!(read_all(&v) == want);
}

#[test]
fn threads_allocating_and_overwriting_at_once() {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let size = 16 * MIB;
    let v = Arc::new(Vhdx::create_on(st.clone(), size, &VhdxCreateOptions::parse("block_size=1M").unwrap()).unwrap());
    // Each thread writes its own 64 KiB stripes across every block, so
    // threads race to allocate the same blocks.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                for k in 0..(size / (512 << 10)) {
                    let off = k * (512 << 10) + t * (64 << 10);
                    v.write_at(&pattern(t * 1000 + k, 64 << 10), off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut want = vec![0u8; size as usize];
    for t in 0..8u64 {
        for k in 0..(size / (512 << 10)) {
            let off = (k * (512 << 10) + t * (64 << 10)) as usize;
            want[off..off + (64 << 10)].copy_from_slice(&pattern(t * 1000 + k, 64 << 10));
        }
    }
    assert!(read_all(&*v) == want, "concurrent writes lost data");
    Arc::try_unwrap(v).unwrap().close().unwrap();
    let v = Vhdx::open(st, VhdxOptions { read_only: true, ..Default::default() }).unwrap();
    assert!(read_all(&v) == want, "concurrent writes lost data after reopening");
    assert_eq!(v.check().corruptions, 0);
}

/// A metadata item claiming ~4 GiB in a small file is refused before any
/// allocation (it once made the open allocate and zero-fill 4 GiB).
#[test]
fn a_metadata_item_larger_than_the_file_is_refused() {
    use vdisk::vhdx::format::seal;
    let st = std::sync::Arc::new(vdisk::MemStorage::new());
    let v = vdisk::Vhdx::create_on(st.clone(), 20 << 20, &vdisk::VhdxCreateOptions::default()).unwrap();
    v.close().unwrap();
    let mut b = st.to_vec();
    let mut meta_off = 0usize;
    for rt in [192usize << 10, 256 << 10] {
        let count = u32::from_le_bytes(b[rt + 8..rt + 12].try_into().unwrap()) as usize;
        for i in 0..count {
            let e = rt + 16 + 32 * i;
            if b[e..e + 4] == [0x06, 0xa2, 0x7c, 0x8b] {
                meta_off = u64::from_le_bytes(b[e + 16..e + 24].try_into().unwrap()) as usize;
                b[e + 24..e + 28].copy_from_slice(&0xfff0_0000u32.to_le_bytes());
            }
        }
        seal(&mut b[rt..rt + (64 << 10)], 4);
    }
    let m = meta_off;
    let count = u16::from_le_bytes([b[m + 10], b[m + 11]]) as usize;
    for i in 0..count {
        let e = m + 32 + 32 * i;
        if b[e..e + 4] == [0x37, 0x67, 0xa1, 0xca] {
            b[e + 20..e + 24].copy_from_slice(&(0xfff0_0000u32 - 0x10000).to_le_bytes());
        }
    }
    let f: std::sync::Arc<dyn vdisk::Storage> = std::sync::Arc::new(vdisk::MemStorage::from_vec(b));
    let e = vdisk::Vhdx::open(f, vdisk::VhdxOptions { read_only: true, ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("over 1 MiB or past the end"), "{e}");
}

#[test]
fn new_blocks_never_land_on_a_log_past_the_end_of_the_file() {
    // The headers put the (empty) log at 64 MiB, past the end of the file:
    // a new block must be placed after it, or the next log write would
    // overwrite guest data.
    let mut b = image();
    for h in HEADER_OFFSETS {
        le64(&mut b, h as usize + 72, 64 << 20);
    }
    reseal_headers(&mut b);
    let st = Arc::new(MemStorage::from_vec(b));
    let v = match Vhdx::open(st.clone(), VhdxOptions::default()) {
        Ok(v) => v,
        // Refusing such a header outright is as good.
        Err(e) => {
            assert!(e.to_string().contains("log"), "{e}");
            return;
        }
    };
    v.write_at(&pattern(9, 4096), 3 * MIB).unwrap();
    v.close().unwrap();
    let img = st.to_vec();
    let e = u64::from_le_bytes(img[BAT + 24..BAT + 32].try_into().unwrap());
    let off = e & !0xfffff;
    assert!(e & 7 != 0, "block 3 allocated");
    assert!(off >= 65 << 20, "block 3 at {off} is not past the log at 64 MiB (growing blocks would reach it)");
    let v = open(img, true).unwrap();
    let mut back = vec![0u8; 4096];
    v.read_at(&mut back, 3 * MIB).unwrap();
    assert_eq!(back, pattern(9, 4096));
}

#[test]
fn zero_descriptors_past_the_end_of_the_file_extend_it_without_writing() {
    // A log entry of 126 descriptors, each zeroing 256 MiB from the end of
    // the file: replaying it must extend the file (holes), not write 32 GiB
    // of zeros.
    use std::os::unix::fs::MetadataExt;
    let mut b = image();
    let flen = b.len() as u64;
    let guid = [0x42u8; 16];
    let nops = 126usize;
    let mut e = vec![0u8; 4096];
    e[0..4].copy_from_slice(b"loge");
    le32(&mut e, 8, 4096);
    le64(&mut e, 16, 1);
    le32(&mut e, 24, nops as u32);
    e[32..48].copy_from_slice(&guid);
    le64(&mut e, 48, flen);
    le64(&mut e, 56, flen);
    for i in 0..nops {
        let p = 64 + 32 * i;
        e[p..p + 4].copy_from_slice(b"zero");
        le64(&mut e, p + 8, 256 << 20);
        le64(&mut e, p + 16, flen);
        le64(&mut e, p + 24, 1);
    }
    seal(&mut e, 4);
    b[MIB as usize..MIB as usize + 4096].copy_from_slice(&e);
    for h in HEADER_OFFSETS {
        b[h as usize + 48..h as usize + 64].copy_from_slice(&guid);
    }
    reseal_headers(&mut b);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("zeros.vhdx");
    std::fs::write(&f, &b).unwrap();
    let t = std::time::Instant::now();
    let v = Vhdx::open(Arc::new(vdisk::FileStorage::open(&f, false).unwrap()), VhdxOptions::default()).unwrap();
    assert!(v.log_replayed());
    let mut buf = vec![0u8; 5000];
    v.read_at(&mut buf, MIB - 100).unwrap();
    assert_eq!(buf, pattern(5, 5000), "the guest data survived the replay");
    drop(v);
    let md = std::fs::metadata(&f).unwrap();
    assert!(md.len() >= flen + (256 << 20), "the file was extended to {}", md.len());
    assert!(md.blocks() * 512 < 64 << 20, "{} bytes were written", md.blocks() * 512);
    assert!(t.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn zeroing_a_terabyte_of_a_differencing_disk_takes_several_log_entries() {
    // 2^20 BAT entries change: far more BAT sectors than one log entry of
    // the 1 MiB log can carry.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let o = VhdxCreateOptions::parse("block_size=1M").unwrap();
    Vhdx::create(&base, 1 << 40, &o).unwrap().close().unwrap();
    let child = dir.path().join("child.vhdx");
    let o = VhdxCreateOptions::parse("backing_file=base.vhdx,block_size=1M").unwrap();
    let v = vdisk::OpenOptions::new().create_vhdx(&child, 1 << 40, &o).unwrap();
    v.write_at(&pattern(4, 4096), 3 * MIB).unwrap();
    v.write_zeroes(0, 1 << 40, vdisk::ZeroMode::MayUnmap).unwrap();
    v.close().unwrap();
    let v = vdisk::OpenOptions::new().format(vdisk::Format::Vhdx).read_only(true).open(&child).unwrap();
    let e = v.map(4 * MIB, (1 << 40) - 4 * MIB).unwrap();
    assert_eq!(e.length, (1 << 40) - 4 * MIB, "{e:?}");
    assert!(matches!(e.kind, vdisk::ExtentKind::Zero { .. }), "{e:?}");
    let mut b = vec![1u8; 4096];
    v.read_at(&mut b, 3 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}
