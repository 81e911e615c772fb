//! Creating VHD images the way `qemu-img create -f vpc -o ...` does (QEMU
//! 10's `vpc_co_create`): footer creator `qemu` (`qem2` with
//! `force_size=on`), host OS `Wi2k`, version 5.3 (Virtual PC 2007); the
//! size becomes the smallest CHS geometry that covers it unless
//! `force_size=on` keeps it exact (what Azure needs: whole MiB); dynamic
//! disks get the footer copy at 0, the dynamic header at 512, the BAT at
//! 1536 and 2 MiB blocks.

use std::path::Path;
use std::sync::Arc;

use super::dynamic::{DynHeader, ParentLocator, BAT_UNALLOCATED, DEFAULT_BLOCK_SIZE};
use super::footer::{create_geometry, Footer, NO_DATA_OFFSET, TYPE_DYNAMIC, TYPE_FIXED, VHD_EPOCH};
use super::{Vpc, VpcOptions};
use crate::error::{Error, Result};
use crate::limits::VPC_MAX_SECTORS;
use crate::storage::{FileStorage, Storage};

/// The VHD subformat (`subformat=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VpcSubformat {
    /// Grows as written (QEMU's default).
    #[default]
    Dynamic,
    /// The whole disk, then the footer.
    Fixed,
}

/// How a fixed image's data area is preallocated (`preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VpcPreallocation {
    /// A sparse file.
    #[default]
    Off,
    /// Space reserved with `fallocate`.
    Falloc,
    /// Space reserved (vdisk reserves it as `falloc` does; it reads as zeros).
    Full,
}

/// Options of a new VHD image, named as `qemu-img create -f vpc -o` names
/// them.
#[derive(Debug, Clone, Default)]
pub struct VpcCreateOptions {
    /// `subformat=dynamic|fixed`.
    pub subformat: VpcSubformat,
    /// `force_size=on`: keep the exact size instead of the CHS geometry's.
    pub force_size: bool,
    /// `preallocation=off|falloc|full` (fixed images; ignored for dynamic
    /// ones, as QEMU does).
    pub preallocation: VpcPreallocation,
}

impl VpcCreateOptions {
    /// Parses qemu-img's `-o` string (`subformat=fixed,force_size=on`).
    /// `size`, `nocow` and `extent_size_hint` are accepted and ignored.
    pub fn parse(s: &str) -> Result<VpcCreateOptions> {
        let mut o = VpcCreateOptions::default();
        for kv in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
            match k {
                "subformat" => {
                    o.subformat = match v {
                        "dynamic" => VpcSubformat::Dynamic,
                        "fixed" => VpcSubformat::Fixed,
                        _ => return Err(bad_value("subformat", v)),
                    }
                }
                "force_size" => o.force_size = parse_bool("force_size", v)?,
                "preallocation" => {
                    o.preallocation = match v {
                        "off" => VpcPreallocation::Off,
                        "falloc" => VpcPreallocation::Falloc,
                        "full" => VpcPreallocation::Full,
                        _ => return Err(bad_value("preallocation", v)),
                    }
                }
                "size" | "nocow" | "extent_size_hint" => {}
                _ => return Err(Error::invalid_argument(format!("Invalid parameter '{k}'"))),
            }
        }
        Ok(o)
    }

    /// The options as qemu-img prints them after `fmt=vpc size=N`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if self.subformat == VpcSubformat::Fixed {
            s.push_str(" subformat=fixed");
        }
        if self.force_size {
            s.push_str(" force_size=on");
        }
        s
    }
}

pub(crate) fn bad_value(k: &str, v: &str) -> Error {
    Error::invalid_argument(format!("Parameter '{k}' does not accept value '{v}'"))
}

pub(crate) fn parse_bool(k: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::invalid_argument(format!("Parameter '{k}' expects 'on' or 'off'"))),
    }
}

/// 16 random bytes for image UUIDs (version 4, variant 1).
pub(crate) fn random_uuid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

fn now_vhd() -> u32 {
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(VHD_EPOCH);
    t.saturating_sub(VHD_EPOCH) as u32
}

