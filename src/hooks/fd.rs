//! close, dup, fcntl, sync and truncate on dummy fds (mmap: see `mmap`).

use std::panic::AssertUnwindSafe;

use libc::{c_int, c_uint, c_ulong, off_t, off64_t};

use super::open::call;
use super::{Errno, disk_error, emulate, image_fd};
use crate::fdtable::{self, is_mapped};
use crate::{guard, real};

/// close: unmaps a dummy. Closing one of the library's own fds (a program that
/// closes every fd it does not know) succeeds without closing it.
///
/// The close that drops the process's last reference to a written image
/// commits it (see `images::release`); if that fails, close returns -1/EIO
/// (the fd is closed all the same, as Linux's close always releases it), so
/// a program that checks close learns its data may be lost. fclose of a
/// stream on an image ends here too (its cookie's close), and returns EOF.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if fdtable::is_internal(fd) && !guard::inside() {
        return 0;
    }
    let mut released = Ok(());
    if is_mapped(fd) && !guard::inside() {
        let _g = guard::Guard::enter();
        if let Some(of) = fdtable::remove(fd) {
            log::debug!("close dummy fd {fd} ({})", of.image.path_str());
            let saved = crate::logger::errno();
            released = std::panic::catch_unwind(AssertUnwindSafe(|| crate::images::release(of)))
                .unwrap_or(Err(libc::EIO));
            crate::logger::set_errno(saved);
        }
    }
    let r = call!(real::CLOSE, fd);
    match released {
        Err(e) if r == 0 => {
            crate::logger::set_errno(e);
            -1
        }
        _ => r,
    }
}

/// close_range and closefrom close in one call inside libc: close the gaps
/// between the library's fds instead, and unmap dummies in the range.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    if guard::inside() || flags & libc::CLOSE_RANGE_CLOEXEC as c_int != 0 {
        return call!(real::CLOSE_RANGE, first, last, flags);
    }
    let lo = first.min(c_int::MAX as c_uint) as c_int;
    let hi = last.min(c_int::MAX as c_uint) as c_int;
    let mut keep = Vec::new();
    {
        let _g = guard::Guard::enter();
        fdtable::internal_in(lo, hi, &mut keep);
        fdtable::remove_range(lo, hi);
    }
    let mut start = lo;
    for &k in &keep {
        if k > start {
            let r = call!(real::CLOSE_RANGE, start as c_uint, (k - 1) as c_uint, flags);
            if r != 0 {
                return r;
            }
        }
        start = k + 1;
    }
    if start > hi || keep.last() == Some(&c_int::MAX) {
        return 0;
    }
    let end = if hi == c_int::MAX { last } else { hi as c_uint };
    call!(real::CLOSE_RANGE, start as c_uint, end, flags)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn closefrom(lo: c_int) {
    // SAFETY: same contract as glibc's closefrom, which uses close_range.
    unsafe { close_range(lo.max(0) as c_uint, c_uint::MAX, 0) };
}

/// After a successful dup of `old` to `new`, `new` shares `old`'s mapping.
fn after_dup(old: c_int, new: c_int) {
    // dup2(fd, fd) does nothing (and used to lose the mapping here).
    if new < 0 || new == old || guard::inside() {
        return;
    }
    let _g = guard::Guard::enter();
    if is_mapped(new) {
        drop(fdtable::remove(new));
    }
    if is_mapped(old)
        && let Some(of) = fdtable::lookup(old)
    {
        log::debug!("dup dummy fd {old} -> {new}");
        fdtable::insert(new, of.arc());
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn dup(old: c_int) -> c_int {
    let new = call!(real::DUP, old);
    if new >= 0 && is_mapped(old) {
        after_dup(old, new);
    }
    new
}

/// Before a program takes fd number `new`, move the library's own file off it.
fn free_number(new: c_int) {
    if fdtable::is_internal(new) && !guard::inside() {
        let _g = guard::Guard::enter();
        fdtable::relocate_internal(new);
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    free_number(new);
    let r = call!(real::DUP2, old, new);
    if r >= 0 && (is_mapped(old) || is_mapped(new)) {
        after_dup(old, r);
    }
    r
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    free_number(new);
    let r = call!(real::DUP3, old, new, flags);
    if r >= 0 && (is_mapped(old) || is_mapped(new)) {
        after_dup(old, r);
    }
    r
}

/// fcntl: duplicates share the mapping; everything else (flags, F_GETFL with
/// the caller's access mode, record locks) acts on the dummy. Record locks are
/// not forwarded to the container: they would conflict with the library's own
/// writer locks there, and one writer per image is already enforced.
unsafe fn fcntl_common(
    fd: c_int,
    cmd: c_int,
    arg: c_ulong,
    real: &real::Real<unsafe extern "C" fn(c_int, c_int, ...) -> c_int>,
) -> c_int {
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        let new = call!(real, fd, cmd, arg);
        if new >= 0 && (is_mapped(fd) || is_mapped(new)) {
            after_dup(fd, new);
        }
        return new;
    }
    call!(real, fd, cmd, arg)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    unsafe { fcntl_common(fd, cmd, arg, &real::FCNTL) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    unsafe { fcntl_common(fd, cmd, arg, &real::FCNTL64) }
}

fn flush(fd: c_int) -> Option<c_int> {
    let of = image_fd(fd)?;
    Some(emulate(-1, || {
        of.image.flush().map_err(|e| disk_error("fsync", &of, e))?;
        Ok(0)
    }))
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    if is_mapped(fd)
        && let Some(r) = flush(fd)
    {
        return r;
    }
    call!(real::FSYNC, fd)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    if is_mapped(fd)
        && let Some(r) = flush(fd)
    {
        return r;
    }
    call!(real::FDATASYNC, fd)
}

/// A block device cannot be truncated: EINVAL, and the container is untouched.
/// In regular-file mode, truncating to the size the file has is a no-op (cp
/// sets the final size of a copy that ends in a hole).
fn no_truncate(fd: c_int, len: i64) -> Option<c_int> {
    let of = image_fd(fd)?;
    Some(emulate(-1, || {
        if crate::config::as_file() && u64::try_from(len) == Ok(of.len) {
            Ok(0)
        } else {
            Err::<c_int, Errno>(libc::EINVAL)
        }
    }))
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn ftruncate(fd: c_int, len: off_t) -> c_int {
    if is_mapped(fd)
        && let Some(r) = no_truncate(fd, len)
    {
        return r;
    }
    call!(real::FTRUNCATE, fd, len)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn ftruncate64(fd: c_int, len: off64_t) -> c_int {
    if is_mapped(fd)
        && let Some(r) = no_truncate(fd, len)
    {
        return r;
    }
    call!(real::FTRUNCATE64, fd, len)
}
