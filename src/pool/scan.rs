//! Listing a pool: every directory entry, classified without following
//! anything, its headers probed safely (through the probe cache) and shown
//! with its recorded format.
//!
//! A listing reads the directory, `lstat`s every name and re-probes only
//! files whose (device, inode, size, mtime, ctime) changed since their
//! cached probe ([`RACY_NS`]: a file changed just before its probe is
//! probed again; "before" is judged on the filesystem's clock, the newest
//! ctime the listing saw, and on this host's clock only where the
//! filesystem is local: a file server's clock may be skewed from it), so listing thousands of unchanged volumes costs one
//! `statx` each; the cache (`<config>/cache/<pool uuid>.cache`) is
//! disposable. A file without a format record is always probed afresh,
//! since that probe becomes its record. Files appear with the format vdisk
//! opens them with: the one recorded when the volume was created or first
//! seen (`<config>/volumes/<pool uuid>.formats`), never a fresh probe, so a
//! guest that writes a qcow2 header into its raw disk does not turn it into
//! a qcow2 image with a backing file of its choosing. A header that now
//! says otherwise is shown as a warning.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

pub use super::probe_cache::RACY_NS;
pub use super::volinfo::{Backing, FileStat, VolType, VolumeInfo};

use super::dir::{kind_name, PoolDir};
use super::headers::{probe_file, probe_symlink, Facts};
use super::lifecycle::Pool;
use super::name::TEMP_PREFIX;
use super::probe_cache::{probe_time, ProbeCache};
use super::records::{Record, Records};
use super::volinfo::build_info;
use crate::device::Format;
use crate::error::{Error, Result};

/// What a listing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScanReport {
    /// Entries listed.
    pub volumes: usize,
    /// Files whose headers were read.
    pub probed: usize,
    /// Files served from the probe cache.
    pub reused: usize,
    /// vdisk temporary entries skipped.
    pub temporary: usize,
}

impl Pool {
    /// Lists the volumes: rescans the directory and re-probes only files
    /// that changed since their cached probe (see [`scan`](crate::pool::scan)). Entries that
    /// cannot be parsed are listed with the reason. Requires an active pool.
    pub fn refresh(&self) -> Result<(Vec<VolumeInfo>, ScanReport)> {
        self.require_active()?;
        let d = self.dir()?;
        let mut report = ScanReport::default();
        let mut cache = self.probe_cache();
        let cache_path = self.cache_file();
        if !cache.is_loaded() {
            *cache = ProbeCache::load(&cache_path);
        }
        let records_path = self.records_file();
        let records = Records::load(&records_path)?;
        let rd = std::fs::read_dir(d.path())
            .map_err(|e| Error::io("cannot read the pool directory", e).with_path(d.path()))?;
        let mut entries: Vec<(OsString, Metadata)> = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io("cannot read the pool directory", e).with_path(d.path()))?;
            let name = e.file_name();
            if name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                report.temporary += 1;
                continue;
            }
            // A file removed since readdir is simply not listed.
            if let Ok(md) = e.metadata() {
                entries.push((name, md));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        // The time every probe below happens after, on the clock of the
        // filesystem (for NFS or GlusterFS the server's, which may be
        // skewed from this host's): the newest ctime stat'ed so far.
        // On a local filesystem this host's clock counts too.
        let probed_at = probe_time(
            d.path(),
            std::fs::metadata(d.path())
                .iter()
                .chain(entries.iter().map(|(_, m)| m))
                .map(|m| (m.ctime(), m.ctime_nsec())),
        );
        let alloc_of: HashMap<&OsStr, u64> = entries
            .iter()
            .filter(|(_, m)| m.is_file())
            .map(|(n, m)| (n.as_os_str(), m.blocks().saturating_mul(512)))
            .collect();
        // Regular files by (device, inode): what a symlink in the pool points at.
        let file_by_id: HashMap<(u64, u64), &OsStr> =
            entries.iter().filter(|(_, m)| m.is_file()).map(|(n, m)| ((m.dev(), m.ino()), n.as_os_str())).collect();
        let mut changed = false;
        let mut new_records = Vec::new();
        let mut out = Vec::with_capacity(entries.len());
        for (name, md) in &entries {
            let entry = Entry::read(&d, name, md, |stat| {
                // A file without a record gets one from this probe, so that
                // probe is fresh: the cache (a file anyone with the user's
                // rights can edit, keyed on stat fields alone) never decides
                // a recorded format.
                let recorded = records.format_of(name, stat).is_some();
                Ok(match cache.get(name, stat).filter(|f| recorded || f.format.is_none()) {
                    Some(f) => {
                        report.reused += 1;
                        f.clone()
                    }
                    None => {
                        let f = probe_regular(&d, name).unwrap_or_else(|e| Facts::error(e.message()));
                        report.probed += 1;
                        cache.put(name, stat, probed_at, f.clone());
                        changed = true;
                        f
                    }
                })
            })?;
            let recorded = match &entry.file {
                Some(s) if entry.kind == VolType::File => {
                    let r = records.format_of(name, s);
                    if r.is_none() {
                        if let Some(fmt) = entry.facts.format {
                            new_records.push((name.clone(), Some(Record::of_stat(s, fmt))));
                        }
                    }
                    r
                }
                Some(s) => {
                    // Symlinks: the target's record, if the target is a
                    // volume of this pool.
                    file_by_id.get(&(s.dev, s.ino)).and_then(|n| records.format_of(n, s))
                }
                None => None,
            };
            let info = entry.info(&d, name, recorded, |x| alloc_of.get(x).copied());
            out.push(info);
        }
        report.volumes = out.len();
        let keep: HashSet<OsString> = entries.iter().map(|(n, _)| n.clone()).collect();
        if cache.retain(&keep) {
            changed = true;
        }
        if changed {
            // The cache is an optimisation: failing to save it is not an
            // error of the listing.
            let _ = cache.save(&cache_path);
        }
        // Records of files that are gone (removed outside vdisk) go too.
        new_records.extend(records.names().filter(|n| !keep.contains(*n)).map(|n| (n.clone(), None)));
        if !new_records.is_empty() {
            Records::update(&records_path, &new_records)?;
        }
        Ok((out, report))
    }

    /// [`refresh`](Self::refresh) without the report.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        Ok(self.refresh()?.0)
    }
}

