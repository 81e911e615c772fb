//! RFC 4122 UUIDs: parsed from and printed as libvirt does, new ones are
//! random (version 4) from `/dev/urandom`.

use std::fmt;
use std::io::Read;

use crate::error::{Error, Result};

/// A 128-bit UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A new random (version 4, variant 1) UUID.
    pub fn new_v4() -> Result<Uuid> {
        let mut b = [0u8; 16];
        random_bytes(&mut b)?;
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Ok(Uuid(b))
    }

    /// Parses 32 hex digits, with or without the four dashes (libvirt
    /// accepts both, and dashes anywhere between pairs).
    pub fn parse(s: &str) -> Result<Uuid> {
        let bad = || Error::invalid_argument(format!("'{}' is not a UUID", s.escape_debug()));
        let t = s.trim();
        let mut out = [0u8; 16];
        let mut n = 0usize;
        let mut hi: Option<u8> = None;
        for c in t.chars() {
            if c == '-' && hi.is_none() {
                continue;
            }
            let v = c.to_digit(16).ok_or_else(bad)? as u8;
            match hi.take() {
                None => hi = Some(v),
                Some(h) => {
                    let slot = out.get_mut(n).ok_or_else(bad)?;
                    *slot = (h << 4) | v;
                    n += 1;
                }
            }
        }
        if n != 16 || hi.is_some() {
            return Err(bad());
        }
        Ok(Uuid(out))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Fills `buf` from `/dev/urandom`.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<()> {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| Error::io("cannot read /dev/urandom", e))
}

/// A random lowercase hex string of `2 * bytes` digits.
pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    random_bytes(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_version() {
        let u = Uuid::new_v4().unwrap();
        let s = u.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(Uuid::parse(&s).unwrap(), u);
        assert_eq!(Uuid::parse(&s.replace('-', "")).unwrap(), u);
        assert_ne!(Uuid::new_v4().unwrap(), u);
        for bad in ["", "xyz", "0123", &format!("{s}00"), &s[..35], "g0000000-0000-4000-8000-000000000000"] {
            assert!(Uuid::parse(bad).is_err(), "{bad}");
        }
    }
}
