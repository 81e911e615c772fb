//! `vdisk rebase` keeps what the guest sees (qemu-img compare against a
//! copy made before), leaves ranges the new backing file already provides
//! unallocated, and survives a crash at any write: the image reads the same
//! through whichever backing file its header names.

mod common;

use std::sync::Arc;

use common::*;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{BlockDevice, FaultMode, FaultyStorage, MemStorage, Qcow2, Qcow2Options, Raw, Survivors, ZeroMode};

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn rebase_keeps_the_guest_view() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let (b1, b2, top) = (p(d.path(), "b1.qcow2"), p(d.path(), "b2.qcow2"), p(d.path(), "top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", s(&b1), "8M"]);
    run("qemu-io", &["-c", "write -P 1 0 8M", s(&b1)]);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&b2), "6M"]);
    // b2 agrees with b1 on [0, 2M), differs on [2M, 4M), is zero from 4M on.
    run("qemu-io", &["-c", "write -P 1 0 2M", "-c", "write -P 2 2M 2M", s(&b2)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", s(&top)]);
    run("qemu-io", &["-c", "write -P 9 1M 64k", "-c", "write -z 5M 64k", s(&top)]);
    let reference = p(d.path(), "ref.raw");
    qemu_img(&["convert", "-O", "raw", s(&top), s(&reference)]);
    for (case, args) in [("onto b2", vec!["-F", "qcow2", "-b", "b2.qcow2"]), ("flatten", vec!["-b", ""])] {
        let img = p(d.path(), &format!("{}.qcow2", case.replace(' ', "_")));
        std::fs::copy(&top, &img).unwrap();
        let mut a = vec!["rebase"];
        a.extend(args.iter().copied());
        a.push(s(&img));
        let (code, o, e) = vdisk(&a);
        assert_eq!(code, 0, "{case}: {o}{e}");
        let (code, o, e) = run_status("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s(&reference), s(&img)]);
        assert_eq!(code, 0, "{case}: {o}{e}");
        assert_qemu_clean(&img, "qcow2");
        let info = qemu_img(&["info", s(&img)]);
        if case == "flatten" {
            assert!(!info.contains("backing file"), "{info}");
        } else {
            assert!(info.contains("backing file: b2.qcow2") && info.contains("backing file format: qcow2"), "{info}");
            // What b2 already provides stays with b2.
            let map = qemu_img(&["map", "--output=json", s(&img)]);
            assert!(map.contains("\"start\": 0, \"length\": 1048576, \"depth\": 1"), "{map}");
        }
    }
    // -u rewrites the name only; a non-empty -b without -F is refused.
    let img = p(d.path(), "unsafe.qcow2");
    std::fs::copy(&top, &img).unwrap();
    let (code, _, err) = vdisk(&["rebase", "-b", "b2.qcow2", s(&img)]);
    assert_eq!(code, 1);
    assert!(err.contains("backing format must be specified"), "{err}");
    let (code, o, e) = vdisk(&["rebase", "-u", "-F", "qcow2", "-b", "b2.qcow2", s(&img)]);
    assert_eq!(code, 0, "{o}{e}");
    assert!(qemu_img(&["info", s(&img)]).contains("backing file: b2.qcow2"));
    assert_qemu_clean(&img, "qcow2");
}

const SIZE: u64 = 1 << 20;

fn raw_dev(bytes: Vec<u8>) -> Arc<dyn BlockDevice> {
    Arc::new(Raw::open(Arc::new(MemStorage::from_vec(bytes))).unwrap())
}

/// Reads the whole device.
fn all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut b = vec![0u8; dev.size() as usize];
    dev.read_at(&mut b, 0).unwrap();
    b
}

#[test]
fn a_crash_at_any_write_of_a_rebase_keeps_the_guest_view() {
    let base1: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8 | 1).collect();
    let mut base2 = base1.clone();
    base2[200_000..400_000].fill(7);
    base2[700_000..].fill(0);
    let mut o = CreateOptions::new(SIZE);
    o.cluster_size = 4096;
    o.backing_file = Some("base1".into());
    o.backing_format = Some("raw".into());
    let st = Arc::new(MemStorage::new());
    let q = Qcow2::create(st.clone(), &o, Qcow2Options { backing: Some(raw_dev(base1.clone())), ..Default::default() })
        .unwrap();
    q.write_at(&[0x55; 10_000], 300_000).unwrap();
    q.write_zeroes(800_000, 8192, ZeroMode::MayUnmap).unwrap();
    let want = all(&q);
    q.close().unwrap();
    let image = st.to_vec();
    let mut crashes = 0;
    for budget in 0..400 {
        let f = Arc::new(FaultyStorage::new(image.clone(), Some(budget), FaultMode::PowerLoss));
        let q = Qcow2::open(f.clone(), Qcow2Options { backing: Some(raw_dev(base1.clone())), ..Default::default() })
            .unwrap();
        let r = q.rebase(Some(&*raw_dev(base2.clone())), Some("base2"), Some("raw"));
        if r.is_ok() && !f.has_failed() {
            break;
        }
        crashes += 1;
        for survivors in [Survivors::None, Survivors::All] {
            let bytes = f.crashed_image(survivors);
            let h = Qcow2::read_header(&MemStorage::from_vec(bytes.clone())).unwrap();
            let backing = match h.backing_file.as_deref() {
                Some("base1") => base1.clone(),
                Some("base2") => base2.clone(),
                other => panic!("budget {budget}: backing file {other:?}"),
            };
            let q = Qcow2::open(
                Arc::new(MemStorage::from_vec(bytes)),
                Qcow2Options { backing: Some(raw_dev(backing)), read_only: true, ..Default::default() },
            )
            .unwrap();
            assert!(all(&q) == want, "budget {budget} ({survivors:?}): the guest view changed");
        }
    }
    assert!(crashes > 5, "the rebase wrote too little to test ({crashes} crash points)");
}
