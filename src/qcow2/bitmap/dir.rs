//! The bitmap directory and bitmap tables on disk, with the constraints
//! QEMU enforces (`block/qcow2-bitmap.c`): granularity 2^9..2^31 bytes,
//! names of 1..1023 bytes, unique, no extra data, tables of at most 2^27
//! entries and 512 MiB of bitmap data, type 1 (dirty tracking), no reserved
//! flag bits.

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, Result};

/// Flag bit 0: the bitmap was not saved and may be inconsistent.
pub(crate) const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap tracks every write (enabled).
pub(crate) const FLAG_AUTO: u32 = 1 << 1;
/// Flag bits QEMU accepts.
const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO;
/// Bitmap type 1: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Fixed part of a directory entry.
const ENTRY_FIXED: usize = 24;
/// Smallest granularity (bits).
pub(crate) const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity (bits).
pub(crate) const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest name.
pub(crate) const MAX_NAME: usize = 1023;
/// Most entries of one bitmap table.
pub(crate) const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Most bytes of one bitmap's data.
pub(crate) const MAX_DATA_BYTES: u64 = 0x2000_0000;
/// Bitmap table entry bits that must be zero.
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry offset bits.
pub(crate) const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bit 0 (without an offset): the cluster reads as all ones.
pub(crate) const TABLE_ALL_ONES: u64 = 1;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirEntry {
    /// Host offset of the bitmap table.
    pub(crate) table_offset: u64,
    /// Entries of the bitmap table.
    pub(crate) table_size: u32,
    /// `FLAG_*` bits.
    pub(crate) flags: u32,
    /// log2 of the granularity in bytes.
    pub(crate) granularity_bits: u8,
    /// The name as shown (invalid UTF-8 replaced).
    pub(crate) name: String,
    /// The name's bytes as stored (QEMU does not require UTF-8): what is
    /// written back, measured and compared.
    pub(crate) raw: Vec<u8>,
}

/// Bytes of bitmap data for a disk of `size` bytes at `granularity_bits`.
pub(crate) fn data_bytes(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1 << granularity_bits).div_ceil(8)
}

/// Bytes a directory entry named `name` takes.
pub(crate) fn entry_len(name: &[u8]) -> u64 {
    (ENTRY_FIXED + name.len()).div_ceil(8) as u64 * 8
}

