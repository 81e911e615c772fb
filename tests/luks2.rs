//! LUKS2 with cryptsetup as the oracle: volumes `cryptsetup luksFormat
//! --type luks2` makes (PBKDF2, argon2i, argon2id; sector sizes 512 to
//! 4096; several key slots, a removed one, cryptsetup's default argon2id)
//! are read byte-exact by vdisk; volumes vdisk makes are accepted by
//! `cryptsetup luksDump` and unlocked by `cryptsetup open --test-passphrase`.
//!
//! There is no device mapper here, so the payload is checked two
//! independent ways: cryptsetup itself encrypts and decrypts a payload in
//! place (`reencrypt --encrypt` / `--decrypt` with a detached header, run
//! in user space), and Python's `cryptography` (OpenSSL's AES, not vdisk's)
//! encrypts and decrypts with the volume key `luksDump --dump-volume-key`
//! prints. Hostile headers (a table) each give their named error within
//! seconds.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{run, run_status};
use sha2::{Digest, Sha256};
use vdisk::device::FormatDetails;
use vdisk::luks::{Luks, Luks2Params};
use vdisk::{BlockDevice, ErrorKind, FileStorage, Format, OpenOptions, Secret, Storage};

const PASS: &str = "correct horse";
const OBJ: &str = "secret,id=sec0,data=correct horse";
/// Where cryptsetup and vdisk put the payload by default.
const DATA: u64 = 16 << 20;

/// cryptsetup and Python's `cryptography` (both installed by
/// `scripts/test.sh`).
fn have_tools() -> bool {
    let cs = run_status("cryptsetup", &["--version"]).0 == 0;
    let py = run_status("python3", &["-c", "import cryptography"]).0 == 0;
    if cs && py {
        return true;
    }
    if std::env::var("VDISK_SKIP_CRYPTSETUP").as_deref() == Ok("1") {
        return false;
    }
    panic!("the LUKS2 tests need cryptsetup and python3-cryptography: apt-get install -y --no-install-recommends cryptsetup-bin python3-cryptography");
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A pass file holding `pass`.
fn keyfile(dir: &Path, name: &str, pass: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, pass).unwrap();
    s(&p)
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The volume key cryptsetup prints.
fn volume_key(img: &str, kf: &str) -> Vec<u8> {
    let out = run("cryptsetup", &["luksDump", "--dump-volume-key", "--batch-mode", "--key-file", kf, img]);
    let dump = out.split("MK dump:").nth(1).expect("no MK dump");
    let hex: String = dump.split_whitespace().filter(|w| w.len() == 2).collect();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

/// Encrypts (`enc`) or decrypts `data` with OpenSSL through Python, as
/// dm-crypt does for LUKS2: units of `sector` bytes, IV = the number of
/// the unit's first 512-byte sector plus `iv_tweak`.
fn openssl(enc: bool, key: &[u8], cipher: &str, sector: u32, iv_tweak: u64, data: &[u8]) -> Vec<u8> {
    const SCRIPT: &str = r#"
import sys, hashlib
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
op, keyhex, ciph, ss, tw = sys.argv[1:6]
key = bytes.fromhex(keyhex); ss = int(ss); tw = int(tw)
_, mode, iv = ciph.split('-', 2)
data = sys.stdin.buffer.read(); out = bytearray()
for i in range(0, len(data), ss):
    sec = tw + i // 512
    if iv == 'plain64': ivb = sec.to_bytes(16, 'little')
    elif iv == 'plain': ivb = (sec & 0xffffffff).to_bytes(16, 'little')
    else:
        h = hashlib.new(iv.split(':')[1], key).digest()
        ivb = Cipher(algorithms.AES(h), modes.ECB()).encryptor().update(sec.to_bytes(16, 'little'))
    c = Cipher(algorithms.AES(key), modes.XTS(ivb) if mode == 'xts' else modes.CBC(ivb))
    x = c.encryptor() if op == 'enc' else c.decryptor()
    out += x.update(data[i:i + ss]) + x.finalize()
sys.stdout.buffer.write(out)
"#;
    use std::io::Write;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT, if enc { "enc" } else { "dec" }, &hex, cipher, &sector.to_string(), &iv_tweak.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), data.len());
    out.stdout
}

fn open(img: &Path, pass: &str) -> vdisk::Result<vdisk::Image> {
    OpenOptions::new().format(Format::Luks).key(Secret::new(pass)).open(img)
}

fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let mut b = vec![0u8; d.size() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

fn luks_details(d: &dyn BlockDevice) -> vdisk::luks::LuksDetails {
    match d.info().details {
        FormatDetails::Luks(l) => l,
        other => panic!("not LUKS details: {other:?}"),
    }
}

/// Fast key derivation for cryptsetup: `kdf` with small costs.
fn fast(kdf: &str) -> Vec<&'static str> {
    match kdf {
        "pbkdf2" => vec!["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
        "argon2i" => vec!["--pbkdf", "argon2i", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768"],
        _ => vec!["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768"],
    }
}

/// cryptsetup volumes across KDFs, ciphers and sector sizes: a payload
/// OpenSSL encrypted with the volume key reads byte-exact in vdisk; what
/// vdisk writes (unaligned, across sectors) OpenSSL decrypts to the same
/// bytes; cryptsetup still unlocks the volume afterwards and its header
/// is untouched.
#[test]
fn cryptsetup_volumes_read_and_written_byte_exact() {
    if !have_tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let kf = keyfile(d.path(), "pass", PASS);
    let cases: [(&str, &str, &str, u32, &[&str]); 5] = [
        ("pbkdf2", "aes-xts-plain64", "256", 512, &["--hash", "sha512"]),
        ("argon2i", "aes-xts-plain64", "512", 4096, &[]),
        ("argon2id", "aes-cbc-essiv:sha256", "256", 2048, &[]),
        ("argon2id", "aes-xts-plain64", "512", 1024, &[]),
        ("pbkdf2", "aes-cbc-plain64", "128", 512, &["--hash", "sha1"]),
    ];
    for (i, (kdf, cipher, bits, ss, extra)) in cases.iter().enumerate() {
        let what = format!("{kdf} {cipher} {bits} sector {ss}");
        let img = d.path().join(format!("c{i}.img"));
        let is = s(&img);
        std::fs::write(&img, vec![0u8; (DATA + (1 << 20)) as usize]).unwrap();
        let ss_s = ss.to_string();
        let mut args =
            vec!["luksFormat", "-q", "--type", "luks2", "--key-file", &kf, "--cipher", cipher, "--key-size", bits];
        args.extend(["--sector-size", &ss_s]);
        args.extend(fast(kdf));
        args.extend(extra.iter().copied());
        args.push(&is);
        run("cryptsetup", &args);
        let key = volume_key(&is, &kf);
        let plain = pattern(1 << 20, i as u32);
        let mut file = std::fs::read(&img).unwrap();
        file[DATA as usize..].copy_from_slice(&openssl(true, &key, cipher, *ss, 0, &plain));
        std::fs::write(&img, &file).unwrap();
        let header_before = file[..DATA as usize].to_vec();

        let v = open(&img, PASS).unwrap();
        assert_eq!(v.size(), 1 << 20, "{what}");
        assert!(read_all(&v) == plain, "{what}: vdisk reads other bytes than OpenSSL encrypted");
        let l = luks_details(&v);
        let l2 = l.luks2.as_ref().unwrap();
        assert_eq!(l2.sector_size, *ss, "{what}");
        assert_eq!(l2.keyslots[0].kdf, *kdf, "{what}");
        // Unaligned writes across sector boundaries.
        let new = pattern(10_000, 99);
        v.write_at(&new, 1000).unwrap();
        v.write_at(&new[..7], (1 << 20) - 7).unwrap();
        v.close().unwrap();
        let mut want = plain.clone();
        want[1000..11_000].copy_from_slice(&new);
        let n = want.len();
        want[n - 7..].copy_from_slice(&new[..7]);
        let file = std::fs::read(&img).unwrap();
        assert!(file[..DATA as usize] == header_before[..], "{what}: the header changed");
        let got = openssl(false, &key, cipher, *ss, 0, &file[DATA as usize..]);
        assert!(got == want, "{what}: OpenSSL decrypts other bytes than vdisk wrote");
        let (c, _, e) = run_status("cryptsetup", &["open", "--test-passphrase", "--key-file", &kf, &is]);
        assert_eq!(c, 0, "{what}: {e}");
    }
}

/// cryptsetup encrypts a plain file in place (`reencrypt --encrypt` with a
/// detached header: user-space crypto, no device mapper); vdisk reads it
/// through the detached header byte-exact, writes to it, and cryptsetup
/// decrypts it in place to exactly what vdisk wrote.
#[test]
fn cryptsetup_writes_the_payload_and_decrypts_what_vdisk_wrote() {
    if !have_tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let kf = keyfile(d.path(), "pass", PASS);
    for ss in ["4096", "512"] {
        let data = d.path().join(format!("data{ss}.img"));
        let hdr = d.path().join(format!("hdr{ss}.img"));
        let plain = pattern(1 << 20, 5);
        std::fs::write(&data, &plain).unwrap();
        let mut args = vec!["reencrypt", "--encrypt", "-q", "--type", "luks2", "--key-file", &kf];
        let (hs, ds) = (s(&hdr), s(&data));
        args.extend(["--header", &hs, "--sector-size", ss]);
        args.extend(fast("argon2id"));
        args.push(&ds);
        run("cryptsetup", &args);
        assert_ne!(std::fs::read(&data).unwrap(), plain);
        let v = OpenOptions::new().format(Format::Luks).luks_header(&hdr).key(Secret::new(PASS)).open(&data).unwrap();
        assert!(read_all(&v) == plain, "sector {ss}: vdisk reads other bytes than cryptsetup encrypted");
        assert!(luks_details(&v).detached_header);
        let new = pattern(70_000, 6);
        v.write_at(&new, 12_345).unwrap();
        v.close().unwrap();
        let mut want = plain.clone();
        want[12_345..82_345].copy_from_slice(&new);
        run(
            "cryptsetup",
            &["reencrypt", "--decrypt", "-q", "--force-offline-reencrypt", "--key-file", &kf, "--header", &hs, &ds],
        );
        assert!(std::fs::read(&data).unwrap() == want, "sector {ss}: cryptsetup decrypts other bytes than vdisk wrote");
    }
}

/// Several key slots of different KDFs, one removed, one set to priority
/// "ignore": each live passphrase opens the same volume, the removed one
/// is refused, the ignored one is not tried (as cryptsetup does).
#[test]
fn several_slots_a_removed_one_and_priorities() {
    if !have_tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("k.img");
    let is = s(&img);
    std::fs::write(&img, vec![0u8; (DATA + (256 << 10)) as usize]).unwrap();
    let k0 = keyfile(d.path(), "k0", "zero");
    let k1 = keyfile(d.path(), "k1", "one");
    let k2 = keyfile(d.path(), "k2", "two");
    let k3 = keyfile(d.path(), "k3", "three");
    let mut f = vec!["luksFormat", "-q", "--type", "luks2", "--key-file", &k0];
    f.extend(fast("pbkdf2"));
    f.push(&is);
    run("cryptsetup", &f);
    for (k, kdf) in [(&k1, "argon2i"), (&k2, "argon2id"), (&k3, "pbkdf2")] {
        let mut a = vec!["luksAddKey", "-q", "--key-file", &k0];
        a.extend(fast(kdf));
        a.extend([is.as_str(), k.as_str()]);
        run("cryptsetup", &a);
    }
    run("cryptsetup", &["luksKillSlot", "-q", "--key-file", &k0, &is, "1"]);
    run("cryptsetup", &["config", "--priority", "ignore", "--key-slot", "3", &is]);
    let key = volume_key(&is, &k0);
    let plain = pattern(256 << 10, 3);
    let mut file = std::fs::read(&img).unwrap();
    file[DATA as usize..].copy_from_slice(&openssl(true, &key, "aes-xts-plain64", 4096, 0, &plain));
    std::fs::write(&img, &file).unwrap();
    for pass in ["zero", "two"] {
        let v = open(&img, pass).unwrap();
        assert!(read_all(&v) == plain, "{pass}");
    }
    for pass in ["one", "three", "nope"] {
        let e = open(&img, pass).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Crypto, "{pass}: {e}");
    }
    let i = OpenOptions::new().format(Format::Luks).inspect_only(true).open(&img);
    let l = luks_details(&i.unwrap());
    let l2 = l.luks2.unwrap();
    let slots: Vec<(u32, &str, u8)> = l2.keyslots.iter().map(|k| (k.id, k.kdf.as_str(), k.priority)).collect();
    assert_eq!(slots, [(0, "pbkdf2", 1), (2, "argon2id", 1), (3, "pbkdf2", 0)]);
    assert!(l2.seqid > 1);
}

/// A volume made with cryptsetup's defaults (argon2id timed to two
/// seconds, memory up to 1 GiB) opens within the limits.
#[test]
fn default_argon2id_volume_opens() {
    if !have_tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let kf = keyfile(d.path(), "pass", PASS);
    let img = d.path().join("def.img");
    std::fs::write(&img, vec![0u8; (DATA + 65536) as usize]).unwrap();
    run("cryptsetup", &["luksFormat", "-q", "--type", "luks2", "--key-file", &kf, &s(&img)]);
    let dump = run("cryptsetup", &["luksDump", &s(&img)]);
    assert!(dump.contains("argon2id"), "{dump}");
    let t = Instant::now();
    let v = open(&img, PASS).unwrap();
    eprintln!("cryptsetup default argon2id slot opened in {:?}", t.elapsed());
    let l = luks_details(&v);
    let k = &l.luks2.unwrap().keyslots[0];
    assert_eq!(k.kdf, "argon2id");
    assert!(k.memory_kib.unwrap() >= 32 << 10 && k.time.unwrap() >= 4, "{k:?}");
    assert_eq!(v.size(), 65536);
}

/// Volumes `vdisk create -f luks -o luks-version=2` makes (each KDF, sector
/// sizes, ciphers): luksDump shows what was asked, `open --test-passphrase`
/// unlocks with the passphrase and refuses another, what vdisk writes
/// OpenSSL decrypts with the volume key cryptsetup recovers; cryptsetup
/// adds a key slot to it and vdisk opens with that one.
#[test]
fn vdisk_volumes_accepted_and_unlocked_by_cryptsetup() {
    if !have_tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let kf = keyfile(d.path(), "pass", PASS);
    let bad = keyfile(d.path(), "bad", "wrong horse");
    let newk = keyfile(d.path(), "new", "new horse");
    let vd = env!("CARGO_BIN_EXE_vdisk");
    let cases = [
        ("pbkdf=pbkdf2,iter-time=10", "pbkdf2", "aes-xts-plain64", 512u32),
        ("pbkdf=argon2i,pbkdf-memory=8192,iter-time=10,sector-size=4096", "argon2i", "aes-xts-plain64", 4096),
        (
            "pbkdf=argon2id,pbkdf-memory=8192,iter-time=10,sector-size=2048,cipher-mode=cbc,ivgen-alg=essiv,cipher-alg=aes-128",
            "argon2id",
            "aes-cbc-essiv:sha256",
            2048,
        ),
    ];
    for (i, (o, kdf, cipher, ss)) in cases.iter().enumerate() {
        let img = d.path().join(format!("v{i}.img"));
        let is = s(&img);
        let opts = format!("luks-version=2,key-secret=sec0,label=vd{i},{o}");
        run(vd, &["create", "-q", "--object", OBJ, "-f", "luks", "-o", &opts, &is, "1M"]);
        let dump = run("cryptsetup", &["luksDump", &is]);
        assert!(dump.contains("Version:       \t2"), "{dump}");
        assert!(dump.contains(&format!("PBKDF:      {kdf}")), "{dump}");
        assert!(dump.contains(&format!("sector: {ss} [bytes]")), "{dump}");
        assert!(dump.contains(&format!("cipher: {cipher}")), "{dump}");
        assert!(dump.contains(&format!("Label:          \tvd{i}")) || dump.contains(&format!("vd{i}")), "{dump}");
        assert_eq!(run_status("cryptsetup", &["open", "--test-passphrase", "--key-file", &kf, &is]).0, 0);
        assert_ne!(run_status("cryptsetup", &["open", "--test-passphrase", "--key-file", &bad, &is]).0, 0);
        let io = format!("driver=luks,file.filename={is},key-secret=sec0");
        run(
            vd,
            &["io", "--object", OBJ, "--image-opts", &io, "-c", "write -P 0x5c 0 1M", "-c", "write -P 0xa3 3000 5000"],
        );
        let mut want = vec![0x5cu8; 1 << 20];
        want[3000..8000].fill(0xa3);
        let key = volume_key(&is, &kf);
        let file = std::fs::read(&img).unwrap();
        assert_eq!(file.len() as u64, DATA + (1 << 20));
        assert!(openssl(false, &key, cipher, *ss, 0, &file[DATA as usize..]) == want, "{o}: OpenSSL disagrees");
        // cryptsetup edits vdisk's metadata; vdisk follows.
        let mut a = vec!["luksAddKey", "-q", "--key-file", &kf];
        a.extend(fast("pbkdf2"));
        a.extend([is.as_str(), newk.as_str()]);
        run("cryptsetup", &a);
        let v = open(&img, "new horse").unwrap();
        assert!(read_all(&v) == want);
        assert_eq!(luks_details(&v).luks2.unwrap().keyslots.len(), 2);
    }
}

/// A wrong passphrase is a `Crypto` error naming the passphrase, from the
/// library and the CLI, and the file is not changed.
#[test]
fn wrong_passphrase_is_a_crypto_error_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("w.img");
    base_volume(&img);
    let before = std::fs::read(&img).unwrap();
    let e = open(&img, "wrong").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Crypto, "{e}");
    assert!(e.to_string().contains("passphrase"), "{e}");
    let e = OpenOptions::new().format(Format::Luks).open(&img).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Crypto, "{e}");
    let io = format!("driver=luks,file.filename={},key-secret=sec0", s(&img));
    let (c, _, err) = run_status(
        env!("CARGO_BIN_EXE_vdisk"),
        &["io", "--object", "secret,id=sec0,data=nope", "--image-opts", &io, "-c", "write 0 512"],
    );
    assert_ne!(c, 0);
    assert!(err.contains("passphrase"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before, "a failed open changed the file");
}

