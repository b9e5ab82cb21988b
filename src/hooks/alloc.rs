//! fallocate, posix_fallocate, advice, the sync family, truncate(path) and
//! fstatfs on images.

use std::ffi::CStr;

use libc::{c_char, c_int, c_uint, off_t, off64_t};

use super::open::{absolute, call, is_candidate};
use super::{disk_error, emulate, image_fd};
use crate::fdtable::is_mapped;
use crate::{guard, images, real, sys};

/// fallocate on a dummy: discard or zeroing as a block device does it
/// (see `hooks::discard`).
fn fallocate_common(fd: c_int, mode: c_int, off: i64, len: i64) -> Option<c_int> {
    let of = image_fd(fd)?;
    Some(emulate(-1, || {
        super::discard::fallocate(&of, mode, off, len)
    }))
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, off: off_t, len: off_t) -> c_int {
    if is_mapped(fd)
        && let Some(r) = fallocate_common(fd, mode, off, len)
    {
        return r;
    }
    call!(real::FALLOCATE, fd, mode, off, len)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, off: off64_t, len: off64_t) -> c_int {
    if is_mapped(fd)
        && let Some(r) = fallocate_common(fd, mode, off, len)
    {
        return r;
    }
    call!(real::FALLOCATE64, fd, mode, off, len)
}

/// posix_fallocate inside the disk: nothing to do (0). Hooked because glibc's
/// fallback would write into the dummy. Returns an error number, not -1.
fn posix_fallocate_common(fd: c_int, off: i64, len: i64) -> Option<c_int> {
    let of = image_fd(fd)?;
    Some(match off.checked_add(len) {
        _ if off < 0 || len <= 0 => libc::EINVAL,
        Some(end) if end as u64 <= of.len => 0,
        _ => libc::EFBIG,
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn posix_fallocate(fd: c_int, off: off_t, len: off_t) -> c_int {
    if is_mapped(fd)
        && let Some(r) = posix_fallocate_common(fd, off, len)
    {
        return r;
    }
    match real::POSIX_FALLOCATE.get() {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(fd, off, len) },
        None => libc::ENOSYS,
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn posix_fallocate64(fd: c_int, off: off64_t, len: off64_t) -> c_int {
    if is_mapped(fd)
        && let Some(r) = posix_fallocate_common(fd, off, len)
    {
        return r;
    }
    match real::POSIX_FALLOCATE64.get() {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(fd, off, len) },
        None => libc::ENOSYS,
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn posix_fadvise(fd: c_int, off: off_t, len: off_t, advice: c_int) -> c_int {
    if is_mapped(fd) && image_fd(fd).is_some() {
        return 0;
    }
    match real::POSIX_FADVISE.get() {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(fd, off, len, advice) },
        None => libc::ENOSYS,
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn posix_fadvise64(
    fd: c_int,
    off: off64_t,
    len: off64_t,
    advice: c_int,
) -> c_int {
    if is_mapped(fd) && image_fd(fd).is_some() {
        return 0;
    }
    match real::POSIX_FADVISE64.get() {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(fd, off, len, advice) },
        None => libc::ENOSYS,
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn readahead(fd: c_int, off: off64_t, count: libc::size_t) -> libc::ssize_t {
    if is_mapped(fd) && image_fd(fd).is_some() {
        return 0;
    }
    call!(real::READAHEAD, fd, off, count)
}

fn flush_fd(fd: c_int) -> Option<c_int> {
    let of = image_fd(fd)?;
    Some(emulate(-1, || {
        of.image.flush().map_err(|e| disk_error("sync", &of, e))?;
        Ok(0)
    }))
}

/// sync(): flush every open image, then the real sync (libfdisk and sgdisk call
/// it before BLKRRPART).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sync() {
    if !guard::inside() {
        emulate((), || {
            images::flush_all();
            Ok(())
        });
    }
    if let Some(f) = real::SYNC.get() {
        // SAFETY: no arguments.
        unsafe { f() }
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn syncfs(fd: c_int) -> c_int {
    if is_mapped(fd)
        && let Some(r) = flush_fd(fd)
    {
        return r;
    }
    call!(real::SYNCFS, fd)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sync_file_range(
    fd: c_int,
    off: off64_t,
    n: off64_t,
    flags: c_uint,
) -> c_int {
    if is_mapped(fd)
        && let Some(r) = flush_fd(fd)
    {
        return r;
    }
    call!(real::SYNC_FILE_RANGE, fd, off, n, flags)
}

/// truncate(path) of an image: a block device cannot be truncated, and the
/// container must never be.
fn truncate_image(path: *const c_char) -> Option<c_int> {
    if path.is_null() || guard::inside() {
        return None;
    }
    // SAFETY: non-NULL path from the caller.
    let p = unsafe { CStr::from_ptr(path) };
    crate::config::load();
    if !is_candidate(p) {
        return None;
    }
    let r = emulate(None, || {
        let abs = absolute(libc::AT_FDCWD, p)?;
        let st = sys::fstatat(libc::AT_FDCWD, &abs, 0).map_err(|e| crate::errno::from_io(&e))?;
        let image = st.st_mode & libc::S_IFMT == libc::S_IFREG
            && images::is_image(&abs, st.st_dev, st.st_ino);
        Ok(image.then_some(()))
    });
    r.map(|()| {
        crate::logger::set_errno(libc::EINVAL);
        -1
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn truncate(path: *const c_char, len: off_t) -> c_int {
    if let Some(r) = truncate_image(path) {
        return r;
    }
    call!(real::TRUNCATE, path, len)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn truncate64(path: *const c_char, len: off64_t) -> c_int {
    if let Some(r) = truncate_image(path) {
        return r;
    }
    call!(real::TRUNCATE64, path, len)
}

/// fstatfs of a dummy describes the file system holding the container.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fstatfs(fd: c_int, buf: *mut libc::statfs) -> c_int {
    let fd = if is_mapped(fd) {
        image_fd(fd).map_or(fd, |of| of.image.container_fd())
    } else {
        fd
    };
    call!(real::FSTATFS, fd, buf)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fstatfs64(fd: c_int, buf: *mut libc::statfs64) -> c_int {
    let fd = if is_mapped(fd) {
        image_fd(fd).map_or(fd, |of| of.image.container_fd())
    } else {
        fd
    };
    call!(real::FSTATFS64, fd, buf)
}
