//! Header extensions: the typed list after the fixed header fields
//! (backing format, feature name table, bitmaps, encryption header pointer,
//! external data file name, and unknown ones kept verbatim).
//!
//! Spec: QEMU `docs/interop/qcow2.txt`, "Header extensions"; limits
//! mirror `qcow2_read_extensions`.

use byteorder::{BigEndian, ByteOrder};

use super::header::{
    bad, hbad, BitmapsExt, FeatureName, Header, HeaderField, AUTOCLEAR_BITMAPS, EXT_BACKING_FORMAT, EXT_BITMAPS,
    EXT_CRYPTO, EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE,
};
use crate::error::{Error, Result};
use crate::limits::*;
use crate::reader::Reader;

impl Header {
    /// Parses the extension area of cluster 0 (`buf`): from the end of the
    /// fixed header to the backing file name, or to the end of the cluster.
    pub(super) fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let cluster_size = self.cluster_size();
        // The extension area ends at the backing file name, if there is one,
        // else at the end of the first cluster.
        if self.backing_file_offset > cluster_size {
            return Err(hbad(
                HeaderField::BackingFileOffset,
                format!("backing file offset {} is past the first cluster", self.backing_file_offset),
            ));
        }
        let end = if self.backing_file_offset != 0 { self.backing_file_offset } else { cluster_size } as usize;
        let mut off = self.header_length as usize;
        let mut unknown_total = 0usize;
        while off < end {
            if end - off < 8 {
                return Err(
                    bad("header_extension", format!("header extension at {off} is too large")).with_offset(off as u64)
                );
            }
            let ty = BigEndian::read_u32(&buf[off..off + 4]);
            let len = BigEndian::read_u32(&buf[off + 4..off + 8]) as usize;
            off += 8;
            if ty == EXT_END {
                break;
            }
            if len > end - off {
                return Err(bad(
                    "header_extension",
                    format!("header extension {ty:#010x} of length {len} runs past the extension area"),
                )
                .with_offset(off as u64 - 8));
            }
            let data = &buf[off..off + len];
            match ty {
                EXT_BACKING_FORMAT => {
                    if len as u32 > QCOW2_MAX_BACKING_FORMAT {
                        return Err(bad(
                            "backing_format",
                            format!(
                                "backing format extension is {len} bytes long (at most {QCOW2_MAX_BACKING_FORMAT})"
                            ),
                        )
                        .with_offset(off as u64));
                    }
                    let s = std::str::from_utf8(data)
                        .map_err(|_| bad("backing_format", "backing format is not UTF-8".into()))?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                EXT_FEATURE_TABLE => {
                    self.feature_names.clear();
                    for e in data.chunks_exact(48) {
                        let raw = &e[2..48];
                        let n = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            // Names are ASCII (QEMU's are); any other byte
                            // becomes '?', one byte for one, so the table
                            // is written back unchanged in length.
                            name: raw[..n]
                                .iter()
                                .map(|&b| if b.is_ascii_graphic() || b == b' ' { char::from(b) } else { '?' })
                                .collect(),
                        });
                    }
                }
                EXT_BITMAPS => {
                    let mut r = Reader::new(data, "bitmaps extension");
                    let nb_bitmaps = r.be_u32()?;
                    let reserved = r.be_u32()?;
                    let directory_size = r.be_u64()?;
                    let directory_offset = r.be_u64()?;
                    let ext = BitmapsExt { nb_bitmaps, directory_size, directory_offset };
                    // qemu ignores the extension when the autoclear bit is clear.
                    if self.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
                        if nb_bitmaps == 0 || nb_bitmaps > QCOW2_MAX_BITMAPS {
                            return Err(bad("bitmaps", format!("bitmaps extension has {nb_bitmaps} bitmaps")));
                        }
                        if reserved != 0 {
                            return Err(bad("bitmaps", "bitmaps extension reserved field is not zero".into()));
                        }
                        if directory_size > QCOW2_MAX_BITMAP_DIRECTORY {
                            return Err(bad(
                                "bitmaps",
                                format!("bitmap directory of {directory_size} bytes is too large"),
                            ));
                        }
                        if directory_offset % cluster_size != 0 {
                            return Err(bad(
                                "bitmaps",
                                format!("bitmap directory offset {directory_offset:#x} is not cluster aligned"),
                            ));
                        }
                    }
                    self.bitmaps = Some(ext);
                }
                EXT_CRYPTO => {
                    let mut r = Reader::new(data, "encryption header extension");
                    let o = r.be_u64()?;
                    let l = r.be_u64()?;
                    self.crypto_header = Some((o, l));
                }
                EXT_DATA_FILE => {
                    let s = std::str::from_utf8(data)
                        .map_err(|_| bad("data_file", "external data file name is not UTF-8".into()))?;
                    if s.contains('\0') {
                        return Err(bad("data_file", "external data file name contains a NUL byte".into()));
                    }
                    self.data_file = Some(s.to_string());
                }
                _ => {
                    unknown_total += len;
                    if unknown_total > cluster_size as usize {
                        return Err(Error::internal("unknown extension total exceeds a cluster"));
                    }
                    self.unknown_extensions.push((ty, data.to_vec()));
                }
            }
            off += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Appends the header extensions (ending with the end marker) to the
    /// encoded header `b`; the feature name table is left out when asked.
    pub(super) fn encode_extensions(&self, b: &mut Vec<u8>, skip_feature_table: bool) {
        let push_ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            let mut h = [0u8; 8];
            BigEndian::write_u32(&mut h[0..4], ty);
            BigEndian::write_u32(&mut h[4..8], data.len() as u32);
            b.extend_from_slice(&h);
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            push_ext(b, EXT_DATA_FILE, f.as_bytes());
        }
        if let Some((o, l)) = self.crypto_header {
            let mut d = [0u8; 16];
            BigEndian::write_u64(&mut d[0..8], o);
            BigEndian::write_u64(&mut d[8..16], l);
            push_ext(b, EXT_CRYPTO, &d);
        }
        if let Some(bm) = self.bitmaps {
            let mut d = [0u8; 24];
            BigEndian::write_u32(&mut d[0..4], bm.nb_bitmaps);
            BigEndian::write_u64(&mut d[8..16], bm.directory_size);
            BigEndian::write_u64(&mut d[16..24], bm.directory_offset);
            push_ext(b, EXT_BITMAPS, &d);
        }
        if self.version == 3 && !self.feature_names.is_empty() && !skip_feature_table {
            let mut d = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.as_bytes();
                let n = &n[..n.len().min(46)];
                e[2..2 + n.len()].copy_from_slice(n);
                d.extend_from_slice(&e);
            }
            push_ext(b, EXT_FEATURE_TABLE, &d);
        }
        for (ty, data) in &self.unknown_extensions {
            push_ext(b, *ty, data);
        }
        push_ext(b, EXT_END, &[]);
    }

    /// The feature name table qemu writes on every v3 image.
    pub fn default_feature_names() -> Vec<FeatureName> {
        let f = |kind: u8, bit: u8, name: &str| FeatureName { kind, bit, name: name.to_string() };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}
