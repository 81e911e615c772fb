//! The pool's probe cache under file times that do not follow this host's
//! clock, as on a file server whose clock is skewed: modification times set
//! an hour into the future and the past with `touch -d`, and a header
//! rewritten with the old modification time put back. The cache keys on
//! (device, inode, size, mtime, ctime) by equality; its racy check measures
//! time on the filesystem's clock (unit tests in `src/pool/probe_cache.rs`
//! give ctimes skewed both ways, which `touch` cannot set).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use vdisk::pool::{Pool, PoolDef, Registry, RegistryPaths, VolumeSpec};
use vdisk::Format;

fn touch(args: &[&str], file: &PathBuf) {
    let st = Command::new("touch").args(args).arg(file).status().unwrap();
    assert!(st.success(), "touch {args:?}");
}

fn listing(p: &Pool) -> (usize, usize) {
    let (_, r) = p.refresh().unwrap();
    (r.probed, r.reused)
}

#[test]
fn skewed_file_times_neither_pin_nor_fool_the_probe_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open(RegistryPaths::new(tmp.path().join("config")).without_libvirt()).unwrap();
    let p = reg.define(PoolDef::dir("p", tmp.path().join("p")).unwrap()).unwrap();
    p.build().unwrap();
    p.start().unwrap();
    p.create_volume(&VolumeSpec::new("a", 1 << 20, Format::Raw).unwrap(), None).unwrap();
    p.create_volume(&VolumeSpec::new("b", 1 << 20, Format::Qcow2).unwrap(), None).unwrap();
    let a = p.canonical_target().join("a");
    let b = p.canonical_target().join("b");
    let settle = || std::thread::sleep(Duration::from_millis(50));
    settle();
    assert_eq!(listing(&p), (2, 0));
    assert_eq!(listing(&p), (0, 2));

    // An mtime an hour ahead (a server's clock ahead of ours): probed again
    // once, then reused, not probed on every listing.
    touch(&["-d", "+1 hour"], &a);
    settle();
    assert_eq!(listing(&p), (1, 1));
    assert_eq!(listing(&p), (0, 2));
    // An hour behind: the same.
    touch(&["-d", "-1 hour"], &b);
    settle();
    assert_eq!(listing(&p), (1, 1));
    assert_eq!(listing(&p), (0, 2));

    // The raw file gets a qcow2 header, same size, and its old mtime back:
    // still seen (ctime cannot be set back), and shown as what it now says.
    let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&b).unwrap();
    bytes.resize(1 << 20, 0);
    std::fs::write(&a, &bytes).unwrap();
    let secs = mtime.duration_since(std::time::UNIX_EPOCH).unwrap();
    touch(&["-d", &format!("@{}.{:09}", secs.as_secs(), secs.subsec_nanos())], &a);
    assert_eq!(std::fs::metadata(&a).unwrap().modified().unwrap(), mtime);
    settle();
    let (vols, r) = p.refresh().unwrap();
    assert_eq!((r.probed, r.reused), (1, 1));
    let va = vols.iter().find(|v| v.name_lossy() == "a").unwrap();
    assert_eq!(va.probed_format, Some(Format::Qcow2), "the rewritten header was probed");
    assert_eq!(va.format, Some(Format::Raw), "the recorded format stays");
}
