//! The NBD wire format: magics, option / command / reply numbers, and the
//! fixed-layout messages both sides exchange.
//!
//! Numbers and layouts follow `doc/proto.md` of the NBD project, including
//! the `EXTENDED_HEADERS` extension (64-bit requests and replies). Every
//! parser here works on a bounded byte slice and returns a [`ProtoError`]
//! naming the field and value that was wrong; nothing allocates from a
//! length a peer sent before the length is checked against a limit below.

use std::fmt;

/// `NBDMAGIC`: the first 8 bytes a newstyle server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the second greeting word, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (64-bit) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the other flags are meaningful.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see one consistent export
/// (a flush on any covers writes completed on all).
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;
/// Transmission flag: `NBD_CMD_BLOCK_STATUS` accepts a payload (extended
/// headers only).
pub const TF_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

/// Option: enter transmission on the named export (old way, no reply).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit requests and replies.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: not on this platform.
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
/// Option error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: block size information must be requested.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
/// Option error: the request is too big.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
/// Option error: extended headers already negotiated.
pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

/// Info: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info: canonical name.
pub const INFO_NAME: u16 = 1;
/// Info: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: don't fragment a structured read.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one block status descriptor only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write zeroes rather than be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag: the length is a payload length (extended headers).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
/// Every command flag this module knows.
pub const CMD_FLAGS_KNOWN: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO | CMD_FLAG_PAYLOAD_LEN;

/// Reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk: nothing (the final chunk of a reply with no data).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk: a range reading as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk: block status descriptors (32-bit).
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk: block status descriptors (64-bit, extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Chunk: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Error: operation not permitted (writes to a read-only export).
pub const EPERM: u32 = 1;
/// Error: input/output error.
pub const EIO: u32 = 5;
/// Error: out of memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid request.
pub const EINVAL: u32 = 22;
/// Error: no space (writes past the end).
pub const ENOSPC: u32 = 28;
/// Error: request too large.
pub const EOVERFLOW: u32 = 75;
/// Error: not supported (`FAST_ZERO` that would be slow).
pub const ENOTSUP: u32 = 95;
/// Error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` status: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status: reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` status: dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The context name of allocation status.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// The context name of QEMU's allocation depth.
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// The prefix of QEMU's dirty bitmap contexts.
pub const CONTEXT_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// Largest payload (write data, read reply) either side accepts: 32 MiB,
/// the maximum block size QEMU and nbdkit advertise.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option data accepted in the handshake. The longest legal option
/// is a meta context request: an export name and a few query strings of at
/// most 4096 bytes each.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, context name, message), as proto.md says.
pub const MAX_STRING: u32 = 4096;
/// Most meta context queries in one option.
pub const MAX_META_QUERIES: u32 = 128;
/// Most options in one handshake before the server hangs up.
pub const MAX_OPTIONS: u32 = 1024;
/// Most block status descriptors in one chunk (proto.md: SHOULD NOT send
/// more than 2^20; vdisk stays well below).
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// What was wrong with bytes a peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A magic number was not the expected one.
    BadMagic {
        /// Which message.
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// A field had a value the protocol forbids here.
    BadField {
        /// The field.
        field: &'static str,
        /// The value received.
        value: u64,
    },
    /// The message ended before a field.
    Truncated {
        /// The message.
        what: &'static str,
    },
    /// A length beyond a limit.
    TooLong {
        /// The field.
        field: &'static str,
        /// The value received.
        value: u64,
        /// The limit.
        limit: u64,
    },
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadMagic { what, got } => write!(f, "bad {what} magic {got:#x}"),
            ProtoError::BadField { field, value } => write!(f, "invalid {field} {value:#x}"),
            ProtoError::Truncated { what } => write!(f, "{what} ends early"),
            ProtoError::TooLong { field, value, limit } => write!(f, "{field} {value} is over the limit {limit}"),
        }
    }
}

impl std::error::Error for ProtoError {}

impl From<ProtoError> for crate::Error {
    fn from(e: ProtoError) -> Self {
        crate::Error::new(crate::ErrorKind::InvalidArgument, format!("nbd: {e}"))
    }
}

