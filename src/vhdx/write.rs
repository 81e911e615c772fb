//! The write side of [`Vhdx`]: the session header update, logged BAT
//! updates, allocating writes, zeroing, and the flush that empties the log.
//!
//! Lock order: `state` (allocations, the log, the headers), then `bat`.

use std::sync::atomic::Ordering;

use super::format::*;
use super::log::{LogWriter, SECTOR};
use super::{State, Vhdx};
use crate::device::{BlockDevice, ZeroMode};
use crate::error::{Error, ErrorKind, Result};

impl Vhdx {
    /// Makes the headers carry this session's GUIDs (and, with `log`, a
    /// fresh log GUID) before the first write, as the spec requires.
    pub(super) fn begin(&self, st: &mut State, want_log: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write"));
        }
        let need_session = !st.session;
        let need_log = want_log && st.log.is_none();
        if !need_session && !need_log {
            return Ok(());
        }
        let new_log = need_log.then(Guid::random);
        let data_guid = need_session.then(Guid::random);
        for _ in 0..2 {
            let mut h = st.header.clone();
            h.sequence = h.sequence.wrapping_add(1);
            h.file_write_guid = self.session_guid;
            if let Some(g) = data_guid {
                h.data_write_guid = g;
            }
            if let Some(g) = new_log {
                h.log_guid = g;
            }
            let slot = 1 - st.cur;
            self.file.write_at(&h.encode(), HEADER_OFFSETS[slot])?;
            self.file.sync()?;
            st.cur = slot;
            st.header = h;
        }
        st.session = true;
        self.session.store(true, Ordering::Release);
        if let Some(g) = new_log {
            st.log = Some(LogWriter::new(st.header.log_offset, u64::from(st.header.log_length), g));
            st.pending_bytes = 0;
        }
        Ok(())
    }

    pub(super) fn ensure_session(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write"));
        }
        if !self.session.load(Ordering::Acquire) {
            let mut st = self.state.lock();
            self.begin(&mut st, false)?;
        }
        Ok(())
    }

    /// Sets BAT entries through the log: the entry holding the changed BAT
    /// sectors is written and synced, then the sectors are written in place.
    /// Changes touching more BAT sectors than one log entry can carry (a
    /// zeroing of terabytes) go in several entries, each complete in itself.
    pub(super) fn update_bat(&self, st: &mut State, changes: &[(u64, u64)]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        if st.header.log_length == 0 {
            return Err(Error::unsupported("this VHDX image has no log, so its BAT cannot be updated safely"));
        }
        // The last value asked for each entry, in entry order.
        let mut all = changes.to_vec();
        all.reverse();
        all.sort_by_key(|c| c.0);
        all.dedup_by_key(|c| c.0);
        let per = SECTOR / 8;
        let log_len = u64::from(st.header.log_length);
        let mut max_sectors = 1u64;
        while log_entry_len(max_sectors + 1) <= log_len / 2 && max_sectors < 1024 {
            max_sectors += 1;
        }
        let mut chunk: Vec<(u64, u64)> = Vec::new();
        let mut sectors = 0u64;
        let mut last_sector = None;
        for &(i, v) in &all {
            let sec = i / per;
            if last_sector != Some(sec) {
                if sectors == max_sectors {
                    self.update_bat_sectors(st, &chunk)?;
                    chunk.clear();
                    sectors = 0;
                }
                sectors += 1;
                last_sector = Some(sec);
            }
            chunk.push((i, v));
        }
        self.update_bat_sectors(st, &chunk)
    }

    /// [`update_bat`](Self::update_bat) of changes (ascending, one per
    /// entry) that fit one log entry.
    fn update_bat_sectors(&self, st: &mut State, changes: &[(u64, u64)]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.begin(st, true)?;
        let mut sectors: Vec<u64> = changes.iter().map(|(i, _)| i * 8 / SECTOR).collect();
        sectors.dedup();
        let contents: Vec<(u64, Vec<u8>)> = {
            let bat = self.bat.read();
            let per = (SECTOR / 8) as usize;
            let mut next = changes.iter().peekable();
            sectors
                .iter()
                .map(|&s| {
                    let mut b = vec![0u8; SECTOR as usize];
                    for k in 0..per {
                        let idx = s as usize * per + k;
                        let mut v = bat.get(idx).copied().unwrap_or(0);
                        if let Some(&&(_, nv)) = next.peek().filter(|(i, _)| *i as usize == idx) {
                            v = nv;
                            next.next();
                        }
                        b[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
                    }
                    (self.bat_offset + s * SECTOR, b)
                })
                .collect()
        };
        let refs: Vec<(u64, &[u8])> = contents.iter().map(|(o, b)| (*o, b.as_slice())).collect();
        let entry_len = log_entry_len(refs.len() as u64);
        let log_len = u64::from(st.header.log_length);
        if st.pending_bytes + entry_len > log_len {
            // The log would overwrite entries still needed: make everything
            // before it durable first.
            self.file.sync()?;
            st.pending_bytes = 0;
            st.unsynced = false;
        }
        let flen = self.file.len()?;
        let w = st.log.as_mut().ok_or_else(|| Error::internal("VHDX log writer missing"))?;
        if st.pending_bytes == 0 {
            st.tail = w.head();
        }
        w.write(&*self.file, &refs, flen, st.tail)?;
        self.file.sync()?;
        st.pending_bytes += entry_len;
        for (o, b) in &contents {
            self.file.write_at(b, *o)?;
        }
        st.unsynced = true;
        let mut bat = self.bat.write();
        for &(i, v) in changes {
            bat[i as usize] = v;
        }
        Ok(())
    }

    /// Writes `data` at `guest` (within one block) into a block that is not
    /// fully present: allocates a new block at the end of the file.
    pub(super) fn allocate_write(&self, data: &[u8], guest: u64) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let block = guest / bs;
        let inb = guest % bs;
        let mut st = self.state.lock();
        let e = self.entry(block);
        if e & 7 == state::FULLY_PRESENT {
            drop(st);
            return self.file.write_at(data, super::host(e, inb)?);
        }
        self.begin(&mut st, true)?;
        let off = st.end.max(self.file.len()?.next_multiple_of(MIB));
        let needs_old = self.geo.has_parent && (e & 7 == state::NOT_PRESENT || e & 7 == state::PARTIALLY_PRESENT);
        if needs_old && data.len() as u64 != bs {
            let mut whole = vec![0u8; bs as usize];
            let n = bs.min(self.geo.size - block * bs) as usize;
            self.read_block(&mut whole[..n], block * bs)?;
            whole[inb as usize..inb as usize + data.len()].copy_from_slice(data);
            self.file.write_at(&whole, off)?;
        } else {
            self.file.set_len(off + bs)?;
            self.file.write_at(data, off + inb)?;
        }
        self.file.sync()?;
        st.end = off + bs;
        let idx = self.geo.payload_index(block);
        self.update_bat(&mut st, &[(idx, off | state::FULLY_PRESENT)])
    }

    pub(super) fn flush_inner(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.state.lock();
        if !st.session {
            return Ok(());
        }
        self.file.sync()?;
        st.unsynced = false;
        st.pending_bytes = 0;
        if st.log.is_some() {
            for _ in 0..2 {
                let mut h = st.header.clone();
                h.sequence = h.sequence.wrapping_add(1);
                h.log_guid = Guid::default();
                let slot = 1 - st.cur;
                self.file.write_at(&h.encode(), HEADER_OFFSETS[slot])?;
                self.file.sync()?;
                st.cur = slot;
                st.header = h;
            }
            st.log = None;
        }
        Ok(())
    }

    pub(super) fn zero_blocks(&self, offset: u64, len: u64, mode: ZeroMode, discard: bool) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let mut changes = Vec::new();
        let mut partial = Vec::new();
        self.for_blocks(offset, len, |g, r| {
            let whole = g % bs == 0 && (r.len() as u64 == bs || g + r.len() as u64 == self.geo.size);
            if !whole {
                partial.push((g, r.len() as u64));
                return Ok(());
            }
            let block = g / bs;
            let e = self.entry(block);
            let st = e & 7;
            match st {
                state::FULLY_PRESENT => {
                    let host = e & BAT_OFFSET_MASK;
                    let n = r.len() as u64;
                    if mode == ZeroMode::MayUnmap || discard {
                        match self.file.punch_hole(host, n) {
                            Ok(()) => {}
                            Err(err) if err.kind() == ErrorKind::Unsupported && discard => {}
                            Err(err) if err.kind() == ErrorKind::Unsupported => {
                                crate::storage::write_zeroes_slow(&*self.file, host, n)?
                            }
                            Err(err) => return Err(err),
                        }
                    } else {
                        crate::storage::write_zeroes_slow(&*self.file, host, n)?;
                    }
                }
                _ if discard => {}
                _ if mode == ZeroMode::Allocate => partial.push((g, r.len() as u64)),
                state::NOT_PRESENT | state::PARTIALLY_PRESENT if self.geo.has_parent => {
                    changes.push((self.geo.payload_index(block), state::ZERO))
                }
                state::PARTIALLY_PRESENT => return Err(Error::corrupt("partially present block without a parent")),
                _ => {}
            }
            Ok(())
        })?;
        if !changes.is_empty() {
            let mut st = self.state.lock();
            self.update_bat(&mut st, &changes)?;
        }
        if !discard {
            let zeros = vec![0u8; bs.min(len) as usize];
            for (g, n) in partial {
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(zeros.len() as u64);
                    self.write_at(&zeros[..k as usize], g + done)?;
                    done += k;
                }
            }
        }
        Ok(())
    }
}

/// Bytes of a log entry carrying `n` data sectors.
pub(super) fn log_entry_len(n: u64) -> u64 {
    ((n + 2).div_ceil(128) + n) * SECTOR
}
