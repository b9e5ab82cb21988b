//! POSIX AIO for image fds: aio_read, aio_write, aio_fsync, aio_error,
//! aio_return, aio_suspend, aio_cancel, lio_listio and their 64 names.
//! glibc runs requests in helper threads that call an internal pread no hook
//! sees, so an image request never reaches libc: it is performed in the
//! calling thread (see `aio`), recorded as complete, and its notification
//! delivered as glibc would.
//!
//! The result goes into glibc's own fields of the aiocb (`__error_code`,
//! `__return_value`), which is all glibc's aio_error and aio_return read and
//! what its aio_suspend checks: the hooks answer from there for image fds,
//! without a lock, and every other aiocb goes to libc.

use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::Arc;

use libc::{c_int, size_t, ssize_t, timespec};

use super::aio::{Op, perform};
use super::{Errno, image_fd_io};
use crate::fdtable::{OpenFile, is_mapped};
use crate::logger::set_errno;
use crate::{guard, real, sys};

/// glibc's `struct sigevent` (x86_64 and aarch64): the libc crate lacks the
/// SIGEV_THREAD members.
#[repr(C)]
pub struct Sigevent {
    value: *mut c_void,
    signo: c_int,
    notify: c_int,
    function: Option<unsafe extern "C" fn(*mut c_void)>,
    attributes: *const libc::pthread_attr_t,
    _pad: [c_int; 8],
}

/// glibc's `struct aiocb` (= `aiocb64` on LP64) with its internal members.
#[repr(C)]
pub struct Aiocb {
    fildes: c_int,
    lio_opcode: c_int,
    reqprio: c_int,
    buf: *mut c_void,
    nbytes: size_t,
    sigevent: Sigevent,
    next_prio: *mut c_void,
    abs_prio: c_int,
    policy: c_int,
    error_code: c_int,
    return_value: ssize_t,
    offset: i64,
    _reserved: [u8; 32],
}

const _: () = assert!(size_of::<Sigevent>() == 64 && size_of::<Aiocb>() == 168);

const LIO_READ: c_int = 0;
const LIO_WRITE: c_int = 1;
const LIO_NOP: c_int = 2;
const LIO_WAIT: c_int = 0;
const LIO_NOWAIT: c_int = 1;
const AIO_ALLDONE: c_int = 2;
const SI_ASYNCIO: c_int = -4;

fn image_of(cb: *const Aiocb) -> Option<Arc<OpenFile>> {
    if cb.is_null() || guard::inside() {
        return None;
    }
    // SAFETY: the caller's aiocb.
    let fd = unsafe { (*cb).fildes };
    if is_mapped(fd) {
        image_fd_io(fd).map(|r| r.arc())
    } else {
        None
    }
}

/// Stores the result where glibc's aio_error and aio_return read it.
fn record(cb: *mut Aiocb, r: Result<usize, Errno>) {
    let (err, ret) = match r {
        Ok(n) => (0, n as ssize_t),
        Err(e) => (e, -1),
    };
    // SAFETY: the caller's aiocb, which it must not touch until completion.
    unsafe {
        (*cb).return_value = ret;
        std::ptr::write_volatile(&mut (*cb).error_code, err);
    }
}

/// An aiocb of an image fd: its result fields are ours to answer from.
fn on_image(cb: *const Aiocb) -> bool {
    // SAFETY: the caller's aiocb.
    !cb.is_null() && is_mapped(unsafe { (*cb).fildes })
}

/// Performs `cb` on `of` and notifies as the aiocb asks; whether it succeeded.
fn serve(of: &OpenFile, cb: *mut Aiocb, op: Op) -> bool {
    let r = perform(of, op);
    let ok = r.is_ok();
    record(cb, r);
    let saved = crate::logger::errno();
    // SAFETY: the caller's aiocb.
    notify(unsafe { &(*cb).sigevent });
    set_errno(saved);
    ok
}

/// SIGEV_SIGNAL: the signal with SI_ASYNCIO and the value, queued to this
/// process (as glibc's __aio_sigqueue). SIGEV_THREAD: the function on a new
/// thread, as glibc does; this is the thread the program asked for.
fn notify(ev: &Sigevent) {
    match ev.notify {
        libc::SIGEV_SIGNAL => {
            // siginfo_t: signo, errno, code, then si_pid, si_uid, si_value.
            let mut info = [0u64; 16];
            let p = info.as_mut_ptr().cast::<u8>();
            // SAFETY: writes inside the 128-byte buffer, at siginfo_t's offsets.
            unsafe {
                p.cast::<c_int>().write(ev.signo);
                p.add(8).cast::<c_int>().write(SI_ASYNCIO);
                p.add(16).cast::<c_int>().write(sys::pid());
                p.add(20).cast::<u32>().write(libc::getuid());
                p.add(24).cast::<*mut c_void>().write(ev.value);
                crate::sys::syscall!(libc::SYS_rt_sigqueueinfo, sys::pid(), ev.signo, p);
            }
        }
        libc::SIGEV_THREAD => {
            let Some(f) = ev.function else { return };
            spawn_notifier(f, ev.value, ev.attributes);
        }
        _ => {}
    }
}

