//! Masking end to end: a real PostgreSQL, real clients (psql with the simple protocol and
//! text results, tokio-postgres with the extended protocol and binary results), the real
//! daemon with a catalog connection. Masked values never reach the client, by column and
//! by detector, through expressions, `*`, views, CTEs, prepared statements and COPY.

use portcullis::digest::hex;
use portcullis_tests::{pg::*, *};
use serde_json::json;

const POLICY: &str = r#"
[[rule]]
id = "mask-people"
sql = { kinds = ["select", "copy_to", "fetch", "execute", "insert", "update", "delete"] }
action = "mask"
mask = { columns = ["people.email", "public.people.salary", "people.profile"], strategy = "redact" }

[[rule]]
id = "mask-cards"
sql = { kinds = ["select", "copy_to"] }
action = "mask"
mask = { detectors = ["credit_card"], strategy = "partial", keep = 4 }
"#;

const SETUP: &str = "
CREATE TABLE people (id int PRIMARY KEY, name text, email text, salary int, note text, profile jsonb);
INSERT INTO people VALUES
  (1, 'Alice', 'alice@example.com', 100000, 'card 4111 1111 1111 1111 on file', '{\"backup\": \"alice.b@example.org\", \"tier\": \"gold\"}'),
  (2, 'Bob', 'bob@example.com', 90000, 'nothing sensitive', '{\"tier\": \"silver\"}');
CREATE VIEW people_v AS SELECT id, name, email AS contact FROM people;
ALTER TABLE people OWNER TO app;
ALTER VIEW people_v OWNER TO app;
";

/// A gate whose target holds credentials (for the catalog), with `policy` (or the shipped
/// policies).
fn catalog_world(extra: &str, policy: Option<&str>) -> Pgw {
    let probe = Env::new();
    let secret = secret_file(&probe);
    let w = world_with(
        &format!(
            "credentials = {{ user = \"app\", password_file = \"{}\" }}\n{extra}",
            secret.display()
        ),
        policy,
    );
    // The secret lives with the world's environment.
    std::mem::forget(probe);
    w
}

/// The hex bodies of the messages of type `tag` in a `wire` run (`D`: data rows, `A`:
/// notifications), in order.
fn wire_hex<'a>(out: &'a [serde_json::Value], tag: &str) -> Vec<&'a str> {
    out.iter()
        .filter(|v| v["t"] == tag)
        .filter_map(|v| v["hex"].as_str())
        .collect()
}

/// The errors in a `wire` run: (SQLSTATE, message).
fn wire_errors(out: &[serde_json::Value]) -> Vec<(&str, &str)> {
    out.iter()
        .filter(|v| v["t"] == "E")
        .map(|v| {
            (
                v["code"].as_str().unwrap_or(""),
                v["message"].as_str().unwrap_or(""),
            )
        })
        .collect()
}

/// A gate with the catalog and the test policy, over the test tables.
fn masked_world(extra: &str, policy: &str) -> Pgw {
    let w = catalog_world(extra, Some(policy));
    w.pg.sql("shop", SETUP);
    w
}

/// A gate with the catalog and the shipped policies, over one `people` row whose e-mail
/// is alice's.
fn shipped_world_with_alice() -> Pgw {
    let w = catalog_world("", None);
    w.pg.sql(
        "shop",
        "CREATE TABLE people (id int, email text); \
         INSERT INTO people VALUES (1, 'alice@example.com'); ALTER TABLE people OWNER TO app;",
    );
    w
}

/// psql's unaligned, tuples-only output of one statement (simple protocol, text).
fn psql_rows(w: &Pgw, sql: &str) -> String {
    let mut cmd = psql_cmd(w, &w.agent, "disable");
    cmd.args(["-A", "-t", "-c", sql]);
    let o = cmd.output().expect("psql");
    text(&o).trim().to_owned()
}

#[test]
fn columns_are_masked_in_text_results_by_column_by_detector_and_through_expressions() {
    let w = masked_world("", POLICY);
    let r = |sql: &str| psql_rows(&w, sql);
    assert_eq!(
        r("SELECT id, name, email, salary FROM people ORDER BY id"),
        "1|Alice|[REDACTED:email]|\n2|Bob|[REDACTED:email]|",
        "a masked text column is redacted; a masked number becomes NULL"
    );
    assert_eq!(
        r(
            "SELECT upper(email), email || '', encode(convert_to(email, 'UTF8'), 'hex'), length(name) \
           FROM people ORDER BY id"
        ),
        "[REDACTED:email]|[REDACTED:email]|[REDACTED:email]|5\n\
         [REDACTED:email]|[REDACTED:email]|[REDACTED:email]|3"
    );
    let star = r("SELECT * FROM people WHERE id = 1");
    assert!(
        star.starts_with(
            "1|Alice|[REDACTED:email]||card ***************1111 on file|\"[REDACTED:profile]\""
        ),
        "{star}"
    );
    assert_eq!(
        r("SELECT contact FROM people_v ORDER BY id"),
        "[REDACTED:email]\n[REDACTED:email]"
    );
    assert_eq!(
        r("WITH x AS (SELECT email AS e FROM people) SELECT lower(e) FROM x ORDER BY 1"),
        "[REDACTED:email]\n[REDACTED:email]"
    );
    assert_eq!(
        r("SELECT profile->>'backup' FROM people WHERE id = 1"),
        "[REDACTED:profile]",
        "a value computed from a masked column is masked"
    );
    assert_eq!(
        r("SELECT name FROM people UNION ALL SELECT email FROM people"),
        ["[REDACTED:email]"; 4].join("\n"),
        "both branches of a UNION count: the whole output column is masked"
    );
    // Unmasked columns and statements are untouched.
    assert_eq!(
        r("SELECT id, name FROM people ORDER BY id"),
        "1|Alice\n2|Bob"
    );
    assert_eq!(
        r("SELECT 'alice@example.com'"),
        "alice@example.com",
        "no column rule, no detector hit"
    );
    // SQL-level PREPARE / EXECUTE: the prepared statement's masks apply.
    let o = psql_rows(
        &w,
        "PREPARE q AS SELECT email FROM people WHERE id = $1; EXECUTE q(1)",
    );
    assert_eq!(o, "PREPARE\n[REDACTED:email]");
    // The values never crossed to the client: the server sent them, the gate replaced them.
    assert!(
        w.pg.log()
            .contains("SELECT id, name, email, salary FROM people")
    );
}

