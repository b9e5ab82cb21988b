//! Growing a VDI whose block map has no room before the data area: the
//! first `k` slots of the data area become the new map, and the data area
//! starts `k` slots later (`offBlocks' = offData`, `offData' = offData + k *
//! (block + extra)`, every slot number down by `k`). The blocks in those
//! slots move to the end first. The old header stays in force until one
//! final header write (one 512-byte sector, written whole or not at all),
//! and every state before it is a valid image of the old disk.
//!
//! What the readers demand (so what each intermediate state must satisfy):
//! * VirtualBox (`vdiValidateHeader`): `offBlocks` at or after the header,
//!   `offData >= offBlocks + cBlocks * 4` (a gap between the header and the
//!   map is fine), `cBlocksAllocated <= cBlocks`, `cBlocks * block >= disk
//!   size`. Its repair marks slots in a bitmap of `cBlocks` bits, so no map
//!   entry may name a slot at or past `cBlocks`.
//! * QEMU (`vdi_open`): `offset_bmap` and `offset_data` multiples of 512
//!   (kept: the new ones are the old data offset plus whole slots); `qemu-img
//!   check` calls an entry at or past `blocks_in_image` too large and a count
//!   that differs from the slots in use a mismatch.
//! * This crate: the same, and slots in use within the file.
//!
//! So the moved blocks need free slot numbers below `cBlocks`. They go to
//! `base + j` for slot `j < k`, `base` = max(slots in use, k) (so that they
//! are still `>= k` after the renumbering). When that passes the old
//! `cBlocks` (a static image, or a dynamic one nearly full), `cBlocks` is
//! first raised to fit, if the old map area has room for the extra (FREE)
//! entries (QEMU rounds the map to 512 bytes, VirtualBox to 1 MiB: mostly
//! it has); with no room at all the grow is refused: no sequence of
//! single-sector header writes reaches the new layout through valid states.
//!
//! Order:
//! 1. Copy the blocks of slots `0..k` to slots `base..` (past the count,
//!    unused by the old header); write FREE entries for the raised part of
//!    the map (past the old `cBlocks`, unread). Barrier.
//! 2. Header: `cBlocks` raised, `cBlocksAllocated` = `base + moved`.
//!    Barrier. (The copies are now below the count but not referenced: a
//!    leak, as an interrupted allocation leaves, which `qemu-img check`
//!    reports as a count mismatch and the next writable open takes back.)
//! 3. The map entries of the moved blocks name their copies. Barrier. (Each
//!    entry is old or new after a torn write: both slots hold the block.)
//!    Slots `0..k` are now unused.
//! 4. The new map (renumbered; new blocks FREE, or allocated at the end for
//!    a static image, whose file grows first) over slots `0..k`. Barrier.
//! 5. The new header: map and data offsets, size, block count, count.
//!    Barrier.

use crate::bytes::{le32, put_le32, put_le64};
use crate::vdi::block_map::{FREE, ZERO};
use crate::vdi::header::{HEADER_AREA, Header, ImageType, SECTOR};
use crate::{Error, Result, Storage};

const COPY_CHUNK: u64 = 1 << 20;

fn write_header(storage: &dyn Storage, raw: &[u8; HEADER_AREA]) -> Result<()> {
    Header::parse(raw, storage.len()?)?;
    storage.write_all_at(raw, 0)?;
    Ok(())
}

