//! The audit store: an embedded SQLite database (WAL) of sessions, statements, decisions,
//! approvals, grants and session transcripts, as one hash-chained log of records
//! ([`chain`]) plus tables derived from it for listing.
//!
//! A record is appended by sealing it into the chain and writing it to the [`spool`], an
//! append-only file beside the database; the [`writer`] thread moves spooled records into
//! SQLite in large transactions. Callers that must not go on before their record is safe (a
//! statement is recorded before it is forwarded) wait for the spool write — in `commit`
//! mode they write it themselves, in `strict` mode the writer thread writes and fsyncs it
//! for them, in groups. Transcripts are queued and spooled by the writer without anyone
//! waiting. A record that cannot be queued or written is an error to the caller, never a
//! silent loss. Reads ([`query`]) use their own connection and see what the writer has
//! saved; [`Store::flush`] waits for everything spooled before it.
//!
//! See docs/audit.md for the guarantees and their limits.

pub mod chain;
mod mapped;
pub mod query;
pub mod redact;
pub mod spool;
pub mod writer;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{SyncSender, TrySendError},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::config::StoreConfig;

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the audit store's queue is full ({0} records waiting)")]
    QueueFull(usize),
    #[error("the audit store's writer has stopped")]
    Closed,
    #[error("the audit store cannot write: {0}")]
    Write(String),
    #[error("cannot open the audit store {path}: {why}", path = path.display())]
    Open { path: PathBuf, why: String },
    #[error("audit store query: {0}")]
    Query(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Query(e.to_string())
    }
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Records spooled.
    pub written: AtomicU64,
    /// Records the database took.
    pub saved: AtomicU64,
    pub groups: AtomicU64,
    pub failed: AtomicU64,
    pub queue_full: AtomicU64,
    pub refused_statements: AtomicU64,
    /// Requests queued for the writer and not yet taken.
    pub queued: AtomicU64,
    /// The last commit failed (cleared by the next good one).
    pub last_failed: std::sync::atomic::AtomicBool,
}

impl StoreStats {
    /// Accounts for one spool write of `n` records begun at `began`: counters, the commit
    /// latency metric, and a log line when it failed.
    pub fn count<T>(&self, n: usize, began: std::time::Instant, r: &Result<T, StoreError>) {
        crate::metrics::get()
            .audit_commit_seconds
            .observe(began.elapsed().as_secs_f64());
        match r {
            Ok(_) => {
                self.written.fetch_add(n as u64, Ordering::Relaxed);
                self.groups.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(n as u64, Ordering::Relaxed);
                self.last_failed.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, records = n, "audit store write failed");
            }
        }
    }

    pub fn snapshot(&self) -> StoreCounters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreCounters {
            written: l(&self.written),
            saved: l(&self.saved),
            unsaved: 0,
            groups: l(&self.groups),
            failed: l(&self.failed),
            queue_full: l(&self.queue_full),
            refused_statements: l(&self.refused_statements),
            queued: l(&self.queued),
        }
    }
}

/// The counters at one moment, for `portcullis status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreCounters {
    /// Records written (spooled: durable as `durability` says).
    pub written: u64,
    /// Records the database took from the spool.
    #[serde(default)]
    pub saved: u64,
    /// Records spooled and not yet in the database.
    #[serde(default)]
    pub unsaved: u64,
    /// Spool writes.
    pub groups: u64,
    /// Records whose write failed.
    pub failed: u64,
    /// Appends refused because the queue was full.
    pub queue_full: u64,
    /// Statements refused because they could not be recorded.
    pub refused_statements: u64,
    /// Requests waiting for the writer.
    pub queued: u64,
}

/// The chain's head: the last record spooled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: [u8; 32],
}

/// Longest a statement waits for room when `queue` records are spooled and not yet in the
/// database, before it is refused.
pub const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A record to append.
pub struct Append {
    pub session: i64,
    pub kind: &'static str,
    pub body: Json,
    pub at_us: i64,
}

/// A record's body as the compact JSON text that is stored, hashed into the chain and
/// spooled. Records on the statement path are serialized straight from borrowed fields
/// ([`Json::of`]); building a [`Value`] first and serializing it costs an allocation per
/// field and a second pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Json(String);

