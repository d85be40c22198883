//! What calls that keep their arguments keep (`setval`, advisory locks, large-object
//! positions, `setseed`: [`keeps_arguments`]), wherever a statement makes them: in select
//! lists, `WHERE`, `JOIN ... ON`, `GROUP BY`, `HAVING`, `ORDER BY`, nested queries, CTEs,
//! derived tables, `COPY (query) TO`, and the expressions of `UPDATE`, `DELETE`, `MERGE`
//! and `INSERT ... ON CONFLICT` / `RETURNING`. A kept value is read back by any statement
//! (a sequence's value, a lock held in `pg_locks`), so it is a copy to a place no mask
//! covers:
//! `SELECT 1 FROM users WHERE pg_advisory_lock(hashtext(email)) IS NULL` puts each e-mail
//! address's hash where `pg_locks` shows it.
//!
//! Each call is traced to the columns its arguments are computed from, resolved in the
//! scope of the query it is in (conservatively: an unqualified name depends on every
//! relation in scope), and reported as a [`Stored`] value with [`Dest::Kept`] for the copy
//! check to judge against the masks. The calls traced are reported too, by the address of
//! their name in the statement's tree: the classifier compares them with the calls it
//! counted in the same tree, and a statement stays a `side_channel` danger unless every
//! one was traced. What is not traced here (calls in a view's definition, a cursor's query,
//! a table function's arguments in `FROM`, column defaults) therefore keeps the danger.
//!
//! Pure: takes a parsed statement and returns facts.

use std::collections::HashSet;

use sqlparser::ast::{
    CopySource, Expr, FunctionArguments, OnInsert, Query, Select, SetExpr, Statement, Visit,
};

use super::{
    Level, MAX_DEPTH, Scope, at_level,
    stored::{Dest, Stored, push_as, unknown_table},
    with_scope,
};
use crate::policy::sql::{explain_runs, functions::keeps_arguments, parts};

/// The values calls keep, and which calls were traced.
#[derive(Debug, Default)]
pub struct Kept {
    pub stored: Vec<Stored>,
    /// The address of each traced call's name (`&Function::name`) in the statement given.
    pub calls: HashSet<usize>,
}

/// What the calls of `stmt` that keep their arguments keep (see the module's comment).
pub fn kept(stmt: &Statement) -> Kept {
    let mut k = Kept::default();
    statement(stmt, &Scope::root(), &mut k);
    k
}

fn statement(stmt: &Statement, scope: &Scope<'_>, k: &mut Kept) {
    use Statement as S;
    match stmt {
        S::Query(q) => query(q, scope, k),
        S::Insert(ins) => {
            // The source is read in the statement's scope; ON CONFLICT and RETURNING in the
            // target's (with `excluded`, the row proposed).
            if let Some(src) = &ins.source {
                query(src, scope, k);
            }
            if let Some(on @ OnInsert::OnConflict(_)) = &ins.on {
                exprs(on, &Scope::of_insert(ins, true, scope), k);
            }
            if let Some(r) = &ins.returning {
                exprs(r, &Scope::of_insert(ins, false, scope), k);
            }
        }
        S::Update(u) => exprs(u, &Scope::of_update(u, scope), k),
        S::Delete(d) => exprs(d, &Scope::of_delete(d, scope), k),
        S::Merge(m) => exprs(m, &Scope::of_merge(m, scope), k),
        S::CreateTable(ct) => {
            if let Some(q) = &ct.query {
                query(q, scope, k);
            }
        }
        // A materialized view runs its query when it is created (a view only when read).
        S::CreateView(v) if v.materialized => query(&v.query, scope, k),
        S::Copy {
            source: CopySource::Query(q),
            ..
        } => query(q, scope, k),
        S::Prepare { statement: s, .. } => statement(s, scope, k),
        S::Explain { statement: s, .. } if explain_runs(stmt) => statement(s, scope, k),
        _ => {}
    }
}

/// A query: its CTEs (data-modifying ones too), its body, and its `ORDER BY`/`LIMIT`,
/// which are read in the scope of the select they sort.
fn query(q: &Query, scope: &Scope<'_>, k: &mut Kept) {
    if scope.depth() >= MAX_DEPTH {
        return;
    }
    let inner = with_scope(q, scope);
    if let Some(with) = &q.with {
        for cte in &with.cte_tables {
            query(&cte.query, &inner, k);
        }
    }
    match q.body.as_ref() {
        SetExpr::Select(sel) => {
            let s = select(sel, &inner, k);
            if let Some(o) = &q.order_by {
                exprs(o, &s, k);
            }
            if let Some(l) = &q.limit_clause {
                exprs(l, &s, k);
            }
        }
        body => set_expr(body, &inner, k),
    }
}

fn set_expr(body: &SetExpr, scope: &Scope<'_>, k: &mut Kept) {
    match body {
        SetExpr::Select(sel) => {
            select(sel, scope, k);
        }
        SetExpr::Query(q) => query(q, scope, k),
        SetExpr::SetOperation { left, right, .. } => {
            set_expr(left, scope, k);
            set_expr(right, scope, k);
        }
        SetExpr::Values(v) => exprs(v, scope, k),
        SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
            statement(s, scope, k)
        }
        SetExpr::Table(_) => {}
    }
}

/// Every expression of a select (select list, `FROM` with its joins, `WHERE`, `GROUP BY`,
/// `HAVING`, windows), in the scope of its `FROM`; returns that scope.
fn select<'p>(sel: &Select, scope: &'p Scope<'p>, k: &mut Kept) -> Scope<'p> {
    let mut s = Scope::child(scope);
    s.add_from(&sel.from);
    exprs(sel, &s, k);
    s
}

/// Traces the calls in `node` at this level in `scope`; nested queries (subqueries,
/// derived tables) in their own scope, as children of this one.
fn exprs<V: Visit>(node: &V, scope: &Scope<'_>, k: &mut Kept) {
    at_level(node, |n| match n {
        Level::Query(q) => query(q, scope, k),
        Level::Expr(Expr::Function(f)) => {
            let FunctionArguments::List(l) = &f.args else {
                return;
            };
            let name = parts(&f.name).pop().unwrap_or_default();
            if !keeps_arguments(&name) {
                return;
            }
            let deps = scope.args_deps(&l.args);
            if !deps.is_empty() {
                k.calls.insert(std::ptr::from_ref(&f.name) as usize);
                push_as(
                    &unknown_table(),
                    Dest::Kept(name),
                    deps,
                    false,
                    &mut k.stored,
                );
            }
        }
        Level::Expr(_) => {}
    });
}
