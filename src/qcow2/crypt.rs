//! How qcow2 uses the legacy AES cipher (`crypt_method` 1; the cipher
//! itself lives in the crate's `crypto` module): only guest data is encrypted, metadata
//! stays plaintext; guest sector numbers feed the IVs, so a cluster keeps
//! its ciphertext wherever it moves on the host; guest I/O that does not
//! cover whole sectors is widened to whole sectors.
//!
//! LUKS (`crypt_method` 2, `encrypt.format=luks`): the LUKS1 header and
//! its key material live in the clusters named by the full disk
//! encryption header extension (offsets inside it relative to its start;
//! the LUKS payload offset is unused); guest data is encrypted per
//! 512-byte sector with the LUKS cipher, and the sector numbers feeding the
//! IVs are those of the data's **host** offset, as QEMU does for LUKS
//! (`crypt_physical_offset`): a cluster that moves is re-encrypted.
//!
//! An encrypted image opens only with its passphrase, or read-only for
//! inspection (metadata, no guest data).

use super::header::{self, Header};
use super::{Qcow2, Qcow2Options};
use crate::crypto::luks1::Luks1Header;
use crate::crypto::sector::LuksCipher;
use crate::crypto::{Secret, SectorCipher};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// The data cipher of an encrypted qcow2 image.
#[derive(Debug)]
pub(crate) enum Cipher {
    /// Legacy AES (guest offsets feed the IVs).
    Aes(Box<SectorCipher>),
    /// LUKS (host offsets feed the IVs).
    Luks(LuksCipher),
}

impl Cipher {
    fn encrypt(&self, host: u64, guest: u64, data: &mut [u8]) -> Result<()> {
        match self {
            Cipher::Aes(c) => c.encrypt(guest, data),
            Cipher::Luks(c) => crate::luks::encrypt_parallel(c, host / SECTOR, data),
        }
    }

    fn decrypt(&self, host: u64, guest: u64, data: &mut [u8]) -> Result<()> {
        match self {
            Cipher::Aes(c) => c.decrypt(guest, data),
            // Long runs of contiguous clusters decrypt on several threads.
            Cipher::Luks(c) => crate::luks::decrypt_parallel(c, host / SECTOR, data),
        }
    }
}

/// The LUKS header of a `crypt_method` 2 image, validated against the
/// header extension that locates it.
pub(crate) fn luks_header(h: &Header, file: &dyn Storage) -> Result<Luks1Header> {
    let (off, len) = h.crypto_header.ok_or_else(|| {
        Error::invalid("LUKS encrypted image without a full disk encryption header extension")
            .with_field("crypt_method")
    })?;
    let file_len = file.len()?;
    if !off.is_multiple_of(h.cluster_size()) || off == 0 || off.checked_add(len).is_none_or(|e| e > file_len) {
        return Err(Error::invalid(format!(
            "LUKS header area at {off:#x} of {len} bytes is not a cluster-aligned range inside the file ({file_len} bytes)"
        ))
        .with_field("crypto_header")
        .with_offset(off));
    }
    let mut b = vec![0u8; crate::crypto::luks1::HEADER_LEN];
    if len < b.len() as u64 {
        return Err(Error::invalid(format!("LUKS header area of {len} bytes is too short")).with_field("crypto_header"));
    }
    file.read_at(&mut b, off)?;
    let lh = Luks1Header::parse(&b).map_err(|e| e.with_offset(off))?;
    if lh.area_end() > len {
        return Err(Error::invalid(format!(
            "LUKS key material ends at {} bytes, past the {len}-byte header area",
            lh.area_end()
        ))
        .with_field("crypto_header"));
    }
    Ok(lh)
}

/// Unlocks a LUKS qcow2 image with `key`.
fn luks_cipher(h: &Header, file: &dyn Storage, key: &Secret) -> Result<LuksCipher> {
    let lh = luks_header(h, file)?;
    let base = h.crypto_header.map_or(0, |c| c.0);
    let (mk, _) = lh.unlock(key, None, &|o, b| file.read_at(b, base + o))?;
    lh.cipher(&mk)
}

/// Bytes per encrypted sector.
const SECTOR: u64 = 512;

