//! Image objects: one per container file (device, inode) in the process,
//! shared by every open of that file and dropped with the last one.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use libc::c_int;

use crate::errno;
use crate::fdtable::{InternalFd, OpenFile};
use crate::shard_lock::ShardedRwLock;
use crate::storage::FdStorage;
use crate::sys;

/// Internal fds are moved to this number or above, away from the numbers
/// programs expect to get (and dup2 onto).
const INTERNAL_FD_FLOOR: c_int = 300;

/// The kernel's default read-ahead, 128 KiB, in 512-byte sectors.
const DEFAULT_READAHEAD: u64 = 256;

pub struct ImageObject {
    /// Device and inode of the container (they change when a snapshot puts a
    /// new file at the path).
    dev: AtomicU64,
    ino: AtomicU64,
    /// Absolute path it was first opened by.
    pub path: CString,
    /// Sharded: every data call takes it shared (see `shard_lock`).
    disk: ShardedRwLock<Arc<vdisk::Disk>>,
    /// Writes hold it shared; a snapshot holds it exclusively, so that no
    /// write lands in the file that is becoming a parent.
    io: ShardedRwLock<()>,
    /// A second fd on the container, for fstat.
    stat_fd: InternalFd,
    /// The writer locks, taken at the first write, by process.
    writer: Mutex<Option<WriterLock>>,
    /// The pid holding them: every write checks it without a lock, so that a
    /// fork while another thread writes cannot leave `writer` locked in the
    /// child (the child's first write takes the slow path and gets EBUSY).
    writer_pid: AtomicI32,
    /// The process whose memory holds this disk's state. A forked child has
    /// a copy, possibly with table updates the parent has not committed yet:
    /// it must never commit them (see [`ImageObject::flush`] and `Drop`).
    owner_pid: AtomicI32,
    /// Read-ahead in 512-byte sectors (BLKRASET/BLKRAGET): emulated, per
    /// image object in this process, as the kernel keeps it per disk.
    pub readahead: AtomicU64,
}

/// Writer locks held on an open file description of our own. After fork the
/// child must take its own: the inherited description is the parent's.
struct WriterLock {
    pid: c_int,
    /// Held for its locks, released when dropped.
    _held: InternalFd,
}

impl ImageObject {
    /// (device, inode) of the container file.
    pub fn id(&self) -> (u64, u64) {
        (
            self.dev.load(Ordering::Acquire),
            self.ino.load(Ordering::Acquire),
        )
    }
    /// Held by every write (see `io`).
    pub fn write_guard(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.io.read()
    }
    /// fsync and friends: commits and syncs the disk. A process that only
    /// holds a forked copy of the disk's state syncs the file and commits
    /// nothing (the owner commits its own updates).
    pub fn flush(&self) -> Result<(), vdisk::Error> {
        self.with_disk(|disk| {
            if self.owner_pid.load(Ordering::Acquire) == sys::pid() {
                disk.flush()
            } else {
                disk.sync_file()
            }
        })
    }

    /// Commits and gives back reserved space (the owner only): before the
    /// process image goes (exec, exit) and at the last close. A failure
    /// leaves the disk dirty, so a later flush or close tries again.
    fn close_disk(&self) -> Result<(), vdisk::Error> {
        if self.owner_pid.load(Ordering::Acquire) != sys::pid() {
            return Ok(());
        }
        self.with_disk(|d| d.close())
    }

    /// The process's last reference is going: [`ImageObject::close_disk`],
    /// and on failure one loud log line naming the image (for exit and
    /// implicit closes it is all the user gets). The disk is then disowned,
    /// so that dropping it does not try (and log) again.
    fn finish(&self, when: &str) -> Result<(), c_int> {
        let Err(e) = self.close_disk() else {
            return Ok(());
        };
        log::error!(
            "{}: committing the image at {when} failed: {e}; data written since the last \
             flush may be lost (fsync before closing reports such errors)",
            self.path_str()
        );
        self.with_disk(|d| d.disown());
        Err(libc::EIO)
    }

