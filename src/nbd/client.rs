//! The NBD client: a [`BlockDevice`] over one connection to an NBD server
//! (qemu-nbd, nbdkit, `vdisk serve`), named by a qemu-style URI.
//!
//! Negotiation asks for extended headers, then structured replies, then
//! the `base:allocation` and `qemu:allocation-depth` meta contexts, and
//! takes what the server offers. Threads calling the device at once have
//! their requests in flight together on the one connection (see
//! `pipe.rs`); every reply is checked against its request.

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::conn::Connection;
use super::pipe::{Outcome, Pipe};
use super::proto::*;
use crate::device::{check_request, BlockDevice, DeviceInfo, Extent, ExtentKind, Format, ZeroMode};
use crate::error::{Error, ErrorKind, Result};

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `host:port` over TCP.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// An export on a server: address and export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The server.
    pub address: Address,
    /// The export name (`""`: the default export).
    pub export: String,
}

/// Whether `s` looks like an NBD URI (`nbd://`, `nbd+tcp://`,
/// `nbd+unix://`).
pub fn is_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+tcp://") || s.starts_with("nbd+unix://")
}

/// Decodes `%XX` escapes.
fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => out.push(v),
                None => return Err(Error::invalid_argument(format!("bad %-escape in NBD URI '{s}'"))),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::invalid_argument(format!("NBD URI '{s}' is not UTF-8")))
}

impl Target {
    /// Parses `nbd://HOST[:PORT]/EXPORT` (port 10809 by default) and
    /// `nbd+unix:///EXPORT?socket=PATH`, as qemu-img takes them.
    pub fn parse(uri: &str) -> Result<Target> {
        let bad = |why: &str| Error::invalid_argument(format!("invalid NBD URI '{uri}': {why}"));
        let (unix, rest) = if let Some(r) = uri.strip_prefix("nbd+unix://") {
            (true, r)
        } else if let Some(r) = uri.strip_prefix("nbd://").or_else(|| uri.strip_prefix("nbd+tcp://")) {
            (false, r)
        } else {
            return Err(bad("it must start with nbd://, nbd+tcp:// or nbd+unix://"));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path)?;
        let mut socket = None;
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("socket", v)) => socket = Some(PathBuf::from(percent_decode(v)?)),
                _ => return Err(bad(&format!("unknown query parameter '{kv}'"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad("a unix URI has no host"));
            }
            Address::Unix(socket.ok_or_else(|| bad("socket=PATH is missing"))?)
        } else {
            if socket.is_some() {
                return Err(bad("socket= is only for nbd+unix://"));
            }
            if authority.is_empty() {
                return Err(bad("the host is missing"));
            }
            let has_port = if authority.starts_with('[') { authority.contains("]:") } else { authority.contains(':') };
            Address::Tcp(if has_port { authority.to_string() } else { format!("{authority}:10809") })
        };
        Ok(Target { address, export })
    }
}

/// An NBD export as a [`BlockDevice`].
#[derive(Debug)]
pub struct Client {
    pipe: Pipe,
    target: Target,
    size: u64,
    flags: u16,
    structured: bool,
    extended: bool,
    base_ctx: Option<u32>,
    depth_ctx: Option<u32>,
    read_only: bool,
    max_block: u32,
    preferred_block: u32,
}

/// Most bytes of option reply data accepted.
const MAX_OPTION_REPLY: u32 = 64 << 10;

fn io_err(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("nbd: {what}"), e)
}

fn send_option(w: &mut dyn Write, opt: u32, data: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).and_then(|_| w.flush()).map_err(io_err("sending an option"))
}

/// Reads one option reply: (type, data).
fn read_option_reply(r: &mut dyn Read, opt: u32) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h).map_err(io_err("reading an option reply"))?;
    let mut w = Wire::new(&h, "option reply");
    let magic = w.u64()?;
    let ropt = w.u32()?;
    let typ = w.u32()?;
    let len = w.u32()?;
    if magic != OPT_REPLY_MAGIC {
        return Err(ProtoError::BadMagic { what: "option reply", got: magic }.into());
    }
    if ropt != opt {
        return Err(ProtoError::BadField { field: "option reply option", value: u64::from(ropt) }.into());
    }
    if len > MAX_OPTION_REPLY {
        return Err(ProtoError::TooLong {
            field: "option reply length",
            value: u64::from(len),
            limit: u64::from(MAX_OPTION_REPLY),
        }
        .into());
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).map_err(io_err("reading an option reply"))?;
    Ok((typ, data))
}

