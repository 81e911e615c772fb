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
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use parking_lot::{Condvar, Mutex};
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

/// The least output one request must decompress before its units are
/// offered to the helper threads: below it, handing a unit over costs
/// about what it saves. A 4 KiB or 64 KiB read stays on the caller's
/// thread, touching no lock and no other thread.
pub(crate) const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// At most this many helper threads, however many cores there are.
const MAX_HELPERS: usize = 7;

/// One compressed unit (a cluster or a grain) of a request, read but not
/// yet decompressed.
#[derive(Debug)]
pub(crate) struct Unit<'a> {
    /// The compressed bytes, as the format's descriptor bounds them.
    pub input: Vec<u8>,
    /// Where the whole unit goes.
    pub out: &'a mut [u8],
}

/// How the units of one request are decoded: [`decompress_exact`] or
/// [`decompress_stream`], and the name of the unit in messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decode {
    /// The encoding.
    pub codec: Codec,
    /// One complete stream ending within the unit (vmdk grains) rather
    /// than exactly one unit of output (qcow2 clusters).
    pub stream: bool,
    /// "cluster", "grain".
    pub what: &'static str,
}

impl Decode {
    fn run(&self, input: &[u8], out: &mut [u8]) -> Result<usize> {
        if self.stream {
            decompress_stream(self.codec, input, out, self.what)
        } else {
            decompress_exact(self.codec, input, out, self.what).map(|()| out.len())
        }
    }
}

/// A unit not yet claimed: its compressed bytes and its output length.
type Pending = (Vec<u8>, usize);

/// A unit a helper decoded: its output and the bytes the stream produced.
type Decoded = (Vec<u8>, usize);

/// A request's units, shared with the helpers. Whoever claims index `i`
/// (through `next`) decodes unit `i`; a helper leaves its output in `done`.
struct Batch {
    decode: Decode,
    next: AtomicUsize,
    /// Each unit's compressed bytes and output length, until claimed.
    inputs: Vec<Mutex<Option<Pending>>>,
    /// What helpers decoded: the output and the bytes produced.
    done: Mutex<Vec<Option<Result<Decoded>>>>,
    finished: Condvar,
}

impl Batch {
    /// Claims and decodes units until none is left. The caller's thread
    /// writes in place (`outs`); a helper into a buffer of its own.
    fn work(&self, mut outs: Option<&mut [&mut [u8]]>, results: &mut [Option<Result<usize>>]) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            let Some(slot) = self.inputs.get(i) else { return };
            let Some((input, out_len)) = slot.lock().take() else { continue };
            match outs.as_deref_mut() {
                Some(outs) => {
                    if let (Some(out), Some(r)) = (outs.get_mut(i), results.get_mut(i)) {
                        *r = Some(self.decode.run(&input, out));
                    }
                }
                None => {
                    let mut out = vec![0u8; out_len];
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.decode.run(&input, &mut out)))
                            .unwrap_or_else(|_| Err(Error::internal("a decompression helper panicked")));
                    if let Some(d) = self.done.lock().get_mut(i) {
                        *d = Some(r.map(|n| (out, n)));
                    }
                    self.finished.notify_all();
                }
            }
        }
    }
}

/// The helper threads (one fewer than the cores, started on first use and
/// then idle on a condition variable) and the batches waiting for them.
struct Pool {
    queue: Mutex<VecDeque<Arc<Batch>>>,
    wake: Condvar,
}

static POOL: Pool = Pool { queue: Mutex::new(VecDeque::new()), wake: Condvar::new() };

/// How many helper threads run (0 on one core, or if none could start).
fn helpers() -> usize {
    static STARTED: OnceLock<usize> = OnceLock::new();
    *STARTED.get_or_init(|| {
        let want = std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).min(MAX_HELPERS);
        (0..want).take_while(|_| std::thread::Builder::new().name("vdisk-inflate".into()).spawn(helper).is_ok()).count()
    })
}

fn helper() {
    loop {
        let batch = {
            let mut q = POOL.queue.lock();
            loop {
                if let Some(b) = q.pop_front() {
                    break b;
                }
                POOL.wake.wait(&mut q);
            }
        };
        batch.work(None, &mut []);
    }
}

/// Large requests decompressing right now (see [`decompress_units`]).
static LARGE: AtomicUsize = AtomicUsize::new(0);

/// Counts one large request out of [`LARGE`] when dropped.
struct Large;

