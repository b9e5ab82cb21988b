//! The stat family, both generations (glibc 2.33+ exports and the old
//! `__xstat` ones that Debian 12's mkfs.fat and mtools still call).
//!
//! An image reads as a block device: S_IFBLK with the container's permission
//! bits, st_rdev 0 (there is no sysfs node to look up; a made-up number
//! would send lsblk, libblkid and LVM to one that does not exist, or to
//! another device's: README, "Design decisions"), st_size 0 (tools ask
//! BLKGETSIZE64), st_blocks 0. Device, inode, owner and times are the
//! container's, identical for the path form and the fd form. With
//! LIBVHD_IO_AS_FILE it reads as a regular file instead: S_IFREG, st_size the
//! window's (disk or partition) size, st_blocks to match.

use std::ffi::CStr;

use libc::{c_char, c_int, c_uint, stat as Stat, stat64 as Stat64, statx as Statx};

use super::open::{absolute, call, fd_path, is_candidate};
use super::{emulate, image_fd};
use crate::fdtable::is_mapped;
use crate::{guard, images, real};

// On x86_64 and aarch64 glibc, struct stat and struct stat64 are one layout.
const _: () = assert!(size_of::<Stat>() == size_of::<Stat64>());

/// What an image window of `len` bytes reads as: a block device (st_size 0:
/// tools ask BLKGETSIZE64) or, with LIBVHD_IO_AS_FILE, a regular file of
/// `len` bytes.
fn kind_and_size(len: u64) -> (u32, u64) {
    if crate::config::as_file() {
        (libc::S_IFREG, len)
    } else {
        (libc::S_IFBLK, 0)
    }
}

fn present(st: &mut Stat64, len: u64) {
    let (kind, size) = kind_and_size(len);
    st.st_mode = kind | (st.st_mode & 0o7777);
    st.st_rdev = 0;
    st.st_size = size as i64;
    st.st_blocks = size.div_ceil(512) as i64;
    st.st_blksize = 4096;
}

fn present_x(st: &mut Statx, len: u64) {
    let (kind, size) = kind_and_size(len);
    st.stx_mode = (kind | (st.stx_mode as u32 & 0o7777)) as u16;
    st.stx_rdev_major = 0;
    st.stx_rdev_minor = 0;
    st.stx_size = size;
    st.stx_blocks = size.div_ceil(512);
    st.stx_blksize = 4096;
}

/// The window length to present for the image at `abs` (whose container has
/// `dev`, `ino`), `None` if it is not an image. Block-device mode only probes;
/// regular-file mode opens the image for the size of the disk or partition.
fn image_window(abs: &std::ffi::CStr, dev: u64, ino: u64) -> Result<Option<u64>, super::Errno> {
    if crate::config::as_file() {
        super::open::window_len(abs)
    } else {
        Ok(images::is_image(abs, dev, ino).then_some(0))
    }
}

/// fstat of a dummy: the container's stat as a block device.
fn fstat_image(fd: c_int, buf: *mut Stat64) -> Option<c_int> {
    if !is_mapped(fd) || buf.is_null() {
        return None;
    }
    let of = image_fd(fd)?;
    Some(emulate(-1, || {
        let mut st = of
            .image
            .container_stat()
            .map_err(|e| crate::errno::from_io(&e))?;
        present(&mut st, of.len);
        // SAFETY: buf is the caller's non-NULL struct stat pointer.
        unsafe { buf.write(st) };
        Ok(0)
    }))
}

/// After a successful stat of a path: an image file reads as a block device
/// (or a regular file of the virtual size). Returns the hook's result: 0, or
/// -1 when regular-file mode cannot open the image to learn its size.
fn fix_path_stat(dirfd: c_int, path: *const c_char, flags: c_int, buf: *mut Stat64) -> c_int {
    if path.is_null() || buf.is_null() || guard::inside() {
        return 0;
    }
    // SAFETY: non-NULL path that the real call just accepted.
    let p = unsafe { CStr::from_ptr(path) };
    if p.is_empty() && flags & libc::AT_EMPTY_PATH != 0 {
        return fstat_image(dirfd, buf).map_or(0, |r| r);
    }
    // SAFETY: the real call filled buf.
    let st = unsafe { &mut *buf };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return 0;
    }
    crate::config::load();
    if let Some(fd) = dummy_by_path(p, st.st_dev, st.st_ino) {
        return fstat_image(fd, buf).map_or(0, |r| r);
    }
    if !is_candidate(p) {
        return 0;
    }
    emulate(-1, || {
        let abs = absolute(dirfd, p)?;
        if let Some(len) = image_window(&abs, st.st_dev, st.st_ino)? {
            present(st, len);
        }
        Ok(0)
    })
}

/// The dummy fd that `/dev/stdin`, `/dev/fd/N` or `/proc/self/fd/N` named,
/// if the kernel followed it to that dummy memfd (device `dev`, inode `ino`:
/// an empty regular file, which the caller answers as for the fd).
fn dummy_by_path(p: &CStr, dev: u64, ino: u64) -> Option<c_int> {
    let fd = fd_path(p)?;
    if !is_mapped(fd) {
        return None;
    }
    let of = image_fd(fd)?;
    ((dev, ino) == (of.dummy_dev, of.dummy_ino)).then_some(fd)
}

