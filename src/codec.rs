//! Compression shared by the formats: deflate (raw, or in a zlib stream)
//! and zstd, and the small cache of recently decompressed clusters.
//!
//! qcow2 stores compressed clusters as raw deflate (RFC 1951, QEMU's
//! "zlib", written with a 4 KiB window) or zstd frames; vmdk stores
//! compressed grains as zlib streams (RFC 1950). Every decompression here
//! writes into a fixed buffer of one cluster (or grain) that the caller
//! sized from the validated geometry, and reads an input whose length the
//! caller bounded by the format's descriptor: a hostile image can neither
//! make it allocate nor loop. Compression output is bounded by the caller's
//! `max_len` in the same way.
//!
//! Public only so that tests can build hostile images with the same
//! encoder; not a supported API.

use std::cell::RefCell;
use std::sync::Arc;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use parking_lot::Mutex;
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::error::{Error, Result};

/// A compressed-data encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Raw deflate (RFC 1951, no wrapper): qcow2's "zlib". Compression
    /// uses a 4 KiB window, as QEMU writes it.
    Deflate,
    /// Deflate in a zlib stream (RFC 1950: two-byte header, Adler-32
    /// trailer): vmdk grains.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

thread_local! {
    /// One inflater per thread, reset between clusters (setting one up
    /// allocates its window and tables).
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
    /// One zstd decoding context per thread.
    static ZSTD: RefCell<Option<Decoder<'static>>> = const { RefCell::new(None) };
}

/// Decompresses `input` into `out`, which must come out exactly full: a
/// qcow2 cluster. Input left over once `out` is full is ignored, as QEMU
/// does (the descriptor's sector count rounds the length up). `what` names
/// the unit in messages ("cluster").
pub fn decompress_exact(codec: Codec, input: &[u8], out: &mut [u8], what: &str) -> Result<()> {
    match codec {
        Codec::Deflate | Codec::Zlib => with_inflater(codec == Codec::Zlib, |d| {
            let status = d.decompress(input, out, FlushDecompress::Finish);
            let produced = usize::try_from(d.total_out()).unwrap_or(usize::MAX);
            match status {
                Ok(Status::StreamEnd | Status::BufError | Status::Ok) if produced == out.len() => Ok(()),
                Ok(_) => Err(Error::corrupt(format!(
                    "compressed {what} inflates to {produced} bytes instead of {}",
                    out.len()
                ))),
                Err(e) => Err(Error::corrupt(format!("compressed {what} does not inflate: {e}"))),
            }
        }),
        Codec::Zstd => with_zstd(|dec| unzstd_exact(dec, input, out, what)),
    }
}

/// Decompresses one complete stream from `input` into `out`; the stream
/// must end within `out` (one grain). Returns the bytes produced; input
/// after the end of the stream is ignored. `what` names the unit in
/// messages ("grain").
pub fn decompress_stream(codec: Codec, input: &[u8], out: &mut [u8], what: &str) -> Result<usize> {
    match codec {
        Codec::Deflate | Codec::Zlib => with_inflater(codec == Codec::Zlib, |d| {
            let status = d.decompress(input, out, FlushDecompress::Finish);
            let produced = usize::try_from(d.total_out()).unwrap_or(usize::MAX);
            match status {
                Ok(Status::StreamEnd) => Ok(produced),
                Ok(_) if produced >= out.len() => Err(Error::corrupt(format!(
                    "compressed {what} inflates to more than one {what} ({} bytes)",
                    out.len()
                ))),
                Ok(_) => Err(Error::corrupt(format!(
                    "compressed {what} is truncated (inflated {produced} bytes before the input ended)"
                ))),
                Err(e) => Err(Error::corrupt(format!("compressed {what} does not inflate: {e}"))),
            }
        }),
        Codec::Zstd => Err(Error::internal("zstd streams of unknown length are not decoded")),
    }
}

