//! The LUKS2 JSON metadata: every field the header pair's chosen copy
//! names is read and validated here, with errors naming the JSON path, the
//! value and the offset of the metadata area; numbers are checked against
//! `crate::limits` before any work.

use super::material_len;
use super::{Json, Kdf, Luks2Binary, Luks2Digest, Luks2Header, Luks2Keyslot, Luks2Segment, AREA_ALIGN, BIN_LEN};
use crate::crypto::json::{b64_decode, digits_u64};
use crate::crypto::sector::{parse_mode, IvGen, LuksHash, LuksMode, SECTOR};
use crate::error::{Error, Result};
use crate::limits::{
    LUKS2_ARGON2_MAX_LANES, LUKS2_ARGON2_MAX_MEMORY_KIB, LUKS2_ARGON2_MAX_WORK, LUKS2_MAX_OBJECTS,
    LUKS_MAX_PBKDF2_ITERATIONS, LUKS_MAX_STRIPES,
};

/// Field access with errors naming the JSON path, the value and the
/// offset of the metadata area.
pub(super) struct Fields {
    /// The JSON area's offset (for errors).
    pub(super) at: u64,
}

impl Fields {
    fn err(&self, field: &'static str, msg: String) -> Error {
        Error::invalid(format!("LUKS2 metadata (at offset {}): {msg}", self.at)).with_field(field).with_offset(self.at)
    }

    fn unsupported(&self, field: &'static str, msg: String) -> Error {
        Error::unsupported(format!("LUKS2 metadata: {msg}")).with_field(field).with_offset(self.at)
    }

    fn limit(&self, field: &'static str, msg: String) -> Error {
        Error::limit(format!("LUKS2 metadata: {msg} (refused before any work)")).with_field(field).with_offset(self.at)
    }

    fn get<'a>(&self, o: &'a Json, key: &str, path: &str, field: &'static str) -> Result<&'a Json> {
        if o.members().is_none() {
            return Err(self.err(field, format!("{path} is not an object")));
        }
        o.get(key).ok_or_else(|| self.err(field, format!("{path}.{key} is missing")))
    }

    fn obj<'a>(&self, o: &'a Json, key: &str, path: &str, field: &'static str) -> Result<&'a [(String, Json)]> {
        let v = self.get(o, key, path, field)?;
        v.members().ok_or_else(|| self.err(field, format!("{path}.{key} = {} is not an object", v.show())))
    }

    fn string<'a>(&self, o: &'a Json, key: &str, path: &str, field: &'static str) -> Result<&'a str> {
        let v = self.get(o, key, path, field)?;
        v.str().ok_or_else(|| self.err(field, format!("{path}.{key} = {} is not a string", v.show())))
    }

    /// A JSON number that is an unsigned integer up to `max`.
    fn num(&self, o: &Json, key: &str, path: &str, field: &'static str, max: u64) -> Result<u64> {
        let v = self.get(o, key, path, field)?;
        let n = v
            .u64()
            .ok_or_else(|| self.err(field, format!("{path}.{key} = {} is not an unsigned integer", v.show())))?;
        if n > max {
            return Err(self.err(field, format!("{path}.{key} = {n} is out of range (at most {max})")));
        }
        Ok(n)
    }

    /// A 64-bit number written as a decimal string.
    fn big(&self, o: &Json, key: &str, path: &str, field: &'static str) -> Result<u64> {
        let v = self.get(o, key, path, field)?;
        v.str().and_then(digits_u64).ok_or_else(|| {
            self.err(field, format!("{path}.{key} = {} is not a decimal string of a 64-bit number", v.show()))
        })
    }

    fn b64(
        &self,
        o: &Json,
        key: &str,
        path: &str,
        field: &'static str,
        len: std::ops::RangeInclusive<usize>,
    ) -> Result<Vec<u8>> {
        let s = self.string(o, key, path, field)?;
        let b =
            b64_decode(s).ok_or_else(|| self.err(field, format!("{path}.{key} = \"{}\" is not base64", short(s))))?;
        if !len.contains(&b.len()) {
            return Err(self.err(
                field,
                format!("{path}.{key} has {} bytes ({} to {} expected)", b.len(), len.start(), len.end()),
            ));
        }
        Ok(b)
    }

    fn hash(&self, o: &Json, key: &str, path: &str, field: &'static str) -> Result<LuksHash> {
        let s = self.string(o, key, path, field)?;
        LuksHash::from_name(s).map_err(|e| self.unsupported(field, format!("{path}.{key}: {}", e.message())))
    }

