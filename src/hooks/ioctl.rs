//! ioctl: the block-device requests that disk tools ask, answered as a
//! kernel virtual disk would; anything else on a dummy is ENOTTY, as on a
//! device that does not know it. Also refuses to hand a dummy to the loop
//! driver, which would attach the empty memfd.

use std::ffi::c_void;
use std::sync::atomic::Ordering;

use libc::{c_int, c_uint, c_ulong, c_ushort};

use super::open::call;
use super::{Errno, discard, disk_error, emulate, image_fd};
use crate::fdtable::{OpenFile, is_mapped};
use crate::images::ImageObject;
use crate::real;

// <linux/fs.h> and <linux/hdreg.h>; not all are in the libc crate.
const BLKROSET: c_ulong = 0x125D;
const BLKROGET: c_ulong = 0x125E;
const BLKRRPART: c_ulong = 0x125F;
const BLKGETSIZE: c_ulong = 0x1260;
const BLKFLSBUF: c_ulong = 0x1261;
const BLKRASET: c_ulong = 0x1262;
const BLKRAGET: c_ulong = 0x1263;
const BLKFRASET: c_ulong = 0x1264;
const BLKFRAGET: c_ulong = 0x1265;
const BLKSECTGET: c_ulong = 0x1267;
const BLKSSZGET: c_ulong = 0x1268;
const BLKPG: c_ulong = 0x1269;
const BLKBSZGET: c_ulong = 0x8008_1270;
const BLKBSZSET: c_ulong = 0x4008_1271;
const BLKGETSIZE64: c_ulong = 0x8008_1272;
const BLKDISCARD: c_ulong = 0x1277;
const BLKIOMIN: c_ulong = 0x1278;
const BLKIOOPT: c_ulong = 0x1279;
const BLKALIGNOFF: c_ulong = 0x127A;
const BLKPBSZGET: c_ulong = 0x127B;
const BLKDISCARDZEROES: c_ulong = 0x127C;
const BLKSECDISCARD: c_ulong = 0x127D;
const BLKROTATIONAL: c_ulong = 0x127E;
const BLKZEROOUT: c_ulong = 0x127F;
const BLKGETDISKSEQ: c_ulong = 0x8008_1280;
const BLKGETZONESZ: c_ulong = 0x8004_1284;
const BLKGETNRZONES: c_ulong = 0x8004_1285;
const HDIO_GETGEO: c_ulong = 0x0301;
// <linux/loop.h>: requests on /dev/loopN whose argument names a backing fd.
const LOOP_SET_FD: c_ulong = 0x4C00;
const LOOP_CHANGE_FD: c_ulong = 0x4C06;
const LOOP_CONFIGURE: c_ulong = 0x4C0A;

/// Largest request in sectors (BLKSECTGET, a ushort): 1 MiB, a usual
/// virtual disk's max_sectors_kb. The library splits nothing; it is advice.
const MAX_SECTORS: c_ushort = 2048;
/// The kernel keeps read-ahead in pages.
const PAGE: u64 = 4096;

#[repr(C)]
struct HdGeometry {
    heads: u8,
    sectors: u8,
    cylinders: c_ushort,
    start: c_ulong,
}

/// Stores `v` through the caller's argument pointer.
fn put<T>(arg: *mut c_void, v: T) -> Result<c_int, Errno> {
    if arg.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: the request defines arg as a pointer to T.
    unsafe { arg.cast::<T>().write_unaligned(v) };
    Ok(0)
}

