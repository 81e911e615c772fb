//! VHD, Microsoft's Virtual Hard Disk (QEMU's `vpc` driver; spec: "Virtual
//! Hard Disk Image Format Specification" 1.0; QEMU `block/vpc.c` for what
//! QEMU reads and writes).
//!
//! Supported: fixed disks (the data, then the 512-byte footer) and dynamic
//! disks (footer copy, dynamic header, block allocation table, blocks of a
//! sector bitmap followed by data, footer) read, write and create;
//! differencing disks read (the parent named by the `W2ru`, `W2ku` or
//! `MacX` locator, or by the header's parent name, opened under the
//! caller's backing policy; sectors whose bitmap bit is clear come from the
//! parent).
//!
//! The guest-visible size follows QEMU 10: the CHS geometry for images
//! made by Virtual PC (`vpc `) and QEMU without `force_size` (`qemu`), the
//! footer's `current_size` for every other creator (Hyper-V's `win `,
//! disk2vhd's `d2v `, QEMU with `force_size`'s `qem2`, XenServer,
//! XenConverter, unknown ones) and for any image with the maximum geometry.
//!
//! QEMU 10 opens a differencing disk as a dynamic one (no parent, bitmaps
//! ignored); vdisk reads it as the format means it.
//!
//! Refused: a footer or dynamic header with a bad checksum (QEMU only
//! warns), disk types other than 2, 3 and 4, block sizes that are not a
//! power of two from 512 B to 256 MiB, tables or blocks outside the file or
//! overlapping the metadata, sizes above 2040 GiB, writes to differencing
//! disks, resize (QEMU has none for `vpc`).
//!
//! Allocating writes are ordered for crash safety: a new footer is written
//! past the new block first (the file keeps a footer at its end), then the
//! data and the sector bitmap over the old footer, a sync, and only then
//! the BAT entry. Unlike QEMU, vdisk starts each new block's data on a
//! 4 KiB boundary of the file (the few bytes before its bitmap are zeroed),
//! so guest pages do not straddle host pages. A crash at any point leaves at most a leaked block.
//! Like QEMU, dynamic disks read allocated blocks whole (the bitmap of a
//! new block is all ones, its unwritten sectors zeros).
//!
//! ```
//! use std::sync::Arc;
//! use vdisk::{BlockDevice, MemStorage};
//! use vdisk::vpc::{Vpc, VpcCreateOptions};
//!
//! let disk = Vpc::create(Arc::new(MemStorage::new()), 10 << 20, &VpcCreateOptions::default())?;
//! disk.write_at(b"hello", 4096)?;
//! let mut buf = [0u8; 5];
//! disk.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), vdisk::Error>(())
//! ```
//!
//! # Locking
//!
//! `alloc` (the next block position) is taken before `bat`; data I/O to
//! allocated blocks takes only a short read lock on `bat`.

pub mod create;
pub mod dynamic;
pub mod footer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use byteorder::{BigEndian, ByteOrder};
use parking_lot::{Mutex, RwLock};

use crate::device::{check_request, BlockDevice, DeviceInfo, Extent, ExtentKind, Format, ZeroMode};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::{VPC_MAX_BAT_BYTES, VPC_MAX_PARENT_LOCATOR, VPC_MAX_SECTORS};
use crate::storage::Storage;

pub use create::{VpcCreateOptions, VpcSubformat};
use dynamic::{locator_name, DynHeader, BAT_UNALLOCATED, DYN_HEADER_LEN};
use footer::{Footer, FOOTER_LEN, TYPE_DIFFERENCING, TYPE_FIXED};

/// Alignment of the data of blocks vdisk allocates.
const DATA_ALIGN: u64 = 4096;

/// How to open a VHD image.
#[derive(Debug, Clone, Default)]
pub struct VpcOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// The opened parent of a differencing disk. When the image names a
    /// parent and this is `None`, reads that fall through to it fail.
    pub parent: Option<Arc<dyn BlockDevice>>,
    /// Open read-write but inactive, as the destination of a handoff
    /// ([`BlockDevice::activate`] makes it usable).
    pub inactive: bool,
}

