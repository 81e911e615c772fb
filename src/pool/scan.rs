//! Listing a pool: safe header probes, a probe cache keyed by the file's
//! identity, and the record of the format each volume is opened with.
//!
//! **Probing** reads headers only: the first 2 KiB ([`crate::probe`]), then
//! the qcow2 header ([`Qcow2::read_header`]) or the vmdk descriptor
//! ([`Vmdk::read_descriptor`]). It never opens a backing file or an extent,
//! takes no lock, and opens each file with `O_NOFOLLOW | O_NONBLOCK`,
//! checking on the descriptor that it is a regular file.
//!
//! **The cache** (`<config>/cache/<pool uuid>.cache`, and in memory) keeps
//! each file's probe under its (device, inode, size, mtime, ctime). A
//! listing reads the directory, `lstat`s every name and re-probes only files
//! whose key changed, so listing thousands of unchanged volumes costs one
//! `statx` each. A file changed within [`RACY_NS`] before it was probed is
//! probed again next time (timestamps come from a coarse kernel clock).
//! The cache is disposable: deleting it only costs one slow listing.
//!
//! **The format record** (`<config>/volumes/<pool uuid>.formats`) is not a
//! cache: it holds the format each volume was created with (or had when
//! vdisk first saw it), keyed by name and (device, inode). Opening a
//! volume uses the recorded format, never a fresh probe, so a guest that
//! writes a qcow2 header into its raw disk does not turn it into a qcow2
//! image with a backing file of its choosing (the libvirt lesson behind
//! "backing chains"). Listings show the recorded format and a warning when
//! the header now says otherwise.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::device::Format;
use crate::error::{Error, Result};
use crate::probe::{probe_bytes, PROBE_LEN};
use crate::qcow2::header::{COMPAT_LAZY_REFCOUNTS, CRYPT_AES, CRYPT_LUKS};
use crate::qcow2::Qcow2;
use crate::storage::{FileStorage, Storage};
use crate::vmdk::Vmdk;

/// A file changed less than this before its probe is probed again.
pub const RACY_NS: i128 = 20_000_000;
/// Largest cache or record file read (larger ones are ignored / refused).
const MAX_STATE_FILE: u64 = 256 << 20;

/// What kind of directory entry a volume is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolType {
    /// A regular file.
    File,
    /// A directory (listed, as libvirt does; not an image).
    Dir,
    /// A symlink (listed; never written through).
    Symlink,
    /// A FIFO, socket or device node: listed with an error, never opened.
    Other,
}

impl VolType {
    /// libvirt's name (`file`, `dir`); symlinks and others report `file`.
    pub fn libvirt_name(self) -> &'static str {
        match self {
            VolType::Dir => "dir",
            _ => "file",
        }
    }
}

/// `stat` facts of a volume file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStat {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Length in bytes (`physical`).
    pub size: u64,
    /// Allocated bytes (`st_blocks * 512`).
    pub allocated: u64,
    /// Mode bits with the file type.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, i64),
    /// Modification time.
    pub mtime: (i64, i64),
    /// Status change time.
    pub ctime: (i64, i64),
}

impl FileStat {
    /// From metadata.
    pub fn of(md: &Metadata) -> FileStat {
        FileStat {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            allocated: md.blocks().saturating_mul(512),
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            atime: (md.atime(), md.atime_nsec()),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }

    fn key(&self) -> StatKey {
        StatKey { dev: self.dev, ino: self.ino, size: self.size, mtime: ns(self.mtime), ctime: ns(self.ctime) }
    }
}

fn ns(t: (i64, i64)) -> i128 {
    i128::from(t.0) * 1_000_000_000 + i128::from(t.1)
}

fn now_ns() -> i128 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(_) => 0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i128,
    ctime: i128,
}

/// A backing file named by an image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// The name as recorded in the image.
    pub name: String,
    /// The name resolved the way QEMU does (relative to the image's
    /// directory).
    pub path: PathBuf,
    /// The backing format recorded in the image, if any.
    pub format: Option<String>,
}

/// What a header probe found (cached).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Facts {
    pub format: Option<Format>,
    pub capacity: u64,
    pub encryption: Option<String>,
    pub compat: Option<String>,
    pub cluster_size: Option<u64>,
    pub lazy_refcounts: bool,
    pub backing: Option<(String, Option<String>)>,
    pub extents: Vec<String>,
    pub error: Option<String>,
}

