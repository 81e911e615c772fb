//! The NBD server: exports of any [`BlockDevice`], a thread per connection
//! and a small pool of workers per connection, so one slow client never
//! stalls another and a client's queued requests run in parallel.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::conn::{Connection, Listener};
use crate::device::BlockDevice;
use crate::error::{Error, Result};

/// How long a reply may wait for the client to read it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// Whether writes of all-zero data become zero writes (QEMU's
/// `detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Data is written as sent.
    #[default]
    Off,
    /// All-zero writes become `write_zeroes` keeping space allocated.
    On,
    /// All-zero writes become `write_zeroes` that may free space (when the
    /// export allows discards).
    Unmap,
}

/// The dirty state of one persistent bitmap, for the
/// `qemu:dirty-bitmap:NAME` meta context. Image formats that keep bitmaps
/// implement it; the server only asks it questions.
pub trait DirtyBitmap: Send + Sync + std::fmt::Debug {
    /// Whether `[offset, offset + n)` is dirty, for the longest `n <=
    /// max_len` (at least 1 when `max_len > 0`) with one state.
    fn status(&self, offset: u64, max_len: u64) -> Result<(u64, bool)>;
}

/// One export: a device under a name, and how it is offered.
#[derive(Debug, Clone)]
pub struct Export {
    /// Export name (what clients ask for; `""` is the default export).
    pub name: String,
    /// Free-text description sent with `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes.
    pub read_only: bool,
    /// Pass `NBD_CMD_TRIM` (and unmapping zero writes) down to the device;
    /// otherwise trims are acknowledged and ignored (QEMU's
    /// `discard=ignore`).
    pub discard: bool,
    /// All-zero writes handling.
    pub detect_zeroes: DetectZeroes,
    /// Offer the `qemu:allocation-depth` meta context.
    pub allocation_depth: bool,
    /// Bitmaps offered as `qemu:dirty-bitmap:NAME` contexts.
    pub bitmaps: BTreeMap<String, Arc<dyn DirtyBitmap>>,
    /// Preferred block size advertised (`NBD_INFO_BLOCK_SIZE`); a power of
    /// two between 512 and 32 MiB.
    pub preferred_block: u32,
}

impl Export {
    /// An export of `device` named `name`: read-only, trims ignored, no
    /// extra meta contexts.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Export {
        let preferred = device
            .info()
            .cluster_size
            .filter(|c| c.is_power_of_two() && (512..=u64::from(super::proto::MAX_PAYLOAD)).contains(c))
            .unwrap_or(4096)
            .min(64 << 10) as u32;
        Export {
            name: name.into(),
            description: String::new(),
            device,
            read_only: true,
            discard: false,
            detect_zeroes: DetectZeroes::Off,
            allocation_depth: false,
            bitmaps: BTreeMap::new(),
            preferred_block: preferred,
        }
    }

    /// Sets whether writes are refused.
    pub fn read_only(mut self, ro: bool) -> Export {
        self.read_only = ro;
        self
    }

    /// Sets whether trims reach the device.
    pub fn discard(mut self, on: bool) -> Export {
        self.discard = on;
        self
    }

    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Export {
        self.description = d.into();
        self
    }

    /// Sets all-zero write handling.
    pub fn detect_zeroes(mut self, d: DetectZeroes) -> Export {
        self.detect_zeroes = d;
        self
    }

    /// Offers `qemu:allocation-depth`.
    pub fn allocation_depth(mut self, on: bool) -> Export {
        self.allocation_depth = on;
        self
    }

    /// Offers `qemu:dirty-bitmap:NAME` backed by `bitmap`.
    pub fn bitmap(mut self, name: impl Into<String>, bitmap: Arc<dyn DirtyBitmap>) -> Export {
        self.bitmaps.insert(name.into(), bitmap);
        self
    }
}

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Most connections served at once (QEMU's `-e`); further clients wait
    /// in the listen queue.
    pub max_connections: usize,
    /// Serve until stopped; otherwise [`Server::serve`] returns when the
    /// last client has gone (QEMU's `-t` unset).
    pub persistent: bool,
    /// Time a client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// Worker threads per connection (requests of one client run in
    /// parallel up to this many).
    pub workers: usize,
    /// Bytes of request and reply data one connection may hold in memory
    /// at once (at least one maximal request).
    pub inflight_bytes: usize,
    /// Offer extended headers (`NBD_OPT_EXTENDED_HEADERS`); off, clients
    /// fall back to compact headers.
    pub extended_headers: bool,
    /// Where connection errors are reported (default: standard error,
    /// write failures ignored).
    pub log: fn(&str),
    /// Stop on SIGTERM, SIGINT or SIGHUP (as on [`StopHandle::stop`]):
    /// [`Server::serve`] installs process-wide handlers for them. Off by
    /// default; a program embedding the server usually has its own.
    pub stop_on_signals: bool,
}

/// Writes a line to standard error, ignoring failures (a closed stderr
/// must not stop a server).
pub fn log_to_stderr(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "vdisk: {msg}");
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 16,
            persistent: true,
            handshake_timeout: Duration::from_secs(10),
            workers: 16,
            inflight_bytes: 64 << 20,
            extended_headers: true,
            log: log_to_stderr,
            stop_on_signals: false,
        }
    }
}

