//! `vdisk serve`: export images over NBD with qemu-nbd's flags, a thin
//! layer over [`vdisk::nbd::Server`].

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vdisk::nbd::{DetectZeroes, Export, Listener, Server, ServerOptions};
use vdisk::{BlockDevice, CacheMode, Error, Result};

/// Arguments of `vdisk serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// TCP address to listen on.
    #[arg(short = 'b', long = "bind", default_value = "127.0.0.1")]
    pub bind: String,
    /// TCP port to listen on (0: any free port, printed on standard output).
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    pub port: u16,
    /// Export name (repeat once per image; default "" for a single image,
    /// the file name otherwise).
    #[arg(short = 'x', long = "export-name", value_name = "NAME")]
    pub export_names: Vec<String>,
    /// Export description.
    #[arg(short = 'D', long = "description", default_value = "")]
    pub description: String,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Most clients served at once.
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    pub shared: usize,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    pub persistent: bool,
    /// Offer the qemu:allocation-depth meta context.
    #[arg(short = 'A', long = "allocation-depth")]
    pub allocation_depth: bool,
    /// Offer the qemu:dirty-bitmap:NAME meta context of a persistent bitmap.
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    pub bitmaps: Vec<String>,
    /// Trims: ignore (default) or unmap.
    #[arg(long = "discard", default_value = "ignore")]
    pub discard: String,
    /// All-zero writes: off (default), on or unmap.
    #[arg(long = "detect-zeroes", default_value = "off")]
    pub detect_zeroes: String,
    /// Cache mode: writeback (default), none (O_DIRECT), writethrough,
    /// directsync, unsafe.
    #[arg(long = "cache", default_value = "writeback")]
    pub cache: String,
    /// Seconds a client has to complete the handshake.
    #[arg(long = "handshake-limit", default_value_t = 10)]
    pub handshake_limit: u64,
    /// Run in the background once listening.
    #[arg(long = "fork")]
    pub fork: bool,
    /// Write the server's process id to this file.
    #[arg(long = "pid-file", value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Serve volumes of this storage pool by volume name: those named as
    /// IMAGES, or all of them.
    #[arg(long = "pool", value_name = "NAME")]
    pub pool: Option<String>,
    /// Storage pool configuration directory (with --pool).
    #[arg(long = "config-dir", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Open the images inactive, as the destination of a live migration
    /// while the source host still writes them: clients' I/O is refused
    /// until `vdisk handoff SOCKET activate` (raw, qcow2, vdi, vpc, luks).
    #[arg(long = "inactive", requires = "control")]
    pub inactive: bool,
    /// Listen for handoff requests (`vdisk handoff`) on this Unix socket.
    #[arg(long = "control", value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    /// Internal: set by --fork in the background process.
    #[arg(long = "x-forked", hide = true)]
    pub forked: bool,
    #[command(flatten)]
    pub secrets: crate::secrets::SecretArgs,
    /// The images.
    pub images: Vec<String>,
}

/// A device that makes every write durable before it is acknowledged
/// (`cache=writethrough` / `directsync`).
#[derive(Debug)]
struct WriteThrough<D>(D);

