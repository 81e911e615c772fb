//! The NBD server and client against each other and against hostile peers,
//! in process over Unix sockets: a random workload checked against a
//! model (compact and extended headers), raw-socket clients that break the
//! protocol, a scripted server that sends bad replies, and sixteen
//! connections writing at once with one flush covering them all.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdisk::nbd::proto::*;
use vdisk::nbd::{Address, Client, Export, Listener, Server, ServerOptions, StopHandle, Target};
use vdisk::{BlockDevice, ErrorKind, MemStorage, Raw, ZeroMode};

/// A server running on a thread; stopped and joined on drop.
struct Running {
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    sock: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn start(dir: &Path, opts: ServerOptions, exports: Vec<Export>) -> Running {
    let sock = dir.join("s.sock");
    let mut server = Server::new(opts);
    for e in exports {
        server.add_export(e).unwrap();
    }
    let stop = server.stop_handle();
    let listener = Listener::unix(&sock).unwrap();
    let thread = std::thread::spawn(move || server.serve(listener).unwrap());
    Running { stop, thread: Some(thread), sock }
}

fn target(r: &Running, export: &str) -> Target {
    Target { address: Address::Unix(r.sock.clone()), export: export.into() }
}

fn mem_raw(size: u64) -> Arc<Raw> {
    Arc::new(Raw::create(Arc::new(MemStorage::new()), size).unwrap())
}

/// A small deterministic generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn workload(extended: bool) {
    let dir = common::tmp();
    let size = 4 << 20;
    let dev = mem_raw(size);
    let opts = ServerOptions { extended_headers: extended, ..ServerOptions::default() };
    let srv = start(dir.path(), opts, vec![Export::new("m", dev.clone()).read_only(false).discard(true)]);
    let c = Client::connect(&target(&srv, "m"), false).unwrap();
    assert_eq!(c.extended_headers(), extended);
    assert!(c.structured_replies() && c.has_allocation_status());
    assert_eq!(c.size(), size);
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..300 {
        let off = rng.below(size);
        let len = rng.below((size - off).min(300_000)) + 1;
        let (o, l) = (off as usize, len as usize);
        match rng.below(5) {
            0 | 1 => {
                let data: Vec<u8> = (0..l).map(|k| (k as u64 ^ i as u64 ^ 0x5a) as u8).collect();
                c.write_at(&data, off).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            2 => {
                let mode = if rng.below(2) == 0 { ZeroMode::MayUnmap } else { ZeroMode::Allocate };
                c.write_zeroes(off, len, mode).unwrap();
                model[o..o + l].fill(0);
            }
            3 => {
                // Raw discards punch holes, which read as zeros.
                c.discard(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                let mut buf = vec![0xeeu8; l];
                c.read_at(&mut buf, off).unwrap();
                common::assert_same(&format!("read {off}+{len}"), &buf, &model[o..o + l]);
            }
        }
    }
    c.flush().unwrap();
    // map tiles the device, and ranges it calls zero read as zeros.
    let mut pos = 0;
    while pos < size {
        let e = c.map(pos, size - pos).unwrap();
        assert!(e.length > 0 && e.offset == pos);
        if e.reads_as_zero() {
            assert!(model[pos as usize..(pos + e.length) as usize].iter().all(|&b| b == 0), "zero extent at {pos}");
        }
        pos += e.length;
    }
    common::assert_same("whole device", &common::read_all(&c), &model);
    common::assert_same("device behind the server", &common::read_all(&*dev), &model);
    // Out-of-range requests fail locally; the connection stays usable.
    assert_eq!(c.read_at(&mut [0u8; 2], size - 1).unwrap_err().kind(), ErrorKind::OutOfBounds);
    c.read_at(&mut [0u8; 1], size - 1).unwrap();
}

#[test]
fn client_and_server_agree_with_a_model_extended_headers() {
    workload(true);
}

#[test]
fn client_and_server_agree_with_a_model_compact_headers() {
    workload(false);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = common::tmp();
    let srv = start(dir.path(), ServerOptions::default(), vec![Export::new("", mem_raw(1 << 20))]);
    // Told read-only by the server, the client refuses locally...
    let c = Client::connect(&target(&srv, ""), false).unwrap();
    assert_eq!(c.write_at(b"x", 0).unwrap_err().kind(), ErrorKind::ReadOnly);
    // ...and a raw client that writes anyway gets EPERM.
    let mut r = Peer::connect(&srv.sock, "", false);
    r.request(CMD_WRITE, 0, 0, b"abc");
    assert_eq!(r.simple_reply(), EPERM);
}

/// A hand-driven client for breaking the protocol.
struct Peer {
    s: UnixStream,
}

impl Peer {
    fn open(sock: &Path) -> Peer {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Peer { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        r
    }

    /// Handshake through NBD_OPT_EXPORT_NAME (compact headers, simple
    /// replies unless `structured`).
    fn connect(sock: &Path, export: &str, structured: bool) -> Peer {
        let mut r = Peer::open(sock);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            r.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.option_reply().0, REP_ACK);
        }
        r.option(OPT_EXPORT_NAME, export.as_bytes());
        let mut e = [0u8; 10];
        r.s.read_exact(&mut e).unwrap();
        r
    }

    /// Sends bytes; a server that already hung up shows in what is read
    /// next, so a failed send is not an error here.
    fn send(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), OPT_REPLY_MAGIC);
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (typ, d)
    }

    fn request(&mut self, typ: u16, offset: u64, length: u64, payload: &[u8]) {
        let mut b = Vec::new();
        Request { flags: 0, typ, cookie: 42, offset, length }.encode(false, &mut b);
        b.extend_from_slice(payload);
        self.send(&b);
    }

    fn simple_reply(&mut self) -> u32 {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        let r = ReplyHeader::parse(&h, false).unwrap();
        assert!(r.simple && r.cookie == 42);
        r.error
    }

    /// Whether the server closes the connection within `t`.
    fn closed_within(&mut self, t: Duration) -> bool {
        self.s.set_read_timeout(Some(t)).unwrap();
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn hostile_server(dir: &Path) -> Running {
    let opts = ServerOptions { handshake_timeout: Duration::from_millis(500), ..ServerOptions::default() };
    start(dir, opts, vec![Export::new("e", mem_raw(1 << 20)).read_only(false)])
}

#[test]
fn hostile_handshakes_are_refused() {
    let dir = common::tmp();
    let srv = hostile_server(dir.path());
    let short = Duration::from_secs(5);

    // Unknown client flags.
    let mut r = Peer::open(&srv.sock);
    r.send(&0xffff_ffffu32.to_be_bytes());
    assert!(r.closed_within(short), "unknown client flags");

    // Bad option magic.
    let mut r = Peer::open(&srv.sock);
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    r.send(&[0x55; 16]);
    assert!(r.closed_within(short), "bad option magic");

    // A 4 GiB option: hung up on without reading (or allocating) it.
    let mut r = Peer::open(&srv.sock);
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    r.send(&b);
    assert!(r.closed_within(short), "huge option");

    // Unknown options get ERR_UNSUP, a malformed GO gets ERR_INVALID, an
    // unknown export ERR_UNKNOWN, and the session goes on.
    let mut r = Peer::open(&srv.sock);
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    r.option(999, b"junk");
    assert_eq!(r.option_reply().0, REP_ERR_UNSUP);
    r.option(OPT_GO, &[0, 0, 0, 9, b'e']);
    assert_eq!(r.option_reply().0, REP_ERR_INVALID);
    r.option(OPT_GO, &[0, 0, 0, 1, b'x', 0, 0]);
    assert_eq!(r.option_reply().0, REP_ERR_UNKNOWN);
    r.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 1, b'e', 0, 0, 0, 0]);
    assert_eq!(r.option_reply().0, REP_ERR_INVALID, "meta contexts need structured replies");
    r.option(OPT_LIST, b"x");
    assert_eq!(r.option_reply().0, REP_ERR_INVALID);
    r.option(OPT_LIST, &[]);
    let (t, d) = r.option_reply();
    assert_eq!((t, &d[4..]), (REP_SERVER, &b"e"[..]));
    assert_eq!(r.option_reply().0, REP_ACK);
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.option_reply().0, REP_ACK);
    assert!(r.closed_within(short));

    // An option flood ends with a hang-up, not an endless session.
    let mut r = Peer::open(&srv.sock);
    r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let mut replies = 0;
    for _ in 0..(MAX_OPTIONS + 10) {
        r.option(999, &[]);
        let mut h = [0u8; 20];
        if r.s.read_exact(&mut h).is_err() {
            break;
        }
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        if r.s.read_exact(&mut d).is_err() || u32::from_be_bytes(h[12..16].try_into().unwrap()) != REP_ERR_UNSUP {
            break;
        }
        replies += 1;
    }
    assert!(replies <= MAX_OPTIONS as usize, "the server answered {replies} options");
    assert!(r.closed_within(short));

    // A client that says nothing is dropped at the handshake deadline, and
    // others are served meanwhile.
    let t0 = Instant::now();
    let mut silent = Peer::open(&srv.sock);
    let c = Client::connect(&target(&srv, "e"), false).unwrap();
    c.write_at(b"still served", 0).unwrap();
    assert!(silent.closed_within(short), "silent client");
    assert!(t0.elapsed() < Duration::from_secs(4));
}

