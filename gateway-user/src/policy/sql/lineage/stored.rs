//! Stored values: what a write puts into a table, and which columns each value is computed
//! from. Masking needs it because a mask covers columns where they are *read*: a value
//! copied inside the database (`INSERT INTO notes(text) SELECT phone FROM people`, `CREATE
//! TABLE t AS SELECT email AS x FROM users`) would be read back from its new place in the
//! clear. Knowing where each stored value comes from and where it goes lets the engine
//! refuse a copy whose new place no mask covers.
//!
//! Same conservative analysis as the output lineage: an expression depends on everything it
//! mentions, unqualified names on every relation in scope. Destinations are what the text
//! says: a named column, "the source's own names" (`CREATE TABLE t AS SELECT * FROM s`), a
//! position for the catalog to name (`INSERT INTO t SELECT ...` with no column list, or
//! after a table's `*`: the table's column order and the `*`'s width are in the catalog,
//! not in the text), or unknown (after a `*` of a function, whose width nobody knows).
//!
//! Pure: takes a parsed statement and returns facts.

use std::collections::BTreeSet;

use serde::Serialize;
use sqlparser::ast::{
    AlterColumnOperation, AlterTable, AlterTableOperation, AlterViewOperation, Assignment,
    AssignmentTarget, ColumnOption, Ident, MergeAction, MergeInsertKind, MergeUpdateKind,
    ObjectName, OnConflictAction, OnInsert, Query, RenameTableNameKind, SetExpr, Statement,
    TableFactor, TableObject,
};

use super::{
    ColumnRef, Deps, Item, Scope, StarSource, query_items, set_items, source_all, with_scope,
};
use crate::policy::sql::{TableName, explain_runs, expr_object_name, ident_name, parts};

/// Where in the written table a value goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Dest {
    /// This column.
    Column(String),
    /// Columns named as the source's own (`CREATE TABLE t AS SELECT * FROM s`).
    SameNames,
    /// One INSERT target whose column the catalog names (no column list, or after a `*`).
    Position(Slot),
    /// A relation's `*` inserted by position: its j-th column goes to the target `j`
    /// places after the slot's.
    Spread { slot: Slot, of: TableName },
    /// Columns nobody can name: a position after the `*` of a function or subquery
    /// whose width is not known, a MERGE that inserts or updates whole rows.
    Unknown,
    /// No table: what this function keeps of its arguments, where any statement reads it
    /// back (`setval`'s sequence value, an advisory lock's key; see
    /// [`crate::policy::sql::functions::keeps_arguments`]). No mask covers it.
    Kept(String),
}

/// Where an inserted item lands: target number `index` plus the widths, less one each, of
/// the relations whose `*` came before it, in `columns` (the statement's column list) or,
/// when the statement has none, in the table's columns in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Slot {
    pub index: usize,
    pub after: Vec<TableName>,
    pub columns: Vec<String>,
}

/// A value a statement stores, computed from table columns.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Stored {
    pub table: TableName,
    pub dest: Dest,
    pub deps: Deps,
    /// Written into rows of a relation that exists (`INSERT`, `UPDATE`, `MERGE`), which
    /// may keep them on another server (a foreign table). Otherwise the value goes into a
    /// table the statement creates (`CREATE TABLE ... AS`, `SELECT ... INTO`, a
    /// materialized view), or stays in the rows it is in under another name (`ALTER`).
    pub existing: bool,
}

/// The values a statement stores that are computed from something: what `INSERT`,
/// `UPDATE ... SET`, `INSERT ... ON CONFLICT DO UPDATE`, `MERGE`, `CREATE TABLE ... AS`,
/// `SELECT ... INTO` and `CREATE MATERIALIZED VIEW` write, what `ALTER TABLE` renames or
/// computes into a column, also inside `PREPARE`,
/// `EXPLAIN ANALYZE` and data-modifying CTEs. Values that depend on nothing (literals,
/// parameters) are left out.
pub fn stored(stmt: &Statement) -> Vec<Stored> {
    let mut out = Vec::new();
    statement(stmt, &Scope::root(), &mut out);
    out
}

