//! Target addresses: `ip:port`, `[ipv6]:port`, `cidr:port`, `[cidr6]:port`, `*:port` and
//! `host:port` (a [`HostPort`], resolved when the configuration loads and again while the
//! daemon runs, see `crate::target_names`).
//!
//! The kernel matches destinations against these with a longest-prefix-match trie keyed by
//! port then address (see `gateway_common::TargetKey`); [`TargetAddr::trie_prefix`] and
//! [`TargetAddr::trie_key`] produce those keys, and [`TargetAddr::prefix_len_matching`]
//! mirrors the kernel's lookup for userspace.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs},
};

use gateway_common::{TargetKey, ipv4_mapped};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// One address pattern of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetAddr {
    /// `None` matches every address, of both families.
    pub net: Option<IpNet>,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("`{0}` has no port: write it as `address:port`, e.g. `127.0.0.1:5432`")]
    MissingPort(String),
    #[error("`{0}` has an invalid port: ports are 1 to 65535")]
    BadPort(String),
    #[error("`{input}` is not an address, CIDR range or host name: {reason}")]
    BadAddress { input: String, reason: String },
    #[error("cannot resolve host `{host}`: {reason}")]
    Resolve { host: String, reason: String },
}

/// A host name with a port, as a target's `address` names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// Resolves through the system resolver (blocking).
    pub fn resolve(&self) -> Result<Vec<TargetAddr>, AddressError> {
        let resolved = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| self.resolve_error(e.to_string()))?;
        self.addresses(resolved.map(|sa| sa.ip()))
    }

    /// The host routes for the addresses a lookup returned, sorted, without duplicates;
    /// an error when there are none.
    pub fn addresses(
        &self,
        ips: impl IntoIterator<Item = IpAddr>,
    ) -> Result<Vec<TargetAddr>, AddressError> {
        let mut out: Vec<TargetAddr> = ips
            .into_iter()
            .map(|ip| TargetAddr::host(ip, self.port))
            .collect();
        out.sort_by_key(ToString::to_string);
        out.dedup();
        if out.is_empty() {
            return Err(self.resolve_error("no addresses".into()));
        }
        Ok(out)
    }

    fn resolve_error(&self, reason: String) -> AddressError {
        AddressError::Resolve {
            host: self.host.clone(),
            reason,
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// One `address` entry as written: addresses, or a name to resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Fixed(TargetAddr),
    Host(HostPort),
}

impl Pattern {
    /// Parses one entry without resolving it.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let input = input.trim();
        let (host, port) = split_host_port(input)?;
        if host == "*" {
            return Ok(Self::Fixed(TargetAddr { net: None, port }));
        }
        if host.contains('/') {
            let net: IpNet =
                host.parse()
                    .map_err(|e: ipnet::AddrParseError| AddressError::BadAddress {
                        input: input.to_owned(),
                        reason: e.to_string(),
                    })?;
            return Ok(Self::Fixed(TargetAddr {
                net: Some(net.trunc()),
                port,
            }));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Self::Fixed(TargetAddr::host(ip, port)));
        }
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(AddressError::BadAddress {
                input: input.to_owned(),
                reason: "expected an IP address, a CIDR range, `*` or a DNS name".into(),
            });
        }
        Ok(Self::Host(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        }))
    }
}

impl TargetAddr {
    /// Parses one pattern; a host name is resolved through the system resolver (blocking),
    /// each address becoming a host route.
    pub fn parse(input: &str) -> Result<Vec<Self>, AddressError> {
        match Pattern::parse(input)? {
            Pattern::Fixed(a) => Ok(vec![a]),
            Pattern::Host(h) => h.resolve(),
        }
    }

    pub fn host(ip: IpAddr, port: u16) -> Self {
        let ip = canonical_ip(ip);
        let net = match ip {
            IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
            IpAddr::V6(v6) => IpNet::V6(Ipv6Net::from(v6)),
        };
        Self {
            net: Some(net),
            port,
        }
    }

    /// Prefix length in the kernel trie: 16 port bits, then address bits (IPv4 as mapped).
    pub fn trie_prefix(&self) -> u32 {
        16 + match self.net {
            None => 0,
            Some(IpNet::V4(n)) => 96 + u32::from(n.prefix_len()),
            Some(IpNet::V6(n)) => u32::from(n.prefix_len()),
        }
    }

    /// Key data for the kernel trie.
    pub fn trie_key(&self) -> TargetKey {
        let addr = match self.net {
            None => [0u8; 16],
            Some(IpNet::V4(n)) => ipv4_mapped(n.network().octets()),
            Some(IpNet::V6(n)) => n.network().octets(),
        };
        TargetKey {
            port: self.port.to_be_bytes(),
            addr,
            _pad: [0; 2],
        }
    }

    /// The trie prefix length if `dst` matches this pattern, as the kernel would see it.
    pub fn prefix_len_matching(&self, dst: SocketAddr) -> Option<u32> {
        if dst.port() != self.port {
            return None;
        }
        let ip = canonical_ip(dst.ip());
        let hit = match (self.net, ip) {
            (None, _) => true,
            (Some(IpNet::V4(n)), IpAddr::V4(a)) => n.contains(&a),
            (Some(IpNet::V6(n)), IpAddr::V6(a)) => n.contains(&a),
            _ => false,
        };
        hit.then(|| self.trie_prefix())
    }
}

