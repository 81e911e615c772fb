//! Legacy qcow2 AES encryption (`crypt_method` 1, qemu's `encrypt.format=aes`).
//!
//! Each 512-byte sector is encrypted on its own with AES-128-CBC, no padding.
//! The key is the passphrase's first 16 bytes, zero-padded; the IV is the
//! *guest* sector number as a little-endian u64 followed by eight zero bytes
//! (`crypto/block-qcow.c`, "plain64"). Only guest data is encrypted;
//! metadata stays plaintext.
//!
//! **This cipher is weak and kept only for existing images**: there is no
//! integrity protection, the IVs are predictable, and the key derivation has
//! no salt and no work factor. A wrong passphrase cannot be detected (the
//! format stores no key check; QEMU cannot detect it either): it silently
//! yields garbage. LUKS (`encrypt.format=luks`) is its successor.
//!
//! Key material is zeroed when dropped and never printed.

use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, InnerIvInit, KeyInit};
use aes::Aes128;

use crate::error::{Error, ErrorKind, Result};

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
fn wipe(b: &mut [u8]) {
    for x in b.iter_mut() {
        *std::hint::black_box(x) = 0;
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// The cipher state for one image: the expanded AES-128 key (zeroed on
/// drop by the `aes` crate's `zeroize` feature).
pub struct Cipher {
    aes: Aes128,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(aes-128-cbc, key hidden)")
    }
}

type Enc = cbc::Encryptor<Aes128>;
type Dec = cbc::Decryptor<Aes128>;

impl Cipher {
    /// The key QEMU derives from `passphrase`: its first 16 bytes,
    /// zero-padded.
    pub fn from_passphrase(passphrase: &Secret) -> Result<Cipher> {
        let p = passphrase.expose();
        if p.is_empty() {
            return Err(Error::new(ErrorKind::Crypto, "the passphrase is empty"));
        }
        let mut key = [0u8; 16];
        let n = p.len().min(16);
        key[..n].copy_from_slice(&p[..n]);
        let aes = Aes128::new_from_slice(&key).map_err(|_| Error::internal("AES-128 key of 16 bytes refused"));
        wipe(&mut key);
        Ok(Cipher { aes: aes? })
    }

    fn iv(sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&sector.to_le_bytes());
        iv
    }

    fn check(guest: u64, len: usize) -> Result<()> {
        if guest % 512 != 0 || len % 512 != 0 {
            return Err(Error::internal(format!("unaligned encrypted I/O at {guest} of {len} bytes")));
        }
        Ok(())
    }

    /// Encrypts whole sectors in place; `guest` is the guest offset of
    /// `data[0]` (sector aligned).
    pub fn encrypt(&self, guest: u64, data: &mut [u8]) -> Result<()> {
        Self::check(guest, data.len())?;
        for (i, sector) in data.chunks_exact_mut(512).enumerate() {
            let iv = Self::iv(guest / 512 + i as u64);
            let mut enc = Enc::inner_iv_init(self.aes.clone(), &iv.into());
            let (blocks, rest) = aes::Block::slice_as_chunks_mut(sector);
            debug_assert!(rest.is_empty());
            enc.encrypt_blocks(blocks);
        }
        Ok(())
    }

    /// Decrypts whole sectors in place.
    pub fn decrypt(&self, guest: u64, data: &mut [u8]) -> Result<()> {
        Self::check(guest, data.len())?;
        for (i, sector) in data.chunks_exact_mut(512).enumerate() {
            let iv = Self::iv(guest / 512 + i as u64);
            let mut dec = Dec::inner_iv_init(self.aes.clone(), &iv.into());
            let (blocks, rest) = aes::Block::slice_as_chunks_mut(sector);
            debug_assert!(rest.is_empty());
            dec.decrypt_blocks(blocks);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_iv_depends_on_sector() {
        let c = Cipher::from_passphrase(&Secret::new("secret")).unwrap();
        let plain = vec![0x5au8; 1024];
        let mut d = plain.clone();
        c.encrypt(4096, &mut d).unwrap();
        assert_ne!(d, plain);
        // Same plaintext, different sector: different ciphertext.
        assert_ne!(d[..512], d[512..]);
        c.decrypt(4096, &mut d).unwrap();
        assert_eq!(d, plain);
        assert!(c.encrypt(100, &mut d).is_err());
        assert_eq!(format!("{:?}", Secret::new("x")), "Secret(***)");
    }

    #[test]
    fn decrypt_inverts_encrypt_at_sector_zero() {
        let c = Cipher::from_passphrase(&Secret::new("secret")).unwrap();
        let mut d = vec![0u8; 512];
        c.encrypt(0, &mut d).unwrap();
        let mut again = d.clone();
        c.decrypt(0, &mut again).unwrap();
        assert_eq!(again, vec![0u8; 512]);
    }
}
