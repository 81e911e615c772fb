//! streamOptimized extents: compressed grains with markers, and the stream
//! tail (grain tables, grain directory, footer, end-of-stream marker).
//!
//! Grains are zlib streams (RFC 1950, with the two-byte zlib header), each
//! preceded by a 12-byte grain marker (u64 LBA, u32 compressed size) and
//! padded to a sector. Two layouts exist and both are read:
//!
//! * QEMU's: grain directory and tables up front at the header's gdOffset,
//!   grains with markers after them, no metadata markers and no footer.
//!   Writing appends grains and updates the tables in place.
//! * VMware's (what vdisk creates): the header's gdOffset is `GD_AT_END`;
//!   after the grains come a grain-table marker + table per used table, a
//!   grain-directory marker + directory, a footer marker + footer (a copy of
//!   the header with the real gdOffset) and an end-of-stream marker as the
//!   last sector. Writing appends grains over the old footer; every flush
//!   writes the changed tables, a new directory, footer and end-of-stream
//!   marker, so after a flush QEMU (which reads the footer at the end of
//!   the file) and VMware both read the file. Between the first write of a
//!   session and the next flush the file has no valid footer: a crash there
//!   leaves a stream that readers refuse ("invalid footer"), as with any
//!   interrupted stream. Call `flush` (or `Vmdk::close`) when done.
//!
//! Each grain can be written once (the format has no way to replace a
//! compressed grain in place); writes must cover whole grains (the last
//! grain may end at the end of the disk). Compression runs before the
//! allocation lock is taken, so several threads compress at once.

use std::sync::atomic::Ordering;

use byteorder::{ByteOrder, LittleEndian};

use super::header::*;
use super::sparse::{AllocState, Fallback, Mapping, SparseExtent};
use crate::codec::{self, Codec};
use crate::error::{Error, Result};

/// Deflates `data` into a zlib stream (with header and Adler-32 trailer).
fn deflate(data: &[u8]) -> Result<Vec<u8>> {
    codec::compress(Codec::Zlib, data, codec::deflate_bound(data.len()))?
        .ok_or_else(|| Error::internal("deflate did not finish within its bound"))
}

fn once_only(off: u64) -> Error {
    Error::unsupported(format!(
        "the grain at extent byte {off:#x} was already written; streamOptimized grains can be written only once"
    ))
    .with_offset(off)
}

impl SparseExtent {
    /// Writes whole grains of a compressed extent.
    pub(crate) fn write_stream(&self, buf: &[u8], off: u64, fb: &Fallback<'_>) -> Result<()> {
        let gb = self.grain_bytes();
        if !off.is_multiple_of(gb) {
            return Err(Error::unsupported(format!(
                "streamOptimized images take whole-grain writes: offset {off:#x} is not a multiple of the {gb}-byte grain"
            ))
            .with_offset(off));
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let cur = off + pos as u64;
            let n = (buf.len() - pos).min(gb as usize);
            if (n as u64) < gb && cur + n as u64 != self.len {
                return Err(Error::unsupported(format!(
                    "streamOptimized images take whole-grain writes: {n} bytes at {cur:#x} is part of a {gb}-byte grain"
                ))
                .with_offset(cur));
            }
            let chunk = &buf[pos..pos + n];
            let (m, _) = self.lookup(cur, n as u64)?;
            if m != Mapping::Unallocated {
                return Err(once_only(cur));
            }
            if fb.has_parent || chunk.iter().any(|&b| b != 0) {
                let z = deflate(chunk)?;
                self.append_grain(cur / gb, &z)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Appends one compressed grain with its marker and maps it.
    fn append_grain(&self, grain: u64, z: &[u8]) -> Result<()> {
        let gb = self.grain_bytes();
        let size = u32::try_from(z.len())
            .ok()
            .filter(|&s| u64::from(s) <= 2 * gb)
            .ok_or_else(|| Error::internal("compressed grain larger than two grains"))?;
        let total = (GRAIN_MARKER_LEN as usize + z.len()).div_ceil(512) * 512;
        let mut rec = vec![0u8; total];
        LittleEndian::write_u64(&mut rec[0..8], grain * self.geo.grain_size);
        LittleEndian::write_u32(&mut rec[8..12], size);
        rec[12..12 + z.len()].copy_from_slice(z);
        let mut st = self.alloc.lock();
        let (m, _) = self.lookup(grain * gb, 1)?;
        if m != Mapping::Unallocated {
            return Err(once_only(grain * gb));
        }
        let host = st.next;
        let sector = u32::try_from(host / SECTOR).map_err(|_| {
            Error::limit("the extent file would grow past 2 TiB, which grain table entries cannot address")
        })?;
        self.file.write_at(&rec, host)?;
        st.next = host + total as u64;
        self.file_len.fetch_max(st.next, Ordering::AcqRel);
        st.tail_dirty = true;
        self.set_gte(&mut st, grain, sector)
    }

    /// Writes the stream tail (footer mode): changed grain tables, the grain
    /// directory, the footer and the end-of-stream marker. Caller holds
    /// the allocation lock.
    pub(crate) fn write_tail(&self, st: &mut AllocState) -> Result<()> {
        if !st.tail_dirty {
            return self.file.sync();
        }
        self.file.sync()?;
        let gts = self.geo.gt_sectors();
        let mut pos = st.next;
        let dirty = self.cache.read().dirty();
        for (gdi, t) in &dirty {
            self.file.write_at(&encode_metadata_marker(gts, MARKER_GT), pos)?;
            pos += SECTOR;
            self.file.write_at(&t.encode(gts), pos)?;
            let sector = u32::try_from(pos / SECTOR).map_err(|_| Error::limit("grain table beyond 2 TiB"))?;
            if let Some(e) = usize::try_from(*gdi).ok().and_then(|i| self.gd.get(i)) {
                e.store(sector, Ordering::Release);
            }
            pos += gts * SECTOR;
        }
        let gds = self.geo.gd_sectors();
        self.file.write_at(&encode_metadata_marker(gds, MARKER_GD), pos)?;
        pos += SECTOR;
        let gd_sector = pos / SECTOR;
        let mut gd = vec![0u8; (gds * SECTOR) as usize];
        for (c, e) in gd.chunks_exact_mut(4).zip(self.gd.iter()) {
            LittleEndian::write_u32(c, e.load(Ordering::Acquire));
        }
        self.file.write_at(&gd, pos)?;
        pos += gds * SECTOR;
        let mut tail = vec![0u8; 3 * SECTOR as usize];
        tail[..512].copy_from_slice(&encode_metadata_marker(1, MARKER_FOOTER));
        let mut footer = self.header;
        footer.gd_offset = gd_sector;
        footer.rgd_offset = 0;
        footer.flags &= !FLAG_RGD;
        tail[512..1024].copy_from_slice(&footer.encode());
        // The end-of-stream marker is an all-zero sector.
        self.file.write_at(&tail, pos)?;
        pos += 3 * SECTOR;
        if self.file.len()? != pos {
            self.file.set_len(pos)?;
        }
        self.file.sync()?;
        for (_, t) in &dirty {
            t.set_clean();
        }
        self.file_len.store(pos, Ordering::Release);
        st.next = pos - 3 * SECTOR;
        st.tail_dirty = false;
        Ok(())
    }
}
