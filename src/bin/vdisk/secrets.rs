//! Passphrases the way qemu-img takes them: `--object secret,id=ID,data=X`
//! or `file=F`, selected with `encrypt.key-secret=ID` (in `--image-opts` or
//! `-o`), plus vdisk's shorter `--passphrase-file FILE`.

use std::collections::HashMap;
use std::path::PathBuf;

use vdisk::luks::Luks1Params;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{Error, Result, Secret};

/// Secret-related options shared by every command that opens images.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct SecretArgs {
    /// Define a secret: `secret,id=ID,data=PASSPHRASE` or `secret,id=ID,file=FILE`.
    #[arg(long = "object", value_name = "secret,id=ID,data=|file=")]
    pub objects: Vec<String>,
    /// Read the passphrase of encrypted images from FILE.
    #[arg(long = "passphrase-file", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Image arguments are option strings
    /// (`driver=qcow2,file.filename=PATH,encrypt.key-secret=ID`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
}

/// Splits a qemu option string on commas (`,,` is a literal comma).
pub fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out.retain(|s| !s.is_empty());
    out
}

/// An image named on the command line: path, format, secret id.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Path of the image file.
    pub path: PathBuf,
    /// Format, if named.
    pub format: Option<String>,
    /// Secret id from `encrypt.key-secret` (or the `luks` driver's
    /// `key-secret`).
    pub key_secret: Option<String>,
    /// A LUKS volume's detached header (`header.file.filename`).
    pub luks_header: Option<PathBuf>,
}

impl SecretArgs {
    fn secrets(&self) -> Result<HashMap<String, Secret>> {
        let mut map = HashMap::new();
        for o in &self.objects {
            let parts = split_opts(o);
            let mut it = parts.iter();
            match it.next().map(String::as_str) {
                Some("secret") => {}
                Some(other) => {
                    return Err(Error::invalid_argument(format!(
                        "--object type '{other}' is not supported (only secret)"
                    )))
                }
                None => return Err(Error::invalid_argument("empty --object")),
            }
            let mut id = None;
            let mut value = None;
            for kv in it {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| Error::invalid_argument(format!("--object option '{kv}' needs a value")))?;
                match k {
                    "id" => id = Some(v.to_string()),
                    "data" => value = Some(Secret::new(v.as_bytes())),
                    "file" => value = Some(Secret::from_file(std::path::Path::new(v))?),
                    "format" if v == "raw" => {}
                    _ => return Err(Error::invalid_argument(format!("--object secret option '{k}' is not supported"))),
                }
            }
            let id = id.ok_or_else(|| Error::invalid_argument("--object secret needs id=ID"))?;
            let value = value.ok_or_else(|| Error::invalid_argument(format!("secret '{id}' needs data= or file=")))?;
            map.insert(id, value);
        }
        Ok(map)
    }

    /// The passphrase to use: the secret named by `key_secret`, else the
    /// `--passphrase-file`, else the only secret defined.
    pub fn key(&self, key_secret: Option<&str>) -> Result<Option<Secret>> {
        let map = self.secrets()?;
        if let Some(id) = key_secret {
            return map
                .get(id)
                .cloned()
                .map(Some)
                .ok_or_else(|| Error::invalid_argument(format!("no secret with id '{id}' was defined with --object")));
        }
        if let Some(f) = &self.passphrase_file {
            return Secret::from_file(f).map(Some);
        }
        if map.len() == 1 {
            return Ok(map.into_values().next());
        }
        Ok(None)
    }

    /// Interprets an image argument (a path, or an option string with
    /// `--image-opts`).
    pub fn image(&self, arg: &str, format: Option<&str>) -> Result<ImageSpec> {
        if !self.image_opts {
            return Ok(ImageSpec {
                path: PathBuf::from(arg),
                format: format.map(str::to_string),
                key_secret: None,
                luks_header: None,
            });
        }
        image_opts_spec(arg)
    }
}

