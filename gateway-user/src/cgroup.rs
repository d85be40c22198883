//! cgroup v2 and mount helpers: find the cgroup2 and bpf mounts from mountinfo, turn cgroup
//! ids into paths and back, describe a cgroup path (systemd unit, slice, container), create
//! and join cgroups.
//!
//! The parsing is pure and unit-tested; the rest is thin I/O around it.

use std::{
    ffi::CString,
    fs,
    io::{self, Write as _},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

/// One line of `/proc/self/mountinfo`, the fields we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Root of the mount within its filesystem (`/` for a whole cgroup2 hierarchy).
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}", path = path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "no cgroup v2 filesystem is mounted (looked in /proc/self/mountinfo); mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup` or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error("cannot create cgroup {path}: {source}", path = path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot move process {pid} into cgroup {path}: {source}", path = path.display())]
    Join {
        pid: u32,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot stat cgroup {path}: {source}", path = path.display())]
    Stat { path: PathBuf, source: io::Error },
}

/// Undoes mountinfo's octal escapes (`\040` for a space, etc.).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let fstype = post.split(' ').next()?;
            if pre.len() < 5 {
                return None;
            }
            Some(Mount {
                root: unescape(pre[3]),
                mount_point: PathBuf::from(unescape(pre[4])),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

/// The cgroup2 mount to use: the first that mounts the whole hierarchy.
pub fn cgroup2_mount_in(mounts: &[Mount]) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup2" && m.root == "/")
        .map(|m| m.mount_point.clone())
}

/// The filesystem type at `path`: that of the deepest mount containing it.
pub fn fstype_at<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a str> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| m.fstype.as_str())
}

pub fn read_mountinfo() -> Result<Vec<Mount>, CgroupError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    let text = fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
    Ok(parse_mountinfo(&text))
}

/// Where cgroup v2 is mounted on this host.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    cgroup2_mount_in(&read_mountinfo()?).ok_or(CgroupError::NoCgroup2)
}

/// The cgroup2 hierarchy as seen from this process.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    pub mount: PathBuf,
}

impl Hierarchy {
    pub fn discover() -> Result<Self, CgroupError> {
        Ok(Self {
            mount: cgroup2_mount()?,
        })
    }

    /// Filesystem path of a cgroup path (`/a/b` → `<mount>/a/b`).
    pub fn dir(&self, cgroup: &str) -> PathBuf {
        let rel = cgroup.trim_start_matches('/');
        if rel.is_empty() {
            self.mount.clone()
        } else {
            self.mount.join(rel)
        }
    }

    /// The cgroup id of a cgroup path (the kernel's id is the directory's inode number).
    pub fn id_of(&self, cgroup: &str) -> Result<u64, CgroupError> {
        let path = self.dir(cgroup);
        fs::metadata(&path)
            .map(|m| m.ino())
            .map_err(|source| CgroupError::Stat { path, source })
    }

    /// Creates a cgroup (and its parents) if absent; returns its id.
    pub fn ensure(&self, cgroup: &str) -> Result<u64, CgroupError> {
        let path = self.dir(cgroup);
        fs::create_dir_all(&path).map_err(|source| CgroupError::Create {
            path: path.clone(),
            source,
        })?;
        self.id_of(cgroup)
    }

    /// [`escape_route`] out of `cgroup`, from the files' owners and modes.
    pub fn escape_route(&self, cgroup: &str) -> Option<Escape> {
        escape_route(cgroup, |c| {
            let m = fs::metadata(self.dir(c).join("cgroup.procs")).ok()?;
            Some((m.uid(), m.gid(), m.mode()))
        })
    }

    /// Moves a process into a cgroup (`0` = the caller).
    pub fn join(&self, cgroup: &str, pid: u32) -> Result<(), CgroupError> {
        let path = self.dir(cgroup).join("cgroup.procs");
        let err = |source| CgroupError::Join {
            pid,
            path: path.clone(),
            source,
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(err)?;
        f.write_all(pid.to_string().as_bytes()).map_err(err)
    }

    /// The cgroup path of a cgroup id, by file handle (needs `CAP_DAC_READ_SEARCH`). Works
    /// after the process that connected has gone, as long as the cgroup exists.
    pub fn path_of_id(&self, id: u64) -> Option<String> {
        let mount = fs::File::open(&self.mount).ok()?;
        // struct file_handle with an 8-byte kernfs node id (FILEID_KERNFS = 0xfe).
        #[repr(C)]
        struct Handle {
            bytes: u32,
            kind: i32,
            id: [u8; 8],
        }
        let mut handle = Handle {
            bytes: 8,
            kind: 0xfe,
            id: id.to_ne_bytes(),
        };
        // SAFETY: `handle` is a valid file_handle with handle_bytes matching its payload;
        // the mount fd is open for the duration of the call.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                (&raw mut handle).cast(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let target = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        self.relative(&target)
    }

    /// `<mount>/a/b` → `/a/b`.
    pub fn relative(&self, fs_path: &Path) -> Option<String> {
        let rel = fs_path.strip_prefix(&self.mount).ok()?;
        Some(format!("/{}", rel.to_string_lossy()))
    }

    /// Every cgroup (up to `max_depth` below the root) whose directory is named `name`,
    /// with its id. Used to find a systemd unit's cgroup wherever systemd put it.
    pub fn find_named(&self, name: &str, max_depth: usize) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![(self.mount.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if !ft.is_dir() {
                    continue;
                }
                let p = e.path();
                if e.file_name().as_bytes() == name.as_bytes() {
                    if let (Some(rel), Ok(md)) = (self.relative(&p), e.metadata()) {
                        out.push((rel, md.ino()));
                    }
                    // A unit's cgroup is not nested in another of the same name.
                    continue;
                }
                if depth + 1 < max_depth {
                    stack.push((p, depth + 1));
                }
            }
        }
        out.sort();
        out
    }
}

/// The cgroup path of a process from `/proc/PID/cgroup` (the v2 `0::` line).
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_owned())
}

/// What a cgroup path says about where a process runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CgroupInfo {
    /// Deepest systemd service or scope.
    pub unit: Option<String>,
    /// Deepest slice.
    pub slice: Option<String>,
    /// The unit runs under a user's service manager (`user@UID.service`).
    pub user_unit: bool,
    /// Container id for Docker, containerd/CRI, CRI-O, Podman and Kubernetes layouts.
    pub container_id: Option<String>,
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Describes a cgroup path, e.g. `/system.slice/docker-<id>.scope`.
pub fn describe(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo::default();
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        if comp.ends_with(".slice") {
            info.slice = Some(comp.to_owned());
        } else if comp.ends_with(".service") || comp.ends_with(".scope") {
            if comp.starts_with("user@") && comp.ends_with(".service") {
                info.user_unit = true;
            }
            info.unit = Some(comp.to_owned());
        }
        // docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope
        let stem = comp.strip_suffix(".scope").unwrap_or(comp);
        let candidate = stem.rsplit(['-', ':']).next().unwrap_or(stem);
        if is_hex_id(candidate) {
            info.container_id = Some(candidate.to_owned());
        }
    }
    // A process directly in user@UID.service is the manager itself, not a user unit.
    if info.unit.as_deref().is_some_and(|u| u.starts_with("user@")) {
        info.user_unit = false;
    }
    info
}

/// Who besides root may write a cgroup's `cgroup.procs` (and so move processes into it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    Uid(u32),
    Gid(u32),
    Everyone,
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uid(u) => write!(f, "processes of uid {u}"),
            Self::Gid(g) => write!(f, "processes of group {g}"),
            Self::Everyone => f.write_str("every process"),
        }
    }
}

/// A way out of an agent's cgroup. A process may move a process into a cgroup when it may
/// write that cgroup's `cgroup.procs` and the one of the nearest common ancestor of the two
/// cgroups; so a non-root principal that may write a strict ancestor's `cgroup.procs` (a
/// tree delegated to it, as systemd does with `user@UID.service` for a user's own units)
/// can move its processes out of the agent's cgroup, and no longer be selected by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Escape {
    /// The nearest strict ancestor whose `cgroup.procs` it may write.
    pub ancestor: String,
    pub writer: Writer,
}

/// The nearest strict ancestor of cgroup `path` whose `cgroup.procs` someone other than root
/// may write, given each cgroup's `cgroup.procs` owner, group and mode (`None`: not
/// readable, skipped).
pub fn escape_route(
    path: &str,
    procs_stat: impl Fn(&str) -> Option<(u32, u32, u32)>,
) -> Option<Escape> {
    let mut cur = path.trim_end_matches('/');
    while let Some(i) = cur.rfind('/') {
        cur = &cur[..i];
        let ancestor = if cur.is_empty() { "/" } else { cur };
        if let Some((uid, gid, mode)) = procs_stat(ancestor) {
            let writer = if uid != 0 && mode & 0o200 != 0 {
                Some(Writer::Uid(uid))
            } else if gid != 0 && mode & 0o020 != 0 {
                Some(Writer::Gid(gid))
            } else if mode & 0o002 != 0 {
                Some(Writer::Everyone)
            } else {
                None
            };
            if let Some(writer) = writer {
                return Some(Escape {
                    ancestor: ancestor.to_owned(),
                    writer,
                });
            }
        }
    }
    None
}

/// Whether cgroup `path` is `ancestor` or below it.
pub fn is_within(path: &str, ancestor: &str) -> bool {
    let a = ancestor.trim_end_matches('/');
    if a.is_empty() {
        return true;
    }
    path == a
        || path
            .strip_prefix(a)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `mount -t bpf bpf /sys/fs/bpf` when the pin path is not on a bpf filesystem.
pub fn ensure_bpffs(pin_path: &Path) -> Result<bool, BpffsError> {
    let mounts = read_mountinfo().map_err(BpffsError::Mountinfo)?;
    if fstype_at(&mounts, pin_path) == Some("bpf") {
        return Ok(false);
    }
    let default = Path::new("/sys/fs/bpf");
    if !pin_path.starts_with(default) {
        return Err(BpffsError::NotBpf(pin_path.to_owned()));
    }
    fs::create_dir_all(default).map_err(|source| BpffsError::Mount {
        path: default.to_owned(),
        source,
    })?;
    let target = CString::new(default.as_os_str().as_bytes())
        .map_err(|_| BpffsError::NotBpf(default.into()))?;
    nix::mount::mount(
        Some("bpf"),
        target.as_c_str(),
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|e| BpffsError::Mount {
        path: default.to_owned(),
        source: e.into(),
    })?;
    Ok(true)
}

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(transparent)]
    Mountinfo(CgroupError),
    #[error(
        "pin path {} is not on a bpf filesystem; mount one there or use a path under /sys/fs/bpf",
        .0.display()
    )]
    NotBpf(PathBuf),
    #[error("cannot mount bpffs at {path}: {source} (needs CAP_SYS_ADMIN)", path = path.display())]
    Mount { path: PathBuf, source: io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ancestor_writable_by_someone_but_root_is_a_way_out() {
        // user@1000.service and below belong to uid 1000 (systemd delegation).
        let stat = |c: &str| match c {
            "/user.slice/user-1000.slice/user@1000.service"
            | "/user.slice/user-1000.slice/user@1000.service/app.slice" => {
                Some((1000, 1000, 0o644))
            }
            "/shared" => Some((0, 2000, 0o664)),
            "/open" => Some((0, 0, 0o666)),
            _ => Some((0, 0, 0o644)),
        };
        let e = escape_route(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/agent.service",
            stat,
        )
        .expect("delegated");
        assert_eq!(
            e.ancestor,
            "/user.slice/user-1000.slice/user@1000.service/app.slice"
        );
        assert_eq!(e.writer, Writer::Uid(1000));
        assert_eq!(
            escape_route("/shared/a/b", stat).map(|e| (e.ancestor, e.writer)),
            Some(("/shared".to_owned(), Writer::Gid(2000)))
        );
        assert_eq!(
            escape_route("/open/a", stat).map(|e| e.writer),
            Some(Writer::Everyone)
        );
        // Root's own cgroups: no way out. The cgroup itself being delegated is none either
        // (a process must also write an ancestor).
        assert_eq!(escape_route("/system.slice/bot.service", stat), None);
        let own = |c: &str| {
            Some(if c == "/x/a" {
                (1000, 1000, 0o644)
            } else {
                (0, 0, 0o644)
            })
        };
        assert_eq!(escape_route("/x/a", own), None);
        // Unreadable ancestors are skipped, not taken for open ones.
        assert_eq!(escape_route("/x/a", |_| None), None);
    }

    const MOUNTINFO: &str = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 22 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700
60 1 0:50 /sub /mnt/with\\040space rw - cgroup2 cgroup2 rw
garbage line
";

    #[test]
    fn finds_cgroup2_and_bpffs() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 6);
        assert_eq!(
            cgroup2_mount_in(&m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(m[5].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(
            fstype_at(&m, Path::new("/sys/fs/bpf/portcullis")),
            Some("bpf")
        );
        assert_eq!(
            fstype_at(&m, Path::new("/sys/fs/cgroup/unified/x")),
            Some("cgroup2")
        );
        assert_eq!(fstype_at(&m, Path::new("/sys/kernel")), Some("sysfs"));
        let only_v1 = parse_mountinfo("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n");
        assert_eq!(cgroup2_mount_in(&only_v1), None);
    }

    #[test]
    fn proc_cgroup_v2_line() {
        let t = "12:cpu:/x\n0::/system.slice/ssh.service\n";
        assert_eq!(
            parse_proc_cgroup(t).as_deref(),
            Some("/system.slice/ssh.service")
        );
        assert_eq!(parse_proc_cgroup("1:name=systemd:/\n"), None);
    }

    #[test]
    fn describes_systemd_and_container_paths() {
        let id = "4f1c2a6b8e0d3f5a7c9b1e2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a";
        let d = describe("/system.slice/nginx.service");
        assert_eq!(d.unit.as_deref(), Some("nginx.service"));
        assert_eq!(d.slice.as_deref(), Some("system.slice"));
        assert!(!d.user_unit);
        assert_eq!(d.container_id, None);

        let d = describe("/user.slice/user-1000.slice/user@1000.service/app.slice/agent.service");
        assert_eq!(d.unit.as_deref(), Some("agent.service"));
        assert_eq!(d.slice.as_deref(), Some("app.slice"));
        assert!(d.user_unit);

        let d = describe("/user.slice/user-1000.slice/session-3.scope");
        assert_eq!(d.unit.as_deref(), Some("session-3.scope"));
        assert_eq!(d.slice.as_deref(), Some("user-1000.slice"));

        for p in [
            format!("/system.slice/docker-{id}.scope"),
            format!("/docker/{id}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{id}.scope"
            ),
            format!("/machine.slice/libpod-{id}.scope/container"),
            format!("/kubepods/besteffort/pod7/{id}"),
            format!("/system.slice/crio-{id}.scope"),
        ] {
            assert_eq!(describe(&p).container_id.as_deref(), Some(id), "{p}");
        }
        assert_eq!(describe("/portcullis/local").unit, None);
        assert_eq!(describe("/").container_id, None);
    }

    #[test]
    fn within_is_component_wise() {
        assert!(is_within("/a/b", "/a"));
        assert!(is_within("/a", "/a"));
        assert!(!is_within("/ab", "/a"));
        assert!(is_within("/anything", "/"));
    }
}
