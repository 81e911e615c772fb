//! What a new volume should be: the arguments of `vol-create-as`, or what
//! a `<volume>` document asks for (`volxml::spec_from_xml`),
//! validated before anything is created.

use std::path::PathBuf;

use super::def::Permissions;
use super::name::check_volume_name;
use crate::crypto::Secret;
use crate::device::Format;
use crate::error::{Error, Result};

/// The `-o` options a standalone luks volume takes (also with an
/// `encrypt.` prefix), as `qemu-img create -f luks` names them.
pub const LUKS_CREATE_OPTIONS: &[&str] =
    &["cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time"];

/// The backing store of a linked clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSpec {
    /// The backing volume's path (its key), recorded as is in the new image.
    pub path: PathBuf,
    /// Its format: required, never probed, recorded in the new image.
    pub format: Format,
}

/// How an encrypted volume is encrypted: libvirt's
/// `<encryption format='luks'|'qcow'>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VolumeEncryption {
    /// LUKS1 as QEMU writes it: a raw (or `luks`) volume becomes a
    /// standalone LUKS volume (`qemu-img create -f luks`), a qcow2 volume
    /// gets `encrypt.format=luks`. What libvirt creates by default.
    #[default]
    Luks,
    /// qcow2's legacy AES (`encrypt.format=aes`), for old images only.
    Qcow,
}

impl VolumeEncryption {
    /// libvirt's name: `luks` or `qcow`.
    pub fn name(self) -> &'static str {
        match self {
            VolumeEncryption::Luks => "luks",
            VolumeEncryption::Qcow => "qcow",
        }
    }
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
    /// Encrypt the volume with this passphrase (key slot 0 for LUKS), as
    /// `encryption_format` says.
    pub encryption: Option<Secret>,
    /// LUKS (default) or qcow2's legacy AES.
    pub encryption_format: VolumeEncryption,
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
            encryption_format: VolumeEncryption::Luks,
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

    /// The format of the file created: a raw volume with LUKS encryption is
    /// a standalone `luks` volume (libvirt's `<format type='raw'/>` with
    /// `<encryption format='luks'>`).
    pub fn file_format(&self) -> Format {
        match (self.format, &self.encryption, self.encryption_format) {
            (Format::Raw, Some(_), VolumeEncryption::Luks) => Format::Luks,
            (f, _, _) => f,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        check_volume_name(&self.name)?;
        match self.file_format() {
            Format::Vhdx => {
                return Err(Error::unsupported(
                    "libvirt's storage volume schema has no 'vhdx' format, so pools do not create VHDX volumes",
                ))
            }
            Format::Luks => {
                if self.encryption.is_none() {
                    return Err(Error::invalid_argument("a luks volume needs a passphrase (--passphrase-file)"));
                }
                if self.encryption_format != VolumeEncryption::Luks {
                    return Err(Error::unsupported("a luks volume cannot use qcow encryption"));
                }
                if self.backing.is_some() {
                    return Err(Error::unsupported("backing storage not supported for luks volumes"));
                }
                if self.prealloc_metadata {
                    return Err(Error::unsupported("metadata preallocation is not supported for luks volumes"));
                }
                for (k, _) in &self.qcow2_options {
                    let key = k.strip_prefix("encrypt.").unwrap_or(k);
                    if !LUKS_CREATE_OPTIONS.contains(&key) {
                        return Err(Error::unsupported(format!(
                            "option '{k}' does not apply to luks volumes ({})",
                            LUKS_CREATE_OPTIONS.join(", ")
                        )));
                    }
                }
            }
            Format::Raw => {
                if self.backing.is_some() {
                    return Err(Error::unsupported("backing storage not supported for raw volumes"));
                }
                if self.prealloc_metadata {
                    return Err(Error::unsupported("metadata preallocation is not supported for raw volumes"));
                }
                if self.encryption.is_some() {
                    return Err(Error::unsupported(
                        "qcow encryption applies to qcow2 volumes only: encrypt a raw volume with luks",
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
