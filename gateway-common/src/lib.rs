//! Types shared by the Portcullis eBPF programs (`gateway-ebpf`) and the daemon
//! (`gateway-user`).
//!
//! Everything here crosses the kernel/userspace boundary through BPF maps, so every type is
//! `#[repr(C)]`, `Copy`, built from fixed-width integers and byte arrays, with explicit
//! padding, no `bool` and no Rust enums (codes are integers with named constants). Each type
//! has a compile-time size assertion: a change of layout is an ABI change and must bump
//! [`ABI_VERSION`], which names the directory the maps are pinned in.
//!
//! Byte order is spelled out on every address and port field.
#![no_std]
// The only unsafe code is the `Pod` impls behind the `user` feature.
#![cfg_attr(not(feature = "user"), forbid(unsafe_code))]

/// Version of the map layout. Pinned maps live under `<pin_path>/maps/v<ABI_VERSION>`, so a
/// daemon with a different layout never adopts maps it cannot read.
pub const ABI_VERSION: u32 = 4;

/// Names of the maps, as declared in `gateway-ebpf` and pinned by the daemon.
pub mod map_names {
    /// [`crate::GlobalConfig`] at index 0.
    pub const CONFIG: &str = "PC_CONFIG";
    /// LPM trie: [`crate::TargetKey`] → [`crate::TargetValue`].
    pub const TARGETS: &str = "PC_TARGETS";
    /// Hash: cgroup id (`u64`) → [`crate::AgentRef`].
    pub const AGENT_CGROUPS: &str = "PC_AGENT_CGROUPS";
    /// Hash: uid (`u32`) → [`crate::AgentRef`].
    pub const AGENT_UIDS: &str = "PC_AGENT_UIDS";
    /// Socket-local storage: [`crate::Origin`] of each redirected client socket.
    pub const ORIGINS: &str = "PC_ORIGINS";
    /// Hash: [`crate::ConnKey`] → [`crate::Origin`], established connections not yet
    /// accepted by the proxy.
    pub const CONNS: &str = "PC_CONNS";
    /// Per-CPU array of `u64` counters indexed by [`crate::counter`].
    pub const COUNTERS: &str = "PC_COUNTERS";
    /// Hash: tgid (`u32`) → generation (`u64`) of the process image that made a redirected
    /// connection; see [`crate::Origin::process_gen`].
    pub const PROCESSES: &str = "PC_PROCESSES";
    /// Hash: [`crate::UnixName`] → target id (`u32`): the names of Unix sockets through
    /// which a target is reached without TCP (a PostgreSQL target's `.s.PGSQL.<port>`).
    pub const UNIX_NAMES: &str = "PC_UNIX_NAMES";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "pc_connect4";
    pub const CONNECT6: &str = "pc_connect6";
    pub const SOCK_OPS: &str = "pc_sock_ops";
    pub const GETPEERNAME4: &str = "pc_getpeername4";
    pub const GETPEERNAME6: &str = "pc_getpeername6";
    /// Raw tracepoint `sched_process_exec`: the process image changed.
    pub const PROCESS_EXEC: &str = "pc_process_exec";
    /// Raw tracepoint `sched_process_exit`: the last task of a process ended (the
    /// tracepoint's `group_dead` argument, which not every kernel passes).
    pub const PROCESS_EXIT: &str = "pc_process_exit";
    /// Raw tracepoint `sched_process_exit` on kernels without `group_dead`: any task ended.
    pub const TASK_EXIT: &str = "pc_task_exit";
    /// cgroup `connect_unix` (Linux 6.7): a protected process's connect to a Unix socket
    /// by a target's socket name is refused. Its section says `connect4` (the eBPF library
    /// knows no `connect_unix`); the daemon loads and attaches it itself.
    pub const CONNECT_UNIX: &str = "pc_connect_unix";
    /// The raw tracepoints and the programs that can serve each, best first. All are
    /// loaded; the first the kernel attaches is used (one reading an argument this kernel's
    /// tracepoint lacks is refused at attach time).
    pub const TRACEPOINTS: [(&str, &[&str]); 2] = [
        ("sched_process_exec", &[PROCESS_EXEC]),
        ("sched_process_exit", &[PROCESS_EXIT, TASK_EXIT]),
    ];
    /// Whether `name` is one of the process hooks above.
    pub fn is_process_hook(name: &str) -> bool {
        TRACEPOINTS
            .iter()
            .any(|(_, programs)| programs.contains(&name))
    }
}

