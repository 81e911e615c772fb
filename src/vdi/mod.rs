//! VDI, VirtualBox's disk image (VirtualBox `VDICore.h`; QEMU `block/vdi.c`
//! for what QEMU reads, writes and checks).
//!
//! Supported: version 1.1 images, dynamic (blocks allocated on first
//! write, appended after the last one) and static (every block
//! preallocated), read, write, create and check (qemu-img's verdicts). The
//! header, including the image and snapshot UUIDs and the description, is
//! kept as read; only `blocks_allocated` changes when a block is
//! allocated.
//!
//! Refused, as QEMU refuses them: other versions, block sizes other than
//! 1 MiB, sector sizes other than 512, unaligned block map or data
//! offsets, a disk size the block map cannot cover, differencing images
//! (a link or parent UUID), more than 0x1fffff80 blocks. vdisk also
//! refuses image types other than dynamic and static, `block_extra`, a
//! block map that overlaps the header or the data or lies past the end of
//! the file, and (on use) block map entries past the image's blocks.
//!
//! Allocating writes are ordered for crash safety: the whole block (the
//! data, zeros around it), then the header's `blocks_allocated`, a sync,
//! and only then the block map entry. A crash leaves at most a leaked
//! block (which `qemu-img check` reports as an allocated-blocks mismatch,
//! as it would after QEMU crashed at the same point).
//!
//! ```
//! use std::sync::Arc;
//! use vdisk::{BlockDevice, MemStorage, Vdi, VdiCreateOptions};
//!
//! let disk = Vdi::create(Arc::new(MemStorage::new()), 10 << 20, &VdiCreateOptions::default())?;
//! disk.write_at(b"hello", 4096)?;
//! let mut buf = [0u8; 5];
//! disk.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), vdisk::Error>(())
//! ```
//!
//! # Locking
//!
//! `alloc` (the header's allocation count) is taken before `bmap`; data I/O
//! to allocated blocks takes only a short read lock on `bmap`.

pub mod check;
pub mod header;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian};
use parking_lot::{Mutex, RwLock};

use crate::device::{check_request, BlockDevice, DeviceInfo, Extent, ExtentKind, Format, ZeroMode};
use crate::error::{Error, Result};
use crate::limits::{VDI_BLOCKS_IN_IMAGE_MAX, VDI_BLOCK_SIZE};
use crate::storage::{FileStorage, Storage};
use crate::vpc::create::{bad_value, parse_bool, random_uuid};

pub use check::VdiCheckReport;
use header::{is_allocated, Header, HEADER_LEN, QEMU_TEXT, TYPE_DYNAMIC, TYPE_STATIC, UNALLOCATED};

/// How to open a VDI image.
#[derive(Debug, Clone, Default)]
pub struct VdiOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Open read-write but inactive, as the destination of a handoff
    /// ([`BlockDevice::activate`] makes it usable).
    pub inactive: bool,
}

/// Options of a new VDI image, as `qemu-img create -f vdi -o` names them.
#[derive(Debug, Clone, Default)]
pub struct VdiCreateOptions {
    /// `static=on`: every block allocated at creation.
    pub static_image: bool,
    /// `preallocation=falloc|full`: reserve the data area of a static
    /// image (vdisk reserves it for both; it reads as zeros).
    pub preallocate: bool,
}

impl VdiCreateOptions {
    /// Parses qemu-img's `-o` string (`static=on`). `size`, `nocow` and
    /// `extent_size_hint` are accepted and ignored.
    pub fn parse(s: &str) -> Result<VdiCreateOptions> {
        let mut o = VdiCreateOptions::default();
        for kv in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
            match k {
                "static" => o.static_image = parse_bool("static", v)?,
                "preallocation" => {
                    o.preallocate = match v {
                        "off" => false,
                        "falloc" | "full" => true,
                        _ => return Err(bad_value("preallocation", v)),
                    }
                }
                "size" | "nocow" | "extent_size_hint" => {}
                _ => return Err(Error::invalid_argument(format!("Invalid parameter '{k}'"))),
            }
        }
        Ok(o)
    }
}

