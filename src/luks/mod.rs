//! LUKS: the standalone `luks` format (QEMU `block/crypto.c`): a LUKS1 (or
//! LUKS2) header with its key material, then the encrypted payload; or QEMU's
//! detached header (`detached-header=on`: the header in one file, the
//! payload alone in another, payload offset 0). The guest disk is the
//! payload; each 512-byte sector is encrypted with the LUKS cipher, its
//! IV made from the guest sector number.
//!
//! The header, key slots and ciphers live in the crate's `crypto` module
//! and are re-exported here with the key-slot management `qemu-img amend`
//! offers ([`Luks::change_keyslots`], [`KeyslotChange`]; qcow2 has
//! [`Qcow2::change_luks_keyslots`](crate::Qcow2::change_luks_keyslots)).
//!
//! LUKS2 volumes (`v2.rs`: as `cryptsetup luksFormat --type luks2` makes
//! them, header attached or detached) open, read, write, are created and
//! change key slots through the same [`Luks`] device; their sectors may be
//! 512 to 4096 bytes ([`Luks::luks2_header`] has the metadata).
//!
//! A volume opens with a passphrase that some key slot accepts; without
//! one it opens read-only for inspection (`info`), data unreadable. A
//! wrong passphrase is a [`Crypto`](crate::ErrorKind::Crypto) error. Holes
//! in the payload file read as whatever zeros decrypt to, as with QEMU.

pub(crate) mod keyslots;
mod v2;

pub use keyslots::{KeyslotChange, SlotState};
pub use v2::{Luks2Details, Luks2SlotDetails};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::crypto::luks1::{self, HEADER_LEN};
use crate::crypto::sector::{LuksCipher, SECTOR};
use crate::crypto::Secret;
use crate::device::{check_request, BlockDevice, DeviceInfo, Extent, ExtentKind, Format, FormatDetails, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

pub use crate::crypto::luks1::{area_len, KeySlot, Luks1Header, Luks1Params};
pub use crate::crypto::luks2::{Kdf, KdfKind, Luks2Header, Luks2Keyslot, Luks2Params};
pub use crate::crypto::sector::{IvGen, LuksHash, LuksMode};

const S: u64 = SECTOR as u64;

/// How to open a LUKS volume.
#[derive(Debug, Clone, Default)]
pub struct LuksOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// The passphrase.
    pub key: Option<Secret>,
    /// Open without a passphrase for looking at the header (read-only).
    pub inspect_only: bool,
    /// The detached header, when the header is not at the payload's start.
    pub header: Option<Arc<dyn Storage>>,
    /// Open read-write but inactive, as the destination of a handoff
    /// ([`BlockDevice::activate`] makes it usable; LUKS1 without a detached
    /// header).
    pub inactive: bool,
}

/// LUKS facts for `info` (what `qemu-img info` shows under `encrypt`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LuksDetails {
    /// `aes-256` and so on.
    pub cipher_alg: String,
    /// `xts` or `cbc`.
    pub cipher_mode: String,
    /// `plain`, `plain64` or `essiv`.
    pub ivgen_alg: String,
    /// The ESSIV hash.
    pub ivgen_hash_alg: Option<String>,
    /// PBKDF2 and AF hash.
    pub hash_alg: String,
    /// Payload offset in bytes.
    pub payload_offset: u64,
    /// Master-key digest iterations.
    pub master_key_iters: u32,
    /// Volume UUID.
    pub uuid: String,
    /// The header is in its own file.
    pub detached_header: bool,
    /// Key slots: active, iterations (active only), key offset in bytes, stripes.
    pub slots: Vec<(bool, Option<u32>, u64, u32)>,
    /// The LUKS2 facts (`None` for LUKS1).
    pub luks2: Option<Luks2Details>,
}

