//! The writer locks of `vdisk::lock` (qemu's protocol) for the commands that
//! change an image (commit, rebase, resize, compact): `vdisk::FileWriterLock`,
//! held until dropped, with the CLI's error message. A second writer (the
//! preload library, qemu, `vhdio serve`) is refused.

use std::path::Path;

use vdisk::FileWriterLock;
use vdisk::lock::WriterLockError;

use crate::{EXIT_ERROR, Failure, fail};

/// Takes the writer locks on `path`, or fails naming the other writer.
pub fn lock_writer(path: &Path) -> Result<FileWriterLock, Failure> {
    let shown = path.display();
    FileWriterLock::take(path).map_err(|e| match e {
        WriterLockError::Busy => fail(
            EXIT_ERROR,
            format!("{shown}: {}", vdisk::lock::BUSY_MESSAGE),
        ),
        WriterLockError::Io(e) => fail(EXIT_ERROR, format!("{shown}: cannot lock: {e}")),
    })
}
