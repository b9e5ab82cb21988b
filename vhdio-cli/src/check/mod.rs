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

use vdisk::{Format, Storage};

use crate::chain::{self, OpenError};
use crate::lock::ReadLocks;
use crate::{EXIT_OK, EXIT_PROBLEMS, Failure};

mod vhd;
use vhd::check_vhd;

#[derive(Default)]
pub(super) struct Report {
    problems: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    pub(super) fn problem(&mut self, s: impl Into<String>) {
        self.problems.push(s.into());
    }
    pub(super) fn note(&mut self, s: impl Into<String>) {
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

pub(super) fn read_at(s: &dyn Storage, len: usize, off: u64) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    s.read_exact_at(&mut b, off)?;
    Ok(b)
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
