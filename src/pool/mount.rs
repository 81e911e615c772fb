//! Mounting the source of `fs` and `netfs` pools the way libvirt does
//! (`storage_util.c`): the system's `mount` with libvirt's source syntax and
//! options, `umount` on destroy, `/proc/self/mountinfo` to check.
//!
//! | pool | source | `-t` | options |
//! |---|---|---|---|
//! | netfs, format nfs | `HOST:DIR` | `nfs` | `nodev,nosuid,noexec`, `nfsvers=V` from `<protocol ver>` |
//! | netfs, format glusterfs | `HOST:DIR` | `glusterfs` | `nodev,nosuid,noexec,direct-io-mode=1` |
//! | netfs, format cifs | `//HOST/DIR` | `cifs` | `nodev,nosuid,noexec,guest` |
//! | netfs, format auto or none | `HOST:DIR` | (none) | `nodev,nosuid,noexec` |
//! | fs | the device | the format, unless auto | `nodev,nosuid,noexec` |
//!
//! `<fs:mount_opts>` options are appended. Every piece comes from a pool
//! definition someone else may have written: a host, path or option that
//! could be read as a `mount` flag, or that holds a comma, white space or
//! a control character, is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::def::{PoolDef, PoolType};
use crate::error::{Error, ErrorKind, Result};

/// The options libvirt always mounts pool sources with.
const DEFAULT_OPTS: &str = "nodev,nosuid,noexec";

/// The `mount` command line for `def`'s source on `target` (`None` for a
/// `dir` pool).
pub(crate) fn mount_args(def: &PoolDef, target: &Path) -> Result<Option<Vec<String>>> {
    let src = def.source();
    let what = |field: &'static str, v: &str| -> Result<()> {
        if v.is_empty() || v.starts_with('-') || v.chars().any(|c| c.is_control() || c.is_whitespace() || c == ',') {
            return Err(Error::invalid_argument(format!(
                "pool '{}': {field} '{}' cannot be passed to mount (empty, a leading '-', a comma, white space or a control character)",
                def.name(),
                v.escape_debug()
            ))
            .with_field(field));
        }
        Ok(())
    };
    let format = src.format.as_deref().filter(|f| *f != "auto");
    let mut opts = DEFAULT_OPTS.to_string();
    let source = match def.kind() {
        PoolType::Dir => return Ok(None),
        PoolType::Fs => {
            let dev = src.device.as_deref().unwrap_or_default();
            what("source/device", dev)?;
            dev.to_string()
        }
        PoolType::Netfs => {
            let host = src.host.as_deref().unwrap_or_default();
            let dir = src.dir.as_deref().unwrap_or_default();
            what("source/host", host)?;
            what("source/dir", dir)?;
            match format {
                Some("cifs") => {
                    opts.push_str(",guest");
                    format!("//{host}/{}", dir.trim_start_matches('/'))
                }
                Some("glusterfs") => {
                    opts.push_str(",direct-io-mode=1");
                    format!("{host}:{dir}")
                }
                _ => format!("{host}:{dir}"),
            }
        }
    };
    if let (PoolType::Netfs, Some("nfs"), Some(v)) = (def.kind(), format, src.protocol_ver.as_deref()) {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(Error::invalid_argument(format!(
                "pool '{}': protocol version '{}' is not a number",
                def.name(),
                v.escape_debug()
            ))
            .with_field("source/protocol"));
        }
        opts.push_str(&format!(",nfsvers={v}"));
    }
    for o in &src.mount_opts {
        what("fs:mount_opts/fs:option", o)?;
        // Options that make mount do something else than mount the source
        // (or undo the safety options before them) are refused.
        let name = o.split('=').next().unwrap_or_default();
        if ["bind", "rbind", "move", "remount", "exec", "suid", "dev"].contains(&name) {
            return Err(Error::invalid_argument(format!(
                "pool '{}': mount option '{}' is not allowed (pools mount with nodev,nosuid,noexec)",
                def.name(),
                o.escape_debug()
            ))
            .with_field("fs:mount_opts/fs:option"));
        }
        opts.push(',');
        opts.push_str(o);
    }
    if let Some(f) = format {
        what("source/format", f)?;
    }
    let t = target
        .to_str()
        .ok_or_else(|| Error::invalid_argument("the pool target is not UTF-8").with_path(target))?
        .to_string();
    let mut args = Vec::new();
    if let Some(f) = format {
        args.extend(["-t".to_string(), f.to_string()]);
    }
    args.extend([source, t, "-o".to_string(), opts]);
    Ok(Some(args))
}

