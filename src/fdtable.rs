//! The fd table: fd -> open file (the fd context shared by dup'ed fds).
//!
//! A lookup for an fd that is not an image is one atomic load and takes no
//! lock. A lookup of an image fd takes no lock either: each slot is one word
//! holding a pointer to its entry (low 48 bits) and the number of readers
//! using that entry (high 16 bits). A reader adds itself with one
//! compare-and-swap that also proves the pointer is still there, and leaves
//! with another ([`FdRef`]). Whoever takes an entry out of its slot (close,
//! dup2 over it, a stale entry dropped) swaps the whole word, so it learns how
//! many readers were inside and hands that count to the entry; the last of
//! those readers to leave frees it (split reference counting). Nobody waits
//! for anybody: a signal handler doing image I/O, or closing the very fd the
//! interrupted code is reading, cannot deadlock, and a fork can happen at any
//! moment (a reader that does not exist in the child only leaks its entry
//! there). Slots are one cache line each, so threads using different fds do
//! not share lines.
//!
//! Entries can go stale behind our back (a close inside libc, a raw close
//! syscall) and the number be reused for another file: every use validates the
//! fd and drops a stale entry. Two checks, by cost:
//! - exact ([`lookup`]): device and inode of the dummy memfd (an fstat, about
//!   0.3 us); for everything but the data path.
//! - signature ([`lookup_io`]): the dummy's file offset is `base + position`,
//!   with a random per-open `base` of 2^48 to 2^63 (one lseek, as cheap as a
//!   syscall gets). Pipes, sockets and devices fail the lseek; a regular file
//!   matches only if something seeked it into this open's window, which ext4
//!   (16 TiB files) cannot and other programs do not do by accident. read,
//!   write, pread, pwrite and their variants use it: half the cost of a
//!   random 4 KiB read through the library was the fstat.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use libc::c_int;

use crate::images::ImageObject;
use crate::sys;

/// Fds at or above this number are never images: opening an image there fails
/// with EMFILE. 64 Ki cache lines of address space, touched only where used.
pub const MAX_FDS: usize = 1 << 16;

/// One fd's word: entry pointer | readers << ENTRY_BITS (0: not mapped).
#[repr(align(64))]
struct Slot(AtomicU64);

/// User-space pointers fit in 48 bits (x86-64 and aarch64 with 4-level page
/// tables; an entry that does not fit is refused, not truncated).
const ENTRY_BITS: u32 = 48;
const ENTRY_MASK: u64 = (1 << ENTRY_BITS) - 1;
const ONE_READER: u64 = 1 << ENTRY_BITS;
const MAX_READERS: u64 = u64::MAX >> ENTRY_BITS;

static SLOTS: [Slot; MAX_FDS] = [const { Slot(AtomicU64::new(0)) }; MAX_FDS];
/// The library's own fds (containers, parents): one bit each.
static INTERNAL: [AtomicU64; MAX_FDS / 64] = [const { AtomicU64::new(0) }; MAX_FDS / 64];
/// At least the number of mapped slots (raised before a slot is filled,
/// lowered after it is emptied): the whole-table scans of exec and
/// closefrom/close_range cost nothing in a process without images.
static MAPPED: AtomicUsize = AtomicUsize::new(0);
/// One more than the highest fd ever mapped: where the scans stop.
static END: AtomicUsize = AtomicUsize::new(0);

/// What a slot points to: one mapping of an fd (dup'ed fds have one each,
/// sharing the open file).
struct Entry {
    of: Arc<OpenFile>,
    /// Readers still inside after the entry left its slot, as handed over by
    /// the one who took it out, minus those who have left since.
    pending: AtomicI64,
}

/// One open of an image (or partition): what dup'ed fds share. The file offset
/// is not here: it lives in the dummy memfd, so the kernel shares it across
/// dup, fork and exec.
pub struct OpenFile {
    /// Identity of the dummy memfd.
    pub dummy_dev: u64,
    pub dummy_ino: u64,
    /// O_RDONLY, O_WRONLY or O_RDWR as the caller asked.
    pub access: c_int,
    /// O_SYNC / O_DSYNC: flush after every write.
    pub sync: bool,
    pub image: Arc<ImageObject>,
    /// The window on the disk: a partition, or the whole disk.
    pub start: u64,
    pub len: u64,
    /// Partition number, 0 for the whole disk.
    pub partition: u32,
    /// Serialises read-modify-update of the shared file offset between threads.
    pub offset_lock: Mutex<()>,
    /// The dummy's offset is `offset_base + position`; 0 when the window is
    /// too large for a signature (then every use is checked exactly).
    pub offset_base: u64,
}

