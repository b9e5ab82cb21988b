//! VHD differencing chains built from the specification, written through
//! `vdisk::Disk`, checked by the independent structural checker in
//! `vhd_util`; hostile VHDs; the real dfvfs differencing images.

mod common;
mod vhd_util;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use common::{open, pattern, qemu_image_from, qemu_raw, read_all};
use vdisk::Error;
use vhd_util::*;

const MIB: u64 = 1 << 20;

// --- a logger that keeps warnings, to see the timestamp warning ------------

struct Capture;
static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());
impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            LOGS.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}
fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
    });
}
fn logged(needle: &str) -> Vec<String> {
    LOGS.lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

// --- fixtures ----------------------------------------------------------------

/// Odd size: not whole 2 MiB blocks, not a CHS product.
const SIZE: u64 = 9 * MIB + 7 * 512;

/// A dynamic base made by qemu-img from pattern data; returns path and contents.
fn base(dir: &Path, name: &str, seed: u64) -> (PathBuf, Vec<u8>) {
    let (mut data, _) = pattern(seed, SIZE as usize);
    // Some data in the first, third and last block whatever the pattern.
    let mut r = Rng(seed | 1);
    for (off, n) in [(4096, 100_000), (4 * MIB + 512, 3000), (SIZE - 5000, 5000)] {
        data[off as usize..(off + n) as usize].copy_from_slice(&r.bytes(n as usize));
    }
    let p = qemu_image_from(&data, dir, name, "vpc", "subformat=dynamic,force_size=on");
    fs::remove_file(dir.join(format!("{name}.src.raw"))).ok();
    assert!(
        qemu_raw(&p, "vpc") == data,
        "qemu-img disagrees with its own source"
    );
    (p, data)
}

/// Some sectors stored in a child from the start: whole runs, single sectors
/// (partial bitmaps), one crossing a block boundary.
fn child_data(seed: u64, size: u64) -> Vec<(u64, Vec<u8>)> {
    let mut r = Rng(seed | 1);
    let mut out = vec![
        (512 * 3, r.bytes(512)),
        (2 * MIB - 1024, r.bytes(3 * 512)),
        (5 * MIB + 4096, r.bytes(70 * 512)),
        (size - 512, r.bytes(512)),
    ];
    for _ in 0..6 {
        let n = (1 + r.below(40)) * 512;
        let off = r.below((size - n) / 512) * 512;
        out.push((off, r.bytes(n as usize)));
    }
    out
}

fn write_child(path: &Path, c: &Child) {
    let bytes = c.build();
    check(&bytes).unwrap_or_else(|e| panic!("builder made a bad file {}: {e}", path.display()));
    fs::write(path, bytes).unwrap();
}

/// Opens `top`, checks it reads as `model`, applies random writes through
/// `Disk::write_at`, checks the result (fresh handle too) and the file's
/// structure, and that `parents` did not change at all.
fn read_write_verify(top: &Path, model: &mut Vec<u8>, parents: &[&Path], seed: u64, depth: usize) {
    let before: Vec<_> = parents.iter().map(|p| snapshot(p)).collect();
    {
        let disk = open(top, true).unwrap_or_else(|e| panic!("{}: {e}", top.display()));
        assert_eq!(disk.layers().len(), depth, "{}", top.display());
        assert_eq!(disk.size(), model.len() as u64);
        assert!(
            read_all(&disk) == *model,
            "{}: chain reads differ from the model",
            top.display()
        );
        let ops = random_writes(seed, disk.size(), 2 * MIB, 14);
        for (off, d) in &ops {
            disk.write_at(d, *off).unwrap();
        }
        apply_writes(model, &ops);
        disk.flush().unwrap();
        assert!(
            read_all(&disk) == *model,
            "{}: reads after writes differ",
            top.display()
        );
    }
    let disk = open(top, false).unwrap();
    assert!(
        read_all(&disk) == *model,
        "{}: reopened chain differs",
        top.display()
    );
    check_file(top).unwrap();
    for (p, b) in parents.iter().zip(&before) {
        assert_unchanged(p, b);
    }
}

// --- the checker itself -------------------------------------------------------

#[test]
fn checker_accepts_good_files_and_rejects_corrupt_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (dynp, _) = base(dir, "d.vhd", 1);
    let (data, _) = pattern(2, 3 * MIB as usize);
    let fixed = qemu_image_from(&data, dir, "f.vhd", "vpc", "subformat=fixed");
    check_file(&fixed).unwrap();
    let good = fs::read(&dynp).unwrap();
    let l = check(&good).unwrap();
    assert_eq!((l.disk_type, l.size, l.block_size), (3, SIZE, 2 * MIB));
    assert!(!l.blocks.is_empty());
    let len = good.len();
    let (to, b0) = {
        let h = &good[512..1536];
        (
            u64::from_be_bytes(h[16..24].try_into().unwrap()) as usize,
            l.blocks[0],
        )
    };
    let b0_entry = to + 4 * b0.0;
    let corrupt: Vec<(&str, Box<dyn Fn(&mut Vec<u8>)>)> = vec![
        (
            "footer cookie",
            Box::new(move |d: &mut Vec<u8>| d[len - 512] = b'x'),
        ),
        (
            "footer checksum",
            Box::new(move |d: &mut Vec<u8>| d[len - 512 + 70] ^= 1),
        ),
        (
            "footer copy",
            Box::new(|d: &mut Vec<u8>| {
                d[70] ^= 1;
                fix_footer_checksum(&mut d[..512]);
            }),
        ),
        (
            "header checksum",
            Box::new(|d: &mut Vec<u8>| d[512 + 60] ^= 1),
        ),
        (
            "header data offset",
            Box::new(|d: &mut Vec<u8>| {
                d[512 + 15] = 0;
                fix_header_checksum(&mut d[512..1536]);
            }),
        ),
        (
            "block size",
            Box::new(|d: &mut Vec<u8>| {
                d[512 + 32..512 + 36].copy_from_slice(&3000u32.to_be_bytes());
                fix_header_checksum(&mut d[512..1536]);
            }),
        ),
        (
            "entries",
            Box::new(|d: &mut Vec<u8>| {
                d[512 + 28..512 + 32].copy_from_slice(&2u32.to_be_bytes());
                fix_header_checksum(&mut d[512..1536]);
            }),
        ),
        (
            "block past EOF",
            Box::new(move |d: &mut Vec<u8>| {
                let s = ((len as u64 - 1024) / 512) as u32;
                d[b0_entry..b0_entry + 4].copy_from_slice(&s.to_be_bytes());
            }),
        ),
        (
            "block over the BAT",
            Box::new(move |d: &mut Vec<u8>| {
                let s = (to as u64 / 512) as u32;
                d[b0_entry..b0_entry + 4].copy_from_slice(&s.to_be_bytes());
            }),
        ),
        (
            "two blocks overlapping",
            Box::new(move |d: &mut Vec<u8>| {
                let e: [u8; 4] = d[b0_entry..b0_entry + 4].try_into().unwrap();
                let s = u32::from_be_bytes(e) + 8;
                let other = to + 4 * ((b0.0 + 1) % 5);
                d[other..other + 4].copy_from_slice(&s.to_be_bytes());
            }),
        ),
        (
            "entry beyond the disk",
            Box::new(move |d: &mut Vec<u8>| {
                // 5 blocks cover the disk; make the table 6 long and use the 6th.
                d[512 + 28..512 + 32].copy_from_slice(&6u32.to_be_bytes());
                fix_header_checksum(&mut d[512..1536]);
                let e: [u8; 4] = d[b0_entry..b0_entry + 4].try_into().unwrap();
                d[to + 20..to + 24].copy_from_slice(&e);
            }),
        ),
        (
            "truncated",
            Box::new(|d: &mut Vec<u8>| d.truncate(d.len() - 512)),
        ),
    ];
    for (what, f) in corrupt {
        let mut d = good.clone();
        f(&mut d);
        let r = check(&d);
        assert!(r.is_err(), "checker accepted a file with a broken {what}");
        eprintln!("{what}: {}", r.unwrap_err());
    }
    // Real third-party files: the Windows child (locators in bytes, BAT at
    // 0x2000, footer gap) passes; image.vhd has the documented bad checksum.
    if let Some(shared) = shared_images() {
        check_file(&shared.join("fat-differential.vhd")).unwrap();
        check_file(&shared.join("ext2.vhd")).unwrap();
        let e = check_file(&shared.join("image.vhd")).unwrap_err();
        assert!(e.contains("checksum"), "{e}");
    }
}

