//! A real PostgreSQL server per test, started from the Debian packages' binaries.
//!
//! `initdb` runs once per test run (as the `postgres` user, into a template directory);
//! each [`Pg`] copies it, writes its own configuration (a free loopback port, TLS with a
//! generated certificate, SCRAM for TCP, `log_statement = 'all'` to a log file the tests
//! read) and stops the server in `Drop`.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::{
    Daemon, Env, PREFIX, agents_and_pg, in_cgroup, output_with_input, run_json, workspace_bin,
};
use std::process::Output;

/// Where the packaged binaries live; override with `PG_BIN`.
pub fn pg_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PG_BIN") {
        return p.into();
    }
    for v in ["17", "16", "15"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if p.join("postgres").exists() {
            return p;
        }
    }
    panic!(
        "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (install the `postgresql` \
         package, or set PG_BIN): these tests need a real server and do not skip"
    );
}

pub fn postgres_ids() -> (u32, u32) {
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .expect("id");
    assert!(
        out.status.success(),
        "no `postgres` user: install the postgresql package"
    );
    let uid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("uid");
    let out = Command::new("id")
        .args(["-g", "postgres"])
        .output()
        .expect("id");
    let gid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("gid");
    (uid, gid)
}

fn run_as_postgres(cmd: &mut Command) -> std::process::Output {
    let (uid, gid) = postgres_ids();
    cmd.uid(uid).gid(gid);
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn template() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("{PREFIX}{}-pgtemplate", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("template dir");
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown");
        run_as_postgres(
            Command::new(pg_bin().join("initdb"))
                .arg("-D")
                .arg(&dir)
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]),
        );
        // The test harness leaves through exit(), which runs this; a killed run's
        // template is swept by the next one.
        extern "C" fn remove_template() {
            if let Some(dir) = T.get() {
                let _ = fs::remove_dir_all(dir);
            }
        }
        // SAFETY: atexit only stores the pointer of a function that takes and returns
        // nothing.
        unsafe { libc::atexit(remove_template) };
        dir
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub struct Pg {
    pub port: u16,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub log: PathBuf,
}

/// Password of the `app` role the tests connect as.
pub const APP_PASSWORD: &str = "app-secret";

impl Pg {
    pub fn start(env: &Env) -> Self {
        Self::start_with(env, "")
    }

    /// With extra settings appended to the configuration (later lines win).
    pub fn start_with(env: &Env, extra_conf: &str) -> Self {
        let data = env.dir.join("pgdata");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template())
            .arg(&data)
            .status()
            .expect("cp");
        assert!(status.success(), "copying the template failed");
        let port = free_port();
        let socket_dir = data.clone();
        let log = data.join("server.log");
        // TLS for the proxy → server leg.
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("cert");
        fs::write(data.join("server.crt"), cert.cert.pem()).expect("crt");
        fs::write(data.join("server.key"), cert.signing_key.serialize_pem()).expect("key");
        let (uid, gid) = postgres_ids();
        for f in ["server.crt", "server.key"] {
            std::os::unix::fs::chown(data.join(f), Some(uid), Some(gid)).expect("chown");
        }
        fs::set_permissions(data.join("server.key"), fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             log_statement = 'all'\nlogging_collector = off\nlog_min_messages = warning\n\
             log_line_prefix = '%m [%p] '\npassword_encryption = 'scram-sha-256'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 200\nshared_buffers = 64MB\n{extra_conf}\n",
            socket_dir.display()
        );
        fs::write(data.join("postgresql.auto.conf"), conf).expect("conf");
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n",
        )
        .expect("hba");
        for f in ["postgresql.auto.conf", "pg_hba.conf"] {
            std::os::unix::fs::chown(data.join(f), Some(uid), Some(gid)).expect("chown");
        }
        run_as_postgres(
            Command::new(pg_bin().join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "30", "start"]),
        );
        let pg = Self {
            port,
            data,
            socket_dir,
            log,
        };
        pg.sql(
            "postgres",
            &format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'"),
        );
        pg.sql("postgres", "CREATE DATABASE shop OWNER app");
        pg
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs SQL as the superuser over the Unix socket (never intercepted), returning
    /// psql's unaligned output.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let mut cmd = Command::new(pg_bin().join("psql"));
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-h",
        ])
        .arg(&self.socket_dir)
        .args(["-p", &self.port.to_string(), "-d", db, "-c", sql]);
        crate::stdout_of(&mut cmd, &format!("superuser SQL {sql}"))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = self.log();
            if l.contains(needle) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "server log never showed {needle:?}:\n{l}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let (uid, gid) = postgres_ids();
        let _ = Command::new(pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .uid(uid)
            .gid(gid)
            .output();
    }
}