#[test]
fn binary_results_are_masked_and_stay_decodable() {
    let w = masked_world("", POLICY);
    let v = pc_pg_with(
        &w,
        &w.agent,
        "rows",
        &[
            "SELECT id, name, email, salary, note, profile FROM people ORDER BY id",
            "SELECT upper(email) AS u, length(email) AS n FROM people ORDER BY id",
            "SELECT * FROM people_v ORDER BY id",
            "SELECT id, note FROM people ORDER BY id",
        ],
    );
    let res = &v["result"];
    assert_eq!(
        res[0][0],
        json!([
            1,
            "Alice",
            "[REDACTED:email]",
            null,
            "card ***************1111 on file",
            "[REDACTED:profile]"
        ]),
        "binary text, int4 and jsonb (version byte kept): {v}"
    );
    assert_eq!(res[0][1][2], "[REDACTED:email]");
    // length(email) is an integer computed from a masked column: NULL, never the length.
    assert_eq!(
        res[1],
        json!([["[REDACTED:email]", null], ["[REDACTED:email]", null]])
    );
    assert_eq!(
        res[2],
        json!([
            [1, "Alice", "[REDACTED:email]"],
            [2, "Bob", "[REDACTED:email]"]
        ])
    );
    assert_eq!(res[3][1], json!([2, "nothing sensitive"]));
    assert!(!v.to_string().contains("alice@example.com"), "{v}");
    assert!(!v.to_string().contains("4111 1111"), "{v}");
}

#[test]
fn copy_to_stdout_is_masked_row_by_row_and_binary_copy_is_refused() {
    let w = masked_world("", POLICY);
    assert_eq!(
        psql_rows(&w, "COPY people (id, email, note) TO STDOUT"),
        "1\t[REDACTED:email]\tcard ***************1111 on file\n2\t[REDACTED:email]\tnothing sensitive"
    );
    assert_eq!(
        psql_rows(
            &w,
            "COPY (SELECT id, upper(email) AS e, name FROM people ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)"
        ),
        "id,e,name\n1,[REDACTED:email],Alice\n2,[REDACTED:email],Bob"
    );
    // COPY output is text whatever the column type: a masked number is redacted, not NULL.
    let all = psql_rows(&w, "COPY people TO STDOUT (FORMAT csv)");
    assert!(
        all.starts_with("1,Alice,[REDACTED:email],[REDACTED:salary],card ***************1111 on file,[REDACTED:profile]"),
        "{all}"
    );
    let o = psql_rows(&w, "COPY people TO STDOUT (FORMAT binary)");
    assert!(
        o.contains("binary COPY of masked data is not supported"),
        "{o}"
    );
    assert!(o.contains("mask-people"), "names the rule: {o}");
    assert!(
        !w.pg.log().contains("FORMAT binary"),
        "the refused COPY never reached the server"
    );
}

#[test]
fn ddl_through_the_gate_refreshes_what_the_catalog_says() {
    let w = masked_world("", POLICY);
    let r = |sql: &str| psql_rows(&w, sql);
    assert_eq!(
        r("CREATE VIEW v2 AS SELECT id, name AS x FROM people"),
        "CREATE VIEW"
    );
    assert_eq!(r("SELECT x FROM v2 ORDER BY id"), "Alice\nBob");
    // Same view and column, now computed from the masked column: the cached answer must
    // not be used (it would still be fresh for the TTL).
    assert_eq!(
        r("CREATE OR REPLACE VIEW v2 AS SELECT id, email AS x FROM people"),
        "CREATE VIEW"
    );
    assert_eq!(
        r("SELECT x FROM v2 ORDER BY id"),
        "[REDACTED:email]\n[REDACTED:email]"
    );
    // Until the transaction that changed a definition ends, the catalog connection sees
    // the old one: a column read in it is undecidable, so masked (here the old definition
    // would have said `name`, and the value is an email).
    let o = psql_script(
        &w,
        &w.agent,
        "BEGIN;\nCREATE OR REPLACE VIEW v2 AS SELECT id, name AS x FROM people;\n\
         CREATE OR REPLACE VIEW v2 AS SELECT id, email AS x FROM people;\nSELECT x FROM v2 ORDER BY id;\nCOMMIT;\n",
    );
    assert!(text(&o).contains("[REDACTED:unresolved]"), "{}", text(&o));
    assert!(!text(&o).contains("example.com"), "{}", text(&o));
    // One message is one transaction too.
    assert_eq!(
        r("CREATE VIEW v3 AS SELECT name AS y FROM people; SELECT y FROM v3 ORDER BY 1"),
        "CREATE VIEW\n[REDACTED:unresolved]\n[REDACTED:unresolved]"
    );
    // Committed: now it is known, and nothing in it is masked.
    assert_eq!(r("SELECT y FROM v3 ORDER BY 1"), "Alice\nBob");
}

/// Without `credentials` (no catalog connection of Portcullis's own) the catalog is asked
/// on the session's own connection; what still cannot be decided (here, a cursor's rows
/// computed by an expression) is masked or refused as the rule says.
#[test]
fn undecidable_columns_are_masked_or_refused_as_the_rule_says() {
    let w = world_with("", Some(POLICY));
    w.pg.sql("shop", SETUP);
    let r = |sql: &str| psql_rows(&w, sql);
    assert_eq!(
        r("SELECT id, email FROM people WHERE id = 1"),
        "1|[REDACTED:email]",
        "the session's catalog knows people.email"
    );
    assert_eq!(
        r("SELECT contact FROM people_v WHERE id = 2"),
        "[REDACTED:email]"
    );
    assert_eq!(
        r("SELECT 42 AS answer"),
        "42",
        "reads no table: nothing to decide"
    );
    let cursor = "BEGIN;\nDECLARE c CURSOR FOR SELECT id, lower(name) AS n FROM people ORDER BY id;\n\
                  FETCH 1 FROM c;\nCOMMIT;\n";
    let o = text(&psql_script(&w, &w.agent, cursor));
    assert!(o.contains("[REDACTED:unresolved]"), "{o}");
    assert!(!o.contains("alice"), "{o}");
    drop(w);

    let deny = POLICY.replace(
        "strategy = \"redact\" }",
        "strategy = \"redact\", unresolved = \"deny\" }",
    );
    let w = world_with("", Some(&deny));
    w.pg.sql("shop", SETUP);
    assert_eq!(
        psql_rows(&w, "SELECT name FROM people WHERE id = 2"),
        "Bob",
        "decided by the session's catalog: nothing to refuse"
    );
    let o = text(&psql_script(&w, &w.agent, cursor));
    assert!(o.contains("portcullis"), "{o}");
    assert!(!o.contains("alice"), "{o}");
}

