//! Portcullis kernel side: cgroup programs that divert protected processes' connections to
//! the proxy and remember where they were going and who opened them.
//!
//! The contract with userspace (which map holds what, who writes and who deletes each entry)
//! is documented in `docs/ARCHITECTURE.md`; the types are in `gateway-common`.
//!
//! Flow for one connection:
//! 1. `pc_connect4` / `pc_connect6` (cgroup `connect4`/`connect6`): a TCP connect by a
//!    protected process (cgroup ancestry or uid) to a target (LPM trie on port+address) gets
//!    an [`Origin`] in the socket's local storage ([`ORIGINS`]) and its destination rewritten
//!    to the proxy's listener.
//! 2. `pc_sock_ops` (`BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`): once the handshake with the proxy
//!    completes, the origin is copied to [`CONNS`] under the client's address and port, which
//!    is the peer address the proxy sees on `accept()`. The proxy removes the entry when it
//!    takes the connection.
//! 3. `pc_sock_ops` (`BPF_SOCK_OPS_STATE_CB`, `TCP_CLOSE`): if the client socket closes
//!    before the proxy took the entry, the entry is removed here. Socket storage is freed by
//!    the kernel with the socket. No entry depends on LRU eviction.
//! 4. `pc_getpeername4` / `pc_getpeername6`: the client asking whom it is connected to
//!    hears the original destination, not the proxy.
//!
//! Beside TCP, `pc_connect_unix` (cgroup `connect_unix`) refuses a protected process's
//! connect to a Unix socket whose name, as the process wrote the path, is a target's
//! (a PostgreSQL server's `.s.PGSQL.<port>`): that socket reaches the server without
//! passing the gate. It sees the path before the kernel resolves it, so a link under
//! another name is not refused (docs/configuration.md says what that leaves).
//!
//! Beside the flow, [`PC_PROCESSES`] gives each process image that connects a generation
//! (its first redirected connect stores one; `pc_process_exec` and `pc_process_exit`, raw
//! tracepoints, forget it when the process execs or its last task exits), so the proxy can
//! trust what it read from `/proc` for one connection for the next ones of the same image.
// On the BPF target this is a no_std, no_main object. A host build of the workspace
// (`cargo build --workspace`, clippy) compiles the same code against std with an empty
// `main`, which is never run: only gateway-user/build.rs builds the real object.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, bpf_sock,
    },
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, SkStorage, lpm_trie::Key},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel as read_kernel,
        generated::{
            bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
            bpf_probe_read_kernel, bpf_probe_read_kernel_str, bpf_sk_storage_get,
        },
    },
    macros::{btf_map, cgroup_sock_addr, raw_tracepoint, sock_ops},
    programs::{RawTracePointContext, SockAddrContext, SockOpsContext},
};
use gateway_common::{
    AF_INET, AF_INET6, AGENTS_CAPACITY, AgentRef, CONFIG_ENABLED, CONNS_CAPACITY, ConnKey,
    GlobalConfig, MAX_CGROUP_DEPTH, Origin, PROCESSES_CAPACITY, TARGET_DAEMON, TARGETS_CAPACITY,
    TargetKey, TargetValue, UNIX_NAME_LEN, UNIX_NAMES_CAPACITY, UNIX_PATH_MAX, UnixName, counter,
    ipv4_mapped, ipv4_unmapped,
};

/// Reads a `bpf_sock_ops` field straight off the context pointer. The verifier only allows
/// loads at constant offsets from the unmodified context register; a volatile read keeps
/// LLVM from hoisting the field address into a register of its own.
macro_rules! ops_field {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { core::ptr::read_volatile(&raw const (*$ctx.ops).$($field)+) }
    };
}

/// Return codes of cgroup sock_addr programs.
const ALLOW: i32 = 1;
/// Makes `connect()` fail with `EPERM`.
const REJECT: i32 = 0;
/// `SOCK_STREAM` from the socket's type.
const SOCK_STREAM: u32 = 1;

