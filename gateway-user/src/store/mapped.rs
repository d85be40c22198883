//! A file mapped shared and writable. Bytes copied into the mapping are in the page cache at
//! once, as after a `write(2)`: they outlive the process (SIGKILL, a crash) without a
//! system call per copy, and `fdatasync` on the file writes them out.
//!
//! Two rules keep a copy from raising `SIGBUS`: the file's blocks are allocated before they
//! are mapped ([`allocate`]), so a full disk is an error there and never a fault on a later
//! copy; and nothing shrinks the file under a live mapping (the daemon owns the file, mode
//! 0600, and drops the mapping before cutting it).

use std::{fs::File, io, os::fd::AsRawFd as _, ptr::NonNull};

/// Allocates the file's blocks up to `len` bytes (extending it with zeros when shorter).
pub fn allocate(file: &File, len: usize) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    // SAFETY: a plain system call on a descriptor `file` keeps open.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// The first `len` bytes of a file, mapped shared and writable; unmapped on drop.
pub struct Mapped {
    at: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone (nothing else holds its address), so it
// can move between threads like a `Vec<u8>`.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Maps `file`'s first `len` bytes, which must exist and be allocated ([`allocate`]).
    pub fn new(file: &File, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::other("cannot map zero bytes"));
        }
        // SAFETY: a new mapping at an address the kernel picks, of a descriptor that is
        // open; the result is checked before use.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let at = NonNull::new(at.cast::<u8>()).ok_or_else(|| io::Error::other("mapped at 0"))?;
        Ok(Self { at, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes mapped readable and writable at `at` for as long as `self`
        // lives, borrowed mutably through `self` only.
        unsafe { std::slice::from_raw_parts_mut(self.at.as_ptr(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.at.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn bytes_copied_into_the_mapping_are_the_files() {
        let mut f = tempfile::tempfile().expect("file");
        allocate(&f, 8192).expect("allocate");
        assert_eq!(f.metadata().expect("meta").len(), 8192);
        let mut m = Mapped::new(&f, 8192).expect("map");
        assert_eq!(m.len(), 8192);
        m.bytes_mut()[4096..4101].copy_from_slice(b"hello");
        drop(m);
        let mut all = Vec::new();
        f.read_to_end(&mut all).expect("read");
        assert_eq!(&all[4096..4101], b"hello");
        assert!(all[..4096].iter().all(|&b| b == 0), "allocated as zeros");
        assert!(Mapped::new(&f, 0).is_err());
    }
}