/// The dynamic (and differencing) part of an image.
#[derive(Debug)]
struct Dynamic {
    header: DynHeader,
    block_size: u64,
    bitmap_len: u64,
    /// In-memory BAT (sector offsets of each block's bitmap).
    bat: RwLock<Vec<u32>>,
    /// Where the next block goes: the position of the footer at the end.
    alloc: Mutex<u64>,
}

/// An open VHD image.
#[derive(Debug)]
#[must_use = "call flush() to make writes durable"]
pub struct Vpc {
    file: Arc<dyn Storage>,
    path: Option<PathBuf>,
    footer: Footer,
    dynamic: Option<Dynamic>,
    size: u64,
    read_only: bool,
    parent: Option<Arc<dyn BlockDevice>>,
    parent_name: Option<String>,
    /// Handed off ([`BlockDevice::inactivate`]), and the gate requests pass.
    handoff: crate::handoff::Handoff,
}

fn verr(e: Error, path: Option<&Path>) -> Error {
    let e = e.with_format("vpc");
    match path {
        Some(p) => e.with_path(p),
        None => e,
    }
}

/// Reads the footer: the last 512 bytes, or the copy at offset 0 of a
/// dynamic disk when the end holds none. Returns it and whether it was at
/// the end.
fn read_footer(file: &dyn Storage, flen: u64) -> Result<(Footer, bool)> {
    if flen < FOOTER_LEN as u64 {
        return Err(Error::invalid(format!("the file is {flen} bytes, shorter than a VHD footer")));
    }
    let mut end = [0u8; FOOTER_LEN];
    file.read_at(&mut end, flen - FOOTER_LEN as u64)?;
    let end_result = Footer::decode(&end);
    if let Ok(f) = end_result {
        return Ok((f, true));
    }
    let mut head = [0u8; FOOTER_LEN];
    file.read_at(&mut head, 0)?;
    if Footer::has_cookie(&head) {
        let f = Footer::decode(&head)?;
        if f.disk_type == TYPE_FIXED {
            return Err(
                Error::invalid("a fixed VHD needs its footer in the last 512 bytes of the file").with_field("footer")
            );
        }
        return Ok((f, false));
    }
    match end_result {
        Err(e) if Footer::has_cookie(&end) => Err(e),
        _ => Err(Error::invalid("no VHD footer ('conectix') at the end or the start of the file").with_field("cookie")),
    }
}

impl Vpc {
    /// Reads the footer and, for dynamic and differencing disks, the parent
    /// name, without opening anything else. Callers use it to learn the
    /// parent before opening.
    pub fn parent_name(file: &dyn Storage) -> Result<Option<String>> {
        let r = (|| {
            let flen = file.len()?;
            let (f, _) = read_footer(file, flen)?;
            if f.disk_type != TYPE_DIFFERENCING {
                return Ok(None);
            }
            let h = read_dyn_header(file, &f, flen)?;
            read_parent_name(file, &h, flen).map(Some)
        })();
        r.map_err(|e| verr(e, file.path()))
    }

    /// Opens the VHD image in `file`.
    pub fn open(file: Arc<dyn Storage>, opts: VpcOptions) -> Result<Vpc> {
        let path = file.path().map(Path::to_path_buf);
        Self::open_inner(file, opts).map_err(|e| verr(e, path.as_deref()))
    }

    fn open_inner(file: Arc<dyn Storage>, opts: VpcOptions) -> Result<Vpc> {
        let flen = file.len()?;
        let (footer, at_end) = read_footer(&*file, flen)?;
        let size = footer.virtual_size();
        if size / 512 > VPC_MAX_SECTORS {
            return Err(
                Error::limit(format!("disk size {size} is too large (max 2040 GiB)")).with_field("current_size")
            );
        }
        let footer_pos = if at_end { flen - FOOTER_LEN as u64 } else { flen.next_multiple_of(512) };
        let mut read_only = opts.read_only || file.is_read_only();
        let mut parent_name = None;
        let dynamic = if footer.disk_type == TYPE_FIXED {
            if size > footer_pos {
                return Err(Error::invalid(format!(
                    "fixed disk of {size} bytes does not fit before the footer at {footer_pos}: the file is truncated"
                ))
                .with_field("current_size"));
            }
            None
        } else {
            let header = read_dyn_header(&*file, &footer, flen)?;
            if footer.disk_type == TYPE_DIFFERENCING {
                parent_name = Some(read_parent_name(&*file, &header, flen)?);
                read_only = true;
            }
            Some(load_bat(&*file, &footer, header, size, flen, footer_pos)?)
        };
        Ok(Vpc {
            path: file.path().map(Path::to_path_buf),
            file,
            footer,
            dynamic,
            size,
            read_only,
            parent: opts.parent,
            parent_name,
            handoff: crate::handoff::Handoff::new(opts.inactive),
        })
    }

