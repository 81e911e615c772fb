//! `vdisk vol-*`: storage volumes with virsh's verbs, arguments and output.
//! A volume is named by path/key, or by name with `--pool POOL`.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use vdisk::pool::units::{parse_size, pretty};
use vdisk::pool::{
    CloneOptions, Registry, UploadOptions, VolType, Volume, VolumeEncryption, VolumeSpec, WipeAlgorithm,
};
use vdisk::Secret;
use vdisk::{Error, ErrorKind, Format, Result};

use crate::pool::{emit, fail, registry, safe, table};

/// Volume commands.
#[derive(Subcommand, Debug)]
pub enum VolCmd {
    /// List a pool's volumes (virsh vol-list).
    #[command(name = "vol-list")]
    List {
        /// Pool name or UUID.
        #[arg(required_unless_present = "pool_opt")]
        pool: Option<String>,
        /// Pool name or UUID.
        #[arg(long = "pool", id = "pool_opt")]
        pool_opt: Option<String>,
        /// Type, capacity and allocation.
        #[arg(long)]
        details: bool,
    },
    /// Create a volume from arguments (virsh vol-create-as).
    #[command(name = "vol-create-as")]
    CreateAs {
        /// Pool name or UUID.
        pool: String,
        /// Volume name.
        name: String,
        /// Capacity, with virsh's units (8G, 1500M, 10GB = 10^10).
        capacity: String,
        /// raw, qcow2 or vmdk (default raw; qcow2 with a backing volume).
        #[arg(long)]
        format: Option<String>,
        /// Host space to reserve (raw; default 0: sparse).
        #[arg(long)]
        allocation: Option<String>,
        /// qcow2: preallocate metadata.
        #[arg(long = "prealloc-metadata")]
        prealloc_metadata: bool,
        /// The backing volume (name in the pool, or path/key): a linked clone.
        #[arg(long = "backing-vol")]
        backing_vol: Option<String>,
        /// The backing volume's format (required with --backing-vol).
        #[arg(long = "backing-vol-format")]
        backing_vol_format: Option<String>,
        /// qcow2 options, qemu-img style: compat=0.10,cluster_size=64k,...
        #[arg(short = 'o', long = "options")]
        options: Option<String>,
        /// Encrypt with the passphrase in this file: LUKS (a raw volume
        /// becomes a standalone luks volume, qcow2 gets encrypt.format=luks)
        /// unless --encryption-format qcow asks for qcow2's legacy AES.
        #[arg(long = "passphrase-file")]
        passphrase_file: Option<PathBuf>,
        /// luks (default) or qcow (legacy AES, qcow2 only).
        #[arg(long = "encryption-format", requires = "passphrase_file")]
        encryption_format: Option<String>,
        /// Print the volume XML instead of creating.
        #[arg(long = "print-xml")]
        print_xml: bool,
    },
    /// Create a volume from an XML file (virsh vol-create).
    #[command(name = "vol-create")]
    Create {
        /// Pool name or UUID.
        pool: String,
        /// The volume XML file.
        file: PathBuf,
        /// qcow2: preallocate metadata.
        #[arg(long = "prealloc-metadata")]
        prealloc_metadata: bool,
        /// Passphrase file for `<encryption format='luks'|'qcow'>`.
        #[arg(long = "passphrase-file")]
        passphrase_file: Option<PathBuf>,
    },
    /// Copy a volume (virsh vol-clone); --format converts.
    #[command(name = "vol-clone")]
    Clone {
        /// Source volume (name with --pool, or path/key).
        vol: String,
        /// The new volume's name (in the source's pool).
        newname: String,
        /// Pool of the source volume.
        #[arg(long)]
        pool: Option<String>,
        /// Format of the copy (default: the source's).
        #[arg(long)]
        format: Option<String>,
    },
    /// Delete a volume (virsh vol-delete); refused while in use.
    #[command(name = "vol-delete")]
    Delete {
        /// Volume (name with --pool, or path/key).
        vol: String,
        /// Pool name or UUID.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Overwrite a volume's data (virsh vol-wipe).
    #[command(name = "vol-wipe")]
    Wipe {
        /// Volume (name with --pool, or path/key).
        vol: String,
        /// Pool name or UUID.
        #[arg(long)]
        pool: Option<String>,
        /// zero or random.
        #[arg(long, default_value = "zero")]
        algorithm: String,
    },
    /// Change a volume's capacity (virsh vol-resize).
    #[command(name = "vol-resize")]
    Resize {
        /// Volume (name with --pool, or path/key).
        vol: String,
        /// New capacity, or the change with --delta.
        #[arg(allow_hyphen_values = true)]
        capacity: String,
        /// Pool name or UUID.
        #[arg(long)]
        pool: Option<String>,
        /// The capacity is a change of the current one.
        #[arg(long)]
        delta: bool,
        /// Allow shrinking.
        #[arg(long)]
        shrink: bool,
    },
    /// Write a file's bytes into a volume (virsh vol-upload).
    #[command(name = "vol-upload")]
    Upload {
        /// Volume (name with --pool, or path/key).
        vol: String,
        /// Source file (`-`: standard input).
        file: PathBuf,
        /// Pool name or UUID.
        #[arg(long)]
        pool: Option<String>,
        /// Byte offset in the volume.
        #[arg(long, default_value = "0")]
        offset: String,
        /// Bytes to copy (0: all).
        #[arg(long, default_value = "0")]
        length: String,
        /// Keep holes.
        #[arg(long)]
        sparse: bool,
    },
    /// Write a volume's bytes into a file (virsh vol-download).
    #[command(name = "vol-download")]
    Download {
        /// Volume (name with --pool, or path/key).
        vol: String,
        /// Target file (`-`: standard output).
        file: PathBuf,
        /// Pool name or UUID.
        #[arg(long)]
        pool: Option<String>,
        /// Byte offset in the volume.
        #[arg(long, default_value = "0")]
        offset: String,
        /// Bytes to copy (0: all).
        #[arg(long, default_value = "0")]
        length: String,
        /// Keep holes.
        #[arg(long)]
        sparse: bool,
    },
    /// Volume type, capacity and allocation (virsh vol-info).
    #[command(name = "vol-info")]
    Info {
        /// Volume (name with --pool, or path/key).
        vol: String,
        /// Pool name or UUID.
        #[arg(long)]
        pool: Option<String>,
        /// Sizes in bytes.
        #[arg(long)]
        bytes: bool,
        /// Show the file's physical size instead of the allocation.
        #[arg(long)]
        physical: bool,
    },
    /// Print the volume XML (virsh vol-dumpxml).
    #[command(name = "vol-dumpxml")]
    DumpXml {
        /// Volume (name with --pool, or path/key).
        vol: String,
        /// Pool name or UUID.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Print a volume's path (virsh vol-path).
    #[command(name = "vol-path")]
    Path {
        /// Volume (name with --pool, or path/key).
        vol: String,
        /// Pool name or UUID.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Print a volume's key (virsh vol-key).
    #[command(name = "vol-key")]
    Key {
        /// Volume (name with --pool, or path/key).
        vol: String,
        /// Pool name or UUID.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Print a volume's name from its key or path (virsh vol-name).
    #[command(name = "vol-name")]
    Name {
        /// Volume key or path.
        vol: String,
    },
}

/// virsh's volume lookup: by name in `--pool`, else by key/path.
fn lookup(reg: &Registry, vol: &str, pool: Option<&str>) -> Result<Volume> {
    if let Some(p) = pool {
        let p = reg.pool(p)?;
        match p.volume(vol) {
            Ok(v) => return Ok(v),
            Err(e) if e.kind() != ErrorKind::NotFound && !vol.contains('/') => return Err(e),
            Err(e) if !vol.contains('/') => return Err(e),
            Err(_) => {}
        }
    }
    let path = Path::new(vol);
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| Error::io("cannot read the current directory", e))?.join(path)
    };
    reg.volume_by_path(&abs).map_err(|e| {
        if pool.is_none() && !vol.contains('/') {
            e.context(format!("failed to get vol '{vol}' (name it by path, or give --pool)"))
        } else {
            e
        }
    })
}

fn passphrase(file: Option<&PathBuf>) -> Result<Option<Secret>> {
    file.map(|f| Secret::from_file(f)).transpose()
}

fn progress_off() -> Option<vdisk::pool::Progress<'static>> {
    None
}

/// Runs a volume command.
pub fn run(cmd: &VolCmd, config_dir: Option<&PathBuf>) -> Result<i32> {
    let reg = registry(config_dir)?;
    match cmd {
        VolCmd::List { pool, pool_opt, details } => {
            let name = pool.as_deref().or(pool_opt.as_deref()).unwrap_or_default();
            let p = reg.pool(name)?;
            let vols = p.volumes().map_err(fail(format!("Failed to list volumes of pool {name}")))?;
            let mut rows = Vec::new();
            for v in &vols {
                let mut r = vec![safe(&v.name_lossy()), safe(&v.path.to_string_lossy())];
                if *details {
                    r.push(
                        match v.kind {
                            VolType::Dir => "dir",
                            _ => "file",
                        }
                        .into(),
                    );
                    r.push(pretty(v.capacity));
                    r.push(pretty(v.allocation));
                }
                rows.push(r);
            }
            let header: &[&str] =
                if *details { &["Name", "Path", "Type", "Capacity", "Allocation"] } else { &["Name", "Path"] };
            emit(&table(header, &rows));
            for v in &vols {
                if let Some(e) = &v.error {
                    eprintln!("warning: {}: {}", safe(&v.name_lossy()), e);
                }
                if let Some(w) = &v.warning {
                    eprintln!("warning: {}: {}", safe(&v.name_lossy()), w);
                }
            }
        }
        VolCmd::CreateAs {
            pool,
            name,
            capacity,
            format,
            allocation,
            prealloc_metadata,
            backing_vol,
            backing_vol_format,
            options,
            passphrase_file,
            encryption_format,
            print_xml,
        } => {
            let what = format!("Failed to create vol {name}");
            let p = reg.pool(pool)?;
            let fmt = match (format, backing_vol) {
                (Some(f), _) => Format::from_name(f)?,
                (None, Some(_)) => Format::Qcow2,
                (None, None) => Format::Raw,
            };
            let mut spec = VolumeSpec::new(name, parse_size(capacity)?, fmt).map_err(fail(what.clone()))?;
            if let Some(a) = allocation {
                spec.allocation = Some(parse_size(a)?);
            }
            spec.prealloc_metadata = *prealloc_metadata;
            if let Some(o) = options {
                for kv in o.split(',').filter(|s| !s.is_empty()) {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| Error::invalid_argument(format!("option '{kv}' is not key=value")))?;
                    spec.qcow2_options.push((k.into(), v.into()));
                }
            }
            spec.encryption = passphrase(passphrase_file.as_ref())?;
            spec.encryption_format = match encryption_format.as_deref() {
                None | Some("luks") => VolumeEncryption::Luks,
                Some("qcow") => VolumeEncryption::Qcow,
                Some(other) => {
                    return Err(Error::invalid_argument(format!(
                        "--encryption-format '{}': expected luks or qcow",
                        other.escape_debug()
                    )))
                }
            };
            if let Some(b) = backing_vol {
                let bf = backing_vol_format.as_deref().ok_or_else(|| {
                    Error::invalid_argument(
                        "--backing-vol-format is required: vdisk never probes a backing volume's format",
                    )
                })?;
                let bv = lookup(&reg, b, Some(pool)).map_err(fail(what.clone()))?;
                spec = spec.backing(bv.path(), Format::from_name(bf)?);
            }
            if *print_xml {
                out!("{}", spec_xml(&spec));
                return Ok(0);
            }
            p.create_volume(&spec, progress_off()).map_err(fail(what))?;
            outln!("Vol {name} created\n");
        }
        VolCmd::Create { pool, file, prealloc_metadata, passphrase_file } => {
            let what = format!("Failed to create vol from {}", file.display());
            let p = reg.pool(pool)?;
            let md = std::fs::metadata(file).map_err(|e| Error::io("cannot read", e).with_path(file))?;
            if md.len() > vdisk::pool::xml::MAX_XML_BYTES as u64 {
                return Err(Error::limit("the file is larger than 1 MiB").with_path(file));
            }
            let text = std::fs::read_to_string(file).map_err(|e| Error::io("cannot read", e).with_path(file))?;
            let mut spec = vdisk::pool::volxml::spec_from_xml(&text, passphrase(passphrase_file.as_ref())?)
                .map_err(fail(what.clone()))?;
            spec.prealloc_metadata |= *prealloc_metadata;
            let v = p.create_volume(&spec, progress_off()).map_err(fail(what))?;
            outln!("Vol {} created from {}\n", v.name_lossy(), file.display());
        }
        VolCmd::Clone { vol, newname, pool, format } => {
            let src = lookup(&reg, vol, pool.as_deref())?;
            let opts = CloneOptions { format: format.as_deref().map(Format::from_name).transpose()?, progress: None };
            src.pool()
                .clone_volume(&src, newname, &opts)
                .map_err(fail(format!("Failed to clone vol from {}", src.name_lossy())))?;
            outln!("Vol {newname} cloned from {}\n", src.name_lossy());
        }
        VolCmd::Delete { vol, pool } => {
            let v = lookup(&reg, vol, pool.as_deref())?;
            v.delete().map_err(fail(format!("Failed to delete vol {vol}")))?;
            outln!("Vol {vol} deleted\n");
        }
        VolCmd::Wipe { vol, pool, algorithm } => {
            let v = lookup(&reg, vol, pool.as_deref())?;
            let alg = WipeAlgorithm::from_name(algorithm)?;
            v.wipe(alg, None).map_err(fail(format!("Failed to wipe vol {vol}")))?;
            outln!("Vol {vol} wiped\n");
        }
        VolCmd::Resize { vol, capacity, pool, delta, shrink } => {
            let v = lookup(&reg, vol, pool.as_deref())?;
            let what = format!("Failed to change size of volume '{}' to {capacity}", v.name_lossy());
            let (neg, num) = match capacity.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, capacity.as_str()),
            };
            let amount = parse_size(num)?;
            if neg && !*shrink {
                return Err(fail(what)(Error::invalid_argument("negative size requires --shrink")));
            }
            let new = if *delta || neg {
                let cur = v.info()?.capacity;
                if neg || *shrink {
                    cur.checked_sub(amount)
                        .ok_or_else(|| fail(what.clone())(Error::invalid_argument("can't shrink below 0")))?
                } else {
                    cur.checked_add(amount)
                        .ok_or_else(|| fail(what.clone())(Error::invalid_argument("size overflows")))?
                }
            } else {
                amount
            };
            v.resize(new, *shrink).map_err(fail(what))?;
            outln!("Size of volume '{}' successfully changed to {capacity}\n", v.name_lossy());
        }
        VolCmd::Upload { vol, file, pool, offset, length, sparse } => {
            let v = lookup(&reg, vol, pool.as_deref())?;
            let len = parse_size(length)?;
            let opts = UploadOptions { offset: parse_size(offset)?, length: (len > 0).then_some(len), sparse: *sparse };
            let what = format!("cannot upload to volume {vol}");
            if file.as_os_str() == "-" {
                v.upload(&mut std::io::stdin().lock(), &opts, None).map_err(fail(what))?;
            } else {
                let mut f = std::fs::File::open(file).map_err(|e| Error::io("cannot open", e).with_path(file))?;
                v.upload(&mut f, &opts, None).map_err(fail(what))?;
            }
        }
        VolCmd::Download { vol, file, pool, offset, length, sparse } => {
            let v = lookup(&reg, vol, pool.as_deref())?;
            let len = parse_size(length)?;
            let opts = UploadOptions { offset: parse_size(offset)?, length: (len > 0).then_some(len), sparse: *sparse };
            let what = format!("cannot download from volume {vol}");
            if file.as_os_str() == "-" {
                let mut out = std::io::stdout().lock();
                match v.download(&mut out, &opts, None) {
                    // `vol-download ... - | head -c 512`: the reader has all it wants.
                    Err(e) if crate::output::is_broken_pipe(&e) => {}
                    r => {
                        r.map_err(fail(what))?;
                    }
                }
            } else {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(file)
                    .map_err(|e| Error::io("cannot create", e).with_path(file))?;
                v.download_to_file(&f, &opts, None).map_err(fail(what))?;
                f.sync_all().map_err(|e| Error::io("cannot sync", e).with_path(file))?;
            }
        }
        VolCmd::Info { vol, pool, bytes, physical } => {
            let v = lookup(&reg, vol, pool.as_deref())?;
            let i = v.info()?;
            let f = |x: u64| {
                if *bytes {
                    format!("{x} bytes")
                } else {
                    pretty(x)
                }
            };
            outln!("{:<16}{}", "Name:", safe(&i.name_lossy()));
            outln!("{:<16}{}", "Type:", i.kind.libvirt_name());
            outln!("{:<16}{}", "Capacity:", f(i.capacity));
            if *physical {
                outln!("{:<16}{}", "Physical:", f(i.physical));
            } else {
                outln!("{:<16}{}", "Allocation:", f(i.allocation));
            }
            outln!();
        }
        VolCmd::DumpXml { vol, pool } => {
            let v = lookup(&reg, vol, pool.as_deref())?;
            emit(&v.describe()?);
        }
        VolCmd::Path { vol, pool } => {
            let v = lookup(&reg, vol, pool.as_deref())?;
            outln!("{}", v.path().display());
        }
        VolCmd::Key { vol, pool } => {
            let v = lookup(&reg, vol, pool.as_deref())?;
            outln!("{}", v.key().display());
        }
        VolCmd::Name { vol } => {
            let v = lookup(&reg, vol, None)?;
            outln!("{}", v.name_lossy());
        }
    }
    Ok(0)
}

/// The `<volume>` input document for `--print-xml`.
fn spec_xml(spec: &VolumeSpec) -> String {
    use vdisk::pool::xml::Element;
    let mut target = Element::new("target").with_child(Element::new("format").with_attr("type", spec.format.name()));
    if let Some(p) = spec.permissions.to_element() {
        target.push(p);
    }
    if spec.encryption.is_some() {
        target.push(Element::new("encryption").with_attr("format", spec.encryption_format.name()));
    }
    let mut doc = Element::new("volume")
        .with_child(Element::new("name").with_text(spec.name.clone()))
        .with_child(Element::new("capacity").with_attr("unit", "bytes").with_text(spec.capacity.to_string()));
    if let Some(a) = spec.allocation {
        doc.push(Element::new("allocation").with_attr("unit", "bytes").with_text(a.to_string()));
    }
    doc.push(target);
    if let Some(b) = &spec.backing {
        doc.push(
            Element::new("backingStore")
                .with_child(Element::new("path").with_text(b.path.to_string_lossy().into_owned()))
                .with_child(Element::new("format").with_attr("type", b.format.name())),
        );
    }
    doc.to_xml()
}
