//! The database's own types (enums, composites, domains, arrays of them, extension types
//! such as `citext`), as far as the detectors need to know them: what a value of the type
//! is in binary format.
//!
//! PostgreSQL's own types keep their OIDs in every database ([`type_class`]); a type made
//! by `CREATE TYPE`, `CREATE DOMAIN` or an extension gets an OID of
//! [`FIRST_USER_OID`] or above, different in every database, and what its binary values
//! are can only be learned from the catalog: `pg_type.typtype` (enum, composite, domain,
//! base) and, for a base type, its send function. A binary driver (asyncpg, tokio-postgres,
//! sqlx) receives an enum as its label's text, a composite as `record_send`'s fields, each
//! with its own type's OID, and an array of either as `array_send`'s elements. The engine
//! asks about the types it sees in a result's description ([`learnable`]); this module
//! keeps the answers and classifies each type, pure.
//!
//! A type the catalog was not asked about, or did not show, stays [`TypeClass::Other`]:
//! its binary values are masked to NULL under detectors, as before it was known.

use std::collections::HashMap;

use super::value::{TypeClass, type_class};

/// `FirstNormalObjectId`: every OID below it is PostgreSQL's own, the same in every
/// database; every type created afterwards has one at or above it.
pub const FIRST_USER_OID: u32 = 16384;

/// Domains over domains are followed this deep (PostgreSQL allows any depth; nobody
/// nests them further).
const MAX_DOMAINS: usize = 8;

/// Send functions (`pg_proc.prosrc` of a built-in, `internal`, function) whose binary
/// output is the value's UTF-8 text, as `text`'s: extension types such as `citext` use
/// them.
const TEXT_SENDS: &[&str] = &["textsend", "varcharsend", "bpcharsend", "namesend"];

/// Send functions whose binary output holds no text (numbers, dates, booleans, UUIDs).
const OPAQUE_SENDS: &[&str] = &[
    "boolsend",
    "int2send",
    "int4send",
    "int8send",
    "float4send",
    "float8send",
    "numeric_send",
    "cash_send",
    "oidsend",
    "date_send",
    "time_send",
    "timetz_send",
    "timestamp_send",
    "timestamptz_send",
    "interval_send",
    "uuid_send",
    "pg_lsn_send",
];

/// A type as the catalog shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeDef {
    pub oid: u32,
    /// `pg_type.typtype`: `b` base, `c` composite, `d` domain, `e` enum, `p` pseudo,
    /// `r` range, `m` multirange.
    pub kind: u8,
    /// `typelem`: an array type's element type.
    pub element: u32,
    /// `typbasetype`: a domain's underlying type.
    pub base: u32,
    /// The C name of the type's send function when it is one of PostgreSQL's own
    /// (`internal` language); `None` for any other (an extension's C function).
    pub send: Option<String>,
    /// A composite's attribute types, in order.
    pub fields: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Class(TypeClass),
    /// Values are the underlying type's.
    Domain(u32),
}

/// What is known about the database's own types.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Types {
    map: HashMap<u32, Entry>,
}

/// Whether the catalog must be asked what `oid`'s values are (it is not one of
/// PostgreSQL's own types).
pub fn learnable(oid: u32) -> bool {
    oid >= FIRST_USER_OID
}

impl Types {
    /// How values of `oid` are handled: PostgreSQL's own types by their OID, the
    /// database's own as learned ([`TypeClass::Other`] when not).
    pub fn class(&self, oid: u32) -> TypeClass {
        let mut oid = oid;
        for _ in 0..=MAX_DOMAINS {
            if !learnable(oid) {
                return type_class(oid);
            }
            match self.map.get(&oid) {
                Some(Entry::Class(c)) => return *c,
                Some(Entry::Domain(base)) => oid = *base,
                None => return TypeClass::Other,
            }
        }
        TypeClass::Other
    }

    /// Whether the catalog has answered about `oid` (or it needs no answer).
    pub fn knows(&self, oid: u32) -> bool {
        !learnable(oid) || self.map.contains_key(&oid)
    }

