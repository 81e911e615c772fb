//! Crash test for LUKS qcow2 images: allocating writes (partial clusters,
//! so copy-on-write re-encrypts at the new host offset), overwrites in
//! place, discards, zeroes, refcount growth and a key-slot change run on a
//! `FaultyStorage` that loses power after its N-th write or sync. The disk
//! left behind reopens with its passphrase, has no corruption (vdisk check,
//! and qemu-img check for a sample of cuts), holds every write completed
//! before the last successful flush, and never holds plaintext of what was
//! written.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vdisk::luks::{KeyslotChange, SlotState};
use vdisk::qcow2::check::Repair;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{BlockDevice, FaultMode, FaultyStorage, MemStorage, Qcow2, Qcow2Options, Secret, Survivors, ZeroMode};

const SIZE: u64 = 2 << 20;
const PASS: &str = "crash-pass";

fn key() -> Option<Secret> {
    Some(Secret::new(PASS))
}

fn fresh_image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(SIZE);
    o.cluster_size = 4096;
    o.refcount_bits = 64;
    o.set("encrypt.format", "luks").unwrap();
    o.set("encrypt.cipher-alg", "aes-128").unwrap();
    o.set("encrypt.iter-time", "1").unwrap();
    o.encrypt = key();
    let q = Qcow2::create(st.clone(), &o, Qcow2Options::default()).unwrap();
    q.close().unwrap();
    st.to_vec()
}

#[derive(Default)]
struct Progress {
    durable: Option<Vec<u8>>,
    touched: Vec<(u64, u64)>,
    /// Every plaintext written (to look for in the file).
    written: Vec<Vec<u8>>,
}

fn workload(q: &Qcow2, model: &mut Model, prog: &mut Progress) -> vdisk::Result<()> {
    let write = |q: &Qcow2, model: &mut Model, prog: &mut Progress, off: u64, seed: u64, len: usize| {
        let d = pattern(seed, len);
        prog.touched.push((off, len as u64));
        prog.written.push(d.clone());
        q.write_at(&d, off)?;
        model.write(off, &d);
        Ok::<(), vdisk::Error>(())
    };
    let flush = |q: &Qcow2, model: &Model, prog: &mut Progress| -> vdisk::Result<()> {
        q.flush()?;
        prog.durable = Some(model.data.clone());
        prog.touched.clear();
        Ok(())
    };
    write(q, model, prog, 700, 1, 300)?;
    write(q, model, prog, 100_001, 2, 5000)?;
    flush(q, model, prog)?;
    // Unaligned overwrite inside an allocated cluster (read-modify-write).
    write(q, model, prog, 800, 3, 100)?;
    flush(q, model, prog)?;
    // Many clusters: the refcount table grows.
    write(q, model, prog, 1 << 20, 4, 600 << 10)?;
    flush(q, model, prog)?;
    prog.touched.push((0, 8192));
    q.discard(0, 8192)?;
    model.zero(0, 8192);
    prog.touched.push(((1 << 20) + 512, 20_000));
    q.write_zeroes((1 << 20) + 512, 20_000, ZeroMode::MayUnmap)?;
    model.zero((1 << 20) + 512, 20_000);
    flush(q, model, prog)?;
    // A second passphrase, then more writes.
    let c = KeyslotChange {
        state: SlotState::Active,
        keyslot: None,
        new_secret: Some(Secret::new("second")),
        old_secret: None,
        iter_time_ms: Some(1),
        force: false,
    };
    q.change_luks_keyslots(&Secret::new(PASS), &c)?;
    write(q, model, prog, 300_000, 5, 70_000)?;
    flush(q, model, prog)?;
    Ok(())
}

fn run_to_crash(image: &[u8], budget: Option<u64>) -> (Arc<FaultyStorage>, Progress) {
    let st = Arc::new(FaultyStorage::new(image.to_vec(), budget, FaultMode::PowerLoss));
    let mut model = Model::new(SIZE);
    let mut prog = Progress { durable: Some(model.data.clone()), ..Default::default() };
    if let Ok(q) = Qcow2::open(st.clone(), Qcow2Options { key: key(), ..Default::default() }) {
        let r = workload(&q, &mut model, &mut prog);
        if budget.is_none() {
            r.unwrap();
        }
    }
    (st, prog)
}

