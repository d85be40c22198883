//! Loading policy files into a [`PolicySet`]: parse every file, validate every rule, report
//! every problem with its file, line and column, and warn about rules that can never
//! decide anything because an earlier one covers them, and about column masks whose
//! copies would go unchecked.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use toml::Spanned;

use super::{
    eval::PolicySet,
    file::{DangerEntry, PolicyFile, RuleEntry, UserFunctionsEntry},
    glob,
    model::{
        Action, DETECTORS, DangerMatch, IdentityMatch, MaskSpec, OidcMatch, Rule, SqlMatch,
        Strategy, Unresolved, UserFunctionsMatch, Verdict, kind_matches,
    },
    sql::{
        Danger, kind,
        kind::{Kind, Object},
    },
};
use crate::config::{Config, Diagnostic, Source};

/// The policies shipped with Portcullis (the repository's `policies/`), compiled in: used
/// when `[policy].dir` is not set.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "10-deny-destructive.toml",
        include_str!("../../../policies/10-deny-destructive.toml"),
    ),
    (
        "20-require-approval.toml",
        include_str!("../../../policies/20-require-approval.toml"),
    ),
    (
        "30-mask-pii.toml",
        include_str!("../../../policies/30-mask-pii.toml"),
    ),
];

/// Protocol names rules may use: the engines that exist and those planned, so that policy
/// files written ahead of an engine stay valid.
pub const PROTOCOLS: [&str; 7] = [
    "tcp",
    "postgres",
    "mysql",
    "kubernetes",
    "http",
    "redis",
    "ssh",
];

/// Problems found: errors reject the set; warnings (shadowed rules) do not.
#[derive(Debug, Default)]
pub struct Report {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// The files a configuration's policies come from: `(display path, text)`.
pub fn sources(cfg: &Config) -> Result<Vec<Source>, Diagnostic> {
    match &cfg.policy.dir {
        None => Ok(BUILTIN
            .iter()
            .map(|(name, text)| Source::new(format!("<builtin>/{name}"), *text))
            .collect()),
        Some(dir) => read_dir(dir),
    }
}

/// Every `*.toml` in `dir`, or `dir` itself when it is a file, in name order.
pub fn read_dir(dir: &Path) -> Result<Vec<Source>, Diagnostic> {
    let err = |message: String| Diagnostic {
        location: None,
        path: dir.to_owned(),
        message,
    };
    let paths: Vec<PathBuf> = if dir.is_file() {
        vec![dir.to_owned()]
    } else {
        let rd = std::fs::read_dir(dir).map_err(|e| {
            err(format!(
                "cannot read the policy directory: {e} (set [policy].dir, or remove it to use \
                 the shipped policies)"
            ))
        })?;
        let mut v: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        v.sort();
        v
    };
    paths
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(&p)
                .map(|text| Source::new(&p, text))
                .map_err(|e| Diagnostic {
                    location: None,
                    path: p.clone(),
                    message: format!("cannot read: {e}"),
                })
        })
        .collect()
}

/// Adds to `report` what is unsafe about the files of the policy directory `dir`
/// ([`crate::config::trust`]): files or directories someone but root may change are
/// errors (the daemon does not load them), files every user may read warnings.
pub fn check_files(dir: &Path, sources: &[Source], report: &mut Report) {
    let files: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
    for f in crate::config::trust::check_policies(dir, &files) {
        let d = Diagnostic {
            location: None,
            path: f.file().to_owned(),
            message: f.to_string(),
        };
        if f.is_error() {
            report.errors.push(d);
        } else {
            report.warnings.push(d);
        }
    }
}

struct Ctx<'a> {
    src: &'a Source,
    report: &'a mut Report,
    cfg: Option<&'a Config>,
}

impl Ctx<'_> {
    fn err_span(&mut self, span: std::ops::Range<usize>, msg: impl Into<String>) {
        self.report.errors.push(Diagnostic {
            location: (!span.is_empty()).then(|| self.src.locate(&span)),
            path: self.src.path.clone(),
            message: msg.into(),
        });
    }
    fn err<T>(&mut self, at: &Spanned<T>, msg: impl Into<String>) {
        self.err_span(at.span(), msg);
    }
}

