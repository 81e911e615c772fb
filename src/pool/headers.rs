//! Safe header probes of the files in a pool.
//!
//! A probe reads headers only: the first 2 KiB ([`crate::probe`]), then the
//! qcow2 header ([`Qcow2::read_header`]) or the vmdk descriptor
//! ([`Vmdk::read_descriptor`]). It never opens a backing file or an extent,
//! takes no lock, and reads a file the caller opened with `O_NOFOLLOW |
//! O_NONBLOCK` (or, for a symlink's target, without blocking) and checked
//! to be a regular file on the descriptor. What it finds are [`Facts`],
//! which the probe cache keeps and a listing turns into a
//! [`VolumeInfo`](super::VolumeInfo).

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::dir::{kind_name, open_nonblocking, PoolDir};
use crate::device::BlockDevice;
use crate::device::Format;
use crate::error::Error;
use crate::probe::{probe_bytes, PROBE_LEN};
use crate::qcow2::header::{COMPAT_LAZY_REFCOUNTS, CRYPT_AES, CRYPT_LUKS};
use crate::qcow2::Qcow2;
use crate::storage::{FileStorage, Storage};
use crate::vmdk::Vmdk;
use std::sync::Arc;

/// What a header probe found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Facts {
    pub format: Option<Format>,
    pub capacity: u64,
    pub encryption: Option<String>,
    pub compat: Option<String>,
    pub cluster_size: Option<u64>,
    pub lazy_refcounts: bool,
    pub backing: Option<(String, Option<String>)>,
    pub extents: Vec<String>,
    pub error: Option<String>,
}

impl Facts {
    /// Nothing known but why.
    pub fn error(message: impl Into<String>) -> Facts {
        Facts { error: Some(message.into()), ..Default::default() }
    }
}

/// Reads the headers of an opened regular file. Never fails: what cannot
/// be parsed is reported in `error`.
pub(crate) fn probe_file(file: File, path: &Path) -> Facts {
    let st = match FileStorage::from_file(file, path, true) {
        Ok(s) => s,
        Err(e) => return Facts::error(e.message()),
    };
    let len = st.len().unwrap_or(0);
    let mut head = vec![0u8; (len.min(PROBE_LEN as u64)) as usize];
    if let Err(e) = st.read_at(&mut head, 0) {
        return Facts::error(e.to_string());
    }
    let format = probe_bytes(&head);
    let mut f = Facts { format: Some(format), capacity: len, ..Default::default() };
    let parsed: Result<(), Error> = match format {
        Format::Raw => Ok(()),
        Format::Qcow2 => Qcow2::read_header(&st).map(|h| {
            f.capacity = h.size;
            f.cluster_size = 1u64.checked_shl(h.cluster_bits);
            f.compat = Some(if h.version == 2 { "0.10" } else { "1.1" }.to_string());
            f.lazy_refcounts = h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
            f.encryption = match h.crypt_method {
                CRYPT_AES => Some("qcow".to_string()),
                CRYPT_LUKS => Some("luks".to_string()),
                _ => None,
            };
            f.backing = h.backing_file.map(|b| (b, h.backing_format));
        }),
        Format::Luks => {
            // LUKS1 and LUKS2 alike: the header alone, no passphrase.
            let opts = crate::luks::LuksOptions { read_only: true, inspect_only: true, ..Default::default() };
            crate::luks::Luks::open(Arc::new(st), opts).map(|v| {
                f.capacity = v.size();
                let v2 = v.luks2_header().is_some();
                f.encryption = Some(if v2 { "luks2" } else { "luks" }.to_string());
            })
        }
        Format::Vmdk => Vmdk::read_descriptor(&st).map(|d| {
            f.capacity = d.total_sectors().saturating_mul(512);
            f.backing = d.parent_hint().map(|p| (p.to_string(), Some("vmdk".to_string())));
            let me = path.file_name().map(|n| n.as_bytes().to_vec());
            f.extents =
                d.extents.iter().filter_map(|e| e.file.clone()).filter(|n| Some(n.as_bytes().to_vec()) != me).collect();
        }),
        Format::Vpc => {
            crate::vpc::Vpc::open(Arc::new(st), crate::vpc::VpcOptions { read_only: true, ..Default::default() }).map(
                |v| {
                    f.capacity = v.size();
                    f.cluster_size = v.info().cluster_size;
                    f.backing = v.parent().map(|p| (p.to_string(), Some("vpc".to_string())));
                },
            )
        }
        Format::Vdi => {
            crate::vdi::Vdi::open(Arc::new(st), crate::vdi::VdiOptions { read_only: true, ..Default::default() }).map(
                |v| {
                    f.capacity = v.size();
                    f.cluster_size = v.info().cluster_size;
                },
            )
        }
        // libvirt's volume formats have no VHDX: it reports such a file
        // as raw, and so does the pool.
        Format::Vhdx => {
            f.format = Some(Format::Raw);
            Ok(())
        }
    };
    if let Err(e) = parsed {
        f.capacity = 0;
        f.error = Some(e.message().to_string());
    }
    f
}

/// Probes what a symlink in the pool points at, if it stays inside the
/// pool, and returns the target's metadata too; otherwise only says why
/// not.
pub(crate) fn probe_symlink(d: &PoolDir, name: &OsStr) -> (Facts, Option<Metadata>) {
    let err = |m: String| (Facts::error(m), None);
    let link = d.join(name);
    let target = match std::fs::read_link(&link) {
        Ok(t) => t,
        Err(e) => return err(format!("cannot read the symlink: {e}")),
    };
    let resolved = match link.canonicalize() {
        Ok(r) => r,
        Err(_) => return err(format!("dangling symlink to {}", target.display())),
    };
    if !resolved.starts_with(d.path()) {
        return err(format!(
            "symlink to {} points outside the pool: not probed, never written through",
            resolved.display()
        ));
    }
    let f = match open_nonblocking(&resolved) {
        Ok(f) => f,
        Err(e) => return err(format!("cannot open the symlink target: {e}")),
    };
    let md = match f.metadata() {
        Ok(m) if m.is_file() => m,
        Ok(m) => return err(format!("symlink to a {}", kind_name(&m))),
        Err(e) => return err(format!("cannot stat the symlink target: {e}")),
    };
    (probe_file(f, &resolved), Some(md))
}
