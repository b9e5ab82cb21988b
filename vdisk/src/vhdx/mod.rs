//! VHDX (MS-VHDX 1.0, Hyper-V's format): fixed, dynamic and differencing
//! disks with 512 or 4096-byte logical sectors, log replay on open and
//! crash-safe writes through the log.
//!
//! Writes:
//! * Payload goes straight into allocated blocks; new blocks are appended at
//!   1 MiB-aligned offsets at the end of the file (the file grows first, so a
//!   new block reads zeros until written).
//! * BAT changes are group-committed: a write that allocates changes the BAT
//!   in memory (readers see it at once) and marks its sector pending; a
//!   commit (at a flush, when the pending sectors would fill half the log,
//!   and at close) sends them through the log: log entry written, barrier
//!   (it and the payload it points at are durable), LogGuid set in a header,
//!   barrier, BAT sectors written in place, barrier, LogGuid cleared (made
//!   durable by the next barrier: until then a crash replays the entry
//!   again, which is idempotent). The entry is durable *before* a header
//!   names its GUID, so a crash leaves either no active log or a valid one.
//!   Entries go to the two halves of the log in turn: the entry a header may
//!   still name is never overwritten by the next one. Three barriers per
//!   commit, not per allocation.
//! * A block that is not FULLY_PRESENT becomes FULLY_PRESENT on its first
//!   write: its unwritten part is what it read before (zeros, or the parent's
//!   data for NOT_PRESENT and PARTIALLY_PRESENT blocks of a differencing disk,
//!   copied through the `parent` reader). Copy-on-write of whole blocks was
//!   chosen over PARTIALLY_PRESENT + sector bitmaps: one kind of metadata
//!   change (BAT entries only), no bitmap blocks to allocate and keep
//!   consistent, and every reader handles FULLY_PRESENT.
//! * Before the first write of a session, FileWriteGuid and DataWriteGuid get
//!   new values through the two-header update.

pub mod bat;
mod compact;
pub mod create;
mod discard;
pub mod guid;
pub mod header;
pub mod log;
pub mod metadata;
pub mod region;
pub mod relink;
pub mod resize;
mod resize_bat;
mod write;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{Error, Format, Image, Mapping, OpenOptions, ParentLink, Result, Storage};
use bat::{Bat, Layout};
use guid::Guid;
use header::Header;
use metadata::Metadata;
use region::{Region, Regions};

pub use create::{CreateOptions, Created, ParentInfo, create};

pub const MIB: u64 = 1 << 20;

