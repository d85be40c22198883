//! The quick lexer: a strict subset of PostgreSQL's lexical grammar, just enough to compute
//! a statement's shape key (see [`super::shapes`]) without the full tokenizer.
//!
//! Tokenizing with sqlparser was the largest remaining cost of a statement whose shape was
//! already known. This scanner only reads the plain forms ORMs and drivers send inline:
//! unquoted and double-quoted identifiers, keywords, integers and decimals, standard `'...'`
//! strings (with `''`), operators and punctuation, one optional trailing `;`. Anything else
//! ends the scan with `None` and the statement takes the full path: comments, backslashes,
//! `$` (dollar quotes, parameters), prefixed strings (`E'..'`, `U&'..'`, `B'..'`, `X'..'`,
//! `N'..'`), exponents, `0x`/`1_000` forms, non-ASCII outside strings, several statements.
//!
//! The scanner never decides anything by itself: a shape is stored under a quick key only
//! when the quick pieces of that statement equal its full tokenization piece for piece
//! ([`agrees`]), so a statement that the two lexers would read differently never gets one.

use sqlparser::tokenizer::TokenWithSpan;

use super::{lex, shapes};

/// One piece of a statement: code kept as written, or a literal's kind (the same kind
/// names as [`shapes::literal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Code(&'a str),
    Literal(&'static str),
}

/// PostgreSQL's operator characters; runs of them are one piece.
pub fn is_operator(b: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?".contains(&b)
}

/// The whitespace this scanner reads (others, like form feed, take the full path).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// One past the closing quote of the `q`-quoted run (a string or a quoted identifier) that
/// opens at `open`, with a doubled quote standing for itself. `None` when a prefix is glued
/// to it (`E'..'`, `U&'..'`, `U&".."` are other kinds), at a backslash, NUL or `$` inside,
/// or without a closing quote.
fn quoted(b: &[u8], open: usize, q: u8) -> Option<usize> {
    if open > 0 && (is_word(b[open - 1]) || b[open - 1] == b'&') {
        return None;
    }
    let mut i = open + 1;
    loop {
        match *b.get(i)? {
            c if c == q && b.get(i + 1) == Some(&q) => i += 2,
            c if c == q => return Some(i + 1),
            b'\\' | 0 => return None,
            b'$' if q == b'"' => return None,
            _ => i += 1,
        }
    }
}

/// The pieces of `sql`, or `None` when it leaves the subset this scanner reads.
pub fn scan(sql: &str) -> Option<Vec<Piece<'_>>> {
    let b = sql.as_bytes();
    let mut out = Vec::with_capacity(16);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            c if is_space(c) => {
                i += 1;
                continue;
            }
            b';' => {
                // Only as the last thing in the text: several statements take the full path.
                if !b[i + 1..].iter().all(|&c| is_space(c)) {
                    return None;
                }
                break;
            }
            q @ (b'\'' | b'"') => {
                i = quoted(b, i, q)?;
                if q == b'"' {
                    out.push(Piece::Code(&sql[start..i]));
                    continue;
                }
                if b.get(i).is_some_and(|&n| is_word(n)) {
                    return None;
                }
                out.push(Piece::Literal("s"));
                continue;
            }
            b'0'..=b'9' => {
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                if b.get(i)
                    .is_some_and(|&n| is_word(n) || n == b'.' || n == b'$')
                {
                    return None;
                }
                out.push(Piece::Literal("n"));
                continue;
            }
            c if is_word_start(c) => {
                while i < b.len() && is_word(b[i]) {
                    i += 1;
                }
                if b.get(i).is_some_and(|&n| n == b'$' || !n.is_ascii()) {
                    return None;
                }
            }
            c if is_operator(c) => {
                while i < b.len() && is_operator(b[i]) {
                    i += 1;
                }
                let run = &sql[start..i];
                if run.contains("--") || run.contains("/*") {
                    return None;
                }
            }
            b':' => {
                while i < b.len() && b[i] == b':' {
                    i += 1;
                }
            }
            b'(' | b')' | b',' | b'[' | b']' => i += 1,
            b'.' => {
                if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    return None;
                }
                i += 1;
            }
            _ => return None,
        }
        out.push(Piece::Code(&sql[start..i]));
    }
    Some(out)
}

/// A statement as the quick lexer read it: its pieces and its shape key.
pub struct Quick<'a> {
    pub pieces: Vec<Piece<'a>>,
    pub key: String,
}

/// Reads `sql` once for both uses of a quick key (the decision and the classification
/// caches); `None` outside the subset or without a literal.
pub fn read(sql: &str, scs: bool) -> Option<Quick<'_>> {
    let pieces = scan(sql)?;
    let key = key(&pieces, scs)?;
    Some(Quick { pieces, key })
}

