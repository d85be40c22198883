//! Arbitrary text into the SQL classifier: never panics, always answers. And the shape
//! cache never answers differently from a fresh classification: a statement is classified
//! with its shape cached, and so is the statement the quick lexer would give the same key
//! (its pieces rejoined with other literals), which is what a cache hit would serve.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::policy::sql::{
    LexOptions, ShapeCache, classify, classify_with,
    quick::{self, Piece},
};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for opts in [
        LexOptions::default(),
        LexOptions {
            standard_conforming_strings: false,
            ..LexOptions::default()
        },
        LexOptions {
            multibyte_ascii: true,
            ..LexOptions::default()
        },
    ] {
        let fresh = classify(s, opts);
        let cache = ShapeCache::default();
        assert_eq!(
            classify_with(s, opts, Some(&cache)),
            fresh,
            "first sight of {s:?}"
        );
        assert_eq!(
            classify_with(s, opts, Some(&cache)),
            fresh,
            "second sight of {s:?}"
        );
        let Some(pieces) = quick::scan(s) else {
            continue;
        };
        let other: Vec<String> = pieces
            .iter()
            .map(|p| match p {
                Piece::Code(t) => (*t).to_owned(),
                Piece::Literal("s") => "'it''s'".to_owned(),
                Piece::Literal(_) => "12.5".to_owned(),
            })
            .collect();
        let other = other.join(" ");
        assert_eq!(
            quick::scan(&other).and_then(|p| quick::key(&p, true)),
            quick::key(&pieces, true),
            "{other:?} should have the shape of {s:?}"
        );
        assert_eq!(
            classify_with(&other, opts, Some(&cache)),
            classify(&other, opts),
            "{other:?} after {s:?}"
        );
    }
});
