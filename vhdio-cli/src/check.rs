//! `vhdio check`: structure checks of an image and its parent chain.
//!
//! Every layer goes through vdisk's own validation (what the library refuses,
//! `check` reports). VHD gets the checks qemu-img has none of (it cannot check
//! VHD at all): both footers and their checksums, the dynamic header and its
//! checksum, BAT entries inside the file, blocks overlapping each other or
//! the metadata, sector bitmaps, parent locators. VHDX: both headers, both
//! region tables, a pending log. VDI: the block map against the allocated
//! count (slots used twice, leaked slots).
//!
//! Findings are problems (exit status 1) or notes (harmless, reported only).

use std::path::Path;

use vdisk::bytes::{be32, be64};
use vdisk::vhd::bitmap;
use vdisk::vhd::dynamic_header::{DynamicHeader, HEADER_SIZE};
use vdisk::vhd::footer::{COOKIE, DiskType, FOOTER_SIZE, Footer, NO_DATA_OFFSET, checksum};
use vdisk::{Format, Storage};

use crate::chain::{self, OpenError};
use crate::lock::ReadLocks;
use crate::{EXIT_OK, EXIT_PROBLEMS, Failure};

#[derive(Default)]
struct Report {
    problems: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn problem(&mut self, s: impl Into<String>) {
        self.problems.push(s.into());
    }
    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }
}

/// `check`, with `json`: one qemu-img style object (`filename`, `format`,
/// `check-errors`, and vhdio's `problems`, `notes`, `images`) instead of text.
pub fn check_output(path: &Path, json: bool, locks: &ReadLocks) -> Result<u8, Failure> {
    let storage = chain::open_file(path, locks)?;
    let format = vdisk::probe(storage.as_ref())
        .map_err(|e| OpenError::Unreadable(format!("{}: {e}", path.display())))?
        .ok_or_else(|| {
            OpenError::Unreadable(format!("{}: not a VHD, VHDX or VDI image", path.display()))
        })?;
    let mut files = Vec::new();
    // The top file's own structure, even when it does not open.
    files.push(examine_file(path, format, storage.as_ref(), locks)?);
    let mut chain_problem = None;
    let mut chain_note = None;
    match chain::open_chain(path, locks) {
        Ok(layers) => {
            // Not a problem: space that a discard or `vhdio compact` gives back.
            if let Ok(Some(u)) = vdisk::block_usage(layers[0].image.as_ref(), true) {
                println!(
                    "{}: {} of {} allocated blocks hold only zeros",
                    path.display(),
                    u.zero,
                    u.allocated
                );
            }
            for l in &layers[1..] {
                let s = chain::open_file(&l.path, locks)?;
                files.push(examine_file(&l.path, l.format, s.as_ref(), locks)?);
            }
            if layers.len() > 1 {
                chain_note = Some(format!(
                    "{} images, every parent found with a matching identity",
                    layers.len()
                ));
            }
        }
        Err(e @ OpenError::Locked(_)) => return Err(e.into()),
        Err(OpenError::Broken(m) | OpenError::Unreadable(m)) => chain_problem = Some(m),
    }
    let total_problems =
        files.iter().map(|f| f.report.problems.len()).sum::<usize>() + chain_problem.iter().count();
    if json {
        print_json(
            path,
            format,
            &files,
            chain_problem.as_deref(),
            total_problems,
        );
    } else {
        for f in &files {
            f.print();
        }
        if let Some(n) = &chain_note {
            println!("chain: {n}");
        }
        if let Some(m) = &chain_problem {
            println!("chain: problem: {m}");
        }
        if total_problems == 0 {
            println!("No problems found.");
        } else {
            println!(
                "{total_problems} problem{} found.",
                if total_problems == 1 { "" } else { "s" }
            );
        }
    }
    Ok(if total_problems == 0 {
        EXIT_OK
    } else {
        EXIT_PROBLEMS
    })
}

