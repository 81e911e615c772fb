//! Sizes the way libvirt reads and prints them.
//!
//! libvirt's scaled integers (`virScaleInteger`, used for XML `unit`
//! attributes and virsh size arguments): a suffix of one letter or the
//! letter plus `iB` is a power of 1024 (`K`, `KiB`, `G`, `GiB`), the letter
//! plus `B` a power of 1000 (`KB`, `GB`), `b`/`byte`/`bytes` is 1, all case
//! insensitive, up to `E`. A size without a unit is bytes.

use crate::error::{Error, Result};

/// The multiplier of a libvirt unit name.
pub fn unit_scale(unit: &str) -> Result<u64> {
    let bad = || {
        Error::invalid_argument(format!(
            "unknown size unit '{}' (B, KB, K, KiB, MB, M, MiB, GB, G, GiB, TB, T, TiB, PB, P, PiB, EB, E, EiB)",
            unit.escape_debug()
        ))
    };
    let u = unit.trim();
    if u.is_empty() || u.eq_ignore_ascii_case("b") || u.eq_ignore_ascii_case("byte") || u.eq_ignore_ascii_case("bytes")
    {
        return Ok(1);
    }
    let mut chars = u.chars();
    let first = chars.next().ok_or_else(bad)?.to_ascii_lowercase();
    let rest = chars.as_str();
    let base: u64 = if rest.is_empty() || rest.eq_ignore_ascii_case("ib") {
        1024
    } else if rest.eq_ignore_ascii_case("b") {
        1000
    } else {
        return Err(bad());
    };
    let power = match first {
        'k' => 1,
        'm' => 2,
        'g' => 3,
        't' => 4,
        'p' => 5,
        'e' => 6,
        _ => return Err(bad()),
    };
    Ok(base.pow(power))
}

/// `number * unit`, refusing overflow.
pub fn scaled(number: u64, unit: &str) -> Result<u64> {
    number
        .checked_mul(unit_scale(unit)?)
        .ok_or_else(|| Error::invalid_argument(format!("size {number} {unit} is too large")))
}

/// Parses a virsh size argument: digits, then an optional unit (`8G`,
/// `1500M`, `10GB`, `512`).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(Error::invalid_argument(format!("invalid size '{}': it must start with digits", s.escape_debug())));
    }
    let n: u64 =
        num.parse().map_err(|_| Error::invalid_argument(format!("invalid size '{}': too large", s.escape_debug())))?;
    scaled(n, unit).map_err(|e| e.context(format!("invalid size '{}'", s.escape_debug())))
}

/// A size as virsh prints it (`vshPrettyCapacity`): two decimals and the
/// largest binary unit below which it stays (`0.00 B`, `1.46 GiB`).
pub fn pretty(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // The largest unit not above the value (EiB at most: u64 ends there).
    let i = (0..UNITS.len()).rev().find(|&i| u128::from(bytes) >= 1u128 << (10 * i)).unwrap_or(0);
    format!("{:.2} {}", bytes as f64 / (1u128 << (10 * i)) as f64, UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virsh_units() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("8gib").unwrap(), 8 << 30);
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("1KB").unwrap(), 1000);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("512B").unwrap(), 512);
        assert_eq!(parse_size("1E").unwrap(), 1 << 60);
        assert_eq!(scaled(3, "bytes").unwrap(), 3);
        for bad in ["", "G", "1X", "1KX", "1.5G", "-1", "99999999999999999999", "16E", "1 Gibibyte"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pretty_like_virsh() {
        assert_eq!(pretty(0), "0.00 B");
        assert_eq!(pretty(1023), "1023.00 B");
        assert_eq!(pretty(1024), "1.00 KiB");
        assert_eq!(pretty(1048576), "1.00 MiB");
        assert_eq!(pretty(1500 << 20), "1.46 GiB");
        assert_eq!(pretty(100 << 30), "100.00 GiB");
        assert_eq!(pretty(u64::MAX), "16.00 EiB");
    }
}
