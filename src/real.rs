//! The real libc functions, found with `dlsym(RTLD_NEXT)` and cached in atomics.
//!
//! Not `OnceLock`: a hook can run before our constructor and re-enter while a
//! lazy initialiser runs, and a blocking `get_or_init` then deadlocks. Two
//! threads racing to resolve the same symbol store the same pointer.

use std::ffi::{CStr, c_void};
use std::marker::PhantomData;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicPtr, Ordering};

use libc::{FILE, c_char, c_int, c_long, c_uint, c_ulong, mode_t, off_t, off64_t, size_t, ssize_t};

pub struct Real<F> {
    ptr: AtomicPtr<c_void>,
    name: &'static CStr,
    _f: PhantomData<F>,
}

// SAFETY: the only state is an atomic pointer; F is a function pointer type.
unsafe impl<F> Sync for Real<F> {}

impl<F: Copy> Real<F> {
    pub const fn new(name: &'static CStr) -> Real<F> {
        Real {
            ptr: AtomicPtr::new(null_mut()),
            name,
            _f: PhantomData,
        }
    }

    /// The next definition of the symbol after ours, or `None` if libc lacks it.
    #[inline]
    pub fn get(&self) -> Option<F> {
        const { assert!(size_of::<F>() == size_of::<*mut c_void>()) };
        let mut p = self.ptr.load(Ordering::Acquire);
        if p.is_null() {
            p = self.resolve();
            if p.is_null() {
                return None;
            }
        }
        // SAFETY: F is the C signature of the symbol `name`, pointer-sized.
        Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }

