//! The proxy's side of [`gateway_common::map_names::CONNS`]: take the origin of an accepted
//! connection with one `BPF_MAP_LOOKUP_AND_DELETE_ELEM` call.
//!
//! aya's `HashMap::remove` needs `&mut self`; this type owns its own map fd and issues the
//! syscall directly, so every accept task can use it concurrently without a lock.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd, OwnedFd},
    path::Path,
};

use aya::maps::MapData;
use gateway_common::{ConnKey, Origin, ipv4_mapped};

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (hash maps support it since Linux 5.14).
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The part of `union bpf_attr` used by the map element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[derive(Debug)]
pub struct ConnTable {
    fd: OwnedFd,
}

impl ConnTable {
    /// Opens the pinned map.
    pub fn open(pin: &Path) -> Result<Self, super::EbpfError> {
        let map = MapData::from_pin(pin).map_err(|source| super::EbpfError::Map {
            name: gateway_common::map_names::CONNS,
            source,
        })?;
        let fd = map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| super::EbpfError::Io {
                what: "duplicate the connection map fd".into(),
                source,
            })?;
        Ok(Self { fd })
    }

    /// The key the kernel used for a connection whose client address the proxy sees as
    /// `peer`.
    pub fn key_for(peer: SocketAddr) -> ConnKey {
        let addr = match peer.ip() {
            IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        ConnKey {
            addr,
            port: peer.port(),
            _pad: [0; 2],
        }
    }

    /// Removes and returns the origin recorded for `peer`, if any.
    pub fn take(&self, peer: SocketAddr) -> io::Result<Option<Origin>> {
        let key = Self::key_for(peer);
        let mut value = Origin::default();
        let attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_mut(&mut value) as u64,
            flags: 0,
        };
        // SAFETY: attr points at a live key and a writable value of the map's key and value
        // sizes (checked by the size asserts in gateway-common); the size passed is attr's.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                &raw const attr,
                std::mem::size_of::<ElemAttr>() as libc::c_uint,
            )
        };
        if ret == 0 {
            return Ok(Some(value));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_kernel_layout() {
        let k = ConnTable::key_for("127.0.0.1:40000".parse().expect("addr"));
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(k.port, 40000);
        let k = ConnTable::key_for("[::1]:1".parse().expect("addr"));
        assert_eq!(k.addr[15], 1);
    }
}
