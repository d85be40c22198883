//! The audit store end to end: a real PostgreSQL and real clients through the gate, the
//! store's file tampered with by the `sqlite3` command-line tool, the daemon killed under
//! load, a store on a full filesystem, and replays compared with what the client saw.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use portcullis_tests::{
    As, Daemon, Tmpfs,
    pg::{
        Pgw, logged_numbers, pgbench_load, psql_cmd, psql_script, recorded_numbers, text,
        wait_load, world_full, world_with,
    },
    portcullis_as, portcullis_json, stdout_of, workspace_bin,
};
use serde_json::Value;

fn sqlite(db: &Path, sql: &str) -> String {
    stdout_of(
        Command::new("sqlite3").arg(db).arg(sql),
        &format!("sqlite3 {sql} (apt install sqlite3)"),
    )
}

fn verify_file(cfg: &Path, db: &Path) -> (Value, String) {
    let out = portcullis_as(
        cfg,
        As::Root,
        &[
            "audit",
            "verify",
            "--store",
            db.to_str().expect("utf-8"),
            "--json",
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify gave no JSON ({e}): {}", text(&out)));
    assert_eq!(
        out.status.success(),
        v["ok"] == true,
        "exit status follows the verdict"
    );
    let human = portcullis_as(
        cfg,
        As::Root,
        &["audit", "verify", "--store", db.to_str().expect("utf-8")],
    );
    (v, text(&human))
}

/// Copies the store (and its WAL, if any) for one tampering.
fn copy_store(from: &Path, to: &Path) {
    fs::copy(from, to).expect("copy store");
    for sfx in ["-wal", "-shm"] {
        let src = PathBuf::from(format!("{}{sfx}", from.display()));
        if src.exists() {
            fs::copy(&src, format!("{}{sfx}", to.display())).expect("copy wal");
        }
    }
}

fn export(w: &Pgw) -> Vec<Value> {
    let out = portcullis_as(&w.daemon.config, As::Root, &["audit", "export"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl"))
        .collect()
}

#[test]
fn verify_passes_on_a_clean_store_and_names_each_kind_of_tampering() {
    let mut w = world_full("", None, "auditors = [\"adm\"]", "");
    w.pg.sql("shop", "CREATE TABLE t (id int); GRANT ALL ON t TO app");
    let out = psql_script(
        &w,
        &w.agent,
        "SELECT 1 AS one;\nINSERT INTO t VALUES (1);\nDROP TABLE t;\nSELECT 'two' AS two;\n",
    );
    assert!(text(&out).contains("two"), "{}", text(&out));

    // Through the daemon: intact. An auditor may ask; an unlisted user may not.
    let v = portcullis_json(&w.daemon.config, &["audit", "verify", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["records"].as_i64() >= Some(6), "{v}");
    let aud = portcullis_as(&w.daemon.config, As::User(1502, 4), &["audit", "verify"]);
    assert!(aud.status.success(), "{}", text(&aud));
    assert!(text(&aud).starts_with("ok:"), "{}", text(&aud));
    for args in [
        &["audit", "verify"][..],
        &["sessions"],
        &["audit", "export"],
    ] {
        let out = portcullis_as(&w.daemon.config, As::User(1501, 1501), args);
        assert!(!out.status.success(), "{args:?} by an unlisted user");
        assert!(text(&out).contains("permission denied"), "{}", text(&out));
    }
    // The agent's uid is no auditor either.
    let out = portcullis_as(&w.daemon.config, As::User(65534, 65534), &["sessions"]);
    assert!(!out.status.success());

    // Stopped cleanly, the file alone verifies.
    assert!(w.daemon.stop().success());
    let db = w.store_path();
    let (v, human) = verify_file(&w.daemon.config, &db);
    assert_eq!(v["ok"], true, "{v}");
    assert!(human.starts_with("ok:"), "{human}");
    let target: i64 = sqlite(&db, "SELECT min(seq) FROM records WHERE kind = 'statement'")
        .parse()
        .expect("seq");
    let last: i64 = sqlite(&db, "SELECT max(seq) FROM records")
        .parse()
        .expect("seq");
    assert!(last > target + 2, "too few records to tamper with");

    let cases: [(&str, String, &str); 5] = [
        (
            "change",
            format!(
                "UPDATE records SET body = replace(body, 'SELECT 1', 'SELECT 2') WHERE seq = {target}"
            ),
            "does not match",
        ),
        (
            "delete",
            format!("DELETE FROM records WHERE seq = {target}"),
            "missing",
        ),
        (
            "insert",
            // Shift the rest up and put a forged copy of the record in its place.
            format!(
                "UPDATE records SET seq = -seq WHERE seq >= {target}; \
                 UPDATE records SET seq = -seq + 1 WHERE seq < 0; \
                 INSERT INTO records (seq, at_us, session, kind, body, hash) \
                 SELECT {target}, at_us, session, kind, replace(body, 'SELECT 1', 'SELECT 3'), hash \
                 FROM records WHERE seq = {target} + 1"
            ),
            "does not match",
        ),
        (
            "reorder",
            format!(
                "UPDATE records SET seq = -1 WHERE seq = {target}; \
                 UPDATE records SET seq = {target} WHERE seq = {target} + 1; \
                 UPDATE records SET seq = {target} + 1 WHERE seq = -1"
            ),
            "does not match",
        ),
        (
            "cut the start",
            format!("DELETE FROM records WHERE seq < {target}"),
            "",
        ),
    ];
    for (what, sql, why) in &cases {
        let copy = w
            .env
            .dir
            .join(format!("tampered-{}.db", what.replace(' ', "-")));
        copy_store(&db, &copy);
        sqlite(&copy, sql);
        let (v, human) = verify_file(&w.daemon.config, &copy);
        assert_eq!(v["ok"], false, "{what} went unnoticed: {v}");
        let first = if *what == "cut the start" { 1 } else { target };
        assert_eq!(v["first_bad_seq"], first, "{what}: {v}");
        assert!(
            v["problem"].as_str().unwrap_or("").contains(why),
            "{what}: {v}"
        );
        assert!(
            human.contains("TAMPERED") && human.contains(&format!("#{first}")),
            "{what}: {human}"
        );
    }

    // Records removed from the end fit the chain; the running daemon's head catches it.
    w.daemon = Daemon::start(&w.daemon.config.clone());
    assert!(
        psql_script(&w, &w.agent, "SELECT 5 AS five;\n")
            .status
            .success()
    );
    let v = portcullis_json(&w.daemon.config, &["audit", "verify", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    let head = v["head_seq"].as_i64().expect("head");
    sqlite(&db, &format!("DELETE FROM records WHERE seq = {head}"));
    let out = portcullis_as(&w.daemon.config, As::Root, &["audit", "verify", "--json"]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        v["problem"]
            .as_str()
            .unwrap_or("")
            .contains("removed from the end"),
        "{v}"
    );
    assert_eq!(v["first_bad_seq"], head, "{v}");
}

#[test]
fn sigkill_under_load_loses_no_statement_the_server_ran() {
    let mut w = world_with("", None);
    let bench = pgbench_load(&w, 30);
    wait_load(&w, 2000);
    w.daemon.kill9();
    let out = bench.wait_with_output().expect("pgbench");
    assert!(
        !out.status.success() || text(&out).contains("abort"),
        "{}",
        text(&out)
    );
    // Let the server log the last statements it received.
    std::thread::sleep(Duration::from_millis(500));
    let logged = logged_numbers(&w.pg.log());

    w.daemon = Daemon::start(&w.daemon.config.clone());
    let recorded = recorded_numbers(&w);
    let missing: Vec<&u64> = logged.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} of {} statements the server ran have no record, e.g. {:?}",
        missing.len(),
        logged.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(logged.len() >= 2000, "{}", logged.len());
    // The chain is whole after the kill.
    let v = portcullis_json(&w.daemon.config, &["audit", "verify", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
}

/// `audit verify` while a load is recorded: sessions keep appending while the chain is
/// read, and their new records must not be taken for tampering (they were, in 23 of 32
/// tries, when the store had to end exactly at the daemon's head).
#[test]
fn verify_passes_while_a_load_keeps_appending() {
    let w = world_with("", None);
    let mut bench = pgbench_load(&w, 60);
    wait_load(&w, 500);
    let mut heads = Vec::new();
    for _ in 0..10 {
        let out = portcullis_as(&w.daemon.config, As::Root, &["audit", "verify", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("no JSON from audit verify ({e}): {}", text(&out));
        });
        assert!(out.status.success() && v["ok"] == true, "{v}");
        heads.push(v["head_seq"].as_i64().expect("head"));
    }
    let _ = bench.kill();
    let _ = bench.wait();
    assert!(
        heads.windows(2).all(|p| p[0] < p[1]),
        "the load kept appending between the verifications: {heads:?}"
    );
}

/// Statement records in the spool's files (`.spool`, `.spool.1`): lines up to each file's
/// first zero byte whose kind is `statement`.
fn spooled_statements(db: &Path) -> usize {
    ["spool", "spool.1"]
        .iter()
        .map(|ext| {
            let bytes = fs::read(db.with_extension(format!("db.{ext}"))).unwrap_or_default();
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end])
                .lines()
                .filter(|l| l.split('\t').nth(3) == Some("statement"))
                .count()
        })
        .sum()
}

#[test]
fn the_spool_empties_under_a_load_that_never_pauses() {
    let w = world_with("", None);
    let mut bench = pgbench_load(&w, 60);
    wait_load(&w, 500);
    let db = w.store_path();
    let start = logged_numbers(&w.pg.log()).len();
    let mut held = Vec::new();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(500));
        held.push(spooled_statements(&db));
    }
    let ran = logged_numbers(&w.pg.log()).len() - start;
    let _ = bench.kill();
    let _ = bench.wait();
    // Checkpoints come once a second and the two files take turns, so the spool holds
    // about two seconds of statements at most. With one file, emptied only when no record
    // waited, it held every statement since the load began.
    let most = held.iter().copied().max().unwrap_or(0);
    assert!(ran > 600, "the load ran only {ran} statements in 6 s");
    assert!(
        most < ran / 2,
        "the spool kept up to {most} statements while {ran} ran in 6 s: {held:?}"
    );
}

/// Line numbers (1-based) of a psql `-f -` run that failed because of the store.
fn store_refusals(out: &Output) -> Vec<usize> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("audit store cannot record"))
        .filter_map(|l| {
            l.strip_prefix("psql:<stdin>:")?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A daemon whose store is on a 2 MiB tmpfs of its own.
fn store_on_a_small_disk(name: &str) -> (Tmpfs, Pgw) {
    let mount = Tmpfs::mount(name, "2m");
    let db = mount.0.join("portcullis.db");
    let w = world_full(
        "",
        None,
        "",
        &format!("[store]\npath = \"{}\"\n", db.display()),
    );
    (mount, w)
}

/// `SELECT n AS k` runs again within 10 s, unrefused, and its record is in a store that
/// verifies.
fn runs_again_and_is_recorded(w: &Pgw, n: u64) {
    let sql = format!("SELECT {n} AS k;");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = psql_script(w, &w.agent, &format!("{sql}\n"));
        if out.status.success()
            && store_refusals(&out).is_empty()
            && text(&out).contains(&n.to_string())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store did not recover: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = portcullis_json(&w.daemon.config, &["audit", "verify", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        export(w)
            .iter()
            .any(|r| r["kind"] == "statement" && r["body"]["sql"] == sql.as_str()),
        "{sql} was not recorded"
    );
}

#[test]
fn a_store_on_a_full_disk_fails_closed_and_recovers() {
    let (mount, w) = store_on_a_small_disk("pc-small");
    assert!(
        psql_script(&w, &w.agent, "SELECT 1 AS k;\n")
            .status
            .success()
    );
    let filler = mount.fill();
    let mut refused = Vec::new();
    let mut batch = 0;
    while refused.is_empty() {
        batch += 1;
        assert!(batch <= 20, "the store never ran out of space");
        let script: String = (1..=500)
            .map(|i| format!("SELECT {} AS k;\n", batch * 1000 + i))
            .collect();
        let out = psql_script(&w, &w.agent, &script);
        refused = store_refusals(&out)
            .into_iter()
            .map(|line| batch * 1000 + line)
            .collect();
    }
    // None of the refused statements reached the server.
    let logged = logged_numbers(&w.pg.log());
    for n in &refused {
        assert!(
            !logged.contains(&(*n as u64)),
            "statement {n} was refused by the store but ran"
        );
    }
    // A log line and the status say why.
    let status = w.daemon.status();
    assert!(
        status["store"]["refused_statements"].as_u64() >= Some(refused.len() as u64),
        "{}",
        status["store"]
    );
    assert!(status["store"]["failed"].as_u64() > Some(0));
    assert!(
        w.daemon
            .logs
            .all()
            .iter()
            .any(|v| v["message"] == "statements refused: the audit store cannot record them"),
        "no log line"
    );
    // Space again: statements run and are recorded again.
    fs::remove_file(&filler).expect("rm filler");
    runs_again_and_is_recorded(&w, 424242);
    drop(w);
    drop(mount);
}

#[test]
fn a_spool_without_space_to_grow_refuses_statements_until_there_is_space() {
    // Filled before the first statement: the spool has no space allocated yet and cannot
    // get any.
    let (mount, w) = store_on_a_small_disk("pc-nospool");
    let filler = mount.fill();
    let out = psql_script(&w, &w.agent, "SELECT 515151 AS k;\n");
    assert_eq!(store_refusals(&out), [1], "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot allocate space in") && stderr.contains(".spool"),
        "the refusal does not say why: {stderr}"
    );
    assert!(
        !logged_numbers(&w.pg.log()).contains(&515151),
        "a statement the store refused ran"
    );
    fs::remove_file(&filler).expect("rm filler");
    runs_again_and_is_recorded(&w, 525252);
    drop(w);
    drop(mount);
}

#[test]
fn a_store_that_cannot_be_opened_stops_the_daemon_with_the_reason() {
    let env = portcullis_tests::Env::new();
    let m = Tmpfs::mount("pc-ro", "1m,ro");
    let ro = m.0.clone();
    let cfg = env.config(
        "",
        &format!(
            "\n[store]\npath = \"{}\"\n",
            ro.join("portcullis.db").display()
        ),
    );
    let out = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .expect("run");
    assert!(!out.status.success(), "the daemon ran without a store");
    let t = text(&out);
    assert!(t.contains("cannot open the audit store"), "{t}");
    assert!(t.contains(&ro.display().to_string()), "{t}");
}

#[test]
fn replay_shows_what_the_client_saw_and_sessions_filter() {
    // Credentials for the catalog connection, so masking is by column (dropped last).
    let keep = portcullis_tests::Env::new();
    let secret = portcullis_tests::pg::secret_file(&keep);
    let w = world_with(
        &format!(
            "credentials = {{ user = \"app\", password_file = \"{}\" }}",
            secret.display()
        ),
        None,
    );
    w.pg.sql(
        "shop",
        "CREATE TABLE customers (id int, name text, email text); \
         INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), (2, 'Bob', 'bob@example.org'); \
         GRANT SELECT ON customers TO app",
    );
    let query = "SELECT id, name, email FROM customers ORDER BY id";
    let out = psql_cmd(&w, &w.agent, "disable")
        .args(["-A", "-t", "-F", "|", "-c", query])
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", text(&out));
    let client_saw: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(client_saw.len(), 2);
    assert!(
        !client_saw[0].contains("ada@example.com"),
        "not masked: {client_saw:?}"
    );
    let denied = psql_cmd(&w, &w.agent, "disable")
        .args(["-c", "DROP TABLE customers"])
        .output()
        .expect("psql");
    assert!(!denied.status.success());

    let sessions = portcullis_json(&w.daemon.config, &["sessions", "--json"]);
    let list = sessions.as_array().expect("sessions");
    assert_eq!(list.len(), 2, "{sessions}");
    // Newest first: the DROP's session, then the query's.
    let (drop_id, query_id) = (
        list[0]["id"].as_i64().expect("id"),
        list[1]["id"].as_i64().expect("id"),
    );
    assert_eq!(list[1]["agent"], "a");
    assert_eq!(list[1]["statements"], 1);
    assert_eq!(list[0]["denied"], 1, "{sessions}");
    assert!(list[1]["ended_us"].is_i64(), "{sessions}");

    // The recorded rows are the rows the client received, masked the same way.
    let recs = String::from_utf8_lossy(
        &portcullis_as(
            &w.daemon.config,
            As::Root,
            &["replay", &query_id.to_string(), "--json"],
        )
        .stdout,
    )
    .lines()
    .map(|l| serde_json::from_str::<Value>(l).expect("json"))
    .collect::<Vec<_>>();
    let replayed: Vec<String> = recs
        .iter()
        .filter(|r| r["kind"] == "rows" || r["kind"] == "result")
        .flat_map(|r| r["body"]["rows"].as_array().cloned().unwrap_or_default())
        .map(|row| {
            row.as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_str().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    assert_eq!(replayed, client_saw);
    assert!(
        recs.iter()
            .any(|r| r["kind"] == "statement" && r["body"]["sql"] == query)
    );

    // The transcript for people.
    let out = portcullis_as(
        &w.daemon.config,
        As::Root,
        &["replay", &query_id.to_string()],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for want in [
        query,
        "Ada",
        "Bob",
        client_saw[0].split('|').nth(2).expect("email"),
    ] {
        assert!(t.contains(want), "{want:?} missing from the replay:\n{t}");
    }
    assert!(!t.contains("ada@example.com"), "{t}");
    let out = portcullis_as(
        &w.daemon.config,
        As::Root,
        &["replay", &drop_id.to_string()],
    );
    let t = text(&out);
    assert!(
        t.contains("DROP TABLE customers") && t.contains("deny-destructive-ddl"),
        "{t}"
    );

    // Filters.
    let ids = |args: &[&str]| -> Vec<i64> {
        let mut a = vec!["sessions", "--json"];
        a.extend_from_slice(args);
        portcullis_json(&w.daemon.config, &a)
            .as_array()
            .expect("list")
            .iter()
            .map(|s| s["id"].as_i64().expect("id"))
            .collect()
    };
    assert_eq!(ids(&["--agent", "a"]).len(), 2);
    assert!(ids(&["--agent", "nobody-here"]).is_empty());
    assert_eq!(ids(&["--target", "pg"]).len(), 2);
    assert_eq!(ids(&["--decision", "deny"]), vec![drop_id]);
    assert_eq!(ids(&["--decision", "mask"]), vec![query_id]);
    assert_eq!(ids(&["--since", "1h"]).len(), 2);
}

#[test]
fn replay_follow_prints_a_live_session_until_it_ends() {
    use std::io::Write as _;
    let w = world_with("", None);
    let mut psql = psql_cmd(&w, &w.agent, "disable")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    let mut stdin = psql.stdin.take().expect("stdin");
    writeln!(stdin, "SELECT 'first' AS word;").expect("write");
    stdin.flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let s = portcullis_json(&w.daemon.config, &["sessions", "--json"]);
        if let Some(x) = s
            .as_array()
            .and_then(|l| l.first())
            .filter(|x| x["statements"] == 1)
        {
            assert!(x["ended_us"].is_null(), "{x}");
            break x["id"].as_i64().expect("id");
        }
        assert!(Instant::now() < deadline, "no live session: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let follow = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&w.daemon.config)
        .args(["replay", &id.to_string(), "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("replay");
    std::thread::sleep(Duration::from_millis(500));
    writeln!(stdin, "SELECT 'second' AS word;").expect("write");
    drop(stdin);
    assert!(psql.wait_with_output().expect("psql").status.success());
    // --follow ends by itself when the session does.
    let started = Instant::now();
    let out = follow.wait_with_output().expect("replay");
    assert!(started.elapsed() < Duration::from_secs(10));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for want in [
        "SELECT 'first' AS word",
        "first",
        "SELECT 'second' AS word",
        "second",
    ] {
        assert!(t.contains(want), "{want:?} missing:\n{t}");
    }
}

#[test]
fn replay_speed_keeps_the_recorded_pauses_scaled() {
    let w = world_with("", None);
    // A client that thinks for a second between two statements.
    let out = psql_script(
        &w,
        &w.agent,
        "SELECT 'before' AS word;\n\\! sleep 1.2\nSELECT 'after' AS word;\n",
    );
    assert!(out.status.success(), "{}", text(&out));
    let sessions = portcullis_json(&w.daemon.config, &["sessions", "--json"]);
    let id = sessions[0]["id"].as_i64().expect("a session").to_string();
    let timed = |speed: &str| {
        let started = Instant::now();
        let out = portcullis_as(
            &w.daemon.config,
            As::Root,
            &["replay", &id, "--speed", speed],
        );
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert!(t.contains("before") && t.contains("after"), "{t}");
        started.elapsed()
    };
    let real_time = timed("1");
    let fast = timed("100");
    // Both pay the same start-up; only the pause differs (1.2 s vs 12 ms).
    assert!(real_time >= Duration::from_millis(1100), "{real_time:?}");
    assert!(
        real_time.saturating_sub(fast) >= Duration::from_millis(1000),
        "real time {real_time:?}, 100x {fast:?}"
    );
    let bad = portcullis_as(&w.daemon.config, As::Root, &["replay", &id, "--speed", "0"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("not a speed"), "{}", text(&bad));
}

#[test]
fn redact_literals_keeps_literals_out_of_records_and_logs() {
    let w = world_full("", None, "", "[store]\nredact_literals = true\n");
    // On stdin, not in psql's command line (which is recorded as the process's).
    let out = psql_script(
        &w,
        &w.agent,
        "SELECT length('hunter2') AS n WHERE 41 < 42\n",
    );
    assert!(text(&out).contains('7'), "{}", text(&out));
    let stmts: Vec<Value> = export(&w)
        .into_iter()
        .filter(|r| r["kind"] == "statement")
        .collect();
    assert_eq!(stmts.len(), 1, "{stmts:?}");
    assert_eq!(stmts[0]["body"]["sql"], "SELECT length(?) AS n WHERE ? < ?");
    assert_eq!(stmts[0]["body"]["redacted"], true);
    // The decision event is logged after the statement left, so it may trail the answer.
    w.daemon
        .logs
        .wait_for("the decision event", Duration::from_secs(5), |v| {
            v["message"] == "decision"
                && v["statement"]
                    .as_str()
                    .is_some_and(|s| s.contains("SELECT length(?)"))
        });
    let all = format!("{:?}", w.daemon.logs.all());
    assert!(!all.contains("hunter2"), "a literal reached the log");

    // A held statement: its request record and the event of its outcome, too.
    let held = std::thread::scope(|scope| {
        let client = scope.spawn(|| psql_script(&w, &w.agent, "UPDATE t SET v = 'hunter2'\n"));
        let deadline = Instant::now() + Duration::from_secs(15);
        let id = loop {
            let v = portcullis_json(&w.daemon.config, &["approvals", "--json"]);
            if let Some(id) = v["pending"][0]["id"].as_str() {
                break id.to_owned();
            }
            assert!(Instant::now() < deadline, "never held: {v}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let deny = portcullis_as(&w.daemon.config, As::Root, &["deny", &id]);
        assert!(deny.status.success(), "{}", text(&deny));
        client.join().expect("psql")
    });
    assert!(text(&held).contains("denied"), "{}", text(&held));
    w.daemon
        .logs
        .wait_for("the outcome event", Duration::from_secs(5), |v| {
            v["message"] == "decision" && v["verdict"] == "refused"
        });
    let requested: Vec<Value> = export(&w)
        .into_iter()
        .filter(|r| r["kind"] == "approval_requested")
        .collect();
    assert_eq!(requested.len(), 1, "{requested:?}");
    assert_eq!(requested[0]["body"]["statement"], "UPDATE t SET v = ?");
    let all = format!("{:?}", w.daemon.logs.all());
    assert!(
        !all.contains("hunter2"),
        "a held statement's literal reached the log"
    );
}

#[test]
fn credentials_on_an_agents_command_line_are_blanked_in_records_and_logs() {
    let w = world_with("", None);
    let out = psql_cmd(&w, &w.agent, "disable")
        .args(["-v", "api_token=hunter2tok"])
        .args(["-v", "dsn=postgres://app:hunter2url@db/shop"])
        .args(["-c", "SELECT 1"])
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", text(&out));
    let records = export(&w);
    let start = records
        .iter()
        .find(|r| r["kind"] == "session_start")
        .expect("a session_start record");
    let cmdline: Vec<&str> = start["body"]["cmdline"]
        .as_array()
        .expect("cmdline")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(cmdline.contains(&"api_token=***"), "{cmdline:?}");
    assert!(
        cmdline.contains(&"dsn=postgres://app:***@db/shop"),
        "{cmdline:?}"
    );
    assert!(
        cmdline.contains(&"SELECT 1"),
        "the rest is kept: {cmdline:?}"
    );
    let all = format!("{records:?} {:?}", w.daemon.logs.all());
    assert!(!all.contains("hunter2"), "a credential was recorded");
}

#[test]
fn retention_prunes_ended_sessions_and_the_chain_still_verifies() {
    let w = world_full(
        "",
        None,
        "",
        "[store]\nretention = \"1s\"\nprune_interval = \"500ms\"\n",
    );
    assert!(
        psql_script(&w, &w.agent, "SELECT 1 AS k;\n")
            .status
            .success()
    );
    let first = portcullis_json(&w.daemon.config, &["sessions", "--json"]);
    assert_eq!(first.as_array().map(Vec::len), Some(1), "{first}");
    // Gone within a few prune intervals after it has been over for a second.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = portcullis_json(&w.daemon.config, &["sessions", "--json"]);
        if s.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "never pruned: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let prunes: Vec<Value> = export(&w)
        .into_iter()
        .filter(|r| r["kind"] == "prune")
        .collect();
    assert!(!prunes.is_empty(), "no prune record");
    assert!(
        !export(&w).iter().any(|r| r["kind"] == "statement"),
        "the pruned session's statements are still there"
    );
    let v = portcullis_json(&w.daemon.config, &["audit", "verify", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["first_seq"].as_i64() > Some(1), "{v}");
    // A newer session is kept.
    assert!(
        psql_script(&w, &w.agent, "SELECT 2 AS k;\n")
            .status
            .success()
    );
    let s = portcullis_json(&w.daemon.config, &["sessions", "--json"]);
    assert_eq!(s.as_array().map(Vec::len), Some(1), "{s}");
}
