//! Making room for a larger BAT in a dynamic or differencing VHD: the
//! blocks that lie where the grown BAT goes move to the end of the file,
//! then the BAT grows in place (`vhd::resize`). The BAT stays where every
//! reader expects it (after the header); only block offsets change, which
//! any reader follows.
//!
//! Order, each step valid for the old disk:
//! 1. The footer (unchanged, the old size) is written past the space the
//!    moved blocks take at the end of the file (and past the grown BAT, if
//!    that reaches the old footer). Barrier. The last 512 bytes
//!    are a footer again; the old one is now unused bytes in the middle.
//! 2. Each block (sector bitmap and data) is copied there, sectors aligned
//!    as new blocks are (data on 4 KiB). Barrier. Nothing points at them.
//! 3. The BAT entries of the moved blocks name their copies (each 4-byte
//!    entry is old or new after a torn write: both places hold the block).
//!    Barrier. Their old places are unused now.
//! 4. Then `resize` grows the BAT over them, the header, the footers.
//!
//! Parent locator data or the dynamic header after the BAT (a differencing
//! VHD made by this crate or blktap's vhd-util has its locators right after
//! the BAT) are not moved: their offsets are in the header's second sector
//! and its checksum in the first, a two-sector write that a torn write
//! leaves with a bad checksum. There the BAT itself moves instead, to the
//! end of the file (`move_bat_to_end`): its offset, the entry count and the
//! checksum are all in the header's first sector, one atomic write. A
//! blktap batmap after the BAT is refused.

use crate::bytes::{be32, put_be32, put_be64};
use crate::vhd::dynamic_header::DynamicHeader;
use crate::vhd::{DATA_ALIGN, bitmap};
use crate::{Error, Result};
use crate::{Storage, bytes::align_up};

const UNUSED: u32 = 0xFFFF_FFFF;
const COPY_CHUNK: u64 = 1 << 20;

/// Moves every block of `bat` (the BAT's bytes at `table`, updated here)
/// that starts before `bat_end` to the end of the file, past `footer_at`
/// and `bat_end`, with `footer` written after them. Returns the new footer
/// offset.
pub(super) fn move_blocks_before(
    storage: &dyn Storage,
    bat: &mut [u8],
    table: u64,
    block_size: u64,
    footer: &[u8],
    footer_at: u64,
    bat_end: u64,
) -> Result<u64> {
    let no_space = || Error::NoSpace("VHD file offset".into());
    let bitmap_size = bitmap::bitmap_size(block_size as u32) as u64;
    let mut moving = Vec::new();
    let mut end = footer_at.max(bat_end);
    for (b, c) in bat.chunks(4).enumerate() {
        let e = be32(c, 0);
        if e == UNUSED || (e as u64) * 512 >= bat_end {
            continue;
        }
        let from = e as u64 * 512;
        let data = align_up(end + bitmap_size, DATA_ALIGN).ok_or_else(no_space)?;
        let to = data - bitmap_size;
        end = data + block_size;
        moving.push((b, from, to));
    }
    if moving.is_empty() && bat_end <= footer_at {
        return Ok(footer_at);
    }
    let new_footer_at = align_up(end, 512).ok_or_else(no_space)?;
    if new_footer_at / 512 > u32::MAX as u64 {
        return Err(no_space());
    }
    // 1. A footer at the new end.
    storage.write_all_at(footer, new_footer_at)?;
    storage.sync()?;
    // 2. The copies.
    let len = storage.len()?;
    let total = bitmap_size + block_size;
    let mut buf = vec![0u8; COPY_CHUNK.min(total) as usize];
    for &(_, from, to) in &moving {
        let mut done = 0;
        while done < total {
            let n = (total - done).min(buf.len() as u64);
            let chunk = &mut buf[..n as usize];
            let have = len.saturating_sub(from + done).min(n) as usize;
            chunk.fill(0);
            storage.read_exact_at(&mut chunk[..have], from + done)?;
            storage.write_all_at(chunk, to + done)?;
            done += n;
        }
    }
    storage.sync()?;
    // 3. The entries name the copies.
    for &(b, _, to) in &moving {
        put_be32(bat, b * 4, (to / 512) as u32);
    }
    storage.write_all_at(bat, table)?;
    storage.sync()?;
    Ok(new_footer_at)
}

/// Writes the BAT (`bat`, the old entries; grown to `entries`, the new ones
/// unused) at the end of the file, then names it in the dynamic header at
/// `header_offset`. Order: `footer` (unchanged) past the new BAT, barrier
/// (the old footer is unused bytes now); the BAT over the old footer,
/// barrier; the header's first sector (table offset, entry count,
/// checksum), barrier. Returns the new footer offset.
pub(super) fn move_bat_to_end(
    storage: &dyn Storage,
    bat: &[u8],
    entries: u64,
    header: &DynamicHeader,
    header_offset: u64,
    footer: &[u8],
    footer_at: u64,
) -> Result<u64> {
    let no_space = || Error::NoSpace("VHD file offset".into());
    let at = align_up(footer_at, 512).ok_or_else(no_space)?;
    let bat_len = (entries * 4).next_multiple_of(512);
    let mut table = vec![0xFFu8; bat_len as usize];
    table[..bat.len()].copy_from_slice(bat);
    let new_footer_at = at + bat_len;
    storage.write_all_at(footer, new_footer_at)?;
    storage.sync()?;
    storage.write_all_at(&table, at)?;
    storage.sync()?;
    let mut raw = header.raw;
    put_be64(&mut raw, 16, at);
    put_be32(&mut raw, 28, entries as u32);
    let encoded = DynamicHeader::parse(&raw)?.encode();
    // Only the first sector differs (the checksum is at 36).
    let first = if encoded[512..] == header.raw[512..] {
        512
    } else {
        encoded.len()
    };
    storage.write_all_at(&encoded[..first], header_offset)?;
    storage.sync()?;
    Ok(new_footer_at)
}
