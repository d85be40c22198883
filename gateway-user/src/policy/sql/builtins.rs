//! PostgreSQL's own functions, to tell them from the database's and its extensions'
//! (`user_functions` matcher): a function someone created may read any table or change
//! anything, and what it does is not in the statement's text.
//!
//! The list is every function name in `pg_catalog` of PostgreSQL 15
//! (`SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace`),
//! plus the SQL forms that parse as calls but are not functions in the catalog
//! (`COALESCE`, `GREATEST`, `CURRENT_USER`, ...). A built-in added by a later release is
//! taken for a user function until the list is regenerated: the cautious side. The
//! end-to-end tests check the list against the server they start.
//!
//! Pure.

use std::sync::LazyLock;

/// SQL forms the parser reports as function calls that `pg_proc` does not list.
const SQL_FORMS: &[&str] = &[
    "coalesce",
    "current_catalog",
    "current_date",
    "current_role",
    "current_time",
    "current_timestamp",
    "current_user",
    "greatest",
    "grouping",
    "least",
    "localtime",
    "localtimestamp",
    "nullif",
    "row",
    "session_user",
    "system_user",
    "user",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
];

static NAMES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let mut v: Vec<&str> = include_str!("builtin_functions.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .chain(SQL_FORMS.iter().copied())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
});

/// Whether `name` (unqualified, as the classifier folds it) is one of PostgreSQL's own.
pub fn is_builtin(name: &str) -> bool {
    NAMES.binary_search(&name).is_ok()
}

/// Every built-in name, for checking the list against a server.
pub fn names() -> &'static [&'static str] {
    &NAMES
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sql::{LexOptions, classify};

    #[test]
    fn everyday_sql_calls_only_built_ins() {
        let c = classify(
            "SELECT coalesce(a, 1), nullif(a, b), greatest(1, 2), least(1, 2), current_date, \
             current_timestamp, now(), extract(year FROM now()), position('a' IN 'b'), \
             substring('a' FROM 1), trim(' a '), CAST(1 AS text), lower(x), count(*), \
             sum(n) OVER (PARTITION BY a), row_number() OVER (), jsonb_build_object('a', 1), \
             to_char(now(), 'YYYY'), gen_random_uuid(), array_agg(x), string_agg(x, ','), \
             date_trunc('day', now()), md5('x'), generate_series(1, 3), current_user, \
             session_user, pg_catalog.lower('A') FROM t",
            LexOptions::default(),
        );
        assert!(c.error.is_none(), "{:?}", c.error);
        let s = &c.statements[0];
        assert!(s.user_functions.is_empty(), "{:?}", s.user_functions);
        assert!(s.functions.contains("coalesce") && s.functions.contains("count"));
    }

    #[test]
    fn functions_of_the_database_or_of_another_schema_are_user_functions() {
        let c = classify(
            "SELECT refresh_stats(), uuid_generate_v4(), app.lower(x), public.now() FROM t",
            LexOptions::default(),
        );
        let s = &c.statements[0];
        assert_eq!(
            s.user_functions
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            [
                "app.lower",
                "public.now",
                "refresh_stats",
                "uuid_generate_v4"
            ]
        );
        assert!(is_builtin("pg_read_file") && !is_builtin("refresh_stats"));
        assert!(names().len() > 2500, "{}", names().len());
    }
}