#[btf_map]
static PC_CONFIG: Array<GlobalConfig, 1> = Array::new();

#[btf_map]
static PC_TARGETS: LpmTrie<TargetKey, TargetValue, { TARGETS_CAPACITY as usize }> = LpmTrie::new();

#[btf_map]
static PC_AGENT_CGROUPS: HashMap<u64, AgentRef, { AGENTS_CAPACITY as usize }> = HashMap::new();

#[btf_map]
static PC_AGENT_UIDS: HashMap<u32, AgentRef, { AGENTS_CAPACITY as usize }> = HashMap::new();

#[btf_map]
static PC_ORIGINS: SkStorage<Origin> = SkStorage::new();

#[btf_map]
static PC_CONNS: HashMap<ConnKey, Origin, { CONNS_CAPACITY as usize }> = HashMap::new();

#[btf_map]
static PC_PROCESSES: HashMap<u32, u64, { PROCESSES_CAPACITY as usize }> = HashMap::new();

#[btf_map]
static PC_UNIX_NAMES: HashMap<UnixName, u32, { UNIX_NAMES_CAPACITY as usize }> = HashMap::new();

#[btf_map]
static PC_COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = PC_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and programs do not migrate CPUs while running, so nothing
        // else writes this slot concurrently.
        unsafe { *slot += 1 };
    }
}

/// A destination, as the client asked for it.
struct Destination {
    /// IPv6 or IPv4-mapped, network byte order.
    addr: [u8; 16],
    /// Network byte order.
    port_be: [u8; 2],
}

/// What a connect hook decided.
enum Verdict {
    /// Leave the connect alone.
    Pass,
    /// Rewrite the destination to the proxy (the origin is already stored).
    Redirect,
    /// Fail the connect with `EPERM`.
    Reject,
}

// Fails closed on internal errors: a protected process whose origin cannot be stored is
// refused rather than let through unseen.
#[cgroup_sock_addr(connect4)]
pub fn pc_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run; fields are read-only except
    // user_ip4/user_port, which the connect4 attach type may write.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    // user_ip4 holds the address in network byte order; its in-memory bytes are the address.
    let ip4 = sa.user_ip4.to_ne_bytes();
    // user_port holds the port in network byte order in its low 16 bits.
    let port_be = (sa.user_port as u16).to_ne_bytes();
    let dst = Destination {
        addr: ipv4_mapped(normalize_any4(ip4)),
        port_be,
    };
    let Some(cfg) = PC_CONFIG.get(0) else {
        return ALLOW;
    };
    match decide(&ctx, cfg, &dst, AF_INET) {
        Verdict::Pass => ALLOW,
        Verdict::Reject => REJECT,
        Verdict::Redirect => {
            sa.user_ip4 = u32::from_ne_bytes(cfg.proxy_ip4);
            sa.user_port = u16::from_ne_bytes(cfg.proxy_port4) as u32;
            ALLOW
        }
    }
}

// Fails closed on internal errors, as `pc_connect4`.
#[cgroup_sock_addr(connect6)]
pub fn pc_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in pc_connect4; connect6 may write user_ip6/user_port.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let w = sa.user_ip6;
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    let mapped = ipv4_unmapped(&addr);
    let addr = match mapped {
        Some(v4) => ipv4_mapped(normalize_any4(v4)),
        None => normalize_any6(addr),
    };
    let dst = Destination {
        addr,
        port_be: (sa.user_port as u16).to_ne_bytes(),
    };
    let Some(cfg) = PC_CONFIG.get(0) else {
        return ALLOW;
    };
    match decide(&ctx, cfg, &dst, AF_INET6) {
        Verdict::Pass => ALLOW,
        Verdict::Reject => REJECT,
        Verdict::Redirect => {
            // An IPv4-mapped destination stays IPv4-mapped (the proxy's IPv4 listener), so a
            // dual-stack socket keeps talking IPv4 on the wire as it asked to.
            let target = match mapped {
                Some(_) => ipv4_mapped(cfg.proxy_ip4),
                None => cfg.proxy_ip6,
            };
            let mut i = 0;
            while i < 4 {
                sa.user_ip6[i] = u32::from_ne_bytes([
                    target[i * 4],
                    target[i * 4 + 1],
                    target[i * 4 + 2],
                    target[i * 4 + 3],
                ]);
                i += 1;
            }
            let port = match mapped {
                Some(_) => cfg.proxy_port4,
                None => cfg.proxy_port6,
            };
            sa.user_port = u16::from_ne_bytes(port) as u32;
            ALLOW
        }
    }
}

