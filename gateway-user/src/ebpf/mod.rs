//! Loading, attaching, pinning and adopting the eBPF programs, and keeping their selection
//! maps in step with the configuration.
//!
//! Pin layout under `[ebpf].pin_path` (default `/sys/fs/bpf/portcullis`):
//! - `maps/v<ABI>/<MAP>`: every map but `PC_PROCESSES` (each daemon's programs have their
//!   own; see docs/ARCHITECTURE.md). A restarted daemon opens these instead of creating new
//!   ones, so in-flight connections and counters survive it.
//! - `links/<program>@<stamp>`: the cgroup links and the process hooks (fail-closed mode
//!   only). They keep the programs attached while no daemon runs, so protected connections
//!   are refused rather than let through. A new daemon attaches and pins its links first and only then removes
//!   the old pins: there is no moment without a program attached.

pub mod btf;
pub mod connect_unix;
pub mod conns;
pub mod selection;

use std::{
    fs,
    net::{SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, RawTracePoint, SockOps,
        links::{FdLink, LinkError},
    },
};
use gateway_common::{
    ABI_VERSION, AgentRef, CONFIG_ENABLED, GlobalConfig, TargetKey, TargetValue, UnixName, counter,
    map_names, program_names,
};
use serde::Serialize;

pub use self::{conns::ConnTable, selection::Selection};
use crate::{
    cgroup::{BpffsError, Hierarchy, ensure_bpffs},
    config::{Config, FailMode},
};

/// cgroup programs are attached as BPF links, which always coexist with other programs on
/// the same cgroup (multi-attach semantics); the kernel rejects `BPF_F_ALLOW_MULTI` in the
/// link flags, so the mode that maps to flags 0 is the one to pass.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The eBPF object built from `gateway-ebpf` by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

const ALL_MAPS: [&str; 8] = [
    map_names::CONFIG,
    map_names::TARGETS,
    map_names::AGENT_CGROUPS,
    map_names::AGENT_UIDS,
    map_names::ORIGINS,
    map_names::CONNS,
    map_names::COUNTERS,
    map_names::UNIX_NAMES,
];

/// Whether protected processes' connects to Unix sockets by a target's socket name are
/// refused (`pc_connect_unix`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum UnixGuard {
    Active,
    /// Not attached: why, in a sentence an operator can act on.
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "cannot load the eBPF object: {0}\nhint: run as root (CAP_BPF, CAP_NET_ADMIN, \
         CAP_SYS_ADMIN) on Linux 5.14+ with BTF"
    )]
    Load(#[source] aya::EbpfError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("link of {name}: {source}")]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("cannot pin the link of {name} at {path}: {source}", path = path.display())]
    Pin {
        name: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error(transparent)]
    ConnectUnix(#[from] connect_unix::ConnectUnixError),
    #[error("cannot open the attach cgroup {path}: {source}", path = path.display())]
    AttachCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the pinned objects live.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps").join(format!("v{ABI_VERSION}"))
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// Pinned links, sorted.
    pub fn pinned_links(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.links())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    }

    /// Removes every pin: detaches the programs (once no process holds their links) and
    /// frees the maps. Protection stops.
    pub fn remove_all(&self) -> Result<(), EbpfError> {
        if !self.root.exists() {
            return Ok(());
        }
        // Links first, so the programs go before the maps they use; the process hooks
        // last, as when a daemon replaces another's links.
        for l in unpin_order(self.pinned_links()) {
            fs::remove_file(&l).map_err(|source| EbpfError::Io {
                what: format!("unpin {}", l.display()),
                source,
            })?;
        }
        fs::remove_dir_all(&self.root).map_err(|source| EbpfError::Io {
            what: format!("remove {}", self.root.display()),
            source,
        })
    }
}

