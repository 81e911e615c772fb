//! LUKS2 volumes in the standalone `luks` format: opened and created
//! through the same [`Luks`] device as LUKS1 (the header, key slots and
//! JSON metadata are in `crate::crypto::luks2`). The payload is the one
//! `crypt` segment; its sectors (`sector_size`, 512 to 4096 bytes) are
//! encrypted with IVs counted in 512-byte sectors from `iv_tweak`, as
//! dm-crypt does for LUKS2. A detached header (cryptsetup `--header`) is
//! read like a LUKS1 one. QEMU has no LUKS2, so qcow2 keeps LUKS1.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::{lerr, KeyslotChange, Luks, LuksDetails, LuksOptions, Meta, SlotState};
use crate::crypto::luks2::{self, Kdf, Luks2Header, Luks2Params};
use crate::crypto::sector::{IvGen, LuksMode};
use crate::crypto::Secret;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// LUKS2 facts for `info` beyond the LUKS1 ones.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Luks2Details {
    /// The label.
    pub label: String,
    /// The subsystem.
    pub subsystem: String,
    /// The metadata sequence id of the copy in use (cryptsetup's "Epoch").
    pub seqid: u64,
    /// Bytes of each header copy (binary header and JSON area).
    pub hdr_size: u64,
    /// Bytes of the key-slot area.
    pub keyslots_size: u64,
    /// Bytes per encryption sector.
    pub sector_size: u32,
    /// Whether the primary and the secondary header copy are intact and
    /// current (same seqid).
    pub copies_ok: [bool; 2],
    /// Tokens in the metadata (not used by vdisk).
    pub tokens: usize,
    /// The key slots.
    pub keyslots: Vec<Luks2SlotDetails>,
}

/// One LUKS2 key slot for `info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Luks2SlotDetails {
    /// Its number.
    pub id: u32,
    /// `pbkdf2`, `argon2i` or `argon2id`.
    pub kdf: String,
    /// PBKDF2 hash.
    pub hash: Option<String>,
    /// PBKDF2 iterations.
    pub iterations: Option<u32>,
    /// argon2 time cost.
    pub time: Option<u32>,
    /// argon2 memory in KiB.
    pub memory_kib: Option<u32>,
    /// argon2 lanes.
    pub cpus: Option<u32>,
    /// Volume key bytes.
    pub key_size: u32,
    /// Key material offset in bytes.
    pub area_offset: u64,
    /// Key material area bytes.
    pub area_size: u64,
    /// The key material's cipher.
    pub area_encryption: String,
    /// Anti-forensic stripes.
    pub stripes: u32,
    /// The AF hash.
    pub af_hash: String,
    /// 0 ignore, 1 normal, 2 high.
    pub priority: u8,
}

impl LuksDetails {
    /// The facts of LUKS2 header `h`.
    pub fn of_luks2(h: &Luks2Header, detached: bool) -> LuksDetails {
        let s = &h.segment;
        let bits = match s.mode {
            LuksMode::Xts => h.key_bytes * 4,
            LuksMode::Cbc => h.key_bytes * 8,
        };
        let (iv, ivh) = match s.ivgen {
            IvGen::Plain => ("plain", None),
            IvGen::Plain64 => ("plain64", None),
            IvGen::Essiv(x) => ("essiv", Some(x.name().to_string())),
        };
        let keyslots: Vec<Luks2SlotDetails> = h
            .keyslots
            .iter()
            .map(|k| {
                let mut d = Luks2SlotDetails {
                    id: k.id,
                    kdf: k.kdf.name().into(),
                    key_size: k.key_size,
                    area_offset: k.area_offset,
                    area_size: k.area_size,
                    area_encryption: k.area_encryption.clone(),
                    stripes: k.stripes,
                    af_hash: k.af_hash.name().into(),
                    priority: k.priority,
                    ..Default::default()
                };
                match k.kdf {
                    Kdf::Pbkdf2 { hash, iterations } => {
                        d.hash = Some(hash.name().into());
                        d.iterations = Some(iterations);
                    }
                    Kdf::Argon2 { time, memory, cpus, .. } => {
                        d.time = Some(time);
                        d.memory_kib = Some(memory);
                        d.cpus = Some(cpus);
                    }
                }
                d
            })
            .collect();
        LuksDetails {
            cipher_alg: format!("aes-{bits}"),
            cipher_mode: match s.mode {
                LuksMode::Xts => "xts".into(),
                LuksMode::Cbc => "cbc".into(),
            },
            ivgen_alg: iv.into(),
            ivgen_hash_alg: ivh,
            hash_alg: h.digest.hash.name().into(),
            payload_offset: s.offset,
            master_key_iters: h.digest.iterations,
            uuid: h.bin.uuid.clone(),
            detached_header: detached,
            slots: keyslots.iter().map(|k| (true, k.iterations, k.area_offset, k.stripes)).collect(),
            luks2: Some(Luks2Details {
                label: h.bin.label.clone(),
                subsystem: h.bin.subsystem.clone(),
                seqid: h.bin.seqid,
                hdr_size: h.bin.hdr_size,
                keyslots_size: h.keyslots_size,
                sector_size: s.sector_size,
                copies_ok: h.copies_ok,
                tokens: h.tokens,
                keyslots,
            }),
        }
    }
}