fn statement(stmt: &Statement, scope: &Scope<'_>, out: &mut Vec<Stored>) {
    use Statement as S;
    match stmt {
        S::Query(q) => query(q, scope, out),
        S::Insert(ins) => {
            let table = match &ins.table {
                TableObject::TableName(n) => TableName::from_object(n),
                TableObject::TableFunction(_) | TableObject::TableQuery(_) => unknown_table(),
            };
            let columns: Vec<String> = ins.columns.iter().map(column_name).collect();
            if let Some(src) = &ins.source {
                let inner = with_scope(src, scope);
                writes_in_ctes(src, &inner, out);
                positional(&table, &columns, set_items(&src.body, &inner), out);
            }
            if let Some(OnInsert::OnConflict(c)) = &ins.on
                && let OnConflictAction::DoUpdate(u) = &c.action
            {
                let s = Scope::of_insert(ins, true, scope);
                assignments(&table, &u.assignments, &s, out);
            }
        }
        S::Update(u) => {
            let s = Scope::of_update(u, scope);
            assignments(&factor_table(&u.table.relation), &u.assignments, &s, out);
        }
        S::Merge(m) => {
            let s = Scope::of_merge(m, scope);
            let table = factor_table(&m.table);
            for clause in &m.clauses {
                match &clause.action {
                    MergeAction::Update(u) => match &u.kind {
                        MergeUpdateKind::Set(a) => assignments(&table, a, &s, out),
                        // `UPDATE SET *` is not PostgreSQL; every column from the source.
                        _ => push(&table, Dest::Unknown, everything(&s), out),
                    },
                    MergeAction::Insert(ins) => {
                        let columns: Vec<String> = ins.columns.iter().map(column_name).collect();
                        match &ins.kind {
                            MergeInsertKind::Values(v) => {
                                let items = set_items(&SetExpr::Values(v.clone()), &s);
                                positional(&table, &columns, items, out);
                            }
                            MergeInsertKind::Row | MergeInsertKind::Wildcard => {
                                push(&table, Dest::Unknown, everything(&s), out)
                            }
                        }
                    }
                    MergeAction::Delete { .. } | MergeAction::DoNothing { .. } => {}
                }
            }
        }
        S::CreateTable(ct) => {
            if let Some(q) = &ct.query {
                let columns: Vec<String> = ct.columns.iter().map(|c| ident_name(&c.name)).collect();
                let inner = with_scope(q, scope);
                writes_in_ctes(q, &inner, out);
                named(
                    &TableName::from_object(&ct.name),
                    &columns,
                    set_items(&q.body, &inner),
                    out,
                );
            }
        }
        S::CreateView(v) if v.materialized => {
            let columns: Vec<String> = v.columns.iter().map(|c| ident_name(&c.name)).collect();
            named(
                &TableName::from_object(&v.name),
                &columns,
                query_items(&v.query, scope),
                out,
            );
        }
        S::AlterTable(at) => alter_table(at, scope, out),
        // A materialized view stores its rows: renamed, they are read under the new names.
        // (A view's columns are what the view reads, whatever they are called.)
        S::AlterView(v) if v.materialized => {
            let renamed = Renamed::new(&v.name, scope);
            match &v.operation {
                AlterViewOperation::RenameColumn {
                    old_column_name,
                    new_column_name,
                } => renamed.column(old_column_name, new_column_name, out),
                AlterViewOperation::RenameTo { new_name } => renamed.relation(new_name, out),
                AlterViewOperation::SetSchema { schema_name } => renamed.schema(schema_name, out),
                _ => {}
            }
        }
        S::Prepare { statement: s, .. } => statement(s, scope, out),
        S::Explain { statement: s, .. } if explain_runs(stmt) => statement(s, scope, out),
        _ => {}
    }
}

/// A relation whose rows stay where they are under other names: a renamed column holds
/// what the old one did, a renamed or moved relation all it did.
struct Renamed<'a> {
    table: TableName,
    scope: Scope<'a>,
}

impl<'a> Renamed<'a> {
    fn new(name: &ObjectName, parent: &'a Scope<'a>) -> Self {
        let mut scope = Scope::child(parent);
        scope.add_relation(name, None, Vec::new());
        Self {
            table: TableName::from_object(name),
            scope,
        }
    }

