//! VHDX, Hyper-V's virtual disk format (Microsoft "VHDX Format
//! Specification" v1.0; QEMU `block/vhdx*.c` for what QEMU reads and
//! writes).
//!
//! Read and write: dynamic, fixed and differencing images, block sizes from
//! 1 to 256 MiB, 512-byte and 4 KiB logical sectors, payload blocks in every
//! state (partially present blocks of differencing images through their
//! sector bitmaps).
//!
//! The log: an image whose log holds an active sequence is replayed before
//! use when opened read-write (as QEMU does); opened read-only, the log is
//! applied in memory and the file is left alone (QEMU refuses such an open).
//! Every BAT update vdisk makes goes through the log first (entry written
//! and synced, then the BAT sector written in place), so a crash leaves the
//! BAT as it was or as it was meant to become; [`BlockDevice::flush`] syncs
//! and empties the log (the headers' log GUID is cleared), so a flushed or
//! closed image opens anywhere without a replay.
//!
//! Writes into a block that is not fully present allocate a new block at
//! the end of the file (1 MiB-aligned), write it whole (a differencing image
//! copies the rest from its parent), sync, then log the BAT entry. Data I/O
//! to fully present blocks takes no lock; allocations are serialised by the
//! state mutex, which is taken before the BAT lock (lock order: `state`,
//! then `bat`).
//!
//! ```
//! use vdisk::{BlockDevice, Vhdx, VhdxCreateOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let opts = VhdxCreateOptions::parse("subformat=dynamic,block_size=1M")?;
//! let disk = Vhdx::create(&dir.path().join("disk.vhdx"), 64 << 20, &opts)?;
//! disk.write_at(b"hyper-v", 5 << 20)?;
//! disk.flush()?;
//! let mut buf = [0u8; 7];
//! disk.read_at(&mut buf, 5 << 20)?;
//! assert_eq!(&buf, b"hyper-v");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod check;
pub mod create;
pub mod format;
pub mod log;
mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::device::{check_request, BlockDevice, DeviceInfo, Extent, ExtentKind, Format, FormatDetails, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::VHDX_MAX_BAT_BYTES;
use crate::storage::Storage;

pub use check::VhdxCheckReport;
pub use create::{VhdxCreateOptions, VhdxSubformat};
use format::*;
use log::{LogWriter, Overlay, SECTOR};

/// How to open a VHDX image.
#[derive(Debug, Clone, Default)]
pub struct VhdxOptions {
    /// Refuse writes (a log needing replay is applied in memory).
    pub read_only: bool,
    /// The opened parent of a differencing image. When the image has a
    /// parent and this is `None`, reads that fall through to it fail.
    pub parent: Option<Arc<dyn BlockDevice>>,
    /// Open for `check`: BAT entries pointing outside the file or into
    /// metadata are counted by [`Vhdx::check`] instead of failing the open.
    pub for_check: bool,
}

/// VHDX facts for `info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VhdxDetails {
    /// Payload block size.
    pub block_size: u32,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector_size: u32,
    /// Fixed (blocks left allocated), dynamic or differencing.
    pub subformat: &'static str,
    /// Log length in bytes.
    pub log_size: u32,
    /// The data write GUID (a child's parent_linkage names it).
    pub data_write_guid: String,
    /// The SCSI page 83 identifier.
    pub page83: String,
    /// Parent locator entries of a differencing image.
    pub parent_locator: Vec<(String, String)>,
    /// A log was replayed (or applied in memory) when the image was opened.
    pub log_replayed: bool,
}

#[derive(Debug)]
struct State {
    /// Index (0 or 1) of the current header and its contents.
    cur: usize,
    header: Header,
    /// The headers carry this session's FileWriteGuid and a new DataWriteGuid.
    session: bool,
    /// The headers carry a log GUID and entries may be pending.
    log: Option<LogWriter>,
    /// Entries written since the last sync of the file (0: none pending),
    /// and the log bytes they take.
    pending_bytes: u64,
    tail: u64,
    /// BAT sectors written in place and not yet synced.
    unsynced: bool,
    /// Where the next block goes (1 MiB-aligned end of the file).
    end: u64,
}

