//! `vdisk bitmap`: persistent dirty bitmaps as `qemu-img bitmap` manages
//! them (operations applied in command-line order), and `--dump`, which
//! prints a bitmap's dirty ranges as JSON for backup scripts.

use serde_json::json;
use vdisk::{Error, Image, Result};

use crate::common::{open_arg, open_inspect, parse_size, print_json};
use crate::secrets::SecretArgs;

/// Arguments of `vdisk bitmap`.
#[derive(clap::Args, Debug)]
pub struct BitmapArgs {
    /// Add BITMAP (enabled; a later --disable disables it).
    #[arg(long)]
    pub add: bool,
    /// Remove BITMAP.
    #[arg(long)]
    pub remove: bool,
    /// Clear every bit of BITMAP.
    #[arg(long)]
    pub clear: bool,
    /// Enable BITMAP: every write is recorded.
    #[arg(long)]
    pub enable: bool,
    /// Disable BITMAP.
    #[arg(long)]
    pub disable: bool,
    /// Merge the bitmap SOURCE (of this image, or of -b SOURCE_FILE) into BITMAP.
    #[arg(long, value_name = "SOURCE")]
    pub merge: Vec<String>,
    /// Print BITMAP's dirty ranges as JSON (read-only; not in qemu-img).
    #[arg(long, conflicts_with_all = ["add", "remove", "clear", "enable", "disable", "merge"])]
    pub dump: bool,
    /// Granularity of a bitmap --add creates (default: the cluster size within 4 KiB..64 KiB).
    #[arg(short = 'g', long = "granularity", value_name = "SIZE")]
    pub granularity: Option<String>,
    /// The image holding the --merge source bitmap.
    #[arg(short = 'b', long = "source-file", value_name = "SOURCE_FILE")]
    pub source_file: Option<String>,
    /// Format of SOURCE_FILE.
    #[arg(short = 'F', long = "source-format", value_name = "SOURCE_FMT", requires = "source_file")]
    pub source_format: Option<String>,
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Open even if another process holds the image (with --dump only).
    #[arg(short = 'U', long = "force-share", requires = "dump")]
    pub force_share: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image.
    pub image: String,
    /// The bitmap's name.
    pub bitmap: String,
}

/// One operation, in command-line order.
#[derive(Debug)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

/// The operations in the order the command line gives them (clap keeps
/// the values of each flag, not the order between flags).
fn ops_in_order(a: &BitmapArgs) -> Vec<Op> {
    let mut merges = a.merge.iter();
    let mut ops = Vec::new();
    let mut args = std::env::args().skip_while(|x| x != "bitmap").skip(1);
    while let Some(x) = args.next() {
        let op = match x.as_str() {
            "--add" => Op::Add,
            "--remove" => Op::Remove,
            "--clear" => Op::Clear,
            "--enable" => Op::Enable,
            "--disable" => Op::Disable,
            s if s == "--merge" || s.starts_with("--merge=") => {
                if s == "--merge" {
                    args.next();
                }
                match merges.next() {
                    Some(m) => Op::Merge(m.clone()),
                    None => continue,
                }
            }
            "--" => break,
            _ => continue,
        };
        ops.push(op);
    }
    ops
}

/// Runs `vdisk bitmap`.
pub fn run(a: &BitmapArgs) -> Result<i32> {
    if a.dump {
        return dump(a);
    }
    let ops = ops_in_order(a);
    if ops.is_empty() {
        return Err(Error::invalid_argument(
            "need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    if a.granularity.is_some() && !ops.iter().any(|o| matches!(o, Op::Add)) {
        return Err(Error::invalid_argument("granularity only supported with --add"));
    }
    if a.source_file.is_some() && !ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        return Err(Error::invalid_argument("--source-file (-b) only supported with --merge"));
    }
    let granularity = a.granularity.as_deref().map(parse_size).transpose()?;
    let (_, img) = open_arg(&a.secrets, &a.image, a.format.as_deref(), false, false)?;
    let Image::Qcow2(q) = img else {
        return Err(Error::unsupported("only qcow2 images have persistent bitmaps"));
    };
    let mut enabled_on_add = true;
    for (i, op) in ops.iter().enumerate() {
        // `--add --disable` adds a disabled bitmap in one step.
        if matches!(op, Op::Add) && matches!(ops.get(i + 1), Some(Op::Disable)) {
            enabled_on_add = false;
        }
        let r = match op {
            Op::Add => q.bitmap_add(&a.bitmap, granularity, enabled_on_add),
            Op::Remove => q.bitmap_remove(&a.bitmap),
            Op::Clear => q.bitmap_clear(&a.bitmap),
            Op::Enable => q.bitmap_set_enabled(&a.bitmap, true),
            Op::Disable => q.bitmap_set_enabled(&a.bitmap, false),
            Op::Merge(src) => merge(a, &q, src),
        };
        let name = match op {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        };
        r.map_err(|e| e.context(format!("operation {name} on bitmap {}", a.bitmap)))?;
    }
    q.close()?;
    Ok(0)
}

fn merge(a: &BitmapArgs, q: &vdisk::qcow2::Qcow2, src: &str) -> Result<()> {
    let ranges = match &a.source_file {
        None => q.bitmap_dirty_ranges(src, 0, u64::MAX)?,
        Some(file) => {
            let (_, s) = open_inspect(&a.secrets, file, a.source_format.as_deref(), false, true)?;
            let Image::Qcow2(sq) = s else {
                return Err(Error::unsupported(format!("'{file}' is not qcow2: it has no persistent bitmaps")));
            };
            // QEMU merges bitmaps of the same length only.
            let (ss, ts) = (vdisk::BlockDevice::size(&sq), vdisk::BlockDevice::size(q));
            if ss != ts {
                return Err(Error::invalid_argument(format!(
                    "bitmaps of different sizes cannot be merged: '{file}' is {ss} bytes, the image {ts}"
                )));
            }
            sq.bitmap_dirty_ranges(src, 0, u64::MAX)?
        }
    };
    q.bitmap_merge_from(&a.bitmap, &ranges)
}

/// `--dump`: `{"name", "granularity", "virtual-size", "dirty-bytes",
/// "dirty": [{"start", "length"}...]}`.
fn dump(a: &BitmapArgs) -> Result<i32> {
    let (_, img) = open_inspect(&a.secrets, &a.image, a.format.as_deref(), false, a.force_share)?;
    let Image::Qcow2(q) = img else {
        return Err(Error::unsupported("only qcow2 images have persistent bitmaps"));
    };
    let info = q
        .bitmaps()
        .into_iter()
        .find(|b| b.name == a.bitmap)
        .ok_or_else(|| Error::new(vdisk::ErrorKind::NotFound, format!("dirty bitmap '{}' not found", a.bitmap)))?;
    let r = q.bitmap_dirty_ranges(&a.bitmap, 0, u64::MAX)?;
    let total: u64 = r.ranges.iter().map(|x| x.1).sum();
    print_json(&json!({
        "name": info.name,
        "granularity": info.granularity,
        "enabled": info.enabled,
        "virtual-size": vdisk::BlockDevice::size(&q),
        "dirty-bytes": total,
        "dirty": r.ranges.iter().map(|&(s, l)| json!({"start": s, "length": l})).collect::<Vec<_>>(),
    }));
    Ok(0)
}
