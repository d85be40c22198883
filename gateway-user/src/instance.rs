//! One daemon per state directory.
//!
//! The proxy's listening sockets are bound with `SO_REUSEPORT` (one per connection worker),
//! so a second daemon started by mistake would not fail to bind: it would share the
//! connections, replace the admin socket and rewrite the pinned maps. The first thing a
//! daemon does is therefore take an exclusive `flock` on `STATE_DIR/daemon.lock`; a second
//! one stops there, naming the pid that holds it. The kernel drops the lock when the
//! holder exits, however it exits (SIGKILL included), so a stale file never blocks a start.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "another portcullis daemon{} holds {path}: stop it first (one daemon per state_dir)",
        holder.as_deref().map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Running {
        path: PathBuf,
        holder: Option<String>,
    },
    #[error("cannot lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Held while the daemon runs; dropping it (or exiting) releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    _file: fs::File,
}

/// Takes the lock of `state_dir` (created 0700 if missing) and writes our pid into it.
pub fn lock(state_dir: &Path) -> Result<InstanceLock, InstanceError> {
    let path = state_dir.join("daemon.lock");
    let io_err = |source| InstanceError::Io {
        path: path.clone(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io_err)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let holder = fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty());
            return Err(InstanceError::Running { path, holder });
        }
        return Err(io_err(e));
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(io_err)?;
    Ok(InstanceLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("pc-instance-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = lock(&dir.join("state")).expect("first lock");
        assert_eq!(
            fs::read_to_string(dir.join("state/daemon.lock")).expect("pid file"),
            format!("{}\n", std::process::id())
        );
        // flock locks belong to the open file description: a second open is a second
        // holder, even in the same process.
        match lock(&dir.join("state")) {
            Err(InstanceError::Running { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id().to_string()));
            }
            other => panic!("expected Running, got {other:?}"),
        }
        drop(first);
        lock(&dir.join("state")).expect("free again");
        let _ = fs::remove_dir_all(&dir);
    }
}