#[test]
fn a_million_masked_rows_stream_with_bounded_memory() {
    let w = masked_world(
        "",
        &POLICY.replace("\"people.email\"", "\"people.email\", \"big.email\""),
    );
    w.pg.sql(
        "shop",
        "CREATE TABLE big AS SELECT g AS id, 'user' || g || '@example.com' AS email, md5(g::text) AS name \
         FROM generate_series(1, 1000000) g; ALTER TABLE big OWNER TO app",
    );
    let before = rss_kib(w.daemon.child.id());
    let v = pc_pg_with(
        &w,
        &w.agent,
        "distinct",
        &["SELECT id, email, name FROM big"],
    );
    let after = rss_kib(w.daemon.child.id());
    assert_eq!(v["result"]["rows"], 1_000_000, "{v}");
    assert_eq!(
        v["result"]["distinct"],
        json!(["[REDACTED:email]"]),
        "every row masked: {v}"
    );
    assert!(
        after < before + 20 * 1024,
        "daemon RSS grew from {before} KiB to {after} KiB while streaming"
    );
}

/// Prepared statements share one namespace on the server, whichever way they were made:
/// a Parse runs with SQL `EXECUTE`, a `PREPARE` with Bind/Execute, and DEALLOCATE drops
/// one name. Each way of reaching a statement prepared under a mask returns masked rows
/// (under the shipped policies, whose masks do not name `execute`); a name in use cannot
/// be prepared again under other text (the server would keep the old statement), a name
/// whose Parse or PREPARE failed at the server is free again, and a name never prepared
/// through the gate is refused, not run.
#[test]
fn every_way_to_a_prepared_statement_is_masked_with_it() {
    let w = shipped_world_with_alice();
    let out = wire(
        &w,
        &w.agent,
        "\
P s1 SELECT email FROM people
S
WAIT 1
Q EXECUTE s1
WAIT 1
Q PREPARE p1 AS SELECT 1
WAIT 1
Q PREPARE p2 AS SELECT email FROM people
WAIT 1
Q DEALLOCATE p1
WAIT 1
Q EXECUTE p2
WAIT 1
B - p2
E - 0
S
WAIT 1
P s1 SELECT 1
B - s1
E - 0
S
WAIT 1
B - s1
E - 0
S
WAIT 1
Q PREPARE p2 AS SELECT 1
WAIT 1
Q EXECUTE nosuch
WAIT 1
B - nosuch
E - 0
S
WAIT 1
Q DISCARD ALL
WAIT 1
P s1 SELECT 1
B - s1
E - 0
S
WAIT 1
P s2 SELECT email FROM peeple
S
WAIT 1
P s2 SELECT email FROM people
B - s2
E - 0
S
WAIT 1
Q PREPARE p4 AS SELECT email FROM peeple
WAIT 1
Q PREPARE p4 AS SELECT email FROM people
WAIT 1
Q EXECUTE p4
WAIT 1
Q PREPARE p5 AS SELECT email FROM people; SELECT 1/0; PREPARE p6 AS SELECT 1
WAIT 1
Q EXECUTE p5
WAIT 1
Q PREPARE p6 AS SELECT 2
WAIT 1
X
",
    );
    let masked = format!("0001{:08x}{}", 16, hex(b"[REDACTED:email]"));
    let rows: Vec<&str> = out
        .iter()
        .filter_map(|v| v["hex"].as_str())
        .filter(|h| !h.is_empty())
        .collect();
    // EXECUTE of a Parse, EXECUTE after another name's DEALLOCATE, Bind of a PREPARE, Bind
    // of the first s1 after the refused second one; `SELECT 1` after DISCARD ALL; then the
    // names whose first Parse and PREPARE failed at the server, prepared again; then a
    // PREPARE that completed before a later statement of its query failed (the server
    // keeps it), while the one after the failure was never made and is free.
    assert_eq!(
        rows,
        [
            masked.as_str(),
            &masked,
            &masked,
            &masked,
            &format!("0001{:08x}31", 1),
            &masked,
            &masked,
            &masked,
        ],
        "{out:#?}"
    );
    let errors = wire_errors(&out);
    assert_eq!(errors.len(), 7, "{out:#?}");
    for ((code, m), (want_code, what)) in errors.iter().zip([
        ("42501", "\"s1\" already exists"),
        ("42501", "\"p2\" already exists"),
        ("42501", "\"nosuch\" was not prepared through Portcullis"),
        ("42501", "\"nosuch\" was not prepared through Portcullis"),
        // The server's own errors: the names stay free.
        ("42P01", "relation \"peeple\" does not exist"),
        ("42P01", "relation \"peeple\" does not exist"),
        ("22012", "division by zero"),
    ]) {
        assert_eq!(*code, want_code, "{m}");
        assert!(m.contains(what), "{m}");
    }
    // Every exchange ended with ReadyForQuery: the session stayed in step throughout.
    assert_eq!(out.iter().filter(|v| v["t"] == "Z").count(), 22, "{out:#?}");
}

