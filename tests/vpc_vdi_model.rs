//! VHD (dynamic and fixed) and VDI (dynamic and static) against a
//! `Vec<u8>` model (proptest): writes, zero writes, flushes and reopens;
//! every read and the `map` tiling checked; and threads allocating the same
//! and different blocks at once.

use std::sync::Arc;

use proptest::prelude::*;
use vdisk::vdi::{Vdi, VdiCreateOptions, VdiOptions};
use vdisk::vpc::{Vpc, VpcCreateOptions, VpcOptions};
use vdisk::{BlockDevice, MemStorage, Storage, ZeroMode};

const SIZE: u64 = 7 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u32, u8),
    Zero(u64, u32),
    Flush,
    Reopen,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => (0..SIZE, 1u32..600_000, any::<u8>()).prop_map(|(o, l, p)| Op::Write(o, l, p)),
        2 => (0..SIZE, 1u32..3_000_000).prop_map(|(o, l)| Op::Zero(o, l)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ];
    proptest::collection::vec(op, 1..20)
}

/// Which image: 0 VHD dynamic, 1 VHD fixed, 2 VDI dynamic, 3 VDI static.
fn create(kind: u8, st: Arc<MemStorage>) -> Box<dyn BlockDevice> {
    match kind {
        0 | 1 => {
            let o = VpcCreateOptions {
                subformat: if kind == 0 { vdisk::vpc::VpcSubformat::Dynamic } else { vdisk::vpc::VpcSubformat::Fixed },
                ..Default::default()
            };
            Box::new(Vpc::create(st, SIZE, &o).unwrap())
        }
        _ => Box::new(
            Vdi::create(st, SIZE, &VdiCreateOptions { static_image: kind == 3, ..Default::default() }).unwrap(),
        ),
    }
}

fn open(kind: u8, st: Arc<MemStorage>) -> Box<dyn BlockDevice> {
    let s: Arc<dyn Storage> = st;
    match kind {
        0 | 1 => Box::new(Vpc::open(s, VpcOptions::default()).unwrap()),
        _ => Box::new(Vdi::open(s, VdiOptions::default()).unwrap()),
    }
}

fn check(dev: &dyn BlockDevice, model: &[u8]) {
    let mut got = vec![0u8; model.len()];
    dev.read_at(&mut got, 0).unwrap();
    assert!(got == model, "device and model differ");
    let mut pos = 0;
    while pos < dev.size() {
        let e = dev.map(pos, u64::MAX).unwrap();
        assert!(e.length > 0 && e.offset == pos);
        if e.reads_as_zero() {
            assert!(model[pos as usize..(pos + e.length) as usize].iter().all(|&b| b == 0));
        }
        pos += e.length;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn matches_model(kind in 0u8..4, ops in ops()) {
        let st = Arc::new(MemStorage::new());
        let mut dev = create(kind, st.clone());
        let size = dev.size();
        let mut model = vec![0u8; size as usize];
        for op in &ops {
            match *op {
                Op::Write(o, l, p) => {
                    let l = u64::from(l).min(size - o);
                    dev.write_at(&vec![p; l as usize], o).unwrap();
                    model[o as usize..(o + l) as usize].fill(p);
                }
                Op::Zero(o, l) => {
                    let l = u64::from(l).min(size - o);
                    dev.write_zeroes(o, l, ZeroMode::MayUnmap).unwrap();
                    model[o as usize..(o + l) as usize].fill(0);
                }
                Op::Flush => dev.flush().unwrap(),
                Op::Reopen => {
                    dev.flush().unwrap();
                    drop(dev);
                    dev = open(kind, st.clone());
                }
            }
            let at = match *op { Op::Write(o, ..) | Op::Zero(o, _) => o, _ => 0 };
            let n = 4096.min(size - at) as usize;
            let mut b = vec![0u8; n];
            dev.read_at(&mut b, at).unwrap();
            prop_assert!(b[..] == model[at as usize..at as usize + n]);
        }
        check(&*dev, &model);
        drop(dev);
        check(&*open(kind, st), &model);
    }
}

#[test]
fn threads_allocate_together() {
    for kind in [0u8, 2] {
        let st = Arc::new(MemStorage::new());
        let dev: Arc<dyn BlockDevice> = Arc::from(create(kind, st.clone()));
        let size = dev.size();
        // Eight threads, each writing its own 64 KiB slices across every block
        // (so each block is allocated by whichever thread gets there first).
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let dev = dev.clone();
                s.spawn(move || {
                    let mut off = t * 65536;
                    while off + 65536 <= size {
                        dev.write_at(&vec![t as u8 + 1; 65536], off).unwrap();
                        off += 8 * 65536;
                    }
                });
            }
        });
        dev.flush().unwrap();
        let mut model = vec![0u8; size as usize];
        for (i, c) in model.chunks_mut(65536).enumerate() {
            if c.len() == 65536 {
                c.fill((i % 8) as u8 + 1);
            }
        }
        check(&*dev, &model);
        drop(dev);
        check(&*open(kind, st.clone()), &model);
        if kind == 2 {
            let v = Vdi::open(st, VdiOptions::default()).unwrap();
            assert_eq!(v.check().unwrap().corruptions, 0);
        }
    }
}