/// The origin stored on the socket of a sock_addr context, if it was redirected.
#[inline(always)]
fn stored_origin(ctx: &SockAddrContext) -> Option<Origin> {
    // SAFETY: valid context pointer; `sk` is set for getpeername hooks.
    let sk: *mut bpf_sock = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: socket storage map, socket from the context, no create flag.
    let p = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&PC_ORIGINS).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<Origin>();
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null pointer to this socket's storage.
        Some(unsafe { *p })
    }
}

// Transparency: a redirected socket's getpeername() reports the original destination, not
// the proxy. Only when the peer really is the proxy (a socket may have connected again
// elsewhere since). Fails open: on any doubt the kernel's answer stands.
#[cgroup_sock_addr(getpeername4)]
pub fn pc_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; getpeername4 may write user_ip4/user_port.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = PC_CONFIG.get(0) else {
        return ALLOW;
    };
    let is_proxy = sa.user_ip4.to_ne_bytes() == cfg.proxy_ip4
        && (sa.user_port as u16).to_ne_bytes() == cfg.proxy_port4;
    if !is_proxy {
        return ALLOW;
    }
    if let Some(o) = stored_origin(&ctx)
        && let Some(v4) = ipv4_unmapped(&o.dst_addr)
    {
        sa.user_ip4 = u32::from_ne_bytes(v4);
        sa.user_port = u16::from_ne_bytes(o.dst_port.to_be_bytes()) as u32;
    }
    ALLOW
}

// As pc_getpeername4, for IPv6 sockets (including IPv4-mapped peers).
#[cgroup_sock_addr(getpeername6)]
pub fn pc_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; getpeername6 may write user_ip6/user_port.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = PC_CONFIG.get(0) else {
        return ALLOW;
    };
    let w = sa.user_ip6;
    let mut peer = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        peer[i * 4] = b[0];
        peer[i * 4 + 1] = b[1];
        peer[i * 4 + 2] = b[2];
        peer[i * 4 + 3] = b[3];
        i += 1;
    }
    let port = (sa.user_port as u16).to_ne_bytes();
    let is_proxy = (peer == cfg.proxy_ip6 && port == cfg.proxy_port6)
        || (peer == ipv4_mapped(cfg.proxy_ip4) && port == cfg.proxy_port4);
    if !is_proxy {
        return ALLOW;
    }
    if let Some(o) = stored_origin(&ctx) {
        let mut i = 0;
        while i < 4 {
            sa.user_ip6[i] = u32::from_ne_bytes([
                o.dst_addr[i * 4],
                o.dst_addr[i * 4 + 1],
                o.dst_addr[i * 4 + 2],
                o.dst_addr[i * 4 + 3],
            ]);
            i += 1;
        }
        sa.user_port = u16::from_ne_bytes(o.dst_port.to_be_bytes()) as u32;
    }
    ALLOW
}

/// `connect()` to `0.0.0.0` reaches the local host, as `127.0.0.1` does; match it as such so
/// that the wildcard address is not a way around a loopback target.
#[inline(always)]
fn normalize_any4(v4: [u8; 4]) -> [u8; 4] {
    if v4 == [0, 0, 0, 0] {
        [127, 0, 0, 1]
    } else {
        v4
    }
}

