//! Statement shapes: a statement with its literals taken out, so that `... WHERE aid = 1`
//! and `... WHERE aid = 2` share one classification instead of each being parsed.
//!
//! Clients of the simple query protocol inline their values, so the exact-text decision
//! cache rarely sees a statement twice; parsing each one was the largest cost of a
//! statement through the proxy. A classification is reused for other literals only when
//! that cannot change it:
//!
//! - the statement only reads (its kinds are exactly `select`), runs no dynamic SQL, calls
//!   no dangerous function and names no prepared statement; everything else (an UPDATE
//!   whose `WHERE 1 = 1` is "always true", `EXPLAIN (ANALYZE 'off')`, `set_config('x', ...)`)
//!   is classified every time;
//! - and classifying it again with every literal replaced by two sets of stand-in values
//!   gives the same classification, which catches any reading of a literal's value that
//!   the first rule missed.
//!
//! Only classifications are shared, never decisions: rules (which may match statement text)
//! are evaluated for every statement. The key keeps every other token exactly (identifiers
//! with their quoting, operators, keywords) and each literal's kind; the lexical options are
//! part of it. Bounded: cleared when full.
//!
//! A shape known here is also stored under the key of the quick lexer ([`super::quick`])
//! when that lexer reads the statement exactly as the full tokenizer did, so the next
//! statement of that shape is classified without being tokenized at all.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::{Kind, StatementClass, lex};

/// Shapes remembered before the cache is cleared.
pub const CAPACITY: usize = 4096;

pub struct ShapeCache {
    inner: Mutex<HashMap<String, Arc<StatementClass>>>,
}

impl Default for ShapeCache {
    fn default() -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
        }
    }
}

impl ShapeCache {
    pub fn get(&self, key: &str) -> Option<Arc<StatementClass>> {
        self.lock().get(key).cloned()
    }

    /// Remembers a shape's classification; returns it shared, for [`Self::put_shared`].
    pub fn put(&self, key: String, c: StatementClass) -> Arc<StatementClass> {
        let c = Arc::new(c);
        self.put_shared(key, c.clone());
        c
    }

    /// Remembers a classification under a second key (the quick lexer's).
    pub fn put_shared(&self, key: String, c: Arc<StatementClass>) {
        let mut m = self.lock();
        if m.len() >= CAPACITY {
            m.clear();
        }
        m.insert(key, c);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<StatementClass>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A literal's kind in a key, or `None` for a token kept as it is.
pub fn literal(t: &Token) -> Option<&'static str> {
    match t {
        Token::Number(_, false) => Some("n"),
        Token::Number(_, true) => Some("nL"),
        Token::SingleQuotedString(_) => Some("s"),
        Token::EscapedStringLiteral(_) => Some("e"),
        Token::NationalStringLiteral(_) => Some("N"),
        _ => None,
    }
}

/// The shape of one statement's tokens; `None` when it has no literal (the exact-text
/// cache serves those). Each token is length-prefixed, so no two token sequences share a key.
pub fn key(tokens: &[TokenWithSpan], scs: bool) -> Option<String> {
    let mut k = String::with_capacity(tokens.len() * 8);
    k.push(if scs { '1' } else { '0' });
    let mut any = false;
    for t in tokens.iter().filter(|t| !lex::is_trivia(&t.token)) {
        match literal(&t.token) {
            Some(kind) => {
                any = true;
                let _ = write!(k, "|?{kind}");
            }
            None => {
                let text = t.token.to_string();
                let _ = write!(k, "|{}:{text}", text.len());
            }
        }
    }
    any.then_some(k)
}

/// The tokens with every literal replaced by a stand-in of the same kind (`variant` picks
/// which).
pub fn substitute(tokens: &[TokenWithSpan], variant: bool) -> lex::StatementTokens {
    let (num, text) = if variant { ("7", "x") } else { ("0", "") };
    tokens
        .iter()
        .map(|t| {
            let token = match &t.token {
                Token::Number(_, long) => Token::Number(num.into(), *long),
                Token::SingleQuotedString(_) => Token::SingleQuotedString(text.into()),
                Token::EscapedStringLiteral(_) => Token::EscapedStringLiteral(text.into()),
                Token::NationalStringLiteral(_) => Token::NationalStringLiteral(text.into()),
                other => other.clone(),
            };
            TokenWithSpan::new(token, t.span)
        })
        .collect()
}

/// Whether a classification may stand for the statement with other literals (first rule
/// in the module's documentation).
pub fn reusable(c: &StatementClass) -> bool {
    c.kind == Kind::Select
        && c.kinds.len() == 1
        && !c.dynamic_sql
        && c.dangerous.is_empty()
        && c.prepared.is_none()
        && !c.missing_where
}
