//! The locks of `vdisk::lock` (qemu's protocol), with the CLI's messages.
//!
//! Writer locks for the commands that change an image (commit, rebase,
//! resize, compact): `vdisk::FileWriterLock`, held until dropped. A second
//! writer (the preload library, qemu, `vhdio serve`) is refused, and so are
//! readers that refuse writers (qemu, another vhdio reading the image).
//!
//! Reader locks (qemu's read-only open: read held, write and resize denied)
//! on every file a command only reads (convert, compare, map, info, check;
//! the parents a writer reads): taken on the open file description the image
//! is read through, so they last as long as the image is open. A writer is
//! then refused while we read, and we refuse to read what a writer changes
//! under us. `-U/--force-share` skips them, as with qemu-img.

use std::fs::File;
use std::path::{Path, PathBuf};

use vdisk::FileWriterLock;
use vdisk::lock::{Holder, WriterLockError};

use crate::{EXIT_ERROR, Failure, fail};

/// Takes the writer locks on `path`, or fails naming who holds it.
pub fn lock_writer(path: &Path) -> Result<FileWriterLock, Failure> {
    let shown = path.display();
    FileWriterLock::take(path).map_err(|e| match e {
        WriterLockError::Busy => {
            let why = match vdisk::holder_of(path) {
                Ok(Holder::Readers) => vdisk::lock::READ_BUSY_MESSAGE,
                _ => vdisk::lock::BUSY_MESSAGE,
            };
            fail(EXIT_ERROR, format!("{shown}: {why}"))
        }
        WriterLockError::Io(e) => fail(EXIT_ERROR, format!("{shown}: cannot lock: {e}")),
    })
}

/// Which files a command takes reader locks on.
#[derive(Clone, Debug)]
pub enum ReadLocks {
    /// None (`-U/--force-share`, or nothing to protect).
    Skip,
    /// Every file read, except these (canonical paths the command holds
    /// writer locks on: a reader lock of ours would refuse our own writer).
    Take {
        except: Vec<PathBuf>,
        /// Whether the command has `-U` (said in the message).
        forceable: bool,
    },
}

impl ReadLocks {
    /// Every file read, unless `force_share`.
    pub fn unless(force_share: bool) -> ReadLocks {
        if force_share {
            ReadLocks::Skip
        } else {
            ReadLocks::all()
        }
    }
    pub fn all() -> ReadLocks {
        ReadLocks::Take {
            except: Vec::new(),
            forceable: true,
        }
    }
    /// Every file read but `written` (the files holding our writer locks).
    pub fn except(written: &[PathBuf]) -> ReadLocks {
        let except = written
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect();
        ReadLocks::Take {
            except,
            forceable: false,
        }
    }

    /// Takes the reader locks on `file` (found at `path`), unless skipped.
    pub fn lock(&self, file: &File, path: &Path) -> Result<(), String> {
        let ReadLocks::Take { except, forceable } = self else {
            return Ok(());
        };
        if !except.is_empty()
            && std::fs::canonicalize(path).is_ok_and(|real| except.contains(&real))
        {
            return Ok(());
        }
        let shown = path.display();
        vdisk::lock_reader_on(file).map_err(|e| match e {
            WriterLockError::Busy => format!(
                "{shown}: {}{}",
                vdisk::lock::WRITTEN_MESSAGE,
                if *forceable {
                    " (-U/--force-share reads it anyway)"
                } else {
                    ""
                }
            ),
            WriterLockError::Io(e) => format!("{shown}: cannot lock: {e}"),
        })
    }
}