    pub fn disk(&self) -> Arc<vdisk::Disk> {
        self.disk.read().clone()
    }
    /// Runs `f` on the current disk, without taking a reference to it (the
    /// data path: a snapshot or an upgrade to read-write waits for `f`).
    pub fn with_disk<R>(&self, f: impl FnOnce(&vdisk::Disk) -> R) -> R {
        f(&self.disk.read())
    }
    pub fn path_str(&self) -> &str {
        self.path.to_str().unwrap_or("<non-UTF-8 path>")
    }
    /// fstat of the container file.
    pub fn container_stat(&self) -> io::Result<libc::stat64> {
        sys::fstat(self.stat_fd.get())
    }
    pub fn container_fd(&self) -> c_int {
        self.stat_fd.get()
    }

    /// Whether this process may write the container file.
    pub fn container_writable(&self) -> bool {
        // SAFETY: faccessat with a NUL-terminated path.
        unsafe {
            crate::sys::syscall!(
                libc::SYS_faccessat,
                libc::AT_FDCWD,
                self.path.as_ptr(),
                libc::W_OK,
            ) == 0
        }
    }

    /// Becomes the one writer of the image (qemu-compatible locks), at the
    /// first write of this process; EBUSY if another process writes it.
    pub fn ensure_writer(&self) -> Result<(), c_int> {
        let pid = sys::pid();
        if self.writer_pid.load(Ordering::Acquire) == pid {
            return Ok(());
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.as_ref().is_some_and(|l| l.pid == pid) {
            self.writer_pid.store(pid, Ordering::Release);
            return Ok(());
        }
        // Forget a lock inherited through fork (closing our copy of its fd
        // leaves the parent's locks in place).
        *w = None;
        let fd = crate::lock::reopen(self.stat_fd.get()).map_err(|e| errno::from_io(&e))?;
        let fd = InternalFd::new(fd);
        if let Err(e) = crate::lock::lock_writer(fd.get()) {
            log::warn!(
                "{}: {}",
                self.path_str(),
                crate::lock::writer_refusal(fd.get())
            );
            return Err(e);
        }
        if self.owner_pid.load(Ordering::Acquire) != pid {
            // A forked child becoming the writer: the parent may have changed
            // the image since the fork, so its metadata is read afresh.
            let disk = reopen_writable(&self.path, self.id()).map_err(|e| {
                log::warn!("{}: reopening for writing: {e}", self.path_str());
                errno::from_vdisk(&e)
            })?;
            let old = self.disk.replace(Arc::new(disk));
            old.disown();
            self.owner_pid.store(pid, Ordering::Release);
        }
        *w = Some(WriterLock { pid, _held: fd });
        self.writer_pid.store(pid, Ordering::Release);
        Ok(())
    }

    /// LIBVHD_IO_TEST: turns the image into a differencing child in place.
    /// The current file is renamed to `<stem>.<timestamp>.<ext>` and becomes
    /// the parent; a new child takes its path; every fd moves to the chain.
    pub fn snapshot_in_place(&self) -> Result<(), String> {
        let _quiet = self.io.write_all();
        let old = self.disk();
        if !old.is_writable() {
            return Ok(());
        }
        old.flush().map_err(|e| format!("flush: {e}"))?;
        // Reserved space is given back while the file is still ours: once it
        // is a parent, nothing writes it.
        old.close().map_err(|e| format!("close: {e}"))?;
        let path = self.path.to_bytes();
        let parent = parent_name(path);
        let parent_c = CString::new(parent.clone()).map_err(|e| e.to_string())?;
        sys::renameat(&self.path, &parent_c)
            .map_err(|e| format!("rename to {}: {e}", String::from_utf8_lossy(&parent)))?;
        let mode = sys::fstat(self.stat_fd.get())
            .map(|st| st.st_mode & 0o7777)
            .unwrap_or(0o644);
        let undo = |why: String| {
            let _ = sys::unlinkat(&self.path);
            let _ = sys::renameat(&parent_c, &self.path);
            why
        };
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOCTTY;
        let child_fd = sys::openat(libc::AT_FDCWD, &self.path, flags, mode)
            .map_err(|e| undo(format!("create child: {e}")))?;
        let child = FdStorage::new(move_high(child_fd), true);
        let parent_fd = sys::openat(
            libc::AT_FDCWD,
            &parent_c,
            libc::O_RDONLY | libc::O_CLOEXEC,
            0,
        )
        .map_err(|e| undo(format!("open parent: {e}")))?;
        let parent_storage = FdStorage::new(move_high(parent_fd), false);
        vdisk::snapshot(
            Path::new(OsStr::from_bytes(&parent)),
            &parent_storage,
            &child,
            path_of(&self.path),
        )
        .map_err(|e| undo(format!("snapshot: {e}")))?;
        drop(parent_storage);
        let stat_fd = sys::fcntl(
            child.fd(),
            libc::F_DUPFD_CLOEXEC,
            INTERNAL_FD_FLOOR as libc::c_long,
        )
        .map_err(|e| format!("dup: {e}"))? as c_int;
        let st = sys::fstat(stat_fd).map_err(|e| format!("fstat: {e}"))?;
        // The writer locks are on the old file, now the parent: the new
        // chain's parent lock would find them in its way. Writes wait for
        // `io`; the next one takes new locks on the child.
        self.writer_pid.store(0, Ordering::Release);
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let disk = vdisk::open_disk(
            Box::new(child),
            path_of(&self.path),
            vdisk::OpenOptions { writable: true },
            &RawParentOpener,
        )
        .map(with_options)
        .map_err(|e| format!("reopen: {e}"))?;
        self.disk.replace(Arc::new(disk));
        self.stat_fd.replace(stat_fd);
        self.dev.store(st.st_dev, Ordering::Release);
        self.ino.store(st.st_ino, Ordering::Release);
        log::warn!(
            "snapshot: {} is now a child of {}",
            self.path_str(),
            String::from_utf8_lossy(&parent)
        );
        Ok(())
    }

    /// Whether another process holds the image for writing.
    pub fn has_other_writer(&self) -> bool {
        if self.writer_pid.load(Ordering::Acquire) == sys::pid() {
            return false;
        }
        crate::lock::other_writer(self.stat_fd.get())
    }
}

static IMAGES: Mutex<Vec<Weak<ImageObject>>> = Mutex::new(Vec::new());

pub(crate) fn registry() -> std::sync::MutexGuard<'static, Vec<Weak<ImageObject>>> {
    IMAGES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Moves an fd of ours out of the way of the program's fds, close-on-exec.
fn move_high(fd: c_int) -> c_int {
    match sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, INTERNAL_FD_FLOOR as libc::c_long) {
        Ok(high) => {
            sys::close(fd);
            high as c_int
        }
        Err(_) => fd,
    }
}

