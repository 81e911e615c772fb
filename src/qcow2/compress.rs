//! Compressed clusters: raw deflate ("zlib", RFC 1951 without the zlib
//! wrapper, 4 KiB window as QEMU writes it) and zstd frames.
//!
//! Decompression always writes into a fixed one-cluster buffer and succeeds
//! only when exactly one cluster was produced; the input length is bounded by
//! the L2 descriptor, so a hostile image cannot make it allocate or loop.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::header::CompressionType;
use crate::error::{Error, Result};

/// Decompresses `input` into `out` (one cluster). Trailing input after the
/// cluster is complete is ignored, as QEMU does.
pub fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match ty {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

thread_local! {
    /// One inflater per thread, reset between clusters (setting one up
    /// allocates its window and tables).
    static INFLATER: std::cell::RefCell<Option<Decompress>> = const { std::cell::RefCell::new(None) };
    /// One zstd decoding context per thread.
    static ZSTD: std::cell::RefCell<Option<zstd::stream::raw::Decoder<'static>>> = const { std::cell::RefCell::new(None) };
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    INFLATER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = slot.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        inflate_with(d, input, out)
    })
}

fn inflate_with(d: &mut Decompress, input: &[u8], out: &mut [u8]) -> Result<()> {
    let status = d.decompress(input, out, FlushDecompress::Finish);
    let produced = d.total_out() as usize;
    match status {
        Ok(Status::StreamEnd) | Ok(Status::BufError) | Ok(Status::Ok) if produced == out.len() => Ok(()),
        Ok(_) => {
            Err(Error::corrupt(format!("compressed cluster inflates to {produced} bytes instead of {}", out.len())))
        }
        Err(e) => Err(Error::corrupt(format!("compressed cluster does not inflate: {e}"))),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, Operation};
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Decoder::new().map_err(|e| Error::internal(format!("zstd decoder: {e}")))?);
        }
        let dec = slot.as_mut().ok_or_else(|| Error::internal("zstd decoder missing"))?;
        dec.reinit().map_err(|e| Error::internal(format!("zstd decoder reset: {e}")))?;
        unzstd_with(dec, input, out)
    })
}

fn unzstd_with(dec: &mut zstd::stream::raw::Decoder<'static>, input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    // Each call makes progress on input or output; stop when the cluster is
    // full or the input is used up without progress.
    loop {
        let before_in = inb.pos();
        let before_out = outb.pos();
        dec.run(&mut inb, &mut outb)
            .map_err(|e| Error::corrupt(format!("compressed cluster does not decode as zstd: {e}")))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if inb.pos() == input.len() || (inb.pos() == before_in && outb.pos() == before_out) {
            return Err(Error::corrupt(format!(
                "zstd compressed cluster decodes to {} bytes instead of {}",
                outb.pos(),
                outb.capacity()
            )));
        }
    }
}

/// Compresses one cluster. Returns `None` when the result would not be
/// smaller than `max_len` (the caller then stores the cluster uncompressed).
pub fn compress(ty: CompressionType, input: &[u8], max_len: usize) -> Result<Option<Vec<u8>>> {
    match ty {
        CompressionType::Zlib => {
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = vec![0u8; max_len];
            match c.compress(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    Ok(Some(out))
                }
                Ok(_) => Ok(None),
                Err(e) => Err(Error::internal(format!("deflate failed: {e}"))),
            }
        }
        CompressionType::Zstd => {
            let mut out = vec![0u8; max_len];
            match zstd::bulk::compress_to_buffer(input, &mut out[..], 0) {
                Ok(n) if n < max_len => {
                    out.truncate(n);
                    Ok(Some(out))
                }
                // Destination too small: not compressible enough.
                _ => Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(ty, &data, 65536 - 512).unwrap().unwrap();
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xAA; 700]);
            let mut out = vec![0u8; 65536];
            decompress(ty, &padded, &mut out).unwrap();
            assert_eq!(out, data);
            // Truncated input is an error, not a panic.
            assert!(decompress(ty, &c[..c.len() / 2], &mut out).is_err());
        }
    }

    #[test]
    fn incompressible_is_none() {
        let mut x = 0x1234_5678_u32;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &data, 4096 - 512).unwrap().is_none());
        assert!(compress(CompressionType::Zstd, &data, 4096 - 512).unwrap().is_none());
    }

    #[test]
    fn garbage_input() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[], &mut out).is_err());
    }
}
