//! The PostgreSQL engine end to end: a real PostgreSQL server started by the test, real
//! clients in protected cgroups, the real daemon.

use std::process::Command;

use portcullis_tests::{pg::*, *};

#[test]
fn psql_works_through_the_gate() {
    let w = world("");
    let o = psql(&w, &w.agent, "disable", "SELECT 1 AS one, 'x'::text AS t");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(" one | t"), "{}", text(&o));
    let rec = w.daemon.logs.wait_for(
        "the connection record",
        std::time::Duration::from_secs(10),
        |v| is_connection(v) && v["protocol"] == "postgres",
    );
    assert_eq!(rec["end"], "closed", "{rec}");
}

#[test]
fn denied_statements_never_reach_the_server_and_the_session_state_is_the_servers() {
    let w = world("");
    w.pg.sql(
        "shop",
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2); ALTER TABLE t OWNER TO app;",
    );

    // Outside a transaction block: refused, the next statement runs.
    let o = psql(&w, &w.agent, "disable", "DROP TABLE t");
    let out = text(&o);
    assert!(out.contains("portcullis: Destructive DDL"), "{out}");
    assert!(out.contains("deny-destructive-ddl"), "{out}");
    assert_eq!(
        w.pg.sql("shop", "SELECT count(*) FROM t"),
        "2",
        "the table is still there"
    );
    // A dropped column's values are as gone as a dropped table's; a loaded library runs
    // inside the server.
    for (sql, rule) in [
        ("ALTER TABLE t DROP COLUMN id", "deny-destructive-ddl"),
        ("LOAD 'auto_explain'", "deny-load"),
    ] {
        let o = psql_cmd(&w, &w.agent, "disable")
            .args(["-v", "VERBOSITY=verbose", "-c", sql])
            .output()
            .expect("psql");
        let out = text(&o);
        assert!(
            out.contains(rule) && out.contains("ERROR:  42501"),
            "{sql}: {out}"
        );
    }
    assert_eq!(
        w.pg.sql("shop", "SELECT sum(id) FROM t"),
        "3",
        "id is still there"
    );

    // Inside a transaction block: the block is aborted, exactly as the server would do.
    let script = "BEGIN;\nSELECT 1;\nDROP TABLE t;\nSELECT 2;\nROLLBACK;\nSELECT 'after' AS a;";
    let via = psql_script(&w, &w.agent, script);
    let via = text(&via);
    assert!(
        via.contains("42501") || via.contains("portcullis: Destructive DDL"),
        "{via}"
    );
    assert!(
        via.contains("current transaction is aborted"),
        "SELECT 2 must fail in the aborted block: {via}"
    );
    assert!(
        via.contains("after"),
        "the session is usable after ROLLBACK: {via}"
    );

    // The server never saw the denied text.
    let log = w.pg.log();
    for sent in ["DROP TABLE t", "DROP COLUMN", "LOAD"] {
        assert!(!log.contains(sent), "the server saw {sent}:\n{log}");
    }
    assert!(
        log.contains("portcullis: statement refused by policy"),
        "{log}"
    );

    // A held statement that an approver denies is refused with the rule named (the
    // approval flow itself is tested in approvals.rs).
    let child = psql_cmd(&w, &w.agent, "disable")
        .args(["-c", "DELETE FROM t"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let id = loop {
        let v = portcullis_tests::portcullis_json(&w.daemon.config, &["approvals", "--json"]);
        if let Some(id) = v["pending"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "never held: {v}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let deny = portcullis_tests::portcullis_as(
        &w.daemon.config,
        portcullis_tests::As::Root,
        &["deny", &id, "--reason", "no"],
    );
    assert!(deny.status.success(), "{}", text(&deny));
    let out = text(&child.wait_with_output().expect("psql"));
    assert!(out.contains("approve-dml-without-where"), "{out}");
    assert!(out.contains("denied: no"), "{out}");
    assert_eq!(w.pg.sql("shop", "SELECT count(*) FROM t"), "2");
    assert!(!w.pg.log().contains("DELETE FROM t"));

    // The function-call protocol is refused (psql cannot send it; see the wire tests).
    let dec = w.daemon.logs.all();
    assert!(
        dec.iter()
            .any(|v| v["message"] == "decision" && v["rule"] == "deny-destructive-ddl")
    );
}

#[test]
fn connection_time_settings_that_would_escape_the_policies_are_refused() {
    let w = world("");
    let with_options = |options: &str, sql: &str| {
        text(
            &psql_cmd(&w, &w.agent, "disable")
                .env("PGOPTIONS", options)
                .args(["-c", sql])
                .output()
                .expect("psql"),
        )
    };
    // A role set in the startup packet would skip the SET ROLE rule.
    let out = with_options("-c role=postgres", "SELECT current_user");
    assert!(out.contains("setting a role in `options`"), "{out}");
    // A schema before pg_catalog would make `lower` or `=` someone else's code while the
    // rules take them for PostgreSQL's own: refused at connection time and as a statement.
    let out = with_options("-c search_path=public,pg_catalog", "SELECT 1");
    assert!(
        out.contains("search_path that puts a schema before pg_catalog"),
        "{out}"
    );
    let out = with_options("", "SET search_path TO public, pg_catalog");
    assert!(out.contains("deny-dangerous-functions"), "{out}");
    // A library loaded as the session starts runs inside the server, as LOAD would.
    let out = with_options("-c session_preload_libraries=auto_explain", "SELECT 1");
    assert!(
        out.contains("loading libraries at connection time"),
        "{out}"
    );
    // A path that leaves pg_catalog first is the usual case and passes, as do settings
    // that merely contain a refused word.
    let out = with_options(
        "-c search_path=public -c application_name=controller",
        "SHOW search_path",
    );
    assert!(out.contains("public") && !out.contains("ERROR"), "{out}");
    let log = w.pg.log();
    assert!(!log.contains("search_path TO public, pg_catalog"), "{log}");
}

/// In SJIS (and the other client-only encodings) a multibyte character can end in a
/// backslash byte: `ぁ\'` is, to a UTF-8 reader, an escaped quote inside a string, and to
/// the server, which converts the text from the client encoding before reading it, two
/// characters and the quote that ends the string. Such an encoding is refused at
/// connection time and as a SET; where the server uses one anyway (a role's default),
/// statements that are not all ASCII are refused as unclassifiable.
#[test]
fn an_encoding_that_reads_a_backslash_differently_cannot_smuggle_a_statement() {
    let w = world("");
    w.pg.sql(
        "shop",
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1); ALTER TABLE t OWNER TO app;",
    );
    let run = |encoding: Option<&str>, sql: &str| {
        let mut cmd = psql_cmd(&w, &w.agent, "disable");
        if let Some(e) = encoding {
            cmd.env("PGCLIENTENCODING", e);
        }
        text(&cmd.args(["-c", sql]).output().expect("psql"))
    };
    let smuggled = "SELECT E'\u{3041}\\'; DROP TABLE t; --'";
    // Asked for at connection time: refused.
    let out = run(Some("SJIS"), "SELECT 1");
    assert!(
        out.contains("client_encoding `SJIS` is not allowed"),
        "{out}"
    );
    // Asked for by a statement: refused.
    let out = run(None, "SET client_encoding TO 'SJIS'");
    assert!(out.contains("deny-dangerous-functions"), "{out}");
    // The role's default puts the session in SJIS: the smuggling statement is refused,
    // plain ASCII still runs.
    w.pg.sql("shop", "ALTER ROLE app SET client_encoding = 'SJIS'");
    let out = run(None, smuggled);
    assert!(out.contains("on_parse_error"), "{out}");
    let out = run(None, "SELECT count(*) AS n FROM t");
    assert!(out.contains(" n ") && !out.contains("ERROR"), "{out}");
    assert_eq!(
        w.pg.sql("shop", "SELECT count(*) FROM t"),
        "1",
        "t is still there"
    );
    assert!(!w.pg.log().contains("DROP TABLE t"));
}

#[test]
fn a_superuser_agent_is_counted_and_said_once() {
    let w = world("");
    let superuser_sessions = || {
        w.daemon.metric(
            "portcullis_pg_superuser_sessions_total",
            &[("target", "pg")],
        )
    };
    let warnings = || {
        w.daemon
            .logs
            .count_messages(|m| m.contains("database role is a superuser"))
    };
    let o = psql(&w, &w.agent, "disable", "SELECT 1");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!((superuser_sessions(), warnings()), (0.0, 0));
    // The server reports is_superuser in the session's parameters.
    w.pg.sql("shop", "ALTER ROLE app SUPERUSER");
    for _ in 0..2 {
        let o = psql(&w, &w.agent, "disable", "SELECT 1");
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(superuser_sessions(), 2.0);
    let log = w.daemon.logs.wait_for(
        "the superuser warning",
        std::time::Duration::from_secs(10),
        |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("database role is a superuser"))
        },
    );
    assert_eq!(log["db.user"], "app", "{log}");
    assert_eq!(warnings(), 1, "said once per target and role");
}

