//! Secrets: passphrases and keys, zeroed when dropped and never shown.

use crate::error::{Error, Result};

/// A passphrase or key, zeroed on drop, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// Reads a secret from a file, dropping one trailing newline (as the
    /// contents of `--passphrase-file` and qemu's `secret,file=`).
    /// At most [`MAX_SECRET_FILE`](crate::limits::MAX_SECRET_FILE) bytes
    /// (`/dev/zero` given by mistake is an error, not all of memory).
    pub fn from_file(path: &std::path::Path) -> Result<Secret> {
        use std::io::Read;
        let max = crate::limits::MAX_SECRET_FILE;
        let f =
            std::fs::File::open(path).map_err(|e| Error::io("cannot read the passphrase file", e).with_path(path))?;
        let mut b = Vec::new();
        f.take(max + 1)
            .read_to_end(&mut b)
            .map_err(|e| Error::io("cannot read the passphrase file", e).with_path(path))?;
        if b.len() as u64 > max {
            wipe(&mut b);
            return Err(Error::limit(format!("the passphrase file is larger than {max} bytes")).with_path(path));
        }
        if b.last() == Some(&b'\n') {
            b.pop();
        }
        Ok(Secret(b))
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Zeroes a buffer in a way the optimizer cannot drop although the buffer
/// dies right after.
pub(crate) fn wipe(b: &mut [u8]) {
    for x in b.iter_mut() {
        *std::hint::black_box(x) = 0;
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_bytes() {
        assert_eq!(format!("{:?}", Secret::new("x")), "Secret(***)");
    }

    #[test]
    fn from_file_drops_one_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pass");
        std::fs::write(&p, "secret\n\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().expose(), b"secret\n");
    }
}
