//! A pool and its lifecycle: build, start, destroy, delete, undefine, the
//! autostart link, `pool-info` and `pool-dumpxml`, and the clean-up of what
//! a crashed create leaves behind. Listing is in [`scan`](super::scan),
//! volumes in `volume.rs` and `create.rs`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

use super::config::{canonical_target, lock, Origin, RegistryPaths};
use super::def::{Permissions, PoolDef, PoolType};
use super::dir::{kind_name, PoolDir};
use super::name::TEMP_PREFIX;
use super::probe_cache::ProbeCache;
use super::records::{Record, Records};
use super::statefile::write_atomic;
use super::temp::remove_temp;
use super::uuid::Uuid;
use crate::error::{Error, ErrorKind, Result};

/// A pool's state, with libvirt's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolState {
    /// Not started.
    Inactive,
    /// Started and usable.
    Running,
    /// Started, but the target is missing or not mounted.
    Inaccessible,
}

impl PoolState {
    /// virsh's word (`pool-info`, `pool-list --details`).
    pub fn name(self) -> &'static str {
        match self {
            PoolState::Inactive => "inactive",
            PoolState::Running => "running",
            PoolState::Inaccessible => "inaccessible",
        }
    }
}

/// What `pool-info` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolInfo {
    /// State.
    pub state: PoolState,
    /// Filesystem size (`f_blocks * f_frsize`); 0 when not running.
    pub capacity: u64,
    /// Used (`capacity - f_bfree * f_frsize`).
    pub allocation: u64,
    /// Free for unprivileged users (`f_bavail * f_frsize`).
    pub available: u64,
}

/// Temporary entries younger than this are left alone by [`Pool::start`]'s
/// clean-up (a creator may be working in them).
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct PoolInner {
    paths: Arc<RegistryPaths>,
    def: PoolDef,
    origin: Origin,
    autostart: bool,
    file: PathBuf,
    cache: Mutex<ProbeCache>,
}

/// A pool: a directory of volumes, defined in a
/// [`Registry`](super::Registry). Cheap to clone; every method reads the
/// state from disk, so several processes can work on one pool.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

fn not_active(name: &str) -> Error {
    Error::invalid_argument(format!("storage pool '{name}' is not active"))
}

