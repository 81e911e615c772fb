//! `vdisk amend`: `qemu-img amend -o OPTIONS IMG` for qcow2 — compat
//! (0.10 → 1.1), lazy_refcounts, size (grow), backing_file/backing_fmt
//! (the name only, as qemu-img amend does). Options qemu-img takes only at
//! creation are refused as it refuses them; the ones vdisk does not amend
//! yet (data files, refcount width) are refused by name. LUKS key slots:
//! `encrypt.state`, `encrypt.keyslot`, `encrypt.new-secret`,
//! `encrypt.old-secret`, `encrypt.iter-time` for qcow2, the same without
//! the prefix for luks volumes; `--force` allows erasing the last slot.

use vdisk::luks::KeyslotChange;
use vdisk::{Error, Image, Result};

use crate::common::{open_arg, parse_size};
use crate::secrets::{split_opts, SecretArgs};

/// Arguments of `vdisk amend`.
#[derive(clap::Args, Debug)]
pub struct AmendArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Options to change (`-o key=value,...`).
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Show progress (accepted for qemu-img compatibility).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Allow dangerous changes (erasing the last LUKS key slot).
    #[arg(long = "force")]
    pub force: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The image.
    pub image: String,
}

fn on_off(k: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::invalid_argument(format!("option {k}: '{v}' is not on or off"))),
    }
}

/// Runs `vdisk amend`.
pub fn run(a: &AmendArgs) -> Result<i32> {
    let opts: Vec<String> = a.options.iter().flat_map(|o| split_opts(o)).collect();
    if opts.is_empty() {
        return Err(Error::invalid_argument("must specify options (-o)"));
    }
    let mut pairs = Vec::new();
    let mut slots: Vec<(&str, &str)> = Vec::new();
    for kv in &opts {
        let (k, v) =
            kv.split_once('=').ok_or_else(|| Error::invalid_argument(format!("option '{kv}' needs a value")))?;
        let bare = k.strip_prefix("encrypt.").unwrap_or(k);
        match k {
            "compat" | "lazy_refcounts" | "size" | "backing_file" | "backing_fmt" | "refcount_bits" | "data_file" => {
                pairs.push((k, v))
            }
            "encrypt.iter-time" | "encrypt.keyslot" | "encrypt.new-secret" | "encrypt.old-secret" | "encrypt.state"
            | "iter-time" | "keyslot" | "new-secret" | "old-secret" | "state" => slots.push((bare, v)),
            "data_file_raw" => return Err(Error::unsupported(format!("amending '{k}' is not supported by vdisk yet"))),
            "cluster_size" | "preallocation" | "extended_l2" | "compression_type" | "encryption" | "encrypt.format"
            | "encrypt.key-secret" => {
                return Err(Error::invalid_argument(format!(
                    "invalid parameter '{k}': this option is only supported for image creation"
                )))
            }
            other => return Err(Error::invalid_argument(format!("invalid parameter '{other}'"))),
        }
    }
    let (_, img) = open_arg(&a.secrets, &a.image, a.format.as_deref(), false, false)?;
    if !slots.is_empty() {
        let secret = |id: &str| {
            a.secrets
                .key(Some(id))?
                .ok_or_else(|| Error::invalid_argument(format!("no secret with id '{id}' was defined with --object")))
        };
        let mut c = KeyslotChange::parse(&slots, &secret)?;
        c.force = a.force;
        let spec = a.secrets.image(&a.image, a.format.as_deref())?;
        let key = a.secrets.key(spec.key_secret.as_deref())?;
        match &img {
            Image::Luks(l) => l.change_keyslots(&c)?,
            Image::Qcow2(q) => {
                let key = key.ok_or_else(|| Error::invalid_argument("the image's passphrase is needed"))?;
                q.change_luks_keyslots(&key, &c)?;
            }
            _ => return Err(Error::unsupported("key slots exist only in LUKS encrypted images")),
        }
    }
    if let Image::Luks(l) = img {
        if !pairs.is_empty() {
            return Err(Error::unsupported("luks volumes amend only their key slots"));
        }
        l.close()?;
        return Ok(0);
    }
    if pairs.is_empty() {
        if let Image::Qcow2(q) = img {
            q.close()?;
        }
        return Ok(0);
    }
    let Image::Qcow2(q) = img else {
        return Err(Error::unsupported(format!("amend works on qcow2 images; '{}' is {}", a.image, img.format())));
    };
    // compat first (lazy refcounts need 1.1), then the rest in order.
    if let Some((_, v)) = pairs.iter().find(|(k, _)| *k == "compat") {
        q.set_compat(v)?;
    }
    let backing_file = pairs.iter().find(|(k, _)| *k == "backing_file").map(|(_, v)| *v);
    let backing_fmt = pairs.iter().find(|(k, _)| *k == "backing_fmt").map(|(_, v)| *v);
    for (k, v) in &pairs {
        match *k {
            "lazy_refcounts" => q.set_lazy_refcounts(on_off(k, v)?)?,
            "refcount_bits" => q.set_refcount_bits(
                v.parse().map_err(|_| Error::invalid_argument(format!("refcount_bits '{v}' is not a number")))?,
            )?,
            "data_file" => q.set_data_file(v)?,
            "size" => {
                let size = parse_size(v)?;
                q.resize_with(size, false)?;
            }
            _ => {}
        }
    }
    if backing_file.is_some() || backing_fmt.is_some() {
        let info = vdisk::BlockDevice::info(&q);
        let name = match backing_file {
            Some("") => None,
            Some(n) => Some(n.to_string()),
            None => info.backing_file.clone(),
        };
        let fmt = backing_fmt.map(str::to_string).or(info.backing_format.clone());
        q.set_backing_file(name.as_deref(), fmt.as_deref())?;
    }
    q.close()?;
    Ok(0)
}
