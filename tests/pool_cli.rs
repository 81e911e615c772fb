//! The `vdisk` pool and volume commands as a virsh user types them: the
//! argument forms, units, tables and messages (layouts taken from virsh
//! 9.0 against libvirt's test driver), and errors as `error:` lines.

use std::path::Path;
use std::process::Command;

mod common;

use common::VirshCli as Cli;

#[test]
fn a_virsh_users_session() {
    let c = Cli::new();
    let images = c.root.join("images");
    let t = images.to_str().unwrap();
    assert_eq!(c.ok(&["pool-define-as", "default", "dir", "--target", t]), "Pool default defined\n\n");
    assert_eq!(c.ok(&["pool-build", "default"]), "Pool default built\n\n");
    assert_eq!(c.ok(&["pool-start", "default"]), "Pool default started\n\n");
    assert_eq!(c.ok(&["pool-autostart", "default"]), "Pool default marked as autostarted\n\n");
    assert_eq!(
        c.ok(&["pool-list", "--all"]),
        " Name      State    Autostart\n-------------------------------\n default   active   yes\n\n"
    );
    let details = c.ok(&["pool-list", "--all", "--details"]);
    assert!(details.starts_with(" Name      State     Autostart   Persistent   Capacity"), "{details}");
    let info = c.ok(&["pool-info", "default", "--bytes"]);
    assert!(info.starts_with("Name:           default\nUUID:           "), "{info}");
    assert!(
        info.contains("State:          running\nPersistent:     yes\nAutostart:      yes\nCapacity:       "),
        "{info}"
    );

    assert_eq!(
        c.ok(&["vol-create-as", "default", "kvm1.qcow2", "8G", "--format", "qcow2", "--allocation", "1M"]),
        "Vol kvm1.qcow2 created\n\n"
    );
    // virsh units: GB is 10^9, G is 2^30.
    c.ok(&["vol-create-as", "default", "ten.raw", "10GB"]);
    c.ok(&[
        "vol-create-as",
        "default",
        "clone.qcow2",
        "0",
        "--backing-vol",
        "kvm1.qcow2",
        "--backing-vol-format",
        "qcow2",
    ]);
    let info = c.ok(&["vol-info", "--pool", "default", "ten.raw", "--bytes"]);
    assert_eq!(
        info,
        "Name:           ten.raw\nType:           file\nCapacity:       10000000000 bytes\nAllocation:     0 bytes\n\n"
    );
    let info = c.ok(&["vol-info", "--pool", "default", "kvm1.qcow2"]);
    assert!(info.contains("Capacity:       8.00 GiB\n"), "{info}");
    let list = c.ok(&["vol-list", "default"]);
    let p = |n: &str| images.join(n).display().to_string();
    let w = p("clone.qcow2").len().max(4);
    let expect = format!(
        " Name          Path\n{}\n {:<12}  {}\n {:<12}  {}\n {:<12}  {}\n\n",
        "-".repeat(11 + 3 + w + 3),
        "clone.qcow2",
        p("clone.qcow2"),
        "kvm1.qcow2",
        p("kvm1.qcow2"),
        "ten.raw",
        p("ten.raw")
    );
    assert_eq!(list, expect);
    let det = c.ok(&["vol-list", "--pool", "default", "--details"]);
    assert!(det.lines().nth(2).unwrap().contains("   file   8.00 GiB   "), "{det}");
    assert!(det.contains("9.31 GiB"), "{det}");

    // Lookup forms: --pool NAME, a path, a relative path (key == path).
    let xml = c.ok(&["vol-dumpxml", "--pool", "default", "clone.qcow2"]);
    assert!(xml.contains(&format!("<key>{}</key>", p("clone.qcow2"))), "{xml}");
    assert!(xml.contains("<backingStore>"), "{xml}");
    assert_eq!(c.ok(&["vol-path", "--pool", "default", "kvm1.qcow2"]), format!("{}\n", p("kvm1.qcow2")));
    assert_eq!(c.ok(&["vol-key", &p("kvm1.qcow2")]), format!("{}\n", p("kvm1.qcow2")));
    assert_eq!(c.ok(&["vol-name", &p("kvm1.qcow2")]), "kvm1.qcow2\n");
    assert_eq!(c.ok(&["vol-name", "images/kvm1.qcow2"]), "kvm1.qcow2\n");

    // Resize with --delta, shrink only when asked.
    assert_eq!(
        c.ok(&["vol-resize", "ten.raw", "1G", "--pool", "default", "--delta"]),
        "Size of volume 'ten.raw' successfully changed to 1G\n\n"
    );
    let err = c.fails(&["vol-resize", "ten.raw", "1G", "--pool", "default"]);
    assert!(err.starts_with("error: Failed to change size of volume 'ten.raw' to 1G\nerror: "), "{err}");
    assert!(err.contains("shrink"), "{err}");
    c.ok(&["vol-resize", "ten.raw", "1G", "--pool", "default", "--shrink"]);

    // Upload / download, sparse.
    let src = c.root.join("in.img");
    let mut data = vec![0u8; 4 << 20];
    data[1 << 20..(1 << 20) + 5].copy_from_slice(b"hello");
    std::fs::write(&src, &data).unwrap();
    c.ok(&["vol-upload", "--pool", "default", "ten.raw", src.to_str().unwrap(), "--sparse"]);
    let out = c.root.join("out.img");
    c.ok(&["vol-download", "--pool", "default", "ten.raw", out.to_str().unwrap(), "--length", "4M", "--sparse"]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let dl = c.ok(&["vol-download", "--pool", "default", "ten.raw", "-", "--offset", "1M", "--length", "5"]);
    assert_eq!(dl, "hello");

    assert_eq!(c.ok(&["vol-wipe", "--pool", "default", "ten.raw"]), "Vol ten.raw wiped\n\n");
    assert_eq!(
        c.ok(&["vol-clone", "kvm1.qcow2", "export.vmdk", "--pool", "default", "--format", "vmdk"]),
        "Vol export.vmdk cloned from kvm1.qcow2\n\n"
    );
    let xmlfile = c.root.join("v.xml");
    std::fs::write(&xmlfile, "<volume><name>fromxml.qcow2</name><capacity unit='M'>64</capacity><target><format type='qcow2'/></target></volume>").unwrap();
    assert_eq!(
        c.ok(&["vol-create", "default", xmlfile.to_str().unwrap()]),
        format!("Vol fromxml.qcow2 created from {}\n\n", xmlfile.display())
    );
    let printed = c.ok(&["vol-create-as", "default", "p.qcow2", "1G", "--format", "qcow2", "--print-xml"]);
    assert!(printed.starts_with("<volume>\n  <name>p.qcow2</name>"), "{printed}");
    assert!(!images.join("p.qcow2").exists());

    // Errors: virsh's two lines, exit code 1.
    let err = c.fails(&["vol-create-as", "default", "kvm1.qcow2", "1G"]);
    assert!(err.starts_with("error: Failed to create vol kvm1.qcow2\nerror: "), "{err}");
    assert!(err.contains("exists already"), "{err}");
    let err = c.fails(&["vol-create-as", "default", "../evil", "1G"]);
    assert!(err.contains("invalid volume name"), "{err}");
    let err = c.fails(&["vol-create-as", "default", "b.qcow2", "1G", "--backing-vol", "kvm1.qcow2"]);
    assert!(err.contains("--backing-vol-format is required"), "{err}");
    let err = c.fails(&["vol-create-as", "default", "x", "1Q"]);
    assert!(err.contains("unknown size unit"), "{err}");
    let err = c.fails(&["pool-info", "nosuch"]);
    assert!(err.contains("no storage pool with matching name or uuid 'nosuch'"), "{err}");
    let err = c.fails(&["pool-undefine", "default"]);
    assert!(err.starts_with("error: Failed to undefine pool default\nerror: "), "{err}");

    for v in ["clone.qcow2", "kvm1.qcow2", "ten.raw", "export.vmdk", "fromxml.qcow2"] {
        assert_eq!(c.ok(&["vol-delete", "--pool", "default", v]), format!("Vol {v} deleted\n\n"));
    }
    assert_eq!(c.ok(&["pool-destroy", "default"]), "Pool default destroyed\n\n");
    assert_eq!(
        c.ok(&["pool-list", "--all"]),
        " Name      State      Autostart\n---------------------------------\n default   inactive   yes\n\n"
    );
    assert_eq!(c.ok(&["pool-delete", "default"]), "Pool default deleted\n\n");
    assert!(!Path::new(t).exists());
    assert_eq!(c.ok(&["pool-autostart", "default", "--disable"]), "Pool default unmarked as autostarted\n\n");
    assert_eq!(c.ok(&["pool-undefine", "default"]), "Pool default has been undefined\n\n");
    assert_eq!(c.ok(&["pool-list", "--all"]), " Name   State   Autostart\n---------------------------\n\n");
}

#[test]
fn pool_define_from_file_and_dumpxml() {
    let c = Cli::new();
    let f = c.root.join("p.xml");
    let target = c.root.join("t");
    std::fs::write(
        &f,
        format!("<pool type='dir'><name>fromfile</name><target><path>{}</path></target></pool>", target.display()),
    )
    .unwrap();
    assert_eq!(c.ok(&["pool-define", f.to_str().unwrap()]), format!("Pool fromfile defined from {}\n\n", f.display()));
    c.ok(&["pool-start", "fromfile", "--build"]);
    let xml = c.ok(&["pool-dumpxml", "fromfile"]);
    assert!(xml.contains("<available unit='bytes'>"), "{xml}");
    let inactive = c.ok(&["pool-dumpxml", "fromfile", "--inactive"]);
    assert!(inactive.contains("<capacity unit='bytes'>0</capacity>"), "{inactive}");
    // The same target under another name is refused.
    let err = c.fails(&["pool-define-as", "other", "dir", "--target", target.to_str().unwrap()]);
    assert!(err.contains("Storage source conflict with pool: 'fromfile'"), "{err}");
    // A --config-dir of its own starts empty.
    let o = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .env("VDISK_LIBVIRT_DIR", "")
        .args(["pool-list", "--all", "--name", "--config-dir", c.root.join("elsewhere").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "\n");
}
