//! LUKS2 key-slot changes: a new key slot (its area found in the key-slot
//! area's free space, its KDF like the volume's first slot, timed to
//! `iter-time`) or removed ones. The metadata is changed in the JSON tree
//! as read, so tokens and fields vdisk does not know survive; the new
//! header pair carries `seqid + 1`.
//!
//! The caller writes in this order, so a crash at any write leaves a
//! volume that opens with the old or the new slots: a new slot's key
//! material (synced) before the headers that name it; the headers
//! (secondary, synced, then primary, synced: each copy is whole and valid
//! or fails its checksum, and the valid one with the higher seqid wins)
//! before a removed slot's material is overwritten.

use super::create::{argon2_params, n, obj, s64, Luks2Params};
use super::{encode_copies, material_len, Kdf, KdfKind, Luks2Header, AREA_ALIGN};
use crate::crypto::json::{b64_encode, Json};
use crate::crypto::luks1::{af_split, iterations_for, random, STRIPES};
use crate::crypto::secret::{wipe, Secret};
use crate::crypto::sector::LuksCipher;
use crate::error::{Error, Result};
use crate::limits::{LUKS2_MAX_OBJECTS, LUKS2_MAX_UNLOCK_ARGON2_WORK, LUKS_MAX_UNLOCK_ITERATIONS};

/// A metadata change ready to write: both header copies, and the key
/// material to write first (new slot) or the areas to wipe after (removed
/// slots).
#[derive(Debug)]
pub struct Luks2Change {
    /// Both header copies (`2 * hdr_size` bytes, written at 0).
    pub headers: Vec<u8>,
    /// `hdr_size`: where the secondary copy starts.
    pub hdr_size: u64,
    /// New key material: (offset, bytes), written and synced before the
    /// headers.
    pub material: Option<(u64, Vec<u8>)>,
    /// Removed slots' areas: (offset, length), overwritten after the
    /// headers.
    pub wipe: Vec<(u64, u64)>,
}

