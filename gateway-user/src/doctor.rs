//! `portcullis doctor`: what this host needs for Portcullis, checked one by one, each
//! problem one line with its fix.
//!
//! Checks are plain functions returning [`Check`]s, so the report is the same for people
//! (`ok` / `WARN` / `FAIL` lines) and programs (`--json`). A failed check makes the command
//! exit non-zero; a warning does not.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::{
    cgroup,
    config::{Config, DEFAULT_CONFIG_PATH},
    ebpf,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub level: Level,
    pub what: String,
    /// What to do; empty when fine.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

fn ok(what: impl Into<String>) -> Check {
    Check {
        level: Level::Ok,
        what: what.into(),
        fix: String::new(),
    }
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        level: Level::Fail,
        what: what.into(),
        fix: fix.into(),
    }
}

fn warn(what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        level: Level::Warn,
        what: what.into(),
        fix: fix.into(),
    }
}

/// Oldest kernel the programs are built for.
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// `6.1.0-28-amd64` → (6, 1).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub fn check_kernel(release: &str) -> Check {
    match kernel_version(release) {
        Some(v) if v >= MIN_KERNEL => ok(format!("kernel {release} (5.15 or later)")),
        Some(_) => fail(
            format!("kernel {release} is older than 5.15"),
            "upgrade the kernel (Debian 12: linux-image-amd64 from bookworm-backports or 6.1)",
        ),
        None => warn(
            format!("cannot read the kernel version ({release:?})"),
            "check /proc/sys/kernel/osrelease",
        ),
    }
}

/// Options the programs need, from the kernel's build configuration text.
pub const KERNEL_OPTIONS: [&str; 4] = [
    "CONFIG_BPF_SYSCALL",
    "CONFIG_CGROUP_BPF",
    "CONFIG_BPF_JIT",
    "CONFIG_DEBUG_INFO_BTF",
];

pub fn check_kernel_config(text: Option<&str>, source: &str) -> Check {
    let Some(text) = text else {
        return warn(
            format!("kernel configuration not found ({source}); options not checked"),
            "install the kernel's config file (Debian ships /boot/config-$(uname -r))",
        );
    };
    let missing: Vec<&str> = KERNEL_OPTIONS
        .iter()
        .copied()
        .filter(|o| !text.lines().any(|l| l == format!("{o}=y")))
        .collect();
    if missing.is_empty() {
        ok(format!(
            "kernel options {} ({source})",
            KERNEL_OPTIONS.join(", ")
        ))
    } else {
        fail(
            format!("the kernel lacks {} ({source})", missing.join(", ")),
            "use a kernel built with them (every Debian 12 and Ubuntu 22.04+ kernel is)",
        )
    }
}

fn check_btf() -> Check {
    if Path::new(ebpf::btf::KERNEL_BTF).exists() {
        ok(format!("BTF at {}", ebpf::btf::KERNEL_BTF))
    } else {
        fail(
            format!("no BTF ({} is missing)", ebpf::btf::KERNEL_BTF),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    }
}

pub fn check_mounts(mounts: &[cgroup::Mount], pin_path: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    match cgroup::cgroup2_mount_in(mounts) {
        Some(p) => out.push(ok(format!("cgroup v2 mounted at {}", p.display()))),
        None => out.push(fail(
            "no cgroup v2 (cgroup2) mount",
            "boot with systemd.unified_cgroup_hierarchy=1 (the default since systemd 247)",
        )),
    }
    let bpffs = mounts
        .iter()
        .find(|m| m.fstype == "bpf" && pin_path.starts_with(&m.mount_point));
    match bpffs {
        Some(m) => out.push(ok(format!(
            "bpffs mounted at {} (pins under {})",
            m.mount_point.display(),
            pin_path.display()
        ))),
        None => out.push(fail(
            format!(
                "bpffs is not mounted at {}: pinned programs cannot survive a restart",
                pin_path.parent().unwrap_or(pin_path).display()
            ),
            "mount -t bpf bpf /sys/fs/bpf (systemd: systemctl start sys-fs-bpf.mount)",
        )),
    }
    out
}

/// Effective capabilities from `/proc/self/status`'s `CapEff`.
pub fn cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

pub const CAPS: [(u32, &str); 5] = [
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
    (19, "CAP_SYS_PTRACE"),
];

pub fn check_caps(eff: Option<u64>) -> Check {
    let Some(eff) = eff else {
        return warn("cannot read capabilities", "check /proc/self/status");
    };
    let missing: Vec<&str> = CAPS
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        ok("capabilities for the daemon (BPF, PERFMON, NET_ADMIN, SYS_ADMIN, SYS_PTRACE)")
    } else {
        fail(
            format!("missing {}", missing.join(", ")),
            "run as root (the systemd unit grants exactly these)",
        )
    }
}

