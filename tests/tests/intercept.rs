//! Transparent interception, end to end: real programs in this kernel, real cgroups, real
//! processes, the real daemon. Run as root (`cargo xtask test`); they fail without it.

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use portcullis_tests::*;
use serde_json::Value;

const NOBODY: u32 = 65534;

/// A protected agent cgroup `agents/a`, an echo server on 127.0.0.2 and [::1], a target
/// covering 127.0.0.0/8 and ::1 at the echo port.
struct World {
    env: Env,
    agent: String,
    echo: Echo,
    config: std::path::PathBuf,
}

fn world(ebpf_extra: &str, extra_agents: &[(&str, &str)]) -> World {
    world_with("", ebpf_extra, extra_agents)
}

/// [`world`] with more `[proxy]` keys.
fn world_with(proxy_extra: &str, ebpf_extra: &str, extra_agents: &[(&str, &str)]) -> World {
    let env = Env::new();
    let agent = env.cgroup("agents/a");
    let echo = Echo::start(Ipv4Addr::new(127, 0, 0, 2));
    let sel = format!("cgroup = \"{agent}\"");
    let mut agents = vec![("a", sel.as_str())];
    agents.extend_from_slice(extra_agents);
    let config = env.config_with(
        proxy_extra,
        ebpf_extra,
        &agents_and_target(
            &agents,
            &[
                format!("127.0.0.0/8:{}", echo.port),
                format!("[::1]:{}", echo.port),
            ],
        ),
    );
    World {
        env,
        agent,
        echo,
        config,
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn probe_exe() -> String {
    workspace_bin("pc-probe")
        .canonicalize()
        .expect("probe path")
        .display()
        .to_string()
}

/// The names of the attached programs, from `status`.
fn program_names(status: &Value) -> Vec<&str> {
    status["kernel"]["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .map(|p| s(&p["name"]))
        .collect()
}

/// Asserts the probe's answer is a successful echo through the proxy, and returns the
/// daemon's record of it.
fn assert_intercepted(w: &World, d: &Daemon, r: &Value, bytes: u64) -> Value {
    assert_eq!(r["ok"], true, "probe failed: {r}");
    assert_eq!(r["echoed"].as_u64(), Some(bytes), "{r}");
    assert!(
        !w.echo.saw_peer(s(&r["local"])),
        "the server saw the client's own address: it was not proxied ({r})"
    );
    let rec = d.record_for(s(&r["local"]));
    assert_eq!(rec["agent.name"], "a", "{rec}");
    assert_eq!(rec["target.name"], "echo", "{rec}");
    assert_eq!(rec["bytes.up"].as_u64(), Some(bytes), "{rec}");
    assert_eq!(rec["bytes.down"].as_u64(), Some(bytes), "{rec}");
    assert_eq!(rec["end"], "closed", "{rec}");
    rec
}

#[test]
fn ipv4_ipv6_and_mapped_destinations_are_redirected_with_identity() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    let p = w.echo.port;
    for (dst, original) in [
        (format!("127.0.0.2:{p}"), format!("127.0.0.2:{p}")),
        (format!("127.0.0.3:{p}"), format!("127.0.0.3:{p}")),
        (format!("[::1]:{p}"), format!("[::1]:{p}")),
        (format!("[::ffff:127.0.0.2]:{p}"), format!("127.0.0.2:{p}")),
    ] {
        if dst.starts_with("127.0.0.3") {
            // Nothing listens on .3; the proxy's connect upstream is refused and the
            // client sees a reset, after having been intercepted.
            let r = probe(&w.env, &w.agent, Some(NOBODY), &["connect", &dst, "10"]);
            assert_eq!(r["ok"], false, "{r}");
            // The reset can beat the client to getsockname(): find the record by pid.
            let rec = d
                .logs
                .wait_for("the unreachable record", Duration::from_secs(10), |v| {
                    is_connection(v) && v["src.pid"] == r["pid"]
                });
            assert_eq!(rec["end"], "upstream_unreachable", "{rec}");
            assert_eq!(rec["dst.addr"], original.as_str());
            continue;
        }
        let r = probe(&w.env, &w.agent, Some(NOBODY), &["connect", &dst, "1000"]);
        let rec = assert_intercepted(&w, &d, &r, 1000);
        // The client believes it talks to the original destination.
        assert_eq!(
            s(&r["peer"]),
            dst,
            "getpeername must show the original destination"
        );
        assert_eq!(rec["dst.addr"], original.as_str(), "{rec}");
        assert_eq!(rec["src.pid"], r["pid"], "{rec}");
        assert_eq!(rec["src.pid"], r["launcher_pid"], "{rec}");
        assert_eq!(rec["src.uid"].as_u64(), Some(u64::from(NOBODY)), "{rec}");
        assert_eq!(rec["src.user"], "nobody", "{rec}");
        assert_eq!(rec["src.exe"], probe_exe().as_str(), "{rec}");
        assert_eq!(rec["src.cgroup"], w.agent.as_str(), "{rec}");
        assert_eq!(
            rec["src.cgroup_id"].as_u64(),
            Some(w.env.cg_id(&w.agent)),
            "{rec}"
        );
        assert_eq!(rec["src.comm"], "pc-probe", "{rec}");
        assert_eq!(rec["src.process"], "Verified", "{rec}");
    }
    let st = d.status();
    let programs = program_names(&st);
    assert_eq!(
        programs,
        [
            "pc_connect4",
            "pc_connect6",
            "pc_sock_ops",
            "pc_getpeername4",
            "pc_getpeername6",
            "pc_connect_unix",
            "pc_process_exec",
            "pc_process_exit"
        ]
    );
    assert_eq!(
        st["kernel"]["pinned_links"].as_array().map(Vec::len),
        Some(programs.len())
    );
    assert_eq!(d.counter("redirected"), 4);
    assert_eq!(d.counter("tracked"), 4);
    assert_eq!(d.counter("errors"), 0);
    assert_eq!(
        st["agents"][0]["binding"]["cgroups"][0][0],
        w.agent.as_str()
    );
}

#[test]
fn unprotected_processes_and_non_targets_go_direct() {
    let w = world("", &[("u", "uid = 64999")]);
    let other = w.env.cgroup("other");
    let elsewhere = Echo::start(Ipv4Addr::new(127, 0, 0, 4));
    let d = Daemon::start(&w.config);
    let target = w.echo.addr4().to_string();

    // Unprotected cgroup, unprotected uid: straight to the server.
    let r = probe(&w.env, &other, Some(64998), &["connect", &target, "100"]);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        w.echo.saw_peer(s(&r["local"])),
        "should have gone direct: {r}"
    );

    // Same cgroup, protected uid: intercepted and attributed to the uid agent.
    let r = probe(&w.env, &other, Some(64999), &["connect", &target, "100"]);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        !w.echo.saw_peer(s(&r["local"])),
        "should have been proxied: {r}"
    );
    let rec = d.record_for(s(&r["local"]));
    assert_eq!(rec["agent.name"], "u", "{rec}");

    // Protected process, destination that is not a target: direct.
    let r = probe(
        &w.env,
        &w.agent,
        Some(NOBODY),
        &["connect", &elsewhere.addr4().to_string(), "100"],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        elsewhere.saw_peer(s(&r["local"])),
        "non-target should go direct: {r}"
    );

    // Unprotected process connecting to the proxy port directly: refused, no origin.
    let r = probe(
        &w.env,
        &other,
        Some(64998),
        &["connect", &d.v4.to_string(), "10"],
    );
    assert_eq!(
        r["ok"], false,
        "a direct connection to the proxy must not work: {r}"
    );
    d.logs
        .wait_for("a no_origin refusal", Duration::from_secs(5), |v| {
            v["reason"] == "no_origin"
        });
    assert_eq!(d.counter("redirected"), 1);
    assert!(d.counter("passed") >= 2);
}

