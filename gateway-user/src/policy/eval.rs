//! Evaluation: a pure function of (policy set, request) → decision, no I/O.
//!
//! Every rule that applies to the request (who, where) and matches a statement (what)
//! contributes its action; the most restrictive verdict wins (deny > require_approval >
//! mask > allow), ties go to the earlier rule, and the decision names the rule. A statement
//! no rule decides gets the configured default. A message with several statements is
//! judged as a whole: its verdict is the most restrictive of its statements'. SQL that
//! cannot be classified gets `on_parse_error` (never less restrictive than what its
//! classified statements got).

use std::{path::PathBuf, sync::Arc, time::Duration};

use super::{
    glob,
    model::{
        Action, DEFAULT_RULE, DangerMatch, Decision, IdentityMatch, MaskSpec, OidcMatch, Operation,
        PARSE_ERROR_RULE, Request, Rule, SqlMatch, Subject, Verdict, kind_matches,
    },
    sql::StatementClass,
};

/// A loaded, validated set of rules with its defaults.
#[derive(Clone, Debug)]
pub struct PolicySet {
    pub rules: Vec<Rule>,
    pub default: Verdict,
    pub on_parse_error: Verdict,
    pub approvers: Vec<String>,
    pub approval_timeout: Duration,
    /// Files the rules came from, for status and explain.
    pub sources: Vec<PathBuf>,
}

fn any_glob(patterns: &[String], value: &str) -> bool {
    any_glob_opt(patterns, Some(value))
}

fn identity_matches(m: &IdentityMatch, s: &Subject) -> bool {
    any_glob_opt(&m.users, s.user.as_deref())
        && (m.uids.is_empty() || m.uids.contains(&s.uid))
        && any_glob_opt(&m.units, s.unit.as_deref())
        && any_glob_opt(&m.exes, s.exe.as_deref())
        && any_glob_opt(&m.cgroups, s.cgroup.as_deref())
}

/// Any pattern matches any value (an empty pattern list holds).
fn any_of(patterns: &[String], values: &[String]) -> bool {
    patterns.is_empty()
        || patterns
            .iter()
            .any(|p| values.iter().any(|v| glob::matches(p, v)))
}

fn oidc_matches(m: &OidcMatch, s: &Subject) -> bool {
    if m.is_empty() {
        return true;
    }
    let Some(id) = &s.oidc else {
        return false;
    };
    any_glob_opt(&m.issuers, Some(&id.issuer))
        && any_glob_opt(&m.subs, Some(&id.sub))
        && any_glob_opt(&m.emails, id.email.as_deref())
        && any_of(&m.groups, &id.groups)
        && m.claims.iter().all(|(name, patterns)| {
            id.claims
                .get(name)
                .is_some_and(|values| any_of(patterns, values))
        })
}

/// Any pattern matches the value; no patterns always holds, no value never does.
fn any_glob_opt(patterns: &[String], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| glob::matches(p, v)))
}

/// Who and where.
fn applies(rule: &Rule, req: &Request<'_>) -> bool {
    any_glob(&rule.agents, &req.subject.agent)
        && any_glob(&rule.targets, req.target)
        && (rule.protocols.is_empty() || rule.protocols.iter().any(|p| p == req.protocol))
        && identity_matches(&rule.identity, req.subject)
        && oidc_matches(&rule.oidc, req.subject)
}

/// What, for one SQL statement.
pub fn sql_matches(m: &SqlMatch, s: &StatementClass) -> bool {
    let tables_any =
        |patterns: &[String], tables: &mut dyn Iterator<Item = &super::sql::TableName>| {
            let v: Vec<_> = tables.collect();
            patterns.is_empty()
                || patterns
                    .iter()
                    .any(|p| v.iter().any(|t| t.matches_pattern(p)))
        };
    (m.kinds.is_empty()
        || m.kinds
            .iter()
            .any(|p| s.kinds.iter().any(|k| kind_matches(p, *k, s.dynamic_sql))))
        && tables_any(
            &m.tables,
            &mut s.tables_read.iter().chain(&s.tables_written),
        )
        && tables_any(&m.tables_read, &mut s.tables_read.iter())
        && tables_any(&m.tables_written, &mut s.tables_written.iter())
        && (m.functions.is_empty()
            || m.functions
                .iter()
                .any(|p| s.functions.iter().any(|f| glob::matches(p, f))))
        && match &m.dangerous_functions {
            None => true,
            Some(DangerMatch::Any(want)) => s.dangerous.is_empty() != *want,
            Some(DangerMatch::Categories(cats)) => {
                s.dangerous.iter().any(|(_, d)| cats.contains(d))
            }
        }
        && m.user_functions.as_ref().is_none_or(|u| {
            let calls = s.user_functions.iter().any(|f| {
                let name = f.rsplit('.').next().unwrap_or(f);
                !u.except
                    .iter()
                    .any(|p| glob::matches(p, f) || glob::matches(p, name))
            });
            calls == u.calls
        })
        && m.missing_where.is_none_or(|w| w == s.missing_where)
        && m.dynamic_sql.is_none_or(|d| d == s.dynamic_sql)
}