/// Positions below 2^48 (256 TiB); the signature is the 15 bits above.
const POSITION_BITS: u32 = 48;
const TAGS: u64 = (1 << (63 - POSITION_BITS)) - 1;

/// A random offset base for a new dummy of a window of `len` bytes.
pub fn new_offset_base(len: u64) -> u64 {
    if len >= 1 << POSITION_BITS {
        return 0;
    }
    let r = sys::random_u64() ^ (sys::pid() as u64).rotate_left(32) ^ (&MAPPED as *const _ as u64);
    (r % TAGS + 1) << POSITION_BITS
}

/// The base of an inherited dummy at raw offset `raw` (0 if it has none).
pub fn inherited_offset_base(raw: i64, len: u64) -> u64 {
    let raw = raw as u64;
    let base = raw & !((1 << POSITION_BITS) - 1);
    if len < 1 << POSITION_BITS && (1..=TAGS).contains(&(raw >> POSITION_BITS)) && raw - base <= len
    {
        base
    } else {
        0
    }
}

impl OpenFile {
    pub fn readable(&self) -> bool {
        self.access != libc::O_WRONLY
    }
    pub fn writable(&self) -> bool {
        self.access != libc::O_RDONLY
    }
    /// Whether `raw`, an offset of the fd, carries this open's signature.
    pub fn signed(&self, raw: i64) -> bool {
        self.offset_base != 0
            && (raw as u64)
                .checked_sub(self.offset_base)
                .is_some_and(|pos| pos <= self.len)
    }
    /// The caller's file position, from the dummy's offset.
    pub fn position(&self, fd: c_int) -> Result<u64, c_int> {
        let raw = sys::lseek(fd, 0, libc::SEEK_CUR).map_err(|e| crate::errno::from_io(&e))?;
        (raw as u64).checked_sub(self.offset_base).ok_or(libc::EIO)
    }
    /// Sets the caller's file position `pos` in the dummy's offset.
    pub fn set_position(&self, fd: c_int, pos: u64) -> Result<(), c_int> {
        sys::lseek(fd, (self.offset_base + pos) as i64, libc::SEEK_SET)
            .map(drop)
            .map_err(|e| crate::errno::from_io(&e))
    }
}

fn slot(fd: c_int) -> Option<&'static Slot> {
    SLOTS.get(usize::try_from(fd).ok()?)
}

/// Whether any fd is mapped (batch calls skip their per-fd checks if not).
#[inline]
pub fn any_mapped() -> bool {
    MAPPED.load(Ordering::Relaxed) != 0
}

/// The fast check: might `fd` be an image? False for every other fd.
#[inline]
pub fn is_mapped(fd: c_int) -> bool {
    match slot(fd) {
        Some(s) => s.0.load(Ordering::Relaxed) != 0,
        None => false,
    }
}

/// A counted use of the open file mapped to an fd: while it lives, the entry
/// it came from is not freed (see the module docs). Dropping it is one
/// compare-and-swap, or, if the entry left its slot meanwhile, one atomic
/// decrement (and the free, for the last reader).
pub struct FdRef {
    slot: &'static Slot,
    entry: NonNull<Entry>,
}

impl FdRef {
    /// A reference of its own to the open file, to map another fd to it.
    pub fn arc(&self) -> Arc<OpenFile> {
        self.entry().of.clone()
    }
    fn entry(&self) -> &Entry {
        // SAFETY: our reader count keeps the entry allocated (module docs).
        unsafe { self.entry.as_ref() }
    }
    fn addr(&self) -> u64 {
        self.entry.as_ptr() as u64
    }
}

impl std::ops::Deref for FdRef {
    type Target = OpenFile;
    fn deref(&self) -> &OpenFile {
        &self.entry().of
    }
}

