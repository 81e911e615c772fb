//! Helpers shared by the subcommands: sizes with qemu's suffixes, qemu-style
//! human sizes, opening images, JSON printing.

use std::path::Path;

use vdisk::{BackingPolicy, CacheMode, Error, Format, Image, LockMode, OpenOptions, Result};

/// Parses a size with qemu-img's suffixes (see [`vdisk::size::parse`]).
pub fn parse_size(s: &str) -> Result<u64> {
    vdisk::size::parse(s)
}

/// `%0.3g` as C prints it.
fn g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let e = x.abs().log10().floor() as i32;
    // Round to 3 significant digits first; rounding may bump the exponent.
    let s = format!("{:.2e}", x);
    let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(e);
    if !(-4..3).contains(&exp) {
        let mant = mant.trim_end_matches('0').trim_end_matches('.');
        return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    let f = format!("{:.*}", decimals, x);
    if f.contains('.') {
        f.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        f
    }
}

/// A size as qemu prints it: `336 KiB`, `1.5 GiB`, `0 B`.
pub fn human_size(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // floor(log2(val * 1024 / 1000)) / 10 picks the unit, as qemu's size_to_str.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let i = if scaled < 1.0 { 0 } else { (scaled.log2().floor() as usize) / 10 };
    let i = i.min(6);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", g3(val as f64 / div), SUFFIXES[i])
}

/// Opens an image the way qemu-img does for the CLI: the named format, or a
/// probe when none is named; backing files followed (probing their format
/// when the image does not record it).
#[allow(dead_code)]
pub fn open_image(path: &Path, format: Option<&str>, read_only: bool, follow_backing: bool) -> Result<Image> {
    open_image_with_key(path, format, read_only, follow_backing, None)
}

/// [`open_image`] with a passphrase for encrypted images.
pub fn open_image_with_key(
    path: &Path,
    format: Option<&str>,
    read_only: bool,
    follow_backing: bool,
    key: Option<vdisk::Secret>,
) -> Result<Image> {
    open_image_locked(path, format, read_only, follow_backing, key, false)
}

/// The image lock mode for `-U/--force-share`: read-only, no conflicts
/// checked (like `qemu-img -U`); otherwise QEMU-compatible locks are taken
/// and an image in use by another process is refused.
fn lock_mode(force_share: bool) -> LockMode {
    if force_share {
        LockMode::ForceShare
    } else {
        LockMode::Auto
    }
}

/// [`open_image_with_key`] with `-U/--force-share`.
fn open_image_locked(
    path: &Path,
    format: Option<&str>,
    read_only: bool,
    follow_backing: bool,
    key: Option<vdisk::Secret>,
    force_share: bool,
) -> Result<Image> {
    image_options(format, read_only, follow_backing, key, force_share)?.open(path)
}

thread_local! {
    /// The cache mode of the images opened next on this thread (`-t`/`-T`).
    static CACHE: std::cell::Cell<CacheMode> = const { std::cell::Cell::new(CacheMode::Writeback) };
}

/// qemu-img's cache modes: `none` and `directsync` bypass the host's page
/// cache (`O_DIRECT`); `writeback`, `writethrough` and `unsafe` go through
/// it. (Every verb flushes what it wrote before it exits, so the modes
/// differ only in the path the data takes.)
pub fn cache_mode(s: &str) -> Result<CacheMode> {
    match s {
        "none" | "directsync" => Ok(CacheMode::Direct),
        "writeback" | "writethrough" | "unsafe" => Ok(CacheMode::Writeback),
        other => Err(vdisk::Error::invalid_argument(format!(
            "invalid cache option '{other}': none, writeback, writethrough, directsync or unsafe"
        ))),
    }
}

/// Runs `f` with images opened in cache mode `mode` (`None`: the default).
pub fn with_cache<T>(mode: Option<&str>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let m = match mode {
        Some(m) => cache_mode(m)?,
        None => CacheMode::Writeback,
    };
    let old = CACHE.with(|c| c.replace(m));
    let r = f();
    CACHE.with(|c| c.set(old));
    r
}

/// The open options every command builds from its flags: lock mode (`-U`),
/// access, key, backing policy, the cache mode ([`with_cache`]), and the
/// format (`-f`) or probing.
pub fn image_options(
    format: Option<&str>,
    read_only: bool,
    follow_backing: bool,
    key: Option<vdisk::Secret>,
    force_share: bool,
) -> Result<OpenOptions> {
    let opts = OpenOptions::new()
        .lock(lock_mode(force_share))
        .cache(CACHE.with(|c| c.get()))
        .read_only(read_only)
        .key_opt(key)
        .backing(if follow_backing { BackingPolicy::Follow } else { BackingPolicy::Never });
    Ok(match format {
        Some(f) => opts.format(Format::from_name(f)?),
        None => opts.probe(true),
    })
}