/// Pinned links (`<program>@<stamp>`) in the order to remove them: the process hooks after
/// every other program, so no connect program is left handing out generations that no hook
/// forgets any more. Otherwise the order is kept.
fn unpin_order(mut links: Vec<PathBuf>) -> Vec<PathBuf> {
    links.sort_by_key(|p| {
        let program = p
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.split_once('@'))
            .map(|(program, _)| program);
        program.is_some_and(program_names::is_process_hook)
    });
    links
}

/// Loaded programs and their maps.
pub struct Kernel {
    ebpf: Ebpf,
    layout: PinLayout,
    global: GlobalConfig,
    /// Links held in memory (fail-open mode): they detach when the daemon exits.
    held_links: Vec<AnyLink>,
    programs: Vec<ProgramStatus>,
    attach: Option<(String, PathBuf)>,
    fail_mode: FailMode,
    unix_guard: UnixGuard,
}

/// An attached program's link: the library's, or one made with raw bpf(2) calls
/// (`pc_connect_unix`).
enum AnyLink {
    Fd(FdLink),
    Raw(OwnedFd),
}

impl From<FdLink> for AnyLink {
    fn from(l: FdLink) -> Self {
        Self::Fd(l)
    }
}

/// One attached program, for `portcullis status`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ProgramStatus {
    pub name: String,
    pub id: u32,
    /// Where its link is pinned; `None` when held in memory (fail-open).
    pub link_pin: Option<PathBuf>,
}

/// What `portcullis status` shows of the kernel side.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct KernelStatus {
    pub attach_cgroup: String,
    pub attach_path: PathBuf,
    pub pin_path: PathBuf,
    pub fail_mode: FailMode,
    pub programs: Vec<ProgramStatus>,
    pub pinned_links: Vec<PathBuf>,
    pub pinned_maps: Vec<String>,
    pub counters: Vec<(String, u64)>,
    /// Established connections the proxy has not taken yet.
    pub in_flight: usize,
    /// Live processes with a generation (they made a redirected connection).
    pub processes: usize,
    pub cgroup_selectors: usize,
    pub uid_selectors: usize,
    pub target_prefixes: usize,
    /// Unix socket names of targets that protected processes may not connect by.
    pub unix_names: usize,
    pub unix_guard: UnixGuard,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Io { what, source }
}

