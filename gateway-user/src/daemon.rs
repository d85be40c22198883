//! `portcullis run`: brings the pieces up in an order that never opens a gap, serves until
//! told to stop, reloads on SIGHUP.
//!
//! Start-up order:
//! 0. lock the state directory (one daemon per state directory: see `instance`);
//! 1. load the eBPF object, adopting pinned maps (a previous daemon's programs, if pinned,
//!    keep refusing protected connections meanwhile);
//! 2. bind the listeners (so the kernel has somewhere to send connections);
//! 3. fill the selection maps and the global configuration;
//! 4. attach and pin the programs, then drop the previous daemon's links;
//! 5. serve; log `ready`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::approvals::{Approvals, Service, webhook::Webhooks};
use crate::target_names::{Observed, Sightings, apply as apply_names};
use crate::{
    admin::{
        self, AdminError,
        authz::{Need, Peer},
        proto::{
            AgentStatus, ApprovalsView, Approved, HostStatus, PolicyStatus, Request, Response,
            SessionView, Status, StoreStatus, TargetStatus,
        },
    },
    cgroup::{CgroupError, Hierarchy},
    config::{Config, ConfigError},
    ebpf::{self, EbpfError, Kernel, Selection, selection::AgentBinding},
    policy::PolicyStore,
    protocol::{
        Engines,
        postgres::{PgShared, PostgresEngine},
        tcp::TcpEngine,
    },
    proxy::{self, Listeners, ProxyError, identity::Resolver},
    store::Store,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Instance(#[from] crate::instance::InstanceError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the connection workers: {0}")]
    Workers(std::io::Error),
    #[error("policies: {0}")]
    Policy(ConfigError),
    #[error("configuration {}: {finding}", path.display())]
    UnsafeConfig {
        path: std::path::PathBuf,
        finding: crate::config::trust::Finding,
    },
    #[error("postgres engine: {0}")]
    Postgres(crate::protocol::postgres::PgError),
    #[error("OIDC: {0}")]
    Oidc(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot serve metrics on {0}: {1} (set [metrics] listen, or \"\" to turn it off)")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// Everything the admin API and the background tasks need.
pub struct State {
    pub config: Arc<ArcSwap<Config>>,
    pub policy: Arc<PolicyStore>,
    pub kernel: Mutex<Kernel>,
    pub hierarchy: Hierarchy,
    pub proxy: Arc<proxy::Shared>,
    pub store: Arc<Store>,
    pub approvals: Arc<Approvals>,
    /// Trusted OIDC issuers (shared with the engines; replaced when a reload changes them).
    pub tokens: Arc<ArcSwap<crate::oidc::Validator>>,
    bindings: Mutex<Vec<AgentBinding>>,
    /// What target host names resolved to. Its lock is also the one under which the
    /// configuration is replaced (reload, re-resolution), so neither undoes the other.
    names: Mutex<Sightings>,
    /// The daemon's own endpoints (the metrics listener), closed to protected processes.
    endpoints: Mutex<Vec<std::net::SocketAddr>>,
    /// Local servers of targets' ports reachable where no target covers them.
    uncovered: Mutex<Vec<crate::tcp_listeners::Gap>>,
    started: Instant,
}

impl crate::metrics::http::Probe for State {
    fn snapshot(&self) -> crate::metrics::Snapshot {
        let p = self.proxy.status();
        let k = self
            .kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status();
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        crate::metrics::Snapshot {
            refused: vec![
                ("no_origin", p.refused_no_origin),
                ("no_target", p.refused_no_target),
                ("no_agent", p.refused_no_agent),
                ("store", p.refused_store),
            ],
            upstream_failures: p.upstream_failures,
            ebpf: k.counters,
            programs_attached: k.programs.len(),
            in_flight: k.in_flight,
            store: self.store.counters(),
            reloads_ok: self.policy.stats.ok.load(relaxed),
            reloads_failed: self.policy.stats.failed.load(relaxed),
            rules: self.policy.current().rules.len(),
            cached_decisions: self.policy.cached_decisions(),
            cached_shape_decisions: self.policy.cached_shape_decisions(),
            approvals_pending: self.approvals.pending().len(),
            grants: self.approvals.grants().len(),
            webhooks: self.approvals.webhook_counts(),
            ready: false,
            log_lines_dropped: crate::telemetry::batch::dropped_lines(),
        }
    }

    fn readiness(&self) -> Vec<(&'static str, Result<(), String>)> {
        let k = self
            .kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status();
        let programs = if k.programs.is_empty() {
            Err("no eBPF program is attached".to_owned())
        } else {
            Ok(())
        };
        let listeners = if self.proxy.accepting.is_cancelled() {
            Err("the proxy has stopped accepting (shutting down)".to_owned())
        } else if self.proxy.status().listeners.is_empty() {
            Err("no proxy listener".to_owned())
        } else {
            Ok(())
        };
        let policies = if self.policy.generation() > 0 {
            Ok(())
        } else {
            Err("no policy set loaded".to_owned())
        };
        vec![
            ("programs attached", programs),
            ("listeners up", listeners),
            ("store writable", self.store.probe_writable()),
            ("policies loaded", policies),
        ]
    }
}

impl State {
    /// The agent a caller is, by uid or by the cgroup its process runs in.
    pub fn agent_of(&self, uid: u32, cgroup: Option<&str>) -> Option<String> {
        let bindings = self.bindings.lock().unwrap_or_else(|e| e.into_inner());
        bindings
            .iter()
            .find(|b| {
                b.uids.contains(&uid)
                    || cgroup.is_some_and(|cg| {
                        b.cgroups
                            .iter()
                            .any(|(p, _)| crate::cgroup::is_within(cg, p))
                    })
            })
            .map(|b| b.agent.clone())
    }

    /// Approver groups anywhere in force: the default and every rule's.
    fn all_approvers(&self) -> Vec<String> {
        let mut v = self.config.load().policy.approvers.clone();
        for r in &self.policy.current().rules {
            if let crate::policy::model::Action::RequireApproval { approvers, .. } = &r.action {
                for a in approvers {
                    if !v.contains(a) {
                        v.push(a.clone());
                    }
                }
            }
        }
        v
    }

    pub async fn answer(&self, req: Request, peer: &Peer) -> Response {
        let auditors = self.config.load().admin.auditors.clone();
        let need = match &req {
            Request::Status => Need::Root,
            Request::Sessions(_)
            | Request::Session { .. }
            | Request::AuditVerify
            | Request::AuditExport { .. } => Need::Audit,
            Request::Approvals { .. } => Need::SeeApprovals,
            Request::Approve { .. } | Request::Deny { .. } => Need::Answer,
        };
        // Answers are checked against the request's own approver groups.
        let approvers = match &req {
            Request::Approve { id, .. } | Request::Deny { id, .. } => {
                match self.approvals.get(id) {
                    Some(p) if !p.approvers.is_empty() => p.approvers,
                    Some(_) => self.config.load().policy.approvers.clone(),
                    None => self.all_approvers(),
                }
            }
            _ => self.all_approvers(),
        };
        if let Err(e) = peer.may(need, &approvers, &auditors) {
            tracing::warn!(
                target: "portcullis::audit",
                op = req.op(),
                peer.uid = peer.uid,
                peer.pid = ?peer.pid,
                peer.name = %peer.name,
                "admin request refused"
            );
            return Response::err(e);
        }
        let answerer = crate::approvals::Answerer {
            uid: peer.uid,
            name: peer.name.clone(),
        };
        match req {
            Request::Status => Response::ok(&self.status()),
            Request::Approvals { history } => {
                let hist = if history {
                    match self.read(|c| crate::store::query::approvals(c, 200)).await {
                        Ok(h) => h,
                        Err(e) => return Response::err(e),
                    }
                } else {
                    Vec::new()
                };
                Response::ok(&ApprovalsView {
                    pending: self.approvals.pending(),
                    grants: self.approvals.grants(),
                    history: hist,
                })
            }
            Request::Approve { id, grant_for_secs } => {
                match self
                    .approvals
                    .approve(&id, &answerer, grant_for_secs.map(Duration::from_secs))
                    .await
                {
                    Ok(grant) => Response::ok(&Approved { id, grant }),
                    Err(e) => Response::err(e.to_string()),
                }
            }
            Request::Deny { id, reason } => {
                let reason = reason.unwrap_or_else(|| "denied".into());
                match self.approvals.deny(&id, &answerer, reason).await {
                    Ok(()) => Response::ok(&serde_json::json!({"id": id})),
                    Err(e) => Response::err(e.to_string()),
                }
            }
            Request::Sessions(f) => {
                match self
                    .read(move |c| crate::store::query::sessions(c, &f))
                    .await
                {
                    Ok(v) => Response::ok(&v),
                    Err(e) => Response::err(e),
                }
            }
            Request::Session {
                id,
                after_seq,
                limit,
            } => {
                let r = self
                    .read(move |c| {
                        let s = crate::store::query::session(c, id)?;
                        let recs = crate::store::query::session_records(c, id, after_seq, limit)?;
                        Ok((s, recs))
                    })
                    .await;
                match r {
                    Ok((Some(session), records)) => Response::ok(&SessionView { session, records }),
                    Ok((None, _)) => Response::err(format!("no session {id} in the store")),
                    Err(e) => Response::err(e),
                }
            }
            Request::AuditVerify => {
                // The head is taken before the flush, which commits at least everything up
                // to it; records appended meanwhile may follow it in the store.
                let head = self.store.head();
                if let Err(e) = self.store.flush().await {
                    return Response::err(format!("the store cannot be flushed: {e}"));
                }
                match self
                    .read(move |c| crate::store::query::verify(c, Some(head)))
                    .await
                {
                    Ok(v) => Response::ok(&v),
                    Err(e) => Response::err(e),
                }
            }
            Request::AuditExport {
                since_us,
                after_seq,
                limit,
            } => {
                match self
                    .read(move |c| {
                        crate::store::query::export(c, since_us, after_seq, limit.min(10_000))
                    })
                    .await
                {
                    Ok(v) => Response::ok(&v),
                    Err(e) => Response::err(e),
                }
            }
        }
    }

    /// A read on the store's reader connection, off the async threads, of everything
    /// recorded before it (a store that cannot write shows what it holds).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let _ = self.store.flush().await;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.read(f))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    fn status(&self) -> Status {
        let cfg = self.config.load();
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let set = self.policy.current();
        let policy = PolicyStatus {
            source: cfg
                .policy
                .dir
                .as_ref()
                .map_or_else(|| "<builtin>".to_owned(), |d| d.display().to_string()),
            files: set
                .sources
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            rules: set.rules.len(),
            generation: self.policy.generation(),
            reloads_ok: self
                .policy
                .stats
                .ok
                .load(std::sync::atomic::Ordering::Relaxed),
            reloads_failed: self
                .policy
                .stats
                .failed
                .load(std::sync::atomic::Ordering::Relaxed),
            cached_decisions: self.policy.cached_decisions(),
            cached_shape_decisions: self.policy.cached_shape_decisions(),
            default: set.default.as_str().to_owned(),
            on_parse_error: set.on_parse_error.as_str().to_owned(),
        };
        let kernel = self
            .kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status();
        let bindings = self
            .bindings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            config: cfg.path.as_ref().map_or_else(
                || "<embedded default>".to_owned(),
                |p| p.display().to_string(),
            ),
            uptime_secs: self.started.elapsed().as_secs(),
            policy,
            kernel,
            proxy: self.proxy.status(),
            store: StoreStatus {
                path: self.store.path().display().to_string(),
                durability: self.store.config().durability.as_str().to_owned(),
                head_seq: self.store.head().seq,
                counters: self.store.counters(),
            },
            agents: cfg
                .agents
                .iter()
                .map(|a| AgentStatus {
                    name: a.name.clone(),
                    selector: describe_selector(&a.selector),
                    binding: bindings
                        .iter()
                        .find(|b| b.agent == a.name)
                        .cloned()
                        .unwrap_or_default(),
                })
                .collect(),
            targets: cfg
                .targets
                .iter()
                .map(|t| TargetStatus {
                    name: t.name.clone(),
                    protocol: t.protocol.as_str().to_owned(),
                    addresses: t.addrs().map(ToString::to_string).collect(),
                    hosts: t
                        .hosts
                        .iter()
                        .map(|h| HostStatus {
                            name: h.name.to_string(),
                            addresses: h.addrs.iter().map(ToString::to_string).collect(),
                            error: names.failing(&h.name).map(str::to_owned),
                        })
                        .collect(),
                    token: t.pg.as_ref().and_then(|pg| match pg.token {
                        crate::config::TokenMode::Off => None,
                        crate::config::TokenMode::Optional => Some("optional".to_owned()),
                        crate::config::TokenMode::Required => Some("required".to_owned()),
                    }),
                })
                .collect(),
            oidc: self.tokens.load().status(),
            uncovered: self
                .uncovered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(crate::tcp_listeners::Gap::describe)
                .collect(),
        }
    }

    /// Re-resolves agent cgroups and rewrites the selection maps if anything changed (or
    /// `force`).
    pub fn resync(&self, force: bool) -> Result<(), EbpfError> {
        let cfg = self.config.load();
        let (mut sel, bindings) = Selection::build(&cfg, &self.hierarchy);
        // Last: where a target's pattern is the same, the endpoint's refusal wins.
        sel.targets.extend(ebpf::selection::daemon_entries(
            &self.endpoints.lock().unwrap_or_else(|e| e.into_inner()),
        ));
        let mut last = self.bindings.lock().unwrap_or_else(|e| e.into_inner());
        if !force && *last == bindings {
            return Ok(());
        }
        self.kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&sel)?;
        for b in &bindings {
            if !last.contains(b) {
                tracing::info!(
                    agent.name = %b.agent,
                    cgroups = ?b.cgroups,
                    uids = ?b.uids,
                    note = b.note.as_deref().unwrap_or(""),
                    "agent selection"
                );
                if let Some(e) = &b.escape {
                    tracing::warn!(agent.name = %b.agent, "agent's processes can leave its cgroup: {e}");
                }
            }
        }
        *last = bindings;
        Ok(())
    }

    /// SIGHUP: load the configuration file and its policies again. Both are validated
    /// before either is swapped in; on any error both stay as they were.
    fn reload(&self) {
        let current = self.config.load_full();
        let mut new = match &current.path {
            None => (*current).clone(),
            Some(path) => match Config::load(path) {
                Ok(_) if let Some(f) = crate::config::trust::check_config(path) => {
                    self.policy
                        .stats
                        .failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(
                        config = %path.display(),
                        result = "error",
                        error = %f,
                        "reload refused: the configuration file is not root's alone; the running configuration stays"
                    );
                    return;
                }
                Ok(mut c) => {
                    c.path = Some(path.clone());
                    c
                }
                Err(e) => {
                    self.policy
                        .stats
                        .failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    log_config_error(path, &e);
                    return;
                }
            },
        };
        for (what, changed) in restart_only_changes(&current, &new) {
            if changed {
                tracing::warn!(
                    setting = what,
                    "reload: this setting needs a restart; keeping the running value"
                );
            }
        }
        keep_restart_only(&current, &mut new);
        // New issuers are built first (a CA file that cannot be read fails the reload) and
        // take over only with the configuration and policies that go with them.
        let validator = if current.oidc == new.oidc {
            None
        } else {
            match crate::oidc::Validator::new(&new.oidc) {
                Ok(v) => Some(Arc::new(v)),
                Err(e) => {
                    self.policy
                        .stats
                        .failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(error = %e, result = "error", "reload failed: the new [[oidc]] settings cannot be used; the running configuration stays");
                    return;
                }
            }
        };
        if self.policy.reload(&new).is_err() {
            // Logged and counted by the store; the configuration stays with its policies.
            return;
        }
        if let Some(v) = validator {
            prefetch_keys(&v);
            self.tokens.store(v);
            tracing::info!(
                issuers = new.oidc.len(),
                "reload: OIDC issuers replaced (their keys are fetched again)"
            );
        }
        warn_unresolved(&new);
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        // What the names resolved to before stays for `resolve_keep`, as between reloads.
        names.observe_config(&new, Instant::now());
        names.retain(&new, new.ebpf.resolve_keep.get());
        let (followed, changes) = apply_names(&new, &names, new.ebpf.resolve_keep.get());
        log_name_changes(&changes);
        self.config.store(Arc::new(followed.unwrap_or(new)));
        drop(names);
        match self.resync(true) {
            Ok(()) => tracing::info!(result = "ok", "configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, result = "error", "reload: updating the kernel maps failed")
            }
        }
    }

    /// The policy directory changed: reload the policies against the running configuration.
    fn reload_policies(&self) {
        let cfg = self.config.load_full();
        let _ = self.policy.reload(&cfg);
    }
}

