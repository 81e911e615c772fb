//! The qcow2_ops target: an image vdisk created, driven by an operation
//! script from the input and checked against a model.

use std::sync::Arc;

use super::*;
use crate::device::BlockDevice;
use crate::error::ErrorKind;

// ---------------------------------------------------------------------------
// qcow2_ops

/// A cursor that yields zeros once the input runs out.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let s = self.pos.min(self.data.len());
        let e = self.pos.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[s..e]
    }
}

/// `VDISK_FUZZ_TRACE=1` prints each `qcow2_ops` operation (debugging).
fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("VDISK_FUZZ_TRACE").is_some())
}

/// Most operations one script runs.
const MAX_OPS: usize = 48;
/// Storage limit for `qcow2_ops` images.
const OPS_STORAGE_LIMIT: u64 = 96 << 20;
/// Largest virtual size a script can reach.
const OPS_MAX_SIZE: u64 = 4 << 20;

/// What a fresh image is created with, decoded from four bytes.
fn fresh_options(inp: &mut Input<'_>) -> (CreateOptions, bool) {
    let a = inp.u8();
    let b = inp.u8();
    let size = (u64::from(inp.u16()) % 4096 + 1) * 512;
    let mut o = CreateOptions::new(size);
    o.cluster_size = [512, 4096, 16384, 65536][usize::from(a & 3)];
    o.version = if a & 4 != 0 { 2 } else { 3 };
    if o.version == 3 {
        o.extended_l2 = a & 8 != 0 && o.cluster_size >= 16384;
        o.lazy_refcounts = a & 16 != 0;
        if a & 32 != 0 {
            o.compression_type = CompressionType::Zstd;
        }
        o.refcount_bits = 1 << (b & 7).min(6);
    }
    let backing = b & 8 != 0;
    if backing {
        o.backing_file = Some("backing.raw".into());
        o.backing_format = Some("raw".into());
    }
    if b & 16 != 0 && (!backing || o.extended_l2) {
        o.preallocation = Preallocation::Metadata;
    }
    if b & 32 != 0 && !(o.version == 2 && o.preallocation != Preallocation::Off) {
        o.encrypt = Some(Secret::new(PASSPHRASE));
    } else if b & 64 != 0 && o.version == 3 {
        o.data_file = Some("data.raw".into());
        o.data_file_raw = b & 128 != 0 && !backing;
    }
    (o, backing)
}

/// The state a valid image must be in.
#[derive(Debug, Clone)]
struct Model {
    data: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
}

struct Ops<'a> {
    file: Arc<Capped>,
    extra: Qcow2Options,
    q: Option<Qcow2>,
    /// `None` once the content is unknown (hostile start, storage limit).
    model: Option<Model>,
    backing: Option<&'a dyn BlockDevice>,
    v2: bool,
}

