//! `vdisk compare`: exit 0 when the guest contents are equal, 1 when they
//! differ (saying where), 2 on error.

use vdisk::Result;

use crate::common::open_arg_shared;

/// Arguments of `vdisk compare`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f', long = "a-format")]
    pub fmt_a: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F', long = "b-format")]
    pub fmt_b: Option<String>,
    /// Strict: images of different sizes differ.
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// Cache mode of both images (none, writeback, writethrough, directsync, unsafe).
    #[arg(short = 'T', long = "cache")]
    pub cache: Option<String>,
    /// Quiet: only the exit code tells the result.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
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
    crate::common::with_cache(a.cache.as_deref(), || compare(a))
}

fn compare(a: &CompareArgs) -> Result<i32> {
    let (_, ia) = open_arg_shared(&a.secrets, &a.a, a.fmt_a.as_deref(), true, true, a.force_share)?;
    let (_, ib) = open_arg_shared(&a.secrets, &a.b, a.fmt_b.as_deref(), true, true, a.force_share)?;
    use vdisk::BlockDevice;
    let say = |m: String| {
        if !a.quiet {
            outln!("{m}");
        }
    };
    if ia.size() != ib.size() && !a.strict {
        say("Warning: Image size mismatch!".into());
    }
    match vdisk::convert::compare(&ia, &ib, a.strict)? {
        None => {
            say("Images are identical.".into());
            Ok(0)
        }
        Some(off) => {
            if a.strict && ia.size() != ib.size() {
                say("Strict mode: Image size mismatch!".into());
            } else {
                say(format!("Content mismatch at offset {off}!"));
            }
            Ok(1)
        }
    }
}
