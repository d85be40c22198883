//! Reads: session listings, a session's records, verification and export. Blocking (SQLite):
//! callers run them on a blocking thread.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Head, StoreError,
    chain::{self, Break, Row, Start, Verified},
};

/// One line of `portcullis sessions`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionSummary {
    pub id: i64,
    pub started_us: i64,
    pub ended_us: Option<i64>,
    pub agent: String,
    pub target: String,
    pub protocol: String,
    pub uid: Option<i64>,
    pub user: Option<String>,
    pub pid: Option<i64>,
    pub exe: Option<String>,
    pub end_reason: Option<String>,
    pub statements: i64,
    pub allowed: i64,
    pub masked: i64,
    pub denied: i64,
    pub held: i64,
    /// The `sub` of the OIDC token the session presented.
    #[serde(default)]
    pub oidc_sub: Option<String>,
}

/// Filters of `portcullis sessions`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SessionFilter {
    pub agent: Option<String>,
    pub target: Option<String>,
    pub since_us: Option<i64>,
    /// Sessions with at least one statement of this verdict.
    pub decision: Option<String>,
    /// Sessions whose OIDC token had this subject.
    #[serde(default)]
    pub sub: Option<String>,
    pub limit: Option<u32>,
}

/// The columns [`summary`] reads, in its order.
const SUMMARY_COLUMNS: &str = "id, started_us, ended_us, agent, target, protocol, uid, user, \
    pid, exe, end_reason, statements, allowed, masked, denied, held, oidc_sub";

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionSummary> {
    Ok(SessionSummary {
        id: r.get(0)?,
        started_us: r.get(1)?,
        ended_us: r.get(2)?,
        agent: r.get(3)?,
        target: r.get(4)?,
        protocol: r.get(5)?,
        uid: r.get(6)?,
        user: r.get(7)?,
        pid: r.get(8)?,
        exe: r.get(9)?,
        end_reason: r.get(10)?,
        statements: r.get(11)?,
        allowed: r.get(12)?,
        masked: r.get(13)?,
        denied: r.get(14)?,
        held: r.get(15)?,
        oidc_sub: r.get(16)?,
    })
}

pub fn sessions(c: &Connection, f: &SessionFilter) -> Result<Vec<SessionSummary>, StoreError> {
    let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM sessions WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(a) = &f.agent {
        args.push(a.clone().into());
        sql.push_str(&format!(" AND agent = ?{}", args.len()));
    }
    if let Some(t) = &f.target {
        args.push(t.clone().into());
        sql.push_str(&format!(" AND target = ?{}", args.len()));
    }
    if let Some(s) = &f.sub {
        args.push(s.clone().into());
        sql.push_str(&format!(" AND oidc_sub = ?{}", args.len()));
    }
    if let Some(s) = f.since_us {
        args.push(s.into());
        sql.push_str(&format!(
            " AND coalesce(ended_us, 9223372036854775807) >= ?{}",
            args.len()
        ));
    }
    match f.decision.as_deref() {
        None => {}
        Some("allow") => sql.push_str(" AND allowed > 0"),
        Some("mask") => sql.push_str(" AND masked > 0"),
        Some("deny") => sql.push_str(" AND denied > 0"),
        Some("require_approval") => sql.push_str(" AND held > 0"),
        Some(other) => {
            return Err(StoreError::Query(format!(
                "unknown decision `{other}`; one of allow, mask, deny, require_approval"
            )));
        }
    }
    sql.push_str(&format!(
        " ORDER BY id DESC LIMIT {}",
        f.limit.unwrap_or(100).min(10_000)
    ));
    let mut st = c.prepare(&sql)?;
    let rows = st
        .query_map(rusqlite::params_from_iter(args), summary)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// A record for export and replay.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub seq: i64,
    pub at_us: i64,
    pub session: i64,
    pub kind: String,
    pub body: Value,
    pub hash: String,
}

fn to_record(r: Row) -> Record {
    Record {
        seq: r.seq,
        at_us: r.at_us,
        session: r.session,
        kind: r.kind,
        body: serde_json::from_str(&r.body).unwrap_or(Value::String(r.body)),
        hash: chain::hex(&r.hash),
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        seq: r.get(0)?,
        at_us: r.get(1)?,
        session: r.get(2)?,
        kind: r.get(3)?,
        body: r.get(4)?,
        hash: r.get(5)?,
    })
}

/// A session's records after `after_seq`, in order.
pub fn session_records(
    c: &Connection,
    session: i64,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<Record>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT seq, at_us, session, kind, body, hash FROM records WHERE session = ?1 AND seq > ?2 \
         ORDER BY seq LIMIT ?3",
    )?;
    let rows = st
        .query_map(params![session, after_seq, limit], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows.into_iter().map(to_record).collect())
}

pub fn session(c: &Connection, id: i64) -> Result<Option<SessionSummary>, StoreError> {
    let mut all = sessions(c, &SessionFilter::default())?;
    // The listing is bounded; look the one session up directly when it is older.
    if let Some(i) = all.iter().position(|s| s.id == id) {
        return Ok(Some(all.swap_remove(i)));
    }
    let mut st = c.prepare(&format!(
        "SELECT {SUMMARY_COLUMNS} FROM sessions WHERE id = ?1"
    ))?;
    let mut rows = st.query_map(params![id], summary)?;
    Ok(rows.next().transpose()?)
}

/// Records written at or after `since_us`, for `audit export`.
pub fn export(
    c: &Connection,
    since_us: i64,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<Record>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT seq, at_us, session, kind, body, hash FROM records WHERE at_us >= ?1 AND seq > ?2 \
         ORDER BY seq LIMIT ?3",
    )?;
    let rows = st
        .query_map(params![since_us, after_seq, limit], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows.into_iter().map(to_record).collect())
}

