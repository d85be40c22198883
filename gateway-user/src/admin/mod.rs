//! The admin API: newline-delimited JSON over the Unix socket `[admin].socket`, one request
//! and one response per connection. The socket is open to every local user (mode 0666);
//! each request is authorised by the caller's peer credentials (`SO_PEERCRED`), see
//! [`authz`].

pub mod authz;
pub mod client;
pub mod proto;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;

use self::proto::{MAX_REQUEST, Request, Response};
use crate::daemon::State;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create the admin socket {path}: {source}", path = path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the socket, replacing a stale one.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let l = UnixListener::bind(path).map_err(err)?;
    // Approvers and auditors are not root: every request is checked by peer credentials.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(l)
}

/// Admin connections served at once; more wait in the listen backlog. The socket is open to
/// every local user, so neither idle nor numerous callers may tie the daemon up.
const MAX_CONNECTIONS: usize = 64;
/// A request must arrive within this long.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn serve(listener: UnixListener, state: Arc<State>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let conn = tokio::select! {
            c = listener.accept() => c,
            () = shutdown.cancelled() => return,
        };
        match conn {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &state).await {
                        tracing::debug!(error = %e, "admin connection failed");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, state: &State) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let Ok(read) = read else {
        return Ok(());
    };
    let response = match read {
        Ok(0) => return Ok(()),
        Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => {
            Response::err("request too large")
        }
        Ok(_) => match serde_json::from_str::<Request>(line.trim_end()) {
            Err(e) => Response::err(format!("bad request: {e}")),
            Ok(req) => {
                let peer = authz::identify(cred.uid(), cred.gid(), cred.pid(), |uid, cg| {
                    state.agent_of(uid, cg)
                });
                state.answer(req, &peer).await
            }
        },
        Err(e) => Response::err(format!("cannot read request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}
