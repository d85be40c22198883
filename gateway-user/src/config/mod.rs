//! The daemon's configuration: one TOML file (`/etc/portcullis/portcullis.toml`), or the
//! complete commented default embedded in the binary (`config/portcullis.toml` in the repo).
//!
//! Loading is two steps: serde parses the file into the raw [`file`] model (unknown keys are
//! errors, with file, line and column), then [`validate`] checks it and resolves names (users
//! to uids, host names to addresses) into [`Config`], the form the rest of the daemon uses.
//! Every problem found by validation is reported at once, each with its position.

pub mod address;
pub mod duration;
pub mod file;
pub mod oidc;
pub mod source;
pub mod trust;

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

pub use address::{HostPort, Pattern, TargetAddr};
pub use duration::Duration;
pub use oidc::{OidcIssuer, ProcessMatch, TokenBinding, TokenExpiry, TokenMode};
pub use source::{Location, Source};
use toml::Spanned;

/// The embedded default configuration (the same text `portcullis run` uses when no file
/// exists and `cargo xtask run` starts with).
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/portcullis.toml");
/// Where the daemon and the CLI look for the configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/portcullis/portcullis.toml";

/// One problem in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where, when known; otherwise the file.
    pub location: Option<Location>,
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(l) => write!(f, "{l}: {}", self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", join(.0))]
    Invalid(Vec<Diagnostic>),
}

fn join(d: &[Diagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            Self::Invalid(d) => d,
            Self::Read { .. } => &[],
        }
    }
}

/// What happens to protected connections while the daemon is not running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Programs stay attached (pinned): connections are refused. The default.
    Closed,
    /// Programs are detached with the daemon: connections go direct, unseen.
    Open,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Smallest `[log] queue_bytes`: a few lines of the largest kind.
pub const MIN_LOG_QUEUE: usize = 64 * 1024;

/// What logging does when the queue in front of stderr is full (`[log] when_full`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogWhenFull {
    /// Drop the line and count it: a stalled log reader never stalls connections.
    Drop,
    /// Wait for the writer: no line is lost, and whatever logs waits with the reader.
    Wait,
}

/// Protocol engines a target can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP relay: connections are seen, identified and recorded, not parsed.
    Tcp,
    /// PostgreSQL wire protocol: statements classified, decided and enforced.
    Postgres,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Postgres => "postgres",
        }
    }
}

/// How the PostgreSQL engine authenticates to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PgAuth {
    /// The client's authentication exchange is relayed to the server.
    Passthrough,
    /// Portcullis authenticates with credentials it holds; the agent is admitted by its
    /// process identity and its own password is never forwarded.
    Inject,
}

/// TLS on the proxy → server leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

/// Where a password comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Secret {
    File(PathBuf),
    /// A systemd credential name, read from `$CREDENTIALS_DIRECTORY`.
    Credential(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
}

/// PostgreSQL settings of a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgTarget {
    pub auth: PgAuth,
    pub credentials: Option<Credentials>,
    pub upstream_tls: UpstreamTls,
    pub upstream_ca: Option<PathBuf>,
    pub upstream_server_name: Option<String>,
    pub max_message_size: usize,
    pub stall_timeout: Duration,
    /// Whether the agent is asked for an OIDC token as its password (inject mode).
    pub token: TokenMode,
    pub token_expiry: TokenExpiry,
}

/// `[daemon]`.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from; `None` for the embedded default.
    pub path: Option<PathBuf>,
    pub daemon: DaemonConfig,
    pub proxy: ProxyConfig,
    pub ebpf: EbpfConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub policy: PolicyConfig,
    pub store: StoreConfig,
    /// `[metrics] listen`; `None`: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    pub webhooks: Vec<Webhook>,
    /// `[[oidc]]`: trusted token issuers.
    pub oidc: Vec<OidcIssuer>,
    pub agents: Vec<Agent>,
    pub targets: Vec<Target>,
}