/// An open VDI image.
#[derive(Debug)]
#[must_use = "call flush() to make writes durable"]
pub struct Vdi {
    file: Arc<dyn Storage>,
    path: Option<PathBuf>,
    header: Header,
    size: u64,
    read_only: bool,
    bmap: RwLock<Vec<u32>>,
    /// The next block's index in the data area (the header's
    /// `blocks_allocated`, or past the highest entry if that is larger).
    alloc: Mutex<u32>,
    /// Handed off ([`BlockDevice::inactivate`]), and the gate requests pass.
    handoff: crate::handoff::Handoff,
}

fn verr(e: Error, path: Option<&Path>) -> Error {
    let e = e.with_format("vdi");
    match path {
        Some(p) => e.with_path(p),
        None => e,
    }
}

impl Vdi {
    /// Opens the VDI image in `file`.
    pub fn open(file: Arc<dyn Storage>, opts: VdiOptions) -> Result<Vdi> {
        let path = file.path().map(Path::to_path_buf);
        Self::open_inner(file, opts).map_err(|e| verr(e, path.as_deref()))
    }

    fn open_inner(file: Arc<dyn Storage>, opts: VdiOptions) -> Result<Vdi> {
        let flen = file.len()?;
        if flen < HEADER_LEN as u64 {
            return Err(Error::invalid(format!("the file is {flen} bytes, shorter than a VDI header")));
        }
        let mut b = [0u8; HEADER_LEN];
        file.read_at(&mut b, 0)?;
        let header = Header::decode(&b, flen)?;
        let (bmap, next) = Self::read_bmap(&*file, &header)?;
        // Sizes that are not whole sectors (VBoxManage convertfromraw) are
        // rounded up, as QEMU does.
        let size = header.disk_size.next_multiple_of(512);
        let read_only = opts.read_only || file.is_read_only();
        if !read_only {
            // Two guest blocks on one image block: a write to one would
            // change the other. Read-only opens (and `check`, which reports
            // it as QEMU does) still work.
            let bs = u64::from(header.block_size);
            let mut spans: Vec<(u64, u64, usize)> = bmap
                .iter()
                .enumerate()
                .filter(|(_, &e)| is_allocated(e) && e < header.blocks_in_image)
                .map(|(i, &e)| (u64::from(e) * bs, bs, i))
                .collect();
            if let Some(&(i, _, j, _)) = crate::overlap::overlaps(&mut spans, 1).first() {
                return Err(Error::invalid(format!(
                    "block map entries {i} and {j} name the same image block {}: a write to one would change the other (open read-only to read it)",
                    bmap[j]
                ))
                .with_field("bmap")
                .with_offset(u64::from(header.offset_bmap) + 4 * j as u64));
            }
        }
        Ok(Vdi {
            path: file.path().map(Path::to_path_buf),
            read_only,
            file,
            size,
            header,
            bmap: RwLock::new(bmap),
            alloc: Mutex::new(next),
            handoff: crate::handoff::Handoff::new(opts.inactive),
        })
    }

    /// The block map and the next block to allocate.
    fn read_bmap(file: &dyn Storage, header: &Header) -> Result<(Vec<u32>, u32)> {
        let mut raw = vec![0u8; header.blocks_in_image as usize * 4];
        file.read_at(&mut raw, u64::from(header.offset_bmap))?;
        let bmap: Vec<u32> = raw.chunks_exact(4).map(LittleEndian::read_u32).collect();
        let highest = bmap.iter().filter(|&&e| is_allocated(e) && e < header.blocks_in_image).max().map(|&e| e + 1);
        let next = header.blocks_allocated.max(highest.unwrap_or(0));
        Ok((bmap, next))
    }

