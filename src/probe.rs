//! Format probing by magic, opt-in only.
//!
//! Probing a file a guest can write is dangerous: a guest may write a qcow2
//! header naming a host file as its backing file into its raw disk, and a
//! host that later probes the disk would open that host file for the guest.
//! vdisk therefore probes only when the caller asks, never when the caller
//! named a format, and never follows backing files of a probed image unless
//! the caller's backing policy says so.

use crate::device::Format;
use crate::error::Result;
use crate::storage::Storage;

/// How many leading bytes [`probe_bytes`] looks at.
pub const PROBE_LEN: usize = 2048;

/// Guesses the format from the first bytes of a file. Anything unrecognised
/// is raw.
pub fn probe_bytes(head: &[u8]) -> Format {
    if head.len() >= 8 && head[0..4] == *b"QFI\xfb" {
        let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if version >= 2 {
            return Format::Qcow2;
        }
    }
    if head.len() >= 4 && (head[0..4] == *b"KDMV" || head[0..4] == *b"COWD") {
        return Format::Vmdk;
    }
    if head.len() >= 8 && head[0..8] == *b"conectix" {
        return Format::Vpc;
    }
    if head.len() >= 0x44 && head[0x40..0x44] == crate::vdi::header::SIGNATURE.to_le_bytes() {
        return Format::Vdi;
    }
    if head.len() >= 8 && head[0..8] == *b"vhdxfile" {
        return Format::Vhdx;
    }
    if looks_like_vmdk_descriptor(head) {
        return Format::Vmdk;
    }
    if crate::crypto::luks1::is_luks(head) {
        return Format::Luks;
    }
    Format::Raw
}

/// Whether the text starts (after comments and blank lines) with
/// `version=1|2|3`, like a stand-alone vmdk descriptor.
fn looks_like_vmdk_descriptor(head: &[u8]) -> bool {
    let mut rest = head;
    loop {
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let trimmed: &[u8] = {
            let s = line.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(line.len());
            &line[s..]
        };
        if trimmed.is_empty() || trimmed[0] == b'#' {
            if next.is_empty() {
                return false;
            }
            rest = next;
            continue;
        }
        return matches!(trimmed, b"version=1" | b"version=2" | b"version=3")
            || (trimmed.starts_with(b"version=") && trimmed.len() == 9 && (b'1'..=b'3').contains(&trimmed[8]));
    }
}

/// Probes the format of `storage` by its first bytes.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let mut head = vec![0u8; PROBE_LEN];
    let len = storage.len()?;
    let n = (len as usize).min(PROBE_LEN);
    storage.read_at(&mut head[..n], 0)?;
    head.truncate(n);
    Ok(probe_bytes(&head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes() {
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x03"), Format::Qcow2);
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x01"), Format::Raw);
        assert_eq!(probe_bytes(b"KDMV...."), Format::Vmdk);
        assert_eq!(probe_bytes(b"# Disk DescriptorFile\r\nversion=1\r\n"), Format::Vmdk);
        assert_eq!(probe_bytes(b"\n\n# x\nversion=2\n"), Format::Vmdk);
        assert_eq!(probe_bytes(b"version=4\n"), Format::Raw);
        assert_eq!(probe_bytes(b""), Format::Raw);
        assert_eq!(probe_bytes(b"conectix\0\0\0\x02"), Format::Vpc);
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe_bytes(&vdi), Format::Vdi);
        assert_eq!(probe_bytes(b"vhdxfile\0\0"), Format::Vhdx);
        assert_eq!(probe_bytes(b"vhdxfil"), Format::Raw);
        assert_eq!(probe_bytes(&[0u8; 512]), Format::Raw);
    }
}
