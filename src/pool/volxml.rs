//! libvirt's `<volume>` document: what `vol-dumpxml` prints, and what
//! `vol-create FILE.xml` reads.
//!
//! Read: `name`, `capacity`, `allocation` (absent: fully allocated, as
//! libvirt does), `target/format`, `target/permissions`, `target/compat`,
//! `target/clusterSize`, `target/features/lazy_refcounts`,
//! `target/encryption` (format `luks` with its `cipher` and `ivgen`, or
//! `qcow`; the passphrase comes from the caller, libvirt's secret objects
//! do not exist here) and
//! `backingStore/{path,format}` (the format is required). Output-only
//! elements (`key`, `physical`, `target/path`, `timestamps`) are ignored
//! on input, as libvirt ignores them.

use std::fmt::Write as _;

use super::def::{scaled_element, Permissions};
use super::spec::{BackingSpec, VolumeEncryption, VolumeSpec};
use super::volinfo::{FileStat, VolType, VolumeInfo};
use super::xml::{self, escape, Element};
use crate::crypto::Secret;
use crate::device::Format;
use crate::error::{Error, Result};

fn ts(t: (i64, i64)) -> String {
    format!("{}.{:09}", t.0, t.1)
}

fn perms_xml(out: &mut String, stat: &FileStat, pad: &str) {
    let _ = writeln!(out, "{pad}<permissions>");
    let _ = writeln!(out, "{pad}  <mode>{:04o}</mode>", stat.mode & 0o7777);
    let _ = writeln!(out, "{pad}  <owner>{}</owner>", stat.uid);
    let _ = writeln!(out, "{pad}  <group>{}</group>", stat.gid);
    let _ = writeln!(out, "{pad}</permissions>");
}

fn times_xml(out: &mut String, stat: &FileStat, pad: &str) {
    let _ = writeln!(out, "{pad}<timestamps>");
    let _ = writeln!(out, "{pad}  <atime>{}</atime>", ts(stat.atime));
    let _ = writeln!(out, "{pad}  <mtime>{}</mtime>", ts(stat.mtime));
    let _ = writeln!(out, "{pad}  <ctime>{}</ctime>", ts(stat.ctime));
    let _ = writeln!(out, "{pad}</timestamps>");
}

fn format_name(info: &VolumeInfo) -> &'static str {
    match (info.kind, info.format) {
        (VolType::Dir, _) => "dir",
        (_, Some(f)) => f.name(),
        (_, None) => "raw",
    }
}

/// The `<volume>` document of a volume, as `virsh vol-dumpxml` prints it
/// for a dir pool. `backing_stat` describes the backing file, if it exists.
pub fn volume_xml(info: &VolumeInfo, backing_stat: Option<&FileStat>) -> String {
    let path = info.path.to_string_lossy();
    let mut o = String::new();
    let _ = writeln!(o, "<volume type='{}'>", info.kind.libvirt_name());
    let _ = writeln!(o, "  <name>{}</name>", escape(&info.name_lossy(), false));
    let _ = writeln!(o, "  <key>{}</key>", escape(&path, false));
    let _ = writeln!(o, "  <capacity unit='bytes'>{}</capacity>", info.capacity);
    let _ = writeln!(o, "  <allocation unit='bytes'>{}</allocation>", info.allocation);
    let _ = writeln!(o, "  <physical unit='bytes'>{}</physical>", info.physical);
    let _ = writeln!(o, "  <target>");
    let _ = writeln!(o, "    <path>{}</path>", escape(&path, false));
    let _ = writeln!(o, "    <format type='{}'/>", format_name(info));
    perms_xml(&mut o, &info.stat, "    ");
    times_xml(&mut o, &info.stat, "    ");
    if let Some(e) = &info.encryption {
        let _ = writeln!(o, "    <encryption format='{}'/>", escape(e, true));
    }
    if info.format == Some(Format::Qcow2) {
        if let Some(c) = &info.compat {
            let _ = writeln!(o, "    <compat>{}</compat>", escape(c, false));
        }
        if let Some(c) = info.cluster_size {
            let _ = writeln!(o, "    <clusterSize unit='B'>{c}</clusterSize>");
        }
        if info.lazy_refcounts {
            let _ = writeln!(o, "    <features>\n      <lazy_refcounts/>\n    </features>");
        }
    }
    let _ = writeln!(o, "  </target>");
    if let Some(b) = &info.backing {
        let _ = writeln!(o, "  <backingStore>");
        let _ = writeln!(o, "    <path>{}</path>", escape(&b.path.to_string_lossy(), false));
        // libvirt reports an unrecorded backing format as raw.
        let fmt = b.format.as_deref().unwrap_or("raw");
        let _ = writeln!(o, "    <format type='{}'/>", escape(fmt, true));
        if let Some(s) = backing_stat {
            perms_xml(&mut o, s, "    ");
            times_xml(&mut o, s, "    ");
        }
        let _ = writeln!(o, "  </backingStore>");
    }
    o.push_str("</volume>\n");
    o
}

