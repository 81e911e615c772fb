//! Creating VHDX images the way `qemu-img create -f vhdx -o ...` does.
//!
//! Options and refusals follow QEMU 10.0 (`vhdx_co_create`): `subformat`
//! `dynamic` (default) or `fixed`; `block_size` 0 (default: 8 MiB up to
//! 1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, 64 MiB above),
//! otherwise clamped to 1..256 MiB and refused unless a power of two;
//! `log_size` rounded up to whole MiB (default 1 MiB; 0 and 4 GiB or more
//! refused); `block_state_zero` (on
//! by default: blocks start in the ZERO state, a fixed image's space is
//! reserved but written on first use, as QEMU does; off: a fixed image's
//! blocks are fully present, a dynamic image's not present); sizes above
//! 64 TiB refused; the size is rounded up to the logical sector.
//!
//! vdisk's own options: `logical_sector_size` and `physical_sector_size`
//! (512 or 4096; QEMU always writes 512), and `backing_file` (with
//! `backing_fmt=vhdx`), which makes a differencing image whose parent
//! locator records the parent's DataWriteGuid and relative path.
//!
//! Layout: headers and region tables in the first MiB, the log at 1 MiB,
//! then the BAT, then the 1 MiB metadata region, then payload blocks.

use std::path::Path;
use std::sync::Arc;

use super::format::*;
use super::{Vhdx, VhdxOptions};
use crate::device::{BlockDevice, Format, FormatDetails, Resolver};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};

/// The VHDX subformat to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VhdxSubformat {
    /// Blocks allocated on first write (QEMU's default).
    #[default]
    Dynamic,
    /// Every block's space reserved at creation.
    Fixed,
}

/// Options of [`Vhdx::create`], in qemu-img's `-o` vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxCreateOptions {
    /// `subformat`: dynamic or fixed.
    pub subformat: VhdxSubformat,
    /// `block_size` in bytes; 0 picks QEMU's default for the size.
    pub block_size: u64,
    /// `log_size` in bytes.
    pub log_size: u64,
    /// `block_state_zero`.
    pub block_state_zero: bool,
    /// `logical_sector_size` (vdisk's own).
    pub logical_sector_size: u32,
    /// `physical_sector_size` (vdisk's own).
    pub physical_sector_size: u32,
    /// `backing_file`: the parent of a differencing image (vdisk's own).
    pub backing_file: Option<String>,
}