/// A bounded big-endian cursor over bytes a peer sent.
#[derive(Debug)]
pub struct Wire<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Wire<'a> {
    /// A cursor over `buf`, a `what` (named in errors).
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Wire { buf, what }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return Err(ProtoError::Truncated { what: self.what });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        self.array().map(u16::from_be_bytes)
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        self.array().map(u32::from_be_bytes)
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string of `len` bytes: at most [`MAX_STRING`], UTF-8, no NUL.
    pub fn string(&mut self, len: u32, field: &'static str) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(ProtoError::TooLong { field, value: u64::from(len), limit: u64::from(MAX_STRING) });
        }
        let b = self.take(len as usize)?;
        match std::str::from_utf8(b) {
            Ok(s) if !s.contains('\0') => Ok(s.to_string()),
            _ => Err(ProtoError::BadField { field, value: u64::from(len) }),
        }
    }

    /// A u32 length followed by that many bytes of string.
    pub fn lstring(&mut self, field: &'static str) -> Result<String, ProtoError> {
        let len = self.u32()?;
        self.string(len, field)
    }

    /// Fails unless everything was read.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::BadField { field: "trailing bytes", value: self.buf.len() as u64 })
        }
    }
}

/// One transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub typ: u16,
    /// The client's cookie, echoed in replies.
    pub cookie: u64,
    /// Export offset.
    pub offset: u64,
    /// Effect length, or payload length for writes (and for
    /// `CMD_FLAG_PAYLOAD_LEN` with extended headers).
    pub length: u64,
}

impl Request {
    /// Parses a header: [`REQUEST_LEN`] bytes, or [`EXTENDED_REQUEST_LEN`]
    /// when `extended`.
    pub fn parse(buf: &[u8], extended: bool) -> Result<Request, ProtoError> {
        let mut w = Wire::new(buf, "request");
        let magic = w.u32()?;
        let want = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
        if magic != want {
            return Err(ProtoError::BadMagic { what: "request", got: u64::from(magic) });
        }
        let flags = w.u16()?;
        let typ = w.u16()?;
        let cookie = w.u64()?;
        let offset = w.u64()?;
        let length = if extended { w.u64()? } else { u64::from(w.u32()?) };
        w.finish()?;
        if !extended && flags & CMD_FLAG_PAYLOAD_LEN != 0 {
            return Err(ProtoError::BadField { field: "command flags", value: u64::from(flags) });
        }
        Ok(Request { flags, typ, cookie, offset, length })
    }

