//! Which columns of a result to mask, and how: decided once per result set (at its
//! RowDescription or CopyOutResponse), then applied to every row without further lookups.
//!
//! An output column is masked by a column rule when anything it is computed from matches
//! one of the rule's patterns. What it is computed from comes from two places, and both
//! count:
//! - the table OID and attribute number PostgreSQL puts in RowDescription for a plain
//!   column reference (also through subqueries and `*`), named through the catalog — for a
//!   view column, the catalog also says what the view computes it from;
//! - the statement's [lineage](crate::policy::sql::lineage), for computed columns.
//!
//! Every table name is checked against the catalog before it is trusted (it may be a view
//! over the masked table). Whatever cannot be decided — no catalog, a relation the catalog
//! does not show, a name that could not be resolved, columns that cannot be lined up with
//! the statement — is handled as the rule's `unresolved` says: masked, or the statement
//! refused.
//!
//! Pure: the catalog is reached through [`Resolve`], filled before planning.

use std::sync::Arc;

use crate::policy::{
    glob,
    model::{MaskSpec, Strategy, Unresolved},
    sql::{
        TableName, builtins,
        lineage::{ColumnRef, CopyFormat, Deps, Item, Shape, StarSource},
    },
};

use super::{types::Types, value::TypeClass};

/// A column of a RowDescription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// What the catalog knows, looked up ahead of planning.
pub trait Resolve {
    /// Everything the column at (table OID, attribute number) is: its own qualified name
    /// and, for a view's column, what the view computes it from (transitively). `None`:
    /// not known.
    fn origin(&self, oid: u32, attnum: i16) -> Option<Vec<ColumnRef>>;
    /// A column reference as written in SQL, expanded: the qualified relations it may name
    /// (an unqualified name may be in any schema) and, through views, what it is computed
    /// from. `None`: cannot be verified.
    fn expand(&self, r: &ColumnRef) -> Option<Vec<ColumnRef>>;
    /// A relation's columns in order (for `COPY table TO`, whose output has no names).
    /// `None`: not known, or the name is ambiguous.
    fn columns(&self, t: &TableName) -> Option<Vec<String>>;
    /// Whether rows written into the relation `t` names (any of them, for a name in no
    /// schema) may be stored on another server: a foreign table, a table with foreign
    /// partitions or inheritance children, a view over one. `Some(false)` also for a name
    /// the catalog looked up and does not show (a temporary table of the session, one
    /// created in its open transaction: local, see `masking::copies`). `None`: not known.
    fn stores_elsewhere(&self, t: &TableName) -> Option<bool>;
}

/// PostgreSQL's `FirstNormalObjectId`: every object initdb creates (the system catalogs,
/// the system views, `information_schema`) has an OID below it, and every object created
/// afterwards, a table of any user or extension, one at or above it (the OID counter skips
/// the range below when it wraps around).
pub const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

/// No catalog: only what PostgreSQL itself defines is known. A column of a relation in
/// `pg_catalog` or `information_schema` (schemas initdb creates, which only a superuser
/// can add relations to) is that column, and a plain column whose table OID is below
/// [`FIRST_NORMAL_OBJECT_ID`] comes from a system relation, not from any table of the
/// database's (a rule that names a system catalog's column is not followed through the
/// system views over it: that takes the catalog). Anything else cannot be verified.
///
/// An unqualified name of a `pg_catalog` relation (`pg_class`, as pg_dump writes its
/// queries) names it only while the session has no temporary relation of that name and
/// no schema before `pg_catalog` in its search path, which would be searched first:
/// `unqualified` says the session has sent nothing that may have made either so
/// ([`StatementClass::may_shadow_catalog`]).
///
/// [`StatementClass::may_shadow_catalog`]: crate::policy::sql::StatementClass::may_shadow_catalog
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCatalog {
    pub unqualified: bool,
}

impl NoCatalog {
    /// The `pg_catalog` or `information_schema` relation a name is, if it is one.
    fn system(&self, t: &TableName) -> Option<TableName> {
        match t.schema.as_deref() {
            Some("pg_catalog" | "information_schema") => Some(t.clone()),
            None if self.unqualified && builtins::is_builtin_relation(&t.name) => Some(TableName {
                schema: Some("pg_catalog".to_owned()),
                name: t.name.clone(),
            }),
            _ => None,
        }
    }
}

