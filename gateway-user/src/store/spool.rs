//! The spool: records on their way into the database, in two files beside it
//! (`<store>.spool` and `<store>.spool.1`, mode 0600).
//!
//! Appending a record means giving it its place in the chain (sequence number and hash,
//! [`chain::record_hash`]) and copying its line into the file through a shared mapping
//! ([`mapped`]): from then on it survives the daemon being killed, and no system call was
//! made for it. The writer thread moves spooled records into SQLite in large transactions.
//! Appends go to one file while the other waits for the database to hold (and have synced)
//! everything in it; then it is emptied and takes the appends ([`parts_of`]). A daemon
//! that starts with records in the spool imports them first. This keeps an SQLite
//! transaction, with its locks and page writes, off the path of every statement.
//!
//! A line is `seq TAB at_us TAB session TAB kind TAB hash-hex TAB body-json LF`. The body is
//! compact JSON, which never holds a raw tab, line feed or zero byte. The file is allocated
//! ahead and the records end at its first zero byte: an append copies its lines but their
//! first byte, then the zero after them, and the first byte last, so until an append is
//! whole the spool ends where it ended before. Emptying the spool writes a zero at its start
//! (the bytes after it are never read again). A line without its line feed before the zero
//! is an unfinished write (its records were never acknowledged).
//!
//! The codec ([`encode`], [`decode`]) is pure; [`Spool`] does the file I/O.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use super::{
    Append, Head, StoreError,
    chain::{self, Row},
    mapped::{self, Mapped},
};

/// The spool file is allocated and mapped in steps of this many bytes (at least; it
/// doubles as it grows).
const GROW: usize = 1 << 20;

/// The spool file of the store at `db`.
pub fn path_for(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}.spool", db.display()))
}

