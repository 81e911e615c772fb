//! The VHDX metadata log: finding the active sequence and replaying it
//! (into the file, or in memory for a read-only open), and writing entries
//! of our own so that a BAT update is never half done after a crash.
//!
//! A log entry is a run of 4 KiB sectors in the circular log region: a
//! header (`loge`) with descriptors, then one data sector (`data`) per data
//! descriptor. A data descriptor carries the first 8 and the last 4 bytes of
//! its target sector; the data sector the 4084 between. A zero descriptor
//! zeroes a range. The checksum (CRC-32C) covers the whole entry. The
//! active sequence is the run of consecutive valid entries (sequence numbers
//! rising by one) whose last entry (the head) has the highest sequence
//! number; it is replayed from the entry the head names as its tail (the
//! whole run when that entry is not in it, as QEMU does).
//!
//! Our writer keeps each entry self-contained: the entry's tail is itself,
//! because everything logged before it has been written in place and
//! synced before the next entry is started.

use std::sync::Arc;

use super::format::{checksum_with_hole, le32, le64, seal, Guid, Header, MIB};
use crate::error::{Error, Result};
use crate::limits::{VHDX_MAX_LOG_BYTES, VHDX_MAX_LOG_SCAN_FACTOR};
use crate::storage::Storage;

/// The log's unit.
pub const SECTOR: u64 = 4096;
const ENTRY_SIG: &[u8; 4] = b"loge";
const DATA_DESC_SIG: &[u8; 4] = b"desc";
const ZERO_DESC_SIG: &[u8; 4] = b"zero";
const DATA_SIG: &[u8; 4] = b"data";

/// One update the log makes to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write one 4 KiB sector at `offset`.
    Data {
        /// File offset (4 KiB-aligned).
        offset: u64,
        /// The sector.
        sector: Box<[u8]>,
    },
    /// Zero `len` bytes at `offset`.
    Zero {
        /// File offset (4 KiB-aligned).
        offset: u64,
        /// Bytes (a multiple of 4 KiB).
        len: u64,
    },
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Data { offset, .. } => (*offset, SECTOR),
            Op::Zero { offset, len } => (*offset, *len),
        }
    }
}

/// The active sequence of a log, ready to apply.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// Updates in order (later ones win).
    pub ops: Vec<Op>,
    /// The file must be at least this long (the head's LastFileOffset).
    pub last_file_offset: u64,
    /// Entries in the active sequence.
    pub entries: usize,
    /// The head's sequence number.
    pub head_sequence: u64,
}

#[derive(Debug)]
struct Entry {
    pos: u64,
    sectors: u64,
    seq: u64,
    tail: u64,
    flushed: u64,
    last: u64,
    ops: Vec<Op>,
}

struct Scanner<'a> {
    file: &'a dyn Storage,
    start: u64,
    len: u64,
    guid: Guid,
    budget: u64,
    /// The image file's length: log bytes past it do not exist.
    file_len: u64,
}

