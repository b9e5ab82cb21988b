//! Inter-process image locking, compatible with qemu's (block/file-posix.c):
//! shared OFD locks on byte 100 + i for each permission i a user holds, and on
//! byte 200 + i for each permission it does not share. Permission bits:
//! 0 consistent read, 1 write, 2 write-unchanged, 3 resize.
//!
//! A writer holds read, write and resize and shares neither write nor resize,
//! exactly like a qemu writer of a format image, so a running qemu and the
//! library refuse each other as second writers. Readers take no lock: a
//! reader does not block a writer (its cached metadata may then be stale);
//! that is more lenient than qemu, whose readers refuse writers.

use std::ffi::CString;

use libc::c_int;

use crate::sys;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

/// Bytes a writer locks: the permissions it holds and those it denies.
const WRITER_HOLDS: [i64; 3] = [
    PERM_BASE + CONSISTENT_READ,
    PERM_BASE + WRITE,
    PERM_BASE + RESIZE,
];
const WRITER_DENIES: [i64; 2] = [SHARED_BASE + WRITE, SHARED_BASE + RESIZE];
/// Bytes whose lock by someone else conflicts with a writer: someone denying
/// what we hold, or holding what we deny.
const WRITER_CONFLICTS: [i64; 5] = [
    SHARED_BASE + CONSISTENT_READ,
    SHARED_BASE + WRITE,
    SHARED_BASE + RESIZE,
    PERM_BASE + WRITE,
    PERM_BASE + RESIZE,
];

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
    !crate::config::no_lock() && WRITER_CONFLICTS.iter().any(|&b| held_by_other(fd, b))
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
    for &b in WRITER_HOLDS.iter().chain(&WRITER_DENIES) {
        if let Err(e) = set(fd, libc::F_RDLCK, b) {
            unlock_writer(fd);
            // A conflicting exclusive lock (not qemu's scheme) also means busy.
            return Err(match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) => libc::EBUSY,
                Some(n) => n,
                None => libc::EIO,
            });
        }
    }
    if other_writer(fd) {
        unlock_writer(fd);
        return Err(libc::EBUSY);
    }
    Ok(())
}

pub fn unlock_writer(fd: c_int) {
    for &b in WRITER_HOLDS.iter().chain(&WRITER_DENIES) {
        let _ = set(fd, libc::F_UNLCK, b);
    }
}