    /// Rereads what another host or process may have changed while this
    /// open was inactive (or read-only beside a writer): the BAT and where
    /// the next block goes. The footer and the dynamic header are fixed
    /// for the image's life (neither vdisk nor QEMU resizes a VHD or
    /// rewrites them on allocation); an image whose footer or header
    /// changed is refused.
    fn reload(&self) -> Result<()> {
        let flen = self.file.len()?;
        let (footer, at_end) = read_footer(&*self.file, flen)?;
        if footer.encode() != self.footer.encode() {
            return Err(Error::invalid("the footer changed while the image was handed off: reopen the image")
                .with_field("footer"));
        }
        let Some(d) = &self.dynamic else {
            return Ok(());
        };
        let header = read_dyn_header(&*self.file, &footer, flen)?;
        if header != d.header {
            return Err(Error::invalid(
                "the dynamic disk header changed while the image was handed off: reopen the image",
            )
            .with_field("dynamic header"));
        }
        let footer_pos = if at_end { flen - FOOTER_LEN as u64 } else { flen.next_multiple_of(512) };
        let fresh = load_bat(&*self.file, &footer, header, self.size, flen, footer_pos)?;
        let mut alloc = d.alloc.lock();
        *d.bat.write() = fresh.bat.into_inner();
        *alloc = fresh.alloc.into_inner();
        Ok(())
    }

    /// The footer as read at open.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The dynamic header, for dynamic and differencing disks.
    pub fn dynamic_header(&self) -> Option<&DynHeader> {
        self.dynamic.as_ref().map(|d| &d.header)
    }

    /// The parent name of a differencing disk.
    pub fn parent(&self) -> Option<&str> {
        self.parent_name.as_deref()
    }

    /// The image file.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// Flushes; the image is clean after every write, so closing only syncs.
    pub fn close(self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.flush()
    }

    fn err(&self, e: Error) -> Error {
        verr(e, self.path.as_deref())
    }

