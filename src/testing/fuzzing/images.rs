//! Targets that open hostile images and descriptors: open_qcow2, open_vmdk,
//! vmdk_descriptor, pool_xml, probe.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::device::BlockDevice;
use crate::error::ErrorKind;

// ---------------------------------------------------------------------------
// open_qcow2

/// `open_qcow2`: opens hostile bytes as qcow2 (read-only, with a backing
/// device and data file standing in for the named ones), walks the device,
/// lists and views snapshots, runs `check`, and checks that the header and
/// snapshot table survive being encoded again.
pub fn open_qcow2(data: &[u8]) {
    header_roundtrip(data);
    let file: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(data.to_vec()).limit(data.len() as u64).read_only());
    let Ok(h) = no_internal("read_header", Qcow2::read_header(&*file)) else {
        return;
    };
    let opts = Qcow2Options {
        read_only: true,
        l2_cache_bytes: Some(1 << 20),
        backing: h.backing_file.as_ref().map(|_| pattern_device(1 << 20, 0x11)),
        data_file: h.data_file.as_ref().map(|_| {
            let mut v = vec![0u8; 1 << 20];
            pattern(0x22, 0, &mut v);
            Arc::new(MemStorage::from_vec(v).read_only()) as Arc<dyn Storage>
        }),
        key: Some(Secret::new(PASSPHRASE)),
        inspect_only: false,
        inactive: false,
    };
    let Ok(q) = no_internal("open", Qcow2::open(file.clone(), opts)) else {
        return;
    };
    // Rereading the same bytes (a shared image's refresh) must hold up too.
    let _ = no_internal("refresh", q.refresh());
    let _ = q.info();
    walk(&q);
    snapshot_table_roundtrip(&q, &h);
    for s in q.snapshots().iter().take(4) {
        if let Ok(v) = no_internal("snapshot_view", q.snapshot_view(&s.id)) {
            let _ = v.info();
            walk(&v);
        }
    }
    let _ = no_internal("check", q.check(Repair::None));
}

/// A header that parses must encode into one that parses to the same
/// values (vdisk rewrites the header on every metadata change).
fn header_roundtrip(data: &[u8]) {
    let Ok(cb) = crate::qcow2::header::peek_cluster_bits(data) else {
        return;
    };
    let mut c0 = vec![0u8; 1 << cb];
    let n = data.len().min(c0.len());
    c0[..n].copy_from_slice(&data[..n]);
    let Ok(h) = no_internal("header parse", Header::parse(&c0)) else {
        return;
    };
    let mut h2 = h.clone();
    let Ok(bytes) = no_internal("header encode", h2.encode()) else {
        return;
    };
    assert!(bytes.len() <= c0.len(), "encoded header exceeds a cluster");
    let mut c1 = vec![0u8; c0.len()];
    c1[..bytes.len()].copy_from_slice(&bytes);
    let back = Header::parse(&c1).unwrap_or_else(|e| panic!("an encoded header does not parse again: {e}\n{h:?}"));
    assert_eq!(back, h2, "header changed across encode/parse");
    let norm = |mut x: Header| {
        x.header_length = 0;
        x.backing_file_offset = 0;
        x.backing_file_size = 0;
        x.feature_names.clear();
        x
    };
    assert_eq!(norm(back), norm(h), "header values changed when encoded");
}

/// The snapshot table read at open must encode into a table that reads
/// back the same (vdisk rewrites it on every snapshot operation).
fn snapshot_table_roundtrip(q: &Qcow2, h: &Header) {
    let snaps = q.snapshots();
    if snaps.is_empty() {
        return;
    }
    let bytes = crate::qcow2::snapshot::encode_table(&snaps);
    let m = MemStorage::new();
    let off = h.cluster_size();
    m.write_at(&bytes, off).expect("memory write");
    let (back, len) = crate::qcow2::snapshot::read_table(&m, off, snaps.len() as u32, h.cluster_size())
        .unwrap_or_else(|e| panic!("an encoded snapshot table does not read again: {e}"));
    assert_eq!(len as usize, bytes.len());
    let size = q.size();
    for (a, b) in snaps.iter().zip(&back) {
        assert_eq!(a.info(size), b.info(size), "snapshot changed across encode/read");
    }
}