/// pgbouncer in session pooling mode in front of a [`Pg`], as the `postgres` user (it
/// refuses to run as root). Stopped in `Drop`.
pub struct Bouncer {
    pub port: u16,
    child: std::process::Child,
}

impl Bouncer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start(env: &Env, pg: &Pg) -> Self {
        let dir = env.dir.join("pgbouncer");
        fs::create_dir_all(&dir).expect("pgbouncer dir");
        let port = free_port();
        fs::write(
            dir.join("userlist.txt"),
            format!("\"app\" \"{APP_PASSWORD}\"\n"),
        )
        .expect("userlist");
        fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\nshop = host=127.0.0.1 port={} dbname=shop\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = scram-sha-256\nauth_file = {}\npool_mode = session\n\
                 max_client_conn = 200\ndefault_pool_size = 50\n\
                 logfile = {}\npidfile = {}\n",
                pg.port,
                dir.join("userlist.txt").display(),
                dir.join("pgbouncer.log").display(),
                dir.join("pgbouncer.pid").display()
            ),
        )
        .expect("ini");
        let (uid, gid) = postgres_ids();
        for f in ["", "userlist.txt", "pgbouncer.ini"] {
            std::os::unix::fs::chown(dir.join(f), Some(uid), Some(gid)).expect("chown");
        }
        let child = Command::new("pgbouncer")
            .arg(dir.join("pgbouncer.ini"))
            .uid(uid)
            .gid(gid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("pgbouncer (apt install pgbouncer)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { port, child }
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- a world with a gate

/// Fields drop in order: the daemon and the server stop before the environment (and the
/// server's data directory in it) goes away.
pub struct Pgw {
    pub daemon: Daemon,
    pub pg: Pg,
    pub agent: String,
    pub direct: String,
    pub env: Env,
}

impl Pgw {
    /// The daemon's audit store (the harness's `[store]` default under the state directory).
    pub fn store_path(&self) -> std::path::PathBuf {
        self.env.dir.join("state").join("portcullis.db")
    }
}

pub fn world(target_extra: &str) -> Pgw {
    world_with(target_extra, None)
}

/// With `policy`, the policies are that one file (an empty string: no rules at all, so
/// every statement gets the default, allow); otherwise the shipped ones.
pub fn world_with(target_extra: &str, policy: Option<&str>) -> Pgw {
    world_full(target_extra, policy, "", "")
}

/// [`world_with`], plus keys for `[admin]` (`admin_keys`) and whole sections (`[store]`,
/// ...) added to the configuration.
pub fn world_full(
    target_extra: &str,
    policy: Option<&str>,
    admin_keys: &str,
    sections: &str,
) -> Pgw {
    world_policy(target_extra, policy, "", admin_keys, sections)
}

/// [`world_full`] with more `[policy]` keys (`default = "deny"`, ...) beside the directory
/// of `policy`.
pub fn world_policy(
    target_extra: &str,
    policy: Option<&str>,
    policy_keys: &str,
    admin_keys: &str,
    sections: &str,
) -> Pgw {
    let env = Env::new();
    let agent = env.cgroup("agents/a");
    let direct = env.cgroup("direct");
    let pg = Pg::start(&env);
    let mut body = agents_and_pg(
        &[("a", &format!("cgroup = \"{agent}\""))],
        &pg.addr().to_string(),
        target_extra,
    );
    if let Some(text) = policy {
        let dir = env.dir.join("policies");
        std::fs::create_dir_all(&dir).expect("policy dir");
        std::fs::write(dir.join("test.toml"), text).expect("policy");
        body = format!(
            "[policy]\ndir = \"{}\"\n{policy_keys}\n\n{body}",
            dir.display()
        );
    }
    // Keys before the first table header belong to `[admin]`, the last table of the
    // harness's part.
    let cfg = env.config("", &format!("{admin_keys}\n\n{body}\n\n{sections}"));
    let daemon = Daemon::start(&cfg);
    Pgw {
        daemon,
        pg,
        agent,
        direct,
        env,
    }
}

pub fn psql_cmd(w: &Pgw, cgroup: &str, sslmode: &str) -> Command {
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
pub fn psql(w: &Pgw, cgroup: &str, sslmode: &str, sql: &str) -> Output {
    psql_cmd(w, cgroup, sslmode)
        .args(["-c", sql])
        .output()
        .expect("psql")
}

/// psql reading a script from stdin: one Query message per statement.
pub fn psql_script(w: &Pgw, cgroup: &str, script: &str) -> Output {
    output_with_input(
        psql_cmd(w, cgroup, "disable").args(["-f", "-"]),
        script.as_bytes(),
    )
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn secret_file(env: &Env) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = env.dir.join("pg-secret");
    std::fs::write(&p, format!("{APP_PASSWORD}\n")).expect("secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
}

/// Runs `pc-pg` in a cgroup and returns its JSON.
pub fn pc_pg(w: &Pgw, cgroup: &str, scenario: &str) -> serde_json::Value {
    pc_pg_with(w, cgroup, scenario, &[])
}

/// `pc-pg` with arguments after the scenario.
pub fn pc_pg_with(w: &Pgw, cgroup: &str, scenario: &str, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(workspace_bin("pc-pg"));
    cmd.arg(w.pg.addr().to_string())
        .args(["app", APP_PASSWORD, "shop", scenario])
        .args(args);
    run_json(&w.env, cgroup, Some(65534), cmd)
}

/// Runs `pc-pgwire` with a script in a cgroup; returns its output lines as JSON.
pub fn wire(w: &Pgw, cgroup: &str, script: &str) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(workspace_bin("pc-pgwire"));
    cmd.arg(w.pg.addr().to_string())
        .args(["app", APP_PASSWORD, "shop"]);
    in_cgroup(&mut cmd, &w.env.cg_dir(cgroup), Some(65534));
    let out = output_with_input(&mut cmd, script.as_bytes());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| serde_json::json!({"raw": l})))
        .filter(|v: &serde_json::Value| v["t"] != "S" && v["t"] != "K")
        .collect()
}

pub fn without_launcher(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("launcher_pid");
    }
    v
}