impl Json {
    pub fn of<T: serde::Serialize + ?Sized>(v: &T) -> Self {
        // Serializing to a string fails only for maps with non-string keys, which no
        // record has.
        Self(serde_json::to_string(v).unwrap_or_else(|_| "null".into()))
    }

    /// Text put together by the caller from pieces serde_json wrote: it must be one JSON
    /// value (a record's body is checked by nothing else before it is hashed and stored).
    pub fn assembled(text: Vec<u8>) -> Self {
        debug_assert!(
            serde_json::from_slice::<serde::de::IgnoredAny>(&text).is_ok(),
            "not JSON: {}",
            String::from_utf8_lossy(&text)
        );
        Self(
            String::from_utf8(text)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl From<Value> for Json {
    fn from(v: Value) -> Self {
        Self(v.to_string())
    }
}

pub struct Store {
    cfg: StoreConfig,
    tx: SyncSender<writer::Op>,
    /// Records appended without waiting, for the writer's next turn.
    lazy: Arc<Mutex<Vec<Append>>>,
    /// The chain's head, the spool file and the records on their way to the database.
    spool: Arc<Mutex<spool::Spool>>,
    closed: std::sync::atomic::AtomicBool,
    /// Woken after each turn of the writer (room in the spool).
    turned: Arc<tokio::sync::Notify>,
    reader: Mutex<rusqlite::Connection>,
    pub stats: Arc<StoreStats>,
    next_session: AtomicU64,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Store {
    /// Opens (creating) the database, imports what a previous run left in the spool, and
    /// starts the writer (which first marks approvals left pending as expired).
    pub fn open(cfg: &StoreConfig) -> Result<Arc<Self>, StoreError> {
        let err = |why: String| StoreError::Open {
            path: cfg.path.clone(),
            why,
        };
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let conn = writer::open_rw(&cfg.path, cfg.durability).map_err(|e| err(e.to_string()))?;
        let spool_path = spool::path_for(&cfg.path);
        let head = recover(&conn, &spool_path).map_err(err)?;
        let max_session: i64 = conn
            .query_row("SELECT coalesce(max(id), 0) FROM sessions", [], |r| {
                r.get(0)
            })
            .map_err(|e| err(e.to_string()))?;
        let spool = spool::Spool::open(&spool_path, head)
            .map_err(|e| err(format!("cannot open {}: {e}", spool_path.display())))?;
        restrict_permissions(&cfg.path);
        let reader = open_ro(&cfg.path).map_err(|e| err(e.to_string()))?;
        let stats = Arc::new(StoreStats::default());
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue);
        let lazy = Arc::new(Mutex::new(Vec::new()));
        let spool = Arc::new(Mutex::new(spool));
        let turned = Arc::new(tokio::sync::Notify::new());
        let w = writer::Writer::new(
            conn,
            spool.clone(),
            lazy.clone(),
            stats.clone(),
            rx,
            cfg.durability,
            turned.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("portcullis-store".into())
            .spawn(move || w.run())
            .map_err(|e| err(e.to_string()))?;
        let store = Arc::new(Self {
            cfg: cfg.clone(),
            tx,
            lazy,
            spool,
            closed: std::sync::atomic::AtomicBool::new(false),
            turned,
            reader: Mutex::new(reader),
            stats,
            next_session: AtomicU64::new(max_session.max(0) as u64 + 1),
            writer: Mutex::new(Some(handle)),
        });
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    /// A new session id, unique across restarts.
    pub fn next_session_id(&self) -> i64 {
        self.next_session.fetch_add(1, Ordering::Relaxed) as i64
    }

    fn spool(&self) -> std::sync::MutexGuard<'_, spool::Spool> {
        self.spool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The chain's head: the last record spooled.
    pub fn head(&self) -> Head {
        self.spool().head
    }

    fn send(&self, op: writer::Op) -> Result<(), StoreError> {
        // Counted before sending: the writer may take it (and count down) at once.
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(op) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                Err(StoreError::QueueFull(self.cfg.queue))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(StoreError::Closed)
            }
        }
    }

    /// Queues a record; does not wait (transcripts, results, session ends). It is spooled
    /// with the next durable append or by the writer within [`writer::LAZY_EVERY`];
    /// appending does not wake the writer until [`writer::LAZY_WAKE`] records wait.
    pub fn append(&self, a: Append) -> Result<(), StoreError> {
        let waiting = {
            let mut l = self.lazy.lock().unwrap_or_else(|e| e.into_inner());
            if l.len() >= self.cfg.queue {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::QueueFull(self.cfg.queue));
            }
            l.push(a);
            l.len()
        };
        if waiting == writer::LAZY_WAKE {
            // An empty request: the writer takes the waiting records with it.
            let _ = self.send(writer::Op::Append(Vec::new(), None));
        }
        Ok(())
    }

    /// The counters, with the records waiting to be taken counted as queued.
    pub fn counters(&self) -> StoreCounters {
        let mut c = self.stats.snapshot();
        c.queued += self.lazy.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        c.unsaved = self.spool().unsaved.len() as u64;
        c
    }

    /// Records `records` (after whatever was appended without waiting) and returns once
    /// they are durable as `durability` says, with the sequence number of the last one.
    /// In `commit` mode that is this call's own spool write; in `strict` mode the writer
    /// thread's, with its fsync.
    pub async fn append_durable(&self, records: Vec<Append>) -> Result<i64, StoreError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        if self.cfg.durability == crate::config::Durability::Strict {
            // The fsync is the writer thread's: never on a runtime worker.
            let (ack, wait) = tokio::sync::oneshot::channel();
            self.send(writer::Op::Append(records, Some(ack)))?;
            return wait.await.unwrap_or(Err(StoreError::Closed));
        }
        // The usual case: there is room, and no waiter is registered for it.
        let mut records = match self.try_append(records) {
            Ok(r) => return r,
            Err(back) => back,
        };
        // A full spool (the database behind) holds the caller back, up to QUEUE_WAIT.
        // Registered before each try, so a turn between the try and the wait is not missed.
        let waited = std::time::Instant::now();
        loop {
            let turned = self.turned.notified();
            tokio::pin!(turned);
            turned.as_mut().enable();
            match self.try_append(records) {
                Ok(r) => return r,
                Err(back) => records = back,
            }
            let left = QUEUE_WAIT.saturating_sub(waited.elapsed());
            if left.is_zero() || tokio::time::timeout(left, turned).await.is_err() {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::QueueFull(self.cfg.queue));
            }
        }
    }

