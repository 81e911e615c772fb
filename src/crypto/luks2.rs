//! LUKS2 (the LUKS2 On-Disk Format Specification, as cryptsetup 2.x writes
//! it): two copies of a binary header, each followed by a JSON metadata
//! area and guarded by a checksum over both; key slots (PBKDF2, argon2i or
//! argon2id, anti-forensic split, their key material in the key-slot
//! area), a PBKDF2 digest of the volume key, and one `crypt` data segment.
//!
//! Reading: the copy with the higher `seqid` among those whose checksum
//! holds wins, so one damaged copy is tolerated. Every JSON field is
//! validated before any work (`crate::limits`): areas must lie inside the
//! key-slot area and not overlap, the segment must start past it, argon2
//! memory and time and PBKDF2 iterations are bounded. What vdisk does not
//! do is refused by name: more than one segment (an unfinished
//! reencryption), `integrity`, mandatory requirements, key-slot types other
//! than `luks2`, ciphers other than AES in XTS or CBC.
//!
//! Here: the binary header pair, checksums, choosing a copy, key-slot
//! unlock. `metadata.rs` validates the JSON; `create.rs` makes new volumes
//! (cryptsetup's default layout: two 16 KiB header copies, the key-slot
//! area up to 16 MiB, the payload after it); `amend.rs` adds and removes
//! key slots.

use argon2::{Algorithm, Argon2, Params, Version};

use super::json::Json;
use super::luks1::af_merge;
use super::secret::{wipe, Secret};
use super::sector::{IvGen, LuksCipher, LuksHash, LuksMode, SECTOR};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::{LUKS2_MAX_HDR_SIZE, LUKS2_MAX_UNLOCK_ARGON2_WORK, LUKS_MAX_UNLOCK_ITERATIONS};

mod amend;
mod create;
mod metadata;

use metadata::{check_argon2, Fields};

pub use create::{area_len, create, encode_copies, KdfKind, Luks2Params};

/// The primary header's magic.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The secondary header's magic.
pub const MAGIC2: [u8; 6] = *b"SKUL\xba\xbe";
/// Bytes of the binary header (before the JSON area).
pub const BIN_LEN: usize = 4096;
/// Header sizes (binary and JSON) the format allows; the secondary copy
/// starts at one of them.
const HDR_SIZES: [u64; 9] = [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20];
/// Where the checksum lives in the binary header.
const CSUM_AT: usize = 448;
/// Its length.
const CSUM_LEN: usize = 64;
/// The header size vdisk writes.
const NEW_HDR_SIZE: u64 = 16 << 10;
/// Where vdisk puts the payload of a new volume (cryptsetup's default).
const NEW_DATA_OFFSET: u64 = 16 << 20;
/// Key-slot areas are aligned to this.
const AREA_ALIGN: u64 = 4096;

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The binary header of one copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Binary {
    /// Header and JSON area size in bytes.
    pub hdr_size: u64,
    /// Sequence id: bumped at each metadata update.
    pub seqid: u64,
    /// The label (may be empty).
    pub label: String,
    /// The checksum algorithm (`sha256`).
    pub csum_alg: String,
    /// The volume UUID.
    pub uuid: String,
    /// The subsystem (may be empty).
    pub subsystem: String,
    /// Where this copy starts in the file.
    pub hdr_offset: u64,
}

/// How a key slot derives its key from the passphrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// The hash.
        hash: LuksHash,
        /// Iterations.
        iterations: u32,
    },
    /// Argon2 (`argon2i` or `argon2id`).
    Argon2 {
        /// argon2id rather than argon2i.
        id: bool,
        /// Time cost (passes).
        time: u32,
        /// Memory in KiB.
        memory: u32,
        /// Lanes.
        cpus: u32,
    },
}

