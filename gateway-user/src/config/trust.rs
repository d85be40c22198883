//! Whether the files the daemon takes its rules from are safe from the agents it judges.
//!
//! An agent that can change the policy files changes what it is allowed (the policy
//! directory is watched and reloaded within seconds); one that can change the
//! configuration file changes it at the next reload or restart; one that can read the
//! policies learns exactly where their gaps are. So, like `sshd`'s `StrictModes`:
//! - a policy file, the policy directory, the configuration file, and every directory above
//!   them must be changeable by nobody but root (or the daemon's own user): owned by root,
//!   and writable by neither group (other than root's) nor others. A directory above may be
//!   writable by everyone when it is sticky (`/tmp`): there only an entry's owner may
//!   replace it. Anything else is an error: the daemon does not start with such files, and
//!   a reload keeps the previous ones;
//! - a policy file readable by every user is a warning (group-readable is how to share
//!   them with a team of policy authors).
//!
//! Pure over a `stat` function, so the rules are unit-tested without touching the disk;
//! [`stat`] is the real one (no symbolic links followed: paths are made canonical first).

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// What `stat` tells about one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits, with the sticky bit (`0o7777`).
    pub mode: u32,
    /// It carries a POSIX access ACL: its group bits are then the ACL's mask, the most any
    /// named user or group entry grants.
    pub acl: bool,
}

/// Who besides root may change a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    /// Its owner (who may also change its mode).
    Owner(u32),
    /// Members of this group.
    Group(u32),
    /// Users or groups its access control list names.
    Acl,
    /// Every user.
    Everyone,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Someone other than root may change `path` (or what it names: an entry of a
    /// directory above it), so that `of` is no longer what root wrote.
    Changeable { path: PathBuf, of: PathBuf, by: By },
    /// Every user may read this policy file.
    Readable { path: PathBuf, mode: u32 },
}

impl Finding {
    /// A finding the daemon refuses to load files with (the others are warnings).
    pub fn is_error(&self) -> bool {
        matches!(self, Self::Changeable { .. })
    }

    /// The file the finding is about.
    pub fn file(&self) -> &Path {
        match self {
            Self::Changeable { of, .. } => of,
            Self::Readable { path, .. } => path,
        }
    }
}

/// What is wrong, for a message about [`Finding::file`] (which it does not repeat).
impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Changeable { path, of, by } => {
                let what = if path == of {
                    String::new()
                } else {
                    format!("the directory {} above it is ", path.display())
                };
                let (who, fix) = match by {
                    By::Owner(uid) => (
                        format!("owned by uid {uid}, who may change it"),
                        "chown root:",
                    ),
                    By::Group(gid) => (format!("writable by group {gid}"), "chmod g-w"),
                    By::Acl => (
                        "writable by users or groups its ACL names".to_owned(),
                        "setfacl -b",
                    ),
                    By::Everyone => ("writable by every user".to_owned(), "chmod o-w"),
                };
                write!(
                    f,
                    "{what}{who}; whoever may change the daemon's configuration or policies \
                     decides what agents are allowed, so only root may ({fix} {})",
                    path.display()
                )
            }
            Self::Readable { path, mode } => write!(
                f,
                "readable by every user (mode {mode:o}): a protected agent can read the rules \
                 it is judged by (chmod o-r {})",
                path.display()
            ),
        }
    }
}

/// `lstat` of a path.
pub fn stat(path: &Path) -> io::Result<Meta> {
    let m = std::fs::symlink_metadata(path)?;
    Ok(Meta {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode() & 0o7777,
        acl: has_access_acl(path),
    })
}

/// Whether `path` has a POSIX access ACL (`system.posix_acl_access`).
fn has_access_acl(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(p) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid NUL-terminated strings; a null buffer of size 0 asks for the size only.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n > 0
}

