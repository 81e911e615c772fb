//! `vdisk convert`: copies an image into a new one of any writable format,
//! keeping holes; `-c` compresses on a thread pool.

use std::path::PathBuf;
use std::sync::Arc;

use vdisk::convert::ConvertOptions;
use vdisk::vmdk::Subformat;
use vdisk::{BlockDevice, Error, FileStorage, Format, Raw, Result, VmdkCreateOptions};

use crate::common::{open_arg_shared, parse_size, progress_printer, stdout_is_terminal, CreatedFiles};
use crate::secrets::{qcow2_create_options, split_opts, SecretArgs};

/// Arguments of `vdisk convert`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Source format (probed when absent).
    #[arg(short = 'f', long = "source-format")]
    pub src_fmt: Option<String>,
    /// Output format.
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    pub out_fmt: String,
    /// Show progress (on a terminal).
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Compress the output (qcow2, vmdk streamOptimized).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Output format options (`-o key=value,...`).
    #[arg(short = 'o', long = "target-options")]
    pub options: Vec<String>,
    /// Export an internal snapshot instead of the current state
    /// (`-l snapshot.name=NAME` or `-l snapshot.id=ID`).
    #[arg(short = 'l', long = "source-snapshot")]
    pub snapshot: Option<String>,
    /// Worker threads, 1 to 16 as qemu-img takes them (default: one per core).
    #[arg(short = 'm', long = "parallel")]
    pub threads: Option<usize>,
    /// Zero detection granule (`-S 0` writes every byte).
    #[arg(short = 'S', long = "sparse-size", default_value = "4k")]
    pub sparse: String,
    /// Open even if another process holds the source.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Backing file of the new image (as `-o backing_file=`): only what
    /// reads differently from it is written.
    #[arg(short = 'B', long = "backing")]
    pub backing: Option<String>,
    /// Format of the `-B` backing file (as `-o backing_fmt=`).
    #[arg(short = 'F', long = "backing-format")]
    pub backing_fmt: Option<String>,
    /// Do not create the destination: write into the existing image (of
    /// format -O), which must be at least as large as the source.
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// With -n: the existing destination reads as zeros everywhere, so zero
    /// ranges need no write.
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode of the source (none, writeback, writethrough, directsync, unsafe).
    #[arg(short = 'T', long = "source-cache")]
    pub source_cache: Option<String>,
    /// Cache mode of the target (none and directsync bypass the page cache).
    #[arg(short = 't', long = "target-cache")]
    pub target_cache: Option<String>,
    /// Copy at most RATE bytes per second (qemu's size suffixes).
    #[arg(short = 'r', long = "rate")]
    pub rate: Option<String>,
    /// Allow out-of-order writes (vdisk always writes its units in parallel,
    /// so this is accepted and changes nothing).
    #[arg(short = 'W', long = "oob-writes")]
    pub oob_writes: bool,
    /// Copy offloading (copy_file_range); refused: vdisk copies through
    /// memory, with zero detection.
    #[arg(short = 'C', long = "copy-range-offloading")]
    pub copy_range: bool,
    /// Keep going past read errors of the source: unreadable sectors are
    /// written as zeros, each one reported.
    #[arg(long = "salvage")]
    pub salvage: bool,
    /// The destination is an option string (`driver=FMT,file.filename=PATH`,
    /// `encrypt.key-secret=ID`); needs -n.
    #[arg(long = "target-image-opts", requires = "no_create")]
    pub target_image_opts: bool,
    /// Copy the source's persistent dirty bitmaps (qcow2 to qcow2).
    #[arg(long = "bitmaps")]
    pub bitmaps: bool,
    /// With --bitmaps: leave out inconsistent bitmaps instead of failing.
    #[arg(long = "skip-broken-bitmaps", requires = "bitmaps")]
    pub skip_broken_bitmaps: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// Source image.
    pub src: String,
    /// Destination image (created, replacing any file there, unless -n).
    pub dst: PathBuf,
}

