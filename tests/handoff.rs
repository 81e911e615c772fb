//! The live-migration handoff (`inactivate` on the source, `activate` on
//! the destination) between two opens of one image file, and between vdisk
//! and QEMU's `qemu-io`; `refresh` of a force-share read-only open while
//! QEMU writes. `qemu-img check` judges the image at every step and
//! `qemu-img convert` the guest content.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use std::sync::Arc;

use vdisk::qcow2::check::Repair;
use vdisk::qcow2::create::CreateOptions;
use vdisk::{
    BlockDevice, ErrorKind, FaultMode, FaultyStorage, Format, Image, LockMode, MemStorage, OpenOptions, Qcow2,
    Qcow2Options, Survivors,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn open_inactive(img: &Path, fmt: Format) -> Image {
    OpenOptions::new().format(fmt).inactive(true).open(img).unwrap()
}

/// Writes `byte` over `[off, off + len)` of both the device and the model.
fn put(dev: &dyn BlockDevice, model: &mut [u8], off: u64, len: usize, byte: u8) {
    dev.write_at(&vec![byte; len], off).unwrap();
    model[off as usize..off as usize + len].fill(byte);
}

fn assert_refused(r: vdisk::Result<()>, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{what}: {e}");
    assert!(e.to_string().contains("inactive"), "{what}: {e}");
}

fn assert_busy(r: vdisk::Result<()>, img: &Path, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.kind(), ErrorKind::Busy, "{what}: {e}");
    assert!(e.to_string().contains(s(img)), "{what}: the error names the image: {e}");
}

/// `qemu-img info` says the image is clean: no dirty bit, no bitmap `in_use`.
fn assert_clean_header(img: &Path) {
    let info = qemu_img(&["info", "-U", "--output=json", s(img)]);
    assert!(info.contains("\"dirty-flag\": false"), "dirty bit left set:\n{info}");
    assert!(!info.contains("in-use"), "a bitmap was left in use:\n{info}");
}

#[test]
fn qcow2_handoff_between_two_opens() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "guest.qcow2");
    // Small clusters: each L2 table covers 2 MiB, so the two sides allocate
    // in tables the other has cached.
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,lazy_refcounts=on", s(&img), "16M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    let mut model = vec![0u8; 16 << 20];

    // Host A runs the guest.
    let a = open_rw(&img, Format::Qcow2);
    put(&a, &mut model, 0, 8192, 0xa1);
    put(&a, &mut model, 5 << 20, 65536, 0xa2);
    // Host B starts as the destination while A still writes.
    assert_busy(OpenOptions::new().format(Format::Qcow2).open(&img).map(drop), &img, "a second writer");
    let b = open_inactive(&img, Format::Qcow2);
    assert!(b.is_inactive());
    assert_refused(b.write_at(&[1; 512], 0), "write to an inactive destination");
    assert_refused(b.read_at(&mut [0; 512], 0), "read of an inactive destination");
    assert_busy(b.activate(), &img, "activating while the source is active");
    assert!(b.is_inactive(), "a failed activation leaves the device inactive");

    // The handoff: A inactivates, B activates.
    a.inactivate().unwrap();
    a.inactivate().unwrap(); // idempotent
    assert!(a.is_inactive());
    assert_refused(a.write_at(&[1; 512], 0), "write after inactivate");
    assert_refused(a.write_zeroes(0, 4096, vdisk::ZeroMode::MayUnmap), "write_zeroes after inactivate");
    assert_refused(a.read_at(&mut [0; 512], 0), "read after inactivate");
    assert_qemu_clean(&img, "qcow2");
    assert_clean_header(&img);
    b.activate().unwrap();
    b.activate().unwrap(); // idempotent
    assert_same("B sees A's data", &read_all(&b), &model);
    put(&b, &mut model, 4096, 8192, 0xb1); // inside A's cached L2 table
    put(&b, &mut model, 9 << 20, 4096, 0xb2); // a new L2 table
    b.discard(5 << 20, 65536).unwrap();
    model[5 << 20..(5 << 20) + 65536].fill(0);
    assert_busy(a.activate(), &img, "the source activating while the destination holds the image");
    assert_refused(a.write_at(&[1; 512], 0), "write after a failed activation");

    // And back: B inactivates, A activates and sees B's writes.
    b.inactivate().unwrap();
    assert_qemu_clean(&img, "qcow2");
    assert_clean_header(&img);
    a.activate().unwrap();
    assert_same("A sees B's data", &read_all(&a), &model);
    put(&a, &mut model, 12 << 20, 4096, 0xa3);
    drop(b);
    a.close().unwrap();
    assert_qemu_clean(&img, "qcow2");
    assert_clean_header(&img);
    assert_same("qemu's view", &qemu_export(&img, "qcow2"), &model);
}

