//! ioctl: the block-device requests that disk tools ask; anything else on a
//! dummy is ENOTTY, as on a device that does not know it.

use std::ffi::c_void;

use libc::{c_int, c_uint, c_ulong, c_ushort};

use super::open::call;
use super::{Errno, disk_error, emulate, image_fd};
use crate::fdtable::{OpenFile, is_mapped};
use crate::real;

// <linux/fs.h> and <linux/hdreg.h>; not all are in the libc crate.
const BLKROSET: c_ulong = 0x125D;
const BLKROGET: c_ulong = 0x125E;
const BLKRRPART: c_ulong = 0x125F;
const BLKGETSIZE: c_ulong = 0x1260;
const BLKFLSBUF: c_ulong = 0x1261;
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
const BLKZEROOUT: c_ulong = 0x127F;
const HDIO_GETGEO: c_ulong = 0x0301;

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
        BLKALIGNOFF => put(arg, 0 as c_int),
        // Whether the device can be written at all, whatever this fd's mode.
        BLKROGET => put(arg, !of.image.container_writable() as c_int),
        BLKBSZGET => put(arg, 4096 as c_int),
        BLKBSZSET | BLKROSET | BLKRRPART | BLKPG => Ok(0),
        BLKFLSBUF => {
            of.image.flush().map_err(|e| disk_error("flush", of, e))?;
            Ok(0)
        }
        BLKDISCARDZEROES => put(arg, 0 as c_uint),
        BLKDISCARD | BLKSECDISCARD | BLKZEROOUT => Err(libc::EOPNOTSUPP),
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
    call!(real::IOCTL, fd, req, arg)
}