    fn column(&self, old: &Ident, new: &Ident, out: &mut Vec<Stored>) {
        let deps = Deps {
            columns: BTreeSet::from([ColumnRef {
                table: self.table.clone(),
                column: Some(ident_name(old)),
            }]),
            opaque: false,
        };
        push_here(&self.table, Dest::Column(ident_name(new)), deps, out);
    }

    /// `RENAME TO`: the relation stays in its schema.
    fn relation(&self, new: &ObjectName, out: &mut Vec<Stored>) {
        let mut to = TableName::from_object(new);
        to.schema = to.schema.or_else(|| self.table.schema.clone());
        push_here(&to, Dest::SameNames, everything(&self.scope), out);
    }

    /// `SET SCHEMA`: same name, another schema.
    fn schema(&self, schema: &ObjectName, out: &mut Vec<Stored>) {
        let to = TableName {
            schema: parts(schema).pop(),
            name: self.table.name.clone(),
        };
        push_here(&to, Dest::SameNames, everything(&self.scope), out);
    }
}

/// `ALTER TABLE` moves values under other names: a renamed column or table holds what the
/// old one did, a generated column and a type change `USING` an expression store what it
/// computes.
fn alter_table(at: &AlterTable, scope: &Scope<'_>, out: &mut Vec<Stored>) {
    let renamed = Renamed::new(&at.name, scope);
    let (table, s) = (&renamed.table, &renamed.scope);
    for op in &at.operations {
        match op {
            AlterTableOperation::RenameColumn {
                old_column_name,
                new_column_name,
            } => renamed.column(old_column_name, new_column_name, out),
            AlterTableOperation::RenameTable {
                table_name: RenameTableNameKind::As(n) | RenameTableNameKind::To(n),
            } => renamed.relation(n, out),
            AlterTableOperation::AddColumn { column_def, .. } => {
                for o in &column_def.options {
                    if let ColumnOption::Generated {
                        generation_expr: Some(e),
                        ..
                    } = &o.option
                    {
                        let mut deps = Deps::default();
                        s.expr_deps(e, &mut deps);
                        push_here(table, Dest::Column(ident_name(&column_def.name)), deps, out);
                    }
                }
            }
            AlterTableOperation::AlterColumn {
                column_name,
                op: AlterColumnOperation::SetDataType { using: Some(e), .. },
            } => {
                let mut deps = Deps::default();
                s.expr_deps(e, &mut deps);
                push_here(table, Dest::Column(ident_name(column_name)), deps, out);
            }
            _ => {}
        }
    }
}

/// A query: `SELECT ... INTO`, `WITH ... INSERT/UPDATE/MERGE`, and writes in its CTEs.
fn query(q: &Query, scope: &Scope<'_>, out: &mut Vec<Stored>) {
    let inner = with_scope(q, scope);
    writes_in_ctes(q, &inner, out);
    match q.body.as_ref() {
        SetExpr::Select(sel) if sel.into.is_some() => {
            let table = sel
                .into
                .as_ref()
                .and_then(|i| i.targets.first())
                .and_then(expr_object_name)
                .map_or_else(unknown_table, |n| TableName::from_object(&n));
            named(&table, &[], set_items(&q.body, &inner), out);
        }
        SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Merge(s) => statement(s, &inner, out),
        _ => {}
    }
}

/// Data-modifying statements in a query's CTEs (`WITH c AS (INSERT ... RETURNING ...)`),
/// read in the scope of the CTEs before them.
fn writes_in_ctes(q: &Query, scope: &Scope<'_>, out: &mut Vec<Stored>) {
    if let Some(with) = &q.with {
        for cte in &with.cte_tables {
            query(&cte.query, scope, out);
        }
    }
}

/// `SET column = value, (a, b) = (...)`: each target gets what its value depends on (a
/// tuple's columns each get the whole tuple's).
fn assignments(table: &TableName, list: &[Assignment], scope: &Scope<'_>, out: &mut Vec<Stored>) {
    for a in list {
        let mut deps = Deps::default();
        scope.expr_deps(&a.value, &mut deps);
        let targets = match &a.target {
            AssignmentTarget::ColumnName(n) => std::slice::from_ref(n),
            AssignmentTarget::Tuple(ns) => ns.as_slice(),
        };
        for n in targets {
            push(table, Dest::Column(column_name(n)), deps.clone(), out);
        }
    }
}

