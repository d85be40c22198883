//! Copies inside the database. A column rule masks a column where it is read; a value the
//! client copies into another table (`INSERT INTO notes (body) SELECT phone FROM people`,
//! `CREATE TABLE t AS SELECT email AS x FROM users`, `UPDATE people SET note = phone`)
//! would be read back from its new place in the clear. So a write whose stored value is
//! computed from a masked column is refused unless the place it goes is covered by a mask
//! too (`UPDATE users SET email = lower(email)`, `INSERT INTO archive (email) SELECT email
//! FROM users` under `*.email`).
//!
//! What a stored value is computed from comes from the statement's
//! [lineage](crate::policy::sql::lineage::stored), checked against the catalog as reads
//! are: a view's column is what the view computes it from, a whole row (`*`,
//! `to_jsonb(u)`) is each of its table's columns. What the catalog cannot confirm is
//! treated as masked. Where a value goes is what the text says, and for an `INSERT`
//! without a column list or after a table's `*`, what the catalog says the column at that
//! position is ([`place`]); a place nobody can name (after the `*` of a function, a
//! position the catalog cannot tell) is covered by nothing.
//!
//! Without a catalog ([`super::plan::NoCatalog`]) nothing is confirmed, so every copy of
//! a column into a place no mask covers is refused, as every read of a table column is
//! masked or refused then (it might be a view).
//!
//! Pure: the catalog is reached through [`Resolve`], filled before checking.

use std::{collections::BTreeSet, sync::Arc};

use super::plan::{Refusal, Resolve, pattern_matches, pattern_parts};
use crate::policy::{
    glob,
    model::MaskSpec,
    sql::{
        StatementClass, TableName,
        kind::{Kind, Object},
        lineage::{ColumnRef, Deps, Dest, Slot, Stored},
    },
};

/// What the catalog may not show yet: changed by the session in a transaction that has not
/// ended, or earlier in the same message. What the catalog says about it is not believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redefined {
    relations: Relations,
    /// Where rows written into existing relations are stored may have changed: a foreign
    /// table created or altered, a partition or child attached ([`stays_here`]).
    storage: bool,
}

/// Relations whose definitions may have changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Relations {
    #[default]
    Nothing,
    /// Relations by name (in any schema).
    Names(BTreeSet<String>),
    /// Anything may have changed (`DO`, `CALL`, a schema or an extension).
    All,
}

impl Redefined {
    /// These relations (by name, in any schema).
    pub fn names<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            relations: Relations::Names(names.into_iter().map(str::to_owned).collect()),
            storage: false,
        }
    }

    /// Anything (`DO`, `CALL`, a schema or an extension), where rows are stored too.
    pub fn all() -> Self {
        Self {
            relations: Relations::All,
            storage: true,
        }
    }

    pub fn covers(&self, name: &str) -> bool {
        match &self.relations {
            Relations::Nothing => false,
            Relations::Names(n) => n.contains(name),
            Relations::All => true,
        }
    }

    /// Whether the catalog is not believed about where rows written into a relation are
    /// stored.
    pub fn storage_changed(&self) -> bool {
        self.storage
    }

    pub fn add(&mut self, other: Redefined) {
        use Relations as R;
        self.storage |= other.storage;
        self.relations = match (std::mem::take(&mut self.relations), other.relations) {
            (R::All, _) | (_, R::All) => R::All,
            (R::Nothing, x) | (x, R::Nothing) => x,
            (R::Names(mut a), R::Names(b)) => {
                a.extend(b);
                R::Names(a)
            }
        };
    }

    /// What a statement may redefine: the relations DDL on tables and views names;
    /// everything for DDL whose effect on relations is not known from its text (schemas,
    /// extensions, types, rules) and for `DO` and `CALL`. DDL on indexes, sequences,
    /// functions, triggers, roles and the like changes no relation's columns.
    ///
    /// Where rows written into existing relations are stored, too, for foreign table DDL
    /// and attaching a partition or child, besides the relations they name.
    pub fn by(s: &StatementClass) -> Self {
        let mut out = Self::default();
        for k in &s.kinds {
            match k {
                Kind::Create(o) | Kind::Alter(o) | Kind::Drop(o) => match o {
                    Object::Table
                    | Object::View
                    | Object::MaterializedView
                    | Object::ForeignTable => {
                        let names = s.tables_written.iter().map(|t| t.name.as_str());
                        out.add(if s.tables_written.is_empty() {
                            Self::all()
                        } else {
                            Self::names(names)
                        });
                    }
                    Object::Index
                    | Object::Sequence
                    | Object::Function
                    | Object::Procedure
                    | Object::Trigger
                    | Object::Role
                    | Object::Policy
                    | Object::Collation
                    | Object::Operator
                    | Object::Aggregate
                    | Object::TextSearch
                    | Object::Server
                    | Object::UserMapping
                    | Object::ForeignDataWrapper => {}
                    _ => out.add(Self::all()),
                },
                Kind::Do | Kind::Call => out.add(Self::all()),
                _ => {}
            }
        }
        out.storage |= s.attaches
            || s.kinds.iter().any(|k| {
                matches!(
                    k,
                    Kind::Create(Object::ForeignTable) | Kind::Alter(Object::ForeignTable)
                )
            });
        out
    }
}

