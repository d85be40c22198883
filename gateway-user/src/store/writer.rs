//! Writing: the database side of appending. Records reach the [`spool`] first (sealed
//! into the chain and written there, which is what makes them durable); this thread moves
//! them into SQLite in large transactions, keeps the listing tables in step, syncs, prunes,
//! and empties the spool once the database holds everything in it.
//!
//! Durability: in `commit` mode a session writes its statement's record into the spool
//! itself (one `write(2)`) and goes on; in `strict` mode the records come here and are
//! fsynced in the spool, in groups, before their callers are answered. SQLite runs with
//! `synchronous = NORMAL` in `commit` mode (the WAL, then the database, is synced at
//! checkpoints, at least every [`SYNC_EVERY`] while there are new records, so an OS crash
//! loses at most that much; see [`checkpoint`] for a reader holding frames back) and
//! `FULL` in `strict` mode (every batch synced, on this thread); the spool is emptied only
//! after a checkpoint.
//!
//! A transaction that fails (disk full, read-only file, I/O error) is rolled back and its
//! records stay spooled, to be taken again at the next turn; until one succeeds the spool
//! refuses new records, so statements are refused rather than forwarded while the store
//! cannot write.

use std::{
    borrow::Cow,
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

use super::{Append, Head, StoreError, StoreStats, chain, chain::Row, spool::Spool};
use crate::config::Durability;

/// Most records taken from the queue for one spool write (`strict`).
pub const MAX_GROUP: usize = 1024;
/// Longest a record waits for its fsync in `commit` mode.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Longest a record waits in the spool before the database takes it, and a record appended
/// without waiting (transcripts, session ends) in memory before it is spooled.
pub const LAZY_EVERY: Duration = Duration::from_millis(10);
/// Records appended without waiting that make the writer turn at once.
pub const LAZY_WAKE: usize = 512;
/// Most records one turn of a prune deletes (one transaction): a prune of any size holds the
/// writer, and so the records waiting for the database, for one chunk at a time (18 ms
/// median on a 492 MB store on the development VM), never for the whole deletion.
const PRUNE_CHUNK: i64 = if cfg!(test) { 16 } else { 10_000 };
/// Free pages handed back to the file system per turn after a prune (4 KiB pages: 1 MiB).
const RELEASE_PAGES: u32 = 256;
/// Size the WAL file is cut back to when it starts over after a checkpoint. It holds about
/// a second of records (checkpoints run every [`SYNC_EVERY`]) but grows while a reader's
/// snapshot (a long `verify` or `export` on a busy store) keeps it from being reused, and
/// SQLite would otherwise keep it at that size for good.
const WAL_SIZE_LIMIT: i64 = if cfg!(test) { 64 << 10 } else { 64 << 20 };

pub type Waiter = oneshot::Sender<Result<i64, StoreError>>;

pub enum Op {
    /// Records to spool and fsync before answering (`strict`); an empty request just wakes.
    Append(Vec<Append>, Option<Waiter>),
    /// Answered once the database holds everything spooled before it.
    Flush(oneshot::Sender<Result<(), StoreError>>),
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
    // Pages that pruning frees are handed back to the file system a few at a time
    // (`incremental_vacuum`), never by a whole-file VACUUM that would hold the writer for
    // as long as it takes to copy the database. Takes effect only in a database without
    // tables: a store created before keeps `NONE`, and its free pages are reused.
    c.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    // Durability is the spool's, and the spool is emptied only after a checkpoint. In
    // `strict` mode every batch is synced as well, so emptying the spool never depends on
    // a checkpoint that readers kept from syncing the WAL.
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
    c.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
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

/// Inserts spooled records into the database in one transaction, with the listing tables.
pub fn insert(conn: &Connection, batch: &[Row]) -> rusqlite::Result<()> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let r = (|| {
        let mut ins = conn.prepare_cached(
            "INSERT INTO records (seq, at_us, session, kind, body, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        // Statements per session and verdict, one update per session and batch.
        let mut tally: std::collections::HashMap<i64, [i64; 4]> = Default::default();
        for r in batch {
            ins.execute(params![r.seq, r.at_us, r.session, r.kind, r.body, r.hash])?;
            if r.kind == "statement" {
                let column = match verdict_of(&r.body).as_deref() {
                    Some("deny") => 2,
                    Some("mask") => 1,
                    Some("require_approval") => 3,
                    _ => 0,
                };
                tally.entry(r.session).or_default()[column] += 1;
            } else {
                index(conn, r)?;
            }
        }
        let mut upd = conn.prepare_cached(
            "UPDATE sessions SET statements = statements + ?2 + ?3 + ?4 + ?5, allowed = allowed + ?2, \
             masked = masked + ?3, denied = denied + ?4, held = held + ?5 WHERE id = ?1",
        )?;
        for (session, [allowed, masked, denied, held]) in tally {
            upd.execute(params![session, allowed, masked, denied, held])?;
        }
        drop((ins, upd));
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(())
    })();
    if r.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    r
}

/// What a checkpoint did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpointed {
    /// Frames in the WAL.
    pub frames: i64,
    /// Frames copied into the database, by this checkpoint or an earlier one.
    pub copied: i64,
    /// Whether the WAL had to be synced here (a reader kept frames from being copied).
    pub synced_wal: bool,
}

/// Makes everything committed durable. A passive checkpoint copies the WAL into the
/// database, syncing the WAL before and the database after (synchronous = NORMAL). But a
/// reader's snapshot keeps the frames committed after it from being copied, and a passive
/// checkpoint that can copy nothing new syncs nothing: while an `audit export` or a
/// `verify` reads, the newest records would sit unsynced in the WAL and the spool, emptied
/// on the strength of this call, would no longer hold them. So when frames remain uncopied,
/// the WAL is fsynced here.
pub fn checkpoint(conn: &Connection) -> Result<Checkpointed, String> {
    let (frames, copied): (i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
        .map_err(|e| format!("checkpoint: {e}"))?;
    let synced_wal = copied < frames;
    if synced_wal {
        let db = conn
            .path()
            .filter(|p| !p.is_empty())
            .ok_or("checkpoint: the database has no file, so no WAL to sync")?;
        let wal = format!("{db}-wal");
        std::fs::File::open(&wal)
            .and_then(|f| f.sync_data())
            .map_err(|e| format!("cannot sync {wal}: {e}"))?;
    }
    Ok(Checkpointed {
        frames,
        copied,
        synced_wal,
    })
}

/// Hands up to `pages` free pages back to the file system (stores created with incremental
/// auto-vacuum; in others free pages are reused and this does nothing). Returns whether
/// free pages remain.
pub fn release_free_pages(conn: &Connection, pages: u32) -> rusqlite::Result<bool> {
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode != 2 {
        return Ok(false);
    }
    // Each step of the statement frees a page: run it to the end.
    let mut st = conn.prepare_cached(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let mut rows = st.query([])?;
    while rows.next()?.is_some() {}
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    Ok(free > 0)
}

/// The verdict of a statement record, read without building the whole body.
fn verdict_of(body: &str) -> Option<std::borrow::Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Verdict<'a> {
        #[serde(borrow)]
        verdict: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Verdict>(body).ok()?.verdict
}

/// Keeps the listing tables in step with the records. The body is parsed only for the
/// kinds that are copied.
fn index(conn: &Connection, r: &Row) -> rusqlite::Result<()> {
    let (session, at_us) = (r.session, r.at_us);
    let parsed = std::cell::OnceCell::new();
    let b = || -> &Value {
        parsed.get_or_init(|| serde_json::from_str(&r.body).unwrap_or(Value::Null))
    };
    let s = |k: &str| b().get(k).and_then(Value::as_str).map(str::to_owned);
    let i = |k: &str| b().get(k).and_then(Value::as_i64);
    match r.kind.as_str() {
        "session_start" => {
            // One per connection: read into the few fields the listing needs, not a tree.
            #[derive(serde::Deserialize, Default)]
            #[serde(default)]
            struct Start<'a> {
                #[serde(borrow)]
                agent: Cow<'a, str>,
                #[serde(borrow)]
                target: Cow<'a, str>,
                #[serde(borrow)]
                protocol: Cow<'a, str>,
                uid: Option<i64>,
                #[serde(borrow)]
                user: Option<Cow<'a, str>>,
                pid: Option<i64>,
                #[serde(borrow)]
                exe: Option<Cow<'a, str>>,
                #[serde(borrow)]
                unit: Option<Cow<'a, str>>,
            }
            // A body whose fields are not of these types (none this daemon writes) still
            // lists what it can: each field on its own, from the tree.
            let st: Start<'_> = serde_json::from_str(&r.body).unwrap_or_else(|_| {
                let text = |k: &str| s(k).map(Cow::Owned);
                Start {
                    agent: text("agent").unwrap_or_default(),
                    target: text("target").unwrap_or_default(),
                    protocol: text("protocol").unwrap_or_default(),
                    uid: i("uid"),
                    user: text("user"),
                    pid: i("pid"),
                    exe: text("exe"),
                    unit: text("unit"),
                }
            });
            conn.prepare_cached(
                "INSERT OR REPLACE INTO sessions (id, started_us, agent, target, protocol, uid, user, pid, exe, unit) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                session, at_us, st.agent, st.target, st.protocol, st.uid, st.user, st.pid,
                st.exe, st.unit,
            ])?;
        }
        "identity" => {
            let sub = b().pointer("/oidc/sub").and_then(Value::as_str);
            conn.prepare_cached("UPDATE sessions SET oidc_sub = ?2 WHERE id = ?1")?
                .execute(params![session, sub])?;
        }
        "session_end" => {
            conn.prepare_cached(
                "UPDATE sessions SET ended_us = ?2, end_reason = ?3 WHERE id = ?1",
            )?
            .execute(params![session, at_us, s("end")])?;
        }
        "approval_requested" => {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO approvals (id, session, created_us, expires_us, agent, target, uid, rule, statement, state) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending')",
            )?
            .execute(params![
                s("id").unwrap_or_default(),
                session,
                at_us,
                i("expires_us").unwrap_or_default(),
                s("agent").unwrap_or_default(),
                s("target").unwrap_or_default(),
                i("uid").unwrap_or_default(),
                s("rule").unwrap_or_default(),
                s("statement").unwrap_or_default(),
            ])?;
        }
        "approval_decided" => {
            conn.prepare_cached(
                "UPDATE approvals SET state = ?2, decided_us = ?3, decided_by = ?4, reason = ?5, grant_id = ?6 WHERE id = ?1",
            )?
            .execute(params![
                s("id").unwrap_or_default(),
                s("outcome").unwrap_or_default(),
                at_us,
                s("by"),
                s("reason"),
                s("grant"),
            ])?;
        }
        "grant_created" => {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO grants (id, rule, agent, target, created_us, expires_us, created_by) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                s("id").unwrap_or_default(),
                s("rule").unwrap_or_default(),
                s("agent").unwrap_or_default(),
                s("target").unwrap_or_default(),
                at_us,
                i("expires_us").unwrap_or_default(),
                s("by").unwrap_or_default(),
            ])?;
        }
        "grant_used" => {
            conn.prepare_cached("UPDATE grants SET uses = uses + 1 WHERE id = ?1")?
                .execute(params![s("grant").unwrap_or_default()])?;
        }
        _ => {}
    }
    Ok(())
}