struct Notifier {
    f: unsafe extern "C" fn(*mut c_void),
    value: *mut c_void,
}

extern "C" fn run_notifier(arg: *mut c_void) -> *mut c_void {
    // SAFETY: arg is the Box leaked by spawn_notifier, taken once.
    let n = unsafe { Box::from_raw(arg.cast::<Notifier>()) };
    // SAFETY: the program's notification function and value.
    unsafe { (n.f)(n.value) };
    null_mut()
}

fn spawn_notifier(
    f: unsafe extern "C" fn(*mut c_void),
    value: *mut c_void,
    attr: *const libc::pthread_attr_t,
) {
    let arg = Box::into_raw(Box::new(Notifier { f, value })).cast::<c_void>();
    let mut tid: libc::pthread_t = 0;
    // SAFETY: pthread calls with valid pointers; a thread that could not be
    // created gets its argument back.
    unsafe {
        let mut own = std::mem::zeroed::<libc::pthread_attr_t>();
        let default = attr.is_null();
        let attr = if default {
            libc::pthread_attr_init(&mut own);
            libc::pthread_attr_setdetachstate(&mut own, libc::PTHREAD_CREATE_DETACHED);
            &own as *const libc::pthread_attr_t
        } else {
            attr
        };
        if libc::pthread_create(&mut tid, attr, run_notifier, arg) != 0 {
            drop(Box::from_raw(arg.cast::<Notifier>()));
            log::warn!("aio: cannot start the SIGEV_THREAD notification thread");
        }
        if default {
            libc::pthread_attr_destroy(&mut own);
        }
    }
}

fn read_op(cb: &Aiocb) -> Op {
    Op::Read(cb.buf, cb.nbytes, cb.offset)
}

fn write_op(cb: &Aiocb) -> Op {
    Op::Write(cb.buf, cb.nbytes, cb.offset)
}

type RequestFn = unsafe extern "C" fn(*mut Aiocb) -> c_int;
type FsyncFn = unsafe extern "C" fn(c_int, *mut Aiocb) -> c_int;

fn request(cb: *mut Aiocb, op: fn(&Aiocb) -> Op, real: Option<RequestFn>) -> c_int {
    if let Some(of) = image_of(cb) {
        // SAFETY: image_of checked the pointer.
        serve(&of, cb, op(unsafe { &*cb }));
        return 0;
    }
    match real {
        // SAFETY: forwarding the caller's aiocb.
        Some(f) => unsafe { f(cb) },
        None => {
            set_errno(libc::ENOSYS);
            -1
        }
    }
}

fn fsync_request(op: c_int, cb: *mut Aiocb, real: Option<FsyncFn>) -> c_int {
    if let Some(of) = image_of(cb) {
        if op != libc::O_SYNC && op != libc::O_DSYNC {
            set_errno(libc::EINVAL);
            return -1;
        }
        serve(&of, cb, Op::Flush);
        return 0;
    }
    match real {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(op, cb) },
        None => {
            set_errno(libc::ENOSYS);
            -1
        }
    }
}

// aio_error and aio_return read the aiocb, as glibc's do: no lock, so they
// stay async-signal-safe (a SIGEV_SIGNAL handler calls them).

fn error_of(cb: *const Aiocb, real: Option<unsafe extern "C" fn(*const Aiocb) -> c_int>) -> c_int {
    if on_image(cb) {
        // SAFETY: the caller's aiocb.
        return unsafe { std::ptr::read_volatile(&(*cb).error_code) };
    }
    // SAFETY: forwarding the caller's aiocb.
    real.map_or(libc::ENOSYS, |f| unsafe { f(cb) })
}

fn return_of(cb: *mut Aiocb, real: Option<unsafe extern "C" fn(*mut Aiocb) -> ssize_t>) -> ssize_t {
    if on_image(cb) {
        // SAFETY: the caller's aiocb.
        return unsafe { (*cb).return_value };
    }
    // SAFETY: forwarding the caller's aiocb.
    real.map_or(-1, |f| unsafe { f(cb) })
}

type SuspendFn = unsafe extern "C" fn(*const *const Aiocb, c_int, *const timespec) -> c_int;

/// Image requests are complete from submission: a list holding one returns
/// at once.
fn suspend(
    list: *const *const Aiocb,
    nent: c_int,
    timeout: *const timespec,
    real: Option<SuspendFn>,
) -> c_int {
    if !list.is_null() && nent > 0 {
        // SAFETY: the caller's list of nent entries.
        let entries = unsafe { std::slice::from_raw_parts(list, nent as usize) };
        if entries.iter().any(|&cb| {
            // SAFETY: as in error_of.
            on_image(cb)
                && unsafe { std::ptr::read_volatile(&(*cb).error_code) } != libc::EINPROGRESS
        }) {
            return 0;
        }
    }
    match real {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(list, nent, timeout) },
        None => {
            set_errno(libc::ENOSYS);
            -1
        }
    }
}

type CancelFn = unsafe extern "C" fn(c_int, *mut Aiocb) -> c_int;

