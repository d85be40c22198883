//! The policy model: compiled rules, requests and decisions. Protocol-agnostic: a request is
//! a protocol-specific action (a classified SQL message today; a Kubernetes verb/resource/
//! namespace, an HTTP method/path or a Redis command as those engines land) plus who asks
//! and where it goes.

use std::{fmt, sync::Arc, time::Duration};

use serde::Serialize;

use super::sql::{Classification, Danger, Kind, StatementClass, TableName};
use crate::config::Location;

/// Ordered from least to most restrictive: the most restrictive matching rule decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Mask,
    RequireApproval,
    Deny,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Mask => "mask",
            Self::RequireApproval => "require_approval",
            Self::Deny => "deny",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Masking detectors (value patterns). The PostgreSQL engine implements them.
pub const DETECTORS: [&str; 13] = [
    "email",
    "credit_card",
    "us_ssn",
    "iban",
    "phone",
    "ip_address",
    "jwt",
    "aws_access_key",
    "aws_secret_key",
    "github_token",
    "slack_token",
    "stripe_key",
    "pem_private_key",
];

/// How a masked value is replaced.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Strategy {
    /// `[REDACTED:<what>]`, or a fixed text.
    Redact { text: Option<String> },
    /// Keep the last `keep` characters, replace the rest with `*`.
    Partial { keep: usize },
    /// HMAC-SHA256 with the install's key: stable, so joins on masked values still work.
    Hash,
    /// SQL NULL.
    Null,
}

/// What to do when it cannot be decided which output columns derive from masked ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unresolved {
    /// Mask every column of the result.
    MaskAll,
    /// Deny the statement.
    Deny,
}

/// A mask rule's effect.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct MaskSpec {
    pub rule: String,
    /// `schema.table.column` patterns (globs per part; `table.column` means any schema).
    pub columns: Vec<String>,
    pub detectors: Vec<String>,
    pub strategy: Strategy,
    pub unresolved: Unresolved,
}

/// A rule's action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny {
        message: String,
    },
    RequireApproval {
        approvers: Vec<String>,
        #[serde(with = "humantime_serde_secs")]
        timeout: Duration,
        message: String,
    },
    Mask(Arc<MaskSpec>),
    /// Record only: never changes the verdict; the decision lists it.
    Audit,
}

mod humantime_serde_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl Action {
    /// The verdict this action pushes towards; `None` for audit.
    pub fn verdict(&self) -> Option<Verdict> {
        match self {
            Self::Allow => Some(Verdict::Allow),
            Self::Mask(_) => Some(Verdict::Mask),
            Self::RequireApproval { .. } => Some(Verdict::RequireApproval),
            Self::Deny { .. } => Some(Verdict::Deny),
            Self::Audit => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny { .. } => "deny",
            Self::RequireApproval { .. } => "require_approval",
            Self::Mask(_) => "mask",
            Self::Audit => "audit",
        }
    }
}

/// Conditions on the identity of the process (all given must hold; lists are "any of").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IdentityMatch {
    pub users: Vec<String>,
    pub uids: Vec<u32>,
    pub units: Vec<String>,
    pub exes: Vec<String>,
    pub cgroups: Vec<String>,
}

impl IdentityMatch {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Conditions on the caller's verified OIDC token (all given must hold; lists are "any
/// of"; globs). A rule with any of them never matches a caller without a token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OidcMatch {
    pub issuers: Vec<String>,
    pub subs: Vec<String>,
    pub emails: Vec<String>,
    pub groups: Vec<String>,
    pub claims: std::collections::BTreeMap<String, Vec<String>>,
}

impl OidcMatch {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `dangerous_functions = true` or a list of categories.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DangerMatch {
    Any(bool),
    Categories(Vec<Danger>),
}

/// Conditions on a SQL statement (all given must hold; lists are "any of").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SqlMatch {
    /// Kind names, globs (`drop_*`) or groups (`@ddl`).
    pub kinds: Vec<String>,
    /// Tables read or written: `schema.table` or `table` (any schema), globs per part.
    pub tables: Vec<String>,
    pub tables_read: Vec<String>,
    pub tables_written: Vec<String>,
    pub functions: Vec<String>,
    pub dangerous_functions: Option<DangerMatch>,
    pub user_functions: Option<UserFunctionsMatch>,
    pub missing_where: Option<bool>,
    pub dynamic_sql: Option<bool>,
}