fn path_of(p: &CStr) -> &Path {
    Path::new(OsStr::from_bytes(p.to_bytes()))
}

/// What opening a path as an image found.
pub enum Opened {
    Image(Arc<ImageObject>),
    /// Not an image (or not a regular file): the caller passes the call on.
    NotImage,
}

/// Opens (or finds) the image at absolute path `abs`, for writing if `writable`.
/// Errors are errno values, already logged.
pub fn open(abs: &CStr, writable: bool) -> Result<Opened, c_int> {
    if !crate::config::allowed(abs.to_bytes()) {
        return Ok(Opened::NotImage);
    }
    let mode = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    // If we cannot open it, the real call decides (O_CREAT of a new file,
    // EACCES, ENOENT...): its result is exactly libc's.
    let Ok(fd) = sys::openat(
        libc::AT_FDCWD,
        abs,
        mode | libc::O_CLOEXEC | libc::O_NOCTTY,
        0,
    ) else {
        return Ok(Opened::NotImage);
    };
    let fd = move_high(fd);
    let st = match sys::fstat(fd) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st,
        _ => {
            sys::close(fd);
            return Ok(Opened::NotImage);
        }
    };
    let mut reg = registry();
    reg.retain(|w| w.strong_count() > 0);
    let existing = reg
        .iter()
        .filter_map(Weak::upgrade)
        .find(|o| o.id() == (st.st_dev, st.st_ino));
    if let Some(obj) = &existing
        && (!writable || obj.disk().is_writable())
    {
        sys::close(fd);
        return Ok(Opened::Image(obj.clone()));
    }
    let storage = FdStorage::new(fd, writable);
    match vdisk::probe(&storage) {
        Ok(Some(_)) => {}
        Ok(None) => return Ok(Opened::NotImage),
        Err(e) => {
            log::warn!("{}: cannot probe: {e}", abs.to_string_lossy());
            return Err(errno::from_vdisk(&e));
        }
    }
    let stat_fd = sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, INTERNAL_FD_FLOOR as libc::c_long)
        .map_err(|e| errno::from_io(&e))? as c_int;
    let disk = vdisk::open_disk(
        Box::new(storage.with_read_fds()),
        path_of(abs),
        vdisk::OpenOptions { writable },
        &RawParentOpener,
    )
    .map(with_options);
    let disk = match disk {
        Ok(d) => Arc::new(d),
        Err(e) => {
            sys::close(stat_fd);
            log::warn!("{}: {e}", abs.to_string_lossy());
            return Err(errno::from_vdisk(&e));
        }
    };
    log::debug!(
        "opened {}: {}",
        abs.to_string_lossy(),
        disk.layers()[0].describe()
    );
    if let Some(obj) = existing {
        // A read-write open of an image opened read-only so far: every fd of
        // it moves to the writable disk, so all share one metadata cache.
        sys::close(stat_fd);
        let old = obj.disk.replace(disk);
        if obj.owner_pid.load(Ordering::Acquire) != sys::pid() {
            old.disown();
        }
        obj.owner_pid.store(sys::pid(), Ordering::Release);
        return Ok(Opened::Image(obj));
    }
    let obj = Arc::new(ImageObject {
        dev: AtomicU64::new(st.st_dev),
        ino: AtomicU64::new(st.st_ino),
        path: abs.to_owned(),
        disk: ShardedRwLock::new(disk),
        io: ShardedRwLock::new(()),
        stat_fd: InternalFd::new(stat_fd),
        writer: Mutex::new(None),
        writer_pid: AtomicI32::new(0),
        owner_pid: AtomicI32::new(sys::pid()),
        readahead: AtomicU64::new(DEFAULT_READAHEAD),
    });
    reg.push(Arc::downgrade(&obj));
    Ok(Opened::Image(obj))
}

