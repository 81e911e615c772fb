//! Shared helpers for the integration tests: running qemu-img/qemu-io (the
//! oracle), temporary directories, reading whole devices.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vdisk::{BackingPolicy, BlockDevice, Format, Image, OpenOptions};

/// Whether the qemu tools are usable. Without them the interop tests fail
/// with an install hint, unless `VDISK_SKIP_QEMU=1` asks to skip them.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if ok {
        return true;
    }
    if std::env::var("VDISK_SKIP_QEMU").as_deref() == Ok("1") {
        eprintln!("qemu-img not found: skipping (VDISK_SKIP_QEMU=1)");
        return false;
    }
    panic!("qemu-img is needed by the interop tests: apt-get install -y qemu-utils (or set VDISK_SKIP_QEMU=1 to skip them)");
}

/// Runs a command and returns its stdout; panics with stderr on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `qemu-img ARGS...`.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-io -f FMT IMG -c CMD ...`.
pub fn qemu_io(fmt: &str, img: &Path, cmds: &[String]) {
    let mut args: Vec<String> = vec!["-f".into(), fmt.into(), img.display().to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &refs);
    assert!(!out.contains("error") && !out.contains("Error"), "qemu-io reported: {out}");
}

/// The guest content as qemu exports it (`qemu-img convert -O raw`).
pub fn qemu_export(img: &Path, fmt: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export.raw");
    qemu_img(&["convert", "-f", fmt, "-O", "raw", &img.display().to_string(), &out.display().to_string()]);
    std::fs::read(&out).unwrap()
}

/// Opens an image read-only with vdisk, following backing files whose
/// format is recorded or probed.
pub fn open_ro(img: &Path, fmt: Format) -> Image {
    OpenOptions::new().format(fmt).read_only(true).backing(BackingPolicy::Follow).open(img).unwrap()
}

/// Opens an image read-write with vdisk.
pub fn open_rw(img: &Path, fmt: Format) -> Image {
    OpenOptions::new().format(fmt).backing(BackingPolicy::Follow).open(img).unwrap()
}

/// Reads the whole device.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    // Read in odd-sized pieces so requests straddle clusters.
    let mut pos = 0usize;
    let step = 1_000_003usize;
    while pos < buf.len() {
        let n = step.min(buf.len() - pos);
        dev.read_at(&mut buf[pos..pos + n], pos as u64).unwrap();
        pos += n;
    }
    buf
}

/// `qemu-img check` output as JSON text, and its exit code.
pub fn qemu_check(img: &Path, fmt: &str) -> (i32, String) {
    let (code, out, err) = run_status("qemu-img", &["check", "-f", fmt, "--output=json", &img.display().to_string()]);
    (code, format!("{out}{err}"))
}

/// Asserts `qemu-img check` finds no errors and no leaks.
pub fn assert_qemu_clean(img: &Path, fmt: &str) {
    let (code, out) = qemu_check(img, fmt);
    assert_eq!(code, 0, "qemu-img check of {} is not clean:\n{out}", img.display());
}

/// Finds the first differing byte, for readable assertion messages.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i:#x}: got {:#04x}, want {:#04x}", got[i], want[i]);
    }
}

/// A temporary directory for one test.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Path helper.
pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// The vdisk binary built for these tests.
pub fn vdisk_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vdisk"))
}

/// Runs the vdisk binary; returns (exit code, stdout, stderr).
pub fn vdisk(args: &[&str]) -> (i32, String, String) {
    run_status(vdisk_bin().to_str().unwrap(), args)
}

/// Per-byte classes from a `map --output=json` listing (qemu-img's or
/// vdisk's): 0 = reads as zero without data, 1 = data.
pub fn map_classes(json: &str, size: u64, granule: u64) -> Vec<u8> {
    let mut out = vec![255u8; (size / granule) as usize];
    for line in json.lines() {
        let line = line.trim().trim_start_matches('[').trim_end_matches(']').trim_end_matches(',');
        if !line.starts_with('{') {
            continue;
        }
        let field = |name: &str| -> Option<String> {
            let key = format!("\"{name}\": ");
            let i = line.find(&key)? + key.len();
            let rest = &line[i..];
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            Some(rest[..end].trim().to_string())
        };
        let start: u64 = field("start").unwrap().parse().unwrap();
        let length: u64 = field("length").unwrap().parse().unwrap();
        let data = field("data").unwrap() == "true";
        for g in (start / granule)..((start + length) / granule) {
            out[g as usize] = u8::from(data);
        }
    }
    out
}

/// A small deterministic PRNG for test workloads.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An in-memory model of a disk.
#[derive(Debug, Clone)]
pub struct Model {
    pub data: Vec<u8>,
}

impl Model {
    pub fn new(size: u64) -> Self {
        Model { data: vec![0; size as usize] }
    }
    pub fn write(&mut self, off: u64, buf: &[u8]) {
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    }
    pub fn zero(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
    }
    pub fn resize(&mut self, size: u64) {
        self.data.resize(size as usize, 0);
    }
    /// Writes the model as a raw file for qemu-img compare.
    pub fn save(&self, path: &Path) {
        std::fs::write(path, &self.data).unwrap();
    }
}

/// A deterministic pattern for a write: bytes depend on the seed and offset.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| (r.next() >> 56) as u8).collect()
}

/// `qemu-img compare` of an image against a model (raw file).
pub fn assert_qemu_compare(img: &Path, fmt: &str, model: &Model) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("model.raw");
    model.save(&raw);
    let (code, out, err) = run_status(
        "qemu-img",
        &["compare", "-f", fmt, "-F", "raw", &img.display().to_string(), &raw.display().to_string()],
    );
    assert_eq!(code, 0, "qemu-img compare {}: {out}{err}", img.display());
}

/// The `vdisk` command as a virsh user runs it, with a configuration
/// directory of its own (`VDISK_CONFIG_DIR`) and either no libvirt
/// configuration (`VDISK_LIBVIRT_DIR` empty) or an empty one of its own.
pub struct VirshCli {
    _tmp: tempfile::TempDir,
    /// The test's directory (the working directory of every command).
    pub root: PathBuf,
    libvirt: PathBuf,
}

impl VirshCli {
    /// No libvirt configuration is read.
    pub fn new() -> VirshCli {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        VirshCli { _tmp: tmp, root, libvirt: PathBuf::new() }
    }

    /// An empty libvirt configuration directory of its own (`root/libvirt`).
    pub fn with_libvirt_dir() -> VirshCli {
        let mut c = VirshCli::new();
        c.libvirt = c.root.join("libvirt");
        std::fs::create_dir_all(&c.libvirt).unwrap();
        c
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .env("VDISK_CONFIG_DIR", self.root.join("cfg"))
            .env("VDISK_LIBVIRT_DIR", &self.libvirt)
            .current_dir(&self.root)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs and expects success; the standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vdisk {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Runs and expects exit status 1; the standard error.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(o.status.code(), Some(1), "vdisk {} should fail", args.join(" "));
        String::from_utf8(o.stderr).unwrap()
    }
}