// ---------------------------------------------------------------------------
// open_vmdk

/// Separator that starts another named file in an `open_vmdk` input:
/// `\n--vdisk-fuzz-file NAME\n`.
pub const FILE_MARKER: &[u8] = b"\n--vdisk-fuzz-file ";

/// Splits an `open_vmdk` input into the main file and named extra files.
pub fn split_files(data: &[u8]) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let mut parts = Vec::new();
    let mut rest = data;
    let mut name: Option<String> = None;
    loop {
        match find(rest, FILE_MARKER) {
            Some(i) => {
                parts.push((name.take(), &rest[..i]));
                let after = &rest[i + FILE_MARKER.len()..];
                let nl = after.iter().position(|&b| b == b'\n').unwrap_or(after.len());
                name = Some(String::from_utf8_lossy(&after[..nl]).into_owned());
                rest = after.get(nl + 1..).unwrap_or_default();
            }
            None => {
                parts.push((name.take(), rest));
                break;
            }
        }
    }
    let mut files = HashMap::new();
    let mut main = Vec::new();
    for (n, bytes) in parts {
        match n {
            None => main = bytes.to_vec(),
            Some(n) => {
                files.insert(n, bytes.to_vec());
            }
        }
    }
    (main, files)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `open_vmdk`: opens hostile bytes as vmdk (a sparse or stream extent, or
/// a descriptor whose extents are the other named files of the input),
/// walks the device, runs `check`, then writes a little into a writable
/// copy, flushes and reopens it.
pub fn open_vmdk(data: &[u8]) {
    let (main, files) = split_files(data);
    if main.len() >= 512 {
        if let Ok(h) = SparseHeader::decode(&main[..512]) {
            let back = SparseHeader::decode(&h.encode()).expect("encoded header decodes");
            assert_eq!(back, h, "sparse header changed across encode/decode");
        }
    }
    let files: HashMap<String, Arc<MemStorage>> = files
        .into_iter()
        .map(|(n, b)| {
            let len = b.len() as u64;
            (n, Arc::new(MemStorage::from_vec(b).limit(len + (1 << 20))))
        })
        .collect();
    let main_len = main.len() as u64;
    let main = Arc::new(MemStorage::from_vec(main).limit(main_len + (8 << 20)));
    // Read-only pass.
    let ro_files: HashMap<String, Arc<dyn Storage>> = files
        .iter()
        .map(|(n, m)| (n.clone(), Arc::new(MemStorage::from_vec(m.to_vec()).read_only()) as Arc<dyn Storage>))
        .collect();
    let opener = |p: &Path, _ro: bool| -> Result<Arc<dyn Storage>> {
        let name = p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        ro_files
            .get(&name)
            .cloned()
            .ok_or_else(|| crate::Error::new(ErrorKind::NotFound, format!("no file '{name}' in the input")))
    };
    let parent =
        Vmdk::read_descriptor(&*main).ok().and_then(|d| d.parent_hint().map(|_| pattern_device(1 << 20, 0x33)));
    let ro_main: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(main.to_vec()).read_only());
    let opts = VmdkOptions {
        read_only: true,
        parent: parent.clone(),
        allow_external_extents: false,
        gt_cache_tables: Some(16),
    };
    let Ok(v) = no_internal("vmdk open", Vmdk::open_with(ro_main, opts, &opener)) else {
        return;
    };
    let _ = v.info();
    walk(&v);
    let _ = no_internal("vmdk check", v.check());
    drop(v);

    // Write pass on a copy.
    let rw_opener = |p: &Path, _ro: bool| -> Result<Arc<dyn Storage>> {
        let name = p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        files
            .get(&name)
            .map(|m| m.clone() as Arc<dyn Storage>)
            .ok_or_else(|| crate::Error::new(ErrorKind::NotFound, format!("no file '{name}' in the input")))
    };
    let opts = VmdkOptions {
        read_only: false,
        parent: parent.clone(),
        allow_external_extents: false,
        gt_cache_tables: Some(16),
    };
    let Ok(v) = no_internal("vmdk open rw", Vmdk::open_with(main.clone(), opts.clone(), &rw_opener)) else {
        return;
    };
    let size = v.size();
    let seed = data.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    let mut buf = vec![0u8; 3000];
    for (i, at) in [0, size / 2, size.saturating_sub(1500)].iter().enumerate() {
        let at = (*at).min(size);
        let n = (size - at).min(buf.len() as u64) as usize;
        pattern(seed.wrapping_add(i as u8), at, &mut buf[..n]);
        let _ = no_internal("vmdk write", v.write_at(&buf[..n], at));
    }
    if size > 0 {
        let _ = no_internal("vmdk write_zeroes", v.write_zeroes(0, size.min(1 << 20), ZeroMode::MayUnmap));
    }
    let _ = no_internal("vmdk flush", v.flush());
    drop(v);
    if let Ok(v) = no_internal("vmdk reopen", Vmdk::open_with(main, opts, &rw_opener)) {
        walk(&v);
    }
}

