//! The server side of the fixed newstyle handshake: greeting, options,
//! meta context selection, and the export the client goes on with.

use std::sync::Arc;
use std::time::Instant;

use super::conn::Connection;
use super::proto::*;
use super::server::{Export, Server};
use crate::error::{Error, Result};

/// A meta context the client selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Context {
    /// `base:allocation`.
    BaseAllocation,
    /// `qemu:allocation-depth`.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`.
    DirtyBitmap(String),
}

impl Context {
    fn name(&self) -> String {
        match self {
            Context::BaseAllocation => CONTEXT_BASE_ALLOCATION.into(),
            Context::AllocationDepth => CONTEXT_ALLOCATION_DEPTH.into(),
            Context::DirtyBitmap(n) => format!("{CONTEXT_DIRTY_BITMAP}{n}"),
        }
    }
}

/// What the handshake agreed.
#[derive(Debug)]
pub(crate) struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    pub extended: bool,
    /// Selected contexts by id.
    pub contexts: Vec<(u32, Context)>,
}

/// The transmission flags of `e` for a client that negotiated `structured`
/// / `extended`.
pub(crate) fn transmission_flags(e: &Export, structured: bool, extended: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
    if e.read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if structured || extended {
        f |= TF_SEND_DF;
    }
    if extended {
        f |= TF_BLOCK_STATUS_PAYLOAD;
    }
    f
}

/// The handshake's connection: every read and write gets what is left of
/// the handshake's deadline as its socket timeout, so a client trickling
/// one byte at a time cannot stretch the handshake past it (a timeout set
/// once per option would be per system call).
#[derive(Debug)]
struct Timed {
    inner: Box<dyn Connection>,
    deadline: Instant,
}

impl Timed {
    fn left(&self) -> std::io::Result<std::time::Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the handshake deadline passed"));
        }
        Ok(left)
    }
}

impl std::io::Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.inner.set_read_timeout_conn(Some(left))?;
        self.inner.read(buf)
    }
}

impl std::io::Write for Timed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.inner.set_write_timeout_conn(Some(left))?;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Connection for Timed {
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Connection>> {
        self.inner.try_clone_conn()
    }
    fn set_read_timeout_conn(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.inner.set_read_timeout_conn(t)
    }
    fn set_write_timeout_conn(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.inner.set_write_timeout_conn(t)
    }
    fn shutdown_conn(&self) {
        self.inner.shutdown_conn()
    }
    fn peer(&self) -> String {
        self.inner.peer()
    }
}

/// Reads exactly `buf`, mapping a timeout to a clear error.
fn read_exact(c: &mut dyn Connection, buf: &mut [u8], what: &str) -> Result<()> {
    c.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            Error::io(format!("nbd handshake: timed out waiting for {what}"), e)
        }
        _ => Error::io(format!("nbd handshake: reading {what}"), e),
    })
}

fn send(c: &mut dyn Connection, bytes: &[u8]) -> Result<()> {
    c.write_all(bytes).and_then(|_| c.flush()).map_err(|e| Error::io("nbd handshake: writing", e))
}

fn reply(c: &mut dyn Connection, opt: u32, typ: u32, data: &[u8]) -> Result<()> {
    send(c, &option_reply(opt, typ, data))
}

/// An error reply with a message for humans.
fn reply_err(c: &mut dyn Connection, opt: u32, typ: u32, msg: &str) -> Result<()> {
    reply(c, opt, typ, msg.as_bytes())
}

/// The contexts of `e` a query names: exact names for `SET`, and for
/// `LIST` also namespace prefixes (`base:`, `qemu:`,
/// `qemu:dirty-bitmap:`).
fn matching(e: &Export, query: &str, list: bool) -> Vec<Context> {
    let mut all = vec![Context::BaseAllocation];
    if e.allocation_depth {
        all.push(Context::AllocationDepth);
    }
    for name in e.bitmaps.keys() {
        all.push(Context::DirtyBitmap(name.clone()));
    }
    let exact: Vec<Context> = all.iter().filter(|c| c.name() == query).cloned().collect();
    if !list || !exact.is_empty() {
        return exact;
    }
    match query {
        "base:" | "qemu:" | "qemu:dirty-bitmap:" => all.into_iter().filter(|c| c.name().starts_with(query)).collect(),
        _ => Vec::new(),
    }
}

