//! Arbitrary text into the SQL classifier: never panics, always answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::policy::sql::{LexOptions, classify};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = classify(s, LexOptions::default());
        let _ = classify(s, LexOptions { standard_conforming_strings: false });
    }
});
