//! L1 and L2 entries, and L2 tables.
//!
//! Spec: `docs/interop/qcow2.txt`, "Cluster mapping" and "Extended L2
//! Entries". An L2 table is one cluster of 8-byte entries (16-byte with
//! extended L2: a standard entry followed by a subcluster bitmap).
//!
//! Entries with reserved bits set are refused (`Corrupt`) when they are
//! used, which is stricter than QEMU: QEMU's read path masks those bits
//! away, and only `qemu-img check` (`check_refcounts_l1`/`_l2`) counts
//! them as corruption. Nothing is marked corrupt for them.
//!
//! The L2 cache (`cache.rs`) holds whole tables as `Arc<L2Table>` whose entries are atomics:
//! readers load entries without a lock of their own, writers store them while
//! holding the image's allocation lock. A newly mapped cluster is stored only
//! after its data is written, so a reader never sees the mapping first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::table;
use crate::error::{Error, Result};

/// L1/L2 entry bit 63: the cluster's refcount is exactly one.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit 62: the cluster is compressed.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0: the cluster reads as zeros (v3, standard L2 only).
pub(crate) const OFLAG_ZERO: u64 = 1;
/// Host offset bits 9..=55 of L1 and standard L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry: 0..=8 and 56..=62 (QEMU
/// `L1E_RESERVED_MASK`).
pub(crate) const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry: 1..=8 and 56..=61 (QEMU
/// `L2E_STD_RESERVED_MASK`). Bit 0 (zero) is not among them; with extended
/// L2 it is ignored, as QEMU ignores it.
pub(crate) const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2.
pub(crate) const SUBCLUSTERS: u32 = 32;

/// Geometry needed to decode entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// log2 of the cluster size.
    pub(crate) cluster_bits: u32,
    /// Extended L2 entries.
    pub(crate) extended_l2: bool,
    /// External data file in use (offset 0 with COPIED is a real cluster).
    pub(crate) data_file: bool,
}

impl Geometry {
    /// Cluster size in bytes.
    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// u64 words per L2 entry.
    pub(crate) fn words_per_entry(&self) -> usize {
        if self.extended_l2 {
            2
        } else {
            1
        }
    }
    /// Entries per L2 table.
    pub(crate) fn l2_entries(&self) -> u64 {
        self.cluster_size() / (8 * self.words_per_entry() as u64)
    }
    /// log2 of the allocation granule for reads: the subcluster size with
    /// extended L2, else the cluster size.
    pub(crate) fn granule_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }
    /// Bit position where the sector count of a compressed descriptor starts.
    pub(crate) fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
    /// Mask of the host offset in a compressed descriptor.
    pub(crate) fn compressed_offset_mask(&self) -> u64 {
        (1u64 << self.csize_shift()) - 1
    }
    /// Guest bytes mapped by one L2 table.
    pub(crate) fn l2_span(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }
}

/// What one (sub)cluster of the guest disk maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated here: read the backing image, or zeros.
    Unallocated,
    /// Reads as zeros; `prealloc` is a host offset kept allocated for it.
    Zero {
        /// Host offset of the preallocated (sub)cluster, if any.
        prealloc: Option<u64>,
    },
    /// Data at `host` (of the image file, or of the external data file).
    Data {
        /// Host offset of this (sub)cluster.
        host: u64,
    },
    /// A compressed cluster: `host` byte offset, `len` bytes to read.
    Compressed {
        /// Host byte offset (any alignment).
        host: u64,
        /// Number of bytes to read (sector-rounded run).
        len: u64,
    },
}

/// A decoded L2 entry (standard part and, with extended L2, the bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct L2Entry {
    /// The standard 64-bit entry.
    pub(crate) word: u64,
    /// The subcluster bitmap (0 without extended L2).
    pub(crate) bitmap: u64,
}