/// Whether `st` starts with a LUKS2 header (primary magic, version 2), or
/// with a damaged primary whose secondary copy is there.
pub(super) fn is_luks2_file(st: &dyn Storage) -> Result<bool> {
    let len = st.len()?;
    let mut b = [0u8; 8];
    if len < 8 {
        return Ok(false);
    }
    st.read_at(&mut b, 0)?;
    if luks2::is_luks2(&b) {
        return Ok(true);
    }
    if b[..6] == luks2::MAGIC {
        return Ok(false);
    }
    // A primary too damaged to name its version: a secondary LUKS2 copy
    // at one of the offsets the format allows makes it LUKS2.
    let mut at = 16u64 << 10;
    while at <= crate::limits::LUKS2_MAX_HDR_SIZE && at + 8 <= len {
        st.read_at(&mut b, at)?;
        if b[..6] == luks2::MAGIC2 && b[6..8] == [0, 2] {
            return Ok(true);
        }
        at *= 2;
    }
    Ok(false)
}

/// Reads and validates the LUKS2 header pair at the start of `st`.
pub fn read_luks2_header(st: &dyn Storage) -> Result<Luks2Header> {
    let len = st.len()?;
    let read = |o: u64, b: &mut [u8]| st.read_at(b, o);
    Luks2Header::read(&read, len).map_err(|e| lerr(e, st))
}

/// Rewrites the header copy that is damaged or stale from the one in use
/// (as cryptsetup does on a writable open): only that copy's bytes are
/// written, the copy in use is not touched, so a crash leaves it as it was.
fn repair_copy(st: &dyn Storage, h: &mut Luks2Header) -> Result<()> {
    let b = &h.bin;
    let hs = b.hdr_size;
    // Only the layout the format defines: copies at 0 and at hdr_size.
    let other = match b.hdr_offset {
        0 => 1u64,
        o if o == hs => 0,
        _ => return Ok(()),
    };
    let both = luks2::encode_copies(&h.json, hs, b.seqid, &b.uuid, &b.label, &b.subsystem)?;
    let range = (other * hs) as usize..((other + 1) * hs) as usize;
    st.write_at(&both[range], other * hs)?;
    st.sync()?;
    h.copies_ok = [true, true];
    Ok(())
}

