//! The registry of pool definitions: vdisk's stand-in for libvirt's storage
//! driver, without a daemon.
//!
//! Layout of the configuration directory (default
//! `$XDG_CONFIG_HOME/vdisk/storage`, else `~/.config/vdisk/storage`;
//! `VDISK_CONFIG_DIR` or [`RegistryPaths::new`] override it), laid out as
//! libvirt lays out `/etc/libvirt/storage`:
//!
//! ```text
//! NAME.xml                  pool definition (libvirt's <pool> format)
//! autostart/NAME.xml        symlink to ../NAME.xml when autostart is on
//! run/NAME.xml              present while the pool is active (a copy of
//!                           the definition, like libvirt's /run state file)
//! run/boot_id               the boot the run/ state belongs to
//! cache/UUID.cache          probe cache of the pool's volumes (disposable)
//! volumes/UUID.formats      the recorded format of each volume
//! .lock                     flock taken around definition and state edits
//! ```
//!
//! **Active state without a daemon.** A pool is active while
//! `run/NAME.xml` exists. The state belongs to one boot: when
//! `/proc/sys/kernel/random/boot_id` differs from `run/boot_id`, the first
//! registry opened after the reboot clears `run/` and starts the autostart
//! pools, which is what libvirtd does when it starts. So `pool-destroy`
//! sticks until the next boot, and autostart means "active after boot".
//!
//! **libvirt's own pools.** `/etc/libvirt/storage` (or
//! `VDISK_LIBVIRT_DIR`; empty disables) is read, never written: its pools
//! are listed and usable (their active state is vdisk's own), but
//! undefining them or changing their autostart is refused; use `virsh`.
//! Names, UUIDs and targets must not collide with them either.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use super::config::RegistryPaths;

use super::config::{canonical_target, lock, Origin};
use super::def::{sanitize_path, PoolDef};
use super::lifecycle::Pool;
use super::statefile::{read_limited, write_atomic};
use super::uuid::Uuid;
use super::volume::Volume;
use super::xml::MAX_XML_BYTES;
use crate::error::{Error, ErrorKind, Result};

/// The pools a registry knows, and the definition files it could not load.
#[derive(Debug)]
pub struct PoolList {
    /// Pools, sorted by name.
    pub pools: Vec<Pool>,
    /// Definition files that were skipped, with the reason.
    pub errors: Vec<Error>,
}

/// The registry of pool definitions (see the module docs).
#[derive(Debug, Clone)]
pub struct Registry {
    paths: Arc<RegistryPaths>,
}

