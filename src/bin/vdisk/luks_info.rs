//! The LUKS part of `vdisk info`, as `qemu-img info` shows it (standalone
//! `luks` volumes, and qcow2's `encrypt:` block).

use serde_json::{json, Map, Value};
use vdisk::luks::LuksDetails;

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
    m
}