/// Parses and validates policy files. `cfg` (when given) supplies the agent and target names
/// rules may refer to and the defaults.
pub fn load(sources: &[Source], cfg: &Config) -> (Option<PolicySet>, Report) {
    let mut report = Report::default();
    let mut rules: Vec<Rule> = Vec::new();
    let mut ids: HashMap<String, String> = HashMap::new();
    for src in sources {
        let file: PolicyFile = match toml::from_str(&src.text) {
            Ok(f) => f,
            Err(e) => {
                report.errors.push(Diagnostic {
                    location: e.span().map(|s| src.locate(&s)),
                    path: src.path.clone(),
                    message: e.message().trim().to_owned(),
                });
                continue;
            }
        };
        let mut ctx = Ctx {
            src,
            report: &mut report,
            cfg: Some(cfg),
        };
        for entry in &file.rules {
            let at = ctx.src.locate(&entry.span());
            let e = entry.get_ref();
            if let Some(first) = ids.insert(e.id.get_ref().clone(), at.to_string()) {
                ctx.err(
                    &e.id,
                    format!("rule `{}` is already defined at {first}", e.id.get_ref()),
                );
            }
            if let Some(rule) = compile(&mut ctx, e, at) {
                rules.push(rule);
            }
        }
    }
    shadowing(&rules, &mut report);
    unchecked_copies(&rules, &mut report);
    if !report.is_ok() {
        return (None, report);
    }
    let set = PolicySet {
        rules,
        default: cfg.policy.default,
        on_parse_error: cfg.policy.on_parse_error,
        approvers: cfg.policy.approvers.clone(),
        approval_timeout: cfg.policy.approval_timeout.get(),
        sources: sources.iter().map(|s| s.path.clone()).collect(),
    };
    (Some(set), report)
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `oidc = {...}`: extra claims must be ones an `[[oidc]]` issuer keeps, or the condition
/// could never hold.
fn compile_oidc(ctx: &mut Ctx<'_>, o: &Spanned<super::file::OidcEntry>) -> OidcMatch {
    let e = o.get_ref();
    if let Some(cfg) = ctx.cfg {
        for name in e.claims.keys() {
            if !cfg.oidc.iter().any(|i| i.claims.contains(name)) {
                ctx.err(
                    o,
                    format!(
                        "claim `{name}` is kept by no [[oidc]] issuer (add it to its `claims`)"
                    ),
                );
            }
        }
        if cfg.oidc.is_empty() {
            ctx.err(
                o,
                "an `oidc` condition needs an [[oidc]] issuer in the configuration",
            );
        }
    }
    OidcMatch {
        issuers: e.issuers.clone(),
        subs: e.subs.clone(),
        emails: e.emails.clone(),
        groups: e.groups.clone(),
        claims: e.claims.clone(),
    }
}

fn names(v: &[Spanned<String>]) -> Vec<String> {
    v.iter().map(|s| s.get_ref().clone()).collect()
}

fn compile(ctx: &mut Ctx<'_>, e: &RuleEntry, source: crate::config::Location) -> Option<Rule> {
    let errors_before = ctx.report.errors.len();
    let id = e.id.get_ref().clone();
    if !is_id(&id) {
        ctx.err(
            &e.id,
            format!("rule id `{id}`: use letters, digits, `-`, `_`, `.`"),
        );
    }
    // Who and where: literal names must exist, or the rule silently never applies.
    if let Some(cfg) = ctx.cfg {
        for a in &e.agents {
            let n = a.get_ref();
            if !glob::has_wildcards(n) && cfg.agent(n).is_none() {
                ctx.err(a, format!("no agent named `{n}` in the configuration"));
            }
        }
        for t in &e.targets {
            let n = t.get_ref();
            if !glob::has_wildcards(n) && cfg.target(n).is_none() {
                ctx.err(t, format!("no target named `{n}` in the configuration"));
            }
        }
    }
    for p in &e.protocols {
        if !PROTOCOLS.contains(&p.get_ref().as_str()) {
            ctx.err(
                p,
                format!(
                    "unknown protocol `{}`; one of {}",
                    p.get_ref(),
                    PROTOCOLS.join(", ")
                ),
            );
        }
    }
    let identity = e
        .identity
        .as_ref()
        .map(|i| IdentityMatch {
            users: i.users.clone(),
            uids: i.uids.clone(),
            units: i.units.clone(),
            exes: i.exes.clone(),
            cgroups: i.cgroups.clone(),
        })
        .unwrap_or_default();
    if let Some(g) = e.identity.as_ref().and_then(|i| i.groups.as_ref()) {
        ctx.err(
            g,
            "OIDC groups are matched with `oidc = { groups = [...] }` (not `identity.groups`)",
        );
    }
    let oidc = e
        .oidc
        .as_ref()
        .map(|o| compile_oidc(ctx, o))
        .unwrap_or_default();
    let sql = e.sql.as_ref().map(|s| compile_sql(ctx, s));
    let action = compile_action(ctx, e, &id);
    if ctx.report.errors.len() > errors_before {
        return None;
    }
    Some(Rule {
        id,
        description: e.description.clone(),
        source,
        agents: names(&e.agents),
        identity,
        oidc,
        targets: names(&e.targets),
        protocols: names(&e.protocols),
        sql,
        action: action?,
        redact_literals: e.redact_literals,
    })
}

fn compile_sql(ctx: &mut Ctx<'_>, s: &Spanned<crate::policy::file::SqlEntry>) -> SqlMatch {
    let e = s.get_ref();
    let all = kind::all_kind_names();
    for k in &e.kinds {
        let k_s = k.get_ref();
        let ok = match k_s.strip_prefix('@') {
            Some(g) => kind::Kind::GROUPS.contains(&g),
            None => all.iter().any(|n| glob::matches(k_s, n)),
        };
        if !ok {
            ctx.err(
                k,
                format!(
                    "`{k_s}` names no statement kind (kinds: select, insert, update, delete, \
                     drop_table, ...; groups: @{})",
                    kind::Kind::GROUPS.join(", @")
                ),
            );
        }
    }
    for t in e
        .tables
        .iter()
        .chain(&e.tables_read)
        .chain(&e.tables_written)
    {
        let parts = t.get_ref().split('.').count();
        if !(1..=2).contains(&parts) || t.get_ref().split('.').any(str::is_empty) {
            ctx.err(
                t,
                format!("`{}` is not `table` or `schema.table`", t.get_ref()),
            );
        }
    }
    let dangerous_functions = e.dangerous_functions.as_ref().map(|d| match d.get_ref() {
        DangerEntry::Flag(b) => DangerMatch::Any(*b),
        DangerEntry::Categories(list) => {
            let mut out = Vec::new();
            for c in list {
                match Danger::parse(c) {
                    Some(x) => out.push(x),
                    None => ctx.err(
                        d,
                        format!(
                            "unknown function category `{c}`; one of {}",
                            Danger::ALL.map(|d| d.as_str()).join(", ")
                        ),
                    ),
                }
            }
            DangerMatch::Categories(out)
        }
    });
    let m = SqlMatch {
        kinds: names(&e.kinds),
        tables: names(&e.tables),
        tables_read: names(&e.tables_read),
        tables_written: names(&e.tables_written),
        functions: e.functions.iter().map(|f| f.to_lowercase()).collect(),
        dangerous_functions,
        user_functions: e.user_functions.as_ref().map(|u| match u {
            UserFunctionsEntry::Flag(calls) => UserFunctionsMatch {
                calls: *calls,
                except: Vec::new(),
            },
            UserFunctionsEntry::Except(x) => UserFunctionsMatch {
                calls: true,
                except: x.except.iter().map(|f| f.to_lowercase()).collect(),
            },
        }),
        missing_where: e.missing_where,
        dynamic_sql: e.dynamic_sql,
    };
    if m == SqlMatch::default() {
        ctx.err(
            s,
            "an empty `sql` table matches everything; remove it or add a condition",
        );
    }
    m
}

fn compile_action(ctx: &mut Ctx<'_>, e: &RuleEntry, id: &str) -> Option<Action> {
    let name = e.action.get_ref().as_str();
    let only = |ctx: &mut Ctx<'_>,
                what: &str,
                present: Option<std::ops::Range<usize>>,
                allowed: &[&str]| {
        if let Some(span) = present
            && !allowed.contains(&name)
        {
            ctx.err_span(
                span,
                format!(
                    "`{what}` is for {} rules, not `{name}`",
                    allowed.join(" and ")
                ),
            );
        }
    };
    only(
        ctx,
        "message",
        e.message.as_ref().map(Spanned::span),
        &["deny", "require_approval"],
    );
    only(
        ctx,
        "approvers",
        e.approvers.as_ref().map(Spanned::span),
        &["require_approval"],
    );
    only(
        ctx,
        "timeout",
        e.timeout.as_ref().map(Spanned::span),
        &["require_approval"],
    );
    only(ctx, "mask", e.mask.as_ref().map(Spanned::span), &["mask"]);
    let message = e.message.as_ref().map(|m| m.get_ref().clone());
    match name {
        "allow" => Some(Action::Allow),
        "audit" => Some(Action::Audit),
        "deny" => Some(Action::Deny {
            message: message.unwrap_or_else(|| format!("denied by policy rule {id}")),
        }),
        "require_approval" => {
            let cfg = ctx.cfg;
            let approvers = e
                .approvers
                .as_ref()
                .map(|a| a.get_ref().clone())
                .or_else(|| cfg.map(|c| c.policy.approvers.clone()))
                .unwrap_or_default();
            if approvers.is_empty() {
                ctx.err(&e.action, "a require_approval rule needs approver groups (`approvers`, or [policy].approvers)");
            }
            Some(Action::RequireApproval {
                approvers,
                timeout: e
                    .timeout
                    .as_ref()
                    .map(|t| t.get_ref().get())
                    .or_else(|| cfg.map(|c| c.policy.approval_timeout.get()))
                    .unwrap_or(std::time::Duration::from_secs(900)),
                message: message
                    .unwrap_or_else(|| format!("held for approval by policy rule {id}")),
            })
        }
        "mask" => {
            let Some(m) = &e.mask else {
                ctx.err(
                    &e.action,
                    "a mask rule needs a `mask` table (columns and/or detectors)",
                );
                return None;
            };
            compile_mask(ctx, m, id).map(|spec| Action::Mask(Arc::new(spec)))
        }
        other => {
            ctx.err(
                &e.action,
                format!(
                    "unknown action `{other}`; one of allow, deny, require_approval, mask, audit"
                ),
            );
            None
        }
    }
}

fn compile_mask(
    ctx: &mut Ctx<'_>,
    m: &Spanned<crate::policy::file::MaskEntry>,
    id: &str,
) -> Option<MaskSpec> {
    let e = m.get_ref();
    if e.columns.is_empty() && e.detectors.is_empty() {
        ctx.err(m, "a mask needs `columns` and/or `detectors`");
    }
    for c in &e.columns {
        let n = c.get_ref().split('.').count();
        if !(2..=3).contains(&n) || c.get_ref().split('.').any(str::is_empty) {
            ctx.err(
                c,
                format!(
                    "`{}` is not `table.column` or `schema.table.column`",
                    c.get_ref()
                ),
            );
        }
    }
    for d in &e.detectors {
        if !DETECTORS.contains(&d.get_ref().as_str()) {
            ctx.err(
                d,
                format!(
                    "unknown detector `{}`; one of {}",
                    d.get_ref(),
                    DETECTORS.join(", ")
                ),
            );
        }
    }
    let strategy = match e.strategy.get_ref().as_str() {
        "redact" => Strategy::Redact {
            text: e.text.clone(),
        },
        "partial" => Strategy::Partial {
            keep: e.keep.unwrap_or(4),
        },
        "hash" => Strategy::Hash,
        "null" => Strategy::Null,
        other => {
            ctx.err(
                &e.strategy,
                format!("unknown strategy `{other}`; one of redact, partial, hash, null"),
            );
            return None;
        }
    };
    let unresolved = match e.unresolved.as_ref().map(|u| u.get_ref().as_str()) {
        None | Some("mask_all") => Unresolved::MaskAll,
        Some("deny") => Unresolved::Deny,
        Some(other) => {
            if let Some(u) = &e.unresolved {
                ctx.err(
                    u,
                    format!("`unresolved` is `mask_all` or `deny`, not `{other}`"),
                );
            }
            return None;
        }
    };
    Some(MaskSpec {
        rule: id.to_owned(),
        columns: e.columns.iter().map(|c| c.get_ref().clone()).collect(),
        detectors: e.detectors.iter().map(|d| d.get_ref().clone()).collect(),
        strategy,
        unresolved,
    })
}

/// Whether every pattern in `b` is covered by one in `a` (`a` empty = any).
fn list_covers(a: &[String], b: &[String]) -> bool {
    a.is_empty() || (!b.is_empty() && b.iter().all(|p| a.iter().any(|q| glob::covers(q, p))))
}

fn opt_covers<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
    a.is_none() || a == b
}

