//! Pools and volumes end to end: lifecycle, volume operations checked by
//! qemu-img, and the safety rules, each by a test that tries to break it.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{have_qemu, qemu_img};
use vdisk::pool::{
    CloneOptions, Pool, PoolDef, Registry, RegistryPaths, UploadOptions, VolType, VolumeSpec, WipeAlgorithm,
};
use vdisk::{BlockDevice, ErrorKind, Format};

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    reg: Registry,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let reg = Registry::open(RegistryPaths::new(root.join("config")).without_libvirt()).unwrap();
    Env { _tmp: tmp, root, reg }
}

fn started(e: &Env, name: &str) -> Pool {
    let p = e.reg.define(PoolDef::dir(name, e.root.join(name)).unwrap()).unwrap();
    p.build().unwrap();
    p.start().unwrap();
    p
}

fn qemu_json(path: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "-U", "--output=json", path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn pool_lifecycle() {
    let e = env();
    let target = e.root.join("images");
    let p = e.reg.define(PoolDef::dir("images", &target).unwrap()).unwrap();
    assert!(!p.is_active());
    assert!(e.root.join("config/images.xml").is_file());
    assert_eq!(p.start().unwrap_err().kind(), ErrorKind::NotFound);
    p.build().unwrap();
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o711);
    p.start().unwrap();
    assert!(p.is_active());
    assert!(p.build().is_err(), "build while active");
    assert!(p.start().is_err(), "start twice");
    let info = p.info().unwrap();
    assert_eq!(info.state.name(), "running");
    assert!(info.capacity > 0 && info.available <= info.capacity);
    assert!(info.allocation <= info.capacity);
    let xml = p.xml_desc().unwrap();
    assert!(xml.contains("<capacity unit='bytes'>"), "{xml}");
    assert!(xml.contains("<mode>0711</mode>"), "{xml}");
    // A fresh registry sees the same state.
    let reg2 = Registry::open(RegistryPaths::new(e.root.join("config")).without_libvirt()).unwrap();
    assert!(reg2.pool("images").unwrap().is_active());
    assert_eq!(reg2.pool(&p.uuid().to_string()).unwrap().name(), "images");
    // Autostart link, as libvirt lays it out.
    let p = p.set_autostart(true).unwrap();
    let link = e.root.join("config/autostart/images.xml");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(reg2.pool("images").unwrap().autostart());
    let p = p.set_autostart(false).unwrap();
    assert!(!link.exists());
    // A volume keeps the directory from being deleted.
    p.create_volume(&VolumeSpec::new("v.raw", 1 << 20, Format::Raw).unwrap(), None).unwrap();
    assert!(p.undefine().is_err(), "undefine while active");
    assert!(p.delete().is_err(), "delete while active");
    p.destroy().unwrap();
    assert!(!p.is_active());
    assert!(target.join("v.raw").exists(), "destroy never touches data");
    assert_eq!(p.info().unwrap().state.name(), "inactive");
    let err = p.delete().unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    std::fs::remove_file(target.join("v.raw")).unwrap();
    p.delete().unwrap();
    assert!(!target.exists());
    p.undefine().unwrap();
    assert!(!e.root.join("config/images.xml").exists());
    assert_eq!(e.reg.pool("images").unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn duplicate_definitions_are_refused() {
    let e = env();
    let a = e.reg.define(PoolDef::dir("a", e.root.join("a")).unwrap()).unwrap();
    // Same name, different uuid.
    let err = e.reg.define(PoolDef::dir("a", e.root.join("other")).unwrap()).unwrap_err();
    assert!(err.to_string().contains("already defined with uuid"), "{err}");
    // Same uuid, different name.
    let xml = format!(
        "<pool type='dir'><name>b</name><uuid>{}</uuid><target><path>{}</path></target></pool>",
        a.uuid(),
        e.root.join("b").display()
    );
    let err = e.reg.define_xml(&xml).unwrap_err();
    assert!(err.to_string().contains("already exists with uuid"), "{err}");
    // Same target, also through a symlink and with a trailing slash.
    std::fs::create_dir(e.root.join("a")).unwrap();
    std::os::unix::fs::symlink(e.root.join("a"), e.root.join("alias")).unwrap();
    for t in [e.root.join("a"), e.root.join("alias"), e.root.join("a/")] {
        let err = e.reg.define(PoolDef::dir("c", &t).unwrap()).unwrap_err();
        assert!(err.to_string().contains("Storage source conflict with pool: 'a'"), "{err}");
    }
    // Redefining the same pool is an update.
    let xml = a.def().to_xml();
    e.reg.define_xml(&xml).unwrap();
    assert_eq!(e.reg.list().unwrap().pools.len(), 1);
}

#[test]
fn libvirt_directory_is_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let lv = tmp.path().join("libvirt");
    std::fs::create_dir_all(lv.join("autostart")).unwrap();
    let target = tmp.path().join("lvimages");
    std::fs::create_dir(&target).unwrap();
    let xml = format!(
        "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n<pool type='dir'>\n  <name>default</name>\n  <uuid>3d1b2a3c-1111-4222-8333-444455556666</uuid>\n  <capacity unit='bytes'>0</capacity>\n  <allocation unit='bytes'>0</allocation>\n  <available unit='bytes'>0</available>\n  <source>\n  </source>\n  <target>\n    <path>{}</path>\n  </target>\n</pool>\n",
        target.display()
    );
    std::fs::write(lv.join("default.xml"), &xml).unwrap();
    std::os::unix::fs::symlink(lv.join("default.xml"), lv.join("autostart/default.xml")).unwrap();
    let snapshot = |d: &Path| {
        let mut v: Vec<_> = walk(d);
        v.sort();
        v
    };
    let before = snapshot(&lv);
    let mut paths = RegistryPaths::new(tmp.path().join("config"));
    paths.libvirt_dir = Some(lv.clone());
    let reg = Registry::open(paths).unwrap();
    let p = reg.pool("default").unwrap();
    assert!(p.autostart());
    // Autostart pools come up on the first registry of a boot.
    assert!(p.is_active());
    p.create_volume(&VolumeSpec::new("x.qcow2", 1 << 20, Format::Qcow2).unwrap(), None).unwrap();
    assert!(p.undefine().is_err());
    assert!(p.set_autostart(false).is_err());
    let err = reg.define(PoolDef::dir("default", tmp.path().join("z")).unwrap()).unwrap_err();
    assert!(err.to_string().contains("defined by libvirt"), "{err}");
    let err = reg.define(PoolDef::dir("mine", &target).unwrap()).unwrap_err();
    assert!(err.to_string().contains("conflict"), "{err}");
    p.destroy().unwrap();
    assert_eq!(snapshot(&lv), before, "libvirt's directory was modified");
}

fn walk(d: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            out.extend(walk(&p));
        } else if md.file_type().is_symlink() {
            out.push((p.clone(), std::fs::read_link(&p).unwrap().into_os_string().into_vec()));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

use std::os::unix::ffi::OsStringExt;

#[test]
fn volumes_agree_with_qemu_img() {
    if !have_qemu() {
        return;
    }
    let e = env();
    let p = started(&e, "p");
    let t = p.canonical_target();
    // Made by vdisk.
    p.create_volume(&VolumeSpec::new("a.raw", 10 << 20, Format::Raw).unwrap(), None).unwrap();
    let mut full = VolumeSpec::new("full.raw", 3 << 20, Format::Raw).unwrap();
    full.allocation = None;
    p.create_volume(&full, None).unwrap();
    p.create_volume(&VolumeSpec::new("b.qcow2", 8 << 30, Format::Qcow2).unwrap(), None).unwrap();
    let mut pre = VolumeSpec::new("pre.qcow2", 64 << 20, Format::Qcow2).unwrap();
    pre.prealloc_metadata = true;
    p.create_volume(&pre, None).unwrap();
    p.create_volume(&VolumeSpec::new("c.vmdk", 100 << 20, Format::Vmdk).unwrap(), None).unwrap();
    let base = p.volume("b.qcow2").unwrap();
    p.create_volume(
        &VolumeSpec::new("linked.qcow2", 0, Format::Qcow2).unwrap().backing(base.path(), Format::Qcow2),
        None,
    )
    .unwrap();
    // Made by qemu-img.
    for (n, f, extra) in [
        ("q.qcow2", "qcow2", vec!["-o", "cluster_size=4096,compat=0.10"]),
        ("q.raw", "raw", vec![]),
        ("q.vmdk", "vmdk", vec![]),
        ("qflat.vmdk", "vmdk", vec!["-o", "subformat=monolithicFlat"]),
    ] {
        let mut args = vec!["create", "-q", "-f", f];
        args.extend(extra);
        let path = t.join(n);
        let ps = path.to_str().unwrap().to_string();
        args.push(&ps);
        args.push("5M");
        qemu_img(&args);
        common::qemu_io(f, &path, &["write -P 7 1M 64k".into()]);
    }
    // Some data through the BlockDevice API.
    {
        let dev = p.volume("b.qcow2").unwrap().open(false).unwrap();
        dev.write_at(&[0x5a; 65536], 1 << 30).unwrap();
        dev.flush().unwrap();
    }
    let (vols, _) = p.refresh().unwrap();
    let mut checked = 0;
    for v in &vols {
        if v.kind != VolType::File || v.name_lossy() == "qflat-flat.vmdk" {
            continue;
        }
        let j = qemu_json(&v.path);
        let name = v.name_lossy();
        assert_eq!(v.format.map(Format::name), j["format"].as_str(), "{name}");
        assert_eq!(Some(v.capacity), j["virtual-size"].as_u64(), "{name}");
        assert_eq!(Some(v.allocation), j["actual-size"].as_u64(), "{name}");
        assert!(v.error.is_none(), "{name}: {:?}", v.error);
        checked += 1;
    }
    assert_eq!(checked, 10);
    let linked = vols.iter().find(|v| v.name_lossy() == "linked.qcow2").unwrap();
    let b = linked.backing.as_ref().unwrap();
    assert_eq!(b.path, base.path());
    assert_eq!(b.format.as_deref(), Some("qcow2"));
    assert_eq!(linked.capacity, 8 << 30);
    // The linked clone reads through to its backing volume.
    let dev = p.volume("linked.qcow2").unwrap().open(true).unwrap();
    let mut buf = [0u8; 16];
    dev.read_at(&mut buf, 1 << 30).unwrap();
    assert_eq!(buf, [0x5a; 16]);
    drop(dev);
    let chain = p.volume("linked.qcow2").unwrap().chain().unwrap();
    assert_eq!(chain.len(), 2);
    qemu_img(&["check", "-U", t.join("linked.qcow2").to_str().unwrap()]);
    qemu_img(&["check", "-U", t.join("pre.qcow2").to_str().unwrap()]);
    // The full raw volume is allocated, the sparse one is not.
    let full = vols.iter().find(|v| v.name_lossy() == "full.raw").unwrap();
    assert!(full.allocation >= 3 << 20);
    let sparse = vols.iter().find(|v| v.name_lossy() == "a.raw").unwrap();
    assert!(sparse.allocation < 1 << 20);
}

#[test]
fn clone_wipe_resize_upload_download() {
    if !have_qemu() {
        return;
    }
    let e = env();
    let p = started(&e, "p");
    let q = started(&e, "q");
    let src = p.create_volume(&VolumeSpec::new("src.qcow2", 32 << 20, Format::Qcow2).unwrap(), None).unwrap();
    {
        let d = src.open(false).unwrap();
        d.write_at(&[1u8; 100_000], 3 << 20).unwrap();
        d.write_at(&[2u8; 4096], 30 << 20).unwrap();
        d.flush().unwrap();
    }
    for (name, fmt) in [("c.raw", Format::Raw), ("c.vmdk", Format::Vmdk), ("c.qcow2", Format::Qcow2)] {
        let c = q.clone_volume(&src, name, &CloneOptions { format: Some(fmt), ..Default::default() }).unwrap();
        let (code, out, err) = common::run_status(
            "qemu-img",
            &["compare", "-U", src.path().to_str().unwrap(), c.path().to_str().unwrap()],
        );
        assert_eq!(code, 0, "{name}: {out}{err}");
        let info = c.info().unwrap();
        assert_eq!(info.format, Some(fmt));
        assert!(info.allocation < 4 << 20, "{name}: holes kept ({})", info.allocation);
    }
    // The clone target must be new.
    assert_eq!(q.clone_volume(&src, "c.raw", &CloneOptions::default()).unwrap_err().kind(), ErrorKind::AlreadyExists);
    // Resize: grow, refuse to shrink without the flag.
    let r = q.volume("c.raw").unwrap();
    assert_eq!(r.resize(64 << 20, false).unwrap(), 64 << 20);
    assert!(r.resize(16 << 20, false).is_err());
    assert_eq!(r.resize(32 << 20, true).unwrap(), 32 << 20);
    let qv = q.volume("c.qcow2").unwrap();
    qv.resize(1 << 30, false).unwrap();
    assert_eq!(qemu_json(&qv.path())["virtual-size"].as_u64(), Some(1 << 30));
    // Download the raw clone sparsely, upload it into a new raw volume.
    let out = e.root.join("dl.raw");
    let f = std::fs::File::create(&out).unwrap();
    let n = r.download_to_file(&f, &UploadOptions { sparse: true, ..Default::default() }, None).unwrap();
    assert_eq!(n, 32 << 20);
    drop(f);
    let md = std::fs::metadata(&out).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md.len(), 32 << 20);
    assert!(md.blocks() * 512 < 4 << 20, "download kept holes");
    let up = q.create_volume(&VolumeSpec::new("up.raw", 32 << 20, Format::Raw).unwrap(), None).unwrap();
    let seen = std::sync::atomic::AtomicU64::new(0);
    let prog = |d: u64, _t: u64| {
        seen.store(d, std::sync::atomic::Ordering::Relaxed);
    };
    let n = up
        .upload(
            &mut std::fs::File::open(&out).unwrap(),
            &UploadOptions { sparse: true, ..Default::default() },
            Some(&prog),
        )
        .unwrap();
    assert_eq!(n, 32 << 20);
    assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 32 << 20);
    assert!(up.info().unwrap().allocation < 4 << 20);
    let (code, _, err) =
        common::run_status("qemu-img", &["compare", "-U", src.path().to_str().unwrap(), up.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // A raw volume's upload range is checked.
    let err = up
        .upload(&mut std::io::repeat(1), &UploadOptions { offset: 32 << 20, length: Some(1), sparse: false }, None)
        .unwrap_err();
    assert!(err.to_string().contains("capacity"), "{err}");
    // Wipe: zeros keep a sparse file sparse; random fills; both end raw.
    up.wipe(WipeAlgorithm::Zero, None).unwrap();
    let i = up.info().unwrap();
    assert!(i.allocation < 1 << 20 && i.physical == 32 << 20);
    assert!(std::fs::read(up.path()).unwrap().iter().all(|&b| b == 0));
    let w = q.volume("c.qcow2").unwrap();
    w.wipe(WipeAlgorithm::Random, None).unwrap();
    let i = w.info().unwrap();
    assert_eq!(i.format, Some(Format::Raw));
    assert_eq!(i.capacity, i.physical);
    // Delete.
    w.delete().unwrap();
    assert!(!w.path().exists());
    assert!(q.volume("c.qcow2").is_err());
}

/// Every operation that opens a volume read-write closes it explicitly:
/// with lazy refcounts, qcow2 defers its refcount updates (and sets the
/// dirty bit) until then, and `qemu-img check` sees any that are missing.
#[test]
fn every_operation_leaves_a_lazy_refcounts_qcow2_clean() {
    if !have_qemu() {
        return;
    }
    let e = env();
    let p = started(&e, "p");
    let q = started(&e, "q");
    let lazy = |name: &str, capacity: u64| {
        VolumeSpec::new(name, capacity, Format::Qcow2).unwrap().qcow2_option("lazy_refcounts", "on")
    };
    let clean = |v: &vdisk::pool::Volume| common::assert_qemu_clean(&v.path(), "qcow2");
    let same = |a: &vdisk::pool::Volume, b: &vdisk::pool::Volume| {
        let (code, out, err) =
            common::run_status("qemu-img", &["compare", "-U", a.path().to_str().unwrap(), b.path().to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
    };

    // vol-create
    let v = p.create_volume(&lazy("lazy.qcow2", 64 << 20), None).unwrap();
    assert!(v.info().unwrap().lazy_refcounts);
    clean(&v);
    // Writes through Volume::open allocate clusters (the dirty bit goes on);
    // close writes the refcounts and clears it.
    let dev = v.open(false).unwrap();
    dev.write_at(&[7u8; 1 << 20], 3 << 20).unwrap();
    dev.write_at(&[9u8; 4096], 60 << 20).unwrap();
    dev.close().unwrap();
    clean(&v);

    // vol-create-as --backing-vol: a lazy linked clone, written through.
    let linked = p.create_volume(&lazy("linked.qcow2", 0).backing(v.path(), Format::Qcow2), None).unwrap();
    clean(&linked);
    let dev = linked.open(false).unwrap();
    dev.write_at(&[1u8; 65536], 0).unwrap();
    dev.close().unwrap();
    clean(&linked);
    clean(&v);

    // vol-clone into another pool, and a flattening clone of the overlay.
    let copy = q.clone_volume(&v, "copy.qcow2", &CloneOptions::default()).unwrap();
    clean(&copy);
    clean(&v);
    same(&v, &copy);
    let flat = q.clone_volume(&linked, "flat.qcow2", &CloneOptions::default()).unwrap();
    clean(&flat);
    clean(&linked);
    same(&linked, &flat);

    // vol-resize: grow, then shrink over an unallocated tail.
    assert_eq!(v.resize(128 << 20, false).unwrap(), 128 << 20);
    clean(&v);
    assert_eq!(v.resize(96 << 20, true).unwrap(), 96 << 20);
    clean(&v);
    let refused = v.resize(32 << 20, true).unwrap_err();
    assert!(refused.to_string().contains("allocated"), "{refused}");
    clean(&v);

    // vol-upload: a lazy qcow2 image made by qemu-img, larger than the
    // volume file it overwrites, becomes the volume (recorded qcow2).
    let img = e.root.join("upload.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img.to_str().unwrap(), "32M"]);
    common::qemu_io("qcow2", &img, &["write -P 5 0 8M".into()]);
    assert!(std::fs::metadata(&img).unwrap().len() > std::fs::metadata(copy.path()).unwrap().len());
    copy.upload(&mut std::fs::File::open(&img).unwrap(), &UploadOptions::default(), None).unwrap();
    clean(&copy);
    assert_eq!(copy.info().unwrap().capacity, 32 << 20);
    let dev = copy.open(false).unwrap();
    dev.write_at(&[6u8; 65536], 16 << 20).unwrap();
    dev.close().unwrap();
    clean(&copy);

    // Read-only operations leave it as it was.
    let dl = e.root.join("download.qcow2");
    v.download_to_file(&std::fs::File::create(&dl).unwrap(), &UploadOptions::default(), None).unwrap();
    common::assert_qemu_clean(&dl, "qcow2");
    v.describe().unwrap();
    assert_eq!(linked.chain().unwrap().len(), 2);
    drop(v.open(true).unwrap());
    clean(&v);

    // vol-wipe: the header is gone, the volume is raw from now on.
    flat.wipe(WipeAlgorithm::Zero, None).unwrap();
    assert_eq!(flat.info().unwrap().format, Some(Format::Raw));
    assert_eq!(qemu_json(&flat.path())["format"].as_str(), Some("raw"));

    // vol-delete
    linked.delete().unwrap();
    v.delete().unwrap();
    assert!(!v.path().exists());
}

#[test]
fn volume_in_use_is_not_deleted_or_changed() {
    let e = env();
    let p = started(&e, "p");
    let v = p.create_volume(&VolumeSpec::new("vm.qcow2", 1 << 20, Format::Qcow2).unwrap(), None).unwrap();
    // In use by this process.
    let dev = v.open(false).unwrap();
    for err in
        [v.delete().unwrap_err(), v.wipe(WipeAlgorithm::Zero, None).unwrap_err(), v.resize(2 << 20, false).unwrap_err()]
    {
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    }
    drop(dev);
    // In use by another process holding QEMU locks (a plain open file
    // description with a write lock stands in for a VM here; the qemu-io
    // case is in pool_lock.rs).
    let other = std::fs::OpenOptions::new().read(true).write(true).open(v.path()).unwrap();
    vdisk::storage::lock::lock_file(&other, &v.path(), vdisk::LockMode::Auto, vdisk::storage::lock::Access::ReadWrite)
        .unwrap();
    let err = v.delete().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("in use"), "{err}");
    assert!(v.path().exists());
    // Release before closing: a child another test thread is forking could
    // share the description for a moment (see FileStorage's Drop).
    vdisk::storage::lock::release(&other);
    drop(other);
    v.delete().unwrap();
}

#[test]
fn qemu_running_blocks_delete() {
    if !have_qemu() {
        return;
    }
    let e = env();
    let p = started(&e, "p");
    let v = p.create_volume(&VolumeSpec::new("vm.qcow2", 1 << 20, Format::Qcow2).unwrap(), None).unwrap();
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(v.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !vdisk::storage::lock::users(&v.path()).unwrap().writer() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = v.delete().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert_eq!(v.open(true).unwrap_err().kind(), ErrorKind::Busy);
    drop(child.stdin.take());
    child.wait().unwrap();
    v.delete().unwrap();
}

#[test]
fn hostile_names_are_refused() {
    let e = env();
    let p = started(&e, "p");
    let long = "x".repeat(256);
    let names: Vec<&str> = vec![
        "",
        ".",
        "..",
        "../escape",
        "a/b",
        "/etc/passwd",
        "nul\0",
        "new\nline",
        "tab\t",
        "\x1b[2J",
        "-rf",
        "--format",
        ".vdisk-tmp-1",
        &long,
    ];
    for n in names {
        let spec = VolumeSpec { name: n.to_string(), ..VolumeSpec::new("ok", 1 << 20, Format::Raw).unwrap() };
        let err = p.create_volume(&spec, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{n:?}: {err}");
    }
    assert_eq!(std::fs::read_dir(p.canonical_target()).unwrap().count(), 0);
    assert!(!e.root.join("escape").exists());
    for n in ["", "a/b", "../x", "."] {
        assert!(vdisk::pool::name::check_pool_name(n).is_err());
    }
}

#[test]
fn symlinks_are_never_written_through() {
    let e = env();
    let p = started(&e, "p");
    let outside = e.root.join("precious.img");
    std::fs::write(&outside, vec![0xabu8; 1 << 20]).unwrap();
    let link = p.canonical_target().join("link.img");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    std::os::unix::fs::symlink(e.root.join("missing"), p.canonical_target().join("dangling")).unwrap();
    let (vols, _) = p.refresh().unwrap();
    let l = vols.iter().find(|v| v.name_lossy() == "link.img").unwrap();
    assert_eq!(l.kind, VolType::Symlink);
    assert!(l.error.as_deref().unwrap().contains("outside the pool"), "{:?}", l.error);
    let d = vols.iter().find(|v| v.name_lossy() == "dangling").unwrap();
    assert!(d.error.as_deref().unwrap().contains("dangling"));
    let v = p.volume("link.img").unwrap();
    assert!(v.wipe(WipeAlgorithm::Zero, None).is_err());
    assert!(v.upload(&mut std::io::repeat(0), &UploadOptions::default(), None).is_err());
    assert!(v.resize(2 << 20, false).is_err());
    assert!(v.open(false).is_err());
    // Creating over the link (or the dangling one) is refused.
    for n in ["link.img", "dangling"] {
        let err = p.create_volume(&VolumeSpec::new(n, 4096, Format::Raw).unwrap(), None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{n}");
    }
    assert!(!e.root.join("missing").exists());
    // Delete removes the link only.
    v.delete().unwrap();
    assert!(!link.exists());
    assert_eq!(std::fs::read(&outside).unwrap(), vec![0xabu8; 1 << 20]);
    // A link inside the pool is probed through (read-only).
    p.create_volume(&VolumeSpec::new("real.qcow2", 1 << 20, Format::Qcow2).unwrap(), None).unwrap();
    std::os::unix::fs::symlink("real.qcow2", p.canonical_target().join("alias")).unwrap();
    let vols = p.volumes().unwrap();
    let a = vols.iter().find(|v| v.name_lossy() == "alias").unwrap();
    assert_eq!((a.kind, a.format, a.capacity), (VolType::Symlink, Some(Format::Qcow2), 1 << 20));
}

#[test]
fn fifos_sockets_and_devices_are_refused() {
    let e = env();
    let p = started(&e, "p");
    let fifo = p.canonical_target().join("pipe");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe_free_mkfifo(&c), 0);
    let _sock = std::os::unix::net::UnixListener::bind(p.canonical_target().join("sock")).unwrap();
    let (vols, _) = p.refresh().unwrap();
    for n in ["pipe", "sock"] {
        let v = vols.iter().find(|v| v.name_lossy() == n).unwrap();
        assert_eq!(v.kind, VolType::Other);
        assert!(v.error.as_deref().unwrap().contains("not a volume"), "{:?}", v.error);
        let vol = p.volume(n).unwrap();
        assert!(vol.open(true).is_err());
        assert!(vol.wipe(WipeAlgorithm::Zero, None).is_err());
        assert!(vol.delete().is_err());
        assert!(vol.upload(&mut std::io::empty(), &UploadOptions::default(), None).is_err());
    }
    assert!(fifo.exists());
}

/// mkfifo through the `mkfifo` tool: tests stay free of `unsafe`.
fn unsafe_free_mkfifo(path: &std::ffi::CStr) -> i32 {
    let st = std::process::Command::new("mkfifo").arg(OsStr::from_bytes(path.to_bytes())).status().unwrap();
    if st.success() {
        0
    } else {
        -1
    }
}

#[test]
fn create_never_overwrites() {
    let e = env();
    let p = started(&e, "p");
    let existing = p.canonical_target().join("taken.img");
    std::fs::write(&existing, b"keep me").unwrap();
    for f in [Format::Raw, Format::Qcow2, Format::Vmdk] {
        let err = p.create_volume(&VolumeSpec::new("taken.img", 1 << 20, f).unwrap(), None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("exists already"), "{err}");
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    assert_eq!(std::fs::read_dir(p.canonical_target()).unwrap().count(), 1, "no temp left");
}

#[test]
fn two_threads_one_name_one_winner() {
    let e = env();
    let p = started(&e, "p");
    for round in 0..5 {
        let name = format!("race{round}.qcow2");
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let p = p.clone();
                let b = barrier.clone();
                let name = name.clone();
                std::thread::spawn(move || {
                    let f = [Format::Qcow2, Format::Raw, Format::Vmdk, Format::Qcow2][i];
                    b.wait();
                    p.create_volume(&VolumeSpec::new(&name, 1 << 20, f).unwrap(), None)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(r.kind(), ErrorKind::AlreadyExists, "{r}");
        }
        let v = p.volume(&name).unwrap().info().unwrap();
        assert!(v.error.is_none(), "{:?}", v.error);
    }
    let entries: Vec<_> = std::fs::read_dir(p.canonical_target()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries.len(), 5, "{entries:?}");
}

#[test]
fn two_processes_one_name_one_winner() {
    let e = env();
    let p = started(&e, "p");
    let cfg = e.root.join("config");
    for round in 0..3 {
        let name = format!("proc{round}.qcow2");
        let children: Vec<_> = (0..3)
            .map(|_| {
                std::process::Command::new(env!("CARGO_BIN_EXE_vdisk"))
                    .env("VDISK_LIBVIRT_DIR", "")
                    .args(["vol-create-as", "p", &name, "1M", "--format", "qcow2"])
                    .arg("--config-dir")
                    .arg(&cfg)
                    .output()
                    .unwrap()
            })
            .collect();
        let ok = children.iter().filter(|o| o.status.success()).count();
        assert_eq!(ok, 1, "round {round}: {:?}", children);
        for o in children.iter().filter(|o| !o.status.success()) {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("exists already"), "{err}");
        }
    }
    assert_eq!(p.volumes().unwrap().len(), 3);
}

#[test]
fn crash_before_rename_leaves_only_a_temp_dir() {
    let e = env();
    let p = started(&e, "p");
    let t = p.canonical_target();
    // What a crash between building and renaming leaves behind.
    let tmp = t.join(".vdisk-tmp-0123456789abcdef");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("half.qcow2"), b"QFI\xfb half built").unwrap();
    std::fs::write(t.join(".vdisk-tmp-file"), b"x").unwrap();
    let (vols, report) = p.refresh().unwrap();
    assert!(vols.is_empty(), "{vols:?}");
    assert_eq!(report.temporary, 2);
    assert!(p.volume("half.qcow2").is_err());
    assert!(p.volume(".vdisk-tmp-0123456789abcdef").is_err());
    // Too young to be stale: left alone.
    assert_eq!(p.cleanup(Duration::from_secs(3600)).unwrap(), 0);
    // A temp file some process still has locked is left alone.
    let held = std::fs::File::open(tmp.join("half.qcow2")).unwrap();
    vdisk::storage::lock::lock_file(&held, &tmp, vdisk::LockMode::Auto, vdisk::storage::lock::Access::ReadOnly)
        .unwrap();
    assert_eq!(p.cleanup(Duration::ZERO).unwrap(), 1);
    assert!(tmp.exists());
    vdisk::storage::lock::release(&held);
    drop(held);
    assert_eq!(p.cleanup(Duration::ZERO).unwrap(), 1);
    assert!(!tmp.exists());
    assert_eq!(std::fs::read_dir(&t).unwrap().count(), 0);
    // The name is free for a real create.
    p.create_volume(&VolumeSpec::new("half.qcow2", 1 << 20, Format::Qcow2).unwrap(), None).unwrap();
}

#[test]
fn listing_reuses_probes_until_a_file_changes() {
    let e = env();
    let p = started(&e, "p");
    for i in 0..40 {
        let f = [Format::Raw, Format::Qcow2][i % 2];
        p.create_volume(&VolumeSpec::new(&format!("v{i:02}"), 1 << 20, f).unwrap(), None).unwrap();
    }
    std::fs::write(p.canonical_target().join("junk"), b"QFI\xfb\0\0\0\x03garbage").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (cold, r) = p.refresh().unwrap();
    assert_eq!((r.volumes, r.probed, r.reused), (41, 41, 0));
    let junk = cold.iter().find(|v| v.name_lossy() == "junk").unwrap();
    assert!(junk.error.is_some(), "unparsable files are listed with the reason");
    let (warm, r) = p.refresh().unwrap();
    assert_eq!((r.probed, r.reused), (0, 41));
    // Equal but for access times (the cold probe read the files).
    let facts = |v: &[vdisk::pool::VolumeInfo]| {
        v.iter()
            .map(|i| {
                (
                    i.name.clone(),
                    i.format,
                    i.capacity,
                    i.allocation,
                    i.physical,
                    i.error.clone(),
                    i.stat.ino,
                    i.stat.mtime,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(facts(&warm), facts(&cold));
    // Another process (a new registry) uses the on-disk cache.
    let reg2 = Registry::open(RegistryPaths::new(e.root.join("config")).without_libvirt()).unwrap();
    let (again, r) = reg2.pool("p").unwrap().refresh().unwrap();
    assert_eq!((r.probed, r.reused), (0, 41));
    assert_eq!(facts(&again), facts(&cold));
    // A changed file is probed again, and only that one.
    {
        let d = p.volume("v01").unwrap().open(false).unwrap();
        d.resize(2 << 20).unwrap();
        d.flush().unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let (after, r) = p.refresh().unwrap();
    assert_eq!(r.probed, 1);
    let v = after.iter().find(|v| v.name_lossy() == "v01").unwrap();
    assert_eq!(v.capacity, 2 << 20);
    // A file removed outside vdisk leaves the listing and the format record.
    let records = e.root.join(format!("config/volumes/{}.formats", p.uuid()));
    assert!(std::fs::read_to_string(&records).unwrap().contains("\tv05\n"));
    std::fs::remove_file(p.canonical_target().join("v05")).unwrap();
    let (after, r) = p.refresh().unwrap();
    assert_eq!((r.volumes, r.probed), (40, 0));
    assert!(after.iter().all(|v| v.name_lossy() != "v05"));
    assert!(!std::fs::read_to_string(&records).unwrap().contains("\tv05\n"));
}

#[test]
fn recorded_format_is_never_upgraded_by_a_probe() {
    let e = env();
    let p = started(&e, "p");
    let v = p.create_volume(&VolumeSpec::new("guest.raw", 4 << 20, Format::Raw).unwrap(), None).unwrap();
    // The "guest" writes a qcow2 header naming a host file as backing.
    let evil = e.root.join("evil.qcow2");
    qemu_or_build_evil(&evil, &e.root.join("host-secret"));
    let bytes = std::fs::read(&evil).unwrap();
    let dev = v.open(false).unwrap();
    dev.write_at(&bytes, 0).unwrap();
    dev.flush().unwrap();
    drop(dev);
    let info = v.info().unwrap();
    assert_eq!(info.format, Some(Format::Raw));
    assert_eq!(info.probed_format, Some(Format::Qcow2));
    assert!(info.warning.is_some());
    assert!(info.backing.is_none());
    assert_eq!(info.capacity, 4 << 20);
    let dev = v.open(true).unwrap();
    assert_eq!(dev.info().format, Format::Raw);
    assert_eq!(dev.size(), 4 << 20);
}

#[test]
fn a_cache_entry_never_decides_a_recorded_format() {
    let e = env();
    let p = started(&e, "p");
    // A raw file put into the pool outside vdisk: the first listing probes
    // it, caches the probe and records it as raw.
    std::fs::write(p.canonical_target().join("outside.img"), vec![0u8; 1 << 20]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (vols, _) = p.refresh().unwrap();
    assert_eq!(vols[0].format, Some(Format::Raw));
    // The record is gone (lost, or never written) and the cache entry,
    // which still matches the file's (device, inode, size, mtime, ctime),
    // says qcow2 (edited, or left by another file): the cache must not
    // decide what the file is recorded as.
    let records = e.root.join(format!("config/volumes/{}.formats", p.uuid()));
    std::fs::remove_file(&records).unwrap();
    let cache = e.root.join(format!("config/cache/{}.cache", p.uuid()));
    let forged: String = std::fs::read_to_string(&cache)
        .unwrap()
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split('\t').collect();
            if f[0] == "outside.img" {
                assert_eq!(f[7], "raw");
                f[7] = "qcow2";
            }
            f.join("\t") + "\n"
        })
        .collect();
    std::fs::write(&cache, forged).unwrap();
    // A new process, which has only the on-disk cache.
    let reg2 = Registry::open(RegistryPaths::new(e.root.join("config")).without_libvirt()).unwrap();
    let p2 = reg2.pool("p").unwrap();
    let (vols, r) = p2.refresh().unwrap();
    assert_eq!((vols[0].format, vols[0].probed_format), (Some(Format::Raw), Some(Format::Raw)));
    assert_eq!((r.probed, r.reused), (1, 0), "the unrecorded file is probed afresh");
    assert!(std::fs::read_to_string(&records).unwrap().starts_with("raw\t"));
    assert_eq!(p2.volume("outside.img").unwrap().recorded_format().unwrap(), Format::Raw);
    // Once recorded, the (now fresh) cache entry serves listings again.
    let (_, r) = p2.refresh().unwrap();
    assert_eq!((r.probed, r.reused), (0, 1));
}

fn qemu_or_build_evil(path: &Path, backing: &Path) {
    std::fs::write(backing, b"secret").unwrap();
    let o = vdisk::qcow2::create::CreateOptions {
        backing_file: Some(backing.display().to_string()),
        backing_format: Some("raw".into()),
        ..vdisk::qcow2::create::CreateOptions::new(1 << 20)
    };
    drop(vdisk::OpenOptions::new().create_qcow2(path, &o).unwrap());
}