fn shared_images() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/images");
    if dir.join("README.md").exists() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: ../shared/images is absent");
        None
    }
}

// --- locators -------------------------------------------------------------------

#[test]
fn each_locator_style_finds_the_parent_and_writes_stay_in_the_child() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir(dir.join("sub dir")).unwrap();
    let (basep, base_data) = base(&dir.join("sub dir"), "base image.vhd", 3);
    let info = parent_info(&basep);
    // The header's parent name names nothing that exists unless the case is
    // "no locator", so each locator has to do the work on its own.
    let abs_url = format!("file://{}", basep.to_str().unwrap().replace(' ', "%20"));
    let cases: Vec<(&str, Vec<Locator>, &str)> = vec![
        (
            "w2ru",
            vec![w2ru(r".\sub dir\base image.vhd", Space::Sectors)],
            "gone.vhd",
        ),
        (
            "w2ru-bytes",
            vec![w2ru(r".\sub dir\base image.vhd", Space::Bytes)],
            "gone.vhd",
        ),
        // Absolute Windows path: found by file name in the child's folder,
        // so this child lives next to its parent.
        (
            "w2ku",
            vec![w2ku(r"C:\Users\someone\VMs\base image.vhd", Space::Bytes)],
            "gone.vhd",
        ),
        ("macx", vec![macx(&abs_url, Space::Sectors)], "gone.vhd"),
        ("macx-bytes", vec![macx(&abs_url, Space::Bytes)], "gone.vhd"),
        (
            "wi2r",
            vec![wi2r(r".\sub dir\base image.vhd", Space::Sectors)],
            "gone.vhd",
        ),
        // A broken W2ru before a good W2ku, as Windows writes both.
        (
            "w2ru+w2ku",
            vec![
                w2ru(r".\missing.vhd", Space::Bytes),
                w2ku(r"D:\x\base image.vhd", Space::Bytes),
            ],
            "gone.vhd",
        ),
        // No locator at all: the parent unicode name, in the child's folder.
        ("none", vec![], "base image.vhd"),
        ("none-fullpath", vec![], r"C:\Projects\base image.vhd"),
    ];
    for (i, (name, locs, pname)) in cases.into_iter().enumerate() {
        let in_parent_dir = matches!(name, "w2ku" | "w2ru+w2ku" | "none" | "none-fullpath");
        let child_dir = if in_parent_dir {
            dir.join("sub dir")
        } else {
            dir.to_path_buf()
        };
        let path = child_dir.join(format!("child-{name}.vhd"));
        let mut c = Child::new(info.clone(), 10 + i as u8);
        c.locators = locs;
        c.parent_name = pname.to_string();
        c.block_size = [2 * MIB as u32, MIB as u32, 4 * MIB as u32, 512 * 1024][i % 4];
        c.creator = if name.starts_with("macx") {
            *b"tap\0"
        } else {
            *b"win "
        };
        c.data = child_data(100 + i as u64, SIZE);
        write_child(&path, &c);
        let mut model = base_data.clone();
        apply(&mut model, &c.data);
        read_write_verify(&path, &mut model, &[&basep], 200 + i as u64, 2);
    }
}

