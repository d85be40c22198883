//! Output lineage: which table columns each output column of a statement is computed from.
//!
//! Masking needs it: `upper(email)`, `email || ''`, a subquery, a CTE or a `UNION` branch
//! all carry `users.email` into an output column that PostgreSQL's RowDescription does not
//! attribute to any table. The analysis is conservative — when a name could come from
//! several places, every one of them counts:
//! - an expression depends on every column it mentions (arguments, CASE conditions, window
//!   clauses, scalar subqueries' outputs), and a whole-row reference (`to_jsonb(u)`,
//!   `row_to_json(u.*)`) depends on every column of its relation;
//! - an unqualified column name depends on that name in every relation in scope, inner and
//!   outer (the catalog is not consulted here, so it is not known which has it);
//! - a table function's columns depend on its arguments;
//! - `*` over a table or view is a [`Item::Star`] of unknown width: RowDescription's table
//!   OIDs, or the catalog, say what it expanded to.
//!
//! What this cannot see: functions that read tables themselves (a user function returning
//! `users.email`), and predicates (`WHERE email LIKE 'a%'` leaks one bit per row). Those
//! limits are documented in docs/postgres.md.
//!
//! Pure: takes a parsed statement and returns facts.

use std::{collections::BTreeSet, ops::ControlFlow};

use serde::Serialize;
use sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Delete, Expr,
    FromTable, FunctionArg, FunctionArgExpr, FunctionArguments, Insert, Merge, ObjectName, Query,
    SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Statement, TableAlias, TableFactor,
    TableObject, TableWithJoins, Update, UpdateTableFromKind, Visit, Visitor,
};

use super::{TableName, ident_name, parts};

mod kept;
mod stored;
pub use kept::{Kept, kept};
pub use stored::{Dest, Slot, Stored, stored};

/// A column a value is read from; `column: None` is the whole row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ColumnRef {
    pub table: TableName,
    pub column: Option<String>,
}

/// What a value is computed from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Deps {
    pub columns: BTreeSet<ColumnRef>,
    /// Something was referenced that could not be resolved at all.
    pub opaque: bool,
}

impl Deps {
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty() && !self.opaque
    }

    pub fn extend(&mut self, other: &Deps) {
        self.columns.extend(other.columns.iter().cloned());
        self.opaque |= other.opaque;
    }

    fn opaque() -> Self {
        Self {
            columns: BTreeSet::new(),
            opaque: true,
        }
    }
}

/// Where the columns of a `*` come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum StarSource {
    /// Every column of a table or view, in its order.
    Relation(TableName),
    /// Columns of a function or of something not analysed further: each depends on these.
    Deps(Deps),
}

/// One entry of an output list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Item {
    Column {
        name: Option<String>,
        deps: Deps,
    },
    /// Zero or more columns; how many is known only from the result.
    Star(StarSource),
}

impl Item {
    /// Everything this item depends on; a relation's star as whole-row references.
    pub fn all_deps(&self, into: &mut Deps) {
        match self {
            Self::Column { deps, .. } | Self::Star(StarSource::Deps(deps)) => into.extend(deps),
            Self::Star(StarSource::Relation(t)) => {
                into.columns.insert(ColumnRef {
                    table: t.clone(),
                    column: None,
                });
            }
        }
    }
}

/// Text or CSV COPY as the server writes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct CopyFormat {
    pub csv: bool,
    pub delimiter: char,
    pub null: String,
    pub quote: char,
    pub escape: char,
    pub header: bool,
}

/// What a statement sends back, as far as masking is concerned.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Shape {
    /// No rows.
    None,
    /// Rows with these columns.
    Rows(Vec<Item>),
    /// `COPY ... TO STDOUT` in text or CSV format.
    Copy {
        items: Vec<Item>,
        format: CopyFormat,
    },
    /// `COPY ... TO STDOUT` in binary format: cannot be masked.
    CopyBinary,
    /// `EXECUTE name`: the shape of what `PREPARE name` holds.
    Execute(String),
    /// Rows whose derivation the text does not show (FETCH, CALL).
    Unknown,
}

