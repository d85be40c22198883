//! Who opened a connection: the kernel's origin record (pid, uid, gid, cgroup id, comm at
//! the moment of `connect()`), completed from `/proc` (executable, command line) and the
//! cgroup hierarchy (path, systemd unit, container).
//!
//! The kernel fields are facts. The `/proc` fields are read after the fact, so the process
//! may have exited or, in theory, its pid been reused: the process start time is compared
//! with the connect time, before and after the reads, and the result says how much of the
//! identity is trustworthy ([`ProcessState`]).
//!
//! The `/proc` fields (executable, command line) are read once per process image: the
//! kernel tags each connection with the generation of the process that made it, which
//! changes when the process execs and is never handed to a later process with the same pid
//! (`Origin::process_gen`). Later connections of the same image reuse what was read. So a
//! process that rewrites its own command line after its first connection keeps the first
//! reading; the executable cannot change without an exec.

use std::{
    collections::HashMap,
    fs,
    io::Read as _,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use nix::{fcntl::OFlag, sys::stat::Mode};

use gateway_common::Origin;
use serde::Serialize;

use crate::cgroup::{self, CgroupInfo, Hierarchy};

/// Most bytes of `/proc/PID/cmdline` kept.
const CMDLINE_MAX: usize = 4096;
/// Entries kept in each lookup cache before it is cleared.
const CACHE_MAX: usize = 4096;

/// How far the `/proc` part of an identity can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    /// The process that connected was still there, unchanged, while we read it (for this
    /// connection or an earlier one of the same process image).
    Verified,
    /// It had exited: only the kernel fields are known.
    Exited,
    /// The pid now belongs to a process started after the connect: `/proc` fields dropped.
    PidReused,
}

/// The identity of the process behind a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Option<String>,
    pub comm: String,
    pub exe: Option<PathBuf>,
    pub cmdline: Vec<String>,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    #[serde(flatten)]
    pub cgroup_info: CgroupInfo,
    pub netns_cookie: u64,
    pub process: ProcessState,
}

/// Resolves identities; caches the lookups that are stable (cgroup ids are never reused,
/// user names rarely change, a process image keeps its executable), so a process that
/// connects again costs no `/proc` reads.
pub struct Resolver {
    proc_root: PathBuf,
    hierarchy: Option<Hierarchy>,
    ns_per_tick: u64,
    user_lookup: fn(u32) -> Option<String>,
    users: Mutex<HashMap<u32, Option<String>>>,
    cgroups: Mutex<HashMap<u64, String>>,
    /// Process images by pid and kernel generation.
    images: Mutex<HashMap<(u32, u64), Arc<Image>>>,
}

/// What `/proc` showed of one process image (one pid between two execs).
struct Image {
    exe: Option<PathBuf>,
    cmdline: Vec<String>,
}