fn one<'a>(e: &'a Element, tag: &str) -> Result<Option<&'a Element>> {
    match e.count(tag) {
        0 => Ok(None),
        1 => Ok(e.child(tag)),
        _ => Err(Error::invalid_argument(format!("volume XML: more than one <{tag}>"))),
    }
}

/// libvirt's `<cipher name='aes' size='256' mode='xts' hash='sha256'/>`
/// and `<ivgen name='plain64' hash='sha256'/>` inside a LUKS
/// `<encryption>`: the `cipher-alg`, `cipher-mode`, `hash-alg`, `ivgen-alg`
/// and `ivgen-hash-alg` options of the new volume.
fn luks_options(enc: &Element, spec: &mut VolumeSpec, what: &str) -> Result<()> {
    // `encrypt.` names them for qcow2; a luks volume takes them either way.
    let mut push = |k: &str, v: String| spec.qcow2_options.push((format!("encrypt.{k}"), v));
    if let Some(c) = enc.child("cipher") {
        match (c.attr("name"), c.attr("size")) {
            (Some(n), Some(sz)) => push("cipher-alg", format!("{n}-{sz}")),
            _ => {
                return Err(Error::invalid_argument(format!("{what}: <cipher> needs name and size attributes"))
                    .with_field("encryption/cipher"))
            }
        }
        if let Some(m) = c.attr("mode") {
            push("cipher-mode", m.to_string());
        }
        if let Some(h) = c.attr("hash") {
            push("hash-alg", h.to_string());
        }
    }
    if let Some(iv) = enc.child("ivgen") {
        let n = iv.attr("name").ok_or_else(|| {
            Error::invalid_argument(format!("{what}: <ivgen> needs a name attribute")).with_field("encryption/ivgen")
        })?;
        push("ivgen-alg", n.to_string());
        if let Some(h) = iv.attr("hash") {
            push("ivgen-hash-alg", h.to_string());
        }
    }
    Ok(())
}