    /// Rereads what another host or process may have changed while this
    /// open was inactive (or read-only beside a writer): the allocation
    /// count and the block map. Everything else in the header is fixed for
    /// the image's life (vdisk and QEMU change only `blocks_allocated`, and
    /// neither resizes a VDI); a header that changed otherwise is refused.
    fn reload(&self) -> Result<()> {
        let flen = self.file.len()?;
        let mut b = [0u8; HEADER_LEN];
        self.file.read_at(&mut b, 0)?;
        let mut header = Header::decode(&b, flen)?;
        let allocated = header.blocks_allocated;
        header.blocks_allocated = self.header.blocks_allocated;
        if header.encode() != self.header.encode() {
            return Err(Error::invalid(
                "the header changed while the image was handed off (only blocks_allocated may change): reopen the image",
            )
            .with_field("header"));
        }
        header.blocks_allocated = allocated;
        let (bmap, next) = Self::read_bmap(&*self.file, &header)?;
        let mut alloc = self.alloc.lock();
        *self.bmap.write() = bmap;
        *alloc = next;
        Ok(())
    }

    /// Creates a VDI image in `file` (which should be empty) of `size`
    /// bytes rounded up to whole sectors, laid out as QEMU 10 lays it out
    /// (`vdi_co_do_create`: header, block map at 0x200, data after it),
    /// except that the data starts on a 4 KiB boundary.
    pub fn create(file: Arc<dyn Storage>, size: u64, opts: &VdiCreateOptions) -> Result<Vdi> {
        let bytes = size.checked_next_multiple_of(512).unwrap_or(u64::MAX);
        let max = u64::from(VDI_BLOCKS_IN_IMAGE_MAX) * u64::from(VDI_BLOCK_SIZE);
        if bytes > max {
            return Err(Error::invalid_argument(format!(
                "Unsupported VDI image size (size is {bytes:#x}, max supported is {max:#x})"
            )));
        }
        let blocks = bytes.div_ceil(u64::from(VDI_BLOCK_SIZE)) as u32;
        let bmap_len = (u64::from(blocks) * 4).next_multiple_of(512);
        let mut text = [0u8; 64];
        text[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT.as_bytes());
        let h = Header {
            text,
            header_size: 0x180,
            image_type: if opts.static_image { TYPE_STATIC } else { TYPE_DYNAMIC },
            image_flags: 0,
            description: [0; 256],
            offset_bmap: 0x200,
            // QEMU puts the data right after the block map (512-byte
            // aligned); vdisk aligns it to 4 KiB so guest pages do not
            // straddle host pages.
            offset_data: (0x200 + bmap_len).next_multiple_of(4096) as u32,
            cylinders: 0,
            heads: 0,
            sectors: 0,
            sector_size: 512,
            disk_size: bytes,
            block_size: VDI_BLOCK_SIZE,
            block_extra: 0,
            blocks_in_image: blocks,
            blocks_allocated: if opts.static_image { blocks } else { 0 },
            uuid_image: random_uuid(),
            uuid_last_snap: random_uuid(),
            uuid_link: [0; 16],
            uuid_parent: [0; 16],
            rest: [0; 56],
        };
        file.set_len(0)?;
        file.write_at(&h.encode(), 0)?;
        let mut bmap = vec![0xffu8; bmap_len as usize];
        if opts.static_image {
            for (i, c) in bmap.chunks_exact_mut(4).take(blocks as usize).enumerate() {
                LittleEndian::write_u32(c, i as u32);
            }
        }
        file.write_at(&bmap, 0x200)?;
        file.set_len(u64::from(h.offset_data))?;
        if opts.static_image {
            let end = u64::from(h.offset_data) + u64::from(blocks) * u64::from(VDI_BLOCK_SIZE);
            if !(opts.preallocate && file.allocate(u64::from(h.offset_data), end - u64::from(h.offset_data)).is_ok()) {
                file.set_len(end)?;
            }
        }
        file.sync()?;
        Vdi::open(file, VdiOptions::default())
    }