    /// Spools `records` (after the transcripts waiting) unless `queue` records already wait
    /// for the database: then they come back.
    fn try_append(&self, records: Vec<Append>) -> Result<Result<i64, StoreError>, Vec<Append>> {
        let mut sp = self.spool();
        if sp.unsaved.len() >= self.cfg.queue && sp.blocked.is_none() {
            return Err(records);
        }
        // Transcripts appended before come first: they happened first.
        let lazy = std::mem::take(&mut *self.lazy.lock().unwrap_or_else(|e| e.into_inner()));
        let n = records.len() + lazy.len();
        let began = std::time::Instant::now();
        let r = sp.append(vec![lazy, records]).map(|l| l[1]);
        drop(sp);
        self.stats.count(n, began, &r);
        Ok(r)
    }

    /// Waits until the database holds everything recorded so far (reads, tests, shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (ack, wait) = tokio::sync::oneshot::channel();
        self.send(writer::Op::Flush(ack))?;
        wait.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Runs a read on the reader connection (blocking: call from `spawn_blocking`).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let c = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        f(&c)
    }

    /// Deletes the records of sessions that ended before `before_us` (a prefix of the
    /// chain), keeping verification possible from the new first record. Returns how many
    /// records went.
    pub async fn prune(&self, before_us: i64) -> Result<u64, StoreError> {
        let (ack, wait) = tokio::sync::oneshot::channel();
        self.send(writer::Op::Prune(before_us, ack))?;
        wait.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Whether the store can write now: the last commit succeeded and the store's directory
    /// takes a small synced file (catches a full or read-only filesystem while idle).
    pub fn probe_writable(&self) -> Result<(), String> {
        use std::io::Write as _;
        if self.stats.last_failed.load(Ordering::Relaxed) {
            return Err("the last write to the audit store failed".into());
        }
        let dir = self.cfg.path.parent().unwrap_or_else(|| Path::new("."));
        let probe = dir.join(".portcullis-write-probe");
        let r = (|| {
            let mut f = std::fs::File::create(&probe)?;
            f.write_all(&[0u8; 4096])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&probe);
        r.map_err(|e| format!("cannot write in {}: {e}", dir.display()))
    }

    /// Stops the writer after what is queued, and logs the chain head.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        // Blocking: after what is queued (the writer is draining it).
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(writer::Op::Stop);
        if let Some(h) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
        let head = self.head();
        tracing::info!(
            store.head_seq = head.seq,
            store.head_hash = %chain::hex(&head.hash),
            "audit store closed"
        );
    }
}

