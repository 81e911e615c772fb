//! `vdisk serve` with QEMU and libnbd as its clients, and vdisk's NBD
//! client against `qemu-nbd` and `nbdkit`. The oracles: `qemu-img
//! compare/map/check`, `qemu-io`, `nbdinfo`, `nbdcopy`, and `qemu-nbd`
//! serving the same image (its answers are what ours must equal).

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{p, qemu_img, run, run_status, vdisk, vdisk_bin};
use vdisk::BlockDevice;

/// A server process, killed on drop unless it already exited.
struct Proc {
    child: Child,
}

impl Proc {
    /// Waits for the process to exit by itself (a non-persistent server
    /// after its client left).
    fn wait_exit(mut self, limit: Duration) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(t0.elapsed() < limit, "server did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_for(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `cmd args...` listening on the Unix socket `sock`.
fn spawn_unix(cmd: &Path, args: &[&str], sock: &Path) -> Proc {
    let child = Command::new(cmd).args(args).stdout(Stdio::null()).spawn().unwrap();
    let p = Proc { child };
    wait_for(sock);
    p
}

/// `vdisk serve -k SOCK ARGS...`.
fn serve_unix(sock: &Path, args: &[&str]) -> Proc {
    let mut a = vec!["serve", "-k", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    spawn_unix(&vdisk_bin(), &a, sock)
}

/// `vdisk serve -p 0 ARGS...` on TCP; returns the process and its port.
fn serve_tcp(args: &[&str]) -> (Proc, u16) {
    let mut a = vec!["serve", "-p", "0"];
    a.extend_from_slice(args);
    let mut child = Command::new(vdisk_bin()).args(&a).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().parse().unwrap_or_else(|_| panic!("no port printed: {line:?}"));
    (Proc { child }, port)
}

fn unix_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qcow2 with data, an allocated zero cluster, unallocated space and a
/// backing file under part of it.
fn sample(dir: &Path) -> PathBuf {
    let base = p(dir, "base.qcow2");
    let img = p(dir, "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    common::qemu_io("qcow2", &base, &["write -P 0x11 6M 512k".into()]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&img), "8M"]);
    common::qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0xab 0 1M".into(),
            "write -z 2M 512k".into(),
            "write -P 0x5c 3M 64k".into(),
            "write -P 0x77 6M 128k".into(),
        ],
    );
    img
}

#[test]
fn qemu_reads_what_vdisk_serves_as_qemu_nbd_would() {
    if !common::have_qemu() {
        return;
    }
    let dir = common::tmp();
    let img = sample(dir.path());
    let sock = p(dir.path(), "v.sock");
    let qsock = p(dir.path(), "q.sock");
    let _v = serve_unix(&sock, &["-r", "-t", "-A", "-e", "4", "-f", "qcow2", s(&img)]);
    let (_t, port) = serve_tcp(&["-r", "-t", "-f", "qcow2", "-x", "disk", s(&img)]);
    let _q = spawn_unix(
        Path::new("qemu-nbd"),
        &["-r", "-t", "-A", "-e", "4", "-f", "qcow2", "-k", s(&qsock), s(&img)],
        &qsock,
    );
    let v = unix_uri(&sock, "");
    let q = unix_uri(&qsock, "");
    let tcp = format!("nbd://127.0.0.1:{port}/disk");

    for uri in [&v, &tcp] {
        let out = run("qemu-img", &["compare", "-U", "-f", "qcow2", "-F", "raw", s(&img), uri]);
        assert!(out.contains("identical"), "{uri}: {out}");
    }
    // The data/zero map and the allocation depth, as QEMU and libnbd see
    // them, equal qemu-nbd's answers on the same image.
    let map = |u: &str| run("qemu-img", &["map", "--output=json", "-f", "raw", u]);
    assert_eq!(map(&v), map(&q));
    for ctx in ["base:allocation", "qemu:allocation-depth"] {
        let m = |u: &str| run("nbdinfo", &[&format!("--map={ctx}"), u]);
        assert_eq!(m(&v), m(&q), "nbdinfo --map={ctx}");
    }
    let whole = run("nbdinfo", &["--map", &v]);
    assert!(whole.contains("hole,zero") && whole.contains("data"), "{whole}");
    // nbdcopy out of the export gives the guest bytes.
    let out = p(dir.path(), "copy.raw");
    run("nbdcopy", &[&v, s(&out)]);
    common::assert_same("nbdcopy", &std::fs::read(&out).unwrap(), &common::qemu_export(&img, "qcow2"));
}

#[test]
fn nbdinfo_lists_several_exports_and_their_contexts() {
    if !common::have_qemu() {
        return;
    }
    let dir = common::tmp();
    let a = p(dir.path(), "one.raw");
    let b = p(dir.path(), "two.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", s(&a), "1M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&b), "2M"]);
    let sock = p(dir.path(), "v.sock");
    let _v = serve_unix(&sock, &["-r", "-t", "-A", "-D", "test disks", "-x", "first", s(&a), s(&b)]);
    let out = run("nbdinfo", &["--list", "--json", &unix_uri(&sock, "")]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ex = j["exports"].as_array().unwrap();
    let names: Vec<&str> = ex.iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["first", "two.qcow2"]);
    let sizes: Vec<u64> = ex.iter().map(|e| e["export-size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [1 << 20, 2 << 20]);
    assert_eq!(ex[0]["description"], "test disks");
    let ctx = ex[1]["contexts"].as_array().unwrap();
    assert!(ctx.iter().any(|c| c == "base:allocation") && ctx.iter().any(|c| c == "qemu:allocation-depth"));
    assert_eq!(ex[0]["is_read_only"], true);
    assert_eq!(ex[0]["can_multi_conn"], true);
}

#[test]
fn qemu_io_writes_land_as_local_writes_would() {
    if !common::have_qemu() {
        return;
    }
    let dir = common::tmp();
    let img = sample(dir.path());
    let local = p(dir.path(), "local.qcow2");
    std::fs::copy(&img, &local).unwrap();
    let cmds: Vec<String> = vec![
        "write -P 0x3c 100k 300k".into(),
        "write -z 512k 256k".into(),
        "write -f -P 0x41 5M 70000".into(),
        "discard 3M 64k".into(),
        "write -z -u 6M 128k".into(),
        "flush".into(),
    ];
    // -e 1 without -t: the server exits once qemu-io has gone.
    let sock = p(dir.path(), "v.sock");
    let v = serve_unix(&sock, &["-f", "qcow2", "--discard", "unmap", s(&img)]);
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), unix_uri(&sock, "")];
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &refs);
    assert!(!out.to_lowercase().contains("error"), "{out}");
    assert_eq!(v.wait_exit(Duration::from_secs(10)), 0);
    common::qemu_io("qcow2", &local, &cmds);
    let out = run("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", s(&img), s(&local)]);
    assert!(out.contains("identical"), "{out}");
    common::assert_qemu_clean(&img, "qcow2");
}

#[test]
fn nbdcopy_into_vdisk_serve() {
    if !common::have_qemu() {
        return;
    }
    let dir = common::tmp();
    let src = p(dir.path(), "src.raw");
    let dst = p(dir.path(), "dst.qcow2");
    let mut data = vec![0u8; 4 << 20];
    for (i, b) in data.iter_mut().enumerate().skip(1 << 20).take(1 << 20) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&src, &data).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s(&dst), "4M"]);
    let sock = p(dir.path(), "v.sock");
    let v = serve_unix(&sock, &["-f", "qcow2", "-e", "4", s(&dst)]);
    run("nbdcopy", &[s(&src), &unix_uri(&sock, "")]);
    v.wait_exit(Duration::from_secs(10));
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&dst)]);
    assert!(out.contains("identical"), "{out}");
    common::assert_qemu_clean(&dst, "qcow2");
}

