//! `vdisk commit` does what `qemu-img commit` does: the backing file gets
//! the image's data (grown if smaller), the image is emptied unless `-d`,
//! and the guest sees the same bytes through either.

mod common;

use common::*;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn chain(d: &std::path::Path, tag: &str, base_fmt: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = p(d, &format!("{tag}-base.{base_fmt}"));
    let top = p(d, &format!("{tag}-top.qcow2"));
    qemu_img(&["create", "-q", "-f", base_fmt, s(&base), "4M"]);
    run("qemu-io", &["-f", base_fmt, "-c", "write -P 1 0 4M", s(&base)]);
    let name = base.file_name().unwrap().to_str().unwrap().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &name, "-F", base_fmt, s(&top), "8M"]);
    run("qemu-io", &["-c", "write -P 9 1M 64k", "-c", "write -z 2M 64k", "-c", "write -P 8 6M 100k", s(&top)]);
    (base, top)
}

#[test]
fn commit_agrees_with_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    for base_fmt in ["qcow2", "raw"] {
        let (qbase, qtop) = chain(d.path(), &format!("q{base_fmt}"), base_fmt);
        let (vbase, vtop) = chain(d.path(), &format!("v{base_fmt}"), base_fmt);
        let reference = p(d.path(), &format!("ref-{base_fmt}.raw"));
        qemu_img(&["convert", "-O", "raw", s(&vtop), s(&reference)]);
        qemu_img(&["commit", "-q", s(&qtop)]);
        let (code, out, err) = vdisk(&["commit", s(&vtop)]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out, "Image committed.\n");
        // The backing files hold the same bytes, and the tops read the same.
        let cmp = |a: &std::path::Path, fa: &str, b: &std::path::Path, fb: &str| {
            let (code, o, e) = run_status("qemu-img", &["compare", "-f", fa, "-F", fb, s(a), s(b)]);
            assert_eq!(code, 0, "{} vs {}: {o}{e}", a.display(), b.display());
        };
        cmp(&qbase, base_fmt, &vbase, base_fmt);
        cmp(&reference, "raw", &vbase, base_fmt);
        cmp(&reference, "raw", &vtop, "qcow2");
        assert_qemu_clean(&vtop, "qcow2");
        if base_fmt == "qcow2" {
            assert_qemu_clean(&vbase, "qcow2");
        }
        // Emptied: nothing is left in the image itself.
        let map = qemu_img(&["map", "--output=json", s(&vtop)]);
        assert!(!map.contains("\"depth\": 0"), "{map}");
    }
    // -d keeps the data in the image.
    let (_, top) = chain(d.path(), "keep", "qcow2");
    let (code, o, e) = vdisk(&["commit", "-d", "-q", s(&top)]);
    assert_eq!(code, 0, "{o}{e}");
    assert!(o.is_empty());
    assert!(qemu_img(&["map", "--output=json", s(&top)]).contains("\"depth\": 0"));
    // An image without a backing file is refused.
    let lone = p(d.path(), "lone.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&lone), "1M"]);
    let (code, _, err) = vdisk(&["commit", s(&lone)]);
    assert_eq!(code, 1);
    assert!(err.contains("does not have a backing file"), "{err}");
}