impl Luks {
    pub(super) fn open_luks2(
        payload: Arc<dyn Storage>,
        header_file: Arc<dyn Storage>,
        opts: LuksOptions,
    ) -> Result<Luks> {
        let mut h = read_luks2_header(&*header_file)?;
        let offset = h.segment.offset;
        // A detached header file opened alone (its segment at 0 names
        // another file) can be looked at: no payload, nothing to unlock.
        let header_alone = opts.header.is_none() && offset == 0 && opts.key.is_none() && opts.inspect_only;
        let detached = opts.header.is_some() || header_alone;
        let read_only = opts.read_only || payload.is_read_only() || header_file.is_read_only() && !detached;
        if !detached && offset == 0 {
            return Err(lerr(
                Error::invalid("this LUKS2 header's data segment starts at offset 0: its payload is in another file (open it with the header detached)")
                    .with_field("segments.offset"),
                &*header_file,
            ));
        }
        let plen = payload.len()?;
        if plen < offset {
            return Err(lerr(
                Error::invalid(format!("the file of {plen} bytes ends before the LUKS2 payload offset {offset}"))
                    .with_field("segments.offset"),
                &*header_file,
            ));
        }
        let unit = u64::from(h.segment.sector_size);
        let size = match h.segment.size {
            _ if header_alone => 0,
            Some(n) if offset + n > plen => {
                return Err(lerr(
                    Error::invalid(format!(
                        "the LUKS2 segment of {n} bytes at offset {offset} runs past the end of the file ({plen} bytes)"
                    ))
                    .with_field("segments.size"),
                    &*header_file,
                ))
            }
            Some(n) => n,
            None => (plen - offset) / unit * unit,
        };
        let cipher = match &opts.key {
            Some(k) => {
                let read = |o: u64, b: &mut [u8]| header_file.read_at(b, o);
                let (mk, _) = h.unlock(k, &read).map_err(|e| lerr(e, &*header_file))?;
                Some(h.cipher(&mk)?)
            }
            None if opts.inspect_only && opts.read_only => None,
            None => {
                return Err(lerr(
                    Error::new(ErrorKind::Crypto, "the volume is encrypted (LUKS2): a passphrase is needed to open it"),
                    &*header_file,
                ))
            }
        };
        if cipher.is_some() && !read_only && h.copies_ok != [true, true] {
            repair_copy(&*header_file, &mut h)?;
        }
        Ok(Luks {
            header_file,
            payload,
            detached,
            iv_base: h.segment.iv_tweak,
            fixed_size: h.segment.size.is_some(),
            header: Mutex::new(Meta::V2(Box::new(h))),
            cipher,
            passphrase: opts.key.clone(),
            offset,
            unit,
            size: AtomicU64::new(size),
            read_only,
            unsynced: AtomicBool::new(false),
            rmw: RwLock::new(()),
            handoff: crate::handoff::Handoff::new(opts.inactive),
        })
    }

    /// Creates a LUKS2 volume of `size` bytes (rounded up to its sectors)
    /// in `payload` (truncated), keyed by `passphrase` in key slot 0; with
    /// `header` the header (and key-slot area) goes there and `payload`
    /// holds only data.
    pub fn create_luks2(
        payload: Arc<dyn Storage>,
        header: Option<Arc<dyn Storage>>,
        size: u64,
        params: &Luks2Params,
        passphrase: &Secret,
    ) -> Result<Luks> {
        let p = Luks2Params { detached: header.is_some(), ..params.clone() };
        let hf = header.clone().unwrap_or_else(|| payload.clone());
        let h = Luks::create_luks2_header(&*hf, &p, passphrase)?;
        let unit = u64::from(p.sector_size);
        let size = size.div_ceil(unit) * unit;
        if header.is_some() {
            payload.set_len(0)?;
            payload.set_len(size)?;
        } else {
            payload.set_len(h.segment.offset + size)?;
        }
        hf.sync()?;
        payload.sync()?;
        Luks::open(payload, LuksOptions { key: Some(passphrase.clone()), header, ..Default::default() })
    }

    /// Writes a new LUKS2 header pair and key-slot area (slot 0 opened by
    /// `passphrase`) at the start of `hf`, which is truncated first.
    pub fn create_luks2_header(hf: &dyn Storage, p: &Luks2Params, passphrase: &Secret) -> Result<Luks2Header> {
        let (meta, (off, mat), h, _mk) = luks2::create(p, passphrase)?;
        hf.set_len(0)?;
        hf.set_len(luks2::area_len())?;
        hf.write_at(&mat, off)?;
        hf.write_at(&meta, 0)?;
        hf.sync()?;
        Ok(h)
    }
}