    /// Reads the parent's bytes at `guest` (zeros past its end), or fails
    /// when the parent was not opened.
    fn read_parent(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        match (&self.parent, &self.parent_name) {
            (Some(p), _) => {
                let psize = p.size();
                let n = if guest >= psize { 0 } else { (psize - guest).min(buf.len() as u64) as usize };
                p.read_at(&mut buf[..n], guest)?;
                buf[n..].fill(0);
                Ok(())
            }
            (None, Some(name)) => Err(Error::new(
                ErrorKind::NotFound,
                format!("guest offset {guest:#x} falls through to the parent '{name}', which was not opened"),
            )
            .with_offset(guest)),
            (None, None) => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Calls `f(block index, offset in block, range of the request)` for
    /// each block piece of `[off, off + len)`.
    fn for_blocks(
        d: &Dynamic,
        off: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let mut pos = 0u64;
        while pos < len {
            let cur = off + pos;
            let idx = (cur / d.block_size) as usize;
            let within = cur % d.block_size;
            let n = (d.block_size - within).min(len - pos);
            f(idx, within, pos as usize..(pos + n) as usize)?;
            pos += n;
        }
        Ok(())
    }

    /// Host offset of the bitmap of block `idx`, if allocated.
    fn block_at(d: &Dynamic, idx: usize) -> Option<u64> {
        let e = *d.bat.read().get(idx)?;
        (e != BAT_UNALLOCATED).then_some(u64::from(e) * 512)
    }

    /// Reads the sector bitmap of the block at `host` (differencing disks).
    fn read_bitmap(&self, d: &Dynamic, host: u64) -> Result<Vec<u8>> {
        let mut bm = vec![0u8; d.bitmap_len as usize];
        self.file.read_at(&mut bm, host)?;
        Ok(bm)
    }

    fn read_dynamic(&self, d: &Dynamic, buf: &mut [u8], offset: u64) -> Result<()> {
        let diff = self.footer.disk_type == TYPE_DIFFERENCING;
        Self::for_blocks(d, offset, buf.len() as u64, |idx, within, r| {
            let piece = &mut buf[r];
            match Self::block_at(d, idx) {
                None => {
                    let g = idx as u64 * d.block_size + within;
                    self.read_parent(piece, g)
                }
                Some(host) if !diff => self.file.read_at(piece, host + d.bitmap_len + within),
                Some(host) => {
                    let bm = self.read_bitmap(d, host)?;
                    let mut i = 0usize;
                    while i < piece.len() {
                        let at = within + i as u64;
                        let set = bit(&bm, at / 512);
                        let mut j = i;
                        loop {
                            // The next sector boundary, relative to the piece.
                            let next = ((within + j as u64) / 512 + 1) * 512 - within;
                            j = (next as usize).min(piece.len());
                            if j >= piece.len() || bit(&bm, (within + j as u64) / 512) != set {
                                break;
                            }
                        }
                        if set {
                            self.file.read_at(&mut piece[i..j], host + d.bitmap_len + at)?;
                        } else {
                            self.read_parent(&mut piece[i..j], idx as u64 * d.block_size + at)?;
                        }
                        i = j;
                    }
                    Ok(())
                }
            }
        })
    }

    /// Allocates block `idx` and writes `data` at `within` into it: new
    /// footer past the block, data, bitmap over the old footer, sync, BAT
    /// entry.
    fn allocate(&self, d: &Dynamic, idx: usize, within: u64, data: &[u8]) -> Result<()> {
        let mut next = d.alloc.lock();
        if let Some(host) = Self::block_at(d, idx) {
            drop(next);
            return self.file.write_at(data, host + d.bitmap_len + within);
        }
        // The block's data starts on a 4 KiB boundary (QEMU puts it right
        // after the previous block, so guest pages straddle host pages);
        // the gap before the bitmap is zeroed, over the old footer.
        let gap_start = *next;
        let pos = (gap_start + d.bitmap_len).next_multiple_of(DATA_ALIGN) - d.bitmap_len;
        let sector = u32::try_from(pos / 512)
            .ok()
            .filter(|&s| s != BAT_UNALLOCATED)
            .ok_or_else(|| Error::limit(format!("a new block at byte {pos} is beyond what a BAT entry can address")))?;
        let end = pos + d.bitmap_len + d.block_size;
        self.file.write_at(&self.footer.encode(), end)?;
        // The block's place is taken from here on, even if a later step
        // fails: the next allocation must not reuse bytes a failed one
        // wrote (its unwritten parts would read them, not zeros).
        *next = end;
        self.file.write_at(data, pos + d.bitmap_len + within)?;
        self.file.write_at(&vec![0xffu8; d.bitmap_len as usize], pos)?;
        if pos > gap_start {
            self.file.write_at(&vec![0u8; (pos - gap_start) as usize], gap_start)?;
        }
        self.file.sync()?;
        let mut e = [0u8; 4];
        BigEndian::write_u32(&mut e, sector);
        self.file.write_at(&e, d.header.table_offset + 4 * idx as u64)?;
        if let Some(slot) = d.bat.write().get_mut(idx) {
            *slot = sector;
        }
        Ok(())
    }

    fn write_inner(&self, buf: &[u8], offset: u64, zero: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write"));
        }
        check_request(offset, buf.len() as u64, self.size)?;
        let Some(d) = &self.dynamic else {
            return self.file.write_at(buf, offset);
        };
        if self.footer.disk_type == TYPE_DIFFERENCING {
            return Err(Error::unsupported("writes to differencing VHD images are not supported"));
        }
        Self::for_blocks(d, offset, buf.len() as u64, |idx, within, r| match Self::block_at(d, idx) {
            Some(host) => self.file.write_at(&buf[r], host + d.bitmap_len + within),
            None if zero => Ok(()),
            None => self.allocate(d, idx, within, &buf[r]),
        })
    }
}

fn bit(bm: &[u8], sector: u64) -> bool {
    bm.get((sector / 8) as usize).is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
}

fn read_dyn_header(file: &dyn Storage, f: &Footer, flen: u64) -> Result<DynHeader> {
    let o = f.data_offset;
    if o.checked_add(DYN_HEADER_LEN as u64).is_none_or(|e| e > flen) || o < FOOTER_LEN as u64 {
        return Err(Error::invalid(format!("dynamic header offset {o} is outside the file of {flen} bytes"))
            .with_field("data_offset"));
    }
    let mut b = [0u8; DYN_HEADER_LEN];
    file.read_at(&mut b, o)?;
    DynHeader::decode(&b).map_err(|e| e.with_offset(o))
}

fn read_parent_name(file: &dyn Storage, h: &DynHeader, flen: u64) -> Result<String> {
    for code in [b"W2ru", b"W2ku", b"MacX"] {
        for l in h.locators.iter().filter(|l| &l.code == code) {
            let len = l.data_len as usize;
            if len == 0 || len > VPC_MAX_PARENT_LOCATOR {
                continue;
            }
            if l.data_offset.checked_add(len as u64).is_none_or(|e| e > flen) {
                return Err(Error::invalid(format!(
                    "parent locator data at {} ({len} bytes) is outside the file",
                    l.data_offset
                ))
                .with_field("parent_locator"));
            }
            let mut data = vec![0u8; len];
            file.read_at(&mut data, l.data_offset)?;
            if let Some(n) = locator_name(code, &data) {
                return Ok(n);
            }
        }
    }
    if !h.parent_name.is_empty() {
        return Ok(h.parent_name.replace('\\', "/"));
    }
    Err(Error::invalid("differencing disk names no parent").with_field("parent_locator"))
}

fn load_bat(
    file: &dyn Storage,
    footer: &Footer,
    header: DynHeader,
    size: u64,
    flen: u64,
    footer_pos: u64,
) -> Result<Dynamic> {
    let block_size = u64::from(header.block_size);
    let bitmap_len = header.bitmap_len();
    let entries = u64::from(header.max_table_entries);
    if entries * block_size < size {
        return Err(Error::invalid(format!(
            "the BAT's {entries} entries of {block_size}-byte blocks cover less than the disk's {size} bytes"
        ))
        .with_field("max_table_entries"));
    }
    let bat_len = entries * 4;
    if bat_len > VPC_MAX_BAT_BYTES {
        return Err(Error::limit(format!("BAT of {bat_len} bytes is larger than the {VPC_MAX_BAT_BYTES}-byte limit"))
            .with_field("max_table_entries"));
    }
    let to = header.table_offset;
    if to.checked_add(bat_len).is_none_or(|e| e > flen) || !to.is_multiple_of(512) {
        return Err(Error::invalid(format!(
            "BAT at {to} ({bat_len} bytes) is unaligned or outside the file of {flen} bytes"
        ))
        .with_field("table_offset"));
    }
    let mut raw = vec![0u8; bat_len as usize];
    file.read_at(&mut raw, to)?;
    let bat: Vec<u32> = raw.chunks_exact(4).map(BigEndian::read_u32).collect();
    // Metadata the blocks must not overlap: footer copy, dynamic header, BAT.
    let meta = [(0, FOOTER_LEN as u64), (footer.data_offset, DYN_HEADER_LEN as u64), (to, bat_len)];
    let mut free = (to + bat_len).next_multiple_of(512);
    for (i, &e) in bat.iter().enumerate() {
        if e == BAT_UNALLOCATED {
            continue;
        }
        let start = u64::from(e) * 512;
        let end = start + bitmap_len + block_size;
        if let Some((mo, ml)) = meta.iter().find(|(mo, ml)| start < mo + ml && *mo < end) {
            return Err(Error::invalid(format!(
                "BAT entry {i} puts a block at {start}..{end}, over metadata at {mo}..{}",
                mo + ml
            ))
            .with_field("bat")
            .with_offset(to + 4 * i as u64));
        }
        free = free.max(end);
    }
    let mut spans: Vec<(u64, u64, usize)> = bat
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != BAT_UNALLOCATED)
        .map(|(i, &e)| (u64::from(e) * 512, bitmap_len + block_size, i))
        .collect();
    if let Some(&(i, a, j, b)) = crate::overlap::overlaps(&mut spans, 1).first() {
        return Err(Error::invalid(format!(
            "BAT entries {i} and {j} put blocks at overlapping places ({a} and {b}): a write to one would change the other"
        ))
        .with_field("bat")
        .with_offset(to + 4 * j as u64));
    }
    if free > flen {
        return Err(Error::invalid(format!(
            "blocks reach byte {free}, past the end of the file ({flen} bytes): the image has been truncated"
        ))
        .with_field("bat"));
    }
    Ok(Dynamic { header, block_size, bitmap_len, bat: RwLock::new(bat), alloc: Mutex::new(free.max(footer_pos)) })
}

