//! Changing the virtual size of a VDI (header version 1.1).
//!
//! Growing: the block map grows in place, into the space before the data
//! area (new entries free; a static image gets its new blocks allocated at
//! its end), then the header names the new size. A map without that room
//! moves into the first slots of the data area (see `relocate`).
//! Shrinking: the header first; then each slot of a removed block is filled
//! with the block of the last slot (copied, made durable, then its map entry
//! moved), so the file ends at the last block still used.

use crate::bytes::{le32, put_le32, put_le64};
use crate::vdi::block_map::FREE;
use crate::vdi::header::{HEADER_AREA, Header, ImageType, VERSION_1_1};
use crate::vdi::relocate;
use crate::{Error, Result, Storage};

fn write_header(storage: &dyn Storage, raw: &[u8; HEADER_AREA]) -> Result<()> {
    Header::parse(raw, storage.len()?)?;
    storage.write_all_at(raw, 0)?;
    Ok(())
}

/// Resizes the VDI in `storage` to `new_size` bytes (a multiple of 512).
/// Returns the old size.
pub fn resize(storage: &dyn Storage, new_size: u64) -> Result<u64> {
    let len = storage.len()?;
    let mut raw = [0u8; HEADER_AREA];
    let n = len.min(HEADER_AREA as u64) as usize;
    storage.read_exact_at(&mut raw[..n], 0)?;
    let h = Header::parse(&raw, len)?;
    if le32(&raw, 0x44) != VERSION_1_1 {
        return Err(Error::unsupported("resizing a VDI of header version 0.x"));
    }
    let old_size = h.virtual_size();
    if new_size == 0 || !new_size.is_multiple_of(512) {
        return Err(Error::unsupported(format!("VDI virtual size {new_size}")));
    }
    if new_size == old_size {
        return Ok(old_size);
    }
    let bs = h.block_size as u64;
    let stride = bs + h.block_extra as u64;
    let old_blocks = h.blocks as u64;
    let new_blocks = new_size.div_ceil(bs);
    if new_blocks > 0x1FFF_FF80 {
        return Err(Error::unsupported(format!("VDI of {new_blocks} blocks")));
    }
    let mut map = vec![0u8; (old_blocks.max(new_blocks) * 4) as usize];
    storage.read_exact_at(&mut map[..(old_blocks * 4) as usize], h.blocks_offset)?;
    let mut allocated = h.blocks_allocated as u64;
    if new_blocks > old_blocks {
        let room = h.data_offset.saturating_sub(h.blocks_offset) / 4;
        if new_blocks > room {
            relocate::grow_moving_map(storage, &mut raw, &h, new_size, new_blocks)?;
            return Ok(old_size);
        }
        let fixed = h.image_type == ImageType::Fixed;
        for b in old_blocks..new_blocks {
            let v = if fixed {
                allocated += 1;
                (allocated - 1) as u32
            } else {
                FREE
            };
            put_le32(&mut map, (b * 4) as usize, v);
        }
        if fixed {
            storage.set_len(h.data_offset + allocated * stride)?;
        }
        storage.write_all_at(
            &map[(old_blocks * 4) as usize..],
            h.blocks_offset + old_blocks * 4,
        )?;
        storage.sync()?;
    }
    put_le64(&mut raw, 0x170, new_size);
    put_le32(&mut raw, 0x180, new_blocks as u32);
    put_le32(&mut raw, 0x184, allocated as u32);
    if new_blocks >= old_blocks {
        write_header(storage, &raw)?;
        storage.sync()?;
        return Ok(old_size);
    }
    // Shrinking: the blocks past the new end are freed first (readers of
    // the old size see zeros there), then the kept blocks of the last slots
    // move into the freed ones, then the header names the new size.
    let entry = |map: &[u8], b: u64| le32(map, (b * 4) as usize);
    for b in new_blocks..old_blocks {
        put_le32(&mut map, (b * 4) as usize, FREE);
    }
    storage.write_all_at(
        &map[(new_blocks * 4) as usize..(old_blocks * 4) as usize],
        h.blocks_offset + new_blocks * 4,
    )?;
    storage.sync()?;
    // Slot -> block, for the blocks kept.
    let mut owner = vec![u64::MAX; allocated as usize];
    for b in 0..new_blocks {
        let e = entry(&map, b);
        if e != FREE && e != 0xFFFF_FFFE && (e as u64) < allocated {
            owner[e as usize] = b;
        }
    }
    let mut buf = vec![0u8; stride as usize];
    let mut slot = 0u64;
    while slot < allocated {
        if owner[slot as usize] != u64::MAX {
            slot += 1;
            continue;
        }
        // A free slot: the last slot's block moves into it, if kept.
        let last = allocated - 1;
        if last > slot && owner[last as usize] != u64::MAX {
            let b = owner[last as usize];
            storage.read_exact_at(&mut buf, h.data_offset + last * stride)?;
            storage.write_all_at(&buf, h.data_offset + slot * stride)?;
            storage.sync()?;
            put_le32(&mut map, (b * 4) as usize, slot as u32);
            storage.write_all_at(
                &map[(b * 4) as usize..(b * 4 + 4) as usize],
                h.blocks_offset + b * 4,
            )?;
            storage.sync()?;
            owner[slot as usize] = b;
            slot += 1;
        }
        allocated -= 1;
        owner.truncate(allocated as usize);
    }
    put_le32(&mut raw, 0x184, allocated as u32);
    write_header(storage, &raw)?;
    storage.sync()?;
    storage.set_len(h.data_offset + allocated * stride)?;
    storage.sync()?;
    Ok(old_size)
}
