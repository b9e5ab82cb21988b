//! The block map: one little-endian u32 per block at `offBlocks`, the block's
//! slot in the data area, or FREE (never written) or ZERO (reads as zeros).

use crate::table::{ByteOrder, EntryTable};
use crate::{Error, Result, Storage};

/// Never allocated: zeros in a base image, the parent's data in a child.
pub const FREE: u32 = 0xFFFF_FFFF;
/// Discarded or written as zeros: zeros whatever the parent holds.
pub const ZERO: u32 = 0xFFFF_FFFE;

/// One map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Free,
    Zero,
    /// Index of the block's slot in the data area.
    Slot(u32),
}

impl Entry {
    fn from_raw(v: u32) -> Entry {
        match v {
            FREE => Entry::Free,
            ZERO => Entry::Zero,
            s => Entry::Slot(s),
        }
    }
    fn to_raw(self) -> u32 {
        match self {
            Entry::Free => FREE,
            Entry::Zero => ZERO,
            Entry::Slot(s) => s,
        }
    }
}

/// The map, held in memory; new entries stay pending until committed.
#[derive(Debug)]
pub struct BlockMap {
    table: EntryTable,
}

impl BlockMap {
    /// Reads `count` entries at `offset`; the caller has checked that they lie
    /// inside the file, which bounds the allocation.
    pub fn load(storage: &dyn Storage, offset: u64, count: u32) -> Result<BlockMap> {
        let table = EntryTable::load(storage, offset, count as usize, ByteOrder::Little)
            .map_err(|e| Error::corrupt("VDI block map", e.to_string()))?;
        Ok(BlockMap { table })
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Entry of block `b` (FREE past the end of the map).
    pub fn get(&self, b: usize) -> Entry {
        self.table.get(b).map_or(Entry::Free, Entry::from_raw)
    }

    /// Every block with its entry.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Entry)> + '_ {
        (0..self.len()).map(|b| (b, self.get(b)))
    }

    /// Sets block `b` in memory; the file follows at the next commit.
    pub fn stage(&self, b: usize, entry: Entry) {
        self.table.stage(b, entry.to_raw());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    #[test]
    fn load_get_set() {
        let mut data = vec![0u8; 16];
        data[0..4].copy_from_slice(&FREE.to_le_bytes());
        data[4..8].copy_from_slice(&ZERO.to_le_bytes());
        data[8..12].copy_from_slice(&7u32.to_le_bytes());
        let s = MemStorage::new(data);
        let map = BlockMap::load(&s, 0, 3).unwrap();
        assert_eq!(
            (map.get(0), map.get(1), map.get(2), map.get(3)),
            (Entry::Free, Entry::Zero, Entry::Slot(7), Entry::Free)
        );
        map.stage(0, Entry::Slot(1));
        assert_eq!(map.get(0), Entry::Slot(1));
        assert_eq!(&s.contents()[0..4], &FREE.to_le_bytes());
        map.commit(&s, || Ok(())).unwrap();
        assert_eq!(&s.contents()[0..4], &1u32.to_le_bytes());
        assert!(BlockMap::load(&s, 8, 3).is_err());
    }
}
