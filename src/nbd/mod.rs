//! NBD (Network Block Device): a server that exports any [`BlockDevice`]
//! and a client that is one.
//!
//! The protocol reference is `doc/proto.md` of the NBD project. The server
//! speaks fixed newstyle negotiation with the options `NBD_OPT_GO`, `INFO`,
//! `LIST`, `EXPORT_NAME`, `ABORT`, `STRUCTURED_REPLY`, `EXTENDED_HEADERS`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT`, and the commands `READ`
//! (holes sent as `NBD_REPLY_TYPE_OFFSET_HOLE`), `WRITE` (with `FUA`),
//! `FLUSH`, `TRIM`, `WRITE_ZEROES` (`NO_HOLE`, `FAST_ZERO`), `BLOCK_STATUS`
//! (`REQ_ONE`, the extended-header payload form), `CACHE` and `DISC`. Meta
//! contexts: `base:allocation`, `qemu:allocation-depth`, and
//! `qemu:dirty-bitmap:NAME` for bitmaps an embedder supplies through
//! [`DirtyBitmap`]. Block size constraints are advertised (minimum 1,
//! maximum 32 MiB) and `NBD_FLAG_CAN_MULTI_CONN` is set: all connections
//! share one device, and a flush on any of them covers every write that any
//! connection has had acknowledged. STARTTLS is refused: plain NBD is for
//! loopback and trusted networks.
//!
//! Hostile peers: option data, payloads and strings are bounded
//! ([`proto::MAX_OPTION_LEN`], [`proto::MAX_PAYLOAD`], [`proto::MAX_STRING`]),
//! the handshake has a deadline, a bad magic ends the connection with an
//! error naming it, and requests that are out of range, too large or
//! carry wrong flags get the protocol's error replies.
//!
//! [`BlockDevice`]: crate::BlockDevice

mod client;
mod conn;
mod handshake;
mod pipe;
pub mod proto;
mod server;
mod transmit;

pub use client::{is_uri, Address, Client, Target};
pub use conn::{Connection, Listener};
pub use server::{log_to_stderr, DetectZeroes, DirtyBitmap, Export, Server, ServerOptions, StopHandle};
