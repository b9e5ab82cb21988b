//! The writer locks of `vdisk::lock` (qemu's protocol) for the commands that
//! change an image (commit, rebase, resize): OFD byte locks through nix's
//! safe `fcntl`, held on an open file description of our own until dropped.
//! A second writer (the preload library, qemu, `vhdio serve`) is refused.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::fcntl::{FcntlArg, fcntl};

use crate::{EXIT_ERROR, Failure, fail};

pub struct WriterLock {
    file: File,
}

fn flock(kind: libc::c_int, byte: u64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

impl vdisk::lock::ByteLocks for WriterLock {
    fn lock_shared(&self, byte: u64) -> io::Result<()> {
        let fl = flock(libc::F_RDLCK, byte);
        fcntl(&self.file, FcntlArg::F_OFD_SETLK(&fl))
            .map(drop)
            .map_err(io::Error::from)
    }
    fn unlock(&self, byte: u64) {
        let fl = flock(libc::F_UNLCK, byte);
        let _ = fcntl(&self.file, FcntlArg::F_OFD_SETLK(&fl));
    }
    fn locked_by_other(&self, byte: u64) -> bool {
        let mut fl = flock(libc::F_WRLCK, byte);
        fcntl(&self.file, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok()
            && fl.l_type != libc::F_UNLCK as libc::c_short
    }
}

/// Takes the writer locks on `path`, or fails naming the other writer.
pub fn lock_writer(path: &Path) -> Result<WriterLock, Failure> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| fail(EXIT_ERROR, format!("{shown}: {e}")))?;
    let lock = WriterLock { file };
    match vdisk::lock::lock_writer(&lock) {
        Ok(()) => Ok(lock),
        Err(vdisk::lock::WriterLockError::Busy) => Err(fail(
            EXIT_ERROR,
            format!("{shown}: {}", vdisk::lock::BUSY_MESSAGE),
        )),
        Err(vdisk::lock::WriterLockError::Io(e)) => {
            Err(fail(EXIT_ERROR, format!("{shown}: cannot lock: {e}")))
        }
    }
}
