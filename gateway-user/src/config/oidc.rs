//! `[[oidc]]` (trusted token issuers, their bindings) and the token keys of PostgreSQL
//! targets: the file model, the validated form and the checks between them. Reference:
//! `docs/identity.md`.

use std::{path::PathBuf, time::Duration as StdDuration};

use serde::Deserialize;
use toml::Spanned;

use super::{Checker, Duration};

/// Signature algorithms a token may use. Symmetric (`HS*`) and `none` are never accepted:
/// a shared secret cannot prove who minted a token.
pub const ALGORITHMS: [&str; 10] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
];
/// Accepted when `algorithms` is not given.
pub const DEFAULT_ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];

/// `[[oidc]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcEntry {
    /// The issuer identifier: tokens' `iss` must equal it exactly.
    pub issuer: Spanned<String>,
    /// Tokens' `aud` must contain it.
    pub audience: String,
    /// Claim holding the groups: an array of strings or a space-separated string; a dotted
    /// path reaches into objects (`realm_access.roles`).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Further claims kept for policies (`oidc.claims.<name>`) and the audit record.
    #[serde(default)]
    pub claims: Vec<Spanned<String>>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway: Duration,
    /// Oldest token accepted, by its `iat`.
    #[serde(default = "default_max_age")]
    pub max_age: Duration,
    /// Accepted signature algorithms (default RS256, ES256, EdDSA).
    pub algorithms: Option<Vec<Spanned<String>>>,
    /// The key set's URL; default: `jwks_uri` of the issuer's discovery document.
    pub jwks_uri: Option<Spanned<String>>,
    /// How long fetched keys are used before they are fetched again.
    #[serde(default = "default_jwks_cache")]
    pub jwks_cache: Duration,
    /// Least time between two fetches caused by tokens signed with an unknown key id.
    #[serde(default = "default_refetch_interval")]
    pub refetch_interval: Duration,
    /// Extra CA certificates (PEM) for an `https` issuer with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Refuse tokens that no `[[oidc.binding]]` names.
    #[serde(default)]
    pub require_binding: bool,
    #[serde(default, rename = "binding")]
    pub bindings: Vec<Spanned<BindingEntry>>,
}

/// `[[oidc.binding]]`: tokens of these subjects only from these processes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingEntry {
    /// Token subject (glob).
    pub sub: Option<String>,
    /// Token email (glob).
    pub email: Option<String>,
    /// What the presenting process must be (all given must hold).
    pub bind: Spanned<ProcessMatch>,
}

fn default_groups_claim() -> String {
    "groups".into()
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_max_age() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_jwks_cache() -> Duration {
    Duration::from_secs(3600)
}
fn default_refetch_interval() -> Duration {
    Duration::from_secs(60)
}

/// A trusted issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcIssuer {
    pub issuer: String,
    pub audience: String,
    pub groups_claim: String,
    pub claims: Vec<String>,
    pub leeway: StdDuration,
    pub max_age: StdDuration,
    pub algorithms: Vec<String>,
    pub jwks_uri: Option<String>,
    pub jwks_cache: StdDuration,
    pub refetch_interval: StdDuration,
    pub ca_file: Option<PathBuf>,
    pub require_binding: bool,
    pub bindings: Vec<TokenBinding>,
}

impl OidcIssuer {
    /// An issuer with every optional setting at its default (as a `[[oidc]]` section that
    /// gives only `issuer` and `audience`).
    pub fn new(issuer: &str, audience: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            groups_claim: default_groups_claim(),
            claims: Vec::new(),
            leeway: default_leeway().get(),
            max_age: default_max_age().get(),
            algorithms: DEFAULT_ALGORITHMS.map(str::to_owned).to_vec(),
            jwks_uri: None,
            jwks_cache: default_jwks_cache().get(),
            refetch_interval: default_refetch_interval().get(),
            ca_file: None,
            require_binding: false,
            bindings: Vec::new(),
        }
    }
}

/// Tokens whose subject/email match may only come from a process matching `process`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBinding {
    pub sub: Option<String>,
    pub email: Option<String>,
    pub process: ProcessMatch,
}

/// Process attributes (all given must hold; strings are globs): `bind = { ... }` as written
/// is already the validated form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessMatch {
    pub agent: Option<String>,
    pub unit: Option<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
}

impl std::fmt::Display for ProcessMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (k, v) in [
            ("agent", &self.agent),
            ("unit", &self.unit),
            ("user", &self.user),
            ("exe", &self.exe),
            ("cgroup", &self.cgroup),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k} = {v:?}"));
            }
        }
        if let Some(uid) = self.uid {
            parts.push(format!("uid = {uid}"));
        }
        write!(f, "{{ {} }}", parts.join(", "))
    }
}

/// Whether a PostgreSQL target asks the agent for a token (inject mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenMode {
    /// No password is asked for: the agent is admitted by its process identity.
    Off,
    /// A password is asked for; a token is validated, anything else is ignored.
    Optional,
    /// The password must be a valid token.
    Required,
}