/// Who besides root and `me` may change `path` (canonical), checking it and every
/// directory above it, nearest first; `None`: nobody. A path that cannot be examined is
/// left to whoever reads it next (and fails there).
pub fn changeable(
    path: &Path,
    me: u32,
    stat: &dyn Fn(&Path) -> io::Result<Meta>,
) -> Option<Finding> {
    let trusted = |uid: u32| uid == 0 || uid == me;
    let mut at = Some(path);
    let mut first = true;
    while let Some(p) = at {
        let Ok(m) = stat(p) else {
            return None;
        };
        // Above the path, a sticky directory lets only an entry's owner replace it.
        let sticky = !first && m.mode & 0o1000 != 0;
        let group_writes = m.mode & 0o020 != 0;
        let by = if !trusted(m.uid) {
            Some(By::Owner(m.uid))
        } else if sticky {
            None
        } else if m.mode & 0o002 != 0 {
            Some(By::Everyone)
        } else if group_writes && m.acl {
            Some(By::Acl)
        } else if group_writes && m.gid != 0 {
            Some(By::Group(m.gid))
        } else {
            None
        };
        if let Some(by) = by {
            return Some(Finding::Changeable {
                path: p.to_owned(),
                of: path.to_owned(),
                by,
            });
        }
        first = false;
        at = p.parent();
    }
    None
}

/// The findings for a policy directory (or single policy file) and the files read from
/// it: each must be changeable by nobody but root and `me`; files readable by everyone
/// are reported too. Paths are made canonical with `canonical` first.
pub fn policy_findings(
    dir: &Path,
    files: &[PathBuf],
    me: u32,
    canonical: &dyn Fn(&Path) -> io::Result<PathBuf>,
    stat: &dyn Fn(&Path) -> io::Result<Meta>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    let mut changes = |c: &Path, out: &mut Vec<Finding>| {
        if !seen.iter().any(|s: &PathBuf| s == c) {
            out.extend(changeable(c, me, stat));
            seen.push(c.to_owned());
        }
    };
    if let Ok(c) = canonical(dir) {
        changes(&c, &mut out);
    }
    for f in files {
        let Ok(c) = canonical(f) else {
            continue;
        };
        changes(&c, &mut out);
        if let Ok(m) = stat(&c)
            && m.mode & 0o004 != 0
        {
            out.push(Finding::Readable {
                path: c,
                mode: m.mode,
            });
        }
    }
    out
}

/// [`policy_findings`] on the real file system, for the daemon's own user.
pub fn check_policies(dir: &Path, files: &[PathBuf]) -> Vec<Finding> {
    policy_findings(
        dir,
        files,
        nix::unistd::geteuid().as_raw(),
        &|p| std::fs::canonicalize(p),
        &stat,
    )
}