#[test]
fn vdisk_client_reads_qemu_nbd_and_nbdkit() {
    if !common::have_qemu() {
        return;
    }
    let dir = common::tmp();
    let img = sample(dir.path());
    let qsock = p(dir.path(), "q.sock");
    let _q = spawn_unix(
        Path::new("qemu-nbd"),
        &["-r", "-t", "-A", "-e", "4", "-f", "qcow2", "-k", s(&qsock), s(&img)],
        &qsock,
    );
    let q = unix_uri(&qsock, "");
    let c = vdisk::nbd::Client::open_uri(&q, true).unwrap();
    assert!(c.extended_headers(), "qemu-nbd 10 offers extended headers");
    common::assert_same("read through qemu-nbd", &common::read_all(&c), &common::qemu_export(&img, "qcow2"));
    drop(c);
    // vdisk's verbs take the URI: compare, map, convert, info.
    let (code, out, err) = vdisk(&["compare", "-f", "qcow2", "-F", "raw", s(&img), &q]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, local_map, _) = vdisk(&["map", "--output=json", "-U", "-f", "qcow2", s(&img)]);
    let (code, nbd_map, err) = vdisk(&["map", "--output=json", &q]);
    assert_eq!(code, 0, "{err}");
    let size = 8 << 20;
    assert_eq!(common::map_classes(&nbd_map, size, 512), common::map_classes(&local_map, size, 512));
    let out = p(dir.path(), "conv.qcow2");
    let (code, _, err) = vdisk(&["convert", "-O", "qcow2", &q, s(&out)]);
    assert_eq!(code, 0, "{err}");
    let r = run("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", s(&img), s(&out)]);
    assert!(r.contains("identical"), "{r}");
    let (code, info, _) = vdisk(&["info", &q]);
    assert!(code == 0 && info.contains("virtual size: 8 MiB"), "{info}");

    // nbdkit 1.32: no extended headers, the client falls back.
    let ksock = p(dir.path(), "k.sock");
    let _k = spawn_unix(Path::new("nbdkit"), &["-f", "-U", s(&ksock), "memory", "4M"], &ksock);
    let c = vdisk::nbd::Client::open_uri(&unix_uri(&ksock, ""), false).unwrap();
    assert!(c.structured_replies());
    c.write_at(&[0x42; 70000], 12345).unwrap();
    c.write_zeroes(20000, 1000, vdisk::ZeroMode::MayUnmap).unwrap();
    c.flush().unwrap();
    let mut buf = vec![0u8; 100_000];
    c.read_at(&mut buf, 0).unwrap();
    let mut want = vec![0u8; 100_000];
    want[12345..12345 + 70000].fill(0x42);
    want[20000..21000].fill(0);
    common::assert_same("nbdkit memory", &buf, &want);
    let e = c.map(2 << 20, 1 << 20).unwrap();
    assert!(e.reads_as_zero(), "untouched nbdkit memory is a hole: {e:?}");
}

