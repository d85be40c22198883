//! What a masked value becomes, by strategy and by PostgreSQL type and format.
//!
//! The protocol must stay valid and clients must still be able to decode what they get:
//! - text-like types (`text`, `varchar`, `char`, `name`, ...) get the replacement text in
//!   both formats; `json` and `jsonb` get it as a JSON string (`jsonb` binary keeps its
//!   version byte);
//! - every other type is masked to SQL NULL, the one value valid for any type (a number
//!   column cannot carry `[REDACTED]`, an enum column only its own labels).
//!
//! Detectors look inside text-like values in both formats, inside any value sent in text
//! format (arrays, records), inside `bytea` (its bytes, in both formats) and `inet` (its
//! address), and inside binary values whose type says how to read them: enums (their
//! label), records (field by field, each by the type its bytes name) and arrays (element
//! by element), nested as deep as [`MAX_NESTING`]; a finding inside an enum, an address,
//! a `bytea`, a record or an array masks the whole value to NULL. Numbers, dates, OIDs,
//! and ranges of numbers and dates, have nothing to find. What a binary value is cannot
//! be told from its bytes, only from the column's type ([`super::types`] for the
//! database's own): any other binary value (an extension's type, a type the catalog was
//! not asked about) cannot be read, so when detectors apply it is masked to NULL rather
//! than passed unread.

use std::{fs, os::unix::fs::OpenOptionsExt as _, path::Path};

use std::sync::LazyLock;

use super::{
    detect::{Detectors, Found},
    plan::Detection,
    types::Types,
};
use crate::policy::model::Strategy;

/// Every detector, compiled once; a result's [`Detection`] picks the ones it wants.
static ALL: LazyLock<Detectors> = LazyLock::new(Detectors::all);

/// How a column's values can be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeClass {
    /// UTF-8 text in both formats.
    Text,
    /// `json` (text in both formats).
    Json,
    /// `jsonb`: binary is a version byte then the JSON text.
    Jsonb,
    /// An enum: its label's text in both formats, but only its own labels are valid
    /// values (a masked one is NULL).
    Label,
    /// `inet` and `cidr`: an address, read as its text in both formats (the binary form is
    /// rendered); a finding masks the value (to NULL: a spliced address is none).
    Inet,
    /// `bytea`: its bytes in binary format, `\x` and their hex digits in text format (or
    /// the escape format, which is text). Detectors look at the bytes as text; a finding
    /// masks the value (to NULL).
    Bytes,
    /// Numbers, dates, booleans, UUIDs: no text inside, nothing to detect.
    Opaque,
    /// An array (the element type's OID): readable in text format, and in binary format
    /// element by element.
    Array(u32),
    /// A record (a composite type, or an anonymous `ROW(...)`): readable in text format,
    /// and in binary format field by field.
    Record,
    /// Anything else (extension types, types not known): readable in text format only.
    Other,
}

/// Records and arrays inside records and arrays are read this deep; a value nested
/// deeper is masked.
pub const MAX_NESTING: usize = 8;

pub fn type_class(oid: u32) -> TypeClass {
    match oid {
        // text, varchar, bpchar, name, "char", unknown, xml, refcursor.
        25 | 1043 | 1042 | 19 | 18 | 705 | 142 | 1790 => TypeClass::Text,
        114 => TypeClass::Json,
        3802 => TypeClass::Jsonb,
        17 => TypeClass::Bytes,
        650 | 869 => TypeClass::Inet,
        16 | 20 | 21 | 23 | 26 | 28 | 29 | 700 | 701 | 790 | 1700 | 1082 | 1083 | 1266 | 1114
        | 1184 | 1186 | 2950 | 5038 | 3220 => TypeClass::Opaque,
        // OIDs and their vectors, the reg* aliases of OIDs (binary: the OID), tid, xid8,
        // snapshots, geometry, MAC addresses, bit strings.
        22
        | 24
        | 27
        | 30
        | 2202..=2206
        | 3734
        | 3769
        | 4089
        | 4096
        | 4191
        | 5069
        | 2970
        | 600..=604
        | 628
        | 718
        | 774
        | 829
        | 1560
        | 1562 => TypeClass::Opaque,
        // Ranges and multiranges of numbers, timestamps and dates.
        3904 | 3926 | 3906 | 3908 | 3910 | 3912 | 4451 | 4536 | 4532 | 4533 | 4534 | 4535 => {
            TypeClass::Opaque
        }
        // `record`: an anonymous row.
        2249 => TypeClass::Record,
        _ => match array_element(oid) {
            Some(element) => TypeClass::Array(element),
            None => TypeClass::Other,
        },
    }
}

