//! The legacy qcow/qcow2 AES cipher (`crypt_method` 1, QEMU's
//! `encrypt.format=aes`; QEMU `crypto/block-qcow.c`).
//!
//! Each 512-byte sector is encrypted on its own with AES-128-CBC, no
//! padding. The key is the passphrase's first 16 bytes, zero-padded; the IV
//! of a sector is its number as a little-endian u64 followed by eight zero
//! bytes ("plain64"). Which sector numbers a format feeds in is the
//! format's business (qcow2 uses guest sectors).
//!
//! **This cipher is weak and kept only for existing images**: there is no
//! integrity protection, the IVs are predictable, and the key derivation
//! has no salt and no work factor. A wrong passphrase cannot be detected
//! (the format stores no key check; QEMU cannot detect it either): it
//! silently yields garbage. LUKS is its successor.
//!
//! Key material is zeroed when dropped and never printed.

use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, InnerIvInit, KeyInit};
use aes::Aes128;

use super::secret::{wipe, Secret};
use crate::error::{Error, ErrorKind, Result};

/// Bytes per encrypted sector.
const SECTOR: usize = 512;

/// The cipher state for one image: the expanded AES-128 key (zeroed on
/// drop by the `aes` crate's `zeroize` feature).
pub(crate) struct SectorCipher {
    /// The expanded key.
    aes: Aes128,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher(aes-128-cbc, key hidden)")
    }
}

type Enc = cbc::Encryptor<Aes128>;
type Dec = cbc::Decryptor<Aes128>;

impl SectorCipher {
    /// The key QEMU derives from `passphrase`: its first 16 bytes,
    /// zero-padded.
    pub(crate) fn from_passphrase(passphrase: &Secret) -> Result<SectorCipher> {
        let p = passphrase.expose();
        if p.is_empty() {
            return Err(Error::new(ErrorKind::Crypto, "the passphrase is empty"));
        }
        let mut key = [0u8; 16];
        let n = p.len().min(16);
        key[..n].copy_from_slice(&p[..n]);
        let aes = Aes128::new_from_slice(&key).map_err(|_| Error::internal("AES-128 key of 16 bytes refused"));
        wipe(&mut key);
        Ok(SectorCipher { aes: aes? })
    }

    fn iv(sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&sector.to_le_bytes());
        iv
    }

    fn check(first_sector_byte: u64, len: usize) -> Result<()> {
        if !first_sector_byte.is_multiple_of(SECTOR as u64) || !len.is_multiple_of(SECTOR) {
            return Err(Error::internal(format!("unaligned encrypted I/O at {first_sector_byte} of {len} bytes")));
        }
        Ok(())
    }

    /// Encrypts whole sectors in place; `offset` is the byte offset whose
    /// sector numbers feed the IVs (sector aligned).
    pub(crate) fn encrypt(&self, offset: u64, data: &mut [u8]) -> Result<()> {
        Self::check(offset, data.len())?;
        for (i, sector) in data.chunks_exact_mut(SECTOR).enumerate() {
            let iv = Self::iv(offset / SECTOR as u64 + i as u64);
            let mut enc = Enc::inner_iv_init(self.aes.clone(), &iv.into());
            let (blocks, rest) = aes::Block::slice_as_chunks_mut(sector);
            debug_assert!(rest.is_empty());
            enc.encrypt_blocks(blocks);
        }
        Ok(())
    }

    /// Decrypts whole sectors in place.
    pub(crate) fn decrypt(&self, offset: u64, data: &mut [u8]) -> Result<()> {
        Self::check(offset, data.len())?;
        for (i, sector) in data.chunks_exact_mut(SECTOR).enumerate() {
            let iv = Self::iv(offset / SECTOR as u64 + i as u64);
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
        let c = SectorCipher::from_passphrase(&Secret::new("secret")).unwrap();
        let plain = vec![0x5au8; 1024];
        let mut d = plain.clone();
        c.encrypt(4096, &mut d).unwrap();
        assert_ne!(d, plain);
        // Same plaintext, different sector: different ciphertext.
        assert_ne!(d[..512], d[512..]);
        c.decrypt(4096, &mut d).unwrap();
        assert_eq!(d, plain);
        assert!(c.encrypt(100, &mut d).is_err());
        assert!(SectorCipher::from_passphrase(&Secret::new("")).is_err());
    }

    #[test]
    fn decrypt_inverts_encrypt_at_sector_zero() {
        let c = SectorCipher::from_passphrase(&Secret::new("secret")).unwrap();
        let mut d = vec![0u8; 512];
        c.encrypt(0, &mut d).unwrap();
        let mut again = d.clone();
        c.decrypt(0, &mut again).unwrap();
        assert_eq!(again, vec![0u8; 512]);
    }
}
