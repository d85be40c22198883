//! Untrusted passwords into the OIDC token checks that run before any signature check:
//! splitting and decoding, issuer lookup, algorithm and time checks, claims → identity.
//! They must return errors, never panic or allocate without bound.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use portcullis::{config::OidcIssuer, oidc::claims};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = claims::looks_like_jwt(text);
    let Ok(t) = claims::split(text) else {
        return;
    };
    let iss = t.payload.get("iss").and_then(|v| v.as_str());
    let issuer = OidcIssuer {
        groups_claim: "a.b.c".into(),
        claims: vec!["x.y".into(), "groups".into()],
        max_age: Duration::from_secs(3600),
        ..OidcIssuer::new(iss.unwrap_or("https://idp.example"), "portcullis")
    };
    let _ = claims::issuer_of(&t, [&issuer]);
    let _ = claims::check_alg(&t.header, &issuer);
    let _ = claims::check_times(&t.payload, &issuer, 1_800_000_000);
    let _ = claims::identity(&t.payload, &issuer);
});