/// The cipher an image with header `h` is opened with: `None` for a
/// plaintext image, or an encrypted one opened read-only for inspection
/// without its key.
pub(crate) fn cipher_for(
    h: &Header,
    file: &dyn Storage,
    opts: &Qcow2Options,
    read_only: bool,
) -> Result<Option<Cipher>> {
    if h.crypt_method == header::CRYPT_LUKS {
        // The LUKS header is validated first, key or not.
        luks_header(h, file)?;
    }
    match h.crypt_method {
        header::CRYPT_LUKS => match &opts.key {
            Some(k) => Ok(Some(Cipher::Luks(luks_cipher(h, file, k)?))),
            None if opts.inspect_only && read_only => Ok(None),
            None => {
                Err(Error::new(ErrorKind::Crypto, "the image is encrypted (LUKS): a passphrase is needed to open it")
                    .with_field("crypt_method"))
            }
        },
        header::CRYPT_AES => match &opts.key {
            Some(k) => Ok(Some(Cipher::Aes(Box::new(SectorCipher::from_passphrase(k)?)))),
            None if opts.inspect_only && read_only => Ok(None),
            None => Err(Error::new(
                ErrorKind::Crypto,
                "the image is encrypted (legacy AES): a passphrase is needed to open it",
            )
            .with_field("crypt_method")),
        },
        _ => Ok(None),
    }
}

impl Qcow2 {
    /// Adds or removes LUKS passphrases (`qemu-img amend -o
    /// encrypt.state=...`); `unlock` is the passphrase the image opens
    /// with. The header clusters are rewritten in place.
    pub fn change_luks_keyslots(&self, unlock: &Secret, c: &crate::luks::KeyslotChange) -> Result<()> {
        self.check_writable()?;
        let h = self.header.lock().clone();
        if h.crypt_method != header::CRYPT_LUKS {
            return Err(self.err(Error::invalid_argument("the image is not LUKS encrypted").with_field("crypt_method")));
        }
        luks_header(&h, &*self.file)?;
        let base = h.crypto_header.map_or(0, |c| c.0);
        crate::luks::keyslots::apply(&*self.file, base, unlock, c).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The LUKS header of a `crypt_method` 2 image, if it is one.
    pub fn luks_header(&self) -> Option<Luks1Header> {
        let h = self.header.lock().clone();
        (h.crypt_method == header::CRYPT_LUKS).then(|| luks_header(&h, &*self.file).ok()).flatten()
    }
}

/// Whether `[start, end)` of a cluster covers whole sectors.
pub(crate) fn sector_aligned(start: u64, end: u64) -> bool {
    start.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR)
}

impl Qcow2 {
    /// Reads guest data stored at host offset `host` of the data file into
    /// `buf`, decrypting it when the image is encrypted; `guest` is the
    /// guest offset of `buf[0]`.
    pub(crate) fn read_data(&self, buf: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let Some(c) = &self.crypt else {
            return self.data.read_at(buf, host);
        };
        let n = buf.len() as u64;
        let head = guest % SECTOR;
        if head == 0 && n.is_multiple_of(SECTOR) {
            self.data.read_at(buf, host)?;
            return c.decrypt(host, guest, buf);
        }
        // Whole sectors are read and decrypted.
        let span = (head + n).div_ceil(SECTOR) * SECTOR;
        let mut sec = vec![0u8; span as usize];
        self.data.read_at(&mut sec, host - head)?;
        c.decrypt(host - head, guest - head, &mut sec)?;
        buf.copy_from_slice(&sec[head as usize..(head + n) as usize]);
        Ok(())
    }

    /// Writes guest data (encrypting it first when the image is encrypted)
    /// at host offset `host`; `guest` is the guest offset of `data[0]`,
    /// and with encryption both cover whole sectors.
    pub(crate) fn write_data(&self, data: &[u8], host: u64, guest: u64) -> Result<()> {
        match &self.crypt {
            Some(c) => {
                let mut enc = data.to_vec();
                c.encrypt(host, guest, &mut enc)?;
                self.data.write_at(&enc, host)
            }
            None => self.data.write_at(data, host),
        }
    }
}
