//! OFD byte locks for `vdisk::lock`'s qemu-compatible writer protocol, over
//! `fcntl(F_OFD_SETLK / F_OFD_GETLK)`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The writer locks on an open file description of our own, held until dropped
/// (closing the description releases them).
pub struct WriterLock {
    file: File,
}

impl WriterLock {
    /// Takes the writer locks on `path`; `Busy` while another process (the
    /// preload library, qemu, another nbdkit) writes it.
    pub fn take(path: &Path) -> Result<WriterLock, vdisk::lock::WriterLockError> {
        let file = File::open(path).map_err(vdisk::lock::WriterLockError::Io)?;
        let lock = WriterLock { file };
        vdisk::lock::lock_writer(&lock)?;
        Ok(lock)
    }

    fn fcntl(&self, cmd: libc::c_int, kind: libc::c_int, byte: u64) -> io::Result<libc::flock> {
        // SAFETY: flock is plain data; zero is a valid value for every field.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte as libc::off_t;
        fl.l_len = 1;
        // SAFETY: F_OFD_SETLK and F_OFD_GETLK take a pointer to a flock, which
        // lives for the call; the fd is open (owned by `self.file`).
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, &raw mut fl) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(fl)
        }
    }
}

impl vdisk::lock::ByteLocks for WriterLock {
    fn lock_shared(&self, byte: u64) -> io::Result<()> {
        self.fcntl(libc::F_OFD_SETLK, libc::F_RDLCK, byte).map(drop)
    }
    fn unlock(&self, byte: u64) {
        let _ = self.fcntl(libc::F_OFD_SETLK, libc::F_UNLCK, byte);
    }
    fn locked_by_other(&self, byte: u64) -> bool {
        self.fcntl(libc::F_OFD_GETLK, libc::F_WRLCK, byte)
            .is_ok_and(|fl| fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}
