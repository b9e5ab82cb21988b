//! Rewriting the parent link of a VHD: the parent's unique id and time
//! stamp, its file name, and every parent locator, in the dynamic header;
//! making a differencing VHD standalone (a dynamic disk, no parent fields,
//! the sectors its bitmaps left to the parent zeroed).
//!
//! Whatever locators the child had (W2ru, W2ku, Wi2r, Wi2k, MacX, Mac),
//! the new link has the three [`crate::create::snapshot`] writes: W2ru
//! (relative), W2ku (absolute), MacX (file URL). Their data goes into new
//! space at the end of the file (the footer moves after it), so the old
//! locators stay valid until the header that names the new ones is written:
//! the footer is written at the new end first, then the data, a barrier,
//! then the header, a barrier.

use crate::bytes::{be32, put_be16, put_be32, put_be64};
use crate::create::Links;
use crate::vhd::bat::BlockAllocationTable;
use crate::vhd::bitmap;
use crate::vhd::dynamic_header::{DynamicHeader, HEADER_SIZE, LOCATOR_COUNT};
use crate::vhd::footer::{DiskType, FOOTER_SIZE, Footer};
use crate::{Error, Result, Storage};

/// The footer at the end of `storage` (it must be exactly there, with a good
/// checksum) and the dynamic header.
fn read(storage: &dyn Storage) -> Result<(Footer, u64, DynamicHeader)> {
    let len = storage.len()?;
    if len < 3 * FOOTER_SIZE as u64 {
        return Err(Error::NotAnImage);
    }
    let mut raw = [0u8; FOOTER_SIZE];
    let at = len - FOOTER_SIZE as u64;
    storage.read_exact_at(&mut raw, at)?;
    let footer = Footer::parse(&raw)?;
    if !footer.checksum_ok {
        return Err(Error::unsupported(
            "VHD footer with a bad checksum: open the image for writing once (it is repaired), then relink",
        ));
    }
    if !footer.disk_type.is_sparse() {
        return Err(Error::unsupported(
            "a fixed VHD cannot have a parent (convert it to a dynamic one)",
        ));
    }
    let mut h = [0u8; HEADER_SIZE];
    let hat = footer.data_offset;
    if hat.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > at) {
        return Err(Error::corrupt("VHD footer", format!("header offset {hat}")));
    }
    storage.read_exact_at(&mut h, hat)?;
    Ok((footer, at, DynamicHeader::parse(&h)?))
}

/// Writes `footer` with disk type `kind` at 0 and at `end`.
fn write_footers(storage: &dyn Storage, footer: &Footer, kind: DiskType, end: u64) -> Result<()> {
    let mut raw = footer.raw;
    put_be32(&mut raw, 60, kind.code());
    let f = Footer::parse(&raw)?;
    storage.write_all_at(&f.encode(), end)?;
    storage.write_all_at(&f.encode(), 0)?;
    Ok(())
}

/// Makes the VHD in `child` a differencing child of the VHD in `parent`,
/// named by `links`; or, with `None`, a standalone dynamic disk.
pub fn relink(child: &dyn Storage, parent: Option<(&Links, &dyn Storage)>) -> Result<()> {
    let (footer, footer_at, header) = read(child)?;
    let mut raw = header.raw;
    let Some((links, parent)) = parent else {
        // Standalone: the sectors the bitmaps leave to the parent zeroed,
        // then the footers (a dynamic disk ignores the parent fields), then
        // the header without them.
        zero_clear_sectors(child, &footer, &header, footer_at)?;
        write_footers(child, &footer, DiskType::Dynamic, footer_at)?;
        child.sync()?;
        raw[40..64].fill(0);
        raw[64..576].fill(0);
        raw[576..576 + 24 * LOCATOR_COUNT].fill(0);
        child.write_all_at(&DynamicHeader::parse(&raw)?.encode(), footer.data_offset)?;
        child.sync()?;
        return Ok(());
    };
    let pf = crate::vhd::read_footer(parent, parent.len()?)?;
    if pf.virtual_size() != footer.virtual_size() {
        return Err(Error::unsupported(format!(
            "a VHD parent of {} bytes for a child of {}",
            pf.virtual_size(),
            footer.virtual_size()
        )));
    }
    let name: Vec<u16> = links.file_name.encode_utf16().collect();
    if name.len() > 256 {
        return Err(Error::unsupported(
            "VHD parent file name longer than 256 UTF-16 units",
        ));
    }
    let locators = crate::vhd::create::locators(links);
    let mut end = footer_at.next_multiple_of(512);
    let mut placed = Vec::new();
    for (code, data) in locators {
        let space = (data.len() as u64).max(1).next_multiple_of(512);
        placed.push((code, data, end, space));
        end += space;
    }
    // The footer at the new end, then the locator data over the old footer.
    child.set_len(end + FOOTER_SIZE as u64)?;
    child.write_all_at(&footer.encode(), end)?;
    for (_, data, at, space) in &placed {
        let mut padded = data.clone();
        padded.resize(*space as usize, 0);
        child.write_all_at(&padded, *at)?;
    }
    child.sync()?;
    raw[40..56].copy_from_slice(&pf.unique_id);
    put_be32(&mut raw, 56, be32(&pf.raw, 24));
    raw[64..576].fill(0);
    for (i, u) in name.iter().enumerate() {
        put_be16(&mut raw, 64 + 2 * i, *u);
    }
    raw[576..576 + 24 * LOCATOR_COUNT].fill(0);
    for (i, (code, data, at, space)) in placed.iter().enumerate() {
        let o = 576 + 24 * i;
        raw[o..o + 4].copy_from_slice(code);
        put_be32(&mut raw, o + 4, *space as u32);
        put_be32(&mut raw, o + 8, data.len() as u32);
        put_be64(&mut raw, o + 16, *at);
    }
    child.write_all_at(&DynamicHeader::parse(&raw)?.encode(), footer.data_offset)?;
    if footer.disk_type != DiskType::Differencing {
        child.sync()?;
        write_footers(child, &footer, DiskType::Differencing, end)?;
    }
    child.sync()?;
    Ok(())
}