/// The shape key of the pieces (`None` without a literal: the exact-text cache serves
/// those). Its own namespace: it never equals a key of [`shapes::key`].
pub fn key(pieces: &[Piece<'_>], scs: bool) -> Option<String> {
    if !pieces.iter().any(|p| matches!(p, Piece::Literal(_))) {
        return None;
    }
    let len: usize = pieces
        .iter()
        .map(|p| match p {
            Piece::Code(t) => t.len() + 1,
            Piece::Literal(k) => k.len() + 2,
        })
        .sum();
    let mut k = String::with_capacity(2 + len);
    k.push('q');
    k.push(if scs { '1' } else { '0' });
    // Each piece ends with NUL, which no piece holds (`scan` refuses it); a literal starts
    // with \u{1}, which no code piece starts with. So no two piece sequences share a key.
    for p in pieces {
        match p {
            Piece::Code(t) => k.push_str(t),
            Piece::Literal(kind) => {
                k.push('\u{1}');
                k.push_str(kind);
            }
        }
        k.push('\0');
    }
    Some(k)
}

/// Whether the full tokenizer read the statement into exactly these pieces.
pub fn agrees(pieces: &[Piece<'_>], tokens: &[TokenWithSpan]) -> bool {
    let mut full = tokens.iter().filter(|t| !lex::is_trivia(&t.token));
    for p in pieces {
        let Some(t) = full.next() else {
            return false;
        };
        let same = match (p, shapes::literal(&t.token)) {
            (Piece::Literal(a), Some(b)) => *a == b,
            (Piece::Code(text), None) => t.token.to_string() == *text,
            _ => false,
        };
        if !same {
            return false;
        }
    }
    full.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sql::LexOptions;

    fn pieces(sql: &str) -> Option<Vec<String>> {
        scan(sql).map(|p| {
            p.iter()
                .map(|p| match p {
                    Piece::Code(t) => (*t).to_owned(),
                    Piece::Literal(k) => format!("?{k}"),
                })
                .collect()
        })
    }

    #[test]
    fn reads_the_plain_forms() {
        assert_eq!(
            pieces("SELECT abalance FROM pgbench_accounts WHERE aid = 42;").expect("scans"),
            [
                "SELECT",
                "abalance",
                "FROM",
                "pgbench_accounts",
                "WHERE",
                "aid",
                "=",
                "?n"
            ]
        );
        assert_eq!(
            pieces(
                "select \"u\".\"id\" from \"u\" where \"u\".\"n\" >= 'it''s'::text and x in (1.5,2)"
            )
            .expect("scans"),
            [
                "select", "\"u\"", ".", "\"id\"", "from", "\"u\"", "where", "\"u\"", ".", "\"n\"",
                ">=", "?s", "::", "text", "and", "x", "in", "(", "?n", ",", "?n", ")"
            ]
        );
        // Whitespace is not a piece, but it separates them.
        assert_eq!(pieces("a<=1").expect("scans"), ["a", "<=", "?n"]);
        assert_eq!(pieces("a < = 1").expect("scans"), ["a", "<", "=", "?n"]);
        assert_eq!(pieces("select 'a;b'").expect("scans"), ["select", "?s"]);
        assert_eq!(
            pieces("select 'multi\nline é'").expect("scans"),
            ["select", "?s"]
        );
    }

    #[test]
    fn leaves_everything_else_to_the_full_lexer() {
        for sql in [
            "select 1 -- comment",
            "select 1 /* c */",
            "select 1+/*x*/2",
            "select E'a'",
            "select e'a'",
            "select N'a'",
            "select U&'a'",
            "select U&\"d!0061t\" UESCAPE '!' from t where a = 1",
            "select X'1F'",
            "select B'01'",
            "select 'a\\' ; drop table t; --'",
            "select $1",
            "select $$a$$",
            "select $t$a$t$",
            "select a$b",
            "select 1e5",
            "select 0x1f",
            "select 1_000",
            "select 1.",
            "select .5",
            "select 1..2",
            "select 1a",
            "select 'a'b",
            "select 'a' 'b''",
            "select 'unterminated",
            "select \"unterminated",
            "select 1; select 2",
            "select 1;\x0c",
            "select\x0c1",
            "select 1; drop table t",
            "select café",
            "select {1}",
            "select 'a\0b'",
            "select \"a\0b\" from t where x = 1",
            "select 1 \\g",
        ] {
            assert_eq!(scan(sql), None, "{sql:?} was scanned");
        }
    }

    #[test]
    fn keys_keep_code_and_forget_literal_values() {
        let k = |s: &str| key(&scan(s).expect("scans"), true);
        assert_eq!(
            k("select * from t where a = 1"),
            k("select * from t where a = 99.5")
        );
        assert_eq!(
            k("select * from t where a = 'x'"),
            k("select * from t where a='it''s'")
        );
        assert_ne!(
            k("select * from t where a = 1"),
            k("select * from t where a = '1'")
        );
        assert_ne!(
            k("select * from t where a = 1"),
            k("select * from t where b = 1")
        );
        assert_ne!(
            k("select a b from t where x = 1"),
            k("select ab from t where x = 1")
        );
        assert_eq!(k("select * from t"), None, "no literal");
        assert_ne!(
            key(&scan("select 1").expect("scans"), true),
            key(&scan("select 1").expect("scans"), false)
        );
    }

    #[test]
    fn agrees_with_the_full_tokenizer_on_plain_statements_only() {
        let check = |sql: &str| {
            let p = scan(sql).expect("scans");
            let full = lex::split(sql, LexOptions::default()).expect("lexes");
            full.len() == 1 && agrees(&p, &full[0])
        };
        assert!(check(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;"
        ));
        assert!(check(
            "select \"u\".\"id\" from \"u\" where \"u\".\"n\" >= 'x'::text and x in (1.5, 2)"
        ));
        // Read differently (one operator run here, two tokens there): no quick key.
        assert!(!check("select * from t where a=-1"));
    }
}