fn log_config_error(path: &std::path::Path, e: &ConfigError) {
    tracing::error!(
        config = %path.display(),
        result = "error",
        error = %e,
        "reload failed; the running configuration stays"
    );
}

fn restart_only_changes(a: &Config, b: &Config) -> [(&'static str, bool); 11] {
    [
        (
            "proxy.listen",
            a.proxy.listen_v4 != b.proxy.listen_v4 || a.proxy.listen_v6 != b.proxy.listen_v6,
        ),
        (
            "proxy.max_connections",
            a.proxy.max_connections != b.proxy.max_connections,
        ),
        ("proxy.workers", a.proxy.workers != b.proxy.workers),
        ("ebpf.pin_path", a.ebpf.pin_path != b.ebpf.pin_path),
        (
            "ebpf.attach_cgroup",
            a.ebpf.attach_cgroup != b.ebpf.attach_cgroup,
        ),
        ("ebpf.fail_mode", a.ebpf.fail_mode != b.ebpf.fail_mode),
        ("admin.socket", a.admin.socket != b.admin.socket),
        ("metrics.listen", a.metrics_listen != b.metrics_listen),
        (
            "store (except retention and prune_interval)",
            a.store.path != b.store.path
                || a.store.durability != b.store.durability
                || a.store.queue != b.store.queue
                || a.store.recording_limit != b.store.recording_limit
                || a.store.redact_literals != b.store.redact_literals,
        ),
        ("webhook", a.webhooks != b.webhooks),
        (
            "policy.approval_timeout",
            a.policy.approval_timeout != b.policy.approval_timeout,
        ),
    ]
}

fn keep_restart_only(running: &Config, new: &mut Config) {
    new.proxy.listen_v4 = running.proxy.listen_v4;
    new.proxy.listen_v6 = running.proxy.listen_v6;
    new.proxy.max_connections = running.proxy.max_connections;
    new.proxy.workers = running.proxy.workers;
    new.ebpf.pin_path = running.ebpf.pin_path.clone();
    new.ebpf.attach_cgroup = running.ebpf.attach_cgroup.clone();
    new.ebpf.fail_mode = running.ebpf.fail_mode;
    new.admin.socket = running.admin.socket.clone();
    new.metrics_listen = running.metrics_listen;
    let (retention, prune_interval) = (new.store.retention, new.store.prune_interval);
    new.store = running.store.clone();
    new.store.retention = retention;
    new.store.prune_interval = prune_interval;
    new.webhooks = running.webhooks.clone();
    new.policy.approval_timeout = running.policy.approval_timeout;
}

/// Fetches the issuers' keys in the background, so the first token does not wait for them.
fn prefetch_keys(v: &Arc<crate::oidc::Validator>) {
    if !v.is_empty() {
        let v = v.clone();
        tokio::spawn(async move { v.prefetch().await });
    }
}

/// One line describing an agent's selector.
pub fn describe_selector(s: &crate::config::AgentSelector) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &s.cgroup {
        parts.push(format!("cgroup={c}"));
    }
    if let Some(u) = &s.unit {
        parts.push(format!("unit={u}"));
    }
    match (&s.user, s.uid) {
        (Some(user), Some(uid)) => parts.push(format!("user={user}({uid})")),
        (None, Some(uid)) => parts.push(format!("uid={uid}")),
        _ => {}
    }
    if let Some(e) = &s.exe {
        parts.push(format!("exe={}", e.display()));
    }
    parts.join(" ")
}

