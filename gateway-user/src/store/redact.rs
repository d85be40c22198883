//! Statement text with its literals replaced, for stores that must not keep the values an
//! agent put in its SQL (`[store] redact_literals`, or a rule's `redact_literals`).
//!
//! Pure: the text is tokenized as the classifier tokenizes it; every string, number,
//! dollar-quoted, escape, bit, hex or national literal becomes `?`; the rest (keywords,
//! names, operators, comments) is kept as written. Text that does not tokenize is replaced
//! as a whole: what cannot be read cannot be shown safely.

use sqlparser::{
    dialect::PostgreSqlDialect,
    tokenizer::{Token, Tokenizer},
};

pub fn redact_literals(sql: &str) -> String {
    let dialect = PostgreSqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, sql)
        .with_unescape(false)
        .tokenize()
    else {
        return format!("<{} bytes of SQL that does not tokenize>", sql.len());
    };
    let mut out = String::with_capacity(sql.len());
    for t in tokens {
        match t {
            Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::EscapedStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::UnicodeStringLiteral(_) => out.push('?'),
            other => out.push_str(&other.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_go_names_stay() {
        assert_eq!(
            redact_literals("SELECT * FROM users WHERE email = 'a@b.co' AND id > 42"),
            "SELECT * FROM users WHERE email = ? AND id > ?"
        );
        let r = redact_literals("UPDATE \"Users\" SET pw = $$secret$$, n = E'x\\ny' -- note\n");
        assert!(
            r.starts_with("UPDATE \"Users\" SET pw = ?, n = ? -- note"),
            "{r}"
        );
        assert!(!r.contains("secret"));
        assert_eq!(redact_literals("SELECT $1, X'ff'"), "SELECT $1, ?");
        assert!(redact_literals("SELECT 'unterminated").starts_with('<'));
    }
}