/// A small volume for the hostile table: PBKDF2 at the minimum, 64 KiB of
/// payload.
fn base_volume(img: &Path) {
    let st: std::sync::Arc<dyn Storage> = std::sync::Arc::new(FileStorage::create(img).unwrap());
    let p = Luks2Params { kdf: vdisk::luks::KdfKind::Pbkdf2, iter_time_ms: 1, ..Default::default() };
    let l = Luks::create_luks2(st, None, 65536, &p, &Secret::new(PASS)).unwrap();
    l.write_at(&[0x42; 65536], 0).unwrap();
    l.close().unwrap();
}

const HDR: usize = 16384;

fn json_of(file: &[u8], copy: usize) -> String {
    let a = &file[copy * HDR + 4096..(copy + 1) * HDR];
    String::from_utf8(a[..a.iter().position(|&c| c == 0).unwrap()].to_vec()).unwrap()
}

/// Puts `json` into copy `copy` and makes its checksum valid again.
fn set_json(file: &mut [u8], copy: usize, json: &str) {
    let c = &mut file[copy * HDR..(copy + 1) * HDR];
    c[4096..].fill(0);
    c[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
    reseal(c);
}

fn reseal(c: &mut [u8]) {
    c[448..512].fill(0);
    let sum = Sha256::digest(&*c);
    c[448..480].copy_from_slice(&sum);
}

/// Hostile headers, each refused with its error kind naming the field,
/// within a few seconds; one damaged copy is tolerated.
#[test]
fn hostile_headers() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("base.img");
    base_volume(&img);
    let base = std::fs::read(&img).unwrap();
    let j = json_of(&base, 0);
    let kdf_start = j.find("\"kdf\":").unwrap();
    let kdf_end = kdf_start + j[kdf_start..].find('}').unwrap() + 1;
    let kdf_text = &j[kdf_start..kdf_end];
    let salt = kdf_text.split("\"salt\":").nth(1).unwrap().trim_end_matches('}');
    let argon = |t: u64, m: u64, c: u64| {
        j.replace(
            kdf_text,
            &format!("\"kdf\":{{\"type\":\"argon2id\",\"time\":{t},\"memory\":{m},\"cpus\":{c},\"salt\":{salt}}}"),
        )
    };
    let ks_start = j.find("\"0\":{\"type\":\"luks2\"").unwrap();
    let ks_end = j.find(",\"tokens\"").unwrap() - 1;
    let slot0 = &j[ks_start..ks_end];
    let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
    // (the key slot's iterations changed, the digest's changed)
    let iters = |x: &str| {
        let (a, b) = j.split_at(j.find("\"digests\"").unwrap());
        let to = format!("\"iterations\":{x}");
        let first = |t: &str| {
            let i = t.find("\"iterations\":").unwrap();
            let end = i + t[i..].find([',', '}']).unwrap();
            t[i..end].to_string()
        };
        (a.replacen(&first(a), &to, 1) + b, a.to_string() + &b.replacen(&first(b), &to, 1))
    };
    type Case = (&'static str, String, ErrorKind, &'static str);
    let cases: Vec<Case> = vec![
        (
            "json too deep",
            j.replace(
                "\"tokens\":{}",
                &format!("\"tokens\":{{\"0\":{{\"type\":\"x\",\"keyslots\":[],\"a\":{deep}}}}}"),
            ),
            ErrorKind::LimitExceeded,
            "json",
        ),
        ("not json", "{\"keyslots\":".into(), ErrorKind::InvalidImage, "json"),
        (
            "duplicate key",
            j.replacen("{\"keyslots\"", "{\"tokens\":{},\"keyslots\"", 1),
            ErrorKind::InvalidImage,
            "json",
        ),
        (
            "negative key size",
            j.replacen("\"key_size\":64", "\"key_size\":-64", 1),
            ErrorKind::InvalidImage,
            "keyslots.key_size",
        ),
        ("fractional iterations", iters("1.5e3").1, ErrorKind::InvalidImage, "digests.iterations"),
        (
            "offset not a number",
            j.replace("\"offset\":\"16777216\"", "\"offset\":\"16777216x\""),
            ErrorKind::InvalidImage,
            "segments.offset",
        ),
        ("huge key-slot iterations", iters("4294967295").0, ErrorKind::LimitExceeded, "keyslots.kdf.iterations"),
        ("huge digest iterations", iters("4294967295").1, ErrorKind::LimitExceeded, "digests.iterations"),
        ("zero iterations", iters("0").0, ErrorKind::InvalidImage, "keyslots.kdf.iterations"),
        ("huge argon2 memory", argon(4, 4 << 20, 4), ErrorKind::LimitExceeded, "keyslots.kdf.memory"),
        ("huge argon2 time", argon(1 << 20, 1 << 20, 4), ErrorKind::LimitExceeded, "keyslots.kdf.time"),
        ("too many argon2 lanes", argon(4, 65536, 1000), ErrorKind::LimitExceeded, "keyslots.kdf.cpus"),
        (
            "too many stripes",
            j.replace("\"stripes\":4000", "\"stripes\":40000"),
            ErrorKind::LimitExceeded,
            "keyslots.af.stripes",
        ),
        (
            "overlapping areas",
            j.replace(slot0, &format!("{slot0},{}", slot0.replacen("\"0\"", "\"1\"", 1))),
            ErrorKind::InvalidImage,
            "keyslots.area.offset",
        ),
        (
            "area outside the key-slot area",
            j.replace("\"offset\":\"32768\"", "\"offset\":\"1099511627776\""),
            ErrorKind::InvalidImage,
            "keyslots.area.offset",
        ),
        (
            "area too small",
            j.replace("\"size\":\"258048\"", "\"size\":\"4096\""),
            ErrorKind::InvalidImage,
            "keyslots.area.size",
        ),
        (
            "segment inside the key-slot area",
            j.replace("\"offset\":\"16777216\"", "\"offset\":\"1048576\""),
            ErrorKind::InvalidImage,
            "segments.offset",
        ),
        (
            "segment past the end of the file",
            j.replace("\"offset\":\"16777216\"", "\"offset\":\"1099511627776\""),
            ErrorKind::InvalidImage,
            "segments.offset",
        ),
        (
            "fixed size past the end",
            j.replace("\"size\":\"dynamic\"", "\"size\":\"1048576\""),
            ErrorKind::InvalidImage,
            "segments.size",
        ),
        (
            "keyslots_size past the payload",
            j.replace("\"keyslots_size\":\"16744448\"", "\"keyslots_size\":\"33521664\""),
            ErrorKind::InvalidImage,
            "segments.offset",
        ),
        (
            "json_size mismatch",
            j.replace("\"json_size\":\"12288\"", "\"json_size\":\"28672\""),
            ErrorKind::InvalidImage,
            "config.json_size",
        ),
        (
            "sector size 8192",
            j.replace("\"sector_size\":512", "\"sector_size\":8192"),
            ErrorKind::InvalidImage,
            "segments.sector_size",
        ),
        (
            "unknown cipher",
            j.replace(
                "\"encryption\":\"aes-xts-plain64\",\"sector_size\"",
                "\"encryption\":\"twofish-xts-plain64\",\"sector_size\"",
            ),
            ErrorKind::Unsupported,
            "segments.encryption",
        ),
        (
            "unknown kdf",
            j.replace("\"type\":\"pbkdf2\",\"hash\"", "\"type\":\"scrypt\",\"hash\""),
            ErrorKind::Unsupported,
            "keyslots.kdf.type",
        ),
        (
            "integrity",
            j.replace("\"sector_size\":512", "\"sector_size\":512,\"integrity\":{\"type\":\"hmac(sha256)\"}"),
            ErrorKind::Unsupported,
            "segments.integrity",
        ),
        (
            "two segments",
            j.replace("\"segments\":{\"0\":", "\"segments\":{\"1\":{\"type\":\"linear\"},\"0\":"),
            ErrorKind::Unsupported,
            "segments",
        ),
        (
            "mandatory requirement",
            j.replace("\"config\":{", "\"config\":{\"requirements\":{\"mandatory\":[\"online-reencrypt-v2\"]},"),
            ErrorKind::Unsupported,
            "config.requirements",
        ),
        (
            "33 key slots",
            j.replace(
                slot0,
                &(0..33).map(|i| slot0.replacen("\"0\"", &format!("\"{i}\""), 1)).collect::<Vec<_>>().join(","),
            ),
            ErrorKind::LimitExceeded,
            "keyslots",
        ),
        (
            "digest names no slot",
            j.replace("\"keyslots\":[\"0\"]", "\"keyslots\":[\"7\"]"),
            ErrorKind::InvalidImage,
            "digests.keyslots",
        ),
    ];
    for (what, json, kind, field) in &cases {
        if json.is_empty() || json == &j {
            panic!("{what}: the mutation did not apply");
        }
        let mut f = base.clone();
        set_json(&mut f, 0, json);
        set_json(&mut f, 1, json);
        std::fs::write(&img, &f).unwrap();
        let t = Instant::now();
        let e = open(&img, PASS).map(|_| ()).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{what}: took {:?}", t.elapsed());
        assert_eq!((e.kind(), e.field()), (*kind, Some(*field)), "{what}: {e}");
        // Without the key too (inspection validates the same fields).
        let e2 = OpenOptions::new().format(Format::Luks).inspect_only(true).open(&img).map(|_| ()).unwrap_err();
        assert_eq!(e2.kind(), *kind, "{what} (inspect): {e2}");
    }

    // One damaged copy: the other is used; both: an error naming the
    // checksum. The primary's damage is found by its checksum.
    let mut f = base.clone();
    f[4096 + 5] ^= 0x20;
    std::fs::write(&img, &f).unwrap();
    let v = OpenOptions::new().format(Format::Luks).key(Secret::new(PASS)).read_only(true).open(&img).unwrap();
    assert_eq!(luks_details(&v).luks2.unwrap().copies_ok, [false, true]);
    let mut b = vec![0u8; 65536];
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![0x42; 65536]);
    drop(v);
    assert_eq!(std::fs::read(&img).unwrap(), f, "a read-only open wrote");
    f[HDR + 4096 + 5] ^= 0x20;
    std::fs::write(&img, &f).unwrap();
    let e = open(&img, PASS).map(|_| ()).unwrap_err();
    assert_eq!((e.kind(), e.field()), (ErrorKind::Corrupt, Some("csum")), "{e}");
    assert_eq!(std::fs::read(&img).unwrap(), f, "a failed open wrote");
    // A damaged or stale copy is rewritten from the good one by a writable
    // open with the passphrase (as cryptsetup does); the good one is not
    // touched. The primary's magic gone: still found through its secondary.
    let inspect = |img: &Path| {
        let i = OpenOptions::new().format(Format::Luks).inspect_only(true).open(img).unwrap();
        luks_details(&i).luks2.unwrap().copies_ok
    };
    for (what, damaged, good) in [("primary", 0usize, HDR), ("secondary", HDR, 0usize)] {
        let mut f = base.clone();
        f[damaged..damaged + 6].copy_from_slice(b"XXXXXX");
        std::fs::write(&img, &f).unwrap();
        assert!(inspect(&img).contains(&false), "{what}");
        assert!(open(&img, "wrong").is_err());
        assert_eq!(std::fs::read(&img).unwrap(), f, "{what}: a failed open wrote");
        let v = open(&img, PASS).unwrap();
        assert_eq!(luks_details(&v).luks2.unwrap().copies_ok, [true, true], "{what}");
        drop(v);
        let after = std::fs::read(&img).unwrap();
        assert_eq!(after[good..good + HDR], base[good..good + HDR], "{what}: the good copy changed");
        assert_eq!(inspect(&img), [true, true], "{what} not repaired");
        assert_eq!(after[2 * HDR..], base[2 * HDR..], "{what}: more than the header copy was written");
        if run_status("cryptsetup", &["--version"]).0 == 0 {
            let (c, _, e) = run_status("cryptsetup", &["luksDump", &s(&img)]);
            assert_eq!(c, 0, "{what}: cryptsetup refuses the repaired header: {e}");
        }
    }
    // A valid secondary with a higher seqid wins over the primary.
    let mut f = base.clone();
    let d_at = j.find("\"digests\"").unwrap();
    let j2 = j[..d_at].to_string() + &j[d_at..].replacen("\"iterations\":", "\"iterations\":1", 1);
    set_json(&mut f, 1, &j2);
    f[HDR + 16..HDR + 24].copy_from_slice(&7u64.to_be_bytes());
    reseal(&mut f[HDR..2 * HDR]);
    std::fs::write(&img, &f).unwrap();
    let e = open(&img, PASS).map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Crypto, "the secondary's changed iterations were not used: {e}");
    // hdr_size of 8 MiB (the JSON area too large) in both copies.
    let mut f = base.clone();
    for c in 0..2 {
        f[c * HDR + 8..c * HDR + 16].copy_from_slice(&(8u64 << 20).to_be_bytes());
        reseal(&mut f[c * HDR..(c + 1) * HDR]);
    }
    std::fs::write(&img, &f).unwrap();
    let e = open(&img, PASS).map(|_| ()).unwrap_err();
    assert_eq!(e.field(), Some("hdr_size"), "{e}");
}

