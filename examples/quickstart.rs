//! The KVM-tutorial story with vdisk, no daemon needed:
//! a storage pool in a local directory, an 8 GiB qcow2 "golden image", a
//! raw data disk, a linked clone for a VM, data written through the
//! `BlockDevice` API, an internal snapshot, the volume list, one volume's
//! XML (what `virsh vol-dumpxml` prints) and a vmdk export.
//!
//! Run: `cargo run --example quickstart`. Everything lives under one
//! directory (printed first), recreated on each run. The same steps on the
//! command line are `vdisk pool-define-as`, `vol-create-as`, `vol-list`,
//! `vol-dumpxml` and `vol-clone --format vmdk`.

use vdisk::pool::units::pretty;
use vdisk::pool::{CloneOptions, PoolDef, Registry, RegistryPaths, VolumeSpec};
use vdisk::{BlockDevice, Format, Image};

fn main() -> vdisk::Result<()> {
    let root = std::env::temp_dir().join("vdisk-quickstart");
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|e| vdisk::Error::io("cannot clean up", e).with_path(&root))?;
    }
    // Our own registry (libvirt's /etc/libvirt/storage is not read here).
    let reg = Registry::open(RegistryPaths::new(root.join("config")).without_libvirt())?;
    let pool = reg.define(PoolDef::dir("quickstart", root.join("images"))?)?;
    pool.build()?;
    pool.start()?;
    println!("pool 'quickstart' in {}", pool.target().display());
    println!("  (definition: {})\n", pool.definition_file().display());

    // An 8 GiB qcow2 "golden image" and a raw data disk.
    let base = pool.create_volume(&VolumeSpec::new("debian.qcow2", 8 << 30, Format::Qcow2)?, None)?;
    pool.create_volume(&VolumeSpec::new("data.raw", 1 << 30, Format::Raw)?, None)?;

    // "Install" something into the golden image, and snapshot it.
    {
        let dev = base.open(false)?;
        dev.write_at(b"installed: debian 13", 0)?;
        dev.flush()?;
        if let Image::Qcow2(q) = dev.image() {
            q.snapshot_create("installed")?;
            println!("snapshot 'installed' of debian.qcow2: {} snapshot(s)", q.snapshots().len());
        }
    }

    // A linked clone for a VM: a qcow2 overlay that records its backing
    // volume *and* its format (never probed later).
    let web = pool
        .create_volume(&VolumeSpec::new("web1.qcow2", 0, Format::Qcow2)?.backing(base.path(), Format::Qcow2), None)?;
    {
        let dev = web.open(false)?;
        dev.write_at(b"web1 config", 1 << 20)?;
        dev.flush()?;
        let mut buf = [0u8; 20];
        dev.read_at(&mut buf, 0)?;
        println!("web1.qcow2 reads through to its base: {:?}\n", String::from_utf8_lossy(&buf));
    }

    // Export: a full copy converted to vmdk (holes kept, chain flattened).
    pool.clone_volume(&web, "web1.vmdk", &CloneOptions { format: Some(Format::Vmdk), ..Default::default() })?;

    // The volume list (virsh vol-list --details).
    println!("{:<12} {:<6} {:>10} {:>12}  backing", "Name", "Format", "Capacity", "Allocation");
    for v in pool.volumes()? {
        let line = format!(
            "{:<12} {:<6} {:>10} {:>12}  {}",
            v.name_lossy(),
            v.format.map_or("?", Format::name),
            pretty(v.capacity),
            pretty(v.allocation),
            v.backing.as_ref().map(|b| b.path.display().to_string()).unwrap_or_default()
        );
        println!("{}", line.trim_end());
    }

    // What virsh vol-dumpxml prints for the clone.
    println!("\n{}", web.describe()?);
    Ok(())
}
