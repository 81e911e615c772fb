//! The server's transmission phase: one reader thread per connection
//! parses requests and hands them to a few workers, which run them on the
//! device and send the replies (out of order, as NBD allows).
//!
//! Memory per connection is bounded by [`ServerOptions::inflight_bytes`]:
//! the reader takes the bytes a request will hold (write payload, read
//! reply) from a budget before reading its payload, and waits while the
//! budget is spent, so a client that floods requests is slowed, not fed.
//! Flushes are global to the device, and a reply is sent only after the
//! device call returned, so `NBD_CMD_FLUSH` on any connection covers every
//! write any connection has seen acknowledged (`NBD_FLAG_CAN_MULTI_CONN`).
//!
//! [`ServerOptions::inflight_bytes`]: super::ServerOptions::inflight_bytes

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::conn::Connection;
use super::handshake::{Context, Session};
use super::proto::*;
use super::server::{DetectZeroes, Server};
use crate::device::{BlockDevice, Extent, ExtentKind, ZeroMode};
use crate::error::{Error, Result};

/// Bytes of request and reply data a connection may hold.
#[derive(Debug)]
struct Budget {
    avail: Mutex<usize>,
    cv: Condvar,
    total: usize,
}

impl Budget {
    fn acquire(&self, want: usize) -> usize {
        let n = want.min(self.total);
        let mut a = self.avail.lock();
        while *a < n {
            self.cv.wait(&mut a);
        }
        *a -= n;
        n
    }

    fn release(&self, n: usize) {
        *self.avail.lock() += n;
        self.cv.notify_all();
    }
}

/// What the workers of one connection share.
struct Ctx {
    dev: Arc<dyn BlockDevice>,
    session: Session,
    out: Mutex<BufWriter<Box<dyn Connection>>>,
    dead: AtomicBool,
    budget: Budget,
    /// The raw socket, to wake the reader when a reply cannot be sent.
    sock: Box<dyn Connection>,
}

/// One queued request with its payload and the budget it holds.
struct Job {
    req: Request,
    payload: Vec<u8>,
    held: usize,
}

/// Runs transmission until the client disconnects or breaks the protocol.
pub(crate) fn run(server: &Server, conn: Box<dyn Connection>, session: Session) -> Result<()> {
    let io = |e| Error::io("nbd: socket", e);
    let wconn = conn.try_clone_conn().map_err(io)?;
    let sock = conn.try_clone_conn().map_err(io)?;
    let total = server.opts.inflight_bytes.max(MAX_PAYLOAD as usize + 4096);
    let ctx = Ctx {
        dev: session.export.device.clone(),
        session,
        out: Mutex::new(BufWriter::with_capacity(256 << 10, wconn)),
        dead: AtomicBool::new(false),
        budget: Budget { avail: Mutex::new(total), cv: Condvar::new(), total },
        sock,
    };
    let workers = server.opts.workers.max(1);
    let (tx, rx) = mpsc::sync_channel::<Job>(workers);
    let rx = Mutex::new(rx);
    let result = std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let job = match rx.lock().recv() {
                    Ok(j) => j,
                    Err(_) => return,
                };
                let held = job.held;
                if !ctx.dead.load(Ordering::SeqCst) {
                    // A panic in the device (a bug, or a hostile image) ends
                    // this connection, not the server and its other clients.
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(&ctx, job.req, job.payload)));
                    if !matches!(r, Ok(Ok(_))) {
                        ctx.dead.store(true, Ordering::SeqCst);
                        ctx.sock.shutdown_conn();
                    }
                }
                ctx.budget.release(held);
            });
        }
        let r = read_loop(&ctx, conn, &tx);
        drop(tx);
        r
    });
    let _ = ctx.out.lock().flush();
    ctx.sock.shutdown_conn();
    result
}

