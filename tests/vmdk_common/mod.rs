//! Helpers shared by the integration tests: running qemu-img / qemu-io,
//! and comparing images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Whether qemu-img and qemu-io are installed. Without them the tests fail
/// with an install hint, unless `VDISK_SKIP_QEMU=1` (then they are skipped).
pub fn have_qemu() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        let ok = ["qemu-img", "qemu-io"]
            .iter()
            .all(|t| Command::new(t).arg("--version").output().is_ok_and(|o| o.status.success()));
        if ok {
            return true;
        }
        if std::env::var("VDISK_SKIP_QEMU").as_deref() == Ok("1") {
            eprintln!("qemu-img/qemu-io not found: skipping interop tests (VDISK_SKIP_QEMU=1)");
            return false;
        }
        panic!(
            "qemu-img and qemu-io are needed for the interop tests: install them with \
             `apt-get install -y qemu-utils` (or set VDISK_SKIP_QEMU=1 to skip these tests)"
        );
    })
}

/// Returns early from a test when qemu is absent and skipping was asked for.
#[macro_export]
macro_rules! require_qemu {
    () => {
        if !common::have_qemu() {
            return;
        }
    };
}

/// Runs a command, asserting success; returns stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command; returns (success, stdout + stderr).
pub fn try_run(prog: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// `qemu-io -f vmdk -c CMD ... img`.
pub fn qemu_io(img: &Path, cmds: &[String]) {
    let mut args: Vec<String> = vec!["-f".into(), "vmdk".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(img.display().to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &a);
    assert!(!out.contains("error") && !out.contains("failed"), "qemu-io reported a failure: {out}");
}

/// One pattern write: (byte, offset, length).
pub type Write = (u8, u64, u64);

/// qemu-io commands for `writes`.
pub fn qemu_writes(writes: &[Write]) -> Vec<String> {
    writes.iter().map(|(p, o, l)| format!("write -P {p:#x} {o} {l}")).collect()
}

/// `qemu-img convert -f vmdk -O raw img out`.
pub fn to_raw(img: &Path, out: &Path) {
    run("qemu-img", &["convert", "-f", "vmdk", "-O", "raw", &img.display().to_string(), &out.display().to_string()]);
}

/// `qemu-img check -f vmdk img` succeeds and reports no errors.
pub fn qemu_check_clean(img: &Path) {
    let (ok, out) = try_run("qemu-img", &["check", "-f", "vmdk", &img.display().to_string()]);
    assert!(ok, "qemu-img check failed for {}:\n{out}", img.display());
    assert!(
        out.contains("No errors were found") && !out.contains("ERROR"),
        "qemu-img check found errors in {}:\n{out}",
        img.display()
    );
}

/// `qemu-img compare -f vmdk -F raw img model` reports identical contents.
pub fn qemu_compare_raw(img: &Path, model: &Path) {
    let (ok, out) = try_run(
        "qemu-img",
        &["compare", "-f", "vmdk", "-F", "raw", &img.display().to_string(), &model.display().to_string()],
    );
    assert!(ok, "qemu-img compare {} {}: {out}", img.display(), model.display());
}

/// Writes a raw model file of `size` bytes holding `writes`.
pub fn write_model(path: &Path, size: u64, writes: &[Write]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (p, o, l) in writes {
        f.write_all_at(&vec![*p; *l as usize], *o).unwrap();
    }
}

/// Opens a vmdk read-only (or read-write) through the generic opener.
pub fn open_vmdk(path: &Path, read_only: bool) -> vdisk::Image {
    vdisk::OpenOptions::new()
        .format(vdisk::Format::Vmdk)
        .read_only(read_only)
        .open(path)
        .unwrap_or_else(|e| panic!("vdisk cannot open {}: {e}", path.display()))
}

/// Asserts that vdisk reads `img` exactly as qemu-img converts it to raw:
/// map-guided over the whole disk, and byte-for-byte with plain reads over
/// `windows` (and the whole disk when it is small).
pub fn assert_reads_like_qemu(img: &Path, dir: &Path, windows: &[(u64, u64)]) {
    use vdisk::BlockDevice;
    let raw = dir.join(format!("{}.qemu.raw", img.file_name().unwrap().to_string_lossy()));
    to_raw(img, &raw);
    let v = open_vmdk(img, true);
    let r = vdisk::Raw::open(std::sync::Arc::new(vdisk::FileStorage::open(&raw, true).unwrap())).unwrap();
    assert_eq!(v.size(), r.size(), "virtual size of {}", img.display());
    assert_eq!(vdisk::convert::compare(&v, &r, true).unwrap(), None, "vdisk and qemu differ on {}", img.display());
    let mut wins: Vec<(u64, u64)> = windows.to_vec();
    if v.size() <= 64 << 20 {
        wins.push((0, v.size()));
    }
    for (o, l) in wins {
        let l = l.min(v.size() - o);
        let mut a = vec![0u8; l as usize];
        let mut b = vec![0u8; l as usize];
        v.read_at(&mut a, o).unwrap();
        r.read_at(&mut b, o).unwrap();
        if a != b {
            let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap();
            panic!("{}: byte {:#x} is {:#x} in vdisk, {:#x} in qemu", img.display(), o + i as u64, a[i], b[i]);
        }
    }
    std::fs::remove_file(&raw).ok();
}

/// A fresh path in `dir`.
pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
