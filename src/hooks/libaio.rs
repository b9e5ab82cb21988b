//! libaio for image fds: io_setup, io_submit, io_getevents, io_pgetevents,
//! io_cancel and io_destroy, libaio.so.1's exported functions (programs such
//! as fio call them through the PLT; inside, libaio makes raw syscalls that
//! would carry the dummy fd to the kernel). Without libaio loaded, the hooks
//! make libaio's system calls themselves (see `direct`).
//!
//! An iocb on an image fd is performed at submit (see `aio`); every other
//! iocb goes to the kernel in the same context, in batch order. The kernel
//! then delivers the image iocb's event itself (see `deliver`): it is in the
//! context's completion ring like any other, so io_getevents, waiting
//! threads, eventfds and programs that read the ring themselves (fio's
//! `userspace_reap`) all see it. The events the kernel cannot carry (errors,
//! or a full ring) wait in a per-context queue here, which io_getevents hands
//! out before the kernel's; a thread blocked in the kernel on that context is
//! woken by a no-op kernel request (a 0-byte write to /dev/null) that
//! io_getevents drops.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use libc::{c_int, c_long, timespec};

use super::aio::{Op, perform};
use super::image_fd_io;
use super::libaio_direct as direct;
use crate::fdtable::{self, InternalFd, OpenFile, is_mapped};
use crate::{guard, real, sys};

/// The kernel's `struct iocb` (libaio's has the same layout).
#[repr(C)]
pub struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// The kernel's `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// `io_context_t`: the kernel's aio_context_t, a pointer type in libaio.
pub type Ctx = usize;

const CMD_PREAD: u16 = 0;
const CMD_PWRITE: u16 = 1;
const CMD_FSYNC: u16 = 2;
const CMD_FDSYNC: u16 = 3;
const CMD_PREADV: u16 = 7;
const CMD_PWRITEV: u16 = 8;
const FLAG_RESFD: u32 = 1;

/// `aio_data` of the wake-up requests ("vhdiowak").
const WAKE_DATA: u64 = 0x7668_6469_6f77_616b;

pub(crate) struct Queue {
    ctx: Ctx,
    events: VecDeque<IoEvent>,
    /// Threads blocked in the kernel's io_getevents on this context.
    waiters: usize,
}

/// Contexts that may see image iocbs. A mutex, but off the path of processes
/// without images: io_getevents skips it while no queue and no image exist.
static QUEUES: Mutex<Vec<Queue>> = Mutex::new(Vec::new());
static QUEUED: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn lock() -> MutexGuard<'static, Vec<Queue>> {
    QUEUES.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget(ctx: Ctx) {
    let mut q = lock();
    if let Some(i) = q.iter().position(|q| q.ctx == ctx) {
        q.swap_remove(i);
        QUEUED.fetch_sub(1, Ordering::Relaxed);
    }
}

fn image_of(iocb: *const Iocb) -> Option<Arc<OpenFile>> {
    if iocb.is_null() {
        return None;
    }
    // SAFETY: a non-NULL iocb pointer from the caller's batch.
    let fd = unsafe { (*iocb).aio_fildes } as c_int;
    if is_mapped(fd) {
        image_fd_io(fd).map(|r| r.arc())
    } else {
        None
    }
}

fn maybe_image(iocb: *const Iocb) -> bool {
    // SAFETY: as in image_of.
    !iocb.is_null() && is_mapped(unsafe { (*iocb).aio_fildes } as c_int)
}