impl Drop for FdRef {
    fn drop(&mut self) {
        let mut cur = self.slot.0.load(Ordering::Relaxed);
        // An entry is never put back into a slot, and its address cannot be
        // reused while we count in it: same address, same entry.
        while cur & ENTRY_MASK == self.addr() {
            match self.slot.0.compare_exchange_weak(
                cur,
                cur - ONE_READER,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
        // Taken out with us counted in it: settle with whoever took it.
        if self.entry().pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            // SAFETY: the last reader of an entry out of its slot frees it.
            drop(unsafe { Box::from_raw(self.entry.as_ptr()) });
        }
    }
}

/// The open file behind `fd`, if `fd` is still the dummy it was mapped to
/// (exact check).
pub fn lookup(fd: c_int) -> Option<FdRef> {
    let of = entry(fd)?;
    validated(fd, of, false)
}

/// [`lookup`] for the data path: the offset signature, where the open has one.
pub fn lookup_io(fd: c_int) -> Option<FdRef> {
    let of = entry(fd)?;
    validated(fd, of, true)
}

/// [`lookup_io`] for read, write, readv and writev, which read the offset
/// anyway: they check its signature themselves ([`OpenFile::signed`]) and
/// call [`drop_stale`] when it fails. Opens without one are checked here.
pub fn lookup_stream(fd: c_int) -> Option<FdRef> {
    let of = entry(fd)?;
    if of.offset_base != 0 {
        return Some(of);
    }
    validated(fd, of, false)
}

/// Enters the entry in `fd`'s slot as a reader: no lock, no wait.
fn entry(fd: c_int) -> Option<FdRef> {
    let s = slot(fd)?;
    let mut cur = s.0.load(Ordering::Acquire);
    loop {
        let p = NonNull::new((cur & ENTRY_MASK) as *mut Entry)?;
        if cur >> ENTRY_BITS == MAX_READERS {
            // 65535 calls on one fd at once: wait for one to leave.
            sys::sched_yield();
            cur = s.0.load(Ordering::Acquire);
            continue;
        }
        // Succeeds only if the slot still holds p: then p is ours to use.
        match s
            .0
            .compare_exchange_weak(cur, cur + ONE_READER, Ordering::Acquire, Ordering::Acquire)
        {
            Ok(_) => return Some(FdRef { slot: s, entry: p }),
            Err(now) => cur = now,
        }
    }
}

fn validated(fd: c_int, of: FdRef, signature: bool) -> Option<FdRef> {
    let valid = if signature && of.offset_base != 0 {
        sys::lseek(fd, 0, libc::SEEK_CUR).is_ok_and(|raw| of.signed(raw))
    } else {
        sys::fstat(fd).is_ok_and(|st| st.st_dev == of.dummy_dev && st.st_ino == of.dummy_ino)
    };
    if valid {
        return Some(of);
    }
    drop_stale(fd, &of);
    None
}

/// Unmaps `fd` after a failed check, unless it was remapped meanwhile.
pub fn drop_stale(fd: c_int, of: &FdRef) {
    let _guard = crate::guard::Guard::enter();
    log::debug!("fd {fd}: stale mapping to {} dropped", of.image.path_str());
    let mut cur = of.slot.0.load(Ordering::Acquire);
    while cur & ENTRY_MASK == of.addr() {
        match of
            .slot
            .0
            .compare_exchange_weak(cur, 0, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                MAPPED.fetch_sub(1, Ordering::Relaxed);
                retire(cur);
                return;
            }
            Err(now) => cur = now,
        }
    }
}

/// An entry taken out of its slot, with the word it had: freed now if no
/// reader was inside, else by the last of them.
fn retire(word: u64) {
    let Some(p) = NonNull::new((word & ENTRY_MASK) as *mut Entry) else {
        return;
    };
    let readers = (word >> ENTRY_BITS) as i64;
    // SAFETY: p is allocated until its readers and we are done with it; each
    // reader's decrement and our hand-over meet in `pending`, and whoever
    // brings it to zero frees it.
    let last = readers == 0
        || unsafe { p.as_ref() }
            .pending
            .fetch_add(readers, Ordering::AcqRel)
            + readers
            == 0;
    if last {
        // SAFETY: as above; nobody else can reach p any more.
        drop(unsafe { Box::from_raw(p.as_ptr()) });
    }
}

/// Maps `fd` to `of`, replacing any earlier mapping.
pub fn insert(fd: c_int, of: Arc<OpenFile>) -> bool {
    let Some(s) = slot(fd) else { return false };
    let e = Box::into_raw(Box::new(Entry {
        of,
        pending: AtomicI64::new(0),
    }));
    if e as u64 & !ENTRY_MASK != 0 {
        // SAFETY: e came from Box::into_raw just now.
        drop(unsafe { Box::from_raw(e) });
        log::error!("fd {fd}: entry address above 2^48; the image stays unmapped");
        return false;
    }
    END.fetch_max(fd as usize + 1, Ordering::Relaxed);
    MAPPED.fetch_add(1, Ordering::Relaxed);
    let old = s.0.swap(e as u64, Ordering::AcqRel);
    if old != 0 {
        MAPPED.fetch_sub(1, Ordering::Relaxed);
    }
    retire(old);
    true
}

/// Unmaps `fd`, returning what it was mapped to.
pub fn remove(fd: c_int) -> Option<Arc<OpenFile>> {
    let s = slot(fd)?;
    if s.0.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let old = s.0.swap(0, Ordering::AcqRel);
    let p = NonNull::new((old & ENTRY_MASK) as *mut Entry)?;
    MAPPED.fetch_sub(1, Ordering::Relaxed);
    // SAFETY: out of the slot but not yet retired: still allocated.
    let of = unsafe { p.as_ref() }.of.clone();
    retire(old);
    Some(of)
}

