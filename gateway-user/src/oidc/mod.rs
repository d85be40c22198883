//! Agent identity from OIDC tokens: validation of short-lived tokens against trusted
//! issuers, their claims as an identity, and bindings of tokens to processes.
//!
//! Independent of any protocol: the PostgreSQL engine hands it the password an agent sent;
//! the HTTP and Kubernetes engines will hand it `Authorization: Bearer` tokens.
//!
//! - [`claims`]: pure checks (shape, algorithm, issuer, times, claims → identity, bindings);
//! - [`keys`]: discovery and the issuer's key set, cached and fetched again on unknown key ids;
//! - [`Validator`]: both, with the signature, issuer and audience checked by the
//!   `openidconnect` crate's verifier.
//!
//! A token is never logged, recorded or kept: only the identity it proves.

pub mod claims;
pub mod keys;

use std::collections::BTreeMap;

use openidconnect::{
    Audience, ClientId, IssuerUrl, Nonce,
    core::{CoreIdToken, CoreIdTokenVerifier, CoreJsonWebKeySet, CoreJwsSigningAlgorithm},
};
use serde::Serialize;

use self::keys::{KeySource, Refetch};
use crate::{config::OidcIssuer, policy::model::Subject};

/// Who a verified token says the caller is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OidcIdentity {
    pub issuer: String,
    pub sub: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
    /// The issuer's configured extra claims, as strings.
    pub claims: BTreeMap<String, Vec<String>>,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `iat`, Unix seconds.
    pub issued_at: i64,
}

/// Hashes what policies can match, not the token's times: the decision cache's caller class
/// is then shared by every session of the same subject and claims, whatever token it used.
/// (Equal identities still hash equally, as `Hash` requires.)
impl std::hash::Hash for OidcIdentity {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.issuer.hash(h);
        self.sub.hash(h);
        self.email.hash(h);
        self.groups.hash(h);
        self.claims.hash(h);
    }
}

/// Why a token was refused. Messages name the check; they never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not a signed JWT: {0}")]
    Malformed(String),
    #[error("issuer `{0}` is not trusted (no [[oidc]] section names it)")]
    UntrustedIssuer(String),
    #[error("{0}")]
    Algorithm(String),
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    NotYetValid(String),
    #[error("wrong audience: {0}")]
    Audience(String),
    #[error("wrong issuer: {0}")]
    Issuer(String),
    #[error("signature: {0}")]
    Signature(String),
    #[error("cannot get the signing keys of {issuer}: {reason}")]
    Keys { issuer: String, reason: String },
    #[error("{0}")]
    Binding(String),
}

impl TokenError {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UntrustedIssuer(_) => "untrusted_issuer",
            Self::Algorithm(_) => "algorithm",
            Self::Expired(_) => "expired",
            Self::NotYetValid(_) => "not_yet_valid",
            Self::Audience(_) => "audience",
            Self::Issuer(_) => "issuer",
            Self::Signature(_) => "signature",
            Self::Keys { .. } => "keys_unavailable",
            Self::Binding(_) => "binding",
        }
    }
}

/// The trusted issuers of a daemon: one key source each, holding the issuer's settings.
pub struct Validator {
    sources: Vec<KeySource>,
}

