//! Pure token logic: splitting a compact JWS, the checks that need no key (size, algorithm,
//! issuer lookup, times), claims → identity, and token bindings. No I/O, no clock: the
//! caller passes `now`.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Map, Value};

use super::{OidcIdentity, TokenError};
use crate::{
    config::{OidcIssuer, ProcessMatch},
    policy::{glob, model::Subject},
};

/// Longest token accepted (bytes of its compact form).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The JOSE header fields the checks read.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
}

/// A token split and decoded, not yet verified.
#[derive(Debug)]
pub struct Unverified {
    pub header: Header,
    pub payload: Map<String, Value>,
}

/// Whether a password looks like a compact JWS (three base64url parts, a JSON header).
pub fn looks_like_jwt(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts[0].starts_with("eyJ")
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, TokenError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|e| TokenError::Malformed(format!("the {what} is not base64url: {e}")))
}

/// Splits and decodes a token; checks its size and shape.
pub fn split(token: &str) -> Result<Unverified, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(format!(
            "{} bytes, more than the {MAX_TOKEN_LEN} accepted",
            token.len()
        )));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(TokenError::Malformed(format!(
            "{} dot-separated parts, a signed JWT has 3",
            parts.len()
        )));
    }
    let header: Value = serde_json::from_slice(&b64(parts[0], "header")?)
        .map_err(|e| TokenError::Malformed(format!("the header is not JSON: {e}")))?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| TokenError::Malformed("the header has no `alg`".into()))?
        .to_owned();
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
    let payload = match serde_json::from_slice(&b64(parts[1], "payload")?) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(TokenError::Malformed(
                "the payload is not a JSON object".into(),
            ));
        }
        Err(e) => {
            return Err(TokenError::Malformed(format!(
                "the payload is not JSON: {e}"
            )));
        }
    };
    Ok(Unverified {
        header: Header { alg, kid },
        payload,
    })
}

/// The issuer a token names, among the trusted ones (and its place among them).
pub fn issuer_of<'a>(
    t: &Unverified,
    issuers: impl IntoIterator<Item = &'a OidcIssuer>,
) -> Result<(usize, &'a OidcIssuer), TokenError> {
    let iss = t
        .payload
        .get("iss")
        .and_then(Value::as_str)
        .ok_or_else(|| TokenError::Malformed("no `iss` claim".into()))?;
    issuers
        .into_iter()
        .enumerate()
        .find(|(_, i)| i.issuer == iss)
        .ok_or_else(|| TokenError::UntrustedIssuer(iss.to_owned()))
}

/// `alg` must be one the issuer accepts; never `none` or a shared-secret algorithm.
pub fn check_alg(h: &Header, cfg: &OidcIssuer) -> Result<(), TokenError> {
    if h.alg.eq_ignore_ascii_case("none") {
        return Err(TokenError::Algorithm(
            "the token is unsigned (alg `none`)".into(),
        ));
    }
    if !cfg.algorithms.contains(&h.alg) {
        return Err(TokenError::Algorithm(format!(
            "algorithm `{}` is not accepted for {} (accepted: {})",
            h.alg,
            cfg.issuer,
            cfg.algorithms.join(", ")
        )));
    }
    Ok(())
}

fn seconds(p: &Map<String, Value>, claim: &str) -> Result<Option<i64>, TokenError> {
    match p.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| TokenError::Malformed(format!("`{claim}` is not a number"))),
    }
}