#[test]
fn hostile_requests_get_errors_or_a_hang_up() {
    let dir = common::tmp();
    let srv = hostile_server(dir.path());
    let short = Duration::from_secs(5);
    let size = 1u64 << 20;

    let mut r = Peer::connect(&srv.sock, "e", false);
    r.request(CMD_READ, size - 1, 2, &[]);
    assert_eq!(r.simple_reply(), EINVAL, "read past the end");
    r.request(CMD_READ, 0, 64 << 20, &[]);
    assert_eq!(r.simple_reply(), EINVAL, "read over the maximum");
    r.request(CMD_WRITE, size - 1, 2, b"ab");
    assert_eq!(r.simple_reply(), ENOSPC, "write past the end");
    r.request(CMD_TRIM, u64::MAX, 2, &[]);
    assert_eq!(r.simple_reply(), EINVAL, "trim whose end overflows");
    r.request(99, 0, 0, &[]);
    assert_eq!(r.simple_reply(), EINVAL, "unknown command");
    r.request(CMD_BLOCK_STATUS, 0, 512, &[]);
    assert_eq!(r.simple_reply(), EINVAL, "block status without a context");
    let mut b = Vec::new();
    Request { flags: CMD_FLAG_REQ_ONE, typ: CMD_READ, cookie: 42, offset: 0, length: 1 }.encode(false, &mut b);
    r.send(&b);
    assert_eq!(r.simple_reply(), EINVAL, "a flag the command does not take");
    r.request(CMD_WRITE, 0, 3, b"xyz");
    assert_eq!(r.simple_reply(), 0);
    r.request(CMD_READ, 0, 3, &[]);
    assert_eq!(r.simple_reply(), 0);
    let mut d = [0u8; 3];
    r.s.read_exact(&mut d).unwrap();
    assert_eq!(&d, b"xyz");
    // A bad magic ends the connection.
    r.send(&[0xde; REQUEST_LEN]);
    assert!(r.closed_within(short), "bad request magic");

    // A 1 GiB write payload: hung up on before any of it is read.
    let mut r = Peer::connect(&srv.sock, "e", false);
    r.request(CMD_WRITE, 0, 1 << 30, &[]);
    assert!(r.closed_within(short), "oversized write");

    // Structured replies: a read past the end gets an error chunk.
    let mut r = Peer::connect(&srv.sock, "e", true);
    r.request(CMD_READ, size, 1, &[]);
    let mut h = [0u8; STRUCTURED_REPLY_LEN];
    r.s.read_exact(&mut h).unwrap();
    let rh = ReplyHeader::parse(&h, false).unwrap();
    assert_eq!((rh.typ, rh.flags & REPLY_FLAG_DONE), (REPLY_TYPE_ERROR, REPLY_FLAG_DONE));
    let mut p = vec![0u8; rh.length as usize];
    r.s.read_exact(&mut p).unwrap();
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EINVAL);

    // A client stalled half-way through a request header stalls nobody
    // else.
    let mut stalled = Peer::connect(&srv.sock, "e", false);
    stalled.send(&REQUEST_MAGIC.to_be_bytes());
    let c = Client::connect(&target(&srv, "e"), false).unwrap();
    c.write_at(b"others go on", 100).unwrap();
    drop(c);

    // A client that vanishes in the middle of a write: nothing of it lands,
    // and what it wrote and saw acknowledged before is there.
    let mut r = Peer::connect(&srv.sock, "e", false);
    r.request(CMD_WRITE, 4096, 4, b"done");
    assert_eq!(r.simple_reply(), 0);
    r.request(CMD_WRITE, 8192, 4096, &[0xab; 100]);
    drop(r);
    let c = Client::connect(&target(&srv, "e"), true).unwrap();
    let mut got = [0u8; 4];
    c.read_at(&mut got, 4096).unwrap();
    assert_eq!(&got, b"done");
    let mut half = [1u8; 100];
    c.read_at(&mut half, 8192).unwrap();
    assert_eq!(half, [0u8; 100], "the half-sent write did not land");
    drop(stalled);
}

