//! The proxy: loopback listeners that redirected connections land on, and for each accepted
//! connection: take its origin from the kernel, resolve who opened it, find its agent and
//! target, hand it to the target's protocol engine, and record how it went.
//!
//! A connection the kernel did not record (someone connected to the listener directly), or
//! that matches no agent or target, is refused: closed with a reset, and logged.

pub mod agent;
pub mod cmdline;
pub mod identity;
pub mod relay;
pub mod upstream;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use gateway_common::{Origin, ipv4_unmapped};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{identity::Resolver, upstream::Upstream};
use crate::{
    config::{Config, ProxyConfig},
    ebpf::ConnTable,
    protocol::{ConnContext, Engines, Outcome, Session, Traffic},
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The proxy's listening sockets, one per family: the first connection worker's. They are
/// registered with a runtime only by that worker.
pub struct Listeners {
    pub v4: Option<std::net::TcpListener>,
    pub v6: Option<std::net::TcpListener>,
}

/// A non-blocking listening socket on `addr`, in the address's `SO_REUSEPORT` group.
fn listen(addr: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    let err = |source| ProxyError::Bind { addr, source };
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )
    .map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    s.bind(&addr.into()).map_err(err)?;
    s.listen(4096).map_err(err)?;
    Ok(s.into())
}

impl Listeners {
    /// Binds the configured addresses. An IPv6 listener that cannot bind because the host
    /// has no IPv6 loopback is skipped with a warning (IPv6 connects to targets then fail,
    /// closed); any other failure is an error.
    pub fn bind(cfg: &ProxyConfig) -> Result<Self, ProxyError> {
        let v4 = cfg.listen_v4.map(listen).transpose()?;
        let v6 = match cfg.listen_v6.map(listen).transpose() {
            Ok(l) => l,
            Err(ProxyError::Bind { addr, source })
                if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) && v4.is_some() =>
            {
                tracing::warn!(%addr, error = %source, "no IPv6 loopback; IPv6 listener skipped");
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Self { v4, v6 })
    }

    /// The bound addresses (with the real ports when port 0 was asked for).
    pub fn addrs(&self) -> (Option<SocketAddrV4>, Option<SocketAddrV6>) {
        let v4 = self.v4.as_ref().and_then(|l| match l.local_addr() {
            Ok(SocketAddr::V4(a)) => Some(a),
            _ => None,
        });
        let v6 = self.v6.as_ref().and_then(|l| match l.local_addr() {
            Ok(SocketAddr::V6(a)) => Some(a),
            _ => None,
        });
        (v4, v6)
    }
}

/// Counters of the proxy, for `portcullis status` (and metrics).
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub refused_no_origin: AtomicU64,
    pub refused_no_target: AtomicU64,
    pub refused_no_agent: AtomicU64,
    pub refused_store: AtomicU64,
    pub upstream_failures: AtomicU64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub listeners: Vec<SocketAddr>,
    pub accepted: u64,
    pub active: u64,
    pub refused_no_origin: u64,
    pub refused_no_target: u64,
    pub refused_no_agent: u64,
    #[serde(default)]
    pub refused_store: u64,
    pub upstream_failures: u64,
    /// Connection worker threads.
    #[serde(default)]
    pub workers: usize,
}

/// State shared by every connection task.
pub struct Shared {
    pub config: Arc<ArcSwap<Config>>,
    pub conns: ConnTable,
    pub resolver: Resolver,
    pub stats: ProxyStats,
    /// Cancelled to stop accepting (first step of a graceful stop).
    pub accepting: CancellationToken,
    /// Cancelled to end open sessions (after the drain deadline).
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub engines: Engines,
    pub store: Arc<crate::store::Store>,
    limiter: Arc<Semaphore>,
    next_id: AtomicU64,
    listeners: Vec<SocketAddr>,
}

