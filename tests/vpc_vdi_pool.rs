//! Pool volumes in VHD (`vpc`, also read as libvirt's `vhd`) and VDI: made
//! from volume XML, described in XML libvirt's storagevol schema accepts,
//! readable by qemu-img in the named format, and cloned to and from qcow2.

mod common;

use std::process::Command;

use common::*;
use vdisk::pool::{CloneOptions, PoolDef, Registry, RegistryPaths};
use vdisk::{BlockDevice, Format, OpenOptions};

fn validate(dir: &std::path::Path, xml: &str) {
    let ok = Command::new("xmllint").arg("--version").output().is_ok_and(|o| o.status.success())
        && Command::new("virt-xml-validate").arg("--help").output().is_ok();
    if !ok {
        if std::env::var("VDISK_SKIP_LIBVIRT").as_deref() == Ok("1") {
            return;
        }
        panic!("virt-xml-validate and xmllint are needed: apt-get install -y --no-install-recommends libvirt-clients libxml2-utils (or set VDISK_SKIP_LIBVIRT=1)");
    }
    let f = dir.join("vol.xml");
    std::fs::write(&f, xml).unwrap();
    let out = Command::new("virt-xml-validate").arg(&f).arg("storagevol").output().unwrap();
    assert!(out.status.success(), "{xml}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn vpc_and_vdi_volumes() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let reg = Registry::open(RegistryPaths::new(d.path().join("cfg")).without_libvirt()).unwrap();
    let p = reg.define(PoolDef::dir("images", d.path().join("images")).unwrap()).unwrap();
    p.build().unwrap();
    p.start().unwrap();
    for (name, xml_fmt, fmt) in
        [("a.vhd", "vpc", Format::Vpc), ("b.vhd", "vhd", Format::Vpc), ("c.vdi", "vdi", Format::Vdi)]
    {
        let xml = format!(
            "<volume><name>{name}</name><capacity unit='MiB'>10</capacity><target><format type='{xml_fmt}'/></target></volume>"
        );
        validate(d.path(), &xml);
        let spec = vdisk::pool::volxml::spec_from_xml(&xml, None).unwrap();
        assert_eq!(spec.format, fmt);
        let v = p.create_volume(&spec, None).unwrap();
        let desc = p.volume(name).unwrap().describe().unwrap();
        validate(d.path(), &desc);
        assert!(desc.contains(&format!("<format type='{}'/>", fmt.name())), "{desc}");
        let info = qemu_img(&["info", "-f", fmt.name(), "--output=json", &v.path().display().to_string()]);
        let q: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert!(q["virtual-size"].as_u64().unwrap() >= 10 << 20, "{info}");
    }
    // qcow2 with data -> vpc and vdi clones -> qcow2 again, same guest bytes.
    let src = p.create_volume(&vdisk::pool::VolumeSpec::new("s.qcow2", 4 << 20, Format::Qcow2).unwrap(), None).unwrap();
    {
        let img = OpenOptions::new().format(Format::Qcow2).open(src.path()).unwrap();
        img.write_at(&pattern(3, 300_000), 1 << 20).unwrap();
        img.close().unwrap();
    }
    for (name, fmt) in [("s.vhd", Format::Vpc), ("s.vdi", Format::Vdi)] {
        let c = p.clone_volume(&src, name, &CloneOptions { format: Some(fmt), progress: None }).unwrap();
        let (code, out, err) = run_status(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                fmt.name(),
                &src.path().display().to_string(),
                &c.path().display().to_string(),
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        let back = p
            .clone_volume(&c, &format!("{name}.qcow2"), &CloneOptions { format: Some(Format::Qcow2), progress: None })
            .unwrap();
        let (code, out, err) = run_status(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                &src.path().display().to_string(),
                &back.path().display().to_string(),
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
    }
}
