//! The block allocation table (MS-VHDX 2.5): payload entries interleaved with
//! one sector-bitmap entry after every `chunk_ratio` payload entries.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::vhdx::region::Region;
use crate::{Error, Result, Storage};

/// Payload block states.
pub const NOT_PRESENT: u64 = 0;
pub const UNDEFINED: u64 = 1;
pub const ZERO: u64 = 2;
pub const UNMAPPED: u64 = 3;
/// UNMAPPED in the 0.95 draft; QEMU reads it as zeros.
pub const UNMAPPED_V095: u64 = 5;
pub const FULLY_PRESENT: u64 = 6;
pub const PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap block state (differencing files).
pub const SB_BLOCK_PRESENT: u64 = 6;

const OFFSET_MASK: u64 = !0xF_FFFF;

pub fn state(entry: u64) -> u64 {
    entry & 7
}
pub fn offset(entry: u64) -> u64 {
    entry & OFFSET_MASK
}
pub fn entry(state: u64, offset: u64) -> u64 {
    debug_assert_eq!(offset & !OFFSET_MASK, 0);
    offset | state
}

/// Sizes derived from the metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub block_size: u64,
    pub sector_size: u64,
    /// Payload blocks per sector-bitmap block (2^23 sectors per chunk).
    pub chunk_ratio: u64,
    pub payload_blocks: u64,
    pub bitmap_blocks: u64,
    pub has_parent: bool,
    /// log2 of `block_size` and of `chunk_ratio`: both are powers of two (the
    /// metadata parser refuses other block sizes), and the read path divides
    /// by them on every call.
    block_shift: u32,
    chunk_shift: u32,
}

impl Layout {
    /// `block_size` and `sector_size` are powers of two, as the metadata
    /// parser and `create` enforce.
    pub fn new(virtual_size: u64, block_size: u32, sector_size: u32, has_parent: bool) -> Layout {
        debug_assert!(block_size.is_power_of_two() && sector_size.is_power_of_two());
        let chunk_ratio = (1u64 << 23) * sector_size as u64 / block_size as u64;
        let payload_blocks = virtual_size.div_ceil(block_size as u64);
        Layout {
            block_size: block_size as u64,
            sector_size: sector_size as u64,
            chunk_ratio,
            payload_blocks,
            bitmap_blocks: payload_blocks.div_ceil(chunk_ratio),
            has_parent,
            block_shift: block_size.trailing_zeros(),
            chunk_shift: chunk_ratio.trailing_zeros(),
        }
    }
    /// The payload block holding virtual `offset`, and the offset within it.
    pub fn block_of(&self, offset: u64) -> (u64, u64) {
        (offset >> self.block_shift, offset & (self.block_size - 1))
    }
    pub fn payload_index(&self, b: u64) -> u64 {
        b + (b >> self.chunk_shift)
    }
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        (chunk + 1) * self.chunk_ratio + chunk
    }
    /// Entries the payload blocks need (the last payload index + 1).
    pub fn payload_entries(&self) -> u64 {
        self.payload_index(self.payload_blocks - 1) + 1
    }
    /// Entries a writer allocates: QEMU's counts (every bitmap entry of a
    /// differencing file included).
    pub fn total_entries(&self) -> u64 {
        if self.has_parent {
            self.bitmap_blocks * (self.chunk_ratio + 1)
        } else {
            self.payload_entries()
        }
    }
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.sector_size
    }
}

/// The BAT in memory; entries are atomics so readers take no lock.
#[derive(Debug)]
pub struct Bat {
    pub region: Region,
    entries: Vec<AtomicU64>,
}

impl Bat {
    /// Reads the entries the disk uses (bitmap entries of the last chunk too,
    /// where the region holds them). The region lies inside the file.
    pub fn load(storage: &dyn Storage, region: Region, layout: &Layout) -> Result<Bat> {
        let in_region = region.length / 8;
        if layout.payload_entries() > in_region {
            return Err(Error::corrupt(
                "VHDX BAT",
                format!(
                    "{} entries needed, the region holds {in_region}",
                    layout.payload_entries()
                ),
            ));
        }
        let count = layout.total_entries().min(in_region);
        let entries = crate::storage::read_table(storage, region.offset, count as usize, 8, |c| {
            AtomicU64::new(crate::bytes::le64(c, 0))
        })?;
        Ok(Bat { region, entries })
    }

    pub fn get(&self, index: u64) -> Option<u64> {
        Some(
            self.entries
                .get(usize::try_from(index).ok()?)?
                .load(Ordering::Acquire),
        )
    }

    /// Sets an entry in memory (readers see it at once; the file follows at
    /// the next commit).
    pub fn set(&self, index: u64, value: u64) {
        if let Some(e) = usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get(i))
        {
            e.store(value, Ordering::Release);
        }
    }

    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// File offset of the entry `index`.
    pub fn entry_offset(&self, index: u64) -> u64 {
        self.region.offset + index * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving() {
        // 512-byte sectors, 1 MiB blocks: 4096 payload entries per chunk.
        let l = Layout::new(10 << 30, 1 << 20, 512, false);
        assert_eq!(l.chunk_ratio, 4096);
        assert_eq!(l.payload_index(4095), 4095);
        assert_eq!(l.payload_index(4096), 4097);
        assert_eq!(l.bitmap_index(0), 4096);
        assert_eq!(l.bitmap_index(1), 8193);
        assert_eq!(Layout::new(1 << 30, 32 << 20, 512, false).chunk_ratio, 128);
        // 4 KiB sectors: chunks of 32 GiB.
        let l = Layout::new(1 << 30, 1 << 20, 4096, true);
        assert_eq!(l.chunk_ratio, 32768);
        assert_eq!(l.total_entries(), 32769);
        assert_eq!(l.payload_entries(), 1024);
        // QEMU's count for a non-differencing disk: PB + (PB-1)/CR.
        let l = Layout::new(5 << 30, 1 << 20, 512, false);
        assert_eq!(l.total_entries(), 5120 + 5119 / 4096);
    }

    #[test]
    fn entries() {
        let e = entry(FULLY_PRESENT, 3 << 20);
        assert_eq!((state(e), offset(e)), (FULLY_PRESENT, 3 << 20));
    }
}
