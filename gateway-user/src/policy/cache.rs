//! Decision cache: a repeated statement from the same kind of caller costs one hash lookup.
//!
//! Key: the statement text, the lexical options, and the caller's class (everything rules
//! can look at: agent, identity attributes, target, protocol), all hashed with a randomly
//! seeded hasher (statements come from untrusted agents). Entries hold the text, so a hash
//! collision can never return another statement's decision. The whole cache belongs to one
//! policy generation and is emptied when policies change. Bounded: when full it is cleared
//! (statements an agent repeats come back at once; a flood of unique ones cannot grow it).
//! A statement is admitted on its second sight: text with inlined literals is usually seen
//! once, and caching it would only churn the cache (a set of hashes remembers first sights).

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, Hasher},
    sync::{Arc, Mutex},
};

use super::{model::Decision, sql::Classification};

/// Longest statement worth caching; longer ones are classified every time.
pub const MAX_CACHED_LEN: usize = 8 * 1024;

/// A classified, decided message.
#[derive(Debug)]
pub struct Judgement {
    pub classification: Classification,
    pub decision: Decision,
    /// The names of the statement kinds, in order: what records and decision events
    /// show, worked out once per judgement (cached judgements share it).
    pub kind_names: Vec<String>,
}

/// The caller's class, computed once per session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClassKey(pub u64);

pub struct DecisionCache {
    hasher: foldhash::quality::RandomState,
    capacity: usize,
    inner: Mutex<Inner>,
}

/// Entries sharing a hash: the text is kept to tell them apart.
type Bucket = Vec<(ClassKey, Box<str>, Arc<Judgement>)>;

struct Inner {
    generation: u64,
    entries: usize,
    map: HashMap<u64, Bucket, NoHash>,
    /// Hashes of statements seen once since the last clear.
    seen: std::collections::HashSet<u64, NoHash>,
}

/// Keys are already hashes.
#[derive(Clone, Default)]
struct NoHash;

impl BuildHasher for NoHash {
    type Hasher = PassThrough;
    fn build_hasher(&self) -> PassThrough {
        PassThrough(0)
    }
}

struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl DecisionCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            hasher: foldhash::quality::RandomState::default(),
            capacity,
            inner: Mutex::new(Inner {
                generation: 0,
                entries: 0,
                map: HashMap::with_hasher(NoHash),
                seen: std::collections::HashSet::with_hasher(NoHash),
            }),
        }
    }

    /// Hashes anything that identifies a caller class.
    pub fn class_key(&self, parts: impl Hash) -> ClassKey {
        ClassKey(self.hasher.hash_one(parts))
    }

    fn key(&self, class: ClassKey, sql: &str) -> u64 {
        self.hasher.hash_one((class, sql))
    }

    pub fn get(&self, generation: u64, class: ClassKey, sql: &str) -> Option<Arc<Judgement>> {
        if self.capacity == 0 || sql.len() > MAX_CACHED_LEN {
            return None;
        }
        let h = self.key(class, sql);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.generation != generation {
            return None;
        }
        inner
            .map
            .get(&h)?
            .iter()
            .find(|(c, s, _)| *c == class && &**s == sql)
            .map(|(_, _, j)| j.clone())
    }

    pub fn put(&self, generation: u64, class: ClassKey, sql: &str, j: Arc<Judgement>) {
        if self.capacity == 0 || sql.len() > MAX_CACHED_LEN {
            return;
        }
        let h = self.key(class, sql);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.generation != generation || inner.entries >= self.capacity {
            inner.map.clear();
            inner.seen.clear();
            inner.entries = 0;
            inner.generation = generation;
        }
        if inner.seen.insert(h) {
            if inner.seen.len() > 4 * self.capacity {
                inner.seen.clear();
            }
            return;
        }
        let bucket = inner.map.entry(h).or_default();
        if !bucket.iter().any(|(c, s, _)| *c == class && &**s == sql) {
            bucket.push((class, sql.into(), j));
            inner.entries += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).entries
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