/// The element type of PostgreSQL's own array types (`pg_type.typelem` of the arrays
/// initdb creates, which keep their OIDs): those whose elements are text-like, records,
/// or hold no text. Arrays of other built-in types are [`TypeClass::Other`]; arrays of the
/// database's own types are learned ([`super::types`]).
fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1009 => 25,
        1015 => 1043,
        1014 => 1042,
        1003 => 19,
        1002 => 18,
        199 => 114,
        3807 => 3802,
        1000 => 16,
        1016 => 20,
        1005 => 21,
        1007 => 23,
        1028 => 26,
        1010 => 27,
        1011 => 28,
        1021 => 700,
        1022 => 701,
        1231 => 1700,
        1182 => 1082,
        1183 => 1083,
        1270 => 1266,
        1115 => 1114,
        1185 => 1184,
        1187 => 1186,
        2951 => 2950,
        2287 => 2249,
        1001 => 17,
        143 => 142,
        2201 => 1790,
        651 => 650,
        1041 => 869,
        791 => 790,
        3221 => 3220,
        5039 => 5038,
        1006 => 22,
        1008 => 24,
        1012 => 29,
        1013 => 30,
        2207..=2211 => oid - 5,
        3735 => 3734,
        3770 => 3769,
        4090 => 4089,
        4097 => 4096,
        4192 => 4191,
        271 => 5069,
        2949 => 2970,
        1017..=1020 => oid - 417,
        1027 => 604,
        629 => 628,
        719 => 718,
        775 => 774,
        1040 => 829,
        1561 => 1560,
        1563 => 1562,
        _ => return None,
    })
}

/// What the detectors `detection` asks for find in `s`, counted in
/// `portcullis_masked_values_total` (each one masks a value).
fn findings(detection: &Detection, s: &str) -> Vec<Found> {
    let mut found = ALL.find(s);
    found.retain(|f| detection.strategy(f.detector).is_some());
    let counter = &crate::metrics::get().masked_values;
    for f in &found {
        counter.with_label_values(&[f.detector]).inc();
    }
    found
}

/// Whether a binary value of `class` must be masked: a detector finds something in it, or
/// it cannot be read. Enums and text-like values are read as text; records field by field
/// and arrays element by element, each by its type (`types` for the database's own), to
/// [`MAX_NESTING`] levels. An array whose header names another element type than its
/// column's type, or a record or array that is not well formed, cannot be read (what a
/// binary value is cannot be told from its bytes).
fn hides(
    detection: &Detection,
    types: &Types,
    class: TypeClass,
    value: &[u8],
    depth: usize,
) -> bool {
    let text =
        |v: &[u8]| std::str::from_utf8(v).map_or(true, |s| !findings(detection, s).is_empty());
    match class {
        TypeClass::Opaque => false,
        TypeClass::Text | TypeClass::Json | TypeClass::Label => text(value),
        TypeClass::Bytes => !findings(detection, &String::from_utf8_lossy(value)).is_empty(),
        TypeClass::Inet => binary_inet(value).is_none_or(|a| text(a.as_bytes())),
        TypeClass::Jsonb => match value.split_first() {
            Some((1, doc)) => text(doc),
            _ => true,
        },
        _ if depth >= MAX_NESTING => true,
        TypeClass::Array(element) => binary_array(value)
            .filter(|a| a.element == element)
            .is_none_or(|a| {
                let class = types.class(element);
                a.elements
                    .into_iter()
                    .flatten()
                    .any(|e| hides(detection, types, class, e, depth + 1))
            }),
        TypeClass::Record => binary_record(value).is_none_or(|fields| {
            fields.into_iter().any(|(oid, v)| {
                v.is_some_and(|v| hides(detection, types, types.class(oid), v, depth + 1))
            })
        }),
        TypeClass::Other => true,
    }
}

/// The address of an `inet` or `cidr` in binary format (`inet_send`: family, prefix
/// bits, whether it is a cidr, the address's length, the address), as text. `None`: not
/// well formed.
fn binary_inet(v: &[u8]) -> Option<String> {
    match v {
        [2, _, _, 4, a @ ..] => {
            Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?).to_string())
        }
        [3, _, _, 16, a @ ..] => {
            Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?).to_string())
        }
        _ => None,
    }
}

