//! The LUKS payload cipher: AES in XTS or CBC mode over 512-byte sectors,
//! with the IV generators LUKS names (`plain`, `plain64`, `essiv:HASH`),
//! and the hashes LUKS uses for PBKDF2, the anti-forensic splitter and
//! ESSIV.
//!
//! XTS is written here over the AES block cipher (IEEE 1619: the tweak is
//! the IV encrypted with the second half of the key, multiplied by x in
//! GF(2^128) from one 16-byte block to the next). LUKS sectors are whole
//! blocks, so no ciphertext stealing is needed. Each sector's blocks go
//! through AES in one batch so AES-NI pipelines them.
//!
//! Key material is zeroed on drop (the `aes` crate's `zeroize` feature
//! wipes expanded keys; temporary buffers are wiped here).

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

use super::secret::wipe;
use crate::error::{Error, ErrorKind, Result};

/// Bytes per encrypted sector.
pub(crate) const SECTOR: usize = 512;
/// AES block size.
const BLOCK: usize = 16;
/// Blocks per sector.
const BLOCKS: usize = SECTOR / BLOCK;
/// Sectors per call into the AES backend.
const BATCH: usize = 16;

/// A hash LUKS names in its header (`hash_spec`, `essiv:HASH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuksHash {
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-224 (28 bytes).
    Sha224,
    /// SHA-256 (32 bytes).
    Sha256,
    /// SHA-384 (48 bytes).
    Sha384,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl LuksHash {
    /// Parses a LUKS hash name; the ones vdisk lacks are refused by name.
    pub fn from_name(s: &str) -> Result<LuksHash> {
        Ok(match s {
            "sha1" => LuksHash::Sha1,
            "sha224" => LuksHash::Sha224,
            "sha256" => LuksHash::Sha256,
            "sha384" => LuksHash::Sha384,
            "sha512" => LuksHash::Sha512,
            other => {
                return Err(Error::unsupported(format!(
                    "LUKS hash '{other}' is not supported (sha1, sha224, sha256, sha384, sha512)"
                )))
            }
        })
    }

    /// The LUKS name.
    pub fn name(self) -> &'static str {
        match self {
            LuksHash::Sha1 => "sha1",
            LuksHash::Sha224 => "sha224",
            LuksHash::Sha256 => "sha256",
            LuksHash::Sha384 => "sha384",
            LuksHash::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            LuksHash::Sha1 => 20,
            LuksHash::Sha224 => 28,
            LuksHash::Sha256 => 32,
            LuksHash::Sha384 => 48,
            LuksHash::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub(crate) fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            LuksHash::Sha1 => run::<Sha1>(parts),
            LuksHash::Sha224 => run::<Sha224>(parts),
            LuksHash::Sha256 => run::<Sha256>(parts),
            LuksHash::Sha384 => run::<Sha384>(parts),
            LuksHash::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash into `out`.
    pub(crate) fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            LuksHash::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            LuksHash::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            LuksHash::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            LuksHash::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            LuksHash::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }
}

/// AES with a key of 16, 24 or 32 bytes.
#[derive(Clone)]
enum Aes {
    A128(Box<Aes128>),
    A192(Box<Aes192>),
    A256(Box<Aes256>),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        let bad = |_| Error::internal("AES key refused");
        Ok(match key.len() {
            16 => Aes::A128(Box::new(Aes128::new_from_slice(key).map_err(bad)?)),
            24 => Aes::A192(Box::new(Aes192::new_from_slice(key).map_err(bad)?)),
            32 => Aes::A256(Box::new(Aes256::new_from_slice(key).map_err(bad)?)),
            n => return Err(Error::new(ErrorKind::Crypto, format!("no AES cipher takes a key of {n} bytes"))),
        })
    }

    fn encrypt(&self, blocks: &mut [aes::Block]) {
        match self {
            Aes::A128(c) => c.encrypt_blocks(blocks),
            Aes::A192(c) => c.encrypt_blocks(blocks),
            Aes::A256(c) => c.encrypt_blocks(blocks),
        }
    }

    fn decrypt(&self, blocks: &mut [aes::Block]) {
        match self {
            Aes::A128(c) => c.decrypt_blocks(blocks),
            Aes::A192(c) => c.decrypt_blocks(blocks),
            Aes::A256(c) => c.decrypt_blocks(blocks),
        }
    }
}

/// The block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuksMode {
    /// XTS (the key is two AES keys).
    Xts,
    /// CBC.
    Cbc,
}

/// How the IV of a sector is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The low 32 bits of the sector number, little-endian.
    Plain,
    /// The sector number, little-endian 64 bits.
    Plain64,
    /// The sector number (little-endian 64 bits) encrypted with AES keyed
    /// by the hash of the master key.
    Essiv(LuksHash),
}

