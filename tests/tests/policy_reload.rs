//! Hot reload of policies in a running daemon: on file change and on SIGHUP, a broken file
//! keeps the previous policies and the error names file, line and column.

use std::{
    process::Command,
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

const GOOD: &str =
    "[[rule]]\nid = \"deny-drops\"\nsql = { kinds = [\"drop_*\"] }\naction = \"deny\"\n";

#[test]
fn policy_files_reload_on_change_and_a_broken_file_keeps_the_last_good_set() {
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
    let p = wait_until("a failed reload", &d, |p| p["reloads_failed"] == 1);
    assert_eq!(p["rules"], 1, "previous policies stay: {p}");
    assert_eq!(p["generation"], 1, "{p}");
    let err = d
        .logs
        .wait_for("the reload error", Duration::from_secs(5), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("policy reload failed"))
        });
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|e| e.contains("20-more.toml:4:") && e.contains("oops")),
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
    let out = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .output()
        .expect("run");
    assert!(!out.status.success(), "must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.toml:3:10") && err.contains("unknown action `allw`"),
        "{err}"
    );
    let check = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&config)
        .args(["policy", "check"])
        .output()
        .expect("check");
    assert_eq!(check.status.code(), Some(1));
}
