//! A small element tree over `quick-xml`, with limits, for libvirt's pool
//! and volume documents (which may come from anyone: `pool-define FILE`).
//!
//! Parsing refuses documents over [`MAX_XML_BYTES`], deeper than
//! [`MAX_DEPTH`], with more than [`MAX_ELEMENTS`] elements or
//! [`MAX_ATTRS`] attributes on one element, DOCTYPE declarations (no
//! entity games), entity references other than XML's five and character
//! references, more than one root, and text outside the root. Comments and
//! processing instructions are dropped (libvirt drops them too when it
//! rewrites a file); whitespace between elements is not kept, since the
//! writer indents as libvirt does (two spaces, single-quoted attributes).
//! Unknown elements, attributes and namespace prefixes are kept as they are,
//! so a document round-trips.

use std::fmt::Write as _;

use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;
use quick_xml::XmlVersion;

use crate::error::{Error, Result};

pub use crate::limits::{
    POOL_XML_MAX_ATTRS as MAX_ATTRS, POOL_XML_MAX_BYTES as MAX_XML_BYTES, POOL_XML_MAX_DEPTH as MAX_DEPTH,
    POOL_XML_MAX_ELEMENTS as MAX_ELEMENTS,
};

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A child element.
    Element(Element),
    /// Character data (entities resolved).
    Text(String),
}

/// An element: qualified name (`fs:mount_opts` keeps its prefix),
/// attributes in document order, children.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// The qualified name.
    pub name: String,
    /// Attributes (qualified name, value) in order.
    pub attrs: Vec<(String, String)>,
    /// Children in order.
    pub children: Vec<Node>,
}

fn xml_err(what: &str, msg: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("{what}: malformed XML: {msg}"))
}

impl Element {
    /// A new element without attributes or children.
    pub fn new(name: impl Into<String>) -> Self {
        Element { name: name.into(), ..Default::default() }
    }

    /// Adds an attribute (builder style).
    pub fn with_attr(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.attrs.push((k.into(), v.into()));
        self
    }

    /// Adds a text child (builder style).
    pub fn with_text(mut self, t: impl Into<String>) -> Self {
        self.children.push(Node::Text(t.into()));
        self
    }

    /// Adds a child element (builder style).
    pub fn with_child(mut self, e: Element) -> Self {
        self.children.push(Node::Element(e));
        self
    }

    /// Appends a child element.
    pub fn push(&mut self, e: Element) {
        self.children.push(Node::Element(e));
    }

    /// The value of attribute `k`.
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    /// Sets (or adds) attribute `k`.
    pub fn set_attr(&mut self, k: &str, v: impl Into<String>) {
        match self.attrs.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = v.into(),
            None => self.attrs.push((k.to_string(), v.into())),
        }
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The first child element named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    /// The first child element named `name`, mutable.
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.children.iter_mut().find_map(|n| match n {
            Node::Element(e) if e.name == name => Some(e),
            _ => None,
        })
    }

    /// How many child elements are named `name`.
    pub fn count(&self, name: &str) -> usize {
        self.elements().filter(|e| e.name == name).count()
    }

    /// The text content (text children joined).
    pub fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s
    }

    /// The trimmed text of child `name`, if that child exists.
    pub fn child_text(&self, name: &str) -> Option<String> {
        self.child(name).map(|e| e.text().trim().to_string())
    }

    /// Removes every child element named `name`.
    pub fn remove(&mut self, name: &str) {
        self.children.retain(|n| !matches!(n, Node::Element(e) if e.name == name));
    }

    /// Replaces the first child named `name` (keeping its place) or inserts
    /// `e` after the last child named one of `after` (or at the end).
    pub fn put(&mut self, e: Element, after: &[&str]) {
        if let Some(i) = self.children.iter().position(|n| matches!(n, Node::Element(x) if x.name == e.name)) {
            self.children[i] = Node::Element(e);
            return;
        }
        let pos = self
            .children
            .iter()
            .rposition(|n| matches!(n, Node::Element(x) if after.contains(&x.name.as_str())))
            .map_or(self.children.len(), |i| i + 1);
        self.children.insert(pos, Node::Element(e));
    }

    /// Serializes as libvirt does: two-space indentation, single quotes,
    /// `<x/>` for empty elements, text inline.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = "  ".repeat(depth);
        out.push_str(&pad);
        out.push('<');
        out.push_str(&self.name);
        for (k, v) in &self.attrs {
            let _ = write!(out, " {k}='{}'", escape(v, true));
        }
        let has_elems = self.elements().next().is_some();
        let text = self.text();
        if !has_elems && text.is_empty() {
            out.push_str("/>\n");
            return;
        }
        out.push('>');
        if !has_elems {
            out.push_str(&escape(&text, false));
        } else {
            out.push('\n');
            for n in &self.children {
                match n {
                    Node::Element(e) => e.write(out, depth + 1),
                    Node::Text(t) if !t.trim().is_empty() => {
                        let _ = writeln!(out, "{pad}  {}", escape(t.trim(), false));
                    }
                    Node::Text(_) => {}
                }
            }
            out.push_str(&pad);
        }
        let _ = writeln!(out, "</{}>", self.name);
    }
}