impl Shared {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        conns: ConnTable,
        resolver: Resolver,
        listeners: &Listeners,
        engines: Engines,
        store: Arc<crate::store::Store>,
        shutdown: CancellationToken,
    ) -> Self {
        let max = config.load().proxy.max_connections;
        let (v4, v6) = listeners.addrs();
        let listeners = v4
            .map(SocketAddr::V4)
            .into_iter()
            .chain(v6.map(SocketAddr::V6))
            .collect();
        Self {
            config,
            conns,
            resolver,
            stats: ProxyStats::default(),
            accepting: CancellationToken::new(),
            shutdown,
            tasks: TaskTracker::new(),
            engines,
            store,
            limiter: Arc::new(Semaphore::new(max)),
            next_id: AtomicU64::new(1),
            listeners,
        }
    }

    pub fn status(&self) -> ProxyStatus {
        let s = &self.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProxyStatus {
            listeners: self.listeners.clone(),
            accepted: l(&s.accepted),
            active: l(&s.active),
            refused_no_origin: l(&s.refused_no_origin),
            refused_no_target: l(&s.refused_no_target),
            refused_no_agent: l(&s.refused_no_agent),
            refused_store: l(&s.refused_store),
            upstream_failures: l(&s.upstream_failures),
            workers: self.config.load().proxy.workers,
        }
    }
}

/// Starts `workers` connection workers.
///
/// Each worker is a thread with a single-threaded runtime and a listening socket of its own
/// per family, all bound to the same address with `SO_REUSEPORT`: the kernel hands each
/// new connection to one worker (by a hash of its addresses), so none is woken for a
/// connection another takes, however many there are. A worker serves what it accepted on
/// its own thread to the end: a statement's request, decision, record and answer never
/// cross threads, and no worker wakes another. The control plane (admin API, approvals,
/// webhooks, reloads) stays on the main runtime.
pub fn spawn(listeners: Listeners, shared: Arc<Shared>, workers: usize) -> std::io::Result<()> {
    let first: Vec<_> = [listeners.v4, listeners.v6].into_iter().flatten().collect();
    // The bound addresses, with the ports the kernel chose for port 0.
    let addrs = first
        .iter()
        .map(std::net::TcpListener::local_addr)
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut first = Some(first);
    for i in 0..workers.max(1) {
        let mine = match first.take() {
            Some(socks) => socks,
            None => addrs
                .iter()
                .map(|a| listen(*a).map_err(std::io::Error::other))
                .collect::<std::io::Result<Vec<_>>>()?,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("portcullis-conn{i}"))
            .spawn(move || rt.block_on(worker(mine, shared)))?;
    }
    Ok(())
}

/// One connection worker: accept until told to stop, then wait for every session (its own
/// and the other workers') to end, so the runtime its sessions run on outlives them.
async fn worker(listeners: Vec<std::net::TcpListener>, shared: Arc<Shared>) {
    for l in listeners {
        match TcpListener::from_std(l) {
            Ok(l) => {
                tokio::spawn(accept_loop(l, shared.clone()));
            }
            Err(e) => tracing::error!(error = %e, "connection worker: cannot register a listener"),
        }
    }
    shared.accepting.cancelled().await;
    shared.tasks.wait().await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shared.accepting.cancelled() => return,
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        // Taken now, before any wait for a slot: a client that gives up while its
        // connection waits closes its socket, and the kernel would remove the entry with it,
        // so the connection would then look like one made to the proxy directly.
        let origin = shared.conns.take(peer);
        // At `max_connections` this loop holds the one connection it accepted until a
        // session ends, and accepts no more: the rest wait in the listen backlog. (Waiting
        // for capacity before accepting would let a loop hold the last permit while its own
        // listener stays idle and the other's backlog fills.)
        let permit = tokio::select! {
            // A free slot is taken even if a stop has just begun (the session then drains).
            biased;
            p = shared.limiter.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shared.accepting.cancelled() => {
                refuse(&client);
                return;
            }
        };
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            handle(&shared2, client, peer, origin).await;
            drop(permit);
        });
    }
}

