//! Table-driven tests of classification and decisions with the shipped policies.
//!
//! `sql_cases.txt` holds the cases, each as
//!
//! ```text
//! # why the case matters
//! > the SQL (one or more lines)
//! = expectations
//! ```
//!
//! Expectations: the decision (`allow`, `deny:RULE`, `approve:RULE`, `mask:RULE`) and
//! `kinds:a,b` (every kind in the message) are always given; optional facets are
//! `read:t1,t2`, `write:t`, `fn:f`, `userfn:f` (not PostgreSQL's own), `danger:cat`, `where:missing|ok`, `dynamic:yes|no`,
//! `stmts:N`, `error:syntax|too_complex|ambiguous`. A facet given is compared exactly.

use std::collections::BTreeSet;

use super::{
    model::{Subject, Verdict},
    sql::{LexOptions, StatementClass},
    store::{judge, load_set},
};
use crate::config::Config;

struct Case {
    line: usize,
    why: String,
    sql: String,
    expect: Vec<String>,
}

fn parse_cases(text: &str) -> Vec<Case> {
    let mut out = Vec::new();
    let mut why = String::new();
    let mut sql: Vec<&str> = Vec::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        if let Some(w) = line.strip_prefix("# ") {
            why = w.to_owned();
        } else if let Some(s) = line.strip_prefix("> ") {
            if sql.is_empty() {
                start = i + 1;
            }
            sql.push(s);
        } else if line == ">" {
            sql.push("");
        } else if let Some(e) = line.strip_prefix("= ") {
            assert!(!sql.is_empty(), "line {}: expectations without SQL", i + 1);
            out.push(Case {
                line: start,
                why: why.clone(),
                sql: sql.join("\n"),
                expect: e.split_whitespace().map(str::to_owned).collect(),
            });
            sql.clear();
        } else if !line.trim().is_empty() && !line.starts_with("##") {
            panic!("line {}: not a case line: {line}", i + 1);
        }
    }
    out
}

fn set_of(s: &str) -> BTreeSet<String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

fn union<F: Fn(&StatementClass) -> BTreeSet<String>>(
    st: &[StatementClass],
    f: F,
) -> BTreeSet<String> {
    st.iter().flat_map(f).collect()
}