impl Scanner<'_> {
    /// Whether the `bytes` log bytes from log position `pos` (wrapping)
    /// all lie inside the file.
    fn in_file(&self, pos: u64, bytes: u64) -> bool {
        let avail = self.file_len.saturating_sub(self.start).min(self.len);
        if avail == self.len {
            return true;
        }
        pos.checked_add(bytes).is_some_and(|end| end <= avail)
    }

    fn read(&mut self, pos: u64, sectors: u64) -> Result<Vec<u8>> {
        let bytes = sectors * SECTOR;
        if bytes > self.budget {
            return Err(
                Error::limit("VHDX log scan read more than its budget (entries claiming to overlap)").with_field("log")
            );
        }
        self.budget -= bytes;
        let mut out = vec![0u8; bytes as usize];
        let mut done = 0u64;
        while done < bytes {
            let p = (pos + done) % self.len;
            let n = (self.len - p).min(bytes - done);
            self.file.read_at(&mut out[done as usize..(done + n) as usize], self.start + p)?;
            done += n;
        }
        Ok(out)
    }

    /// The entry at `pos` of the log, if it is valid.
    fn entry(&mut self, pos: u64) -> Result<Option<Entry>> {
        let first = self.read(pos, 1)?;
        if &first[0..4] != ENTRY_SIG || first[32..48] != self.guid.0 {
            return Ok(None);
        }
        let length = u64::from(le32(&first, 8));
        let tail = u64::from(le32(&first, 12));
        let seq = le64(&first, 16);
        let count = u64::from(le32(&first, 24));
        if length == 0 || !length.is_multiple_of(SECTOR) || length > self.len || seq == 0 {
            return Ok(None);
        }
        if !tail.is_multiple_of(SECTOR) || tail >= self.len {
            return Ok(None);
        }
        let desc_sectors = (count + 2).div_ceil(128);
        let sectors = length / SECTOR;
        if desc_sectors > sectors || !self.in_file(pos, length) {
            return Ok(None);
        }
        // The descriptors first: their data descriptors must account for
        // every sector after them before the whole entry is read.
        let descs = self.read(pos, desc_sectors)?;
        let data_descs = (0..count as usize).filter(|&i| &descs[64 + 32 * i..68 + 32 * i] == DATA_DESC_SIG).count();
        if desc_sectors + data_descs as u64 != sectors {
            return Ok(None);
        }
        let all = self.read(pos, sectors)?;
        if checksum_with_hole(&all, 4) != le32(&all, 4) {
            return Ok(None);
        }
        let mut ops = Vec::with_capacity(count as usize);
        let mut data_idx = desc_sectors;
        for i in 0..count as usize {
            let d = &all[64 + 32 * i..64 + 32 * (i + 1)];
            let off = le64(d, 16);
            if le64(d, 24) != seq || !off.is_multiple_of(SECTOR) {
                return Ok(None);
            }
            if &d[0..4] == ZERO_DESC_SIG {
                let zlen = le64(d, 8);
                if !zlen.is_multiple_of(SECTOR) || off.checked_add(zlen).is_none() {
                    return Ok(None);
                }
                ops.push(Op::Zero { offset: off, len: zlen });
            } else if &d[0..4] == DATA_DESC_SIG {
                if data_idx >= sectors {
                    return Ok(None);
                }
                let s = &all[(data_idx * SECTOR) as usize..((data_idx + 1) * SECTOR) as usize];
                let sseq = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, 4092));
                if &s[0..4] != DATA_SIG || sseq != seq {
                    return Ok(None);
                }
                let mut sector = vec![0u8; SECTOR as usize].into_boxed_slice();
                sector[0..8].copy_from_slice(&d[8..16]);
                sector[8..4092].copy_from_slice(&s[8..4092]);
                sector[4092..4096].copy_from_slice(&d[4..8]);
                ops.push(Op::Data { offset: off, sector });
                data_idx += 1;
            } else {
                return Ok(None);
            }
        }
        if data_idx != sectors {
            return Ok(None);
        }
        Ok(Some(Entry { pos, sectors, seq, tail, flushed: le64(&first, 48), last: le64(&first, 56), ops }))
    }
}

