//! stdio on images: fopen, fopen64, fdopen, freopen and freopen64 return
//! `fopencookie` streams whose callbacks go through the fd emulation. glibc's
//! own streams read and close through internal syscalls we cannot see.
//!
//! `fileno()` of a cookie stream is -1, which breaks programs that seek the
//! fd under the stream (od -j via gnulib's fseeko), so `_fileno` is set to the
//! dummy fd (glibc's struct layout, checked at build time for this target).

use std::ffi::{CStr, c_void};
use std::ptr::null_mut;

use libc::{FILE, c_char, c_int, off64_t, size_t, ssize_t};

use super::open::{may_be_image, open_path};
use crate::fdtable::is_mapped;
use crate::{guard, real};

#[cfg(all(target_env = "gnu", target_pointer_width = "64"))]
const FILENO_OFFSET: usize = 112;

#[repr(C)]
struct CookieIo {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, size_t) -> ssize_t>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, size_t) -> ssize_t>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut off64_t, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

unsafe extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, io: CookieIo) -> *mut FILE;
    static mut stdin: *mut FILE;
    static mut stdout: *mut FILE;
    static mut stderr: *mut FILE;
}

// The cookie is the dummy fd itself, as a pointer-sized integer.
fn fd_of(cookie: *mut c_void) -> c_int {
    cookie as usize as c_int
}

unsafe extern "C" fn cookie_read(cookie: *mut c_void, buf: *mut c_char, n: size_t) -> ssize_t {
    // SAFETY: stdio passes its own buffer of n bytes.
    unsafe { super::rw::read(fd_of(cookie), buf.cast(), n) }
}

unsafe extern "C" fn cookie_write(cookie: *mut c_void, buf: *const c_char, n: size_t) -> ssize_t {
    // SAFETY: as above. stdio treats a short count as an error: return 0 then,
    // which glibc reports as a write error on the stream.
    let r = unsafe { super::rw::write(fd_of(cookie), buf.cast(), n) };
    if r < 0 { 0 } else { r }
}

unsafe extern "C" fn cookie_seek(cookie: *mut c_void, off: *mut off64_t, whence: c_int) -> c_int {
    // SAFETY: stdio passes a valid offset pointer.
    unsafe {
        let r = super::rw::lseek64(fd_of(cookie), *off, whence);
        if r < 0 {
            return -1;
        }
        *off = r;
    }
    0
}

unsafe extern "C" fn cookie_close(cookie: *mut c_void) -> c_int {
    // SAFETY: the stream owns the dummy fd.
    unsafe { super::fd::close(fd_of(cookie)) }
}

/// A stdio stream over dummy `fd` (which the stream then owns).
pub fn stream_for(fd: c_int, mode: *const c_char) -> *mut FILE {
    let io = CookieIo {
        read: Some(cookie_read),
        write: Some(cookie_write),
        seek: Some(cookie_seek),
        close: Some(cookie_close),
    };
    // SAFETY: valid mode string from the caller; callbacks match glibc's types.
    let fp = unsafe { fopencookie(fd as usize as *mut c_void, mode, io) };
    #[cfg(all(target_env = "gnu", target_pointer_width = "64"))]
    if !fp.is_null() {
        // SAFETY: glibc's struct _IO_FILE has `int _fileno` at this offset on LP64.
        unsafe { fp.cast::<u8>().add(FILENO_OFFSET).cast::<c_int>().write(fd) };
    }
    fp
}

/// open(2) flags for an fopen mode string.
fn mode_flags(mode: &CStr) -> c_int {
    let m = mode.to_bytes();
    let plus = m.contains(&b'+');
    let mut flags = match m.first() {
        Some(b'r') if plus => libc::O_RDWR,
        Some(b'r') => libc::O_RDONLY,
        Some(b'w') | Some(b'a') if plus => libc::O_RDWR | libc::O_CREAT,
        _ => libc::O_WRONLY | libc::O_CREAT,
    };
    if m.contains(&b'e') {
        flags |= libc::O_CLOEXEC;
    }
    if m.contains(&b'x') {
        flags |= libc::O_EXCL;
    }
    flags
}