fn system_user(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

impl Resolver {
    /// The real `/proc` and cgroup hierarchy.
    pub fn system(hierarchy: Option<Hierarchy>) -> Self {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks = if ticks > 0 { ticks as u64 } else { 100 };
        Self::new("/proc", hierarchy, 1_000_000_000 / ticks, system_user)
    }

    pub fn new(
        proc_root: impl Into<PathBuf>,
        hierarchy: Option<Hierarchy>,
        ns_per_tick: u64,
        user_lookup: fn(u32) -> Option<String>,
    ) -> Self {
        Self {
            proc_root: proc_root.into(),
            hierarchy,
            ns_per_tick,
            user_lookup,
            users: Mutex::new(HashMap::new()),
            cgroups: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
        }
    }

    pub fn resolve(&self, origin: &Origin) -> Identity {
        let pid = origin.tgid;
        let mut cgroup = self.cached_cgroup(origin.cgroup_id);
        // The kernel gives each process image a generation and forgets it when the process
        // execs or exits (gateway-common's `Origin::process_gen`): an image read for an
        // earlier connection with the same pid and generation is this one.
        let (state, image, from_proc) = match self.cached_image(pid, origin.process_gen) {
            Some(image) => (ProcessState::Verified, Some(image), None),
            None => self.read_proc(origin, cgroup.is_none()),
        };
        if cgroup.is_none() {
            cgroup = self.lookup_cgroup(origin.cgroup_id, from_proc.as_deref());
        }
        let cgroup_info = cgroup.as_deref().map(cgroup::describe).unwrap_or_default();
        let (exe, cmdline) =
            image.map_or((None, Vec::new()), |i| (i.exe.clone(), i.cmdline.clone()));
        Identity {
            pid,
            tid: origin.pid,
            uid: origin.uid,
            gid: origin.gid,
            user: self.user(origin.uid),
            comm: comm_string(&origin.comm),
            exe,
            cmdline,
            cgroup_id: origin.cgroup_id,
            cgroup,
            cgroup_info,
            netns_cookie: origin.netns_cookie,
            process: state,
        }
    }

    /// Reads the process from `/proc`: how far it can be trusted, its image (when it can),
    /// and its cgroup path as `/proc` gives it (when `want_cgroup`). A verified image with a
    /// generation is kept for the process's next connections.
    fn read_proc(
        &self,
        origin: &Origin,
        want_cgroup: bool,
    ) -> (ProcessState, Option<Arc<Image>>, Option<String>) {
        // Every read goes through one directory fd: it stays bound to the process instance
        // it was opened for, so if that process exits and its pid is reused, later reads
        // fail instead of describing a stranger. One start-time check then covers all reads.
        let dir = ProcDir::open(&self.proc_root, origin.tgid);
        let start = dir.as_ref().and_then(ProcDir::start_ticks);
        let state = match start {
            None => ProcessState::Exited,
            Some(t) if t.saturating_mul(self.ns_per_tick) > origin.boot_ns => {
                ProcessState::PidReused
            }
            Some(_) => ProcessState::Verified,
        };
        let (ProcessState::Verified, Some(dir)) = (state, dir) else {
            return (state, None, None);
        };
        let image = Arc::new(Image {
            exe: dir.exe(),
            // Credentials on the command line are blanked before anyone records it.
            cmdline: super::cmdline::redact(dir.cmdline()),
        });
        if origin.process_gen != 0 {
            let mut cache = self.images.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert((origin.tgid, origin.process_gen), image.clone());
        }
        let from_proc = if want_cgroup { dir.cgroup() } else { None };
        (state, Some(image), from_proc)
    }

    fn cached_image(&self, pid: u32, generation: u64) -> Option<Arc<Image>> {
        if generation == 0 {
            return None;
        }
        self.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, generation))
            .cloned()
    }

    fn user(&self, uid: u32) -> Option<String> {
        let mut cache = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = cache.get(&uid) {
            return hit.clone();
        }
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        let name = (self.user_lookup)(uid);
        cache.insert(uid, name.clone());
        name
    }

    fn cached_cgroup(&self, id: u64) -> Option<String> {
        self.cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// The cgroup path for the kernel's cgroup id: by file handle, or from `/proc` when that
    /// path still has the same id (the process may have moved since it connected). Cached:
    /// cgroup ids are never reused.
    fn lookup_cgroup(&self, id: u64, from_proc: Option<&str>) -> Option<String> {
        let h = self.hierarchy.as_ref()?;
        let found = h.path_of_id(id).or_else(|| {
            let p = from_proc?;
            (h.id_of(p).ok()? == id).then(|| p.to_owned())
        })?;
        let mut cache = self.cgroups.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(id, found.clone());
        Some(found)
    }
}

/// `/proc/PID`, opened once.
struct ProcDir(OwnedFd);