/// A server that negotiates (no structured replies unless `structured`)
/// then answers the first request with `bad(request)`.
fn scripted_server(
    dir: &Path,
    structured: bool,
    bad: fn(&Request) -> Vec<u8>,
) -> (PathBuf, std::thread::JoinHandle<()>) {
    let sock = dir.join("fake.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&g).unwrap();
        let mut f = [0u8; 4];
        s.read_exact(&mut f).unwrap();
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
            match opt {
                OPT_STRUCTURED_REPLY if structured => s.write_all(&option_reply(opt, REP_ACK, &[])).unwrap(),
                OPT_GO => {
                    let mut i = INFO_EXPORT.to_be_bytes().to_vec();
                    i.extend_from_slice(&(1u64 << 20).to_be_bytes());
                    i.extend_from_slice(&(TF_HAS_FLAGS | TF_SEND_FLUSH).to_be_bytes());
                    s.write_all(&option_reply(opt, REP_INFO, &i)).unwrap();
                    s.write_all(&option_reply(opt, REP_ACK, &[])).unwrap();
                    break;
                }
                OPT_SET_META_CONTEXT => s.write_all(&option_reply(opt, REP_ACK, &[])).unwrap(),
                _ => s.write_all(&option_reply(opt, REP_ERR_UNSUP, &[])).unwrap(),
            }
        }
        let mut h = [0u8; REQUEST_LEN];
        if s.read_exact(&mut h).is_ok() {
            let req = Request::parse(&h, false).unwrap();
            let _ = s.write_all(&bad(&req));
        }
        // Hold the socket until the client hangs up.
        let _ = s.read(&mut [0u8; 64]);
    });
    (sock, t)
}

