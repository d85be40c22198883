//! Hot reload of policies in a running daemon: on file change and on SIGHUP, a broken file
//! keeps the previous policies and the error names file, line and column; statements
//! prepared before a change run under the new policies.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portcullis_tests::*;
use serde_json::Value;

fn policy(d: &Daemon) -> Value {
    d.status()["policy"].clone()
}

fn wait_until(what: &str, d: &Daemon, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = policy(d);
        if pred(&p) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {p}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the `n`th failed reload of a daemon whose one rule (generation 1) stays, and
/// returns the error it logged.
fn failed_reload(d: &Daemon, n: u64) -> String {
    let p = wait_until("a failed reload", d, |p| p["reloads_failed"] == n);
    assert_eq!(p["rules"], 1, "the previous policies stay: {p}");
    assert_eq!(p["generation"], 1, "{p}");
    let err = d
        .logs
        .wait_for("the reload error", Duration::from_secs(5), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("policy reload failed"))
        });
    err["error"].as_str().unwrap_or_default().to_owned()
}

const GOOD: &str =
    "[[rule]]\nid = \"deny-drops\"\nsql = { kinds = [\"drop_*\"] }\naction = \"deny\"\n";

/// A test environment whose configuration reads the policy directory (`10-base.toml`:
/// [`GOOD`]) and checks it every 100 ms: the environment, the directory, the
/// configuration file.
fn watched_policies() -> (Env, std::path::PathBuf, std::path::PathBuf) {
    let env = Env::new();
    let dir = env.dir.join("policies");
    std::fs::create_dir_all(&dir).expect("policy dir");
    std::fs::write(dir.join("10-base.toml"), GOOD).expect("write");
    let body = format!(
        "[policy]\ndir = \"{}\"\nwatch_interval = \"100ms\"\n\n{}",
        dir.display(),
        agents_and_target(
            &[("a", &format!("cgroup = \"{}\"", env.cgroup("a")))],
            &["127.0.0.1:1".into()]
        )
    );
    let config = env.config("", &body);
    (env, dir, config)
}

#[test]
fn policy_files_reload_on_change_and_a_broken_file_keeps_the_last_good_set() {
    let (_env, dir, config) = watched_policies();
    let d = Daemon::start(&config);
    let p = policy(&d);
    assert_eq!(p["rules"], 1, "{p}");
    assert_eq!(p["generation"], 1);

    // A broken second file: the daemon keeps the previous set and says where the error is.
    std::fs::write(
        dir.join("20-more.toml"),
        "[[rule]]\nid = \"x\"\naction = \"deny\"\nsql = { kinds = [\"select\"], oops = 1 }\n",
    )
    .expect("write");
    let err = failed_reload(&d, 1);
    assert!(
        err.contains("20-more.toml:4:") && err.contains("oops"),
        "{err}"
    );

    // Fixed: the new set is swapped in.
    std::fs::write(
        dir.join("20-more.toml"),
        "[[rule]]\nid = \"x\"\naction = \"deny\"\nsql = { kinds = [\"select\"] }\n",
    )
    .expect("write");
    let p = wait_until("a successful reload", &d, |p| p["reloads_ok"] == 1);
    assert_eq!(p["rules"], 2, "{p}");
    assert_eq!(p["generation"], 2, "{p}");

    // SIGHUP with a configuration that does not validate: nothing changes.
    std::fs::write(
        &config,
        format!(
            "{}\n[bogus]\n",
            std::fs::read_to_string(&config).expect("read")
        ),
    )
    .expect("write");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    let p = wait_until("the SIGHUP failure", &d, |p| p["reloads_failed"] == 2);
    assert_eq!(p["rules"], 2, "{p}");

    // SIGHUP with a good configuration reloads policies too.
    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace("[bogus]\n", "");
    std::fs::write(&config, text).expect("write");
    // SAFETY: as above.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    let p = wait_until("the SIGHUP reload", &d, |p| p["reloads_ok"] == 2);
    assert_eq!(p["generation"], 3, "{p}");

    // `policy check` on the directory agrees.
    let out = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&config)
        .args(["policy", "check"])
        .output()
        .expect("policy check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 file(s), 2 rule(s): 0 error(s)"));
}

