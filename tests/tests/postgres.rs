//! The PostgreSQL engine end to end: a real PostgreSQL server started by the test, real
//! clients in protected cgroups, the real daemon.

use std::process::{Command, Output};

use portcullis_tests::{pg::*, *};

struct Pgw {
    env: Env,
    agent: String,
    direct: String,
    pg: Pg,
    daemon: Daemon,
}

fn world(target_extra: &str) -> Pgw {
    let env = Env::new();
    let agent = env.cgroup("agents/a");
    let direct = env.cgroup("direct");
    let pg = Pg::start(&env);
    let cfg = env.config(
        "",
        &agents_and_pg(
            &[("a", &format!("cgroup = \"{agent}\""))],
            &pg.addr().to_string(),
            target_extra,
        ),
    );
    let daemon = Daemon::start(&cfg);
    Pgw {
        env,
        agent,
        direct,
        pg,
        daemon,
    }
}

fn psql_cmd(w: &Pgw, cgroup: &str, sslmode: &str) -> Command {
    let mut cmd = Command::new(pg_bin().join("psql"));
    cmd.args([
        "-X",
        "-v",
        "ON_ERROR_STOP=0",
        "-h",
        "127.0.0.1",
        "-U",
        "app",
        "-d",
        "shop",
    ])
    .args(["-p", &w.pg.port.to_string()])
    .env("PGPASSWORD", APP_PASSWORD)
    .env("PGSSLMODE", sslmode)
    .env("PGCONNECT_TIMEOUT", "10")
    .env("HOME", &w.env.dir);
    in_cgroup(&mut cmd, &w.env.cg_dir(cgroup), Some(65534));
    cmd
}

/// `psql -c SQL` (one Query message) as an unprivileged user in `cgroup`.
fn psql(w: &Pgw, cgroup: &str, sslmode: &str, sql: &str) -> Output {
    psql_cmd(w, cgroup, sslmode)
        .args(["-c", sql])
        .output()
        .expect("psql")
}

/// psql reading a script from stdin: one Query message per statement.
fn psql_script(w: &Pgw, cgroup: &str, script: &str) -> Output {
    use std::io::Write as _;
    let mut child = psql_cmd(w, cgroup, "disable")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    child.wait_with_output().expect("psql")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

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
    assert!(
        !log.contains("DROP TABLE t"),
        "the server saw the DROP:\n{log}"
    );
    assert!(
        log.contains("portcullis: statement refused by policy"),
        "{log}"
    );

    // Held statements (no approval service here) are refused with the rule named.
    let o = psql(&w, &w.agent, "disable", "DELETE FROM t");
    let out = text(&o);
    assert!(out.contains("approve-dml-without-where"), "{out}");
    assert_eq!(w.pg.sql("shop", "SELECT count(*) FROM t"), "2");
    assert!(!w.pg.log().contains("DELETE FROM t"));

    // The function-call protocol is refused (psql cannot send it; see the wire tests).
    let dec = w.daemon.logs.all();
    assert!(
        dec.iter()
            .any(|v| v["message"] == "decision" && v["rule"] == "deny-destructive-ddl")
    );
}

fn secret_file(env: &Env) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = env.dir.join("pg-secret");
    std::fs::write(&p, format!("{APP_PASSWORD}\n")).expect("secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
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
    let w = world("upstream_tls = \"require\"");
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