/// Reads the headers of an opened regular file. Never fails: what cannot
/// be parsed is reported in `error`.
pub(crate) fn probe_file(file: File, path: &Path) -> Facts {
    let st = match FileStorage::from_file(file, path, true) {
        Ok(s) => s,
        Err(e) => return Facts { error: Some(e.message().to_string()), ..Default::default() },
    };
    let len = st.len().unwrap_or(0);
    let mut head = vec![0u8; (len.min(PROBE_LEN as u64)) as usize];
    if let Err(e) = st.read_at(&mut head, 0) {
        return Facts { error: Some(e.to_string()), ..Default::default() };
    }
    let format = probe_bytes(&head);
    let mut f = Facts { format: Some(format), capacity: len, ..Default::default() };
    match format {
        Format::Raw => {}
        Format::Qcow2 => match Qcow2::read_header(&st) {
            Ok(h) => {
                f.capacity = h.size;
                f.cluster_size = 1u64.checked_shl(h.cluster_bits);
                f.compat = Some(if h.version == 2 { "0.10" } else { "1.1" }.to_string());
                f.lazy_refcounts = h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
                f.encryption = match h.crypt_method {
                    CRYPT_AES => Some("qcow".to_string()),
                    CRYPT_LUKS => Some("luks".to_string()),
                    _ => None,
                };
                f.backing = h.backing_file.map(|b| (b, h.backing_format));
            }
            Err(e) => {
                f.capacity = 0;
                f.error = Some(e.message().to_string());
            }
        },
        Format::Vmdk => match Vmdk::read_descriptor(&st) {
            Ok(d) => {
                f.capacity = d.total_sectors().saturating_mul(512);
                f.backing = d.parent_hint().map(|p| (p.to_string(), Some("vmdk".to_string())));
                let me = path.file_name().map(|n| n.as_bytes().to_vec());
                f.extents = d
                    .extents
                    .iter()
                    .filter_map(|e| e.file.clone())
                    .filter(|n| Some(n.as_bytes().to_vec()) != me)
                    .collect();
            }
            Err(e) => {
                f.capacity = 0;
                f.error = Some(e.message().to_string());
            }
        },
    }
    f
}

/// One volume as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// File name in the pool directory (may be any bytes for files vdisk
    /// did not create).
    pub name: OsString,
    /// Absolute path, which is also the volume key (as in libvirt's dir
    /// pools).
    pub path: PathBuf,
    /// Kind of entry.
    pub kind: VolType,
    /// The format vdisk opens it with (the recorded one).
    pub format: Option<Format>,
    /// The format its header shows now.
    pub probed_format: Option<Format>,
    /// Guest-visible size in bytes.
    pub capacity: u64,
    /// Host bytes allocated (`st_blocks * 512`, vmdk extent files included).
    pub allocation: u64,
    /// File length in bytes.
    pub physical: u64,
    /// The backing file named in the header (one level; see
    /// [`Volume::chain`](super::Volume::chain) for the whole chain).
    pub backing: Option<Backing>,
    /// Encryption (`qcow` for legacy AES, `luks`), if any.
    pub encryption: Option<String>,
    /// qcow2 compat level.
    pub compat: Option<String>,
    /// qcow2 cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2 lazy refcounts.
    pub lazy_refcounts: bool,
    /// Why the file could not be parsed (it is listed anyway).
    pub error: Option<String>,
    /// Something to know (format changed since it was recorded, ...).
    pub warning: Option<String>,
    /// stat facts.
    pub stat: FileStat,
}

impl VolumeInfo {
    /// The name for display (lossy for non-UTF-8 names).
    pub fn name_lossy(&self) -> String {
        self.name.to_string_lossy().into_owned()
    }
}

