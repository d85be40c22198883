//! The configuration file as written: serde model with `deny_unknown_fields` everywhere and
//! spans on the values validation may complain about. Defaults live here, one function per
//! field, and are documented in `docs/configuration.md`.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{Duration, FailMode, LogFormat, LogWhenFull, Protocol};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub daemon: DaemonSection,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub ebpf: EbpfSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default, rename = "webhook")]
    pub webhooks: Vec<WebhookEntry>,
    #[serde(default, rename = "oidc")]
    pub oidc: Vec<super::oidc::OidcEntry>,
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentEntry>,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// Loopback addresses, at most one per family.
    #[serde(default = "default_listen")]
    pub listen: Spanned<Vec<Spanned<String>>>,
    /// `SO_MARK` on upstream sockets so the kernel never redirects them.
    #[serde(default = "default_mark")]
    pub upstream_mark: Spanned<u32>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    #[serde(default = "default_max_connections")]
    pub max_connections: Spanned<usize>,
    /// Connection worker threads; absent: one per CPU the daemon may run on.
    #[serde(default)]
    pub workers: Option<Spanned<usize>>,
    /// On SIGTERM, how long open sessions may take to finish before they are closed.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            upstream_mark: default_mark(),
            connect_timeout: default_connect_timeout(),
            max_connections: default_max_connections(),
            workers: None,
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn unspanned<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}

fn default_listen() -> Spanned<Vec<Spanned<String>>> {
    unspanned(vec![
        unspanned("127.0.0.1:15001".to_owned()),
        unspanned("[::1]:15001".to_owned()),
    ])
}
/// "PC" in the high bytes: unlikely to collide with marks used for policy routing.
pub const DEFAULT_MARK: u32 = 0x5043_0000;
fn default_mark() -> Spanned<u32> {
    unspanned(DEFAULT_MARK)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> Spanned<usize> {
    unspanned(10_000)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EbpfSection {
    #[serde(default = "default_pin_path")]
    pub pin_path: Spanned<PathBuf>,
    #[serde(default = "default_attach_cgroup")]
    pub attach_cgroup: Spanned<String>,
    #[serde(default = "default_fail_mode")]
    pub fail_mode: FailMode,
    #[serde(default = "default_rescan")]
    pub rescan_interval: Spanned<Duration>,
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: Spanned<Duration>,
    #[serde(default = "default_resolve_keep")]
    pub resolve_keep: Duration,
}

impl Default for EbpfSection {
    fn default() -> Self {
        Self {
            pin_path: default_pin_path(),
            attach_cgroup: default_attach_cgroup(),
            fail_mode: default_fail_mode(),
            rescan_interval: default_rescan(),
            resolve_interval: default_resolve_interval(),
            resolve_keep: default_resolve_keep(),
        }
    }
}

fn default_pin_path() -> Spanned<PathBuf> {
    unspanned(PathBuf::from("/sys/fs/bpf/portcullis"))
}
fn default_attach_cgroup() -> Spanned<String> {
    unspanned("/".to_owned())
}
fn default_fail_mode() -> FailMode {
    FailMode::Closed
}
fn default_resolve_interval() -> Spanned<Duration> {
    unspanned(Duration::from_secs(30))
}
fn default_resolve_keep() -> Duration {
    Duration::from_secs(3600)
}
fn default_rescan() -> Spanned<Duration> {
    unspanned(Duration::from_secs(1))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    #[serde(default = "default_admin_socket")]
    pub socket: PathBuf,
    /// Groups whose members may read sessions, replays and the audit log.
    #[serde(default = "default_auditors")]
    pub auditors: Vec<String>,
}

fn default_auditors() -> Vec<String> {
    vec!["portcullis-auditors".to_owned()]
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// `address:port` for `/metrics`, `/healthz`, `/readyz`; `""` turns the endpoint off.
    #[serde(default = "default_metrics_listen")]
    pub listen: Spanned<String>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> Spanned<String> {
    unspanned("127.0.0.1:9477".to_owned())
}

/// `[store]`: the audit store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// SQLite file; default `<state_dir>/portcullis.db`.
    pub path: Option<PathBuf>,
    /// `commit` (default) or `strict`.
    #[serde(default = "default_durability")]
    pub durability: Spanned<String>,
    /// Records that may wait for the writer; past it, statements are refused.
    #[serde(default = "default_store_queue")]
    pub queue: Spanned<usize>,
    /// Bytes of transcript kept per session (what the agent sent and received).
    #[serde(default = "default_recording_limit")]
    pub recording_limit: usize,
    /// Sessions that ended longer ago than this are pruned; absent: kept.
    pub retention: Option<Duration>,
    /// How often sessions past `retention` are pruned.
    #[serde(default = "default_prune_interval")]
    pub prune_interval: Spanned<Duration>,
    /// Record statements with their literals replaced by `?` (rules can ask for it too).
    #[serde(default)]
    pub redact_literals: bool,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            path: None,
            durability: default_durability(),
            queue: default_store_queue(),
            recording_limit: default_recording_limit(),
            retention: None,
            prune_interval: default_prune_interval(),
            redact_literals: false,
        }
    }
}