/// The shape of a parsed statement.
pub fn shape(stmt: &Statement) -> Shape {
    use Statement as S;
    let root = Scope::root();
    match stmt {
        S::Query(q) => match q.body.as_ref() {
            SetExpr::Select(s) if s.into.is_some() => Shape::None,
            _ => rows(query_items(q, &root)),
        },
        S::Insert(ins) => {
            let Some(ret) = &ins.returning else {
                return Shape::None;
            };
            rows(projection(ret, &Scope::of_insert(ins, false, &root)))
        }
        S::Update(u) => {
            let Some(ret) = &u.returning else {
                return Shape::None;
            };
            rows(projection(ret, &Scope::of_update(u, &root)))
        }
        S::Delete(d) => {
            let Some(ret) = &d.returning else {
                return Shape::None;
            };
            rows(projection(ret, &Scope::of_delete(d, &root)))
        }
        S::Copy {
            source,
            to: true,
            target: CopyTarget::Stdout,
            options,
            legacy_options,
            ..
        } => {
            let items = match source {
                CopySource::Table {
                    table_name,
                    columns,
                } => {
                    let t = TableName::from_object(table_name);
                    if columns.is_empty() {
                        vec![Item::Star(StarSource::Relation(t))]
                    } else {
                        columns
                            .iter()
                            .map(|c| {
                                let c = ident_name(c);
                                Item::Column {
                                    name: Some(c.clone()),
                                    deps: Deps {
                                        columns: BTreeSet::from([ColumnRef {
                                            table: t.clone(),
                                            column: Some(c),
                                        }]),
                                        opaque: false,
                                    },
                                }
                            })
                            .collect()
                    }
                }
                CopySource::Query(q) => query_items(q, &root),
            };
            match copy_format(options, legacy_options) {
                Some(format) => Shape::Copy { items, format },
                None => Shape::CopyBinary,
            }
        }
        S::Prepare { statement, .. } => shape(statement),
        S::Execute {
            name: Some(name), ..
        } => Shape::Execute(parts(name).pop().unwrap_or_default()),
        S::Fetch { .. } | S::Call(_) => Shape::Unknown,
        // A plan or a setting: no table data (EXPLAIN ANALYZE runs the statement but
        // returns only the plan).
        S::Explain { .. }
        | S::ExplainTable { .. }
        | S::ShowVariable { .. }
        | S::ShowVariables { .. } => {
            Shape::Rows(vec![Item::Star(StarSource::Deps(Deps::default()))])
        }
        _ => Shape::None,
    }
}

fn rows(items: Vec<Item>) -> Shape {
    Shape::Rows(items)
}

/// The format of `COPY ... TO STDOUT`, or `None` for binary (or an option this does not
/// know how to read, which is treated the same: it cannot be masked).
fn copy_format(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> Option<CopyFormat> {
    let mut csv = false;
    let mut delimiter = None;
    let mut null = None;
    let mut quote = '"';
    let mut escape = None;
    let mut header = false;
    for o in options {
        match o {
            CopyOption::Format(f) => match f.value.to_ascii_lowercase().as_str() {
                "csv" => csv = true,
                "text" => csv = false,
                _ => return None,
            },
            CopyOption::Delimiter(c) => delimiter = Some(*c),
            CopyOption::Null(n) => null = Some(n.clone()),
            CopyOption::Header(h) => header = *h,
            CopyOption::Quote(c) => quote = *c,
            CopyOption::Escape(c) => escape = Some(*c),
            CopyOption::ForceQuote(_)
            | CopyOption::ForceNotNull(_)
            | CopyOption::ForceNull(_)
            | CopyOption::Freeze(_)
            | CopyOption::Encoding(_) => {}
        }
    }
    for o in legacy {
        match o {
            CopyLegacyOption::Binary => return None,
            CopyLegacyOption::Delimiter(c) => delimiter = Some(*c),
            CopyLegacyOption::Null(n) => null = Some(n.clone()),
            CopyLegacyOption::Csv(opts) => {
                csv = true;
                for c in opts {
                    match c {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(q) => quote = *q,
                        CopyLegacyCsvOption::Escape(e) => escape = Some(*e),
                        CopyLegacyCsvOption::ForceQuote(_)
                        | CopyLegacyCsvOption::ForceNotNull(_) => {}
                    }
                }
            }
            CopyLegacyOption::Header => header = true,
            _ => return None,
        }
    }
    Some(CopyFormat {
        csv,
        delimiter: delimiter.unwrap_or(if csv { ',' } else { '\t' }),
        null: null.unwrap_or_else(|| if csv { String::new() } else { "\\N".into() }),
        quote,
        escape: escape.unwrap_or(quote),
        header,
    })
}

// ---------------------------------------------------------------- scopes

#[derive(Clone, Debug)]
enum SourceKind {
    /// A table or view; `renamed`: column aliases (`AS u(a, b)`) for its first columns.
    Relation {
        table: TableName,
        renamed: Vec<String>,
    },
    /// A subquery, CTE or VALUES with its items; `renamed` as above.
    Derived {
        items: Vec<Item>,
        renamed: Vec<String>,
    },
    /// A table function: every column depends on the arguments.
    Function { deps: Deps },
}

#[derive(Clone, Debug)]
struct Source {
    alias: String,
    kind: SourceKind,
}

struct Cte {
    name: String,
    items: Vec<Item>,
    renamed: Vec<String>,
}

struct Scope<'p> {
    parent: Option<&'p Scope<'p>>,
    sources: Vec<Source>,
    ctes: Vec<Cte>,
}