/// Builds the listing entry from stat, probe facts and the record.
pub(crate) fn build_info(
    dir_path: &Path,
    name: &OsStr,
    kind: VolType,
    stat: FileStat,
    facts: &Facts,
    recorded: Option<Format>,
    extent_alloc: u64,
) -> VolumeInfo {
    let path = dir_path.join(name);
    let format = recorded.or(facts.format);
    let mut warning = None;
    let mut capacity = facts.capacity;
    let mut backing = facts.backing.clone();
    let mut error = facts.error.clone();
    if let (Some(r), Some(p)) = (recorded, facts.format) {
        if r != p {
            warning = Some(format!(
                "the header now looks like {p}, but the volume was recorded as {r}: vdisk keeps opening it as {r}"
            ));
            if r == Format::Raw {
                capacity = stat.size;
                backing = None;
                error = None;
            } else {
                error = Some(format!("no valid {r} header found (the file looks like {p})"));
            }
        }
    }
    let image_dir = path.parent().unwrap_or(dir_path);
    VolumeInfo {
        name: name.to_os_string(),
        path: path.clone(),
        kind,
        format,
        probed_format: facts.format,
        capacity,
        allocation: stat.allocated.saturating_add(extent_alloc),
        physical: stat.size,
        backing: backing.map(|(n, f)| {
            let p = Path::new(&n);
            Backing { path: if p.is_absolute() { p.to_path_buf() } else { image_dir.join(p) }, name: n, format: f }
        }),
        encryption: facts.encryption.clone(),
        compat: facts.compat.clone(),
        cluster_size: facts.cluster_size,
        lazy_refcounts: facts.lazy_refcounts,
        error,
        warning,
        stat,
    }
}

// ---------- on-disk encoding ----------

/// Percent-encodes bytes outside a safe set (so names with tabs,
/// newlines or invalid UTF-8 survive a line-based file).
pub(crate) fn enc(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"._-+~:@/=".contains(&c) {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

pub(crate) fn dec(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn opt_enc(v: &Option<String>) -> String {
    match v {
        None => "-".into(),
        Some(s) => format!("={}", enc(s.as_bytes())),
    }
}

fn opt_dec(s: &str) -> Option<Option<String>> {
    if s == "-" {
        return Some(None);
    }
    let rest = s.strip_prefix('=')?;
    String::from_utf8(dec(rest)?).ok().map(Some)
}

fn fmt_name(f: Option<Format>) -> &'static str {
    f.map_or("-", Format::name)
}

fn fmt_parse(s: &str) -> Option<Option<Format>> {
    if s == "-" {
        Some(None)
    } else {
        Format::from_name(s).ok().map(Some)
    }
}

/// Writes `data` to `path` atomically (temp file in the same directory,
/// fsync, rename).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create directory", e).with_path(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id(),
        super::uuid::random_hex(4)?
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| Error::io("cannot write", e).with_path(path))
}

fn read_bounded(path: &Path) -> Result<Option<String>> {
    Ok(read_limited(path, MAX_STATE_FILE)?.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// Reads a regular file of at most `max` bytes; `None` if it does not
/// exist. The file is opened without blocking (a FIFO put in its place does
/// not hang us), checked to be a regular file on the open descriptor, and
/// read no further than `max + 1` bytes whatever its size claims.
pub(crate) fn read_limited(path: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("cannot open", e).with_path(path)),
    };
    let md = f.metadata().map_err(|e| Error::io("cannot stat", e).with_path(path))?;
    if !md.is_file() {
        return Err(
            Error::invalid_argument(format!("is a {}, not a regular file", super::dir::kind_name(&md))).with_path(path)
        );
    }
    let mut out = Vec::new();
    f.take(max + 1).read_to_end(&mut out).map_err(|e| Error::io("cannot read", e).with_path(path))?;
    if out.len() as u64 > max {
        return Err(Error::limit(format!("{} is larger than {max} bytes", path.display())));
    }
    Ok(Some(out))
}

// ---------- probe cache ----------

#[derive(Debug, Clone)]
pub(crate) struct CacheEntry {
    key: StatKey,
    probed_at: i128,
    pub facts: Facts,
}

/// The probe cache of one pool.
#[derive(Debug, Default, Clone)]
pub(crate) struct ProbeCache {
    entries: HashMap<OsString, CacheEntry>,
    loaded: bool,
}

const CACHE_MAGIC: &str = "vdisk-pool-cache 1";

