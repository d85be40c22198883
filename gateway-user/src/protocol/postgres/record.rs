//! The session transcript: what the client received, after masking — result columns and
//! rows, command tags, errors and notices — as audit records for `portcullis replay`.
//! (What it sent is recorded as statements, before they are forwarded.)
//!
//! Bounded per session (`[store] recording_limit` bytes of record bodies): past the limit
//! one `cut` record marks where the transcript stops; statements are still recorded. A
//! full store queue also cuts the transcript rather than wait. Rows are recorded in chunks
//! so no record grows with the size of a result.
//!
//! Rows are written as JSON text as they arrive (no per-value `Value`s): a transcript is
//! kept for every result of every session, so this is on the path of every statement.

use std::{borrow::Cow, sync::Arc};

use serde::Serialize;

use super::messages::{self, be};
use crate::store::{Append, Json, Store, now_us};

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
    transcript: Transcript,
}

/// Turns what a client receives into transcript records (pure: the [`Recorder`] stores
/// them).
#[derive(Default)]
struct Transcript {
    /// Column names of the current result, not recorded yet: a small result becomes one
    /// `result` record (columns, rows, tag) instead of three.
    columns: Option<Vec<String>>,
    /// The rows buffered, as JSON arrays separated by commas.
    rows: Vec<u8>,
    buffered: usize,
    total: u64,
}

type Records = Vec<(&'static str, Json)>;

/// How a value is shown in a transcript: text as it is (shortened past [`MAX_VALUE`]),
/// binary results or text with control bytes as hex, like bytea.
fn text(v: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(v) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => {
            if s.len() > MAX_VALUE {
                let mut end = MAX_VALUE;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                Cow::Owned(format!("{}… ({} bytes)", &s[..end], s.len()))
            } else {
                Cow::Borrowed(s)
            }
        }
        _ => {
            let shown = crate::digest::hex(&v[..v.len().min(MAX_VALUE / 2)]);
            Cow::Owned(if v.len() > MAX_VALUE / 2 {
                format!("\\x{shown}… ({} bytes)", v.len())
            } else {
                format!("\\x{shown}")
            })
        }
    }
}

/// Appends `v` as JSON to `out`. Writing to a vector cannot fail, and the types recorded
/// here always serialize.
fn put<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let _ = serde_json::to_writer(out, v);
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
            transcript: Transcript::default(),
        }
    }

    /// A message the client receives (already masked).
    pub fn observe(&mut self, tag: u8, body: &[u8]) {
        if self.cut {
            return;
        }
        let mut records = Records::new();
        self.transcript.observe(tag, body, &mut records);
        for (kind, body) in records {
            self.emit(kind, body);
        }
    }

    fn emit(&mut self, kind: &'static str, body: Json) {
        if self.cut {
            return;
        }
        let size = body.len();
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
        #[derive(Serialize)]
        struct Cut {
            reason: String,
            recorded_bytes: usize,
        }
        self.cut = true;
        // Best effort: the marker itself may not fit a full queue.
        let _ = self.store.append(Append {
            session: self.session,
            kind: "cut",
            body: Json::of(&Cut {
                reason: why,
                recorded_bytes: self.used,
            }),
            at_us: now_us(),
        });
    }
}

impl Transcript {
    /// The buffered rows as a JSON array (emptying the buffer).
    fn take_rows(&mut self, out: &mut Vec<u8>) {
        out.push(b'[');
        out.append(&mut self.rows);
        out.push(b']');
        self.buffered = 0;
    }

    /// What is buffered: the columns (if not yet), then the rows.
    fn flush_rows(&mut self, out: &mut Records) {
        if let Some(columns) = self.columns.take() {
            #[derive(Serialize)]
            struct Columns {
                columns: Vec<String>,
            }
            out.push(("columns", Json::of(&Columns { columns })));
        }
        if self.buffered == 0 {
            return;
        }
        let mut body = b"{\"rows\":".to_vec();
        self.take_rows(&mut body);
        body.push(b'}');
        out.push(("rows", Json::assembled(body)));
    }