#[test]
fn forks_daemons_renames_and_execs_stay_intercepted() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    let target = w.echo.addr4().to_string();

    let r = probe(
        &w.env,
        &w.agent,
        Some(NOBODY),
        &["fork", "connect", &target, "64"],
    );
    let rec = assert_intercepted(&w, &d, &r, 64);
    assert_eq!(rec["src.pid"], r["pid"]);
    assert_ne!(r["pid"], r["launcher_pid"], "the forked child connected");

    let out = w.env.dir.join("daemonized.json");
    let out_s = out.display().to_string();
    let _ = probe(
        &w.env,
        &w.agent,
        Some(NOBODY),
        &["daemonize", &out_s, "connect", &target, "64"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let r: Value = loop {
        if let Ok(text) = std::fs::read_to_string(&out)
            && let Ok(v) = serde_json::from_str(&text)
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the daemonized grandchild never reported"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let rec = assert_intercepted(&w, &d, &r, 64);
    assert_eq!(rec["src.pid"], r["pid"]);

    let r = probe(
        &w.env,
        &w.agent,
        Some(NOBODY),
        &["rename", "innocent", "connect", &target, "64"],
    );
    let rec = assert_intercepted(&w, &d, &r, 64);
    assert_eq!(
        rec["src.comm"], "innocent",
        "the kernel saw the new name: {rec}"
    );
    assert_eq!(
        rec["src.exe"],
        probe_exe().as_str(),
        "but the executable is known: {rec}"
    );

    // A shell that connects, then execs another binary that connects: same pid, new
    // executable. The proxy reads /proc once per process image; the exec must make it read
    // again, or the second connection would be described as the shell's.
    let bash = std::fs::canonicalize("/bin/bash").expect("bash");
    let mut sh = Command::new(&bash);
    sh.arg("-c").arg(format!(
        "{} && exec 3>&- && exec '{}' connect {target} 64",
        shell_ping(&w),
        workspace_bin("pc-probe").display()
    ));
    let r = run_json(&w.env, &w.agent, Some(NOBODY), sh);
    let rec = assert_intercepted(&w, &d, &r, 64);
    assert_eq!(rec["src.pid"], r["launcher_pid"], "exec keeps the pid");
    assert_eq!(rec["src.exe"], probe_exe().as_str(), "{rec}");
    let shell = d
        .logs
        .wait_for("the shell's connection", Duration::from_secs(10), |v| {
            is_connection(v) && v["src.pid"] == r["launcher_pid"] && v["bytes.up"] == 4
        });
    assert_eq!(
        shell["src.exe"],
        bash.display().to_string().as_str(),
        "{shell}"
    );
    // Every process that connected has exited: the kernel forgot them all.
    assert_eq!(d.status()["kernel"]["processes"], 0);
}

/// Bash that connects to the echo server on fd 3, sends `ping` and reads the echo into
/// `$reply`.
fn shell_ping(w: &World) -> String {
    format!(
        "exec 3<>/dev/tcp/{}/{} && printf ping >&3 && read -r -N 4 reply <&3",
        w.echo.addr4().ip(),
        w.echo.port
    )
}

/// A process in the agent's cgroup that has connected, said so on its stdout, and now waits
/// for its stdin to close. Its stdout stays open until it has exited (it may print again).
struct Held {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Held {
    /// A shell that has connected to the echo server and echoed.
    fn start(w: &World) -> Self {
        let mut sh = Command::new("/bin/bash");
        sh.arg("-c").arg(format!(
            "{} && echo \"$reply\" && read -r line; exit 0",
            shell_ping(w)
        ));
        let (held, line) = Self::spawn(w, sh);
        assert_eq!(line.trim(), "ping", "the shell's echo went through");
        held
    }

    /// Runs `cmd` in the agent's cgroup as nobody; returns once it printed its first line.
    fn spawn(w: &World, mut cmd: Command) -> (Self, String) {
        use std::io::BufRead as _;
        in_cgroup(&mut cmd, &w.env.cg_dir(&w.agent), Some(NOBODY));
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the held process");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read its first line");
        (Self { child, out }, line)
    }

    /// Lets the process exit, and waits for it.
    fn end(mut self) {
        drop(self.child.stdin.take());
        assert!(self.child.wait().expect("wait").success());
        drop(self.out);
    }
}

#[test]
fn the_kernel_knows_a_connected_process_until_it_exits() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    assert_eq!(d.status()["kernel"]["processes"], 0);
    let held = Held::start(&w);
    assert_eq!(
        d.status()["kernel"]["processes"],
        1,
        "the connected process has a generation while it lives"
    );
    held.end();
    assert_eq!(
        d.status()["kernel"]["processes"],
        0,
        "and none once it has exited"
    );
}

#[test]
fn a_thread_that_exits_leaves_its_process_known() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    let mut cmd = Command::new(workspace_bin("pc-probe"));
    cmd.args(["thread", &w.echo.addr4().to_string()]);
    let (held, line) = Held::spawn(&w, cmd);
    let r: Value = serde_json::from_str(&line).expect("JSON from the probe");
    for who in ["main", "thread"] {
        let rec = assert_intercepted(&w, &d, &r[who], 5);
        assert_eq!(rec["src.tid"], r[who]["tid"], "{who}: {rec}");
    }
    assert_ne!(r["main"]["tid"], r["thread"]["tid"], "{r}");
    // The thread has exited (joined). Had its exit forgotten the process, the count would
    // be 0 by now: the hook runs in the exiting task, before the join returns or right after.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        d.status()["kernel"]["processes"],
        1,
        "a thread's exit keeps its process's generation"
    );
    held.end();
    assert_eq!(
        d.status()["kernel"]["processes"],
        0,
        "the process's last task has exited"
    );
}