/// Finds the active sequence of the log the header describes. `Ok(None)`
/// when the log is empty (zero log GUID) or holds no valid entry.
pub fn find(file: &dyn Storage, hdr: &Header, file_len: u64) -> Result<Option<Replay>> {
    if hdr.log_version != 0 {
        return Err(
            Error::unsupported(format!("VHDX log version {} is not 0", hdr.log_version)).with_field("LogVersion")
        );
    }
    let len = u64::from(hdr.log_length);
    if hdr.log_guid.is_zero() || len == 0 {
        return Ok(None);
    }
    if !len.is_multiple_of(MIB) || !hdr.log_offset.is_multiple_of(MIB) || hdr.log_offset < MIB {
        return Err(Error::invalid(format!(
            "VHDX log at {} of {len} bytes is not 1 MiB-aligned past the header area",
            hdr.log_offset
        ))
        .with_field("LogOffset"));
    }
    if len > VHDX_MAX_LOG_BYTES {
        return Err(Error::limit(format!(
            "VHDX log of {len} bytes is larger than the {VHDX_MAX_LOG_BYTES}-byte limit"
        ))
        .with_field("LogLength"));
    }
    let mut sc = Scanner {
        file,
        start: hdr.log_offset,
        len,
        guid: hdr.log_guid,
        budget: len * VHDX_MAX_LOG_SCAN_FACTOR,
        file_len,
    };
    let n = (len / SECTOR) as usize;
    // An entry cannot start where the file has no bytes (they read as zeros).
    let in_file = (file_len.saturating_sub(hdr.log_offset).div_ceil(SECTOR) as usize).min(n);
    let mut covered = vec![false; n];
    let mut best: Option<Vec<Entry>> = None;
    for start in 0..in_file {
        if covered[start] {
            continue;
        }
        let Some(e) = sc.entry(start as u64 * SECTOR)? else { continue };
        covered[start] = true;
        let mut total = e.sectors;
        let mut chain = vec![e];
        while total < n as u64 {
            let last = &chain[chain.len() - 1];
            let p = (last.pos + last.sectors * SECTOR) % len;
            match sc.entry(p)? {
                Some(e) if e.seq == last.seq.wrapping_add(1) && total + e.sectors <= n as u64 => {
                    covered[(p / SECTOR) as usize] = true;
                    total += e.sectors;
                    chain.push(e);
                }
                _ => break,
            }
        }
        let head = &chain[chain.len() - 1];
        if let Some(k) = chain.iter().position(|c| c.pos == head.tail) {
            chain.drain(..k);
        }
        let better = match &best {
            None => true,
            Some(b) => chain[chain.len() - 1].seq > b[b.len() - 1].seq,
        };
        if better {
            best = Some(chain);
        }
    }
    let Some(chain) = best else { return Ok(None) };
    let head = &chain[chain.len() - 1];
    for e in &chain {
        if e.flushed > file_len {
            return Err(Error::corrupt(format!(
                "VHDX log entry {} says the file was flushed at {} bytes, but it has {file_len}: the file was truncated",
                e.seq, e.flushed
            ))
            .with_field("FlushedFileOffset"));
        }
    }
    let bound = file_len.saturating_add(crate::limits::VHDX_MAX_LOG_GROWTH);
    if head.last > file_len.saturating_add(crate::limits::VHDX_MAX_LOG_GROWTH) {
        return Err(Error::limit(format!("VHDX log would grow the file from {file_len} to {} bytes", head.last))
            .with_field("LastFileOffset"));
    }
    let mut out =
        Replay { last_file_offset: head.last, entries: chain.len(), head_sequence: head.seq, ops: Vec::new() };
    for e in chain {
        for op in e.ops {
            let (o, l) = op.range();
            if o < MIB || o.checked_add(l).is_none_or(|end| end > bound) {
                return Err(Error::invalid(format!(
                    "VHDX log entry {} writes {l} bytes at {o}, outside the file's updatable area",
                    e.seq
                ))
                .with_field("FileOffset"));
            }
            out.ops.push(op);
        }
    }
    Ok(Some(out))
}

/// Applies a replay to the file and syncs it (the caller then clears the
/// log GUID in the headers).
///
/// Zero descriptors past the end of the file only extend it (a hole reads
/// zeros); the zeros written inside the file count against
/// [`VHDX_MAX_LOG_GROWTH`](crate::limits::VHDX_MAX_LOG_GROWTH) over the
/// whole replay, so a log of thousands of overlapping descriptors cannot
/// make an open write terabytes.
pub fn apply(file: &dyn Storage, r: &Replay) -> Result<()> {
    let budget = crate::limits::VHDX_MAX_LOG_GROWTH;
    let mut zeroed = 0u64;
    // Past this offset the file reads zeros: its end, moved out by zero
    // descriptors that extend it, and back by data written past it.
    let mut zero_from = file.len()?;
    for op in &r.ops {
        match op {
            Op::Data { offset, sector } => {
                file.write_at(sector, *offset)?;
                zero_from = zero_from.max(offset + sector.len() as u64);
            }
            Op::Zero { offset, len } => {
                let end = offset.saturating_add(*len);
                let inside = end.min(zero_from).saturating_sub(*offset);
                if inside > 0 {
                    zeroed = zeroed.saturating_add(inside);
                    if zeroed > budget {
                        return Err(Error::limit(format!(
                            "VHDX log replay would write more than {budget} bytes of zeros (descriptors overlapping over and over)"
                        ))
                        .with_field("log zero descriptors")
                        .with_offset(*offset));
                    }
                    crate::storage::write_zeroes_slow(file, *offset, inside)?;
                }
                if end > file.len()? {
                    file.set_len(end)?;
                }
            }
        }
    }
    let flen = file.len()?;
    if flen < r.last_file_offset {
        file.set_len(r.last_file_offset.next_multiple_of(MIB))?;
    }
    file.sync()
}