/// Lets the process hold many sockets (two per proxied connection).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer to an initialised rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    if let Some(path) = &cfg.path
        && let Some(f) = crate::config::trust::check_config(path)
    {
        return Err(DaemonError::UnsafeConfig {
            path: path.clone(),
            finding: f,
        });
    }
    let _instance = crate::instance::lock(&cfg.daemon.state_dir)?;
    raise_nofile();
    let hierarchy = Hierarchy::discover()?;
    let mut kernel = Kernel::load(&cfg)?;
    let listeners = Listeners::bind(&cfg.proxy)?;
    let (v4, v6) = listeners.addrs();
    kernel.set_proxy(v4, v6, cfg.proxy.upstream_mark, ebpf::own_netns_cookie()?);
    let conns = kernel.conn_table()?;
    let policy = Arc::new(PolicyStore::open(&cfg).map_err(DaemonError::Policy)?);
    let admin_listener = admin::bind(&cfg.admin.socket)?;
    let config = Arc::new(ArcSwap::from_pointee(cfg.clone()));
    let shutdown = CancellationToken::new();
    let store = Store::open(&cfg.store)?;
    let approvals = Approvals::new(
        store.clone(),
        Webhooks::start(cfg.webhooks.clone()),
        cfg.policy.approval_timeout.get(),
    );
    let validator = Arc::new(crate::oidc::Validator::new(&cfg.oidc).map_err(DaemonError::Oidc)?);
    prefetch_keys(&validator);
    let tokens = Arc::new(ArcSwap::new(validator));
    let pg = PgShared::new(
        &cfg.daemon,
        policy.clone(),
        Arc::new(Service(approvals.clone())),
        store.clone(),
        tokens.clone(),
    )
    .map_err(DaemonError::Postgres)?;
    let engines = Engines {
        tcp: Arc::new(TcpEngine),
        postgres: Arc::new(PostgresEngine {
            shared: Arc::new(pg),
        }),
    };
    let shared = Arc::new(proxy::Shared::new(
        config.clone(),
        conns,
        Resolver::system(Some(hierarchy.clone())),
        &listeners,
        engines,
        store.clone(),
        shutdown.child_token(),
    ));
    let state = Arc::new(State {
        config,
        policy,
        store: store.clone(),
        approvals,
        tokens,
        kernel: Mutex::new(kernel),
        hierarchy: hierarchy.clone(),
        proxy: shared.clone(),
        bindings: Mutex::new(Vec::new()),
        names: Mutex::new(Sightings::default()),
        endpoints: Mutex::new(Vec::new()),
        uncovered: Mutex::new(Vec::new()),
        started: Instant::now(),
    });
    state
        .names
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .observe_config(&cfg, Instant::now());
    warn_unresolved(&cfg);
    state.resync(true)?;
    state
        .kernel
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .attach(&hierarchy, &cfg.ebpf.attach_cgroup)?;

    proxy::spawn(listeners, shared.clone(), cfg.proxy.workers).map_err(DaemonError::Workers)?;
    tokio::spawn(admin::serve(
        admin_listener,
        state.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(rescan(state.clone(), shutdown.clone()));
    tokio::spawn(follow_target_names(state.clone(), shutdown.clone()));
    tokio::spawn(watch_policies(state.clone(), shutdown.clone()));
    tokio::spawn(prune_old_sessions(state.clone(), shutdown.clone()));

    let metrics_addr = match cfg.metrics_listen {
        Some(addr) => Some(
            crate::metrics::http::serve(addr, state.clone())
                .map_err(|e| DaemonError::Metrics(addr, e))?,
        ),
        None => None,
    };
    if let Some(a) = metrics_addr {
        *state.endpoints.lock().unwrap_or_else(|e| e.into_inner()) = vec![a];
        state.resync(true)?;
    }
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let show = |a: Option<String>| a.unwrap_or_default();
    tracing::info!(
        pid = std::process::id(),
        listen.v4 = %show(v4.map(|a| a.to_string())),
        listen.v6 = %show(v6.map(|a| a.to_string())),
        admin.socket = %cfg.admin.socket.display(),
        metrics = %show(metrics_addr.map(|a| a.to_string())),
        "ready"
    );
    crate::sdnotify::ready("protecting");
    // A way around the gate (see unix_sockets.rs): connects by the socket's name are
    // refused when the kernel has the hook, links to it are not.
    let guarded = *state
        .kernel
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unix_guard()
        == ebpf::UnixGuard::Active;
    for e in crate::unix_sockets::scan(&cfg) {
        if e.exposed(guarded) {
            tracing::warn!(
                target.name = %e.target,
                path = %e.path,
                fix = e.fix(),
                "{}",
                e.describe(guarded)
            );
        }
    }
    tokio::spawn(watch_listeners(state.clone(), shutdown.clone()));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                crate::sdnotify::reloading();
                state.reload();
                crate::sdnotify::ready("protecting");
            }
        }
    }
    crate::sdnotify::stopping();
    drain(&state, &shutdown, cfg.proxy.drain_timeout.get()).await;
    let _ = std::fs::remove_file(&cfg.admin.socket);
    let s = store.clone();
    let _ = tokio::task::spawn_blocking(move || s.close()).await;
    tracing::info!(
        fail_mode = ?cfg.ebpf.fail_mode,
        "stopped; pinned programs stay attached (fail-closed) unless fail_mode is open"
    );
    Ok(())
}