/// An open VHDX image.
#[derive(Debug)]
#[must_use = "call flush() to make writes durable"]
pub struct Vhdx {
    file: Arc<dyn Storage>,
    view: Arc<dyn Storage>,
    path: Option<PathBuf>,
    read_only: bool,
    geo: Geometry,
    bat_offset: u64,
    bat: RwLock<Vec<u64>>,
    state: Mutex<State>,
    session: AtomicBool,
    parent: Option<Arc<dyn BlockDevice>>,
    locator: Option<ParentLocator>,
    page83: Guid,
    leave_allocated: bool,
    log_replayed: bool,
    /// Metadata ranges a payload block may not overlap: header area, log,
    /// every region.
    reserved: Vec<(u64, u64)>,
    /// BAT problems found at open for `check` (index, message).
    bat_errors: Vec<String>,
    session_guid: Guid,
}

fn verr(e: Error, path: Option<&Path>) -> Error {
    let e = e.with_format("vhdx");
    match path {
        Some(p) => e.with_path(p),
        None => e,
    }
}

/// What `open.rs` needs before opening: the parent a differencing image
/// names, read without replaying anything.
#[derive(Debug, Clone, Default)]
pub struct VhdxParentHint {
    /// Parent locator entries.
    pub locator: ParentLocator,
}

impl VhdxParentHint {
    /// The parent's path relative to the child's directory, with `/`
    /// separators (from `relative_path`, else `absolute_win32_path`).
    pub fn path(&self) -> Option<String> {
        let raw = self.locator.get("relative_path").or_else(|| self.locator.get("absolute_win32_path"))?;
        let p = raw.replace('\\', "/");
        Some(p.strip_prefix("./").map(str::to_string).unwrap_or(p))
    }
}

/// Everything read from the metadata region.
struct Meta {
    geo: Geometry,
    leave_allocated: bool,
    page83: Guid,
    locator: Option<ParentLocator>,
}

fn read_meta(view: &dyn Storage, rt: &RegionTable) -> Result<Meta> {
    let base = rt.metadata.offset;
    let flen = view.len()?;
    let mut table = vec![0u8; TABLE_SIZE];
    view.read_at(&mut table, base)?;
    let entries = decode_metadata_table(&table, rt.metadata.length)?;
    let item = |g: Guid, min: u32| -> Result<Option<Vec<u8>>> {
        let Some(e) = entries.iter().find(|e| e.guid == g) else { return Ok(None) };
        if e.length < min {
            return Err(Error::invalid(format!("VHDX metadata item {g} has {} bytes, fewer than {min}", e.length))
                .with_field("Length"));
        }
        // Items are at most 1 MiB (the spec's bound) and lie in the file:
        // a hostile length allocates nothing it does not hold.
        let at = base + u64::from(e.offset);
        if e.length > 1 << 20 || at.checked_add(u64::from(e.length)).is_none_or(|end| end > flen) {
            return Err(Error::invalid(format!(
                "VHDX metadata item {g} of {} bytes at {at:#x} is over 1 MiB or past the end of the file ({flen} bytes)",
                e.length
            ))
            .with_field("Length")
            .with_offset(at));
        }
        let mut b = vec![0u8; e.length as usize];
        view.read_at(&mut b, at)?;
        Ok(Some(b))
    };
    for e in &entries {
        let known = [
            FILE_PARAMS_GUID,
            DISK_SIZE_GUID,
            PAGE83_GUID,
            LOGICAL_SECTOR_GUID,
            PHYSICAL_SECTOR_GUID,
            PARENT_LOCATOR_GUID,
        ];
        if !known.contains(&e.guid) && e.flags & 4 != 0 {
            return Err(Error::unsupported(format!("VHDX metadata item {} is required and unknown", e.guid)));
        }
    }
    let missing = |what: &str| Error::invalid(format!("VHDX metadata lacks the {what} item")).with_field("ItemId");
    let params = item(FILE_PARAMS_GUID, 8)?.ok_or_else(|| missing("file parameters"))?;
    let size = item(DISK_SIZE_GUID, 8)?.ok_or_else(|| missing("virtual disk size"))?;
    let page83 = item(PAGE83_GUID, 16)?.ok_or_else(|| missing("page 83 data"))?;
    let logical = item(LOGICAL_SECTOR_GUID, 4)?.ok_or_else(|| missing("logical sector size"))?;
    let physical = item(PHYSICAL_SECTOR_GUID, 4)?.ok_or_else(|| missing("physical sector size"))?;
    let bits = le32(&params, 4);
    let has_parent = bits & 2 != 0;
    let logical = le32(&logical, 0);
    let size = le64(&size, 0);
    let size = size - size % u64::from(logical.max(1));
    let geo = Geometry::new(size, le32(&params, 0), logical, le32(&physical, 0), has_parent)?;
    let locator = match (has_parent, item(PARENT_LOCATOR_GUID, 20)?) {
        (true, Some(b)) => Some(ParentLocator::decode(&b)?),
        (true, None) => {
            return Err(Error::invalid("VHDX differencing image (HasParent) without a parent locator")
                .with_field("ParentLocator"))
        }
        (false, _) => None,
    };
    let mut p = [0u8; 16];
    p.copy_from_slice(&page83[..16]);
    Ok(Meta { geo, leave_allocated: bits & 1 != 0, page83: Guid(p), locator })
}

