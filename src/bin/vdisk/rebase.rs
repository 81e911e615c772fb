//! `vdisk rebase`: `qemu-img rebase` — move a qcow2 image onto another
//! backing file (or none) without changing what the guest sees, or with
//! `-u` only rewrite the backing file name and format.

use vdisk::{BlockDevice, Error, Image, Result};

use crate::common::{beside, image_options, open_arg};
use crate::secrets::SecretArgs;

/// Arguments of `vdisk rebase`.
#[derive(clap::Args, Debug)]
pub struct RebaseArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Format of the new backing file (needed with a non-empty -b).
    #[arg(short = 'F', long = "backing-format")]
    pub backing_fmt: Option<String>,
    /// Unsafe: only rewrite the backing file name and format.
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_mode: bool,
    /// The new backing file ("" for none), as the image will record it
    /// (relative names are relative to the image's directory).
    #[arg(short = 'b', long = "backing")]
    pub backing: String,
    /// Show progress (accepted for qemu-img compatibility).
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Write the copied clusters compressed.
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Cache mode of the image (none, writeback, writethrough, directsync, unsafe).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Cache mode of the new backing file.
    #[arg(short = 'T', long = "backing-cache")]
    pub backing_cache: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image to rebase.
    pub image: String,
}

/// Runs `vdisk rebase`.
pub fn run(a: &RebaseArgs) -> Result<i32> {
    crate::common::with_cache(a.backing_cache.as_deref(), || Ok(()))?;
    crate::common::with_cache(a.cache.as_deref(), || rebase(a))
}

fn rebase(a: &RebaseArgs) -> Result<i32> {
    let name = (!a.backing.is_empty()).then_some(a.backing.as_str());
    if name.is_some() && a.backing_fmt.is_none() {
        return Err(Error::invalid_argument(format!(
            "could not change the backing file to '{}': backing format must be specified (-F)",
            a.backing
        )));
    }
    // The image itself, read-write; in safe mode with its backing chain
    // open (the copy reads through it).
    let (path, img) = open_arg(&a.secrets, &a.image, a.format.as_deref(), false, !a.unsafe_mode)?;
    let Image::Qcow2(q) = img else {
        return Err(Error::unsupported(format!("rebase works on qcow2 images; '{}' is {}", a.image, img.format())));
    };
    if a.unsafe_mode {
        q.set_backing_file(name, a.backing_fmt.as_deref())?;
        q.close()?;
        return Ok(0);
    }
    let new_backing = match name {
        None => None,
        Some(n) => {
            // -F is required with a name (checked above).
            let b = crate::common::with_cache(a.backing_cache.as_deref(), || {
                image_options(a.backing_fmt.as_deref(), true, true, None, false)?.open(beside(&path, n))
            })
            .map_err(|e| e.context(format!("opening the new backing file '{n}'")))?;
            Some(b)
        }
    };
    q.rebase_with(new_backing.as_ref().map(|b| b as &dyn BlockDevice), name, a.backing_fmt.as_deref(), a.compress)?;
    Ok(0)
}