/// A read-only view of a file with a log applied in memory.
#[derive(Debug)]
pub struct Overlay {
    inner: Arc<dyn Storage>,
    ops: Vec<Op>,
    len: u64,
}

impl Overlay {
    /// The view of `inner` after `r`.
    pub fn new(inner: Arc<dyn Storage>, r: Replay) -> Result<Overlay> {
        let len = inner.len()?.max(r.last_file_offset.next_multiple_of(MIB));
        Ok(Overlay { inner, ops: r.ops, len })
    }
}

impl Storage for Overlay {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        for op in &self.ops {
            let (o, l) = op.range();
            let (s, e) = (o.max(offset), (o + l).min(end));
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match op {
                Op::Data { sector, .. } => dst.copy_from_slice(&sector[(s - o) as usize..(e - o) as usize]),
                Op::Zero { .. } => dst.fill(0),
            }
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::read_only("a VHDX image with its log applied in memory"))
    }
    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(Error::read_only("a VHDX image with its log applied in memory"))
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn path(&self) -> Option<&std::path::Path> {
        self.inner.path()
    }
    fn file(&self) -> Option<&std::fs::File> {
        self.inner.file()
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
}

/// Writes log entries into the log region.
#[derive(Debug, Clone)]
pub struct LogWriter {
    start: u64,
    len: u64,
    guid: Guid,
    seq: u64,
    head: u64,
}

impl LogWriter {
    /// A writer for the log at `start` of `len` bytes, under `guid`.
    pub fn new(start: u64, len: u64, guid: Guid) -> LogWriter {
        LogWriter { start, len, guid, seq: 1, head: 0 }
    }

    /// The GUID entries carry (the header must carry it too).
    pub fn guid(&self) -> Guid {
        self.guid
    }