/// The configuration and the policies.
fn check_config(path: &Path, explicit: bool) -> (Vec<Check>, Option<Config>) {
    let mut out = Vec::new();
    let cfg = match Config::load_or_default(path, explicit) {
        Ok(c) => {
            out.push(ok(format!(
                "configuration {}",
                c.path
                    .as_ref()
                    .map_or_else(|| "<embedded default>".into(), |p| p.display().to_string())
            )));
            c
        }
        Err(e) => {
            for line in e.to_string().lines().filter(|l| !l.trim().is_empty()) {
                out.push(fail(
                    format!("configuration: {}", line.trim()),
                    format!("edit {}", path.display()),
                ));
            }
            return (out, None);
        }
    };
    if let Some(p) = &cfg.path
        && let Some(f) = crate::config::trust::check_config(p)
    {
        out.push(fail(
            format!("configuration {}: {f}", p.display()),
            "the daemon does not start with it; make it and the directories above it root's",
        ));
    }
    match crate::policy::store::load_set(&cfg) {
        Ok((set, warnings)) => {
            out.push(ok(format!(
                "policies: {} rule(s) from {}",
                set.rules.len(),
                cfg.policy
                    .dir
                    .as_ref()
                    .map_or_else(|| "the shipped set".into(), |d| d.display().to_string())
            )));
            for w in warnings {
                out.push(warn(
                    format!("policies: {w}"),
                    "`portcullis policy check` shows every warning",
                ));
            }
        }
        Err(e) => {
            for line in e.to_string().lines().filter(|l| !l.trim().is_empty()) {
                out.push(fail(
                    format!("policies: {}", line.trim()),
                    "fix the file; `portcullis policy check` shows every problem",
                ));
            }
        }
    }
    (out, Some(cfg))
}

/// Targets with concrete addresses: can this host reach them? (Connects with the proxy's
/// mark, so the check itself is never redirected.)
fn check_targets(cfg: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    for t in &cfg.targets {
        for h in &t.hosts {
            match &h.error {
                Some(e) => out.push(warn(
                    format!(
                        "target {}: host name {} does not resolve: {e}",
                        t.name, h.name
                    ),
                    "fix the name or the resolver: connections to the addresses it will have \
                     are not intercepted until the daemon resolves it",
                )),
                None => out.push(ok(format!(
                    "target {}: {} resolves to {} ({})",
                    t.name,
                    h.name,
                    h.addrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    if cfg.ebpf.resolve_interval.get().is_zero() {
                        "not followed: resolve_interval is 0s".to_owned()
                    } else {
                        format!("followed every {}", cfg.ebpf.resolve_interval)
                    }
                ))),
            }
        }
        let concrete: Vec<SocketAddr> = t
            .addrs()
            .filter_map(|a| {
                let net = a.net?;
                (net.prefix_len() == net.max_prefix_len())
                    .then(|| SocketAddr::new(net.addr(), a.port))
            })
            .collect();
        if concrete.is_empty() {
            out.push(ok(format!(
                "target {}: ranges or any address; reachability not checked",
                t.name
            )));
            continue;
        }
        for addr in concrete {
            match connect_marked(addr, cfg.proxy.upstream_mark) {
                Ok(()) => out.push(ok(format!("target {} at {addr} is reachable", t.name))),
                Err(e) => out.push(warn(
                    format!("target {} at {addr} is not reachable: {e}", t.name),
                    "start the service or fix the address; agents will fail to connect too",
                )),
            }
        }
    }
    out
}