impl LuksDetails {
    /// The facts of header `h`.
    pub fn of(h: &Luks1Header, detached: bool) -> LuksDetails {
        let bits = match h.mode {
            LuksMode::Xts => h.key_bytes * 4,
            LuksMode::Cbc => h.key_bytes * 8,
        };
        let (iv, ivh) = match h.ivgen {
            IvGen::Plain => ("plain", None),
            IvGen::Plain64 => ("plain64", None),
            IvGen::Essiv(x) => ("essiv", Some(x.name().to_string())),
        };
        LuksDetails {
            cipher_alg: format!("{}-{bits}", h.cipher_name),
            cipher_mode: match h.mode {
                LuksMode::Xts => "xts".into(),
                LuksMode::Cbc => "cbc".into(),
            },
            ivgen_alg: iv.into(),
            ivgen_hash_alg: ivh,
            hash_alg: h.hash.name().into(),
            payload_offset: h.payload_bytes(),
            master_key_iters: h.mk_digest_iter,
            uuid: h.uuid.clone(),
            detached_header: detached,
            slots: h
                .slots
                .iter()
                .map(|s| (s.active, s.active.then_some(s.iterations), u64::from(s.key_offset) * S, s.stripes))
                .collect(),
            luks2: None,
        }
    }
}

/// The header of an open volume (one per volume: its size does not matter).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum Meta {
    V1(Luks1Header),
    V2(Box<Luks2Header>),
}

/// An open LUKS volume.
#[must_use = "call flush() to make writes durable"]
pub struct Luks {
    /// Where the header lives (the payload file unless detached).
    header_file: Arc<dyn Storage>,
    /// The payload file.
    payload: Arc<dyn Storage>,
    detached: bool,
    header: Mutex<Meta>,
    /// `None` when opened for inspection only.
    cipher: Option<LuksCipher>,
    /// The passphrase it was opened with (for key-slot changes).
    passphrase: Option<Secret>,
    /// Payload byte offset in the payload file.
    offset: u64,
    /// Bytes per encryption sector (LUKS2 `sector_size`; 512 for LUKS1).
    unit: u64,
    /// Added to the 512-byte sector number for the IV (LUKS2 `iv_tweak`).
    iv_base: u64,
    /// The payload length is fixed (a LUKS2 segment with a `size`).
    fixed_size: bool,
    size: AtomicU64,
    read_only: bool,
    unsynced: AtomicBool,
    /// Unaligned writes (read-modify-write of a sector) exclude others.
    rmw: RwLock<()>,
    /// Handed off ([`BlockDevice::inactivate`]), and the gate requests pass.
    handoff: crate::handoff::Handoff,
}

impl std::fmt::Debug for Luks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Luks")
            .field("offset", &self.offset)
            .field("size", &self.size)
            .field("detached", &self.detached)
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

fn lerr(e: Error, st: &dyn Storage) -> Error {
    let e = e.with_format("luks");
    match st.path() {
        Some(p) => e.with_path(p),
        None => e,
    }
}

/// Reads and validates the LUKS1 header at the start of `st`.
pub fn read_header(st: &dyn Storage) -> Result<Luks1Header> {
    let len = st.len()?;
    if len < HEADER_LEN as u64 {
        return Err(lerr(Error::invalid(format!("file of {len} bytes is too short for a LUKS header")), st));
    }
    let mut b = vec![0u8; HEADER_LEN];
    st.read_at(&mut b, 0)?;
    let h = Luks1Header::parse(&b).map_err(|e| lerr(e, st))?;
    if h.area_end() > len {
        return Err(lerr(
            Error::invalid(format!(
                "LUKS key material ends at {} bytes, past the end of the file ({len} bytes)",
                h.area_end()
            ))
            .with_field("key_slot.key_offset"),
            st,
        ));
    }
    Ok(h)
}

