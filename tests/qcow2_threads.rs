//! Many threads on one qcow2 image: writes to disjoint regions land exactly,
//! overlapping writes leave one writer's data per block (never a mix), a
//! reader never sees a newly allocated cluster before its data, and
//! `qemu-img check` is clean afterwards.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use common::*;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{BlockDevice, Qcow2, ZeroMode};

const MB: u64 = 1 << 20;

#[test]
fn concurrent_disjoint_and_overlapping_writes() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "t.qcow2");
    let mut o = CreateOptions::new(64 * MB);
    o.cluster_size = 16384;
    let q = Arc::new(Qcow2::create_file(&img, &o).unwrap());
    const THREADS: u64 = 8;
    const REGION: u64 = 4 * MB;
    let shared_base = THREADS * REGION;
    let written: Arc<Mutex<HashMap<u64, HashSet<u8>>>> = Arc::default();
    let models: Vec<Model> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let q = q.clone();
                let written = written.clone();
                s.spawn(move || {
                    let mut rng = Rng(0x5eed + t);
                    let mut model = Model::new(REGION);
                    let base = t * REGION;
                    for i in 0..250u64 {
                        match rng.below(10) {
                            0..=5 => {
                                let len = 1 + rng.below(100_000);
                                let off = rng.below(REGION - len);
                                let buf = pattern(t << 32 | i, len as usize);
                                q.write_at(&buf, base + off).unwrap();
                                model.write(off, &buf);
                            }
                            6 => {
                                let len = 1 + rng.below(70_000);
                                let off = rng.below(REGION - len);
                                q.write_zeroes(base + off, len, ZeroMode::MayUnmap).unwrap();
                                model.zero(off, len);
                            }
                            7 => {
                                // Overlapping region: whole 4 KiB blocks of
                                // one byte value per write.
                                let blocks = 1 + rng.below(16);
                                let first = rng.below((64 * MB - shared_base) / 4096 - blocks);
                                let v = (t * 31 + i) as u8 | 1;
                                let buf = vec![v; (blocks * 4096) as usize];
                                {
                                    let mut w = written.lock().unwrap();
                                    for b in first..first + blocks {
                                        w.entry(b).or_default().insert(v);
                                    }
                                }
                                q.write_at(&buf, shared_base + first * 4096).unwrap();
                            }
                            8 => {
                                let len = 1 + rng.below(50_000);
                                let off = rng.below(REGION - len);
                                let mut got = vec![0u8; len as usize];
                                q.read_at(&mut got, base + off).unwrap();
                                assert_eq!(
                                    &got[..],
                                    &model.data[off as usize..(off + len) as usize],
                                    "thread {t} read"
                                );
                            }
                            _ => q.flush().unwrap(),
                        }
                    }
                    model
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    q.flush().unwrap();
    for (t, m) in models.iter().enumerate() {
        let mut got = vec![0u8; REGION as usize];
        q.read_at(&mut got, t as u64 * REGION).unwrap();
        assert_same(&format!("region of thread {t}"), &got, &m.data);
    }
    let w = written.lock().unwrap();
    let mut block = vec![0u8; 4096];
    for b in 0..(64 * MB - shared_base) / 4096 {
        q.read_at(&mut block, shared_base + b * 4096).unwrap();
        let v = block[0];
        assert!(block.iter().all(|&x| x == v), "block {b} mixes writers");
        match w.get(&b) {
            Some(vals) => assert!(vals.contains(&v), "block {b} holds {v:#x}, which nobody wrote there"),
            None => assert_eq!(v, 0, "block {b} was never written"),
        }
    }
    drop(w);
    Arc::try_unwrap(q).unwrap().close().unwrap();
    assert_qemu_clean(&img, "qcow2");
}

#[test]
fn readers_never_see_a_mapping_before_its_data() {
    // One writer fills clusters (each with one byte value) in random order;
    // readers read random clusters and must see either zeros (unallocated)
    // or the complete cluster, never a cluster mapped but unwritten.
    let st = Arc::new(vdisk::MemStorage::new());
    let mut o = CreateOptions::new(32 * MB);
    o.cluster_size = 4096;
    let q = Arc::new(Qcow2::create(st, &o, Default::default()).unwrap());
    let clusters = 32 * MB / 4096;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|s| {
        for r in 0..3u64 {
            let q = q.clone();
            let done = done.clone();
            s.spawn(move || {
                let mut rng = Rng(99 + r);
                let mut buf = vec![0u8; 4096];
                let mut seen = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) || seen < 100 {
                    let c = rng.below(clusters);
                    q.read_at(&mut buf, c * 4096).unwrap();
                    let want = (c % 251) as u8 + 1;
                    assert!(buf.iter().all(|&x| x == 0) || buf.iter().all(|&x| x == want), "cluster {c} torn");
                    seen += 1;
                }
            });
        }
        let mut rng = Rng(7);
        let mut order: Vec<u64> = (0..clusters).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for c in order.into_iter().take(3000) {
            q.write_at(&vec![(c % 251) as u8 + 1; 4096], c * 4096).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}