    /// Buffers one row of values (`None` is NULL).
    fn push_row<'a>(
        &mut self,
        values: impl IntoIterator<Item = Option<&'a [u8]>>,
        out: &mut Records,
    ) {
        if self.buffered > 0 {
            self.rows.push(b',');
        }
        self.rows.push(b'[');
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.rows.push(b',');
            }
            match v {
                Some(v) => put(&mut self.rows, text(v).as_ref()),
                None => self.rows.extend_from_slice(b"null"),
            }
        }
        self.rows.push(b']');
        self.buffered += 1;
        self.total += 1;
        if self.buffered >= CHUNK {
            self.flush_rows(out);
        }
    }

    fn observe(&mut self, tag: u8, body: &[u8], out: &mut Records) {
        match tag {
            be::ROW_DESCRIPTION => {
                self.flush_rows(out);
                self.columns = Some(
                    messages::row_description(body)
                        .map(|f| f.into_iter().map(|c| c.name).collect())
                        .unwrap_or_default(),
                );
                self.total = 0;
            }
            be::DATA_ROW => {
                if let Ok(vals) = messages::data_row(body) {
                    self.push_row(vals, out);
                }
            }
            be::COPY_DATA => self.push_row([Some(body)], out),
            be::COMMAND_COMPLETE => {
                let tag = messages::command_tag(body).unwrap_or_default();
                match self.columns.take() {
                    // The whole result is still buffered: one record.
                    Some(columns) => {
                        let mut b = b"{\"columns\":".to_vec();
                        put(&mut b, &columns);
                        b.extend_from_slice(b",\"rows\":");
                        self.take_rows(&mut b);
                        b.extend_from_slice(b",\"tag\":");
                        put(&mut b, tag);
                        b.extend_from_slice(b",\"total\":");
                        put(&mut b, &self.total);
                        b.push(b'}');
                        out.push(("result", Json::assembled(b)));
                    }
                    None => {
                        self.flush_rows(out);
                        out.push(("complete", complete(tag, self.total)));
                    }
                }
                self.total = 0;
            }
            be::EMPTY_QUERY => {
                self.flush_rows(out);
                out.push(("complete", complete("", 0)));
            }
            be::ERROR_RESPONSE | be::NOTICE_RESPONSE => {
                #[derive(Serialize)]
                struct Report<'a> {
                    code: Option<&'a str>,
                    detail: Option<&'a str>,
                    message: Option<&'a str>,
                    severity: Option<&'a str>,
                }
                self.flush_rows(out);
                let f = messages::error_fields(body).unwrap_or_default();
                let get = |c: u8| f.iter().find(|(k, _)| *k == c).map(|(_, v)| v.as_str());
                let report = Json::of(&Report {
                    code: get(b'C'),
                    detail: get(b'D'),
                    message: get(b'M'),
                    severity: get(b'S'),
                });
                let kind = if tag == be::ERROR_RESPONSE {
                    "error"
                } else {
                    "notice"
                };
                out.push((kind, report));
            }
            _ => {}
        }
    }
}