fn read_headers(file: &dyn Storage) -> Result<(usize, Header)> {
    let mut sig = [0u8; 8];
    file.read_at(&mut sig, 0)?;
    if &sig != FILE_SIGNATURE {
        return Err(Error::invalid("not a VHDX image: the file does not start with 'vhdxfile'").with_field("Signature"));
    }
    let mut b = vec![0u8; HEADER_SIZE];
    file.read_at(&mut b, HEADER_OFFSETS[0])?;
    let h1 = Header::decode(&b);
    file.read_at(&mut b, HEADER_OFFSETS[1])?;
    let h2 = Header::decode(&b);
    current_header(h1, h2)
}

/// The log's place must be valid even when it is empty, as QEMU requires:
/// 1 MiB-aligned, past the header area, its end representable.
fn check_log_place(h: &Header) -> Result<()> {
    if h.log_offset < MIB
        || !h.log_offset.is_multiple_of(MIB)
        || h.log_offset.checked_add(u64::from(h.log_length)).is_none()
    {
        return Err(Error::invalid(format!(
            "VHDX log offset {} is not 1 MiB-aligned past the header area",
            h.log_offset
        ))
        .with_field("LogOffset"));
    }
    Ok(())
}

/// The host offset of byte `inb` of the block a BAT entry points at.
fn host(e: u64, inb: u64) -> Result<u64> {
    (e & BAT_OFFSET_MASK)
        .checked_add(inb)
        .ok_or_else(|| Error::corrupt(format!("VHDX BAT entry {e:#x} points past any file")).with_field("BAT"))
}

fn read_regions(view: &dyn Storage) -> Result<RegionTable> {
    let mut b = vec![0u8; TABLE_SIZE];
    view.read_at(&mut b, REGION_OFFSETS[0])?;
    match RegionTable::decode(&b) {
        Ok(t) => Ok(t),
        Err(first) => {
            view.read_at(&mut b, REGION_OFFSETS[1])?;
            RegionTable::decode(&b).map_err(|_| first)
        }
    }
}

impl Vhdx {
    /// Reads the parent locator of the image in `file` (no log replay;
    /// `None` for images without a parent). `open.rs` uses it to open the
    /// parent before the image.
    pub fn read_parent_hint(file: &Arc<dyn Storage>) -> Result<Option<VhdxParentHint>> {
        let inner = || -> Result<Option<VhdxParentHint>> {
            let (_, h) = read_headers(&**file)?;
            let flen = file.len()?;
            let view: Arc<dyn Storage> = match log::find(&**file, &h, flen)? {
                Some(r) => Arc::new(Overlay::new(file.clone(), r)?),
                None => file.clone(),
            };
            let rt = read_regions(&*view)?;
            let m = read_meta(&*view, &rt)?;
            Ok(m.locator.map(|locator| VhdxParentHint { locator }))
        };
        inner().map_err(|e| verr(e, file.path()))
    }

    /// Opens the image in `file`.
    pub fn open(file: Arc<dyn Storage>, opts: VhdxOptions) -> Result<Vhdx> {
        let path = file.path().map(Path::to_path_buf);
        Self::open_inner(file, opts).map_err(|e| verr(e, path.as_deref()))
    }

