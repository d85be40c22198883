//! The spool: records on their way into the database, in an append-only file beside it
//! (`<store>.spool`, mode 0600).
//!
//! Appending a record means giving it its place in the chain (sequence number and hash,
//! [`chain::record_hash`]) and writing its line here with one `write(2)`; from then on it
//! survives the daemon being killed. The writer thread moves spooled records into SQLite in
//! large transactions and empties the file once the database holds (and has synced) all of
//! them. A daemon that starts with records in the spool imports them first. This keeps an
//! SQLite transaction, with its locks and page writes, off the path of every statement.
//!
//! A line is `seq TAB at_us TAB session TAB kind TAB hash-hex TAB body-json LF`. The body is
//! compact JSON, which never holds a raw tab or line feed. A line without its line feed at
//! the end of the file is an unfinished write (its records were never acknowledged).
//!
//! The codec ([`encode`], [`decode`]) is pure; [`Spool`] does the file I/O.

use std::{
    fs::File,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use super::{
    Append, Head, StoreError,
    chain::{self, Row},
};

/// The spool file of the store at `db`.
pub fn path_for(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}.spool", db.display()))
}

/// Gives `records` their sequence numbers and hashes after `head` (which moves on), and
/// appends their lines to `out`.
pub fn seal(head: &mut Head, records: Vec<Append>, out: &mut Vec<u8>) -> Vec<Row> {
    records
        .into_iter()
        .map(|a| {
            let seq = head.seq + 1;
            let text = a.body.into_string();
            let hash = chain::record_hash(&head.hash, seq, a.at_us, a.session, a.kind, &text);
            *head = Head { seq, hash };
            let row = Row {
                seq,
                at_us: a.at_us,
                session: a.session,
                kind: a.kind.to_owned(),
                body: text,
                hash: hash.to_vec(),
            };
            encode(&row, out);
            row
        })
        .collect()
}

/// One record's line.
pub fn encode(r: &Row, out: &mut Vec<u8>) {
    use std::fmt::Write as _;
    let mut head = String::with_capacity(96);
    let _ = write!(
        head,
        "{}\t{}\t{}\t{}\t{}\t",
        r.seq,
        r.at_us,
        r.session,
        r.kind,
        chain::hex(&r.hash)
    );
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(r.body.as_bytes());
    out.push(b'\n');
}

/// What a spool file holds.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Whole records, in file order.
    pub rows: Vec<Row>,
    /// Bytes at the end that are not a whole line: an unfinished write.
    pub torn: usize,
    /// A line that cannot be read (its offset and why); nothing from there on is taken.
    pub bad: Option<(usize, String)>,
}

pub fn decode(bytes: &[u8]) -> Decoded {
    let mut d = Decoded::default();
    let mut at = 0;
    while at < bytes.len() {
        let Some(n) = bytes[at..].iter().position(|&b| b == b'\n') else {
            d.torn = bytes.len() - at;
            break;
        };
        match line(&bytes[at..at + n]) {
            Ok(r) => d.rows.push(r),
            Err(why) => {
                d.bad = Some((at, why));
                break;
            }
        }
        at += n + 1;
    }
    d
}

