//! Every XML document vdisk writes validates with libvirt's own schemas
//! (`virt-xml-validate FILE storagepool|storagevol`), and pool XML in the
//! forms libvirt writes parses and round-trips.

use std::path::Path;
use std::process::Command;

use vdisk::pool::{PoolDef, Registry, RegistryPaths, VolumeSpec};
use vdisk::Format;

/// Whether virt-xml-validate (and the xmllint it runs) work. Without them
/// the test fails with an install hint unless `VDISK_SKIP_LIBVIRT=1`.
fn have_validator() -> bool {
    let ok = Command::new("xmllint").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
        && Command::new("virt-xml-validate").arg("--help").output().is_ok();
    if ok {
        return true;
    }
    if std::env::var("VDISK_SKIP_LIBVIRT").as_deref() == Ok("1") {
        eprintln!("virt-xml-validate not usable: skipping (VDISK_SKIP_LIBVIRT=1)");
        return false;
    }
    panic!(
        "virt-xml-validate and xmllint are needed: apt-get install -y --no-install-recommends libvirt-clients libxml2-utils (or set VDISK_SKIP_LIBVIRT=1)"
    );
}

fn validate(dir: &Path, name: &str, xml: &str, schema: &str) {
    let f = dir.join(name);
    std::fs::write(&f, xml).unwrap();
    let out = Command::new("virt-xml-validate").arg(&f).arg(schema).output().unwrap();
    assert!(
        out.status.success(),
        "{name} does not validate as {schema}:\n{xml}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const NETFS: &str = "<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'>
  <name>nfs</name>
  <uuid>7b0a1f5e-6c1d-4b8e-9a2f-3c4d5e6f7a8b</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
    <host name='nfs.example.com'/>
    <dir path='/export/vms'/>
    <format type='nfs'/>
    <protocol ver='4'/>
  </source>
  <target>
    <path>/mnt/nfs-vms</path>
    <permissions>
      <mode>0755</mode>
      <owner>107</owner>
      <group>107</group>
    </permissions>
  </target>
  <fs:mount_opts>
    <fs:option name='sync'/>
    <fs:option name='lazytime'/>
  </fs:mount_opts>
</pool>
";

const FS: &str = "<pool type='fs'>
  <name>disk2</name>
  <source>
    <device path='/dev/vdb1'/>
    <format type='ext4'/>
  </source>
  <target>
    <path>/mnt/disk2</path>
  </target>
</pool>
";

#[test]
fn pool_xml_validates_and_roundtrips() {
    let check = have_validator();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let reg = Registry::open(RegistryPaths::new(d.join("cfg")).without_libvirt()).unwrap();
    // Forms libvirt writes: parsed, kept, written back identically in
    // content.
    for (name, text) in [("nfs", NETFS), ("disk2", FS)] {
        let def = PoolDef::from_xml(text, name).unwrap();
        let p = reg.define(def.clone()).unwrap();
        let stored = std::fs::read_to_string(d.join(format!("cfg/{name}.xml"))).unwrap();
        assert_eq!(PoolDef::from_xml(&stored, "stored").unwrap(), def);
        assert_eq!(p.def(), &def);
        if name == "nfs" {
            assert!(stored.contains("<fs:option name='lazytime'/>"), "{stored}");
            assert!(stored.contains("xmlns:fs="), "{stored}");
        }
        if check {
            validate(d, &format!("{name}-config.xml"), &stored, "storagepool");
            validate(d, &format!("{name}-live.xml"), &p.xml_desc().unwrap(), "storagepool");
        }
        // fs/netfs pools are not mounted here: start is refused, nothing
        // is mounted.
        let err = p.start().unwrap_err();
        assert!(err.to_string().contains("not mounted") || err.to_string().contains("build it first"), "{err}");
    }
    // A dir pool, live and defined.
    let p = reg.define(PoolDef::dir("images", d.join("images")).unwrap()).unwrap();
    p.build().unwrap();
    p.start().unwrap();
    if check {
        validate(d, "dir-config.xml", &std::fs::read_to_string(d.join("cfg/images.xml")).unwrap(), "storagepool");
        validate(d, "dir-live.xml", &p.xml_desc().unwrap(), "storagepool");
        validate(d, "dir-def.xml", &p.def().to_xml(), "storagepool");
    }

    // Volumes of every kind vdisk describes.
    let t = p.canonical_target();
    p.create_volume(&VolumeSpec::new("a.raw", 1 << 20, Format::Raw).unwrap(), None).unwrap();
    let base = p
        .create_volume(
            &VolumeSpec::new("b.qcow2", 1 << 30, Format::Qcow2).unwrap().qcow2_option("lazy_refcounts", "on"),
            None,
        )
        .unwrap();
    p.create_volume(&VolumeSpec::new("c.qcow2", 0, Format::Qcow2).unwrap().backing(base.path(), Format::Qcow2), None)
        .unwrap();
    let mut enc = VolumeSpec::new("e.qcow2", 1 << 20, Format::Qcow2).unwrap().qcow2_option("compat", "0.10");
    enc.encryption = Some(vdisk::Secret::new(b"secret".to_vec()));
    enc.encryption_format = vdisk::pool::VolumeEncryption::Qcow;
    p.create_volume(&enc, None).unwrap();
    p.create_volume(&VolumeSpec::new("d.vmdk", 1 << 20, Format::Vmdk).unwrap(), None).unwrap();
    std::fs::create_dir(t.join("subdir")).unwrap();
    std::os::unix::fs::symlink("a.raw", t.join("alias")).unwrap();
    std::fs::write(t.join("weird & <name>'"), b"x").unwrap();
    let vols = p.volumes().unwrap();
    assert_eq!(vols.len(), 8);
    for v in &vols {
        let xml = p.volume(&v.name).unwrap().describe().unwrap();
        if check {
            validate(
                d,
                &format!("vol-{}.xml", v.name_lossy().replace(['/', ' ', '&', '<', '>', '\''], "_")),
                &xml,
                "storagevol",
            );
        }
        // What vdisk writes, it reads back.
        if v.kind == vdisk::pool::VolType::File && v.name_lossy() != "e.qcow2" {
            let spec = vdisk::pool::volxml::spec_from_xml(&xml, None).unwrap();
            assert_eq!(spec.capacity, v.capacity);
            assert_eq!(Some(spec.format), v.format);
        }
    }
    let c = p.volume("c.qcow2").unwrap().describe().unwrap();
    assert!(c.contains("<backingStore>"), "{c}");
    let e = p.volume("e.qcow2").unwrap().describe().unwrap();
    assert!(e.contains("<encryption format='qcow'/>"), "{e}");
    assert!(e.contains("<compat>0.10</compat>"), "{e}");
    let b = p.volume("b.qcow2").unwrap().describe().unwrap();
    assert!(b.contains("<lazy_refcounts/>"), "{b}");
}