/// What `mountinfo` lists as the source of a mount of `def`'s source: for
/// comparisons (`host:vol` and `host:/vol` are one GlusterFS volume).
pub(crate) fn source_key(def: &PoolDef) -> Option<String> {
    let src = def.source();
    match def.kind() {
        PoolType::Dir => None,
        PoolType::Fs => src.device.clone(),
        PoolType::Netfs if src.format.as_deref() == Some("cifs") => Some(format!(
            "//{}/{}",
            src.host.as_deref().unwrap_or_default(),
            src.dir.as_deref().unwrap_or_default().trim_start_matches('/')
        )),
        PoolType::Netfs => {
            Some(format!("{}:{}", src.host.as_deref().unwrap_or_default(), src.dir.as_deref().unwrap_or_default()))
        }
    }
    .map(|s| normalize_source(&s))
}

/// `host:vol` → `host:/vol`; no trailing `/`.
fn normalize_source(s: &str) -> String {
    let mut s = s.trim_end_matches('/').to_string();
    if !s.starts_with('/') {
        if let Some(i) = s.find(':') {
            if !s[i + 1..].starts_with('/') {
                s.insert(i + 1, '/');
            }
        }
    }
    s
}

/// One line of `/proc/self/mountinfo`: mount point and source, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub mount_point: PathBuf,
    pub source: String,
    pub fstype: String,
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Parses mountinfo text (malformed lines are skipped).
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    use std::os::unix::ffi::OsStringExt;
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let mp = f.get(4)?;
            Some(MountEntry {
                mount_point: PathBuf::from(std::ffi::OsString::from_vec(unescape(mp))),
                fstype: String::from_utf8_lossy(&unescape(f.get(sep + 1)?)).into_owned(),
                source: String::from_utf8_lossy(&unescape(f.get(sep + 2)?)).into_owned(),
            })
        })
        .collect()
}

/// The mounts of this process's namespace.
pub(crate) fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse_mountinfo(&t)).unwrap_or_default()
}

/// The filesystem type of the mount holding `path` (an absolute, canonical
/// path): the deepest mount point above it, the last mounted there.
pub(crate) fn fstype_of(path: &Path, mounts: &[MountEntry]) -> Option<String> {
    let mut best: Option<&MountEntry> = None;
    for m in mounts {
        if path.starts_with(&m.mount_point)
            && best.is_none_or(|b| m.mount_point.components().count() >= b.mount_point.components().count())
        {
            best = Some(m);
        }
    }
    best.map(|m| m.fstype.clone())
}

/// Whether `entry` mounts the source whose key is `key`.
/// A device given by another name (`/dev/disk/by-uuid/...`, a symlink,
/// `/dev/VG/LV` against `/dev/mapper/VG-LV`) is the same source when both
/// names lead to the same block device.
pub(crate) fn same_source(entry: &MountEntry, key: &str) -> bool {
    if normalize_source(&entry.source) == key {
        return true;
    }
    if !(key.starts_with('/') && entry.source.starts_with('/')) {
        return false;
    }
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dev = |p: &str| std::fs::metadata(p).ok().filter(|m| m.file_type().is_block_device()).map(|m| m.rdev());
    matches!((dev(key), dev(&entry.source)), (Some(a), Some(b)) if a == b)
}