#[test]
fn tls_on_both_legs_with_sslmode_require_and_injected_scram() {
    let env_probe = Env::new();
    let secret = secret_file(&env_probe);
    let w = world(&format!(
        "upstream_tls = \"require\"\nauth = \"inject\"\ncredentials = {{ user = \"app\", password_file = \"{}\" }}",
        secret.display()
    ));
    // The agent connects as anyone with any password: Portcullis authenticates as `app`.
    let mut cmd = psql_cmd(&w, &w.agent, "require");
    cmd.env("PGPASSWORD", "whatever-the-agent-thinks").args([
        "-U",
        "agent",
        "-c",
        "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    ]);
    let o = cmd.output().expect("psql");
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("app          | t"),
        "authenticated as app over TLS: {out}"
    );
    let log = w.pg.log();
    assert!(
        !log.contains("whatever-the-agent-thinks"),
        "the agent's password never reaches the server"
    );
    assert!(
        !w.daemon.logs.tail().contains(APP_PASSWORD),
        "the real password is never logged"
    );
    // The generated certificate is not trusted by a verifying client.
    let o = psql(&w, &w.agent, "verify-full", "SELECT 1");
    assert!(
        !o.status.success(),
        "verify-full must not trust the generated certificate"
    );
}

#[test]
fn passthrough_scram_over_tls_needs_channel_binding_off() {
    // No policies: pg_stat_ssl is a view, and with the shipped masks and no catalog
    // credentials its columns would be masked as undecidable.
    let w = world_with("upstream_tls = \"require\"", Some(""));
    // libpq's default (channel_binding=prefer) detects the man in the middle: SCRAM refuses.
    let o = psql(&w, &w.agent, "require", "SELECT 1");
    assert!(!o.status.success());
    assert!(text(&o).contains("channel binding"), "{}", text(&o));
    // Without channel binding the exchange is relayed and works over TLS on both legs.
    let mut cmd = psql_cmd(&w, &w.agent, "require");
    cmd.env("PGCHANNELBINDING", "disable").args([
        "-c",
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    ]);
    let o = cmd.output().expect("psql");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(" t"), "{}", text(&o));
    // A plaintext client leg with a TLS server leg works with the default.
    let o = psql(&w, &w.agent, "disable", "SELECT 1");
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn extended_protocol_binary_pipelines_copy_notify_identical_through_the_gate() {
    let w = world_with("", Some(""));
    let direct = without_launcher(pc_pg(&w, &w.direct, "suite"));
    w.pg.sql("shop", "DROP TABLE items");
    let via = without_launcher(pc_pg(&w, &w.agent, "suite"));
    assert!(direct["result"]["ddl"] == true, "{direct}");
    assert_eq!(
        direct["result"]["binary_rows"].as_array().map(Vec::len),
        Some(20),
        "{direct}"
    );
    assert_eq!(direct["result"]["error"]["code"], "22012");
    assert!(
        direct["async"].to_string().contains("hello"),
        "notifications arrive: {direct}"
    );
    assert!(direct["async"].to_string().contains("a notice"), "{direct}");
    assert_eq!(
        via, direct,
        "through the gate the client sees exactly what it sees directly"
    );
}

#[test]
fn a_million_rows_stream_unchanged() {
    let w = world_with("", Some(""));
    let direct = without_launcher(pc_pg(&w, &w.direct, "big"));
    let via = without_launcher(pc_pg(&w, &w.agent, "big"));
    assert_eq!(direct["result"]["rows"], 1_000_000);
    assert_eq!(via, direct);
}

#[test]
fn a_long_query_is_cancelled_through_the_gate() {
    let w = world_with("", Some(""));
    let via = pc_pg(&w, &w.agent, "cancel");
    assert_eq!(
        via["result"]["result"]["code"], "57014",
        "query_canceled: {via}"
    );
    assert_eq!(via["result"]["cancel_sent"], true, "{via}");
    assert_eq!(via["result"]["stopped_within_10s"], true, "{via}");
    assert!(
        via["result"]["after"].to_string().contains("alive"),
        "{via}"
    );
    w.daemon.logs.wait_for(
        "the forwarded cancel",
        std::time::Duration::from_secs(5),
        |v| v["message"] == "cancel request forwarded",
    );
}

const WIRE_SCRIPT: &str = "\
Q CREATE TABLE w (id int, v text, b bytea); INSERT INTO w SELECT i, 'v' || i, decode('00ff' || lpad(to_hex(i), 4, '0'), 'hex') FROM generate_series(1, 50) i
WAIT 1
Q SELECT * FROM w ORDER BY id; SELECT count(*) FROM w; SELECT 1/0; SELECT 'not reached'
WAIT 1
P s1 SELECT id, v, b FROM w WHERE id > 10 ORDER BY id
B p1 s1 1
D P p1
E p1 5
E p1 0
S
WAIT 1
P - SELECT 'unnamed', now() IS NOT NULL
B - - 0
E - 0
P - SELECT 1/0
B - -
E - 0
P - SELECT 'skipped after the error'
S
WAIT 1
Q BEGIN
WAIT 1
Q SELECT 1/0
WAIT 1
Q SELECT 'in failed block'
WAIT 1
Q ROLLBACK
WAIT 1
Q COPY w (id, v) FROM STDIN
d 1000\tcopied\n
c
WAIT 1
Q COPY (SELECT id, v FROM w WHERE id >= 1000) TO STDOUT
WAIT 1
Q
WAIT 1
X
";

#[test]
fn data_rows_are_byte_identical_through_the_gate() {
    let w = world_with("", Some(""));
    let direct = wire(&w, &w.direct, WIRE_SCRIPT);
    w.pg.sql("shop", "DROP TABLE w");
    let via = wire(&w, &w.agent, WIRE_SCRIPT);
    let rows = direct.iter().filter(|v| v["t"] == "D").count();
    assert!(rows > 60, "{direct:?}");
    assert!(direct.iter().any(|v| v["code"] == "22012"));
    assert!(
        direct.iter().any(|v| v["code"] == "25P02"),
        "failed block: {direct:?}"
    );
    assert_eq!(via, direct);
}

#[test]
fn pipelined_denials_keep_the_protocol_in_step() {
    let w = world("");
    w.pg.sql(
        "shop",
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1); ALTER TABLE t OWNER TO app;",
    );
    let out = wire(
        &w,
        &w.agent,
        "\
P a SELECT id FROM t
B - a
E - 0
P b DROP TABLE t
B - b
E - 0
S
WAIT 1
P c SELECT 'still in step'
B - c
E - 0
S
WAIT 1
F 1598
WAIT 1
Q BEGIN
WAIT 1
P - TRUNCATE t
S
WAIT 1
Q SELECT 'aborted?'
WAIT 1
Q ROLLBACK
WAIT 1
X
",
    );
    let tags: Vec<String> = out
        .iter()
        .map(|v| {
            format!(
                "{}{}",
                v["t"].as_str().unwrap_or("?"),
                v["code"]
                    .as_str()
                    .map(|c| format!(":{c}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        tags,
        [
            // first pipeline: a runs; b is refused at Parse; the rest is skipped to Sync
            "1", "2", "D", "C", "E:42501", "Z", // the session goes on
            "1", "2", "D", "C", "Z", // the function-call message is refused
            "E:42501", "Z",
            // a refusal inside a block aborts the block, as the server's own error would
            "C", "Z", "E:42501", "Z", "E:25P02", "Z", "C", "Z",
        ],
        "{out:#?}"
    );
    assert!(out.iter().any(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("function-call"))
    }));
    let statuses: Vec<&str> = out
        .iter()
        .filter(|v| v["t"] == "Z")
        .filter_map(|v| v["status"].as_str())
        .collect();
    assert_eq!(statuses, ["I", "I", "I", "T", "E", "E", "I"], "{out:#?}");
    assert_eq!(w.pg.sql("shop", "SELECT count(*) FROM t"), "1");
    let log = w.pg.log();
    assert!(
        !log.contains("DROP TABLE t") && !log.contains("TRUNCATE t"),
        "{log}"
    );
}

/// A Python driver check (`tests/py/<script>`) run as an unprivileged user in `cgroup`:
/// the JSON line it prints.
fn python_check(w: &Pgw, script: &str, cgroup: &str) -> serde_json::Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(script);
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg(w.pg.addr().to_string())
        .env("PGPASSWORD", APP_PASSWORD)
        .env("HOME", &w.env.dir);
    without_launcher(run_json(&w.env, cgroup, Some(65534), cmd))
}

#[test]
fn psycopg3_sees_the_same_results() {
    let w = world_with("", Some(""));
    let run = |cg: &str| python_check(&w, "psycopg_check.py", cg);
    let direct = run(&w.direct);
    assert!(direct["ok"] == true, "{direct}");
    let via = run(&w.agent);
    assert_eq!(via, direct);
}

/// asyncpg (binary results, named prepared statements, a transaction block) against a
/// target without `credentials`, under the shipped policies: every value is what a direct
/// connection shows but the masked ones. The catalog is asked on asyncpg's own session
/// (also in the middle of its prepare, after a Flush, where it looks up the types it has
/// no codec for); arrays of text come in binary and are read element by element (one that
/// holds an address is nulled whole, the others pass), ranges of numbers pass, and the
/// database's own types (an enum, an array of it, a composite) are read as the session's
/// catalog says they are: asked before the Bind, once asyncpg's prepare has described
/// them.
#[test]
fn asyncpg_sees_its_tables_with_only_the_masked_values_changed() {
    let w = world("");
    let reset = "DELETE FROM contacts WHERE id > 2; SELECT setval('contacts_id_seq', 2)";
    w.pg.sql(
        "shop",
        "CREATE EXTENSION citext; CREATE TYPE mood AS ENUM ('happy', 'sad'); \
         CREATE TYPE pair AS (a int, b text); CREATE DOMAIN handle AS citext; \
         CREATE TABLE contacts (id serial PRIMARY KEY, name text, email text, tags text[], \
         score numeric, mood mood, moods mood[], card pair, handle handle, alias citext); \
         INSERT INTO contacts (name, email, tags, score, mood, moods, card, handle, alias) \
         VALUES ('Ann', 'ann@example.com', '{a,b}', 1.5, 'happy', '{happy,sad}', ROW(1, 'x'), \
                 'Ann', 'Ann@Example.com'), \
                ('Bo', 'bo@example.com', '{x,bo@example.com}', 2, 'sad', '{sad}', \
                 ROW(2, 'bo@example.com'), 'bo@example.com', 'Bo'); \
         ALTER TABLE contacts OWNER TO app;",
    );
    let run = |cg: &str| {
        w.pg.sql("shop", reset);
        python_check(&w, "asyncpg_check.py", cg)
    };
    let direct = run(&w.direct);
    assert_eq!(direct["count"], 4, "{direct}");
    let via = run(&w.agent);
    assert_eq!(direct["composite"], "<Record a=1 b='x'>", "{direct}");
    assert_eq!(
        direct["own_types"][0]["moods"],
        serde_json::json!(["happy", "sad"]),
        "{direct}"
    );
    // What the shipped masks make of the direct answer: `email` columns redacted, an
    // array or a record with an address in it nulled, an address in a citext column (or
    // a domain over one) redacted in place.
    fn masked(v: &serde_json::Value) -> serde_json::Value {
        use serde_json::Value as V;
        match v {
            V::Object(o) => V::Object(
                o.iter()
                    .map(|(k, x)| {
                        let m = match (k.as_str(), x) {
                            ("email", V::String(_)) => V::from("[REDACTED:email]"),
                            ("tags", V::Array(a))
                                if a.iter()
                                    .any(|e| e.as_str().is_some_and(|s| s.contains('@'))) =>
                            {
                                V::Null
                            }
                            ("card", V::String(s)) if s.contains('@') => V::Null,
                            ("handle" | "alias", V::String(s)) if s.contains('@') => {
                                V::from("[REDACTED:email]")
                            }
                            _ => masked(x),
                        };
                        (k.clone(), m)
                    })
                    .collect(),
            ),
            V::Array(a) => V::Array(a.iter().map(masked).collect()),
            x => x.clone(),
        }
    }
    assert_eq!(via, masked(&direct), "direct: {direct}");
    assert_eq!(
        via["rows"][0]["tags"],
        serde_json::json!(["a", "b"]),
        "{via}"
    );
    assert_eq!(via["rows"][1]["tags"], serde_json::Value::Null, "{via}");
    assert_eq!(via["rows"][0]["name"], "Ann", "{via}");
    assert_eq!(via["range"], "<Range [1, 5)>", "{via}");
    // The database's own types were read by what the catalog says they are, on the
    // session's connection: an enum, an array of it, a record without an address pass.
    assert_eq!(via["composite"], "<Record a=1 b='x'>", "{via}");
    assert_eq!(via["own_types"][0]["mood"], "happy", "{via}");
    assert_eq!(via["own_types"][0]["card"], "<Record a=1 b='x'>", "{via}");
    assert_eq!(
        via["own_types"][1]["card"],
        serde_json::Value::Null,
        "{via}"
    );
    assert_eq!(via["own_types"][1]["handle"], "[REDACTED:email]", "{via}");
}

#[test]
fn bad_input_ends_the_connection_with_a_fatal_error_and_nothing_else() {
    let w = world_with("stall_timeout = \"1s\"", Some(""));
    let fatal =
        |out: &[serde_json::Value]| out.iter().any(|v| v["t"] == "E" && v["code"] == "08P01");
    // A session that must not notice any of this.
    let mut other = psql_cmd(&w, &w.agent, "disable");
    other
        .args(["-c", "SELECT count(*) FROM generate_series(1, 3000000)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let other = other.spawn().expect("psql");
    let rss_before = rss_kib(w.daemon.child.id());

    // Garbage before the startup packet.
    let out = wire(
        &w,
        &w.agent,
        "PRESTARTUP 474554202f20485454502f312e310d0a0d0a\n",
    );
    let reply = out[0]["prestartup_reply_hex"].as_str().unwrap_or("");
    assert!(
        reply.starts_with("45") && reply.contains("3038503031"),
        "FATAL 08P01 expected: {out:?}"
    );

    for (what, raw) in [
        ("a length below the header", "RAW 5100000002"),
        ("a negative length", "RAW 51ffffffff"),
        ("a length of 2 GB", "RAW 447fffffff"),
        (
            "a length longer than the message, then silence",
            "RAW 510000001053454c",
        ),
    ] {
        let started = std::time::Instant::now();
        let out = wire(&w, &w.agent, &format!("{raw}\nREAD_TO_END\n"));
        assert!(fatal(&out), "{what}: {out:?}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{what}: took too long"
        );
    }
    // An unknown message type reaches the server, which ends the session itself.
    let out = wire(&w, &w.agent, "RAW 7a00000004\nREAD_TO_END\n");
    assert!(
        fatal(&out),
        "unknown message types are refused, not forwarded: {out:?}"
    );

    let other = other.wait_with_output().expect("psql");
    assert!(other.status.success(), "{}", text(&other));
    assert!(text(&other).contains("3000000"));
    assert!(
        w.daemon.status()["proxy"]["active"].as_u64().is_some(),
        "the daemon still answers"
    );
    let grown = rss_kib(w.daemon.child.id()).saturating_sub(rss_before);
    assert!(
        grown < 20 * 1024,
        "a 2 GB announcement must not be allocated: RSS grew {grown} KiB"
    );
    let ends: Vec<String> = w
        .daemon
        .logs
        .all()
        .iter()
        .filter(|v| is_connection(v))
        .map(|v| v["end"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        ends.iter()
            .filter(|e| *e == "protocol_error" || *e == "client_reset")
            .count()
            >= 5,
        "{ends:?}"
    );
}

/// The `user_functions` matcher tells PostgreSQL's own functions and operators by lists
/// taken from a server's catalog, and masking its relations: every function, operator and
/// relation name of `pg_catalog` on the server the tests run on is on them, and a function
/// created in the database is not.
#[test]
fn the_built_in_function_list_covers_the_servers_catalog() {
    use portcullis::policy::sql::builtins::{is_builtin, is_builtin_operator, is_builtin_relation};
    let env = Env::new();
    let pg = Pg::start(&env);
    // Every name `catalog` lists is known as PostgreSQL's own.
    let all_known = |what: &str, catalog: &str, at_least: usize, known: fn(&str) -> bool| {
        let names = pg.sql("postgres", catalog);
        let names: Vec<&str> = names
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert!(names.len() > at_least, "{} {what}", names.len());
        let missing: Vec<&&str> = names.iter().filter(|n| !known(n)).collect();
        assert!(
            missing.is_empty(),
            "{what} not in the built-in list: {missing:?}"
        );
    };
    all_known(
        "functions",
        "SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace",
        2500,
        is_builtin,
    );
    // An operator runs a function too.
    all_known(
        "operators",
        "SELECT DISTINCT oprname FROM pg_operator \
         WHERE oprnamespace = 'pg_catalog'::regnamespace",
        70,
        is_builtin_operator,
    );
    // Masking knows the catalog's relations without a catalog connection.
    all_known(
        "relations",
        "SELECT DISTINCT relname FROM pg_class \
         WHERE relnamespace = 'pg_catalog'::regnamespace \
         AND relkind IN ('r', 'v', 'm', 'p', 'f')",
        100,
        is_builtin_relation,
    );
    assert!(!is_builtin_relation("users"));
    pg.sql(
        "postgres",
        "CREATE FUNCTION refresh_stats() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    );
    let created = pg.sql(
        "postgres",
        "SELECT proname FROM pg_proc WHERE pronamespace <> 'pg_catalog'::regnamespace \
         AND proname = 'refresh_stats'",
    );
    assert_eq!(created.trim(), "refresh_stats");
    assert!(!is_builtin(created.trim()));
}

/// `pg_dump` as an unprivileged user in the agent's cgroup.
fn pg_dump(w: &Pgw, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(pg_bin().join("pg_dump"));
    cmd.args(["-h", "127.0.0.1", "-U", "app", "-d", "shop"])
        .args(["-p", &w.pg.port.to_string()])
        .args(args)
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("HOME", &w.env.dir);
    in_cgroup(&mut cmd, &w.env.cg_dir(&w.agent), Some(65534));
    cmd.output().expect("pg_dump")
}

/// The tools an agent reaches for first work through the gate with the shipped policies on
/// a target without `credentials` (the default configuration's): psql's describe commands
/// (array constructors, `OPERATOR(pg_catalog.~)`, columns of `pg_catalog`) and pg_dump
/// (`set_config`, unqualified catalog names, `OPERATOR(pg_catalog.=) ANY`). Table data
/// stays masked, and a session that may have made a relation standing in for a catalog
/// gets no trust in unqualified names.
#[test]
fn psql_describe_commands_and_pg_dump_work_without_a_catalog_connection() {
    let w = world("");
    w.pg.sql(
        "shop",
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text); \
         INSERT INTO users VALUES (1, 'ann@example.com', 'Ann'); \
         CREATE VIEW contacts AS SELECT id, email FROM users; \
         ALTER TABLE users OWNER TO app; ALTER VIEW contacts OWNER TO app;",
    );
    let run = |m: &str| {
        let o = psql(&w, &w.agent, "disable", m);
        let out = text(&o);
        assert!(o.status.success(), "{m}: {out}");
        assert!(!out.contains("REDACTED"), "{m}: {out}");
        out
    };
    // Names, types and owners, unmasked; nothing held for approval.
    let dt = run("\\dt");
    assert!(dt.contains("users") && dt.contains("app"), "{dt}");
    let d = run("\\d users");
    assert!(d.contains("email") && d.contains("users_pkey"), "{d}");
    assert!(run("\\du").contains("app"));
    assert!(run("\\dp").contains("contacts"));
    assert!(run("\\d+ contacts").contains("FROM users"));
    assert!(run("\\l").contains("shop"));

    // pg_dump: the schema as the server has it, the data masked as the rules say (the
    // catalog is asked on pg_dump's own session).
    let schema = pg_dump(&w, &["-s"]);
    let out = text(&schema);
    assert!(schema.status.success(), "{out}");
    assert!(out.contains("CREATE TABLE public.users"), "{out}");
    assert!(out.contains("CREATE VIEW public.contacts"), "{out}");
    let data = pg_dump(&w, &["-t", "users"]);
    let out = text(&data);
    assert!(data.status.success(), "{out}");
    assert!(out.contains("COPY public.users"), "{out}");
    assert!(!out.contains("ann@example.com"), "{out}");
    assert!(out.contains("1\t[REDACTED:email]\tAnn"), "{out}");

    // A temporary view named like a catalog is searched before it: the session's catalog
    // shows it (and what it reads), so the name is no longer only the catalog's.
    let o = psql_script(
        &w,
        &w.agent,
        "CREATE TEMP VIEW pg_class AS SELECT email AS relname FROM users;\n\
         SELECT upper(relname) AS shadow FROM pg_class;\n",
    );
    let out = text(&o);
    assert!(!out.to_lowercase().contains("ann@example.com"), "{out}");
    assert!(out.contains("[REDACTED:"), "{out}");
    // Another session has no such view: the same name is the catalog's.
    let o = psql(
        &w,
        &w.agent,
        "disable",
        "SELECT upper(relname) AS shadow FROM pg_class WHERE relname = 'users'",
    );
    assert!(text(&o).contains("USERS"), "{}", text(&o));
}

/// A schema dumped with pg_dump restores through the gate with psql, as an agent copying a
/// database's structure would: enums, domains, sequences owned by columns, identity
/// columns (`SEQUENCE NAME` among their options), partitioned tables and their
/// partitions, defaults, checks, foreign keys, partial and expression indexes, views,
/// materialized views (`WITH NO DATA`). The restored schema is the original's.
/// (`--no-owner`: a new owner is a privilege change the shipped policies hold; functions
/// are held as dynamic SQL, so the schema has none. The target has `credentials`: without
/// a catalog the materialized view's copy of `orders.user_id` could not be verified as
/// unmasked, and is refused.)
#[test]
fn a_pg_dump_schema_restores_through_the_gate() {
    let probe = Env::new();
    let secret = secret_file(&probe);
    let w = world(&format!(
        "credentials = {{ user = \"app\", password_file = \"{}\" }}",
        secret.display()
    ));
    w.pg.sql(
        "shop",
        "CREATE TYPE mood AS ENUM ('ok', 'sad'); \
         CREATE DOMAIN posint AS int CHECK (VALUE > 0); \
         CREATE TABLE users (id serial PRIMARY KEY, email text, feel mood, n posint); \
         CREATE UNIQUE INDEX users_lower_email ON users (lower(email)); \
         CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
           user_id int REFERENCES users (id), total numeric(10, 2) DEFAULT 0 \
           CHECK (total >= 0), created timestamptz DEFAULT now()); \
         CREATE INDEX orders_big ON orders (user_id) WHERE total > 100; \
         CREATE TABLE events (id int, at date) PARTITION BY RANGE (at); \
         CREATE TABLE events_2026 PARTITION OF events \
           FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
         CREATE VIEW big_orders AS SELECT id, total FROM orders WHERE total > 100; \
         CREATE MATERIALIZED VIEW order_totals AS SELECT user_id, sum(total) FROM orders \
           GROUP BY user_id;",
    );
    w.pg.sql("postgres", "CREATE DATABASE shop2 OWNER app");
    let dump = |db: &str| {
        let mut cmd = Command::new(pg_bin().join("pg_dump"));
        cmd.args([
            "-s",
            "--no-owner",
            "--no-privileges",
            "-U",
            "postgres",
            "-h",
        ])
        .arg(&w.pg.socket_dir)
        .args(["-p", &w.pg.port.to_string(), db]);
        stdout_of(&mut cmd, "pg_dump")
    };
    let schema = dump("shop");
    assert!(schema.contains("SEQUENCE NAME"), "{schema}");
    assert!(schema.contains("WITH NO DATA"), "{schema}");
    let mut restore = psql_cmd(&w, &w.agent, "disable");
    restore.args(["-v", "ON_ERROR_STOP=1", "-d", "shop2", "-f", "-"]);
    let o = output_with_input(&mut restore, schema.as_bytes());
    assert!(o.status.success(), "{}", text(&o));
    // Everything arrived, as it was (the dumps differ only in their random
    // `\restrict` keys).
    let same = |d: &str| {
        d.lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(same(&dump("shop2")), same(&schema));
}