/// The writer thread.
pub struct Writer {
    conn: Connection,
    spool: Arc<Mutex<Spool>>,
    lazy: Arc<Mutex<Vec<Append>>>,
    stats: Arc<StoreStats>,
    rx: Receiver<Op>,
    durability: Durability,
    /// Woken after every turn, for appends waiting for room in the spool.
    turned: Arc<tokio::sync::Notify>,
    unsynced: bool,
    last_sync: Instant,
    /// A prune in progress, a chunk per turn.
    pruning: Option<Pruning>,
    /// Free pages remain to hand back to the file system (incremental auto-vacuum stores).
    releasing: bool,
}

/// A prune in progress: the chain's prefix up to the first record still needed is deleted
/// [`PRUNE_CHUNK`] records per turn, each chunk a transaction that moves the anchor and is
/// followed by its own `prune` record, so the chain verifies between any two chunks.
struct Pruning {
    /// Sessions that ended before this go.
    before_us: i64,
    /// The first record that stays, found at the first chunk. What could go then can go
    /// later too (sessions only end and records only get older), so it stays valid.
    keep_from: Option<i64>,
    deleted: u64,
    acks: Vec<oneshot::Sender<Result<u64, StoreError>>>,
}

/// What one turn of a prune did.
enum Chunk {
    /// Deleted this many records; more may follow.
    Deleted(u64),
    /// Nothing left to delete: the prune is complete.
    Done,
}

