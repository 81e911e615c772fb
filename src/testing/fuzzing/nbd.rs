//! NBD fuzz targets: the input is everything one peer sends.
//!
//! * `nbd_server`: the bytes a client sends — handshake options, then
//!   requests — fed to [`Server::serve_connection`] over a socket pair, with
//!   a writable 1 MiB in-memory export offering every meta context.
//! * `nbd_client`: the bytes a server sends — greeting, option replies,
//!   then replies to a read, a block status query, a write and a flush —
//!   fed to [`Client::handshake`] and the client's requests.
//!
//! Either side must end with a result or an error, never a panic, a hang
//! or an allocation beyond the protocol limits (32 MiB payloads).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use crate::device::{BlockDevice, ZeroMode};
use crate::nbd::{Address, Client, Export, Server, ServerOptions, Target};
use crate::raw::Raw;
use crate::storage::MemStorage;

/// Feeds `data` into `peer` and then closes its sending side, while
/// draining (and dropping) whatever comes back, on two threads.
fn feed(peer: UnixStream, data: &[u8]) -> (std::thread::JoinHandle<()>, std::thread::JoinHandle<()>) {
    let mut w = peer.try_clone().expect("socket pair clone");
    let mut r = peer;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&data);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let reader = std::thread::spawn(move || {
        let _ = r.set_read_timeout(Some(Duration::from_secs(10)));
        let mut b = [0u8; 64 << 10];
        while let Ok(n) = r.read(&mut b) {
            if n == 0 {
                break;
            }
        }
    });
    (writer, reader)
}

/// `nbd_server`: `data` is a client's byte stream.
pub fn nbd_server(data: &[u8]) {
    let _ = nbd_server_export(data);
}

/// The body of `nbd_server`; returns the export's first 64 KiB afterwards
/// (tests check that a seed reaches the transmission phase).
pub fn nbd_server_export(data: &[u8]) -> Vec<u8> {
    let dev = Arc::new(Raw::create(Arc::new(MemStorage::new()), 1 << 20).expect("in-memory raw"));
    let mut server = Server::new(ServerOptions {
        handshake_timeout: Duration::from_secs(5),
        workers: 2,
        log: |_| {},
        ..ServerOptions::default()
    });
    server
        .add_export(Export::new("", dev.clone()).read_only(false).discard(true).allocation_depth(true))
        .expect("one export");
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    let (w, r) = feed(theirs, data);
    let res = server.serve_connection(Box::new(ours));
    if let Err(e) = res {
        assert!(e.kind() != crate::ErrorKind::Internal, "internal error: {e}");
    }
    let _ = w.join();
    let _ = r.join();
    assert_eq!(dev.size(), 1 << 20);
    let mut head = vec![0u8; 64 << 10];
    dev.read_at(&mut head, 0).expect("in-memory read");
    head
}

/// `nbd_client`: `data` is a server's byte stream.
pub fn nbd_client(data: &[u8]) {
    let _ = nbd_client_reads(data);
}

/// The body of `nbd_client`; returns what the first read got, if the
/// handshake and the read succeeded (tests check the seeds get that far).
pub fn nbd_client_reads(data: &[u8]) -> Option<Vec<u8>> {
    let mut got = None;
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    let (w, r) = feed(theirs, data);
    let target = Target { address: Address::Unix("fuzz".into()), export: String::new() };
    if let Ok(c) = Client::handshake(Box::new(ours), target, false) {
        let size = c.size();
        let n = size.min(64 << 10) as usize;
        let mut buf = vec![0u8; n];
        if c.read_at(&mut buf, 0).is_ok() {
            got = Some(buf.clone());
        }
        if size > 0 {
            if let Ok(e) = c.map(0, size) {
                assert!(e.length > 0 && e.length <= size, "map extent {e:?} of a {size}-byte export");
            }
        }
        let _ = c.write_at(&buf[..n.min(512)], 0);
        let _ = c.write_zeroes(0, size.min(4096), ZeroMode::MayUnmap);
        let _ = c.flush();
    }
    let _ = w.join();
    let _ = r.join();
    got
}
