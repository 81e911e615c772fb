//! `vdisk amend` changes what qemu-img amend changes (compat upgrade, lazy
//! refcounts, size, backing file name) and leaves images `qemu-img check`
//! calls clean, with their data intact; what it cannot change it refuses by
//! name.

mod common;

use common::*;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) {
    let (code, o, e) = vdisk(args);
    assert_eq!(code, 0, "vdisk {}: {o}{e}", args.join(" "));
}

#[test]
fn amend_as_qemu_img_does() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let img = p(d.path(), "am.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", s(&img), "4M"]);
    run("qemu-io", &["-c", "write -P 3 0 1M", s(&img)]);
    ok(&["amend", "-o", "compat=1.1,lazy_refcounts=on", s(&img)]);
    let info = qemu_img(&["info", s(&img)]);
    assert!(info.contains("compat: 1.1") && info.contains("lazy refcounts: true"), "{info}");
    assert_qemu_clean(&img, "qcow2");
    // Lazy writes, then lazy refcounts off: refcounts written, bit cleared.
    ok(&["io", "-c", "write -P 4 2M 64k", s(&img)]);
    ok(&["amend", "-o", "lazy_refcounts=off", s(&img)]);
    assert!(qemu_img(&["info", s(&img)]).contains("lazy refcounts: false"));
    assert_qemu_clean(&img, "qcow2");
    ok(&["amend", "-o", "size=8M", s(&img)]);
    assert!(qemu_img(&["info", s(&img)]).contains("virtual size: 8 MiB"));
    let out =
        run("qemu-io", &["-r", "-c", "read -P 3 0 1M", "-c", "read -P 4 2M 64k", "-c", "read -P 0 4M 4M", s(&img)]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The backing file name only, as qemu-img amend does.
    ok(&["amend", "-o", "backing_file=elsewhere.qcow2,backing_fmt=qcow2", s(&img)]);
    let h = vdisk::Qcow2::read_header(&vdisk::FileStorage::open(&img, true).unwrap()).unwrap();
    let info = format!("backing file: {}", h.backing_file.unwrap_or_default());
    assert!(info.contains("backing file: elsewhere.qcow2"), "{info}");
    ok(&["amend", "-o", "backing_file=", s(&img)]);
    assert!(!qemu_img(&["info", s(&img)]).contains("backing file"));
    assert_qemu_clean(&img, "qcow2");
    // Refusals: creation-only options, what vdisk cannot amend, no options,
    // a downgrade.
    for (args, want) in [
        (vec!["-o", "cluster_size=4k"], "only supported for image creation"),
        (vec!["-o", "data_file_raw=on"], "not supported by vdisk yet"),
        (vec![], "must specify options"),
        (vec!["-o", "compat=0.10"], "downgrading"),
    ] {
        let mut a = vec!["amend"];
        a.extend(args);
        a.push(s(&img));
        let (code, _, err) = vdisk(&a);
        assert_eq!(code, 1, "{a:?}");
        assert!(err.contains(want), "{a:?}: {err}");
    }
    assert_qemu_clean(&img, "qcow2");
}

/// `amend -o refcount_bits=N` recounts into the new width (the image stays
/// clean and reads the same, bitmaps kept); a width too narrow for what
/// snapshots share is refused with the image untouched. `data_file=`
/// renames the external data file.
#[test]
fn refcount_bits_and_data_file_amend_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let img = p(d.path(), "r.qcow2");
    let reference = p(d.path(), "ref.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    run("qemu-io", &["-c", "write -P 7 0 3M", "-c", "write -P 8 8M 64k", s(&img)]);
    qemu_img(&["bitmap", "--add", s(&img), "bm"]);
    std::fs::copy(&img, &reference).unwrap();
    for bits in ["1", "2", "8", "64", "16"] {
        let (code, out, err) = vdisk(&["amend", "-o", &format!("refcount_bits={bits}"), s(&img)]);
        assert_eq!(code, 0, "{out}{err}");
        assert_qemu_clean(&img, "qcow2");
        assert!(qemu_img(&["info", s(&img)]).contains(&format!("refcount bits: {bits}")));
        qemu_img(&["compare", "-q", s(&reference), s(&img)]);
    }
    assert!(qemu_img(&["info", s(&img)]).contains("name: bm"));
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    let before = std::fs::read(&img).unwrap();
    let (code, _, err) = vdisk(&["amend", "-o", "refcount_bits=1", s(&img)]);
    assert_eq!(code, 1);
    assert!(err.contains("referenced 2 times"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let old = p(d.path(), "old.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", s(&old), "1M"]);
    assert_eq!(vdisk(&["amend", "-o", "refcount_bits=64", s(&old)]).0, 1);
    // data_file renames; an image without one refuses.
    let df = p(d.path(), "df.qcow2");
    let (raw1, raw2) = (p(d.path(), "df.raw"), p(d.path(), "df2.raw"));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={}", s(&raw1)), s(&df), "1M"]);
    std::fs::copy(&raw1, &raw2).unwrap();
    let (code, _, err) = vdisk(&["amend", "-o", &format!("data_file={}", s(&raw2)), s(&df)]);
    assert_eq!(code, 0, "{err}");
    assert!(qemu_img(&["info", s(&df)]).contains(&format!("data file: {}", s(&raw2))));
    assert_eq!(vdisk(&["amend", "-o", "data_file=x.raw", s(&reference)]).0, 1);
}
