//! Start-up: runs from .init_array when the library is loaded. Every hook also
//! works before this (hooks can be called from other libraries' constructors).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use libc::c_int;

use crate::hooks::open::{is_candidate, new_open, register};
use crate::images::{self, Opened};
use crate::{config, fdtable, guard, logger, real, sys};

const MEMFD_PREFIX: &[u8] = b"/memfd:vhdio:";

extern "C" fn init() {
    let _g = guard::Guard::enter();
    config::load();
    sys::refresh_pid();
    logger::install();
    real::resolve_all();
    // The default panic hook may open files for a backtrace and print through
    // our own hooks; report on one line with a raw write instead.
    std::panic::set_hook(Box::new(|info| {
        logger::emit(format_args!(
            "internal error: {info}; the call fails with EIO"
        ));
    }));
    if config::test_mode() {
        crate::snapshot::install_handler();
    }
    // SAFETY: registering plain extern "C" callbacks.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_release), Some(fork_child)) };
    let saved = logger::errno();
    rebuild_inherited();
    adopt_std_fds();
    crate::hooks::stdio::replace_std_streams();
    logger::set_errno(saved);
}

type Held = (
    std::sync::MutexGuard<'static, Vec<std::sync::Weak<images::ImageObject>>>,
    std::sync::MutexGuard<'static, Vec<std::sync::Arc<std::sync::atomic::AtomicI32>>>,
    std::sync::MutexGuard<'static, Vec<crate::hooks::libaio::Queue>>,
);

thread_local! {
    // Only the forking thread touches it, between prepare and release.
    static HELD: std::cell::RefCell<Option<Held>> = const { std::cell::RefCell::new(None) };
}

/// fork in a multi-threaded program: no other thread may hold one of the
/// library's global locks at the moment of fork, or the child would wait for
/// it forever. Taken in the one global order: registry, internal fds,
/// libaio queues. (The fd table has no lock: a fork in the middle of a
/// lookup is harmless.)
extern "C" fn fork_prepare() {
    let held = (
        images::registry(),
        fdtable::lock_owners(),
        crate::hooks::libaio::lock(),
    );
    HELD.with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn fork_release() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

extern "C" fn fork_child() {
    sys::refresh_pid();
    fork_release();
}

/// The window an inherited dummy names: `<path>` or `<path>#p<N>`.
fn split_partition(name: &[u8]) -> (&[u8], u32) {
    if let Some(i) = name.windows(2).rposition(|w| w == b"#p") {
        let digits = &name[i + 2..];
        if !digits.is_empty()
            && digits.iter().all(u8::is_ascii_digit)
            && let Some(n) = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
        {
            return (&name[..i], n);
        }
    }
    (name, 0)
}

/// The window (partition, start, length) of `obj` for partition `n`.
fn window(obj: &images::ImageObject, n: u32) -> Option<(u32, u64, u64)> {
    let disk = obj.disk();
    if n == 0 {
        return Some((0, 0, disk.size()));
    }
    let p = vdisk::part::partition(&disk, n).ok()??;
    Some((n, p.start, p.device_size()))
}

fn access_mode(fd: c_int) -> Option<c_int> {
    sys::fcntl(fd, libc::F_GETFL, 0).ok().map(|f| f as c_int)
}

/// An exec'ed program inherits dummies (`cmd < disk.vhd` from a preloaded
/// shell, `exec 3<>disk.vhd`): the memfd names say which image each serves,
/// and the offset is already in the memfd.
fn rebuild_inherited() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<c_int>().ok())
        else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.as_os_str().as_bytes();
        let Some(rest) = target.strip_prefix(MEMFD_PREFIX) else {
            continue;
        };
        let rest = rest.strip_suffix(b" (deleted)").unwrap_or(rest);
        let (path, n) = split_partition(rest);
        let Some(flags) = access_mode(fd) else {
            continue;
        };
        let access = flags & libc::O_ACCMODE;
        let Ok(path) = CString::new(path) else {
            continue;
        };
        let obj = match images::open(&path, access != libc::O_RDONLY) {
            Ok(Opened::Image(obj)) => obj,
            _ => {
                log::warn!(
                    "inherited fd {fd} names {} which cannot be opened as an image",
                    path.to_string_lossy()
                );
                continue;
            }
        };
        let Some((n, start, len)) = window(&obj, n) else {
            continue;
        };
        let raw = sys::lseek(fd, 0, libc::SEEK_CUR).unwrap_or(0);
        let base = fdtable::inherited_offset_base(raw, len);
        if register(
            fd,
            obj,
            n,
            (start, len),
            base,
            access,
            flags & (libc::O_SYNC | libc::O_DSYNC) != 0,
        )
        .is_ok()
        {
            log::debug!("inherited dummy fd {fd}: {}", path.to_string_lossy());
        }
    }
}

/// `md5sum < disk.vhd` from a shell without the library: fd 0 is the container
/// itself. Replace it by a dummy at the same offset.
fn adopt_std_fds() {
    for fd in 0..3 {
        if fdtable::is_mapped(fd) {
            continue;
        }
        let Ok(st) = sys::fstat(fd) else { continue };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            continue;
        }
        let Ok(link) = CString::new(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        let mut buf = [0u8; libc::PATH_MAX as usize];
        let Ok(n) = sys::readlink(&link, &mut buf) else {
            continue;
        };
        let Ok(path) = CString::new(&buf[..n]) else {
            continue;
        };
        if !is_candidate(&path) {
            continue;
        }
        let Some(flags) = access_mode(fd) else {
            continue;
        };
        let access = flags & libc::O_ACCMODE;
        let obj = match images::open(&path, access != libc::O_RDONLY) {
            Ok(Opened::Image(obj)) if obj.id() == (st.st_dev, st.st_ino) => obj,
            _ => continue,
        };
        let len = obj.disk().size();
        let pos = sys::lseek(fd, 0, libc::SEEK_CUR)
            .unwrap_or(0)
            .clamp(0, len as i64);
        let Ok(dummy) = new_open(&path, obj, 0, 0, len, access) else {
            continue;
        };
        let Some(of) = fdtable::remove(dummy) else {
            sys::close(dummy);
            continue;
        };
        let moved = of.set_position(dummy, pos as u64).is_ok()
            // SAFETY: dup3 onto a std fd number we are replacing on purpose.
            && unsafe { crate::sys::syscall!(libc::SYS_dup3, dummy, fd, 0) } == fd as libc::c_long;
        sys::close(dummy);
        if moved {
            fdtable::insert(fd, of);
            log::debug!("adopted image {} on fd {fd}", path.to_string_lossy());
        }
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

/// At exit (from .fini_array): images still open commit the table updates
/// they keep in memory, as their last close would. `_exit` and fatal
/// signals skip this: then allocations since the last flush are leaked, as
/// after a power cut (the page cache keeps the data, not our metadata).
extern "C" fn fini() {
    if guard::inside() {
        return;
    }
    // exit() flushes stdio after .fini_array: streams on images (cookie
    // streams) must write their buffers now, while the disks are open.
    // SAFETY: fflush(NULL) flushes every output stream.
    unsafe { libc::fflush(std::ptr::null_mut()) };
    let _g = guard::Guard::enter();
    let _ = std::panic::catch_unwind(|| images::close_all("exit"));
}

#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = fini;