/// `::` reaches the local host as `::1` does.
#[inline(always)]
fn normalize_any6(v6: [u8; 16]) -> [u8; 16] {
    if v6 == [0u8; 16] {
        let mut lo = [0u8; 16];
        lo[15] = 1;
        lo
    } else {
        v6
    }
}

#[inline(always)]
fn decide(ctx: &SockAddrContext, cfg: &GlobalConfig, dst: &Destination, family: u16) -> Verdict {
    if cfg.flags & CONFIG_ENABLED == 0 {
        return Verdict::Pass;
    }
    // SAFETY: valid context pointer; `sk` is always set for connect hooks.
    let sk: *mut bpf_sock = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        count(counter::PASSED);
        return Verdict::Pass;
    }
    // The proxy's own upstream sockets carry the mark: never redirect them (no loops).
    // SAFETY: non-null socket pointer from the context.
    if unsafe { (*sk).mark } == cfg.upstream_mark && cfg.upstream_mark != 0 {
        count(counter::PASSED);
        return Verdict::Pass;
    }
    let Some(agent) = protected_agent() else {
        count(counter::PASSED);
        return Verdict::Pass;
    };
    let Some(target) = PC_TARGETS.get(&Key::new(
        TargetKey::BITS,
        TargetKey {
            port: dst.port_be,
            addr: dst.addr,
            _pad: [0; 2],
        },
    )) else {
        count(counter::PASSED);
        return Verdict::Pass;
    };
    let target_id = target.target_id;
    if target_id == TARGET_DAEMON {
        count(counter::REFUSED_DAEMON);
        return Verdict::Reject;
    }
    // A connection straight to the proxy is already where it must go.
    if is_proxy(cfg, dst) {
        count(counter::PASSED);
        return Verdict::Pass;
    }
    // SAFETY: helper valid for sock_addr programs; the context pointer is valid.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    if netns_cookie != cfg.netns_cookie {
        // Rewriting to the proxy's loopback would reach this namespace's own loopback, not
        // the proxy. Refuse (fail closed) rather than let a protected process through.
        count(counter::REFUSED_NETNS);
        return Verdict::Reject;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: helper without preconditions.
    let boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    let tgid = (pid_tgid >> 32) as u32;
    let origin = Origin {
        // SAFETY: helper valid for sock_addr programs.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        netns_cookie,
        // SAFETY: helper valid for cgroup programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        boot_ns,
        process_gen: process_generation(tgid, boot_ns),
        tgid,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        agent_id: agent.agent_id,
        selected_by: agent.selected_by,
        target_id,
        family,
        dst_port: u16::from_be_bytes(dst.port_be),
        dst_addr: dst.addr,
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
    };
    // SAFETY: map pointer of a socket storage map, socket pointer from the context, and the
    // initial value lives on the stack for the call.
    let stored = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&PC_ORIGINS).cast_mut().cast(),
            sk.cast(),
            core::ptr::from_ref(&origin).cast_mut().cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<Origin>();
    if stored.is_null() {
        count(counter::ERRORS);
        return Verdict::Reject;
    }
    // A socket may connect() again after a failed attempt; the storage then already existed
    // and kept the old value.
    // SAFETY: non-null pointer to this socket's storage of type Origin.
    unsafe { *stored = origin };
    count(counter::REDIRECTED);
    Verdict::Redirect
}

/// The generation of the calling process image, stored now if it has none. 0 when the map is
/// full: the proxy then reads `/proc` for every connection of the process.
#[inline(always)]
fn process_generation(tgid: u32, now: u64) -> u64 {
    // SAFETY: the pointer into the map stays valid during the program.
    if let Some(generation) = unsafe { PC_PROCESSES.get(tgid) } {
        return *generation;
    }
    if PC_PROCESSES.insert(tgid, now, BPF_NOEXIST.into()).is_ok() {
        return now;
    }
    // Another thread of the process stored one first, or the map is full.
    // SAFETY: as above.
    unsafe { PC_PROCESSES.get(tgid) }.copied().unwrap_or(0)
}

