//! `vdisk convert`: copies an image into a new one of any writable format,
//! keeping holes.

use std::path::PathBuf;
use std::sync::Arc;

use vdisk::convert::ConvertOptions;
use vdisk::vmdk::Subformat;
use vdisk::{BlockDevice, Error, FileStorage, Format, Raw, Result, Vmdk, VmdkCreateOptions};

use crate::common::{open_image_shared, parse_size, progress_printer, stdout_is_terminal};

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
    /// Worker threads.
    #[arg(short = 'm', default_value = "0")]
    pub threads: usize,
    /// Zero detection granule (`-S 0` writes every byte).
    #[arg(short = 'S', default_value = "4k")]
    pub sparse: String,
    /// Open even if another process holds the source.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Source image.
    pub src: PathBuf,
    /// Destination image (created, replacing any file there).
    pub dst: PathBuf,
}

/// Runs `vdisk convert`.
pub fn run(a: &ConvertArgs) -> Result<i32> {
    let src = open_image_shared(&a.src, a.src_fmt.as_deref(), true, true, a.force_share)?;
    let out = Format::from_name(&a.out_fmt)?;
    let size = src.size();
    let mut compress = a.compress;
    let dst: Box<dyn BlockDevice> = match out {
        Format::Raw => {
            if a.compress {
                return Err(Error::invalid_argument("raw output cannot be compressed"));
            }
            if !a.options.is_empty() {
                return Err(Error::invalid_argument("raw output takes no -o options"));
            }
            let st = FileStorage::create(&a.dst)?;
            Box::new(Raw::create(Arc::new(st), size)?)
        }
        Format::Vmdk => {
            let o = VmdkCreateOptions::parse(&a.options.join(","))?;
            if o.subformat == Subformat::StreamOptimized {
                // Stream grains are compressed and written whole, once.
                compress = true;
            } else if compress {
                return Err(Error::invalid_argument(
                    "vmdk output can be compressed only with subformat=streamOptimized",
                ));
            }
            Box::new(Vmdk::create(&a.dst, size, &o)?)
        }
        other => {
            return Err(Error::unsupported(format!(
                "{other} output is not supported yet"
            )))
        }
    };
    let show = a.progress && stdout_is_terminal();
    let progress = progress_printer(show);
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        a.threads
    };
    let opts = ConvertOptions {
        threads,
        sparse_granule: parse_size(&a.sparse)?,
        progress: Some(&progress),
        compress,
        ..ConvertOptions::default()
    };
    vdisk::convert::convert(&src, &*dst, &opts)?;
    dst.flush()?;
    if show {
        println!("    (100.00/100%)");
    }
    Ok(0)
}
