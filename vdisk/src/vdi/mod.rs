//! VDI (VirtualBox): dynamic ("normal"), fixed, undo (read as normal) and
//! differencing images, header 1.1 (0x180 or 0x190 bytes) and the old 0.x layout.
//!
//! Layout: `[pre-header + header][block map][data]`. Block `b` with map entry
//! `slot` has its data at `offData + slot * (block_size + block_extra) +
//! block_extra`. FREE blocks read zeros in a base image and the parent in a
//! child; ZERO blocks read zeros in both.
//!
//! Writes allocate whole blocks at a free slot (a slot left unused by an
//! interrupted allocation, else the next one, `offData + allocated *
//! stride`): the block is written (the unwritten part zeros, or the parent's
//! data in a child) and its map entry staged in memory (group commit). A
//! commit writes the header with the allocated count, then after a barrier
//! the staged map entries; so on the disk the count is never below the
//! slots the map uses (qemu and VirtualBox allocate at the count: a lower
//! count would give a used slot to a second block), and the map never points
//! at unwritten data. A crash leaves at worst unused slots below the count:
//! `qemu-img check` reports them as a count mismatch, and the next write
//! through this library reuses them and corrects the count.

pub mod block_map;
pub mod create;
mod discard;
pub mod header;
pub mod parent;
pub mod relink;
mod relocate;
pub mod resize;

use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use crate::{
    Error, Format, Geometry, Image, Mapping, OpenOptions, ParentLink, ParentOpener, Result, Storage,
};
use block_map::{BlockMap, Entry};
use header::{HEADER_AREA, Header, ImageType, uuid_text};

/// Environment variable naming extra folders (colon-separated) to search for
/// the parents of differencing VDIs. Read by the opener, never by this module.
pub const SEARCH_PATH_VAR: &str = "LIBVHD_IO_VDI_PATH";

/// New blocks are written in pieces of at most this size.
const COPY_CHUNK: u64 = 1 << 20;

/// Staged map entries that trigger a commit without waiting for a flush.
const COMMIT_BOUND: usize = 4096;

