//! Power-loss simulation (issue 15), the CrashMonkey/ALICE way: every write,
//! size change and sync the formats issue on their container is recorded by
//! [`RecordingStorage`]; crash states are rebuilt from the recording (see
//! [`states`]) and each is judged by the oracle in [`oracle`]: the image opens
//! (read-only and writable), its structural checker is clean or reports
//! leaks only, every byte acknowledged by a completed `Disk::flush` reads
//! back, and no byte reads as something never written there.
//!
//! Include with `#[path = "crashsim/mod.rs"] mod crashsim;` (the oracle uses
//! `common` and `vhd_util`, which the including test declares too).
#![allow(dead_code)]

pub mod oracle;
pub mod states;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// One operation on the container file, in issue order.
#[derive(Clone, Debug)]
pub enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Sync,
}

impl Op {
    pub fn describe(&self) -> String {
        match self {
            Op::Write { offset, data } => format!("write {} B @ {offset}", data.len()),
            Op::SetLen(len) => format!("set_len {len}"),
            Op::Sync => "sync".to_string(),
        }
    }
}

/// Applies `op` to a file held in memory (the size grows with a write past the end).
pub fn apply(file: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => {
            let (start, end) = (*offset as usize, *offset as usize + data.len());
            if file.len() < end {
                file.resize(end, 0);
            }
            file[start..end].copy_from_slice(data);
        }
        Op::SetLen(len) => file.resize(*len as usize, 0),
        Op::Sync => {}
    }
}

#[derive(Default)]
struct Recorded {
    /// The file as the page cache holds it (every op applied).
    data: Vec<u8>,
    ops: Vec<Op>,
}

/// The shared recording behind one or more [`RecordingStorage`]s: a test
/// keeps a handle after boxing a storage into a `Disk`.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Recorded>>);

impl Recorder {
    pub fn new(initial: Vec<u8>) -> Recorder {
        Recorder(Arc::new(Mutex::new(Recorded {
            data: initial,
            ops: Vec::new(),
        })))
    }
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// A storage on this recording; several may share it (a writer and a
    /// later read-only opener of the same file).
    pub fn storage(&self, writable: bool) -> RecordingStorage {
        RecordingStorage {
            rec: self.clone(),
            writable,
        }
    }
    pub fn op_count(&self) -> usize {
        self.lock().ops.len()
    }
    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }
    /// The file with every op applied (what a reader sees before any crash).
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }
    /// Syncs among the ops from index `from` on.
    pub fn syncs_since(&self, from: usize) -> usize {
        self.lock().ops[from..]
            .iter()
            .filter(|o| matches!(o, Op::Sync))
            .count()
    }
}

/// A `vdisk::Storage` over memory that records every write, size change and sync.
pub struct RecordingStorage {
    rec: Recorder,
    writable: bool,
}

impl vdisk::Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let r = self.rec.lock();
        let start = offset.min(r.data.len() as u64) as usize;
        let n = buf.len().min(r.data.len() - start);
        buf[..n].copy_from_slice(&r.data[start..start + n]);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "recording storage opened read-only",
            ));
        }
        let op = Op::Write {
            offset,
            data: buf.to_vec(),
        };
        let mut r = self.rec.lock();
        apply(&mut r.data, &op);
        r.ops.push(op);
        Ok(buf.len())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.rec.lock().data.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "recording storage opened read-only",
            ));
        }
        let op = Op::SetLen(len);
        let mut r = self.rec.lock();
        apply(&mut r.data, &op);
        r.ops.push(op);
        Ok(())
    }
    /// Recorded even on a read-only storage: on Linux fdatasync on an
    /// O_RDONLY fd flushes the file (issue 15 item 4).
    fn sync(&self) -> io::Result<()> {
        self.rec.lock().ops.push(Op::Sync);
        Ok(())
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
    /// A hole reads zeros: recorded as a write of zeros, which a crash may
    /// lose, reorder or tear like any write not yet synced.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = (offset + len).min(self.rec.lock().data.len() as u64);
        if offset < end {
            self.write_at(&vec![0u8; (end - offset) as usize], offset)?;
        }
        Ok(())
    }
}

/// The three formats under test, with the names qemu-img uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fmt {
    Vhd,
    Vhdx,
    Vdi,
    /// monolithicSparse.
    Vmdk,
    Qcow2,
}

impl Fmt {
    pub fn qemu(self) -> &'static str {
        match self {
            Fmt::Vhd => "vpc",
            Fmt::Vhdx => "vhdx",
            Fmt::Vdi => "vdi",
            Fmt::Vmdk => "vmdk",
            Fmt::Qcow2 => "qcow2",
        }
    }
    pub fn ext(self) -> &'static str {
        match self {
            Fmt::Vhd => "vhd",
            Fmt::Vhdx => "vhdx",
            Fmt::Vdi => "vdi",
            Fmt::Vmdk => "vmdk",
            Fmt::Qcow2 => "qcow2",
        }
    }
}

