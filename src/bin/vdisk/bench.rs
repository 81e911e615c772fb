//! `vdisk bench`: the workloads of `qemu-img bench`, with the same flags and
//! meanings, so the two can be held side by side on one image.
//!
//! Requests go to `offset`, `offset + step`, `offset + 2*step`, ... (wrapping
//! at the end of the image), `depth` of them in flight, each served by its
//! own thread. `--flush-interval N` flushes after every N requests (and
//! once at the end, as qemu-img does).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use vdisk::{BlockDevice, Error, Result};

use crate::common::parse_size;
use crate::secrets::SecretArgs;

/// Arguments of `vdisk bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value = "75000")]
    pub count: u64,
    /// Requests in flight (threads).
    #[arg(short = 'd', default_value = "64")]
    pub depth: u64,
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Flush after this many requests (0: never).
    #[arg(long = "flush-interval", default_value = "0")]
    pub flush_interval: u64,
    /// Do not flush at the end of a write run.
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// First offset.
    #[arg(short = 'o', default_value = "0")]
    pub offset: String,
    /// Byte written by write requests.
    #[arg(long = "pattern", default_value = "0")]
    pub pattern: String,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Bytes per request.
    #[arg(short = 's', default_value = "4096")]
    pub buf_size: String,
    /// Distance between consecutive requests (default: the buffer size).
    #[arg(short = 'S')]
    pub step: Option<String>,
    /// Cache mode: writeback (the page cache, like qemu's default) or none.
    #[arg(short = 't', default_value = "writeback")]
    pub cache: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    pub write: bool,
    /// Bypass the host cache (the same as -t none).
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// AIO mode: vdisk runs requests on threads (`threads`); qemu's
    /// `native` and `io_uring` are refused by name.
    #[arg(short = 'i', long = "aio", default_value = "threads")]
    pub aio: String,
    /// Open even if another process holds the image (reads only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image.
    pub image: String,
}

fn parse_byte(s: &str) -> Result<u8> {
    let v = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| Error::invalid_argument(format!("invalid pattern '{s}'")))?;
    u8::try_from(v).map_err(|_| Error::invalid_argument(format!("pattern '{s}' is larger than one byte")))
}

/// Runs `vdisk bench`.
pub fn run(a: &BenchArgs) -> Result<i32> {
    if a.aio != "threads" {
        return Err(Error::unsupported(format!(
            "aio mode '{}' is not supported: vdisk submits requests from threads (-i threads)",
            a.aio
        )));
    }
    let cache = match if a.nocache { "none" } else { a.cache.as_str() } {
        "writeback" => vdisk::CacheMode::Writeback,
        "none" => vdisk::CacheMode::Direct,
        other => {
            return Err(Error::invalid_argument(format!("cache mode '{other}' is not supported (writeback or none)")))
        }
    };
    if a.depth == 0 || a.depth > 1024 {
        return Err(Error::invalid_argument("depth must be between 1 and 1024"));
    }
    if a.flush_interval != 0 && a.flush_interval < a.depth {
        return Err(Error::invalid_argument("flush interval can't be smaller than depth"));
    }
    let bufsize = parse_size(&a.buf_size)?;
    if bufsize == 0 || bufsize > 256 << 20 {
        return Err(Error::invalid_argument("buffer size must be between 1 byte and 256 MiB"));
    }
    let step = match &a.step {
        Some(s) => parse_size(s)?,
        None => bufsize,
    };
    let offset = parse_size(&a.offset)?;
    let pattern = parse_byte(&a.pattern)?;
    let img = match crate::common::open_nbd(&a.image, a.format.as_deref(), !a.write)? {
        Some(img) => img,
        None => {
            let spec = a.secrets.image(&a.image, a.format.as_deref())?;
            let key = a.secrets.key(spec.key_secret.as_deref())?;
            let mut opts =
                crate::common::image_options(spec.format.as_deref(), !a.write, true, key, a.force_share)?.cache(cache);
            if let Some(h) = &spec.luks_header {
                opts = opts.luks_header(h);
            }
            opts.open(&spec.path)?
        }
    };
    let size = img.size();
    if offset.checked_add(bufsize).is_none_or(|e| e > size) {
        return Err(Error::invalid_argument(format!(
            "offset {offset} + buffer size {bufsize} is beyond the image size {size}"
        )));
    }
    if !a.quiet {
        outln!(
            "Sending {} {} requests, {bufsize} bytes each, {} in parallel (starting at offset {offset}, step size {step})",
            a.count,
            if a.write { "write" } else { "read" },
            a.depth
        );
    }
    let next = AtomicU64::new(0);
    let done_since_flush = AtomicU64::new(0);
    let dev: &dyn BlockDevice = &img;
    let start = Instant::now();
    let result: Result<()> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..a.depth.min(a.count.max(1)))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    // Page-aligned, as qemu-img bench's buffers are: the
                    // kernel copies into a misaligned buffer far slower.
                    let mut aligned = vdisk::storage::Aligned::new(bufsize as usize);
                    let buf = aligned.as_mut_slice();
                    buf.fill(pattern);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= a.count {
                            return Ok(());
                        }
                        // Where qemu-img bench would put request i.
                        let mut off = (offset as u128 + i as u128 * step as u128) % size.max(1) as u128;
                        if off as u64 + bufsize > size {
                            off = 0;
                        }
                        let off = off as u64;
                        if a.write {
                            dev.write_at(buf, off)?;
                        } else {
                            dev.read_at(buf, off)?;
                        }
                        if a.flush_interval > 0
                            && done_since_flush.fetch_add(1, Ordering::Relaxed) + 1 >= a.flush_interval
                        {
                            done_since_flush.store(0, Ordering::Relaxed);
                            dev.flush()?;
                        }
                    }
                })
            })
            .collect();
        let mut first = Ok(());
        for w in workers {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
                Err(_) => first = Err(Error::internal("a bench worker panicked")),
            }
        }
        first
    });
    result?;
    if a.write && !a.no_drain {
        dev.flush()?;
    }
    let secs = start.elapsed().as_secs_f64();
    if !a.quiet {
        outln!("Run completed in {secs:.3} seconds.");
    }
    // Outside the timed part, as qemu-img closes after its report.
    img.close()?;
    Ok(0)
}
