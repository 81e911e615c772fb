//! `vdisk snapshot`: internal snapshots as `qemu-img snapshot` lists,
//! creates, applies and deletes them.

use vdisk::{Error, Image, Result};

use crate::common::{open_arg, open_inspect};
use crate::info::{snapshot_header, snapshot_row};
use crate::secrets::SecretArgs;

/// Arguments of `vdisk snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l', group = "op")]
    pub list: bool,
    /// Create a snapshot named NAME.
    #[arg(short = 'c', group = "op", value_name = "NAME")]
    pub create: Option<String>,
    /// Apply (revert to) the snapshot NAME.
    #[arg(short = 'a', group = "op", value_name = "NAME")]
    pub apply: Option<String>,
    /// Delete the snapshot NAME.
    #[arg(short = 'd', group = "op", value_name = "NAME")]
    pub delete: Option<String>,
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Open even if another process holds the image (with -l only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image.
    pub image: String,
}

/// Runs `vdisk snapshot`.
pub fn run(a: &SnapshotArgs) -> Result<i32> {
    let read_only = a.create.is_none() && a.apply.is_none() && a.delete.is_none();
    if a.force_share && !read_only {
        return Err(Error::invalid_argument("-U (force-share) can only be used with -l (listing)"));
    }
    let (_, img) = if read_only {
        open_inspect(&a.secrets, &a.image, a.format.as_deref(), false, a.force_share)?
    } else {
        open_arg(&a.secrets, &a.image, a.format.as_deref(), false, false)?
    };
    let Image::Qcow2(q) = img else {
        if read_only {
            // qemu-img lists nothing for a format without snapshots.
            return Ok(0);
        }
        return Err(Error::unsupported("only qcow2 images have internal snapshots"));
    };
    if let Some(n) = &a.create {
        q.snapshot_create(n)?;
    } else if let Some(n) = &a.apply {
        q.snapshot_apply(n)?;
    } else if let Some(n) = &a.delete {
        q.snapshot_delete(n)?;
    } else {
        let size = vdisk::BlockDevice::size(&q);
        let snaps = q.snapshots();
        if !snaps.is_empty() {
            outln!("Snapshot list:");
            outln!("{}", snapshot_header());
            for s in snaps {
                outln!("{}", snapshot_row(&s.info(size)));
            }
        }
        return Ok(0);
    }
    q.close()?;
    Ok(0)
}
