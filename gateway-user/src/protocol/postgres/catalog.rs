//! Catalog lookups for masking.
//!
//! Masking rules name columns (`public.users.email`); results name them by table OID and
//! attribute number, statements by names that may be views. The catalog answers both:
//! relation names and columns by OID or by name, and what each view column is computed
//! from (its `pg_get_viewdef`, traced with the same lineage analysis as statements). It
//! also says what the database's own types in results are ([`types_sql`],
//! [`crate::masking::types`]), which binary values cannot tell.
//!
//! Two ways to ask it ([`Backend`]):
//! - **its own connection**, with the target's `credentials` (the inject credentials, or
//!   ones given for the catalog alone in passthrough mode) and the client's database (OIDs
//!   are per database): one per (server address, database, target), shared by every
//!   session, queries one at a time;
//! - **the session's own connection**, for a target without `credentials`: the session
//!   engine asks before it forwards a statement that needs it, between the client's
//!   requests ([`super::inband`]); this catalog is the session's alone, and sees what the
//!   session itself changed in its open transaction. Answers are only read from the cache
//!   here ([`Catalog::lookup`] does no I/O for it).
//!
//! Answers are cached as an immutable snapshot replaced on change; the cache is emptied
//! after DDL through the gate (at the statement, and again when its transaction ends) and
//! after [`TTL`] for changes made elsewhere. A relation the catalog does not show
//! (dropped, or created in a transaction it cannot see) cannot be verified, and masking
//! treats it as undecidable.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt as _;

use super::{
    PgError, PgShared,
    codec::Startup,
    messages::{self, be},
    session::{Reader, connect_server, inject_auth},
    stream::Stream,
};
use crate::{
    config::{Credentials, PgTarget},
    masking::{
        plan::{Resolve, qualified},
        types::{TypeDef, Types, learnable},
    },
    policy::sql::{
        LexOptions, TableName, classify,
        lineage::{ColumnRef, Deps, Item, Shape},
    },
    proxy::upstream::Upstream,
};

/// How long an answer is trusted when no DDL was seen through the gate.
pub const TTL: Duration = Duration::from_secs(30);
/// Longest a catalog round trip may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Views over views are followed this deep.
pub const MAX_ROUNDS: usize = 16;
/// Largest catalog answer accepted (one message).
const MAX_MESSAGE: usize = 16 << 20;
/// Most of the database's own types a session's catalog remembers having seen in results
/// (to be asked about); a result of more types than that has the rest masked as unknown.
const MAX_SEEN_TYPES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CatalogKey {
    pub addr: SocketAddr,
    pub database: String,
    pub target: String,
}

/// Every catalog of a daemon.
#[derive(Default)]
pub struct Catalogs {
    map: Mutex<HashMap<CatalogKey, Arc<Catalog>>>,
}

impl Catalogs {
    /// The catalog for a session: the shared one on a connection of its own when the
    /// target holds credentials, else one of the session's own, asked on its connection.
    pub fn get(&self, key: CatalogKey, pg: &PgTarget, upstream: &Upstream) -> Arc<Catalog> {
        let Some(creds) = pg.credentials.clone() else {
            return Arc::new(Catalog::new(key, Backend::Session));
        };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let c = map.entry(key.clone()).or_insert_with(|| {
            Arc::new(Catalog::new(
                key,
                Backend::Own {
                    pg: Box::new(pg.clone()),
                    creds,
                    upstream: Upstream {
                        addr: upstream.addr,
                        mark: upstream.mark,
                        timeout: upstream.timeout,
                        target: None,
                    },
                    conn: tokio::sync::Mutex::new(None),
                },
            ))
        });
        c.clone()
    }
}

/// Where a catalog's questions go. (One per catalog, not per message: the size of the
/// connection's variant does not matter.)
#[allow(clippy::large_enum_variant)]
enum Backend {
    /// A connection of Portcullis's own, with the target's credentials.
    Own {
        pg: Box<PgTarget>,
        creds: Credentials,
        upstream: Upstream,
        conn: tokio::sync::Mutex<Option<Reader<Stream>>>,
    },
    /// The session's own connection, between its client's requests (the session engine
    /// asks; see [`super::inband`]).
    Session,
}

