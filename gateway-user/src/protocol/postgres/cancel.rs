//! Query cancellation. A client cancels by opening a new connection to the server it
//! thinks it talks to and sending `CancelRequest` with the backend pid and key it got at
//! startup. That connection is intercepted like any other; the engine finds the server
//! the key belongs to and forwards the request there.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use tokio::io::AsyncWriteExt as _;

use super::codec::Startup;
use crate::proxy::upstream::Upstream;

/// Backend keys of live sessions → where their server is.
#[derive(Default)]
pub struct CancelMap {
    inner: Mutex<HashMap<(i32, Bytes), SocketAddr>>,
}

impl CancelMap {
    pub fn insert(&self, pid: i32, key: Bytes, server: SocketAddr) -> CancelGuard<'_> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((pid, key.clone()), server);
        CancelGuard {
            map: self,
            key: (pid, key),
        }
    }

    pub fn lookup(&self, pid: i32, key: &Bytes) -> Option<SocketAddr> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, key.clone()))
            .copied()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes a session's key when the session ends.
pub struct CancelGuard<'a> {
    map: &'a CancelMap,
    key: (i32, Bytes),
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.map
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Forwards a cancel request to the server that issued the key. Unknown keys are dropped
/// silently, as PostgreSQL itself answers nothing to cancel requests.
pub async fn forward(map: &Arc<CancelMap>, up: &Upstream, pid: i32, key: Bytes) -> bool {
    let Some(server) = map.lookup(pid, &key) else {
        tracing::info!(
            backend.pid = pid,
            "cancel request with an unknown key dropped"
        );
        return false;
    };
    let up = Upstream {
        addr: server,
        target: None,
        ..up.clone()
    };
    match up.connect().await {
        Ok(mut s) => {
            let msg = Startup::Cancel { pid, key }.encode();
            let _ = s.write_all(&msg).await;
            let _ = s.shutdown().await;
            tracing::info!(backend.pid = pid, server = %server, "cancel request forwarded");
            true
        }
        Err(e) => {
            tracing::warn!(backend.pid = pid, error = %e, "cannot forward a cancel request");
            false
        }
    }
}
