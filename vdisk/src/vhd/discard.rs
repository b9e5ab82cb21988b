//! Discard in a VHD. A base (dynamic) disk gives whole blocks back: their
//! BAT entries become unused (staged, committed after a barrier like an
//! allocation's), so they read as zeros. A differencing disk has no zero
//! state (an unused entry would show the parent): it writes zeros, as do
//! fixed disks and parts of blocks. A freed block's file space is taken by a
//! new block only after a flush has made the BAT change durable (until then
//! the old entry may still point there); `vhdio compact` gives the rest back.

use std::sync::atomic::Ordering;

use super::{Sparse, VhdImage};
use crate::{Result, Zeroing};

/// Staged BAT entries that trigger a commit without waiting for a flush
/// (as for allocations).
const COMMIT_BOUND: usize = 4096;

impl VhdImage {
    pub(super) fn discard_range(
        &self,
        offset: u64,
        len: u64,
        how: Zeroing,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let Some(s) = self.sparse.as_ref().filter(|_| self.parent.is_none()) else {
            return crate::disk::zero_fill(self, offset, len, how.punch, parent);
        };
        if !self.storage.is_writable() {
            return Err(crate::Error::ReadOnly);
        }
        self.repair_checksums()?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let b = (pos / s.block_size) as usize;
            let in_block = pos % s.block_size;
            let visible = s.block_size.min(self.size - b as u64 * s.block_size);
            let n = (visible - in_block).min(end - pos);
            if let Some(bitmap_offset) = s.bat.get(b) {
                if how.unmap && in_block == 0 && n == visible {
                    s.freed().staged.push(bitmap_offset);
                    s.bat.unmap(b);
                    s.clear_full(b);
                    s.bitmaps.written(b);
                } else {
                    self.zero_in_block(s, b, bitmap_offset, (in_block, n), how.punch)?;
                }
            }
            pos += n;
        }
        if s.bat.pending() >= COMMIT_BOUND {
            self.commit_sparse(s)?;
        }
        Ok(())
    }

    /// Zeros over the sectors of an allocated block that this file holds
    /// (the others read zeros already in a base disk): `(in_block, n)` is
    /// the range inside the block; with `punch`, holes where the host can.
    fn zero_in_block(
        &self,
        s: &Sparse,
        b: usize,
        bitmap_offset: u64,
        (in_block, n): (u64, u64),
        punch: bool,
    ) -> Result<()> {
        let data = bitmap_offset + s.bitmap_size;
        if s.is_full(b) {
            return self.write_zeros(data + in_block, n, punch);
        }
        let bits = self.current_bitmap(s, b, bitmap_offset)?;
        let (first, count) = ((in_block / 512) as u32, (n / 512) as u32);
        let mut k = 0;
        while k < count {
            let (present, run) = super::bitmap::run(&bits, first + k, count - k);
            if present {
                let at = data + (first + k) as u64 * 512;
                self.write_zeros(at, run as u64 * 512, punch)?;
            }
            k += run;
        }
        Ok(())
    }
}

impl VhdImage {
    fn write_zeros(&self, at: u64, n: u64, punch: bool) -> Result<()> {
        Ok(crate::storage::zero_file_range(
            self.storage.as_ref(),
            at,
            n,
            punch,
        )?)
    }
}

/// File space of blocks freed by discards.
#[derive(Debug, Default)]
pub(super) struct Freed {
    /// BAT change staged or committed, not known durable.
    pub staged: Vec<u64>,
    /// Durable: new blocks may start here (bitmap offsets).
    pub reusable: Vec<u64>,
}

impl VhdImage {
    /// Flush with reuse: the freed places staged before the commit are
    /// durable after it and the sync that follows.
    pub(super) fn flush_sparse(&self, s: &Sparse) -> Result<()> {
        let staged = std::mem::take(&mut s.freed().staged);
        self.commit_sparse(s)?;
        self.storage.sync()?;
        s.freed().reusable.extend(staged);
        Ok(())
    }

    /// A durable freed place for a new block, if any. A reader may still
    /// hold the place's old mapping: the epoch tells it to read again.
    pub(super) fn take_reusable(&self, s: &Sparse) -> Option<u64> {
        let place = s.freed().reusable.pop();
        if place.is_some() {
            s.reuse_epoch.fetch_add(1, Ordering::SeqCst);
        }
        place
    }
}

impl Sparse {
    pub(super) fn freed(&self) -> std::sync::MutexGuard<'_, Freed> {
        self.freed.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn clear_full(&self, b: usize) {
        self.full[b / 64].fetch_and(!(1 << (b % 64)), Ordering::Relaxed);
    }
}
