//! `vdisk compare`: exit 0 when the guest contents are equal, 1 when they
//! differ (saying where), 2 on error.

use vdisk::Result;

use crate::common::open_arg_shared;

/// Arguments of `vdisk compare`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f')]
    pub fmt_a: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    pub fmt_b: Option<String>,
    /// Strict: images of different sizes differ.
    #[arg(short = 's')]
    pub strict: bool,
    /// Open even if another process holds the images.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub secrets: crate::secrets::SecretArgs,
    /// First image.
    pub a: String,
    /// Second image.
    pub b: String,
}

/// Runs `vdisk compare`.
pub fn run(a: &CompareArgs) -> Result<i32> {
    let (_, ia) = open_arg_shared(&a.secrets, &a.a, a.fmt_a.as_deref(), true, true, a.force_share)?;
    let (_, ib) = open_arg_shared(&a.secrets, &a.b, a.fmt_b.as_deref(), true, true, a.force_share)?;
    use vdisk::BlockDevice;
    if ia.size() != ib.size() && !a.strict {
        outln!("Warning: Image size mismatch!");
    }
    match vdisk::convert::compare(&ia, &ib, a.strict)? {
        None => {
            outln!("Images are identical.");
            Ok(0)
        }
        Some(off) => {
            if a.strict && ia.size() != ib.size() {
                outln!("Strict mode: Image size mismatch!");
            } else {
                outln!("Content mismatch at offset {off}!");
            }
            Ok(1)
        }
    }
}
