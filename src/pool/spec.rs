//! What a new volume should be: the arguments of `vol-create-as`, or what
//! a `<volume>` document asks for (`volxml::spec_from_xml`),
//! validated before anything is created.

use std::path::PathBuf;

use super::def::Permissions;
use super::name::check_volume_name;
use crate::crypto::Secret;
use crate::device::Format;
use crate::error::{Error, Result};

/// The backing store of a linked clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSpec {
    /// The backing volume's path (its key), recorded as is in the new image.
    pub path: PathBuf,
    /// Its format: required, never probed, recorded in the new image.
    pub format: Format,
}

/// What to create: `vol-create-as` arguments or a `<volume>` document.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// The new volume's name.
    pub name: String,
    /// Guest-visible size in bytes (0 with a backing store: the backing
    /// volume's size). Rounded up to 512 for qcow2 and vmdk.
    pub capacity: u64,
    /// Host bytes to reserve for raw volumes: `Some(0)` sparse (virsh
    /// `vol-create-as` without `--allocation`), `None` fully allocated
    /// (volume XML without `<allocation>`), as libvirt does.
    pub allocation: Option<u64>,
    /// raw, qcow2 or vmdk.
    pub format: Format,
    /// A linked clone's backing volume (qcow2 overlays; vmdk delta links
    /// need a vmdk backing volume).
    pub backing: Option<BackingSpec>,
    /// Mode (default 0600), owner and group of the new file.
    pub permissions: Permissions,
    /// `--prealloc-metadata` (qcow2: `preallocation=metadata`).
    pub prealloc_metadata: bool,
    /// qcow2 `-o` options (`compat`, `cluster_size`, `lazy_refcounts`,
    /// `refcount_bits`, `extended_l2`, `compression_type`, `preallocation`).
    pub qcow2_options: Vec<(String, String)>,
    /// Legacy AES encryption of a qcow2 volume with this passphrase.
    pub encryption: Option<Secret>,
}

impl VolumeSpec {
    /// A sparse volume of `capacity` bytes.
    pub fn new(name: &str, capacity: u64, format: Format) -> Result<VolumeSpec> {
        Ok(VolumeSpec {
            name: check_volume_name(name)?,
            capacity,
            allocation: Some(0),
            format,
            backing: None,
            permissions: Permissions::default(),
            prealloc_metadata: false,
            qcow2_options: Vec::new(),
            encryption: None,
        })
    }

    /// Adds a backing volume (builder style).
    pub fn backing(mut self, path: impl Into<PathBuf>, format: Format) -> Self {
        self.backing = Some(BackingSpec { path: path.into(), format });
        self
    }

    /// Adds a qcow2 option (builder style).
    pub fn qcow2_option(mut self, key: &str, value: &str) -> Self {
        self.qcow2_options.push((key.to_string(), value.to_string()));
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        check_volume_name(&self.name)?;
        match self.format {
            Format::Vhdx => {
                return Err(Error::unsupported(
                    "libvirt's storage volume schema has no 'vhdx' format, so pools do not create VHDX volumes",
                ))
            }
            Format::Luks => return Err(Error::unsupported("luks volumes cannot be created in a pool yet")),
            Format::Raw => {
                if self.backing.is_some() {
                    return Err(Error::unsupported("backing storage not supported for raw volumes"));
                }
                if self.prealloc_metadata {
                    return Err(Error::unsupported("metadata preallocation is not supported for raw volumes"));
                }
                if self.encryption.is_some() {
                    return Err(Error::unsupported(
                        "encrypted raw volumes (LUKS) are not supported: use qcow2 with legacy AES",
                    ));
                }
            }
            Format::Vmdk => {
                if self.encryption.is_some() || self.prealloc_metadata || !self.qcow2_options.is_empty() {
                    return Err(Error::unsupported(
                        "encryption, metadata preallocation and qcow2 options apply to qcow2 volumes only",
                    ));
                }
                if let Some(b) = &self.backing {
                    if b.format != Format::Vmdk {
                        return Err(Error::unsupported(
                            "a vmdk volume's backing volume (delta link parent) must be vmdk",
                        ));
                    }
                }
            }
            Format::Vpc | Format::Vdi => {
                if self.encryption.is_some() || self.prealloc_metadata || !self.qcow2_options.is_empty() {
                    return Err(Error::unsupported(
                        "encryption, metadata preallocation and qcow2 options apply to qcow2 volumes only",
                    ));
                }
                if self.backing.is_some() {
                    return Err(Error::unsupported(format!(
                        "backing storage is not supported for {} volumes",
                        self.format.name()
                    )));
                }
            }
            Format::Qcow2 => {
                if self.prealloc_metadata && self.backing.is_some() {
                    return Err(Error::unsupported("metadata preallocation conflicts with a backing store"));
                }
            }
        }
        if self.capacity == 0 && self.backing.is_none() {
            return Err(Error::invalid_argument("a volume needs a capacity above 0"));
        }
        Ok(())
    }
}