/// Side channels of a masked read, under the shipped policies: `pg_notify` would hand rows
/// to a listener (the caller) unmasked, and an error can quote a value (`email::int`).
/// The first is refused; the second's text is withheld, in both protocols, while an error
/// that quotes only what the client wrote (a mistyped column) still reaches it.
#[test]
fn errors_and_notifications_do_not_carry_masked_values() {
    let w = shipped_world_with_alice();
    let out = wire(
        &w,
        &w.agent,
        "\
Q LISTEN ch
WAIT 1
Q SELECT pg_notify('ch', email) FROM people
WAIT 1
Q SELECT email::int FROM people
WAIT 1
P - SELECT email::int FROM people
B - -
E - 0
S
WAIT 1
Q SELECT emial FROM people
WAIT 1
X
",
    );
    let text = serde_json::to_string(&out).expect("json");
    let alice = hex(b"alice@example");
    assert!(
        !text.contains("alice@example") && !text.contains(&alice),
        "a masked value got out: {out:#?}"
    );
    assert!(
        !out.iter().any(|v| v["t"] == "A"),
        "no notification: {out:#?}"
    );
    let errors = wire_errors(&out);
    assert_eq!(errors.len(), 4, "{out:#?}");
    assert_eq!(errors[0].0, "42501");
    assert!(
        errors[0].1.contains("reaches beyond the data"),
        "{errors:?}"
    );
    for (code, message) in &errors[1..3] {
        assert_eq!(*code, "22P02");
        assert!(message.contains("was withheld"), "{errors:?}");
    }
    assert_eq!(errors[3], ("42703", "column \"emial\" does not exist"));
}

#[test]
fn copies_of_masked_columns_are_refused_unless_a_mask_covers_where_they_go() {
    // The shipped policies mask `*.email`, and check the copies INSERT, UPDATE and
    // CREATE TABLE make.
    let w = shipped_world_with_alice();
    w.pg.sql(
        "shop",
        "CREATE TABLE notes (id serial, body text); CREATE TABLE archive (email text); \
         ALTER TABLE notes OWNER TO app; ALTER TABLE archive OWNER TO app; \
         CREATE MATERIALIZED VIEW mv AS SELECT id, email FROM people; \
         ALTER MATERIALIZED VIEW mv OWNER TO app;",
    );
    let out = wire(
        &w,
        &w.agent,
        "\
Q CREATE TABLE t1 AS SELECT email AS x FROM people
WAIT 1
Q CREATE VIEW v AS SELECT email AS contact FROM people
WAIT 1
Q INSERT INTO notes (body) SELECT contact FROM v
WAIT 1
P - INSERT INTO notes (body) SELECT upper(email) FROM people
B - -
E - 0
S
WAIT 1
Q UPDATE people SET email = upper(email) WHERE id = 1
WAIT 1
Q INSERT INTO archive (email) SELECT email FROM people
WAIT 1
Q INSERT INTO notes (body) SELECT id::text FROM people
WAIT 1
Q CREATE VIEW w AS SELECT id AS c FROM people; INSERT INTO notes (body) SELECT c::text FROM w
WAIT 1
Q ALTER TABLE people RENAME COLUMN email TO contact
WAIT 1
Q SELECT email FROM archive
WAIT 1
Q BEGIN
WAIT 1
Q CREATE TABLE scratch (a text)
WAIT 1
Q INSERT INTO scratch (a) SELECT id::text FROM people
WAIT 1
Q COMMIT
WAIT 1
Q ALTER MATERIALIZED VIEW mv RENAME COLUMN email TO contact
WAIT 1
X
",
    );
    let errors = wire_errors(&out);
    assert_eq!(errors.len(), 6, "{out:#?}");
    // A materialized view stores its rows: renamed, its column would be read unmasked.
    assert_eq!(errors[5].0, "42501", "{errors:?}");
    assert!(
        errors[5].1.contains("mv.email, which is masked") && errors[5].1.contains("mv.contact"),
        "{errors:?}"
    );
    for (code, message) in errors[..3].iter().chain(&errors[4..5]) {
        assert_eq!(*code, "42501", "{errors:?}");
        assert!(
            message.contains("mask-pii-columns")
                && message.contains("people.email, which is masked"),
            "{errors:?}"
        );
    }
    assert!(
        errors[0].1.contains("into t1.x, which no mask covers"),
        "{errors:?}"
    );
    assert!(
        errors[1].1.contains("into notes.body"),
        "through the view: {errors:?}"
    );
    assert!(errors[4].1.contains("into people.contact"), "{errors:?}");
    // A view made earlier in the same message is not in the catalog yet.
    assert_eq!(errors[3].0, "42501");
    assert!(
        errors[3].1.contains("cannot verify") && errors[3].1.contains("definitions changed"),
        "{errors:?}"
    );
    // What was let through ran; the copy into a column the mask covers reads back masked.
    let rows = wire_hex(&out, "D");
    assert_eq!(rows.len(), 1, "{out:#?}");
    let redacted = hex(b"[REDACTED:email]");
    assert!(rows[0].ends_with(&redacted), "{out:#?}");
    assert_eq!(
        w.pg.sql("shop", "SELECT string_agg(body, ',') FROM notes")
            .trim(),
        "1",
        "only the unmasked copy was made"
    );
    assert_eq!(
        w.pg.sql("shop", "SELECT email FROM archive").trim(),
        "ALICE@EXAMPLE.COM"
    );
    // A table made earlier in the transaction does not make other tables' columns
    // unverifiable: only what the session redefined is.
    assert_eq!(w.pg.sql("shop", "SELECT a FROM scratch").trim(), "1");
    assert_eq!(
        w.pg.sql(
            "shop",
            "SELECT to_regclass('t1') IS NULL, to_regclass('w') IS NULL"
        )
        .trim(),
        "t|t"
    );
    // The refused statements never reached the server.
    let log = w.pg.log();
    assert!(!log.contains("AS x FROM people"), "{log}");
    assert!(!log.contains("SELECT contact FROM v"), "{log}");
    assert!(!log.contains("SELECT upper(email) FROM people"), "{log}");
    assert!(!log.contains("RENAME COLUMN"), "{log}");
    assert_eq!(
        w.pg.sql(
            "shop",
            "SELECT attname FROM pg_attribute WHERE attrelid = 'mv'::regclass AND attnum = 2"
        )
        .trim(),
        "email"
    );
}