#[test]
fn the_proxy_inside_a_protected_cgroup_does_not_loop() {
    let w = world("", &[]);
    let d = Daemon::start_in(&w.config, &w.env.cg_dir(&w.agent));
    let r = probe(
        &w.env,
        &w.agent,
        Some(NOBODY),
        &["connect", &w.echo.addr4().to_string(), "100"],
    );
    assert_intercepted(&w, &d, &r, 100);
    assert_eq!(
        d.counter("redirected"),
        1,
        "the proxy's upstream connection carries the mark and must not be redirected"
    );
    assert!(
        d.counter("passed") >= 1,
        "the upstream connect was seen and passed"
    );
}

#[test]
fn sigkill_fails_closed_and_a_restart_adopts_the_pins() {
    let w = world("", &[]);
    let target = w.echo.addr4().to_string();
    let mut d = Daemon::start(&w.config);
    let r = probe(&w.env, &w.agent, Some(NOBODY), &["connect", &target, "10"]);
    assert_intercepted(&w, &d, &r, 10);
    d.kill9();

    let before = w.echo.accepted.load(std::sync::atomic::Ordering::Relaxed);
    let r = probe(&w.env, &w.agent, Some(NOBODY), &["connect", &target, "10"]);
    assert_eq!(
        r["ok"], false,
        "with the daemon dead the connection must fail: {r}"
    );
    assert_eq!(r["kind"], "ConnectionRefused", "{r}");
    let r6 = probe(
        &w.env,
        &w.agent,
        Some(NOBODY),
        &["connect", &w.echo.addr6().to_string(), "10"],
    );
    assert_eq!(r6["kind"], "ConnectionRefused", "{r6}");
    assert_eq!(
        w.echo.accepted.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "nothing may reach the server while the daemon is down"
    );
    // status explains the situation.
    let out = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&w.config)
        .arg("status")
        .output()
        .expect("status");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("being refused"), "{err}");

    let d2 = Daemon::start(&w.config);
    d2.logs
        .wait_for("adoption of pinned maps", Duration::from_secs(5), |v| {
            v["message"] == "ebpf object loaded" && v["adopted"] == true
        });
    let r = probe(&w.env, &w.agent, Some(NOBODY), &["connect", &target, "10"]);
    assert_intercepted(&w, &d2, &r, 10);
    let st = d2.status();
    let programs = program_names(&st);
    assert!(
        programs.contains(&"pc_process_exec") && programs.contains(&"pc_process_exit"),
        "{programs:?}"
    );
    assert_eq!(
        st["kernel"]["pinned_links"].as_array().map(Vec::len),
        Some(programs.len()),
        "the old links were replaced, not added to: {st}"
    );
    // Counters live in pinned maps: they survived the restart.
    assert_eq!(d2.counter("redirected"), 4);
}

