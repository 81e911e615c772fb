//! The snapshot table on disk: entries, their encoding and validation.
//!
//! Spec: `docs/interop/qcow2.txt`, "Snapshots". The table is a run of
//! variable-length entries (each padded to a multiple of 8) at
//! `snapshots_offset`. Limits mirror `qcow2_read_snapshots`: at most 65536
//! snapshots, 1024 bytes of extra data each, 64 MiB in all.

use byteorder::{BigEndian, ByteOrder};

use crate::device::SnapshotInfo;
use crate::error::{Error, Result};
use crate::limits::*;
use crate::qcow2::header::check_table;
use crate::storage::Storage;

/// Size of the fixed part of a snapshot table entry.
const ENTRY_FIXED_LEN: usize = 40;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset 0: the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Offset 8: entries in that L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Offset 16: creation time, seconds.
    pub date_sec: u32,
    /// Offset 20: creation time, nanoseconds.
    pub date_nsec: u32,
    /// Offset 24: guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra-data field if present, else offset 32).
    pub vm_state_size: u64,
    /// Extra data +8: virtual disk size when the snapshot was taken.
    pub disk_size: Option<u64>,
    /// Extra data +16: instruction count (None when -1 or absent).
    pub icount: Option<u64>,
    /// Extra data beyond the 24 bytes vdisk understands, kept verbatim.
    pub unknown_extra: Vec<u8>,
}

impl Snapshot {
    /// The facts `info` and `snapshot -l` show.
    pub fn info(&self, current_size: u64) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            disk_size: self.disk_size.unwrap_or(current_size),
            icount: self.icount,
        }
    }

    /// Appends the encoded entry.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let mut f = [0u8; ENTRY_FIXED_LEN];
        BigEndian::write_u64(&mut f[0..8], self.l1_table_offset);
        BigEndian::write_u32(&mut f[8..12], self.l1_size);
        BigEndian::write_u16(&mut f[12..14], self.id.len() as u16);
        BigEndian::write_u16(&mut f[14..16], self.name.len() as u16);
        BigEndian::write_u32(&mut f[16..20], self.date_sec);
        BigEndian::write_u32(&mut f[20..24], self.date_nsec);
        BigEndian::write_u64(&mut f[24..32], self.vm_clock_nsec);
        BigEndian::write_u32(&mut f[32..36], self.vm_state_size.min(u64::from(u32::MAX)) as u32);
        let extra_len = 24 + self.unknown_extra.len();
        BigEndian::write_u32(&mut f[36..40], extra_len as u32);
        out.extend_from_slice(&f);
        let mut e = [0u8; 24];
        BigEndian::write_u64(&mut e[0..8], self.vm_state_size);
        BigEndian::write_u64(&mut e[8..16], self.disk_size.unwrap_or(0));
        BigEndian::write_u64(&mut e[16..24], self.icount.unwrap_or(u64::MAX));
        out.extend_from_slice(&e);
        out.extend_from_slice(&self.unknown_extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        let len = out.len() - start;
        out.resize(start + len.div_ceil(8) * 8, 0);
    }
}

fn bad(i: u32, msg: String, offset: u64) -> Error {
    Error::invalid(format!("snapshot {i}: {msg}")).with_format("qcow2").with_field("snapshot table").with_offset(offset)
}