/// Reads requests until `NBD_CMD_DISC`, end of stream or a protocol error.
fn read_loop(ctx: &Ctx, conn: Box<dyn Connection>, tx: &mpsc::SyncSender<Job>) -> Result<()> {
    let ext = ctx.session.extended;
    let hlen = if ext { EXTENDED_REQUEST_LEN } else { REQUEST_LEN };
    let mut r = BufReader::with_capacity(64 << 10, conn);
    let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
    loop {
        // End of stream before a header: the client hung up (a hard
        // disconnect); everything it saw acknowledged has been done.
        let mut got = 0;
        while got < hlen {
            match r.read(&mut hdr[got..hlen]) {
                Ok(0) if got == 0 || ctx.dead.load(Ordering::SeqCst) => return Ok(()),
                Ok(0) => return Err(Error::invalid_argument("nbd: client disconnected in the middle of a request")),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) if ctx.dead.load(Ordering::SeqCst) => return Ok(()),
                Err(e) => return Err(Error::io("nbd: reading a request", e)),
            }
        }
        let req = Request::parse(&hdr[..hlen], ext)?;
        let plen = req.payload_len(ext);
        if plen > u64::from(MAX_PAYLOAD) {
            return Err(ProtoError::TooLong {
                field: "request payload length",
                value: plen,
                limit: u64::from(MAX_PAYLOAD),
            }
            .into());
        }
        if req.typ == CMD_DISC {
            return Ok(());
        }
        let reply_bytes = if req.typ == CMD_READ { req.length.min(u64::from(MAX_PAYLOAD)) } else { 0 };
        let held = ctx.budget.acquire((plen + reply_bytes) as usize + 256);
        let mut payload = vec![0u8; plen as usize];
        if let Err(e) = r.read_exact(&mut payload) {
            ctx.budget.release(held);
            return Err(Error::io(format!("nbd: reading the {} payload of a request", plen), e));
        }
        if tx.send(Job { req, payload, held }).is_err() {
            return Ok(());
        }
    }
}

/// The reply side of one request.
struct Reply<'a> {
    ctx: &'a Ctx,
    cookie: u64,
    offset: u64,
}

impl Reply<'_> {
    fn structured(&self) -> bool {
        self.ctx.session.structured || self.ctx.session.extended
    }

    fn send(&self, parts: &[&[u8]]) -> std::io::Result<()> {
        let mut out = self.ctx.out.lock();
        for p in parts {
            out.write_all(p)?;
        }
        out.flush()
    }

    fn chunk(&self, flags: u16, typ: u16, payload: &[&[u8]]) -> std::io::Result<()> {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        let mut h = Vec::with_capacity(EXTENDED_REPLY_LEN);
        chunk_header(self.ctx.session.extended, flags, typ, self.cookie, self.offset, len as u64, &mut h);
        let mut parts: Vec<&[u8]> = vec![&h];
        parts.extend_from_slice(payload);
        self.send(&parts)
    }

    fn ok(&self) -> std::io::Result<()> {
        if self.ctx.session.extended {
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])
        } else {
            let mut b = Vec::with_capacity(SIMPLE_REPLY_LEN);
            simple_reply(0, self.cookie, &mut b);
            self.send(&[&b])
        }
    }

    fn error(&self, errno: u32, msg: &str) -> std::io::Result<()> {
        if self.structured() {
            let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING as usize)];
            let mut p = Vec::with_capacity(6 + msg.len());
            p.extend_from_slice(&errno.to_be_bytes());
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg);
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &[&p])
        } else {
            let mut b = Vec::with_capacity(SIMPLE_REPLY_LEN);
            simple_reply(errno, self.cookie, &mut b);
            self.send(&[&b])
        }
    }

    fn result(&self, r: Result<()>, writing: bool) -> std::io::Result<()> {
        match r {
            Ok(()) => self.ok(),
            Err(e) => self.error(errno_for(&e, writing), &e.to_string()),
        }
    }
}

/// The command flags each command accepts.
fn allowed_flags(typ: u16, structured: bool, extended: bool) -> u16 {
    let payload = if extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
    match typ {
        CMD_READ if structured => CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA | payload,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE | payload,
        _ => 0,
    }
}