impl ProcDir {
    fn open(proc_root: &Path, pid: u32) -> Option<Self> {
        let path = proc_root.join(pid.to_string());
        nix::fcntl::open(
            &path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()
        .map(Self)
    }

    /// Reads a file below the directory, at most `max` bytes.
    fn read(&self, name: &str, max: usize) -> Option<Vec<u8>> {
        let fd = nix::fcntl::openat(
            &self.0,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let mut f = fs::File::from(fd);
        let mut buf = vec![0u8; max.min(4096)];
        let mut len = 0;
        loop {
            match f.read(&mut buf[len..]) {
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
            // `/proc` hands over what a file holds in one read when the buffer is large
            // enough, so a read that leaves room is the end: no second read to see EOF.
            if len < buf.len() || len == max {
                break;
            }
            buf.resize((2 * len).min(max), 0);
        }
        buf.truncate(len);
        Some(buf)
    }

    fn start_ticks(&self) -> Option<u64> {
        let stat = self.read("stat", 4096)?;
        parse_start_ticks(&String::from_utf8_lossy(&stat))
    }

    fn exe(&self) -> Option<PathBuf> {
        nix::fcntl::readlinkat(&self.0, "exe")
            .ok()
            .map(|p| strip_deleted(Path::new(&p)))
    }

    fn cmdline(&self) -> Vec<String> {
        self.read("cmdline", CMDLINE_MAX)
            .map(|buf| {
                buf.split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cgroup(&self) -> Option<String> {
        let text = self.read("cgroup", 64 * 1024)?;
        cgroup::parse_proc_cgroup(&String::from_utf8_lossy(&text))
    }
}

/// Field `n` of a `/proc/PID/stat` line, numbered as proc(5) numbers them, from 3 on. The
/// command name (field 2) may contain spaces and parentheses, so fields are counted after
/// the last `)`.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_ascii_whitespace().nth(n.checked_sub(3)?)
}

/// Field 22 of `/proc/PID/stat`: start time in clock ticks since boot.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    stat_field(stat, 22)?.parse().ok()
}

/// `/proc/PID/exe` of a deleted binary reads `/path (deleted)`.
fn strip_deleted(p: &Path) -> PathBuf {
    let s = p.to_string_lossy();
    match s.strip_suffix(" (deleted)") {
        Some(base) => PathBuf::from(base),
        None => p.to_owned(),
    }
}

pub fn comm_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};

    use super::*;

    fn stat_line(pid: u32, comm: &str, start: u64) -> String {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice threads itrealvalue starttime ...
        format!("{pid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 10 0\n")
    }

    struct FakeProc {
        dir: tempfile::TempDir,
        cgroot: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().expect("tempdir"),
                cgroot: tempfile::tempdir().expect("tempdir"),
            }
        }
        fn process(&self, pid: u32, comm: &str, start: u64, exe: &str, cg: &str) -> u64 {
            let d = self.dir.path().join(pid.to_string());
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join("stat"), stat_line(pid, comm, start)).expect("stat");
            fs::write(d.join("cmdline"), b"python3\0agent.py\0--fast\0").expect("cmdline");
            fs::write(d.join("cgroup"), format!("0::{cg}\n")).expect("cgroup");
            symlink(exe, d.join("exe")).expect("exe");
            let cgdir = self.cgroot.path().join(cg.trim_start_matches('/'));
            fs::create_dir_all(&cgdir).expect("cg");
            fs::metadata(&cgdir).expect("cg").ino()
        }
        fn resolver(&self) -> Resolver {
            let h = Hierarchy {
                mount: self.cgroot.path().to_owned(),
            };
            Resolver::new(self.dir.path(), Some(h), 10_000_000, |uid| {
                (uid == 1000).then(|| "alice".to_owned())
            })
        }
    }

    fn origin(pid: u32, boot_ns: u64, cgroup_id: u64) -> Origin {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"python3");
        Origin {
            tgid: pid,
            pid: pid + 1,
            uid: 1000,
            gid: 1000,
            cgroup_id,
            boot_ns,
            comm,
            ..Default::default()
        }
    }

    #[test]
    fn resolves_a_live_process() {
        let f = FakeProc::new();
        let cg = "/system.slice/agent.service";
        let id = f.process(42, "python3", 500, "/usr/bin/python3.11", cg);
        // started at tick 500 = 5 s; connected at 6 s
        let who = f.resolver().resolve(&origin(42, 6_000_000_000, id));
        assert_eq!(who.process, ProcessState::Verified);
        assert_eq!(who.exe.as_deref(), Some(Path::new("/usr/bin/python3.11")));
        assert_eq!(who.cmdline, ["python3", "agent.py", "--fast"]);
        assert_eq!(who.user.as_deref(), Some("alice"));
        assert_eq!(who.comm, "python3");
        assert_eq!(who.cgroup.as_deref(), Some(cg));
        assert_eq!(who.cgroup_info.unit.as_deref(), Some("agent.service"));
        assert_eq!((who.pid, who.tid), (42, 43));
    }

    #[test]
    fn a_reused_pid_is_not_believed() {
        let f = FakeProc::new();
        let id = f.process(42, "evil", 900, "/tmp/evil", "/x");
        // connected at 6 s, but the process now at pid 42 started at 9 s
        let who = f.resolver().resolve(&origin(42, 6_000_000_000, id));
        assert_eq!(who.process, ProcessState::PidReused);
        assert_eq!(who.exe, None);
        assert!(who.cmdline.is_empty());
        // kernel facts stay
        assert_eq!(who.comm, "python3");
        assert_eq!(who.uid, 1000);
    }

    #[test]
    fn an_exited_process_keeps_kernel_facts() {
        let f = FakeProc::new();
        let who = f.resolver().resolve(&origin(7, 1, 12345));
        assert_eq!(who.process, ProcessState::Exited);
        assert_eq!(who.exe, None);
        assert_eq!(who.cgroup, None, "unknown id, no /proc");
        assert_eq!(who.user.as_deref(), Some("alice"));
    }

    #[test]
    fn cgroup_from_proc_must_match_the_kernel_id() {
        let f = FakeProc::new();
        let _ = f.process(42, "python3", 1, "/bin/x", "/moved/elsewhere");
        let who = f.resolver().resolve(&origin(42, 6_000_000_000, 999_999));
        assert_eq!(
            who.cgroup, None,
            "process moved since connect: path not trusted"
        );
    }

    fn exe_now(f: &FakeProc, pid: u32, exe: &str) {
        let link = f.dir.path().join(pid.to_string()).join("exe");
        fs::remove_file(&link).expect("rm exe");
        symlink(exe, link).expect("exe");
    }

    #[test]
    fn a_process_image_is_read_once_per_generation() {
        let f = FakeProc::new();
        let id = f.process(42, "python3", 500, "/usr/bin/python3.11", "/a");
        let r = f.resolver();
        let first = Origin {
            process_gen: 5_500_000_000,
            ..origin(42, 6_000_000_000, id)
        };
        assert_eq!(
            r.resolve(&first).exe.as_deref(),
            Some(Path::new("/usr/bin/python3.11"))
        );
        // What /proc says now no longer matters for this image...
        exe_now(&f, 42, "/usr/bin/other");
        fs::remove_file(f.dir.path().join("42/cmdline")).expect("rm cmdline");
        let again = r.resolve(&Origin {
            boot_ns: 7_000_000_000,
            ..first
        });
        assert_eq!(again.process, ProcessState::Verified);
        assert_eq!(again.exe.as_deref(), Some(Path::new("/usr/bin/python3.11")));
        assert_eq!(again.cmdline, ["python3", "agent.py", "--fast"]);
        // ...but after an exec the kernel hands out a new generation, and /proc is read.
        let execed = r.resolve(&Origin {
            process_gen: 7_500_000_000,
            boot_ns: 8_000_000_000,
            ..first
        });
        assert_eq!(execed.exe.as_deref(), Some(Path::new("/usr/bin/other")));
        assert!(execed.cmdline.is_empty());
    }

    #[test]
    fn without_a_generation_every_connection_reads_proc() {
        let f = FakeProc::new();
        let id = f.process(42, "python3", 500, "/usr/bin/python3.11", "/a");
        let r = f.resolver();
        let o = origin(42, 6_000_000_000, id);
        assert_eq!(o.process_gen, 0);
        assert_eq!(
            r.resolve(&o).exe.as_deref(),
            Some(Path::new("/usr/bin/python3.11"))
        );
        exe_now(&f, 42, "/usr/bin/other");
        assert_eq!(
            r.resolve(&o).exe.as_deref(),
            Some(Path::new("/usr/bin/other"))
        );
    }

    #[test]
    fn an_unverified_reading_is_not_kept() {
        let f = FakeProc::new();
        let r = f.resolver();
        let o = Origin {
            process_gen: 5_500_000_000,
            ..origin(42, 6_000_000_000, 1)
        };
        // Not there yet (as if exited): nothing read, nothing kept.
        assert_eq!(r.resolve(&o).process, ProcessState::Exited);
        // A process started after the connect holds the pid: not believed, not kept.
        let _ = f.process(42, "evil", 900, "/tmp/evil", "/x");
        assert_eq!(r.resolve(&o).process, ProcessState::PidReused);
        fs::remove_dir_all(f.dir.path().join("42")).expect("rm");
        let id = f.process(42, "python3", 500, "/usr/bin/python3.11", "/a");
        let who = r.resolve(&Origin { cgroup_id: id, ..o });
        assert_eq!(who.process, ProcessState::Verified);
        assert_eq!(who.exe.as_deref(), Some(Path::new("/usr/bin/python3.11")));
    }

    #[test]
    fn proc_files_are_read_whole() {
        let f = FakeProc::new();
        let _ = f.process(42, "python3", 500, "/usr/bin/python3.11", "/a");
        let long: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        fs::write(f.dir.path().join("42/cgroup"), &long).expect("write");
        let dir = ProcDir::open(f.dir.path(), 42).expect("open");
        assert_eq!(dir.read("cgroup", 64 * 1024).as_deref(), Some(&long[..]));
        assert_eq!(dir.read("cgroup", 5000).as_deref(), Some(&long[..5000]));
        assert_eq!(dir.read("cgroup", 4096).as_deref(), Some(&long[..4096]));
        assert_eq!(dir.read("missing", 4096), None);
    }

    #[test]
    fn stat_parsing_survives_odd_names() {
        assert_eq!(parse_start_ticks(&stat_line(1, "a) (b c", 777)), Some(777));
        assert_eq!(parse_start_ticks("1 (x) S"), None);
        assert_eq!(parse_start_ticks("garbage"), None);
        // Fields by their proc(5) numbers: 3 is the state, 20 the thread count.
        let line = stat_line(1, "a) (b c", 777);
        assert_eq!(stat_field(&line, 3), Some("S"));
        assert_eq!(stat_field(&line, 20), Some("1"));
        assert_eq!(stat_field(&line, 2), None);
        assert_eq!(comm_string(b"abc\0\0\0\0\0\0\0\0\0\0\0\0\0"), "abc");
    }
}
