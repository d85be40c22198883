//! `portcullis replay`: a recorded session as a readable transcript — who, what the agent
//! sent and what was decided, what it received (result tables with their first rows,
//! errors, notices), approvals, and timing.
//!
//! Pure: records in, text out. Fed one record at a time so `--follow` can print as records
//! arrive.

use std::fmt::Write as _;

use serde_json::Value;

use crate::store::query::Record;

/// Rows shown per result (the rest are counted).
pub const SHOWN_ROWS: usize = 20;
/// Widest column shown.
const WIDTH: usize = 40;

#[derive(Default)]
pub struct Replay {
    start_us: Option<i64>,
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
    extra_rows: u64,
    statements: u64,
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// A time field as a clock reading; empty when absent.
fn time_at(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_i64)
        .map(clock)
        .unwrap_or_default()
}

fn cell(v: &Value) -> String {
    let t = match v {
        Value::Null => String::new(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    };
    let t = t.replace('\n', "\\n");
    if t.chars().count() > WIDTH {
        let cut: String = t.chars().take(WIDTH - 1).collect();
        format!("{cut}…")
    } else {
        t
    }
}

/// Longest pause between two records in a timed replay (`--speed`): an agent idle for an
/// hour replays as a few seconds, not an hour.
pub const MAX_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a replay at `speed` (1 = real time) waits between records recorded at
/// `prev_us` and `at_us`, capped at [`MAX_PAUSE`].
pub fn pause(prev_us: i64, at_us: i64, speed: f64) -> std::time::Duration {
    let gap = at_us.saturating_sub(prev_us).max(0) as f64 / 1e6 / speed;
    if gap > 0.0 {
        std::time::Duration::from_secs_f64(gap.min(MAX_PAUSE.as_secs_f64()))
    } else {
        std::time::Duration::ZERO
    }
}

/// `--speed`: a positive, finite factor.
pub fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a speed: give a positive number (1 = real time, 10 = ten times faster)"
        )),
    }
}