/// Capacity of [`map_names::CONNS`]. An entry lives from the TCP handshake until the proxy
/// accepts the connection (microseconds), so this bounds connections *in flight*, not open
/// ones. When it is full the program counts an error and the proxy refuses the connection.
pub const CONNS_CAPACITY: u32 = 65_536;
/// Capacity of [`map_names::PROCESSES`]: live processes that have made a redirected
/// connection. When it is full, new processes get generation 0 (their identity is read from
/// `/proc` on every connection instead of once per process image).
pub const PROCESSES_CAPACITY: u32 = 65_536;
/// Capacity of the target trie.
pub const TARGETS_CAPACITY: u32 = 4_096;
/// Capacity of each agent selector map.
pub const AGENTS_CAPACITY: u32 = 4_096;
/// Capacity of [`map_names::UNIX_NAMES`].
pub const UNIX_NAMES_CAPACITY: u32 = 1_024;
/// Longest Unix socket name (last path component) [`UnixName`] holds; longer names are
/// never matched.
pub const UNIX_NAME_LEN: usize = 32;
/// `sizeof(sun_path)`: the longest path a Unix socket can be bound to.
pub const UNIX_PATH_MAX: usize = 108;

/// The last component of a Unix socket path, zero-padded, as the bytes of four words in
/// memory order (words, so that a program clears and fills it with word stores): the key of
/// [`map_names::UNIX_NAMES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnixName {
    pub words: [u64; UNIX_NAME_LEN / 8],
}

impl UnixName {
    /// `None` when the name is empty or longer than [`UNIX_NAME_LEN`].
    pub fn new(name: &[u8]) -> Option<Self> {
        if name.is_empty() || name.len() > UNIX_NAME_LEN {
            return None;
        }
        let mut k = Self::default();
        let mut i = 0;
        while i < name.len() {
            k.set(i, name[i]);
            i += 1;
        }
        Some(k)
    }

    /// Sets byte `i` (below [`UNIX_NAME_LEN`]) of the name.
    #[inline(always)]
    pub fn set(&mut self, i: usize, b: u8) {
        let shift = if cfg!(target_endian = "little") {
            (i % 8) * 8
        } else {
            (7 - i % 8) * 8
        };
        if let Some(w) = self.words.get_mut(i / 8) {
            *w |= u64::from(b) << shift;
        }
    }
}

const _: () = assert!(core::mem::size_of::<UnixName>() == UNIX_NAME_LEN);

/// Deepest cgroup level the programs walk when looking for a protected ancestor.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// Indices into [`map_names::COUNTERS`].
pub mod counter {
    /// A connect() by a protected process to a target was rewritten to the proxy.
    pub const REDIRECTED: u32 = 0;
    /// A TCP connect() was left alone (unprotected process, non-target, or the proxy's own).
    pub const PASSED: u32 = 1;
    /// Something failed inside a program (storage allocation, map update). Each program
    /// documents whether it then fails open or closed.
    pub const ERRORS: u32 = 2;
    /// A protected process in a foreign network namespace tried to reach a target: refused,
    /// because rewriting it to the proxy's loopback would land in *its* namespace.
    pub const REFUSED_NETNS: u32 = 3;
    /// An established redirected connection was recorded for the proxy to find.
    pub const TRACKED: u32 = 4;
    /// A tracked entry was removed by the kernel because the client socket closed before
    /// the proxy took it (the proxy removes the entries it takes itself).
    pub const REMOVED_ON_CLOSE: u32 = 5;
    /// A protected process tried to connect to a Unix socket by a target's socket name:
    /// refused.
    pub const REFUSED_UNIX: u32 = 6;
    /// A protected process tried to connect to one of the daemon's own endpoints (the
    /// metrics listener, [`super::TARGET_DAEMON`]): refused.
    pub const REFUSED_DAEMON: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
    /// Names, for logs and metrics, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "passed",
        "errors",
        "refused_netns",
        "tracked",
        "removed_on_close",
        "refused_unix",
        "refused_daemon",
    ];
}

/// `GlobalConfig::flags`: the daemon has filled the maps; without it every program passes.
pub const CONFIG_ENABLED: u32 = 1;

/// `AF_INET` and `AF_INET6` as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Daemon-wide settings, the only entry of [`map_names::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// `CONFIG_ENABLED` once the daemon has written the selection maps.
    pub flags: u32,
    /// `SO_MARK` the proxy sets on its upstream sockets; connects carrying it are never
    /// redirected (no loops). Setting a mark needs `CAP_NET_ADMIN`, which agents lack.
    pub upstream_mark: u32,
    /// Network namespace cookie of the proxy. Redirection to loopback only makes sense in
    /// that namespace.
    pub netns_cookie: u64,
    /// IPv4 listener address of the proxy, network byte order.
    pub proxy_ip4: [u8; 4],
    /// IPv4 listener port, network byte order.
    pub proxy_port4: [u8; 2],
    /// IPv6 listener port, network byte order.
    pub proxy_port6: [u8; 2],
    /// IPv6 listener address of the proxy, network byte order.
    pub proxy_ip6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 40);

