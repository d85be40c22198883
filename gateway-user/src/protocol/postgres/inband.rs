//! Catalog questions asked on the session's own server connection, for a target without
//! `credentials` (Portcullis has no connection of its own to ask on).
//!
//! Masking and the copy check need to know what the relations a statement names are (a
//! view is traced to the tables under it) and which table OIDs results will name, and
//! masking what the database's own types in its results are in binary format. Nothing
//! can be asked while results stream, so the session engine asks before it forwards the
//! statement, and only where the client's stream leaves room ([`Gap`]): between its
//! requests (after a Sync, a simple query or a function call), or inside a batch right
//! after a Flush (as asyncpg prepares), where a Sync of the gate's would not close
//! anything of the client's; and only once every answer to what was forwarded before has
//! passed back. It then sends a batch of its own and keeps the answer (never relayed).
//! What the client has on the server is left as it was:
//! - its unnamed statement and portal: the batch uses a statement and a portal named
//!   [`NAME`], closed before it ends (and closed first, in case an earlier batch failed
//!   before its closes);
//! - its transaction: outside a transaction block (status `I`) the batch runs in an
//!   implicit transaction of its own; inside one (`T`) within a savepoint, released after;
//!   a lookup that fails there (a `statement_timeout`, a cancel, a relation dropped
//!   meanwhile) is rolled back to the savepoint, so the block goes on as though nothing had
//!   run. In a failed block (`E`) nothing is asked;
//! - its search path: the query names every relation, function and operator with its
//!   schema ([`super::catalog::lookup_sql`]), so nothing the session created stands in.
//!
//! The server does see the query: in its log and in `pg_stat_activity`, under the client's
//! role, which needs no privilege beyond what every role has (`pg_catalog` is readable by
//! all).
//!
//! Pure: the batches and the collection of the answer; the session engine does the I/O.

use bytes::BytesMut;

use super::{
    catalog::{Row, error_message},
    codec::Frame,
    messages::{self, be},
};

/// Where the client's stream stands: whether a batch of the gate's may go in before its
/// next message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gap {
    /// After a Sync, a simple query or a function call (or before anything).
    Between,
    /// Inside a batch, right after a Flush: the server has answered all of it once the
    /// answers are in. `bound`: a portal was bound since the last Sync.
    Flushed { bound: bool },
    /// Inside a batch, after anything else: the server may still be working on it, or
    /// wait for more of it.
    Inside { bound: bool },
}

impl Gap {
    /// After the client's message `tag`.
    pub fn after(self, tag: u8) -> Self {
        use super::messages::fe;
        let bound = match self {
            Self::Between => false,
            Self::Flushed { bound } | Self::Inside { bound } => bound,
        };
        match tag {
            fe::QUERY | fe::SYNC | fe::FUNCTION_CALL => Self::Between,
            // A copy's data belongs to the request that started it.
            fe::COPY_DATA | fe::COPY_DONE | fe::COPY_FAIL => self,
            fe::FLUSH => Self::Flushed { bound },
            fe::BIND | fe::EXECUTE => Self::Inside { bound: true },
            _ => Self::Inside { bound },
        }
    }

    /// Whether a lookup may go in here, the transaction status (of the last
    /// ReadyForQuery) being `status` once every answer has come. Never in a failed block
    /// (it runs nothing). After a Flush, the lookup's Sync ends the client's batch's
    /// implicit transaction when no block is open: harmless unless that transaction holds
    /// a portal the client bound (it would be closed), so then not.
    pub fn open(self, status: u8) -> bool {
        match self {
            Self::Between => matches!(status, b'I' | b'T'),
            Self::Flushed { bound } => status == b'T' || (status == b'I' && !bound),
            Self::Inside { .. } => false,
        }
    }
}

/// The statement, portal and savepoint the batches use; the session engine refuses it to
/// clients as a statement or portal name.
pub const NAME: &str = "portcullis_catalog";

/// Largest answer kept (all its rows' bytes); a larger one counts as a failed lookup.
const MAX_ANSWER: usize = 16 << 20;

/// Closes the portal and the statement [`NAME`] (closing a statement leaves its portals;
/// inside a transaction block they last until it ends). Closing what does not exist is
/// no error.
fn close(out: &mut BytesMut) {
    messages::close(b'P', NAME).encode(out);
    messages::close(b'S', NAME).encode(out);
}

/// Runs `sql` through [`NAME`].
fn run(sql: &str, out: &mut BytesMut) {
    close(out);
    messages::Parse {
        name: NAME.into(),
        sql: sql.into(),
        param_types: Vec::new(),
    }
    .encode()
    .encode(out);
    messages::bind_plain(NAME, NAME).encode(out);
    messages::execute(NAME).encode(out);
}

fn end(out: &mut BytesMut) {
    close(out);
    messages::sync().encode(out);
}

/// The batch that runs a lookup query: alone, or within a savepoint when the session is
/// inside a transaction block.
pub fn lookup(sql: &str, in_block: bool) -> BytesMut {
    let mut out = BytesMut::new();
    if in_block {
        run(&format!("SAVEPOINT {NAME}"), &mut out);
    }
    run(sql, &mut out);
    if in_block {
        run(&format!("RELEASE SAVEPOINT {NAME}"), &mut out);
    }
    end(&mut out);
    out
}

/// After a lookup failed inside a transaction block: back to the savepoint, and the
/// block as it was before the lookup.
pub fn undo() -> BytesMut {
    let mut out = BytesMut::new();
    run(&format!("ROLLBACK TO SAVEPOINT {NAME}"), &mut out);
    run(&format!("RELEASE SAVEPOINT {NAME}"), &mut out);
    end(&mut out);
    out
}