/// Checks what QEMU checks before it creates a bitmap: granularity, name,
/// and the size of the bitmap for a disk of `size` bytes.
pub(crate) fn check_new(name: &str, granularity: u64, size: u64, cluster_size: u64) -> Result<u8> {
    if name.is_empty() {
        return Err(Error::invalid_argument("a bitmap name must not be empty").with_field("bitmap name"));
    }
    if name.len() > MAX_NAME {
        return Err(Error::invalid_argument(format!("bitmap name of {} bytes is longer than {MAX_NAME}", name.len()))
            .with_field("bitmap name"));
    }
    if !granularity.is_power_of_two() {
        return Err(Error::invalid_argument(format!("bitmap granularity {granularity} is not a power of two"))
            .with_field("granularity"));
    }
    let bits = granularity.trailing_zeros() as u8;
    if bits < MIN_GRANULARITY_BITS {
        return Err(Error::invalid_argument(format!(
            "bitmap granularity {granularity} is under the minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ))
        .with_field("granularity"));
    }
    if bits > MAX_GRANULARITY_BITS {
        return Err(Error::invalid_argument(format!(
            "bitmap granularity {granularity} exceeds the maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ))
        .with_field("granularity"));
    }
    let bytes = data_bytes(size, bits);
    if bytes > MAX_DATA_BYTES || bytes > MAX_TABLE_ENTRIES * cluster_size {
        return Err(Error::invalid_argument(format!(
            "a bitmap of granularity {granularity} over {size} bytes would take {bytes} bytes: use a larger granularity"
        ))
        .with_field("granularity"));
    }
    Ok(bits)
}

/// Parses and validates a directory of `nb` entries for a disk of `size`
/// bytes (QEMU's `bitmap_list_load` and `check_dir_entry`).
pub(crate) fn parse(dir: &[u8], nb: u32, size: u64, cluster_size: u64) -> Result<Vec<DirEntry>> {
    let bad = |pos: usize, msg: String| Error::invalid(msg).with_field("bitmap directory").with_offset(pos as u64);
    let mut out: Vec<DirEntry> = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        if pos + ENTRY_FIXED > dir.len() {
            return Err(bad(pos, "broken bitmap directory: an entry runs past its end".into()));
        }
        if out.len() as u64 >= u64::from(nb) {
            return Err(bad(pos, format!("more bitmaps found than the {nb} the bitmaps extension names")));
        }
        let e = &dir[pos..];
        let table_offset = BigEndian::read_u64(&e[0..8]);
        let table_size = BigEndian::read_u32(&e[8..12]);
        let flags = BigEndian::read_u32(&e[12..16]);
        let kind = e[16];
        let granularity_bits = e[17];
        let name_size = usize::from(BigEndian::read_u16(&e[18..20]));
        let extra = BigEndian::read_u32(&e[20..24]) as usize;
        let len = (ENTRY_FIXED + extra + name_size).div_ceil(8) * 8;
        if len > dir.len() - pos {
            return Err(bad(pos, "broken bitmap directory: an entry runs past its end".into()));
        }
        if extra != 0 {
            return Err(bad(pos, format!("bitmap extra data ({extra} bytes) is not supported")));
        }
        let raw = e[ENTRY_FIXED..ENTRY_FIXED + name_size].to_vec();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let entry = DirEntry { table_offset, table_size, flags, granularity_bits, name, raw };
        check_entry(&entry, kind, size, cluster_size).map_err(|m| {
            Error::invalid(format!("bitmap '{}' does not satisfy the constraints: {m}", entry.name))
                .with_field("bitmap directory")
                .with_offset(pos as u64)
        })?;
        if out.iter().any(|o| o.raw == entry.raw) {
            return Err(bad(pos, format!("bitmap name '{}' appears twice", entry.name)));
        }
        out.push(entry);
        pos += len;
    }
    if out.len() as u64 != u64::from(nb) {
        return Err(bad(pos, format!("{} bitmaps found, but the bitmaps extension names {nb}", out.len())));
    }
    Ok(out)
}

fn check_entry(e: &DirEntry, kind: u8, size: u64, cluster_size: u64) -> std::result::Result<(), String> {
    if e.table_size == 0 || e.table_offset == 0 {
        return Err("no bitmap table".into());
    }
    if !e.table_offset.is_multiple_of(cluster_size) {
        return Err(format!("bitmap table offset {:#x} is not cluster aligned", e.table_offset));
    }
    if u64::from(e.table_size) > MAX_TABLE_ENTRIES {
        return Err(format!("bitmap table of {} entries is too large", e.table_size));
    }
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits) {
        return Err(format!("granularity bits {} out of range", e.granularity_bits));
    }
    if e.flags & !FLAGS_KNOWN != 0 {
        return Err(format!("reserved flags {:#x} set", e.flags & !FLAGS_KNOWN));
    }
    if e.raw.is_empty() || e.raw.len() > MAX_NAME {
        return Err(format!("name of {} bytes", e.raw.len()));
    }
    if kind != TYPE_DIRTY_TRACKING {
        return Err(format!("type {kind} is not a dirty tracking bitmap"));
    }
    let phys = u64::from(e.table_size) * cluster_size;
    if phys > MAX_DATA_BYTES {
        return Err(format!("{phys} bytes of bitmap data is too large"));
    }
    // An in-use bitmap may be stale in size (a resize that was not saved).
    let covered = (phys * 8) << e.granularity_bits;
    if e.flags & FLAG_IN_USE == 0 && size > covered {
        return Err(format!("its table of {} entries cannot cover a disk of {size} bytes", e.table_size));
    }
    Ok(())
}

/// Encodes the directory.
pub(crate) fn encode(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        out.resize(start + entry_len(&e.raw) as usize, 0);
        let b = &mut out[start..];
        BigEndian::write_u64(&mut b[0..8], e.table_offset);
        BigEndian::write_u32(&mut b[8..12], e.table_size);
        BigEndian::write_u32(&mut b[12..16], e.flags);
        b[16] = TYPE_DIRTY_TRACKING;
        b[17] = e.granularity_bits;
        BigEndian::write_u16(&mut b[18..20], e.raw.len() as u16);
        b[ENTRY_FIXED..ENTRY_FIXED + e.raw.len()].copy_from_slice(&e.raw);
    }
    out
}

/// Checks one bitmap table entry (`check_table_entry`).
pub(crate) fn check_table_entry(entry: u64, cluster_size: u64) -> Result<()> {
    let off = entry & TABLE_OFFSET_MASK;
    if entry & TABLE_RESERVED != 0 || (off != 0 && (entry & TABLE_ALL_ONES != 0 || !off.is_multiple_of(cluster_size))) {
        return Err(Error::invalid(format!("bitmap table entry {entry:#x} is invalid")).with_field("bitmap table"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_round_trips_and_hostile_entries_are_refused() {
        let es = vec![
            DirEntry {
                table_offset: 0x30000,
                table_size: 1,
                flags: FLAG_AUTO,
                granularity_bits: 16,
                name: "b0".into(),
                raw: b"b0".to_vec(),
            },
            DirEntry {
                table_offset: 0x40000,
                table_size: 1,
                flags: 0,
                granularity_bits: 9,
                name: "\u{fffd}x".into(),
                raw: b"\xffx".to_vec(),
            },
        ];
        let d = encode(&es);
        assert_eq!(parse(&d, 2, 64 << 20, 65536).unwrap(), es);
        assert!(parse(&d, 1, 64 << 20, 65536).is_err());
        assert!(parse(&d, 3, 64 << 20, 65536).is_err());
        assert!(parse(&d[..d.len() - 8], 2, 64 << 20, 65536).is_err());
        let mut bad = d.clone();
        bad[17] = 8; // granularity under the minimum
        assert!(parse(&bad, 2, 64 << 20, 65536).is_err());
        let mut bad = d.clone();
        bad[15] |= 4; // reserved flag
        assert!(parse(&bad, 2, 64 << 20, 65536).is_err());
        let mut bad = d.clone();
        bad[23] = 8; // extra data
        assert!(parse(&bad, 2, 64 << 20, 65536).is_err());
        // A table too small for the disk.
        assert!(parse(&d, 2, 1 << 40, 65536).is_err());
        let dup = encode(&[es[0].clone(), es[0].clone()]);
        assert!(parse(&dup, 2, 64 << 20, 65536).unwrap_err().to_string().contains("twice"));
        assert!(check_new("a", 65536, 1 << 40, 65536).is_ok());
        assert!(check_new("a", 512, 1 << 50, 65536).is_err());
        assert!(check_new("a", 3000, 1 << 20, 65536).is_err());
        assert!(check_new("", 65536, 1 << 20, 65536).is_err());
        assert!(check_table_entry(0x10000 | 1, 65536).is_err());
        assert!(check_table_entry(1, 65536).is_ok());
    }
}