impl Resolve for NoCatalog {
    fn origin(&self, oid: u32, _: i16) -> Option<Vec<ColumnRef>> {
        (oid < FIRST_NORMAL_OBJECT_ID).then(Vec::new)
    }
    fn expand(&self, r: &ColumnRef) -> Option<Vec<ColumnRef>> {
        self.system(&r.table).map(|table| {
            vec![ColumnRef {
                table,
                column: r.column.clone(),
            }]
        })
    }
    fn columns(&self, _: &TableName) -> Option<Vec<String>> {
        None
    }
    fn stores_elsewhere(&self, _: &TableName) -> Option<bool> {
        None
    }
}

/// The first resolver's answers, and the second's where the first does not know (a
/// session's catalog that was not asked about something, then what is known without one).
pub struct Either<A, B>(pub A, pub B);

impl<A: Resolve, B: Resolve> Resolve for Either<A, B> {
    fn origin(&self, oid: u32, attnum: i16) -> Option<Vec<ColumnRef>> {
        self.0
            .origin(oid, attnum)
            .or_else(|| self.1.origin(oid, attnum))
    }
    fn expand(&self, r: &ColumnRef) -> Option<Vec<ColumnRef>> {
        self.0.expand(r).or_else(|| self.1.expand(r))
    }
    fn columns(&self, t: &TableName) -> Option<Vec<String>> {
        self.0.columns(t).or_else(|| self.1.columns(t))
    }
    fn stores_elsewhere(&self, t: &TableName) -> Option<bool> {
        self.0
            .stores_elsewhere(t)
            .or_else(|| self.1.stores_elsewhere(t))
    }
}

impl<T: Resolve + ?Sized> Resolve for std::sync::Arc<T> {
    fn origin(&self, oid: u32, attnum: i16) -> Option<Vec<ColumnRef>> {
        (**self).origin(oid, attnum)
    }
    fn expand(&self, r: &ColumnRef) -> Option<Vec<ColumnRef>> {
        (**self).expand(r)
    }
    fn columns(&self, t: &TableName) -> Option<Vec<String>> {
        (**self).columns(t)
    }
    fn stores_elsewhere(&self, t: &TableName) -> Option<bool> {
        (**self).stores_elsewhere(t)
    }
}

/// Whether a rule's column pattern (`table.column` or `schema.table.column`, globs per
/// part) matches a column reference. A reference without a schema may be in any schema;
/// a whole-row reference carries every column.
pub fn pattern_matches(pattern: &str, r: &ColumnRef) -> bool {
    let Some((schema, table, column)) = pattern_parts(pattern) else {
        return false;
    };
    if !glob::matches(table, &r.table.name) {
        return false;
    }
    if let (Some(ps), Some(s)) = (schema, &r.table.schema)
        && !glob::matches(ps, s)
    {
        return false;
    }
    match &r.column {
        None => true,
        Some(c) => glob::matches(column, c),
    }
}

/// A column pattern's parts: schema (`None`: any), table and column globs. `None`: not a
/// pattern of two or three parts.
pub fn pattern_parts(pattern: &str) -> Option<(Option<&str>, &str, &str)> {
    let mut p = pattern.split('.');
    match (p.next(), p.next(), p.next(), p.next()) {
        (Some(t), Some(c), None, None) => Some((None, t, c)),
        (Some(s), Some(t), Some(c), None) => Some((Some(s), t, c)),
        _ => None,
    }
}

/// A whole-value mask: the strategy, and the label in `[REDACTED:<label>]`.
pub type Whole = Option<(Strategy, Arc<str>)>;

/// How one output column is treated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnPlan {
    pub class: TypeClass,
    pub binary: bool,
    /// Replace the whole value: the strategy and the label in `[REDACTED:<label>]`.
    pub whole: Option<(Strategy, Arc<str>)>,
    /// Every value's replacement, encoded, when `whole`'s strategy does not look at the
    /// value (`Some(None)`: NULL); made once here instead of once per row.
    pub fixed: Option<Option<Vec<u8>>>,
}

impl ColumnPlan {
    pub fn new(class: TypeClass, binary: bool, whole: Option<(Strategy, Arc<str>)>) -> Self {
        let fixed = whole
            .as_ref()
            .and_then(|(s, label)| super::value::fixed_whole(s, label, class, binary));
        Self {
            class,
            binary,
            whole,
            fixed,
        }
    }
}

/// Value detectors that apply to every column, and the strategy for each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detection {
    pub detectors: Vec<(String, Strategy)>,
}

impl Detection {
    pub fn strategy(&self, detector: &str) -> Option<&Strategy> {
        self.detectors
            .iter()
            .find(|(d, _)| d == detector)
            .map(|(_, s)| s)
    }
}