/// The bytes of hex digits (`bytea`'s text format after its `\x`). `None`: not hex.
fn unhex(digits: &[u8]) -> Option<Vec<u8>> {
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    digits
        .chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// Reads a record in binary format (`record_send`): the field count, then each field as
/// its type's OID, a length (-1: NULL) and its bytes. `None`: not a well-formed record
/// (every count is checked against the bytes there are).
#[allow(clippy::type_complexity)]
fn binary_record(v: &[u8]) -> Option<Vec<(u32, Option<&[u8]>)>> {
    let mut c = Cursor { v, at: 0 };
    let n = usize::try_from(c.int()?).ok()?;
    // Each field takes eight bytes at least.
    if n > c.left() / 8 {
        return None;
    }
    let mut fields = Vec::with_capacity(n);
    for _ in 0..n {
        let oid = c.int()? as u32;
        fields.push((oid, c.value()?));
    }
    c.done().then_some(fields)
}

/// Reads the big-endian integers and length-prefixed values of a binary array or record.
struct Cursor<'a> {
    v: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn int(&mut self) -> Option<i32> {
        let b = self.v.get(self.at..self.at + 4)?;
        self.at += 4;
        Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length (-1: NULL) and that many bytes. `None`: past the end.
    fn value(&mut self) -> Option<Option<&'a [u8]>> {
        let len = self.int()?;
        if len < 0 {
            return Some(None);
        }
        let end = self.at.checked_add(len as usize)?;
        let v = self.v.get(self.at..end)?;
        self.at = end;
        Some(Some(v))
    }

    fn left(&self) -> usize {
        self.v.len().saturating_sub(self.at)
    }

    fn done(&self) -> bool {
        self.at == self.v.len()
    }
}

/// An array in binary format (`array_send`): its element type as it says, and the
/// elements (`None`: SQL NULL).
#[derive(Debug)]
struct BinaryArray<'a> {
    element: u32,
    elements: Vec<Option<&'a [u8]>>,
}

/// Reads a binary array: `ndim`, a flags word, the element type's OID, `ndim` pairs of
/// (size, lower bound), then each element as a length (-1: NULL) and its bytes. `None`:
/// not a well-formed array (every count is checked against the bytes there are).
fn binary_array(v: &[u8]) -> Option<BinaryArray<'_>> {
    let mut c = Cursor { v, at: 0 };
    let ndim = usize::try_from(c.int()?).ok().filter(|n| *n <= 6)?;
    let _flags = c.int()?;
    let element_type = c.int()? as u32;
    let mut count: usize = if ndim == 0 { 0 } else { 1 };
    for _ in 0..ndim {
        let size = usize::try_from(c.int()?).ok()?;
        let _lower = c.int()?;
        count = count.checked_mul(size)?;
    }
    // Each element takes four bytes at least.
    if count > c.left() / 4 {
        return None;
    }
    let mut elements = Vec::with_capacity(count);
    for _ in 0..count {
        elements.push(c.value()?);
    }
    c.done().then_some(BinaryArray {
        element: element_type,
        elements,
    })
}

/// The replacement text of a whole value, encoded for its type and format. `None` = NULL
/// (a type that cannot carry text).
fn encode_whole(r: String, class: TypeClass, binary: bool) -> Option<Vec<u8>> {
    match class {
        TypeClass::Text => Some(r.into_bytes()),
        TypeClass::Json | TypeClass::Jsonb => {
            let json = serde_json::to_string(&r).unwrap_or_else(|_| "null".into());
            let mut out = Vec::with_capacity(json.len() + 1);
            if class == TypeClass::Jsonb && binary {
                out.push(1);
            }
            out.extend_from_slice(json.as_bytes());
            Some(out)
        }
        TypeClass::Label
        | TypeClass::Bytes
        | TypeClass::Inet
        | TypeClass::Opaque
        | TypeClass::Array(_)
        | TypeClass::Record
        | TypeClass::Other => None,
    }
}

/// What [`Masker::whole`] gives every value of a column when the strategy does not look at
/// the value (redaction, NULL), so a result's plan computes it once instead of once per
/// row. `None`: the replacement depends on the value (partial, keyed hash).
pub fn fixed_whole(
    strategy: &Strategy,
    label: &str,
    class: TypeClass,
    binary: bool,
) -> Option<Option<Vec<u8>>> {
    Some(fixed_text(strategy, label)?.and_then(|t| encode_whole(t, class, binary)))
}

