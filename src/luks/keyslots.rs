//! Key-slot management as `qemu-img amend` does it (`state=active` with
//! `new-secret` adds a passphrase, `state=inactive` with `keyslot` or
//! `old-secret` removes some), for standalone volumes and qcow2's LUKS
//! header alike: the header area is reached at `base` of a storage.
//!
//! Order on disk, so a crash leaves the volume openable with the
//! passphrases it had: a new slot's key material is written and synced
//! before the header names it; a removed slot is marked inactive in the
//! header (synced) before its material is overwritten with random bytes.
//! Removing the last usable slot is refused unless forced.

use crate::crypto::luks1::{self, Luks1Header, SLOTS};
use crate::crypto::Secret;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

use super::Luks;

/// `state=active` or `state=inactive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Add a passphrase.
    Active,
    /// Remove passphrases.
    Inactive,
}

/// A key-slot change (qemu-img amend's `encrypt.*` options for qcow2, or
/// the bare names for luks).
#[derive(Debug, Clone)]
pub struct KeyslotChange {
    /// `state`.
    pub state: SlotState,
    /// `keyslot`: the slot to fill or erase.
    pub keyslot: Option<usize>,
    /// `new-secret`: the passphrase to add.
    pub new_secret: Option<Secret>,
    /// `old-secret`: with `active`, the passphrase that unlocks the master
    /// key (default: the one the image was opened with); with `inactive`,
    /// every slot it opens is erased.
    pub old_secret: Option<Secret>,
    /// `iter-time` for the new slot, in milliseconds (default 2000).
    pub iter_time_ms: Option<u64>,
    /// Allow erasing the last active slot or overwriting an active one.
    pub force: bool,
}

impl KeyslotChange {
    /// Parses qemu-img amend options (`state`, `keyslot`, `new-secret`,
    /// `old-secret`, `iter-time`, already stripped of any `encrypt.`
    /// prefix); `secret` resolves a secret id.
    pub fn parse(opts: &[(&str, &str)], secret: &dyn Fn(&str) -> Result<Secret>) -> Result<KeyslotChange> {
        let mut c = KeyslotChange {
            state: SlotState::Active,
            keyslot: None,
            new_secret: None,
            old_secret: None,
            iter_time_ms: None,
            force: false,
        };
        let mut state = None;
        for &(k, v) in opts {
            match k {
                "state" => {
                    state = Some(match v {
                        "active" => SlotState::Active,
                        "inactive" => SlotState::Inactive,
                        _ => return Err(Error::invalid_argument(format!("state '{v}' is not active or inactive"))),
                    })
                }
                "keyslot" => {
                    // LUKS1 has 8 slots (checked where applied), LUKS2 32.
                    let max = crate::limits::LUKS2_MAX_OBJECTS;
                    let n: usize = v.parse().ok().filter(|&n| n < max).ok_or_else(|| {
                        Error::invalid_argument(format!("keyslot '{v}' is not a slot number (0 to {})", max - 1))
                    })?;
                    c.keyslot = Some(n);
                }
                "new-secret" => c.new_secret = Some(secret(v)?),
                "old-secret" => c.old_secret = Some(secret(v)?),
                "iter-time" => {
                    c.iter_time_ms = Some(
                        v.parse()
                            .ok()
                            .filter(|&t: &u64| (1..=3_600_000).contains(&t))
                            .ok_or_else(|| Error::invalid_argument(format!("iter-time '{v}' is not milliseconds")))?,
                    )
                }
                other => return Err(Error::invalid_argument(format!("invalid key-slot option '{other}'"))),
            }
        }
        c.state =
            state.ok_or_else(|| Error::invalid_argument("key-slot changes need state=active or state=inactive"))?;
        match c.state {
            SlotState::Active if c.new_secret.is_none() => {
                return Err(Error::invalid_argument("state=active needs new-secret (the passphrase to add)"))
            }
            SlotState::Inactive if c.new_secret.is_some() => {
                return Err(Error::invalid_argument("new-secret makes no sense with state=inactive"))
            }
            SlotState::Inactive if c.keyslot.is_none() && c.old_secret.is_none() => {
                return Err(Error::invalid_argument("state=inactive needs keyslot or old-secret (what to erase)"))
            }
            _ => {}
        }
        Ok(c)
    }
}