/// Built-in functions that read every row of a table, schema or database named in a
/// string, or run a query given as text, return values no column mask follows: they are
/// dynamic SQL, for the policies to refuse or hold (here: refuse).
#[test]
fn functions_that_read_relations_named_in_strings_are_dynamic_sql() {
    let policy = format!(
        "{POLICY}\n[[rule]]\nid = \"deny-dynamic\"\nsql = {{ dynamic_sql = true }}\naction = \"deny\"\n"
    );
    let w = masked_world("", &policy);
    let out = wire(
        &w,
        &w.agent,
        "\
Q SELECT table_to_xml('people', true, false, '')
WAIT 1
Q SELECT schema_to_xml('public', true, false, '')
WAIT 1
Q SELECT word FROM ts_stat('SELECT to_tsvector(''simple'', salary::text) FROM people')
WAIT 1
Q BEGIN; DECLARE c CURSOR FOR SELECT salary FROM people; SELECT cursor_to_xml('c', 10, true, false, '')
WAIT 1
Q ROLLBACK
WAIT 1
Q SELECT table_to_xmlschema('people', true, false, '') IS NOT NULL
WAIT 1
X
",
    );
    let errors = wire_errors(&out);
    assert_eq!(errors.len(), 4, "{out:#?}");
    for (code, message) in &errors {
        assert_eq!(*code, "42501", "{errors:?}");
        assert!(message.contains("deny-dynamic"), "{errors:?}");
    }
    let shown = serde_json::to_string(&out).expect("json");
    for secret in ["100000", "90000", "alice@example.com"] {
        assert!(
            !shown.contains(&hex(secret.as_bytes())),
            "{secret} reached the client: {out:#?}"
        );
    }
    // The schema of a table is no row of it.
    assert_eq!(wire_hex(&out, "D").len(), 1, "{out:#?}");
}

/// A sequence's value and an advisory lock's key are read back by any statement: set from a
/// masked column they would carry it out. Wherever such a call is (select list, `WHERE`, a
/// nested query) the gate traces what it keeps and refuses masked columns (the copy check);
/// where it does not trace (a table function's arguments in `FROM`) the call is the
/// `side_channel` danger (here: refused). Set from literals or unmasked columns they run:
/// a job queue's worker locking the id of the job it takes is not held up.
#[test]
fn values_kept_by_sequences_and_advisory_locks_cannot_come_from_masked_columns() {
    let policy = format!(
        "{POLICY}\n[[rule]]\nid = \"deny-side-channels\"\nsql = {{ dangerous_functions = [\"side_channel\"] }}\naction = \"deny\"\n"
    );
    let w = masked_world("", &policy);
    w.pg.sql("shop", "CREATE SEQUENCE s; ALTER SEQUENCE s OWNER TO app;");
    let out = wire(
        &w,
        &w.agent,
        "\
Q SELECT setval('s', salary) FROM people WHERE id = 1
WAIT 1
Q SELECT pg_advisory_lock(salary) FROM people WHERE id = 1
WAIT 1
Q SELECT id FROM people WHERE pg_try_advisory_lock(salary)
WAIT 1
Q SELECT 1 WHERE EXISTS (SELECT FROM people WHERE pg_try_advisory_lock(salary))
WAIT 1
Q SELECT 1 FROM people p, LATERAL pg_advisory_xact_lock(p.id, p.salary)
WAIT 1
Q SELECT id FROM people WHERE id = 1 AND pg_try_advisory_lock(id)
WAIT 1
Q SELECT setval('s', (SELECT max(id) FROM people))
WAIT 1
Q SELECT last_value FROM s
WAIT 1
Q SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 1
WAIT 1
Q SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid > 2
WAIT 1
X
",
    );
    let errors = wire_errors(&out);
    assert_eq!(errors.len(), 5, "{out:#?}");
    for (code, message) in &errors[..4] {
        assert_eq!(*code, "42501", "{errors:?}");
        assert!(
            message.contains("mask-people")
                && message.contains("would keep a value computed from public.people.salary"),
            "{errors:?}"
        );
    }
    assert_eq!(errors[4].0, "42501");
    assert!(errors[4].1.contains("deny-side-channels"), "{errors:?}");
    let rows = wire_hex(&out, "D");
    assert_eq!(rows.len(), 5, "{out:#?}");
    // The job's lock was taken (id 1); the sequence repair ran (max(id) = 2); the sequence
    // never held 100000; the one advisory lock is the job's.
    assert!(rows[0].ends_with(&hex(b"1")), "{out:#?}");
    assert!(rows[1].ends_with(&hex(b"2")), "{out:#?}");
    assert!(rows[2].ends_with(&hex(b"2")), "{out:#?}");
    assert!(rows[3].ends_with(&hex(b"1")), "{out:#?}");
    assert!(rows[4].ends_with(&hex(b"0")), "{out:#?}");
    assert!(
        !serde_json::to_string(&out)
            .expect("json")
            .contains(&hex(b"100000"))
    );
}