#[test]
fn raw_handoff_between_two_opens() {
    let dir = tmp();
    let img = p(dir.path(), "guest.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let a = open_rw(&img, Format::Raw);
    a.write_at(&[0xa1; 4096], 0).unwrap();
    let b = open_inactive(&img, Format::Raw);
    assert_refused(b.write_at(&[1; 512], 0), "write to an inactive raw destination");
    assert_busy(b.activate(), &img, "activating while the source is active");
    a.inactivate().unwrap();
    assert_refused(a.write_at(&[1; 512], 0), "raw write after inactivate");
    // The other host grows the file while it owns the image.
    b.activate().unwrap();
    let mut buf = [0u8; 4096];
    b.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xa1; 4096]);
    b.write_at(&[0xb1; 4096], 8192).unwrap();
    b.resize(2 << 20).unwrap();
    assert_busy(a.activate(), &img, "raw source activating while the destination holds it");
    b.inactivate().unwrap();
    a.activate().unwrap();
    assert_eq!(a.size(), 2 << 20, "activate rereads the size");
    a.read_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, [0xb1; 4096]);
}

/// VDI and VHD hand off too: each side rereads the block map (BAT) on
/// activation, so the blocks the other side allocated are seen and never
/// allocated twice; QEMU allocates more while both are inactive; a
/// read-only open sees the writer's new blocks after `refresh`.
#[test]
fn vdi_handoff_between_two_opens() {
    block_map_handoff(Format::Vdi, "vdi", &[]);
}

#[test]
fn vhd_handoff_between_two_opens() {
    block_map_handoff(Format::Vpc, "vpc", &["-o", "subformat=dynamic"]);
}