#[test]
fn fail_open_is_explicit_and_bypasses_when_down() {
    let w = world("fail_mode = \"open\"", &[]);
    let target = w.echo.addr4().to_string();
    let mut d = Daemon::start(&w.config);
    let r = probe(&w.env, &w.agent, Some(NOBODY), &["connect", &target, "10"]);
    assert_intercepted(&w, &d, &r, 10);
    assert_eq!(
        d.status()["kernel"]["pinned_links"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    d.kill9();
    let r = probe(&w.env, &w.agent, Some(NOBODY), &["connect", &target, "10"]);
    assert_eq!(
        r["ok"], true,
        "fail-open: direct while the daemon is down: {r}"
    );
    assert!(w.echo.saw_peer(s(&r["local"])));

    // While it is down the process hooks are gone too: a process that connected before and
    // exits then is never forgotten in that daemon's map of generations. The next daemon
    // must start without it (a reused pid would inherit it): each daemon has its own map.
    let d = Daemon::start(&w.config);
    let held = Held::start(&w);
    assert_eq!(d.status()["kernel"]["processes"], 1);
    drop(d);
    held.end();
    let d = Daemon::start(&w.config);
    assert_eq!(
        d.status()["kernel"]["processes"],
        0,
        "generations from the unwatched time are forgotten"
    );
}

#[test]
fn a_thousand_concurrent_connections_each_echo_64k() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    let r = probe(
        &w.env,
        &w.agent,
        Some(NOBODY),
        &["many", &w.echo.addr4().to_string(), "1000", "65536"],
    );
    assert_eq!(r["ok"], 1000, "{r}");
    assert_eq!(r["bytes"].as_u64(), Some(1000 * 65536), "{r}");
    // Every connection closed and was recorded with its bytes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records: Vec<Value> = d.logs.all().into_iter().filter(is_connection).collect();
        if records.len() == 1000 {
            assert!(
                records
                    .iter()
                    .all(|r| r["bytes.up"] == 65536 && r["bytes.down"] == 65536)
            );
            break;
        }
        assert!(Instant::now() < deadline, "only {} records", records.len());
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = d.status();
    assert_eq!(
        st["kernel"]["in_flight"], 0,
        "no connection entry may remain: {st}"
    );
    assert_eq!(
        st["kernel"]["processes"], 0,
        "the process that connected has exited: {st}"
    );
    assert_eq!(d.counter("tracked"), 1000);
    assert_eq!(d.counter("redirected"), 1000);
    assert_eq!(d.counter("errors"), 0);
    assert_eq!(st["proxy"]["active"], 0);
}

#[test]
fn a_foreign_network_namespace_is_refused_not_rewritten() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    // Inside its own network namespace the agent's loopback is not the proxy's.
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "/bin/sh", "-c"]).arg(format!(
        "ip link set lo up && exec '{}' connect {} 10",
        workspace_bin("pc-probe").display(),
        w.echo.addr4()
    ));
    let r = run_json(&w.env, &w.agent, None, cmd);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(
        r["errno"],
        libc::EPERM,
        "refused by the program, not rewritten: {r}"
    );
    assert_eq!(d.counter("refused_netns"), 1);
    assert_eq!(d.counter("redirected"), 0);
}

#[test]
fn entries_of_connections_never_accepted_are_removed_on_close() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    // With the daemon frozen, the kernel completes the handshake (the connection waits in
    // the listen backlog) but nobody takes the entry. The client then resets: its socket
    // reaches TCP_CLOSE and the sock_ops program must remove the entry itself.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGSTOP) };
    let r = probe(
        &w.env,
        &w.agent,
        Some(NOBODY),
        &["reset", &w.echo.addr4().to_string()],
    );
    // SAFETY: as above.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGCONT) };
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(d.counter("tracked"), 1);
    assert_eq!(
        d.counter("removed_on_close"),
        1,
        "the kernel removed the orphan entry"
    );
    assert_eq!(d.status()["kernel"]["in_flight"], 0);
    // The proxy then accepts the dead connection, finds no origin and drops it, without
    // taking it for a connection that bypassed the redirect.
    d.logs
        .wait_for("the dropped connection", Duration::from_secs(5), |v| {
            v["end"] == "client_gone"
        });
    assert_eq!(d.status()["proxy"]["refused_no_origin"], 0);
}