    fn open_inner(file: Arc<dyn Storage>, opts: VhdxOptions) -> Result<Vhdx> {
        let read_only = opts.read_only || file.is_read_only();
        let path = file.path().map(Path::to_path_buf);
        let (mut cur, mut header) = read_headers(&*file)?;
        check_log_place(&header)?;
        let flen = file.len()?;
        let replay = log::find(&*file, &header, flen)?;
        let log_replayed = replay.is_some();
        let session_guid = Guid::random();
        let mut session = false;
        let view: Arc<dyn Storage> = match replay {
            Some(r) if read_only => Arc::new(Overlay::new(file.clone(), r)?),
            Some(r) => {
                log::apply(&*file, &r)?;
                // The log is applied: empty it (this is a write session).
                for _ in 0..2 {
                    let mut h = header.clone();
                    h.sequence = h.sequence.wrapping_add(1);
                    h.file_write_guid = session_guid;
                    h.log_guid = Guid::default();
                    let slot = 1 - cur;
                    file.write_at(&h.encode(), HEADER_OFFSETS[slot])?;
                    file.sync()?;
                    cur = slot;
                    header = h;
                }
                session = true;
                file.clone()
            }
            None => file.clone(),
        };
        let flen = view.len()?;
        let rt = read_regions(&*view)?;
        let meta = read_meta(&*view, &rt)?;
        let geo = meta.geo;
        let bat_bytes = geo.bat_entries * 8;
        if bat_bytes > u64::from(rt.bat.length) {
            return Err(Error::invalid(format!(
                "VHDX BAT region of {} bytes cannot hold {} entries",
                rt.bat.length, geo.bat_entries
            ))
            .with_field("BAT"));
        }
        if bat_bytes > VHDX_MAX_BAT_BYTES {
            return Err(
                Error::limit(format!("VHDX BAT of {bat_bytes} bytes is larger than the limit")).with_field("BAT")
            );
        }
        let sectors_bytes = bat_bytes.next_multiple_of(SECTOR);
        if bat_bytes > 0 && rt.bat.offset + bat_bytes > flen {
            return Err(Error::invalid(format!(
                "VHDX BAT at {} ({bat_bytes} bytes) runs past the end of the {flen}-byte file",
                rt.bat.offset
            ))
            .with_field("BAT"));
        }
        let mut raw = vec![0u8; sectors_bytes as usize];
        view.read_at(&mut raw, rt.bat.offset)?;
        let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let mut reserved = vec![(0, MIB)];
        if header.log_length > 0 {
            reserved.push((header.log_offset, u64::from(header.log_length)));
        }
        for r in &rt.all {
            reserved.push((r.offset, u64::from(r.length)));
        }
        // New blocks go past the file and every metadata range (a log or
        // region a hostile header puts past the end of the file must not
        // be allocated over).
        let end = reserved
            .iter()
            .map(|(o, l)| o.saturating_add(*l))
            .fold(flen, u64::max)
            .checked_next_multiple_of(MIB)
            .ok_or_else(|| Error::invalid("VHDX metadata reaches the end of the address space").with_field("log"))?;
        let mut v = Vhdx {
            state: Mutex::new(State {
                cur,
                header,
                session,
                log: None,
                pending_bytes: 0,
                tail: 0,
                unsynced: false,
                end,
            }),
            session: AtomicBool::new(session),
            file,
            view,
            path,
            read_only,
            geo,
            bat_offset: rt.bat.offset,
            bat: RwLock::new(bat),
            parent: opts.parent,
            locator: meta.locator,
            page83: meta.page83,
            leave_allocated: meta.leave_allocated,
            log_replayed,
            reserved,
            bat_errors: Vec::new(),
            session_guid,
        };
        let errors = v.scan_bat(flen);
        if !errors.is_empty() && !opts.for_check {
            v.read_only = true; // nothing to flush on the way out
            return Err(Error::corrupt(errors[0].clone()).with_field("BAT"));
        }
        if let (Some(p), Some(loc)) = (&v.parent, &v.locator) {
            if let FormatDetails::Vhdx(d) = p.info().details {
                let link = loc.get("parent_linkage").and_then(Guid::parse);
                let link2 = loc.get("parent_linkage2").and_then(Guid::parse);
                let actual = Guid::parse(&d.data_write_guid);
                if link.is_some() && actual.is_some() && actual != link && actual != link2 {
                    return Err(Error::invalid(format!(
                        "the parent's DataWriteGuid {} is not the parent_linkage {} this image records: the parent changed",
                        d.data_write_guid,
                        loc.get("parent_linkage").unwrap_or("")
                    ))
                    .with_field("parent_linkage"));
                }
            }
        }
        v.bat_errors = errors;
        Ok(v)
    }

