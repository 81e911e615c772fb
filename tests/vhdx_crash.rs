//! VHDX crash tests: an allocating workload (new blocks, overwrites,
//! zeroes, several allocations between flushes) runs on a `FaultyStorage`
//! that "loses power" after its N-th write or sync, for every N. The disk
//! left behind (with all, none, or a random subset of the writes since the
//! last sync) must open in vdisk read-only (its log applied in memory) and
//! read-write (its log replayed), with a BAT that points only inside the
//! file, and hold every write that completed before the last successful
//! flush; QEMU, after its own replay (`qemu-img check -r all`), must find
//! no error and read the same bytes.

mod common;

use std::sync::Arc;

use common::*;
use vdisk::vhdx::format::MIB;
use vdisk::{
    BlockDevice, FaultMode, FaultyStorage, MemStorage, Storage, Survivors, Vhdx, VhdxCreateOptions, VhdxOptions,
    ZeroMode,
};

const SIZE: u64 = 4 * MIB;

fn fresh_image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let o = VhdxCreateOptions::parse("block_size=1M,block_state_zero=off").unwrap();
    let v = Vhdx::create_on(st.clone(), SIZE, &o).unwrap();
    v.close().unwrap();
    st.to_vec()
}

#[derive(Default)]
struct Progress {
    durable: Option<Vec<u8>>,
    touched: Vec<(u64, u64)>,
}

fn workload(v: &Vhdx, model: &mut Model, prog: &mut Progress) -> vdisk::Result<()> {
    let write = |v: &Vhdx, model: &mut Model, prog: &mut Progress, off: u64, d: Vec<u8>| -> vdisk::Result<()> {
        prog.touched.push((off, d.len() as u64));
        v.write_at(&d, off)?;
        model.write(off, &d);
        Ok(())
    };
    let flush = |v: &Vhdx, model: &Model, prog: &mut Progress| -> vdisk::Result<()> {
        v.flush()?;
        prog.durable = Some(model.data.clone());
        prog.touched.clear();
        Ok(())
    };
    write(v, model, prog, 700, pattern(1, 300))?;
    write(v, model, prog, MIB + 100_000, pattern(2, 5000))?;
    flush(v, model, prog)?;
    // In place: no metadata.
    write(v, model, prog, 800, pattern(3, 100))?;
    flush(v, model, prog)?;
    // Several allocations between flushes: several log entries pending.
    write(v, model, prog, 2 * MIB - 10, pattern(4, (1 << 20) + 20))?;
    write(v, model, prog, 3 * MIB + 5, pattern(5, 10))?;
    prog.touched.push((MIB, MIB));
    v.write_zeroes(MIB, MIB, ZeroMode::MayUnmap)?;
    model.zero(MIB, MIB);
    flush(v, model, prog)?;
    write(v, model, prog, SIZE - 3, pattern(6, 3))?;
    write(v, model, prog, 2 * MIB, pattern(7, 4096))?;
    flush(v, model, prog)?;
    Ok(())
}

fn outside_touched(i: usize, touched: &[(u64, u64)]) -> bool {
    let i = i as u64;
    !touched.iter().any(|&(o, l)| i >= o && i < o + l)
}

fn check_crashed(img: Vec<u8>, prog: &Progress, what: &str, with_qemu: bool) {
    let want = prog.durable.clone().unwrap_or_else(|| vec![0; SIZE as usize]);
    // Read-only: the log applied in memory, the bytes untouched.
    let st = Arc::new(MemStorage::from_vec(img.clone()));
    let v = Vhdx::open(st.clone(), VhdxOptions { read_only: true, ..Default::default() })
        .unwrap_or_else(|e| panic!("{what}: vdisk cannot open the crashed image read-only: {e}"));
    let got = read_all(&v);
    drop(v);
    assert_eq!(st.to_vec(), img, "{what}: a read-only open changed the file");
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        if a != b && outside_touched(i, &prog.touched) {
            panic!("{what}: byte {i:#x} is {a:#x}, the last flush left {b:#x}");
        }
    }
    // Read-write: replayed into the file, then the same content, and a
    // second open has nothing left to replay.
    let rw = Arc::new(MemStorage::from_vec(img.clone()));
    let v = Vhdx::open(rw.clone(), VhdxOptions::default())
        .unwrap_or_else(|e| panic!("{what}: vdisk cannot open the crashed image read-write: {e}"));
    assert_same(&format!("{what}: replayed vs in-memory"), &read_all(&v), &got);
    v.close().unwrap();
    let again = Vhdx::open(rw.clone(), VhdxOptions { read_only: true, ..Default::default() }).unwrap();
    assert!(!again.log_replayed(), "{what}: the log is still there after a read-write open");
    drop(again);
    if with_qemu && have_qemu() {
        let dir = tmp();
        let path = dir.path().join("crash.vhdx");
        std::fs::write(&path, &img).unwrap();
        let ps = path.display().to_string();
        let (code, out, err) = run_status("qemu-img", &["check", "-r", "all", &ps]);
        assert_eq!(code, 0, "{what}: qemu-img check -r all:\n{out}{err}");
        assert_qemu_clean(&path, "vhdx");
        assert_same(&format!("{what}: qemu's replay vs vdisk's"), &qemu_export(&path, "vhdx"), &got);
        // vdisk's replayed file reads the same in QEMU.
        std::fs::write(&path, rw.to_vec()).unwrap();
        assert_qemu_clean(&path, "vhdx");
        assert_same(&format!("{what}: qemu reading vdisk's replay"), &qemu_export(&path, "vhdx"), &got);
    }
}