    /// `aes-MODE-IV` with a key of `key_size` bytes.
    fn cipher(&self, spec: &str, key_size: u32, path: &str, field: &'static str) -> Result<(LuksMode, IvGen)> {
        let rest = spec.strip_prefix("aes-").ok_or_else(|| {
            self.unsupported(field, format!("{path} cipher \"{}\" is not supported (aes only)", short(spec)))
        })?;
        let (mode, iv) = parse_mode(rest).map_err(|e| self.unsupported(field, format!("{path}: {}", e.message())))?;
        let ok = match mode {
            LuksMode::Xts => [32, 48, 64].contains(&key_size),
            LuksMode::Cbc => [16, 24, 32].contains(&key_size),
        };
        if !ok {
            return Err(self.err(field, format!("{path}: a key of {key_size} bytes does not fit {spec}")));
        }
        Ok((mode, iv))
    }
}

fn short(s: &str) -> String {
    Json::Str(s.to_string()).show().trim_matches('"').to_string()
}

/// The numbered members of `keyslots`, `digests`, `segments` or `tokens`.
fn numbered<'a>(f: &Fields, m: &'a [(String, Json)], what: &str, field: &'static str) -> Result<Vec<(u32, &'a Json)>> {
    if m.len() > LUKS2_MAX_OBJECTS {
        return Err(f.limit(field, format!("{} {what} are more than {LUKS2_MAX_OBJECTS}", m.len())));
    }
    let mut out = Vec::new();
    for (k, v) in m {
        let id = digits_u64(k)
            .filter(|&n| n < 1 << 20 && (k == "0" || !k.starts_with('0')))
            .ok_or_else(|| f.err(field, format!("{what} key \"{}\" is not a number", short(k))))?;
        if v.members().is_none() {
            return Err(f.err(field, format!("{what}.{k} is not an object")));
        }
        out.push((id as u32, v));
    }
    out.sort_by_key(|x| x.0);
    Ok(out)
}

fn ids(f: &Fields, o: &Json, key: &str, path: &str, field: &'static str) -> Result<Vec<u32>> {
    let v = f.get(o, key, path, field)?;
    let a = v.items().ok_or_else(|| f.err(field, format!("{path}.{key} is not an array")))?;
    a.iter()
        .map(|x| {
            x.str()
                .and_then(digits_u64)
                .filter(|&n| n < 1 << 20)
                .map(|n| n as u32)
                .ok_or_else(|| f.err(field, format!("{path}.{key} holds {}, not a number string", x.show())))
        })
        .collect()
}

