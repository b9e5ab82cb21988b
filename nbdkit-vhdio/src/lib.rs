//! nbdkit plugin `vhdio`: serves a VHD, VHDX or VDI image (with its parent
//! chain), or one partition of it, over NBD through `vdisk`.
//!
//! `nbdkit vhdio file=disk.vhdx [partition=N] [readonly=BOOL]
//! [punch-holes=BOOL]`, or `-r` for a read-only export. Reads take no lock
//! (thread model PARALLEL); writes go to the top layer only, under the qemu-compatible writer lock that the preload
//! library takes too, so nbdkit, the library and qemu refuse each other as
//! second writers.
//!
//! The callbacks never let a panic reach nbdkit: it becomes EIO for the client.

mod export;
mod plugin;

use std::path::Path;
use std::sync::Arc;

use nbdkit::{CacheFlags, ExtentHandle, ExtentType, Flags, FuaFlags, Result, Server};
use vdisk::Allocation;

use export::Export;

/// One client connection.
struct Vhdio {
    export: Arc<Export>,
    readonly: bool,
}

/// An nbdkit error: errno for the client, the message for nbdkit's log. A
/// NUL in the message (names read from a damaged image) would make the
/// nbdkit crate panic inside C, so it is replaced.
fn error(errno: i32, message: impl Into<String>) -> nbdkit::Error {
    nbdkit::Error::new(errno, message.into().replace('\0', "\\0"))
}

/// The nbdkit error (errno + message for nbdkit's log) for a vdisk error.
fn vdisk_error(e: vdisk::Error) -> nbdkit::Error {
    use vdisk::Error::*;
    let errno = match &e {
        Io(io) => io.raw_os_error().unwrap_or(libc::EIO),
        NotAnImage | OutOfRange { .. } => libc::EINVAL,
        Unsupported(_) => libc::ENOTSUP,
        ReadOnly => libc::EROFS,
        NoSpace(_) => libc::ENOSPC,
        ParentNotFound(_) => libc::ENOENT,
        _ => libc::EIO,
    };
    error(errno, e.to_string())
}

/// Runs a callback; a panic becomes EIO for the client, never an abort of
/// nbdkit (a panic may not unwind into C).
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(error(
            libc::EIO,
            format!("internal error in {what} (panic); the request failed"),
        ))
    })
}

impl Vhdio {
    fn disk(&self) -> &vdisk::Disk {
        &self.export.disk
    }

    /// Makes `len` bytes at `offset` (of the disk, not the window) read as
    /// zeros: the image layer's discard for whole sectors (`unmap`: whole
    /// blocks may give their space back; never allocates where zeros are
    /// read already), zeros written for the unaligned head and tail.
    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> vdisk::Result<()> {
        let disk = self.disk();
        let ss = disk.logical_sector_size() as u64;
        let end = offset + len;
        let head = offset.next_multiple_of(ss).min(end);
        let tail = (end / ss * ss).max(head);
        for (a, b) in [(offset, head), (tail, end)] {
            if a < b {
                disk.write_at(&vec![0u8; (b - a) as usize], a)?;
            }
        }
        if head < tail {
            disk.write_zeroes(head, tail - head, unmap)?;
        }
        Ok(())
    }
}