/// Deepest nesting followed; sqlparser's own recursion limit keeps real input below it.
const MAX_DEPTH: usize = 128;

impl<'p> Scope<'p> {
    fn root() -> Self {
        Self {
            parent: None,
            sources: Vec::new(),
            ctes: Vec::new(),
        }
    }

    fn child(parent: &'p Scope<'p>) -> Self {
        Self {
            parent: Some(parent),
            sources: Vec::new(),
            ctes: Vec::new(),
        }
    }

    /// Where an INSERT's `RETURNING` reads: its target, under its alias; with `excluded`,
    /// where its `ON CONFLICT DO UPDATE` reads: the proposed row too.
    fn of_insert(ins: &Insert, excluded: bool, parent: &'p Scope<'p>) -> Self {
        let mut s = Self::child(parent);
        if let TableObject::TableName(n) = &ins.table {
            let alias = ins.table_alias.as_ref().map(|a| ident_name(&a.alias));
            s.add_relation(n, alias, Vec::new());
            if excluded {
                s.add_relation(n, Some("excluded".into()), Vec::new());
            }
        }
        s
    }

    /// Where an UPDATE's `SET`, `WHERE` and `RETURNING` read: its table and `FROM`.
    fn of_update(u: &Update, parent: &'p Scope<'p>) -> Self {
        let mut s = Self::child(parent);
        s.add_from(std::slice::from_ref(&u.table));
        if let Some(UpdateTableFromKind::BeforeSet(f) | UpdateTableFromKind::AfterSet(f)) = &u.from
        {
            s.add_from(f);
        }
        s
    }