/// The kinds a list of kind patterns (names, globs, groups) matches; `None` = any kind.
/// `@dynamic` depends on the statement, not the kind, so it expands to nothing certain.
fn kind_set(patterns: &[String]) -> Option<std::collections::BTreeSet<kind::Kind>> {
    if patterns.is_empty() {
        return None;
    }
    Some(
        kind::all_kinds()
            .into_iter()
            .filter(|k| {
                patterns
                    .iter()
                    .any(|p| p != "@dynamic" && crate::policy::model::kind_matches(p, *k, false))
            })
            .collect(),
    )
}

fn kinds_cover(a: &[String], b: &[String]) -> bool {
    match (kind_set(a), kind_set(b)) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => !b.is_empty() && b.is_subset(&a),
    }
}

/// Whether `a` matches everything `b` matches (conservative: may say no when it does).
fn rule_covers(a: &Rule, b: &Rule) -> bool {
    if !(list_covers(&a.agents, &b.agents)
        && list_covers(&a.targets, &b.targets)
        && list_covers(&a.protocols, &b.protocols)
        && (a.identity.is_empty() || a.identity == b.identity)
        && (a.oidc.is_empty() || a.oidc == b.oidc))
    {
        return false;
    }
    match (&a.sql, &b.sql) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(x), Some(y)) => {
            kinds_cover(&x.kinds, &y.kinds)
                && !y.kinds.iter().any(|k| k == "@dynamic")
                && list_covers(&x.tables, &y.tables)
                && list_covers(&x.tables_read, &y.tables_read)
                && list_covers(&x.tables_written, &y.tables_written)
                && list_covers(&x.functions, &y.functions)
                && opt_covers(&x.dangerous_functions, &y.dangerous_functions)
                && opt_covers(&x.user_functions, &y.user_functions)
                && opt_covers(&x.missing_where, &y.missing_where)
                && opt_covers(&x.dynamic_sql, &y.dynamic_sql)
        }
    }
}

