//! The inter-process writer lock protocol, compatible with qemu's
//! (block/file-posix.c): shared OFD locks on byte 100 + i for each permission
//! i a user holds, and on byte 200 + i for each permission it does not share.
//! Permission bits: 0 consistent read, 1 write, 2 write-unchanged, 3 resize.
//!
//! A writer holds read, write and resize and shares neither write nor resize,
//! exactly like a qemu writer of a format image, so a running qemu, the
//! preload library and the nbdkit plugin refuse each other as second writers.
//! Readers of an image take no lock: a reader does not block a writer (its
//! cached metadata may then be stale); that is more lenient than qemu, whose
//! readers refuse writers.
//!
//! Parents are different: a child's data is only correct over the parent it
//! was made on, so a parent written under a live child corrupts the child's
//! view for good. Every open parent holds qemu's backing-file lock (holds
//! consistent read, shares neither write nor resize: bytes 100, 201, 203),
//! which refuses writers of the parent (qemu, the library, the plugin) while
//! any child is open, and is itself refused while the parent has a writer.
//! Parent locks are shared, so any number of children of one base (a golden
//! image) open at once.
//!
//! The byte locks themselves are system calls, which this crate does not
//! make: each user implements [`ByteLocks`] over its own file descriptor.

use std::io;

const PERM_BASE: u64 = 100;
const SHARED_BASE: u64 = 200;
const CONSISTENT_READ: u64 = 0;
const WRITE: u64 = 1;
const RESIZE: u64 = 3;

/// Bytes a writer locks: the permissions it holds and those it denies.
const WRITER_LOCKS: [u64; 5] = [
    PERM_BASE + CONSISTENT_READ,
    PERM_BASE + WRITE,
    PERM_BASE + RESIZE,
    SHARED_BASE + WRITE,
    SHARED_BASE + RESIZE,
];
/// Bytes whose lock by someone else conflicts with a writer: someone denying
/// what we hold, or holding what we deny.
const WRITER_CONFLICTS: [u64; 5] = [
    SHARED_BASE + CONSISTENT_READ,
    SHARED_BASE + WRITE,
    SHARED_BASE + RESIZE,
    PERM_BASE + WRITE,
    PERM_BASE + RESIZE,
];

/// Bytes a parent (a backing file) locks: consistent read held; write and
/// resize not shared. qemu takes exactly these on every backing file.
const PARENT_LOCKS: [u64; 3] = [
    PERM_BASE + CONSISTENT_READ,
    SHARED_BASE + WRITE,
    SHARED_BASE + RESIZE,
];
/// Bytes whose lock by someone else conflicts with a parent lock: someone
/// who denies reading, or holds write or resize.
const PARENT_CONFLICTS: [u64; 3] = [
    SHARED_BASE + CONSISTENT_READ,
    PERM_BASE + WRITE,
    PERM_BASE + RESIZE,
];

/// One-byte OFD (open file description) locks on an image file.
pub trait ByteLocks {
    /// Takes a shared (read) lock on byte `byte`.
    fn lock_shared(&self, byte: u64) -> io::Result<()>;
    /// Releases our lock on byte `byte`.
    fn unlock(&self, byte: u64);
    /// Whether another open file description holds a lock on byte `byte`.
    fn locked_by_other(&self, byte: u64) -> bool;
}

/// Why the writer locks (or a parent's locks) could not be taken.
#[derive(Debug)]
pub enum WriterLockError {
    /// For a writer: another process (or qemu) writes the image, or holds it
    /// open as a parent ([`refusal`] says which). For a parent: another
    /// process writes it.
    Busy,
    /// The lock call itself failed.
    Io(io::Error),
}

/// The message for [`WriterLockError::Busy`].
pub const BUSY_MESSAGE: &str = "another process is writing this image; refusing a second writer";
/// The message for a writer refused by readers that do not share writing.
pub const IN_USE_MESSAGE: &str = "this image is open as the parent of a differencing image (or by a qemu reader), \
     and a parent must not change under its children; refusing to write it";
/// The message for a parent that another process writes.
pub const PARENT_BUSY_MESSAGE: &str = "another process is writing this image, which is the parent \
     of the image being opened; refusing to open a child over a changing parent";

/// Why a writer is refused, from the locks others hold: [`BUSY_MESSAGE`]
/// when another process writes (or resizes) the image, [`IN_USE_MESSAGE`]
/// when only readers that share no writing hold it (children of it are
/// open). `None`: nothing keeps a writer out.
pub fn refusal(locks: &dyn ByteLocks) -> Option<&'static str> {
    if [PERM_BASE + WRITE, PERM_BASE + RESIZE]
        .iter()
        .any(|&b| locks.locked_by_other(b))
    {
        Some(BUSY_MESSAGE)
    } else if other_writer(locks) {
        Some(IN_USE_MESSAGE)
    } else {
        None
    }
}