/// Refuses entry `index` (value `l1e`) of the L1 table at host offset
/// `table` when it has reserved bits set.
pub(crate) fn check_l1_entry(l1e: u64, index: u64, table: u64) -> Result<()> {
    let bits = l1e & L1E_RESERVED_MASK;
    if bits != 0 {
        return Err(Error::corrupt(format!(
            "L1 entry {index} of the table at {table:#x} ({l1e:#018x}) has reserved bits {bits:#x} set"
        ))
        .with_field("L1 entry")
        .with_offset(table.saturating_add(index.saturating_mul(8))));
    }
    Ok(())
}

impl L2Entry {
    /// Refuses the entry when bits the spec reserves are set: those of
    /// [`L2E_STD_RESERVED_MASK`] in a standard descriptor; COPIED (bit 63)
    /// in a compressed one, which never carries it; and with extended L2 a
    /// compressed cluster's subcluster bitmap, which is reserved. `table`
    /// and `index` locate the entry for the message.
    pub(crate) fn check_reserved(&self, geo: &Geometry, table: u64, index: usize) -> Result<()> {
        let at = table.saturating_add((index as u64).saturating_mul(8 * geo.words_per_entry() as u64));
        let (bits, what) = if self.is_compressed() {
            (self.word & OFLAG_COPIED, "reserved bit (COPIED in a compressed cluster descriptor)")
        } else {
            (self.word & L2E_STD_RESERVED_MASK, "reserved bits")
        };
        if bits != 0 {
            return Err(Error::corrupt(format!(
                "L2 entry {index} of the table at {table:#x} ({:#018x}) has {what} {bits:#x} set",
                self.word
            ))
            .with_field("L2 entry")
            .with_offset(at));
        }
        if geo.extended_l2 && self.is_compressed() && self.bitmap != 0 {
            return Err(Error::corrupt(format!(
                "L2 entry {index} of the table at {table:#x} is a compressed cluster with reserved subcluster bitmap bits {:#018x} set",
                self.bitmap
            ))
            .with_field("L2 entry")
            .with_offset(at.saturating_add(8)));
        }
        Ok(())
    }

    /// The cluster is compressed.
    pub(crate) fn is_compressed(&self) -> bool {
        self.word & OFLAG_COMPRESSED != 0
    }

    /// The COPIED flag.
    pub(crate) fn copied(&self) -> bool {
        self.word & OFLAG_COPIED != 0
    }

    /// Host offset of a standard (not compressed) entry, if any.
    pub(crate) fn host_offset(&self, geo: &Geometry) -> Option<u64> {
        if self.is_compressed() {
            return None;
        }
        let off = self.word & OFFSET_MASK;
        if off != 0 || (geo.data_file && self.copied()) {
            Some(off)
        } else {
            None
        }
    }

    /// Decodes a compressed descriptor into (host byte offset, bytes to read).
    pub(crate) fn compressed(&self, geo: &Geometry) -> (u64, u64) {
        let shift = geo.csize_shift();
        let host = self.word & geo.compressed_offset_mask();
        let nb_sectors = ((self.word >> shift) & ((1u64 << (geo.cluster_bits - 8)) - 1)) + 1;
        let len = nb_sectors * 512 - (host & 511);
        (host, len)
    }

