//! `open_vhdx`: opens hostile bytes as a VHDX image.
//!
//! A VHDX image is at least 3 MiB of mostly zeros (the log, BAT and metadata
//! regions start at 1 MiB boundaries), so an input may be given as runs:
//! `VHDXRUNS` followed by `(u32 offset, u32 length, bytes)` records, the
//! gaps reading as zeros (the seed corpus is stored that way); any other
//! input is the image itself.

use super::*;
use crate::vhdx::{Vhdx, VhdxOptions};

/// Magic of the run encoding.
pub const RUNS_MAGIC: &[u8; 8] = b"VHDXRUNS";
/// Largest image the run encoding may describe.
const MAX_RUNS_IMAGE: u64 = 64 << 20;

/// Decodes an `open_vhdx` input into image bytes.
pub fn vhdx_image(data: &[u8]) -> Vec<u8> {
    let Some(mut rest) = data.strip_prefix(RUNS_MAGIC.as_slice()) else {
        return data.to_vec();
    };
    let mut img = Vec::new();
    while rest.len() >= 8 {
        let off = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        rest = &rest[8..];
        let len = len.min(rest.len());
        let end = off + len as u64;
        if end > MAX_RUNS_IMAGE {
            break;
        }
        if img.len() < end as usize {
            img.resize(end as usize, 0);
        }
        img[off as usize..end as usize].copy_from_slice(&rest[..len]);
        rest = &rest[len..];
    }
    img
}

/// Encodes an image as runs of its non-zero 4 KiB sectors.
pub fn vhdx_runs(img: &[u8]) -> Vec<u8> {
    let mut out = RUNS_MAGIC.to_vec();
    let mut i = 0;
    while i < img.len() {
        let end = (i + 4096).min(img.len());
        if img[i..end].iter().any(|&b| b != 0) || end == img.len() {
            out.extend_from_slice(&(i as u32).to_le_bytes());
            out.extend_from_slice(&((end - i) as u32).to_le_bytes());
            out.extend_from_slice(&img[i..end]);
        }
        i = end;
    }
    out
}

/// `open_vhdx`: opens the image read-only (a log applied in memory; a
/// differencing image gets a pattern device as its parent), walks it and
/// checks it; then opens a copy read-write (replaying any log), writes,
/// zeroes and flushes, and requires the result to reopen and read back
/// what was written.
pub fn open_vhdx(data: &[u8]) {
    let img = vhdx_image(data);
    let len = img.len() as u64;
    let parent = || Some(pattern_device(1 << 20, 0x44));
    let ro: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()).read_only());
    let opts = VhdxOptions { read_only: true, parent: parent(), for_check: true };
    if let Ok(v) = no_internal("vhdx open", Vhdx::open(ro, opts)) {
        let _ = v.info();
        walk(&v);
        let _ = v.check();
    }
    let rw = Arc::new(MemStorage::from_vec(img).limit(len + (32 << 20)));
    let opts = VhdxOptions { read_only: false, parent: parent(), for_check: false };
    let Ok(v) = no_internal("vhdx open rw", Vhdx::open(rw.clone(), opts.clone())) else {
        return;
    };
    let size = v.size();
    let seed = data.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    let mut buf = vec![0u8; 3000];
    let mut last: Option<(u64, Vec<u8>)> = None;
    for (i, at) in [0, size / 2, size.saturating_sub(1500)].iter().enumerate() {
        let at = (*at).min(size);
        let n = (size - at).min(buf.len() as u64) as usize;
        pattern(seed.wrapping_add(i as u8), at, &mut buf[..n]);
        if no_internal("vhdx write", v.write_at(&buf[..n], at)).is_ok() && n > 0 {
            last = Some((at, buf[..n].to_vec()));
        }
    }
    if size > 4 {
        let _ = no_internal("vhdx write_zeroes", v.write_zeroes(1, size.min(1 << 20) - 2, ZeroMode::MayUnmap));
    }
    let flushed = no_internal("vhdx flush", v.flush()).is_ok();
    drop(v);
    let Some((at, want)) = last else { return };
    if !flushed || at < size.min(1 << 20) {
        return;
    }
    let v = Vhdx::open(rw, opts).unwrap_or_else(|e| panic!("a VHDX vdisk wrote and flushed does not reopen: {e}"));
    let mut got = vec![0u8; want.len()];
    if v.read_at(&mut got, at).is_ok() {
        assert_eq!(got, want, "a flushed write reads back differently after reopening");
    }
}
