//! open, openat, creat and their 64-bit and _FORTIFY variants.
//!
//! A path is a candidate when its file name looks like an image (`.vhd`,
//! `.vhdx`, `.vdi`, `.avhd`, `.avhdx`, `.vmdk`, `.qcow`, `.qcow2`, optionally
//! followed by a partition number), or any path with LIBVHD_IO_PROBE_ALL. A candidate that is a
//! regular file holding an image is opened by the library; the caller gets a
//! dummy fd: a memfd named `vhdio:<absolute path>`, reopened through
//! /proc/self/fd with the caller's access mode, whose file offset is the
//! offset on the virtual disk.

use std::ffi::{CStr, CString};
use std::sync::{Arc, Mutex};

use libc::{c_char, c_int, mode_t};

use super::{Errno, emulate};
use crate::fdtable::{self, OpenFile};
use crate::images::{self, Opened};
use crate::{guard, real, sys};

// `qcow` also covers `.qcow2`: trailing digits are taken off first.
const IMAGE_EXTENSIONS: [&[u8]; 7] = [b"vhd", b"vhdx", b"vdi", b"avhd", b"avhdx", b"vmdk", b"qcow"];

/// Whether `path`'s file name looks like an image (or we probe everything).
pub fn is_candidate(path: &CStr) -> bool {
    let bytes = path.to_bytes();
    let name = bytes.rsplit(|&b| b == b'/').next().unwrap_or(bytes);
    let stem = name.trim_ascii_end();
    let stem = &stem[..stem.len() - stem.iter().rev().take_while(|b| b.is_ascii_digit()).count()];
    let Some(dot) = stem.iter().rposition(|&b| b == b'.') else {
        return crate::config::probe_all();
    };
    let ext = &stem[dot + 1..];
    IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)) || crate::config::probe_all()
}

/// `path` made absolute against `dirfd` (the memfd name and parent lookup need it).
pub fn absolute(dirfd: c_int, path: &CStr) -> Result<CString, Errno> {
    let p = path.to_bytes();
    if p.first() == Some(&b'/') {
        return Ok(path.to_owned());
    }
    let mut base = vec![0u8; libc::PATH_MAX as usize];
    let n = if dirfd == libc::AT_FDCWD {
        sys::getcwd(&mut base).map_err(|e| crate::errno::from_io(&e))?
    } else {
        let link = CString::new(format!("/proc/self/fd/{dirfd}")).map_err(|_| libc::EINVAL)?;
        sys::readlink(&link, &mut base).map_err(|e| crate::errno::from_io(&e))?
    };
    base.truncate(n);
    if base.last() != Some(&b'/') {
        base.push(b'/');
    }
    base.extend_from_slice(p);
    CString::new(base).map_err(|_| libc::EINVAL)
}

/// The partition a path names: a symlink called `<image name><N>` whose target
/// is `<image name>` (`disk.vhd2 -> disk.vhd`) opens partition N.
pub fn partition_number(abs: &CStr) -> Option<u32> {
    let bytes = abs.to_bytes();
    let name = bytes.rsplit(|&b| b == b'/').next()?;
    let digits = name.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits == name.len() {
        return None;
    }
    let st = sys::fstatat(libc::AT_FDCWD, abs, libc::AT_SYMLINK_NOFOLLOW).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
        return None;
    }
    let mut target = [0u8; libc::PATH_MAX as usize];
    let n = sys::readlink(abs, &mut target).ok()?;
    let target = &target[..n];
    let target_name = target.rsplit(|&b| b == b'/').next()?;
    // The target's name may end in digits too (`disk.qcow21 -> disk.qcow2`).
    let number = name.strip_prefix(target_name)?;
    if number.is_empty() || number.len() > digits {
        return None;
    }
    std::str::from_utf8(number)
        .ok()?
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// The window a path opens on `disk`: (partition number, start, length),
/// partition 0 being the whole disk.
pub fn window(abs: &CStr, disk: &vdisk::Disk) -> Result<(u32, u64, u64), Errno> {
    match partition_number(abs) {
        None => Ok((0, 0, disk.size())),
        Some(n) => match vdisk::part::partition(disk, n) {
            Ok(Some(p)) => Ok((n, p.start, p.device_size())),
            Ok(None) => {
                log::warn!("{}: the disk has no partition {n}", abs.to_string_lossy());
                Err(libc::ENOENT)
            }
            Err(e) => {
                log::warn!(
                    "{}: cannot read the partition table: {e}",
                    abs.to_string_lossy()
                );
                Err(crate::errno::from_vdisk(&e))
            }
        },
    }
}

