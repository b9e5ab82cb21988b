//! VHD (Microsoft Virtual Hard Disk 1.0, "vpc" in qemu): fixed, dynamic and
//! differencing disks.
//!
//! Layouts: fixed `[data][footer]`; dynamic and differencing `[footer copy]
//! [dynamic header][BAT][blocks...][footer]`, where each block is a sector
//! bitmap followed by `block_size` bytes of data.

pub mod azure;
pub mod bat;
pub mod bitmap;
mod compact;
pub mod create;
mod discard;
pub mod dynamic_header;
pub mod footer;
pub mod locator;
pub mod relink;
pub mod resize;
mod resize_bat;

mod alloc;
mod open;

pub(crate) use open::read_footer;
use open::{FoundFooter, locate_footer, open_sparse, peek_footer, refuse_overlapping_blocks};

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{
    Error, Format, Geometry, Image, Mapping, OpenOptions, ParentLink, ParentOpener, Result, Storage,
};
use bat::BlockAllocationTable;
use dynamic_header::DynamicHeader;
use footer::{DiskType, FOOTER_SIZE, Footer};

/// Data of newly allocated blocks starts on this boundary in the file (as
/// Windows and blktap do), so guest pages map to file pages.
pub(crate) const DATA_ALIGN: u64 = 4096;

/// A VHD file.
pub struct VhdImage {
    storage: Box<dyn Storage>,
    footer: Mutex<Footer>,
    size: u64,
    sparse: Option<Sparse>,
    parent: Option<ParentLink>,
    /// Set when a damaged checksum must be rewritten before the first write.
    repair_checksums: AtomicBool,
    /// Where the footer at the end of the file is (see `FoundFooter::end_at`);
    /// a dynamic disk's reservation moves it.
    footer_at: AtomicU64,
}

/// The parts of a dynamic or differencing disk.
struct Sparse {
    header: DynamicHeader,
    header_offset: u64,
    bat: BlockAllocationTable,
    block_size: u64,
    bitmap_size: u64,
    /// One bit per block: its bitmap is known to be all ones, so reads skip it.
    full: Vec<AtomicU64>,
    /// Bitmaps of partly written blocks, for reads.
    bitmaps: bitmap::BitmapCache,
    /// Bitmap changes waiting for the next commit.
    pending_bitmaps: bitmap::PendingBitmaps,
    /// Held for the whole of a commit.
    commit_lock: Mutex<()>,
    /// Where the next block may start: past every structure and block.
    next_free: AtomicU64,
    /// `zeros_from..footer_at`, above `next_free`, is known to read zeros
    /// (reserved space the file grew into): new blocks need no zeroing there.
    zeros_from: AtomicU64,
    /// Bytes of blocks this open allocated (sizes the next reservation).
    allocated_here: AtomicU64,
    /// File extents of the structures (footer copy, header, BAT, batmap,
    /// parent locators): compaction moves no block over them.
    structures: Vec<(u64, u64)>,
    /// File space freed by discards, and when it may be reused.
    freed: Mutex<discard::Freed>,
    /// Counts reuses of freed places ([`Image::mapping_epoch`]).
    reuse_epoch: AtomicU64,
}

impl Sparse {
    fn is_full(&self, b: usize) -> bool {
        self.full[b / 64].load(Ordering::Relaxed) & (1 << (b % 64)) != 0
    }
    fn mark_full(&self, b: usize) {
        self.full[b / 64].fetch_or(1 << (b % 64), Ordering::Relaxed);
    }
    fn sectors_per_block(&self) -> u32 {
        (self.block_size / 512) as u32
    }
}