/// `<dir>/<stem>.<seconds>.<nanoseconds>.<ext>` for a snapshot's parent.
fn parent_name(path: &[u8]) -> Vec<u8> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { crate::sys::syscall!(libc::SYS_clock_gettime, libc::CLOCK_REALTIME, &raw mut ts) };
    let name_at = path.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
    let (stem, ext) = match path[name_at..].iter().rposition(|&b| b == b'.') {
        Some(dot) => (&path[..name_at + dot], &path[name_at + dot..]),
        None => (path, &b""[..]),
    };
    let mut out = stem.to_vec();
    out.extend_from_slice(format!(".{}.{:09}", ts.tv_sec, ts.tv_nsec).as_bytes());
    out.extend_from_slice(ext);
    out
}

/// Snapshots every open writable image (LIBVHD_IO_TEST, on SIGCONT).
pub fn snapshot_all() {
    let objects: Vec<_> = registry().iter().filter_map(Weak::upgrade).collect();
    for obj in objects {
        if let Err(e) = obj.snapshot_in_place() {
            log::warn!("snapshot of {} failed: {e}", obj.path_str());
        }
    }
}

/// Flushes every open image (sync()), read-only ones too: they sync their
/// file, which another process may have written.
pub fn flush_all() {
    let objects: Vec<_> = registry().iter().filter_map(Weak::upgrade).collect();
    for obj in objects {
        if let Err(e) = obj.flush() {
            log::warn!("sync {}: {e}", obj.path_str());
        }
    }
}

/// Before exec or exit: every image this process owns commits what it keeps
/// in memory and gives back reserved space, as a last close would. Nobody is
/// there to tell of a failure but the log: each one is an error line naming
/// the image.
pub fn close_all(when: &str) {
    let objects: Vec<_> = registry().iter().filter_map(Weak::upgrade).collect();
    for obj in objects {
        if let Err(e) = obj.close_disk() {
            log::error!(
                "{}: committing the image at {when} failed: {e}; data written since the last \
                 flush may be lost",
                obj.path_str()
            );
        }
    }
}

