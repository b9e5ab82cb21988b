//! The exec family. The fd table itself needs nothing here: an exec'ed
//! program rebuilds it from the inherited memfds (see init.rs). What exec
//! needs is the library in the new program: a program that scrubs the
//! environment (`env -i`, sudo-like tools) while handing it an image dummy
//! gets LD_PRELOAD back, and a setuid/setgid program, which ignores
//! LD_PRELOAD and would read the empty dummy, is refused.
//!
//! execl, execlp and execle are variadic and call glibc's internal execve,
//! out of reach of a Rust preload (Rust 1.95 cannot define C-variadic
//! functions): they exec without these checks.

use std::ffi::{CStr, CString, c_void};
use std::ptr::null;

use libc::{c_char, c_int, pid_t};

use super::open::call;
use crate::{fdtable, guard, real, sys};

unsafe extern "C" {
    static environ: *const *const c_char;
}

/// The path of this library, for LD_PRELOAD.
fn our_path() -> Option<CString> {
    // SAFETY: dladdr on one of our own functions; dli_fname is a C string
    // owned by the loader.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(our_path as *const c_void, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        Some(CStr::from_ptr(info.dli_fname).to_owned())
    }
}

/// The environment to exec with: `envp` plus LD_PRELOAD naming this library,
/// if dummies would be inherited and `envp` lost it. `None`: use `envp` as is.
struct Env {
    _strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

fn environment(envp: *const *const c_char) -> Option<Env> {
    if envp.is_null() || fdtable::inheritable_dummies() == 0 {
        return None;
    }
    let ours = our_path()?;
    let mut entries = Vec::new();
    let mut preload: Option<usize> = None;
    // SAFETY: envp is a NULL-terminated array of C strings (exec contract).
    unsafe {
        let mut p = envp;
        while !(*p).is_null() {
            let e = CStr::from_ptr(*p);
            if e.to_bytes().starts_with(b"LD_PRELOAD=") {
                preload = Some(entries.len());
            }
            entries.push(e.to_owned());
            p = p.add(1);
        }
    }
    let name = ours.to_bytes();
    match preload {
        Some(i)
            if entries[i].to_bytes()[11..]
                .split(|&b| b == b':' || b == b' ')
                .any(|x| x == name) =>
        {
            return None;
        }
        Some(i) => {
            let mut v = entries[i].to_bytes().to_vec();
            v.push(b':');
            v.extend_from_slice(name);
            entries[i] = CString::new(v).ok()?;
        }
        None => {
            let mut v = b"LD_PRELOAD=".to_vec();
            v.extend_from_slice(name);
            entries.push(CString::new(v).ok()?);
        }
    }
    log::debug!("exec: LD_PRELOAD restored for inherited image fds");
    let mut ptrs: Vec<*const c_char> = entries.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(null());
    Some(Env {
        _strings: entries,
        ptrs,
    })
}

/// A setuid or setgid target would ignore LD_PRELOAD and read the empty
/// dummies it inherits.
fn refuse_setid(path: *const c_char) -> bool {
    if path.is_null() || fdtable::inheritable_dummies() == 0 {
        return false;
    }
    // SAFETY: non-NULL path from the caller.
    let p = unsafe { CStr::from_ptr(path) };
    match sys::fstatat(libc::AT_FDCWD, p, 0) {
        Ok(st) if st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 => {
            log::warn!(
                "refusing to exec set-id program {} with image fds: it would not see the images",
                p.to_string_lossy()
            );
            true
        }
        _ => false,
    }
}

/// Runs `f` with the environment to use, under the guard. Before an exec
/// (`replacing`), the images this process owns are closed: the program that
/// follows reopens them from the file, so nothing may stay only in this
/// process's memory. (posix_spawn's parent goes on: its images stay open.)
fn with_env<T>(
    envp: *const *const c_char,
    replacing: bool,
    f: impl FnOnce(*const *const c_char) -> T,
) -> T {
    if guard::inside() {
        return f(envp);
    }
    let env = {
        let _g = guard::Guard::enter();
        if replacing {
            let _ = std::panic::catch_unwind(|| crate::images::close_all("exec"));
        }
        environment(envp)
    };
    f(env.as_ref().map_or(envp, |e| e.ptrs.as_ptr()))
}

fn setid_check(path: *const c_char) -> bool {
    if guard::inside() {
        return false;
    }
    let _g = guard::Guard::enter();
    refuse_setid(path)
}

fn eperm() -> c_int {
    crate::logger::set_errno(libc::EPERM);
    -1
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    if setid_check(path) {
        return eperm();
    }
    with_env(envp, true, |envp| call!(real::EXECVE, path, argv, envp))
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    if setid_check(path) {
        return eperm();
    }
    // SAFETY: reading the process environment pointer.
    let env = unsafe { environ };
    with_env(env, true, |envp| call!(real::EXECVE, path, argv, envp))
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    with_env(envp, true, |envp| call!(real::EXECVPE, file, argv, envp))
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: reading the process environment pointer.
    let env = unsafe { environ };
    with_env(env, true, |envp| call!(real::EXECVPE, file, argv, envp))
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fexecve(
    fd: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    with_env(envp, true, |envp| call!(real::FEXECVE, fd, argv, envp))
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut pid_t,
    path: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    if setid_check(path) {
        return libc::EPERM;
    }
    with_env(envp.cast(), false, |envp| match real::POSIX_SPAWN.get() {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(pid, path, actions, attr, argv, envp.cast()) },
        None => libc::ENOSYS,
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut pid_t,
    file: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    with_env(envp.cast(), false, |envp| match real::POSIX_SPAWNP.get() {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(pid, file, actions, attr, argv, envp.cast()) },
        None => libc::ENOSYS,
    })
}