impl Ops<'_> {
    fn q(&self) -> &Qcow2 {
        self.q.as_ref().expect("image open")
    }

    fn reopen(&mut self) -> bool {
        match no_internal("reopen", Qcow2::open(self.file.clone(), self.extra.clone())) {
            Ok(q) => {
                self.q = Some(q);
                true
            }
            Err(e) => {
                assert!(
                    self.model.is_none() || self.file.hit.load(Ordering::Relaxed),
                    "a valid image does not reopen: {e}"
                );
                false
            }
        }
    }

    /// Reads `[off, off + len)` and compares it with the model.
    fn verify(&self, off: u64, len: u64, what: &str) {
        let Some(m) = &self.model else {
            let mut b = vec![0u8; len.min(1 << 20) as usize];
            let _ = no_internal("read", self.q().read_at(&mut b, off));
            return;
        };
        let q = self.q();
        assert_eq!(q.size(), m.data.len() as u64, "{what}: size differs");
        let mut b = vec![0u8; len as usize];
        q.read_at(&mut b, off).unwrap_or_else(|e| panic!("{what}: read of a valid image failed: {e}"));
        if let Some(i) = b.iter().zip(&m.data[off as usize..(off + len) as usize]).position(|(x, y)| x != y) {
            panic!(
                "{what}: guest byte {:#x} is {:#04x}, the model says {:#04x}",
                off + i as u64,
                b[i],
                m.data[off as usize + i]
            );
        }
    }

    /// Handles the result of an operation: errors on a valid image must be
    /// refusals of the expected kinds (which change nothing).
    fn outcome(&mut self, what: &str, r: Result<()>, allowed: &[ErrorKind]) -> bool {
        let r = no_internal(what, r);
        match r {
            Ok(()) => true,
            Err(e) => {
                if self.file.hit.load(Ordering::Relaxed) {
                    self.model = None;
                }
                if self.model.is_some() && !allowed.contains(&e.kind()) {
                    panic!("{what} failed on a valid image: {e} ({:?})", e.kind());
                }
                false
            }
        }
    }

    fn backing_bytes(&self, off: u64, out: &mut [u8]) {
        out.fill(0);
        if let Some(b) = self.backing {
            let bs = b.size();
            if off < bs {
                let n = (bs - off).min(out.len() as u64) as usize;
                b.read_at(&mut out[..n], off).expect("backing read");
            }
        }
    }

    fn step(&mut self, inp: &mut Input<'_>) {
        let at = inp.pos;
        let op = inp.u8() % 16;
        let size = self.q().size();
        let cs = self.q().cluster_size();
        if trace() {
            let args = &inp.data[at..(at + 9).min(inp.data.len())];
            eprintln!("op {op} size {size:#x} args {args:02x?}");
        }
        let pick_off = |inp: &mut Input<'_>| {
            if size == 0 {
                0
            } else {
                u64::from(inp.u32()) % size
            }
        };
        match op {
            0 | 1 => {
                let off = pick_off(inp);
                let len = (u64::from(inp.u16()) * 4 + u64::from(op) * 3).min(size - off);
                let seed = inp.u8();
                let mut buf = vec![0u8; len as usize];
                pattern(seed, off, &mut buf);
                let r = self.q().write_at(&buf, off);
                if self.outcome("write", r, &[]) {
                    if let Some(m) = &mut self.model {
                        m.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
                    }
                }
                self.verify(off, len, "after write");
            }
            2 | 3 => {
                let off = pick_off(inp);
                let len = u64::from(inp.u32()) % (size - off + 1).min(16 << 20);
                let mode = if op == 2 { ZeroMode::MayUnmap } else { ZeroMode::Allocate };
                let r = self.q().write_zeroes(off, len, mode);
                if self.outcome("write_zeroes", r, &[]) {
                    if let Some(m) = &mut self.model {
                        m.data[off as usize..(off + len) as usize].fill(0);
                    }
                }
                self.verify(off, len, "after write_zeroes");
            }
            4 => {
                let off = pick_off(inp);
                let len = u64::from(inp.u32()) % (size - off + 1).min(16 << 20);
                let r = self.q().discard(off, len);
                if self.outcome("discard", r, &[]) && len > 0 {
                    // Whole clusters in the range (and a final partial
                    // cluster at the end of the disk) read as zeros, or as
                    // the backing file on v2 images; the rest is kept.
                    let end = off + len;
                    let aend = if end == size { end.div_ceil(cs) * cs } else { end / cs * cs };
                    let astart = off.div_ceil(cs) * cs;
                    if aend > astart {
                        let e = aend.min(size);
                        let mut fill = vec![0u8; (e - astart) as usize];
                        if self.v2 && !self.q().header().extended_l2() {
                            self.backing_bytes(astart, &mut fill);
                        }
                        if let Some(m) = &mut self.model {
                            m.data[astart as usize..e as usize].copy_from_slice(&fill);
                        }
                    }
                }
                self.verify(off, len, "after discard");
            }
            5 => {
                let first = if size == 0 { 0 } else { u64::from(inp.u16()) % size.div_ceil(cs) };
                let n = u64::from(inp.u8() % 4) + 1;
                let off = first * cs;
                let len = (n * cs).min(size - off);
                let seed = inp.u8();
                let mut buf = vec![0u8; len as usize];
                pattern(seed, off, &mut buf);
                let r = self.q().write_compressed(&buf, off);
                if self.outcome("write_compressed", r, &[ErrorKind::Unsupported]) {
                    if let Some(m) = &mut self.model {
                        m.data[off as usize..(off + len) as usize].copy_from_slice(&buf);
                    }
                }
                self.verify(off, len, "after write_compressed");
            }
            6 => {
                let new = (u64::from(inp.u16()) % (OPS_MAX_SIZE / 512) + 1) * 512;
                let r = self.q().resize(new);
                if self.outcome("resize", r, &[ErrorKind::InvalidArgument, ErrorKind::Unsupported]) {
                    if let Some(m) = &mut self.model {
                        m.data.resize(new as usize, 0);
                    }
                }
                self.verify(0, self.q().size().min(64 << 10), "after resize");
            }
            7 => {
                let name = format!("s{}", inp.u8() % 6);
                let r = self.q().snapshot_create(&name);
                if self.outcome(
                    "snapshot_create",
                    r,
                    &[ErrorKind::AlreadyExists, ErrorKind::LimitExceeded, ErrorKind::Unsupported],
                ) {
                    if let Some(m) = &mut self.model {
                        let d = m.data.clone();
                        m.snaps.push((name, d));
                    }
                }
            }
            8 | 9 => {
                let key = self.snapshot_key(inp);
                let r = if op == 8 { self.q().snapshot_apply(&key) } else { self.q().snapshot_delete(&key) };
                let what = if op == 8 { "snapshot_apply" } else { "snapshot_delete" };
                // Applying adds a reference to every cluster of the
                // snapshot: narrow refcounts may refuse it (nothing changes).
                let allowed = [ErrorKind::NotFound, ErrorKind::Unsupported, ErrorKind::LimitExceeded];
                if self.outcome(what, r, &allowed[..if op == 8 { 3 } else { 2 }]) {
                    if let Some(m) = &mut self.model {
                        let i = m.snaps.iter().position(|(n, _)| *n == key).expect("model snapshot");
                        if op == 8 {
                            m.data = m.snaps[i].1.clone();
                        } else {
                            m.snaps.remove(i);
                        }
                    }
                }
                self.verify(0, self.q().size().min(64 << 10), what);
            }
            10 => {
                let key = self.snapshot_key(inp);
                let Ok(v) = no_internal("snapshot_view", self.q().snapshot_view(&key)) else {
                    assert!(
                        !self.model.as_ref().is_some_and(|m| m.snaps.iter().any(|(n, _)| *n == key)),
                        "snapshot view of an existing snapshot failed"
                    );
                    return;
                };
                let vs = v.size();
                let mut b = vec![0u8; vs.min(OPS_MAX_SIZE) as usize];
                let r = no_internal("view read", v.read_at(&mut b, 0));
                if let Some(m) = &self.model {
                    r.unwrap_or_else(|e| panic!("snapshot view read failed: {e}"));
                    let (_, want) = m.snaps.iter().find(|(n, _)| *n == key).expect("snap");
                    let n = want.len().min(b.len());
                    assert!(b[..n] == want[..n], "snapshot view '{key}' differs from the model");
                }
            }
            11 => {
                let r = self.q().flush();
                self.outcome("flush", r, &[]);
            }
            12 => {
                let q = self.q.take().expect("open");
                let r = q.close();
                self.outcome("close", r, &[]);
                if !self.reopen() {
                    return;
                }
                let s = self.q().size();
                self.verify(0, s.min(OPS_MAX_SIZE), "after reopen");
            }
            13 => {
                // Flush, then drop without close (lazy refcounts stay dirty
                // and are rebuilt on the next open).
                let r = self.q().flush();
                self.outcome("flush", r, &[]);
                self.q = None;
                if !self.reopen() {
                    return;
                }
                let s = self.q().size();
                self.verify(0, s.min(OPS_MAX_SIZE), "after drop and reopen");
            }
            _ => {
                let off = pick_off(inp);
                let len = u64::from(inp.u16()).min(size - off);
                self.verify(off, len, "read");
            }
        }
    }

    fn snapshot_key(&self, inp: &mut Input<'_>) -> String {
        let b = inp.u8();
        if self.model.is_some() {
            return format!("s{}", b % 6);
        }
        let snaps = self.q().snapshots();
        if snaps.is_empty() || b & 0x80 != 0 {
            return format!("s{}", b % 6);
        }
        snaps[usize::from(b) % snaps.len()].id.clone()
    }
}