/// Whether `target` is a mount point of `key`'s source (the last mount on
/// a mount point is the one seen).
pub(crate) fn is_mounted(target: &Path, key: &str) -> bool {
    mounts().iter().rev().find(|m| m.mount_point == target).is_some_and(|m| same_source(m, key))
}

/// Whether something is mounted on `target`.
pub(crate) fn anything_mounted(target: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mount_point == target)
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// Runs `prog args`; a failure carries its standard error, and says that
/// root is needed when that is the likely reason.
fn run(prog: &str, args: &[String], what: &str) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("cannot run {prog} (is util-linux installed?) to {what}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let line = format!("{prog} {}", args.join(" "));
    let denied = ["only root", "must be superuser", "ermission denied", "not permitted"];
    if !running_as_root() || denied.iter().any(|d| err.contains(d)) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "cannot {what}: {prog} needs root (run as root, or let root run '{line}'){}",
                if err.is_empty() { String::new() } else { format!(": {err}") }
            ),
        ));
    }
    Err(Error::new(ErrorKind::Io, format!("cannot {what}: '{line}' failed ({}): {err}", out.status)))
}

/// Mounts `def`'s source on `target` with the system's `mount`.
pub(crate) fn mount(def: &PoolDef, target: &Path) -> Result<()> {
    let Some(args) = mount_args(def, target)? else {
        return Ok(());
    };
    run("mount", &args, &format!("mount the source of pool '{}'", def.name())).map_err(|e| {
        match args.windows(2).find(|w| w[0] == "-t").map(|w| w[1].as_str()) {
            Some(t) if e.kind() == ErrorKind::Io && !kernel_knows(t) => {
                let what = if t == "nfs" { "NFS client" } else { "CIFS client" };
                Error::new(
                    ErrorKind::Unsupported,
                    format!("{e} (this kernel has no {what}: '{t}' is not in /proc/filesystems and was not loaded)"),
                )
            }
            _ => e,
        }
    })
}

/// Whether the kernel can mount `fstype` (`nfs` or `cifs`; anything else,
/// such as a FUSE helper's type, is assumed known) after mount's attempt,
/// which loads the module where there is one.
fn kernel_knows(fstype: &str) -> bool {
    let names: &[&str] = match fstype {
        "nfs" => &["nfs", "nfs4"],
        "cifs" => &["cifs", "smb3"],
        _ => return true,
    };
    match std::fs::read_to_string("/proc/filesystems") {
        Ok(list) => list.lines().any(|l| names.contains(&l.rsplit('\t').next().unwrap_or(""))),
        Err(_) => true,
    }
}

