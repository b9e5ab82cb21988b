//! [`ByteLocks`] over a `std::fs::File`, for the tools (the `vhdio` CLI, the
//! nbdkit plugin): `fcntl(F_OFD_SETLK / F_OFD_GETLK)` through `nix`'s safe
//! wrapper, so this crate makes no FFI calls of its own. The preload library has its own
//! implementation on raw syscalls (a libc call there would enter its hooks).

use std::fs::File;
use std::io;
use std::path::Path;

use nix::fcntl::{FcntlArg, fcntl};

use crate::lock::{ByteLocks, Holder, WriterLockError, holder, lock_reader, lock_writer};

/// The writer locks, held on an open file description of our own until
/// dropped (closing the description releases them).
pub struct FileWriterLock {
    _held: File,
}

impl FileWriterLock {
    /// Takes the writer locks on `path`: `Busy` while another process (the
    /// preload library, qemu, nbdkit, another `vhdio`) writes it, or reads
    /// it refusing writers ([`holder_of`] tells which).
    pub fn take(path: &Path) -> Result<FileWriterLock, WriterLockError> {
        let file = File::open(path).map_err(WriterLockError::Io)?;
        lock_writer(&FileLocks(&file))?;
        Ok(FileWriterLock { _held: file })
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

/// The byte locks of one open file description.
struct FileLocks<'a>(&'a File);

fn one_byte(kind: libc::c_int, byte: u64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

impl ByteLocks for FileLocks<'_> {
    fn lock_shared(&self, byte: u64) -> io::Result<()> {
        let fl = one_byte(libc::F_RDLCK, byte);
        fcntl(self.0, FcntlArg::F_OFD_SETLK(&fl))
            .map(drop)
            .map_err(io::Error::from)
    }
    fn unlock(&self, byte: u64) {
        let fl = one_byte(libc::F_UNLCK, byte);
        // Releasing a lock cannot fail on a valid descriptor; a failure
        // leaves the byte locked until the description closes.
        let _ = fcntl(self.0, FcntlArg::F_OFD_SETLK(&fl));
    }
    fn locked_by_other(&self, byte: u64) -> bool {
        let mut fl = one_byte(libc::F_WRLCK, byte);
        fcntl(self.0, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok()
            && fl.l_type != libc::F_UNLCK as libc::c_short
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
}
