//! A test OIDC issuer on loopback: a discovery document and a JWKS served over HTTP, signing
//! keys generated per run (RSA by `openssl genpkey`, P-256 and Ed25519 by ring), tokens
//! minted with chosen claims, headers and lifetimes, and keys rotated in on demand.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use ring::{
    rand::SystemRandom,
    signature::{self, KeyPair as _},
};
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A signing key and its public JWK.
pub enum Key {
    Rsa(String, signature::RsaKeyPair),
    Ec(String, signature::EcdsaKeyPair),
    Ed(String, signature::Ed25519KeyPair),
}

impl Key {
    /// RS256: a fresh 2048-bit key from `openssl genpkey` (ring cannot generate RSA keys).
    pub fn rsa(kid: &str) -> Self {
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .expect("openssl genpkey (apt install openssl)");
        assert!(out.status.success(), "openssl genpkey failed");
        // `genpkey -outform DER` writes the PKCS#1 RSAPrivateKey structure.
        let kp =
            signature::RsaKeyPair::from_der(&out.stdout).expect("RSA private key (PKCS#1 DER)");
        Self::Rsa(kid.into(), kp)
    }

    /// ES256.
    pub fn ec(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let der = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("P-256 key");
        let kp = signature::EcdsaKeyPair::from_pkcs8(alg, der.as_ref(), &rng).expect("P-256");
        Self::Ec(kid.into(), kp)
    }

    /// EdDSA (Ed25519).
    pub fn ed(kid: &str) -> Self {
        let der = signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        let kp = signature::Ed25519KeyPair::from_pkcs8(der.as_ref()).expect("Ed25519");
        Self::Ed(kid.into(), kp)
    }

    pub fn kid(&self) -> &str {
        match self {
            Self::Rsa(k, _) | Self::Ec(k, _) | Self::Ed(k, _) => k,
        }
    }

    pub fn alg(&self) -> &'static str {
        match self {
            Self::Rsa(..) => "RS256",
            Self::Ec(..) => "ES256",
            Self::Ed(..) => "EdDSA",
        }
    }

    pub fn jwk(&self) -> Value {
        match self {
            Self::Rsa(kid, kp) => {
                let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(kp.public());
                json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(&c.n), "e": b64(&c.e)})
            }
            Self::Ec(kid, kp) => {
                let p = kp.public_key().as_ref();
                json!({"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
                       "x": b64(&p[1..33]), "y": b64(&p[33..65])})
            }
            Self::Ed(kid, kp) => {
                json!({"kty": "OKP", "kid": kid, "use": "sig", "alg": "EdDSA", "crv": "Ed25519",
                       "x": b64(kp.public_key().as_ref())})
            }
        }
    }

    /// The RSA public key as the bytes an algorithm-confusion attacker would use as an
    /// HMAC secret (the modulus).
    pub fn public_bytes(&self) -> Vec<u8> {
        match self {
            Self::Rsa(_, kp) => kp.public().as_ref().to_vec(),
            Self::Ec(_, kp) => kp.public_key().as_ref().to_vec(),
            Self::Ed(_, kp) => kp.public_key().as_ref().to_vec(),
        }
    }

    /// The signature of `msg` with this key's algorithm.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Self::Rsa(_, kp) => {
                let mut sig = vec![0; kp.public().modulus_len()];
                kp.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .expect("sign");
                sig
            }
            Self::Ec(_, kp) => kp.sign(&rng, msg).expect("sign").as_ref().to_vec(),
            Self::Ed(_, kp) => kp.sign(msg).as_ref().to_vec(),
        }
    }

    /// A token with these claims, signed by this key.
    pub fn mint(&self, claims: &Value) -> String {
        let header = json!({"alg": self.alg(), "kid": self.kid(), "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }
}

/// `header.payload.signature` with any header and a signature of your making.
pub fn raw_token(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

/// HMAC-SHA256 with `secret`.
pub fn hs256(secret: &[u8], msg: &[u8]) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::sign(&k, msg).as_ref().to_vec()
}

/// A token with its payload replaced, the signature kept.
pub fn tampered(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    )
}

/// The issuer: serves its discovery document and key set until dropped.
pub struct Issuer {
    pub url: String,
    jwks: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicU64>,
}

impl Issuer {
    pub fn start(keys: &[&Key]) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the issuer");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let jwks = Arc::new(Mutex::new(keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()));
        let fetches = Arc::new(AtomicU64::new(0));
        let (u, j, f) = (url.clone(), jwks.clone(), fetches.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/.well-known/openid-configuration" => (
                        "200 OK",
                        json!({
                            "issuer": u,
                            "jwks_uri": format!("{u}/jwks"),
                            "response_types_supported": ["id_token"],
                            "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
                        })
                        .to_string(),
                    ),
                    "/jwks" => {
                        f.fetch_add(1, Ordering::SeqCst);
                        let keys = j.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        ("200 OK", json!({ "keys": keys }).to_string())
                    }
                    _ => ("404 Not Found", "{}".to_owned()),
                };
                let _ = write!(
                    s,
                    "HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { url, jwks, fetches }
    }

    /// Adds a key to the published set (a rotation).
    pub fn publish(&self, key: &Key) {
        self.jwks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key.jwk());
    }

    /// Times the key set was fetched.
    pub fn jwks_fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Claims for a token of this issuer: `sub`, `aud`, `groups`, issued now, valid for
    /// `lifetime` seconds.
    pub fn claims(&self, sub: &str, aud: &str, groups: &[&str], lifetime: i64) -> Value {
        let now = now();
        json!({
            "iss": self.url,
            "sub": sub,
            "aud": aud,
            "email": format!("{sub}@example.com"),
            "groups": groups,
            "iat": now,
            "exp": now + lifetime,
        })
    }
}
