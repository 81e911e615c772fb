//! Copying one [`BlockDevice`] into another, keeping holes.
//!
//! The source's [`map`](BlockDevice::map) tells which ranges read as zeros;
//! those are skipped (or zeroed explicitly when the destination is not known
//! to be zero), and data ranges are scanned in small granules so zero blocks
//! inside them become holes too. The work is split into units that several
//! threads copy at once, so decompression and compression use every core.
//!
//! A destination with a backing image does not read as zeros: there a range
//! is skipped only where the destination already reads the same bytes as
//! the source (what its backing provides), and every other range is
//! written, zeros included, so the guest sees exactly the source.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::device::{BlockDevice, ZeroMode};
use crate::error::{Error, Result};

/// Progress callback: (bytes done, total bytes).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// How [`convert`] copies.
#[derive(Clone, Copy)]
pub struct ConvertOptions<'a> {
    /// Worker threads (at least 1).
    pub threads: usize,
    /// Bytes per work unit (rounded to the destination's cluster size by
    /// the caller where it matters, e.g. compressed output).
    pub unit: u64,
    /// Zero detection granule inside data ranges: all-zero granules are not
    /// written. 0 turns detection off and writes every byte, holes of the
    /// source included (`qemu-img convert -S 0`), so the destination is
    /// fully allocated.
    pub sparse_granule: u64,
    /// The destination already reads as zeros everywhere (freshly created),
    /// so zero ranges need no write at all. Ignored when the destination
    /// has a backing image: it is then compared, not assumed.
    pub dst_is_zeroed: bool,
    /// Write whole units with [`BlockDevice::write_compressed`] (the unit
    /// must be a multiple of the destination's cluster size).
    pub compress: bool,
    /// Called after each unit.
    pub progress: Option<Progress<'a>>,
}

impl std::fmt::Debug for ConvertOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("threads", &self.threads)
            .field("unit", &self.unit)
            .field("sparse_granule", &self.sparse_granule)
            .field("dst_is_zeroed", &self.dst_is_zeroed)
            .field("compress", &self.compress)
            .finish()
    }
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()).min(8),
            unit: 2 << 20,
            sparse_granule: 4096,
            dst_is_zeroed: true,
            compress: false,
            progress: None,
        }
    }
}