impl Kdf {
    /// The name in the metadata.
    pub fn name(&self) -> &'static str {
        match self {
            Kdf::Pbkdf2 { .. } => "pbkdf2",
            Kdf::Argon2 { id: true, .. } => "argon2id",
            Kdf::Argon2 { id: false, .. } => "argon2i",
        }
    }

    /// Derives `out` from `pass` and `salt`.
    fn derive(&self, pass: &[u8], salt: &[u8], out: &mut [u8]) -> Result<()> {
        match *self {
            Kdf::Pbkdf2 { hash, iterations } => {
                hash.pbkdf2(pass, salt, iterations, out);
                Ok(())
            }
            Kdf::Argon2 { id, time, memory, cpus } => {
                let params = Params::new(memory, time, cpus, Some(out.len()))
                    .map_err(|e| Error::invalid(format!("argon2 parameters refused: {e}")).with_field("kdf"))?;
                let alg = if id { Algorithm::Argon2id } else { Algorithm::Argon2i };
                Argon2::new(alg, Version::V0x13, params)
                    .hash_password_into(pass, salt, out)
                    .map_err(|e| Error::invalid(format!("argon2 refused the key slot: {e}")).with_field("kdf"))
            }
        }
    }

    /// The work this derivation costs: (PBKDF2 iterations, argon2 time x
    /// KiB).
    fn work(&self) -> (u64, u64) {
        match *self {
            Kdf::Pbkdf2 { iterations, .. } => (u64::from(iterations), 0),
            Kdf::Argon2 { time, memory, .. } => (0, u64::from(time) * u64::from(memory)),
        }
    }
}

/// One LUKS2 key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Keyslot {
    /// Its number.
    pub id: u32,
    /// The volume key length in bytes.
    pub key_size: u32,
    /// Key material: offset in the header file.
    pub area_offset: u64,
    /// Key material area length.
    pub area_size: u64,
    /// The cipher of the key material (`aes-xts-plain64`).
    pub area_encryption: String,
    /// Its key length (the KDF output).
    pub area_key_size: u32,
    /// The key derivation.
    pub kdf: Kdf,
    /// The KDF salt.
    pub salt: Vec<u8>,
    /// Anti-forensic stripes.
    pub stripes: u32,
    /// The AF hash.
    pub af_hash: LuksHash,
    /// 0 ignore, 1 normal, 2 high.
    pub priority: u8,
    area_mode: (LuksMode, IvGen),
}

/// The PBKDF2 digest of the volume key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Digest {
    /// Its number.
    pub id: u32,
    /// The hash.
    pub hash: LuksHash,
    /// Iterations.
    pub iterations: u32,
    /// Salt.
    pub salt: Vec<u8>,
    /// The digest.
    pub digest: Vec<u8>,
    /// Key slots whose key it checks.
    pub keyslots: Vec<u32>,
    /// Segments encrypted by that key.
    pub segments: Vec<u32>,
}

/// The data segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Segment {
    /// Its number.
    pub id: u32,
    /// Payload offset in bytes (in the data file).
    pub offset: u64,
    /// Payload length, `None` for `dynamic` (to the end of the file).
    pub size: Option<u64>,
    /// Added to the 512-byte sector number to make the IV.
    pub iv_tweak: u64,
    /// `aes-xts-plain64` and so on.
    pub encryption: String,
    /// Bytes per encryption sector (512 to 4096).
    pub sector_size: u32,
    /// Parsed from `encryption`.
    pub mode: LuksMode,
    /// Parsed from `encryption`.
    pub ivgen: IvGen,
}

/// A validated LUKS2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Header {
    /// The binary header of the copy in use.
    pub bin: Luks2Binary,
    /// Whether each copy (primary, secondary) is valid and current (a
    /// damaged copy, or one with an older seqid, is not).
    pub copies_ok: [bool; 2],
    /// The key slots by number.
    pub keyslots: Vec<Luks2Keyslot>,
    /// The digest of the segment's key.
    pub digest: Luks2Digest,
    /// The data segment.
    pub segment: Luks2Segment,
    /// `config.keyslots_size`.
    pub keyslots_size: u64,
    /// Token count (kept, not used).
    pub tokens: usize,
    /// The volume key length of the segment.
    pub key_bytes: u32,
    /// The metadata as read (kept whole for rewriting: tokens and unknown
    /// fields survive a key-slot change).
    pub(crate) json: Json,
}

fn bad(field: &'static str, msg: String) -> Error {
    Error::invalid(msg).with_field(field)
}

/// Whether `b` starts a LUKS2 primary header.
pub fn is_luks2(b: &[u8]) -> bool {
    b.len() >= 8 && b[..6] == MAGIC && b[6..8] == [0, 2]
}

