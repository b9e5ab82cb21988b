//! `vdisk::Storage` over a container file descriptor, with raw syscalls.

use std::io;

use libc::c_int;

use crate::fdtable::InternalFd;
use crate::sys;

/// Open file descriptions of one file the data path reads through, at most.
const MAX_READ_FDS: usize = 4;

/// An image file the library opened itself. Its fds are close-on-exec and
/// are closed when the storage is dropped.
pub struct FdStorage {
    fd: InternalFd,
    writable: bool,
    /// More read-only open file descriptions of the same file, for reads on
    /// other CPUs (see [`FdStorage::with_read_fds`]). Locks, writes, syncs
    /// and fstat use `fd` only.
    read_fds: Vec<InternalFd>,
}

impl FdStorage {
    pub fn new(fd: c_int, writable: bool) -> FdStorage {
        FdStorage {
            fd: InternalFd::new(fd),
            writable,
            read_fds: Vec::new(),
        }
    }
    pub fn fd(&self) -> c_int {
        self.fd.get()
    }

    /// Adds a read-only open file description of the file per CPU beyond
    /// the first (up to [`MAX_READ_FDS`] in all). In a multi-threaded process
    /// every pread writes its open file (the reference count the kernel takes
    /// for the call, the read-ahead state), so threads on two cores reading
    /// one image through one description moved those cache lines between the
    /// cores on each call. Where a reopen fails, reads share what there is.
    pub fn with_read_fds(mut self) -> FdStorage {
        let want = sys::cpu_count().min(MAX_READ_FDS).saturating_sub(1);
        for _ in 0..want {
            match crate::lock::reopen(self.fd()) {
                Ok(fd) => self.read_fds.push(InternalFd::new(fd)),
                Err(e) => {
                    log::debug!("no second read fd of an image: {e}");
                    break;
                }
            }
        }
        self
    }

    /// The description this CPU reads through.
    #[inline]
    fn read_fd(&self) -> c_int {
        match self.read_fds.len() {
            0 => self.fd(),
            n => match sys::cpu() % (n + 1) {
                0 => self.fd(),
                i => self.read_fds[i - 1].get(),
            },
        }
    }
}

impl vdisk::Storage for FdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        sys::pread(self.read_fd(), buf, offset)
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
