//! vdisk errors to errno values: the one place where that mapping lives.

use std::io;

use libc::c_int;

pub fn from_vdisk(e: &vdisk::Error) -> c_int {
    use vdisk::Error::*;
    match e {
        Io(e) => from_io(e),
        NotAnImage => libc::EINVAL,
        Corrupt { .. } => libc::EIO,
        Unsupported(_) => libc::ENOTSUP,
        ReadOnly => libc::EROFS,
        OutOfRange { .. } => libc::EINVAL,
        NoSpace(_) => libc::ENOSPC,
        ParentNotFound(_) => libc::ENOENT,
        ParentMismatch(_) => libc::EIO,
        ParentBusy(_) => libc::EBUSY,
        _ => libc::EIO,
    }
}

pub fn from_io(e: &io::Error) -> c_int {
    match e.raw_os_error() {
        Some(n) => n,
        None => match e.kind() {
            io::ErrorKind::NotFound => libc::ENOENT,
            io::ErrorKind::PermissionDenied => libc::EACCES,
            io::ErrorKind::InvalidInput => libc::EINVAL,
            io::ErrorKind::Unsupported => libc::ENOTSUP,
            io::ErrorKind::ResourceBusy => libc::EBUSY,
            _ => libc::EIO,
        },
    }
}
