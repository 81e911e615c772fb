//! The NBD client: a [`BlockDevice`] over one connection to an NBD server
//! (qemu-nbd, nbdkit, `vdisk serve`), named by a qemu-style URI.
//!
//! Negotiation asks for extended headers, then structured replies, then
//! the `base:allocation` and `qemu:allocation-depth` meta contexts, and
//! takes what the server offers. Requests are sent one at a time over the
//! connection. Every reply is checked: the cookie must be the request's,
//! chunks must stay inside the request and under the payload limit, and a
//! read must be covered exactly; anything else is an error that names
//! what the server sent.

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::conn::Connection;
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

/// The connection and what the handshake agreed.
#[derive(Debug)]
struct Stream {
    r: BufReader<Box<dyn Connection>>,
    w: BufWriter<Box<dyn Connection>>,
    /// A reply could not be parsed: the stream is out of step.
    broken: bool,
}

/// An NBD export as a [`BlockDevice`].
#[derive(Debug)]
pub struct Client {
    stream: Mutex<Stream>,
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
    cookie: AtomicU64,
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

/// How the message of an error the server reported starts.
const SERVER_FAILED: &str = "nbd: the server failed";

/// An error a server reported for a command.
fn command_error(cmd: u16, errno: u32, msg: &str) -> Error {
    let kind = match errno {
        EPERM => ErrorKind::ReadOnly,
        EINVAL => ErrorKind::InvalidArgument,
        ENOSPC => ErrorKind::OutOfBounds,
        ENOTSUP => ErrorKind::Unsupported,
        _ => ErrorKind::Io,
    };
    let what = if msg.is_empty() { String::new() } else { format!(": {msg}") };
    Error::new(kind, format!("{SERVER_FAILED} {} with error {errno}{what}", command_name(cmd)))
}

/// What the replies to one request delivered.
#[derive(Default)]
struct Outcome {
    /// Block status descriptors by context id.
    status: Vec<(u32, Vec<(u64, u64)>)>,
    /// Read bytes covered.
    covered: u64,
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
        let mut size = None;
        let mut flags = 0u16;
        let mut max_block = MAX_PAYLOAD;
        let mut preferred_block = 4096;
        for _ in 0..64 {
            let (typ, data) = read_option_reply(&mut r, OPT_GO)?;
            match typ {
                REP_ACK => break,
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
                    break;
                }
                t if t & (1 << 31) != 0 => return Err(option_error("NBD_OPT_GO", t, &data)),
                _ => {}
            }
        }
        let size = size.ok_or_else(|| Error::invalid_argument("nbd: the server sent no export size"))?;
        if size > i64::MAX as u64 {
            return Err(ProtoError::BadField { field: "export size", value: size }.into());
        }
        w.get_ref().set_read_timeout_conn(None).map_err(io_err("socket"))?;
        Ok(Client {
            stream: Mutex::new(Stream { r, w, broken: false }),
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
            cookie: AtomicU64::new(1),
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

    /// Sends one request and reads its whole reply.
    fn request(
        &self,
        typ: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
        read: Option<&mut [u8]>,
    ) -> Result<Outcome> {
        let mut s = self.stream.lock();
        if s.broken {
            return Err(Error::new(ErrorKind::Io, "nbd: the connection broke on an earlier reply"));
        }
        let r = self.exchange(&mut s, typ, flags, offset, length, payload, read);
        if let Err(e) = &r {
            // An error the server reported leaves the stream in step;
            // anything else (i/o, a reply that made no sense) does not.
            if !e.message().starts_with(SERVER_FAILED) {
                s.broken = true;
            }
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        s: &mut Stream,
        typ: u16,
        mut flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
        mut read: Option<&mut [u8]>,
    ) -> Result<Outcome> {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        if self.extended && !payload.is_empty() {
            flags |= CMD_FLAG_PAYLOAD_LEN;
        }
        let req = Request { flags, typ, cookie, offset, length };
        let mut h = Vec::with_capacity(EXTENDED_REQUEST_LEN);
        req.encode(self.extended, &mut h);
        let werr = io_err("sending a request");
        s.w.write_all(&h).map_err(&werr)?;
        s.w.write_all(payload).map_err(&werr)?;
        s.w.flush().map_err(&werr)?;
        let broken =
            |what: String| Error::new(ErrorKind::InvalidImage, format!("nbd: invalid reply from the server: {what}"));
        if let Some(buf) = read.as_deref_mut() {
            buf.fill(0);
        }
        let mut out = Outcome::default();
        let mut error: Option<Error> = None;
        let end = offset + length;
        loop {
            let mut m = [0u8; 4];
            s.r.read_exact(&mut m).map_err(io_err("reading a reply"))?;
            let hlen =
                ReplyHeader::len_for_magic(u32::from_be_bytes(m), self.extended).map_err(|e| broken(e.to_string()))?;
            let mut hb = [0u8; EXTENDED_REPLY_LEN];
            hb[..4].copy_from_slice(&m);
            s.r.read_exact(&mut hb[4..hlen]).map_err(io_err("reading a reply"))?;
            let rh = ReplyHeader::parse(&hb[..hlen], self.extended).map_err(|e| broken(e.to_string()))?;
            if rh.cookie != cookie {
                return Err(broken(format!("cookie {:#x} does not match the request's {cookie:#x}", rh.cookie)));
            }
            if rh.simple {
                if rh.error != 0 {
                    return Err(command_error(typ, rh.error, ""));
                }
                if let Some(buf) = read.as_deref_mut() {
                    if self.structured {
                        return Err(broken("a simple reply to a read with structured replies".into()));
                    }
                    s.r.read_exact(buf).map_err(io_err("reading data"))?;
                    out.covered = buf.len() as u64;
                }
                return Ok(out);
            }
            let limit = u64::from(MAX_PAYLOAD) + 4096;
            if rh.length > limit {
                return Err(broken(format!("chunk of {} bytes is over the limit {limit}", rh.length)));
            }
            match rh.typ {
                REPLY_TYPE_OFFSET_DATA => {
                    if rh.length < 8 {
                        return Err(broken("data chunk shorter than its offset".into()));
                    }
                    let mut o = [0u8; 8];
                    s.r.read_exact(&mut o).map_err(io_err("reading data"))?;
                    let off = u64::from_be_bytes(o);
                    let n = rh.length - 8;
                    let Some(buf) = read.as_deref_mut() else {
                        return Err(broken("data chunk in a reply to a command that reads nothing".into()));
                    };
                    if off < offset || off.checked_add(n).is_none_or(|e| e > end) {
                        return Err(broken(format!("data chunk [{off}, +{n}) outside the request [{offset}, {end})")));
                    }
                    let start = (off - offset) as usize;
                    s.r.read_exact(&mut buf[start..start + n as usize]).map_err(io_err("reading data"))?;
                    out.covered += n;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let mut p = [0u8; 12];
                    if rh.length != 12 {
                        return Err(broken(format!("hole chunk of {} bytes", rh.length)));
                    }
                    s.r.read_exact(&mut p).map_err(io_err("reading a reply"))?;
                    let off = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
                    let n = u64::from(u32::from_be_bytes(p[8..].try_into().unwrap_or_default()));
                    let Some(buf) = read.as_deref_mut() else {
                        return Err(broken("hole chunk in a reply to a command that reads nothing".into()));
                    };
                    if n == 0 || off < offset || off.checked_add(n).is_none_or(|e| e > end) {
                        return Err(broken(format!("hole chunk [{off}, +{n}) outside the request [{offset}, {end})")));
                    }
                    let start = (off - offset) as usize;
                    buf[start..start + n as usize].fill(0);
                    out.covered += n;
                }
                REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
                    let ext = rh.typ == REPLY_TYPE_BLOCK_STATUS_EXT;
                    if ext != self.extended || typ != CMD_BLOCK_STATUS {
                        return Err(broken("unexpected block status chunk".into()));
                    }
                    let mut p = vec![0u8; rh.length as usize];
                    s.r.read_exact(&mut p).map_err(io_err("reading a reply"))?;
                    let mut w = Wire::new(&p, "block status chunk");
                    let id = w.u32()?;
                    let mut descs = Vec::new();
                    if ext {
                        let n = w.u32()?;
                        if u64::from(n) * 16 != w.remaining() as u64 || n == 0 {
                            return Err(broken(format!("block status count {n} does not match its length")));
                        }
                        for _ in 0..n {
                            descs.push((w.u64()?, w.u64()?));
                        }
                    } else {
                        if w.remaining() == 0 || !w.remaining().is_multiple_of(8) {
                            return Err(broken("block status chunk of a bad length".into()));
                        }
                        while w.remaining() > 0 {
                            descs.push((u64::from(w.u32()?), u64::from(w.u32()?)));
                        }
                    }
                    if descs.iter().any(|d| d.0 == 0) {
                        return Err(broken("block status descriptor of length 0".into()));
                    }
                    out.status.push((id, descs));
                }
                REPLY_TYPE_NONE => {
                    if rh.length != 0 {
                        return Err(broken("a NONE chunk with a payload".into()));
                    }
                }
                t if t & (1 << 15) != 0 => {
                    let mut p = vec![0u8; rh.length as usize];
                    s.r.read_exact(&mut p).map_err(io_err("reading a reply"))?;
                    let mut w = Wire::new(&p, "error chunk");
                    let errno = w.u32()?;
                    let mlen = w.u16()?;
                    let msg = w.take(usize::from(mlen)).map(String::from_utf8_lossy).unwrap_or_default();
                    if errno == 0 {
                        return Err(broken("an error chunk with error 0".into()));
                    }
                    error.get_or_insert_with(|| command_error(typ, errno, &msg));
                }
                t => return Err(broken(format!("unknown chunk type {t}"))),
            }
            if rh.flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        if let Some(buf) = read {
            if out.covered != buf.len() as u64 {
                return Err(broken(format!("read reply covers {} of {} bytes", out.covered, buf.len())));
            }
        }
        Ok(out)
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
            self.request(CMD_READ, 0, off, n, &[], Some(chunk))?;
            pos += chunk.len();
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable("write")?;
        check_request(offset, buf.len() as u64, self.size)?;
        let mut pos = 0usize;
        for chunk in buf.chunks(self.max_block as usize) {
            self.request(CMD_WRITE, 0, offset + pos as u64, chunk.len() as u64, chunk, None)?;
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
            self.request(CMD_WRITE_ZEROES, flags, offset + pos, n, &[], None)?;
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
            self.request(CMD_TRIM, 0, offset + pos, n, &[], None)?;
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
        let out = self.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, len, &[], None)?;
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
        self.request(CMD_FLUSH, 0, 0, 0, &[], None).map(|_| ())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let s = self.stream.get_mut();
        if s.broken {
            return;
        }
        let req = Request { flags: 0, typ: CMD_DISC, cookie: 0, offset: 0, length: 0 };
        let mut h = Vec::new();
        req.encode(self.extended, &mut h);
        let _ = s.w.write_all(&h).and_then(|_| s.w.flush());
        s.w.get_ref().shutdown_conn();
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
