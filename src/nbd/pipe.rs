//! The client's side of transmission: many requests in flight on one
//! connection, replies matched to them by cookie.
//!
//! Any thread may send a request (the writer is a mutex). Replies are read
//! by whichever waiting thread claims the reader's place first (under the
//! state lock, so no waiter sleeps while nobody reads): it reads one
//! whole message, files it under its cookie, and wakes the others, so no
//! thread is dedicated to reading and replies may come in any order, as
//! NBD allows. Every message is checked against the request it answers:
//! the cookie must be in flight, chunks must lie inside the request and
//! under the payload limit, a read must be covered exactly. A message that
//! fails a check breaks the connection (every later request fails at once);
//! an error the server reports fails only its request.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use super::conn::Connection;
use super::proto::*;
use crate::error::{Error, ErrorKind, Result};

/// How the message of an error the server reported starts.
pub(crate) const SERVER_FAILED: &str = "nbd: the server failed";

/// An error a server reported for a command.
pub(crate) fn command_error(cmd: u16, errno: u32, msg: &str) -> Error {
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

fn broken(what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidImage, format!("nbd: invalid reply from the server: {what}"))
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(format!("nbd: {what}"), e)
}

/// What the replies to one request delivered.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Block status descriptors by context id.
    pub status: Vec<(u32, Vec<(u64, u64)>)>,
    /// Read data (reads only).
    pub data: Vec<u8>,
    /// Read bytes covered.
    covered: u64,
    /// The read ranges received so far, as disjoint runs `start -> end`
    /// (adjacent chunks merged): a chunk overlapping one is refused.
    received: std::collections::BTreeMap<u64, u64>,
}

/// Most disjoint runs one read reply may arrive in (a hostile server
/// cannot make the client keep one entry per byte).
const MAX_READ_RUNS: usize = 1 << 16;
/// Most block status chunks one request may receive (vdisk negotiates at
/// most two meta contexts; each sends one).
const MAX_STATUS_CHUNKS: usize = 8;

impl Outcome {
    /// Records read chunk `[start, end)`; refuses an overlap.
    fn receive(&mut self, start: u64, end: u64) -> Result<()> {
        let before = self.received.range(..=start).next_back().map(|(&s, &e)| (s, e));
        let after = self.received.range(start..).next().map(|(&s, &e)| (s, e));
        if before.is_some_and(|(_, e)| e > start) || after.is_some_and(|(s, _)| s < end) {
            return Err(broken(format!("read chunk [{start}, {end}) overlaps one already received")));
        }
        let (mut s, mut e) = (start, end);
        if let Some((bs, _)) = before.filter(|&(_, be)| be == start) {
            self.received.remove(&bs);
            s = bs;
        }
        if let Some((as_, ae)) = after.filter(|&(as_, _)| as_ == end) {
            self.received.remove(&as_);
            e = ae;
        }
        self.received.insert(s, e);
        if self.received.len() > MAX_READ_RUNS {
            return Err(broken(format!("read reply in more than {MAX_READ_RUNS} separate pieces")));
        }
        self.covered += end - start;
        Ok(())
    }
}

/// One request in flight.
#[derive(Debug)]
struct Pending {
    typ: u16,
    offset: u64,
    length: u64,
    out: Outcome,
    error: Option<Error>,
    done: bool,
}

#[derive(Debug, Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Why the connection is out of step, once it is.
    broken: Option<String>,
    /// A thread is reading a reply. Set and cleared under this lock, and
    /// the others told when it clears, so a waiter never sleeps while
    /// nobody reads.
    reading: bool,
}

/// One connection in transmission.
#[derive(Debug)]
pub(crate) struct Pipe {
    w: Mutex<BufWriter<Box<dyn Connection>>>,
    r: Mutex<BufReader<Box<dyn Connection>>>,
    st: Mutex<State>,
    cv: Condvar,
    cookie: AtomicU64,
    extended: bool,
    structured: bool,
}

impl Pipe {
    pub(crate) fn new(
        r: BufReader<Box<dyn Connection>>,
        w: BufWriter<Box<dyn Connection>>,
        structured: bool,
        extended: bool,
    ) -> Pipe {
        Pipe {
            w: Mutex::new(w),
            r: Mutex::new(r),
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            cookie: AtomicU64::new(1),
            extended,
            structured,
        }
    }