/// `exp`, `nbf`, `iat` against `now` (Unix seconds) with the issuer's leeway and maximum age.
pub fn check_times(p: &Map<String, Value>, cfg: &OidcIssuer, now: i64) -> Result<(), TokenError> {
    let leeway = cfg.leeway.as_secs() as i64;
    let exp = seconds(p, "exp")?.ok_or_else(|| TokenError::Malformed("no `exp` claim".into()))?;
    if now >= exp + leeway {
        return Err(TokenError::Expired(format!(
            "the token expired at {} ({}s ago)",
            rfc3339(exp),
            now - exp
        )));
    }
    if let Some(nbf) = seconds(p, "nbf")?
        && now + leeway < nbf
    {
        return Err(TokenError::NotYetValid(format!(
            "the token is not valid before {} ({}s from now)",
            rfc3339(nbf),
            nbf - now
        )));
    }
    let iat = seconds(p, "iat")?.ok_or_else(|| TokenError::Malformed("no `iat` claim".into()))?;
    if iat > now + leeway {
        return Err(TokenError::NotYetValid(format!(
            "the token was issued in the future ({})",
            rfc3339(iat)
        )));
    }
    let max_age = cfg.max_age.as_secs() as i64;
    if now - iat > max_age + leeway {
        return Err(TokenError::Expired(format!(
            "the token was issued {}s ago, more than max_age ({max_age}s)",
            now - iat
        )));
    }
    Ok(())
}

pub fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| unix.to_string())
}

/// A claim by dotted path (`realm_access.roles`). Claim names may contain dots themselves
/// (`kubernetes.io`), so every split is tried, longest name first.
fn claim<'a>(p: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = p.get(path) {
        return Some(v);
    }
    let dots: Vec<usize> = path.match_indices('.').map(|(i, _)| i).collect();
    dots.iter().rev().find_map(|&i| {
        p.get(&path[..i])
            .and_then(Value::as_object)
            .and_then(|inner| claim(inner, &path[i + 1..]))
    })
}

