//! `vdisk measure`: how large a new image would be, as `qemu-img measure`
//! reports it (same lines, same JSON names, same figures).

use vdisk::qcow2::measure::{measure, Measure};
use vdisk::{BlockDevice, Error, Format, Result};

use crate::common::{open_arg_shared, parse_size};
use crate::secrets::{qcow2_create_options, split_opts, SecretArgs};

/// Arguments of `vdisk measure`.
#[derive(clap::Args, Debug)]
pub struct MeasureArgs {
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Source format (probed when absent).
    #[arg(short = 'f')]
    pub src_fmt: Option<String>,
    /// Format of the image to measure (raw or qcow2).
    #[arg(short = 'O', default_value = "raw")]
    pub out_fmt: String,
    /// Options of the image to measure (`-o key=value,...`).
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Measure an image of this virtual size instead of a source image.
    #[arg(long = "size")]
    pub size: Option<String>,
    /// Measure an internal snapshot of the source (`snapshot.name=NAME`).
    #[arg(short = 'l')]
    pub snapshot: Option<String>,
    /// Open the source even if another process holds it.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// Source image.
    pub image: Option<String>,
}

/// Runs `vdisk measure`.
pub fn run(a: &MeasureArgs) -> Result<i32> {
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        other => return Err(Error::invalid_argument(format!("--output must be human or json, not '{other}'"))),
    };
    let size = match (&a.size, &a.image) {
        (Some(s), None) => Some(parse_size(s)?),
        (None, Some(_)) => None,
        _ => return Err(Error::invalid_argument("either --size N or one filename must be specified")),
    };
    if let Some(s) = size {
        crate::common::check_image_size(s)?;
    }
    let src = match &a.image {
        Some(img) => Some(open_arg_shared(&a.secrets, img, a.src_fmt.as_deref(), true, true, a.force_share)?.1),
        None => None,
    };
    let snap_view;
    let source: Option<&dyn BlockDevice> = match (&src, &a.snapshot) {
        (None, _) => None,
        (Some(s), None) => Some(s),
        (Some(s), Some(spec)) => {
            snap_view = crate::common::snapshot_arg(s, spec)?;
            Some(&snap_view)
        }
    };
    let opts: Vec<String> = a.options.iter().flat_map(|o| split_opts(o)).collect();
    let m = match Format::from_name(&a.out_fmt)? {
        Format::Raw => {
            if let Some(kv) = opts.iter().find(|kv| !kv.starts_with("preallocation=")) {
                return Err(Error::invalid_argument(format!("raw images take no option '{kv}'")));
            }
            let n = source.map_or(size.unwrap_or(0), |s| s.size()).div_ceil(512) * 512;
            Measure { required: n, fully_allocated: n, bitmaps: None }
        }
        Format::Qcow2 => measure(&qcow2_create_options(size.unwrap_or(0), &opts, &a.secrets)?, source)?,
        Format::Vmdk => return Err(Error::unsupported("block driver 'vmdk' does not support size measurement")),
        f @ (Format::Vpc | Format::Vdi) => {
            return Err(Error::unsupported(format!("Block driver '{f}' does not support size measurement")))
        }
        Format::Vhdx => return Err(Error::unsupported("Block driver 'vhdx' does not support size measurement")),
        Format::Luks => {
            let (p, _) = crate::secrets::luks_create_options(&opts, &a.secrets)?;
            let n = source.map_or(size.unwrap_or(0), |s| s.size()).div_ceil(512) * 512;
            let h = if p.detached { 0 } else { vdisk::luks::area_len(&p) };
            Measure { required: n + h, fully_allocated: n + h, bitmaps: None }
        }
    };
    if json {
        // qemu-img's key order (a JSON map here would sort them).
        let mut lines = Vec::new();
        if let Some(b) = m.bitmaps {
            lines.push(format!("    \"bitmaps\": {b}"));
        }
        lines.push(format!("    \"required\": {}", m.required));
        lines.push(format!("    \"fully-allocated\": {}", m.fully_allocated));
        outln!("{{\n{}\n}}", lines.join(",\n"));
    } else {
        outln!("required size: {}", m.required);
        outln!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            outln!("bitmaps size: {b}");
        }
    }
    Ok(0)
}
