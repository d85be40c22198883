//! OIDC identity end to end: a test issuer on loopback (discovery and JWKS, keys generated
//! per run), tokens presented as the PostgreSQL password by psql in a protected cgroup, a
//! real server behind the gate in inject mode.

use std::{fs, path::Path, process::Output, time::Duration};

use portcullis_tests::{
    As, Env,
    oidc::{Issuer, Key, hs256, now, raw_token, tampered},
    pg::{Pgw, psql_cmd, secret_file, text, world_policy},
    portcullis_as, portcullis_json,
};
use serde_json::{Value, json};

const AUD: &str = "portcullis-test";

/// A world whose target takes tokens, trusting `issuer`; policies: default deny, and
/// `data-readers` may do anything. The side environment holds the server password file and
/// must outlive the world (a tuple drops its first field first).
fn token_world(issuer: &Issuer, target_extra: &str, oidc_extra: &str) -> (Pgw, Env) {
    token_world_with(issuer, target_extra, oidc_extra, "")
}

/// [`token_world`] with more configuration sections (a second `[[oidc]]`, ...).
fn token_world_with(
    issuer: &Issuer,
    target_extra: &str,
    oidc_extra: &str,
    more: &str,
) -> (Pgw, Env) {
    let side = Env::new();
    let secret = secret_file(&side);
    let w = world_policy(
        &format!(
            "auth = \"inject\"\ncredentials = {{ user = \"app\", password_file = \"{}\" }}\n{target_extra}",
            secret.display()
        ),
        Some(
            "[[rule]]\nid = \"readers\"\noidc = { groups = [\"data-readers\"] }\naction = \"allow\"\n",
        ),
        "default = \"deny\"",
        "",
        &format!(
            "[[oidc]]\nissuer = \"{}\"\naudience = \"{AUD}\"\nleeway = \"1s\"\n\
             refetch_interval = \"2s\"\nmax_age = \"1h\"\nclaims = [\"tenant\"]\n{oidc_extra}\n\n{more}\n",
            issuer.url
        ),
    );
    (w, side)
}

/// psql in the agent's cgroup (uid 65534) with `password` as its password.
fn with_password(w: &Pgw, password: &str, sql: &str) -> Output {
    let mut cmd = psql_cmd(w, &w.agent, "disable");
    cmd.env("PGPASSWORD", password).args(["-c", sql]);
    cmd.output().expect("psql")
}

fn accepted(w: &Pgw, token: &str, what: &str) {
    let o = with_password(w, token, "SELECT 9000 + 131 AS answer");
    let out = text(&o);
    assert!(o.status.success() && out.contains("9131"), "{what}: {out}");
}

fn refused(w: &Pgw, token: &str, expect: &str, what: &str) {
    let o = with_password(w, token, "SELECT 9000 + 131 AS answer");
    let out = text(&o);
    assert!(!o.status.success(), "{what} was accepted: {out}");
    assert!(
        out.contains("OIDC token refused") || out.contains("requires an OIDC token"),
        "{what}: {out}"
    );
    assert!(
        out.contains(expect),
        "{what}: expected `{expect}` in: {out}"
    );
    eprintln!("{what}: {}", out.trim());
    assert!(!out.contains("9131"), "{what}: the statement ran: {out}");
}

