//! Property tests against a `Vec<u8>` model: random sequences of write,
//! write_zeroes, discard, resize, flush, close-and-reopen and snapshot
//! create/apply/delete, for random geometries. Every sequence ends with a
//! full read-back, every snapshot's content, `map` tiling the disk, and
//! `qemu-img check` + `qemu-img compare`.

mod common;

use common::*;
use proptest::prelude::*;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{BlockDevice, Format, Image, OpenOptions, Qcow2, ZeroMode};

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Compressed { cluster: u64, seed: u64 },
    Resize { size: u64 },
    Flush,
    Reopen,
    SnapCreate,
    SnapApply { idx: usize },
    SnapDelete { idx: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..1 << 22, prop_oneof![Just(1u64), 1u64..5000, 1u64..200_000], any::<u64>())
            .prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        2 => (0u64..1 << 22, 1u64..300_000, any::<bool>()).prop_map(|(off, len, unmap)| Op::Zero { off, len, unmap }),
        2 => (0u64..1 << 22, 1u64..300_000).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (0u64..64, any::<u64>()).prop_map(|(cluster, seed)| Op::Compressed { cluster, seed }),
        1 => (1u64 << 20..6 << 20).prop_map(|size| Op::Resize { size }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        2 => Just(Op::SnapCreate),
        1 => (0usize..8).prop_map(|idx| Op::SnapApply { idx }),
        1 => (0usize..8).prop_map(|idx| Op::SnapDelete { idx }),
    ]
}

struct World {
    model: Model,
    snaps: Vec<(String, Vec<u8>)>,
    next_snap: u32,
}

fn open(path: &std::path::Path) -> Qcow2 {
    match OpenOptions::new().format(Format::Qcow2).open(path).unwrap() {
        Image::Qcow2(q) => q,
        _ => unreachable!(),
    }
}

fn apply(slot: &mut Option<Qcow2>, w: &mut World, op: &Op, cs: u64, path: &std::path::Path) {
    if let Op::Reopen = op {
        slot.take().unwrap().close().unwrap();
        *slot = Some(open(path));
        return;
    }
    let q = slot.as_ref().unwrap();
    let size = w.model.data.len() as u64;
    let clip = |off: u64, len: u64| {
        let off = off % size;
        (off, len.min(size - off))
    };
    match *op {
        Op::Write { off, len, seed } => {
            let (off, len) = clip(off, len);
            let buf = pattern(seed, len as usize);
            q.write_at(&buf, off).unwrap();
            w.model.write(off, &buf);
        }
        Op::Zero { off, len, unmap } => {
            let (off, len) = clip(off, len);
            q.write_zeroes(off, len, if unmap { ZeroMode::MayUnmap } else { ZeroMode::Allocate }).unwrap();
            w.model.zero(off, len);
        }
        Op::Discard { off, len } => {
            let (off, len) = clip(off, len);
            q.discard(off, len).unwrap();
            let a = off.div_ceil(cs) * cs;
            let end = off + len;
            let b = if end == size { end } else { end / cs * cs };
            if b > a {
                w.model.zero(a, b - a);
            }
        }
        Op::Compressed { cluster, seed } => {
            let clusters = size / cs;
            if clusters == 0 {
                return;
            }
            let c = cluster % clusters;
            let mut buf = pattern(seed, cs as usize);
            if seed % 2 == 0 {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (i / 64) as u8;
                }
            }
            q.write_compressed(&buf, c * cs).unwrap();
            w.model.write(c * cs, &buf);
        }
        Op::Resize { size: new } => {
            let new = new / 512 * 512;
            if new < size && !w.snaps.is_empty() {
                assert!(q.resize_with(new, true).is_err());
                return;
            }
            q.resize_with(new, true).unwrap();
            w.model.resize(new);
        }
        Op::Flush => q.flush().unwrap(),
        Op::Reopen => unreachable!(),
        Op::SnapCreate => {
            let name = format!("s{}", w.next_snap);
            w.next_snap += 1;
            q.snapshot_create(&name).unwrap();
            w.snaps.push((name, w.model.data.clone()));
        }
        Op::SnapApply { idx } => {
            if w.snaps.is_empty() {
                return;
            }
            let (name, data) = &w.snaps[idx % w.snaps.len()];
            q.snapshot_apply(name).unwrap();
            w.model.data = data.clone();
        }
        Op::SnapDelete { idx } => {
            if w.snaps.is_empty() {
                return;
            }
            let (name, _) = w.snaps.remove(idx % w.snaps.len());
            q.snapshot_delete(&name).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn model_with_snapshots(
        cs_bits in prop_oneof![Just(9u32), Just(12u32), Just(16u32)],
        v2 in any::<bool>(),
        extl2 in any::<bool>(),
        ops in prop::collection::vec(op(), 1..30),
    ) {
        if !have_qemu() {
            return Ok(());
        }
        let dir = tmp();
        let path = p(dir.path(), "m.qcow2");
        let cs = 1u64 << cs_bits;
        let mut o = CreateOptions::new(4 << 20);
        o.cluster_size = cs;
        if v2 {
            o.version = 2;
        } else if extl2 && cs_bits >= 14 {
            o.extended_l2 = true;
        }
        let q = Qcow2::create_file(&path, &o).unwrap();
        q.close().unwrap();
        let mut slot = Some(open(&path));
        let mut w = World { model: Model::new(4 << 20), snaps: Vec::new(), next_snap: 0 };
        for op in &ops {
            apply(&mut slot, &mut w, op, cs, &path);
        }
        let q = slot.take().unwrap();
        // The content, every snapshot (exported at the current size, like
        // `qemu-img convert -l`), and the map tiling the disk.
        assert_same("final content", &read_all(&q), &w.model.data);
        let size = q.size();
        for (name, data) in &w.snaps {
            let view = q.snapshot_view(name).unwrap();
            let mut want = data.clone();
            want.resize(size as usize, 0);
            assert_same(&format!("snapshot {name}"), &read_all(&view), &want);
        }
        let mut pos = 0;
        while pos < size {
            let e = q.map(pos, u64::MAX).unwrap();
            prop_assert!(e.length > 0 && e.offset == pos);
            pos += e.length;
        }
        q.close().unwrap();
        assert_qemu_clean(&path, "qcow2");
        assert_qemu_compare(&path, "qcow2", &w.model);
        // qemu agrees on the snapshot list.
        let list = qemu_img(&["snapshot", "-l", path.to_str().unwrap()]);
        for (name, _) in &w.snaps {
            prop_assert!(list.contains(&format!(" {name} ")), "qemu does not list {}: {}", name, list);
        }
    }
}
