#![allow(missing_docs)] // criterion_group! generates undocumented items
//! qcow2 against the plain file, in the same run: every figure is a ratio.
//!
//! Fixtures: a 1 GiB raw file full of data, the same data as a fully
//! allocated qcow2 (64 KiB clusters), an AES-encrypted copy, zlib and zstd
//! compressed copies, all in the page cache (dropped and read back
//! sequentially after they are written, so the raw file and the images
//! start from the same page-cache state). Workloads:
//!
//! * sequential 1 MiB reads; random 4 KiB reads with 1 and 16 threads;
//! * random 4 KiB overwrites with 1 and 16 threads;
//! * random 4 KiB allocating writes and sequential 64 KiB allocating writes
//!   into empty images;
//! * AES reads and writes next to the plain qcow2;
//! * LUKS (aes-256-xts-plain64): sequential reads and random writes of a
//!   LUKS qcow2 next to the plain qcow2, a standalone LUKS volume next to
//!   the raw file, and `convert -O raw` of the LUKS qcow2 against
//!   `qemu-img convert` of the same image;
//! * compressed sequential reads (decompressing on every core) against
//!   `qemu-img convert -O raw` of the same image;
//! * `convert -c` of a 256 MiB compressible raw against `qemu-img convert
//!   -c`, for qcow2 and for a streamOptimized vmdk;
//! * opening a 1 TiB image.
//!
//! `cargo bench --bench io` runs the criterion groups and then prints a
//! table of ratios: the baseline and vdisk passes alternate, so drift of
//! the machine hits both alike, and each side reports its median pass.
//! `VDISK_BENCH_SIZE` (bytes) shrinks the fixtures for a quick run;
//! `VDISK_BENCH_DIR` puts them in a directory of your choice (on tmpfs, the
//! ratios show the format's cost without the disk's write-back).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vdisk::convert::ConvertOptions;
use vdisk::qcow2::create::CreateOptions;
use vdisk::qcow2::header::CompressionType;
use vdisk::{BlockDevice, Format, Image, OpenOptions, Qcow2, Raw, Secret};

const MB: u64 = 1 << 20;

fn size() -> u64 {
    std::env::var("VDISK_BENCH_SIZE").ok().and_then(|s| s.parse().ok()).unwrap_or(1 << 30)
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    raw: PathBuf,
    qcow2: PathBuf,
    aes: PathBuf,
    zlib: PathBuf,
    zstd: PathBuf,
}

fn data_chunk(i: u64, compressible: bool) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..MB as usize)
        .map(|j| {
            if compressible {
                // Text-like: random words from a small vocabulary.
                const WORDS: &[u8] =
                    b"the quick brown fox jumps over lazy dog disk image cluster table write read guest host ";
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let _ = j;
                WORDS[(x % WORDS.len() as u64) as usize]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

fn fill(dev: &dyn BlockDevice, compressible: bool) {
    for i in 0..dev.size() / MB {
        dev.write_at(&data_chunk(i, compressible), i * MB).unwrap();
    }
    dev.flush().unwrap();
}

fn open(path: &Path, fmt: Format, ro: bool) -> Image {
    OpenOptions::new().format(fmt).read_only(ro).key(Secret::new("bench")).open(path).unwrap()
}

fn fixture() -> Fixture {
    let dir = match std::env::var_os("VDISK_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let d = dir.path().to_path_buf();
    let size = size();
    let raw = d.join("data.raw");
    let r = Raw::create(Arc::new(vdisk::FileStorage::create(&raw).unwrap()), size).unwrap();
    fill(&r, false);
    let qcow2 = d.join("data.qcow2");
    Qcow2::create_file(&qcow2, &CreateOptions::new(size)).unwrap().close().unwrap();
    let q = open(&qcow2, Format::Qcow2, false);
    vdisk::convert::convert(&r, &q, &ConvertOptions { sparse_granule: 0, ..Default::default() }).unwrap();
    q.flush().unwrap();
    drop(q);
    let aes = d.join("aes.qcow2");
    let mut o = CreateOptions::new(size);
    o.encrypt = Some(Secret::new("bench"));
    Qcow2::create_file(&aes, &o).unwrap().close().unwrap();
    let q = open(&aes, Format::Qcow2, false);
    vdisk::convert::convert(&r, &q, &ConvertOptions { sparse_granule: 0, ..Default::default() }).unwrap();
    q.flush().unwrap();
    drop(q);
    // Compressed images of compressible data (256 MiB at most).
    let csize = size.min(256 * MB);
    let craw = d.join("text.raw");
    let cr = Raw::create(Arc::new(vdisk::FileStorage::create(&craw).unwrap()), csize).unwrap();
    fill(&cr, true);
    let mut out = Vec::new();
    for (name, ty) in [("zlib.qcow2", CompressionType::Zlib), ("zstd.qcow2", CompressionType::Zstd)] {
        let p = d.join(name);
        let mut o = CreateOptions::new(csize);
        o.compression_type = ty;
        Qcow2::create_file(&p, &o).unwrap().close().unwrap();
        let q = open(&p, Format::Qcow2, false);
        vdisk::convert::convert(&cr, &q, &ConvertOptions { compress: true, ..Default::default() }).unwrap();
        q.flush().unwrap();
        out.push(p);
    }
    let zstd = out.pop().unwrap();
    let zlib = out.pop().unwrap();
    for p in [&raw, &qcow2, &aes] {
        recache(p);
    }
    Fixture { _dir: dir, dir: d, raw, qcow2, aes, zlib, zstd }
}

/// Drops a file from the page cache and reads it back sequentially in
/// 1 MiB reads. How a file was written decides the size of its page-cache
/// folios, and that alone moves the cost of a random 4 KiB `pread` by 20%
/// or more (a file written 1 MiB at a time against one written 64 KiB at a
/// time). Reading every fixture back the same way gives the raw file and
/// the images the same start. (tmpfs keeps its pages: there this only
/// reads.)
fn recache(path: &Path) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid open descriptor; posix_fadvise only advises the kernel.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise on {}", path.display());
    let mut buf = vec![0u8; MB as usize];
    while f.read(&mut buf).unwrap() > 0 {}
}

/// Random 4 KiB-aligned offsets.
fn offsets(n: usize, seed: u64, size: u64) -> Vec<u64> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size / 4096)) * 4096
        })
        .collect()
}