/// Runs one request and sends its reply; an `Err` means the reply could
/// not be sent (the connection is gone).
fn handle(ctx: &Ctx, req: Request, payload: Vec<u8>) -> std::io::Result<()> {
    let rep = Reply { ctx, cookie: req.cookie, offset: req.offset };
    let s = &ctx.session;
    let structured = s.structured || s.extended;
    let dev = &*ctx.dev;
    let size = dev.size();
    let name = command_name(req.typ);
    let bad = req.flags & !allowed_flags(req.typ, structured, s.extended);
    if bad != 0 {
        return rep.error(EINVAL, &format!("{name}: flags {bad:#x} are not valid here"));
    }
    let in_bounds = req.offset.checked_add(req.length).is_some_and(|e| e <= size);
    let writes = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.export.read_only {
        return rep.error(EPERM, &format!("{name}: the export is read-only"));
    }
    let fua = |r: Result<()>| -> Result<()> {
        r?;
        if req.flags & CMD_FLAG_FUA != 0 {
            dev.flush()?;
        }
        Ok(())
    };
    match req.typ {
        CMD_READ => {
            if req.length > u64::from(MAX_PAYLOAD) {
                let e = if structured { EOVERFLOW } else { EINVAL };
                return rep.error(e, &format!("read of {} bytes is over the maximum {MAX_PAYLOAD}", req.length));
            }
            if !in_bounds {
                return rep.error(EINVAL, &format!("read of {} at {} is past the end {size}", req.length, req.offset));
            }
            read(&rep, dev, req)
        }
        CMD_WRITE => {
            if !in_bounds {
                return rep.error(ENOSPC, &format!("write of {} at {} is past the end {size}", req.length, req.offset));
            }
            let zero = s.export.detect_zeroes != DetectZeroes::Off && payload.iter().all(|&b| b == 0);
            let r = if zero {
                let mode = if s.export.detect_zeroes == DetectZeroes::Unmap && s.export.discard {
                    ZeroMode::MayUnmap
                } else {
                    ZeroMode::Allocate
                };
                dev.write_zeroes(req.offset, req.length, mode)
            } else {
                dev.write_at(&payload, req.offset)
            };
            rep.result(fua(r), true)
        }
        CMD_FLUSH => rep.result(dev.flush(), true),
        CMD_TRIM => {
            if !in_bounds {
                return rep.error(EINVAL, &format!("trim of {} at {} is past the end {size}", req.length, req.offset));
            }
            let r = if s.export.discard {
                match dev.discard(req.offset, req.length) {
                    Err(e) if e.kind() == crate::ErrorKind::Unsupported => Ok(()),
                    r => r,
                }
            } else {
                Ok(())
            };
            rep.result(fua(r), true)
        }
        CMD_WRITE_ZEROES => {
            if !in_bounds {
                return rep.error(
                    ENOSPC,
                    &format!("write-zeroes of {} at {} is past the end {size}", req.length, req.offset),
                );
            }
            let unmap = req.flags & CMD_FLAG_NO_HOLE == 0 && s.export.discard;
            let mode = if unmap { ZeroMode::MayUnmap } else { ZeroMode::Allocate };
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && !fast_zero(dev, mode) {
                return rep.error(ENOTSUP, "write-zeroes: zeroing this export is not fast");
            }
            rep.result(fua(dev.write_zeroes(req.offset, req.length, mode)), true)
        }
        CMD_CACHE => {
            if !in_bounds {
                return rep.error(EINVAL, &format!("cache of {} at {} is past the end {size}", req.length, req.offset));
            }
            rep.ok()
        }
        CMD_BLOCK_STATUS => block_status(&rep, dev, req, &payload),
        other => rep.error(EINVAL, &format!("unknown command {other}")),
    }
}

/// Whether `write_zeroes` in `mode` is cheap on `dev` (no data written).
fn fast_zero(dev: &dyn BlockDevice, mode: ZeroMode) -> bool {
    use crate::Format;
    match dev.info().format {
        // Raw allocating zeroes write the zeros; unmapping ones punch holes.
        Format::Raw => mode == ZeroMode::MayUnmap,
        Format::Qcow2 => true,
        // They write zeros into allocated blocks (VHDX punches whole ones
        // only): not fast in general.
        Format::Vmdk | Format::Vpc | Format::Vdi | Format::Vhdx | Format::Luks => false,
    }
}

/// Holes shorter than this are sent as data (fewer, larger chunks).
const MIN_HOLE: u64 = 4096;
/// Most `map` calls one read or block status request makes.
const MAX_MAP_CALLS: usize = 1 << 16;

