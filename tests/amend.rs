//! `vdisk amend` changes what qemu-img amend changes (compat upgrade and
//! downgrade, lazy refcounts, size, backing file name) and leaves images `qemu-img check`
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
    // Refusals: creation-only options, what vdisk cannot amend, no options.
    for (args, want) in [
        (vec!["-o", "cluster_size=4k"], "only supported for image creation"),
        (vec!["-o", "data_file_raw=on"], "not supported by vdisk yet"),
        (vec![], "must specify options"),
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

/// `qemu-img map --output=json` without host offsets (two tools may place
/// new clusters differently).
fn map_shape(img: &std::path::Path) -> String {
    let m = qemu_img(&["map", "--output=json", s(img)]);
    m.lines()
        .map(|l| match l.find(", \"offset\"") {
            Some(i) => format!("{}}}", &l[..i]),
            None => l.trim_end_matches(',').trim_end_matches(']').trim_end_matches('}').to_string() + "}",
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `amend -o compat=0.10` does what qemu-img's does: zero clusters become
/// unallocated (no backing file) or zeros as data (over a backing file),
/// dirty lazy refcounts are repaired and turned off, and the result is a
/// version 2 image qemu-img calls clean with the same content and map as
/// qemu-img's own downgrade of a copy. What qemu-img refuses is refused
/// with its messages, the file untouched.
#[test]
fn downgrade_as_qemu_img_does() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let ours = p(d.path(), "v.qcow2");
    let theirs = p(d.path(), "q.qcow2");
    // No backing file: data, an allocated zero cluster, an unallocated one,
    // lazy refcounts left dirty by a crash.
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", s(&ours), "16M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 256k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "write -z -u 1M 64k",
            "-c",
            "write -P 2 3M 64k",
            s(&ours),
        ],
    );
    let _ = std::process::Command::new("qemu-io").args(["-c", "write -P 5 5M 64k", "-c", "abort", s(&ours)]).output();
    std::fs::copy(&ours, &theirs).unwrap();
    qemu_img(&["amend", "-o", "compat=0.10", s(&theirs)]);
    ok(&["amend", "-o", "compat=0.10", s(&ours)]);
    let info = qemu_img(&["info", s(&ours)]);
    assert!(info.contains("compat: 0.10"), "{info}");
    assert_qemu_clean(&ours, "qcow2");
    qemu_img(&["compare", "-q", s(&theirs), s(&ours)]);
    assert_eq!(map_shape(&ours), map_shape(&theirs));
    // Over a backing file: zero clusters become zeros as data.
    let base = p(d.path(), "base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "16M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 9 0 16M", s(&base)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "raw", s(&ours), "16M"]);
    run("qemu-io", &["-c", "write -z 1M 64k", "-c", "write -z 4M 3M", "-c", "write -P 3 12M 64k", s(&ours)]);
    std::fs::copy(&ours, &theirs).unwrap();
    qemu_img(&["amend", "-o", "compat=0.10", s(&theirs)]);
    ok(&["amend", "-o", "compat=0.10", s(&ours)]);
    assert_qemu_clean(&ours, "qcow2");
    qemu_img(&["compare", "-q", s(&theirs), s(&ours)]);
    let out =
        run("qemu-io", &["-r", "-c", "read -P 0 1M 64k", "-c", "read -P 0 4M 3M", "-c", "read -P 9 0 1M", s(&ours)]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(map_shape(&ours), map_shape(&theirs));
    // Already 0.10: nothing to do.
    let before = std::fs::read(&ours).unwrap();
    ok(&["amend", "-o", "compat=0.10", s(&ours)]);
    assert_eq!(std::fs::read(&ours).unwrap(), before);

    // Refusals, with qemu-img's messages where it has them.
    type Prepare = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, Prepare, &str)> = vec![
        ("refcount_bits=8", Box::new(|_| {}), "compat=0.10 requires refcount_bits=16"),
        ("extended_l2=on", Box::new(|_| {}), "incompatible features 0x10 set"),
        ("data_file=DATA", Box::new(|_| {}), "Cannot downgrade an image with a data file"),
        (
            "compression_type=zstd",
            Box::new(|i| {
                run("qemu-io", &["-c", "write -c -P 3 0 64k", s(i)]);
            }),
            "zstd compression type and existing compressed clusters",
        ),
        (
            "compat=1.1",
            Box::new(|i| {
                qemu_img(&["bitmap", "--add", s(i), "b0"]);
            }),
            "persistent bitmaps (b0)",
        ),
        (
            "compat=1.1",
            Box::new(|i| {
                run("qemu-io", &["-c", "write -z 0 64k", s(i)]);
                qemu_img(&["snapshot", "-c", "s1", s(i)]);
            }),
            "snapshot 's1' holds zero clusters",
        ),
    ];
    for (opts, prepare, want) in cases {
        let img = p(d.path(), "r.qcow2");
        let _ = std::fs::remove_file(&img);
        let opts = opts.replace("DATA", s(&p(d.path(), "r.data")));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "4M"]);
        prepare(&img);
        let before = std::fs::read(&img).unwrap();
        let (code, _, err) = vdisk(&["amend", "-o", "compat=0.10", s(&img)]);
        assert_eq!(code, 1, "{opts}: {err}");
        assert!(err.contains(want), "{opts}: {err}");
        assert_eq!(std::fs::read(&img).unwrap(), before, "{opts}: the file changed");
    }
}