impl Luks {
    /// Opens the LUKS volume in `payload` (its header at the start, or in
    /// `opts.header`).
    pub fn open(payload: Arc<dyn Storage>, opts: LuksOptions) -> Result<Luks> {
        let detached = opts.header.is_some();
        let header_file = opts.header.clone().unwrap_or_else(|| payload.clone());
        if v2::is_luks2_file(&*header_file)? {
            return Luks::open_luks2(payload, header_file, opts);
        }
        let h = read_header(&*header_file)?;
        let read_only = opts.read_only || payload.is_read_only() || header_file.is_read_only() && !detached;
        let offset = if detached { 0 } else { h.payload_bytes() };
        if !detached && offset < h.area_end() {
            return Err(lerr(
                Error::invalid(format!(
                    "LUKS payload offset {offset} lies inside the key material (which ends at {})",
                    h.area_end()
                ))
                .with_field("payload_offset"),
                &*header_file,
            ));
        }
        let plen = payload.len()?;
        if plen < offset {
            return Err(lerr(
                Error::invalid(format!("the file of {plen} bytes ends before the LUKS payload offset {offset}"))
                    .with_field("payload_offset"),
                &*header_file,
            ));
        }
        let cipher = match &opts.key {
            Some(k) => {
                let (mk, _) =
                    h.unlock(k, None, &|o, b| header_file.read_at(b, o)).map_err(|e| lerr(e, &*header_file))?;
                Some(h.cipher(&mk)?)
            }
            None if opts.inspect_only && opts.read_only => None,
            None => {
                return Err(lerr(
                    Error::new(ErrorKind::Crypto, "the volume is encrypted (LUKS): a passphrase is needed to open it"),
                    &*header_file,
                ))
            }
        };
        let size = (plen - offset) / S * S;
        Ok(Luks {
            header_file,
            payload,
            detached,
            header: Mutex::new(Meta::V1(h)),
            cipher,
            passphrase: opts.key.clone(),
            offset,
            unit: S,
            iv_base: 0,
            fixed_size: false,
            size: AtomicU64::new(size),
            read_only,
            unsynced: AtomicBool::new(false),
            rmw: RwLock::new(()),
            handoff: crate::handoff::Handoff::new(opts.inactive),
        })
    }

    /// Rereads what another host or process may have changed while this
    /// open was inactive (or read-only beside a writer): the key slots
    /// (cryptsetup luksAddKey/luksKillSlot) and the volume's size. The
    /// cipher, master-key digest, payload offset and UUID must be those
    /// this open decrypts with; a header that changed them (reformatted)
    /// is refused.
    fn reload(&self) -> Result<()> {
        let h = read_header(&*self.header_file)?;
        {
            let guard = self.header.lock();
            let Meta::V1(old) = &*guard else {
                return Err(lerr(Error::unsupported("LUKS2 volumes are not reread yet"), &*self.header_file));
            };
            let same = h.cipher_name == old.cipher_name
                && h.cipher_mode == old.cipher_mode
                && h.hash_spec == old.hash_spec
                && h.payload_offset == old.payload_offset
                && h.key_bytes == old.key_bytes
                && h.mk_digest == old.mk_digest
                && h.mk_digest_salt == old.mk_digest_salt
                && h.mk_digest_iter == old.mk_digest_iter
                && h.uuid == old.uuid;
            if !same {
                return Err(lerr(
                    Error::invalid("the LUKS header's cipher, master key or UUID changed while it was handed off: reopen the volume")
                        .with_field("header"),
                    &*self.header_file,
                ));
            }
        }
        let plen = self.payload.len()?;
        if plen < self.offset {
            return Err(lerr(
                Error::invalid(format!("the file of {plen} bytes ends before the LUKS payload offset {}", self.offset))
                    .with_field("payload_offset"),
                &*self.header_file,
            ));
        }
        *self.header.lock() = Meta::V1(h);
        self.size.store((plen - self.offset) / self.unit * self.unit, Ordering::Release);
        Ok(())
    }

    /// A detached header is a second locked file, and a LUKS2 header is
    /// not reread yet: such volumes refuse a handoff.
    fn check_handoff(&self) -> Result<()> {
        if self.detached {
            return Err(lerr(
                Error::unsupported("a LUKS volume with a detached header is not handed off (two files to relock)"),
                &*self.payload,
            ));
        }
        if matches!(&*self.header.lock(), Meta::V2(_)) {
            return Err(lerr(Error::unsupported("LUKS2 volumes are not handed off yet"), &*self.payload));
        }
        Ok(())
    }

    fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        check_request(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let u = self.unit;
        let head = offset % u;
        if head == 0 && (buf.len() as u64).is_multiple_of(u) {
            let _g = self.rmw.read();
            return self.write_sectors(buf, offset);
        }
        let _g = self.rmw.write();
        let start = offset - head;
        let end = (offset + buf.len() as u64).div_ceil(u) * u;
        let mut tmp = vec![0u8; (end - start) as usize];
        // Only the first and last sectors need their old contents.
        let n = tmp.len();
        let us = u as usize;
        self.read_sectors(&mut tmp[..us], start)?;
        if n > us {
            self.read_sectors(&mut tmp[n - us..], end - u)?;
        }
        tmp[head as usize..head as usize + buf.len()].copy_from_slice(buf);
        self.write_sectors(&tmp, start)
    }

    /// Creates a LUKS volume of `size` bytes (rounded up to sectors) in
    /// `payload` (truncated), keyed by `passphrase` in slot 0; with
    /// `header` (and `params.detached`) the header goes there and `payload`
    /// holds only data.
    pub fn create(
        payload: Arc<dyn Storage>,
        header: Option<Arc<dyn Storage>>,
        size: u64,
        params: &Luks1Params,
        passphrase: &Secret,
    ) -> Result<Luks> {
        let p = Luks1Params { detached: header.is_some(), ..params.clone() };
        let hf = header.clone().unwrap_or_else(|| payload.clone());
        if size > crate::limits::MAX_VIRTUAL_SIZE {
            return Err(Error::limit(format!(
                "LUKS volume size {size} is larger than {}",
                crate::limits::MAX_VIRTUAL_SIZE
            ))
            .with_field("size")
            .with_format("luks"));
        }
        let size = size.div_ceil(S) * S;
        let h = Luks::create_header(&*hf, &p, passphrase)?;
        if header.is_some() {
            payload.set_len(0)?;
            payload.set_len(size)?;
        } else {
            let end = h.payload_bytes().checked_add(size).ok_or_else(|| {
                Error::limit(format!("LUKS volume size {size} is too large")).with_field("size").with_format("luks")
            })?;
            payload.set_len(end)?;
        }
        hf.sync()?;
        payload.sync()?;
        Luks::open(payload, LuksOptions { key: Some(passphrase.clone()), header, ..Default::default() })
    }

    /// Writes a new LUKS1 header with its key material (slot 0 opened by
    /// `passphrase`) at the start of `hf`, which is truncated first: the
    /// whole of a detached header file, or the start of a volume (whose
    /// payload the caller sizes).
    pub fn create_header(hf: &dyn Storage, p: &Luks1Params, passphrase: &Secret) -> Result<Luks1Header> {
        let (h, _mk, (off, mat)) = luks1::create(p, passphrase)?;
        let area = luks1::area_len(p);
        hf.set_len(0)?;
        hf.write_at(&vec![0u8; area as usize], 0)?;
        hf.write_at(&h.encode(), 0)?;
        hf.write_at(&mat, off)?;
        hf.sync()?;
        Ok(h)
    }

    /// The payload file.
    pub fn payload_file(&self) -> &Arc<dyn Storage> {
        &self.payload
    }

    /// The current LUKS1 header (`None` for a LUKS2 volume).
    pub fn header(&self) -> Option<Luks1Header> {
        match &*self.header.lock() {
            Meta::V1(h) => Some(h.clone()),
            Meta::V2(_) => None,
        }
    }

    /// The LUKS2 header (`None` for a LUKS1 volume).
    pub fn luks2_header(&self) -> Option<Luks2Header> {
        match &*self.header.lock() {
            Meta::V1(_) => None,
            Meta::V2(h) => Some((**h).clone()),
        }
    }

    /// Flushes and closes the volume.
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    fn cipher(&self) -> Result<&LuksCipher> {
        self.cipher.as_ref().ok_or_else(|| {
            Error::new(ErrorKind::Crypto, "the volume was opened without its passphrase: data cannot be read")
                .with_format("luks")
        })
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only(what).with_format("luks"));
        }
        if !self.unsynced.load(Ordering::Relaxed) {
            self.unsynced.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Reads and decrypts whole sectors at guest `offset`.
    fn read_sectors(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let c = self.cipher()?;
        self.payload.read_at(buf, self.offset + offset)?;
        decrypt_parallel(c, self.iv_base.wrapping_add(offset / S), buf)
    }

    fn write_sectors(&self, buf: &[u8], offset: u64) -> Result<()> {
        let c = self.cipher()?;
        let mut enc = buf.to_vec();
        encrypt_parallel(c, self.iv_base.wrapping_add(offset / S), &mut enc)?;
        self.payload.write_at(&enc, self.offset + offset)
    }
}