// ---------------------------------------------------------------------------
// vmdk_descriptor

/// `vmdk_descriptor`: parses hostile bytes as a descriptor; what parses
/// must encode into text that parses to the same descriptor, and extent
/// names must never resolve outside the descriptor's directory.
pub fn vmdk_descriptor(data: &[u8]) {
    let Ok(d) = no_internal("descriptor parse", Descriptor::parse(data)) else {
        return;
    };
    let text = d.encode();
    let back = Descriptor::parse(text.as_bytes())
        .unwrap_or_else(|e| panic!("an encoded descriptor does not parse again: {e}\n--- text ---\n{text}"));
    assert_eq!(back, d, "descriptor changed across encode/parse");
    assert_eq!(back.encode(), text, "encoding is not stable");
    let _ = (d.cid(), d.parent_cid(), d.create_type(), d.total_sectors());
    let dir = Path::new("/vdisk-fuzz/dir");
    for e in &d.extents {
        if let Some(name) = &e.file {
            if let Ok(p) = no_internal("resolve", resolve_extent(dir, name, false)) {
                let mut depth = 0i64;
                for c in p.strip_prefix(dir).expect("inside dir").components() {
                    match c {
                        std::path::Component::ParentDir => depth -= 1,
                        std::path::Component::Normal(_) => depth += 1,
                        std::path::Component::CurDir => {}
                        other => panic!("resolved extent name has component {other:?}"),
                    }
                    assert!(depth >= 0, "extent name '{name}' escapes the directory");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// pool_xml

/// `pool_xml`: libvirt pool and volume XML from hostile bytes. Whatever
/// parses as a pool definition must write back to XML that parses to the
/// same definition; the generic XML tree must round-trip too; a volume
/// document either gives a spec or an error.
pub fn pool_xml(data: &[u8]) {
    use crate::pool::def::PoolDef;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(tree) = no_internal("xml parse", crate::pool::xml::parse(text, "fuzz input")) {
        let again = tree.to_xml();
        let back = crate::pool::xml::parse(&again, "re-encoded")
            .unwrap_or_else(|e| panic!("re-encoded XML does not parse: {e}\n{again}"));
        assert_eq!(back.to_xml(), again, "XML encoding is not stable");
    }
    if let Ok(def) = no_internal("pool parse", PoolDef::from_xml(text, "fuzz")) {
        let xml = def.to_xml();
        let back = PoolDef::from_xml(&xml, "fuzz")
            .unwrap_or_else(|e| panic!("a written pool definition does not parse: {e}\n{xml}"));
        assert_eq!(back.to_xml(), xml, "pool XML changed across write/parse");
    }
    let _ = no_internal("volume parse", crate::pool::volxml::spec_from_xml(text, None));
}

// ---------------------------------------------------------------------------
// probe

/// `probe`: format probing on any bytes; the storage-level probe agrees
/// with the byte-level one, and only a qcow2 magic makes qcow2.
pub fn probe(data: &[u8]) {
    use crate::device::Format;
    let f = crate::probe::probe_bytes(data);
    let head = &data[..data.len().min(crate::probe::PROBE_LEN)];
    let g = crate::probe::probe(&MemStorage::from_vec(data.to_vec())).expect("memory probe");
    assert_eq!(g, crate::probe::probe_bytes(head));
    if f == Format::Qcow2 {
        assert!(data.starts_with(b"QFI\xfb"), "qcow2 without its magic");
    }
}
