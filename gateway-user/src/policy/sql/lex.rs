//! The lexical step: tokenize a message the way PostgreSQL does (comments, nested block
//! comments, dollar quotes with tags, `E''` strings are single tokens), split it into
//! statements at top-level semicolons, and refuse what could be lexed differently by the
//! server or would be unreasonably deep to parse.

use sqlparser::{
    dialect::PostgreSqlDialect,
    tokenizer::{Token, TokenWithSpan, Tokenizer, Whitespace},
};

use super::ClassifyError;

/// Most operators in one comma-separated expression. A left-deep chain like `1+1+...+1`
/// parses without recursion but yields a tree as deep as it is long; walking and dropping
/// that tree recurses. Real queries stay far below this.
pub const MAX_OPERATOR_CHAIN: usize = 2_000;

/// Lexical settings of the session that change how text is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LexOptions {
    /// `standard_conforming_strings` (on since PostgreSQL 9.1). When off, a backslash in a
    /// plain `'...'` string escapes the next character; the tokenizer reads strings the
    /// standard way, so a statement with a backslash is then refused as unclassifiable.
    pub standard_conforming_strings: bool,
}

impl Default for LexOptions {
    fn default() -> Self {
        Self {
            standard_conforming_strings: true,
        }
    }
}

/// Tokens of one statement, without whitespace-only statements and without the `;`.
pub type StatementTokens = Vec<TokenWithSpan>;

pub fn split(sql: &str, opts: LexOptions) -> Result<Vec<StatementTokens>, ClassifyError> {
    if !opts.standard_conforming_strings && sql.contains('\\') {
        return Err(ClassifyError::Ambiguous(
            "standard_conforming_strings is off and the text has a backslash: it could be \
             read differently by the server"
                .into(),
        ));
    }
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .with_unescape(false)
        .tokenize_with_location()
        .map_err(|e| ClassifyError::Syntax(e.to_string()))?;
    let mut out = Vec::new();
    let mut current: Vec<TokenWithSpan> = Vec::new();
    for t in tokens {
        if t.token == Token::SemiColon {
            push_statement(&mut out, std::mem::take(&mut current))?;
        } else {
            current.push(t);
        }
    }
    push_statement(&mut out, current)?;
    Ok(out)
}

fn push_statement(
    out: &mut Vec<StatementTokens>,
    tokens: StatementTokens,
) -> Result<(), ClassifyError> {
    if tokens.iter().all(|t| is_trivia(&t.token)) {
        return Ok(());
    }
    check_depth(&tokens)?;
    out.push(tokens);
    Ok(())
}

pub fn is_trivia(t: &Token) -> bool {
    matches!(t, Token::Whitespace(_) | Token::EOF)
}

/// Comments are whitespace to PostgreSQL; so they are to us.
pub fn is_comment(t: &Token) -> bool {
    matches!(
        t,
        Token::Whitespace(Whitespace::SingleLineComment { .. } | Whitespace::MultiLineComment(_))
    )
}

fn check_depth(tokens: &[TokenWithSpan]) -> Result<(), ClassifyError> {
    // Operators since the last comma, per parenthesis level.
    let mut stack: Vec<usize> = vec![0];
    for t in tokens {
        match &t.token {
            Token::LParen | Token::LBracket => stack.push(0),
            Token::RParen | Token::RBracket => {
                if stack.len() > 1 {
                    stack.pop();
                }
            }
            Token::Comma => {
                if let Some(n) = stack.last_mut() {
                    *n = 0;
                }
            }
            Token::Whitespace(_)
            | Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::EscapedStringLiteral(_)
            | Token::Placeholder(_)
            | Token::EOF => {}
            Token::Word(w) => {
                if w.quote_style.is_none()
                    && ["AND", "OR", "NOT", "IS", "LIKE", "ILIKE", "IN"]
                        .iter()
                        .any(|k| w.value.eq_ignore_ascii_case(k))
                    && let Some(n) = stack.last_mut()
                {
                    *n += 1;
                }
            }
            _ => {
                if let Some(n) = stack.last_mut() {
                    *n += 1;
                }
            }
        }
        if stack.last().is_some_and(|n| *n > MAX_OPERATOR_CHAIN) {
            return Err(ClassifyError::TooComplex(format!(
                "more than {MAX_OPERATOR_CHAIN} operators in one expression"
            )));
        }
    }
    Ok(())
}

/// The leading keywords of a statement, upper-cased, comments and whitespace skipped.
pub fn leading_words(tokens: &[TokenWithSpan], n: usize) -> Vec<String> {
    tokens
        .iter()
        .filter(|t| !is_trivia(&t.token))
        .take(n)
        .map(|t| match &t.token {
            Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
            other => other.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(sql: &str) -> usize {
        split(sql, LexOptions::default()).expect("lexes").len()
    }

    #[test]
    fn splits_only_at_top_level_semicolons() {
        assert_eq!(count("select 1; select 2"), 2);
        assert_eq!(count("select 'a;b'; select $x$;$x$"), 2);
        assert_eq!(count("select 1 /* ; */ -- ;\n"), 1);
        assert_eq!(count(";;  ; -- nothing\n"), 0);
        assert_eq!(count("select E'\\';'; select 2"), 2);
    }

    #[test]
    fn refuses_backslashes_when_strings_are_not_standard() {
        let off = LexOptions {
            standard_conforming_strings: false,
        };
        assert!(split("select 'a\\'; drop table t; --'", off).is_err());
        assert!(split("select 'plain'", off).is_ok());
    }

    #[test]
    fn refuses_absurd_operator_chains() {
        let deep = format!("select {}1", "1+".repeat(MAX_OPERATOR_CHAIN + 1));
        assert!(matches!(
            split(&deep, LexOptions::default()),
            Err(ClassifyError::TooComplex(_))
        ));
        let wide = format!("insert into t values {}", vec!["(1,-2)"; 5000].join(","));
        assert!(split(&wide, LexOptions::default()).is_ok(), "wide is fine");
    }
}