impl<D: BlockDevice> BlockDevice for WriteThrough<D> {
    fn info(&self) -> vdisk::DeviceInfo {
        self.0.info()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_at(buf, offset)?;
        self.0.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: vdisk::ZeroMode) -> Result<()> {
        self.0.write_zeroes(offset, len, mode)?;
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.discard(offset, len)?;
        self.0.flush()
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<vdisk::Extent> {
        self.0.map(offset, max_len)
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
    fn make_clean(&self) -> Result<()> {
        self.0.make_clean()
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.0.backing()
    }
    fn inactivate(&self) -> Result<()> {
        self.0.inactivate()
    }
    fn activate(&self) -> Result<()> {
        self.0.activate()
    }
    fn is_inactive(&self) -> bool {
        self.0.is_inactive()
    }
    fn refresh(&self) -> Result<()> {
        self.0.refresh()
    }
}

/// A device whose flushes do nothing (`cache=unsafe`).
#[derive(Debug)]
struct NoFlush<D>(D);

impl<D: BlockDevice> BlockDevice for NoFlush<D> {
    fn info(&self) -> vdisk::DeviceInfo {
        self.0.info()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: vdisk::ZeroMode) -> Result<()> {
        self.0.write_zeroes(offset, len, mode)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.discard(offset, len)
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<vdisk::Extent> {
        self.0.map(offset, max_len)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn make_clean(&self) -> Result<()> {
        self.0.make_clean()
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.0.backing()
    }
    fn inactivate(&self) -> Result<()> {
        self.0.inactivate()
    }
    fn activate(&self) -> Result<()> {
        self.0.activate()
    }
    fn is_inactive(&self) -> bool {
        self.0.is_inactive()
    }
    fn refresh(&self) -> Result<()> {
        self.0.refresh()
    }
}

/// The devices to export, by name.
/// A qcow2 persistent bitmap served as `qemu:dirty-bitmap:NAME`: its
/// live state (writes through the export mark it too).
#[derive(Debug)]
struct QcowBitmap {
    img: Arc<vdisk::Image>,
    name: String,
}

impl vdisk::nbd::DirtyBitmap for QcowBitmap {
    fn status(&self, offset: u64, max_len: u64) -> Result<(u64, bool)> {
        match &*self.img {
            vdisk::Image::Qcow2(q) => q.bitmap_extent(&self.name, offset, max_len),
            _ => Err(Error::internal("a bitmap on an image that is not qcow2")),
        }
    }
}

/// Whether `img` is a qcow2 image with a usable bitmap called `name`.
fn has_bitmap(img: Option<&vdisk::Image>, name: &str) -> bool {
    matches!(img, Some(vdisk::Image::Qcow2(q)) if q.bitmaps().iter().any(|b| b.name == name && !b.inconsistent))
}

/// An export's name, device, and the image behind it (for bitmaps) when
/// it is one.
type Served = (String, Arc<dyn BlockDevice>, Option<Arc<vdisk::Image>>);

fn devices(a: &ServeArgs, cache: &str) -> Result<Vec<Served>> {
    let direct = matches!(cache, "none" | "directsync");
    let mut out: Vec<Served> = Vec::new();
    if let Some(pool) = &a.pool {
        // With --pool, the positional names are volumes (all when none).
        let reg = crate::pool::registry(a.config_dir.as_ref())?;
        let pool = reg.pool(pool)?;
        let names: Vec<std::ffi::OsString> = if a.images.is_empty() {
            pool.volumes()?.into_iter().filter(|v| v.format.is_some()).map(|v| v.name).collect()
        } else {
            a.images.iter().map(std::ffi::OsString::from).collect()
        };
        for (i, vname) in names.iter().enumerate() {
            let vol = pool.volume(vname)?;
            let name = match a.export_names.get(i) {
                Some(n) => n.clone(),
                None => vname.to_str().map(str::to_string).ok_or_else(|| {
                    Error::invalid_argument(format!("volume name {vname:?} is not UTF-8: name its export with -x"))
                })?,
            };
            let dev = if a.inactive { vol.open_inactive(None) } else { vol.open(a.read_only) };
            let dev = dev.map_err(|e| e.context(format!("opening volume '{}'", vname.to_string_lossy())))?;
            out.push((name, Arc::new(dev), None));
        }
        if out.is_empty() {
            return Err(Error::new(vdisk::ErrorKind::NotFound, "the pool has no volumes to serve"));
        }
        return Ok(out);
    }
    if a.images.is_empty() {
        return Err(Error::invalid_argument("name an image to serve (or --pool NAME)"));
    }
    if a.export_names.len() > a.images.len() {
        return Err(Error::invalid_argument("more export names (-x) than images"));
    }
    for (i, arg) in a.images.iter().enumerate() {
        let spec = a.secrets.image(arg, a.format.as_deref())?;
        let key = a.secrets.key(spec.key_secret.as_deref())?;
        let opts = crate::common::image_options(spec.format.as_deref(), a.read_only, true, key, false)?
            .cache(if direct { CacheMode::Direct } else { CacheMode::Writeback })
            .inactive(a.inactive);
        let img = opts.open(&spec.path)?;
        let name = match a.export_names.get(i) {
            Some(n) => n.clone(),
            None if a.images.len() == 1 => String::new(),
            None => spec.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let img = Arc::new(img);
        out.push((name, img.clone(), Some(img)));
    }
    Ok(out)
}

/// Starts the same command in the background and returns once it listens:
/// it prints `ready` on its standard output then. Its standard error is a
/// pipe too, relayed only if it fails to start, so nothing waiting on this
/// command's output waits on the server.
fn fork() -> Result<i32> {
    use std::io::{BufRead, Read};
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot find the vdisk executable", e))?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--fork").collect();
    let mut child = std::process::Command::new(exe)
        .args(&args)
        .arg("--x-forked")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("cannot start the background server", e))?;
    let (Some(out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Error::internal("no pipe to the background server"));
    };
    let mut line = String::new();
    let _ = std::io::BufReader::new(out).read_line(&mut line);
    if line.starts_with("ready") {
        if let Some(port) = line.trim().strip_prefix("ready ") {
            outln!("{port}");
        }
        return Ok(0);
    }
    let mut msg = String::new();
    let _ = err.read_to_string(&mut msg);
    let status = child.wait().map_err(|e| Error::io("waiting for the background server", e))?;
    let _ = write!(std::io::stderr(), "{msg}");
    Err(Error::new(vdisk::ErrorKind::Io, format!("the background server failed to start ({status})")))
}

/// Runs `vdisk serve`.
pub fn run(a: &ServeArgs) -> Result<i32> {
    let discard = match a.discard.as_str() {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        o => return Err(Error::invalid_argument(format!("--discard must be ignore or unmap, not '{o}'"))),
    };
    let detect = match a.detect_zeroes.as_str() {
        "off" => DetectZeroes::Off,
        "on" => DetectZeroes::On,
        "unmap" => DetectZeroes::Unmap,
        o => return Err(Error::invalid_argument(format!("--detect-zeroes must be off, on or unmap, not '{o}'"))),
    };
    let cache = a.cache.as_str();
    if !matches!(cache, "writeback" | "none" | "writethrough" | "directsync" | "unsafe") {
        return Err(Error::invalid_argument(format!(
            "--cache must be writeback, none, writethrough, directsync or unsafe, not '{cache}'"
        )));
    }
    if a.shared == 0 {
        return Err(Error::invalid_argument("-e must be at least 1"));
    }
    if a.fork && !a.forked {
        return fork();
    }
    let mut server = Server::new(ServerOptions {
        max_connections: a.shared,
        persistent: a.persistent,
        handshake_timeout: Duration::from_secs(a.handshake_limit.max(1)),
        stop_on_signals: true,
        ..ServerOptions::default()
    });
    let exports = devices(a, cache)?;
    // -B NAME: every served qcow2 image that has the bitmap offers it.
    for b in &a.bitmaps {
        if !exports.iter().any(|(_, _, img)| has_bitmap(img.as_deref(), b)) {
            return Err(Error::new(
                vdisk::ErrorKind::NotFound,
                format!("-B {b}: no served image has a bitmap of that name"),
            ));
        }
    }
    let mut controlled: crate::handoff::Controlled = Vec::new();
    for (name, dev, img) in exports {
        let bitmaps: Vec<(String, Arc<dyn vdisk::nbd::DirtyBitmap>)> = a
            .bitmaps
            .iter()
            .filter(|b| has_bitmap(img.as_deref(), b))
            .map(|b| {
                let bm: Arc<dyn vdisk::nbd::DirtyBitmap> =
                    Arc::new(QcowBitmap { img: img.clone().expect("has the bitmap"), name: b.clone() });
                (b.clone(), bm)
            })
            .collect();
        let dev: Arc<dyn BlockDevice> = match cache {
            "writethrough" | "directsync" => Arc::new(WriteThrough(dev)),
            "unsafe" => Arc::new(NoFlush(dev)),
            _ => dev,
        };
        controlled.push((name.clone(), dev.clone()));
        let e = Export::new(name, dev)
            .read_only(a.read_only)
            .discard(discard)
            .detect_zeroes(detect)
            .allocation_depth(a.allocation_depth)
            .description(a.description.clone());
        let e = bitmaps.into_iter().fold(e, |e, (n, bm)| e.bitmap(n, bm));
        server.add_export(e)?;
    }
    let listener = match &a.socket {
        Some(p) => Listener::unix(p)?,
        None => {
            let host =
                if a.bind.contains(':') && !a.bind.starts_with('[') { format!("[{}]", a.bind) } else { a.bind.clone() };
            Listener::tcp(&format!("{host}:{}", a.port))?
        }
    };
    if let Some(p) = &a.control {
        crate::handoff::start(p, controlled)?;
    }
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| Error::io("cannot write the pid file", e).with_path(p))?;
    }
    // Ready: the --fork parent waits for this line; `-p 0` callers read the
    // port from it.
    if a.forked {
        match listener.port() {
            Some(port) if a.port == 0 => outln!("ready {port}"),
            _ => outln!("ready"),
        }
    } else if a.port == 0 {
        if let Some(port) = listener.port() {
            outln!("{port}");
        }
    }
    let _ = std::io::stdout().flush();
    let r = server.serve(listener);
    for e in server.exports() {
        if let Err(err) = e.device.make_clean() {
            let _ = writeln!(std::io::stderr(), "vdisk: export '{}': {}", e.name, err.report());
        }
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &a.control {
        let _ = std::fs::remove_file(p);
    }
    r.map(|_| 0)
}
