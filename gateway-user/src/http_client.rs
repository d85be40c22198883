//! A minimal outbound HTTP client for the daemon's few control-plane requests: webhook POSTs
//! and OIDC discovery / JWKS GETs. Never on the data path.
//!
//! Written by hand rather than pulling in an HTTP stack for two request shapes: one request
//! per connection (`Connection: close`). GETs are sent as HTTP/1.0, so a server never answers
//! with chunked transfer encoding and the body is everything up to the end of the stream;
//! the whole answer is capped before it is buffered. `https` uses rustls (ring) with the
//! system's CA certificates, plus a CA file where one is configured.

use std::{path::Path, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

/// `scheme://host[:port][/path]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Url {
    /// Whether the host is a loopback address or `localhost`.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// `https`, or `http` to a loopback address: where keys and documents may come from
    /// without being replaceable on the way.
    pub fn tls_or_loopback(&self) -> bool {
        self.tls || self.is_loopback()
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

pub fn parse_url(url: &str) -> Result<Url, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url}: not http:// or https://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(format!("{url}: credentials in the URL are not supported"));
    }
    let (host, port) = if let Some(h) = authority.strip_prefix('[') {
        let (h, after) = h
            .split_once(']')
            .ok_or_else(|| format!("{url}: bad IPv6 host"))?;
        let port = after.strip_prefix(':').map(str::parse::<u16>).transpose();
        (h.to_owned(), port.map_err(|e| format!("{url}: port: {e}"))?)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                Some(p.parse::<u16>().map_err(|e| format!("{url}: port: {e}"))?),
            ),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(format!("{url}: the path has spaces or control characters"));
    }
    Ok(Url {
        port: port.unwrap_or(if tls { 443 } else { 80 }),
        tls,
        host,
        path: path.to_owned(),
    })
}

/// A rustls client configuration trusting the system's CAs, and `extra_ca` (PEM) if given.
pub fn tls_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(path) = extra_ca {
        use rustls_pki_types::{CertificateDer, pem::PemObject as _};
        let certs =
            CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut added = 0;
        for c in certs {
            roots
                .add(c.map_err(|e| format!("{}: {e}", path.display()))?)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{}: no PEM certificate in it", path.display()));
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|_| unreachable!("ring supports the default versions"))
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// A connected stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(u: &Url, tls: &Arc<rustls::ClientConfig>) -> Result<Box<dyn Io>, String> {
    let tcp = TcpStream::connect((u.host.as_str(), u.port))
        .await
        .map_err(|e| format!("connect {}:{}: {e}", u.host, u.port))?;
    if !u.tls {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(u.host.clone())
        .map_err(|e| format!("{}: {e}", u.host))?;
    let s = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {}: {e}", u.host))?;
    Ok(Box::new(s))
}

/// One POST of a JSON body; returns the status code (the body is not read).
pub async fn post_json(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<u16, String> {
    let u = parse_url(url)?;
    let mut s = connect(&u, tls).await?;
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: portcullis/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        u.path,
        u.host_header(),
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body);
    s.write_all(&msg).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 || buf.len() > 8192 {
            return Err("no HTTP status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    status_of(&buf)
}

/// One GET; returns the status and the body. The answer (head and body) is capped at `cap`
/// bytes: a longer one is an error, never buffered whole.
pub async fn get(
    url: &Url,
    tls: &Arc<rustls::ClientConfig>,
    cap: usize,
) -> Result<(u16, Vec<u8>), String> {
    let mut s = connect(url, tls).await?;
    let head = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: portcullis/{}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        url.path,
        url.host_header(),
        env!("CARGO_PKG_VERSION"),
    );
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(8192.min(cap));
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if buf.len() + n > cap {
            return Err(format!("the answer is longer than {cap} bytes"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = status_of(&buf)?;
    let body_at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no end of headers")?
        + 4;
    let head = String::from_utf8_lossy(&buf[..body_at]).to_ascii_lowercase();
    if head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"))
    {
        return Err("chunked answer to an HTTP/1.0 request".into());
    }
    Ok((status, buf.split_off(body_at)))
}

fn status_of(buf: &[u8]) -> Result<u16, String> {
    let line = String::from_utf8_lossy(buf);
    let first = line.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    match (parts.next(), parts.next().and_then(|c| c.parse().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(format!("bad status line {first:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("https://hooks.slack.com/services/T/B/x"),
            Ok(Url {
                tls: true,
                host: "hooks.slack.com".into(),
                port: 443,
                path: "/services/T/B/x".into()
            })
        );
        assert_eq!(
            parse_url("http://127.0.0.1:9000").map(|u| (u.port, u.path)),
            Ok((9000, "/".into()))
        );
        let v6 = parse_url("http://[::1]:81/h").expect("v6");
        assert_eq!(
            (v6.host.as_str(), v6.host_header()),
            ("::1", "[::1]:81".into())
        );
        assert!(v6.is_loopback());
        assert!(
            !parse_url("https://login.example.com")
                .expect("u")
                .is_loopback()
        );
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("http://user:pw@x/").is_err());
        assert!(parse_url("http://x/a b").is_err());
    }

    async fn serve_once(answer: &'static [u8]) -> (Url, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = parse_url(&format!("http://{}/doc", l.local_addr().expect("addr"))).expect("url");
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(answer).await.expect("write");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (url, task)
    }

    #[tokio::test]
    async fn get_reads_the_body_to_the_end_and_caps_it() {
        let tls = Arc::new(tls_config(None).expect("tls"));
        let (url, server) =
            serve_once(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":1}").await;
        let (status, body) = get(&url, &tls, 1024).await.expect("get");
        assert_eq!((status, body.as_slice()), (200, b"{\"a\":1}".as_slice()));
        let req = server.await.expect("server");
        assert!(req.starts_with("GET /doc HTTP/1.0\r\n"), "{req}");

        let (url, _server) =
            serve_once(b"HTTP/1.0 200 OK\r\n\r\n0123456789012345678901234567890123456789").await;
        let e = get(&url, &tls, 32).await.expect_err("over the cap");
        assert!(e.contains("longer than 32"), "{e}");

        let (url, _server) = serve_once(b"garbage").await;
        assert!(get(&url, &tls, 1024).await.is_err());
    }
}