/// `pc-probe queue` from the agent: a connection over IPv4, then one over IPv6 while the
/// first holds the only slot.
fn queue(w: &World, rest: &[&str]) -> Value {
    let (v4, v6) = (w.echo.addr4().to_string(), w.echo.addr6().to_string());
    let mut args = vec!["queue", v4.as_str(), v6.as_str()];
    args.extend_from_slice(rest);
    probe(&w.env, &w.agent, Some(NOBODY), &args)
}

#[test]
fn workers_serve_every_listener_and_excess_connections_wait_in_the_backlog() {
    let w = world_with("max_connections = 1\nworkers = 3", "", &[]);
    let d = Daemon::start(&w.config);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", d.child.id())).expect("tasks");
    let workers = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("portcullis-conn"))
        .count();
    assert_eq!(workers, 3, "one thread per configured worker");
    let st = d.status();
    assert_eq!(st["proxy"]["workers"], 3);
    // A listening socket per worker and family, sharing the address (SO_REUSEPORT).
    for l in st["proxy"]["listeners"].as_array().expect("listeners") {
        let addr: std::net::SocketAddr = s(l).parse().expect("listener address");
        let ss = Command::new("ss")
            .args(["-Hltn", &format!("sport = :{}", addr.port())])
            .output()
            .expect("ss (iproute2)");
        let sockets = String::from_utf8_lossy(&ss.stdout)
            .lines()
            .filter(|line| line.contains(&addr.to_string()))
            .count();
        assert_eq!(sockets, 3, "listening sockets on {addr}");
    }
    // One session over IPv4 holds the only slot; an IPv6 connection (another listener)
    // waits until it ends, and is then served.
    let r = queue(&w, &["1000"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["first_echoed"], true, "{r}");
    assert_eq!(
        r["second_before_close"], false,
        "served beyond max_connections: {r}"
    );
    assert_eq!(
        r["second_after_close"], true,
        "the waiting connection was not served when the slot freed: {r}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.logs.all().into_iter().filter(is_connection).count() < 2 {
        assert!(Instant::now() < deadline, "both connections are recorded");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_connection_that_gives_up_waiting_for_a_slot_is_recorded_as_its_agents() {
    let w = world_with("max_connections = 1\nworkers = 3", "", &[]);
    let d = Daemon::start(&w.config);
    // The IPv6 connection is accepted by another worker's loop, which holds it until the
    // IPv4 session ends; its client resets meanwhile, which removes a kernel entry the
    // proxy has not taken yet.
    let r = queue(&w, &["500", "give-up"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["first_echoed"], true, "{r}");
    assert_eq!(r["second_before_close"], false, "{r}");
    let rec = d.record_for(s(&r["second_local"]));
    assert_eq!(rec["agent.name"], "a", "{rec}");
    assert_eq!(rec["src.pid"], r["launcher_pid"], "{rec}");
    assert_eq!(rec["end"], "client_reset", "{rec}");
    assert_eq!(d.status()["proxy"]["refused_no_origin"], 0);
}

#[test]
fn a_second_daemon_on_the_same_state_directory_stops_before_touching_anything() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    // The listeners use SO_REUSEPORT, so binding would not stop a second daemon: the
    // state directory's lock must.
    let mut second = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&w.config)
        .arg("run")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("second daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = second.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second daemon on the same state directory kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = second.wait_with_output().expect("output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success(), "{said}");
    assert!(
        said.contains("another portcullis daemon")
            && said.contains(&format!("pid {}", d.child.id())),
        "the refusal names the running daemon: {said}"
    );
    // The first one is untouched: its admin socket answers and it still intercepts.
    assert_eq!(
        d.status()["proxy"]["workers"].as_u64().map(|n| n > 0),
        Some(true)
    );
    let r = probe(
        &w.env,
        &w.agent,
        Some(NOBODY),
        &["connect", &w.echo.addr4().to_string(), "10"],
    );
    assert_intercepted(&w, &d, &r, 10);
}

/// The benchmarks compare the proxy with a plain relay (`pc-probe relay`) as the floor any
/// proxy starts from; the comparison means something only if that relay is correct: every
/// byte both ways, half-close propagated, many connections at once.
#[test]
fn the_benchmarks_plain_relay_carries_every_byte_and_the_half_close() {
    let env = Env::new();
    let plain = env.cgroup("plain");
    let echo = Echo::start(Ipv4Addr::new(127, 0, 0, 5));
    let relay = Relay::start("127.0.0.6", &echo.addr4().to_string());
    // `connect` writes, shuts down its write side and reads to the end: the echo server
    // only ends (and the client only sees EOF) if the relay passed the half-close on.
    let via = relay.addr.to_string();
    let r = probe(&env, &plain, None, &["connect", &via, "65536"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["echoed"], 65536, "{r}");
    assert!(
        !echo.saw_peer(s(&r["local"])),
        "the echo server must see the relay, not the client: {r}"
    );
    let r = probe(&env, &plain, None, &["many", &via, "200", "65536"]);
    assert_eq!(r["ok"], 200, "{r}");
    assert_eq!(r["bytes"].as_u64(), Some(200 * 65536), "{r}");
    assert_eq!(
        echo.accepted.load(std::sync::atomic::Ordering::Relaxed),
        201
    );
}

/// A target named by a host name follows the name: the daemon (in a mount namespace of its
/// own, with its own `/etc/hosts` and a resolver that reads only files, so no lookup leaves
/// the host) starts while the name does not resolve yet, looks it up again, intercepts a
/// new address at once, keeps an old one for `resolve_keep`, and drops nothing while
/// lookups fail.
#[test]
fn a_target_host_name_is_followed_when_it_moves() {
    let env = Env::new();
    let agent = env.cgroup("agents/a");
    let old = Ipv4Addr::new(127, 0, 0, 61);
    let new = Ipv4Addr::new(127, 0, 0, 62);
    let echo = Echo::start(old);
    let new_addr = echo.also_on(new).expect("echo on the second address");
    let old_addr = echo.addr4();
    let host = "pc-db.portcullis.test";
    let hosts = env.dir.join("hosts");
    let nss = env.dir.join("nsswitch.conf");
    // Written in place (the bind mount follows the inode, not the name).
    let point_at = |ip: Option<Ipv4Addr>| {
        let line = ip.map(|ip| format!("{ip} {host}\n")).unwrap_or_default();
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{line}")).expect("hosts");
    };
    point_at(None);
    std::fs::write(&nss, "hosts: files\n").expect("nsswitch");
    let config = env.config(
        "resolve_interval = \"200ms\"\nresolve_keep = \"3s\"",
        &agents_and_target(
            &[("a", &format!("cgroup = \"{agent}\""))],
            &[format!("{host}:{}", echo.port)],
        ),
    );
    let d = Daemon::start_with_files(
        &config,
        &[
            (hosts.as_path(), std::path::Path::new("/etc/hosts")),
            (nss.as_path(), std::path::Path::new("/etc/nsswitch.conf")),
        ],
    );
    let connect = |to: std::net::SocketAddr| -> (bool, Value) {
        let r = probe(&env, &agent, None, &["connect", &to.to_string(), "64"]);
        assert_eq!(r["ok"], true, "{r}");
        let local = s(&r["local"]).to_owned();
        if echo.saw_peer(&local) {
            return (false, r);
        }
        let rec = d.record_for(&local);
        assert_eq!(rec["target.name"], "echo", "{rec}");
        (true, r)
    };

    // The name does not resolve at start: the daemon starts all the same and says so.
    let warned = d
        .logs
        .all()
        .into_iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("does not resolve"))
        })
        .expect("a warning about the name at start");
    assert_eq!(warned["level"], "WARN", "{warned}");
    assert!(!connect(old_addr).0, "no address yet: direct");

    // It resolves: its address is the target's from the next lookup on.
    point_at(Some(old));
    d.logs
        .wait_for("the first address", Duration::from_secs(10), |v| {
            v["message"] == "target address added: the host name resolves to it"
                && v["address"] == old_addr.to_string()
        });
    d.logs
        .wait_for("the recovery", Duration::from_secs(10), |v| {
            v["message"] == "a target's host name resolves again"
        });
    assert!(connect(old_addr).0, "the name's address is intercepted");
    assert!(
        !connect(new_addr).0,
        "an address the name does not have goes direct"
    );

    // The name moves: the new address is intercepted once a lookup has seen it, and the
    // old one still is (an agent may hold the old answer).
    let moved = Instant::now();
    point_at(Some(new));
    let added = d
        .logs
        .wait_for("the new address", Duration::from_secs(10), |v| {
            v["message"] == "target address added: the host name resolves to it"
                && v["address"] == new_addr.to_string()
        });
    assert_eq!(added["target.name"], "echo", "{added}");
    assert_eq!(added["host"], format!("{host}:{}", echo.port), "{added}");
    assert!(connect(new_addr).0, "the new address is intercepted");
    // `status` (which looks no name up itself) shows what the name stands for now.
    let st = d.status();
    let h = &st["targets"][0]["hosts"][0];
    assert_eq!(h["name"], format!("{host}:{}", echo.port), "{h}");
    let now: Vec<&str> = h["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .map(s)
        .collect();
    assert!(now.contains(&new_addr.to_string().as_str()), "{h}");
    let text = d.status_text();
    assert!(
        text.lines().any(|l| l
            .trim_start()
            .starts_with(&format!("{host}:{} → ", echo.port))
            && l.contains(&new_addr.to_string())),
        "{text}"
    );
    if moved.elapsed() < Duration::from_secs(2) {
        assert!(
            connect(old_addr).0,
            "the old address is kept for resolve_keep"
        );
    }

    // Past resolve_keep the old address goes, and connections to it are direct again.
    let dropped = d
        .logs
        .wait_for("the old address to go", Duration::from_secs(15), |v| {
            v["message"]
                == "target address dropped: the host name has not resolved to it for resolve_keep"
        });
    assert_eq!(dropped["address"], old_addr.to_string(), "{dropped}");
    // Its last sighting was at most one interval (and a lookup) before the move.
    assert!(
        moved.elapsed() >= Duration::from_millis(2500),
        "dropped {:?} after the move, before resolve_keep ran out; daemon log:\n{}",
        moved.elapsed(),
        d.logs.tail()
    );
    assert!(!connect(old_addr).0, "the dropped address goes direct");

    // The name stops resolving: said once, counted, and nothing is dropped however long.
    point_at(None);
    d.logs
        .wait_for("the failing lookup", Duration::from_secs(10), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("a target's host name no longer resolves"))
        });
    std::thread::sleep(Duration::from_secs(4));
    assert!(connect(new_addr).0, "failing lookups drop nothing");
    let st = d.status();
    let h = &st["targets"][0]["hosts"][0];
    assert!(
        h["error"].is_string(),
        "status says why the lookups fail: {h}"
    );
    assert_eq!(h["addresses"][0], new_addr.to_string(), "{h}");
    let text = d.status_text();
    assert!(text.contains("· lookups fail: "), "{text}");
    assert!(d.metric("portcullis_target_lookups_total", &[("result", "error")]) >= 1.0);
    assert!(d.metric("portcullis_target_lookups_total", &[("result", "ok")]) >= 1.0);
    let failed = d
        .logs
        .count_messages(|m| m.starts_with("a target's host name no longer resolves"));
    assert_eq!(failed, 1, "the failure is said once, not at every lookup");

    // It resolves again: said a second time.
    point_at(Some(new));
    let recoveries = || {
        d.logs
            .all()
            .iter()
            .filter(|v| v["message"] == "a target's host name resolves again")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while recoveries() < 2 {
        assert!(
            Instant::now() < deadline,
            "no second recovery:\n{}",
            d.logs.tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stream sockets that do not connect the usual way: TCP Fast Open connects from inside
/// `sendto(MSG_FASTOPEN)` with no `connect(2)`, and a Multipath TCP socket
/// (`IPPROTO_MPTCP`, which falls back to plain TCP with a server that does not speak it)
/// connects through its first subflow. Both are redirected like any other connection, IPv4
/// and IPv6; the same from an unprotected cgroup reaches the server itself.
#[test]
fn tcp_fast_open_and_multipath_tcp_are_intercepted_too() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    let other = w.env.cgroup("other");
    for how in ["fastopen", "mptcp"] {
        for target in [w.echo.addr4(), w.echo.addr6()] {
            let r = probe(&w.env, &w.agent, None, &[how, &target.to_string(), "300"]);
            assert_intercepted(&w, &d, &r, 300);
        }
        let r = probe(
            &w.env,
            &other,
            None,
            &[how, &w.echo.addr4().to_string(), "300"],
        );
        assert_eq!(r["ok"], true, "{how}: {r}");
        assert!(
            w.echo.saw_peer(s(&r["local"])),
            "{how} should have gone direct: {r}"
        );
    }
}

/// An agent selected by a cgroup inside a tree delegated to a user (as systemd delegates
/// `user@UID.service` to its user) can move its processes out of that cgroup and connect
/// unselected. The daemon says so at start, in `status` and in `doctor`, naming the uid and
/// the remedy; the remedy (an agent that selects the uid) catches the escaped process.
#[test]
fn an_agent_that_can_leave_its_cgroup_is_reported_and_a_uid_agent_catches_it() {
    let env = Env::new();
    let deleg = env.cgroup("agents/deleg");
    let agent = env.cgroup("agents/deleg/a");
    let echo = Echo::start(Ipv4Addr::new(127, 0, 0, 2));
    let procs = env.cg_dir(&deleg).join("cgroup.procs");
    // Delegated to nobody: it may move processes into `deleg`, the parent of the agent's.
    let c = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid path; chown has no other preconditions.
    assert_eq!(
        unsafe { libc::chown(c.as_ptr(), NOBODY, NOBODY) },
        0,
        "chown"
    );
    let target = echo.addr4().to_string();
    let sel = format!("cgroup = \"{agent}\"");
    let config = |extra: &[(&str, &str)]| {
        let mut agents = vec![("a", sel.as_str())];
        agents.extend_from_slice(extra);
        env.config(
            "",
            &agents_and_target(&agents, &[format!("127.0.0.2:{}", echo.port)]),
        )
    };
    // The agent's process moves itself to `deleg` ("0" is the writer itself), then connects.
    let escape = || {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "echo 0 > {} && exec {} connect {target} 64",
            procs.display(),
            probe_exe()
        ));
        run_json(&env, &agent, Some(NOBODY), cmd)
    };

    let cfg = config(&[]);
    let d = Daemon::start(&cfg);
    let warned = d.logs.wait_for("the warning", Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("agent's processes can leave its cgroup"))
    });
    assert_eq!(warned["agent.name"], "a", "{warned}");
    let m = s(&warned["message"]);
    assert!(m.contains("processes of uid 65534"), "{m}");
    assert!(m.contains(&format!("{deleg}/cgroup.procs")), "{m}");
    assert!(m.contains("`uid = 65534`"), "{m}");
    let st = d.status();
    let a = &st["agents"][0];
    assert!(s(&a["binding"]["escape"]).contains("uid 65534"), "{a}");
    let text = d.status_text();
    assert!(
        text.lines().any(|l| l
            .trim_start()
            .starts_with("warning: processes of uid 65534 may write")),
        "{text}"
    );
    let out = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&cfg)
        .arg("doctor")
        .output()
        .expect("doctor");
    let doctor = String::from_utf8_lossy(&out.stdout);
    assert!(
        doctor
            .lines()
            .any(|l| l.starts_with("WARN") && l.contains("agent a: processes of uid 65534")),
        "{doctor}"
    );

    // Which is true: out of its cgroup, it reaches the server itself.
    let r = escape();
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        echo.saw_peer(s(&r["local"])),
        "the escape should go direct: {r}"
    );
    drop(d);

    // The remedy: an agent for the uid. The same escape is intercepted, as that agent.
    let d = Daemon::start(&config(&[("u", "uid = 65534")]));
    let r = escape();
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        !echo.saw_peer(s(&r["local"])),
        "should have been proxied: {r}"
    );
    let rec = d.record_for(s(&r["local"]));
    assert_eq!(rec["agent.name"], "u", "{rec}");
    assert_eq!(rec["src.uid"].as_u64(), Some(u64::from(NOBODY)), "{rec}");
}

