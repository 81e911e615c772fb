//! Creating vmdk images the way `qemu-img create -f vmdk -o ...` does.
//!
//! File naming, extent sizes, header layout, descriptor text and geometry
//! follow QEMU 10.0 (`vmdk_co_do_create`, `vmdk_init_extent`):
//!
//! * monolithicSparse: one file, descriptor embedded at sector 1 (20
//!   sectors), redundant directory and tables at sector 21, directory and
//!   tables after them, grains from the next 64 KiB boundary;
//! * monolithicFlat: `name.vmdk` descriptor + `name-flat.vmdk`;
//! * twoGbMaxExtentSparse / twoGbMaxExtentFlat: `name-s001.vmdk`... /
//!   `name-f001.vmdk`..., each at most 2 GiB;
//! * streamOptimized: unlike QEMU (which lays it out like monolithicSparse),
//!   vdisk writes VMware's stream layout (gdOffset = GD_AT_END, footer and
//!   end-of-stream marker), which both QEMU and VMware read.
//!
//! Geometry: 63 sectors, 16 heads for IDE and 255 otherwise, cylinders =
//! size / (63 · heads · 512) rounded down, as QEMU computes it.

use std::path::Path;
use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian};

use super::descriptor::{Access, Descriptor, ExtentLine, ExtentType, NO_PARENT_CID};
use super::header::*;
use super::{new_cid, Vmdk, VmdkOptions};
use crate::device::{BlockDevice, Format, FormatDetails, Resolver};
use crate::error::{Error, Result};
use crate::limits::VMDK_MAX_CAPACITY;
use crate::storage::{FileStorage, Storage};

/// Largest extent of the twoGbMaxExtent* subformats: 2 GiB.
pub const TWO_GB_EXTENT: u64 = 0x8000_0000;

/// The vmdk subformat (`createType`) to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Subformat {
    /// One sparse file with an embedded descriptor (QEMU's default).
    #[default]
    MonolithicSparse,
    /// A descriptor plus one preallocated-size flat file.
    MonolithicFlat,
    /// A descriptor plus sparse extents of at most 2 GiB.
    TwoGbMaxExtentSparse,
    /// A descriptor plus flat extents of at most 2 GiB.
    TwoGbMaxExtentFlat,
    /// One compressed, append-only sparse file (for export).
    StreamOptimized,
}

impl Subformat {
    /// The createType name.
    pub fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }

    /// Parses a createType name.
    pub fn from_name(s: &str) -> Result<Subformat> {
        [
            Subformat::MonolithicSparse,
            Subformat::MonolithicFlat,
            Subformat::TwoGbMaxExtentSparse,
            Subformat::TwoGbMaxExtentFlat,
            Subformat::StreamOptimized,
        ]
        .into_iter()
        .find(|f| f.name() == s)
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "unknown vmdk subformat '{s}' (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized)"
            ))
        })
    }

    fn sparse(self) -> bool {
        matches!(self, Subformat::MonolithicSparse | Subformat::TwoGbMaxExtentSparse | Subformat::StreamOptimized)
    }
}

/// Virtual disk adapter recorded in `ddb.adapterType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterType {
    /// IDE (16 heads).
    #[default]
    Ide,
    /// LSI Logic SCSI.
    LsiLogic,
    /// BusLogic SCSI.
    BusLogic,
    /// Legacy ESX.
    LegacyEsx,
}

impl AdapterType {
    /// The ddb name.
    pub fn name(self) -> &'static str {
        match self {
            AdapterType::Ide => "ide",
            AdapterType::LsiLogic => "lsilogic",
            AdapterType::BusLogic => "buslogic",
            AdapterType::LegacyEsx => "legacyESX",
        }
    }

    /// Parses a ddb / qemu-img name.
    pub fn from_name(s: &str) -> Result<AdapterType> {
        Ok(match s {
            "ide" => AdapterType::Ide,
            "lsilogic" => AdapterType::LsiLogic,
            "buslogic" => AdapterType::BusLogic,
            "legacyESX" => AdapterType::LegacyEsx,
            other => {
                return Err(Error::invalid_argument(format!(
                    "unknown adapter type '{other}' (ide, lsilogic, buslogic, legacyESX)"
                )))
            }
        })
    }

    fn heads(self) -> u64 {
        if self == AdapterType::Ide {
            16
        } else {
            255
        }
    }
}