fn expect_refused(structured: bool, bad: fn(&Request) -> Vec<u8>, what: &str) {
    let dir = common::tmp();
    let (sock, t) = scripted_server(dir.path(), structured, bad);
    let c = Client::connect(&Target { address: Address::Unix(sock), export: String::new() }, true).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read_at(&mut buf, 0).expect_err(what);
    assert!(e.to_string().contains("nbd"), "{what}: {e}");
    // The connection is known broken: later requests fail at once.
    assert!(c.read_at(&mut buf, 0).is_err());
    drop(c);
    t.join().unwrap();
}

#[test]
fn client_refuses_a_hostile_servers_replies() {
    expect_refused(
        false,
        |r| {
            let mut b = Vec::new();
            simple_reply(0, r.cookie ^ 1, &mut b);
            b
        },
        "wrong cookie",
    );
    expect_refused(false, |_| vec![0x12; 64], "bad reply magic");
    expect_refused(
        true,
        |r| {
            let mut b = Vec::new();
            chunk_header(false, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.cookie, 0, 1 << 30, &mut b);
            b
        },
        "oversized chunk",
    );
    expect_refused(
        true,
        |r| {
            let mut b = Vec::new();
            chunk_header(false, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, r.cookie, 0, 12, &mut b);
            b.extend_from_slice(&(r.offset + 1000).to_be_bytes());
            b.extend_from_slice(&(r.length as u32).to_be_bytes());
            b
        },
        "hole outside the request",
    );
    expect_refused(
        true,
        |r| {
            let mut b = Vec::new();
            chunk_header(false, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.cookie, 0, 8 + 10, &mut b);
            b.extend_from_slice(&r.offset.to_be_bytes());
            b.extend_from_slice(&[7u8; 10]);
            b
        },
        "read not fully covered",
    );
    expect_refused(
        true,
        |r| {
            let mut b = Vec::new();
            chunk_header(false, REPLY_FLAG_DONE, 77, r.cookie, 0, 0, &mut b);
            b
        },
        "unknown chunk type",
    );
}