/// The size of the window an open of image path `abs` would get (regular-file
/// mode's st_size); `None` when `abs` is not an image.
pub fn window_len(abs: &CStr) -> Result<Option<u64>, Errno> {
    match images::open(abs, false)? {
        Opened::Image(obj) => Ok(Some(window(abs, &obj.disk())?.2)),
        Opened::NotImage => Ok(None),
    }
}

/// The common open: `Ok(None)` means "not an image, call libc".
fn open_image(dirfd: c_int, path: &CStr, flags: c_int) -> Result<Option<c_int>, Errno> {
    let abs = absolute(dirfd, path)?;
    let access = flags & libc::O_ACCMODE;
    let writable = access != libc::O_RDONLY;
    let obj = match images::open(&abs, writable)? {
        Opened::Image(obj) => obj,
        Opened::NotImage => return Ok(None),
    };
    // A second writer, or an exclusive open (O_EXCL without O_CREAT: "not in
    // use", as e2fsprogs asks of block devices), while another process
    // writes the image: EBUSY, as for a busy device.
    if (writable || flags & libc::O_EXCL != 0) && obj.has_other_writer() {
        log::warn!(
            "{}: busy: {}",
            abs.to_string_lossy(),
            crate::lock::writer_refusal(obj.container_fd())
        );
        return Err(libc::EBUSY);
    }
    // A regular file opened with O_TRUNC is empty, and writers then skip
    // holes (cp seeks over them): on a virtual disk that would silently keep
    // the old data there. A block device ignores O_TRUNC, so only
    // regular-file mode refuses it.
    if crate::config::as_file() && writable && flags & libc::O_TRUNC != 0 {
        log::warn!(
            "{}: O_TRUNC in regular-file mode (LIBVHD_IO_AS_FILE): a virtual disk cannot be emptied; \
             write it without LIBVHD_IO_AS_FILE (as a block device) or without truncating (dd conv=notrunc)",
            abs.to_string_lossy()
        );
        return Err(libc::EINVAL);
    }
    let (partition, start, len) = window(&abs, &obj.disk())?;
    let fd = new_open(&abs, obj, partition, start, len, flags)?;
    log::debug!(
        "open {} flags {flags:#o} -> dummy fd {fd}",
        abs.to_string_lossy()
    );
    Ok(Some(fd))
}

/// A new dummy fd and fd context for a window on an image object.
pub fn new_open(
    abs: &CStr,
    image: Arc<images::ImageObject>,
    partition: u32,
    start: u64,
    len: u64,
    flags: c_int,
) -> Result<c_int, Errno> {
    let suffix = if partition == 0 {
        String::new()
    } else {
        format!("#p{partition}")
    };
    let fd = make_dummy(abs, &suffix, flags)?;
    let base = fdtable::new_offset_base(len);
    if base != 0
        && let Err(e) = sys::lseek(fd, base as i64, libc::SEEK_SET)
    {
        sys::close(fd);
        return Err(crate::errno::from_io(&e));
    }
    let access = flags & libc::O_ACCMODE;
    register(
        fd,
        image,
        partition,
        (start, len),
        base,
        access,
        flags & (libc::O_SYNC | libc::O_DSYNC) != 0,
    )?;
    Ok(fd)
}

/// Maps an existing dummy `fd` to a new fd context: a window `(start, len)`
/// and the dummy's offset base (see `fdtable`).
pub fn register(
    fd: c_int,
    image: Arc<images::ImageObject>,
    partition: u32,
    (start, len): (u64, u64),
    offset_base: u64,
    access: c_int,
    sync: bool,
) -> Result<(), Errno> {
    let st = sys::fstat(fd).map_err(|e| crate::errno::from_io(&e))?;
    let of = Arc::new(OpenFile {
        dummy_dev: st.st_dev,
        dummy_ino: st.st_ino,
        access,
        sync,
        image,
        start,
        len,
        partition,
        offset_lock: Mutex::new(()),
        offset_base,
    });
    if !fdtable::insert(fd, of) {
        sys::close(fd);
        return Err(libc::EMFILE);
    }
    Ok(())
}