/// Parses one binary header expected at `at` with `magic`.
fn parse_bin(b: &[u8], at: u64, magic: &[u8; 6]) -> Result<Luks2Binary> {
    if b.len() < BIN_LEN {
        return Err(Error::invalid(format!("LUKS2 header at {at} is truncated")).with_offset(at));
    }
    if b[..6] != *magic {
        return Err(bad("magic", format!("no LUKS2 header magic at offset {at}")).with_offset(at));
    }
    let version = u16::from_be_bytes([b[6], b[7]]);
    if version != 2 {
        return Err(Error::unsupported(format!("LUKS header at {at} has version {version}, not 2"))
            .with_field("version")
            .with_offset(at));
    }
    let hdr_size = be64(b, 8);
    if !HDR_SIZES.contains(&hdr_size) {
        return Err(bad(
            "hdr_size",
            format!("LUKS2 hdr_size {hdr_size} at offset {at} is not 16 KiB to 4 MiB in powers of two"),
        )
        .with_offset(at + 8));
    }
    debug_assert!(hdr_size <= LUKS2_MAX_HDR_SIZE);
    let hdr_offset = be64(b, 256);
    if hdr_offset != at {
        return Err(
            bad("hdr_offset", format!("LUKS2 header at {at} says it is at offset {hdr_offset}")).with_offset(at + 256)
        );
    }
    Ok(Luks2Binary {
        hdr_size,
        seqid: be64(b, 16),
        label: text(&b[24..72]),
        csum_alg: text(&b[72..104]),
        uuid: text(&b[168..208]),
        subsystem: text(&b[208..256]),
        hdr_offset,
    })
}

/// The checksum of one header copy (`whole` = binary header and JSON area)
/// with its checksum field taken as zeros.
fn checksum(whole: &[u8], alg: LuksHash) -> Vec<u8> {
    let zeros = [0u8; CSUM_LEN];
    alg.digest(&[&whole[..CSUM_AT], &zeros, &whole[CSUM_AT + CSUM_LEN..]])
}

/// Reads and checks the copy at `at`: its binary header, checksum and JSON
/// syntax.
fn read_copy(
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    file_len: u64,
    at: u64,
    magic: &[u8; 6],
) -> Result<(Luks2Binary, Json)> {
    if file_len < at + BIN_LEN as u64 {
        return Err(Error::invalid(format!("the file ends before the LUKS2 header at offset {at}")).with_offset(at));
    }
    let mut b = vec![0u8; BIN_LEN];
    read(at, &mut b)?;
    let bin = parse_bin(&b, at, magic)?;
    if file_len < at + bin.hdr_size {
        return Err(bad(
            "hdr_size",
            format!("LUKS2 header at {at} of {} bytes runs past the end of the file ({file_len} bytes)", bin.hdr_size),
        )
        .with_offset(at + 8));
    }
    let alg = LuksHash::from_name(&bin.csum_alg).map_err(|e| e.with_field("checksum_alg").with_offset(at + 72))?;
    let mut whole = vec![0u8; bin.hdr_size as usize];
    read(at, &mut whole)?;
    let sum = checksum(&whole, alg);
    let stored = &whole[CSUM_AT..CSUM_AT + CSUM_LEN];
    if stored[..sum.len()] != sum[..] || stored[sum.len()..].iter().any(|&c| c != 0) {
        return Err(Error::corrupt(format!("LUKS2 header at offset {at}: checksum mismatch"))
            .with_field("csum")
            .with_offset(at + CSUM_AT as u64));
    }
    let area = &whole[BIN_LEN..];
    let end = area.iter().position(|&c| c == 0).unwrap_or(area.len());
    let json = Json::parse(&area[..end]).map_err(|e| {
        let off = e.offset().unwrap_or(0) + at + BIN_LEN as u64;
        Error::new(e.kind(), format!("LUKS2 metadata at offset {}: {}", at + BIN_LEN as u64, e.message()))
            .with_field("json")
            .with_offset(off)
    })?;
    Ok((bin, json))
}