impl Luks2Header {
    /// Validates the metadata of the chosen copy.
    pub(super) fn from_json(bin: Luks2Binary, json: Json, copies_ok: [bool; 2], file_len: u64) -> Result<Luks2Header> {
        let j = &json;
        let f = Fields { at: bin.hdr_offset + BIN_LEN as u64 };
        if j.members().is_none() {
            return Err(f.err("json", "the metadata is not a JSON object".into()));
        }
        // config
        let config = f.get(j, "config", "", "config")?;
        let json_size = f.big(config, "json_size", "config", "config.json_size")?;
        if json_size != bin.hdr_size - BIN_LEN as u64 {
            return Err(f.err(
                "config.json_size",
                format!("config.json_size = {json_size} does not match hdr_size {} less 4096", bin.hdr_size),
            ));
        }
        let keyslots_size = f.big(config, "keyslots_size", "config", "config.keyslots_size")?;
        if !keyslots_size.is_multiple_of(AREA_ALIGN) {
            return Err(f.err(
                "config.keyslots_size",
                format!("config.keyslots_size = {keyslots_size} is not a multiple of 4096"),
            ));
        }
        let area_start = 2 * bin.hdr_size;
        let area_end = area_start.checked_add(keyslots_size).ok_or_else(|| {
            f.err("config.keyslots_size", format!("config.keyslots_size = {keyslots_size} overflows"))
        })?;
        if let Some(req) = config.get("requirements") {
            let mandatory = req.get("mandatory").and_then(Json::items).unwrap_or_default();
            if !mandatory.is_empty() {
                let names: Vec<String> = mandatory.iter().map(Json::show).collect();
                return Err(f.unsupported(
                    "config.requirements",
                    format!("the volume has requirements vdisk does not meet: {}", names.join(", ")),
                ));
            }
        }
        // segments
        let segs = numbered(&f, f.obj(j, "segments", "", "segments")?, "segments", "segments")?;
        if segs.len() != 1 {
            return Err(f.unsupported(
                "segments",
                format!(
                    "{} segments (vdisk reads volumes with exactly one; more mean a reencryption in progress)",
                    segs.len()
                ),
            ));
        }
        let (sid, s) = segs[0];
        let sp = format!("segments.{sid}");
        let ty = f.string(s, "type", &sp, "segments.type")?;
        if ty != "crypt" {
            return Err(
                f.unsupported("segments.type", format!("{sp}.type = \"{}\" is not supported (crypt)", short(ty)))
            );
        }
        if s.get("integrity").is_some() {
            return Err(f.unsupported(
                "segments.integrity",
                format!("{sp} has integrity protection (dm-integrity), which vdisk does not do"),
            ));
        }
        if let Some(fl) = s.get("flags").and_then(Json::items) {
            if !fl.is_empty() {
                return Err(f.unsupported(
                    "segments.flags",
                    format!(
                        "{sp}.flags = {} (reencryption state) is not supported",
                        s.get("flags").map(Json::show).unwrap_or_default()
                    ),
                ));
            }
        }
        let offset = f.big(s, "offset", &sp, "segments.offset")?;
        let size = match f.get(s, "size", &sp, "segments.size")? {
            Json::Str(x) if x == "dynamic" => None,
            _ => Some(f.big(s, "size", &sp, "segments.size")?),
        };
        let iv_tweak = f.big(s, "iv_tweak", &sp, "segments.iv_tweak")?;
        let sector_size = f.num(s, "sector_size", &sp, "segments.sector_size", 4096)? as u32;
        if ![512, 1024, 2048, 4096].contains(&sector_size) {
            return Err(f.err(
                "segments.sector_size",
                format!("{sp}.sector_size = {sector_size} is not 512, 1024, 2048 or 4096"),
            ));
        }
        if !offset.is_multiple_of(SECTOR as u64) {
            return Err(f.err("segments.offset", format!("{sp}.offset = {offset} is not a multiple of 512")));
        }
        if let Some(n) = size {
            if n == 0 || !n.is_multiple_of(u64::from(sector_size)) {
                return Err(f.err(
                    "segments.size",
                    format!("{sp}.size = {n} is not a positive multiple of the sector size {sector_size}"),
                ));
            }
            offset.checked_add(n).ok_or_else(|| f.err("segments.size", format!("{sp}.size = {n} overflows")))?;
        }
        let encryption = f.string(s, "encryption", &sp, "segments.encryption")?.to_string();
        // digests: the one naming the segment
        let digs = numbered(&f, f.obj(j, "digests", "", "digests")?, "digests", "digests")?;
        let mut digest = None;
        for (did, d) in &digs {
            let dp = format!("digests.{did}");
            let segments = ids(&f, d, "segments", &dp, "digests.segments")?;
            if !segments.contains(&sid) {
                continue;
            }
            let ty = f.string(d, "type", &dp, "digests.type")?;
            if ty != "pbkdf2" {
                return Err(
                    f.unsupported("digests.type", format!("{dp}.type = \"{}\" is not supported (pbkdf2)", short(ty)))
                );
            }
            let hash = f.hash(d, "hash", &dp, "digests.hash")?;
            let iterations = f.num(d, "iterations", &dp, "digests.iterations", u64::from(u32::MAX))? as u32;
            check_iters(&f, iterations, &format!("{dp}.iterations"), "digests.iterations")?;
            digest = Some(Luks2Digest {
                id: *did,
                hash,
                iterations,
                salt: f.b64(d, "salt", &dp, "digests.salt", 1..=256)?,
                digest: f.b64(d, "digest", &dp, "digests.digest", 16..=64)?,
                keyslots: ids(&f, d, "keyslots", &dp, "digests.keyslots")?,
                segments,
            });
            break;
        }
        let digest = digest.ok_or_else(|| f.err("digests", format!("no digest names segment {sid}")))?;
        // key slots
        let slots = numbered(&f, f.obj(j, "keyslots", "", "keyslots")?, "keyslots", "keyslots")?;
        let mut keyslots: Vec<Luks2Keyslot> = Vec::new();
        let mut key_bytes = None;
        for (kid, k) in slots {
            let kp = format!("keyslots.{kid}");
            let ty = f.string(k, "type", &kp, "keyslots.type")?;
            if ty != "luks2" {
                return Err(
                    f.unsupported("keyslots.type", format!("{kp}.type = \"{}\" is not supported (luks2)", short(ty)))
                );
            }
            let key_size = f.num(k, "key_size", &kp, "keyslots.key_size", 64)? as u32;
            let area = f.get(k, "area", &kp, "keyslots.area")?;
            let ap = format!("{kp}.area");
            let aty = f.string(area, "type", &ap, "keyslots.area.type")?;
            if aty != "raw" {
                return Err(f.unsupported(
                    "keyslots.area.type",
                    format!("{ap}.type = \"{}\" is not supported (raw)", short(aty)),
                ));
            }
            let area_offset = f.big(area, "offset", &ap, "keyslots.area.offset")?;
            let area_size = f.big(area, "size", &ap, "keyslots.area.size")?;
            let area_key_size = f.num(area, "key_size", &ap, "keyslots.area.key_size", 64)? as u32;
            let area_encryption = f.string(area, "encryption", &ap, "keyslots.area.encryption")?.to_string();
            let area_mode = f.cipher(&area_encryption, area_key_size, &ap, "keyslots.area.encryption")?;
            let af = f.get(k, "af", &kp, "keyslots.af")?;
            let afp = format!("{kp}.af");
            let afty = f.string(af, "type", &afp, "keyslots.af.type")?;
            if afty != "luks1" {
                return Err(f.unsupported(
                    "keyslots.af.type",
                    format!("{afp}.type = \"{}\" is not supported (luks1)", short(afty)),
                ));
            }
            let stripes = f.num(af, "stripes", &afp, "keyslots.af.stripes", u64::from(u32::MAX))? as u32;
            if stripes == 0 || stripes > LUKS_MAX_STRIPES {
                return Err(f.limit(
                    "keyslots.af.stripes",
                    format!("{afp}.stripes = {stripes} is not 1 to {LUKS_MAX_STRIPES}"),
                ));
            }
            let af_hash = f.hash(af, "hash", &afp, "keyslots.af.hash")?;
            let kdf_o = f.get(k, "kdf", &kp, "keyslots.kdf")?;
            let kdfp = format!("{kp}.kdf");
            let kty = f.string(kdf_o, "type", &kdfp, "keyslots.kdf.type")?;
            let kdf = match kty {
                "pbkdf2" => {
                    let iterations =
                        f.num(kdf_o, "iterations", &kdfp, "keyslots.kdf.iterations", u64::from(u32::MAX))? as u32;
                    check_iters(&f, iterations, &format!("{kdfp}.iterations"), "keyslots.kdf.iterations")?;
                    Kdf::Pbkdf2 { hash: f.hash(kdf_o, "hash", &kdfp, "keyslots.kdf.hash")?, iterations }
                }
                "argon2i" | "argon2id" => {
                    let time = f.num(kdf_o, "time", &kdfp, "keyslots.kdf.time", u64::from(u32::MAX))? as u32;
                    let memory = f.num(kdf_o, "memory", &kdfp, "keyslots.kdf.memory", u64::from(u32::MAX))? as u32;
                    let cpus = f.num(kdf_o, "cpus", &kdfp, "keyslots.kdf.cpus", u64::from(u32::MAX))? as u32;
                    let kdf = Kdf::Argon2 { id: kty == "argon2id", time, memory, cpus };
                    check_argon2(&f, &kdf, &kdfp)?;
                    kdf
                }
                other => {
                    return Err(f.unsupported(
                        "keyslots.kdf.type",
                        format!("{kdfp}.type = \"{}\" is not supported (pbkdf2, argon2i, argon2id)", short(other)),
                    ))
                }
            };
            let salt = f.b64(kdf_o, "salt", &kdfp, "keyslots.kdf.salt", 8..=256)?;
            let priority = match k.get("priority") {
                None => 1,
                Some(_) => f.num(k, "priority", &kp, "keyslots.priority", 2)? as u8,
            };
            // The key material must fit its area, inside the key-slot area.
            let mat = material_len(key_size, stripes);
            if area_size < mat {
                return Err(f.err(
                    "keyslots.area.size",
                    format!("{ap}.size = {area_size} is smaller than its key material ({mat} bytes)"),
                ));
            }
            if !area_offset.is_multiple_of(SECTOR as u64) {
                return Err(
                    f.err("keyslots.area.offset", format!("{ap}.offset = {area_offset} is not a multiple of 512"))
                );
            }
            let end = area_offset
                .checked_add(area_size)
                .ok_or_else(|| f.err("keyslots.area.size", format!("{ap}.size = {area_size} overflows")))?;
            if area_offset < area_start || end > area_end {
                return Err(f.err(
                    "keyslots.area.offset",
                    format!(
                        "{ap} ({area_offset} to {end}) lies outside the key-slot area ({area_start} to {area_end})"
                    ),
                ));
            }
            if end > file_len {
                return Err(f.err(
                    "keyslots.area.offset",
                    format!("{ap} ends at {end}, past the end of the file ({file_len} bytes)"),
                ));
            }
            if let Some(o) = keyslots.iter().find(|o| o.area_offset < end && area_offset < o.area_offset + o.area_size)
            {
                return Err(f.err("keyslots.area.offset", format!("{ap} overlaps the area of keyslots.{}", o.id)));
            }
            if digest.keyslots.contains(&kid) {
                if let Some(kb) = key_bytes {
                    if kb != key_size {
                        return Err(f.err("keyslots.key_size", format!("{kp}.key_size = {key_size} differs from {kb}")));
                    }
                }
                key_bytes = Some(key_size);
            }
            keyslots.push(Luks2Keyslot {
                id: kid,
                key_size,
                area_offset,
                area_size,
                area_encryption,
                area_key_size,
                kdf,
                salt,
                stripes,
                af_hash,
                priority,
                area_mode,
            });
        }
        let key_bytes = match key_bytes {
            Some(k) => k,
            None => match encryption.strip_prefix("aes-").and_then(|r| parse_mode(r).ok()) {
                Some((LuksMode::Xts, _)) => 64,
                _ => 32,
            },
        };
        let (mode, ivgen) = f.cipher(&encryption, key_bytes, &sp, "segments.encryption")?;
        if offset != 0 && offset < area_end {
            return Err(f.err(
                "segments.offset",
                format!("{sp}.offset = {offset} lies inside the header and key-slot area (which ends at {area_end})"),
            ));
        }
        for k in &digest.keyslots {
            if !keyslots.iter().any(|s| s.id == *k) {
                return Err(f.err(
                    "digests.keyslots",
                    format!("digests.{} names keyslot {k}, which does not exist", digest.id),
                ));
            }
        }
        let tokens = match j.get("tokens") {
            Some(t) => numbered(
                &f,
                t.members().ok_or_else(|| f.err("tokens", "tokens is not an object".into()))?,
                "tokens",
                "tokens",
            )?
            .len(),
            None => 0,
        };
        Ok(Luks2Header {
            bin,
            copies_ok,
            keyslots,
            digest,
            segment: Luks2Segment { id: sid, offset, size, iv_tweak, encryption, sector_size, mode, ivgen },
            keyslots_size,
            tokens,
            key_bytes,
            json: json.clone(),
        })
    }
}

