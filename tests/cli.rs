//! The `vdisk` command line as a user drives it: create, io, info, map,
//! check, resize, convert, compare, snapshot; qemu-img's flags, size
//! suffixes, exit codes, and one-line errors.

mod common;

use common::*;

fn ok(args: &[&str]) -> String {
    let (code, out, err) = vdisk(args);
    assert_eq!(code, 0, "vdisk {} failed ({code}):\n{out}{err}", args.join(" "));
    out
}

#[test]
fn a_newcomers_session() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "disk.qcow2");
    let i = img.to_str().unwrap();
    let out = ok(&["create", "-f", "qcow2", "-o", "cluster_size=64k,lazy_refcounts=on", i, "1G"]);
    assert!(out.starts_with("Formatting '"), "{out}");
    let out = ok(&[
        "io",
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "write -z 2M 1M",
        "-c",
        "read -P 0xab 1M 64k",
        "-c",
        "flush",
        i,
    ]);
    assert!(out.contains("wrote 65536/65536 bytes at offset 1048576"), "{out}");
    // qemu-io reads what vdisk wrote.
    let q = run("qemu-io", &["-c", "read -P 0xab 1M 64k", i]);
    assert!(!q.contains("fail"), "{q}");
    // check agrees with qemu-img check.
    let out = ok(&["check", i]);
    assert!(out.contains("No errors were found on the image."), "{out}");
    assert_qemu_clean(&img, "qcow2");
    // info, human and JSON.
    let out = ok(&["info", i]);
    assert!(out.contains("virtual size: 1 GiB (1073741824 bytes)") && out.contains("lazy refcounts: true"), "{out}");
    let out = ok(&["info", "--output=json", i]);
    assert!(out.contains("\"virtual-size\": 1073741824") && out.contains("\"format\": \"qcow2\""), "{out}");
    // Grow and shrink.
    ok(&["resize", i, "+1G"]);
    assert!(qemu_img(&["info", i]).contains("virtual size: 2 GiB"));
    let (code, _, err) = vdisk(&["resize", i, "512M"]);
    assert_eq!(code, 1);
    assert!(err.contains("--shrink") && err.lines().count() == 1, "{err}");
    ok(&["resize", "--shrink", i, "1G"]);
    assert_qemu_clean(&img, "qcow2");
}

#[test]
fn map_agrees_with_qemu_and_formats() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "m.qcow2");
    let i = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", i, "4M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 64k".into(), "write -z 128k 64k".into(), "write -c -P 2 1M 64k".into()]);
    let theirs = qemu_img(&["map", "--output=json", i]);
    let mine = ok(&["map", "--output=json", i]);
    assert_eq!(mine.trim(), theirs.trim());
    let human = ok(&["map", i]);
    assert!(human.starts_with("Offset          Length          Mapped to       File"), "{human}");
}

#[test]
fn backing_overlays_take_no_size() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let base = p(dir.path(), "base.qcow2");
    ok(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "3M"]);
    let ov = p(dir.path(), "ov.qcow2");
    ok(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", ov.to_str().unwrap()]);
    let info = qemu_img(&["info", "--output=json", ov.to_str().unwrap()]);
    assert!(
        info.contains("\"virtual-size\": 3145728") && info.contains("\"backing-filename-format\": \"qcow2\""),
        "{info}"
    );
    // Without a format the overlay is refused unless asked for.
    let ov2 = p(dir.path(), "ov2.qcow2");
    let (code, _, err) = vdisk(&["create", "-f", "qcow2", "-b", "base.qcow2", ov2.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("backing"), "{err}");
    ok(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "--allow-unknown-backing-format", ov2.to_str().unwrap()]);
    // info --backing-chain walks the chain.
    let out = ok(&["info", "--backing-chain", ov.to_str().unwrap()]);
    assert_eq!(out.matches("image: ").count(), 2, "{out}");
}