/// Items stored by position into `columns` (INSERT): exact while the list reaches and no
/// `*` came first; otherwise a [`Slot`] for the catalog to name (the table's order, the
/// widths of the `*`s before it), and unknown after a `*` whose width nobody knows.
fn positional(table: &TableName, columns: &[String], items: Vec<Item>, out: &mut Vec<Stored>) {
    let mut after: Vec<TableName> = Vec::new();
    let mut known_width = true;
    for (index, item) in items.into_iter().enumerate() {
        let mut deps = Deps::default();
        item.all_deps(&mut deps);
        let slot = |after: &[TableName]| Slot {
            index,
            after: after.to_vec(),
            columns: columns.to_vec(),
        };
        let dest = match &item {
            _ if !known_width => Dest::Unknown,
            Item::Column { .. } if after.is_empty() && !columns.is_empty() => columns
                .get(index)
                .map_or(Dest::Unknown, |c| Dest::Column(c.clone())),
            Item::Column { .. } => Dest::Position(slot(&after)),
            Item::Star(StarSource::Relation(t)) => {
                let d = Dest::Spread {
                    slot: slot(&after),
                    of: t.clone(),
                };
                after.push(t.clone());
                d
            }
            Item::Star(StarSource::Deps(_)) => {
                known_width = false;
                Dest::Unknown
            }
        };
        push(table, dest, deps, out);
    }
}

/// Items that become the columns of a new table (CREATE TABLE AS, SELECT INTO,
/// materialized views): named by the column list where it reaches, else by the items' own
/// output names; a `*` over a table keeps that table's names.
fn named(table: &TableName, columns: &[String], items: Vec<Item>, out: &mut Vec<Stored>) {
    let mut exact = true;
    for (i, item) in items.into_iter().enumerate() {
        let listed = if exact { columns.get(i) } else { None };
        let in_list = i < columns.len();
        let (dest, deps) = match item {
            Item::Column { name, deps } => {
                let dest = match (listed, name) {
                    (Some(c), _) => Dest::Column(c.clone()),
                    (None, Some(n)) if !in_list => Dest::Column(n),
                    _ => Dest::Unknown,
                };
                (dest, deps)
            }
            Item::Star(star) => {
                exact = false;
                let dest = match &star {
                    StarSource::Relation(_) if columns.len() <= i => Dest::SameNames,
                    _ => Dest::Unknown,
                };
                let mut deps = Deps::default();
                Item::Star(star).all_deps(&mut deps);
                (dest, deps)
            }
        };
        push_here(table, dest, deps, out);
    }
}

/// A value written into rows of an existing relation.
fn push(table: &TableName, dest: Dest, deps: Deps, out: &mut Vec<Stored>) {
    push_as(table, dest, deps, true, out);
}

/// A value stored in a table the statement creates, or moved within its rows.
fn push_here(table: &TableName, dest: Dest, deps: Deps, out: &mut Vec<Stored>) {
    push_as(table, dest, deps, false, out);
}

pub(super) fn push_as(
    table: &TableName,
    dest: Dest,
    deps: Deps,
    existing: bool,
    out: &mut Vec<Stored>,
) {
    if !deps.is_empty() {
        out.push(Stored {
            table: table.clone(),
            dest,
            deps,
            existing,
        });
    }
}

/// Everything every source in scope holds (a MERGE inserting or updating the whole source
/// row).
fn everything(scope: &Scope<'_>) -> Deps {
    let mut d = Deps::default();
    for s in &scope.sources {
        d.extend(&source_all(s));
    }
    d
}

/// A column named in a column list or a SET target: its first part (`SET col.field = ...`
/// and `SET col[1] = ...` write `col`).
fn column_name(n: &ObjectName) -> String {
    parts(n).into_iter().next().unwrap_or_default()
}

fn factor_table(f: &TableFactor) -> TableName {
    match f {
        TableFactor::Table { name, .. } => TableName::from_object(name),
        _ => unknown_table(),
    }
}