    /// What subcluster `sc` (0 without extended L2) maps to. `guest_cluster`
    /// is used only in error messages.
    pub(crate) fn mapping(&self, geo: &Geometry, sc: u32, guest_cluster: u64) -> Result<Mapping> {
        let cs = geo.cluster_size();
        if self.is_compressed() {
            if geo.data_file {
                return Err(Error::corrupt(format!(
                    "compressed cluster at guest offset {:#x} in an image with an external data file",
                    guest_cluster * cs
                )));
            }
            let (host, len) = self.compressed(geo);
            return Ok(Mapping::Compressed { host, len });
        }
        let off = self.word & OFFSET_MASK;
        if off & (cs - 1) != 0 {
            return Err(Error::corrupt(format!(
                "cluster allocation offset {off:#x} unaligned (guest offset {:#x})",
                guest_cluster * cs
            ))
            .with_offset(off));
        }
        let host = self.host_offset(geo);
        if !geo.extended_l2 {
            if self.word & OFLAG_ZERO != 0 {
                return Ok(Mapping::Zero { prealloc: host });
            }
            return Ok(match host {
                Some(h) => Mapping::Data { host: h },
                None => Mapping::Unallocated,
            });
        }
        let bm = self.bitmap;
        let alloc_bits = bm & 0xffff_ffff;
        let zero_bits = bm >> 32;
        if alloc_bits & zero_bits != 0 {
            return Err(Error::corrupt(format!(
                "subcluster bitmap {bm:#018x} marks a subcluster both allocated and zero (guest offset {:#x})",
                guest_cluster * cs
            )));
        }
        let sc_size = cs / u64::from(SUBCLUSTERS);
        match host {
            Some(h) => {
                if zero_bits & (1 << sc) != 0 {
                    Ok(Mapping::Zero { prealloc: Some(h + u64::from(sc) * sc_size) })
                } else if alloc_bits & (1 << sc) != 0 {
                    Ok(Mapping::Data { host: h + u64::from(sc) * sc_size })
                } else {
                    Ok(Mapping::Unallocated)
                }
            }
            None => {
                if alloc_bits != 0 {
                    return Err(Error::corrupt(format!(
                        "subcluster bitmap {bm:#018x} marks subclusters allocated in an unallocated cluster (guest offset {:#x})",
                        guest_cluster * cs
                    )));
                }
                if zero_bits & (1 << sc) != 0 {
                    Ok(Mapping::Zero { prealloc: None })
                } else {
                    Ok(Mapping::Unallocated)
                }
            }
        }
    }
}

/// One cached L2 table.
#[derive(Debug)]
pub(crate) struct L2Table {
    /// Host offset of the table.
    pub(crate) offset: u64,
    /// The entries' words (two per entry with extended L2), native order.
    words: Box<[AtomicU64]>,
    /// Changed since last written.
    dirty: AtomicBool,
    /// The cache's clock when the table was last used (for eviction).
    pub(crate) last_use: AtomicU64,
    /// `base | 1` while every entry `i` maps its cluster, as plain data, at
    /// `base + i * cluster_size` (a converted or preallocated image); 0
    /// otherwise. Lookups in such a table need not touch its entries, which
    /// a random read workload has evicted from the CPU caches. Cleared by
    /// the first [`set`](Self::set).
    linear: AtomicU64,
    /// The table's own cluster was found outside the image's fixed
    /// metadata when a writer first asked for it (see
    /// `Qcow2::l2_for_write`); later writers need not look again.
    write_checked: AtomicBool,
}

impl L2Table {
    /// A table decoded from its on-disk bytes.
    pub(crate) fn from_bytes(offset: u64, bytes: &[u8]) -> L2Table {
        let words: Box<[AtomicU64]> = table::decode(bytes).map(AtomicU64::new).collect();
        L2Table {
            offset,
            words,
            dirty: AtomicBool::new(false),
            last_use: AtomicU64::new(0),
            linear: AtomicU64::new(0),
            write_checked: AtomicBool::new(false),
        }
    }

    /// An all-zero (unallocated) table.
    pub(crate) fn zeroed(offset: u64, words: usize) -> L2Table {
        L2Table {
            offset,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            dirty: AtomicBool::new(true),
            last_use: AtomicU64::new(0),
            linear: AtomicU64::new(0),
            // Placed by the allocator: never inside the fixed metadata.
            write_checked: AtomicBool::new(true),
        }
    }

    /// A copy of this table at a new offset (copy-on-write of a shared table).
    pub(crate) fn copy_to(&self, offset: u64) -> L2Table {
        L2Table {
            offset,
            words: self.words.iter().map(|w| AtomicU64::new(w.load(Ordering::Acquire))).collect(),
            dirty: AtomicBool::new(true),
            last_use: AtomicU64::new(0),
            linear: AtomicU64::new(0),
            // Placed by the allocator: never inside the fixed metadata.
            write_checked: AtomicBool::new(true),
        }
    }

