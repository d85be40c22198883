//! Unix sockets that lead to a target around the gate. A PostgreSQL server on the host
//! listens on a Unix socket named after its port (`<dir>/.s.PGSQL.<port>`) beside its TCP
//! port; connection interception only sees TCP, so a protected agent that may connect to
//! that socket reaches the server without passing the gate.
//!
//! On Linux 6.7+ `pc_connect_unix` refuses protected processes' connects to paths ending in
//! one of [`guarded_names`]: what a client does by default (`psql` without `-h`, libpq's
//! `host=/var/run/postgresql`) is refused. It sees the path as written, so a link to the
//! socket under another name still reaches it: the daemon finds such sockets and says so
//! (at start and in `portcullis doctor`), and closing them to agents stays the operator's
//! part (docs/configuration.md, agent selection).
//!
//! Parsing and matching are pure; [`scan`] reads `/proc/net/unix` and the sockets' modes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{Config, TargetAddr};

/// A listening Unix socket of a PostgreSQL server whose port a target covers on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    pub target: String,
    pub path: String,
    /// The socket file's permission bits, when it could be read.
    pub mode: Option<u32>,
}

impl Exposure {
    /// An abstract name (`@...`, PostgreSQL's `unix_socket_directories = '@dir'`): no file,
    /// so no permission closes it and no link names it.
    pub fn is_abstract(&self) -> bool {
        self.path.starts_with('@')
    }

    /// Whether every user may connect (write permission for others on the socket file;
    /// the directories on the way must be searchable too, which they are by default).
    pub fn open_to_all(&self) -> bool {
        self.mode.is_none_or(|m| m & 0o002 != 0)
    }

    /// Whether a protected agent may reach the server through it: a socket file open to all
    /// (the kernel hook, `guarded`, refuses its name but not a link to it), an abstract
    /// name unless the hook refuses it (no other name leads there).
    pub fn exposed(&self, guarded: bool) -> bool {
        if self.is_abstract() {
            !guarded
        } else {
            self.open_to_all()
        }
    }

    /// One sentence for a log or a report; `guarded`: the kernel refuses protected
    /// processes' connects by the socket's name ([`crate::ebpf::UnixGuard::Active`]).
    pub fn describe(&self, guarded: bool) -> String {
        let (what, consequence) = if self.is_abstract() {
            (
                "abstract Unix name".to_owned(),
                if guarded {
                    "the kernel refuses protected agents' connects to it (an abstract name has \
                     no links)"
                } else {
                    "any process may connect to an abstract name: a protected agent reaches \
                     the server without passing the gate"
                },
            )
        } else {
            let mode = self
                .mode
                .map_or_else(|| "mode unknown".to_owned(), |m| format!("mode {m:04o}"));
            (
                format!("Unix socket ({mode})"),
                if guarded {
                    "the kernel refuses protected agents' connects by that name, but a link to \
                     it under another name reaches the server without passing the gate"
                } else {
                    "a protected agent that may connect there reaches the server without \
                     passing the gate"
                },
            )
        };
        format!(
            "target {}: PostgreSQL also listens on the {what} {}; {consequence}",
            self.target, self.path
        )
    }

    /// What to do about it.
    pub fn fix(&self) -> &'static str {
        if self.is_abstract() {
            FIX_ABSTRACT
        } else {
            FIX
        }
    }
}

/// What to do about an exposure.
pub const FIX: &str = "close the socket to agents: in postgresql.conf set \
     unix_socket_permissions = 0770 and unix_socket_group to a group no agent is in, or \
     unix_socket_directories = '' for none, then restart PostgreSQL";

/// What to do about an abstract name, which no permission closes.
pub const FIX_ABSTRACT: &str = "run the daemon on Linux 6.7+ (its connect_unix hook refuses \
     the name), or give PostgreSQL a directory instead: unix_socket_directories = '/dir' \
     with unix_socket_permissions = 0770 (or '' for none), then restart PostgreSQL";

