//! `vdisk rebase`: `qemu-img rebase` — move a qcow2 image onto another
//! backing file (or none) without changing what the guest sees, or with
//! `-u` only rewrite the backing file name and format.

use vdisk::{BackingPolicy, BlockDevice, Error, Format, Image, OpenOptions, Result};

use crate::secrets::SecretArgs;

/// Arguments of `vdisk rebase`.
#[derive(clap::Args, Debug)]
pub struct RebaseArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Format of the new backing file (needed with a non-empty -b).
    #[arg(short = 'F')]
    pub backing_fmt: Option<String>,
    /// Unsafe: only rewrite the backing file name and format.
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    /// The new backing file ("" for none), as the image will record it
    /// (relative names are relative to the image's directory).
    #[arg(short = 'b')]
    pub backing: String,
    /// Show progress (accepted for qemu-img compatibility).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image to rebase.
    pub image: String,
}

/// Runs `vdisk rebase`.
pub fn run(a: &RebaseArgs) -> Result<i32> {
    let name = (!a.backing.is_empty()).then_some(a.backing.as_str());
    if name.is_some() && a.backing_fmt.is_none() {
        return Err(Error::invalid_argument(format!(
            "could not change the backing file to '{}': backing format must be specified (-F)",
            a.backing
        )));
    }
    let spec = a.secrets.image(&a.image, a.format.as_deref())?;
    let key = a.secrets.key(spec.key_secret.as_deref())?;
    // The image itself, read-write; in safe mode with its backing chain
    // open (the copy reads through it).
    let mut opts = OpenOptions::new().key_opt(key).backing(if a.unsafe_mode {
        BackingPolicy::Never
    } else {
        BackingPolicy::Follow
    });
    opts = match spec.format.as_deref() {
        Some(f) => opts.format(Format::from_name(f)?),
        None => opts.probe(true),
    };
    let img = opts.open(&spec.path)?;
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
            let dir = spec.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let p = if std::path::Path::new(n).is_absolute() { std::path::PathBuf::from(n) } else { dir.join(n) };
            let f = Format::from_name(a.backing_fmt.as_deref().unwrap_or("raw"))?;
            let b = OpenOptions::new()
                .format(f)
                .read_only(true)
                .backing(BackingPolicy::Follow)
                .open(&p)
                .map_err(|e| e.context(format!("opening the new backing file '{n}'")))?;
            Some(b)
        }
    };
    q.rebase(new_backing.as_ref().map(|b| b as &dyn BlockDevice), name, a.backing_fmt.as_deref())?;
    Ok(0)
}