#[test]
fn a_daemon_with_broken_policies_does_not_start() {
    let env = Env::new();
    let dir = env.dir.join("policies");
    std::fs::create_dir_all(&dir).expect("policy dir");
    std::fs::write(
        dir.join("p.toml"),
        "[[rule]]\nid = \"x\"\naction = \"allw\"\n",
    )
    .expect("write");
    let body = format!(
        "[policy]\ndir = \"{}\"\n\n{}",
        dir.display(),
        agents_and_target(
            &[("a", &format!("cgroup = \"{}\"", env.cgroup("a")))],
            &["127.0.0.1:1".into()]
        )
    );
    let config = env.config("", &body);
    let err = refused_start(&config);
    assert!(
        err.contains("p.toml:3:10") && err.contains("unknown action `allw`"),
        "{err}"
    );
    assert_eq!(cli(&config, &["policy", "check"]).status.code(), Some(1));
}

/// What the second policy set adds: deletes from `t` refused, e-mail addresses masked.
const TIGHTENED: &str = "\
[[rule]]
id = \"no-deletes-from-t\"
sql = { kinds = [\"delete\"], tables = [\"t\"] }
action = \"deny\"
message = \"deleting from t is closed\"

[[rule]]
id = \"mask-emails\"
sql = { kinds = [\"select\"] }
action = \"mask\"
mask = { columns = [\"*.email\"], strategy = \"redact\" }
";

/// A gate under `policy` (reloaded when the file changes), with credentials: they give the
/// daemon its catalog connection, to tell which table a column is. The second value holds
/// the password file: keep it for as long as the world.
fn watched_world_with_catalog(policy: &str) -> (pg::Pgw, Env) {
    let probe = Env::new();
    let secret = pg::secret_file(&probe);
    let w = pg::world_policy(
        &format!(
            "credentials = {{ user = \"app\", password_file = \"{}\" }}",
            secret.display()
        ),
        Some(policy),
        "watch_interval = \"100ms\"",
        "",
        "",
    );
    (w, probe)
}

/// A client that prepared its statements before the operator tightened the policies
/// (drivers keep prepared statements for the life of a pooled connection) runs them under
/// the new ones: the delete is refused, the read is masked, the session goes on, and the
/// audit records each execution with the decision it ran under.
#[test]
fn statements_prepared_before_a_policy_change_run_under_the_new_policies() {
    let (w, _secret) = watched_world_with_catalog("");
    w.pg.sql(
        "shop",
        "CREATE TABLE t (id int, email text); \
         INSERT INTO t VALUES (1, 'ann@example.com'), (2, 'bob@example.com'); \
         ALTER TABLE t OWNER TO app;",
    );
    let go = w.env.dir.join("go");
    let mut cmd = Command::new(workspace_bin("pc-pg"));
    cmd.arg(w.pg.addr().to_string())
        .args(["app", pg::APP_PASSWORD, "shop", "reload"])
        .arg(&go)
        .stdout(Stdio::piped());
    in_cgroup(&mut cmd, &w.env.cg_dir(&w.agent), Some(65534));
    let mut client = cmd.spawn().expect("pc-pg");
    let mut out = BufReader::new(client.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "prepared", "the client's first phase");

    std::fs::write(w.env.dir.join("policies").join("test.toml"), TIGHTENED).expect("write");
    let p = wait_until("the tightened policies", &w.daemon, |p| {
        p["generation"] == 2
    });
    assert_eq!(p["rules"], 2, "{p}");
    std::fs::write(&go, "").expect("go");
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("read");
    assert!(client.wait().expect("wait").success(), "{rest}");
    let v: Value = serde_json::from_str(rest.trim()).expect("json");
    let r = &v["result"];

    // Under the first (empty) set everything ran as sent.
    assert_eq!(
        r["before"],
        serde_json::json!([[1, "ann@example.com"], [2, "bob@example.com"]]),
        "{r}"
    );
    assert_eq!(r["deleted_before"], 0, "{r}");
    // The same prepared read is masked now, every time.
    for key in ["after", "read_again"] {
        let rows = r[key].as_array().unwrap_or_else(|| panic!("{key}: {r}"));
        let ids: Vec<i64> = rows.iter().filter_map(|row| row[0].as_i64()).collect();
        assert_eq!(ids, [1, 2], "{key}: only the e-mail column is masked: {r}");
        let emails: Vec<&str> = rows.iter().filter_map(|row| row[1].as_str()).collect();
        assert_eq!(emails.len(), 2, "{key}: {r}");
        assert!(
            emails.iter().all(|e| *e == "[REDACTED:email]"),
            "{key}: {r}"
        );
    }
    // The prepared delete is refused with the rule's message; the session goes on.
    assert_eq!(r["deleted_after"]["code"], "42501", "{r}");
    assert!(
        r["deleted_after"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("deleting from t is closed")),
        "{r}"
    );
    assert_eq!(
        r["still_usable"][0],
        serde_json::json!(["still usable"]),
        "{r}"
    );
    // So is the SQL-level prepared one.
    assert_eq!(r["sql_execute"]["code"], "42501", "{r}");
    assert_eq!(
        w.pg.sql("shop", "SELECT count(*) FROM t"),
        "2",
        "nothing was deleted"
    );
    assert!(
        !w.pg.log().contains("EXECUTE p"),
        "EXECUTE p reached the server"
    );

    // Each execution is on record with the decision it ran under.
    let out = portcullis_as(&w.daemon.config, As::Root, &["audit", "export"]);
    assert!(out.status.success());
    let executes: Vec<(String, String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "statement" && r["body"]["via"] == "execute")
        .map(|r| {
            let b = &r["body"];
            let s = |k: &str| b[k].as_str().unwrap_or("").to_owned();
            (s("sql"), s("verdict"), s("rule"))
        })
        .collect();
    let read = "SELECT id, email FROM t ORDER BY id".to_owned();
    let delete = "DELETE FROM t WHERE id = $1".to_owned();
    assert_eq!(
        executes,
        [
            (read.clone(), "allow".into(), "default".into()),
            (delete.clone(), "allow".into(), "default".into()),
            (read.clone(), "mask".into(), "mask-emails".into()),
            (delete, "deny".into(), "no-deletes-from-t".into()),
            (read.clone(), "mask".into(), "mask-emails".into()),
        ],
        "{executes:#?}"
    );
}

/// Masks `*.email` wherever it is read, and checks the copies inserts make.
const MASK_COPIES: &str = "\
[[rule]]
id = \"mask-emails\"
sql = { kinds = [\"select\", \"insert\"] }
action = \"mask\"
mask = { columns = [\"*.email\"], strategy = \"redact\" }
";

/// A prepared statement judged again after a reload has its copy check done as at Parse:
/// what the catalog cache has forgotten meanwhile (DDL through the gate empties it) is
/// asked for, not refused as unverifiable.
#[test]
fn a_statement_judged_again_after_a_reload_asks_the_catalog() {
    let (w, _secret) = watched_world_with_catalog(MASK_COPIES);
    w.pg.sql(
        "shop",
        "CREATE TABLE people (id int, email text); INSERT INTO people VALUES (1, 'a@x.org'); \
         CREATE TABLE notes (body text); \
         ALTER TABLE people OWNER TO app; ALTER TABLE notes OWNER TO app;",
    );
    let go = w.env.dir.join("go");
    let script = format!(
        "\
P s1 INSERT INTO notes (body) SELECT id::text FROM people
S
WAIT 1
Q CREATE TABLE scratch (a int)
WAIT 1
UNTIL {}
B - s1
E - 0
S
WAIT 1
X
",
        go.display()
    );
    let (mut client, mut out) = wire_client(&w, &script);
    let before = until(&mut out);
    assert!(
        before.iter().all(|v| v["t"] != "E"),
        "prepared and DDL ran: {before:#?}"
    );
    let policies = w.env.dir.join("policies").join("test.toml");
    std::fs::write(&policies, format!("{MASK_COPIES}\n{GOOD}")).expect("write");
    wait_until("the reloaded policies", &w.daemon, |p| p["generation"] == 2);
    std::fs::write(&go, "").expect("go");
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("read");
    assert!(client.wait().expect("wait").success(), "{rest}");
    let after: Vec<Value> = rest
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(after.iter().all(|v| v["t"] != "E"), "{after:#?}");
    assert!(
        after
            .iter()
            .any(|v| v["t"] == "C" && v["tag"] == "INSERT 0 1"),
        "{after:#?}"
    );
    assert_eq!(
        w.pg.sql("shop", "SELECT string_agg(body, ',') FROM notes"),
        "1"
    );
}

/// A wire client with `script` as the agent, its output read line by line.
fn wire_client(
    w: &pg::Pgw,
    script: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(workspace_bin("pc-pgwire"));
    cmd.arg(w.pg.addr().to_string())
        .args(["app", pg::APP_PASSWORD, "shop"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    in_cgroup(&mut cmd, &w.env.cg_dir(&w.agent), Some(65534));
    let mut client = cmd.spawn().expect("pc-pgwire");
    {
        use std::io::Write as _;
        let mut stdin = client.stdin.take().expect("stdin");
        stdin.write_all(script.as_bytes()).expect("script");
    }
    let out = BufReader::new(client.stdout.take().expect("stdout"));
    (client, out)
}

/// The server messages the client printed before it reached its next `UNTIL`.
fn until(out: &mut BufReader<std::process::ChildStdout>) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).expect("read") > 0, "{seen:?}");
        let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
        if v.get("until").is_some() {
            return seen;
        }
        seen.push(v);
    }
}

/// A session's LISTEN is judged again after a reload, as its prepared statements are:
/// masks the new policies give it apply to the notifications it receives, and a policy
/// that denies it stops them.
#[test]
fn listens_made_before_a_policy_change_get_the_new_policies() {
    let (w, _secret) = watched_world_with_catalog(GOOD);
    let go = |n: u64| w.env.dir.join(format!("go{n}"));
    let script = format!(
        "Q LISTEN ch\nWAIT 1\nUNTIL {}\nQ SELECT 1\nWAIT 1\nUNTIL {}\nQ SELECT 2\nWAIT 1\n\
         UNTIL {}\nX\n",
        go(2).display(),
        go(3).display(),
        go(4).display()
    );
    let (mut client, mut out) = wire_client(&w, &script);
    let listened = until(&mut out);
    assert!(listened.iter().all(|v| v["t"] != "E"), "{listened:#?}");
    let policies = w.env.dir.join("policies").join("test.toml");
    // Policies with `action` for `listen` become `generation`; a notification is sent; the
    // client goes on to its next `UNTIL`: what it printed on the way.
    let mut phase = |generation: u64, action: &str, notify: &str| {
        let rule =
            format!("[[rule]]\nid = \"listens\"\nsql = {{ kinds = [\"listen\"] }}\n{action}\n");
        std::fs::write(&policies, format!("{GOOD}\n{rule}")).expect("write");
        wait_until("the new policies", &w.daemon, |p| {
            p["generation"] == generation
        });
        w.pg.sql("shop", &format!("NOTIFY ch, '{notify}'"));
        std::fs::write(go(generation), "").expect("go");
        until(&mut out)
    };
    let masked = phase(
        2,
        "action = \"mask\"\nmask = { detectors = [\"email\"], strategy = \"redact\" }",
        "signup alice@example.com",
    );
    let denied = phase(3, "action = \"deny\"", "second bob@example.com");
    std::fs::write(go(4), "").expect("go");
    assert!(client.wait().expect("wait").success());
    let notified: Vec<&str> = masked
        .iter()
        .filter(|v| v["t"] == "A")
        .filter_map(|v| v["hex"].as_str())
        .collect();
    assert_eq!(notified.len(), 1, "{masked:#?}");
    assert!(
        notified[0].ends_with(&format!(
            "{}00{}00",
            portcullis::digest::hex(b"ch"),
            portcullis::digest::hex(b"signup [REDACTED:email]")
        )),
        "{masked:#?}"
    );
    assert!(
        denied.iter().all(|v| v["t"] != "A"),
        "not delivered: {denied:#?}"
    );
    assert!(
        denied.iter().any(|v| v["t"] == "C"),
        "the session goes on: {denied:#?}"
    );
}

/// Writes `text` to `path` as `uid` (a shell run through `setpriv`); whether it could.
fn write_as(uid: u32, path: &std::path::Path, text: &str) -> bool {
    use std::io::Write as _;
    let mut child = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "sh",
            "-c",
            "cat > \"$0\"",
        ])
        .arg(path)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("setpriv");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    child.wait().expect("wait").success()
}

/// `portcullis --config CONFIG ARGS...`, run to its end.
fn cli(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("portcullis")
}

/// What a daemon that must not start with `config` says on its way out.
fn refused_start(config: &std::path::Path) -> String {
    let out = cli(config, &["run"]);
    assert!(!out.status.success(), "must refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `portcullis doctor --json`: its exit code and checks.
fn doctor(config: &std::path::Path) -> (Option<i32>, Value) {
    let out = cli(config, &["doctor", "--json"]);
    let checks = serde_json::from_slice(&out.stdout).expect("json");
    (out.status.code(), checks)
}

/// Whether a doctor check of `level` says `needle`.
fn has(checks: &Value, level: &str, needle: &str) -> bool {
    checks
        .as_array()
        .expect("list")
        .iter()
        .any(|c| c["level"] == level && c["what"].as_str().is_some_and(|w| w.contains(needle)))
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
}

/// Policy and configuration files someone but root may change are not loaded: the daemon
/// does not start with them, a reload keeps the previous ones and says which file and why.
/// Policy files every user may read are reported.
#[test]
fn files_others_may_change_are_refused_and_files_others_may_read_reported() {
    const NOBODY: u32 = 65534;
    let (_env, dir, config) = watched_policies();
    let file = dir.join("10-base.toml");
    chmod(&file, 0o644);
    let d = Daemon::start(&config);
    assert_eq!(policy(&d)["rules"], 1);
    let canonical = std::fs::canonicalize(&file).expect("canonical");
    let warned = d
        .logs
        .wait_for("the readable warning", Duration::from_secs(5), |v| {
            v["warning"]
                .as_str()
                .is_some_and(|w| w.contains("readable by every user"))
        });
    assert!(
        warned["warning"]
            .as_str()
            .is_some_and(|w| w.contains(&canonical.display().to_string())),
        "{warned}"
    );

    // Root's file, 0644: nobody else may write it.
    assert!(!write_as(NOBODY, &file, "# allow everything\n"));
    // Made writable by everyone, an agent's uid rewrites it: the daemon keeps the rules.
    chmod(&file, 0o666);
    assert!(write_as(NOBODY, &file, "# allow everything\n"));
    let err = failed_reload(&d, 1);
    assert!(
        err.contains("10-base.toml")
            && err.contains("writable by every user")
            && err.contains("chmod o-w"),
        "{err}"
    );
    // `policy check` says the same, and fails.
    let check = cli(&config, &["policy", "check"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("writable by every user"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // Root's again (and the rules root meant): loaded.
    chmod(&file, 0o600);
    std::fs::write(&file, GOOD.replace("drop_*", "truncate")).expect("write");
    let p = wait_until("the good reload", &d, |p| p["reloads_ok"] == 1);
    assert_eq!(p["generation"], 2, "{p}");

    // A configuration file others may change: SIGHUP does not load it.
    chmod(&config, 0o646);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    let p = wait_until("the refused SIGHUP", &d, |p| p["reloads_failed"] == 2);
    assert_eq!(p["generation"], 2, "{p}");
    drop(d);
    // ... nor does a daemon start with it.
    let err = refused_start(&config);
    assert!(
        err.contains("writable by every user") && err.contains(&config.display().to_string()),
        "{err}"
    );
    // Nor with a policy directory a user owns: they may add any file to it.
    chmod(&config, 0o644);
    std::os::unix::fs::chown(&dir, Some(NOBODY), None).expect("chown");
    let err = refused_start(&config);
    assert!(
        err.contains(&format!("owned by uid {NOBODY}")) && err.contains("chown root:"),
        "{err}"
    );
    // `doctor` fails on it too, and warns about the file everyone may read.
    chmod(&file, 0o644);
    let (code, checks) = doctor(&config);
    assert_eq!(code, Some(1));
    assert!(
        has(&checks, "fail", &format!("owned by uid {NOBODY}")),
        "{checks}"
    );
    std::os::unix::fs::chown(&dir, Some(0), None).expect("chown");
    let (_, checks) = doctor(&config);
    assert!(has(&checks, "warn", "readable by every user"), "{checks}");
    assert!(!has(&checks, "fail", "policies"), "{checks}");
}
