//! vmdk open is as strict as QEMU 10's `block/vmdk.c`: each test takes a
//! valid image made by `qemu-img create -f vmdk` (or by vdisk), pokes one
//! field, and checks that vdisk refuses it with the right kind and an error
//! naming the field and its value, and that QEMU refuses it too.

#[path = "vmdk_common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use vdisk::vmdk::{VmdkCreateOptions, VmdkOptions};
use vdisk::{ErrorKind, FileStorage, Vmdk};

/// Opens `path` read-only with vdisk.
fn vopen(path: &Path) -> vdisk::Result<Vmdk> {
    let f = Arc::new(FileStorage::open(path, true)?);
    Vmdk::open(f, VmdkOptions { read_only: true, ..Default::default() })
}

/// Whether QEMU opens `path` as vmdk.
fn qemu_opens(path: &Path) -> bool {
    try_run("qemu-img", &["info", "-f", "vmdk", &path.display().to_string()]).0
}

/// Asserts that vdisk refuses `path` with `kind`, naming `field` and
/// `value`, and that QEMU refuses it too.
fn assert_refused(path: &Path, kind: ErrorKind, field: &str, value: &str) -> vdisk::Error {
    let e = vdisk_refuses(path, kind, field, value);
    assert!(!qemu_opens(path), "QEMU opens {}, vdisk refuses it: {e}", path.display());
    e
}

/// Asserts that vdisk refuses `path` with `kind`, naming `field` and `value`.
fn vdisk_refuses(path: &Path, kind: ErrorKind, field: &str, value: &str) -> vdisk::Error {
    let e = match vopen(path) {
        Ok(_) => panic!("vdisk opened {}", path.display()),
        Err(e) => e,
    };
    let s = e.to_string();
    assert_eq!(e.kind(), kind, "{s}");
    assert_eq!(e.field(), Some(field), "{s}");
    assert!(s.contains(&format!("field {field}")), "{s}");
    assert!(s.contains(value), "the message does not name the value '{value}': {s}");
    e
}

/// Asserts that both vdisk and QEMU open `path`.
fn assert_opens(path: &Path) {
    if let Err(e) = vopen(path) {
        panic!("vdisk refuses {}: {e}", path.display());
    }
    assert!(qemu_opens(path), "QEMU refuses {}", path.display());
}

fn qemu_create(path: &Path, size: &str, subformat: &str) {
    let opt = format!("subformat={subformat}");
    run("qemu-img", &["create", "-q", "-f", "vmdk", "-o", &opt, &path.display().to_string(), size]);
}

/// A 1 MiB monolithicFlat image made by qemu-img; returns its descriptor path.
fn flat_image(dir: &Path) -> PathBuf {
    let p = dir.join("f.vmdk");
    qemu_create(&p, "1M", "monolithicFlat");
    p
}

/// Rewrites the text of a stand-alone descriptor.
fn edit_text(path: &Path, f: impl FnOnce(String) -> String) {
    let t = std::fs::read_to_string(path).unwrap();
    let n = f(t.clone());
    assert_ne!(t, n, "the edit changed nothing");
    std::fs::write(path, n).unwrap();
}

/// Rewrites the descriptor embedded at sector 1 (20 sectors) of a
/// monolithicSparse image made by qemu-img.
fn edit_embedded(path: &Path, f: impl FnOnce(String) -> String) {
    let mut b = std::fs::read(path).unwrap();
    let area = &b[512..512 + 20 * 512];
    let end = area.iter().position(|&x| x == 0).unwrap();
    let t = String::from_utf8(area[..end].to_vec()).unwrap();
    let n = f(t.clone());
    assert_ne!(t, n, "the edit changed nothing");
    assert!(n.len() < 20 * 512);
    b[512..512 + 20 * 512].fill(0);
    b[512..512 + n.len()].copy_from_slice(n.as_bytes());
    std::fs::write(path, b).unwrap();
}

/// Writes `val` little-endian at byte `off` of the file.
fn poke(path: &Path, off: usize, val: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[off..off + val.len()].copy_from_slice(val);
    std::fs::write(path, b).unwrap();
}

fn sparse_image(dir: &Path) -> PathBuf {
    let p = dir.join("s.vmdk");
    qemu_create(&p, "4M", "monolithicSparse");
    assert_opens(&p);
    p
}

// ---------------------------------------------------------------------------
// Extent lines (vmdk_parse_extents)

#[test]
fn flat_extent_without_offset() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = flat_image(dir.path());
    assert_opens(&p);
    edit_text(&p, |t| t.replace("FLAT \"f-flat.vmdk\" 0", "FLAT \"f-flat.vmdk\""));
    let e = assert_refused(&p, ErrorKind::InvalidImage, "offset", "RW 2048 FLAT \"f-flat.vmdk\"");
    assert!(e.to_string().contains("needs an offset"), "{e}");
}