fn default_prune_interval() -> Spanned<Duration> {
    unspanned(Duration::from_secs(3600))
}
fn default_durability() -> Spanned<String> {
    unspanned("commit".to_owned())
}
fn default_store_queue() -> Spanned<usize> {
    unspanned(65_536)
}
fn default_recording_limit() -> usize {
    1 << 20
}

/// `[[webhook]]`: notifications of approval requests and decisions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEntry {
    /// `http://` or `https://` URL the events are POSTed to.
    pub url: Spanned<String>,
    /// `json` (default: the event as JSON) or `slack` (`{"text": ...}`).
    #[serde(default = "default_webhook_format")]
    pub format: Spanned<String>,
    /// Events to send; default all: `approval_requested`, `approval_decided`.
    #[serde(default)]
    pub events: Vec<Spanned<String>>,
    #[serde(default = "default_webhook_timeout")]
    pub timeout: Duration,
    /// Signing key: a root-only file, or a systemd credential's name. With one, every POST
    /// carries an HMAC-SHA256 signature of its timestamp and body.
    pub secret_file: Option<Spanned<PathBuf>>,
    pub secret_credential: Option<Spanned<String>>,
}

fn default_webhook_format() -> Spanned<String> {
    unspanned("json".to_owned())
}
fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            socket: default_admin_socket(),
            auditors: default_auditors(),
        }
    }
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/portcullis/admin.sock")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// A `tracing` filter (`info`, `portcullis=debug,info`); `RUST_LOG` overrides it.
    #[serde(default = "default_level")]
    pub level: String,
    #[serde(default = "default_format")]
    pub format: LogFormat,
    /// Bytes of log lines that may wait for the writer thread.
    #[serde(default = "default_log_queue")]
    pub queue_bytes: Spanned<usize>,
    #[serde(default = "default_when_full")]
    pub when_full: LogWhenFull,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: default_level(),
            format: default_format(),
            queue_bytes: default_log_queue(),
            when_full: default_when_full(),
        }
    }
}

fn default_log_queue() -> Spanned<usize> {
    unspanned(crate::telemetry::batch::MAX_PENDING)
}

fn default_when_full() -> LogWhenFull {
    LogWhenFull::Drop
}

