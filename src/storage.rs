//! `vdisk::Storage` over a container file descriptor, with raw syscalls.

use std::io;

use libc::c_int;

use crate::fdtable::InternalFd;
use crate::sys;

/// An image file the library opened itself. Its fd is close-on-exec and is
/// closed when the storage is dropped.
pub struct FdStorage {
    fd: InternalFd,
    writable: bool,
}

impl FdStorage {
    pub fn new(fd: c_int, writable: bool) -> FdStorage {
        FdStorage {
            fd: InternalFd::new(fd),
            writable,
        }
    }
    pub fn fd(&self) -> c_int {
        self.fd.get()
    }
}

impl vdisk::Storage for FdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        sys::pread(self.fd(), buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        sys::pwrite(self.fd(), buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(sys::fstat(self.fd())?.st_size as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        sys::ftruncate(self.fd(), len)
    }
    fn sync(&self) -> io::Result<()> {
        sys::fdatasync(self.fd())
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
    /// On the parent's own read-only fd: the locks live and die with it
    /// (and are shared by a forked child that inherits it).
    fn lock_as_parent(&self) -> Result<(), vdisk::lock::WriterLockError> {
        crate::lock::lock_parent(self.fd())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        sys::punch_hole(self.fd(), offset, len)
    }
}
