//! `vdisk resize`: grow (or, when asked, shrink) an image.

use vdisk::{BlockDevice, Error, Image, Result};

use crate::common::{open_arg, parse_size};
use crate::secrets::SecretArgs;

/// Arguments of `vdisk resize`.
#[derive(clap::Args, Debug)]
pub struct ResizeArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Allow shrinking (data beyond the new size is discarded).
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// How the new space is allocated when growing: off, falloc (raw) or
    /// full (raw and qcow2: the new range is written with zeros).
    #[arg(long = "preallocation", default_value = "off")]
    pub preallocation: String,
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
    let (path, img) = open_arg(&a.secrets, &a.image, a.format.as_deref(), false, true)?;
    match (a.preallocation.as_str(), img.format()) {
        ("off", _) | ("full", vdisk::Format::Raw | vdisk::Format::Qcow2) | ("falloc", vdisk::Format::Raw) => {}
        ("metadata" | "falloc" | "full", f) => {
            return Err(Error::unsupported(format!(
                "preallocation mode '{}' is not supported when resizing {f} images",
                a.preallocation
            )))
        }
        (other, _) => {
            return Err(Error::invalid_argument(format!(
                "invalid preallocation mode '{other}': off, metadata, falloc or full"
            )))
        }
    }
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
    if new < cur && a.preallocation != "off" {
        return Err(Error::invalid_argument("preallocation applies only when growing"));
    }
    match &img {
        Image::Qcow2(q) => q.resize_with(new, a.shrink)?,
        other => other.resize(new)?,
    }
    if new > cur {
        match a.preallocation.as_str() {
            "falloc" => {
                let st = vdisk::FileStorage::open(&path, false)?;
                vdisk::Storage::allocate(&st, cur, new - cur)?;
            }
            "full" => {
                // Zeros written as data: every new byte allocated.
                let zeros = vec![0u8; 1 << 20];
                let mut at = cur;
                while at < new {
                    let n = (new - at).min(zeros.len() as u64);
                    img.write_at(&zeros[..n as usize], at)?;
                    at += n;
                }
            }
            _ => {}
        }
    }
    img.close()?;
    if !a.quiet {
        outln!("Image resized.");
    }
    Ok(0)
}