fn store_bytes(w: &Pgw) -> Vec<u8> {
    let db = w.store_path();
    let mut all = Vec::new();
    for sfx in ["", "-wal"] {
        let p = format!("{}{sfx}", db.display());
        if Path::new(&p).exists() {
            all.extend(fs::read(&p).expect("read the store"));
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn tokens_are_validated_refused_with_clear_errors_and_used_in_policy() {
    let (rsa, ec, ed) = (Key::rsa("rsa-1"), Key::ec("ec-1"), Key::ed("ed-1"));
    let issuer = Issuer::start(&[&rsa, &ec, &ed]);
    // A second trusted issuer with its own key: each token goes to the issuer it names.
    let other_key = Key::ec("other-1");
    let other = Issuer::start(&[&other_key]);
    let (w, _side) = token_world_with(
        &issuer,
        "require_token = true",
        "[[oidc.binding]]\nsub = \"bound-here\"\nbind = { uid = 65534, agent = \"a\" }\n\
         [[oidc.binding]]\nsub = \"bound-elsewhere\"\nbind = { uid = 4242 }\n",
        &format!(
            "[[oidc]]\nissuer = \"{}\"\naudience = \"{AUD}\"\ngroups_claim = \"roles\"\n",
            other.url
        ),
    );
    let reader = |sub: &str| {
        let mut c = issuer.claims(sub, AUD, &["data-readers"], 300);
        c["tenant"] = json!("acme");
        c
    };

    // Accepted: each signature algorithm.
    let good = rsa.mint(&reader("reader-rsa"));
    accepted(&w, &good, "RS256");
    accepted(&w, &ec.mint(&reader("reader-ec")), "ES256");
    accepted(&w, &ed.mint(&reader("reader-ed")), "EdDSA");
    // A space-separated groups string works the same.
    let mut spaced = reader("reader-spaced");
    spaced["groups"] = json!("ops data-readers");
    accepted(&w, &rsa.mint(&spaced), "space-separated groups");

    let mut c = other.claims("from-other", AUD, &[], 300);
    c["roles"] = json!(["data-readers"]);
    accepted(
        &w,
        &other_key.mint(&c),
        "the second issuer, groups from `roles`",
    );
    // The second issuer's name on a token signed by the first issuer's key.
    let mut c = reader("x");
    c["iss"] = json!(other.url);
    refused(
        &w,
        &rsa.mint(&c),
        "no key `rsa-1`",
        "a key of another issuer",
    );
    // Issued 2 h ago, still unexpired: older than max_age (1h).
    let mut c = reader("x");
    c["iat"] = json!(now() - 7200);
    refused(&w, &rsa.mint(&c), "more than max_age", "too old");

    // Refused, each with its reason.
    refused(&w, "hunter2", "requires an OIDC token", "a plain password");
    let mut c = reader("x");
    c["exp"] = json!(now() - 600);
    c["iat"] = json!(now() - 900);
    refused(&w, &rsa.mint(&c), "expired at", "expired");
    let mut c = reader("x");
    c["nbf"] = json!(now() + 600);
    refused(&w, &rsa.mint(&c), "not valid before", "not yet valid");
    let mut c = reader("x");
    c["aud"] = json!("someone-else");
    refused(&w, &rsa.mint(&c), "wrong audience", "wrong audience");
    let mut c = reader("x");
    c["iss"] = json!("http://127.0.0.1:1/evil");
    refused(&w, &rsa.mint(&c), "is not trusted", "wrong issuer");
    let mut c = reader("x");
    c["groups"] = json!(["data-readers", "admins"]);
    refused(&w, &tampered(&good, &c), "signature", "tampered payload");
    let none = raw_token(&json!({"alg": "none", "typ": "JWT"}), &reader("x"), |_| {
        Vec::new()
    });
    refused(&w, &format!("{none}x"), "unsigned", "alg none");
    let confused = raw_token(
        &json!({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}),
        &reader("x"),
        |m| hs256(&rsa.public_bytes(), m),
    );
    refused(&w, &confused, "HS256", "HS256 signed with the public key");
    // An EC signature under the RSA key's id: the key's type does not fit the algorithm.
    let crossed = raw_token(
        &json!({"alg": "ES256", "kid": "rsa-1", "typ": "JWT"}),
        &reader("x"),
        |m| ec.sign(m),
    );
    refused(
        &w,
        &crossed,
        "no key of the issuer fits",
        "ES256 under an RSA key id",
    );

    // Oversized: a token-shaped 20 KiB password is refused by size; a 70 KB password
    // message is refused before it is buffered, and the gate carries on.
    let big = format!("eyJ{}.e30.x", "A".repeat(20 * 1024));
    refused(
        &w,
        &big,
        "more than the 16384 accepted",
        "an oversized token",
    );
    let o = with_password(
        &w,
        &format!("{}.a.b", "A".repeat(70_000)),
        "SELECT 9000 + 131",
    );
    let out = text(&o);
    assert!(!o.status.success() && !out.contains("9131"), "{out}");
    assert!(out.contains("password message"), "{out}");
    accepted(&w, &good, "a token after an oversized password message");

    // An unknown key id: refused; the issuer rotates the key in; accepted. Key-set fetches
    // for unknown ids are rate-limited (refetch_interval = 2s).
    let rotated = Key::rsa("rsa-2");
    let token = rotated.mint(&reader("reader-rotated"));
    let before = issuer.jwks_fetches();
    refused(&w, &token, "no key `rsa-2`", "unknown kid");
    refused(&w, &token, "no key `rsa-2`", "unknown kid, again at once");
    assert_eq!(
        issuer.jwks_fetches() - before,
        1,
        "two tokens with an unknown kid within the refetch interval cause one fetch"
    );
    issuer.publish(&rotated);
    std::thread::sleep(Duration::from_millis(2100));
    accepted(&w, &token, "the rotated-in key");
    let st = portcullis_json(&w.daemon.config, &["status", "--json"]);
    assert_eq!(st["targets"][0]["token"], "required", "{st}");
    // doctor fetches each issuer's keys; an unreachable issuer is a failure with a fix.
    let out = text(&portcullis_as(&w.daemon.config, As::Root, &["doctor"]));
    assert!(
        out.contains(&format!("OIDC issuer {}: 4 signing key(s)", issuer.url)),
        "{out}"
    );
    let dead = w.env.dir.join("dead-issuer.toml");
    fs::write(
        &dead,
        "[[oidc]]\nissuer = \"http://127.0.0.1:1\"\naudience = \"x\"\n",
    )
    .expect("config");
    let out = text(&portcullis_as(&dead, As::Root, &["doctor"]));
    assert!(
        out.contains("OIDC issuer http://127.0.0.1:1: cannot fetch its keys"),
        "{out}"
    );
    let held = &st["oidc"][0];
    assert_eq!(held["issuer"], json!(issuer.url), "{st}");
    assert_eq!(
        held["key_ids"],
        json!(["rsa-1", "ec-1", "ed-1", "rsa-2"]),
        "status shows the keys held after the rotation: {st}"
    );

    // Bindings: the same kind of token, from a matching and from another process.
    accepted(
        &w,
        &rsa.mint(&reader("bound-here")),
        "bound to this process",
    );
    refused(
        &w,
        &rsa.mint(&reader("bound-elsewhere")),
        "bound to { uid = 4242 }",
        "bound to another process",
    );

    // Policy on the group claim: a reader is allowed, a marketer is denied by default.
    let marketer = rsa.mint(&issuer.claims("marketer", AUD, &["marketing"], 300));
    let o = with_password(&w, &marketer, "SELECT 9000 + 131 AS answer");
    let out = text(&o);
    assert!(
        out.contains("ERROR") && out.contains("portcullis"),
        "the marketer's statement is denied: {out}"
    );
    assert!(!out.contains("9131"), "{out}");

    // The audit record shows sub and groups; no token appears in the store or the logs.
    let out = portcullis_as(&w.daemon.config, As::Root, &["audit", "export"]);
    assert!(out.status.success(), "{}", text(&out));
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl"))
        .collect();
    let ids: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "identity")
        .map(|r| &r["body"]["oidc"])
        .collect();
    let reader_rec = ids
        .iter()
        .find(|o| o["sub"] == "reader-rsa")
        .unwrap_or_else(|| panic!("no identity record for reader-rsa: {ids:?}"));
    assert_eq!(reader_rec["groups"], json!(["data-readers"]));
    assert_eq!(reader_rec["claims"]["tenant"], json!(["acme"]));
    assert_eq!(reader_rec["email"], json!("reader-rsa@example.com"));
    let other_rec = ids
        .iter()
        .find(|o| o["sub"] == "from-other")
        .unwrap_or_else(|| panic!("no identity record for from-other: {ids:?}"));
    assert_eq!(other_rec["issuer"], json!(other.url));
    assert_eq!(reader_rec["issuer"], json!(issuer.url));
    assert!(ids.iter().any(|o| o["sub"] == "marketer"));
    assert!(
        !ids.iter().any(|o| o["sub"] == "x"),
        "refused tokens give no identity"
    );
    let mine = portcullis_json(
        &w.daemon.config,
        &["sessions", "--sub", "marketer", "--json"],
    );
    let mine = mine.as_array().expect("sessions");
    assert_eq!(
        mine.len(),
        1,
        "sessions --sub finds the marketer's one session: {mine:?}"
    );
    assert_eq!(mine[0]["oidc_sub"], "marketer");
    let export = String::from_utf8_lossy(&out.stdout);
    let logs = serde_json::to_string(&w.daemon.logs.all()).expect("logs");
    let store = store_bytes(&w);
    for t in [&good, &marketer, &token, &confused] {
        let sig = t.rsplit('.').next().expect("signature");
        assert!(!export.contains(sig), "a token is in the audit export");
        assert!(!logs.contains(sig), "a token is in the daemon's log");
        assert!(!contains(&store, sig), "a token is in the store's files");
        assert!(!w.pg.log().contains(sig), "a token reached the server");
    }
    // Refusals are counted by reason.
    let m = |r: &str| {
        w.daemon
            .metric("portcullis_oidc_tokens_total", &[("result", r)])
    };
    assert!(m("accepted") >= 8.0, "accepted: {}", m("accepted"));
    for r in [
        "expired",
        "not_yet_valid",
        "audience",
        "untrusted_issuer",
        "signature",
        "algorithm",
        "binding",
        "no_token",
    ] {
        assert!(m(r) >= 1.0, "no refusal counted as {r}");
    }
}

/// Runs `SELECT 'first'`, sleeps past the token's expiry, then `SELECT 'second'`.
fn across_expiry(target_extra: &str) -> String {
    let rsa = Key::rsa("rsa-1");
    let issuer = Issuer::start(&[&rsa]);
    let (w, _side) = token_world(&issuer, target_extra, "");
    // Valid for 3 s (and 1 s of leeway); the second statement comes after that.
    let token = rsa.mint(&issuer.claims("short-lived", AUD, &["data-readers"], 3));
    let mut cmd = psql_cmd(&w, &w.agent, "disable");
    cmd.env("PGPASSWORD", &token);
    let out = portcullis_tests::output_with_input(
        cmd.args(["-f", "-"]),
        b"SELECT 'first' AS a;\nSELECT pg_sleep(5);\nSELECT 'second' AS b;\n",
    );
    text(&out)
}

#[test]
fn an_expiring_token_ends_the_session_at_the_next_statement() {
    let out = across_expiry("require_token = true");
    assert!(out.contains("first"), "{out}");
    assert!(
        out.contains("OIDC token expired at"),
        "the session is ended with a clear error: {out}"
    );
    assert!(!out.contains("second"), "{out}");
}

#[test]
fn with_token_expiry_continue_the_session_outlives_its_token() {
    let out = across_expiry("require_token = true\ntoken_expiry = \"continue\"");
    assert!(out.contains("first") && out.contains("second"), "{out}");
    assert!(!out.contains("expired"), "{out}");
}

#[test]
fn optional_tokens_admit_plain_passwords_by_process_identity() {
    let rsa = Key::rsa("rsa-1");
    let issuer = Issuer::start(&[&rsa]);
    // With accept_token, a non-token password is ignored; the default policy (deny) then
    // decides for a caller without groups, so the probe is a statement the rule allows only
    // with a token.
    let (w, _side) = token_world(&issuer, "accept_token = true", "");
    let o = with_password(&w, "not-a-token", "SELECT 9000 + 131 AS answer");
    let out = text(&o);
    assert!(
        !out.contains("OIDC token refused"),
        "a plain password is not refused as a token: {out}"
    );
    assert!(
        out.contains("ERROR") && out.contains("portcullis"),
        "no groups, so the default denies: {out}"
    );
    accepted(
        &w,
        &rsa.mint(&issuer.claims("opt", AUD, &["data-readers"], 60)),
        "an optional token",
    );
    // A token that is presented is checked all the same.
    let mut c = issuer.claims("opt", AUD, &["data-readers"], 60);
    c["aud"] = json!("other");
    refused(&w, &rsa.mint(&c), "wrong audience", "a bad optional token");
}

#[test]
fn a_reload_adds_an_issuer_without_a_restart() {
    let rsa = Key::rsa("rsa-1");
    let issuer = Issuer::start(&[&rsa]);
    let (w, _side) = token_world(&issuer, "require_token = true", "");
    let late_key = Key::ed("late-1");
    let late = Issuer::start(&[&late_key]);
    let token = late_key.mint(&late.claims("late-agent", AUD, &["data-readers"], 300));
    refused(&w, &token, "is not trusted", "an issuer not configured yet");

    let cfg = fs::read_to_string(&w.daemon.config).expect("config");
    fs::write(
        &w.daemon.config,
        format!(
            "{cfg}\n[[oidc]]\nissuer = \"{}\"\naudience = \"{AUD}\"\n",
            late.url
        ),
    )
    .expect("rewrite the config");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(w.daemon.child.id() as i32, libc::SIGHUP) };
    w.daemon
        .logs
        .wait_for("the issuers replaced", Duration::from_secs(10), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("reload: OIDC issuers replaced"))
        });
    accepted(&w, &token, "the issuer added by the reload");
    accepted(
        &w,
        &rsa.mint(&issuer.claims("first", AUD, &["data-readers"], 300)),
        "the first issuer still",
    );
}