/// Paths of the listening stream sockets in `/proc/net/unix`, abstract names as `@name`.
pub fn listening_paths(proc_net_unix: &str) -> Vec<&str> {
    const ACCEPTCON: u32 = 0x0001_0000;
    proc_net_unix
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let mut f = line.split_whitespace();
            let flags = u32::from_str_radix(f.nth(3)?, 16).ok()?;
            let kind = f.next()?;
            let path = f.nth(2)?;
            let named = path.starts_with('/') || path.starts_with('@');
            (flags & ACCEPTCON != 0 && kind == "0001" && named).then_some(path)
        })
        .collect()
}

/// The port of a PostgreSQL socket path (`.../.s.PGSQL.5432` → 5432).
pub fn postgres_port(path: &str) -> Option<u16> {
    let name = path.rsplit('/').next()?.trim_start_matches('@');
    name.strip_prefix(".s.PGSQL.")?.parse().ok()
}

/// Whether a target address may be a server on this host: any address, a range with a
/// loopback address in it, or an address `is_local` says is this host's.
fn may_be_local(a: &TargetAddr, is_local: &dyn Fn(IpAddr) -> bool) -> bool {
    let Some(net) = a.net else {
        return true;
    };
    let loopback = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    net.addr().is_loopback()
        || loopback.iter().any(|l| net.contains(l))
        || (net.prefix_len() == net.max_prefix_len() && is_local(net.addr()))
}

/// The Unix socket names (last path component) through which a target may be reached on
/// this host, with the target's id: `.s.PGSQL.<port>` for every port a target covers with
/// an address that may be this host's. The kernel refuses protected processes' connects to
/// paths ending in these names, in any directory.
pub fn guarded_names(cfg: &Config, is_local: &dyn Fn(IpAddr) -> bool) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for t in &cfg.targets {
        for a in t.addrs().filter(|a| may_be_local(a, is_local)) {
            let name = format!(".s.PGSQL.{}", a.port);
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name, t.id));
            }
        }
    }
    out
}