/// Runs `f` with this thread's inflater, reset for a new stream with or
/// without the zlib wrapper.
fn with_inflater<T>(zlib_header: bool, f: impl FnOnce(&mut Decompress) -> Result<T>) -> Result<T> {
    INFLATER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = slot.get_or_insert_with(|| Decompress::new(zlib_header));
        d.reset(zlib_header);
        f(d)
    })
}

/// Runs `f` with this thread's zstd decoder, reset for a new frame.
fn with_zstd<T>(f: impl FnOnce(&mut Decoder<'static>) -> Result<T>) -> Result<T> {
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Decoder::new().map_err(|e| Error::internal(format!("zstd decoder: {e}")))?);
        }
        let dec = slot.as_mut().ok_or_else(|| Error::internal("zstd decoder missing"))?;
        dec.reinit().map_err(|e| Error::internal(format!("zstd decoder reset: {e}")))?;
        f(dec)
    })
}

fn unzstd_exact(dec: &mut Decoder<'static>, input: &[u8], out: &mut [u8], what: &str) -> Result<()> {
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    // Each call makes progress on input or output; stop when the output is
    // full or the input is used up without progress.
    loop {
        let before_in = inb.pos();
        let before_out = outb.pos();
        dec.run(&mut inb, &mut outb)
            .map_err(|e| Error::corrupt(format!("compressed {what} does not decode as zstd: {e}")))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if inb.pos() == input.len() || (inb.pos() == before_in && outb.pos() == before_out) {
            return Err(Error::corrupt(format!(
                "zstd compressed {what} decodes to {} bytes instead of {}",
                outb.pos(),
                outb.capacity()
            )));
        }
    }
}

/// The most bytes deflate (either wrapper) can turn `len` bytes into, with
/// room to spare: stored blocks add 5 bytes per 64 KiB, the zlib wrapper 6.
pub fn deflate_bound(len: usize) -> usize {
    len.saturating_add(len / 64).saturating_add(128)
}

/// Compresses `input` into at most `max_len` bytes. Returns `None` when
/// the result would not fit (the caller then stores the data
/// uncompressed, or, with [`deflate_bound`], has a bug).
pub fn compress(codec: Codec, input: &[u8], max_len: usize) -> Result<Option<Vec<u8>>> {
    let mut out = vec![0u8; max_len];
    match codec {
        Codec::Deflate | Codec::Zlib => {
            let mut c = match codec {
                Codec::Deflate => Compress::new_with_window_bits(Compression::default(), false, 12),
                _ => Compress::new(Compression::default(), true),
            };
            match c.compress(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    out.truncate(usize::try_from(c.total_out()).unwrap_or(0));
                    Ok(Some(out))
                }
                Ok(_) => Ok(None),
                Err(e) => Err(Error::internal(format!("deflate failed: {e}"))),
            }
        }
        Codec::Zstd => match zstd::bulk::compress_to_buffer(input, &mut out[..], 0) {
            Ok(n) if n < max_len => {
                out.truncate(n);
                Ok(Some(out))
            }
            // Destination too small: not compressible enough.
            _ => Ok(None),
        },
    }
}

/// How many decompressed clusters a [`ClusterCache`] keeps.
const CLUSTER_CACHE_ENTRIES: usize = 8;

/// The few most recently decompressed clusters (or grains), keyed by the
/// host offset of their compressed data, so that a guest reading one in
/// small pieces decompresses it once. Oldest entries leave first.
#[derive(Debug, Default)]
pub(crate) struct ClusterCache {
    /// (host offset, decompressed bytes), oldest first.
    entries: Mutex<Vec<(u64, Arc<[u8]>)>>,
}

impl ClusterCache {
    /// An empty cache.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The cluster cached for `key`, or the one `load` decompresses (then
    /// cached). No lock is held while `load` runs.
    pub(crate) fn get_or_load(&self, key: u64, load: impl FnOnce() -> Result<Vec<u8>>) -> Result<Arc<[u8]>> {
        if let Some(d) = self.get(key) {
            return Ok(d);
        }
        let data: Arc<[u8]> = load()?.into();
        let mut z = self.entries.lock();
        if let Some((_, d)) = z.iter().find(|(h, _)| *h == key) {
            // Another thread decompressed it meanwhile.
            return Ok(d.clone());
        }
        if z.len() >= CLUSTER_CACHE_ENTRIES {
            z.remove(0);
        }
        z.push((key, data.clone()));
        Ok(data)
    }

