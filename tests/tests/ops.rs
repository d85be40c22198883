//! Running it on a host: the metrics endpoint checked by `promtool`, readiness, systemd
//! notifications, SIGTERM under load, SIGHUP with a broken policy, the unit file, install
//! and uninstall into a temporary root, and `doctor`.

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portcullis_tests::{
    Daemon, Env, Tmpfs, in_cgroup,
    pg::{
        logged_numbers, pg_bin, pgbench_load, psql, psql_script, recorded_numbers, text, wait_load,
        world_full, world_with,
    },
    portcullis_json, probe, workspace_bin,
};

fn promtool_check(exposition: &str) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt install prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool also reports lint problems (naming, help) on stdout with status 0 in some
    // versions: there must be none.
    let lint = String::from_utf8_lossy(&out.stdout);
    assert!(lint.trim().is_empty(), "promtool: {lint}");
}

#[test]
fn metrics_pass_promtool_and_move_as_a_workload_runs() {
    let w = world_with("", None);
    let d = &w.daemon;
    assert_eq!(d.http_get("/healthz").0, 200);
    let (status, body) = d.http_get("/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ok    store writable"), "{body}");
    let before = d.metric("portcullis_statements_total", &[("agent", "a")]);

    w.pg.sql("shop", "CREATE TABLE t (id int); GRANT ALL ON t TO app");
    let out = psql_script(&w, &w.agent, "SELECT 1;\nSELECT 2;\nDROP TABLE t;\n");
    assert!(
        text(&out).contains("deny-destructive-ddl"),
        "{}",
        text(&out)
    );
    assert!(psql(&w, &w.agent, "disable", "SELECT 3").status.success());

    let (status, body) = d.http_get("/metrics");
    assert_eq!(status, 200);
    promtool_check(&body);
    let m = |name: &str, labels: &[(&str, &str)]| d.metric(name, labels);
    // Three SELECTs (the shipped policies mask them) and the DROP.
    assert_eq!(
        m("portcullis_statements_total", &[("agent", "a")]) - before,
        4.0
    );
    // The DROP, by the rule that refused it.
    assert_eq!(
        m(
            "portcullis_rule_decisions_total",
            &[("rule", "deny-destructive-ddl"), ("decision", "deny")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "portcullis_statements_total",
            &[("agent", "a"), ("target", "pg"), ("decision", "deny")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "portcullis_connections_total",
            &[("agent", "a"), ("target", "pg"), ("protocol", "postgres")]
        ),
        2.0
    );
    assert!(m("portcullis_ebpf_events_total", &[("event", "redirected")]) >= 2.0);
    assert!(m("portcullis_audit_records_total", &[]) >= 8.0);
    assert!(m("portcullis_audit_commits_total", &[]) >= 1.0);
    assert!(
        m(
            "portcullis_statement_duration_seconds_count",
            &[("target", "pg")]
        ) >= 3.0
    );
    assert!(
        m(
            "portcullis_upstream_duration_seconds_count",
            &[("target", "pg")]
        ) >= 3.0
    );
    assert_eq!(
        m(
            "portcullis_upstream_connect_duration_seconds_count",
            &[("target", "pg")]
        ),
        2.0
    );
    assert!(m("portcullis_decision_duration_seconds_count", &[]) >= 4.0);
    assert!(m("portcullis_audit_commit_duration_seconds_count", &[]) >= 1.0);
    // SELECT 1, 2 and 3 are one shape: its decision is kept once it was seen twice.
    assert_eq!(m("portcullis_policy_cached_shape_decisions", &[]), 1.0);
    // Six cgroup programs (with connect_unix) and the two process hooks.
    assert_eq!(m("portcullis_ebpf_programs_attached", &[]), 8.0);
    assert_eq!(m("portcullis_ready", &[]), 1.0);
    assert_eq!(m("portcullis_connections_active", &[("agent", "a")]), 0.0);
    assert!(body.contains("portcullis_build_info{version=\""), "{body}");
    // Label values are names, never statements or pids.
    assert!(!body.contains("DROP"), "SQL in a label");
}

#[test]
fn masked_values_are_counted_by_detector() {
    let w = world_with(
        "",
        Some(
            "[[rule]]\nid = \"m\"\nsql = { kinds = [\"select\"] }\naction = \"mask\"\n\
             mask = { detectors = [\"email\"], strategy = \"redact\" }\n",
        ),
    );
    let out = psql(
        &w,
        &w.agent,
        "disable",
        "SELECT 'a@example.com' AS x UNION ALL SELECT 'b@example.org'",
    );
    assert!(text(&out).contains("[REDACTED:email]"), "{}", text(&out));
    assert_eq!(
        w.daemon
            .metric("portcullis_masked_values_total", &[("detector", "email")]),
        2.0
    );
}

#[test]
fn readyz_turns_unready_when_the_store_cannot_write_and_back() {
    let disk = Tmpfs::mount("pc-ready", "2m");
    let w = world_full(
        "",
        None,
        "",
        &format!("[store]\npath = \"{}\"\n", disk.0.join("p.db").display()),
    );
    assert_eq!(w.daemon.http_get("/readyz").0, 200);
    let filler = disk.fill();
    let (status, body) = w.daemon.http_get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("FAIL  store writable"), "{body}");
    assert_eq!(w.daemon.metric("portcullis_ready", &[]), 0.0);
    // Still alive: health is not readiness.
    assert_eq!(w.daemon.http_get("/healthz").0, 200);
    fs::remove_file(&filler).expect("rm");
    let (status, body) = w.daemon.http_get("/readyz");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let env = Env::new();
    let sock = env.dir.join("notify.sock");
    let rx = UnixDatagram::bind(&sock).expect("bind");
    rx.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let cfg = env.config("", "");
    let mut d = Daemon::start_with_env(&cfg, &[("NOTIFY_SOCKET", &sock)]);
    let mut buf = [0u8; 512];
    let mut next = || {
        // A signal meant for another test's child can interrupt the wait (EINTR): wait on.
        let n = loop {
            match rx.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => break r.expect("a notification"),
            }
        };
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("MAINPID={}", d.child.id())),
        "{ready}"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    let r = next();
    assert!(r.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{r}");
    assert!(next().starts_with("READY=1"));
    assert!(d.stop().success());
    assert!(next().starts_with("STOPPING=1"));
}

