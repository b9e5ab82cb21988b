//! io_uring is not available to a program under the library. Its requests
//! run in the kernel on the raw fds of the ring's submission queue, where no
//! hook sees them: on an image fd they would read the empty sealed dummy (end
//! of file, a silent wrong answer) and fail to write it. So setting up a ring
//! fails with ENOSYS, what a kernel without io_uring answers: programs with a
//! fallback (fio's psync and libaio engines, QEMU, liburing users that check)
//! take their read/pread/libaio path, which the library serves. One log line
//! per process says why and what to use instead.
//!
//! A ring is set up either with the `io_uring_setup` system call through
//! glibc's `syscall()` (fio, and most programs without liburing) or through
//! liburing, whose functions make the system call with inline assembly
//! (liburing 2.3: `objdump -d liburing.so.2`), so liburing's exported setup
//! functions are hooked too; they return -errno, as liburing's do. No ring
//! can exist, so io_uring_enter and io_uring_register need nothing.
//!
//! `LIBVHD_IO_URING=allow` lets setup through for programs that use io_uring
//! on other files only (then the old escape stays: reads of an image through
//! the ring see end of file, writes fail with EPERM).

use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, Ordering};

use libc::{c_int, c_long, c_uint, size_t};

use crate::{config, logger, real, sys};

/// The process that last logged the refusal: one line per process, forks
/// included (their pid differs).
static LOGGED: AtomicI32 = AtomicI32::new(0);

/// Whether io_uring setup is refused here; if so, logs why (once).
#[cold]
#[inline(never)]
fn refused(what: &str) -> bool {
    config::load();
    if config::io_uring_allowed() {
        return false;
    }
    let pid = sys::pid();
    if LOGGED.swap(pid, Ordering::Relaxed) != pid {
        logger::emit(format_args!(
            "warning: io_uring is not available under libvhdio: {what} fails with ENOSYS \
             (io_uring requests run in the kernel on raw fds, out of the library's reach, \
             and would read an image as empty); use the program's psync or libaio mode \
             (fio --ioengine=psync or libaio), or `vhdio serve` and an NBD client for a \
             real block device; LIBVHD_IO_URING=allow lets io_uring through for programs \
             that never use it on an image"
        ));
    }
    true
}

// glibc declares `long syscall(long number, ...)`. Rust 1.95 cannot define a
// C-variadic function, so the hook takes the number and six `c_long`
// arguments, as musl's syscall() reads them with va_arg (no system call takes
// more than six, nor a floating-point one). On x86_64 (System V) and aarch64
// Linux (AAPCS64: unlike Apple's arm64, variadic arguments go where named
// ones would) integer arguments take the same registers and stack slots
// whether the callee is variadic or not: x86_64 passes the number and five
// arguments in rdi, rsi, rdx, rcx, r8, r9 and the sixth on the stack at
// 8(%rsp), aarch64 all seven in x0-x6. A caller that passes fewer leaves
// whatever the registers and its own stack slot hold, which glibc's syscall
// (it loads all six, 8(%rsp) included) passes to the kernel in the same way;
// the kernel ignores the arguments a system call does not take. The only
// variadic extra, x86_64's %al (count of vector registers used), is set by
// Rust when it calls the real function through its variadic type. Other
// architectures are not checked (some pass variadic arguments elsewhere):
// no hook there, their io_uring escapes as before.
/// The program's raw system calls: everything but io_uring_setup goes to
/// glibc's syscall with all six arguments unchanged.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn syscall(
    n: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    if n != libc::SYS_io_uring_setup
        && let Some(f) = real::SYSCALL.resolved()
    {
        // SAFETY: the caller's system call and arguments, passed on as they came.
        return unsafe { f(n, a1, a2, a3, a4, a5, a6) };
    }
    // SAFETY: as above.
    unsafe { syscall_slow(n, a1, a2, a3, a4, a5, a6) }
}

/// io_uring_setup, or any call before the real syscall is resolved.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[cold]
#[inline(never)]
unsafe fn syscall_slow(
    n: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    if n == libc::SYS_io_uring_setup && refused("io_uring_setup") {
        logger::set_errno(libc::ENOSYS);
        return -1;
    }
    match real::SYSCALL.get() {
        // SAFETY: as in `syscall`.
        Some(f) => unsafe { f(n, a1, a2, a3, a4, a5, a6) },
        None => {
            logger::set_errno(libc::ENOSYS);
            -1
        }
    }
}

/// liburing's functions return -errno; the real one is liburing's own
/// (present whenever a program calls these: it links liburing). liburing
/// before 2.2 made the system call through glibc's syscall(), which the hook
/// above refuses anyway.
macro_rules! liburing {
    ($real:expr, $what:literal, $($arg:expr),*) => {
        if refused($what) {
            -libc::ENOSYS
        } else {
            match $real.get() {
                // SAFETY: the caller's arguments, passed on to liburing.
                Some(f) => unsafe { f($($arg),*) },
                None => -libc::ENOSYS,
            }
        }
    };
}

/// liburing ≥ 2.3's raw `io_uring_setup(entries, params)`.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_uring_setup(entries: c_uint, p: *mut c_void) -> c_int {
    liburing!(real::IO_URING_SETUP, "io_uring_setup", entries, p)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_uring_queue_init(
    entries: c_uint,
    ring: *mut c_void,
    flags: c_uint,
) -> c_int {
    liburing!(
        real::IO_URING_QUEUE_INIT,
        "io_uring_queue_init",
        entries,
        ring,
        flags
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_uring_queue_init_params(
    entries: c_uint,
    ring: *mut c_void,
    p: *mut c_void,
) -> c_int {
    liburing!(
        real::IO_URING_QUEUE_INIT_PARAMS,
        "io_uring_queue_init_params",
        entries,
        ring,
        p
    )
}

/// liburing ≥ 2.5 (not in Debian 12's 2.3): a ring in the caller's memory.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_uring_queue_init_mem(
    entries: c_uint,
    ring: *mut c_void,
    p: *mut c_void,
    buf: *mut c_void,
    size: size_t,
) -> c_int {
    liburing!(
        real::IO_URING_QUEUE_INIT_MEM,
        "io_uring_queue_init_mem",
        entries,
        ring,
        p,
        buf,
        size
    )
}
