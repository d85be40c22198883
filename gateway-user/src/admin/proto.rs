//! Requests and responses of the admin API.

use serde::{Deserialize, Serialize};

use crate::{
    ebpf::{KernelStatus, selection::AgentBinding},
    proxy::ProxyStatus,
};

/// Largest request accepted, in bytes.
pub const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Sessions in the store, newest first.
    Sessions(crate::store::query::SessionFilter),
    /// A session's summary and its records after `after_seq` (at most `limit`).
    Session {
        id: i64,
        #[serde(default)]
        after_seq: i64,
        #[serde(default = "default_limit")]
        limit: u32,
    },
    /// Pending approval requests and grants in force; with `history`, past requests too.
    Approvals {
        #[serde(default)]
        history: bool,
    },
    Approve {
        id: String,
        /// Also approve the same rule for the same agent and target for this long.
        #[serde(default)]
        grant_for_secs: Option<u64>,
    },
    Deny {
        id: String,
        #[serde(default)]
        reason: Option<String>,
    },
    AuditVerify,
    /// Records written at or after `since_us`, after `after_seq` (paged).
    AuditExport {
        #[serde(default)]
        since_us: i64,
        #[serde(default)]
        after_seq: i64,
        #[serde(default = "default_limit")]
        limit: u32,
    },
}

fn default_limit() -> u32 {
    1000
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Sessions(_) => "sessions",
            Self::Session { .. } => "session",
            Self::Approvals { .. } => "approvals",
            Self::Approve { .. } => "approve",
            Self::Deny { .. } => "deny",
            Self::AuditVerify => "audit_verify",
            Self::AuditExport { .. } => "audit_export",
        }
    }
}

/// `approvals`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApprovalsView {
    pub pending: Vec<crate::approvals::PendingView>,
    pub grants: Vec<crate::approvals::GrantView>,
    #[serde(default)]
    pub history: Vec<crate::store::query::ApprovalRow>,
}

/// `session`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionView {
    pub session: crate::store::query::SessionSummary,
    pub records: Vec<crate::store::query::Record>,
}

/// `approve`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Approved {
    pub id: String,
    pub grant: Option<crate::approvals::GrantView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    pub fn err(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            data: None,
        }
    }
    pub fn ok<T: Serialize>(data: &T) -> Self {
        match serde_json::to_value(data) {
            Ok(v) => Self {
                ok: true,
                error: None,
                data: Some(v),
            },
            Err(e) => Self::err(format!("cannot encode the response: {e}")),
        }
    }
}

/// `portcullis status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub config: String,
    pub uptime_secs: u64,
    pub policy: PolicyStatus,
    pub kernel: KernelStatus,
    pub proxy: ProxyStatus,
    pub agents: Vec<AgentStatus>,
    pub targets: Vec<TargetStatus>,
    pub store: StoreStatus,
    /// Trusted OIDC issuers and the keys held for each.
    #[serde(default)]
    pub oidc: Vec<crate::oidc::keys::KeySummary>,
    /// Local servers of targets' ports reachable at addresses no target covers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uncovered: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreStatus {
    pub path: String,
    pub durability: String,
    /// The last committed record.
    pub head_seq: i64,
    #[serde(flatten)]
    pub counters: crate::store::StoreCounters,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub name: String,
    pub selector: String,
    pub binding: AgentBinding,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub protocol: String,
    pub addresses: Vec<String>,
    /// Host names among the addresses, with what they stand for now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostStatus>,
    /// PostgreSQL inject targets: `optional` or `required` when agents present tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A host name in a target's addresses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostStatus {
    /// `host:port` as written.
    pub name: String,
    /// What it stands for now (its part of the target's `addresses`).
    pub addresses: Vec<String>,
    /// Why its lookups fail, while they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The policy directory, or `<builtin>`.
    pub source: String,
    pub files: Vec<String>,
    pub rules: usize,
    /// Bumped by every successful reload.
    pub generation: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub cached_decisions: usize,
    /// Decisions kept by statement shape (statements differing only in literals).
    #[serde(default)]
    pub cached_shape_decisions: usize,
    pub default: String,
    pub on_parse_error: String,
}