/// Stops accepting, lets open sessions finish up to `deadline`, then ends the rest.
async fn drain(state: &State, shutdown: &CancellationToken, deadline: Duration) {
    let tasks = &state.proxy.tasks;
    tasks.close();
    state.proxy.accepting.cancel();
    let open = tasks.len();
    tracing::info!(sessions = open, deadline = ?deadline, "stopping: draining sessions");
    if tokio::time::timeout(deadline, tasks.wait()).await.is_err() {
        tracing::warn!(
            sessions = tasks.len(),
            "drain deadline passed; closing the rest"
        );
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    }
    shutdown.cancel();
}

/// Polls the policy directory (names, sizes, modification times) and reloads on change.
/// Polling, not inotify: it also sees files replaced through symlinks (ConfigMaps) and
/// costs a directory listing per interval.
async fn watch_policies(state: Arc<State>, shutdown: CancellationToken) {
    let mut last = crate::policy::store::fingerprint(&state.config.load());
    loop {
        let every = state.config.load().policy.watch_interval.get();
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let now = crate::policy::store::fingerprint(&state.config.load());
        if now != last {
            tracing::info!("policy files changed");
            state.reload_policies();
            last = now;
        }
    }
}

/// Removes sessions that ended longer ago than `[store] retention`, every
/// `prune_interval` (the first time one interval after start).
async fn prune_old_sessions(state: Arc<State>, shutdown: CancellationToken) {
    loop {
        let every = state.config.load().store.prune_interval.get();
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let Some(keep) = state.config.load().store.retention else {
            continue;
        };
        let before = crate::store::now_us() - keep.get().as_micros() as i64;
        match state.store.prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                target: "portcullis::audit",
                records = n,
                retention = %humantime::format_duration(keep.get()),
                "pruned sessions past retention"
            ),
            Err(e) => tracing::error!(error = %e, "pruning old sessions failed"),
        }
    }
}