fn seq_read(dev: &dyn BlockDevice, buf: &mut [u8]) {
    let n = buf.len() as u64;
    for off in (0..dev.size()).step_by(n as usize) {
        dev.read_at(buf, off).unwrap();
    }
    black_box(&buf);
}

fn rand_io(dev: &dyn BlockDevice, offs: &[u64], threads: usize, write: bool) {
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                // Page-aligned buffers, as a hypervisor's guest pages are.
                let mut aligned = vdisk::storage::Aligned::new(4096);
                let buf = aligned.as_mut_slice();
                buf.fill(t as u8 | 1);
                for &o in offs.iter().skip(t).step_by(threads) {
                    if write {
                        dev.write_at(buf, o).unwrap();
                    } else {
                        dev.read_at(buf, o).unwrap();
                    }
                }
                black_box(&buf);
            });
        }
    });
}

fn fresh_qcow2(dir: &Path, name: &str, size: u64) -> Image {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    Qcow2::create_file(&p, &CreateOptions::new(size)).unwrap().close().unwrap();
    open(&p, Format::Qcow2, false)
}

fn fresh_raw(dir: &Path, name: &str, size: u64) -> Image {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    let _ = Raw::create(Arc::new(vdisk::FileStorage::create(&p).unwrap()), size).unwrap();
    open(&p, Format::Raw, false)
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let size = size();
    let raw = open(&f.raw, Format::Raw, false);
    let q = open(&f.qcow2, Format::Qcow2, false);
    let aes = open(&f.aes, Format::Qcow2, false);
    let mut aligned = vdisk::storage::Aligned::new(MB as usize);
    let buf = aligned.as_mut_slice();
    seq_read(&raw, buf);
    seq_read(&q, buf);

    let mut g = c.benchmark_group("seq_read_1m");
    g.throughput(Throughput::Bytes(size)).sample_size(10);
    g.bench_function("raw", |b| b.iter(|| seq_read(&raw, buf)));
    g.bench_function("qcow2", |b| b.iter(|| seq_read(&q, buf)));
    g.bench_function("qcow2_aes", |b| b.iter(|| seq_read(&aes, buf)));
    g.finish();

    let offs = offsets(20_000, 7, size);
    for (group, threads, write) in [
        ("rand_read_4k_1t", 1, false),
        ("rand_read_4k_16t", 16, false),
        ("rand_overwrite_4k_1t", 1, true),
        ("rand_overwrite_4k_16t", 16, true),
    ] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Bytes(offs.len() as u64 * 4096)).sample_size(10);
        g.bench_function("raw", |b| b.iter(|| rand_io(&raw, &offs, threads, write)));
        g.bench_function("qcow2", |b| b.iter(|| rand_io(&q, &offs, threads, write)));
        if threads == 1 {
            g.bench_function("qcow2_aes", |b| b.iter(|| rand_io(&aes, &offs, threads, write)));
        }
        g.finish();
    }

    // Allocating writes into empty images: a fresh image per sample.
    let alloc_offs = offsets(20_000, 11, size);
    let mut g = c.benchmark_group("alloc_rand_4k");
    g.throughput(Throughput::Bytes(alloc_offs.len() as u64 * 4096)).sample_size(10);
    g.bench_function("raw", |b| {
        b.iter_batched(
            || fresh_raw(&f.dir, "e.raw", size),
            |d| rand_io(&d, &alloc_offs, 1, true),
            criterion::BatchSize::PerIteration,
        )
    });
    g.bench_function("qcow2", |b| {
        b.iter_batched(
            || fresh_qcow2(&f.dir, "e.qcow2", size),
            |d| rand_io(&d, &alloc_offs, 1, true),
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
    let seq_bytes = size.min(256 * MB);
    let chunk = vec![0x5au8; 65536];
    let seq_write = |d: &dyn BlockDevice| {
        for off in (0..seq_bytes).step_by(65536) {
            d.write_at(&chunk, off).unwrap();
        }
    };
    let mut g = c.benchmark_group("alloc_seq_64k");
    g.throughput(Throughput::Bytes(seq_bytes)).sample_size(10);
    g.bench_function("raw", |b| {
        b.iter_batched(|| fresh_raw(&f.dir, "s.raw", size), |d| seq_write(&d), criterion::BatchSize::PerIteration)
    });
    g.bench_function("qcow2", |b| {
        b.iter_batched(|| fresh_qcow2(&f.dir, "s.qcow2", size), |d| seq_write(&d), criterion::BatchSize::PerIteration)
    });
    g.finish();

    ratios(&f, raw, q, aes, &offs, &alloc_offs, seq_bytes);
}

fn time<F: FnMut()>(f: &mut F) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// The median of some timings.
fn median(mut t: Vec<Duration>) -> Duration {
    t.sort();
    t[t.len() / 2]
}

/// The median of `passes` runs of `f`.
fn best<F: FnMut()>(passes: usize, mut f: F) -> Duration {
    median((0..passes).map(|_| time(&mut f)).collect())
}

/// Runs the baseline and the contender alternately, `passes` times each,
/// and returns the median time of each. (Medians, not minima: on a shared
/// VM a lucky pass of one side says more about the neighbours than about
/// the code.)
fn pair<A: FnMut(), B: FnMut()>(passes: usize, mut base: A, mut ours: B) -> (Duration, Duration) {
    let (mut tb, mut to) = (Vec::new(), Vec::new());
    for _ in 0..passes {
        tb.push(time(&mut base));
        to.push(time(&mut ours));
    }
    (median(tb), median(to))
}

fn line(name: &str, base: Duration, ours: Duration, goal: f64) {
    let ratio = base.as_secs_f64() / ours.as_secs_f64();
    println!(
        "{name:<42} baseline {:>9.1} ms   vdisk {:>9.1} ms   ratio {:>5.2}  (goal {goal:.2}) {}",
        base.as_secs_f64() * 1e3,
        ours.as_secs_f64() * 1e3,
        ratio,
        if ratio >= goal { "met" } else { "MISSED" }
    );
}

/// A ratio with no goal: what a feature costs.
fn cost(name: &str, base: Duration, ours: Duration) {
    println!(
        "{name:<42} baseline {:>9.1} ms   vdisk {:>9.1} ms   ratio {:>5.2}  (a cost, no goal)",
        base.as_secs_f64() * 1e3,
        ours.as_secs_f64() * 1e3,
        base.as_secs_f64() / ours.as_secs_f64(),
    );
}

fn qemu_img(args: &[&str]) -> Duration {
    let t = Instant::now();
    let st = std::process::Command::new("qemu-img").args(args).status().expect("qemu-img");
    assert!(st.success(), "qemu-img {args:?}");
    t.elapsed()
}

#[allow(clippy::too_many_arguments)]
fn ratios(f: &Fixture, raw_img: Image, q_img: Image, aes_img: Image, offs: &[u64], alloc_offs: &[u64], seq_bytes: u64) {
    let size = size();
    println!(
        "\nSame-run ratios (baseline time / vdisk time; passes alternate, median of each; {} MiB fixtures in {}):",
        size >> 20,
        f.dir.parent().unwrap_or(&f.dir).display()
    );
    let (raw, q, aes) = (&raw_img, &q_img, &aes_img);
    let mut a1 = vdisk::storage::Aligned::new(MB as usize);
    let mut a2 = vdisk::storage::Aligned::new(MB as usize);
    let (b1, b2) = (a1.as_mut_slice(), a2.as_mut_slice());
    let (r, v) = pair(7, || seq_read(raw, b1), || seq_read(q, b2));
    line("qcow2 seq read 1 MiB vs raw", r, v, 0.95);
    let (v, a) = pair(5, || seq_read(q, b1), || seq_read(aes, b2));
    cost("qcow2 AES seq read vs plain qcow2", v, a);
    for (name, threads, write, goal) in [
        ("qcow2 rand read 4 KiB, 1 thread vs raw", 1, false, 0.95),
        ("qcow2 rand read 4 KiB, 16 threads vs raw", 16, false, 0.90),
        ("qcow2 rand overwrite 4 KiB, 1 thread vs raw", 1, true, 0.90),
        ("qcow2 rand overwrite 4 KiB, 16 threads vs raw", 16, true, 0.90),
    ] {
        let (r, v) = pair(7, || rand_io(raw, offs, threads, write), || rand_io(q, offs, threads, write));
        line(name, r, v, goal);
    }
    let (pv, av) = pair(5, || rand_io(q, offs, 1, true), || rand_io(aes, offs, 1, true));
    cost("qcow2 AES rand write 4 KiB vs plain qcow2", pv, av);
    // Allocating writes: a fresh image per pass; creating it is not timed,
    // the flush that makes the writes durable is.
    let timed = |make: &dyn Fn() -> Image, work: &dyn Fn(&Image)| {
        let d = make();
        let t = Instant::now();
        work(&d);
        d.flush().unwrap();
        t.elapsed()
    };
    let (mut r, mut v) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        r.push(timed(&|| fresh_raw(&f.dir, "e.raw", size), &|d| rand_io(d, alloc_offs, 1, true)));
        v.push(timed(&|| fresh_qcow2(&f.dir, "e.qcow2", size), &|d| rand_io(d, alloc_offs, 1, true)));
    }
    let (r, v) = (median(r), median(v));
    line("qcow2 alloc rand write 4 KiB vs raw", r, v, 0.80);
    let chunk = vec![0x5au8; 65536];
    let seq = |d: &Image| {
        for off in (0..seq_bytes).step_by(65536) {
            d.write_at(&chunk, off).unwrap();
        }
    };
    let (mut r, mut v) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        r.push(timed(&|| fresh_raw(&f.dir, "s.raw", size), &seq));
        v.push(timed(&|| fresh_qcow2(&f.dir, "s.qcow2", size), &seq));
    }
    let (r, v) = (median(r), median(v));
    line("qcow2 alloc seq write 64 KiB vs raw", r, v, 0.80);
    // Bitmap maintenance: the same writes into two images, one of them
    // with an enabled persistent bitmap (64 KiB granularity).
    let plain = fresh_qcow2(&f.dir, "bm0.qcow2", size);
    let tracked = fresh_qcow2(&f.dir, "bm1.qcow2", size);
    if let Image::Qcow2(q) = &tracked {
        q.bitmap_add("backup", None, true).unwrap();
    }
    let (pa, ta) = pair(1, || rand_io(&plain, alloc_offs, 1, true), || rand_io(&tracked, alloc_offs, 1, true));
    line("qcow2 alloc rand write 4 KiB, bitmap vs none", pa, ta, 0.97);
    for (name, threads) in [
        ("qcow2 rand overwrite 4 KiB, 1 thread, bitmap vs none", 1),
        ("qcow2 rand overwrite 4 KiB, 16 threads, bitmap vs none", 16),
    ] {
        let (p0, t0) =
            pair(7, || rand_io(&plain, alloc_offs, threads, true), || rand_io(&tracked, alloc_offs, threads, true));
        line(name, p0, t0, 0.97);
    }
    drop((plain, tracked));
    let _ = std::fs::remove_file(f.dir.join("bm0.qcow2"));
    let _ = std::fs::remove_file(f.dir.join("bm1.qcow2"));
    let _ = std::fs::remove_file(f.dir.join("e.raw"));
    let _ = std::fs::remove_file(f.dir.join("e.qcow2"));
    let _ = std::fs::remove_file(f.dir.join("s.raw"));
    let _ = std::fs::remove_file(f.dir.join("s.qcow2"));
    vpc_vdi_ratios(f, raw, offs);
    luks_ratios(f, raw, q, offs);
    // The open images hold QEMU-compatible locks: let qemu-img in.
    drop((raw_img, q_img, aes_img));

    if std::process::Command::new("qemu-img").arg("--version").output().is_err() {
        println!("qemu-img not found: the comparisons with qemu-img are skipped");
        return;
    }
    // Compressed reads: decompress into a raw file on every core, against
    // qemu-img convert of the same image.
    // The output goes to tmpfs where there is one, so the figure is the
    // read (decompression) rate, not the disk's write-back speed.
    let shm = Path::new("/dev/shm");
    let out_dir = if shm.is_dir() { shm.to_path_buf() } else { f.dir.clone() };
    for (name, img) in [("zlib", &f.zlib), ("zstd", &f.zstd)] {
        let out = out_dir.join(format!("vdisk-bench-{}.raw", std::process::id()));
        let qemu = best(3, || {
            let _ = std::fs::remove_file(&out);
            qemu_img(&["convert", "-O", "raw", img.to_str().unwrap(), out.to_str().unwrap()]);
        });
        let ours = best(3, || {
            let _ = std::fs::remove_file(&out);
            let src = open(img, Format::Qcow2, true);
            let dst = Raw::create(Arc::new(vdisk::FileStorage::create(&out).unwrap()), src.size()).unwrap();
            vdisk::convert::convert(&src, &dst, &ConvertOptions::default()).unwrap();
            dst.flush().unwrap();
        });
        line(&format!("{name} compressed read (convert -O raw) vs qemu-img"), qemu, ours, 1.5);
        let _ = std::fs::remove_file(&out);
    }
    // Compressing converts: qcow2 -c and streamOptimized vmdk.
    let text = f.dir.join("text.raw");
    let out_q = f.dir.join("c.qcow2");
    let qemu = best(3, || {
        qemu_img(&["convert", "-t", "writeback", "-c", "-O", "qcow2", text.to_str().unwrap(), out_q.to_str().unwrap()]);
    });
    let ours = best(3, || {
        let src = open(&text, Format::Raw, true);
        let dst = Qcow2::create_file(&out_q, &CreateOptions::new(src.size())).unwrap();
        vdisk::convert::convert(&src, &dst, &ConvertOptions { compress: true, ..Default::default() }).unwrap();
        dst.close().unwrap();
    });
    line("convert -c -O qcow2 (256 MiB) vs qemu-img", qemu, ours, 1.5);
    let out_v = f.dir.join("c.vmdk");
    let qemu = best(3, || {
        qemu_img(&[
            "convert",
            "-t",
            "writeback",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            text.to_str().unwrap(),
            out_v.to_str().unwrap(),
        ]);
    });
    let ours = best(3, || {
        let src = open(&text, Format::Raw, true);
        let o = vdisk::VmdkCreateOptions::parse("subformat=streamOptimized").unwrap();
        let dst = vdisk::Vmdk::create(&out_v, src.size(), &o).unwrap();
        let g = dst.grain_size().unwrap_or(65536);
        let unit = (2 * MB).div_ceil(g) * g;
        vdisk::convert::convert(&src, &dst, &ConvertOptions { compress: true, unit, ..Default::default() }).unwrap();
        dst.close().unwrap();
    });
    line("convert -O vmdk streamOptimized (256 MiB) vs qemu-img", qemu, ours, 1.5);
    // Opening a 1 TiB image with the default cache.
    let big = f.dir.join("big.qcow2");
    Qcow2::create_file(&big, &CreateOptions::new(1 << 40)).unwrap().close().unwrap();
    let t = best(20, || {
        black_box(open(&big, Format::Qcow2, false));
    });
    println!("{:<42} {:>9.3} ms (goal < 10 ms)", "open a 1 TiB qcow2 read-write", t.as_secs_f64() * 1e3);
    let before = ALLOC.live();
    let img = open(&big, Format::Qcow2, false);
    let after_open = ALLOC.live();
    println!(
        "{:<42} {:>9.3} MiB allocated (goal: a few MiB)",
        "  memory of the open 1 TiB image",
        (after_open - before) as f64 / MB as f64
    );
    drop(img);

    // vdisk bench against qemu-img bench: same image, count, depth and
    // cache mode (writeback), each as its own process.
    let vdisk_bin = env!("CARGO_BIN_EXE_vdisk");
    let empty = f.dir.join("empty.qcow2");
    for (name, img, args) in [
        ("bench read 4 KiB seq, depth 1, qcow2", &f.qcow2, vec!["-c", "200000", "-d", "1"]),
        ("bench read 4 KiB seq, depth 16, qcow2", &f.qcow2, vec!["-c", "200000", "-d", "16"]),
        ("bench read 64 KiB seq, depth 4, qcow2", &f.qcow2, vec!["-c", "20000", "-d", "4", "-s", "64k"]),
        ("bench write 4 KiB seq, depth 16, qcow2", &f.qcow2, vec!["-c", "100000", "-d", "16", "-w"]),
        ("bench alloc write 4 KiB, step 64k, depth 16", &empty, vec!["-c", "10000", "-d", "16", "-w", "-S", "64k"]),
        ("bench read 4 KiB seq, depth 16, raw", &f.raw, vec!["-c", "200000", "-d", "16"]),
    ] {
        let fmt = if img.extension().is_some_and(|e| e == "raw") { "raw" } else { "qcow2" };
        let run = |prog: &str| -> Duration {
            let mut times = Vec::new();
            for _ in 0..3 {
                if img == &empty {
                    let _ = std::fs::remove_file(&empty);
                    qemu_img(&["create", "-q", "-f", "qcow2", empty.to_str().unwrap(), &size.to_string()]);
                }
                let mut a = vec!["bench", "-f", fmt, "-t", "writeback"];
                a.extend(args.iter().copied());
                a.push(img.to_str().unwrap());
                let out = std::process::Command::new(prog).args(&a).output().unwrap();
                assert!(out.status.success(), "{prog} {a:?}: {}", String::from_utf8_lossy(&out.stderr));
                let text = String::from_utf8_lossy(&out.stdout);
                let secs: f64 = text
                    .split("Run completed in ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                times.push(Duration::from_secs_f64(secs));
            }
            median(times)
        };
        let theirs = run("qemu-img");
        let ours = run(vdisk_bin);
        line(&format!("{name} vs qemu-img bench"), theirs, ours, 1.0);
    }
    cli_rows(f, vdisk_bin);
}

/// Wall and CPU (user + system) time of one child process.
fn run_child(prog: &str, args: &[&str]) -> (Duration, Duration) {
    fn children_cpu() -> Duration {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given.
        #[allow(unsafe_code)]
        let ru = unsafe {
            libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr());
            ru.assume_init()
        };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
    let c0 = children_cpu();
    let t = Instant::now();
    let out = std::process::Command::new(prog).args(args).output().unwrap();
    let wall = t.elapsed();
    assert!(out.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    (wall, children_cpu() - c0)
}

/// Like [`line`], with each side's median CPU time.
fn line_cpu(name: &str, base: (Duration, Duration), ours: (Duration, Duration), goal: f64) {
    line(name, base.0, ours.0, goal);
    println!(
        "{:<42} CPU: baseline {:>9.1} ms   vdisk {:>9.1} ms   ratio {:>5.2}",
        "",
        base.1.as_secs_f64() * 1e3,
        ours.1.as_secs_f64() * 1e3,
        base.1.as_secs_f64() / ours.1.as_secs_f64()
    );
}

/// Alternates `base` and `ours` `passes` times; the median wall and CPU
/// time of each side.
fn pair_cpu(
    passes: usize,
    mut base: impl FnMut() -> (Duration, Duration),
    mut ours: impl FnMut() -> (Duration, Duration),
) -> ((Duration, Duration), (Duration, Duration)) {
    let (mut b, mut o) = (Vec::new(), Vec::new());
    for _ in 0..passes {
        b.push(base());
        o.push(ours());
    }
    let m =
        |v: &[(Duration, Duration)]| (median(v.iter().map(|x| x.0).collect()), median(v.iter().map(|x| x.1).collect()));
    (m(&b), m(&o))
}

/// Whole-command rows: `vdisk bench` allocating into an empty qcow2 against
/// the same command on an empty sparse raw file; `cache=none` against the
/// raw file and against `qemu-img bench` with threads and io_uring;
/// compressed 1 MiB reads at depth 1 against `qemu-img bench`; `vdisk
/// check` of a fully mapped 1 TiB image against `qemu-img check`. Each
/// line gives wall and CPU time (the commands use threads).
fn cli_rows(f: &Fixture, vdisk_bin: &str) {
    let d = &f.dir;
    let (raw, q) = (d.join("alloc.raw"), d.join("alloc.qcow2"));
    let (rs, qs) = (raw.to_str().unwrap().to_string(), q.to_str().unwrap().to_string());
    for (name, depth, bs, count) in [
        ("vdisk bench alloc 4 KiB step 64k, depth 1", "1", "4k", "100000"),
        ("vdisk bench alloc 4 KiB step 64k, depth 16", "16", "4k", "100000"),
        ("vdisk bench alloc 64 KiB sequential, depth 1", "1", "64k", "16000"),
    ] {
        let args = |fmt: &'static str, img: &str| -> Vec<String> {
            ["bench", "-q", "-f", fmt, "-w", "-s", bs, "-S", "64k", "-c", count, "-d", depth, img]
                .iter()
                .map(|a| a.to_string())
                .collect()
        };
        let (r, v) = pair_cpu(
            5,
            || {
                let _ = std::fs::remove_file(&raw);
                std::fs::File::create(&raw).unwrap().set_len(8 << 30).unwrap();
                let a = args("raw", &rs);
                run_child(vdisk_bin, &a.iter().map(String::as_str).collect::<Vec<_>>())
            },
            || {
                let _ = std::fs::remove_file(&q);
                qemu_img(&["create", "-q", "-f", "qcow2", &qs, "8G"]);
                let a = args("qcow2", &qs);
                run_child(vdisk_bin, &a.iter().map(String::as_str).collect::<Vec<_>>())
            },
        );
        line_cpu(&format!("{name}, qcow2 vs raw"), r, v, 0.95);
    }
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&q);

    // cache=none needs a file system that takes O_DIRECT (tmpfs refuses).
    if vdisk::storage::DirectFile::open(&f.raw, true).is_ok() {
        let (fr, fq) = (f.raw.to_str().unwrap(), f.qcow2.to_str().unwrap());
        fn cmd<'a>(fmt: &'a str, img: &'a str, w: Option<&'a str>) -> Vec<&'a str> {
            let mut a = vec!["bench", "-q", "-t", "none", "-f", fmt, "-c", "50000", "-d", "16", img];
            a.extend(w);
            a
        }
        for (mode, w) in [("read", None), ("write", Some("-w"))] {
            let (r, v) =
                pair_cpu(3, || run_child(vdisk_bin, &cmd("raw", fr, w)), || run_child(vdisk_bin, &cmd("qcow2", fq, w)));
            line_cpu(&format!("bench -t none 4 KiB {mode}, depth 16, qcow2 vs raw"), r, v, 0.95);
            for aio in ["threads", "io_uring"] {
                let (t, v) = pair_cpu(
                    3,
                    || {
                        let mut a = cmd("qcow2", fq, w);
                        a.extend(["-i", aio]);
                        run_child("qemu-img", &a)
                    },
                    || run_child(vdisk_bin, &cmd("qcow2", fq, w)),
                );
                line_cpu(&format!("bench -t none 4 KiB {mode}, depth 16, vs qemu-img -i {aio}"), t, v, 1.0);
            }
        }
    } else {
        println!("{} does not take O_DIRECT: the cache=none rows are skipped", d.display());
    }

    // Compressed 1 MiB reads at depth 1.
    let z = f.zlib.to_str().unwrap();
    let a = ["bench", "-q", "-f", "qcow2", "-c", "256", "-d", "1", "-s", "1M", z];
    let (t, v) = pair_cpu(5, || run_child("qemu-img", &a), || run_child(vdisk_bin, &a));
    line_cpu("bench zlib 1 MiB reads, depth 1 vs qemu-img bench", t, v, 2.0);

    // check of a 1 TiB image, every cluster mapped (64 KiB clusters).
    let big = d.join("mapped.qcow2");
    let bs = big.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata,cluster_size=64k", bs, "1T"]);
    let (t, v) = pair_cpu(3, || run_child("qemu-img", &["check", bs]), || run_child(vdisk_bin, &["check", bs]));
    line_cpu("check, 1 TiB fully mapped vs qemu-img check", t, v, 1.0);
    let _ = std::fs::remove_file(&big);
}

