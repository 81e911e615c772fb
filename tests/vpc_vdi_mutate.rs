//! A quick mutation run of the `open_vpc_vdi` fuzz target body over its
//! seeds, on stable Rust: header fields, BAT and block map entries and
//! random bytes are overwritten with boundary values; the target must not
//! panic (it asserts its own invariants: map tiling, zero reads, header
//! round trips, written bytes reading back).

use std::path::PathBuf;

const VALUES: &[u32] = &[
    0,
    1,
    2,
    3,
    4,
    0x1ff,
    0x200,
    0x201,
    0x600,
    0xfff,
    0x1000,
    0x10_0000,
    0x20_0000,
    0x7fff_ffff,
    0xffff_fffe,
    0xffff_ffff,
];

#[test]
fn mutated_seeds_never_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/open_vpc_vdi");
    let mut seeds: Vec<Vec<u8>> =
        std::fs::read_dir(&dir).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
    seeds.sort();
    assert!(seeds.len() >= 4);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for seed in &seeds {
        for _ in 0..200 {
            let mut b = seed.clone();
            for _ in 0..(next() % 3 + 1) {
                let r = next();
                // Half the pokes land in the first 2 KiB or the last 512 bytes
                // (footer, dynamic header, BAT, VDI header and block map).
                let len = b.len() as u64;
                let at = match r % 4 {
                    0 => (next() % 2048.min(len)) as usize,
                    1 => (len - 512.min(len) + next() % 512.min(len)) as usize,
                    _ => (next() % len) as usize,
                } & !3;
                let v = VALUES[(next() % VALUES.len() as u64) as usize];
                let bytes = if r & 16 == 0 { v.to_be_bytes() } else { v.to_le_bytes() };
                let end = (at + 4).min(b.len());
                b[at..end].copy_from_slice(&bytes[..end - at]);
            }
            if next() % 4 != 0 {
                fix_checksums(&mut b);
            }
            if next() % 8 == 0 {
                let cut = (next() % b.len() as u64) as usize;
                b.truncate(cut);
            }
            vdisk::testing::fuzzing::open_vpc_vdi(&b);
        }
    }
}

/// Recomputes the VHD checksums where a footer or dynamic header is, so
/// mutations reach the code behind them.
fn fix_checksums(b: &mut [u8]) {
    let end = b.len().saturating_sub(512);
    let mut fix = |start: usize, len: usize, field: usize, cookie: &[u8]| {
        if b.len() >= start + len && &b[start..start + 8] == cookie {
            b[start + field..start + field + 4].fill(0);
            let sum = b[start..start + len].iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
            b[start + field..start + field + 4].copy_from_slice(&(!sum).to_be_bytes());
        }
    };
    fix(0, 512, 64, b"conectix");
    fix(512, 1024, 36, b"cxsparse");
    fix(end, 512, 64, b"conectix");
}