fn complete(tag: &str, rows: u64) -> Json {
    #[derive(Serialize)]
    struct Complete<'a> {
        rows: u64,
        tag: &'a str,
    }
    Json::of(&Complete { rows, tag })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn row_description(names: &[&str]) -> Vec<u8> {
        let mut b = (names.len() as i16).to_be_bytes().to_vec();
        for n in names {
            b.extend_from_slice(n.as_bytes());
            b.push(0);
            b.extend_from_slice(&[0; 18]);
        }
        b
    }

    fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        messages::encode_data_row(values.iter().copied())
            .body
            .to_vec()
    }

    fn complete_body(tag: &str) -> Vec<u8> {
        let mut b = tag.as_bytes().to_vec();
        b.push(0);
        b
    }

    /// Each record's kind and body; the text must be what serde_json makes of the value.
    fn parsed(records: Records) -> Vec<(&'static str, Value)> {
        records
            .into_iter()
            .map(|(k, j)| {
                let v: Value = serde_json::from_str(j.as_str()).expect("JSON");
                assert_eq!(j.as_str(), v.to_string(), "compact, keys in order");
                (k, v)
            })
            .collect()
    }

    #[test]
    fn a_small_result_is_one_record() {
        let mut t = Transcript::default();
        let mut out = Records::new();
        t.observe(
            be::ROW_DESCRIPTION,
            &row_description(&["id", "email"]),
            &mut out,
        );
        t.observe(
            be::DATA_ROW,
            &data_row(&[Some(b"1"), Some(b"a\"b\nc\\")]),
            &mut out,
        );
        t.observe(be::DATA_ROW, &data_row(&[None, Some(&[0, 42])]), &mut out);
        assert!(out.is_empty(), "buffered until the result ends");
        t.observe(be::COMMAND_COMPLETE, &complete_body("SELECT 2"), &mut out);
        assert_eq!(
            parsed(out),
            vec![(
                "result",
                json!({"columns": ["id", "email"], "rows": [["1", "a\"b\nc\\"], [null, "\\x002a"]], "tag": "SELECT 2", "total": 2})
            )]
        );
    }

    #[test]
    fn a_long_result_is_recorded_in_chunks() {
        let mut t = Transcript::default();
        let mut out = Records::new();
        t.observe(be::ROW_DESCRIPTION, &row_description(&["n"]), &mut out);
        for n in 0..250 {
            t.observe(
                be::DATA_ROW,
                &data_row(&[Some(n.to_string().as_bytes())]),
                &mut out,
            );
        }
        t.observe(be::COMMAND_COMPLETE, &complete_body("SELECT 250"), &mut out);
        let records = parsed(out);
        let kinds: Vec<&str> = records.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, ["columns", "rows", "rows", "rows", "complete"]);
        assert_eq!(records[0].1, json!({"columns": ["n"]}));
        let rows: Vec<Value> = records[1..4]
            .iter()
            .flat_map(|(_, v)| v["rows"].as_array().expect("rows").clone())
            .collect();
        let expected: Vec<Value> = (0..250).map(|n| json!([n.to_string()])).collect();
        assert_eq!(rows, expected);
        assert_eq!(records[4].1, json!({"rows": 250, "tag": "SELECT 250"}));
    }

    #[test]
    fn errors_copy_data_and_empty_queries() {
        let mut t = Transcript::default();
        let mut out = Records::new();
        let mut err = Vec::new();
        for (c, v) in [(b'S', "ERROR"), (b'C', "42501"), (b'M', "no \"access\"")] {
            err.push(c);
            err.extend_from_slice(v.as_bytes());
            err.push(0);
        }
        err.push(0);
        t.observe(be::ERROR_RESPONSE, &err, &mut out);
        t.observe(be::COPY_DATA, b"1\talice\n", &mut out);
        t.observe(be::COMMAND_COMPLETE, &complete_body("COPY 1"), &mut out);
        t.observe(be::EMPTY_QUERY, b"", &mut out);
        assert_eq!(
            parsed(out),
            vec![
                (
                    "error",
                    json!({"code": "42501", "detail": null, "message": "no \"access\"", "severity": "ERROR"})
                ),
                ("rows", json!({"rows": [["1\talice\n"]]})),
                ("complete", json!({"rows": 1, "tag": "COPY 1"})),
                ("complete", json!({"rows": 0, "tag": ""})),
            ]
        );
    }

    #[test]
    fn values_are_readable() {
        assert_eq!(text(b"alice"), "alice");
        assert_eq!(text(&[0, 0, 0, 42]), "\\x0000002a");
        let long = "x".repeat(1000);
        assert!(text(long.as_bytes()).ends_with("(1000 bytes)"));
    }
}