#[test]
fn chains_of_depth_one_to_three() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for depth in 1..=3usize {
        let d = dir.join(format!("depth{depth}"));
        fs::create_dir(&d).unwrap();
        let (basep, data) = base(&d, "base.vhd", 40 + depth as u64);
        let mut model = data;
        let mut chain = vec![basep.clone()];
        for level in 1..depth {
            let parent = chain.last().unwrap().clone();
            let pname = parent.file_name().unwrap().to_str().unwrap().to_string();
            let mut c = Child::new(parent_info(&parent), 50 + (depth * 10 + level) as u8);
            c.locators = match level {
                1 => vec![
                    w2ru(&format!(r".\{pname}"), Space::Bytes),
                    w2ku(&format!(r"C:\vm\{pname}"), Space::Bytes),
                ],
                _ => vec![macx(&format!("file://./{pname}"), Space::Sectors)],
            };
            c.parent_name = pname;
            c.block_size = if level == 1 {
                MIB as u32
            } else {
                2 * MIB as u32
            };
            c.data = child_data((depth * 10 + level) as u64, SIZE);
            apply(&mut model, &c.data);
            let path = d.join(format!("level{level}.vhd"));
            write_child(&path, &c);
            chain.push(path);
        }
        let top = chain.last().unwrap().clone();
        let parents: Vec<&Path> = chain[..chain.len() - 1]
            .iter()
            .map(PathBuf::as_path)
            .collect();
        read_write_verify(&top, &mut model, &parents, 300 + depth as u64, depth);
        if depth == 1 {
            // The base is a plain dynamic disk: qemu-img is an oracle for it.
            assert!(
                qemu_raw(&top, "vpc") == model,
                "qemu-img reads the written base differently"
            );
        }
    }
}

