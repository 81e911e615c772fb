//! `luks_header`: a LUKS1 header area (header and key material, then
//! payload) from the fuzzer.
//!
//! Checks: parsing never panics; a header that parses survives being
//! encoded and parsed again unchanged; a volume over the bytes opens for
//! inspection or fails cleanly; when the header asks for little PBKDF2
//! work (every count at most 2000, so a run stays fast) the volume is
//! unlocked with the corpus passphrase, which fails cleanly or gives a
//! volume whose sectors read back.

use std::sync::Arc;

use crate::crypto::luks1::{Luks1Header, HEADER_LEN, SLOTS};
use crate::device::BlockDevice;
use crate::error::ErrorKind;
use crate::luks::{Luks, LuksOptions};
use crate::storage::{MemStorage, Storage};
use crate::Secret;

/// Most PBKDF2 iterations per count this target lets a run do.
const CHEAP: u32 = 2000;

/// The target body.
pub fn luks_header(data: &[u8]) {
    let data = &data[..data.len().min(4 << 20)];
    if let Ok(h) = Luks1Header::parse(data) {
        let again = Luks1Header::parse(&h.encode()).expect("an encoded header parses");
        assert_eq!(again, h, "header does not survive encode/parse");
        assert!(h.area_end() >= HEADER_LEN as u64);
    }
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(data.to_vec()));
    if let Ok(l) = Luks::open(st.clone(), LuksOptions { read_only: true, inspect_only: true, ..Default::default() }) {
        let _ = l.info();
        let mut b = [0u8; 512];
        let e = l.read_at(&mut b, 0);
        assert!(l.size() == 0 || e.is_err(), "read without a key succeeded");
        let cheap = match l.header() {
            Some(h) => {
                h.mk_digest_iter <= CHEAP && (0..SLOTS).all(|i| !h.slots[i].active || h.slots[i].iterations <= CHEAP)
            }
            // LUKS2 has its own target (`luks2_header`).
            None => false,
        };
        if cheap {
            let key = Some(Secret::new(super::PASSPHRASE));
            match Luks::open(st, LuksOptions { read_only: true, key, ..Default::default() }) {
                Ok(l) => {
                    let n = l.size().min(4096) as usize;
                    let mut b = vec![0u8; n];
                    l.read_at(&mut b, 0).expect("unlocked volume reads");
                }
                Err(e) => assert_ne!(e.kind(), ErrorKind::Internal, "{e}"),
            }
        }
    }
}