/// The process image of the current task is replaced: its generation is forgotten, so its
/// next connection gets a new one and the proxy reads `/proc` again.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn pc_process_exec(_ctx: RawTracePointContext) -> i32 {
    forget_current_process();
    0
}

/// A task ends; when it is the last of its process (`group_dead`, the tracepoint's second
/// argument), the process's generation is forgotten. A thread that ends leaves it alone, so
/// a process whose threads come and go keeps one generation and the proxy reads `/proc`
/// once. This keeps the map to live processes and a reused pid (possible only once every
/// task of the old process has exited) from inheriting a dead process's generation.
///
/// A kernel whose tracepoint has no `group_dead` refuses to attach this program (it reads
/// past the tracepoint's arguments); the daemon then attaches [`pc_task_exit`].
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn pc_process_exit(ctx: RawTracePointContext) -> i32 {
    let group_dead: u64 = ctx.arg(1);
    if group_dead != 0 {
        forget_current_process();
    }
    0
}

/// `sched_process_exit` where the kernel does not say whether the process is done: any
/// task's end forgets the process's generation (the last one must, and which one is last
/// is not known here). A later connection of a surviving thread just gets a new one, and
/// the proxy reads `/proc` again.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn pc_task_exit(_ctx: RawTracePointContext) -> i32 {
    forget_current_process();
    0
}

#[inline(always)]
fn forget_current_process() {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // Absent for every process that never connected to a target: nothing to do then.
    let _ = PC_PROCESSES.remove(tgid);
}

#[inline(always)]
fn is_proxy(cfg: &GlobalConfig, dst: &Destination) -> bool {
    match ipv4_unmapped(&dst.addr) {
        Some(v4) => v4 == cfg.proxy_ip4 && dst.port_be == cfg.proxy_port4,
        None => dst.addr == cfg.proxy_ip6 && dst.port_be == cfg.proxy_port6,
    }
}

/// Where `struct bpf_sock_addr_kern` (what a sock_addr program's context points to) keeps
/// the address and its length: `sk`, `uaddr`, `tmp_reg`, `t_ctx`, `uaddrlen`, as since Linux
/// 6.7, which added Unix sockets to these hooks. The daemon checks them against the
/// kernel's BTF before it attaches the program.
pub const SOCK_ADDR_KERN_UADDR: u64 = 8;
pub const SOCK_ADDR_KERN_UADDRLEN: u64 = 32;
/// `offsetof(struct sockaddr_un, sun_path)`.
const SUN_PATH: u64 = 2;
/// The path buffer: a power of two above [`UNIX_PATH_MAX`].
const PATH_BUF: usize = 128;

// Loaded by the daemon with the `connect_unix` attach type (its section name is a stand-in,
// see `gateway_common::program_names::CONNECT_UNIX`). Refuses a protected process's connect
// to a Unix socket path whose last component is a target's socket name. Fails open on
// what it cannot read: the TCP hooks stay the guarantee.
#[cgroup_sock_addr(connect4)]
pub fn pc_connect_unix(ctx: SockAddrContext) -> i32 {
    if unix_target(&ctx).is_some() {
        count(counter::REFUSED_UNIX);
        return REJECT;
    }
    ALLOW
}

