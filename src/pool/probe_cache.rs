//! The probe cache of a pool: each file's header [`Facts`] kept under its
//! (device, inode, size, mtime, ctime), in memory and in
//! `<config>/cache/<pool uuid>.cache`.
//!
//! A listing reads the directory, `lstat`s every name and re-probes only
//! files whose key changed, so listing thousands of unchanged volumes costs
//! one `statx` each. A file changed within [`RACY_NS`] before it was probed
//! is probed again next time (timestamps come from a coarse kernel clock);
//! "before" is measured on the filesystem's clock ([`probe_time`]), so a
//! file server's clock skew cannot make a racy probe look settled.
//! The cache is disposable: deleting it only costs one slow listing. It is
//! an optimisation, never a source of trust: a file is recorded with the
//! format of a fresh probe, never of a cache entry.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use super::headers::Facts;
use super::statefile::{dec, enc, read_bounded, write_atomic};
use super::volinfo::FileStat;
use crate::device::Format;
use crate::error::Result;

/// A file changed less than this before its probe is probed again.
pub const RACY_NS: i128 = 20_000_000;

fn ns(t: (i64, i64)) -> i128 {
    i128::from(t.0) * 1_000_000_000 + i128::from(t.1)
}

/// The filesystem's clock for [`ProbeCache::put`]: the newest of `ctimes`,
/// ctimes stat'ed before the probe (as seconds and nanoseconds). A file
/// server stamps ctime with its own clock, which may be minutes from this
/// host's; comparing its ctimes with each other, never with this host's
/// clock, keeps the racy check sound under any skew. A user can set mtime
/// (`touch -d`) but not ctime, so only ctimes count.
pub(crate) fn fs_clock(ctimes: impl Iterator<Item = (i64, i64)>) -> i128 {
    ctimes.map(ns).max().unwrap_or(i128::MIN)
}

/// Whether the filesystem of type `fstype` stamps ctimes with this host's
/// clock: local filesystems do; NFS, CIFS, FUSE (GlusterFS), cluster
/// filesystems and shared folders of a hypervisor stamp with another
/// machine's (or each node's own), so only [`fs_clock`] may be trusted
/// there. Unknown types count as not local.
pub(crate) fn clock_is_local(fstype: &str) -> bool {
    const LOCAL: &[&str] = &[
        "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "jfs", "reiserfs", "bcachefs", "zfs", "vfat",
        "exfat", "ntfs", "ntfs3", "hfsplus", "nilfs2", "overlay",
    ];
    LOCAL.contains(&fstype)
}

/// The time a probe starts after: on a filesystem with this host's clock,
/// the later of that clock and [`fs_clock`]; elsewhere [`fs_clock`] alone
/// (a skewed server clock makes this host's meaningless there).
pub(crate) fn probe_time(dir: &Path, ctimes: impl Iterator<Item = (i64, i64)>) -> i128 {
    let fs = fs_clock(ctimes);
    let local = std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| crate::pool::mount::fstype_of(&p, &crate::pool::mount::mounts()))
        .is_some_and(|t| clock_is_local(&t));
    if !local {
        return fs;
    }
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => fs.max(d.as_nanos() as i128),
        Err(_) => fs,
    }
}

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i128,
    ctime: i128,
}

impl StatKey {
    fn of(st: &FileStat) -> StatKey {
        StatKey { dev: st.dev, ino: st.ino, size: st.size, mtime: ns(st.mtime), ctime: ns(st.ctime) }
    }
}

#[derive(Debug, Clone)]
struct CacheEntry {
    key: StatKey,
    probed_at: i128,
    facts: Facts,
}

/// The probe cache of one pool.
#[derive(Debug, Default, Clone)]
pub(crate) struct ProbeCache {
    entries: HashMap<OsString, CacheEntry>,
    loaded: bool,
}

// Version 2: the probe time is on the filesystem's clock (version 1 kept
// this host's, which a file server's clock skew made unsound).
const CACHE_MAGIC: &str = "vdisk-pool-cache 2";

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
        (e.key == StatKey::of(stat) && e.probed_at.saturating_sub(e.key.ctime) > RACY_NS).then_some(&e.facts)
    }

    /// Stores a fresh probe taken after `probed_at`, a time on the
    /// filesystem's clock ([`fs_clock`]).
    pub fn put(&mut self, name: &OsStr, stat: &FileStat, probed_at: i128, facts: Facts) {
        self.entries.insert(name.to_os_string(), CacheEntry { key: StatKey::of(stat), probed_at, facts });
    }

    /// Drops entries whose names are not in `keep`; true if any went.
    pub fn retain(&mut self, keep: &HashSet<OsString>) -> bool {
        let before = self.entries.len();
        self.entries.retain(|n, _| keep.contains(n));
        before != self.entries.len()
    }

    /// Forgets one entry.
    pub fn forget(&mut self, name: &OsStr) {
        self.entries.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        std::fs::write(&p, text_v1()).unwrap();
        assert!(ProbeCache::load(&p).entries.is_empty(), "a version 1 cache (this host's clock) is dropped");
        assert!(ProbeCache::load(&p).entries.is_empty());
    }

    fn text_v1() -> String {
        "vdisk-pool-cache 1\n".to_string()
    }

    /// A file server's clock an hour ahead of or behind this host's: the
    /// racy check compares the server's ctimes with each other only.
    #[test]
    fn racy_check_ignores_this_hosts_clock() {
        let hour = 3600i64;
        let here = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        for skew in [-hour, 0, hour] {
            let server_now = here + skew;
            let facts = Facts { format: Some(Format::Raw), ..Default::default() };
            // Changed on the server just now, probed right away: whatever
            // this host's clock says, the probe is racy.
            let fresh = FileStat { dev: 1, ino: 2, size: 3, ctime: (server_now, 0), ..Default::default() };
            let old = FileStat { ino: 3, ctime: (server_now - 60, 0), ..fresh };
            let probed_at = fs_clock([fresh.ctime, old.ctime].into_iter());
            let mut c = ProbeCache::default();
            c.put(OsStr::new("fresh"), &fresh, probed_at, facts.clone());
            c.put(OsStr::new("old"), &old, probed_at, facts.clone());
            assert!(c.get(OsStr::new("fresh"), &fresh).is_none(), "skew {skew}: a fresh change is racy");
            assert_eq!(c.get(OsStr::new("old"), &old), Some(&facts), "skew {skew}: a settled file is reused");
            // Once the server's clock has visibly moved on (another file
            // changed later), a new probe of the first file is settled.
            let later = fs_clock([fresh.ctime, (server_now + 1, 0)].into_iter());
            c.put(OsStr::new("fresh"), &fresh, later, facts.clone());
            assert_eq!(c.get(OsStr::new("fresh"), &fresh), Some(&facts), "skew {skew}");
        }
        assert_eq!(fs_clock(std::iter::empty()), i128::MIN);
    }
}
