//! Harness for the privileged end-to-end tests and the benchmarks.
//!
//! Every test builds its own world and removes it, also when it fails (drop guards):
//! - a cgroup `/portcullis-test-<pid>-<n>` under the cgroup2 mount, where the daemon attaches
//!   its programs (so nothing outside it is affected), with agent cgroups below;
//! - its own bpffs pin path `/sys/fs/bpf/portcullis-test-<pid>-<n>`;
//! - its own admin socket and configuration in a temporary directory;
//! - echo servers on loopback only.
//!
//! Leftovers of a crashed run (cgroups and pins whose `<pid>` is dead) are removed when the
//! first test of a run starts.
//!
//! These tests need root. Without it they fail with a message; they never skip.

use std::{
    collections::VecDeque,
    ffi::CString,
    fs,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Condvar, Mutex, Once,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

/// Prefix of every object the tests create.
pub const PREFIX: &str = "portcullis-test-";

/// Panics unless running as root: a privileged test that cannot run must fail, loudly.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these end-to-end tests load eBPF programs and create cgroups: they must run as root \
         (sudo cargo xtask test). They do not skip."
    );
}

/// A binary of this workspace, next to the test executable's `deps` directory.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not found: build the binaries first (`cargo build --workspace --bins`, which \
         `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// The cgroup2 mount, from mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = pre.split(' ').collect();
        if post.starts_with("cgroup2 ") && f.len() > 4 && f[3] == "/" {
            return PathBuf::from(f[4]);
        }
    }
    panic!("no cgroup2 mount found in /proc/self/mountinfo");
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes a cgroup and everything below it, killing the processes in it.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    // Children first.
    let mut dirs = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(rd) = fs::read_dir(&dirs[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        i += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for d in dirs.iter().rev() {
        while fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
            let _ = fs::write(d.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes leftovers of earlier runs whose process is gone.
fn sweep_leftovers() {
    let owner =
        |name: &str| -> Option<u32> { name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok() };
    let dead = |name: &str| owner(name).is_some_and(|pid| !pid_alive(pid));
    // Processes of a dead run (a daemon whose test crashed) go first: a live daemon would
    // re-create the cgroups we remove.
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let stale = cmdline.split(['\0', '/']).any(dead);
        if stale {
            eprintln!(
                "killing leftover process {pid}: {}",
                cmdline.replace('\0', " ")
            );
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let cg = cgroup2_mount();
    for e in fs::read_dir(&cg).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            eprintln!("removing leftover cgroup {}", e.path().display());
            remove_cgroup_tree(&e.path());
        }
    }
    for e in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            eprintln!("removing leftover pins {}", e.path().display());
            let _ = fs::remove_dir_all(e.path());
        }
    }
    // Test directories (a PostgreSQL data directory is ~40 MB) of runs that were killed,
    // and the database templates of earlier test binaries: left alone, a few hundred runs
    // fill a disk.
    for e in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

static SWEEP: Once = Once::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

/// One test's world. Dropping it removes everything it made.
pub struct Env {
    pub id: String,
    pub cg_mount: PathBuf,
    /// The attach cgroup, as a cgroup path (`/portcullis-test-...`).
    pub root: String,
    pub pin_path: PathBuf,
    pub dir: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        require_root();
        SWEEP.call_once(sweep_leftovers);
        ensure_bpffs();
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cg_mount = cgroup2_mount();
        let root = format!("/{id}");
        fs::create_dir_all(cg_mount.join(&id)).expect("create test cgroup");
        let dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&dir).expect("create test dir");
        // Test processes run as unprivileged users and write results here.
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .expect("chmod test dir");
        Self {
            pin_path: PathBuf::from("/sys/fs/bpf").join(&id),
            id,
            cg_mount,
            root,
            dir,
        }
    }

    /// A cgroup path below the test's root (created).
    pub fn cgroup(&self, rel: &str) -> String {
        let path = format!("{}/{}", self.root, rel.trim_matches('/'));
        fs::create_dir_all(self.cg_dir(&path)).expect("create cgroup");
        path
    }

    /// Filesystem directory of a cgroup path.
    pub fn cg_dir(&self, cgroup: &str) -> PathBuf {
        self.cg_mount.join(cgroup.trim_start_matches('/'))
    }

    /// cgroup id (inode) of a cgroup path.
    pub fn cg_id(&self, cgroup: &str) -> u64 {
        fs::metadata(self.cg_dir(cgroup)).expect("cgroup").ino()
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// Writes a configuration: this environment's pins, cgroup, socket and ephemeral
    /// listener ports, plus `body` (agents, targets, overrides of `[ebpf]` keys go in
    /// `ebpf_extra`).
    pub fn config(&self, ebpf_extra: &str, body: &str) -> PathBuf {
        self.config_with("", ebpf_extra, body)
    }

    /// [`Env::config`] with more `[proxy]` keys.
    pub fn config_with(&self, proxy_extra: &str, ebpf_extra: &str, body: &str) -> PathBuf {
        let text = format!(
            "[daemon]\nstate_dir = \"{}\"\n\n\
             [proxy]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\ndrain_timeout = \"2s\"\n{proxy_extra}\n\n\
             [ebpf]\npin_path = \"{}\"\nattach_cgroup = \"{}\"\nrescan_interval = \"200ms\"\n{ebpf_extra}\n\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [admin]\nsocket = \"{}\"\n\n{body}\n",
            self.dir.join("state").display(),
            self.pin_path.display(),
            self.root,
            self.admin_socket().display(),
        );
        let path = self.dir.join("portcullis.toml");
        fs::write(&path, text).expect("write config");
        path
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.cg_mount.join(&self.id));
        // Unpinning the links detaches the programs; removing the map pins frees the maps.
        let _ = fs::remove_dir_all(&self.pin_path);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn ensure_bpffs() {
    let mounted = fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.contains(" /sys/fs/bpf ") && l.contains(" - bpf "));
    if !mounted {
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("run mount");
        assert!(st.success(), "cannot mount bpffs at /sys/fs/bpf");
    }
}

/// Makes `cmd`'s child join `cgroup_dir` and then (optionally) drop to `uid`/`gid`, before
/// it execs. (std applies `Command::uid` before `pre_exec` closures, too early for us.)
pub fn in_cgroup(cmd: &mut Command, cgroup_dir: &Path, uid: Option<u32>) {
    let procs = CString::new(
        cgroup_dir
            .join("cgroup.procs")
            .as_os_str()
            .as_encoded_bytes(),
    )
    .expect("path");
    // SAFETY: the closure only makes async-signal-safe syscalls on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(uid) = uid
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `pc-probe ARGS` in a cgroup as `uid` and returns its JSON answer, with the pid of
/// the process the harness started added as `launcher_pid`.
pub fn probe(env: &Env, cgroup: &str, uid: Option<u32>, args: &[&str]) -> Value {
    let mut cmd = Command::new(workspace_bin("pc-probe"));
    cmd.args(args);
    run_json(env, cgroup, uid, cmd)
}

/// Runs a command in a cgroup as `uid`; its last stdout line is JSON.
pub fn run_json(env: &Env, cgroup: &str, uid: Option<u32>, mut cmd: Command) -> Value {
    in_cgroup(&mut cmd, &env.cg_dir(cgroup), uid);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn probe");
    let launcher = child.id();
    let out = child.wait_with_output().expect("wait probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut v: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
            panic!(
                "{cmd:?} gave no JSON ({e}); status {}, stdout {stdout:?}, stderr {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    v["launcher_pid"] = launcher.into();
    v
}

/// `[::ffff:a.b.c.d]:p` → `a.b.c.d:p`, as the proxy's IPv4 listener sees such a client.
pub fn canonical(addr: &str) -> String {
    match addr.parse::<SocketAddr>() {
        Ok(SocketAddr::V6(a)) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()).to_string(),
            None => addr.to_owned(),
        },
        _ => addr.to_owned(),
    }
}

/// Log events of a running daemon (its JSON log lines). Lines are kept as read and parsed
/// when someone looks: the reader thread stays cheap, so a benchmark does not pay for
/// parsing every line the daemon writes (a production daemon's journal does not parse
/// them either).
#[derive(Default)]
pub struct Logs {
    lines: Mutex<Lines>,
    changed: Condvar,
    /// The reader stops reading the daemon's stderr (a stalled journal).
    paused: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Lines {
    /// Read and not parsed yet.
    pending: Vec<String>,
    /// Every line that is a JSON object, in order.
    events: Vec<Value>,
    /// The last lines, for failure messages.
    recent: VecDeque<String>,
}

impl Lines {
    fn parse_pending(&mut self) {
        for line in std::mem::take(&mut self.pending) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                self.events.push(v);
            }
            self.recent.push_back(line);
            if self.recent.len() > 400 {
                self.recent.pop_front();
            }
        }
    }
}

impl Logs {
    /// Stops reading the daemon's stderr: once the pipe is full the daemon's writes to it
    /// block, as they do when journald stops reading.
    pub fn pause(&self) {
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn wait_while_paused(&self) {
        while self.paused.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn push(&self, line: String) {
        self.lines.lock().expect("logs").pending.push(line);
        self.changed.notify_all();
    }

    fn parsed(&self) -> std::sync::MutexGuard<'_, Lines> {
        let mut lines = self.lines.lock().expect("logs");
        lines.parse_pending();
        lines
    }

    /// The last lines, for failure messages.
    pub fn tail(&self) -> String {
        tail_of(&self.parsed())
    }

    pub fn all(&self) -> Vec<Value> {
        self.parsed().events.clone()
    }

    /// How many events so far have a message `pred` accepts.
    pub fn count_messages(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.parsed()
            .events
            .iter()
            .filter(|v| v["message"].as_str().is_some_and(&pred))
            .count()
    }

    /// Waits for an event matching `pred`.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut lines = self.parsed();
        let mut searched = 0;
        loop {
            if let Some(v) = lines.events[searched..].iter().find(|v| pred(v)) {
                return v.clone();
            }
            searched = lines.events.len();
            let now = Instant::now();
            if now >= deadline {
                let tail = tail_of(&lines);
                drop(lines);
                panic!("timed out waiting for {what}; daemon log:\n{tail}");
            }
            lines = self
                .changed
                .wait_timeout(lines, deadline - now)
                .expect("logs")
                .0;
            lines.parse_pending();
        }
    }
}

fn tail_of(lines: &Lines) -> String {
    let n = lines.recent.len();
    lines
        .recent
        .iter()
        .skip(n.saturating_sub(40))
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

/// Connection records (`portcullis::audit`, message `connection`).
pub fn is_connection(v: &Value) -> bool {
    v["target"] == "portcullis::audit" && v["message"] == "connection"
}

/// Kills a child unless taken: a failed start never leaks a daemon.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn id(&self) -> u32 {
        self.0.as_ref().expect("child").id()
    }
    fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("child")
    }
    fn take(&mut self) -> Child {
        self.0.take().expect("child")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `portcullis run` child process.
pub struct Daemon {
    pub child: Child,
    pub logs: Arc<Logs>,
    pub v4: SocketAddr,
    pub v6: Option<SocketAddr>,
    /// The metrics endpoint.
    pub metrics: Option<SocketAddr>,
    pub config: PathBuf,
}

fn parse_addr(v: &Value) -> Option<SocketAddr> {
    v.as_str().and_then(|s| s.parse().ok())
}

impl Daemon {
    pub fn start(config: &Path) -> Self {
        Self::spawn(config, None)
    }

    /// Starts the daemon inside a cgroup (to show its own connections are not redirected).
    pub fn start_in(config: &Path, cgroup_dir: &Path) -> Self {
        Self::spawn(config, Some(cgroup_dir))
    }

    /// With extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn start_with_env(config: &Path, env: &[(&str, &Path)]) -> Self {
        Self::spawn_env(config, None, env)
    }

    /// In a mount namespace of its own where each `(file, over)` is bind-mounted over
    /// `over` (e.g. a test's own `/etc/hosts`), seen by the daemon alone.
    pub fn start_with_files(config: &Path, files: &[(&Path, &Path)]) -> Self {
        use std::{ffi::CString, os::unix::ffi::OsStrExt, os::unix::process::CommandExt};
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("path without NUL");
        let binds: Vec<(CString, CString)> = files.iter().map(|(f, o)| (c(f), c(o))).collect();
        let root = CString::new("/").expect("root");
        let mut cmd = Self::command(config);
        // SAFETY: only system calls between fork and exec, on memory prepared before.
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (file, over) in &binds {
                    check(libc::mount(
                        file.as_ptr(),
                        over.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                }
                Ok(())
            });
        }
        Self::launch(cmd, config)
    }

    fn spawn(config: &Path, cgroup_dir: Option<&Path>) -> Self {
        Self::spawn_env(config, cgroup_dir, &[])
    }

    fn command(config: &Path) -> Command {
        let mut cmd = Command::new(workspace_bin("portcullis"));
        cmd.arg("--config")
            .arg(config)
            .args(["run", "--log-format", "json"])
            // `PC_DAEMON_LOG` sets the daemon's log filter (profiling: what logging costs).
            .env(
                "RUST_LOG",
                std::env::var("PC_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    fn spawn_env(config: &Path, cgroup_dir: Option<&Path>, env: &[(&str, &Path)]) -> Self {
        let mut cmd = Self::command(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(dir) = cgroup_dir {
            in_cgroup(&mut cmd, dir, None);
        }
        Self::launch(cmd, config)
    }

    fn launch(mut cmd: Command, config: &Path) -> Self {
        let mut child = KillOnDrop(Some(cmd.spawn().expect("spawn portcullis")));
        let logs = Arc::new(Logs::default());
        let stderr = child.get().stderr.take().expect("stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            loop {
                sink.wait_while_paused();
                match lines.next() {
                    Some(Ok(l)) => sink.push(l),
                    _ => break,
                }
            }
            sink.push("{\"message\":\"<stderr closed>\"}".into());
        });
        let ready = logs.wait_for("the daemon to be ready", Duration::from_secs(30), |v| {
            v["message"] == "ready" || v["message"] == "<stderr closed>"
        });
        assert_eq!(
            ready["message"],
            "ready",
            "the daemon exited before it was ready:\n{}",
            logs.tail()
        );
        Self {
            child: child.take(),
            v4: parse_addr(&ready["listen.v4"]).expect("v4 listener"),
            v6: parse_addr(&ready["listen.v6"]),
            metrics: parse_addr(&ready["metrics"]),
            logs,
            config: config.to_owned(),
        }
    }

    /// `portcullis status --json`.
    pub fn status(&self) -> Value {
        serde_json::from_str(&self.status_output(&["--json"])).expect("status JSON")
    }

    /// `portcullis status`, as people read it.
    pub fn status_text(&self) -> String {
        self.status_output(&[])
    }

    fn status_output(&self, extra: &[&str]) -> String {
        let out = Command::new(workspace_bin("portcullis"))
            .arg("--config")
            .arg(&self.config)
            .arg("status")
            .args(extra)
            .output()
            .expect("run portcullis status");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A kernel counter from `status`.
    pub fn counter(&self, name: &str) -> u64 {
        self.status()["kernel"]["counters"]
            .as_array()
            .expect("counters")
            .iter()
            .find(|c| c[0] == name)
            .and_then(|c| c[1].as_u64())
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Waits for the connection record of the client at `client_local` (as the probe saw
    /// its own address).
    pub fn record_for(&self, client_local: &str) -> Value {
        let want = canonical(client_local);
        self.logs.wait_for(
            &format!("the connection record of {client_local}"),
            Duration::from_secs(10),
            |v| is_connection(v) && v["client.addr"].as_str() == Some(want.as_str()),
        )
    }

    /// Whether any connection record exists for this client address.
    pub fn has_record_for(&self, client_local: &str) -> bool {
        let want = canonical(client_local);
        self.logs
            .all()
            .iter()
            .any(|v| is_connection(v) && v["client.addr"].as_str() == Some(want.as_str()))
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `GET path` on the metrics endpoint: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read as _, Write as _};
        let addr = self.metrics.expect("the daemon serves metrics");
        let mut c = std::net::TcpStream::connect(addr).expect("connect to metrics");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(c, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").expect("request");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("response");
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not HTTP: {out:?}"));
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        (status, body)
    }

    /// One sample from `/metrics`: the value of the line `name{labels}` (labels as
    /// exposed, e.g. `{decision="deny"}` matched as a substring), summed over matches.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, body) = self.http_get("/metrics");
        metric_in(&body, name, labels)
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An echo server on loopback (one IPv4 address and `::1`, same port), recording the peer
/// address of every connection it accepts.
pub struct Echo {
    pub port: u16,
    pub v4: Ipv4Addr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    pub accepted: Arc<AtomicUsize>,
}

impl Echo {
    /// Listens on `v4` (a 127.0.0.0/8 address) and `[::1]` at one free port.
    pub fn start(v4: Ipv4Addr) -> Self {
        assert!(v4.is_loopback(), "tests only talk to loopback");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        for _ in 0..50 {
            let l4 = StdListener::bind((v4, 0)).expect("bind echo v4");
            let port = l4.local_addr().expect("addr").port();
            let Ok(l6) = StdListener::bind((Ipv6Addr::LOCALHOST, port)) else {
                continue;
            };
            for l in [l4, l6] {
                let peers = peers.clone();
                let accepted = accepted.clone();
                std::thread::spawn(move || serve_echo(l, peers, accepted));
            }
            return Self {
                port,
                v4,
                peers,
                accepted,
            };
        }
        panic!("no port free on both {v4} and ::1");
    }

    pub fn addr4(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.v4), self.port)
    }

    /// Serves at `v4` too, at the same port (peers recorded together).
    pub fn also_on(&self, v4: Ipv4Addr) -> std::io::Result<SocketAddr> {
        assert!(v4.is_loopback(), "tests only talk to loopback");
        let l = StdListener::bind((v4, self.port))?;
        let addr = l.local_addr()?;
        let (peers, accepted) = (self.peers.clone(), self.accepted.clone());
        std::thread::spawn(move || serve_echo(l, peers, accepted));
        Ok(addr)
    }

    pub fn addr6(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), self.port)
    }

    /// Whether a connection from exactly `client` reached the server (i.e. went direct).
    pub fn saw_peer(&self, client: &str) -> bool {
        let client: SocketAddr = client.parse().expect("client addr");
        let norm = |a: SocketAddr| match a.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
            _ => a,
        };
        self.peers
            .lock()
            .expect("peers")
            .iter()
            .any(|p| norm(*p) == norm(client))
    }
}

fn serve_echo(l: StdListener, peers: Arc<Mutex<Vec<SocketAddr>>>, accepted: Arc<AtomicUsize>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("echo runtime");
    rt.block_on(async move {
        l.set_nonblocking(true).expect("nonblocking");
        let l = tokio::net::TcpListener::from_std(l).expect("listener");
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                continue;
            };
            peers.lock().expect("peers").push(peer);
            accepted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            });
        }
    });
}

/// The benchmarks' reference: a plain user-space TCP relay (`pc-probe relay`) in its own
/// process, killed on drop.
pub struct Relay {
    child: KillOnDrop,
    pub addr: SocketAddr,
}

impl Relay {
    /// Listens at a free port of `listen_ip` and relays to `upstream`, with as many
    /// workers as the daemon's default.
    pub fn start(listen_ip: &str, upstream: &str) -> Self {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut child = KillOnDrop(Some(
            Command::new(workspace_bin("pc-probe"))
                .args([
                    "relay",
                    &format!("{listen_ip}:0"),
                    upstream,
                    &workers.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn the reference relay"),
        ));
        let mut line = String::new();
        BufReader::new(child.get().stdout.take().expect("relay stdout"))
            .read_line(&mut line)
            .expect("read the relay's address");
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the reference relay said {line:?}: {e}"));
        let addr = v["listening"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("the reference relay said {line:?}: no address"));
        Self { child, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A configuration body with one agent per cgroup and one PostgreSQL target (`extra` is
/// added to the target table: `auth = "inject"`, credentials, TLS settings).
pub fn agents_and_pg(agents: &[(&str, &str)], addr: &str, extra: &str) -> String {
    let mut s = String::new();
    for (name, sel) in agents {
        s.push_str(&format!(
            "[[agent]]\nname = \"{name}\"\nmatch = {{ {sel} }}\n\n"
        ));
    }
    s.push_str(&format!(
        "[[target]]\nname = \"pg\"\nprotocol = \"postgres\"\naddress = \"{addr}\"\n{extra}\n"
    ));
    s
}

/// A configuration body with one agent per cgroup and one TCP target.
pub fn agents_and_target(agents: &[(&str, &str)], target_addrs: &[String]) -> String {
    let mut s = String::new();
    for (name, sel) in agents {
        s.push_str(&format!(
            "[[agent]]\nname = \"{name}\"\nmatch = {{ {sel} }}\n\n"
        ));
    }
    let addrs: Vec<String> = target_addrs.iter().map(|a| format!("\"{a}\"")).collect();
    s.push_str(&format!(
        "[[target]]\nname = \"echo\"\nprotocol = \"tcp\"\naddress = [{}]\n",
        addrs.join(", ")
    ));
    s
}

pub mod oidc;
pub mod pg;

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Who runs a `portcullis` client command.
#[derive(Clone, Copy, Debug)]
pub enum As<'a> {
    Root,
    /// A uid and primary gid (no supplementary groups).
    User(u32, u32),
    /// Root, from inside a cgroup (an agent's, to show agents are refused).
    RootIn(&'a Path),
}

/// Runs `portcullis --config CONFIG ARGS` as `who`.
pub fn portcullis_as(config: &Path, who: As<'_>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(workspace_bin("portcullis"));
    cmd.arg("--config").arg(config).args(args);
    match who {
        As::Root => {}
        As::User(uid, gid) => {
            cmd.uid(uid).gid(gid);
        }
        As::RootIn(dir) => in_cgroup(&mut cmd, dir, None),
    }
    cmd.output().expect("run portcullis")
}

/// Runs a `portcullis ... --json` client command as root and parses its output, failing
/// with the command's stderr when it did not succeed.
pub fn portcullis_json(config: &Path, args: &[&str]) -> Value {
    let out = portcullis_as(config, As::Root, args);
    assert!(
        out.status.success(),
        "portcullis {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "portcullis {args:?} gave no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A small tmpfs mounted for one test (a disk that fills up); unmounted in `Drop`.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `2m`) at a new directory named after `name`.
    pub fn mount(name: &str, size: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{PREFIX}{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("tmpfs dir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), name])
            .arg(&dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "cannot mount a tmpfs at {}", dir.display());
        Self(dir)
    }

    /// Fills the filesystem with one file (returned, to remove it again).
    pub fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4k"])
            .arg(format!("of={}", filler.display()))
            .stderr(Stdio::null())
            .status();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// Runs `cmd` and returns its stdout, trimmed; the test fails, naming `what` and showing
/// stderr, when it cannot start or does not succeed.
pub fn stdout_of(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `cmd` with `input` on its stdin; returns what it printed and how it ended.
pub fn output_with_input(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// [`Daemon::metric`] over a `/metrics` text already fetched (several values from one
/// scrape).
pub fn metric_in(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