/// Agents selected by a cgroup their own processes can leave (a delegated cgroup tree). What
/// the running daemon found; without one, the cgroups as they are now (none is created).
fn check_agents(cfg: &Config) -> Vec<Check> {
    let escapes: Vec<(String, Option<String>)> = match crate::admin::client::call::<
        crate::admin::proto::Status,
    >(
        &cfg.admin.socket,
        &crate::admin::proto::Request::Status,
    ) {
        Ok(s) => s
            .agents
            .into_iter()
            .filter(|a| !a.binding.cgroups.is_empty())
            .map(|a| (a.name, a.binding.escape))
            .collect(),
        Err(_) => {
            let Ok(h) = cgroup::Hierarchy::discover() else {
                return Vec::new();
            };
            cfg.agents
                .iter()
                .filter(|a| a.selector.kernel_by_cgroup())
                .map(|a| {
                    let mut paths: Vec<String> = a
                        .selector
                        .cgroup
                        .iter()
                        .filter(|p| h.dir(p).is_dir())
                        .cloned()
                        .collect();
                    if let Some(unit) = &a.selector.unit {
                        paths.extend(
                            h.find_named(unit, ebpf::selection::UNIT_SEARCH_DEPTH)
                                .into_iter()
                                .map(|(p, _)| p),
                        );
                    }
                    let escape = ebpf::selection::escape_of(&h, paths.iter().map(String::as_str));
                    (a.name.clone(), escape)
                })
                .collect()
        }
    };
    escapes
        .into_iter()
        .map(|(name, escape)| match escape {
            None => ok(format!(
                "agent {name}: only root can move processes out of its cgroup"
            )),
            Some(e) => warn(format!("agent {name}: {e}"), FIX_ESCAPE),
        })
        .collect()
}

const FIX_ESCAPE: &str = "select a dedicated uid for the agent (it cannot change its uid), or \
                          run it in a cgroup tree only root may write (a system unit)";

/// Local servers of the targets' ports reachable at addresses no target names.
fn check_listeners(cfg: &Config) -> Vec<Check> {
    let gaps = crate::tcp_listeners::scan(cfg);
    if gaps.is_empty() {
        return vec![ok(
            "every local server of a target's port is covered at each address it listens on",
        )];
    }
    gaps.iter()
        .map(|g| warn(g.describe(), crate::tcp_listeners::FIX))
        .collect()
}

/// PostgreSQL Unix sockets beside the targets' TCP ports: a way around the gate.
fn check_unix_sockets(cfg: &Config) -> Vec<Check> {
    // What the running daemon says; without one, whether the hook is pinned (it keeps
    // refusing while no daemon runs).
    let asked = crate::admin::client::call::<crate::admin::proto::Status>(
        &cfg.admin.socket,
        &crate::admin::proto::Request::Status,
    );
    let guard = match asked {
        Ok(s) => s.kernel.unix_guard,
        Err(_) => {
            let prefix = format!("{}@", gateway_common::program_names::CONNECT_UNIX);
            let pinned = ebpf::pinned_state(&cfg.ebpf.pin_path).0.iter().any(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&prefix))
            });
            if pinned {
                ebpf::UnixGuard::Active
            } else {
                ebpf::UnixGuard::Unavailable("no daemon answers, and none pinned the hook".into())
            }
        }
    };
    let guarded = guard == ebpf::UnixGuard::Active;
    let mut out = vec![match &guard {
        ebpf::UnixGuard::Active => ok(
            "the kernel refuses protected agents' connects to Unix sockets by a target's \
             socket name (cgroup connect_unix)",
        ),
        ebpf::UnixGuard::Unavailable(why) => warn(
            format!("the kernel does not refuse connects to targets' Unix sockets by name: {why}"),
            "run the daemon on Linux 6.7+, or close the sockets themselves (see below)",
        ),
    }];
    let found = crate::unix_sockets::scan(cfg);
    if found.is_empty() {
        out.push(ok(
            "no PostgreSQL Unix socket on this host listens for a target's port",
        ));
    }
    out.extend(found.iter().map(|e| {
        if e.exposed(guarded) {
            warn(e.describe(guarded), e.fix())
        } else if e.is_abstract() {
            ok(e.describe(guarded))
        } else {
            ok(format!(
                "{}; only its owner and group may connect: keep agents out of them",
                e.describe(guarded)
            ))
        }
    }));
    out
}

fn connect_marked(addr: SocketAddr, mark: u32) -> std::io::Result<()> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Without CAP_NET_ADMIN the mark cannot be set; then the connect may be redirected,
    // which still says whether the gate answers.
    let _ = s.set_mark(mark);
    s.connect_timeout(&addr.into(), Duration::from_secs(2))?;
    drop(TcpStream::from(s));
    Ok(())
}