/// An answer being collected, message by message.
#[derive(Debug, Default)]
pub struct Answer {
    rows: Vec<Row>,
    bytes: usize,
    error: Option<String>,
}

/// A whole answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub rows: Vec<Row>,
    /// The first error: the lookup failed (and, inside a block, must be undone).
    pub error: Option<String>,
    /// The transaction status after it.
    pub status: u8,
}

impl Answer {
    /// One server message of the answer (before its ReadyForQuery).
    pub fn take(&mut self, f: &Frame) {
        if self.error.is_some() {
            return;
        }
        match f.tag {
            be::DATA_ROW => {
                self.bytes += f.body.len();
                if self.bytes > MAX_ANSWER {
                    self.rows = Vec::new();
                    self.error = Some(format!("answer larger than {MAX_ANSWER} bytes"));
                    return;
                }
                match messages::data_row(&f.body) {
                    Ok(vals) => self.rows.push(
                        vals.into_iter()
                            .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                            .collect(),
                    ),
                    Err(e) => self.error = Some(e.to_string()),
                }
            }
            be::ERROR_RESPONSE => self.error = Some(error_message(&f.body)),
            _ => {}
        }
    }

    /// The answer, at its ReadyForQuery (`body`).
    pub fn finish(self, ready: &[u8]) -> Reply {
        let status = messages::ready_status(ready).unwrap_or(b'E');
        Reply {
            rows: if self.error.is_some() {
                Vec::new()
            } else {
                self.rows
            },
            error: self.error,
            status,
        }
    }
}

/// A batch in flight: its answer so far and who waits for it.
pub struct Waiting {
    pub answer: Answer,
    pub reply: tokio::sync::oneshot::Sender<Reply>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::postgres::codec::Reader as Frames;

    fn tags(b: &BytesMut) -> String {
        let mut r = Frames::new(b, "test");
        let mut t = String::new();
        while r.remaining() > 0 {
            let tag = r.u8().expect("tag");
            let len = r.i32().expect("len") as usize;
            r.bytes(len - 4).expect("body");
            t.push(tag as char);
        }
        t
    }

    #[test]
    fn batches_name_their_statement_and_end_with_sync() {
        // Close (portal, statement), Parse, Bind, Execute per query; the closes and Sync
        // at the end.
        assert_eq!(tags(&lookup("SELECT 1", false)), "CCPBECCS");
        assert_eq!(tags(&lookup("SELECT 1", true)), "CCPBECCPBECCPBECCS");
        assert_eq!(tags(&undo()), "CCPBECCPBECCS");
        let b = lookup("SELECT 1", true);
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("SAVEPOINT portcullis_catalog"));
        assert!(text.contains("RELEASE SAVEPOINT portcullis_catalog"));
        // Never the unnamed statement or portal: every Parse and Bind names NAME.
        assert!(!text.contains("P\0\0\0\x0e\0SELECT"));
    }

    #[test]
    fn lookups_go_between_requests_and_after_a_flush_that_leaves_no_portal() {
        use crate::protocol::postgres::messages::fe;
        let after = |tags: &[u8]| tags.iter().fold(Gap::Between, |g, t| g.after(*t));
        // asyncpg's prepare: Parse, Describe, Flush; then its next Parse.
        let g = after(&[fe::PARSE, fe::DESCRIBE, fe::FLUSH]);
        assert!(g.open(b'I') && g.open(b'T') && !g.open(b'E'));
        // A portal bound in the implicit transaction would not survive the lookup's Sync;
        // inside a block it would.
        let g = after(&[fe::PARSE, fe::BIND, fe::EXECUTE, fe::FLUSH]);
        assert!(!g.open(b'I') && g.open(b'T'));
        assert!(!after(&[fe::PARSE, fe::BIND]).open(b'T'));
        let g = after(&[fe::PARSE, fe::BIND, fe::EXECUTE, fe::SYNC]);
        assert_eq!(g, Gap::Between);
        assert!(g.open(b'I') && g.open(b'T') && !g.open(b'E'));
        // A simple query's COPY data stays between requests.
        assert_eq!(
            after(&[fe::QUERY, fe::COPY_DATA, fe::COPY_DONE]),
            Gap::Between
        );
        // A Sync after a Flush resets what was bound.
        let g = after(&[fe::BIND, fe::FLUSH, fe::SYNC, fe::PARSE, fe::FLUSH]);
        assert!(g.open(b'I'));
    }

    #[test]
    fn answers_collect_rows_and_the_first_error() {
        let mut a = Answer::default();
        a.take(&messages::encode_data_row(
            [Some(&b"16384"[..]), None].into_iter(),
        ));
        let ok = a.finish(&messages::ready_for_query(b'T').body);
        assert_eq!(ok.rows, vec![vec![Some("16384".to_owned()), None]]);
        assert_eq!((ok.error, ok.status), (None, b'T'));

        let mut a = Answer::default();
        a.take(&messages::encode_data_row([Some(&b"1"[..])].into_iter()));
        let mut err = BytesMut::new();
        for (c, v) in [
            (b'S', "ERROR"),
            (b'C', "57014"),
            (b'M', "canceling statement"),
        ] {
            err.extend_from_slice(&[c]);
            err.extend_from_slice(v.as_bytes());
            err.extend_from_slice(&[0]);
        }
        err.extend_from_slice(&[0]);
        a.take(&Frame::new(be::ERROR_RESPONSE, err.freeze()));
        let failed = a.finish(&messages::ready_for_query(b'E').body);
        assert!(failed.rows.is_empty());
        assert_eq!(failed.error.as_deref(), Some("canceling statement"));
        assert_eq!(failed.status, b'E');
    }
}
