//! `luks2_header`: a LUKS2 volume (both header copies, JSON metadata, key
//! material, payload) from the fuzzer.
//!
//! Checks: reading the header pair never panics; a header that reads has
//! its key-slot areas inside the key-slot area and the file, and its
//! segment past the key-slot area (or at 0, detached); a volume over the
//! bytes opens for inspection or fails cleanly; when every key slot asks
//! for little work (PBKDF2 at most 2000 iterations, argon2 at most 4 MiB
//! of passes) the volume is unlocked with the corpus passphrase, which
//! fails cleanly or gives a volume whose first sectors read.

use std::sync::Arc;

use crate::crypto::luks2::{Kdf, Luks2Header};
use crate::device::BlockDevice;
use crate::error::{ErrorKind, Result};
use crate::luks::{Luks, LuksOptions};
use crate::storage::{MemStorage, Storage};
use crate::Secret;

/// Most PBKDF2 iterations per count this target lets a run do.
const CHEAP_ITERATIONS: u32 = 2000;
/// Most argon2 work (time x KiB) per slot this target lets a run do.
const CHEAP_ARGON2: u64 = 4096;

/// The target body.
pub fn luks2_header(data: &[u8]) {
    let data = &data[..data.len().min(16 << 20)];
    let read = |o: u64, b: &mut [u8]| -> Result<()> {
        let s = data
            .get(o as usize..(o as usize).saturating_add(b.len()))
            .ok_or_else(|| crate::Error::invalid("read past the end"))?;
        b.copy_from_slice(s);
        Ok(())
    };
    let len = data.len() as u64;
    let mut cheap = false;
    if let Ok(h) = Luks2Header::read(&read, len) {
        for k in &h.keyslots {
            let end = k.area_offset + k.area_size;
            assert!(k.area_offset >= 2 * h.bin.hdr_size && end <= h.area_end() && end <= len, "{k:?}");
        }
        assert!(h.segment.offset == 0 || h.segment.offset >= h.area_end());
        cheap = h.digest.iterations <= CHEAP_ITERATIONS
            && h.keyslots.iter().all(|k| match k.kdf {
                Kdf::Pbkdf2 { iterations, .. } => iterations <= CHEAP_ITERATIONS,
                Kdf::Argon2 { time, memory, .. } => u64::from(time) * u64::from(memory) <= CHEAP_ARGON2,
            });
    }
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(data.to_vec()));
    if let Ok(l) = Luks::open(st.clone(), LuksOptions { read_only: true, inspect_only: true, ..Default::default() }) {
        let _ = l.info();
        let mut b = [0u8; 512];
        assert!(l.size() == 0 || l.read_at(&mut b, 0).is_err(), "read without a key succeeded");
    }
    if cheap {
        let key = Some(Secret::new(super::PASSPHRASE));
        match Luks::open(st, LuksOptions { read_only: true, key, ..Default::default() }) {
            Ok(l) => {
                let n = l.size().min(8192) as usize;
                let mut b = vec![0u8; n];
                l.read_at(&mut b, 0).expect("unlocked volume reads");
            }
            Err(e) => assert_ne!(e.kind(), ErrorKind::Internal, "{e}"),
        }
    }
}
