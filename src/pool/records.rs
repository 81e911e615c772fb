//! The format records of a pool (`<config>/volumes/<pool uuid>.formats`).
//!
//! Not a cache: a record holds the format each volume was created with (or
//! had when vdisk first saw it), keyed by name and (device, inode).
//! Opening a volume uses the recorded format, never a fresh probe, so a
//! guest that writes a qcow2 header into its raw disk does not turn it
//! into a qcow2 image with a backing file of its choosing (the libvirt
//! lesson behind "backing chains"). Listings show the recorded format and
//! a warning when the header now says otherwise.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::Metadata;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::statefile::{dec, enc, lock_exclusive, read_bounded, write_atomic};
use super::volinfo::FileStat;
use crate::device::Format;
use crate::error::Result;

/// One recorded volume format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub dev: u64,
    pub ino: u64,
    pub format: Format,
}

impl Record {
    /// `format`, recorded for the file `md` describes.
    pub fn of(md: &Metadata, format: Format) -> Record {
        Record { dev: md.dev(), ino: md.ino(), format }
    }

    /// `format`, recorded for the file `stat` describes.
    pub fn of_stat(stat: &FileStat, format: Format) -> Record {
        Record { dev: stat.dev, ino: stat.ino, format }
    }
}

/// The format records of one pool.
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
        let _lock = lock_exclusive(&path.with_extension("lock"), "the format records")?;
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
        Ok(r)
    }
}