/// The plan for one result set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultPlan {
    pub columns: Vec<ColumnPlan>,
    pub detection: Option<Arc<Detection>>,
    /// The database's own types, for what binary records and arrays hold.
    pub types: Arc<Types>,
}

impl ResultPlan {
    /// Whether anything is masked at all (if not, rows pass untouched).
    pub fn is_active(&self) -> bool {
        self.detection.is_some() || self.columns.iter().any(|c| c.whole.is_some())
    }
}

/// Why a result cannot be let through.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "rule {rule}: cannot tell whether column {column:?} derives from a masked column \
         ({why}), and the rule says deny"
    )]
    Unresolved {
        rule: String,
        column: String,
        why: String,
    },
    #[error("rule {rule}: binary COPY of masked data is not supported; use text or CSV format")]
    BinaryCopy { rule: String },
    #[error(
        "rule {rule}: this would copy {from}, which is masked, into {dest}, which no mask \
         covers (masks do not follow values copied inside the database); copy it into a \
         column a mask covers, naming the target columns"
    )]
    Copy {
        rule: String,
        from: String,
        dest: String,
    },
    #[error(
        "rule {rule}: cannot verify in the catalog whether {from} is masked, so copying it \
         into {dest}, which no mask covers, is refused"
    )]
    CopyUnverified {
        rule: String,
        from: String,
        dest: String,
    },
    #[error(
        "rule {rule}: this would copy {from}, which is masked, into {dest}, and the catalog \
         does not show which column that is, so it is refused; name the target columns"
    )]
    CopyUnplaced {
        rule: String,
        from: String,
        dest: String,
    },
    #[error(
        "rule {rule}: this would copy {from}, which is masked, into {dest}, whose rows are \
         stored on another server (a foreign table, or a table or view that writes into \
         one), where no mask of this gateway applies"
    )]
    CopyElsewhere {
        rule: String,
        from: String,
        dest: String,
    },
    #[error(
        "rule {rule}: cannot verify in the catalog that {dest} stores its rows on this \
         server (not in a foreign table), so copying {from}, which is masked, into it is \
         refused"
    )]
    CopyUnverifiedPlace {
        rule: String,
        from: String,
        dest: String,
    },
    #[error(
        "rule {rule}: {function} would keep a value computed from {from}, which is masked, \
         where any statement reads it back unmasked (a sequence's value, an advisory lock's \
         key, a large object's OID, length or position, the random seed)"
    )]
    Kept {
        rule: String,
        from: String,
        function: String,
    },
}

impl Refusal {
    /// The rule whose mask could not be honoured.
    pub fn rule(&self) -> &str {
        match self {
            Self::Unresolved { rule, .. }
            | Self::BinaryCopy { rule }
            | Self::Copy { rule, .. }
            | Self::CopyUnverified { rule, .. }
            | Self::CopyUnplaced { rule, .. }
            | Self::CopyElsewhere { rule, .. }
            | Self::CopyUnverifiedPlace { rule, .. }
            | Self::Kept { rule, .. } => rule,
        }
    }
}

/// The detection part of a set of masks (shared by every result of the statement).
pub fn detection(masks: &[Arc<MaskSpec>]) -> Option<Arc<Detection>> {
    let mut d = Detection::default();
    for m in masks {
        for name in &m.detectors {
            if d.strategy(name).is_none() {
                d.detectors.push((name.clone(), m.strategy.clone()));
            }
        }
    }
    (!d.detectors.is_empty()).then(|| Arc::new(d))
}

/// What each output position is computed from, per the statement's lineage.
enum Lined {
    Exact(Deps),
    /// Could be any of these.
    Region(Deps),
    Unknown,
}