impl ProbeCache {
    /// Loads the cache file (a missing, unreadable or malformed file is an
    /// empty cache; malformed lines are skipped).
    pub fn load(path: &Path) -> ProbeCache {
        let mut c = ProbeCache { loaded: true, ..Default::default() };
        let Ok(Some(text)) = read_bounded(path) else {
            return c;
        };
        let mut lines = text.lines();
        if lines.next() != Some(CACHE_MAGIC) {
            return c;
        }
        for line in lines {
            if let Some((name, e)) = Self::parse_line(line) {
                c.entries.insert(name, e);
            }
        }
        c
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    fn parse_line(line: &str) -> Option<(OsString, CacheEntry)> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 17 {
            return None;
        }
        let name = OsString::from_vec(dec(f[0])?);
        let key = StatKey {
            dev: f[1].parse().ok()?,
            ino: f[2].parse().ok()?,
            size: f[3].parse().ok()?,
            mtime: f[4].parse().ok()?,
            ctime: f[5].parse().ok()?,
        };
        let probed_at: i128 = f[6].parse().ok()?;
        let extents = if f[15] == "-" {
            Vec::new()
        } else {
            f[15].split(',').map(|x| dec(x).and_then(|b| String::from_utf8(b).ok())).collect::<Option<Vec<_>>>()?
        };
        let backing = match (opt_dec(f[13])?, opt_dec(f[14])?) {
            (Some(n), fmt) => Some((n, fmt)),
            (None, _) => None,
        };
        let facts = Facts {
            format: fmt_parse(f[7])?,
            capacity: f[8].parse().ok()?,
            encryption: opt_dec(f[9])?,
            compat: opt_dec(f[10])?,
            cluster_size: if f[11] == "-" { None } else { Some(f[11].parse().ok()?) },
            lazy_refcounts: f[12] == "1",
            backing,
            extents,
            error: opt_dec(f[16])?,
        };
        Some((name, CacheEntry { key, probed_at, facts }))
    }

    /// Writes the cache file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out = String::with_capacity(self.entries.len() * 96 + 32);
        out.push_str(CACHE_MAGIC);
        out.push('\n');
        for (name, e) in &self.entries {
            let f = &e.facts;
            let (bn, bf) = match &f.backing {
                Some((n, fm)) => (Some(n.clone()), fm.clone()),
                None => (None, None),
            };
            let extents = if f.extents.is_empty() {
                "-".to_string()
            } else {
                f.extents.iter().map(|x| enc(x.as_bytes())).collect::<Vec<_>>().join(",")
            };
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                enc(name.as_bytes()),
                e.key.dev,
                e.key.ino,
                e.key.size,
                e.key.mtime,
                e.key.ctime,
                e.probed_at,
                fmt_name(f.format),
                f.capacity,
                opt_enc(&f.encryption),
                opt_enc(&f.compat),
                f.cluster_size.map_or("-".to_string(), |c| c.to_string()),
                u8::from(f.lazy_refcounts),
                opt_enc(&bn),
                opt_enc(&bf),
                extents,
                opt_enc(&f.error),
            ));
        }
        write_atomic(path, out.as_bytes())
    }

    /// The cached facts for `name` if `stat` still matches and the probe
    /// was not racy.
    pub fn get(&self, name: &OsStr, stat: &FileStat) -> Option<&Facts> {
        let e = self.entries.get(name)?;
        (e.key == stat.key() && e.probed_at.saturating_sub(e.key.ctime) > RACY_NS).then_some(&e.facts)
    }

    /// Stores a fresh probe taken at `probed_at`.
    pub fn put(&mut self, name: &OsStr, stat: &FileStat, probed_at: i128, facts: Facts) {
        self.entries.insert(name.to_os_string(), CacheEntry { key: stat.key(), probed_at, facts });
    }

    /// Drops entries whose names are not in `keep`; true if any went.
    pub fn retain(&mut self, keep: &std::collections::HashSet<OsString>) -> bool {
        let before = self.entries.len();
        self.entries.retain(|n, _| keep.contains(n));
        before != self.entries.len()
    }

    /// Forgets one entry.
    pub fn forget(&mut self, name: &OsStr) {
        self.entries.remove(name);
    }
}

/// The current time for [`ProbeCache::put`].
pub(crate) fn probe_clock() -> i128 {
    now_ns()
}

// ---------- format records ----------

/// One recorded volume format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub dev: u64,
    pub ino: u64,
    pub format: Format,
}

