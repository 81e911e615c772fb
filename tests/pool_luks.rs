//! LUKS volumes in pools, as libvirt makes them: `vol-create-as` with a
//! passphrase file and `vol-create` from a `<volume>` document with
//! `<encryption format='luks'>` (and its `<cipher>`/`<ivgen>`), both for a
//! standalone LUKS volume (libvirt's raw + luks) and a qcow2 with
//! `encrypt.format=luks`. qemu-img is the judge of what was created.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::VirshCli;

/// A started dir pool `default` and a passphrase file `pw`.
fn setup() -> VirshCli {
    let c = VirshCli::new();
    let t = c.root.join("images");
    c.ok(&["pool-define-as", "default", "dir", "--target", t.to_str().unwrap()]);
    c.ok(&["pool-start", "default", "--build"]);
    std::fs::write(c.root.join("pw"), "correct horse").unwrap();
    c
}

fn vol(c: &VirshCli, name: &str) -> PathBuf {
    c.root.join("images").join(name)
}

fn pw(c: &VirshCli) -> String {
    c.root.join("pw").to_str().unwrap().to_string()
}

/// qemu-img with the passphrase as a secret object, over `--image-opts`.
fn qemu_img(pw: &str, verb: &str, opts: &str, extra: &[&str]) -> Output {
    Command::new("qemu-img")
        .arg(verb)
        .args(extra)
        .args(["--object", &format!("secret,id=sec0,file={pw}"), "--image-opts", opts])
        .output()
        .unwrap()
}

