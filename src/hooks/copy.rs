//! copy_file_range, sendfile and splice with a dummy on either side: copied
//! through a bounce buffer by the fd emulation. Without these hooks the kernel
//! would copy from or into the empty memfd (cat and cp use copy_file_range,
//! libblkid and libfdisk sendfile).

use libc::{c_int, c_uint, loff_t, off_t, off64_t, size_t, ssize_t};

use super::open::call;
use super::{Errno, emulate, image_fd};
use crate::fdtable::{FdRef, is_mapped};
use crate::real;

const BOUNCE: usize = 1 << 20;

/// One side of a copy: an image window or a plain fd, at an explicit offset
/// (updated in place) or at the fd's own offset.
struct Side<'a> {
    fd: c_int,
    image: Option<FdRef>,
    offset: Option<&'a mut i64>,
}

impl Side<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        let fd = self.fd;
        let n = match (&self.image, &mut self.offset) {
            (Some(of), Some(off)) => {
                of.read_at(buf, u64::try_from(**off).map_err(|_| libc::EINVAL)?)?
            }
            (Some(of), None) => of.at_offset(fd, |pos| of.read_at(buf, pos))?,
            // The guard is set: these reach libc directly.
            (None, Some(off)) => {
                check(unsafe { libc::pread64(fd, buf.as_mut_ptr().cast(), buf.len(), **off) })?
            }
            (None, None) => check(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })?,
        };
        if let Some(off) = &mut self.offset {
            **off += n as i64;
        }
        Ok(n)
    }

    fn write_all(&mut self, mut buf: &[u8]) -> Result<(), Errno> {
        let fd = self.fd;
        while !buf.is_empty() {
            let n = match (&self.image, &mut self.offset) {
                (Some(of), Some(off)) => {
                    of.write_at(buf, u64::try_from(**off).map_err(|_| libc::EINVAL)?)?
                }
                (Some(of), None) => of.at_offset(fd, |pos| of.write_at(buf, pos))?,
                (None, Some(off)) => {
                    check(unsafe { libc::pwrite64(fd, buf.as_ptr().cast(), buf.len(), **off) })?
                }
                (None, None) => check(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) })?,
            };
            if n == 0 {
                return Err(libc::EIO);
            }
            if let Some(off) = &mut self.offset {
                **off += n as i64;
            }
            buf = &buf[n..];
        }
        Ok(())
    }
}

fn check(r: isize) -> Result<usize, Errno> {
    if r < 0 {
        Err(crate::logger::errno())
    } else {
        Ok(r as usize)
    }
}

/// Copies up to `len` bytes; a failure after some bytes moved reports the count.
fn copy(mut from: Side<'_>, mut to: Side<'_>, len: usize) -> Result<usize, Errno> {
    let mut buf = vec![0u8; len.min(BOUNCE)];
    let mut done = 0usize;
    while done < len {
        let want = (len - done).min(buf.len());
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        };
        match to.write_all(&buf[..n]) {
            Ok(()) => done += n,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

fn side<'a>(fd: c_int, offset: *mut i64) -> Side<'a> {
    // SAFETY: the caller's offset pointer, valid for the call when non-NULL.
    let offset = if offset.is_null() {
        None
    } else {
        Some(unsafe { &mut *offset })
    };
    let image = if is_mapped(fd) {
        crate::fdtable::lookup_io(fd)
    } else {
        None
    };
    Side { fd, image, offset }
}

fn either_image(a: c_int, b: c_int) -> bool {
    (is_mapped(a) && image_fd(a).is_some()) || (is_mapped(b) && image_fd(b).is_some())
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn copy_file_range(
    fd_in: c_int,
    off_in: *mut loff_t,
    fd_out: c_int,
    off_out: *mut loff_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    if either_image(fd_in, fd_out) {
        return emulate(-1, || {
            if flags != 0 {
                return Err(libc::EINVAL);
            }
            copy(side(fd_in, off_in), side(fd_out, off_out), len).map(|n| n as ssize_t)
        });
    }
    call!(
        real::COPY_FILE_RANGE,
        fd_in,
        off_in,
        fd_out,
        off_out,
        len,
        flags
    )
}

/// sendfile: from `in_fd` (at `*offset` if given) to `out_fd`'s own offset.
macro_rules! sendfile_hooks {
    ($($name:ident = $real:ident, $off:ty;)*) => {$(
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(out_fd: c_int, in_fd: c_int, offset: *mut $off, count: size_t) -> ssize_t {
            if either_image(in_fd, out_fd) {
                return emulate(-1, || {
                    let to = side(out_fd, std::ptr::null_mut());
                    copy(side(in_fd, offset), to, count).map(|n| n as ssize_t)
                });
            }
            call!(real::$real, out_fd, in_fd, offset, count)
        }
    )*};
}

sendfile_hooks! {
    sendfile = SENDFILE, off_t;
    sendfile64 = SENDFILE64, off64_t;
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut loff_t,
    fd_out: c_int,
    off_out: *mut loff_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    if either_image(fd_in, fd_out) {
        return emulate(-1, || {
            copy(side(fd_in, off_in), side(fd_out, off_out), len).map(|n| n as ssize_t)
        });
    }
    call!(real::SPLICE, fd_in, off_in, fd_out, off_out, len, flags)
}
