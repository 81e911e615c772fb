//! `vdisk measure` prints what `qemu-img measure` prints, for sizes and for
//! source images, human and JSON, over cluster sizes, refcount widths,
//! extended L2, compat and preallocation.

mod common;

use common::*;

fn both(args: &[&str]) -> (String, String) {
    let (code, ours, err) = vdisk(&[&["measure"], args].concat());
    assert_eq!(code, 0, "vdisk measure {}: {err}", args.join(" "));
    let (qcode, theirs, qerr) = run_status("qemu-img", &[&["measure"], args].concat());
    assert_eq!(qcode, 0, "qemu-img measure {}: {qerr}", args.join(" "));
    (ours, theirs)
}

#[test]
fn measure_agrees_with_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let src = p(d.path(), "src.qcow2");
    let s = src.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s, "3G"]);
    run("qemu-io", &["-c", "write 0 100M", "-c", "write 1G 300k", "-c", "write -z 2G 64M", "-c", "write 3071M 1M", s]);
    let raw = p(d.path(), "src.raw");
    let r = raw.to_str().unwrap();
    std::fs::File::create(&raw).unwrap().set_len((5 << 20) + 777).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write 1M 1M", r]);
    let mut cases: Vec<Vec<&str>> = Vec::new();
    for o in [
        "cluster_size=65536",
        "cluster_size=512",
        "cluster_size=2M,refcount_bits=1",
        "refcount_bits=64,extended_l2=on",
        "compat=0.10",
        "preallocation=metadata",
        "preallocation=falloc",
    ] {
        cases.push(vec!["-O", "qcow2", "-o", o, "--size", "10G"]);
        cases.push(vec!["-O", "qcow2", "-o", o, "--size", "1234567"]);
        cases.push(vec!["-O", "qcow2", "-o", o, s]);
        cases.push(vec!["-O", "qcow2", "-o", o, "-f", "raw", r]);
    }
    cases.push(vec!["-O", "qcow2", "-o", "backing_file=x.qcow2,backing_fmt=qcow2", s]);
    cases.push(vec!["--output=json", "-O", "qcow2", s]);
    cases.push(vec!["--output=json", "-O", "qcow2", "--size", "1T"]);
    cases.push(vec!["-O", "raw", s]);
    cases.push(vec!["-O", "raw", "-f", "raw", r]);
    cases.push(vec!["--size", "1000"]);
    for c in cases {
        let (ours, theirs) = both(&c);
        assert_eq!(ours, theirs, "measure {}", c.join(" "));
    }
    // What qemu-img refuses, vdisk refuses.
    let (code, _, err) = vdisk(&["measure", "-O", "qcow2"]);
    assert_eq!(code, 1);
    assert!(err.contains("--size"), "{err}");
    let (code, _, _) = vdisk(&["measure", "-O", "vmdk", "--size", "1G"]);
    assert_eq!(code, 1);
}
