//! realpath, __realpath_chk and canonicalize_file_name: a partition link
//! (`disk.vhdx2 -> disk.vhdx`) keeps its own name, in its canonical folder.
//! glibc follows the link (with raw syscalls we never see) to the image, so a
//! program that canonicalises its device name before opening it (ntfs-3g)
//! would open the whole disk instead of the partition.

use std::ffi::{CStr, CString};

use libc::{c_char, size_t};

use super::emulate;
use super::open::{absolute, is_candidate, partition_number};
use crate::{guard, images, real, sys};

/// The canonical name of `path` if it is a partition link of an image:
/// the real realpath of its folder plus the link's own name.
fn partition_link(path: &CStr) -> Option<Vec<u8>> {
    let abs = absolute(libc::AT_FDCWD, path).ok()?;
    partition_number(&abs)?;
    let st = sys::fstatat(libc::AT_FDCWD, &abs, 0).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || !images::is_image(&abs, st.st_dev, st.st_ino) {
        return None;
    }
    let bytes = abs.to_bytes();
    let slash = bytes.iter().rposition(|&b| b == b'/')?;
    let (dir, name) = (&bytes[..slash.max(1)], &bytes[slash + 1..]);
    let dir = CString::new(dir).ok()?;
    let f = real::REALPATH.get()?;
    // SAFETY: a NUL-terminated path; NULL asks glibc to allocate the result.
    let canon = unsafe { f(dir.as_ptr(), std::ptr::null_mut()) };
    if canon.is_null() {
        return None;
    }
    // SAFETY: glibc returned a NUL-terminated string allocated with malloc.
    let mut out = unsafe { CStr::from_ptr(canon) }.to_bytes().to_vec();
    // SAFETY: allocated by glibc's realpath, freed once.
    unsafe { libc::free(canon.cast()) };
    if out.last() != Some(&b'/') {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    Some(out)
}

/// Our answer for `path`, or `None` to let glibc answer. `resolved` is the
/// caller's PATH_MAX buffer, or NULL for a malloc'ed result (as glibc does).
fn resolve(path: *const c_char, resolved: *mut c_char) -> Option<*mut c_char> {
    if path.is_null() || guard::inside() {
        return None;
    }
    // SAFETY: non-NULL, NUL-terminated per the API.
    let p = unsafe { CStr::from_ptr(path) };
    crate::config::load();
    if !is_candidate(p) {
        return None;
    }
    let name = emulate(None, || Ok(partition_link(p)))?;
    if name.len() >= libc::PATH_MAX as usize {
        return None;
    }
    let out = if resolved.is_null() {
        // SAFETY: plain allocation for the caller to free.
        let m = unsafe { libc::malloc(name.len() + 1) }.cast::<c_char>();
        if m.is_null() {
            crate::logger::set_errno(libc::ENOMEM);
            return Some(m);
        }
        m
    } else {
        resolved
    };
    // SAFETY: `out` holds at least name.len() + 1 bytes (PATH_MAX or malloc'ed).
    unsafe {
        std::ptr::copy_nonoverlapping(name.as_ptr().cast::<c_char>(), out, name.len());
        out.add(name.len()).write(0);
    }
    log::debug!(
        "realpath {} -> {} (a partition link keeps its name)",
        p.to_string_lossy(),
        String::from_utf8_lossy(&name)
    );
    Some(out)
}

fn enosys() -> *mut c_char {
    crate::logger::set_errno(libc::ENOSYS);
    std::ptr::null_mut()
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn realpath(path: *const c_char, resolved: *mut c_char) -> *mut c_char {
    if let Some(r) = resolve(path, resolved) {
        return r;
    }
    match real::REALPATH.get() {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(path, resolved) },
        None => enosys(),
    }
}

/// The _FORTIFY form: a buffer smaller than PATH_MAX goes to glibc, which
/// aborts as it must.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn __realpath_chk(
    path: *const c_char,
    resolved: *mut c_char,
    resolved_len: size_t,
) -> *mut c_char {
    if (resolved.is_null() || resolved_len >= libc::PATH_MAX as size_t)
        && let Some(r) = resolve(path, resolved)
    {
        return r;
    }
    match real::REALPATH_CHK.get() {
        // SAFETY: forwarding the caller's arguments.
        Some(f) => unsafe { f(path, resolved, resolved_len) },
        None => enosys(),
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn canonicalize_file_name(path: *const c_char) -> *mut c_char {
    if let Some(r) = resolve(path, std::ptr::null_mut()) {
        return r;
    }
    match real::CANONICALIZE_FILE_NAME.get() {
        // SAFETY: forwarding the caller's argument.
        Some(f) => unsafe { f(path) },
        None => enosys(),
    }
}
