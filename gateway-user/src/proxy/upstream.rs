//! Connections from the proxy to the original destination. Each carries the upstream mark,
//! which the eBPF programs recognise and never redirect: no loops, even when the daemon
//! runs inside a protected cgroup or as a protected uid.

use std::{net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot create a socket for {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set SO_MARK {mark:#x} on the upstream socket: {source} (needs CAP_NET_ADMIN)")]
    Mark { mark: u32, source: std::io::Error },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: no answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Where and how to connect upstream.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub mark: u32,
    pub timeout: Duration,
    /// Target name for the connect-time metric; `None` for side connections (catalog,
    /// cancel) that are not a session's own.
    pub target: Option<String>,
}

impl Upstream {
    pub async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        let addr = self.addr;
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )
        .map_err(|source| UpstreamError::Socket { addr, source })?;
        socket
            .set_mark(self.mark)
            .map_err(|source| UpstreamError::Mark {
                mark: self.mark,
                source,
            })?;
        socket
            .set_tcp_nodelay(true)
            .map_err(|source| UpstreamError::Socket { addr, source })?;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        let began = std::time::Instant::now();
        match tokio::time::timeout(self.timeout, socket.connect(addr)).await {
            Ok(Ok(s)) => {
                if let Some(target) = &self.target {
                    crate::metrics::get()
                        .upstream_connect_seconds
                        .with_label_values(&[target.as_str()])
                        .observe(began.elapsed().as_secs_f64());
                }
                Ok(s)
            }
            Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
            Err(_) => Err(UpstreamError::Timeout {
                addr,
                timeout: self.timeout,
            }),
        }
    }
}