/// A claim's values as strings: a string (space-separated when `split`), a number or bool,
/// or an array of those.
fn strings(v: &Value, split: bool) -> Vec<String> {
    let one = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match v {
        Value::Array(a) => a.iter().filter_map(one).collect(),
        Value::String(s) if split => s.split_whitespace().map(str::to_owned).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// The identity a verified token's claims give.
pub fn identity(p: &Map<String, Value>, cfg: &OidcIssuer) -> Result<OidcIdentity, TokenError> {
    let sub = p
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TokenError::Malformed("no `sub` claim".into()))?
        .to_owned();
    let mut claims = BTreeMap::new();
    for name in &cfg.claims {
        if let Some(v) = claim(p, name) {
            claims.insert(name.clone(), strings(v, false));
        }
    }
    Ok(OidcIdentity {
        issuer: cfg.issuer.clone(),
        sub,
        email: p.get("email").and_then(Value::as_str).map(str::to_owned),
        groups: claim(p, &cfg.groups_claim)
            .map(|v| strings(v, true))
            .unwrap_or_default(),
        claims,
        expires_at: seconds(p, "exp")?.unwrap_or_default(),
        issued_at: seconds(p, "iat")?.unwrap_or_default(),
    })
}

fn glob_opt(pattern: &Option<String>, value: Option<&str>) -> bool {
    pattern
        .as_deref()
        .is_none_or(|p| value.is_some_and(|v| glob::matches(p, v)))
}

/// Whether a process is what a binding asks for.
pub fn process_matches(m: &ProcessMatch, s: &Subject) -> bool {
    glob_opt(&m.agent, Some(&s.agent))
        && glob_opt(&m.unit, s.unit.as_deref())
        && m.uid.is_none_or(|u| u == s.uid)
        && glob_opt(&m.user, s.user.as_deref())
        && glob_opt(&m.exe, s.exe.as_deref())
        && glob_opt(&m.cgroup, s.cgroup.as_deref())
}

/// Tokens named by a binding must come from a process one of those bindings allows.
pub fn check_binding(id: &OidcIdentity, cfg: &OidcIssuer, s: &Subject) -> Result<(), TokenError> {
    let named: Vec<_> = cfg
        .bindings
        .iter()
        .filter(|b| {
            (b.sub.is_some() || b.email.is_some())
                && glob_opt(&b.sub, Some(&id.sub))
                && glob_opt(&b.email, id.email.as_deref())
        })
        .collect();
    if named.is_empty() {
        return if cfg.require_binding {
            Err(TokenError::Binding(format!(
                "no binding names subject `{}` and {} requires one",
                id.sub, cfg.issuer
            )))
        } else {
            Ok(())
        };
    }
    if named.iter().any(|b| process_matches(&b.process, s)) {
        return Ok(());
    }
    Err(TokenError::Binding(format!(
        "the token of `{}` is bound to {}; it was presented by a process with uid {}, unit {}, exe {}, agent {}",
        id.sub,
        named
            .iter()
            .map(|b| b.process.to_string())
            .collect::<Vec<_>>()
            .join(" or "),
        s.uid,
        s.unit.as_deref().unwrap_or("-"),
        s.exe.as_deref().unwrap_or("-"),
        s.agent
    )))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::config::TokenBinding;

    fn cfg() -> OidcIssuer {
        OidcIssuer {
            claims: vec![
                "tenant".into(),
                "realm_access.roles".into(),
                "kubernetes.io.namespace".into(),
            ],
            max_age: Duration::from_secs(3600),
            ..OidcIssuer::new("https://idp.example", "portcullis")
        }
    }

    fn enc(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn payload(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn splitting() {
        let t = format!(
            "{}.{}.c2ln",
            enc(&json!({"alg": "RS256", "kid": "k1"})),
            enc(&json!({"iss": "https://idp.example", "sub": "a"}))
        );
        assert!(looks_like_jwt(&t));
        let u = split(&t).expect("split");
        assert_eq!(
            u.header,
            Header {
                alg: "RS256".into(),
                kid: Some("k1".into())
            }
        );
        assert_eq!(issuer_of(&u, &[cfg()]).expect("issuer").0, 0);
        assert!(matches!(
            issuer_of(&u, &[OidcIssuer {
                issuer: "https://other".into(),
                ..cfg()
            }]),
            Err(TokenError::UntrustedIssuer(i)) if i == "https://idp.example"
        ));
        for bad in ["", "a.b", "a.b.c.d", "!!.e30.x", "e30.!!.x"] {
            assert!(split(bad).is_err(), "{bad}");
            assert!(!looks_like_jwt(bad), "{bad}");
        }
        assert!(!looks_like_jwt("hunter2"));
        let huge = format!("eyJ{}", "a".repeat(MAX_TOKEN_LEN));
        assert!(matches!(split(&huge), Err(TokenError::Malformed(m)) if m.contains("more than")));
        let arr = format!("{}.{}.x", enc(&json!({"alg": "RS256"})), enc(&json!([1])));
        assert!(
            matches!(split(&arr), Err(TokenError::Malformed(m)) if m.contains("not a JSON object"))
        );
    }

    #[test]
    fn algorithms() {
        let c = cfg();
        let h = |alg: &str| Header {
            alg: alg.into(),
            kid: None,
        };
        assert!(check_alg(&h("RS256"), &c).is_ok());
        assert!(check_alg(&h("EdDSA"), &c).is_ok());
        assert!(
            matches!(check_alg(&h("none"), &c), Err(TokenError::Algorithm(m)) if m.contains("unsigned"))
        );
        assert!(matches!(
            check_alg(&h("NONE"), &c),
            Err(TokenError::Algorithm(_))
        ));
        assert!(
            matches!(check_alg(&h("HS256"), &c), Err(TokenError::Algorithm(m)) if m.contains("HS256"))
        );
        assert!(check_alg(&h("PS256"), &c).is_err());
    }

    #[test]
    fn times() {
        let c = cfg();
        let now = 1_800_000_000;
        let p = |exp: i64, iat: i64, nbf: Option<i64>| {
            let mut m = payload(json!({"exp": exp, "iat": iat}));
            if let Some(n) = nbf {
                m.insert("nbf".into(), json!(n));
            }
            m
        };
        assert!(check_times(&p(now + 60, now, None), &c, now).is_ok());
        // Leeway: 20 s past exp is still inside 30 s.
        assert!(check_times(&p(now - 20, now - 600, None), &c, now).is_ok());
        assert!(
            matches!(check_times(&p(now - 31, now - 600, None), &c, now), Err(TokenError::Expired(m)) if m.contains("expired at"))
        );
        assert!(matches!(
            check_times(&p(now + 600, now, Some(now + 120)), &c, now),
            Err(TokenError::NotYetValid(_))
        ));
        assert!(check_times(&p(now + 600, now, Some(now + 10)), &c, now).is_ok());
        assert!(
            matches!(check_times(&p(now + 600, now + 300, None), &c, now), Err(TokenError::NotYetValid(m)) if m.contains("future"))
        );
        assert!(
            matches!(check_times(&p(now + 600, now - 7200, None), &c, now), Err(TokenError::Expired(m)) if m.contains("max_age"))
        );
        let no_exp = payload(json!({"iat": now}));
        assert!(matches!(
            check_times(&no_exp, &c, now),
            Err(TokenError::Malformed(_))
        ));
        let text_exp = payload(json!({"iat": now, "exp": "soon"}));
        assert!(matches!(
            check_times(&text_exp, &c, now),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn claims_to_identity() {
        let c = cfg();
        let id = identity(
            &payload(json!({
                "sub": "agent-1", "email": "a@example.com", "groups": ["data-readers", "ops"],
                "tenant": "acme", "realm_access": {"roles": ["r1", "r2"]}, "exp": 10, "iat": 5,
                "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "bot"}},
            })),
            &c,
        )
        .expect("identity");
        assert_eq!(id.sub, "agent-1");
        assert_eq!(id.email.as_deref(), Some("a@example.com"));
        assert_eq!(id.groups, ["data-readers", "ops"]);
        assert_eq!(id.claims["tenant"], ["acme"]);
        assert_eq!(id.claims["realm_access.roles"], ["r1", "r2"]);
        assert_eq!(id.claims["kubernetes.io.namespace"], ["agents"]);
        assert_eq!((id.expires_at, id.issued_at), (10, 5));
        // Space-separated groups (a `scope`-style claim).
        let spaced = identity(
            &payload(json!({"sub": "s", "grp": "a b  c"})),
            &OidcIssuer {
                groups_claim: "grp".into(),
                ..cfg()
            },
        )
        .expect("identity");
        assert_eq!(spaced.groups, ["a", "b", "c"]);
        assert!(identity(&payload(json!({"sub": ""})), &c).is_err());
        assert!(identity(&payload(json!({})), &c).is_err());
    }

    #[test]
    fn bindings() {
        let mut c = cfg();
        c.bindings = vec![TokenBinding {
            sub: Some("svc-*".into()),
            email: None,
            process: ProcessMatch {
                unit: Some("reporter.service".into()),
                uid: Some(1001),
                ..ProcessMatch::default()
            },
        }];
        let id = |sub: &str| OidcIdentity {
            issuer: c.issuer.clone(),
            sub: sub.into(),
            email: None,
            groups: vec![],
            claims: BTreeMap::new(),
            expires_at: 0,
            issued_at: 0,
        };
        let proc_ = |uid: u32, unit: &str| Subject {
            agent: "a".into(),
            uid,
            unit: Some(unit.into()),
            ..Subject::default()
        };
        assert!(check_binding(&id("svc-report"), &c, &proc_(1001, "reporter.service")).is_ok());
        let e = check_binding(&id("svc-report"), &c, &proc_(0, "reporter.service"))
            .expect_err("wrong uid");
        assert!(e.to_string().contains("uid = 1001"), "{e}");
        assert!(check_binding(&id("svc-report"), &c, &proc_(1001, "other.service")).is_err());
        // Unbound subjects pass, unless a binding is required.
        assert!(check_binding(&id("alice"), &c, &proc_(0, "x")).is_ok());
        c.require_binding = true;
        assert!(matches!(
            check_binding(&id("alice"), &c, &proc_(0, "x")),
            Err(TokenError::Binding(_))
        ));
    }
}
