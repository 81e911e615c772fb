//! Tables of big-endian u64 entries, and the tables the header points at.
//!
//! Spec: `docs/interop/qcow2.txt`. L1 tables, the refcount table, L2
//! tables (their words) and bitmap tables are arrays of big-endian u64;
//! [`decode`] and [`encode`] are the one codec for all of them.
//!
//! The header points at three tables that nothing else may use: the active
//! L1 table, the refcount table and the snapshot table (whose entries point
//! at the snapshots' L1 tables). [`Reserved`] records where they lie, with
//! the header cluster and the bitmap directory, in one place: the allocator
//! skips those ranges and an L1 or L2 entry pointing into them is
//! corruption. `Qcow2::swap_table` (in `alloc.rs`) is the one way such a
//! table is replaced.

use std::ops::Range;

use byteorder::{BigEndian, ByteOrder};

use super::header::{self, Header};
use super::snapshot::Snapshot;
use crate::error::{Error, Result};
use crate::limits::QCOW2_MAX_L1_BYTES;
use crate::storage::Storage;

/// The entries of a table of big-endian u64s (a trailing partial entry is
/// ignored).
pub(crate) fn decode(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(BigEndian::read_u64)
}

/// Encodes `entries` into `len` bytes, zero-padded (entries that do not
/// fit are left out; callers size `len` for all of them).
pub(crate) fn encode(entries: impl IntoIterator<Item = u64>, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    for (c, e) in b.chunks_exact_mut(8).zip(entries) {
        BigEndian::write_u64(c, e);
    }
    b
}

/// Reads a table of `count` big-endian u64 entries at `offset`, bounded by
/// the L1 limit (the caller validated `count`).
pub(crate) fn read_u64_table(file: &dyn Storage, offset: u64, count: usize, what: &str) -> Result<Vec<u64>> {
    if count as u64 > QCOW2_MAX_L1_BYTES / 8 {
        return Err(Error::limit(format!("{what} of {count} entries is too large")));
    }
    let mut buf = vec![0u8; count * 8];
    file.read_at(&mut buf, offset).map_err(|e| e.context(format!("reading the {what}")))?;
    Ok(decode(&buf).collect())
}

/// A table the header points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderTable {
    /// The active L1 table (`l1_table_offset`, `l1_size`).
    L1,
    /// The refcount table (`refcount_table_offset`, `refcount_table_clusters`).
    Refcount,
    /// The snapshot table (`snapshots_offset`, `nb_snapshots`).
    Snapshots,
}

/// Host ranges of the image's fixed metadata, each rounded up to whole
/// clusters: what the allocator never hands out and no L1 or L2 entry may
/// point into. Empty ranges stand for absent tables.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reserved {
    /// Cluster size in bytes.
    cluster_size: u64,
    /// The header cluster.
    header: Range<u64>,
    /// The bitmap directory, when the bitmaps extension is consistent.
    bitmap_directory: Range<u64>,
    /// The LUKS header area (full disk encryption header extension).
    crypto_header: Range<u64>,
    /// The active L1 table.
    l1: Range<u64>,
    /// The refcount table.
    refcount: Range<u64>,
    /// The snapshot table (as long as it is on disk, which may differ from
    /// what re-encoding its entries gives).
    snapshots: Range<u64>,
    /// The snapshots' L1 tables.
    snapshot_l1s: Vec<Range<u64>>,
}

impl Reserved {
    /// Only the header cluster, of an image with clusters of `cluster_size`.
    pub(crate) fn header_only(cluster_size: u64) -> Reserved {
        Reserved { cluster_size, header: 0..cluster_size, ..Reserved::default() }
    }

