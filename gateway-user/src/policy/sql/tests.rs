//! Robustness of the classifier: no panics on arbitrary input, quick errors on
//! pathological input, and no stack overflow on the proxy's worker stacks. And which
//! statements may make an unqualified catalog name mean another relation (what masking
//! without a catalog needs to know).

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::{ClassifyError, LexOptions, classify, lex::MAX_OPERATOR_CHAIN};

/// The stack the classifier gets in the daemon (tokio worker threads are given this).
pub const WORKER_STACK: usize = 2 * 1024 * 1024;

/// Runs `f` on a thread with the worker stack size; a stack overflow aborts the test
/// process, which fails the test run loudly.
fn on_worker_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(WORKER_STACK)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("classifier thread panicked")
}

/// How long a classification of pathological input may take before it counts as a hang:
/// far above what these inputs take on a loaded machine in a debug build (well under a
/// second each), far below what quadratic or exponential work on them would.
const HANG_GUARD: Duration = Duration::from_secs(10);

fn quick(sql: String) -> (super::Classification, Duration) {
    on_worker_stack(move || {
        let t = Instant::now();
        let c = classify(&sql, LexOptions::default());
        (c, t.elapsed())
    })
}

#[test]
fn deep_parentheses_are_refused_quickly() {
    for depth in [100, 10_000, 200_000] {
        let sql = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
        let (c, took) = quick(sql);
        assert!(
            matches!(c.error, Some(ClassifyError::Syntax(_))),
            "depth {depth}: {:?}",
            c.error
        );
        assert!(took < HANG_GUARD, "depth {depth} took {took:?}");
    }
}

#[test]
fn deep_subqueries_are_refused_quickly() {
    let depth = 5_000;
    let sql = format!(
        "SELECT * FROM {} t {}",
        "(SELECT * FROM ".repeat(depth),
        ") x".repeat(depth)
    );
    let (c, took) = quick(sql);
    assert!(c.error.is_some());
    assert!(took < HANG_GUARD, "took {took:?}");
}

#[test]
fn the_longest_allowed_operator_chain_fits_the_stack() {
    // Parsed, walked and dropped on a worker-sized stack.
    let sql = format!("SELECT {}1 FROM t", "1+".repeat(MAX_OPERATOR_CHAIN - 1));
    let (c, took) = quick(sql);
    assert_eq!(c.error, None);
    assert!(took < HANG_GUARD, "took {took:?}");
    let sql = format!(
        "DELETE FROM t WHERE {}true",
        "true AND ".repeat(MAX_OPERATOR_CHAIN - 1)
    );
    let (c, _) = quick(sql);
    assert_eq!(c.error, None);
    assert!(c.statements[0].missing_where);
}

#[test]
fn longer_chains_are_refused_not_overflowed() {
    for n in [MAX_OPERATOR_CHAIN + 1, 100_000, 1_000_000] {
        let sql = format!("SELECT {}1", "1+".repeat(n));
        let (c, took) = quick(sql);
        assert!(
            matches!(c.error, Some(ClassifyError::TooComplex(_))),
            "{n}: {:?}",
            c.error
        );
        assert!(took < HANG_GUARD, "{n} took {took:?}");
    }
    let casts = format!("SELECT 1{}", "::int".repeat(100_000));
    assert!(matches!(
        quick(casts).0.error,
        Some(ClassifyError::TooComplex(_))
    ));
}

#[test]
fn huge_flat_statements_are_fine() {
    let rows = vec!["(1, 'x', -2.5)"; 50_000].join(",");
    let (c, took) = quick(format!("INSERT INTO t VALUES {rows}"));
    assert_eq!(c.error, None);
    assert!(took < HANG_GUARD, "took {took:?}");
}

#[test]
fn deep_nested_comments_and_long_literals() {
    let nested = format!("SELECT 1 {}{}", "/*".repeat(100_000), "*/".repeat(100_000));
    let (c, took) = quick(nested);
    assert_eq!(c.error, None, "nested comments are whitespace");
    assert!(took < HANG_GUARD);
    let long = format!("SELECT '{}'", "x".repeat(10_000_000));
    let (c, took) = quick(long);
    assert_eq!(c.error, None);
    assert!(took < HANG_GUARD, "took {took:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_panics_on_arbitrary_text(s in ".{0,300}") {
        let _ = classify(&s, LexOptions::default());
    }

    #[test]
    fn never_panics_on_sql_shaped_noise(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("SELECT"), Just("FROM"), Just("WHERE"), Just("("), Just(")"), Just(","),
                Just(";"), Just("'"), Just("$$"), Just("$a$"), Just("/*"), Just("*/"), Just("--"),
                Just("\n"), Just("DROP"), Just("TABLE"), Just("users"), Just("1"), Just("="),
                Just("WITH"), Just("AS"), Just("DELETE"), Just("DO"), Just("E'"), Just("\\"),
                Just("::"), Just("[" ), Just("]"), Just("\""), Just("OR"), Just("RETURNING"),
            ],
            0..60,
        ),
        scs in any::<bool>(),
    ) {
        let sql = parts.join(" ");
        let _ = classify(
            &sql,
            LexOptions {
                standard_conforming_strings: scs,
                ..LexOptions::default()
            },
        );
    }
}

