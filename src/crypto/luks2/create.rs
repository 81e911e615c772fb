//! Creating LUKS2 volumes: cryptsetup's default layout (two 16 KiB header
//! copies, the key-slot area up to 16 MiB, the payload after it), key slot
//! 0 with PBKDF2 or argon2 timed to `iter-time`, and the options the CLI
//! takes (`Luks2Params::set`).

use super::{
    check_argon2, checksum, material_len, Fields, Kdf, Luks2Header, AREA_ALIGN, BIN_LEN, CSUM_AT, MAGIC, MAGIC2,
    NEW_DATA_OFFSET, NEW_HDR_SIZE,
};
use crate::crypto::json::{b64_encode, Json};
use crate::crypto::luks1::{af_split, iterations_for, random, STRIPES};
use crate::crypto::secret::{wipe, Secret};
use crate::crypto::sector::{IvGen, LuksCipher, LuksHash, LuksMode};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::{LUKS2_ARGON2_MAX_MEMORY_KIB, LUKS2_ARGON2_MAX_WORK};

/// The key derivation of a new key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfKind {
    /// PBKDF2 with the volume's hash.
    Pbkdf2,
    /// argon2i.
    Argon2i,
    /// argon2id (cryptsetup's default for LUKS2).
    Argon2id,
}

/// What a new LUKS2 volume uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Params {
    /// AES key bits: 128, 192 or 256.
    pub aes_bits: u32,
    /// Cipher mode.
    pub mode: LuksMode,
    /// IV generator.
    pub ivgen: IvGen,
    /// The ESSIV hash `ivgen-alg=essiv` takes.
    pub ivgen_hash: LuksHash,
    /// PBKDF2 (key slot and digest) and AF hash.
    pub hash: LuksHash,
    /// Key slot derivation.
    pub kdf: KdfKind,
    /// Time to spend deriving a key, in milliseconds.
    pub iter_time_ms: u64,
    /// argon2 memory in KiB (default: 1 GiB or half the RAM, whichever is
    /// less, as cryptsetup).
    pub memory_kib: Option<u32>,
    /// argon2 lanes (default: up to 4, no more than the CPUs).
    pub parallel: Option<u32>,
    /// Bytes per encryption sector: 512, 1024, 2048 or 4096.
    pub sector_size: u32,
    /// The label.
    pub label: String,
    /// The header is detached (payload offset 0 in the data file).
    pub detached: bool,
}

impl Default for Luks2Params {
    fn default() -> Self {
        Luks2Params {
            aes_bits: 256,
            mode: LuksMode::Xts,
            ivgen: IvGen::Plain64,
            ivgen_hash: LuksHash::Sha256,
            hash: LuksHash::Sha256,
            kdf: KdfKind::Argon2id,
            iter_time_ms: 2000,
            memory_kib: None,
            parallel: None,
            sector_size: 512,
            label: String::new(),
            detached: false,
        }
    }
}

impl Luks2Params {
    /// Master key length.
    pub fn key_bytes(&self) -> u32 {
        let k = self.aes_bits / 8;
        match self.mode {
            LuksMode::Xts => k * 2,
            LuksMode::Cbc => k,
        }
    }