impl Validator {
    pub fn new(issuers: &[OidcIssuer]) -> Result<Self, String> {
        let sources = issuers
            .iter()
            .map(|i| KeySource::new(i.clone()).map_err(|e| format!("[[oidc]] {}: {e}", i.issuer)))
            .collect::<Result<_, _>>()?;
        Ok(Self { sources })
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    fn issuers(&self) -> impl Iterator<Item = &OidcIssuer> {
        self.sources.iter().map(KeySource::issuer)
    }

    /// The clock skew tolerated for an issuer's tokens.
    pub fn leeway(&self, issuer: &str) -> Option<std::time::Duration> {
        self.issuers()
            .find(|i| i.issuer == issuer)
            .map(|i| i.leeway)
    }

    /// Fetches every issuer's keys once, so the first token does not wait for it. Failures
    /// are logged; validation fetches again when a token arrives.
    pub async fn prefetch(&self) {
        for s in &self.sources {
            if let Err(e) = s.current().await {
                tracing::warn!(oidc.issuer = %s.issuer().issuer, error = %e, "cannot fetch the issuer's signing keys yet");
            }
        }
    }

    /// Fetches every issuer's keys now: `(issuer, key ids or the error)`, for `doctor`.
    pub async fn probe(&self) -> Vec<(String, Result<Vec<String>, String>)> {
        let mut out = Vec::new();
        for s in &self.sources {
            let got = s.current().await.map(|_| s.summary().key_ids);
            out.push((s.issuer().issuer.clone(), got));
        }
        out
    }

    /// Each issuer's keys, for `portcullis status`.
    pub fn status(&self) -> Vec<keys::KeySummary> {
        self.sources.iter().map(KeySource::summary).collect()
    }

    /// Validates a token presented by the process `who`: shape, issuer, algorithm, times,
    /// signature and audience, then its binding. `now` is Unix seconds.
    pub async fn validate(
        &self,
        token: &str,
        who: &Subject,
        now: i64,
    ) -> Result<OidcIdentity, TokenError> {
        let t = claims::split(token)?;
        let (i, cfg) = claims::issuer_of(&t, self.issuers())?;
        claims::check_alg(&t.header, cfg)?;
        claims::check_times(&t.payload, cfg, now)?;
        let source = &self.sources[i];
        let keys_err = |reason: String| TokenError::Keys {
            issuer: cfg.issuer.clone(),
            reason,
        };
        let keys = source.current().await.map_err(keys_err)?;
        let wanted = t.header.kid.as_deref();
        let keys = if has_key(&keys, wanted) {
            keys
        } else {
            match source.refetch_for_unknown_key().await.map_err(keys_err)? {
                Refetch::Fetched(k) if has_key(&k, wanted) => k,
                Refetch::Fetched(_) => {
                    return Err(TokenError::Signature(format!(
                        "the issuer's key set has no key `{}`",
                        wanted.unwrap_or("(no kid)")
                    )));
                }
                Refetch::Limited(wait) => {
                    return Err(TokenError::Signature(format!(
                        "the issuer's key set has no key `{}` (fetched again at most every {:?}; next in {}s)",
                        wanted.unwrap_or("(no kid)"),
                        cfg.refetch_interval,
                        wait.as_secs() + 1
                    )));
                }
            }
        };
        verify(token, cfg, &keys, now)?;
        let id = claims::identity(&t.payload, cfg)?;
        claims::check_binding(&id, cfg, who)?;
        Ok(id)
    }
}

/// Whether the set has a key of that id (any key when the token names none).
fn has_key(keys: &CoreJsonWebKeySet, kid: Option<&str>) -> bool {
    use openidconnect::JsonWebKey as _;
    match kid {
        None => !keys.keys().is_empty(),
        Some(kid) => keys
            .keys()
            .iter()
            .any(|k| k.key_id().is_some_and(|id| id.as_str() == kid)),
    }
}

fn algorithm(name: &str) -> Option<CoreJwsSigningAlgorithm> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

/// Signature, issuer and audience by the `openidconnect` verifier (which also refuses
/// unsigned tokens, shared-secret algorithms and keys of the wrong type for `alg`).
fn verify(
    token: &str,
    cfg: &OidcIssuer,
    keys: &CoreJsonWebKeySet,
    now: i64,
) -> Result<(), TokenError> {
    use openidconnect::{ClaimsVerificationError as E, SignatureVerificationError as S};
    let parsed: CoreIdToken = token.parse().map_err(|e: serde_json::Error| {
        TokenError::Malformed(format!("the claims lack what a token must have: {e}"))
    })?;
    let issuer = IssuerUrl::new(cfg.issuer.clone())
        .map_err(|e| TokenError::Issuer(format!("{}: {e}", cfg.issuer)))?;
    // Times were checked with the leeway already; the verifier's own exp check gets the same.
    let at =
        chrono::DateTime::from_timestamp(now - cfg.leeway.as_secs() as i64, 0).unwrap_or_default();
    let verifier = CoreIdTokenVerifier::new_public_client(
        ClientId::new(cfg.audience.clone()),
        issuer,
        keys.clone(),
    )
    .set_allowed_algs(cfg.algorithms.iter().filter_map(|a| algorithm(a)))
    .allow_all_jose_types()
    .set_time_fn(move || at)
    .set_issue_time_verifier_fn(|_| Ok(()))
    .set_other_audience_verifier_fn(|_: &Audience| true);
    match parsed.claims(&verifier, |_: Option<&Nonce>| Ok(())) {
        Ok(_) => Ok(()),
        Err(E::InvalidAudience(m)) => Err(TokenError::Audience(m)),
        Err(E::InvalidIssuer(m)) => Err(TokenError::Issuer(m)),
        Err(E::Expired(m)) => Err(TokenError::Expired(m)),
        Err(E::SignatureVerification(S::CryptoError(_))) => Err(TokenError::Signature(
            "the signature does not match the token's content".into(),
        )),
        Err(E::SignatureVerification(S::NoMatchingKey)) => Err(TokenError::Signature(
            "no key of the issuer fits the token's key id and algorithm".into(),
        )),
        Err(E::SignatureVerification(S::DisallowedAlg(m) | S::UnsupportedAlg(m))) => {
            Err(TokenError::Algorithm(m))
        }
        Err(E::SignatureVerification(e)) => Err(TokenError::Signature(e.to_string())),
        Err(e) => Err(TokenError::Malformed(e.to_string())),
    }
}