/// The format records of one pool (`<config>/volumes/<uuid>.formats`).
#[derive(Debug, Default, Clone)]
pub(crate) struct Records {
    map: HashMap<OsString, Record>,
}

impl Records {
    /// Loads the record file (missing: empty).
    pub fn load(path: &Path) -> Result<Records> {
        let mut r = Records::default();
        let Some(text) = read_bounded(path)? else {
            return Ok(r);
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 4 {
                continue;
            }
            let (Ok(format), Ok(dev), Ok(ino), Some(name)) =
                (Format::from_name(f[0]), f[1].parse(), f[2].parse(), dec(f[3]))
            else {
                continue;
            };
            r.map.insert(OsString::from_vec(name), Record { dev, ino, format });
        }
        Ok(r)
    }

    /// The recorded names.
    pub fn names(&self) -> impl Iterator<Item = &OsString> {
        self.map.keys()
    }

    /// The recorded format of `name` if the record is for this very file.
    pub fn format_of(&self, name: &OsStr, stat: &FileStat) -> Option<Format> {
        self.map.get(name).filter(|r| r.dev == stat.dev && r.ino == stat.ino).map(|r| r.format)
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut out = String::with_capacity(self.map.len() * 48);
        let mut names: Vec<_> = self.map.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (n, r) in names {
            out.push_str(&format!("{}\t{}\t{}\t{}\n", r.format.name(), r.dev, r.ino, enc(n.as_bytes())));
        }
        write_atomic(path, out.as_bytes())
    }

    /// Applies `changes` (name, Some(record) to set, None to remove) to the
    /// record file under an exclusive lock (read, modify, write), and
    /// returns the updated records.
    pub fn update(path: &Path, changes: &[(OsString, Option<Record>)]) -> Result<Records> {
        let lock_path = path.with_extension("lock");
        if let Some(d) = lock_path.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io("cannot create directory", e).with_path(d))?;
        }
        let lf = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io("cannot open lock file", e).with_path(&lock_path))?;
        crate::sys::flock(lf.as_fd(), true).map_err(|e| Error::io("cannot lock", e).with_path(&lock_path))?;
        let mut r = Records::load(path)?;
        for (n, rec) in changes {
            match rec {
                Some(rec) => {
                    r.map.insert(n.clone(), *rec);
                }
                None => {
                    r.map.remove(n);
                }
            }
        }
        r.save(path)?;
        drop(lf);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_roundtrip() {
        for b in [&b"plain.qcow2"[..], b"tab\there", b"\xff\x00\n%", b"", b"a,b c"] {
            let e = enc(b);
            assert!(!e.contains(['\t', '\n', ',', ' ']));
            assert_eq!(dec(&e).unwrap(), b);
        }
        assert!(dec("%G0").is_none());
        assert!(dec("%4").is_none());
    }

    #[test]
    fn cache_roundtrip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let mut c = ProbeCache::default();
        let st = FileStat { dev: 1, ino: 2, size: 3, ctime: (10, 0), ..Default::default() };
        let facts = Facts {
            format: Some(Format::Qcow2),
            capacity: 1 << 30,
            compat: Some("1.1".into()),
            cluster_size: Some(65536),
            backing: Some(("base\tx".into(), Some("raw".into()))),
            extents: vec!["a,b".into(), "c".into()],
            error: Some("bad\nthing".into()),
            ..Default::default()
        };
        c.put(OsStr::new("v\n1"), &st, 20_000_000_000, facts.clone());
        c.save(&p).unwrap();
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("garbage line\n\t\t\n");
        std::fs::write(&p, text).unwrap();
        let l = ProbeCache::load(&p);
        assert_eq!(l.get(OsStr::new("v\n1"), &st), Some(&facts));
        let changed = FileStat { size: 4, ..st };
        assert_eq!(l.get(OsStr::new("v\n1"), &changed), None);
        // Racy: probed right after the change.
        let mut r = ProbeCache::default();
        r.put(OsStr::new("x"), &st, 10_000_000_001, facts);
        assert!(r.get(OsStr::new("x"), &st).is_none());
        std::fs::write(&p, "not a cache").unwrap();
        assert!(ProbeCache::load(&p).entries.is_empty());
    }
}