/// Who besides root and the daemon's user may change the configuration file.
pub fn check_config(path: &Path) -> Option<Finding> {
    let c = std::fs::canonicalize(path).ok()?;
    changeable(&c, nix::unistd::geteuid().as_raw(), &stat)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A file system of (path → uid, gid, mode); `/` is root's 0755.
    fn fs(entries: &[(&str, u32, u32, u32)]) -> impl Fn(&Path) -> io::Result<Meta> {
        let mut m: HashMap<PathBuf, Meta> = entries
            .iter()
            .map(|&(p, uid, gid, mode)| {
                let meta = Meta {
                    uid,
                    gid,
                    mode: mode & 0o7777,
                    // Marked in the tests by a bit above the mode.
                    acl: mode & 0o10000 != 0,
                };
                (PathBuf::from(p), meta)
            })
            .collect();
        m.entry("/".into()).or_insert(Meta {
            uid: 0,
            gid: 0,
            mode: 0o755,
            acl: false,
        });
        move |p: &Path| {
            m.get(p)
                .copied()
                .ok_or_else(|| io::ErrorKind::NotFound.into())
        }
    }

    fn canonical(p: &Path) -> io::Result<PathBuf> {
        Ok(p.to_owned())
    }

    const ETC: (&str, u32, u32, u32) = ("/etc", 0, 0, 0o755);
    const DIR: (&str, u32, u32, u32) = ("/etc/portcullis", 0, 0, 0o755);

    fn findings(entries: &[(&str, u32, u32, u32)]) -> Vec<Finding> {
        let files: Vec<PathBuf> = entries
            .iter()
            .filter(|e| e.0.ends_with(".toml"))
            .map(|e| PathBuf::from(e.0))
            .collect();
        policy_findings(
            Path::new("/etc/portcullis/policies"),
            &files,
            0,
            &canonical,
            &fs(entries),
        )
    }

    const POLICIES: (&str, u32, u32, u32) = ("/etc/portcullis/policies", 0, 0, 0o750);

    #[test]
    fn root_owned_files_nobody_else_may_change_pass() {
        assert_eq!(
            findings(&[
                ETC,
                DIR,
                POLICIES,
                ("/etc/portcullis/policies/a.toml", 0, 0, 0o640)
            ]),
            []
        );
        // The root group may write; a sticky world-writable directory above is fine.
        let at_tmp = |dir_mode| {
            policy_findings(
                Path::new("/tmp/p"),
                &[PathBuf::from("/tmp/p/a.toml")],
                0,
                &canonical,
                &fs(&[
                    ("/tmp", 0, 0, dir_mode),
                    ("/tmp/p", 0, 0, 0o775),
                    ("/tmp/p/a.toml", 0, 0, 0o660),
                ]),
            )
        };
        assert_eq!(at_tmp(0o1777), []);
        let above = |of: &str| Finding::Changeable {
            path: "/tmp".into(),
            of: of.into(),
            by: By::Everyone,
        };
        assert_eq!(at_tmp(0o777), [above("/tmp/p"), above("/tmp/p/a.toml")]);
    }

    #[test]
    fn files_or_directories_others_may_change_are_errors() {
        let f = findings(&[
            ETC,
            DIR,
            POLICIES,
            ("/etc/portcullis/policies/a.toml", 1000, 1000, 0o600),
            ("/etc/portcullis/policies/b.toml", 0, 100, 0o620),
            ("/etc/portcullis/policies/c.toml", 0, 0, 0o602),
        ]);
        let by: Vec<(&str, By)> = f
            .iter()
            .map(|f| match f {
                Finding::Changeable { path, by, .. } => (path.to_str().unwrap_or(""), *by),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            by,
            [
                ("/etc/portcullis/policies/a.toml", By::Owner(1000)),
                ("/etc/portcullis/policies/b.toml", By::Group(100)),
                ("/etc/portcullis/policies/c.toml", By::Everyone),
            ]
        );
        assert!(f.iter().all(Finding::is_error));
        // The policy directory itself: a new file in it is a new policy, sticky or not.
        let f = findings(&[ETC, DIR, ("/etc/portcullis/policies", 0, 0, 0o1777)]);
        assert_eq!(
            f,
            [Finding::Changeable {
                path: "/etc/portcullis/policies".into(),
                of: "/etc/portcullis/policies".into(),
                by: By::Everyone
            }]
        );
        // A directory above, owned by a user: they may rename the whole tree away.
        let f = findings(&[
            ETC,
            ("/etc/portcullis", 1000, 1000, 0o755),
            POLICIES,
            ("/etc/portcullis/policies/a.toml", 0, 0, 0o600),
        ]);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f.iter().all(|f| matches!(
            f,
            Finding::Changeable { path, by: By::Owner(1000), .. } if path == Path::new("/etc/portcullis")
        )));
        assert_eq!(f[1].file(), Path::new("/etc/portcullis/policies/a.toml"));
        let shown = f[1].to_string();
        assert!(
            shown.starts_with("the directory /etc/portcullis above it is owned by uid 1000")
                && shown.contains("(chown root: /etc/portcullis)"),
            "{shown}"
        );
    }

    #[test]
    fn an_acl_that_grants_writing_is_no_root_group() {
        // Group root with write in the mask: some named entry may write.
        let f = findings(&[
            ETC,
            DIR,
            POLICIES,
            ("/etc/portcullis/policies/a.toml", 0, 0, 0o10660),
            ("/etc/portcullis/policies/b.toml", 0, 0, 0o10640),
        ]);
        assert_eq!(
            f,
            [Finding::Changeable {
                path: "/etc/portcullis/policies/a.toml".into(),
                of: "/etc/portcullis/policies/a.toml".into(),
                by: By::Acl
            }]
        );
        assert!(f[0].to_string().contains("setfacl -b"), "{}", f[0]);
    }

    #[test]
    fn the_daemons_own_user_is_trusted_like_root() {
        let f = policy_findings(
            Path::new("/home/dev/p"),
            &[PathBuf::from("/home/dev/p/a.toml")],
            1000,
            &canonical,
            &fs(&[
                ("/home", 0, 0, 0o755),
                ("/home/dev", 1000, 1000, 0o750),
                ("/home/dev/p", 1000, 1000, 0o700),
                ("/home/dev/p/a.toml", 1000, 1000, 0o600),
            ]),
        );
        assert_eq!(f, []);
    }

    #[test]
    fn policy_files_every_user_may_read_are_warnings() {
        let f = findings(&[
            ETC,
            DIR,
            POLICIES,
            ("/etc/portcullis/policies/a.toml", 0, 0, 0o644),
            ("/etc/portcullis/policies/b.toml", 0, 50, 0o640),
        ]);
        assert_eq!(
            f,
            [Finding::Readable {
                path: "/etc/portcullis/policies/a.toml".into(),
                mode: 0o644
            }]
        );
        assert!(!f[0].is_error());
        assert!(f[0].to_string().contains("chmod o-r"), "{}", f[0]);
    }

    #[test]
    fn paths_that_cannot_be_examined_are_left_to_the_reader() {
        assert_eq!(
            findings(&[ETC, DIR, POLICIES]).len(),
            0,
            "no files listed, nothing found"
        );
        let f = policy_findings(
            Path::new("/nowhere"),
            &[],
            0,
            &|_| Err(io::ErrorKind::NotFound.into()),
            &fs(&[]),
        );
        assert_eq!(f, []);
    }

    /// A POSIX access ACL (the kernel's xattr form): owner rw, user `uid` rw, group r,
    /// mask rw, others nothing.
    fn set_acl_granting(path: &Path, uid: u32) {
        use std::os::unix::ffi::OsStrExt as _;
        let undefined = u32::MAX;
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 6u16, undefined),
            (0x02, 6, uid),
            (0x04, 4, undefined),
            (0x10, 6, undefined),
            (0x20, 0, undefined),
        ] {
            v.extend(tag.to_le_bytes());
            v.extend(perm.to_le_bytes());
            v.extend(id.to_le_bytes());
        }
        let p = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated strings and a buffer of the given length.
        let r = unsafe {
            libc::setxattr(
                p.as_ptr(),
                c"system.posix_acl_access".as_ptr(),
                v.as_ptr().cast(),
                v.len(),
                0,
            )
        };
        assert_eq!(r, 0, "setting an ACL: {}", io::Error::last_os_error());
    }

    #[test]
    fn an_acl_on_the_real_file_system_is_seen() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "").expect("write");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .expect("chmod");
        assert_eq!(check_policies(dir.path(), std::slice::from_ref(&p)), []);
        set_acl_granting(&p, 65534);
        let c = std::fs::canonicalize(&p).expect("canonical");
        assert_eq!(
            check_policies(dir.path(), std::slice::from_ref(&p)),
            [Finding::Changeable {
                path: c.clone(),
                of: c,
                by: By::Acl
            }]
        );
    }

    #[test]
    fn the_real_file_system_is_read_without_following_links() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "").expect("write");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o646))
            .expect("chmod");
        let f = check_policies(dir.path(), std::slice::from_ref(&p));
        let c = std::fs::canonicalize(&p).expect("canonical");
        assert!(
            f.contains(&Finding::Changeable {
                path: c.clone(),
                of: c.clone(),
                by: By::Everyone
            }),
            "{f:?}"
        );
        assert!(
            f.contains(&Finding::Readable {
                path: c,
                mode: 0o646
            }),
            "{f:?}"
        );
    }
}
