//! VMDK through the library (issue 20): every subformat qemu-img writes,
//! opened by its descriptor, reads byte-exact with the right size; random
//! pwrites equal a raw model as qemu-img reads them back and qemu-img check
//! is clean; a child made by qemu-img reads and writes with its parent
//! unchanged; mkfs.ext4 + e2fsck; a partition by name (disk.vmdk1).

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::path::Path;

use common::{pattern, qemu_child, qemu_create, qemu_image_from, qemu_raw, run as tool};
use vhd_util::{apply_writes, random_writes};

const MIB: u64 = 1 << 20;

fn check_clean(img: &Path) {
    let out = tool("qemu-img", &["check", "-f", "vmdk", img.to_str().unwrap()]);
    assert!(out.contains("No errors"), "{}: {out}", img.display());
}

#[test]
fn every_subformat_reads_through_its_descriptor() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 7 * MIB + 512;
    let (model, _) = pattern(80, size as usize);
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        let dir = tmp.path().join(sub);
        std::fs::create_dir(&dir).unwrap();
        qemu_image_from(&model, &dir, "d.vmdk", "vmdk", &format!("subformat={sub}"));
        let cat = preload::run(&dir, "cat", &["d.vmdk"]);
        assert!(cat.stdout == model, "{sub}: cat reads other data");
        let dd = preload::run(&dir, "dd", &["if=d.vmdk", "bs=64k", "status=none"]);
        assert!(dd.stdout == model, "{sub}: dd reads other data");
        let n = preload::first_word(&preload::run(&dir, "blockdev", &["--getsize64", "d.vmdk"]));
        assert_eq!(n, size.to_string(), "{sub}");
    }
}

#[test]
fn random_pwrites_equal_a_raw_model() {
    for (i, sub) in ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse"]
        .into_iter()
        .enumerate()
    {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let size = 10 * MIB + 3 * 512;
        let (mut model, _) = pattern(90 + i as u64, size as usize);
        let img = qemu_image_from(&model, dir, "d.vmdk", "vmdk", &format!("subformat={sub}"));
        let ops = random_writes(90 + i as u64, size, 64 << 10, 30);
        apply_writes(&mut model, &ops);
        preload::pwrite_through_library(dir, &img, &ops);
        assert!(
            qemu_raw(&img, "vmdk") == model,
            "{sub}: qemu reads other data"
        );
        check_clean(&img);
        assert!(
            preload::run(dir, "cat", &["d.vmdk"]).stdout == model,
            "{sub}"
        );
    }
}

#[test]
fn child_made_by_qemu_reads_and_writes_parent_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 5 * MIB;
    let (mut model, _) = pattern(100, size as usize);
    let base = qemu_image_from(&model, dir, "base.vmdk", "vmdk", "");
    let child = dir.join("child.vmdk");
    qemu_child(&child, "vmdk", "", "base.vmdk", "vmdk", None);
    let before = std::fs::read(&base).unwrap();
    assert!(preload::run(dir, "cat", &["child.vmdk"]).stdout == model);
    let ops = random_writes(101, size, 64 << 10, 25);
    apply_writes(&mut model, &ops);
    preload::pwrite_through_library(dir, &child, &ops);
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the parent was written"
    );
    assert!(qemu_raw(&child, "vmdk") == model);
    check_clean(&child);
}

#[test]
fn stream_optimized_write_fails_with_erofs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (model, _) = pattern(110, 2 * MIB as usize);
    let img = qemu_image_from(&model, dir, "s.vmdk", "vmdk", "subformat=streamOptimized");
    let before = std::fs::read(&img).unwrap();
    let out = preload::command(
        dir,
        "dd",
        &[
            "if=/dev/zero",
            "of=s.vmdk",
            "bs=4k",
            "count=1",
            "conv=notrunc",
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Read-only file system"),
        "{err}"
    );
    assert!(
        err.contains("subformat=monolithicSparse"),
        "no hint what to do: {err}"
    );
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn mkfs_ext4_and_a_partition_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = dir.join("disk.vmdk");
    qemu_create(&img, "vmdk", "", "64M");
    preload::run(dir, "mkfs.ext4", &["-q", "-F", "disk.vmdk"]);
    preload::run(dir, "e2fsck", &["-fn", "disk.vmdk"]);
    let raw = dir.join("disk.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    tool("e2fsck", &["-fn", raw.to_str().unwrap()]);
    check_clean(&img);

    // A partitioned disk: partition 2 through its name.
    let p = dir.join("p.vmdk");
    qemu_create(&p, "vmdk", "", "16M");
    preload::sh(
        dir,
        "printf 'start=2048,size=8192\\nstart=10240,size=20480\\n' | sfdisk -q p.vmdk",
    );
    std::os::unix::fs::symlink("p.vmdk", dir.join("p.vmdk2")).unwrap();
    let n = preload::first_word(&preload::run(dir, "blockdev", &["--getsize64", "p.vmdk2"]));
    assert_eq!(n, (20480 * 512).to_string());
    preload::run(dir, "mkfs.ext4", &["-q", "-F", "p.vmdk2"]);
    preload::run(dir, "e2fsck", &["-fn", "p.vmdk2"]);
    let praw = dir.join("p.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            p.to_str().unwrap(),
            praw.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&praw).unwrap();
    let part = dir.join("part2.raw");
    std::fs::write(&part, &data[10240 * 512..(10240 + 20480) * 512]).unwrap();
    tool("e2fsck", &["-fn", part.to_str().unwrap()]);
    check_clean(&p);
}
