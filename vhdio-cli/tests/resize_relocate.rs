//! `vhdio resize` grows that do not fit the image's table: a VHDX whose BAT
//! region is too small (a new region at the end of the file) and a VDI whose
//! block map has no room before the data area (the map moves into the data
//! area), and a dynamic VHD whose BAT room is used up (the blocks after the
//! BAT move to the end of the file). Images made by qemu-img; sizes, old data and new space read back
//! by qemu (slices of a 200 GiB disk through qemu's raw driver), checkers
//! clean; writes past the old end through the library land.

#[path = "../../vdisk/tests/common/mod.rs"]
mod common;
#[path = "../../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;
mod vhdio_util;

use std::path::Path;

use common::{qemu_image_from, qemu_raw, run};
use vhdio_util::{VHDIO, ok, s, vhdio};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// `len` bytes at `offset` of the disk as qemu reads it (its raw driver
/// with offset and size over the image), so a huge disk is not read whole.
fn qemu_slice(img: &Path, fmt: &str, offset: u64, len: u64) -> Vec<u8> {
    let out = img.with_extension("slice.raw");
    let opts = format!(
        "driver=raw,offset={offset},size={len},file.driver={fmt},file.file.filename={}",
        s(img)
    );
    run(
        "qemu-img",
        &["convert", "--image-opts", &opts, "-O", "raw", s(&out)],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

/// The virtual size qemu-img reports.
fn qemu_size(img: &Path) -> u64 {
    let out = run("qemu-img", &["info", "--output=json", s(img)]);
    // The image's own key comes after those of its children (the file).
    let at = out.rfind("\"virtual-size\":").unwrap() + 15;
    out[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Writes `data` at `offset` of the disk through the library (`vhdio run
/// dd`), or through vdisk when the library is not built (said on stderr).
fn write_through_library(img: &Path, data: &[u8], offset: u64) {
    let lib = Path::new(VHDIO).parent().unwrap().join("libvhdio.so");
    if !lib.is_file() {
        eprintln!("{} not built: written by vdisk, not dd", lib.display());
        let disk = common::open(img, true).unwrap();
        disk.write_at(data, offset).unwrap();
        disk.close().unwrap();
        return;
    }
    let src = img.with_extension("src");
    std::fs::write(&src, data).unwrap();
    let (i, o, seek) = (
        format!("if={}", s(&src)),
        format!("of={}", s(img)),
        format!("seek={}", offset / MIB),
    );
    assert_eq!(offset % MIB, 0);
    ok(&[
        "run",
        "dd",
        &i,
        &o,
        "bs=1M",
        &seek,
        "conv=notrunc",
        "status=none",
    ]);
}

/// `len` bytes at `at` of `img` as vdisk reads it, after checking that
/// vdisk sees a disk of `size` bytes.
fn read_sized(img: &Path, size: u64, at: u64, len: u64) -> Vec<u8> {
    let disk = common::open(img, false).unwrap();
    assert_eq!(disk.size(), size);
    let mut v = vec![0u8; len as usize];
    disk.read_at(&mut v, at).unwrap();
    v
}

fn check_clean(img: &Path, fmt: &str) {
    let out = ok(&["check", s(img)]);
    assert!(out.contains("No problems found"), "{out}");
    run("qemu-img", &["check", "-f", fmt, s(img)]);
}

#[test]
fn vhdx_grow_past_its_bat_region() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::Rng(5);
    let data: Vec<u8> = (0..64 * MIB).map(|_| rng.next() as u8 | 1).collect();
    // qemu-img writes a 1 MiB BAT region: 128 Ki entries, 128 GiB of 1 MiB blocks.
    let img = qemu_image_from(&data, dir.path(), "a.vhdx", "vhdx", "block_size=1M");
    let before = std::fs::metadata(&img).unwrap().len();
    ok(&["resize", s(&img), "+200G"]);
    let size = 64 * MIB + 200 * GIB;
    assert_eq!(qemu_size(&img), size);
    assert_eq!(common::open(&img, false).unwrap().size(), size);
    check_clean(&img, "vhdx");
    assert!(qemu_slice(&img, "vhdx", 0, 64 * MIB) == data, "old data");
    for at in [64 * MIB, 100 * GIB, size - 64 * MIB] {
        let v = qemu_slice(&img, "vhdx", at, 64 * MIB);
        assert!(v.iter().all(|&b| b == 0), "new space at {at}");
    }
    // The new region (1 MiB aligned, after the old end) and no block yet.
    assert!(std::fs::metadata(&img).unwrap().len() <= before.next_multiple_of(MIB) + 2 * MIB);
    // Writes past the old end land after the new region, and read back.
    let new: Vec<u8> = (0..5 * MIB).map(|_| rng.next() as u8).collect();
    write_through_library(&img, &new, 150 * GIB);
    write_through_library(&img, &new[..MIB as usize], size - MIB);
    check_clean(&img, "vhdx");
    assert!(qemu_slice(&img, "vhdx", 150 * GIB, 5 * MIB) == new);
    assert!(qemu_slice(&img, "vhdx", size - MIB, MIB) == new[..MIB as usize]);
    assert!(
        qemu_slice(&img, "vhdx", 0, 64 * MIB) == data,
        "old data after writes"
    );
}

#[test]
fn vhdx_child_grow_past_its_bat_region() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![0x11u8; 16 * MIB as usize];
    let parent = qemu_image_from(&data, dir.path(), "p.vhdx", "vhdx", "block_size=1M");
    let child = dir.path().join("c.vhdx");
    ok(&["snapshot", s(&parent), s(&child)]);
    let own = vec![0x22u8; 2 * MIB as usize];
    write_through_library(&child, &own, 4 * MIB);
    let parent_before = std::fs::read(&parent).unwrap();
    // A child's BAT holds a sector-bitmap entry per chunk of 4096 blocks.
    ok(&["resize", s(&child), "+200G"]);
    let size = 16 * MIB + 200 * GIB;
    assert!(
        std::fs::read(&parent).unwrap() == parent_before,
        "parent written"
    );
    let out = ok(&["check", s(&child)]);
    assert!(out.contains("No problems found"), "{out}");
    let read = |at: u64, len: u64| read_sized(&child, size, at, len);
    let head = read(0, 16 * MIB);
    assert!(head[..4 * MIB as usize].iter().all(|&b| b == 0x11));
    assert!(head[4 * MIB as usize..6 * MIB as usize] == own[..]);
    assert!(head[6 * MIB as usize..].iter().all(|&b| b == 0x11));
    assert!(read(16 * MIB, 64 * MIB).iter().all(|&b| b == 0));
    let new = vec![0x5Au8; 3 * MIB as usize];
    write_through_library(&child, &new, 170 * GIB);
    assert!(read(170 * GIB, 3 * MIB) == new);
    assert!(read(170 * GIB + 3 * MIB, MIB).iter().all(|&b| b == 0));
    assert!(read(4 * MIB, 2 * MIB) == own);
    let out = ok(&["check", s(&child)]);
    assert!(out.contains("No problems found"), "{out}");
}

#[test]
fn vdi_grow_past_its_block_map_room() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::Rng(6);
    let mut data: Vec<u8> = (0..64 * MIB).map(|_| rng.next() as u8).collect();
    // A hole, so the dynamic image has unallocated blocks too.
    data[20 * MIB as usize..30 * MIB as usize].fill(0);
    for (name, opts) in [("dyn.vdi", ""), ("static.vdi", "static=on")] {
        // qemu-img leaves room for 128 map entries (512 bytes) before the data.
        let img = qemu_image_from(&data, dir.path(), name, "vdi", opts);
        ok(&["resize", s(&img), "+200M"]);
        assert_eq!(qemu_size(&img), 264 * MIB, "{name}");
        check_clean(&img, "vdi");
        let back = qemu_raw(&img, "vdi");
        assert!(back[..64 * MIB as usize] == data[..], "{name}: old data");
        assert!(
            back[64 * MIB as usize..].iter().all(|&b| b == 0),
            "{name}: new space"
        );
        let new: Vec<u8> = (0..5 * MIB).map(|_| rng.next() as u8).collect();
        write_through_library(&img, &new, 250 * MIB);
        check_clean(&img, "vdi");
        let back = qemu_raw(&img, "vdi");
        assert!(back[..64 * MIB as usize] == data[..], "{name}: old data");
        assert!(
            back[250 * MIB as usize..255 * MIB as usize] == new[..],
            "{name}"
        );
        assert!(back[255 * MIB as usize..].iter().all(|&b| b == 0), "{name}");
        // And once more: the moved map grows in place now (VirtualBox-like room).
        ok(&["resize", s(&img), "+64M"]);
        check_clean(&img, "vdi");
        let back = qemu_raw(&img, "vdi");
        assert_eq!(back.len() as u64, 328 * MIB, "{name}");
        assert!(
            back[250 * MIB as usize..255 * MIB as usize] == new[..],
            "{name}"
        );
    }
}

#[test]
fn vdi_static_without_any_map_room_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("full.vdi");
    // 128 blocks: the map fills its 512 bytes, and every slot is in use.
    run(
        "qemu-img",
        &["create", "-f", "vdi", "-o", "static=on", s(&img), "128M"],
    );
    let before = std::fs::read(&img).unwrap();
    let o = vhdio(&["resize", s(&img), "+1G"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("crash-safe") && err.contains("convert"),
        "{err}"
    );
    assert!(std::fs::read(&img).unwrap() == before, "changed anyway");
}

#[test]
fn vhd_grow_past_its_bat_room_moves_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::Rng(7);
    let data: Vec<u8> = (0..16 * MIB).map(|_| rng.next() as u8 | 1).collect();
    // qemu-img pads the BAT to 512 bytes (128 blocks of 2 MiB) and puts the
    // first block right after it: growing to 1 TiB moves blocks.
    let img = qemu_image_from(
        &data,
        dir.path(),
        "a.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    ok(&["resize", s(&img), "1T"]);
    let size = 1 << 40;
    assert_eq!(qemu_size(&img), size);
    assert_eq!(common::open(&img, false).unwrap().size(), size);
    let out = ok(&["check", s(&img)]);
    assert!(out.contains("No problems found"), "{out}");
    vhd_util::check_file(&img).unwrap();
    assert!(qemu_slice(&img, "vpc", 0, 16 * MIB) == data, "old data");
    for at in [16 * MIB, 500 * GIB, size - 64 * MIB] {
        let v = qemu_slice(&img, "vpc", at, 64 * MIB);
        assert!(v.iter().all(|&b| b == 0), "new space at {at}");
    }
    let new: Vec<u8> = (0..5 * MIB).map(|_| rng.next() as u8).collect();
    write_through_library(&img, &new, 700 * GIB);
    let out = ok(&["check", s(&img)]);
    assert!(out.contains("No problems found"), "{out}");
    vhd_util::check_file(&img).unwrap();
    assert!(qemu_slice(&img, "vpc", 700 * GIB, 5 * MIB) == new);
    assert!(
        qemu_slice(&img, "vpc", 0, 16 * MIB) == data,
        "old data after writes"
    );
}

#[test]
fn vhd_child_grow_moves_its_bat() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![0x11u8; 16 * MIB as usize];
    let parent = qemu_image_from(
        &data,
        dir.path(),
        "p.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    // The child's parent locators follow its BAT: the BAT moves to the end.
    let child = dir.path().join("c.vhd");
    ok(&["snapshot", s(&parent), s(&child)]);
    let own = vec![0x22u8; 3 * MIB as usize];
    write_through_library(&child, &own, 4 * MIB);
    let parent_before = std::fs::read(&parent).unwrap();
    ok(&["resize", s(&child), "1T"]);
    let size: u64 = 1 << 40;
    assert!(
        std::fs::read(&parent).unwrap() == parent_before,
        "parent written"
    );
    let out = ok(&["check", s(&child)]);
    assert!(out.contains("No problems found"), "{out}");
    vhd_util::check_file(&child).unwrap();
    // qemu reads a VHD child alone (it ignores VHD parents): its own data.
    assert_eq!(qemu_size(&child), size);
    assert!(qemu_slice(&child, "vpc", 4 * MIB, 3 * MIB) == own);
    let read = |at: u64, len: u64| read_sized(&child, size, at, len);
    let head = read(0, 16 * MIB);
    assert!(head[..4 * MIB as usize].iter().all(|&b| b == 0x11));
    assert!(head[4 * MIB as usize..7 * MIB as usize] == own[..]);
    assert!(head[7 * MIB as usize..].iter().all(|&b| b == 0x11));
    assert!(read(16 * MIB, 64 * MIB).iter().all(|&b| b == 0));
    let new = vec![0x5Au8; 3 * MIB as usize];
    write_through_library(&child, &new, 900 * GIB);
    assert!(read(900 * GIB, 3 * MIB) == new);
    assert!(read(4 * MIB, 3 * MIB) == own);
    vhd_util::check_file(&child).unwrap();
    let out = ok(&["check", s(&child)]);
    assert!(out.contains("No problems found"), "{out}");
}

#[test]
fn fixed_vhdx_grow_past_its_bat_region() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![0x3Cu8; 8 * MIB as usize];
    let img = qemu_image_from(
        &data,
        dir.path(),
        "f.vhdx",
        "vhdx",
        "subformat=fixed,block_size=1M",
    );
    // Every new block is allocated, after the new BAT region (a sparse file).
    ok(&["resize", s(&img), "+130G"]);
    let size = 8 * MIB + 130 * GIB;
    assert_eq!(qemu_size(&img), size);
    check_clean(&img, "vhdx");
    assert!(qemu_slice(&img, "vhdx", 0, 8 * MIB) == data);
    assert!(
        qemu_slice(&img, "vhdx", size - 8 * MIB, 8 * MIB)
            .iter()
            .all(|&b| b == 0)
    );
    let new = vec![0x6Bu8; 2 * MIB as usize];
    write_through_library(&img, &new, 100 * GIB);
    assert!(qemu_slice(&img, "vhdx", 100 * GIB, 2 * MIB) == new);
    check_clean(&img, "vhdx");
}