/// The address the kernel programs match on: IPv4-mapped IPv6 as IPv4, and the wildcard
/// addresses (which reach the local host) as loopback.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => canonical_ip(IpAddr::V4(v4)),
            None if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            None => IpAddr::V6(v6),
        },
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        v4 => v4,
    }
}

fn split_host_port(input: &str) -> Result<(&str, u16), AddressError> {
    let (host, port) = if let Some(rest) = input.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(AddressError::BadAddress {
                input: input.to_owned(),
                reason: "missing `]`".into(),
            });
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err(AddressError::MissingPort(input.to_owned()));
        };
        (host, port)
    } else {
        let Some((host, port)) = input.rsplit_once(':') else {
            return Err(AddressError::MissingPort(input.to_owned()));
        };
        if host.contains(':') {
            return Err(AddressError::BadAddress {
                input: input.to_owned(),
                reason: "IPv6 addresses go in brackets: `[::1]:5432`".into(),
            });
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host, p)),
        _ => Err(AddressError::BadPort(input.to_owned())),
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            None => write!(f, "*:{}", self.port),
            Some(IpNet::V4(n)) if n.prefix_len() == 32 => write!(f, "{}:{}", n.addr(), self.port),
            Some(IpNet::V6(n)) if n.prefix_len() == 128 => {
                write!(f, "[{}]:{}", n.addr(), self.port)
            }
            Some(IpNet::V4(n)) => write!(f, "{n}:{}", self.port),
            Some(IpNet::V6(n)) => write!(f, "[{n}]:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> TargetAddr {
        let v = TargetAddr::parse(s).expect(s);
        assert_eq!(v.len(), 1, "{s}");
        v[0]
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(one("127.0.0.1:5432").to_string(), "127.0.0.1:5432");
        assert_eq!(one("[::1]:5432").to_string(), "[::1]:5432");
        assert_eq!(one("10.1.2.3/8:5432").to_string(), "10.0.0.0/8:5432");
        assert_eq!(one("[fd00::/8]:6379").to_string(), "[fd00::/8]:6379");
        assert_eq!(one("*:5432").to_string(), "*:5432");
        assert_eq!(one("[::ffff:127.0.0.9]:1").to_string(), "127.0.0.9:1");
        let local = TargetAddr::parse("localhost:5432").expect("localhost resolves");
        assert!(local.iter().any(|a| a.to_string() == "127.0.0.1:5432"));
    }

    #[test]
    fn rejects_bad_forms() {
        assert!(matches!(
            TargetAddr::parse("127.0.0.1"),
            Err(AddressError::MissingPort(_))
        ));
        assert!(matches!(
            TargetAddr::parse("127.0.0.1:0"),
            Err(AddressError::BadPort(_))
        ));
        assert!(matches!(
            TargetAddr::parse("127.0.0.1:70000"),
            Err(AddressError::BadPort(_))
        ));
        assert!(matches!(
            TargetAddr::parse("::1:5432"),
            Err(AddressError::BadAddress { .. })
        ));
        assert!(matches!(
            TargetAddr::parse("10.0.0.0/33:1"),
            Err(AddressError::BadAddress { .. })
        ));
        assert!(matches!(
            TargetAddr::parse("a b:1"),
            Err(AddressError::BadAddress { .. })
        ));
        assert!(matches!(
            TargetAddr::parse("[::1:5432"),
            Err(AddressError::BadAddress { .. })
        ));
    }

    #[test]
    fn trie_prefixes_follow_the_key_layout() {
        assert_eq!(one("*:5432").trie_prefix(), 16);
        assert_eq!(one("127.0.0.1:5432").trie_prefix(), 144);
        assert_eq!(one("10.0.0.0/8:5432").trie_prefix(), 120);
        assert_eq!(one("[::1]:5432").trie_prefix(), 144);
        let k = one("127.0.0.1:5432").trie_key();
        assert_eq!(k.port, [0x15, 0x38]);
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 127, 0, 0, 1]);
    }

    #[test]
    fn matching_mirrors_the_kernel() {
        let t = one("127.0.0.0/8:5432");
        let m = |s: &str| t.prefix_len_matching(s.parse().expect(s));
        assert_eq!(m("127.0.0.5:5432"), Some(120));
        assert_eq!(m("[::ffff:127.0.0.5]:5432"), Some(120));
        assert_eq!(m("0.0.0.0:5432"), Some(120), "wildcard reaches loopback");
        assert_eq!(m("127.0.0.5:5433"), None);
        assert_eq!(m("[::1]:5432"), None);
        let any = one("*:5432");
        assert_eq!(
            any.prefix_len_matching("[::1]:5432".parse().expect("addr")),
            Some(16)
        );
        let v6 = one("[::1]:5432");
        assert_eq!(
            v6.prefix_len_matching("[::]:5432".parse().expect("addr")),
            Some(144)
        );
    }
}