fn qemu_info(pw: &str, opts: &str) -> serde_json::Value {
    let o = qemu_img(pw, "info", opts, &["--output=json"]);
    assert!(o.status.success(), "qemu-img info {opts}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn validate(dir: &Path, name: &str, xml: &str) {
    if Command::new("virt-xml-validate").arg("--help").output().is_err() {
        assert_eq!(std::env::var("VDISK_SKIP_LIBVIRT").as_deref(), Ok("1"), "virt-xml-validate is missing");
        return;
    }
    let f = dir.join(name);
    std::fs::write(&f, xml).unwrap();
    let out = Command::new("virt-xml-validate").arg(&f).arg("storagevol").output().unwrap();
    assert!(out.status.success(), "{name} does not validate:\n{xml}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn vol_create_as_makes_luks_volumes_qemu_opens() {
    let c = setup();
    let pw = pw(&c);
    // raw + passphrase: a standalone LUKS volume (qemu-img create -f luks).
    c.ok(&["vol-create-as", "default", "enc.img", "64M", "--passphrase-file", &pw, "-o", "iter-time=10"]);
    let img = vol(&c, "enc.img");
    let opts = format!("driver=luks,file.filename={},key-secret=sec0", img.display());
    let info = qemu_info(&pw, &opts);
    assert_eq!(info["virtual-size"], 64 << 20, "{info}");
    assert_eq!(info["format-specific"]["data"]["cipher-alg"], "aes-256", "{info}");
    // Written by qemu, read by vdisk through the pool's view.
    let o = Command::new("qemu-io")
        .args(["--object", &format!("secret,id=sec0,file={pw}"), "--image-opts", &opts, "-c", "write -P 0x5a 1M 64k"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = c.ok(&[
        "io",
        "--object",
        &format!("secret,id=sec0,file={pw}"),
        "--image-opts",
        &opts,
        "-c",
        "read -P 0x5a 1M 64k",
    ]);
    assert!(o.contains("read 65536/65536 bytes"), "{o}");
    let xml = c.ok(&["vol-dumpxml", "enc.img", "--pool", "default"]);
    assert!(xml.contains("<encryption format='luks'/>"), "{xml}");
    validate(&c.root, "enc.xml", &xml);
    let listed = c.ok(&["vol-list", "default", "--details"]);
    assert!(listed.contains("enc.img") && listed.contains("64.00 MiB"), "{listed}");

    // qcow2 + passphrase: encrypt.format=luks, clean by qemu-img check.
    c.ok(&[
        "vol-create-as",
        "default",
        "enc.qcow2",
        "64M",
        "--format",
        "qcow2",
        "--passphrase-file",
        &pw,
        "-o",
        "encrypt.iter-time=10",
    ]);
    let q = vol(&c, "enc.qcow2");
    let qopts = format!("driver=qcow2,file.filename={},encrypt.key-secret=sec0", q.display());
    let info = qemu_info(&pw, &qopts);
    assert_eq!(info["format-specific"]["data"]["encrypt"]["format"], "luks", "{info}");
    let o = qemu_img(&pw, "check", &qopts, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let xml = c.ok(&["vol-dumpxml", "enc.qcow2", "--pool", "default"]);
    assert!(xml.contains("<encryption format='luks'/>"), "{xml}");
    validate(&c.root, "encq.xml", &xml);

    // Legacy AES only on request, and only for qcow2.
    c.ok(&[
        "vol-create-as",
        "default",
        "old.qcow2",
        "8M",
        "--format",
        "qcow2",
        "--passphrase-file",
        &pw,
        "--encryption-format",
        "qcow",
    ]);
    let xml = c.ok(&["vol-dumpxml", "old.qcow2", "--pool", "default"]);
    assert!(xml.contains("<encryption format='qcow'/>"), "{xml}");
    let e = c.fails(&[
        "vol-create-as",
        "default",
        "bad.img",
        "8M",
        "--passphrase-file",
        &pw,
        "--encryption-format",
        "qcow",
    ]);
    assert!(e.contains("qcow encryption applies to qcow2 volumes only"), "{e}");
    let e = c.fails(&["vol-create-as", "default", "bad.img", "8M", "--format", "luks"]);
    assert!(e.contains("needs a passphrase"), "{e}");
    let e = c.fails(&["vol-create-as", "default", "bad.img", "8M", "--passphrase-file", &pw, "-o", "cluster_size=4k"]);
    assert!(e.contains("cluster_size") && e.contains("luks"), "{e}");
    assert!(!vol(&c, "bad.img").exists());

    // --print-xml says what would be made, and it validates.
    let printed = c.ok(&["vol-create-as", "default", "p.img", "1G", "--passphrase-file", &pw, "--print-xml"]);
    assert!(
        printed.contains("<encryption format=\"luks\"/>") || printed.contains("<encryption format='luks'/>"),
        "{printed}"
    );
    validate(&c.root, "printed.xml", &printed);
}

#[test]
fn vol_create_from_libvirt_xml_with_cipher_and_ivgen() {
    let c = setup();
    let pw = pw(&c);
    // What libvirt's documentation shows for a LUKS volume; the secret
    // object's UUID is accepted and the passphrase comes from the file.
    let doc = "<volume>
  <name>cbc.img</name>
  <capacity unit='M'>16</capacity>
  <target>
    <format type='raw'/>
    <encryption format='luks'>
      <secret type='passphrase' uuid='f52a81b2-424e-490c-823d-6bd4235bc572'/>
      <cipher name='aes' size='128' mode='cbc' hash='sha1'/>
      <ivgen name='essiv' hash='sha256'/>
    </encryption>
  </target>
</volume>
";
    validate(&c.root, "in.xml", doc);
    let f = c.root.join("in.xml");
    // Without a passphrase: a clear error, nothing created.
    let e = c.fails(&["vol-create", "default", f.to_str().unwrap()]);
    assert!(e.contains("needs a passphrase"), "{e}");
    assert!(!vol(&c, "cbc.img").exists());
    // The iteration time comes from the default (2 s), as libvirt's does.
    c.ok(&["vol-create", "default", f.to_str().unwrap(), "--passphrase-file", &pw]);
    let opts = format!("driver=luks,file.filename={},key-secret=sec0", vol(&c, "cbc.img").display());
    let d = qemu_info(&pw, &opts)["format-specific"]["data"].clone();
    assert_eq!(d["cipher-alg"], "aes-128", "{d}");
    assert_eq!(d["cipher-mode"], "cbc", "{d}");
    assert_eq!(d["ivgen-alg"], "essiv", "{d}");
    assert_eq!(d["ivgen-hash-alg"], "sha256", "{d}");
    assert_eq!(d["hash-alg"], "sha1", "{d}");
    // The same document as qcow2: encrypt.* options.
    let q = doc.replace("cbc.img", "cbc.qcow2").replace("type='raw'", "type='qcow2'");
    std::fs::write(&f, q).unwrap();
    c.ok(&["vol-create", "default", f.to_str().unwrap(), "--passphrase-file", &pw]);
    let qopts = format!("driver=qcow2,file.filename={},encrypt.key-secret=sec0", vol(&c, "cbc.qcow2").display());
    let d = qemu_info(&pw, &qopts)["format-specific"]["data"]["encrypt"].clone();
    assert_eq!(d["cipher-alg"], "aes-128", "{d}");
    assert_eq!(d["hash-alg"], "sha1", "{d}");
    // luks2 (libvirt's schema has it; QEMU does not create it) refused by name.
    let l2 = doc.replace("cbc.img", "l2.img").replace("format='luks'", "format='luks2'");
    std::fs::write(&f, l2).unwrap();
    let e = c.fails(&["vol-create", "default", f.to_str().unwrap(), "--passphrase-file", &pw]);
    assert!(e.contains("'luks2' is not supported"), "{e}");
}