/// zstd without compressed clusters becomes zlib at a downgrade, and a
/// compressed write later in the same session uses zlib (qemu reads it).
#[test]
fn downgrade_from_zstd_compresses_with_zlib_afterwards() {
    use vdisk::BlockDevice;
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let img = p(d.path(), "z.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", s(&img), "4M"]);
    let q = vdisk::OpenOptions::new().format(vdisk::Format::Qcow2).open(&img).unwrap();
    let vdisk::Image::Qcow2(q) = q else { panic!("qcow2") };
    q.set_compat("0.10").unwrap();
    q.write_compressed(&[7u8; 65536], 0).unwrap();
    q.close().unwrap();
    let info = qemu_img(&["info", s(&img)]);
    assert!(info.contains("compat: 0.10") && info.contains("compression type: zlib"), "{info}");
    assert_qemu_clean(&img, "qcow2");
    let out = run("qemu-io", &["-r", "-c", "read -P 7 0 64k", s(&img)]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// A downgrade cut by power loss at every write (all, none or some of the
/// unsynced writes kept) leaves an image, version 2 or 3, that reads the
/// same as before, has no corruption (vdisk and qemu-img check; leaks
/// allowed), and downgrades when run again.
#[test]
fn downgrade_survives_a_crash_at_every_write() {
    use std::sync::Arc;
    use vdisk::qcow2::check::Repair;
    use vdisk::qcow2::create::CreateOptions;
    use vdisk::{BlockDevice, FaultMode, FaultyStorage, MemStorage, Qcow2, Qcow2Options, Survivors, ZeroMode};
    if !have_qemu() {
        return;
    }
    let size = 2u64 << 20;
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(size);
    o.cluster_size = 4096;
    o.lazy_refcounts = true;
    let q = Qcow2::create(st.clone(), &o, Qcow2Options::default()).unwrap();
    q.write_at(&pattern(3, 256 << 10), 0).unwrap();
    q.write_zeroes(16 << 10, 32 << 10, ZeroMode::Allocate).unwrap();
    q.write_zeroes(64 << 10, 16 << 10, ZeroMode::MayUnmap).unwrap();
    q.write_zeroes(1 << 20, 64 << 10, ZeroMode::MayUnmap).unwrap();
    let want = read_all(&q);
    q.close().unwrap();
    let image = st.to_vec();
    let run = |budget: Option<u64>| {
        let f = Arc::new(FaultyStorage::new(image.clone(), budget, FaultMode::PowerLoss));
        if let Ok(q) = Qcow2::open(f.clone(), Qcow2Options::default()) {
            let r = q.set_compat("0.10").and_then(|_| q.close());
            if budget.is_none() {
                r.unwrap();
            }
        }
        f
    };
    let total = run(None).ops();
    assert!(total > 10, "{total} writes");
    let d = tmp();
    let img = p(d.path(), "crash.qcow2");
    for n in 1..=total {
        let f = run(Some(n));
        for (sv, name) in [(Survivors::All, "all"), (Survivors::None, "none"), (Survivors::Some(n * 7919), "some")] {
            let what = format!("cut {n}/{total} ({name})");
            let bytes = f.crashed_image(sv);
            let m = Arc::new(MemStorage::from_vec(bytes));
            let q = Qcow2::open(m.clone(), Qcow2Options::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let rep = q.check(Repair::None).unwrap();
            assert_eq!(rep.corruptions, 0, "{what}: {:?}", rep.messages);
            assert!(read_all(&q) == want, "{what}: content changed");
            q.set_compat("0.10").unwrap_or_else(|e| panic!("{what}: downgrade again: {e}"));
            q.close().unwrap();
            std::fs::write(&img, m.to_vec()).unwrap();
            let (code, out) = qemu_check(&img, "qcow2");
            assert!(code == 0 || code == 3, "{what}: qemu-img check exit {code}\n{out}");
            assert!(qemu_img(&["info", s(&img)]).contains("compat: 0.10"), "{what}");
        }
    }
}