impl Kernel {
    /// Loads the object, adopting pinned maps of the same ABI when they exist.
    pub fn load(cfg: &Config) -> Result<Self, EbpfError> {
        let layout = PinLayout::new(&cfg.ebpf.pin_path);
        if ensure_bpffs(&layout.root)? {
            tracing::info!(path = "/sys/fs/bpf", "mounted bpffs");
        }
        for dir in [layout.maps(), layout.links()] {
            fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        }
        raise_memlock();
        let adopted = layout.map(map_names::CONFIG).exists();
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|n| (*n, layout.map(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(OBJECT).map_err(EbpfError::Load)?;
        tracing::info!(
            pin_path = %layout.root.display(),
            adopted,
            "ebpf object loaded"
        );
        Ok(Self {
            ebpf,
            layout,
            global: GlobalConfig::default(),
            held_links: Vec::new(),
            programs: Vec::new(),
            attach: None,
            fail_mode: cfg.ebpf.fail_mode,
            unix_guard: UnixGuard::Unavailable("not attached yet".into()),
        })
    }

    pub fn unix_guard(&self) -> &UnixGuard {
        &self.unix_guard
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Opens the connection table for the proxy.
    pub fn conn_table(&self) -> Result<ConnTable, EbpfError> {
        ConnTable::open(&self.layout.map(map_names::CONNS))
    }

    /// Sets the proxy addresses, the upstream mark and the network namespace the programs
    /// redirect in. Takes effect with the next [`Kernel::apply`].
    pub fn set_proxy(
        &mut self,
        v4: Option<SocketAddrV4>,
        v6: Option<SocketAddrV6>,
        mark: u32,
        netns_cookie: u64,
    ) {
        let g = &mut self.global;
        g.upstream_mark = mark;
        g.netns_cookie = netns_cookie;
        // A missing listener leaves address and port zero: connects to it fail (closed).
        if let Some(a) = v4 {
            g.proxy_ip4 = a.ip().octets();
            g.proxy_port4 = a.port().to_be_bytes();
        }
        if let Some(a) = v6 {
            g.proxy_ip6 = a.ip().octets();
            g.proxy_port6 = a.port().to_be_bytes();
        }
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, EbpfError> {
        self.ebpf
            .map_mut(name)
            .ok_or(EbpfError::MissingMap { name })
    }

    /// Makes the selection maps equal to `sel`: new entries first, stale ones after, so a
    /// change never leaves a moment with less protection than both old and new; then writes
    /// the global configuration with the enabled flag.
    pub fn apply(&mut self, sel: &Selection) -> Result<(), EbpfError> {
        let m = |name| move |source| EbpfError::Map { name, source };
        {
            let mut trie: LpmTrie<&mut MapData, TargetKey, TargetValue> =
                LpmTrie::try_from(self.map_mut(map_names::TARGETS)?)
                    .map_err(m(map_names::TARGETS))?;
            for (k, v) in &sel.targets {
                trie.insert(k, v, 0).map_err(m(map_names::TARGETS))?;
            }
            let stale: Vec<_> = trie
                .keys()
                .filter_map(Result::ok)
                .filter(|k| {
                    !sel.targets
                        .iter()
                        .any(|(d, _)| d.prefix_len() == k.prefix_len() && d.data() == k.data())
                })
                .collect();
            for k in stale {
                trie.remove(&k).map_err(m(map_names::TARGETS))?;
            }
        }
        sync_hash(
            self.map_mut(map_names::AGENT_CGROUPS)?,
            &sel.cgroups,
            map_names::AGENT_CGROUPS,
        )?;
        sync_hash(
            self.map_mut(map_names::AGENT_UIDS)?,
            &sel.uids,
            map_names::AGENT_UIDS,
        )?;
        sync_hash::<UnixName, u32>(
            self.map_mut(map_names::UNIX_NAMES)?,
            &sel.unix_names,
            map_names::UNIX_NAMES,
        )?;
        self.global.flags = CONFIG_ENABLED;
        let global = self.global;
        let mut cfg: Array<&mut MapData, GlobalConfig> =
            Array::try_from(self.map_mut(map_names::CONFIG)?).map_err(m(map_names::CONFIG))?;
        cfg.set(0, global, 0).map_err(m(map_names::CONFIG))?;
        Ok(())
    }

    /// Attaches the programs to `attach_cgroup`, pins their links (fail-closed) and
    /// then removes the links of a previous daemon.
    pub fn attach(&mut self, h: &Hierarchy, attach_cgroup: &str) -> Result<(), EbpfError> {
        let dir = h.dir(attach_cgroup);
        let cgroup = fs::File::open(&dir).map_err(|source| EbpfError::AttachCgroup {
            path: dir.clone(),
            source,
        })?;
        let old = self.layout.pinned_links();
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let mut programs: Vec<ProgramStatus> = Vec::new();
        let result = self.attach_each(&cgroup, attach_cgroup, stamp, &mut programs);
        if let Err(e) = result {
            // Leave the previous daemon's links (if any) as they were; drop ours.
            for p in &programs {
                if let Some(pin) = &p.link_pin {
                    let _ = fs::remove_file(pin);
                }
            }
            self.held_links.clear();
            return Err(e);
        }
        // The new programs run; now let the previous daemon's go, its process hooks last:
        // while its connect programs may still hand out generations from its own
        // `PC_PROCESSES` (that map is not pinned: each daemon's programs have their own,
        // and a new daemon's image cache starts empty), its hooks keep them true.
        for path in unpin_order(old) {
            fs::remove_file(&path).map_err(io(format!("unpin {}", path.display())))?;
            tracing::info!(link = %path.display(), "previous link removed");
        }
        self.programs = programs;
        self.attach = Some((attach_cgroup.to_owned(), dir));
        remove_other_abi_maps(&self.layout);
        Ok(())
    }

    fn attach_each(
        &mut self,
        cgroup: &fs::File,
        attach_cgroup: &str,
        stamp: u128,
        programs: &mut Vec<ProgramStatus>,
    ) -> Result<(), EbpfError> {
        for name in [
            program_names::CONNECT4,
            program_names::CONNECT6,
            program_names::SOCK_OPS,
            program_names::GETPEERNAME4,
            program_names::GETPEERNAME6,
        ] {
            let perr = |source| EbpfError::Program { name, source };
            let program = self.program(name)?;
            let (link, id): (FdLink, u32) = if name == program_names::SOCK_OPS {
                let p: &mut SockOps = program.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
                let id = p.info().map_err(perr)?.id();
                let link_id = p.attach(cgroup, LINK_MODE).map_err(perr)?;
                let link = p.take_link(link_id).map_err(perr)?;
                (
                    FdLink::try_from(link).map_err(|source| EbpfError::Link { name, source })?,
                    id,
                )
            } else {
                let p: &mut CgroupSockAddr = program.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
                let id = p.info().map_err(perr)?.id();
                let link_id = p.attach(cgroup, LINK_MODE).map_err(perr)?;
                let link = p.take_link(link_id).map_err(perr)?;
                (
                    FdLink::try_from(link).map_err(|source| EbpfError::Link { name, source })?,
                    id,
                )
            };
            programs.push(self.keep(name, link, id, attach_cgroup, stamp)?);
        }
        // Unix sockets by a target's name: a kernel without the hook (before 6.7) or a
        // layout the program does not read leaves them to the operator, as before.
        self.unix_guard = match self.attach_connect_unix(cgroup, attach_cgroup, stamp) {
            Ok(status) => {
                programs.push(status);
                UnixGuard::Active
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "connects to targets' Unix sockets are not refused by the kernel; \
                     the TCP hooks are unaffected"
                );
                UnixGuard::Unavailable(e.to_string())
            }
        };
        // The process hooks are global. Pinned like the others, so that while no daemon runs
        // the kernel still forgets processes that exec or exit, and no generation can
        // outlive its process into a reused pid.
        for (tracepoint, candidates) in program_names::TRACEPOINTS {
            // Every candidate is loaded, so the verifier checks each on every kernel we run
            // on, also the ones this kernel does not need.
            for &name in candidates {
                let perr = |source| EbpfError::Program { name, source };
                let p: &mut RawTracePoint = self.program(name)?.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
            }
            let (name, link, id) = self.attach_first(tracepoint, candidates)?;
            programs.push(self.keep(name, link, id, tracepoint, stamp)?);
        }
        Ok(())
    }

    /// Loads `pc_connect_unix` with the `connect_unix` attach type, attaches it to the
    /// cgroup and pins (or holds) its link.
    fn attach_connect_unix(
        &mut self,
        cgroup: &fs::File,
        attach_cgroup: &str,
        stamp: u128,
    ) -> Result<ProgramStatus, EbpfError> {
        let name = program_names::CONNECT_UNIX;
        let btf = fs::read(btf::KERNEL_BTF).map_err(io("read the kernel's BTF"))?;
        connect_unix::check_layout(&btf)?;
        let prog = connect_unix::load(OBJECT, &self.ebpf, name)?;
        let id = connect_unix::prog_id(&prog)?;
        let link = connect_unix::attach(&prog, cgroup)?;
        self.keep(name, AnyLink::Raw(link), id, attach_cgroup, stamp)
    }

    /// Attaches the first of `candidates` (loaded raw tracepoint programs, best first) that
    /// the kernel accepts on `tracepoint`. A program reading an argument this kernel's
    /// tracepoint does not pass is refused here, and the next one is tried.
    fn attach_first(
        &mut self,
        tracepoint: &'static str,
        candidates: &[&'static str],
    ) -> Result<(&'static str, FdLink, u32), EbpfError> {
        let mut refused = None;
        for &name in candidates {
            let perr = |source| EbpfError::Program { name, source };
            let p: &mut RawTracePoint = self.program(name)?.try_into().map_err(perr)?;
            let link_id = match p.attach(tracepoint) {
                Ok(link_id) => link_id,
                Err(source) => {
                    tracing::info!(
                        program = name,
                        tracepoint,
                        error = %source,
                        "the kernel refused this variant of a process hook; trying the next"
                    );
                    refused = Some(perr(source));
                    continue;
                }
            };
            let id = p.info().map_err(perr)?.id();
            let link: FdLink = p.take_link(link_id).map_err(perr)?.into();
            return Ok((name, link, id));
        }
        Err(refused.unwrap_or(EbpfError::Program {
            name: tracepoint,
            source: ProgramError::NotLoaded,
        }))
    }

    fn program(&mut self, name: &'static str) -> Result<&mut aya::programs::Program, EbpfError> {
        self.ebpf.program_mut(name).ok_or(EbpfError::Program {
            name,
            source: ProgramError::NotLoaded,
        })
    }

    /// Pins an attached program's link (fail-closed) or holds it (fail-open).
    fn keep(
        &mut self,
        name: &'static str,
        link: impl Into<AnyLink>,
        id: u32,
        attached_to: &str,
        stamp: u128,
    ) -> Result<ProgramStatus, EbpfError> {
        let link = link.into();
        let link_pin = match self.fail_mode {
            FailMode::Closed => {
                let path = self.layout.links().join(format!("{name}@{stamp}"));
                // The pin keeps the link (and so the attachment) after our fd closes.
                match link {
                    AnyLink::Fd(l) => {
                        let _pinned = l.pin(&path).map_err(|source| EbpfError::Pin {
                            name,
                            path: path.clone(),
                            source,
                        })?;
                    }
                    AnyLink::Raw(fd) => connect_unix::pin(&fd, &path)?,
                }
                Some(path)
            }
            FailMode::Open => {
                self.held_links.push(link);
                None
            }
        };
        tracing::info!(
            program = name,
            id,
            attached_to,
            pinned = link_pin.is_some(),
            "program attached"
        );
        Ok(ProgramStatus {
            name: name.to_owned(),
            id,
            link_pin,
        })
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let Some(map) = self.ebpf.map(map_names::COUNTERS) else {
            return Vec::new();
        };
        let Ok(arr) = PerCpuArray::<&MapData, u64>::try_from(map) else {
            return Vec::new();
        };
        (0..counter::COUNT)
            .map(|i| {
                let v = arr
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (counter::NAMES[i as usize].to_owned(), v)
            })
            .collect()
    }

    fn count_keys(&self, name: &'static str) -> usize {
        let Some(map) = self.ebpf.map(name) else {
            return 0;
        };
        match name {
            map_names::TARGETS => LpmTrie::<&MapData, TargetKey, TargetValue>::try_from(map)
                .map(|m| m.keys().count())
                .unwrap_or(0),
            map_names::AGENT_CGROUPS => BpfHashMap::<&MapData, u64, AgentRef>::try_from(map)
                .map(|m| m.keys().count())
                .unwrap_or(0),
            map_names::AGENT_UIDS => BpfHashMap::<&MapData, u32, AgentRef>::try_from(map)
                .map(|m| m.keys().count())
                .unwrap_or(0),
            map_names::PROCESSES => BpfHashMap::<&MapData, u32, u64>::try_from(map)
                .map(|m| m.keys().count())
                .unwrap_or(0),
            map_names::UNIX_NAMES => BpfHashMap::<&MapData, UnixName, u32>::try_from(map)
                .map(|m| m.keys().count())
                .unwrap_or(0),
            map_names::CONNS => {
                BpfHashMap::<&MapData, gateway_common::ConnKey, gateway_common::Origin>::try_from(
                    map,
                )
                .map(|m| m.keys().count())
                .unwrap_or(0)
            }
            _ => 0,
        }
    }

    pub fn status(&self) -> KernelStatus {
        let (attach_cgroup, attach_path) = self.attach.clone().unwrap_or_default();
        let mut pinned_maps: Vec<String> = fs::read_dir(self.layout.maps())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        pinned_maps.sort();
        KernelStatus {
            attach_cgroup,
            attach_path,
            pin_path: self.layout.root.clone(),
            fail_mode: self.fail_mode,
            programs: self.programs.clone(),
            pinned_links: self.layout.pinned_links(),
            pinned_maps,
            counters: self.counters(),
            in_flight: self.count_keys(map_names::CONNS),
            processes: self.count_keys(map_names::PROCESSES),
            cgroup_selectors: self.count_keys(map_names::AGENT_CGROUPS),
            uid_selectors: self.count_keys(map_names::AGENT_UIDS),
            target_prefixes: self.count_keys(map_names::TARGETS),
            unix_names: self.count_keys(map_names::UNIX_NAMES),
            unix_guard: self.unix_guard.clone(),
        }
    }
}

fn sync_hash<K, V>(
    map: &mut aya::maps::Map,
    want: &std::collections::HashMap<K, V>,
    name: &'static str,
) -> Result<(), EbpfError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let m = |source| EbpfError::Map { name, source };
    let mut h: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(map).map_err(m)?;
    for (k, v) in want {
        h.insert(k, v, 0).map_err(m)?;
    }
    let stale: Vec<K> = h
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(k))
        .collect();
    for k in stale {
        h.remove(&k).map_err(m)?;
    }
    Ok(())
}

/// Maps pinned by a daemon with another layout are unused once our links replaced its.
fn remove_other_abi_maps(layout: &PinLayout) {
    let current = layout.maps();
    for e in fs::read_dir(layout.root.join("maps"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = e.path();
        if p != current {
            match fs::remove_dir_all(&p) {
                Ok(()) => tracing::info!(path = %p.display(), "removed maps of another ABI"),
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot remove old maps"),
            }
        }
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to a properly initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("cannot raise RLIMIT_MEMLOCK; fine on Linux 5.11+");
    }
}

/// The network namespace cookie of this process (`SO_NETNS_COOKIE`, Linux 5.14+).
pub fn own_netns_cookie() -> Result<u64, EbpfError> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .map_err(io("create a socket to read the netns cookie"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SO_NETNS_COOKIE = 71
    // SAFETY: valid fd, out pointer and length for a u64 option.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            71,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(EbpfError::Io {
            what: "read SO_NETNS_COOKIE (needs Linux 5.14+)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(cookie)
}

/// Whether pinned programs exist at `pin_path` (the daemon may be down, protection is on).
pub fn pinned_state(pin_path: &Path) -> (Vec<PathBuf>, bool) {
    let layout = PinLayout::new(pin_path);
    (
        layout.pinned_links(),
        layout.map(map_names::CONFIG).exists(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_hooks_are_unpinned_last_and_the_rest_keep_their_order() {
        let link =
            |program: &str, stamp: u32| PathBuf::from(format!("/pins/links/{program}@{stamp}"));
        let links = vec![
            link(program_names::CONNECT4, 1),
            link(program_names::PROCESS_EXEC, 1),
            link(program_names::PROCESS_EXIT, 1),
            link(program_names::SOCK_OPS, 1),
            link(program_names::TASK_EXIT, 2),
            link(program_names::CONNECT4, 2),
        ];
        assert_eq!(
            unpin_order(links),
            vec![
                link(program_names::CONNECT4, 1),
                link(program_names::SOCK_OPS, 1),
                link(program_names::CONNECT4, 2),
                link(program_names::PROCESS_EXEC, 1),
                link(program_names::PROCESS_EXIT, 1),
                link(program_names::TASK_EXIT, 2),
            ]
        );
    }
}
