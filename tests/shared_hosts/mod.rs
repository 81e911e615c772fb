//! Two "hosts" sharing images on one network filesystem, for the tests that
//! start a real server (GlusterFS, NFS): each host has its own vdisk
//! configuration and a `netfs` pool mounting the same export on its own
//! target, and [`two_hosts`] runs the scenario every shared filesystem must
//! pass: volumes seen alike, a create race with one winner, locks across
//! the mounts, and a handoff from one host to the other and back.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use vdisk::{BlockDevice, ErrorKind, Format, LockMode, OpenOptions};

pub fn have(cmd: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().any(|d| Path::new(d).join(cmd).exists())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

/// One "host": its own vdisk configuration and a netfs pool `shared`.
pub struct Host {
    pub root: PathBuf,
    pub target: PathBuf,
}

impl Host {
    /// `source` is the pool's `<source>` content, `extra` what follows
    /// `<target>` (such as `<fs:mount_opts>`).
    pub fn new(root: &Path, name: &str, source: &str, extra: &str) -> Host {
        let root = root.join(name);
        let target = root.join("pool");
        std::fs::create_dir_all(&root).unwrap();
        let h = Host { root, target };
        let xml = format!(
            "<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'>\n  <name>shared</name>\n  <source>\n    {source}\n  </source>\n  <target>\n    <path>{}</path>\n  </target>\n  {extra}\n</pool>\n",
            h.target.display()
        );
        std::fs::write(h.root.join("shared.xml"), xml).unwrap();
        h.ok(&["pool-define", h.root.join("shared.xml").to_str().unwrap()]);
        h
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk"));
        c.env("VDISK_CONFIG_DIR", self.root.join("cfg")).env("VDISK_LIBVIRT_DIR", "").args(args);
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args).output().unwrap();
        assert!(
            o.status.success(),
            "vdisk {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn img(&self, name: &str) -> PathBuf {
        self.target.join(name)
    }
}

/// The filesystem type and source of what is mounted on `target`.
pub fn mount_of(target: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (Path::new(f[4]) == target).then(|| (f[sep + 1].to_string(), f[sep + 2].to_string()))
    })
}