/// Performs an image iocb: its event, or the errno io_submit fails with
/// (what the kernel checks at submit: opcode, access mode, offset).
fn complete(of: &OpenFile, iocb: &Iocb) -> Result<IoEvent, c_int> {
    let (buf, n, off) = (
        iocb.aio_buf as *mut c_void,
        iocb.aio_nbytes,
        iocb.aio_offset,
    );
    let vecs = || {
        c_int::try_from(n)
            .ok()
            .filter(|&c| c <= libc::UIO_MAXIOV)
            .ok_or(libc::EINVAL)
    };
    let (op, reads, writes) = match iocb.aio_lio_opcode {
        CMD_PREAD => (Op::Read(buf, n as usize, off), true, false),
        CMD_PWRITE => (Op::Write(buf, n as usize, off), false, true),
        CMD_PREADV => (Op::ReadV(buf.cast(), vecs()?, off), true, false),
        CMD_PWRITEV => (Op::WriteV(buf.cast(), vecs()?, off), false, true),
        CMD_FSYNC | CMD_FDSYNC => (Op::Flush, false, false),
        _ => return Err(libc::EINVAL),
    };
    if (reads && !of.readable()) || (writes && !of.writable()) {
        return Err(libc::EBADF);
    }
    if (reads || writes) && off < 0 {
        return Err(libc::EINVAL);
    }
    let res = match perform(of, op) {
        Ok(n) => n as i64,
        Err(e) => -(e as i64),
    };
    Ok(IoEvent {
        data: iocb.aio_data,
        obj: iocb as *const Iocb as u64,
        res,
        res2: 0,
    })
}

type SubmitFn = unsafe extern "C" fn(Ctx, c_long, *mut *mut Iocb) -> c_int;

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_submit(ctx: Ctx, nr: c_long, ios: *mut *mut Iocb) -> c_int {
    let kernel = real::IO_SUBMIT.get().unwrap_or(direct::io_submit);
    // SAFETY: ios holds nr iocb pointers (io_submit's contract).
    let batch = || unsafe { std::slice::from_raw_parts(ios, nr as usize) };
    if nr <= 0
        || ios.is_null()
        || !fdtable::any_mapped()
        || guard::inside()
        || !batch().iter().any(|&p| maybe_image(p))
    {
        // SAFETY: forwarding the caller's arguments.
        return unsafe { kernel(ctx, nr, ios) };
    }
    submit_mixed(ctx, batch(), kernel)
}

/// A batch with image iocbs: runs of other iocbs go to the kernel, image ones
/// are performed in between; stops where the kernel or a submit check stops.
fn submit_mixed(ctx: Ctx, batch: &[*mut Iocb], kernel: SubmitFn) -> c_int {
    let mut done = 0usize;
    let mut queued = Vec::new();
    let mut failed = 0;
    let mut i = 0;
    while i < batch.len() {
        if image_of(batch[i]).is_none() {
            let run = 1 + batch[i + 1..]
                .iter()
                .take_while(|&&p| !maybe_image(p))
                .count();
            // SAFETY: a sub-slice of the caller's batch; the kernel reads it.
            let r = unsafe { kernel(ctx, run as c_long, batch[i..].as_ptr().cast_mut()) };
            if r < 0 {
                failed = r;
                break;
            }
            done += r as usize;
            if (r as usize) < run {
                break;
            }
            i += run;
            continue;
        }
        // A run of image iocbs, performed in order.
        let mut events = Vec::new();
        while i < batch.len()
            && let Some(of) = image_of(batch[i])
        {
            // SAFETY: image_of checked the pointer is not NULL.
            match complete(&of, unsafe { &*batch[i] }) {
                Ok(ev) => events.push(ev),
                Err(e) => {
                    failed = -e;
                    break;
                }
            }
            done += 1;
            i += 1;
        }
        queued.extend(deliver(ctx, &events, kernel));
        if failed != 0 {
            break;
        }
    }
    if !queued.is_empty() {
        queue(ctx, &queued);
        for ev in &queued {
            // SAFETY: obj is the caller's iocb, performed above.
            let iocb = unsafe { &*(ev.obj as *const Iocb) };
            if iocb.aio_flags & FLAG_RESFD != 0 {
                let _ = sys::write(iocb.aio_resfd as c_int, &1u64.to_ne_bytes());
            }
        }
    }
    if done == 0 { failed } else { done as c_int }
}

