//! Writing a dynamic or differencing VHD: block allocation, sector bitmaps
//! and their group commit, the reservation before the footer.
//!
//! Power-loss order: data (and a new block's first bitmap) go to the file at
//! once; BAT entries, and in a differencing disk the bitmap changes of
//! allocated blocks, stay in memory until a commit writes them after a
//! barrier, so nothing on the disk points at (or marks present, over the
//! parent's data) data that is not durable.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::footer::FOOTER_SIZE;
use super::{DATA_ALIGN, Sparse, VhdImage, bitmap};
use crate::bytes::align_up;
use crate::{Error, Result};

/// New blocks go into space reserved at the end of the file, before the
/// footer; the reservation grows by what this open has allocated so far,
/// within these bounds. Each growth costs one barrier (the new footer must be
/// durable before a block overwrites the old one); the unused part is given
/// back at close, or by the next writable open after a crash.
const RESERVE_MIN: u64 = 64 << 20;
const RESERVE_MAX: u64 = 1 << 30;

/// Staged BAT entries or bitmaps that trigger a commit without waiting for
/// a flush.
const COMMIT_BOUND: usize = 4096;

impl VhdImage {
    /// Block `b`'s bitmap as readers must see it: the pending change, else
    /// the file's.
    pub(super) fn current_bitmap(
        &self,
        s: &Sparse,
        b: usize,
        bitmap_offset: u64,
    ) -> Result<Arc<[u8]>> {
        match s.pending_bitmaps.get(b) {
            Some(bits) => Ok(bits),
            None => Ok(self.read_bitmap(s, bitmap_offset)?.into()),
        }
    }

    pub(super) fn read_bitmap(&self, s: &Sparse, bitmap_offset: u64) -> Result<Vec<u8>> {
        let mut bits = vec![0u8; s.bitmap_size as usize];
        self.storage.read_exact_at(&mut bits, bitmap_offset)?;
        Ok(bits)
    }

    /// Writes sectors of one block (`offset..offset + buf.len()` inside block `b`).
    pub(super) fn write_in_block(
        &self,
        s: &Sparse,
        b: usize,
        buf: &[u8],
        offset: u64,
    ) -> Result<()> {
        let in_block = offset % s.block_size;
        let first = (in_block / 512) as u32;
        let count = (buf.len() / 512) as u32;
        match s.bat.get(b) {
            Some(bitmap_offset) => {
                // Data now, the bitmap at the next commit (after a barrier): a
                // crash in between leaves the old view, never garbage mapped.
                self.storage
                    .write_all_at(buf, bitmap_offset + s.bitmap_size + in_block)?;
                if !s.is_full(b) {
                    let bits = self.current_bitmap(s, b, bitmap_offset)?;
                    let full = if bitmap::run(&bits, first, count) != (true, count) {
                        let mut bits = bits.to_vec();
                        bitmap::set_range(&mut bits, first, count);
                        let full = bitmap::is_full(&bits, s.sectors_per_block());
                        if self.parent.is_some() {
                            s.pending_bitmaps.stage(b, bits.into());
                        } else {
                            // In a base image a sector not present reads
                            // zeros, and allocation zeroed it in the file: a
                            // bit that lands before its data shows those
                            // zeros, the old content. So the bitmap goes to
                            // the file now, where readers that ignore bitmaps
                            // (qemu) and this library agree after a kill.
                            self.storage.write_all_at(&bits, bitmap_offset)?;
                        }
                        s.bitmaps.written(b);
                        full
                    } else {
                        bitmap::is_full(&bits, s.sectors_per_block())
                    };
                    if full {
                        s.mark_full(b);
                    }
                    if s.pending_bitmaps.len() >= COMMIT_BOUND {
                        self.commit_sparse(s)?;
                    }
                }
            }
            None => self.allocate(s, b, buf, first, count)?,
        }
        Ok(())
    }

