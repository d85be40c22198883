//! TLS on both legs, with rustls (ring provider).
//!
//! Client side: the daemon terminates TLS with a configured certificate, or one it
//! generates on first start into `<state_dir>/tls/` (self-signed, for `localhost`,
//! `127.0.0.1` and `::1`: the addresses redirected connections are accepted on). Clients with
//! `sslmode=prefer` or `require` work unchanged; `verify-ca`/`verify-full` clients need the
//! operator to configure a certificate their CA signed.
//!
//! Server side, per target: `disable`, `prefer` (TLS if the server offers it), `require`
//! (TLS, certificate not verified: libpq's `sslmode=require`), `verify-full` (verified
//! against `upstream_ca` and the server name).

use std::{
    fs,
    io::BufReader,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
};

use crate::config::{DaemonConfig, PgTarget, UpstreamTls};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {what} {path}: {source}", path = path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no certificate in {}", .0.display())]
    NoCertificate(PathBuf),
    #[error("no private key in {}", .0.display())]
    NoKey(PathBuf),
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("upstream CA {}: {why}", path.display())]
    Ca { path: PathBuf, why: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject as _;
    let pem = read(path, "read")?;
    let certs: Vec<_> = CertificateDer::pem_reader_iter(&mut BufReader::new(&pem[..]))
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls_pki_types::pem::PemObject as _;
    let pem = read(path, "read")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey(path.to_owned()))
}

/// The certificate and key paths: configured, or generated into the state directory.
pub fn server_identity(cfg: &DaemonConfig) -> Result<(PathBuf, PathBuf), TlsError> {
    if let (Some(c), Some(k)) = (&cfg.tls_cert, &cfg.tls_key) {
        return Ok((c.clone(), k.clone()));
    }
    let dir = cfg.state_dir.join("tls");
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Io { what, path, source }
    };
    fs::create_dir_all(&dir).map_err(err("create", &dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(err("chmod", &dir))?;
    let generated = rcgen::generate_simple_self_signed(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key)
        .map_err(err("write", &key))?;
    std::io::Write::write_all(&mut f, generated.signing_key.serialize_pem().as_bytes())
        .map_err(err("write", &key))?;
    fs::write(&cert, generated.cert.pem()).map_err(err("write", &cert))?;
    tracing::info!(cert = %cert.display(), "generated a TLS certificate for clients");
    Ok((cert, key))
}

/// rustls server configuration for clients, advertising ALPN `postgresql` (required by
/// direct TLS, harmless otherwise).
pub fn server_config(cfg: &DaemonConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert, k) = server_identity(cfg)?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs(&cert)?, key(&k)?)?;
    c.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(c))
}

/// Accepts any certificate: `prefer`/`require` encrypt without verifying, as libpq does.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// rustls client configuration for a target, `None` for `disable`.
pub fn client_config(t: &PgTarget) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let c = match t.upstream_tls {
        UpstreamTls::Disable => return Ok(None),
        UpstreamTls::Prefer | UpstreamTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth(),
        UpstreamTls::VerifyFull => {
            let path = t.upstream_ca.clone().unwrap_or_default();
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(&path)? {
                roots.add(c).map_err(|e| TlsError::Ca {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(c)))
}
