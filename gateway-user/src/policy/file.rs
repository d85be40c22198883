//! Policy files as written: serde model with `deny_unknown_fields` and spans on what
//! validation may point at. Reference: `docs/policies.md`.

use serde::Deserialize;
use toml::Spanned;

use crate::config::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default, rename = "rule")]
    pub rules: Vec<Spanned<RuleEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    pub id: Spanned<String>,
    #[serde(default)]
    pub description: String,
    /// Who: agent name globs.
    #[serde(default)]
    pub agents: Vec<Spanned<String>>,
    /// Who: identity attributes.
    pub identity: Option<IdentityEntry>,
    /// Who: claims of a verified OIDC token.
    pub oidc: Option<Spanned<OidcEntry>>,
    /// Where: target name globs.
    #[serde(default)]
    pub targets: Vec<Spanned<String>>,
    /// Where: protocol names.
    #[serde(default)]
    pub protocols: Vec<Spanned<String>>,
    /// What: SQL conditions.
    pub sql: Option<Spanned<SqlEntry>>,
    pub action: Spanned<String>,
    /// deny, require_approval: what the client is told.
    pub message: Option<Spanned<String>>,
    /// require_approval: approver groups.
    pub approvers: Option<Spanned<Vec<String>>>,
    /// require_approval: how long to wait.
    pub timeout: Option<Spanned<Duration>>,
    /// mask: what and how.
    pub mask: Option<Spanned<MaskEntry>>,
    /// Record matching statements with their literals replaced by `?` (any action).
    #[serde(default)]
    pub redact_literals: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityEntry {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub units: Vec<String>,
    #[serde(default)]
    pub exes: Vec<String>,
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// Moved to `oidc.groups`; kept to say so.
    pub groups: Option<Spanned<Vec<String>>>,
}

/// `oidc = { ... }`: conditions on the caller's verified token (all given must hold; lists
/// are "any of"; globs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcEntry {
    #[serde(default, alias = "issuer")]
    pub issuers: Vec<String>,
    #[serde(default, alias = "sub")]
    pub subs: Vec<String>,
    #[serde(default, alias = "email")]
    pub emails: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Extra claims the issuer keeps (`claims` in `[[oidc]]`): name → accepted values.
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlEntry {
    #[serde(default)]
    pub kinds: Vec<Spanned<String>>,
    #[serde(default)]
    pub tables: Vec<Spanned<String>>,
    #[serde(default)]
    pub tables_read: Vec<Spanned<String>>,
    #[serde(default)]
    pub tables_written: Vec<Spanned<String>>,
    #[serde(default)]
    pub functions: Vec<String>,
    pub dangerous_functions: Option<Spanned<DangerEntry>>,
    pub user_functions: Option<UserFunctionsEntry>,
    pub missing_where: Option<bool>,
    pub dynamic_sql: Option<bool>,
}

/// `true`/`false`, or `{ except = [...] }`: any function not built in but these.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum UserFunctionsEntry {
    Flag(bool),
    Except(UserFunctionsExcept),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFunctionsExcept {
    pub except: Vec<String>,
}

/// `true`/`false` or a list of categories.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum DangerEntry {
    Flag(bool),
    Categories(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskEntry {
    #[serde(default)]
    pub columns: Vec<Spanned<String>>,
    #[serde(default)]
    pub detectors: Vec<Spanned<String>>,
    /// `redact` (default), `partial`, `hash`, `null`.
    #[serde(default = "default_strategy")]
    pub strategy: Spanned<String>,
    /// redact: fixed replacement instead of `[REDACTED:<what>]`.
    pub text: Option<String>,
    /// partial: characters kept at the end (default 4).
    pub keep: Option<usize>,
    /// `mask_all` (default) or `deny`, when derivation cannot be decided.
    pub unresolved: Option<Spanned<String>>,
}

fn default_strategy() -> Spanned<String> {
    Spanned::new(0..0, "redact".to_owned())
}