#[test]
fn vmfs_extent_with_offset() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = flat_image(dir.path());
    // Without an offset, a VMFS extent opens in both.
    edit_text(&p, |t| {
        t.replace("createType=\"monolithicFlat\"", "createType=\"vmfs\"")
            .replace("FLAT \"f-flat.vmdk\" 0", "VMFS \"f-flat.vmdk\"")
    });
    assert_opens(&p);
    // Even an offset of 0 is refused.
    edit_text(&p, |t| t.replace("VMFS \"f-flat.vmdk\"", "VMFS \"f-flat.vmdk\" 0"));
    let e = assert_refused(&p, ErrorKind::InvalidImage, "offset", "VMFS extent has offset '0'");
    assert!(e.to_string().contains("only FLAT extents take an offset"), "{e}");
}

#[test]
fn sparse_extent_with_offset() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.vmdk");
    qemu_create(&p, "4M", "twoGbMaxExtentSparse");
    assert_opens(&p);
    edit_text(&p, |t| t.replace("SPARSE \"t-s001.vmdk\"", "SPARSE \"t-s001.vmdk\" 0"));
    assert_refused(&p, ErrorKind::InvalidImage, "offset", "SPARSE extent has offset '0'");
}

// ---------------------------------------------------------------------------
// createType of a stand-alone descriptor (vmdk_open_desc_file)

#[test]
fn create_type_unknown() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = flat_image(dir.path());
    edit_text(&p, |t| t.replace("\"monolithicFlat\"", "\"fullDevice\""));
    assert_refused(&p, ErrorKind::Unsupported, "createType", "'fullDevice'");
}

#[test]
fn create_type_wrong_case() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = flat_image(dir.path());
    edit_text(&p, |t| t.replace("\"monolithicFlat\"", "\"MonolithicFlat\""));
    let e = assert_refused(&p, ErrorKind::Unsupported, "createType", "'MonolithicFlat'");
    assert!(e.to_string().contains("case-sensitive"), "{e}");
}

#[test]
fn create_type_monolithic_sparse_in_standalone_descriptor() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.vmdk");
    qemu_create(&p, "4M", "twoGbMaxExtentSparse");
    edit_text(&p, |t| t.replace("\"twoGbMaxExtentSparse\"", "\"monolithicSparse\""));
    assert_refused(&p, ErrorKind::InvalidImage, "createType", "'monolithicSparse'");
}

#[test]
fn create_type_stream_optimized_in_standalone_descriptor() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.vmdk");
    qemu_create(&p, "4M", "twoGbMaxExtentSparse");
    edit_text(&p, |t| t.replace("\"twoGbMaxExtentSparse\"", "\"streamOptimized\""));
    assert_refused(&p, ErrorKind::InvalidImage, "createType", "'streamOptimized'");
}

#[test]
fn create_type_unquoted() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = flat_image(dir.path());
    edit_text(&p, |t| t.replace("\"monolithicFlat\"", "monolithicFlat"));
    assert_refused(&p, ErrorKind::InvalidImage, "createType", "'monolithicFlat' is not in double quotes");
}

#[test]
fn create_type_missing() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = flat_image(dir.path());
    edit_text(&p, |t| t.replace("createType=\"monolithicFlat\"\n", ""));
    assert_refused(&p, ErrorKind::InvalidImage, "createType", "no createType");
}

#[test]
fn create_types_qemu_opens_still_open() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    for sub in ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"] {
        let p = dir.path().join(format!("{sub}.vmdk"));
        qemu_create(&p, "5M", sub);
        assert_opens(&p);
    }
    let p = dir.path().join("zg.vmdk");
    run("qemu-img", &["create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", &p.display().to_string(), "5M"]);
    assert_opens(&p);
    // twoGbMaxExtentFlat relabelled with the other names QEMU accepts.
    let p = dir.path().join("twoGbMaxExtentFlat.vmdk");
    for ct in ["monolithicFlat", "vmfs"] {
        let t = std::fs::read_to_string(&p).unwrap();
        let start = t.find("createType=\"").unwrap() + 12;
        let end = start + t[start..].find('"').unwrap();
        std::fs::write(&p, format!("{}{ct}{}", &t[..start], &t[end..])).unwrap();
        assert_opens(&p);
    }
}

// ---------------------------------------------------------------------------
// parentFileNameHint (vmdk_parent_open)

#[test]
fn parent_hint_too_long() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_image(dir.path());
    let orig = std::fs::read(&p).unwrap();
    let with_hint = |n: usize| {
        std::fs::write(&p, &orig).unwrap();
        edit_embedded(&p, |t| {
            t.replace("createType=", &format!("parentFileNameHint=\"{}\"\ncreateType=", "a".repeat(n)))
        });
    };
    with_hint(4095);
    assert_opens(&p);
    with_hint(4096);
    let e = assert_refused(&p, ErrorKind::LimitExceeded, "parentFileNameHint", "4096 bytes");
    assert!(e.to_string().contains("longer than 4095"), "{e}");
}