    /// Entry `i`.
    #[inline]
    pub(crate) fn get(&self, geo: &Geometry, i: usize) -> L2Entry {
        if geo.extended_l2 {
            // Bitmap first, then the word: a writer stores the word last.
            let word = self.words.get(2 * i).map_or(0, |w| w.load(Ordering::Acquire));
            let bitmap = self.words.get(2 * i + 1).map_or(0, |w| w.load(Ordering::Acquire));
            L2Entry { word, bitmap }
        } else {
            L2Entry { word: self.words.get(i).map_or(0, |w| w.load(Ordering::Acquire)), bitmap: 0 }
        }
    }

    /// Records whether every entry maps its cluster as plain data at
    /// `base + i * cluster_size` (standard entries only; the COPIED flag may
    /// vary, it does not change what a read sees). Called on a table just
    /// loaded, before anyone else sees it.
    pub(crate) fn detect_linear(&self, geo: &Geometry) {
        if geo.extended_l2 {
            return;
        }
        let cs = geo.cluster_size();
        let base = self.words.first().map_or(0, |w| w.load(Ordering::Relaxed)) & !OFLAG_COPIED;
        if base == 0 || base & (cs - 1) != 0 || base & !OFFSET_MASK != 0 {
            return;
        }
        let last = base.checked_add((self.words.len() as u64 - 1) * cs);
        if last.is_none_or(|l| l & !OFFSET_MASK != 0) {
            return;
        }
        let linear = self
            .words
            .iter()
            .enumerate()
            .all(|(i, w)| w.load(Ordering::Relaxed) & !OFLAG_COPIED == base + i as u64 * cs);
        if linear {
            self.linear.store(base | 1, Ordering::Release);
        }
    }

    /// The host offset of entry 0 when every entry maps linearly from it
    /// (see [`detect_linear`](Self::detect_linear)).
    #[inline]
    pub(crate) fn linear_base(&self) -> Option<u64> {
        let l = self.linear.load(Ordering::Acquire);
        (l != 0).then_some(l & !1)
    }

    /// Whether a writer already checked where the table lies.
    #[inline]
    pub(crate) fn write_checked(&self) -> bool {
        self.write_checked.load(Ordering::Relaxed)
    }

    /// Records that the table lies outside the image's fixed metadata.
    pub(crate) fn set_write_checked(&self) {
        self.write_checked.store(true, Ordering::Relaxed);
    }