/// Work split between threads above this many bytes.
const PARALLEL_MIN: usize = 256 << 10;

fn parallel(c: &LuksCipher, sector: u64, buf: &mut [u8], enc: bool) -> Result<()> {
    let run = |s: u64, b: &mut [u8]| if enc { c.encrypt(s, b) } else { c.decrypt(s, b) };
    if buf.len() < PARALLEL_MIN {
        return run(sector, buf);
    }
    // Asked once: the answer costs system calls (affinity, cgroup quota).
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8));
    if threads < 2 {
        return run(sector, buf);
    }
    let unit = c.unit();
    let chunk = buf.len().div_ceil(threads).div_ceil(unit) * unit;
    std::thread::scope(|sc| {
        let hs: Vec<_> = buf
            .chunks_mut(chunk)
            .enumerate()
            .map(|(i, b)| {
                let s = sector + (i * chunk / SECTOR) as u64;
                sc.spawn(move || run(s, b))
            })
            .collect();
        hs.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(Error::internal("cipher thread panicked"))))
    })
}

/// Decrypts whole sectors, on several threads for large buffers.
pub(crate) fn decrypt_parallel(c: &LuksCipher, sector: u64, buf: &mut [u8]) -> Result<()> {
    parallel(c, sector, buf, false)
}

/// Encrypts whole sectors, on several threads for large buffers.
pub(crate) fn encrypt_parallel(c: &LuksCipher, sector: u64, buf: &mut [u8]) -> Result<()> {
    parallel(c, sector, buf, true)
}

impl Drop for Luks {
    fn drop(&mut self) {
        if self.unsynced.load(Ordering::Acquire) {
            let _ = self.payload.sync();
        }
    }
}