/// A relation as the catalog shows it.
#[derive(Debug)]
pub struct Rel {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `pg_class.relkind`.
    pub kind: u8,
    /// Rows written into it may be stored on another server: a foreign table, or a table
    /// with a foreign table among its partitions or inheritance children (at any depth).
    pub foreign: bool,
    /// (attnum, name), in order.
    pub columns: Vec<(i16, String)>,
    /// For views: what each column is computed from.
    pub view: Option<ViewDeps>,
}

#[derive(Debug)]
pub enum ViewDeps {
    /// Per column, in order.
    Columns(Vec<Deps>),
    /// Could not be lined up: every column depends on all of it.
    All(Deps),
}

/// An immutable snapshot of what is known.
#[derive(Debug)]
pub struct Data {
    at: Instant,
    rels: HashMap<u32, Arc<Rel>>,
    names: HashMap<String, Vec<u32>>,
    missing_oids: HashSet<u32>,
    missing_names: HashSet<String>,
    /// The database's own types asked about.
    types: Arc<Types>,
}

impl Data {
    fn new() -> Self {
        Self {
            at: Instant::now(),
            rels: HashMap::new(),
            names: HashMap::new(),
            missing_oids: HashSet::new(),
            missing_names: HashSet::new(),
            types: Arc::default(),
        }
    }

    fn knows_oid(&self, oid: u32) -> bool {
        self.rels.contains_key(&oid) || self.missing_oids.contains(&oid)
    }

    fn knows_name(&self, n: &str) -> bool {
        self.names.contains_key(n) || self.missing_names.contains(n)
    }

    fn candidates(&self, t: &TableName) -> Vec<&Arc<Rel>> {
        self.names
            .get(&t.name)
            .into_iter()
            .flatten()
            .filter_map(|o| self.rels.get(o))
            .filter(|r| t.schema.as_deref().is_none_or(|s| s == r.schema))
            .collect()
    }

    fn expand_rel(&self, rel: &Rel, column: Option<&str>, depth: usize) -> Option<Vec<ColumnRef>> {
        let mut out = vec![qualified(&rel.schema, &rel.name, column)];
        let Some(view) = &rel.view else {
            return Some(out);
        };
        if depth > MAX_ROUNDS {
            return None;
        }
        let deps: Vec<&Deps> = match (view, column) {
            (ViewDeps::All(d), _) => vec![d],
            (ViewDeps::Columns(cols), Some(c)) => {
                let pos = rel.columns.iter().position(|(_, n)| n == c)?;
                vec![cols.get(pos)?]
            }
            (ViewDeps::Columns(cols), None) => cols.iter().collect(),
        };
        for d in deps {
            if d.opaque {
                return None;
            }
            for r in &d.columns {
                out.extend(self.expand_at(r, depth + 1)?);
            }
        }
        Some(out)
    }

    /// Whether writes into `rel` may store rows elsewhere: it is foreign itself, or a view
    /// reads (and so, when updatable, writes) a relation that is. `None`: a view's
    /// definition could not be followed.
    fn rel_stores_elsewhere(&self, rel: &Rel) -> Option<bool> {
        if rel.foreign {
            return Some(true);
        }
        if rel.view.is_none() {
            return Some(false);
        }
        for r in self.expand_rel(rel, None, 0)? {
            for under in self.candidates(&r.table) {
                if under.foreign {
                    return Some(true);
                }
            }
        }
        Some(false)
    }

    fn expand_at(&self, r: &ColumnRef, depth: usize) -> Option<Vec<ColumnRef>> {
        let c = self.candidates(&r.table);
        if c.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for rel in c {
            out.extend(self.expand_rel(rel, r.column.as_deref(), depth)?);
        }
        Some(out)
    }
}

impl Resolve for Data {
    fn origin(&self, oid: u32, attnum: i16) -> Option<Vec<ColumnRef>> {
        let rel = self.rels.get(&oid)?;
        let (_, name) = rel.columns.iter().find(|(a, _)| *a == attnum)?;
        self.expand_rel(rel, Some(name), 0)
    }

    fn expand(&self, r: &ColumnRef) -> Option<Vec<ColumnRef>> {
        self.expand_at(r, 0)
    }

    fn columns(&self, t: &TableName) -> Option<Vec<String>> {
        match self.candidates(t).as_slice() {
            [one] => Some(one.columns.iter().map(|(_, n)| n.clone()).collect()),
            _ => None,
        }
    }