/// Whether `ip` is an address of this host (only such an address can be bound).
pub fn is_local(ip: IpAddr) -> bool {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The PostgreSQL sockets in `proc_net_unix` whose port a target covers on this host.
pub fn exposures(
    cfg: &Config,
    proc_net_unix: &str,
    is_local: &dyn Fn(IpAddr) -> bool,
    mode_of: &dyn Fn(&str) -> Option<u32>,
) -> Vec<Exposure> {
    let mut out = Vec::new();
    for path in listening_paths(proc_net_unix) {
        let Some(port) = postgres_port(path) else {
            continue;
        };
        for t in &cfg.targets {
            if t.addrs()
                .any(|a| a.port == port && may_be_local(a, is_local))
            {
                out.push(Exposure {
                    target: t.name.clone(),
                    path: path.to_owned(),
                    mode: mode_of(path),
                });
            }
        }
    }
    out
}

/// [`exposures`] on this host.
pub fn scan(cfg: &Config) -> Vec<Exposure> {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    let mode_of = |p: &str| {
        std::fs::metadata(p)
            .ok()
            .map(|m| m.permissions().mode() & 0o7777)
    };
    exposures(cfg, &text, &is_local, &mode_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC: &str = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 20001 /var/run/postgresql/.s.PGSQL.5432
0000000000000000: 00000002 00000000 00010000 0001 01 20002 /tmp/.s.PGSQL.6543
0000000000000000: 00000003 00000000 00000000 0001 03 20003 /var/run/postgresql/.s.PGSQL.5432
0000000000000000: 00000002 00000000 00010000 0001 01 20004 @/tmp/.s.PGSQL.5432
0000000000000000: 00000002 00000000 00010000 0002 01 20005 /run/dgram/.s.PGSQL.5432
0000000000000000: 00000002 00000000 00010000 0001 01 20006 /run/systemd/private
0000000000000000: 00000002 00000000 00000000 0001 01 20007
";

    fn cfg(targets: &str) -> Config {
        Config::parse(&crate::config::source::Source::new(
            "t.toml",
            format!("[[agent]]\nname = \"a\"\nmatch = {{ uid = 1000 }}\n{targets}"),
        ))
        .expect("config")
    }

    fn target(name: &str, address: &str) -> String {
        format!("[[target]]\nname = \"{name}\"\nprotocol = \"postgres\"\naddress = \"{address}\"\n")
    }

    #[test]
    fn listening_stream_sockets_with_paths_only() {
        assert_eq!(
            listening_paths(PROC),
            [
                "/var/run/postgresql/.s.PGSQL.5432",
                "/tmp/.s.PGSQL.6543",
                "@/tmp/.s.PGSQL.5432",
                "/run/systemd/private"
            ],
            "no connected, datagram or unbound sockets"
        );
        assert_eq!(postgres_port("@/tmp/.s.PGSQL.5432"), Some(5432));
        assert_eq!(postgres_port("@.s.PGSQL.5433"), Some(5433));
        assert_eq!(
            postgres_port("/var/run/postgresql/.s.PGSQL.5432"),
            Some(5432)
        );
        assert_eq!(postgres_port("/tmp/.s.PGSQL.5432.lock"), None);
        assert_eq!(postgres_port("/run/systemd/private"), None);
    }

    #[test]
    fn sockets_of_ports_a_target_covers_on_this_host_are_found() {
        let is_local = |ip: IpAddr| ip == IpAddr::from([192, 168, 1, 10]);
        let mode = |p: &str| (p.starts_with("/tmp")).then_some(0o777).or(Some(0o770));
        let found = |targets: &str| {
            exposures(&cfg(targets), PROC, &is_local, &mode)
                .into_iter()
                .map(|e| (e.exposed(false), e))
                .map(|(exposed, e)| (e.target, e.path, exposed))
                .collect::<Vec<_>>()
        };
        let pg = "/var/run/postgresql/.s.PGSQL.5432".to_owned();
        // Loopback, any address, a range with loopback in it, this host's own address.
        for address in [
            "127.0.0.1:5432",
            "*:5432",
            "127.0.0.0/8:5432",
            "[::1]:5432",
            "192.168.1.10:5432",
        ] {
            assert_eq!(
                found(&target("db", address)),
                [
                    ("db".to_owned(), pg.clone(), false),
                    // No permission closes an abstract name.
                    ("db".to_owned(), "@/tmp/.s.PGSQL.5432".to_owned(), true)
                ],
                "{address}"
            );
        }
        // Another host's server, another port: its socket here is not the target's.
        assert!(found(&target("db", "10.1.2.3:5432")).is_empty());
        assert!(found(&target("db", "10.0.0.0/8:5432")).is_empty());
        assert!(found(&target("db", "127.0.0.1:5433")).is_empty());
        // Open to everyone or not.
        assert_eq!(
            found(&target("other", "127.0.0.1:6543")),
            [("other".to_owned(), "/tmp/.s.PGSQL.6543".to_owned(), true)]
        );
        let e = Exposure {
            target: "db".into(),
            path: pg,
            mode: Some(0o777),
        };
        let abs = Exposure {
            target: "db".into(),
            path: "@/tmp/.s.PGSQL.5432".into(),
            mode: None,
        };
        assert!(abs.exposed(false) && !abs.exposed(true));
        assert!(abs.describe(true).contains("abstract Unix name"));
        assert_eq!(abs.fix(), FIX_ABSTRACT);
        assert!(
            e.describe(false).contains("(mode 0777)"),
            "{}",
            e.describe(false)
        );
        assert!(e.describe(false).contains("without passing the gate"));
        assert!(e.describe(true).contains("the kernel refuses"));
    }

    #[test]
    fn the_names_guarded_are_the_socket_names_of_ports_targets_cover_here() {
        let is_local = |ip: IpAddr| ip == IpAddr::from([192, 168, 1, 10]);
        let c = cfg(&format!(
            "{}{}{}",
            target("db", "127.0.0.1:5432"),
            target("remote", "10.1.2.3:5433"),
            target("here", "192.168.1.10:6543"),
        ));
        assert_eq!(
            guarded_names(&c, &is_local),
            [
                (".s.PGSQL.5432".to_owned(), 0),
                (".s.PGSQL.6543".to_owned(), 2)
            ]
        );
        // A port two targets cover is one name.
        let twice = cfg(&format!(
            "{}{}",
            target("a", "127.0.0.1:5432"),
            target("b", "*:5432")
        ));
        assert_eq!(guarded_names(&twice, &is_local).len(), 1);
    }
}