/// Refuses the first stored value that copies a masked column where no mask covers it.
/// What the catalog says about `redefined` relations is not believed: values read from
/// them count as unverified.
pub fn check(
    masks: &[Arc<MaskSpec>],
    stored: &[Stored],
    resolve: &dyn Resolve,
    redefined: &Redefined,
) -> Result<(), Refusal> {
    let patterns: Vec<(&str, &str)> = masks
        .iter()
        .flat_map(|m| m.columns.iter().map(|p| (m.rule.as_str(), p.as_str())))
        .collect();
    if patterns.is_empty() {
        return Ok(());
    }
    for s in &place(stored, resolve, redefined) {
        if !s.deps.opaque && s.deps.columns.iter().all(|r| is_own_place(s, r)) {
            continue;
        }
        let sources = sources(s, resolve, redefined);
        for &(rule, pattern) in &patterns {
            let source = match &sources {
                Sources::Known(refs) => match refs.iter().find(|r| pattern_matches(pattern, r)) {
                    Some(r) => Source::Masked(shown(r)),
                    None => continue,
                },
                Sources::Unverified(name) => Source::Unverified(name.clone()),
            };
            if covered(s, pattern, &patterns, resolve, redefined) {
                // Covered where it is read through this gateway, if it is stored here.
                let (Source::Masked(from) | Source::Unverified(from)) = source;
                let here = stays_here(s, resolve, redefined);
                if here == Some(true) {
                    continue;
                }
                let (rule, dest) = (rule.to_owned(), dest_shown(s));
                return Err(match here {
                    Some(_) => Refusal::CopyElsewhere { rule, from, dest },
                    None => Refusal::CopyUnverifiedPlace { rule, from, dest },
                });
            }
            let dest = dest_shown(s);
            let unplaced = matches!(s.dest, Dest::Position(_) | Dest::Spread { .. });
            return Err(match source {
                Source::Masked(from) if let Dest::Kept(function) = &s.dest => Refusal::Kept {
                    rule: rule.to_owned(),
                    from,
                    function: function.clone(),
                },
                Source::Masked(from) if unplaced => Refusal::CopyUnplaced {
                    rule: rule.to_owned(),
                    from,
                    dest,
                },
                Source::Masked(from) => Refusal::Copy {
                    rule: rule.to_owned(),
                    from,
                    dest,
                },
                Source::Unverified(from) => Refusal::CopyUnverified {
                    rule: rule.to_owned(),
                    from,
                    dest,
                },
            });
        }
    }
    Ok(())
}