fn block_map_handoff(fmt: Format, q: &str, create_opts: &[&str]) {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), &format!("guest.{q}"));
    qemu_img(&[&["create", "-q", "-f", q], create_opts, &[s(&img), "16M"]].concat());
    // qemu-img checks VDI; VHD neither qemu-img nor vdisk can check: QEMU
    // opening it (its BAT read) and reading the data (below) judge.
    let clean = |img: &Path| {
        if q == "vpc" {
            qemu_img(&["info", "-U", "-f", q, s(img)]);
        } else {
            assert_qemu_clean(img, q);
        }
    };
    let a = open_rw(&img, fmt);
    let mut model = vec![0u8; a.size() as usize];
    put(&a, &mut model, 0, 65536, 0xa1);
    let b = open_inactive(&img, fmt);
    assert!(b.is_inactive());
    assert_refused(b.write_at(&[1; 512], 0), "write to an inactive destination");
    assert_refused(b.read_at(&mut [0; 512], 0), "read from an inactive destination");
    assert_busy(b.activate(), &img, "activating while the source is active");
    a.inactivate().unwrap();
    assert_refused(a.write_at(&[1; 512], 1 << 20), "write after inactivate");
    clean(&img);
    b.activate().unwrap();
    assert_same("B sees A's data", &read_all(&b), &model);
    // B allocates blocks 3 and 5 (A knew blocks up to 0).
    put(&b, &mut model, 3 << 20, 4096, 0xb1);
    put(&b, &mut model, (5 << 20) + 512, 512, 0xb2);
    assert_busy(a.activate(), &img, "source activating while the destination holds it");
    b.inactivate().unwrap();
    clean(&img);
    // QEMU allocates one more while both are inactive.
    qemu_io(q, &img, &["write -P 0xc3 9M 64k".to_string()]);
    model[9 << 20..(9 << 20) + 65536].fill(0xc3);
    a.activate().unwrap();
    assert_same("A sees B's and QEMU's blocks", &read_all(&a), &model);
    // A's next allocation lands after every block the others allocated.
    put(&a, &mut model, 12 << 20, 4096, 0xa2);
    drop(b);
    a.close().unwrap();
    clean(&img);
    assert_same("the image after the round trip", &qemu_export(&img, q), &model);

    // A read-only open beside a writer sees new blocks after refresh.
    let w = open_rw(&img, fmt);
    let ro = OpenOptions::new().format(fmt).read_only(true).lock(LockMode::ForceShare).open(&img).unwrap();
    put(&w, &mut model, 14 << 20, 4096, 0xd4);
    w.flush().unwrap();
    let mut buf = vec![0u8; 4096];
    ro.read_at(&mut buf, 14 << 20).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "before refresh the block is unknown to the reader");
    ro.refresh().unwrap();
    ro.read_at(&mut buf, 14 << 20).unwrap();
    assert!(buf.iter().all(|&x| x == 0xd4), "refresh rereads the block map");
    assert_eq!(w.refresh().unwrap_err().kind(), ErrorKind::InvalidArgument, "a writer owns the image");
}

/// LUKS hands off: activation rereads the key slots (cryptsetup added one
/// while both sides were inactive) and the size (the other side grew it).
#[test]
fn luks_handoff_between_two_opens() {
    use vdisk::Secret;
    if !have_qemu() {
        return;
    }
    const OBJ: &str = "secret,id=sec0,data=handoff-pass";
    let dir = tmp();
    let img = p(dir.path(), "guest.luks");
    qemu_img(&["create", "-q", "--object", OBJ, "-f", "luks", "-o", "key-secret=sec0,iter-time=10", s(&img), "4M"]);
    let open = |inactive: bool| {
        OpenOptions::new().format(Format::Luks).key(Secret::new("handoff-pass")).inactive(inactive).open(&img).unwrap()
    };
    let a = open(false);
    // Unwritten sectors decrypt to noise: what B reads is the model.
    a.write_at(&[0xa1; 4096], 512).unwrap();
    let b = open(true);
    assert_refused(b.read_at(&mut [0; 512], 0), "read from an inactive luks destination");
    assert_busy(b.activate(), &img, "activating while the source is active");
    a.inactivate().unwrap();
    assert_refused(a.write_at(&[1; 512], 0), "luks write after inactivate");
    b.activate().unwrap();
    let mut buf = vec![0u8; 4096];
    b.read_at(&mut buf, 512).unwrap();
    assert!(buf.iter().all(|&x| x == 0xa1), "B decrypts what A wrote");
    b.resize(8 << 20).unwrap();
    b.write_at(&[0xb2; 3000], (6 << 20) + 100).unwrap();
    let model = read_all(&b);
    assert!(model[(6 << 20) + 100..(6 << 20) + 3100].iter().all(|&x| x == 0xb2));
    assert_busy(a.activate(), &img, "luks source activating while the destination holds it");
    b.inactivate().unwrap();
    // cryptsetup adds a key slot while both sides are inactive (QEMU's
    // `amend` would refuse: it wants the image to itself, and the inactive
    // opens keep the consistent-read lock).
    std::fs::write(p(dir.path(), "k1"), "handoff-pass").unwrap();
    std::fs::write(p(dir.path(), "k2"), "second").unwrap();
    run(
        "cryptsetup",
        &[
            "luksAddKey",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            s(&p(dir.path(), "k1")),
            s(&img),
            s(&p(dir.path(), "k2")),
        ],
    );
    a.activate().unwrap();
    assert_eq!(a.size(), 8 << 20, "activation rereads the size");
    assert_same("A sees B's data", &read_all(&a), &model);
    match a.info().details {
        vdisk::device::FormatDetails::Luks(d) => {
            assert_eq!(d.slots.iter().filter(|s| s.0).count(), 2, "activation rereads the key slots: {d:?}")
        }
        other => panic!("{other:?}"),
    }
    drop(b);
    drop(a);
    let io2 = format!("driver=luks,key-secret=sec1,file.filename={}", s(&img));
    let out = p(dir.path(), "plain.raw");
    run("qemu-img", &["convert", "--object", "secret,id=sec1,data=second", "--image-opts", &io2, "-O", "raw", s(&out)]);
    assert_same("QEMU reads it with the new key", &std::fs::read(&out).unwrap(), &model);
}