/// A later rule never decides when an earlier one matches all it matches and is at least as
/// restrictive (ties go to the earlier rule). Mask and audit rules add to decisions rather
/// than decide them, so only a covering `deny` shadows those.
fn shadowing(rules: &[Rule], report: &mut Report) {
    for (j, b) in rules.iter().enumerate() {
        for a in &rules[..j] {
            let (Some(va), vb) = (a.action.verdict(), b.action.verdict()) else {
                continue;
            };
            let shadows = match (&b.action, vb) {
                (Action::Mask(_) | Action::Audit, _) => va == Verdict::Deny,
                (_, Some(vb)) => va >= vb,
                (_, None) => false,
            };
            if shadows && rule_covers(a, b) {
                report.warnings.push(Diagnostic {
                    location: Some(b.source.clone()),
                    path: b.source.path.clone(),
                    message: format!(
                        "rule `{}` never decides anything: `{}` ({}) matches everything it \
                         matches and is at least as restrictive",
                        b.id, a.id, a.source
                    ),
                });
                break;
            }
        }
    }
}

/// The statements through which a masked column's values can be copied where its mask
/// does not follow them (the copy check's: `masking/copies.rs`).
const STORING: [Kind; 9] = [
    Kind::Insert,
    Kind::Update,
    Kind::Delete,
    Kind::Merge,
    Kind::Create(Object::Table),
    Kind::Create(Object::MaterializedView),
    Kind::Alter(Object::Table),
    Kind::Alter(Object::MaterializedView),
    Kind::Alter(Object::ForeignTable),
];

