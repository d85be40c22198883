//! Local TCP servers of a target's port that the target's addresses leave uncovered: a way
//! around the gate through a misconfiguration.
//!
//! The kernel redirects a protected connect only when its destination matches a target
//! pattern. A server on this host that listens on more addresses than the target names
//! (PostgreSQL's `listen_addresses = 'localhost'` binds `127.0.0.1` *and* `::1`; `'*'` binds
//! every address, reachable at any `127.x.y.z` and each interface's address) can be reached
//! at one the target does not name, directly. The daemon looks for such servers at start and
//! `doctor` reports them.
//!
//! Parsing and matching are pure; [`scan`] reads `/proc/net/tcp{,6}` and the host's
//! interface addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::Config;

/// A local address at which a server of a target's port accepts connections that no
/// target covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// The target that covers this port elsewhere.
    pub target: String,
    /// The listening socket, as the kernel shows it (`0.0.0.0:5432` for every address).
    pub listener: SocketAddr,
    /// Where an agent reaches it unseen.
    pub reachable: SocketAddr,
}

impl Gap {
    pub fn describe(&self) -> String {
        format!(
            "a server listening on {} can be reached at {}, which no target covers: a \
             protected agent connecting there goes direct, around target `{}`",
            self.listener, self.reachable, self.target
        )
    }
}

/// What to do about gaps.
pub const FIX: &str = "add the addresses to the target (`*:PORT` covers the port at every \
                       address), or make the server listen only on addresses the target names";

/// The listening sockets in the text of `/proc/net/tcp` or `/proc/net/tcp6`.
pub fn listening(proc_net_tcp: &str) -> Vec<SocketAddr> {
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            (state == "0A").then_some(())?;
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // The address is printed as 32-bit words in the kernel's byte order.
            let words: Option<Vec<[u8; 4]>> = (0..addr.len() / 8)
                .map(|i| {
                    u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                        .ok()
                        .map(u32::to_ne_bytes)
                })
                .collect();
            let bytes: Vec<u8> = words?.concat();
            let ip = match bytes.len() {
                4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
                16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
                _ => return None,
            };
            Some(SocketAddr::new(ip, port))
        })
        .collect()
}

/// Where a listener can be reached from this host: its own address, or for a wildcard
/// listener every local address of its family (`::` also takes IPv4, unless it is
/// `IPV6_V6ONLY`, which `/proc` does not show) and a second loopback alias, which stands
/// for the rest of `127.0.0.0/8`.
fn reachable_at(listener: SocketAddr, local: &[IpAddr]) -> Vec<IpAddr> {
    let ip = listener.ip();
    if !ip.is_unspecified() {
        return vec![ip];
    }
    let v4 = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
    ];
    let mut out: Vec<IpAddr> = match ip {
        IpAddr::V4(_) => v4.to_vec(),
        IpAddr::V6(_) => v4
            .iter()
            .copied()
            .chain([IpAddr::V6(Ipv6Addr::LOCALHOST)])
            .collect(),
    };
    out.extend(local.iter().copied().filter(|a| {
        (a.is_ipv4() || ip.is_ipv6())
            && !a.is_loopback()
            // Link-local IPv6 needs a scope to connect to: not a practical way there.
            && !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local())
    }));
    out.sort();
    out.dedup();
    out
}

/// The gaps: for each listener on a port some target covers at an address of this host,
/// each address it can be reached at that no target covers.
pub fn gaps(cfg: &Config, listeners: &[SocketAddr], local: &[IpAddr]) -> Vec<Gap> {
    let is_local = |ip: IpAddr| ip.is_loopback() || local.contains(&ip);
    let mut out = Vec::new();
    for &listener in listeners {
        let port = listener.port();
        let reachable = reachable_at(listener, local);
        // The target that means this server: one covering its port at a local address.
        let Some(target) = cfg.targets.iter().find(|t| {
            t.addrs().any(|a| {
                a.port == port
                    && a.net.is_none_or(|n| {
                        is_local(n.addr())
                            || reachable.iter().any(|ip| n.contains(ip) && is_local(*ip))
                    })
            })
        }) else {
            continue;
        };
        for ip in reachable {
            let at = SocketAddr::new(ip, port);
            if cfg.target_for(at).is_none() {
                out.push(Gap {
                    target: target.name.clone(),
                    listener,
                    reachable: at,
                });
            }
        }
    }
    out
}

