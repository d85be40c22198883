//! Loading and attaching `pc_connect_unix` with the cgroup `connect_unix` attach type
//! (Linux 6.7), which the eBPF library (aya 0.14) does not offer. The program's instructions
//! come from the same object, its map references resolved to the maps the library created
//! (`aya-obj`, the library's own object reader); then the three bpf(2) calls the library
//! would make: load with the attach type, create the cgroup link, pin it.
//!
//! The program reads the connecting path through its context pointer, which the kernel
//! lays out as `struct bpf_sock_addr_kern`; [`check_layout`] holds the program's offsets
//! against the running kernel's BTF before it is attached.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use aya::maps::{Map, MapData};

use super::btf;

/// `BPF_CGROUP_UNIX_CONNECT` in `enum bpf_attach_type`.
pub const ATTACH_TYPE: u32 = 49;
/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
const PROG_TYPE: u32 = 18;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;

/// Offsets the program was built with (gateway-ebpf `SOCK_ADDR_KERN_*`).
const UADDR: u32 = 8;
const UADDRLEN: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConnectUnixError {
    #[error("the eBPF object: {0}")]
    Object(String),
    #[error("the kernel's struct bpf_sock_addr_kern is not what the program reads: {0}")]
    Layout(String),
    #[error("{what}: {source}{log}")]
    Sys {
        what: &'static str,
        source: std::io::Error,
        log: String,
    },
}

/// Whether the kernel keeps the connecting address where the program reads it.
pub fn check_layout(kernel_btf: &[u8]) -> Result<(), ConnectUnixError> {
    let wanted = [
        ("bpf_sock_addr_kern", "uaddr"),
        ("bpf_sock_addr_kern", "uaddrlen"),
    ];
    let o = btf::member_offsets(kernel_btf, &wanted)
        .map_err(|e| ConnectUnixError::Layout(e.to_string()))?;
    let at = |m: &str| o[&("bpf_sock_addr_kern".to_owned(), m.to_owned())];
    if (at("uaddr"), at("uaddrlen")) != (UADDR, UADDRLEN) {
        return Err(ConnectUnixError::Layout(format!(
            "uaddr at {}, uaddrlen at {} (the program reads {UADDR} and {UADDRLEN})",
            at("uaddr"),
            at("uaddrlen")
        )));
    }
    Ok(())
}

/// The map a program's reference names, as the library created it.
fn map_data(m: &Map) -> Option<&MapData> {
    match m {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::LruHashMap(d)
        | Map::SkStorage(d) => Some(d),
        _ => None,
    }
}

/// Loads `program` from `object` as a `connect_unix` program, its maps those of `ebpf`.
pub fn load(object: &[u8], ebpf: &aya::Ebpf, program: &str) -> Result<OwnedFd, ConnectUnixError> {
    let bad = |e: &dyn std::fmt::Display| ConnectUnixError::Object(e.to_string());
    let mut obj = aya_obj::Object::parse(object).map_err(|e| bad(&e))?;
    let fds: HashMap<&str, RawFd> = ebpf
        .maps()
        .filter_map(|(name, m)| Some((name, map_data(m)?.fd().as_fd().as_raw_fd())))
        .collect();
    // Out of the object, as the library does, so they can be lent to its relocation.
    let maps = std::mem::take(&mut obj.maps);
    let resolved: Vec<(&str, RawFd, &aya_obj::Map)> = maps
        .iter()
        .map(|(name, m)| {
            fds.get(name.as_str())
                .map(|fd| (name.as_str(), *fd, m))
                .ok_or_else(|| ConnectUnixError::Object(format!("map {name} was not created")))
        })
        .collect::<Result<_, _>>()?;
    let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(resolved.into_iter(), &text)
        .map_err(|e| bad(&e))?;
    obj.relocate_calls(&text).map_err(|e| bad(&e))?;
    let p = obj
        .programs
        .get(program)
        .ok_or_else(|| ConnectUnixError::Object(format!("no program {program}")))?;
    let f = obj
        .functions
        .get(&p.function_key())
        .ok_or_else(|| ConnectUnixError::Object(format!("no code for {program}")))?;
    let name = CString::new(&program[..program.len().min(15)]).map_err(|e| bad(&e))?;
    let mut log = vec![0u8; 1 << 20];
    let mut attr = Attr::default();
    attr.u32(0, PROG_TYPE);
    attr.u32(4, f.instructions.len() as u32);
    attr.u64(8, f.instructions.as_ptr() as u64);
    attr.u64(16, p.license.as_ptr() as u64);
    attr.u32(24, 1);
    attr.u32(28, log.len() as u32);
    attr.u64(32, log.as_mut_ptr() as u64);
    attr.bytes(48, name.as_bytes());
    attr.u32(68, ATTACH_TYPE);
    bpf(BPF_PROG_LOAD, &mut attr).map_err(|source| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&log[..end]);
        // The end of the verifier's log says why.
        let tail: String = text.lines().rev().take(8).collect::<Vec<_>>().join(" | ");
        ConnectUnixError::Sys {
            what: "load pc_connect_unix",
            source,
            log: if tail.is_empty() {
                String::new()
            } else {
                format!(" (verifier: {tail})")
            },
        }
    })
}

