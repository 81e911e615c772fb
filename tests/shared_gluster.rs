//! Two hosts sharing images on a real GlusterFS volume: a single-node
//! volume, started by this test, mounted twice through FUSE by two `netfs`
//! pools (one per "host", each with its own configuration directory; they
//! name the server differently, `HOSTNAME` and `localhost`, as two hosts
//! would reach it by their own names). Pools mount and unmount it, volumes
//! made on one host are seen on the other, creating the same volume at once
//! from both lets exactly one win, image locks hold across the mounts, and
//! an image is handed from one host to the other and back.
//!
//! Needs root, FUSE and the GlusterFS server (`glusterfs-server
//! glusterfs-client`); skips with the reason otherwise. glusterd is started
//! (`glusterd -N`) unless one already answers, and everything started is
//! stopped again.

mod common;
mod shared_hosts;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use shared_hosts::*;

fn gluster(args: &[&str]) -> Output {
    Command::new("gluster").arg("--mode=script").args(args).output().unwrap()
}

/// A started one-brick volume; stopped, deleted (and glusterd stopped, if
/// this test started it) on drop.
struct Volume {
    name: String,
    daemon: Option<Child>,
    _brick: tempfile::TempDir,
}

impl Volume {
    fn start() -> Option<Volume> {
        if !is_root() || !have("glusterd") || !have("mount.glusterfs") || !Path::new("/dev/fuse").exists() {
            eprintln!(
                "SKIPPED: GlusterFS tests need root, /dev/fuse and glusterfs-server + glusterfs-client \
                 (apt-get install -y --no-install-recommends glusterfs-server glusterfs-client)"
            );
            return None;
        }
        let mut daemon = None;
        if !gluster(&["volume", "list"]).status.success() {
            let child = Command::new("glusterd")
                .args(["-N", "--log-file=/dev/null"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("glusterd");
            daemon = Some(child);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !gluster(&["volume", "list"]).status.success() {
                if Instant::now() > deadline {
                    eprintln!("SKIPPED: glusterd did not answer within 20 s");
                    let _ = daemon.as_mut().map(Child::kill);
                    return None;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
        let brick = tempfile::tempdir().unwrap();
        let name = format!("vdisktest{}", std::process::id());
        let b = format!("{host}:{}", brick.path().join("b").display());
        let o = gluster(&["volume", "create", &name, &b, "force"]);
        assert!(o.status.success(), "volume create: {}", String::from_utf8_lossy(&o.stderr));
        let v = Volume { name, daemon, _brick: brick };
        let o = gluster(&["volume", "start", &v.name]);
        assert!(o.status.success(), "volume start: {}", String::from_utf8_lossy(&o.stderr));
        Some(v)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = gluster(&["volume", "stop", &self.name, "force"]);
        let _ = gluster(&["volume", "delete", &self.name]);
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

#[test]
fn two_hosts_share_a_glusterfs_volume() {
    if !have_qemu() {
        return;
    }
    let Some(vol) = Volume::start() else { return };
    let dir = tmp();
    let server = hostname();
    let source =
        |host: &str| format!("<host name='{host}'/>\n    <dir path='/{}'/>\n    <format type='glusterfs'/>", vol.name);
    let a = Host::new(dir.path(), "a", &source(&server), "");
    let b = Host::new(dir.path(), "b", &source("localhost"), "");
    let _u = Unmount(vec![a.target.clone(), b.target.clone()]);
    start_pools(&a, &b, "fuse.glusterfs", dir.path());
    two_hosts(&a, &b);
    destroy_pools(&a, &b);
    drop(vol);
}