#[test]
fn crash_at_every_write_keeps_the_bat_consistent() {
    let base = fresh_image();
    // The full run: how many operations the workload takes.
    let full = FaultyStorage::new(base.clone(), None, FaultMode::PowerLoss);
    let full = Arc::new(full);
    let total = {
        let v = Vhdx::open(full.clone() as Arc<dyn Storage>, VhdxOptions::default()).unwrap();
        let mut m = Model::new(SIZE);
        workload(&v, &mut m, &mut Progress::default()).unwrap();
        let total = full.ops();
        v.close().unwrap();
        total
    };
    assert!(total > 20, "the workload does {total} operations");
    for n in 0..total {
        let st = Arc::new(FaultyStorage::new(base.clone(), Some(n), FaultMode::PowerLoss));
        let mut model = Model::new(SIZE);
        let mut prog = Progress::default();
        let r = match Vhdx::open(st.clone() as Arc<dyn Storage>, VhdxOptions::default()) {
            Ok(v) => workload(&v, &mut model, &mut prog),
            Err(e) => Err(e),
        };
        assert!(r.is_err() && st.has_failed(), "budget {n} of {total} did not fail");
        for (k, s) in [Survivors::All, Survivors::None, Survivors::Some(n * 7 + 1)].into_iter().enumerate() {
            check_crashed(
                st.crashed_image(s),
                &prog,
                &format!("crash after {n} ops ({s:?})"),
                k == 2 && std::env::var("VDISK_SKIP_QEMU").is_err() && n % 8 == 0,
            );
        }
    }
}

#[test]
fn interrupted_write_leaves_a_log_qemu_replays() {
    // Crash right after the first log entry is durable and before the BAT
    // sector is written in place: the image holds an unreplayed log.
    let base = fresh_image();
    for n in 1..40 {
        let st = Arc::new(FaultyStorage::new(base.clone(), Some(n), FaultMode::PowerLoss));
        let v = Vhdx::open(st.clone() as Arc<dyn Storage>, VhdxOptions::default()).unwrap();
        let d = pattern(9, 4096);
        let _ = v.write_at(&d, 3 * MIB + 8192);
        drop(v);
        let img = st.crashed_image(Survivors::None);
        let ro = Vhdx::open(
            Arc::new(MemStorage::from_vec(img.clone())),
            VhdxOptions { read_only: true, ..Default::default() },
        )
        .unwrap();
        if !ro.log_replayed() {
            continue;
        }
        let mut got = vec![0u8; 4096];
        ro.read_at(&mut got, 3 * MIB + 8192).unwrap();
        assert_eq!(got, d, "the logged allocation is visible after the in-memory replay");
        if have_qemu() {
            let dir = tmp();
            let path = dir.path().join("log.vhdx");
            std::fs::write(&path, &img).unwrap();
            let ps = path.display().to_string();
            let (code, _, err) = run_status("qemu-img", &["info", &ps]);
            assert_ne!(code, 0, "qemu opens an image that needs a replay read-only: {err}");
            let (code, out, err) = run_status("qemu-img", &["check", "-r", "all", &ps]);
            assert_eq!(code, 0, "{out}{err}");
            assert_same("qemu replay", &qemu_export(&path, "vhdx"), &read_all(&ro));
        }
        return;
    }
    panic!("no crash point left an unreplayed log");
}