impl Default for VhdxCreateOptions {
    fn default() -> Self {
        VhdxCreateOptions {
            subformat: VhdxSubformat::Dynamic,
            block_size: 0,
            log_size: MIB,
            block_state_zero: true,
            logical_sector_size: 512,
            physical_sector_size: 512,
            backing_file: None,
        }
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::invalid_argument(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

impl VhdxCreateOptions {
    /// Parses `key=value,...` (qemu-img `-o` syntax). Unknown keys are an
    /// error.
    pub fn parse(s: &str) -> Result<VhdxCreateOptions> {
        let mut o = VhdxCreateOptions::default();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| Error::invalid_argument(format!("option '{item}' is not key=value")))?;
            match k {
                "subformat" => {
                    o.subformat = match v {
                        "dynamic" => VhdxSubformat::Dynamic,
                        "fixed" => VhdxSubformat::Fixed,
                        _ => {
                            return Err(Error::invalid_argument(format!(
                                "Parameter 'subformat' does not accept value '{v}'"
                            )))
                        }
                    }
                }
                "block_size" => o.block_size = crate::size::parse(v)?,
                "log_size" => o.log_size = crate::size::parse(v)?,
                "block_state_zero" => o.block_state_zero = parse_bool(k, v)?,
                "logical_sector_size" | "physical_sector_size" => {
                    let n: u32 = match v {
                        "512" => 512,
                        "4096" | "4k" | "4K" => 4096,
                        _ => return Err(Error::invalid_argument(format!("{k} must be 512 or 4096, not '{v}'"))),
                    };
                    if k == "logical_sector_size" {
                        o.logical_sector_size = n;
                    } else {
                        o.physical_sector_size = n;
                    }
                }
                "backing_file" => o.backing_file = Some(v.to_string()),
                "backing_fmt" => {
                    if v != "vhdx" {
                        return Err(Error::invalid_argument(format!(
                            "backing_fmt '{v}': the parent of a differencing VHDX must be vhdx"
                        )));
                    }
                }
                other => {
                    return Err(Error::invalid_argument(format!(
                        "Invalid parameter '{other}' (vhdx options: subformat, block_size, log_size, block_state_zero, logical_sector_size, physical_sector_size, backing_file, backing_fmt)"
                    )))
                }
            }
        }
        Ok(o)
    }

    /// The block size QEMU picks: the given one clamped to 1..256 MiB, or
    /// by image size when 0.
    pub fn effective_block_size(&self, size: u64) -> Result<u32> {
        let bs = if self.block_size == 0 {
            if size > 32 << 40 {
                64 * MIB
            } else if size > 100 << 30 {
                32 * MIB
            } else if size > 1 << 30 {
                16 * MIB
            } else {
                8 * MIB
            }
        } else {
            self.block_size.clamp(u64::from(MIN_BLOCK), u64::from(MAX_BLOCK))
        };
        if !bs.is_power_of_two() {
            return Err(Error::invalid_argument("Block size must be a power of two"));
        }
        Ok(bs as u32)
    }
}

/// Facts about the parent a differencing image records.
struct ParentFacts {
    name: String,
    data_write_guid: Guid,
    size: u64,
}

/// Writes a new image into `file` (which should be empty).
fn write_image(file: &dyn Storage, size: u64, o: &VhdxCreateOptions, parent: Option<&ParentFacts>) -> Result<()> {
    if size > MAX_DISK_SIZE {
        return Err(Error::invalid_argument("Image size too large; max of 64TB"));
    }
    if o.log_size > u64::from(u32::MAX) {
        return Err(Error::invalid_argument("Log size must be smaller than 4 GB"));
    }
    // QEMU rounds the log up to whole MiB; only 0 is refused.
    let log_size = o.log_size.next_multiple_of(MIB);
    if log_size == 0 || log_size > u64::from(u32::MAX) {
        return Err(Error::invalid_argument("Log size must be a multiple of 1 MB"));
    }
    if parent.is_some() && o.subformat == VhdxSubformat::Fixed {
        return Err(Error::invalid_argument("a differencing VHDX cannot be fixed"));
    }
    let ls = u64::from(o.logical_sector_size);
    let size = size.next_multiple_of(ls);
    let bs = o.effective_block_size(size)?;
    let geo = Geometry::new(size, bs, o.logical_sector_size, o.physical_sector_size, parent.is_some())?;
    let log_offset = MIB;
    let bat_offset = log_offset + log_size;
    let bat_len = (geo.bat_entries * 8).next_multiple_of(MIB).max(MIB);
    let meta_offset = bat_offset + bat_len;
    let payload = meta_offset + MIB;
    if bat_len > u64::from(u32::MAX) & !(MIB - 1) {
        return Err(Error::invalid_argument("the BAT of this image would be larger than a region can be"));
    }

    // File identifier.
    let mut ident = vec![0u8; 64 << 10];
    ident[..8].copy_from_slice(FILE_SIGNATURE);
    let creator: Vec<u8> = "vdisk".encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
    ident[8..8 + creator.len()].copy_from_slice(&creator);
    file.write_at(&ident, 0)?;

    // Region tables.
    let regions = [
        Region { guid: BAT_GUID, offset: bat_offset, length: bat_len as u32, required: true },
        Region { guid: METADATA_GUID, offset: meta_offset, length: MIB as u32, required: true },
    ];
    let rt = RegionTable::encode(&regions);
    file.write_at(&rt, REGION_OFFSETS[0])?;
    file.write_at(&rt, REGION_OFFSETS[1])?;

    // Metadata.
    let mut items: Vec<(Guid, Vec<u8>, u32)> = Vec::new();
    let params = u32::from(o.subformat == VhdxSubformat::Fixed) | (u32::from(parent.is_some()) << 1);
    let mut p = bs.to_le_bytes().to_vec();
    p.extend_from_slice(&params.to_le_bytes());
    items.push((FILE_PARAMS_GUID, p, 4));
    items.push((DISK_SIZE_GUID, size.to_le_bytes().to_vec(), 6));
    items.push((PAGE83_GUID, Guid::random().0.to_vec(), 6));
    items.push((LOGICAL_SECTOR_GUID, o.logical_sector_size.to_le_bytes().to_vec(), 6));
    items.push((PHYSICAL_SECTOR_GUID, o.physical_sector_size.to_le_bytes().to_vec(), 6));
    if let Some(pf) = parent {
        let loc = ParentLocator {
            entries: vec![
                ("parent_linkage".into(), format!("{{{}}}", pf.data_write_guid)),
                ("relative_path".into(), pf.name.replace('/', "\\")),
            ],
        };
        items.push((PARENT_LOCATOR_GUID, loc.encode(), 6));
    }
    let mut entries = Vec::new();
    let mut at = TABLE_SIZE as u32;
    for (g, data, flags) in &items {
        entries.push(MetaEntry { guid: *g, offset: at, length: data.len() as u32, flags: *flags });
        file.write_at(data, meta_offset + u64::from(at))?;
        at += (data.len() as u32).next_multiple_of(8);
    }
    file.write_at(&encode_metadata_table(&entries), meta_offset)?;

    // BAT.
    let fixed_present = o.subformat == VhdxSubformat::Fixed && !o.block_state_zero;
    let initial = if parent.is_some() {
        state::NOT_PRESENT
    } else if o.block_state_zero {
        state::ZERO
    } else {
        state::NOT_PRESENT
    };
    if initial != 0 || fixed_present {
        let mut bat = vec![0u8; (geo.bat_entries * 8) as usize];
        for b in 0..geo.data_blocks {
            let v = if fixed_present { (payload + b * u64::from(bs)) | state::FULLY_PRESENT } else { initial };
            let i = geo.payload_index(b) as usize;
            bat[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        // Written in bounded pieces.
        for (k, chunk) in bat.chunks(4 << 20).enumerate() {
            file.write_at(chunk, bat_offset + (k as u64) * (4 << 20))?;
        }
    }
    let end = if o.subformat == VhdxSubformat::Fixed { payload + geo.data_blocks * u64::from(bs) } else { payload };
    file.set_len(end)?;
    if o.subformat == VhdxSubformat::Fixed {
        // Reserve the space, where the host can.
        let _ = file.allocate(payload, end - payload);
    }

    // Headers last: the image is valid only once they are.
    let mut h = Header {
        sequence: 0,
        file_write_guid: Guid::random(),
        data_write_guid: Guid::random(),
        log_guid: Guid::default(),
        log_version: 0,
        version: 1,
        log_length: log_size as u32,
        log_offset,
    };
    file.write_at(&h.encode(), HEADER_OFFSETS[0])?;
    h.sequence = 1;
    file.write_at(&h.encode(), HEADER_OFFSETS[1])?;
    file.sync()
}

impl Vhdx {
    /// Creates an image of `size` bytes in `file` and opens it
    /// read-write. A `backing_file` option needs [`Vhdx::create_with`].
    pub fn create_on(file: Arc<dyn Storage>, size: u64, opts: &VhdxCreateOptions) -> Result<Vhdx> {
        if opts.backing_file.is_some() {
            return Err(Error::invalid_argument("a differencing VHDX needs a resolver for its parent (create_with)"));
        }
        write_image(&*file, size, opts, None).map_err(|e| e.with_format("vhdx"))?;
        Vhdx::open(file, VhdxOptions::default())
    }

    /// Creates an image file at `path` (failing if it exists).
    pub fn create(path: &Path, size: u64, opts: &VhdxCreateOptions) -> Result<Vhdx> {
        let f: Arc<dyn Storage> = Arc::new(FileStorage::create_new(path)?);
        Self::create_on(f, size, opts).map_err(|e| e.with_path(path))
    }

    /// Creates an image file at `path`; a parent named by `backing_file`
    /// is opened through `resolver` (its size is the default size: pass 0).
    pub fn create_with(path: &Path, size: u64, opts: &VhdxCreateOptions, resolver: &dyn Resolver) -> Result<Vhdx> {
        let Some(name) = &opts.backing_file else {
            return Self::create(path, size, opts);
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let parent = resolver.open_backing(dir, name, Some(Format::Vhdx))?;
        let FormatDetails::Vhdx(d) = parent.info().details else {
            return Err(Error::invalid_argument(format!("the parent '{name}' is not a VHDX image")));
        };
        let facts = ParentFacts {
            name: name.clone(),
            data_write_guid: Guid::parse(&d.data_write_guid)
                .ok_or_else(|| Error::internal("the parent's DataWriteGuid does not parse"))?,
            size: parent.size(),
        };
        let size = if size == 0 { facts.size } else { size };
        let f: Arc<dyn Storage> = Arc::new(FileStorage::create_new(path)?);
        write_image(&*f, size, opts, Some(&facts)).map_err(|e| e.with_format("vhdx").with_path(path))?;
        Vhdx::open(f, VhdxOptions { parent: Some(parent), ..Default::default() }).map_err(|e| e.with_path(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn options_and_refusals() {
        let o = VhdxCreateOptions::parse("subformat=fixed,block_size=2M,log_size=2M,block_state_zero=off").unwrap();
        assert_eq!(o.subformat, VhdxSubformat::Fixed);
        assert_eq!(o.effective_block_size(1 << 30).unwrap(), 2 << 20);
        assert!(VhdxCreateOptions::parse("subformat=differencing").is_err());
        assert!(VhdxCreateOptions::parse("block_state_zero=maybe").is_err());
        assert!(VhdxCreateOptions::parse("frobnicate=1").is_err());
        let o = VhdxCreateOptions::parse("block_size=3M").unwrap();
        assert!(o.effective_block_size(1 << 30).is_err());
        let o = VhdxCreateOptions::parse("block_size=512K").unwrap();
        assert_eq!(o.effective_block_size(1 << 30).unwrap(), 1 << 20);
        let d = VhdxCreateOptions::default();
        assert_eq!(d.effective_block_size(1 << 30).unwrap(), 8 << 20);
        assert_eq!(d.effective_block_size((1 << 30) + 1).unwrap(), 16 << 20);
        assert_eq!(d.effective_block_size(101 << 30).unwrap(), 32 << 20);
        let f = MemStorage::new();
        assert!(write_image(&f, 65 << 40, &d, None).is_err());
        let o = VhdxCreateOptions { log_size: 0, ..Default::default() };
        assert!(write_image(&f, 1 << 20, &o, None).is_err());
        let o = VhdxCreateOptions { log_size: 4 << 30, ..Default::default() };
        assert!(write_image(&f, 1 << 20, &o, None).is_err());
    }

    #[test]
    fn every_subformat_round_trips() {
        for opts in [
            "",
            "subformat=fixed",
            "subformat=fixed,block_state_zero=off",
            "block_state_zero=off,block_size=1M,logical_sector_size=4096,physical_sector_size=4096",
        ] {
            let o = VhdxCreateOptions::parse(opts).unwrap();
            let f: Arc<dyn Storage> = Arc::new(MemStorage::new());
            let v = Vhdx::create_on(f.clone(), 20 << 20, &o).unwrap();
            v.write_at(b"hello", (3 << 20) + 7).unwrap();
            v.flush().unwrap();
            drop(v);
            let v = Vhdx::open(f, VhdxOptions { read_only: true, ..Default::default() }).unwrap();
            let mut b = [0u8; 5];
            v.read_at(&mut b, (3 << 20) + 7).unwrap();
            assert_eq!(&b, b"hello", "{opts}");
            assert_eq!(v.size(), 20 << 20);
        }
    }
}