/// Trap 7 of formats.md: Windows leaves a gap (with the old footer or other
/// bytes) between the last block and the footer. A new block placed over the
/// gap must not expose those bytes in sectors it does not write, to a reader
/// that ignores bitmaps (qemu) or to this one.
#[test]
fn new_blocks_over_a_footer_gap_read_as_zeros_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (basep, _) = base(dir, "g.vhd", 9);
    let mut c = Child::new(parent_info(&basep), 90);
    c.disk_type = 3;
    c.creator = *b"win ";
    c.data = vec![(0, vec![0x11; 4096])];
    // The gap: an old footer and junk, as a Windows image may hold.
    let mut gap = vec![0xEEu8; 0x2E00];
    gap[0x2C00..0x2C08].copy_from_slice(b"conectix");
    c.gap = gap;
    let path = dir.join("gap.vhd");
    write_child(&path, &c);
    let mut model = vec![0u8; SIZE as usize];
    apply(&mut model, &c.data);
    assert!(qemu_raw(&path, "vpc") == model);
    let disk = open(&path, true).unwrap();
    // One sector into a new block: the other sectors of that block must stay zero.
    disk.write_at(&[0x22; 512], 2 * MIB + 512).unwrap();
    disk.write_at(&[0x33; 100], 4 * MIB + 7).unwrap();
    drop(disk);
    model[(2 * MIB + 512) as usize..(2 * MIB + 1024) as usize].fill(0x22);
    model[(4 * MIB + 7) as usize..(4 * MIB + 107) as usize].fill(0x33);
    check_file(&path).unwrap();
    assert!(
        read_all(&open(&path, false).unwrap()) == model,
        "vdisk reads stale bytes"
    );
    let q = qemu_raw(&path, "vpc");
    if let Some(i) = (0..q.len()).find(|&i| q[i] != model[i]) {
        panic!(
            "qemu-img sees {:#x} at {i:#x}, expected {:#x}: stale bytes inside a new block",
            q[i], model[i]
        );
    }
}

// --- refusals ----------------------------------------------------------------------

#[test]
fn mismatched_parent_is_refused_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (basep, _) = base(dir, "p.vhd", 5);
    let mut info = parent_info(&basep);
    info.unique_id[5] ^= 0xFF;
    let mut c = Child::new(info, 60);
    c.locators = vec![w2ru(r".\p.vhd", Space::Sectors)];
    c.parent_name = "p.vhd".into();
    let path = dir.join("c.vhd");
    write_child(&path, &c);
    let before = snapshot(&basep);
    let err = open(&path, true).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::ParentNotFound(_) | Error::ParentMismatch(_)),
        "{err:?}"
    );
    assert!(
        msg.contains(basep.to_str().unwrap()),
        "error does not name the parent tried: {msg}"
    );
    assert!(msg.contains("identity") || msg.contains("id"), "{msg}");
    // Missing parent: the error names the path that was tried.
    fs::rename(&basep, dir.join("elsewhere.vhd")).unwrap();
    let msg = open(&path, false).unwrap_err().to_string();
    assert!(msg.contains(basep.to_str().unwrap()), "{msg}");
    fs::rename(dir.join("elsewhere.vhd"), &basep).unwrap();
    assert_unchanged(&basep, &before);
}

#[test]
fn chain_loops_and_overly_deep_chains_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (basep, _) = base(dir, "b.vhd", 6);
    let info = parent_info(&basep);
    let id = |seed: u8| Child::new(info.clone(), seed).unique_id;
    // a -> b -> a: each names the other.
    let mut a = Child::new(info.clone(), 70);
    let mut b = Child::new(info.clone(), 71);
    a.parent.unique_id = id(71);
    a.locators = vec![w2ru(r".\loop-b.vhd", Space::Sectors)];
    b.parent.unique_id = id(70);
    b.locators = vec![w2ru(r".\loop-a.vhd", Space::Sectors)];
    write_child(&dir.join("loop-a.vhd"), &a);
    write_child(&dir.join("loop-b.vhd"), &b);
    let e = open(&dir.join("loop-a.vhd"), false).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    // A child that is its own parent.
    let mut s = Child::new(info.clone(), 72);
    s.parent.unique_id = s.unique_id;
    s.parent_name = "self.vhd".into();
    write_child(&dir.join("self.vhd"), &s);
    let e = open(&dir.join("self.vhd"), false).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    // 257 differencing layers over the base: deeper than 256.
    let mut parent = basep.clone();
    for i in 0..257u32 {
        let mut c = Child::new(parent_info(&parent), 0);
        c.unique_id[..4].copy_from_slice(&i.to_be_bytes());
        c.unique_id[4] = 0xDD;
        c.parent_name = parent.file_name().unwrap().to_str().unwrap().into();
        let p = dir.join(format!("deep{i}.vhd"));
        fs::write(&p, c.build()).unwrap();
        parent = p;
    }
    let e = open(&parent, false).unwrap_err();
    assert!(e.to_string().contains("deeper than 256"), "{e}");
    // 255 layers over the base (256 in all) still open.
    let ok = open(&dir.join("deep254.vhd"), false).unwrap();
    assert_eq!(ok.layers().len(), 256);
}