#[test]
fn sigterm_under_load_drains_and_loses_no_audit_record() {
    let mut w = world_with("", None);
    let bench = pgbench_load(&w, 30);
    wait_load(&w, 1000);
    let started = Instant::now();
    let status = w.daemon.stop();
    assert!(status.success(), "{status:?}");
    // drain_timeout is 2 s in the tests' configuration.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The last lines may still be on their way through the pipe.
    for msg in ["stopping: draining sessions", "audit store closed"] {
        w.daemon
            .logs
            .wait_for(msg, Duration::from_secs(5), |v| v["message"] == msg);
    }
    drop(bench.wait_with_output());
    std::thread::sleep(Duration::from_millis(300));
    let logged = logged_numbers(&w.pg.log());
    w.daemon = Daemon::start(&w.daemon.config.clone());
    let recorded = recorded_numbers(&w);
    let missing = logged.difference(&recorded).count();
    assert_eq!(missing, 0, "of {} statements run", logged.len());
    let v = portcullis_json(&w.daemon.config, &["audit", "verify", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn sighup_with_a_broken_policy_keeps_the_old_one_and_counts_the_failure() {
    let policy =
        "[[rule]]\nid = \"no-drops\"\nsql = { kinds = [\"drop_table\"] }\naction = \"deny\"\n";
    let w = world_with("", Some(policy));
    w.pg.sql(
        "shop",
        "CREATE TABLE t (id int); ALTER TABLE t OWNER TO app",
    );
    let file = w.env.dir.join("policies").join("test.toml");
    fs::write(&file, "[[rule]]\nid = \"broken\"\nnot_a_field = 1\n").expect("write");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(w.daemon.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while w
        .daemon
        .metric("portcullis_policy_reloads_total", &[("result", "failed")])
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the failed reload was not counted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = psql(&w, &w.agent, "disable", "DROP TABLE t");
    assert!(text(&out).contains("no-drops"), "{}", text(&out));
    assert_eq!(
        w.pg.sql(
            "shop",
            "SELECT count(*) FROM pg_tables WHERE tablename = 't'"
        ),
        "1"
    );
}

fn files_under(root: &Path) -> Vec<String> {
    let out = Command::new("find")
        .arg(root)
        .args(["-mindepth", "1"])
        .output()
        .expect("find");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.trim_start_matches(root.to_str().expect("utf-8"))
                .to_owned()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn the_unit_verifies_and_install_then_uninstall_leave_the_expected_files() {
    let env = Env::new();
    let root = env.dir.join("root");
    fs::create_dir_all(root.join("etc")).expect("etc");
    for f in ["group", "gshadow"] {
        fs::write(root.join("etc").join(f), "").expect("group file");
    }
    let bin = workspace_bin("portcullis");
    let run = |args: &[&str]| {
        let out = Command::new(&bin).args(args).output().expect("portcullis");
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        text(&out)
    };
    let root_s = root.to_str().expect("utf-8");
    run(&["install", "--root", root_s]);
    let files = files_under(&root);
    for want in [
        "/usr/bin/portcullis",
        "/etc/systemd/system/portcullis.service",
        "/etc/portcullis/portcullis.toml",
        "/etc/portcullis/policies/10-deny-destructive.toml",
        "/etc/portcullis/policies/20-require-approval.toml",
        "/etc/portcullis/policies/30-mask-pii.toml",
        "/var/lib/portcullis",
    ] {
        assert!(files.iter().any(|f| f == want), "{want} missing: {files:?}");
    }
    let mode = |p: &str| {
        fs::metadata(root.join(p.trim_start_matches('/')))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("/usr/bin/portcullis"), 0o755);
    assert_eq!(mode("/var/lib/portcullis"), 0o700);
    let groups = fs::read_to_string(root.join("etc/group")).expect("group");
    assert!(groups.contains("portcullis-approvers:") && groups.contains("portcullis-auditors:"));
    // The installed configuration reads the installed policies.
    let cfg = fs::read_to_string(root.join("etc/portcullis/portcullis.toml")).expect("cfg");
    assert!(cfg.contains("\ndir = \"/etc/portcullis/policies\""));

    // The unit passes systemd-analyze verify (pointing at a binary that exists here).
    let unit = fs::read_to_string(root.join("etc/systemd/system/portcullis.service"))
        .expect("unit")
        .replace("/usr/bin/portcullis", bin.to_str().expect("utf-8"));
    let unit_path = env.dir.join("portcullis.service");
    fs::write(&unit_path, &unit).expect("unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).trim().is_empty(), "warnings: {}", text(&out));
    for key in [
        "Type=notify",
        "Restart=always",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_BPF",
        "ReadWritePaths=",
        "StateDirectory=portcullis",
        "LoadCredential=",
        "LogRateLimitIntervalSec=0",
    ] {
        assert!(unit.contains(key), "{key} missing from the unit");
    }

    // A second install keeps what the operator edited.
    fs::write(root.join("etc/portcullis/portcullis.toml"), "# mine\n").expect("edit");
    let log = run(&["install", "--root", root_s]);
    assert!(log.contains("kept"), "{log}");
    assert_eq!(
        fs::read_to_string(root.join("etc/portcullis/portcullis.toml")).expect("cfg"),
        "# mine\n"
    );

    // Uninstall keeps the audit store; --purge removes it and the groups.
    fs::write(root.join("var/lib/portcullis/portcullis.db"), "x").expect("db");
    run(&["uninstall", "--root", root_s]);
    let files = files_under(&root);
    assert!(
        !files.iter().any(|f| f.starts_with("/etc/portcullis")),
        "{files:?}"
    );
    assert!(
        !files.iter().any(|f| f == "/usr/bin/portcullis"),
        "{files:?}"
    );
    assert!(
        !files.iter().any(|f| f.ends_with("portcullis.service")),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f == "/var/lib/portcullis/portcullis.db"),
        "{files:?}"
    );
    run(&["uninstall", "--root", root_s, "--purge"]);
    let files = files_under(&root);
    assert!(!files.iter().any(|f| f.contains("portcullis")), "{files:?}");
    let groups = fs::read_to_string(root.join("etc/group")).expect("group");
    assert!(!groups.contains("portcullis-"), "{groups}");
}

/// A target's PostgreSQL also listens on a Unix socket, which connection interception does
/// not see: the daemon warns at start and `doctor` says how to close it; once it is closed
/// to other users, `doctor` only notes it.
#[test]
fn a_targets_postgresql_unix_socket_is_reported_as_a_way_around_the_gate() {
    let w = world_with("", None);
    let sock = w.pg.socket_dir.join(format!(".s.PGSQL.{}", w.pg.port));
    let path = sock.display().to_string();
    let mode = |p: &Path| fs::metadata(p).expect("socket").permissions().mode() & 0o777;
    assert_eq!(
        mode(&sock),
        0o777,
        "the test server's socket is open to all, as by default"
    );
    let warned = w
        .daemon
        .logs
        .wait_for("the Unix socket warning", Duration::from_secs(5), |v| {
            v["path"].as_str() == Some(path.as_str())
        });
    assert_eq!(warned["level"], "WARN", "{warned}");
    assert!(
        warned["fix"]
            .as_str()
            .is_some_and(|f| f.contains("unix_socket_permissions")),
        "{warned}"
    );
    // doctor's line about the socket.
    let doctor = || doctor_line(&w.daemon.config, &path, |l| l.contains(&path));
    let line = doctor();
    assert!(
        line.starts_with("WARN") && line.contains("without passing the gate"),
        "{line}"
    );
    assert!(line.contains("unix_socket_permissions = 0770"), "{line}");

    fs::set_permissions(&sock, fs::Permissions::from_mode(0o770)).expect("chmod");
    let line = doctor();
    assert!(
        line.starts_with("ok") && line.contains("only its owner and group may connect"),
        "{line}"
    );
}

/// On Linux 6.7+ a protected process's connect to a Unix socket by a target's socket name
/// is refused by the kernel (cgroup `connect_unix`), in whatever directory and however the
/// client passes the path (libpq's whole `sockaddr_un`, Rust's NUL-terminated length,
/// Python's exact length, a relative path, an abstract name): `psql` over the socket fails,
/// an unprotected one
/// connects, another Unix socket is reached, and the refusal outlives the daemon (its link
/// is pinned). The test machines run such a kernel: without the hook this test fails, it
/// does not skip.
#[test]
fn connects_to_a_targets_unix_socket_by_its_name_are_refused() {
    let mut w = world_with("", None);
    let st = w.daemon.status();
    assert_eq!(st["kernel"]["unix_guard"]["state"], "active", "{st}");
    assert_eq!(st["kernel"]["unix_names"], 1, "{st}");
    assert!(
        st["kernel"]["programs"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "pc_connect_unix")),
        "{st}"
    );
    let sock = w.pg.socket_dir.join(format!(".s.PGSQL.{}", w.pg.port));
    // A real client over the socket (pg_hba trusts local connections: no password).
    let psql_unix = |cgroup: &str| {
        let mut cmd = Command::new(pg_bin().join("psql"));
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-U",
            "app",
            "-d",
            "shop",
            "-c",
            "SELECT 40 + 2",
        ])
        .arg("-h")
        .arg(&w.pg.socket_dir)
        .args(["-p", &w.pg.port.to_string()])
        .env("HOME", &w.env.dir);
        in_cgroup(&mut cmd, &w.env.cg_dir(cgroup), None);
        cmd.output().expect("psql")
    };
    let refused = psql_unix(&w.agent);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("Operation not permitted"),
        "{}",
        text(&refused)
    );
    let direct = psql_unix(&w.direct);
    assert!(direct.status.success(), "{}", text(&direct));
    assert_eq!(String::from_utf8_lossy(&direct.stdout).trim(), "42");
    // The same name in another directory, and a relative path.
    let elsewhere = w.env.dir.join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("dir");
    let other_dir = elsewhere.join(format!(".s.PGSQL.{}", w.pg.port));
    let _same_name = std::os::unix::net::UnixListener::bind(&other_dir).expect("bind");
    let path = sock.display().to_string();
    for p in [path.as_str(), &other_dir.display().to_string()] {
        let r = probe(&w.env, &w.agent, None, &["unix", p]);
        assert_eq!(r["errno"], libc::EPERM, "{r}");
        let r = probe(&w.env, &w.direct, None, &["unix", p]);
        assert_eq!(r["ok"], true, "{r}");
    }
    // Python passes the path's exact length, with no NUL; and a path relative to the
    // socket's directory names it too.
    let python = |cgroup: &str, path: &str, dir: &Path| {
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            "import socket, sys\n\
             try:\n    socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('ok')\n\
             except OSError as e:\n    print(e.errno)",
            path,
        ])
        .current_dir(dir);
        in_cgroup(&mut cmd, &w.env.cg_dir(cgroup), None);
        String::from_utf8_lossy(&cmd.output().expect("python3").stdout)
            .trim()
            .to_owned()
    };
    let name = format!(".s.PGSQL.{}", w.pg.port);
    for (p, dir) in [
        (path.as_str(), w.env.dir.as_path()),
        (&name, &w.pg.socket_dir),
    ] {
        assert_eq!(python(&w.agent, p, dir), libc::EPERM.to_string(), "{p}");
        assert_eq!(python(&w.direct, p, dir), "ok", "{p}");
    }
    // An abstract name (PostgreSQL's `unix_socket_directories = '@dir'`), which no file
    // permission closes.
    let abstract_name = format!("{}/.s.PGSQL.{}", w.env.dir.display(), w.pg.port);
    let _abstract = {
        use std::os::linux::net::SocketAddrExt as _;
        let a = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .expect("abstract name");
        std::os::unix::net::UnixListener::bind_addr(&a).expect("bind abstract")
    };
    let at = format!("@{abstract_name}");
    let r = probe(&w.env, &w.agent, None, &["unix", &at]);
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    let r = probe(&w.env, &w.direct, None, &["unix", &at]);
    assert_eq!(r["ok"], true, "{r}");
    // Another Unix socket is no target's.
    let other = elsewhere.join("other.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&other).expect("bind");
    let r = probe(
        &w.env,
        &w.agent,
        None,
        &["unix", &other.display().to_string()],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(w.daemon.counter("refused_unix"), 6);
    let out = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&w.daemon.config)
        .arg("status")
        .output()
        .expect("status");
    assert!(
        text(&out).contains("unix       connects by 1 target socket name(s) refused"),
        "{}",
        text(&out)
    );
    // doctor says so, from the daemon and, with the daemon gone, from the pinned link.
    let hook_line = |config: &Path| {
        doctor_line(config, "the Unix hook", |l| {
            l.contains("connects to") && l.contains("by a target's socket name")
        })
    };
    let line = hook_line(&w.daemon.config);
    assert!(line.starts_with("ok"), "{line}");
    // With the daemon gone the pinned hook still refuses.
    w.daemon.kill9();
    let r = probe(&w.env, &w.agent, None, &["unix", &path]);
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    let line = hook_line(&w.daemon.config);
    assert!(line.starts_with("ok"), "{line}");
}