/// `[offset, offset + len)` as runs of (length, reads as zeros).
fn runs(dev: &dyn BlockDevice, offset: u64, len: u64) -> Vec<(u64, bool)> {
    let mut out: Vec<(u64, bool)> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    let mut calls = 0;
    while pos < end {
        let (n, hole) = match dev.map(pos, end - pos) {
            Ok(e) if e.length > 0 && calls < MAX_MAP_CALLS => (e.length.min(end - pos), e.reads_as_zero()),
            _ => (end - pos, false),
        };
        calls += 1;
        match out.last_mut() {
            Some(l) if l.1 == hole => l.0 += n,
            _ => out.push((n, hole)),
        }
        pos += n;
    }
    // Short holes become data, merged with their neighbours.
    let mut merged: Vec<(u64, bool)> = Vec::new();
    for (n, hole) in out {
        let hole = hole && n >= MIN_HOLE;
        match merged.last_mut() {
            Some(l) if l.1 == hole => l.0 += n,
            _ => merged.push((n, hole)),
        }
    }
    merged
}

fn read(rep: &Reply<'_>, dev: &dyn BlockDevice, req: Request) -> std::io::Result<()> {
    let len = req.length as usize;
    if !rep.structured() {
        let mut buf = vec![0u8; len];
        return match dev.read_at(&mut buf, req.offset) {
            Ok(()) => {
                let mut h = Vec::with_capacity(SIMPLE_REPLY_LEN);
                simple_reply(0, rep.cookie, &mut h);
                rep.send(&[&h, &buf])
            }
            Err(e) => rep.error(errno_for(&e, false), &e.to_string()),
        };
    }
    if len == 0 {
        return rep.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
    }
    let segs = if req.flags & CMD_FLAG_DF != 0 { vec![(req.length, false)] } else { runs(dev, req.offset, req.length) };
    let mut pos = req.offset;
    let last = segs.len() - 1;
    for (i, (n, hole)) in segs.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if hole {
            let mut p = Vec::with_capacity(12);
            p.extend_from_slice(&pos.to_be_bytes());
            // A read is at most MAX_PAYLOAD, so a hole fits 32 bits.
            p.extend_from_slice(&(n as u32).to_be_bytes());
            rep.chunk(flags, REPLY_TYPE_OFFSET_HOLE, &[&p])?;
        } else {
            let mut buf = vec![0u8; n as usize];
            if let Err(e) = dev.read_at(&mut buf, pos) {
                let msg = e.to_string();
                let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING as usize)];
                let mut p = Vec::new();
                p.extend_from_slice(&errno_for(&e, false).to_be_bytes());
                p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                p.extend_from_slice(msg);
                p.extend_from_slice(&pos.to_be_bytes());
                return rep.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, &[&p]);
            }
            rep.chunk(flags, REPLY_TYPE_OFFSET_DATA, &[&pos.to_be_bytes(), &buf])?;
        }
        pos += n;
    }
    Ok(())
}

/// The `base:allocation` status of an extent.
pub(crate) fn allocation_status(e: &Extent) -> u32 {
    let data = matches!(e.kind, ExtentKind::Data { .. } | ExtentKind::Compressed { .. });
    (if data { 0 } else { STATE_HOLE }) | (if e.reads_as_zero() { STATE_ZERO } else { 0 })
}

/// The `qemu:allocation-depth` status: 0 unallocated, 1 this image, 2 its
/// backing file, ...
fn depth_status(e: &Extent) -> u32 {
    match e.kind {
        ExtentKind::Unallocated => 0,
        _ => e.depth.saturating_add(1),
    }
}