/// `[policy]`.
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// `None`: the shipped policies compiled into the binary.
    pub dir: Option<PathBuf>,
    pub default: crate::policy::Verdict,
    pub on_parse_error: crate::policy::Verdict,
    pub approvers: Vec<String>,
    pub approval_timeout: Duration,
    pub watch_interval: Duration,
    pub cache_entries: usize,
}

/// More connection workers than this is a typo, not a tuning choice.
pub const MAX_WORKERS: usize = 1024;

/// One connection worker per CPU the daemon may run on (its affinity mask and cgroup CPU
/// quota, as the standard library reads them).
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Loopback listener per family; port 0 lets the kernel choose (tests use this).
    pub listen_v4: Option<SocketAddr>,
    pub listen_v6: Option<SocketAddr>,
    pub upstream_mark: u32,
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// Connection worker threads (at least 1).
    pub workers: usize,
    pub drain_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct EbpfConfig {
    pub pin_path: PathBuf,
    /// cgroup (relative to the cgroup2 mount, `/` = root) the programs attach to.
    pub attach_cgroup: String,
    pub fail_mode: FailMode,
    pub rescan_interval: Duration,
    /// How often host names in target addresses are looked up again (`0s`: never).
    pub resolve_interval: Duration,
    /// How long an address a name no longer resolves to stays a target address.
    pub resolve_keep: Duration,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub socket: PathBuf,
    /// Groups whose members may read sessions and the audit log.
    pub auditors: Vec<String>,
}

/// When a statement's record must be durable before the statement is forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Committed to the database (survives the daemon crashing; the WAL is synced at least
    /// every second, which bounds what an OS crash or power loss can take).
    Commit,
    /// Committed and fsynced.
    Strict,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Strict => "strict",
        }
    }
}

/// `[store]`.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub durability: Durability,
    pub queue: usize,
    pub recording_limit: usize,
    pub retention: Option<Duration>,
    pub prune_interval: Duration,
    pub redact_literals: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookFormat {
    Json,
    Slack,
}

/// `[[webhook]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Webhook {
    pub url: String,
    pub format: WebhookFormat,
    /// Empty: every event.
    pub events: Vec<String>,
    pub timeout: Duration,
    /// Signs each POST (`X-Portcullis-Signature`) when set.
    pub secret: Option<Secret>,
}

/// Webhook event names.
pub const WEBHOOK_EVENTS: [&str; 2] = ["approval_requested", "approval_decided"];

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub queue_bytes: usize,
    pub when_full: LogWhenFull,
}

/// A protected agent and how to recognise its processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    /// Index in [`Config::agents`]; the kernel reports it in each origin.
    pub id: u32,
    pub name: String,
    pub selector: AgentSelector,
}

/// Conditions on a process; all that are given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentSelector {
    /// cgroup path relative to the cgroup2 mount; the cgroup and all its descendants.
    pub cgroup: Option<String>,
    /// systemd unit (service, scope or slice) whose cgroup, and descendants, are the agent.
    pub unit: Option<String>,
    /// Real uid of the process (from `uid` or `user`).
    pub uid: Option<u32>,
    /// The user name, when given as `user`.
    pub user: Option<String>,
    /// Executable path; refines another selector, never selects alone.
    pub exe: Option<PathBuf>,
}

impl AgentSelector {
    /// Whether the kernel selects this agent by cgroup (otherwise by uid).
    pub fn kernel_by_cgroup(&self) -> bool {
        self.cgroup.is_some() || self.unit.is_some()
    }
}

/// Whether loading a configuration resolves the host names in target addresses. Commands
/// that only talk to the daemon skip it: they never wait on the resolver (a DNS outage does
/// not slow `portcullis approve`), and their configuration's targets name no addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookups {
    Resolve,
    Skip,
}