impl Luks2Header {
    /// Reads the header pair through `read` (offsets from the header's
    /// start) of a file of `file_len` bytes.
    pub fn read(read: &dyn Fn(u64, &mut [u8]) -> Result<()>, file_len: u64) -> Result<Luks2Header> {
        let primary = read_copy(read, file_len, 0, &MAGIC);
        // The secondary copy follows the primary's header area; when the
        // primary is damaged, each size the format allows is tried.
        let tries: Vec<u64> = match &primary {
            Ok((b, _)) => vec![b.hdr_size],
            Err(_) => HDR_SIZES.to_vec(),
        };
        let mut secondary = Err(Error::invalid("no secondary LUKS2 header found").with_field("magic"));
        for at in tries {
            if at + BIN_LEN as u64 > file_len {
                break;
            }
            secondary = read_copy(read, file_len, at, &MAGIC2);
            if secondary.is_ok() {
                break;
            }
        }
        let mut copies_ok = [primary.is_ok(), secondary.is_ok()];
        let (bin, json) = match (primary, secondary) {
            (Ok(p), Ok(s)) => {
                // An older copy (an update cut short) is not current.
                if s.0.seqid > p.0.seqid {
                    copies_ok[0] = false;
                    s
                } else {
                    copies_ok[1] = s.0.seqid == p.0.seqid;
                    p
                }
            }
            (Ok(p), Err(_)) => p,
            (Err(_), Ok(s)) => s,
            (Err(e), Err(e2)) => {
                return Err(Error::new(
                    e.kind(),
                    format!(
                        "both LUKS2 header copies are unusable: primary: {}; secondary: {}",
                        e.message(),
                        e2.message()
                    ),
                )
                .with_field(e.field().unwrap_or("header"))
                .with_offset(e.offset().unwrap_or(0)))
            }
        };
        Luks2Header::from_json(bin, json, copies_ok, file_len)
    }

    /// The end of the key-slot area (bytes from the header's start).
    pub fn area_end(&self) -> u64 {
        2 * self.bin.hdr_size + self.keyslots_size
    }

    /// The payload cipher for `master_key`.
    pub(crate) fn cipher(&self, master_key: &Secret) -> Result<LuksCipher> {
        LuksCipher::new(self.segment.mode, self.segment.ivgen, master_key.expose())?
            .with_unit(self.segment.sector_size as usize)
    }

    /// Whether `mk` matches the digest (compared in constant time).
    fn digest_matches(&self, mk: &[u8]) -> bool {
        let d = &self.digest;
        let mut out = vec![0u8; d.digest.len()];
        d.hash.pbkdf2(mk, &d.salt, d.iterations, &mut out);
        let diff = out.iter().zip(d.digest.iter()).fold(0u8, |a, (x, y)| a | (x ^ y));
        std::hint::black_box(diff) == 0
    }

