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
    pub fn from_file(path: &std::path::Path) -> Result<Secret> {
        let mut b = std::fs::read(path).map_err(|e| Error::io("cannot read the passphrase file", e).with_path(path))?;
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
