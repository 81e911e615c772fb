//! Crash tests: a workload that allocates, copies on write from a backing
//! file, discards, grows the refcount table, writes compressed clusters and
//! takes, applies and deletes snapshots runs on a `FaultyStorage` that "loses
//! power" after its N-th write or sync, for every N. The disk left behind
//! (with all, none, or a random subset of the writes since the last sync)
//! must pass `qemu-img check` with no corruption (leaks are fine), reopen in
//! vdisk, and hold every write that completed before the last successful
//! flush.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vdisk::qcow2::check::Repair;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{BlockDevice, FaultMode, FaultyStorage, MemStorage, Qcow2, Qcow2Options, Raw, Survivors, ZeroMode};

const SIZE: u64 = 4 << 20;

fn backing_bytes() -> Vec<u8> {
    pattern(0xbacc, SIZE as usize / 2)
}

fn backing() -> Arc<dyn BlockDevice> {
    Arc::new(Raw::open(Arc::new(MemStorage::from_vec(backing_bytes()))).unwrap())
}

/// A fresh image (512-byte clusters, 64-bit refcounts: the refcount table
/// must grow during the workload) over a raw backing file named base.raw.
fn fresh_image(lazy: bool) -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(SIZE);
    o.lazy_refcounts = lazy;
    o.cluster_size = 512;
    o.refcount_bits = 64;
    o.backing_file = Some("base.raw".into());
    o.backing_format = Some("raw".into());
    let q = Qcow2::create(st.clone(), &o, Qcow2Options { backing: Some(backing()), ..Default::default() }).unwrap();
    q.close().unwrap();
    st.to_vec()
}

/// What the guest content must be after each completed flush.
#[derive(Default)]
struct Progress {
    /// Model at the last successful flush (None before the first).
    durable: Option<Vec<u8>>,
    /// Ranges written since that flush (their content is undetermined).
    touched: Vec<(u64, u64)>,
}

/// The workload. Returns Err when the storage failed (the "crash").
fn workload(q: &Qcow2, model: &mut Model, prog: &mut Progress, snapshots: bool) -> vdisk::Result<()> {
    let step = |q: &Qcow2,
                model: &mut Model,
                prog: &mut Progress,
                off: u64,
                data: Option<Vec<u8>>,
                len: u64|
     -> vdisk::Result<()> {
        prog.touched.push((off, len));
        match data {
            Some(d) => {
                q.write_at(&d, off)?;
                model.write(off, &d);
            }
            None => {
                q.write_zeroes(off, len, ZeroMode::MayUnmap)?;
                model.zero(off, len);
            }
        }
        Ok(())
    };
    let flush = |q: &Qcow2, model: &Model, prog: &mut Progress| -> vdisk::Result<()> {
        q.flush()?;
        prog.durable = Some(model.data.clone());
        prog.touched.clear();
        Ok(())
    };
    // Partial-cluster writes copy on write from the backing file.
    step(q, model, prog, 700, Some(pattern(1, 300)), 300)?;
    step(q, model, prog, 100_000, Some(pattern(2, 5000)), 5000)?;
    flush(q, model, prog)?;
    // An overwrite in place (no metadata changes) must be durable after
    // the next flush too.
    step(q, model, prog, 800, Some(pattern(9, 100)), 100)?;
    flush(q, model, prog)?;
    // Many clusters: the refcount table grows and moves.
    step(q, model, prog, 1 << 20, Some(pattern(3, 1 << 20)), 1 << 20)?;
    flush(q, model, prog)?;
    // Discard (the zero flag hides the backing file) and zeroes.
    prog.touched.push((0, 64 << 10));
    q.discard(0, 64 << 10)?;
    model.zero(0, 64 << 10);
    step(q, model, prog, (1 << 20) + 512, None, 100_000)?;
    flush(q, model, prog)?;
    // Compressed clusters and overwrites of them.
    let comp: Vec<u8> = (0..4096u32).map(|i| (i / 100) as u8).collect();
    prog.touched.push((3 << 20, 4096));
    q.write_compressed(&comp, 3 << 20)?;
    model.write(3 << 20, &comp);
    step(q, model, prog, (3 << 20) + 100, Some(pattern(4, 200)), 200)?;
    flush(q, model, prog)?;
    if snapshots {
        q.snapshot_create("one")?;
        step(q, model, prog, 2 << 20, Some(pattern(5, 3000)), 3000)?;
        flush(q, model, prog)?;
        let before_apply = prog.durable.clone();
        q.snapshot_create("two")?;
        step(q, model, prog, 50_000, Some(pattern(6, 70_000)), 70_000)?;
        flush(q, model, prog)?;
        // Back to "two": the last write is undone.
        prog.touched.push((0, SIZE));
        q.snapshot_apply("two")?;
        if let Some(b) = before_apply {
            model.data = b;
        }
        prog.durable = Some(model.data.clone());
        prog.touched.clear();
        q.snapshot_delete("one")?;
        step(q, model, prog, 60_000, Some(pattern(7, 1000)), 1000)?;
    }
    flush(q, model, prog)?;
    Ok(())
}