fn option_error(opt: &str, typ: u32, data: &[u8]) -> Error {
    let msg = String::from_utf8_lossy(data);
    let kind = if typ == REP_ERR_UNKNOWN { ErrorKind::NotFound } else { ErrorKind::Unsupported };
    Error::new(
        kind,
        format!(
            "nbd: the server refused {opt} (reply {:#x}){}",
            typ,
            if msg.is_empty() { String::new() } else { format!(": {msg}") }
        ),
    )
}

impl Client {
    /// Connects to the export `uri` names (see [`Target::parse`]).
    pub fn open_uri(uri: &str, read_only: bool) -> Result<Client> {
        Client::connect(&Target::parse(uri)?, read_only)
    }

    /// Connects to `target` and negotiates. `read_only` refuses writes
    /// locally even if the server allows them.
    pub fn connect(target: &Target, read_only: bool) -> Result<Client> {
        let conn: Box<dyn Connection> = match &target.address {
            Address::Tcp(a) => {
                let s = std::net::TcpStream::connect(a.as_str())
                    .map_err(|e| Error::io(format!("nbd: cannot connect to {a}"), e))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Address::Unix(p) => Box::new(
                UnixStream::connect(p)
                    .map_err(|e| Error::io("nbd: cannot connect to the unix socket", e).with_path(p))?,
            ),
        };
        Client::handshake(conn, target.clone(), read_only)
    }

    /// Negotiates over an open connection.
    pub fn handshake(conn: Box<dyn Connection>, target: Target, read_only: bool) -> Result<Client> {
        let timeout = Some(Duration::from_secs(30));
        conn.set_read_timeout_conn(timeout).map_err(io_err("socket"))?;
        let mut r = BufReader::new(conn.try_clone_conn().map_err(io_err("socket"))?);
        let mut w = BufWriter::new(conn);
        let mut g = [0u8; 18];
        r.read_exact(&mut g).map_err(io_err("reading the greeting"))?;
        let mut wire = Wire::new(&g, "greeting");
        let m1 = wire.u64()?;
        let m2 = wire.u64()?;
        let hflags = wire.u16()?;
        if m1 != NBDMAGIC {
            return Err(ProtoError::BadMagic { what: "greeting", got: m1 }.into());
        }
        if m2 != IHAVEOPT {
            return Err(Error::unsupported("nbd: the server speaks oldstyle negotiation only"));
        }
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Error::unsupported("nbd: the server does not speak fixed newstyle negotiation"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        if no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        w.write_all(&cflags.to_be_bytes()).map_err(io_err("sending flags"))?;

        let mut extended = false;
        let mut structured = false;
        send_option(&mut w, OPT_EXTENDED_HEADERS, &[])?;
        let (typ, _) = read_option_reply(&mut r, OPT_EXTENDED_HEADERS)?;
        if typ == REP_ACK {
            extended = true;
        } else {
            send_option(&mut w, OPT_STRUCTURED_REPLY, &[])?;
            let (typ, _) = read_option_reply(&mut r, OPT_STRUCTURED_REPLY)?;
            structured = typ == REP_ACK;
        }
        let name = target.export.as_bytes();
        let mut base_ctx = None;
        let mut depth_ctx = None;
        if structured || extended {
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name);
            let queries = [CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH];
            d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in queries {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            send_option(&mut w, OPT_SET_META_CONTEXT, &d)?;
            for _ in 0..=MAX_META_QUERIES {
                let (typ, data) = read_option_reply(&mut r, OPT_SET_META_CONTEXT)?;
                if typ != REP_META_CONTEXT {
                    break;
                }
                let mut wire = Wire::new(&data, "meta context reply");
                let id = wire.u32()?;
                let n = wire.remaining() as u32;
                match wire.string(n, "context name")?.as_str() {
                    CONTEXT_BASE_ALLOCATION => base_ctx = Some(id),
                    CONTEXT_ALLOCATION_DEPTH => depth_ctx = Some(id),
                    _ => {}
                }
            }
        }
        // NBD_OPT_GO, asking for the block size constraints.
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        send_option(&mut w, OPT_GO, &d)?;
        /// Informational replies one NBD_OPT_GO may get before its ACK.
        const MAX_GO_REPLIES: usize = 64;
        let mut size = None;
        let mut flags = 0u16;
        let mut max_block = MAX_PAYLOAD;
        let mut preferred_block = 4096;
        let mut done = false;
        for _ in 0..MAX_GO_REPLIES {
            let (typ, data) = read_option_reply(&mut r, OPT_GO)?;
            match typ {
                REP_ACK => {
                    done = true;
                    break;
                }
                REP_INFO => {
                    let mut wire = Wire::new(&data, "export info");
                    match wire.u16()? {
                        INFO_EXPORT => {
                            size = Some(wire.u64()?);
                            flags = wire.u16()?;
                        }
                        INFO_BLOCK_SIZE => {
                            let _min = wire.u32()?;
                            preferred_block = wire.u32()?;
                            max_block = wire.u32()?.clamp(512, MAX_PAYLOAD);
                        }
                        _ => {}
                    }
                }
                REP_ERR_UNSUP if !extended => {
                    // A server without NBD_OPT_GO: the old way in.
                    send_option(&mut w, OPT_EXPORT_NAME, name)?;
                    let mut b = vec![0u8; if no_zeroes { 10 } else { 134 }];
                    r.read_exact(&mut b).map_err(io_err("reading the export"))?;
                    let mut wire = Wire::new(&b, "export");
                    size = Some(wire.u64()?);
                    flags = wire.u16()?;
                    done = true;
                    break;
                }
                t if t & (1 << 31) != 0 => return Err(option_error("NBD_OPT_GO", t, &data)),
                _ => {}
            }
        }
        if !done {
            return Err(Error::invalid_argument(format!(
                "nbd: the server sent {MAX_GO_REPLIES} replies to NBD_OPT_GO without an ACK"
            )));
        }
        let size = size.ok_or_else(|| Error::invalid_argument("nbd: the server sent no export size"))?;
        if size > i64::MAX as u64 {
            return Err(ProtoError::BadField { field: "export size", value: size }.into());
        }
        w.get_ref().set_read_timeout_conn(None).map_err(io_err("socket"))?;
        Ok(Client {
            pipe: Pipe::new(r, w, structured, extended),
            read_only: read_only || flags & TF_READ_ONLY != 0,
            target,
            size,
            flags,
            structured,
            extended,
            base_ctx,
            depth_ctx,
            max_block,
            preferred_block: if preferred_block.is_power_of_two() { preferred_block } else { 4096 },
        })
    }

    /// The export this client is connected to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether extended headers are in use.
    pub fn extended_headers(&self) -> bool {
        self.extended
    }

    /// Whether structured replies are in use (implied by extended headers).
    pub fn structured_replies(&self) -> bool {
        self.structured || self.extended
    }

    /// The block size the server prefers (`NBD_INFO_BLOCK_SIZE`).
    pub fn preferred_block_size(&self) -> u32 {
        self.preferred_block
    }

    /// Whether the server offered `base:allocation`.
    pub fn has_allocation_status(&self) -> bool {
        self.base_ctx.is_some()
    }

    /// Sends one request and waits for its whole reply.
    fn request(&self, typ: u16, flags: u16, offset: u64, length: u64, payload: &[u8]) -> Result<Outcome> {
        self.pipe.request(typ, flags, offset, length, payload)
    }

    fn writable(&self, what: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only(what));
        }
        Ok(())
    }

