//! qemu-made images cut at many lengths: opening and reading give errors (or,
//! where the cut only removed data that QEMU would also read as zeros, plain
//! zeros), never a panic. A cut through the header, the L1 table or the
//! refcount table is always an error at open.

mod common;

use common::*;
use vdisk::{BackingPolicy, Format, OpenOptions};

fn images(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for (name, opts) in [
        ("v3", "cluster_size=65536"),
        ("v2-512", "compat=0.10,cluster_size=512"),
        ("extl2", "extended_l2=on,cluster_size=16k"),
        ("zstd", "compression_type=zstd,cluster_size=4096"),
    ] {
        let img = p(dir, &format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, img.to_str().unwrap(), "2M"]);
        let mut cmds = vec!["write -P 0x11 1000 300000".to_string(), "write -z 700000 100000".to_string()];
        if !name.starts_with("v2") {
            cmds.insert(0, "write -c -P 0x22 1M 64k".to_string());
        }
        qemu_io("qcow2", &img, &cmds);
        if name == "v3" {
            qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
            qemu_io("qcow2", &img, &["write -P 0x33 0 64k".into()]);
        }
        out.push(img);
    }
    out
}

/// The `fixed` cut lengths plus 39 evenly spread ones, each below `len`,
/// sorted, once each.
fn cut_points(mut fixed: Vec<usize>, len: usize) -> Vec<usize> {
    fixed.extend((1..40).map(|i| len * i / 40));
    fixed.retain(|&c| c < len);
    fixed.sort_unstable();
    fixed.dedup();
    fixed
}

/// Reads the whole device in 1 MiB pieces and walks its map: errors are
/// fine, panics are not.
fn read_and_map(dev: &dyn vdisk::BlockDevice) {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < dev.size() {
        let n = (dev.size() - pos).min(buf.len() as u64) as usize;
        let _ = dev.read_at(&mut buf[..n], pos);
        pos += n as u64;
    }
    let mut pos = 0;
    while pos < dev.size() {
        match dev.map(pos, u64::MAX) {
            Ok(e) => pos += e.length.max(1),
            Err(_) => break,
        }
    }
    let _ = dev.info();
}

fn be(bytes: &[u8], off: usize, w: usize) -> u64 {
    let mut b = [0u8; 8];
    b[8 - w..].copy_from_slice(&bytes[off..off + w]);
    u64::from_be_bytes(b)
}

#[test]
fn truncated_images_never_panic() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    for img in images(dir.path()) {
        let bytes = std::fs::read(&img).unwrap();
        let len = bytes.len();
        let cs = 1usize << be(&bytes, 20, 4);
        let l1_end = be(&bytes, 40, 8) as usize + be(&bytes, 36, 4) as usize * 8;
        let rt_end = be(&bytes, 48, 8) as usize + be(&bytes, 56, 4) as usize * cs;
        let mut fixed = vec![0, 1, 4, 8, 20, 71, 72, 100, 104, 111, 112, 200, 511, 512, 4096];
        fixed.extend([cs - 1, cs, cs + 1, l1_end - 1, l1_end, rt_end - 1, rt_end, len - 1]);
        for cut in cut_points(fixed, len) {
            let path = p(dir.path(), "cut.qcow2");
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let r = OpenOptions::new().format(Format::Qcow2).read_only(true).backing(BackingPolicy::Never).open(&path);
            let must_fail = cut < cs.min(112) || cut < l1_end || cut < rt_end;
            match r {
                Err(e) => assert!(!e.to_string().is_empty()),
                Ok(dev) => {
                    assert!(!must_fail, "{}: cut at {cut} opened", img.display());
                    read_and_map(&dev);
                }
            }
        }
    }
}

/// vmdk images (qemu-img's monolithicSparse and streamOptimized, and
/// vdisk's streamOptimized in VMware's footer layout) cut at many lengths:
/// errors, never a panic. A cut through the sparse header or the embedded
/// descriptor is always an error at open.
#[test]
fn truncated_vmdk_images_never_panic() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let src = p(dir.path(), "src.raw");
    let mut data = vec![0u8; 4 << 20];
    for (i, b) in data.iter_mut().enumerate().take(3 << 20) {
        *b = (i / 4096) as u8 ^ (i % 251) as u8;
    }
    std::fs::write(&src, &data).unwrap();
    let mut images = Vec::new();
    for sub in ["monolithicSparse", "streamOptimized"] {
        let img = p(dir.path(), &format!("{sub}.vmdk"));
        qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        images.push(img);
    }
    let ours = p(dir.path(), "ours.vmdk");
    let (code, o, e) = vdisk(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        src.to_str().unwrap(),
        ours.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{o}{e}");
    images.push(ours);
    for img in images {
        let bytes = std::fs::read(&img).unwrap();
        let len = bytes.len();
        let u32le = |off: usize| u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        let u64le = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap()) as usize;
        // descriptorOffset and descriptorSize (sectors) of the sparse header.
        let desc_end = (u64le(28) + u64le(36)) * 512;
        assert_eq!(u32le(0), 0x564d_444b, "{}: not a sparse vmdk", img.display());
        let fixed = vec![0, 1, 4, 77, 511, 512, 513, desc_end - 1, desc_end, len - 512, len - 1];
        for cut in cut_points(fixed, len) {
            let path = p(dir.path(), "cut.vmdk");
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let r = OpenOptions::new().format(Format::Vmdk).read_only(true).backing(BackingPolicy::Never).open(&path);
            match r {
                Err(e) => assert!(!e.to_string().is_empty()),
                Ok(dev) => {
                    assert!(
                        cut >= desc_end,
                        "{}: cut at {cut} (inside the header or descriptor) opened",
                        img.display()
                    );
                    read_and_map(&dev);
                }
            }
        }
    }
}