    /// How many payload bytes follow this header on the wire. A write
    /// always carries its data: with extended headers the spec asks for
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` on writes, but QEMU 10's client leaves it
    /// out, and the length means the same either way.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if extended {
            if self.flags & CMD_FLAG_PAYLOAD_LEN != 0 || self.typ == CMD_WRITE {
                self.length
            } else {
                0
            }
        } else if self.typ == CMD_WRITE {
            self.length
        } else {
            0
        }
    }

    /// Encodes the header.
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&(if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC }).to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.typ.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            // Compact requests carry 32-bit lengths; callers split larger ones.
            out.extend_from_slice(&(self.length.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        }
    }
}

/// The name of a command, for messages.
pub fn command_name(typ: u16) -> &'static str {
    match typ {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        _ => "unknown command",
    }
}

/// Encodes an option reply header followed by `data`.
pub fn option_reply(option: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Encodes a simple reply.
pub fn simple_reply(error: u32, cookie: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Encodes a structured (or, with `extended`, an extended) chunk header for
/// a payload of `len` bytes; `offset` is the request's offset.
pub fn chunk_header(extended: bool, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64, out: &mut Vec<u8>) {
    if extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        // Structured chunks are at most MAX_PAYLOAD plus a small header.
        out.extend_from_slice(&(len.min(u64::from(u32::MAX)) as u32).to_be_bytes());
    }
}

/// One reply chunk header as a client reads it (simple replies appear as
/// a chunk of type [`REPLY_TYPE_NONE`] with `done` set, or an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    /// Simple reply (not a chunk).
    pub simple: bool,
    /// Error of a simple reply.
    pub error: u32,
    /// Chunk flags.
    pub flags: u16,
    /// Chunk type.
    pub typ: u16,
    /// The cookie.
    pub cookie: u64,
    /// Payload length.
    pub length: u64,
}

impl ReplyHeader {
    /// The header length that starts with `magic`, or an error.
    pub fn len_for_magic(magic: u32, extended: bool) -> Result<usize, ProtoError> {
        match magic {
            SIMPLE_REPLY_MAGIC if !extended => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC if !extended => Ok(STRUCTURED_REPLY_LEN),
            EXTENDED_REPLY_MAGIC if extended => Ok(EXTENDED_REPLY_LEN),
            m => Err(ProtoError::BadMagic { what: "reply", got: u64::from(m) }),
        }
    }

    /// Parses a whole header (its length from [`len_for_magic`](Self::len_for_magic)).
    pub fn parse(buf: &[u8], extended: bool) -> Result<ReplyHeader, ProtoError> {
        let mut w = Wire::new(buf, "reply");
        let magic = w.u32()?;
        Self::len_for_magic(magic, extended)?;
        let h = match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = w.u32()?;
                let cookie = w.u64()?;
                ReplyHeader { simple: true, error, flags: REPLY_FLAG_DONE, typ: REPLY_TYPE_NONE, cookie, length: 0 }
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = w.u16()?;
                let typ = w.u16()?;
                let cookie = w.u64()?;
                let length = u64::from(w.u32()?);
                ReplyHeader { simple: false, error: 0, flags, typ, cookie, length }
            }
            _ => {
                let flags = w.u16()?;
                let typ = w.u16()?;
                let cookie = w.u64()?;
                let _offset = w.u64()?;
                let length = w.u64()?;
                ReplyHeader { simple: false, error: 0, flags, typ, cookie, length }
            }
        };
        w.finish()?;
        Ok(h)
    }
}

/// The NBD error number for a vdisk error.
pub fn errno_for(e: &crate::Error, writing: bool) -> u32 {
    use crate::ErrorKind;
    match e.kind() {
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfBounds if writing => ENOSPC,
        ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => EINVAL,
        ErrorKind::Unsupported => ENOTSUP,
        ErrorKind::LimitExceeded => ENOSPC,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        for ext in [false, true] {
            let r = Request { flags: CMD_FLAG_FUA, typ: CMD_WRITE, cookie: 7, offset: 4096, length: 512 };
            let mut b = Vec::new();
            r.encode(ext, &mut b);
            assert_eq!(b.len(), if ext { EXTENDED_REQUEST_LEN } else { REQUEST_LEN });
            assert_eq!(Request::parse(&b, ext).unwrap(), r);
            assert!(Request::parse(&b, !ext).is_err(), "the other header style is refused");
            assert!(Request::parse(&b[..b.len() - 1], ext).is_err());
        }
    }

    #[test]
    fn payload_lengths() {
        let w = Request { flags: 0, typ: CMD_WRITE, cookie: 0, offset: 0, length: 10 };
        assert_eq!(w.payload_len(false), 10);
        assert_eq!(w.payload_len(true), 10, "extended writes carry data with or without PAYLOAD_LEN");
        let r = Request { typ: CMD_READ, ..w };
        assert_eq!(r.payload_len(false), 0);
        let bs = Request { flags: CMD_FLAG_PAYLOAD_LEN, typ: CMD_BLOCK_STATUS, ..w };
        assert_eq!(bs.payload_len(true), 10);
    }

    #[test]
    fn compact_request_with_payload_flag_is_refused() {
        let r = Request { flags: CMD_FLAG_PAYLOAD_LEN, typ: CMD_READ, cookie: 0, offset: 0, length: 1 };
        let mut b = Vec::new();
        r.encode(false, &mut b);
        assert!(matches!(Request::parse(&b, false), Err(ProtoError::BadField { .. })));
    }

    #[test]
    fn reply_headers_parse() {
        let mut b = Vec::new();
        simple_reply(EIO, 9, &mut b);
        let h = ReplyHeader::parse(&b, false).unwrap();
        assert!(h.simple && h.error == EIO && h.cookie == 9);
        assert!(ReplyHeader::parse(&b, true).is_err(), "no simple replies with extended headers");
        for ext in [false, true] {
            let mut b = Vec::new();
            chunk_header(ext, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 3, 0, 100, &mut b);
            let h = ReplyHeader::parse(&b, ext).unwrap();
            assert_eq!((h.typ, h.cookie, h.length, h.flags), (REPLY_TYPE_OFFSET_DATA, 3, 100, REPLY_FLAG_DONE));
        }
    }

    #[test]
    fn strings_are_bounded_and_checked() {
        let mut w = Wire::new(b"ab\0c", "t");
        assert!(w.string(4, "name").is_err());
        let mut w = Wire::new(&[0xff, 0xff, 0xff, 0xff], "t");
        assert!(matches!(w.lstring("name"), Err(ProtoError::TooLong { .. })));
        let mut w = Wire::new(&[0, 0, 0, 2, b'h', b'i'], "t");
        assert_eq!(w.lstring("name").unwrap(), "hi");
        w.finish().unwrap();
    }
}