/// A `qemu-io` process holding the image read-write, fed commands on stdin.
struct QemuIo {
    child: Child,
    stdin: ChildStdin,
    out: std::sync::mpsc::Receiver<String>,
}

impl QemuIo {
    fn start(args: &[&str]) -> QemuIo {
        // Line-buffered: qemu-io's answers must arrive as they are made.
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg("qemu-io")
            .args(["-t", "writethrough"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-io");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, out) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut q = QemuIo { child, stdin, out };
        // Answered once qemu-io has opened (and locked) the image.
        q.command("length", |l| l.trim_end().ends_with("iB"));
        q
    }

    /// Sends one command and waits for the line `done` recognises. One at
    /// a time: qemu-io reads a command per wake-up, so a second line sent
    /// with the first could wait unread.
    fn command(&mut self, cmd: &str, done: impl Fn(&str) -> bool) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.out.recv_timeout(left).unwrap_or_else(|_| panic!("qemu-io did not answer {cmd}"));
            assert!(!line.contains("error") && !line.contains("failed"), "qemu-io: {line}");
            if done(&line) {
                break;
            }
        }
    }

    /// Runs one write command; with `-t writethrough` QEMU flushes its
    /// metadata before answering.
    fn write(&mut self, cmd: &str) {
        self.command(cmd, |l| l.contains("ops;"));
    }

    fn quit(mut self) {
        writeln!(self.stdin, "quit").unwrap();
        drop(self.stdin);
        assert!(self.child.wait().unwrap().success());
    }
}

#[test]
fn qemu_io_writes_while_vdisk_is_inactive() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "guest.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", s(&img), "8M"]);
    let mut model = vec![0u8; 8 << 20];
    let a = open_rw(&img, Format::Qcow2);
    put(&a, &mut model, 0, 8192, 0xa1);
    // While vdisk is active, QEMU cannot take the image.
    let (code, _, err) = run_status("qemu-io", &["-f", "qcow2", s(&img), "-c", "write 0 512"]);
    assert_ne!(code, 0);
    assert!(err.contains("lock"), "{err}");
    a.inactivate().unwrap();
    // QEMU, the other host, writes while vdisk is inactive: next to vdisk's
    // data (in the L2 table vdisk had cached) and in a new table.
    let mut q = QemuIo::start(&["-f", "qcow2", s(&img)]);
    q.write("write -P 0x5c 8192 4096");
    model[8192..12288].fill(0x5c);
    q.write("write -P 0x6d 3M 64k");
    model[3 << 20..(3 << 20) + 65536].fill(0x6d);
    assert_busy(a.activate(), &img, "activating while qemu-io holds the image");
    q.quit();
    a.activate().unwrap();
    assert_same("vdisk sees QEMU's data", &read_all(&a), &model);
    put(&a, &mut model, 6 << 20, 4096, 0xa2);
    a.close().unwrap();
    assert_qemu_clean(&img, "qcow2");
    assert_same("qemu's view", &qemu_export(&img, "qcow2"), &model);
}