/// Creates an empty dynamic image with qemu-img (the independent writer)
/// and returns its bytes. `opts` are extra `-o` options.
pub fn qemu_create(fmt: Fmt, size: &str, opts: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(format!("base.{}", fmt.ext()));
    let base = match fmt {
        Fmt::Vhd => "subformat=dynamic,force_size=on",
        Fmt::Vhdx => "subformat=dynamic",
        Fmt::Vdi => "static=off",
        Fmt::Vmdk => "subformat=monolithicSparse",
        Fmt::Qcow2 => "compat=1.1",
    };
    let o = if opts.is_empty() {
        base.to_string()
    } else {
        format!("{base},{opts}")
    };
    crate::common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            fmt.qemu(),
            "-o",
            &o,
            img.to_str().unwrap(),
            size,
        ],
    );
    std::fs::read(&img).unwrap()
}

/// A write through `Disk::write_at`, and the op count when it began.
#[derive(Clone, Debug)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
    pub op_start: usize,
}

/// A completed `Disk::flush`: the ops it spans and how many disk writes it acknowledges.
#[derive(Clone, Copy, Debug)]
pub struct Flush {
    pub op_start: usize,
    pub op_end: usize,
    pub writes: usize,
    /// Flushed through a read-only open (a later reader: `sync FILE`).
    pub read_only: bool,
}

/// Everything a crash-state run needs from one workload.
pub struct Recording {
    pub name: String,
    pub fmt: Fmt,
    /// Where the image is said to live: parents are looked up from there.
    pub path: PathBuf,
    pub initial_file: Vec<u8>,
    /// The virtual disk before the workload (zeros for a new image).
    pub initial_virtual: Vec<u8>,
    pub ops: Vec<Op>,
    pub writes: Vec<DiskWrite>,
    pub flushes: Vec<Flush>,
}

/// A workload in progress: a `Disk` on a recording storage plus the log of
/// its writes and flushes (the shadow model of what was acknowledged).
pub struct Session {
    pub name: String,
    pub fmt: Fmt,
    path: PathBuf,
    pub rec: Recorder,
    pub disk: vdisk::Disk,
    initial_file: Vec<u8>,
    initial_virtual: Vec<u8>,
    writes: Vec<DiskWrite>,
    flushes: Vec<Flush>,
}

/// Where an image without parent is said to live (nothing is looked up there).
pub fn image_path(fmt: Fmt) -> PathBuf {
    Path::new("/crashsim").join(format!("disk.{}", fmt.ext()))
}

/// The whole virtual disk, read in 1 MiB pieces.
pub fn read_disk(disk: &vdisk::Disk) -> vdisk::Result<Vec<u8>> {
    let mut data = Vec::new();
    read_disk_into(disk, &mut data)?;
    Ok(data)
}

/// [`read_disk`] into a buffer that is reused (no new pages per state).
pub fn read_disk_into(disk: &vdisk::Disk, data: &mut Vec<u8>) -> vdisk::Result<()> {
    data.resize(disk.size() as usize, 0);
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        disk.read_at(chunk, (i as u64) << 20)?;
    }
    Ok(())
}

/// Opens a crash state without copying it: read-only straight on the bytes,
/// writable on an overlay that keeps its writes to itself.
pub fn open_shared(path: &Path, file: Arc<Vec<u8>>, writable: bool) -> vdisk::Result<vdisk::Disk> {
    let len = file.len() as u64;
    vdisk::open_disk(
        Box::new(Overlay {
            base: file,
            writes: Mutex::new((len, Vec::new())),
            writable,
        }),
        path,
        vdisk::OpenOptions { writable },
        &vdisk::StdParentOpener,
    )
}

/// The overlay's file length and its writes, (offset, data) in order.
type OverlayWrites = (u64, Vec<(u64, Vec<u8>)>);

/// Shared bytes plus the writes made on top of them.
struct Overlay {
    base: Arc<Vec<u8>>,
    writes: Mutex<OverlayWrites>,
    writable: bool,
}

impl vdisk::Storage for Overlay {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let w = self.writes.lock().unwrap();
        let n = (w.0.saturating_sub(offset)).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        let inside = (self.base.len() as u64)
            .saturating_sub(offset)
            .min(n as u64) as usize;
        if inside > 0 {
            buf[..inside].copy_from_slice(&self.base[offset as usize..offset as usize + inside]);
        }
        buf[inside..].fill(0);
        for (o, d) in &w.1 {
            let (s, e) = (
                (*o).max(offset),
                (*o + d.len() as u64).min(offset + n as u64),
            );
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
            }
        }
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"));
        }
        let mut w = self.writes.lock().unwrap();
        w.0 = w.0.max(offset + buf.len() as u64);
        w.1.push((offset, buf.to_vec()));
        Ok(buf.len())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.writes.lock().unwrap().0)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"));
        }
        // A shrink followed by a read would need the cut part zeroed: not
        // needed by any open, so refuse it loudly rather than model it.
        let mut w = self.writes.lock().unwrap();
        if len < w.0 {
            return Err(io::Error::other("overlay storage cannot shrink"));
        }
        w.0 = len;
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
}

