#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Sequential 1 MiB reads of a fully allocated 256 MiB monolithicSparse
//! vmdk against the same data in a raw file, in the same run. Prints the
//! vmdk/raw throughput ratio (goal: at least 0.8).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vdisk::{BlockDevice, FileStorage, Raw, Vmdk, VmdkCreateOptions, VmdkOptions};

const SIZE: u64 = 256 << 20;
const CHUNK: usize = 1 << 20;

fn fill(dev: &dyn BlockDevice) {
    let mut buf = vec![0u8; CHUNK];
    for (i, off) in (0..SIZE).step_by(CHUNK).enumerate() {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = (i ^ j) as u8 | 1;
        }
        dev.write_at(&buf, off).unwrap();
    }
    dev.flush().unwrap();
}

fn read_all(dev: &dyn BlockDevice, buf: &mut [u8]) {
    for off in (0..SIZE).step_by(CHUNK) {
        dev.read_at(buf, off).unwrap();
    }
    black_box(&buf);
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let vpath = dir.path().join("bench.vmdk");
    let rpath = dir.path().join("bench.raw");
    let v = Vmdk::create(&vpath, SIZE, &VmdkCreateOptions::default()).unwrap();
    fill(&v);
    drop(v);
    let r = Raw::create(Arc::new(FileStorage::create(&rpath).unwrap()), SIZE).unwrap();
    fill(&r);
    let v = Vmdk::open(
        Arc::new(FileStorage::open(&vpath, true).unwrap()),
        VmdkOptions { read_only: true, ..Default::default() },
    )
    .unwrap();
    let mut buf = vec![0u8; CHUNK];
    // Same-run ratio, best of five passes each.
    let mut best = |dev: &dyn BlockDevice| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                read_all(dev, &mut buf);
                t.elapsed()
            })
            .min()
            .unwrap()
    };
    let (tr, tv) = (best(&r), best(&v));
    let mibs = |d: Duration| (SIZE >> 20) as f64 / d.as_secs_f64();
    println!(
        "vmdk sequential 1 MiB reads: raw {:.0} MiB/s, vmdk {:.0} MiB/s, ratio {:.2}",
        mibs(tr),
        mibs(tv),
        tr.as_secs_f64() / tv.as_secs_f64()
    );
    let mut g = c.benchmark_group("seq_read_1MiB_256MiB");
    g.throughput(Throughput::Bytes(SIZE));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("raw", |b| b.iter(|| read_all(&r, &mut buf)));
    g.bench_function("vmdk_monolithic_sparse", |b| b.iter(|| read_all(&v, &mut buf)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
