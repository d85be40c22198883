//! The PostgreSQL engine: terminates the client's protocol (and TLS), authenticates to the
//! server (relaying the client's exchange, or with credentials Portcullis holds), and relays
//! messages both ways, judging every statement on the way in and masking results on the
//! way out. See `docs/postgres.md`.
//!
//! - [`codec`], [`messages`]: sans-IO framing and the messages the engine reads;
//! - [`startup`], [`tls`], [`auth`], [`cancel`]: connection start, TLS, authentication,
//!   cancellation;
//! - [`expect`]: which client message each server response answers;
//! - [`catalog`], [`inband`]: what masking asks the catalog, on a connection of its own or
//!   the session's;
//! - [`session`]: the relay with enforcement;
//! - [`approval`]: the hook for statements held for a person.

pub mod approval;
pub mod auth;
pub mod cancel;
pub mod catalog;
pub mod codec;
pub mod expect;
pub mod inband;
pub mod listens;
pub mod messages;
pub mod params;
pub mod record;
pub mod results;
pub mod session;
pub mod startup;
pub mod stream;
pub mod tls;
pub mod withhold;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use self::{approval::Approver, cancel::CancelMap, codec::FrameError};
use super::{BoxFuture, Engine, Outcome, Session};
use crate::{
    config::{DaemonConfig, PgTarget},
    policy::PolicyStore,
    proxy::upstream::UpstreamError,
};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("the client closed the connection")]
    ClientGone,
    #[error("client I/O: {0}")]
    ClientIo(std::io::Error),
    #[error("client TLS handshake: {0}")]
    ClientTls(std::io::Error),
    #[error("client protocol violation: {0}")]
    ClientProtocol(FrameError),
    #[error("the client sent part of a message and then nothing for {0:?}")]
    ClientStalled(std::time::Duration),
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("server I/O: {0}")]
    ServerIo(std::io::Error),
    #[error("server TLS: {0}")]
    ServerTls(String),
    #[error("server protocol violation: {0}")]
    ServerProtocol(FrameError),
    #[error("authenticating to the server: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("the server refused the session: {0}")]
    ServerRefused(String),
    #[error("protocol state lost: {0}")]
    Desync(#[from] expect::Desync),
    #[error("TLS configuration: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Store(String),
}

/// A target's TLS client settings (`None`: plaintext).
type ClientTls = Option<Arc<rustls::ClientConfig>>;

/// State shared by every PostgreSQL session of a daemon.
pub struct PgShared {
    /// TLS for clients (`None` answers `N` to SSLRequest).
    pub client_tls: Option<Arc<rustls::ServerConfig>>,
    pub policy: Arc<PolicyStore>,
    pub cancels: Arc<CancelMap>,
    pub approver: Arc<dyn Approver>,
    /// The audit store: statements are recorded here before they are forwarded.
    pub store: Arc<crate::store::Store>,
    /// The install's masking key and strategies.
    pub masker: crate::masking::value::Masker,
    /// Catalog connections for masking.
    pub catalogs: catalog::Catalogs,
    /// Trusted OIDC issuers, for agents that present a token as their password (replaced
    /// whole when a reload changes `[[oidc]]`).
    pub tokens: Arc<arc_swap::ArcSwap<crate::oidc::Validator>>,
    /// (target, database role) pairs already warned about as superusers.
    warned_superuser: Mutex<std::collections::HashSet<(String, String)>>,
    upstream_tls: Mutex<HashMap<String, (PgTarget, ClientTls)>>,
}

impl PgShared {
    pub fn new(
        daemon: &DaemonConfig,
        policy: Arc<PolicyStore>,
        approver: Arc<dyn Approver>,
        store: Arc<crate::store::Store>,
        tokens: Arc<arc_swap::ArcSwap<crate::oidc::Validator>>,
    ) -> Result<Self, PgError> {
        Ok(Self {
            client_tls: Some(tls::server_config(daemon)?),
            policy,
            cancels: Arc::new(CancelMap::default()),
            approver,
            store,
            masker: crate::masking::value::Masker::load_or_create(&daemon.state_dir).map_err(
                |e| {
                    PgError::Config(format!(
                        "masking key in {}: {e}",
                        daemon.state_dir.display()
                    ))
                },
            )?,
            catalogs: catalog::Catalogs::default(),
            tokens,
            warned_superuser: Mutex::new(std::collections::HashSet::new()),
            upstream_tls: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a session whose database role is a superuser, and says so once per target
    /// and role: such an agent is one policy gap away from the server's files (`COPY ...
    /// PROGRAM`, `pg_read_file`), its configuration and every database on it.
    pub fn superuser_session(&self, target: &str, role: &str, agent: &str) {
        crate::metrics::get()
            .pg_superuser_sessions
            .with_label_values(&[target])
            .inc();
        let first = self
            .warned_superuser
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((target.to_owned(), role.to_owned()));
        if first {
            tracing::warn!(
                target.name = %target,
                db.user = %role,
                agent.name = %agent,
                "an agent's database role is a superuser: the policies are all that stands \
                 between it and the server's files, configuration and every database; give \
                 agents a role with only the privileges they need (see docs/postgres.md)"
            );
        }
    }

    /// The rustls client configuration of a target, built once per target settings.
    pub fn upstream_tls(
        &self,
        target: &str,
        pg: &PgTarget,
    ) -> Result<Option<Arc<rustls::ClientConfig>>, PgError> {
        let mut cache = self.upstream_tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((settings, cfg)) = cache.get(target)
            && settings == pg
        {
            return Ok(cfg.clone());
        }
        let cfg = tls::client_config(pg)?;
        cache.insert(target.to_owned(), (pg.clone(), cfg.clone()));
        Ok(cfg)
    }
}

pub struct PostgresEngine {
    pub shared: Arc<PgShared>,
}

impl Engine for PostgresEngine {
    fn serve(&self, s: Session) -> BoxFuture<Outcome> {
        Box::pin(session::run(self.shared.clone(), s))
    }
}