#[test]
fn fork_serves_in_the_background_and_sigterm_leaves_the_image_clean() {
    if !common::have_qemu() {
        return;
    }
    let dir = common::tmp();
    let img = p(dir.path(), "f.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", s(&img), "4M"]);
    let sock = p(dir.path(), "f.sock");
    let pid = p(dir.path(), "f.pid");
    let (code, _, err) =
        vdisk(&["serve", "--fork", "--pid-file", s(&pid), "-t", "-k", s(&sock), "-f", "qcow2", s(&img)]);
    assert_eq!(code, 0, "{err}");
    let pid_n: i32 = std::fs::read_to_string(&pid).unwrap().trim().parse().unwrap();
    let uri = unix_uri(&sock, "");
    let (c1, size, _) = run_status("nbdinfo", &["--size", &uri]);
    let (c2, out, err) = run_status("qemu-io", &["-f", "raw", "-c", "write -P 0x42 64k 192k", &uri]);
    // Stop the background server before judging, whatever happened.
    let _ = Command::new("kill").arg(pid_n.to_string()).status();
    assert_eq!((c1, size.trim()), (0, "4194304"));
    assert_eq!(c2, 0, "{out}{err}");
    let t0 = Instant::now();
    while pid.exists() || sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the server did not clean up after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Lazy refcounts written and the dirty bit cleared on the way out.
    common::assert_qemu_clean(&img, "qcow2");
    let info = qemu_img(&["info", "--output=json", s(&img)]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
    let mut want = vec![0u8; 4 << 20];
    want[64 << 10..256 << 10].fill(0x42);
    common::assert_same("after SIGTERM", &common::qemu_export(&img, "qcow2"), &want);
}
