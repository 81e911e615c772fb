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

/// Parses a size as qemu-img does (QEMU's `qemu_strtosz`): a decimal
/// number, optionally with a fraction, followed by at most one suffix
/// letter — `b`/`B` bytes, `k`/`K` KiB, `M`, `G`, `T`, `P`, `E` (powers of
/// 1024, either case) — or a hexadecimal `0x` number without fraction or
/// suffix. A fraction needs a suffix larger than bytes and is truncated to
/// whole bytes (`1.5k` is 1536). Leading blanks are skipped; anything else
/// (`10MB`, `8GiB`, `1e3`, `-1`, trailing blanks) is refused.
pub fn parse(s: &str) -> Result<u64> {
    let bad = || Error::invalid_argument(format!("invalid size '{s}'"));
    let too_large = || Error::invalid_argument(format!("size '{s}' is too large"));
    let t = s.trim_start();
    if t.contains('-') {
        return Err(bad());
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| too_large());
    }
    let int_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if int_end == 0 {
        return Err(bad());
    }
    let int: u64 = t[..int_end].parse().map_err(|_| too_large())?;
    let mut rest = &t[int_end..];
    let mut frac = "";
    if let Some(r) = rest.strip_prefix('.') {
        let fe = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        frac = &r[..fe];
        rest = &r[fe..];
    }
    let shift = match rest {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    let whole = int.checked_mul(1u64 << shift).ok_or_else(too_large)?;
    if frac.bytes().any(|b| b != b'0') {
        if shift == 0 {
            return Err(bad());
        }
        // The fraction's bytes, truncated: frac * 2^shift / 10^digits.
        let mut num = 0u128;
        let mut den = 1u128;
        // 19 digits keep `num` below 2^64, so `num << 60` fits in a u128;
        // further digits cannot change a truncated byte count.
        for c in frac.bytes().take(19) {
            num = num * 10 + u128::from(c - b'0');
            den *= 10;
        }
        let part = (num << shift) / den;
        return whole.checked_add(part as u64).ok_or_else(too_large);
    }
    Ok(whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_img_reads_them() {
        for (text, want) in [
            ("512", 512),
            ("64k", 65536),
            ("1M", 1 << 20),
            ("2G", 2 << 30),
            ("1.5G", 3 << 29),
            ("1b", 1),
            ("1B", 1),
            ("0x100", 256),
            ("0X10", 16),
            ("1.k", 1024),
            ("0.5k", 512),
            ("1.0000001k", 1024),
            ("1.1111k", 1137),
            (" 5k", 5120),
            ("1.0", 1),
            ("0.5000000000000000000000E", 1 << 59),
            ("0.50000000000000000000000000P", 1 << 49),
        ] {
            assert_eq!(parse(text).unwrap(), want, "{text}");
        }
        for text in [
            "x",
            "10MB",
            "8GiB",
            "1e3",
            "5k ",
            "-1",
            "1kk",
            "0x",
            "0x1k",
            "1.5b",
            "00x10",
            "0.5",
            "1.5",
            "",
            "99999999999E",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }
}