/// Escapes text (`&`, `<`, `>`) or an attribute value (also both quotes).
pub fn escape(s: &str, attr: bool) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' if attr => o.push_str("&apos;"),
            '"' if attr => o.push_str("&quot;"),
            // A reader turns raw CR into LF, and raw whitespace in an
            // attribute into spaces: references keep them as they were.
            '\r' => o.push_str("&#xD;"),
            '\n' if attr => o.push_str("&#xA;"),
            '\t' if attr => o.push_str("&#x9;"),
            _ => o.push(c),
        }
    }
    o
}

/// Whether `s` is an XML name (simplified to what a writer must be able to
/// write back: a letter, `_` or `:` first, then letters, digits, `-`, `.`,
/// `_`, `:`; non-ASCII letters and digits allowed).
fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
}

fn start(e: &BytesStart<'_>, what: &str) -> Result<Element> {
    let name =
        std::str::from_utf8(e.name().as_ref()).map_err(|_| xml_err(what, "element name is not UTF-8"))?.to_string();
    if !is_name(&name) {
        return Err(xml_err(what, format!("'{}' is not an element name", name.escape_debug())));
    }
    let mut el = Element::new(name);
    for a in e.attributes() {
        let a = a.map_err(|err| xml_err(what, err))?;
        if el.attrs.len() >= MAX_ATTRS {
            return Err(Error::limit(format!("{what}: element <{}> has more than {MAX_ATTRS} attributes", el.name)));
        }
        let k =
            std::str::from_utf8(a.key.as_ref()).map_err(|_| xml_err(what, "attribute name is not UTF-8"))?.to_string();
        if !is_name(&k) {
            return Err(xml_err(what, format!("'{}' is not an attribute name", k.escape_debug())));
        }
        let v = a
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|err| xml_err(what, format!("attribute {k}: {err}")))?
            .into_owned();
        el.attrs.push((k, v));
    }
    Ok(el)
}

/// A finished element goes into its parent, or is the root.
fn close(stack: &mut [Element], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some(parent) => parent.push(el),
        None => *root = Some(el),
    }
}