    /// Applies one create option (the LUKS1 ones qemu-img takes:
    /// `cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`,
    /// `hash-alg`, `iter-time`; and LUKS2's `pbkdf` = pbkdf2, argon2i or
    /// argon2id, `pbkdf-memory` in KiB, `pbkdf-parallel`, `sector-size`,
    /// `label`); `Ok(false)` when the key is none of them.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        let num = |what: &str, lo: u64, hi: u64| -> Result<u64> {
            value
                .parse::<u64>()
                .ok()
                .filter(|v| (lo..=hi).contains(v))
                .ok_or_else(|| Error::invalid_argument(format!("{what}={value} is not a number from {lo} to {hi}")))
        };
        match key {
            "pbkdf" => {
                self.kdf = match value {
                    "pbkdf2" => KdfKind::Pbkdf2,
                    "argon2i" => KdfKind::Argon2i,
                    "argon2id" => KdfKind::Argon2id,
                    other => {
                        return Err(Error::unsupported(format!(
                            "pbkdf={other} is not supported (pbkdf2, argon2i, argon2id)"
                        )))
                    }
                }
            }
            "pbkdf-memory" => {
                self.memory_kib = Some(num("pbkdf-memory", 32, u64::from(LUKS2_ARGON2_MAX_MEMORY_KIB))? as u32)
            }
            "pbkdf-parallel" => {
                self.parallel = Some(num("pbkdf-parallel", 1, u64::from(crate::limits::LUKS2_ARGON2_MAX_LANES))? as u32)
            }
            "sector-size" => {
                let n = num("sector-size", 512, 4096)? as u32;
                if !n.is_power_of_two() {
                    return Err(Error::invalid_argument(format!("sector-size={value} is not 512, 1024, 2048 or 4096")));
                }
                self.sector_size = n;
            }
            "label" => {
                if value.len() > 47 {
                    return Err(Error::invalid_argument("label is longer than 47 bytes"));
                }
                self.label = value.to_string();
            }
            _ => {
                // The LUKS1 options mean the same here.
                let mut l1 = crate::crypto::luks1::Luks1Params {
                    aes_bits: self.aes_bits,
                    mode: self.mode,
                    ivgen: self.ivgen,
                    ivgen_hash: self.ivgen_hash,
                    hash: self.hash,
                    iter_time_ms: self.iter_time_ms,
                    ..Default::default()
                };
                if !l1.set(key, value)? {
                    return Ok(false);
                }
                self.aes_bits = l1.aes_bits;
                self.mode = l1.mode;
                self.ivgen = l1.ivgen;
                self.ivgen_hash = l1.ivgen_hash;
                self.hash = l1.hash;
                self.iter_time_ms = l1.iter_time_ms;
            }
        }
        Ok(true)
    }

    /// The `encryption` string.
    pub fn encryption(&self) -> String {
        let m = match self.mode {
            LuksMode::Xts => "xts",
            LuksMode::Cbc => "cbc",
        };
        format!("aes-{m}-{}", self.ivgen.name())
    }
}

/// argon2 memory when none is asked: cryptsetup's 1 GiB, or half the RAM
/// when that is less.
fn default_memory_kib() -> u32 {
    let ram_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
    });
    let half = ram_kib.map_or(u64::from(LUKS2_ARGON2_MAX_MEMORY_KIB), |r| r / 2);
    half.clamp(32 << 10, u64::from(LUKS2_ARGON2_MAX_MEMORY_KIB)) as u32
}

/// The argon2 parameters of a new slot: the memory asked, and the time
/// cost that takes about `ms` here (at least 4, as cryptsetup, and within
/// the limits vdisk opens).
pub(super) fn argon2_params(p: &Luks2Params, key_len: usize) -> Result<Kdf> {
    let memory = p.memory_kib.unwrap_or_else(default_memory_kib);
    let cpus = p.parallel.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(4) as u32);
    let id = p.kdf == KdfKind::Argon2id;
    let f = Fields { at: 0 };
    let probe = Kdf::Argon2 { id, time: 1, memory, cpus };
    check_argon2(&f, &probe, "argon2").map_err(|e| Error::invalid_argument(e.message().to_string()))?;
    let mut out = vec![0u8; key_len];
    let t = std::time::Instant::now();
    probe.derive(b"probe passphrase", &[0u8; 32], &mut out)?;
    let per = t.elapsed().as_millis().max(1) as u64;
    let max_time = (LUKS2_ARGON2_MAX_WORK / u64::from(memory)).max(1);
    let time = (p.iter_time_ms / per).clamp(4.min(max_time), max_time) as u32;
    Ok(Kdf::Argon2 { id, time, memory, cpus })
}

/// One JSON number.
pub(super) fn n(v: impl std::fmt::Display) -> Json {
    Json::Num(v.to_string())
}

/// One 64-bit number as LUKS2 writes it (a decimal string).
pub(super) fn s64(v: u64) -> Json {
    Json::Str(v.to_string())
}