impl BlockDevice for Vpc {
    fn info(&self) -> DeviceInfo {
        let mut i = DeviceInfo::new(Format::Vpc, self.size, self.read_only);
        i.cluster_size = self.dynamic.as_ref().map(|d| d.block_size);
        i.backing_file = self.parent_name.clone();
        i.path = self.path.clone();
        i
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size)?;
        let _active = self.handoff.enter("vpc")?;
        let r = match &self.dynamic {
            None => self.file.read_at(buf, offset),
            Some(d) => self.read_dynamic(d, buf, offset),
        };
        r.map_err(|e| self.err(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _active = self.handoff.enter("vpc")?;
        self.write_inner(buf, offset, false).map_err(|e| self.err(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _mode: ZeroMode) -> Result<()> {
        check_request(offset, len, self.size)?;
        let _active = self.handoff.enter("vpc")?;
        crate::storage::write_zeros_with(offset, len, |buf, at| self.write_inner(buf, at, true))
            .map_err(|e| self.err(e))
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let len = max_len.min(self.size.saturating_sub(offset));
        check_request(offset, len, self.size)?;
        let _active = self.handoff.enter("vpc")?;
        let mk = |length, kind, depth| Extent { offset, length, kind, depth, encrypted: false };
        let Some(d) = &self.dynamic else {
            return Ok(mk(len, ExtentKind::Data { host_offset: Some(offset) }, 0));
        };
        let diff = self.footer.disk_type == TYPE_DIFFERENCING;
        // What falls through to the parent is what the parent maps there
        // (a copy or compare must see the parent's data, not a hole); past
        // the parent's end, zeros.
        let through = |n: u64| -> Result<Extent> {
            match &self.parent {
                Some(p) if offset < p.size() => {
                    let x = p.map(offset, n.min(p.size() - offset)).map_err(|e| self.err(e))?;
                    Ok(mk(x.length, x.kind, x.depth + 1))
                }
                Some(_) => Ok(mk(n, ExtentKind::Zero { host_offset: None }, 1)),
                None => Ok(mk(n, ExtentKind::Unallocated, 1)),
            }
        };
        let idx = (offset / d.block_size) as usize;
        let within = offset % d.block_size;
        let in_block = (d.block_size - within).min(len);
        match Self::block_at(d, idx) {
            Some(host) if !diff => {
                Ok(mk(in_block, ExtentKind::Data { host_offset: Some(host + d.bitmap_len + within) }, 0))
            }
            Some(host) => {
                let bm = self.read_bitmap(d, host).map_err(|e| self.err(e))?;
                let first = within / 512;
                let set = bit(&bm, first);
                let mut s = first + 1;
                while s * 512 < within + in_block && bit(&bm, s) == set {
                    s += 1;
                }
                let n = (s * 512).min(within + in_block) - within;
                if set {
                    Ok(mk(n, ExtentKind::Data { host_offset: Some(host + d.bitmap_len + within) }, 0))
                } else {
                    through(n)
                }
            }
            None => {
                // Merge the run of unallocated blocks.
                let mut n = in_block;
                let mut i = idx + 1;
                while n < len && Self::block_at(d, i).is_none() {
                    n = (n + d.block_size).min(len);
                    i += 1;
                }
                if self.parent_name.is_some() {
                    through(n)
                } else {
                    Ok(mk(n, ExtentKind::Zero { host_offset: None }, 0))
                }
            }
        }
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync().map_err(|e| self.err(e))
    }

    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(self.err(Error::unsupported("image format driver does not support resize")))
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.parent.as_deref()
    }

    /// Every write leaves the image consistent (block and footer, sync,
    /// then the BAT entry), so inactivating syncs, as a close does.
    fn inactivate(&self) -> Result<()> {
        self.handoff.inactivate(&*self.file, self.read_only, || self.flush())
    }

    fn activate(&self) -> Result<()> {
        self.handoff.activate(&*self.file, self.read_only, "vpc", || self.reload()).map_err(|e| self.err(e))
    }

    fn is_inactive(&self) -> bool {
        self.handoff.is_inactive()
    }

    fn refresh(&self) -> Result<()> {
        self.handoff.refresh(self.read_only, "vpc", || self.reload()).map_err(|e| self.err(e))
    }
}

impl Drop for Vpc {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.file.sync();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// Memory storage whose `fail_at`-th write fails once (a transient
    /// I/O error: ENOSPC, a flaky disk), the others succeed.
    #[derive(Debug)]
    struct Flaky {
        inner: MemStorage,
        writes: std::sync::atomic::AtomicU64,
        fail_at: u64,
    }

    impl Storage for Flaky {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            if self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == self.fail_at {
                return Err(Error::io("write", std::io::Error::other("injected")));
            }
            self.inner.write_at(buf, offset)
        }
        fn len(&self) -> Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.inner.set_len(len)
        }
        fn sync(&self) -> Result<()> {
            self.inner.sync()
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_failed_allocation_never_leaks_its_bytes_into_the_next_block() {
        for fail_at in 2..=4 {
            let img = Arc::new(MemStorage::new());
            Vpc::create(img.clone(), 8 << 20, &VpcCreateOptions::default()).unwrap().close().unwrap();
            let st = Arc::new(Flaky {
                inner: MemStorage::from_vec(img.to_vec()),
                writes: std::sync::atomic::AtomicU64::new(0),
                fail_at,
            });
            let v = Vpc::open(st, VpcOptions::default()).unwrap();
            // The failing allocation (data, bitmap or gap write fails)...
            assert!(v.write_at(&[0x11; 65536], 512 << 10).is_err(), "write {fail_at} should fail");
            // ...then a new block elsewhere: its unwritten parts read zeros.
            v.write_at(&[0x22; 4096], 2 << 20).unwrap();
            let mut back = vec![0u8; 2 << 20];
            v.read_at(&mut back, 2 << 20).unwrap();
            assert!(back[..4096].iter().all(|&b| b == 0x22));
            assert!(back[4096..].iter().all(|&b| b == 0), "fail_at {fail_at}: stale bytes in a new block");
        }
    }

    fn model_check(sub: VpcSubformat) {
        let st = Arc::new(MemStorage::new());
        let opts = VpcCreateOptions { subformat: sub, ..Default::default() };
        let v = Vpc::create(st.clone(), 5 << 20, &opts).unwrap();
        let size = v.size();
        let mut model = vec![0u8; size as usize];
        let mut x = 12345u64;
        for _ in 0..60 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 20) % size;
            let len = ((x >> 8) % 70000).min(size - off) as usize;
            let data: Vec<u8> = (0..len).map(|i| (x as usize + i) as u8).collect();
            v.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        v.flush().unwrap();
        drop(v);
        let v = Vpc::open(st, VpcOptions::default()).unwrap();
        let mut got = vec![0u8; size as usize];
        v.read_at(&mut got, 0).unwrap();
        assert!(got == model);
        // map tiles the disk
        let mut pos = 0;
        while pos < size {
            let e = v.map(pos, u64::MAX).unwrap();
            assert!(e.length > 0);
            pos += e.length;
        }
    }

    /// A differencing disk made from a dynamic one: block 0 holds the
    /// child's data for its first 8 sectors only (bitmap bits), the rest of
    /// the disk comes from the parent named by a `W2ru` locator.
    #[test]
    fn differencing_reads_through_the_bitmap() {
        let st = Arc::new(MemStorage::new());
        let v = Vpc::create(st.clone(), 4 << 20, &VpcCreateOptions::default()).unwrap();
        let size = v.size();
        v.write_at(&[0xaa; 8192], 0).unwrap();
        v.close().unwrap();
        let mut b = st.to_vec();
        let l = b.len();
        let bat0 = BigEndian::read_u32(&b[1536..]) as usize * 512;
        b[bat0] = 0xff;
        b[bat0 + 1..bat0 + 512].fill(0);
        let mut f = Footer::decode(b[l - 512..].try_into().unwrap()).unwrap();
        f.disk_type = TYPE_DIFFERENCING;
        let fb = f.encode();
        let mut h = DynHeader::decode(b[512..1536].try_into().unwrap()).unwrap();
        let name: Vec<u8> = ".\\base.vhd".encode_utf16().flat_map(u16::to_le_bytes).collect();
        h.locators[0] = dynamic::ParentLocator {
            code: *b"W2ru",
            data_space: 1,
            data_len: name.len() as u32,
            data_offset: (l - 512) as u64,
        };
        b[512..1536].copy_from_slice(&h.encode());
        b[l - 512..].fill(0);
        b[l - 512..l - 512 + name.len()].copy_from_slice(&name);
        b.extend_from_slice(&fb);
        b[..512].copy_from_slice(&fb);
        let file: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(b));
        assert_eq!(Vpc::parent_name(&*file).unwrap().as_deref(), Some("base.vhd"));
        let pdata: Vec<u8> = (0..size).map(|i| (i / 512) as u8 ^ 0x5c).collect();
        let parent = Arc::new(crate::Raw::open(Arc::new(MemStorage::from_vec(pdata.clone()))).unwrap());
        let d = Vpc::open(file.clone(), VpcOptions { read_only: false, parent: Some(parent), ..Default::default() })
            .unwrap();
        assert!(d.info().read_only);
        let mut got = vec![0u8; size as usize];
        d.read_at(&mut got, 0).unwrap();
        let mut want = pdata;
        want[..4096].fill(0xaa);
        assert!(got == want);
        let mut odd = vec![0u8; 5000];
        d.read_at(&mut odd, 3000).unwrap();
        assert!(odd[..] == want[3000..8000]);
        let e = d.map(0, size).unwrap();
        assert_eq!((e.length, e.kind), (4096, ExtentKind::Data { host_offset: Some(bat0 as u64 + 512) }));
        // What falls through is the parent's, one level down.
        let e = d.map(4096, size).unwrap();
        assert_eq!((e.kind, e.depth), (ExtentKind::Data { host_offset: Some(4096) }, 1));
        assert_eq!(d.write_at(&[1], 0).unwrap_err().kind(), ErrorKind::ReadOnly);
        // Without the parent opened, reads that need it fail.
        let d = Vpc::open(file, VpcOptions::default()).unwrap();
        assert_eq!(d.read_at(&mut odd, 3000).unwrap_err().kind(), ErrorKind::NotFound);
        d.read_at(&mut odd[..4096], 0).unwrap();
    }

    #[test]
    fn new_blocks_are_page_aligned() {
        let st = Arc::new(MemStorage::new());
        let v = Vpc::create(st.clone(), 9 << 20, &VpcCreateOptions::default()).unwrap();
        for at in [5u64 << 20, 0, 8 << 20, 3 << 20] {
            v.write_at(&[7u8; 100], at + 1000).unwrap();
            match v.map(at, 4096).unwrap().kind {
                ExtentKind::Data { host_offset: Some(h) } => assert!(h.is_multiple_of(4096), "{h:#x}"),
                k => panic!("{k:?}"),
            }
        }
        let mut b = [0u8; 100];
        v.read_at(&mut b, (3 << 20) + 1000).unwrap();
        assert_eq!(b, [7u8; 100]);
    }

    #[test]
    fn dynamic_and_fixed_model() {
        model_check(VpcSubformat::Dynamic);
        model_check(VpcSubformat::Fixed);
    }
}
