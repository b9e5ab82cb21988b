//! Settings from the environment, read once at start-up with getenv (no lock,
//! no allocation, safe before main).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);
static DUMP: AtomicBool = AtomicBool::new(false);
static PROBE_ALL: AtomicBool = AtomicBool::new(false);

const UNREAD: u8 = 0;
const READING: u8 = 1;
const READ: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNREAD);

fn set(name: &std::ffi::CStr) -> bool {
    // SAFETY: getenv with a NUL-terminated name; the result is only tested.
    let v = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string.
    !v.is_null() && unsafe { *v } != 0 && unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes() != b"0"
}

/// Reads the environment on first use; cheap afterwards.
pub fn load() {
    if STATE.load(Ordering::Acquire) == READ {
        return;
    }
    if STATE.compare_exchange(UNREAD, READING, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return;
    }
    DEBUG.store(set(c"LIBVHD_IO_DEBUG"), Ordering::Relaxed);
    DUMP.store(set(c"LIBVHD_IO_DUMP"), Ordering::Relaxed);
    PROBE_ALL.store(set(c"LIBVHD_IO_PROBE_ALL"), Ordering::Relaxed);
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
