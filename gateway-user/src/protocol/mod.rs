//! Protocol engines: what the proxy does with an intercepted connection once it knows who
//! opened it and where it was going.
//!
//! An engine gets a [`Session`]: the client stream, the connection's context (agent, target,
//! identity, original destination), a connector for the upstream, byte counters and the
//! shutdown signal. It returns how the connection ended. The opaque TCP relay
//! ([`tcp::TcpEngine`]) is the first; the PostgreSQL engine implements the same trait.

pub mod postgres;
pub mod tcp;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Agent, Protocol, Target},
    proxy::{identity::Identity, upstream::Upstream},
};

/// Everything known about a connection before its first byte is relayed.
#[derive(Debug)]
pub struct ConnContext {
    /// Unique within this daemon's run; logged with every event of the connection.
    pub id: u64,
    /// The audit store's session id (unique across runs).
    pub session: i64,
    pub agent: Agent,
    pub target: Target,
    pub identity: Identity,
    /// The client's address as the proxy sees it (its local address).
    pub client_addr: SocketAddr,
    /// Where the client was connecting.
    pub original_dst: SocketAddr,
    pub started: SystemTime,
}

/// Bytes relayed, updated as they flow.
#[derive(Debug, Default)]
pub struct Traffic {
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
}

impl Traffic {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.to_upstream.load(Ordering::Relaxed),
            self.to_client.load(Ordering::Relaxed),
        )
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Both sides closed normally.
    Closed,
    /// The client reset or failed; the upstream was reset in turn.
    ClientReset,
    /// The upstream reset or failed; the client was reset in turn.
    UpstreamReset,
    /// The target could not be reached; the client was reset.
    UpstreamUnreachable,
    /// The daemon shut down.
    Shutdown,
    /// Refused before any statement ran (startup parameters, authentication).
    Refused,
    /// A protocol violation or lost protocol state; the connection was closed.
    ProtocolError,
    /// The OIDC token the session began with expired; the session was ended at the next
    /// statement.
    TokenExpired,
}

impl End {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::ClientReset => "client_reset",
            Self::UpstreamReset => "upstream_reset",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::Shutdown => "shutdown",
            Self::Refused => "refused",
            Self::ProtocolError => "protocol_error",
            Self::TokenExpired => "token_expired",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub end: End,
    /// The error behind an abnormal end.
    pub detail: Option<String>,
}

impl Outcome {
    pub fn new(end: End, detail: Option<String>) -> Self {
        Self { end, detail }
    }
}

/// One intercepted connection handed to an engine.
pub struct Session {
    pub client: TcpStream,
    pub ctx: Arc<ConnContext>,
    pub upstream: Upstream,
    pub traffic: Arc<Traffic>,
    pub shutdown: CancellationToken,
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A protocol engine.
pub trait Engine: Send + Sync + 'static {
    fn serve(&self, session: Session) -> BoxFuture<Outcome>;
}

/// The engines of a daemon, one per protocol, built once with their shared state.
#[derive(Clone)]
pub struct Engines {
    pub tcp: Arc<dyn Engine>,
    pub postgres: Arc<dyn Engine>,
}

impl Engines {
    pub fn get(&self, protocol: Protocol) -> &Arc<dyn Engine> {
        match protocol {
            Protocol::Tcp => &self.tcp,
            Protocol::Postgres => &self.postgres,
        }
    }
}