fn print_json(
    path: &Path,
    format: Format,
    files: &[Examined],
    chain_problem: Option<&str>,
    total: usize,
) {
    use crate::json::Json;
    let strs = |v: &[String]| Json::Arr(v.iter().map(Json::str).collect());
    let mut problems: Vec<String> = files
        .iter()
        .flat_map(|f| {
            f.report
                .problems
                .iter()
                .map(move |p| format!("{}: {p}", f.path.display()))
        })
        .collect();
    problems.extend(chain_problem.map(|m| format!("chain: {m}")));
    let notes: Vec<String> = files
        .iter()
        .flat_map(|f| {
            f.report
                .notes
                .iter()
                .map(move |n| format!("{}: {n}", f.path.display()))
        })
        .collect();
    let images = files
        .iter()
        .map(|f| {
            Json::obj(vec![
                ("filename", Json::str(f.path.to_string_lossy())),
                ("summary", Json::str(&f.summary)),
                ("problems", strs(&f.report.problems)),
                ("notes", strs(&f.report.notes)),
            ])
        })
        .collect();
    let qemu_name = match format {
        Format::Vhd => "vpc".to_string(),
        f => f.to_string(),
    };
    let o = Json::obj(vec![
        ("check-errors", Json::Num(total as u64)),
        ("filename", Json::str(path.to_string_lossy())),
        ("format", Json::str(qemu_name)),
        ("problems", strs(&problems)),
        ("notes", strs(&notes)),
        ("images", Json::Arr(images)),
    ]);
    println!("{}", o.pretty());
}

/// One file's findings.
struct Examined {
    path: std::path::PathBuf,
    summary: String,
    report: Report,
}

impl Examined {
    fn print(&self) {
        println!("{}: {}", self.path.display(), self.summary);
        for p in &self.report.problems {
            println!("  problem: {p}");
        }
        for n in &self.report.notes {
            println!("  note: {n}");
        }
    }
}

/// Checks one file.
fn examine_file(
    path: &Path,
    format: Format,
    storage: &dyn Storage,
    locks: &ReadLocks,
) -> Result<Examined, Failure> {
    let mut r = Report::default();
    let io = |e: std::io::Error| OpenError::Unreadable(format!("{}: {e}", path.display()));
    match format {
        Format::Vhd => check_vhd(storage, &mut r).map_err(io)?,
        Format::Vhdx => check_vhdx(storage, &mut r).map_err(io)?,
        Format::Vdi => check_vdi(storage, &mut r).map_err(io)?,
        Format::Raw => {}
        Format::Vmdk => check_vmdk(path, &mut r, locks),
        Format::Qcow2 => check_qcow2(storage, &mut r),
    }
    // vdisk's validation of the layer (the library refuses what fails here).
    let opened = if format == Format::Raw {
        // A qcow2's raw backing file: nothing to validate.
        Ok(None)
    } else {
        chain::open_layer(chain::open_file(path, locks)?, path).map(Some)
    };
    let summary = match opened {
        Ok(None) => "raw disk".to_string(),
        Ok(Some(l)) => l.image.describe(),
        Err(OpenError::Broken(m) | OpenError::Unreadable(m) | OpenError::Locked(m)) => {
            r.problem(format!("does not open: {m}"));
            format!("{format} image")
        }
    };
    Ok(Examined {
        path: path.to_path_buf(),
        summary,
        report: r,
    })
}

fn read_at(s: &dyn Storage, len: usize, off: u64) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    s.read_exact_at(&mut b, off)?;
    Ok(b)
}

/// A named byte range of the file, for overlap checks.
struct Extent {
    start: u64,
    end: u64,
    what: String,
}

