//! L1 and L2 entries, and the L2 table cache.
//!
//! Spec: `docs/interop/qcow2.txt`, "Cluster mapping" and "Extended L2
//! Entries". An L2 table is one cluster of 8-byte entries (16-byte with
//! extended L2: a standard entry followed by a subcluster bitmap).
//!
//! The cache holds whole tables as `Arc<L2Table>` whose entries are atomics:
//! readers load entries without a lock of their own, writers store them while
//! holding the image's allocation lock. A newly mapped cluster is stored only
//! after its data is written, so a reader never sees the mapping first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, Result};

/// L1/L2 entry bit 63: the cluster's refcount is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit 62: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0: the cluster reads as zeros (v3, standard L2 only).
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits 9..=55 of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (1..=8 and 56..=62; bit 0 is also reserved).
pub const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1..=8 and 56..=61).
pub const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2.
pub const SUBCLUSTERS: u32 = 32;

/// Geometry needed to decode entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// External data file in use (offset 0 with COPIED is a real cluster).
    pub data_file: bool,
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// u64 words per L2 entry.
    pub fn words_per_entry(&self) -> usize {
        if self.extended_l2 {
            2
        } else {
            1
        }
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / (8 * self.words_per_entry() as u64)
    }
    /// log2 of the allocation granule for reads: the subcluster size with
    /// extended L2, else the cluster size.
    pub fn granule_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }
    /// Bit position where the sector count of a compressed descriptor starts.
    pub fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
    /// Mask of the host offset in a compressed descriptor.
    pub fn compressed_offset_mask(&self) -> u64 {
        (1u64 << self.csize_shift()) - 1
    }
    /// Guest bytes mapped by one L2 table.
    pub fn l2_span(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }
}

/// What one (sub)cluster of the guest disk maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
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
pub struct L2Entry {
    /// The standard 64-bit entry.
    pub word: u64,
    /// The subcluster bitmap (0 without extended L2).
    pub bitmap: u64,
}

impl L2Entry {
    /// The cluster is compressed.
    pub fn is_compressed(&self) -> bool {
        self.word & OFLAG_COMPRESSED != 0
    }

    /// The COPIED flag.
    pub fn copied(&self) -> bool {
        self.word & OFLAG_COPIED != 0
    }

