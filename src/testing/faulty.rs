//! [`FaultyStorage`]: a storage that fails, or "loses power", after the
//! N-th write or sync, for crash tests.

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::storage::{copy_out, range_end, Storage};

/// How a [`FaultyStorage`] misbehaves once its budget of operations is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Every later write, truncate, punch or sync fails with an I/O error, as
    /// a failing disk would.
    Error,
    /// The machine "loses power": every later operation fails and
    /// [`FaultyStorage::crashed_image`] tells what the disk holds.
    PowerLoss,
}

/// Which un-synced writes survive a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survivors {
    /// All writes issued before the crash reached the disk.
    All,
    /// None of the writes since the last sync reached the disk.
    None,
    /// A pseudo-random subset (by seed) of the writes since the last sync
    /// reached the disk, in any order: the disk may reorder writes.
    Some(u64),
}

#[derive(Debug, Clone)]
enum PendingOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Punch(u64, u64),
}

#[derive(Debug)]
struct FaultyState {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<PendingOp>,
    ops: u64,
    budget: Option<u64>,
    failed: bool,
}

/// A test double for crash and fault tests: an in-memory storage that fails
/// (or "loses power") after a budget of mutating operations (writes,
/// truncations, hole punches and syncs each count as one).
///
/// It remembers which writes were made durable by a sync, so after a power
/// loss [`crashed_image`](Self::crashed_image) returns the bytes the disk
/// could hold: everything synced, plus any subset of later writes.
#[derive(Debug)]
pub struct FaultyStorage {
    state: Mutex<FaultyState>,
    mode: FaultMode,
}

impl FaultyStorage {
    /// Starts from `bytes` (already durable), failing after `budget`
    /// mutating operations (`None`: never).
    pub fn new(bytes: Vec<u8>, budget: Option<u64>, mode: FaultMode) -> Self {
        FaultyStorage {
            state: Mutex::new(FaultyState {
                durable: bytes.clone(),
                current: bytes,
                pending: Vec::new(),
                ops: 0,
                budget,
                failed: false,
            }),
            mode,
        }
    }

    /// Mutating operations performed so far (including the failed one).
    pub fn ops(&self) -> u64 {
        self.state.lock().ops
    }

    /// Whether the budget ran out.
    pub fn has_failed(&self) -> bool {
        self.state.lock().failed
    }

    /// What the storage holds now, as seen by readers before a crash.
    pub fn current(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    /// The bytes on "disk" after a power loss now: the synced state plus the
    /// chosen survivors among the writes since the last sync.
    pub fn crashed_image(&self, survivors: Survivors) -> Vec<u8> {
        let st = self.state.lock();
        let mut img = st.durable.clone();
        let mut rng = match survivors {
            Survivors::Some(seed) => seed | 1,
            _ => 0,
        };
        for op in &st.pending {
            let keep = match survivors {
                Survivors::All => true,
                Survivors::None => false,
                Survivors::Some(_) => {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng & 1 == 1
                }
            };
            if keep {
                apply(&mut img, op);
            }
        }
        img
    }

    fn begin(&self, st: &mut FaultyState) -> Result<()> {
        if st.failed {
            return Err(fault_error());
        }
        st.ops += 1;
        if let Some(b) = st.budget {
            if st.ops > b {
                st.failed = true;
                return Err(fault_error());
            }
        }
        Ok(())
    }
}

fn fault_error() -> Error {
    Error::io("injected fault", std::io::Error::other("FaultyStorage: operation budget exhausted"))
}

fn apply(img: &mut Vec<u8>, op: &PendingOp) {
    match op {
        PendingOp::Write(off, data) => {
            let start = *off as usize;
            let end = start + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[start..end].copy_from_slice(data);
        }
        PendingOp::SetLen(len) => img.resize(*len as usize, 0),
        PendingOp::Punch(off, len) => {
            let l = img.len() as u64;
            let s = (*off).min(l) as usize;
            let e = off.saturating_add(*len).min(l) as usize;
            img[s..e].fill(0);
        }
    }
}

impl Storage for FaultyStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        range_end(offset, buf.len())?;
        let st = self.state.lock();
        if st.failed && self.mode == FaultMode::PowerLoss {
            return Err(fault_error());
        }
        copy_out(&st.current, buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = range_end(offset, buf.len())?;
        if end > 1 << 34 {
            return Err(Error::limit("FaultyStorage holds at most 16 GiB"));
        }
        let mut st = self.state.lock();
        self.begin(&mut st)?;
        let op = PendingOp::Write(offset, buf.to_vec());
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.state.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if len > 1 << 34 {
            return Err(Error::limit("FaultyStorage holds at most 16 GiB"));
        }
        let mut st = self.state.lock();
        self.begin(&mut st)?;
        let op = PendingOp::SetLen(len);
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut st = self.state.lock();
        self.begin(&mut st)?;
        st.durable = st.current.clone();
        st.pending.clear();
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.state.lock();
        self.begin(&mut st)?;
        let op = PendingOp::Punch(offset, len);
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faulty_power_loss() {
        let f = FaultyStorage::new(vec![0; 4], Some(3), FaultMode::PowerLoss);
        f.write_at(&[1], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2], 1).unwrap();
        assert!(f.write_at(&[3], 2).is_err());
        assert!(f.has_failed());
        assert_eq!(f.crashed_image(Survivors::None), vec![1, 0, 0, 0]);
        assert_eq!(f.crashed_image(Survivors::All), vec![1, 2, 0, 0]);
    }
}