/// Says which target host names did not resolve when the configuration loaded.
fn warn_unresolved(cfg: &Config) {
    for w in cfg.warnings() {
        tracing::warn!("{w} (looked up again every resolve_interval)");
    }
}

fn log_name_changes(changes: &[crate::target_names::Change]) {
    use crate::target_names::Change;
    for c in changes {
        match c {
            Change::Added { target, name, addr } => tracing::info!(
                target.name = %target, host = %name, address = %addr,
                "target address added: the host name resolves to it"
            ),
            Change::Dropped { target, name, addr } => tracing::info!(
                target.name = %target, host = %name, address = %addr,
                "target address dropped: the host name has not resolved to it for resolve_keep"
            ),
            Change::Claimed {
                target,
                name,
                addr,
                by,
            } => tracing::warn!(
                target.name = %target, host = %name, address = %addr, owner = %by,
                "the host name resolves to an address of another target; it stays that target's"
            ),
        }
    }
}

/// Looks the target host names up again every `resolve_interval` and writes what they
/// resolve to into the configuration and the kernel's target map (see `target_names`).
async fn follow_target_names(state: Arc<State>, shutdown: CancellationToken) {
    // Claims are logged once per (target, address), not at every round.
    let mut claimed = std::collections::HashSet::new();
    loop {
        let every = state.config.load().ebpf.resolve_interval.get();
        // `0s` turns it off; a reload may turn it on again.
        let wait = if every.is_zero() {
            Duration::from_secs(1)
        } else {
            every
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        if every.is_zero() {
            continue;
        }
        let cfg = state.config.load_full();
        let mut names: Vec<crate::config::HostPort> = cfg
            .targets
            .iter()
            .flat_map(|t| t.hosts.iter().map(|h| h.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            continue;
        }
        let mut results = Vec::with_capacity(names.len());
        for name in names {
            let r = lookup(&name).await;
            let m = &crate::metrics::get().target_lookups;
            m.with_label_values(&[if r.is_ok() { "ok" } else { "error" }])
                .inc();
            results.push((name, r));
        }
        let mut seen = state.names.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for (name, r) in results {
            let why = r.as_ref().err().cloned();
            match seen.observe(&name, r, now) {
                Observed::Failed => tracing::warn!(
                    host = %name, error = why.as_deref().unwrap_or(""),
                    "a target's host name no longer resolves: its addresses stay, and new ones \
                     are not followed, until it does"
                ),
                Observed::Recovered => {
                    tracing::info!(host = %name, "a target's host name resolves again");
                }
                Observed::Ok | Observed::StillFailing => {}
            }
        }
        // The configuration now (a reload may have replaced the one looked at above).
        let cfg = state.config.load_full();
        let keep = cfg.ebpf.resolve_keep.get();
        seen.retain(&cfg, keep);
        let (next, mut changes) = apply_names(&cfg, &seen, keep);
        changes.retain(|c| match c {
            crate::target_names::Change::Claimed { target, addr, .. } => {
                claimed.insert((target.clone(), *addr))
            }
            _ => true,
        });
        log_name_changes(&changes);
        let Some(next) = next else {
            continue;
        };
        state.config.store(Arc::new(next));
        drop(seen);
        if let Err(e) = state.resync(true) {
            tracing::error!(error = %e, "writing target addresses to the kernel failed");
        }
    }
}

/// One lookup through the system resolver, at most 5 s.
async fn lookup(name: &crate::config::HostPort) -> Result<Vec<crate::config::TargetAddr>, String> {
    let found = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((name.host.as_str(), name.port)),
    )
    .await
    .map_err(|_| "the lookup took longer than 5 s".to_owned())?
    .map_err(|e| e.to_string())?;
    name.addresses(found.map(|sa| sa.ip()))
        .map_err(|e| e.to_string())
}

/// How often local servers are checked for addresses no target covers.
const LISTENER_SCAN: Duration = Duration::from_secs(30);

/// Another way around the gate (see `tcp_listeners.rs`): a local server of a target's port
/// reachable at an address no target names. Checked at start and every [`LISTENER_SCAN`]
/// (a server restarts with other addresses, a target changes): each new one is a warning,
/// each closed one a note, the number now a gauge and `status` lists them.
async fn watch_listeners(state: Arc<State>, shutdown: CancellationToken) {
    loop {
        let cfg = state.config.load_full();
        let now = tokio::task::spawn_blocking(move || crate::tcp_listeners::scan(&cfg))
            .await
            .unwrap_or_default();
        note_uncovered(&state, now);
        tokio::select! {
            () = tokio::time::sleep(LISTENER_SCAN) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Logs what changed since the last scan, and keeps `now` for `status` and the gauge.
fn note_uncovered(state: &State, now: Vec<crate::tcp_listeners::Gap>) {
    let mut known = state.uncovered.lock().unwrap_or_else(|e| e.into_inner());
    for g in now.iter().filter(|g| !known.contains(g)) {
        tracing::warn!(
            target.name = %g.target,
            listener = %g.listener,
            address = %g.reachable,
            fix = crate::tcp_listeners::FIX,
            "{}",
            g.describe()
        );
    }
    for g in known.iter().filter(|g| !now.contains(g)) {
        tracing::info!(
            target.name = %g.target,
            listener = %g.listener,
            address = %g.reachable,
            "no longer a way around the gate: the server stopped listening there, or a \
             target covers it"
        );
    }
    crate::metrics::get()
        .uncovered_addresses
        .set(i64::try_from(now.len()).unwrap_or(i64::MAX));
    *known = now;
}

async fn rescan(state: Arc<State>, shutdown: CancellationToken) {
    loop {
        let every = state.config.load().ebpf.rescan_interval.get();
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = state.resync(false) {
            tracing::error!(error = %e, "updating agent selection failed");
        }
    }
}