    /// Where a DELETE's `WHERE` and `RETURNING` read: its table and `USING`.
    fn of_delete(d: &Delete, parent: &'p Scope<'p>) -> Self {
        let mut s = Self::child(parent);
        match &d.from {
            FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f) => s.add_from(f),
        }
        if let Some(u) = &d.using {
            s.add_from(u);
        }
        s
    }

    /// Where a MERGE's conditions, `SET`s and `VALUES` read: its target and source.
    fn of_merge(m: &Merge, parent: &'p Scope<'p>) -> Self {
        let mut s = Self::child(parent);
        s.add_factor(&m.table);
        s.add_factor(&m.source);
        s
    }

    fn depth(&self) -> usize {
        let mut d = 0;
        let mut s = self.parent;
        while let Some(p) = s {
            d += 1;
            s = p.parent;
        }
        d
    }

    fn cte(&self, name: &str) -> Option<&Cte> {
        self.ctes
            .iter()
            .rev()
            .find(|c| c.name == name)
            .or_else(|| self.parent.and_then(|p| p.cte(name)))
    }

    fn add_relation(&mut self, name: &ObjectName, alias: Option<String>, renamed: Vec<String>) {
        let table = TableName::from_object(name);
        // A one-part name may be a CTE.
        if table.schema.is_none()
            && let Some(c) = self.cte(&table.name)
        {
            let items = c.items.clone();
            let renamed = if renamed.is_empty() {
                c.renamed.clone()
            } else {
                renamed
            };
            self.sources.push(Source {
                alias: alias.unwrap_or_else(|| table.name.clone()),
                kind: SourceKind::Derived { items, renamed },
            });
            return;
        }
        self.sources.push(Source {
            alias: alias.unwrap_or_else(|| table.name.clone()),
            kind: SourceKind::Relation { table, renamed },
        });
    }

    fn add_from(&mut self, from: &[TableWithJoins]) {
        for twj in from {
            self.add_factor(&twj.relation);
            for j in &twj.joins {
                self.add_factor(&j.relation);
            }
        }
    }

    fn add_factor(&mut self, f: &TableFactor) {
        match f {
            TableFactor::Table {
                name,
                alias: a,
                args,
                ..
            } => {
                let (alias, renamed) = split_alias(a);
                match args {
                    None => self.add_relation(name, alias, renamed),
                    Some(args) => {
                        let deps = self.args_deps(&args.args);
                        let fname = parts(name).pop().unwrap_or_default();
                        self.sources.push(Source {
                            alias: alias.unwrap_or(fname),
                            kind: SourceKind::Function { deps },
                        });
                    }
                }
            }
            TableFactor::Derived {
                subquery, alias: a, ..
            } => {
                let (alias, renamed) = split_alias(a);
                // Lateral or not, the subquery sees the sources before it: a superset.
                let items = if self.depth() >= MAX_DEPTH {
                    vec![Item::Star(StarSource::Deps(Deps::opaque()))]
                } else {
                    query_items(subquery, self)
                };
                self.sources.push(Source {
                    alias: alias.unwrap_or_default(),
                    kind: SourceKind::Derived { items, renamed },
                });
            }
            TableFactor::Function {
                name,
                args,
                alias: a,
                ..
            } => {
                let (alias, _) = split_alias(a);
                let deps = self.args_deps(args);
                self.sources.push(Source {
                    alias: alias.unwrap_or_else(|| parts(name).pop().unwrap_or_default()),
                    kind: SourceKind::Function { deps },
                });
            }
            TableFactor::UNNEST {
                alias: a,
                array_exprs,
                ..
            } => {
                let (alias, _) = split_alias(a);
                let mut deps = Deps::default();
                for e in array_exprs {
                    self.expr_deps(e, &mut deps);
                }
                self.sources.push(Source {
                    alias: alias.unwrap_or_else(|| "unnest".into()),
                    kind: SourceKind::Function { deps },
                });
            }
            TableFactor::TableFunction { expr, alias: a } => {
                let (alias, _) = split_alias(a);
                let mut deps = Deps::default();
                self.expr_deps(expr, &mut deps);
                self.sources.push(Source {
                    alias: alias.unwrap_or_default(),
                    kind: SourceKind::Function { deps },
                });
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias: a,
            } => {
                let before = self.sources.len();
                self.add_from(std::slice::from_ref(table_with_joins));
                // An alias on a parenthesised join hides the inner names behind one.
                if let Some(a) = a {
                    let inner: Vec<Source> = self.sources.drain(before..).collect();
                    let items = inner.iter().map(star_of).collect();
                    self.sources.push(Source {
                        alias: ident_name(&a.name),
                        kind: SourceKind::Derived {
                            items,
                            renamed: a.columns.iter().map(|c| ident_name(&c.name)).collect(),
                        },
                    });
                }
            }
            // Anything else (JSON_TABLE, PIVOT, ...) is not PostgreSQL; not analysed.
            other => {
                let alias = match other {
                    TableFactor::JsonTable { alias, .. } => split_alias(alias).0,
                    _ => None,
                };
                self.sources.push(Source {
                    alias: alias.unwrap_or_default(),
                    kind: SourceKind::Function {
                        deps: Deps::opaque(),
                    },
                });
            }
        }
    }

    fn args_deps(&self, args: &[FunctionArg]) -> Deps {
        let mut deps = Deps::default();
        for a in args {
            let e = match a {
                FunctionArg::Unnamed(e)
                | FunctionArg::Named { arg: e, .. }
                | FunctionArg::ExprNamed { arg: e, .. } => e,
            };
            match e {
                FunctionArgExpr::Expr(e) => self.expr_deps(e, &mut deps),
                FunctionArgExpr::QualifiedWildcard(n) => self.whole_row(n, &mut deps),
                _ => {}
            }
        }
        deps
    }

    /// `q.*` / `q` as a whole row: every column of `q`.
    fn whole_row(&self, name: &ObjectName, deps: &mut Deps) {
        let p = parts(name);
        match self.find_qualified(&p) {
            Some(s) => deps.extend(&source_all(s)),
            None => deps.opaque = true,
        }
    }

    /// The source a qualifier names (`t` or `schema.t`), innermost first.
    fn find_qualified(&self, q: &[String]) -> Option<&Source> {
        let hit = self.sources.iter().rev().find(|s| match q {
            [t] => s.alias == *t,
            [schema, t] => matches!(&s.kind, SourceKind::Relation { table, .. }
                if table.name == *t && table.schema.as_deref().is_none_or(|x| x == schema)),
            _ => false,
        });
        hit.or_else(|| self.parent.and_then(|p| p.find_qualified(q)))
    }

    /// What an unqualified name may be: that column in any source in scope (inner and
    /// outer), or a whole row when it names a source.
    fn unqualified(&self, name: &str, deps: &mut Deps) {
        for s in &self.sources {
            if s.alias == name {
                deps.extend(&source_all(s));
            }
            deps.extend(&source_column(s, name));
        }
        if let Some(p) = self.parent {
            p.unqualified(name, deps);
        }
    }

    fn column_ref(&self, p: &[String], deps: &mut Deps) {
        match p {
            [] => {}
            [c] => self.unqualified(c, deps),
            [q @ .., c] if q.len() <= 2 => match self.find_qualified(q) {
                Some(s) => deps.extend(&source_column(s, c)),
                None => deps.opaque = true,
            },
            _ => deps.opaque = true,
        }
    }

    /// Everything an expression mentions, resolved in this scope.
    fn expr_deps(&self, e: &Expr, deps: &mut Deps) {
        at_level(e, |node| match node {
            Level::Query(q) => {
                if self.depth() >= MAX_DEPTH {
                    deps.opaque = true;
                } else {
                    for it in query_items(q, self) {
                        it.all_deps(deps);
                    }
                }
            }
            Level::Expr(Expr::Identifier(i)) => self.unqualified(&ident_name(i), deps),
            Level::Expr(Expr::CompoundIdentifier(ids)) => {
                let p: Vec<String> = ids.iter().map(ident_name).collect();
                self.column_ref(&p, deps);
            }
            Level::Expr(Expr::QualifiedWildcard(n, _)) => self.whole_row(n, deps),
            Level::Expr(Expr::Function(f)) => {
                if let FunctionArguments::List(l) = &f.args {
                    for a in &l.args {
                        if let FunctionArg::Unnamed(FunctionArgExpr::QualifiedWildcard(n))
                        | FunctionArg::Named {
                            arg: FunctionArgExpr::QualifiedWildcard(n),
                            ..
                        } = a
                        {
                            self.whole_row(n, deps);
                        }
                    }
                }
            }
            Level::Expr(_) => {}
        });
    }
}

