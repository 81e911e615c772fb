//! Every command the README shows runs verbatim: the `sh` blocks of "The
//! command line" and "Storage pools" sections run, top to bottom, in an
//! empty directory with a fresh home (so `~/vm-images` and the pool
//! definitions are the test's own), with this build's `vdisk` first on the
//! PATH. A README line that names a file nothing created fails here.

mod common;

use std::process::Command;

use common::*;

/// The `sh` code blocks between `## The command line` and the next `## `.
fn runnable_blocks(readme: &str) -> Vec<String> {
    let start = readme.find("## The command line").expect("README has a command line section");
    let rest = &readme[start..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    let section = &rest[..end];
    let mut blocks = Vec::new();
    let mut it = section.split("```");
    it.next();
    while let (Some(code), _) = (it.next(), it.next()) {
        if let Some(body) = code.strip_prefix("sh\n") {
            blocks.push(body.to_string());
        }
    }
    blocks
}

#[test]
fn readme_commands_run_verbatim() {
    if !have_qemu() {
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks = runnable_blocks(&readme);
    assert!(blocks.len() >= 2, "README command blocks not found");
    let d = tmp();
    let home = d.path().join("home");
    let work = d.path().join("work");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let bin_dir = vdisk_bin().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    for block in &blocks {
        for line in block.lines().filter(|l| !l.trim().is_empty()) {
            let out = Command::new("bash")
                .args(["-e", "-o", "pipefail", "-c", line])
                .current_dir(&work)
                .env("PATH", &path)
                .env("HOME", &home)
                .env_remove("XDG_CONFIG_HOME")
                .env_remove("VDISK_CONFIG_DIR")
                .env("VDISK_LIBVIRT_DIR", "")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "README line failed ({}):\n{line}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // What the README's verbs wrote is clean and what they copied is equal.
    for img in [
        "disk.qcow2",
        "overlay.qcow2",
        "disk-z.qcow2",
        "thin.qcow2",
        "enc.qcow2",
        "vm.qcow2",
        "shared-store/guest.qcow2",
    ] {
        let (code, out) = qemu_check(&work.join(img), "qcow2");
        assert!(code == 0 || img == "enc.qcow2", "{img}: {out}");
    }
    let (code, o, e) =
        run_status_in(&work, "qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", "overlay.qcow2", "thin.qcow2"]);
    assert_eq!(code, 0, "{o}{e}");
    assert!(home.join("vm-images/debian.qcow2").exists());
    // The incremental backup copied exactly the two dirty ranges.
    for (name, len) in [("delta-16777216.raw", 65536), ("delta-41943040.raw", 131072)] {
        assert_eq!(std::fs::metadata(work.join(name)).map(|m| m.len()).ok(), Some(len), "{name}");
    }
    assert_eq!(
        std::fs::read_dir(&work)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("delta-"))
            .count(),
        2
    );
}

/// `run_status` in a directory.
fn run_status_in(dir: &std::path::Path, cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd).args(args).current_dir(dir).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
