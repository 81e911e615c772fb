//! A snapshot's content as a read-only device, without applying it
//! (`qemu-img convert -l`, `snapshot_view`).

use super::table::Snapshot;
use crate::device::{check_request, BlockDevice, DeviceInfo, Extent, ExtentKind};
use crate::error::Result;
use crate::qcow2::cluster::L1Ref;
use crate::qcow2::l2::Mapping;
use crate::qcow2::Qcow2;

impl Qcow2 {
    /// A read-only view of the snapshot named (or with id) `key`, sized
    /// like the current image as `qemu-img convert -l` exports it.
    pub fn snapshot_view(&self, key: &str) -> Result<SnapshotView<'_>> {
        let snap = self.find_snapshot(key)?;
        let l1 = crate::qcow2::table::read_u64_table(
            &*self.file,
            snap.l1_table_offset,
            snap.l1_size as usize,
            "snapshot L1 table",
        )?;
        Ok(SnapshotView { q: self, l1, snapshot: snap })
    }
}

/// A snapshot's content as a read-only [`BlockDevice`].
#[derive(Debug)]
pub struct SnapshotView<'a> {
    q: &'a Qcow2,
    l1: Vec<u64>,
    snapshot: Snapshot,
}

impl SnapshotView<'_> {
    /// The snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The snapshot's L1 table.
    fn l1_ref(&self) -> L1Ref<'_> {
        L1Ref { entries: &self.l1, offset: self.snapshot.l1_table_offset }
    }
}

impl BlockDevice for SnapshotView<'_> {
    fn info(&self) -> DeviceInfo {
        let mut i = self.q.info();
        i.read_only = true;
        i.virtual_size = self.size();
        i
    }

    fn size(&self) -> u64 {
        self.q.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size())?;
        let _g = self.q.enter_active()?;
        self.q.read_mapped_in(Some(self.l1_ref()), buf, offset)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.size();
        check_request(offset, 0, size)?;
        let max = max_len.min(size - offset);
        if max == 0 {
            // Nothing to describe (an empty request, or the end).
            return Ok(Extent { offset, length: 0, kind: ExtentKind::Unallocated, depth: 0, encrypted: false });
        }
        let _g = self.q.enter_active()?;
        let (m, len) = self.q.lookup_in(Some(self.l1_ref()), offset, max)?;
        let len = len.min(max);
        let kind = match m {
            Mapping::Data { host } => ExtentKind::Data { host_offset: Some(host) },
            Mapping::Zero { prealloc } => ExtentKind::Zero { host_offset: prealloc },
            Mapping::Compressed { host, .. } => ExtentKind::Compressed { host_offset: host },
            Mapping::Unallocated => {
                if let Some(b) = &self.q.backing {
                    if offset < b.size() {
                        let e = b.map(offset, len.min(b.size() - offset))?;
                        return Ok(Extent { depth: e.depth + 1, ..e });
                    }
                }
                ExtentKind::Unallocated
            }
        };
        Ok(Extent { offset, length: len, kind, depth: 0, encrypted: self.q.crypt.is_some() })
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}