/// A table the text does not name: only a pattern with `*` for the table covers it.
pub(super) fn unknown_table() -> TableName {
    TableName {
        schema: None,
        name: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sql::{LexOptions, classify, functions::Danger};

    /// `table.dest <- deps` per stored value.
    fn stored_of(sql: &str) -> Vec<String> {
        let c = classify(sql, LexOptions::default());
        assert!(c.error.is_none(), "{sql}: {:?}", c.error);
        c.statements
            .iter()
            .flat_map(|s| s.stored.iter())
            .map(|s| {
                let slot = |sl: &Slot| {
                    let list = if sl.columns.is_empty() {
                        String::new()
                    } else {
                        format!(" of {}", sl.columns.join(","))
                    };
                    let after: String = sl.after.iter().map(|t| format!("+{t}.*")).collect();
                    format!("#{}{after}{list}", sl.index)
                };
                let dest = match &s.dest {
                    Dest::Column(c) => c.clone(),
                    Dest::SameNames => "=".into(),
                    Dest::Position(sl) => slot(sl),
                    Dest::Spread { slot: sl, of } => format!("{}<{of}.*>", slot(sl)),
                    Dest::Unknown => "?".into(),
                    Dest::Kept(f) => format!("<{f}>"),
                };
                let mut deps: Vec<String> = s
                    .deps
                    .columns
                    .iter()
                    .map(|r| match &r.column {
                        Some(c) => format!("{}.{c}", r.table),
                        None => format!("{}.*", r.table),
                    })
                    .collect();
                if s.deps.opaque {
                    deps.push("opaque".into());
                }
                format!("{}.{dest} <- {}", s.table, deps.join(" "))
            })
            .collect()
    }

    #[test]
    fn insert_select_goes_by_position_into_the_column_list() {
        assert_eq!(
            stored_of("INSERT INTO notes (body, at) SELECT phone, now() FROM people"),
            ["notes.body <- people.phone"]
        );
        // Without a column list, or after a table's `*`: a position for the catalog.
        assert_eq!(
            stored_of("INSERT INTO notes SELECT id, phone FROM people"),
            ["notes.#0 <- people.id", "notes.#1 <- people.phone"]
        );
        assert_eq!(
            stored_of("INSERT INTO notes (a, b) SELECT * FROM people"),
            ["notes.#0 of a,b<people.*> <- people.*"]
        );
        assert_eq!(
            stored_of("INSERT INTO archive SELECT p.*, u.email, now(), u.* FROM people p, users u"),
            [
                "archive.#0<people.*> <- people.*",
                "archive.#1+people.* <- users.email",
                "archive.#3+people.*<users.*> <- users.*"
            ]
        );
        // Past a `*` whose width nobody knows, nothing is placed.
        assert_eq!(
            stored_of("INSERT INTO notes SELECT *, p.phone FROM people p, generate_series(1, 2)"),
            ["notes.#0<people.*> <- people.*", "notes.? <- people.phone"]
        );
        assert_eq!(
            stored_of("INSERT INTO notes (a) VALUES ((SELECT email FROM users LIMIT 1))"),
            ["notes.a <- users.email"]
        );
        // Literals and parameters store nothing traced.
        assert!(stored_of("INSERT INTO notes (a, b) VALUES ('x', $1)").is_empty());
        assert!(stored_of("INSERT INTO notes DEFAULT VALUES").is_empty());
    }

    #[test]
    fn update_set_and_on_conflict() {
        assert_eq!(
            stored_of("UPDATE people SET note = upper(phone), n = 1 WHERE email = 'a'"),
            ["people.note <- people.phone"]
        );
        assert_eq!(
            stored_of("UPDATE t SET x = u.email FROM users u WHERE u.id = t.id"),
            ["t.x <- users.email"]
        );
        assert_eq!(
            stored_of("UPDATE t SET (a, b) = (SELECT email, 1 FROM users)"),
            // `email` could also be the outer t's.
            ["t.a <- t.email users.email", "t.b <- t.email users.email"]
        );
        assert_eq!(
            stored_of(
                "INSERT INTO t (id, x) VALUES (1, 'a') \
                 ON CONFLICT (id) DO UPDATE SET x = excluded.x || t.email"
            ),
            ["t.x <- t.email t.x"]
        );
    }

    #[test]
    fn new_tables_take_the_names_of_their_query() {
        assert_eq!(
            stored_of("CREATE TABLE t AS SELECT email AS x, lower(email), id FROM users"),
            [
                "t.x <- users.email",
                "t.lower <- users.email",
                "t.id <- users.id"
            ]
        );
        assert_eq!(
            stored_of("CREATE TABLE t AS SELECT * FROM users"),
            ["t.= <- users.*"]
        );
        assert_eq!(
            stored_of("CREATE TABLE t AS TABLE users"),
            ["t.= <- users.*"]
        );
        assert_eq!(
            stored_of("SELECT email AS contact INTO TEMP t FROM users"),
            ["t.contact <- users.email"]
        );
        assert_eq!(
            stored_of("CREATE MATERIALIZED VIEW m AS SELECT email || '' AS e FROM users"),
            ["m.e <- users.email"]
        );
        // A plain view stores nothing: reads of it are traced through its definition.
        assert!(stored_of("CREATE VIEW v AS SELECT email FROM users").is_empty());
    }

    #[test]
    fn what_calls_keep_wherever_they_are() {
        assert_eq!(
            stored_of("SELECT setval('s', salary) FROM people p WHERE p.id = 1"),
            [".<setval> <- people.salary"]
        );
        assert_eq!(
            stored_of(
                "SELECT setval(pg_get_serial_sequence('t', 'id'), coalesce(max(id), 1)) FROM t"
            ),
            [".<setval> <- t.id"]
        );
        assert_eq!(
            stored_of("SELECT setval('s', (SELECT max(id) FROM t))"),
            [".<setval> <- t.id"]
        );
        // Literals keep nothing computed from rows.
        assert!(stored_of("SELECT setval('s', 42), pg_advisory_lock(7)").is_empty());
        // Outside the select list, in the scope of the query the call is in.
        assert_eq!(
            stored_of("SELECT id FROM jobs WHERE pg_try_advisory_lock(id) ORDER BY id LIMIT 1"),
            [".<pg_try_advisory_lock> <- jobs.id"]
        );
        assert_eq!(
            stored_of(
                "SELECT j.id FROM jobs j JOIN people p ON pg_advisory_lock(p.salary) IS NOT NULL \
                 GROUP BY j.id HAVING pg_try_advisory_lock(max(j.id)) \
                 ORDER BY setval('s', max(j.id))"
            ),
            [
                ".<pg_advisory_lock> <- people.salary",
                ".<pg_try_advisory_lock> <- jobs.id",
                ".<setval> <- jobs.id",
            ]
        );
        // Nested queries, derived tables and CTEs in their own scope.
        assert_eq!(
            stored_of("SELECT (SELECT setseed(salary / 1e7) FROM people WHERE id = 1)"),
            [".<setseed> <- people.salary"]
        );
        assert_eq!(
            stored_of(
                "WITH c AS (SELECT id, pg_try_advisory_lock(id) AS got FROM jobs) \
                 SELECT * FROM (SELECT setval('s', c.id) FROM c) d"
            ),
            [".<pg_try_advisory_lock> <- jobs.id", ".<setval> <- jobs.id"]
        );
        assert_eq!(
            stored_of(
                "SELECT 1 FROM jobs WHERE id IN \
                 (SELECT id FROM people WHERE pg_try_advisory_lock(hashtext(email)))"
            ),
            // An unqualified name may also be the outer query's column.
            [".<pg_try_advisory_lock> <- jobs.email people.email"]
        );
        // Writes: UPDATE and DELETE in their target's scope, INSERT's source in its own.
        assert_eq!(
            stored_of("UPDATE jobs SET taken = true WHERE pg_try_advisory_lock(id)"),
            [".<pg_try_advisory_lock> <- jobs.id"]
        );
        assert_eq!(
            stored_of("DELETE FROM jobs USING people p WHERE pg_try_advisory_lock(p.salary)"),
            [".<pg_try_advisory_lock> <- people.salary"]
        );
        assert_eq!(
            stored_of(
                "INSERT INTO log (n) SELECT 1 FROM people WHERE pg_try_advisory_lock(salary)"
            ),
            [".<pg_try_advisory_lock> <- people.salary"]
        );
    }

    #[test]
    fn every_side_channel_call_must_be_traced_for_the_danger_to_go() {
        let danger = |sql: &str| {
            classify(sql, LexOptions::default())
                .statements
                .iter()
                .any(|c| c.dangerous.iter().any(|(_, d)| *d == Danger::SideChannel))
        };
        for sql in [
            "SELECT id FROM jobs WHERE pg_try_advisory_lock(id)",
            "SELECT (SELECT setseed(salary / 1e7) FROM people WHERE id = 1)",
            "UPDATE jobs SET n = setval('s', n) WHERE pg_try_advisory_lock(id)",
        ] {
            assert!(!danger(sql), "{sql}");
        }
        // A table function's arguments, a view's definition and a cursor's query are not
        // traced: one such call keeps the danger, whatever else was traced.
        for sql in [
            "SELECT * FROM people p, LATERAL pg_advisory_xact_lock(p.id, p.salary)",
            "SELECT setval('s', x.id) FROM people x, LATERAL pg_advisory_xact_lock(x.salary)",
            "CREATE VIEW v AS SELECT setval('s', salary) FROM people",
            "DECLARE c CURSOR FOR SELECT pg_advisory_lock(salary) FROM people",
        ] {
            assert!(danger(sql), "{sql}");
        }
    }

    #[test]
    fn alter_table_renames_and_computed_columns() {
        assert_eq!(
            stored_of("ALTER TABLE people RENAME COLUMN phone TO contact"),
            ["people.contact <- people.phone"]
        );
        assert_eq!(
            stored_of("ALTER TABLE app.people RENAME TO folks"),
            ["app.folks.= <- app.people.*"]
        );
        // A materialized view holds its rows as a table does.
        assert_eq!(
            stored_of("ALTER MATERIALIZED VIEW app.mv RENAME COLUMN phone TO contact"),
            ["app.mv.contact <- app.mv.phone"]
        );
        assert_eq!(
            stored_of("ALTER MATERIALIZED VIEW mv RENAME TO folks"),
            ["folks.= <- mv.*"]
        );
        assert_eq!(
            stored_of("ALTER MATERIALIZED VIEW app.mv SET SCHEMA archive"),
            ["archive.mv.= <- app.mv.*"]
        );
        // A view stores nothing: its columns are what it reads, whatever they are called.
        assert!(stored_of("ALTER VIEW v RENAME COLUMN phone TO contact").is_empty());
        assert_eq!(
            stored_of(
                "ALTER TABLE people ADD COLUMN c text GENERATED ALWAYS AS (lower(email)) STORED"
            ),
            ["people.c <- people.email"]
        );
        assert_eq!(
            stored_of("ALTER TABLE people ALTER COLUMN note TYPE text USING phone::text"),
            ["people.note <- people.phone"]
        );
        assert!(stored_of("ALTER TABLE people ADD COLUMN n int DEFAULT 0").is_empty());
    }

    #[test]
    fn merge_clauses() {
        assert_eq!(
            stored_of(
                "MERGE INTO t USING users u ON t.id = u.id \
                 WHEN MATCHED THEN UPDATE SET x = u.email \
                 WHEN NOT MATCHED THEN INSERT (id, x) VALUES (u.id, u.phone)"
            ),
            [
                "t.x <- users.email",
                "t.id <- users.id",
                "t.x <- users.phone"
            ]
        );
    }

    #[test]
    fn writes_inside_other_statements_and_through_ctes() {
        assert_eq!(
            stored_of(
                "WITH src AS (SELECT email AS e FROM users) \
                 INSERT INTO notes (body) SELECT e FROM src"
            ),
            ["notes.body <- users.email"]
        );
        assert_eq!(
            stored_of(
                "WITH moved AS (INSERT INTO notes (body) SELECT phone FROM people RETURNING id) \
                 SELECT count(*) FROM moved"
            ),
            ["notes.body <- people.phone"]
        );
        assert_eq!(
            stored_of("PREPARE p AS INSERT INTO notes (body) SELECT email FROM users"),
            ["notes.body <- users.email"]
        );
        assert_eq!(
            stored_of("EXPLAIN ANALYZE INSERT INTO notes (body) SELECT email FROM users"),
            ["notes.body <- users.email"]
        );
        // A plan alone stores nothing.
        assert!(stored_of("EXPLAIN INSERT INTO notes (body) SELECT email FROM users").is_empty());
    }
}
