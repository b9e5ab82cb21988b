//! Inter-process image locking: the qemu-compatible protocol lives in
//! `vdisk::lock`; this is its byte-lock primitive over raw `fcntl` OFD locks
//! (never through the hooks): writer locks on images written, parent locks
//! on every parent opened.

use std::ffi::CString;

use libc::c_int;

use crate::sys;

/// The OFD locks of one open file description of ours.
struct FdLocks(c_int);

impl vdisk::lock::ByteLocks for FdLocks {
    fn lock_shared(&self, byte: u64) -> std::io::Result<()> {
        set(self.0, libc::F_RDLCK, byte as i64)
    }
    fn unlock(&self, byte: u64) {
        let _ = set(self.0, libc::F_UNLCK, byte as i64);
    }
    fn locked_by_other(&self, byte: u64) -> bool {
        held_by_other(self.0, byte as i64)
    }
}

fn flock(kind: c_int, start: i64) -> libc::flock {
    // SAFETY: flock is plain data; zero is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set(fd: c_int, kind: c_int, start: i64) -> std::io::Result<()> {
    let mut fl = flock(kind, start);
    sys::fcntl(fd, libc::F_OFD_SETLK, &raw mut fl as libc::c_long).map(drop)
}

/// Whether another open file description holds a lock on byte `start`.
fn held_by_other(fd: c_int, start: i64) -> bool {
    let mut fl = flock(libc::F_WRLCK, start);
    match sys::fcntl(fd, libc::F_OFD_GETLK, &raw mut fl as libc::c_long) {
        Ok(_) => fl.l_type != libc::F_UNLCK as libc::c_short,
        Err(_) => false,
    }
}

/// Whether another process (or qemu) is writing the image open on `fd`.
pub fn other_writer(fd: c_int) -> bool {
    !crate::config::no_lock() && vdisk::lock::other_writer(&FdLocks(fd))
}

/// Why a writer of the image open on `fd` is refused now (another writer,
/// or open children of it), for the log line.
pub fn writer_refusal(fd: c_int) -> &'static str {
    vdisk::lock::refusal(&FdLocks(fd)).unwrap_or(vdisk::lock::BUSY_MESSAGE)
}

/// Takes a parent's locks (qemu's for a backing file) on `fd`, the parent's
/// own read-only description: held until it closes. `Busy` while another
/// process writes the parent.
pub fn lock_parent(fd: c_int) -> Result<(), vdisk::lock::WriterLockError> {
    if crate::config::no_lock() {
        return Ok(());
    }
    vdisk::lock::lock_reader(&FdLocks(fd))
}

/// A new open file description of the container on `fd`, for our locks.
pub fn reopen(fd: c_int) -> std::io::Result<c_int> {
    let path = CString::new(format!("/proc/self/fd/{fd}"))
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let new = sys::openat(
        libc::AT_FDCWD,
        &path,
        libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY,
        0,
    )?;
    Ok(match sys::fcntl(new, libc::F_DUPFD_CLOEXEC, 300) {
        Ok(high) => {
            sys::close(new);
            high as c_int
        }
        Err(_) => new,
    })
}

/// Takes the writer locks on `fd` (an open file description of our own), then
/// checks for conflicts, as qemu does: two racing writers both see the other.
/// On a conflict the locks are released and EBUSY returned.
pub fn lock_writer(fd: c_int) -> Result<(), c_int> {
    if crate::config::no_lock() {
        return Ok(());
    }
    vdisk::lock::lock_writer(&FdLocks(fd)).map_err(|e| match e {
        vdisk::lock::WriterLockError::Busy => libc::EBUSY,
        vdisk::lock::WriterLockError::Io(e) => crate::errno::from_io(&e),
    })
}