impl Pool {
    pub(crate) fn new(paths: Arc<RegistryPaths>, def: PoolDef, origin: Origin, autostart: bool, file: PathBuf) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                paths,
                def,
                origin,
                autostart,
                file,
                cache: Mutex::new(ProbeCache::default()),
            }),
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        self.inner.def.name()
    }

    /// The UUID.
    pub fn uuid(&self) -> Uuid {
        self.inner.def.uuid()
    }

    /// The definition.
    pub fn def(&self) -> &PoolDef {
        &self.inner.def
    }

    /// The target directory as defined.
    pub fn target(&self) -> &Path {
        self.inner.def.target()
    }

    /// Where the definition came from.
    pub fn origin(&self) -> Origin {
        self.inner.origin
    }

    /// The definition file.
    pub fn definition_file(&self) -> &Path {
        &self.inner.file
    }

    /// Always true: vdisk has no transient pools.
    pub fn is_persistent(&self) -> bool {
        true
    }

    /// Whether the pool starts after boot.
    pub fn autostart(&self) -> bool {
        self.inner.autostart
    }

    pub(crate) fn paths(&self) -> &RegistryPaths {
        &self.inner.paths
    }

    /// Whether the pool is active (started and not destroyed since).
    pub fn is_active(&self) -> bool {
        self.paths().state_file(self.name()).exists()
    }

    pub(crate) fn require_active(&self) -> Result<()> {
        if self.is_active() {
            Ok(())
        } else {
            Err(not_active(self.name()))
        }
    }

    fn require_inactive(&self, what: &str) -> Result<()> {
        if self.is_active() {
            Err(Error::invalid_argument(format!("storage pool '{}' is active: destroy it before {what}", self.name())))
        } else {
            Ok(())
        }
    }

    /// The target with symlinks resolved.
    pub fn canonical_target(&self) -> PathBuf {
        canonical_target(self.target())
    }

    pub(crate) fn dir(&self) -> Result<PoolDir> {
        PoolDir::open(&self.canonical_target()).map_err(|e| e.context(format!("storage pool '{}'", self.name())))
    }

    /// Turns autostart on or off (the `autostart/NAME.xml` link). Refused for
    /// libvirt's pools.
    pub fn set_autostart(&self, on: bool) -> Result<Pool> {
        if self.origin() == Origin::Libvirt {
            return Err(Error::unsupported(format!(
                "pool '{}' is defined by libvirt: change its autostart with virsh",
                self.name()
            )));
        }
        let _l = lock(self.paths())?;
        let link = self.paths().autostart_link(self.name());
        let _ = std::fs::remove_file(&link);
        if on {
            std::os::unix::fs::symlink(&self.inner.file, &link)
                .map_err(|e| Error::io("cannot create the autostart link", e).with_path(&link))?;
        }
        Ok(Pool::new(self.inner.paths.clone(), self.inner.def.clone(), self.inner.origin, on, self.inner.file.clone()))
    }

    /// Creates the target directory (parents as needed) with the defined
    /// permissions (mode 0711 unless the definition says otherwise); an
    /// existing directory only gets its permissions applied. Refused while
    /// active.
    pub fn build(&self) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        self.require_inactive("building it")?;
        let t = self.target();
        let perms = self.inner.def.target_permissions();
        let mode = perms.mode.unwrap_or(0o711);
        if let Some(parent) = t.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("cannot create parent directories", e).with_path(parent))?;
        }
        match std::fs::DirBuilder::new().mode(mode).create(t) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let md = std::fs::symlink_metadata(t).map_err(|e| Error::io("cannot stat", e).with_path(t))?;
                if !md.is_dir() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("the target exists and is a {}", kind_name(&md)),
                    )
                    .with_path(t));
                }
                if perms.mode.is_none() {
                    return self.chown_target(perms);
                }
            }
            Err(e) => return Err(Error::io("cannot create the pool directory", e).with_path(t)),
        }
        std::fs::set_permissions(t, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("cannot set the pool directory mode", e).with_path(t))?;
        self.chown_target(perms)
    }

    fn chown_target(&self, perms: &Permissions) -> Result<()> {
        if perms.owner.is_some() || perms.group.is_some() {
            std::os::unix::fs::chown(self.target(), perms.owner, perms.group)
                .map_err(|e| Error::io("cannot set the pool directory owner", e).with_path(self.target()))?;
        }
        Ok(())
    }

    /// Checks the target: a directory, and for fs/netfs pools a mount
    /// point of the defined source.
    fn check_target(&self) -> Result<()> {
        let t = self.canonical_target();
        let md = std::fs::metadata(&t)
            .map_err(|e| Error::io("cannot access the pool target (build it first?)", e).with_path(&t))?;
        if !md.is_dir() {
            return Err(Error::invalid_argument("the pool target is not a directory").with_path(&t));
        }
        let def = &self.inner.def;
        if def.kind() != PoolType::Dir {
            let want = match def.kind() {
                PoolType::Fs => def.source().device.clone().unwrap_or_default(),
                _ => format!(
                    "{}:{}",
                    def.source().host.clone().unwrap_or_default(),
                    def.source().dir.clone().unwrap_or_default()
                ),
            };
            if !mounted(&t, &want) {
                return Err(Error::unsupported(format!(
                    "{} is not mounted on the target: vdisk does not mount {} pools, mount it first",
                    want,
                    def.kind().name()
                ))
                .with_path(&t));
            }
        }
        Ok(())
    }

    /// Starts the pool: checks the target (and the mount of fs/netfs
    /// pools), marks the pool active, removes stale temporary entries and
    /// refreshes. Refused if already active.
    pub fn start(&self) -> Result<()> {
        let _l = lock(self.paths())?;
        self.start_unlocked(true)
    }

    pub(crate) fn start_unlocked(&self, refresh: bool) -> Result<()> {
        if self.is_active() {
            return Err(Error::invalid_argument(format!("storage pool '{}' is already active", self.name())));
        }
        self.check_target()?;
        let state = self.paths().state_file(self.name());
        write_atomic(&state, self.inner.def.to_xml().as_bytes())?;
        if refresh {
            if let Err(e) = self.cleanup(STALE_TEMP_AGE).and_then(|_| self.refresh().map(|_| ())) {
                let _ = std::fs::remove_file(&state);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stops the pool. Never touches data.
    pub fn destroy(&self) -> Result<()> {
        let _l = lock(self.paths())?;
        self.require_active()?;
        let state = self.paths().state_file(self.name());
        std::fs::remove_file(&state).map_err(|e| Error::io("cannot remove the pool state", e).with_path(&state))
    }

    /// Removes the target directory, only if it is empty. Refused while
    /// active. Volumes are never deleted by this.
    pub fn delete(&self) -> Result<()> {
        self.require_inactive("deleting it")?;
        let t = self.target();
        std::fs::remove_dir(t).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTEMPTY) || e.raw_os_error() == Some(libc::EEXIST) {
                Error::invalid_argument("the pool directory is not empty: delete its volumes first").with_path(t)
            } else {
                Error::io("cannot remove the pool directory", e).with_path(t)
            }
        })
    }

    /// Removes the definition (and autostart link, probe cache and format
    /// records). Refused while active and for libvirt's pools.
    pub fn undefine(&self) -> Result<()> {
        if self.origin() == Origin::Libvirt {
            return Err(Error::unsupported(format!(
                "pool '{}' is defined by libvirt in {}: undefine it with virsh",
                self.name(),
                self.inner.file.display()
            )));
        }
        let _l = lock(self.paths())?;
        self.require_inactive("undefining it")?;
        let _ = std::fs::remove_file(self.paths().autostart_link(self.name()));
        let _ = std::fs::remove_file(self.paths().cache_file(self.uuid()));
        let _ = std::fs::remove_file(self.paths().records_file(self.uuid()));
        std::fs::remove_file(&self.inner.file)
            .map_err(|e| Error::io("cannot remove the pool definition", e).with_path(&self.inner.file))
    }

    /// State and filesystem figures.
    pub fn info(&self) -> Result<PoolInfo> {
        if !self.is_active() {
            return Ok(PoolInfo { state: PoolState::Inactive, capacity: 0, allocation: 0, available: 0 });
        }
        if self.check_target().is_err() {
            return Ok(PoolInfo { state: PoolState::Inaccessible, capacity: 0, allocation: 0, available: 0 });
        }
        let st = self.dir()?.fs_stats()?;
        Ok(PoolInfo {
            state: PoolState::Running,
            capacity: st.capacity,
            allocation: st.capacity.saturating_sub(st.free),
            available: st.available,
        })
    }

    /// `pool-dumpxml`: the definition with live figures, and the target's
    /// actual permissions when it exists.
    pub fn xml_desc(&self) -> Result<String> {
        let info = self.info()?;
        let actual = std::fs::metadata(self.target()).ok().map(|m| Permissions::of(&m));
        Ok(self.inner.def.with_sizes(info.capacity, info.allocation, info.available, actual.as_ref()).to_xml())
    }

    /// Removes stale temporary entries (`.vdisk-tmp-*`) older than
    /// `min_age` that no process has locked: what a crash between building
    /// a volume and renaming it into place leaves. Returns how many went.
    pub fn cleanup(&self, min_age: Duration) -> Result<usize> {
        let d = self.dir()?;
        let mut removed = 0;
        let rd = std::fs::read_dir(d.path())
            .map_err(|e| Error::io("cannot read the pool directory", e).with_path(d.path()))?;
        for e in rd.flatten() {
            let name = e.file_name();
            if !name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                continue;
            }
            let Ok(md) = e.metadata() else { continue };
            let age = md.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or_default();
            if age < min_age {
                continue;
            }
            if remove_temp(&d, &name, &md)? {
                removed += 1;
            }
        }
        if removed > 0 {
            d.sync()?;
        }
        Ok(removed)
    }

    /// The in-memory probe cache (loaded from [`Self::cache_file`] by the
    /// first listing).
    pub(crate) fn probe_cache(&self) -> MutexGuard<'_, ProbeCache> {
        self.inner.cache.lock()
    }

    /// The probe cache file.
    pub(crate) fn cache_file(&self) -> PathBuf {
        self.paths().cache_file(self.uuid())
    }

    /// The format record file.
    pub(crate) fn records_file(&self) -> PathBuf {
        self.paths().records_file(self.uuid())
    }

    pub(crate) fn forget_cached(&self, name: &OsStr) {
        self.inner.cache.lock().forget(name);
    }

    pub(crate) fn record(&self, name: &OsStr, rec: Option<Record>) -> Result<()> {
        Records::update(&self.records_file(), &[(name.to_os_string(), rec)]).map(|_| ())
    }

    pub(crate) fn records(&self) -> Result<Records> {
        Records::load(&self.records_file())
    }
}

/// Whether `target` is a mount point whose source is `source`
/// (`/proc/self/mountinfo`; escapes like `\040` decoded).
fn mounted(target: &Path, source: &str) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let unescape = |s: &str| -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 3 < b.len() {
                let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
                if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        out
    };
    let want = target.as_os_str().as_bytes();
    text.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            return false;
        };
        let mount_point = f.get(4).map(|m| unescape(m));
        let src = f.get(sep + 2).map(|s| unescape(s));
        mount_point.as_deref() == Some(want)
            && src.as_deref().map(|s| s.strip_suffix(b"/").unwrap_or(s))
                == Some(source.as_bytes().strip_suffix(b"/").unwrap_or(source.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_check_reads_mountinfo() {
        // /proc is mounted from "proc" wherever these tests run.
        assert!(mounted(Path::new("/proc"), "proc"));
        assert!(!mounted(Path::new("/proc"), "nfs.example.com:/export"));
        assert!(!mounted(Path::new("/nonexistent-mount-point"), "proc"));
    }
}
