//! In-process bookkeeping of volumes a vdisk operation is using (libvirt's
//! `in_use` counter): a clone reading its source, an upload, a device opened
//! through [`Volume::open`](super::Volume::open). Other processes are seen
//! through the image locks instead ([`crate::storage::lock`]); this table also works
//! where the filesystem cannot lock.

use std::collections::HashMap;

use parking_lot::Mutex;

static BUSY: Mutex<Option<HashMap<(u64, u64), u32>>> = parking_lot::const_mutex(None);

/// Marks a file (device, inode) in use until dropped.
#[derive(Debug)]
pub(crate) struct BusyGuard {
    key: (u64, u64),
}

impl BusyGuard {
    /// Marks `key` in use.
    pub fn new(key: (u64, u64)) -> BusyGuard {
        let mut g = BUSY.lock();
        *g.get_or_insert_with(HashMap::new).entry(key).or_insert(0) += 1;
        BusyGuard { key }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut g = BUSY.lock();
        if let Some(map) = g.as_mut() {
            if let Some(n) = map.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.key);
                }
            }
        }
    }
}

/// Whether an operation in this process uses `key`.
pub(crate) fn is_busy(key: (u64, u64)) -> bool {
    BUSY.lock().as_ref().is_some_and(|m| m.get(&key).is_some_and(|n| *n > 0))
}
