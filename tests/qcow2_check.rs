//! `vdisk check` against `qemu-img check`: the same counts on images
//! corrupted on purpose (leaks left by an interrupted writer, refcounts
//! poked up and down), the same exit codes, and repairs that leave the image
//! clean by qemu's judgement with the data intact.

mod common;

use std::sync::Arc;

use common::*;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{BlockDevice, FaultMode, FaultyStorage, MemStorage, Qcow2, Survivors};

fn json_field(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\": ");
    match json.find(&key) {
        Some(i) => {
            let rest = &json[i + key.len()..];
            let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
            rest[..end].trim().parse().unwrap()
        }
        None => 0,
    }
}

fn counts_agree(img: &std::path::Path) -> (u64, u64) {
    let (qcode, qjson) = qemu_check(img, "qcow2");
    let (vcode, vjson, verr) = vdisk(&["check", "-f", "qcow2", "--output=json", img.to_str().unwrap()]);
    for f in ["leaks", "corruptions", "check-errors"] {
        assert_eq!(json_field(&vjson, f), json_field(&qjson, f), "{f}: vdisk\n{vjson}{verr}\nqemu\n{qjson}");
    }
    assert_eq!(vcode, qcode, "exit codes differ: vdisk {vcode}, qemu {qcode}");
    (json_field(&qjson, "leaks"), json_field(&qjson, "corruptions"))
}

/// A 4 MiB image (4 KiB clusters) with data, a discarded hole, and its
/// content as qemu exports it.
fn image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let img = p(dir, "c.qcow2");
    let mut o = CreateOptions::new(4 << 20);
    o.cluster_size = 4096;
    let q = Qcow2::create_file(&img, &o).unwrap();
    q.write_at(&pattern(1, 1 << 20), 0).unwrap();
    q.discard(64 << 10, 64 << 10).unwrap();
    q.close().unwrap();
    let data = qemu_export(&img, "qcow2");
    (img, data)
}

fn refblock_offset(bytes: &[u8]) -> usize {
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap()) as usize
}

fn poke_refcount(img: &std::path::Path, cluster: usize, value: u16) {
    let mut b = std::fs::read(img).unwrap();
    let rb = refblock_offset(&b);
    b[rb + 2 * cluster..rb + 2 * cluster + 2].copy_from_slice(&value.to_be_bytes());
    std::fs::write(img, b).unwrap();
}

#[test]
fn clean_image() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let (img, _) = image(dir.path());
    assert_eq!(counts_agree(&img), (0, 0));
    let (code, out, _) = vdisk(&["check", img.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("No errors were found on the image."), "{out}");
}