/// Has the kernel deliver the events of performed image iocbs: each iocb is
/// resubmitted, for the length of the call, as a write of `res` bytes to
/// /dev/null, which completes at once with `res`, the iocb's own `obj` and
/// `data` (and signals its eventfd). So the events sit in the kernel's ring
/// like any other (fio's `userspace_reap` reads them there) and wake its
/// waiters. What the kernel cannot say that way (an error, a full ring) is
/// returned, for the library's queue.
fn deliver(ctx: Ctx, events: &[IoEvent], kernel: SubmitFn) -> Vec<IoEvent> {
    let Some(null) = null_fd() else {
        return events.to_vec();
    };
    let (proxied, mut rest): (Vec<IoEvent>, Vec<IoEvent>) =
        events.iter().partition(|ev| ev.res >= 0);
    if proxied.is_empty() {
        return rest;
    }
    // (iocb, fd, opcode, nbytes, offset, rw_flags) as the caller left them.
    let mut saved = Vec::with_capacity(proxied.len());
    let mut ptrs = Vec::with_capacity(proxied.len());
    for ev in &proxied {
        let p = ev.obj as *mut Iocb;
        // SAFETY: the caller's iocb, which it may not touch while io_submit
        // runs; restored below before returning.
        let iocb = unsafe { &mut *p };
        saved.push((
            iocb.aio_fildes,
            iocb.aio_lio_opcode,
            iocb.aio_nbytes,
            iocb.aio_offset,
            iocb.aio_rw_flags,
        ));
        iocb.aio_fildes = null as u32;
        iocb.aio_lio_opcode = CMD_PWRITE;
        iocb.aio_nbytes = ev.res as u64;
        iocb.aio_offset = 0;
        iocb.aio_rw_flags = 0;
        ptrs.push(p);
    }
    // SAFETY: valid iocbs; the kernel copies them at submit.
    let r = unsafe { kernel(ctx, ptrs.len() as c_long, ptrs.as_mut_ptr()) };
    for (&p, &(fd, op, n, off, flags)) in ptrs.iter().zip(&saved) {
        // SAFETY: as above.
        let iocb = unsafe { &mut *p };
        iocb.aio_fildes = fd;
        iocb.aio_lio_opcode = op;
        iocb.aio_nbytes = n;
        iocb.aio_offset = off;
        iocb.aio_rw_flags = flags;
    }
    let accepted = r.max(0) as usize;
    rest.extend_from_slice(&proxied[accepted..]);
    rest
}

/// /dev/null for writing, the library's own (opened once).
fn null_fd() -> Option<c_int> {
    static NULL: OnceLock<Option<InternalFd>> = OnceLock::new();
    let _g = guard::Guard::enter();
    let fd = NULL.get_or_init(|| {
        sys::openat(
            libc::AT_FDCWD,
            c"/dev/null",
            libc::O_WRONLY | libc::O_CLOEXEC,
            0,
        )
        .ok()
        .map(InternalFd::new)
    });
    fd.as_ref().map(InternalFd::get)
}

/// The queue of `ctx`, created if `create`.
fn queue_of(qs: &mut Vec<Queue>, ctx: Ctx, create: bool) -> Option<&mut Queue> {
    match qs.iter().position(|q| q.ctx == ctx) {
        Some(i) => Some(&mut qs[i]),
        None if create => {
            qs.push(Queue {
                ctx,
                events: VecDeque::new(),
                waiters: 0,
            });
            QUEUED.fetch_add(1, Ordering::Relaxed);
            qs.last_mut()
        }
        None => None,
    }
}

fn queue(ctx: Ctx, events: &[IoEvent]) {
    let waiters = {
        let mut qs = lock();
        let Some(q) = queue_of(&mut qs, ctx, true) else {
            return;
        };
        q.events.extend(events.iter().copied());
        q.waiters
    };
    if waiters > 0 {
        wake(ctx);
    }
}

