//! `vhdio resize`: grow by 64 MiB, then shrink to 32 MiB, every format and
//! kind made by qemu-img; sizes as `blockdev --getsize64` sees them through
//! the library, data read back by qemu-img, checkers clean.

#[path = "../../vdisk/tests/common/mod.rs"]
mod common;
mod vhdio_util;

use std::path::Path;
use std::process::Command;

use common::{qemu_image_from, qemu_raw, run};
use vhdio_util::{VHDIO, check_clean, ok, s, vhdio};

const MIB: usize = 1 << 20;

/// The size of the disk: `blockdev --getsize64` through the library when
/// it is built (as the README's `cargo build --release` does), else vdisk's.
fn disk_size(img: &Path) -> u64 {
    let lib = Path::new(VHDIO).parent().unwrap().join("libvhdio.so");
    if lib.is_file() {
        let out = ok(&["run", "blockdev", "--getsize64", s(img)]);
        return out.trim().parse().unwrap();
    }
    eprintln!(
        "{} not built: size read by vdisk, not blockdev",
        lib.display()
    );
    common::open(img, false).unwrap().size()
}

#[test]
fn grow_then_shrink_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::Rng(3);
    let data: Vec<u8> = (0..16 * MIB).map(|_| rng.next() as u8).collect();
    for (name, fmt, opts) in [
        ("dyn.vhd", "vpc", "subformat=dynamic,force_size=on"),
        ("fixed.vhd", "vpc", "subformat=fixed,force_size=on"),
        ("dyn.vhdx", "vhdx", "subformat=dynamic"),
        ("fixed.vhdx", "vhdx", "subformat=fixed"),
        ("dyn.vdi", "vdi", ""),
        ("static.vdi", "vdi", "static=on"),
    ] {
        let img = qemu_image_from(&data, dir.path(), name, fmt, opts);
        ok(&["resize", s(&img), "+64M"]);
        assert_eq!(disk_size(&img), 80 << 20, "{name}");
        let back = qemu_raw(&img, fmt);
        assert_eq!(back.len(), 80 * MIB, "{name}");
        assert!(back[..16 * MIB] == data[..], "{name}: old data");
        assert!(
            back[16 * MIB..].iter().all(|&b| b == 0),
            "{name}: new space"
        );
        check_clean(&img, fmt);
        // Write into the new space, so that shrinking frees something.
        let disk = common::open(&img, true).unwrap();
        disk.write_at(&vec![0x5A; MIB], 70 << 20).unwrap();
        disk.close().unwrap();
        let o = vhdio(&["resize", s(&img), "32M"]);
        assert_eq!(o.status.code(), Some(2), "{name}: shrink without --shrink");
        ok(&["resize", "--shrink", s(&img), "32M"]);
        assert_eq!(disk_size(&img), 32 << 20, "{name}");
        let back = qemu_raw(&img, fmt);
        assert_eq!(back.len(), 32 * MIB, "{name}");
        assert!(
            back[..16 * MIB] == data[..],
            "{name}: old data after shrink"
        );
        assert!(
            back[16 * MIB..].iter().all(|&b| b == 0),
            "{name}: zeros after shrink"
        );
        check_clean(&img, fmt);
        // Growing again: what was past the end is not seen again.
        ok(&["resize", s(&img), "+64M"]);
        let back = qemu_raw(&img, fmt);
        assert!(
            back[16 * MIB..].iter().all(|&b| b == 0),
            "{name}: regrown space"
        );
        check_clean(&img, fmt);
    }
}

#[test]
fn resize_a_child_and_unaligned_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![0x11u8; 8 * MIB];
    let parent = qemu_image_from(&data, dir.path(), "p.vhdx", "vhdx", "block_size=1M");
    let child = dir.path().join("c.vhdx");
    ok(&["snapshot", s(&parent), s(&child)]);
    let before = std::fs::read(&parent).unwrap();
    ok(&["resize", s(&child), "+3M"]);
    let disk = common::open(&child, false).unwrap();
    assert_eq!(disk.size(), 11 << 20);
    let mut v = vec![0u8; 11 * MIB];
    disk.read_at(&mut v, 0).unwrap();
    assert!(v[..8 * MIB].iter().all(|&b| b == 0x11));
    assert!(v[8 * MIB..].iter().all(|&b| b == 0));
    assert!(std::fs::read(&parent).unwrap() == before, "parent written");
    check_clean(&child, "vpc");
    // Shrink into a block, write its tail, grow: the tail reads zeros.
    let img = dir.path().join("u.vdi");
    ok(&["create", "-f", "vdi", s(&img), "4M"]);
    let disk = common::open(&img, true).unwrap();
    disk.write_at(&vec![0x77; 4 * MIB], 0).unwrap();
    disk.close().unwrap();
    ok(&["resize", "--shrink", s(&img), "-1536K"]);
    ok(&["resize", s(&img), "4M"]);
    let back = qemu_raw(&img, "vdi");
    assert!(back[..2560 * 1024].iter().all(|&b| b == 0x77));
    assert!(
        back[2560 * 1024..].iter().all(|&b| b == 0),
        "old bytes past the shrink"
    );
    check_clean(&img, "vdi");
}

#[test]
fn an_image_another_process_writes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("busy.vhd");
    let child = dir.path().join("busy-child.vhd");
    run(
        "qemu-img",
        &["create", "-f", "vpc", "-o", "force_size=on", s(&img), "8M"],
    );
    ok(&["snapshot", s(&img), s(&child)]);
    // qemu-io holds qemu's writer locks on the child while it sleeps (qemu
    // reads a VHD child as a standalone disk).
    let mut qemu = Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "sleep 3000", s(&child)])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    for args in [
        vec!["resize", s(&child), "+1M"],
        vec!["rebase", "-u", "-b", s(&img), s(&child)],
        vec!["commit", s(&child)],
    ] {
        let o = vhdio(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("another process is writing"),
            "{args:?}: {err}"
        );
    }
    qemu.wait().unwrap();
    ok(&["resize", s(&child), "+1M"]);
}
