//! Opening a VHD: finding and validating the footer (the end copy, else the
//! one at offset 0), the dynamic header, the BAT and the blocks it points at.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use crate::bytes::align_up;
use crate::{Error, Result, Storage};

use super::Sparse;
use super::bat::BlockAllocationTable;
use super::dynamic_header::{DynamicHeader, HEADER_SIZE};
use super::footer::{FOOTER_SIZE, Footer, NO_DATA_OFFSET};
use super::{bitmap, footer};

/// The footer of a candidate parent, quietly: the end copy, else the one at 0.
pub(super) fn peek_footer(storage: &dyn Storage) -> Option<Footer> {
    let len = storage.len().ok()?;
    let mut buf = [0u8; FOOTER_SIZE];
    let mut at = |off: u64| {
        storage
            .read_exact_at(&mut buf, off)
            .ok()
            .and_then(|_| Footer::parse(&buf).ok())
    };
    at(len.checked_sub(FOOTER_SIZE as u64)?).or_else(|| at(0))
}

/// Finds the footer: at the end of the file (or the 511-byte footer of old
/// Virtual PC), else the copy at offset 0 of a sparse disk. A copy with a good
/// checksum is preferred over one with a bad checksum.
pub(crate) fn read_footer(storage: &dyn Storage, len: u64) -> Result<Footer> {
    Ok(locate_footer(storage, len)?.footer)
}

/// The footer chosen by [`read_footer`], and the state of the one at the end.
pub(super) struct FoundFooter {
    pub(super) footer: Footer,
    /// Where the footer at the end of the file belongs: the last 512 bytes,
    /// the last 511 of a legacy file, or (when there is none) the next sector
    /// boundary, so that rewriting it never overwrites data.
    pub(super) end_at: u64,
    /// Whether the end of the file already holds exactly `footer.encode()`.
    pub(super) end_exact: bool,
}

pub(super) fn locate_footer(storage: &dyn Storage, len: u64) -> Result<FoundFooter> {
    if len < FOOTER_SIZE as u64 {
        return Err(Error::NotAnImage);
    }
    let mut last = [0u8; FOOTER_SIZE];
    storage.read_exact_at(&mut last, len - FOOTER_SIZE as u64)?;
    let mut end = Footer::parse(&last);
    let mut end_at = len - FOOTER_SIZE as u64;
    if end.is_err() && last[1..9] == *footer::COOKIE {
        let mut old = [0u8; FOOTER_SIZE];
        old[..511].copy_from_slice(&last[1..]);
        end = Footer::parse(&old);
        end_at = len - 511;
    }
    if let Err(Error::Unsupported(e)) = end {
        return Err(Error::Unsupported(e));
    }
    if end.is_err() {
        end_at = align_up(len, 512).unwrap_or(len);
    }
    let mut buf = [0u8; FOOTER_SIZE];
    storage.read_exact_at(&mut buf, 0)?;
    let copy = Footer::parse(&buf).ok().filter(|f| f.disk_type.is_sparse());
    let footer = match (end, copy) {
        (Ok(e), _) if e.checksum_ok => e,
        (_, Some(c)) if c.checksum_ok => {
            log::warn!("VHD footer at the end of the file is damaged; using the copy at offset 0");
            c
        }
        (Ok(e), _) => e,
        (Err(_), Some(c)) => {
            log::warn!("VHD footer at the end of the file is missing; using the copy at offset 0");
            c
        }
        (Err(e), None) => return Err(e),
    };
    let end_exact = end_at == len - FOOTER_SIZE as u64 && last == footer.encode();
    Ok(FoundFooter {
        footer,
        end_at,
        end_exact,
    })
}

/// Two BAT entries whose blocks overlap: reading is harmless, but a write into
/// one would change the other, so a writable open refuses the file. (Sorting
/// the entries costs only writers; reads open without it.)
pub(super) fn refuse_overlapping_blocks(s: &Sparse) -> Result<()> {
    let mut starts: Vec<(u64, usize)> = s.bat.allocated().map(|(b, off)| (off, b)).collect();
    starts.sort_unstable();
    let span = s.bitmap_size + s.block_size;
    for pair in starts.windows(2) {
        let ((a, ba), (b, bb)) = (pair[0], pair[1]);
        if a + span > b {
            return Err(Error::corrupt(
                "VHD BAT",
                format!("blocks {ba} and {bb} overlap in the file (at {a} and {b})"),
            ));
        }
    }
    Ok(())
}

