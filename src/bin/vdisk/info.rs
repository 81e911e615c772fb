//! `vdisk info`: what `qemu-img info` shows.

use std::path::Path;

use serde_json::{json, Map, Value};
use vdisk::device::{FormatDetails, SnapshotInfo};
use vdisk::{BlockDevice, DeviceInfo, Image, Result};

use crate::common::{human_size, open_inspect, print_json};

/// Arguments of `vdisk info`.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Show every image of the backing chain.
    #[arg(short = 'b', long = "backing-chain")]
    pub backing_chain: bool,
    /// Open even if another process holds the image (read-only, no locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub secrets: crate::secrets::SecretArgs,
    /// The image.
    pub image: String,
}

struct Layer {
    filename: String,
    /// The protocol-level files under the image, as qemu-img lists them
    /// (`extents.N` for a vmdk's extent files, then `file`).
    info: DeviceInfo,
    actual_size: Option<u64>,
    full_backing: Option<String>,
}

/// A file under an image: its node name, path, length and allocated bytes.
struct Child {
    name: String,
    filename: String,
    length: u64,
    actual: u64,
}

fn child(name: String, path: &Path) -> Option<Child> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    // The length in whole sectors, as QEMU's block layer reports it.
    Some(Child {
        name,
        filename: path.display().to_string(),
        length: m.len().div_ceil(512) * 512,
        actual: m.blocks() * 512,
    })
}

/// The files under layer `l` (what qemu-img prints as child nodes).
fn children(l: &Layer) -> Vec<Child> {
    let image = Path::new(&l.filename);
    let mut out = Vec::new();
    if let FormatDetails::Vmdk(v) = &l.info.details {
        // (Extent names are paths by now: see `qemu_view`.)
        for (k, e) in v.extents.iter().enumerate() {
            if e.filename.is_empty() {
                continue;
            }
            let p = Path::new(&e.filename);
            if p != image {
                out.extend(child(format!("extents.{k}"), p));
            }
        }
    }
    out.extend(child("file".into(), image));
    out
}

fn child_json(c: &Child) -> Value {
    json!({ "name": c.name, "info": {
        "children": [], "virtual-size": c.length, "filename": c.filename, "format": "file",
        "actual-size": c.actual, "format-specific": { "type": "file", "data": {} }, "dirty-flag": false } })
}

fn print_children(l: &Layer) {
    for c in children(l) {
        outln!("Child node '/{}':", c.name);
        outln!("    filename: {}", c.filename);
        outln!("    protocol type: file");
        outln!("    file length: {} ({} bytes)", human_size(c.length), c.length);
        outln!("    disk size: {}", human_size(c.actual));
    }
}

fn layer(path: &Path, img: &Image) -> Layer {
    let info = img.info();
    let full_backing = info.backing_file.as_ref().map(|b| {
        let p = Path::new(b);
        if p.is_absolute() {
            b.clone()
        } else {
            path.parent().unwrap_or(Path::new("")).join(p).display().to_string()
        }
    });
    let mut l = Layer { filename: path.display().to_string(), actual_size: img.allocated_bytes(), info, full_backing };
    qemu_view(&mut l);
    l
}

/// What qemu-img shows differently from the device's own description: a
/// raw image's size in whole sectors; a vmdk's extent files named by their
/// path, an extent inside the descriptor's own file (embedded descriptor)
/// without a type, and the size on disk of every file together.
fn qemu_view(l: &mut Layer) {
    let path = Path::new(&l.filename).to_path_buf();
    if l.info.format == vdisk::Format::Raw {
        l.info.virtual_size = l.info.virtual_size.div_ceil(512) * 512;
    }
    if let FormatDetails::Vmdk(v) = &mut l.info.details {
        let dir = path.parent().unwrap_or(Path::new(""));
        for e in &mut v.extents {
            if e.filename.is_empty() {
                continue;
            }
            let p = dir.join(&e.filename);
            if p == path {
                e.kind = String::new();
            }
            e.filename = p.display().to_string();
        }
        l.actual_size = Some(children(l).iter().map(|c| c.actual).sum());
    }
}

fn snapshot_json(s: &SnapshotInfo) -> Value {
    let mut m = Map::new();
    if let Some(i) = s.icount {
        m.insert("icount".into(), json!(i));
    }
    m.insert("vm-clock-nsec".into(), json!(s.vm_clock_nsec % 1_000_000_000));
    m.insert("name".into(), json!(s.name));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert("vm-clock-sec".into(), json!(s.vm_clock_nsec / 1_000_000_000));
    m.insert("id".into(), json!(s.id));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}