/// `qcow2_ops`: a script of operations on a qcow2 image, either created by
/// vdisk from a few option bits (then checked against a `Vec<u8>` model,
/// reopened at the end, and required to pass `check`) or given as hostile
/// bytes (then only required not to panic, hang or exhaust memory).
///
/// Input: byte 0 bit 0 chooses. Fresh: four option bytes, then the
/// script. Hostile: a little-endian u16 image length, the image, then the
/// script. Each operation is one opcode byte and its arguments.
pub fn qcow2_ops(data: &[u8]) {
    let mut inp = Input { data, pos: 0 };
    let mode = inp.u8();
    let backing_dev = pattern_device(3 << 20, 0x44);
    let data_file: Arc<Capped> = Capped::new(Vec::new(), OPS_STORAGE_LIMIT);
    let (file, extra, model, backing, v2) = if mode & 1 == 0 {
        let (o, backing) = fresh_options(&mut inp);
        let file = Capped::new(Vec::new(), OPS_STORAGE_LIMIT);
        let extra = Qcow2Options {
            backing: backing.then(|| backing_dev.clone()),
            data_file: o.data_file.as_ref().map(|_| data_file.clone() as Arc<dyn Storage>),
            key: o.encrypt.clone(),
            ..Qcow2Options::default()
        };
        let q = Qcow2::create(file.clone(), &o, extra.clone())
            .unwrap_or_else(|e| panic!("create failed for valid options {o:?}: {e}"));
        drop(q);
        let size = o.size.div_ceil(512) * 512;
        let mut m = vec![0u8; size as usize];
        if backing {
            let n = size.min(backing_dev.size()) as usize;
            backing_dev.read_at(&mut m[..n], 0).expect("backing");
        }
        let model = Model { data: m, snaps: Vec::new() };
        (file, extra, Some(model), backing, o.version == 2)
    } else {
        let n = usize::from(inp.u16());
        let img = inp.take(n).to_vec();
        let file = Capped::new(img, OPS_STORAGE_LIMIT);
        let h = Qcow2::read_header(&*file).ok();
        let has_backing = h.as_ref().is_some_and(|h| h.backing_file.is_some());
        let extra = Qcow2Options {
            backing: has_backing.then(|| backing_dev.clone()),
            data_file: h.as_ref().and_then(|h| h.data_file.as_ref()).map(|_| data_file.clone() as Arc<dyn Storage>),
            key: Some(Secret::new(PASSPHRASE)),
            ..Qcow2Options::default()
        };
        let v2 = h.as_ref().is_some_and(|h| h.version == 2);
        (file, extra, None, has_backing, v2)
    };
    let mut ops = Ops { file, extra, q: None, model, backing: backing.then_some(&*backing_dev), v2 };
    if !ops.reopen() {
        return;
    }
    for _ in 0..MAX_OPS {
        if inp.done() {
            break;
        }
        ops.step(&mut inp);
        if ops.q.is_none() {
            return;
        }
        if ops.file.hit.load(Ordering::Relaxed) {
            ops.model = None;
        }
    }
    // Final judgement: content, check, close, reopen, content and check.
    let size = ops.q().size();
    ops.verify(0, size, "at the end");
    let valid = ops.model.is_some();
    let report = no_internal("check", ops.q().check(Repair::None));
    if valid {
        let r = report.unwrap_or_else(|e| panic!("check failed on a valid image: {e}"));
        assert!(r.corruptions == 0 && r.check_errors == 0, "check finds corruption in a valid image: {r:?}");
    }
    let q = ops.q.take().expect("open");
    let r = q.close();
    if !ops.outcome("close", r, &[]) {
        return;
    }
    if !ops.reopen() {
        return;
    }
    ops.verify(0, size, "after the final reopen");
    let snaps = ops.model.as_ref().map(|m| m.snaps.clone()).unwrap_or_default();
    for (name, want) in snaps {
        let v = ops.q().snapshot_view(&name).unwrap_or_else(|e| panic!("snapshot '{name}' is gone after reopen: {e}"));
        let mut b = vec![0u8; v.size().min(want.len() as u64) as usize];
        v.read_at(&mut b, 0).expect("snapshot view read");
        assert!(b[..] == want[..b.len()], "snapshot '{name}' differs from the model after reopen");
    }
    let report = no_internal("check", ops.q().check(Repair::None));
    if ops.model.is_some() {
        let r = report.unwrap_or_else(|e| panic!("check failed on a valid image: {e}"));
        assert!(r.is_clean(), "check after reopen is not clean on a valid image: {r:?}");
    }
}
