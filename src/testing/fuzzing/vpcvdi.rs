//! Target `open_vpc_vdi`: hostile bytes opened as VHD (`vpc`) and as VDI.

use std::sync::Arc;

use super::*;
use crate::device::BlockDevice;
use crate::vdi::{header::Header as VdiHeader, Vdi, VdiOptions};
use crate::vpc::dynamic::DynHeader;
use crate::vpc::footer::Footer;
use crate::vpc::{Vpc, VpcOptions};

/// `open_vpc_vdi`: opens the input as VHD (a differencing disk gets a
/// pattern device as its parent) and as VDI, read-only: walks the device,
/// runs VDI's check, checks that parsed headers survive being encoded
/// again; then writes a little into a writable copy (memory-capped),
/// flushes, reopens it and reads the written bytes back.
pub fn open_vpc_vdi(data: &[u8]) {
    roundtrip(data);
    let len = data.len() as u64;
    let ro = || -> Arc<dyn Storage> { Arc::new(MemStorage::from_vec(data.to_vec()).limit(len).read_only()) };
    let parent =
        no_internal("vpc parent name", Vpc::parent_name(&*ro())).ok().flatten().map(|_| pattern_device(1 << 20, 0x44));
    if let Ok(v) = no_internal(
        "vpc open",
        Vpc::open(ro(), VpcOptions { read_only: true, parent: parent.clone(), ..Default::default() }),
    ) {
        walk(&v);
    }
    if let Ok(v) = no_internal("vdi open", Vdi::open(ro(), VdiOptions { read_only: true, ..Default::default() })) {
        walk(&v);
        let _ = no_internal("vdi check", v.check());
    }
    // Writable copies.
    let st = Capped::new(data.to_vec(), len + (4 << 20));
    if let Ok(v) = Vpc::open(st.clone(), VpcOptions { read_only: false, parent, ..Default::default() }) {
        write_back(&v, &st, |s| Vpc::open(s, VpcOptions::default()).map(|d| Box::new(d) as Box<dyn BlockDevice>));
    }
    let st = Capped::new(data.to_vec(), len + (4 << 20));
    if let Ok(v) = Vdi::open(st.clone(), VdiOptions { read_only: false, ..Default::default() }) {
        write_back(&v, &st, |s| Vdi::open(s, VdiOptions::default()).map(|d| Box::new(d) as Box<dyn BlockDevice>));
    }
}

fn write_back(dev: &dyn BlockDevice, st: &Capped, reopen: impl Fn(Arc<dyn Storage>) -> Result<Box<dyn BlockDevice>>) {
    let size = dev.size();
    if size == 0 {
        return;
    }
    let mut buf = vec![0u8; 3000.min(size) as usize];
    pattern(0x5a, 0, &mut buf);
    let at = (size / 3) & !511;
    let at = at.min(size - buf.len() as u64);
    if no_internal("write", dev.write_at(&buf, at)).is_err() || no_internal("flush", dev.flush()).is_err() {
        return;
    }
    if st.hit.load(Ordering::Relaxed) {
        return;
    }
    let copy: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(st.inner.to_vec()));
    let d = match reopen(copy) {
        Ok(d) => d,
        Err(e) => panic!("an image vdisk wrote does not reopen: {e}"),
    };
    let mut back = vec![0u8; buf.len()];
    if d.read_at(&mut back, at).is_ok() {
        assert!(back == buf, "bytes written at {at:#x} read back differently");
    }
}

fn roundtrip(data: &[u8]) {
    for at in [Some(0usize), data.len().checked_sub(512)].into_iter().flatten() {
        if let Some(b) = data.get(at..at + 512).and_then(|s| <&[u8; 512]>::try_from(s).ok()) {
            if let Ok(f) = Footer::decode(b) {
                assert_eq!(Footer::decode(&f.encode()).ok(), Some(f), "footer changed across encode/decode");
            }
        }
    }
    if let Some(b) = data.get(512..1536).and_then(|s| <&[u8; 1024]>::try_from(s).ok()) {
        if let Ok(h) = DynHeader::decode(b) {
            let mut h2 = DynHeader::decode(&h.encode()).expect("encoded dynamic header decodes");
            h2.checksum = h.checksum;
            assert_eq!(h2.encode(), h.encode(), "dynamic header changed across encode/decode");
        }
    }
    if let Some(b) = data.get(..512).and_then(|s| <&[u8; 512]>::try_from(s).ok()) {
        if let Ok(h) = VdiHeader::decode(b, data.len() as u64) {
            assert_eq!(VdiHeader::decode(&h.encode(), data.len() as u64).ok(), Some(h), "VDI header changed");
        }
    }
}