/// The line of `portcullis doctor`'s report that `pick` finds; `what` names it when none does.
fn doctor_line(config: &Path, what: &str, pick: impl Fn(&str) -> bool) -> String {
    let out = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(config)
        .arg("doctor")
        .output()
        .expect("doctor");
    let t = text(&out);
    t.lines()
        .find(|l| pick(l))
        .unwrap_or_else(|| panic!("no line about {what}: {t}"))
        .to_owned()
}

#[test]
fn doctor_reports_a_missing_bpffs_and_a_bad_config() {
    let env = Env::new();
    let good = env.config("", "");
    let bin = workspace_bin("portcullis");
    // A good host and configuration: no failure.
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&good)
        .arg("doctor")
        .output()
        .expect("doctor");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("ok    bpffs mounted at /sys/fs/bpf"), "{t}");
    assert!(t.ends_with("no problems found\n"), "{t}");

    // Without bpffs (in a private mount namespace, so nothing else notices).
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "umount /sys/fs/bpf && exec {} --config {} doctor",
            bin.display(),
            good.display()
        ))
        .output()
        .expect("unshare");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let fails: Vec<&str> = t.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 1, "{t}");
    assert!(
        fails[0].contains("bpffs is not mounted at /sys/fs/bpf")
            && fails[0].contains("fix: mount -t bpf bpf /sys/fs/bpf"),
        "{t}"
    );

    // A bad configuration: the problem with its position, and non-zero.
    let bad = env.dir.join("bad.toml");
    fs::write(
        &bad,
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nlisten_typo = 1\n",
    )
    .expect("bad");
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&bad)
        .args(["doctor", "--json"])
        .output()
        .expect("doctor");
    assert_eq!(out.status.code(), Some(1));
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let fail = checks
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["level"] == "fail")
        .unwrap_or_else(|| panic!("no failure: {checks}"));
    let what = fail["what"].as_str().expect("what");
    assert!(
        what.contains("listen_typo") && what.contains(":3:"),
        "{what}"
    );
    assert!(
        fail["fix"].as_str().expect("fix").contains("bad.toml"),
        "{fail}"
    );
}