/// Every cut of a volume before its payload is an error, never a panic;
/// a volume cut after its key material opens with a shorter payload.
#[test]
fn truncation() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("t.img");
    base_volume(&img);
    let base = std::fs::read(&img).unwrap();
    for cut in
        [0usize, 7, 100, 4095, 4096, 8000, 16383, 16384, 20000, 32767, 32768, 40000, 290_000, (DATA - 1) as usize]
    {
        std::fs::write(&img, &base[..cut]).unwrap();
        assert!(open(&img, PASS).is_err(), "cut at {cut} opened");
        let _ = OpenOptions::new().format(Format::Luks).inspect_only(true).open(&img);
    }
    std::fs::write(&img, &base[..DATA as usize + 4096]).unwrap();
    let v = open(&img, PASS).unwrap();
    assert_eq!(v.size(), 4096);
}

/// `vdisk info` of a LUKS2 volume without its passphrase: the LUKS2 facts
/// in the JSON (`format-specific.data`).
#[test]
fn info_without_the_key() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("i.img");
    base_volume(&img);
    let out = run(env!("CARGO_BIN_EXE_vdisk"), &["info", "--output", "json", &s(&img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let data = &v["format-specific"]["data"];
    assert_eq!(v["format-specific"]["type"], "luks");
    assert_eq!(data["version"], 2);
    assert_eq!(data["cipher-alg"], "aes-256");
    assert_eq!(data["cipher-mode"], "xts");
    assert_eq!(data["sector-size"], 512);
    assert_eq!(data["payload-offset"], DATA);
    assert_eq!(data["keyslots"][0]["kdf"], "pbkdf2");
    let st: std::sync::Arc<dyn Storage> = std::sync::Arc::new(FileStorage::open(&img, false).unwrap());
    let l =
        Luks::open(st, vdisk::luks::LuksOptions { inspect_only: true, read_only: true, ..Default::default() }).unwrap();
    let Some(vdisk::luks::Kdf::Pbkdf2 { iterations, .. }) = l.luks2_header().map(|h| h.keyslots[0].kdf.clone()) else {
        panic!("no PBKDF2 key slot")
    };
    assert_eq!(data["keyslots"][0]["iterations"], iterations);
    assert_eq!(data["header-copies"], serde_json::json!(["ok", "ok"]));
    assert_eq!(v["virtual-size"], 65536);
    let human = run(env!("CARGO_BIN_EXE_vdisk"), &["info", &s(&img)]);
    assert!(human.contains("version: 2") && human.contains("kdf: pbkdf2"), "{human}");
}

/// `vdisk amend` adds and removes LUKS2 key slots: cryptsetup unlocks with
/// the slots vdisk added and no longer with those it removed, its
/// luksDump follows the seqid ("Epoch"); the last slot is kept unless
/// forced. On a cryptsetup volume too, whose other slots survive.
#[test]
fn amend_adds_and_removes_slots_cryptsetup_agrees() {
    if !have_tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let vd = env!("CARGO_BIN_EXE_vdisk");
    let k0 = keyfile(d.path(), "k0", PASS);
    let k1 = keyfile(d.path(), "k1", "second");
    let objs = ["--object", OBJ, "--object", "secret,id=sec1,data=second"];
    let made_by_cryptsetup = d.path().join("cs.img");
    std::fs::write(&made_by_cryptsetup, vec![0u8; (DATA + 65536) as usize]).unwrap();
    let mut f = vec!["luksFormat", "-q", "--type", "luks2", "--key-file", &k0];
    f.extend(fast("argon2id"));
    let cs = s(&made_by_cryptsetup);
    f.push(&cs);
    run("cryptsetup", &f);
    let k2 = keyfile(d.path(), "k2", "third");
    let mut a = vec!["luksAddKey", "-q", "--key-file", &k0];
    a.extend(fast("pbkdf2"));
    a.extend(["--key-slot", "12", cs.as_str(), k2.as_str()]);
    run("cryptsetup", &a);
    // A token bound to slot 0 (as systemd-cryptenroll leaves them): kept,
    // and unbound when vdisk removes that slot.
    let token = d.path().join("token.json");
    std::fs::write(&token, r#"{"type":"vdisk-test","keyslots":["0"],"note":"kept"}"#).unwrap();
    run("cryptsetup", &["token", "import", "--json-file", &s(&token), "--key-slot", "0", &cs]);
    let made_by_vdisk = d.path().join("vd.img");
    let vs = s(&made_by_vdisk);
    run(
        vd,
        &[
            "create",
            "-q",
            "--object",
            OBJ,
            "-f",
            "luks",
            "-o",
            "luks-version=2,key-secret=sec0,pbkdf=pbkdf2,iter-time=10",
            &vs,
            "64k",
        ],
    );
    for img in [&cs, &vs] {
        let io = |id: &str| format!("driver=luks,file.filename={img},key-secret={id}");
        let amend = |id: &str, o: &str, force: bool| {
            let mut args = vec!["amend"];
            args.extend(objs);
            args.extend(["--image-opts", "-o", o]);
            if force {
                args.push("--force");
            }
            let i = io(id);
            args.push(&i);
            run_status(vd, &args)
        };
        let epoch = || {
            let dump = run("cryptsetup", &["luksDump", img]);
            dump.lines().find(|l| l.starts_with("Epoch:")).unwrap().split_whitespace().nth(1).unwrap().to_string()
        };
        let unlocks = |kf: &str| run_status("cryptsetup", &["open", "--test-passphrase", "--key-file", kf, img]).0 == 0;
        let e0 = epoch();
        let (c, _, e) = amend("sec0", "state=active,new-secret=sec1,iter-time=10", false);
        assert_eq!(c, 0, "{e}");
        assert!(unlocks(&k1), "{img}: cryptsetup does not unlock the slot vdisk added");
        assert_ne!(epoch(), e0);
        let (c, _, e) = amend("sec1", "state=inactive,old-secret=sec0", false);
        assert_eq!(c, 0, "{e}");
        assert!(!unlocks(&k0), "{img}: the removed passphrase still unlocks");
        assert!(unlocks(&k1));
        if img == &cs {
            assert!(unlocks(&k2), "cryptsetup's own second slot was lost");
            let dump = run("cryptsetup", &["luksDump", "--dump-json-metadata", img]);
            assert!(dump.contains("\"note\":\"kept\""), "the token was lost: {dump}");
            // Slot numbers past LUKS1's eight.
            assert_eq!(amend("sec1", "state=inactive,keyslot=12", false).0, 0);
            assert!(!unlocks(&k2), "slot 12 was not removed");
        }
        let (c, _, e) = amend("sec1", "state=inactive,old-secret=sec1", false);
        assert_ne!(c, 0);
        assert!(e.contains("last"), "{e}");
        assert!(unlocks(&k1));
        let v = open(Path::new(img), "second").unwrap();
        assert_eq!(luks_details(&v).luks2.unwrap().keyslots.len(), 1);
    }
    // LUKS1 has eight slots: a ninth is an error, not a crash.
    let l1 = d.path().join("l1.img");
    run(vd, &["create", "-q", "--object", OBJ, "-f", "luks", "-o", "key-secret=sec0,iter-time=10", &s(&l1), "64k"]);
    let io = format!("driver=luks,file.filename={},key-secret=sec0", s(&l1));
    let (c, _, e) = run_status(vd, &["amend", "--object", OBJ, "--image-opts", "-o", "state=inactive,keyslot=9", &io]);
    assert_ne!(c, 0);
    assert!(e.contains("LUKS1 slot"), "{e}");
}

/// A LUKS2 key-slot change cut by a power loss at every write and sync
/// (the writes since the last sync lost, kept, or a random part of them):
/// the volume opens with the old or the new set of passphrases, never
/// with neither, and its payload is intact.
#[test]
fn keyslot_changes_survive_a_crash_at_every_write() {
    use std::sync::Arc;
    use vdisk::luks::{KeyslotChange, LuksOptions, SlotState};
    use vdisk::{FaultMode, FaultyStorage, MemStorage, Survivors};
    let st = Arc::new(MemStorage::new());
    let p = Luks2Params { kdf: vdisk::luks::KdfKind::Pbkdf2, iter_time_ms: 1, ..Default::default() };
    let l = Luks::create_luks2(st.clone(), None, 65536, &p, &Secret::new("old")).unwrap();
    l.write_at(&[0x42; 65536], 0).unwrap();
    l.close().unwrap();
    let fresh = st.to_vec();
    let opens = |img: &[u8], pass: &str| -> bool {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.to_vec()));
        match Luks::open(s, LuksOptions { key: Some(Secret::new(pass)), read_only: true, ..Default::default() }) {
            Ok(v) => {
                let mut b = vec![0u8; 65536];
                v.read_at(&mut b, 0).unwrap();
                assert_eq!(b, vec![0x42; 65536]);
                true
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Crypto, "{e}");
                false
            }
        }
    };
    // Adding "new", then removing "old" (from the volume that has both).
    let add = KeyslotChange {
        state: SlotState::Active,
        keyslot: None,
        new_secret: Some(Secret::new("new")),
        old_secret: None,
        iter_time_ms: Some(1),
        force: false,
    };
    let remove = KeyslotChange {
        state: SlotState::Inactive,
        keyslot: None,
        new_secret: None,
        old_secret: Some(Secret::new("old")),
        iter_time_ms: None,
        force: false,
    };
    let both = {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fresh.clone()));
        let v = Luks::open(s.clone(), LuksOptions { key: Some(Secret::new("old")), ..Default::default() }).unwrap();
        v.change_keyslots(&add).unwrap();
        drop(v);
        let mut b = vec![0u8; s.len().unwrap() as usize];
        s.read_at(&mut b, 0).unwrap();
        b
    };
    for (start, change, pass, done) in [(&fresh, &add, "old", "new"), (&both, &remove, "new", "old")] {
        let mut cut = 0u64;
        loop {
            let fs = Arc::new(FaultyStorage::new(start.clone(), Some(cut), FaultMode::PowerLoss));
            let s: Arc<dyn Storage> = fs.clone();
            let v = Luks::open(s, LuksOptions { key: Some(Secret::new(pass)), ..Default::default() }).unwrap();
            let r = v.change_keyslots(change);
            drop(v);
            for surv in [Survivors::None, Survivors::All, Survivors::Some(cut), Survivors::Some(cut + 1000)] {
                let img = fs.crashed_image(surv);
                let with_pass = opens(&img, pass);
                let with_done = opens(&img, done);
                // The header copy in use names the new set only when all
                // of it works: a slot it names opens.
                let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
                let i =
                    Luks::open(s, LuksOptions { inspect_only: true, read_only: true, ..Default::default() }).unwrap();
                let named = i.luks2_header().unwrap().keyslots.len();
                assert_eq!(
                    with_done,
                    named == 2,
                    "cut {cut} {surv:?}: {named} slots named, '{done}' opens: {with_done}"
                );
                if change.state == SlotState::Active {
                    assert!(with_pass, "cut {cut} {surv:?}: the old passphrase no longer opens");
                } else {
                    assert!(with_pass, "cut {cut} {surv:?}: the kept passphrase no longer opens");
                }
                if r.is_ok() {
                    assert_eq!(with_done, change.state == SlotState::Active, "cut {cut} {surv:?}: change not durable");
                }
            }
            if r.is_ok() {
                break;
            }
            cut += 1;
            assert!(cut < 50, "the change never completed");
        }
    }
}

