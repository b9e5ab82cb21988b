//! Changing the virtual size of a VHD.
//!
//! Fixed: the footer moves to the new end (written there first, then the
//! old one, now inside the disk, is zeroed; shrinking writes the footer,
//! then truncates). Dynamic and differencing: the BAT grows in place
//! (max_table_entries), new entries unused, then the footers; blocks in the
//! way move to the end of the file first (`resize_bat`); where parent
//! locator data or the header follow the BAT, the BAT moves to the end of
//! the file instead. Shrinking clears
//! the BAT entries of blocks past the end (their space stays in the file).
//!
//! The footers record the new size in `current_size`, with the geometry of
//! the size; a disk whose creator is sized by its geometry (`vpc `, `qemu`)
//! gets the maximal geometry, which tells readers to take `current_size`
//! (as qemu's force_size does).

use crate::bytes::{be32, put_be16, put_be32, put_be64};
use crate::vhd::create::{MAX_SIZE, chs_geometry};
use crate::vhd::dynamic_header::{DynamicHeader, HEADER_SIZE};
use crate::vhd::footer::{DiskType, FOOTER_SIZE, Footer};
use crate::vhd::resize_bat;
use crate::{Error, Result, Storage};

const UNUSED: u32 = 0xFFFF_FFFF;

/// The footer with `current_size` = `size` and a matching geometry.
fn resized_footer(f: &Footer, size: u64) -> Result<Footer> {
    let mut raw = f.raw;
    put_be64(&mut raw, 48, size);
    let by_chs = &f.creator_app == b"vpc " || &f.creator_app == b"qemu";
    let g = chs_geometry(size);
    let (c, h, s) = if by_chs {
        (65535, 16, 255)
    } else {
        (g.cylinders.min(65535), g.heads.min(255), g.sectors.min(255))
    };
    put_be16(&mut raw, 56, c as u16);
    raw[58] = h as u8;
    raw[59] = s as u8;
    let f = Footer::parse(&raw)?;
    Ok(Footer {
        raw: f.encode(),
        ..f
    })
}

/// Resizes the VHD in `storage` to `new_size` bytes (a multiple of 512).
/// Returns the old size.
pub fn resize(storage: &dyn Storage, new_size: u64) -> Result<u64> {
    if new_size == 0 || !new_size.is_multiple_of(512) || new_size > MAX_SIZE {
        return Err(Error::unsupported(format!(
            "VHD virtual size {new_size} (a multiple of 512, at most 2040 GiB)"
        )));
    }
    let len = storage.len()?;
    if len < FOOTER_SIZE as u64 {
        return Err(Error::NotAnImage);
    }
    let footer_at = len - FOOTER_SIZE as u64;
    let mut raw = [0u8; FOOTER_SIZE];
    storage.read_exact_at(&mut raw, footer_at)?;
    let footer = Footer::parse(&raw)?;
    if !footer.checksum_ok {
        return Err(Error::unsupported(
            "VHD footer with a bad checksum: open the image for writing once (it is repaired), then resize",
        ));
    }
    let old_size = footer.virtual_size();
    if new_size == old_size {
        return Ok(old_size);
    }
    let new_footer = resized_footer(&footer, new_size)?;
    if footer.disk_type == DiskType::Fixed {
        if footer_at != old_size {
            return Err(Error::unsupported(format!(
                "fixed VHD with {footer_at} bytes of data for a disk of {old_size}"
            )));
        }
        if new_size > old_size {
            storage.set_len(new_size + FOOTER_SIZE as u64)?;
            storage.write_all_at(&new_footer.encode(), new_size)?;
            storage.sync()?;
            // The old footer is inside the disk now: new space reads zeros.
            storage.write_all_at(&[0u8; FOOTER_SIZE], old_size)?;
        } else {
            storage.write_all_at(&new_footer.encode(), new_size)?;
            storage.sync()?;
            storage.set_len(new_size + FOOTER_SIZE as u64)?;
        }
        storage.sync()?;
        return Ok(old_size);
    }
    let mut hraw = [0u8; HEADER_SIZE];
    storage.read_exact_at(&mut hraw, footer.data_offset)?;
    let header = DynamicHeader::parse(&hraw)?;
    let bs = header.block_size as u64;
    let entries = new_size.div_ceil(bs);
    let old_entries = header.max_table_entries as u64;
    let table = header.table_offset;
    let mut bat = vec![0u8; (old_entries * 4) as usize];
    storage.read_exact_at(&mut bat, table)?;
    let used: Vec<u64> = bat
        .chunks(4)
        .map(|c| be32(c, 0))
        .filter(|&e| e != UNUSED)
        .map(|e| e as u64 * 512)
        .collect();
    if new_size > old_size {
        let mut footer_at = footer_at;
        if entries > old_entries {
            // What does not move: parent locator data and the header after
            // the BAT (blocks and the footer do, see `resize_bat`).
            let mut limit = u64::MAX;
            for l in header.locators.iter().filter(|l| l.is_used()) {
                if l.data_offset > table {
                    limit = limit.min(l.data_offset);
                }
            }
            if footer.data_offset > table {
                limit = limit.min(footer.data_offset);
            }
            let batmap_at = table + (old_entries * 4).next_multiple_of(512);
            let mut cookie = [0u8; 8];
            if batmap_at + 512 <= len {
                storage.read_exact_at(&mut cookie, batmap_at)?;
            }
            if &cookie == b"tdbatmap" {
                return Err(Error::unsupported(
                    "growing the BAT of a VHD with a blktap batmap after it \
                     (vhdio convert -O vhd writes a new image)",
                ));
            }
            let room = limit.saturating_sub(table) / 4;
            if entries > room {
                // Locators or the header follow the BAT: the BAT moves.
                footer_at = resize_bat::move_bat_to_end(
                    storage,
                    &bat,
                    entries,
                    &header,
                    footer.data_offset,
                    &raw,
                    footer_at,
                )?;
                storage.write_all_at(&new_footer.encode(), footer_at)?;
                storage.write_all_at(&new_footer.encode(), 0)?;
                storage.sync()?;
                return Ok(old_size);
            }
            let bat_end = table + (entries * 4).next_multiple_of(512);
            let first_block = used.iter().copied().min().unwrap_or(u64::MAX);
            if bat_end > first_block.min(footer_at) {
                footer_at = resize_bat::move_blocks_before(
                    storage, &mut bat, table, bs, &raw, footer_at, bat_end,
                )?;
            }
            let fill = vec![0xFFu8; ((entries - old_entries) * 4) as usize];
            storage.write_all_at(&fill, table + old_entries * 4)?;
            storage.sync()?;
            let mut h = header.raw;
            put_be32(&mut h, 28, entries as u32);
            storage.write_all_at(&DynamicHeader::parse(&h)?.encode(), footer.data_offset)?;
            storage.sync()?;
        }
        storage.write_all_at(&new_footer.encode(), footer_at)?;
        storage.write_all_at(&new_footer.encode(), 0)?;
        storage.sync()?;
    } else {
        storage.write_all_at(&new_footer.encode(), footer_at)?;
        storage.write_all_at(&new_footer.encode(), 0)?;
        storage.sync()?;
        // Blocks past the new end are freed.
        for b in entries..old_entries {
            let i = (b * 4) as usize;
            if be32(&bat, i) != UNUSED {
                bat[i..i + 4].copy_from_slice(&UNUSED.to_be_bytes());
            }
        }
        storage.write_all_at(&bat, table)?;
        storage.sync()?;
    }
    Ok(old_size)
}