impl VhdImage {
    pub fn open(storage: Box<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<VhdImage> {
        let len = storage.len()?;
        let FoundFooter {
            footer,
            end_at,
            end_exact,
        } = locate_footer(storage.as_ref(), len)?;
        // Rewritten on the first write: a bad checksum, a damaged or legacy
        // footer at the end, a footer copy at 0 that differs.
        let mut repair = !footer.checksum_ok || !end_exact;
        let size = footer.virtual_size();
        let mut sparse = None;
        let mut parent = None;
        match footer.disk_type {
            DiskType::Fixed => {
                if size > end_at {
                    return Err(Error::corrupt(
                        "VHD",
                        format!("fixed disk of {size} bytes in a file of {len} bytes"),
                    ));
                }
            }
            DiskType::Dynamic | DiskType::Differencing => {
                let s = open_sparse(storage.as_ref(), &footer, size, len)?;
                if opts.writable {
                    refuse_overlapping_blocks(&s)?;
                }
                let mut copy = [0u8; FOOTER_SIZE];
                storage.read_exact_at(&mut copy, 0)?;
                repair |= !s.header.checksum_ok || copy != footer.encode();
                if footer.disk_type == DiskType::Differencing {
                    parent = Some(ParentLink {
                        candidates: locator::parent_candidates(storage.as_ref(), &s.header, path)?,
                        id: s.header.parent_unique_id,
                        alternate_id: None,
                        description: format!(
                            "VHD parent '{}' with unique id {}",
                            s.header.parent_name,
                            hex(&s.header.parent_unique_id)
                        ),
                    });
                }
                sparse = Some(s);
            }
        }
        if repair {
            log::warn!(
                "{}: VHD checksum mismatch or damaged footer; reading anyway",
                path.display()
            );
        }
        let _ = opts;
        Ok(VhdImage {
            storage,
            footer: Mutex::new(footer),
            size,
            sparse,
            parent,
            repair_checksums: AtomicBool::new(repair),
            footer_at: AtomicU64::new(end_at),
        })
    }

    pub fn disk_type(&self) -> DiskType {
        self.footer().disk_type
    }

    pub fn block_size(&self) -> Option<u64> {
        self.sparse.as_ref().map(|s| s.block_size)
    }

    fn footer(&self) -> std::sync::MutexGuard<'_, Footer> {
        self.footer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rewrites the footer (at the end and, for sparse disks, the copy at 0) and
    /// the dynamic header with correct checksums, once, before the first write.
    fn repair_checksums(&self) -> Result<()> {
        if !self.repair_checksums.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let bytes = self.footer().encode();
        self.storage
            .write_all_at(&bytes, self.footer_at.load(Ordering::Acquire))?;
        if let Some(s) = &self.sparse {
            self.storage.write_all_at(&bytes, 0)?;
            self.storage
                .write_all_at(&s.header.encode(), s.header_offset)?;
        }
        Ok(())
    }
}

impl VhdImage {
    /// Warns when the parent's footer time stamp differs from the one the
    /// child's header records for it (the parent may have been modified since
    /// the child was made). Never fails: identity is the unique id, checked
    /// when the chain is opened. A stamp of 0 means "not recorded" (Windows 10
    /// writes 0), and blktap (`tap`) records the parent *file*'s mtime, which
    /// is not visible through `Storage`: neither is compared.
    fn check_parent_timestamp(
        &self,
        s: &Sparse,
        link: &ParentLink,
        path: &Path,
        opener: &dyn ParentOpener,
    ) {
        let expected = s.header.parent_timestamp;
        if expected == 0 || &self.footer().creator_app == b"tap\0" {
            return;
        }
        for candidate in &link.candidates {
            let Ok(storage) = opener.open_parent(candidate) else {
                continue;
            };
            let Some(f) = peek_footer(storage.as_ref()) else {
                continue;
            };
            if f.unique_id != link.id {
                continue;
            }
            if f.timestamp != expected {
                log::warn!(
                    "{}: parent {} has time stamp {} but the child records {} (seconds since 2000); \
                     the parent may have changed since the child was made",
                    path.display(),
                    candidate.display(),
                    f.timestamp,
                    expected
                );
            }
            return;
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Image for VhdImage {
    fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
    fn format(&self) -> Format {
        Format::Vhd
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn geometry(&self) -> Option<Geometry> {
        Some(self.footer().geometry)
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let Some(s) = &self.sparse else {
            return Ok((
                Mapping::Data {
                    file_offset: offset,
                },
                len,
            ));
        };
        let b = (offset / s.block_size) as usize;
        let in_block = offset % s.block_size;
        let max = len.min(s.block_size - in_block);
        let Some(bitmap_offset) = s.bat.get(b) else {
            return Ok((Mapping::Unallocated, max));
        };
        let data = Mapping::Data {
            file_offset: bitmap_offset + s.bitmap_size + in_block,
        };
        if s.is_full(b) {
            return Ok((data, max));
        }
        let bits = match s.pending_bitmaps.get(b).or_else(|| s.bitmaps.get(b)) {
            Some(bits) => bits,
            None => {
                let generation = s.bitmaps.generation();
                let bits: std::sync::Arc<[u8]> = self.read_bitmap(s, bitmap_offset)?.into();
                if !bitmap::is_full(&bits, s.sectors_per_block()) {
                    s.bitmaps.put(b, bits.clone(), generation);
                }
                bits
            }
        };
        if bitmap::is_full(&bits, s.sectors_per_block()) {
            s.mark_full(b);
            return Ok((data, max));
        }
        let sector = (in_block / 512) as u32;
        let within = in_block % 512;
        let max_sectors = (within + max).div_ceil(512) as u32;
        let (present, n) = bitmap::run(&bits, sector, max_sectors);
        let run = (n as u64 * 512 - within).min(max);
        Ok((if present { data } else { Mapping::Unallocated }, run))
    }

    fn write(
        &self,
        buf: &[u8],
        offset: u64,
        _parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        self.repair_checksums()?;
        let Some(s) = &self.sparse else {
            return Ok(self.storage.write_all_at(buf, offset)?);
        };
        // Sector bitmaps make copy-on-write unnecessary: unwritten sectors of a
        // new block keep reading from the parent (or as zeros).
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let b = (off / s.block_size) as usize;
            let n = ((s.block_size - off % s.block_size) as usize).min(buf.len() - done);
            self.write_in_block(s, b, &buf[done..done + n], off)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        match &self.sparse {
            Some(s) if self.storage.is_writable() => self.flush_sparse(s),
            _ => Ok(self.storage.sync()?),
        }
    }

    fn commit(&self) -> Result<()> {
        match &self.sparse {
            Some(s) => self.commit_sparse(s),
            None => Ok(()),
        }
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
        self.sparse.as_ref().map(|s| s.block_size)
    }

    fn mapping_epoch(&self) -> u64 {
        self.sparse
            .as_ref()
            .map_or(0, |s| s.reuse_epoch.load(Ordering::SeqCst))
    }

    fn relocate(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
        self.relocate_blocks(progress)
    }

    fn close(&self) -> Result<()> {
        match &self.sparse {
            Some(s) if self.storage.is_writable() => {
                self.commit_sparse(s)?;
                self.trim_reservation(s)
            }
            _ => Ok(()),
        }
    }

    fn link_id(&self) -> [u8; 16] {
        self.footer().unique_id
    }
    fn parent_link(&self) -> Option<&ParentLink> {
        self.parent.as_ref()
    }
    fn find_parent(&self, path: &Path, opener: &dyn ParentOpener) -> Result<Option<ParentLink>> {
        if let (Some(link), Some(s)) = (&self.parent, &self.sparse) {
            self.check_parent_timestamp(s, link, path, opener);
        }
        Ok(self.parent.clone())
    }
    fn describe(&self) -> String {
        let f = self.footer();
        let kind = match f.disk_type {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        };
        let block = self
            .sparse
            .as_ref()
            .map(|s| format!(", {} byte blocks", s.block_size))
            .unwrap_or_default();
        format!(
            "VHD {kind}, {} bytes{block}, creator '{}'",
            self.size,
            String::from_utf8_lossy(&f.creator_app)
        )
    }
}