    /// The function if already resolved (the hooks' fast path: one load).
    #[inline]
    pub fn resolved(&self) -> Option<F> {
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: as in `get`.
        (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }

    /// The first lookup (normally at init, by `resolve_all`).
    #[cold]
    #[inline(never)]
    fn resolve(&self) -> *mut c_void {
        // SAFETY: dlsym with a valid NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) };
        if !p.is_null() {
            self.ptr.store(p, Ordering::Release);
        }
        p
    }
}

macro_rules! reals {
    ($($id:ident = $name:literal : $ty:ty;)*) => {
        $(pub static $id: Real<$ty> = Real::new($name);)*
        /// Resolves every symbol now (at init), so hooks never call dlsym later,
        /// where it could take the loader lock at a bad moment.
        pub fn resolve_all() {
            $(let _ = $id.get();)*
        }
    };
}

type Stat = libc::stat64;
use crate::hooks::libaio::{Ctx, IoEvent, Iocb};
use crate::hooks::posix_aio::{Aiocb, Sigevent};

reals! {
    OPEN = c"open": unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
    OPEN64 = c"open64": unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
    OPENAT = c"openat": unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
    OPENAT64 = c"openat64": unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
    OPEN_2 = c"__open_2": unsafe extern "C" fn(*const c_char, c_int) -> c_int;
    OPEN64_2 = c"__open64_2": unsafe extern "C" fn(*const c_char, c_int) -> c_int;
    OPENAT_2 = c"__openat_2": unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
    OPENAT64_2 = c"__openat64_2": unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
    CREAT = c"creat": unsafe extern "C" fn(*const c_char, mode_t) -> c_int;
    CREAT64 = c"creat64": unsafe extern "C" fn(*const c_char, mode_t) -> c_int;
    READ = c"read": unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t;
    READ_CHK = c"__read_chk": unsafe extern "C" fn(c_int, *mut c_void, size_t, size_t) -> ssize_t;
    WRITE = c"write": unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t;
    PREAD = c"pread": unsafe extern "C" fn(c_int, *mut c_void, size_t, off_t) -> ssize_t;
    PREAD64 = c"pread64": unsafe extern "C" fn(c_int, *mut c_void, size_t, off64_t) -> ssize_t;
    PREAD_CHK = c"__pread_chk": unsafe extern "C" fn(c_int, *mut c_void, size_t, off_t, size_t) -> ssize_t;
    PREAD64_CHK = c"__pread64_chk": unsafe extern "C" fn(c_int, *mut c_void, size_t, off64_t, size_t) -> ssize_t;
    PWRITE = c"pwrite": unsafe extern "C" fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
    PWRITE64 = c"pwrite64": unsafe extern "C" fn(c_int, *const c_void, size_t, off64_t) -> ssize_t;
    READV = c"readv": unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> ssize_t;
    WRITEV = c"writev": unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> ssize_t;
    PREADV = c"preadv": unsafe extern "C" fn(c_int, *const libc::iovec, c_int, off_t) -> ssize_t;
    PREADV64 = c"preadv64": unsafe extern "C" fn(c_int, *const libc::iovec, c_int, off64_t) -> ssize_t;
    PWRITEV = c"pwritev": unsafe extern "C" fn(c_int, *const libc::iovec, c_int, off_t) -> ssize_t;
    PWRITEV64 = c"pwritev64": unsafe extern "C" fn(c_int, *const libc::iovec, c_int, off64_t) -> ssize_t;
    PREADV2 = c"preadv2": unsafe extern "C" fn(c_int, *const libc::iovec, c_int, off_t, c_int) -> ssize_t;
    PREADV64V2 = c"preadv64v2": unsafe extern "C" fn(c_int, *const libc::iovec, c_int, off64_t, c_int) -> ssize_t;
    PWRITEV2 = c"pwritev2": unsafe extern "C" fn(c_int, *const libc::iovec, c_int, off_t, c_int) -> ssize_t;
    PWRITEV64V2 = c"pwritev64v2": unsafe extern "C" fn(c_int, *const libc::iovec, c_int, off64_t, c_int) -> ssize_t;
    LSEEK = c"lseek": unsafe extern "C" fn(c_int, off_t, c_int) -> off_t;
    LSEEK64 = c"lseek64": unsafe extern "C" fn(c_int, off64_t, c_int) -> off64_t;
    CLOSE = c"close": unsafe extern "C" fn(c_int) -> c_int;
    CLOSE_RANGE = c"close_range": unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int;
    CLOSEFROM = c"closefrom": unsafe extern "C" fn(c_int);
    DUP = c"dup": unsafe extern "C" fn(c_int) -> c_int;
    DUP2 = c"dup2": unsafe extern "C" fn(c_int, c_int) -> c_int;
    DUP3 = c"dup3": unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
    FCNTL = c"fcntl": unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    FCNTL64 = c"fcntl64": unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    IOCTL = c"ioctl": unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
    FSYNC = c"fsync": unsafe extern "C" fn(c_int) -> c_int;
    FDATASYNC = c"fdatasync": unsafe extern "C" fn(c_int) -> c_int;
    STAT = c"stat": unsafe extern "C" fn(*const c_char, *mut libc::stat) -> c_int;
    STAT64 = c"stat64": unsafe extern "C" fn(*const c_char, *mut Stat) -> c_int;
    LSTAT = c"lstat": unsafe extern "C" fn(*const c_char, *mut libc::stat) -> c_int;
    LSTAT64 = c"lstat64": unsafe extern "C" fn(*const c_char, *mut Stat) -> c_int;
    FSTAT = c"fstat": unsafe extern "C" fn(c_int, *mut libc::stat) -> c_int;
    FSTAT64 = c"fstat64": unsafe extern "C" fn(c_int, *mut Stat) -> c_int;
    FSTATAT = c"fstatat": unsafe extern "C" fn(c_int, *const c_char, *mut libc::stat, c_int) -> c_int;
    FSTATAT64 = c"fstatat64": unsafe extern "C" fn(c_int, *const c_char, *mut Stat, c_int) -> c_int;
    STATX = c"statx": unsafe extern "C" fn(c_int, *const c_char, c_int, c_uint, *mut libc::statx) -> c_int;
    XSTAT = c"__xstat": unsafe extern "C" fn(c_int, *const c_char, *mut libc::stat) -> c_int;
    XSTAT64 = c"__xstat64": unsafe extern "C" fn(c_int, *const c_char, *mut Stat) -> c_int;
    LXSTAT = c"__lxstat": unsafe extern "C" fn(c_int, *const c_char, *mut libc::stat) -> c_int;
    LXSTAT64 = c"__lxstat64": unsafe extern "C" fn(c_int, *const c_char, *mut Stat) -> c_int;
    FXSTAT = c"__fxstat": unsafe extern "C" fn(c_int, c_int, *mut libc::stat) -> c_int;
    FXSTAT64 = c"__fxstat64": unsafe extern "C" fn(c_int, c_int, *mut Stat) -> c_int;
    FXSTATAT = c"__fxstatat": unsafe extern "C" fn(c_int, c_int, *const c_char, *mut libc::stat, c_int) -> c_int;
    FXSTATAT64 = c"__fxstatat64": unsafe extern "C" fn(c_int, c_int, *const c_char, *mut Stat, c_int) -> c_int;
    FTRUNCATE = c"ftruncate": unsafe extern "C" fn(c_int, off_t) -> c_int;
    FTRUNCATE64 = c"ftruncate64": unsafe extern "C" fn(c_int, off64_t) -> c_int;
    MMAP = c"mmap": unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
    MMAP64 = c"mmap64": unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off64_t) -> *mut c_void;
    COPY_FILE_RANGE = c"copy_file_range": unsafe extern "C" fn(c_int, *mut libc::loff_t, c_int, *mut libc::loff_t, size_t, c_uint) -> ssize_t;
    SENDFILE = c"sendfile": unsafe extern "C" fn(c_int, c_int, *mut off_t, size_t) -> ssize_t;
    SENDFILE64 = c"sendfile64": unsafe extern "C" fn(c_int, c_int, *mut off64_t, size_t) -> ssize_t;
    SPLICE = c"splice": unsafe extern "C" fn(c_int, *mut libc::loff_t, c_int, *mut libc::loff_t, size_t, c_uint) -> ssize_t;
    FALLOCATE = c"fallocate": unsafe extern "C" fn(c_int, c_int, off_t, off_t) -> c_int;
    FALLOCATE64 = c"fallocate64": unsafe extern "C" fn(c_int, c_int, off64_t, off64_t) -> c_int;
    POSIX_FALLOCATE = c"posix_fallocate": unsafe extern "C" fn(c_int, off_t, off_t) -> c_int;
    POSIX_FALLOCATE64 = c"posix_fallocate64": unsafe extern "C" fn(c_int, off64_t, off64_t) -> c_int;
    POSIX_FADVISE = c"posix_fadvise": unsafe extern "C" fn(c_int, off_t, off_t, c_int) -> c_int;
    POSIX_FADVISE64 = c"posix_fadvise64": unsafe extern "C" fn(c_int, off64_t, off64_t, c_int) -> c_int;
    READAHEAD = c"readahead": unsafe extern "C" fn(c_int, off64_t, size_t) -> ssize_t;
    SYNC = c"sync": unsafe extern "C" fn();
    SYNCFS = c"syncfs": unsafe extern "C" fn(c_int) -> c_int;
    SYNC_FILE_RANGE = c"sync_file_range": unsafe extern "C" fn(c_int, off64_t, off64_t, c_uint) -> c_int;
    TRUNCATE = c"truncate": unsafe extern "C" fn(*const c_char, off_t) -> c_int;
    TRUNCATE64 = c"truncate64": unsafe extern "C" fn(*const c_char, off64_t) -> c_int;
    FSTATFS = c"fstatfs": unsafe extern "C" fn(c_int, *mut libc::statfs) -> c_int;
    FSTATFS64 = c"fstatfs64": unsafe extern "C" fn(c_int, *mut libc::statfs64) -> c_int;
    EXECVE = c"execve": unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
    EXECVPE = c"execvpe": unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
    FEXECVE = c"fexecve": unsafe extern "C" fn(c_int, *const *const c_char, *const *const c_char) -> c_int;
    POSIX_SPAWN = c"posix_spawn": unsafe extern "C" fn(*mut libc::pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, *const *mut c_char, *const *mut c_char) -> c_int;
    POSIX_SPAWNP = c"posix_spawnp": unsafe extern "C" fn(*mut libc::pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, *const *mut c_char, *const *mut c_char) -> c_int;
    SIGACTION = c"sigaction": unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
    SIGNAL = c"signal": unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;
    REALPATH = c"realpath": unsafe extern "C" fn(*const c_char, *mut c_char) -> *mut c_char;
    REALPATH_CHK = c"__realpath_chk": unsafe extern "C" fn(*const c_char, *mut c_char, size_t) -> *mut c_char;
    CANONICALIZE_FILE_NAME = c"canonicalize_file_name": unsafe extern "C" fn(*const c_char) -> *mut c_char;
    FOPEN = c"fopen": unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE;
    FOPEN64 = c"fopen64": unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE;
    FDOPEN = c"fdopen": unsafe extern "C" fn(c_int, *const c_char) -> *mut FILE;
    FREOPEN = c"freopen": unsafe extern "C" fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE;
    FREOPEN64 = c"freopen64": unsafe extern "C" fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE;
    // glibc's `syscall` takes the number and up to six arguments (see
    // hooks/uring.rs); sys.rs makes the library's own system calls with it.
    SYSCALL = c"syscall": unsafe extern "C" fn(c_long, ...) -> c_long;
    // liburing.so.2 (absent unless the program links it: then never called).
    IO_URING_SETUP = c"io_uring_setup": unsafe extern "C" fn(c_uint, *mut c_void) -> c_int;
    IO_URING_QUEUE_INIT = c"io_uring_queue_init": unsafe extern "C" fn(c_uint, *mut c_void, c_uint) -> c_int;
    IO_URING_QUEUE_INIT_PARAMS = c"io_uring_queue_init_params": unsafe extern "C" fn(c_uint, *mut c_void, *mut c_void) -> c_int;
    IO_URING_QUEUE_INIT_MEM = c"io_uring_queue_init_mem": unsafe extern "C" fn(c_uint, *mut c_void, *mut c_void, *mut c_void, size_t) -> c_int;
    // libaio.so.1 (absent unless the program links it: then never called).
    IO_SETUP = c"io_setup": unsafe extern "C" fn(c_int, *mut Ctx) -> c_int;
    IO_DESTROY = c"io_destroy": unsafe extern "C" fn(Ctx) -> c_int;
    IO_SUBMIT = c"io_submit": unsafe extern "C" fn(Ctx, c_long, *mut *mut Iocb) -> c_int;
    IO_CANCEL = c"io_cancel": unsafe extern "C" fn(Ctx, *mut Iocb, *mut IoEvent) -> c_int;
    IO_GETEVENTS = c"io_getevents": unsafe extern "C" fn(Ctx, c_long, c_long, *mut IoEvent, *mut libc::timespec) -> c_int;
    IO_PGETEVENTS = c"io_pgetevents": unsafe extern "C" fn(Ctx, c_long, c_long, *mut IoEvent, *mut libc::timespec, *mut libc::sigset_t) -> c_int;
    // POSIX AIO (libc since glibc 2.34, librt before).
    AIO_READ = c"aio_read": unsafe extern "C" fn(*mut Aiocb) -> c_int;
    AIO_READ64 = c"aio_read64": unsafe extern "C" fn(*mut Aiocb) -> c_int;
    AIO_WRITE = c"aio_write": unsafe extern "C" fn(*mut Aiocb) -> c_int;
    AIO_WRITE64 = c"aio_write64": unsafe extern "C" fn(*mut Aiocb) -> c_int;
    AIO_FSYNC = c"aio_fsync": unsafe extern "C" fn(c_int, *mut Aiocb) -> c_int;
    AIO_FSYNC64 = c"aio_fsync64": unsafe extern "C" fn(c_int, *mut Aiocb) -> c_int;
    AIO_ERROR = c"aio_error": unsafe extern "C" fn(*const Aiocb) -> c_int;
    AIO_ERROR64 = c"aio_error64": unsafe extern "C" fn(*const Aiocb) -> c_int;
    AIO_RETURN = c"aio_return": unsafe extern "C" fn(*mut Aiocb) -> ssize_t;
    AIO_RETURN64 = c"aio_return64": unsafe extern "C" fn(*mut Aiocb) -> ssize_t;
    AIO_SUSPEND = c"aio_suspend": unsafe extern "C" fn(*const *const Aiocb, c_int, *const libc::timespec) -> c_int;
    AIO_SUSPEND64 = c"aio_suspend64": unsafe extern "C" fn(*const *const Aiocb, c_int, *const libc::timespec) -> c_int;
    AIO_CANCEL = c"aio_cancel": unsafe extern "C" fn(c_int, *mut Aiocb) -> c_int;
    AIO_CANCEL64 = c"aio_cancel64": unsafe extern "C" fn(c_int, *mut Aiocb) -> c_int;
    LIO_LISTIO = c"lio_listio": unsafe extern "C" fn(c_int, *const *mut Aiocb, c_int, *mut Sigevent) -> c_int;
    LIO_LISTIO64 = c"lio_listio64": unsafe extern "C" fn(c_int, *const *mut Aiocb, c_int, *mut Sigevent) -> c_int;
}
