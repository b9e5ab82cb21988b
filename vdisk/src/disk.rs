//! A virtual disk: an image and its parent chain, with the generic read and
//! write loops over layer mappings.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{Error, Format, Geometry, Image, Mapping, Result};

#[path = "disk_discard.rs"]
mod discard;
pub(crate) use discard::{is_zero, zero_fill};

/// Deepest parent chain accepted; a deeper one is refused as corrupt (or a loop).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// An opened virtual disk: `layers[0]` is the file that was opened, the last
/// layer is the base image. Only `layers[0]` is ever written.
pub struct Disk {
    layers: Vec<Box<dyn Image>>,
    /// `layers[i].virtual_size()`, fixed once opened: read on every call.
    sizes: Vec<u64>,
    /// Writes that change metadata (allocation, bitmaps, headers) or merge
    /// partial sectors hold it exclusively; overwrites of data the top layer
    /// already holds share it, so writers to allocated blocks run together.
    /// Reads take no lock.
    write_lock: RwLock<()>,
    /// Set after the first write: the formats' one-time work before data may
    /// change (new VHDX data GUID, VDI modification UUID...) is done.
    writes_begun: AtomicBool,
    /// A write completed since the last flush began.
    dirty: AtomicBool,
    /// Cleared by [`Disk::disown`]: dropping the disk then writes nothing.
    owned: AtomicBool,
    /// Discards punch holes in the container where data stays in place
    /// ([`Disk::with_punch_holes`]).
    punch_holes: bool,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("format", &self.format())
            .field("size", &self.size())
            .field("depth", &self.layers.len())
            .finish()
    }
}

impl Disk {
    /// Stacks `layers` (top first). The caller has verified the links.
    pub fn new(layers: Vec<Box<dyn Image>>) -> Result<Disk> {
        if layers.is_empty() {
            return Err(Error::unsupported("a disk needs at least one image"));
        }
        if layers.len() > MAX_CHAIN_DEPTH {
            return Err(Error::corrupt(
                "parent chain",
                format!("deeper than {MAX_CHAIN_DEPTH}"),
            ));
        }
        Ok(Disk {
            sizes: layers.iter().map(|l| l.virtual_size()).collect(),
            layers,
            write_lock: RwLock::new(()),
            writes_begun: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            owned: AtomicBool::new(true),
            punch_holes: false,
        })
    }

    /// With `on`, discards and zeroing make the data they keep in place
    /// (fixed images, parts of blocks) holes in the top image's container
    /// file where its file system can punch them, instead of writing zeros.
    /// Off by default: the file becomes sparse, which some hosts refuse
    /// (Windows will not attach a sparse VHDX).
    pub fn with_punch_holes(mut self, on: bool) -> Disk {
        self.punch_holes = on;
        self
    }
    /// Whether discards punch holes ([`Disk::with_punch_holes`]).
    pub fn punch_holes(&self) -> bool {
        self.punch_holes
    }

