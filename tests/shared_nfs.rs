//! Two hosts sharing images over NFS: an NFS server started by this test
//! (nfs-ganesha, userspace, exporting a temporary directory over NFSv4 on
//! loopback) and two `netfs` pools with `<format type='nfs'/>` mounting the
//! same export as two hosts (`127.0.0.1` and `localhost`, the second with
//! `nosharecache`), put through the same steps as the GlusterFS volume
//! (tests/shared_hosts).
//!
//! Mounting needs the kernel's NFS client. Where the kernel has none (no
//! `nfs` in /proc/filesystems: `mount.nfs: No such device`), the test says
//! so loudly, checks that pool-start fails with that reason and leaves the
//! pool stopped and nothing mounted, and still checks what an NFS client
//! reads: an image handed off by vdisk on the server side, copied out over
//! NFSv4 by libnfs's `nfs-cp`, is clean and holds the data.
//!
//! Needs root and nfs-ganesha with its VFS backend (`apt-get install -y
//! --no-install-recommends nfs-ganesha nfs-ganesha-vfs nfs-common
//! libnfs-utils`); skips with the reason otherwise. The server is stopped
//! by pid.

mod common;
mod shared_hosts;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use shared_hosts::*;
use vdisk::{BlockDevice, Format, OpenOptions};

/// A running nfs-ganesha exporting a temporary directory as `/export`
/// (NFSv4 only, on a free loopback port); killed on drop.
struct Ganesha {
    child: Child,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Ganesha {
    fn start() -> Option<Ganesha> {
        // Servers share ganesha's state directory: one at a time.
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let guard = ONE.lock().unwrap_or_else(|e| e.into_inner());
        if !is_root() || !have("ganesha.nfsd") {
            eprintln!(
                "SKIPPED: the NFS tests need root and nfs-ganesha (apt-get install -y --no-install-recommends \
                 nfs-ganesha nfs-ganesha-vfs nfs-common libnfs-utils)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        std::fs::create_dir(&export).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = dir.path().join("ganesha.conf");
        std::fs::write(
            &conf,
            format!(
                "NFS_CORE_PARAM {{ Protocols = 4; NFS_Port = {port}; Bind_addr = 127.0.0.1; Enable_NLM = false; Enable_RQUOTA = false; }}\n\
                 NFSV4 {{ Graceless = true; }}\n\
                 EXPORT {{ Export_Id = 7; Path = {}; Pseudo = /export; Protocols = 4; Transports = TCP; \
                 Access_Type = RW; Squash = No_Root_Squash; SecType = sys; FSAL {{ Name = VFS; }} }}\n\
                 LOG {{ Default_Log_Level = WARN; }}\n",
                export.display()
            ),
        )
        .unwrap();
        let child = Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(&conf)
            .arg("-L")
            .arg(dir.path().join("ganesha.log"))
            .arg("-p")
            .arg(dir.path().join("ganesha.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ganesha.nfsd");
        let mut g = Ganesha { child, _one_at_a_time: guard, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || g.child.try_wait().unwrap().is_some() {
                let log = std::fs::read_to_string(g.dir.path().join("ganesha.log")).unwrap_or_default();
                eprintln!("SKIPPED: nfs-ganesha did not answer on port {port} within 20 s; its log:\n{log}");
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(g)
    }

    fn export(&self) -> PathBuf {
        self.dir.path().join("export")
    }

    /// A libnfs URL of `name` in the export.
    fn url(&self, name: &str) -> String {
        format!("nfs://127.0.0.1/export/{name}?version=4&nfsport={}", self.port)
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kernel_has_nfs() -> bool {
    std::fs::read_to_string("/proc/filesystems").unwrap_or_default().lines().any(|l| l.ends_with("\tnfs"))
}

#[test]
fn two_hosts_share_an_nfs_export() {
    if !have_qemu() {
        return;
    }
    let Some(g) = Ganesha::start() else { return };
    let dir = tmp();
    let source = |host: &str| {
        format!("<host name='{host}'/>\n    <dir path='/export'/>\n    <format type='nfs'/>\n    <protocol ver='4'/>")
    };
    let opts =
        |extra: &str| format!("<fs:mount_opts>\n    <fs:option name='port={}'/>{extra}\n  </fs:mount_opts>", g.port);
    let a = Host::new(dir.path(), "a", &source("127.0.0.1"), &opts(""));
    let b = Host::new(dir.path(), "b", &source("localhost"), &opts("\n    <fs:option name='nosharecache'/>"));
    let _u = Unmount(vec![a.target.clone(), b.target.clone()]);
    a.ok(&["pool-build", "shared"]);
    let o = a.cmd(&["pool-start", "shared"]).output().unwrap();
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        // Refused with the command and mount's own reason, nothing mounted,
        // the pool still stopped.
        assert!(err.contains("mount -t nfs 127.0.0.1:/export"), "{err}");
        assert!(err.contains(&format!("port={}", g.port)), "{err}");
        assert_eq!(mount_of(&a.target), None);
        assert!(a.ok(&["pool-info", "shared"]).contains("inactive"));
        if !kernel_has_nfs() {
            assert!(err.contains("no NFS client"), "the error names the missing kernel support: {err}");
        }
        eprintln!(
            "\n*** SKIPPED: NFS MOUNTS CANNOT BE TESTED HERE. nfs-ganesha serves the export on port {}, \
             but mounting it fails:\n*** {}\n*** The two-host NFS steps (pools, volumes, create race, locks, \
             handoff) did not run; GlusterFS (tests/shared_gluster.rs) stands in.\n",
            g.port,
            err.trim()
        );
        return;
    }
    a.ok(&["pool-destroy", "shared"]);
    start_pools(&a, &b, "nfs4", dir.path());
    two_hosts(&a, &b);
    destroy_pools(&a, &b);
}

/// What an NFS client reads of an image vdisk handed off on the server's
/// side: the whole image copied out over NFSv4 by libnfs is clean and
/// holds the data, before vdisk writes again.
#[test]
fn an_inactivated_image_reads_clean_over_nfs() {
    if !have_qemu() {
        return;
    }
    if !have("nfs-cp") {
        eprintln!("SKIPPED: nfs-cp (libnfs-utils) is not installed");
        return;
    }
    let Some(g) = Ganesha::start() else { return };
    let img = g.export().join("guest.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    let a = OpenOptions::new().format(Format::Qcow2).open(&img).unwrap();
    let mut model = vec![0u8; 64 << 20];
    for (i, off) in [0u64, 5 << 20, 40 << 20, (64 << 20) - 65536].into_iter().enumerate() {
        let data = pattern(i as u64 + 1, 65536);
        a.write_at(&data, off).unwrap();
        model[off as usize..off as usize + 65536].copy_from_slice(&data);
    }
    a.inactivate().unwrap();
    let dir = tmp();
    let copy = dir.path().join("copy.qcow2");
    run("nfs-cp", &[&g.url("guest.qcow2"), s(&copy)]);
    assert_qemu_clean(&copy, "qcow2");
    assert_same("the image read over NFS", &qemu_export(&copy, "qcow2"), &model);
    // The listing over NFS gives the size the server's file has.
    let ls = run("nfs-ls", &[&format!("nfs://127.0.0.1/export?version=4&nfsport={}", g.port)]);
    let len = std::fs::metadata(&img).unwrap().len().to_string();
    assert!(ls.lines().any(|l| l.contains("guest.qcow2") && l.split_whitespace().any(|w| w == len)), "{ls}");
    a.activate().unwrap();
    a.write_at(&[9; 4096], 0).unwrap();
    drop(a);
    assert_qemu_clean(&img, "qcow2");
}
