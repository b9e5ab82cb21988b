//! The exported hook symbols, one file per family.
//!
//! Every hook first makes the cheapest possible test (is this fd an image? is
//! this path named like one?) and otherwise calls libc directly. Emulation runs
//! inside [`emulate`]: re-entrancy guard on, panics caught, errno managed.

pub mod aio;
pub mod alloc;
pub mod copy;
pub mod discard;
pub mod exec;
pub mod fd;
pub mod ioctl;
pub mod libaio;
mod libaio_direct;
pub mod mmap;
pub mod open;
pub mod path;
pub mod posix_aio;
pub mod rw;
pub mod stat;
pub mod stdio;
pub mod uring;

use std::panic::{AssertUnwindSafe, catch_unwind};

use libc::c_int;

use crate::fdtable::{self, FdRef, OpenFile};
use crate::guard::Guard;
use crate::logger::{errno, set_errno};

/// The error of an emulated call: an errno value.
pub type Errno = c_int;

/// Runs an emulation: on `Ok` restores the caller's errno and returns the
/// value, on `Err(e)` sets errno to `e` and returns `fail`. A panic becomes EIO.
pub fn emulate<T>(fail: T, f: impl FnOnce() -> Result<T, Errno>) -> T {
    let saved = errno();
    let _guard = Guard::enter();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => {
            set_errno(saved);
            v
        }
        Ok(Err(e)) => {
            set_errno(e);
            fail
        }
        Err(_) => {
            set_errno(libc::EIO);
            fail
        }
    }
}

/// The first statement of the hottest hooks: an fd that is not an image goes
/// to libc in a few instructions and a tail call, before the hook sets up
/// anything for the image path.
macro_rules! pass_through {
    ($fd:expr, $real:expr, $($arg:expr),*) => {
        if !crate::fdtable::is_mapped($fd)
            && let Some(f) = $real.resolved()
        {
            // SAFETY: forwarding the caller's arguments to the real function.
            return unsafe { f($($arg),*) };
        }
    };
}
pub(crate) use pass_through;

/// The image behind `fd` if it is one of our dummies; `None` sends the call to libc.
/// Callers test `fdtable::is_mapped` first, so this runs only for image fds.
pub fn image_fd(fd: c_int) -> Option<FdRef> {
    image_fd_checked(fd, fdtable::lookup)
}

/// [`image_fd`] for the data path (read, write and their variants): checks
/// the dummy's offset signature instead of its identity (see `fdtable`).
pub fn image_fd_io(fd: c_int) -> Option<FdRef> {
    image_fd_checked(fd, fdtable::lookup_io)
}

/// [`image_fd`] for read, write, readv and writev: see `fdtable::lookup_stream`.
pub fn image_fd_stream(fd: c_int) -> Option<FdRef> {
    image_fd_checked(fd, fdtable::lookup_stream)
}

fn image_fd_checked(fd: c_int, lookup: fn(c_int) -> Option<FdRef>) -> Option<FdRef> {
    if crate::guard::inside() {
        return None;
    }
    crate::config::load();
    crate::snapshot::run_if_pending();
    // No guard here: a lookup makes raw syscalls only, and takes the guard
    // itself where it drops a stale entry.
    lookup(fd)
}

/// A vdisk error on `of`: logged once here, returned as errno.
pub fn disk_error(op: &str, of: &OpenFile, e: vdisk::Error) -> Errno {
    log::warn!("{op} {}: {e}", of.image.path_str());
    crate::errno::from_vdisk(&e)
}