    /// BAT entries that point past the end of the file or into metadata.
    /// The last block only needs the part the virtual size covers inside
    /// the file (QEMU sizes fixed images that way).
    fn scan_bat(&self, flen: u64) -> Vec<String> {
        let bat = self.bat.read();
        let mut out = Vec::new();
        let bs = u64::from(self.geo.block_size);
        let mut spans = Vec::new();
        for (i, &e) in bat.iter().take(self.geo.bat_entries as usize).enumerate() {
            let i = i as u64;
            let st = e & 7;
            let (present, len) = if self.geo.is_bitmap_index(i) {
                (st == state::SB_PRESENT, MIB)
            } else {
                let block = i - i / (self.geo.chunk_ratio + 1);
                let len = bs.min(self.geo.size.saturating_sub(block * bs)).max(1);
                (st == state::FULLY_PRESENT || st == state::PARTIALLY_PRESENT, len)
            };
            if !present {
                continue;
            }
            let off = e & BAT_OFFSET_MASK;
            if off.checked_add(len).is_none_or(|end| end > flen) {
                out.push(format!(
                    "BAT entry {i} points at {off}, past the end of the {flen}-byte file (the image was probably truncated)"
                ));
            } else if let Some((s, l)) = self.reserved.iter().find(|(s, l)| off < s + l && *s < off + len) {
                out.push(format!("BAT entry {i} at {off} overlaps metadata at {s}..{}", s + l));
            } else {
                spans.push((off, len, i as usize));
            }
        }
        for (i, a, j, b) in crate::overlap::overlaps(&mut spans, 16) {
            out.push(format!(
                "BAT entries {i} and {j} put blocks at overlapping places ({a} and {b}): a write to one would change the other"
            ));
        }
        out
    }

    /// Geometry (sizes and BAT shape).
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Whether a log was replayed (read-write) or applied in memory
    /// (read-only) when the image was opened.
    pub fn log_replayed(&self) -> bool {
        self.log_replayed
    }

    /// Host bytes allocated by the file.
    pub fn allocated_bytes(&self) -> Option<u64> {
        self.file.allocated_bytes()
    }

    /// The image file.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// Flushes and closes.
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    fn err(&self, e: Error) -> Error {
        verr(e, self.path.as_deref())
    }