/// What a walk of one query level meets: a query nested in it (a subquery, a derived table;
/// not entered) or an expression of the level itself.
enum Level<'a> {
    Query(&'a Query),
    Expr(&'a Expr),
}

/// Calls `f` for every expression of `node` outside the queries nested in it, and once for
/// each outermost nested query, whose own expressions are not walked: the caller reads
/// those in the nested query's scope.
fn at_level<V: Visit>(node: &V, f: impl FnMut(Level<'_>)) {
    struct W<F> {
        f: F,
        nested: usize,
    }
    impl<F: FnMut(Level<'_>)> Visitor for W<F> {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if self.nested == 0 {
                (self.f)(Level::Query(q));
            }
            self.nested += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.nested -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if self.nested == 0 {
                (self.f)(Level::Expr(e));
            }
            ControlFlow::Continue(())
        }
    }
    let _ = node.visit(&mut W { f, nested: 0 });
}

fn split_alias(a: &Option<TableAlias>) -> (Option<String>, Vec<String>) {
    match a {
        Some(a) => (
            Some(ident_name(&a.name)),
            a.columns.iter().map(|c| ident_name(&c.name)).collect(),
        ),
        None => (None, Vec::new()),
    }
}

/// A source's columns as a star item.
fn star_of(s: &Source) -> Item {
    match &s.kind {
        SourceKind::Relation { table, .. } => Item::Star(StarSource::Relation(table.clone())),
        SourceKind::Derived { .. } | SourceKind::Function { .. } => {
            Item::Star(StarSource::Deps(source_all(s)))
        }
    }
}

/// Everything a source's columns depend on.
fn source_all(s: &Source) -> Deps {
    match &s.kind {
        SourceKind::Relation { table, .. } => Deps {
            columns: BTreeSet::from([ColumnRef {
                table: table.clone(),
                column: None,
            }]),
            opaque: false,
        },
        SourceKind::Derived { items, .. } => {
            let mut d = Deps::default();
            for i in items {
                i.all_deps(&mut d);
            }
            d
        }
        SourceKind::Function { deps } => deps.clone(),
    }
}