/// Opens a VHDX file (one layer; the caller opens the parent).
pub fn open(storage: Box<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<Box<dyn Image>> {
    Ok(Box::new(VhdxImage::open(storage, path, opts)?))
}

/// The current header and the slot it is in, with the two-header update.
struct Headers {
    current: Header,
    slot: usize,
}

impl Headers {
    /// Writes the changed header into the non-current slot, where it becomes
    /// current (higher sequence number) once durable; no barrier.
    fn write_one(&mut self, storage: &dyn Storage, change: impl Fn(&mut Header)) -> Result<()> {
        let mut h = self.current.clone();
        h.sequence = h
            .sequence
            .checked_add(1)
            .ok_or_else(|| Error::corrupt("VHDX header", "sequence overflow"))?;
        change(&mut h);
        let slot = 1 - self.slot;
        storage.write_all_at(&h.encode(), header::SLOTS[slot])?;
        self.current = h;
        self.slot = slot;
        Ok(())
    }

    /// Writes the changed header into the non-current slot, flushes, and does
    /// it again, so both slots end up holding the new state (MS-VHDX 2.2.2.1).
    fn update(&mut self, storage: &dyn Storage, change: impl Fn(&mut Header)) -> Result<()> {
        for _ in 0..2 {
            self.write_one(storage, &change)?;
            storage.sync()?;
        }
        Ok(())
    }
}

struct State {
    headers: Headers,
    /// FileWriteGuid of this session, once the headers were updated for writing.
    session: Option<Guid>,
    /// Whether DataWriteGuid was renewed for this session.
    data_guid_renewed: bool,
    /// The DataWriteGuid the next session takes, if the caller chose it
    /// (see `Image::set_next_data_write_guid`).
    next_data_guid: Option<Guid>,
    log_sequence: u64,
    /// File offsets of BAT sectors changed in memory and not yet committed.
    pending: std::collections::BTreeSet<u64>,
    /// Block offsets that discards freed, with BAT changes not committed
    /// yet (the file's BAT may still point there).
    freed: Vec<u64>,
    /// Freed block offsets whose BAT change is durable: new blocks take them.
    reusable: Vec<u64>,
}

/// A VHDX file.
pub struct VhdxImage {
    /// The file, or a read-only overlay holding a log replayed in memory.
    storage: Box<dyn Storage>,
    writable: bool,
    meta: Metadata,
    layout: Layout,
    regions: Regions,
    log_region: Region,
    bat: Bat,
    parent: Option<ParentLink>,
    state: Mutex<State>,
    /// Counts reuses of freed blocks ([`Image::mapping_epoch`]).
    reuse_epoch: std::sync::atomic::AtomicU64,
}

impl VhdxImage {
    pub fn open(storage: Box<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<VhdxImage> {
        let writable = opts.writable;
        if writable && !storage.is_writable() {
            return Err(Error::ReadOnly);
        }
        header::check_identifier(storage.as_ref())?;
        let (current, slot) = header::read_current(storage.as_ref())?;
        let mut headers = Headers { current, slot };
        let h = &headers.current;
        let file_len = storage.len()?;
        let log_region = Region {
            offset: h.log_offset,
            length: h.log_length as u64,
        };
        if h.log_length != 0 && log_region.end() > file_len {
            return Err(Error::corrupt(
                "VHDX header",
                format!("log ends at {}, past the end of the file", log_region.end()),
            ));
        }
        let mut storage = storage;
        let mut session = None;
        if !h.log_guid.is_zero() {
            let replay = log::Log::new(storage.as_ref(), log_region.offset, log_region.length)
                .find_active(h.log_guid)?;
            let Some(replay) = replay else {
                return Err(Error::corrupt(
                    "VHDX log",
                    format!(
                        "log GUID {} is set but the log has no valid entries",
                        h.log_guid
                    ),
                ));
            };
            if file_len < replay.flushed_file_offset {
                return Err(Error::corrupt(
                    "VHDX log",
                    format!(
                        "file is {file_len} bytes, the log says {} were flushed: truncated",
                        replay.flushed_file_offset
                    ),
                ));
            }
            ::log::info!(
                "{}: replaying {} VHDX log entries",
                path.display(),
                replay.entries
            );
            if writable {
                log::replay_on_disk(storage.as_ref(), &replay)?;
                storage.sync()?;
                let guid = Guid::random()?;
                headers.update(storage.as_ref(), |h| {
                    h.file_write_guid = guid;
                    h.log_guid = Guid::ZERO;
                })?;
                session = Some(guid);
            } else {
                storage = Box::new(log::Overlay::new(storage, replay)?);
            }
        }
        let file_len = storage.len()?;
        let regions = region::read(storage.as_ref(), file_len)?;
        for (name, r) in [("BAT", regions.bat), ("metadata", regions.metadata)] {
            if log_region.overlaps(r.offset, r.length) {
                return Err(Error::corrupt(
                    "VHDX region table",
                    format!("{name} region overlaps the log"),
                ));
            }
        }
        let meta = metadata::read(storage.as_ref(), regions.metadata)?;
        let layout = Layout::new(
            meta.virtual_size,
            meta.block_size,
            meta.logical_sector_size,
            meta.has_parent,
        );
        let bat = Bat::load(storage.as_ref(), regions.bat, &layout)?;
        let image = VhdxImage {
            parent: if meta.has_parent {
                Some(parent_link(&meta, path)?)
            } else {
                None
            },
            storage,
            writable,
            meta,
            layout,
            regions,
            log_region,
            bat,
            reuse_epoch: Default::default(),
            state: Mutex::new(State {
                headers,
                session,
                data_guid_renewed: false,
                next_data_guid: None,
                log_sequence: 0,
                pending: Default::default(),
                freed: Vec::new(),
                reusable: Vec::new(),
            }),
        };
        image.check_bat(file_len)?;
        Ok(image)
    }

    /// Checks every entry the disk uses against the file: known states,
    /// blocks inside the file and clear of the header, log, BAT and metadata.
    fn check_bat(&self, file_len: u64) -> Result<()> {
        let l = &self.layout;
        let reserved = [
            Region {
                offset: 0,
                length: MIB,
            },
            self.log_region,
            self.regions.bat,
            self.regions.metadata,
        ];
        let check = |what: &str, index: u64, e: u64, len: u64| -> Result<()> {
            let off = bat::offset(e);
            let bad = off == 0
                || off.checked_add(len).is_none_or(|end| end > file_len)
                || reserved.iter().any(|r| r.overlaps(off, len));
            if bad {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    format!("{what} entry {index} points at {off}, length {len}"),
                ));
            }
            Ok(())
        };
        for b in 0..l.payload_blocks {
            let index = l.payload_index(b);
            let e = self.entry(index)?;
            let visible = l.block_size.min(self.meta.virtual_size - b * l.block_size);
            match bat::state(e) {
                bat::NOT_PRESENT
                | bat::UNDEFINED
                | bat::ZERO
                | bat::UNMAPPED
                | bat::UNMAPPED_V095 => {}
                bat::FULLY_PRESENT => check("payload", index, e, visible)?,
                bat::PARTIALLY_PRESENT if l.has_parent => {
                    check("payload", index, e, visible)?;
                    let sb = self.bat.get(l.bitmap_index(b / l.chunk_ratio)).unwrap_or(0);
                    if bat::state(sb) != bat::SB_BLOCK_PRESENT {
                        return Err(Error::corrupt(
                            "VHDX BAT",
                            format!("partially present block {b} without a sector bitmap"),
                        ));
                    }
                }
                s => {
                    return Err(Error::corrupt(
                        "VHDX BAT",
                        format!("payload entry {index} has state {s}"),
                    ));
                }
            }
        }
        if l.has_parent {
            for k in 0..l.bitmap_blocks {
                let index = l.bitmap_index(k);
                let Some(e) = self.bat.get(index) else {
                    continue;
                };
                match bat::state(e) {
                    bat::NOT_PRESENT => {}
                    bat::SB_BLOCK_PRESENT => check("sector bitmap", index, e, MIB)?,
                    s => {
                        return Err(Error::corrupt(
                            "VHDX BAT",
                            format!("sector bitmap entry {index} has state {s}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn entry(&self, index: u64) -> Result<u64> {
        self.bat
            .get(index)
            .ok_or_else(|| Error::corrupt("VHDX BAT", format!("entry {index} is outside the BAT")))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// The current header (a copy).
    pub fn header(&self) -> Header {
        self.lock().headers.current.clone()
    }

    /// For block `b` (PARTIALLY_PRESENT): whether the sector at `in_block` is
    /// in this file, and for how many bytes (at most `max`) that holds.
    fn bitmap_run(&self, b: u64, in_block: u64, max: u64) -> Result<(bool, u64)> {
        let l = &self.layout;
        let chunk = b / l.chunk_ratio;
        let e = self.entry(l.bitmap_index(chunk))?;
        if bat::state(e) != bat::SB_BLOCK_PRESENT {
            return Err(Error::corrupt(
                "VHDX BAT",
                format!("partially present block {b} without a sector bitmap"),
            ));
        }
        let ss = l.sector_size;
        let first = (b % l.chunk_ratio) * l.sectors_per_block() + in_block / ss;
        let count = (in_block % ss + max).div_ceil(ss);
        let (lo, hi) = (first / 8, (first + count).div_ceil(8));
        let mut bits = vec![0u8; (hi - lo) as usize];
        self.storage.read_exact_at(&mut bits, bat::offset(e) + lo)?;
        let bit = |s: u64| bits[((s - lo * 8) / 8) as usize] >> (s % 8) & 1 != 0;
        let present = bit(first);
        let mut n = 1;
        while n < count && bit(first + n) == present {
            n += 1;
        }
        Ok((present, (n * ss - in_block % ss).min(max)))
    }
}

/// The parent link of a differencing file: its DataWriteGuid and the paths
/// to try, relative_path, volume_path and absolute_win32_path in the spec's
/// order, each also by file name in the child's folder.
fn parent_link(meta: &Metadata, child: &Path) -> Result<ParentLink> {
    let linkage = meta.locator("parent_linkage").unwrap_or_default();
    let id = Guid::parse_text(linkage)?;
    let dir = child.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !p.as_os_str().is_empty() && !candidates.contains(&p) {
            candidates.push(p);
        }
    };
    let mut named = Vec::new();
    for key in ["relative_path", "volume_path", "absolute_win32_path"] {
        let Some(text) = meta.locator(key) else {
            continue;
        };
        named.push(format!("{key} '{text}'"));
        let unix = text.replace('\\', "/");
        match key {
            "relative_path" => push(dir.join(unix.trim_start_matches("./"))),
            _ if unix.starts_with('/') && !unix.starts_with("//") => push(PathBuf::from(&unix)),
            _ => {}
        }
        let name = unix.rsplit('/').next().unwrap_or("");
        if !name.is_empty() && name != "." && name != ".." {
            push(dir.join(name));
        }
    }
    // parent_linkage2: the parent's DataWriteGuid may also be this one.
    let alternate_id = match meta.locator("parent_linkage2") {
        Some(text) => Some(Guid::parse_text(text)?.0),
        None => None,
    };
    Ok(ParentLink {
        candidates,
        id: id.0,
        alternate_id,
        description: format!("VHDX parent with DataWriteGuid {id} ({})", named.join(", ")),
    })
}

impl Image for VhdxImage {
    fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
    fn format(&self) -> Format {
        Format::Vhdx
    }
    fn virtual_size(&self) -> u64 {
        self.meta.virtual_size
    }
    fn logical_sector_size(&self) -> u32 {
        self.meta.logical_sector_size
    }
    fn physical_sector_size(&self) -> u32 {
        self.meta.physical_sector_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let l = &self.layout;
        let (b, in_block) = l.block_of(offset);
        let max = len.min(l.block_size - in_block);
        let e = self.entry(l.payload_index(b))?;
        let data = Mapping::Data {
            file_offset: bat::offset(e) + in_block,
        };
        Ok(match bat::state(e) {
            bat::FULLY_PRESENT => (data, max),
            bat::PARTIALLY_PRESENT if l.has_parent => {
                let (present, run) = self.bitmap_run(b, in_block, max)?;
                (if present { data } else { Mapping::Unallocated }, run)
            }
            bat::NOT_PRESENT => (Mapping::Unallocated, max),
            bat::UNDEFINED | bat::ZERO | bat::UNMAPPED | bat::UNMAPPED_V095 => (Mapping::Zero, max),
            s => {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    format!("block {b} has state {s}"),
                ));
            }
        })
    }

    fn write(
        &self,
        buf: &[u8],
        offset: u64,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut st = self.lock();
        self.begin_session(&mut st)?;
        let bs = self.layout.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let n = ((bs - off % bs) as usize).min(buf.len() - done);
            self.write_block(&mut st, off / bs, off % bs, &buf[done..done + n], parent)?;
            done += n;
        }
        if st.pending.len() >= log::capacity(self.log_half()) {
            self.commit_pending(&mut st)?;
        }
        Ok(())
    }

    fn commit(&self) -> Result<()> {
        let mut st = self.lock();
        self.commit_pending(&mut st)
    }

    fn discard(
        &self,
        offset: u64,
        len: u64,
        how: crate::Zeroing,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        self.discard_range(offset, len, how, parent)
    }

    fn allocation_block(&self) -> Option<u64> {
        (!self.meta.leave_blocks_allocated).then_some(self.layout.block_size)
    }

    fn mapping_epoch(&self) -> u64 {
        self.reuse_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn relocate(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
        self.relocate_blocks(progress)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }
    fn link_id(&self) -> [u8; 16] {
        self.lock().headers.current.data_write_guid.0
    }
    fn parent_link(&self) -> Option<&ParentLink> {
        self.parent.as_ref()
    }
    fn describe(&self) -> String {
        let kind = if self.meta.has_parent {
            "differencing"
        } else if self.meta.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        format!(
            "VHDX {kind}, {} bytes, {} byte blocks, {} byte sectors",
            self.meta.virtual_size, self.meta.block_size, self.meta.logical_sector_size
        )
    }
    fn set_next_data_write_guid(&self, guid: [u8; 16]) -> Result<()> {
        let mut st = self.lock();
        if st.data_guid_renewed {
            return Err(Error::unsupported(
                "VHDX DataWriteGuid chosen after the first write",
            ));
        }
        st.next_data_guid = Some(Guid(guid));
        Ok(())
    }
}