impl Server for Vhdio {
    fn name() -> &'static str {
        "vhdio"
    }
    fn longname() -> Option<&'static str> {
        Some("nbdkit VHD, VHDX and VDI plugin (libvhdio)")
    }
    fn version() -> Option<&'static str> {
        Some(env!("CARGO_PKG_VERSION"))
    }
    fn description() -> Option<&'static str> {
        Some(
            "Serves a VHD, VHDX or VDI image with its parent chain (differencing \
             images), or one partition of it, through libvhdio's vdisk crate.",
        )
    }
    fn config_help() -> Option<&'static str> {
        Some(
            "file=<IMAGE>     (required) the image, or a partition link (disk.vhdx2:\n\
             \x20                 a symlink to disk.vhdx) to serve partition 2\n\
             partition=<N>    serve partition N of the image\n\
             readonly=<BOOL>  true: open read-only, no lock (with -r); false: take\n\
             \x20                 the writer lock at startup. Default: at the first client\n\
             punch-holes=<BOOL> true: trims and zeroing punch holes in the image\n\
             \x20                 file where data stays in place (fixed images, parts\n\
             \x20                 of blocks) instead of writing zeros. Default: false",
        )
    }
    fn magic_config_key() -> Option<&'static str> {
        Some("file")
    }

    fn config(key: &str, value: &str) -> Result<()> {
        let mut config = export::CONFIG.lock().unwrap_or_else(|e| e.into_inner());
        match key {
            // Absolute now: nbdkit changes directory before serving. Not
            // canonical: a partition link must keep its name.
            "file" => {
                config.file = Some(std::path::absolute(Path::new(value))?);
            }
            "partition" => {
                let n = value.parse::<u32>().ok().filter(|&n| n > 0);
                config.partition = Some(n.ok_or_else(|| {
                    error(libc::EINVAL, format!("partition={value}: not 1, 2, ..."))
                })?);
            }
            "readonly" => config.readonly = Some(nbdkit::parse_bool(value)?),
            "punch-holes" => config.punch_holes = nbdkit::parse_bool(value)?,
            _ => {
                return Err(error(
                    libc::EINVAL,
                    format!("unknown parameter '{key}' (file, partition, readonly, punch-holes)"),
                ));
            }
        }
        Ok(())
    }

    fn config_complete() -> Result<()> {
        if export::config().file.is_none() {
            return Err(error(libc::EINVAL, "missing parameter file=IMAGE"));
        }
        Ok(())
    }

    fn get_ready() -> Result<()> {
        guarded("get_ready", || {
            export::open_at_startup().map_err(|e| error(libc::EIO, e))
        })
    }

    fn open(readonly: bool) -> Result<Box<dyn Server>> {
        guarded("open", || {
            let readonly = readonly || export::config().readonly == Some(true);
            let export = export::get(!readonly).map_err(|e| error(libc::EIO, e))?;
            Ok(Box::new(Vhdio { export, readonly }) as Box<dyn Server>)
        })
    }

    fn get_size(&self) -> Result<i64> {
        Ok(self.export.size as i64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        guarded("pread", || {
            self.disk()
                .read_at(buf, self.export.start + offset)
                .map_err(vdisk_error)
        })
    }

    fn can_write(&self) -> Result<bool> {
        Ok(!self.readonly && self.export.writable())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        guarded("pwrite", || {
            self.disk()
                .write_at(buf, self.export.start + offset)
                .map_err(vdisk_error)
        })
    }

    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn flush(&self) -> Result<()> {
        guarded("flush", || self.disk().flush().map_err(vdisk_error))
    }
    /// nbdkit flushes after a FUA write: the image's flush is the only way
    /// to make one write durable.
    fn can_fua(&self) -> Result<FuaFlags> {
        Ok(FuaFlags::Emulate)
    }

    /// Every connection shares one Disk: a flush on one covers them all.
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }

    fn can_cache(&self) -> Result<CacheFlags> {
        Ok(CacheFlags::Emulate)
    }

    fn can_zero(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(false)
    }
    fn zero(&self, count: u32, offset: u64, flags: Flags) -> Result<()> {
        guarded("zero", || {
            let unmap = flags.contains(Flags::MAY_TRIM);
            self.zero_range(self.export.start + offset, count as u64, unmap)
                .map_err(vdisk_error)
        })
    }
    /// Trim reads as zeros afterwards (the image layer's promise); whole
    /// blocks give their space back.
    fn can_trim(&self) -> Result<bool> {
        Ok(!self.readonly && self.export.writable())
    }
    fn trim(&self, count: u32, offset: u64, _flags: Flags) -> Result<()> {
        guarded("trim", || {
            self.zero_range(self.export.start + offset, count as u64, true)
                .map_err(vdisk_error)
        })
    }

    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    fn extents(&self, count: u32, offset: u64, flags: Flags, h: &mut ExtentHandle) -> Result<()> {
        guarded("extents", || {
            let end = (offset + count as u64).min(self.export.size);
            let mut pos = offset;
            while pos < end {
                let (allocation, run) = self
                    .disk()
                    .map_allocation(self.export.start + pos, end - pos)
                    .map_err(vdisk_error)?;
                let kind = match allocation {
                    Allocation::Data => ExtentType::Allocated,
                    Allocation::Hole => ExtentType::HoleZero,
                };
                h.add(pos, run, kind)?;
                pos += run;
                if flags.contains(Flags::REQ_ONE) {
                    break;
                }
            }
            Ok(())
        })
    }
}
