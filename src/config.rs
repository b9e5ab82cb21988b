//! Settings from the environment, read once at start-up with getenv (no lock,
//! no allocation, safe before main).

use std::ffi::CStr;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, Ordering};

use crate::fdtable::InternalFd;

static DEBUG: AtomicBool = AtomicBool::new(false);
static DUMP: AtomicBool = AtomicBool::new(false);
static PROBE_ALL: AtomicBool = AtomicBool::new(false);
static NO_LOCK: AtomicBool = AtomicBool::new(false);
static TEST: AtomicBool = AtomicBool::new(false);
static AS_FILE: AtomicBool = AtomicBool::new(false);
static IO_URING_ALLOW: AtomicBool = AtomicBool::new(false);
static PUNCH_HOLES: AtomicBool = AtomicBool::new(false);
/// LIBVHD_IO_ONLY: the images and folders to virtualise (null: all).
static ONLY: AtomicPtr<Vec<Vec<u8>>> = AtomicPtr::new(null_mut());
/// LIBVHD_IO_VDI_PATH: more folders to search for VDI parents.
static VDI_PATH: AtomicPtr<Vec<Vec<u8>>> = AtomicPtr::new(null_mut());
/// LIBVHD_IO_LOG: the log file (null: stderr).
static LOG: AtomicPtr<InternalFd> = AtomicPtr::new(null_mut());

const UNREAD: u8 = 0;
const READING: u8 = 1;
const READ: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNREAD);

fn get(name: &CStr) -> Option<&'static CStr> {
    // SAFETY: getenv with a NUL-terminated name.
    let v = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string that lives
    // as long as the environment entry; it is copied before any setenv can run.
    (!v.is_null()).then(|| unsafe { CStr::from_ptr(v) })
}

fn set(name: &CStr) -> bool {
    get(name).is_some_and(|v| !v.is_empty() && v.to_bytes() != b"0")
}

/// Reads the environment on first use; one load afterwards.
#[inline]
pub fn load() {
    if STATE.load(Ordering::Acquire) != READ {
        load_slow();
    }
}

#[cold]
fn load_slow() {
    if STATE
        .compare_exchange(UNREAD, READING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    DEBUG.store(set(c"LIBVHD_IO_DEBUG"), Ordering::Relaxed);
    DUMP.store(set(c"LIBVHD_IO_DUMP"), Ordering::Relaxed);
    PROBE_ALL.store(set(c"LIBVHD_IO_PROBE_ALL"), Ordering::Relaxed);
    NO_LOCK.store(set(c"LIBVHD_IO_NO_LOCK"), Ordering::Relaxed);
    TEST.store(set(c"LIBVHD_IO_TEST"), Ordering::Relaxed);
    AS_FILE.store(set(c"LIBVHD_IO_AS_FILE"), Ordering::Relaxed);
    IO_URING_ALLOW.store(
        get(c"LIBVHD_IO_URING").is_some_and(|v| v.to_bytes() == b"allow"),
        Ordering::Relaxed,
    );
    PUNCH_HOLES.store(set(c"LIBVHD_IO_PUNCH_HOLES"), Ordering::Relaxed);
    if let Some(only) = get(c"LIBVHD_IO_ONLY").filter(|v| !v.is_empty()) {
        let list: Vec<Vec<u8>> = only
            .to_bytes()
            .split(|&b| b == b':')
            .filter(|p| !p.is_empty())
            .map(|p| p.strip_suffix(b"/").unwrap_or(p).to_vec())
            .collect();
        ONLY.store(Box::into_raw(Box::new(list)), Ordering::Release);
    }
    if let Some(dirs) = get(c"LIBVHD_IO_VDI_PATH").filter(|v| !v.is_empty()) {
        let list: Vec<Vec<u8>> = dirs
            .to_bytes()
            .split(|&b| b == b':')
            .filter(|p| !p.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        VDI_PATH.store(Box::into_raw(Box::new(list)), Ordering::Release);
    }
    if let Some(path) = get(c"LIBVHD_IO_LOG").filter(|v| !v.is_empty()) {
        let flags =
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOCTTY;
        if let Ok(fd) = crate::sys::openat(libc::AT_FDCWD, path, flags, 0o644) {
            let fd = crate::sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, 300).map_or(fd, |high| {
                crate::sys::close(fd);
                high as libc::c_int
            });
            LOG.store(
                Box::into_raw(Box::new(InternalFd::new(fd))),
                Ordering::Release,
            );
        }
    }
    STATE.store(READ, Ordering::Release);
}

/// LIBVHD_IO_DEBUG: log every intercepted call on an image and every fd mapping.
pub fn debug() -> bool {
    DEBUG.load(Ordering::Relaxed)
}
/// LIBVHD_IO_DUMP: hex-dump the data read from and written to images.
pub fn dump() -> bool {
    DUMP.load(Ordering::Relaxed)
}
/// LIBVHD_IO_PROBE_ALL: probe every regular file by content, not only the
/// names that look like images.
pub fn probe_all() -> bool {
    PROBE_ALL.load(Ordering::Relaxed)
}

/// LIBVHD_IO_TEST: snapshot open writable images on SIGCONT.
pub fn test_mode() -> bool {
    TEST.load(Ordering::Relaxed)
}

/// LIBVHD_IO_NO_LOCK: no inter-process locking (dangerous: two writers
/// corrupt an image).
pub fn no_lock() -> bool {
    NO_LOCK.load(Ordering::Relaxed)
}

/// LIBVHD_IO_AS_FILE: an image (or partition) stats as a regular file of its
/// virtual size instead of a block device, so that archivers and copiers
/// (tar, cp -a, rsync -a) store its bytes and FUSE file systems (ntfs-3g)
/// take the plain-file path.
pub fn as_file() -> bool {
    AS_FILE.load(Ordering::Relaxed)
}

/// LIBVHD_IO_URING=allow: io_uring setup goes to the kernel instead of
/// failing with ENOSYS, for programs that use io_uring on other files only
/// (on an image it would read the empty dummy and fail to write it).
pub fn io_uring_allowed() -> bool {
    IO_URING_ALLOW.load(Ordering::Relaxed)
}

/// LIBVHD_IO_PUNCH_HOLES: discards punch holes in the image file where data
/// stays in place (fixed images, parts of blocks) instead of writing zeros.
/// Off by default: the image file becomes sparse, which Windows refuses for
/// VHDX files.
pub fn punch_holes() -> bool {
    PUNCH_HOLES.load(Ordering::Relaxed)
}

/// Whether the image at absolute path `abs` may be virtualised (LIBVHD_IO_ONLY).
pub fn allowed(abs: &[u8]) -> bool {
    let p = ONLY.load(Ordering::Acquire);
    if p.is_null() {
        return true;
    }
    // SAFETY: set once, leaked, never freed.
    let list = unsafe { &*p };
    list.iter()
        .any(|e| abs == e.as_slice() || (abs.starts_with(e) && abs.get(e.len()) == Some(&b'/')))
}

/// Where log lines go.
pub fn log_fd() -> libc::c_int {
    let p = LOG.load(Ordering::Acquire);
    // SAFETY: set once, leaked, never freed.
    if p.is_null() { 2 } else { unsafe { &*p }.get() }
}

/// The folders of LIBVHD_IO_VDI_PATH.
pub fn vdi_path() -> &'static [Vec<u8>] {
    let p = VDI_PATH.load(Ordering::Acquire);
    // SAFETY: set once, leaked, never freed.
    if p.is_null() { &[] } else { unsafe { &*p } }
}
