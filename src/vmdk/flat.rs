//! FLAT and VMFS extents: the guest range is a plain byte range of a file,
//! starting at the extent line's offset (in sectors). Bytes past the end of
//! a short file read as zeros; writes extend it.

use std::sync::Arc;

use crate::device::ZeroMode;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{write_zeroes_slow, Storage};

/// An open flat extent.
#[derive(Debug)]
pub(crate) struct FlatExtent {
    /// The extent file.
    pub file: Arc<dyn Storage>,
    /// Byte offset of the extent's first guest byte in the file.
    pub offset: u64,
    /// Guest bytes the extent covers.
    pub len: u64,
}

impl FlatExtent {
    /// A flat extent of `len` bytes at byte `offset` of `file`.
    pub fn new(file: Arc<dyn Storage>, offset: u64, len: u64) -> Result<FlatExtent> {
        offset.checked_add(len).ok_or_else(|| Error::invalid("flat extent offset + size overflows"))?;
        Ok(FlatExtent { file, offset, len })
    }

    /// Host offset of extent byte `rel` (`rel < len`, so no overflow).
    pub fn host(&self, rel: u64) -> u64 {
        self.offset + rel
    }

    /// Reads extent bytes.
    pub fn read(&self, buf: &mut [u8], rel: u64) -> Result<()> {
        self.file.read_at(buf, self.host(rel))
    }

    /// Writes extent bytes.
    pub fn write(&self, buf: &[u8], rel: u64) -> Result<()> {
        self.file.write_at(buf, self.host(rel))
    }

    /// Zeroes extent bytes: punches a hole where allowed and possible.
    pub fn write_zeroes(&self, rel: u64, len: u64, mode: ZeroMode) -> Result<()> {
        if mode == ZeroMode::MayUnmap {
            match self.file.punch_hole(self.host(rel), len) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Unsupported => {}
                Err(e) => return Err(e),
            }
        }
        write_zeroes_slow(&*self.file, self.host(rel), len)
    }
}