impl Luks2Header {
    /// Slot ids (of the segment's digest) that `pass` opens, only `only`
    /// when given; the work over all of them is bounded as one unlock.
    pub fn slots_opened_by(
        &self,
        pass: &Secret,
        only: Option<u32>,
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let cands: Vec<u32> = self
            .keyslots
            .iter()
            .filter(|k| self.digest.keyslots.contains(&k.id) && only.is_none_or(|o| o == k.id))
            .map(|k| k.id)
            .collect();
        let (mut iters, mut argon) = (0u64, 0u64);
        for k in self.keyslots.iter().filter(|k| cands.contains(&k.id)) {
            let (i, a) = k.kdf.work();
            iters += i + u64::from(self.digest.iterations);
            argon += a;
        }
        if iters > LUKS_MAX_UNLOCK_ITERATIONS || argon > LUKS2_MAX_UNLOCK_ARGON2_WORK {
            return Err(Error::limit(
                "trying every LUKS2 key slot with old-secret would take more work than one unlock may",
            )
            .with_field("keyslots.kdf"));
        }
        let mut out = Vec::new();
        for id in cands {
            if self.unlock_in(pass, Some(id), read).is_ok() {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// A new key slot `id` opened by `pass` for volume key `mk`, derived
    /// for about `iter_time_ms`.
    pub fn add_slot(&self, id: u32, mk: &Secret, pass: &Secret, iter_time_ms: u64) -> Result<Luks2Change> {
        if self.keyslots.iter().any(|k| k.id == id) {
            return Err(Error::invalid_argument(format!("LUKS2 key slot {id} is in use: erase it first")));
        }
        if self.keyslots.len() >= LUKS2_MAX_OBJECTS {
            return Err(Error::invalid_argument(format!("all {LUKS2_MAX_OBJECTS} LUKS2 key slots are in use")));
        }
        let kb = self.key_bytes;
        let s = &self.segment;
        // The new slot derives like the first existing one (or PBKDF2).
        let model = self.keyslots.first();
        let hash = self.digest.hash;
        let kdf = match model.map(|k| &k.kdf) {
            Some(Kdf::Argon2 { id: aid, memory, cpus, .. }) => {
                let p = Luks2Params {
                    kdf: if *aid { KdfKind::Argon2id } else { KdfKind::Argon2i },
                    memory_kib: Some(*memory),
                    parallel: Some(*cpus),
                    iter_time_ms,
                    ..Default::default()
                };
                argon2_params(&p, kb as usize)?
            }
            _ => Kdf::Pbkdf2 { hash, iterations: iterations_for(hash, iter_time_ms, kb as usize) },
        };
        // Its area: the first aligned gap in the key-slot area.
        let need = material_len(kb, STRIPES).div_ceil(AREA_ALIGN) * AREA_ALIGN;
        let mut taken: Vec<(u64, u64)> =
            self.keyslots.iter().map(|k| (k.area_offset, k.area_offset + k.area_size)).collect();
        taken.sort();
        let mut at = 2 * self.bin.hdr_size;
        for (a, b) in taken {
            if at + need <= a {
                break;
            }
            at = at.max(b.div_ceil(AREA_ALIGN) * AREA_ALIGN);
        }
        if at + need > self.area_end() {
            return Err(Error::invalid_argument("the LUKS2 key-slot area has no room for another key slot"));
        }
        let mut salt = vec![0u8; 32];
        random(&mut salt)?;
        let mut dk = vec![0u8; kb as usize];
        kdf.derive(pass.expose(), &salt, &mut dk)?;
        let c = LuksCipher::new(s.mode, s.ivgen, &dk);
        wipe(&mut dk);
        let cipher = c?;
        let mut mat = af_split(mk.expose(), STRIPES as usize, hash, material_len(kb, STRIPES) as usize)?;
        cipher.encrypt(0, &mut mat)?;
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
        let slot = obj(vec![
            ("type", Json::Str("luks2".into())),
            ("key_size", n(kb)),
            (
                "af",
                obj(vec![
                    ("type", Json::Str("luks1".into())),
                    ("stripes", n(STRIPES)),
                    ("hash", Json::Str(hash.name().into())),
                ]),
            ),
            (
                "area",
                obj(vec![
                    ("type", Json::Str("raw".into())),
                    ("offset", s64(at)),
                    ("size", s64(need)),
                    ("encryption", Json::Str(s.encryption.clone())),
                    ("key_size", n(kb)),
                ]),
            ),
            ("kdf", kdf_json),
        ]);
        let mut j = self.json.clone();
        let bad = || Error::internal("LUKS2 metadata changed shape");
        let ks = j.get_mut("keyslots").and_then(Json::members_mut).ok_or_else(bad)?;
        ks.push((id.to_string(), slot));
        ks.sort_by_key(|(k, _)| k.parse::<u32>().unwrap_or(u32::MAX));
        let d = j
            .get_mut("digests")
            .and_then(|d| d.get_mut(&self.digest.id.to_string()))
            .and_then(|d| d.get_mut("keyslots"))
            .and_then(Json::items_mut)
            .ok_or_else(bad)?;
        d.push(Json::Str(id.to_string()));
        let headers = self.encode_next(&j)?;
        Ok(Luks2Change { headers, hdr_size: self.bin.hdr_size, material: Some((at, mat)), wipe: Vec::new() })
    }

    /// The metadata without key slots `ids` (gone from the digests and
    /// tokens that name them too).
    pub fn remove_slots(&self, ids: &[u32]) -> Result<Luks2Change> {
        let mut j = self.json.clone();
        let names: Vec<String> = ids.iter().map(u32::to_string).collect();
        let bad = || Error::internal("LUKS2 metadata changed shape");
        j.get_mut("keyslots").and_then(Json::members_mut).ok_or_else(bad)?.retain(|(k, _)| !names.contains(k));
        for section in ["digests", "tokens"] {
            if let Some(m) = j.get_mut(section).and_then(Json::members_mut) {
                for (_, o) in m.iter_mut() {
                    if let Some(a) = o.get_mut("keyslots").and_then(Json::items_mut) {
                        a.retain(|x| x.str().is_none_or(|s| !names.iter().any(|n| n == s)));
                    }
                }
            }
        }
        let wipe = self.keyslots.iter().filter(|k| ids.contains(&k.id)).map(|k| (k.area_offset, k.area_size)).collect();
        let headers = self.encode_next(&j)?;
        Ok(Luks2Change { headers, hdr_size: self.bin.hdr_size, material: None, wipe })
    }

    /// Both header copies for `json` with the next seqid.
    fn encode_next(&self, json: &Json) -> Result<Vec<u8>> {
        let b = &self.bin;
        let seqid =
            b.seqid.checked_add(1).ok_or_else(|| Error::invalid("LUKS2 seqid cannot grow").with_field("seqid"))?;
        encode_copies(json, b.hdr_size, seqid, &b.uuid, &b.label, &b.subsystem)
    }
}