/// Pins against the configuration, and whether a daemon answers.
fn check_pins(cfg: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    let (links, maps) = ebpf::pinned_state(&cfg.ebpf.pin_path);
    let running = std::os::unix::net::UnixStream::connect(&cfg.admin.socket).is_ok();
    let closed = cfg.ebpf.fail_mode == crate::config::FailMode::Closed;
    match (running, links.is_empty(), closed) {
        (true, false, _) => out.push(ok(format!(
            "daemon running; {} program link(s) pinned under {}",
            links.len(),
            cfg.ebpf.pin_path.display()
        ))),
        (true, true, true) => out.push(fail(
            format!(
                "daemon running but no links pinned under {}: protection would end with the \
                 daemon, although fail_mode is closed",
                cfg.ebpf.pin_path.display()
            ),
            "restart the daemon with this configuration (`systemctl restart portcullis`)",
        )),
        (true, true, false) => out.push(ok("daemon running (fail_mode open: nothing pinned)")),
        (false, false, _) => out.push(fail(
            format!(
                "programs are pinned under {} but no daemon answers on {}: protected \
                 connections are refused",
                cfg.ebpf.pin_path.display(),
                cfg.admin.socket.display()
            ),
            "start it (`systemctl start portcullis`), or remove protection (`portcullis detach`)",
        )),
        (false, true, _) => out.push(warn(
            "no daemon running and nothing pinned: nothing is protected",
            "start it (`systemctl start portcullis` or `cargo xtask run`)",
        )),
    }
    if !links.is_empty() && !maps {
        out.push(fail(
            format!(
                "links are pinned under {} but not the maps of this version's layout",
                cfg.ebpf.pin_path.display()
            ),
            "restart the daemon: it re-creates the maps (or `portcullis detach` first)",
        ));
    }
    out
}

/// Whether the store's directory (or, before the first start, the nearest existing parent
/// the daemon would create it in) takes a file. Doctor creates nothing.
fn check_store(cfg: &Config) -> Check {
    let dir = cfg
        .store
        .path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let existing = dir
        .ancestors()
        .find(|d| d.exists())
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let probe = existing.join(".portcullis-doctor-probe");
    let r = std::fs::write(&probe, b"probe");
    let _ = std::fs::remove_file(&probe);
    let what = if existing == dir {
        format!("audit store directory {}", dir.display())
    } else {
        format!(
            "audit store directory {} (not created yet: {} is where it will be)",
            dir.display(),
            existing.display()
        )
    };
    match r {
        Ok(()) => ok(format!("{what} is writable")),
        Err(e) => fail(
            format!("{what} is not writable: {e}"),
            "fix its permissions or free space, or set [store] path",
        ),
    }
}

/// Every secret the configuration names (target passwords, webhook signing keys) can be
/// read and is private. Only where it is: credentials in `$CREDENTIALS_DIRECTORY` exist
/// in the service's environment, not in a shell's, so those are named, not failed.
fn check_secrets(cfg: &Config) -> Vec<Check> {
    let targets = cfg.targets.iter().filter_map(|t| {
        let c = t.pg.as_ref()?.credentials.as_ref()?;
        Some((format!("password of target `{}`", t.name), &c.password))
    });
    let hooks = cfg.webhooks.iter().filter_map(|w| {
        Some((
            format!("signing key of webhook {}", w.url),
            w.secret.as_ref()?,
        ))
    });
    targets
        .chain(hooks)
        .map(|(what, secret)| match crate::secret::read(secret) {
            Ok(_) => ok(format!("{what} is readable and private")),
            Err(crate::secret::SecretError::NoCredentialsDirectory(name)) => warn(
                format!("{what} is systemd credential `{name}`, not visible outside the service"),
                "check `LoadCredential=` in the unit",
            ),
            Err(e) => fail(
                format!("{what}: {e}"),
                "create it owned by root with mode 0600",
            ),
        })
        .collect()
}

