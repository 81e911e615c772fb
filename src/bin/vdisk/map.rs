//! `vdisk map`: extents as `qemu-img map` prints them.

use vdisk::{BlockDevice, ExtentKind, Result};

/// Arguments of `vdisk map`.
#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// First guest offset to map.
    #[arg(long = "start-offset", default_value = "0")]
    pub start: String,
    /// Bytes to map (default: to the end).
    #[arg(long = "max-length")]
    pub max_length: Option<String>,
    /// Open even if another process holds the image.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub secrets: crate::secrets::SecretArgs,
    /// The image.
    pub image: String,
}

/// One line of qemu-img's JSON map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Chain depth.
    pub depth: u32,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Host offset, if meaningful.
    pub offset: Option<u64>,
    /// Which file (for the human form).
    pub file: String,
}

impl MapEntry {
    fn mergeable(&self, n: &MapEntry) -> bool {
        self.depth == n.depth
            && self.present == n.present
            && self.zero == n.zero
            && self.data == n.data
            && self.compressed == n.compressed
            && self.start + self.length == n.start
            && match (self.offset, n.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Collects the merged extents of `dev` over `[start, end)`.
pub fn collect(dev: &dyn BlockDevice, start: u64, end: u64) -> Result<Vec<MapEntry>> {
    let mut files = Vec::new();
    let mut cur: Option<&dyn BlockDevice> = Some(dev);
    while let Some(d) = cur {
        files.push(d.info().path.map(|p| p.display().to_string()).unwrap_or_default());
        cur = d.backing();
    }
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = start;
    while pos < end {
        let e = dev.map(pos, end - pos)?;
        if e.length == 0 {
            break;
        }
        let (present, zero, data, compressed, offset) = match e.kind {
            ExtentKind::Data { host_offset } => (true, false, true, false, host_offset),
            ExtentKind::Compressed { .. } => (true, false, true, true, None),
            ExtentKind::Zero { host_offset } => (true, true, false, false, host_offset),
            ExtentKind::Unallocated => (false, true, false, false, None),
        };
        let entry = MapEntry {
            start: pos,
            length: e.length,
            depth: e.depth,
            present,
            zero,
            data,
            compressed,
            offset: if e.encrypted { None } else { offset },
            file: files.get(e.depth as usize).cloned().unwrap_or_default(),
        };
        match out.last_mut() {
            Some(last) if last.mergeable(&entry) => last.length += entry.length,
            _ => out.push(entry),
        }
        pos += e.length;
    }
    Ok(out)
}

/// Runs `vdisk map`.
pub fn run(a: &MapArgs) -> Result<i32> {
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        other => return Err(vdisk::Error::invalid_argument(format!("--output must be human or json, not '{other}'"))),
    };
    let (_, img) = crate::common::open_inspect(&a.secrets, &a.image, a.format.as_deref(), true, a.force_share)?;
    let size = img.size();
    let start = crate::common::parse_size(&a.start)?;
    let end = match &a.max_length {
        Some(l) => start.saturating_add(crate::common::parse_size(l)?).min(size),
        None => size,
    };
    let mut entries = collect(&img, start.min(size), end.max(start.min(size)))?;
    if entries.is_empty() {
        // An empty range: qemu-img prints one zero-length, unallocated entry
        // at the start offset (in JSON; the human form lists nothing).
        entries.push(MapEntry {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            file: String::new(),
        });
    }
    if json {
        let lines: Vec<String> = entries
            .iter()
            .map(|e| {
                let mut s = format!(
                    "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
                );
                if let Some(o) = e.offset {
                    s.push_str(&format!(", \"offset\": {o}"));
                }
                s.push('}');
                s
            })
            .collect();
        outln!("[{}]", lines.join(",\n"));
    } else {
        outln!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        // C's "%#x": 0 prints without the prefix.
        let hex = |v: u64| if v == 0 { "0".to_string() } else { format!("{v:#x}") };
        for e in entries.iter().filter(|e| e.data) {
            let mapped = match (e.compressed, e.offset) {
                (true, _) => "compressed".to_string(),
                (false, Some(o)) => hex(o),
                (false, None) => "-".to_string(),
            };
            outln!("{:<16}{:<16}{:<16}{}", hex(e.start), hex(e.length), mapped, e.file);
        }
    }
    Ok(0)
}
