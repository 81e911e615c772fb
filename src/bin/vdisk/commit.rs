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
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// The backing file to commit into (only the image's own backing file
    /// is supported; named for qemu-img compatibility).
    #[arg(short = 'b')]
    pub base: Option<std::path::PathBuf>,
    /// Keep the image's data (do not empty it after the commit).
    #[arg(short = 'd', long = "drop")]
    pub keep: bool,
    /// Show progress (accepted for qemu-img compatibility).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image to commit.
    pub image: String,
}

/// Runs `vdisk commit`.
pub fn run(a: &CommitArgs) -> Result<i32> {
    // The image alone: only what it holds itself is read.
    let (path, top) = open_arg(&a.secrets, &a.image, a.format.as_deref(), false, false)?;
    if !a.keep && !matches!(top, Image::Qcow2(_)) {
        return Err(Error::unsupported(format!("a {} image cannot be emptied after the commit: use -d", top.format())));
    }
    let info = vdisk::BlockDevice::info(&top);
    let Some(name) = info.backing_file.clone() else {
        return Err(Error::invalid_argument(format!("image '{}' does not have a backing file", a.image)));
    };
    let base_path = beside(&path, &name);
    if let Some(b) = &a.base {
        let same = |x: &std::path::Path, y: &std::path::Path| match (x.canonicalize(), y.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        };
        if !same(b, &base_path) {
            return Err(Error::unsupported(format!(
                "committing into '{}', which is not the image's own backing file '{name}', is not supported yet",
                b.display()
            )));
        }
    }
    // The backing file read-write, in the format the image records (probed
    // only when it records none, as qemu-img does).
    let base = image_options(info.backing_format.as_deref(), false, true, None, false)?
        .open(&base_path)
        .map_err(|e| e.context(format!("opening the backing file '{name}'")))?;
    vdisk::convert::commit_into(&top, &base)?;
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