/// [`gaps`] on this host.
pub fn scan(cfg: &Config) -> Vec<Gap> {
    let mut listeners = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            listeners.extend(listening(&text));
        }
    }
    listeners.sort();
    listeners.dedup();
    let local: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|i| {
                    let a = i.address?;
                    a.as_sockaddr_in()
                        .map(|s| IpAddr::V4(s.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
                })
                .collect()
        })
        .unwrap_or_default();
    gaps(cfg, &listeners, &local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Source;

    const TCP: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   113        0 1 1 0
   1: 0100007F:1539 00000000:0000 0A 00000000:00000000 00:00000000 00000000   113        0 2 1 0
   2: 0100007F:AE86 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0
   3: garbage
";
    const TCP6: &str = "\
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000001000000:1539 00000000000000000000000000000000:0000 0A 00000000:00000000
";

    fn cfg(addresses: &str) -> Config {
        Config::parse(&Source::new(
            "t.toml",
            format!("[[target]]\nname = \"pg\"\nprotocol = \"tcp\"\naddress = [{addresses}]\n"),
        ))
        .expect("valid")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect(s)
    }

    #[test]
    fn listening_sockets_are_read_in_the_kernels_byte_order() {
        assert_eq!(
            listening(TCP),
            [addr("0.0.0.0:5432"), addr("127.0.0.1:5433")],
            "established connections and garbage are skipped"
        );
        assert_eq!(listening(TCP6), [addr("[::1]:5433")]);
    }

    #[test]
    fn a_listener_on_more_addresses_than_the_target_names_is_a_gap() {
        let local = [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))];
        // localhost: 127.0.0.1 and ::1, and a target naming only the first.
        let listeners = [addr("127.0.0.1:5433"), addr("[::1]:5433")];
        let g = gaps(&cfg("\"127.0.0.1:5433\""), &listeners, &local);
        assert_eq!(g.len(), 1, "{g:?}");
        assert_eq!(g[0].reachable, addr("[::1]:5433"));
        assert!(g[0].describe().contains("around target `pg`"));
        assert!(
            gaps(
                &cfg("\"127.0.0.1:5433\", \"[::1]:5433\""),
                &listeners,
                &local
            )
            .is_empty()
        );

        // Every address: another loopback alias and the interface's address are ways in.
        let wild = [addr("0.0.0.0:5432")];
        let g: Vec<String> = gaps(&cfg("\"127.0.0.1:5432\""), &wild, &local)
            .iter()
            .map(|g| g.reachable.to_string())
            .collect();
        assert_eq!(g, ["10.0.0.7:5432", "127.0.0.2:5432"]);
        assert!(gaps(&cfg("\"*:5432\""), &wild, &local).is_empty());
        assert!(
            gaps(
                &cfg("\"127.0.0.0/8:5432\", \"10.0.0.7:5432\""),
                &wild,
                &local
            )
            .is_empty()
        );
        // `::` takes IPv4 too.
        let g = gaps(&cfg("\"[::1]:5432\""), &[addr("[::]:5432")], &[]);
        assert_eq!(g.len(), 2, "{g:?}");
    }

    #[test]
    fn servers_of_other_ports_and_remote_targets_are_not_gaps() {
        let listeners = [addr("0.0.0.0:6379"), addr("0.0.0.0:5432")];
        assert!(gaps(&cfg("\"127.0.0.1:5432\""), &[addr("0.0.0.0:6379")], &[]).is_empty());
        // A target on another host at the same port says nothing about this host's server.
        assert!(gaps(&cfg("\"10.9.9.9:5432\""), &listeners, &[]).is_empty());
    }
}