/// Submits a request that completes at once (a 0-byte write to /dev/null),
/// so a thread blocked in the kernel on `ctx` returns and finds the queue.
fn wake(ctx: Ctx) {
    let Some(fd) = null_fd() else {
        return;
    };
    let kernel = real::IO_SUBMIT.get().unwrap_or(direct::io_submit);
    let byte = 0u8;
    let mut iocb = Iocb {
        aio_data: WAKE_DATA,
        aio_key: 0,
        aio_rw_flags: 0,
        aio_lio_opcode: CMD_PWRITE,
        aio_reqprio: 0,
        aio_fildes: fd as u32,
        aio_buf: &byte as *const u8 as u64,
        aio_nbytes: 0,
        aio_offset: 0,
        aio_reserved2: 0,
        aio_flags: 0,
        aio_resfd: 0,
    };
    let mut p: *mut Iocb = &mut iocb;
    // SAFETY: one valid iocb; the kernel copies it at submit.
    let _ = unsafe { kernel(ctx, 1, &mut p) };
}

/// Moves up to `room` queued events of `q` to `out`.
fn take(q: &mut Queue, out: *mut IoEvent, room: usize) -> usize {
    let n = room.min(q.events.len());
    for (k, ev) in q.events.drain(..n).enumerate() {
        // SAFETY: out has room for `room` events (io_getevents' contract).
        unsafe { out.add(k).write(ev) };
    }
    n
}

fn set_waiting(ctx: Ctx, delta: isize) {
    if let Some(q) = lock().iter_mut().find(|q| q.ctx == ctx) {
        q.waiters = q.waiters.saturating_add_signed(delta);
    }
}

/// Drops the wake-up events among `n` at `evs`; how many remain.
fn drop_wakes(evs: *mut IoEvent, n: usize) -> usize {
    // SAFETY: the kernel wrote n events there.
    let evs = unsafe { std::slice::from_raw_parts_mut(evs, n) };
    let mut kept = 0;
    for k in 0..n {
        if evs[k].data != WAKE_DATA {
            evs[kept] = evs[k];
            kept += 1;
        }
    }
    kept
}

fn now() -> timespec {
    let mut t = timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer (vDSO clock, no hook).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t
}

fn nanos(t: &timespec) -> i128 {
    t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128
}

fn from_nanos(n: i128) -> timespec {
    let n = n.max(0);
    timespec {
        tv_sec: (n / 1_000_000_000) as libc::time_t,
        tv_nsec: (n % 1_000_000_000) as libc::c_long,
    }
}

