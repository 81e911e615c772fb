//! Image locking against QEMU as the other party: `qemu-io` held open in
//! interactive mode (commands from a pipe) while vdisk tries, and vdisk
//! holding an image while `qemu-img info` / `qemu-io -c` try.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{have_qemu, qemu_img, run_status};
use vdisk::{ErrorKind, Format, LockMode, OpenOptions};

/// A `qemu-io` process holding an image open until dropped.
struct QemuHolder {
    child: Child,
}

impl QemuHolder {
    fn start(fmt: &str, path: &Path, extra: &[&str]) -> QemuHolder {
        let mut child = Command::new("qemu-io")
            .args(extra)
            .args(["-f", fmt])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io runs");
        // Wait until its locks are visible.
        let t = Instant::now();
        while !vdisk::storage::lock::users(path).unwrap().in_use() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("qemu-io exited early: {st}");
            }
            assert!(t.elapsed() < Duration::from_secs(10), "qemu-io took no lock");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuHolder { child }
    }
}

impl Drop for QemuHolder {
    fn drop(&mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(b"quit\n");
        }
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn qcow2(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "16M"]);
    p
}

#[test]
fn vdisk_refuses_an_image_qemu_writes() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["qcow2", "raw"] {
        let p = dir.path().join(format!("held.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, p.to_str().unwrap(), "16M"]);
        let f = Format::from_name(fmt).unwrap();
        let held = QemuHolder::start(fmt, &p, &[]);
        let e = OpenOptions::new().format(f).open(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy, "{fmt}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(p.to_str().unwrap()), "{msg}");
        assert!(msg.contains("in use"), "{msg}");
        // A plain read-only open does not share write either, like qemu-img
        // info without -U.
        let e = OpenOptions::new().format(f).read_only(true).open(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy, "{fmt}: {e}");
        // Force-share reads anyway; locking off ignores everything.
        let img = OpenOptions::new().format(f).read_only(true).lock(LockMode::ForceShare).open(&p).unwrap();
        drop(img);
        OpenOptions::new().format(f).lock(LockMode::Off).open(&p).unwrap();
        // Creating over it (qemu-img create semantics) is refused before
        // anything is truncated.
        let before = std::fs::read(&p).unwrap();
        let e = vdisk::FileStorage::create(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert_eq!(std::fs::read(&p).unwrap(), before);
        drop(held);
        OpenOptions::new().format(f).open(&p).unwrap();
    }
    // A read-only qemu-io (like a backing file in a running chain) keeps
    // writers out but lets readers in.
    let p = qcow2(dir.path(), "ro.qcow2");
    let held = QemuHolder::start("qcow2", &p, &["-r"]);
    let e = OpenOptions::new().format(Format::Qcow2).open(&p).unwrap_err();
    assert!(e.to_string().contains("\"write\" lock"), "{e}");
    OpenOptions::new().format(Format::Qcow2).read_only(true).open(&p).unwrap();
    drop(held);
}

#[test]
fn qemu_refuses_an_image_vdisk_writes() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = qcow2(dir.path(), "mine.qcow2");
    let ps = p.to_str().unwrap();
    let img = OpenOptions::new().format(Format::Qcow2).open(&p).unwrap();
    let (code, _, err) = run_status("qemu-img", &["info", ps]);
    assert_ne!(code, 0);
    assert!(err.contains("Failed to get shared \"write\" lock"), "qemu-img info said: {err}");
    assert!(err.contains("Is another process using the image"), "{err}");
    let (code, out, err) = run_status("qemu-io", &["-f", "qcow2", ps, "-c", "read 0 512"]);
    assert!(
        code != 0 || err.contains("lock") || out.contains("lock"),
        "qemu-io read-write was not refused: {out}{err}"
    );
    assert!(format!("{out}{err}").contains("Failed to get \"write\" lock"));
    let (code, _, err) = run_status("qemu-img", &["create", "-f", "qcow2", ps, "1M"]);
    assert_ne!(code, 0, "qemu-img create clobbered an image in use: {err}");
    // -U reads anyway.
    let (code, out, err) = run_status("qemu-img", &["info", "-U", ps]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("virtual size: 16 MiB"), "{out}");
    drop(img);
    let (code, _, err) = run_status("qemu-img", &["info", ps]);
    assert_eq!(code, 0, "{err}");

    // Two vdisk readers coexist, qemu-img info reads beside them, and a
    // qemu writer is kept out.
    let r1 = OpenOptions::new().format(Format::Qcow2).read_only(true).open(&p).unwrap();
    let r2 = OpenOptions::new().format(Format::Qcow2).read_only(true).open(&p).unwrap();
    let (code, _, err) = run_status("qemu-img", &["info", ps]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_status("qemu-io", &["-f", "qcow2", ps, "-c", "write 0 512"]);
    assert!(format!("{out}{err}").contains("Failed to get \"write\" lock"));
    let _ = code;
    drop((r1, r2));

    // Backing files are read-only users of the chain.
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "mine.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    let img = OpenOptions::new().format(Format::Qcow2).open(&top).unwrap();
    let (_, out, err) = run_status("qemu-io", &["-f", "qcow2", ps, "-c", "write 0 512"]);
    assert!(format!("{out}{err}").contains("Failed to get \"write\" lock"), "{out}{err}");
    let (code, _, err) = run_status("qemu-img", &["info", ps]);
    assert_eq!(code, 0, "{err}");
    drop(img);

    // Images vdisk creates are locked while open.
    let created = dir.path().join("new.qcow2");
    let q = vdisk::Qcow2::create_file(&created, &vdisk::qcow2::create::CreateOptions::new(1 << 20)).unwrap();
    let (code, _, err) = run_status("qemu-img", &["info", created.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    drop(q);
    let v = dir.path().join("new.vmdk");
    let vm = vdisk::Vmdk::create(&v, 1 << 20, &Default::default()).unwrap();
    let (code, _, _) = run_status("qemu-img", &["info", v.to_str().unwrap()]);
    assert_ne!(code, 0);
    drop(vm);
}