/// Writes zeros into every sector of an allocated block that its bitmap
/// leaves clear (it showed the parent), then a barrier. A standalone disk
/// shows zeros there, but only readers that honour the bitmap of a dynamic
/// disk read them so (vdisk does, qemu does not: it reads the block), and
/// the file may hold anything there (a block Windows allocated, space
/// reused). While the image is still differencing these sectors are not
/// read, so the zeros change nothing until the type does; a safe rebase has
/// copied every one where the parent reads other than zeros.
fn zero_clear_sectors(
    child: &dyn Storage,
    footer: &Footer,
    header: &DynamicHeader,
    footer_at: u64,
) -> Result<()> {
    let bs = header.block_size as u64;
    let size = footer.virtual_size();
    if bs == 0 || !bs.is_multiple_of(512) {
        return Err(Error::corrupt("VHD header", format!("block size {bs}")));
    }
    let count = header.max_table_entries.min(size.div_ceil(bs) as u32);
    if header.table_offset + count as u64 * 4 > footer_at {
        return Err(Error::corrupt("VHD header", "BAT past the end of the file"));
    }
    let bat = BlockAllocationTable::load(child, header.table_offset, count)?;
    let bitmap_bytes = bitmap::bitmap_size(header.block_size) as u64;
    let zeros = vec![0u8; bs.min(1 << 20) as usize];
    let mut bits = vec![0u8; bitmap_bytes as usize];
    for (b, at) in bat.allocated() {
        let sectors = ((size - b as u64 * bs).min(bs) / 512) as u32;
        let data = at + bitmap_bytes;
        if data + sectors as u64 * 512 > footer_at {
            return Err(Error::corrupt(
                "VHD BAT",
                format!("block {b} at {at} runs past the footer"),
            ));
        }
        child.read_exact_at(&mut bits, at)?;
        let mut s = 0;
        while s < sectors {
            let (present, n) = bitmap::run(&bits, s, sectors - s);
            if !present {
                let (mut pos, end) = (s as u64 * 512, (s + n) as u64 * 512);
                while pos < end {
                    let len = (end - pos).min(zeros.len() as u64);
                    child.write_all_at(&zeros[..len as usize], data + pos)?;
                    pos += len;
                }
            }
            s += n;
        }
    }
    Ok(child.sync()?)
}

/// Every BAT entry unused (one write, then a barrier), then the file cut
/// after the BAT and the locators, with the footer there.
pub fn empty(child: &dyn Storage) -> Result<()> {
    let (footer, footer_at, header) = read(child)?;
    let bat_len = (header.max_table_entries as u64 * 4).next_multiple_of(512);
    child.write_all_at(&vec![0xFF; bat_len as usize], header.table_offset)?;
    child.sync()?;
    let mut end = header.table_offset + bat_len;
    end = end.max(footer.data_offset + HEADER_SIZE as u64);
    for l in header.locators.iter().filter(|l| l.is_used()) {
        end = end.max(l.data_offset + l.space_bytes());
    }
    let end = end.next_multiple_of(512);
    if end < footer_at {
        child.write_all_at(&footer.encode(), end)?;
        child.sync()?;
        child.set_len(end + FOOTER_SIZE as u64)?;
        child.sync()?;
    }
    Ok(())
}
