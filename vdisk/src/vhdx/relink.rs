//! Rewriting the parent link of a VHDX: the parent locator entries
//! (parent_linkage, relative_path, absolute_win32_path; parent_linkage2
//! while a commit into the parent is in progress) and the HasParent flag,
//! in the metadata region, through the log (MS-VHDX 2.3): the changed
//! sectors are written as a log entry, made durable and named by a header;
//! then written in place, durable, and the header's LogGuid cleared. A crash
//! at any point leaves the old or the new metadata (a reader replays the log).

use crate::bytes::put_le64;
use crate::create::Links;
use crate::vhdx::MIB;
use crate::vhdx::bat::{self, Layout};
use crate::vhdx::guid::Guid;
use crate::vhdx::header::{self, Header, SLOTS};
use crate::vhdx::metadata::{self, Metadata};
use crate::vhdx::{log, region};
use crate::{Error, Result, Storage};

/// The current header (and its slot) of a VHDX, with its log replayed
/// first if it is not empty (an interrupted writer or relink), as a
/// writable open does.
pub(crate) fn current_header(storage: &dyn Storage) -> Result<(Header, usize)> {
    header::check_identifier(storage)?;
    let (mut h, mut slot) = header::read_current(storage)?;
    if !h.log_guid.is_zero() {
        if !storage.is_writable() {
            return Err(Error::unsupported(
                "VHDX parent with a log that was not replayed: open it for writing once",
            ));
        }
        let replay = log::Log::new(storage, h.log_offset, h.log_length as u64)
            .find_active(h.log_guid)?
            .ok_or_else(|| Error::corrupt("VHDX log", "log GUID set, no valid entries"))?;
        log::replay_on_disk(storage, &replay)?;
        storage.sync()?;
        for _ in 0..2 {
            write_header(storage, &mut h, &mut slot, |h| h.log_guid = Guid::ZERO)?;
            storage.sync()?;
        }
    }
    Ok((h, slot))
}

/// Writes header `h` (sequence + 1, changed by `change`) into the other slot.
fn write_header(
    storage: &dyn Storage,
    h: &mut Header,
    slot: &mut usize,
    change: impl Fn(&mut Header),
) -> Result<()> {
    h.sequence += 1;
    change(h);
    *slot = 1 - *slot;
    storage.write_all_at(&h.encode(), SLOTS[*slot])?;
    Ok(())
}

/// The 4 KiB sectors of the metadata region that change when `change` is
/// applied to it, with their new contents (validated by the reader).
pub(crate) fn metadata_sectors(
    storage: &dyn Storage,
    change: impl FnOnce(&mut Metadata),
) -> Result<Vec<(u64, Vec<u8>)>> {
    let regions = region::read(storage, storage.len()?)?;
    let region = regions.metadata;
    let mut meta = metadata::read(storage, region)?;
    change(&mut meta);
    let pairs: Vec<(&str, &str)> = meta
        .parent_locator
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let locator = meta.has_parent.then(|| metadata::encode_locator(&pairs));
    let mut new = metadata::encode(&meta, locator.as_deref());
    if new.len() as u64 > region.length {
        return Err(Error::unsupported(format!(
            "VHDX metadata of {} bytes in a region of {}",
            new.len(),
            region.length
        )));
    }
    new.resize(region.length as usize, 0);
    // Validate the new metadata with the reader before anything is written.
    let check = crate::MemStorage::new(new.clone());
    metadata::read(
        &check,
        region::Region {
            offset: 0,
            length: region.length,
        },
    )?;
    let mut old = vec![0u8; region.length as usize];
    storage.read_exact_at(&mut old, region.offset)?;
    let sector = log::SECTOR as usize;
    Ok(new
        .chunks(sector)
        .zip(old.chunks(sector))
        .enumerate()
        .filter(|(_, (n, o))| n != o)
        .map(|(i, (n, _))| (region.offset + (i * sector) as u64, n.to_vec()))
        .collect())
}

/// Writes whole 4 KiB sectors `changed` (file offset, contents) through the
/// log: an entry, a barrier, a header naming it, a barrier, the sectors in
/// place, a barrier, the header's LogGuid cleared (both slots).
pub(crate) fn log_transaction(storage: &dyn Storage, changed: &[(u64, Vec<u8>)]) -> Result<()> {
    let (mut h, mut slot) = current_header(storage)?;
    if changed.is_empty() {
        return Ok(());
    }
    let half = (h.log_length as u64 / 2) & !(log::SECTOR - 1);
    if changed.len() > log::capacity(half) {
        return Err(Error::unsupported(format!(
            "VHDX change of {} sectors, larger than the log holds ({})",
            changed.len(),
            log::capacity(half)
        )));
    }
    let file_len = storage.len()?;
    let refs: Vec<(u64, &[u8])> = changed.iter().map(|(o, d)| (*o, d.as_slice())).collect();
    let guid = Guid::random()?;
    let seq = h.sequence.max(1);
    let entry = log::encode_entry(guid, seq, 0, file_len, &refs);
    storage.write_all_at(&entry, h.log_offset)?;
    storage.sync()?;
    let session = Guid::random()?;
    write_header(storage, &mut h, &mut slot, |h| {
        h.log_guid = guid;
        h.file_write_guid = session;
    })?;
    storage.sync()?;
    for (offset, data) in changed {
        storage.write_all_at(data, *offset)?;
    }
    storage.sync()?;
    write_header(storage, &mut h, &mut slot, |h| h.log_guid = Guid::ZERO)?;
    storage.sync()?;
    // Both slots current (MS-VHDX 2.2.2.1).
    write_header(storage, &mut h, &mut slot, |_| {})?;
    storage.sync()?;
    Ok(())
}