/// `/dev/stdin`, `/dev/stdout`, `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N`
/// and `/proc/<our pid>/fd/N`: the fd number they name.
pub fn fd_path(path: &CStr) -> Option<c_int> {
    let p = std::str::from_utf8(path.to_bytes()).ok()?;
    match p {
        "/dev/stdin" => return Some(0),
        "/dev/stdout" => return Some(1),
        "/dev/stderr" => return Some(2),
        _ => {}
    }
    let rest = p
        .strip_prefix("/dev/fd/")
        .or_else(|| p.strip_prefix("/proc/self/fd/"))
        .or_else(|| {
            let r = p.strip_prefix("/proc/")?;
            let (pid, r) = r.split_once('/')?;
            (pid.parse::<c_int>().ok()? == sys::getpid()).then_some(())?;
            r.strip_prefix("fd/")
        })?;
    rest.parse().ok()
}

/// Opening a dummy through /proc or /dev/fd opens the same window again (a new
/// open file description: own offset, own access mode), as for a device.
fn reopen_fd(path: &CStr, flags: c_int) -> Result<Option<c_int>, Errno> {
    let Some(n) = fd_path(path) else {
        return Ok(None);
    };
    if !fdtable::is_mapped(n) {
        return Ok(None);
    }
    let Some(of) = fdtable::lookup(n) else {
        return Ok(None);
    };
    let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
    if writable && !of.image.disk().is_writable() {
        // Upgrade the image object to read-write, as a new open would.
        images::open(&of.image.path, true)?;
    }
    let fd = new_open(
        &of.image.path,
        of.image.clone(),
        of.partition,
        of.start,
        of.len,
        flags,
    )?;
    log::debug!(
        "reopen of fd {n} via {} -> dummy fd {fd}",
        path.to_string_lossy()
    );
    Ok(Some(fd))
}

