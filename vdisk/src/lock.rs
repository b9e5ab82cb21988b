//! The inter-process image lock protocol, compatible with qemu's
//! (block/file-posix.c, raw_apply_lock_bytes / raw_check_lock_bytes): shared
//! OFD locks on byte 100 + i for each permission i a user holds, and on byte
//! 200 + i for each permission it does not share. Permission bits: 0
//! consistent read, 1 write, 2 write-unchanged, 3 resize.
//!
//! A writer holds read, write and resize and shares neither write nor resize,
//! exactly like a qemu writer of a format image, so a running qemu, the
//! preload library and the nbdkit plugin refuse each other as second writers.
//!
//! A reader ([`lock_reader`]) holds consistent read and shares neither write
//! nor resize, as qemu locks the file of an image it opens read-only (its
//! format layer needs the metadata to stay put: `qemu-img convert`, `info`,
//! the backing files of a running VM). Readers share with readers and refuse
//! writers, and writers refuse them. The `vhdio` commands that read a chain
//! take it on every layer; the preload library's readers of an image take no
//! lock (a program reading an image does not block a writer; its cached
//! metadata may then be stale), more lenient than qemu.
//!
//! Parents are different: a child's data is only correct over the parent it
//! was made on, so a parent written under a live child corrupts the child's
//! view for good. Every parent the library, the plugin or a `vhdio` command
//! opens holds the reader locks, qemu's backing-file locks (bytes 100, 201,
//! 203), which refuse writers of the parent while any child is open and are
//! themselves refused while the parent has a writer. They are shared, so any
//! number of children of one base (a golden image) open at once.
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
/// Bytes a reader locks: consistent read held, write and resize denied.
const READER_LOCKS: [u64; 3] = [
    PERM_BASE + CONSISTENT_READ,
    SHARED_BASE + WRITE,
    SHARED_BASE + RESIZE,
];
/// Bytes whose lock by someone else conflicts with a reader: someone
/// denying consistent reads, or holding write or resize.
const READER_CONFLICTS: [u64; 3] = [
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

/// Why the writer (or reader) locks could not be taken.
#[derive(Debug)]
pub enum WriterLockError {
    /// Another process (or qemu) uses the image in a conflicting way: for a
    /// writer, someone writes or reads it ([`holder`] tells which); for a
    /// reader, someone writes it.
    Busy,
    /// The lock call itself failed.
    Io(io::Error),
}

/// The message for [`WriterLockError::Busy`] of a writer, when another
/// writer holds the image.
pub const BUSY_MESSAGE: &str = "another process is writing this image; refusing a second writer";
/// The message for [`WriterLockError::Busy`] of a writer, when readers
/// hold the image: children of it are open (it is their parent), or qemu or
/// a `vhdio` command reads it.
pub const READ_BUSY_MESSAGE: &str = "another process reads this image and refuses writers: it is the \
     parent of an open differencing image (a parent must not change under its children), or qemu \
     or vhdio convert, compare, map, info or check reads it; refusing to write it";
/// The message for [`WriterLockError::Busy`] of a reader.
pub const WRITTEN_MESSAGE: &str = "another process is writing this image; refusing to read it";
/// The message for a parent that another process writes.
pub const PARENT_BUSY_MESSAGE: &str = "another process is writing this image, which is the parent \
     of the image being opened; refusing to open a child over a changing parent";

/// Who holds the image in a way that refuses others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Nobody (or only users that share everything).
    Nobody,
    /// A writer (qemu, the preload library, nbdkit, a `vhdio` command).
    Writer,
    /// Readers that refuse writers (qemu, `vhdio convert` ...).
    Readers,
}

/// Why a writer is refused, from the locks others hold: [`BUSY_MESSAGE`]
/// when another process writes the image, [`READ_BUSY_MESSAGE`] when only
/// readers refusing writers hold it. `None`: nothing keeps a writer out.
pub fn refusal(locks: &dyn ByteLocks) -> Option<&'static str> {
    match holder(locks) {
        Holder::Writer => Some(BUSY_MESSAGE),
        Holder::Readers => Some(READ_BUSY_MESSAGE),
        Holder::Nobody => None,
    }
}