fn default_level() -> String {
    "info".to_owned()
}
fn default_format() -> LogFormat {
    LogFormat::Text
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Directory of policy files (every `*.toml`, in name order). Absent: the policies
    /// shipped in the binary (the repository's `policies/`).
    pub dir: Option<Spanned<PathBuf>>,
    /// Verdict for requests no rule decides: `allow`, `deny` or `require_approval`.
    #[serde(default = "default_policy_default")]
    pub default: Spanned<String>,
    /// Verdict for SQL that cannot be classified: `deny` or `require_approval`.
    #[serde(default = "default_on_parse_error")]
    pub on_parse_error: Spanned<String>,
    /// Approver groups for `require_approval` rules that name none.
    #[serde(default = "default_approvers")]
    pub approvers: Vec<String>,
    /// How long a held request waits for a decision, unless its rule says otherwise.
    #[serde(default = "default_approval_timeout")]
    pub approval_timeout: Duration,
    /// How often the policy directory is checked for changes.
    #[serde(default = "default_watch_interval")]
    pub watch_interval: Spanned<Duration>,
    /// Decisions kept in the cache (statement text and identity class).
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            dir: None,
            default: default_policy_default(),
            on_parse_error: default_on_parse_error(),
            approvers: default_approvers(),
            approval_timeout: default_approval_timeout(),
            watch_interval: default_watch_interval(),
            cache_entries: default_cache_entries(),
        }
    }
}

fn default_policy_default() -> Spanned<String> {
    unspanned("allow".to_owned())
}
fn default_on_parse_error() -> Spanned<String> {
    unspanned("deny".to_owned())
}
fn default_approvers() -> Vec<String> {
    vec!["portcullis-approvers".to_owned()]
}
fn default_approval_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_watch_interval() -> Spanned<Duration> {
    unspanned(Duration::from_secs(1))
}
fn default_cache_entries() -> usize {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    pub name: Spanned<String>,
    #[serde(rename = "match")]
    pub selector: Spanned<AgentMatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentMatch {
    pub cgroup: Option<Spanned<String>>,
    pub unit: Option<Spanned<String>>,
    pub uid: Option<Spanned<u32>>,
    pub user: Option<Spanned<String>>,
    pub exe: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetEntry {
    pub name: Spanned<String>,
    pub protocol: Spanned<Protocol>,
    /// One pattern or a list of them.
    pub address: Spanned<OneOrMany>,
    /// postgres: `passthrough` (default) or `inject`.
    pub auth: Option<Spanned<String>>,
    /// postgres: credentials Portcullis holds (inject mode; catalog lookups in both modes).
    pub credentials: Option<Spanned<CredentialsEntry>>,
    /// postgres: TLS to the server: `disable`, `prefer` (default), `require`, `verify-full`.
    pub upstream_tls: Option<Spanned<String>>,
    /// postgres: CA bundle for `verify-full`.
    pub upstream_ca: Option<PathBuf>,
    /// postgres: name to verify the server certificate against (default: the host part of
    /// the target's first address).
    pub upstream_server_name: Option<String>,
    /// postgres: largest message accepted in either direction, in bytes.
    pub max_message_size: Option<Spanned<usize>>,
    /// postgres: how long a client may take to finish connecting (startup, authentication)
    /// or to finish a message it started sending.
    pub stall_timeout: Option<Duration>,
    /// postgres, inject: the agent's password must be a valid OIDC token.
    pub require_token: Option<Spanned<bool>>,
    /// postgres, inject: ask for a password; a token is validated, anything else ignored.
    pub accept_token: Option<Spanned<bool>>,
    /// postgres: `end_session` (default) or `continue` when the session's token expires.
    pub token_expiry: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsEntry {
    pub user: String,
    /// A root-only file holding the password.
    pub password_file: Option<PathBuf>,
    /// A systemd credential (LoadCredential=) holding the password.
    pub password_credential: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// Where the daemon keeps what it generates: TLS certificate and key, masking key.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Certificate (PEM) presented to clients that ask for TLS; generated when absent.
    pub tls_cert: Option<PathBuf>,
    /// Its key (PEM).
    pub tls_key: Option<PathBuf>,
}

impl Default for DaemonSection {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/portcullis")
}

/// `"a"` or `["a", "b"]`.
#[derive(Debug)]
pub struct OneOrMany(pub Vec<Spanned<String>>);

impl OneOrMany {
    pub fn as_slice(&self) -> &[Spanned<String>] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address string or a list of address strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![Spanned::new(0..0, v.to_owned())]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<Spanned<String>>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}
