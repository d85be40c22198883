//! The session transcript: what the client received, after masking — result columns and
//! rows, command tags, errors and notices — as audit records for `portcullis replay`.
//! (What it sent is recorded as statements, before they are forwarded.)
//!
//! Bounded per session (`[store] recording_limit` bytes of record bodies): past the limit
//! one `cut` record marks where the transcript stops; statements are still recorded. A
//! full store queue also cuts the transcript rather than wait. Rows are recorded in chunks
//! so no record grows with the size of a result.

use std::sync::Arc;

use serde_json::{Value, json};

use super::messages::{self, be};
use crate::store::{Append, Store, now_us};

/// Rows per `rows` record.
const CHUNK: usize = 100;
/// Longest value kept in a transcript (longer ones are shortened, with their length).
const MAX_VALUE: usize = 256;

pub struct Recorder {
    store: Arc<Store>,
    session: i64,
    limit: usize,
    used: usize,
    cut: bool,
    /// Column names of the current result, not recorded yet: a small result becomes one
    /// `result` record (columns, rows, tag) instead of three.
    columns: Option<Vec<String>>,
    rows: Vec<Value>,
    total: u64,
}

fn text(v: &[u8]) -> Value {
    match std::str::from_utf8(v) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => {
            if s.len() > MAX_VALUE {
                let mut end = MAX_VALUE;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                Value::String(format!("{}… ({} bytes)", &s[..end], s.len()))
            } else {
                Value::String(s.to_owned())
            }
        }
        // Binary results (or control bytes): shown as hex, like bytea.
        _ => {
            let shown: String = v
                .iter()
                .take(MAX_VALUE / 2)
                .map(|b| format!("{b:02x}"))
                .collect();
            Value::String(if v.len() > MAX_VALUE / 2 {
                format!("\\x{shown}… ({} bytes)", v.len())
            } else {
                format!("\\x{shown}")
            })
        }
    }
}

/// The length of a value's JSON text, without building the text (the store serializes it
/// again when it seals the record).
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing to a counter cannot fail, and a Value always serializes.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

impl Recorder {
    pub fn new(store: Arc<Store>, session: i64) -> Self {
        let limit = store.config().recording_limit;
        Self {
            store,
            session,
            limit,
            used: 0,
            cut: false,
            columns: None,
            rows: Vec::new(),
            total: 0,
        }
    }

    fn emit(&mut self, kind: &'static str, body: Value) {
        if self.cut {
            return;
        }
        let size = json_len(&body);
        if self.used + size > self.limit {
            self.cut(format!("recording limit of {} bytes reached", self.limit));
            return;
        }
        self.used += size;
        if let Err(e) = self.store.append(Append {
            session: self.session,
            kind,
            body,
            at_us: now_us(),
        }) {
            self.cut(e.to_string());
        }
    }

    fn cut(&mut self, why: String) {
        self.cut = true;
        // Best effort: the marker itself may not fit a full queue.
        let _ = self.store.append(Append {
            session: self.session,
            kind: "cut",
            body: json!({"reason": why, "recorded_bytes": self.used}),
            at_us: now_us(),
        });
    }

    /// Records what is buffered: the columns (if not yet), then the rows.
    fn flush_rows(&mut self) {
        if let Some(columns) = self.columns.take() {
            self.emit("columns", json!({"columns": columns}));
        }
        if self.rows.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.rows);
        self.emit("rows", json!({"rows": rows}));
    }

    /// A message the client receives (already masked).
    pub fn observe(&mut self, tag: u8, body: &[u8]) {
        if self.cut {
            return;
        }
        match tag {
            be::ROW_DESCRIPTION => {
                self.flush_rows();
                self.columns = Some(
                    messages::row_description(body)
                        .map(|f| f.into_iter().map(|c| c.name).collect())
                        .unwrap_or_default(),
                );
                self.total = 0;
            }
            be::DATA_ROW => {
                if let Ok(vals) = messages::data_row(body) {
                    self.rows.push(Value::Array(
                        vals.into_iter()
                            .map(|v| v.map_or(Value::Null, text))
                            .collect(),
                    ));
                    self.total += 1;
                    if self.rows.len() >= CHUNK {
                        self.flush_rows();
                    }
                }
            }
            be::COPY_DATA => {
                self.rows.push(json!([text(body)]));
                self.total += 1;
                if self.rows.len() >= CHUNK {
                    self.flush_rows();
                }
            }
            be::COMMAND_COMPLETE => {
                let tag = messages::command_tag(body).unwrap_or_default().to_owned();
                match self.columns.take() {
                    // The whole result is still buffered: one record.
                    Some(columns) => {
                        let rows = std::mem::take(&mut self.rows);
                        self.emit(
                            "result",
                            json!({"columns": columns, "rows": rows, "tag": tag, "total": self.total}),
                        );
                    }
                    None => {
                        self.flush_rows();
                        self.emit("complete", json!({"tag": tag, "rows": self.total}));
                    }
                }
                self.total = 0;
            }
            be::EMPTY_QUERY => {
                self.flush_rows();
                self.emit("complete", json!({"tag": "", "rows": 0}));
            }
            be::ERROR_RESPONSE | be::NOTICE_RESPONSE => {
                self.flush_rows();
                let f = messages::error_fields(body).unwrap_or_default();
                let get = |c: u8| f.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone());
                self.emit(
                    if tag == be::ERROR_RESPONSE {
                        "error"
                    } else {
                        "notice"
                    },
                    json!({
                        "severity": get(b'S'),
                        "code": get(b'C'),
                        "message": get(b'M'),
                        "detail": get(b'D'),
                    }),
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_is_the_length_of_the_text() {
        let v = json!({"rows": [["a\"b", null, "é"]], "tag": "SELECT 1", "total": 1});
        assert_eq!(json_len(&v), v.to_string().len());
    }

    #[test]
    fn values_are_readable() {
        assert_eq!(text(b"alice"), json!("alice"));
        assert_eq!(text(&[0, 0, 0, 42]), json!("\\x0000002a"));
        let long = "x".repeat(1000);
        assert!(
            text(long.as_bytes())
                .as_str()
                .is_some_and(|s| s.ends_with("(1000 bytes)"))
        );
    }
}