/// Unmounts whatever a failed test left mounted.
pub struct Unmount(pub Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for t in &self.0 {
            if mount_of(t).is_some() {
                let _ = Command::new("umount").arg(t).status();
            }
        }
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Starts both pools (they must mount a filesystem of type `fstype`) and
/// validates the XML.
pub fn start_pools(a: &Host, b: &Host, fstype: &str, dir: &Path) {
    for h in [a, b] {
        h.ok(&["pool-build", "shared"]);
        h.ok(&["pool-start", "shared"]);
        let (t, _) = mount_of(&h.target).expect("pool-start mounted the export");
        assert_eq!(t, fstype);
        assert!(h.ok(&["pool-info", "shared"]).contains("running"));
    }
    if have("virt-xml-validate") {
        let f = dir.join("dump.xml");
        std::fs::write(&f, a.ok(&["pool-dumpxml", "shared"])).unwrap();
        let (code, out, err) = run_status("virt-xml-validate", &[s(&f), "storagepool"]);
        assert_eq!(code, 0, "virt-xml-validate: {out}{err}");
    } else {
        eprintln!("virt-xml-validate not installed (libvirt-clients): the pool XML is not validated");
    }
}

/// The scenario every shared filesystem must pass, on two started pools.
pub fn two_hosts(a: &Host, b: &Host) {
    // Host A creates volumes; host B sees them, with their sizes and formats.
    a.ok(&["vol-create-as", "shared", "guest.qcow2", "64M", "--format", "qcow2"]);
    a.ok(&["vol-create-as", "shared", "data.raw", "8M", "--format", "raw"]);
    let list = b.ok(&["vol-list", "shared", "--details"]);
    assert!(list.contains("guest.qcow2") && list.contains("64.00 MiB"), "{list}");
    assert!(list.contains("data.raw") && list.contains("8.00 MiB"), "{list}");
    let info = qemu_img(&["info", "-U", "--output=json", s(&b.img("guest.qcow2"))]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");

    // Host A's probe cache follows what host B changes: a volume grown on
    // B, and a file B's qemu-img made behind vdisk's back.
    assert!(a.ok(&["vol-info", "--pool", "shared", "guest.qcow2"]).contains("64.00 MiB"));
    qemu_img(&["resize", "-q", "-f", "qcow2", s(&b.img("guest.qcow2")), "96M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&b.img("byqemu.qcow2")), "5M"]);
    let info = a.ok(&["vol-info", "--pool", "shared", "guest.qcow2"]);
    assert!(info.contains("96.00 MiB"), "host A sees the size host B gave: {info}");
    let list = a.ok(&["vol-list", "shared", "--details"]);
    assert!(list.contains("byqemu.qcow2") && list.contains("5.00 MiB"), "{list}");

    // The same volume created at once from both hosts: one wins.
    let mut racers: Vec<Child> = [a, b]
        .iter()
        .map(|h| {
            h.cmd(&["vol-create-as", "shared", "race.qcow2", "32M", "--format", "qcow2"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = racers.drain(..).map(|c| c.wait_with_output().unwrap()).collect();
    let wins = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(wins, 1, "exactly one create wins: {outs:?}");
    let loser = outs.iter().find(|o| !o.status.success()).unwrap();
    let why = String::from_utf8_lossy(&loser.stderr);
    assert!(why.contains("exists already") || why.contains("already exists"), "{loser:?}");
    assert_qemu_clean(&a.img("race.qcow2"), "qcow2");

    // Locks hold across the mounts, both ways; -U reads; SIGKILL releases.
    let mut holder = Command::new("stdbuf")
        .args(["-oL", "qemu-io", "-f", "qcow2", s(&a.img("guest.qcow2"))])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        // qemu-io answers `length` once it has opened (and locked) the image.
        use std::io::{BufRead, Write};
        writeln!(holder.stdin.as_mut().unwrap(), "length").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("MiB"), "qemu-io: {line}");
    }
    let refused = match OpenOptions::new().format(Format::Qcow2).open(b.img("guest.qcow2")) {
        Err(e) => e,
        Ok(_) => panic!("qemu-io's lock through host A was not seen through host B's mount"),
    };
    assert_eq!(refused.kind(), ErrorKind::Busy, "{refused}");
    assert!(refused.to_string().contains("in use by another process"), "{refused}");
    let ro = OpenOptions::new().format(Format::Qcow2).read_only(true).lock(LockMode::ForceShare);
    ro.open(b.img("guest.qcow2")).expect("-U reads beside a writer");
    holder.kill().unwrap();
    holder.wait().unwrap();
    // The release of a dead process's file may reach the server
    // asynchronously (FUSE): the locks go within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    let w = loop {
        match OpenOptions::new().format(Format::Qcow2).open(b.img("guest.qcow2")) {
            Ok(w) => break w,
            Err(e) if e.kind() == ErrorKind::Busy && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("the locks of a process killed with SIGKILL stayed: {e}"),
        }
    };
    eprintln!(
        "locks released {:?} after SIGKILL",
        Duration::from_secs(10) - deadline.saturating_duration_since(Instant::now())
    );
    let (code, _, err) = run_status("qemu-io", &["-f", "qcow2", s(&a.img("guest.qcow2")), "-c", "write 0 512"]);
    assert_ne!(code, 0, "vdisk's lock through host B keeps qemu-io on host A out");
    assert!(err.contains("lock"), "{err}");
    drop(w);

    // The handoff: A runs the guest, hands it to B, and takes it back.
    let mut model = vec![0u8; 96 << 20];
    let src = open_rw(&a.img("guest.qcow2"), Format::Qcow2);
    src.write_at(&[0xa1; 65536], 0).unwrap();
    model[..65536].fill(0xa1);
    let dst = OpenOptions::new().format(Format::Qcow2).inactive(true).open(b.img("guest.qcow2")).unwrap();
    assert_eq!(dst.activate().unwrap_err().kind(), ErrorKind::Busy);
    src.inactivate().unwrap();
    assert_eq!(src.write_at(&[1; 512], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_qemu_clean(&a.img("guest.qcow2"), "qcow2");
    dst.activate().unwrap();
    assert_same("host B sees host A's data", &read_all(&dst), &model);
    dst.write_at(&[0xb2; 65536], 32 << 20).unwrap();
    model[32 << 20..(32 << 20) + 65536].fill(0xb2);
    assert_eq!(src.activate().unwrap_err().kind(), ErrorKind::Busy);
    dst.inactivate().unwrap();
    assert_qemu_clean(&b.img("guest.qcow2"), "qcow2");
    // QEMU takes a turn through host B while both vdisk sides are inactive.
    qemu_io("qcow2", &b.img("guest.qcow2"), &["write -P 0xc3 80M 64k".to_string()]);
    model[80 << 20..(80 << 20) + 65536].fill(0xc3);
    src.activate().unwrap();
    assert_same("host A sees host B's data", &read_all(&src), &model);
    drop(dst);
    src.close().unwrap();
    assert_qemu_clean(&a.img("guest.qcow2"), "qcow2");

    // Handing off a 1 TiB image costs the header and the small tables,
    // not the size (printed; the goal is well under 100 ms, asserted
    // loosely: the machine may be loaded).
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a.img("big.qcow2")), "1T"]);
    let src = open_rw(&a.img("big.qcow2"), Format::Qcow2);
    src.write_at(&[7; 4096], 1 << 39).unwrap();
    let dst = OpenOptions::new().format(Format::Qcow2).inactive(true).open(b.img("big.qcow2")).unwrap();
    let t = Instant::now();
    src.inactivate().unwrap();
    let inact = t.elapsed();
    let t = Instant::now();
    dst.activate().unwrap();
    let act = t.elapsed();
    eprintln!("1 TiB qcow2 across the mounts: inactivate {inact:?}, activate {act:?}");
    assert!(act < Duration::from_secs(1) && inact < Duration::from_secs(1), "{inact:?} {act:?}");
    let mut buf = [0u8; 4096];
    dst.read_at(&mut buf, 1 << 39).unwrap();
    assert_eq!(buf, [7; 4096]);
}

/// Destroys both pools: each unmounts.
pub fn destroy_pools(a: &Host, b: &Host) {
    for h in [a, b] {
        h.ok(&["pool-destroy", "shared"]);
        assert_eq!(mount_of(&h.target), None);
    }
}