/// Attaches a loaded program to the cgroup `cgroup` (an open directory) as a BPF link.
pub fn attach(prog: &OwnedFd, cgroup: &std::fs::File) -> Result<OwnedFd, ConnectUnixError> {
    let mut attr = Attr::default();
    attr.u32(0, prog.as_raw_fd() as u32);
    attr.u32(4, cgroup.as_raw_fd() as u32);
    attr.u32(8, ATTACH_TYPE);
    bpf(BPF_LINK_CREATE, &mut attr).map_err(|source| ConnectUnixError::Sys {
        what: "attach pc_connect_unix",
        source,
        log: String::new(),
    })
}

/// Pins a link (or any bpf object) at `path` on bpffs.
pub fn pin(fd: &OwnedFd, path: &Path) -> Result<(), ConnectUnixError> {
    let sys = |source| ConnectUnixError::Sys {
        what: "pin pc_connect_unix",
        source,
        log: String::new(),
    };
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| sys(std::io::Error::other(e)))?;
    let mut attr = Attr::default();
    attr.u64(0, c.as_ptr() as u64);
    attr.u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop).map_err(sys)
}

/// The kernel's id of a loaded program.
pub fn prog_id(prog: &OwnedFd) -> Result<u32, ConnectUnixError> {
    // struct bpf_prog_info begins with `__u32 type; __u32 id;`.
    let mut info = [0u32; 2];
    let mut attr = Attr::default();
    attr.u32(0, prog.as_raw_fd() as u32);
    attr.u32(4, std::mem::size_of_val(&info) as u32);
    attr.u64(8, info.as_mut_ptr() as u64);
    bpf_raw(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map_err(|source| ConnectUnixError::Sys {
        what: "read the id of pc_connect_unix",
        source,
        log: String::new(),
    })?;
    Ok(info[1])
}

/// `union bpf_attr`, as zeroed bytes with the fields a command uses written in.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Default for Attr {
    fn default() -> Self {
        Self([0; 144])
    }
}

impl Attr {
    fn u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn bytes(&mut self, at: usize, b: &[u8]) {
        self.0[at..at + b.len()].copy_from_slice(b);
    }
}

/// A bpf(2) command that returns a new file descriptor.
fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<OwnedFd> {
    let fd = bpf_raw(cmd, attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn bpf_raw(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a 144-byte, 8-aligned buffer the kernel reads (and for some
    // commands writes) within its size; the pointers written into it outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel keeps the connecting address where the program reads it.
    #[test]
    fn the_running_kernel_has_the_layout_the_program_reads() {
        let btf = std::fs::read(btf::KERNEL_BTF).expect("kernel BTF");
        check_layout(&btf).expect("bpf_sock_addr_kern layout");
    }
}
