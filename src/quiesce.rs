//! A grace-period gate: lets a format free host clusters only after every
//! I/O request that might still use an old mapping of them has finished.
//!
//! Each request holds a [`Guard`] while it looks up mappings and does its
//! data I/O. [`Quiesce::wait_for_readers`] (called, under the allocation
//! lock, after pointers to clusters were removed and before those clusters are
//! made reusable) waits until every request that started before the call has
//! ended. Requests that start afterwards already see the new mappings.
//!
//! Entering costs one uncontended atomic add on a counter picked by thread,
//! so concurrent readers on different cores do not share a cache line.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const SHARDS: usize = 16;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Counter(AtomicUsize);

/// The gate. See the module docs.
#[derive(Debug)]
pub struct Quiesce {
    epoch: AtomicU64,
    counters: [[Counter; SHARDS]; 2],
    /// Serializes waiters: two overlapping waits would each flip the epoch
    /// and the second would skip the readers of the first's old epoch.
    waiters: parking_lot::Mutex<()>,
}

impl Default for Quiesce {
    fn default() -> Self {
        Self::new()
    }
}

/// Held by a request while it may use mappings.
#[derive(Debug)]
#[must_use]
pub struct Guard<'a> {
    counter: &'a AtomicUsize,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Release);
    }
}

fn shard() -> usize {
    use std::cell::Cell;
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let v = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
        s.set(v);
        v
    })
}

impl Quiesce {
    /// A new gate.
    pub fn new() -> Self {
        Quiesce { epoch: AtomicU64::new(0), counters: Default::default(), waiters: parking_lot::Mutex::new(()) }
    }

    /// Enters the gate for the duration of the returned guard.
    #[inline]
    pub fn enter(&self) -> Guard<'_> {
        let s = shard();
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let c = &self.counters[(e & 1) as usize][s].0;
            c.fetch_add(1, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == e {
                return Guard { counter: c };
            }
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits until every guard taken before this call is dropped. Calls are
    /// serialized here (any thread may flush); the caller must not hold a
    /// guard itself.
    pub fn wait_for_readers(&self) {
        let _one_at_a_time = self.waiters.lock();
        let old = self.epoch.fetch_add(1, Ordering::SeqCst);
        let set = &self.counters[(old & 1) as usize];
        let mut spins = 0u32;
        while set.iter().any(|c| c.0.load(Ordering::Acquire) != 0) {
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn waits_for_old_guards_only() {
        let q = Arc::new(Quiesce::new());
        let g = q.enter();
        let done = Arc::new(AtomicBool::new(false));
        let (q2, d2) = (q.clone(), done.clone());
        let t = std::thread::spawn(move || {
            q2.wait_for_readers();
            d2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!done.load(Ordering::SeqCst));
        drop(g);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        // A guard taken after the wait does not block the next wait forever.
        let _g = q.enter();
        let q3 = q.clone();
        let t = std::thread::spawn(move || q3.wait_for_readers());
        std::thread::sleep(std::time::Duration::from_millis(10));
        drop(_g);
        t.join().unwrap();
    }
}