    fn subformat(&self) -> &'static str {
        if self.geo.has_parent {
            "differencing"
        } else if self.leave_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }

    /// The BAT entry of payload block `block` (callers stay below the
    /// virtual size, so it exists; "not present" otherwise).
    fn entry(&self, block: u64) -> u64 {
        self.bat.read().get(self.geo.payload_index(block) as usize).copied().unwrap_or(0)
    }

    /// Reads guest bytes of the parent (zeros past its end).
    fn read_parent(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        match &self.parent {
            Some(p) => {
                let psize = p.size();
                let n = if guest >= psize { 0 } else { (psize - guest).min(buf.len() as u64) as usize };
                if n > 0 {
                    p.read_at(&mut buf[..n], guest)?;
                }
                buf[n..].fill(0);
                Ok(())
            }
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "guest offset {guest:#x} falls through to the parent '{}', which was not opened",
                    self.locator.as_ref().and_then(|l| l.get("relative_path")).unwrap_or("?")
                ),
            )
            .with_offset(guest)),
        }
    }

    /// For a partially present block: whether logical sector `sector` (of
    /// the block) is present, and how many following sectors share that.
    fn bitmap_run(&self, block: u64, sector: u64, max: u64) -> Result<(bool, u64)> {
        let sb = self.bat.read().get(self.geo.bitmap_index(block) as usize).copied().unwrap_or(0);
        if sb & 7 != state::SB_PRESENT {
            return Err(Error::corrupt(format!(
                "VHDX block {block} is partially present but its sector bitmap is not present"
            ))
            .with_field("BAT"));
        }
        let spb = u64::from(self.geo.block_size / self.geo.logical_sector);
        let first = (block % self.geo.chunk_ratio) * spb + sector;
        let n = max.min(spb - sector);
        let byte0 = first / 8;
        let bytes = (first + n).div_ceil(8) - byte0;
        let mut bits = vec![0u8; bytes as usize];
        self.view.read_at(&mut bits, host(sb, byte0)?)?;
        let bit = |k: u64| {
            let i = first + k - byte0 * 8;
            bits[(i / 8) as usize] >> (i % 8) & 1 != 0
        };
        let v = bit(0);
        let mut run = 1;
        while run < n && bit(run) == v {
            run += 1;
        }
        Ok((v, run))
    }

    fn read_block(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let block = guest / bs;
        let inb = guest % bs;
        let e = self.entry(block);
        match e & 7 {
            state::FULLY_PRESENT => self.view.read_at(buf, host(e, inb)?),
            state::NOT_PRESENT if self.geo.has_parent => self.read_parent(buf, guest),
            state::NOT_PRESENT | state::UNDEFINED | state::ZERO | state::UNMAPPED | state::UNMAPPED_V095 => {
                buf.fill(0);
                Ok(())
            }
            state::PARTIALLY_PRESENT if self.geo.has_parent => {
                let ls = u64::from(self.geo.logical_sector);
                let mut done = 0usize;
                while done < buf.len() {
                    let pos = inb + done as u64;
                    let sector = pos / ls;
                    let sectors = (pos + (buf.len() - done) as u64).div_ceil(ls) - sector;
                    let (present, run) = self.bitmap_run(block, sector, sectors)?;
                    let end = ((sector + run) * ls).min(inb + buf.len() as u64);
                    let piece = &mut buf[done..(end - inb) as usize];
                    if present {
                        self.view.read_at(piece, host(e, pos)?)?;
                    } else {
                        self.read_parent(piece, block * bs + pos)?;
                    }
                    done = (end - inb) as usize;
                }
                Ok(())
            }
            s => Err(Error::corrupt(format!("VHDX BAT entry of block {block} has invalid state {s}"))
                .with_field("BAT")
                .with_offset(guest)),
        }
    }

    /// Calls `f(guest offset, range in the request)` per block piece.
    fn for_blocks(
        &self,
        off: u64,
        len: u64,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let mut pos = 0u64;
        while pos < len {
            let g = off + pos;
            let n = (bs - g % bs).min(len - pos);
            f(g, pos as usize..(pos + n) as usize)?;
            pos += n;
        }
        Ok(())
    }

    /// Checks the image the way `qemu-img check` does for VHDX.
    pub fn check(&self) -> VhdxCheckReport {
        check::report(self)
    }
}