/// The daemon's metrics endpoint is closed to protected processes: their connect fails with
/// `EPERM` (counted as `refused_daemon`), so an agent can neither read the metrics nor tie
/// up the endpoint the operator's monitoring scrapes; everyone else is served.
#[test]
fn protected_processes_cannot_reach_the_daemons_metrics_endpoint() {
    let w = world("", &[]);
    let d = Daemon::start(&w.config);
    let metrics = d.metrics.expect("metrics endpoint").to_string();
    let r = probe(&w.env, &w.agent, None, &["connect", &metrics, "16"]);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    assert_eq!(d.counter("refused_daemon"), 1);
    // An unprotected process, and the test itself, are served.
    let other = w.env.cgroup("other");
    let r = probe(&w.env, &other, None, &["connect", &metrics, "16"]);
    assert!(
        r["local"].is_string() && r["errno"].is_null(),
        "connected: {r}"
    );
    assert_eq!(d.http_get("/healthz").0, 200);
    // Targets are still reached through the proxy.
    let r = probe(
        &w.env,
        &w.agent,
        None,
        &["connect", &w.echo.addr4().to_string(), "16"],
    );
    assert_intercepted(&w, &d, &r, 16);
    assert_eq!(d.counter("refused_daemon"), 1);
}

/// A local server of a target's port that listens on more addresses than the target names
/// (here 127.0.0.2 and ::1, the target naming only the first) can be reached around the
/// gate. The daemon warns at start and `doctor` reports it, naming where; a target that
/// covers both leaves nothing to report.
#[test]
fn a_local_server_reachable_at_an_address_the_target_does_not_name_is_reported() {
    let env = Env::new();
    let agent = env.cgroup("agents/a");
    let echo = Echo::start(Ipv4Addr::new(127, 0, 0, 2));
    let sel = format!("cgroup = \"{agent}\"");
    let config = |addrs: &[String]| env.config("", &agents_and_target(&[("a", &sel)], addrs));
    let v6 = echo.addr6().to_string();
    let only_v4 = config(&[echo.addr4().to_string()]);
    let d = Daemon::start(&only_v4);
    let warned = d.logs.wait_for("the warning", Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("which no target covers"))
    });
    assert_eq!(warned["address"], v6, "{warned}");
    assert_eq!(warned["target.name"], "echo", "{warned}");
    let doctor = |cfg: &std::path::Path| {
        let out = Command::new(workspace_bin("portcullis"))
            .arg("--config")
            .arg(cfg)
            .arg("doctor")
            .output()
            .expect("doctor");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let t = doctor(&only_v4);
    assert!(
        t.lines().any(|l| l.starts_with("WARN")
            && l.contains(&format!("can be reached at {v6}, which no target covers"))),
        "{t}"
    );
    // Which is true: the agent reaches it there directly.
    let r = probe(&env, &agent, None, &["connect", &v6, "16"]);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        echo.saw_peer(s(&r["local"])),
        "should have gone direct: {r}"
    );
    // `status` lists it, the gauge counts it.
    let st = d.status();
    let listed = st["uncovered"].as_array().expect("uncovered");
    assert!(listed.iter().any(|u| s(u).contains(&v6)), "{st}");
    assert_eq!(d.metric("portcullis_uncovered_addresses", &[]), 1.0);
    let text = d.status_text();
    let section = text.split("\naround the gate\n").nth(1).unwrap_or_default();
    assert!(
        section
            .lines()
            .next()
            .is_some_and(|l| l.contains(&format!("can be reached at {v6}"))),
        "{text}"
    );
    drop(d);

    // Covered at both: nothing to report.
    let both = config(&[echo.addr4().to_string(), v6.clone()]);
    let t = doctor(&both);
    assert!(
        !t.contains(&format!("can be reached at {v6}")),
        "nothing to report once covered: {t}"
    );
}