/// Descriptors (length, status) for one context over `[offset, end)`.
fn descriptors(ctx: &Context, rep: &Reply<'_>, offset: u64, end: u64, one: bool) -> Result<Vec<(u64, u64)>> {
    let dev = &*rep.ctx.dev;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = offset;
    let mut calls = 0;
    while pos < end && calls < MAX_MAP_CALLS {
        calls += 1;
        let (n, status) = match ctx {
            Context::BaseAllocation => {
                let e = dev.map(pos, end - pos)?;
                (e.length, u64::from(allocation_status(&e)))
            }
            Context::AllocationDepth => {
                let e = dev.map(pos, end - pos)?;
                (e.length, u64::from(depth_status(&e)))
            }
            Context::DirtyBitmap(name) => match rep.ctx.session.export.bitmaps.get(name) {
                Some(b) => {
                    let (n, dirty) = b.status(pos, end - pos)?;
                    (n, if dirty { u64::from(STATE_DIRTY) } else { 0 })
                }
                None => (end - pos, 0),
            },
        };
        if n == 0 {
            return Err(Error::internal(format!("map returned an empty extent at {pos}")));
        }
        let n = n.min(end - pos);
        match out.last_mut() {
            Some(l) if l.1 == status => l.0 += n,
            _ => {
                if one && !out.is_empty() {
                    break;
                }
                if out.len() >= MAX_DESCRIPTORS {
                    break;
                }
                out.push((n, status))
            }
        }
        pos += n;
    }
    Ok(out)
}

fn block_status(rep: &Reply<'_>, dev: &dyn BlockDevice, req: Request, payload: &[u8]) -> std::io::Result<()> {
    let s = &rep.ctx.session;
    if !(s.structured || s.extended) || s.contexts.is_empty() {
        return rep.error(EINVAL, "block-status: no meta context was selected");
    }
    let (length, ids): (u64, Vec<u32>) = if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        let mut w = Wire::new(payload, "block status payload");
        let parsed = (|| -> std::result::Result<(u64, Vec<u32>), ProtoError> {
            let len = w.u64()?;
            if w.remaining() == 0 || !w.remaining().is_multiple_of(4) {
                return Err(ProtoError::BadField { field: "block status payload length", value: payload.len() as u64 });
            }
            let mut ids = Vec::new();
            while w.remaining() > 0 {
                ids.push(w.u32()?);
            }
            Ok((len, ids))
        })();
        match parsed {
            Ok((len, ids)) => {
                let mut seen = std::collections::HashSet::new();
                if ids.iter().any(|id| !seen.insert(*id) || !s.contexts.iter().any(|(c, _)| c == id)) {
                    return rep.error(EINVAL, "block-status: unknown or repeated context id in the payload");
                }
                (len, ids)
            }
            Err(e) => return rep.error(EINVAL, &format!("block-status: {e}")),
        }
    } else {
        (req.length, s.contexts.iter().map(|(id, _)| *id).collect())
    };
    let size = dev.size();
    if req.offset >= size || length == 0 {
        return rep
            .error(EINVAL, &format!("block-status of {length} at {} is outside the export of {size}", req.offset));
    }
    let end = req.offset + length.min(size - req.offset);
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut chunks = Vec::new();
    for id in &ids {
        let Some((_, ctx)) = s.contexts.iter().find(|(c, _)| c == id) else { continue };
        match descriptors(ctx, rep, req.offset, end, one) {
            Ok(d) => chunks.push((*id, d)),
            Err(e) => return rep.error(errno_for(&e, false), &e.to_string()),
        }
    }
    let last = chunks.len().saturating_sub(1);
    for (i, (id, descs)) in chunks.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let mut p = Vec::with_capacity(8 + descs.len() * 16);
        p.extend_from_slice(&id.to_be_bytes());
        if s.extended {
            p.extend_from_slice(&(descs.len() as u32).to_be_bytes());
            for (n, st) in descs {
                p.extend_from_slice(&n.to_be_bytes());
                p.extend_from_slice(&st.to_be_bytes());
            }
            rep.chunk(flags, REPLY_TYPE_BLOCK_STATUS_EXT, &[&p])?;
        } else {
            for (n, st) in descs {
                // Compact requests have 32-bit lengths, so every
                // descriptor (inside the request) fits.
                p.extend_from_slice(&(n.min(u64::from(u32::MAX)) as u32).to_be_bytes());
                p.extend_from_slice(&(st as u32).to_be_bytes());
            }
            rep.chunk(flags, REPLY_TYPE_BLOCK_STATUS, &[&p])?;
        }
    }
    Ok(())
}
