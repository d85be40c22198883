//! Writing: records appended in groups, one transaction per group, the chain head, and the
//! listing tables derived from the records.
//!
//! Group commit: whoever commits (a waiting session through [`lead`] in `commit` mode, else
//! the writer thread) takes every request already waiting (up to [`MAX_GROUP`]) and
//! commits them together, then answers every caller of the group. A failed group (disk
//! full, read-only file, I/O error) is rolled back as a whole and every caller gets the
//! error; the head stays at the last committed record, so the chain never has holes.
//!
//! Durability: `commit` runs SQLite with `synchronous = NORMAL` (a commit is in the WAL and
//! survives the daemon dying; the WAL is fsynced at checkpoints, which the thread forces at
//! least every [`SYNC_EVERY`] while there are new records); `strict` with
//! `synchronous = FULL` (every commit is fsynced before its callers are answered).

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::Ordering,
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use rusqlite::{Connection, params};
use serde_json::Value;
use tokio::sync::oneshot;

use super::{Append, Head, StoreError, StoreStats, chain};
use crate::config::Durability;

/// Most records committed in one transaction.
pub const MAX_GROUP: usize = 1024;
/// Longest a committed record waits for its fsync in `commit` mode.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Longest a record appended without waiting (transcripts, session ends) stays in memory
/// when nothing else is committed: such records ride along with the next commit instead of
/// costing one of their own, and their appends never wake the writer.
pub const LAZY_EVERY: Duration = Duration::from_millis(10);
/// Records appended without waiting that make the writer commit at once.
pub const LAZY_WAKE: usize = 512;

pub enum Op {
    Append(
        Vec<Append>,
        Option<oneshot::Sender<Result<i64, StoreError>>>,
    ),
    Prune(i64, oneshot::Sender<Result<u64, StoreError>>),
    Stop,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    at_us INTEGER NOT NULL,
    session INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_session ON records(session, seq);
CREATE TABLE IF NOT EXISTS anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    prev_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    started_us INTEGER NOT NULL,
    ended_us INTEGER,
    agent TEXT NOT NULL,
    target TEXT NOT NULL,
    protocol TEXT NOT NULL,
    uid INTEGER,
    user TEXT,
    pid INTEGER,
    exe TEXT,
    unit TEXT,
    end_reason TEXT,
    statements INTEGER NOT NULL DEFAULT 0,
    allowed INTEGER NOT NULL DEFAULT 0,
    masked INTEGER NOT NULL DEFAULT 0,
    denied INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    oidc_sub TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_start ON sessions(started_us);
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    session INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    agent TEXT NOT NULL,
    target TEXT NOT NULL,
    uid INTEGER NOT NULL,
    rule TEXT NOT NULL,
    statement TEXT NOT NULL,
    state TEXT NOT NULL,
    decided_us INTEGER,
    decided_by TEXT,
    reason TEXT,
    grant_id TEXT
);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    agent TEXT NOT NULL,
    target TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0
);
";

/// Columns added after a store may have been created: added when missing. The listing
/// tables are derived from the records; the chain never depends on them.
fn migrate(c: &Connection) -> rusqlite::Result<()> {
    let has_sub: bool = c
        .prepare("SELECT 1 FROM pragma_table_info('sessions') WHERE name = 'oidc_sub'")?
        .exists([])?;
    if !has_sub {
        c.execute_batch("ALTER TABLE sessions ADD COLUMN oidc_sub TEXT")?;
    }
    Ok(())
}

pub fn open_rw(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Commit => "NORMAL",
            Durability::Strict => "FULL",
        },
    )?;
    // Checkpoints are the writer's to run (see SYNC_EVERY).
    c.pragma_update(None, "wal_autocheckpoint", 0)?;
    c.execute_batch(SCHEMA)?;
    migrate(&c)?;
    Ok(c)
}