#[test]
fn parent_hint_unquoted() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = flat_image(dir.path());
    let orig = std::fs::read_to_string(&p).unwrap();
    // With no quote after it, QEMU refuses the hint (vmdk_parent_open: EINVAL).
    edit_text(&p, |t| format!("{t}parentFileNameHint=base.vmdk\n"));
    assert_refused(&p, ErrorKind::InvalidImage, "parentFileNameHint", "'base.vmdk' is not in double quotes");
    // With a quote later in the file, QEMU skips the first character and
    // reads up to that quote: its parent would be "ase.vmdk\ncreateType=".
    // vdisk refuses rather than disagree with QEMU about the parent.
    std::fs::write(&p, orig.replace("createType=", "parentFileNameHint=base.vmdk\ncreateType=")).unwrap();
    vdisk_refuses(&p, ErrorKind::InvalidImage, "parentFileNameHint", "'base.vmdk' is not in double quotes");
    let (ok, info) = try_run("qemu-img", &["info", "-f", "vmdk", &p.display().to_string()]);
    assert!(ok && info.contains("backing file: ase.vmdk"), "{info}");
}

// ---------------------------------------------------------------------------
// The sparse header (vmdk_open_vmdk4)

#[test]
fn overhead_past_end_of_file() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_image(dir.path());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 128 * 512);
    // overHead (offset 64) equal to the file's sectors opens; one more does not.
    poke(&p, 64, &128u64.to_le_bytes());
    assert_opens(&p);
    poke(&p, 64, &129u64.to_le_bytes());
    let e = assert_refused(&p, ErrorKind::InvalidImage, "overHead", "129 sectors");
    assert_eq!(e.offset(), Some(129 * 512));
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn truncated_sparse_file() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_image(dir.path());
    // The header, descriptor and both grain directories and tables are in
    // the first 64 sectors; the grains would start at sector 128.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(64 * 512).unwrap();
    drop(f);
    assert_refused(&p, ErrorKind::InvalidImage, "overHead", "overHead of 128 sectors");
}

#[test]
fn capacity_zero_with_embedded_descriptor() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_image(dir.path());
    poke(&p, 12, &0u64.to_le_bytes());
    let e = assert_refused(&p, ErrorKind::Unsupported, "capacity", "capacity 0");
    assert!(e.to_string().contains("sector 1"), "{e}");
}

#[test]
fn sparse_header_fields_qemu_refuses() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_image(dir.path());
    let orig = std::fs::read(&p).unwrap();
    // (offset, bytes, kind, field, value in the message)
    let cases: Vec<(usize, Vec<u8>, ErrorKind, &str, &str)> = vec![
        (4, 4u32.to_le_bytes().to_vec(), ErrorKind::Unsupported, "version", "version 4"),
        (44, 513u32.to_le_bytes().to_vec(), ErrorKind::InvalidImage, "numGTEsPerGT", "513"),
        (44, 0u32.to_le_bytes().to_vec(), ErrorKind::InvalidImage, "numGTEsPerGT", "0 grain table entries"),
        (20, 0u64.to_le_bytes().to_vec(), ErrorKind::InvalidImage, "grainSize", "grain size of 0"),
        (20, (1u64 << 22).to_le_bytes().to_vec(), ErrorKind::InvalidImage, "grainSize", "4194304"),
    ];
    for (off, val, kind, field, value) in cases {
        std::fs::write(&p, &orig).unwrap();
        poke(&p, off, &val);
        assert_refused(&p, kind, field, value);
    }
}

#[test]
fn stream_footer_checked() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("so.vmdk");
    let opts = VmdkCreateOptions::parse("subformat=streamOptimized").unwrap();
    Vmdk::create(&p, 4 << 20, &opts).unwrap().close().unwrap();
    assert_opens(&p);
    let orig = std::fs::read(&p).unwrap();
    let len = orig.len();
    // The footer's magic (sector len - 1024).
    poke(&p, len - 1024, b"XDMV");
    let e = assert_refused(&p, ErrorKind::InvalidImage, "magicNumber", "0x564d4458");
    assert!(e.to_string().contains("footer"), "{e}");
    // The footer marker's type (bytes 12..16 of sector len - 1536).
    std::fs::write(&p, &orig).unwrap();
    poke(&p, len - 1536 + 12, &2u32.to_le_bytes());
    let e = assert_refused(&p, ErrorKind::InvalidImage, "footerMarker", "type 2");
    assert_eq!(e.offset(), Some(len as u64 - 1536));
    // The end-of-stream marker's size (bytes 8..12 of the last sector).
    std::fs::write(&p, &orig).unwrap();
    poke(&p, len - 512 + 8, &7u32.to_le_bytes());
    let e = assert_refused(&p, ErrorKind::InvalidImage, "endOfStreamMarker", "size 7");
    assert_eq!(e.offset(), Some(len as u64 - 512));
}