/// The CLI's detached LUKS2 header (`detached-header=on`): cryptsetup
/// reads it, `vdisk info` shows it alone, vdisk writes the payload through
/// it and cryptsetup decrypts that payload in place to the same bytes; and
/// `convert -O luks -o luks-version=2` copies a raw image exactly.
#[test]
fn cli_detached_header_and_convert() {
    if !have_tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let vd = env!("CARGO_BIN_EXE_vdisk");
    let kf = keyfile(d.path(), "pass", PASS);
    let (h, data) = (d.path().join("h.img"), d.path().join("data.img"));
    let (hs, ds) = (s(&h), s(&data));
    run(
        vd,
        &[
            "create",
            "-q",
            "--object",
            OBJ,
            "-f",
            "luks",
            "-o",
            "luks-version=2,key-secret=sec0,detached-header=on,pbkdf=pbkdf2,iter-time=10,sector-size=4096",
            &hs,
            "0",
        ],
    );
    let dump = run("cryptsetup", &["luksDump", &hs]);
    assert!(dump.contains("offset: 0 [bytes]"), "{dump}");
    let info = run(vd, &["info", "--output", "json", &hs]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["format-specific"]["data"]["detached-header"], true, "{info}");
    assert_eq!(v["virtual-size"], 0);
    std::fs::write(&data, vec![0u8; 1 << 20]).unwrap();
    let io = format!("driver=luks,file.filename={ds},header.driver=file,header.filename={hs},key-secret=sec0");
    run(vd, &["io", "--object", OBJ, "--image-opts", &io, "-c", "write -P 0x6b 0 1M", "-c", "write -P 0x11 5000 3000"]);
    let mut want = vec![0x6bu8; 1 << 20];
    want[5000..8000].fill(0x11);
    run(
        "cryptsetup",
        &["reencrypt", "--decrypt", "-q", "--force-offline-reencrypt", "--key-file", &kf, "--header", &hs, &ds],
    );
    assert!(std::fs::read(&data).unwrap() == want, "cryptsetup decrypts other bytes than vdisk wrote");

    let src = d.path().join("src.raw");
    let plain = pattern(3 << 20, 11);
    std::fs::write(&src, &plain).unwrap();
    let dst = d.path().join("dst.luks");
    run(
        vd,
        &[
            "convert",
            "--object",
            OBJ,
            "-O",
            "luks",
            "-o",
            "luks-version=2,key-secret=sec0,pbkdf=pbkdf2,iter-time=10",
            &s(&src),
            &s(&dst),
        ],
    );
    let v = open(&dst, PASS).unwrap();
    assert!(read_all(&v) == plain);
    assert_eq!(luks_details(&v).luks2.unwrap().keyslots[0].kdf, "pbkdf2");
    let (c, _, e) = run_status("cryptsetup", &["open", "--test-passphrase", "--key-file", &kf, &s(&dst)]);
    assert_eq!(c, 0, "{e}");
}
