//! mmap of a dummy: the kernel would map the empty memfd. Instead a mapping
//! that cannot write the disk (`PROT_READ`, or `MAP_PRIVATE` with any
//! protection) gets a copy of its range of the disk, made at mmap time:
//! a private memfd is filled from the disk (holes and zero pages are left
//! unallocated), sealed, mapped with the caller's flags and closed. So
//! munmap, mprotect, msync and madvise behave as on any file mapping
//! (`MADV_DONTNEED` brings the copy back, not zeros), and a later write to
//! the disk does not show in an existing mapping (a snapshot).
//!
//! Filling is eager: lazy filling needs a userfaultfd thread behind the
//! program's back. So a mapping is bounded by `LIBVHD_IO_MMAP_MAX` (bytes,
//! K/M/G/T suffixes; default 1 GiB): past it, ENOMEM and a log line.
//! `MAP_SHARED` with `PROT_WRITE` would need writes through memory to reach
//! the disk: ENODEV (the kernel's "this file cannot be mapped"), logged.

use std::ffi::c_void;

use libc::{c_int, off_t, off64_t, size_t};

use super::{Errno, emulate, image_fd};
use crate::fdtable::{OpenFile, is_mapped};
use crate::{logger, real, sys};

const DEFAULT_LIMIT: u64 = 1 << 30;
/// The mapping-type bits of mmap's flags (MAP_SHARED, MAP_PRIVATE,
/// MAP_SHARED_VALIDATE).
const MAP_TYPE: c_int = 0x0f;
/// MAP_HUGETLB and its page-size field: meaningless for the copy.
const HUGETLB_BITS: c_int = libc::MAP_HUGETLB | (0x3f << 26);
/// Filling goes through a buffer of this size.
const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

type MmapFn<O> = unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, O) -> *mut c_void;

/// LIBVHD_IO_MMAP_MAX, read at each mapping of an image (rare).
fn limit() -> u64 {
    // SAFETY: getenv with a NUL-terminated name.
    let v = unsafe { libc::getenv(c"LIBVHD_IO_MMAP_MAX".as_ptr()) };
    if v.is_null() {
        return DEFAULT_LIMIT;
    }
    // SAFETY: a non-null getenv result is a NUL-terminated string.
    let s = unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes();
    parse_size(s).unwrap_or_else(|| {
        log::warn!(
            "LIBVHD_IO_MMAP_MAX={}: not a size, using 1G",
            String::from_utf8_lossy(s)
        );
        DEFAULT_LIMIT
    })
}