/// The result of `audit verify`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verification {
    pub ok: bool,
    #[serde(flatten)]
    pub chain: Option<Verified>,
    pub problem: Option<String>,
    /// The sequence number of the first record that does not fit.
    pub first_bad_seq: Option<i64>,
}

/// Verifies the whole chain from its anchor; `daemon_head`, when the daemon is running,
/// also catches records removed from the end or a rewritten end. It is the head the
/// daemon had when it asked the store to flush, so the store holds at least that much:
/// records after it are ones written since (a busy daemon keeps appending while the
/// chain is read), and the record at its sequence number must carry its hash.
pub fn verify(c: &Connection, daemon_head: Option<Head>) -> Result<Verification, StoreError> {
    let anchor: Option<(i64, Vec<u8>)> = c
        .query_row("SELECT seq, prev_hash FROM anchor WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .ok();
    let start = match &anchor {
        Some((seq, prev)) => Start {
            seq: *seq,
            prev: prev.clone().try_into().unwrap_or([0; 32]),
        },
        None => Start::default(),
    };
    let mut st =
        c.prepare("SELECT seq, at_us, session, kind, body, hash FROM records ORDER BY seq")?;
    let mut last_prune: Option<Value> = None;
    // The stored hash of the daemon's head record; checked against the chain by the walk.
    let mut at_daemon_head: Option<Vec<u8>> = None;
    let daemon_seq = daemon_head.map(|h| h.seq);
    let rows = st.query_map([], row)?.filter_map(|r| {
        let r = r.ok()?;
        if r.kind == "prune" {
            last_prune = serde_json::from_str(&r.body).ok();
        }
        if Some(r.seq) == daemon_seq {
            at_daemon_head = Some(r.hash.clone());
        }
        Some(r)
    });
    let result = chain::verify(start, rows);
    let bad = |problem: String, seq: Option<i64>| Verification {
        ok: false,
        chain: None,
        problem: Some(problem),
        first_bad_seq: seq,
    };
    let v = match result {
        Err(b) => {
            let seq = match &b {
                Break::Sequence { expected, .. } => *expected,
                Break::Hash { seq } => *seq,
            };
            return Ok(bad(b.to_string(), Some(seq)));
        }
        Ok(v) => v,
    };
    // An anchor must be the one the last prune recorded, or records were cut off the start.
    if let Some((seq, prev)) = &anchor {
        let ok = last_prune.as_ref().is_some_and(|p| {
            p.get("first_seq").and_then(Value::as_i64) == Some(*seq)
                && p.get("anchor_hash").and_then(Value::as_str) == Some(chain::hex(prev).as_str())
        });
        if !ok {
            return Ok(bad(
                format!(
                    "the chain starts at record {seq}, but no prune record says so: records \
                     were removed from the start"
                ),
                Some(*seq),
            ));
        }
    }
    if let Some(h) = daemon_head
        && h.seq > 0
        && let Some((problem, seq)) = daemon_head_problem(&h, &v, at_daemon_head.as_deref())
    {
        return Ok(bad(problem, Some(seq)));
    }
    Ok(Verification {
        ok: true,
        chain: Some(v),
        problem: None,
        first_bad_seq: None,
    })
}

/// What is wrong with the end of a clean chain, measured against the daemon's head (the
/// problem and the first record that does not fit), or `None`. `stored` is the hash the
/// store holds for the head's sequence number (already checked against the chain).
fn daemon_head_problem(h: &Head, v: &Verified, stored: Option<&[u8]>) -> Option<(String, i64)> {
    match v.head_seq {
        Some(end) if end >= h.seq => {}
        end => {
            return Some((
                format!(
                    "the daemon's last record is {} but the store ends at {}: records were \
                     removed from the end",
                    h.seq,
                    end.map_or("nothing".into(), |s| s.to_string())
                ),
                end.map_or(h.seq, |s| s + 1),
            ));
        }
    }
    match stored {
        // Pruned since the daemon named it (the chain now starts after it): nothing to compare.
        None if v.first_seq > h.seq => None,
        Some(stored) if stored == h.hash => None,
        _ => Some((
            format!(
                "record {} is not the one the daemon wrote (its hash differs from the \
                 daemon's): the end of the chain was rewritten",
                h.seq
            ),
            h.seq,
        )),
    }
}

/// Approvals and grants as the store has them (the live ones are the daemon's).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApprovalRow {
    pub id: String,
    pub session: i64,
    pub created_us: i64,
    pub expires_us: i64,
    pub agent: String,
    pub target: String,
    pub uid: i64,
    pub rule: String,
    pub statement: String,
    pub state: String,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
}

pub fn approvals(c: &Connection, limit: u32) -> Result<Vec<ApprovalRow>, StoreError> {
    let mut st = c.prepare(
        "SELECT id, session, created_us, expires_us, agent, target, uid, rule, statement, state, \
         decided_by, reason FROM approvals ORDER BY created_us DESC LIMIT ?1",
    )?;
    let rows = st
        .query_map(params![limit], |r| {
            Ok(ApprovalRow {
                id: r.get(0)?,
                session: r.get(1)?,
                created_us: r.get(2)?,
                expires_us: r.get(3)?,
                agent: r.get(4)?,
                target: r.get(5)?,
                uid: r.get(6)?,
                rule: r.get(7)?,
                statement: r.get(8)?,
                state: r.get(9)?,
                decided_by: r.get(10)?,
                reason: r.get(11)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}