/// The internal snapshot `-l SPEC` names (`snapshot.name=NAME`,
/// `snapshot.id=ID`, or a bare name or id), viewed without applying it.
pub fn snapshot_arg<'a>(img: &'a Image, spec: &str) -> Result<vdisk::qcow2::SnapshotView<'a>> {
    let Image::Qcow2(q) = img else {
        return Err(Error::unsupported("only qcow2 images have internal snapshots"));
    };
    let key = spec.strip_prefix("snapshot.name=").or_else(|| spec.strip_prefix("snapshot.id=")).unwrap_or(spec);
    q.snapshot_view(key)
}

/// Where a file an image names (`name`, relative to the image's directory
/// unless absolute) lies.
pub fn beside(image: &Path, name: &str) -> std::path::PathBuf {
    let n = Path::new(name);
    if n.is_absolute() {
        return n.to_path_buf();
    }
    match image.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(n),
        _ => n.to_path_buf(),
    }
}

/// What opens the backing file of an image being created, as qemu-img
/// does: the format given (`-F`, `backing_fmt`) or probed, the backing's
/// own chain followed.
pub fn create_resolver() -> OpenOptions {
    OpenOptions::new().read_only(true).probe(true).backing(BackingPolicy::Follow)
}

/// Pretty-prints JSON with 4-space indentation, as qemu-img does.
pub fn print_json(v: &serde_json::Value) {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    if v.serialize(&mut ser).is_ok() {
        outln!("{}", String::from_utf8_lossy(&out));
    }
}

/// Whether stdout is a terminal (progress bars only there).
pub fn stdout_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}

/// A progress printer in qemu-img's style: `    (12.34/100%)`.
pub fn progress_printer(enabled: bool) -> impl Fn(u64, u64) + Sync {
    let last = std::sync::atomic::AtomicU64::new(u64::MAX);
    move |done, total| {
        if !enabled || total == 0 {
            return;
        }
        let pct = (done as f64 * 10000.0 / total as f64) as u64;
        if last.swap(pct, std::sync::atomic::Ordering::Relaxed) != pct {
            out!("    ({:.2}/100%)\r", pct as f64 / 100.0);
        }
    }
}

/// Opens an image named on the command line (a path, or `--image-opts`),
/// with the passphrase its secret options select.
pub fn open_arg(
    secrets: &crate::secrets::SecretArgs,
    arg: &str,
    format: Option<&str>,
    read_only: bool,
    follow_backing: bool,
) -> Result<(std::path::PathBuf, Image)> {
    open_arg_shared(secrets, arg, format, read_only, follow_backing, false)
}

/// [`open_arg`] with `-U/--force-share` (see [`lock_mode`]).
pub fn open_arg_shared(
    secrets: &crate::secrets::SecretArgs,
    arg: &str,
    format: Option<&str>,
    read_only: bool,
    follow_backing: bool,
    force_share: bool,
) -> Result<(std::path::PathBuf, Image)> {
    if let Some(img) = open_nbd(arg, format, read_only)? {
        return Ok((arg.into(), img));
    }
    let spec = secrets.image(arg, format)?;
    let key = secrets.key(spec.key_secret.as_deref())?;
    let mut opts = image_options(spec.format.as_deref(), read_only, follow_backing, key, force_share)?;
    if let Some(h) = &spec.luks_header {
        opts = opts.luks_header(h);
    }
    let img = opts.open(&spec.path)?;
    Ok((spec.path, img))
}

/// Opens an image to look at its metadata: with the passphrase if one was
/// given, else encrypted images open without it (their data unreadable).
pub fn open_inspect(
    secrets: &crate::secrets::SecretArgs,
    arg: &str,
    format: Option<&str>,
    follow_backing: bool,
    force_share: bool,
) -> Result<(std::path::PathBuf, Image)> {
    if let Some(img) = open_nbd(arg, format, true)? {
        return Ok((arg.into(), img));
    }
    let spec = secrets.image(arg, format)?;
    let key = secrets.key(spec.key_secret.as_deref())?;
    let mut opts = OpenOptions::new()
        .lock(lock_mode(force_share))
        .cache(CACHE.with(|c| c.get()))
        .read_only(true)
        .inspect_only(key.is_none())
        .key_opt(key)
        .backing(if follow_backing { BackingPolicy::Follow } else { BackingPolicy::Never });
    match spec.format.as_deref() {
        Some(f) => opts = opts.format(Format::from_name(f)?),
        None => opts = opts.probe(true),
    }
    if let Some(h) = &spec.luks_header {
        opts = opts.luks_header(h);
    }
    let img = opts.open(&spec.path)?;
    Ok((spec.path, img))
}

