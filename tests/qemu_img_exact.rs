//! The verbs vdisk shares with qemu-img print what qemu-img prints and
//! take the flags and long option names qemu-img 10 takes: `info` (child
//! nodes, vmdk extents, compat 0.10), `map` (zero offsets, empty ranges),
//! `check --output=json` and its exit code for formats without checks,
//! sizes in qemu's grammar, `snapshot -l` of other formats, and the flags
//! of convert, commit, rebase, resize, create, compare and bench.

mod common;

use std::path::Path;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn in_dir(dir: &Path, cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(cmd).args(args).current_dir(dir).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn sorted_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn info_map_check_and_snapshot_print_what_qemu_img_prints() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let dir = d.path();
    let q = |args: &[&str]| {
        let (c, _, e) = in_dir(dir, "qemu-img", args);
        assert_eq!(c, 0, "qemu-img {args:?}: {e}");
    };
    q(&["create", "-q", "-f", "qcow2", "m.qcow2", "4M"]);
    in_dir(dir, "qemu-io", &["-c", "write 0 4k", "-c", "write 1M 64k", "m.qcow2"]);
    q(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "old.qcow2", "1M"]);
    q(&["create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "ov.qcow2"]);
    q(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    in_dir(dir, "qemu-io", &["-f", "raw", "-c", "write 0 64k", "r.raw"]);
    std::fs::create_dir(dir.join("sub")).unwrap();
    for sf in ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat", "streamOptimized"] {
        q(&["create", "-q", "-f", "vmdk", "-o", &format!("subformat={sf}"), &format!("sub/{sf}.vmdk"), "1M"]);
    }
    std::fs::write(dir.join("six.raw"), b"abcdef").unwrap();
    let bin = vdisk_bin();
    let v = |args: &[&str]| in_dir(dir, s(&bin), args);
    let images = [
        "m.qcow2",
        "old.qcow2",
        "ov.qcow2",
        "r.raw",
        "six.raw",
        "sub/monolithicSparse.vmdk",
        "sub/twoGbMaxExtentSparse.vmdk",
        "sub/monolithicFlat.vmdk",
        "sub/streamOptimized.vmdk",
    ];
    for img in images {
        let (_, qh, _) = in_dir(dir, "qemu-img", &["info", img]);
        let (code, vh, e) = v(&["info", img]);
        assert_eq!(code, 0, "{e}");
        assert_eq!(vh, qh, "info {img}");
        let (_, qj, _) = in_dir(dir, "qemu-img", &["info", "--output=json", img]);
        let (_, vj, _) = v(&["info", "--output=json", img]);
        assert_eq!(sorted_json(&vj), sorted_json(&qj), "info --output=json {img}");
        // (A flat vmdk extent's holes and file name are not split out in
        // vdisk's map: see the README's differences.)
        if !img.contains("Flat") {
            let (_, qm, _) = in_dir(dir, "qemu-img", &["map", img]);
            let (_, vm, _) = v(&["map", img]);
            assert_eq!(vm, qm, "map {img}");
        }
        let (qc, qo, _) = in_dir(dir, "qemu-img", &["check", "--output=json", img]);
        let (vc, vo, _) = v(&["check", "--output=json", img]);
        assert_eq!(vc, qc, "check exit code {img}");
        if qc == 0 {
            assert_eq!(sorted_json(&vo), sorted_json(&qo), "check --output=json {img}");
        }
        let (qc, qo, _) = in_dir(dir, "qemu-img", &["snapshot", "-l", img]);
        let (vc, vo, _) = v(&["snapshot", "-l", img]);
        assert_eq!((vc, vo), (qc, qo), "snapshot -l {img}");
    }
    let (_, qh, _) = in_dir(dir, "qemu-img", &["info", "--backing-chain", "ov.qcow2"]);
    let (_, vh, _) = v(&["info", "-b", "ov.qcow2"]);
    assert_eq!(vh, qh);
    for start in ["4M", "5M"] {
        let (_, qm, _) = in_dir(dir, "qemu-img", &["map", "--output=json", "--start-offset", start, "m.qcow2"]);
        let (_, vm, _) = v(&["map", "--output=json", "--start-offset", start, "m.qcow2"]);
        assert_eq!(vm, qm, "--start-offset {start}");
    }
    // Sizes: qemu's grammar, and whole sectors.
    for size in ["1b", "0x100", "100", "10MB", "8GiB", "1.5M", "1e3", "1.0000001k"] {
        let name = format!("size-{size}.raw");
        let (qc, _, _) = in_dir(dir, "qemu-img", &["create", "-q", "-f", "raw", &format!("q{name}"), size]);
        let (vc, _, _) = v(&["create", "-q", "-f", "raw", &format!("v{name}"), size]);
        assert_eq!(vc, qc, "create size {size}");
        if qc == 0 {
            let len = |p: String| std::fs::metadata(dir.join(p)).unwrap().len();
            assert_eq!(len(format!("v{name}")), len(format!("q{name}")), "{size}");
        }
    }
    // bench prints qemu-img's two lines.
    let (code, out, _) = v(&["bench", "-c", "100", "-d", "2", "-n", "-i", "threads", "m.qcow2"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.starts_with("Sending 100 read requests, 4096 bytes each, 2 in parallel"));
    assert_eq!(v(&["bench", "-i", "io_uring", "m.qcow2"]).0, 1);
    // convert -m as qemu-img bounds it.
    assert_eq!(v(&["convert", "-m", "100", "-O", "raw", "r.raw", "x.raw"]).0, 1);
    assert_eq!(v(&["convert", "--parallel", "4", "-O", "raw", "r.raw", "x.raw"]).0, 0);
}

#[test]
fn commit_rebase_resize_create_and_compare_flags_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let dir = d.path();
    let bin = vdisk_bin();
    let run_in = |cmd: &str, args: &[&str]| {
        let (c, o, e) = in_dir(dir, cmd, args);
        assert_eq!(c, 0, "{cmd} {args:?}: {o}{e}");
        o
    };
    // commit -b BASE two levels down: everything above BASE lands in it,
    // nothing is emptied, links unchanged.
    for t in ["q", "v"] {
        run_in("qemu-img", &["create", "-q", "-f", "qcow2", &format!("{t}-base.qcow2"), "4M"]);
        run_in(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &format!("{t}-base.qcow2"),
                "-F",
                "qcow2",
                &format!("{t}-mid.qcow2"),
            ],
        );
        run_in(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &format!("{t}-mid.qcow2"),
                "-F",
                "qcow2",
                &format!("{t}-top.qcow2"),
                "8M",
            ],
        );
        run_in("qemu-io", &["-c", "write -P 1 0 64k", "-c", "write -z 2M 64k", &format!("{t}-mid.qcow2")]);
        run_in("qemu-io", &["-c", "write -P 2 1M 64k", "-c", "write -P 3 32k 4k", &format!("{t}-top.qcow2")]);
    }
    run_in("qemu-img", &["commit", "-q", "-b", "q-base.qcow2", "q-top.qcow2"]);
    run_in(s(&bin), &["commit", "-q", "--rate", "64M", "--cache", "none", "--base", "v-base.qcow2", "v-top.qcow2"]);
    for l in ["base", "mid", "top"] {
        run_in("qemu-img", &["compare", "-q", &format!("q-{l}.qcow2"), &format!("v-{l}.qcow2")]);
        assert_qemu_clean(&dir.join(format!("v-{l}.qcow2")), "qcow2");
    }
    let (code, _, err) = in_dir(dir, s(&bin), &["commit", "-b", "m.qcow2", "v-top.qcow2"]);
    assert_eq!(code, 1, "{err}");
    // rebase -c onto nothing: copied clusters compressed, as qemu-img does.
    for t in ["q", "v"] {
        run_in("qemu-img", &["create", "-q", "-f", "qcow2", &format!("{t}-rb.qcow2"), "4M"]);
        run_in("qemu-io", &["-c", "write -P 5 0 1M", &format!("{t}-rb.qcow2")]);
        run_in(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", &format!("{t}-rb.qcow2"), "-F", "qcow2", &format!("{t}-rt.qcow2")],
        );
        run_in("qemu-io", &["-c", "write -P 6 2M 64k", &format!("{t}-rt.qcow2")]);
    }
    run_in("qemu-img", &["rebase", "-c", "-b", "", "q-rt.qcow2"]);
    run_in(s(&bin), &["rebase", "--compress", "-t", "writeback", "-T", "none", "--backing", "", "v-rt.qcow2"]);
    run_in("qemu-img", &["compare", "-q", "q-rt.qcow2", "v-rt.qcow2"]);
    assert_eq!(
        run_in("qemu-img", &["map", "--output=json", "v-rt.qcow2"]).replace("v-rt", ""),
        run_in("qemu-img", &["map", "--output=json", "q-rt.qcow2"]).replace("q-rt", "")
    );
    assert_qemu_clean(&dir.join("v-rt.qcow2"), "qcow2");
    // resize --preallocation.
    for t in ["q", "v"] {
        run_in("qemu-img", &["create", "-q", "-f", "qcow2", &format!("{t}-rs.qcow2"), "1M"]);
        run_in("qemu-img", &["create", "-q", "-f", "raw", &format!("{t}-rs.raw"), "1M"]);
    }
    run_in("qemu-img", &["resize", "-q", "--preallocation=full", "q-rs.qcow2", "4M"]);
    run_in(s(&bin), &["resize", "-q", "--preallocation=full", "v-rs.qcow2", "4M"]);
    assert_eq!(
        run_in("qemu-img", &["map", "--output=json", "v-rs.qcow2"]),
        run_in("qemu-img", &["map", "--output=json", "q-rs.qcow2"])
    );
    run_in("qemu-img", &["resize", "-q", "-f", "raw", "--preallocation=falloc", "q-rs.raw", "4M"]);
    run_in(s(&bin), &["resize", "-q", "-f", "raw", "--preallocation=falloc", "v-rs.raw", "4M"]);
    let blocks = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.join(p)).unwrap().blocks()
    };
    assert_eq!(blocks("v-rs.raw"), blocks("q-rs.raw"));
    assert_eq!(in_dir(dir, s(&bin), &["resize", "--preallocation=metadata", "v-rs.qcow2", "8M"]).0, 1);
    // create -u: the backing file is not opened.
    run_in(s(&bin), &["create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "u.qcow2", "1M"]);
    assert!(run_in("qemu-img", &["info", "-U", "u.qcow2"]).contains("backing file: missing.qcow2"));
    assert_eq!(
        in_dir(dir, s(&bin), &["create", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "u2.qcow2"]).0,
        1
    );
    // compare -q says nothing; the exit code does.
    let (code, out, _) = in_dir(dir, s(&bin), &["compare", "-q", "-T", "none", "q-rt.qcow2", "v-rt.qcow2"]);
    assert_eq!((code, out.as_str()), (0, ""));
    let (code, out, _) = in_dir(dir, s(&bin), &["compare", "--quiet", "q-rt.qcow2", "q-rs.qcow2"]);
    assert_eq!((code, out.as_str()), (1, ""));
    // convert's qemu-img flags: caches, rate, -W; -C refused.
    run_in(
        s(&bin),
        &["convert", "-T", "none", "-t", "none", "-r", "64M", "-W", "-O", "qcow2", "q-rt.qcow2", "c.qcow2"],
    );
    run_in("qemu-img", &["compare", "-q", "q-rt.qcow2", "c.qcow2"]);
    assert_qemu_clean(&dir.join("c.qcow2"), "qcow2");
    run_in(s(&bin), &["convert", "--salvage", "--target-format", "raw", "q-rt.qcow2", "c.raw"]);
    run_in("qemu-img", &["compare", "-q", "q-rt.qcow2", "c.raw"]);
    assert_eq!(in_dir(dir, s(&bin), &["convert", "-C", "-O", "raw", "q-rt.qcow2", "d.raw"]).0, 1);
    assert!(!dir.join("d.raw").exists());
    assert_eq!(in_dir(dir, s(&bin), &["convert", "-t", "bogus", "-O", "raw", "q-rt.qcow2", "d.raw"]).0, 1);
    // --target-image-opts: into an existing image named by options.
    run_in("qemu-img", &["create", "-q", "-f", "qcow2", "t.qcow2", "4M"]);
    run_in(s(&bin), &["convert", "-n", "--target-image-opts", "q-rt.qcow2", "driver=qcow2,file.filename=t.qcow2"]);
    run_in("qemu-img", &["compare", "-q", "q-rt.qcow2", "t.qcow2"]);
    assert_eq!(in_dir(dir, s(&bin), &["convert", "--target-image-opts", "q-rt.qcow2", "x"]).0, 2);
    // check -T and long names.
    run_in(s(&bin), &["check", "-T", "none", "--format", "qcow2", "--quiet", "c.qcow2"]);
}