    fn check_broken(st: &State) -> Result<()> {
        match &st.broken {
            Some(why) => Err(Error::new(ErrorKind::Io, format!("nbd: the connection is broken: {why}"))),
            None => Ok(()),
        }
    }

    /// Sends one request and waits for its whole reply.
    pub(crate) fn request(
        &self,
        typ: u16,
        mut flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<Outcome> {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.st.lock();
            Self::check_broken(&st)?;
            let data = if typ == CMD_READ { vec![0u8; length as usize] } else { Vec::new() };
            let out = Outcome { data, ..Outcome::default() };
            st.pending.insert(cookie, Pending { typ, offset, length, out, error: None, done: false });
        }
        if self.extended && !payload.is_empty() {
            flags |= CMD_FLAG_PAYLOAD_LEN;
        }
        let mut h = Vec::with_capacity(EXTENDED_REQUEST_LEN);
        Request { flags, typ, cookie, offset, length }.encode(self.extended, &mut h);
        let sent = {
            let mut w = self.w.lock();
            w.write_all(&h).and_then(|_| w.write_all(payload)).and_then(|_| w.flush())
        };
        if let Err(e) = sent {
            let mut st = self.st.lock();
            st.pending.remove(&cookie);
            st.broken.get_or_insert_with(|| e.to_string());
            return Err(Error::io("nbd: sending a request", e));
        }
        loop {
            {
                let mut st = self.st.lock();
                if st.pending.get(&cookie).is_some_and(|p| p.done) {
                    let p = st.pending.remove(&cookie).ok_or_else(|| Error::internal("nbd: request vanished"))?;
                    return match p.error {
                        Some(e) => Err(e),
                        None => Ok(p.out),
                    };
                }
                if let Err(e) = Self::check_broken(&st) {
                    st.pending.remove(&cookie);
                    return Err(e);
                }
            }
            let mut st = self.st.lock();
            if st.pending.get(&cookie).is_some_and(|p| p.done) || st.broken.is_some() {
                continue;
            }
            if st.reading {
                self.cv.wait(&mut st);
                continue;
            }
            st.reading = true;
            drop(st);
            let res = self.read_one(&mut self.r.lock());
            let mut st = self.st.lock();
            st.reading = false;
            if let Err(e) = res {
                st.broken.get_or_insert_with(|| e.to_string());
                st.pending.remove(&cookie);
                drop(st);
                self.cv.notify_all();
                return Err(e);
            }
            drop(st);
            self.cv.notify_all();
        }
    }

