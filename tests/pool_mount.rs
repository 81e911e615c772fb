//! fs and netfs pools mount their source like libvirt: `pool-start` runs
//! the system's `mount`, `pool-destroy` unmounts (refused while a volume is
//! in use), and a source mounted elsewhere, something else mounted on the
//! target, or a target another pool (vdisk's or libvirt's) also uses is
//! refused. The source here is a tmpfs whose "device" name is unique to the
//! test, so it needs no loop device and no network; without root, the
//! tests check that the error says root is needed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vdisk::{BlockDevice, Format, OpenOptions};

mod common;

use common::VirshCli as Host;

fn define_fs(h: &Host, name: &str, device: &str, target: &Path) {
    let xml = format!(
        "<pool type='fs'><name>{name}</name><source><device path='{device}'/><format type='tmpfs'/></source><target><path>{}</path></target></pool>",
        target.display()
    );
    let f = h.root.join(format!("{name}.xml"));
    std::fs::write(&f, xml).unwrap();
    h.ok(&["pool-define", f.to_str().unwrap()]);
}

fn mount_source_of(target: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (Path::new(f[4]) == target).then(|| f[sep + 2].to_string())
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}

/// A device name no other mount uses.
fn unique_device() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("vdisk-test-{}-{n}-{t}", std::process::id())
}

/// Unmounts what a failed test may leave behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        while mount_source_of(&self.0).is_some() {
            if !Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success()) {
                break;
            }
        }
    }
}

#[test]
fn fs_pool_start_mounts_and_destroy_unmounts() {
    let h = Host::with_libvirt_dir();
    let target = h.root.join("pool");
    let _u = Unmount(target.clone());
    let dev = unique_device();
    define_fs(&h, "scratch", &dev, &target);
    h.ok(&["pool-build", "scratch"]);
    if !is_root() {
        let e = h.fails(&["pool-start", "scratch"]);
        assert!(e.contains("needs root"), "{e}");
        return;
    }
    assert_eq!(h.ok(&["pool-start", "scratch"]), "Pool scratch started\n\n");
    assert_eq!(mount_source_of(&target).as_deref(), Some(dev.as_str()));
    h.ok(&["vol-create-as", "scratch", "disk.qcow2", "16M", "--format", "qcow2"]);
    assert!(h.ok(&["vol-list", "scratch"]).contains("disk.qcow2"));
    assert!(h.ok(&["pool-info", "scratch"]).contains("running"));
    // A volume in use keeps the pool mounted.
    let img = target.join("disk.qcow2");
    let user = OpenOptions::new().format(Format::Qcow2).open(&img).unwrap();
    user.write_at(&[7; 512], 0).unwrap();
    let e = h.fails(&["pool-destroy", "scratch"]);
    assert!(e.contains("disk.qcow2") && e.contains("in use"), "{e}");
    assert!(mount_source_of(&target).is_some());
    drop(user);
    assert_eq!(h.ok(&["pool-destroy", "scratch"]), "Pool scratch destroyed\n\n");
    assert_eq!(mount_source_of(&target), None, "pool-destroy unmounts");
    assert!(!img.exists(), "the volume lived on the mounted filesystem");
    // Started again: mounted again (a fresh tmpfs, so empty).
    h.ok(&["pool-start", "scratch"]);
    assert_eq!(mount_source_of(&target).as_deref(), Some(dev.as_str()));
    h.ok(&["pool-destroy", "scratch"]);
}