/// The deciding candidate so far: verdict and the rule (index) or a pseudo-rule.
#[derive(Clone, Copy)]
enum Decider {
    Rule(usize),
    Default,
    ParseError,
    Empty,
}

pub fn evaluate(set: &PolicySet, req: &Request<'_>) -> Decision {
    let applicable: Vec<usize> = set
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| applies(r, req))
        .map(|(i, _)| i)
        .collect();
    let mut best: Option<(Verdict, Decider)> = None;
    let mut matched: Vec<usize> = Vec::new();
    let mut masks: Vec<Arc<MaskSpec>> = Vec::new();
    let mut audit: Vec<String> = Vec::new();
    let consider = |v: Verdict, d: Decider, best: &mut Option<(Verdict, Decider)>| {
        // Strictly more restrictive replaces: ties keep the earlier decider.
        if best.is_none_or(|(bv, _)| v > bv) {
            *best = Some((v, d));
        }
    };
    let Operation::Sql(c) = req.operation;
    for stmt in &c.statements {
        let mut stmt_best: Option<(Verdict, Decider)> = None;
        for &i in &applicable {
            let rule = &set.rules[i];
            if !rule.sql.as_ref().is_none_or(|m| sql_matches(m, stmt)) {
                continue;
            }
            if !matched.contains(&i) {
                matched.push(i);
            }
            match &rule.action {
                Action::Audit => {
                    if !audit.contains(&rule.id) {
                        audit.push(rule.id.clone());
                    }
                }
                action => {
                    if let Action::Mask(m) = action
                        && !masks.iter().any(|x| Arc::ptr_eq(x, m))
                    {
                        masks.push(m.clone());
                    }
                    if let Some(v) = action.verdict() {
                        consider(v, Decider::Rule(i), &mut stmt_best);
                    }
                }
            }
        }
        let (v, d) = stmt_best.unwrap_or((set.default, Decider::Default));
        consider(v, d, &mut best);
    }
    if c.error.is_some() {
        consider(set.on_parse_error, Decider::ParseError, &mut best);
    }
    let (verdict, decider) = best.unwrap_or((Verdict::Allow, Decider::Empty));
    let matched_ids: Vec<String> = matched.iter().map(|&i| set.rules[i].id.clone()).collect();
    let mut d = Decision {
        verdict,
        rule: String::new(),
        message: None,
        approvers: Vec::new(),
        approval_timeout_secs: None,
        masks: if verdict == Verdict::Deny {
            Vec::new()
        } else {
            masks
        },
        audit,
        redact_literals: matched.iter().any(|&i| set.rules[i].redact_literals),
        matched: matched_ids,
    };
    let approval = |d: &mut Decision, approvers: &[String], timeout: Duration| {
        d.approvers = approvers.to_vec();
        d.approval_timeout_secs = Some(timeout.as_secs());
    };
    match decider {
        Decider::Rule(i) => {
            let r = &set.rules[i];
            d.rule = r.id.clone();
            match &r.action {
                Action::Deny { message } => d.message = Some(message.clone()),
                Action::RequireApproval {
                    approvers,
                    timeout,
                    message,
                } => {
                    d.message = Some(message.clone());
                    approval(&mut d, approvers, *timeout);
                }
                _ => {}
            }
        }
        Decider::Default => {
            d.rule = DEFAULT_RULE.to_owned();
            match verdict {
                Verdict::Deny => {
                    d.message = Some("no policy rule allows this (the default is deny)".into());
                }
                Verdict::RequireApproval => {
                    d.message = Some(
                        "no policy rule decides this; the default holds it for approval".into(),
                    );
                    approval(&mut d, &set.approvers, set.approval_timeout);
                }
                _ => {}
            }
        }
        Decider::ParseError => {
            d.rule = PARSE_ERROR_RULE.to_owned();
            let why = c
                .error
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            d.message = Some(format!(
                "{why}; SQL that cannot be classified does not pass unreviewed"
            ));
            if verdict == Verdict::RequireApproval {
                approval(&mut d, &set.approvers, set.approval_timeout);
            }
        }
        Decider::Empty => d.rule = "empty".to_owned(),
    }
    d
}