fn run_to_crash(image: &[u8], budget: Option<u64>, snapshots: bool) -> (Arc<FaultyStorage>, Progress) {
    let st = Arc::new(FaultyStorage::new(image.to_vec(), budget, FaultMode::PowerLoss));
    let mut model = Model { data: backing_bytes() };
    model.resize(SIZE);
    let mut prog = Progress { durable: Some(model.data.clone()), touched: Vec::new() };
    let opened = Qcow2::open(st.clone(), Qcow2Options { backing: Some(backing()), ..Default::default() });
    if let Ok(q) = opened {
        let r = workload(&q, &mut model, &mut prog, snapshots);
        if budget.is_none() {
            r.unwrap();
        }
    }
    (st, prog)
}

fn verify(dir: &Path, bytes: &[u8], prog: &Progress, what: &str) {
    let img = dir.join("crash.qcow2");
    if !dir.join("base.raw").exists() {
        std::fs::write(dir.join("base.raw"), backing_bytes()).unwrap();
    }
    // The dirty bit (v3 header, incompatible feature bit 0) says refcounts
    // may be behind: opening read-write repairs them first, as QEMU does.
    let dirty = bytes[79] & 1 != 0;
    let st = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let q = Qcow2::open(st.clone(), Qcow2Options { backing: Some(backing()), ..Default::default() })
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let rep = q.check(Repair::None).unwrap();
    assert_eq!(rep.corruptions, 0, "{what}: vdisk check after open: {:?}", rep.messages);
    let names: Vec<String> = q.snapshots().iter().map(|s| s.name.clone()).collect();
    assert!(
        [vec![], vec!["one"], vec!["one", "two"], vec!["two"]].iter().any(|w| *w == names),
        "{what}: unexpected snapshot table {names:?}"
    );
    if let Some(want) = &prog.durable {
        let got = read_all(&q);
        let mut mask = vec![true; SIZE as usize];
        for &(o, l) in &prog.touched {
            mask[o as usize..(o + l).min(SIZE) as usize].fill(false);
        }
        if let Some(i) = (0..SIZE as usize).find(|&i| mask[i] && got[i] != want[i]) {
            panic!("{what}: flushed data lost at {i:#x}: got {:#x}, want {:#x}", got[i], want[i]);
        }
    }
    drop(q);
    // qemu-img judges the image as left by the crash (or, when the dirty
    // bit was set, as repaired by opening it).
    let judged = if dirty { st.to_vec() } else { bytes.to_vec() };
    std::fs::write(&img, &judged).unwrap();
    let (code, out) = qemu_check(&img, "qcow2");
    if !(code == 0 || code == 3) {
        let (_, o2, e2) = run_status("qemu-img", &["check", img.to_str().unwrap()]);
        panic!("{what} (dirty: {dirty}): qemu-img check found corruption (exit {code}):\n{out}\n{o2}{e2}");
    }
}

fn crash_at_every_step(snapshots: bool, lazy: bool) {
    if !have_qemu() {
        return;
    }
    let image = fresh_image(lazy);
    let (full, _) = run_to_crash(&image, None, snapshots);
    let total = full.ops();
    assert!(total > 50, "workload too small: {total} ops");
    let dir = tmp();
    // Every cut for the first part, then every third: the whole sweep stays
    // within a few seconds.
    let cuts: Vec<u64> = (1..=total).filter(|n| *n < 150 || n % 4 == 0).collect();
    for n in cuts {
        let (st, prog) = run_to_crash(&image, Some(n), snapshots);
        for (s, name) in [(Survivors::All, "all"), (Survivors::None, "none"), (Survivors::Some(n * 7919), "some")] {
            verify(dir.path(), &st.crashed_image(s), &prog, &format!("cut {n}/{total} ({name} unsynced writes kept)"));
        }
    }
}

#[test]
fn crash_during_writes_discards_and_refcount_growth() {
    crash_at_every_step(false, false);
}

#[test]
fn crash_with_lazy_refcounts() {
    crash_at_every_step(false, true);
}

#[test]
fn crash_during_snapshot_operations() {
    crash_at_every_step(true, false);
}
