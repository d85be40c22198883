//! The hash chain over audit records: each record's hash covers its own content and the
//! previous record's hash, so changing, removing, inserting or reordering a record breaks
//! every hash from there on, and [`verify`] names the first record that does not fit.
//!
//! What a chain cannot show by itself is the loss of its newest records (the rest still
//! fits). The daemon knows the head it wrote last; `portcullis audit verify` compares with
//! it, and the head is logged when the daemon stops (see docs/audit.md).
//!
//! Pure: no I/O.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The hash before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// SHA-256 over the previous hash and the record's fields, each length-prefixed so no two
/// different records can encode alike.
pub fn record_hash(
    prev: &[u8; 32],
    seq: i64,
    at_us: i64,
    session: i64,
    kind: &str,
    body: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"portcullis-record-v1");
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(at_us.to_be_bytes());
    h.update(session.to_be_bytes());
    h.update((kind.len() as u64).to_be_bytes());
    h.update(kind.as_bytes());
    h.update((body.len() as u64).to_be_bytes());
    h.update(body.as_bytes());
    h.finalize().into()
}

/// A record as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub seq: i64,
    pub at_us: i64,
    pub session: i64,
    pub kind: String,
    pub body: String,
    pub hash: Vec<u8>,
}

/// Where verification starts: the first record's sequence number and the hash before it
/// (after pruning, the hash of the last pruned record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    pub seq: i64,
    pub prev: [u8; 32],
}

impl Default for Start {
    fn default() -> Self {
        Self {
            seq: 1,
            prev: GENESIS,
        }
    }
}

/// What a clean chain holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub records: u64,
    pub first_seq: i64,
    /// Last record's sequence number and hash (hex); `None` for an empty chain.
    pub head_seq: Option<i64>,
    pub head_hash: Option<String>,
}

/// The first record that does not fit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Break {
    #[error(
        "record {expected} is missing or out of order (found {found} in its place): records \
         were deleted, inserted or reordered"
    )]
    Sequence { expected: i64, found: i64 },
    #[error(
        "record {seq} does not match its hash: it was changed, or a record before it was \
         replaced"
    )]
    Hash { seq: i64 },
}

pub use crate::digest::hex;

/// Checks rows in sequence order.
pub fn verify(start: Start, rows: impl IntoIterator<Item = Row>) -> Result<Verified, Break> {
    let mut prev = start.prev;
    let mut n = 0u64;
    let mut head = None;
    for (expected, r) in (start.seq..).zip(rows) {
        if r.seq != expected {
            return Err(Break::Sequence {
                expected,
                found: r.seq,
            });
        }
        let h = record_hash(&prev, r.seq, r.at_us, r.session, &r.kind, &r.body);
        if r.hash.as_slice() != h {
            return Err(Break::Hash { seq: r.seq });
        }
        prev = h;
        n += 1;
        head = Some(r.seq);
    }
    Ok(Verified {
        records: n,
        first_seq: start.seq,
        head_seq: head,
        head_hash: head.map(|_| hex(&prev)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<Row> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let body = format!("{{\"n\":{seq}}}");
                let hash = record_hash(&prev, seq, seq * 10, 7, "statement", &body);
                prev = hash;
                Row {
                    seq,
                    at_us: seq * 10,
                    session: 7,
                    kind: "statement".into(),
                    body,
                    hash: hash.to_vec(),
                }
            })
            .collect()
    }

    #[test]
    fn a_clean_chain_verifies() {
        let v = verify(Start::default(), chain(5)).expect("clean");
        assert_eq!((v.records, v.head_seq), (5, Some(5)));
        assert_eq!(
            verify(Start::default(), Vec::new()).expect("empty").records,
            0
        );
    }

    #[test]
    fn every_kind_of_tampering_is_found_at_the_first_bad_record() {
        let mut c = chain(6);
        c[2].body = "{\"n\":999}".into();
        assert_eq!(verify(Start::default(), c), Err(Break::Hash { seq: 3 }));

        let mut c = chain(6);
        c.remove(3);
        assert_eq!(
            verify(Start::default(), c),
            Err(Break::Sequence {
                expected: 4,
                found: 5
            })
        );

        // Inserted with the next number and everything after renumbered: the hashes differ.
        let mut c = chain(6);
        let mut fake = c[2].clone();
        fake.body = "{\"fake\":1}".into();
        c.insert(3, fake);
        for (i, r) in c.iter_mut().enumerate() {
            r.seq = i as i64 + 1;
        }
        assert_eq!(verify(Start::default(), c), Err(Break::Hash { seq: 4 }));

        // Two records swap places (their numbers swapped to keep the order).
        let mut c = chain(6);
        c.swap(1, 2);
        c[1].seq = 2;
        c[2].seq = 3;
        assert_eq!(verify(Start::default(), c), Err(Break::Hash { seq: 2 }));

        // Re-hashing one record is not enough: the next one no longer fits.
        let mut c = chain(6);
        c[2].session = 8;
        let prev: [u8; 32] = c[1].hash.clone().try_into().expect("32");
        c[2].hash = record_hash(&prev, 3, c[2].at_us, 8, &c[2].kind, &c[2].body).to_vec();
        assert_eq!(verify(Start::default(), c), Err(Break::Hash { seq: 4 }));
    }

    #[test]
    fn a_pruned_chain_verifies_from_its_anchor() {
        let c = chain(6);
        let prev: [u8; 32] = c[2].hash.clone().try_into().expect("32");
        let rest: Vec<Row> = c[3..].to_vec();
        let v = verify(Start { seq: 4, prev }, rest.clone()).expect("from the anchor");
        assert_eq!(v.records, 3);
        assert!(
            verify(Start::default(), rest).is_err(),
            "not from the start"
        );
    }
}
