//! What `qemu-img check` reports for VHDX: payload and sector bitmap
//! blocks that point past the end of the file (a truncated image) or into
//! the header area, the log, the BAT or the metadata region count as
//! corruptions; a log replayed on a read-write open counts as a corruption
//! fixed.

use super::Vhdx;

/// What [`Vhdx::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VhdxCheckReport {
    /// BAT entries pointing outside the file or into metadata.
    pub corruptions: u64,
    /// 1 when a log was replayed into the file on open.
    pub corruptions_fixed: u64,
    /// One message per finding.
    pub messages: Vec<String>,
}

impl VhdxCheckReport {
    /// qemu-img's exit code: 0 clean, 2 corruptions.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > 0 {
            2
        } else {
            0
        }
    }
}

pub(crate) fn report(v: &Vhdx) -> VhdxCheckReport {
    VhdxCheckReport {
        corruptions: v.bat_errors.len() as u64,
        corruptions_fixed: u64::from(v.log_replayed && !v.read_only),
        messages: v.bat_errors.iter().map(|m| format!("ERROR: VHDX {m}")).collect(),
    }
}