/// A foreign table's rows live on another server, where no mask of this gateway applies:
/// a masked column copied into one (directly, through a partitioned table with a foreign
/// partition, through a view over one) is refused, though the rule covers the place by
/// name. The foreign server here is a second database of the test server, reached over
/// its Unix socket.
#[test]
fn copies_of_masked_columns_into_foreign_tables_are_refused() {
    let w = shipped_world_with_alice();
    w.pg.sql("postgres", "CREATE DATABASE other");
    w.pg.sql(
        "other",
        "CREATE TABLE remote_people (id int, email text); \
         INSERT INTO remote_people VALUES (7, 'seven@example.net')",
    );
    w.pg.sql(
        "shop",
        &format!(
            "CREATE EXTENSION postgres_fdw; \
             CREATE SERVER elsewhere FOREIGN DATA WRAPPER postgres_fdw \
               OPTIONS (host '{}', port '{}', dbname 'other'); \
             CREATE USER MAPPING FOR app SERVER elsewhere \
               OPTIONS (user 'postgres', password_required 'false'); \
             CREATE FOREIGN TABLE remote_people (id int, email text) SERVER elsewhere; \
             CREATE TABLE everyone (id int, email text) PARTITION BY RANGE (id); \
             CREATE FOREIGN TABLE everyone_far PARTITION OF everyone \
               FOR VALUES FROM (0) TO (1000) SERVER elsewhere \
               OPTIONS (table_name 'remote_people'); \
             CREATE VIEW remote_v AS SELECT id, email FROM remote_people; \
             CREATE TABLE local_copy (email text); \
             GRANT ALL ON remote_people, everyone, everyone_far, remote_v, local_copy TO app; \
             CREATE TABLE spare (id int, email text) PARTITION BY RANGE (id); \
             CREATE FOREIGN TABLE spare_far (id int, email text) SERVER elsewhere \
               OPTIONS (table_name 'remote_people'); \
             ALTER TABLE spare OWNER TO app; ALTER FOREIGN TABLE spare_far OWNER TO app;",
            w.pg.socket_dir.display(),
            w.pg.port
        ),
    );
    let out = wire(
        &w,
        &w.agent,
        "\
Q INSERT INTO remote_people (id, email) SELECT id, email FROM people
WAIT 1
Q INSERT INTO everyone SELECT id, email FROM people
WAIT 1
Q UPDATE remote_v SET email = p.email FROM people p WHERE remote_v.id = 7
WAIT 1
Q INSERT INTO remote_people (id, email) VALUES (8, 'agent@example.net')
WAIT 1
Q INSERT INTO local_copy (email) SELECT email FROM people
WAIT 1
Q SELECT email FROM remote_people ORDER BY id
WAIT 1
Q BEGIN
WAIT 1
Q ALTER TABLE spare ATTACH PARTITION spare_far FOR VALUES FROM (0) TO (1000)
WAIT 1
Q INSERT INTO spare (id, email) SELECT id, email FROM people
WAIT 1
Q COMMIT
WAIT 1
X
",
    );
    let errors = wire_errors(&out);
    assert_eq!(errors.len(), 4, "{out:#?}");
    for ((code, message), dest) in
        errors[..3]
            .iter()
            .zip(["remote_people.email", "everyone.email", "remote_v.email"])
    {
        assert_eq!(*code, "42501", "{errors:?}");
        assert!(
            message.contains("mask-pii-columns")
                && message.contains("people.email, which is masked")
                && message.contains(dest)
                && message.contains("stored on another server"),
            "{dest}: {errors:?}"
        );
    }
    // A foreign table attached in the open transaction, which the catalog connection does
    // not see: where the parent's rows go is not known until the transaction ends.
    assert_eq!(errors[3].0, "42501", "{errors:?}");
    assert!(
        errors[3]
            .1
            .contains("cannot verify in the catalog that spare.email stores its rows"),
        "{errors:?}"
    );
    // What is no copy ran, and the foreign table reads back masked.
    let rows = wire_hex(&out, "D");
    let redacted = hex(b"[REDACTED:email]");
    assert_eq!(rows.len(), 2, "{out:#?}");
    assert!(rows.iter().all(|h| h.ends_with(&redacted)), "{out:#?}");
    assert_eq!(
        w.pg.sql(
            "other",
            "SELECT string_agg(email, ',' ORDER BY id) FROM remote_people"
        )
        .trim(),
        "seven@example.net,agent@example.net",
        "no masked value reached the other server"
    );
    assert_eq!(
        w.pg.sql("shop", "SELECT email FROM local_copy").trim(),
        "alice@example.com",
        "a copy into a local place the rule covers runs"
    );
    let log = w.pg.log();
    assert!(!log.contains("SELECT id, email FROM people"), "{log}");
    assert!(!log.contains("SET email = p.email"), "{log}");
}

/// An INSERT that names no columns, or spreads a table's `*`, stores by position: the
/// catalog says which column each value lands in, so a copy into covered columns runs and
/// one into an uncovered column is refused by its name; a table the catalog cannot show
/// yet (made in the same transaction) cannot be placed, and the copy is refused.
#[test]
fn inserts_by_position_are_placed_by_the_catalog() {
    let w = shipped_world_with_alice();
    w.pg.sql(
        "shop",
        "CREATE TABLE people_copy (LIKE people); CREATE TABLE notes (id int, body text); \
         ALTER TABLE people_copy OWNER TO app; ALTER TABLE notes OWNER TO app;",
    );
    let out = wire(
        &w,
        &w.agent,
        "\
Q INSERT INTO people_copy SELECT * FROM people
WAIT 1
Q INSERT INTO people_copy SELECT id, email FROM people
WAIT 1
Q INSERT INTO notes SELECT id, email FROM people
WAIT 1
Q INSERT INTO notes SELECT * FROM people
WAIT 1
Q SELECT email FROM people_copy
WAIT 1
Q BEGIN
WAIT 1
Q CREATE TABLE scratch (id int, body text)
WAIT 1
Q INSERT INTO scratch SELECT * FROM people
WAIT 1
Q ROLLBACK
WAIT 1
X
",
    );
    let errors = wire_errors(&out);
    assert_eq!(errors.len(), 3, "{out:#?}");
    for (code, message) in &errors {
        assert_eq!(*code, "42501", "{errors:?}");
        assert!(
            message.contains("mask-pii-columns")
                && message.contains("people.email, which is masked"),
            "{errors:?}"
        );
    }
    assert!(errors[0].1.contains("into notes.body"), "{errors:?}");
    assert!(errors[1].1.contains("into notes.body"), "{errors:?}");
    assert!(
        errors[2].1.contains("scratch by position")
            && errors[2].1.contains("does not show which column"),
        "{errors:?}"
    );
    // Both copies into people_copy ran, and read back masked.
    let rows = wire_hex(&out, "D");
    assert_eq!(rows.len(), 2, "{out:#?}");
    let redacted = hex(b"[REDACTED:email]");
    for r in rows {
        assert!(r.ends_with(&redacted), "{out:#?}");
    }
    assert_eq!(
        w.pg.sql(
            "shop",
            "SELECT count(*) FROM people_copy WHERE email = 'alice@example.com'"
        )
        .trim(),
        "2"
    );
    assert_eq!(w.pg.sql("shop", "SELECT count(*) FROM notes").trim(), "0");
    let log = w.pg.log();
    assert!(!log.contains("INSERT INTO notes"), "{log}");
    assert!(!log.contains("INSERT INTO scratch"), "{log}");
}

