//! The LUKS part of `vdisk info`, as `qemu-img info` shows it (standalone
//! `luks` volumes, and qcow2's `encrypt:` block). LUKS2 volumes (which
//! qemu-img cannot open) add `version: 2`, the sector size, label, seqid,
//! header and key-slot area sizes, the state of both header copies and
//! a `keyslots` list with each slot's KDF and its parameters.

use serde_json::{json, Map, Value};
use vdisk::luks::{Luks2Details, LuksDetails};

/// The human lines, each prefixed with `indent`.
pub fn human(l: &LuksDetails, indent: &str) {
    outln!("{indent}ivgen alg: {}", l.ivgen_alg);
    if let Some(h) = &l.ivgen_hash_alg {
        outln!("{indent}ivgen hash alg: {h}");
    }
    outln!("{indent}detached header: {}", l.detached_header);
    outln!("{indent}hash alg: {}", l.hash_alg);
    outln!("{indent}cipher alg: {}", l.cipher_alg);
    outln!("{indent}uuid: {}", l.uuid);
    outln!("{indent}cipher mode: {}", l.cipher_mode);
    outln!("{indent}slots:");
    for (i, (active, iters, off, stripes)) in l.slots.iter().enumerate() {
        outln!("{indent}    [{i}]:");
        outln!("{indent}        active: {active}");
        if let Some(n) = iters {
            outln!("{indent}        iters: {n}");
        }
        outln!("{indent}        key offset: {off}");
        // Stripes of active slots only, as qemu-img shows them.
        if iters.is_some() {
            outln!("{indent}        stripes: {stripes}");
        }
    }
    outln!("{indent}payload offset: {}", l.payload_offset);
    outln!("{indent}master key iters: {}", l.master_key_iters);
    if let Some(v2) = &l.luks2 {
        luks2_human(v2, indent);
    }
}

fn priority(p: u8) -> &'static str {
    match p {
        0 => "ignore",
        2 => "high",
        _ => "normal",
    }
}

fn copies(c: [bool; 2]) -> [&'static str; 2] {
    c.map(|ok| if ok { "ok" } else { "bad" })
}

/// The LUKS2 lines (after the LUKS1 ones, which LUKS2 shares).
fn luks2_human(v: &Luks2Details, indent: &str) {
    outln!("{indent}version: 2");
    outln!("{indent}sector size: {}", v.sector_size);
    if !v.label.is_empty() {
        outln!("{indent}label: {}", v.label);
    }
    if !v.subsystem.is_empty() {
        outln!("{indent}subsystem: {}", v.subsystem);
    }
    outln!("{indent}seqid: {}", v.seqid);
    outln!("{indent}header size: {}", v.hdr_size);
    outln!("{indent}keyslots size: {}", v.keyslots_size);
    let [p, s] = copies(v.copies_ok);
    outln!("{indent}header copies: primary {p}, secondary {s}");
    outln!("{indent}keyslots:");
    for k in &v.keyslots {
        outln!("{indent}    [{}]:", k.id);
        outln!("{indent}        kdf: {}", k.kdf);
        if let (Some(h), Some(n)) = (&k.hash, k.iterations) {
            outln!("{indent}        hash: {h}");
            outln!("{indent}        iterations: {n}");
        }
        if let (Some(t), Some(m), Some(c)) = (k.time, k.memory_kib, k.cpus) {
            outln!("{indent}        time: {t}");
            outln!("{indent}        memory: {m} KiB");
            outln!("{indent}        cpus: {c}");
        }
        outln!("{indent}        key size: {}", k.key_size * 8);
        outln!("{indent}        area: {} bytes at {} ({})", k.area_size, k.area_offset, k.area_encryption);
        outln!("{indent}        stripes: {} ({})", k.stripes, k.af_hash);
        outln!("{indent}        priority: {}", priority(k.priority));
    }
}

/// The JSON object (`format-specific.data` of a luks volume).
pub fn json(l: &LuksDetails) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("ivgen-alg".into(), json!(l.ivgen_alg));
    if let Some(h) = &l.ivgen_hash_alg {
        m.insert("ivgen-hash-alg".into(), json!(h));
    }
    m.insert("detached-header".into(), json!(l.detached_header));
    m.insert("hash-alg".into(), json!(l.hash_alg));
    m.insert("cipher-alg".into(), json!(l.cipher_alg));
    m.insert("uuid".into(), json!(l.uuid));
    m.insert("cipher-mode".into(), json!(l.cipher_mode));
    let slots: Vec<Value> = l
        .slots
        .iter()
        .map(|(active, iters, off, stripes)| {
            let mut s = Map::new();
            s.insert("active".into(), json!(active));
            if let Some(n) = iters {
                s.insert("iters".into(), json!(n));
            }
            s.insert("key-offset".into(), json!(off));
            if iters.is_some() {
                s.insert("stripes".into(), json!(stripes));
            }
            Value::Object(s)
        })
        .collect();
    m.insert("slots".into(), Value::Array(slots));
    m.insert("payload-offset".into(), json!(l.payload_offset));
    m.insert("master-key-iters".into(), json!(l.master_key_iters));
    if let Some(v) = &l.luks2 {
        m.insert("version".into(), json!(2));
        m.insert("sector-size".into(), json!(v.sector_size));
        m.insert("label".into(), json!(v.label));
        m.insert("subsystem".into(), json!(v.subsystem));
        m.insert("seqid".into(), json!(v.seqid));
        m.insert("hdr-size".into(), json!(v.hdr_size));
        m.insert("keyslots-size".into(), json!(v.keyslots_size));
        m.insert("header-copies".into(), json!(copies(v.copies_ok)));
        m.insert("tokens".into(), json!(v.tokens));
        let ks: Vec<Value> = v
            .keyslots
            .iter()
            .map(|k| {
                let mut o = Map::new();
                o.insert("id".into(), json!(k.id));
                o.insert("kdf".into(), json!(k.kdf));
                if let (Some(h), Some(n)) = (&k.hash, k.iterations) {
                    o.insert("hash".into(), json!(h));
                    o.insert("iterations".into(), json!(n));
                }
                if let (Some(t), Some(mem), Some(c)) = (k.time, k.memory_kib, k.cpus) {
                    o.insert("time".into(), json!(t));
                    o.insert("memory".into(), json!(mem));
                    o.insert("cpus".into(), json!(c));
                }
                o.insert("key-size".into(), json!(k.key_size * 8));
                o.insert("area-offset".into(), json!(k.area_offset));
                o.insert("area-size".into(), json!(k.area_size));
                o.insert("area-encryption".into(), json!(k.area_encryption));
                o.insert("stripes".into(), json!(k.stripes));
                o.insert("af-hash".into(), json!(k.af_hash));
                o.insert("priority".into(), json!(priority(k.priority)));
                Value::Object(o)
            })
            .collect();
        m.insert("keyslots".into(), Value::Array(ks));
    }
    m
}