impl Luks {
    /// LUKS2 key-slot changes (see `crate::crypto::luks2` for the write
    /// order that keeps the volume openable across a crash).
    pub(super) fn change_luks2_keyslots(
        &self,
        h: &Luks2Header,
        key: &Secret,
        c: &KeyslotChange,
    ) -> Result<Luks2Header> {
        let st = &*self.header_file;
        let read = |o: u64, b: &mut [u8]| st.read_at(b, o);
        let change = match c.state {
            SlotState::Active => {
                let (mk, _) = h.unlock(c.old_secret.as_ref().unwrap_or(key), &read)?;
                let new = c.new_secret.as_ref().ok_or_else(|| Error::internal("new-secret missing"))?;
                if new.expose().is_empty() {
                    return Err(Error::invalid_argument("the new passphrase is empty"));
                }
                let used = |i: u32| h.keyslots.iter().any(|k| k.id == i);
                let id = match c.keyslot {
                    Some(n) if used(n as u32) => {
                        return Err(Error::invalid_argument(format!(
                            "refusing to overwrite LUKS2 key slot {n}: erase it first"
                        )))
                    }
                    Some(n) => n as u32,
                    None => (0..crate::limits::LUKS2_MAX_OBJECTS as u32).find(|&i| !used(i)).ok_or_else(|| {
                        Error::new(ErrorKind::Crypto, "all LUKS2 key slots are in use: erase one first")
                    })?,
                };
                h.add_slot(id, &mk, new, c.iter_time_ms.unwrap_or(2000))?
            }
            SlotState::Inactive => {
                let erase: Vec<u32> = match (&c.old_secret, c.keyslot) {
                    (Some(old), only) => {
                        let v = h.slots_opened_by(old, only.map(|n| n as u32), &read)?;
                        if v.is_empty() {
                            return Err(Error::new(ErrorKind::Crypto, "no LUKS2 key slot opens with old-secret"));
                        }
                        v
                    }
                    (None, Some(n)) => h.keyslots.iter().filter(|k| k.id == n as u32).map(|k| k.id).collect(),
                    (None, None) => Vec::new(),
                };
                if erase.is_empty() {
                    return Ok(h.clone());
                }
                let left = h.digest.keyslots.iter().filter(|i| !erase.contains(i)).count();
                if left == 0 && !c.force {
                    return Err(Error::invalid_argument(
                        "refusing to erase the last LUKS2 key slot: the volume could never be opened again (force to do it anyway)",
                    ));
                }
                h.remove_slots(&erase)?
            }
        };
        if let Some((off, mat)) = &change.material {
            st.write_at(mat, *off)?;
            st.sync()?;
        }
        let hs = change.hdr_size as usize;
        st.write_at(&change.headers[hs..], hs as u64)?;
        st.sync()?;
        st.write_at(&change.headers[..hs], 0)?;
        st.sync()?;
        if !change.wipe.is_empty() {
            for (off, len) in &change.wipe {
                let mut junk = vec![0u8; *len as usize];
                crate::crypto::luks1::random(&mut junk)?;
                st.write_at(&junk, *off)?;
            }
            st.sync()?;
        }
        read_luks2_header(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::luks2::KdfKind;
    use crate::device::BlockDevice;
    use crate::storage::MemStorage;

    #[test]
    fn create_write_reopen_read_each_sector_size() {
        for ss in [512u32, 4096] {
            let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
            let pass = Secret::new("pw");
            let p = Luks2Params {
                kdf: KdfKind::Argon2id,
                iter_time_ms: 1,
                memory_kib: Some(64),
                parallel: Some(1),
                sector_size: ss,
                ..Default::default()
            };
            let l = Luks::create_luks2(st.clone(), None, 1 << 20, &p, &pass).unwrap();
            assert_eq!(l.size(), 1 << 20);
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            l.write_at(&data, 12345).unwrap();
            l.flush().unwrap();
            drop(l);
            let l = Luks::open(st.clone(), LuksOptions { key: Some(pass), ..Default::default() }).unwrap();
            let mut back = vec![0u8; data.len()];
            l.read_at(&mut back, 12345).unwrap();
            assert_eq!(back, data);
            assert!(l.header().is_none());
            let h = l.luks2_header().unwrap();
            assert_eq!(h.segment.sector_size, ss);
            let e = Luks::open(st.clone(), LuksOptions { key: Some(Secret::new("bad")), ..Default::default() })
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Crypto);
            let i = Luks::open(st, LuksOptions { inspect_only: true, read_only: true, ..Default::default() }).unwrap();
            let crate::device::FormatDetails::Luks(d) = i.info().details else { panic!() };
            assert_eq!(d.luks2.unwrap().sector_size, ss);
        }
    }
}