    fn try_slot(
        &self,
        k: &Luks2Keyslot,
        pass: &[u8],
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Option<Secret>> {
        let mut dk = vec![0u8; k.area_key_size as usize];
        let r = k.kdf.derive(pass, &k.salt, &mut dk);
        let cipher = r.and_then(|_| LuksCipher::new(k.area_mode.0, k.area_mode.1, &dk));
        wipe(&mut dk);
        let cipher = cipher.map_err(|e| e.context(format_args!("LUKS2 keyslot {}", k.id)))?;
        let kb = k.key_size as usize;
        let mut mat = vec![0u8; material_len(k.key_size, k.stripes) as usize];
        read(k.area_offset, &mut mat)?;
        cipher.decrypt(0, &mut mat)?;
        let mut mk = af_merge(&mat[..kb * k.stripes as usize], kb, k.stripes as usize, k.af_hash);
        wipe(&mut mat);
        if mk.len() == self.key_bytes as usize && self.digest_matches(&mk) {
            Ok(Some(Secret::new(std::mem::take(&mut mk))))
        } else {
            wipe(&mut mk);
            Ok(None)
        }
    }

    /// Unlocks the volume: its key and the key slot `passphrase` opens, or
    /// a `Crypto` error. Slots of priority 2 are tried first, those of
    /// priority 0 never; the work over all slots tried is bounded.
    pub fn unlock(&self, passphrase: &Secret, read: &dyn Fn(u64, &mut [u8]) -> Result<()>) -> Result<(Secret, u32)> {
        self.unlock_in(passphrase, None, read)
    }

    /// [`unlock`](Self::unlock) trying only slot `only` when given (then
    /// whatever its priority).
    pub fn unlock_in(
        &self,
        passphrase: &Secret,
        only: Option<u32>,
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<(Secret, u32)> {
        let mut order: Vec<&Luks2Keyslot> = self
            .keyslots
            .iter()
            .filter(|k| self.digest.keyslots.contains(&k.id) && only.map_or(k.priority > 0, |o| o == k.id))
            .collect();
        order.sort_by_key(|k| (2 - k.priority, k.id));
        let (mut iters, mut argon) = (0u64, 0u64);
        for k in order {
            let (i, a) = k.kdf.work();
            iters += i + u64::from(self.digest.iterations);
            argon += a;
            if iters > LUKS_MAX_UNLOCK_ITERATIONS || argon > LUKS2_MAX_UNLOCK_ARGON2_WORK {
                return Err(Error::limit(format!(
                    "trying LUKS2 keyslot {} would take the unlock past its work limit ({LUKS_MAX_UNLOCK_ITERATIONS} PBKDF2 iterations, {LUKS2_MAX_UNLOCK_ARGON2_WORK} argon2 KiB-passes)",
                    k.id
                ))
                .with_field("keyslots.kdf"));
            }
            if let Some(mk) = self.try_slot(k, passphrase.expose(), read)? {
                return Ok((mk, k.id));
            }
        }
        Err(Error::new(
            ErrorKind::Crypto,
            match only {
                Some(o) => format!("the passphrase does not open LUKS2 key slot {o}"),
                None => "invalid password: no LUKS2 key slot opens with this passphrase".into(),
            },
        ))
    }
}

/// Bytes of key material on disk for a key of `key_size` bytes split in
/// `stripes` (whole 512-byte sectors).
pub fn material_len(key_size: u32, stripes: u32) -> u64 {
    (u64::from(key_size) * u64::from(stripes)).div_ceil(SECTOR as u64) * SECTOR as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn params(kdf: KdfKind) -> Luks2Params {
        Luks2Params { kdf, iter_time_ms: 1, memory_kib: Some(64), parallel: Some(1), ..Default::default() }
    }

    /// A tiny LUKS2 volume (40 KiB): two 16 KiB header copies, one key
    /// slot of one stripe (4 KiB area), 4 KiB of payload holding `0x5a`
    /// bytes in 512-byte sectors. `argon` picks argon2id (64 KiB, one pass)
    /// over PBKDF2 (1000 iterations). Seeds the `luks2_header` fuzz corpus.
    pub(crate) fn tiny_volume(pass: &str, argon: bool) -> Vec<u8> {
        use crate::crypto::json::b64_encode;
        let mk: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5c).collect();
        let salt = [7u8; 32];
        let kdf = if argon {
            Kdf::Argon2 { id: true, time: 1, memory: 64, cpus: 1 }
        } else {
            Kdf::Pbkdf2 { hash: LuksHash::Sha256, iterations: 1000 }
        };
        let mut dk = vec![0u8; 64];
        kdf.derive(pass.as_bytes(), &salt, &mut dk).unwrap();
        let mut mat = mk.clone();
        mat.resize(512, 0);
        LuksCipher::new(LuksMode::Xts, IvGen::Plain64, &dk).unwrap().encrypt(0, &mut mat).unwrap();
        let mut digest = [0u8; 32];
        LuksHash::Sha256.pbkdf2(&mk, &salt, 1000, &mut digest);
        let kdf_json = match kdf {
            Kdf::Argon2 { .. } => r#"{"type":"argon2id","time":1,"memory":64,"cpus":1,"salt":"SALT"}"#,
            Kdf::Pbkdf2 { .. } => r#"{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"SALT"}"#,
        }
        .replace("SALT", &b64_encode(&salt));
        let json = format!(
            concat!(
                r#"{{"keyslots":{{"0":{{"type":"luks2","key_size":64,"af":{{"type":"luks1","stripes":1,"hash":"sha256"}},"#,
                r#""area":{{"type":"raw","offset":"32768","size":"4096","encryption":"aes-xts-plain64","key_size":64}},"kdf":{}}}}},"#,
                r#""tokens":{{}},"segments":{{"0":{{"type":"crypt","offset":"36864","size":"dynamic","iv_tweak":"0","#,
                r#""encryption":"aes-xts-plain64","sector_size":512}}}},"digests":{{"0":{{"type":"pbkdf2","keyslots":["0"],"#,
                r#""segments":["0"],"hash":"sha256","iterations":1000,"salt":"{}","digest":"{}"}}}},"#,
                r#""config":{{"json_size":"12288","keyslots_size":"4096"}}}}"#
            ),
            kdf_json,
            b64_encode(&salt),
            b64_encode(&digest)
        );
        let mut v = create::encode_copies(
            &Json::parse(json.as_bytes()).unwrap(),
            NEW_HDR_SIZE,
            1,
            "6ed1a7a5-1d6c-4a4f-9f76-2b1c0d8e7a11",
            "tiny",
            "",
        )
        .unwrap();
        v.resize(40960, 0);
        v[32768..33280].copy_from_slice(&mat);
        let mut payload = vec![0x5au8; 4096];
        LuksCipher::new(LuksMode::Xts, IvGen::Plain64, &mk).unwrap().encrypt(0, &mut payload).unwrap();
        v[36864..].copy_from_slice(&payload);
        v
    }

    #[test]
    fn tiny_volumes_unlock() {
        for argon in [false, true] {
            let v = tiny_volume("vdisk-fuzz", argon);
            let h = Luks2Header::read(&reader(&v), v.len() as u64).unwrap();
            let (mk, _) = h.unlock(&Secret::new("vdisk-fuzz"), &reader(&v)).unwrap();
            let mut p = v[36864..].to_vec();
            h.cipher(&mk).unwrap().decrypt(0, &mut p).unwrap();
            assert_eq!(p, vec![0x5a; 4096]);
            if let Ok(dir) = std::env::var("VDISK_WRITE_LUKS2_SEEDS") {
                let name = if argon { "tiny-argon2id" } else { "tiny-pbkdf2" };
                std::fs::write(std::path::Path::new(&dir).join(name), &v).unwrap();
            }
        }
    }

    fn volume(p: &Luks2Params, pass: &str) -> (Vec<u8>, Secret) {
        let (meta, (off, mat), _, mk) = create(p, &Secret::new(pass)).unwrap();
        let mut v = meta;
        v.resize(area_len() as usize + 8192, 0);
        v[off as usize..off as usize + mat.len()].copy_from_slice(&mat);
        (v, mk)
    }

    fn reader(v: &[u8]) -> impl Fn(u64, &mut [u8]) -> Result<()> + '_ {
        move |o: u64, b: &mut [u8]| {
            let s = v.get(o as usize..o as usize + b.len()).ok_or_else(|| Error::invalid("past end"))?;
            b.copy_from_slice(s);
            Ok(())
        }
    }