#[test]
fn refresh_shows_what_qemu_wrote_to_a_shared_image() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "shared.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", s(&img), "8M"]);
    let mut q = QemuIo::start(&["-f", "qcow2", s(&img)]);
    // Without force-share the writer keeps vdisk out.
    let e = OpenOptions::new().format(Format::Qcow2).read_only(true).open(&img).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    let r = OpenOptions::new().format(Format::Qcow2).read_only(true).lock(LockMode::ForceShare).open(&img).unwrap();
    q.write("write -P 0x42 0 64k");
    q.write("write -P 0x43 5M 4k");
    let mut buf = vec![0u8; 4096];
    r.read_at(&mut buf, 5 << 20).unwrap();
    assert_eq!(buf, vec![0; 4096], "before refresh, the L1 table read at open is used");
    r.refresh().unwrap();
    r.read_at(&mut buf, 5 << 20).unwrap();
    assert_eq!(buf, vec![0x43; 4096], "refresh rereads the tables");
    r.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0x42; 4096]);
    q.quit();
    // QEMU grows the image and writes past the old end (the holder of
    // force-share locks does not keep it out): refresh picks up the size.
    qemu_img(&["resize", "-q", "-f", "qcow2", s(&img), "12M"]);
    qemu_io("qcow2", &img, &["write -P 0x44 11M 4k".to_string()]);
    r.refresh().unwrap();
    assert_eq!(r.size(), 12 << 20);
    r.read_at(&mut buf, 11 << 20).unwrap();
    assert_eq!(buf, vec![0x44; 4096]);
    // A read-write open owns its metadata: refresh is refused.
    let w = open_rw(&img, Format::Qcow2);
    assert_eq!(w.refresh().unwrap_err().kind(), ErrorKind::InvalidArgument);
}

#[test]
fn formats_without_handoff_refuse_by_name() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "d.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&img), "1M"]);
    let v = open_rw(&img, Format::Vmdk);
    let e = v.inactivate().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("vmdk"), "{e}");
    let e = OpenOptions::new().format(Format::Vmdk).inactive(true).open(&img).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

/// A `vdisk serve --fork` process, stopped (SIGTERM by pid) when dropped.
struct Served {
    pid_file: std::path::PathBuf,
}

impl Served {
    fn start(args: &[&str], pid_file: std::path::PathBuf) -> Served {
        let mut all = vec!["serve", "--fork", "-t", "--pid-file", s(&pid_file)];
        all.extend_from_slice(args);
        let (code, out, err) = vdisk(&all);
        assert_eq!(code, 0, "vdisk serve {args:?}: {out}{err}");
        Served { pid_file }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let pid = pid.trim().to_string();
            let _ = Command::new("kill").arg(&pid).status();
            // Wait until it has cleaned up (it removes its pid file).
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.pid_file.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn nbd_io(sock: &Path, cmd: &str) -> (i32, String) {
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let (code, out, err) = run_status("qemu-io", &["-f", "raw", &uri, "-c", cmd]);
    (code, format!("{out}{err}"))
}

#[test]
fn serve_hands_off_through_the_control_socket() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let d = dir.path();
    let img = p(d, "guest.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", s(&img), "16M"]);
    let (ctl_a, ctl_b, nbd_a, nbd_b) = (p(d, "a.ctl"), p(d, "b.ctl"), p(d, "a.nbd"), p(d, "b.nbd"));
    // Host A serves the guest's disk; B waits, inactive.
    let a = Served::start(&["-f", "qcow2", "--control", s(&ctl_a), "-k", s(&nbd_a), s(&img)], p(d, "a.pid"));
    let (code, out) = nbd_io(&nbd_a, "write -P 0xa1 0 64k");
    assert_eq!(code, 0, "{out}");
    let b =
        Served::start(&["-f", "qcow2", "--inactive", "--control", s(&ctl_b), "-k", s(&nbd_b), s(&img)], p(d, "b.pid"));
    let (code, out, _) = vdisk(&["handoff", s(&ctl_b), "status"]);
    assert_eq!((code, out.as_str()), (0, "(default): inactive\n"));
    let (code, out) = nbd_io(&nbd_b, "read 0 4k");
    assert!(code != 0 || out.contains("error") || out.contains("failed"), "read of an inactive export: {out}");
    let (code, _, err) = vdisk(&["handoff", s(&ctl_b), "activate"]);
    assert_eq!(code, 1);
    assert!(err.contains("in use by another process"), "{err}");

