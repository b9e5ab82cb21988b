//! The block map: one little-endian u32 per block at `offBlocks`, the block's
//! slot in the data area, or FREE (never written) or ZERO (reads as zeros).

use std::sync::atomic::{AtomicU32, Ordering};

use crate::storage::read_table;
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

/// The map, held in memory; entries are atomics so readers take no lock.
#[derive(Debug)]
pub struct BlockMap {
    offset: u64,
    entries: Vec<AtomicU32>,
}

impl BlockMap {
    /// Reads `count` entries at `offset`; the caller has checked that they lie
    /// inside the file, which bounds the allocation.
    pub fn load(storage: &dyn Storage, offset: u64, count: u32) -> Result<BlockMap> {
        let entries = read_table(storage, offset, count as usize, 4, |c| {
            AtomicU32::new(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        })
        .map_err(|e| Error::corrupt("VDI block map", e.to_string()))?;
        Ok(BlockMap { offset, entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entry of block `b` (FREE past the end of the map).
    pub fn get(&self, b: usize) -> Entry {
        self.entries
            .get(b)
            .map_or(Entry::Free, |e| Entry::from_raw(e.load(Ordering::Acquire)))
    }

    /// Every block with its entry.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Entry)> + '_ {
        (0..self.entries.len()).map(|b| (b, self.get(b)))
    }

    /// Sets block `b` on disk (one 4-byte write), then in memory, so readers
    /// see a new slot only once its entry is in the file.
    pub fn set(&self, storage: &dyn Storage, b: usize, entry: Entry) -> Result<()> {
        let raw = entry.to_raw();
        storage.write_all_at(&raw.to_le_bytes(), self.offset + b as u64 * 4)?;
        self.entries[b].store(raw, Ordering::Release);
        Ok(())
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
        map.set(&s, 0, Entry::Slot(1)).unwrap();
        assert_eq!(map.get(0), Entry::Slot(1));
        assert_eq!(&s.contents()[0..4], &1u32.to_le_bytes());
        assert!(BlockMap::load(&s, 8, 3).is_err());
    }
}
