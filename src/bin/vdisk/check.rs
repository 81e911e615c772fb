//! `vdisk check`: what `qemu-img check` reports, with its words, JSON field
//! names and exit codes (0 clean, 2 corrupted, 3 leaks only, 1 check failed).

use serde_json::{json, Map, Value};
use vdisk::qcow2::check::{CheckReport, Repair};
use vdisk::{Error, Image, Result};

use crate::common::{open_arg_shared, print_json};
use crate::secrets::SecretArgs;

/// Arguments of `vdisk check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Repair: `leaks` or `all`.
    #[arg(short = 'r', long = "repair")]
    pub repair: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Cache mode (none, writeback, writethrough, directsync, unsafe).
    #[arg(short = 'T', long = "cache")]
    pub cache: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Open even if another process holds the image (no repair).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image.
    pub image: String,
}

fn pct(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 * 100.0 / d as f64
    }
}

fn human(r: &CheckReport, repaired: bool) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    for n in &r.notes {
        eprintln!("Warning: {n}");
    }
    if repaired && (r.leaks_fixed > 0 || r.corruptions_fixed > 0) {
        outln!("The following inconsistencies were found and repaired:\n");
        outln!("    {} leaked clusters", r.leaks_fixed);
        outln!("    {} corruptions\n", r.corruptions_fixed);
        outln!("Double checking the fixed image now...");
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        outln!("No errors were found on the image.");
    } else {
        if r.corruptions > 0 {
            outln!("\n{} errors were found on the image.", r.corruptions);
            outln!("Data may be corrupted, or further writes to the image may corrupt it.");
        }
        if r.leaks > 0 {
            outln!("\n{} leaked clusters were found on the image.", r.leaks);
            outln!("This means waste of disk space, but no harm to data.");
        }
        if r.check_errors > 0 {
            outln!("\n{} internal errors have occurred during the check.", r.check_errors);
        }
    }
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        outln!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    if r.image_end_offset > 0 {
        outln!("Image end offset: {}", r.image_end_offset);
    }
}

fn to_json(r: &CheckReport, filename: &str, format: &str) -> Value {
    let mut m = Map::new();
    m.insert("image-end-offset".into(), json!(r.image_end_offset));
    m.insert("total-clusters".into(), json!(r.total_clusters));
    m.insert("check-errors".into(), json!(r.check_errors));
    if r.corruptions > 0 {
        m.insert("corruptions".into(), json!(r.corruptions));
    }
    if r.leaks > 0 {
        m.insert("leaks".into(), json!(r.leaks));
    }
    if r.corruptions_fixed > 0 {
        m.insert("corruptions-fixed".into(), json!(r.corruptions_fixed));
    }
    if r.leaks_fixed > 0 {
        m.insert("leaks-fixed".into(), json!(r.leaks_fixed));
    }
    // (qemu-img leaves these three out when they are zero.)
    if r.allocated_clusters > 0 {
        m.insert("allocated-clusters".into(), json!(r.allocated_clusters));
    }
    if r.fragmented_clusters > 0 {
        m.insert("fragmented-clusters".into(), json!(r.fragmented_clusters));
    }
    if r.compressed_clusters > 0 {
        m.insert("compressed-clusters".into(), json!(r.compressed_clusters));
    }
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!(format));
    Value::Object(m)
}

/// Runs `vdisk check`.
pub fn run(a: &CheckArgs) -> Result<i32> {
    crate::common::with_cache(a.cache.as_deref(), || check(a))
}

fn check(a: &CheckArgs) -> Result<i32> {
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        other => return Err(Error::invalid_argument(format!("--output must be human or json, not '{other}'"))),
    };
    let repair = match a.repair.as_deref() {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(other) => return Err(Error::invalid_argument(format!("-r must be leaks or all, not '{other}'"))),
    };
    let read_only = repair == Repair::None;
    if a.force_share && !read_only {
        return Err(Error::invalid_argument("-U (force-share) can only be used without -r (read-only checks)"));
    }
    if crate::vhdx_cli::is_vhdx(a) {
        return crate::vhdx_cli::check(a, json, repair != Repair::None);
    }
    // Formats without repairs (qemu-img's exit 63 for `-r`) are opened
    // read-only: a VDI that refuses read-write opens (blocks shared by two
    // entries) is still checked.
    let no_repairs = match a.format.as_deref() {
        Some(f) => f == "vdi" || f == "vpc",
        None => vdisk::FileStorage::open(std::path::Path::new(&a.image), true)
            .and_then(|st| vdisk::probe::probe(&st))
            .is_ok_and(|f| matches!(f, vdisk::Format::Vdi | vdisk::Format::Vpc)),
    };
    let read_only = read_only || no_repairs;
    let (path, img) = open_arg_shared(&a.secrets, &a.image, a.format.as_deref(), read_only, false, a.force_share)?;
    let filename = path.display().to_string();
    match img {
        Image::Qcow2(q) => {
            let r = q.check(repair)?;
            if json {
                print_json(&to_json(&r, &filename, "qcow2"));
            } else if !a.quiet {
                human(&r, repair != Repair::None);
            }
            Ok(r.exit_code())
        }
        Image::Vmdk(v) => {
            if repair != Repair::None {
                return Err(Error::unsupported("vmdk images cannot be repaired"));
            }
            let r = v.check()?;
            if json {
                // Counts of zero are left out, as qemu-img leaves them out.
                let mut m = Map::new();
                m.insert("check-errors".into(), json!(0));
                for (k, v) in [
                    ("corruptions", r.errors),
                    ("allocated-clusters", r.allocated_grains),
                    ("compressed-clusters", r.compressed_grains),
                ] {
                    if v > 0 {
                        m.insert(k.into(), json!(v));
                    }
                }
                m.insert("filename".into(), json!(filename));
                m.insert("format".into(), json!("vmdk"));
                print_json(&Value::Object(m));
            } else if !a.quiet {
                for m in &r.messages {
                    eprintln!("{m}");
                }
                if r.errors == 0 {
                    outln!("No errors were found on the image.");
                } else {
                    outln!("\n{} errors were found on the image.", r.errors);
                }
            }
            Ok(if r.errors > 0 { 2 } else { 0 })
        }
        Image::Vpc(_) => {
            // qemu-img's exit code for formats without a check.
            eprintln!("vdisk: this image format does not support checks");
            Ok(63)
        }
        Image::Vdi(v) => crate::vpcvdi::check_vdi(&v, &filename, repair != Repair::None, json, a.quiet),
        _ => {
            // qemu-img's exit code for a format without checks.
            eprintln!("vdisk: this image format does not support checks");
            Ok(63)
        }
    }
}