/// The original destination recorded by the kernel.
pub fn original_dst(o: &Origin) -> SocketAddr {
    match ipv4_unmapped(&o.dst_addr) {
        Some(v4) => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(v4)), o.dst_port),
        None => SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o.dst_addr)), o.dst_port),
    }
}

fn refuse(client: &tokio::net::TcpStream) {
    relay::reset(client);
}

async fn handle(
    shared: &Shared,
    client: tokio::net::TcpStream,
    peer: SocketAddr,
    origin: std::io::Result<Option<Origin>>,
) {
    let stats = &shared.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    let origin = match origin {
        Ok(Some(o)) => o,
        // A client that reset its connection while it waited in the listen backlog: the
        // kernel removed the entry with the socket. Not a connection that bypassed the
        // redirect, so not counted or reported as one.
        Ok(None) if matches!(client.take_error(), Ok(Some(_))) => {
            tracing::info!(
                target: "portcullis::audit",
                end = "client_gone",
                client.addr = %peer,
                "connection dropped: the client reset it before the proxy took it"
            );
            return;
        }
        Ok(None) => {
            stats.refused_no_origin.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target: "portcullis::audit",
                end = "refused",
                reason = "no_origin",
                client.addr = %peer,
                "connection refused: not redirected by the kernel (direct connection to the proxy?)"
            );
            refuse(&client);
            return;
        }
        Err(e) => {
            stats.refused_no_origin.fetch_add(1, Ordering::Relaxed);
            tracing::error!(client.addr = %peer, error = %e, "reading the connection map failed");
            refuse(&client);
            return;
        }
    };
    let started = Instant::now();
    let cfg = shared.config.load_full();
    let dst = original_dst(&origin);
    let identity = shared.resolver.resolve(&origin);
    let Some(target) = cfg.target_for(dst) else {
        stats.refused_no_target.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target: "portcullis::audit",
            end = "refused",
            reason = "no_target",
            client.addr = %peer,
            dst.addr = %dst,
            src.pid = identity.pid,
            src.uid = identity.uid,
            "connection refused: destination is no longer a configured target"
        );
        refuse(&client);
        return;
    };
    let Some(agent) = agent::identify(&cfg, &identity, &origin) else {
        stats.refused_no_agent.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target: "portcullis::audit",
            end = "refused",
            reason = "no_agent",
            client.addr = %peer,
            dst.addr = %dst,
            target.name = %target.name,
            src.pid = identity.pid,
            src.uid = identity.uid,
            src.exe = ?identity.exe,
            src.cgroup = ?identity.cgroup,
            "connection refused: the kernel selected this process but no agent fully matches it"
        );
        refuse(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let session = shared.store.next_session_id();
    if let Err(e) = shared.store.append(session_start(
        session,
        &agent.name,
        target,
        &identity,
        peer,
        dst,
    )) {
        stats.refused_store.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            target: "portcullis::audit",
            end = "refused",
            reason = "store",
            error = %e,
            agent.name = %agent.name,
            target.name = %target.name,
            "connection refused: the audit store cannot record it"
        );
        refuse(&client);
        return;
    }
    let ctx = Arc::new(ConnContext {
        id: shared.next_id.fetch_add(1, Ordering::Relaxed),
        session,
        agent: agent.clone(),
        target: target.clone(),
        identity,
        client_addr: peer,
        original_dst: dst,
        started: SystemTime::now(),
    });
    let traffic = Arc::new(Traffic::default());
    let session = Session {
        client,
        ctx: ctx.clone(),
        upstream: Upstream {
            addr: dst,
            mark: cfg.proxy.upstream_mark,
            timeout: cfg.proxy.connect_timeout.get(),
            target: Some(target.name.clone()),
        },
        traffic: traffic.clone(),
        shutdown: shared.shutdown.clone(),
    };
    stats.active.fetch_add(1, Ordering::Relaxed);
    let labels = [
        agent.name.as_str(),
        target.name.as_str(),
        target.protocol.as_str(),
    ];
    let m = crate::metrics::get();
    m.connections.with_label_values(&labels).inc();
    let active = m.connections_active.with_label_values(&labels);
    active.inc();
    let outcome = shared.engines.get(target.protocol).serve(session).await;
    active.dec();
    stats.active.fetch_sub(1, Ordering::Relaxed);
    if outcome.end == crate::protocol::End::UpstreamUnreachable {
        stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
    }
    record(&ctx, &traffic, &outcome, started);
    let (up, down) = traffic.snapshot();
    let body = session_end(&outcome, up, down, started.elapsed());
    if let Err(e) = shared.store.append(crate::store::Append {
        session: ctx.session,
        kind: "session_end",
        body,
        at_us: crate::store::now_us(),
    }) {
        tracing::error!(session = ctx.session, error = %e, "cannot record the end of a session");
    }
}