/// In the extended protocol the values are parameters, not part of the statement's text:
/// an error that quotes what the client sent as a parameter reaches it whole, one that
/// quotes a stored value it did not send is still withheld.
#[test]
fn errors_may_quote_the_parameters_the_client_sent() {
    let w = shipped_world_with_alice();
    w.pg.sql(
        "shop",
        "ALTER TABLE people ADD UNIQUE (email), ADD COLUMN n int CHECK (n >= 0);",
    );
    let out = wire(
        &w,
        &w.agent,
        "\
P - INSERT INTO people (id, email) VALUES ($1, $2)
BP - - 2 alice@example.com
E - 0
S
WAIT 1
P - UPDATE people SET n = $1 WHERE id = 1
BP - - -5
E - 0
S
WAIT 1
X
",
    );
    let errors: Vec<&serde_json::Value> = out.iter().filter(|v| v["t"] == "E").collect();
    assert_eq!(errors.len(), 2, "{out:#?}");
    assert_eq!(errors[0]["code"], "23505");
    assert_eq!(
        errors[0]["detail"], "Key (email)=(alice@example.com) already exists.",
        "the client's own parameter: {out:#?}"
    );
    assert_eq!(errors[1]["code"], "23514");
    let detail = errors[1]["detail"].as_str().unwrap_or_default();
    assert!(
        !detail.contains("alice@example.com") && detail.contains("withheld"),
        "a stored value the client did not send: {out:#?}"
    );
}

/// Without a catalog connection nothing can be verified (a table name may be a view over
/// a masked column): reads of table columns are masked, and copies of them into places no
/// mask covers are refused; a column computed from itself is no copy.
#[test]
fn without_credentials_the_sessions_catalog_verifies_copies() {
    let w = world_with("", None);
    w.pg.sql(
        "shop",
        "CREATE TABLE items (id int, n int, label text, email text); \
         INSERT INTO items VALUES (1, 0, 'a', 'x@example.com'); \
         ALTER TABLE items OWNER TO app;",
    );
    let out = wire(
        &w,
        &w.agent,
        "\
Q UPDATE items SET n = n + 1 WHERE id = 1
WAIT 1
Q UPDATE items SET label = n::text WHERE id = 1
WAIT 1
Q BEGIN
WAIT 1
Q UPDATE items SET label = email WHERE id = 1
WAIT 1
Q ROLLBACK
WAIT 1
X
",
    );
    let errors = wire_errors(&out);
    assert_eq!(errors.len(), 1, "{out:#?}");
    assert_eq!(errors[0].0, "42501");
    assert!(errors[0].1.contains("email"), "{errors:?}");
    assert_eq!(
        w.pg.sql("shop", "SELECT n, label FROM items").trim(),
        "1|1",
        "the self-update and the copy of an unmasked column ran (the catalog, asked on \
         the session's connection, verified it); the copy of the masked one did not"
    );
}

/// A session that LISTENs receives whatever payload other sessions or triggers computed;
/// under the shipped policies the detectors mask it. (The notifying session here is the
/// listener itself: the server delivers its own notifications to it exactly as it does
/// another session's, after the transaction, so the test does not depend on timing.)
#[test]
fn notification_payloads_go_through_the_detectors() {
    let w = shipped_world_with_alice();
    let out = wire(
        &w,
        &w.agent,
        "\
Q LISTEN ch
WAIT 1
Q NOTIFY ch, 'signup alice@example.com'
WAIT 1
Q NOTIFY ch, 'job 42 done'
WAIT 1
X
",
    );
    let payloads = wire_hex(&out, "A");
    assert_eq!(payloads.len(), 2, "{out:#?}");
    // pid, then the channel and the payload, each NUL-terminated.
    assert!(
        payloads[0].ends_with(&format!(
            "{}00{}00",
            hex(b"ch"),
            hex(b"signup [REDACTED:email]")
        )),
        "{out:#?}"
    );
    assert!(
        payloads[1].ends_with(&format!("{}00{}00", hex(b"ch"), hex(b"job 42 done"))),
        "{out:#?}"
    );
}