/// What column `c` of a source depends on (nothing if it certainly has no such column).
fn source_column(s: &Source, c: &str) -> Deps {
    match &s.kind {
        SourceKind::Relation { table, renamed } => {
            // A renamed column is one of the first columns, which one is not known here.
            let column = if renamed.iter().any(|r| r == c) {
                None
            } else {
                Some(c.to_owned())
            };
            Deps {
                columns: BTreeSet::from([ColumnRef {
                    table: table.clone(),
                    column,
                }]),
                opaque: false,
            }
        }
        SourceKind::Derived { items, renamed } => {
            if let Some(pos) = renamed.iter().position(|r| r == c) {
                // Positional: exact while no star comes before it.
                if items[..pos.min(items.len())]
                    .iter()
                    .all(|i| matches!(i, Item::Column { .. }))
                    && let Some(i @ Item::Column { .. }) = items.get(pos)
                {
                    let mut d = Deps::default();
                    i.all_deps(&mut d);
                    return d;
                }
                return source_all(s);
            }
            let mut d = Deps::default();
            for (n, i) in items.iter().enumerate() {
                if n < renamed.len() {
                    continue; // renamed away
                }
                match i {
                    Item::Column { name, deps } if name.as_deref() == Some(c) => d.extend(deps),
                    Item::Column { .. } => {}
                    Item::Star(StarSource::Relation(t)) => {
                        d.columns.insert(ColumnRef {
                            table: t.clone(),
                            column: Some(c.to_owned()),
                        });
                    }
                    Item::Star(StarSource::Deps(deps)) => d.extend(deps),
                }
            }
            d
        }
        SourceKind::Function { deps } => deps.clone(),
    }
}

// ---------------------------------------------------------------- queries

fn query_items(q: &Query, parent: &Scope<'_>) -> Vec<Item> {
    set_items(&q.body, &with_scope(q, parent))
}

/// The scope a query's body is read in: its parent's, and the query's CTEs.
fn with_scope<'p>(q: &Query, parent: &'p Scope<'p>) -> Scope<'p> {
    let mut scope = Scope::child(parent);
    if let Some(with) = &q.with {
        for cte in &with.cte_tables {
            let name = ident_name(&cte.alias.name);
            let renamed: Vec<String> = cte
                .alias
                .columns
                .iter()
                .map(|c| ident_name(&c.name))
                .collect();
            // A recursive CTE refers to itself: iterate until its lineage stops growing.
            let mut items = Vec::new();
            for _ in 0..if with.recursive { 4 } else { 1 } {
                if with.recursive {
                    scope.ctes.push(Cte {
                        name: name.clone(),
                        items: items.clone(),
                        renamed: renamed.clone(),
                    });
                }
                let next = query_items(&cte.query, &scope);
                if with.recursive {
                    scope.ctes.pop();
                }
                let done = next == items;
                items = next;
                if done {
                    break;
                }
            }
            scope.ctes.push(Cte {
                name,
                items,
                renamed,
            });
        }
    }
    scope
}

fn set_items(body: &SetExpr, scope: &Scope<'_>) -> Vec<Item> {
    match body {
        SetExpr::Select(s) => {
            let mut inner = Scope::child(scope);
            inner.add_from(&s.from);
            projection(&s.projection, &inner)
        }
        SetExpr::Query(q) => query_items(q, scope),
        SetExpr::SetOperation { left, right, .. } => {
            let l = set_items(left, scope);
            let r = set_items(right, scope);
            let plain = |v: &[Item]| v.iter().all(|i| matches!(i, Item::Column { .. }));
            if l.len() == r.len() && plain(&l) && plain(&r) {
                l.into_iter()
                    .zip(r)
                    .map(|(a, b)| match (a, b) {
                        (Item::Column { name, mut deps }, Item::Column { deps: d2, .. }) => {
                            deps.extend(&d2);
                            Item::Column { name, deps }
                        }
                        _ => unreachable!("both plain"),
                    })
                    .collect()
            } else {
                // Columns cannot be paired: each depends on everything.
                let mut all = Deps::default();
                for i in l.iter().chain(&r) {
                    i.all_deps(&mut all);
                }
                vec![Item::Star(StarSource::Deps(all))]
            }
        }
        SetExpr::Values(v) => {
            let width = v.rows.iter().map(|r| r.len()).max().unwrap_or(0);
            (0..width)
                .map(|i| {
                    let mut deps = Deps::default();
                    for row in &v.rows {
                        if let Some(e) = row.get(i) {
                            scope.expr_deps(e, &mut deps);
                        }
                    }
                    Item::Column {
                        name: Some(format!("column{}", i + 1)),
                        deps,
                    }
                })
                .collect()
        }
        SetExpr::Table(t) => {
            let name = TableName {
                schema: t.schema_name.as_ref().map(ident_name),
                name: t.table_name.as_ref().map(ident_name).unwrap_or_default(),
            };
            vec![Item::Star(StarSource::Relation(name))]
        }
        SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
            match shape(s) {
                Shape::Rows(items) => items,
                _ => Vec::new(),
            }
        }
    }
}

