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
use super::def::{Permissions, PoolDef};
use super::dir::{kind_name, PoolDir};
use super::mount;
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
        if let Some(key) = mount::source_key(def) {
            if !mount::is_mounted(&t, &key) {
                return Err(Error::invalid_argument(format!(
                    "{key} is not mounted on the target of {} pool '{}' (pool-start mounts it)",
                    def.kind().name(),
                    def.name()
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
        self.check_no_neighbour()?;
        let mounted_here = self.mount_source()?;
        let r = self.check_target().and_then(|_| {
            let state = self.paths().state_file(self.name());
            write_atomic(&state, self.inner.def.to_xml().as_bytes())?;
            if refresh {
                if let Err(e) = self.cleanup(STALE_TEMP_AGE).and_then(|_| self.refresh().map(|_| ())) {
                    let _ = std::fs::remove_file(&state);
                    return Err(e);
                }
            }
            Ok(())
        });
        if r.is_err() && mounted_here {
            let _ = mount::unmount(&self.inner.def, &self.canonical_target());
        }
        r
    }

    /// Refuses to start on a target another pool (vdisk's or libvirt's,
    /// whenever it was defined) also uses.
    fn check_no_neighbour(&self) -> Result<()> {
        let t = self.canonical_target();
        let reg = super::registry::Registry::from_paths(self.inner.paths.clone());
        for p in reg.list_unlocked()?.pools {
            if p.name() != self.name() && p.canonical_target() == t {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "pool '{}' cannot start: its target is also the target of {} pool '{}' ({})",
                        self.name(),
                        if p.origin() == Origin::Libvirt { "libvirt's" } else { "vdisk's" },
                        p.name(),
                        p.definition_file().display()
                    ),
                )
                .with_path(&t));
            }
        }
        Ok(())
    }

    /// Mounts the source of a fs/netfs pool on its target, as libvirt does;
    /// returns whether it mounted (a source already mounted there is
    /// used as it is). Refused: something else mounted on the target, or
    /// the source mounted elsewhere.
    fn mount_source(&self) -> Result<bool> {
        let def = &self.inner.def;
        let Some(key) = mount::source_key(def) else {
            return Ok(false);
        };
        let t = self.canonical_target();
        if mount::is_mounted(&t, &key) {
            return Ok(false);
        }
        if let Some(m) = mount::anything_mounted(&t) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("pool '{}' cannot mount {key}: {} is already mounted on its target", def.name(), m.source),
            )
            .with_path(&t));
        }
        if let Some(m) = mount::mounts().iter().find(|m| mount::same_source(m, &key)) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "pool '{}' cannot mount {key}: it is already mounted on {} (another pool, or by hand)",
                    def.name(),
                    m.mount_point.display()
                ),
            )
            .with_path(&t));
        }
        std::fs::metadata(&t)
            .map_err(|e| Error::io("cannot access the pool target (build it first?)", e).with_path(&t))?;
        mount::mount(def, &t)?;
        if !mount::is_mounted(&t, &key) {
            let _ = mount::unmount(def, &t);
            return Err(Error::new(
                ErrorKind::Io,
                format!("mount reported success but {key} is not mounted on the target of pool '{}'", def.name()),
            )
            .with_path(&t));
        }
        Ok(true)
    }

    /// The first volume of the pool another process (or a vdisk
    /// operation here) has open, as QEMU's image locks or vdisk's busy
    /// table tell.
    fn volume_in_use(&self) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let rd = std::fs::read_dir(self.canonical_target()).ok()?;
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            let path = e.path();
            let locked = crate::storage::lock::users(&path).is_ok_and(|u| u.in_use());
            if locked || super::busy::is_busy((md.dev(), md.ino())) {
                return Some(path);
            }
        }
        None
    }

    /// Stops the pool. Never touches data. A fs/netfs pool's source is
    /// unmounted, which is refused while a volume is in use.
    pub fn destroy(&self) -> Result<()> {
        let _l = lock(self.paths())?;
        self.require_active()?;
        let def = &self.inner.def;
        if let Some(key) = mount::source_key(def) {
            let t = self.canonical_target();
            if mount::is_mounted(&t, &key) {
                if let Some(v) = self.volume_in_use() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "pool '{}' cannot be destroyed: volume '{}' is in use (unmounting would pull it from under its user)",
                            def.name(),
                            v.file_name().unwrap_or_default().to_string_lossy()
                        ),
                    )
                    .with_path(&v));
                }
                mount::unmount(def, &t)?;
            }
        }
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
