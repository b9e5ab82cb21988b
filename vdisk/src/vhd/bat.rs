//! The block allocation table: one big-endian u32 per block, the sector of the
//! block's bitmap, or 0xFFFFFFFF for a block that is not allocated.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::storage::read_table;
use crate::{Error, Result, Storage};

pub const UNUSED: u32 = 0xFFFF_FFFF;

/// The BAT, held in memory; entries are atomics so readers take no lock.
#[derive(Debug)]
pub struct BlockAllocationTable {
    offset: u64,
    entries: Vec<AtomicU32>,
}

impl BlockAllocationTable {
    /// Reads `count` entries at `offset`; the caller has bounded both by the file length.
    pub fn load(storage: &dyn Storage, offset: u64, count: u32) -> Result<BlockAllocationTable> {
        let entries = read_table(storage, offset, count as usize, 4, |c| {
            AtomicU32::new(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        })
        .map_err(|e| Error::corrupt("VHD BAT", e.to_string()))?;
        Ok(BlockAllocationTable { offset, entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// File offset of block `b`'s bitmap, if allocated.
    pub fn get(&self, b: usize) -> Option<u64> {
        match self.entries.get(b)?.load(Ordering::Acquire) {
            UNUSED => None,
            sector => Some(sector as u64 * 512),
        }
    }

    /// Every allocated block: (index, file offset of its bitmap).
    pub fn allocated(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        (0..self.entries.len()).filter_map(|b| self.get(b).map(|o| (b, o)))
    }

    /// Points block `b` at `file_offset` on disk, then in memory (so readers see
    /// the block only once its entry is durable in the page cache).
    pub fn set(&self, storage: &dyn Storage, b: usize, file_offset: u64) -> Result<()> {
        let sector = u32::try_from(file_offset / 512)
            .ok()
            .filter(|&s| s != UNUSED && file_offset.is_multiple_of(512))
            .ok_or_else(|| {
                Error::NoSpace("VHD blocks cannot start beyond 2 TiB in the file".into())
            })?;
        storage.write_all_at(&sector.to_be_bytes(), self.offset + b as u64 * 4)?;
        self.entries[b].store(sector, Ordering::Release);
        Ok(())
    }
}
