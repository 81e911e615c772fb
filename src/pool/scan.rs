//! Listing a pool: every directory entry, classified without following
//! anything, its headers probed safely (through the probe cache) and shown
//! with its recorded format.
//!
//! A listing reads the directory, `lstat`s every name and re-probes only
//! files whose (device, inode, size, mtime, ctime) changed since their
//! cached probe ([`RACY_NS`]: a file changed just before its probe is
//! probed again), so listing thousands of unchanged volumes costs one
//! `statx` each; the cache (`<config>/cache/<pool uuid>.cache`) is
//! disposable. Files appear with the format vdisk opens them with: the one
//! recorded when the volume was created or first seen
//! (`<config>/volumes/<pool uuid>.formats`), never a fresh probe, so a
//! guest that writes a qcow2 header into its raw disk does not turn it into
//! a qcow2 image with a backing file of its choosing. A header that now
//! says otherwise is shown as a warning.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

pub use super::probe_cache::RACY_NS;
pub use super::volinfo::{Backing, FileStat, VolType, VolumeInfo};

use super::dir::kind_name;
use super::headers::{probe_file, probe_symlink, Facts};
use super::lifecycle::Pool;
use super::name::TEMP_PREFIX;
use super::probe_cache::{probe_clock, ProbeCache};
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
    /// that changed since their cached probe (see [`scan`]). Entries that
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
        let mut entries: Vec<(OsString, std::fs::Metadata)> = Vec::new();
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
        let canon = d.path().to_path_buf();
        for (name, md) in &entries {
            let stat = FileStat::of(md);
            let ft = md.file_type();
            let (kind, facts, rec_stat) = if ft.is_file() {
                let facts = match cache.get(name, &stat) {
                    Some(f) => {
                        report.reused += 1;
                        f.clone()
                    }
                    None => {
                        let t = probe_clock();
                        let f = match d.open_file(name, false) {
                            Ok(file) => probe_file(file, &d.join(name)),
                            Err(e) => Facts { error: Some(e.message().to_string()), ..Default::default() },
                        };
                        report.probed += 1;
                        cache.put(name, &stat, t, f.clone());
                        changed = true;
                        f
                    }
                };
                (VolType::File, facts, Some(stat))
            } else if ft.is_symlink() {
                let (f, target) = probe_symlink(&d, name);
                (VolType::Symlink, f, target.as_ref().map(FileStat::of))
            } else if ft.is_dir() {
                (VolType::Dir, Facts::default(), None)
            } else {
                (
                    VolType::Other,
                    Facts {
                        error: Some(format!("is a {}, not a volume: vdisk never opens it", kind_name(md))),
                        ..Default::default()
                    },
                    None,
                )
            };
            let recorded = match &rec_stat {
                Some(s) if kind == VolType::File => {
                    let r = records.format_of(name, s);
                    if r.is_none() {
                        if let Some(fmt) = facts.format {
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
            let extent_alloc = facts
                .extents
                .iter()
                .filter_map(|x| alloc_of.get(OsStr::new(x)))
                .fold(0u64, |a, b| a.saturating_add(*b));
            let mut info = build_info(&canon, name, kind, stat, &facts, recorded, extent_alloc);
            if kind == VolType::Symlink {
                if let Some(s) = rec_stat {
                    info.capacity = if facts.format == Some(Format::Raw) { s.size } else { info.capacity };
                    info.allocation = s.allocated;
                    info.physical = s.size;
                }
            }
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