/// The replacement text when the strategy does not look at the value (`Some(None)`: SQL
/// NULL); `None` for the strategies that do.
fn fixed_text(strategy: &Strategy, label: &str) -> Option<Option<String>> {
    match strategy {
        Strategy::Redact { text: Some(t) } => Some(Some(t.clone())),
        Strategy::Redact { text: None } => Some(Some(format!("[REDACTED:{label}]"))),
        Strategy::Null => Some(None),
        Strategy::Partial { .. } | Strategy::Hash => None,
    }
}

/// The install's masking key (HMAC-SHA256 for the `hash` strategy), generated once.
pub struct Masker {
    key: [u8; 32],
}

impl Masker {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// Reads `<state_dir>/mask.key`, creating it (0600) on first use. Hashes are stable for
    /// the life of the install, so joins on hashed values keep working across sessions.
    pub fn load_or_create(state_dir: &Path) -> std::io::Result<Self> {
        let path = state_dir.join("mask.key");
        match fs::read(&path) {
            Ok(k) if k.len() == 32 => {
                let mut key = [0u8; 32];
                key.copy_from_slice(&k);
                return Ok(Self { key });
            }
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a 32-byte key",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(state_dir)?;
        let key: [u8; 32] = rand::random();
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut f, &key)?;
        Ok(Self { key })
    }

    fn hmac_hex(&self, value: &[u8]) -> String {
        crate::digest::hex(&crate::digest::hmac_sha256(&self.key, &[value])[..16])
    }

    /// The replacement text for `value` (`None` = SQL NULL).
    pub fn replace(&self, strategy: &Strategy, label: &str, value: &str) -> Option<String> {
        match strategy {
            Strategy::Redact { .. } | Strategy::Null => fixed_text(strategy, label).flatten(),
            Strategy::Partial { keep } => {
                let n = value.chars().count();
                let keep = (*keep).min(n);
                Some(
                    value
                        .chars()
                        .enumerate()
                        .map(|(i, c)| if i + keep >= n { c } else { '*' })
                        .collect(),
                )
            }
            Strategy::Hash => Some(format!("hmac:{}", self.hmac_hex(value.as_bytes()))),
        }
    }

    /// A whole value masked, encoded for its type and format. `None` = NULL.
    pub fn whole(
        &self,
        strategy: &Strategy,
        label: &str,
        class: TypeClass,
        binary: bool,
        value: &[u8],
    ) -> Option<Vec<u8>> {
        let text = match (class, binary) {
            (TypeClass::Jsonb, true) => value.get(1..).unwrap_or_default(),
            _ => value,
        };
        let text = String::from_utf8_lossy(text);
        encode_whole(self.replace(strategy, label, &text)?, class, binary)
    }

    /// Applies detectors inside a value (`types`: the database's own types, for what
    /// records and arrays hold). `Ok(None)`: nothing found, keep the value;
    /// `Ok(Some(None))`: mask to NULL; `Ok(Some(Some(bytes)))`: the new value.
    pub fn detect(
        &self,
        detection: &Detection,
        types: &Types,
        class: TypeClass,
        binary: bool,
        value: &[u8],
    ) -> Option<Option<Vec<u8>>> {
        let (prefix, text): (&[u8], &[u8]) = match (class, binary) {
            (TypeClass::Opaque, _) => return None,
            (TypeClass::Jsonb, true) => (
                value.get(..1).unwrap_or_default(),
                value.get(1..).unwrap_or_default(),
            ),
            // An element's or a field's finding masks the whole value (to NULL): one of
            // another length cannot be spliced in without rewriting it.
            (
                TypeClass::Array(_)
                | TypeClass::Record
                | TypeClass::Bytes
                | TypeClass::Inet
                | TypeClass::Other,
                true,
            ) => {
                return hides(detection, types, class, value, 0).then_some(None);
            }
            // `bytea_output = hex`: the bytes are read; the escape format is read as
            // text (a finding spliced in could break an escape: NULL).
            (TypeClass::Bytes, false) => {
                let bytes = match value.strip_prefix(b"\\x") {
                    Some(digits) => unhex(digits),
                    None => Some(value.to_vec()),
                };
                return bytes
                    .is_none_or(|b| hides(detection, types, class, &b, 0))
                    .then_some(None);
            }
            _ => (&[], value),
        };
        // Invalid UTF-8 cannot be searched reliably: mask it.
        let Ok(s) = std::str::from_utf8(text) else {
            return Some(None);
        };
        let found = findings(detection, s);
        if found.is_empty() {
            return None;
        }
        // A label spliced would not be one of the enum's, an address spliced no address.
        if matches!(class, TypeClass::Label | TypeClass::Inet) {
            return Some(None);
        }
        Some(self.splice(detection, s, &found, class).map(|body| {
            let mut out = Vec::with_capacity(prefix.len() + body.len());
            out.extend_from_slice(prefix);
            out.extend_from_slice(body.as_bytes());
            out
        }))
    }

