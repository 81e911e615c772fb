//! `vdisk io`: scripted I/O in the style of `qemu-io`, for tests and users.
//!
//! Commands: `read [-P pattern] [-v] OFF LEN`, `write [-P pattern] [-z [-u]]
//! [-c] OFF LEN`, `discard OFF LEN`, `flush`, `map`. Offsets and lengths take
//! qemu-io's suffixes (`64k`, `1M`, `2G`). The exit code is 1 if any command
//! failed or a pattern did not verify.

use std::time::Instant;

use vdisk::{BlockDevice, Error, Image, Result, ZeroMode};

use crate::common::{open_arg, parse_size};
use crate::secrets::SecretArgs;

/// Arguments of `vdisk io`.
#[derive(clap::Args, Debug)]
pub struct IoArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// A command to run (repeatable, run in order).
    #[arg(short = 'c', long = "cmd")]
    pub cmds: Vec<String>,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image.
    pub image: String,
}

fn parse_pattern(s: &str) -> Result<u8> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        s.parse::<u64>()
    }
    .map_err(|_| Error::invalid_argument(format!("invalid pattern '{s}'")))?;
    u8::try_from(v).map_err(|_| Error::invalid_argument(format!("pattern '{s}' is larger than one byte")))
}

fn stats(verb: &str, len: u64, off: u64, t: Instant) {
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    outln!("{verb} {len}/{len} bytes at offset {off}");
    outln!(
        "{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
        cvtstr(len),
        secs,
        cvtstr((len as f64 / secs) as u64),
        1.0 / secs
    );
}

/// Runs one command; `Ok(false)` when a pattern did not verify.
fn run_cmd(img: &Image, line: &str) -> Result<bool> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&cmd, rest)) = words.split_first() else {
        return Ok(true);
    };
    let mut pattern = None;
    let mut zero = false;
    let mut unmap = false;
    let mut compressed = false;
    let mut verbose = false;
    let mut args = Vec::new();
    let mut it = rest.iter();
    while let Some(&w) = it.next() {
        match w {
            "-P" => {
                pattern = Some(parse_pattern(it.next().ok_or_else(|| Error::invalid_argument("-P needs a pattern"))?)?)
            }
            "-z" => zero = true,
            "-u" => unmap = true,
            "-c" => compressed = true,
            "-v" => verbose = true,
            "-q" => {}
            a if a.starts_with('-') && a.len() > 1 && !a[1..].starts_with(|c: char| c.is_ascii_digit()) => {
                return Err(Error::invalid_argument(format!("{cmd}: unknown option {a}")))
            }
            a => args.push(a),
        }
    }
    let off_len = |args: &[&str]| -> Result<(u64, u64)> {
        match args {
            [o, l] => Ok((parse_size(o)?, parse_size(l)?)),
            _ => Err(Error::invalid_argument(format!("{cmd} needs OFFSET LENGTH"))),
        }
    };
    match cmd {
        "read" => {
            let (off, len) = off_len(&args)?;
            // Bounds before the buffer: `read 0 8E` must not allocate 8 EiB.
            if off.checked_add(len).is_none_or(|end| end > img.size()) {
                return Err(Error::out_of_bounds(off, len, img.size()));
            }
            let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Error::invalid_argument("length too large"))?];
            let t = Instant::now();
            img.read_at(&mut buf, off)?;
            if verbose {
                for (i, chunk) in buf.chunks(16).enumerate() {
                    let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                    outln!("{:08x}:  {}", off + i as u64 * 16, hex.join(" "));
                }
            }
            if let Some(p) = pattern {
                if let Some(i) = buf.iter().position(|&b| b != p) {
                    outln!("Pattern verification failed at offset {}, {len} bytes", off + i as u64);
                    return Ok(false);
                }
            }
            stats("read", len, off, t);
        }
        "write" => {
            let (off, len) = off_len(&args)?;
            if off.checked_add(len).is_none_or(|end| end > img.size()) {
                return Err(Error::out_of_bounds(off, len, img.size()));
            }
            let t = Instant::now();
            if zero {
                let mode = if unmap { ZeroMode::MayUnmap } else { ZeroMode::Allocate };
                img.write_zeroes(off, len, mode)?;
            } else {
                let buf = vec![
                    pattern.unwrap_or(0xcd);
                    usize::try_from(len).map_err(|_| Error::invalid_argument("length too large"))?
                ];
                if compressed {
                    img.write_compressed(&buf, off)?;
                } else {
                    img.write_at(&buf, off)?;
                }
            }
            stats("wrote", len, off, t);
        }
        "discard" => {
            let (off, len) = off_len(&args)?;
            let t = Instant::now();
            img.discard(off, len)?;
            stats("discard", len, off, t);
        }
        "flush" => img.flush()?,
        "map" => {
            // As qemu-io prints it: maximal runs allocated (data, zeros or
            // compressed data in the image itself) or not (backing or hole).
            let size = img.size();
            let mut pos = 0;
            while pos < size {
                let allocated = |e: &vdisk::Extent| e.depth == 0 && e.kind != vdisk::ExtentKind::Unallocated;
                let first = img.map(pos, size - pos)?;
                let state = allocated(&first);
                let mut end = pos + first.length.max(1);
                while end < size {
                    let e = img.map(end, size - end)?;
                    if allocated(&e) != state {
                        break;
                    }
                    end += e.length.max(1);
                }
                let len = end - pos;
                outln!(
                    "{} ({len:#x}) bytes {} at offset {} ({pos:#x})",
                    cvtstr(len),
                    if state { "    allocated" } else { "not allocated" },
                    cvtstr(pos)
                );
                pos = end;
            }
        }
        other => {
            return Err(Error::invalid_argument(format!(
                "unknown command '{other}' (read, write, discard, flush, map)"
            )))
        }
    }
    Ok(true)
}

/// Runs `vdisk io`.
pub fn run(a: &IoArgs) -> Result<i32> {
    let (_, img) = open_arg(&a.secrets, &a.image, a.format.as_deref(), a.read_only, true)?;
    let mut code = 0;
    for c in &a.cmds {
        match run_cmd(&img, c) {
            Ok(true) => {}
            Ok(false) => code = 1,
            Err(e) => {
                eprintln!("{}: {}", c.split_whitespace().next().unwrap_or(""), e.report());
                code = 1;
            }
        }
    }
    img.close()?;
    Ok(code)
}

/// A size as qemu-io's `cvtstr` prints it: `64 KiB`, `1.938 MiB`, `512 bytes`.
fn cvtstr(v: u64) -> String {
    const UNITS: [(u32, &str); 6] = [(60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    let (value, suffix) = UNITS
        .iter()
        .find(|(shift, _)| v >= 1u64 << shift)
        .map_or((v as f64, "bytes"), |&(shift, name)| (v as f64 / (1u64 << shift) as f64, name));
    let s = format!("{value:.3}");
    format!("{} {suffix}", s.strip_suffix(".000").unwrap_or(&s))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cvtstr_as_qemu_io() {
        assert_eq!(super::cvtstr(0), "0 bytes");
        assert_eq!(super::cvtstr(512), "512 bytes");
        assert_eq!(super::cvtstr(65536), "64 KiB");
        assert_eq!(super::cvtstr(0x1f0000), "1.938 MiB");
        assert_eq!(super::cvtstr(0x110000), "1.062 MiB");
    }
}