/// A memfd named after the image, reopened with the caller's access mode and
/// flags so F_GETFL, O_CLOEXEC and O_NONBLOCK behave as on the real file.
fn make_dummy(abs: &CStr, suffix: &str, flags: c_int) -> Result<c_int, Errno> {
    // memfd names are limited to 249 bytes; a longer path is cut (the name is
    // informational for the dummy; exec'ed children need the full one).
    let mut name = b"vhdio:".to_vec();
    name.extend_from_slice(abs.to_bytes());
    name.extend_from_slice(suffix.as_bytes());
    name.truncate(248);
    let name = CString::new(name).map_err(|_| libc::EINVAL)?;
    let memfd = sys::memfd_create(&name, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        .map_err(|e| crate::errno::from_io(&e))?;
    // Sealed empty: an access that bypasses the hooks (io_uring let through
    // by LIBVHD_IO_URING=allow, a raw syscall, a libc-internal call) fails
    // with EPERM on write and reads EOF, instead of landing in RAM and
    // vanishing. Seeking stays free (offsets past the end of shmem are
    // allowed), so the offset signature still works.
    if let Err(e) = sys::fcntl(
        memfd,
        libc::F_ADD_SEALS,
        (libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL)
            as libc::c_long,
    ) {
        sys::close(memfd);
        return Err(crate::errno::from_io(&e));
    }
    let keep = libc::O_ACCMODE
        | libc::O_CLOEXEC
        | libc::O_NONBLOCK
        | libc::O_NOATIME
        | libc::O_SYNC
        | libc::O_DSYNC;
    let reopen = CString::new(format!("/proc/self/fd/{memfd}")).map_err(|_| libc::EINVAL)?;
    match sys::openat(libc::AT_FDCWD, &reopen, (flags & keep) | libc::O_NOCTTY, 0) {
        Ok(fd) => {
            // Back onto the memfd's number: open() returns the lowest free fd,
            // and programs rely on it (close(0); open(image)).
            let cloexec = flags & libc::O_CLOEXEC;
            // SAFETY: dup3 between two fds of ours.
            if unsafe { crate::sys::syscall!(libc::SYS_dup3, fd, memfd, cloexec) } < 0 {
                sys::close(memfd);
                return Ok(fd);
            }
            sys::close(fd);
            Ok(memfd)
        }
        Err(_) => {
            // No /proc: keep the memfd itself (F_GETFL then says O_RDWR).
            if flags & libc::O_CLOEXEC == 0 {
                let _ = sys::fcntl(memfd, libc::F_SETFD, 0);
            }
            Ok(memfd)
        }
    }
}

/// Shared entry of every open variant. `real` performs the libc call.
///
/// `path` is the caller's pointer, possibly NULL: it is only dereferenced
/// when non-NULL, as libc would (an invalid pointer faults there too).
fn open_common(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    real: impl FnOnce() -> c_int,
) -> c_int {
    if path.is_null() || guard::inside() || flags & (libc::O_PATH | libc::O_DIRECTORY) != 0 {
        return real();
    }
    // O_CREAT|O_EXCL can only create a new (non-image) file or fail with EEXIST.
    if flags & (libc::O_CREAT | libc::O_EXCL) == libc::O_CREAT | libc::O_EXCL {
        return real();
    }
    // SAFETY: non-NULL path from the caller, NUL-terminated per the API.
    let p = unsafe { CStr::from_ptr(path) };
    crate::config::load();
    if !may_be_image(p) {
        return real();
    }
    match open_path(dirfd, p, flags) {
        Ok(Some(fd)) => fd,
        Ok(None) => real(),
        Err(e) => {
            crate::logger::set_errno(e);
            -1
        }
    }
}

/// Whether an open of `path` may concern an image: an image-like name, or a
/// /dev or /proc path that may name a dummy fd. No syscall.
pub fn may_be_image(path: &CStr) -> bool {
    is_fd_path(path) || is_candidate(path)
}

fn is_fd_path(path: &CStr) -> bool {
    let b = path.to_bytes();
    b.starts_with(b"/dev/") || b.starts_with(b"/proc/")
}

/// Opens `path` the library's way, under the guard: a /dev/fd/N-style path
/// reopens a dummy, an image-like path opens the image (an image may also sit
/// under /dev/shm). `Ok(None)`: not ours, the caller makes libc's call.
pub fn open_path(dirfd: c_int, path: &CStr, flags: c_int) -> Result<Option<c_int>, Errno> {
    let open = || {
        if is_fd_path(path)
            && let Some(fd) = reopen_fd(path, flags)?
        {
            return Ok(Some(fd));
        }
        if is_candidate(path) {
            open_image(dirfd, path, flags)
        } else {
            Ok(None)
        }
    };
    emulate(Err(libc::EIO), || Ok(open()))
}

fn needs_mode(flags: c_int) -> bool {
    flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE
}

macro_rules! call {
    ($real:expr, $($arg:expr),*) => {
        match $real.get() {
            // SAFETY: forwarding the caller's arguments to the real function.
            Some(f) => unsafe { f($($arg),*) },
            None => {
                crate::logger::set_errno(libc::ENOSYS);
                -1
            }
        }
    };
}
pub(crate) use call;

// The variadic mode argument is declared as a fixed parameter: on x86_64 and
// aarch64 Linux it arrives in the same register (Rust 1.95 cannot define
// C-variadic functions). It is only meaningful, and only passed on, with
// O_CREAT or O_TMPFILE.

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    let mode = if needs_mode(flags) { mode } else { 0 };
    open_common(libc::AT_FDCWD, path, flags, || {
        call!(real::OPEN, path, flags, mode)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    let mode = if needs_mode(flags) { mode } else { 0 };
    open_common(libc::AT_FDCWD, path, flags, || {
        call!(real::OPEN64, path, flags, mode)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    let mode = if needs_mode(flags) { mode } else { 0 };
    open_common(dirfd, path, flags, || {
        call!(real::OPENAT, dirfd, path, flags, mode)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    let mode = if needs_mode(flags) { mode } else { 0 };
    open_common(dirfd, path, flags, || {
        call!(real::OPENAT64, dirfd, path, flags, mode)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    open_common(libc::AT_FDCWD, path, flags, || {
        call!(real::OPEN_2, path, flags)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    open_common(libc::AT_FDCWD, path, flags, || {
        call!(real::OPEN64_2, path, flags)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    open_common(dirfd, path, flags, || {
        call!(real::OPENAT_2, dirfd, path, flags)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    open_common(dirfd, path, flags, || {
        call!(real::OPENAT64_2, dirfd, path, flags)
    })
}

/// creat is open(O_CREAT|O_WRONLY|O_TRUNC): on an image, a write-only open.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn creat(path: *const c_char, mode: mode_t) -> c_int {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    open_common(libc::AT_FDCWD, path, flags, || {
        call!(real::CREAT, path, mode)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: mode_t) -> c_int {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    open_common(libc::AT_FDCWD, path, flags, || {
        call!(real::CREAT64, path, mode)
    })
}