pub(super) fn obj(m: Vec<(&str, Json)>) -> Json {
    Json::Obj(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// Encodes both header copies (`2 * hdr_size` bytes) for `json`, with
/// `seqid`, `uuid`, `label` and `subsystem`.
pub fn encode_copies(
    json: &Json,
    hdr_size: u64,
    seqid: u64,
    uuid: &str,
    label: &str,
    subsystem: &str,
) -> Result<Vec<u8>> {
    let mut text = String::new();
    json.write(&mut text);
    let json_size = (hdr_size - BIN_LEN as u64) as usize;
    if text.len() >= json_size {
        return Err(Error::invalid_argument(format!(
            "LUKS2 metadata of {} bytes does not fit its {json_size}-byte area",
            text.len()
        )));
    }
    let mut out = vec![0u8; 2 * hdr_size as usize];
    for (i, magic) in [MAGIC, MAGIC2].iter().enumerate() {
        let at = i * hdr_size as usize;
        let c = &mut out[at..at + hdr_size as usize];
        c[..6].copy_from_slice(magic);
        c[6..8].copy_from_slice(&2u16.to_be_bytes());
        c[8..16].copy_from_slice(&hdr_size.to_be_bytes());
        c[16..24].copy_from_slice(&seqid.to_be_bytes());
        let put = |c: &mut [u8], off: usize, len: usize, s: &str| {
            let k = s.len().min(len - 1);
            c[off..off + k].copy_from_slice(&s.as_bytes()[..k]);
        };
        put(c, 24, 48, label);
        put(c, 72, 32, "sha256");
        random(&mut c[104..168])?;
        put(c, 168, 40, uuid);
        put(c, 208, 48, subsystem);
        c[256..264].copy_from_slice(&(at as u64).to_be_bytes());
        c[BIN_LEN..BIN_LEN + text.len()].copy_from_slice(text.as_bytes());
        let sum = checksum(c, LuksHash::Sha256);
        c[CSUM_AT..CSUM_AT + sum.len()].copy_from_slice(&sum);
    }
    Ok(out)
}

/// What [`create`] returns: both header copies, slot 0's key material
/// `(offset, bytes)`, the header as read back, and the volume key.
pub type NewVolume = (Vec<u8>, (u64, Vec<u8>), Luks2Header, Secret);

/// A new LUKS2 volume: the metadata (both header copies, to write at 0),
/// the key material of slot 0 (opened by `passphrase`) to write at
/// `(offset, bytes)`, the parsed header and the volume key. The caller
/// zeroes the rest of the key-slot area (up to [`Luks2Header::area_end`]).
pub fn create(p: &Luks2Params, passphrase: &Secret) -> Result<NewVolume> {
    if passphrase.expose().is_empty() {
        return Err(Error::new(ErrorKind::Crypto, "the LUKS passphrase is empty"));
    }
    if ![512, 1024, 2048, 4096].contains(&p.sector_size) {
        return Err(Error::invalid_argument(format!("sector-size={} is not 512, 1024, 2048 or 4096", p.sector_size)));
    }
    let kb = p.key_bytes();
    let mut mk = vec![0u8; kb as usize];
    random(&mut mk)?;
    let mk = Secret::new(mk);
    let seg_cipher = LuksCipher::new(p.mode, p.ivgen, mk.expose())?;
    // The slot key.
    let kdf = match p.kdf {
        KdfKind::Pbkdf2 => {
            Kdf::Pbkdf2 { hash: p.hash, iterations: iterations_for(p.hash, p.iter_time_ms, kb as usize) }
        }
        _ => argon2_params(p, kb as usize)?,
    };
    let mut salt = vec![0u8; 32];
    random(&mut salt)?;
    let mut dk = vec![0u8; kb as usize];
    kdf.derive(passphrase.expose(), &salt, &mut dk)?;
    let c = LuksCipher::new(p.mode, p.ivgen, &dk);
    wipe(&mut dk);
    let slot_cipher = c?;
    let mut mat = af_split(mk.expose(), STRIPES as usize, p.hash, material_len(kb, STRIPES) as usize)?;
    slot_cipher.encrypt(0, &mut mat)?;
    drop(seg_cipher);
    let area_offset = 2 * NEW_HDR_SIZE;
    let area_size = material_len(kb, STRIPES).div_ceil(AREA_ALIGN) * AREA_ALIGN;
    // The digest.
    let dig_iters = iterations_for(p.hash, (p.iter_time_ms / 16).max(1), kb as usize);
    let mut dsalt = vec![0u8; 32];
    random(&mut dsalt)?;
    let mut digest = vec![0u8; p.hash.digest_len()];
    p.hash.pbkdf2(mk.expose(), &dsalt, dig_iters, &mut digest);
    let kdf_json = match kdf {
        Kdf::Pbkdf2 { hash, iterations } => obj(vec![
            ("type", Json::Str("pbkdf2".into())),
            ("hash", Json::Str(hash.name().into())),
            ("iterations", n(iterations)),
            ("salt", Json::Str(b64_encode(&salt))),
        ]),
        Kdf::Argon2 { time, memory, cpus, .. } => obj(vec![
            ("type", Json::Str(kdf.name().into())),
            ("time", n(time)),
            ("memory", n(memory)),
            ("cpus", n(cpus)),
            ("salt", Json::Str(b64_encode(&salt))),
        ]),
    };
    let encryption = p.encryption();
    let keyslots_size = NEW_DATA_OFFSET - area_offset;
    let json = obj(vec![
        (
            "keyslots",
            obj(vec![(
                "0",
                obj(vec![
                    ("type", Json::Str("luks2".into())),
                    ("key_size", n(kb)),
                    (
                        "af",
                        obj(vec![
                            ("type", Json::Str("luks1".into())),
                            ("stripes", n(STRIPES)),
                            ("hash", Json::Str(p.hash.name().into())),
                        ]),
                    ),
                    (
                        "area",
                        obj(vec![
                            ("type", Json::Str("raw".into())),
                            ("offset", s64(area_offset)),
                            ("size", s64(area_size)),
                            ("encryption", Json::Str(encryption.clone())),
                            ("key_size", n(kb)),
                        ]),
                    ),
                    ("kdf", kdf_json),
                ]),
            )]),
        ),
        ("tokens", obj(vec![])),
        (
            "segments",
            obj(vec![(
                "0",
                obj(vec![
                    ("type", Json::Str("crypt".into())),
                    ("offset", s64(if p.detached { 0 } else { NEW_DATA_OFFSET })),
                    ("size", Json::Str("dynamic".into())),
                    ("iv_tweak", s64(0)),
                    ("encryption", Json::Str(encryption)),
                    ("sector_size", n(p.sector_size)),
                ]),
            )]),
        ),
        (
            "digests",
            obj(vec![(
                "0",
                obj(vec![
                    ("type", Json::Str("pbkdf2".into())),
                    ("keyslots", Json::Arr(vec![Json::Str("0".into())])),
                    ("segments", Json::Arr(vec![Json::Str("0".into())])),
                    ("hash", Json::Str(p.hash.name().into())),
                    ("iterations", n(dig_iters)),
                    ("salt", Json::Str(b64_encode(&dsalt))),
                    ("digest", Json::Str(b64_encode(&digest))),
                ]),
            )]),
        ),
        ("config", obj(vec![("json_size", s64(NEW_HDR_SIZE - BIN_LEN as u64)), ("keyslots_size", s64(keyslots_size))])),
    ]);
    let uuid = crate::pool::uuid::Uuid::new_v4()?.to_string();
    let meta = encode_copies(&json, NEW_HDR_SIZE, 1, &uuid, &p.label, "")?;
    // Parse what was made: the same checks as any volume read.
    let mut whole = meta.clone();
    whole.resize(NEW_DATA_OFFSET as usize, 0);
    let read = |o: u64, b: &mut [u8]| {
        let s = whole.get(o as usize..o as usize + b.len()).ok_or_else(|| Error::internal("new LUKS2 header read"))?;
        b.copy_from_slice(s);
        Ok(())
    };
    let h = Luks2Header::read(&read, NEW_DATA_OFFSET)?;
    Ok((meta, (area_offset, mat), h, mk))
}

/// Bytes of the header file of a new volume (headers and key-slot area).
pub fn area_len() -> u64 {
    NEW_DATA_OFFSET
}