impl IvGen {
    /// Parses `plain`, `plain64`, `essiv:HASH`. QEMU writes the hash it
    /// was given after `plain` and `plain64` too (`plain64:sha256`): it is
    /// checked and unused.
    pub fn from_name(s: &str) -> Result<IvGen> {
        let (alg, hash) = match s.split_once(':') {
            Some((a, h)) => (a, Some(LuksHash::from_name(h)?)),
            None => (s, None),
        };
        Ok(match (alg, hash) {
            ("plain", _) => IvGen::Plain,
            ("plain64", _) => IvGen::Plain64,
            ("essiv", Some(h)) => IvGen::Essiv(h),
            _ => {
                return Err(Error::unsupported(format!(
                    "LUKS IV generator '{s}' is not supported (plain, plain64, essiv:HASH)"
                )))
            }
        })
    }

    /// The LUKS name.
    pub fn name(self) -> String {
        match self {
            IvGen::Plain => "plain".into(),
            IvGen::Plain64 => "plain64".into(),
            IvGen::Essiv(h) => format!("essiv:{}", h.name()),
        }
    }
}

/// A parsed `cipher_mode` string such as `xts-plain64`.
pub fn parse_mode(s: &str) -> Result<(LuksMode, IvGen)> {
    let (m, iv) = s.split_once('-').unwrap_or((s, ""));
    let mode = match m {
        "xts" => LuksMode::Xts,
        "cbc" => LuksMode::Cbc,
        other => {
            return Err(Error::unsupported(format!("LUKS cipher mode '{other}' is not supported (xts, cbc)"))
                .with_field("cipher_mode"))
        }
    };
    Ok((mode, IvGen::from_name(iv).map_err(|e| e.with_field("cipher_mode"))?))
}

/// The payload cipher of one LUKS volume (or of one key slot's key
/// material, which uses the same cipher under the slot's derived key).
#[derive(Clone)]
pub(crate) struct LuksCipher {
    mode: LuksMode,
    /// The data key (XTS: the first half).
    data: Aes,
    /// XTS: the tweak key (second half).
    tweak: Option<Aes>,
    /// The IV generator.
    iv: IvGen,
    /// ESSIV: AES keyed by the hash of the key.
    essiv: Option<Aes>,
    /// Bytes per encryption unit (LUKS2 `sector_size`; 512 otherwise).
    /// The IV still counts 512-byte sectors, as dm-crypt does for LUKS2.
    unit: usize,
}

impl std::fmt::Debug for LuksCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LuksCipher({:?}-{}, key hidden)", self.mode, self.iv.name())
    }
}

impl LuksCipher {
    /// The cipher for `key` (XTS: both halves; 32, 48 or 64 bytes).
    pub(crate) fn new(mode: LuksMode, iv: IvGen, key: &[u8]) -> Result<LuksCipher> {
        let (data, tweak) = match mode {
            LuksMode::Xts => {
                if !key.len().is_multiple_of(2) {
                    return Err(Error::new(ErrorKind::Crypto, format!("XTS key of {} bytes is odd", key.len())));
                }
                let (a, b) = key.split_at(key.len() / 2);
                (Aes::new(a)?, Some(Aes::new(b)?))
            }
            LuksMode::Cbc => (Aes::new(key)?, None),
        };
        let essiv = match iv {
            IvGen::Essiv(h) => {
                let mut salt = h.digest(&[key]);
                let c = Aes::new(&salt).map_err(|_| {
                    Error::unsupported(format!(
                        "essiv:{} gives a {}-byte key that no AES cipher takes",
                        h.name(),
                        h.digest_len()
                    ))
                });
                wipe(&mut salt);
                Some(c?)
            }
            _ => None,
        };
        Ok(LuksCipher { mode, data, tweak, iv, essiv, unit: SECTOR })
    }

    /// The IVs of units whose first 512-byte sectors are `first`,
    /// `first + step`, ...: one per element of `out` (ESSIV encrypts them
    /// in one call).
    fn ivs(&self, first: u64, step: u64, out: &mut [aes::Block]) {
        for (i, b) in out.iter_mut().enumerate() {
            let sector = first.wrapping_add(i as u64 * step);
            let mut iv = [0u8; BLOCK];
            match self.iv {
                IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
                IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            }
            *b = Array::from(iv);
        }
        if let Some(e) = &self.essiv {
            e.encrypt(out);
        }
    }

    /// The same cipher over units of `unit` bytes (512, 1024, 2048 or
    /// 4096): each unit is one XTS data unit or one CBC chain, its IV the
    /// number of its first 512-byte sector.
    pub(crate) fn with_unit(mut self, unit: usize) -> Result<LuksCipher> {
        if !unit.is_power_of_two() || !(SECTOR..=4096).contains(&unit) {
            return Err(Error::unsupported(format!("encryption sector size {unit} is not 512, 1024, 2048 or 4096")));
        }
        self.unit = unit;
        Ok(self)
    }

