//! Sizes the way libvirt reads and prints them.
//!
//! libvirt's scaled integers (`virScaleInteger`, used for XML `unit`
//! attributes and virsh size arguments): a suffix of one letter or the
//! letter plus `iB` is a power of 1024 (`K`, `KiB`, `G`, `GiB`), the letter
//! plus `B` a power of 1000 (`KB`, `GB`), `b`/`byte`/`bytes` is 1, all case
//! insensitive, up to `E`. A size without a unit is bytes.
//!
//! This is the one place the pool layer reads sizes: the `<capacity>`,
//! `<allocation>` and `<clusterSize>` of pool and volume XML
//! ([`def::scaled_element`](super::def::scaled_element)) and virsh's size
//! arguments ([`parse_size`]). Every error names the value and the unit.

use crate::error::{Error, Result};

/// The units [`unit_scale`] knows, for error messages.
const UNITS: &str = "B, KB, K, KiB, MB, M, MiB, GB, G, GiB, TB, T, TiB, PB, P, PiB, EB, E, EiB";

/// The multiplier of a libvirt unit name.
pub fn unit_scale(unit: &str) -> Result<u64> {
    let bad = || Error::invalid_argument(format!("unknown size unit '{}' ({UNITS})", unit.escape_debug()));
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

/// How a value and its separate unit are named in errors:
/// `'8' (unit 'G')`.
fn with_unit(number: &str, unit: &str) -> String {
    let unit = unit.trim();
    format!("'{}' (unit '{}')", number.escape_debug(), if unit.is_empty() { "bytes" } else { unit }.escape_debug())
}

fn invalid(shown: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("invalid size {shown}: {why}"))
}

/// Parses `number` (decimal digits; white space around them and a leading
/// `+` allowed) in `unit`. `shown` names the value and its unit in errors.
fn parse_in(number: &str, unit: &str, shown: &str) -> Result<u64> {
    let n: u64 = number.trim().parse().map_err(|e: std::num::ParseIntError| match e.kind() {
        std::num::IntErrorKind::PosOverflow => invalid(shown, format!("it is more than {} bytes", u64::MAX)),
        _ => invalid(shown, "it is not a non-negative integer"),
    })?;
    scale_in(n, unit, shown)
}

/// `number * unit`; `shown` names the value and its unit in errors.
fn scale_in(number: u64, unit: &str, shown: &str) -> Result<u64> {
    let scale = unit_scale(unit).map_err(|e| invalid(shown, e.message()))?;
    number.checked_mul(scale).ok_or_else(|| invalid(shown, format!("it is more than {} bytes", u64::MAX)))
}

/// `number * unit`, refusing an unknown unit and overflow (errors name
/// the number and the unit).
pub fn scaled(number: u64, unit: &str) -> Result<u64> {
    scale_in(number, unit, &with_unit(&number.to_string(), unit))
}

/// Parses libvirt's scaled integer, a `number` with its `unit` given apart
/// (an empty unit is bytes), as in `<capacity unit='G'>8</capacity>`.
/// Errors name the number and the unit.
pub fn parse_scaled(number: &str, unit: &str) -> Result<u64> {
    parse_in(number, unit, &with_unit(number, unit))
}

/// Parses a virsh size argument: digits, then an optional unit (`8G`,
/// `1500M`, `10GB`, `512`). Errors name the argument and its unit.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shown = format!("'{}'", s.escape_debug());
    if num.is_empty() {
        return Err(Error::invalid_argument(format!("invalid size {shown}: it must start with digits")));
    }
    parse_in(num, unit, &shown)
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
    fn errors_name_the_value_and_the_unit() {
        let msg = |r: Result<u64>| r.unwrap_err().to_string();
        assert_eq!(msg(parse_size("1Q")), format!("invalid size '1Q': unknown size unit 'Q' ({UNITS})"));
        assert_eq!(msg(parse_size("16E")), format!("invalid size '16E': it is more than {} bytes", u64::MAX));
        assert_eq!(msg(parse_size("G")), "invalid size 'G': it must start with digits");
        assert_eq!(
            msg(parse_size("99999999999999999999")),
            format!("invalid size '99999999999999999999': it is more than {} bytes", u64::MAX)
        );
        assert_eq!(
            msg(parse_scaled("1", "Q")),
            format!("invalid size '1' (unit 'Q'): unknown size unit 'Q' ({UNITS})")
        );
        assert_eq!(msg(parse_scaled("-1", "")), "invalid size '-1' (unit 'bytes'): it is not a non-negative integer");
        assert_eq!(msg(parse_scaled("x", "KiB")), "invalid size 'x' (unit 'KiB'): it is not a non-negative integer");
        assert_eq!(
            msg(scaled(16, "EiB")),
            format!("invalid size '16' (unit 'EiB'): it is more than {} bytes", u64::MAX)
        );
        assert_eq!(parse_scaled(" 8 ", "G").unwrap(), 8 << 30);
        assert_eq!(parse_scaled("8", "").unwrap(), 8);
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