#[test]
fn leaks_and_errors_poked_then_repaired() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let (img, data) = image(dir.path());
    let bytes = std::fs::read(&img).unwrap();
    let file_clusters = bytes.len() / 4096;
    // A cluster the discard freed (refcount 0, inside the file): a leak.
    let rb = refblock_offset(&bytes);
    let free =
        (1..file_clusters).find(|&c| u16::from_be_bytes([bytes[rb + 2 * c], bytes[rb + 2 * c + 1]]) == 0).unwrap();
    poke_refcount(&img, free, 1);
    assert_eq!(counts_agree(&img), (1, 0));
    let (code, _, _) = vdisk(&["check", img.to_str().unwrap()]);
    assert_eq!(code, 3, "leaks only: exit 3");
    let (code, out, _) = vdisk(&["check", "-r", "leaks", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 leaked clusters"), "{out}");
    assert_qemu_clean(&img, "qcow2");

    // A data cluster with refcount 0: an error (and a wrong COPIED flag).
    let data_cluster = (1..file_clusters)
        .rev()
        .find(|&c| u16::from_be_bytes([bytes[rb + 2 * c], bytes[rb + 2 * c + 1]]) == 1)
        .unwrap();
    poke_refcount(&img, data_cluster, 0);
    let (_, corruptions) = counts_agree(&img);
    assert!(corruptions >= 1);
    let (code, _, _) = vdisk(&["check", img.to_str().unwrap()]);
    assert_eq!(code, 2, "corruption: exit 2");
    // -r leaks does not fix errors; -r all does.
    let (code, _, _) = vdisk(&["check", "-r", "leaks", img.to_str().unwrap()]);
    assert_eq!(code, 2);
    let (code, out, err) = vdisk(&["check", "-r", "all", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_qemu_clean(&img, "qcow2");
    assert_same("data after repair", &qemu_export(&img, "qcow2"), &data);

    // A refcount too high on a data cluster: a leak, and qemu's COPIED error.
    poke_refcount(&img, data_cluster, 2);
    counts_agree(&img);
    let (code, _, _) = vdisk(&["check", "-r", "all", img.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_qemu_clean(&img, "qcow2");
    assert_same("data after second repair", &qemu_export(&img, "qcow2"), &data);
}

#[test]
fn leaks_left_by_an_interrupted_writer() {
    if !have_qemu() {
        return;
    }
    // A writer that dies after its refcounts reached the disk but before
    // the tables that use them: leaked clusters, counted alike by both.
    let base = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(8 << 20);
    o.cluster_size = 4096;
    Qcow2::create(base.clone(), &o, Default::default()).unwrap().close().unwrap();
    let image = base.to_vec();
    let dir = tmp();
    let img = p(dir.path(), "killed.qcow2");
    let mut found_leaks = false;
    for cut in 1..40 {
        let st = Arc::new(FaultyStorage::new(image.clone(), Some(cut), FaultMode::PowerLoss));
        if let Ok(q) = Qcow2::open(st.clone(), Default::default()) {
            let _ = q.write_at(&pattern(3, 2 << 20), 0).and_then(|_| q.flush());
        }
        std::fs::write(&img, st.crashed_image(Survivors::All)).unwrap();
        let (leaks, corruptions) = counts_agree(&img);
        assert_eq!(corruptions, 0, "cut {cut}");
        if leaks > 0 {
            found_leaks = true;
            let (code, _, _) = vdisk(&["check", "-r", "leaks", img.to_str().unwrap()]);
            assert_eq!(code, 0);
            assert_qemu_clean(&img, "qcow2");
        }
    }
    assert!(found_leaks, "no cut left leaks: the test does not test anything");
}

/// Memory that records the offset of every read.
#[derive(Debug, Default)]
struct CountingReads {
    mem: MemStorage,
    reads: parking_lot::Mutex<Vec<u64>>,
}

impl vdisk::Storage for CountingReads {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        self.reads.lock().push(offset);
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> vdisk::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn len(&self) -> vdisk::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> vdisk::Result<()> {
        self.mem.set_len(len)
    }
    fn sync(&self) -> vdisk::Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

/// `check` reads each active L2 table once (statistics, references and
/// COPIED flags from the same read), also when it finds a COPIED flag
/// wrong, and still reports what it reported when it read them three
/// times.
#[test]
fn check_reads_each_active_l2_table_once() {
    use vdisk::qcow2::{Qcow2Options, Repair};
    use vdisk::Storage;
    let s = Arc::new(CountingReads::default());
    let mut o = CreateOptions::new(16 << 20);
    // 4 KiB clusters: one L2 table maps 2 MiB.
    o.cluster_size = 4096;
    let q = Qcow2::create(s.clone(), &o, Qcow2Options::default()).unwrap();
    for i in 0..6u64 {
        q.write_at(&vec![i as u8 + 1; 256 << 10], i * (2 << 20) + 4096).unwrap();
    }
    let h = q.header();
    q.close().unwrap();
    let mut l1 = vec![0u8; 8 * h.l1_size as usize];
    s.read_at(&mut l1, h.l1_table_offset).unwrap();
    let l2s: Vec<u64> = l1
        .chunks_exact(8)
        .map(|e| u64::from_be_bytes(e.try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        .filter(|&o| o != 0)
        .collect();
    assert_eq!(l2s.len(), 6);
    let reads_of = |s: &CountingReads, o: u64| s.reads.lock().iter().filter(|&&r| r == o).count();
    for poke in [false, true] {
        if poke {
            // Drop COPIED from the first entry of the third table.
            let mut e = [0u8; 8];
            s.read_at(&mut e, l2s[2] + 8).unwrap();
            let w = u64::from_be_bytes(e) & !(1 << 63);
            s.write_at(&w.to_be_bytes(), l2s[2] + 8).unwrap();
        }
        let q = Qcow2::open(s.clone(), Qcow2Options { read_only: true, ..Qcow2Options::default() }).unwrap();
        s.reads.lock().clear();
        let r = q.check(Repair::None).unwrap();
        for &t in &l2s {
            assert_eq!(reads_of(&s, t), 1, "L2 table at {t:#x} read {} times", reads_of(&s, t));
        }
        assert_eq!(r.allocated_clusters, 6 * 64);
        if poke {
            assert_eq!(r.corruptions, 1, "{:?}", r.messages);
            assert!(r.messages.iter().any(|m| m.contains("ERROR OFLAG_COPIED data cluster")), "{:?}", r.messages);
        } else {
            assert!(r.is_clean(), "{r:?}");
        }
    }
}
