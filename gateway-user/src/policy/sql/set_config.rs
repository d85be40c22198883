//! `set_config(name, value, is_local)` calls that are a `SET` written as a function.
//!
//! `SELECT pg_catalog.set_config('search_path', '', false)` is what pg_dump sends first,
//! and it does exactly what `SET search_path = ''` does. When the setting's name and value
//! are known from the text, the call is judged as that `SET` (its kind, `set_role` for
//! `role`, and the checks a `SET` of `search_path` or `client_encoding` gets); any other
//! call, whose name or value comes from rows or parameters, stays the `config` danger.
//!
//! The name is known when it is a string literal, or when the call is in the select list of
//! a query over `pg_settings` alone whose `WHERE` fixes the column `name` to a literal and
//! the call's name is that column: pg_dump's `SELECT set_config(name, 'view,
//! foreign-table', false) FROM pg_settings WHERE name =
//! 'restrict_nonsystem_relation_kind'`, which sets the parameter only on servers that
//! have it.
//!
//! Pure.

use sqlparser::ast::{
    BinaryOperator, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, Query,
    SelectItem, SetExpr, TableFactor, Value,
};

use super::{TableName, ident_name, parts, predicate};

/// The parameter a `set_config` call sets and the value it gives, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Lower case: parameter names are matched without regard to case.
    pub name: String,
    pub value: String,
}

/// The setting `f` makes, when it is PostgreSQL's `set_config` (unqualified or in
/// `pg_catalog`) with a string literal value, a boolean literal `is_local`, and a name
/// that is a string literal or the column `name` fixed to `pinned` by the query around it.
pub fn setting(f: &Function, pinned: Option<&str>) -> Option<Setting> {
    if !matches!(
        parts(&f.name)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["set_config"] | ["pg_catalog", "set_config"]
    ) {
        return None;
    }
    let FunctionArguments::List(l) = &f.args else {
        return None;
    };
    if l.duplicate_treatment.is_some() || !l.clauses.is_empty() {
        return None;
    }
    let [name, value, local] = l.args.as_slice() else {
        return None;
    };
    fn expr(a: &FunctionArg) -> Option<&Expr> {
        match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        }
    }
    let name = match expr(name)? {
        Expr::Value(v) => string(&v.value)?,
        Expr::Identifier(i) if is_name_column(i) => pinned?.to_owned(),
        _ => return None,
    };
    let value = match expr(value)? {
        Expr::Value(v) => string(&v.value)?,
        _ => return None,
    };
    match expr(local)? {
        Expr::Value(v) if matches!(v.value, Value::Boolean(_)) => {}
        _ => return None,
    }
    Some(Setting {
        name: name.to_lowercase(),
        value,
    })
}

/// For a query over `pg_settings` alone (`pg_catalog.pg_settings`, or unqualified and not
/// a CTE's name: `is_cte`) whose `WHERE` requires `name = '<literal>'` (alone or as one of
/// `AND`ed conditions), that literal: the only value the column `name` has in its select
/// list. (`pg_settings.name` is text, so `=` is text equality; a temporary table of that
/// name with a column of a type whose `=` is something else would take a type and an
/// operator created first.)
pub fn pinned_name(q: &Query, is_cte: impl Fn(&TableName) -> bool) -> Option<String> {
    let SetExpr::Select(s) = q.body.as_ref() else {
        return None;
    };
    let [from] = s.from.as_slice() else {
        return None;
    };
    if !from.joins.is_empty() {
        return None;
    }
    let TableFactor::Table {
        name, alias: None, ..
    } = &from.relation
    else {
        return None;
    };
    match parts(name)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["pg_catalog", "pg_settings"] => {}
        ["pg_settings"] if !is_cte(&TableName::from_object(name)) => {}
        _ => return None,
    }
    let conditions = predicate::operands(s.selection.as_ref()?, &BinaryOperator::And);
    conditions
        .into_iter()
        .map(predicate::strip)
        .find_map(|c| match c {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => match (left.as_ref(), right.as_ref()) {
                (Expr::Identifier(i), Expr::Value(v)) | (Expr::Value(v), Expr::Identifier(i))
                    if is_name_column(i) =>
                {
                    string(&v.value)
                }
                _ => None,
            },
            _ => None,
        })
}

