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
//! treated as masked. Where a value goes is what the text says; a place it does not name
//! (`INSERT INTO t SELECT ...` without a column list, positions after a `*`) is covered by
//! nothing.
//!
//! Without a catalog ([`super::plan::NoCatalog`]) nothing is confirmed, so every copy of
//! a column into a place no mask covers is refused, as every read of a table column is
//! masked or refused then (it might be a view).
//!
//! Pure: the catalog is reached through [`Resolve`], filled before checking.

use std::sync::Arc;

use super::plan::{Refusal, Resolve, pattern_matches};
use crate::policy::{
    glob,
    model::MaskSpec,
    sql::{
        TableName,
        lineage::{ColumnRef, Dest, Stored},
    },
};

/// Refuses the first stored value that copies a masked column where no mask covers it.
/// `trusted`: whether the catalog may be believed (not while the session has changed
/// definitions it cannot see yet); when not, every source counts as unverified.
pub fn check(
    masks: &[Arc<MaskSpec>],
    stored: &[Stored],
    resolve: &dyn Resolve,
    trusted: bool,
) -> Result<(), Refusal> {
    let patterns: Vec<(&str, &str)> = masks
        .iter()
        .flat_map(|m| m.columns.iter().map(|p| (m.rule.as_str(), p.as_str())))
        .collect();
    if patterns.is_empty() {
        return Ok(());
    }
    for s in stored {
        if !s.deps.opaque && s.deps.columns.iter().all(|r| is_own_place(s, r)) {
            continue;
        }
        let sources = if trusted {
            sources(s, resolve)
        } else {
            Sources::Unverified(unverified_name(s))
        };
        for &(rule, pattern) in &patterns {
            let source = match &sources {
                Sources::Known(refs) => match refs.iter().find(|r| pattern_matches(pattern, r)) {
                    Some(r) => Source::Masked(shown(r)),
                    None => continue,
                },
                Sources::Unverified(name) => Source::Unverified(name.clone()),
            };
            if covered(s, pattern, &patterns, resolve, trusted) {
                continue;
            }
            let dest = dest_shown(s);
            return Err(match source {
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

/// The names a check needs from the catalog: every relation the stored values read.
pub fn names(stored: &[Stored]) -> Vec<String> {
    let mut out: Vec<String> = stored
        .iter()
        .flat_map(|s| s.deps.columns.iter().map(|c| c.table.name.clone()))
        .collect();
    out.sort();
    out.dedup();
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

fn sources(s: &Stored, resolve: &dyn Resolve) -> Sources {
    if s.deps.opaque {
        return Sources::Unverified("a value that cannot be traced".into());
    }
    let mut out = Vec::new();
    for r in s.deps.columns.iter().filter(|r| !is_own_place(s, r)) {
        let Some(expanded) = resolve.expand(r) else {
            return Sources::Unverified(shown(r));
        };
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

/// Whether `r` is the very column the value is written to (`SET n = n + 1`, `SET x =
/// excluded.x`): what masks it there masks it still, so it is no copy.
fn is_own_place(s: &Stored, r: &ColumnRef) -> bool {
    matches!(&s.dest, Dest::Column(c) if r.table == s.table && r.column.as_ref() == Some(c))
}

fn unverified_name(s: &Stored) -> String {
    let mut others = s.deps.columns.iter().filter(|r| !is_own_place(s, r));
    others.next().map_or_else(
        || "a value that cannot be traced".into(),
        |r| {
            format!(
                "{} (definitions changed in this session's transaction)",
                shown(r)
            )
        },
    )
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
    trusted: bool,
) -> bool {
    let column = match &s.dest {
        Dest::Column(c) => c,
        Dest::SameNames => return covers(matched, &s.table, None),
        Dest::Unknown => return false,
    };
    let any = |t: &TableName| patterns.iter().any(|(_, p)| covers(p, t, Some(column)));
    if any(&s.table) {
        return true;
    }
    if !trusted {
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
    let p: Vec<&str> = pattern.split('.').collect();
    let (schema, t, c) = match p.as_slice() {
        [t, c] => (None, *t, *c),
        [s, t, c] => (Some(*s), *t, *c),
        _ => return false,
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
        Dest::Unknown => format!("{t} in columns the statement does not name"),
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

    fn run(sql: &str, masks: &[Arc<MaskSpec>], resolve: &dyn Resolve) -> Result<(), String> {
        let c = classify(sql, LexOptions::default());
        assert!(c.error.is_none(), "{sql}: {:?}", c.error);
        let stored: Vec<Stored> = c.statements.into_iter().flat_map(|s| s.stored).collect();
        check(masks, &stored, resolve, true).map_err(|e| e.to_string())
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
            // Without a column list the place is not known.
            "INSERT INTO archive SELECT id, email FROM users",
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
            &NoCatalog,
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
            assert_eq!(run(sql, &m, &NoCatalog), Ok(()), "{sql}");
        }
        // Another relation's column of that name is a source.
        assert!(
            run(
                "UPDATE unknown_rel SET n = n + 1 FROM other",
                &m,
                &NoCatalog
            )
            .is_err()
        );
    }

    #[test]
    fn an_untrusted_catalog_refuses_every_copy_of_a_column() {
        let m = [mask("pii", &["*.email"])];
        let c = classify(
            "INSERT INTO notes (body) SELECT name FROM users",
            LexOptions::default(),
        );
        let stored: Vec<Stored> = c.statements.into_iter().flat_map(|s| s.stored).collect();
        let e = check(&m, &stored, &cat(), false)
            .expect_err("untrusted")
            .to_string();
        assert!(e.contains("definitions changed"), "{e}");
        assert_eq!(names(&stored), ["users"]);
    }
}