/// Applies `c` to the LUKS header area at `base` of `st`; `unlock` is the
/// passphrase the image was opened with. Returns the new header.
pub(crate) fn apply(st: &dyn Storage, base: u64, unlock: &Secret, c: &KeyslotChange) -> Result<Luks1Header> {
    let mut b = vec![0u8; luks1::HEADER_LEN];
    st.read_at(&mut b, base)?;
    let mut h = Luks1Header::parse(&b)?;
    if let Some(n) = c.keyslot.filter(|&n| n >= SLOTS) {
        return Err(Error::invalid_argument(format!("keyslot {n} is not a LUKS1 slot number (0 to {})", SLOTS - 1)));
    }
    let read = |o: u64, buf: &mut [u8]| st.read_at(buf, base + o);
    match c.state {
        SlotState::Active => {
            let (mk, _) = h.unlock(c.old_secret.as_ref().unwrap_or(unlock), None, &read)?;
            let free = h.slots.iter().position(|s| !s.active);
            let (slot, overwrite) = match c.keyslot {
                Some(n) if h.slots[n].active && !c.force => {
                    return Err(Error::invalid_argument(format!(
                        "refusing to overwrite active key slot {n} (erase it first, or force)"
                    )))
                }
                Some(n) => (n, h.slots[n].active),
                None => (
                    free.ok_or_else(|| {
                        Error::new(ErrorKind::Crypto, "all 8 LUKS key slots are in use: erase one first")
                    })?,
                    false,
                ),
            };
            let new = c.new_secret.as_ref().ok_or_else(|| Error::internal("new-secret missing"))?;
            if new.expose().is_empty() {
                return Err(Error::invalid_argument("the new passphrase is empty"));
            }
            let iters = luks1::iterations_for(h.hash, c.iter_time_ms.unwrap_or(2000), h.key_bytes as usize);
            // Material synced before the header that points at it; the
            // header synced before the material it stops pointing at is
            // wiped.
            let fill = |h: &mut Luks1Header, i: usize| -> Result<()> {
                let (off, mat) = h.set_slot(i, &mk, new, iters)?;
                st.write_at(&mat, base + off)?;
                st.sync()?;
                st.write_at(&h.encode(), base)?;
                st.sync()
            };
            let erase = |h: &mut Luks1Header, i: usize| -> Result<()> {
                let (off, junk) = h.clear_slot(i)?;
                st.write_at(&h.encode(), base)?;
                st.sync()?;
                st.write_at(&junk, base + off)?;
                st.sync()
            };
            match free {
                // Overwriting an active slot in place would leave it opened
                // by neither passphrase if a crash came between material
                // and header (the whole volume lost if it was the only
                // slot): the new passphrase goes to a free slot first, and
                // moves into the asked slot once the old one is erased.
                Some(f) if overwrite => {
                    fill(&mut h, f)?;
                    erase(&mut h, slot)?;
                    fill(&mut h, slot)?;
                    erase(&mut h, f)?;
                }
                // No free slot: the seven other active slots keep the
                // volume openable while this one is rewritten.
                _ => fill(&mut h, slot)?,
            }
        }
        SlotState::Inactive => {
            let mut erase: Vec<usize> = Vec::new();
            if let Some(old) = &c.old_secret {
                // Every candidate slot is tried: the unlock budget holds for
                // all of them together, not for each.
                let work: u64 = (0..SLOTS)
                    .filter(|&i| h.slots[i].active && c.keyslot.is_none_or(|k| k == i))
                    .map(|i| u64::from(h.slots[i].iterations) + u64::from(h.mk_digest_iter))
                    .sum();
                if work > crate::limits::LUKS_MAX_UNLOCK_ITERATIONS {
                    return Err(Error::limit(format!(
                        "trying every key slot with old-secret would take {work} PBKDF2 iterations, more than {}",
                        crate::limits::LUKS_MAX_UNLOCK_ITERATIONS
                    ))
                    .with_field("key_slot.iterations"));
                }
                for i in 0..SLOTS {
                    if h.slots[i].active && c.keyslot.is_none_or(|k| k == i) && h.unlock(old, Some(i), &read).is_ok() {
                        erase.push(i);
                    }
                }
                if erase.is_empty() {
                    return Err(Error::new(ErrorKind::Crypto, "no active key slot opens with old-secret"));
                }
            } else if let Some(n) = c.keyslot {
                if h.slots[n].active {
                    erase.push(n);
                }
            }
            let left = h.slots.iter().enumerate().filter(|(i, s)| s.active && !erase.contains(i)).count();
            if left == 0 && !c.force {
                return Err(Error::invalid_argument(
                    "refusing to erase the last active key slot: the volume could never be opened again (force to do it anyway)",
                ));
            }
            let mut wipes = Vec::new();
            for &i in &erase {
                wipes.push(h.clear_slot(i)?);
            }
            st.write_at(&h.encode(), base)?;
            st.sync()?;
            for (off, junk) in wipes {
                st.write_at(&junk, base + off)?;
            }
            st.sync()?;
        }
    }
    Ok(h)
}

impl Luks {
    /// Adds or removes passphrases (see [`KeyslotChange`]).
    pub fn change_keyslots(&self, c: &KeyslotChange) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("amend").with_format("luks"));
        }
        let key = self.passphrase.as_ref().ok_or_else(|| {
            Error::new(ErrorKind::Crypto, "the volume was opened without its passphrase").with_format("luks")
        })?;
        let mut h = self.header.lock();
        if let super::Meta::V2(h2) = &*h {
            let new = self.change_luks2_keyslots(h2, key, c).map_err(|e| e.with_format("luks"))?;
            *h = super::Meta::V2(Box::new(new));
            return Ok(());
        }
        *h = super::Meta::V1(apply(&*self.header_file, 0, key, c).map_err(|e| e.with_format("luks"))?);
        Ok(())
    }
}