/// Runs `vdisk convert`; a failure removes the files it had created.
pub fn run(a: &ConvertArgs) -> Result<i32> {
    if a.salvage && a.snapshot.is_some() {
        return Err(Error::unsupported("--salvage does not apply to a snapshot (-l)"));
    }
    if a.copy_range {
        return Err(Error::unsupported(
            "copy offloading (-C) is not supported: vdisk copies through memory, detecting zeros",
        ));
    }
    // Both modes checked before anything is created.
    crate::common::with_cache(a.source_cache.as_deref(), || Ok(()))?;
    crate::common::with_cache(a.target_cache.as_deref(), || Ok(()))?;
    let created = CreatedFiles::before(&a.dst);
    convert(a).inspect_err(|_| created.remove_new())
}

fn convert(a: &ConvertArgs) -> Result<i32> {
    let (_, src) = crate::common::with_cache(a.source_cache.as_deref(), || {
        open_arg_shared(&a.secrets, &a.src, a.src_fmt.as_deref(), true, true, a.force_share)
    })?;
    let salvage = crate::salvage::Salvage::new(&src);
    let snap_view;
    let source: &dyn BlockDevice = match &a.snapshot {
        None if a.salvage => &salvage,
        None => &src,
        Some(spec) => {
            snap_view = crate::common::snapshot_arg(&src, spec)?;
            &snap_view
        }
    };
    let out = Format::from_name(&a.out_fmt)?;
    let size = source.size();
    let mut opts: Vec<String> = a.options.iter().flat_map(|o| split_opts(o)).collect();
    if let Some(b) = &a.backing {
        opts.push(format!("backing_file={b}"));
    }
    if let Some(f) = &a.backing_fmt {
        if a.backing.is_none() {
            return Err(Error::invalid_argument("-F names the format of a -B backing file"));
        }
        opts.push(format!("backing_fmt={f}"));
    }
    if a.target_is_zero && !a.no_create {
        return Err(Error::invalid_argument("--target-is-zero requires -n (an existing target)"));
    }
    let src_bitmaps = if a.bitmaps { bitmaps_to_copy(a, &src, out)? } else { Vec::new() };
    let mut compress = a.compress;
    let mut unit = 2u64 << 20;
    // The destination as qcow2, for --bitmaps.
    let mut dst_q: Option<Arc<vdisk::qcow2::Qcow2>> = None;
    let dst: Box<dyn BlockDevice> = if a.no_create {
        if !opts.is_empty() {
            return Err(Error::invalid_argument("-n writes into an existing image: -o, -B and -F do not apply"));
        }
        // The existing target, its backing chain followed (what it reads
        // through is compared, not overwritten blindly).
        let img = open_target(a, out)?;
        if img.size() < size {
            return Err(Error::invalid_argument(format!(
                "the target of {} bytes is smaller than the source of {size} bytes",
                img.size()
            )));
        }
        if compress {
            unit = unit.div_ceil(img.info().cluster_size.unwrap_or(65536)) * img.info().cluster_size.unwrap_or(65536);
        }
        into_target(img, &mut dst_q)
    } else {
        match out {
            Format::Raw => {
                if a.compress {
                    return Err(Error::invalid_argument("raw output cannot be compressed"));
                }
                if !opts.is_empty() {
                    return Err(Error::invalid_argument("raw output takes no -o options"));
                }
                let st = FileStorage::create(&a.dst)?;
                Box::new(Raw::create(Arc::new(st), size)?)
            }
            Format::Qcow2 => {
                let o = qcow2_create_options(size, &opts, &a.secrets)?;
                if compress && o.encrypt.is_some() {
                    return Err(Error::invalid_argument("compressed writes are not supported for encrypted images"));
                }
                // Whole clusters per unit, so compressed writes cover clusters.
                unit = unit.div_ceil(o.cluster_size) * o.cluster_size;
                into_target(vdisk::Image::Qcow2(crate::common::create_resolver().create_qcow2(&a.dst, &o)?), &mut dst_q)
            }
            Format::Luks if crate::luks2_cli::wants_luks2(&opts) => {
                if a.compress {
                    return Err(Error::invalid_argument("luks output cannot be compressed"));
                }
                let (p, key) = crate::luks2_cli::create_options(&opts, &a.secrets)?;
                if p.detached {
                    return Err(Error::invalid_argument("convert cannot write a detached LUKS header"));
                }
                let st = FileStorage::create(&a.dst)?;
                Box::new(vdisk::luks::Luks::create_luks2(Arc::new(st), None, size, &p, &key)?)
            }
            Format::Luks => {
                if a.compress {
                    return Err(Error::invalid_argument("luks output cannot be compressed"));
                }
                let (p, key) = crate::secrets::luks_create_options(&opts, &a.secrets)?;
                if p.detached {
                    return Err(Error::invalid_argument("convert cannot write a detached LUKS header"));
                }
                let st = FileStorage::create(&a.dst)?;
                Box::new(vdisk::luks::Luks::create(Arc::new(st), None, size, &p, &key)?)
            }
            Format::Vmdk => {
                let o = VmdkCreateOptions::parse(&opts.join(","))?;
                if o.subformat == Subformat::StreamOptimized {
                    // Stream grains are compressed and written whole, once.
                    compress = true;
                } else if compress {
                    return Err(Error::invalid_argument(
                        "vmdk output can be compressed only with subformat=streamOptimized",
                    ));
                }
                let v = crate::common::create_resolver().create_vmdk(&a.dst, size, &o)?;
                let g = v.grain_size().unwrap_or(65536);
                unit = unit.div_ceil(g) * g;
                Box::new(v)
            }
            Format::Vpc | Format::Vdi => {
                if compress {
                    return Err(Error::invalid_argument(format!("{} output cannot be compressed", out.name())));
                }
                crate::vpcvdi::create(out, std::path::Path::new(&a.dst), size, &opts)?
            }
            Format::Vhdx => {
                if compress {
                    return Err(Error::invalid_argument("vhdx output cannot be compressed"));
                }
                let v = crate::vhdx_cli::create_for_convert(&a.dst, size, &opts)?;
                // Whole blocks per unit: each allocation is one logged BAT update.
                unit = unit.max(u64::from(v.geometry().block_size));
                Box::new(v)
            }
        }
    };
    let show = a.progress && stdout_is_terminal();
    let printer = progress_printer(show);
    let rate = a.rate.as_deref().map(parse_size).transpose()?;
    if rate == Some(0) {
        return Err(Error::invalid_argument("invalid rate limit 0: give bytes per second"));
    }
    let started = std::time::Instant::now();
    // `-r`: a worker that got ahead of RATE waits before its next unit.
    let progress = |done: u64, total: u64| {
        printer(done, total);
        if let Some(r) = rate {
            let due = std::time::Duration::from_secs_f64(done as f64 / r as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    };
    let threads = match a.threads {
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        Some(n @ 1..=16) => n,
        Some(n) => {
            return Err(Error::invalid_argument(format!(
                "invalid number of coroutines specified ({n}): must be between 1 and 16"
            )))
        }
    };
    let copts = ConvertOptions {
        threads,
        unit,
        sparse_granule: sparse_granule(&a.sparse)?,
        progress: Some(&progress),
        compress,
        // A target that was there before holds whatever it held.
        dst_is_zeroed: !a.no_create || a.target_is_zero,
    };
    // A target that must bypass the page cache is reopened so: creation
    // wrote its metadata through the cache and synced it.
    let dst: Box<dyn BlockDevice> = match crate::common::cache_mode(a.target_cache.as_deref().unwrap_or("writeback"))? {
        vdisk::CacheMode::Direct if !a.no_create => {
            if dst.info().encrypted {
                return Err(Error::unsupported("-t none/directsync with a new encrypted target is not supported"));
            }
            dst.make_clean()?;
            dst_q = None;
            drop(dst);
            into_target(open_target(a, out)?, &mut dst_q)
        }
        _ => dst,
    };
    vdisk::convert::convert(source, &*dst, &copts)?;
    if salvage.errors() > 0 {
        eprintln!("vdisk: warning: {} unreadable bytes of the source were written as zeros", salvage.errors());
    }
    if let (Some(q), vdisk::Image::Qcow2(sq)) = (&dst_q, &src) {
        for b in &src_bitmaps {
            q.bitmap_add(&b.name, Some(b.granularity), b.enabled)?;
            q.bitmap_merge_from(&b.name, &sq.bitmap_dirty_ranges(&b.name, 0, u64::MAX)?)?;
        }
    }
    dst.make_clean()?;
    if show {
        outln!("    (100.00/100%)");
    }
    Ok(0)
}

/// Opens the existing target (`-n`, or a new one reopened for `-t none`)
/// read-write in the target cache mode, by path or `--target-image-opts`.
fn open_target(a: &ConvertArgs, out: Format) -> Result<vdisk::Image> {
    crate::common::with_cache(a.target_cache.as_deref(), || {
        if a.target_image_opts {
            let dst = a.dst.to_str().ok_or_else(|| Error::invalid_argument("target options are not UTF-8"))?;
            let spec = crate::secrets::image_opts_spec(dst)?;
            let key = a.secrets.key(spec.key_secret.as_deref())?;
            let fmt = spec.format.as_deref().unwrap_or(out.name()).to_string();
            let mut o = crate::common::image_options(Some(&fmt), false, true, key, false)?;
            if let Some(h) = &spec.luks_header {
                o = o.luks_header(h);
            }
            return o.open(&spec.path);
        }
        crate::common::image_options(Some(out.name()), false, true, None, false)?.open(&a.dst)
    })
}

/// The target as the copy writes it; a qcow2 one is also kept in `dst_q`
/// for `--bitmaps`.
fn into_target(img: vdisk::Image, dst_q: &mut Option<Arc<vdisk::qcow2::Qcow2>>) -> Box<dyn BlockDevice> {
    match img {
        vdisk::Image::Qcow2(q) => {
            let q = Arc::new(q);
            *dst_q = Some(q.clone());
            Box::new(q)
        }
        other => Box::new(other),
    }
}

/// The bitmaps `--bitmaps` copies, after qemu-img's checks: a qcow2
/// source, a qcow2 v3 target, no inconsistent bitmap unless skipped.
fn bitmaps_to_copy(a: &ConvertArgs, src: &vdisk::Image, out: Format) -> Result<Vec<vdisk::qcow2::bitmap::BitmapInfo>> {
    let vdisk::Image::Qcow2(sq) = src else {
        return Err(Error::unsupported("source lacks bitmap support: only qcow2 images have persistent bitmaps"));
    };
    if out != Format::Qcow2 || a.options.iter().any(|o| o.contains("compat=0.10") || o.contains("compat=v2")) {
        return Err(Error::unsupported("persistent bitmaps are unsupported for the output format (qcow2 v3 needed)"));
    }
    if a.snapshot.is_some() {
        return Err(Error::invalid_argument("--bitmaps copies the active state's bitmaps: it does not apply with -l"));
    }
    let mut out = Vec::new();
    for b in sq.bitmaps() {
        if b.inconsistent {
            if a.skip_broken_bitmaps {
                eprintln!("vdisk: warning: skipping inconsistent bitmap '{}'", b.name);
                continue;
            }
            return Err(Error::new(
                vdisk::ErrorKind::Corrupt,
                format!(
                    "cannot copy inconsistent bitmap '{}': try --skip-broken-bitmaps, or remove it with 'vdisk bitmap --remove'",
                    b.name
                ),
            ));
        }
        out.push(b);
    }
    Ok(out)
}

/// `-S SIZE` as qemu-img takes it: 0 (write every byte) or a multiple of
/// 512 up to 16 MiB.
fn sparse_granule(s: &str) -> Result<u64> {
    let g = parse_size(s)?;
    if !g.is_multiple_of(512) || g > 16 << 20 {
        return Err(Error::invalid_argument(format!(
            "invalid -S size '{s}': sizes for sparse output are 0 or multiples of 512 up to 16 MiB"
        )));
    }
    Ok(g)
}
