//! Cryptography shared by the formats: secrets (passphrases and keys) and
//! the legacy AES-CBC sector cipher of `crypt_method` 1 images, and LUKS
//! (`luks1`: header, key slots, key derivation; `luks2`: the LUKS2 header
//! pair, JSON metadata (`json`), PBKDF2 and argon2 key slots; `sector`:
//! the payload cipher).
//!
//! Formats keep only how they use a cipher (which offsets feed the IVs,
//! how unaligned I/O is widened to whole sectors); the cipher and the key
//! handling live here.

mod aes_cbc;
pub mod json;
pub mod luks1;
pub mod luks2;
mod secret;
pub mod sector;

pub(crate) use aes_cbc::SectorCipher;
pub use secret::Secret;