    pub fn format(&self) -> Format {
        self.layers[0].format()
    }
    /// Size of the virtual disk in bytes.
    pub fn size(&self) -> u64 {
        self.sizes[0]
    }
    pub fn logical_sector_size(&self) -> u32 {
        self.layers[0].logical_sector_size()
    }
    pub fn physical_sector_size(&self) -> u32 {
        self.layers[0].physical_sector_size()
    }
    pub fn geometry(&self) -> Option<Geometry> {
        self.layers[0].geometry()
    }
    pub fn is_writable(&self) -> bool {
        self.layers[0].is_writable()
    }
    /// The chain, top first.
    pub fn layers(&self) -> &[Box<dyn Image>] {
        &self.layers
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len: len as u64,
                size,
            }),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`; the range must lie inside the disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        self.read_layer(0, buf, offset)
    }

    /// Reads through layer `level` and below. A layer smaller than the top one
    /// reads zeros past its end (a child may be larger than its parent).
    /// Data runs that continue each other in the file are read with one call.
    fn read_layer(&self, level: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(image) = self.layers.get(level) else {
            buf.fill(0);
            return Ok(());
        };
        // A place this read was mapped to may have been given to another
        // block meanwhile (see Image::mapping_epoch): then it reads again.
        loop {
            let epoch = image.mapping_epoch();
            self.read_layer_once(level, buf, offset)?;
            std::sync::atomic::fence(Ordering::SeqCst);
            if image.mapping_epoch() == epoch {
                return Ok(());
            }
        }
    }

    fn read_layer_once(&self, level: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let image = &self.layers[level];
        let size = self.sizes[level];
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let mut runs = FileRuns::default();
        let read = |buf: &mut [u8], run: Option<(usize, u64, usize)>| match run {
            Some((at, file_offset, n)) => image.read_data(&mut buf[at..at + n], file_offset),
            None => Ok(()),
        };
        self.each_run(level, offset, inside, |at, mapping, n| {
            match mapping {
                Mapping::Data { file_offset } => read(buf, runs.add(at, file_offset, n))?,
                Mapping::Zero => {
                    read(buf, runs.take())?;
                    buf[at..at + n].fill(0);
                }
                Mapping::Unallocated => {
                    read(buf, runs.take())?;
                    self.read_layer(level + 1, &mut buf[at..at + n], offset + at as u64)?;
                }
                Mapping::Compressed => {
                    read(buf, runs.take())?;
                    image.read_compressed(&mut buf[at..at + n], offset + at as u64)?;
                }
            }
            Ok(true)
        })?;
        read(buf, runs.take())
    }

    /// Maps `len` bytes at `offset` of layer `level` run by run, calling
    /// `f(position in the range, mapping, length)` until it returns false.
    /// Returns whether every run was visited.
    fn each_run(
        &self,
        level: usize,
        offset: u64,
        len: usize,
        f: impl FnMut(usize, Mapping, usize) -> Result<bool>,
    ) -> Result<bool> {
        self.each_run_mapped(level, offset, len, false, f)
    }

    /// [`Disk::each_run`], mapping with [`Image::map_for_overwrite`] if `overwrite`.
    fn each_run_mapped(
        &self,
        level: usize,
        offset: u64,
        len: usize,
        overwrite: bool,
        mut f: impl FnMut(usize, Mapping, usize) -> Result<bool>,
    ) -> Result<bool> {
        let image = &self.layers[level];
        let mut done = 0usize;
        while done < len {
            let want = (len - done) as u64;
            let at = offset + done as u64;
            let (mapping, run) = if overwrite {
                image.map_for_overwrite(at, want)?
            } else {
                image.map(at, want)?
            };
            if run == 0 || run > want {
                return Err(Error::corrupt(
                    "mapping",
                    format!("layer {level} mapped {run} bytes of {want}"),
                ));
            }
            if !f(done, mapping, run as usize)? {
                return Ok(false);
            }
            done += run as usize;
        }
        Ok(true)
    }

    /// Writes `buf` at `offset` into the top layer. Unaligned heads and tails
    /// are merged with the current contents (read-modify-write of one sector).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        if !self.is_writable() {
            return Err(Error::ReadOnly);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let ss = self.logical_sector_size() as u64;
        if offset.is_multiple_of(ss)
            && (buf.len() as u64).is_multiple_of(ss)
            && self.writes_begun.load(Ordering::Acquire)
            && !Disk::unmaps_zeros(buf)
        {
            let _shared = self.write_lock.read().unwrap_or_else(|e| e.into_inner());
            if self.overwrite_in_place(buf, offset)? {
                self.dirty.store(true, Ordering::Release);
                return Ok(());
            }
        }
        let _serial = self.write_lock.write().unwrap_or_else(|e| e.into_inner());
        self.writes_begun.store(true, Ordering::Release);
        let written = self.write_serial(buf, offset, ss);
        // Also after a failed write: part of it may have landed.
        self.dirty.store(true, Ordering::Release);
        written
    }

    /// Overwrites `buf` at `offset` if the top layer already maps all of it to
    /// data in its own file: a plain overwrite, no metadata change. Returns
    /// false, having written nothing, if any part is unallocated, zero or in
    /// a parent. Runs that continue each other in the file are one write.
    fn overwrite_in_place(&self, buf: &[u8], offset: u64) -> Result<bool> {
        // Every byte must have its place before the first one is written.
        let all_data = |_, mapping, _| Ok(matches!(mapping, Mapping::Data { .. }));
        if !self.each_run_mapped(0, offset, buf.len(), true, all_data)? {
            return Ok(false);
        }
        let top = &self.layers[0];
        let write = |run: Option<(usize, u64, usize)>| match run {
            Some((at, file_offset, n)) => top.write_data(&buf[at..at + n], file_offset),
            None => Ok(()),
        };
        let mut runs = FileRuns::default();
        self.each_run_mapped(0, offset, buf.len(), true, |at, mapping, n| {
            if let Mapping::Data { file_offset } = mapping {
                write(runs.add(at, file_offset, n))?;
            }
            Ok(true)
        })?;
        write(runs.take())?;
        Ok(true)
    }

    /// The general write, under the exclusive write lock.
    fn write_serial(&self, buf: &[u8], offset: u64, ss: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let head = offset % ss;
        let mut pos = offset;
        let mut consumed = 0usize;
        if head != 0 || end - offset < ss {
            // Partial first sector.
            let sector = offset - head;
            let n = ((ss - head).min(end - offset)) as usize;
            self.merge_sector(sector, head as usize, &buf[..n])?;
            pos += n as u64;
            consumed += n;
        }
        let whole = (end - pos) / ss * ss;
        if whole > 0 {
            self.write_whole_sectors(&buf[consumed..consumed + whole as usize], pos)?;
            pos += whole;
            consumed += whole as usize;
        }
        if pos < end {
            self.merge_sector(pos, 0, &buf[consumed..])?;
        }
        Ok(())
    }

    fn merge_sector(&self, sector: u64, at: usize, data: &[u8]) -> Result<()> {
        let mut tmp = vec![0u8; self.logical_sector_size() as usize];
        self.read_layer(0, &mut tmp, sector)?;
        tmp[at..at + data.len()].copy_from_slice(data);
        self.write_top(&tmp, sector)
    }

    fn write_top(&self, buf: &[u8], offset: u64) -> Result<()> {
        let parent = |b: &mut [u8], off: u64| self.read_layer(1, b, off);
        self.layers[0].write(buf, offset, &parent)
    }

    /// Makes all completed writes durable: table updates kept in memory are
    /// committed, then the file is synced (also when opened read-only).
    pub fn flush(&self) -> Result<()> {
        let was_dirty = self.dirty.swap(false, Ordering::AcqRel);
        let top = &self.layers[0];
        let flushed = if top.reclaim_pending(was_dirty) {
            // Blocks move: no overwrite in place may run meanwhile.
            let _serial = self.write_lock.write().unwrap_or_else(|e| e.into_inner());
            top.reclaim().and_then(|()| top.flush())
        } else {
            top.flush()
        };
        if flushed.is_err() && was_dirty {
            self.dirty.store(true, Ordering::Release);
        }
        flushed
    }

    /// Syncs the top layer's file without committing anything: for a process
    /// that holds a copy of the disk but is not its writer (a forked child).
    pub fn sync_file(&self) -> Result<()> {
        self.layers[0].sync()
    }

    /// This copy of the disk is not the writer's (a forked child's copy of
    /// the parent's memory): dropping it must not commit or trim anything.
    pub fn disown(&self) {
        self.owned.store(false, Ordering::Release);
    }

    /// What dropping a written disk does: flush if dirty, then give back
    /// reserved space. Errors are returned here; `Drop` can only log them.
    pub fn close(&self) -> Result<()> {
        if !self.owned.load(Ordering::Acquire) || !self.writes_begun.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.dirty.load(Ordering::Acquire) {
            self.flush()?;
        }
        self.writes_begun.store(false, Ordering::Release);
        self.layers[0].close()
    }
}

/// A disk dropped with writes not yet flushed commits them: like the last
/// close of a block device, which syncs it.
impl Drop for Disk {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::warn!("closing {} image: {e}", self.format());
        }
    }
}

/// Data runs merged while each continues the previous one in the file:
/// (position in the caller's buffer, file offset, length).
#[derive(Default)]
struct FileRuns(Option<(usize, u64, usize)>);

impl FileRuns {
    /// Adds a run; returns the merged run before it when this one does not
    /// continue it (that one is then complete).
    fn add(&mut self, at: usize, file_offset: u64, n: usize) -> Option<(usize, u64, usize)> {
        match &mut self.0 {
            Some((_, start, len)) if *start + *len as u64 == file_offset => {
                *len += n;
                None
            }
            _ => self.0.replace((at, file_offset, n)),
        }
    }
    /// The run not handed out yet.
    fn take(&mut self) -> Option<(usize, u64, usize)> {
        self.0.take()
    }
}