    /// Bytes per encryption unit.
    pub(crate) fn unit(&self) -> usize {
        self.unit
    }

    fn check(&self, len: usize) -> Result<()> {
        if !len.is_multiple_of(self.unit) {
            return Err(Error::internal(format!(
                "encrypted I/O of {len} bytes is not whole {}-byte sectors",
                self.unit
            )));
        }
        Ok(())
    }

    /// Encrypts whole units in place; `sector` is the number of the first
    /// 512-byte sector (the IV source).
    pub(crate) fn encrypt(&self, sector: u64, data: &mut [u8]) -> Result<()> {
        self.run(sector, data, true)
    }

    /// Decrypts whole units in place.
    pub(crate) fn decrypt(&self, sector: u64, data: &mut [u8]) -> Result<()> {
        self.run(sector, data, false)
    }

    /// Up to [`BATCH`] sectors' worth of units at a time, so that each
    /// call into the AES backend gets hundreds of blocks (its per-call
    /// set-up, broadcasting the round keys, costs as much as a sector's
    /// worth of AES).
    fn run(&self, sector: u64, data: &mut [u8], enc: bool) -> Result<()> {
        self.check(data.len())?;
        let unit = self.unit;
        let step = (unit / SECTOR) as u64;
        let per_batch = (SECTOR * BATCH / unit).max(1);
        let ublocks = unit / BLOCK;
        let mut ivs = [aes::Block::default(); BATCH];
        for (k, chunk) in data.chunks_mut(unit * per_batch).enumerate() {
            let n = chunk.len() / unit;
            let ivs = &mut ivs[..n];
            self.ivs(sector.wrapping_add((k * per_batch) as u64 * step), step, ivs);
            let (blocks, _) = aes::Block::slice_as_chunks_mut(chunk);
            match (&self.tweak, enc) {
                (Some(t), _) => self.xts(t, ivs, blocks, ublocks, enc),
                (None, true) => {
                    // CBC encryption is a chain: one block at a time.
                    for (iv, u) in ivs.iter().zip(blocks.chunks_exact_mut(ublocks)) {
                        let mut prev = *iv;
                        for b in u.iter_mut() {
                            xor(b, &prev);
                            self.data.encrypt(std::slice::from_mut(b));
                            prev = *b;
                        }
                    }
                }
                (None, false) => {
                    // Each plaintext block is the decrypted block XOR the
                    // previous ciphertext block (the IV for a unit's first).
                    let mut prev = [aes::Block::default(); BLOCKS * BATCH];
                    let prev = &mut prev[..blocks.len()];
                    prev[1..].copy_from_slice(&blocks[..blocks.len() - 1]);
                    for (i, iv) in ivs.iter().enumerate() {
                        prev[i * ublocks] = *iv;
                    }
                    self.data.decrypt(blocks);
                    for (b, p) in blocks.iter_mut().zip(prev.iter()) {
                        xor(b, p);
                    }
                }
            }
        }
        Ok(())
    }

    /// XTS over whole units of `ublocks` blocks, one IV each.
    fn xts(&self, tweak_key: &Aes, ivs: &mut [aes::Block], blocks: &mut [aes::Block], ublocks: usize, enc: bool) {
        tweak_key.encrypt(ivs);
        // The tweaks as little-endian 128-bit numbers: doubling in
        // GF(2^128) and the XORs are a few instructions each (byte loops
        // cost three times the AES itself).
        let mut tweaks = [0u128; BLOCKS * BATCH];
        let tweaks = &mut tweaks[..blocks.len()];
        for ((iv, u), ts) in ivs.iter().zip(blocks.chunks_exact_mut(ublocks)).zip(tweaks.chunks_exact_mut(ublocks)) {
            let mut tw = u128::from_le_bytes((*iv).into());
            for (b, slot) in u.iter_mut().zip(ts.iter_mut()) {
                *slot = tw;
                xor128(b, tw);
                tw = gf_double(tw);
            }
        }
        if enc {
            self.data.encrypt(blocks);
        } else {
            self.data.decrypt(blocks);
        }
        for (b, t) in blocks.iter_mut().zip(tweaks.iter()) {
            xor128(b, *t);
        }
    }

    /// The mode.
    #[allow(dead_code)]
    pub(crate) fn mode(&self) -> LuksMode {
        self.mode
    }
}

fn xor(b: &mut aes::Block, t: &aes::Block) {
    xor128(b, u128::from_le_bytes((*t).into()));
}

fn xor128(b: &mut aes::Block, t: u128) {
    *b = Array::from((u128::from_le_bytes((*b).into()) ^ t).to_le_bytes());
}

