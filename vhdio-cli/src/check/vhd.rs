//! `vhdio check` of a VHD file: both footers and their checksums, the
//! dynamic header and its checksum, BAT entries inside the file, blocks
//! overlapping each other or the metadata, sector bitmaps, parent locators
//! (qemu-img cannot check VHD at all).

use vdisk::Storage;
use vdisk::bytes::{be32, be64};
use vdisk::vhd::bitmap;
use vdisk::vhd::dynamic_header::{DynamicHeader, HEADER_SIZE};
use vdisk::vhd::footer::{COOKIE, DiskType, FOOTER_SIZE, Footer, NO_DATA_OFFSET, checksum};

use super::{Report, read_at};

/// A named byte range of the file, for overlap checks.
struct Extent {
    start: u64,
    end: u64,
    what: String,
}

pub(super) fn check_vhd(s: &dyn Storage, r: &mut Report) -> std::io::Result<()> {
    let len = s.len()?;
    if len < FOOTER_SIZE as u64 {
        r.problem(format!("file of {len} bytes cannot hold a footer"));
        return Ok(());
    }
    let end_raw = read_at(s, FOOTER_SIZE, len - FOOTER_SIZE as u64)?;
    let mut footer_at = len - FOOTER_SIZE as u64;
    let end = if &end_raw[..8] == COOKIE {
        Some(end_raw)
    } else if &end_raw[1..9] == COOKIE {
        r.note("511-byte footer (written by old Virtual PC)");
        footer_at = len - 511;
        let mut b = end_raw[1..].to_vec();
        b.push(0);
        Some(b)
    } else {
        r.problem("no footer ('conectix') at the end of the file");
        None
    };
    let check_sum = |b: &[u8], at: usize, what: &str, r: &mut Report| {
        let (stored, computed) = (be32(b, at), checksum(b, at));
        if stored != computed {
            r.problem(format!(
                "{what} checksum {stored:#010x}, computed {computed:#010x}"
            ));
        }
    };
    let end_footer = match &end {
        Some(b) => {
            check_sum(b, 64, "footer", r);
            match Footer::parse(b) {
                Ok(f) => Some(f),
                Err(e) => {
                    r.problem(format!("footer at the end: {e}"));
                    None
                }
            }
        }
        None => None,
    };
    let copy_raw = read_at(s, FOOTER_SIZE, 0)?;
    let copy = Footer::parse(&copy_raw)
        .ok()
        .filter(|f| f.disk_type.is_sparse());
    let footer = match (&end_footer, &copy) {
        (Some(f), _) => f.clone(),
        (None, Some(c)) => {
            r.note("using the footer copy at offset 0");
            c.clone()
        }
        (None, None) => return Ok(()),
    };
    let raw = footer.raw;
    if be32(&raw, 8) & 2 == 0 {
        r.note("footer features: reserved bit 0x2 not set");
    }
    if be32(&raw, 12) != 0x0001_0000 {
        r.problem(format!(
            "footer file format version {:#010x} (not 1.0)",
            be32(&raw, 12)
        ));
    }
    let size = footer.virtual_size();
    let g = footer.geometry;
    let chs = g.cylinders as u64 * g.heads as u64 * g.sectors as u64 * 512;
    if chs != footer.current_size && size == chs {
        r.note(format!(
            "size from CHS geometry ({chs} bytes, creator '{}'), current size field says {}",
            String::from_utf8_lossy(&footer.creator_app),
            footer.current_size
        ));
    }
    if footer.disk_type == DiskType::Fixed {
        if footer.data_offset != NO_DATA_OFFSET {
            r.note(format!(
                "fixed disk with data offset {:#x}",
                footer.data_offset
            ));
        }
        if footer_at < size {
            r.problem(format!(
                "fixed disk of {size} bytes, but the footer is at {footer_at}"
            ));
        } else if footer_at > size {
            r.note(format!(
                "{} bytes between the data and the footer",
                footer_at - size
            ));
        }
        return Ok(());
    }
    // Dynamic and differencing disks.
    match &copy {
        None => r.problem("no valid footer copy at offset 0"),
        Some(_) => {
            check_sum(&copy_raw, 64, "footer copy (offset 0)", r);
            if end_footer
                .as_ref()
                .is_some_and(|f| f.raw[..] != copy_raw[..])
            {
                r.problem("the footer copy at offset 0 differs from the footer at the end");
            }
        }
    }
    let ho = footer.data_offset;
    if ho == NO_DATA_OFFSET || ho.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) {
        r.problem(format!("dynamic header offset {ho:#x} outside the file"));
        return Ok(());
    }
    let hraw = read_at(s, HEADER_SIZE, ho)?;
    let h = match DynamicHeader::parse(&hraw) {
        Ok(h) => h,
        Err(e) => {
            r.problem(format!("dynamic header: {e}"));
            return Ok(());
        }
    };
    check_sum(&hraw, 36, "dynamic header", r);
    if be64(&hraw, 8) != u64::MAX {
        r.problem(format!(
            "dynamic header data offset {:#x} (must be all ones)",
            be64(&hraw, 8)
        ));
    }
    if be32(&hraw, 24) != 0x0001_0000 {
        r.problem(format!(
            "dynamic header version {:#010x} (not 1.0)",
            be32(&hraw, 24)
        ));
    }
    let bs = h.block_size as u64;
    let entries = h.max_table_entries as u64;
    if entries * bs < size {
        r.problem(format!(
            "{entries} blocks of {bs} bytes cannot hold the disk size {size}"
        ));
    }
    if h.table_offset % 512 != 0 {
        r.problem(format!(
            "BAT offset {:#x} not sector aligned",
            h.table_offset
        ));
    }
    let bat_len = (entries * 4).next_multiple_of(512);
    if h.table_offset
        .checked_add(entries * 4)
        .is_none_or(|e| e > len)
    {
        r.problem(format!(
            "BAT of {entries} entries at {:#x} extends past the end of the file",
            h.table_offset
        ));
        return Ok(());
    }
    let mut extents = vec![
        Extent {
            start: ho,
            end: ho + HEADER_SIZE as u64,
            what: "dynamic header".into(),
        },
        Extent {
            start: h.table_offset,
            end: h.table_offset + bat_len,
            what: "BAT".into(),
        },
        Extent {
            start: footer_at,
            end: len,
            what: "footer".into(),
        },
    ];
    if ho != 0 {
        extents.push(Extent {
            start: 0,
            end: FOOTER_SIZE as u64,
            what: "footer copy".into(),
        });
    }
    // Parent locators.
    let is_diff = footer.disk_type == DiskType::Differencing;
    let mut used_locators = 0;
    for (i, loc) in h.locators.iter().enumerate().filter(|(_, l)| l.is_used()) {
        used_locators += 1;
        let code = String::from_utf8_lossy(&loc.platform_code).into_owned();
        let space = loc.space_bytes().max(loc.data_length as u64);
        match loc.data_offset.checked_add(space) {
            Some(e) if e <= len => extents.push(Extent {
                start: loc.data_offset,
                end: e,
                what: format!("parent locator {i} ({code})"),
            }),
            _ => r.problem(format!(
                "parent locator {i} ({code}) at {:#x} extends past the end of the file",
                loc.data_offset
            )),
        }
        if !is_diff {
            r.note(format!(
                "parent locator {i} ({code}) in a disk that is not differencing"
            ));
        }
    }
    if is_diff {
        if used_locators == 0 && h.parent_name.is_empty() {
            r.problem("differencing disk without parent locators or parent name");
        }
        if h.parent_unique_id == [0; 16] {
            r.note("parent unique id is zero (blktap: raw parent)");
        }
    }
    // Blocks.
    let used = size.div_ceil(bs);
    let bat = read_at(s, (entries * 4) as usize, h.table_offset)?;
    let bm_size = bitmap::bitmap_size(h.block_size) as u64;
    let sectors_per_block = (bs / 512) as u32;
    let mut empty = 0usize;
    for b in 0..entries {
        let e = be32(&bat, (b * 4) as usize);
        if e == vdisk::vhd::bat::UNUSED {
            continue;
        }
        let start = e as u64 * 512;
        let end = start + bm_size + bs;
        if b >= used {
            r.note(format!(
                "block {b} is allocated but lies past the disk size"
            ));
        }
        if end > footer_at {
            r.problem(format!(
                "block {b} (bitmap at {start:#x}, ends at {end:#x}) extends past the footer at {footer_at:#x}"
            ));
            continue;
        }
        extents.push(Extent {
            start,
            end,
            what: format!("block {b}"),
        });
        let bits = read_at(s, bm_size as usize, start)?;
        // Sectors of the block inside the disk.
        let inside = ((size - (b * bs).min(size)).min(bs) / 512) as u32;
        if b < used && bitmap::run(&bits, 0, sectors_per_block) == (false, sectors_per_block) {
            empty += 1;
        }
        if inside < sectors_per_block {
            let rest = sectors_per_block - inside;
            if bitmap::run(&bits, inside, rest) != (false, rest) {
                r.note(format!(
                    "block {b}: bitmap bits set for sectors past the end of the disk"
                ));
            }
        }
    }
    if empty > 0 {
        r.note(format!(
            "{empty} allocated block(s) with an empty bitmap (space not used)"
        ));
    }
    extents.sort_by_key(|e| (e.start, e.end));
    for w in extents.windows(2) {
        if w[1].start < w[0].end {
            r.problem(format!(
                "{} ({:#x}..{:#x}) overlaps {} ({:#x}..{:#x})",
                w[0].what, w[0].start, w[0].end, w[1].what, w[1].start, w[1].end
            ));
        }
    }
    Ok(())
}
