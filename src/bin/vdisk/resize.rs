//! `vdisk resize`: grow (or, when asked, shrink) an image.

use vdisk::{BlockDevice, Error, Image, Result};

use crate::common::{open_arg, parse_size};
use crate::secrets::SecretArgs;

/// Arguments of `vdisk resize`.
#[derive(clap::Args, Debug)]
pub struct ResizeArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Allow shrinking (data beyond the new size is discarded).
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image.
    pub image: String,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// Runs `vdisk resize`.
pub fn run(a: &ResizeArgs) -> Result<i32> {
    let (_, img) = open_arg(&a.secrets, &a.image, a.format.as_deref(), false, true)?;
    let cur = img.size();
    let new = if let Some(d) = a.size.strip_prefix('+') {
        cur.checked_add(parse_size(d)?).ok_or_else(|| Error::invalid_argument("size overflows"))?
    } else if let Some(d) = a.size.strip_prefix('-') {
        cur.checked_sub(parse_size(d)?)
            .ok_or_else(|| Error::invalid_argument(format!("cannot shrink below zero (size is {cur})")))?
    } else {
        parse_size(&a.size)?
    };
    if new < cur && !a.shrink {
        return Err(Error::invalid_argument(
            "use the --shrink option to perform a shrink operation (data beyond the new size is lost)",
        ));
    }
    match &img {
        Image::Qcow2(q) => q.resize_with(new, a.shrink)?,
        other => other.resize(new)?,
    }
    img.close()?;
    if !a.quiet {
        outln!("Image resized.");
    }
    Ok(0)
}
