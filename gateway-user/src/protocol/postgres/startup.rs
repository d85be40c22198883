//! The client's side of connection start: TLS negotiation (`SSLRequest`, direct TLS with
//! ALPN `postgresql`), `GSSENCRequest` (refused), `CancelRequest`, and the startup packet.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;

use super::{
    PgError,
    codec::{Startup, decode_startup},
    stream::Stream,
};

/// What the client wants.
pub enum Accepted {
    Session {
        client: Stream,
        version: i32,
        params: Vec<(String, String)>,
        /// Bytes the client sent after the startup packet, for the session to read first.
        leftover: BytesMut,
    },
    Cancel {
        pid: i32,
        key: bytes::Bytes,
    },
}

/// The first byte of a TLS ClientHello record.
const TLS_HANDSHAKE: u8 = 0x16;

async fn read_startup(s: &mut Stream, buf: &mut BytesMut) -> Result<Startup, PgError> {
    loop {
        if let Some(m) = decode_startup(buf).map_err(PgError::ClientProtocol)? {
            return Ok(m);
        }
        if s.read_buf(buf).await.map_err(PgError::ClientIo)? == 0 {
            return Err(PgError::ClientGone);
        }
    }
}

async fn tls_accept(
    tcp: TcpStream,
    tls: &Arc<rustls::ServerConfig>,
    direct: bool,
) -> Result<Stream, PgError> {
    let t = TlsAcceptor::from(tls.clone())
        .accept(tcp)
        .await
        .map_err(PgError::ClientTls)?;
    // Direct TLS must name the protocol, so that TLS to a PostgreSQL port cannot be
    // confused with another protocol (PostgreSQL 17 requires the same).
    if direct && t.get_ref().1.alpn_protocol() != Some(b"postgresql") {
        return Err(PgError::Refused(
            "direct TLS without ALPN \"postgresql\"".into(),
        ));
    }
    Ok(Stream::FromClient(Box::new(t)))
}

/// Negotiates with a client; the whole negotiation must finish within `timeout`.
pub async fn accept(
    tcp: TcpStream,
    tls: Option<&Arc<rustls::ServerConfig>>,
    timeout: std::time::Duration,
) -> Result<Accepted, PgError> {
    match tokio::time::timeout(timeout, negotiate(tcp, tls)).await {
        Ok(r) => r,
        Err(_) => Err(PgError::ClientStalled(timeout)),
    }
}

/// A FATAL ErrorResponse for a client that broke the protocol, sent on a best-effort basis.
pub async fn refuse<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, why: &str) {
    let f = super::messages::Notice {
        severity: "FATAL",
        code: "08P01",
        message: format!("portcullis: {why}"),
        detail: None,
        hint: None,
    }
    .error();
    let _ = w.write_all(&f.to_bytes()).await;
    let _ = w.shutdown().await;
}

async fn negotiate(
    tcp: TcpStream,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<Accepted, PgError> {
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await.map_err(PgError::ClientIo)?;
    if n == 0 {
        return Err(PgError::ClientGone);
    }
    let mut stream = if first[0] == TLS_HANDSHAKE {
        let tls = tls.ok_or_else(|| PgError::Refused("direct TLS but no TLS configured".into()))?;
        tls_accept(tcp, tls, true).await?
    } else {
        Stream::Plain(tcp)
    };
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let msg = match read_startup(&mut stream, &mut buf).await {
            Ok(m) => m,
            Err(PgError::ClientProtocol(e)) => {
                refuse(&mut stream, &format!("invalid startup packet: {e}")).await;
                return Err(PgError::ClientProtocol(e));
            }
            Err(e) => return Err(e),
        };
        match msg {
            Startup::SslRequest if !stream.is_tls() => {
                // Bytes after the SSLRequest would be read as if they came over TLS
                // (CVE-2021-23214): refuse them.
                if !buf.is_empty() {
                    return Err(PgError::Refused("data after SSLRequest".into()));
                }
                let Stream::Plain(mut tcp) = stream else {
                    unreachable!("checked not TLS")
                };
                match tls {
                    Some(tls) => {
                        tcp.write_all(b"S").await.map_err(PgError::ClientIo)?;
                        stream = tls_accept(tcp, tls, false).await?;
                    }
                    None => {
                        tcp.write_all(b"N").await.map_err(PgError::ClientIo)?;
                        stream = Stream::Plain(tcp);
                    }
                }
            }
            Startup::GssEncRequest if !stream.is_tls() => {
                if !buf.is_empty() {
                    return Err(PgError::Refused("data after GSSENCRequest".into()));
                }
                stream.write_all(b"N").await.map_err(PgError::ClientIo)?;
            }
            Startup::SslRequest | Startup::GssEncRequest => {
                return Err(PgError::Refused("encryption requested twice".into()));
            }
            Startup::Cancel { pid, key } => return Ok(Accepted::Cancel { pid, key }),
            Startup::Startup { version, params } => {
                return Ok(Accepted::Session {
                    client: stream,
                    version,
                    params,
                    leftover: buf,
                });
            }
        }
    }
}