/// Parses a document; `what` names it in errors (a file name, "pool XML").
pub fn parse(input: &str, what: &str) -> Result<Element> {
    if input.len() > MAX_XML_BYTES {
        return Err(Error::limit(format!(
            "{what}: XML document of {} bytes is larger than the {MAX_XML_BYTES}-byte limit",
            input.len()
        )));
    }
    let mut reader = Reader::from_str(input);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
    let text_out_of_root = |root: &Option<Element>| -> Error {
        xml_err(what, if root.is_some() { "content after the root element" } else { "text before the root element" })
    };
    loop {
        let ev =
            reader.read_event().map_err(|e| xml_err(what, format!("{e} (at byte {})", reader.error_position())))?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                if root.is_some() {
                    return Err(xml_err(what, "more than one root element"));
                }
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(Error::limit(format!("{what}: more than {MAX_ELEMENTS} elements")));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(Error::limit(format!("{what}: elements nested deeper than {MAX_DEPTH}")));
                }
                let el = start(e, what)?;
                if matches!(ev, Event::Start(_)) {
                    stack.push(el);
                } else {
                    close(&mut stack, &mut root, el);
                }
            }
            Event::End(_) => {
                let mut el = stack.pop().ok_or_else(|| xml_err(what, "unexpected end tag"))?;
                // Indentation between child elements is not content.
                if el.elements().next().is_some() {
                    el.children.retain(|n| !matches!(n, Node::Text(t) if t.trim().is_empty()));
                    // libvirt's documents have no mixed content, and a value
                    // read from one (a path, a size) must not silently skip
                    // an element in its middle.
                    if el.children.iter().any(|n| matches!(n, Node::Text(_))) {
                        return Err(xml_err(
                            what,
                            format!(
                                "element <{}> mixes text and elements (before byte {})",
                                el.name,
                                reader.buffer_position()
                            ),
                        ));
                    }
                }
                close(&mut stack, &mut root, el);
            }
            Event::Text(t) => {
                let s = t.xml10_content().map_err(|e| xml_err(what, e))?;
                match stack.last_mut() {
                    Some(el) => push_text(el, &s),
                    None if s.trim().is_empty() => {}
                    None => return Err(text_out_of_root(&root)),
                }
            }
            Event::CData(t) => {
                let s = t.xml10_content().map_err(|e| xml_err(what, e))?;
                match stack.last_mut() {
                    Some(el) => push_text(el, &s),
                    None => return Err(text_out_of_root(&root)),
                }
            }
            Event::GeneralRef(r) => {
                let c = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .map_err(|e| xml_err(what, e))?
                        .ok_or_else(|| xml_err(what, "bad character reference"))?
                        .to_string()
                } else {
                    let name = r.decode().map_err(|e| xml_err(what, e))?;
                    match &*name {
                        "lt" => "<",
                        "gt" => ">",
                        "amp" => "&",
                        "apos" => "'",
                        "quot" => "\"",
                        other => return Err(xml_err(what, format!("unknown entity '&{other};'"))),
                    }
                    .to_string()
                };
                match stack.last_mut() {
                    Some(el) => push_text(el, &c),
                    None => return Err(text_out_of_root(&root)),
                }
            }
            Event::DocType(_) => return Err(xml_err(what, "DOCTYPE declarations are not accepted")),
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(xml_err(what, "the document ends inside an element"));
    }
    root.ok_or_else(|| xml_err(what, "no root element"))
}

/// Appends text, merging with a preceding text node; whitespace-only text
/// is kept (it matters in leaf elements) and dropped by the writer where
/// elements surround it.
fn push_text(el: &mut Element, s: &str) {
    if let Some(Node::Text(prev)) = el.children.last_mut() {
        prev.push_str(s);
    } else {
        el.children.push(Node::Text(s.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes() {
        let doc = "<?xml version='1.0'?>\n<!-- c -->\n<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'>\n  <name>a&amp;b&#x41;</name>\n  <fs:mount_opts><fs:option name='ro'/></fs:mount_opts>\n</pool>\n";
        let e = parse(doc, "t").unwrap();
        assert_eq!(e.name, "pool");
        assert_eq!(e.attr("type"), Some("netfs"));
        assert_eq!(e.child_text("name").unwrap(), "a&bA");
        let out = e.to_xml();
        assert_eq!(
            out,
            "<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'>\n  <name>a&amp;bA</name>\n  <fs:mount_opts>\n    <fs:option name='ro'/>\n  </fs:mount_opts>\n</pool>\n"
        );
        assert_eq!(parse(&out, "t").unwrap(), e);
    }

    #[test]
    fn whitespace_references_survive_a_round_trip() {
        let e = parse("<a b='x&#10;y&#9;z&#13;'><c>p&#13;q</c></a>", "t").unwrap();
        assert_eq!(e.attr("b"), Some("x\ny\tz\r"));
        assert_eq!(e.child_text("c").unwrap(), "p\rq");
        assert_eq!(parse(&e.to_xml(), "t").unwrap(), e);
    }

    #[test]
    fn hostile_documents() {
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        let many = format!("<a>{}</a>", "<b/>".repeat(MAX_ELEMENTS + 1));
        let attrs = format!("<a {}/>", (0..=MAX_ATTRS).map(|i| format!("x{i}='1'")).collect::<Vec<_>>().join(" "));
        let big = format!("<a>{}</a>", "x".repeat(MAX_XML_BYTES));
        for bad in [
            "",
            "plain text",
            "<a>",
            "<a></b>",
            "<a/><b/>",
            "<a/>trailing",
            "<!DOCTYPE a [<!ENTITY x 'y'>]><a>&x;</a>",
            "<a>&unknown;</a>",
            "<a b='1' b='2'/>",
            "<a>&#0;</a>",
            "<a>/mnt/<b/>x</a>",
            "<a><b/>text</a>",
            "< />",
            "<a><1b/></a>",
            deep.as_str(),
            many.as_str(),
            attrs.as_str(),
            big.as_str(),
        ] {
            assert!(parse(bad, "t").is_err(), "{:.60}", bad);
        }
    }
}