fn projection(items: &[SelectItem], scope: &Scope<'_>) -> Vec<Item> {
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        match it {
            SelectItem::UnnamedExpr(e) => {
                let mut deps = Deps::default();
                scope.expr_deps(e, &mut deps);
                out.push(Item::Column {
                    name: output_name(e),
                    deps,
                });
            }
            SelectItem::ExprWithAlias { expr, alias } => {
                let mut deps = Deps::default();
                scope.expr_deps(expr, &mut deps);
                out.push(Item::Column {
                    name: Some(ident_name(alias)),
                    deps,
                });
            }
            SelectItem::ExprWithAliases { expr, aliases } => {
                let mut deps = Deps::default();
                scope.expr_deps(expr, &mut deps);
                for a in aliases {
                    out.push(Item::Column {
                        name: Some(ident_name(a)),
                        deps: deps.clone(),
                    });
                }
            }
            SelectItem::Wildcard(_) => {
                for s in &scope.sources {
                    expand_source(s, &mut out);
                }
            }
            SelectItem::QualifiedWildcard(kind, _) => match kind {
                SelectItemQualifiedWildcardKind::ObjectName(n) => {
                    match scope.find_qualified(&parts(n)) {
                        Some(s) => expand_source(s, &mut out),
                        None => out.push(Item::Star(StarSource::Deps(Deps::opaque()))),
                    }
                }
                SelectItemQualifiedWildcardKind::Expr(e) => {
                    let mut deps = Deps::default();
                    scope.expr_deps(e, &mut deps);
                    out.push(Item::Star(StarSource::Deps(deps)));
                }
            },
        }
    }
    out
}

/// `*` over one source.
fn expand_source(s: &Source, out: &mut Vec<Item>) {
    match &s.kind {
        SourceKind::Derived { items, renamed } => {
            for (n, i) in items.iter().enumerate() {
                match (i, renamed.get(n)) {
                    (Item::Column { deps, .. }, Some(r)) => out.push(Item::Column {
                        name: Some(r.clone()),
                        deps: deps.clone(),
                    }),
                    _ => out.push(i.clone()),
                }
            }
        }
        _ => out.push(star_of(s)),
    }
}

