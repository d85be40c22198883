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
//! The same for operators (`builtin_operators.txt`): an operator runs a function too; and
//! for the relations of `pg_catalog` (`builtin_relations.txt`), which masking knows
//! without a catalog connection.
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

/// The names of a list file (one per line) and `extra`, sorted for binary search.
fn sorted(list: &'static str, extra: &[&'static str]) -> Vec<&'static str> {
    let mut v: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .chain(extra.iter().copied())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

static NAMES: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| sorted(include_str!("builtin_functions.txt"), SQL_FORMS));

/// Whether `name` (unqualified, as the classifier folds it) is one of PostgreSQL's own.
pub fn is_builtin(name: &str) -> bool {
    NAMES.binary_search(&name).is_ok()
}

/// The operator names of `pg_catalog` in PostgreSQL 15 (`SELECT DISTINCT oprname FROM
/// pg_operator WHERE oprnamespace = 'pg_catalog'::regnamespace`). An operator is a
/// function call under another name; one by a name PostgreSQL does not define (`~~~`,
/// an extension's `<=>`) runs someone else's function. A name is all that is known here:
/// an operator an extension defines under a built-in name (`<->`) passes for the
/// built-in.
static OPERATORS: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| sorted(include_str!("builtin_operators.txt"), &[]));

/// Whether an operator name is one PostgreSQL defines.
pub fn is_builtin_operator(name: &str) -> bool {
    OPERATORS.binary_search(&name).is_ok()
}

/// Every built-in operator name, for checking the list against a server.
pub fn operator_names() -> &'static [&'static str] {
    &OPERATORS
}

/// The relation names of `pg_catalog` in PostgreSQL 15, tables and views (`SELECT DISTINCT
/// relname FROM pg_class WHERE relnamespace = 'pg_catalog'::regnamespace AND relkind IN
/// ('r', 'v', 'm', 'p', 'f')`): what an unqualified `pg_class` names unless the session
/// has a temporary relation of that name (see `masking::plan::NoCatalog`).
static RELATIONS: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| sorted(include_str!("builtin_relations.txt"), &[]));

/// Whether a relation name is one of `pg_catalog`'s.
pub fn is_builtin_relation(name: &str) -> bool {
    RELATIONS.binary_search(&name).is_ok()
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

    #[test]
    fn operators_by_names_postgresql_does_not_define_run_someone_elses_functions() {
        let users = |sql: &str| {
            let c = classify(sql, LexOptions::default());
            assert!(c.error.is_none(), "{sql}: {:?}", c.error);
            c.statements[0]
                .user_functions
                .iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(users("SELECT 1 ~~~ 2"), ["~~~"]);
        assert_eq!(
            users("SELECT * FROM items ORDER BY embedding <=> '[1,2]'"),
            ["<=>"]
        );
        assert_eq!(users("SELECT a OPERATOR(~~~) b FROM t"), ["~~~"]);
        assert!(
            users(
                "SELECT a <<= b, a -|- b, j #- '{a}', a ~= b, x !~~* 'y', -a, |/ 4, \
             a OPERATOR(pg_catalog.+) b, a OPERATOR(=) b FROM t WHERE a <> b AND a != b"
            )
            .is_empty()
        );
        assert!(is_builtin_operator("<<=") && !is_builtin_operator("<=>"));
        assert!(operator_names().len() > 70, "{}", operator_names().len());
    }
}
