//! What libaio and POSIX AIO requests on an image fd share: the transfer
//! itself, done at once in the submitting thread through the same code as
//! pread/pwrite/preadv/pwritev/fsync (the disk is served from memory and the
//! container; there is nothing to overlap with), then reported as completed.

use std::ffi::c_void;

use libc::{c_int, iovec};

use super::rw::{as_mut, as_ref, iovecs, readv_at, writev_at};
use super::{Errno, disk_error, emulate};
use crate::fdtable::OpenFile;

/// One request on an image window.
pub enum Op {
    Read(*mut c_void, usize, i64),
    Write(*const c_void, usize, i64),
    ReadV(*const iovec, c_int, i64),
    WriteV(*const iovec, c_int, i64),
    Flush,
}

/// Performs `op` on `of`: bytes transferred, or the errno of the failure. A
/// panic is EIO, as for every hook.
pub fn perform(of: &OpenFile, op: Op) -> Result<usize, Errno> {
    emulate(Err(libc::EIO), || Ok(run(of, op)))
}

fn pos(off: i64) -> Result<u64, Errno> {
    u64::try_from(off).map_err(|_| libc::EINVAL)
}

fn run(of: &OpenFile, op: Op) -> Result<usize, Errno> {
    match op {
        Op::Read(buf, n, off) => of.read_at(as_mut(buf, n), pos(off)?),
        Op::Write(buf, n, off) => of.write_at(as_ref(buf, n), pos(off)?),
        Op::ReadV(iov, cnt, off) => readv_at(of, iovecs(iov, cnt)?, pos(off)?),
        Op::WriteV(iov, cnt, off) => writev_at(of, iovecs(iov, cnt)?, pos(off)?),
        Op::Flush => {
            of.image
                .disk()
                .flush()
                .map_err(|e| disk_error("fsync", of, e))?;
            Ok(0)
        }
    }
}