/// Numbers `n` of the statements `SELECT n AS k` in a server log (what load tests send).
pub fn logged_numbers(log: &str) -> std::collections::HashSet<u64> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("statement: SELECT ")? + "statement: SELECT ".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            rest[digits.len()..]
                .starts_with(" AS k")
                .then(|| digits.parse().ok())?
        })
        .collect()
}

/// pgbench in the agent cgroup sending `SELECT n AS k` with random `n` (8 clients).
pub fn pgbench_load(w: &Pgw, secs: u32) -> std::process::Child {
    let script = w.env.dir.join("load.sql");
    fs::write(
        &script,
        "\\set n random(1, 1000000000000)\nSELECT :n AS k;\n",
    )
    .expect("script");
    let mut cmd = Command::new(pg_bin().join("pgbench"));
    cmd.args(["-n", "-c", "8", "-j", "2", "-T", &secs.to_string(), "-f"])
        .arg(&script)
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "app",
            "-p",
            &w.pg.port.to_string(),
            "shop",
        ])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    in_cgroup(&mut cmd, &w.env.cg_dir(&w.agent), Some(65534));
    cmd.spawn().expect("pgbench")
}

/// Waits until the server has logged at least `n` load statements.
pub fn wait_load(w: &Pgw, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while logged_numbers(&w.pg.log()).len() < n {
        assert!(
            Instant::now() < deadline,
            "the load made no progress:\n{}",
            w.pg.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The load statements the store recorded, from `audit export`.
pub fn recorded_numbers(w: &Pgw) -> std::collections::HashSet<u64> {
    let out = Command::new(workspace_bin("portcullis"))
        .arg("--config")
        .arg(&w.daemon.config)
        .args(["audit", "export"])
        .output()
        .expect("export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "statement")
        .filter_map(|r| {
            let sql = r["body"]["sql"].as_str()?.to_owned();
            sql.strip_prefix("SELECT ")?.split(' ').next()?.parse().ok()
        })
        .collect()
}
