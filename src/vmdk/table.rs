//! Grain tables in memory and their bounded cache.
//!
//! A grain table is `numGTEsPerGT` little-endian u32 entries, each the
//! sector of a grain in the extent file. In memory the entries are atomics:
//! readers load them without a lock of their own; writers store them while
//! holding the extent's allocation lock, after the grain's data is written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian};

use super::header::SECTOR;

/// One grain table in memory.
#[derive(Debug)]
pub(crate) struct GrainTable {
    /// Entries: sectors of grains (0 unallocated, 1 zeroed with the flag).
    entries: Box<[AtomicU32]>,
    /// Changed since written.
    dirty: AtomicBool,
    /// Last cache use, for eviction.
    last_use: AtomicU64,
}

impl GrainTable {
    pub(crate) fn from_bytes(b: &[u8]) -> GrainTable {
        GrainTable {
            entries: b.chunks_exact(4).map(|c| AtomicU32::new(LittleEndian::read_u32(c))).collect(),
            dirty: AtomicBool::new(false),
            last_use: AtomicU64::new(0),
        }
    }

    pub(crate) fn zeroed(n: usize) -> GrainTable {
        GrainTable {
            entries: (0..n).map(|_| AtomicU32::new(0)).collect(),
            dirty: AtomicBool::new(true),
            last_use: AtomicU64::new(0),
        }
    }

    /// Entry `i` (0 when out of range).
    pub(crate) fn get(&self, i: u64) -> u32 {
        usize::try_from(i).ok().and_then(|i| self.entries.get(i)).map_or(0, |e| e.load(Ordering::Acquire))
    }

    pub(crate) fn set(&self, i: u64, v: u32) {
        if let Some(e) = usize::try_from(i).ok().and_then(|i| self.entries.get(i)) {
            e.store(v, Ordering::Release);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Encodes the table (padded to whole sectors).
    pub(crate) fn encode(&self, sectors: u64) -> Vec<u8> {
        let len = usize::try_from(sectors.saturating_mul(SECTOR)).unwrap_or(0);
        let mut b = vec![0u8; len.max(self.entries.len() * 4)];
        for (c, e) in b.chunks_exact_mut(4).zip(self.entries.iter()) {
            LittleEndian::write_u32(c, e.load(Ordering::Acquire));
        }
        b
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    pub(crate) fn set_clean(&self) {
        self.dirty.store(false, Ordering::Release);
    }
}

/// Bounded cache of grain tables keyed by grain directory index. Only clean
/// tables are evicted.
#[derive(Debug)]
pub(crate) struct TableCache {
    /// Tables by grain directory index.
    pub(crate) tables: HashMap<u64, Arc<GrainTable>>,
    /// Clean tables kept at most.
    pub(crate) capacity: usize,
    /// Use counter for LRU eviction.
    tick: AtomicU64,
    /// Bumped on every eviction: a reader that loaded a table from disk
    /// while this changed retries, so it never caches a stale copy.
    pub(crate) generation: u64,
}

impl TableCache {
    pub(crate) fn new(capacity: usize) -> Self {
        TableCache { tables: HashMap::new(), capacity: capacity.max(2), tick: AtomicU64::new(0), generation: 0 }
    }

    pub(crate) fn get(&self, gdi: u64) -> Option<&Arc<GrainTable>> {
        let t = self.tables.get(&gdi)?;
        // The clock advances on inserts only, so lookups on many threads
        // do not all write one shared counter.
        let now = self.tick.load(Ordering::Relaxed);
        if t.last_use.load(Ordering::Relaxed) != now {
            t.last_use.store(now, Ordering::Relaxed);
        }
        Some(t)
    }

    /// Inserts `t` unless a table is already cached for `gdi`; returns the
    /// cached one.
    pub(crate) fn insert(&mut self, gdi: u64, t: Arc<GrainTable>) -> Arc<GrainTable> {
        if let Some(old) = self.tables.get(&gdi) {
            return old.clone();
        }
        t.last_use.store(self.tick.fetch_add(1, Ordering::Relaxed) + 1, Ordering::Relaxed);
        self.tables.insert(gdi, t.clone());
        self.evict_clean();
        t
    }

    pub(crate) fn evict_clean(&mut self) {
        while self.tables.len() > self.capacity {
            let victim = self
                .tables
                .iter()
                .filter(|(_, t)| !t.is_dirty())
                .min_by_key(|(_, t)| t.last_use.load(Ordering::Relaxed))
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    self.tables.remove(&k);
                    self.generation = self.generation.wrapping_add(1);
                }
                None => break,
            }
        }
    }

    pub(crate) fn dirty(&self) -> Vec<(u64, Arc<GrainTable>)> {
        let mut v: Vec<_> = self.tables.iter().filter(|(_, t)| t.is_dirty()).map(|(k, t)| (*k, t.clone())).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }
}
