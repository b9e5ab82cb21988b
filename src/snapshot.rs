//! LIBVHD_IO_TEST, as in the original libvhdio: on SIGCONT, every open
//! writable image is snapshotted in place, so that a long workload that is
//! stopped and continued again and again grows a parent chain while its data
//! stays exact. The signal handler only sets a flag (async-signal-safe); the
//! snapshot runs at the next intercepted call on an image.
//!
//! Programs may handle SIGCONT themselves (libss-based tools such as debugfs
//! do): in test mode `signal` and `sigaction` for SIGCONT record the
//! program's handler, ours stays installed and calls theirs.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use libc::{c_int, sighandler_t, siginfo_t};

use crate::{config, guard, real};

static PENDING: AtomicBool = AtomicBool::new(false);
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The program's own SIGCONT handler and its flags (SA_SIGINFO...).
static PROGRAM_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PROGRAM_FLAGS: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_sigcont(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    PENDING.store(true, Ordering::Release);
    let h = PROGRAM_HANDLER.load(Ordering::Acquire);
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        return;
    }
    // SAFETY: the program installed this handler for SIGCONT with these flags.
    unsafe {
        if PROGRAM_FLAGS.load(Ordering::Acquire) & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) = std::mem::transmute(h);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(c_int) = std::mem::transmute(h);
            f(sig);
        }
    }
}

fn real_sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    match real::SIGACTION.get() {
        // SAFETY: forwarding valid pointers.
        Some(f) => unsafe { f(sig, act, old) },
        None => -1,
    }
}

pub fn install_handler() {
    // SAFETY: sigaction is plain data; the handler only touches atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigcont as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&raw mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if real_sigaction(libc::SIGCONT, &sa, &mut old) == 0 {
            PROGRAM_HANDLER.store(old.sa_sigaction, Ordering::Release);
            PROGRAM_FLAGS.store(old.sa_flags, Ordering::Release);
            INSTALLED.store(true, Ordering::Release);
        }
    }
}

fn ours(sig: c_int) -> bool {
    sig == libc::SIGCONT
        && INSTALLED.load(Ordering::Acquire)
        && config::test_mode()
        && !guard::inside()
}

/// Runs a requested snapshot; called from hooks on image fds.
#[inline]
pub fn run_if_pending() {
    if PENDING.load(Ordering::Relaxed) && PENDING.swap(false, Ordering::AcqRel) {
        let _guard = crate::guard::Guard::enter();
        crate::images::snapshot_all();
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if !ours(sig) {
        return real_sigaction(sig, act, old);
    }
    // SAFETY: the caller's pointers, each used only when non-NULL.
    unsafe {
        if !old.is_null() {
            real_sigaction(sig, std::ptr::null(), old);
            (*old).sa_sigaction = PROGRAM_HANDLER.load(Ordering::Acquire);
            (*old).sa_flags = PROGRAM_FLAGS.load(Ordering::Acquire);
        }
        if !act.is_null() {
            PROGRAM_FLAGS.store((*act).sa_flags, Ordering::Release);
            PROGRAM_HANDLER.store((*act).sa_sigaction, Ordering::Release);
        }
    }
    0
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn signal(sig: c_int, handler: sighandler_t) -> sighandler_t {
    if !ours(sig) {
        return match real::SIGNAL.get() {
            // SAFETY: forwarding the caller's arguments.
            Some(f) => unsafe { f(sig, handler) },
            None => libc::SIG_ERR,
        };
    }
    PROGRAM_FLAGS.store(0, Ordering::Release);
    PROGRAM_HANDLER.swap(handler, Ordering::AcqRel)
}