impl Drop for Large {
    fn drop(&mut self) {
        LARGE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decompresses every unit of one request (`bytes` of output in all) and
/// returns each unit's result in order: the bytes it produced, or its
/// error. With two units or more and at least [`PARALLEL_MIN_BYTES`], the
/// helper threads join in, as many as the other large requests in progress
/// leave cores for: the caller's thread and the helpers each
/// take the next unclaimed unit, so a helper that the scheduler does not
/// run soon costs nothing (the caller does its share) and the caller waits
/// only for units a helper is decoding. Otherwise the caller decodes them
/// all.
pub(crate) fn decompress_units(decode: Decode, units: Vec<Unit<'_>>, bytes: usize) -> Vec<Result<usize>> {
    let n = units.len();
    if n < 2 || bytes < PARALLEL_MIN_BYTES {
        return units.into_iter().map(|u| decode.run(&u.input, u.out)).collect();
    }
    // Large requests in progress, this one included: when they already
    // fill the cores (a convert's workers), helpers would only add hand-
    // over costs.
    LARGE.fetch_add(1, Ordering::AcqRel);
    let _large = Large;
    let idle = helpers().saturating_add(1).saturating_sub(LARGE.load(Ordering::Acquire));
    let helpers = idle.min(n - 1);
    if helpers == 0 {
        return units.into_iter().map(|u| decode.run(&u.input, u.out)).collect();
    }
    let mut outs = Vec::with_capacity(n);
    let mut inputs = Vec::with_capacity(n);
    for u in units {
        inputs.push(Mutex::new(Some((u.input, u.out.len()))));
        outs.push(u.out);
    }
    let batch = Arc::new(Batch {
        decode,
        next: AtomicUsize::new(0),
        inputs,
        done: Mutex::new((0..n).map(|_| None).collect()),
        finished: Condvar::new(),
    });
    {
        let mut q = POOL.queue.lock();
        for _ in 0..helpers {
            q.push_back(batch.clone());
        }
    }
    for _ in 0..helpers {
        POOL.wake.notify_one();
    }
    let mut results: Vec<Option<Result<usize>>> = (0..n).map(|_| None).collect();
    batch.work(Some(&mut outs), &mut results);
    // What is left was claimed by helpers, which are running it.
    let mut done = batch.done.lock();
    results
        .into_iter()
        .zip(outs)
        .enumerate()
        .map(|(i, (r, out))| {
            if let Some(r) = r {
                return r;
            }
            loop {
                match done.get_mut(i).map(Option::take) {
                    Some(Some(r)) => {
                        return r.and_then(|(data, produced)| {
                            out.copy_from_slice(
                                data.get(..out.len()).ok_or_else(|| Error::internal("short helper output"))?,
                            );
                            Ok(produced)
                        })
                    }
                    Some(None) => batch.finished.wait(&mut done),
                    None => return Err(Error::internal("decompression unit out of range")),
                }
            }
        })
        .collect()
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
    fn units_of_a_large_request_decode_in_place_and_fail_alone() {
        // 24 clusters of 64 KiB (past PARALLEL_MIN_BYTES, so the helpers
        // join in on a multi-core machine), each different; one corrupt.
        let clusters: Vec<Vec<u8>> =
            (0..24u32).map(|k| (0..65536u32).map(|i| ((i / 7 + k * 13) % 251) as u8).collect()).collect();
        for codec in [Codec::Deflate, Codec::Zstd] {
            let mut out = vec![0u8; 24 * 65536];
            let units: Vec<Unit<'_>> = out
                .chunks_mut(65536)
                .enumerate()
                .map(|(k, o)| {
                    let mut input = compress(codec, &clusters[k], 65536 - 512).unwrap().unwrap();
                    if k == 9 {
                        input.truncate(input.len() / 3);
                    }
                    Unit { input, out: o }
                })
                .collect();
            let decode = Decode { codec, stream: false, what: "cluster" };
            let res = decompress_units(decode, units, 24 * 65536);
            assert_eq!(res.len(), 24);
            for (k, r) in res.iter().enumerate() {
                if k == 9 {
                    assert!(r.is_err(), "{codec:?} unit {k}");
                } else {
                    assert_eq!(*r.as_ref().unwrap(), 65536);
                    assert!(out[k * 65536..(k + 1) * 65536] == clusters[k][..], "{codec:?} unit {k}");
                }
            }
        }
        // Streams (vmdk grains) report what they produced.
        let mut out = vec![0u8; 8 * 65536];
        let units: Vec<Unit<'_>> = out
            .chunks_mut(65536)
            .enumerate()
            .map(|(k, o)| Unit {
                input: compress(Codec::Zlib, &clusters[k][..40000], 1 << 17).unwrap().unwrap(),
                out: o,
            })
            .collect();
        let res = decompress_units(Decode { codec: Codec::Zlib, stream: true, what: "grain" }, units, 8 * 65536);
        for (k, r) in res.into_iter().enumerate() {
            assert_eq!(r.unwrap(), 40000);
            assert!(out[k * 65536..k * 65536 + 40000] == clusters[k][..40000]);
        }
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
