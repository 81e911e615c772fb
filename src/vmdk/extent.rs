//! The extents of an open image: opening each extent line of a descriptor
//! (resolving and confining its file name) and the embedded descriptor of
//! a hosted sparse extent.

use std::path::{Path, PathBuf};

use super::descriptor::{self, Access, Descriptor, ExtentLine, ExtentType, NO_PARENT_CID};
use super::flat::FlatExtent;
use super::header::{SparseHeader, SECTOR};
use super::sparse::SparseExtent;
use super::{new_cid, ExtentOpener, VmdkOptions};
use crate::error::{Error, Result};
use crate::limits::VMDK_MAX_DESCRIPTOR;
use crate::storage::Storage;

/// An open extent of any type.
#[derive(Debug)]
pub(crate) enum Backend {
    /// A hosted sparse extent.
    Sparse(Box<SparseExtent>),
    /// A flat (or VMFS) extent.
    Flat(FlatExtent),
    /// A ZERO extent.
    Zero,
    /// A NOACCESS extent (never opened).
    NoAccess,
}

/// One extent of the image and where it sits in the guest disk.
#[derive(Debug)]
pub(crate) struct VExtent {
    /// Guest byte offset of the first byte.
    pub(crate) start: u64,
    /// Guest bytes covered.
    pub(crate) len: u64,
    /// Access mode.
    pub(crate) access: Access,
    /// Extent type.
    pub(crate) kind: ExtentType,
    /// File name as written in the descriptor.
    pub(crate) file: String,
    /// The open extent.
    pub(crate) backend: Backend,
}

/// An embedded descriptor (if the area holds one) and its area (offset, size).
pub(crate) type Embedded = (Option<Descriptor>, Option<(u64, u64)>);

/// Reads the embedded descriptor area of a sparse extent.
pub(crate) fn read_embedded(file: &dyn Storage, h: &SparseHeader) -> Result<Embedded> {
    if h.descriptor_offset == 0 || h.descriptor_size == 0 {
        return Ok((None, None));
    }
    let size = h.descriptor_size.checked_mul(SECTOR).filter(|&s| s <= VMDK_MAX_DESCRIPTOR).ok_or_else(|| {
        Error::limit(format!(
            "embedded descriptor of {} sectors is larger than the {VMDK_MAX_DESCRIPTOR}-byte limit",
            h.descriptor_size
        ))
        .with_field("descriptorSize")
    })?;
    let off = h
        .descriptor_offset
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::invalid("descriptor offset overflows").with_field("descriptorOffset"))?;
    let flen = file.len()?;
    if off.checked_add(size).is_none_or(|e| e > flen) {
        return Err(Error::invalid(format!(
            "embedded descriptor at byte {off:#x} ({size} bytes) runs past the end of the file ({flen} bytes)"
        ))
        .with_field("descriptorOffset"));
    }
    let mut buf = vec![0u8; size as usize];
    file.read_at(&mut buf, off)?;
    if buf.iter().all(|&b| b == 0) {
        return Ok((None, Some((off, size))));
    }
    Ok((Some(Descriptor::parse(&buf)?), Some((off, size))))
}

/// The descriptor of a sparse extent that has none.
pub(crate) fn synthesized(h: &SparseHeader, name: &str) -> Descriptor {
    let ty = if h.compressed() { "streamOptimized" } else { "monolithicSparse" };
    let mut d = Descriptor::new(new_cid(0), NO_PARENT_CID, ty, None);
    d.extents.push(ExtentLine {
        access: Access::ReadWrite,
        sectors: h.capacity.max(1),
        kind: ExtentType::Sparse,
        file: Some(name.to_string()),
        offset: 0,
    });
    d
}

/// The file name of a storage, for messages and synthesized descriptors.
pub(crate) fn file_name(file: &dyn Storage) -> String {
    file.path().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Opens the extents of a stand-alone descriptor, in order.
pub(crate) fn open_extents(
    d: &Descriptor,
    desc_file: &dyn Storage,
    path: Option<&Path>,
    read_only: bool,
    opts: &VmdkOptions,
    cache: usize,
    opener: ExtentOpener<'_>,
) -> Result<Vec<VExtent>> {
    if d.create_type().is_none() {
        return Err(Error::invalid("descriptor has no createType").with_field("createType"));
    }
    if d.extents.is_empty() {
        return Err(Error::invalid("descriptor has no extents"));
    }
    let dir = path.and_then(Path::parent).map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut out = Vec::with_capacity(d.extents.len());
    let mut start = 0u64;
    for (i, e) in d.extents.iter().enumerate() {
        // Sizes were bounded by the parser (sum ≤ VMDK_MAX_CAPACITY).
        let len = e.sectors * SECTOR;
        let name = e.file.clone().unwrap_or_default();
        let ro = read_only || e.access != Access::ReadWrite;
        let ctx = |err: Error| err.context(format!("extent {} ('{name}')", i + 1));
        let backend = match (e.access, e.kind) {
            (Access::NoAccess, _) => Backend::NoAccess,
            (_, ExtentType::Zero) => Backend::Zero,
            (_, ExtentType::VmfsRdm | ExtentType::VmfsRaw) => {
                return Err(ctx(Error::unsupported(format!(
                    "{} extents (raw device maps) are not supported",
                    e.kind.keyword()
                ))))
            }
            (_, ExtentType::SeSparse) => return Err(ctx(Error::unsupported("seSparse extents are not supported"))),
            (_, ExtentType::Flat | ExtentType::Vmfs) => {
                let p = descriptor::resolve_extent(&dir, &name, opts.allow_external_extents).map_err(ctx)?;
                let f = opener(&p, ro).map_err(ctx)?;
                not_self(desc_file, &*f).map_err(ctx)?;
                let off = e.offset * SECTOR;
                Backend::Flat(FlatExtent::new(f, off, len).map_err(ctx)?)
            }
            (_, ExtentType::Sparse | ExtentType::VmfsSparse) => {
                let p = descriptor::resolve_extent(&dir, &name, opts.allow_external_extents).map_err(ctx)?;
                let f = opener(&p, ro).map_err(ctx)?;
                not_self(desc_file, &*f).map_err(ctx)?;
                let fpath = f.path().map(Path::to_path_buf);
                let sp = SparseExtent::open(f, ro, Some(len), cache).map_err(|err| {
                    let err = ctx(err);
                    match &fpath {
                        Some(p) => err.with_path(p),
                        None => err,
                    }
                })?;
                Backend::Sparse(Box::new(sp))
            }
        };
        out.push(VExtent { start, len, access: e.access, kind: e.kind, file: name, backend });
        start += len;
    }
    // After the extents, so that an extent vdisk refuses by name (seSparse,
    // COWD, raw device maps) is reported as such whatever createType says.
    d.check_standalone_create_type()?;
    Ok(out)
}

/// Refuses an extent that is the descriptor file itself: writes to it
/// would overwrite the descriptor.
fn not_self(desc: &dyn Storage, ext: &dyn Storage) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |s: &dyn Storage| s.file().and_then(|f| f.metadata().ok()).map(|m| (m.dev(), m.ino()));
    match (id(desc), id(ext)) {
        (Some(a), Some(b)) if a == b => Err(Error::invalid("the extent is the descriptor file itself")),
        _ => Ok(()),
    }
}
