//! Sizes as people type them. One grammar per dialect, used wherever that
//! dialect is spoken:
//!
//! * [`parse`]: qemu's (`qemu-img create disk 20G`, `-o cluster_size=64k`,
//!   `vdisk io -c 'read 1M 64k'`): `k`/`K`, `M`, `G`, `T`, `P`, `E` are
//!   powers of 1024, optionally followed by `B` or `iB`; fractions such as
//!   `1.5G` when the result is whole bytes; a plain number is bytes.
//! * virsh's (`vol-create-as pool v 10GB`, `<capacity unit='KiB'>`): in
//!   [`crate::pool::units`], where `10GB` is 10^10 and `10G` is 2^30.

use crate::error::{Error, Result};

/// Parses a size with qemu-img's suffixes: `k`/`K` (KiB), `M`, `G`, `T`,
/// `P`, `E`, optionally followed by `B`/`iB`, a plain number being bytes.
/// Fractions such as `1.5G` are accepted when the result is whole bytes.
pub fn parse(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || Error::invalid_argument(format!("invalid size '{s}'"));
    if t.is_empty() {
        return Err(bad());
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let suffix = suffix.trim();
    let suffix = suffix.strip_suffix("iB").or_else(|| suffix.strip_suffix('B')).unwrap_or(suffix);
    let shift = match suffix {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    if let Some((int, frac)) = num.split_once('.') {
        if frac.contains('.') {
            return Err(bad());
        }
        let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
        let mult = 1u128 << shift;
        let mut frac_val = 0u128;
        let mut denom = 1u128;
        for c in frac.chars().take(18) {
            frac_val = frac_val * 10 + u128::from(c.to_digit(10).ok_or_else(bad)?);
            denom *= 10;
        }
        let total = u128::from(int) * mult + frac_val * mult / denom;
        if !(frac_val * mult).is_multiple_of(denom) {
            return Err(Error::invalid_argument(format!("size '{s}' is not a whole number of bytes")));
        }
        return u64::try_from(total).map_err(|_| Error::invalid_argument(format!("size '{s}' is too large")));
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(|| Error::invalid_argument(format!("size '{s}' is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse("512").unwrap(), 512);
        assert_eq!(parse("64k").unwrap(), 65536);
        assert_eq!(parse("1M").unwrap(), 1 << 20);
        assert_eq!(parse("2G").unwrap(), 2 << 30);
        assert_eq!(parse("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse("8GiB").unwrap(), 8 << 30);
        assert!(parse("1.0000001k").is_err());
        assert!(parse("x").is_err());
        assert!(parse("99999999999E").is_err());
    }
}
