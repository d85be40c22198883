//! Result bytes through the masking code. An agent can store any value in a table and read
//! it back, so what the masking code parses is agent-controlled: DataRows in every type
//! class and format with every strategy, and COPY text and CSV data cut into arbitrary
//! pieces. Errors are fine; a panic is not, and neither is a masked DataRow that is no
//! longer valid protocol (its column count and lengths must still add up).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use portcullis::{
    masking::{
        detect::NAMES,
        plan::{ColumnPlan, Detection, ResultPlan},
        rows::{CopyMasker, mask_data_row},
        types::{TypeDef, Types},
        value::{Masker, TypeClass},
    },
    policy::{model::Strategy, sql::lineage::CopyFormat},
};

const CLASSES: [TypeClass; 8] = [
    TypeClass::Text,
    TypeClass::Json,
    TypeClass::Jsonb,
    TypeClass::Label,
    TypeClass::Bytes,
    TypeClass::Array(16400),
    TypeClass::Record,
    TypeClass::Other,
];

/// The database's own types the records and arrays may name: an enum, an array of it,
/// a composite and a domain over text.
fn types() -> Arc<Types> {
    let mut t = Types::default();
    for (oid, kind, element, base, send) in [
        (16400, b'e', 0, 0, None),
        (16401, b'b', 16400, 0, Some("array_send")),
        (16410, b'c', 0, 0, None),
        (16420, b'd', 0, 25, None),
    ] {
        t.learn(&TypeDef {
            oid,
            kind,
            element,
            base,
            send: send.map(String::from),
            fields: vec![23, 25, 16400],
        });
    }
    Arc::new(t)
}

fn strategy(b: u8) -> Option<Strategy> {
    match b % 6 {
        0 => None,
        1 => Some(Strategy::Redact { text: None }),
        2 => Some(Strategy::Redact {
            text: Some("***".into()),
        }),
        3 => Some(Strategy::Partial {
            keep: usize::from(b / 6 % 8),
        }),
        4 => Some(Strategy::Hash),
        _ => Some(Strategy::Null),
    }
}

/// Whether `row` is a DataRow body of `n` columns whose lengths use up every byte.
fn well_formed(row: &[u8], n: usize) -> bool {
    let Some((count, mut rest)) = row.split_first_chunk::<2>() else {
        return false;
    };
    if i16::from_be_bytes(*count) as usize != n {
        return false;
    }
    for _ in 0..n {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return false;
        };
        rest = match i32::from_be_bytes(*len) {
            -1 => tail,
            len if len >= 0 && tail.len() >= len as usize => &tail[len as usize..],
            _ => return false,
        };
    }
    rest.is_empty()
}

fuzz_target!(|data: &[u8]| {
    // Layout: column count, one byte per column (class, format, strategy), one byte for
    // the detectors, one for the COPY format; the rest is the result data.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 4 + 1);
    if rest.len() < n + 2 {
        return;
    }
    let (cfg, payload) = rest.split_at(n + 2);
    let columns: Vec<ColumnPlan> = cfg[..n]
        .iter()
        .map(|&b| {
            ColumnPlan::new(
                CLASSES[usize::from(b & 7)],
                b & 8 != 0,
                strategy(b >> 4).map(|s| (s, Arc::from("email"))),
            )
        })
        .collect();
    let d = cfg[n];
    let detection = (d & 1 == 1).then(|| {
        Arc::new(Detection {
            detectors: NAMES
                .iter()
                .filter(|_| d & 2 == 0)
                .chain(NAMES.iter().take(usize::from(d >> 4) % NAMES.len() + 1))
                .map(|name| {
                    let s = strategy(d >> 2).unwrap_or(Strategy::Redact { text: None });
                    ((*name).to_owned(), s)
                })
                .collect(),
        })
    });
    let plan = ResultPlan {
        columns,
        detection,
        types: types(),
    };
    let masker = Masker::new([7u8; 32]);

    let mut out = Vec::new();
    if mask_data_row(&plan, &masker, payload, &mut out).is_ok() {
        assert!(
            well_formed(&out, n),
            "a masked row that is not a DataRow: {payload:?} -> {out:?}"
        );
    }

    let c = cfg[n + 1];
    let csv = c & 1 == 1;
    let delimiter = [',', '\t', '|', ';'][usize::from(c >> 1 & 3)];
    let quote = ['"', '\''][usize::from(c >> 3 & 1)];
    let format = CopyFormat {
        csv,
        delimiter,
        null: if c & 16 == 0 {
            "\\N".into()
        } else {
            String::new()
        },
        quote,
        escape: if c & 32 == 0 { quote } else { '\\' },
        header: c & 64 != 0,
    };
    let Ok(mut copy) = CopyMasker::new(plan, format) else {
        return;
    };
    // Pieces of 1 to 16 bytes, so rows and quotes straddle CopyData boundaries.
    let piece = usize::from(c >> 4) + 1;
    for chunk in payload.chunks(piece) {
        if copy.feed(&masker, chunk, &mut out).is_err() {
            return;
        }
    }
    let _ = copy.finish();
});
