//! An issuer's signing keys: discovery (`/.well-known/openid-configuration` → `jwks_uri`),
//! the JWKS fetched and cached for `jwks_cache`, fetched again early when a token names a
//! key id the set does not have (at most once per `refetch_interval`, so a flood of tokens
//! with made-up key ids cannot turn into a flood of requests to the issuer).
//!
//! One fetch at a time per issuer (the state's mutex is held across it); every fetch is
//! bounded in time and size. A failed refresh keeps the keys already held.
//!
//! Discovery reads only `issuer` and `jwks_uri`: `openidconnect`'s provider-metadata type
//! requires the fields of a login provider (`authorization_endpoint`, ...), which workload
//! issuers such as a Kubernetes API server do not publish. The key set itself is parsed into
//! `openidconnect`'s JWKS type, which the verifier uses.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use openidconnect::core::CoreJsonWebKeySet;
use serde::Deserialize;

use crate::{
    config::OidcIssuer,
    http_client::{self, Url},
};

/// Largest discovery document or key set accepted.
pub const MAX_DOCUMENT: usize = 1 << 20;
/// Time for one fetch (connect, TLS, request, answer).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

pub struct KeySource {
    cfg: OidcIssuer,
    tls: Arc<rustls::ClientConfig>,
    state: tokio::sync::Mutex<State>,
    /// What `status` shows, readable without waiting for a fetch in progress.
    summary: std::sync::Mutex<KeySummary>,
}

/// An issuer's keys as `portcullis status` shows them.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct KeySummary {
    pub issuer: String,
    pub audience: String,
    /// Key ids held (`-` for a key without one).
    pub key_ids: Vec<String>,
    /// Key-set fetches made since the daemon started.
    pub fetches: u64,
    /// Unix seconds of the last successful fetch.
    pub fetched_at: Option<u64>,
    /// The last fetch's error, until a fetch succeeds.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct State {
    jwks_url: Option<Url>,
    keys: Option<Arc<CoreJsonWebKeySet>>,
    fetched: Option<Instant>,
    /// Last fetch caused by an unknown key id.
    refetched: Option<Instant>,
    /// Last failed refresh (the keys held are used meanwhile).
    failed: Option<Instant>,
}

/// What an early fetch for an unknown key id did.
pub enum Refetch {
    Fetched(Arc<CoreJsonWebKeySet>),
    /// The last one was too recent; `Duration` until the next is allowed.
    Limited(Duration),
}

impl KeySource {
    pub fn new(cfg: OidcIssuer) -> Result<Self, String> {
        let tls = http_client::tls_config(cfg.ca_file.as_deref())?;
        let jwks_url = cfg
            .jwks_uri
            .as_deref()
            .map(http_client::parse_url)
            .transpose()?;
        let summary = std::sync::Mutex::new(KeySummary {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            ..KeySummary::default()
        });
        Ok(Self {
            summary,
            cfg,
            tls: Arc::new(tls),
            state: tokio::sync::Mutex::new(State {
                jwks_url,
                ..State::default()
            }),
        })
    }

    pub fn issuer(&self) -> &OidcIssuer {
        &self.cfg
    }

    pub fn summary(&self) -> KeySummary {
        self.summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The keys, fetched when there are none yet or they are older than `jwks_cache`.
    pub async fn current(&self) -> Result<Arc<CoreJsonWebKeySet>, String> {
        let mut st = self.state.lock().await;
        let fresh = st
            .fetched
            .is_some_and(|at| at.elapsed() < self.cfg.jwks_cache)
            || st
                .failed
                .is_some_and(|at| at.elapsed() < self.cfg.refetch_interval);
        if fresh && let Some(keys) = &st.keys {
            return Ok(keys.clone());
        }
        match self.fetch(&mut st).await {
            Ok(keys) => Ok(keys),
            Err(e) => match st.keys.clone() {
                Some(old) => {
                    tracing::warn!(oidc.issuer = %self.cfg.issuer, error = %e, "refreshing the issuer's keys failed; using the keys held");
                    // Try again after a refetch interval, not at every token.
                    st.failed = Some(Instant::now());
                    Ok(old)
                }
                None => Err(e),
            },
        }
    }

    /// A fetch because a token names a key id the set does not have, rate-limited.
    pub async fn refetch_for_unknown_key(&self) -> Result<Refetch, String> {
        let mut st = self.state.lock().await;
        if let Some(at) = st.refetched
            && at.elapsed() < self.cfg.refetch_interval
        {
            return Ok(Refetch::Limited(self.cfg.refetch_interval - at.elapsed()));
        }
        st.refetched = Some(Instant::now());
        self.fetch(&mut st).await.map(Refetch::Fetched)
    }

    async fn fetch(&self, st: &mut State) -> Result<Arc<CoreJsonWebKeySet>, String> {
        let got = tokio::time::timeout(FETCH_TIMEOUT, self.fetch_inner(st))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")));
        let mut summary = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        summary.fetches += 1;
        let keys = match got {
            Ok(k) => Arc::new(k),
            Err(e) => {
                summary.last_error = Some(e.clone());
                return Err(e);
            }
        };
        summary.key_ids = keys
            .keys()
            .iter()
            .map(|k| {
                openidconnect::JsonWebKey::key_id(k)
                    .map_or_else(|| "-".to_owned(), |id| id.to_string())
            })
            .collect();
        summary.fetched_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        summary.last_error = None;
        drop(summary);
        tracing::info!(
            oidc.issuer = %self.cfg.issuer,
            keys = keys.keys().len(),
            "fetched the issuer's signing keys"
        );
        st.keys = Some(keys.clone());
        st.fetched = Some(Instant::now());
        st.failed = None;
        Ok(keys)
    }

    async fn fetch_inner(&self, st: &mut State) -> Result<CoreJsonWebKeySet, String> {
        let url = match &st.jwks_url {
            Some(u) => u.clone(),
            None => {
                let u = self.discover().await?;
                st.jwks_url = Some(u.clone());
                u
            }
        };
        let body = self.get_json(&url, "key set").await?;
        serde_json::from_slice(&body).map_err(|e| format!("the key set at {}: {e}", url.path))
    }

    async fn discover(&self) -> Result<Url, String> {
        let doc_url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let url = http_client::parse_url(&doc_url)?;
        let body = self.get_json(&url, "discovery document").await?;
        let d: Discovery = serde_json::from_slice(&body)
            .map_err(|e| format!("the discovery document {doc_url}: {e}"))?;
        if d.issuer != self.cfg.issuer {
            return Err(format!(
                "the discovery document names issuer `{}`, not `{}`",
                d.issuer, self.cfg.issuer
            ));
        }
        let jwks = http_client::parse_url(&d.jwks_uri)?;
        if !jwks.tls_or_loopback() {
            return Err(format!(
                "jwks_uri {} is not https:// (http:// only on loopback)",
                d.jwks_uri
            ));
        }
        Ok(jwks)
    }

    async fn get_json(&self, url: &Url, what: &str) -> Result<Vec<u8>, String> {
        let (status, body) = http_client::get(url, &self.tls, MAX_DOCUMENT)
            .await
            .map_err(|e| format!("fetching the {what} from {}: {e}", url.host))?;
        if status != 200 {
            return Err(format!(
                "fetching the {what} from {}{}: HTTP {status}",
                url.host, url.path
            ));
        }
        Ok(body)
    }
}