    /// Largest effect length of one request for commands without payload.
    fn max_effect(&self) -> u64 {
        if self.extended {
            1 << 30
        } else {
            // Keep 32-bit lengths and stay aligned.
            1 << 31
        }
    }
}

impl BlockDevice for Client {
    fn info(&self) -> DeviceInfo {
        DeviceInfo::new(Format::Raw, self.size, self.read_only)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(offset, buf.len() as u64, self.size)?;
        let mut pos = 0usize;
        for chunk in buf.chunks_mut(self.max_block as usize) {
            let off = offset + pos as u64;
            let n = chunk.len() as u64;
            let out = self.request(CMD_READ, 0, off, n, &[])?;
            chunk.copy_from_slice(&out.data);
            pos += chunk.len();
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable("write")?;
        check_request(offset, buf.len() as u64, self.size)?;
        let mut pos = 0usize;
        for chunk in buf.chunks(self.max_block as usize) {
            self.request(CMD_WRITE, 0, offset + pos as u64, chunk.len() as u64, chunk)?;
            pos += chunk.len();
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.writable("write_zeroes")?;
        check_request(offset, len, self.size)?;
        if self.flags & TF_SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; (self.max_block as u64).min(len) as usize];
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(zeros.len() as u64);
                self.write_at(&zeros[..n as usize], offset + pos)?;
                pos += n;
            }
            return Ok(());
        }
        let flags = if mode == ZeroMode::Allocate { CMD_FLAG_NO_HOLE } else { 0 };
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(self.max_effect());
            self.request(CMD_WRITE_ZEROES, flags, offset + pos, n, &[])?;
            pos += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("discard")?;
        check_request(offset, len, self.size)?;
        if self.flags & TF_SEND_TRIM == 0 {
            return Ok(());
        }
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(self.max_effect());
            self.request(CMD_TRIM, 0, offset + pos, n, &[])?;
            pos += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_request(offset, 0, self.size)?;
        let len = max_len.min(self.size - offset).min(self.max_effect());
        let data =
            Extent { offset, length: len, kind: ExtentKind::Data { host_offset: None }, depth: 0, encrypted: false };
        let Some(base) = self.base_ctx else {
            return Ok(data);
        };
        if len == 0 {
            return Ok(data);
        }
        let out = self.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, len, &[])?;
        let first = |id: u32| out.status.iter().find(|(i, _)| *i == id).and_then(|(_, d)| d.first().copied());
        let Some((n, st)) = first(base) else {
            return Err(Error::new(
                ErrorKind::InvalidImage,
                "nbd: invalid reply from the server: no base:allocation status",
            ));
        };
        let mut length = n.min(len);
        let st = st as u32;
        let mut kind = if st & STATE_ZERO != 0 {
            ExtentKind::Zero { host_offset: None }
        } else {
            ExtentKind::Data { host_offset: None }
        };
        let mut depth = 0;
        if let Some((dn, dv)) = self.depth_ctx.and_then(first) {
            length = length.min(dn);
            if dv == 0 && st & STATE_ZERO != 0 {
                kind = ExtentKind::Unallocated;
            }
            depth = (dv as u32).saturating_sub(1);
        }
        Ok(Extent { offset, length, kind, depth, encrypted: false })
    }

    fn flush(&self) -> Result<()> {
        if self.flags & TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, &[]).map(|_| ())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.pipe.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = Target::parse("nbd://localhost/disk").unwrap();
        assert_eq!(t.address, Address::Tcp("localhost:10809".into()));
        assert_eq!(t.export, "disk");
        let t = Target::parse("nbd://127.0.0.1:1234").unwrap();
        assert_eq!((t.address, t.export.as_str()), (Address::Tcp("127.0.0.1:1234".into()), ""));
        let t = Target::parse("nbd+unix:///ex%20p?socket=/tmp/s.sock").unwrap();
        assert_eq!((t.address, t.export.as_str()), (Address::Unix("/tmp/s.sock".into()), "ex p"));
        assert!(Target::parse("nbd+unix:///x").is_err(), "socket is required");
        assert!(Target::parse("nbd://").is_err());
        assert!(Target::parse("nbd://h/x?socket=/s").is_err());
        assert!(Target::parse("http://h/x").is_err());
        assert!(Target::parse("nbd://h/%zz").is_err());
    }
}