/// Nothing on an image fd is ever in progress: AIO_ALLDONE.
fn cancel(fd: c_int, cb: *mut Aiocb, real: Option<CancelFn>) -> c_int {
    if is_mapped(fd) && !guard::inside() && image_fd_io(fd).is_some() {
        // SAFETY: the caller's aiocb, if any.
        if !cb.is_null() && unsafe { (*cb).fildes } != fd {
            set_errno(libc::EINVAL);
            return -1;
        }
        return AIO_ALLDONE;
    }
    match real {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(fd, cb) },
        None => {
            set_errno(libc::ENOSYS);
            -1
        }
    }
}

type ListioFn = unsafe extern "C" fn(c_int, *const *mut Aiocb, c_int, *mut Sigevent) -> c_int;

/// Image entries are performed here, in list order (each notified as its
/// aiocb asks, as glibc does); the others go to libc's lio_listio as one
/// list, in which the image entries are NULL.
fn listio(
    mode: c_int,
    list: *const *mut Aiocb,
    nent: c_int,
    sig: *mut Sigevent,
    real: Option<ListioFn>,
) -> c_int {
    let call = |list: *const *mut Aiocb| match real {
        // SAFETY: forwarding the caller's arguments (or our filtered list).
        Some(f) => unsafe { f(mode, list, nent, sig) },
        None => {
            set_errno(libc::ENOSYS);
            -1
        }
    };
    if list.is_null() || nent <= 0 || (mode != LIO_WAIT && mode != LIO_NOWAIT) {
        return call(list);
    }
    // SAFETY: the caller's list of nent entries.
    let entries = unsafe { std::slice::from_raw_parts(list, nent as usize) };
    let images: Vec<Option<Arc<OpenFile>>> = entries.iter().map(|&cb| image_of(cb)).collect();
    if images.iter().all(Option::is_none) {
        return call(list);
    }
    let mut others = entries.to_vec();
    let mut failed = false;
    let mut any_other = false;
    for (k, &cb) in entries.iter().enumerate() {
        let Some(of) = &images[k] else {
            // SAFETY: non-NULL entries are the caller's aiocbs.
            if !cb.is_null() && unsafe { (*cb).lio_opcode } != LIO_NOP {
                any_other = true;
            }
            continue;
        };
        others[k] = null_mut();
        // SAFETY: image_of checked the pointer.
        let op = match unsafe { (*cb).lio_opcode } {
            LIO_READ => read_op,
            LIO_WRITE => write_op,
            LIO_NOP => continue,
            _ => {
                record(cb, Err(libc::EINVAL));
                failed = true;
                continue;
            }
        };
        // SAFETY: as above.
        failed |= !serve(of, cb, op(unsafe { &*cb }));
    }
    if any_other {
        let r = call(others.as_ptr());
        if r != 0 {
            return r;
        }
    } else if mode == LIO_NOWAIT && !sig.is_null() {
        let saved = crate::logger::errno();
        // SAFETY: the caller's sigevent.
        notify(unsafe { &*sig });
        set_errno(saved);
    }
    if failed && mode == LIO_WAIT {
        set_errno(libc::EIO);
        return -1;
    }
    0
}

/// Each function under its two names (the 64 one is the same on LP64).
macro_rules! posix_aio_hooks {
    ($($name:ident, $name64:ident = $real:ident, $real64:ident: ($($arg:ident: $ty:ty),*) -> $ret:ty => $body:ident($($pass:expr),*);)*) => {$(
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            $body($($pass,)* real::$real.get())
        }
        #[cfg_attr(not(test), unsafe(no_mangle))]
        pub unsafe extern "C" fn $name64($($arg: $ty),*) -> $ret {
            $body($($pass,)* real::$real64.get())
        }
    )*};
}

posix_aio_hooks! {
    aio_read, aio_read64 = AIO_READ, AIO_READ64: (cb: *mut Aiocb) -> c_int => request(cb, read_op);
    aio_write, aio_write64 = AIO_WRITE, AIO_WRITE64: (cb: *mut Aiocb) -> c_int => request(cb, write_op);
    aio_fsync, aio_fsync64 = AIO_FSYNC, AIO_FSYNC64: (op: c_int, cb: *mut Aiocb) -> c_int => fsync_request(op, cb);
    aio_error, aio_error64 = AIO_ERROR, AIO_ERROR64: (cb: *const Aiocb) -> c_int => error_of(cb);
    aio_return, aio_return64 = AIO_RETURN, AIO_RETURN64: (cb: *mut Aiocb) -> ssize_t => return_of(cb);
    aio_suspend, aio_suspend64 = AIO_SUSPEND, AIO_SUSPEND64: (list: *const *const Aiocb, nent: c_int, timeout: *const timespec) -> c_int => suspend(list, nent, timeout);
    aio_cancel, aio_cancel64 = AIO_CANCEL, AIO_CANCEL64: (fd: c_int, cb: *mut Aiocb) -> c_int => cancel(fd, cb);
    lio_listio, lio_listio64 = LIO_LISTIO, LIO_LISTIO64: (mode: c_int, list: *const *mut Aiocb, nent: c_int, sig: *mut Sigevent) -> c_int => listio(mode, list, nent, sig);
}