/// The last record, or the anchor of a pruned, empty chain.
pub fn read_head(c: &Connection) -> rusqlite::Result<Head> {
    let last: Option<(i64, Vec<u8>)> = c
        .query_row(
            "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok();
    if let Some((seq, hash)) = last {
        return Ok(Head {
            seq,
            hash: hash.try_into().unwrap_or([0; 32]),
        });
    }
    let anchor: Option<(i64, Vec<u8>)> = c
        .query_row("SELECT seq, prev_hash FROM anchor WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .ok();
    Ok(match anchor {
        Some((seq, prev)) => Head {
            seq: seq - 1,
            hash: prev.try_into().unwrap_or([0; 32]),
        },
        None => Head::default(),
    })
}

/// The write connection and what goes with it. Shared: the writer thread uses it for
/// transcripts, checkpoints, pruning and `strict` commits; a session waiting for its
/// statement's record in `commit` mode commits through it itself ([`lead`]), saving two
/// thread hand-offs per statement.
pub struct Core {
    conn: Connection,
    lazy: Arc<Mutex<Vec<Append>>>,
    head: Arc<Mutex<Head>>,
    stats: Arc<StoreStats>,
    unsynced: bool,
    last_sync: Instant,
}

/// Requests waiting for a leader: records and who waits for them.
pub type Pending = Mutex<Vec<(Vec<Append>, Waiter)>>;

pub struct Writer {
    core: Arc<Mutex<Core>>,
    pending: Arc<Pending>,
    rx: Receiver<Op>,
}

pub type Waiter = oneshot::Sender<Result<i64, StoreError>>;

impl Core {
    pub fn new(
        conn: Connection,
        lazy: Arc<Mutex<Vec<Append>>>,
        head: Arc<Mutex<Head>>,
        stats: Arc<StoreStats>,
    ) -> Self {
        Self {
            conn,
            lazy,
            head,
            stats,
            unsynced: false,
            last_sync: Instant::now(),
        }
    }
}

/// Commits every waiting request, as long as nobody else is: whoever holds the core
/// commits what is pending, in groups, and checks again after letting go, so a request
/// pushed meanwhile is never left behind. Blocking for the length of a commit (a `write`
/// into the WAL in `commit` mode; never an fsync, which only the writer thread runs).
pub fn lead(core: &Mutex<Core>, pending: &Pending) {
    loop {
        let mut c = match core.try_lock() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        loop {
            let batch: Vec<(Vec<Append>, Waiter)> = {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                let n = p.len().min(MAX_GROUP);
                p.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            let mut group = c.start_group();
            group.extend(batch.into_iter().map(|(r, a)| (r, Some(a))));
            c.commit_group(group);
        }
        drop(c);
        if pending.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            return;
        }
    }
}

impl Writer {
    pub fn new(core: Arc<Mutex<Core>>, pending: Arc<Pending>, rx: Receiver<Op>) -> Self {
        Self { core, pending, rx }
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn run(self) {
        self.core().expire_pending_approvals();
        loop {
            let first = match self.rx.recv_timeout(LAZY_EVERY) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => {
                    {
                        let mut c = self.core();
                        let group = c.start_group();
                        if group.is_empty() {
                            let idle = c.last_sync.elapsed() >= SYNC_EVERY;
                            c.sync_if_due(idle);
                        } else {
                            c.commit_group(group);
                            c.sync_if_due(false);
                        }
                    }
                    // Whatever arrived while the core was busy here.
                    lead(&self.core, &self.pending);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut c = self.core();
            let mut group = c.start_group();
            let mut n = group.first().map_or(0, |(r, _)| r.len());
            let mut stop = false;
            let mut after: Vec<Op> = Vec::new();
            let mut next = Some(first);
            while let Some(op) = next.take() {
                c.stats.queued.fetch_sub(1, Ordering::Relaxed);
                match op {
                    Op::Append(recs, ack) => {
                        n += recs.len().max(1);
                        group.push((recs, ack));
                    }
                    Op::Stop => stop = true,
                    other @ Op::Prune(..) => after.push(other),
                }
                if n < MAX_GROUP && !stop && after.is_empty() {
                    next = self.rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                c.commit_group(group);
            }
            for op in after {
                if let Op::Prune(before, ack) = op {
                    let _ = ack.send(c.prune(before));
                }
            }
            c.sync_if_due(false);
            drop(c);
            lead(&self.core, &self.pending);
            if stop {
                break;
            }
        }
        // Everything committed is synced before the thread ends.
        let _ = self.core().checkpoint();
    }
}

impl Core {
    /// A new group, starting with the records appended without waiting: they come first,
    /// as they were appended before whatever a waiting caller did next.
    fn start_group(&self) -> Vec<(Vec<Append>, Option<Waiter>)> {
        let lazy = std::mem::take(&mut *self.lazy.lock().unwrap_or_else(|e| e.into_inner()));
        if lazy.is_empty() {
            Vec::new()
        } else {
            vec![(lazy, None)]
        }
    }

    fn sync_if_due(&mut self, idle: bool) {
        if self.unsynced && (idle || self.last_sync.elapsed() >= SYNC_EVERY) {
            match self.checkpoint() {
                Ok(()) => {
                    self.unsynced = false;
                    self.last_sync = Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "audit store checkpoint failed"),
            }
        }
    }

    /// Copies the WAL into the database; with synchronous = NORMAL this fsyncs the WAL
    /// first, which is what makes the commits durable.
    fn checkpoint(&self) -> rusqlite::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
    }

    fn commit_group(&mut self, group: Vec<(Vec<Append>, Option<Waiter>)>) {
        let start = *self.head.lock().unwrap_or_else(|e| e.into_inner());
        let began = Instant::now();
        // With synchronous = FULL (strict) the commit itself syncs the WAL.
        let result = self.write(&group, start);
        crate::metrics::get()
            .audit_commit_seconds
            .observe(began.elapsed().as_secs_f64());
        self.stats
            .last_failed
            .store(result.is_err(), Ordering::Relaxed);
        match result {
            Ok((head, seqs)) => {
                *self.head.lock().unwrap_or_else(|e| e.into_inner()) = head;
                let written: usize = group.iter().map(|(r, _)| r.len()).sum();
                self.stats
                    .written
                    .fetch_add(written as u64, Ordering::Relaxed);
                self.stats.groups.fetch_add(1, Ordering::Relaxed);
                self.unsynced = true;
                for ((_, ack), seq) in group.into_iter().zip(seqs) {
                    if let Some(ack) = ack {
                        let _ = ack.send(Ok(seq));
                    }
                }
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                let written: usize = group.iter().map(|(r, _)| r.len()).sum();
                self.stats
                    .failed
                    .fetch_add(written as u64, Ordering::Relaxed);
                tracing::error!(error = %e, records = written, "audit store write failed");
                let e = StoreError::Write(e.to_string());
                for (_, ack) in group {
                    if let Some(ack) = ack {
                        let _ = ack.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// One transaction for the group; returns the new head and each caller's last seq.
    fn write(
        &self,
        group: &[(Vec<Append>, Option<Waiter>)],
        start: Head,
    ) -> rusqlite::Result<(Head, Vec<i64>)> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let mut head = start;
        let mut seqs = Vec::with_capacity(group.len());
        {
            let mut ins = self.conn.prepare_cached(
                "INSERT INTO records (seq, at_us, session, kind, body, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (recs, _) in group {
                for a in recs {
                    let seq = head.seq + 1;
                    let body = a.body.to_string();
                    let hash =
                        chain::record_hash(&head.hash, seq, a.at_us, a.session, a.kind, &body);
                    ins.execute(params![
                        seq,
                        a.at_us,
                        a.session,
                        a.kind,
                        body,
                        hash.as_slice()
                    ])?;
                    self.index(a)?;
                    head = Head { seq, hash };
                }
                seqs.push(head.seq);
            }
        }
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        Ok((head, seqs))
    }

    /// Keeps the listing tables in step with the records.
    fn index(&self, a: &Append) -> rusqlite::Result<()> {
        let b = &a.body;
        let s = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_owned);
        let i = |k: &str| b.get(k).and_then(Value::as_i64);
        match a.kind {
            "session_start" => {
                self.conn.prepare_cached(
                    "INSERT OR REPLACE INTO sessions (id, started_us, agent, target, protocol, uid, user, pid, exe, unit) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?
                .execute(params![
                    a.session,
                    a.at_us,
                    s("agent").unwrap_or_default(),
                    s("target").unwrap_or_default(),
                    s("protocol").unwrap_or_default(),
                    i("uid"),
                    s("user"),
                    i("pid"),
                    s("exe"),
                    s("unit"),
                ])?;
            }
            "identity" => {
                let sub = b.pointer("/oidc/sub").and_then(Value::as_str);
                self.conn
                    .prepare_cached("UPDATE sessions SET oidc_sub = ?2 WHERE id = ?1")?
                    .execute(params![a.session, sub])?;
            }
            "session_end" => {
                self.conn
                    .prepare_cached(
                        "UPDATE sessions SET ended_us = ?2, end_reason = ?3 WHERE id = ?1",
                    )?
                    .execute(params![a.session, a.at_us, s("end")])?;
            }
            "statement" => {
                let column = match s("verdict").as_deref() {
                    Some("deny") => "denied",
                    Some("mask") => "masked",
                    Some("require_approval") => "held",
                    _ => "allowed",
                };
                self.conn
                    .prepare_cached(&format!(
                        "UPDATE sessions SET statements = statements + 1, {column} = {column} + 1 WHERE id = ?1"
                    ))?
                    .execute(params![a.session])?;
            }
            "approval_requested" => {
                self.conn.prepare_cached(
                    "INSERT OR REPLACE INTO approvals (id, session, created_us, expires_us, agent, target, uid, rule, statement, state) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending')",
                )?
                .execute(params![
                    s("id").unwrap_or_default(),
                    a.session,
                    a.at_us,
                    i("expires_us").unwrap_or_default(),
                    s("agent").unwrap_or_default(),
                    s("target").unwrap_or_default(),
                    i("uid").unwrap_or_default(),
                    s("rule").unwrap_or_default(),
                    s("statement").unwrap_or_default(),
                ])?;
            }
            "approval_decided" => {
                self.conn.prepare_cached(
                    "UPDATE approvals SET state = ?2, decided_us = ?3, decided_by = ?4, reason = ?5, grant_id = ?6 WHERE id = ?1",
                )?
                .execute(params![
                    s("id").unwrap_or_default(),
                    s("outcome").unwrap_or_default(),
                    a.at_us,
                    s("by"),
                    s("reason"),
                    s("grant"),
                ])?;
            }
            "grant_created" => {
                self.conn.prepare_cached(
                    "INSERT OR REPLACE INTO grants (id, rule, agent, target, created_us, expires_us, created_by) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    s("id").unwrap_or_default(),
                    s("rule").unwrap_or_default(),
                    s("agent").unwrap_or_default(),
                    s("target").unwrap_or_default(),
                    a.at_us,
                    i("expires_us").unwrap_or_default(),
                    s("by").unwrap_or_default(),
                ])?;
            }
            "grant_used" => {
                self.conn
                    .prepare_cached("UPDATE grants SET uses = uses + 1 WHERE id = ?1")?
                    .execute(params![s("grant").unwrap_or_default()])?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Requests a previous run left pending can no longer be answered: recorded as expired.
    fn expire_pending_approvals(&mut self) {
        let pending: Vec<(String, i64)> = match self
            .conn
            .prepare("SELECT id, session FROM approvals WHERE state = 'pending'")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            }) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read pending approvals");
                return;
            }
        };
        if pending.is_empty() {
            return;
        }
        let recs: Vec<Append> = pending
            .iter()
            .map(|(id, session)| Append {
                session: *session,
                kind: "approval_decided",
                body: serde_json::json!({
                    "id": id,
                    "outcome": "expired",
                    "reason": "the daemon restarted while the request was pending",
                }),
                at_us: super::now_us(),
            })
            .collect();
        tracing::info!(
            requests = recs.len(),
            "approvals pending at the last stop recorded as expired"
        );
        self.commit_group(vec![(recs, None)]);
    }

    /// Deletes the records before the first one of any session that was still open at
    /// `before_us` (a prefix), sets the anchor, and records the prune in the chain.
    fn prune(&mut self, before_us: i64) -> Result<u64, StoreError> {
        let r = (|| -> rusqlite::Result<Option<(i64, Vec<u8>, u64)>> {
            // The first record that must stay: of a session not ended by `before_us`, or
            // written at or after it.
            let keep_from: Option<i64> = self.conn.query_row(
                "SELECT min(seq) FROM records WHERE at_us >= ?1 OR session IN \
                 (SELECT id FROM sessions WHERE ended_us IS NULL OR ended_us >= ?1)",
                params![before_us],
                |r| r.get(0),
            )?;
            // Nothing needed any more: everything up to the head goes.
            let keep_from = match keep_from {
                Some(k) => k,
                None => {
                    let last: Option<i64> =
                        self.conn
                            .query_row("SELECT max(seq) FROM records", [], |r| r.get(0))?;
                    match last {
                        Some(l) => l + 1,
                        None => return Ok(None),
                    }
                }
            };
            let prev: Option<Vec<u8>> = self
                .conn
                .query_row(
                    "SELECT hash FROM records WHERE seq = ?1",
                    params![keep_from - 1],
                    |r| r.get(0),
                )
                .ok();
            let Some(prev) = prev else {
                return Ok(None);
            };
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            let n = self
                .conn
                .execute("DELETE FROM records WHERE seq < ?1", params![keep_from])?;
            self.conn.execute(
                "INSERT OR REPLACE INTO anchor (id, seq, prev_hash) VALUES (1, ?1, ?2)",
                params![keep_from, prev],
            )?;
            self.conn.execute(
                "DELETE FROM sessions WHERE ended_us IS NOT NULL AND ended_us < ?1 \
                 AND id NOT IN (SELECT DISTINCT session FROM records)",
                params![before_us],
            )?;
            self.conn.execute_batch("COMMIT")?;
            Ok(Some((keep_from, prev, n as u64)))
        })();
        match r {
            Ok(Some((from, prev, n))) => {
                // The prune itself is a record: verify checks the anchor against it.
                self.commit_group(vec![(
                    vec![Append {
                        session: 0,
                        kind: "prune",
                        body: serde_json::json!({
                            "first_seq": from,
                            "anchor_hash": chain::hex(&prev),
                            "records": n,
                            "before_us": before_us,
                        }),
                        at_us: super::now_us(),
                    }],
                    None,
                )]);
                let _ = self.conn.execute_batch("VACUUM");
                Ok(n)
            }
            Ok(None) => Ok(0),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(StoreError::Write(e.to_string()))
            }
        }
    }
}