fn to_json(l: &Layer) -> Value {
    let i = &l.info;
    let mut m = Map::new();
    m.insert("children".into(), Value::Array(children(l).iter().map(child_json).collect()));
    m.insert("virtual-size".into(), json!(i.virtual_size));
    m.insert("filename".into(), json!(l.filename));
    if let Some(c) = i.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    m.insert("format".into(), json!(i.format.name()));
    if let Some(a) = l.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    if i.encrypted {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = &i.backing_file {
        m.insert("backing-filename".into(), json!(b));
        if let Some(fb) = &l.full_backing {
            m.insert("full-backing-filename".into(), json!(fb));
        }
        if let Some(f) = &i.backing_format {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    let mut dirty = false;
    match &i.details {
        FormatDetails::Qcow2(q) => {
            dirty = q.dirty;
            if !q.snapshots.is_empty() {
                m.insert("snapshots".into(), Value::Array(q.snapshots.iter().map(snapshot_json).collect()));
            }
            let mut d = Map::new();
            d.insert("compat".into(), json!(q.compat));
            if q.compat != "0.10" {
                d.insert("compression-type".into(), json!(q.compression_type));
                d.insert("lazy-refcounts".into(), json!(q.lazy_refcounts));
                if !q.bitmaps.is_empty() {
                    let list: Vec<Value> = q
                        .bitmaps
                        .iter()
                        .map(|b| json!({ "flags": b.flags(), "name": b.name, "granularity": b.granularity }))
                        .collect();
                    d.insert("bitmaps".into(), Value::Array(list));
                }
            } else {
                d.insert("compression-type".into(), json!(q.compression_type));
            }
            d.insert("refcount-bits".into(), json!(q.refcount_bits));
            if let Some(l) = &q.luks {
                let mut e = crate::luks_info::json(l);
                e.insert("format".into(), json!("luks"));
                d.insert("encrypt".into(), Value::Object(e));
            } else if i.encrypted {
                d.insert("encrypt".into(), json!({ "format": "aes" }));
            }
            if q.compat != "0.10" {
                d.insert("corrupt".into(), json!(q.corrupt));
                d.insert("extended-l2".into(), json!(q.extended_l2));
            }
            if let Some(df) = &q.data_file {
                d.insert("data-file".into(), json!(df));
                d.insert("data-file-raw".into(), json!(q.data_file_raw));
            }
            m.insert("format-specific".into(), json!({ "type": "qcow2", "data": Value::Object(d) }));
        }
        FormatDetails::Luks(l) => {
            m.insert(
                "format-specific".into(),
                json!({ "type": "luks", "data": Value::Object(crate::luks_info::json(l)) }),
            );
        }
        FormatDetails::Vmdk(v) => {
            let extents: Vec<Value> = v
                .extents
                .iter()
                .map(|e| {
                    let mut x = Map::new();
                    x.insert("virtual-size".into(), json!(e.virtual_size));
                    x.insert("filename".into(), json!(e.filename));
                    if let Some(c) = e.cluster_size {
                        x.insert("cluster-size".into(), json!(c));
                    }
                    x.insert("format".into(), json!(e.kind));
                    if e.compressed {
                        x.insert("compressed".into(), json!(true));
                    }
                    Value::Object(x)
                })
                .collect();
            m.insert(
                "format-specific".into(),
                json!({ "type": "vmdk", "data": {
                    "cid": v.cid, "parent-cid": v.parent_cid, "create-type": v.create_type,
                    "extents": extents } }),
            );
        }
        _ => {}
    }
    m.insert("dirty-flag".into(), json!(dirty));
    Value::Object(m)
}

/// One snapshot row in qemu-img's layout (also used by `vdisk snapshot -l`).
pub fn snapshot_header() -> String {
    format!("{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")
}

/// One snapshot row in qemu-img's layout.
pub fn snapshot_row(s: &SnapshotInfo) -> String {
    let date = s.local_date();
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
    format!("{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}", s.id, s.name, human_size(s.vm_state_size), date, clock, icount)
}

fn print_human(l: &Layer) {
    let i = &l.info;
    outln!("image: {}", l.filename);
    outln!("file format: {}", i.format.name());
    outln!("virtual size: {} ({} bytes)", human_size(i.virtual_size), i.virtual_size);
    match l.actual_size {
        Some(a) => outln!("disk size: {}", human_size(a)),
        None => outln!("disk size: unavailable"),
    }
    if let Some(c) = i.cluster_size {
        outln!("cluster_size: {c}");
    }
    if i.encrypted {
        outln!("encrypted: yes");
    }
    if let Some(b) = &i.backing_file {
        match &l.full_backing {
            Some(fb) if fb != b => outln!("backing file: {b} (actual path: {fb})"),
            _ => outln!("backing file: {b}"),
        }
        if let Some(f) = &i.backing_format {
            outln!("backing file format: {f}");
        }
    }
    match &i.details {
        FormatDetails::Qcow2(q) => {
            if !q.snapshots.is_empty() {
                outln!("Snapshot list:");
                outln!("{}", snapshot_header());
                for s in &q.snapshots {
                    outln!("{}", snapshot_row(s));
                }
            }
            outln!("Format specific information:");
            outln!("    compat: {}", q.compat);
            outln!("    compression type: {}", q.compression_type);
            if q.compat != "0.10" {
                outln!("    lazy refcounts: {}", q.lazy_refcounts);
                if !q.bitmaps.is_empty() {
                    outln!("    bitmaps:");
                    for (k, b) in q.bitmaps.iter().enumerate() {
                        outln!("        [{k}]:");
                        outln!("            flags:");
                        for (j, f) in b.flags().iter().enumerate() {
                            outln!("                [{j}]: {f}");
                        }
                        outln!("            name: {}", b.name);
                        outln!("            granularity: {}", b.granularity);
                    }
                }
            }
            outln!("    refcount bits: {}", q.refcount_bits);
            if let Some(l) = &q.luks {
                outln!("    encrypt:");
                crate::luks_info::human(l, "        ");
                outln!("        format: luks");
            } else if i.encrypted {
                outln!("    encrypt:");
                outln!("        format: aes");
            }
            if q.compat != "0.10" {
                outln!("    corrupt: {}", q.corrupt);
                outln!("    extended l2: {}", q.extended_l2);
            }
            if let Some(df) = &q.data_file {
                outln!("    data file: {df}");
                outln!("    data file raw: {}", q.data_file_raw);
            }
            if q.dirty {
                outln!("    dirty: true");
            }
        }
        FormatDetails::Vmdk(v) => {
            outln!("Format specific information:");
            outln!("    cid: {}", v.cid);
            outln!("    parent cid: {}", v.parent_cid);
            outln!("    create type: {}", v.create_type);
            outln!("    extents:");
            for (i, e) in v.extents.iter().enumerate() {
                outln!("        [{i}]:");
                if e.compressed {
                    outln!("            compressed: true");
                }
                outln!("            virtual size: {}", e.virtual_size);
                outln!("            filename: {}", e.filename);
                if let Some(c) = e.cluster_size {
                    outln!("            cluster size: {c}");
                }
                outln!("            format: {}", e.kind);
            }
        }
        FormatDetails::Luks(l) => {
            outln!("Format specific information:");
            crate::luks_info::human(l, "    ");
        }
        _ => {}
    }
    print_children(l);
}

/// Runs `vdisk info`.
pub fn run(a: &InfoArgs) -> Result<i32> {
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        other => return Err(vdisk::Error::invalid_argument(format!("--output must be human or json, not '{other}'"))),
    };
    let mut layers = Vec::new();
    if a.backing_chain {
        // Open the whole chain and describe each layer.
        let (path, img) = open_inspect(&a.secrets, &a.image, a.format.as_deref(), true, a.force_share)?;
        layers.push(layer(&path, &img));
        let mut next = img.backing();
        while let Some(dev) = next {
            let info = dev.info();
            let path = info.path.clone().unwrap_or_default();
            let full_backing = info.backing_file.clone().map(|b| {
                if Path::new(&b).is_absolute() {
                    b
                } else {
                    path.parent().unwrap_or(Path::new("")).join(b).display().to_string()
                }
            });
            let actual = std::fs::metadata(&path).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            });
            let mut l = Layer { filename: path.display().to_string(), info, actual_size: actual, full_backing };
            qemu_view(&mut l);
            layers.push(l);
            next = dev.backing();
        }
    } else {
        let (path, img) = open_inspect(&a.secrets, &a.image, a.format.as_deref(), false, a.force_share)?;
        layers.push(layer(&path, &img));
    }
    if json {
        if a.backing_chain {
            print_json(&Value::Array(layers.iter().map(to_json).collect()));
        } else {
            print_json(&to_json(&layers[0]));
        }
    } else {
        for (n, l) in layers.iter().enumerate() {
            if n > 0 {
                outln!();
            }
            print_human(l);
        }
    }
    Ok(0)
}
