//! Byte relay between the client and the upstream, with TCP semantics carried across:
//! a FIN from one side becomes a `shutdown(SHUT_WR)` on the other (half-close), and a reset
//! or error on one side becomes a reset on the other (`SO_LINGER` 0 then close).

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use crate::protocol::{End, Outcome, Traffic};

/// Per-direction buffer. Bounded memory per connection: 2 × this.
const BUF: usize = 16 * 1024;

/// Which side an I/O error happened on.
enum Side {
    Client,
    Upstream,
}

/// Makes the next close of `s` send a reset instead of a FIN.
pub fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

async fn pump<R, W>(
    mut r: R,
    mut w: W,
    counter: &AtomicU64,
    read_side: fn() -> Side,
    write_side: fn() -> Side,
) -> Result<(), (Side, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await.map_err(|e| (read_side(), e))?;
        if n == 0 {
            // EOF: pass the half-close on; the other direction keeps flowing.
            return w.shutdown().await.map_err(|e| (write_side(), e));
        }
        w.write_all(&buf[..n])
            .await
            .map_err(|e| (write_side(), e))?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Relays until both directions are closed, one side fails, or shutdown is signalled.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    traffic: &Traffic,
    shutdown: &CancellationToken,
) -> Outcome {
    let failure = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let up = pump(
            cr,
            uw,
            &traffic.to_upstream,
            || Side::Client,
            || Side::Upstream,
        );
        let down = pump(
            ur,
            cw,
            &traffic.to_client,
            || Side::Upstream,
            || Side::Client,
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(e) => break Some(e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(e) => break Some(e),
                },
                () = shutdown.cancelled() => {
                    return Outcome::new(End::Shutdown, None);
                }
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    match failure {
        None => Outcome::new(End::Closed, None),
        Some((Side::Client, e)) => {
            reset(upstream);
            Outcome::new(End::ClientReset, Some(e.to_string()))
        }
        Some((Side::Upstream, e)) => {
            reset(client);
            Outcome::new(End::UpstreamReset, Some(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of real TCP sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        (a, b)
    }

    #[tokio::test]
    async fn half_close_propagates_and_bytes_are_counted() {
        let (mut client, mut proxy_client) = pair().await;
        let (mut proxy_up, mut server) = pair().await;
        let traffic = Traffic::default();
        let stop = CancellationToken::new();
        let relay = relay(&mut proxy_client, &mut proxy_up, &traffic, &stop);
        let peers = async {
            client.write_all(b"hello").await.expect("write");
            client.shutdown().await.expect("half-close");
            let mut got = Vec::new();
            server
                .read_to_end(&mut got)
                .await
                .expect("server reads to EOF");
            assert_eq!(got, b"hello");
            // The server can still answer after the client's FIN.
            server.write_all(b"world!").await.expect("write");
            server.shutdown().await.expect("close");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("client reads");
            assert_eq!(back, b"world!");
        };
        let (outcome, ()) = tokio::join!(relay, peers);
        assert_eq!(outcome.end, End::Closed);
        assert_eq!(traffic.snapshot(), (5, 6));
    }

    #[tokio::test]
    async fn a_reset_crosses_over() {
        let (client, mut proxy_client) = pair().await;
        let (mut proxy_up, mut server) = pair().await;
        let traffic = Traffic::default();
        let stop = CancellationToken::new();
        reset(&client);
        drop(client);
        let outcome = relay(&mut proxy_client, &mut proxy_up, &traffic, &stop).await;
        assert_eq!(outcome.end, End::ClientReset);
        drop(proxy_up);
        let mut buf = [0u8; 1];
        let err = server
            .read(&mut buf)
            .await
            .expect_err("server sees a reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn shutdown_stops_the_relay() {
        let (_client, mut proxy_client) = pair().await;
        let (mut proxy_up, _server) = pair().await;
        let traffic = Traffic::default();
        let stop = CancellationToken::new();
        stop.cancel();
        let outcome = relay(&mut proxy_client, &mut proxy_up, &traffic, &stop).await;
        assert_eq!(outcome.end, End::Shutdown);
    }
}