fn check_iters(f: &Fields, n: u32, path: &str, field: &'static str) -> Result<()> {
    if n == 0 {
        return Err(f.err(field, format!("{path} = 0")));
    }
    if n > LUKS_MAX_PBKDF2_ITERATIONS {
        return Err(f.limit(
            field,
            format!("{path} = {n} is above the limit of {LUKS_MAX_PBKDF2_ITERATIONS} PBKDF2 iterations"),
        ));
    }
    Ok(())
}

pub(super) fn check_argon2(f: &Fields, k: &Kdf, path: &str) -> Result<()> {
    let Kdf::Argon2 { time, memory, cpus, .. } = *k else { return Ok(()) };
    if memory > LUKS2_ARGON2_MAX_MEMORY_KIB {
        return Err(f.limit(
            "keyslots.kdf.memory",
            format!("{path}.memory = {memory} KiB is above the limit of {LUKS2_ARGON2_MAX_MEMORY_KIB} KiB"),
        ));
    }
    if cpus == 0 || cpus > LUKS2_ARGON2_MAX_LANES {
        return Err(f.limit("keyslots.kdf.cpus", format!("{path}.cpus = {cpus} is not 1 to {LUKS2_ARGON2_MAX_LANES}")));
    }
    if time == 0 {
        return Err(f.err("keyslots.kdf.time", format!("{path}.time = 0")));
    }
    if u64::from(memory) < 8 * u64::from(cpus) {
        return Err(f.err(
            "keyslots.kdf.memory",
            format!("{path}.memory = {memory} KiB is below 8 KiB per lane ({cpus} lanes)"),
        ));
    }
    let work = u64::from(time) * u64::from(memory);
    if work > LUKS2_ARGON2_MAX_WORK {
        return Err(f.limit(
            "keyslots.kdf.time",
            format!(
                "{path}: time {time} x memory {memory} KiB is above the limit of {LUKS2_ARGON2_MAX_WORK} KiB-passes"
            ),
        ));
    }
    Ok(())
}
