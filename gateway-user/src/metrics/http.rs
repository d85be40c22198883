//! The metrics endpoint: `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (every readiness check passes), over plain HTTP/1.1 on `[metrics].listen`.
//!
//! Off the data path: its own thread and single-threaded runtime, one request per
//! connection, requests capped at 8 KiB and 5 s. A slow or hostile scraper costs this
//! thread, never a proxied session.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::Snapshot;

/// What the endpoint asks the daemon.
pub trait Probe: Send + Sync + 'static {
    /// Values for the snapshot metrics.
    fn snapshot(&self) -> Snapshot;
    /// Each readiness check: its name and `Err(why)` when it fails.
    fn readiness(&self) -> Vec<(&'static str, Result<(), String>)>;
}

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves on a thread of its own. Returns the bound address.
pub fn serve(addr: SocketAddr, probe: Arc<dyn Probe>) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("portcullis-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "metrics endpoint: cannot start its runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "metrics endpoint: cannot listen");
                        return;
                    }
                };
                loop {
                    let Ok((conn, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    // One at a time: scrapes are rare, and snapshot counters are set and
                    // encoded without interleaving.
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, handle(conn, &*probe)).await;
                }
            });
        })?;
    Ok(local)
}

async fn handle(mut conn: TcpStream, probe: &dyn Probe) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() >= MAX_REQUEST {
            return respond(&mut conn, 431, "text/plain", b"request too large\n", false).await;
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut conn, 405, "text/plain", b"GET only\n", false).await;
    }
    let path = path.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let m = super::get();
            let mut snap = probe.snapshot();
            snap.ready = probe.readiness().iter().all(|(_, r)| r.is_ok());
            snap.apply(m);
            let body = m.encode();
            respond(
                &mut conn,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
                head_only,
            )
            .await
        }
        "/healthz" => respond(&mut conn, 200, "text/plain", b"ok\n", head_only).await,
        "/readyz" => {
            let checks = probe.readiness();
            let ok = checks.iter().all(|(_, r)| r.is_ok());
            let mut body = String::new();
            for (name, r) in &checks {
                match r {
                    Ok(()) => body.push_str(&format!("ok    {name}\n")),
                    Err(why) => body.push_str(&format!("FAIL  {name}: {why}\n")),
                }
            }
            respond(
                &mut conn,
                if ok { 200 } else { 503 },
                "text/plain",
                body.as_bytes(),
                head_only,
            )
            .await
        }
        _ => {
            respond(
                &mut conn,
                404,
                "text/plain",
                b"not found: /metrics, /healthz, /readyz\n",
                head_only,
            )
            .await
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn respond(
    conn: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    if !head_only {
        conn.write_all(body).await?;
    }
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);

    impl Probe for Fixed {
        fn snapshot(&self) -> Snapshot {
            Snapshot::default()
        }
        fn readiness(&self) -> Vec<(&'static str, Result<(), String>)> {
            vec![
                ("programs attached", Ok(())),
                (
                    "store writable",
                    if self.0 {
                        Ok(())
                    } else {
                        Err("disk full".into())
                    },
                ),
            ]
        }
    }

    fn get(addr: SocketAddr, req: &str) -> String {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        c.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("read");
        out
    }

    #[test]
    fn endpoints_answer_and_readiness_names_the_failing_check() {
        let up = serve("127.0.0.1:0".parse().expect("addr"), Arc::new(Fixed(true))).expect("serve");
        let down =
            serve("127.0.0.1:0".parse().expect("addr"), Arc::new(Fixed(false))).expect("serve");
        let r = get(up, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");
        let r = get(up, "GET /readyz HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = get(down, "GET /readyz HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("FAIL  store writable: disk full"), "{r}");
        let r = get(up, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.contains("portcullis_build_info"), "{r}");
        let r = get(up, "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        let r = get(up, "GET /nope HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let big = format!("GET /metrics HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(10_000));
        let r = get(up, &big);
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    }
}
