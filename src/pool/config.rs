//! vdisk's configuration directory: where each file of the registry
//! lives (the layout is described in [`registry`](super::registry)), the
//! lock taken while definitions or state change, and how pool targets are
//! compared.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::statefile::lock_exclusive;
use super::uuid::Uuid;
use crate::error::{Error, Result};

/// Where a pool's definition lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// vdisk's configuration directory.
    Vdisk,
    /// libvirt's configuration directory (read only).
    Libvirt,
}

/// Where the registry keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryPaths {
    /// vdisk's configuration directory (laid out as [`registry`](super::registry) describes).
    pub config_dir: PathBuf,
    /// libvirt's configuration directory, read only (`None`: not read).
    pub libvirt_dir: Option<PathBuf>,
}

impl RegistryPaths {
    /// `config_dir`, and libvirt's directory from `VDISK_LIBVIRT_DIR`
    /// (empty: none) or `/etc/libvirt/storage`.
    pub fn new(config_dir: impl Into<PathBuf>) -> RegistryPaths {
        let libvirt_dir = match std::env::var_os("VDISK_LIBVIRT_DIR") {
            Some(v) if v.is_empty() => None,
            Some(v) => Some(PathBuf::from(v)),
            None => Some(PathBuf::from("/etc/libvirt/storage")),
        };
        RegistryPaths { config_dir: config_dir.into(), libvirt_dir }
    }

    /// The default locations: `VDISK_CONFIG_DIR`, else
    /// `$XDG_CONFIG_HOME/vdisk/storage`, else `$HOME/.config/vdisk/storage`.
    pub fn from_env() -> Result<RegistryPaths> {
        if let Some(d) = std::env::var_os("VDISK_CONFIG_DIR").filter(|v| !v.is_empty()) {
            return Ok(Self::new(d));
        }
        if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            return Ok(Self::new(PathBuf::from(x).join("vdisk/storage")));
        }
        match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => Ok(Self::new(PathBuf::from(h).join(".config/vdisk/storage"))),
            None => Err(Error::invalid_argument(
                "no configuration directory: set VDISK_CONFIG_DIR, XDG_CONFIG_HOME or HOME",
            )),
        }
    }

    /// Does not read libvirt's directory.
    pub fn without_libvirt(mut self) -> RegistryPaths {
        self.libvirt_dir = None;
        self
    }

    pub(crate) fn def_file(&self, name: &str) -> PathBuf {
        self.config_dir.join(format!("{name}.xml"))
    }
    pub(crate) fn autostart_link(&self, name: &str) -> PathBuf {
        self.config_dir.join("autostart").join(format!("{name}.xml"))
    }
    pub(crate) fn state_file(&self, name: &str) -> PathBuf {
        self.config_dir.join("run").join(format!("{name}.xml"))
    }
    pub(crate) fn cache_file(&self, uuid: Uuid) -> PathBuf {
        self.config_dir.join("cache").join(format!("{uuid}.cache"))
    }
    pub(crate) fn records_file(&self, uuid: Uuid) -> PathBuf {
        self.config_dir.join("volumes").join(format!("{uuid}.formats"))
    }
}

/// An exclusive `flock` on `<config>/.lock`, held while definitions or
/// state change.
pub(crate) struct RegistryLock {
    _file: std::fs::File,
}

pub(crate) fn lock(paths: &RegistryPaths) -> Result<RegistryLock> {
    Ok(RegistryLock { _file: lock_exclusive(&paths.config_dir.join(".lock"), "the registry")? })
}

/// The canonical form of a target path for comparisons: symlinks resolved
/// for the part that exists, the rest appended.
pub(crate) fn canonical_target(p: &Path) -> PathBuf {
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (existing.file_name().map(OsStr::to_os_string), existing.parent()) {
            (Some(n), Some(parent)) => {
                rest.push(n);
                existing = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}