/// Multiplies an XTS tweak by x in GF(2^128) (little-endian bytes).
fn gf_double(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn xts_matches_ieee1619_vector_2() {
        // IEEE 1619-2007 XTS-AES-128 vector 2: key1 = 11.., key2 = 22..,
        // sequence number 0x3333333333, plaintext 32 bytes of 0x44.
        // Our sectors are 512 bytes: check the first two blocks only.
        let mut key = vec![0x11u8; 16];
        key.extend([0x22u8; 16]);
        let c = LuksCipher::new(LuksMode::Xts, IvGen::Plain64, &key).unwrap();
        let mut d = vec![0x44u8; SECTOR];
        c.encrypt(0x3333333333, &mut d).unwrap();
        assert_eq!(d[..32], hex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0")[..]);
        c.decrypt(0x3333333333, &mut d).unwrap();
        assert_eq!(d, vec![0x44u8; SECTOR]);
    }

    #[test]
    fn cbc_and_essiv_round_trip_and_differ_by_sector() {
        for (mode, iv, klen) in [
            (LuksMode::Cbc, IvGen::Plain, 16),
            (LuksMode::Cbc, IvGen::Essiv(LuksHash::Sha256), 32),
            (LuksMode::Xts, IvGen::Essiv(LuksHash::Sha256), 64),
            (LuksMode::Cbc, IvGen::Plain64, 24),
        ] {
            let key: Vec<u8> = (0..klen as u8).collect();
            let c = LuksCipher::new(mode, iv, &key).unwrap();
            let plain: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
            let mut d = plain.clone();
            c.encrypt(7, &mut d).unwrap();
            assert_ne!(d, plain);
            let mut e = plain.clone();
            c.encrypt(8, &mut e).unwrap();
            assert_ne!(d[..512], e[..512]);
            assert_eq!(d[512..], e[..512]);
            c.decrypt(7, &mut d).unwrap();
            assert_eq!(d, plain);
        }
        assert!(LuksCipher::new(LuksMode::Cbc, IvGen::Essiv(LuksHash::Sha1), &[0; 16]).is_err());
    }

    #[test]
    fn large_units_chain_across_512_byte_runs() {
        // XTS over a 4096-byte unit equals IEEE 1619 XTS with a 4096-byte
        // data unit: its first 512 bytes match the 512-byte unit at the
        // same IV, the rest differ (the tweak chain continues), and the IV
        // of unit k is 8k (512-byte sectors).
        let key: Vec<u8> = (0..64u8).collect();
        let small = LuksCipher::new(LuksMode::Xts, IvGen::Plain64, &key).unwrap();
        let big = small.clone().with_unit(4096).unwrap();
        let plain: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        let mut a = plain.clone();
        big.encrypt(16, &mut a).unwrap();
        let mut b = plain[..512].to_vec();
        small.encrypt(16, &mut b).unwrap();
        assert_eq!(a[..512], b[..]);
        let mut c = plain[4096..4608].to_vec();
        small.encrypt(24, &mut c).unwrap();
        assert_eq!(a[4096..4608], c[..]);
        let mut d = plain[512..1024].to_vec();
        small.encrypt(16, &mut d).unwrap();
        assert_ne!(a[512..1024], d[..]);
        big.decrypt(16, &mut a).unwrap();
        assert_eq!(a, plain);
        let c = LuksCipher::new(LuksMode::Cbc, IvGen::Essiv(LuksHash::Sha256), &key[..32])
            .unwrap()
            .with_unit(2048)
            .unwrap();
        let mut x = plain.clone();
        c.encrypt(4, &mut x).unwrap();
        assert_ne!(x, plain);
        c.decrypt(4, &mut x).unwrap();
        assert_eq!(x, plain);
        assert!(c.encrypt(0, &mut x[..512]).is_err());
        assert!(small.clone().with_unit(8192).is_err());
        assert!(small.with_unit(768).is_err());
    }

    #[test]
    fn names_parse_and_unknown_ones_are_refused_by_name() {
        assert_eq!(parse_mode("xts-plain64").unwrap(), (LuksMode::Xts, IvGen::Plain64));
        assert_eq!(parse_mode("cbc-essiv:sha256").unwrap(), (LuksMode::Cbc, IvGen::Essiv(LuksHash::Sha256)));
        assert!(parse_mode("ecb").unwrap_err().to_string().contains("ecb"));
        assert!(parse_mode("cbc-benbi").unwrap_err().to_string().contains("benbi"));
        assert_eq!(parse_mode("cbc-plain64:sha256").unwrap(), (LuksMode::Cbc, IvGen::Plain64));
        assert!(parse_mode("cbc-essiv").is_err());
        assert!(LuksHash::from_name("ripemd160").unwrap_err().to_string().contains("ripemd160"));
    }
}