/// Whether another process (or qemu) is writing the image.
pub fn other_writer(locks: &dyn ByteLocks) -> bool {
    WRITER_CONFLICTS.iter().any(|&b| locks.locked_by_other(b))
}

/// Takes the writer locks, then checks for conflicts, as qemu does: two
/// racing writers both see the other. On any failure the locks are released.
pub fn lock_writer(locks: &dyn ByteLocks) -> Result<(), WriterLockError> {
    for &b in &WRITER_LOCKS {
        if let Err(e) = locks.lock_shared(b) {
            unlock_writer(locks);
            // A conflicting exclusive lock (not qemu's scheme) also means busy.
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::PermissionDenied => {
                    WriterLockError::Busy
                }
                _ => WriterLockError::Io(e),
            });
        }
    }
    if other_writer(locks) {
        unlock_writer(locks);
        return Err(WriterLockError::Busy);
    }
    Ok(())
}

/// Releases the writer locks.
pub fn unlock_writer(locks: &dyn ByteLocks) {
    for &b in &WRITER_LOCKS {
        locks.unlock(b);
    }
}

/// Takes a parent's locks (qemu's for a backing file), then checks for
/// conflicts: `Busy` while another process writes the parent. On any failure
/// the locks are released. Held until the description closes.
pub fn lock_parent(locks: &dyn ByteLocks) -> Result<(), WriterLockError> {
    let release = || PARENT_LOCKS.iter().for_each(|&b| locks.unlock(b));
    for &b in &PARENT_LOCKS {
        if let Err(e) = locks.lock_shared(b) {
            release();
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::PermissionDenied => {
                    WriterLockError::Busy
                }
                _ => WriterLockError::Io(e),
            });
        }
    }
    if PARENT_CONFLICTS.iter().any(|&b| locks.locked_by_other(b)) {
        release();
        return Err(WriterLockError::Busy);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// Our locks, and the bytes someone else holds.
    struct Fake {
        ours: RefCell<BTreeSet<u64>>,
        others: BTreeSet<u64>,
    }
    impl ByteLocks for Fake {
        fn lock_shared(&self, byte: u64) -> io::Result<()> {
            self.ours.borrow_mut().insert(byte);
            Ok(())
        }
        fn unlock(&self, byte: u64) {
            self.ours.borrow_mut().remove(&byte);
        }
        fn locked_by_other(&self, byte: u64) -> bool {
            self.others.contains(&byte)
        }
    }

    #[test]
    fn writer_refuses_writer() {
        let free = Fake {
            ours: RefCell::default(),
            others: BTreeSet::new(),
        };
        lock_writer(&free).unwrap();
        assert_eq!(free.ours.borrow().len(), 5);
        // What a second writer sees: the first one's locks.
        let busy = Fake {
            ours: RefCell::default(),
            others: free.ours.borrow().clone(),
        };
        assert!(other_writer(&busy));
        assert!(matches!(lock_writer(&busy), Err(WriterLockError::Busy)));
        assert!(busy.ours.borrow().is_empty(), "locks left after a refusal");
        // A qemu reader that shares writing (share-rw=on) does not conflict.
        let reader = Fake {
            ours: RefCell::default(),
            others: [PERM_BASE + CONSISTENT_READ].into_iter().collect(),
        };
        lock_writer(&reader).unwrap();
    }

    #[test]
    fn parents_refuse_writers_and_share_with_each_other() {
        let first = Fake {
            ours: RefCell::default(),
            others: BTreeSet::new(),
        };
        lock_parent(&first).unwrap();
        // qemu's backing-file locks exactly.
        assert_eq!(
            first.ours.borrow().iter().copied().collect::<Vec<_>>(),
            [100, 201, 203]
        );
        // A second child of the same parent.
        let second = Fake {
            ours: RefCell::default(),
            others: first.ours.borrow().clone(),
        };
        lock_parent(&second).unwrap();
        // A writer of the parent while a child is open: refused, and told why.
        let writer = Fake {
            ours: RefCell::default(),
            others: first.ours.borrow().clone(),
        };
        assert!(matches!(lock_writer(&writer), Err(WriterLockError::Busy)));
        assert_eq!(refusal(&writer), Some(IN_USE_MESSAGE));
        // A parent that someone writes: refused.
        let written = Fake {
            ours: RefCell::default(),
            others: WRITER_LOCKS.into_iter().collect(),
        };
        assert!(matches!(lock_parent(&written), Err(WriterLockError::Busy)));
        assert!(
            written.ours.borrow().is_empty(),
            "locks left after a refusal"
        );
        assert_eq!(refusal(&written), Some(BUSY_MESSAGE));
        let free = Fake {
            ours: RefCell::default(),
            others: BTreeSet::new(),
        };
        assert_eq!(refusal(&free), None);
    }
}