fn check(case: &Case, set: &super::PolicySet) -> Result<(), String> {
    let subject = Subject {
        agent: "local".into(),
        uid: 1000,
        ..Default::default()
    };
    let j = judge(
        set,
        &subject,
        "postgres",
        "postgres",
        &case.sql,
        LexOptions::default(),
    );
    let c = &j.classification;
    let d = &j.decision;
    let st = &c.statements;
    let mut problems = Vec::new();
    for e in &case.expect {
        let (key, val) = e.split_once(':').unwrap_or((e.as_str(), ""));
        let got: String = match key {
            "allow" => {
                if d.verdict != Verdict::Allow {
                    problems.push(format!(
                        "decision: expected allow, got {} by {}",
                        d.verdict, d.rule
                    ));
                }
                continue;
            }
            "deny" | "approve" | "mask" => {
                let want = match key {
                    "deny" => Verdict::Deny,
                    "approve" => Verdict::RequireApproval,
                    _ => Verdict::Mask,
                };
                if d.verdict != want || d.rule != val {
                    problems.push(format!(
                        "decision: expected {} by {val}, got {} by {} ({:?})",
                        want, d.verdict, d.rule, d.message
                    ));
                }
                continue;
            }
            "kinds" => {
                let got = union(st, |s| s.kinds.iter().map(|k| k.name()).collect());
                if got != set_of(val) {
                    problems.push(format!("kinds: expected {val}, got {got:?}"));
                }
                continue;
            }
            "read" => fmt_set(union(st, |s| {
                s.tables_read.iter().map(ToString::to_string).collect()
            })),
            "write" => fmt_set(union(st, |s| {
                s.tables_written.iter().map(ToString::to_string).collect()
            })),
            "fn" => fmt_set(union(st, |s| s.functions.clone())),
            "userfn" => fmt_set(union(st, |s| s.user_functions.clone())),
            "danger" => fmt_set(union(st, |s| {
                s.dangerous
                    .iter()
                    .map(|(_, d)| d.as_str().to_owned())
                    .collect()
            })),
            "where" => (if st.iter().any(|s| s.missing_where) {
                "missing"
            } else {
                "ok"
            })
            .to_owned(),
            "dynamic" => (if st.iter().any(|s| s.dynamic_sql) {
                "yes"
            } else {
                "no"
            })
            .to_owned(),
            "stmts" => st.len().to_string(),
            "error" => match &c.error {
                Some(super::sql::ClassifyError::Syntax(_)) => "syntax".into(),
                Some(super::sql::ClassifyError::TooComplex(_)) => "too_complex".into(),
                Some(super::sql::ClassifyError::Ambiguous(_)) => "ambiguous".into(),
                None => "none".into(),
            },
            other => return Err(format!("unknown expectation `{other}`")),
        };
        let want = if matches!(key, "read" | "write" | "fn" | "userfn" | "danger") {
            fmt_set(set_of(val))
        } else {
            val.to_owned()
        };
        if got != want {
            problems.push(format!("{key}: expected {want}, got {got}"));
        }
    }
    let has_decision = case.expect.iter().any(|e| {
        e == "allow"
            || e.starts_with("deny:")
            || e.starts_with("approve:")
            || e.starts_with("mask:")
    });
    if !has_decision {
        problems.push("the case gives no decision".into());
    }
    if c.error.is_none() && !case.expect.iter().any(|e| e.starts_with("kinds:")) {
        problems.push("the case gives no kinds".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn fmt_set(s: BTreeSet<String>) -> String {
    s.into_iter().collect::<Vec<_>>().join(",")
}

#[test]
fn sql_cases_classify_and_decide_as_written() {
    let cfg = Config::embedded().expect("default config");
    let (set, warnings) = load_set(&cfg).expect("shipped policies load");
    assert!(
        warnings.is_empty(),
        "shipped policies shadow themselves: {warnings:?}"
    );
    let cases = parse_cases(include_str!("sql_cases.txt"));
    assert!(cases.len() >= 300, "only {} cases", cases.len());
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            check(c, &set).err().map(|e| {
                format!(
                    "sql_cases.txt:{} ({})\n    {}\n    {e}",
                    c.line,
                    c.why,
                    c.sql.replace('\n', "\n    ")
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The case texts with every literal replaced (numbers by `num`, strings by `text`),
/// re-rendered from their tokens.
fn with_literals(sql: &str, num: &str, text: &str) -> Option<String> {
    use sqlparser::tokenizer::Token;
    let statements = super::sql::lex::split(sql, LexOptions::default()).ok()?;
    let rendered: Vec<String> = statements
        .iter()
        .map(|tokens| {
            tokens
                .iter()
                .map(|t| match &t.token {
                    Token::Number(_, _) => num.to_owned(),
                    Token::SingleQuotedString(_) => format!("'{text}'"),
                    Token::EscapedStringLiteral(_) => format!("E'{text}'"),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    Some(rendered.join(";"))
}

#[test]
fn a_shared_shape_classifies_exactly_as_a_fresh_classification_would() {
    use super::sql::{ShapeCache, classify, classify_with};
    let cases = parse_cases(include_str!("sql_cases.txt"));
    let lex = LexOptions::default();
    let mut shared = 0;
    // Values a classifier could read: option words, booleans, numbers that compare.
    for (num, text) in [("1", "off"), ("0", "false"), ("42", "users"), ("1", "on")] {
        for c in &cases {
            let Some(other) = with_literals(&c.sql, num, text) else {
                continue;
            };
            let cache = ShapeCache::default();
            let first = classify_with(&c.sql, lex, Some(&cache));
            assert_eq!(
                first,
                classify(&c.sql, lex),
                "line {}: the first sight",
                c.line
            );
            let reused = classify_with(&other, lex, Some(&cache));
            assert_eq!(
                reused,
                classify(&other, lex),
                "sql_cases.txt:{}: {:?} after {:?}",
                c.line,
                other,
                c.sql
            );
            shared += usize::from(!cache.is_empty());
        }
    }
    assert!(shared > 100, "only {shared} shapes were shared");
}

#[test]
fn only_reads_share_a_shape() {
    use super::sql::{ShapeCache, classify_with};
    let lex = LexOptions::default();
    let cache = ShapeCache::default();
    classify_with(
        "SELECT abalance FROM pgbench_accounts WHERE aid = 17",
        lex,
        Some(&cache),
    );
    // Under the full tokenizer's key and the quick lexer's.
    assert_eq!(cache.len(), 2, "a plain read is shared");
    classify_with(
        "SELECT abalance FROM pgbench_accounts WHERE aid = 9921",
        lex,
        Some(&cache),
    );
    assert_eq!(cache.len(), 2, "the same shape");
    for sql in [
        "UPDATE t SET a = 1 WHERE 1 = 1",
        "DELETE FROM t WHERE id = 3",
        "SELECT set_config('role', 'admin', false)",
        "EXPLAIN (ANALYZE 'off') SELECT 1",
        "SELECT pg_read_file('/etc/passwd')",
        "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
        "SELECT 1; SELECT 2",
        "SELECT * FROM t",
    ] {
        classify_with(sql, lex, Some(&cache));
        assert_eq!(cache.len(), 2, "{sql} was shared");
    }
}

#[test]
fn a_quick_key_never_stands_for_text_the_server_reads_differently() {
    use super::sql::{ShapeCache, classify, classify_with};
    let lex = LexOptions::default();
    let cache = ShapeCache::default();
    classify_with("SELECT a FROM t WHERE x = 'v'", lex, Some(&cache));
    classify_with("SELECT a FROM t WHERE x = 1", lex, Some(&cache));
    assert_eq!(cache.len(), 4, "both shapes under both keys");
    // (text, whether the server would drop the table)
    for (sql, drop) in [
        ("SELECT a FROM t WHERE x = E'\\\\'; DROP TABLE t; --'", true),
        ("SELECT a FROM t WHERE x = 'v'; DROP TABLE t", true),
        ("SELECT a FROM t WHERE x = 'v' -- '\n; DROP TABLE t", true),
        (
            "SELECT a FROM t WHERE x = 'v' /* '; DROP TABLE t; */",
            false,
        ),
        ("SELECT a FROM t WHERE x = $$v$$; DROP TABLE t", true),
        ("SELECT a FROM t WHERE x = 1e5; DROP TABLE t", true),
        ("SELECT a FROM t WHERE x = U&'v'; DROP TABLE t", true),
        // One literal holding the rest: the same shape, rightly.
        ("SELECT a FROM t WHERE x = 'v''; DROP TABLE t; --'", false),
        ("SELECT a FROM t WHERE x = 12345.678", false),
    ] {
        let fresh = classify(sql, lex);
        assert_eq!(classify_with(sql, lex, Some(&cache)), fresh, "{sql:?}");
        let drops = fresh
            .kinds()
            .iter()
            .any(|k| matches!(k, super::sql::Kind::Drop(_)));
        assert_eq!(drops, drop, "{sql:?}");
    }
}