    #[test]
    fn create_read_unlock_each_kdf() {
        for kdf in [KdfKind::Pbkdf2, KdfKind::Argon2i, KdfKind::Argon2id] {
            let (v, mk) = volume(&params(kdf), "pw");
            let h = Luks2Header::read(&reader(&v), v.len() as u64).unwrap();
            assert_eq!(h.copies_ok, [true, true]);
            assert_eq!(h.segment.offset, NEW_DATA_OFFSET);
            let (k, slot) = h.unlock(&Secret::new("pw"), &reader(&v)).unwrap();
            assert_eq!((k.expose(), slot), (mk.expose(), 0));
            let e = h.unlock(&Secret::new("nope"), &reader(&v)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Crypto);
        }
    }

    #[test]
    fn one_damaged_copy_is_tolerated_and_seqid_wins() {
        let (mut v, _) = volume(&params(KdfKind::Pbkdf2), "pw");
        let len = v.len() as u64;
        v[BIN_LEN + 10] ^= 1;
        let h = Luks2Header::read(&reader(&v), len).unwrap();
        assert_eq!(h.copies_ok, [false, true]);
        assert_eq!(h.bin.hdr_offset, NEW_HDR_SIZE);
        v[NEW_HDR_SIZE as usize + BIN_LEN + 10] ^= 1;
        let e = Luks2Header::read(&reader(&v), len).unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
        v[BIN_LEN + 10] ^= 1;
        v[NEW_HDR_SIZE as usize + BIN_LEN + 10] ^= 1;
        // A secondary with a higher seqid wins.
        let s = NEW_HDR_SIZE as usize;
        v[s + 16..s + 24].copy_from_slice(&9u64.to_be_bytes());
        let sum = checksum(&v[s..2 * s], LuksHash::Sha256);
        v[s + CSUM_AT..s + CSUM_AT + 32].copy_from_slice(&sum);
        let h = Luks2Header::read(&reader(&v), len).unwrap();
        assert_eq!((h.bin.seqid, h.bin.hdr_offset), (9, NEW_HDR_SIZE));
    }
}