    // The handoff.
    let (code, out, err) = vdisk(&["handoff", s(&ctl_a), "inactivate"]);
    assert_eq!((code, out.as_str()), (0, "(default): inactive\n"), "{err}");
    assert_qemu_clean(&img, "qcow2");
    assert_clean_header(&img);
    let (code, out, err) = vdisk(&["handoff", s(&ctl_b), "activate"]);
    assert_eq!((code, out.as_str()), (0, "(default): active\n"), "{err}");
    let (code, out) = nbd_io(&nbd_b, "read -P 0xa1 0 64k");
    assert!(code == 0 && !out.contains("Pattern verification failed"), "{out}");
    let (code, out) = nbd_io(&nbd_b, "write -P 0xb2 1M 64k");
    assert_eq!(code, 0, "{out}");
    let (code, out) = nbd_io(&nbd_a, "write -P 0x01 0 4k");
    assert!(code != 0 || out.contains("error") || out.contains("failed"), "write to the inactive source: {out}");
    let (code, _, err) = vdisk(&["handoff", s(&ctl_a), "activate"]);
    assert_eq!(code, 1, "the source cannot take the image back while the destination holds it");
    assert!(err.contains("in use by another process"), "{err}");
    let (code, _, err) = vdisk(&["handoff", s(&ctl_b), "bogus"]);
    assert_ne!(code, 0, "{err}");
    drop(a);
    drop(b);
    assert!(!ctl_a.exists() && !ctl_b.exists(), "the control sockets are removed on exit");
    assert_qemu_clean(&img, "qcow2");
    let data = qemu_export(&img, "qcow2");
    assert!(data[..65536].iter().all(|&x| x == 0xa1));
    assert!(data[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0xb2));
}

/// `serve --pool --inactive`: pool volumes served by name hand off like
/// images named by path.
#[test]
fn serve_hands_off_pool_volumes() {
    use vdisk::pool::{PoolDef, Registry, RegistryPaths, VolumeSpec};
    if !have_qemu() {
        return;
    }
    let nbd_named = |sock: &Path, cmd: &str| {
        let uri = format!("nbd+unix:///guest.qcow2?socket={}", sock.display());
        let (code, out, err) = run_status("qemu-io", &["-f", "raw", &uri, "-c", cmd]);
        (code, format!("{out}{err}"))
    };
    let dir = tmp();
    let d = dir.path();
    let cfg = p(d, "config");
    let reg = Registry::open(RegistryPaths::new(&cfg).without_libvirt()).unwrap();
    let pool = reg.define(PoolDef::dir("vms", p(d, "vms")).unwrap()).unwrap();
    pool.build().unwrap();
    pool.start().unwrap();
    pool.create_volume(&VolumeSpec::new("guest.qcow2", 16 << 20, Format::Qcow2).unwrap(), None).unwrap();
    let img = pool.canonical_target().join("guest.qcow2");
    let (ctl_a, ctl_b, nbd_a, nbd_b) = (p(d, "a.ctl"), p(d, "b.ctl"), p(d, "a.nbd"), p(d, "b.nbd"));
    let common = ["--config-dir", s(&cfg), "--pool", "vms"];
    let a = Served::start(
        &[&common[..], &["--control", s(&ctl_a), "-k", s(&nbd_a), "guest.qcow2"]].concat(),
        p(d, "a.pid"),
    );
    let (code, out) = nbd_named(&nbd_a, "write -P 0xa1 0 64k");
    assert_eq!(code, 0, "{out}");
    let b = Served::start(
        &[&common[..], &["--inactive", "--control", s(&ctl_b), "-k", s(&nbd_b), "guest.qcow2"]].concat(),
        p(d, "b.pid"),
    );
    let (code, out, _) = vdisk(&["handoff", s(&ctl_b), "status"]);
    assert_eq!((code, out.as_str()), (0, "guest.qcow2: inactive\n"));
    let (code, _, err) = vdisk(&["handoff", s(&ctl_b), "activate"]);
    assert_eq!(code, 1);
    assert!(err.contains("in use by another process"), "{err}");
    let (code, out, err) = vdisk(&["handoff", s(&ctl_a), "inactivate"]);
    assert_eq!((code, out.as_str()), (0, "guest.qcow2: inactive\n"), "{err}");
    assert_qemu_clean(&img, "qcow2");
    let (code, out, err) = vdisk(&["handoff", s(&ctl_b), "activate"]);
    assert_eq!((code, out.as_str()), (0, "guest.qcow2: active\n"), "{err}");
    let (code, out) = nbd_named(&nbd_b, "read -P 0xa1 0 64k");
    assert!(code == 0 && !out.contains("Pattern verification failed"), "{out}");
    let (code, out) = nbd_named(&nbd_b, "write -P 0xb2 1M 64k");
    assert_eq!(code, 0, "{out}");
    drop(a);
    drop(b);
    assert_qemu_clean(&img, "qcow2");
    let data = qemu_export(&img, "qcow2");
    assert!(data[..65536].iter().all(|&x| x == 0xa1));
    assert!(data[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0xb2));
}