pub(super) fn open_sparse(
    storage: &dyn Storage,
    footer: &Footer,
    size: u64,
    len: u64,
) -> Result<Sparse> {
    let header_offset = footer.data_offset;
    if header_offset == NO_DATA_OFFSET
        || header_offset
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|e| e > len)
    {
        return Err(Error::corrupt(
            "VHD footer",
            format!("dynamic header offset {header_offset}"),
        ));
    }
    let mut raw = [0u8; HEADER_SIZE];
    storage.read_exact_at(&mut raw, header_offset)?;
    let header = DynamicHeader::parse(&raw)?;
    let block_size = header.block_size as u64;
    let entries = header.max_table_entries as u64;
    if entries * block_size < size {
        return Err(Error::corrupt(
            "VHD dynamic header",
            format!("{entries} blocks of {block_size} bytes < disk size {size}"),
        ));
    }
    let bat_end = header
        .table_offset
        .checked_add(entries * 4)
        .filter(|&e| e <= len);
    let Some(bat_end) = bat_end else {
        return Err(Error::corrupt(
            "VHD dynamic header",
            format!("BAT at {} with {entries} entries", header.table_offset),
        ));
    };
    // Only the entries that cover the disk are used.
    let used = size.div_ceil(block_size) as u32;
    let bat = BlockAllocationTable::load(storage, header.table_offset, used)?;
    let bitmap_size = bitmap::bitmap_size(header.block_size) as u64;
    let mut next_free =
        (header_offset + HEADER_SIZE as u64).max(align_up(bat_end, 512).unwrap_or(bat_end));
    // A block over the footer copy, the header or the BAT would have its data
    // writes destroy them: refuse such a file rather than corrupt it further.
    let metadata = [
        (0, FOOTER_SIZE as u64),
        (header_offset, header_offset + HEADER_SIZE as u64),
        (header.table_offset, bat_end),
    ];
    for (b, off) in bat.allocated() {
        let end = off + bitmap_size + block_size;
        if end > len {
            return Err(Error::corrupt(
                "VHD BAT",
                format!("block {b} at {off} extends past the end of the file ({len})"),
            ));
        }
        if let Some((s, e)) = metadata.iter().find(|&&(s, e)| off < e && s < end) {
            return Err(Error::corrupt(
                "VHD BAT",
                format!("block {b} at {off} overlaps the structures at {s}..{e}"),
            ));
        }
        next_free = next_free.max(end);
    }
    for loc in header.locators.iter().filter(|l| l.is_used()) {
        if let Some(end) = loc
            .data_offset
            .checked_add(loc.space_bytes().max(loc.data_length as u64))
            && end <= len
        {
            next_free = next_free.max(end);
        }
    }
    let batmap_at = header.table_offset + align_up(entries * 4, 512).unwrap_or(0);
    let batmap = batmap_end(storage, batmap_at, len)?;
    next_free = next_free.max(batmap);
    // What compaction must not move blocks over.
    let mut structures = metadata.to_vec();
    structures.push((
        header.table_offset,
        align_up(bat_end, 512).unwrap_or(bat_end),
    ));
    if batmap > 0 {
        structures.push((batmap_at, batmap));
    }
    for loc in header.locators.iter().filter(|l| l.is_used()) {
        let n = loc.space_bytes().max(loc.data_length as u64);
        structures.push((loc.data_offset, loc.data_offset.saturating_add(n)));
    }
    Ok(Sparse {
        bitmaps: bitmap::BitmapCache::new(bitmap_size),
        pending_bitmaps: Default::default(),
        commit_lock: Mutex::new(()),
        full: (0..bat.len().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect(),
        header,
        header_offset,
        bat,
        block_size,
        bitmap_size,
        next_free: AtomicU64::new(next_free),
        zeros_from: AtomicU64::new(len),
        allocated_here: AtomicU64::new(0),
        structures,
        freed: Default::default(),
        reuse_epoch: AtomicU64::new(0),
    })
}

/// blktap may keep a "batmap" right after the BAT; new blocks must not overwrite
/// it, and an encrypted disk (keyhash cookie set) must be refused.
fn batmap_end(storage: &dyn Storage, at: u64, len: u64) -> Result<u64> {
    if at + 512 > len {
        return Ok(0);
    }
    let mut h = [0u8; 512];
    storage.read_exact_at(&mut h, at)?;
    if &h[..8] != b"tdbatmap" {
        return Ok(0);
    }
    if h[29] != 0 {
        return Err(Error::unsupported(
            "VHD encrypted by blktap (batmap keyhash set)",
        ));
    }
    let off = crate::bytes::be64(&h, 8);
    let sectors = crate::bytes::be32(&h, 16) as u64;
    Ok(off.saturating_add(sectors * 512).min(len).max(at + 512))
}
