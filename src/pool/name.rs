//! Pool and volume names: what vdisk lets a caller *create*.
//!
//! libvirt rejects only `/` (volumes) and a newline (pools), and skips names
//! with control characters when it scans a directory. vdisk is stricter for
//! names it creates, and says why in each error: a name becomes a file name
//! in the pool directory (or `NAME.xml` in the configuration directory), is
//! passed on command lines and printed in tables.
//!
//! Files already in a pool directory are still *listed* whatever their name
//! (hidden files and spaces included, as libvirt does); see
//! [`crate::pool::Pool::refresh`].

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;

use crate::error::{Error, Result};

/// Prefix of the temporary directories vdisk builds volumes in
/// (`.vdisk-tmp-<random>/<name>`); names starting with it are reserved.
pub const TEMP_PREFIX: &str = ".vdisk-tmp-";

pub use crate::limits::POOL_MAX_NAME_BYTES as MAX_NAME_BYTES;

fn invalid(what: &str, name: &OsStr, why: &str) -> Error {
    Error::invalid_argument(format!("invalid {what} name '{}': {why}", name.to_string_lossy().escape_debug()))
}

/// Checks a name vdisk is asked to create; returns it as UTF-8.
fn check(what: &str, name: &OsStr) -> Result<String> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(invalid(what, name, "it is empty"));
    }
    if bytes.len() > MAX_NAME_BYTES {
        return Err(invalid(what, name, &format!("it is longer than {MAX_NAME_BYTES} bytes")));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| invalid(what, name, "it is not UTF-8"))?;
    if s == "." || s == ".." {
        return Err(invalid(what, name, "'.' and '..' name directories"));
    }
    if s.contains('/') {
        return Err(invalid(what, name, "it contains '/'"));
    }
    if s.contains('\0') {
        return Err(invalid(what, name, "it contains a NUL byte"));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(what, name, "it contains a control character"));
    }
    if s.starts_with('-') {
        return Err(invalid(what, name, "it starts with '-' and would read as a command-line option"));
    }
    if s.starts_with(TEMP_PREFIX) {
        return Err(invalid(what, name, &format!("names starting with '{TEMP_PREFIX}' are vdisk's temporary files")));
    }
    Ok(s.to_string())
}

/// Checks a volume name for creation.
pub fn check_volume_name(name: impl AsRef<OsStr>) -> Result<String> {
    check("volume", name.as_ref())
}

/// Checks a pool name (it becomes `NAME.xml` in the configuration
/// directory). Pool names also may not start with `.` (hidden
/// configuration files).
pub fn check_pool_name(name: impl AsRef<OsStr>) -> Result<String> {
    let name = name.as_ref();
    let s = check("pool", name)?;
    if s.starts_with('.') {
        return Err(invalid("pool", name, "it starts with '.'"));
    }
    Ok(s)
}

/// A file name as a C string for the `*at` system calls. Names from
/// `readdir` never hold NUL; caller-given ones are checked first.
pub(crate) fn c_name(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| invalid("file", name, "it contains a NUL byte"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn hostile_names() {
        let long = "a".repeat(256);
        let bad: Vec<&[u8]> = vec![
            b"",
            b".",
            b"..",
            b"a/b",
            b"/etc/passwd",
            b"../escape",
            b"nul\0byte",
            b"new\nline",
            b"tab\there",
            b"esc\x1b[31m",
            b"del\x7f",
            b"-rf",
            b"--help",
            b"\xff\xfe",
            b".vdisk-tmp-x",
            long.as_bytes(),
        ];
        for b in bad {
            let e = check_volume_name(OsStr::from_bytes(b)).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{b:?}");
            assert!(e.to_string().contains("invalid volume name"), "{e}");
        }
        for ok in ["disk.qcow2", ".hidden", "with space.img", "ünïcode", &"a".repeat(255)] {
            assert_eq!(check_volume_name(ok).unwrap(), ok);
        }
        assert!(check_pool_name(".hidden").is_err());
        assert!(check_pool_name("default").is_ok());
    }
}