/// A handle that stops a running [`Server::serve`].
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks the server to stop: it accepts no more clients and shuts the
    /// running connections down (requests already received finish first);
    /// `serve` then returns.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// An NBD server over a set of exports.
///
/// ```no_run
/// use std::sync::Arc;
/// use vdisk::nbd::{Export, Listener, Server, ServerOptions};
/// use vdisk::{MemStorage, Raw};
///
/// let disk = Raw::create(Arc::new(MemStorage::new()), 1 << 20)?;
/// let mut server = Server::new(ServerOptions::default());
/// server.add_export(Export::new("disk", Arc::new(disk)).read_only(false))?;
/// server.serve(Listener::tcp("127.0.0.1:10809")?)?;
/// # Ok::<(), vdisk::Error>(())
/// ```
#[derive(Debug)]
pub struct Server {
    pub(crate) exports: Vec<Arc<Export>>,
    pub(crate) opts: ServerOptions,
    stop: Arc<AtomicBool>,
    active: Arc<(Mutex<usize>, Condvar)>,
    served: AtomicUsize,
    /// Sockets of the running connections, shut down when the server stops.
    open: Mutex<Vec<(usize, Box<dyn Connection>)>>,
}

impl Server {
    /// A server with no exports yet.
    pub fn new(opts: ServerOptions) -> Server {
        Server {
            exports: Vec::new(),
            opts,
            stop: Arc::new(AtomicBool::new(false)),
            active: Arc::new((Mutex::new(0), Condvar::new())),
            served: AtomicUsize::new(0),
            open: Mutex::new(Vec::new()),
        }
    }

    /// Adds an export; names must be unique and at most 4096 bytes.
    pub fn add_export(&mut self, export: Export) -> Result<()> {
        if export.name.len() > super::proto::MAX_STRING as usize || export.name.contains('\0') {
            return Err(Error::invalid_argument(format!("invalid export name '{}'", export.name.escape_debug())));
        }
        if self.exports.iter().any(|e| e.name == export.name) {
            return Err(Error::new(
                crate::ErrorKind::AlreadyExists,
                format!("export '{}' is defined twice", export.name),
            ));
        }
        if !export.preferred_block.is_power_of_two()
            || export.preferred_block < 512
            || export.preferred_block > super::proto::MAX_PAYLOAD
        {
            return Err(Error::invalid_argument(format!(
                "preferred block size {} is not a power of two between 512 and 32 MiB",
                export.preferred_block
            )));
        }
        self.exports.push(Arc::new(export));
        Ok(())
    }

    /// The exports.
    pub fn exports(&self) -> &[Arc<Export>] {
        &self.exports
    }

    /// A handle to stop [`serve`](Self::serve) from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    pub(crate) fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.iter().find(|e| e.name == name).cloned()
    }

    /// Serves one client on the calling thread: handshake, then requests
    /// until it disconnects. A protocol error ends the connection with an
    /// error naming it; nothing the client sends can panic the server.
    pub fn serve_connection(&self, conn: Box<dyn Connection>) -> Result<()> {
        let session = match super::handshake::negotiate(self, &*conn)? {
            Some(s) => s,
            None => return Ok(()),
        };
        conn.set_read_timeout_conn(None).map_err(|e| Error::io("nbd: socket", e))?;
        // A client that stops reading its replies is dropped rather than
        // holding a worker forever.
        conn.set_write_timeout_conn(Some(REPLY_TIMEOUT)).map_err(|e| Error::io("nbd: socket", e))?;
        super::transmit::run(self, conn, session)
    }

    /// Accepts clients on `listener`, each on its own thread, at most
    /// `max_connections` at once, until stopped (or, when not persistent,
    /// until the last client has gone). Connection errors are reported on
    /// standard error and end only that connection.
    pub fn serve(&self, listener: Listener) -> Result<()> {
        listener.set_nonblocking(true).map_err(|e| Error::io("nbd: listener", e))?;
        if self.opts.stop_on_signals {
            crate::sys::catch_stop_signals().map_err(|e| Error::io("nbd: installing signal handlers", e))?;
        }
        std::thread::scope(|scope| loop {
            if self.stop.load(Ordering::SeqCst) || (self.opts.stop_on_signals && crate::sys::stop_signalled()) {
                for (_, c) in self.open.lock().iter() {
                    c.shutdown_conn();
                }
                break;
            }
            {
                let (count, cv) = &*self.active;
                let mut n = count.lock();
                if !self.opts.persistent && *n == 0 && self.served.load(Ordering::SeqCst) > 0 {
                    break;
                }
                if *n >= self.opts.max_connections.max(1) {
                    cv.wait_for(&mut n, Duration::from_millis(50));
                    continue;
                }
            }
            match listener.accept() {
                Ok(conn) => {
                    *self.active.0.lock() += 1;
                    let id = self.served.fetch_add(1, Ordering::SeqCst);
                    if let Ok(c) = conn.try_clone_conn() {
                        self.open.lock().push((id, c));
                    }
                    let active = self.active.clone();
                    scope.spawn(move || {
                        let peer = conn.peer();
                        if let Err(e) = self.serve_connection(conn) {
                            (self.opts.log)(&format!("nbd client {peer}: {}", e.report()));
                        }
                        self.open.lock().retain(|(i, _)| *i != id);
                        let (count, cv) = &*active;
                        *count.lock() -= 1;
                        cv.notify_all();
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    (self.opts.log)(&format!("nbd accept: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Ok(())
    }
}