/// What the PostgreSQL engine keeps of prepared statements follows these: the name a
/// DEALLOCATE drops, and the statements that drop them all.
#[test]
fn deallocate_and_discard_name_what_they_drop() {
    let one = |sql: &str| {
        let c = classify(sql, LexOptions::default());
        let s = c
            .statements
            .first()
            .unwrap_or_else(|| panic!("{sql}: {c:?}"))
            .clone();
        (s.prepared, s.drops_all_prepared)
    };
    assert_eq!(one("DEALLOCATE p1"), (Some("p1".into()), false));
    assert_eq!(one("DEALLOCATE PREPARE P1"), (Some("p1".into()), false));
    assert_eq!(one("DEALLOCATE \"S1\""), (Some("S1".into()), false));
    assert_eq!(one("DEALLOCATE \"ALL\""), (Some("ALL".into()), false));
    assert_eq!(one("DEALLOCATE ALL"), (None, true));
    assert_eq!(one("DISCARD ALL"), (None, true));
    assert_eq!(one("DISCARD PLANS"), (None, false));
}

/// DECLARE names the cursors (portals) it opens, as the server folds them.
#[test]
fn declare_names_its_cursors() {
    let cursors = |sql: &str| {
        let c = classify(sql, LexOptions::default());
        c.statements
            .first()
            .unwrap_or_else(|| panic!("{sql}: {c:?}"))
            .cursors
            .clone()
    };
    assert_eq!(cursors("DECLARE c1 CURSOR FOR SELECT 1"), ["c1"]);
    assert_eq!(
        cursors("DECLARE Portcullis_Catalog CURSOR WITH HOLD FOR SELECT 1"),
        ["portcullis_catalog"]
    );
    assert_eq!(cursors("DECLARE \"C2\" BINARY CURSOR FOR SELECT 1"), ["C2"]);
    assert!(cursors("SELECT 1").is_empty());
}

/// A shape cached from a session in UTF-8 is not served to one whose encoding reads
/// non-ASCII text otherwise: there the text is refused, as a fresh classification would.
#[test]
fn a_cached_shape_is_not_served_where_the_encoding_reads_text_otherwise() {
    let cache = super::ShapeCache::default();
    let sql = "SELECT id FROM t WHERE name = '\u{3041}' AND id = 1";
    let utf8 = LexOptions::default();
    let sjis = LexOptions {
        multibyte_ascii: true,
        ..LexOptions::default()
    };
    for _ in 0..2 {
        assert!(
            super::classify_with(sql, utf8, Some(&cache))
                .error
                .is_none()
        );
    }
    let c = super::classify_with(sql, sjis, Some(&cache));
    assert!(
        matches!(c.error, Some(ClassifyError::Ambiguous(_))),
        "{c:?}"
    );
    assert_eq!(c, classify(sql, sjis));
    // ASCII text reads alike in every such encoding.
    let ascii = "SELECT id FROM t WHERE name = 'a' AND id = 1";
    assert_eq!(
        super::classify_with(ascii, sjis, Some(&cache)),
        classify(ascii, utf8)
    );
}

#[test]
fn statements_that_may_shadow_catalog_relations() {
    let may = |sql: &str| {
        let c = classify(sql, LexOptions::default());
        assert!(c.error.is_none(), "{sql}: {:?}", c.error);
        c.statements
            .iter()
            .any(super::StatementClass::may_shadow_catalog)
    };
    // What pg_dump and psql's describe commands send.
    for sql in [
        "SELECT pg_catalog.set_config('search_path', '', false)",
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        "BEGIN",
        "SELECT c.relname FROM pg_class c WHERE c.oid = 1259",
        "LOCK TABLE public.users IN ACCESS SHARE MODE",
        "COPY public.users (id, email) TO stdout",
        "DECLARE c CURSOR FOR SELECT 1",
        "FETCH 10 FROM c",
        "UPDATE users SET name = 'x' WHERE id = 1",
        "PREPARE p AS SELECT 1",
        "EXPLAIN SELECT 1",
        "COMMIT",
        // pg_catalog stays first.
        "SET search_path = app, public",
    ] {
        assert!(!may(sql), "{sql}");
    }
    for sql in [
        "CREATE TEMP VIEW pg_class AS SELECT 1 AS relname",
        "CREATE TABLE pg_temp.pg_class (relname text)",
        "SELECT 1 AS relname INTO TEMP pg_class",
        "CREATE TEMP TABLE pg_class AS SELECT 1 AS relname",
        "ALTER VIEW v RENAME TO pg_class",
        "ALTER TABLE t RENAME TO pg_class",
        "PREPARE p AS CREATE TABLE x AS SELECT 1",
        "EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
        "DO $$ BEGIN NULL; END $$",
        "SELECT app.make_views()",
        "CALL app.p()",
        "SELECT * FROM app.f()",
        // A schema before pg_catalog: its `pg_class` would be found first.
        "SET search_path = app, pg_catalog",
        "SELECT set_config('search_path', 'app, pg_catalog', false)",
    ] {
        assert!(may(sql), "{sql}");
    }
}