/// Replaces the metadata of `storage` with what `change` makes of it.
fn rewrite_metadata(storage: &dyn Storage, change: impl FnOnce(&mut Metadata)) -> Result<()> {
    // Replays a pending log first.
    current_header(storage)?;
    let changed = metadata_sectors(storage, change)?;
    log_transaction(storage, &changed)
}

/// Makes the VHDX in `child` a differencing child of the VHDX in `parent`,
/// named by `links`, or standalone with `None` (see [`make_standalone`]).
pub fn relink(child: &dyn Storage, parent: Option<(&Links, &dyn Storage)>) -> Result<()> {
    let Some((links, parent)) = parent else {
        return make_standalone(child);
    };
    header::check_identifier(parent)?;
    let (ph, _) = current_header(parent)?;
    let pregions = region::read(parent, parent.len()?)?;
    let pm = metadata::read(parent, pregions.metadata)?;
    let (cm_size, cm_ss) = {
        let r = region::read(child, child.len()?)?;
        let m = metadata::read(child, r.metadata)?;
        (m.virtual_size, m.logical_sector_size)
    };
    if pm.virtual_size != cm_size || pm.logical_sector_size != cm_ss {
        return Err(Error::unsupported(format!(
            "a VHDX parent of {} bytes ({}-byte sectors) for a child of {cm_size} ({cm_ss}-byte sectors)",
            pm.virtual_size, pm.logical_sector_size
        )));
    }
    let linkage = ph.data_write_guid.to_string().to_ascii_lowercase();
    rewrite_metadata(child, |m| {
        m.has_parent = true;
        m.parent_locator = vec![
            ("parent_linkage".into(), linkage),
            ("relative_path".into(), links.relative_windows()),
            ("absolute_win32_path".into(), links.absolute_windows()),
        ];
    })
}