/// The names a check needs from the catalog: every relation the stored values read, the
/// relations they are written to (where do they store their rows?), and the tables whose
/// column order places a value.
pub fn names(stored: &[Stored]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in stored {
        out.extend(s.deps.columns.iter().map(|c| c.table.name.clone()));
        if s.existing && !s.table.name.is_empty() {
            out.push(s.table.name.clone());
        }
        if let Dest::Position(slot) | Dest::Spread { slot, .. } = &s.dest {
            out.push(s.table.name.clone());
            out.extend(slot.after.iter().map(|t| t.name.clone()));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Stored values with their INSERT positions named from the catalog: a [`Dest::Position`]
/// becomes the column at that place, a [`Dest::Spread`] one value per column of its
/// relation, each into the column at its place. What the catalog cannot tell (a table it
/// does not know or whose name is ambiguous, one `redefined`, a position past the end)
/// stays as it was, covered by nothing.
pub fn place(stored: &[Stored], resolve: &dyn Resolve, redefined: &Redefined) -> Vec<Stored> {
    let columns = |t: &TableName| {
        if redefined.covers(&t.name) {
            None
        } else {
            resolve.columns(t)
        }
    };
    // The target columns and the position the slot stands for.
    let target = |table: &TableName, slot: &Slot| -> Option<(Vec<String>, usize)> {
        let mut at = slot.index;
        for t in &slot.after {
            at = (at + columns(t)?.len()).checked_sub(1)?;
        }
        let list = if slot.columns.is_empty() {
            columns(table)?
        } else {
            slot.columns.clone()
        };
        Some((list, at))
    };
    let mut out = Vec::with_capacity(stored.len());
    for s in stored {
        let to = |list: &[String], at: usize, deps: Deps| Stored {
            table: s.table.clone(),
            dest: list
                .get(at)
                .map_or(Dest::Unknown, |c| Dest::Column(c.clone())),
            deps,
            existing: s.existing,
        };
        match &s.dest {
            Dest::Position(slot) => match target(&s.table, slot) {
                Some((list, at)) => out.push(to(&list, at, s.deps.clone())),
                None => out.push(s.clone()),
            },
            Dest::Spread { slot, of } => match target(&s.table, slot).zip(columns(of)) {
                Some(((list, at), cols)) => {
                    out.extend(cols.into_iter().enumerate().map(|(j, c)| {
                        let mut deps = Deps::default();
                        deps.columns.insert(ColumnRef {
                            table: of.clone(),
                            column: Some(c),
                        });
                        to(&list, at + j, deps)
                    }))
                }
                None => out.push(s.clone()),
            },
            _ => out.push(s.clone()),
        }
    }
    out
}

enum Sources {
    /// Every column the value may be computed from, qualified by the catalog.
    Known(Vec<ColumnRef>),
    /// Something it reads cannot be confirmed: the first such thing.
    Unverified(String),
}

enum Source {
    Masked(String),
    Unverified(String),
}

fn sources(s: &Stored, resolve: &dyn Resolve, redefined: &Redefined) -> Sources {
    if s.deps.opaque {
        return Sources::Unverified("a value that cannot be traced".into());
    }
    let changed = |r: &ColumnRef| {
        Sources::Unverified(format!(
            "{} (definitions changed in this session's transaction)",
            shown(r)
        ))
    };
    let mut out = Vec::new();
    for r in s.deps.columns.iter().filter(|r| !is_own_place(s, r)) {
        if redefined.covers(&r.table.name) {
            return changed(r);
        }
        let Some(expanded) = resolve.expand(r) else {
            return Sources::Unverified(shown(r));
        };
        // A view over a redefined relation may read something else now.
        if let Some(e) = expanded.iter().find(|e| redefined.covers(&e.table.name)) {
            return changed(e);
        }
        for e in expanded {
            match &e.column {
                Some(_) => out.push(e),
                // A whole row is each of its columns.
                None => match resolve.columns(&e.table) {
                    Some(cols) => out.extend(cols.into_iter().map(|c| ColumnRef {
                        table: e.table.clone(),
                        column: Some(c),
                    })),
                    None => return Sources::Unverified(shown(&e)),
                },
            }
        }
    }
    Sources::Known(out)
}

/// Whether the relation a value is written to keeps it on this server, where the masks
/// that cover its place apply when it is read. A table the statement creates, and rows a
/// value stays in under another name, do ([`Stored::existing`]); for rows written into an
/// existing relation the catalog says ([`Resolve::stores_elsewhere`]). A name the catalog
/// does not show counts as local: a temporary table (never foreign, nor a parent of one)
/// or one created in the session's open transaction, which could store elsewhere only
/// through a foreign table created or attached there: after such a statement (and `DO`,
/// `CALL`), until the transaction ends, the catalog is not believed about any relation's
/// storage ([`Redefined::storage_changed`]).
fn stays_here(s: &Stored, resolve: &dyn Resolve, redefined: &Redefined) -> Option<bool> {
    if !s.existing {
        return Some(true);
    }
    if redefined.storage_changed() {
        return None;
    }
    resolve.stores_elsewhere(&s.table).map(|away| !away)
}

/// Whether `r` is the very column the value is written to (`SET n = n + 1`, `SET x =
/// excluded.x`): what masks it there masks it still, so it is no copy.
fn is_own_place(s: &Stored, r: &ColumnRef) -> bool {
    matches!(&s.dest, Dest::Column(c) if r.table == s.table && r.column.as_ref() == Some(c))
}

/// Whether the place a value goes is masked when read. A named column: any column rule
/// covering it, by the name as written or (when the catalog knows the table) by every
/// qualified table it may be. The source's own names (`CREATE TABLE t AS SELECT * FROM
/// s`): the rule that matched the source, if it covers the new table. Unnamed: nothing.
fn covered(
    s: &Stored,
    matched: &str,
    patterns: &[(&str, &str)],
    resolve: &dyn Resolve,
    redefined: &Redefined,
) -> bool {
    let column = match &s.dest {
        Dest::Column(c) => c,
        Dest::SameNames => return covers(matched, &s.table, None),
        Dest::Position(_) | Dest::Spread { .. } | Dest::Unknown | Dest::Kept(_) => return false,
    };
    let any = |t: &TableName| patterns.iter().any(|(_, p)| covers(p, t, Some(column)));
    if any(&s.table) {
        return true;
    }
    if redefined.covers(&s.table.name) {
        return false;
    }
    let r = ColumnRef {
        table: s.table.clone(),
        column: Some(column.clone()),
    };
    // Only the written relation itself (the first entry; a view's sources follow).
    match resolve.expand(&r) {
        Some(v) => {
            let own: Vec<&ColumnRef> = v
                .iter()
                .filter(|e| e.table.name == s.table.name && e.column.as_deref() == Some(column))
                .collect();
            !own.is_empty() && own.iter().all(|e| any(&e.table))
        }
        None => false,
    }
}

/// Whether `pattern` masks `column` (all the columns it matches, for `None`) of `table`.
/// Unlike a reference being read, a place written to is covered only if the rule covers
/// it in whatever schema it is in: a table whose schema is not known is covered only by a
/// pattern for any schema.
fn covers(pattern: &str, table: &TableName, column: Option<&str>) -> bool {
    let Some((schema, t, c)) = pattern_parts(pattern) else {
        return false;
    };
    let schema_ok = match (schema, &table.schema) {
        (None, _) => true,
        (Some(ps), Some(s)) => glob::matches(ps, s),
        (Some(ps), None) => ps == "*",
    };
    schema_ok && glob::matches(t, &table.name) && column.is_none_or(|col| glob::matches(c, col))
}

fn shown(r: &ColumnRef) -> String {
    format!("{}.{}", r.table, r.column.as_deref().unwrap_or("*"))
}

fn dest_shown(s: &Stored) -> String {
    let t = if s.table.name.is_empty() {
        "a table".to_owned()
    } else {
        s.table.to_string()
    };
    match &s.dest {
        Dest::Column(c) => format!("{t}.{c}"),
        Dest::SameNames => format!("{t} under the same column names"),
        Dest::Position(slot) | Dest::Spread { slot, .. } => {
            let n = slot.index + 1;
            let after = if slot.after.is_empty() {
                String::new()
            } else {
                let stars: Vec<String> = slot.after.iter().map(|t| format!("{t}.*")).collect();
                format!(" after {}", stars.join(", "))
            };
            format!("{t} by position (item {n}{after})")
        }
        Dest::Unknown => format!("{t} in columns the statement does not name"),
        Dest::Kept(f) => format!("what {f} keeps"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        masking::plan::NoCatalog,
        policy::{
            model::{Strategy, Unresolved},
            sql::{LexOptions, classify},
        },
    };

    fn mask(rule: &str, columns: &[&str]) -> Arc<MaskSpec> {
        Arc::new(MaskSpec {
            rule: rule.into(),
            columns: columns.iter().map(|c| (*c).into()).collect(),
            detectors: Vec::new(),
            strategy: Strategy::Redact { text: None },
            unresolved: Unresolved::MaskAll,
        })
    }

    /// A catalog of plain tables (schema `public`) and views: `v(contact)` reads
    /// `users.email`.
    struct Cat(HashMap<&'static str, Vec<&'static str>>);

    fn cat() -> Cat {
        Cat(HashMap::from([
            ("users", vec!["id", "name", "email"]),
            ("orders", vec!["id", "total"]),
            ("notes", vec!["id", "body"]),
            ("archive", vec!["id", "email"]),
            ("v", vec!["contact"]),
            ("mv", vec!["id", "email"]),
            // A foreign table, and a view over it.
            ("remote", vec!["id", "email"]),
            ("remote_v", vec!["id", "email"]),
        ]))
    }

    fn public(t: &str, c: Option<&str>) -> ColumnRef {
        crate::masking::plan::qualified("public", t, c)
    }

    impl Resolve for Cat {
        fn origin(&self, _: u32, _: i16) -> Option<Vec<ColumnRef>> {
            None
        }
        fn expand(&self, r: &ColumnRef) -> Option<Vec<ColumnRef>> {
            self.0.get(r.table.name.as_str())?;
            let mut out = vec![public(&r.table.name, r.column.as_deref())];
            if r.table.name == "v" {
                out.push(public("users", Some("email")));
            }
            Some(out)
        }
        /// A name not in the catalog was looked up and is not shown: local.
        fn stores_elsewhere(&self, t: &TableName) -> Option<bool> {
            Some(matches!(t.name.as_str(), "remote" | "remote_v"))
        }
        fn columns(&self, t: &TableName) -> Option<Vec<String>> {
            Some(
                self.0
                    .get(t.name.as_str())?
                    .iter()
                    .map(|c| (*c).into())
                    .collect(),
            )
        }
    }

    fn stored(sql: &str) -> Vec<Stored> {
        let c = classify(sql, LexOptions::default());
        assert!(c.error.is_none(), "{sql}: {:?}", c.error);
        c.statements.into_iter().flat_map(|s| s.stored).collect()
    }

    fn run(sql: &str, masks: &[Arc<MaskSpec>], resolve: &dyn Resolve) -> Result<(), String> {
        check(masks, &stored(sql), resolve, &Redefined::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_masked_column_copied_where_no_mask_covers_it_is_refused() {
        let m = [mask("pii", &["*.email"])];
        for sql in [
            "INSERT INTO notes (body) SELECT email FROM users",
            "INSERT INTO notes (body) SELECT upper(email) || '' FROM users",
            "UPDATE users SET name = email",
            "UPDATE notes SET body = u.email FROM users u WHERE u.id = notes.id",
            "CREATE TABLE t AS SELECT email AS x FROM users",
            "SELECT email AS contact INTO t FROM users",
            "CREATE MATERIALIZED VIEW m AS SELECT lower(email) AS e2 FROM users",
            "INSERT INTO notes (body) SELECT to_jsonb(u)::text FROM users u",
            // Through a view: v.contact is users.email.
            "INSERT INTO notes (body) SELECT contact FROM v",
            // Without a column list the catalog names the place: notes.body.
            "INSERT INTO notes SELECT id, email FROM users",
            // users.* spreads id, name, email over notes(id, body) and past its end.
            "INSERT INTO notes SELECT * FROM users",
            // After orders.* (two columns) the third item would be a fourth notes column.
            "INSERT INTO notes SELECT o.*, u.email FROM orders o, users u",
            "WITH c AS (SELECT email AS e FROM users) INSERT INTO notes (body) SELECT e FROM c",
            // Renaming the column moves its values out from under the mask.
            "ALTER TABLE users RENAME COLUMN email TO contact",
            "ALTER TABLE users ADD COLUMN c text GENERATED ALWAYS AS (upper(email)) STORED",
        ] {
            let e = run(sql, &m, &cat()).expect_err(sql);
            assert!(e.starts_with("rule pii: "), "{sql}: {e}");
            assert!(e.contains("users.email"), "{sql}: {e}");
        }
    }

    #[test]
    fn copies_into_covered_places_and_unmasked_copies_pass() {
        let m = [mask("pii", &["*.email"])];
        for sql in [
            "UPDATE users SET email = lower(email)",
            "INSERT INTO archive (id, email) SELECT id, email FROM users",
            "CREATE TABLE t AS SELECT * FROM users",
            "CREATE TABLE t AS SELECT id, email FROM users",
            "INSERT INTO notes (body) SELECT name FROM users",
            "INSERT INTO notes SELECT * FROM orders",
            // By position into archive(id, email), which the rule covers.
            "INSERT INTO archive SELECT id, email FROM users",
            "INSERT INTO archive SELECT id, email FROM archive",
            "INSERT INTO archive SELECT * FROM archive",
            "INSERT INTO archive (id, email) SELECT * FROM archive",
            "INSERT INTO notes (body) VALUES ('a@example.com')",
            "UPDATE users SET name = 'x' WHERE email = 'a@example.com'",
            "CREATE VIEW w AS SELECT email AS c FROM users",
            "ALTER TABLE users RENAME TO folks",
            "ALTER TABLE users RENAME COLUMN name TO full_name",
        ] {
            assert_eq!(run(sql, &m, &cat()), Ok(()), "{sql}");
        }
    }

    #[test]
    fn a_covered_place_on_another_server_is_no_cover() {
        let m = [mask("pii", &["*.email"])];
        for sql in [
            "INSERT INTO remote (id, email) SELECT id, email FROM users",
            "INSERT INTO remote SELECT id, email FROM users",
            "INSERT INTO remote_v (email) SELECT email FROM users",
            "UPDATE remote SET email = u.email FROM users u WHERE u.id = remote.id",
            "INSERT INTO remote (email) SELECT contact FROM v",
        ] {
            let e = run(sql, &m, &cat()).expect_err(sql);
            assert!(e.contains("stored on another server"), "{sql}: {e}");
            assert!(e.contains("remote"), "{sql}: {e}");
        }
        // What is not masked, or is already there, may go.
        for sql in [
            "INSERT INTO remote (id) SELECT id FROM users",
            "INSERT INTO remote (email) VALUES ('a@example.com')",
            "UPDATE remote SET email = lower(email)",
            "INSERT INTO archive (email) SELECT email FROM remote",
        ] {
            assert_eq!(run(sql, &m, &cat()), Ok(()), "{sql}");
        }
        // Without a catalog, where a covered place stores its rows is not known.
        let e = run(
            "INSERT INTO archive (email) SELECT email FROM users",
            &m,
            &NoCatalog::default(),
        )
        .expect_err("unverified place");
        assert!(
            e.contains("cannot verify") && e.contains("archive.email"),
            "{e}"
        );
        // The check asks the catalog about the places written to, not tables created.
        assert_eq!(
            names(&stored(
                "INSERT INTO remote (email) SELECT email FROM users"
            )),
            ["remote", "users"]
        );
        assert_eq!(
            names(&stored("CREATE TABLE t AS SELECT email FROM users")),
            ["users"]
        );
    }

    #[test]
    fn what_a_function_keeps_of_a_masked_column_is_refused() {
        let m = [mask("pii", &["*.email"])];
        for sql in [
            "SELECT setval('s', length(email)) FROM users",
            "SELECT pg_advisory_lock(('x' || encode(convert_to(email, 'UTF8'), 'hex'))::bit(64)::bigint) FROM users",
            "SELECT setval('s', (SELECT length(max(contact)) FROM v))",
        ] {
            let e = run(sql, &m, &cat()).expect_err(sql);
            assert!(
                e.contains("would keep a value computed from public.users.email"),
                "{sql}: {e}"
            );
        }
        for sql in [
            "SELECT setval(pg_get_serial_sequence('users', 'id'), coalesce(max(id), 1)) FROM users",
            "SELECT setval('s', (SELECT max(id) FROM users))",
        ] {
            assert_eq!(run(sql, &m, &cat()), Ok(()), "{sql}");
        }
        // What the catalog cannot confirm counts as masked.
        let e = run("SELECT setval('s', n) FROM unknown_rel", &m, &cat()).expect_err("unknown");
        assert!(
            e.contains("cannot verify") && e.contains("what setval keeps"),
            "{e}"
        );
    }

    #[test]
    fn inserts_by_position_are_placed_from_the_catalog() {
        let m = [mask("pii", &["*.email"])];
        let dests = |sql: &str, redefined: &Redefined| -> Vec<String> {
            place(&stored(sql), &cat(), redefined)
                .iter()
                .map(|s| format!("{}.{}", s.table, dest_shown(s)))
                .collect()
        };
        assert_eq!(
            dests(
                "INSERT INTO archive SELECT o.*, u.email FROM orders o, users u",
                &Redefined::default()
            ),
            [
                "archive.archive.id",
                "archive.archive.email",
                "archive.archive in columns the statement does not name"
            ]
        );
        assert_eq!(
            names(&stored(
                "INSERT INTO archive SELECT o.*, u.email FROM orders o, users u"
            )),
            ["archive", "orders", "users"]
        );
        // A table the catalog does not know, or one the session changed, is not placed.
        let e = run("INSERT INTO fresh SELECT id, email FROM users", &m, &cat())
            .expect_err("unknown table");
        assert!(e.contains("does not show which column"), "{e}");
        assert!(e.contains("fresh by position (item 2)"), "{e}");
        let archive = Redefined::names(["archive"]);
        let copy = stored("INSERT INTO archive SELECT id, email FROM users");
        assert_eq!(check(&m, &copy, &cat(), &Redefined::default()), Ok(()));
        let e = check(&m, &copy, &cat(), &archive)
            .expect_err("archive redefined")
            .to_string();
        assert!(e.contains("archive by position (item 2)"), "{e}");
        // Nor is a position after the `*` of a relation whose width is not believed.
        let orders = Redefined::names(["orders"]);
        assert_eq!(
            dests(
                "INSERT INTO archive SELECT o.*, u.email FROM orders o, users u",
                &orders
            )[1],
            "archive.archive by position (item 2 after orders.*)"
        );
    }

    #[test]
    fn a_written_table_must_be_covered_in_whatever_schema_it_is() {
        let m = [mask("pii", &["public.*.email"])];
        // `t` is new: its schema is not known, and the rule covers only `public`.
        assert!(run("CREATE TABLE t AS SELECT email FROM users", &m, &cat()).is_err());
        assert_eq!(
            run(
                "CREATE TABLE public.t AS SELECT email FROM users",
                &m,
                &cat()
            ),
            Ok(())
        );
        // A renamed table is covered only by a rule for its new name.
        let by_table = [mask("pii", &["users.email"])];
        assert!(run("ALTER TABLE users RENAME TO folks", &by_table, &cat()).is_err());
        // A materialized view holds its rows as a table does: renamed or moved, they are
        // read under names the rule must cover.
        let e = run(
            "ALTER MATERIALIZED VIEW mv RENAME COLUMN email TO contact",
            &m,
            &cat(),
        )
        .expect_err("a masked column renamed");
        assert!(e.contains("mv.email"), "{e}");
        assert!(run("ALTER MATERIALIZED VIEW mv SET SCHEMA archive", &m, &cat()).is_err());
        assert_eq!(
            run(
                "ALTER MATERIALIZED VIEW mv RENAME TO folks",
                &[mask("pii", &["*.email"])],
                &cat()
            ),
            Ok(())
        );
        // `archive` is known to the catalog, in `public`.
        assert_eq!(
            run(
                "INSERT INTO archive (email) SELECT email FROM users",
                &m,
                &cat()
            ),
            Ok(())
        );
    }

    #[test]
    fn what_the_catalog_cannot_confirm_counts_as_masked() {
        let m = [mask("pii", &["*.email"])];
        let e = run(
            "INSERT INTO notes (body) SELECT x FROM unknown_rel",
            &m,
            &cat(),
        )
        .expect_err("unknown relation");
        assert!(e.contains("cannot verify"), "{e}");
        assert!(e.contains("unknown_rel.x"), "{e}");
        let e = run(
            "INSERT INTO notes (body) SELECT id::text FROM notes",
            &m,
            &NoCatalog::default(),
        )
        .expect_err("nothing verified");
        assert!(e.contains("cannot verify"), "{e}");
        // A column rule must apply at all.
        assert_eq!(
            run(
                "INSERT INTO notes (body) SELECT x FROM unknown_rel",
                &[mask("d", &[])],
                &cat()
            ),
            Ok(())
        );
    }

    #[test]
    fn a_column_computed_from_itself_is_no_copy_even_unverified() {
        let m = [mask("pii", &["*.email"])];
        for sql in [
            "UPDATE unknown_rel SET n = n + 1",
            "INSERT INTO unknown_rel (id, n) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET n = excluded.n",
        ] {
            assert_eq!(run(sql, &m, &NoCatalog::default()), Ok(()), "{sql}");
        }
        // Another relation's column of that name is a source.
        assert!(
            run(
                "UPDATE unknown_rel SET n = n + 1 FROM other",
                &m,
                &NoCatalog::default()
            )
            .is_err()
        );
    }

    #[test]
    fn what_the_session_redefined_is_not_believed() {
        let m = [mask("pii", &["*.email"])];
        let copy = stored("INSERT INTO notes (body) SELECT name FROM users");
        assert_eq!(names(&copy), ["notes", "users"]);
        let users = Redefined::names(["users"]);
        let e = check(&m, &copy, &cat(), &users)
            .expect_err("users redefined")
            .to_string();
        assert!(e.contains("definitions changed"), "{e}");
        assert!(check(&m, &copy, &cat(), &Redefined::all()).is_err());
        // Another relation changed: the catalog still speaks for users.
        let orders = Redefined::names(["orders"]);
        assert_eq!(check(&m, &copy, &cat(), &orders), Ok(()));
        // A view whose definition reads a redefined relation is not believed either.
        let via_view = stored("INSERT INTO notes (body) SELECT contact FROM v");
        let e = check(&m, &via_view, &cat(), &users)
            .expect_err("view over users")
            .to_string();
        assert!(e.contains("definitions changed"), "{e}");
    }

    #[test]
    fn what_a_statement_may_redefine() {
        let by = |sql: &str| {
            let c = classify(sql, LexOptions::default());
            let mut r = Redefined::default();
            for s in &c.statements {
                r.add(Redefined::by(s));
            }
            r
        };
        let names = |n: &[&str]| Redefined::names(n.iter().copied());
        assert_eq!(
            by("CREATE OR REPLACE VIEW v AS SELECT 1 AS c"),
            names(&["v"])
        );
        assert_eq!(
            by("ALTER TABLE users RENAME COLUMN a TO b"),
            names(&["users"])
        );
        assert_eq!(
            by("CREATE TABLE t (x int); DROP VIEW w"),
            names(&["t", "w"])
        );
        assert_eq!(by("CREATE INDEX ON users (email)"), Redefined::default());
        assert_eq!(by("SELECT 1"), Redefined::default());
        assert_eq!(by("DO $$ BEGIN END $$"), Redefined::all());
        assert_eq!(by("CREATE EXTENSION hstore"), Redefined::all());
        assert_eq!(by("ALTER SCHEMA a RENAME TO b"), Redefined::all());
        assert!(!by("CREATE TABLE t (x int)").storage_changed());
        // What may change where rows written into a relation are stored: the relations
        // named, and storage.
        for (sql, named) in [
            (
                "CREATE FOREIGN TABLE far (id int, email text) SERVER elsewhere",
                &["far"][..],
            ),
            (
                "CREATE FOREIGN TABLE far PARTITION OF everyone FOR VALUES FROM (0) TO (9) SERVER s",
                &["far"],
            ),
            ("ALTER FOREIGN TABLE far RENAME TO archive", &["far"]),
            (
                "ALTER TABLE everyone ATTACH PARTITION far FOR VALUES FROM (0) TO (9)",
                &["everyone"],
            ),
            ("ALTER TABLE far INHERIT everyone", &["everyone", "far"]),
        ] {
            let r = by(sql);
            assert!(r.storage_changed(), "{sql}");
            for n in named {
                assert!(r.covers(n), "{sql}: {n}");
            }
            assert!(!r.covers("users"), "{sql}");
        }
        // A child taken from its parent changes what the parent holds, not where.
        let r = by("ALTER TABLE kid NO INHERIT everyone");
        assert_eq!(r, names(&["everyone", "kid"]));
    }

    #[test]
    fn where_rows_are_stored_is_not_believed_after_a_foreign_table_is_attached() {
        let m = [mask("pii", &["*.email"])];
        let copy = stored("INSERT INTO archive (email) SELECT email FROM users");
        assert_eq!(check(&m, &copy, &cat(), &Redefined::default()), Ok(()));
        // A table created in the open transaction is local: the copy into it may go.
        let created = Redefined::names(["archive"]);
        assert_eq!(check(&m, &copy, &cat(), &created), Ok(()));
        // After an ATTACH PARTITION, INHERIT or foreign table DDL in the transaction, the
        // catalog (which does not see it) is not believed about where archive's rows go;
        // what is not masked may still be copied.
        let mut attached_far = Redefined::default();
        attached_far.add(Redefined::by(
            &classify("ALTER TABLE spare INHERIT archive", LexOptions::default()).statements[0],
        ));
        let e = check(&m, &copy, &cat(), &attached_far)
            .expect_err("storage unknown")
            .to_string();
        assert!(
            e.contains("cannot verify in the catalog that archive.email stores its rows"),
            "{e}"
        );
        for sql in [
            "UPDATE archive SET email = lower(email)",
            "INSERT INTO archive (id) SELECT id FROM users",
        ] {
            assert_eq!(
                check(&m, &stored(sql), &cat(), &attached_far),
                Ok(()),
                "{sql}"
            );
        }
    }
}
