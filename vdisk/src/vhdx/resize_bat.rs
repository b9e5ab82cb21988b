//! Growing a VHDX whose BAT region is too small for the new size: a new,
//! larger BAT region at the end of the file, then the region tables and the
//! virtual size switched to it in one log transaction (MS-VHDX 2.3).
//!
//! Order, and what a crash leaves:
//! 1. The new region is written past the end of the file (1 MiB aligned,
//!    a whole number of MiB long, MS-VHDX 2.2.3.2), holding every entry of
//!    the old BAT at the same index (the interleaving of payload and
//!    sector-bitmap entries depends only on the chunk ratio, see
//!    `bat::Layout`, not on the size) and the new entries (not present, or
//!    allocated after the region in a fixed file). Then a barrier. Until
//!    the log names the change, the file is the old disk with unused bytes
//!    at its end (nothing points there).
//! 2. One log transaction: the changed 4 KiB sectors of both region tables
//!    (at 192 KiB and 256 KiB; the CRC-32C covers the whole 64 KiB table,
//!    so only its first sector changes) and of the metadata (virtual disk
//!    size). The entry is durable before a header names it, so a crash
//!    leaves either no active log (old disk) or a log whose replay gives
//!    the new one. The log may write anywhere 4 KiB aligned: our replay
//!    refuses only targets below 192 KiB (identifier and headers), QEMU's
//!    `vhdx_log_desc_is_valid` checks only the 4 KiB alignment, and both
//!    replay the log before reading the region table.
//!
//! The old BAT region is left as unused space (no region, log or block
//! points at it). New blocks go after the new region: the allocator
//! appends at the (1 MiB aligned) end of the file, as QEMU's does.

use crate::vhdx::bat::{self, Layout};
use crate::vhdx::metadata::Metadata;
use crate::vhdx::region::{self, Region, Regions};
use crate::vhdx::relink::{log_transaction, metadata_sectors};
use crate::vhdx::{MIB, log};
use crate::{Error, Result, Storage};

/// Grows the VHDX in `storage` from layout `old` to `new` (`new_size`
/// bytes), moving its BAT to a new region at the end of the file.
pub(super) fn grow_moving_bat(
    storage: &dyn Storage,
    regions: Regions,
    meta: &Metadata,
    old: &Layout,
    new: &Layout,
    new_size: u64,
) -> Result<()> {
    let needed = new.total_entries().max(new.payload_entries());
    let length = (needed * 8).next_multiple_of(MIB);
    if length > u32::MAX as u64 & !(MIB - 1) {
        return Err(Error::unsupported(format!(
            "a VHDX BAT of {needed} entries (larger than a region can be)"
        )));
    }
    let file_len = storage.len()?;
    let raw_table = region::read_raw(storage, file_len)?;
    let offset = file_len.next_multiple_of(MIB);
    let bat_region = Region { offset, length };
    // The old entries, at the same indices; the rest not present.
    let in_old = regions.bat.length / 8;
    let old_count = old
        .total_entries()
        .max(old.payload_entries())
        .min(in_old)
        .min(needed);
    let mut table = vec![0u8; length as usize];
    storage.read_exact_at(&mut table[..(old_count * 8) as usize], regions.bat.offset)?;
    let mut end = bat_region.end();
    if meta.leave_blocks_allocated {
        // A fixed file keeps every block allocated: the new ones after the region.
        for b in old.payload_blocks..new.payload_blocks {
            let at = end.next_multiple_of(MIB);
            end = at + meta.block_size as u64;
            let i = (new.payload_index(b) * 8) as usize;
            table[i..i + 8].copy_from_slice(&bat::entry(bat::FULLY_PRESENT, at).to_le_bytes());
        }
    }
    storage.set_len(end)?;
    storage.write_all_at(&table, offset)?;
    // The new region is durable before the log may name it.
    storage.sync()?;
    let new_table = region::with_bat(&raw_table, bat_region)?;
    region::parse(&new_table, storage.len()?)?;
    let mut changed: Vec<(u64, Vec<u8>)> = Vec::new();
    let sector = log::SECTOR as usize;
    let mut on_disk = vec![0u8; region::TABLE_SIZE];
    for slot in region::SLOTS {
        storage.read_exact_at(&mut on_disk, slot)?;
        for (i, (n, o)) in new_table
            .chunks(sector)
            .zip(on_disk.chunks(sector))
            .enumerate()
        {
            if n != o {
                changed.push((slot + (i * sector) as u64, n.to_vec()));
            }
        }
    }
    changed.extend(metadata_sectors(storage, |m| m.virtual_size = new_size)?);
    log_transaction(storage, &changed)
}