fn block_ioctl(of: &OpenFile, req: c_ulong, arg: *mut c_void) -> Result<c_int, Errno> {
    let disk = of.image.disk();
    match req {
        BLKGETSIZE64 => put(arg, of.len),
        BLKGETSIZE => put(arg, (of.len / 512) as c_ulong),
        BLKSSZGET => put(arg, disk.logical_sector_size() as c_int),
        BLKPBSZGET | BLKIOMIN => put(arg, disk.physical_sector_size() as c_uint),
        BLKIOOPT => put(arg, 0 as c_uint),
        // How far the window's start is from the next physical-sector
        // boundary, as the kernel says for a partition.
        BLKALIGNOFF => {
            let pbs = disk.physical_sector_size().max(1) as u64;
            put(arg, ((pbs - of.start % pbs) % pbs) as c_int)
        }
        // Read-ahead: stored, any user may set it (nothing is at stake in an
        // emulation), rounded to pages as the kernel does.
        BLKRAGET | BLKFRAGET => put(
            arg,
            of.image.readahead.load(Ordering::Relaxed) as libc::c_long,
        ),
        BLKRASET | BLKFRASET => {
            let sectors = arg as u64 * 512 / PAGE * PAGE / 512;
            of.image.readahead.store(sectors, Ordering::Relaxed);
            Ok(0)
        }
        BLKSECTGET => put(arg, MAX_SECTORS),
        BLKROTATIONAL => put(arg, 0 as c_ushort),
        // Not zoned.
        BLKGETZONESZ | BLKGETNRZONES => put(arg, 0 as c_uint),
        BLKGETDISKSEQ => put(arg, disk_sequence(&of.image)),
        // Whether the device can be written at all, whatever this fd's mode.
        BLKROGET => put(arg, !of.image.container_writable() as c_int),
        BLKBSZGET => put(arg, 4096 as c_int),
        BLKBSZSET | BLKROSET | BLKRRPART | BLKPG => Ok(0),
        BLKFLSBUF => {
            of.image.flush().map_err(|e| disk_error("flush", of, e))?;
            Ok(0)
        }
        // Discarded sectors read as zeros here, always (see hooks::discard).
        BLKDISCARDZEROES => put(arg, 1 as c_uint),
        BLKDISCARD => discard::blk_discard(of, arg),
        BLKZEROOUT => discard::blk_zeroout(of, arg),
        // No secure erase: the old bytes may stay in the container file.
        BLKSECDISCARD => Err(libc::EOPNOTSUPP),
        HDIO_GETGEO => {
            // The image's CHS where it has one, else the conventional 255/63.
            let g = disk.geometry().unwrap_or(vdisk::Geometry {
                cylinders: 0,
                heads: 255,
                sectors: 63,
            });
            let (heads, sectors) = (g.heads.clamp(1, 255), g.sectors.clamp(1, 63));
            let cylinders = (of.len / 512 / (heads as u64 * sectors as u64)).min(65535);
            put(
                arg,
                HdGeometry {
                    heads: heads as u8,
                    sectors: sectors as u8,
                    cylinders: cylinders as c_ushort,
                    start: (of.start / 512) as c_ulong,
                },
            )
        }
        _ => Err(libc::ENOTTY),
    }
}

/// A disk sequence number (BLKGETDISKSEQ), stable for one container file
/// and distinct between files. The kernel counts up from 1 per boot; the top
/// bit keeps these apart from its numbers.
fn disk_sequence(image: &ImageObject) -> u64 {
    let (dev, ino) = image.id();
    (1 << 63) | ((dev.rotate_left(40) ^ ino) & !(1 << 63))
}

/// The backing fd that a loop request on a (non-dummy) fd names, if any.
fn loop_backing_fd(req: c_ulong, arg: *mut c_void) -> Option<c_int> {
    match req {
        LOOP_SET_FD | LOOP_CHANGE_FD => c_int::try_from(arg as usize).ok(),
        // struct loop_config starts with its __u32 fd.
        LOOP_CONFIGURE if !arg.is_null() => {
            // SAFETY: the request defines arg as a struct loop_config pointer.
            Some(unsafe { arg.cast::<u32>().read_unaligned() } as c_int)
        }
        _ => None,
    }
}

/// The loop driver would attach the dummy memfd itself: an empty device.
/// EOPNOTSUPP, not EINVAL, so that losetup does not retry LOOP_CONFIGURE
/// as LOOP_SET_FD.
fn refuse_loop(of: &OpenFile, backing: c_int) -> Result<c_int, Errno> {
    log::warn!(
        "{}: cannot back a loop device (fd {backing} is the library's dummy, the kernel would \
         see an empty file); for a kernel block device use `vhdio serve` + `nbd-client`",
        of.image.path_str()
    );
    Err(libc::EOPNOTSUPP)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    if is_mapped(fd)
        && let Some(of) = image_fd(fd)
    {
        return emulate(-1, || {
            let r = block_ioctl(&of, req, arg);
            log::debug!("ioctl {req:#x} on dummy fd {fd}: {r:?}");
            r
        });
    }
    if let Some(backing) = loop_backing_fd(req, arg)
        && is_mapped(backing)
        && let Some(of) = image_fd(backing)
    {
        return emulate(-1, || refuse_loop(&of, backing));
    }
    call!(real::IOCTL, fd, req, arg)
}
