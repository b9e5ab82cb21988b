//! LIBVHD_IO_TEST, as in the original libvhdio: on SIGCONT, every open
//! writable image is snapshotted in place, so that a long workload that is
//! stopped and continued again and again grows a parent chain while its data
//! stays exact. The signal handler only sets a flag (async-signal-safe); the
//! snapshot runs at the next intercepted call on an image.

use std::sync::atomic::{AtomicBool, Ordering};

static PENDING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigcont(_sig: libc::c_int) {
    PENDING.store(true, Ordering::Release);
}

pub fn install_handler() {
    // SAFETY: a plain handler that stores to an atomic; SA_RESTART keeps the
    // program's interrupted calls going.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigcont as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut sa.sa_mask);
        libc::sigaction(libc::SIGCONT, &sa, std::ptr::null_mut());
    }
}

/// Runs a requested snapshot; called from hooks on image fds.
#[inline]
pub fn run_if_pending() {
    if PENDING.load(Ordering::Relaxed) && PENDING.swap(false, Ordering::AcqRel) {
        crate::images::snapshot_all();
    }
}