    /// Creates (or truncates) the file at `path` and a VDI image in it.
    pub fn create_file(path: &Path, size: u64, opts: &VdiCreateOptions) -> Result<Vdi> {
        let st = FileStorage::create(path)?;
        Vdi::create(Arc::new(st), size, opts).map_err(|e| e.with_path(path))
    }

    /// The header as read at open (with the current `blocks_allocated`).
    pub fn header(&self) -> Header {
        let mut h = self.header.clone();
        h.blocks_allocated = *self.alloc.lock();
        h
    }

    /// The image file.
    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// Flushes; the image is consistent after every write, so closing only
    /// syncs.
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    fn err(&self, e: Error) -> Error {
        verr(e, self.path.as_deref())
    }

    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    /// Host offset of block `idx`'s data, `None` if it reads as zeros.
    fn block_at(&self, idx: usize) -> Result<Option<u64>> {
        let e = self.bmap.read().get(idx).copied().unwrap_or(UNALLOCATED);
        if !is_allocated(e) {
            return Ok(None);
        }
        if e >= self.header.blocks_in_image {
            return Err(Error::corrupt(format!(
                "block map entry {idx} is {e}, past the image's {} blocks",
                self.header.blocks_in_image
            ))
            .with_field("bmap")
            .with_offset(u64::from(self.header.offset_bmap) + 4 * idx as u64));
        }
        Ok(Some(u64::from(self.header.offset_data) + u64::from(e) * self.block_size()))
    }

    fn for_blocks(
        &self,
        off: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let bs = self.block_size();
        let mut pos = 0u64;
        while pos < len {
            let cur = off + pos;
            let within = cur % bs;
            let n = (bs - within).min(len - pos);
            f((cur / bs) as usize, within, pos as usize..(pos + n) as usize)?;
            pos += n;
        }
        Ok(())
    }

    /// Allocates block `idx` with `data` at `within` (zeros around it):
    /// block, header, sync, block map entry.
    fn allocate(&self, idx: usize, within: u64, data: &[u8]) -> Result<()> {
        let mut next = self.alloc.lock();
        if let Some(host) = self.block_at(idx)? {
            drop(next);
            return self.file.write_at(data, host + within);
        }
        let n = *next;
        if n >= self.header.blocks_in_image {
            return Err(Error::corrupt(format!(
                "no room for another block: {n} of the image's {} blocks are allocated",
                self.header.blocks_in_image
            ))
            .with_field("blocks_allocated"));
        }
        let host = u64::from(self.header.offset_data) + u64::from(n) * self.block_size();
        let mut block = vec![0u8; self.block_size() as usize];
        block[within as usize..within as usize + data.len()].copy_from_slice(data);
        self.file.write_at(&block, host)?;
        let mut count = [0u8; 4];
        LittleEndian::write_u32(&mut count, n + 1);
        self.file.write_at(&count, 0x184)?;
        self.file.sync()?;
        let mut e = [0u8; 4];
        LittleEndian::write_u32(&mut e, n);
        self.file.write_at(&e, u64::from(self.header.offset_bmap) + 4 * idx as u64)?;
        if let Some(slot) = self.bmap.write().get_mut(idx) {
            *slot = n;
        }
        *next = n + 1;
        Ok(())
    }

    fn write_inner(&self, buf: &[u8], offset: u64, zero: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("write"));
        }
        check_request(offset, buf.len() as u64, self.size)?;
        self.for_blocks(offset, buf.len() as u64, |idx, within, r| match self.block_at(idx)? {
            Some(host) => self.file.write_at(&buf[r], host + within),
            None if zero => Ok(()),
            None => self.allocate(idx, within, &buf[r]),
        })
    }
}

