//! `vdisk commit`: `qemu-img commit` — write what an image holds into its
//! backing file, then (unless `-d`) empty the image so it reads through.
//!
//! The order keeps the guest's view at every moment: the backing file is
//! written and flushed before the image is emptied.

use vdisk::{Error, Image, Result};

use crate::common::{beside, image_options, open_arg};
use crate::secrets::SecretArgs;

/// Arguments of `vdisk commit`.
#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// The backing file to commit into (only the image's own backing file
    /// is supported; named for qemu-img compatibility).
    #[arg(short = 'b', long = "base")]
    pub base: Option<std::path::PathBuf>,
    /// Keep the image's data (do not empty it after the commit).
    #[arg(short = 'd', long = "drop")]
    pub keep: bool,
    /// Show progress (accepted for qemu-img compatibility).
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode of the images (none, writeback, writethrough, directsync, unsafe).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Copy at most RATE bytes per second (qemu's size suffixes).
    #[arg(short = 'r', long = "rate")]
    pub rate: Option<String>,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image to commit.
    pub image: String,
}

/// Runs `vdisk commit`.
pub fn run(a: &CommitArgs) -> Result<i32> {
    crate::common::with_cache(a.cache.as_deref(), || commit(a))
}

fn same_file(x: &std::path::Path, y: &std::path::Path) -> bool {
    match (x.canonicalize(), y.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn commit(a: &CommitArgs) -> Result<i32> {
    let rate = a.rate.as_deref().map(crate::common::parse_size).transpose()?;
    let copts = vdisk::convert::CommitOptions { rate };
    // The image alone: only what it holds itself is read.
    let (path, top) = open_arg(&a.secrets, &a.image, a.format.as_deref(), false, false)?;
    let info = vdisk::BlockDevice::info(&top);
    let Some(name) = info.backing_file.clone() else {
        return Err(Error::invalid_argument(format!("image '{}' does not have a backing file", a.image)));
    };
    let base_path = beside(&path, &name);
    if let Some(b) = a.base.as_ref().filter(|b| !same_file(b, &base_path)) {
        return commit_deeper(a, &path, top, b, &copts);
    }
    if !a.keep && !matches!(top, Image::Qcow2(_)) {
        return Err(Error::unsupported(format!("a {} image cannot be emptied after the commit: use -d", top.format())));
    }
    // The backing file read-write, in the format the image records (probed
    // only when it records none, as qemu-img does).
    let base = image_options(info.backing_format.as_deref(), false, true, None, false)?
        .open(&base_path)
        .map_err(|e| e.context(format!("opening the backing file '{name}'")))?;
    vdisk::convert::commit_into_with(&top, &base, &copts)?;
    base.close()?;
    if let (false, Image::Qcow2(q)) = (a.keep, &top) {
        q.make_empty()?;
    }
    top.close()?;
    if !a.quiet {
        outln!("Image committed.");
    }
    Ok(0)
}

/// `-b BASE` further down the chain, as qemu-img does it: what every image
/// above BASE holds goes into BASE, the deepest first so that the upper
/// images' data wins; no image is emptied and no backing link changes
/// (the images between keep their data, now also in BASE).
fn commit_deeper(
    a: &CommitArgs,
    top_path: &std::path::Path,
    top: Image,
    base: &std::path::Path,
    copts: &vdisk::convert::CommitOptions,
) -> Result<i32> {
    // The chain from the top's backing file down to BASE, each layer alone.
    let mut layers: Vec<Image> = vec![top];
    let mut path = top_path.to_path_buf();
    let base_image = loop {
        let info = vdisk::BlockDevice::info(layers.last().expect("the top"));
        let Some(name) = info.backing_file.clone() else {
            return Err(Error::invalid_argument(format!(
                "'{}' is not in the backing chain of '{}'",
                base.display(),
                a.image
            )));
        };
        if layers.len() > vdisk::limits::MAX_BACKING_DEPTH {
            return Err(Error::limit("the backing chain is too deep"));
        }
        let next = beside(&path, &name);
        if same_file(&next, base) {
            break image_options(info.backing_format.as_deref(), false, true, None, false)?
                .open(&next)
                .map_err(|e| e.context(format!("opening the base image '{}'", base.display())))?;
        }
        let layer = image_options(info.backing_format.as_deref(), true, false, None, false)?
            .open(&next)
            .map_err(|e| e.context(format!("opening the backing file '{name}'")))?;
        layers.push(layer);
        path = next;
    };
    for layer in layers.iter().rev() {
        vdisk::convert::commit_into_with(layer, &base_image, copts)?;
    }
    base_image.close()?;
    for layer in layers {
        layer.close()?;
    }
    if !a.quiet {
        outln!("Image committed.");
    }
    Ok(0)
}