/// A protected destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Index in [`Config::targets`]; the kernel reports it in each origin.
    pub id: u32,
    pub name: String,
    pub protocol: Protocol,
    /// Addresses, ranges and `*` patterns as written.
    pub fixed: Vec<TargetAddr>,
    /// Host names, with what they resolve to now.
    pub hosts: Vec<ResolvedHost>,
    /// PostgreSQL settings (protocol `postgres` only).
    pub pg: Option<PgTarget>,
}

/// A host name among a target's addresses, and the addresses it stands for now: what it
/// resolved to when the configuration loaded, then what `crate::target_names` keeps from
/// the lookups since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedHost {
    pub name: HostPort,
    pub addrs: Vec<TargetAddr>,
    /// Why the lookup at load failed; `addrs` is then empty until a later one succeeds.
    pub error: Option<String>,
}

impl Target {
    /// Every pattern the kernel matches for this target: the fixed ones, then each host
    /// name's current addresses.
    pub fn addrs(&self) -> impl Iterator<Item = &TargetAddr> + '_ {
        self.fixed
            .iter()
            .chain(self.hosts.iter().flat_map(|h| h.addrs.iter()))
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, Lookups::Resolve)
    }

    /// [`Config::load`], host names resolved or not.
    pub fn load_with(path: &Path, lookups: Lookups) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse_with(&Source::new(path, text), lookups)?;
        cfg.path = Some(path.to_owned());
        Ok(cfg)
    }

    /// The embedded default.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(&Source::new("<embedded default>", DEFAULT_CONFIG))
    }

    /// `path` if it exists; the embedded default if it does not and the caller did not name
    /// a file explicitly.
    pub fn load_or_default(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        Self::load_or_default_with(path, explicit, Lookups::Resolve)
    }

    /// [`Config::load_or_default`], host names resolved or not.
    pub fn load_or_default_with(
        path: &Path,
        explicit: bool,
        lookups: Lookups,
    ) -> Result<Self, ConfigError> {
        if !explicit && !path.exists() {
            return Self::parse_with(&Source::new("<embedded default>", DEFAULT_CONFIG), lookups);
        }
        Self::load_with(path, lookups)
    }

    /// Parses and validates configuration text.
    pub fn parse(src: &Source) -> Result<Self, ConfigError> {
        Self::parse_with(src, Lookups::Resolve)
    }

    /// [`Config::parse`], host names resolved or not.
    pub fn parse_with(src: &Source, lookups: Lookups) -> Result<Self, ConfigError> {
        let raw: file::ConfigFile = toml::from_str(&src.text).map_err(|e| {
            ConfigError::Invalid(vec![Diagnostic {
                location: e.span().map(|s| src.locate(&s)),
                path: src.path.clone(),
                message: e.message().trim().to_owned(),
            }])
        })?;
        validate(raw, src, lookups)
    }

    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.name == name)
    }

    /// What is not an error but leaves something unprotected: target host names that did
    /// not resolve when the configuration loaded.
    pub fn warnings(&self) -> Vec<String> {
        self.targets
            .iter()
            .flat_map(|t| {
                t.hosts.iter().filter_map(|h| {
                    let e = h.error.as_ref()?;
                    Some(format!(
                        "target `{}`: `{}` does not resolve ({e}); connections to it are not \
                         intercepted until it does",
                        t.name, h.name
                    ))
                })
            })
            .collect()
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The target a destination belongs to: the longest matching pattern, as in the kernel.
    pub fn target_for(&self, dst: SocketAddr) -> Option<&Target> {
        self.targets
            .iter()
            .filter_map(|t| {
                t.addrs()
                    .filter_map(|a| a.prefix_len_matching(dst))
                    .max()
                    .map(|len| (len, t))
            })
            .max_by_key(|(len, t)| (*len, std::cmp::Reverse(t.id)))
            .map(|(_, t)| t)
    }
}