/// An `--image-opts` option string (`driver=...,file.filename=...`) as an
/// image to open.
pub fn image_opts_spec(arg: &str) -> Result<ImageSpec> {
    {
        let mut spec = ImageSpec { path: PathBuf::new(), format: None, key_secret: None, luks_header: None };
        for kv in split_opts(arg) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Error::invalid_argument(format!("image option '{kv}' needs a value")))?;
            match k {
                "driver" => spec.format = Some(v.to_string()),
                "file.filename" | "filename" => spec.path = PathBuf::from(v),
                "file.driver" if v == "file" => {}
                "encrypt.key-secret" | "key-secret" => spec.key_secret = Some(v.to_string()),
                // QEMU's `header=` node of the luks driver: a file node
                // (`header.driver=file,header.filename=P`) or a format node
                // over one (`header.file.filename=P`).
                "header.file.filename" | "header.filename" => spec.luks_header = Some(PathBuf::from(v)),
                "header.driver" if v == "file" || v == "raw" => {}
                "header.file.driver" if v == "file" => {}
                "encrypt.format" if v == "aes" || v == "luks" => {}
                _ => return Err(Error::invalid_argument(format!("image option '{k}' is not supported"))),
            }
        }
        if spec.path.as_os_str().is_empty() {
            return Err(Error::invalid_argument("image options need file.filename=PATH"));
        }
        Ok(spec)
    }
}

/// qcow2 create options from `-o key=value` pairs (already split), with
/// `encrypt.key-secret=ID` resolved to the passphrase of `--object
/// secret,id=ID` (or `--passphrase-file`).
pub fn qcow2_create_options(size: u64, opts: &[String], secrets: &SecretArgs) -> Result<CreateOptions> {
    let mut o = CreateOptions::new(size);
    let mut key_secret = None;
    for kv in opts {
        let (k, v) =
            kv.split_once('=').ok_or_else(|| Error::invalid_argument(format!("option '{kv}' needs a value")))?;
        if k == "encrypt.key-secret" {
            key_secret = Some(v.to_string());
            continue;
        }
        o.set(k, v)?;
    }
    if opts.iter().any(|kv| kv.starts_with("encrypt.format=")) || key_secret.is_some() {
        let key = secrets.key(key_secret.as_deref())?.ok_or_else(|| {
            Error::invalid_argument(
                "encryption needs a passphrase: --object secret,id=ID,data=... with encrypt.key-secret=ID, or --passphrase-file",
            )
        })?;
        o.encrypt = Some(key);
    }
    Ok(o)
}

/// A new LUKS volume from qemu-img's `luks` options (`key-secret`,
/// `cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`,
/// `iter-time`, `detached-header`): its parameters and passphrase.
pub fn luks_create_options(opts: &[String], secrets: &SecretArgs) -> Result<(Luks1Params, Secret)> {
    let mut p = Luks1Params::default();
    let mut key_secret = None;
    for kv in opts {
        let (k, v) =
            kv.split_once('=').ok_or_else(|| Error::invalid_argument(format!("option '{kv}' needs a value")))?;
        match k {
            "key-secret" => key_secret = Some(v.to_string()),
            "detached-header" => {
                p.detached = match v {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(Error::invalid_argument(format!("detached-header takes on or off, not '{v}'"))),
                }
            }
            "preallocation" if v == "off" => {}
            "luks-version" if v == "1" => {}
            "luks-version" | "pbkdf" | "pbkdf-memory" | "pbkdf-parallel" | "sector-size" | "label" => {
                return Err(Error::invalid_argument(format!(
                    "{k}={v} is a LUKS2 option: LUKS2 volumes need luks-version=2 (1 is the default)"
                )));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        assert_eq!(split_opts("a=1,b=x,,y,c"), vec!["a=1", "b=x,y", "c"]);
        let a =
            SecretArgs { objects: vec!["secret,id=sec0,data=pass".into()], passphrase_file: None, image_opts: true };
        let spec = a.image("driver=qcow2,file.filename=/tmp/x.qcow2,encrypt.key-secret=sec0", None).unwrap();
        assert_eq!(spec.format.as_deref(), Some("qcow2"));
        assert_eq!(a.key(spec.key_secret.as_deref()).unwrap().unwrap().expose(), b"pass");
        assert!(a.key(Some("nope")).is_err());
    }
}
