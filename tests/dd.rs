//! `vdisk dd` makes what `qemu-img dd` makes: same sizes, same bytes.

mod common;

use common::*;

#[test]
fn dd_agrees_with_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let src = p(d.path(), "src.qcow2");
    let s = src.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s, "24M"]);
    run("qemu-io", &["-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 5M", "-c", "write -P 0x33 23M 1M", s]);
    for (i, ops) in [
        vec!["bs=64k", "count=10", "skip=2"],
        vec!["bs=1M", "skip=5"],
        vec!["bs=3", "count=1"],
        vec![],
        vec!["bs=1M", "count=100"],
    ]
    .iter()
    .enumerate()
    {
        for fmt in ["raw", "qcow2"] {
            let ours = p(d.path(), &format!("ours{i}.{fmt}"));
            let theirs = p(d.path(), &format!("theirs{i}.{fmt}"));
            let mut args = vec!["dd".to_string(), "-f".into(), "qcow2".into(), "-O".into(), fmt.into()];
            args.extend(ops.iter().map(|o| o.to_string()));
            args.push(format!("if={s}"));
            let mut a = args.clone();
            a.push(format!("of={}", ours.display()));
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let (code, o, e) = vdisk(&a);
            assert_eq!(code, 0, "{a:?}: {o}{e}");
            let mut q = args.clone();
            q.push(format!("of={}", theirs.display()));
            let q: Vec<&str> = q.iter().map(String::as_str).collect();
            run("qemu-img", &q);
            let (code, o, e) = run_status(
                "qemu-img",
                &["compare", "-s", "-f", fmt, "-F", fmt, ours.to_str().unwrap(), theirs.to_str().unwrap()],
            );
            assert_eq!(code, 0, "{ops:?} {fmt}: {o}{e}");
            if fmt == "qcow2" {
                assert_qemu_clean(&ours, "qcow2");
            }
        }
    }
    // Refused as qemu-img refuses: a skip past the end (and nothing left behind).
    let out = p(d.path(), "none.raw");
    let (code, _, err) = vdisk(&["dd", "skip=99999999", &format!("if={s}"), &format!("of={}", out.display())]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot skip"), "{err}");
    assert!(!out.exists());
}