fn line(l: &[u8]) -> Result<Row, String> {
    let l = std::str::from_utf8(l).map_err(|_| "not UTF-8".to_string())?;
    let mut f = l.splitn(6, '\t');
    let mut next = |what: &str| f.next().ok_or_else(|| format!("no {what}"));
    let int = |s: &str, what: &str| {
        s.parse::<i64>()
            .map_err(|_| format!("{what} {s:?} is not a number"))
    };
    let seq = int(next("sequence number")?, "sequence number")?;
    let at_us = int(next("time")?, "time")?;
    let session = int(next("session")?, "session")?;
    let kind = next("kind")?.to_owned();
    let hash = unhex(next("hash")?).ok_or("the hash is not 64 hex digits")?;
    let body = next("body")?.to_owned();
    Ok(Row {
        seq,
        at_us,
        session,
        kind,
        body,
        hash,
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..32)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// The rows of `d` that continue the chain after `head`, each checked against its hash;
/// rows the database already holds are skipped. Stops at the first row that does not fit
/// and says why.
pub fn continuing(head: &mut Head, rows: Vec<Row>) -> (Vec<Row>, Option<String>) {
    let mut out = Vec::new();
    for r in rows {
        if r.seq <= head.seq {
            continue;
        }
        if r.seq != head.seq + 1 {
            return (
                out,
                Some(format!("record {} follows record {}", r.seq, head.seq)),
            );
        }
        let h = chain::record_hash(&head.hash, r.seq, r.at_us, r.session, &r.kind, &r.body);
        if r.hash.as_slice() != h {
            return (
                out,
                Some(format!("record {} does not match its hash", r.seq)),
            );
        }
        *head = Head {
            seq: r.seq,
            hash: h,
        };
        out.push(r);
    }
    (out, None)
}

/// The open spool file, the chain's head, and the records not yet in the database.
pub struct Spool {
    file: File,
    path: PathBuf,
    /// Bytes of whole records in the file.
    len: u64,
    /// A failed write may have left part of a line after `len`: cut before the next one.
    torn: bool,
    /// The last record sealed and spooled.
    pub head: Head,
    /// Spooled and not yet in the database, in sequence order.
    pub unsaved: Vec<Row>,
    /// Why the database cannot take records now; new records are refused while it lasts.
    pub blocked: Option<String>,
}

impl Spool {
    /// Opens (creating) the spool of a database whose head is `head`. The file must hold
    /// nothing the database lacks (see [`Spool::read`]).
    pub fn open(path: &Path, head: Head) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            path: path.to_owned(),
            len,
            torn: false,
            head,
            unsaved: Vec::new(),
            blocked: None,
        })
    }

    /// What the spool at `path` holds (empty when there is none).
    pub fn read(path: &Path) -> io::Result<Decoded> {
        match std::fs::read(path) {
            Ok(b) => Ok(decode(&b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Decoded::default()),
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seals `groups` in order and writes them with one `write(2)`; returns each group's
    /// last sequence number. On failure nothing is kept: the head stays, the file is cut
    /// back, and the caller gets the error.
    pub fn append(&mut self, groups: Vec<Vec<Append>>) -> Result<Vec<i64>, StoreError> {
        if let Some(why) = &self.blocked {
            return Err(StoreError::Write(why.clone()));
        }
        if self.torn {
            self.file
                .set_len(self.len)
                .map_err(|e| self.failed("cannot cut back an unfinished write", e))?;
            self.torn = false;
        }
        let mut head = self.head;
        let mut out = Vec::new();
        let mut sealed = Vec::new();
        let mut lasts = Vec::with_capacity(groups.len());
        for g in groups {
            sealed.extend(seal(&mut head, g, &mut out));
            lasts.push(head.seq);
        }
        if !out.is_empty() {
            if let Err(e) = self.file.write_all(&out) {
                self.torn = true;
                // Cut now if possible, so that the file ends in a whole line.
                if self.file.set_len(self.len).is_ok() {
                    self.torn = false;
                }
                return Err(self.failed("cannot write", e));
            }
            self.len += out.len() as u64;
        }
        self.head = head;
        self.unsaved.extend(sealed);
        Ok(lasts)
    }

    fn failed(&self, what: &str, e: io::Error) -> StoreError {
        StoreError::Write(format!("{what} {}: {e}", self.path.display()))
    }

    /// fsyncs what was written (`strict`).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Empties the file when the database holds every record in it. Call only after the
    /// database synced what it took.
    pub fn truncate_if_saved(&mut self) -> io::Result<()> {
        if self.unsaved.is_empty() && self.len > 0 && !self.torn {
            self.file.set_len(0)?;
            self.len = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn appends(n: i64) -> Vec<Append> {
        (1..=n)
            .map(|i| Append {
                session: 7,
                kind: "statement",
                body: json!({"sql": format!("SELECT {i}\twith a tab\nand a line feed"), "n": i})
                    .into(),
                at_us: 1_000 + i,
            })
            .collect()
    }

    #[test]
    fn sealed_lines_decode_to_the_same_chain() {
        let mut head = Head::default();
        let mut out = Vec::new();
        let rows = seal(&mut head, appends(3), &mut out);
        assert_eq!(head.seq, 3);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 3);
        let d = decode(&out);
        assert_eq!((d.torn, d.bad.is_none()), (0, true));
        assert_eq!(d.rows, rows);
        let v = chain::verify(chain::Start::default(), d.rows).expect("a chain");
        assert_eq!(v.head_seq, Some(3));
    }

    #[test]
    fn an_unfinished_last_line_is_torn_and_a_bad_line_stops_reading() {
        let mut head = Head::default();
        let mut out = Vec::new();
        seal(&mut head, appends(3), &mut out);
        let whole = out.len();
        let mut cut = out.clone();
        cut.truncate(whole - 5);
        let d = decode(&cut);
        assert_eq!(d.rows.len(), 2);
        assert!(d.torn > 0 && d.bad.is_none());

        let second = out.iter().position(|&b| b == b'\n').expect("line") + 1;
        let mut bad = out.clone();
        bad[second] = b'x';
        let d = decode(&bad);
        assert_eq!(d.rows.len(), 1);
        let (at, why) = d.bad.expect("bad line");
        assert_eq!(at, second);
        assert!(why.contains("sequence number"), "{why}");
        assert!(decode(&[0u8; 100]).rows.is_empty(), "zeros are no record");
    }

    #[test]
    fn continuing_skips_what_the_database_has_and_stops_at_a_change() {
        let mut head = Head::default();
        let mut out = Vec::new();
        let rows = seal(&mut head, appends(4), &mut out);
        let at2 = Head {
            seq: 2,
            hash: rows[1].hash.clone().try_into().expect("32"),
        };
        let mut h = at2;
        let (take, problem) = continuing(&mut h, rows.clone());
        assert_eq!(take.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
        assert!(problem.is_none());
        assert_eq!(h, head);

        let mut changed = rows.clone();
        changed[3].body = "{}".into();
        let mut h = at2;
        let (take, problem) = continuing(&mut h, changed);
        assert_eq!(take.len(), 1);
        assert!(problem.expect("stops").contains("record 4"));

        let mut gap = rows;
        gap.remove(2);
        let mut h = at2;
        let (take, problem) = continuing(&mut h, gap);
        assert!(take.is_empty());
        assert!(problem.expect("stops").contains("follows record 2"));
    }

    #[test]
    fn a_refused_write_keeps_nothing_and_a_blocked_spool_refuses() {
        let dir = std::env::temp_dir().join(format!("pc-spool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("t.db.spool");
        let _ = std::fs::remove_file(&path);
        let mut s = Spool::open(&path, Head::default()).expect("open");
        assert_eq!(s.append(vec![appends(2), appends(1)]).expect("ok"), [2, 3]);
        s.blocked = Some("the database cannot write".into());
        let e = s.append(vec![appends(1)]).expect_err("blocked");
        assert!(e.to_string().contains("cannot write"), "{e}");
        assert_eq!(s.head.seq, 3);
        s.blocked = None;
        s.unsaved.clear();
        s.truncate_if_saved().expect("truncate");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        assert_eq!(s.append(vec![appends(1)]).expect("after"), [4]);
        let d = Spool::read(&path).expect("read");
        assert_eq!(d.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [4]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