#[test]
fn sixteen_connections_and_one_flush() {
    if !common::have_qemu() {
        return;
    }
    let dir = common::tmp();
    let img = dir.path().join("m.qcow2");
    let size = 16u64 << 20;
    vdisk::Qcow2::create_file(&img, &vdisk::qcow2::create::CreateOptions::new(size)).unwrap().close().unwrap();
    let dev = Arc::new(common::open_rw(&img, vdisk::Format::Qcow2));
    let srv = start(dir.path(), ServerOptions::default(), vec![Export::new("", dev).read_only(false)]);
    let t = target(&srv, "");
    let slice = size / 16;
    std::thread::scope(|s| {
        for i in 0..16u64 {
            let t = t.clone();
            s.spawn(move || {
                let c = Client::connect(&t, false).unwrap();
                assert!(c.transmission_flags() & TF_CAN_MULTI_CONN != 0);
                let data = common::pattern(i, slice as usize / 2);
                c.write_at(&data, i * slice).unwrap();
                c.write_zeroes(i * slice + slice / 2, slice / 4, ZeroMode::MayUnmap).unwrap();
            });
        }
    });
    // One flush on a new connection covers the writes all sixteen had
    // acknowledged: the file is complete on disk while the server still
    // holds the image open.
    Client::connect(&t, false).unwrap().flush().unwrap();
    let mut want = vec![0u8; size as usize];
    for i in 0..16u64 {
        let o = (i * slice) as usize;
        want[o..o + slice as usize / 2].copy_from_slice(&common::pattern(i, slice as usize / 2));
    }
    let out = dir.path().join("seen.raw");
    common::qemu_img(&["convert", "-U", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), out.to_str().unwrap()]);
    let seen = std::fs::read(&out).unwrap();
    common::assert_same("image after one flush", &seen, &want);
    drop(srv);
    common::assert_qemu_clean(&img, "qcow2");
}

/// The fuzz seeds of `nbd_server` get through the handshake: their writes
/// land in the export.
#[test]
fn server_fuzz_seeds_reach_transmission() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/nbd_server");
    let head = vdisk::testing::fuzzing::nbd_server_export(&std::fs::read(root.join("structured")).unwrap());
    assert_eq!(&head[4096..4112], &[b'A'; 16]);
    let head = vdisk::testing::fuzzing::nbd_server_export(&std::fs::read(root.join("extended")).unwrap());
    assert_eq!(&head[..8], &[b'B'; 8]);
    let head = vdisk::testing::fuzzing::nbd_server_export(&std::fs::read(root.join("simple")).unwrap());
    assert_eq!(&head[..4], b"abcd");
}

/// The fuzz seeds of `nbd_client` get through the handshake and a read.
#[test]
fn client_fuzz_seeds_reach_transmission() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/nbd_client");
    let got = vdisk::testing::fuzzing::nbd_client_reads(&std::fs::read(root.join("structured")).unwrap()).unwrap();
    assert!(got[..32768].iter().all(|&b| b == 0) && got[32768..].iter().all(|&b| b == 0x11));
    let got = vdisk::testing::fuzzing::nbd_client_reads(&std::fs::read(root.join("extended")).unwrap()).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    assert!(vdisk::testing::fuzzing::nbd_client_reads(&std::fs::read(root.join("simple")).unwrap()).is_none());
}

/// A bitmap an embedder supplies: dirty in [64 KiB, 192 KiB).
#[derive(Debug)]
struct TestBitmap;

impl vdisk::nbd::DirtyBitmap for TestBitmap {
    fn status(&self, offset: u64, max_len: u64) -> vdisk::Result<(u64, bool)> {
        let (lo, hi) = (64 << 10, 192 << 10);
        Ok(if offset < lo {
            ((lo - offset).min(max_len), false)
        } else if offset < hi {
            ((hi - offset).min(max_len), true)
        } else {
            (max_len, false)
        })
    }
}

/// `qemu:dirty-bitmap:NAME` is listed, selectable, and answers block
/// status from the embedder's bitmap, in compact descriptors.
#[test]
fn dirty_bitmap_context_reports_the_embedders_bitmap() {
    let dir = common::tmp();
    let e = Export::new("b", mem_raw(1 << 20)).bitmap("backup", Arc::new(TestBitmap));
    let srv = start(dir.path(), ServerOptions::default(), vec![e]);
    let mut r = Peer::open(&srv.sock);
    r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.option_reply().0, REP_ACK);
    let meta = |q: &str| {
        let mut d = vec![0, 0, 0, 1, b'b', 0, 0, 0, 1];
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
        d
    };
    r.option(OPT_LIST_META_CONTEXT, &meta("qemu:dirty-bitmap:"));
    let (t, d) = r.option_reply();
    assert_eq!((t, &d[4..]), (REP_META_CONTEXT, &b"qemu:dirty-bitmap:backup"[..]));
    assert_eq!(r.option_reply().0, REP_ACK);
    r.option(OPT_SET_META_CONTEXT, &meta("qemu:dirty-bitmap:backup"));
    let (t, d) = r.option_reply();
    assert_eq!(t, REP_META_CONTEXT);
    let id = u32::from_be_bytes(d[..4].try_into().unwrap());
    assert_eq!(r.option_reply().0, REP_ACK);
    r.option(OPT_EXPORT_NAME, b"b");
    let mut ex = [0u8; 10];
    r.s.read_exact(&mut ex).unwrap();
    r.request(CMD_BLOCK_STATUS, 0, 1 << 20, &[]);
    let mut h = [0u8; STRUCTURED_REPLY_LEN];
    r.s.read_exact(&mut h).unwrap();
    let rh = ReplyHeader::parse(&h, false).unwrap();
    assert_eq!((rh.typ, rh.cookie), (REPLY_TYPE_BLOCK_STATUS, 42));
    let mut p = vec![0u8; rh.length as usize];
    r.s.read_exact(&mut p).unwrap();
    let words: Vec<u32> = p.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
    assert_eq!(words, [id, 64 << 10, 0, 128 << 10, STATE_DIRTY, (1 << 20) - (192 << 10), 0]);
}

