//! The library's own I/O: raw system calls, which never reach our hooks (or
//! anyone else's) and report errors as `io::Error` instead of through errno.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;

use libc::{c_int, c_long};

/// A system call through glibc's `syscall`, found with dlsym like every real
/// function: never `libc::syscall`, which inside this cdylib binds to our own
/// exported `syscall` hook (hooks/uring.rs; the program's calls are meant for
/// it, the library's own are not). Every argument is widened to `c_long`, the
/// register width the kernel reads; unused ones are passed as 0.
macro_rules! syscall {
    ($n:expr $(, $arg:expr)* $(,)?) => {
        $crate::sys::syscall6($n, &[$($arg as libc::c_long),*])
    };
}
pub(crate) use syscall;

/// See [`syscall!`]: at most six arguments; -1 with errno ENOSYS if libc had
/// no `syscall` (it always has).
///
/// # Safety
/// As for the system call `n` with these arguments.
#[inline]
pub unsafe fn syscall6(n: c_long, args: &[c_long]) -> c_long {
    let mut a = [0; 6];
    a[..args.len()].copy_from_slice(args);
    match crate::real::SYSCALL.get() {
        // SAFETY: glibc's syscall reads six argument registers whatever the
        // number; the caller vouches for the system call itself.
        Some(f) => unsafe { f(n, a[0], a[1], a[2], a[3], a[4], a[5]) },
        None => {
            crate::logger::set_errno(libc::ENOSYS);
            -1
        }
    }
}

fn check(r: c_long) -> io::Result<c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Retries on EINTR.
fn retry(mut f: impl FnMut() -> c_long) -> io::Result<c_long> {
    loop {
        match check(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

pub fn pread(fd: c_int, buf: &mut [u8], off: u64) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    retry(|| unsafe {
        syscall!(
            libc::SYS_pread64,
            fd,
            buf.as_mut_ptr(),
            buf.len(),
            off as i64,
        )
    })
    .map(|n| n as usize)
}

pub fn pwrite(fd: c_int, buf: &[u8], off: u64) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of its length.
    retry(|| unsafe { syscall!(libc::SYS_pwrite64, fd, buf.as_ptr(), buf.len(), off as i64) })
        .map(|n| n as usize)
}

pub fn write(fd: c_int, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of its length.
    retry(|| unsafe { syscall!(libc::SYS_write, fd, buf.as_ptr(), buf.len()) }).map(|n| n as usize)
}

pub fn openat(dirfd: c_int, path: &CStr, flags: c_int, mode: libc::mode_t) -> io::Result<c_int> {
    // SAFETY: path is NUL-terminated.
    retry(|| unsafe { syscall!(libc::SYS_openat, dirfd, path.as_ptr(), flags, mode) })
        .map(|fd| fd as c_int)
}

pub fn close(fd: c_int) {
    // SAFETY: plain syscall; EINTR on close must not be retried on Linux.
    unsafe { syscall!(libc::SYS_close, fd) };
}

pub fn fstat(fd: c_int) -> io::Result<libc::stat64> {
    let mut st = MaybeUninit::<libc::stat64>::zeroed();
    // SAFETY: st is a valid out pointer of the kernel's struct stat size.
    check(unsafe { syscall!(libc::SYS_fstat, fd, st.as_mut_ptr()) })?;
    // SAFETY: initialised by the kernel (and zeroed before).
    Ok(unsafe { st.assume_init() })
}

pub fn fstatat(dirfd: c_int, path: &CStr, flags: c_int) -> io::Result<libc::stat64> {
    let mut st = MaybeUninit::<libc::stat64>::zeroed();
    // SAFETY: valid path and out pointer.
    check(unsafe {
        syscall!(
            libc::SYS_newfstatat,
            dirfd,
            path.as_ptr(),
            st.as_mut_ptr(),
            flags,
        )
    })?;
    // SAFETY: initialised by the kernel.
    Ok(unsafe { st.assume_init() })
}

pub fn lseek(fd: c_int, off: i64, whence: c_int) -> io::Result<i64> {
    // SAFETY: plain syscall.
    check(unsafe { syscall!(libc::SYS_lseek, fd, off, whence) })
}

pub fn fdatasync(fd: c_int) -> io::Result<()> {
    // SAFETY: plain syscall.
    retry(|| unsafe { syscall!(libc::SYS_fdatasync, fd) }).map(drop)
}

pub fn ftruncate(fd: c_int, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall.
    retry(|| unsafe { syscall!(libc::SYS_ftruncate, fd, len as i64) }).map(drop)
}

/// fallocate(PUNCH_HOLE|KEEP_SIZE). EOPNOTSUPP (a file system without
/// holes) is `ErrorKind::Unsupported`.
pub fn punch_hole(fd: c_int, off: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall.
    match retry(|| unsafe { libc::syscall(libc::SYS_fallocate, fd, mode, off as i64, len as i64) })
    {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the file system cannot punch holes",
        )),
        r => r.map(drop),
    }
}