    /// Host offset of a standard (not compressed) entry, if any.
    pub fn host_offset(&self, geo: &Geometry) -> Option<u64> {
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
    pub fn compressed(&self, geo: &Geometry) -> (u64, u64) {
        let shift = geo.csize_shift();
        let host = self.word & geo.compressed_offset_mask();
        let nb_sectors = ((self.word >> shift) & ((1u64 << (geo.cluster_bits - 8)) - 1)) + 1;
        let len = nb_sectors * 512 - (host & 511);
        (host, len)
    }

    /// What subcluster `sc` (0 without extended L2) maps to. `guest_cluster`
    /// is used only in error messages.
    pub fn mapping(&self, geo: &Geometry, sc: u32, guest_cluster: u64) -> Result<Mapping> {
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
pub struct L2Table {
    /// Host offset of the table.
    pub offset: u64,
    words: Box<[AtomicU64]>,
    dirty: AtomicBool,
    last_use: AtomicU64,
    /// `base | 1` while every entry `i` maps its cluster, as plain data, at
    /// `base + i * cluster_size` (a converted or preallocated image); 0
    /// otherwise. Lookups in such a table need not touch its entries, which
    /// a random read workload has evicted from the CPU caches. Cleared by
    /// the first [`set`](Self::set).
    linear: AtomicU64,
}

impl L2Table {
    /// A table decoded from its on-disk bytes.
    pub fn from_bytes(offset: u64, bytes: &[u8]) -> L2Table {
        let words: Box<[AtomicU64]> = bytes.chunks_exact(8).map(|c| AtomicU64::new(BigEndian::read_u64(c))).collect();
        L2Table { offset, words, dirty: AtomicBool::new(false), last_use: AtomicU64::new(0), linear: AtomicU64::new(0) }
    }

    /// An all-zero (unallocated) table.
    pub fn zeroed(offset: u64, words: usize) -> L2Table {
        L2Table {
            offset,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            dirty: AtomicBool::new(true),
            last_use: AtomicU64::new(0),
            linear: AtomicU64::new(0),
        }
    }

    /// A copy of this table at a new offset (copy-on-write of a shared table).
    pub fn copy_to(&self, offset: u64) -> L2Table {
        L2Table {
            offset,
            words: self.words.iter().map(|w| AtomicU64::new(w.load(Ordering::Acquire))).collect(),
            dirty: AtomicBool::new(true),
            last_use: AtomicU64::new(0),
            linear: AtomicU64::new(0),
        }
    }

    /// Entry `i`.
    #[inline]
    pub fn get(&self, geo: &Geometry, i: usize) -> L2Entry {
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
    pub fn detect_linear(&self, geo: &Geometry) {
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
    pub fn linear_base(&self) -> Option<u64> {
        let l = self.linear.load(Ordering::Acquire);
        (l != 0).then_some(l & !1)
    }

    /// Stores entry `i` and marks the table dirty. Callers hold the image's
    /// allocation lock.
    pub fn set(&self, geo: &Geometry, i: usize, e: L2Entry) {
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
    pub fn len(&self, geo: &Geometry) -> usize {
        self.words.len() / geo.words_per_entry()
    }

    /// Whether the table has no entries (never true for a real table).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Encodes the table for writing.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.words.len() * 8];
        for (c, w) in b.chunks_exact_mut(8).zip(self.words.iter()) {
            BigEndian::write_u64(c, w.load(Ordering::Acquire));
        }
        b
    }

    /// Whether the table has changes not yet written.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Marks the table clean (after writing it) or dirty.
    pub fn set_dirty(&self, dirty: bool) {
        self.dirty.store(dirty, Ordering::Release);
    }
}

/// Hashes table offsets (cluster-aligned u64s) and cluster numbers with one
/// multiplication: the cache is looked up on every guest request and the
/// set of clusters being allocated on every allocating one, and keys come
/// from the image itself, where collisions cost only a longer probe.
#[derive(Debug, Clone, Copy, Default)]
pub struct OffsetHash;

/// The hasher of [`OffsetHash`].
#[derive(Debug, Default)]
pub struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        // Fibonacci hashing mixes the high bits; folding them down mixes the
        // low ones too (offsets end in many zero bits, and the table indexes
        // buckets by the low bits).
        let x = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 31);
    }
}

impl std::hash::BuildHasher for OffsetHash {
    type Hasher = OffsetHasher;
    fn build_hasher(&self) -> OffsetHasher {
        OffsetHasher(0)
    }
}

/// A bounded cache of L2 tables keyed by host offset.
///
/// Lookups take `&self` (the caller holds a read lock on the image's mapping
/// state); inserting and evicting take `&mut self`. Only clean tables are
/// evicted; dirty ones stay until the image flushes its metadata, so the
/// cache may briefly exceed its capacity while many tables are dirty.
#[derive(Debug)]
pub struct L2Cache {
    tables: HashMap<u64, Arc<L2Table>, OffsetHash>,
    capacity: usize,
    tick: AtomicU64,
    /// Bumped whenever a table leaves the cache; a reader that loaded a
    /// table from disk discards its copy if this changed meanwhile.
    generation: u64,
}

impl L2Cache {
    /// A cache holding at most `capacity` clean tables (at least 2).
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            tables: HashMap::with_hasher(OffsetHash),
            capacity: capacity.max(crate::limits::QCOW2_MIN_L2_CACHE_TABLES),
            tick: AtomicU64::new(1),
            generation: 0,
        }
    }