/// Copies the guest content of `src` into `dst` (which must be at least as
/// large). Returns the number of bytes written as data.
pub fn convert(src: &dyn BlockDevice, dst: &dyn BlockDevice, opts: &ConvertOptions<'_>) -> Result<u64> {
    let size = src.size();
    if dst.size() < size {
        return Err(Error::invalid_argument(format!(
            "destination of {} bytes is smaller than the source of {size} bytes",
            dst.size()
        )));
    }
    if opts.unit == 0 {
        return Err(Error::invalid_argument("work unit of 0 bytes"));
    }
    // A destination over a backing image reads what the backing holds.
    let through = dst.backing().is_some() || dst.info().backing_file.is_some();
    let granule = if opts.compress { dst.info().cluster_size.unwrap_or(65536) } else { opts.sparse_granule };
    let units = size.div_ceil(opts.unit);
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let threads = opts.threads.max(1).min(units.max(1) as usize);
    let result = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    // Page aligned: the kernel copies to and from it faster.
                    let mut aligned = crate::storage::direct::Aligned::new(opts.unit as usize);
                    let buf = aligned.as_mut_slice();
                    let mut current =
                        crate::storage::direct::Aligned::new(if through { opts.unit as usize } else { 0 });
                    let cur = current.as_mut_slice();
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let u = next.fetch_add(1, Ordering::Relaxed);
                        if u >= units {
                            return Ok(());
                        }
                        let start = u * opts.unit;
                        let len = opts.unit.min(size - start);
                        let n = len as usize;
                        let r = if through {
                            copy_unit_through(src, dst, start, &mut buf[..n], &mut cur[..n], granule, opts)
                        } else {
                            copy_unit(src, dst, start, len, &mut buf[..n], opts)
                        };
                        match r {
                            Ok(w) => {
                                written.fetch_add(w, Ordering::Relaxed);
                                let d = done.fetch_add(len, Ordering::Relaxed) + len;
                                if let Some(p) = opts.progress {
                                    p(d, size);
                                }
                            }
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        let mut first_err = None;
        for w in workers {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::internal("a convert worker thread panicked"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    result?;
    Ok(written.load(Ordering::Relaxed))
}

fn copy_unit(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    start: u64,
    len: u64,
    buf: &mut [u8],
    opts: &ConvertOptions<'_>,
) -> Result<u64> {
    // Which parts of the unit hold data?
    let mut any_data = false;
    let mut pos = start;
    let end = start + len;
    let mut data_ranges: Vec<(u64, u64)> = Vec::new();
    while pos < end {
        let e = src.map(pos, end - pos)?;
        if e.length == 0 {
            return Err(Error::internal(format!("map returned an empty extent at {pos}")));
        }
        let n = e.length.min(end - pos);
        if !e.reads_as_zero() {
            any_data = true;
            match data_ranges.last_mut() {
                Some(last) if last.1 == pos => last.1 = pos + n,
                _ => data_ranges.push((pos, pos + n)),
            }
        }
        pos += n;
    }
    if opts.sparse_granule == 0 && !opts.compress {
        // `-S 0`: every byte is written, so every byte is allocated.
        src.read_at(buf, start)?;
        dst.write_at(buf, start)?;
        return Ok(len);
    }
    if opts.compress {
        // A target that may hold data (`-n`) gets zeros where the source
        // has none; a fresh one already reads zeros there.
        let zero = || -> Result<u64> {
            if !opts.dst_is_zeroed {
                dst.write_zeroes(start, len, ZeroMode::MayUnmap)?;
            }
            Ok(0)
        };
        if !any_data {
            return zero();
        }
        src.read_at(buf, start)?;
        if buf.iter().all(|&b| b == 0) {
            return zero();
        }
        dst.write_compressed(buf, start)?;
        return Ok(len);
    }
    if !opts.dst_is_zeroed {
        // Zero everything that is not data, then copy the data.
        let mut p = start;
        for &(a, b) in &data_ranges {
            if a > p {
                dst.write_zeroes(p, a - p, ZeroMode::MayUnmap)?;
            }
            p = b;
        }
        if p < end {
            dst.write_zeroes(p, end - p, ZeroMode::MayUnmap)?;
        }
    }
    let mut written = 0;
    for (a, b) in data_ranges {
        let chunk = &mut buf[(a - start) as usize..(b - start) as usize];
        src.read_at(chunk, a)?;
        written += write_sparse(dst, chunk, a, opts)?;
    }
    Ok(written)
}

/// Fills `buf` with the source's bytes at `start`, reading only the ranges
/// that do not read as zeros.
fn read_source(src: &dyn BlockDevice, start: u64, buf: &mut [u8]) -> Result<()> {
    let end = start + buf.len() as u64;
    let mut pos = start;
    while pos < end {
        let e = src.map(pos, end - pos)?;
        if e.length == 0 {
            return Err(Error::internal(format!("map returned an empty extent at {pos}")));
        }
        let n = e.length.min(end - pos);
        let chunk = &mut buf[(pos - start) as usize..(pos - start + n) as usize];
        if e.reads_as_zero() {
            chunk.fill(0);
        } else {
            src.read_at(chunk, pos)?;
        }
        pos += n;
    }
    Ok(())
}

/// [`copy_unit`] for a destination with a backing image: reads what the
/// destination shows now and writes, in granules, every range where that
/// differs from the source (zeros as zeros); equal ranges stay unallocated.
/// A granule of 0 (`-S 0`) writes everything.
fn copy_unit_through(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    start: u64,
    buf: &mut [u8],
    cur: &mut [u8],
    granule: u64,
    opts: &ConvertOptions<'_>,
) -> Result<u64> {
    read_source(src, start, buf)?;
    if granule == 0 {
        dst.write_at(buf, start)?;
        return Ok(buf.len() as u64);
    }
    dst.read_at(cur, start)?;
    let mut written = 0u64;
    let mut i = 0usize;
    while i < buf.len() {
        // Granules aligned to the guest offset; a run of differing granules
        // that are all zero, or all not, is written at once.
        let gend = |i: usize| -> usize {
            let abs = start + i as u64;
            let next = (abs / granule + 1) * granule;
            ((next - start) as usize).min(buf.len())
        };
        let e = gend(i);
        if buf[i..e] == cur[i..e] {
            i = e;
            continue;
        }
        let zero = buf[i..e].iter().all(|&b| b == 0);
        let mut j = e;
        while j < buf.len() {
            let f = gend(j);
            if buf[j..f] == cur[j..f] || buf[j..f].iter().all(|&b| b == 0) != zero {
                break;
            }
            j = f;
        }
        let at = start + i as u64;
        if zero {
            dst.write_zeroes(at, (j - i) as u64, ZeroMode::MayUnmap)?;
        } else if opts.compress {
            dst.write_compressed(&buf[i..j], at)?;
            written += (j - i) as u64;
        } else {
            dst.write_at(&buf[i..j], at)?;
            written += (j - i) as u64;
        }
        i = j;
    }
    Ok(written)
}

/// Writes `data` at `offset`, skipping all-zero granules (which are zeroed
/// explicitly unless the destination is known to read as zeros).
fn write_sparse(dst: &dyn BlockDevice, data: &[u8], offset: u64, opts: &ConvertOptions<'_>) -> Result<u64> {
    let g = opts.sparse_granule as usize;
    if g == 0 {
        dst.write_at(data, offset)?;
        return Ok(data.len() as u64);
    }
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut zero_start: Option<usize> = None;
    let mut i = 0usize;
    let flush_zero = |zs: usize, ze: usize| -> Result<()> {
        if !opts.dst_is_zeroed {
            dst.write_zeroes(offset + zs as u64, (ze - zs) as u64, ZeroMode::MayUnmap)?;
        }
        Ok(())
    };
    while i < data.len() {
        // Granules are aligned to the guest offset.
        let gend = (((offset as usize + i) / g + 1) * g - offset as usize).min(data.len());
        let zero = data[i..gend].iter().all(|&b| b == 0);
        if zero {
            if let Some(rs) = run_start.take() {
                dst.write_at(&data[rs..i], offset + rs as u64)?;
                written += (i - rs) as u64;
            }
            zero_start.get_or_insert(i);
        } else {
            if let Some(zs) = zero_start.take() {
                flush_zero(zs, i)?;
            }
            run_start.get_or_insert(i);
        }
        i = gend;
    }
    if let Some(rs) = run_start {
        dst.write_at(&data[rs..], offset + rs as u64)?;
        written += (data.len() - rs) as u64;
    }
    if let Some(zs) = zero_start {
        flush_zero(zs, data.len())?;
    }
    Ok(written)
}

/// How [`commit_into_with`] copies.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitOptions {
    /// Copy at most this many bytes per second (`qemu-img commit -r`).
    pub rate: Option<u64>,
}

/// Writes into `base` everything `top` holds itself (map depth 0: data
/// as data, zeros as zeros), at the same offsets: `qemu-img commit`'s copy.
/// `base` is grown first if it is smaller. Returns the bytes copied as data.
/// Flushes `base` before returning, so a caller that then empties `top`
/// never leaves the guest without its data.
pub fn commit_into(top: &dyn BlockDevice, base: &dyn BlockDevice) -> Result<u64> {
    commit_into_with(top, base, &CommitOptions::default())
}

/// [`commit_into`] with options.
pub fn commit_into_with(top: &dyn BlockDevice, base: &dyn BlockDevice, opts: &CommitOptions) -> Result<u64> {
    let size = top.size();
    if base.size() < size {
        base.resize(size)?;
    }
    if opts.rate == Some(0) {
        return Err(Error::invalid_argument("a rate limit of 0 bytes per second"));
    }
    const PIECE: u64 = 4 << 20;
    let started = std::time::Instant::now();
    let mut buf = crate::storage::Aligned::new(PIECE as usize);
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let e = top.map(pos, size - pos)?;
        let len = e.length.max(1).min(size - pos);
        if e.depth == 0 && e.kind != crate::device::ExtentKind::Unallocated {
            if e.reads_as_zero() {
                base.write_zeroes(pos, len, ZeroMode::MayUnmap)?;
            } else {
                let mut at = pos;
                while at < pos + len {
                    let n = PIECE.min(pos + len - at);
                    let b = &mut buf.as_mut_slice()[..n as usize];
                    top.read_at(b, at)?;
                    base.write_at(b, at)?;
                    at += n;
                    copied += n;
                    if let Some(r) = opts.rate {
                        let due = std::time::Duration::from_secs_f64(copied as f64 / r as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
            }
        }
        pos += len;
    }
    base.flush()?;
    Ok(copied)
}

/// Where two devices first differ: `Ok(None)` when the guest contents are
/// equal. A larger device must read as zeros past the smaller one's end,
/// unless `strict` (then different sizes are a difference at the smaller
/// size).
pub fn compare(a: &dyn BlockDevice, b: &dyn BlockDevice, strict: bool) -> Result<Option<u64>> {
    let (sa, sb) = (a.size(), b.size());
    if strict && sa != sb {
        return Ok(Some(sa.min(sb)));
    }
    let common = sa.min(sb);
    const CHUNK: u64 = 1 << 20;
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < common {
        let ea = a.map(pos, CHUNK.min(common - pos))?;
        let eb = b.map(pos, ea.length.max(1))?;
        let n = ea.length.min(eb.length).max(1).min(common - pos);
        if ea.reads_as_zero() && eb.reads_as_zero() {
            pos += n;
            continue;
        }
        let n = n.min(CHUNK) as usize;
        a.read_at(&mut ba[..n], pos)?;
        b.read_at(&mut bb[..n], pos)?;
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap_or(0);
            return Ok(Some(pos + i as u64));
        }
        pos += n as u64;
    }
    let longer: &dyn BlockDevice = if sa > sb { a } else { b };
    let mut pos = common;
    let end = sa.max(sb);
    while pos < end {
        let e = longer.map(pos, CHUNK.min(end - pos))?;
        let n = e.length.max(1).min(end - pos);
        if !e.reads_as_zero() {
            let n = n.min(CHUNK) as usize;
            longer.read_at(&mut ba[..n], pos)?;
            if let Some(i) = ba[..n].iter().position(|&x| x != 0) {
                return Ok(Some(pos + i as u64));
            }
            pos += n as u64;
            continue;
        }
        pos += n;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::Raw;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    #[test]
    fn copies_and_compares() {
        let a = Raw::create(Arc::new(MemStorage::new()), 5 << 20).unwrap();
        a.write_at(&[7u8; 10000], 12345).unwrap();
        a.write_at(&[9u8; 3], (5 << 20) - 3).unwrap();
        let b = Raw::create(Arc::new(MemStorage::new()), 5 << 20).unwrap();
        let opts = ConvertOptions { unit: 1 << 20, ..Default::default() };
        let w = convert(&a, &b, &opts).unwrap();
        assert!((10003..20000).contains(&w), "{w}");
        assert_eq!(compare(&a, &b, false).unwrap(), None);
        b.write_at(&[1], 4 << 20).unwrap();
        assert_eq!(compare(&a, &b, false).unwrap(), Some(4 << 20));
        let c = Raw::create(Arc::new(MemStorage::new()), 6 << 20).unwrap();
        convert(&a, &c, &opts).unwrap();
        assert_eq!(compare(&a, &c, false).unwrap(), None);
        assert_eq!(compare(&a, &c, true).unwrap(), Some(5 << 20));
        c.write_at(&[1], (6 << 20) - 1).unwrap();
        assert_eq!(compare(&a, &c, false).unwrap(), Some((6 << 20) - 1));
    }
}