/// Local-independent UTC time of day from microseconds since the epoch.
pub fn clock(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let (y, m, d) = crate::utc::civil_from_days(days);
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

impl Replay {
    fn at(&mut self, us: i64) -> String {
        let start = *self.start_us.get_or_insert(us);
        format!("[+{:>8.3}s]", (us - start) as f64 / 1e6)
    }

    fn table(&mut self, out: &mut String, tag: &str, total: u64) {
        if !self.columns.is_empty() {
            let mut widths: Vec<usize> = self.columns.iter().map(|c| c.chars().count()).collect();
            for r in &self.rows {
                for (i, v) in r.iter().enumerate() {
                    if let Some(w) = widths.get_mut(i) {
                        *w = (*w).max(v.chars().count());
                    }
                }
            }
            let line = |vals: &[String]| -> String {
                vals.iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:<w$}"))
                    .collect::<Vec<_>>()
                    .join(" | ")
                    .trim_end()
                    .to_owned()
            };
            let _ = writeln!(out, "              {}", line(&self.columns));
            let _ = writeln!(
                out,
                "              {}",
                widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("-+-")
            );
            for r in &self.rows {
                let _ = writeln!(out, "              {}", line(r));
            }
            if self.extra_rows > 0 {
                let _ = writeln!(out, "              … {} more row(s)", self.extra_rows);
            }
        }
        let _ = writeln!(out, "              ({total} row(s)) {tag}");
        self.columns.clear();
        self.rows.clear();
        self.extra_rows = 0;
    }

    /// The text for one record (possibly empty: rows are shown with their result).
    pub fn feed(&mut self, r: &Record) -> String {
        let mut out = String::new();
        let b = &r.body;
        match r.kind.as_str() {
            // A whole small result in one record: the same as its three parts.
            "result" => {
                let part = |kind: &str, body: Value| Record {
                    kind: kind.to_owned(),
                    body,
                    ..r.clone()
                };
                for p in [
                    part("columns", serde_json::json!({"columns": b.get("columns")})),
                    part("rows", serde_json::json!({"rows": b.get("rows")})),
                    part(
                        "complete",
                        serde_json::json!({"tag": b.get("tag"), "rows": b.get("total")}),
                    ),
                ] {
                    out.push_str(&self.feed(&p));
                }
            }
            "session_start" => {
                self.start_us = Some(r.at_us);
                let _ = writeln!(
                    out,
                    "session {} · agent {} · target {} ({}) · started {}",
                    r.session,
                    s(b, "agent"),
                    s(b, "target"),
                    s(b, "protocol"),
                    clock(r.at_us)
                );
                let _ = writeln!(
                    out,
                    "  process {} (pid {}, uid {}{}) {}{}",
                    s(b, "comm"),
                    s(b, "pid"),
                    s(b, "uid"),
                    b.get("user")
                        .and_then(Value::as_str)
                        .map(|u| format!(" {u}"))
                        .unwrap_or_default(),
                    s(b, "exe"),
                    b.get("unit")
                        .and_then(Value::as_str)
                        .filter(|u| !u.is_empty())
                        .map(|u| format!(" · unit {u}"))
                        .unwrap_or_default()
                );
            }
            "statement" => {
                self.statements += 1;
                let at = self.at(r.at_us);
                let via = s(b, "via");
                let sql = s(b, "sql");
                let shown = if via == "execute" && sql.is_empty() {
                    format!("(execute portal {:?})", s(b, "name"))
                } else if via == "execute" {
                    format!("(execute) {sql}")
                } else if via == "function_call" {
                    "(function-call message)".into()
                } else {
                    sql
                };
                let _ = writeln!(out, "{at} > {}", shown.trim());
                let verdict = s(b, "verdict");
                if !verdict.is_empty() && via != "execute" {
                    match b.get("refused").and_then(Value::as_str) {
                        Some(m) => {
                            let _ =
                                writeln!(out, "              DENIED by rule {}: {m}", s(b, "rule"));
                        }
                        None => {
                            let masks = b
                                .get("masks")
                                .and_then(Value::as_array)
                                .filter(|m| !m.is_empty())
                                .map(|m| {
                                    format!(
                                        " · masks {}",
                                        m.iter().map(cell).collect::<Vec<_>>().join(", ")
                                    )
                                })
                                .unwrap_or_default();
                            let _ = writeln!(
                                out,
                                "              {verdict} (rule {}){masks}",
                                s(b, "rule")
                            );
                        }
                    }
                }
            }
            "columns" => {
                self.columns = b
                    .get("columns")
                    .and_then(Value::as_array)
                    .map(|c| c.iter().map(cell).collect())
                    .unwrap_or_default();
                self.rows.clear();
                self.extra_rows = 0;
            }
            "rows" => {
                for row in b
                    .get("rows")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if self.rows.len() < SHOWN_ROWS {
                        self.rows.push(
                            row.as_array()
                                .map(|v| v.iter().map(cell).collect())
                                .unwrap_or_default(),
                        );
                    } else {
                        self.extra_rows += 1;
                    }
                }
            }
            "complete" => {
                let total = b.get("rows").and_then(Value::as_u64).unwrap_or(0);
                self.table(&mut out, &s(b, "tag"), total);
            }
            "error" | "notice" => {
                if !self.columns.is_empty() || !self.rows.is_empty() {
                    self.table(&mut out, "(interrupted)", self.rows.len() as u64);
                }
                let _ = writeln!(
                    out,
                    "              {} {}: {}",
                    s(b, "severity"),
                    s(b, "code"),
                    s(b, "message")
                );
                let d = s(b, "detail");
                if !d.is_empty() {
                    let _ = writeln!(out, "              DETAIL: {d}");
                }
            }
            "approval_requested" => {
                let at = self.at(r.at_us);
                let _ = writeln!(
                    out,
                    "{at}   held for approval: request {} (rule {}), expires {}",
                    s(b, "id"),
                    s(b, "rule"),
                    time_at(b, "expires_us")
                );
            }
            "approval_decided" => {
                let at = self.at(r.at_us);
                let by = b
                    .get("by")
                    .and_then(Value::as_str)
                    .map(|x| format!(" by {x}"))
                    .unwrap_or_default();
                let why = b
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{at}   request {} {}{by}{why}",
                    s(b, "id"),
                    s(b, "outcome")
                );
            }
            "grant_created" => {
                let _ = writeln!(
                    out,
                    "              grant {} for rule {} until {}",
                    s(b, "id"),
                    s(b, "rule"),
                    time_at(b, "expires_us")
                );
            }
            "grant_used" => {
                let at = self.at(r.at_us);
                let _ = writeln!(
                    out,
                    "{at}   approved by grant {} (given by {})",
                    s(b, "grant"),
                    s(b, "by")
                );
            }
            "identity" => {
                let o = b.get("oidc").unwrap_or(&Value::Null);
                let groups = o
                    .get("groups")
                    .and_then(Value::as_array)
                    .map(|g| {
                        g.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  token of {} from {}{} · groups [{groups}]",
                    s(o, "sub"),
                    s(o, "issuer"),
                    o.get("email")
                        .and_then(Value::as_str)
                        .map(|e| format!(" <{e}>"))
                        .unwrap_or_default(),
                );
            }
            "cut" => {
                let _ = writeln!(
                    out,
                    "              -- transcript cut here: {} --",
                    s(b, "reason")
                );
            }
            "session_end" => {
                let at = self.at(r.at_us);
                let err = s(b, "error");
                let _ = writeln!(
                    out,
                    "{at} session ended: {}{} · {} statement(s) · {} bytes up, {} down",
                    s(b, "end"),
                    if err.is_empty() {
                        String::new()
                    } else {
                        format!(" ({err})")
                    },
                    self.statements,
                    s(b, "bytes_up"),
                    s(b, "bytes_down")
                );
            }
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn timed_replay_pauses_scale_and_are_capped() {
        use std::time::Duration;
        assert_eq!(pause(0, 2_000_000, 1.0), Duration::from_secs(2));
        assert_eq!(pause(0, 2_000_000, 4.0), Duration::from_millis(500));
        assert_eq!(pause(0, 3_600_000_000, 1.0), MAX_PAUSE);
        assert_eq!(
            pause(5_000_000, 1_000_000, 1.0),
            Duration::ZERO,
            "clock went back"
        );
        assert_eq!(pause(i64::MIN, i64::MAX, 1e-300), MAX_PAUSE);
        assert_eq!(parse_speed("2.5"), Ok(2.5));
        for bad in ["0", "-1", "NaN", "inf", "fast", ""] {
            assert!(parse_speed(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn rec(seq: i64, at: i64, kind: &str, body: Value) -> Record {
        Record {
            seq,
            at_us: at,
            session: 1,
            kind: kind.into(),
            body,
            hash: String::new(),
        }
    }

    #[test]
    fn a_session_reads_like_a_terminal() {
        let recs = [
            rec(
                1,
                0,
                "session_start",
                json!({"agent": "bot", "target": "shop", "protocol": "postgres", "pid": 7, "uid": 1001, "comm": "psql", "exe": "/usr/bin/psql"}),
            ),
            rec(
                2,
                1_000,
                "statement",
                json!({"n": 1, "via": "query", "sql": "SELECT id, email FROM users", "verdict": "mask", "rule": "mask-pii", "masks": ["mask-pii"]}),
            ),
            rec(3, 2_000, "columns", json!({"columns": ["id", "email"]})),
            rec(
                4,
                2_000,
                "rows",
                json!({"rows": [["1", "[REDACTED:email]"], ["2", null]]}),
            ),
            rec(5, 3_000, "complete", json!({"tag": "SELECT 2", "rows": 2})),
            rec(
                6,
                4_000,
                "statement",
                json!({"n": 2, "via": "query", "sql": "DROP TABLE users", "verdict": "deny", "rule": "no-drop", "refused": "no dropping"}),
            ),
            rec(
                7,
                5_000,
                "error",
                json!({"severity": "ERROR", "code": "42501", "message": "portcullis: no dropping"}),
            ),
            rec(
                8,
                1_500_000,
                "session_end",
                json!({"end": "closed", "bytes_up": 10, "bytes_down": 20}),
            ),
        ];
        let mut r = Replay::default();
        let text: String = recs.iter().map(|x| r.feed(x)).collect();
        let id = rec(
            9,
            0,
            "identity",
            json!({"oidc": {"issuer": "https://idp", "sub": "svc-1", "email": "s@x", "groups": ["a", "b"]}}),
        );
        assert_eq!(
            Replay::default().feed(&id),
            "  token of svc-1 from https://idp <s@x> · groups [a, b]\n"
        );
        assert!(
            text.contains("session 1 · agent bot · target shop (postgres)"),
            "{text}"
        );
        assert!(text.contains("> SELECT id, email FROM users"));
        assert!(text.contains("mask (rule mask-pii) · masks mask-pii"));
        assert!(text.contains("1  | [REDACTED:email]"), "{text}");
        assert!(text.contains("(2 row(s)) SELECT 2"));
        assert!(text.contains("DENIED by rule no-drop: no dropping"));
        assert!(text.contains("ERROR 42501: portcullis: no dropping"));
        assert!(
            text.contains("[+   1.500s] session ended: closed · 2 statement(s)"),
            "{text}"
        );
    }

    #[test]
    fn clock_is_utc() {
        assert_eq!(clock(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(clock(1_764_000_000_000_000), "2025-11-24 16:00:00 UTC");
    }
}