    /// Replaces each finding inside `s`. With `null`, the whole value goes.
    fn splice(
        &self,
        detection: &Detection,
        s: &str,
        found: &[Found],
        class: TypeClass,
    ) -> Option<String> {
        let mut out = String::with_capacity(s.len());
        let mut at = 0;
        for f in found {
            out.push_str(&s[at..f.range.start]);
            let strategy = detection.strategy(f.detector)?;
            let r = self.replace(strategy, f.detector, &s[f.range.clone()])?;
            // Inside JSON the replacement must not break the document.
            if matches!(class, TypeClass::Json | TypeClass::Jsonb) {
                let quoted = serde_json::to_string(&r).unwrap_or_default();
                out.push_str(&quoted[1..quoted.len() - 1]);
            } else {
                out.push_str(&r);
            }
            at = f.range.end;
        }
        out.push_str(&s[at..]);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Masker {
        Masker::new([7u8; 32])
    }

    #[test]
    fn a_fixed_replacement_is_what_every_value_would_get() {
        let m = m();
        let strategies = [
            Strategy::Redact { text: None },
            Strategy::Redact {
                text: Some("gone \"quoted\"".into()),
            },
            Strategy::Null,
            Strategy::Partial { keep: 2 },
            Strategy::Hash,
        ];
        let classes = [
            TypeClass::Text,
            TypeClass::Json,
            TypeClass::Jsonb,
            TypeClass::Label,
            TypeClass::Opaque,
            TypeClass::Array(25),
            TypeClass::Record,
            TypeClass::Other,
        ];
        let values: [&[u8]; 3] = [b"alice@example.com", b"\x01\"x\"", b"\xff\xfe not utf-8"];
        for s in &strategies {
            for class in classes {
                for binary in [false, true] {
                    match fixed_whole(s, "email", class, binary) {
                        Some(fixed) => {
                            for v in values {
                                assert_eq!(
                                    fixed,
                                    m.whole(s, "email", class, binary, v),
                                    "{s:?} {class:?} binary={binary} {v:?}"
                                );
                            }
                        }
                        None => assert!(
                            matches!(s, Strategy::Partial { .. } | Strategy::Hash),
                            "{s:?} looks at the value"
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn strategies() {
        let m = m();
        assert_eq!(
            m.replace(&Strategy::Redact { text: None }, "email", "a@b.co")
                .as_deref(),
            Some("[REDACTED:email]")
        );
        assert_eq!(
            m.replace(
                &Strategy::Redact {
                    text: Some("***".into())
                },
                "x",
                "secret"
            )
            .as_deref(),
            Some("***")
        );
        assert_eq!(
            m.replace(&Strategy::Partial { keep: 4 }, "x", "4111111111111111")
                .as_deref(),
            Some("************1111")
        );
        assert_eq!(
            m.replace(&Strategy::Partial { keep: 10 }, "x", "abc")
                .as_deref(),
            Some("abc")
        );
        assert_eq!(
            m.replace(&Strategy::Partial { keep: 2 }, "x", "ünï")
                .as_deref(),
            Some("*nï")
        );
        let h1 = m.replace(&Strategy::Hash, "x", "alice@example.com");
        assert_eq!(
            h1,
            m.replace(&Strategy::Hash, "y", "alice@example.com"),
            "stable: joins still work"
        );
        assert_ne!(h1, m.replace(&Strategy::Hash, "x", "bob@example.com"));
        assert_ne!(
            h1,
            Masker::new([8u8; 32]).replace(&Strategy::Hash, "x", "alice@example.com"),
            "keyed"
        );
        assert_eq!(m.replace(&Strategy::Null, "x", "v"), None);
    }

    #[test]
    fn whole_values_keep_their_type_decodable() {
        let m = m();
        let r = Strategy::Redact { text: None };
        assert_eq!(
            m.whole(&r, "column", TypeClass::Text, true, b"x")
                .as_deref(),
            Some(&b"[REDACTED:column]"[..])
        );
        assert_eq!(
            m.whole(&r, "column", TypeClass::Json, false, b"{}")
                .as_deref(),
            Some(&b"\"[REDACTED:column]\""[..])
        );
        let jb = m
            .whole(&r, "column", TypeClass::Jsonb, true, b"\x01{}")
            .expect("jsonb");
        assert_eq!(jb[0], 1, "jsonb version byte");
        assert_eq!(&jb[1..], b"\"[REDACTED:column]\"");
        assert_eq!(
            m.whole(&r, "column", TypeClass::Opaque, false, b"42"),
            None,
            "numbers become NULL"
        );
        assert_eq!(m.whole(&r, "column", TypeClass::Other, false, b"{a}"), None);
    }

    /// `array_send`'s layout: ndim, flags, element OID, (size, lower bound) per dimension,
    /// then length-prefixed elements.
    fn array_bytes(element_type: u32, dims: &[i32], elements: &[Option<&[u8]>]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(dims.len() as i32).to_be_bytes());
        v.extend_from_slice(&i32::from(elements.iter().any(Option::is_none)).to_be_bytes());
        v.extend_from_slice(&element_type.to_be_bytes());
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
            v.extend_from_slice(&1i32.to_be_bytes());
        }
        for e in elements {
            put_value(&mut v, *e);
        }
        v
    }

    /// A length-prefixed value (-1: NULL).
    fn put_value(v: &mut Vec<u8>, e: Option<&[u8]>) {
        match e {
            None => v.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(b) => {
                v.extend_from_slice(&(b.len() as i32).to_be_bytes());
                v.extend_from_slice(b);
            }
        }
    }

    /// The e-mail detector, redacting.
    fn emails() -> Detection {
        Detection {
            detectors: vec![("email".into(), Strategy::Redact { text: None })],
        }
    }

    #[test]
    fn binary_arrays_are_read_element_by_element() {
        let m = m();
        let d = emails();
        let detect = |oid: u32, v: &[u8]| m.detect(&d, &Types::default(), type_class(oid), true, v);
        // text[] without findings passes, with one is masked whole; oid[] has nothing to
        // find; an empty array passes.
        let clean = array_bytes(25, &[2], &[Some(b"a"), None]);
        assert_eq!(detect(1009, &clean), None);
        let found = array_bytes(25, &[2], &[Some(b"a"), Some(b"x@example.com")]);
        assert_eq!(detect(1009, &found), Some(None));
        let oids = array_bytes(26, &[2, 1], &[Some(&[0, 0, 0, 23]), Some(&[0, 0, 0, 25])]);
        assert_eq!(detect(1028, &oids), None);
        assert_eq!(detect(1009, &array_bytes(25, &[], &[])), None);
        // The bytes must say what the column's type says: an int4[] that claims text
        // elements, or a record that happens to parse as an int4[] (a bytea field crafted
        // to), is not read.
        let int4s = array_bytes(23, &[1], &[Some(&[0, 0, 0, 7])]);
        assert_eq!(detect(1007, &int4s), None);
        assert_eq!(detect(1009, &int4s), Some(None));
        assert_eq!(detect(2249, &int4s), Some(None));
        // Malformed: counts larger than the bytes, trailing bytes, truncation.
        assert_eq!(
            detect(1009, &array_bytes(25, &[1_000_000], &[Some(b"a")])),
            Some(None)
        );
        let mut long = array_bytes(25, &[1], &[Some(b"a")]);
        long.push(0);
        assert_eq!(detect(1009, &long), Some(None));
        assert_eq!(detect(1009, &clean[..clean.len() - 1]), Some(None));
        assert_eq!(detect(1009, &[0, 0]), Some(None));
        // Ranges of numbers and dates hold no text.
        assert_eq!(detect(3904, &[2, 0, 0, 0, 4, 0, 0, 0, 1]), None);
    }

    /// `record_send`'s layout: field count, then per field its type's OID and a
    /// length-prefixed value.
    fn record_bytes(fields: &[(u32, Option<&[u8]>)]) -> Vec<u8> {
        let mut v = (fields.len() as i32).to_be_bytes().to_vec();
        for (oid, f) in fields {
            v.extend_from_slice(&oid.to_be_bytes());
            put_value(&mut v, *f);
        }
        v
    }

    #[test]
    fn bytea_is_read_as_text_in_both_formats() {
        let m = m();
        let d = emails();
        let t = Types::default();
        let detect = |binary: bool, v: &[u8]| m.detect(&d, &t, type_class(17), binary, v);
        // Binary: the bytes themselves, UTF-8 or not.
        assert_eq!(detect(true, b"\x00\x01\xff"), None);
        assert_eq!(detect(true, b"\xff mail bo@example.com \x00"), Some(None));
        // Text: hex digits are decoded; the escape format is text already; hex that is
        // not hex is not read.
        assert_eq!(detect(false, b"\\x0001ff"), None);
        let hex: String = b"bo@example.com"
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(detect(false, format!("\\x{hex}").as_bytes()), Some(None));
        assert_eq!(
            detect(false, format!("\\x{}", hex.to_uppercase()).as_bytes()),
            Some(None)
        );
        assert_eq!(detect(false, b"\\x0g"), Some(None));
        assert_eq!(detect(false, b"\\x012"), Some(None));
        assert_eq!(detect(false, b"\\001bo@example.com"), Some(None));
        assert_eq!(detect(false, b"\\001 nothing"), None);
        // Arrays of bytea, element by element.
        let blobs = array_bytes(17, &[1], &[Some(b"\x00bo@example.com")]);
        assert_eq!(m.detect(&d, &t, type_class(1001), true, &blobs), Some(None));
    }

    #[test]
    fn addresses_are_read_as_text_and_masked_whole() {
        let m = m();
        let d = Detection {
            detectors: vec![("ip_address".into(), Strategy::Redact { text: None })],
        };
        let t = Types::default();
        let detect =
            |oid: u32, binary: bool, v: &[u8]| m.detect(&d, &t, type_class(oid), binary, v);
        assert_eq!(detect(869, true, &[2, 32, 0, 4, 10, 1, 2, 3]), Some(None));
        assert_eq!(
            detect(
                650,
                true,
                &[
                    3, 128, 1, 16, 0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
                ]
            ),
            Some(None)
        );
        assert_eq!(
            detect(869, true, &[2, 32, 0, 4, 10, 1]),
            Some(None),
            "truncated"
        );
        assert_eq!(
            detect(869, false, b"10.1.2.3/24"),
            Some(None),
            "not spliced"
        );
        // Without the address detector there is nothing to find in one.
        let email = emails();
        assert_eq!(
            m.detect(
                &email,
                &t,
                type_class(869),
                true,
                &[2, 32, 0, 4, 10, 1, 2, 3]
            ),
            None
        );
        // PostgreSQL's OID-like and geometric types, and arrays of them, hold no text.
        for oid in [2205, 2206, 24, 27, 600, 829, 1560, 5069] {
            assert_eq!(detect(oid, true, &[0, 0, 0, 1]), None, "{oid}");
        }
        let regclasses = array_bytes(2205, &[1], &[Some(&[0, 0, 4, 0])]);
        assert_eq!(detect(2210, true, &regclasses), None);
        let regtypes = array_bytes(2206, &[1], &[Some(&[0, 0, 0, 25])]);
        assert_eq!(detect(2211, true, &regtypes), None);
        let points = array_bytes(600, &[1], &[Some(&[0; 16])]);
        assert_eq!(detect(1017, true, &points), None);
    }

    #[test]
    fn binary_records_and_enums_are_read_by_their_types() {
        use crate::masking::types::TypeDef;
        let m = m();
        let d = emails();
        let mut types = Types::default();
        let learn = |types: &mut Types, oid, kind, element| {
            types.learn(&TypeDef {
                oid,
                kind,
                element,
                base: 0,
                send: (element != 0).then(|| "array_send".into()),
                fields: Vec::new(),
            });
        };
        learn(&mut types, 16400, b'e', 0);
        learn(&mut types, 16401, b'b', 16400);
        learn(&mut types, 16410, b'c', 0);
        learn(&mut types, 16411, b'b', 16410);
        let detect = |oid: u32, v: &[u8]| m.detect(&d, &types, types.class(oid), true, v);
        // An enum is its label: kept, or NULL when a detector finds something in it.
        assert_eq!(detect(16400, b"happy"), None);
        assert_eq!(detect(16400, b"x@example.com"), Some(None));
        // A record, field by field, each by the type its bytes name (an anonymous ROW()
        // is `record`, 2249), nested records and arrays of enums included.
        let clean = record_bytes(&[(23, Some(&[0, 0, 0, 1])), (25, Some(b"x")), (16400, None)]);
        assert_eq!(detect(16410, &clean), None);
        assert_eq!(detect(2249, &clean), None);
        let inner = record_bytes(&[(25, Some(b"a@example.com"))]);
        let nested = record_bytes(&[(23, Some(&[0, 0, 0, 1])), (2249, Some(&inner))]);
        assert_eq!(detect(16410, &nested), Some(None));
        let moods = array_bytes(16400, &[2], &[Some(b"happy"), Some(b"sad")]);
        assert_eq!(detect(16401, &moods), None);
        let moods = array_bytes(16400, &[1], &[Some(b"a@example.com")]);
        assert_eq!(detect(16401, &moods), Some(None));
        let pairs = array_bytes(16410, &[1], &[Some(&clean)]);
        assert_eq!(detect(16411, &pairs), None);
        assert_eq!(
            detect(2287, &array_bytes(2249, &[1], &[Some(&nested)])),
            Some(None)
        );
        // A field of a type not known, a malformed record: not read.
        let unknown = record_bytes(&[(16999, Some(b"x"))]);
        assert_eq!(detect(16410, &unknown), Some(None));
        assert_eq!(detect(16410, &clean[..clean.len() - 1]), Some(None));
        assert_eq!(
            detect(16410, &[0, 0, 1, 0]),
            Some(None),
            "more fields than bytes"
        );
        // Too deep: masked rather than followed.
        let mut deep = record_bytes(&[(25, Some(b"x"))]);
        for _ in 0..MAX_NESTING {
            deep = record_bytes(&[(2249, Some(&deep))]);
        }
        assert_eq!(detect(2249, &deep), Some(None));
        // Not known at all: not read.
        assert_eq!(detect(16500, b"happy"), Some(None));
        // In text format, an enum's finding is NULL too (a spliced label is no label).
        assert_eq!(
            m.detect(&d, &types, TypeClass::Label, false, b"x@example.com"),
            Some(None)
        );
    }

    #[test]
    fn detection_inside_values() {
        let m = m();
        let r = Strategy::Redact { text: None };
        let d = Detection {
            detectors: vec![
                ("email".into(), r.clone()),
                ("us_ssn".into(), Strategy::Null),
            ],
        };
        let none = Types::default();
        let detect = |class, binary, v: &[u8]| m.detect(&d, &none, class, binary, v);
        assert_eq!(detect(TypeClass::Text, false, b"nothing here"), None);
        let out = detect(TypeClass::Text, false, b"mail alice@example.com now");
        assert_eq!(out, Some(Some(b"mail [REDACTED:email] now".to_vec())));
        // jsonb binary: version byte kept, document still valid JSON.
        let out = detect(
            TypeClass::Jsonb,
            true,
            b"\x01{\"e\": \"alice@example.com\"}",
        );
        let v = out.expect("found").expect("not null");
        assert_eq!(v[0], 1);
        let doc: serde_json::Value = serde_json::from_slice(&v[1..]).expect("valid JSON");
        assert_eq!(doc["e"], "[REDACTED:email]");
        // Unreadable binary of an unknown type is not passed unread.
        assert_eq!(detect(TypeClass::Other, true, b"\x00\x01"), Some(None));
        assert_eq!(detect(TypeClass::Opaque, true, b"\x00\x01"), None);
        // Arrays in text format: the literal stays valid.
        let out = detect(TypeClass::Other, false, b"{alice@example.com,bob}");
        assert_eq!(out, Some(Some(b"{[REDACTED:email],bob}".to_vec())));
        // Only the wanted detectors; `null` takes the whole value.
        assert_eq!(
            detect(TypeClass::Text, false, b"key AKIAIOSFODNN7EXAMPLE"),
            None
        );
        assert_eq!(
            detect(TypeClass::Text, false, b"ssn 536-22-1234"),
            Some(None)
        );
    }
}