/// Lines the statement's items up with `n` result columns (names as the server gave them).
fn line_up(items: &[Item], names: &[&str]) -> Vec<Lined> {
    let n = names.len();
    let stars: Vec<usize> = items
        .iter()
        .enumerate()
        .filter(|(_, i)| matches!(i, Item::Star(_)))
        .map(|(k, _)| k)
        .collect();
    let fixed = items.len() - stars.len();
    let star_deps = |i: &Item, name: &str| -> Deps {
        match i {
            Item::Column { deps, .. } | Item::Star(StarSource::Deps(deps)) => deps.clone(),
            Item::Star(StarSource::Relation(t)) => Deps {
                columns: [ColumnRef {
                    table: t.clone(),
                    column: Some(name.to_owned()),
                }]
                .into(),
                opaque: false,
            },
        }
    };
    match stars.as_slice() {
        [] if fixed == n => items
            .iter()
            .zip(names)
            .map(|(i, name)| Lined::Exact(star_deps(i, name)))
            .collect(),
        [] => (0..n).map(|_| Lined::Unknown).collect(),
        [s] if fixed <= n => {
            let width = n - fixed;
            let mut out = Vec::with_capacity(n);
            for (k, name) in names.iter().enumerate() {
                let item = if k < *s {
                    &items[k]
                } else if k < s + width {
                    &items[*s]
                } else {
                    &items[k - width + 1]
                };
                out.push(Lined::Exact(star_deps(item, name)));
            }
            out
        }
        [first, .., last] if fixed <= n => {
            let suffix = items.len() - 1 - last;
            let mut out = Vec::with_capacity(n);
            for (k, name) in names.iter().enumerate() {
                if k < *first {
                    out.push(Lined::Exact(star_deps(&items[k], name)));
                } else if k >= n - suffix {
                    out.push(Lined::Exact(star_deps(&items[items.len() - (n - k)], name)));
                } else {
                    let mut d = Deps::default();
                    for i in &items[*first..=*last] {
                        d.extend(&star_deps(i, name));
                    }
                    out.push(Lined::Region(d));
                }
            }
            out
        }
        _ => (0..n).map(|_| Lined::Unknown).collect(),
    }
}

/// Decides, for each column rule, whether an output column is masked; `Err` with the
/// reason when it cannot be decided.
fn column_sources(
    origin: Option<(u32, i16)>,
    lined: &Lined,
    resolve: &dyn Resolve,
) -> Result<Vec<ColumnRef>, String> {
    let mut out = Vec::new();
    if let Some((oid, att)) = origin {
        match resolve.origin(oid, att) {
            Some(v) => out.extend(v),
            None => return Err(format!("table OID {oid} is not in the catalog")),
        }
    }
    let deps = match lined {
        Lined::Exact(d) | Lined::Region(d) => d,
        // A plain column reference is fully described by its origin.
        Lined::Unknown if origin.is_some() => return Ok(out),
        Lined::Unknown => {
            return Err("its expression could not be lined up with the statement".into());
        }
    };
    if deps.opaque {
        return Err("it references something that could not be resolved".into());
    }
    for r in &deps.columns {
        match resolve.expand(r) {
            Some(v) => out.extend(v),
            None => {
                return Err(format!(
                    "{}.{} cannot be verified in the catalog",
                    r.table,
                    r.column.as_deref().unwrap_or("*")
                ));
            }
        }
    }
    Ok(out)
}

/// Plans a row result: `fields` from RowDescription; `types`, what is known about the
/// database's own types among theirs.
pub fn plan_rows(
    masks: &[Arc<MaskSpec>],
    shape: &Shape,
    fields: &[Field],
    resolve: &dyn Resolve,
    types: Arc<Types>,
) -> Result<ResultPlan, Refusal> {
    let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    let items = match shape {
        Shape::Rows(items) | Shape::Copy { items, .. } => Some(items.as_slice()),
        _ => None,
    };
    let wholes = plan_columns(
        masks,
        items,
        &names,
        |k| {
            let f = &fields[k];
            (f.table_oid != 0 && f.attnum > 0).then_some((f.table_oid, f.attnum))
        },
        resolve,
    )?;
    Ok(ResultPlan {
        columns: fields
            .iter()
            .zip(wholes)
            .map(|(f, whole)| ColumnPlan::new(types.class(f.type_oid), f.format == 1, whole))
            .collect(),
        detection: detection(masks),
        types,
    })
}