    fn get(&self, key: u64) -> Option<Arc<[u8]>> {
        self.entries.lock().iter().find(|(h, _)| *h == key).map(|(_, d)| d.clone())
    }

    /// Forgets every cluster (their host space may be reused).
    pub(crate) fn clear(&self) {
        self.entries.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_u32;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn exact_roundtrip_deflate_and_zstd() {
        let data: Vec<u8> = (0..65536usize).map(|i| (i / 100) as u8).collect();
        for codec in [Codec::Deflate, Codec::Zstd] {
            let c = compress(codec, &data, 65536 - 512).unwrap().unwrap();
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xAA; 700]);
            let mut out = vec![0u8; 65536];
            decompress_exact(codec, &padded, &mut out, "cluster").unwrap();
            assert_eq!(out, data);
            // Truncated input is an error, not a panic.
            assert!(decompress_exact(codec, &c[..c.len() / 2], &mut out, "cluster").is_err());
        }
    }

    #[test]
    fn incompressible_is_none() {
        let data = noise(4096);
        assert!(compress(Codec::Deflate, &data, 4096 - 512).unwrap().is_none());
        assert!(compress(Codec::Zstd, &data, 4096 - 512).unwrap().is_none());
    }

    #[test]
    fn garbage_input() {
        let mut out = vec![0u8; 4096];
        assert!(decompress_exact(Codec::Deflate, &[0xff; 100], &mut out, "cluster").is_err());
        assert!(decompress_exact(Codec::Zstd, &[0xff; 100], &mut out, "cluster").is_err());
        assert!(decompress_exact(Codec::Zstd, &[], &mut out, "cluster").is_err());
    }

    #[test]
    fn zlib_stream_roundtrip_and_bounds() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let z = compress(Codec::Zlib, &data, deflate_bound(data.len())).unwrap().unwrap();
        assert_eq!(&z[..1], &[0x78]);
        let mut out = vec![0u8; 65536];
        assert_eq!(decompress_stream(Codec::Zlib, &z, &mut out, "grain").unwrap(), 65536);
        assert_eq!(out, data);
        // Too small an output buffer: more than one grain.
        let mut small = vec![0u8; 1000];
        assert!(decompress_stream(Codec::Zlib, &z, &mut small, "grain").is_err());
        // Truncated input.
        assert!(decompress_stream(Codec::Zlib, &z[..z.len() / 2], &mut out, "grain").is_err());
        // Raw deflate (no zlib header) is refused.
        assert!(decompress_stream(Codec::Zlib, &[0x63, 0, 0], &mut out, "grain").is_err());
        // Incompressible data still fits the bound.
        let n = noise(65536);
        let z = compress(Codec::Zlib, &n, deflate_bound(n.len())).unwrap().unwrap();
        assert!(z.len() < 2 * 65536);
        assert_eq!(decompress_stream(Codec::Zlib, &z, &mut out, "grain").unwrap(), 65536);
        assert_eq!(out, n);
        // The same thread's inflater serves raw deflate next.
        let d = compress(Codec::Deflate, &data, 65536).unwrap().unwrap();
        decompress_exact(Codec::Deflate, &d, &mut out, "cluster").unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn cache_keeps_the_newest_and_loads_once() {
        let c = ClusterCache::new();
        for k in 0..10u64 {
            c.get_or_load(k, || Ok(vec![k as u8; 4])).unwrap();
        }
        // The two oldest left.
        assert!(c.get(0).is_none() && c.get(1).is_none());
        let d = c.get_or_load(9, || panic!("cached")).unwrap();
        assert_eq!(&d[..], &[9; 4]);
        assert!(c.get_or_load(42, || Err(Error::corrupt("bad"))).is_err());
        assert!(c.get(42).is_none());
        c.clear();
        assert!(c.get(9).is_none());
    }
}