/// Gives `records` their sequence numbers and hashes after `head` (which moves on), and
/// appends their lines to `out`.
pub fn seal(head: &mut Head, records: Vec<Append>, out: &mut Vec<u8>) -> Vec<Row> {
    out.reserve(records.iter().map(|a| a.body.len() + LINE_HEAD).sum());
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

/// Room for a line's fields before its body: four numbers and a kind, the hash in hex,
/// six separators.
const LINE_HEAD: usize = 4 * 20 + 64 + 6;

/// One record's line.
pub fn encode(r: &Row, out: &mut Vec<u8>) {
    use std::io::Write as _;
    // Writing to a vector cannot fail.
    let _ = write!(out, "{}\t{}\t{}\t{}\t", r.seq, r.at_us, r.session, r.kind);
    out.extend_from_slice(chain::hex(&r.hash).as_bytes());
    out.push(b'\t');
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

/// Where a spool file's records end: at its first zero byte, or its end.
fn records_end(bytes: &[u8]) -> usize {
    bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())
}

/// The records of a spool file: its lines up to the first zero byte.
pub fn decode(bytes: &[u8]) -> Decoded {
    let bytes = &bytes[..records_end(bytes)];
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

/// The spool's two files: `path` and `path.1`. Appends go to one of them; the other is
/// emptied once the database has synced everything in it, and then takes the appends. So
/// the spool empties under a load that never pauses (a single file would only be emptied
/// at a moment when no record waits for the database, which a steady load never gives).
pub fn parts_of(path: &Path) -> [PathBuf; 2] {
    [
        path.to_owned(),
        PathBuf::from(format!("{}.1", path.display())),
    ]
}

/// The spool: its two files, the chain's head, and the records not yet in the database.
pub struct Spool {
    parts: [Part; 2],
    /// The part appends go to.
    active: usize,
    path: PathBuf,
    /// The last record sealed and spooled.
    pub head: Head,
    /// Spooled and not yet in the database, in sequence order.
    pub unsaved: Vec<Row>,
    /// Why the database cannot take records now; new records are refused while it lasts.
    pub blocked: Option<String>,
}

/// One file of the spool.
struct Part {
    file: File,
    path: PathBuf,
    /// The file, mapped over its allocated size; `None` until the first append.
    map: Option<Mapped>,
    /// Bytes of whole records at the start of the file. A zero byte follows them, unless
    /// they fill the file.
    len: usize,
    /// The sequence number of the last record copied in (0: none since it was emptied, or
    /// held when the spool was opened, which the database has).
    last: i64,
}

impl Part {
    fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(path)?;
        let len = records_end(&std::fs::read(path)?);
        Ok(Self {
            file,
            path: path.to_owned(),
            map: None,
            len,
            last: 0,
        })
    }

    /// Copies `lines` after the records, the last of them numbered `last`.
    fn put(&mut self, lines: &[u8], last: i64) -> io::Result<()> {
        // Room for the lines and the zero after them.
        publish(self.room(lines.len() + 1)?, lines);
        self.len += lines.len();
        self.last = last;
        Ok(())
    }

    /// The mapped bytes after the records, at least `need` of them; grows the file (its
    /// blocks allocated before they are mapped) when it has fewer.
    fn room(&mut self, need: usize) -> io::Result<&mut [u8]> {
        let mapped = self.map.as_ref().map_or(0, Mapped::len);
        if self.len + need > mapped {
            let size = (self.len + need)
                .max(mapped.saturating_mul(2))
                .next_multiple_of(GROW);
            mapped::allocate(&self.file, size)?;
            self.map = None;
            self.map = Some(Mapped::new(&self.file, size)?);
        }
        match &mut self.map {
            Some(m) => Ok(&mut m.bytes_mut()[self.len..]),
            None => Err(io::Error::other("the spool is not mapped")),
        }
    }

    /// Ends the records at the start of the file; its size and pages stay.
    fn empty(&mut self) -> io::Result<()> {
        if self.len > 0 {
            self.len = 0;
            self.room(1)?[0] = 0;
        }
        self.last = 0;
        Ok(())
    }
}

impl Spool {
    /// Opens (creating) the spool of a database whose head is `head`. Its files must hold
    /// nothing the database lacks (see [`Spool::read`]); new records follow what they
    /// hold. Nothing is allocated yet: a full disk refuses the first append, not the
    /// opening.
    pub fn open(path: &Path, head: Head) -> io::Result<Self> {
        let [a, b] = parts_of(path);
        Ok(Self {
            parts: [Part::open(&a)?, Part::open(&b)?],
            active: 0,
            path: path.to_owned(),
            head,
            unsaved: Vec::new(),
            blocked: None,
        })
    }

    /// What the spool at `path` holds (empty when there is none): the records of both
    /// files, in sequence order.
    pub fn read(path: &Path) -> io::Result<Decoded> {
        let mut all = Decoded::default();
        for p in parts_of(path) {
            let d = match std::fs::read(&p) {
                Ok(b) => decode(&b),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Decoded::default(),
                Err(e) => return Err(e),
            };
            all.rows.extend(d.rows);
            all.torn += d.torn;
            if all.bad.is_none() {
                all.bad = d
                    .bad
                    .map(|(at, why)| (at, format!("{}: {why}", p.display())));
            }
        }
        all.rows.sort_by_key(|r| r.seq);
        Ok(all)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seals `groups` in order and copies their lines into the active file; returns each
    /// group's last sequence number. On failure (no space can be allocated) nothing is
    /// kept: the head stays, and the caller gets the error.
    pub fn append(&mut self, groups: Vec<Vec<Append>>) -> Result<Vec<i64>, StoreError> {
        if let Some(why) = &self.blocked {
            return Err(StoreError::Write(why.clone()));
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
            let part = &mut self.parts[self.active];
            if let Err(e) = part.put(&out, head.seq) {
                return Err(StoreError::Write(format!(
                    "cannot allocate space in {}: {e}",
                    part.path.display()
                )));
            }
        }
        self.head = head;
        self.unsaved.extend(sealed);
        Ok(lasts)
    }

    /// fsyncs what was written (`strict`): `fdatasync` writes out the pages the mapping
    /// changed, like any others of the file. Only the active file takes appends.
    pub fn sync(&self) -> io::Result<()> {
        self.parts[self.active].file.sync_data()
    }

    /// Empties the files whose records the database holds, and turns the appends to an
    /// empty file. Call only after the database synced every record it took (all but the
    /// `unsaved` ones).
    pub fn truncate_if_saved(&mut self) -> io::Result<()> {
        let through = self.unsaved.first().map_or(self.head.seq, |r| r.seq - 1);
        for p in &mut self.parts {
            if p.len > 0 && p.last <= through {
                p.empty()?;
            }
        }
        let other = 1 - self.active;
        if self.parts[self.active].len > 0 && self.parts[other].len == 0 {
            self.active = other;
        }
        Ok(())
    }

    /// At a clean stop: unmaps the files and cuts them back to the records they hold (none
    /// once the database has them all).
    pub fn release(&mut self) -> io::Result<()> {
        for p in &mut self.parts {
            p.map = None;
            p.file.set_len(p.len as u64)?;
        }
        Ok(())
    }
}

/// Copies `lines` to the start of `to` (which holds at least one byte more), so that a
/// reader of the file after the process died at any point sees either none of them or
/// all: every byte but the first, then the zero that will end the records, and the first
/// byte last. `to[0]` is the zero that ends the records until then.
fn publish(to: &mut [u8], lines: &[u8]) {
    let n = lines.len();
    to[1..n].copy_from_slice(&lines[1..]);
    to[n] = 0;
    // A process stopped at any instruction has made every store before it (into the page
    // cache, which outlives it) and none after; only the compiler could reorder them.
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::Release);
    to[0] = lines[0];
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
    fn a_blocked_spool_refuses_and_an_emptied_one_reads_as_empty() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.db.spool");
        let mut s = Spool::open(&path, Head::default()).expect("open");
        assert_eq!(s.append(vec![appends(2), appends(1)]).expect("ok"), [2, 3]);
        let seqs = |p: &Path| {
            let d = Spool::read(p).expect("read");
            assert_eq!((d.torn, d.bad.is_none()), (0, true));
            d.rows.iter().map(|r| r.seq).collect::<Vec<_>>()
        };
        assert_eq!(seqs(&path), [1, 2, 3]);
        let size = std::fs::metadata(&path).expect("meta").len();
        assert_eq!(size, GROW as u64, "allocated ahead");
        s.blocked = Some("the database cannot write".into());
        let e = s.append(vec![appends(1)]).expect_err("blocked");
        assert!(e.to_string().contains("cannot write"), "{e}");
        assert_eq!(s.head.seq, 3);
        s.blocked = None;
        // Not emptied while records wait for the database.
        s.truncate_if_saved().expect("truncate");
        assert_eq!(seqs(&path), [1, 2, 3]);
        s.unsaved.clear();
        s.truncate_if_saved().expect("truncate");
        assert!(
            seqs(&path).is_empty(),
            "a zero at the start ends the records"
        );
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), size);
        // The next lines overwrite the old ones; what is left of those is never read.
        assert_eq!(s.append(vec![appends(1)]).expect("after"), [4]);
        assert_eq!(seqs(&path), [4]);
        // A spool opened again continues after what it holds.
        let head = s.head;
        drop(s);
        let mut s = Spool::open(&path, head).expect("reopen");
        assert_eq!(s.append(vec![appends(1)]).expect("more"), [5]);
        assert_eq!(seqs(&path), [4, 5]);
        s.release().expect("release");
        assert_eq!(seqs(&path), [4, 5]);
        assert!(
            std::fs::metadata(&path).expect("meta").len() < 1024,
            "cut back"
        );
    }

    #[test]
    fn a_load_that_never_pauses_still_empties_the_spool() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.db.spool");
        let mut s = Spool::open(&path, Head::default()).expect("open");
        let seqs = |p: &Path| {
            let d = Spool::read(p).expect("read");
            d.rows.iter().map(|r| r.seq).collect::<Vec<_>>()
        };
        // The database takes what is spooled, but by the time it has synced it, more
        // records wait: there is never a moment with none.
        let mut saved = 0;
        for round in 0..6 {
            s.append(vec![appends(3)]).expect("append");
            let taken = s.unsaved.len() - 1;
            s.unsaved.drain(..taken);
            saved += taken;
            s.truncate_if_saved().expect("truncate");
            let held = seqs(&path);
            assert!(
                held.len() <= 7,
                "round {round}: the spool keeps {} records",
                held.len()
            );
            assert_eq!(held.last(), Some(&s.head.seq), "the newest stays");
            assert!(
                held.windows(2).all(|w| w[0] + 1 == w[1]),
                "in order: {held:?}"
            );
        }
        assert_eq!(saved, 6 * 3 - 1);
        s.unsaved.clear();
        s.truncate_if_saved().expect("truncate");
        s.truncate_if_saved().expect("again");
        assert!(seqs(&path).is_empty());
        // Both files exist, mode 0600, at most their allocation in size.
        for p in parts_of(&path) {
            use std::os::unix::fs::PermissionsExt as _;
            let m = std::fs::metadata(&p).expect("part");
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", p.display());
            assert!(m.len() <= GROW as u64);
        }
    }

    #[test]
    fn the_spool_grows_past_its_first_allocation() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.db.spool");
        let mut s = Spool::open(&path, Head::default()).expect("open");
        let big = |i: i64| Append {
            session: 1,
            kind: "result",
            body: json!({"rows": "x".repeat(300_000), "i": i}).into(),
            at_us: i,
        };
        for i in 0..8 {
            s.append(vec![vec![big(i)]]).expect("append");
        }
        let d = Spool::read(&path).expect("read");
        assert_eq!(d.rows.len(), 8);
        assert!(std::fs::metadata(&path).expect("meta").len() >= 8 * 300_000);
    }

    #[test]
    fn an_append_is_seen_whole_or_not_at_all() {
        let mut head = Head::default();
        let mut first = Vec::new();
        seal(&mut head, appends(1), &mut first);
        let mut more = Vec::new();
        seal(&mut head, appends(2), &mut more);
        // Stale lines from before the spool was last emptied follow the zero.
        let mut file = first.clone();
        file.push(0);
        file.extend_from_slice(&more);
        file.extend_from_slice(&more);
        assert_eq!(decode(&file).rows.len(), 1);
        // The process stopped after copying every byte but the first: nothing new shows.
        let mut stopped = file.clone();
        let at = first.len();
        stopped[at + 1..at + more.len()].copy_from_slice(&more[1..]);
        stopped[at + more.len()] = 0;
        let d = decode(&stopped);
        assert_eq!((d.rows.len(), d.torn, d.bad.is_none()), (1, 0, true));
        // Once the first byte is in, all of it does.
        publish(&mut file[at..], &more);
        let d = decode(&file);
        assert_eq!((d.rows.len(), d.torn, d.bad.is_none()), (3, 0, true));
    }
}
