//! `search_path` values that let another schema's objects stand in for PostgreSQL's own.
//!
//! PostgreSQL searches `pg_catalog` before the path unless the path names it; named later,
//! an unqualified `lower(email)` or `=` resolves to a function or operator of the same name
//! in any schema listed before it. The classification's "built-in function" would then be
//! someone else's code, out of sight of the rules that hold user functions. (`pg_temp` is
//! never searched for functions or operators, so it may come first.)
//!
//! Pure: takes the list and says whether it is such a path.

/// Whether a path puts a schema where functions and operators are looked up before
/// `pg_catalog`. `schemas` are names as PostgreSQL folds them (unquoted lower-cased).
pub fn shadows_catalog<S: AsRef<str>>(schemas: &[S]) -> bool {
    let Some(at) = schemas.iter().position(|s| s.as_ref() == "pg_catalog") else {
        return false;
    };
    schemas[..at].iter().any(|s| s.as_ref() != "pg_temp")
}

/// The schemas of a path written as a setting's value (`a, "B c", pg_catalog`): split at
/// commas outside double quotes, unquoted names folded to lower case and trimmed, quoted
/// ones kept (`""` is a quote inside them).
pub fn parse_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c if quoted => cur.push(c),
            c if c.is_whitespace() => {}
            c => cur.extend(c.to_lowercase()),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_schema_before_an_explicit_pg_catalog_shadows_it() {
        for (path, shadows) in [
            ("public", false),
            ("\"$user\", public", false),
            ("pg_catalog, evil", false),
            ("pg_temp, pg_catalog, evil", false),
            ("evil, pg_catalog", true),
            ("\"$user\", pg_catalog", true),
            ("public,PG_CATALOG", true),
            // A quoted name keeps its case: not the catalog.
            ("evil, \"PG_CATALOG\"", false),
            ("", false),
        ] {
            assert_eq!(shadows_catalog(&parse_list(path)), shadows, "{path}");
        }
    }

    #[test]
    fn lists_split_outside_quotes_and_fold_unquoted_names() {
        assert_eq!(
            parse_list(r#" A , "b, ""c""" ,pg_catalog"#),
            ["a", r#"b, "c""#, "pg_catalog"]
        );
    }
}
