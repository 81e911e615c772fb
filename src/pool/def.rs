//! Pool definitions: libvirt's `<pool>` document.
//!
//! [`PoolDef`] keeps the whole parsed document, so elements vdisk does not
//! interpret (`<source><vendor/>`, `<features>`, `fs:mount_opts` in its
//! namespace, ...) survive a define/dump round-trip; the fields vdisk uses are
//! validated and exposed typed. Types `dir`, `fs` and `netfs` are accepted;
//! the others (logical, iscsi, rbd, ...) are refused as unsupported.

use std::path::{Component, Path, PathBuf};

use super::name::check_pool_name;
use super::units::parse_scaled;
use super::uuid::Uuid;
use super::xml::{self, Element};
use crate::error::{Error, Result};

/// The kind of pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolType {
    /// A directory of image files.
    Dir,
    /// A local filesystem, mounted on the target by `pool-start`.
    Fs,
    /// A network filesystem (NFS, GlusterFS, CIFS), mounted on the target
    /// by `pool-start`.
    Netfs,
}

impl PoolType {
    /// libvirt's name (`dir`, `fs`, `netfs`).
    pub fn name(self) -> &'static str {
        match self {
            PoolType::Dir => "dir",
            PoolType::Fs => "fs",
            PoolType::Netfs => "netfs",
        }
    }

    /// Parses libvirt's name.
    pub fn from_name(s: &str) -> Result<PoolType> {
        match s {
            "dir" => Ok(PoolType::Dir),
            "fs" => Ok(PoolType::Fs),
            "netfs" => Ok(PoolType::Netfs),
            other => Err(Error::unsupported(format!(
                "pool type '{}' is not supported (dir, fs, netfs)",
                other.escape_debug()
            ))),
        }
    }
}

/// Ownership and mode of a pool directory or a volume, as in libvirt's
/// `<permissions>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    /// Mode bits (`0711`), if set.
    pub mode: Option<u32>,
    /// Owner uid, if set.
    pub owner: Option<u32>,
    /// Group gid, if set.
    pub group: Option<u32>,
    /// Security label, if set (kept, not applied).
    pub label: Option<String>,
}

impl Permissions {
    /// Reads `<permissions>` (absent: all unset).
    pub fn from_element(e: Option<&Element>, what: &str) -> Result<Permissions> {
        let Some(e) = e else {
            return Ok(Permissions::default());
        };
        let mut p = Permissions::default();
        if let Some(m) = e.child_text("mode") {
            let v = u32::from_str_radix(&m, 8).ok().filter(|v| *v <= 0o7777).ok_or_else(|| {
                Error::invalid_argument(format!("{what}: permissions mode '{}' is not an octal mode", m.escape_debug()))
                    .with_field("permissions/mode")
            })?;
            p.mode = Some(v);
        }
        let id = |tag: &'static str| -> Result<Option<u32>> {
            match e.child_text(tag) {
                None => Ok(None),
                Some(s) if s == "-1" => Ok(None),
                Some(s) => s.parse::<u32>().map(Some).map_err(|_| {
                    Error::invalid_argument(format!(
                        "{what}: permissions {tag} '{}' is not a numeric id",
                        s.escape_debug()
                    ))
                    .with_field(tag)
                }),
            }
        };
        p.owner = id("owner")?;
        p.group = id("group")?;
        p.label = e.child_text("label").filter(|s| !s.is_empty());
        Ok(p)
    }

    /// Writes `<permissions>`, or `None` when nothing is set.
    pub fn to_element(&self) -> Option<Element> {
        if self.mode.is_none() && self.owner.is_none() && self.group.is_none() && self.label.is_none() {
            return None;
        }
        let mut e = Element::new("permissions");
        if let Some(m) = self.mode {
            e.push(Element::new("mode").with_text(format!("{m:04o}")));
        }
        if let Some(o) = self.owner {
            e.push(Element::new("owner").with_text(o.to_string()));
        }
        if let Some(g) = self.group {
            e.push(Element::new("group").with_text(g.to_string()));
        }
        if let Some(l) = &self.label {
            e.push(Element::new("label").with_text(l.clone()));
        }
        Some(e)
    }

    /// The mode, owner and group of an existing file or directory.
    pub fn of(md: &std::fs::Metadata) -> Permissions {
        use std::os::unix::fs::MetadataExt;
        Permissions { mode: Some(md.mode() & 0o7777), owner: Some(md.uid()), group: Some(md.gid()), label: None }
    }
}

