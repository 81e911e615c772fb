//! The VHDX parts of `vdisk create`, `convert` and `check`, with qemu-img's
//! words and exit codes.

use std::path::Path;

use serde_json::json;
use vdisk::{Error, Result, Vhdx, VhdxCreateOptions};

use crate::check::CheckArgs;
use crate::create::CreateArgs;

fn parse(opts: &[String], backing: Option<&str>, backing_fmt: Option<&str>) -> Result<VhdxCreateOptions> {
    let mut o = opts.to_vec();
    if let Some(b) = backing {
        o.push(format!("backing_file={b}"));
    }
    if let Some(f) = backing_fmt {
        o.push(format!("backing_fmt={f}"));
    }
    VhdxCreateOptions::parse(&o.join(","))
}

/// `vdisk create -f vhdx`.
pub fn create(a: &CreateArgs, opts: &[String], size: Option<u64>, path: &Path) -> Result<()> {
    let vo = parse(opts, a.backing.as_deref(), a.backing_fmt.as_deref())?;
    let size = match (size, &vo.backing_file) {
        (Some(s), _) => s,
        (None, Some(_)) => 0,
        (None, None) => return Err(Error::invalid_argument("vhdx images need a size")),
    };
    let v = crate::common::create_resolver().create_vhdx(path, size, &vo)?;
    // A differencing image without a size takes its parent's.
    let size = if size == 0 { vdisk::BlockDevice::size(&v) } else { size };
    v.close()?;
    if !a.quiet {
        // qemu-img's line: the size asked for and the options given, in
        // its order.
        let mut line = format!(
            "Formatting '{}', fmt=vhdx size={size} log_size={} block_size={}",
            a.image, vo.log_size, vo.block_size
        );
        let given = |k: &str| opts.iter().find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')));
        if let Some(s) = given("subformat") {
            line.push_str(&format!(" subformat={s}"));
        }
        if let Some(s) = given("block_state_zero") {
            line.push_str(&format!(" block_state_zero={s}"));
        }
        outln!("{line}");
    }
    Ok(())
}

/// The target of `vdisk convert -O vhdx`.
pub fn create_for_convert(dst: &Path, size: u64, opts: &[String]) -> Result<Vhdx> {
    let vo = parse(opts, None, None)?;
    crate::common::create_resolver().create_vhdx(dst, size, &vo)
}

/// Whether `vdisk check` should take the VHDX path: `-f vhdx`, or no
/// format and a file that starts with the VHDX signature.
pub fn is_vhdx(a: &CheckArgs) -> bool {
    match a.format.as_deref() {
        Some(f) => f == "vhdx",
        None => {
            use std::io::Read;
            let mut sig = [0u8; 8];
            std::fs::File::open(&a.image).and_then(|mut f| f.read_exact(&mut sig)).is_ok() && &sig == b"vhdxfile"
        }
    }
}

/// `vdisk check` of a VHDX image: QEMU's verdicts (BAT entries past the
/// end of the file or into metadata are corruptions; a log replayed by
/// `-r all` is a corruption fixed) and exit codes (0 clean, 2 corrupt, 1
/// the image cannot be opened: a read-only check of an image whose log
/// needs replaying fails, as in QEMU).
pub fn check(a: &CheckArgs, json_out: bool, repair: bool) -> Result<i32> {
    let path = Path::new(&a.image);
    let opts = crate::common::image_options(Some("vhdx"), !repair, false, None, a.force_share)?.vhdx_for_check(true);
    let img = opts.open(path)?;
    let vdisk::Image::Vhdx(v) = img else {
        return Err(Error::internal("a vhdx open returned another format"));
    };
    if !repair && v.log_replayed() {
        return Err(Error::invalid(format!(
            "VHDX image file '{0}' opened read-only, but contains a log that needs to be replayed\nTo replay the log, run:\nqemu-img check -r all '{0}'",
            a.image
        )));
    }
    let r = v.check();
    v.close()?;
    if json_out {
        let mut m = serde_json::Map::new();
        m.insert("check-errors".into(), json!(0));
        if r.corruptions > 0 {
            m.insert("corruptions".into(), json!(r.corruptions));
        }
        if r.corruptions_fixed > 0 {
            m.insert("corruptions-fixed".into(), json!(r.corruptions_fixed));
        }
        m.insert("filename".into(), json!(a.image));
        m.insert("format".into(), json!("vhdx"));
        crate::common::print_json(&serde_json::Value::Object(m));
    } else if !a.quiet {
        for m in &r.messages {
            eprintln!("{m}");
        }
        if r.corruptions_fixed > 0 {
            outln!("The following inconsistencies were found and repaired:\n");
            outln!("    0 leaked clusters");
            outln!("    {} corruptions\n", r.corruptions_fixed);
            outln!("Double checking the fixed image now...");
        }
        if r.corruptions == 0 {
            outln!("No errors were found on the image.");
        } else {
            outln!("\n{} errors were found on the image.", r.corruptions);
            outln!("Data may be corrupted, or further writes to the image may corrupt it.");
        }
    }
    Ok(r.exit_code())
}