/// Options of [`Vmdk::create`], as `qemu-img create -f vmdk -o ...` takes them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmdkCreateOptions {
    /// Subformat (`subformat=`).
    pub subformat: Subformat,
    /// Adapter type (`adapter_type=`).
    pub adapter_type: AdapterType,
    /// Virtual hardware version (`hwversion=`, digits); default "4", or "6"
    /// with `compat6`.
    pub hwversion: Option<String>,
    /// Tools version (`toolsversion=`, digits); default "2147483647".
    pub toolsversion: Option<String>,
    /// Use zeroed-grain grain table entries (`zeroed_grain=on`).
    pub zeroed_grain: bool,
    /// VMDK version 6 hardware (`compat6=on`).
    pub compat6: bool,
    /// Parent image for a delta link (`backing_file=`), a vmdk, relative to
    /// the new image's directory or absolute. Recorded as given.
    pub backing_file: Option<String>,
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::invalid_argument(format!("option {key}: '{v}' is not on or off"))),
    }
}

fn digits(key: &str, v: &str) -> Result<String> {
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid_argument(format!("option {key}: '{v}' is not a number")));
    }
    Ok(v.to_string())
}

impl VmdkCreateOptions {
    /// Parses `key=value,key=value` (qemu-img `-o` syntax). Keys:
    /// `subformat`, `adapter_type`, `hwversion`, `toolsversion`,
    /// `zeroed_grain`, `compat6`, `backing_file`, `backing_fmt` (must be
    /// `vmdk`). Unknown keys are an error.
    pub fn parse(s: &str) -> Result<VmdkCreateOptions> {
        let mut o = VmdkCreateOptions::default();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| Error::invalid_argument(format!("option '{item}' is not key=value")))?;
            match k {
                "subformat" => o.subformat = Subformat::from_name(v)?,
                "adapter_type" => o.adapter_type = AdapterType::from_name(v)?,
                "hwversion" => o.hwversion = Some(digits(k, v)?),
                "toolsversion" => o.toolsversion = Some(digits(k, v)?),
                "zeroed_grain" => o.zeroed_grain = parse_bool(k, v)?,
                "compat6" => o.compat6 = parse_bool(k, v)?,
                "backing_file" => o.backing_file = Some(v.to_string()),
                "backing_fmt" => {
                    if v != "vmdk" {
                        return Err(Error::invalid_argument(format!(
                            "backing_fmt '{v}': a vmdk delta link's parent must be vmdk"
                        )));
                    }
                }
                other => {
                    return Err(Error::invalid_argument(format!(
                        "unknown vmdk option '{other}' (subformat, adapter_type, hwversion, toolsversion, zeroed_grain, compat6, backing_file, backing_fmt)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// Writes an empty hosted sparse extent of `capacity` sectors, as QEMU's
/// `vmdk_init_extent` lays it out (or VMware's stream layout).
pub(crate) fn init_sparse(file: &dyn Storage, capacity: u64, stream: bool, zeroed: bool) -> Result<SparseHeader> {
    let mut h = SparseHeader {
        version: if stream {
            3
        } else if zeroed {
            2
        } else {
            1
        },
        flags: FLAG_NL_DETECT
            | if stream { FLAG_COMPRESSED | FLAG_MARKERS } else { FLAG_RGD }
            | if zeroed { FLAG_ZERO_GRAIN } else { 0 },
        capacity,
        grain_size: 128,
        descriptor_offset: 1,
        descriptor_size: 20,
        num_gtes_per_gt: 512,
        rgd_offset: 0,
        gd_offset: 0,
        overhead: 0,
        unclean_shutdown: 0,
        nl_bytes: NL_BYTES,
        compress_algorithm: if stream { COMPRESSION_DEFLATE } else { COMPRESSION_NONE },
    };
    let geo = h.geometry();
    let gds = geo.gd_sectors();
    let gts = geo.gt_sectors();
    let gt_count = geo.gd_entries();
    if stream {
        h.gd_offset = GD_AT_END;
        h.overhead = 128;
        file.set_len(0)?;
        file.write_at(&h.encode(), 0)?;
        // Initial tail: GD marker, empty GD, footer marker, footer, EOS.
        let mut pos = h.overhead * SECTOR;
        file.write_at(&encode_metadata_marker(gds, MARKER_GD), pos)?;
        pos += SECTOR;
        let mut footer = h;
        footer.gd_offset = pos / SECTOR;
        pos += gds * SECTOR;
        file.write_at(&encode_metadata_marker(1, MARKER_FOOTER), pos)?;
        file.write_at(&footer.encode(), pos + SECTOR)?;
        file.set_len(pos + 3 * SECTOR)?;
        return Ok(h);
    }
    h.rgd_offset = 1 + 20;
    h.gd_offset = h.rgd_offset + gds + gts * gt_count;
    h.overhead = (h.gd_offset + gds + gts * gt_count).div_ceil(128) * 128;
    file.set_len(0)?;
    file.write_at(&h.encode(), 0)?;
    file.set_len(h.overhead * SECTOR)?;
    for base in [h.rgd_offset, h.gd_offset] {
        let mut gd = vec![0u8; (gds * SECTOR) as usize];
        for (i, c) in gd.chunks_exact_mut(4).take(gt_count as usize).enumerate() {
            let sector =
                u32::try_from(base + gds + i as u64 * gts).map_err(|_| Error::limit("grain tables beyond 2 TiB"))?;
            LittleEndian::write_u32(c, sector);
        }
        file.write_at(&gd, base * SECTOR)?;
    }
    Ok(h)
}

impl Vmdk {
    /// Creates a vmdk image at `path` (the descriptor, or the only file) of
    /// `size` bytes (rounded up to 512; 0 with a backing file takes the
    /// parent's size), replacing existing files, and opens it read-write.
    pub fn create(path: &Path, size: u64, opts: &VmdkCreateOptions) -> Result<Vmdk> {
        create_inner(path, size, opts, None).map_err(|e| e.with_format("vmdk").with_path(path))
    }

    /// [`create`](Self::create) for an image with a parent
    /// (`opts.backing_file`): `resolver` opens it (as
    /// [`crate::OpenOptions`] does under the caller's policy); the format
    /// never opens files by path itself.
    pub fn create_with(path: &Path, size: u64, opts: &VmdkCreateOptions, resolver: &dyn Resolver) -> Result<Vmdk> {
        create_inner(path, size, opts, Some(resolver)).map_err(|e| e.with_format("vmdk").with_path(path))
    }
}

fn create_inner(path: &Path, size: u64, opts: &VmdkCreateOptions, resolver: Option<&dyn Resolver>) -> Result<Vmdk> {
    if opts.compat6 && opts.hwversion.is_some() {
        return Err(Error::invalid_argument("compat6 cannot be enabled with hwversion set"));
    }
    for (k, v) in [("hwversion", &opts.hwversion), ("toolsversion", &opts.toolsversion)] {
        if let Some(v) = v {
            digits(k, v)?;
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let (parent, parent_cid) = match &opts.backing_file {
        Some(b) => {
            if b.is_empty() || b.contains(['"', '\n', '\r', '\0']) {
                return Err(Error::invalid_argument(format!(
                    "backing file name '{b}' is empty or contains a quote or line break"
                )));
            }
            let resolver = resolver.ok_or_else(|| {
                Error::invalid_argument(format!(
                    "backing file '{b}': creating with a parent needs a resolver (Vmdk::create_with, OpenOptions::create_vmdk)"
                ))
            })?;
            let dev = resolver.open_backing(dir, b, Some(Format::Vmdk))?;
            let cid = match dev.info().details {
                FormatDetails::Vmdk(v) => v.cid,
                _ => return Err(Error::invalid_argument("backing file must be vmdk")),
            };
            (Some(dev), cid)
        }
        None => (None, NO_PARENT_CID),
    };
    let size = match (size, &parent) {
        (0, Some(p)) => p.size(),
        _ => size,
    };
    let size =
        size.checked_add(511).map(|s| s & !511).filter(|&s| s > 0 && s <= VMDK_MAX_CAPACITY).ok_or_else(|| {
            Error::invalid_argument(format!("size {size} is not between 512 bytes and {VMDK_MAX_CAPACITY} bytes"))
        })?;
    let sub = opts.subformat;
    let base = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .ok_or_else(|| Error::invalid_argument("the image path has no file name"))?;
    if base.contains(['"', '\n', '\r']) {
        return Err(Error::invalid_argument("the image file name contains a quote or line break"));
    }
    let (prefix, postfix) = match base.rfind('.') {
        Some(i) => (&base[..i], &base[i..]),
        None => (base.as_str(), ""),
    };
    let mut desc = Descriptor::new(new_cid(0), parent_cid, sub.name(), opts.backing_file.as_deref());
    let monolithic_sparse = matches!(sub, Subformat::MonolithicSparse | Subformat::StreamOptimized);
    if monolithic_sparse {
        let f = FileStorage::create(path)?;
        init_sparse(&f, size / SECTOR, sub == Subformat::StreamOptimized, opts.zeroed_grain)?;
        desc.extents.push(line(size / SECTOR, ExtentType::Sparse, &base));
    } else {
        let split = matches!(sub, Subformat::TwoGbMaxExtentSparse | Subformat::TwoGbMaxExtentFlat);
        let mut done = 0u64;
        let mut idx = 1u32;
        while done < size {
            let n = if split { (size - done).min(TWO_GB_EXTENT) } else { size };
            let name = match (split, sub.sparse()) {
                (false, _) => format!("{prefix}-flat{postfix}"),
                (true, true) => format!("{prefix}-s{idx:03}{postfix}"),
                (true, false) => format!("{prefix}-f{idx:03}{postfix}"),
            };
            let f = FileStorage::create(dir.join(&name))?;
            if sub.sparse() {
                init_sparse(&f, n / SECTOR, false, opts.zeroed_grain)?;
                desc.extents.push(line(n / SECTOR, ExtentType::Sparse, &name));
            } else {
                f.set_len(n)?;
                desc.extents.push(line(n / SECTOR, ExtentType::Flat, &name));
            }
            f.sync()?;
            done += n;
            idx += 1;
        }
    }
    let hw = match (&opts.hwversion, opts.compat6) {
        (Some(v), _) => v.clone(),
        (None, true) => "6".to_string(),
        (None, false) => "4".to_string(),
    };
    let heads = opts.adapter_type.heads();
    let cylinders = size / (63 * heads * SECTOR);
    let tools = opts.toolsversion.clone().unwrap_or_else(|| "2147483647".to_string());
    for (k, v) in [
        ("ddb.virtualHWVersion", hw),
        ("ddb.geometry.cylinders", cylinders.to_string()),
        ("ddb.geometry.heads", heads.to_string()),
        ("ddb.geometry.sectors", "63".to_string()),
        ("ddb.adapterType", opts.adapter_type.name().to_string()),
        ("ddb.toolsVersion", tools),
    ] {
        desc.ddb.push((k.to_string(), v));
    }
    let text = desc.encode();
    if monolithic_sparse {
        let f = FileStorage::open(path, false)?;
        if text.len() as u64 >= 20 * SECTOR {
            return Err(Error::invalid_argument(
                "the descriptor does not fit in the 20 embedded sectors (backing file name too long?)",
            ));
        }
        f.write_at(text.as_bytes(), SECTOR)?;
        f.sync()?;
    } else {
        let f = FileStorage::create(path)?;
        f.write_at(text.as_bytes(), 0)?;
        f.sync()?;
    }
    // The new image stays locked as a writer while it is open (crate::storage::lock).
    let lock = crate::storage::lock::LockMode::Auto;
    let file: Arc<dyn Storage> = Arc::new(FileStorage::open_locked(path, false, lock)?);
    let opener = |p: &Path, ro: bool| -> Result<Arc<dyn Storage>> {
        let mut st = FileStorage::open(p, ro)?;
        st.lock_as(lock, crate::storage::lock::Access::ReadOnly)?;
        Ok(Arc::new(st))
    };
    Vmdk::open_with(file, VmdkOptions { parent, ..Default::default() }, &opener)
}

fn line(sectors: u64, kind: ExtentType, name: &str) -> ExtentLine {
    ExtentLine { access: Access::ReadWrite, sectors, kind, file: Some(name.to_string()), offset: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_options() {
        let o = VmdkCreateOptions::parse(
            "subformat=twoGbMaxExtentFlat,adapter_type=lsilogic,zeroed_grain=on,compat6=on,backing_file=p.vmdk,backing_fmt=vmdk",
        )
        .unwrap();
        assert_eq!(o.subformat, Subformat::TwoGbMaxExtentFlat);
        assert_eq!(o.adapter_type, AdapterType::LsiLogic);
        assert!(o.zeroed_grain && o.compat6);
        assert_eq!(o.backing_file.as_deref(), Some("p.vmdk"));
        for bad in [
            "bogus=1",
            "subformat=vmfs",
            "zeroed_grain=maybe",
            "adapter_type=scsi",
            "hwversion=4\"",
            "backing_fmt=qcow2",
            "novalue",
        ] {
            let e = VmdkCreateOptions::parse(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
        }
        assert_eq!(VmdkCreateOptions::parse("").unwrap(), VmdkCreateOptions::default());
    }

    #[test]
    fn qemu_layout_for_2gib_extent() {
        let m = crate::storage::MemStorage::new();
        let h = init_sparse(&m, 4 << 20, false, true).unwrap();
        assert_eq!((h.version, h.flags), (2, 7));
        assert_eq!((h.rgd_offset, h.gd_offset, h.overhead), (21, 278, 640));
        assert_eq!(m.len().unwrap(), 640 * 512);
        let b = m.to_vec();
        assert_eq!(LittleEndian::read_u32(&b[21 * 512..]), 22);
        assert_eq!(LittleEndian::read_u32(&b[278 * 512 + 4..]), 283);
    }
}
