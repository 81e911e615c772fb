//! LUKS2 in `vdisk create` / `vdisk convert`: `-f luks -o luks-version=2`
//! with the LUKS1 options (`key-secret`, `cipher-alg`, `cipher-mode`,
//! `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`, `iter-time`,
//! `detached-header`) and LUKS2's own (`pbkdf`, `pbkdf-memory`,
//! `pbkdf-parallel`, `sector-size`, `label`). QEMU has no LUKS2; the names
//! follow qemu-img where it has one and cryptsetup's otherwise.

use std::sync::Arc;

use vdisk::luks::{KdfKind, Luks, Luks2Params};
use vdisk::{Error, FileStorage, Result, Secret, Storage};

use crate::secrets::SecretArgs;

/// Whether `-o` asks for LUKS2 (`luks-version=2`).
pub fn wants_luks2(opts: &[String]) -> bool {
    opts.iter().any(|kv| kv == "luks-version=2")
}

/// LUKS2 parameters and the passphrase from `-o` pairs.
pub fn create_options(opts: &[String], secrets: &SecretArgs) -> Result<(Luks2Params, Secret)> {
    let mut p = Luks2Params::default();
    let mut key_secret = None;
    for kv in opts {
        let (k, v) =
            kv.split_once('=').ok_or_else(|| Error::invalid_argument(format!("option '{kv}' needs a value")))?;
        match k {
            "key-secret" => key_secret = Some(v.to_string()),
            "luks-version" if v == "2" => {}
            "luks-version" => {
                return Err(Error::invalid_argument(format!("luks-version takes 1 or 2, not '{v}'")));
            }
            "detached-header" => {
                p.detached = match v {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(Error::invalid_argument(format!("detached-header takes on or off, not '{v}'"))),
                }
            }
            "preallocation" if v == "off" => {}
            _ => {
                if !p.set(k, v)? {
                    return Err(Error::invalid_argument(format!("unknown luks option '{k}'")));
                }
            }
        }
    }
    let key = secrets.key(key_secret.as_deref())?.ok_or_else(|| {
        Error::invalid_argument("a LUKS volume needs a passphrase: --object secret,id=ID,data=... with key-secret=ID")
    })?;
    Ok((p, key))
}

fn kdf_name(k: KdfKind) -> &'static str {
    match k {
        KdfKind::Pbkdf2 => "pbkdf2",
        KdfKind::Argon2i => "argon2i",
        KdfKind::Argon2id => "argon2id",
    }
}

/// `vdisk create -f luks -o luks-version=2,...`.
pub fn create(
    path: &std::path::Path,
    name: &str,
    size: u64,
    opts: &[String],
    secrets: &SecretArgs,
    quiet: bool,
) -> Result<()> {
    let (p, key) = create_options(opts, secrets)?;
    let st: Arc<dyn Storage> = Arc::new(FileStorage::create(path)?);
    let h = if p.detached {
        Luks::create_luks2_header(&*st, &p, &key)?
    } else {
        let l = Luks::create_luks2(st, None, size, &p, &key)?;
        let h = l.luks2_header().ok_or_else(|| Error::internal("new LUKS2 volume has no LUKS2 header"))?;
        l.close()?;
        h
    };
    if !quiet {
        let kdf = match h.keyslots.first().map(|k| &k.kdf) {
            Some(vdisk::luks::Kdf::Pbkdf2 { iterations, .. }) => format!(" iterations={iterations}"),
            Some(vdisk::luks::Kdf::Argon2 { time, memory, cpus, .. }) => {
                format!(" pbkdf-time={time} pbkdf-memory={memory} pbkdf-parallel={cpus}")
            }
            None => String::new(),
        };
        outln!(
            "Formatting '{name}', fmt=luks luks-version=2 size={size} key-secret=... cipher={} key-size={} hash-alg={} pbkdf={}{kdf} sector-size={}{}",
            h.segment.encryption,
            h.key_bytes * 8,
            h.digest.hash.name(),
            kdf_name(p.kdf),
            p.sector_size,
            if p.detached { " detached-header=on" } else { "" }
        );
    }
    Ok(())
}