/// Counts live heap bytes, for the memory figure of an open image.
struct Counting(std::sync::atomic::AtomicUsize);

impl Counting {
    fn live(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

// SAFETY: forwards to the system allocator and only counts.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        self.0.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        self.0.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: p was allocated by System with layout l.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting(std::sync::atomic::AtomicUsize::new(0));

criterion_group!(benches, bench);
criterion_main!(benches);

/// Fully allocated dynamic VHD and VDI copies of the raw fixture against
/// the raw file: sequential 1 MiB and random 4 KiB reads.
fn vpc_vdi_ratios(f: &Fixture, raw: &Image, offs: &[u64]) {
    let full = ConvertOptions { sparse_granule: 0, ..Default::default() };
    let vhd = f.dir.join("data.vhd");
    let d = vdisk::Vpc::create_file(&vhd, size(), &vdisk::VpcCreateOptions::default()).unwrap();
    vdisk::convert::convert(raw, &d, &full).unwrap();
    d.close().unwrap();
    let vdi = f.dir.join("data.vdi");
    let d = vdisk::Vdi::create_file(&vdi, size(), &vdisk::VdiCreateOptions::default()).unwrap();
    vdisk::convert::convert(raw, &d, &full).unwrap();
    d.close().unwrap();
    let mut a1 = vdisk::storage::Aligned::new(MB as usize);
    let mut a2 = vdisk::storage::Aligned::new(MB as usize);
    let (b1, b2) = (a1.as_mut_slice(), a2.as_mut_slice());
    for (name, path, fmt) in [("vhd", &vhd, Format::Vpc), ("vdi", &vdi, Format::Vdi)] {
        recache(path);
        let img = open(path, fmt, true);
        // Only the raw file's size: a VHD's geometry may add a few sectors.
        let n = raw.size();
        let seq = |d: &Image, b: &mut [u8]| {
            for off in (0..n).step_by(b.len()) {
                d.read_at(b, off).unwrap();
            }
            black_box(&b);
        };
        let (r, v) = pair(7, || seq(raw, b1), || seq(&img, b2));
        line(&format!("{name} dynamic seq read 1 MiB vs raw"), r, v, 0.90);
        let (r, v) = pair(7, || rand_io(raw, offs, 1, false), || rand_io(&img, offs, 1, false));
        line(&format!("{name} dynamic rand read 4 KiB, 1 thread vs raw"), r, v, 0.90);
        drop(img);
        let _ = std::fs::remove_file(path);
    }
}

/// LUKS (aes-256-xts-plain64, QEMU's default) in qcow2 and standalone,
/// holding the raw fixture's data: the cost of the cipher next to the same
/// image unencrypted, and `convert -O raw` against qemu-img's.
fn luks_ratios(f: &Fixture, raw: &Image, plain: &Image, offs: &[u64]) {
    let full = ConvertOptions { sparse_granule: 0, ..Default::default() };
    let key = Secret::new("bench");
    let lq = f.dir.join("luks.qcow2");
    let mut o = CreateOptions::new(size());
    o.encrypt = Some(key.clone());
    o.set("encrypt.format", "luks").unwrap();
    // Key derivation is not what is measured here: keep it short.
    o.set("encrypt.iter-time", "10").unwrap();
    let d = Qcow2::create_file(&lq, &o).unwrap();
    d.close().unwrap();
    let d = open(&lq, Format::Qcow2, false);
    vdisk::convert::convert(raw, &d, &full).unwrap();
    d.flush().unwrap();
    drop(d);
    let lv = f.dir.join("data.luks");
    let params = vdisk::luks::Luks1Params { iter_time_ms: 10, ..Default::default() };
    let st = Arc::new(vdisk::FileStorage::create(&lv).unwrap());
    let d = vdisk::luks::Luks::create(st, None, size(), &params, &key).unwrap();
    vdisk::convert::convert(raw, &d, &full).unwrap();
    d.flush().unwrap();
    drop(d);
    recache(&lq);
    recache(&lv);
    let mut a1 = vdisk::storage::Aligned::new(MB as usize);
    let mut a2 = vdisk::storage::Aligned::new(MB as usize);
    let (b1, b2) = (a1.as_mut_slice(), a2.as_mut_slice());
    {
        let luks_q = open(&lq, Format::Qcow2, false);
        let luks_v = open(&lv, Format::Luks, false);
        let (p, l) = pair(5, || seq_read(plain, b1), || seq_read(&luks_q, b2));
        cost("LUKS qcow2 seq read 1 MiB vs plain qcow2", p, l);
        let (p, l) = pair(5, || rand_io(plain, offs, 1, true), || rand_io(&luks_q, offs, 1, true));
        cost("LUKS qcow2 rand write 4 KiB vs plain qcow2", p, l);
        let (r, l) = pair(5, || seq_read(raw, b1), || seq_read(&luks_v, b2));
        cost("LUKS volume seq read 1 MiB vs raw", r, l);
    }
    if std::process::Command::new("qemu-img").arg("--version").output().is_ok() {
        // Decrypting into a raw file on tmpfs where there is one, so the
        // figure is the decryption rate, not the disk's write-back.
        let shm = Path::new("/dev/shm");
        let out_dir = if shm.is_dir() { shm.to_path_buf() } else { f.dir.clone() };
        let out = out_dir.join(format!("vdisk-bench-luks-{}.raw", std::process::id()));
        let opts = format!("driver=qcow2,file.filename={},encrypt.key-secret=s0", lq.display());
        let (qemu, ours) = pair(
            3,
            || {
                let _ = std::fs::remove_file(&out);
                qemu_img(&[
                    "convert",
                    "--object",
                    "secret,id=s0,data=bench",
                    "--image-opts",
                    &opts,
                    "-O",
                    "raw",
                    out.to_str().unwrap(),
                ]);
            },
            || {
                let _ = std::fs::remove_file(&out);
                let src = open(&lq, Format::Qcow2, true);
                let dst = Raw::create(Arc::new(vdisk::FileStorage::create(&out).unwrap()), src.size()).unwrap();
                vdisk::convert::convert(&src, &dst, &ConvertOptions::default()).unwrap();
                dst.flush().unwrap();
            },
        );
        line("LUKS qcow2 convert -O raw vs qemu-img", qemu, ours, 1.5);
        let _ = std::fs::remove_file(&out);
    }
    let _ = std::fs::remove_file(&lq);
    let _ = std::fs::remove_file(&lv);
}