impl BlockDevice for Vdi {
    fn info(&self) -> DeviceInfo {
        let mut i = DeviceInfo::new(Format::Vdi, self.size, self.read_only);
        i.cluster_size = Some(self.block_size());
        i.path = self.path.clone();
        i
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size)?;
        let _active = self.handoff.enter("vdi")?;
        self.for_blocks(offset, buf.len() as u64, |idx, within, r| match self.block_at(idx)? {
            Some(host) => self.file.read_at(&mut buf[r], host + within),
            None => {
                buf[r].fill(0);
                Ok(())
            }
        })
        .map_err(|e| self.err(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _active = self.handoff.enter("vdi")?;
        self.write_inner(buf, offset, false).map_err(|e| self.err(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _mode: ZeroMode) -> Result<()> {
        check_request(offset, len, self.size)?;
        let _active = self.handoff.enter("vdi")?;
        crate::storage::write_zeros_with(offset, len, |buf, at| self.write_inner(buf, at, true))
            .map_err(|e| self.err(e))
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let len = max_len.min(self.size.saturating_sub(offset));
        check_request(offset, len, self.size)?;
        let _active = self.handoff.enter("vdi")?;
        let bs = self.block_size();
        let idx = (offset / bs) as usize;
        let within = offset % bs;
        let first = self.block_at(idx).map_err(|e| self.err(e))?;
        let mut n = (bs - within).min(len);
        let mut i = idx + 1;
        // Merge following blocks of the same kind (contiguous on the host
        // for data).
        while n < len {
            let next = self.block_at(i).map_err(|e| self.err(e))?;
            let same = match (first, next) {
                (None, None) => true,
                (Some(h), Some(g)) => g == h + (n + within),
                _ => false,
            };
            if !same {
                break;
            }
            n = (n + bs).min(len);
            i += 1;
        }
        let kind = match first {
            Some(h) => ExtentKind::Data { host_offset: Some(h + within) },
            None => ExtentKind::Zero { host_offset: None },
        };
        Ok(Extent { offset, length: n, kind, depth: 0, encrypted: false })
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

    /// Every write leaves the image consistent (see the module docs), so
    /// inactivating syncs, as a close does.
    fn inactivate(&self) -> Result<()> {
        self.handoff.inactivate(&*self.file, self.read_only, || self.flush())
    }

    fn activate(&self) -> Result<()> {
        self.handoff.activate(&*self.file, self.read_only, "vdi", || self.reload()).map_err(|e| self.err(e))
    }

    fn is_inactive(&self) -> bool {
        self.handoff.is_inactive()
    }

    fn refresh(&self) -> Result<()> {
        self.handoff.refresh(self.read_only, "vdi", || self.reload()).map_err(|e| self.err(e))
    }
}

impl Drop for Vdi {
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

    #[test]
    fn data_is_page_aligned() {
        for mib in [1u64, 200, 5000] {
            let st = Arc::new(MemStorage::new());
            let v = Vdi::create(st.clone(), mib << 20, &VdiCreateOptions::default()).unwrap();
            assert!(v.header().offset_data.is_multiple_of(4096));
            assert_eq!(st.len().unwrap(), u64::from(v.header().offset_data));
        }
    }

    #[test]
    fn model_static_and_dynamic() {
        for static_image in [false, true] {
            let st = Arc::new(MemStorage::new());
            let v = Vdi::create(st.clone(), 5 << 20, &VdiCreateOptions { static_image, ..Default::default() }).unwrap();
            let size = v.size();
            let uuid = v.header().uuid_image;
            let mut model = vec![0u8; size as usize];
            let mut x = 99u64;
            for _ in 0..50 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let off = (x >> 20) % size;
                let len = ((x >> 8) % 70000).min(size - off) as usize;
                let data: Vec<u8> = (0..len).map(|i| (x as usize + i) as u8 | 1).collect();
                v.write_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            v.close().unwrap();
            let v = Vdi::open(st, VdiOptions::default()).unwrap();
            assert_eq!(v.header().uuid_image, uuid);
            let mut got = vec![0u8; size as usize];
            v.read_at(&mut got, 0).unwrap();
            assert!(got == model);
            assert_eq!(v.check().unwrap().corruptions, 0);
        }
    }
}