/// What a fs or netfs pool mounts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolSource {
    /// fs: the block device (`<device path>`).
    pub device: Option<String>,
    /// netfs: the server (`<host name>`).
    pub host: Option<String>,
    /// netfs: the exported directory (`<dir path>`).
    pub dir: Option<String>,
    /// The filesystem type (`<format type>`).
    pub format: Option<String>,
    /// netfs: the NFS protocol version (`<protocol ver>`).
    pub protocol_ver: Option<String>,
    /// Extra mount options (`<fs:mount_opts><fs:option name>`).
    pub mount_opts: Vec<String>,
}

/// A pool definition (libvirt's `<pool>` document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDef {
    tree: Element,
    name: String,
    uuid: Uuid,
    kind: PoolType,
    target: PathBuf,
    perms: Permissions,
    source: PoolSource,
}

/// Cleans a path the way libvirt's `virFileSanitizePath` does: collapses
/// `//` and `/./`, drops a trailing `/`. `..` is kept (and the target is
/// canonicalised separately for comparisons).
pub fn sanitize_path(p: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(p).components() {
        match c {
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Elements that carry live figures; they are not part of a definition.
const SIZING: [&str; 3] = ["capacity", "allocation", "available"];

impl PoolDef {
    /// A `dir` pool named `name` on `target` (absolute), a new UUID, and
    /// the target mode libvirt gives new pool directories (0711).
    pub fn dir(name: &str, target: impl AsRef<Path>) -> Result<PoolDef> {
        let target = target.as_ref();
        let t =
            target.to_str().ok_or_else(|| Error::invalid_argument("the target path is not UTF-8").with_path(target))?;
        let doc = Element::new("pool")
            .with_attr("type", "dir")
            .with_child(Element::new("name").with_text(name))
            .with_child(Element::new("source"))
            .with_child(
                Element::new("target")
                    .with_child(Element::new("path").with_text(t))
                    .with_child(Element::new("permissions").with_child(Element::new("mode").with_text("0711"))),
            );
        Self::from_tree(doc, "pool definition")
    }

    /// Parses a `<pool>` document. A missing UUID is generated.
    pub fn from_xml(text: &str, what: &str) -> Result<PoolDef> {
        Self::from_tree(xml::parse(text, what)?, what)
    }

    fn from_tree(mut tree: Element, what: &str) -> Result<PoolDef> {
        if tree.name != "pool" {
            return Err(Error::invalid_argument(format!("{what}: the root element is <{}>, not <pool>", tree.name)));
        }
        let kind = PoolType::from_name(
            tree.attr("type")
                .ok_or_else(|| Error::invalid_argument(format!("{what}: <pool> has no type attribute")))?,
        )
        .map_err(|e| e.context(what))?;
        let field = |tag: &'static str| -> Result<String> {
            match tree.count(tag) {
                0 => Err(Error::invalid_argument(format!("{what}: <{tag}> is missing")).with_field(tag)),
                1 => Ok(tree.child_text(tag).unwrap_or_default()),
                _ => Err(Error::invalid_argument(format!("{what}: more than one <{tag}>")).with_field(tag)),
            }
        };
        let name = check_pool_name(field("name")?).map_err(|e| e.context(what))?;
        let uuid = match tree.count("uuid") {
            0 => None,
            1 => Some(
                Uuid::parse(&tree.child_text("uuid").unwrap_or_default())
                    .map_err(|e| e.context(what).with_field("uuid"))?,
            ),
            _ => return Err(Error::invalid_argument(format!("{what}: more than one <uuid>"))),
        };
        let uuid = match uuid {
            Some(u) => u,
            None => {
                let u = Uuid::new_v4()?;
                tree.put(Element::new("uuid").with_text(u.to_string()), &["name"]);
                u
            }
        };
        if tree.count("target") != 1 {
            return Err(Error::invalid_argument(format!("{what}: exactly one <target> is needed")).with_field("target"));
        }
        let target_el = tree.child("target").ok_or_else(|| Error::internal("target vanished"))?;
        let tpath = target_el.child_text("path").ok_or_else(|| {
            Error::invalid_argument(format!("{what}: <target> has no <path>")).with_field("target/path")
        })?;
        if !tpath.starts_with('/') || tpath.contains('\0') || tpath.contains('\n') {
            return Err(Error::invalid_argument(format!(
                "{what}: target path '{}' is not an absolute path",
                tpath.escape_debug()
            ))
            .with_field("target/path"));
        }
        let target = sanitize_path(&tpath);
        let perms = Permissions::from_element(target_el.child("permissions"), what)?;
        let mut source = PoolSource::default();
        if let Some(s) = tree.child("source") {
            source.device = s.child("device").and_then(|d| d.attr("path")).map(str::to_string);
            source.host = s.child("host").and_then(|d| d.attr("name")).map(str::to_string);
            source.dir = s.child("dir").and_then(|d| d.attr("path")).map(str::to_string);
            source.format = s.child("format").and_then(|d| d.attr("type")).map(str::to_string);
            source.protocol_ver = s.child("protocol").and_then(|d| d.attr("ver")).map(str::to_string);
        }
        if let Some(m) = tree.child("fs:mount_opts") {
            source.mount_opts = m
                .elements()
                .filter(|e| e.name == "fs:option")
                .filter_map(|e| e.attr("name"))
                .map(str::to_string)
                .collect();
        }
        match kind {
            PoolType::Dir => {}
            PoolType::Fs if source.device.is_none() => {
                return Err(Error::invalid_argument(format!("{what}: an fs pool needs <source><device path='...'/>"))
                    .with_field("source/device"))
            }
            PoolType::Netfs if source.host.is_none() || source.dir.is_none() => {
                return Err(Error::invalid_argument(format!(
                    "{what}: a netfs pool needs <source><host name='...'/><dir path='...'/>"
                ))
                .with_field("source/host"))
            }
            _ => {}
        }
        // Live figures are not part of a definition.
        for s in SIZING {
            tree.remove(s);
        }
        Ok(PoolDef { tree, name, uuid, kind, target, perms, source })
    }

    /// The pool name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The UUID.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// dir, fs or netfs.
    pub fn kind(&self) -> PoolType {
        self.kind
    }

    /// The target directory, as written (sanitised, not canonicalised).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The permissions the target directory gets when built.
    pub fn target_permissions(&self) -> &Permissions {
        &self.perms
    }

    /// What fs/netfs pools mount.
    pub fn source(&self) -> &PoolSource {
        &self.source
    }

    /// The document as kept (the definition, without live figures).
    pub fn tree(&self) -> &Element {
        &self.tree
    }

    /// The definition as libvirt writes it to its configuration directory
    /// (sizes 0, as libvirt does for a definition).
    pub fn to_xml(&self) -> String {
        self.with_sizes(0, 0, 0, None).to_xml()
    }

    /// The document with live figures (pool-dumpxml of a running pool):
    /// capacity, allocation and available in bytes, and the target's
    /// actual permissions when given.
    pub fn with_sizes(&self, capacity: u64, allocation: u64, available: u64, actual: Option<&Permissions>) -> Element {
        let mut t = self.tree.clone();
        let mut after: Vec<&str> = vec!["name", "uuid"];
        for (tag, v) in SIZING.iter().zip([capacity, allocation, available]) {
            t.put(Element::new(*tag).with_attr("unit", "bytes").with_text(v.to_string()), &after);
            after.push(tag);
        }
        if let Some(p) = actual {
            let mut p = p.clone();
            p.label = p.label.or_else(|| self.perms.label.clone());
            if let (Some(pe), Some(target)) = (p.to_element(), t.child_mut("target")) {
                target.put(pe, &["path"]);
            }
        }
        t
    }
}

/// Parses a `<capacity unit='...'>N</capacity>`-style element (libvirt's
/// scaled integer, [`units::parse_scaled`](super::units::parse_scaled)).
pub fn scaled_element(e: &Element, what: &str) -> Result<u64> {
    parse_scaled(&e.text(), e.attr("unit").unwrap_or("bytes"))
        .map_err(|err| err.context(format!("{what}: <{}>", e.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_forms_roundtrip() {
        let dir = "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n<pool type='dir'>\n  <name>default</name>\n  <uuid>8a3b4c1e-2f6d-4e5a-9b7c-0d1e2f3a4b5c</uuid>\n  <capacity unit='bytes'>0</capacity>\n  <allocation unit='bytes'>0</allocation>\n  <available unit='bytes'>0</available>\n  <source>\n  </source>\n  <target>\n    <path>/var/lib/libvirt/images</path>\n  </target>\n</pool>\n";
        let d = PoolDef::from_xml(dir, "default.xml").unwrap();
        assert_eq!(d.name(), "default");
        assert_eq!(d.kind(), PoolType::Dir);
        assert_eq!(d.target(), Path::new("/var/lib/libvirt/images"));
        let again = PoolDef::from_xml(&d.to_xml(), "again").unwrap();
        assert_eq!(again, d);

        let netfs = "<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'>\n  <name>nfs</name>\n  <source>\n    <host name='nfs.example.com'/>\n    <dir path='/export/vms'/>\n    <format type='nfs'/>\n    <protocol ver='4'/>\n  </source>\n  <target>\n    <path>/mnt/nfs//vms/</path>\n    <permissions>\n      <mode>0755</mode>\n      <owner>107</owner>\n      <group>-1</group>\n    </permissions>\n  </target>\n  <fs:mount_opts>\n    <fs:option name='sync'/>\n    <fs:option name='lazytime'/>\n  </fs:mount_opts>\n</pool>\n";
        let n = PoolDef::from_xml(netfs, "nfs.xml").unwrap();
        assert_eq!(n.kind(), PoolType::Netfs);
        assert_eq!(n.target(), Path::new("/mnt/nfs/vms"));
        assert_eq!(n.source().host.as_deref(), Some("nfs.example.com"));
        assert_eq!(n.target_permissions().mode, Some(0o755));
        assert_eq!(n.target_permissions().owner, Some(107));
        assert_eq!(n.target_permissions().group, None);
        let out = n.to_xml();
        assert!(out.contains("<fs:option name='lazytime'/>"), "{out}");
        assert!(out.contains("<protocol ver='4'/>"), "{out}");
        assert_eq!(PoolDef::from_xml(&out, "x").unwrap(), n);

        let fs = "<pool type='fs'><name>f</name><source><device path='/dev/vdb1'/><format type='ext4'/></source><target><path>/mnt/f</path></target></pool>";
        let f = PoolDef::from_xml(fs, "f").unwrap();
        assert_eq!(f.source().device.as_deref(), Some("/dev/vdb1"));
    }

    #[test]
    fn bad_definitions() {
        for (doc, needle) in [
            ("<pool type='logical'><name>x</name><target><path>/a</path></target></pool>", "not supported"),
            ("<pool><name>x</name><target><path>/a</path></target></pool>", "type"),
            ("<pool type='dir'><target><path>/a</path></target></pool>", "<name>"),
            ("<pool type='dir'><name>a/b</name><target><path>/a</path></target></pool>", "'/'"),
            ("<pool type='dir'><name>x</name><name>y</name><target><path>/a</path></target></pool>", "more than one"),
            ("<pool type='dir'><name>x</name><target><path>rel</path></target></pool>", "absolute"),
            ("<pool type='dir'><name>x</name></pool>", "target"),
            ("<pool type='dir'><name>x</name><uuid>nope</uuid><target><path>/a</path></target></pool>", "UUID"),
            ("<pool type='dir'><name>x</name><target><path>/a</path><permissions><mode>999</mode></permissions></target></pool>", "octal"),
            ("<pool type='fs'><name>x</name><target><path>/a</path></target></pool>", "device"),
            ("<volume/>", "<pool>"),
        ] {
            let e = PoolDef::from_xml(doc, "t.xml").unwrap_err();
            assert!(e.to_string().contains(needle), "{doc}: {e}");
        }
    }
}
