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
    /// The client encoding lets a multibyte character end in an ASCII byte (SJIS, BIG5,
    /// GBK, UHC, GB18030, JOHAB: see [`swallows_ascii`]). The server converts the text
    /// before reading it, so `ぁ\'` in UTF-8 is, in SJIS, two characters and a quote: a
    /// statement with any non-ASCII character is then refused as unclassifiable.
    pub multibyte_ascii: bool,
}

impl LexOptions {
    /// Whether the server could read `sql` otherwise than this classifier: under an
    /// encoding that can swallow ASCII, any text that is not all ASCII.
    pub fn may_misread(self, sql: &str) -> bool {
        self.multibyte_ascii && !sql.is_ascii()
    }
}

impl Default for LexOptions {
    fn default() -> Self {
        Self {
            standard_conforming_strings: true,
            multibyte_ascii: false,
        }
    }
}

/// Whether a client encoding (any of PostgreSQL's spellings: case and punctuation are
/// ignored, as the server ignores them) is one whose multibyte characters may end in an
/// ASCII byte, backslash included: PostgreSQL's client-only encodings and their aliases.
pub fn swallows_ascii(encoding: &str) -> bool {
    let name: String = encoding
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    matches!(
        name.as_str(),
        "sjis"
            | "shiftjis"
            | "mskanji"
            | "win932"
            | "windows932"
            | "shiftjis2004"
            | "big5"
            | "win950"
            | "windows950"
            | "gbk"
            | "win936"
            | "windows936"
            | "uhc"
            | "win949"
            | "windows949"
            | "gb18030"
            | "johab"
    )
}

/// Tokens of one statement, without whitespace-only statements and without the `;`.
pub type StatementTokens = Vec<TokenWithSpan>;

pub fn split(sql: &str, opts: LexOptions) -> Result<Vec<StatementTokens>, ClassifyError> {
    if opts.may_misread(sql) {
        return Err(ClassifyError::Ambiguous(
            "the client encoding lets a multibyte character end in an ASCII byte and the \
             text is not all ASCII: it could be read differently by the server"
                .into(),
        ));
    }
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
            ..LexOptions::default()
        };
        assert!(split("select 'a\\'; drop table t; --'", off).is_err());
        assert!(split("select 'plain'", off).is_ok());
    }

    #[test]
    fn refuses_non_ascii_text_when_the_encoding_can_swallow_ascii() {
        let sjis = LexOptions {
            multibyte_ascii: true,
            ..LexOptions::default()
        };
        // UTF-8 sees a backslash before the quote; SJIS sees two characters, then a quote
        // that ends the string.
        assert!(split("select E'\u{3041}\\'; drop table t; --'", sjis).is_err());
        assert!(
            split(
                "select E'\u{3041}\\'; drop table t; --'",
                LexOptions::default()
            )
            .is_ok()
        );
        assert!(split("select 'plain ascii'", sjis).is_ok());
        for name in [
            "SJIS",
            "Shift_JIS",
            "windows-932",
            "BIG5",
            "gbk",
            "UHC",
            "GB18030",
        ] {
            assert!(swallows_ascii(name), "{name}");
        }
        for name in ["UTF8", "utf-8", "LATIN1", "EUC_JP", "SQL_ASCII", "WIN1252"] {
            assert!(!swallows_ascii(name), "{name}");
        }
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
