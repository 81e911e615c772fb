//! VHD (`vpc`) and VDI for the CLI verbs: creating them with qemu-img's
//! options and words, and `check` for VDI.

use serde_json::{json, Map, Value};
use vdisk::vdi::{Vdi, VdiCreateOptions};
use vdisk::vpc::{Vpc, VpcCreateOptions};
use vdisk::{BlockDevice, Error, Format, Result};

use crate::common::print_json;

/// Creates a `vpc` or `vdi` image at `path` with the `-o` options `opts`.
/// qemu-img refuses backing files for both formats with this message.
pub fn create(format: Format, path: &std::path::Path, size: u64, opts: &[String]) -> Result<Box<dyn BlockDevice>> {
    Ok(match format {
        Format::Vpc => Box::new(Vpc::create_file(path, size, &VpcCreateOptions::parse(&opts.join(","))?)?),
        Format::Vdi => Box::new(Vdi::create_file(path, size, &VdiCreateOptions::parse(&opts.join(","))?)?),
        other => return Err(Error::internal(format!("{other} is not vpc or vdi"))),
    })
}

/// `vdisk create -f vpc|vdi`: the image and qemu-img's "Formatting" line.
pub fn create_verb(
    format: Format,
    image: &str,
    size: Option<u64>,
    opts: &[String],
    backing: bool,
    quiet: bool,
) -> Result<i32> {
    if backing {
        return Err(Error::unsupported(format!("Backing file not supported for file format '{}'", format.name())));
    }
    let size = size.ok_or_else(|| Error::invalid_argument("Image creation needs a size parameter"))?;
    let dev = create(format, std::path::Path::new(image), size, opts)?;
    dev.make_clean()?;
    if !quiet {
        // qemu-img's order: the driver's option list, not the command line's.
        let order: &[&str] = match format {
            Format::Vpc => &["subformat", "force_size", "preallocation"],
            _ => &["static", "preallocation"],
        };
        let value = |k: &str| opts.iter().rev().find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='));
        let mut line = format!("Formatting '{image}', fmt={} size={size}", format.name());
        for k in order {
            match value(k) {
                Some(v) => line.push_str(&format!(" {k}={v}")),
                None if format == Format::Vdi && *k == "static" => line.push_str(" static=off"),
                None => {}
            }
        }
        for kv in opts.iter().filter(|kv| !order.iter().any(|k| kv.split('=').next() == Some(k))) {
            line.push(' ');
            line.push_str(kv);
        }
        outln!("{line}");
    }
    Ok(0)
}

/// `vdisk check` of a VDI image: qemu-img's messages, JSON and exit codes.
pub fn check_vdi(v: &Vdi, filename: &str, repair: bool, json: bool, quiet: bool) -> Result<i32> {
    if repair {
        eprintln!("vdisk: This image format does not support checks");
        return Ok(63);
    }
    let r = v.check()?;
    if json {
        let mut m = Map::new();
        if r.corruptions > 0 {
            m.insert("corruptions".into(), json!(r.corruptions));
        }
        m.insert("check-errors".into(), json!(0));
        m.insert("filename".into(), json!(filename));
        m.insert("format".into(), json!("vdi"));
        print_json(&Value::Object(m));
    } else {
        for msg in &r.messages {
            eprintln!("{msg}");
        }
        if !quiet {
            if r.corruptions == 0 {
                outln!("No errors were found on the image.");
            } else {
                outln!("\n{} errors were found on the image.", r.corruptions);
                outln!("Data may be corrupted, or further writes to the image may corrupt it.");
            }
        }
    }
    Ok(r.exit_code())
}
