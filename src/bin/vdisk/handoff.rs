//! The control socket of `vdisk serve --control PATH` and the `vdisk
//! handoff` verb that drives it: what a migration script calls to hand the
//! served images from one host to another ([`BlockDevice::inactivate`] on
//! the source, [`BlockDevice::activate`] on the destination).
//!
//! The protocol is one line per connection: the client sends `activate`,
//! `inactivate` or `status`; the server answers `ok` followed by one line
//! per export (`NAME: active` or `NAME: inactive`), or `error: MESSAGE`.

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vdisk::{BlockDevice, Error, Result};

/// Longest request line read from the control socket.
const MAX_REQUEST: u64 = 64;

/// Arguments of `vdisk handoff`.
#[derive(clap::Args, Debug)]
pub struct HandoffArgs {
    /// The control socket of a `vdisk serve --control` process.
    #[arg(value_name = "SOCKET")]
    pub socket: PathBuf,
    /// activate (take the images: this host runs the guest now),
    /// inactivate (flush and let go: another host takes over) or status.
    #[arg(value_name = "ACTION", value_parser = ["activate", "inactivate", "status"])]
    pub action: String,
}

/// The served devices, by export name.
pub type Controlled = Vec<(String, Arc<dyn BlockDevice>)>;

/// Listens on `path` and serves control requests on a background thread
/// for as long as the process lives. Refuses a path that exists.
pub fn start(path: &Path, devices: Controlled) -> Result<()> {
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io("cannot create the control socket (does the path exist already?)", e).with_path(path))?;
    // Whoever can connect can take the images away: the owner only.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("cannot restrict the control socket to its owner", e).with_path(path))?;
    }
    std::thread::Builder::new()
        .name("vdisk-control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &devices);
            }
        })
        .map_err(|e| Error::io("cannot start the control thread", e))?;
    Ok(())
}

fn answer(conn: UnixStream, devices: &Controlled) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = match apply(line.trim(), devices) {
        Ok(()) => {
            let mut s = String::from("ok\n");
            for (name, dev) in devices {
                let state = if dev.is_inactive() { "inactive" } else { "active" };
                s.push_str(&format!("{}: {state}\n", if name.is_empty() { "(default)" } else { name }));
            }
            s
        }
        Err(e) => format!("error: {}\n", e.report().replace('\n', " ")),
    };
    (&conn).write_all(reply.as_bytes())
}

fn apply(action: &str, devices: &Controlled) -> Result<()> {
    let named = |name: &str, e: Error| {
        if name.is_empty() {
            e
        } else {
            e.context(format!("export '{name}'"))
        }
    };
    match action {
        "status" => Ok(()),
        // Every export is tried; the first failure is reported (status then
        // tells which exports changed).
        "activate" | "inactivate" => {
            let mut first = None;
            for (name, dev) in devices {
                let r = if action == "activate" { dev.activate() } else { dev.inactivate() };
                if let Err(e) = r {
                    first.get_or_insert(named(name, e));
                }
            }
            first.map_or(Ok(()), Err)
        }
        other => Err(Error::invalid_argument(format!(
            "unknown control request '{}': activate, inactivate or status",
            other.escape_debug()
        ))),
    }
}

/// Runs `vdisk handoff SOCKET ACTION`: prints the server's answer; exit
/// status 0 when it says `ok`.
pub fn run(a: &HandoffArgs) -> Result<i32> {
    let mut conn = UnixStream::connect(&a.socket).map_err(|e| {
        Error::io("cannot reach the control socket (is vdisk serve --control running?)", e).with_path(&a.socket)
    })?;
    // Flushing a large image can take a while; activation rereads tables.
    conn.set_read_timeout(Some(Duration::from_secs(600))).map_err(|e| Error::io("control socket", e))?;
    writeln!(conn, "{}", a.action).map_err(|e| Error::io("cannot send to the control socket", e))?;
    let mut reply = String::new();
    conn.take(1 << 20).read_to_string(&mut reply).map_err(|e| Error::io("no answer from the control socket", e))?;
    if let Some(rest) = reply.strip_prefix("ok\n") {
        out!("{rest}");
        Ok(0)
    } else {
        let msg = reply.trim().strip_prefix("error: ").unwrap_or(reply.trim());
        Err(Error::new(vdisk::ErrorKind::Io, format!("{} failed: {msg}", a.action)))
    }
}