/// A column mask applies to the statements its rule's kinds match, and so does the copy
/// check that keeps its columns from being copied where no mask covers them: a rule that
/// lists only reads lets `INSERT INTO notes SELECT email FROM users` (and `setval` or an
/// advisory lock kept from a masked column in a `DELETE`) through unchecked.
fn unchecked_copies(rules: &[Rule], report: &mut Report) {
    for r in rules {
        let (Action::Mask(m), Some(sql)) = (&r.action, &r.sql) else {
            continue;
        };
        if m.columns.is_empty() || sql.kinds.is_empty() {
            continue;
        }
        let missing: Vec<String> = STORING
            .iter()
            .filter(|k| !sql.kinds.iter().any(|p| kind_matches(p, **k, false)))
            .map(|k| k.name())
            .collect();
        if !missing.is_empty() {
            report.warnings.push(Diagnostic {
                location: Some(r.source.clone()),
                path: r.source.path.clone(),
                message: format!(
                    "rule `{}` masks columns but its kinds leave out {}: values of the masked \
                     columns copied by those statements into places no mask covers are not \
                     refused (list them, or leave `kinds` out, to have copies checked)",
                    r.id,
                    missing.join(", ")
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Source,
        policy::{PolicyStore, model::Subject, sql::LexOptions},
    };

    /// One agent (`claude`) and one target (`shop`), after `before` (more sections).
    fn cfg_with(before: &str) -> Config {
        Config::parse(&Source::new(
            "c.toml",
            format!(
                r#"{before}
[[agent]]
name = "claude"
match = {{ uid = 1001 }}
[[target]]
name = "shop"
protocol = "tcp"
address = "127.0.0.1:5432"
"#
            ),
        ))
        .expect("config")
    }

    fn cfg() -> Config {
        cfg_with("")
    }

    fn check(files: &[(&str, &str)]) -> (Option<PolicySet>, Report) {
        let sources: Vec<Source> = files.iter().map(|(p, t)| Source::new(*p, *t)).collect();
        load(&sources, &cfg())
    }

    fn messages(r: &[Diagnostic]) -> Vec<String> {
        r.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn unknown_fields_point_at_file_line_and_column() {
        let (set, r) = check(&[(
            "p.toml",
            "[[rule]]\nid = \"a\"\naction = \"deny\"\nsql = { kinds = [\"select\"], colour = 1 }\n",
        )]);
        assert!(set.is_none());
        let m = messages(&r.errors);
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].starts_with("p.toml:4:"), "{m:?}");
        assert!(m[0].contains("colour"), "{m:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_place() {
        let (set, r) = check(&[
            (
                "a.toml",
                r#"
[[rule]]
id = "r1"
agents = ["nobody-here", "claude*"]
targets = ["nowhere"]
protocols = ["gopher"]
sql = { kinds = ["drop_tabel", "@nonsense", "drop_*"], tables = ["a.b.c"], dangerous_functions = ["file", "magic"] }
action = "deny"
approvers = ["x"]

[[rule]]
id = "r2"
action = "mask"

[[rule]]
id = "r3"
action = "mask"
mask = { columns = ["justone"], detectors = ["emial"], strategy = "shred" }
"#,
            ),
            (
                "b.toml",
                "[[rule]]\nid = \"r1\"\naction = \"allow\"\n\n[[rule]]\nid = \"bad id!\"\naction = \"frobnicate\"\n",
            ),
        ]);
        assert!(set.is_none());
        let all = messages(&r.errors).join("\n");
        for needle in [
            "a.toml:4:11: no agent named `nobody-here`",
            "a.toml:5:12: no target named `nowhere`",
            "a.toml:6:14: unknown protocol `gopher`",
            "a.toml:7:18: `drop_tabel` names no statement kind",
            "a.toml:7:32: `@nonsense` names no statement kind",
            "a.toml:7:66: `a.b.c` is not `table` or `schema.table`",
            "unknown function category `magic`",
            "a.toml:9:13: `approvers` is for require_approval rules, not `deny`",
            "a.toml:13:10: a mask rule needs a `mask` table",
            "a.toml:18:21: `justone` is not `table.column`",
            "a.toml:18:46: unknown detector `emial`",
            "a.toml:18:67: unknown strategy `shred`",
            "b.toml:2:6: rule `r1` is already defined at a.toml:2:1",
            "b.toml:6:6: rule id `bad id!`",
            "b.toml:7:10: unknown action `frobnicate`",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
    }

    #[test]
    fn shadowed_rules_are_warned_about() {
        let (set, r) = check(&[(
            "p.toml",
            r#"
[[rule]]
id = "deny-ddl"
sql = { kinds = ["@ddl"] }
action = "deny"

[[rule]]
id = "deny-drop-table"
sql = { kinds = ["drop_table"] }
action = "deny"
message = "never reached"

[[rule]]
id = "allow-claude"
agents = ["claude"]
sql = { kinds = ["drop_*"] }
action = "allow"

[[rule]]
id = "approve-deletes"
sql = { kinds = ["delete"], missing_where = true }
action = "require_approval"

[[rule]]
id = "deny-deletes"
sql = { kinds = ["delete"] }
action = "deny"
"#,
        )]);
        assert!(r.is_ok(), "{:?}", r.errors);
        assert!(set.is_some());
        let w = messages(&r.warnings);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("`deny-drop-table` never decides") && w[0].contains("`deny-ddl`"),
            "{w:?}"
        );
        assert!(w[1].contains("`allow-claude`"), "{w:?}");
        // deny-deletes is broader than approve-deletes and more restrictive: not shadowed.
        assert!(!w.iter().any(|x| x.contains("`deny-deletes`")));
    }

    #[test]
    fn column_masks_that_leave_out_writes_are_warned_about() {
        let (_, r) = check(&[(
            "p.toml",
            r#"
[[rule]]
id = "mask-reads"
sql = { kinds = ["select", "copy_to"] }
action = "mask"
mask = { columns = ["*.email"] }

[[rule]]
id = "mask-reads-and-writes"
sql = { kinds = ["select", "@dml", "create_table", "create_materialized_view", "alter_*"] }
action = "mask"
mask = { columns = ["*.ssn"] }

[[rule]]
id = "mask-everywhere"
action = "mask"
mask = { columns = ["*.phone"] }

[[rule]]
id = "mask-values"
sql = { kinds = ["select"] }
action = "mask"
mask = { detectors = ["email"] }
"#,
        )]);
        assert!(r.is_ok(), "{:?}", r.errors);
        let w = messages(&r.warnings);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains(
                "rule `mask-reads` masks columns but its kinds leave out insert, \
                 update, delete, merge, create_table, create_materialized_view, alter_table, \
                 alter_materialized_view, alter_foreign_table"
            ),
            "{w:?}"
        );
    }

    #[test]
    fn user_functions_match_unless_excepted() {
        let (set, r) = check(&[(
            "p.toml",
            r#"
[[rule]]
id = "hold-user-functions"
sql = { user_functions = { except = ["uuid_generate_v4", "app.safe_*"] } }
action = "require_approval"
"#,
        )]);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let set = set.expect("set");
        let subject = Subject {
            agent: "claude".into(),
            uid: 1001,
            ..Default::default()
        };
        let verdict = |sql: &str| {
            crate::policy::store::judge(&set, &subject, "shop", "tcp", sql, LexOptions::default())
                .decision
                .verdict
        };
        use crate::policy::Verdict::{Allow, RequireApproval};
        for (sql, want) in [
            ("SELECT lower('A'), now()", Allow),
            ("SELECT uuid_generate_v4()", Allow),
            ("SELECT app.safe_total(1)", Allow),
            ("SELECT app.total(1)", RequireApproval),
            ("SELECT uuid_generate_v4(), purge()", RequireApproval),
            ("CALL refresh_stats()", RequireApproval),
        ] {
            assert_eq!(verdict(sql), want, "{sql}");
        }
        let (_, r) = check(&[(
            "p.toml",
            "[[rule]]\nid = \"x\"\naction = \"deny\"\nsql = { user_functions = { exempt = [] } }\n",
        )]);
        assert!(!r.errors.is_empty(), "a misspelt key is an error");
    }

    #[test]
    fn the_shipped_policies_are_clean() {
        let (set, r) = load(
            &sources(&Config::embedded().expect("default")).expect("builtin"),
            &Config::embedded().expect("default"),
        );
        assert!(
            r.errors.is_empty() && r.warnings.is_empty(),
            "{:?} {:?}",
            r.errors,
            r.warnings
        );
        assert!(set.expect("set").rules.len() >= 9);
        // The repository's policies/ directory is what is compiled in.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let on_disk = read_dir(&dir).expect("policies dir");
        assert_eq!(on_disk.len(), BUILTIN.len());
        for (s, (name, text)) in on_disk.iter().zip(BUILTIN) {
            assert!(s.path.ends_with(name));
            assert_eq!(s.text, *text);
        }
    }

    #[test]
    fn a_shape_decision_follows_reloads_and_callers() {
        use crate::policy::Verdict::{Allow, Deny};
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("p.toml");
        let rule = |table: &str| {
            format!(
                "[[rule]]\nid = \"d\"\nagents = [\"claude\"]\n\
                 sql = {{ kinds = [\"select\"], tables = [\"{table}\"] }}\naction = \"deny\"\n"
            )
        };
        std::fs::write(&file, rule("secrets")).expect("write");
        let mut c = cfg();
        c.policy.dir = Some(dir.path().to_owned());
        let store = PolicyStore::open(&c).expect("loads");
        let who = |agent: &str| Subject {
            agent: agent.into(),
            ..Default::default()
        };
        let (claude, other) = (who("claude"), who("other"));
        let verdict = |s: &Subject, id: u32| {
            let sql = format!("SELECT v FROM accounts WHERE id = {id}");
            let j = store.judge_sql(
                store.class_of(s, "shop", "postgres"),
                s,
                "shop",
                "postgres",
                &sql,
                LexOptions::default(),
            );
            let fresh = crate::policy::store::judge(
                &store.current(),
                s,
                "shop",
                "postgres",
                &sql,
                LexOptions::default(),
            );
            assert_eq!(j.classification, fresh.classification, "{sql}");
            assert_eq!(j.decision, fresh.decision, "{sql} for {}", s.agent);
            j.decision.verdict
        };
        for id in 1..6 {
            assert_eq!(verdict(&claude, id), Allow);
        }
        assert_eq!(
            store.cached_shape_decisions(),
            1,
            "one shape, one caller: one decision kept by shape"
        );
        std::fs::write(&file, rule("accounts")).expect("write");
        store.reload(&c).expect("reloads");
        // The same shape: decided again under the new policies, per caller.
        for id in 6..12 {
            assert_eq!(verdict(&claude, id), Deny);
            assert_eq!(verdict(&other, id), Allow);
        }
    }

    #[test]
    fn a_broken_reload_keeps_the_previous_policies() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            "[[rule]]\nid = \"d\"\nsql = { kinds = [\"select\"] }\naction = \"deny\"\n",
        )
        .expect("write");
        let mut c = cfg();
        c.policy.dir = Some(dir.path().to_owned());
        let store = PolicyStore::open(&c).expect("loads");
        let subject = Subject {
            agent: "claude".into(),
            ..Default::default()
        };
        let class = store.class_of(&subject, "shop", "tcp");
        let judge = |s: &PolicyStore| {
            s.judge_sql(
                class,
                &subject,
                "shop",
                "tcp",
                "SELECT 1",
                LexOptions::default(),
            )
            .decision
            .verdict
        };
        assert_eq!(judge(&store), crate::policy::Verdict::Deny);
        let g = store.generation();

        std::fs::write(&file, "[[rule]]\nid = \"d\"\nsql = { kinds = [\"select\"] }\naction = \"deny\"\nbogus = true\n").expect("write");
        let err = store.reload(&c).expect_err("broken file");
        assert!(err.to_string().contains("p.toml:5:1"), "{err}");
        assert_eq!(store.generation(), g, "nothing swapped");
        assert_eq!(
            judge(&store),
            crate::policy::Verdict::Deny,
            "previous policy in force"
        );
        assert_eq!(
            store
                .stats
                .failed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        std::fs::write(
            &file,
            "[[rule]]\nid = \"a\"\nsql = { kinds = [\"select\"] }\naction = \"allow\"\n",
        )
        .expect("write");
        store.reload(&c).expect("good file");
        assert_eq!(store.generation(), g + 1);
        assert_eq!(
            judge(&store),
            crate::policy::Verdict::Allow,
            "the cache does not outlive the policy"
        );
        assert_eq!(store.stats.ok.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn missing_policy_directory_is_a_hard_error() {
        let mut c = cfg();
        c.policy.dir = Some("/nonexistent/policies".into());
        let err = PolicyStore::open(&c).err().expect("must fail");
        assert!(
            err.to_string().contains("cannot read the policy directory"),
            "{err}"
        );
    }

    #[test]
    fn oidc_conditions_match_verified_claims_only() {
        let cfg = cfg_with(
            "[[oidc]]\nissuer = \"https://idp.example\"\naudience = \"portcullis\"\nclaims = [\"tenant\"]",
        );
        let (set, r) = load(
            &[Source::new(
                "p.toml",
                r#"
[[rule]]
id = "readers"
oidc = { groups = ["data-*"], claims = { tenant = ["acme"] } }
action = "deny"
message = "readers of acme"

[[rule]]
id = "by-sub"
oidc = { sub = ["svc-*"], emails = ["*@example.com"] }
action = "require_approval"
approvers = ["dba"]
"#,
            )],
            &cfg,
        );
        let set = set.unwrap_or_else(|| panic!("{:?}", messages(&r.errors)));
        let who = |groups: &[&str], tenant: &str, sub: &str| Subject {
            agent: "claude".into(),
            uid: 1001,
            oidc: Some(std::sync::Arc::new(crate::oidc::OidcIdentity {
                issuer: "https://idp.example".into(),
                sub: sub.into(),
                email: Some(format!("{sub}@example.com")),
                groups: groups.iter().map(|g| (*g).to_owned()).collect(),
                claims: [("tenant".to_owned(), vec![tenant.to_owned()])].into(),
                expires_at: 0,
                issued_at: 0,
            })),
            ..Subject::default()
        };
        let rule = |s: &Subject| {
            crate::policy::store::judge(&set, s, "shop", "tcp", "SELECT 1", LexOptions::default())
                .decision
                .rule
                .clone()
        };
        assert_eq!(rule(&who(&["data-readers"], "acme", "alice")), "readers");
        assert_eq!(rule(&who(&["data-readers"], "other", "alice")), "default");
        assert_eq!(rule(&who(&["marketing"], "acme", "alice")), "default");
        assert_eq!(rule(&who(&[], "x", "svc-report")), "by-sub");
        // No token: no oidc condition can hold.
        let anonymous = Subject {
            agent: "claude".into(),
            uid: 1001,
            ..Subject::default()
        };
        assert_eq!(rule(&anonymous), "default");

        // Claims no issuer keeps, and the old place of groups, are errors.
        let (set, r) = load(
            &[Source::new(
                "q.toml",
                "[[rule]]\nid = \"a\"\noidc = { claims = { team = [\"x\"] } }\naction = \"deny\"\n\n\
                 [[rule]]\nid = \"b\"\nidentity = { groups = [\"x\"] }\naction = \"deny\"\n",
            )],
            &cfg,
        );
        assert!(set.is_none());
        let m = messages(&r.errors).join("\n");
        assert!(
            m.contains("claim `team` is kept by no [[oidc]] issuer"),
            "{m}"
        );
        assert!(m.contains("oidc = { groups"), "{m}");
        // Without any issuer, an oidc condition could never hold.
        let (set, r) = check(&[(
            "r.toml",
            "[[rule]]\nid = \"a\"\noidc = { groups = [\"x\"] }\naction = \"deny\"\n",
        )]);
        assert!(set.is_none());
        assert!(
            messages(&r.errors)[0].contains("needs an [[oidc]] issuer"),
            "{:?}",
            r.errors
        );
    }
}