impl Writer {
    pub fn new(
        conn: Connection,
        spool: Arc<Mutex<Spool>>,
        lazy: Arc<Mutex<Vec<Append>>>,
        stats: Arc<StoreStats>,
        rx: Receiver<Op>,
        durability: Durability,
        turned: Arc<tokio::sync::Notify>,
    ) -> Self {
        Self {
            turned,
            conn,
            spool,
            lazy,
            stats,
            rx,
            durability,
            unsynced: false,
            last_sync: Instant::now(),
            pruning: None,
            releasing: false,
        }
    }

    fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn run(mut self) {
        self.expire_pending_approvals();
        loop {
            let mut ops = Vec::new();
            match self.rx.recv_timeout(LAZY_EVERY) {
                Ok(op) => ops.push(op),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let mut records = 0;
            while records < MAX_GROUP
                && let Ok(op) = self.rx.try_recv()
            {
                if let Op::Append(r, _) = &op {
                    records += r.len().max(1);
                }
                ops.push(op);
            }
            self.stats
                .queued
                .fetch_sub(ops.len() as u64, Ordering::Relaxed);
            let mut groups = Vec::new();
            let mut flushes = Vec::new();
            let mut prunes = Vec::new();
            let mut stop = false;
            for op in ops {
                match op {
                    Op::Append(recs, waiter) => groups.push((recs, waiter)),
                    Op::Flush(ack) => flushes.push(ack),
                    Op::Prune(before, ack) => prunes.push((before, ack)),
                    Op::Stop => stop = true,
                }
            }
            self.spool_group(groups);
            let saved = self.save();
            self.turned.notify_waiters();
            for ack in flushes {
                let _ = ack.send(saved.clone());
            }
            for (before, ack) in prunes {
                self.start_prune(before, ack);
            }
            if !stop {
                self.prune_turn();
                self.release_turn();
            }
            self.sync_if_due(stop);
            if stop {
                break;
            }
        }
        // A clean stop leaves the spool cut back to what it holds: nothing, once the
        // database has synced it all.
        if let Err(e) = self.spool().release() {
            tracing::warn!(error = %e, "cannot cut back the audit spool");
        }
    }

    /// Spools the records appended without waiting, then `groups` (fsynced in `strict`),
    /// and answers each group's waiter with the group's last sequence number.
    fn spool_group(&mut self, groups: Vec<(Vec<Append>, Option<Waiter>)>) {
        let lazy = std::mem::take(&mut *self.lazy.lock().unwrap_or_else(|e| e.into_inner()));
        let (records, waiters): (Vec<_>, Vec<_>) =
            std::iter::once((lazy, None)).chain(groups).unzip();
        let n: usize = records.iter().map(Vec::len).sum();
        let began = Instant::now();
        let r = {
            let mut sp = self.spool();
            if n == 0 {
                Ok(vec![sp.head.seq; records.len()])
            } else {
                let r = sp.append(records).and_then(|lasts| {
                    if self.durability == Durability::Strict {
                        sp.sync().map_err(|e| {
                            StoreError::Write(format!("cannot sync the spool: {e}"))
                        })?;
                    }
                    Ok(lasts)
                });
                self.stats.count(n, began, &r);
                r
            }
        };
        for (i, w) in waiters.into_iter().enumerate() {
            if let Some(w) = w {
                let _ = w.send(r.as_ref().map(|lasts| lasts[i]).map_err(Clone::clone));
            }
        }
    }

    /// Moves what the spool holds into the database. A failed transaction leaves the records
    /// spooled and blocks new ones until a later turn succeeds.
    fn save(&mut self) -> Result<(), StoreError> {
        let batch = std::mem::take(&mut self.spool().unsaved);
        if batch.is_empty() {
            return Ok(());
        }
        match insert(&self.conn, &batch) {
            Ok(()) => {
                self.stats
                    .saved
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.unsynced = true;
                self.stats.last_failed.store(false, Ordering::Relaxed);
                if self.spool().blocked.take().is_some() {
                    tracing::info!("the audit store writes again");
                }
                Ok(())
            }
            Err(e) => {
                let why = format!("the database cannot take records: {e}");
                let mut sp = self.spool();
                if sp.blocked.is_none() {
                    tracing::error!(error = %e, records = batch.len(), "audit store write failed; records stay in the spool");
                }
                let later = std::mem::replace(&mut sp.unsaved, batch);
                sp.unsaved.extend(later);
                sp.blocked = Some(why.clone());
                self.stats.last_failed.store(true, Ordering::Relaxed);
                Err(StoreError::Write(why))
            }
        }
    }

    /// Syncs the database when due, then empties the spool if the database holds it all.
    fn sync_if_due(&mut self, now: bool) {
        if !self.unsynced || !(now || self.last_sync.elapsed() >= SYNC_EVERY) {
            return;
        }
        match checkpoint(&self.conn) {
            Ok(_) => {
                self.unsynced = false;
                self.last_sync = Instant::now();
                if let Err(e) = self.spool().truncate_if_saved() {
                    tracing::warn!(error = %e, "cannot empty the audit spool");
                }
            }
            Err(e) => tracing::warn!(error = %e, "audit store checkpoint failed"),
        }
    }

    /// Records through the spool from this thread, without waiting for the database.
    fn append_here(&self, recs: Vec<Append>) -> Result<i64, StoreError> {
        let (n, began) = (recs.len(), Instant::now());
        let r = self.spool().append(vec![recs]).map(|l| l[0]);
        self.stats.count(n, began, &r);
        r
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
                })
                .into(),
                at_us: super::now_us(),
            })
            .collect();
        tracing::info!(
            requests = recs.len(),
            "approvals pending at the last stop recorded as expired"
        );
        if let Err(e) = self.append_here(recs) {
            tracing::warn!(error = %e, "cannot record the expired approvals");
        }
    }

    /// Takes a prune request: starts a prune, or joins the one in progress (raising its
    /// cut-off when the request's is later, so no request is answered with less than it
    /// asked for).
    fn start_prune(&mut self, before_us: i64, ack: oneshot::Sender<Result<u64, StoreError>>) {
        match &mut self.pruning {
            Some(p) => {
                if before_us > p.before_us {
                    p.before_us = before_us;
                    p.keep_from = None;
                }
                p.acks.push(ack);
            }
            None => {
                self.pruning = Some(Pruning {
                    before_us,
                    keep_from: None,
                    deleted: 0,
                    acks: vec![ack],
                })
            }
        }
    }

    /// One chunk of the prune in progress; answers its requests when it is complete or
    /// fails (a failed chunk is rolled back; what earlier chunks deleted stays deleted,
    /// with their `prune` records).
    fn prune_turn(&mut self) {
        let Some(mut p) = self.pruning.take() else {
            return;
        };
        let outcome = match self.prune_chunk(&mut p) {
            Ok(Chunk::Deleted(n)) => {
                p.deleted += n;
                self.pruning = Some(p);
                return;
            }
            Ok(Chunk::Done) => {
                self.releasing = true;
                Ok(p.deleted)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(StoreError::Write(format!("pruning: {e}")))
            }
        };
        for ack in p.acks {
            let _ = ack.send(outcome.clone());
        }
    }

    fn prune_chunk(&mut self, p: &mut Pruning) -> rusqlite::Result<Chunk> {
        let keep_from = match p.keep_from {
            Some(k) => k,
            None => {
                // The first record that must stay: of a session not ended by `before_us`,
                // or written at or after it; with none, everything up to the head goes.
                let k = self.conn.query_row(
                    "SELECT coalesce(\
                       (SELECT min(seq) FROM records WHERE at_us >= ?1 OR session IN \
                         (SELECT id FROM sessions WHERE ended_us IS NULL OR ended_us >= ?1)), \
                       (SELECT max(seq) + 1 FROM records))",
                    params![p.before_us],
                    |r| r.get::<_, Option<i64>>(0),
                )?;
                let Some(k) = k else {
                    return Ok(Chunk::Done);
                };
                *p.keep_from.insert(k)
            }
        };
        let first: Option<i64> = self
            .conn
            .query_row("SELECT min(seq) FROM records", [], |r| r.get(0))?;
        let upto = match first {
            Some(first) if first < keep_from => keep_from.min(first + PRUNE_CHUNK),
            _ => {
                // The records are gone: now the sessions they belonged to.
                self.conn.execute(
                    "DELETE FROM sessions WHERE ended_us IS NOT NULL AND ended_us < ?1 \
                     AND NOT EXISTS (SELECT 1 FROM records WHERE records.session = sessions.id)",
                    params![p.before_us],
                )?;
                return Ok(Chunk::Done);
            }
        };
        let prev: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT hash FROM records WHERE seq = ?1",
                params![upto - 1],
                |r| r.get(0),
            )
            .ok();
        let Some(prev) = prev else {
            // A gap in the chain (never written by this daemon): leave it to `verify`.
            return Ok(Chunk::Done);
        };
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let n = self
            .conn
            .execute("DELETE FROM records WHERE seq < ?1", params![upto])?;
        self.conn.execute(
            "INSERT OR REPLACE INTO anchor (id, seq, prev_hash) VALUES (1, ?1, ?2)",
            params![upto, prev],
        )?;
        self.conn.execute_batch("COMMIT")?;
        // The prune itself is a record: verify checks the anchor against it. Saved at once,
        // so a reader of the file sees the anchor without its record only for that long.
        let r = self.append_here(vec![Append {
            session: 0,
            kind: "prune",
            body: serde_json::json!({
                "first_seq": upto,
                "anchor_hash": chain::hex(&prev),
                "records": n,
                "before_us": p.before_us,
            })
            .into(),
            at_us: super::now_us(),
        }]);
        match r {
            Ok(_) => {
                let _ = self.save();
            }
            Err(e) => tracing::warn!(error = %e, "cannot record the prune"),
        }
        Ok(Chunk::Deleted(n as u64))
    }

    /// Hands a few free pages back to the file system, after a prune, until none are left.
    fn release_turn(&mut self) {
        if !self.releasing || self.pruning.is_some() {
            return;
        }
        self.releasing = match release_free_pages(&self.conn, RELEASE_PAGES) {
            Ok(more) => {
                self.unsynced = true;
                more
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand free audit store pages back");
                false
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_a_reader_holds_back_syncs_the_wal_itself() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("audit.db");
        let w = open_rw(&path, Durability::Commit).expect("open the store");
        let add = |seq: i64| {
            w.execute(
                "INSERT INTO records (seq, at_us, session, kind, body, hash) \
                 VALUES (?1, 0, 1, 'statement', '{}', x'00')",
                [seq],
            )
            .expect("insert a record")
        };
        add(1);
        let c = checkpoint(&w).expect("checkpoint");
        assert!(
            c.frames > 0 && c.copied == c.frames && !c.synced_wal,
            "{c:?}"
        );

        // A reader's snapshot (an export, a verify) keeps the next frames in the WAL.
        let reader = Connection::open(&path).expect("open a reader");
        reader.execute_batch("BEGIN").expect("begin a read");
        let n: i64 = reader
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .expect("read");
        assert_eq!(n, 1);
        add(2);
        let c = checkpoint(&w).expect("checkpoint");
        assert!(c.copied < c.frames && c.synced_wal, "{c:?}");

        // Once it is gone, the checkpoint copies everything and syncs on its own.
        reader.execute_batch("COMMIT").expect("end the read");
        add(3);
        let c = checkpoint(&w).expect("checkpoint");
        assert!(c.copied == c.frames && !c.synced_wal, "{c:?}");
    }

    #[test]
    fn a_wal_grown_behind_a_reader_is_cut_back_once_it_starts_over() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("audit.db");
        let wal = dir.path().join("audit.db-wal");
        let w = open_rw(&path, Durability::Commit).expect("open the store");
        let mut seq = 0;
        let mut add = |rows: i64| {
            w.execute(
                "INSERT INTO records (seq, at_us, session, kind, body, hash) \
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2) \
                 SELECT ?1 + i, 0, 1, 'statement', printf('%.2000c', 'x'), x'00' FROM n",
                params![seq, rows],
            )
            .expect("insert records");
            seq += rows;
        };
        let wal_size = || std::fs::metadata(&wal).expect("the WAL").len() as i64;
        add(1);
        let reader = Connection::open(&path).expect("open a reader");
        reader.execute_batch("BEGIN").expect("begin a read");
        let _: i64 = reader
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .expect("read");
        // While the snapshot is held, no checkpoint lets the WAL start over: it grows.
        for _ in 0..4 {
            add(100);
            checkpoint(&w).expect("checkpoint");
        }
        let grown = wal_size();
        assert!(grown > 4 * WAL_SIZE_LIMIT, "{grown} bytes");
        reader.execute_batch("COMMIT").expect("end the read");
        let c = checkpoint(&w).expect("checkpoint");
        assert_eq!(c.copied, c.frames, "{c:?}");
        // The next write starts the WAL over and cuts the file back.
        add(1);
        let cut = wal_size();
        assert!(
            cut <= WAL_SIZE_LIMIT,
            "{cut} bytes after the restart, {grown} before"
        );
    }

    #[test]
    fn free_pages_go_back_a_few_at_a_time() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("audit.db");
        let c = open_rw(&path, Durability::Commit).expect("open the store");
        let free = || -> i64 {
            c.query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .expect("freelist")
        };
        let pages = || -> i64 {
            c.query_row("PRAGMA page_count", [], |r| r.get(0))
                .expect("page count")
        };
        c.execute(
            "INSERT INTO records (seq, at_us, session, kind, body, hash) \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400) \
             SELECT i, 0, 1, 'statement', printf('%.2000c', 'x'), x'00' FROM n",
            [],
        )
        .expect("fill");
        let full = pages();
        c.execute("DELETE FROM records WHERE seq <= 300", [])
            .expect("delete");
        let freed = free();
        assert!(freed > 100, "a delete frees pages: {freed} of {full}");

        assert!(release_free_pages(&c, 32).expect("release"), "more to go");
        assert_eq!(free(), freed - 32);
        while release_free_pages(&c, 32).expect("release") {}
        assert_eq!(free(), 0);
        assert_eq!(pages(), full - freed, "the file shrank by what was free");
    }

    #[test]
    fn the_verdict_is_read_from_the_record_not_from_its_statement() {
        let body = serde_json::json!({
            "sql": "SELECT '\"verdict\":\"deny\"', $${\"verdict\": \"mask\"}$$",
            "verdict": "allow",
            "kinds": ["select"],
        })
        .to_string();
        assert_eq!(verdict_of(&body).as_deref(), Some("allow"));
        assert_eq!(verdict_of(r#"{"n":1}"#), None);
        assert_eq!(verdict_of("not json"), None);
        // Escapes in the verdict itself are undone.
        assert_eq!(
            verdict_of(r#"{"verdict":"requ\u0069re_approval"}"#).as_deref(),
            Some("require_approval")
        );
    }
}