/// Every check, in order.
pub fn run(config: Option<&Path>) -> Vec<Check> {
    let mut out = Vec::new();
    let release = uname_release();
    out.push(check_kernel(&release));
    let boot = format!("/boot/config-{release}");
    let text = std::fs::read_to_string(&boot).ok();
    out.push(check_kernel_config(text.as_deref(), &boot));
    out.push(check_btf());
    out.push(check_caps(
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .as_deref()
            .and_then(cap_eff),
    ));
    let (path, explicit) = match config {
        Some(p) => (p.to_owned(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let (checks, cfg) = check_config(&path, explicit);
    let pin_path = cfg.as_ref().map_or_else(
        || PathBuf::from("/sys/fs/bpf/portcullis"),
        |c| c.ebpf.pin_path.clone(),
    );
    match cgroup::read_mountinfo() {
        Ok(m) => out.extend(check_mounts(&m, &pin_path)),
        Err(e) => out.push(fail(format!("cannot read mountinfo: {e}"), "check /proc")),
    }
    out.extend(checks);
    if let Some(cfg) = &cfg {
        out.push(check_store(cfg));
        out.extend(check_secrets(cfg));
        out.extend(check_targets(cfg));
        out.extend(check_agents(cfg));
        out.extend(check_listeners(cfg));
        out.extend(check_unix_sockets(cfg));
        out.extend(check_pins(cfg));
        out.extend(check_issuers(cfg));
    }
    out
}

/// Each `[[oidc]]` issuer's discovery document and key set can be fetched.
fn check_issuers(cfg: &Config) -> Vec<Check> {
    if cfg.oidc.is_empty() {
        return Vec::new();
    }
    let validator = match crate::oidc::Validator::new(&cfg.oidc) {
        Ok(v) => v,
        Err(e) => return vec![fail(e, "fix the [[oidc]] section")],
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return vec![fail(format!("cannot start a runtime: {e}"), "retry")],
    };
    rt.block_on(validator.probe())
        .into_iter()
        .map(|(issuer, got)| match got {
            Ok(kids) => ok(format!(
                "OIDC issuer {issuer}: {} signing key(s) ({})",
                kids.len(),
                kids.join(", ")
            )),
            Err(e) => fail(
                format!("OIDC issuer {issuer}: cannot fetch its keys: {e}"),
                "check the issuer URL, its reachability from this host and `ca_file`; \
                 tokens are refused until its keys can be fetched",
            ),
        })
        .collect()
}

pub fn render(checks: &[Check]) -> String {
    let mut o = String::new();
    for c in checks {
        let tag = match c.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        if c.fix.is_empty() {
            o.push_str(&format!("{tag}  {}\n", c.what));
        } else {
            o.push_str(&format!("{tag}  {} — fix: {}\n", c.what, c.fix));
        }
    }
    let fails = checks.iter().filter(|c| c.level == Level::Fail).count();
    if fails == 0 {
        o.push_str("no problems found\n");
    } else {
        o.push_str(&format!("{fails} problem(s)\n"));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_must_be_readable_and_private() {
        let (_dir, key) = crate::secret::test_file("hook.key", "k\n", 0o600);
        let text = format!(
            "[[webhook]]\nurl = \"https://hooks.example/x\"\nsecret_file = \"{}\"\n",
            key.display()
        );
        let cfg = Config::parse(&crate::config::Source::new("t.toml", &text)).expect("config");
        let c = check_secrets(&cfg);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].level, Level::Ok, "{:?}", c[0].what);
        crate::secret::set_mode(&key, 0o640);
        let c = check_secrets(&cfg);
        assert_eq!(c[0].level, Level::Fail, "{:?}", c[0].what);
        assert!(c[0].what.contains("hook.key"), "{:?}", c[0].what);
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(check_kernel("5.10.0-9").level, Level::Fail);
        assert_eq!(check_kernel("6.12.1").level, Level::Ok);
        assert_eq!(check_kernel("").level, Level::Warn);
    }

    #[test]
    fn kernel_config_names_what_is_missing() {
        let good = KERNEL_OPTIONS.map(|o| format!("{o}=y")).join("\n");
        assert_eq!(check_kernel_config(Some(&good), "x").level, Level::Ok);
        let bad = good.replace("CONFIG_CGROUP_BPF=y", "# CONFIG_CGROUP_BPF is not set");
        let c = check_kernel_config(Some(&bad), "x");
        assert_eq!(c.level, Level::Fail);
        assert!(c.what.contains("CONFIG_CGROUP_BPF"), "{}", c.what);
        assert_eq!(check_kernel_config(None, "x").level, Level::Warn);
    }

    #[test]
    fn capabilities() {
        assert_eq!(check_caps(Some(u64::MAX)).level, Level::Ok);
        let c = check_caps(Some(1 << 12));
        assert_eq!(c.level, Level::Fail);
        assert!(c.what.contains("CAP_BPF") && !c.what.contains("CAP_NET_ADMIN"));
        assert_eq!(
            cap_eff("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
    }

    #[test]
    fn a_missing_bpffs_is_one_failure_with_the_fix() {
        let mounts =
            cgroup::parse_mountinfo("30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n");
        let c = check_mounts(&mounts, Path::new("/sys/fs/bpf/portcullis"));
        assert_eq!(c[0].level, Level::Ok);
        assert_eq!(c[1].level, Level::Fail);
        assert!(
            c[1].fix.contains("mount -t bpf bpf /sys/fs/bpf"),
            "{:?}",
            c[1]
        );
        let text = render(&c);
        assert!(text.contains("FAIL  bpffs is not mounted") && text.ends_with("1 problem(s)\n"));
    }
}