/// The calls in a query's own select list (not in nested queries): those a pinned name
/// applies to.
pub fn select_list_calls(q: &Query) -> Vec<&Function> {
    let SetExpr::Select(s) = q.body.as_ref() else {
        return Vec::new();
    };
    s.projection
        .iter()
        .filter_map(|item| match item {
            SelectItem::UnnamedExpr(Expr::Function(f))
            | SelectItem::ExprWithAlias {
                expr: Expr::Function(f),
                ..
            } => Some(f),
            _ => None,
        })
        .collect()
}

fn is_name_column(i: &Ident) -> bool {
    ident_name(i) == "name"
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::SingleQuotedString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::{dialect::PostgreSqlDialect, parser::Parser};

    fn query(sql: &str) -> Query {
        match Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .expect("parses")
            .remove(0)
        {
            sqlparser::ast::Statement::Query(q) => *q,
            other => panic!("not a query: {other}"),
        }
    }

    fn settings(sql: &str) -> Vec<Option<Setting>> {
        let q = query(sql);
        let pinned = pinned_name(&q, |_| false);
        select_list_calls(&q)
            .into_iter()
            .map(|f| setting(f, pinned.as_deref()))
            .collect()
    }

    fn set(name: &str, value: &str) -> Option<Setting> {
        Some(Setting {
            name: name.into(),
            value: value.into(),
        })
    }

    #[test]
    fn literal_calls_of_the_built_in_are_settings() {
        assert_eq!(
            settings("SELECT pg_catalog.set_config('search_path', '', false)"),
            [set("search_path", "")]
        );
        assert_eq!(
            settings("SELECT SET_CONFIG('Role', 'admin', true) AS r"),
            [set("role", "admin")]
        );
    }

    #[test]
    fn anything_not_known_from_the_text_is_not() {
        for sql in [
            // Another schema's function of that name.
            "SELECT app.set_config('search_path', '', false)",
            "SELECT \"SET_CONFIG\"('search_path', '', false)",
            // Name, value or scope from rows, parameters or expressions.
            "SELECT set_config(name, 'x', false) FROM t",
            "SELECT set_config($1, 'x', false)",
            "SELECT set_config('role', $1, false)",
            "SELECT set_config('role', 'a' || 'b', false)",
            "SELECT set_config('role', 'admin', $1)",
            "SELECT set_config('role', 'admin')",
            "SELECT set_config(value => 'x', name => 'role', is_local => false)",
        ] {
            assert_eq!(settings(sql), [None], "{sql}");
        }
    }

    #[test]
    fn pg_dumps_guarded_form_is_pinned_by_its_where() {
        assert_eq!(
            settings(
                "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings \
                 WHERE name = 'restrict_nonsystem_relation_kind'"
            ),
            [set(
                "restrict_nonsystem_relation_kind",
                "view, foreign-table"
            )]
        );
        assert_eq!(
            settings(
                "SELECT pg_catalog.set_config(name, 'x', false) FROM pg_catalog.pg_settings \
                 WHERE (context <> 'internal' AND 'Role' = name)"
            ),
            [set("role", "x")]
        );
        for sql in [
            // Not fixed: any parameter's name.
            "SELECT set_config(name, 'x', false) FROM pg_settings",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a' OR true",
            "SELECT set_config(name, 'x', false) FROM pg_settings WHERE name <> 'a'",
            // Another relation, a join, an alias that could hide another `name`.
            "SELECT set_config(name, 'x', false) FROM app.pg_settings WHERE name = 'a'",
            "SELECT set_config(name, 'x', false) FROM pg_settings, t WHERE name = 'a'",
            "SELECT set_config(name, 'x', false) FROM pg_settings s WHERE name = 'a'",
        ] {
            assert_eq!(settings(sql), [None], "{sql}");
        }
        // A CTE of that name.
        let q = query("SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'a'");
        assert_eq!(pinned_name(&q, |t| t.name == "pg_settings"), None);
    }
}