// --- parent timestamp --------------------------------------------------------------

#[test]
fn parent_timestamp_mismatch_warns_but_opens() {
    capture_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (basep, data) = base(dir, "tsparent.vhd", 7);
    let info = parent_info(&basep);
    let mut c = Child::new(info.clone(), 80);
    c.parent_name = "tsparent.vhd".into();
    c.parent_timestamp = Some(info.timestamp.wrapping_sub(86_400));
    let stale = dir.join("ts-stale.vhd");
    write_child(&stale, &c);
    let disk = open(&stale, false).unwrap();
    assert!(read_all(&disk) == data);
    let w = logged("ts-stale.vhd");
    assert!(
        w.iter().any(|l| l.contains("time")),
        "no timestamp warning: {:?}",
        LOGS.lock().unwrap()
    );
    // Matching stamps, and 0 (Windows writes 0): no warning.
    for (name, ts) in [("ts-equal.vhd", None), ("ts-zero.vhd", Some(0))] {
        let mut c = Child::new(info.clone(), 81);
        c.parent_name = "tsparent.vhd".into();
        c.parent_timestamp = ts;
        write_child(&dir.join(name), &c);
        open(&dir.join(name), false).unwrap();
        assert!(logged(name).is_empty(), "{name}: {:?}", logged(name));
    }
}

// --- hostile files -----------------------------------------------------------------

#[test]
fn hostile_vhds_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (basep, _) = base(dir, "h.vhd", 8);
    let good = fs::read(&basep).unwrap();
    let len = good.len();
    let hdr = |f: &dyn Fn(&mut [u8])| {
        let mut d = good.clone();
        f(&mut d[512..1536]);
        fix_header_checksum(&mut d[512..1536]);
        d
    };
    let both_footers = |f: &dyn Fn(&mut [u8])| {
        let mut d = good.clone();
        for at in [0, len - 512] {
            f(&mut d[at..at + 512]);
            fix_footer_checksum(&mut d[at..at + 512]);
        }
        d
    };
    // blktap batmap after the BAT of an empty disk: [footer copy][header]
    // [BAT 512][batmap header][map sector][footer].
    let empty = dir.join("empty.vhd");
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            empty.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    let empty = fs::read(&empty).unwrap();
    assert_eq!(empty.len(), 2560, "qemu-img create layout changed");
    let batmap = |keyhash: u8| {
        let mut d = empty[..2048].to_vec();
        let mut h = vec![0u8; 512];
        h[..8].copy_from_slice(b"tdbatmap");
        h[8..16].copy_from_slice(&2560u64.to_be_bytes());
        h[16..20].copy_from_slice(&1u32.to_be_bytes());
        h[20..24].copy_from_slice(&0x0001_0002u32.to_be_bytes());
        h[29] = keyhash;
        d.extend_from_slice(&h);
        d.extend_from_slice(&[0u8; 512]);
        d.extend_from_slice(&empty[2048..]);
        d
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "block size 0",
            hdr(&|h| h[32..36].copy_from_slice(&0u32.to_be_bytes())),
        ),
        (
            "block size 3 MiB",
            hdr(&|h| h[32..36].copy_from_slice(&(3u32 << 20).to_be_bytes())),
        ),
        (
            "block size 256",
            hdr(&|h| h[32..36].copy_from_slice(&256u32.to_be_bytes())),
        ),
        (
            "BAT past EOF",
            hdr(&|h| h[16..24].copy_from_slice(&(len as u64 + 4096).to_be_bytes())),
        ),
        (
            "BAT offset overflows",
            hdr(&|h| h[16..24].copy_from_slice(&(u64::MAX - 8).to_be_bytes())),
        ),
        (
            "entries too few",
            hdr(&|h| h[28..32].copy_from_slice(&2u32.to_be_bytes())),
        ),
        (
            "entries huge",
            hdr(&|h| h[28..32].copy_from_slice(&u32::MAX.to_be_bytes())),
        ),
        ("header cookie", hdr(&|h| h[0] = b'X')),
        (
            "data offset past EOF",
            both_footers(&|f| f[16..24].copy_from_slice(&(len as u64 * 2).to_be_bytes())),
        ),
        (
            "data offset overflows",
            both_footers(&|f| f[16..24].copy_from_slice(&(u64::MAX - 100).to_be_bytes())),
        ),
        (
            "data offset all ones on a dynamic disk",
            both_footers(&|f| f[16..24].copy_from_slice(&u64::MAX.to_be_bytes())),
        ),
        (
            "size beyond the table",
            both_footers(&|f| f[48..56].copy_from_slice(&(1u64 << 50).to_be_bytes())),
        ),
        (
            "disk type 5",
            both_footers(&|f| f[60..64].copy_from_slice(&5u32.to_be_bytes())),
        ),
        (
            "v_poison",
            both_footers(&|f| f[..8].copy_from_slice(b"v_poison")),
        ),
        ("encrypted blktap", batmap(1)),
        ("BAT entry past EOF", {
            let mut d = good.clone();
            d[1536..1540].copy_from_slice(&((len as u32 / 512) - 2).to_be_bytes());
            d
        }),
        ("BAT entry over the header", {
            let mut d = good.clone();
            d[1536..1540].copy_from_slice(&1u32.to_be_bytes());
            d
        }),
        ("fixed disk bigger than its file", {
            let mut d = good[len - 512..].to_vec();
            d[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
            d[60..64].copy_from_slice(&2u32.to_be_bytes());
            fix_footer_checksum(&mut d);
            d
        }),
    ];
    for (what, bytes) in cases {
        let p = dir.join("hostile.vhd");
        fs::write(&p, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| open(&p, true).map(|d| d.size()));
        match r {
            Err(_) => panic!("{what}: panicked"),
            Ok(Ok(size)) => panic!("{what}: opened as a disk of {size} bytes"),
            Ok(Err(e)) => {
                eprintln!("{what}: {e}");
                assert!(
                    !matches!(e, Error::NotAnImage),
                    "{what}: not refused, would pass through as a raw file"
                );
            }
        }
    }
    // A batmap without a keyhash is fine, and new blocks do not overwrite it.
    let p = dir.join("batmap.vhd");
    fs::write(&p, batmap(0)).unwrap();
    let disk = open(&p, true).unwrap();
    disk.write_at(&[7u8; 4096], SIZE - 4096).unwrap();
    drop(disk);
    let d = fs::read(&p).unwrap();
    assert_eq!(&d[2048..2056], b"tdbatmap");
    assert!(
        d[2560..3072].iter().all(|&b| b == 0),
        "the batmap was overwritten"
    );
    check(&d).unwrap();
}