    /// The ranges of an image as opened: header `h`, its snapshots, and the
    /// snapshot table's length on disk.
    pub(crate) fn new(h: &Header, snapshots: &[Snapshot], snapshot_table_len: u64) -> Reserved {
        let mut r = Reserved::header_only(h.cluster_size());
        r.set(HeaderTable::L1, h.l1_table_offset, u64::from(h.l1_size) * 8);
        r.set(HeaderTable::Refcount, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * h.cluster_size());
        if h.nb_snapshots > 0 {
            r.set(HeaderTable::Snapshots, h.snapshots_offset, snapshot_table_len);
        }
        r.set_snapshot_l1s(snapshots);
        if let (Some(b), true) = (h.bitmaps, h.autoclear_features & header::AUTOCLEAR_BITMAPS != 0) {
            r.bitmap_directory = r.span(b.directory_offset, b.directory_size);
        }
        if let Some((o, l)) = h.crypto_header {
            r.crypto_header = r.span(o, l);
        }
        r
    }

    /// Where the bitmap directory lies now (`None`: no bitmaps).
    pub(crate) fn set_bitmap_directory(&mut self, dir: Option<(u64, u64)>) {
        self.bitmap_directory = match dir {
            Some((off, len)) => self.span(off, len),
            None => 0..0,
        };
    }

    /// `[offset, offset + len)` rounded up to whole clusters.
    fn span(&self, offset: u64, len: u64) -> Range<u64> {
        let cs = self.cluster_size.max(1);
        offset..offset.saturating_add(len.div_ceil(cs).saturating_mul(cs))
    }

    fn slot(&mut self, t: HeaderTable) -> &mut Range<u64> {
        match t {
            HeaderTable::L1 => &mut self.l1,
            HeaderTable::Refcount => &mut self.refcount,
            HeaderTable::Snapshots => &mut self.snapshots,
        }
    }

    /// Records that table `t` lies at `offset` and is `len` bytes long.
    pub(crate) fn set(&mut self, t: HeaderTable, offset: u64, len: u64) {
        let span = self.span(offset, len);
        *self.slot(t) = span;
    }

    /// The host clusters table `t` occupies.
    pub(crate) fn clusters(&self, t: HeaderTable) -> Range<u64> {
        let r = match t {
            HeaderTable::L1 => &self.l1,
            HeaderTable::Refcount => &self.refcount,
            HeaderTable::Snapshots => &self.snapshots,
        };
        let cs = self.cluster_size.max(1);
        r.start / cs..r.end.div_ceil(cs)
    }

    /// Records the snapshots' L1 tables.
    pub(crate) fn set_snapshot_l1s(&mut self, snapshots: &[Snapshot]) {
        self.snapshot_l1s = snapshots.iter().map(|s| self.span(s.l1_table_offset, u64::from(s.l1_size) * 8)).collect();
    }

    /// Whether `[offset, offset + len)` overlaps a reserved range.
    pub(crate) fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        [&self.header, &self.bitmap_directory, &self.crypto_header, &self.l1, &self.refcount, &self.snapshots]
            .into_iter()
            .chain(&self.snapshot_l1s)
            .any(|r| offset < r.end && r.start < end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_roundtrip_and_padding() {
        let b = encode([1, 0x0102_0304_0506_0708, u64::MAX], 32);
        assert_eq!(b.len(), 32);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode(&b).collect::<Vec<_>>(), vec![1, 0x0102_0304_0506_0708, u64::MAX, 0]);
        // Entries that do not fit are left out; a partial entry is ignored.
        assert_eq!(encode([1, 2, 3], 16).len(), 16);
        assert_eq!(decode(&b[..15]).count(), 1);
    }

    #[test]
    fn reserved_slots_follow_the_header() {
        let mut r = Reserved::header_only(512);
        r.set(HeaderTable::L1, 4096, 8);
        r.set(HeaderTable::Refcount, 8192, 1024);
        assert!(r.overlaps(0, 1));
        assert!(r.overlaps(4096 + 511, 1));
        assert!(!r.overlaps(4096 + 512, 512));
        assert_eq!(r.clusters(HeaderTable::Refcount), 16..18);
        // Moving a table releases its old place.
        r.set(HeaderTable::L1, 65536, 16);
        assert!(!r.overlaps(4096, 512));
        assert!(r.overlaps(65536, 1));
        // An absent table reserves nothing.
        assert_eq!(r.clusters(HeaderTable::Snapshots), 0..0);
        r.set(HeaderTable::Snapshots, 0, 0);
        assert!(!r.overlaps(1024, 512));
    }
}
