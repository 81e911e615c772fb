//! A first look at vdisk: a small qcow2 backing chain built with the
//! library in a temporary directory, then what `info` and `map` say about it.
//!
//! Run it with `cargo run --example image_chain`.

use std::sync::Arc;

use vdisk::qcow2::create::CreateOptions;
use vdisk::{BackingPolicy, BlockDevice, ExtentKind, Format, OpenOptions, Raw};

fn main() -> vdisk::Result<()> {
    let dir = std::env::temp_dir().join(format!("vdisk-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| vdisk::Error::io("cannot create the demo directory", e))?;
    println!("Working in {}\n", dir.display());

    // 1. A 64 MiB raw "golden image" with an OS-like first megabyte.
    let base_path = dir.join("golden.raw");
    let base = Raw::create(Arc::new(vdisk::FileStorage::create(&base_path)?), 64 << 20)?;
    base.write_at(&vec![0xAB; 1 << 20], 0)?;
    base.flush()?;
    drop(base);

    // 2. A qcow2 overlay on it (a linked clone): the backing format is
    //    recorded, so opening it never has to guess.
    let vm_path = dir.join("vm1.qcow2");
    let mut opts = CreateOptions::new(0); // 0: take the backing image's size
    opts.backing_file = Some("golden.raw".into());
    opts.backing_format = Some("raw".into());
    let vm = vdisk::OpenOptions::new().create_qcow2(&vm_path, &opts)?;
    vm.write_at(b"hello from the guest", 4096)?; // copy-on-write of one cluster
    vm.write_at(&vec![0x11; 3 << 20], 8 << 20)?; // new data
    vm.snapshot_create("installed")?; // an internal snapshot
    vm.write_at(&vec![0x22; 1 << 20], 8 << 20)?; // diverge after it
    vm.close()?;

    // 3. Open it the way a careful host does: format named, backing files
    //    followed only with their recorded format.
    let img = OpenOptions::new()
        .format(Format::Qcow2)
        .read_only(true)
        .backing(BackingPolicy::RecordedFormat)
        .open(&vm_path)?;
    let info = img.info();
    println!("image: {}", vm_path.display());
    println!("  format: {}, virtual size: {} MiB", info.format, info.virtual_size >> 20);
    println!(
        "  backing file: {:?} ({:?})",
        info.backing_file.unwrap_or_default(),
        info.backing_format.unwrap_or_default()
    );
    if let vdisk::device::FormatDetails::Qcow2(q) = &info.details {
        println!(
            "  compat {}, cluster size {} KiB, refcount bits {}",
            q.compat,
            info.cluster_size.unwrap_or(0) >> 10,
            q.refcount_bits
        );
        for s in &q.snapshots {
            println!("  snapshot {} \"{}\" of {} MiB", s.id, s.name, s.disk_size >> 20);
        }
    }
    let mut buf = [0u8; 20];
    img.read_at(&mut buf, 4096)?;
    println!("  bytes at 4096: {:?}", String::from_utf8_lossy(&buf));

    // 4. The map: which guest ranges live where.
    println!("\nmap (depth 0 = the overlay, 1 = the backing file):");
    let mut pos = 0;
    while pos < img.size() {
        let e = img.map(pos, u64::MAX)?;
        let what = match e.kind {
            ExtentKind::Data { .. } => "data",
            ExtentKind::Zero { .. } => "zeros",
            ExtentKind::Unallocated => "unallocated",
            ExtentKind::Compressed { .. } => "compressed",
        };
        println!("  {:>10} +{:<10} {what:<12} depth {}", e.offset, e.length, e.depth);
        pos += e.length;
    }
    println!("\nTry: cargo run -- info {}   (and map, check, snapshot -l)", vm_path.display());
    Ok(())
}