/// What `close` does with the fd context it took out of the fd table: if
/// that was the process's last reference to its image (the fd context is
/// shared by dup'ed fds, the image by every open of the container), the
/// image is committed and closed here, and a failure is `EIO` for the
/// caller, as a block device's last close would report a failed write-back.
/// Otherwise the last reference goes elsewhere (another fd's close, or a
/// call still running on this fd) and is committed there.
pub fn release(of: Arc<OpenFile>) -> Result<(), c_int> {
    let Some(of) = Arc::into_inner(of) else {
        return Ok(());
    };
    let Some(image) = Arc::into_inner(of.image) else {
        return Ok(());
    };
    image.finish("its last close")
}

/// The last reference: commits (logging a failure, see `finish`), unless
/// this is a forked copy of a disk, which is dropped without committing.
impl Drop for ImageObject {
    fn drop(&mut self) {
        if self.owner_pid.load(Ordering::Acquire) != sys::pid() {
            self.disk.read().disown();
            return;
        }
        let _ = self.finish("its last close");
    }
}

/// Opens the image at `abs` again, writable, if it is still the file
/// `(dev, ino)`.
fn reopen_writable(abs: &CStr, id: (u64, u64)) -> vdisk::Result<vdisk::Disk> {
    let fd = sys::openat(
        libc::AT_FDCWD,
        abs,
        libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOCTTY,
        0,
    )?;
    let fd = move_high(fd);
    let storage = FdStorage::new(fd, true);
    let st = sys::fstat(fd)?;
    if (st.st_dev, st.st_ino) != id {
        return Err(vdisk::Error::unsupported(
            "the image was replaced by another file since it was opened",
        ));
    }
    vdisk::open_disk(
        Box::new(storage.with_read_fds()),
        path_of(abs),
        vdisk::OpenOptions { writable: true },
        &RawParentOpener,
    )
    .map(with_options)
}

/// The disk options the environment sets (LIBVHD_IO_PUNCH_HOLES).
fn with_options(disk: vdisk::Disk) -> vdisk::Disk {
    disk.with_punch_holes(crate::config::punch_holes())
}

/// Whether the regular file at `abs` is an image (for stat on a path).
pub fn is_image(abs: &CStr, st_dev: u64, st_ino: u64) -> bool {
    if !crate::config::allowed(abs.to_bytes()) {
        return false;
    }
    if registry()
        .iter()
        .filter_map(Weak::upgrade)
        .any(|o| o.id() == (st_dev, st_ino))
    {
        return true;
    }
    let Ok(fd) = sys::openat(
        libc::AT_FDCWD,
        abs,
        libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY,
        0,
    ) else {
        return false;
    };
    let storage = FdStorage::new(fd, false);
    matches!(vdisk::probe(&storage), Ok(Some(_)))
}

/// Opens parent images: read-only, regular files only, never a hook.
struct RawParentOpener;

impl vdisk::ParentOpener for RawParentOpener {
    fn open_parent(&self, path: &Path) -> io::Result<Box<dyn vdisk::Storage>> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let fd = move_high(sys::openat(
            libc::AT_FDCWD,
            &c,
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY,
            0,
        )?);
        let storage = FdStorage::new(fd, false);
        let st = sys::fstat(fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(Box::new(storage.with_read_fds()))
    }

    /// VMDK extent files, with the access mode of the image's open.
    fn open_extent(&self, path: &Path, writable: bool) -> io::Result<Box<dyn vdisk::Storage>> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mode = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        let fd = move_high(sys::openat(
            libc::AT_FDCWD,
            &c,
            mode | libc::O_CLOEXEC | libc::O_NOCTTY,
            0,
        )?);
        let storage = FdStorage::new(fd, writable);
        let st = sys::fstat(fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(Box::new(storage))
    }

    fn search_dirs(&self) -> Vec<std::path::PathBuf> {
        crate::config::vdi_path()
            .iter()
            .map(|d| Path::new(OsStr::from_bytes(d)).to_path_buf())
            .collect()
    }
}
