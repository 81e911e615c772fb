//! vdisk's own small files in the configuration directory (pool
//! definitions, state markers, the probe cache, format records): written
//! atomically, read with a size bound and without blocking, edited under
//! an exclusive `flock`, and names percent-encoded for their line formats.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::path::Path;

use super::dir::{kind_name, open_nonblocking};
use super::uuid::random_hex;
use crate::error::{Error, Result};

pub(crate) use crate::limits::POOL_MAX_STATE_FILE as MAX_STATE_FILE;

/// Percent-encodes bytes outside a safe set (so names with tabs,
/// newlines or invalid UTF-8 survive a line-based file).
pub(crate) fn enc(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"._-+~:@/=".contains(&c) {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

/// Decodes [`enc`]; `None` for a malformed escape.
pub(crate) fn dec(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Writes `data` to `path` atomically (temp file in the same directory,
/// fsync, rename).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create directory", e).with_path(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id(),
        random_hex(4)?
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| Error::io("cannot write", e).with_path(path))
}

/// A state file as text (invalid UTF-8 replaced), at most
/// [`MAX_STATE_FILE`] bytes; `None` if it does not exist.
pub(crate) fn read_bounded(path: &Path) -> Result<Option<String>> {
    Ok(read_limited(path, MAX_STATE_FILE)?.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// Reads a regular file of at most `max` bytes; `None` if it does not
/// exist. The file is opened without blocking (a FIFO put in its place does
/// not hang us), checked to be a regular file on the open descriptor, and
/// read no further than `max + 1` bytes whatever its size claims.
pub(crate) fn read_limited(path: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match open_nonblocking(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("cannot open", e).with_path(path)),
    };
    let md = f.metadata().map_err(|e| Error::io("cannot stat", e).with_path(path))?;
    if !md.is_file() {
        return Err(Error::invalid_argument(format!("is a {}, not a regular file", kind_name(&md))).with_path(path));
    }
    let mut out = Vec::new();
    f.take(max + 1).read_to_end(&mut out).map_err(|e| Error::io("cannot read", e).with_path(path))?;
    if out.len() as u64 > max {
        return Err(Error::limit(format!("{} is larger than {max} bytes", path.display())));
    }
    Ok(Some(out))
}

/// An exclusive `flock` on the lock file `path` (created, with its
/// directory, if missing), held until the returned file is dropped. `what`
/// names what the lock guards in errors.
pub(crate) fn lock_exclusive(path: &Path, what: &str) -> Result<File> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io("cannot create directory", e).with_path(d))?;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(format!("cannot open the lock file of {what}"), e).with_path(path))?;
    crate::sys::flock(f.as_fd(), true).map_err(|e| Error::io(format!("cannot lock {what}"), e).with_path(path))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_roundtrip() {
        for b in [&b"plain.qcow2"[..], b"tab\there", b"\xff\x00\n%", b"", b"a,b c"] {
            let e = enc(b);
            assert!(!e.contains(['\t', '\n', ',', ' ']));
            assert_eq!(dec(&e).unwrap(), b);
        }
        assert!(dec("%G0").is_none());
        assert!(dec("%4").is_none());
    }
}