impl Registry {
    /// Opens (creating) the configuration directory. The first registry
    /// opened after a reboot clears stale active state and starts the
    /// autostart pools.
    pub fn open(mut paths: RegistryPaths) -> Result<Registry> {
        for d in [paths.config_dir.clone(), paths.config_dir.join("autostart"), paths.config_dir.join("run")] {
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::io("cannot create the configuration directory", e).with_path(&d))?;
        }
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&paths.config_dir, std::fs::Permissions::from_mode(0o700));
        }
        // Absolute from here on: autostart links point at definition files.
        paths.config_dir = paths
            .config_dir
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve the configuration directory", e).with_path(&paths.config_dir))?;
        let reg = Registry { paths: Arc::new(paths) };
        reg.boot_check()?;
        Ok(reg)
    }

    /// [`Registry::open`] with [`RegistryPaths::from_env`].
    pub fn open_default() -> Result<Registry> {
        Self::open(RegistryPaths::from_env()?)
    }

    /// The paths in use.
    pub fn paths(&self) -> &RegistryPaths {
        &self.paths
    }

    fn boot_check(&self) -> Result<()> {
        let Ok(boot) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
            return Ok(());
        };
        let boot = boot.trim().to_string();
        let marker = self.paths.config_dir.join("run/boot_id");
        if std::fs::read_to_string(&marker).ok().as_deref().map(str::trim) == Some(boot.as_str()) {
            return Ok(());
        }
        let _l = lock(&self.paths)?;
        if std::fs::read_to_string(&marker).ok().as_deref().map(str::trim) == Some(boot.as_str()) {
            return Ok(());
        }
        let run = self.paths.config_dir.join("run");
        if let Ok(rd) = std::fs::read_dir(&run) {
            for e in rd.flatten() {
                if e.path().extension() == Some(OsStr::new("xml")) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        write_atomic(&marker, format!("{boot}\n").as_bytes())?;
        // Like libvirtd at start: autostart pools come up (a failure, such
        // as a missing directory, leaves that pool inactive).
        for p in self.list_unlocked()?.pools {
            if p.autostart() {
                let _ = p.start_unlocked(false);
            }
        }
        Ok(())
    }

    fn load_dir(&self, dir: &Path, origin: Origin, out: &mut Vec<Pool>, errors: &mut Vec<Error>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut names: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension() == Some(OsStr::new("xml"))
                    && !p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
                    && p.is_file()
            })
            .collect();
        names.sort();
        for path in names {
            let res = (|| -> Result<Pool> {
                let bytes = read_limited(&path, MAX_XML_BYTES as u64)?.ok_or_else(|| {
                    Error::new(crate::ErrorKind::NotFound, "pool definition vanished").with_path(&path)
                })?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| Error::invalid_argument("pool definition is not UTF-8").with_path(&path))?;
                let def = PoolDef::from_xml(&text, &path.display().to_string())?;
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                if stem.as_deref() != Some(def.name()) {
                    return Err(Error::invalid_argument(format!(
                        "the file name does not match the pool name '{}'",
                        def.name()
                    ))
                    .with_path(&path));
                }
                let autostart = dir.join("autostart").join(format!("{}.xml", def.name())).exists();
                Ok(Pool::new(self.paths.clone(), def, origin, autostart, path.clone()))
            })();
            match res {
                Ok(p) => out.push(p),
                Err(e) => errors.push(e),
            }
        }
    }

    /// A registry over `paths` that is already open (for pools that look
    /// at their neighbours).
    pub(crate) fn from_paths(paths: Arc<RegistryPaths>) -> Registry {
        Registry { paths }
    }

    pub(crate) fn list_unlocked(&self) -> Result<PoolList> {
        let mut pools = Vec::new();
        let mut errors = Vec::new();
        self.load_dir(&self.paths.config_dir, Origin::Vdisk, &mut pools, &mut errors);
        if let Some(l) = &self.paths.libvirt_dir {
            let mut lv = Vec::new();
            self.load_dir(l, Origin::Libvirt, &mut lv, &mut errors);
            for p in lv {
                if let Some(ours) = pools.iter().find(|o| o.name() == p.name() || o.uuid() == p.uuid()) {
                    errors.push(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "libvirt's pool '{}' ({}) is hidden by vdisk's pool '{}'",
                            p.name(),
                            p.uuid(),
                            ours.name()
                        ),
                    ));
                } else {
                    pools.push(p);
                }
            }
        }
        pools.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(PoolList { pools, errors })
    }

    /// Every pool defined here or in libvirt's directory.
    pub fn list(&self) -> Result<PoolList> {
        self.list_unlocked()
    }

    /// The pool named `name_or_uuid` (a name first, then a UUID).
    pub fn pool(&self, name_or_uuid: &str) -> Result<Pool> {
        let list = self.list()?;
        if let Some(p) = list.pools.iter().find(|p| p.name() == name_or_uuid) {
            return Ok(p.clone());
        }
        if let Ok(u) = Uuid::parse(name_or_uuid) {
            if let Some(p) = list.pools.iter().find(|p| p.uuid() == u) {
                return Ok(p.clone());
            }
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "storage pool not found: no storage pool with matching name or uuid '{}'",
                name_or_uuid.escape_debug()
            ),
        ))
    }

    /// The pool whose target is `path` (compared canonically).
    pub fn pool_by_target(&self, path: &Path) -> Result<Option<Pool>> {
        let want = canonical_target(path);
        Ok(self.list()?.pools.into_iter().find(|p| canonical_target(p.target()) == want))
    }

    /// Defines (or redefines) a pool: writes `NAME.xml`. Refused: a name
    /// defined with another UUID, a UUID defined under another name, a
    /// target another pool already uses (compared after resolving
    /// symlinks), a name of one of libvirt's pools, and changing the target
    /// of an active pool.
    pub fn define(&self, def: PoolDef) -> Result<Pool> {
        let _l = lock(&self.paths)?;
        let list = self.list_unlocked()?;
        let target = canonical_target(def.target());
        let mut existing: Option<&Pool> = None;
        for p in &list.pools {
            if p.name() == def.name() {
                if p.origin() == Origin::Libvirt {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "pool '{}' is defined by libvirt in {}: manage it with virsh",
                            p.name(),
                            p.definition_file().display()
                        ),
                    ));
                }
                if p.uuid() != def.uuid() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("pool '{}' is already defined with uuid {}", p.name(), p.uuid()),
                    ));
                }
                existing = Some(p);
                continue;
            }
            if p.uuid() == def.uuid() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("pool '{}' already exists with uuid {}", p.name(), p.uuid()),
                ));
            }
            if canonical_target(p.target()) == target {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("Storage source conflict with pool: '{}' (both on {})", p.name(), target.display()),
                ));
            }
        }
        if let Some(old) = existing {
            if old.is_active() && canonical_target(old.target()) != target {
                return Err(Error::invalid_argument(format!(
                    "pool '{}' is active: destroy it before changing its target",
                    def.name()
                )));
            }
        }
        let file = self.paths.def_file(def.name());
        let header = format!(
            "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE\nOVERWRITTEN AND LOST. Changes to this xml configuration should be made using:\n  vdisk pool-define {name}.xml\n-->\n",
            name = def.name()
        );
        let text = header + &def.to_xml();
        write_atomic(&file, text.as_bytes())?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600));
        }
        let autostart = self.paths.autostart_link(def.name()).exists();
        Ok(Pool::new(self.paths.clone(), def, Origin::Vdisk, autostart, file))
    }

    /// Parses and defines a `<pool>` document.
    pub fn define_xml(&self, xml: &str) -> Result<Pool> {
        self.define(PoolDef::from_xml(xml, "pool XML")?)
    }

    /// The volume whose path (== key) is `path`, in an active pool whose
    /// target is the path's directory.
    pub fn volume_by_path(&self, path: &Path) -> Result<Volume> {
        let not_found = || {
            Error::new(
                ErrorKind::NotFound,
                format!("storage volume not found: no storage vol with matching path '{}'", path.display()),
            )
        };
        let path = sanitize_path(&path.to_string_lossy());
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(not_found());
        };
        let want = canonical_target(dir);
        let mut by_dir: HashMap<PathBuf, Pool> = HashMap::new();
        for p in self.list()?.pools {
            if p.is_active() {
                by_dir.insert(canonical_target(p.target()), p);
            }
        }
        let pool = by_dir.remove(&want).ok_or_else(not_found)?;
        pool.volume(name).map_err(|e| if e.kind() == ErrorKind::NotFound { not_found() } else { e })
    }
}
