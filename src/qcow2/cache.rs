//! The L2 table cache: whole tables keyed by host offset, bounded, clean
//! tables evicted least recently used first, dirty ones kept until the
//! image flushes them (QEMU's minimum of two tables, `MIN_L2_CACHE_SIZE`).
//!
//! Lookups take `&self` (the caller holds the mapping lock shared); inserts
//! and evictions take `&mut self` (the lock held exclusively). A reader
//! that loaded a table from disk compares the eviction generation before
//! inserting it, so it never resurrects a table that left meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::l2::L2Table;

/// Hashes table offsets (cluster-aligned u64s) and cluster numbers with one
/// multiplication: the cache is looked up on every guest request and the
/// set of clusters being allocated on every allocating one, and keys come
/// from the image itself, where collisions cost only a longer probe.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OffsetHash;

/// The hasher of [`OffsetHash`].
#[derive(Debug, Default)]
pub(crate) struct OffsetHasher(u64);

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
pub(crate) struct L2Cache {
    tables: HashMap<u64, Arc<L2Table>, OffsetHash>,
    capacity: usize,
    tick: AtomicU64,
    /// Bumped whenever a table leaves the cache; a reader that loaded a
    /// table from disk discards its copy if this changed meanwhile.
    generation: u64,
}

impl L2Cache {
    /// A cache holding at most `capacity` clean tables (at least 2).
    pub(crate) fn new(capacity: usize) -> Self {
        L2Cache {
            tables: HashMap::with_hasher(OffsetHash),
            capacity: capacity.max(crate::limits::QCOW2_MIN_L2_CACHE_TABLES),
            tick: AtomicU64::new(1),
            generation: 0,
        }
    }

    /// Forgets every table (none may be dirty): another host may have
    /// changed them. Readers that loaded one meanwhile discard it.
    pub(crate) fn clear(&mut self) {
        self.tables.clear();
        self.generation += 1;
    }

    /// The table at `offset`, if cached.
    #[inline]
    pub(crate) fn get(&self, offset: u64) -> Option<&Arc<L2Table>> {
        let t = self.tables.get(&offset)?;
        let now = self.tick.load(Ordering::Relaxed);
        if t.last_use.load(Ordering::Relaxed) != now {
            t.last_use.store(now, Ordering::Relaxed);
        }
        Some(t)
    }

    /// The eviction generation.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Inserts a table (replacing none: if one is cached at that offset it
    /// is returned instead), evicting clean tables beyond the capacity.
    pub(crate) fn insert(&mut self, table: L2Table) -> Arc<L2Table> {
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
    pub(crate) fn replace(&mut self, table: L2Table) -> Arc<L2Table> {
        if self.tables.remove(&table.offset).is_some() {
            self.generation += 1;
        }
        self.insert(table)
    }

    /// Evicts least recently used clean tables while over capacity.
    pub(crate) fn evict_clean(&mut self) {
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
    pub(crate) fn remove(&mut self, offset: u64) -> Option<Arc<L2Table>> {
        let t = self.tables.remove(&offset);
        if t.is_some() {
            self.generation += 1;
        }
        t
    }

    /// Whether more tables than the capacity are cached (all dirty).
    pub(crate) fn over_capacity(&self) -> bool {
        self.tables.len() > self.capacity
    }

    /// Dirty tables, in no particular order.
    pub(crate) fn dirty_tables(&self) -> Vec<Arc<L2Table>> {
        self.tables.values().filter(|t| t.is_dirty()).cloned().collect()
    }

    /// Number of cached tables.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
