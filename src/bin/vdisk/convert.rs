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
    #[arg(short = 'f')]
    pub src_fmt: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    pub out_fmt: String,
    /// Show progress (on a terminal).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Compress the output (qcow2, vmdk streamOptimized).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Output format options (`-o key=value,...`).
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Export an internal snapshot instead of the current state
    /// (`-l snapshot.name=NAME` or `-l snapshot.id=ID`).
    #[arg(short = 'l')]
    pub snapshot: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(short = 'm', default_value = "0")]
    pub threads: usize,
    /// Zero detection granule (`-S 0` writes every byte).
    #[arg(short = 'S', default_value = "4k")]
    pub sparse: String,
    /// Open even if another process holds the source.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Backing file of the new image (as `-o backing_file=`): only what
    /// reads differently from it is written.
    #[arg(short = 'B')]
    pub backing: Option<String>,
    /// Format of the `-B` backing file (as `-o backing_fmt=`).
    #[arg(short = 'F')]
    pub backing_fmt: Option<String>,
    /// Do not create the destination: write into the existing image (of
    /// format -O), which must be at least as large as the source.
    #[arg(short = 'n')]
    pub no_create: bool,
    /// With -n: the existing destination reads as zeros everywhere, so zero
    /// ranges need no write.
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// Source image.
    pub src: String,
    /// Destination image (created, replacing any file there, unless -n).
    pub dst: PathBuf,
}

/// Runs `vdisk convert`; a failure removes the files it had created.
pub fn run(a: &ConvertArgs) -> Result<i32> {
    let created = CreatedFiles::before(&a.dst);
    convert(a).inspect_err(|_| created.remove_new())
}

fn convert(a: &ConvertArgs) -> Result<i32> {
    let (_, src) = open_arg_shared(&a.secrets, &a.src, a.src_fmt.as_deref(), true, true, a.force_share)?;
    let snap_view;
    let source: &dyn BlockDevice = match &a.snapshot {
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
    let mut compress = a.compress;
    let mut unit = 2u64 << 20;
    let dst: Box<dyn BlockDevice> = if a.no_create {
        if !opts.is_empty() {
            return Err(Error::invalid_argument("-n writes into an existing image: -o, -B and -F do not apply"));
        }
        // The existing target, its backing chain followed (what it reads
        // through is compared, not overwritten blindly).
        let img = crate::common::image_options(Some(out.name()), false, true, None, false)?.open(&a.dst)?;
        if img.size() < size {
            return Err(Error::invalid_argument(format!(
                "the target of {} bytes is smaller than the source of {size} bytes",
                img.size()
            )));
        }
        if compress {
            unit = unit.div_ceil(img.info().cluster_size.unwrap_or(65536)) * img.info().cluster_size.unwrap_or(65536);
        }
        Box::new(img)
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
                Box::new(crate::common::create_resolver().create_qcow2(&a.dst, &o)?)
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
        }
    };
    let show = a.progress && stdout_is_terminal();
    let progress = progress_printer(show);
    let threads = if a.threads == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { a.threads };
    let copts = ConvertOptions {
        threads,
        unit,
        sparse_granule: sparse_granule(&a.sparse)?,
        progress: Some(&progress),
        compress,
        // A target that was there before holds whatever it held.
        dst_is_zeroed: !a.no_create || a.target_is_zero,
    };
    vdisk::convert::convert(source, &*dst, &copts)?;
    dst.make_clean()?;
    if show {
        outln!("    (100.00/100%)");
    }
    Ok(0)
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