    /// Reads one reply message (a simple reply or one chunk) and files it.
    fn read_one(&self, r: &mut BufReader<Box<dyn Connection>>) -> Result<()> {
        let mut m = [0u8; 4];
        r.read_exact(&mut m).map_err(io_err("reading a reply"))?;
        let hlen = ReplyHeader::len_for_magic(u32::from_be_bytes(m), self.extended).map_err(broken)?;
        let mut hb = [0u8; EXTENDED_REPLY_LEN];
        hb[..4].copy_from_slice(&m);
        r.read_exact(&mut hb[4..hlen]).map_err(io_err("reading a reply"))?;
        let rh = ReplyHeader::parse(&hb[..hlen], self.extended).map_err(broken)?;
        let (typ, offset, length) = {
            let st = self.st.lock();
            match st.pending.get(&rh.cookie) {
                Some(p) if !p.done => (p.typ, p.offset, p.length),
                _ => return Err(broken(format!("cookie {:#x} matches no request in flight", rh.cookie))),
            }
        };
        let end = offset + length;
        if rh.simple {
            let mut data = Vec::new();
            if rh.error == 0 && typ == CMD_READ {
                if self.structured {
                    return Err(broken("a simple reply to a read with structured replies"));
                }
                data = vec![0u8; length as usize];
                r.read_exact(&mut data).map_err(io_err("reading data"))?;
            }
            let mut st = self.st.lock();
            let p = st.pending.get_mut(&rh.cookie).ok_or_else(|| Error::internal("nbd: request vanished"))?;
            if rh.error != 0 {
                p.error = Some(command_error(typ, rh.error, ""));
            } else if typ == CMD_READ {
                p.out.data = data;
                p.out.covered = length;
            }
            p.done = true;
            return Ok(());
        }
        let limit = u64::from(MAX_PAYLOAD) + 4096;
        if rh.length > limit {
            return Err(broken(format!("chunk of {} bytes is over the limit {limit}", rh.length)));
        }
        let mut p = vec![0u8; rh.length as usize];
        r.read_exact(&mut p).map_err(io_err("reading a reply"))?;
        let mut w = Wire::new(&p, "reply chunk");
        let mut st = self.st.lock();
        let pend = st.pending.get_mut(&rh.cookie).ok_or_else(|| Error::internal("nbd: request vanished"))?;
        match rh.typ {
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                if typ != CMD_READ {
                    return Err(broken("data in a reply to a command that reads nothing"));
                }
                let off = w.u64()?;
                let n = if rh.typ == REPLY_TYPE_OFFSET_DATA {
                    w.remaining() as u64
                } else {
                    let n = u64::from(w.u32()?);
                    w.finish()?;
                    n
                };
                if n == 0 || off < offset || off.checked_add(n).is_none_or(|e| e > end) {
                    return Err(broken(format!("chunk [{off}, +{n}) outside the request [{offset}, {end})")));
                }
                let start = (off - offset) as usize;
                let dst = &mut pend.out.data[start..start + n as usize];
                if rh.typ == REPLY_TYPE_OFFSET_DATA {
                    dst.copy_from_slice(w.take(n as usize)?);
                } else {
                    dst.fill(0);
                }
                pend.out.receive(off, off + n)?;
            }
            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
                let ext = rh.typ == REPLY_TYPE_BLOCK_STATUS_EXT;
                if ext != self.extended || typ != CMD_BLOCK_STATUS {
                    return Err(broken("unexpected block status chunk"));
                }
                let id = w.u32()?;
                let mut descs = Vec::new();
                if ext {
                    let n = w.u32()?;
                    if n == 0 || u64::from(n) * 16 != w.remaining() as u64 {
                        return Err(broken(format!("block status count {n} does not match its length")));
                    }
                    for _ in 0..n {
                        descs.push((w.u64()?, w.u64()?));
                    }
                } else {
                    if w.remaining() == 0 || !w.remaining().is_multiple_of(8) {
                        return Err(broken("block status chunk of a bad length"));
                    }
                    while w.remaining() > 0 {
                        descs.push((u64::from(w.u32()?), u64::from(w.u32()?)));
                    }
                }
                if descs.iter().any(|d| d.0 == 0) {
                    return Err(broken("block status descriptor of length 0"));
                }
                if pend.out.status.len() >= MAX_STATUS_CHUNKS || pend.out.status.iter().any(|(i, _)| *i == id) {
                    return Err(broken(format!("a second or surplus block status chunk for context {id}")));
                }
                pend.out.status.push((id, descs));
            }
            REPLY_TYPE_NONE => {
                if rh.length != 0 {
                    return Err(broken("a NONE chunk with a payload"));
                }
            }
            t if t & (1 << 15) != 0 => {
                let errno = w.u32()?;
                let mlen = w.u16()?;
                let msg = String::from_utf8_lossy(w.take(usize::from(mlen))?).into_owned();
                if errno == 0 {
                    return Err(broken("an error chunk with error 0"));
                }
                pend.error.get_or_insert_with(|| command_error(typ, errno, &msg));
            }
            t => return Err(broken(format!("unknown chunk type {t}"))),
        }
        if rh.flags & REPLY_FLAG_DONE != 0 {
            if pend.error.is_none() && typ == CMD_READ && pend.out.covered != length {
                return Err(broken(format!("read reply covers {} of {length} bytes", pend.out.covered)));
            }
            pend.done = true;
        }
        Ok(())
    }

    /// Sends `NBD_CMD_DISC` and shuts the socket down (best effort).
    pub(crate) fn disconnect(&self) {
        if self.st.lock().broken.is_some() {
            return;
        }
        let mut h = Vec::new();
        Request { flags: 0, typ: CMD_DISC, cookie: 0, offset: 0, length: 0 }.encode(self.extended, &mut h);
        let mut w = self.w.lock();
        let _ = w.write_all(&h).and_then(|_| w.flush());
        w.get_ref().shutdown_conn();
    }
}