/// One directory entry of a pool, classified by its `lstat` (never
/// followed out of the pool) and probed: what a listing and
/// [`Volume::info`](super::Volume::info) both describe.
pub(crate) struct Entry {
    /// Kind of entry.
    pub kind: VolType,
    /// The entry's own `lstat`.
    pub stat: FileStat,
    /// What its headers say (for a symlink, its target's).
    pub facts: Facts,
    /// The regular file behind the entry: the entry itself, or the target
    /// of a symlink that stays inside the pool.
    pub file: Option<FileStat>,
}

impl Entry {
    /// Classifies `name`, whose `lstat` is `md`. A regular file's facts
    /// come from `probe` (given its stat: a fresh probe, or the cache); a
    /// symlink's target is probed if it stays inside the pool; FIFOs,
    /// sockets and devices are never opened.
    pub fn read(
        d: &PoolDir,
        name: &OsStr,
        md: &Metadata,
        probe: impl FnOnce(&FileStat) -> Result<Facts>,
    ) -> Result<Entry> {
        let stat = FileStat::of(md);
        let ft = md.file_type();
        let (kind, facts, file) = if ft.is_file() {
            (VolType::File, probe(&stat)?, Some(stat))
        } else if ft.is_symlink() {
            let (f, target) = probe_symlink(d, name);
            (VolType::Symlink, f, target.as_ref().map(FileStat::of))
        } else if ft.is_dir() {
            (VolType::Dir, Facts::default(), None)
        } else {
            let why = format!("is a {}, not a volume: vdisk never opens it", kind_name(md));
            (VolType::Other, Facts::error(why), None)
        };
        Ok(Entry { kind, stat, facts, file })
    }

    /// What is shown for the entry, given the format recorded for it and
    /// the allocated bytes of a file of the pool (`alloc_of`, asked for a
    /// vmdk's extent files; names from the image that are not plain names
    /// are not looked up).
    pub fn info(
        &self,
        d: &PoolDir,
        name: &OsStr,
        recorded: Option<Format>,
        alloc_of: impl Fn(&OsStr) -> Option<u64>,
    ) -> VolumeInfo {
        let extent_alloc = self
            .facts
            .extents
            .iter()
            .filter(|x| !x.contains('/') && *x != "." && *x != "..")
            .filter_map(|x| alloc_of(OsStr::new(x)))
            .fold(0u64, u64::saturating_add);
        let mut info = build_info(d.path(), name, self.kind, self.stat, &self.facts, recorded, extent_alloc);
        if let (VolType::Symlink, Some(t)) = (self.kind, self.file) {
            // A symlink shows the file it points at.
            info.allocation = t.allocated;
            info.physical = t.size;
            if self.facts.format == Some(Format::Raw) {
                info.capacity = t.size;
            }
        }
        info
    }
}

/// A fresh header probe of the regular file `name` (never the cache).
pub(crate) fn probe_regular(d: &PoolDir, name: &OsStr) -> Result<Facts> {
    Ok(probe_file(d.open_file(name, false)?, &d.join(name)))
}