impl BlockDevice for Vhdx {
    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new(Format::Vhdx, self.geo.size, self.read_only);
        info.cluster_size = Some(u64::from(self.geo.block_size));
        info.path = self.path.clone();
        if let Some(hint) = self.locator.clone().map(|locator| VhdxParentHint { locator }) {
            info.backing_file = hint.path();
            info.backing_format = Some("vhdx".into());
        }
        let st = self.state.lock();
        info.details = FormatDetails::Vhdx(VhdxDetails {
            block_size: self.geo.block_size,
            logical_sector_size: self.geo.logical_sector,
            physical_sector_size: self.geo.physical_sector,
            subformat: self.subformat(),
            log_size: st.header.log_length,
            data_write_guid: st.header.data_write_guid.to_string(),
            page83: self.page83.to_string(),
            parent_locator: self.locator.as_ref().map(|l| l.entries.clone()).unwrap_or_default(),
            log_replayed: self.log_replayed,
        });
        info
    }

    fn size(&self) -> u64 {
        self.geo.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.geo.size)?;
        self.for_blocks(offset, buf.len() as u64, |g, r| self.read_block(&mut buf[r], g)).map_err(|e| self.err(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write"));
        }
        check_request(offset, buf.len() as u64, self.geo.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.ensure_session().map_err(|e| self.err(e))?;
        let bs = u64::from(self.geo.block_size);
        self.for_blocks(offset, buf.len() as u64, |g, r| {
            let e = self.entry(g / bs);
            if e & 7 == state::FULLY_PRESENT {
                self.file.write_at(&buf[r], host(e, g % bs)?)
            } else {
                self.allocate_write(&buf[r], g)
            }
        })
        .map_err(|e| self.err(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write_zeroes"));
        }
        check_request(offset, len, self.geo.size)?;
        if len == 0 {
            return Ok(());
        }
        self.ensure_session().map_err(|e| self.err(e))?;
        self.zero_blocks(offset, len, mode, false).map_err(|e| self.err(e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("discard"));
        }
        check_request(offset, len, self.geo.size)?;
        if len == 0 {
            return Ok(());
        }
        self.ensure_session().map_err(|e| self.err(e))?;
        self.zero_blocks(offset, len, ZeroMode::MayUnmap, true).map_err(|e| self.err(e))
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_request(offset, 0, self.geo.size)?;
        let max_len = max_len.min(self.geo.size - offset);
        if max_len == 0 {
            return Ok(Extent { offset, length: 0, kind: ExtentKind::Unallocated, depth: 0, encrypted: false });
        }
        let bs = u64::from(self.geo.block_size);
        let one = |g: u64, n: u64| -> Result<Extent> {
            let block = g / bs;
            let inb = g % bs;
            let e = self.entry(block);
            let mk = |kind, length, depth| Extent { offset: g, length, kind, depth, encrypted: false };
            Ok(match e & 7 {
                state::FULLY_PRESENT => mk(ExtentKind::Data { host_offset: Some(host(e, inb)?) }, n, 0),
                state::NOT_PRESENT if self.geo.has_parent => match &self.parent {
                    Some(p) if g < p.size() => {
                        let x = p.map(g, n.min(p.size() - g))?;
                        mk(x.kind, x.length, x.depth + 1)
                    }
                    _ => mk(ExtentKind::Unallocated, n, 1),
                },
                state::NOT_PRESENT => mk(ExtentKind::Unallocated, n, 0),
                state::PARTIALLY_PRESENT if self.geo.has_parent => {
                    let ls = u64::from(self.geo.logical_sector);
                    let sector = inb / ls;
                    let (present, run) = self.bitmap_run(block, sector, (inb + n).div_ceil(ls) - sector)?;
                    let len = ((sector + run) * ls).min(inb + n) - inb;
                    if present {
                        mk(ExtentKind::Data { host_offset: Some(host(e, inb)?) }, len, 0)
                    } else {
                        match &self.parent {
                            Some(p) if g < p.size() => {
                                let x = p.map(g, len.min(p.size() - g))?;
                                mk(x.kind, x.length, x.depth + 1)
                            }
                            _ => mk(ExtentKind::Unallocated, len, 1),
                        }
                    }
                }
                state::UNDEFINED | state::ZERO | state::UNMAPPED | state::UNMAPPED_V095 => {
                    mk(ExtentKind::Zero { host_offset: None }, n, 0)
                }
                s => {
                    return Err(Error::corrupt(format!("VHDX BAT entry of block {block} has invalid state {s}"))
                        .with_field("BAT"))
                }
            })
        };
        let first = one(offset, (bs - offset % bs).min(max_len)).map_err(|e| self.err(e))?;
        let mut ext = first;
        // Merge following blocks of the same kind (data only when contiguous).
        while ext.length < max_len && (ext.offset + ext.length).is_multiple_of(bs) && ext.length >= bs - offset % bs {
            let g = ext.offset + ext.length;
            let next = one(g, bs.min(max_len - ext.length)).map_err(|e| self.err(e))?;
            let joins = match (ext.kind, next.kind) {
                (ExtentKind::Data { host_offset: Some(a) }, ExtentKind::Data { host_offset: Some(b) }) => {
                    a.checked_add(ext.length) == Some(b) && ext.depth == next.depth
                }
                (a, b) => a == b && ext.depth == next.depth && !matches!(a, ExtentKind::Data { .. }),
            };
            if !joins || next.length != bs.min(max_len - ext.length) {
                break;
            }
            ext.length += next.length;
        }
        Ok(ext)
    }

    fn flush(&self) -> Result<()> {
        self.flush_inner().map_err(|e| self.err(e))
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.parent.as_deref()
    }
}

impl Drop for Vhdx {
    /// Best effort flush for an image opened read-write (call
    /// [`Vhdx::close`] to see a failure).
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.flush_inner();
        }
    }
}