    /// Takes in one type the catalog showed; returns the types its values are made of
    /// (elements, fields, a domain's base) that are still to be learned.
    pub fn learn(&mut self, def: &TypeDef) -> Vec<u32> {
        let (entry, parts): (Entry, Vec<u32>) = match def.kind {
            b'e' => (Entry::Class(TypeClass::Label), Vec::new()),
            b'c' => (Entry::Class(TypeClass::Record), def.fields.clone()),
            b'd' => (Entry::Domain(def.base), vec![def.base]),
            b'b' => match def.send.as_deref() {
                Some("array_send") if def.element != 0 => (
                    Entry::Class(TypeClass::Array(def.element)),
                    vec![def.element],
                ),
                Some(s) if TEXT_SENDS.contains(&s) => (Entry::Class(TypeClass::Text), Vec::new()),
                Some("json_send") => (Entry::Class(TypeClass::Json), Vec::new()),
                Some("byteasend") => (Entry::Class(TypeClass::Bytes), Vec::new()),
                Some("jsonb_send") => (Entry::Class(TypeClass::Jsonb), Vec::new()),
                Some(s) if OPAQUE_SENDS.contains(&s) => {
                    (Entry::Class(TypeClass::Opaque), Vec::new())
                }
                _ => (Entry::Class(TypeClass::Other), Vec::new()),
            },
            // Ranges of the database's own types, pseudo-types: not read.
            _ => (Entry::Class(TypeClass::Other), Vec::new()),
        };
        self.map.insert(def.oid, entry);
        let mut next: Vec<u32> = parts.into_iter().filter(|o| !self.knows(*o)).collect();
        next.sort_unstable();
        next.dedup();
        next
    }

    /// The catalog was asked about `oid` and does not show it (dropped meanwhile): its
    /// values are not read.
    pub fn missing(&mut self, oid: u32) {
        self.map
            .entry(oid)
            .or_insert(Entry::Class(TypeClass::Other));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(oid: u32, kind: u8) -> TypeDef {
        TypeDef {
            oid,
            kind,
            element: 0,
            base: 0,
            send: None,
            fields: Vec::new(),
        }
    }

    #[test]
    fn the_catalogs_answers_classify_the_databases_own_types() {
        let mut t = Types::default();
        assert_eq!(t.class(16400), TypeClass::Other, "not known yet");
        assert!(!t.knows(16400));
        assert!(t.knows(25), "PostgreSQL's own types need no answer");
        assert_eq!(t.class(25), TypeClass::Text);

        // An enum's binary value is its label.
        assert_eq!(t.learn(&def(16400, b'e')), Vec::<u32>::new());
        assert_eq!(t.class(16400), TypeClass::Label);
        // A composite names the types of its fields, the unknown ones to be learned next.
        let mut pair = def(16410, b'c');
        pair.fields = vec![23, 16400, 16420, 16420];
        assert_eq!(t.learn(&pair), vec![16420]);
        assert_eq!(t.class(16410), TypeClass::Record);
        // A domain is its base type, however deep.
        let mut email = def(16420, b'd');
        email.base = 16430;
        assert_eq!(t.learn(&email), vec![16430]);
        assert_eq!(
            t.class(16420),
            TypeClass::Other,
            "its base is not known yet"
        );
        let mut citext = def(16430, b'b');
        citext.send = Some("textsend".into());
        assert_eq!(t.learn(&citext), Vec::<u32>::new());
        assert_eq!(t.class(16420), TypeClass::Text);
        let mut over_int = def(16440, b'd');
        over_int.base = 23;
        assert_eq!(t.learn(&over_int), Vec::<u32>::new());
        assert_eq!(t.class(16440), TypeClass::Opaque);
        // Arrays of the database's own types, by their element.
        let mut moods = def(16450, b'b');
        moods.send = Some("array_send".into());
        moods.element = 16400;
        assert_eq!(t.learn(&moods), Vec::<u32>::new());
        assert_eq!(t.class(16450), TypeClass::Array(16400));
        // An extension's own send function, a range: not read.
        let mut hstore = def(16460, b'b');
        hstore.send = Some("hstore_send".into());
        t.learn(&hstore);
        assert_eq!(t.class(16460), TypeClass::Other);
        assert_eq!(t.learn(&def(16470, b'r')), Vec::<u32>::new());
        assert_eq!(t.class(16470), TypeClass::Other);
        // Asked about and not shown: known, not read.
        t.missing(16480);
        assert!(t.knows(16480));
        assert_eq!(t.class(16480), TypeClass::Other);
    }

    #[test]
    fn a_cycle_of_domains_is_not_followed_forever() {
        let mut t = Types::default();
        let mut a = def(16400, b'd');
        a.base = 16401;
        let mut b = def(16401, b'd');
        b.base = 16400;
        t.learn(&a);
        t.learn(&b);
        assert_eq!(t.class(16400), TypeClass::Other);
    }
}
