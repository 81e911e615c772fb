//! `vol-upload` and `vol-download`: the bytes of a volume *file* to and
//! from a stream, as libvirt streams them (no image format involved), with
//! holes kept when asked.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};

use super::busy::BusyGuard;
use super::headers::probe_file;
use super::records::Record;
use super::volinfo::FileStat;
use super::volume::{file_md, Volume, CHUNK};
use crate::convert::Progress;
use crate::device::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::lock::{Access, LockMode};
use crate::storage::{FileStorage, Storage};

/// Byte range and sparseness of `vol-upload`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadOptions {
    /// Where in the volume file writing starts.
    pub offset: u64,
    /// At most this many bytes (`None`: until the source ends).
    pub length: Option<u64>,
    /// Keep holes: all-zero blocks are punched (or skipped past the end of
    /// the file) instead of written.
    pub sparse: bool,
}

/// Byte range and sparseness of `vol-download`.
pub type DownloadOptions = UploadOptions;

const GRANULE: usize = 64 << 10;

impl Volume {
    /// `vol-upload`: writes bytes from `src` into the volume *file* at
    /// `opts.offset` (as libvirt does: a qcow2 image uploaded into a volume
    /// makes it a qcow2 volume). With `sparse`, all-zero blocks become
    /// holes. The file is opened without truncation; a raw volume's range
    /// must lie within its capacity when a length is given. Afterwards the
    /// volume is re-probed and its recorded format follows the upload (the
    /// host chose the content, not a guest). Returns the bytes copied.
    pub fn upload(&self, src: &mut dyn Read, opts: &UploadOptions, progress: Option<Progress<'_>>) -> Result<u64> {
        let d = self.dir()?;
        let path = d.join(self.name());
        if opts.offset > i64::MAX as u64 || opts.length.is_some_and(|l| l > i64::MAX as u64 - opts.offset) {
            return Err(Error::invalid_argument("upload offset or length is too large").with_path(&path));
        }
        let (st, _busy) = self.open_for_change(&d)?;
        let size = st.len()?;
        if let Some(l) = opts.length {
            let recorded = self.pool().records()?.format_of(self.name(), &FileStat::of(&file_md(&st, &path)?));
            let end = opts.offset.checked_add(l).ok_or_else(|| Error::invalid_argument("offset + length overflows"))?;
            if recorded == Some(Format::Raw) && end > size {
                return Err(Error::invalid_argument(format!(
                    "upload of {l} bytes at offset {} goes past the volume's capacity of {size} bytes",
                    opts.offset
                ))
                .with_path(&path));
            }
        }
        let total = opts.length.unwrap_or(0);
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0u64;
        loop {
            let want = match opts.length {
                Some(l) => (l - done).min(CHUNK as u64) as usize,
                None => CHUNK,
            };
            if want == 0 {
                break;
            }
            let n = read_full(src, &mut buf[..want]).map_err(|e| Error::io("cannot read the upload source", e))?;
            if n == 0 {
                break;
            }
            let at = opts.offset + done;
            write_maybe_sparse(&st, &buf[..n], at, opts.sparse)?;
            done += n as u64;
            if let Some(p) = progress {
                p(done, total.max(done));
            }
            if n < want {
                break;
            }
        }
        let end = opts.offset + done;
        if st.len()? < end {
            st.set_len(end)?;
        }
        st.sync()?;
        let md = file_md(&st, &path)?;
        drop(_busy);
        drop(st);
        let f = d.open_file(self.name(), false)?;
        let facts = probe_file(f, &path);
        if let Some(fmt) = facts.format {
            self.pool().record(self.name(), Some(Record::of(&md, fmt)))?;
        }
        self.pool().forget_cached(self.name());
        Ok(done)
    }

