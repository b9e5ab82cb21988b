//! Changing the virtual size of a VHDX: the virtual disk size in the
//! metadata and the BAT entries of the blocks added or removed, in one log
//! transaction (MS-VHDX 2.3), so a crash leaves the old or the new size.
//!
//! Growing: the new blocks are not present (read zeros, or the parent's in a
//! differencing file); a fixed file (LeaveBlocksAllocated) gets them
//! allocated at its end first. Shrinking: the entries of blocks past the new
//! end are cleared (their space stays in the file). When the BAT region
//! cannot hold the entries of the new size (1 MiB holds 128 Ki entries),
//! a larger one is written at the end of the file and the region tables
//! switch to it in the same transaction (see `resize_bat`).

use crate::bytes::{le64, put_le64};
use crate::vhdx::bat::{self, Layout};
use crate::vhdx::metadata::{self, MAX_DISK_SIZE};
use crate::vhdx::relink::{current_header, log_transaction, metadata_sectors};
use crate::vhdx::{log, region, resize_bat};
use crate::{Error, Result, Storage};

const MIB: u64 = 1 << 20;

/// Resizes the VHDX in `storage` to `new_size` bytes (a multiple of its
/// logical sector size). Returns the old size.
pub fn resize(storage: &dyn Storage, new_size: u64) -> Result<u64> {
    current_header(storage)?;
    let regions = region::read(storage, storage.len()?)?;
    let meta = metadata::read(storage, regions.metadata)?;
    let old_size = meta.virtual_size;
    let ss = meta.logical_sector_size as u64;
    if new_size == 0 || !new_size.is_multiple_of(ss) || new_size > MAX_DISK_SIZE {
        return Err(Error::unsupported(format!(
            "VHDX virtual size {new_size} (a multiple of {ss}, at most 64 TiB)"
        )));
    }
    if new_size == old_size {
        return Ok(old_size);
    }
    let layout = |size| {
        Layout::new(
            size,
            meta.block_size,
            meta.logical_sector_size,
            meta.has_parent,
        )
    };
    let (old, new) = (layout(old_size), layout(new_size));
    let region = regions.bat;
    let in_region = region.length / 8;
    if new.total_entries().max(new.payload_entries()) > in_region {
        // Only a grow can need more entries than the region holds.
        resize_bat::grow_moving_bat(storage, regions, &meta, &old, &new, new_size)?;
        return Ok(old_size);
    }
    // The BAT as it is, for the entries either size uses.
    let count = old
        .total_entries()
        .max(new.total_entries())
        .max(old.payload_entries())
        .max(new.payload_entries())
        .min(in_region);
    let mut table = vec![0u8; (count * 8) as usize];
    storage.read_exact_at(&mut table, region.offset)?;
    let original = table.clone();
    let (lo, hi) = (
        old.payload_blocks.min(new.payload_blocks),
        old.payload_blocks.max(new.payload_blocks),
    );
    let mut file_end = storage.len()?;
    for b in lo..hi {
        let i = (new.payload_index(b) * 8) as usize;
        let value = if new_size > old_size && meta.leave_blocks_allocated {
            let at = file_end.next_multiple_of(MIB);
            file_end = at + meta.block_size as u64;
            bat::entry(bat::FULLY_PRESENT, at)
        } else {
            bat::NOT_PRESENT
        };
        put_le64(&mut table, i, value);
    }
    if new_size < old_size && meta.has_parent {
        // Sector bitmaps of chunks past the new end.
        for chunk in new.bitmap_blocks..old.bitmap_blocks {
            let i = (old.bitmap_index(chunk) * 8) as usize;
            if i + 8 <= table.len() && le64(&table, i) != 0 {
                put_le64(&mut table, i, bat::NOT_PRESENT);
            }
        }
    }
    let sector = log::SECTOR as usize;
    let mut changed: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, (n, o)) in table
        .chunks(sector)
        .zip(original.chunks(sector))
        .enumerate()
    {
        if n != o {
            // Whole log sectors: pad the last one with the file's bytes.
            let at = region.offset + (i * sector) as u64;
            let mut full = vec![0u8; sector];
            storage.read_exact_at(&mut full, at)?;
            full[..n.len()].copy_from_slice(n);
            changed.push((at, full));
        }
    }
    changed.extend(metadata_sectors(storage, |m| m.virtual_size = new_size)?);
    if file_end > storage.len()? {
        // Space for the new blocks of a fixed file, before the log names it.
        storage.set_len(file_end)?;
        storage.sync()?;
    }
    log_transaction(storage, &changed)?;
    Ok(old_size)
}