/// Shortest period of the daemon's background loops: a smaller one would make a loop spin
/// (`0s`) or hammer what it polls.
const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// A loop's period, at least [`MIN_INTERVAL`] (or `0s` where that turns the loop off).
fn interval(c: &mut Checker<'_>, v: &Spanned<Duration>, key: &str, zero_is_off: bool) -> Duration {
    let d = *v.get_ref();
    if d.get() < MIN_INTERVAL && !(zero_is_off && d.get().is_zero()) {
        let off = if zero_is_off { " (or `0s`, off)" } else { "" };
        c.at(v, format!("`{key}` must be at least 100ms{off}, not {d}"));
    }
    d
}

/// Collects diagnostics with positions.
struct Checker<'a> {
    src: &'a Source,
    out: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn at<T>(&mut self, spanned: &Spanned<T>, message: impl Into<String>) {
        self.at_span(spanned.span(), message);
    }

    fn at_span(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        // Defaults carry an empty span: they have no place in the file.
        let location = (!span.is_empty()).then(|| self.src.locate(&span));
        self.out.push(Diagnostic {
            location,
            path: self.src.path.clone(),
            message: message.into(),
        });
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Normalises a cgroup path: absolute, no empty, `.` or `..` components.
pub fn normalize_cgroup_path(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
    if parts.iter().any(|c| *c == "." || *c == "..") {
        return None;
    }
    Some(format!("/{}", parts.join("/")))
}

/// PostgreSQL keys of a target: valid only for `protocol = "postgres"`.
fn validate_pg(c: &mut Checker<'_>, t: &file::TargetEntry, issuers: usize) -> Option<PgTarget> {
    let is_pg = *t.protocol.get_ref() == Protocol::Postgres;
    if !is_pg {
        for (key, span) in [
            ("auth", t.auth.as_ref().map(Spanned::span)),
            ("credentials", t.credentials.as_ref().map(Spanned::span)),
            ("upstream_tls", t.upstream_tls.as_ref().map(Spanned::span)),
            (
                "max_message_size",
                t.max_message_size.as_ref().map(Spanned::span),
            ),
            ("require_token", t.require_token.as_ref().map(Spanned::span)),
            ("accept_token", t.accept_token.as_ref().map(Spanned::span)),
            ("token_expiry", t.token_expiry.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = span {
                c.at_span(span, format!("`{key}` is for postgres targets"));
            }
        }
        return None;
    }
    let auth = match t.auth.as_ref().map(|a| a.get_ref().as_str()) {
        None | Some("passthrough") => PgAuth::Passthrough,
        Some("inject") => PgAuth::Inject,
        Some(other) => {
            if let Some(a) = &t.auth {
                c.at(
                    a,
                    format!("`auth` is `passthrough` or `inject`, not `{other}`"),
                );
            }
            PgAuth::Passthrough
        }
    };
    let credentials = t.credentials.as_ref().and_then(|cr| {
        let e = cr.get_ref();
        let password = match (&e.password_file, &e.password_credential) {
            (Some(f), None) => Secret::File(f.clone()),
            (None, Some(n)) => Secret::Credential(n.clone()),
            _ => {
                c.at(
                    cr,
                    "credentials need exactly one of `password_file` or `password_credential`",
                );
                return None;
            }
        };
        Some(Credentials {
            user: e.user.clone(),
            password,
        })
    });
    if auth == PgAuth::Inject && credentials.is_none() && t.credentials.is_none() {
        c.at(
            &t.name,
            "`auth = \"inject\"` needs `credentials` (user and password)",
        );
    }
    let upstream_tls = match t.upstream_tls.as_ref().map(|a| a.get_ref().as_str()) {
        None | Some("prefer") => UpstreamTls::Prefer,
        Some("disable") => UpstreamTls::Disable,
        Some("require") => UpstreamTls::Require,
        Some("verify-full") => UpstreamTls::VerifyFull,
        Some(other) => {
            if let Some(a) = &t.upstream_tls {
                c.at(
                    a,
                    format!(
                        "`upstream_tls` is disable, prefer, require or verify-full, not `{other}`"
                    ),
                );
            }
            UpstreamTls::Prefer
        }
    };
    if upstream_tls == UpstreamTls::VerifyFull
        && t.upstream_ca.is_none()
        && let Some(a) = &t.upstream_tls
    {
        c.at(
            a,
            "`verify-full` needs `upstream_ca` (the CA bundle to verify the server with)",
        );
    }
    let max_message_size = match &t.max_message_size {
        Some(m) if *m.get_ref() < 8192 => {
            c.at(m, "`max_message_size` must be at least 8192 bytes");
            8192
        }
        Some(m) => *m.get_ref(),
        None => crate::protocol::postgres::codec::DEFAULT_MAX_MESSAGE,
    };
    let (token, token_expiry) = oidc::token_settings(c, t, auth == PgAuth::Inject, issuers);
    Some(PgTarget {
        auth,
        token,
        token_expiry,
        credentials,
        upstream_tls,
        upstream_ca: t.upstream_ca.clone(),
        upstream_server_name: t.upstream_server_name.clone(),
        max_message_size,
        stall_timeout: t.stall_timeout.unwrap_or(Duration::from_secs(30)),
    })
}

fn validate(raw: file::ConfigFile, src: &Source, lookups: Lookups) -> Result<Config, ConfigError> {
    let mut c = Checker {
        src,
        out: Vec::new(),
    };

    // [proxy]
    let mut listen_v4 = None;
    let mut listen_v6 = None;
    if raw.proxy.listen.get_ref().is_empty() {
        c.at(&raw.proxy.listen, "`listen` needs at least one address");
    }
    for addr in raw.proxy.listen.get_ref() {
        match addr.get_ref().parse::<SocketAddr>() {
            Err(_) => c.at(
                addr,
                format!(
                    "`{}` is not an address:port (e.g. `127.0.0.1:15001`, `[::1]:15001`)",
                    addr.get_ref()
                ),
            ),
            Ok(sa) if !sa.ip().is_loopback() => c.at(
                addr,
                format!(
                    "the proxy must listen on loopback, where the kernel sends redirected \
                     connections; `{sa}` is not"
                ),
            ),
            Ok(sa) => {
                let slot = match sa.ip() {
                    IpAddr::V4(_) => &mut listen_v4,
                    IpAddr::V6(_) => &mut listen_v6,
                };
                if slot.replace(sa).is_some() {
                    c.at(addr, "only one listener per address family");
                }
            }
        }
    }
    if *raw.proxy.upstream_mark.get_ref() == 0 {
        c.at(
            &raw.proxy.upstream_mark,
            "`upstream_mark` must not be 0: it marks the proxy's own connections",
        );
    }
    if *raw.log.queue_bytes.get_ref() < MIN_LOG_QUEUE {
        c.at(
            &raw.log.queue_bytes,
            format!("`queue_bytes` must be at least {MIN_LOG_QUEUE}"),
        );
    }
    if *raw.proxy.max_connections.get_ref() == 0 {
        c.at(
            &raw.proxy.max_connections,
            "`max_connections` must be at least 1",
        );
    }
    let workers = match &raw.proxy.workers {
        Some(w) if !(1..=MAX_WORKERS).contains(w.get_ref()) => {
            c.at(w, format!("`workers` must be between 1 and {MAX_WORKERS}"));
            1
        }
        Some(w) => *w.get_ref(),
        None => default_workers(),
    };

    // [ebpf]
    let attach_cgroup = match normalize_cgroup_path(raw.ebpf.attach_cgroup.get_ref()) {
        Some(p) => p,
        None => {
            c.at(
                &raw.ebpf.attach_cgroup,
                "`attach_cgroup` must be an absolute cgroup path without `.` or `..` (`/` is \
                 the root)",
            );
            "/".into()
        }
    };
    if !raw.ebpf.pin_path.get_ref().is_absolute() {
        c.at(&raw.ebpf.pin_path, "`pin_path` must be absolute");
    }

    // [policy]
    let verdict = |s: &str| match s {
        "allow" => Some(crate::policy::Verdict::Allow),
        "deny" => Some(crate::policy::Verdict::Deny),
        "require_approval" => Some(crate::policy::Verdict::RequireApproval),
        _ => None,
    };
    let policy_default = verdict(raw.policy.default.get_ref()).unwrap_or_else(|| {
        c.at(
            &raw.policy.default,
            "`default` is `allow`, `deny` or `require_approval`",
        );
        crate::policy::Verdict::Deny
    });
    let on_parse_error = match verdict(raw.policy.on_parse_error.get_ref()) {
        Some(v @ (crate::policy::Verdict::Deny | crate::policy::Verdict::RequireApproval)) => v,
        _ => {
            c.at(
                &raw.policy.on_parse_error,
                "`on_parse_error` is `deny` or `require_approval`: SQL that cannot be \
                 classified never passes unseen",
            );
            crate::policy::Verdict::Deny
        }
    };
    let policy_dir = raw.policy.dir.as_ref().map(|d| {
        let p = d.get_ref();
        // Relative to the configuration file.
        match (&src.path.parent(), p.is_relative()) {
            (Some(base), true) if src.path.exists() => base.join(p),
            _ => p.clone(),
        }
    });

    // [[agent]]
    let mut agents = Vec::new();
    let mut seen = HashMap::new();
    for (i, a) in raw.agents.iter().enumerate() {
        let name = a.name.get_ref().clone();
        if !is_name(&name) {
            c.at(
                &a.name,
                format!("agent name `{name}`: use letters, digits, `-`, `_`, `.` (1-64)"),
            );
        }
        if seen.insert(name.clone(), ()).is_some() {
            c.at(&a.name, format!("agent `{name}` is defined twice"));
        }
        let m = a.selector.get_ref();
        let mut sel = AgentSelector::default();
        if let Some(cg) = &m.cgroup {
            match normalize_cgroup_path(cg.get_ref()) {
                Some(p) if p != "/" => sel.cgroup = Some(p),
                _ => c.at(
                    cg,
                    "`cgroup` must be an absolute path below the cgroup2 root, e.g. \
                     `/portcullis/local`",
                ),
            }
        }
        if let Some(unit) = &m.unit {
            let u = unit.get_ref();
            let ok = is_name(u.trim_end_matches(".service"))
                && [".service", ".scope", ".slice"]
                    .iter()
                    .any(|s| u.ends_with(s));
            if ok {
                sel.unit = Some(u.clone());
            } else {
                c.at(
                    unit,
                    format!(
                        "`{u}` is not a systemd unit name ending in .service, .scope or .slice"
                    ),
                );
            }
        }
        if let Some(uid) = &m.uid {
            sel.uid = Some(*uid.get_ref());
        }
        if let Some(user) = &m.user {
            match nix::unistd::User::from_name(user.get_ref()) {
                Ok(Some(u)) => {
                    if sel.uid.is_some_and(|uid| uid != u.uid.as_raw()) {
                        c.at(
                            user,
                            format!(
                                "user `{}` has uid {}, which contradicts `uid`",
                                user.get_ref(),
                                u.uid
                            ),
                        );
                    }
                    sel.uid = Some(u.uid.as_raw());
                    sel.user = Some(user.get_ref().clone());
                }
                Ok(None) => c.at(user, format!("no such user `{}`", user.get_ref())),
                Err(e) => c.at(
                    user,
                    format!("cannot look up user `{}`: {e}", user.get_ref()),
                ),
            }
        }
        if let Some(exe) = &m.exe {
            let p = PathBuf::from(exe.get_ref());
            if p.is_absolute() {
                sel.exe = Some(p);
            } else {
                c.at(exe, "`exe` must be an absolute path");
            }
        }
        if m.cgroup.is_none() && m.unit.is_none() && m.uid.is_none() && m.user.is_none() {
            c.at(
                &a.selector,
                "an agent needs `cgroup`, `unit`, `uid` or `user` (the kernel selects processes \
                 by these; `exe` only narrows them down)",
            );
        }
        agents.push(Agent {
            id: i as u32,
            name,
            selector: sel,
        });
    }

    // [[target]]
    let mut targets: Vec<Target> = Vec::new();
    let mut seen = HashMap::new();
    let mut patterns: HashMap<(u32, gateway_common::TargetKey), String> = HashMap::new();
    for (i, t) in raw.targets.iter().enumerate() {
        let name = t.name.get_ref().clone();
        if !is_name(&name) {
            c.at(
                &t.name,
                format!("target name `{name}`: use letters, digits, `-`, `_`, `.` (1-64)"),
            );
        }
        if seen.insert(name.clone(), ()).is_some() {
            c.at(&t.name, format!("target `{name}` is defined twice"));
        }
        let list = t.address.get_ref().as_slice();
        if list.is_empty() {
            c.at(&t.address, "a target needs at least one `address`");
        }
        let mut fixed = Vec::new();
        let mut hosts = Vec::new();
        for a in list {
            // A single string has no span of its own; point at the `address` value.
            let span = if a.span().is_empty() {
                t.address.span()
            } else {
                a.span()
            };
            let resolved = match Pattern::parse(a.get_ref()) {
                Ok(Pattern::Fixed(p)) => {
                    fixed.push(p);
                    vec![p]
                }
                // A name that does not resolve now is no error: the daemon starts (its
                // other targets protected), says so, and keeps looking it up.
                Ok(Pattern::Host(name)) => {
                    let (addrs, error) = match lookups {
                        Lookups::Skip => (Vec::new(), None),
                        Lookups::Resolve => match name.resolve() {
                            Ok(found) => (found, None),
                            Err(e) => (Vec::new(), Some(e.to_string())),
                        },
                    };
                    hosts.push(ResolvedHost {
                        name,
                        addrs: addrs.clone(),
                        error,
                    });
                    addrs
                }
                Err(e) => {
                    c.at_span(span, e.to_string());
                    continue;
                }
            };
            for p in &resolved {
                let key = (p.trie_prefix(), p.trie_key());
                if let Some(other) = patterns.insert(key, name.clone()) {
                    c.at_span(
                        span.clone(),
                        format!("`{p}` is already an address of target `{other}`"),
                    );
                }
            }
        }
        let pg = validate_pg(&mut c, t, raw.oidc.len());
        targets.push(Target {
            id: i as u32,
            name,
            protocol: *t.protocol.get_ref(),
            fixed,
            hosts,
            pg,
        });
    }

    let durability = match raw.store.durability.get_ref().as_str() {
        "commit" => Durability::Commit,
        "strict" => Durability::Strict,
        other => {
            c.at(
                &raw.store.durability,
                format!("`durability` is `commit` or `strict`, not `{other}`"),
            );
            Durability::Commit
        }
    };
    let metrics_listen = match raw.metrics.listen.get_ref().as_str() {
        "" => None,
        text => match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                c.at(
                    &raw.metrics.listen,
                    format!(
                        "`{text}` is not an address:port (e.g. `127.0.0.1:9477`; `\"\"` turns \
                         the endpoint off)"
                    ),
                );
                None
            }
        },
    };
    if *raw.store.queue.get_ref() < 16 {
        c.at(&raw.store.queue, "`queue` must be at least 16 records");
    }
    let mut webhooks = Vec::new();
    for w in &raw.webhooks {
        let url = w.url.get_ref();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            c.at(&w.url, format!("`{url}` is not an http:// or https:// URL"));
        }
        let format = match w.format.get_ref().as_str() {
            "json" => WebhookFormat::Json,
            "slack" => WebhookFormat::Slack,
            other => {
                c.at(
                    &w.format,
                    format!("`format` is `json` or `slack`, not `{other}`"),
                );
                WebhookFormat::Json
            }
        };
        for e in &w.events {
            if !WEBHOOK_EVENTS.contains(&e.get_ref().as_str()) {
                c.at(
                    e,
                    format!(
                        "unknown event `{}`; one of {}",
                        e.get_ref(),
                        WEBHOOK_EVENTS.join(", ")
                    ),
                );
            }
        }
        let secret = match (&w.secret_file, &w.secret_credential) {
            (None, None) => None,
            (Some(f), None) => Some(Secret::File(f.get_ref().clone())),
            (None, Some(n)) => Some(Secret::Credential(n.get_ref().clone())),
            (Some(f), Some(_)) => {
                c.at(
                    f,
                    "a webhook takes one of `secret_file` or `secret_credential`, not both",
                );
                None
            }
        };
        webhooks.push(Webhook {
            url: url.clone(),
            format,
            events: w.events.iter().map(|e| e.get_ref().clone()).collect(),
            timeout: w.timeout,
            secret,
        });
    }

    let oidc = oidc::validate(&mut c, &raw.oidc);
    let rescan_interval = interval(&mut c, &raw.ebpf.rescan_interval, "rescan_interval", false);
    let resolve_interval = interval(&mut c, &raw.ebpf.resolve_interval, "resolve_interval", true);
    let prune_interval = interval(&mut c, &raw.store.prune_interval, "prune_interval", false);
    let watch_interval = interval(&mut c, &raw.policy.watch_interval, "watch_interval", false);

    if (raw.daemon.tls_cert.is_some()) != (raw.daemon.tls_key.is_some()) {
        c.out.push(Diagnostic {
            location: None,
            path: src.path.clone(),
            message: "[daemon] needs both `tls_cert` and `tls_key`, or neither (one is generated)"
                .into(),
        });
    }
    if !c.out.is_empty() {
        return Err(ConfigError::Invalid(c.out));
    }
    let store_path = raw
        .store
        .path
        .clone()
        .unwrap_or_else(|| raw.daemon.state_dir.join("portcullis.db"));
    Ok(Config {
        path: None,
        daemon: DaemonConfig {
            state_dir: raw.daemon.state_dir,
            tls_cert: raw.daemon.tls_cert,
            tls_key: raw.daemon.tls_key,
        },
        proxy: ProxyConfig {
            listen_v4,
            listen_v6,
            upstream_mark: raw.proxy.upstream_mark.into_inner(),
            connect_timeout: raw.proxy.connect_timeout,
            max_connections: raw.proxy.max_connections.into_inner(),
            workers,
            drain_timeout: raw.proxy.drain_timeout,
        },
        ebpf: EbpfConfig {
            pin_path: raw.ebpf.pin_path.into_inner(),
            attach_cgroup,
            fail_mode: raw.ebpf.fail_mode,
            rescan_interval,
            resolve_interval,
            resolve_keep: raw.ebpf.resolve_keep,
        },
        admin: AdminConfig {
            socket: raw.admin.socket,
            auditors: raw.admin.auditors,
        },
        metrics_listen,
        store: StoreConfig {
            path: store_path,
            durability,
            queue: *raw.store.queue.get_ref(),
            recording_limit: raw.store.recording_limit,
            retention: raw.store.retention,
            prune_interval,
            redact_literals: raw.store.redact_literals,
        },
        webhooks,
        oidc,
        log: LogConfig {
            level: raw.log.level,
            format: raw.log.format,
            queue_bytes: raw.log.queue_bytes.into_inner(),
            when_full: raw.log.when_full,
        },
        policy: PolicyConfig {
            dir: policy_dir,
            default: policy_default,
            on_parse_error,
            approvers: raw.policy.approvers,
            approval_timeout: raw.policy.approval_timeout,
            watch_interval,
            cache_entries: raw.policy.cache_entries,
        },
        agents,
        targets,
    })
}

#[cfg(test)]
mod tests;