    /// The table at `offset`, if cached.
    #[inline]
    pub fn get(&self, offset: u64) -> Option<&Arc<L2Table>> {
        let t = self.tables.get(&offset)?;
        let now = self.tick.load(Ordering::Relaxed);
        if t.last_use.load(Ordering::Relaxed) != now {
            t.last_use.store(now, Ordering::Relaxed);
        }
        Some(t)
    }

    /// The eviction generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Inserts a table (replacing none: if one is cached at that offset it
    /// is returned instead), evicting clean tables beyond the capacity.
    pub fn insert(&mut self, table: L2Table) -> Arc<L2Table> {
        if let Some(t) = self.tables.get(&table.offset) {
            return t.clone();
        }
        let now = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        table.last_use.store(now, Ordering::Relaxed);
        let t = Arc::new(table);
        self.tables.insert(t.offset, t.clone());
        self.evict_except(Some(t.offset));
        t
    }

    /// Inserts a new table, replacing whatever was cached at its offset (a
    /// stale copy of a freed cluster).
    pub fn replace(&mut self, table: L2Table) -> Arc<L2Table> {
        if self.tables.remove(&table.offset).is_some() {
            self.generation += 1;
        }
        self.insert(table)
    }

    /// Evicts least recently used clean tables while over capacity.
    pub fn evict_clean(&mut self) {
        self.evict_except(None)
    }

    fn evict_except(&mut self, keep: Option<u64>) {
        while self.tables.len() > self.capacity {
            let victim = self
                .tables
                .values()
                .filter(|t| !t.is_dirty() && Some(t.offset) != keep)
                .min_by_key(|t| t.last_use.load(Ordering::Relaxed))
                .map(|t| t.offset);
            match victim {
                Some(off) => {
                    self.tables.remove(&off);
                    self.generation += 1;
                }
                None => break,
            }
        }
    }

    /// Removes the table at `offset` (it was freed or replaced).
    pub fn remove(&mut self, offset: u64) -> Option<Arc<L2Table>> {
        let t = self.tables.remove(&offset);
        if t.is_some() {
            self.generation += 1;
        }
        t
    }

    /// Drops every table (after a metadata change that invalidates them all).
    pub fn clear(&mut self) {
        self.tables.clear();
        self.generation += 1;
    }

    /// Whether more tables than the capacity are cached (all dirty).
    pub fn over_capacity(&self) -> bool {
        self.tables.len() > self.capacity
    }

    /// Dirty tables, in no particular order.
    pub fn dirty_tables(&self) -> Vec<Arc<L2Table>> {
        self.tables.values().filter(|t| t.is_dirty()).cloned().collect()
    }

    /// Number of cached tables.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// Whether no table is cached.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The capacity in tables.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn offset_hash_spreads_aligned_offsets() {
        use std::hash::{BuildHasher, Hasher};
        let mut buckets = std::collections::HashSet::new();
        for i in 0..1024u64 {
            let mut h = OffsetHash.build_hasher();
            h.write_u64(i << 16);
            buckets.insert(h.finish() & 1023);
        }
        assert!(buckets.len() > 500, "{} buckets used of 1024", buckets.len());
    }

    #[test]
    fn cache_evicts_clean_only() {
        let mut c = L2Cache::new(2);
        c.insert(L2Table::from_bytes(0x10000, &[0u8; 64]));
        let dirty = c.insert(L2Table::zeroed(0x20000, 8));
        c.insert(L2Table::from_bytes(0x30000, &[0u8; 64]));
        assert_eq!(c.len(), 2);
        assert!(c.get(0x20000).is_some());
        assert!(c.get(0x10000).is_none());
        c.insert(L2Table::zeroed(0x40000, 8));
        c.insert(L2Table::zeroed(0x50000, 8));
        assert!(c.over_capacity());
        dirty.set_dirty(false);
        c.evict_clean();
        assert_eq!(c.len(), 2);
        assert!(c.get(0x20000).is_none());
    }
}