/// fopen of an image path: `Some(stream)` (or NULL with errno), `None` for libc.
fn fopen_image(path: *const c_char, mode: *const c_char) -> Option<*mut FILE> {
    if path.is_null() || mode.is_null() || guard::inside() {
        return None;
    }
    // SAFETY: non-NULL strings from the caller.
    let (p, m) = unsafe { (CStr::from_ptr(path), CStr::from_ptr(mode)) };
    crate::config::load();
    let flags = mode_flags(m);
    if !may_be_image(p) || flags & libc::O_EXCL != 0 {
        return None;
    }
    let fd = open_path(libc::AT_FDCWD, p, flags);
    match fd {
        Ok(Some(fd)) => Some(stream_for(fd, mode)),
        Ok(None) => None,
        Err(e) => {
            crate::logger::set_errno(e);
            Some(null_mut())
        }
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut FILE {
    if let Some(fp) = fopen_image(path, mode) {
        return fp;
    }
    // SAFETY: forwarding the caller's arguments.
    real::FOPEN
        .get()
        .map_or(null_mut(), |f| unsafe { f(path, mode) })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut FILE {
    if let Some(fp) = fopen_image(path, mode) {
        return fp;
    }
    // SAFETY: forwarding the caller's arguments.
    real::FOPEN64
        .get()
        .map_or(null_mut(), |f| unsafe { f(path, mode) })
}

/// fdopen of a dummy: a cookie stream on it.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fdopen(fd: c_int, mode: *const c_char) -> *mut FILE {
    if is_mapped(fd) && !mode.is_null() && super::image_fd(fd).is_some() {
        return stream_for(fd, mode);
    }
    // SAFETY: forwarding the caller's arguments.
    real::FDOPEN
        .get()
        .map_or(null_mut(), |f| unsafe { f(fd, mode) })
}

/// freopen of an image: the new stream takes the old stream's fd number, and a
/// std stream variable is pointed at it (hexdump does freopen(path, "r", stdin)).
unsafe fn freopen_common(
    path: *const c_char,
    mode: *const c_char,
    old: *mut FILE,
    wide: bool,
) -> *mut FILE {
    let Some(fp) = fopen_image(path, mode) else {
        let f = if wide {
            real::FREOPEN64.get()
        } else {
            real::FREOPEN.get()
        };
        // SAFETY: forwarding the caller's arguments.
        return f.map_or(null_mut(), |f| unsafe { f(path, mode, old) });
    };
    if fp.is_null() || old.is_null() {
        return fp;
    }
    // SAFETY: old is the caller's open stream; fp is ours.
    unsafe {
        let old_fd = libc::fileno(old);
        let new_fd = libc::fileno(fp);
        libc::fclose(old);
        if old_fd >= 0
            && new_fd >= 0
            && old_fd != new_fd
            && super::fd::dup2(new_fd, old_fd) == old_fd
        {
            // Move the stream onto the old number; the cookie follows.
            let moved = stream_for(old_fd, mode);
            if !moved.is_null() {
                // Drop the temporary stream without closing the image twice.
                super::fd::close(new_fd);
                forget_stream(fp);
                replace_std(old, moved);
                return moved;
            }
        }
        replace_std(old, fp);
    }
    fp
}

/// Frees a cookie stream whose fd was already closed.
unsafe fn forget_stream(fp: *mut FILE) {
    // fclose calls cookie_close on an fd that is no longer mapped: a plain
    // close of a closed number, EBADF, harmless.
    // SAFETY: fp is a stream we created.
    unsafe { libc::fclose(fp) };
}

/// Points stdin, stdout or stderr at `new` if it was `old`.
unsafe fn replace_std(old: *mut FILE, new: *mut FILE) {
    // SAFETY: the std stream variables of the program (copy-relocated); only
    // compared and assigned, as freopen's callers expect.
    unsafe {
        if std::ptr::eq(stdin, old) {
            stdin = new;
        } else if std::ptr::eq(stdout, old) {
            stdout = new;
        } else if std::ptr::eq(stderr, old) {
            stderr = new;
        }
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn freopen(
    path: *const c_char,
    mode: *const c_char,
    old: *mut FILE,
) -> *mut FILE {
    unsafe { freopen_common(path, mode, old, false) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn freopen64(
    path: *const c_char,
    mode: *const c_char,
    old: *mut FILE,
) -> *mut FILE {
    unsafe { freopen_common(path, mode, old, true) }
}

/// At start-up: a std stream whose fd is a dummy is replaced by a cookie stream
/// (libc built stdin on fd 0 before we could see it, and reads it with
/// internal syscalls). The old stream stays allocated but unused.
pub fn replace_std_streams() {
    for fd in 0..3 {
        let Some(of) = (if is_mapped(fd) {
            crate::fdtable::lookup(fd)
        } else {
            None
        }) else {
            continue;
        };
        let mode = match (fd, of.access) {
            (_, libc::O_RDWR) => c"r+",
            (0, _) | (_, libc::O_RDONLY) => c"r",
            _ => c"w",
        };
        let fp = stream_for(fd, mode.as_ptr());
        if fp.is_null() {
            continue;
        }
        // SAFETY: the program's std stream variables, replaced before main.
        unsafe {
            let old = match fd {
                0 => stdin,
                1 => stdout,
                _ => stderr,
            };
            replace_std(old, fp);
        }
    }
}