/// The name PostgreSQL gives an unaliased output column, where it matters for lookups.
fn output_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(ident_name(i)),
        Expr::CompoundIdentifier(ids) => ids.last().map(ident_name),
        Expr::Function(f) => parts(&f.name).pop(),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => output_name(expr),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sql::{LexOptions, classify};

    fn shape_of(sql: &str) -> Shape {
        let c = classify(sql, LexOptions::default());
        assert!(c.error.is_none(), "{sql}: {:?}", c.error);
        c.statements[0].shape.clone()
    }

    fn deps_str(d: &Deps) -> String {
        let mut v: Vec<String> = d
            .columns
            .iter()
            .map(|c| format!("{}.{}", c.table, c.column.as_deref().unwrap_or("*")))
            .collect();
        if d.opaque {
            v.push("?".into());
        }
        v.join(",")
    }

    /// `name=deps` per column, `*table` or `*[deps]` per star, joined by ` | `.
    fn items_str(items: &[Item]) -> String {
        items
            .iter()
            .map(|i| match i {
                Item::Column { name, deps } => {
                    format!(
                        "{}={}",
                        name.as_deref().unwrap_or("?column?"),
                        deps_str(deps)
                    )
                }
                Item::Star(StarSource::Relation(t)) => format!("*{t}"),
                Item::Star(StarSource::Deps(d)) => format!("*[{}]", deps_str(d)),
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }

    fn rows(sql: &str) -> String {
        match shape_of(sql) {
            Shape::Rows(items) => items_str(&items),
            other => panic!("{sql}: not rows: {other:?}"),
        }
    }

    #[test]
    fn plain_and_aliased_columns() {
        assert_eq!(
            rows("SELECT id, email FROM users"),
            "id=users.id | email=users.email"
        );
        assert_eq!(
            rows("SELECT u.email AS e FROM public.users u"),
            "e=public.users.email"
        );
        assert_eq!(rows("SELECT 1, now()"), "?column?= | now=");
    }

    #[test]
    fn expressions_carry_their_inputs() {
        assert_eq!(rows("SELECT upper(email) FROM users"), "upper=users.email");
        assert_eq!(rows("SELECT email || '' AS x FROM users"), "x=users.email");
        assert_eq!(
            rows("SELECT encode(convert_to(email, 'UTF8'), 'hex') FROM users"),
            "encode=users.email"
        );
        assert_eq!(
            rows("SELECT CASE WHEN ssn LIKE '1%' THEN 'a' END AS c FROM users"),
            "c=users.ssn"
        );
        assert_eq!(rows("SELECT count(*) FROM users"), "count=");
        assert_eq!(
            rows("SELECT string_agg(email, ',') FROM users"),
            "string_agg=users.email"
        );
    }

    #[test]
    fn whole_row_references() {
        // `u` may also be a column named u: both count.
        assert_eq!(
            rows("SELECT to_jsonb(u) FROM users u"),
            "to_jsonb=users.*,users.u"
        );
        assert_eq!(
            rows("SELECT row_to_json(u.*) FROM users u"),
            "row_to_json=users.*"
        );
    }

    #[test]
    fn stars() {
        assert_eq!(rows("SELECT * FROM users"), "*users");
        assert_eq!(rows("TABLE users"), "*users");
        assert_eq!(
            rows("SELECT u.*, o.total FROM users u JOIN orders o ON o.uid = u.id"),
            "*users | total=orders.total"
        );
        assert_eq!(
            rows("SELECT * FROM (SELECT upper(email) AS e, id FROM users) s"),
            "e=users.email | id=users.id"
        );
        assert_eq!(rows("SELECT * FROM generate_series(1, 3)"), "*[]");
    }

    #[test]
    fn subqueries_ctes_and_set_operations() {
        assert_eq!(
            rows("SELECT (SELECT email FROM users u WHERE u.id = o.uid) FROM orders o"),
            "?column?=orders.email,users.email"
        );
        assert_eq!(
            rows("WITH c AS (SELECT email AS contact FROM users) SELECT lower(contact) FROM c"),
            "lower=users.email"
        );
        assert_eq!(
            rows("SELECT name FROM products UNION ALL SELECT email FROM users"),
            "name=products.name,users.email"
        );
        assert_eq!(
            rows(
                "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 5) SELECT n FROM t"
            ),
            "n="
        );
        assert_eq!(
            rows("SELECT x.e FROM (SELECT email FROM users) AS x(e)"),
            "e=users.email"
        );
        assert_eq!(rows("VALUES (1, 'a')"), "column1= | column2=");
    }

    #[test]
    fn unqualified_names_count_every_relation_in_scope() {
        assert_eq!(
            rows("SELECT email FROM users JOIN orders USING (id)"),
            "email=orders.email,users.email"
        );
        // An unknown qualifier cannot be resolved.
        assert_eq!(rows("SELECT nope.email FROM users"), "email=?");
    }

    #[test]
    fn dml_returning_and_copy() {
        assert_eq!(
            rows("UPDATE users SET name = 'x' RETURNING email"),
            "email=users.email"
        );
        assert_eq!(rows("DELETE FROM users u RETURNING u.*"), "*users");
        assert_eq!(
            rows("INSERT INTO users (email) VALUES ('a') RETURNING *"),
            "*users"
        );
        assert_eq!(shape_of("UPDATE users SET name = 'x'"), Shape::None);
        match shape_of("COPY users (id, email) TO STDOUT WITH (FORMAT csv, HEADER)") {
            Shape::Copy { items, format } => {
                assert_eq!(items_str(&items), "id=users.id | email=users.email");
                assert!(format.csv && format.header);
                assert_eq!(format.delimiter, ',');
            }
            other => panic!("{other:?}"),
        }
        match shape_of("COPY (SELECT upper(email) FROM users) TO STDOUT") {
            Shape::Copy { items, format } => {
                assert_eq!(items_str(&items), "upper=users.email");
                assert_eq!((format.delimiter, format.null.as_str()), ('\t', "\\N"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            shape_of("COPY users TO STDOUT (FORMAT binary)"),
            Shape::CopyBinary
        );
        assert_eq!(shape_of("COPY users FROM STDIN"), Shape::None);
    }

    #[test]
    fn prepared_statements_and_cursors() {
        assert_eq!(
            shape_of("PREPARE p AS SELECT email FROM users WHERE id = $1"),
            Shape::Rows(vec![Item::Column {
                name: Some("email".into()),
                deps: Deps {
                    columns: BTreeSet::from([ColumnRef {
                        table: TableName {
                            schema: None,
                            name: "users".into()
                        },
                        column: Some("email".into())
                    }]),
                    opaque: false
                }
            }])
        );
        assert_eq!(shape_of("EXECUTE p(1)"), Shape::Execute("p".into()));
        assert_eq!(shape_of("FETCH 10 FROM c"), Shape::Unknown);
        assert_eq!(shape_of("SELECT 1 INTO t"), Shape::None);
        assert_eq!(
            shape_of("EXPLAIN ANALYZE SELECT email FROM users"),
            Shape::Rows(vec![Item::Star(StarSource::Deps(Deps::default()))])
        );
    }
}
