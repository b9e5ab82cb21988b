//! read, write, their positioned, vectored and _FORTIFY variants, and lseek.
//!
//! Reads go straight into the caller's buffer. The file offset is the dummy
//! memfd's own offset, updated with lseek around each transfer.

use std::ffi::c_void;
use std::slice;

use libc::{c_int, iovec, off_t, off64_t, size_t, ssize_t};

use super::open::call;
use super::{Errno, disk_error, emulate, image_fd_io, image_fd_stream, pass_through};
use crate::fdtable::{self, FdRef, OpenFile, is_mapped};
use crate::{config, logger, real, sys};

impl OpenFile {
    fn describe_window(&self) -> String {
        if self.partition == 0 {
            String::new()
        } else {
            format!(" partition {}", self.partition)
        }
    }

    /// Reads at `pos` of the window; 0 at or past its end.
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<usize, Errno> {
        log::debug!(
            "read {} bytes at {pos} of {}{}",
            buf.len(),
            self.image.path_str(),
            self.describe_window()
        );
        if !self.readable() {
            return Err(libc::EBADF);
        }
        if pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min((self.len - pos) as usize);
        let buf = &mut buf[..n];
        self.image
            .with_disk(|disk| disk.read_at(buf, self.start + pos))
            .map_err(|e| disk_error("read", self, e))?;
        if config::dump() {
            logger::dump("read", pos, buf);
        }
        Ok(n)
    }