macro_rules! path_stat {
    ($name:ident, $real:ident, $t:ty, $flags:expr) => {
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(path: *const c_char, buf: *mut $t) -> c_int {
            let r = call!(real::$real, path, buf);
            if r == 0 {
                return fix_path_stat(libc::AT_FDCWD, path, $flags, buf.cast());
            }
            r
        }
    };
}

path_stat!(stat, STAT, Stat, 0);
path_stat!(stat64, STAT64, Stat64, 0);
path_stat!(lstat, LSTAT, Stat, libc::AT_SYMLINK_NOFOLLOW);
path_stat!(lstat64, LSTAT64, Stat64, libc::AT_SYMLINK_NOFOLLOW);

macro_rules! path_xstat {
    ($name:ident, $real:ident, $t:ty, $flags:expr) => {
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(ver: c_int, path: *const c_char, buf: *mut $t) -> c_int {
            let r = call!(real::$real, ver, path, buf);
            if r == 0 {
                return fix_path_stat(libc::AT_FDCWD, path, $flags, buf.cast());
            }
            r
        }
    };
}

path_xstat!(__xstat, XSTAT, Stat, 0);
path_xstat!(__xstat64, XSTAT64, Stat64, 0);
path_xstat!(__lxstat, LXSTAT, Stat, libc::AT_SYMLINK_NOFOLLOW);
path_xstat!(__lxstat64, LXSTAT64, Stat64, libc::AT_SYMLINK_NOFOLLOW);

macro_rules! fd_stat {
    ($name:ident, $real:ident, $t:ty) => {
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(fd: c_int, buf: *mut $t) -> c_int {
            if let Some(r) = fstat_image(fd, buf.cast()) {
                return r;
            }
            call!(real::$real, fd, buf)
        }
    };
}

fd_stat!(fstat, FSTAT, Stat);
fd_stat!(fstat64, FSTAT64, Stat64);

macro_rules! fd_xstat {
    ($name:ident, $real:ident, $t:ty) => {
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(ver: c_int, fd: c_int, buf: *mut $t) -> c_int {
            if let Some(r) = fstat_image(fd, buf.cast()) {
                return r;
            }
            call!(real::$real, ver, fd, buf)
        }
    };
}

fd_xstat!(__fxstat, FXSTAT, Stat);
fd_xstat!(__fxstat64, FXSTAT64, Stat64);

macro_rules! at_stat {
    ($name:ident, $real:ident, $t:ty) => {
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(
            dirfd: c_int,
            path: *const c_char,
            buf: *mut $t,
            flags: c_int,
        ) -> c_int {
            let r = call!(real::$real, dirfd, path, buf, flags);
            if r == 0 {
                return fix_path_stat(dirfd, path, flags, buf.cast());
            }
            r
        }
    };
}

at_stat!(fstatat, FSTATAT, Stat);
at_stat!(fstatat64, FSTATAT64, Stat64);

macro_rules! at_xstat {
    ($name:ident, $real:ident, $t:ty) => {
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name(
            ver: c_int,
            dirfd: c_int,
            path: *const c_char,
            buf: *mut $t,
            flags: c_int,
        ) -> c_int {
            let r = call!(real::$real, ver, dirfd, path, buf, flags);
            if r == 0 {
                return fix_path_stat(dirfd, path, flags, buf.cast());
            }
            r
        }
    };
}

at_xstat!(__fxstatat, FXSTATAT, Stat);
at_xstat!(__fxstatat64, FXSTATAT64, Stat64);

/// statx: the fd form on a dummy asks the container, the path form is fixed
/// up after the real call, as for stat.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: c_uint,
    buf: *mut Statx,
) -> c_int {
    // SAFETY: only dereferenced when non-NULL.
    let empty = !path.is_null() && unsafe { *path } == 0 && flags & libc::AT_EMPTY_PATH != 0;
    if empty
        && is_mapped(dirfd)
        && let Some(of) = image_fd(dirfd)
    {
        let fd = of.image.container_fd();
        let r = call!(real::STATX, fd, path, flags, mask, buf);
        if r == 0 {
            // SAFETY: filled by the real call.
            present_x(unsafe { &mut *buf }, of.len);
        }
        return r;
    }
    let r = call!(real::STATX, dirfd, path, flags, mask, buf);
    if r != 0 || empty || path.is_null() || buf.is_null() || guard::inside() {
        return r;
    }
    // SAFETY: filled by the real call; path accepted by it.
    let (st, p) = unsafe { (&mut *buf, CStr::from_ptr(path)) };
    if (st.stx_mode as u32) & libc::S_IFMT != libc::S_IFREG {
        return r;
    }
    crate::config::load();
    let dev = libc::makedev(st.stx_dev_major, st.stx_dev_minor);
    if let Some(fd) = dummy_by_path(p, dev, st.stx_ino) {
        // SAFETY: the caller's arguments, on the fd the path named.
        return unsafe { statx(fd, c"".as_ptr(), flags | libc::AT_EMPTY_PATH, mask, buf) };
    }
    if !is_candidate(p) {
        return r;
    }
    emulate(-1, || {
        let abs = absolute(dirfd, p)?;
        if let Some(len) = image_window(&abs, dev, st.stx_ino)? {
            present_x(st, len);
        }
        Ok(r)
    })
}