/// Plans a `COPY ... TO STDOUT` with `n` columns (no types: everything is text).
pub fn plan_copy(
    masks: &[Arc<MaskSpec>],
    shape: &Shape,
    n: usize,
    resolve: &dyn Resolve,
) -> Result<(ResultPlan, Option<CopyFormat>), Refusal> {
    let (items, format) = match shape {
        Shape::Copy { items, format } => (Some(items.as_slice()), Some(format.clone())),
        Shape::CopyBinary => {
            return Err(Refusal::BinaryCopy {
                rule: masks.first().map(|m| m.rule.clone()).unwrap_or_default(),
            });
        }
        _ => (None, None),
    };
    // COPY output carries no column names: a table's `*` is expanded from the catalog, or
    // each of its columns depends on the whole row.
    let items: Option<Vec<Item>> = items.map(|items| {
        let mut out = Vec::with_capacity(items.len());
        for i in items {
            match i {
                Item::Star(StarSource::Relation(t)) => match resolve.columns(t) {
                    Some(cols) => out.extend(cols.into_iter().map(|c| {
                        Item::Column {
                            name: Some(c.clone()),
                            deps: Deps {
                                columns: [ColumnRef {
                                    table: t.clone(),
                                    column: Some(c),
                                }]
                                .into(),
                                opaque: false,
                            },
                        }
                    })),
                    None => out.push(Item::Star(StarSource::Deps(Deps {
                        columns: [ColumnRef {
                            table: t.clone(),
                            column: None,
                        }]
                        .into(),
                        opaque: false,
                    }))),
                },
                other => out.push(other.clone()),
            }
        }
        out
    });
    let names: Vec<String> = (1..=n).map(|k| format!("column {k}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let wholes = plan_columns(masks, items.as_deref(), &names, |_| None, resolve)?;
    Ok((
        ResultPlan {
            columns: wholes
                .into_iter()
                .map(|whole| ColumnPlan::new(TypeClass::Text, false, whole))
                .collect(),
            detection: detection(masks),
            types: Default::default(),
        },
        format,
    ))
}

fn plan_columns(
    masks: &[Arc<MaskSpec>],
    items: Option<&[Item]>,
    names: &[&str],
    origin: impl Fn(usize) -> Option<(u32, i16)>,
    resolve: &dyn Resolve,
) -> Result<Vec<Whole>, Refusal> {
    let column_rules: Vec<&Arc<MaskSpec>> =
        masks.iter().filter(|m| !m.columns.is_empty()).collect();
    let n = names.len();
    if column_rules.is_empty() {
        return Ok(vec![None; n]);
    }
    let lined = match items {
        Some(items) => line_up(items, names),
        None => (0..n).map(|_| Lined::Unknown).collect(),
    };
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        match column_sources(origin(k), &lined[k], resolve) {
            Ok(sources) => {
                let hit = column_rules.iter().find_map(|m| {
                    sources.iter().find_map(|s| {
                        m.columns
                            .iter()
                            .any(|p| pattern_matches(p, s))
                            .then(|| (m, s.column.clone().unwrap_or_else(|| "row".into())))
                    })
                });
                out.push(hit.map(|(m, label)| (m.strategy.clone(), Arc::from(label.as_str()))));
            }
            Err(why) => {
                if let Some(m) = column_rules
                    .iter()
                    .find(|m| m.unresolved == Unresolved::Deny)
                {
                    return Err(Refusal::Unresolved {
                        rule: m.rule.clone(),
                        column: names[k].to_owned(),
                        why,
                    });
                }
                let m = column_rules[0];
                out.push(Some((m.strategy.clone(), Arc::from("unresolved"))));
            }
        }
    }
    Ok(out)
}

/// Whether a statement's masks can be honoured at all, known before it runs: binary COPY
/// cannot be masked, and with `unresolved = "deny"` a statement whose columns cannot be
/// traced is refused before it reaches the server (what the catalog decides, it decides
/// when the results arrive).
pub fn precheck(masks: &[Arc<MaskSpec>], shape: &Shape) -> Result<(), Refusal> {
    let column_rules: Vec<&Arc<MaskSpec>> =
        masks.iter().filter(|m| !m.columns.is_empty()).collect();
    if masks.is_empty() {
        return Ok(());
    }
    if matches!(shape, Shape::CopyBinary) {
        return Err(Refusal::BinaryCopy {
            rule: masks[0].rule.clone(),
        });
    }
    let Some(deny) = column_rules
        .iter()
        .find(|m| m.unresolved == Unresolved::Deny)
    else {
        return Ok(());
    };
    let items = match shape {
        Shape::Rows(items) | Shape::Copy { items, .. } => items,
        Shape::Unknown => {
            return Err(Refusal::Unresolved {
                rule: deny.rule.clone(),
                column: "*".into(),
                why: "the statement's result columns cannot be traced".into(),
            });
        }
        _ => return Ok(()),
    };
    for i in items {
        let mut d = Deps::default();
        i.all_deps(&mut d);
        if d.opaque {
            let column = match i {
                Item::Column { name, .. } => name.clone().unwrap_or_else(|| "?column?".into()),
                Item::Star(_) => "*".into(),
            };
            return Err(Refusal::Unresolved {
                rule: deny.rule.clone(),
                column,
                why: "it references something that could not be resolved".into(),
            });
        }
    }
    Ok(())
}

/// A qualified table name, for resolvers.
pub fn qualified(schema: &str, table: &str, column: Option<&str>) -> ColumnRef {
    ColumnRef {
        table: TableName {
            schema: Some(schema.to_owned()),
            name: table.to_owned(),
        },
        column: column.map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::policy::sql::{LexOptions, classify};

    /// A catalog: public.users(id, email, name), public.orders(id, uid, total), and
    /// public.contacts, a view: SELECT name, email AS contact FROM users.
    struct Cat;

    fn table_cols(t: &str) -> Option<&'static [&'static str]> {
        match t {
            "users" => Some(&["id", "email", "name"]),
            "orders" => Some(&["id", "uid", "total"]),
            "contacts" => Some(&["name", "contact"]),
            _ => None,
        }
    }

    impl Resolve for Cat {
        fn origin(&self, oid: u32, attnum: i16) -> Option<Vec<ColumnRef>> {
            let t = match oid {
                1 => "users",
                2 => "orders",
                3 => "contacts",
                _ => return None,
            };
            let c = table_cols(t)?.get(attnum as usize - 1)?;
            self.expand(&qualified("public", t, Some(c)))
        }
        fn expand(&self, r: &ColumnRef) -> Option<Vec<ColumnRef>> {
            if r.table.schema.as_deref().is_some_and(|s| s != "public") {
                return None;
            }
            table_cols(&r.table.name)?;
            let me = qualified("public", &r.table.name, r.column.as_deref());
            let mut out = vec![me];
            if r.table.name == "contacts" {
                let view: HashMap<&str, &str> = [("name", "name"), ("contact", "email")].into();
                match r.column.as_deref() {
                    Some(c) => out.push(qualified("public", "users", view.get(c).copied())),
                    None => out.push(qualified("public", "users", None)),
                }
            }
            Some(out)
        }
        fn stores_elsewhere(&self, t: &TableName) -> Option<bool> {
            table_cols(&t.name).map(|_| false)
        }
        fn columns(&self, t: &TableName) -> Option<Vec<String>> {
            Some(
                table_cols(&t.name)?
                    .iter()
                    .map(|c| (*c).to_owned())
                    .collect(),
            )
        }
    }

    fn mask(columns: &[&str], unresolved: Unresolved) -> Vec<Arc<MaskSpec>> {
        vec![Arc::new(MaskSpec {
            rule: "m".into(),
            columns: columns.iter().map(|s| (*s).to_owned()).collect(),
            detectors: Vec::new(),
            strategy: Strategy::Redact { text: None },
            unresolved,
        })]
    }

    fn f(name: &str, oid: u32, att: i16) -> Field {
        Field {
            name: name.into(),
            table_oid: oid,
            attnum: att,
            type_oid: 25,
            format: 0,
        }
    }

    fn shape(sql: &str) -> Shape {
        classify(sql, LexOptions::default()).statements[0]
            .shape
            .clone()
    }

    /// Which columns get masked, as labels (`-` for none).
    fn masked(sql: &str, fields: &[Field], r: &dyn Resolve) -> Result<Vec<String>, Refusal> {
        let p = plan_rows(
            &mask(&["users.email"], Unresolved::MaskAll),
            &shape(sql),
            fields,
            r,
            Default::default(),
        )?;
        Ok(p.columns
            .iter()
            .map(|c| c.whole.as_ref().map_or("-".into(), |(_, l)| l.to_string()))
            .collect())
    }

    #[test]
    fn patterns() {
        let r = qualified("public", "users", Some("email"));
        assert!(pattern_matches("users.email", &r));
        assert!(pattern_matches("public.users.email", &r));
        assert!(pattern_matches("*.email", &r));
        assert!(pattern_matches("p*.u*.e*", &r));
        assert!(!pattern_matches("private.users.email", &r));
        assert!(!pattern_matches("users.name", &r));
        assert!(
            pattern_matches("users.name", &qualified("public", "users", None)),
            "whole row"
        );
        let unq = ColumnRef {
            table: TableName {
                schema: None,
                name: "users".into(),
            },
            column: Some("email".into()),
        };
        assert!(
            pattern_matches("other.users.email", &unq),
            "unqualified: any schema"
        );
    }

    #[test]
    fn plain_columns_by_origin() {
        let fields = [f("id", 1, 1), f("email", 1, 2)];
        assert_eq!(
            masked("SELECT id, email FROM users", &fields, &Cat).expect("in test"),
            ["-", "email"]
        );
        // Aliased: the origin still says users.email.
        let fields = [f("e", 1, 2)];
        assert_eq!(
            masked("SELECT email AS e FROM users", &fields, &Cat).expect("in test"),
            ["email"]
        );
    }

    #[test]
    fn computed_columns_by_lineage() {
        let fields = [f("upper", 0, 0), f("n", 0, 0)];
        assert_eq!(
            masked(
                "SELECT upper(email), length(name) AS n FROM users",
                &fields,
                &Cat
            )
            .expect("in test"),
            ["email", "-"]
        );
        let fields = [f("encode", 0, 0)];
        assert_eq!(
            masked(
                "SELECT encode(convert_to(email, 'UTF8'), 'hex') FROM users",
                &fields,
                &Cat
            )
            .expect("in test"),
            ["email"]
        );
    }

    #[test]
    fn stars_and_views() {
        let fields = [
            f("id", 1, 1),
            f("email", 1, 2),
            f("name", 1, 3),
            f("x", 0, 0),
        ];
        assert_eq!(
            masked("SELECT *, 1 AS x FROM users", &fields, &Cat).expect("in test"),
            ["-", "email", "-", "-"]
        );
        // A view column reports the view; the catalog traces it to users.email.
        let fields = [f("name", 3, 1), f("contact", 3, 2)];
        assert_eq!(
            masked("SELECT * FROM contacts", &fields, &Cat).expect("in test"),
            ["-", "email"]
        );
        let fields = [f("lower", 0, 0)];
        assert_eq!(
            masked("SELECT lower(contact) FROM contacts", &fields, &Cat).expect("in test"),
            ["email"]
        );
    }

    #[test]
    fn undecidable_columns_follow_the_rule() {
        // Without a catalog nothing that reads a table can be verified (it may be a view).
        let fields = [f("id", FIRST_NORMAL_OBJECT_ID + 1, 1), f("one", 0, 0)];
        assert_eq!(
            masked(
                "SELECT id, 1 AS one FROM users",
                &fields,
                &NoCatalog::default()
            )
            .expect("in test"),
            ["unresolved", "-"]
        );
        // A relation the catalog does not know.
        let fields = [f("x", 0, 0)];
        assert_eq!(
            masked("SELECT upper(x) AS x FROM elsewhere", &fields, &Cat).expect("in test"),
            ["unresolved"]
        );
        // Deny instead.
        let p = plan_rows(
            &mask(&["users.email"], Unresolved::Deny),
            &shape("SELECT upper(x) AS x FROM elsewhere"),
            &fields,
            &Cat,
            Default::default(),
        );
        assert!(matches!(p, Err(Refusal::Unresolved { .. })), "{p:?}");
        // FETCH: plain columns by origin, computed ones undecidable.
        let fields = [f("email", 1, 2), f("upper", 0, 0)];
        assert_eq!(
            masked("FETCH 1 FROM c", &fields, &Cat).expect("in test"),
            ["email", "unresolved"]
        );
    }

    #[test]
    fn system_relations_are_known_without_the_catalog() {
        let pii = mask(&["*.email", "*.password"], Unresolved::MaskAll);
        let planned = |r: NoCatalog, sql: &str, fields: &[Field]| -> Vec<String> {
            plan_rows(&pii, &shape(sql), fields, &r, Default::default())
                .expect("in test")
                .columns
                .iter()
                .map(|c| c.whole.as_ref().map_or("-".into(), |(_, l)| l.to_string()))
                .collect()
        };
        let plan = |sql: &str, fields: &[Field]| planned(NoCatalog::default(), sql, fields);
        let (pg_class, pg_namespace, users) = (1259, 2615, FIRST_NORMAL_OBJECT_ID + 7);
        // psql's `\dt`, in short: qualified catalogs, plain and computed columns.
        assert_eq!(
            plan(
                "SELECT n.nspname, c.relname, upper(c.relkind::text), \
                 pg_catalog.pg_get_userbyid(c.relowner) AS owner \
                 FROM pg_catalog.pg_class c \
                 LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
                &[
                    f("nspname", pg_namespace, 2),
                    f("relname", pg_class, 2),
                    f("upper", 0, 0),
                    f("owner", 0, 0),
                ],
            ),
            ["-", "-", "-", "-"]
        );
        // information_schema's views; `*` of a system relation.
        assert_eq!(
            plan(
                "SELECT * FROM information_schema.tables",
                &[f("table_name", 0, 0), f("table_type", 0, 0)],
            ),
            ["-", "-"]
        );
        // A rule's pattern still applies to a system column the statement names.
        assert_eq!(
            plan(
                "SELECT x.password FROM pg_catalog.pg_foo x",
                &[f("password", 1, 3)],
            ),
            ["password"]
        );
        // An unqualified name may be a temporary table (searched before pg_catalog), and a
        // table of the database's is unverifiable as before, beside a catalog's columns.
        assert_eq!(
            plan("SELECT upper(relname) FROM pg_class", &[f("upper", 0, 0)]),
            ["unresolved"]
        );
        assert_eq!(
            plan(
                "SELECT c.relname, u.name FROM pg_catalog.pg_class c, users u",
                &[f("relname", pg_class, 2), f("name", users, 3)],
            ),
            ["-", "unresolved"]
        );
        // ... unless the session cannot have made one (pg_dump's queries are unqualified).
        // Then a name that is not pg_catalog's is still unverifiable.
        let searched =
            |sql: &str, fields: &[Field]| planned(NoCatalog { unqualified: true }, sql, fields);
        assert_eq!(
            searched(
                "SELECT upper(x.relname), x.tableoid FROM pg_class x",
                &[f("upper", 0, 0), f("tableoid", pg_class, -6)]
            ),
            ["-", "-"]
        );
        assert_eq!(
            searched("SELECT upper(name) FROM users", &[f("upper", 0, 0)]),
            ["unresolved"]
        );
        // Results not lined up with the statement: a system table's plain column is known
        // by its OID alone; any other table's is not.
        assert_eq!(
            plan(
                "FETCH 1 FROM c",
                &[f("relname", pg_class, 2), f("name", users, 3), f("x", 0, 0)]
            ),
            ["-", "unresolved", "unresolved"]
        );
        // `unresolved = "deny"` refuses before running only what cannot be traced; the
        // catalog decides the rest when the results arrive.
        let deny = mask(&["*.email"], Unresolved::Deny);
        for sql in [
            "SELECT c.relname FROM pg_catalog.pg_class c",
            "SELECT relname FROM pg_class",
        ] {
            assert_eq!(precheck(&deny, &shape(sql)), Ok(()), "{sql}");
        }
    }

    #[test]
    fn detectors_only_need_no_catalog() {
        let masks = vec![Arc::new(MaskSpec {
            rule: "d".into(),
            columns: Vec::new(),
            detectors: vec!["email".into()],
            strategy: Strategy::Hash,
            unresolved: Unresolved::Deny,
        })];
        let p = plan_rows(
            &masks,
            &shape("SELECT * FROM users"),
            &[f("a", 0, 0)],
            &NoCatalog::default(),
            Default::default(),
        )
        .expect("in test");
        assert!(p.is_active());
        assert_eq!(
            p.detection.expect("in test").strategy("email"),
            Some(&Strategy::Hash)
        );
    }

    #[test]
    fn copy_plans() {
        let masks = mask(&["users.email"], Unresolved::MaskAll);
        let (p, fmt) = plan_copy(&masks, &shape("COPY users TO STDOUT"), 3, &Cat).expect("in test");
        let _ = fmt.expect("in test");
        // A table's star is expanded from the catalog.
        let w: Vec<bool> = p.columns.iter().map(|c| c.whole.is_some()).collect();
        assert_eq!(w, [false, true, false]);
        // Without it, every column of the table counts for each output column.
        let (p, _) = plan_copy(
            &masks,
            &shape("COPY (SELECT * FROM users) TO STDOUT"),
            3,
            &NoCatalog::default(),
        )
        .expect("in test");
        assert!(
            p.columns
                .iter()
                .all(|c| c.whole.as_ref().is_some_and(|(_, l)| &**l == "unresolved"))
        );
        let (p, _) = plan_copy(
            &masks,
            &shape("COPY users (id, email) TO STDOUT (FORMAT csv)"),
            2,
            &Cat,
        )
        .expect("in test");
        assert!(p.columns[0].whole.is_none() && p.columns[1].whole.is_some());
        assert!(matches!(
            plan_copy(
                &masks,
                &shape("COPY users TO STDOUT (FORMAT binary)"),
                3,
                &Cat
            ),
            Err(Refusal::BinaryCopy { .. })
        ));
    }

    #[test]
    fn prechecks() {
        let deny = mask(&["users.email"], Unresolved::Deny);
        assert!(precheck(&deny, &shape("SELECT email FROM users")).is_ok());
        assert!(precheck(&deny, &shape("SELECT nope.x FROM users")).is_err());
        assert!(precheck(&deny, &shape("FETCH 1 FROM c")).is_err());
        let all = mask(&["users.email"], Unresolved::MaskAll);
        assert!(precheck(&all, &shape("SELECT email FROM users")).is_ok());
        assert!(precheck(&all, &shape("COPY users TO STDOUT (FORMAT binary)")).is_err());
    }
}