/// The target whose socket name the connecting path ends in, for a protected process.
#[inline(always)]
fn unix_target(ctx: &SockAddrContext) -> Option<u32> {
    let cfg = PC_CONFIG.get(0)?;
    if cfg.flags & CONFIG_ENABLED == 0 {
        return None;
    }
    protected_agent()?;
    // The context points to the kernel's `bpf_sock_addr_kern`; the path is not one of the
    // fields the verifier lets a program load, so it is read as kernel memory (a daemon
    // with CAP_PERFMON may).
    let kern = ctx.sock_addr as u64;
    // SAFETY: the helper reads kernel memory safely (a fault is an error, not a crash).
    let (uaddr, len) = unsafe {
        (
            read_kernel::<u64>((kern + SOCK_ADDR_KERN_UADDR) as *const u64).ok()?,
            read_kernel::<u32>((kern + SOCK_ADDR_KERN_UADDRLEN) as *const u32).ok()?,
        )
    };
    if uaddr == 0 {
        return None;
    }
    // The length counts the address family's two bytes before the path; the kernel has
    // capped it at `sizeof(struct sockaddr_un)`. Masks are how the verifier sees sizes
    // bounded (a comparison may be folded into another register's copy).
    let size = len.checked_sub(SUN_PATH as u32)?.min(UNIX_PATH_MAX as u32);
    let size = u64::from(size & (PATH_BUF as u32 - 1));
    let (name, end) = path_span(uaddr + SUN_PATH, size)?;
    let key = last_component(name, end)?;
    // SAFETY: the pointer into the map stays valid during the program.
    unsafe { PC_UNIX_NAMES.get(key) }.copied()
}

/// The name in the `size` bytes of a Unix address's path at kernel address `path`: where
/// it starts and how long it is. A filesystem path ends at its first NUL, or after `size`
/// bytes (a client may pass the exact length without one); an abstract name (first byte
/// NUL, no filesystem, no permissions: PostgreSQL's `unix_socket_directories = '@dir'`) is
/// the `size - 1` bytes after it. No loop: the kernel's string copy finds the NUL.
#[inline(always)]
fn path_span(path: u64, size: u64) -> Option<(u64, u64)> {
    if size == 0 {
        return None;
    }
    let mut scratch = core::mem::MaybeUninit::<[u64; PATH_BUF / 8]>::uninit();
    // One byte past `size` (inside the kernel's address buffer, which is larger) so that a
    // path without a NUL is not cut by the terminator the copy writes.
    let read = (size + 1) & (PATH_BUF as u64 - 1);
    // SAFETY: the helper reads kernel memory safely and writes at most `read` bytes
    // (less than the buffer's size) at the destination.
    let copied = unsafe {
        bpf_probe_read_kernel_str(scratch.as_mut_ptr().cast(), read as u32, path as *const _)
    };
    match copied {
        // The first byte is the NUL: an abstract name.
        1 if size > 1 => Some((path + 1, size - 1)),
        // `copied` counts the NUL it stopped at or wrote.
        c if c > 1 => Some((path, core::cmp::min(c as u64 - 1, size))),
        _ => None,
    }
}

/// The last path component of the `end` bytes at kernel address `path`, as a map key;
/// `None` when it is longer than a key holds. Only the tail is read (the component is at
/// most [`UNIX_NAME_LEN`] bytes), and it is scanned backwards in one loop of constant
/// bound, so the verifier has few states to follow; the name itself is copied by the
/// kernel, not by a loop.
#[inline(always)]
fn last_component(path: u64, end: u64) -> Option<UnixName> {
    const TAIL: u64 = UNIX_NAME_LEN as u64 + 1;
    let tl = core::cmp::min(end, TAIL) & 63;
    if tl == 0 || tl > TAIL {
        return None;
    }
    let mut tail = [0u8; 64];
    // SAFETY: as above; `tl` is at most the buffer's size.
    if unsafe {
        bpf_probe_read_kernel(
            tail.as_mut_ptr().cast(),
            tl as u32,
            (path + end - tl) as *const _,
        )
    } != 0
    {
        return None;
    }
    // Bytes after the last `/` (the whole tail when it has none).
    let mut n = 0u64;
    while n < tl {
        if *tail.get((tl - 1 - n) as usize)? == b'/' {
            break;
        }
        n += 1;
    }
    let n = n & 63;
    if n == 0 || n > UNIX_NAME_LEN as u64 {
        return None;
    }
    let mut key = UnixName::default();
    // SAFETY: as above; `n` is at most the key's size.
    if unsafe {
        bpf_probe_read_kernel(
            key.words.as_mut_ptr().cast(),
            n as u32,
            (path + end - n) as *const _,
        )
    } != 0
    {
        return None;
    }
    Some(key)
}