/// The last record of a session: how it ended, bytes each way, how long it lasted.
fn session_end(outcome: &Outcome, up: u64, down: u64, took: Duration) -> crate::store::Json {
    // Serialized straight from borrowed fields, keys in alphabetical order (the order the
    // records always had).
    #[derive(serde::Serialize)]
    struct Body<'a> {
        bytes_down: u64,
        bytes_up: u64,
        duration_ms: f64,
        end: &'a str,
        error: Option<&'a str>,
    }
    crate::store::Json::of(&Body {
        bytes_down: down,
        bytes_up: up,
        duration_ms: took.as_secs_f64() * 1000.0,
        end: outcome.end.as_str(),
        error: outcome.detail.as_deref(),
    })
}

/// The first record of a session: who, from where, to what.
fn session_start(
    session: i64,
    agent: &str,
    target: &crate::config::Target,
    who: &identity::Identity,
    peer: SocketAddr,
    dst: SocketAddr,
) -> crate::store::Append {
    /// The record's body, serialized straight from borrowed fields; keys in sorted order
    /// (the text records written through `serde_json::Value` had).
    #[derive(serde::Serialize)]
    struct Body<'a> {
        agent: &'a str,
        cgroup: &'a Option<String>,
        client: Shown<SocketAddr>,
        cmdline: &'a [String],
        comm: &'a str,
        container: &'a Option<String>,
        dst: Shown<SocketAddr>,
        exe: Option<Shown<std::path::Display<'a>>>,
        gid: u32,
        pid: u32,
        protocol: &'a str,
        target: &'a str,
        uid: u32,
        unit: &'a Option<String>,
        user: &'a Option<String>,
    }
    crate::store::Append {
        session,
        kind: "session_start",
        body: crate::store::Json::of(&Body {
            agent,
            cgroup: &who.cgroup,
            client: Shown(peer),
            cmdline: &who.cmdline,
            comm: &who.comm,
            container: &who.cgroup_info.container_id,
            dst: Shown(dst),
            exe: who.exe.as_ref().map(|p| Shown(p.display())),
            gid: who.gid,
            pid: who.pid,
            protocol: target.protocol.as_str(),
            target: &target.name,
            uid: who.uid,
            unit: &who.cgroup_info.unit,
            user: &who.user,
        }),
        at_us: crate::store::now_us(),
    }
}

/// A field serialized as the string its `Display` writes, without an intermediate `String`.
struct Shown<T>(T);

