//! LUKS: the standalone `luks` format (QEMU `block/crypto.c`: a LUKS1
//! header, then the encrypted payload; or a detached header in one file
//! and the payload in another) and the LUKS types qcow2's
//! `encrypt.format=luks` shares.
//!
//! The header, key slots and ciphers live in the crate's `crypto` module;
//! they are re-exported here.

pub use crate::crypto::luks1::{Luks1Header, Luks1Params, KeySlot};
pub use crate::crypto::sector::{IvGen, LuksHash, LuksMode};