/// Reads a `<volume>` document into a [`VolumeSpec`]. `passphrase` is
/// the key of an `<encryption format='luks'|'qcow'>` volume (libvirt
/// names a secret object there; vdisk takes the passphrase from the
/// caller).
pub fn spec_from_xml(text: &str, passphrase: Option<Secret>) -> Result<VolumeSpec> {
    let what = "volume XML";
    let root = xml::parse(text, what)?;
    if root.name != "volume" {
        return Err(Error::invalid_argument(format!("{what}: the root element is <{}>, not <volume>", root.name)));
    }
    if let Some(t) = root.attr("type") {
        if t != "file" {
            return Err(Error::unsupported(format!(
                "{what}: volume type '{}' is not supported in directory pools (file)",
                t.escape_debug()
            )));
        }
    }
    let name = one(&root, "name")?
        .map(|e| e.text().trim().to_string())
        .ok_or_else(|| Error::invalid_argument(format!("{what}: <name> is missing")).with_field("name"))?;
    let capacity = match one(&root, "capacity")? {
        Some(e) => scaled_element(e, what)?,
        None => 0,
    };
    let allocation = match one(&root, "allocation")? {
        Some(e) => Some(scaled_element(e, what)?),
        None => None,
    };
    let target = one(&root, "target")?;
    let format = match target.and_then(|t| t.child("format")).and_then(|f| f.attr("type")) {
        // libvirt's schema knows VHD as both `vpc` (what it probes and
        // qemu-img names) and `vhd`; vdisk reads both and writes `vpc`.
        Some("vhd") => Format::Vpc,
        Some(f) => Format::from_name(f).map_err(|e| e.context(what))?,
        None => Format::Raw,
    };
    let mut spec = VolumeSpec::new(&name, capacity, format).map_err(|e| e.context(what))?;
    spec.allocation = allocation;
    if let Some(t) = target {
        spec.permissions = Permissions::from_element(t.child("permissions"), what)?;
        if let Some(c) = t.child_text("compat") {
            spec.qcow2_options.push(("compat".into(), c));
        }
        if let Some(cs) = t.child("clusterSize") {
            let v = scaled_element(cs, what)?;
            spec.qcow2_options.push(("cluster_size".into(), v.to_string()));
        }
        if let Some(f) = t.child("features") {
            if f.child("lazy_refcounts").is_some() {
                spec.qcow2_options.push(("lazy_refcounts".into(), "on".into()));
            }
            if f.child("extended_l2").is_some() {
                spec.qcow2_options.push(("extended_l2".into(), "on".into()));
            }
        }
        // <nocow/> is only meaningful on btrfs: accepted and ignored, as
        // libvirt ignores a failure to set it.
        if let Some(enc) = t.child("encryption") {
            spec.encryption_format = match enc.attr("format") {
                Some("qcow") => VolumeEncryption::Qcow,
                // libvirt creates LUKS for `default`.
                Some("luks") | Some("default") => VolumeEncryption::Luks,
                Some(other) => {
                    return Err(Error::unsupported(format!(
                        "{what}: encryption format '{}' is not supported (luks, qcow)",
                        other.escape_debug()
                    )))
                }
                None => return Err(Error::invalid_argument(format!("{what}: <encryption> needs a format attribute"))),
            };
            spec.encryption = Some(passphrase.clone().ok_or_else(|| {
                Error::invalid_argument(format!(
                    "{what}: <encryption format='{}'> needs a passphrase (--passphrase-file; \
                     vdisk has no secret objects)",
                    spec.encryption_format.name()
                ))
            })?);
            if spec.encryption_format == VolumeEncryption::Luks {
                luks_options(enc, &mut spec, what)?;
            }
        } else if spec.format == Format::Luks {
            spec.encryption = passphrase.clone();
        }
    }
    if let Some(b) = one(&root, "backingStore")? {
        let path = b
            .child_text("path")
            .ok_or_else(|| Error::invalid_argument(format!("{what}: <backingStore> needs a <path>")))?;
        let fmt = b.child("format").and_then(|f| f.attr("type")).ok_or_else(|| {
            Error::invalid_argument(format!(
                "{what}: <backingStore> needs <format type='...'/>: vdisk never probes a backing file's format"
            ))
        })?;
        if !path.starts_with('/') {
            return Err(Error::invalid_argument(format!(
                "{what}: backingStore path '{}' must be absolute",
                path.escape_debug()
            )));
        }
        spec.backing =
            Some(BackingSpec { path: path.into(), format: Format::from_name(fmt).map_err(|e| e.context(what))? });
        if target.and_then(|t| t.child("format")).is_none() {
            spec.format = Format::Qcow2;
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_volume_xml() {
        let doc = "<volume><name>v.qcow2</name><capacity unit='G'>8</capacity><allocation>0</allocation><target><format type='qcow2'/><permissions><mode>0644</mode></permissions><compat>0.10</compat><clusterSize unit='KiB'>128</clusterSize></target><backingStore><path>/p/base.raw</path><format type='raw'/></backingStore></volume>";
        let s = spec_from_xml(doc, None).unwrap();
        assert_eq!(s.name, "v.qcow2");
        assert_eq!(s.capacity, 8 << 30);
        assert_eq!(s.allocation, Some(0));
        assert_eq!(s.format, Format::Qcow2);
        assert_eq!(s.permissions.mode, Some(0o644));
        assert!(s.qcow2_options.contains(&("cluster_size".into(), "131072".into())));
        assert_eq!(s.backing.unwrap().format, Format::Raw);
        let full = spec_from_xml("<volume><name>r</name><capacity>1024</capacity></volume>", None).unwrap();
        assert_eq!((full.format, full.allocation), (Format::Raw, None));
        for bad in [
            "<volume><capacity>1</capacity></volume>",
            "<volume><name>a/b</name><capacity>1</capacity></volume>",
            "<volume><name>x</name><capacity unit='Q'>1</capacity></volume>",
            "<volume><name>x</name><capacity>-1</capacity></volume>",
            "<volume><name>x</name><capacity>1</capacity><target><format type='qed'/></target></volume>",
            "<volume><name>x</name><capacity>1</capacity><backingStore><path>/a</path></backingStore></volume>",
            "<volume><name>x</name><capacity>1</capacity><target><encryption format='qcow'/></target></volume>",
            "<volume type='block'><name>x</name></volume>",
            "<pool/>",
        ] {
            assert!(spec_from_xml(bad, None).is_err(), "{bad}");
        }
    }
}