// --- real images (extends real_images.rs: writes, checksum repair) ----------------

#[test]
fn real_differential_writes_only_to_the_child() {
    let Some(shared) = shared_images() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for n in ["image.vhd", "image-differential.vhd"] {
        fs::copy(shared.join(n), dir.join(n)).unwrap();
    }
    let child = dir.join("image-differential.vhd");
    let parent = dir.join("image.vhd");
    let before = snapshot(&parent);
    let disk = open(&child, false).unwrap();
    let mut model = read_all(&disk);
    assert_eq!(
        common::sha256_hex(&model),
        "c6db12a7db548e193c29420c1b4533e4708b20c5033db5cc29ef075d48316d25"
    );
    drop(disk);
    // Its checksums are wrong; the first write repairs them.
    assert!(check_file(&child).unwrap_err().contains("checksum"));
    read_write_verify(&child, &mut model, &[&parent], 900, 2);
    assert_unchanged(&parent, &before);
    // fat-differential: the error names the parent it looked for.
    fs::copy(
        shared.join("fat-differential.vhd"),
        dir.join("fat-differential.vhd"),
    )
    .unwrap();
    let msg = open(&dir.join("fat-differential.vhd"), true)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(dir.join("fat-parent.vhd").to_str().unwrap()),
        "{msg}"
    );
}

// --- footer repair -------------------------------------------------------------------

/// A damaged end footer with a good copy at 0 reads through the copy; the first
/// write must leave a file whose end footer is valid again (qemu reads only
/// that one and refuses a bad checksum).
#[test]
fn damaged_end_footer_is_rewritten_on_the_first_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (basep, mut model) = base(dir, "r.vhd", 11);
    let mut d = fs::read(&basep).unwrap();
    let len = d.len();
    d[len - 512 + 70] ^= 0xFF; // unique id byte: checksum now wrong
    fs::write(&basep, &d).unwrap();
    assert!(check_file(&basep).is_err());
    let disk = open(&basep, true).unwrap();
    assert!(read_all(&disk) == model);
    disk.write_at(&[9u8; 10], 4096 + 3).unwrap();
    drop(disk);
    model[4099..4109].fill(9);
    check_file(&basep).unwrap();
    assert!(qemu_raw(&basep, "vpc") == model);
}