/// What happens at the first statement after the session's token expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenExpiry {
    /// The session ends with an error naming the expiry.
    EndSession,
    /// The session goes on (the token was checked when it began).
    Continue,
}

/// `http://` is accepted only for loopback issuers (tests, a local identity agent): keys
/// fetched in the clear from elsewhere could be replaced on the way.
fn check_url(c: &mut Checker<'_>, at: &Spanned<String>, what: &str) {
    match crate::http_client::parse_url(at.get_ref()) {
        Err(e) => c.at(at, format!("`{what}`: {e}")),
        Ok(u) if !u.tls_or_loopback() => c.at(
            at,
            format!("`{what}` must be https:// (http:// only for a loopback address)"),
        ),
        Ok(_) => {}
    }
}

pub(super) fn validate(c: &mut Checker<'_>, raw: &[OidcEntry]) -> Vec<OidcIssuer> {
    let mut out: Vec<OidcIssuer> = Vec::new();
    for e in raw {
        check_url(c, &e.issuer, "issuer");
        let issuer = e.issuer.get_ref().clone();
        if out.iter().any(|o| o.issuer == issuer) {
            c.at(&e.issuer, format!("issuer `{issuer}` is configured twice"));
        }
        if e.audience.is_empty() {
            c.at(&e.issuer, "`audience` must not be empty");
        }
        if let Some(j) = &e.jwks_uri {
            check_url(c, j, "jwks_uri");
        }
        let algorithms = match &e.algorithms {
            None => DEFAULT_ALGORITHMS.map(str::to_owned).to_vec(),
            Some(list) => {
                for a in list {
                    if !ALGORITHMS.contains(&a.get_ref().as_str()) {
                        c.at(
                            a,
                            format!(
                                "algorithm `{}` is not accepted; one of {} (never HS* or none)",
                                a.get_ref(),
                                ALGORITHMS.join(", ")
                            ),
                        );
                    }
                }
                if list.is_empty() {
                    c.at(&e.issuer, "`algorithms` must name at least one");
                }
                list.iter().map(|a| a.get_ref().clone()).collect()
            }
        };
        for claim in &e.claims {
            if claim.get_ref().is_empty() {
                c.at(claim, "an empty claim name");
            }
        }
        let bindings = e
            .bindings
            .iter()
            .map(|b| {
                let r = b.get_ref();
                if r.sub.is_none() && r.email.is_none() {
                    c.at(b, "a binding names the tokens it binds: `sub` or `email`");
                }
                let process = r.bind.get_ref().clone();
                if process == ProcessMatch::default() {
                    c.at(
                        &r.bind,
                        "`bind` names at least one of agent, unit, uid, user, exe, cgroup",
                    );
                }
                TokenBinding {
                    sub: r.sub.clone(),
                    email: r.email.clone(),
                    process,
                }
            })
            .collect();
        out.push(OidcIssuer {
            issuer,
            audience: e.audience.clone(),
            groups_claim: e.groups_claim.clone(),
            claims: e.claims.iter().map(|c| c.get_ref().clone()).collect(),
            leeway: e.leeway.get(),
            max_age: e.max_age.get(),
            algorithms,
            jwks_uri: e.jwks_uri.as_ref().map(|j| j.get_ref().clone()),
            jwks_cache: e.jwks_cache.get(),
            refetch_interval: e.refetch_interval.get(),
            ca_file: e.ca_file.clone(),
            require_binding: e.require_binding,
            bindings,
        });
    }
    out
}

/// The token keys of a target: `require_token`, `accept_token`, `token_expiry`.
pub(super) fn token_settings(
    c: &mut Checker<'_>,
    t: &super::file::TargetEntry,
    inject: bool,
    issuers: usize,
) -> (TokenMode, TokenExpiry) {
    let mode = match (&t.require_token, &t.accept_token) {
        (Some(r), _) if *r.get_ref() => TokenMode::Required,
        (_, Some(a)) if *a.get_ref() => TokenMode::Optional,
        _ => TokenMode::Off,
    };
    if mode != TokenMode::Off {
        let at = t.require_token.as_ref().or(t.accept_token.as_ref());
        if !inject && let Some(at) = at {
            c.at(
                at,
                "tokens are presented as the password, which only `auth = \"inject\"` reads",
            );
        }
        if issuers == 0
            && let Some(at) = at
        {
            c.at(
                at,
                "tokens need at least one trusted issuer: add an [[oidc]] section",
            );
        }
    }
    let expiry = match t.token_expiry.as_ref().map(|e| e.get_ref().as_str()) {
        None | Some("end_session") => TokenExpiry::EndSession,
        Some("continue") => TokenExpiry::Continue,
        Some(other) => {
            if let Some(e) = &t.token_expiry {
                c.at(
                    e,
                    format!("`token_expiry` is `end_session` or `continue`, not `{other}`"),
                );
            }
            TokenExpiry::EndSession
        }
    };
    (mode, expiry)
}