pub fn open(storage: Box<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<Box<dyn Image>> {
    Ok(Box::new(VdiImage::open(storage, path, opts)?))
}

/// A VDI file.
pub struct VdiImage {
    storage: Box<dyn Storage>,
    map: BlockMap,
    image_type: ImageType,
    size: u64,
    block_size: u64,
    stride: u64,
    first_data: u64,
    blocks: u32,
    uuid_create: [u8; 16],
    uuid_parent_modify: [u8; 16],
    geometry: Option<Geometry>,
    version: String,
    parent: Option<ParentLink>,
    /// Header and allocation state; taken by writes only.
    state: Mutex<State>,
    /// Counts give-backs ([`Image::mapping_epoch`]).
    slot_epoch: std::sync::atomic::AtomicU64,
}

struct State {
    header: Header,
    /// Past every slot in use: the slot a block takes when none is free.
    next_slot: u32,
    /// Unused slots below `next_slot` (left by interrupted allocations),
    /// highest first: taken before `next_slot`.
    free_slots: Vec<u32>,
    /// Whether this open has written (uuidModify is renewed once).
    modified: bool,
    /// A discard moved blocks down: the file is cut at close.
    gave_back: bool,
    /// Discards freed slots that the next commit gives back (until then
    /// no allocation takes them: their old entries may still be durable).
    holes: bool,
}

impl VdiImage {
    pub fn open(storage: Box<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<VdiImage> {
        let len = storage.len()?;
        let mut raw = [0u8; HEADER_AREA];
        let n = (len.min(HEADER_AREA as u64)) as usize;
        storage.read_exact_at(&mut raw[..n], 0)?;
        let header = Header::parse(&raw, len)?;
        let map = BlockMap::load(storage.as_ref(), header.blocks_offset, header.blocks)?;
        let size = header.virtual_size();
        if size != header.disk_size {
            log::warn!(
                "{}: VDI disk size {} is not a whole number of sectors; using {size}",
                path.display(),
                header.disk_size
            );
        }
        let (next_slot, free_slots) = check_map(&map, &header, size, len, opts.writable, path)?;
        if opts.writable && !free_slots.is_empty() {
            // Unused slots may have been freed by a discard whose entries
            // are not durable yet: they must be before a slot is reused.
            storage.sync()?;
        }
        // Unused slots below the count (a kill in a give-back): the first
        // flush after a write gives them back (qemu-img check wants none).
        let holes = opts.writable
            && header.image_type != ImageType::Fixed
            && (!free_slots.is_empty() || header.blocks_allocated > next_slot);
        let parent = (header.image_type == ImageType::Diff).then(|| ParentLink {
            candidates: Vec::new(),
            id: header.uuid_linkage,
            alternate_id: None,
            description: format!("VDI parent with UUID {}", uuid_text(&header.uuid_linkage)),
        });
        Ok(VdiImage {
            map,
            image_type: header.image_type,
            size,
            block_size: header.block_size as u64,
            stride: header.block_size as u64 + header.block_extra as u64,
            first_data: header.data_offset + header.block_extra as u64,
            blocks: header.blocks,
            uuid_create: header.uuid_create,
            uuid_parent_modify: header.uuid_parent_modify,
            geometry: header.geometry(),
            version: header.version_text(),
            parent,
            state: Mutex::new(State {
                header,
                next_slot,
                free_slots,
                modified: false,
                gave_back: false,
                holes,
            }),
            slot_epoch: Default::default(),
            storage,
        })
    }

    pub fn image_type(&self) -> ImageType {
        self.image_type
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// File offset of the data of `slot` (checked against the file at open, or
    /// computed with checked arithmetic at allocation).
    fn slot_offset(&self, slot: u32) -> u64 {
        self.first_data + slot as u64 * self.stride
    }

    fn mapping(&self, b: u64, in_block: u64) -> Mapping {
        match self.map.get(b as usize) {
            Entry::Slot(s) => Mapping::Data {
                file_offset: self.slot_offset(s) + in_block,
            },
            Entry::Zero => Mapping::Zero,
            Entry::Free => Mapping::Unallocated,
        }
    }

    fn write_header(&self, header: &Header) -> Result<()> {
        Ok(self.storage.write_all_at(&header.encode(), 0)?)
    }

    /// On the first write of this open: a new uuidModify (as VirtualBox does),
    /// the disk size rounded to whole sectors and the allocated count.
    fn mark_modified(&self, st: &mut State) -> Result<()> {
        if st.modified {
            return Ok(());
        }
        st.header.uuid_modify = random_uuid(&st.header.uuid_modify);
        st.header.disk_size = self.size;
        st.header.blocks_allocated = st.next_slot;
        self.write_header(&st.header)?;
        st.modified = true;
        Ok(())
    }

    /// Writes `data` at `in_block` of block `b`, which has no slot yet.
    fn allocate(
        &self,
        st: &mut State,
        b: u64,
        entry: Entry,
        in_block: u64,
        data: &[u8],
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let bs = self.block_size;
        let block_start = b * bs;
        let used = bs.min(self.size - block_start);
        let (w0, w1) = (in_block, in_block + data.len() as u64);
        // Only a FREE block of a child shows its parent; ZERO blocks and base
        // images read zeros where the write does not reach.
        let from_parent = entry == Entry::Free && self.parent.is_some();
        if w0 == 0 && w1 == used && data.iter().all(|&x| x == 0) {
            if from_parent {
                self.map.stage(b as usize, Entry::Zero);
            }
            return Ok(());
        }
        let mut slot = st.free_slots.last().copied().unwrap_or(st.next_slot);
        if slot >= self.blocks && st.holes {
            // Every slot is taken or freed by a discard not yet given back
            // (freed slots are reusable only once their entries are durable):
            // give them back now.
            self.give_back(st, &mut |_, _| {})?;
            slot = st.free_slots.last().copied().unwrap_or(st.next_slot);
        }
        let no_space = || Error::NoSpace(format!("VDI has no free block slot for block {b}"));
        if slot >= self.blocks {
            return Err(no_space());
        }
        let start = st.header.slot_offset(slot).ok_or_else(no_space)?;
        let end = start.checked_add(bs).ok_or_else(no_space)?;
        let file_len = self.storage.len()?;
        let mut chunk = vec![0u8; COPY_CHUNK.min(bs) as usize];
        let mut c0 = 0u64;
        while c0 < bs {
            let c1 = (c0 + chunk.len() as u64).min(bs);
            let buf = &mut chunk[..(c1 - c0) as usize];
            buf.fill(0);
            let mut filled = false;
            let pend = c1.min(used);
            if from_parent && c0 < pend && !(w0 <= c0 && pend <= w1) {
                parent(&mut buf[..(pend - c0) as usize], block_start + c0)?;
                filled = true;
            }
            let (o0, o1) = (w0.max(c0), w1.min(c1));
            if o0 < o1 {
                buf[(o0 - c0) as usize..(o1 - c0) as usize]
                    .copy_from_slice(&data[(o0 - w0) as usize..(o1 - w0) as usize]);
                filled = true;
            }
            // Zeros past the end of the file need no write: extending the file does.
            if filled || start + c0 < file_len {
                self.storage.write_all_at(buf, start + c0)?;
            }
            c0 = c1;
        }
        if self.storage.len()? < end {
            self.storage.set_len(end)?;
        }
        if st.free_slots.last() == Some(&slot) {
            st.free_slots.pop();
        }
        st.next_slot = st.next_slot.max(slot + 1);
        self.map.stage(b as usize, Entry::Slot(slot));
        if self.map.pending() >= COMMIT_BOUND {
            self.commit_state(st)?;
        }
        Ok(())
    }

    /// Writes the staged map entries: first the header with a count above
    /// every slot in use, then a barrier (their data and that count are
    /// durable), then the entries.
    fn commit_state(&self, st: &mut State) -> Result<()> {
        self.map.commit(self.storage.as_ref(), || {
            st.header.blocks_allocated = st.next_slot;
            self.write_header(&st.header)?;
            Ok(self.storage.sync()?)
        })?;
        Ok(())
    }
}

/// Checks every map entry: its slot inside the image and its data inside the
/// file. Slots used twice are refused for writing (a write would change two
/// blocks); read-only, they are only reported.
///
/// Returns the first free slot: past the highest slot in use. That is below
/// the header's count when an allocation was interrupted between the header
/// and the map write; the unreferenced slots are then reused, and the first
/// write of this open stores the corrected count.
fn check_map(
    map: &BlockMap,
    h: &Header,
    size: u64,
    len: u64,
    writable: bool,
    path: &Path,
) -> Result<(u32, Vec<u32>)> {
    let bs = h.block_size as u64;
    let mut seen = vec![0u64; (h.blocks as usize).div_ceil(64)];
    let mut next = 0u32;
    for (b, e) in map.iter() {
        let Entry::Slot(s) = e else { continue };
        if s >= h.blocks {
            return Err(Error::corrupt(
                "VDI block map",
                format!(
                    "block {b} points at slot {s}, beyond the {} blocks of the image",
                    h.blocks
                ),
            ));
        }
        let need = bs.min(size.saturating_sub(b as u64 * bs));
        let start = h.slot_offset(s);
        let end = start.and_then(|o| o.checked_add(need));
        if end.is_none_or(|e| e > len) {
            return Err(Error::corrupt(
                "VDI block map",
                format!(
                    "block {b} (slot {s}, file offset {start:?}) ends past the end of the file ({len} bytes)"
                ),
            ));
        }
        let (w, bit) = (s as usize / 64, 1u64 << (s % 64));
        if seen[w] & bit != 0 {
            let msg = format!("slot {s} is used by more than one block (block {b})");
            if writable {
                return Err(Error::corrupt("VDI block map", msg));
            }
            log::warn!("{}: {msg}", path.display());
        }
        seen[w] |= bit;
        next = next.max(s + 1);
    }
    if next > h.blocks_allocated {
        log::warn!(
            "{}: VDI blocks use slots up to {next}, but the header counts {} allocated blocks",
            path.display(),
            h.blocks_allocated
        );
    } else if next < h.blocks_allocated {
        log::info!(
            "{}: VDI slots {next}..{} are unused (an interrupted allocation); the next write gives them back",
            path.display(),
            h.blocks_allocated
        );
    }
    let free: Vec<u32> = (0..next)
        .rev()
        .filter(|&s| seen[s as usize / 64] & (1 << (s % 64)) == 0)
        .collect();
    if !free.is_empty() {
        log::info!(
            "{}: {} VDI slots below {next} are unused (interrupted allocations); new blocks take them first",
            path.display(),
            free.len()
        );
    }
    Ok((next, free))
}

/// A random version-4 UUID in RTUUID byte order, from /dev/urandom; if that
/// cannot be read, derived from the time, the process id and `old`.
fn random_uuid(old: &[u8; 16]) -> [u8; 16] {
    let mut u = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut u));
    if read.is_err() || u == [0; 16] {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut x = nanos
            ^ (std::process::id() as u64).rotate_left(32)
            ^ u64::from_le_bytes(old[..8].try_into().unwrap_or([0; 8]));
        for c in u.chunks_mut(8) {
            // splitmix64
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            c.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
    }
    u[7] = (u[7] & 0x0F) | 0x40; // version 4 (time_hi_and_version is little-endian)
    u[8] = (u[8] & 0x3F) | 0x80; // RFC 4122 variant
    u
}

impl Image for VdiImage {
    fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
    fn format(&self) -> Format {
        Format::Vdi
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn geometry(&self) -> Option<Geometry> {
        self.geometry
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let bs = self.block_size;
        let first = self.mapping(offset / bs, offset % bs);
        let mut run = (bs - offset % bs).min(len);
        // Extend over following blocks that continue the same mapping (fixed
        // images are one contiguous run).
        while run < len {
            let next = self.mapping((offset + run) / bs, 0);
            let continues = match (first, next) {
                (Mapping::Data { file_offset: f }, Mapping::Data { file_offset: g }) => {
                    g == f + run
                }
                (a, b) => a == b,
            };
            if !continues {
                break;
            }
            run = (run + bs).min(len);
        }
        Ok((first, run))
    }

    fn write(
        &self,
        buf: &[u8],
        offset: u64,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        if !self.storage.is_writable() {
            return Err(Error::ReadOnly);
        }
        let mut st = self.state();
        self.mark_modified(&mut st)?;
        let bs = self.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (b, in_block) = (off / bs, off % bs);
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            let data = &buf[done..done + n];
            match self.map.get(b as usize) {
                Entry::Slot(s) => self
                    .storage
                    .write_all_at(data, self.slot_offset(s) + in_block)?,
                e => self.allocate(&mut st, b, e, in_block, data, parent)?,
            }
            done += n;
        }
        Ok(())
    }

    fn commit(&self) -> Result<()> {
        let mut st = self.state();
        self.commit_state(&mut st)
    }

    fn mapping_epoch(&self) -> u64 {
        self.slot_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn reclaim_pending(&self, written: bool) -> bool {
        // Only after a write of this open (an overwrite in place included,
        // which does not pass through `write`): a flush alone changes nothing.
        let st = self.state();
        st.holes && (st.modified || written)
    }

    fn reclaim(&self) -> Result<()> {
        self.commit_with_holes()
    }

    fn close(&self) -> Result<()> {
        if self.storage.is_writable() {
            self.cut_tail()?;
        }
        Ok(())
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
        (self.image_type != ImageType::Fixed).then_some(self.block_size)
    }

    fn relocate(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
        self.relocate_blocks(progress)
    }

    fn link_id(&self) -> [u8; 16] {
        self.uuid_create
    }
    fn parent_link(&self) -> Option<&ParentLink> {
        self.parent.as_ref()
    }
    fn find_parent(&self, path: &Path, opener: &dyn ParentOpener) -> Result<Option<ParentLink>> {
        let Some(link) = &self.parent else {
            return Ok(None);
        };
        Ok(Some(parent::find(
            link,
            &self.uuid_parent_modify,
            path,
            opener,
        )))
    }
    fn describe(&self) -> String {
        let st = self.state();
        let h = &st.header;
        let extra = if h.block_extra != 0 {
            format!(" + {} extra", h.block_extra)
        } else {
            String::new()
        };
        format!(
            "VDI {} {}, {} bytes, {} byte blocks{extra}, {} of {} allocated, UUID {}",
            self.version,
            self.image_type.name(),
            self.size,
            self.block_size,
            h.blocks_allocated,
            h.blocks,
            uuid_text(&self.uuid_create)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::put_le32;
    use crate::{Disk, MemStorage};

    fn image(disk: u64) -> Vec<u8> {
        let raw = header::tests::v1(disk);
        let blocks = disk.div_ceil(1 << 20) as usize;
        let data = crate::bytes::le32(&raw, 0x158) as usize;
        let mut f = vec![0u8; data];
        f[..HEADER_AREA].copy_from_slice(&raw);
        for b in 0..blocks {
            put_le32(&mut f, 0x200 + 4 * b, block_map::FREE);
        }
        f
    }

    fn disk(f: Vec<u8>) -> Disk {
        let img = VdiImage::open(
            Box::new(MemStorage::new(f)),
            Path::new("t.vdi"),
            OpenOptions { writable: true },
        )
        .unwrap();
        Disk::new(vec![Box::new(img)]).unwrap()
    }

    #[test]
    fn write_allocates_and_reads_back() {
        let d = disk(image(3 << 20));
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8 | 1).collect();
        d.write_at(&data, (1 << 20) - 100).unwrap();
        let mut back = vec![0u8; 5000];
        d.read_at(&mut back, (1 << 20) - 100).unwrap();
        assert_eq!(back, data);
        let mut z = vec![1u8; 100];
        d.read_at(&mut z, 2 << 20).unwrap();
        assert!(z.iter().all(|&x| x == 0));
    }

    #[test]
    fn map_past_eof_and_bad_slot_are_errors() {
        let mut f = image(3 << 20);
        put_le32(&mut f, 0x200, 0);
        put_le32(&mut f, 0x184, 1);
        let e = VdiImage::open(
            Box::new(MemStorage::new(f.clone())),
            Path::new("t"),
            OpenOptions::default(),
        );
        assert!(matches!(e, Err(Error::Corrupt { .. })));
        put_le32(&mut f, 0x200, 7);
        let e = VdiImage::open(
            Box::new(MemStorage::new(f)),
            Path::new("t"),
            OpenOptions::default(),
        );
        assert!(matches!(e, Err(Error::Corrupt { .. })));
    }

    #[test]
    fn random_uuids_differ() {
        let a = random_uuid(&[0; 16]);
        assert_ne!(a, random_uuid(&a));
        assert_eq!(a[7] >> 4, 4);
    }
}
