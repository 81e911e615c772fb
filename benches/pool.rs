#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Listing a pool of 10,000 volumes (half small qcow2, half sparse raw):
//!
//! * `cold`: no probe cache (deleted, new registry): every header is read;
//! * `warm (new process)`: a new registry and pool, as a fresh `vdisk
//!   vol-list` would have, with the on-disk cache: nothing is re-probed;
//! * `warm (same pool)`: the same pool object listing again.
//!
//! Each warm iteration asserts that no file was probed. The files are in
//! the page cache in every case (a truly cold disk is slower still).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vdisk::pool::{Pool, PoolDef, Registry, RegistryPaths};

const VOLUMES: usize = 10_000;

fn pool_of(config: &Path) -> Pool {
    Registry::open(RegistryPaths::new(config).without_libvirt()).unwrap().pool("bench").unwrap()
}

fn setup(root: &Path) -> std::path::PathBuf {
    let config = root.join("config");
    let reg = Registry::open(RegistryPaths::new(&config).without_libvirt()).unwrap();
    let p = reg.define(PoolDef::dir("bench", root.join("images")).unwrap()).unwrap();
    p.build().unwrap();
    p.start().unwrap();
    // One small qcow2 (512-byte clusters: a 2 KiB file) as a template.
    let tpl = root.join("template.qcow2");
    let mut o = vdisk::qcow2::create::CreateOptions::new(1 << 20);
    o.cluster_size = 512;
    drop(vdisk::Qcow2::create_file(&tpl, &o).unwrap());
    let bytes = std::fs::read(&tpl).unwrap();
    let dir = p.canonical_target();
    for i in 0..VOLUMES {
        if i % 2 == 0 {
            std::fs::write(dir.join(format!("vm{i:05}.qcow2")), &bytes).unwrap();
        } else {
            let f = std::fs::File::create(dir.join(format!("disk{i:05}.raw"))).unwrap();
            f.set_len(1 << 30).unwrap();
        }
    }
    // Let the files age past the racy window before the first probe.
    std::thread::sleep(Duration::from_millis(50));
    config
}

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path());
    let uuid = pool_of(&config).uuid();
    let cache = config.join(format!("cache/{uuid}.cache"));

    let mut g = c.benchmark_group("pool listing, 10,000 volumes");
    g.sample_size(10);
    g.bench_function("cold (no probe cache)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_file(&cache);
                let t = Instant::now();
                let p = pool_of(&config);
                let (vols, r) = p.refresh().unwrap();
                total += t.elapsed();
                assert_eq!((vols.len(), r.probed), (VOLUMES, VOLUMES));
                black_box(vols);
            }
            total
        })
    });
    // Build the cache once for the warm runs.
    pool_of(&config).refresh().unwrap();
    g.bench_function("warm (new process: registry + on-disk cache)", |b| {
        b.iter(|| {
            let p = pool_of(&config);
            let (vols, r) = p.refresh().unwrap();
            assert_eq!((vols.len(), r.probed, r.reused), (VOLUMES, 0, VOLUMES));
            black_box(vols)
        })
    });
    let p = pool_of(&config);
    p.refresh().unwrap();
    g.bench_function("warm (same pool object)", |b| {
        b.iter(|| {
            let (vols, r) = p.refresh().unwrap();
            assert_eq!(r.probed, 0);
            black_box(vols)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
