//! LUKS1 (the LUKS On-Disk Format Specification 1.2.3, as QEMU
//! `crypto/block-luks.c` and cryptsetup write it): the 592-byte header,
//! eight key slots, the anti-forensic splitter, PBKDF2 key derivation and
//! the master-key digest.
//!
//! Everything here works on a "header area" reached through a read (or
//! write) callback with offsets relative to the start of the LUKS header:
//! a standalone volume's file, a detached header file, or the clusters a
//! qcow2 image names in its encryption header extension.
//!
//! Every field of an untrusted header is validated before any work
//! (limits in `crate::limits`): key slot offsets, stripes, key sizes and
//! PBKDF2 iteration counts, so a hostile header cannot make the opener
//! allocate without bound or spin for hours.

use super::secret::{wipe, Secret};
use super::sector::{parse_mode, IvGen, LuksCipher, LuksHash, LuksMode, SECTOR};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::{LUKS_MAX_PBKDF2_ITERATIONS, LUKS_MAX_STRIPES, LUKS_MAX_UNLOCK_ITERATIONS};

/// The LUKS magic.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of the LUKS1 header (key slot table included).
pub const HEADER_LEN: usize = 592;
/// Key slots in a LUKS1 header.
pub const SLOTS: usize = 8;
/// A key slot in use.
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
/// A key slot not in use.
const SLOT_INACTIVE: u32 = 0x0000_dead;
/// Master-key digest length.
const DIGEST_LEN: usize = 20;
/// Salt length.
const SALT_LEN: usize = 32;
/// Stripes QEMU and cryptsetup use.
pub const STRIPES: u32 = 4000;
/// Where QEMU puts the first key slot's material, and how each slot's
/// material is aligned.
const SLOT_ALIGN: u64 = 4096;
/// The fewest PBKDF2 iterations QEMU writes for a slot or the digest.
const MIN_ITERATIONS: u32 = 1000;

