//! [`ByteLocks`] over a `std::fs::File`, for the tools (the `vhdio` CLI, the
//! nbdkit plugin): `fcntl(F_OFD_SETLK / F_OFD_GETLK)` through `nix`'s safe
//! wrapper, so this crate makes no FFI calls of its own. The preload library has its own
//! implementation on raw syscalls (a libc call there would enter its hooks).
//! Also [`LockingParentOpener`], which holds qemu's backing-file locks on
//! every parent it opens (the nbdkit plugin).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, fcntl};

use crate::lock::{ByteLocks, Holder, WriterLockError, holder, lock_reader, lock_writer};
use crate::{ParentOpener, StdParentOpener, Storage};

/// The writer locks, held on an open file description of our own until
/// dropped (closing the description releases them).
pub struct FileWriterLock {
    _file: File,
}

impl FileWriterLock {
    /// Takes the writer locks on `path`: `Busy` while another process (the
    /// preload library, qemu, nbdkit, another `vhdio`) writes it.
    pub fn take(path: &Path) -> Result<FileWriterLock, WriterLockError> {
        let file = File::open(path).map_err(WriterLockError::Io)?;
        lock_writer(&FileLocks(&file))?;
        Ok(FileWriterLock { _file: file })
    }
}

/// Takes the reader locks (qemu's read-only open) on the open file
/// description of `file`: they last as long as it is open (in any of its
/// duplicates, e.g. the `Storage` an image reads through). `Busy` while
/// another process writes the file.
pub fn lock_reader_on(file: &File) -> Result<(), WriterLockError> {
    lock_reader(&FileLocks(file))
}

/// Who else holds `path` (for the message of a refused lock).
pub fn holder_of(path: &Path) -> io::Result<Holder> {
    Ok(holder(&FileLocks(&File::open(path)?)))
}

/// Why a writer of `path` is refused now: another writer, or children of
/// it that are open (see [`crate::lock::refusal`]). The generic
/// [`crate::lock::BUSY_MESSAGE`] when the file cannot be asked.
pub fn writer_refusal(path: &Path) -> &'static str {
    File::open(path)
        .ok()
        .and_then(|file| crate::lock::refusal(&FileLocks(&file)))
        .unwrap_or(crate::lock::BUSY_MESSAGE)
}

/// The byte locks of one open file description.
struct FileLocks<'a>(&'a File);

impl ByteLocks for FileLocks<'_> {
    fn lock_shared(&self, byte: u64) -> io::Result<()> {
        let fl = one_byte(libc::F_RDLCK, byte);
        fcntl(self.0, FcntlArg::F_OFD_SETLK(&fl))
            .map(drop)
            .map_err(io::Error::from)
    }
    fn unlock(&self, byte: u64) {
        let fl = one_byte(libc::F_UNLCK, byte);
        let _ = fcntl(self.0, FcntlArg::F_OFD_SETLK(&fl));
    }
    fn locked_by_other(&self, byte: u64) -> bool {
        let mut fl = one_byte(libc::F_WRLCK, byte);
        fcntl(self.0, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok()
            && fl.l_type != libc::F_UNLCK as libc::c_short
    }
}

/// A parent file opened read-only; [`Storage::lock_as_parent`] takes
/// qemu's backing-file locks on it, held until it is dropped.
pub struct ParentFile(File);

impl Storage for ParentFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a parent is never written",
        ))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a parent is never written",
        ))
    }
    fn sync(&self) -> io::Result<()> {
        // Read-only: Linux still flushes the file (as for any fd).
        self.0.sync_data()
    }
    fn is_writable(&self) -> bool {
        false
    }
    fn lock_as_parent(&self) -> Result<(), WriterLockError> {
        lock_reader(&FileLocks(&self.0))
    }
}

/// [`StdParentOpener`] whose parents hold qemu's backing-file locks once
/// `open_disk` confirms them, so qemu, the preload library and the plugin
/// refuse to write a parent while a child of it is open here. Extent files
/// and VirtualBox registries are opened without locks: the VMDK descriptor
/// (the file writers lock) is the parent itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct LockingParentOpener;

impl ParentOpener for LockingParentOpener {
    fn open_parent(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(ParentFile(crate::open::open_regular_file(path)?)))
    }
    fn open_extent(&self, path: &Path, writable: bool) -> io::Result<Box<dyn Storage>> {
        StdParentOpener.open_extent(path, writable)
    }
    fn search_dirs(&self) -> Vec<PathBuf> {
        StdParentOpener.search_dirs()
    }
}

fn one_byte(kind: libc::c_int, byte: u64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_and_the_lock_ends_with_its_holder() {
        let tmp = std::env::temp_dir().join(format!("vdisk-lock-{}", std::process::id()));
        std::fs::write(&tmp, [0u8; 512]).unwrap();
        let first = FileWriterLock::take(&tmp).unwrap();
        assert!(matches!(
            FileWriterLock::take(&tmp),
            Err(WriterLockError::Busy)
        ));
        drop(first);
        let writer = FileWriterLock::take(&tmp).unwrap();
        let reading = File::open(&tmp).unwrap();
        assert!(matches!(
            lock_reader_on(&reading),
            Err(WriterLockError::Busy)
        ));
        assert_eq!(holder_of(&tmp).unwrap(), Holder::Writer);
        drop(writer);
        lock_reader_on(&reading).unwrap();
        // A second reader shares; a writer is refused, naming the readers.
        lock_reader_on(&File::open(&tmp).unwrap()).unwrap();
        assert!(matches!(
            FileWriterLock::take(&tmp),
            Err(WriterLockError::Busy)
        ));
        assert_eq!(holder_of(&tmp).unwrap(), Holder::Readers);
        drop(reading);
        assert!(FileWriterLock::take(&tmp).is_ok());
        std::fs::remove_file(&tmp).unwrap();
    }

    #[test]
    fn open_parents_refuse_writers_and_share_with_each_other() {
        let tmp = std::env::temp_dir().join(format!("vdisk-parent-lock-{}", std::process::id()));
        std::fs::write(&tmp, [0u8; 512]).unwrap();
        let parent = || LockingParentOpener.open_parent(&tmp).unwrap();
        let (first, second) = (parent(), parent());
        first.lock_as_parent().unwrap();
        second.lock_as_parent().unwrap();
        assert!(matches!(
            FileWriterLock::take(&tmp),
            Err(WriterLockError::Busy)
        ));
        assert_eq!(writer_refusal(&tmp), crate::lock::READ_BUSY_MESSAGE);
        drop((first, second));
        let writer = FileWriterLock::take(&tmp).unwrap();
        assert_eq!(writer_refusal(&tmp), crate::lock::BUSY_MESSAGE);
        assert!(matches!(
            parent().lock_as_parent(),
            Err(WriterLockError::Busy)
        ));
        drop(writer);
        parent().lock_as_parent().unwrap();
        std::fs::remove_file(&tmp).unwrap();
    }
}
