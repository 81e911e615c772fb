//! `vdisk create`: new images with qemu-img's options.

use std::sync::Arc;

use vdisk::qcow2::create::Preallocation;
use vdisk::{Error, FileStorage, Format, Raw, Result, Storage, VmdkCreateOptions};

use crate::common::{check_image_size, parse_size, CreatedFiles};
use crate::secrets::{qcow2_create_options, split_opts, SecretArgs};

/// Arguments of `vdisk create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Image format: raw, qcow2, vmdk, vpc or vdi.
    #[arg(short = 'f', long = "format", default_value = "raw")]
    pub format: String,
    /// Format options (`-o key=value,...`; repeatable).
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Backing file (the new image is an overlay of it).
    #[arg(short = 'b', long = "backing")]
    pub backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_fmt: Option<String>,
    /// Create an overlay whose backing format stays unrecorded (the backing
    /// file will be probed when opened: only for trusted images).
    #[arg(long = "allow-unknown-backing-format")]
    pub allow_unknown_backing_format: bool,
    /// Unsafe: do not open the backing file (a size must be given; its
    /// format is recorded as -F says).
    #[arg(short = 'u', long = "backing-unsafe")]
    pub backing_unsafe: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The new image.
    pub image: String,
    /// Virtual size (suffixes k, M, G, T...); with a backing file it may be
    /// omitted to use the backing image's size.
    pub size: Option<String>,
}

/// Runs `vdisk create`; a failure removes whatever it had created.
pub fn run(a: &CreateArgs) -> Result<i32> {
    let format = Format::from_name(&a.format)?;
    let size = a.size.as_deref().map(parse_size).transpose()?;
    if let Some(s) = size {
        check_image_size(s)?;
    }
    let path = std::path::Path::new(&a.image);
    let created = CreatedFiles::before(path);
    create(a, format, size, path).inspect_err(|_| created.remove_new())
}