/// The handoff workload on one shared storage: A writes and inactivates, B
/// (opened inactive) activates, writes and inactivates, A activates and
/// writes again. Returns the guest content that must be durable when the
/// storage failed (after each completed inactivate or close) and the ranges
/// written since.
fn handoff_workload(
    st: &Arc<FaultyStorage>,
    durable: &mut Vec<u8>,
    touched: &mut Vec<(u64, u64)>,
) -> vdisk::Result<()> {
    let mut model = durable.clone();
    let write = |q: &Qcow2, model: &mut Vec<u8>, touched: &mut Vec<(u64, u64)>, off: u64, len: usize, b: u8| {
        touched.push((off, len as u64));
        q.write_at(&vec![b; len], off)?;
        model[off as usize..off as usize + len].fill(b);
        Ok::<(), vdisk::Error>(())
    };
    let storage: Arc<dyn vdisk::Storage> = st.clone();
    let a = Qcow2::open(storage.clone(), Qcow2Options::default())?;
    write(&a, &mut model, touched, 0, 8192, 0xa1)?;
    write(&a, &mut model, touched, 1 << 18, 4096, 0xa2)?;
    a.inactivate()?;
    (*durable, *touched) = (model.clone(), Vec::new());
    let b = Qcow2::open(storage, Qcow2Options { inactive: true, ..Default::default() })?;
    b.activate()?;
    write(&b, &mut model, touched, 4096, 8192, 0xb1)?;
    write(&b, &mut model, touched, 3 << 18, 65536, 0xb2)?;
    touched.push((1 << 18, 4096));
    b.discard(1 << 18, 4096)?;
    model[1 << 18..(1 << 18) + 4096].fill(0);
    b.inactivate()?;
    (*durable, *touched) = (model.clone(), Vec::new());
    a.activate()?;
    write(&a, &mut model, touched, 2 << 18, 4096, 0xa3)?;
    drop(b);
    a.close()?;
    *durable = model;
    touched.clear();
    Ok(())
}