pub fn fcntl(fd: c_int, cmd: c_int, arg: c_long) -> io::Result<c_long> {
    // SAFETY: integer-argument fcntl commands only.
    check(unsafe { syscall!(libc::SYS_fcntl, fd, cmd, arg) })
}

pub fn memfd_create(name: &CStr, flags: libc::c_uint) -> io::Result<c_int> {
    // SAFETY: name is NUL-terminated.
    check(unsafe { syscall!(libc::SYS_memfd_create, name.as_ptr(), flags) }).map(|fd| fd as c_int)
}

pub fn readlink(path: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: valid path and buffer.
    check(unsafe {
        syscall!(
            libc::SYS_readlinkat,
            libc::AT_FDCWD,
            path.as_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    })
    .map(|n| n as usize)
}

pub fn getcwd(buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: valid buffer; the syscall returns the length including the NUL.
    check(unsafe { syscall!(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) })
        .map(|n| (n as usize).saturating_sub(1))
}

/// Random bytes from the kernel (never blocks; zeros if the pool is not ready).
pub fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: valid buffer of 8 bytes.
    let _ = unsafe {
        syscall!(
            libc::SYS_getrandom,
            v.as_mut_ptr(),
            8usize,
            libc::GRND_NONBLOCK,
        )
    };
    u64::from_ne_bytes(v)
}

pub fn sched_yield() {
    // SAFETY: plain syscall.
    unsafe { syscall!(libc::SYS_sched_yield) };
}

pub fn getpid() -> c_int {
    // SAFETY: plain syscall.
    unsafe { syscall!(libc::SYS_getpid) as c_int }
}

/// The CPU this thread runs on (0 if unknown): glibc reads it from the
/// thread's rseq area, without a system call.
#[inline]
pub fn cpu() -> usize {
    // SAFETY: no arguments; not a function the library hooks.
    let c = unsafe { libc::sched_getcpu() };
    if c < 0 { 0 } else { c as usize }
}

/// CPUs this thread may run on (1 if unknown).
pub fn cpu_count() -> usize {
    // SAFETY: a zeroed cpu_set_t is valid, and the kernel writes at most
    // its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        syscall!(
            libc::SYS_sched_getaffinity,
            0,
            std::mem::size_of::<libc::cpu_set_t>(),
            &raw mut set,
        )
    };
    if r <= 0 {
        return 1;
    }
    // SAFETY: the set the kernel filled.
    (unsafe { libc::CPU_COUNT(&set) }).max(1) as usize
}

static PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// This process's pid without a syscall (glibc no longer caches it): set at
/// start-up and in the child of every fork (atfork), read on every write.
#[inline]
pub fn pid() -> c_int {
    match PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => refresh_pid(),
        p => p,
    }
}

pub fn refresh_pid() -> c_int {
    let p = getpid();
    PID.store(p, std::sync::atomic::Ordering::Relaxed);
    p
}

pub fn renameat(from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated paths.
    check(unsafe {
        syscall!(
            libc::SYS_renameat,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
        )
    })
    .map(drop)
}

pub fn unlinkat(path: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated path.
    check(unsafe { syscall!(libc::SYS_unlinkat, libc::AT_FDCWD, path.as_ptr(), 0) }).map(drop)
}