    /// Where the next entry goes (offset in the log).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Builds the entry for `sectors` (file offset, 4 KiB content) at the
    /// head, returning its bytes; `tail` is the offset of the oldest entry
    /// still needed (the head itself when everything before is durable).
    pub fn build(&self, sectors: &[(u64, &[u8])], file_len: u64, tail: u64) -> Result<Vec<u8>> {
        let count = sectors.len() as u64;
        let desc_sectors = (count + 2).div_ceil(128);
        let total = desc_sectors + count;
        if total * SECTOR > self.len {
            return Err(Error::internal(format!("a VHDX log entry of {total} sectors does not fit the log")));
        }
        let mut b = vec![0u8; (total * SECTOR) as usize];
        b[0..4].copy_from_slice(ENTRY_SIG);
        b[8..12].copy_from_slice(&((total * SECTOR) as u32).to_le_bytes());
        b[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..28].copy_from_slice(&(count as u32).to_le_bytes());
        b[32..48].copy_from_slice(&self.guid.0);
        b[48..56].copy_from_slice(&file_len.to_le_bytes());
        b[56..64].copy_from_slice(&file_len.to_le_bytes());
        for (i, (off, data)) in sectors.iter().enumerate() {
            debug_assert_eq!(data.len(), SECTOR as usize);
            let d = 64 + 32 * i;
            b[d..d + 4].copy_from_slice(DATA_DESC_SIG);
            b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
            b[d + 8..d + 16].copy_from_slice(&data[0..8]);
            b[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
            b[d + 24..d + 32].copy_from_slice(&self.seq.to_le_bytes());
            let s = ((desc_sectors + i as u64) * SECTOR) as usize;
            b[s..s + 4].copy_from_slice(DATA_SIG);
            b[s + 4..s + 8].copy_from_slice(&((self.seq >> 32) as u32).to_le_bytes());
            b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
            b[s + 4092..s + 4096].copy_from_slice(&(self.seq as u32).to_le_bytes());
        }
        seal(&mut b, 4);
        Ok(b)
    }

    /// Writes an entry for `sectors` at the head (wrapping around the
    /// circular log) and advances. The caller syncs.
    pub fn write(&mut self, file: &dyn Storage, sectors: &[(u64, &[u8])], file_len: u64, tail: u64) -> Result<()> {
        let b = self.build(sectors, file_len, tail)?;
        let mut done = 0u64;
        let total = b.len() as u64;
        while done < total {
            let p = (self.head + done) % self.len;
            let n = (self.len - p).min(total - done);
            file.write_at(&b[done as usize..(done + n) as usize], self.start + p)?;
            done += n;
        }
        self.head = (self.head + total) % self.len;
        self.seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn header(guid: Guid) -> Header {
        Header { version: 1, log_guid: guid, log_offset: MIB, log_length: MIB as u32, ..Default::default() }
    }

    #[test]
    fn written_entries_replay_latest_only() {
        let f = MemStorage::new();
        f.set_len(4 * MIB).unwrap();
        let g = Guid::random();
        let mut w = LogWriter::new(MIB, MIB, g);
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        w.write(&f, &[(2 * MIB, &a)], 4 * MIB, 0).unwrap();
        let h = w.head();
        w.write(&f, &[(2 * MIB, &b), (3 * MIB, &a)], 4 * MIB, h).unwrap();
        let r = find(&f, &header(g), 4 * MIB).unwrap().unwrap();
        assert_eq!(r.entries, 1, "each entry is its own tail");
        assert_eq!(r.head_sequence, 2);
        assert_eq!(r.ops.len(), 2);
        assert_eq!(r.ops[0], Op::Data { offset: 2 * MIB, sector: b.clone().into_boxed_slice() });
        // Another GUID: nothing to replay.
        assert!(find(&f, &header(Guid::random()), 4 * MIB).unwrap().is_none());
        // A torn second entry: the first one is the active sequence.
        let mut sector = [0u8; 4096];
        f.read_at(&mut sector, MIB + 8192).unwrap();
        sector[100] ^= 0xff;
        f.write_at(&sector, MIB + 8192).unwrap();
        let r = find(&f, &header(g), 4 * MIB).unwrap().unwrap();
        assert_eq!(r.head_sequence, 1);
        apply(&f, &r).unwrap();
        let mut got = vec![0u8; 4096];
        f.read_at(&mut got, 2 * MIB).unwrap();
        assert_eq!(got, a);
    }

    #[test]
    fn entries_wrap_around_the_log() {
        let f = Arc::new(MemStorage::new());
        f.set_len(4 * MIB).unwrap();
        let g = Guid::random();
        let mut w = LogWriter::new(MIB, MIB, g);
        let data: Vec<Vec<u8>> = (0..200u8).map(|i| vec![i; 4096]).collect();
        for d in &data {
            let h = w.head();
            w.write(&*f, &[(2 * MIB + 4096 * u64::from(d[0] % 5), d)], 4 * MIB, h).unwrap();
        }
        let r = find(&*f, &header(g), 4 * MIB).unwrap().unwrap();
        assert_eq!(r.head_sequence, 200);
        let o = Overlay::new(f.clone(), r).unwrap();
        let mut got = vec![0u8; 4096];
        o.read_at(&mut got, 2 * MIB + 4096 * u64::from(199u8 % 5)).unwrap();
        assert_eq!(got, data[199]);
        assert!(o.write_at(&got, 0).is_err());
    }

    #[test]
    fn hostile_targets_are_refused() {
        let f = MemStorage::new();
        f.set_len(4 * MIB).unwrap();
        let g = Guid::random();
        let mut w = LogWriter::new(MIB, MIB, g);
        w.write(&f, &[(0, &[0u8; 4096])], 4 * MIB, 0).unwrap();
        assert!(find(&f, &header(g), 4 * MIB).is_err(), "a log entry may not rewrite the header area");
        let mut w = LogWriter::new(MIB, MIB, g);
        w.write(&f, &[(2 * MIB, &[0u8; 4096])], 8 * MIB, 0).unwrap();
        assert!(find(&f, &header(g), 4 * MIB).is_err(), "flushed past the end: truncated");
    }
}