/// Unmounts `target`.
pub(crate) fn unmount(def: &PoolDef, target: &Path) -> Result<()> {
    let t = target
        .to_str()
        .ok_or_else(|| Error::invalid_argument("the pool target is not UTF-8").with_path(target))?
        .to_string();
    run("umount", &[t], &format!("unmount pool '{}'", def.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(xml: &str) -> PoolDef {
        PoolDef::from_xml(xml, "test").unwrap()
    }

    fn netfs(format: &str, extra: &str) -> String {
        format!(
            "<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'><name>n</name><source><host name='srv'/><dir path='/vol'/><format type='{format}'/>{extra}</source><target><path>/mnt/n</path></target><fs:mount_opts><fs:option name='sync'/></fs:mount_opts></pool>"
        )
    }

    #[test]
    fn mount_lines_are_libvirts() {
        let t = Path::new("/mnt/n");
        let a = mount_args(&def(&netfs("nfs", "<protocol ver='4'/>")), t).unwrap().unwrap();
        assert_eq!(a, ["-t", "nfs", "srv:/vol", "/mnt/n", "-o", "nodev,nosuid,noexec,nfsvers=4,sync"]);
        let a = mount_args(&def(&netfs("glusterfs", "")), t).unwrap().unwrap();
        assert_eq!(a, ["-t", "glusterfs", "srv:/vol", "/mnt/n", "-o", "nodev,nosuid,noexec,direct-io-mode=1,sync"]);
        let a = mount_args(&def(&netfs("cifs", "")), t).unwrap().unwrap();
        assert_eq!(a, ["-t", "cifs", "//srv/vol", "/mnt/n", "-o", "nodev,nosuid,noexec,guest,sync"]);
        let a = mount_args(&def(&netfs("auto", "")), t).unwrap().unwrap();
        assert_eq!(a, ["srv:/vol", "/mnt/n", "-o", "nodev,nosuid,noexec,sync"]);
        let fs = "<pool type='fs'><name>f</name><source><device path='/dev/vdb1'/><format type='ext4'/></source><target><path>/mnt/f</path></target></pool>";
        let a = mount_args(&def(fs), Path::new("/mnt/f")).unwrap().unwrap();
        assert_eq!(a, ["-t", "ext4", "/dev/vdb1", "/mnt/f", "-o", "nodev,nosuid,noexec"]);
        let dir = "<pool type='dir'><name>d</name><target><path>/d</path></target></pool>";
        assert!(mount_args(&def(dir), Path::new("/d")).unwrap().is_none());
    }

    #[test]
    fn hostile_definitions_never_reach_mount_as_flags() {
        let t = Path::new("/mnt/n");
        for (host, dir, opt) in [
            ("-oremount", "/vol", "sync"),
            ("srv", "/vol", "rw,exec"),
            ("srv", "/v ol", "sync"),
            ("srv", "/vol", "--bind"),
            ("srv\n", "/vol", "sync"),
            ("srv", "/vol", "exec"),
            ("srv", "/vol", "suid"),
            ("srv", "/vol", "dev"),
            ("srv", "/vol", "bind"),
            ("srv", "/vol", "remount"),
        ] {
            let x = format!(
                "<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'><name>n</name><source><host name='{host}'/><dir path='{dir}'/><format type='nfs'/></source><target><path>/mnt/n</path></target><fs:mount_opts><fs:option name='{opt}'/></fs:mount_opts></pool>"
            );
            let Ok(d) = PoolDef::from_xml(&x, "t") else { continue };
            let e = mount_args(&d, t).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{host} {dir} {opt}: {e}");
        }
        let bad_ver = def(&netfs("nfs", "<protocol ver='4,exec'/>"));
        assert!(mount_args(&bad_ver, t).is_err());
    }

    #[test]
    fn the_mount_holding_a_path() {
        let text = "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    2 1 0:50 / /mnt rw - tmpfs tmpfs rw\n\
                    3 2 0:51 / /mnt/g rw - fuse.glusterfs h:/v rw\n\
                    4 2 0:52 / /mnt/g rw - nfs4 h:/e rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(fstype_of(Path::new("/mnt/g/pool/x"), &m).as_deref(), Some("nfs4"));
        assert_eq!(fstype_of(Path::new("/mnt/gx"), &m).as_deref(), Some("tmpfs"));
        assert_eq!(fstype_of(Path::new("/var"), &m).as_deref(), Some("ext4"));
        assert_eq!(fstype_of(Path::new("/var"), &[]), None);
    }

    #[test]
    fn mountinfo_is_parsed_and_sources_compared() {
        let text = "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    50 27 0:45 / /mnt/g rw,relatime - fuse.glusterfs localhost:/gv0 rw,user_id=0\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, Path::new("/mnt/parent dir"));
        assert_eq!(m[1].fstype, "fuse.glusterfs");
        assert!(same_source(&m[1], &normalize_source("localhost:gv0")));
        assert!(same_source(&m[1], &normalize_source("localhost:/gv0/")));
        assert!(!same_source(&m[1], &normalize_source("localhost:/gv1")));
        assert!(is_mounted(Path::new("/proc"), "proc"));
    }
}