    /// `vol-download`: writes the volume *file*'s bytes in
    /// `[offset, offset + length)` to `dst`. The download takes no lock that
    /// stops a running VM (like `cp`; the copy of a disk in use may be
    /// inconsistent). Returns the bytes copied.
    pub fn download(&self, dst: &mut dyn Write, opts: &DownloadOptions, progress: Option<Progress<'_>>) -> Result<u64> {
        self.download_inner(&mut |buf, _at| dst.write_all(buf), opts, progress, false)
    }

    /// [`download`](Self::download) into a file at its offset 0, keeping
    /// holes (holes of the volume, and all-zero blocks with `sparse`, are
    /// not written; the file's length is set at the end).
    pub fn download_to_file(&self, dst: &File, opts: &DownloadOptions, progress: Option<Progress<'_>>) -> Result<u64> {
        let n = self.download_inner(&mut |buf, at| dst.write_all_at(buf, at), opts, progress, true)?;
        let len = dst.metadata().map_err(|e| Error::io("cannot stat the download target", e))?.len();
        if len < n {
            dst.set_len(n).map_err(|e| Error::io("cannot set the download length", e))?;
        }
        Ok(n)
    }

    fn download_inner(
        &self,
        out: &mut dyn FnMut(&[u8], u64) -> std::io::Result<()>,
        opts: &DownloadOptions,
        progress: Option<Progress<'_>>,
        skip_holes: bool,
    ) -> Result<u64> {
        let d = self.dir()?;
        let path = d.join(self.name());
        let f = d.open_file(self.name(), false)?;
        let md = f.metadata().map_err(|e| Error::io("cannot stat", e).with_path(&path))?;
        let _busy = BusyGuard::new((md.dev(), md.ino()));
        let mut st = FileStorage::from_file(f, &path, true)?;
        st.lock_as(LockMode::ForceShare, Access::ReadOnly)?;
        let size = st.len()?;
        if opts.offset > size {
            return Err(Error::invalid_argument(format!(
                "offset {} is past the end of the volume ({size} bytes)",
                opts.offset
            ))
            .with_path(&path));
        }
        let end = match opts.length {
            Some(l) if l > 0 => opts.offset.saturating_add(l).min(size),
            _ => size,
        };
        let total = end - opts.offset;
        let mut buf = vec![0u8; CHUNK];
        let mut pos = opts.offset;
        while pos < end {
            let (data, run_end) = if skip_holes { st.region(pos)? } else { (true, end) };
            let run_end = run_end.clamp(pos + 1, end);
            if !data {
                pos = run_end;
                continue;
            }
            while pos < run_end {
                let n = (run_end - pos).min(CHUNK as u64) as usize;
                st.read_at(&mut buf[..n], pos)?;
                let rel = pos - opts.offset;
                if skip_holes && opts.sparse {
                    for (i, g) in buf[..n].chunks(GRANULE).enumerate() {
                        if g.iter().any(|&b| b != 0) {
                            out(g, rel + (i * GRANULE) as u64)
                                .map_err(|e| Error::io("cannot write the download", e))?;
                        }
                    }
                } else {
                    out(&buf[..n], rel).map_err(|e| Error::io("cannot write the download", e))?;
                }
                pos += n as u64;
                if let Some(p) = progress {
                    p(pos - opts.offset, total);
                }
            }
        }
        Ok(total)
    }
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes `data` at `at`; with `sparse`, all-zero granules are punched
/// (inside the file) or skipped (past its end) instead.
fn write_maybe_sparse(st: &FileStorage, data: &[u8], at: u64, sparse: bool) -> Result<()> {
    if !sparse {
        return st.write_at(data, at);
    }
    let len = st.len()?;
    for (i, g) in data.chunks(GRANULE).enumerate() {
        let off = at + (i * GRANULE) as u64;
        if g.iter().any(|&b| b != 0) {
            st.write_at(g, off)?;
        } else if off < len {
            let n = (g.len() as u64).min(len - off);
            match st.punch_hole(off, n) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Unsupported => st.write_at(&g[..n as usize], off)?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