/// Who (other than `locks` itself) holds the image.
pub fn holder(locks: &dyn ByteLocks) -> Holder {
    if READER_CONFLICTS.iter().any(|&b| locks.locked_by_other(b)) {
        Holder::Writer
    } else if WRITER_CONFLICTS.iter().any(|&b| locks.locked_by_other(b)) {
        Holder::Readers
    } else {
        Holder::Nobody
    }
}

/// Whether another process (or qemu) writes the image, or reads it refusing
/// writers: whether a writer would be refused.
pub fn other_writer(locks: &dyn ByteLocks) -> bool {
    WRITER_CONFLICTS.iter().any(|&b| locks.locked_by_other(b))
}

/// Takes `bytes`, then checks `conflicts`, as qemu does: two racing users
/// both see the other. On any failure the locks are released.
fn take(locks: &dyn ByteLocks, bytes: &[u64], conflicts: &[u64]) -> Result<(), WriterLockError> {
    let release = || bytes.iter().for_each(|&b| locks.unlock(b));
    for &b in bytes {
        if let Err(e) = locks.lock_shared(b) {
            release();
            // A conflicting exclusive lock (not qemu's scheme) also means busy.
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::PermissionDenied => {
                    WriterLockError::Busy
                }
                _ => WriterLockError::Io(e),
            });
        }
    }
    if conflicts.iter().any(|&b| locks.locked_by_other(b)) {
        release();
        return Err(WriterLockError::Busy);
    }
    Ok(())
}

/// Takes the writer locks, then checks for conflicts (another writer, or
/// readers). On any failure the locks are released.
pub fn lock_writer(locks: &dyn ByteLocks) -> Result<(), WriterLockError> {
    take(locks, &WRITER_LOCKS, &WRITER_CONFLICTS)
}

/// Releases the writer locks.
pub fn unlock_writer(locks: &dyn ByteLocks) {
    for &b in &WRITER_LOCKS {
        locks.unlock(b);
    }
}

/// Takes the reader locks (qemu's read-only open), then checks for a
/// writer. On any failure the locks are released.
pub fn lock_reader(locks: &dyn ByteLocks) -> Result<(), WriterLockError> {
    take(locks, &READER_LOCKS, &READER_CONFLICTS)
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
    fn readers_share_and_refuse_writers() {
        let first = Fake {
            ours: RefCell::default(),
            others: BTreeSet::new(),
        };
        lock_reader(&first).unwrap();
        // qemu's read-only open: 100, 201, 203.
        let qemu_reader: BTreeSet<u64> = [100, 201, 203].into_iter().collect();
        assert_eq!(*first.ours.borrow(), qemu_reader);
        let seen = Fake {
            ours: RefCell::default(),
            others: qemu_reader,
        };
        assert_eq!(holder(&seen), Holder::Readers);
        lock_reader(&seen).unwrap();
        let writer = Fake {
            ours: RefCell::default(),
            others: first.ours.borrow().clone(),
        };
        assert!(matches!(lock_writer(&writer), Err(WriterLockError::Busy)));
        // A writer refuses readers.
        let written = Fake {
            ours: RefCell::default(),
            others: WRITER_LOCKS.into_iter().collect(),
        };
        assert_eq!(holder(&written), Holder::Writer);
        assert!(matches!(lock_reader(&written), Err(WriterLockError::Busy)));
        assert!(
            written.ours.borrow().is_empty(),
            "locks left after a refusal"
        );
        // Each refusal is told why.
        assert_eq!(refusal(&writer), Some(READ_BUSY_MESSAGE));
        assert_eq!(refusal(&written), Some(BUSY_MESSAGE));
        let free = Fake {
            ours: RefCell::default(),
            others: BTreeSet::new(),
        };
        assert_eq!(refusal(&free), None);
    }
}