impl BlockDevice for Luks {
    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new(Format::Luks, self.size(), self.read_only);
        info.encrypted = true;
        info.path = self.payload.path().map(|p| p.to_path_buf());
        info.details = FormatDetails::Luks(match &*self.header.lock() {
            Meta::V1(h) => LuksDetails::of(h, self.detached),
            Meta::V2(h) => LuksDetails::of_luks2(h, self.detached),
        });
        info
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let _active = self.handoff.enter("luks")?;
        let u = self.unit;
        let head = offset % u;
        if head == 0 && (buf.len() as u64).is_multiple_of(u) {
            return self.read_sectors(buf, offset);
        }
        let start = offset - head;
        let end = (offset + buf.len() as u64).div_ceil(u) * u;
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_sectors(&mut tmp, start)?;
        buf.copy_from_slice(&tmp[head as usize..head as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _active = self.handoff.enter("luks")?;
        self.write_inner(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _mode: ZeroMode) -> Result<()> {
        let _active = self.handoff.enter("luks")?;
        // Zeros must be stored encrypted: no hole reads as zeros.
        crate::storage::write_zeros_with(offset, len, |buf, at| self.write_inner(buf, at))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Advisory; a hole would read as garbage, so nothing is given back.
        self.check_writable("discard")?;
        let _active = self.handoff.enter("luks")?;
        check_request(offset, len, self.size())
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.size();
        check_request(offset, 0, size)?;
        let _active = self.handoff.enter("luks")?;
        let len = max_len.min(size - offset);
        Ok(Extent {
            offset,
            length: len,
            kind: ExtentKind::Data { host_offset: Some(self.offset + offset) },
            depth: 0,
            encrypted: true,
        })
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.unsynced.store(false, Ordering::Release);
        self.payload.sync().inspect_err(|_| self.unsynced.store(true, Ordering::Release))?;
        if self.detached {
            self.header_file.sync()?;
        }
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable("resize")?;
        let _active = self.handoff.enter("luks")?;
        if self.fixed_size {
            return Err(Error::unsupported("this LUKS2 volume's segment has a fixed size: it cannot be resized")
                .with_format("luks"));
        }
        if !new_size.is_multiple_of(self.unit) {
            return Err(Error::invalid_argument(format!(
                "LUKS volume size {new_size} is not a multiple of its {}-byte sectors",
                self.unit
            )));
        }
        let end = self.offset.checked_add(new_size).filter(|_| new_size <= crate::limits::MAX_VIRTUAL_SIZE);
        let end = end.ok_or_else(|| {
            Error::limit(format!("LUKS volume size {new_size} is too large")).with_field("size").with_format("luks")
        })?;
        // Unaligned writes (read-modify-write) are excluded while the
        // file's length changes, so none extends a shrunk file again.
        let _rmw = self.rmw.write();
        self.payload.set_len(end)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Every write goes straight to the payload (no metadata changes), so
    /// inactivating syncs, as a close does.
    fn inactivate(&self) -> Result<()> {
        self.check_handoff()?;
        self.handoff.inactivate(&*self.payload, self.read_only, || self.flush())
    }

    fn activate(&self) -> Result<()> {
        self.check_handoff()?;
        self.handoff.activate(&*self.payload, self.read_only, "luks", || self.reload())
    }

    fn is_inactive(&self) -> bool {
        self.handoff.is_inactive()
    }

    fn refresh(&self) -> Result<()> {
        self.check_handoff()?;
        self.handoff.refresh(self.read_only, "luks", || self.reload())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn params() -> Luks1Params {
        Luks1Params { iter_time_ms: 1, ..Default::default() }
    }

    #[test]
    fn sizes_near_the_top_of_u64_are_errors_not_overflows() {
        let pass = Secret::new("p");
        for size in [u64::MAX, u64::MAX - 511, 0xffff_ffff_ffff_fe00] {
            let e = Luks::create(Arc::new(MemStorage::new()), None, size, &params(), &pass).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{size}: {e}");
        }
        let v = Luks::create(Arc::new(MemStorage::new()), None, 1 << 20, &params(), &pass).unwrap();
        let e = v.resize(0xffff_ffff_ffff_fe00).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
        assert_eq!(v.size(), 1 << 20);
    }

    #[test]
    fn create_write_reopen_read() {
        let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let pass = Secret::new("pw");
        let l = Luks::create(st.clone(), None, 1 << 20, &params(), &pass).unwrap();
        assert_eq!(l.size(), 1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        l.write_at(&data, 12345).unwrap();
        l.flush().unwrap();
        drop(l);
        let l = Luks::open(st.clone(), LuksOptions { key: Some(pass), ..Default::default() }).unwrap();
        let mut back = vec![0u8; data.len()];
        l.read_at(&mut back, 12345).unwrap();
        assert_eq!(back, data);
        // Plaintext is nowhere in the file.
        let mut raw = vec![0u8; st.len().unwrap() as usize];
        st.read_at(&mut raw, 0).unwrap();
        assert!(!raw.windows(64).any(|w| w == &data[1000..1064]));
        let e =
            Luks::open(st.clone(), LuksOptions { key: Some(Secret::new("bad")), ..Default::default() }).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Crypto);
        let i = Luks::open(st, LuksOptions { inspect_only: true, read_only: true, ..Default::default() }).unwrap();
        assert!(i.read_at(&mut back, 0).is_err());
        assert!(matches!(i.info().details, FormatDetails::Luks(_)));
    }

    #[test]
    fn detached_header_keeps_payload_alone() {
        let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let hd: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let pass = Secret::new("pw");
        let l = Luks::create(st.clone(), Some(hd.clone()), 65536, &params(), &pass).unwrap();
        l.write_at(&[7u8; 1000], 0).unwrap();
        drop(l);
        assert_eq!(st.len().unwrap(), 65536);
        let l = Luks::open(st, LuksOptions { key: Some(pass), header: Some(hd), ..Default::default() }).unwrap();
        let mut b = [0u8; 1000];
        l.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [7u8; 1000]);
    }
}