/// Without `credentials` the catalog is asked on the session's own connection, between
/// the client's requests, and the client cannot tell: its unnamed statement survives a
/// lookup, and a lookup that fails inside its transaction block (here, a lock it cannot
/// get in time) is rolled back to a savepoint of the gate's, so the block goes on and
/// commits; what the failed lookup could not tell is masked as undecidable.
#[test]
fn the_catalog_asked_on_the_sessions_connection_leaves_the_session_as_it_was() {
    let w = world_with("", Some(POLICY));
    w.pg.sql("shop", SETUP);
    let out = wire(
        &w,
        &w.agent,
        "\
P - SELECT 7 AS seven
S
WAIT 1
P s1 SELECT name, email FROM people WHERE id = 1
S
WAIT 1
B - -
E -
S
WAIT 1
B p1 s1
D P p1
E p1
S
WAIT 1
X
",
    );
    assert!(wire_errors(&out).is_empty(), "{out:#?}");
    let rows = wire_hex(&out, "D");
    // The unnamed statement, bound after the lookup, is still the client's; the named
    // one's email is masked by the rule (the lookup named people.email).
    assert_eq!(rows.len(), 2, "{out:#?}");
    assert!(rows[0].ends_with(&hex(b"7")), "{rows:?}");
    assert!(rows[1].ends_with(&hex(b"[REDACTED:email]")), "{rows:?}");
    assert!(rows[1].contains(&hex(b"Alice")), "{rows:?}");

    // Another session holds pg_inherits, which the lookup reads and the client's own
    // statements do not: inside the client's block the lookup fails on its lock timeout.
    let mut holder = std::process::Command::new(pg_bin().join("psql"));
    holder
        .args(["-X", "-U", "postgres", "-h"])
        .arg(&w.pg.socket_dir)
        .args(["-p", &w.pg.port.to_string(), "-d", "shop", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut holder = holder.spawn().expect("psql");
    {
        use std::io::Write as _;
        let stdin = holder.stdin.as_mut().expect("stdin");
        writeln!(
            stdin,
            "BEGIN; LOCK TABLE pg_catalog.pg_inherits IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60);"
        )
        .expect("write");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while w
        .pg
        .sql(
            "shop",
            "SELECT count(*) FROM pg_locks WHERE relation = 'pg_catalog.pg_inherits'::regclass \
             AND mode = 'AccessExclusiveLock' AND granted",
        )
        .trim()
        != "1"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the lock was not taken"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = wire(
        &w,
        &w.agent,
        "\
Q BEGIN
WAIT 1
Q SET LOCAL lock_timeout = '200ms'
WAIT 1
Q INSERT INTO people (id, name) VALUES (3, 'Carol')
WAIT 1
Q SELECT id, email FROM people WHERE id = 1
WAIT 1
Q COMMIT
WAIT 1
X
",
    );
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(wire_errors(&out).is_empty(), "{out:#?}");
    let statuses: Vec<&str> = out
        .iter()
        .filter(|v| v["t"] == "Z")
        .filter_map(|v| v["status"].as_str())
        .collect();
    assert_eq!(statuses, ["T", "T", "T", "T", "I"], "{out:#?}");
    let rows = wire_hex(&out, "D");
    assert_eq!(rows.len(), 1, "{out:#?}");
    assert!(
        rows[0].ends_with(&hex(b"[REDACTED:unresolved]")),
        "{rows:?}"
    );
    assert_eq!(
        w.pg.sql("shop", "SELECT name FROM people WHERE id = 3")
            .trim(),
        "Carol",
        "the block committed"
    );
    let logs = w.daemon.logs.tail();
    assert!(
        logs.contains("catalog lookup on the session's connection failed"),
        "{logs}"
    );
    assert!(!logs.contains("could not be rolled back"), "{logs}");
}

/// The database's own types come to tokio-postgres in binary, and what their values are
/// is asked of the catalog (`pg_type`): with `credentials` on the catalog's own connection
/// when the result's description arrives; without, on the session's own connection
/// before the Bind that chose binary results (tokio-postgres described the statement
/// first, so the gate has seen its types). Under the shipped policies: an enum is its
/// label, a record is read field by field (a field's type learned in a second round), an
/// array of enums element by element, citext and a domain over it are text, and `bytea`
/// is read as its bytes (in text format too), `inet` as its address. Values without findings pass byte for byte;
/// a record or a `bytea` with an address or an SSN in it is NULL; an address in citext is
/// redacted in place. Before, every one of them was NULL.
#[test]
fn the_databases_own_types_in_binary_are_read_as_the_catalog_says() {
    for credentials in [true, false] {
        let w = if credentials {
            catalog_world("", None)
        } else {
            world_with("", None)
        };
        w.pg.sql(
            "shop",
            "CREATE EXTENSION citext; CREATE TYPE mood AS ENUM ('happy', 'sad'); \
             CREATE TYPE pair AS (a int, b text); CREATE DOMAIN handle AS citext; \
             CREATE TYPE level AS ENUM ('low', 'high'); CREATE TYPE tagged AS (l level, note text); \
             CREATE TABLE pets (id int, mood mood, moods mood[], card pair, alias citext, \
                                handle handle, tag tagged, blob bytea, addr inet); \
             INSERT INTO pets VALUES \
               (1, 'happy', '{happy,sad}', ROW(1, 'x'), 'Ann@Example.com', 'Ann', ROW('low', 'fine'), \
                '\\x0001ff', '10.1.2.3'), \
               (2, 'sad', '{sad}', ROW(2, 'bo@example.com'), 'Bo', 'bo@example.com', \
                ROW('high', 'ssn 536-22-1234'), convert_to('mail bo@example.com', 'UTF8'), \
                '2001:db8::1'); \
             ALTER TABLE pets OWNER TO app;",
        );
        let sql =
            "SELECT id, mood, moods, card, alias, handle, tag, blob, addr FROM pets ORDER BY id";
        let direct = pc_pg_with(&w, &w.direct, "rows", &[sql]);
        let rows = &direct["result"][0];
        assert_eq!(rows[0][1], "happy", "{direct}");
        assert!(rows[0][3]["binary"].is_string(), "{direct}");
        assert!(rows[1][8]["binary"].is_string(), "{direct}");
        let mut want = rows.clone();
        want[0][4] = json!("[REDACTED:email]");
        want[1][3] = serde_json::Value::Null;
        want[1][5] = json!("[REDACTED:email]");
        want[1][6] = serde_json::Value::Null;
        want[1][7] = serde_json::Value::Null;
        let via = pc_pg_with(&w, &w.agent, "rows", &[sql]);
        assert_eq!(
            via["result"][0], want,
            "credentials = {credentials}; direct: {direct}"
        );
        // bytea in text format (hex): read as bytes too.
        assert_eq!(
            psql_rows(&w, "SELECT id, blob FROM pets ORDER BY id"),
            "1|\\x0001ff\n2|"
        );
    }
}

/// The statement and portal name the catalog lookups on a session use is refused to the
/// client (a lookup would close a statement or portal of the client's under it), in every
/// form: a Parse, a PREPARE, a Bind. The session goes on.
#[test]
fn the_name_the_sessions_catalog_uses_is_reserved() {
    let w = world_with("", None);
    let out = wire(
        &w,
        &w.agent,
        "\
P portcullis_catalog SELECT 1
S
WAIT 1
Q PREPARE portcullis_catalog AS SELECT 1
WAIT 1
P s1 SELECT 1
B portcullis_catalog s1
E portcullis_catalog
S
WAIT 1
Q DECLARE portcullis_catalog CURSOR WITH HOLD FOR SELECT 1
WAIT 1
P s2 DECLARE Portcullis_Catalog CURSOR WITH HOLD FOR SELECT 1
S
WAIT 1
Q SELECT 'still here'
WAIT 1
X
",
    );
    let errors = wire_errors(&out);
    assert_eq!(errors.len(), 5, "{out:#?}");
    for (code, message) in &errors {
        assert_eq!(*code, "42501", "{out:#?}");
        assert!(message.contains("reserved"), "{message}");
    }
    assert!(
        out.iter()
            .any(|m| m["t"] == "D" && m.to_string().contains(&hex(b"still here"))),
        "{out:#?}"
    );
}
