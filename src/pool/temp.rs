//! Temporary build directories: a volume is built in
//! `.vdisk-tmp-<random>/<name>` inside the pool and renamed into place
//! without replacing anything; what a crash leaves there is removed once no
//! process holds a lock on it.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::path::{Path, PathBuf};

use super::dir::PoolDir;
use super::name::TEMP_PREFIX;
use super::uuid::random_hex;
use crate::error::{Error, Result};
use crate::storage::lock;

/// A temporary build directory in the pool, removed on drop unless
/// published.
pub(crate) struct TempBuild<'a> {
    dir: &'a PoolDir,
    tmp: OsString,
    name: OsString,
    done: bool,
}

impl<'a> TempBuild<'a> {
    pub fn new(dir: &'a PoolDir, name: &str) -> Result<TempBuild<'a>> {
        let tmp = OsString::from(format!("{TEMP_PREFIX}{}", random_hex(8)?));
        dir.mkdir(&tmp, 0o700)?;
        Ok(TempBuild { dir, tmp, name: OsString::from(name), done: false })
    }

    pub fn file_path(&self) -> PathBuf {
        self.dir.join(&self.tmp).join(&self.name)
    }

    pub fn publish(&mut self) -> Result<()> {
        let rel = Path::new(&self.tmp).join(&self.name);
        self.dir.publish(&rel, &self.name)?;
        self.done = true;
        self.dir.sync()?;
        let _ = self.dir.remove(&self.tmp, true);
        Ok(())
    }
}

impl Drop for TempBuild<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(self.file_path());
            let _ = self.dir.remove(&self.tmp, true);
        }
    }
}

/// Removes one stale temporary entry if no process holds a lock on what it
/// contains. Returns whether it was removed.
pub(crate) fn remove_temp(d: &PoolDir, name: &OsStr, md: &Metadata) -> Result<bool> {
    let unlocked = |f: &File| lock::users_of(f).map(|u| !u.in_use()).unwrap_or(false);
    if md.is_file() {
        let f = d.open_file(name, false)?;
        if !unlocked(&f) {
            return Ok(false);
        }
        d.remove(name, false)?;
        return Ok(true);
    }
    if !md.is_dir() {
        return Ok(false);
    }
    let sub = PoolDir::open(&d.join(name))?;
    let mut names = Vec::new();
    let rd = std::fs::read_dir(sub.path()).map_err(|e| Error::io("cannot read", e).with_path(sub.path()))?;
    for e in rd.flatten() {
        let n = e.file_name();
        let Ok(m) = e.metadata() else {
            return Ok(false);
        };
        if m.is_dir() {
            return Ok(false);
        }
        if m.is_file() && !unlocked(&sub.open_file(&n, false)?) {
            return Ok(false);
        }
        names.push(n);
    }
    for n in names {
        sub.remove(&n, false)?;
    }
    d.remove(name, true)?;
    Ok(true)
}