    /// Allocates block `b` in the reserved space and writes the first data.
    ///
    /// Power-loss order: the footer that ends the file is durable before a
    /// block may overwrite the old one ([`VhdImage::reserve`]); bitmap and
    /// data are written, and the BAT entry is only staged: it reaches the
    /// file at the next commit, after a barrier. A crash before that leaks
    /// the block; the BAT never points at data that is not on the disk.
    fn allocate(&self, s: &Sparse, b: usize, buf: &[u8], first: u32, count: u32) -> Result<()> {
        // The place of a block a discard freed (durably), else new space.
        let reused = self.take_reusable(s);
        let start = reused.unwrap_or(s.next_free.load(Ordering::Acquire));
        let data = match reused {
            Some(bitmap_offset) => bitmap_offset + s.bitmap_size,
            None => align_up(start + s.bitmap_size, DATA_ALIGN)
                .ok_or_else(|| Error::NoSpace("file offset".into()))?,
        };
        let bitmap_offset = data - s.bitmap_size;
        let end = data + s.block_size;
        if reused.is_none() {
            self.reserve(s, end)?;
        }
        // The new block may cover bytes that held something: an old footer,
        // leaked blocks, or a gap Windows leaves before the footer (formats.md
        // trap 7). Sectors this write does not cover must read as zeros, also
        // for readers that ignore bitmaps (qemu), so clear them before the BAT
        // points here. `zeros_from` only speaks for space above `next_free`:
        // a reused place (below it) holds the freed block's data everywhere.
        let zeros_from = match reused {
            Some(_) => u64::MAX,
            None => s.zeros_from.load(Ordering::Acquire),
        };
        let written = data + first as u64 * 512..data + (first + count) as u64 * 512;
        self.zero(data..written.start, zeros_from)?;
        self.zero(written.end..end, zeros_from)?;
        let mut bits = vec![0u8; s.bitmap_size as usize];
        bitmap::set_range(&mut bits, first, count);
        self.storage.write_all_at(&bits, bitmap_offset)?;
        self.storage.write_all_at(buf, data + first as u64 * 512)?;
        s.bat.stage(b, bitmap_offset)?;
        if reused.is_none() {
            s.next_free.store(end, Ordering::Release);
            s.allocated_here.fetch_add(end - start, Ordering::AcqRel);
        }
        if count == s.sectors_per_block() {
            s.mark_full(b);
        }
        if s.bat.pending() >= COMMIT_BOUND {
            self.commit_sparse(s)?;
        }
        Ok(())
    }

    /// Makes room for blocks up to `end`: moves the footer past a new
    /// reservation and makes it durable, then clears the old footer, whose
    /// place new blocks take.
    fn reserve(&self, s: &Sparse, end: u64) -> Result<()> {
        let old_at = self.footer_at.load(Ordering::Acquire);
        if end <= old_at {
            return Ok(());
        }
        let unallocated = (s.bat.len() - s.bat.allocated().count()) as u64;
        let most = unallocated * (s.bitmap_size + s.block_size + DATA_ALIGN);
        let grow = s
            .allocated_here
            .load(Ordering::Acquire)
            .clamp(RESERVE_MIN, RESERVE_MAX)
            .min(most);
        let new_at =
            align_up(end + grow, 512).ok_or_else(|| Error::NoSpace("file offset".into()))?;
        let len = self.storage.len()?;
        self.storage.write_all_at(&self.footer().encode(), new_at)?;
        self.storage.sync()?;
        self.footer_at.store(new_at, Ordering::Release);
        // Everything from the old footer on is now zeros, once it is cleared.
        self.zero(old_at..len.min(new_at), u64::MAX)?;
        s.zeros_from.fetch_min(old_at, Ordering::AcqRel);
        Ok(())
    }

    /// Writes the staged BAT entries and bitmaps, after a barrier for the
    /// data they point at or mark present. One commit at a time, so that a
    /// flush finding nothing pending knows every earlier commit is written.
    pub(super) fn commit_sparse(&self, s: &Sparse) -> Result<()> {
        let _one = s.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        let bitmaps = s.pending_bitmaps.snapshot();
        let mut synced = false;
        s.bat.commit(self.storage.as_ref(), || {
            synced = true;
            Ok(self.storage.sync()?)
        })?;
        if bitmaps.is_empty() {
            return Ok(());
        }
        if !synced {
            self.storage.sync()?;
        }
        for (b, bits) in &bitmaps {
            if let Some(bitmap_offset) = s.bat.get(*b) {
                self.storage.write_all_at(bits, bitmap_offset)?;
            }
        }
        // Still pending until here, so readers never fell back to the file's
        // older bitmap.
        s.pending_bitmaps.committed(&bitmaps);
        Ok(())
    }

    /// Gives back the unused reservation: the footer moves to just past the
    /// last block (durably, in space nothing uses), then the file is cut.
    pub(super) fn trim_reservation(&self, s: &Sparse) -> Result<()> {
        let used = align_up(s.next_free.load(Ordering::Acquire), 512).unwrap_or(u64::MAX);
        if self.footer_at.load(Ordering::Acquire) <= used {
            return Ok(());
        }
        self.storage.write_all_at(&self.footer().encode(), used)?;
        self.storage.sync()?;
        self.storage.set_len(used + FOOTER_SIZE as u64)?;
        self.footer_at.store(used, Ordering::Release);
        s.zeros_from.store(used, Ordering::Release);
        Ok(())
    }

    /// Writes zeros over the part of `range` that lies below `zeros_from`
    /// (the rest reads as zeros already).
    fn zero(&self, range: std::ops::Range<u64>, zeros_from: u64) -> Result<()> {
        const CHUNK: u64 = 256 * 1024;
        let end = range.end.min(zeros_from);
        let mut pos = range.start;
        if pos >= end {
            return Ok(());
        }
        let zeros = vec![0u8; CHUNK.min(end - pos) as usize];
        while pos < end {
            let n = CHUNK.min(end - pos) as usize;
            self.storage.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}