/// Unmaps every fd in `lo..=hi` (after close_range or closefrom).
pub fn remove_range(lo: c_int, hi: c_int) {
    if MAPPED.load(Ordering::Relaxed) == 0 {
        return;
    }
    let lo = lo.max(0) as usize;
    let end = (hi.max(0) as usize + 1).min(END.load(Ordering::Relaxed));
    for (fd, s) in SLOTS.iter().enumerate().take(end).skip(lo) {
        if s.0.load(Ordering::Relaxed) != 0 {
            drop(remove(fd as c_int));
        }
    }
}

/// An fd of the library's own (a container or parent file). The number can
/// change: when a program dup2()s onto it, the file moves to another number
/// first, so the library keeps its file and the program gets the number.
pub struct InternalFd(Arc<AtomicI32>);

static OWNERS: Mutex<Vec<Arc<AtomicI32>>> = Mutex::new(Vec::new());

pub(crate) fn lock_owners() -> std::sync::MutexGuard<'static, Vec<Arc<AtomicI32>>> {
    OWNERS.lock().unwrap_or_else(|e| e.into_inner())
}

impl InternalFd {
    pub fn new(fd: c_int) -> InternalFd {
        let cell = Arc::new(AtomicI32::new(fd));
        lock_owners().push(cell.clone());
        mark_internal(fd, true);
        InternalFd(cell)
    }
    #[inline]
    pub fn get(&self) -> c_int {
        self.0.load(Ordering::Acquire)
    }
    /// Points this handle at `fd` (ours), closing the file it had.
    pub fn replace(&self, fd: c_int) {
        let _owners = lock_owners();
        mark_internal(fd, true);
        let old = self.0.swap(fd, Ordering::AcqRel);
        mark_internal(old, false);
        sys::close(old);
    }
}

impl Drop for InternalFd {
    fn drop(&mut self) {
        let mut owners = lock_owners();
        owners.retain(|c| !Arc::ptr_eq(c, &self.0));
        let fd = self.get();
        mark_internal(fd, false);
        sys::close(fd);
    }
}

/// Moves the library's file at `fd` to another number, so that `fd` can be
/// taken by the program (dup2 onto it). Returns false if that failed.
pub fn relocate_internal(fd: c_int) -> bool {
    let owners = lock_owners();
    let Some(cell) = owners.iter().find(|c| c.load(Ordering::Acquire) == fd) else {
        return true;
    };
    let Ok(moved) = sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, fd as libc::c_long + 1) else {
        return false;
    };
    let moved = moved as c_int;
    mark_internal(moved, true);
    cell.store(moved, Ordering::Release);
    mark_internal(fd, false);
    sys::close(fd);
    log::debug!("internal fd {fd} moved to {moved}");
    true
}

pub fn mark_internal(fd: c_int, on: bool) {
    let Ok(i) = usize::try_from(fd) else { return };
    if let Some(w) = INTERNAL.get(i / 64) {
        if on {
            w.fetch_or(1 << (i % 64), Ordering::Relaxed);
        } else {
            w.fetch_and(!(1 << (i % 64)), Ordering::Relaxed);
        }
    }
}

#[inline]
pub fn is_internal(fd: c_int) -> bool {
    let Ok(i) = usize::try_from(fd) else {
        return false;
    };
    INTERNAL
        .get(i / 64)
        .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
}

/// Dummies that an exec would hand to the new program (not close-on-exec).
pub fn inheritable_dummies() -> usize {
    if MAPPED.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    let mut n = 0;
    let end = END.load(Ordering::Relaxed);
    for (fd, s) in SLOTS.iter().enumerate().take(end) {
        if s.0.load(Ordering::Relaxed) != 0
            && let Ok(flags) = sys::fcntl(fd as c_int, libc::F_GETFD, 0)
            && flags & libc::FD_CLOEXEC as libc::c_long == 0
        {
            n += 1;
        }
    }
    n
}

/// The library's fds in `lo..=hi`, ascending.
pub fn internal_in(lo: c_int, hi: c_int, out: &mut Vec<c_int>) {
    let lo = lo.max(0) as usize;
    let hi = (hi.max(0) as usize).min(MAX_FDS - 1);
    for (w, word) in INTERNAL
        .iter()
        .enumerate()
        .skip(lo / 64)
        .take(hi / 64 - lo / 64 + 1)
    {
        let mut bits = word.load(Ordering::Relaxed);
        while bits != 0 {
            let fd = w * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if (lo..=hi).contains(&fd) {
                out.push(fd as c_int);
            }
        }
    }
}