/// Makes a differencing VHDX standalone: HasParent and the locator
/// cleared, and what only a differencing file may hold made plain. Its
/// PARTIALLY_PRESENT blocks (Hyper-V writes them; vdisk copies whole blocks)
/// become FULLY_PRESENT, the sectors their bitmap leaves clear (which showed
/// the parent) filled with zeros, what a standalone disk shows there. A safe
/// rebase has first copied every such sector where the parent does not read
/// zeros (a write into a partial block makes it whole with the parent's
/// data), so the zeros change nothing the child shows; after `-u` they are
/// the standalone view by definition. Its sector bitmap entries become
/// NOT_PRESENT.
///
/// Crash safety: the zeros go into the blocks' own clear sectors (not read
/// while the bitmap says "parent") and are durable before a BAT entry
/// changes; the partial entries become FULLY_PRESENT through the log, then
/// one last log transaction clears the bitmap entries and rewrites the
/// metadata together. A crash leaves the differencing image (some partial
/// blocks already whole, reading the same) or the standalone one.
fn make_standalone(child: &dyn Storage) -> Result<()> {
    let (h, _) = current_header(child)?;
    let regions = region::read(child, child.len()?)?;
    let meta = metadata::read(child, regions.metadata)?;
    let clear = |m: &mut Metadata| {
        m.has_parent = false;
        m.parent_locator.clear();
    };
    if !meta.has_parent {
        return rewrite_metadata(child, clear);
    }
    let l = Layout::new(
        meta.virtual_size,
        meta.block_size,
        meta.logical_sector_size,
        true,
    );
    let bat = regions.bat;
    let mut table = vec![0u8; bat.length as usize];
    child.read_exact_at(&mut table, bat.offset)?;
    let entries = table.len() as u64 / 8;
    let at = |i: u64| (i * 8) as usize;
    let get = |t: &[u8], i: u64| -> Result<u64> {
        if i >= entries {
            return Err(Error::corrupt(
                "VHDX BAT",
                format!("entry {i} is outside the BAT"),
            ));
        }
        Ok(crate::bytes::le64(t, at(i)))
    };
    let mut whole = table.clone();
    let zeros = vec![0u8; MIB as usize];
    for b in 0..l.payload_blocks {
        let index = l.payload_index(b);
        let e = get(&table, index)?;
        if bat::state(e) != bat::PARTIALLY_PRESENT {
            continue;
        }
        let sb = get(&table, l.bitmap_index(b / l.chunk_ratio))?;
        if bat::state(sb) != bat::SB_BLOCK_PRESENT {
            return Err(Error::corrupt(
                "VHDX BAT",
                format!("partially present block {b} without a sector bitmap"),
            ));
        }
        let visible = l.block_size.min(meta.virtual_size - b * l.block_size);
        let spb = l.sectors_per_block();
        // spb is a multiple of 8 (blocks of 1 MiB or more, sectors of 4 KiB
        // or less): the block's bits start on a byte.
        let mut bits = vec![0u8; (spb / 8) as usize];
        child.read_exact_at(&mut bits, bat::offset(sb) + (b % l.chunk_ratio) * spb / 8)?;
        let present = |s: u64| bits[(s / 8) as usize] >> (s % 8) & 1 != 0;
        let sectors = visible.div_ceil(l.sector_size);
        let mut s = 0;
        while s < sectors {
            if present(s) {
                s += 1;
                continue;
            }
            let first = s;
            while s < sectors && !present(s) {
                s += 1;
            }
            let (mut pos, end) = (first * l.sector_size, (s * l.sector_size).min(visible));
            while pos < end {
                let n = (end - pos).min(MIB);
                child.write_all_at(&zeros[..n as usize], bat::offset(e) + pos)?;
                pos += n;
            }
        }
        put_le64(
            &mut whole,
            at(index),
            bat::entry(bat::FULLY_PRESENT, bat::offset(e)),
        );
    }
    let mut plain = whole.clone();
    for k in 0..l.bitmap_blocks {
        let i = l.bitmap_index(k);
        if i < entries {
            put_le64(&mut plain, at(i), 0);
        }
    }
    // The zeros, durable before the entries that make them visible.
    child.sync()?;
    let sector = log::SECTOR as usize;
    let changed = |old: &[u8], new: &[u8]| -> Vec<(u64, Vec<u8>)> {
        new.chunks(sector)
            .zip(old.chunks(sector))
            .enumerate()
            .filter(|(_, (n, o))| n != o)
            .map(|(i, (n, _))| (bat.offset + (i * sector) as u64, n.to_vec()))
            .collect()
    };
    let half = (h.log_length as u64 / 2) & !(log::SECTOR - 1);
    for group in changed(&table, &whole).chunks(log::capacity(half).max(1)) {
        log_transaction(child, group)?;
    }
    let mut last = changed(&whole, &plain);
    last.extend(metadata_sectors(child, clear)?);
    log_transaction(child, &last)
}

/// Adds (`Some`) or removes (`None`) parent_linkage2 in the child's
/// locator: the other DataWriteGuid its parent may have. Set before a commit
/// writes the parent (whose DataWriteGuid then becomes `guid`), so the child
/// finds its parent at every moment of the commit.
pub fn set_alternate_linkage(child: &dyn Storage, guid: Option<[u8; 16]>) -> Result<()> {
    rewrite_metadata(child, |m| {
        m.parent_locator.retain(|(k, _)| k != "parent_linkage2");
        if let Some(g) = guid {
            m.parent_locator.push((
                "parent_linkage2".into(),
                Guid(g).to_string().to_ascii_lowercase(),
            ));
        }
    })
}

/// Every BAT entry not present (payload blocks and sector bitmaps), through
/// the log in transactions of at most a log's worth of sectors; then the
/// file cut after its last region (headers, log, BAT, metadata).
pub fn empty(child: &dyn Storage) -> Result<()> {
    let (h, _) = current_header(child)?;
    let file_len = child.len()?;
    let regions = region::read(child, file_len)?;
    let bat = regions.bat;
    let mut table = vec![0u8; bat.length as usize];
    child.read_exact_at(&mut table, bat.offset)?;
    let sector = log::SECTOR as usize;
    let zero = vec![0u8; sector];
    let changed: Vec<(u64, Vec<u8>)> = table
        .chunks(sector)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| (bat.offset + (i * sector) as u64, zero.clone()))
        .collect();
    let half = (h.log_length as u64 / 2) & !(log::SECTOR - 1);
    let per = log::capacity(half).max(1);
    for group in changed.chunks(per) {
        log_transaction(child, group)?;
    }
    let end = [
        bat.end(),
        regions.metadata.end(),
        h.log_offset + h.log_length as u64,
        region::SLOTS[1] + region::TABLE_SIZE as u64,
    ]
    .into_iter()
    .max()
    .unwrap_or(file_len)
    .next_multiple_of(1 << 20);
    if end < file_len {
        child.set_len(end)?;
        child.sync()?;
    }
    Ok(())
}
