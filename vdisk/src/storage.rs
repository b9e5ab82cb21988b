//! Positioned I/O on a container file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// What an image file sits on: positioned reads and writes, length, sync.
///
/// Implementations take `&self` and keep no file offset, so one storage can serve
/// concurrent readers. The preload library implements it over raw syscalls, tools
/// and tests use the `std::fs::File` implementation below.
// `len` is a file length; an `is_empty` would add nothing.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes up to `buf.len()` bytes at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Current length of the file in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes written data and the file size durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Whether writes are permitted (the file was opened for writing).
    fn is_writable(&self) -> bool;
    /// Called on a parent once [`crate::open_disk`] knows it is the parent:
    /// takes the parent locks of [`crate::lock::lock_reader`] on this open
    /// file, held until it closes, so no writer changes the parent under the
    /// child. Default: no lock (in-memory images; the tools' plain files,
    /// whose commands write parents themselves under their own locks).
    fn lock_as_parent(&self) -> Result<(), crate::lock::WriterLockError> {
        Ok(())
    }
    /// Deallocates `len` bytes at `offset` in the host file, keeping its
    /// size (fallocate PUNCH_HOLE|KEEP_SIZE): afterwards they read zeros.
    /// `ErrorKind::Unsupported` where the storage or its file system cannot
    /// (the default): callers write zeros instead.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this storage cannot punch holes",
        ))
    }

    /// Reads exactly `buf.len()` bytes; a short file is `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("image file ends before offset {offset}"),
                    ));
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        if !self.is_writable() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "image opened read-only",
            ));
        }
        while !buf.is_empty() {
            match self.write_at(buf, offset) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A `std::fs::File` together with whether it was opened for writing.
impl Storage for (File, bool) {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn is_writable(&self) -> bool {
        self.1
    }
    #[cfg(all(feature = "punch-hole", target_os = "linux"))]
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{FallocateFlags, fallocate};
        if !self.1 {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        loop {
            match fallocate(&self.0, mode, off, n) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "the file system cannot punch holes",
                    ));
                }
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    }
}

/// Host pages: holes are punched in whole pages only; the bytes around
/// them get zeros written (punching a part of a page would zero it in the
/// page cache anyway, at the cost of a system call).
const HOLE_UNIT: u64 = 4096;

/// Makes `len` bytes at `offset` of `storage` read zeros. With `punch`, the
/// whole 4 KiB pages inside the range become a hole in the host file where
/// the storage can punch one ([`Storage::punch_hole`]); zeros are written
/// around them, and everywhere when the file system cannot punch.
pub fn zero_file_range(
    storage: &dyn Storage,
    offset: u64,
    len: u64,
    punch: bool,
) -> io::Result<()> {
    let end = offset + len;
    let (first, last) = (
        offset.next_multiple_of(HOLE_UNIT),
        end / HOLE_UNIT * HOLE_UNIT,
    );
    if punch && first < last {
        match storage.punch_hole(first, last - first) {
            Ok(()) => {
                write_zeros(storage, offset, first - offset)?;
                return write_zeros(storage, last, end - last);
            }
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
            Err(e) => return Err(e),
        }
    }
    write_zeros(storage, offset, len)
}

fn write_zeros(storage: &dyn Storage, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let k = CHUNK.min(len - done);
        storage.write_all_at(&zeros[..k as usize], offset + done)?;
        done += k;
    }
    Ok(())
}

/// An in-memory file, for tests and for building images in memory.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemStorage {
    pub fn new(data: Vec<u8>) -> MemStorage {
        MemStorage {
            data: Mutex::new(data),
            read_only: false,
        }
    }
    pub fn read_only(data: Vec<u8>) -> MemStorage {
        MemStorage {
            data: Mutex::new(data),
            read_only: true,
        }
    }
    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let data = self.lock();
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        if start >= data.len() {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"));
        }
        let mut data = self.lock();
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::other("offset too large"))?;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(buf.len())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        self.lock().resize(len, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        !self.read_only
    }
}

/// Reads a table of `count` entries of `size` bytes at `offset`, each decoded
/// by `entry`, through a 64 KiB buffer: the allocation tables of multi-TiB
/// disks are megabytes, and a second full-size copy would double the page
/// faults of every open.
pub fn read_table<T>(
    storage: &dyn Storage,
    offset: u64,
    count: usize,
    size: usize,
    entry: impl Fn(&[u8]) -> T,
) -> io::Result<Vec<T>> {
    const CHUNK: usize = 64 << 10;
    let total = count * size;
    let mut entries = Vec::with_capacity(count);
    let mut raw = vec![0u8; (CHUNK / size * size).min(total)];
    let mut done = 0usize;
    while done < total {
        let n = raw.len().min(total - done);
        storage.read_exact_at(&mut raw[..n], offset + done as u64)?;
        entries.extend(raw[..n].chunks_exact(size).map(&entry));
        done += n;
    }
    Ok(entries)
}