    /// Stores entry `i` and marks the table dirty. Callers hold the image's
    /// allocation lock.
    pub(crate) fn set(&self, geo: &Geometry, i: usize, e: L2Entry) {
        // Before the entry changes: a reader that still sees the old base
        // sees the old mapping, as one that read the old entry would.
        if self.linear.load(Ordering::Relaxed) != 0 {
            self.linear.store(0, Ordering::Release);
        }
        if geo.extended_l2 {
            if let (Some(w), Some(b)) = (self.words.get(2 * i), self.words.get(2 * i + 1)) {
                b.store(e.bitmap, Ordering::Release);
                w.store(e.word, Ordering::Release);
            }
        } else if let Some(w) = self.words.get(i) {
            w.store(e.word, Ordering::Release);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Number of entries.
    pub(crate) fn len(&self, geo: &Geometry) -> usize {
        self.words.len() / geo.words_per_entry()
    }

    /// Encodes the table for writing.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        table::encode(self.words.iter().map(|w| w.load(Ordering::Acquire)), self.words.len() * 8)
    }

    /// Whether the table has changes not yet written.
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Marks the table clean (after writing it) or dirty.
    pub(crate) fn set_dirty(&self, dirty: bool) {
        self.dirty.store(dirty, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use byteorder::{BigEndian, ByteOrder};

    use super::*;

    const G64K: Geometry = Geometry { cluster_bits: 16, extended_l2: false, data_file: false };

    #[test]
    fn decode_compressed_descriptor() {
        // 64 KiB clusters: offset 0x50000, 13 + 1 sectors.
        let e = L2Entry { word: 0x4340_0000_0005_0000, bitmap: 0 };
        assert!(e.is_compressed());
        assert_eq!(e.compressed(&G64K), (0x50000, 14 * 512));
        assert_eq!(e.mapping(&G64K, 0, 0).unwrap(), Mapping::Compressed { host: 0x50000, len: 14 * 512 });
    }

    /// A 512-byte-cluster table (64 entries) whose entry i is `f(i)`.
    fn table(f: impl Fn(u64) -> u64) -> L2Table {
        let mut b = vec![0u8; 512];
        for (i, c) in b.chunks_exact_mut(8).enumerate() {
            BigEndian::write_u64(c, f(i as u64));
        }
        L2Table::from_bytes(0x10000, &b)
    }

    #[test]
    fn linear_tables() {
        let g = Geometry { cluster_bits: 9, extended_l2: false, data_file: false };
        let base = 0x20_0000;
        // COPIED may vary: reads see the same mapping either way.
        let t = table(|i| (base + i * 512) | if i % 3 == 0 { OFLAG_COPIED } else { 0 });
        t.detect_linear(&g);
        assert_eq!(t.linear_base(), Some(base));
        for i in 0..64 {
            assert_eq!(t.get(&g, i as usize).mapping(&g, 0, i).unwrap(), Mapping::Data { host: base + i * 512 });
        }
        // The first store makes it an ordinary table.
        t.set(&g, 5, L2Entry { word: OFLAG_COPIED | 0x90_0000, bitmap: 0 });
        assert_eq!(t.linear_base(), None);
        // Not linear: a gap, a zero flag, a compressed entry, an unallocated
        // first entry, an unaligned base, extended L2.
        for bad in [
            table(|i| base + i * 512 + if i == 40 { 512 } else { 0 }),
            table(|i| (base + i * 512) | if i == 63 { OFLAG_ZERO } else { 0 }),
            table(|i| (base + i * 512) | if i == 1 { OFLAG_COMPRESSED } else { 0 }),
            table(|i| if i == 0 { 0 } else { base + i * 512 }),
            table(|i| base + 256 + i * 512),
        ] {
            bad.detect_linear(&g);
            assert_eq!(bad.linear_base(), None);
        }
        let t = table(|i| base + i * 512);
        t.detect_linear(&Geometry { extended_l2: true, ..g });
        assert_eq!(t.linear_base(), None);
    }

    #[test]
    fn decode_standard() {
        let e = L2Entry { word: OFLAG_COPIED | 0x70000, bitmap: 0 };
        assert_eq!(e.mapping(&G64K, 0, 0).unwrap(), Mapping::Data { host: 0x70000 });
        let e = L2Entry { word: 0x70000 | OFLAG_ZERO, bitmap: 0 };
        assert_eq!(e.mapping(&G64K, 0, 0).unwrap(), Mapping::Zero { prealloc: Some(0x70000) });
        let e = L2Entry { word: OFLAG_ZERO, bitmap: 0 };
        assert_eq!(e.mapping(&G64K, 0, 0).unwrap(), Mapping::Zero { prealloc: None });
        let e = L2Entry { word: 0, bitmap: 0 };
        assert_eq!(e.mapping(&G64K, 0, 0).unwrap(), Mapping::Unallocated);
        let e = L2Entry { word: 0x71000, bitmap: 0 };
        assert!(e.mapping(&G64K, 0, 0).is_err());
    }

    #[test]
    fn decode_extended() {
        let g = Geometry { cluster_bits: 16, extended_l2: true, data_file: false };
        let e = L2Entry { word: OFLAG_COPIED | 0x70000, bitmap: 0b101 | (0b10 << 32) };
        assert_eq!(e.mapping(&g, 0, 0).unwrap(), Mapping::Data { host: 0x70000 });
        assert_eq!(e.mapping(&g, 1, 0).unwrap(), Mapping::Zero { prealloc: Some(0x70000 + 2048) });
        assert_eq!(e.mapping(&g, 2, 0).unwrap(), Mapping::Data { host: 0x70000 + 4096 });
        assert_eq!(e.mapping(&g, 3, 0).unwrap(), Mapping::Unallocated);
        let bad = L2Entry { word: 0x70000, bitmap: 1 | (1 << 32) };
        assert!(bad.mapping(&g, 5, 0).is_err());
        let bad = L2Entry { word: 0, bitmap: 1 };
        assert!(bad.mapping(&g, 5, 0).is_err());
    }
}