/// Eight threads share one client: their requests are in flight together
/// on one connection, the server answers out of order, and every thread
/// gets its own replies.
#[test]
fn one_client_many_threads() {
    let dir = common::tmp();
    let size = 8u64 << 20;
    let srv = start(dir.path(), ServerOptions::default(), vec![Export::new("", mem_raw(size)).read_only(false)]);
    let c = Client::connect(&target(&srv, ""), false).unwrap();
    let slice = size / 8;
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let c = &c;
            s.spawn(move || {
                for round in 0..40u64 {
                    let len = 4096 + (round * 977 % 60_000) as usize;
                    let off = i * slice + round * 4096 % (slice - len as u64);
                    let data = common::pattern(i * 1000 + round, len);
                    c.write_at(&data, off).unwrap();
                    let mut back = vec![0u8; len];
                    c.read_at(&mut back, off).unwrap();
                    common::assert_same(&format!("thread {i} round {round}"), &back, &data);
                    c.map(off, len as u64).unwrap();
                }
            });
        }
    });
    c.flush().unwrap();
}

#[test]
fn client_refuses_a_go_that_never_ends() {
    // A server that answers NBD_OPT_GO with informational replies and never
    // an ACK: the client gives up with a clear error instead of entering
    // transmission out of step.
    let dir = common::tmp();
    let sock = dir.path().join("endless.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&g).unwrap();
        let mut f = [0u8; 4];
        s.read_exact(&mut f).unwrap();
        loop {
            let mut h = [0u8; 16];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
            if opt == OPT_GO {
                let mut i = INFO_EXPORT.to_be_bytes().to_vec();
                i.extend_from_slice(&(1u64 << 20).to_be_bytes());
                i.extend_from_slice(&TF_HAS_FLAGS.to_be_bytes());
                for _ in 0..100 {
                    if s.write_all(&option_reply(opt, REP_INFO, &i)).is_err() {
                        return;
                    }
                }
                let _ = s.read(&mut [0u8; 64]);
                return;
            }
            s.write_all(&option_reply(opt, REP_ERR_UNSUP, &[])).unwrap();
        }
    });
    let Err(e) = Client::connect(&Target { address: Address::Unix(sock), export: String::new() }, true) else {
        panic!("a GO without an ACK must fail");
    };
    assert!(e.to_string().contains("without an ACK"), "{e}");
    t.join().unwrap();
}

#[test]
fn a_client_trickling_option_bytes_cannot_stretch_the_handshake() {
    // One byte every 200 ms of a 1000-byte option: each read returns before
    // a per-read timeout, so only a deadline over the whole handshake ends
    // it. The server must hang up about when its 1 s limit passes.
    let dir = common::tmp();
    let opts = ServerOptions { handshake_timeout: Duration::from_secs(1), ..ServerOptions::default() };
    let srv = start(dir.path(), opts, vec![Export::new("", mem_raw(1 << 20))]);
    let mut s = UnixStream::connect(&srv.sock).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&1000u32.to_be_bytes());
    s.write_all(&h).unwrap();
    let t = Instant::now();
    let mut hung_up = false;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(&[0]).is_err() {
            hung_up = true;
            break;
        }
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        if let Ok(0) = s.read(&mut b) {
            hung_up = true;
            break;
        }
        s.set_nonblocking(false).unwrap();
    }
    assert!(hung_up, "the server kept a trickling handshake open for {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "hung up only after {:?}", t.elapsed());
}