#[test]
fn conflicting_mounts_and_targets_are_refused() {
    if !is_root() {
        eprintln!("not root: mounting is refused before any conflict can be seen; skipping");
        return;
    }
    let h = Host::with_libvirt_dir();
    let (t1, t2) = (h.root.join("one"), h.root.join("two"));
    let (_u1, _u2) = (Unmount(t1.clone()), Unmount(t2.clone()));
    let dev = unique_device();
    define_fs(&h, "one", &dev, &t1);
    define_fs(&h, "two", &dev, &t2);
    h.ok(&["pool-build", "one"]);
    h.ok(&["pool-build", "two"]);
    h.ok(&["pool-start", "one"]);
    // The same source, already mounted by pool one.
    let e = h.fails(&["pool-start", "two"]);
    assert!(e.contains("already mounted on") && e.contains(t1.to_str().unwrap()), "{e}");
    assert_eq!(mount_source_of(&t2), None);
    h.ok(&["pool-destroy", "one"]);

    // Something else mounted on the target.
    let other = unique_device();
    assert!(Command::new("mount").args(["-t", "tmpfs", &other]).arg(&t2).status().unwrap().success());
    let e = h.fails(&["pool-start", "two"]);
    assert!(e.contains(&other) && e.contains("already mounted on its target"), "{e}");
    assert!(Command::new("umount").arg(&t2).status().unwrap().success());

    // A libvirt pool defined afterwards on the same target.
    let lv = format!(
        "<pool type='dir'><name>lv-images</name><uuid>0b0d8c5a-6a43-4c59-9d6b-1f4d5d0e2c11</uuid><target><path>{}</path></target></pool>",
        t1.display()
    );
    std::fs::write(h.root.join("libvirt/lv-images.xml"), lv).unwrap();
    let e = h.fails(&["pool-start", "one"]);
    assert!(e.contains("libvirt's pool 'lv-images'"), "{e}");
    assert_eq!(mount_source_of(&t1), None, "nothing was mounted");
}

#[test]
fn without_root_the_error_says_root_is_needed() {
    // As root, the test drops to nobody with setpriv; as anyone else, it
    // runs as itself.
    let have_setpriv = Command::new("setpriv").arg("--version").output().is_ok_and(|o| o.status.success());
    if is_root() && !have_setpriv {
        eprintln!("setpriv (util-linux) missing: cannot drop root; skipping");
        return;
    }
    let h = Host::with_libvirt_dir();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&h.root, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let target = h.root.join("pool");
    let _u = Unmount(target.clone());
    let dev = unique_device();
    let xml = format!(
        "<pool type='fs'><name>nr</name><source><device path='{dev}'/><format type='tmpfs'/></source><target><path>{}</path></target></pool>",
        target.display()
    );
    std::fs::write(h.root.join("nr.xml"), xml).unwrap();
    // vdisk as the unprivileged user.
    let as_user = || {
        let mut c = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_vdisk")]);
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_vdisk"))
        };
        c.env("VDISK_CONFIG_DIR", h.root.join("cfg")).env("VDISK_LIBVIRT_DIR", "").env("HOME", &h.root);
        c
    };
    let run = |args: &[&str]| -> Output { as_user().args(args).output().unwrap() };
    let o = run(&["pool-define", h.root.join("nr.xml").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::create_dir_all(&target).unwrap();
    let o = run(&["pool-start", "nr"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("needs root") && err.contains(&format!("mount -t tmpfs {dev}")), "{err}");
    assert_eq!(mount_source_of(&target), None);
}

/// An `fs` pool whose device is named through a symlink (as
/// `/dev/disk/by-uuid/...` names are) starts and stops: mountinfo lists the
/// device under its own name, and the two are the same block device.
/// Needs root and a loop device (skipped, saying so, without them).
#[test]
fn fs_pool_on_a_device_named_through_a_symlink() {
    if !is_root() {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let h = Host::with_libvirt_dir();
    let backing = h.root.join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(16 << 20).unwrap();
    let mk = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&backing).output();
    if !mk.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: mkfs.ext4 is not usable here");
        return;
    }
    let lo = Command::new("losetup").args(["-f", "--show"]).arg(&backing).output();
    let loop_dev = match lo {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            eprintln!("skipped: no loop device can be attached here");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _d = Detach(loop_dev.clone());
    let link = h.root.join("by-uuid-link");
    std::os::unix::fs::symlink(&loop_dev, &link).unwrap();
    let target = h.root.join("pool");
    let _u = Unmount(target.clone());
    let xml = format!(
        "<pool type='fs'><name>linked</name><source><device path='{}'/><format type='ext4'/></source><target><path>{}</path></target></pool>",
        link.display(),
        target.display()
    );
    let f = h.root.join("linked.xml");
    std::fs::write(&f, xml).unwrap();
    h.ok(&["pool-define", f.to_str().unwrap()]);
    h.ok(&["pool-build", "linked"]);
    assert_eq!(h.ok(&["pool-start", "linked"]), "Pool linked started\n\n");
    assert_eq!(mount_source_of(&target).as_deref(), Some(loop_dev.as_str()));
    assert_eq!(h.ok(&["pool-destroy", "linked"]), "Pool linked destroyed\n\n");
    assert_eq!(mount_source_of(&target), None);
}