    /// Writes at `pos`; past the end of a block device that is ENOSPC, after
    /// writing the part that fits.
    pub fn write_at(&self, buf: &[u8], pos: u64) -> Result<usize, Errno> {
        log::debug!(
            "write {} bytes at {pos} of {}{}",
            buf.len(),
            self.image.path_str(),
            self.describe_window()
        );
        if !self.writable() {
            return Err(libc::EBADF);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if pos >= self.len {
            return Err(libc::ENOSPC);
        }
        let n = buf.len().min((self.len - pos) as usize);
        let buf = &buf[..n];
        self.image.ensure_writer()?;
        if config::dump() {
            logger::dump("write", pos, buf);
        }
        let _io = self.image.write_guard();
        self.image.with_disk(|disk| {
            disk.write_at(buf, self.start + pos)
                .map_err(|e| disk_error("write", self, e))?;
            if self.sync {
                disk.flush().map_err(|e| disk_error("flush", self, e))?;
            }
            Ok(n)
        })
    }

    /// Runs `f` at the dummy's file offset and advances it by the result.
    pub(crate) fn at_offset(
        &self,
        fd: c_int,
        f: impl FnOnce(u64) -> Result<usize, Errno>,
    ) -> Result<usize, Errno> {
        self.at_checked_offset(fd, f)
            .map_err(|e| if e == STALE { libc::EBADF } else { e })
    }

    /// [`OpenFile::at_offset`] that also checks the offset's signature (for
    /// fds from `image_fd_stream`): `Err(STALE)` if the fd is no longer ours.
    fn at_checked_offset(
        &self,
        fd: c_int,
        f: impl FnOnce(u64) -> Result<usize, Errno>,
    ) -> Result<usize, Errno> {
        let _serial = self.offset_lock.lock().unwrap_or_else(|e| e.into_inner());
        let pos = match sys::lseek(fd, 0, libc::SEEK_CUR) {
            Ok(raw) if self.offset_base == 0 => raw as u64,
            Ok(raw) if self.signed(raw) => raw as u64 - self.offset_base,
            Err(e) if self.offset_base == 0 => return Err(crate::errno::from_io(&e)),
            _ => return Err(STALE),
        };
        let n = f(pos)?;
        if n > 0 {
            self.set_position(fd, pos + n as u64)?;
        }
        Ok(n)
    }

    /// SEEK_SET/CUR/END relative to the window; beyond the end is EINVAL, as
    /// for a block device. SEEK_DATA/SEEK_HOLE see the whole disk as data.
    pub fn seek(&self, fd: c_int, off: i64, whence: c_int) -> Result<i64, Errno> {
        log::debug!(
            "lseek fd {fd} offset {off} whence {whence} on {}",
            self.image.path_str()
        );
        let _serial = self.offset_lock.lock().unwrap_or_else(|e| e.into_inner());
        let len = self.len as i64;
        let cur = || self.position(fd).map(|p| p as i64);
        let target = match whence {
            libc::SEEK_SET => Some(off),
            libc::SEEK_CUR => cur()?.checked_add(off),
            libc::SEEK_END => len.checked_add(off),
            libc::SEEK_DATA if (0..len).contains(&off) => Some(off),
            libc::SEEK_HOLE if (0..len).contains(&off) => Some(len),
            libc::SEEK_DATA | libc::SEEK_HOLE => return Err(libc::ENXIO),
            _ => return Err(libc::EINVAL),
        };
        match target {
            Some(t) if (0..=len).contains(&t) => self.set_position(fd, t as u64).map(|()| t),
            _ => Err(libc::EINVAL),
        }
    }
}

/// Not an errno: the fd of a stream call proved stale (see `stream`).
const STALE: Errno = -1;

/// Emulates read, write, readv or writev on `fd`; `None` when the offset's
/// signature shows the fd is no longer ours (the entry is dropped and the
/// caller passes the call to libc, with errno untouched).
fn stream(fd: c_int, of: &FdRef, f: impl FnOnce() -> Result<ssize_t, Errno>) -> Option<ssize_t> {
    let saved = logger::errno();
    let r = emulate(-1, f);
    if r == -1 && logger::errno() == STALE {
        logger::set_errno(saved);
        fdtable::drop_stale(fd, of);
        return None;
    }
    Some(r)
}

pub(crate) fn as_mut<'a>(buf: *mut c_void, n: size_t) -> &'a mut [u8] {
    if n == 0 || buf.is_null() {
        return &mut [];
    }
    // SAFETY: the caller passed a buffer of n writable bytes (read(2) contract).
    unsafe { slice::from_raw_parts_mut(buf.cast(), n) }
}

pub(crate) fn as_ref<'a>(buf: *const c_void, n: size_t) -> &'a [u8] {
    if n == 0 || buf.is_null() {
        return &[];
    }
    // SAFETY: the caller passed a buffer of n readable bytes (write(2) contract).
    unsafe { slice::from_raw_parts(buf.cast(), n) }
}

pub(crate) fn iovecs<'a>(iov: *const iovec, cnt: c_int) -> Result<&'a [iovec], Errno> {
    if !(0..=libc::UIO_MAXIOV).contains(&cnt) {
        return Err(libc::EINVAL);
    }
    if cnt == 0 {
        return Ok(&[]);
    }
    if iov.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: the caller passed cnt iovecs.
    Ok(unsafe { slice::from_raw_parts(iov, cnt as usize) })
}

fn to_ssize(r: usize) -> ssize_t {
    r as ssize_t
}

/// Reads into each iovec in turn from `pos`, stopping at a short read.
pub(crate) fn readv_at(of: &OpenFile, iov: &[iovec], pos: u64) -> Result<usize, Errno> {
    let mut done = 0usize;
    for v in iov {
        let n = of.read_at(as_mut(v.iov_base, v.iov_len), pos + done as u64)?;
        done += n;
        if n < v.iov_len {
            break;
        }
    }
    Ok(done)
}

pub(crate) fn writev_at(of: &OpenFile, iov: &[iovec], pos: u64) -> Result<usize, Errno> {
    let mut done = 0usize;
    for v in iov {
        let n = match of.write_at(as_ref(v.iov_base, v.iov_len), pos + done as u64) {
            Ok(n) => n,
            Err(e) if done > 0 && e == libc::ENOSPC => break,
            Err(e) => return Err(e),
        };
        done += n;
        if n < v.iov_len {
            break;
        }
    }
    Ok(done)
}

fn checked_pos(off: i64) -> Result<u64, Errno> {
    u64::try_from(off).map_err(|_| libc::EINVAL)
}

unsafe extern "C" {
    fn __chk_fail() -> !;
}

// The hottest hooks: `pass_through!` sends an fd that is not an image to libc
// before anything else; the image path is a function of its own, out of line.

/// read, write, readv, writev: at the file offset, which they read anyway and
/// whose signature is their stale-fd check (see `stream`).
macro_rules! stream_hook {
    ($name:ident = $real:ident, ($($arg:ident: $ty:ty),*), |$of:ident, $pos:ident| $op:expr) => {
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(fd: c_int, $($arg: $ty),*) -> ssize_t {
            pass_through!(fd, real::$real, fd, $($arg),*);
            #[inline(never)]
            fn image(fd: c_int, $($arg: $ty),*) -> ssize_t {
                if is_mapped(fd)
                    && let Some($of) = image_fd_stream(fd)
                    && let Some(r) = stream(fd, &$of, || {
                        $of.at_checked_offset(fd, |$pos| $op).map(to_ssize)
                    })
                {
                    return r;
                }
                call!(real::$real, fd, $($arg),*)
            }
            image(fd, $($arg),*)
        }
    };
}

stream_hook!(read = READ, (buf: *mut c_void, n: size_t), |of, pos| of.read_at(as_mut(buf, n), pos));
stream_hook!(write = WRITE, (buf: *const c_void, n: size_t), |of, pos| of.write_at(as_ref(buf, n), pos));
stream_hook!(readv = READV, (iov: *const iovec, cnt: c_int), |of, pos| readv_at(&of, iovecs(iov, cnt)?, pos));
stream_hook!(writev = WRITEV, (iov: *const iovec, cnt: c_int), |of, pos| writev_at(&of, iovecs(iov, cnt)?, pos));

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: glibc's fortify failure: abort, as the real __read_chk does.
        unsafe { __chk_fail() }
    }
    unsafe { read(fd, buf, n) }
}

// Each 64-bit name is the same function as its plain twin on LP64 (off_t is
// 64 bits): two exported names per shape.