/// Old Virtual PC wrote a 511-byte footer (file = 512·n + 511). A fixed disk
/// with one opens, keeps its last data byte on a write, and after a checksum
/// repair ends with a whole footer.
#[test]
fn legacy_511_byte_footer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (data, _) = pattern(12, 3 * MIB as usize);
    let mut data = data;
    let n = data.len();
    data[n - 1] = 0x77;
    let img = qemu_image_from(
        &data,
        dir,
        "legacy.vhd",
        "vpc",
        "subformat=fixed,force_size=on",
    );
    let mut d = fs::read(&img).unwrap();
    assert_eq!(d[d.len() - 1], 0, "the footer's last reserved byte");
    d.pop();
    let at = d.len() - 511 + 64 + 3;
    d[at] ^= 1; // bad checksum too
    fs::write(&img, &d).unwrap();
    let disk = open(&img, true).unwrap_or_else(|e| panic!("legacy footer refused: {e}"));
    assert_eq!(disk.size(), n as u64);
    assert!(read_all(&disk) == data);
    disk.write_at(&[1, 2, 3], 100).unwrap();
    drop(disk);
    data[100..103].copy_from_slice(&[1, 2, 3]);
    let l = check_file(&img).unwrap();
    assert_eq!(l.size, n as u64);
    assert!(
        qemu_raw(&img, "vpc") == data,
        "data (the last byte?) damaged by the footer repair"
    );
}

// --- dying between any two writes --------------------------------------------------

/// A storage that performs only `budget` writes, then fails every write: the
/// state a process leaves when it dies between two writes.
struct Dying {
    mem: std::sync::Arc<vdisk::MemStorage>,
    budget: std::sync::Arc<std::sync::atomic::AtomicI64>,
}
impl vdisk::Storage for Dying {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        if self
            .budget
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            <= 0
        {
            return Err(std::io::Error::other("killed"));
        }
        self.mem.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mem.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        true
    }
}

fn open_mem(
    bytes: Vec<u8>,
    path: &Path,
    budget: i64,
) -> (vdisk::Disk, std::sync::Arc<vdisk::MemStorage>) {
    let mem = std::sync::Arc::new(vdisk::MemStorage::new(bytes));
    let budget = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(budget));
    let st = Dying {
        mem: mem.clone(),
        budget,
    };
    let disk = vdisk::open_disk(
        Box::new(st),
        path,
        vdisk::OpenOptions { writable: true },
        &vdisk::StdParentOpener,
    )
    .unwrap();
    (disk, mem)
}

/// Kills the writer after every possible number of writes, for a dynamic disk
/// and a differencing child (with a damaged checksum to repair first): the
/// file always passes the structural check, and every byte reads either as
/// before or as after the write that was interrupted (earlier writes whole).
#[test]
fn killed_at_any_write_leaves_a_valid_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (basep, base_data) = base(dir, "k.vhd", 13);
    let mut c = Child::new(parent_info(&basep), 95);
    c.parent_name = "k.vhd".into();
    c.data = vec![(MIB, vec![0x44; 4096])];
    let mut child = c.build();
    child[600] ^= 1; // header checksum: repaired on the first write
    let mut child_model = base_data.clone();
    apply(&mut child_model, &c.data);
    // Writes: into an allocated block, a new block (partial sectors), across
    // a block boundary into another new block, the last sector.
    let ops: Vec<(u64, Vec<u8>)> = vec![
        (MIB + 100, vec![1; 1000]),
        (6 * MIB + 77, vec![2; 3000]),
        (4 * MIB - 700, vec![3; 1400]),
        (SIZE - 10, vec![4; 10]),
    ];
    for (name, bytes, model0) in [
        ("k.vhd", fs::read(&basep).unwrap(), base_data.clone()),
        ("kchild.vhd", child, child_model),
    ] {
        let path = dir.join(name);
        // Writes of an uninterrupted run.
        let total = {
            let budget = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
            let mem = std::sync::Arc::new(vdisk::MemStorage::new(bytes.clone()));
            let st = Dying {
                mem: mem.clone(),
                budget: budget.clone(),
            };
            let disk = vdisk::open_disk(
                Box::new(st),
                &path,
                vdisk::OpenOptions { writable: true },
                &vdisk::StdParentOpener,
            )
            .unwrap();
            for (off, d) in &ops {
                disk.write_at(d, *off).unwrap();
                disk.flush().unwrap();
            }
            (i64::MAX - budget.load(std::sync::atomic::Ordering::SeqCst)) as usize
        };
        assert!(total > 8, "{name}: only {total} writes");
        for n in 0..=total {
            let (disk, mem) = open_mem(bytes.clone(), &path, n as i64);
            let mut before = model0.clone();
            let mut after = model0.clone();
            for (off, d) in &ops {
                after[*off as usize..*off as usize + d.len()].copy_from_slice(d);
                // Acknowledged once flushed: allocations commit at the flush.
                if disk.write_at(d, *off).is_err() || disk.flush().is_err() {
                    break;
                }
                before = after.clone();
            }
            drop(disk);
            let contents = mem.contents();
            // Killed before the checksum repair: the file is as damaged as before.
            if let Err(e) = check(&contents) {
                assert!(
                    Some(&e) == check(&bytes).err().as_ref(),
                    "{name} killed after {n} writes: {e}"
                );
            }
            let (disk, _) = open_mem(contents, &path, 0);
            let got = read_all(&disk);
            for i in 0..got.len() {
                assert!(
                    got[i] == before[i] || got[i] == after[i],
                    "{name} killed after {n} writes: byte {i} is {:#x}",
                    got[i]
                );
            }
        }
    }
}