/// Key of the target trie: port then address, both network byte order, so that a prefix of
/// 16 bits selects "this port at any address" and `16 + 96 + n` selects an IPv4 `/n`.
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so one trie serves both
/// families and IPv4-mapped IPv6 destinations match their IPv4 targets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TargetKey {
    /// Destination port, network byte order.
    pub port: [u8; 2],
    /// Destination address, IPv6 or IPv4-mapped, network byte order.
    pub addr: [u8; 16],
    /// Beyond every prefix; keeps the key a multiple of the value's alignment.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<TargetKey>() == 20);

impl TargetKey {
    /// Number of meaningful bits in a full key.
    pub const BITS: u32 = 16 + 128;
}

/// Value of the target trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetValue {
    /// Index of the target in the daemon's configuration at the time it filled the map.
    pub target_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<TargetValue>() == 8);

/// `TargetValue::target_id` of the daemon's own endpoints (its metrics listener): a
/// protected process's connect there is refused, not redirected, so an agent can neither
/// read the metrics nor tie up the endpoint the operator's monitoring scrapes.
pub const TARGET_DAEMON: u32 = u32::MAX;

/// Which agent a cgroup or uid selects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentRef {
    /// Index of the agent in the daemon's configuration.
    pub agent_id: u32,
    /// `SELECTED_BY_*`.
    pub selected_by: u32,
}
const _: () = assert!(core::mem::size_of::<AgentRef>() == 8);

/// `AgentRef::selected_by` / `Origin::selected_by`.
pub const SELECTED_BY_CGROUP: u32 = 1;
pub const SELECTED_BY_UID: u32 = 2;

/// Key under which an established redirected connection waits for the proxy: the client's
/// local address and port, i.e. the peer address the proxy sees on `accept()`.
///
/// The proxy listens on one address per family, so the client's address and port identify
/// the connection among those the proxy is about to accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Client address, IPv6 or IPv4-mapped, network byte order.
    pub addr: [u8; 16],
    /// Client port, **host** byte order (as `bpf_sock_ops.local_port` gives it).
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 20);

/// What the kernel knows about a redirected connection at the moment of `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// Socket cookie of the client socket (stable for the socket's life).
    pub socket_cookie: u64,
    /// Network namespace cookie of the client socket.
    pub netns_cookie: u64,
    /// cgroup v2 id of the connecting task.
    pub cgroup_id: u64,
    /// `CLOCK_BOOTTIME` of the connect, nanoseconds.
    pub boot_ns: u64,
    /// Generation of the connecting process image: set (to the `CLOCK_BOOTTIME` of its
    /// first redirected connect) once per process and tgid, and forgotten by the kernel when
    /// the process execs or one of its tasks exits. Equal `(tgid, process_gen)` pairs
    /// therefore name the same process running the same executable, which is what lets the
    /// proxy read `/proc` once per process image. 0: unknown (never reused).
    pub process_gen: u64,
    /// Thread group id (the "pid" users see).
    pub tgid: u32,
    /// Thread id of the connecting thread.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Agent the kernel selected, see [`AgentRef`].
    pub agent_id: u32,
    pub selected_by: u32,
    /// Target the destination matched, see [`TargetValue`].
    pub target_id: u32,
    /// `AF_INET` or `AF_INET6`: the family of the client's socket.
    pub family: u16,
    /// Original destination port, **host** byte order.
    pub dst_port: u16,
    /// Original destination address, IPv6 or IPv4-mapped, network byte order.
    pub dst_addr: [u8; 16],
    /// `comm` of the connecting task, NUL-padded.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Origin>() == 104);

/// `::ffff:a.b.c.d` for an IPv4 address given in network byte order.
#[inline(always)]
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The IPv4 address inside `::ffff:a.b.c.d`, if `v6` is IPv4-mapped.
#[inline(always)]
pub const fn ipv4_unmapped(v6: &[u8; 16]) -> Option<[u8; 4]> {
    if v6[0] == 0
        && v6[1] == 0
        && v6[2] == 0
        && v6[3] == 0
        && v6[4] == 0
        && v6[5] == 0
        && v6[6] == 0
        && v6[7] == 0
        && v6[8] == 0
        && v6[9] == 0
        && v6[10] == 0xff
        && v6[11] == 0xff
    {
        Some([v6[12], v6[13], v6[14], v6[15]])
    } else {
        None
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), Copy, made only of integers and byte arrays with explicit
    // padding fields, so every bit pattern is valid and there is no implicit padding.
    unsafe impl aya::Pod for super::GlobalConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TargetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TargetValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AgentRef {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Origin {}
    // SAFETY: repr(C) array of bytes, no padding.
    unsafe impl aya::Pod for super::UnixName {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_round_trip() {
        let m = ipv4_mapped([127, 0, 0, 7]);
        assert_eq!(ipv4_unmapped(&m), Some([127, 0, 0, 7]));
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(ipv4_unmapped(&v6), None);
    }
}