#[test]
fn the_deb_carries_what_install_lays_down() {
    let deb = std::env::var_os("PORTCULLIS_DEB").unwrap_or_else(|| {
        panic!(
            "PORTCULLIS_DEB is not set: `cargo xtask test` builds the package and sets it \
             (or run `cargo xtask deb --debug` and set it to target/debian/*.deb)"
        )
    });
    let env = Env::new();
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    assert!(list.status.success(), "{}", text(&list));
    let list = String::from_utf8_lossy(&list.stdout);
    for want in [
        "./usr/bin/portcullis",
        "./lib/systemd/system/portcullis.service",
        "./etc/portcullis/portcullis.toml",
        "./etc/portcullis/policies/10-deny-destructive.toml",
        "./etc/portcullis/policies/20-require-approval.toml",
        "./etc/portcullis/policies/30-mask-pii.toml",
        "./usr/share/doc/portcullis/README.md",
        "./usr/share/doc/portcullis/audit.md",
    ] {
        assert!(
            list.contains(want),
            "{want} missing from the package:\n{list}"
        );
    }
    // The same bytes as `portcullis install`.
    let unpacked = env.dir.join("unpacked");
    let installed = env.dir.join("installed");
    assert!(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&unpacked)
            .status()
            .expect("dpkg-deb -x")
            .success()
    );
    assert!(
        Command::new(workspace_bin("portcullis"))
            .args(["install", "--root"])
            .arg(&installed)
            .status()
            .expect("install")
            .success()
    );
    for (in_deb, by_install) in [
        (
            "lib/systemd/system/portcullis.service",
            "etc/systemd/system/portcullis.service",
        ),
        (
            "etc/portcullis/portcullis.toml",
            "etc/portcullis/portcullis.toml",
        ),
        (
            "etc/portcullis/policies/30-mask-pii.toml",
            "etc/portcullis/policies/30-mask-pii.toml",
        ),
    ] {
        assert_eq!(
            fs::read(unpacked.join(in_deb)).expect("in the package"),
            fs::read(installed.join(by_install)).expect("installed"),
            "{in_deb} differs from what install writes"
        );
        let mode =
            |p: std::path::PathBuf| fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(
            mode(unpacked.join(in_deb)),
            mode(installed.join(by_install)),
            "{in_deb}: the package and install give it different modes"
        );
    }
    // Policies are root's to read: an agent must not learn the rules it is judged by.
    let policy = |root: &Path| {
        fs::metadata(root.join("etc/portcullis/policies/10-deny-destructive.toml"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(policy(&unpacked), 0o640);
    assert_eq!(policy(&installed), 0o640);
    // Configuration is kept on upgrade; the scripts create the groups and detach on removal.
    let control = env.dir.join("control");
    assert!(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(&control)
            .status()
            .expect("dpkg-deb -e")
            .success()
    );
    let conffiles = fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert!(
        conffiles.contains("/etc/portcullis/portcullis.toml"),
        "{conffiles}"
    );
    let postinst = fs::read_to_string(control.join("postinst")).expect("postinst");
    assert!(
        postinst.contains("groupadd --system \"$g\"") && postinst.contains("portcullis-approvers")
    );
    let prerm = fs::read_to_string(control.join("prerm")).expect("prerm");
    assert!(prerm.contains("detach"), "{prerm}");
}

/// Runs 3,000 statements through the gate with psql while the daemon's stderr is not read
/// (a stalled journal): each is a decision event, far more than `[log] queue_bytes` (the
/// 64 KiB minimum) and the pipe hold. Returns psql and whether it finished within `within`.
fn statements_while_the_journal_stalls(
    w: &portcullis_tests::pg::Pgw,
    within: Duration,
) -> (std::process::Child, bool) {
    use std::io::Write as _;
    w.daemon.logs.pause();
    let mut cmd = portcullis_tests::pg::psql_cmd(w, &w.agent, "disable");
    cmd.args(["-A", "-t", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("psql");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all("SELECT 1;\n".repeat(3000).as_bytes())
        .expect("script");
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait().expect("psql").is_some() {
            return (child, true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, false)
}

#[test]
fn a_stalled_journal_costs_log_lines_not_statements() {
    let w = world_full("", None, "", "[log]\nqueue_bytes = 65536\n");
    let (psql, finished) = statements_while_the_journal_stalls(&w, Duration::from_secs(120));
    let out = psql.wait_with_output().expect("psql");
    w.daemon.logs.resume();
    assert!(finished, "statements stalled with the log reader");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3000);
    // Once the journal reads again, the daemon says how many lines it could not write.
    let warning =
        w.daemon
            .logs
            .wait_for("the dropped-lines warning", Duration::from_secs(10), |v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("log lines were dropped"))
            });
    let dropped = warning["dropped"].as_u64().expect("dropped");
    assert!(dropped > 1000, "{warning}");
    assert!(
        w.daemon.metric("portcullis_log_lines_dropped_total", &[]) >= dropped as f64,
        "the metric counts them"
    );
    // The audit store holds every statement all the same.
    let sessions = portcullis_json(&w.daemon.config, &["sessions", "--json"]);
    let statements: u64 = sessions
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["statements"].as_u64())
        .sum();
    assert!(statements >= 3000, "{sessions}");
}

#[test]
fn with_when_full_wait_no_line_is_lost_and_statements_wait_for_the_journal() {
    let w = world_full(
        "",
        None,
        "",
        "[log]\nqueue_bytes = 65536\nwhen_full = \"wait\"\n",
    );
    let (psql, finished) = statements_while_the_journal_stalls(&w, Duration::from_secs(3));
    assert!(!finished, "psql finished although the log reader stalled");
    w.daemon.logs.resume();
    let out = psql.wait_with_output().expect("psql");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3000);
    assert_eq!(
        w.daemon.metric("portcullis_log_lines_dropped_total", &[]),
        0.0
    );
}