/// Two BAT entries whose blocks overlap: readable, but refused for writing
/// (a write into one block would change the other).
#[test]
fn overlapping_blocks_refused_for_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = common::pattern(77, 6 << 20);
    let data: Vec<u8> = data.iter().map(|&b| b | 1).collect(); // every block allocated
    let img = common::qemu_image_from(
        &data,
        tmp.path(),
        "o.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    let mut d = std::fs::read(&img).unwrap();
    // qemu puts the BAT at 1536; make block 1 start 8 sectors into block 0.
    let b0 = u32::from_be_bytes(d[1536..1540].try_into().unwrap());
    d[1540..1544].copy_from_slice(&(b0 + 8).to_be_bytes());
    std::fs::write(&img, &d).unwrap();
    assert!(
        common::open(&img, false).is_ok(),
        "a read-only open should still work"
    );
    match common::open(&img, true) {
        Err(vdisk::Error::Corrupt { detail, .. }) => {
            assert!(detail.contains("overlap"), "{detail}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

/// A parent of another format (or sector size) than its child is refused,
/// even when its identity matches what the child records.
#[test]
fn parent_of_another_format_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let new_file = |name: &str| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .unwrap();
        (f, true)
    };
    vdisk::create(
        &new_file("p.vdi"),
        vdisk::CreateOptions::new(vdisk::Format::Vdi, 4 << 20),
    )
    .unwrap();
    let vdi_id = common::open(&dir.join("p.vdi"), false).unwrap().layers()[0].link_id();
    vdisk::create(
        &new_file("base.vhd"),
        vdisk::CreateOptions::new(vdisk::Format::Vhd, 4 << 20),
    )
    .unwrap();
    let base = std::fs::File::open(dir.join("base.vhd")).unwrap();
    vdisk::snapshot(
        &dir.join("base.vhd"),
        &(base, false),
        &new_file("c.vhd"),
        &dir.join("c.vhd"),
    )
    .unwrap();
    std::fs::remove_file(dir.join("base.vhd")).unwrap();
    // Point the child at the VDI: parent id, parent name, no locators.
    let mut d = std::fs::read(dir.join("c.vhd")).unwrap();
    let foot = d.len() - 512;
    let h = u64::from_be_bytes(d[foot + 16..foot + 24].try_into().unwrap()) as usize;
    d[h + 40..h + 56].copy_from_slice(&vdi_id);
    let name: Vec<u8> = "p.vdi"
        .encode_utf16()
        .flat_map(|u| u.to_be_bytes())
        .collect();
    d[h + 64..h + 576].fill(0);
    d[h + 64..h + 64 + name.len()].copy_from_slice(&name);
    d[h + 576..h + 768].fill(0);
    fix_header_checksum(&mut d[h..h + 1024]);
    std::fs::write(dir.join("c.vhd"), &d).unwrap();
    match common::open(&dir.join("c.vhd"), false) {
        Err(vdisk::Error::ParentMismatch(m)) => assert!(m.contains("vdi parent"), "{m}"),
        other => panic!("expected ParentMismatch, got {:?}", other.map(|_| ())),
    }
}