#[test]
fn convert_and_compare() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let raw = p(dir.path(), "src.raw");
    let mut data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i / 4096) as u8).collect();
    data[5 << 20..6 << 20].fill(0);
    std::fs::write(&raw, &data).unwrap();
    let r = raw.to_str().unwrap();
    for (name, args) in [
        ("plain.qcow2", vec!["-O", "qcow2"]),
        ("zlib.qcow2", vec!["-O", "qcow2", "-c"]),
        ("zstd.qcow2", vec!["-O", "qcow2", "-c", "-o", "compression_type=zstd,cluster_size=16k"]),
        ("v2.qcow2", vec!["-O", "qcow2", "-o", "compat=0.10"]),
        ("sparse.vmdk", vec!["-O", "vmdk"]),
        ("stream.vmdk", vec!["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    ] {
        let out = p(dir.path(), name);
        let mut a = vec!["convert", "-f", "raw"];
        a.extend(args.iter().copied());
        a.extend([r, out.to_str().unwrap()]);
        ok(&a);
        let fmt = if name.ends_with("vmdk") { "vmdk" } else { "qcow2" };
        let (code, o, e) = run_status("qemu-img", &["compare", "-f", "raw", "-F", fmt, r, out.to_str().unwrap()]);
        assert_eq!(code, 0, "{name}: {o}{e}");
        if fmt == "qcow2" {
            assert_qemu_clean(&out, "qcow2");
        }
        // vdisk compare agrees, and spots a difference.
        ok(&["compare", r, out.to_str().unwrap()]);
    }
    let z = p(dir.path(), "zlib.qcow2");
    let info = qemu_img(&["info", "--output=json", z.to_str().unwrap()]);
    let actual: u64 =
        info.split("\"actual-size\": ").nth(1).unwrap().split(',').next().unwrap().trim().parse().unwrap();
    assert!(actual < 2 << 20, "compressed output is {actual} bytes");
    let other = p(dir.path(), "other.raw");
    data[7 << 20] ^= 1;
    std::fs::write(&other, &data).unwrap();
    let (code, out, _) = vdisk(&["compare", r, other.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains(&format!("Content mismatch at offset {}!", 7 << 20)), "{out}");
    let (code, _, err) = vdisk(&["compare", r, "/nonexistent/x.qcow2"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn errors_are_one_clear_line() {
    let dir = tmp();
    let junk = p(dir.path(), "junk.qcow2");
    std::fs::write(&junk, b"QFI\xfb\0\0\0\x03 hostile").unwrap();
    for args in [
        vec!["info", "-f", "qcow2", junk.to_str().unwrap()],
        vec!["info", "/nonexistent/image.qcow2"],
        vec!["create", "-f", "qcow2", "-o", "cluster_size=3000", p(dir.path(), "x").to_str().unwrap(), "1M"],
        vec!["create", "-f", "qcow2", p(dir.path(), "y").to_str().unwrap(), "12Q"],
        vec!["io", "-c", "write 0 1k", "-f", "raw", junk.to_str().unwrap(), "-r"],
    ] {
        let (code, _, err) = vdisk(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.lines().count() == 1 && !err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn snapshot_cli() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "s.qcow2");
    let i = img.to_str().unwrap();
    ok(&["create", "-q", "-f", "qcow2", i, "16M"]);
    ok(&["io", "-c", "write -P 1 0 1M", i]);
    ok(&["snapshot", "-c", "clean install", i]);
    ok(&["io", "-c", "write -P 2 0 1M", i]);
    let list = ok(&["snapshot", "-l", i]);
    assert!(list.contains("clean install"), "{list}");
    assert!(qemu_img(&["snapshot", "-l", i]).contains("clean install"));
    ok(&["snapshot", "-a", "clean install", i]);
    let out = ok(&["io", "-r", "-c", "read -P 1 0 1M", i]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
    ok(&["snapshot", "-d", "clean install", i]);
    assert_qemu_clean(&img, "qcow2");
}

#[test]
fn bench_runs_qemu_img_bench_workloads() {
    let dir = tmp();
    let img = p(dir.path(), "b.qcow2");
    let i = img.to_str().unwrap();
    ok(&["create", "-q", "-f", "qcow2", i, "8M"]);
    let out = ok(&["bench", "-c", "500", "-d", "4", "-w", "-S", "8k", "--pattern", "0x5a", i]);
    assert!(
        out.starts_with(
            "Sending 500 write requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 8192)"
        ),
        "{out}"
    );
    assert!(out.contains("Run completed in "), "{out}");
    // The writes landed where qemu-img bench would have put them.
    let out = ok(&["io", "-r", "-c", "read -P 0x5a 8k 4k", "-c", "read -P 0 4k 4k", i]);
    assert_eq!(out.matches("read 4096/4096").count(), 2, "{out}");
    let (code, _, err) = vdisk(&["bench", "-d", "8", "--flush-interval", "4", "-w", i]);
    assert_eq!(code, 1);
    assert!(err.contains("flush interval"), "{err}");
}
