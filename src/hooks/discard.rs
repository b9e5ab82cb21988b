//! Discard and zeroing on a dummy, with the kernel's block-device rules
//! (block/ioctl.c blk_ioctl_discard / blk_ioctl_zeroout, block/fops.c
//! blkdev_fallocate): ranges inside the fd's window (a partition's, or the
//! whole disk), aligned to the logical sector size, else EINVAL; a fd not
//! open for writing gets EBADF. Afterwards the range reads as zeros: a
//! stronger promise than a disk's, so that nothing stale shows through.

use std::ffi::c_void;

use libc::c_int;

use super::{Errno, disk_error};
use crate::fdtable::OpenFile;

/// What the caller asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// BLKDISCARD, PUNCH_HOLE: blocks may give their space back.
    Discard,
    /// BLKZEROOUT, ZERO_RANGE (BLKDEV_ZERO_NOUNMAP): blocks keep their space.
    ZeroOut,
}

/// The (start, len) pair a BLKDISCARD / BLKZEROOUT argument points at.
fn range_arg(arg: *mut c_void) -> Result<(u64, u64), Errno> {
    if arg.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: the request defines arg as a pointer to uint64_t[2].
    let r = unsafe { arg.cast::<[u64; 2]>().read_unaligned() };
    Ok((r[0], r[1]))
}

/// BLKDISCARD: EINVAL for an empty, misaligned or out-of-window range.
pub fn blk_discard(of: &OpenFile, arg: *mut c_void) -> Result<c_int, Errno> {
    if !of.writable() {
        return Err(libc::EBADF);
    }
    let (start, len) = range_arg(arg)?;
    let ss = of.image.disk().logical_sector_size() as u64;
    if len == 0 || (start | len) % ss != 0 || start.checked_add(len).is_none_or(|e| e > of.len) {
        return Err(libc::EINVAL);
    }
    run(of, start, len, Kind::Discard)
}

/// BLKZEROOUT: EINVAL for an empty, misaligned or out-of-window range.
pub fn blk_zeroout(of: &OpenFile, arg: *mut c_void) -> Result<c_int, Errno> {
    if !of.writable() {
        return Err(libc::EBADF);
    }
    let (start, len) = range_arg(arg)?;
    let ss = of.image.disk().logical_sector_size() as u64;
    let end = start.wrapping_add(len).wrapping_sub(1);
    if (start | len) % ss != 0 || end >= of.len || end < start {
        return Err(libc::EINVAL);
    }
    run(of, start, len, Kind::ZeroOut)
}

/// fallocate on a dummy, as a block device answers it: PUNCH_HOLE|KEEP_SIZE
/// (with or without NO_HIDE_STALE) discards, ZERO_RANGE zeroes, anything
/// else (mode 0 included) is EOPNOTSUPP. A range past the end is cut with
/// KEEP_SIZE, else EINVAL.
pub fn fallocate(of: &OpenFile, mode: c_int, off: i64, len: i64) -> Result<c_int, Errno> {
    use libc::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
    const NO_HIDE_STALE: c_int = 0x04;
    // vfs_fallocate's checks first.
    if off < 0 || len <= 0 {
        return Err(libc::EINVAL);
    }
    let supported =
        FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | NO_HIDE_STALE;
    if mode & !supported != 0
        || mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)
            == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
        || (mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0)
    {
        return Err(libc::EOPNOTSUPP);
    }
    if !of.writable() {
        return Err(libc::EBADF);
    }
    if off.checked_add(len).is_none() {
        return Err(libc::EFBIG);
    }
    // blkdev_fallocate.
    let (start, mut len) = (off as u64, len as u64);
    if start >= of.len {
        return Err(libc::EINVAL);
    }
    if start + len > of.len {
        if mode & FALLOC_FL_KEEP_SIZE == 0 {
            return Err(libc::EINVAL);
        }
        len = of.len - start;
    }
    let ss = of.image.disk().logical_sector_size() as u64;
    if (start | len) % ss != 0 {
        return Err(libc::EINVAL);
    }
    let kind = match mode & !FALLOC_FL_KEEP_SIZE {
        FALLOC_FL_ZERO_RANGE => Kind::ZeroOut,
        m if m == FALLOC_FL_PUNCH_HOLE && mode & FALLOC_FL_KEEP_SIZE != 0 => Kind::Discard,
        m if m == FALLOC_FL_PUNCH_HOLE | NO_HIDE_STALE && mode & FALLOC_FL_KEEP_SIZE != 0 => {
            Kind::Discard
        }
        _ => return Err(libc::EOPNOTSUPP),
    };
    run(of, start, len, kind)
}

fn run(of: &OpenFile, start: u64, len: u64, kind: Kind) -> Result<c_int, Errno> {
    log::debug!(
        "{kind:?} {len} bytes at {start} of {} (window at {})",
        of.image.path_str(),
        of.start
    );
    of.image.ensure_writer()?;
    let _io = of.image.write_guard();
    of.image.with_disk(|disk| {
        let at = of.start + start;
        match kind {
            Kind::Discard => disk.discard(at, len),
            Kind::ZeroOut => disk.write_zeroes(at, len, false),
        }
        .map_err(|e| disk_error("discard", of, e))?;
        if of.sync {
            disk.flush().map_err(|e| disk_error("flush", of, e))?;
        }
        Ok(0)
    })
}
