//! The byte streams NBD runs over: TCP and Unix sockets, behind one small
//! trait so the server and client need not care which.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// A connected byte stream (TCP or Unix socket).
pub trait Connection: Read + Write + Send + Sync + std::fmt::Debug + 'static {
    /// A second handle on the same socket (one reads, the other writes).
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>>;
    /// Timeout of blocking reads (`None`: wait forever).
    fn set_read_timeout_conn(&self, t: Option<Duration>) -> io::Result<()>;
    /// Timeout of blocking writes (`None`: wait forever).
    fn set_write_timeout_conn(&self, t: Option<Duration>) -> io::Result<()>;
    /// Shuts both directions down (wakes a thread blocked reading).
    fn shutdown_conn(&self);
    /// A printable name of the peer.
    fn peer(&self) -> String;
}

impl Connection for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout_conn(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_timeout_conn(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn peer(&self) -> String {
        self.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "tcp peer".into())
    }
}

impl Connection for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout_conn(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_timeout_conn(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn peer(&self) -> String {
        "unix peer".into()
    }
}

impl Connection for Box<dyn Connection> {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Connection>> {
        (**self).try_clone_conn()
    }
    fn set_read_timeout_conn(&self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout_conn(t)
    }
    fn set_write_timeout_conn(&self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_write_timeout_conn(t)
    }
    fn shutdown_conn(&self) {
        (**self).shutdown_conn()
    }
    fn peer(&self) -> String {
        (**self).peer()
    }
}

/// Where a server listens: a TCP address or a Unix socket path.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket, removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on TCP `addr` (`host:port`).
    pub fn tcp(addr: &str) -> crate::Result<Listener> {
        let l = TcpListener::bind(addr).map_err(|e| crate::Error::io(format!("cannot listen on {addr}"), e))?;
        Ok(Listener::Tcp(l))
    }

    /// Listens on a Unix socket at `path` (an old socket file there is
    /// replaced, as qemu-nbd does).
    pub fn unix(path: impl Into<PathBuf>) -> crate::Result<Listener> {
        let path = path.into();
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(&path);
            }
        }
        let l = UnixListener::bind(&path)
            .map_err(|e| crate::Error::io("cannot listen on the unix socket", e).with_path(&path))?;
        Ok(Listener::Unix(l, path))
    }

    /// The local TCP port (for `-p 0`), if TCP.
    pub fn port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    pub(crate) fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(nb),
            Listener::Unix(l, _) => l.set_nonblocking(nb),
        }
    }

    /// Accepts one connection (blocking streams, `TCP_NODELAY`).
    pub(crate) fn accept(&self) -> io::Result<Box<dyn Connection>> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Box::new(s))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}