/// The agent selecting the current task, by uid first, then by its cgroup or any ancestor.
#[inline(always)]
fn protected_agent() -> Option<AgentRef> {
    let uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: lookups return pointers into the map that stay valid during the program.
    if let Some(agent) = unsafe { PC_AGENT_UIDS.get(uid) } {
        return Some(*agent);
    }
    let mut level: i32 = 0;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: helper valid for cgroup programs; returns 0 past the task's depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        // SAFETY: as above.
        if let Some(agent) = unsafe { PC_AGENT_CGROUPS.get(id) } {
            return Some(*agent);
        }
        level += 1;
    }
    None
}

// Fails closed: if the established connection cannot be recorded, the proxy finds no origin
// for it and refuses it.
#[sock_ops]
pub fn pc_sock_ops(ctx: SockOpsContext) -> u32 {
    match ops_field!(ctx, op) {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ops_field!(ctx, __bindgen_anon_1.args[1]) == BPF_TCP_CLOSE => {
            on_close(&ctx);
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn origin_of(ctx: &SockOpsContext) -> Option<*mut Origin> {
    // `sk` may be null and is checked.
    let sk = ops_field!(ctx, __bindgen_anon_2.sk);
    if sk.is_null() {
        return None;
    }
    // SAFETY: socket storage map, non-null full socket from the context, no create flag.
    let origin = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&PC_ORIGINS).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<Origin>();
    if origin.is_null() { None } else { Some(origin) }
}

#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    // Every field is read unconditionally, in straight-line code: loads chosen by a branch
    // get merged by LLVM into one load through a pointer phi, which the verifier rejects.
    let family = ops_field!(ctx, family);
    let ip4 = ops_field!(ctx, local_ip4);
    let w = [
        ops_field!(ctx, local_ip6[0]),
        ops_field!(ctx, local_ip6[1]),
        ops_field!(ctx, local_ip6[2]),
        ops_field!(ctx, local_ip6[3]),
    ];
    // local_port is in host byte order in bpf_sock_ops.
    let port = ops_field!(ctx, local_port) as u16;
    let addr = if family == AF_INET as u32 {
        ipv4_mapped(ip4.to_ne_bytes())
    } else {
        let mut a = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = w[i].to_ne_bytes();
            a[i * 4] = b[0];
            a[i * 4 + 1] = b[1];
            a[i * 4 + 2] = b[2];
            a[i * 4 + 3] = b[3];
            i += 1;
        }
        a
    };
    ConnKey {
        addr,
        port,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let Some(origin) = origin_of(ctx) else {
        return;
    };
    let key = conn_key(ctx);
    // SAFETY: non-null pointer to this socket's storage.
    let value = unsafe { *origin };
    if PC_CONNS.insert(key, value, BPF_ANY.into()).is_err() {
        count(counter::ERRORS);
        return;
    }
    count(counter::TRACKED);
    // Ask for state callbacks so the entry goes away when the socket closes, whatever
    // happens to the proxy.
    let flags = ops_field!(ctx, bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        count(counter::ERRORS);
    }
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let Some(origin) = origin_of(ctx) else {
        return;
    };
    let key = conn_key(ctx);
    // SAFETY: non-null pointer to this socket's storage.
    let cookie = unsafe { (*origin).socket_cookie };
    // Only remove the entry this socket wrote: the same address and port may already belong
    // to a newer connection.
    // SAFETY: the value is only read for its cookie.
    let ours = match unsafe { PC_CONNS.get(key) } {
        Some(entry) => entry.socket_cookie == cookie,
        None => false,
    };
    if ours && PC_CONNS.remove(key).is_ok() {
        count(counter::REMOVED_ON_CLOSE);
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
