//! How qcow2 uses the legacy AES cipher (`crypt_method` 1; the cipher
//! itself lives in the crate's `crypto` module): only guest data is encrypted, metadata
//! stays plaintext; guest sector numbers feed the IVs, so a cluster keeps
//! its ciphertext wherever it moves on the host; guest I/O that does not
//! cover whole sectors is widened to whole sectors.
//!
//! An image with `crypt_method` 1 opens only with its passphrase, or
//! read-only for inspection (metadata, no guest data). LUKS (`crypt_method`
//! 2) is refused.

use super::header::{self, Header};
use super::{Qcow2, Qcow2Options};
use crate::crypto::SectorCipher;
use crate::error::{Error, ErrorKind, Result};

/// Bytes per encrypted sector.
const SECTOR: u64 = 512;

/// The cipher an image with header `h` is opened with: `None` for a
/// plaintext image, or an encrypted one opened read-only for inspection
/// without its key.
pub(crate) fn cipher_for(h: &Header, opts: &Qcow2Options, read_only: bool) -> Result<Option<SectorCipher>> {
    match h.crypt_method {
        header::CRYPT_LUKS => {
            Err(Error::unsupported("LUKS encrypted qcow2 images are not supported").with_field("crypt_method"))
        }
        header::CRYPT_AES => match &opts.key {
            Some(k) => Ok(Some(SectorCipher::from_passphrase(k)?)),
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
            return c.decrypt(guest, buf);
        }
        // Whole sectors are read and decrypted.
        let span = (head + n).div_ceil(SECTOR) * SECTOR;
        let mut sec = vec![0u8; span as usize];
        self.data.read_at(&mut sec, host - head)?;
        c.decrypt(guest - head, &mut sec)?;
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
                c.encrypt(guest, &mut enc)?;
                self.data.write_at(&enc, host)
            }
            None => self.data.write_at(data, host),
        }
    }
}