fn check_vhd(s: &dyn Storage, r: &mut Report) -> std::io::Result<()> {
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

fn check_vhdx(s: &dyn Storage, r: &mut Report) -> std::io::Result<()> {
    use vdisk::vhdx::{header, region};
    let len = s.len()?;
    let mut headers = Vec::new();
    for (i, at) in header::SLOTS.iter().enumerate() {
        let raw: [u8; header::HEADER_SIZE] = read_at(s, header::HEADER_SIZE, *at)?
            .try_into()
            .expect("4 KiB");
        match header::Header::parse(&raw) {
            Ok(h) => headers.push(h),
            Err(e) => r.problem(format!("header {}: {e}", i + 1)),
        }
    }
    let current = headers.iter().max_by_key(|h| h.sequence);
    if let Some(h) = current
        && !h.log_guid.is_zero()
    {
        r.note(format!("the log ({}) holds writes not yet replayed; opening the image for writing replays them", h.log_guid));
    }
    let mut tables = Vec::new();
    for (i, at) in region::SLOTS.iter().enumerate() {
        let raw = read_at(s, region::TABLE_SIZE, *at)?;
        match region::parse(&raw, len) {
            Ok(t) => tables.push(t),
            Err(e) => r.problem(format!("region table {}: {e}", i + 1)),
        }
    }
    if tables.len() == 2 && tables[0] != tables[1] {
        r.problem("the two region tables differ");
    }
    Ok(())
}

fn check_vdi(s: &dyn Storage, r: &mut Report) -> std::io::Result<()> {
    use vdisk::vdi::block_map::{BlockMap, Entry};
    use vdisk::vdi::header::{HEADER_AREA, Header};
    let len = s.len()?;
    let mut raw = [0u8; HEADER_AREA];
    let n = len.min(HEADER_AREA as u64) as usize;
    s.read_exact_at(&mut raw[..n], 0)?;
    let h = match Header::parse(&raw, len) {
        Ok(h) => h,
        Err(e) => {
            r.problem(format!("header: {e}"));
            return Ok(());
        }
    };
    if h.disk_size % 512 != 0 {
        r.note(format!(
            "disk size {} is not a whole number of sectors",
            h.disk_size
        ));
    }
    let map = match BlockMap::load(s, h.blocks_offset, h.blocks) {
        Ok(m) => m,
        Err(e) => {
            r.problem(format!("block map: {e}"));
            return Ok(());
        }
    };
    let mut owner: Vec<Option<usize>> = vec![None; h.blocks as usize];
    let mut used = 0u32;
    for (b, e) in map.iter() {
        let Entry::Slot(slot) = e else { continue };
        used += 1;
        match owner.get_mut(slot as usize) {
            None => r.problem(format!(
                "block {b} points at slot {slot}, beyond the {} blocks",
                h.blocks
            )),
            Some(Some(other)) => {
                r.problem(format!("slot {slot} is used by blocks {other} and {b}"))
            }
            Some(o) => *o = Some(b),
        }
        if slot >= h.blocks_allocated {
            r.problem(format!(
                "block {b} uses slot {slot}, but the header counts {} allocated",
                h.blocks_allocated
            ));
        }
    }
    if used < h.blocks_allocated {
        r.note(format!(
            "{} of {} allocated slots are not referenced (an interrupted allocation; reused by the next write)",
            h.blocks_allocated - used,
            h.blocks_allocated
        ));
    }
    Ok(())
}

/// VMDK: every grain table entry inside its file (the open and a full map
/// find those that are not) and the redundant grain tables equal to the
/// primary ones.
fn check_vmdk(path: &Path, r: &mut Report, locks: &ReadLocks) {
    use vdisk::Image;
    let storage = match chain::open_file(path, locks) {
        Ok(s) => s,
        Err(OpenError::Broken(m) | OpenError::Unreadable(m) | OpenError::Locked(m)) => {
            return r.problem(m);
        }
    };
    let img = match vdisk::vmdk::VmdkImage::open(
        storage,
        path,
        vdisk::OpenOptions { writable: false },
        &vdisk::StdParentOpener,
    ) {
        Ok(i) => i,
        Err(e) => return r.problem(format!("does not open: {e}")),
    };
    let mut off = 0;
    while off < img.virtual_size() {
        match img.map(off, img.virtual_size() - off) {
            Ok((_, run)) => off += run,
            Err(e) => {
                r.problem(format!("at disk offset {off}: {e}"));
                off = (off / 65536 + 1) * 65536;
            }
        }
    }
    match img.redundant_mismatches() {
        Ok(m) => {
            for (name, g, a, b) in m.iter().take(20) {
                r.problem(format!(
                    "{name}: grain {g}: grain table entry {a} but redundant entry {b}"
                ));
            }
            if m.len() > 20 {
                r.problem(format!("... {} redundant entries differ in all", m.len()));
            }
        }
        Err(e) => r.problem(format!("reading the redundant grain tables: {e}")),
    }
}

/// Refcounts against the references of the L1/L2 tables (active and
/// snapshots): too low is a problem (corruption), too high a leak (a note).
fn check_qcow2(s: &dyn Storage, r: &mut Report) {
    match vdisk::qcow2::check::check(s) {
        Ok(c) => {
            for p in c.errors {
                r.problem(p);
            }
            if c.leaks > 0 {
                r.note(format!("{} leaked clusters (refcount above use)", c.leaks));
            }
        }
        Err(e) => r.problem(e.to_string()),
    }
}