    fn stores_elsewhere(&self, t: &TableName) -> Option<bool> {
        if !self.knows_name(&t.name) {
            return None;
        }
        let mut away = false;
        for rel in self.candidates(t) {
            away |= self.rel_stores_elsewhere(rel)?;
        }
        Some(away)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog connection: {0}")]
    Pg(#[from] PgError),
    #[error("catalog query failed: {0}")]
    Query(String),
    #[error("catalog lookup timed out after {0:?}")]
    Timeout(Duration),
    #[error("views nested deeper than {MAX_ROUNDS} levels")]
    TooDeep,
}

pub struct Catalog {
    key: CatalogKey,
    backend: Backend,
    data: Mutex<Arc<Data>>,
    /// A session's catalog: the database's own types its results have named, to be
    /// asked about before the next statement whose results are masked.
    seen_types: Mutex<HashSet<u32>>,
    /// Changes whenever what is known changes (plans made before are stale).
    generation: std::sync::atomic::AtomicU64,
}

impl Catalog {
    fn new(key: CatalogKey, backend: Backend) -> Self {
        Self {
            key,
            backend,
            data: Mutex::new(Arc::new(Data::new())),
            seen_types: Mutex::new(HashSet::new()),
            generation: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Asked on the session's own connection: it sees what the session changed in its
    /// open transaction, and only the session engine can ask it (between requests).
    pub fn in_session(&self) -> bool {
        matches!(self.backend, Backend::Session)
    }

    /// Which of `names` the cache knows nothing about (neither a relation nor its
    /// absence), sorted and without repeats.
    pub fn unknown_names(&self, names: &[String]) -> Vec<String> {
        let data = self.snapshot();
        let mut want: Vec<String> = names
            .iter()
            .filter(|n| !data.knows_name(n))
            .cloned()
            .collect();
        want.sort();
        want.dedup();
        want
    }

    /// Takes in the rows of a [`lookup_sql`] query that asked about `names`: caches what
    /// they show (and that the rest do not exist), and returns the names the views among
    /// them read that the cache does not know yet (the next round).
    pub fn absorb(&self, rows: Vec<Row>, names: &[String]) -> Vec<String> {
        let (rels, next) = rels_from_rows(rows);
        self.merge(rels, &[], names);
        self.unknown_names(&next)
    }

    /// A result's description passed on a session's own connection: the database's own
    /// types it names are remembered, to be asked about ([`Catalog::unlearned_types`])
    /// before a statement whose results are masked is forwarded: a binary driver describes
    /// a statement before it binds it with the result formats it wants.
    pub fn saw_types(&self, types: impl IntoIterator<Item = u32>) {
        let mut new = types.into_iter().filter(|t| learnable(*t)).peekable();
        if new.peek().is_none() {
            return;
        }
        let mut seen = self.seen_types.lock().unwrap_or_else(|e| e.into_inner());
        for t in new {
            if seen.len() >= MAX_SEEN_TYPES {
                break;
            }
            seen.insert(t);
        }
    }

    /// The types seen in results ([`Catalog::saw_types`]) that the cache knows nothing
    /// about, sorted.
    pub fn unlearned_types(&self) -> Vec<u32> {
        let seen = self.seen_types.lock().unwrap_or_else(|e| e.into_inner());
        if seen.is_empty() {
            return Vec::new();
        }
        let types = self.snapshot().types.clone();
        let mut want: Vec<u32> = seen.iter().copied().filter(|t| !types.knows(*t)).collect();
        want.sort_unstable();
        want
    }

    /// Takes in the rows of a [`types_sql`] query that asked about `asked`: caches what
    /// they show (and that the rest do not exist), and returns the types those are made of
    /// that are still unknown (the next round).
    pub fn absorb_types(&self, rows: Vec<Row>, asked: &[u32]) -> Vec<u32> {
        let defs = types_from_rows(rows);
        let mut next = Vec::new();
        self.update(|d| {
            let mut types = (*d.types).clone();
            for def in &defs {
                next.extend(types.learn(def));
            }
            for t in asked {
                types.missing(*t);
            }
            next.retain(|t| !types.knows(*t));
            d.types = Arc::new(types);
        });
        next.sort_unstable();
        next.dedup();
        next
    }

    /// What is known about the database's own types, as cached: without asking, and
    /// without expiring what a session's results were planned with.
    pub fn cached_types(&self) -> Arc<Types> {
        self.data
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .types
            .clone()
    }

    /// What the database's own types among `oids` are, asked on the catalog's own
    /// connection where not cached; a session's catalog answers from its cache only (it
    /// was asked before the statement was forwarded, [`Catalog::unlearned_types`]).
    pub async fn learn_types(
        &self,
        shared: &PgShared,
        oids: &[u32],
    ) -> Result<Arc<Types>, CatalogError> {
        if self.in_session() {
            return Ok(self.cached_types());
        }
        let mut want: Vec<u32> = oids.iter().copied().filter(|t| learnable(*t)).collect();
        for _ in 0..MAX_ROUNDS {
            let types = self.snapshot().types.clone();
            want.retain(|t| !types.knows(*t));
            want.sort_unstable();
            want.dedup();
            if want.is_empty() {
                return Ok(types);
            }
            let rows = self.ask(shared, &types_sql(&want)).await?;
            want = self.absorb_types(rows, &want);
        }
        Err(CatalogError::TooDeep)
    }

    /// Forgets everything (after DDL).
    pub fn invalidate(&self) {
        *self.data.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(Data::new());
        self.bump();
    }

    /// Read before a lookup: a plan made from its answer is valid while this is unchanged.
    pub fn generation(&self) -> u64 {
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        // A session's catalog expires only where it can be asked again (before a
        // statement is forwarded, [`Catalog::unknown_names`]), never under a result that
        // was planned with it.
        if d.at.elapsed() > TTL && !self.in_session() {
            // Expired: whatever was planned from it is stale too.
            drop(d);
            self.invalidate();
        }
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// What is known now, without asking the server.
    pub fn cached(&self) -> Arc<Data> {
        self.snapshot()
    }

    fn snapshot(&self) -> Arc<Data> {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        if d.at.elapsed() > TTL {
            *d = Arc::new(Data::new());
            self.bump();
        }
        d.clone()
    }

    /// What is known about these OIDs and names (and, through views, what they read),
    /// looked up where not cached.
    pub async fn lookup(
        &self,
        shared: &PgShared,
        oids: &[u32],
        names: &[String],
    ) -> Result<Arc<Data>, CatalogError> {
        if self.in_session() {
            // Asked before the statement was forwarded, if at all: what is cached is all
            // there is (what it lacks is undecidable). Not expired here: the statement
            // was let go on this answer, however long it has run since.
            return Ok(self.data.lock().unwrap_or_else(|e| e.into_inner()).clone());
        }
        let mut want_oids: Vec<u32> = oids.to_vec();
        let mut want_names: Vec<String> = names.to_vec();
        for _ in 0..MAX_ROUNDS {
            let data = self.snapshot();
            want_oids.retain(|o| !data.knows_oid(*o));
            want_names.retain(|n| !data.knows_name(n));
            want_oids.sort_unstable();
            want_oids.dedup();
            want_names.sort();
            want_names.dedup();
            if want_oids.is_empty() && want_names.is_empty() {
                return Ok(data);
            }
            let rows = self
                .ask(shared, &lookup_sql(&want_oids, &want_names))
                .await?;
            let (rels, next) = rels_from_rows(rows);
            self.merge(rels, &want_oids, &want_names);
            want_oids.clear();
            want_names = next;
        }
        Err(CatalogError::TooDeep)
    }

    fn merge(&self, rels: Vec<Rel>, oids: &[u32], names: &[String]) {
        self.update(|d| {
            for r in rels {
                let ids = d.names.entry(r.name.clone()).or_default();
                if !ids.contains(&r.oid) {
                    ids.push(r.oid);
                }
                d.rels.insert(r.oid, Arc::new(r));
            }
            for o in oids {
                if !d.rels.contains_key(o) {
                    d.missing_oids.insert(*o);
                }
            }
            for n in names {
                if !d.names.contains_key(n) {
                    d.missing_names.insert(n.clone());
                }
            }
        });
    }

    /// Replaces the snapshot with a changed copy.
    fn update(&self, change: impl FnOnce(&mut Data)) {
        let mut guard = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let old = &**guard;
        let mut d = Data {
            at: old.at,
            rels: old.rels.clone(),
            names: old.names.clone(),
            missing_oids: old.missing_oids.clone(),
            missing_names: old.missing_names.clone(),
            types: old.types.clone(),
        };
        change(&mut d);
        *guard = Arc::new(d);
        self.bump();
    }

    /// One query on the catalog's own connection, within [`TIMEOUT`]; a failure is logged
    /// and drops the connection (whatever state it is in, start over next time).
    async fn ask(&self, shared: &PgShared, sql: &str) -> Result<Vec<Row>, CatalogError> {
        let Backend::Own { conn, .. } = &self.backend else {
            unreachable!("a session's catalog is asked by its session");
        };
        let asked = tokio::time::timeout(TIMEOUT, async {
            let mut conn = conn.lock().await;
            if conn.is_none() {
                *conn = Some(self.connect(shared).await?);
            }
            let c = conn.as_mut().unwrap_or_else(|| unreachable!());
            query(c, sql).await
        })
        .await
        .map_err(|_| CatalogError::Timeout(TIMEOUT))
        .and_then(|r| r);
        if let Err(e) = &asked {
            tracing::warn!(
                catalog.target = %self.key.target,
                db = %self.key.database,
                error = %e,
                "catalog lookup failed"
            );
            *conn.lock().await = None;
        }
        asked
    }

    async fn connect(&self, shared: &PgShared) -> Result<Reader<Stream>, CatalogError> {
        let Backend::Own {
            pg,
            creds,
            upstream,
            ..
        } = &self.backend
        else {
            unreachable!("a session's catalog has no connection of its own");
        };
        let s = connect_server(shared, &self.key.target, pg, upstream).await?;
        let mut r = Reader::new(s, BytesMut::with_capacity(8192), MAX_MESSAGE, false);
        let startup = Startup::Startup {
            version: super::codec::PROTOCOL_3_0,
            params: vec![
                ("user".into(), creds.user.clone()),
                ("database".into(), self.key.database.clone()),
                ("application_name".into(), "portcullis-catalog".into()),
            ],
        };
        r.r.write_all(&startup.encode())
            .await
            .map_err(PgError::ServerIo)?;
        inject_auth(&mut r, creds).await?;
        loop {
            let f = r.frame().await?;
            match f.tag {
                be::READY_FOR_QUERY => break,
                be::ERROR_RESPONSE => return Err(CatalogError::Query(error_message(&f.body))),
                _ => {}
            }
        }
        tracing::info!(catalog.target = %self.key.target, db = %self.key.database, "catalog connection ready");
        Ok(r)
    }
}

/// The query that asks about relations by OID and by name: one row per column (a row with
/// no column for a relation without any), in OID and column order.
///
/// It may run on a client's own session, whose search path the client sets: every
/// relation, function and operator in it is named with its schema (`pg_catalog`), so
/// nothing the session has created can stand in for them.
pub fn lookup_sql(oids: &[u32], names: &[String]) -> String {
    let mut filter = Vec::new();
    if !oids.is_empty() {
        let list: Vec<String> = oids.iter().map(u32::to_string).collect();
        filter.push(format!(
            "c.oid OPERATOR(pg_catalog.=) ANY ('{{{}}}'::pg_catalog.oid[])",
            list.join(",")
        ));
    }
    if !names.is_empty() {
        filter.push(format!(
            "c.relname OPERATOR(pg_catalog.=) ANY ({}::pg_catalog.name[])",
            literal(&array_literal(names))
        ));
    }
    if filter.is_empty() {
        filter.push("false".into());
    }
    // `elsewhere`: the relation is a foreign table or has one among its descendants
    // (partitions, inheritance children), which an INSERT or UPDATE of it may write.
    // Computed once per relation, in the inner query (`OFFSET 0` keeps the planner from
    // merging it into the join, where it would run once per column).
    format!(
        "SELECT c.oid, n.nspname, c.relname, c.relkind, a.attnum, a.attname, \
         CASE WHEN c.relkind OPERATOR(pg_catalog.=) ANY ('{{v,m}}'::pg_catalog.\"char\"[]) \
              AND a.attnum OPERATOR(pg_catalog.=) 1 \
              THEN pg_catalog.pg_get_viewdef(c.oid) END, \
         c.elsewhere \
         FROM (SELECT c.oid, c.relnamespace, c.relname, c.relkind, \
               c.relkind OPERATOR(pg_catalog.=) 'f' \
               OR (c.relkind OPERATOR(pg_catalog.=) ANY ('{{r,p}}'::pg_catalog.\"char\"[]) \
                   AND c.relhassubclass AND EXISTS ( \
                 WITH RECURSIVE d(oid) AS ( \
                   SELECT i.inhrelid FROM pg_catalog.pg_inherits i \
                   WHERE i.inhparent OPERATOR(pg_catalog.=) c.oid \
                   UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i \
                         JOIN d ON i.inhparent OPERATOR(pg_catalog.=) d.oid) \
                 SELECT FROM d JOIN pg_catalog.pg_class k ON k.oid OPERATOR(pg_catalog.=) d.oid \
                 WHERE k.relkind OPERATOR(pg_catalog.=) 'f')) AS elsewhere \
               FROM pg_catalog.pg_class c WHERE {} OFFSET 0) c \
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
         LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid \
              AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped \
         ORDER BY c.oid, a.attnum",
        filter.join(" OR ")
    )
}

/// The query that asks what the database's own types `oids` are
/// ([`crate::masking::types`]): one row per type with its kind, array element, domain
/// base, send function (by its C name, when it is one of PostgreSQL's own) and a
/// composite's attribute types. Every relation and operator named with its schema, as in
/// [`lookup_sql`].
pub fn types_sql(oids: &[u32]) -> String {
    let list: Vec<String> = oids.iter().map(u32::to_string).collect();
    format!(
        "SELECT t.oid, t.typtype, t.typelem, t.typbasetype, \
         CASE WHEN p.prolang OPERATOR(pg_catalog.=) 12::pg_catalog.oid THEN p.prosrc END, \
         (SELECT pg_catalog.array_agg(a.atttypid ORDER BY a.attnum) \
          FROM pg_catalog.pg_attribute a \
          WHERE a.attrelid OPERATOR(pg_catalog.=) t.typrelid \
            AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped) \
         FROM pg_catalog.pg_type t \
         LEFT JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) t.typsend \
         WHERE t.oid OPERATOR(pg_catalog.=) ANY ('{{{}}}'::pg_catalog.oid[])",
        list.join(",")
    )
}

/// The types in the rows of a [`types_sql`] query.
pub fn types_from_rows(rows: Vec<Row>) -> Vec<TypeDef> {
    let oid = |s: Option<&String>| s.and_then(|s| s.parse::<u32>().ok());
    rows.iter()
        .filter_map(|row| {
            let get = |i: usize| row.get(i).and_then(Option::as_ref);
            Some(TypeDef {
                oid: oid(get(0))?,
                kind: get(1)?.bytes().next()?,
                element: oid(get(2)).unwrap_or(0),
                base: oid(get(3)).unwrap_or(0),
                send: get(4).cloned(),
                // `{23,25}`: a field whose type cannot be read stays unknown (masked).
                fields: get(5).map_or_else(Vec::new, |a| {
                    a.trim_matches(|c| c == '{' || c == '}')
                        .split(',')
                        .map(|t| t.parse::<u32>().unwrap_or(0))
                        .collect()
                }),
            })
        })
        .collect()
}

/// The relations in the rows of a [`lookup_sql`] query, and the names their view
/// definitions read.
pub fn rels_from_rows(rows: Vec<Row>) -> (Vec<Rel>, Vec<String>) {
    let mut rels: Vec<Rel> = Vec::new();
    let mut defs: HashMap<u32, String> = HashMap::new();
    for row in rows {
        let get = |i: usize| row.get(i).cloned().flatten();
        let Some(oid) = get(0).and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if rels.last().is_none_or(|r| r.oid != oid) {
            rels.push(Rel {
                oid,
                schema: get(1).unwrap_or_default(),
                name: get(2).unwrap_or_default(),
                kind: get(3).and_then(|k| k.bytes().next()).unwrap_or(b'r'),
                // Not `f` (false) only when the server says so.
                foreign: get(7).as_deref() != Some("f"),
                columns: Vec::new(),
                view: None,
            });
        }
        let rel = rels.last_mut().unwrap_or_else(|| unreachable!());
        if let (Some(att), Some(name)) = (get(4).and_then(|a| a.parse::<i16>().ok()), get(5)) {
            rel.columns.push((att, name));
        }
        if let Some(def) = get(6) {
            defs.insert(oid, def);
        }
    }
    let mut next = Vec::new();
    for rel in &mut rels {
        if !matches!(rel.kind, b'v' | b'm') {
            continue;
        }
        let deps = defs.get(&rel.oid).map(|d| view_deps(d, rel.columns.len()));
        let deps = deps.unwrap_or_else(|| {
            ViewDeps::All(Deps {
                columns: Default::default(),
                opaque: true,
            })
        });
        let all: Vec<&Deps> = match &deps {
            ViewDeps::All(d) => vec![d],
            ViewDeps::Columns(c) => c.iter().collect(),
        };
        for d in all {
            next.extend(d.columns.iter().map(|r| r.table.name.clone()));
        }
        rel.view = Some(deps);
    }
    (rels, next)
}

/// What each column of a view is computed from, from its definition.
fn view_deps(def: &str, width: usize) -> ViewDeps {
    let c = classify(def, LexOptions::default());
    let items = match c.statements.first().map(|s| &s.shape) {
        Some(Shape::Rows(items)) if c.error.is_none() => items,
        _ => {
            return ViewDeps::All(Deps {
                columns: Default::default(),
                opaque: true,
            });
        }
    };
    if items.len() == width && items.iter().all(|i| matches!(i, Item::Column { .. })) {
        return ViewDeps::Columns(
            items
                .iter()
                .map(|i| match i {
                    Item::Column { deps, .. } => deps.clone(),
                    Item::Star(_) => unreachable!("checked"),
                })
                .collect(),
        );
    }
    let mut all = Deps::default();
    for i in items {
        i.all_deps(&mut all);
    }
    ViewDeps::All(all)
}

/// `{"a","b"}`: a PostgreSQL array literal of names.
fn array_literal(names: &[String]) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

/// An escape-string literal, whatever `standard_conforming_strings` is.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

pub fn error_message(body: &[u8]) -> String {
    messages::error_fields(body)
        .ok()
        .and_then(|fs| fs.into_iter().find(|(c, _)| *c == b'M').map(|(_, m)| m))
        .unwrap_or_else(|| "unknown error".into())
}

/// A row of a catalog query, as text.
pub type Row = Vec<Option<String>>;

/// A simple query; its rows as text.
async fn query(c: &mut Reader<Stream>, sql: &str) -> Result<Vec<Row>, CatalogError> {
    c.r.write_all(&messages::query(sql).to_bytes())
        .await
        .map_err(PgError::ServerIo)?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let f = c.frame().await?;
        match f.tag {
            be::DATA_ROW => {
                let vals = messages::data_row(&f.body).map_err(PgError::ServerProtocol)?;
                rows.push(
                    vals.into_iter()
                        .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect(),
                );
            }
            be::ERROR_RESPONSE => error = Some(error_message(&f.body)),
            be::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(CatalogError::Query(e)),
        None => Ok(rows),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masking::value::TypeClass;

    #[test]
    fn literals_cannot_break_out() {
        let names = vec!["users".to_owned(), "we\"ird'\\name".to_owned()];
        let a = array_literal(&names);
        assert_eq!(a, r#"{"users","we\"ird'\\name"}"#);
        assert_eq!(literal(&a), r#"E'{"users","we\\"ird\'\\\\name"}'"#);
    }

    /// Every operator in `sql` is `pg_catalog`'s by name, and each of `names` (relations,
    /// functions, array types) appears only with its schema.
    fn assert_qualified(sql: &str, names: &[&str]) {
        let bare = sql
            .replace("OPERATOR(pg_catalog.=)", "")
            .replace("OPERATOR(pg_catalog.>)", "");
        assert!(!bare.contains(['=', '<', '>', '~', '!']), "{bare}");
        for name in names {
            let all = sql.matches(name).count();
            let qualified = sql.matches(&format!("pg_catalog.{name}")).count();
            assert!(all > 0 && all == qualified, "{name}: {sql}");
        }
    }

    #[test]
    fn the_lookup_names_every_relation_function_and_operator_with_its_schema() {
        let sql = lookup_sql(&[16384, 16390], &["users".into(), "o'dd".into()]);
        assert_qualified(
            &sql,
            &[
                "pg_class ",
                "pg_namespace ",
                "pg_attribute ",
                "pg_inherits ",
                "pg_get_viewdef(",
                "oid[]",
                "name[]",
            ],
        );
        assert!(lookup_sql(&[], &[]).contains("WHERE false"));
    }

    #[test]
    fn the_types_lookup_names_everything_with_its_schema() {
        let sql = types_sql(&[16384, 16390]);
        assert_qualified(
            &sql,
            &[
                "pg_type ",
                "pg_proc ",
                "pg_attribute ",
                "array_agg(",
                "oid[]",
            ],
        );
        assert!(sql.contains("'{16384,16390}'"), "{sql}");
    }

    #[test]
    fn a_catalog_learns_types_in_rounds_and_remembers_what_it_saw() {
        let c = Catalog::new(
            CatalogKey {
                addr: "127.0.0.1:5432".parse().expect("in test"),
                database: "db".into(),
                target: "t".into(),
            },
            Backend::Session,
        );
        let row =
            |cols: &[Option<&str>]| -> Row { cols.iter().map(|c| c.map(String::from)).collect() };
        // Results named PostgreSQL's own types (not remembered) and the database's own.
        c.saw_types([25, 23, 16500, 16400]);
        assert_eq!(c.unlearned_types(), vec![16400, 16500]);
        // A composite whose second field is a domain, and an enum; 16500 is gone.
        let next = c.absorb_types(
            vec![
                row(&[
                    Some("16400"),
                    Some("c"),
                    Some("0"),
                    Some("0"),
                    None,
                    Some("{23,16410}"),
                ]),
                row(&[
                    Some("16420"),
                    Some("e"),
                    Some("0"),
                    Some("0"),
                    Some("enum_send"),
                    None,
                ]),
            ],
            &[16400, 16500],
        );
        assert_eq!(next, vec![16410]);
        assert_eq!(c.unlearned_types(), Vec::<u32>::new());
        let next = c.absorb_types(
            vec![row(&[
                Some("16410"),
                Some("d"),
                Some("0"),
                Some("16420"),
                None,
                None,
            ])],
            &next,
        );
        assert!(next.is_empty());
        let types = c.cached_types();
        assert_eq!(types.class(16400), TypeClass::Record);
        assert_eq!(types.class(16410), TypeClass::Label);
        assert_eq!(types.class(16500), TypeClass::Other);
        // Forgotten after DDL, asked again: the session still has them in its results.
        c.invalidate();
        assert_eq!(c.unlearned_types(), vec![16400, 16500]);
        // Malformed rows are skipped, not trusted.
        assert!(types_from_rows(vec![row(&[Some("x"), Some("e")]), row(&[Some("1")])]).is_empty());
    }

    #[test]
    fn a_sessions_catalog_takes_in_rows_and_asks_next_for_what_views_read() {
        let c = Catalog::new(
            CatalogKey {
                addr: "127.0.0.1:5432".parse().expect("addr"),
                database: "shop".into(),
                target: "pg".into(),
            },
            Backend::Session,
        );
        assert!(c.in_session());
        let row = |v: &[Option<&str>]| -> Row { v.iter().map(|x| x.map(str::to_owned)).collect() };
        let asked: Vec<String> = vec!["contacts".into(), "gone".into()];
        assert_eq!(c.unknown_names(&asked), asked);
        let view = vec![row(&[
            Some("20000"),
            Some("public"),
            Some("contacts"),
            Some("v"),
            Some("1"),
            Some("contact"),
            Some(" SELECT users.email AS contact\n   FROM users;"),
            Some("f"),
        ])];
        // The view reads users, not asked about yet; `gone` is known not to exist.
        assert_eq!(c.absorb(view, &asked), vec!["users".to_owned()]);
        assert!(c.unknown_names(&asked).is_empty());
        let table = vec![
            row(&[
                Some("16390"),
                Some("public"),
                Some("users"),
                Some("r"),
                Some("1"),
                Some("id"),
                None,
                Some("f"),
            ]),
            row(&[
                Some("16390"),
                Some("public"),
                Some("users"),
                Some("r"),
                Some("2"),
                Some("email"),
                None,
                Some("f"),
            ]),
        ];
        assert!(c.absorb(table, &["users".into()]).is_empty());
        let data = c.cached();
        let origin = data.origin(20000, 1).expect("traced");
        assert!(
            origin
                .iter()
                .any(|r| r.table.name == "users" && r.column.as_deref() == Some("email")),
            "{origin:?}"
        );
        assert_eq!(data.origin(16390, 1).expect("known").len(), 1);
        assert!(data.origin(99999, 1).is_none(), "never asked: undecidable");
    }

    #[test]
    fn view_definitions_are_traced() {
        let v = view_deps(
            " SELECT users.name,\n    users.email AS contact\n   FROM users;",
            2,
        );
        match v {
            ViewDeps::Columns(c) => {
                assert_eq!(c.len(), 2);
                assert!(
                    c[1].columns
                        .iter()
                        .any(|r| r.column.as_deref() == Some("email"))
                );
            }
            ViewDeps::All(_) => panic!("should line up"),
        }
        assert!(matches!(view_deps("not sql at all (", 1), ViewDeps::All(d) if d.opaque));
    }
}
