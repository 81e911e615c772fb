//! A bounds-checked cursor over a byte slice, for variable-length on-disk
//! structures (header extensions, snapshot tables, markers). Every read that
//! would run past the end is an error naming the structure, never a panic.

use byteorder::{BigEndian, ByteOrder, LittleEndian};

use crate::error::{Error, Result};

/// A cursor over `&[u8]` that cannot panic.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; `what` names the structure in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::invalid(format!(
                "{} is truncated: needs {n} bytes at position {} but only {} remain",
                self.what,
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: usize) -> Result<()> {
        self.take(n).map(|_| ())
    }

    /// A sub-reader over the next `n` bytes.
    pub fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>> {
        Ok(Reader::new(self.take(n)?, what))
    }

    /// Skips to the next multiple of `align` (relative to the start).
    pub fn align(&mut self, align: usize) -> Result<()> {
        let pad = (align - self.pos % align) % align;
        self.skip(pad)
    }

    /// Big-endian u16.
    pub fn be_u16(&mut self) -> Result<u16> {
        Ok(BigEndian::read_u16(self.take(2)?))
    }
    /// Big-endian u32.
    pub fn be_u32(&mut self) -> Result<u32> {
        Ok(BigEndian::read_u32(self.take(4)?))
    }
    /// Big-endian u64.
    pub fn be_u64(&mut self) -> Result<u64> {
        Ok(BigEndian::read_u64(self.take(8)?))
    }
    /// Little-endian u16.
    pub fn le_u16(&mut self) -> Result<u16> {
        Ok(LittleEndian::read_u16(self.take(2)?))
    }
    /// Little-endian u32.
    pub fn le_u32(&mut self) -> Result<u32> {
        Ok(LittleEndian::read_u32(self.take(4)?))
    }
    /// Little-endian u64.
    pub fn le_u64(&mut self) -> Result<u64> {
        Ok(LittleEndian::read_u64(self.take(8)?))
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    /// Fails if bytes are left over.
    pub fn finish(self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(Error::invalid(format!("{} has {} unexpected trailing bytes", self.what, self.remaining())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded() {
        let b = [0u8, 1, 0, 0, 0, 2];
        let mut r = Reader::new(&b, "test");
        assert_eq!(r.be_u16().unwrap(), 1);
        assert_eq!(r.be_u32().unwrap(), 2);
        assert!(r.u8().is_err());
        let mut r = Reader::new(&b, "test");
        r.skip(1).unwrap();
        r.align(4).unwrap();
        assert_eq!(r.pos(), 4);
        assert!(r.align(8).is_err());
    }
}
