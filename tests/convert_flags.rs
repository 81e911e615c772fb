//! `vdisk convert` with qemu-img convert's target flags: `-B`/`-F` (a
//! backing file for the new image), `-n` (write into an existing image,
//! which may hold anything), `--target-is-zero`.

mod common;

use common::*;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) {
    let (code, o, e) = vdisk(args);
    assert_eq!(code, 0, "vdisk {}: {o}{e}", args.join(" "));
}

fn same(a: &std::path::Path, fa: &str, b: &std::path::Path, fb: &str) {
    let (code, o, e) = run_status("qemu-img", &["compare", "-f", fa, "-F", fb, s(a), s(b)]);
    assert_eq!(code, 0, "{} vs {}: {o}{e}", a.display(), b.display());
}

#[test]
fn convert_target_flags() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let base = p(d.path(), "base.qcow2");
    let src = p(d.path(), "src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    run("qemu-io", &["-c", "write -P 0x11 0 8M", s(&base)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&src)]);
    run("qemu-io", &["-c", "write -z 0 1M", "-c", "write -P 0x22 2M 1M", s(&src)]);
    // -B / -F: as -o backing_file=,backing_fmt=.
    let out = p(d.path(), "b.qcow2");
    ok(&["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", s(&src), s(&out)]);
    same(&src, "qcow2", &out, "qcow2");
    assert!(qemu_img(&["info", s(&out)]).contains("backing file: base.qcow2"));
    assert_qemu_clean(&out, "qcow2");
    // -n: into an existing image full of other bytes, qcow2 and raw.
    for fmt in ["qcow2", "raw"] {
        let target = p(d.path(), &format!("existing.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, s(&target), "10M"]);
        run("qemu-io", &["-f", fmt, "-c", "write -P 0x77 0 10M", s(&target)]);
        ok(&["convert", "-n", "-O", fmt, s(&src), s(&target)]);
        // The first 8 MiB are the source's; the rest is untouched.
        let got = qemu_export(&target, fmt);
        let want = qemu_export(&src, "qcow2");
        assert_same(&format!("-n into {fmt}"), &got[..want.len()], &want);
        assert!(got[want.len()..].iter().all(|&b| b == 0x77), "{fmt}: the tail was changed");
        if fmt == "qcow2" {
            assert_qemu_clean(&target, "qcow2");
        }
    }
    // -n -c: compressed into an image full of other bytes; where the source
    // reads zeros the target must too.
    let target = p(d.path(), "existing-c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&target), "10M"]);
    run("qemu-io", &["-c", "write -P 0x77 0 10M", s(&target)]);
    ok(&["convert", "-n", "-c", "-O", "qcow2", s(&src), s(&target)]);
    let got = qemu_export(&target, "qcow2");
    let want = qemu_export(&src, "qcow2");
    assert_same("-n -c into qcow2", &got[..want.len()], &want);
    assert_qemu_clean(&target, "qcow2");
    // Refusals: -n into a smaller image, -F without -B, --target-is-zero without -n.
    let small = p(d.path(), "small.raw");
    std::fs::File::create(&small).unwrap().set_len(1 << 20).unwrap();
    for args in [
        vec!["convert", "-n", "-O", "raw", s(&src), s(&small)],
        vec!["convert", "-F", "qcow2", "-O", "qcow2", s(&src), "x.qcow2"],
        vec!["convert", "--target-is-zero", "-O", "qcow2", s(&src), "y.qcow2"],
    ] {
        let (code, _, _) = vdisk(&args);
        assert_eq!(code, 1, "{args:?}");
    }
    assert_eq!(std::fs::metadata(&small).unwrap().len(), 1 << 20);
}