impl<T: std::fmt::Display> serde::Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// The connection record: one structured event per connection, under the audit target.
fn record(ctx: &ConnContext, traffic: &Traffic, outcome: &Outcome, started: Instant) {
    let (up, down) = traffic.snapshot();
    let who = &ctx.identity;
    tracing::info!(
        target: "portcullis::audit",
        protocol = ctx.target.protocol.as_str(),
        conn.id = ctx.id,
        agent.name = %ctx.agent.name,
        target.name = %ctx.target.name,
        src.pid = who.pid,
        src.tid = who.tid,
        src.uid = who.uid,
        src.gid = who.gid,
        src.user = who.user.as_deref().unwrap_or(""),
        src.comm = %who.comm,
        src.exe = %who.exe.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
        src.cmdline = ?who.cmdline,
        src.cgroup = who.cgroup.as_deref().unwrap_or(""),
        src.cgroup_id = who.cgroup_id,
        src.unit = who.cgroup_info.unit.as_deref().unwrap_or(""),
        src.slice = who.cgroup_info.slice.as_deref().unwrap_or(""),
        src.container = who.cgroup_info.container_id.as_deref().unwrap_or(""),
        src.process = ?who.process,
        client.addr = %ctx.client_addr,
        dst.addr = %ctx.original_dst,
        bytes.up = up,
        bytes.down = down,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        end = outcome.end.as_str(),
        error = outcome.detail.as_deref().unwrap_or(""),
        "connection"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::CgroupInfo;
    use identity::{Identity, ProcessState};

    /// The session record's text is hashed into the audit chain and parsed by the writer and
    /// `replay`: serializing it from borrowed fields must give exactly the text the
    /// `serde_json::Value` form gave (same keys, sorted, same values).
    #[test]
    fn session_start_body_is_the_sorted_json_object() {
        let who = Identity {
            pid: 4242,
            tid: 4243,
            uid: 1000,
            gid: 100,
            user: Some("alice".into()),
            comm: "psql".into(),
            exe: Some("/usr/bin/psql \"x\"".into()),
            cmdline: vec!["psql".into(), "-c".into(), "select 'é'".into()],
            cgroup_id: 7,
            cgroup: Some("/system.slice/agent.service".into()),
            cgroup_info: CgroupInfo {
                unit: Some("agent.service".into()),
                ..CgroupInfo::default()
            },
            netns_cookie: 1,
            process: ProcessState::Verified,
        };
        let target = crate::config::Target {
            id: 0,
            name: "db".into(),
            protocol: crate::config::Protocol::Postgres,
            fixed: vec![],
            hosts: vec![],
            pg: None,
        };
        let peer: SocketAddr = "127.0.0.1:50000".parse().expect("addr");
        let dst: SocketAddr = "[::1]:5432".parse().expect("addr");
        let body = session_start(9, "bot", &target, &who, peer, dst).body;
        let expected = serde_json::json!({
            "agent": "bot",
            "target": "db",
            "protocol": "postgres",
            "pid": 4242,
            "uid": 1000,
            "gid": 100,
            "user": "alice",
            "comm": "psql",
            "exe": "/usr/bin/psql \"x\"",
            "cmdline": ["psql", "-c", "select 'é'"],
            "cgroup": "/system.slice/agent.service",
            "unit": "agent.service",
            "container": null,
            "client": "127.0.0.1:50000",
            "dst": "[::1]:5432",
        })
        .to_string();
        assert_eq!(body.as_str(), expected);
    }

    /// As for the session record: the same text the `serde_json::Value` form gave.
    #[test]
    fn session_end_body_is_the_sorted_json_object() {
        for detail in [None, Some("upstream said \"no\"\n".to_owned())] {
            let outcome = Outcome {
                end: crate::protocol::End::Closed,
                detail: detail.clone(),
            };
            let took = Duration::from_micros(1_234_567);
            let body = session_end(&outcome, 10, 20, took);
            let expected = serde_json::json!({
                "end": "closed",
                "error": detail,
                "bytes_up": 10,
                "bytes_down": 20,
                "duration_ms": took.as_secs_f64() * 1000.0,
            })
            .to_string();
            assert_eq!(body.as_str(), expected);
        }
    }
}