/// Imports the records a previous run spooled and the database lacks (after the daemon was
/// killed, or the database could not take them), then empties the spool; returns the
/// chain's head. A spool whose records do not continue the chain is not imported: it is
/// kept aside as `<spool>.rejected-<time>` for inspection and the problem logged.
fn recover(conn: &rusqlite::Connection, path: &Path) -> Result<Head, String> {
    let mut head = writer::read_head(conn).map_err(|e| e.to_string())?;
    let d = spool::Spool::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if d.rows.is_empty() && d.torn == 0 && d.bad.is_none() {
        return Ok(head);
    }
    let (rows, problem) = spool::continuing(&mut head, d.rows);
    let n = rows.len();
    writer::insert(conn, &rows)
        .map_err(|e| e.to_string())
        .and_then(|()| writer::checkpoint(conn))
        .map_err(|e| {
            format!(
                "cannot import {n} spooled record(s) from {}: {e}",
                path.display()
            )
        })?;
    if d.torn > 0 {
        tracing::warn!(spool = %path.display(), bytes = d.torn, "an unfinished write at the end of the audit spool was dropped (its records were never acknowledged)");
    }
    if let Some(why) = problem.or(d.bad.map(|(at, why)| format!("line at byte {at}: {why}"))) {
        let aside = PathBuf::from(format!("{}.rejected-{}", path.display(), now_us()));
        for (part, kept) in spool::parts_of(path).iter().zip(spool::parts_of(&aside)) {
            let _ = std::fs::copy(part, kept);
        }
        tracing::error!(spool = %path.display(), kept = %aside.display(), problem = %why, imported = n, "the audit spool does not continue the chain; the rest was not imported");
    } else if n > 0 {
        tracing::info!(
            records = n,
            head_seq = head.seq,
            "imported records from the audit spool"
        );
    }
    for part in spool::parts_of(path) {
        match std::fs::OpenOptions::new().write(true).open(&part) {
            Ok(f) => f.set_len(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| format!("cannot empty {}: {e}", part.display()))?;
    }
    Ok(head)
}

/// The database and its WAL hold statements and results: root's alone.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    for suffix in ["", "-wal", "-shm", ".spool", ".spool.1"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}

pub fn open_ro(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::Durability;

    fn cfg(dir: &Path, durability: Durability) -> StoreConfig {
        StoreConfig {
            path: dir.join("t.db"),
            durability,
            queue: 1024,
            recording_limit: 1 << 20,
            retention: None,
            prune_interval: crate::config::Duration::from_secs(3600),
            redact_literals: false,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pc-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn rec(session: i64, kind: &'static str, body: Value) -> Append {
        Append {
            session,
            kind,
            body: body.into(),
            at_us: now_us(),
        }
    }

    #[tokio::test]
    async fn an_older_store_gains_the_token_subject_column() {
        let dir = tmp("migrate");
        {
            // The sessions table as stores created before OIDC identities have it.
            let c = rusqlite::Connection::open(dir.join("t.db")).expect("db");
            c.execute_batch(
                "CREATE TABLE sessions (id INTEGER PRIMARY KEY, started_us INTEGER NOT NULL, \
                 ended_us INTEGER, agent TEXT NOT NULL, target TEXT NOT NULL, protocol TEXT NOT NULL, \
                 uid INTEGER, user TEXT, pid INTEGER, exe TEXT, unit TEXT, end_reason TEXT, \
                 statements INTEGER NOT NULL DEFAULT 0, allowed INTEGER NOT NULL DEFAULT 0, \
                 masked INTEGER NOT NULL DEFAULT 0, denied INTEGER NOT NULL DEFAULT 0, \
                 held INTEGER NOT NULL DEFAULT 0)",
            )
            .expect("old schema");
        }
        let s = Store::open(&cfg(&dir, Durability::Commit)).expect("open an older store");
        let id = s.next_session_id();
        s.append_durable(vec![
            rec(
                id,
                "session_start",
                json!({"agent": "a", "target": "pg", "protocol": "postgres"}),
            ),
            rec(
                id,
                "identity",
                json!({"oidc": {"sub": "svc-1", "groups": ["g"]}}),
            ),
        ])
        .await
        .expect("recorded");
        s.flush().await.expect("saved");
        let by_sub = |sub: &str| {
            s.read(|c| {
                query::sessions(
                    c,
                    &query::SessionFilter {
                        sub: Some(sub.into()),
                        ..Default::default()
                    },
                )
            })
            .expect("list")
        };
        let found = by_sub("svc-1");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].oidc_sub.as_deref(), Some("svc-1"));
        assert!(by_sub("someone-else").is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_chain_list_verify_and_prune() {
        let dir = tmp("chain");
        for durability in [Durability::Commit, Durability::Strict] {
            let _ = std::fs::remove_file(dir.join("t.db"));
            let s = Store::open(&cfg(&dir, durability)).expect("open");
            let id = s.next_session_id();
            s.append_durable(vec![rec(
                id,
                "session_start",
                json!({"agent": "a", "target": "pg", "protocol": "postgres", "uid": 1000,
                       "user": "al\"ice", "pid": 42, "exe": "/opt/x\ty", "unit": null,
                       "cmdline": ["x", "-v"], "client": "127.0.0.1:5"}),
            )])
            .await
            .expect("start");
            // Concurrent callers share groups.
            let mut waits = Vec::new();
            for n in 0..50 {
                let s = s.clone();
                waits.push(tokio::spawn(async move {
                    s.append_durable(vec![rec(id, "statement", json!({"n": n, "sql": "SELECT 1", "verdict": if n % 10 == 0 { "deny" } else { "allow" }}))])
                        .await
                }));
            }
            let mut seqs = std::collections::BTreeSet::new();
            for w in waits {
                seqs.insert(w.await.expect("join").expect("recorded"));
            }
            assert_eq!(
                seqs.into_iter().collect::<Vec<_>>(),
                (2..=51).collect::<Vec<_>>(),
                "each caller gets its own record's number"
            );
            s.append(rec(id, "session_end", json!({"end": "closed"})))
                .expect("end");
            s.flush().await.expect("flush");
            assert_eq!(s.head().seq, 52);
            let list = |f: query::SessionFilter| s.read(|c| query::sessions(c, &f)).expect("list");
            let listed = list(query::SessionFilter::default());
            assert_eq!(listed.len(), 1);
            assert_eq!((listed[0].statements, listed[0].denied), (50, 5));
            let l = &listed[0];
            assert_eq!((l.agent.as_str(), l.target.as_str()), ("a", "pg"));
            assert_eq!((l.uid, l.pid), (Some(1000), Some(42)));
            assert_eq!(l.user.as_deref(), Some("al\"ice"));
            assert_eq!(l.exe.as_deref(), Some("/opt/x\ty"));
            assert_eq!(l.end_reason.as_deref(), Some("closed"));
            let denied = list(query::SessionFilter {
                decision: Some("deny".into()),
                ..Default::default()
            });
            assert_eq!(denied.len(), 1);
            let v = s
                .read(|c| query::verify(c, Some(s.head())))
                .expect("verify");
            assert!(v.ok, "{v:?}");
            // In strict mode the writer thread's fsync makes 50 concurrent callers queue
            // up behind it: they share groups. (In commit mode a caller that finds nobody
            // committing commits alone; grouping there depends on timing.)
            if durability == Durability::Strict {
                assert!(
                    s.stats.groups.load(Ordering::Relaxed) < 52,
                    "records were not grouped"
                );
            }

            // A start whose fields are not all of the expected types lists the rest.
            let odd = s.next_session_id();
            s.append_durable(vec![rec(
                odd,
                "session_start",
                json!({"agent": "b", "target": "pg", "protocol": "postgres", "uid": "1000",
                       "user": 7, "pid": 43, "exe": "/bin/b"}),
            )])
            .await
            .expect("odd start");
            s.flush().await.expect("flush");
            let listed = list(query::SessionFilter {
                agent: Some("b".into()),
                ..Default::default()
            });
            let l = &listed[0];
            assert_eq!((l.target.as_str(), l.pid, l.uid), ("pg", Some(43), None));
            assert_eq!(
                (l.user.as_deref(), l.exe.as_deref()),
                (None, Some("/bin/b"))
            );

            // A second, later session, then prune the first.
            let id2 = s.next_session_id();
            s.append_durable(vec![rec(
                id2,
                "session_start",
                json!({"agent": "a", "target": "pg", "protocol": "postgres"}),
            )])
            .await
            .expect("start 2");
            let pruned = s.prune(now_us()).await.expect("prune");
            assert_eq!(pruned, 52);
            s.flush().await.expect("the prune's record saved");
            let v = s
                .read(|c| query::verify(c, Some(s.head())))
                .expect("verify");
            assert!(v.ok, "still verifies after pruning: {v:?}");
            // In chunks (16 records in tests), each with its own prune record.
            let chunks: Vec<i64> = s
                .read(|c| {
                    c.prepare("SELECT json_extract(body, '$.records') FROM records WHERE kind = 'prune' ORDER BY seq")?
                        .query_map([], |r| r.get(0))?
                        .collect::<rusqlite::Result<_>>()
                        .map_err(StoreError::from)
                })
                .expect("prune records");
            assert_eq!(chunks, [16, 16, 16, 4]);
            // The freed pages went back to the file system, without a VACUUM.
            let (auto_vacuum, free): (i64, i64) = s
                .read(|c| {
                    Ok((
                        c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?,
                        c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?,
                    ))
                })
                .expect("pragmas");
            assert_eq!(
                (auto_vacuum, free),
                (2, 0),
                "incremental, and nothing left free"
            );
            s.close();

            // Tampering from outside is found, at the right record.
            let c = rusqlite::Connection::open(dir.join("t.db")).expect("rw");
            let first: i64 = c
                .query_row("SELECT min(seq) FROM records", [], |r| r.get(0))
                .expect("min");
            c.execute("UPDATE records SET body = '{}' WHERE seq = ?1", [first])
                .expect("tamper");
            let v = query::verify(&c, None).expect("verify");
            assert!(!v.ok);
            assert_eq!(v.first_bad_seq, Some(first));
            drop(c);

            // Reopening continues the chain (and the session ids).
            let s = Store::open(&cfg(&dir, durability)).expect("reopen");
            assert!(s.next_session_id() > id2);
            s.close();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Writes `n` records sealed onto `head` into the spool, as a killed daemon leaves it.
    fn spooled(path: &Path, head: Head, n: i64, session: i64) -> (Head, Vec<u8>) {
        let mut h = head;
        let mut out = Vec::new();
        spool::seal(
            &mut h,
            (0..n)
                .map(|i| {
                    rec(
                        session,
                        "statement",
                        json!({"sql": format!("SELECT {i}"), "verdict": "allow"}),
                    )
                })
                .collect(),
            &mut out,
        );
        std::fs::write(path, &out).expect("spool");
        (h, out)
    }

    #[tokio::test]
    async fn records_left_in_the_spool_are_imported_at_the_next_start() {
        let dir = tmp("recover");
        let c = cfg(&dir, Durability::Commit);
        let spool_path = spool::path_for(&c.path);
        let s = Store::open(&c).expect("open");
        let id = s.next_session_id();
        s.append_durable(vec![rec(
            id,
            "session_start",
            json!({"agent": "a", "target": "pg", "protocol": "postgres"}),
        )])
        .await
        .expect("start");
        s.close();
        let head = s.head();
        drop(s);
        assert_eq!(
            std::fs::metadata(&spool_path).expect("spool").len(),
            0,
            "emptied at close"
        );

        // Killed with two records spooled and a third half written.
        let (after, mut bytes) = spooled(&spool_path, head, 3, id);
        bytes.truncate(bytes.len() - 10);
        std::fs::write(&spool_path, &bytes).expect("torn");
        let s = Store::open(&c).expect("reopen");
        assert_eq!(s.head().seq, after.seq - 1, "two whole records imported");
        let v = s
            .read(|c| query::verify(c, Some(s.head())))
            .expect("verify");
        assert!(v.ok, "{v:?}");
        let listed = s
            .read(|c| query::sessions(c, &query::SessionFilter::default()))
            .expect("list");
        assert_eq!(listed[0].statements, 2, "listing tables follow the import");
        assert_eq!(std::fs::metadata(&spool_path).expect("spool").len(), 0);
        s.close();
        let head = s.head();
        drop(s);

        // A spool changed by hand is not imported; it is kept aside.
        let (_, mut bytes) = spooled(&spool_path, head, 2, id);
        let at = bytes
            .windows(8)
            .position(|w| w == b"SELECT 1")
            .expect("second");
        bytes[at + 7] = b'9';
        std::fs::write(&spool_path, &bytes).expect("tampered");
        let s = Store::open(&c).expect("reopen");
        assert_eq!(
            s.head().seq,
            head.seq + 1,
            "the record before the change only"
        );
        let kept = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains(".spool.rejected-"));
        assert!(kept, "the rejected spool is kept for inspection");
        s.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statements_wait_for_room_in_a_full_spool_instead_of_being_refused() {
        let dir = tmp("backpressure");
        let mut c = cfg(&dir, Durability::Commit);
        c.queue = 16;
        let s = Store::open(&c).expect("open");
        let mut tasks = Vec::new();
        for t in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..10 {
                    s.append_durable(vec![rec(1, "statement", json!({"t": t, "n": n}))])
                        .await?;
                }
                Ok::<_, StoreError>(())
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("recorded, not refused");
        }
        assert_eq!(s.stats.queue_full.load(Ordering::Relaxed), 0);
        s.flush().await.expect("flush");
        assert_eq!(s.head().seq, 640);
        let v = s
            .read(|c| query::verify(c, Some(s.head())))
            .expect("verify");
        assert!(v.ok, "{v:?}");
        s.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `audit verify` through the daemon compares the chain with the head the daemon had
    /// before flushing; a busy daemon has appended more by the time the chain is read.
    #[tokio::test]
    async fn verify_against_the_daemon_head_accepts_later_records_and_catches_a_cut_or_rewritten_end()
     {
        let dir = tmp("daemon-head");
        let s = Store::open(&cfg(&dir, Durability::Commit)).expect("open");
        let append = |n: i64| {
            let s = s.clone();
            async move {
                s.append_durable(vec![rec(1, "statement", json!({"n": n}))])
                    .await
                    .expect("recorded")
            }
        };
        for n in 0..3 {
            append(n).await;
        }
        let head = s.head();
        for n in 3..5 {
            append(n).await;
        }
        s.flush().await.expect("flush");
        let verify = |h: Head| s.read(|c| query::verify(c, Some(h))).expect("verify");

        let v = verify(head);
        assert!(
            v.ok,
            "records after the daemon's head were written since: {v:?}"
        );
        assert_eq!(v.chain.and_then(|c| c.head_seq), Some(head.seq + 2));
        assert!(verify(s.head()).ok, "the head itself");

        // The store ends before the head: records were cut off the end.
        let ahead = Head {
            seq: s.head().seq + 1,
            hash: s.head().hash,
        };
        let v = verify(ahead);
        assert!(!v.ok);
        assert!(
            v.problem
                .as_deref()
                .unwrap_or("")
                .contains("removed from the end"),
            "{v:?}"
        );
        assert_eq!(v.first_bad_seq, Some(s.head().seq + 1));

        // The record at the head's place is another one: the end was rewritten (a chain that
        // is whole again, with hashes recomputed, fits everything else).
        let mut other = head;
        other.hash[0] ^= 1;
        let v = verify(other);
        assert!(!v.ok);
        assert!(
            v.problem.as_deref().unwrap_or("").contains("rewritten"),
            "{v:?}"
        );
        assert_eq!(v.first_bad_seq, Some(head.seq));
        s.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_full_queue_is_an_error_not_a_wait() {
        let dir = tmp("queue");
        let mut c = cfg(&dir, Durability::Commit);
        c.queue = 16;
        let s = Store::open(&c).expect("open");
        let mut full = false;
        for _ in 0..100_000 {
            if let Err(StoreError::QueueFull(_)) =
                s.append(rec(1, "transcript", json!({"x": "y".repeat(100)})))
            {
                full = true;
                break;
            }
        }
        assert!(full, "a flood fills the queue");
        assert!(s.stats.queue_full.load(Ordering::Relaxed) >= 1);
        s.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