#[test]
fn a_crash_at_any_step_of_a_handoff_leaks_at_most() {
    if !have_qemu() {
        return;
    }
    const SIZE: u64 = 1 << 20;
    let fresh = {
        let st = Arc::new(MemStorage::new());
        let mut o = CreateOptions::new(SIZE);
        o.lazy_refcounts = true;
        o.cluster_size = 4096;
        Qcow2::create(st.clone(), &o, Qcow2Options::default()).unwrap().close().unwrap();
        st.to_vec()
    };
    let run = |budget: Option<u64>| {
        let st = Arc::new(FaultyStorage::new(fresh.clone(), budget, FaultMode::PowerLoss));
        let (mut durable, mut touched) = (vec![0u8; SIZE as usize], Vec::new());
        let r = handoff_workload(&st, &mut durable, &mut touched);
        if budget.is_none() {
            r.unwrap();
        }
        (st, durable, touched)
    };
    let (full, _, _) = run(None);
    let total = full.ops();
    let dir = tmp();
    let img = p(dir.path(), "crash.qcow2");
    for n in (1..=total).filter(|n| *n < 120 || n % 3 == 0) {
        let (st, durable, touched) = run(Some(n));
        for s in [Survivors::All, Survivors::None, Survivors::Some(n * 7919)] {
            let what = format!("cut {n}/{total}, {s:?}");
            let bytes = st.crashed_image(s);
            let mem = Arc::new(MemStorage::from_vec(bytes.clone()));
            // Opening read-write repairs what lazy refcounts left behind.
            let q = Qcow2::open(mem.clone(), Qcow2Options::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let rep = q.check(Repair::None).unwrap();
            assert_eq!(rep.corruptions, 0, "{what}: {:?}", rep.messages);
            let got = read_all(&q);
            let mut mask = vec![true; SIZE as usize];
            for &(o, l) in &touched {
                mask[o as usize..(o + l) as usize].fill(false);
            }
            if let Some(i) = (0..SIZE as usize).find(|&i| mask[i] && got[i] != durable[i]) {
                panic!("{what}: data made durable by a handoff lost at {i:#x}");
            }
            drop(q);
            std::fs::write(&img, mem.to_vec()).unwrap();
            let (code, out) = qemu_check(&img, "qcow2");
            assert!(code == 0 || code == 3, "{what}: qemu-img check found corruption:\n{out}");
        }
    }
}

#[test]
fn activating_a_1tib_image_is_quick() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let img = p(dir.path(), "big.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", s(&img), "1T"]);
    let writes: Vec<String> = (0..16u64).map(|i| format!("write -P {i} {}G 64k", i * 64 + 3)).collect();
    qemu_io("qcow2", &img, &writes);
    let a = open_rw(&img, Format::Qcow2);
    a.write_at(&[0xa1; 65536], 1 << 30).unwrap();
    let t = Instant::now();
    a.inactivate().unwrap();
    let inactivate = t.elapsed();
    let t = Instant::now();
    a.activate().unwrap();
    let activate = t.elapsed();
    eprintln!("1 TiB qcow2: inactivate {inactivate:?}, activate {activate:?}");
    let mut buf = vec![0u8; 65536];
    a.read_at(&mut buf, (15 * 64 + 3) << 30).unwrap();
    assert!(buf.iter().all(|&b| b == 15));
    // Generous for debug builds on a loaded machine; the release figure is
    // in the README.
    assert!(activate < Duration::from_secs(1), "activate took {activate:?}");
}

#[test]
fn activation_refuses_an_image_whose_fixed_parts_changed() {
    if !have_qemu() {
        return;
    }
    let dir = tmp();
    let (base, other, img) = (p(dir.path(), "base.raw"), p(dir.path(), "other.raw"), p(dir.path(), "top.qcow2"));
    std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    std::fs::write(&other, vec![0x22u8; 1 << 20]).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&img)]);
    let a = open_rw(&img, Format::Qcow2);
    a.write_at(&[0xa1; 4096], 0).unwrap();
    a.inactivate().unwrap();
    // The other side moves the image onto another backing file.
    qemu_img(&["rebase", "-q", "-u", "-f", "qcow2", "-b", "other.raw", "-F", "raw", s(&img)]);
    let e = a.activate().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("backing file changed"), "{e}");
    assert!(a.is_inactive(), "a refused activation leaves the device inactive");
    // And the locks were handed back: another process can take the image.
    qemu_io("qcow2", &img, &["write -P 0x33 4096 4096".to_string()]);
    drop(a);
    assert_qemu_clean(&img, "qcow2");
}
