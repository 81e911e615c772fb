#![allow(missing_docs)] // criterion_group! generates undocumented items
//! A fully allocated 256 MiB dynamic VHDX (32 MiB blocks) against the same
//! data in a raw file, in the same run: sequential 1 MiB reads and random
//! 4 KiB reads, printed as vhdx/raw throughput ratios (goal: at least 0.9);
//! then VHDX -> qcow2 conversion, `vdisk::convert` against
//! `qemu-img convert -t writeback` of the same image (goal: at least 1.2x).
//! `VDISK_BENCH_MIB` sets the image size.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vdisk::{BlockDevice, FileStorage, Raw, Vhdx, VhdxCreateOptions, VhdxOptions};

const CHUNK: usize = 1 << 20;

fn size() -> u64 {
    std::env::var("VDISK_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(256u64) << 20
}

fn fill(dev: &dyn BlockDevice) {
    let mut buf = vec![0u8; CHUNK];
    for (i, off) in (0..dev.size()).step_by(CHUNK).enumerate() {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = (i ^ j) as u8 | 1;
        }
        dev.write_at(&buf, off).unwrap();
    }
    dev.flush().unwrap();
}

fn seq(dev: &dyn BlockDevice, buf: &mut [u8]) {
    for off in (0..dev.size()).step_by(CHUNK) {
        dev.read_at(buf, off).unwrap();
    }
    black_box(&buf);
}

fn offsets(n: usize, size: u64) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size / 4096)) * 4096
        })
        .collect()
}

fn rand(dev: &dyn BlockDevice, offs: &[u64]) {
    let mut b = [0u8; 4096];
    for &o in offs {
        dev.read_at(&mut b, o).unwrap();
    }
    black_box(&b);
}

fn best<F: FnMut()>(mut f: F) -> Duration {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn open(path: &Path) -> Vhdx {
    Vhdx::open(Arc::new(FileStorage::open(path, true).unwrap()), VhdxOptions { read_only: true, ..Default::default() })
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let size = size();
    let dir = tempfile::tempdir().unwrap();
    let vpath = dir.path().join("bench.vhdx");
    let rpath = dir.path().join("bench.raw");
    let v = Vhdx::create(&vpath, size, &VhdxCreateOptions::parse("block_size=32M").unwrap()).unwrap();
    fill(&v);
    v.close().unwrap();
    let r = Raw::create(Arc::new(FileStorage::create(&rpath).unwrap()), size).unwrap();
    fill(&r);
    let v = open(&vpath);
    let mut buf = vec![0u8; CHUNK];
    let offs = offsets(20_000, size);
    let (sr, sv) = (best(|| seq(&r, &mut buf)), best(|| seq(&v, &mut buf)));
    let (rr, rv) = (best(|| rand(&r, &offs)), best(|| rand(&v, &offs)));
    println!("vhdx sequential 1 MiB reads / raw: {:.2}", sr.as_secs_f64() / sv.as_secs_f64());
    println!("vhdx random 4 KiB reads / raw: {:.2}", rr.as_secs_f64() / rv.as_secs_f64());

    // Conversion to qcow2: vdisk's library convert against qemu-img.
    let have_qemu = std::process::Command::new("qemu-img").arg("--version").output().is_ok();
    if have_qemu {
        let q = dir.path().join("q.qcow2");
        let o = dir.path().join("o.qcow2");
        let qemu = best(|| {
            let _ = std::fs::remove_file(&q);
            let st = std::process::Command::new("qemu-img")
                .args(["convert", "-t", "writeback", "-f", "vhdx", "-O", "qcow2"])
                .arg(&vpath)
                .arg(&q)
                .status()
                .unwrap();
            assert!(st.success());
        });
        let ours = best(|| {
            let _ = std::fs::remove_file(&o);
            let opts = vdisk::qcow2::create::CreateOptions::new(size);
            let dst = vdisk::Qcow2::create_file(&o, &opts).unwrap();
            let copts = vdisk::convert::ConvertOptions { threads: 2, ..Default::default() };
            vdisk::convert::convert(&v, &dst, &copts).unwrap();
            dst.close().unwrap();
        });
        println!(
            "vhdx -> qcow2 convert, {} MiB: qemu-img {:.0} ms, vdisk {:.0} ms, speed-up {:.2}",
            size >> 20,
            qemu.as_secs_f64() * 1e3,
            ours.as_secs_f64() * 1e3,
            qemu.as_secs_f64() / ours.as_secs_f64()
        );
    }

    let mut g = c.benchmark_group("vhdx_seq_read_1MiB");
    g.throughput(Throughput::Bytes(size));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("raw", |b| b.iter(|| seq(&r, &mut buf)));
    g.bench_function("vhdx_dynamic", |b| b.iter(|| seq(&v, &mut buf)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