/// An NBD URI (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`)
/// opened as a client; `None` when `arg` is not one. The export's bytes
/// are the guest disk (format raw).
pub fn open_nbd(arg: &str, format: Option<&str>, read_only: bool) -> Result<Option<Image>> {
    if !vdisk::nbd::is_uri(arg) {
        return Ok(None);
    }
    if let Some(f) = format.filter(|f| *f != "raw") {
        return Err(Error::unsupported(format!("an NBD export is opened as raw, not '{f}'")));
    }
    Ok(Some(Image::Nbd(vdisk::nbd::Client::open_uri(arg, read_only)?)))
}

/// Checks a virtual size the way qemu-img does before anything is created.
pub fn check_image_size(size: u64) -> Result<()> {
    if size > i64::MAX as u64 {
        return Err(Error::invalid_argument(format!("invalid image size {size}: must be between 0 and {}", i64::MAX)));
    }
    Ok(())
}

/// Removes what a failed `create` or `convert` made: the image file, and
/// the extent files vmdk names after it (`NAME-flat.EXT`, `NAME-sNNN.EXT`,
/// `NAME-fNNN.EXT`), where they did not exist before. Nothing else is
/// touched, and no file that existed before is removed.
pub struct CreatedFiles {
    dir: std::path::PathBuf,
    name: std::ffi::OsString,
    before: std::collections::HashSet<std::ffi::OsString>,
}

impl CreatedFiles {
    /// Notes which of those names exist beside `path` now.
    pub fn before(path: &Path) -> CreatedFiles {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let name = path.file_name().map(|s| s.to_os_string()).unwrap_or_default();
        let mut c = CreatedFiles { dir, name, before: Default::default() };
        c.before = c.ours();
        c
    }

    /// Whether `file` is an extent name vmdk derives from `image`.
    fn is_extent_of(image: &str, file: &str) -> bool {
        let (prefix, postfix) = match image.rfind('.') {
            Some(i) => (&image[..i], &image[i..]),
            None => (image, ""),
        };
        let Some(mid) =
            file.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')).and_then(|r| r.strip_suffix(postfix))
        else {
            return false;
        };
        mid == "flat"
            || (mid.len() == 4
                && (mid.starts_with('s') || mid.starts_with('f'))
                && mid[1..].bytes().all(|b| b.is_ascii_digit()))
    }

    /// The image and its extent names that exist now.
    fn ours(&self) -> std::collections::HashSet<std::ffi::OsString> {
        let mut out = std::collections::HashSet::new();
        let Some(image) = self.name.to_str() else {
            if self.dir.join(&self.name).exists() {
                out.insert(self.name.clone());
            }
            return out;
        };
        if image.is_empty() {
            return out;
        }
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let n = e.file_name();
                if n == self.name || n.to_str().is_some_and(|f| Self::is_extent_of(image, f)) {
                    out.insert(n);
                }
            }
        }
        out
    }

    /// Removes those files made since [`before`](Self::before); used when
    /// the command failed.
    pub fn remove_new(&self) {
        for name in self.ours() {
            if !self.before.contains(&name) {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_files_are_the_image_and_its_extents_only() {
        assert!(CreatedFiles::is_extent_of("d.vmdk", "d-flat.vmdk"));
        assert!(CreatedFiles::is_extent_of("d.vmdk", "d-s001.vmdk"));
        assert!(CreatedFiles::is_extent_of("d.vmdk", "d-f012.vmdk"));
        assert!(!CreatedFiles::is_extent_of("d.vmdk", "d2.vmdk"));
        assert!(!CreatedFiles::is_extent_of("d.vmdk", "d.log"));
        assert!(!CreatedFiles::is_extent_of("disk.img", "diskette.img"));
        assert!(!CreatedFiles::is_extent_of("d.vmdk", "d-s01x.vmdk"));
    }

    #[test]
    fn human() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(4194304), "4 MiB");
        assert_eq!(human_size(344064), "336 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(1000), "0.977 KiB");
        assert_eq!(human_size(999), "999 B");
    }
}