fn parse_size(s: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(s).ok()?.trim();
    let (digits, shift) = match s.as_bytes().last()?.to_ascii_uppercase() {
        b'K' => (&s[..s.len() - 1], 10),
        b'M' => (&s[..s.len() - 1], 20),
        b'G' => (&s[..s.len() - 1], 30),
        b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// A mapping of `len` bytes at `off` of `of`'s window, with the caller's
/// flags; errors are errno values.
fn map_copy<O: From<i32>>(
    of: &OpenFile,
    real_mmap: MmapFn<O>,
    (addr, len, prot, flags): (*mut c_void, size_t, c_int, c_int),
    off: i64,
) -> Result<*mut c_void, Errno> {
    let kind = flags & MAP_TYPE;
    let shared = kind == libc::MAP_SHARED || kind == libc::MAP_SHARED_VALIDATE;
    if !of.readable() {
        return Err(libc::EACCES);
    }
    if shared && prot & libc::PROT_WRITE != 0 {
        log::warn!(
            "{}: a writable MAP_SHARED mapping of an image is not supported (stores would not \
             reach the disk): ENODEV; use pwrite, a MAP_PRIVATE or read-only mapping, or \
             `vhdio serve` + `nbd-client` for a kernel block device",
            of.image.path_str()
        );
        return Err(libc::ENODEV);
    }
    if kind == libc::MAP_SHARED_VALIDATE && flags & libc::MAP_SYNC != 0 {
        return Err(libc::EOPNOTSUPP);
    }
    if len == 0 || off < 0 || !(off as u64).is_multiple_of(PAGE as u64) {
        return Err(libc::EINVAL);
    }
    let max = limit();
    if len as u64 > max {
        log::warn!(
            "{}: mmap of {len} bytes refused (ENOMEM): an image mapping is a copy in memory, at \
             most LIBVHD_IO_MMAP_MAX={max} bytes; raise it, map less, or use pread",
            of.image.path_str()
        );
        return Err(libc::ENOMEM);
    }
    let memfd = sys::memfd_create(
        c"libvhdio-mmap",
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
    )
    .map_err(|e| crate::errno::from_io(&e))?;
    let r = fill(of, memfd, len, off as u64).and_then(|()| {
        let flags = (flags & !MAP_TYPE & !HUGETLB_BITS & !libc::MAP_SYNC)
            | if shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
        // SAFETY: mmap of our own memfd with the caller's address and protection.
        let p = unsafe { real_mmap(addr, len, prot, flags, memfd, O::from(0)) };
        if p == libc::MAP_FAILED {
            Err(logger::errno())
        } else {
            Ok(p)
        }
    });
    sys::close(memfd);
    log::debug!(
        "mmap {len} bytes at {off} of {} as a copy: {r:?}",
        of.image.path_str()
    );
    r
}

/// Fills `memfd` with `len` bytes of the window from `off` (zeros past its
/// end), writing only pages that are not zero, then seals it: nothing can
/// write the copy through a shared mapping, or resize it.
fn fill(of: &OpenFile, memfd: c_int, len: usize, off: u64) -> Result<(), Errno> {
    let io = |e: std::io::Error| crate::errno::from_io(&e);
    sys::ftruncate(memfd, len.div_ceil(PAGE) as u64 * PAGE as u64).map_err(io)?;
    let end = (off.saturating_add(len as u64)).min(of.len);
    let mut buf = vec![0u8; CHUNK];
    let mut pos = off;
    while pos < end {
        let n = ((end - pos) as usize).min(CHUNK);
        let got = of.read_at(&mut buf[..n], pos)?;
        let data = &buf[..got];
        let mut at = 0;
        while at < data.len() {
            let page = &data[at..(at + PAGE).min(data.len())];
            if page.iter().all(|&b| b == 0) {
                at += page.len();
                continue;
            }
            // A run of non-zero pages: one write.
            let mut run_end = at + page.len();
            while run_end < data.len() {
                let next = &data[run_end..(run_end + PAGE).min(data.len())];
                if next.iter().all(|&b| b == 0) {
                    break;
                }
                run_end += next.len();
            }
            let mut done = at;
            while done < run_end {
                let w = sys::pwrite(memfd, &data[done..run_end], pos - off + done as u64)
                    .map_err(io)?;
                done += w;
            }
            at = run_end;
        }
        if got < n {
            break;
        }
        pos += got as u64;
    }
    let seals = libc::F_SEAL_SEAL
        | libc::F_SEAL_SHRINK
        | libc::F_SEAL_GROW
        | libc::F_SEAL_WRITE
        | libc::F_SEAL_FUTURE_WRITE;
    sys::fcntl(memfd, libc::F_ADD_SEALS, seals as libc::c_long).map_err(io)?;
    Ok(())
}

/// The image path of mmap/mmap64: `None` for every fd that is not a dummy.
fn map_image<O: From<i32>>(
    real_mmap: MmapFn<O>,
    args: (*mut c_void, size_t, c_int, c_int),
    fd: c_int,
    off: i64,
) -> Option<*mut c_void> {
    let of = image_fd(fd)?;
    Some(emulate(libc::MAP_FAILED, || {
        map_copy(&of, real_mmap, args, off)
    }))
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    let Some(real_mmap) = real::MMAP.get() else {
        return libc::MAP_FAILED;
    };
    if flags & libc::MAP_ANONYMOUS == 0
        && is_mapped(fd)
        && let Some(p) = map_image(real_mmap, (addr, len, prot, flags), fd, off)
    {
        return p;
    }
    // SAFETY: forwarding the caller's arguments.
    unsafe { real_mmap(addr, len, prot, flags, fd, off) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off64_t,
) -> *mut c_void {
    let Some(real_mmap) = real::MMAP64.get() else {
        return libc::MAP_FAILED;
    };
    if flags & libc::MAP_ANONYMOUS == 0
        && is_mapped(fd)
        && let Some(p) = map_image(real_mmap, (addr, len, prot, flags), fd, off)
    {
        return p;
    }
    // SAFETY: forwarding the caller's arguments.
    unsafe { real_mmap(addr, len, prot, flags, fd, off) }
}