/// pread, pwrite and their 64-bit names: at the caller's offset.
macro_rules! positioned_hook {
    ($name:ident = $real:ident, ($($arg:ident: $ty:ty),*), $off:ty, |$of:ident, $pos:ident| $op:expr) => {
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(fd: c_int, $($arg: $ty,)* off: $off) -> ssize_t {
            pass_through!(fd, real::$real, fd, $($arg,)* off);
            #[inline(never)]
            fn image(fd: c_int, $($arg: $ty,)* off: $off) -> ssize_t {
                if is_mapped(fd)
                    && let Some($of) = image_fd_io(fd)
                {
                    return emulate(-1, || {
                        let $pos = checked_pos(off)?;
                        $op.map(to_ssize)
                    });
                }
                call!(real::$real, fd, $($arg,)* off)
            }
            image(fd, $($arg,)* off)
        }
    };
}

positioned_hook!(pread = PREAD, (buf: *mut c_void, n: size_t), off_t, |of, pos| of.read_at(as_mut(buf, n), pos));
positioned_hook!(pread64 = PREAD64, (buf: *mut c_void, n: size_t), off64_t, |of, pos| of.read_at(as_mut(buf, n), pos));
positioned_hook!(pwrite = PWRITE, (buf: *const c_void, n: size_t), off_t, |of, pos| of.write_at(as_ref(buf, n), pos));
positioned_hook!(pwrite64 = PWRITE64, (buf: *const c_void, n: size_t), off64_t, |of, pos| of.write_at(as_ref(buf, n), pos));

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __pread_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: off_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: as in __read_chk.
        unsafe { __chk_fail() }
    }
    unsafe { pread(fd, buf, n, off) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __pread64_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: off64_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: as in __read_chk.
        unsafe { __chk_fail() }
    }
    unsafe { pread64(fd, buf, n, off) }
}

/// A vectored transfer at `off`; -1 (preadv2/pwritev2) means the file offset.
fn vectored(
    fd: c_int,
    of: &OpenFile,
    iov: *const iovec,
    cnt: c_int,
    off: i64,
    op: fn(&OpenFile, &[iovec], u64) -> Result<usize, Errno>,
) -> Result<ssize_t, Errno> {
    let iov = iovecs(iov, cnt)?;
    let n = if off == -1 {
        of.at_offset(fd, |pos| op(of, iov, pos))?
    } else {
        op(of, iov, checked_pos(off)?)?
    };
    Ok(to_ssize(n))
}

macro_rules! vectored_hooks {
    ($($name:ident = $real:ident, $off:ty, $op:ident;)*) => {$(
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(fd: c_int, iov: *const iovec, cnt: c_int, off: $off) -> ssize_t {
            if is_mapped(fd) {
                if let Some(of) = image_fd_io(fd) {
                    return emulate(-1, || {
                        let off = checked_pos(off)? as i64;
                        vectored(fd, &of, iov, cnt, off, $op)
                    });
                }
            }
            call!(real::$real, fd, iov, cnt, off)
        }
    )*};
}

vectored_hooks! {
    preadv = PREADV, off_t, readv_at;
    preadv64 = PREADV64, off64_t, readv_at;
    pwritev = PWRITEV, off_t, writev_at;
    pwritev64 = PWRITEV64, off64_t, writev_at;
}

/// preadv2/pwritev2: as preadv/pwritev, offset -1 being the file offset. The
/// RWF_* flags (hints, RWF_APPEND) change nothing on a block device here.
macro_rules! vectored2_hooks {
    ($($name:ident = $real:ident, $off:ty, $op:ident;)*) => {$(
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(fd: c_int, iov: *const iovec, cnt: c_int, off: $off, flags: c_int) -> ssize_t {
            if is_mapped(fd) {
                if let Some(of) = image_fd_io(fd) {
                    return emulate(-1, || vectored(fd, &of, iov, cnt, off as i64, $op));
                }
            }
            call!(real::$real, fd, iov, cnt, off, flags)
        }
    )*};
}

vectored2_hooks! {
    preadv2 = PREADV2, off_t, readv_at;
    preadv64v2 = PREADV64V2, off64_t, readv_at;
    pwritev2 = PWRITEV2, off_t, writev_at;
    pwritev64v2 = PWRITEV64V2, off64_t, writev_at;
}

macro_rules! seek_hooks {
    ($($name:ident = $real:ident, $off:ty;)*) => {$(
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(fd: c_int, off: $off, whence: c_int) -> $off {
            pass_through!(fd, real::$real, fd, off, whence);
            #[inline(never)]
            fn image(fd: c_int, off: $off, whence: c_int) -> $off {
                if is_mapped(fd) {
                    if let Some(of) = image_fd_io(fd) {
                        return emulate(-1, || of.seek(fd, off, whence));
                    }
                }
                call!(real::$real, fd, off, whence)
            }
            image(fd, off, whence)
        }
    )*};
}

seek_hooks! {
    lseek = LSEEK, off_t;
    lseek64 = LSEEK64, off64_t;
}
