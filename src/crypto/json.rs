//! A small JSON reader and writer for the LUKS2 metadata area (RFC 8259),
//! built for hostile input: the text, its nesting depth, the number of
//! values and every string's length are bounded (`crate::limits`), numbers
//! are kept as their text (LUKS2 uses only unsigned integers, checked
//! where a field is read), duplicate object keys are refused (two readers
//! could pick different ones), and nothing recurses deeper than the depth
//! limit. Also the base64 (RFC 4648, padded) LUKS2 uses for salts and
//! digests.
//!
//! The library keeps `serde_json` out of a `default-features = false`
//! build; this covers what LUKS2 needs and no more.

use crate::error::{Error, Result};
use crate::limits::{LUKS2_JSON_MAX_DEPTH, LUKS2_JSON_MAX_STRING, LUKS2_JSON_MAX_VALUES};

/// A JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as written.
    Num(String),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, keys in the order written (no duplicates).
    Obj(Vec<(String, Json)>),
}

fn err(msg: String, at: usize) -> Error {
    Error::invalid(msg).with_field("json").with_offset(at as u64)
}

impl Json {
    /// Parses one JSON text (surrounding white space allowed, nothing else
    /// after it). Error offsets are byte positions in `text`.
    pub fn parse(text: &[u8]) -> Result<Json> {
        let mut p = Parser { b: text, at: 0, values: 0 };
        p.ws();
        let v = p.value(0)?;
        p.ws();
        if p.at != text.len() {
            return Err(err(format!("JSON has trailing bytes at offset {}", p.at), p.at));
        }
        Ok(v)
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The object's members.
    pub fn members(&self) -> Option<&[(String, Json)]> {
        match self {
            Json::Obj(m) => Some(m),
            _ => None,
        }
    }

    /// The member `key` of an object, to change.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Json> {
        match self {
            Json::Obj(m) => m.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The object's members, to change.
    pub fn members_mut(&mut self) -> Option<&mut Vec<(String, Json)>> {
        match self {
            Json::Obj(m) => Some(m),
            _ => None,
        }
    }

    /// The array's items, to change.
    pub fn items_mut(&mut self) -> Option<&mut Vec<Json>> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }

    /// The array's items.
    pub fn items(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }

    /// The string.
    pub fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The number, when it is an unsigned integer that fits in 64 bits.
    pub fn u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) => digits_u64(n),
            _ => None,
        }
    }

    /// Short text of the value for error messages.
    pub fn show(&self) -> String {
        let mut s = String::new();
        self.write(&mut s);
        if s.len() > 40 {
            let mut end = 40;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push_str("...");
        }
        s
    }

    /// Compact JSON text.
    pub fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => out.push_str(n),
            Json::Str(s) => write_str(s, out),
            Json::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Json::Obj(m) => {
                out.push('{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(k, out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// Parses a string of decimal digits (no sign, no leading `+`) as u64.
pub fn digits_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
    values: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if self.peek() != Some(c) {
            return Err(err(format!("JSON expects '{}' at offset {}", c as char, self.at), self.at));
        }
        self.at += 1;
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Json> {
        self.values += 1;
        if self.values > LUKS2_JSON_MAX_VALUES {
            return Err(Error::limit(format!(
                "JSON has more than {LUKS2_JSON_MAX_VALUES} values (offset {})",
                self.at
            ))
            .with_field("json")
            .with_offset(self.at as u64));
        }
        match self.peek() {
            Some(b'{') | Some(b'[') if depth >= LUKS2_JSON_MAX_DEPTH => {
                Err(Error::limit(format!("JSON nests deeper than {LUKS2_JSON_MAX_DEPTH} levels at offset {}", self.at))
                    .with_field("json")
                    .with_offset(self.at as u64))
            }
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.word("true", Json::Bool(true)),
            Some(b'f') => self.word("false", Json::Bool(false)),
            Some(b'n') => self.word("null", Json::Null),
            Some(c) => Err(err(format!("JSON has an unexpected byte {c:#04x} at offset {}", self.at), self.at)),
            None => Err(err(format!("JSON ends early at offset {}", self.at), self.at)),
        }
    }

    fn word(&mut self, w: &str, v: Json) -> Result<Json> {
        if self.b.get(self.at..self.at + w.len()) != Some(w.as_bytes()) {
            return Err(err(format!("JSON has a bad literal at offset {}", self.at), self.at));
        }
        self.at += w.len();
        Ok(v)
    }

    fn object(&mut self, depth: usize) -> Result<Json> {
        self.expect(b'{')?;
        let mut m: Vec<(String, Json)> = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Json::Obj(m));
        }
        loop {
            self.ws();
            let kat = self.at;
            if self.peek() != Some(b'"') {
                return Err(err(format!("JSON object key expected at offset {kat}"), kat));
            }
            let k = self.string()?;
            if m.iter().any(|(x, _)| *x == k) {
                return Err(err(format!("JSON object has the key \"{k}\" twice (offset {kat})"), kat));
            }
            self.ws();
            self.expect(b':')?;
            self.ws();
            let v = self.value(depth)?;
            m.push((k, v));
            self.ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Json::Obj(m));
                }
                _ => return Err(err(format!("JSON expects ',' or '}}' at offset {}", self.at), self.at)),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Json> {
        self.expect(b'[')?;
        let mut a = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Json::Arr(a));
        }
        loop {
            self.ws();
            a.push(self.value(depth)?);
            self.ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Json::Arr(a));
                }
                _ => return Err(err(format!("JSON expects ',' or ']' at offset {}", self.at), self.at)),
            }
        }
    }

    fn number(&mut self) -> Result<Json> {
        let start = self.at;
        let digits = |p: &mut Self| {
            let s = p.at;
            while matches!(p.peek(), Some(b'0'..=b'9')) {
                p.at += 1;
            }
            p.at - s
        };
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let int_start = self.at;
        let n = digits(self);
        if n == 0 || (n > 1 && self.b.get(int_start) == Some(&b'0')) {
            return Err(err(format!("JSON has a malformed number at offset {start}"), start));
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if digits(self) == 0 {
                return Err(err(format!("JSON has a malformed number at offset {start}"), start));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if digits(self) == 0 {
                return Err(err(format!("JSON has a malformed number at offset {start}"), start));
            }
        }
        if self.at - start > 64 {
            return Err(Error::limit(format!("JSON number at offset {start} is longer than 64 characters"))
                .with_field("json")
                .with_offset(start as u64));
        }
        let text = std::str::from_utf8(self.b.get(start..self.at).unwrap_or_default()).unwrap_or_default();
        Ok(Json::Num(text.to_string()))
    }

    fn hex4(&mut self) -> Result<u32> {
        let at = self.at;
        let h = self.b.get(at..at + 4).ok_or_else(|| err(format!("JSON string ends in an escape at {at}"), at))?;
        let s = std::str::from_utf8(h).ok().filter(|s| s.bytes().all(|c| c.is_ascii_hexdigit()));
        let v = s
            .and_then(|s| u32::from_str_radix(s, 16).ok())
            .ok_or_else(|| err(format!("JSON has a bad \\u escape at offset {at}"), at))?;
        self.at += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String> {
        let start = self.at;
        self.expect(b'"')?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            if out.len() > LUKS2_JSON_MAX_STRING {
                return Err(Error::limit(format!(
                    "JSON string at offset {start} is longer than {LUKS2_JSON_MAX_STRING} bytes"
                ))
                .with_field("json")
                .with_offset(start as u64));
            }
            let c = self.peek().ok_or_else(|| err(format!("JSON string at offset {start} is not closed"), start))?;
            self.at += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.peek().ok_or_else(|| err(format!("JSON string at {start} is not closed"), start))?;
                    self.at += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let at = self.at;
                            let mut v = self.hex4()?;
                            if (0xd800..0xdc00).contains(&v) {
                                if self.b.get(self.at..self.at + 2) != Some(b"\\u") {
                                    return Err(err(format!("JSON has a lone surrogate at offset {at}"), at));
                                }
                                self.at += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err(err(format!("JSON has a lone surrogate at offset {at}"), at));
                                }
                                v = 0x10000 + ((v - 0xd800) << 10) + (lo - 0xdc00);
                            }
                            char::from_u32(v)
                                .ok_or_else(|| err(format!("JSON has a lone surrogate at offset {at}"), at))?
                        }
                        other => {
                            return Err(err(
                                format!("JSON has a bad escape '\\{}' at offset {}", other as char, self.at - 2),
                                self.at - 2,
                            ))
                        }
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c if c < 0x20 => {
                    return Err(err(format!("JSON string has a control byte at offset {}", self.at - 1), self.at - 1))
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| err(format!("JSON string at offset {start} is not UTF-8"), start))
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 with padding.
pub fn b64_encode(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Decodes padded base64; `None` when it is not.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, q) in b.chunks(4).enumerate() {
        let last = i + 1 == b.len() / 4;
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for (j, &c) in q.iter().enumerate() {
            let v = if j >= 4 - pad { 0 } else { B64.iter().position(|&x| x == c)? as u32 };
            n = (n << 6) | v;
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_luks2_like_text_and_writes_it_back() {
        let t = br#" {"keyslots":{"0":{"type":"luks2","key_size":64,"x":[true,false,null,-1.5e3]}},"s":"a\"\\\/\u00e9\ud83d\ude00\n"} "#;
        let v = Json::parse(t).unwrap();
        let ks = v.get("keyslots").unwrap().get("0").unwrap();
        assert_eq!(ks.get("key_size").unwrap().u64(), Some(64));
        assert_eq!(ks.get("type").unwrap().str(), Some("luks2"));
        assert_eq!(v.get("s").unwrap().str(), Some("a\"\\/é😀\n"));
        let mut w = String::new();
        v.write(&mut w);
        assert_eq!(Json::parse(w.as_bytes()).unwrap(), v);
        assert_eq!(ks.get("x").unwrap().items().unwrap()[3].u64(), None);
    }

    #[test]
    fn refuses_bad_text_with_offsets() {
        for (t, off) in [
            (&b"{\"a\":1,}"[..], 7),
            (b"{\"a\":1,\"a\":2}", 7),
            (b"[01]", 1),
            (b"{\"a\":\"x", 5),
            (b"{} x", 3),
            (b"\"\\q\"", 1),
            (b"\"\\ud800\"", 3),
            (b"\"a\x01\"", 2),
            (b"tru", 0),
        ] {
            let e = Json::parse(t).unwrap_err();
            assert_eq!(e.offset(), Some(off), "{} -> {e}", String::from_utf8_lossy(t));
        }
    }

    #[test]
    fn bounds_depth_values_and_strings() {
        let deep = "[".repeat(LUKS2_JSON_MAX_DEPTH + 1) + &"]".repeat(LUKS2_JSON_MAX_DEPTH + 1);
        let e = Json::parse(deep.as_bytes()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::LimitExceeded);
        let ok = "[".repeat(LUKS2_JSON_MAX_DEPTH) + &"]".repeat(LUKS2_JSON_MAX_DEPTH);
        assert!(Json::parse(ok.as_bytes()).is_ok());
        let many = format!("[{}0]", "0,".repeat(LUKS2_JSON_MAX_VALUES));
        assert_eq!(Json::parse(many.as_bytes()).unwrap_err().kind(), crate::ErrorKind::LimitExceeded);
        let long = format!("\"{}\"", "a".repeat(LUKS2_JSON_MAX_STRING + 2));
        assert_eq!(Json::parse(long.as_bytes()).unwrap_err().kind(), crate::ErrorKind::LimitExceeded);
    }

    #[test]
    fn base64_round_trips() {
        for n in 0..70usize {
            let d: Vec<u8> = (0..n).map(|i| (i * 37) as u8).collect();
            assert_eq!(b64_decode(&b64_encode(&d)).unwrap(), d);
        }
        assert_eq!(b64_encode(b"foob"), "Zm9vYg==");
        assert_eq!(b64_decode("q/UG7SEIY4bf052xQJk5Hj30dSxfL2ZYcsi1irbDJ1U=").unwrap().len(), 32);
        assert!(b64_decode("Zm9=vYg=").is_none());
        assert!(b64_decode("Zm9").is_none());
        assert!(b64_decode("Zm9v!A==").is_none());
    }
}