fn verify(dir: &Path, bytes: &[u8], prog: &Progress, what: &str, with_qemu: bool) {
    for w in &prog.written {
        if let Some(chunk) = w.chunks_exact(64).next() {
            assert!(!bytes.windows(64).any(|x| x == chunk), "{what}: plaintext found in the file");
        }
    }
    let st = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let q = Qcow2::open(st.clone(), Qcow2Options { key: key(), ..Default::default() })
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let rep = q.check(Repair::None).unwrap();
    assert_eq!(rep.corruptions, 0, "{what}: vdisk check: {:?}", rep.messages);
    if let Some(want) = &prog.durable {
        let got = read_all(&q);
        let mut mask = vec![true; SIZE as usize];
        for &(o, l) in &prog.touched {
            mask[o as usize..(o + l).min(SIZE) as usize].fill(false);
        }
        if let Some(i) = (0..SIZE as usize).find(|&i| mask[i] && got[i] != want[i]) {
            panic!("{what}: flushed data lost at {i:#x}");
        }
    }
    drop(q);
    if with_qemu {
        let img = dir.join("crash.qcow2");
        std::fs::write(&img, st.to_vec()).unwrap();
        let io = format!("driver=qcow2,file.filename={},encrypt.key-secret=sec0", img.display());
        let obj = format!("secret,id=sec0,data={PASS}");
        let (code, out, err) = run_status("qemu-img", &["check", "--object", &obj, "--image-opts", &io]);
        assert!(code == 0 || code == 3, "{what}: qemu-img check (exit {code}):\n{out}{err}");
    }
}

#[test]
fn crash_during_luks_qcow2_writes() {
    if !have_qemu() {
        return;
    }
    let image = fresh_image();
    let (full, prog) = run_to_crash(&image, None);
    let total = full.ops();
    assert!(total > 30, "workload too small: {total} ops");
    let dir = tmp();
    verify(dir.path(), &full.current(), &prog, "no crash", true);
    let cuts: Vec<u64> = (1..=total).filter(|n| *n < 40 || n % 6 == 0).collect();
    for n in cuts {
        let (st, prog) = run_to_crash(&image, Some(n));
        for (s, name) in [(Survivors::All, "all"), (Survivors::None, "none"), (Survivors::Some(n * 7919), "some")] {
            let what = format!("cut {n}/{total} ({name} unsynced writes kept)");
            verify(dir.path(), &st.crashed_image(s), &prog, &what, n % 12 == 0);
        }
    }
}

/// Forcing a new passphrase into the only active key slot of a standalone
/// LUKS volume, cut by power loss at every write: the volume always opens
/// with the old passphrase or the new one, and its data is intact.
#[test]
fn crash_while_overwriting_the_only_key_slot() {
    use vdisk::luks::{Luks, Luks1Params, LuksOptions};
    let data = pattern(0x1c, 64 << 10);
    let st = Arc::new(MemStorage::new());
    let params = Luks1Params { iter_time_ms: 1, ..Default::default() };
    let v = Luks::create(st.clone(), None, 1 << 20, &params, &Secret::new(PASS)).unwrap();
    v.write_at(&data, 4096).unwrap();
    v.flush().unwrap();
    drop(v);
    let image = st.to_vec();
    let change = KeyslotChange {
        state: SlotState::Active,
        keyslot: Some(0),
        new_secret: Some(Secret::new("new-pass")),
        old_secret: None,
        iter_time_ms: Some(1),
        force: true,
    };
    let run = |budget: Option<u64>| {
        let f = Arc::new(FaultyStorage::new(image.clone(), budget, FaultMode::PowerLoss));
        let v = Luks::open(f.clone(), LuksOptions { key: key(), ..Default::default() }).unwrap();
        let r = v.change_keyslots(&change);
        if budget.is_none() {
            r.unwrap();
        }
        f
    };
    let total = run(None).ops();
    assert!(total >= 4, "{total} writes");
    let opens = |bytes: &[u8], pass: &str| -> bool {
        let m = Arc::new(MemStorage::from_vec(bytes.to_vec()));
        match Luks::open(m, LuksOptions { key: Some(Secret::new(pass)), read_only: true, ..Default::default() }) {
            Ok(v) => {
                let mut back = vec![0u8; data.len()];
                v.read_at(&mut back, 4096).unwrap();
                assert!(back == data, "data changed");
                true
            }
            Err(_) => false,
        }
    };
    let last = run(None).current();
    assert!(opens(&last, "new-pass") && !opens(&last, PASS), "the change did not take");
    for n in 1..=total {
        let f = run(Some(n));
        for (s, name) in [(Survivors::All, "all"), (Survivors::None, "none"), (Survivors::Some(n * 7919), "some")] {
            let b = f.crashed_image(s);
            assert!(opens(&b, PASS) || opens(&b, "new-pass"), "cut {n}/{total} ({name}): opened by neither passphrase");
        }
    }
}