/// Grows the VDI (header `h`, bytes `raw`) to `new_size` bytes in
/// `new_blocks` blocks, with its map moved to the start of the data area.
pub(super) fn grow_moving_map(
    storage: &dyn Storage,
    raw: &mut [u8; HEADER_AREA],
    h: &Header,
    new_size: u64,
    new_blocks: u64,
) -> Result<()> {
    let stride = h.block_size as u64 + h.block_extra as u64;
    let nb = h.blocks as u64;
    let room = h.data_offset.saturating_sub(h.blocks_offset) / 4;
    let k = (new_blocks * 4).next_multiple_of(SECTOR).div_ceil(stride);
    let new_data = h.data_offset + k * stride;
    if new_data > u32::MAX as u64 {
        return Err(Error::unsupported(format!(
            "a VDI data area at {new_data} (the header holds 32-bit offsets)"
        )));
    }
    let mut map = vec![0u8; (nb * 4) as usize];
    storage.read_exact_at(&mut map, h.blocks_offset)?;
    let entry = |map: &[u8], b: u64| le32(map, (b * 4) as usize);
    let used = |e: u32| e != FREE && e != ZERO;
    // Slots in use: at least the header's count.
    let top = (0..nb)
        .map(|b| entry(&map, b))
        .filter(|&e| used(e))
        .map(|e| e as u64 + 1)
        .max()
        .unwrap_or(0)
        .max(h.blocks_allocated as u64);
    let base = top.max(k);
    let moved = k.min(top);
    let mid_count = base + moved;
    let mid_blocks = nb.max(mid_count);
    if mid_blocks > room {
        return Err(Error::unsupported(format!(
            "the VDI block map has room for {room} blocks and {top} slots are in use: \
             moving its first {k} slots to make room for a larger map needs {mid_blocks} \
             entries in the old map; no crash-safe order exists \
             (vhdio convert -O vdi writes a new image with room)"
        )));
    }
    // 1. The blocks of slots 0..k copied to base.., past the count.
    let len = storage.len()?;
    let mut buf = vec![0u8; COPY_CHUNK.min(stride) as usize];
    let mut repoint = Vec::new();
    for b in 0..nb {
        let e = entry(&map, b);
        if !used(e) || e as u64 >= k {
            continue;
        }
        let (src, dst) = (
            h.data_offset + e as u64 * stride,
            h.data_offset + (base + e as u64) * stride,
        );
        let mut done = 0;
        while done < stride {
            let n = (stride - done).min(buf.len() as u64);
            let chunk = &mut buf[..n as usize];
            // The last slot may end before its stride (a short last block).
            let have = len.saturating_sub(src + done).min(n) as usize;
            chunk.fill(0);
            storage.read_exact_at(&mut chunk[..have], src + done)?;
            storage.write_all_at(chunk, dst + done)?;
            done += n;
        }
        repoint.push((b, base as u32 + e));
    }
    if mid_blocks > nb {
        let free = vec![0xFFu8; ((mid_blocks - nb) * 4) as usize];
        storage.write_all_at(&free, h.blocks_offset + nb * 4)?;
    }
    storage.sync()?;
    // 2. The count covers the copies (and cBlocks their slot numbers).
    let mut mid = *raw;
    put_le32(&mut mid, 0x180, mid_blocks as u32);
    put_le32(&mut mid, 0x184, mid_count as u32);
    write_header(storage, &mid)?;
    storage.sync()?;
    // 3. The moved blocks' entries name the copies.
    for &(b, slot) in &repoint {
        put_le32(&mut map, (b * 4) as usize, slot);
    }
    if !repoint.is_empty() {
        storage.write_all_at(&map, h.blocks_offset)?;
        storage.sync()?;
    }
    // 4. The new map, renumbered, over slots 0..k.
    let mut count = mid_count - k;
    let map_len = (new_blocks * 4).next_multiple_of(SECTOR) as usize;
    let mut new_map = vec![0xFFu8; map_len];
    for b in 0..nb {
        let e = entry(&map, b);
        let v = if used(e) { e - k as u32 } else { e };
        put_le32(&mut new_map, (b * 4) as usize, v);
    }
    if h.image_type == ImageType::Fixed {
        for b in nb..new_blocks {
            put_le32(&mut new_map, (b * 4) as usize, count as u32);
            count += 1;
        }
        let end = new_data + count * stride;
        if storage.len()? < end {
            storage.set_len(end)?;
        }
    }
    // Only the map's sectors: the rest of the old slots stays as it is.
    storage.write_all_at(&new_map, h.data_offset)?;
    storage.sync()?;
    // 5. The new header.
    put_le32(raw, 0x154, h.data_offset as u32);
    put_le32(raw, 0x158, new_data as u32);
    put_le64(raw, 0x170, new_size);
    put_le32(raw, 0x180, new_blocks as u32);
    put_le32(raw, 0x184, count as u32);
    write_header(storage, raw)?;
    storage.sync()?;
    Ok(())
}