/// `user_functions`: whether the statement calls a function that is not PostgreSQL's own,
/// leaving out those matching `except` (globs; `name` or `schema.name`, lower case).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UserFunctionsMatch {
    pub calls: bool,
    pub except: Vec<String>,
}

/// A compiled rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub id: String,
    pub description: String,
    /// Where it was written.
    #[serde(serialize_with = "ser_location")]
    pub source: Location,
    /// Agent name globs; empty = any agent.
    pub agents: Vec<String>,
    pub identity: IdentityMatch,
    #[serde(skip_serializing_if = "OidcMatch::is_empty")]
    pub oidc: OidcMatch,
    /// Target name globs; empty = any target.
    pub targets: Vec<String>,
    /// Protocol names; empty = any.
    pub protocols: Vec<String>,
    /// SQL conditions; `None` = any request (every statement, or a non-SQL request).
    pub sql: Option<SqlMatch>,
    pub action: Action,
    /// Statements it matches are recorded with their literals replaced.
    pub redact_literals: bool,
}

fn ser_location<S: serde::Serializer>(l: &Location, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&l.to_string())
}

/// Who is asking, as the rules can see it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Subject {
    pub agent: String,
    pub uid: u32,
    pub user: Option<String>,
    pub unit: Option<String>,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    /// The identity a verified token proved, if the caller presented one.
    pub oidc: Option<Arc<crate::oidc::OidcIdentity>>,
}

/// What is asked.
#[derive(Clone, Copy, Debug)]
pub enum Operation<'a> {
    /// A message of SQL, classified.
    Sql(&'a Classification),
}

/// A request to decide.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub subject: &'a Subject,
    pub target: &'a str,
    pub protocol: &'a str,
    pub operation: Operation<'a>,
}

/// Rule id in decisions made by the default (no rule matched).
pub const DEFAULT_RULE: &str = "default";
/// Rule id in decisions made because SQL could not be classified.
pub const PARSE_ERROR_RULE: &str = "on_parse_error";

/// What to do with a request, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule that made it (`default` or `on_parse_error` when no rule did).
    pub rule: String,
    /// For deny and require_approval: the rule's message.
    pub message: Option<String>,
    pub approvers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_timeout_secs: Option<u64>,
    /// Masks of every matching mask rule (they add up), unless denied.
    pub masks: Vec<Arc<MaskSpec>>,
    /// Audit rules that matched.
    pub audit: Vec<String>,
    /// Every rule that matched, in order.
    pub matched: Vec<String>,
    /// A matching rule asks for the statement to be recorded without its literals.
    pub redact_literals: bool,
}

/// Facts of a statement the matchers read; for non-SQL operations this grows variants.
pub type SqlFacts<'a> = &'a StatementClass;

impl TableName {
    /// Whether a `schema.table` / `table` pattern matches. An unqualified name in SQL can
    /// resolve to any schema on the search path, so it matches any schema in the pattern.
    pub fn matches_pattern(&self, pattern: &str) -> bool {
        let (ps, pt) = match pattern.rsplit_once('.') {
            Some((s, t)) => (Some(s), t),
            None => (None, pattern),
        };
        if !super::glob::matches(pt, &self.name) {
            return false;
        }
        match (ps, &self.schema) {
            (None, _) | (Some(_), None) => true,
            (Some(ps), Some(s)) => super::glob::matches(ps, s),
        }
    }
}

/// Kind matching with globs and `@group`s.
pub fn kind_matches(pattern: &str, kind: Kind, dynamic: bool) -> bool {
    match pattern.strip_prefix('@') {
        Some("dynamic") => dynamic,
        Some(group) => kind.in_group(group),
        None => super::glob::matches(pattern, &kind.name()),
    }
}
