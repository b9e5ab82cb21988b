//! libaio's functions are thin wrappers of the system calls that return
//! -errno. Without libaio loaded (a program found ours with dlsym), the same
//! calls are made here.

use libc::{c_int, c_long, timespec};

use super::libaio::{Ctx, IoEvent, Iocb};
use crate::logger::{errno, set_errno};

// Not in the libc crate.
#[cfg(target_arch = "x86_64")]
const SYS_IO_PGETEVENTS: c_long = 333;
#[cfg(not(target_arch = "x86_64"))]
const SYS_IO_PGETEVENTS: c_long = 292;

fn ret(f: impl FnOnce() -> c_long) -> c_int {
    let saved = errno();
    let r = f();
    let r = if r < 0 { -errno() } else { r as c_int };
    set_errno(saved);
    r
}

pub unsafe extern "C" fn io_setup(n: c_int, ctxp: *mut Ctx) -> c_int {
    // SAFETY: the caller's arguments, as libaio passes them.
    ret(|| unsafe { crate::sys::syscall!(libc::SYS_io_setup, n, ctxp) })
}

pub unsafe extern "C" fn io_destroy(ctx: Ctx) -> c_int {
    // SAFETY: as above.
    ret(|| unsafe { crate::sys::syscall!(libc::SYS_io_destroy, ctx) })
}

pub unsafe extern "C" fn io_submit(ctx: Ctx, nr: c_long, ios: *mut *mut Iocb) -> c_int {
    // SAFETY: as above.
    ret(|| unsafe { crate::sys::syscall!(libc::SYS_io_submit, ctx, nr, ios) })
}

pub unsafe extern "C" fn io_cancel(ctx: Ctx, iocb: *mut Iocb, ev: *mut IoEvent) -> c_int {
    // SAFETY: as above.
    ret(|| unsafe { crate::sys::syscall!(libc::SYS_io_cancel, ctx, iocb, ev) })
}

pub unsafe extern "C" fn io_getevents(
    ctx: Ctx,
    min: c_long,
    nr: c_long,
    evs: *mut IoEvent,
    ts: *mut timespec,
) -> c_int {
    // SAFETY: as above.
    ret(|| unsafe { crate::sys::syscall!(libc::SYS_io_getevents, ctx, min, nr, evs, ts) })
}

pub unsafe extern "C" fn io_pgetevents(
    ctx: Ctx,
    min: c_long,
    nr: c_long,
    evs: *mut IoEvent,
    ts: *mut timespec,
    mask: *mut libc::sigset_t,
) -> c_int {
    // The kernel takes the mask with its size (_NSIG / 8), as libaio passes it.
    let data: [usize; 2] = [mask as usize, 8];
    let arg = if mask.is_null() {
        std::ptr::null()
    } else {
        data.as_ptr()
    };
    // SAFETY: as above.
    ret(|| unsafe { crate::sys::syscall!(SYS_IO_PGETEVENTS, ctx, min, nr, evs, ts, arg) })
}