/// One key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    /// In use.
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// First sector of the key material (relative to the header).
    pub key_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A validated LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks1Header {
    /// `cipher_name` (only `aes`).
    pub cipher_name: String,
    /// `cipher_mode`, e.g. `xts-plain64`.
    pub cipher_mode: String,
    /// `hash_spec`, e.g. `sha256`.
    pub hash_spec: String,
    /// First payload sector (relative to the header; 0 for a detached
    /// header).
    pub payload_offset: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Its iterations.
    pub mk_digest_iter: u32,
    /// The volume UUID (text).
    pub uuid: String,
    /// The key slots.
    pub slots: [KeySlot; SLOTS],
    /// Parsed from `cipher_mode`.
    pub mode: LuksMode,
    /// Parsed from `cipher_mode`.
    pub ivgen: IvGen,
    /// Parsed from `hash_spec`.
    pub hash: LuksHash,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn text(b: &[u8], field: &'static str) -> Result<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end])
        .map(str::to_owned)
        .map_err(|_| Error::invalid(format!("LUKS {field} is not text")).with_field(field))
}

fn bad(field: &'static str, msg: String) -> Error {
    Error::invalid(msg).with_field(field)
}

/// Whether `b` starts with the LUKS magic (any version).
pub fn is_luks(b: &[u8]) -> bool {
    b.len() >= 6 && b[..6] == MAGIC
}

impl Luks1Header {
    /// Parses and validates a LUKS1 header (`b` holds at least its 592
    /// bytes).
    pub fn parse(b: &[u8]) -> Result<Luks1Header> {
        if b.len() < HEADER_LEN {
            return Err(Error::invalid(format!("LUKS header is truncated: {} of {HEADER_LEN} bytes", b.len())));
        }
        if !is_luks(b) {
            return Err(bad("magic", "not a LUKS header (bad magic)".into()));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version == 2 {
            return Err(Error::unsupported("LUKS2 headers are not supported here (LUKS1 only)").with_field("version"));
        }
        if version != 1 {
            return Err(Error::unsupported(format!("LUKS version {version} is not LUKS1")).with_field("version"));
        }
        let cipher_name = text(&b[8..40], "cipher_name")?;
        let cipher_mode = text(&b[40..72], "cipher_mode")?;
        let hash_spec = text(&b[72..104], "hash_spec")?;
        if cipher_name != "aes" {
            return Err(Error::unsupported(format!("LUKS cipher '{cipher_name}' is not supported (only aes)"))
                .with_field("cipher_name"));
        }
        let (mode, ivgen) = parse_mode(&cipher_mode)?;
        let hash = LuksHash::from_name(&hash_spec).map_err(|e| e.with_field("hash_spec"))?;
        let key_bytes = be32(b, 108);
        let ok_len = match mode {
            LuksMode::Xts => [32, 48, 64].contains(&key_bytes),
            LuksMode::Cbc => [16, 24, 32].contains(&key_bytes),
        };
        if !ok_len {
            return Err(bad("key_bytes", format!("LUKS key of {key_bytes} bytes does not fit aes in {cipher_mode}")));
        }
        let mut h = Luks1Header {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset: be32(b, 104),
            key_bytes,
            mk_digest: b[112..132].try_into().unwrap_or_default(),
            mk_digest_salt: b[132..164].try_into().unwrap_or_default(),
            mk_digest_iter: be32(b, 164),
            uuid: text(&b[168..208], "uuid")?,
            slots: [KeySlot { active: false, iterations: 0, salt: [0; SALT_LEN], key_offset: 0, stripes: 0 }; SLOTS],
            mode,
            ivgen,
            hash,
        };
        check_iterations(h.mk_digest_iter, "mk_digest_iter")?;
        for i in 0..SLOTS {
            let s = &b[208 + 48 * i..208 + 48 * (i + 1)];
            let state = be32(s, 0);
            let active = match state {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                other => return Err(bad("key_slot.active", format!("LUKS key slot {i} has state {other:#x}"))),
            };
            h.slots[i] = KeySlot {
                active,
                iterations: be32(s, 4),
                salt: s[8..40].try_into().unwrap_or_default(),
                key_offset: be32(s, 40),
                stripes: be32(s, 44),
            };
        }
        h.validate_slots()?;
        Ok(h)
    }

    fn validate_slots(&self) -> Result<()> {
        let mut spans: Vec<(u64, u64, usize)> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.stripes > LUKS_MAX_STRIPES {
                return Err(Error::limit(format!(
                    "LUKS key slot {i} has {} stripes, above the limit of {LUKS_MAX_STRIPES}",
                    s.stripes
                ))
                .with_field("key_slot.stripes"));
            }
            if s.stripes == 0 {
                return Err(bad(
                    "key_slot.stripes",
                    format!("LUKS key slot {i} has {} stripes (1 to {LUKS_MAX_STRIPES})", s.stripes),
                ));
            }
            let start = u64::from(s.key_offset) * SECTOR as u64;
            if start < HEADER_LEN as u64 {
                return Err(bad(
                    "key_slot.key_offset",
                    format!("LUKS key slot {i} material at sector {} overlaps the header", s.key_offset),
                ));
            }
            let end = start + self.material_len(s.stripes);
            if self.payload_offset != 0 && end > u64::from(self.payload_offset) * SECTOR as u64 {
                return Err(bad(
                    "key_slot.key_offset",
                    format!(
                        "LUKS key slot {i} material (sectors {} to {}) overlaps the payload at sector {}",
                        s.key_offset,
                        end / SECTOR as u64,
                        self.payload_offset
                    ),
                ));
            }
            if s.active {
                check_iterations(s.iterations, "key_slot.iterations")?;
            }
            spans.push((start, end, i));
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(bad(
                    "key_slot.key_offset",
                    format!("LUKS key slots {} and {} have overlapping key material", w[0].2, w[1].2),
                ));
            }
        }
        Ok(())
    }

    /// Bytes of one slot's key material on disk (whole sectors).
    pub fn material_len(&self, stripes: u32) -> u64 {
        (u64::from(self.key_bytes) * u64::from(stripes)).div_ceil(SECTOR as u64) * SECTOR as u64
    }

    /// Where the header area ends: the end of the last slot's key
    /// material (bytes from the header's start).
    pub fn area_end(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| u64::from(s.key_offset) * SECTOR as u64 + self.material_len(s.stripes))
            .max()
            .unwrap_or(HEADER_LEN as u64)
    }

    /// The payload's byte offset from the header's start.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR as u64
    }

    /// Encodes the 592 header bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        let put = |b: &mut [u8], at: usize, len: usize, s: &str| {
            let n = s.len().min(len - 1);
            b[at..at + n].copy_from_slice(&s.as_bytes()[..n]);
        };
        put(&mut b, 8, 32, &self.cipher_name);
        put(&mut b, 40, 32, &self.cipher_mode);
        put(&mut b, 72, 32, &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        put(&mut b, 168, 40, &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + 48 * i;
            let st = if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            b[o..o + 4].copy_from_slice(&st.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// The payload cipher for `master_key`.
    pub(crate) fn cipher(&self, master_key: &Secret) -> Result<LuksCipher> {
        LuksCipher::new(self.mode, self.ivgen, master_key.expose())
    }

    /// Whether `mk` matches the header's master-key digest (compared in
    /// constant time).
    fn digest_matches(&self, mk: &[u8]) -> bool {
        let mut d = [0u8; DIGEST_LEN];
        self.hash.pbkdf2(mk, &self.mk_digest_salt, self.mk_digest_iter, &mut d);
        let diff = d.iter().zip(self.mk_digest.iter()).fold(0u8, |a, (x, y)| a | (x ^ y));
        std::hint::black_box(diff) == 0
    }

    /// Recovers the master key from slot `i` with `passphrase`: `None`
    /// when the passphrase does not open that slot.
    fn try_slot(
        &self,
        i: usize,
        passphrase: &[u8],
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Option<Secret>> {
        let s = &self.slots[i];
        let kb = self.key_bytes as usize;
        let mut dk = vec![0u8; kb];
        self.hash.pbkdf2(passphrase, &s.salt, s.iterations, &mut dk);
        let cipher = LuksCipher::new(self.mode, self.ivgen, &dk);
        wipe(&mut dk);
        let cipher = cipher?;
        let mut mat = vec![0u8; self.material_len(s.stripes) as usize];
        read(u64::from(s.key_offset) * SECTOR as u64, &mut mat)?;
        cipher.decrypt(0, &mut mat)?;
        let mut mk = af_merge(&mat[..kb * s.stripes as usize], kb, s.stripes as usize, self.hash);
        wipe(&mut mat);
        if self.digest_matches(&mk) {
            Ok(Some(Secret::new(std::mem::take(&mut mk))))
        } else {
            wipe(&mut mk);
            Ok(None)
        }
    }

    /// Unlocks the volume: the master key and the slot that `passphrase`
    /// opens (only slot `only` when given), or a `Crypto` error.
    pub fn unlock(
        &self,
        passphrase: &Secret,
        only: Option<usize>,
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<(Secret, usize)> {
        let mut spent = 0u64;
        for i in 0..SLOTS {
            if !self.slots[i].active || only.is_some_and(|o| o != i) {
                continue;
            }
            spent += u64::from(self.slots[i].iterations) + u64::from(self.mk_digest_iter);
            if spent > LUKS_MAX_UNLOCK_ITERATIONS {
                return Err(Error::limit(format!(
                    "trying LUKS key slot {i} would take the unlock past {LUKS_MAX_UNLOCK_ITERATIONS} PBKDF2 iterations"
                ))
                .with_field("key_slot.iterations"));
            }
            if let Some(mk) = self.try_slot(i, passphrase.expose(), read)? {
                return Ok((mk, i));
            }
        }
        Err(Error::new(
            ErrorKind::Crypto,
            match only {
                Some(o) => format!("the passphrase does not open LUKS key slot {o}"),
                None => "invalid password: no LUKS key slot opens with this passphrase".into(),
            },
        ))
    }

    /// Whether `mk` is this volume's master key.
    pub fn is_master_key(&self, mk: &Secret) -> bool {
        mk.expose().len() == self.key_bytes as usize && self.digest_matches(mk.expose())
    }

    /// Fills slot `i` for `passphrase` (PBKDF2 with `iterations`): the
    /// header's slot entry is updated and the encrypted key material to
    /// write at `(offset, bytes)` (relative to the header) is returned.
    pub fn set_slot(
        &mut self,
        i: usize,
        master_key: &Secret,
        passphrase: &Secret,
        iterations: u32,
    ) -> Result<(u64, Vec<u8>)> {
        check_iterations(iterations, "iterations")?;
        let kb = self.key_bytes as usize;
        let s = self.slots[i];
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let mut dk = vec![0u8; kb];
        self.hash.pbkdf2(passphrase.expose(), &salt, iterations, &mut dk);
        let cipher = LuksCipher::new(self.mode, self.ivgen, &dk);
        wipe(&mut dk);
        let cipher = cipher?;
        let mut mat =
            af_split(master_key.expose(), s.stripes as usize, self.hash, self.material_len(s.stripes) as usize)?;
        cipher.encrypt(0, &mut mat)?;
        self.slots[i] = KeySlot { active: true, iterations, salt, ..s };
        Ok((u64::from(s.key_offset) * SECTOR as u64, mat))
    }

    /// Marks slot `i` unused; returns the (offset, random bytes) that
    /// overwrite its key material.
    pub fn clear_slot(&mut self, i: usize) -> Result<(u64, Vec<u8>)> {
        let s = self.slots[i];
        let mut junk = vec![0u8; self.material_len(s.stripes) as usize];
        random(&mut junk)?;
        self.slots[i] = KeySlot { active: false, iterations: 0, salt: [0; SALT_LEN], ..s };
        Ok((u64::from(s.key_offset) * SECTOR as u64, junk))
    }
}

fn check_iterations(n: u32, field: &'static str) -> Result<()> {
    if n == 0 {
        return Err(bad(field, "LUKS PBKDF2 iteration count is 0".into()));
    }
    if n > LUKS_MAX_PBKDF2_ITERATIONS {
        return Err(Error::limit(format!(
            "LUKS PBKDF2 iteration count {n} is above the limit of {LUKS_MAX_PBKDF2_ITERATIONS} (refused before any work)"
        ))
        .with_field(field));
    }
    Ok(())
}

pub(crate) fn random(b: &mut [u8]) -> Result<()> {
    crate::pool::uuid::random_bytes(b)
}

/// The anti-forensic diffusion: each digest-sized chunk `j` of `block`
/// becomes `H(be32(j) || chunk)` (the last one truncated).
fn diffuse(block: &mut [u8], hash: LuksHash) {
    let ds = hash.digest_len();
    for (j, chunk) in block.chunks_mut(ds).enumerate() {
        let mut h = hash.digest(&[&(j as u32).to_be_bytes(), chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&h[..n]);
        wipe(&mut h);
    }
}

/// AF-merge: `stripes` blocks of `kb` bytes back into one key.
pub(crate) fn af_merge(material: &[u8], kb: usize, stripes: usize, hash: LuksHash) -> Vec<u8> {
    let mut d = vec![0u8; kb];
    for s in 0..stripes - 1 {
        for (x, y) in d.iter_mut().zip(&material[s * kb..(s + 1) * kb]) {
            *x ^= y;
        }
        diffuse(&mut d, hash);
    }
    for (x, y) in d.iter_mut().zip(&material[(stripes - 1) * kb..stripes * kb]) {
        *x ^= y;
    }
    d
}

/// AF-split: `key` into `stripes` blocks, all but the last random.
/// The anti-forensic split of `key` into `stripes` stripes, in a buffer of
/// `capacity` bytes (at least the stripes; the rest zeros), so that the
/// caller never reallocates (and leaves unwiped) plaintext material.
pub(crate) fn af_split(key: &[u8], stripes: usize, hash: LuksHash, capacity: usize) -> Result<Vec<u8>> {
    let kb = key.len();
    let mut out = vec![0u8; capacity.max(kb * stripes)];
    random(&mut out[..kb * (stripes - 1)])?;
    let mut d = vec![0u8; kb];
    for s in 0..stripes - 1 {
        for (x, y) in d.iter_mut().zip(&out[s * kb..(s + 1) * kb]) {
            *x ^= y;
        }
        diffuse(&mut d, hash);
    }
    for (i, x) in d.iter().zip(key).map(|(a, b)| a ^ b).enumerate() {
        out[(stripes - 1) * kb + i] = x;
    }
    wipe(&mut d);
    Ok(out)
}

/// What a new LUKS1 volume uses (qemu-img's `-o` options for `luks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks1Params {
    /// AES key bits: 128, 192 or 256 (`cipher-alg=aes-N`).
    pub aes_bits: u32,
    /// `cipher-mode`.
    pub mode: LuksMode,
    /// `ivgen-alg` with `ivgen-hash-alg`.
    pub ivgen: IvGen,
    /// `ivgen-hash-alg` (used when `ivgen` is ESSIV).
    pub ivgen_hash: LuksHash,
    /// `hash-alg`.
    pub hash: LuksHash,
    /// `iter-time` in milliseconds.
    pub iter_time_ms: u64,
    /// The header is detached from the payload (payload offset 0).
    pub detached: bool,
}

impl Default for Luks1Params {
    fn default() -> Self {
        Luks1Params {
            aes_bits: 256,
            mode: LuksMode::Xts,
            ivgen: IvGen::Plain64,
            ivgen_hash: LuksHash::Sha256,
            hash: LuksHash::Sha256,
            iter_time_ms: 2000,
            detached: false,
        }
    }
}

impl Luks1Params {
    /// Applies one qemu-img option (`cipher-alg`, `cipher-mode`,
    /// `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`, `iter-time`); `Ok(false)`
    /// when the key is not one of them.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "cipher-alg" => {
                self.aes_bits = match value {
                    "aes-128" => 128,
                    "aes-192" => 192,
                    "aes-256" => 256,
                    other => {
                        return Err(Error::unsupported(format!(
                            "cipher-alg={other} is not supported (aes-128, aes-192, aes-256)"
                        )))
                    }
                }
            }
            "cipher-mode" => {
                self.mode = match value {
                    "xts" => LuksMode::Xts,
                    "cbc" => LuksMode::Cbc,
                    other => {
                        return Err(Error::unsupported(format!("cipher-mode={other} is not supported (xts, cbc)")))
                    }
                }
            }
            "ivgen-alg" => {
                let h = self.ivgen_hash;
                self.ivgen = match value {
                    "plain" => IvGen::Plain,
                    "plain64" => IvGen::Plain64,
                    "essiv" => IvGen::Essiv(h),
                    other => {
                        return Err(Error::unsupported(format!(
                            "ivgen-alg={other} is not supported (plain, plain64, essiv)"
                        )))
                    }
                }
            }
            "ivgen-hash-alg" => {
                let h = LuksHash::from_name(value)?;
                self.ivgen_hash = h;
                if let IvGen::Essiv(_) = self.ivgen {
                    self.ivgen = IvGen::Essiv(h);
                }
            }
            "hash-alg" => self.hash = LuksHash::from_name(value)?,
            "iter-time" => {
                self.iter_time_ms =
                    value.parse().ok().filter(|&v: &u64| (1..=3_600_000).contains(&v)).ok_or_else(|| {
                        Error::invalid_argument(format!("iter-time={value} is not a number of milliseconds"))
                    })?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The cipher_mode string.
    pub fn mode_string(&self) -> String {
        let m = match self.mode {
            LuksMode::Xts => "xts",
            LuksMode::Cbc => "cbc",
        };
        format!("{m}-{}", self.ivgen.name())
    }

    /// Master key length.
    pub fn key_bytes(&self) -> u32 {
        let k = self.aes_bits / 8;
        match self.mode {
            LuksMode::Xts => k * 2,
            LuksMode::Cbc => k,
        }
    }
}

/// PBKDF2 iterations of `hash` that take `ms` milliseconds here (at least
/// QEMU's minimum of 1000, at most the limit).
pub fn iterations_for(hash: LuksHash, ms: u64, key_len: usize) -> u32 {
    let probe = 10_000u32;
    let mut out = vec![0u8; key_len.max(1)];
    let t = std::time::Instant::now();
    hash.pbkdf2(b"probe passphrase", &[0u8; SALT_LEN], probe, &mut out);
    let us = t.elapsed().as_micros().max(1) as u64;
    let per_sec = u64::from(probe) * 1_000_000 / us;
    let n = per_sec.saturating_mul(ms) / 1000;
    n.clamp(u64::from(MIN_ITERATIONS), u64::from(LUKS_MAX_PBKDF2_ITERATIONS)) as u32
}

/// A new LUKS1 volume: its header, the master key, and the key material
/// of slot 0 (opened by `passphrase`) to write at `(offset, bytes)`.
/// The caller writes the header at 0 and the material, and wipes the rest
/// of the header area.
pub fn create(p: &Luks1Params, passphrase: &Secret) -> Result<(Luks1Header, Secret, (u64, Vec<u8>))> {
    if passphrase.expose().is_empty() {
        return Err(Error::new(ErrorKind::Crypto, "the LUKS passphrase is empty"));
    }
    if p.aes_bits == 192 && p.mode == LuksMode::Cbc {
        // 24 x 4000 bytes of key material is not whole sectors: QEMU 10
        // aborts on such a volume (its sector helper asserts), so vdisk
        // makes none. Reading one (cryptsetup makes them) works.
        return Err(Error::unsupported(
            "cipher-alg=aes-192 with cipher-mode=cbc is refused: its key material is not whole sectors and QEMU cannot open such a volume",
        ));
    }
    let key_bytes = p.key_bytes();
    let mut mk = vec![0u8; key_bytes as usize];
    random(&mut mk)?;
    let mk = Secret::new(mk);
    // The cipher must accept the key (and the ESSIV hash its key size).
    LuksCipher::new(p.mode, p.ivgen, mk.expose())?;
    let split = (u64::from(key_bytes) * u64::from(STRIPES)).div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
    let split_sectors = (split / SECTOR as u64) as u32;
    let first = (SLOT_ALIGN / SECTOR as u64) as u32;
    let mut salt = [0u8; SALT_LEN];
    random(&mut salt)?;
    let iters = iterations_for(p.hash, p.iter_time_ms, key_bytes as usize);
    let mut slots =
        [KeySlot { active: false, iterations: 0, salt: [0; SALT_LEN], key_offset: 0, stripes: STRIPES }; SLOTS];
    for (i, s) in slots.iter_mut().enumerate() {
        s.key_offset = first + i as u32 * split_sectors;
    }
    let mut h = Luks1Header {
        cipher_name: "aes".into(),
        cipher_mode: p.mode_string(),
        hash_spec: p.hash.name().into(),
        payload_offset: if p.detached { 0 } else { first + SLOTS as u32 * split_sectors },
        key_bytes,
        mk_digest: [0; DIGEST_LEN],
        mk_digest_salt: salt,
        mk_digest_iter: (iters / 8).max(MIN_ITERATIONS),
        uuid: crate::pool::uuid::Uuid::new_v4()?.to_string(),
        slots,
        mode: p.mode,
        ivgen: p.ivgen,
        hash: p.hash,
    };
    p.hash.pbkdf2(mk.expose(), &h.mk_digest_salt, h.mk_digest_iter, &mut h.mk_digest);
    let mat = h.set_slot(0, &mk, passphrase, iters)?;
    Ok((h, mk, mat))
}

/// The header area's length for a new volume with `p` (header and the
/// eight slots' key material).
pub fn area_len(p: &Luks1Params) -> u64 {
    let split = (u64::from(p.key_bytes()) * u64::from(STRIPES)).div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
    SLOT_ALIGN + SLOTS as u64 * split
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny volume: aes-128-cbc-plain64, one-stripe key slots, slot 0
    /// opened by `pass` with 1000 iterations, 4 KiB of payload holding
    /// `0x5a` bytes. Seeds the `luks_header` fuzz corpus.
    pub(crate) fn tiny_volume(pass: &str) -> Vec<u8> {
        let p = Luks1Params { aes_bits: 128, mode: LuksMode::Cbc, iter_time_ms: 1, ..Default::default() };
        let (mut h, mk, _) = create(&p, &Secret::new(pass)).unwrap();
        for (i, s) in h.slots.iter_mut().enumerate() {
            *s = KeySlot { active: false, iterations: 0, salt: [0; SALT_LEN], key_offset: 2 + i as u32, stripes: 1 };
        }
        h.payload_offset = 16;
        h.mk_digest_iter = 1000;
        h.hash.pbkdf2(mk.expose(), &h.mk_digest_salt, 1000, &mut h.mk_digest);
        let (off, mat) = h.set_slot(0, &mk, &Secret::new(pass), 1000).unwrap();
        let mut v = vec![0u8; 16 * SECTOR + 4096];
        v[..HEADER_LEN].copy_from_slice(&h.encode());
        v[off as usize..off as usize + mat.len()].copy_from_slice(&mat);
        let mut payload = vec![0x5au8; 4096];
        h.cipher(&mk).unwrap().encrypt(0, &mut payload).unwrap();
        v[16 * SECTOR..].copy_from_slice(&payload);
        v
    }

    #[test]
    fn tiny_volume_unlocks() {
        let v = tiny_volume("vdisk-fuzz");
        let h = Luks1Header::parse(&v).unwrap();
        let read = |o: u64, b: &mut [u8]| {
            b.copy_from_slice(&v[o as usize..o as usize + b.len()]);
            Ok(())
        };
        assert_eq!(h.unlock(&Secret::new("vdisk-fuzz"), None, &read).unwrap().1, 0);
        if let Ok(p) = std::env::var("VDISK_WRITE_LUKS_SEED") {
            std::fs::write(p, &v).unwrap();
        }
    }

    #[test]
    fn aes_192_cbc_is_not_created() {
        let p = Luks1Params { aes_bits: 192, mode: LuksMode::Cbc, iter_time_ms: 1, ..Default::default() };
        let e = create(&p, &Secret::new("pw")).unwrap_err();
        assert!(e.to_string().contains("aes-192"), "{e}");
        let p = Luks1Params { aes_bits: 192, iter_time_ms: 1, ..Default::default() };
        assert!(create(&p, &Secret::new("pw")).is_ok());
    }

    #[test]
    fn af_split_then_merge_gives_the_key() {
        let key: Vec<u8> = (0..64u8).collect();
        for h in [LuksHash::Sha1, LuksHash::Sha256, LuksHash::Sha512] {
            let m = af_split(&key, 50, h, 0).unwrap();
            assert_eq!(af_merge(&m, 64, 50, h), key);
        }
    }

    #[test]
    fn create_unlock_and_refuse_a_wrong_passphrase() {
        let p = Luks1Params { iter_time_ms: 1, ..Default::default() };
        let pass = Secret::new("pw");
        let (h, mk, (off, mat)) = create(&p, &pass).unwrap();
        let mut area = vec![0u8; area_len(&p) as usize];
        area[..HEADER_LEN].copy_from_slice(&h.encode());
        area[off as usize..off as usize + mat.len()].copy_from_slice(&mat);
        let h2 = Luks1Header::parse(&area).unwrap();
        assert_eq!(h2, h);
        let read = |o: u64, b: &mut [u8]| {
            b.copy_from_slice(&area[o as usize..o as usize + b.len()]);
            Ok(())
        };
        let (k, slot) = h2.unlock(&pass, None, &read).unwrap();
        assert_eq!((k.expose(), slot), (mk.expose(), 0));
        let e = h2.unlock(&Secret::new("nope"), None, &read).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Crypto);
        assert_eq!(h.payload_bytes(), area_len(&p));
    }
}
