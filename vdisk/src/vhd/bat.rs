//! The block allocation table: one big-endian u32 per block, the sector of the
//! block's bitmap, or 0xFFFFFFFF for a block that is not allocated.

use crate::table::{ByteOrder, EntryTable};
use crate::{Error, Result, Storage};

pub const UNUSED: u32 = 0xFFFF_FFFF;

/// The BAT, held in memory; new entries stay pending until committed.
#[derive(Debug)]
pub struct BlockAllocationTable {
    table: EntryTable,
}

impl BlockAllocationTable {
    /// Reads `count` entries at `offset`; the caller has bounded both by the file length.
    pub fn load(storage: &dyn Storage, offset: u64, count: u32) -> Result<BlockAllocationTable> {
        let table = EntryTable::load(storage, offset, count as usize, ByteOrder::Big)
            .map_err(|e| Error::corrupt("VHD BAT", e.to_string()))?;
        Ok(BlockAllocationTable { table })
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// File offset of block `b`'s bitmap, if allocated.
    pub fn get(&self, b: usize) -> Option<u64> {
        match self.table.get(b)? {
            UNUSED => None,
            sector => Some(sector as u64 * 512),
        }
    }

    /// Every allocated block: (index, file offset of its bitmap).
    pub fn allocated(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        (0..self.len()).filter_map(|b| self.get(b).map(|o| (b, o)))
    }

    /// Points block `b` at `file_offset` in memory; the file's entry is
    /// written by the next [`BlockAllocationTable::commit`].
    pub fn stage(&self, b: usize, file_offset: u64) -> Result<()> {
        let sector = u32::try_from(file_offset / 512)
            .ok()
            .filter(|&s| s != UNUSED && file_offset.is_multiple_of(512))
            .ok_or_else(|| {
                Error::NoSpace("VHD blocks cannot start beyond 2 TiB in the file".into())
            })?;
        self.table.stage(b, sector);
        Ok(())
    }

    /// Marks block `b` unused in memory (it reads as zeros, or the parent);
    /// the file's entry follows at the next commit.
    pub fn unmap(&self, b: usize) {
        self.table.stage(b, UNUSED);
    }

    /// Entries staged and not committed.
    pub fn pending(&self) -> usize {
        self.table.pending()
    }

    /// Writes the staged entries after `barrier`; see [`EntryTable::commit`].
    pub fn commit(
        &self,
        storage: &dyn Storage,
        barrier: impl FnOnce() -> Result<()>,
    ) -> Result<bool> {
        self.table.commit(storage, barrier)
    }
}
