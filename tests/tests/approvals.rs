//! Approvals held on the wire: a real PostgreSQL, real `psql` clients in an agent cgroup,
//! and the `portcullis approvals / approve / deny` commands run as different users
//! against the daemon's admin socket.

use std::{
    os::unix::fs::PermissionsExt as _,
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use portcullis_tests::{
    As,
    pg::{Pgw, psql_cmd, text, world_with},
    portcullis_as, portcullis_json,
};
use serde_json::Value;

/// Updates wait for a member of `staff` (gid 50 on Debian) for up to 20 s; deletes wait
/// 1 s, so the timeout path is quick.
const POLICY: &str = r#"
[[rule]]
id = "hold-updates"
sql = { kinds = ["update"] }
action = "require_approval"
approvers = ["staff"]
timeout = "20s"
message = "updates need a look"

[[rule]]
id = "hold-deletes"
sql = { kinds = ["delete"] }
action = "require_approval"
approvers = ["staff"]
timeout = "1s"
"#;

const STAFF: As<'static> = As::User(1500, 50);

fn setup() -> Pgw {
    let w = world_with("", Some(POLICY));
    w.pg.sql(
        "shop",
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 1); \
         GRANT ALL ON t TO app",
    );
    w
}

/// psql in the agent cgroup, running `sql`, in the background.
fn spawn_psql(w: &Pgw, sql: &str) -> Child {
    psql_cmd(w, &w.agent, "disable")
        .args(["-c", sql])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql")
}

fn approvals(w: &Pgw, history: bool) -> Value {
    let mut args = vec!["approvals", "--json"];
    if history {
        args.push("--history");
    }
    portcullis_json(&w.daemon.config, &args)
}