/// The size qemu-img's raw, qcow2 and vmdk drivers give an image asked to
/// be `size` bytes: whole sectors.
fn sector_size(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

fn create(a: &CreateArgs, format: Format, size: Option<u64>, path: &std::path::Path) -> Result<i32> {
    let opts: Vec<String> = a.options.iter().flat_map(|o| split_opts(o)).collect();
    match format {
        Format::Raw => {
            let size = size.ok_or_else(|| Error::invalid_argument("raw images need a size"))?;
            if a.backing.is_some() {
                return Err(Error::invalid_argument("raw images cannot have a backing file"));
            }
            let mut prealloc = "off".to_string();
            for kv in &opts {
                match kv.split_once('=') {
                    Some(("preallocation", v)) => prealloc = v.to_string(),
                    Some(("size", v)) => {
                        let _ = parse_size(v)?;
                    }
                    _ => return Err(Error::invalid_argument(format!("unknown raw option '{kv}'"))),
                }
            }
            let st = Arc::new(FileStorage::create(path)?);
            // Whole sectors, as qemu-img makes them (the line below prints
            // the size asked for, as qemu-img prints it).
            let real = sector_size(size);
            let raw = Raw::create(st.clone(), real)?;
            match prealloc.as_str() {
                "off" => {}
                "falloc" => st.allocate(0, real)?,
                "full" => {
                    let zeros = vec![0u8; 1 << 20];
                    let mut off = 0;
                    while off < real {
                        let n = (real - off).min(1 << 20);
                        st.write_at(&zeros[..n as usize], off)?;
                        off += n;
                    }
                }
                other => {
                    return Err(Error::invalid_argument(format!("preallocation '{other}' is not off, falloc or full")))
                }
            }
            vdisk::BlockDevice::flush(&raw)?;
            if !a.quiet {
                outln!("Formatting '{}', fmt=raw size={size}", a.image);
            }
        }
        Format::Qcow2 => {
            let mut o = qcow2_create_options(size.map_or(0, sector_size), &opts, &a.secrets)?;
            if let Some(b) = &a.backing {
                o.backing_file = Some(b.clone());
            }
            if let Some(f) = &a.backing_fmt {
                o.backing_format = Some(f.clone());
            }
            o.allow_unknown_backing_format = a.allow_unknown_backing_format;
            if size.is_none() && o.backing_file.is_none() && o.size == 0 {
                return Err(Error::invalid_argument("a size is needed (or a backing file to take it from)"));
            }
            let q = if a.backing_unsafe && o.backing_file.is_some() {
                if size.is_none() && o.size == 0 {
                    return Err(Error::invalid_argument(
                        "-u: the backing file is not opened, so the size must be given",
                    ));
                }
                if o.data_file.is_some() {
                    return Err(Error::unsupported("-u with an external data file is not supported"));
                }
                let st = vdisk::FileStorage::create(path)?;
                vdisk::Qcow2::create(std::sync::Arc::new(st), &o, vdisk::Qcow2Options::default())
                    .map_err(|e| e.with_path(path))?
            } else {
                crate::common::create_resolver().create_qcow2(path, &o)?
            };
            let real_size = vdisk::BlockDevice::size(&q);
            q.close()?;
            if !a.quiet {
                let mut line = format!(
                    "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={} compression_type={}",
                    a.image,
                    o.cluster_size,
                    onoff(o.extended_l2),
                    o.compression_type.name()
                );
                if o.preallocation != Preallocation::Off {
                    line.push_str(&format!(" preallocation={}", o.preallocation.name()));
                }
                line.push_str(&format!(" size={}", size.unwrap_or(real_size)));
                if let Some(b) = &o.backing_file {
                    line.push_str(&format!(" backing_file={b}"));
                }
                if let Some(f) = &o.backing_format {
                    line.push_str(&format!(" backing_fmt={f}"));
                }
                if o.encrypt.is_some() {
                    line.push_str(if o.luks.is_some() { " encrypt.format=luks" } else { " encrypt.format=aes" });
                }
                line.push_str(&format!(
                    " lazy_refcounts={} refcount_bits={}",
                    onoff(o.lazy_refcounts),
                    o.refcount_bits
                ));
                outln!("{line}");
            }
        }
        Format::Luks if crate::luks2_cli::wants_luks2(&opts) => {
            let size = size.ok_or_else(|| Error::invalid_argument("luks volumes need a size"))?;
            if a.backing.is_some() {
                return Err(Error::invalid_argument("luks volumes cannot have a backing file"));
            }
            crate::luks2_cli::create(path, &a.image, size, &opts, &a.secrets, a.quiet)?;
        }
        Format::Luks => {
            let size = size.ok_or_else(|| Error::invalid_argument("luks volumes need a size"))?;
            if a.backing.is_some() {
                return Err(Error::invalid_argument("luks volumes cannot have a backing file"));
            }
            let (p, key) = crate::secrets::luks_create_options(&opts, &a.secrets)?;
            let st: Arc<dyn Storage> = Arc::new(FileStorage::create(path)?);
            // A detached header goes alone into the named file (QEMU's
            // detached-header=on): the payload is elsewhere, of any size.
            if p.detached {
                vdisk::luks::Luks::create_header(&*st, &p, &key)?;
            } else {
                vdisk::luks::Luks::create(st, None, size, &p, &key)?.close()?;
            }
            if !a.quiet {
                outln!(
                    "Formatting '{}', fmt=luks size={size} key-secret=... cipher-alg=aes-{} cipher-mode={} ivgen-alg={} hash-alg={} iter-time={}{}",
                    a.image,
                    p.aes_bits,
                    match p.mode {
                        vdisk::luks::LuksMode::Xts => "xts",
                        vdisk::luks::LuksMode::Cbc => "cbc",
                    },
                    p.ivgen.name().split(':').next().unwrap_or(""),
                    p.hash.name(),
                    p.iter_time_ms,
                    if p.detached { " detached-header=on" } else { "" }
                );
            }
        }
        Format::Vmdk => {
            let mut o = opts.clone();
            if let Some(b) = &a.backing {
                o.push(format!("backing_file={b}"));
            }
            if let Some(f) = &a.backing_fmt {
                o.push(format!("backing_fmt={f}"));
            }
            let vo = VmdkCreateOptions::parse(&o.join(","))?;
            let size = match size {
                Some(s) => s,
                None => return Err(Error::invalid_argument("vmdk images need a size")),
            };
            let v = crate::common::create_resolver().create_vmdk(path, sector_size(size), &vo)?;
            v.close()?;
            if !a.quiet {
                // qemu-img's order of the vmdk options, with its defaults.
                let get =
                    |k: &str| o.iter().rev().find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=').map(str::to_string));
                let mut line = format!("Formatting '{}', fmt=vmdk size={size}", a.image);
                for (k, default) in [
                    ("adapter_type", None),
                    ("backing_file", None),
                    ("backing_fmt", None),
                    ("compat6", Some("off")),
                    ("hwversion", Some("undefined")),
                    ("toolsversion", None),
                    ("subformat", None),
                    ("zeroed_grain", None),
                ] {
                    if let Some(v) = get(k).or(default.map(str::to_string)) {
                        line.push_str(&format!(" {k}={v}"));
                    }
                }
                outln!("{line}");
            }
        }
        Format::Vpc | Format::Vdi => {
            return crate::vpcvdi::create_verb(format, &a.image, size, &opts, a.backing.is_some(), a.quiet)
        }
        Format::Vhdx => crate::vhdx_cli::create(a, &opts, size, path)?,
    }
    Ok(0)
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