/// io_getevents/io_pgetevents on a context with queued image events.
/// `kernel(min, nr, events, timeout)` is the real call.
fn getevents(
    ctx: Ctx,
    min_nr: c_long,
    nr: c_long,
    events: *mut IoEvent,
    timeout: *mut timespec,
    kernel: impl Fn(c_long, c_long, *mut IoEvent, *mut timespec) -> c_int,
) -> c_int {
    // SAFETY: a non-NULL timeout is the caller's timespec.
    let limit = (!timeout.is_null()).then(|| unsafe { *timeout });
    if nr <= 0
        || min_nr > nr
        || events.is_null()
        || limit.is_some_and(|t| t.tv_sec < 0 || !(0..1_000_000_000).contains(&t.tv_nsec))
    {
        return kernel(min_nr, nr, events, timeout);
    }
    let deadline = limit.map(|t| nanos(&now()) + nanos(&t));
    let nr = nr as usize;
    let min = min_nr.max(0) as usize;
    let mut got = 0usize;
    loop {
        let want = {
            let mut qs = lock();
            // While an image is open, a context without a queue gets one: a
            // thread blocked on it must be woken by image iocbs to come.
            let create = got == 0 && fdtable::any_mapped();
            let Some(q) = queue_of(&mut qs, ctx, create) else {
                drop(qs);
                if got > 0 {
                    return got as c_int;
                }
                return kernel(min_nr, nr as c_long, events, timeout);
            };
            // SAFETY: within the caller's array of nr events.
            got += take(q, unsafe { events.add(got) }, nr - got);
            if got == nr {
                return got as c_int;
            }
            let want = min.saturating_sub(got);
            if want > 0 {
                q.waiters += 1;
            }
            want
        };
        // Not enough queued: wait in the kernel for the rest (or only collect
        // what it has ready, without blocking, when the queue sufficed).
        let mut left = match (want, deadline) {
            (0, _) => Some(from_nanos(0)),
            (_, Some(d)) => Some(from_nanos(d - nanos(&now()))),
            (_, None) => None,
        };
        let ts = left
            .as_mut()
            .map_or(std::ptr::null_mut(), |t| t as *mut timespec);
        // SAFETY: within the caller's array.
        let r = kernel(
            want as c_long,
            (nr - got) as c_long,
            unsafe { events.add(got) },
            ts,
        );
        if want > 0 {
            set_waiting(ctx, -1);
        }
        if r < 0 {
            return if got > 0 { got as c_int } else { r };
        }
        // SAFETY: the kernel wrote r events there.
        let kept = drop_wakes(unsafe { events.add(got) }, r as usize);
        got += kept;
        let woken = kept < r as usize;
        let expired = deadline.is_some_and(|d| nanos(&now()) >= d);
        if got >= min || !woken || expired {
            // Whatever was queued meanwhile, then done.
            if let Some(q) = queue_of(&mut lock(), ctx, false) {
                // SAFETY: within the caller's array.
                got += take(q, unsafe { events.add(got) }, nr - got);
            }
            return got as c_int;
        }
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_getevents(
    ctx: Ctx,
    min_nr: c_long,
    nr: c_long,
    events: *mut IoEvent,
    timeout: *mut timespec,
) -> c_int {
    let kernel = real::IO_GETEVENTS.get().unwrap_or(direct::io_getevents);
    let call = |min, nr, evs, ts| {
        // SAFETY: the caller's context and buffers, or parts of them.
        unsafe { kernel(ctx, min, nr, evs, ts) }
    };
    if (QUEUED.load(Ordering::Relaxed) == 0 && !fdtable::any_mapped()) || guard::inside() {
        return call(min_nr, nr, events, timeout);
    }
    getevents(ctx, min_nr, nr, events, timeout, call)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_pgetevents(
    ctx: Ctx,
    min_nr: c_long,
    nr: c_long,
    events: *mut IoEvent,
    timeout: *mut timespec,
    sigmask: *mut libc::sigset_t,
) -> c_int {
    let kernel = real::IO_PGETEVENTS.get().unwrap_or(direct::io_pgetevents);
    let call = |min, nr, evs, ts| {
        // SAFETY: the caller's context, buffers and signal mask.
        unsafe { kernel(ctx, min, nr, evs, ts, sigmask) }
    };
    if (QUEUED.load(Ordering::Relaxed) == 0 && !fdtable::any_mapped()) || guard::inside() {
        return call(min_nr, nr, events, timeout);
    }
    getevents(ctx, min_nr, nr, events, timeout, call)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_setup(maxevents: c_int, ctxp: *mut Ctx) -> c_int {
    let kernel = real::IO_SETUP.get().unwrap_or(direct::io_setup);
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { kernel(maxevents, ctxp) };
    if r == 0 && QUEUED.load(Ordering::Relaxed) != 0 {
        // A new context at the address of a destroyed one starts empty.
        // SAFETY: the kernel filled *ctxp.
        forget(unsafe { *ctxp });
    }
    r
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_destroy(ctx: Ctx) -> c_int {
    let kernel = real::IO_DESTROY.get().unwrap_or(direct::io_destroy);
    if QUEUED.load(Ordering::Relaxed) != 0 {
        forget(ctx);
    }
    // SAFETY: forwarding the caller's argument.
    unsafe { kernel(ctx) }
}

/// An image iocb completed at submit: nothing is left to cancel (EINVAL, as
/// the kernel says of a request that completed); its event stays queued.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn io_cancel(ctx: Ctx, iocb: *mut Iocb, result: *mut IoEvent) -> c_int {
    let kernel = real::IO_CANCEL.get().unwrap_or(direct::io_cancel);
    if maybe_image(iocb) && image_of(iocb).is_some() {
        return -libc::EINVAL;
    }
    // SAFETY: forwarding the caller's arguments.
    unsafe { kernel(ctx, iocb, result) }
}