/// Waits until a request for `statement` is pending and returns it.
fn wait_pending(w: &Pgw, statement: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = approvals(w, false);
        if let Some(p) = v["pending"]
            .as_array()
            .expect("pending")
            .iter()
            .find(|p| p["statement"] == statement)
        {
            return p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no pending request for {statement:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the history shows request `id` in `state`.
fn wait_state(w: &Pgw, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = approvals(w, true);
        if let Some(r) = v["history"]
            .as_array()
            .expect("history")
            .iter()
            .find(|r| r["id"] == id && r["state"] == state)
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "request {id} never became {state}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait(child: Child) -> Output {
    child.wait_with_output().expect("psql")
}

fn answer(w: &Pgw, who: As<'_>, args: &[&str]) -> Output {
    portcullis_as(&w.daemon.config, who, args)
}

fn v_of(w: &Pgw) -> String {
    w.pg.sql("shop", "SELECT v FROM t WHERE id = 1")
}

#[test]
fn a_held_statement_runs_after_approve_and_only_an_approver_may_approve() {
    let w = setup();
    let child = spawn_psql(&w, "UPDATE t SET v = 2 WHERE id = 1");
    let p = wait_pending(&w, "UPDATE t SET v = 2 WHERE id = 1");
    let id = p["id"].as_str().expect("id").to_owned();
    assert_eq!(p["agent"], "a");
    assert_eq!(p["rule"], "hold-updates");
    assert_eq!(p["uid"], 65534);
    assert!(p["expires_us"].as_i64() > p["created_us"].as_i64(), "{p}");
    // Nothing reached the server while it waits.
    assert_eq!(v_of(&w), "1");
    assert!(
        !w.pg.log().contains("UPDATE t SET v = 2"),
        "a held statement reached the server"
    );

    // Refused: an unlisted uid, the agent's own uid (even with the approver group: nobody
    // approves their own request), and root from inside the agent's cgroup.
    let cg = w.env.cg_dir(&w.agent);
    for (who, why) in [
        (As::User(1501, 1501), "is not a member of `staff`"),
        (As::User(65534, 65534), "is not a member of `staff`"),
        (As::User(65534, 50), "nobody approves their own request"),
        (As::RootIn(&cg), "protected agent `a`"),
    ] {
        let out = answer(&w, who, &["approve", &id]);
        assert!(!out.status.success(), "{who:?} could approve");
        let e = text(&out);
        assert!(e.contains(why), "{who:?}: {e}");
        assert!(wait_pending(&w, "UPDATE t SET v = 2 WHERE id = 1")["id"] == id.as_str());
    }
    // The unlisted uid cannot even list requests.
    let out = answer(&w, As::User(1501, 1501), &["approvals"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("permission denied"), "{}", text(&out));

    // A member of the approver group approves; the statement runs.
    let out = answer(&w, STAFF, &["approve", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("approved {id}")),
        "{}",
        text(&out)
    );
    let out = wait(child);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("UPDATE 1"), "{t}");
    // The client was told the id and how to answer, while it waited.
    assert!(t.contains(&format!("portcullis approve {id}")), "{t}");
    assert!(t.contains("updates need a look"), "{t}");
    assert_eq!(v_of(&w), "2");
    let r = wait_state(&w, &id, "approved");
    assert_eq!(r["decided_by"], "1500");
    assert!(
        approvals(&w, false)["pending"]
            .as_array()
            .expect("p")
            .is_empty()
    );
}

/// The policies change while a statement waits for its approver: once approved it runs
/// under the new ones, so a rule that now denies it refuses it after all, on record.
#[test]
fn a_statement_approved_after_a_policy_change_runs_under_the_new_policies() {
    let w = setup();
    let sql = "UPDATE t SET v = 3 WHERE id = 1";
    let child = spawn_psql(&w, sql);
    let id = wait_pending(&w, sql)["id"].as_str().expect("id").to_owned();
    let generation = |w: &Pgw| w.daemon.status()["policy"]["generation"].as_i64();
    let before = generation(&w);
    std::fs::write(
        w.env.dir.join("policies").join("test.toml"),
        format!(
            "{POLICY}\n[[rule]]\nid = \"no-updates\"\nsql = {{ kinds = [\"update\"] }}\n\
             action = \"deny\"\nmessage = \"updates are closed\"\n"
        ),
    )
    .expect("policy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while generation(&w) == before {
        assert!(Instant::now() < deadline, "the policies were not reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = answer(&w, STAFF, &["approve", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = wait(child);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("updates are closed") && t.contains("policies changed while it waited"),
        "{t}"
    );
    assert_eq!(v_of(&w), "1", "the update did not run");
    wait_state(&w, &id, "approved");
    // The record of the held statement is followed by the record of its refusal.
    let out = portcullis_as(&w.daemon.config, As::Root, &["audit", "export"]);
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "statement" && r["body"]["sql"] == sql)
        .map(|r| r["body"].clone())
        .collect();
    let seen: Vec<(&str, &str)> = records
        .iter()
        .map(|b| {
            (
                b["verdict"].as_str().unwrap_or(""),
                b["rule"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("require_approval", "hold-updates"), ("deny", "no-updates")],
        "{records:#?}"
    );
}

#[test]
fn deny_and_timeout_fail_the_statement_with_the_reason() {
    let w = setup();
    let child = spawn_psql(&w, "UPDATE t SET v = 3 WHERE id = 1");
    let id = wait_pending(&w, "UPDATE t SET v = 3 WHERE id = 1")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let out = answer(&w, As::Root, &["deny", &id, "--reason", "not on a Friday"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = wait(child);
    let t = text(&out);
    assert!(!out.status.success(), "a denied statement succeeded: {t}");
    assert!(t.contains("not on a Friday"), "{t}");
    assert_eq!(v_of(&w), "1");
    let r = wait_state(&w, &id, "denied");
    assert_eq!(r["reason"], "not on a Friday");
    // A second answer finds nothing to answer.
    let out = answer(&w, As::Root, &["approve", &id]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no pending request"), "{}", text(&out));

    // Deletes wait one second, then fail.
    let started = Instant::now();
    let out = wait(spawn_psql(&w, "DELETE FROM t WHERE id = 1"));
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("no decision in time"), "{t}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(w.pg.sql("shop", "SELECT count(*) FROM t"), "1");
    let hist = approvals(&w, true);
    let expired = hist["history"]
        .as_array()
        .expect("history")
        .iter()
        .find(|r| r["statement"] == "DELETE FROM t WHERE id = 1")
        .unwrap_or_else(|| panic!("no record of the delete: {hist}"));
    assert_eq!(expired["state"], "expired", "{hist}");
    assert!(!w.pg.log().contains("DELETE FROM t"));
}

#[test]
fn a_grant_approves_the_same_rule_until_it_expires() {
    let w = setup();
    let child = spawn_psql(&w, "UPDATE t SET v = 4 WHERE id = 1");
    let id = wait_pending(&w, "UPDATE t SET v = 4 WHERE id = 1")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let out = answer(&w, STAFF, &["approve", &id, "--for", "3s", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let granted: Value = serde_json::from_slice(&out.stdout).expect("json");
    let grant = granted["grant"]["id"]
        .as_str()
        .expect("grant id")
        .to_owned();
    assert!(wait(child).status.success());

    // Within the grant: runs without waiting for anyone.
    let out = wait(spawn_psql(&w, "UPDATE t SET v = 5 WHERE id = 1"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(v_of(&w), "5");
    let v = approvals(&w, false);
    assert_eq!(v["grants"][0]["id"], grant.as_str(), "{v}");
    assert_eq!(v["grants"][0]["uses"], 1, "{v}");
    // The use is on the session's record, with the grant.
    let export = portcullis_as(&w.daemon.config, As::Root, &["audit", "export"]);
    let used: Vec<Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "grant_used")
        .collect();
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!(used[0]["body"]["grant"], grant.as_str());

    // A different rule is not covered.
    let out = wait(spawn_psql(&w, "DELETE FROM t WHERE id = 1"));
    assert!(!out.status.success(), "the grant covered another rule");

    // After expiry the same rule waits again.
    std::thread::sleep(Duration::from_millis(3200));
    let child = spawn_psql(&w, "UPDATE t SET v = 6 WHERE id = 1");
    let id = wait_pending(&w, "UPDATE t SET v = 6 WHERE id = 1")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert!(
        approvals(&w, false)["grants"]
            .as_array()
            .expect("g")
            .is_empty()
    );
    assert!(answer(&w, As::Root, &["deny", &id]).status.success());
    assert!(!wait(child).status.success());
    assert_eq!(v_of(&w), "5");
}

#[test]
fn a_client_that_disconnects_withdraws_and_a_restart_expires_what_was_pending() {
    let mut w = setup();
    let mut child = spawn_psql(&w, "UPDATE t SET v = 7 WHERE id = 1");
    let id = wait_pending(&w, "UPDATE t SET v = 7 WHERE id = 1")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    child.kill().expect("kill psql");
    let _ = child.wait();
    wait_state(&w, &id, "withdrawn");
    assert!(
        approvals(&w, false)["pending"]
            .as_array()
            .expect("p")
            .is_empty()
    );
    let out = answer(&w, As::Root, &["approve", &id]);
    assert!(!out.status.success(), "a withdrawn request was approved");

    // Pending when the daemon dies: expired after the restart, never approved.
    let child = spawn_psql(&w, "UPDATE t SET v = 8 WHERE id = 1");
    let id = wait_pending(&w, "UPDATE t SET v = 8 WHERE id = 1")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    w.daemon.kill9();
    let out = wait(child);
    assert!(!out.status.success());
    w.daemon = portcullis_tests::Daemon::start(&w.daemon.config.clone());
    let r = wait_state(&w, &id, "expired");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("restart")
            || r["reason"].as_str().unwrap_or("").contains("stop"),
        "{r}"
    );
    let out = answer(&w, As::Root, &["approve", &id]);
    assert!(!out.status.success());
    assert_eq!(v_of(&w), "1");
    assert!(!w.pg.log().contains("SET v = 8"));
}

#[test]
fn approvals_listing_is_readable_and_has_the_commands() {
    let w = setup();
    let child = spawn_psql(&w, "UPDATE t SET v = 9 WHERE id = 1");
    let id = wait_pending(&w, "UPDATE t SET v = 9 WHERE id = 1")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let out = answer(&w, STAFF, &["approvals"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for want in [
        id.as_str(),
        "agent a (uid 65534)",
        "rule hold-updates",
        "UPDATE t SET v = 9 WHERE id = 1",
        &format!("portcullis approve {id}"),
    ] {
        assert!(t.contains(want), "{want:?} missing from:\n{t}");
    }
    assert!(answer(&w, STAFF, &["deny", &id]).status.success());
    drop(wait(child));
}

/// An HTTP endpoint on loopback that answers 200 and keeps the bodies it was sent.
fn webhook_sink() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut r = BufReader::new(c.try_clone().expect("clone"));
            let mut len = 0usize;
            let mut path = String::new();
            let mut headers = serde_json::Map::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if path.is_empty() {
                    path = line.split(' ').nth(1).unwrap_or("").to_owned();
                    continue;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().into());
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_ok()
                && let Ok(mut v) = serde_json::from_slice::<Value>(&body)
            {
                // How it came, beside what it said (for signature checks).
                if let Some(o) = v.as_object_mut() {
                    o.insert("_path".into(), path.into());
                    o.insert("_headers".into(), headers.into());
                    o.insert("_raw".into(), String::from_utf8_lossy(&body).into());
                }
                sink.lock().expect("sink").push(v);
            }
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        }
    });
    (port, got)
}

/// A signed event's signature, checked with Python's `hmac` (another implementation than
/// the daemon's); an unsigned hook's events carry none.
fn check_signature(e: &Value, key: &str) {
    let h = &e["_headers"];
    if e["_path"] == "/slack" {
        assert!(h.get("x-portcullis-signature").is_none(), "{e}");
        return;
    }
    let ts = h["x-portcullis-timestamp"].as_str().expect("timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let age = now.abs_diff(ts.parse::<u64>().expect("a number"));
    assert!(age < 120, "timestamp {ts} is {age} s from now");
    let want = portcullis_tests::stdout_of(
        std::process::Command::new("python3").args([
            "-c",
            "import hmac, hashlib, sys; \
             print('sha256=' + hmac.new(sys.argv[1].encode(), \
             (sys.argv[2] + '.' + sys.argv[3]).encode(), hashlib.sha256).hexdigest())",
            key,
            ts,
            e["_raw"].as_str().expect("raw body"),
        ]),
        "python3 hmac",
    );
    assert_eq!(
        h["x-portcullis-signature"].as_str(),
        Some(want.as_str()),
        "{e}"
    );
}

#[test]
fn webhooks_hear_of_requests_and_answers_and_a_dead_one_delays_nothing() {
    let (port, got) = webhook_sink();
    // A listener that never accepts: connections hang until the hook's timeout.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    // The JSON hook signs its events; the Slack one does not.
    let keys = portcullis_tests::Env::new();
    let key_file = keys.dir.join("webhook.key");
    std::fs::write(&key_file, "s3cret-signing-key\n").expect("key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let w = portcullis_tests::pg::world_full(
        "",
        Some(POLICY),
        "",
        &format!(
            "[[webhook]]\nurl = \"http://127.0.0.1:{dead_port}/hook\"\ntimeout = \"30s\"\n\n\
             [[webhook]]\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret_file = \"{}\"\n\n\
             [[webhook]]\nurl = \"http://127.0.0.1:{port}/slack\"\nformat = \"slack\"\n\
             events = [\"approval_requested\"]\n",
            key_file.display()
        ),
    );
    w.pg.sql(
        "shop",
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 1); \
         GRANT ALL ON t TO app",
    );
    let started = Instant::now();
    let child = spawn_psql(&w, "UPDATE t SET v = 2 WHERE id = 1");
    let id = wait_pending(&w, "UPDATE t SET v = 2 WHERE id = 1")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert!(answer(&w, STAFF, &["approve", &id]).status.success());
    assert!(wait(child).status.success());
    // The dead hook (30 s timeout) held up neither the request nor the answer.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = got.lock().expect("sink").clone();
        let json_req = events.iter().any(|e| {
            e["event"] == "approval_requested"
                && e["id"] == id.as_str()
                && e["rule"] == "hold-updates"
        });
        let json_dec = events.iter().any(|e| {
            e["event"] == "approval_decided" && e["id"] == id.as_str() && e["outcome"] == "approved"
        });
        let slack = events.iter().any(|e| {
            e["text"]
                .as_str()
                .is_some_and(|t| t.contains(&format!("portcullis approve {id}")))
        });
        if json_req && json_dec && slack {
            // The Slack hook asked for requests only.
            assert_eq!(events.len(), 3, "{events:?}");
            for e in &events {
                check_signature(e, "s3cret-signing-key");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "webhook events missing: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