/// Runs the handshake. `Ok(None)`: the client aborted (or went away
/// politely); `Ok(Some)`: enter transmission.
pub(crate) fn negotiate(server: &Server, conn: &dyn Connection) -> Result<Option<Session>> {
    let deadline = Instant::now() + server.opts.handshake_timeout;
    let inner = conn.try_clone_conn().map_err(|e| Error::io("nbd: socket", e))?;
    let mut c = Timed { inner, deadline };
    let c: &mut dyn Connection = &mut c;
    let arm = |c: &dyn Connection| -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(crate::ErrorKind::Io, "nbd handshake: timed out"));
        }
        c.set_read_timeout_conn(Some(left)).map_err(|e| Error::io("nbd: socket", e))?;
        c.set_write_timeout_conn(Some(left)).map_err(|e| Error::io("nbd: socket", e))
    };
    arm(c)?;
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(c, &greet)?;
    let mut b4 = [0u8; 4];
    read_exact(c, &mut b4, "client flags")?;
    let cflags = u32::from_be_bytes(b4);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::invalid_argument(format!("nbd handshake: unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;

    let mut structured = false;
    let mut extended = false;
    let mut contexts: Vec<(u32, Context)> = Vec::new();
    let mut contexts_export: Option<String> = None;
    let mut next_id: u32 = 1;
    for _ in 0..MAX_OPTIONS {
        arm(c)?;
        let mut hdr = [0u8; 16];
        read_exact(c, &mut hdr, "an option")?;
        let mut w = Wire::new(&hdr, "option header");
        let magic = w.u64()?;
        let opt = w.u32()?;
        let len = w.u32()?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic { what: "option", got: magic }.into());
        }
        if len > MAX_OPTION_LEN {
            // The data cannot be skipped at a sane cost: hang up.
            return Err(ProtoError::TooLong {
                field: "option length",
                value: u64::from(len),
                limit: u64::from(MAX_OPTION_LEN),
            }
            .into());
        }
        let mut data = vec![0u8; len as usize];
        read_exact(c, &mut data, "option data")?;
        match opt {
            OPT_ABORT => {
                let _ = reply(c, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_EXPORT_NAME => {
                if extended {
                    // proto.md: EXPORT_NAME is not allowed after extended headers.
                    return Err(Error::invalid_argument("nbd handshake: NBD_OPT_EXPORT_NAME after extended headers"));
                }
                let name = match std::str::from_utf8(&data) {
                    Ok(s) if s.len() <= MAX_STRING as usize => s.to_string(),
                    _ => return Err(Error::invalid_argument("nbd handshake: export name is not a valid string")),
                };
                let Some(export) = server.find(&name) else {
                    return Err(Error::new(
                        crate::ErrorKind::NotFound,
                        format!("nbd handshake: no export named '{}'", name.escape_debug()),
                    ));
                };
                if contexts_export.as_deref() != Some(name.as_str()) {
                    contexts.clear();
                }
                let flags = transmission_flags(&export, structured, extended);
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&export.device.size().to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(c, &out)?;
                return Ok(Some(Session { export, structured, extended, contexts }));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(c, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in &server.exports {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    reply(c, opt, REP_SERVER, &d)?;
                }
                reply(c, opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS => reply_err(c, opt, REP_ERR_POLICY, "TLS is not supported by this server")?,
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(c, opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else if extended {
                    reply_err(c, opt, REP_ERR_EXT_HEADER_REQD, "extended headers are already in use")?;
                } else if structured {
                    reply_err(c, opt, REP_ERR_INVALID, "structured replies are already in use")?;
                } else {
                    structured = true;
                    reply(c, opt, REP_ACK, &[])?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !server.opts.extended_headers {
                    reply_err(c, opt, REP_ERR_UNSUP, "extended headers are turned off")?;
                } else if !data.is_empty() {
                    reply_err(c, opt, REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")?;
                } else if extended {
                    reply_err(c, opt, REP_ERR_INVALID, "extended headers are already in use")?;
                } else {
                    extended = true;
                    reply(c, opt, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| -> std::result::Result<(String, Vec<u16>), ProtoError> {
                    let mut w = Wire::new(&data, "NBD_OPT_GO");
                    let name = w.lstring("export name")?;
                    let n = w.u16()?;
                    let mut reqs = Vec::new();
                    for _ in 0..n {
                        reqs.push(w.u16()?);
                    }
                    w.finish()?;
                    Ok((name, reqs))
                })();
                let (name, reqs) = match parsed {
                    Ok(p) => p,
                    Err(e) => {
                        reply_err(c, opt, REP_ERR_INVALID, &e.to_string())?;
                        continue;
                    }
                };
                let Some(export) = server.find(&name) else {
                    reply_err(c, opt, REP_ERR_UNKNOWN, &format!("no export named '{}'", name.escape_debug()))?;
                    continue;
                };
                let flags = transmission_flags(&export, structured, extended);
                let mut d = Vec::new();
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&export.device.size().to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
                reply(c, opt, REP_INFO, &d)?;
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    reply(c, opt, REP_INFO, &d)?;
                }
                if reqs.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description.as_bytes());
                    reply(c, opt, REP_INFO, &d)?;
                }
                // Block size constraints go out whether asked or not: the
                // minimum is 1, so a client that ignores them breaks nothing.
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&export.preferred_block.to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                reply(c, opt, REP_INFO, &d)?;
                reply(c, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    if contexts_export.as_deref() != Some(name.as_str()) {
                        contexts.clear();
                    }
                    return Ok(Some(Session { export, structured, extended, contexts }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if !structured && !extended {
                    reply_err(c, opt, REP_ERR_INVALID, "meta contexts need structured replies first")?;
                    continue;
                }
                let parsed = (|| -> std::result::Result<(String, Vec<String>), ProtoError> {
                    let mut w = Wire::new(&data, "meta context option");
                    let name = w.lstring("export name")?;
                    let n = w.u32()?;
                    if n > MAX_META_QUERIES {
                        return Err(ProtoError::TooLong {
                            field: "number of queries",
                            value: u64::from(n),
                            limit: u64::from(MAX_META_QUERIES),
                        });
                    }
                    let mut qs = Vec::new();
                    for _ in 0..n {
                        qs.push(w.lstring("context query")?);
                    }
                    w.finish()?;
                    Ok((name, qs))
                })();
                let (name, queries) = match parsed {
                    Ok(p) => p,
                    Err(e) => {
                        reply_err(c, opt, REP_ERR_INVALID, &e.to_string())?;
                        continue;
                    }
                };
                let Some(export) = server.find(&name) else {
                    reply_err(c, opt, REP_ERR_UNKNOWN, &format!("no export named '{}'", name.escape_debug()))?;
                    continue;
                };
                let mut found: Vec<Context> = Vec::new();
                if queries.is_empty() && !set {
                    found = matching(&export, "base:", true);
                    found.extend(matching(&export, "qemu:", true));
                } else {
                    for q in &queries {
                        for ctx in matching(&export, q, !set) {
                            if !found.contains(&ctx) {
                                found.push(ctx);
                            }
                        }
                    }
                }
                if set {
                    contexts.clear();
                    contexts_export = Some(name);
                }
                for ctx in found {
                    let id = if set {
                        let id = next_id;
                        next_id = next_id.wrapping_add(1).max(1);
                        contexts.push((id, ctx.clone()));
                        id
                    } else {
                        0
                    };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(ctx.name().as_bytes());
                    reply(c, opt, REP_META_CONTEXT, &d)?;
                }
                reply(c, opt, REP_ACK, &[])?;
            }
            _ => reply_err(c, opt, REP_ERR_UNSUP, &format!("option {opt} is not supported"))?,
        }
    }
    let _ = reply_err(c, 0, REP_ERR_POLICY, "too many options");
    Err(Error::limit(format!("nbd handshake: more than {MAX_OPTIONS} options")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStorage, Raw};

    #[test]
    fn context_queries() {
        let dev = Arc::new(Raw::create(Arc::new(MemStorage::new()), 4096).unwrap());
        let e = Export::new("", dev).allocation_depth(true);
        assert_eq!(matching(&e, "base:allocation", false), vec![Context::BaseAllocation]);
        assert!(matching(&e, "base:", false).is_empty(), "SET takes exact names only");
        assert_eq!(matching(&e, "qemu:", true), vec![Context::AllocationDepth]);
        assert!(matching(&e, "qemu:dirty-bitmap:x", false).is_empty());
        assert!(matching(&e, "other:thing", true).is_empty());
    }
}