/// Reads and validates `count` snapshot entries at `offset`.
pub(crate) fn read_table(
    file: &dyn Storage,
    offset: u64,
    count: u32,
    cluster_size: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    if count == 0 {
        return Ok((Vec::new(), 0));
    }
    if count > QCOW2_MAX_SNAPSHOTS {
        return Err(
            Error::limit(format!("{count} snapshots is more than {QCOW2_MAX_SNAPSHOTS}")).with_field("nb_snapshots")
        );
    }
    check_table("snapshots_offset", offset, 1, cluster_size)?;
    let file_len = file.len()?;
    let mut pos = offset;
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    for i in 0..count {
        let used = pos - offset;
        if used > QCOW2_MAX_SNAPSHOTS_BYTES {
            return Err(Error::limit(format!("snapshot table is larger than {QCOW2_MAX_SNAPSHOTS_BYTES} bytes"))
                .with_field("snapshot table"));
        }
        if pos >= file_len {
            return Err(bad(i, "entry starts past the end of the file".into(), pos));
        }
        let mut f = [0u8; ENTRY_FIXED_LEN];
        file.read_at(&mut f, pos)?;
        let l1_table_offset = BigEndian::read_u64(&f[0..8]);
        let l1_size = BigEndian::read_u32(&f[8..12]);
        let id_len = BigEndian::read_u16(&f[12..14]) as usize;
        let name_len = BigEndian::read_u16(&f[14..16]) as usize;
        let date_sec = BigEndian::read_u32(&f[16..20]);
        let date_nsec = BigEndian::read_u32(&f[20..24]);
        let vm_clock_nsec = BigEndian::read_u64(&f[24..32]);
        let vm_state_32 = BigEndian::read_u32(&f[32..36]);
        let extra_len = BigEndian::read_u32(&f[36..40]);
        if extra_len > QCOW2_MAX_SNAPSHOT_EXTRA {
            return Err(bad(
                i,
                format!("too much extra metadata ({extra_len} bytes, at most {QCOW2_MAX_SNAPSHOT_EXTRA})"),
                pos + 36,
            ));
        }
        let var_len = extra_len as usize + id_len + name_len;
        let mut var = vec![0u8; var_len];
        file.read_at(&mut var, pos + ENTRY_FIXED_LEN as u64)?;
        let (extra, rest) = var.split_at(extra_len as usize);
        let (id, name) = rest.split_at(id_len);
        let mut vm_state_size = u64::from(vm_state_32);
        let mut disk_size = None;
        let mut icount = None;
        if extra.len() >= 8 {
            vm_state_size = BigEndian::read_u64(&extra[0..8]);
        }
        if extra.len() >= 16 {
            disk_size = Some(BigEndian::read_u64(&extra[8..16]));
        }
        if extra.len() >= 24 {
            let v = BigEndian::read_u64(&extra[16..24]);
            icount = if v == u64::MAX { None } else { Some(v) };
        }
        let unknown_extra = if extra.len() > 24 { extra[24..].to_vec() } else { Vec::new() };
        let id = String::from_utf8(id.to_vec()).map_err(|_| bad(i, "id is not UTF-8".into(), pos))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad(i, "name is not UTF-8".into(), pos))?;
        if u64::from(l1_size) > QCOW2_MAX_L1_BYTES / 8 {
            return Err(bad(i, format!("L1 table of {l1_size} entries is too large"), pos + 8));
        }
        check_table("snapshot l1_table_offset", l1_table_offset, u64::from(l1_size) * 8, cluster_size)
            .map_err(|e| e.context(format!("snapshot {i}")))?;
        let entry_len = (ENTRY_FIXED_LEN + var_len).div_ceil(8) as u64 * 8;
        pos += entry_len;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            unknown_extra,
        });
    }
    Ok((out, pos - offset))
}

/// Encodes a whole table.
pub(crate) fn encode_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snaps {
        s.encode(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn roundtrip() {
        let s = Snapshot {
            l1_table_offset: 0x50000,
            l1_size: 16,
            id: "1".into(),
            name: "before upgrade".into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 77,
            vm_state_size: 1 << 33,
            disk_size: Some(1 << 30),
            icount: None,
            unknown_extra: vec![9; 8],
        };
        let mut t = Snapshot { id: "2".into(), name: "b".into(), unknown_extra: vec![], ..s.clone() };
        t.icount = Some(5);
        let enc = encode_table(&[s.clone(), t.clone()]);
        let m = MemStorage::new();
        m.write_at(&enc, 0x40000).unwrap();
        let (back, len) = read_table(&m, 0x40000, 2, 65536).unwrap();
        assert_eq!(back, vec![s, t]);
        assert_eq!(len as usize, enc.len());
    }

    /// Found by fuzzing (open_qcow2): an entry without the 16 bytes of
    /// extra data that hold the disk size was written back with a disk
    /// size of 0 by the next snapshot operation, so applying it later
    /// shrank the image to nothing.
    #[test]
    fn entry_without_disk_size_keeps_the_image_size() {
        use crate::qcow2::create::CreateOptions;
        use crate::qcow2::{Qcow2, Qcow2Options};
        use std::sync::Arc;
        let m = Arc::new(MemStorage::new());
        let mut o = CreateOptions::new(1 << 20);
        o.version = 2;
        let q = Qcow2::create(m.clone(), &o, Qcow2Options::default()).unwrap();
        q.snapshot_create("old").unwrap();
        q.close().unwrap();
        // Cut the entry's extra data to the 8 bytes of old QEMU versions.
        let h = Qcow2::read_header(&*m).unwrap();
        let off = h.snapshots_offset;
        let mut e = [0u8; 128];
        m.read_at(&mut e, off).unwrap();
        // Entry: 40 fixed bytes, 24 of extra data, then "1" and "old".
        let tail: Vec<u8> = e[40 + 24..40 + 24 + 4].to_vec();
        BigEndian::write_u32(&mut e[36..40], 8);
        e[40 + 8..40 + 8 + 4].copy_from_slice(&tail);
        m.write_at(&e, off).unwrap();
        let q = Qcow2::open(m.clone(), Qcow2Options::default()).unwrap();
        assert_eq!(q.snapshots()[0].disk_size, Some(1 << 20));
        q.snapshot_create("new").unwrap();
        q.close().unwrap();
        let q = Qcow2::open(m, Qcow2Options::default()).unwrap();
        let s = q.snapshots();
        assert_eq!(s[0].name, "old");
        assert_eq!(s[0].disk_size, Some(1 << 20));
    }

    #[test]
    fn too_much_extra() {
        let mut f = [0u8; 48];
        BigEndian::write_u32(&mut f[36..40], 5000);
        let m = MemStorage::new();
        m.write_at(&f, 65536).unwrap();
        assert!(read_table(&m, 65536, 1, 65536).is_err());
    }
}