impl Vpc {
    /// Creates a VHD image in `file` (which should be empty) of `size`
    /// bytes, rounded up to whole sectors and then as
    /// [`create_geometry`] says; the image's real size is
    /// [`crate::BlockDevice::size`] of the result.
    pub fn create(file: Arc<dyn Storage>, size: u64, opts: &VpcCreateOptions) -> Result<Vpc> {
        let size = size.checked_next_multiple_of(512).unwrap_or(u64::MAX);
        if size / 512 > VPC_MAX_SECTORS {
            return Err(Error::invalid_argument("The image size is too large for file format 'vpc'"));
        }
        let ((cylinders, heads, sectors), size) = create_geometry(size, opts.force_size)?;
        let dynamic = opts.subformat == VpcSubformat::Dynamic;
        let mut footer = Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: if dynamic { 512 } else { NO_DATA_OFFSET },
            timestamp: now_vhd(),
            creator_app: if opts.force_size { *b"qem2" } else { *b"qemu" },
            creator_version: 0x0005_0003,
            creator_os: *b"Wi2k",
            original_size: size,
            current_size: size,
            cylinders,
            heads,
            sectors,
            disk_type: if dynamic { TYPE_DYNAMIC } else { TYPE_FIXED },
            checksum: 0,
            uuid: random_uuid(),
            saved_state: 0,
            reserved: [0; 427],
        };
        footer.checksum = 0;
        let fb = footer.encode();
        file.set_len(0)?;
        if dynamic {
            let block = u64::from(DEFAULT_BLOCK_SIZE);
            let entries = (size / 512).div_ceil(block / 512);
            let bat_len = (entries * 4).next_multiple_of(512);
            let header = DynHeader {
                data_offset: u64::MAX,
                table_offset: 1536,
                version: 0x0001_0000,
                max_table_entries: u32::try_from(entries)
                    .map_err(|_| Error::invalid_argument("The image size is too large for file format 'vpc'"))?,
                block_size: DEFAULT_BLOCK_SIZE,
                checksum: 0,
                parent_uuid: [0; 16],
                parent_timestamp: 0,
                parent_name: String::new(),
                locators: [ParentLocator::default(); 8],
            };
            file.write_at(&fb, 0)?;
            file.write_at(&header.encode(), 512)?;
            // Every entry BAT_UNALLOCATED (all ones).
            let bat = vec![(BAT_UNALLOCATED & 0xff) as u8; bat_len as usize];
            file.write_at(&bat, 1536)?;
            file.write_at(&fb, 1536 + bat_len)?;
        } else {
            match opts.preallocation {
                VpcPreallocation::Off => file.set_len(size)?,
                _ => {
                    if file.allocate(0, size).is_err() {
                        file.set_len(size)?;
                    }
                }
            }
            file.write_at(&fb, size)?;
        }
        file.sync()?;
        Vpc::open(file, VpcOptions::default())
    }

    /// Creates (or truncates) the file at `path` and a VHD image in it.
    pub fn create_file(path: &Path, size: u64, opts: &VpcCreateOptions) -> Result<Vpc> {
        let st = FileStorage::create(path)?;
        Vpc::create(Arc::new(st), size, opts).map_err(|e| e.with_path(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::BlockDevice;
    use crate::storage::MemStorage;

    #[test]
    fn options() {
        let o = VpcCreateOptions::parse("subformat=fixed,force_size=on").unwrap();
        assert_eq!((o.subformat, o.force_size), (VpcSubformat::Fixed, true));
        assert!(VpcCreateOptions::parse("subformat=foo").unwrap_err().to_string().contains("does not accept"));
        assert!(VpcCreateOptions::parse("block_size=1M").unwrap_err().to_string().contains("Invalid parameter"));
    }

    #[test]
    fn sizes_like_qemu() {
        // qemu-img 10: 1000001 bytes -> 1009664 (CHS), 1000448 with force_size.
        let v = Vpc::create(Arc::new(MemStorage::new()), 1_000_001, &VpcCreateOptions::default()).unwrap();
        assert_eq!(v.size(), 1_009_664);
        let o = VpcCreateOptions { force_size: true, ..Default::default() };
        let v = Vpc::create(Arc::new(MemStorage::new()), 1_000_001, &o).unwrap();
        assert_eq!(v.size(), 1_000_448);
        let st = Arc::new(MemStorage::new());
        let v = Vpc::create(st.clone(), 0, &VpcCreateOptions::default()).unwrap();
        assert_eq!(v.size(), 0);
        assert_eq!(st.len().unwrap(), 2048);
        assert!(Vpc::create(Arc::new(MemStorage::new()), 3 << 40, &o).is_err());
    }
}