impl Session {
    /// Opens `image` (bytes of an image file) writable on a recording storage.
    pub fn new(name: &str, fmt: Fmt, image: Vec<u8>) -> Session {
        Self::at(name, fmt, image, image_path(fmt))
    }
    /// [`Session::new`] for an image said to live at `path` (a differencing
    /// child: its parent is opened from the real file system).
    pub fn at(name: &str, fmt: Fmt, image: Vec<u8>, path: PathBuf) -> Session {
        let initial = open_shared(&path, Arc::new(image.clone()), false)
            .unwrap_or_else(|e| panic!("{name}: the initial image does not open: {e}"));
        let initial_virtual = read_disk(&initial).unwrap();
        let rec = Recorder::new(image.clone());
        let disk = Self::open(&path, &rec, true);
        Session {
            name: name.to_string(),
            fmt,
            path,
            rec,
            disk,
            initial_file: image,
            initial_virtual,
            writes: Vec::new(),
            flushes: Vec::new(),
        }
    }
    fn open(path: &Path, rec: &Recorder, writable: bool) -> vdisk::Disk {
        vdisk::open_disk(
            Box::new(rec.storage(writable)),
            path,
            vdisk::OpenOptions { writable },
            &vdisk::StdParentOpener,
        )
        .unwrap_or_else(|e| panic!("opening the recorded image (writable {writable}): {e}"))
    }
    pub fn size(&self) -> u64 {
        self.disk.size()
    }
    /// Discards punch holes in the container ([`vdisk::Disk::with_punch_holes`]).
    pub fn punching(self) -> Session {
        let Session {
            name,
            fmt,
            path,
            rec,
            disk,
            initial_file,
            initial_virtual,
            writes,
            flushes,
        } = self;
        Session {
            disk: disk.with_punch_holes(true),
            name,
            fmt,
            path,
            rec,
            initial_file,
            initial_virtual,
            writes,
            flushes,
        }
    }
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let op_start = self.rec.op_count();
        self.disk
            .write_at(data, offset)
            .unwrap_or_else(|e| panic!("{}: write {} @ {offset}: {e}", self.name, data.len()));
        self.writes.push(DiskWrite {
            offset,
            data: data.to_vec(),
            op_start,
        });
    }
    /// A discard through `Disk::discard` (or `write_zeroes` without unmap):
    /// for the oracle, a write of zeros.
    pub fn discard(&mut self, offset: u64, len: u64, unmap: bool) {
        let op_start = self.rec.op_count();
        let done = if unmap {
            self.disk.discard(offset, len)
        } else {
            self.disk.write_zeroes(offset, len, false)
        };
        done.unwrap_or_else(|e| panic!("{}: discard {len} @ {offset}: {e}", self.name));
        self.writes.push(DiskWrite {
            offset,
            data: vec![0; len as usize],
            op_start,
        });
    }
    pub fn flush(&mut self) {
        let op_start = self.rec.op_count();
        self.disk
            .flush()
            .unwrap_or_else(|e| panic!("{}: flush: {e}", self.name));
        self.flushes.push(Flush {
            op_start,
            op_end: self.rec.op_count(),
            writes: self.writes.len(),
            read_only: !self.disk.is_writable(),
        });
    }
    /// The writing process dies without flushing (kill -9): its writes stay
    /// in the page cache, so the recorded ops stay, unsynced. Another process
    /// then opens the same file read-only (the disk is forgotten, not
    /// dropped, so no destructor can flush behind the test's back).
    pub fn kill_and_reopen_read_only(&mut self) {
        let reader = Self::open(&self.path, &self.rec, false);
        std::mem::forget(std::mem::replace(&mut self.disk, reader));
    }
    pub fn finish(self) -> Recording {
        Recording {
            name: self.name,
            fmt: self.fmt,
            path: self.path,
            initial_file: self.initial_file,
            initial_virtual: self.initial_virtual,
            ops: self.rec.ops(),
            writes: self.writes,
            flushes: self.flushes,
        }
    }
}

/// Test data that differs per write (`seq`) and per position, never all zeros.
pub fn fill(seq: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let p = offset + i;
            ((p >> 9) as u8 ^ (p as u8).wrapping_mul(7) ^ (seq as u8).wrapping_mul(29)) | 1
        })
        .collect()
}

/// Budget and seed of a run: bounded in `cargo test`, larger from
/// `scripts/power-loss` (CRASHSIM_STATES = random states per workload,
/// CRASHSIM_SEED = seed).
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub prefix: usize,
    pub single: usize,
    pub torn: usize,
    pub random: usize,
    pub seed: u64,
}

impl Budget {
    /// `random` states by default, each family scaled from it; the env knobs override.
    pub fn from_env(random: usize) -> Budget {
        let random = std::env::var("CRASHSIM_STATES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(random);
        let seed = std::env::var("CRASHSIM_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15);
        Budget {
            prefix: random,
            single: random,
            torn: random / 2 + 1,
            random,
            seed,
        }
    }
}
