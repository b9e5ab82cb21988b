//! LIBVHD_IO_PUNCH_HOLES (issue 16): discards on fixed images (VHD fixed,
//! VHDX with LeaveBlocksAllocated, VDI static) and on parts of dynamic
//! blocks punch holes in the container file instead of writing zeros. With
//! the option the file's allocated blocks shrink; without it (the default)
//! they do not. Either way the range reads zeros, through the library and
//! through `qemu-img convert`, and the image stays clean for its checker.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Fixed images: (qemu format, create options, extension).
const FIXED: &[(&str, &str, &str)] = &[
    ("vpc", "subformat=fixed,force_size=on", "vhd"),
    ("vhdx", "subformat=fixed", "vhdx"),
    ("vdi", "static=on", "vdi"),
];

/// Bytes the host file system holds for the file (st_blocks).
fn allocated(img: &Path) -> u64 {
    std::fs::metadata(img).unwrap().blocks() * 512
}

/// `program args` under the library, with or without the option.
fn run(dir: &Path, punch: bool, program: &str, args: &[&str]) {
    let mut c = preload::command(dir, program, args);
    if punch {
        c.env("LIBVHD_IO_PUNCH_HOLES", "1");
    } else {
        c.env_remove("LIBVHD_IO_PUNCH_HOLES");
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_through_library(dir: &Path, dev: &str) -> Vec<u8> {
    preload::run(
        dir,
        "dd",
        &[&format!("if={dev}"), "of=back.raw", "bs=1M", "status=none"],
    );
    let back = std::fs::read(dir.join("back.raw")).unwrap();
    std::fs::remove_file(dir.join("back.raw")).unwrap();
    back
}

/// blkdiscard of 3 MiB at 1 MiB, fallocate -p of 2 MiB + 4 KiB at an
/// offset inside a page, blkdiscard of 1 MiB at 12 MiB: 6 MiB + 4 KiB in all.
fn discards(dir: &Path, dev: &str, punch: bool, model: &mut [u8]) -> u64 {
    let m = |n: u64| (n * MIB).to_string();
    let requests: [(&str, Vec<String>, u64, u64); 3] = [
        (
            "blkdiscard",
            vec!["-f".into(), "-o".into(), m(1), "-l".into(), m(3)],
            MIB,
            3 * MIB,
        ),
        (
            "fallocate",
            vec![
                "-p".into(),
                "-o".into(),
                (6 * MIB + 512).to_string(),
                "-l".into(),
                (2 * MIB + 4096).to_string(),
            ],
            6 * MIB + 512,
            2 * MIB + 4096,
        ),
        (
            "blkdiscard",
            vec!["-f".into(), "-o".into(), m(12), "-l".into(), m(1)],
            12 * MIB,
            MIB,
        ),
    ];
    let mut total = 0;
    for (program, mut args, off, len) in requests {
        args.push(dev.to_string());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(dir, punch, program, &a);
        model[off as usize..(off + len) as usize].fill(0);
        total += len;
    }
    total
}

fn fixed_image(punch: bool) {
    for &(fmt, opts, ext) in FIXED {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut model = common::nonzero_data(11, SIZE);
        let name = format!("d.{ext}");
        let img = common::qemu_image_from(&model, dir, &name, fmt, opts);
        let (len_before, before) = (std::fs::metadata(&img).unwrap().len(), allocated(&img));
        assert!(
            before >= SIZE,
            "{fmt}: the fixed image is not fully allocated ({before} bytes)"
        );
        let discarded = discards(dir, &name, punch, &mut model);
        let after = allocated(&img);
        if punch {
            // Every whole page of the ranges is a hole (the file system may
            // keep a block at each unaligned edge).
            assert!(
                after + discarded - 64 * 1024 <= before,
                "{fmt}: with LIBVHD_IO_PUNCH_HOLES {before} -> {after} bytes \
                 allocated, expected {discarded} fewer"
            );
        } else {
            assert!(
                after >= before,
                "{fmt}: without the option the file lost allocated space: {before} -> {after}"
            );
        }
        assert_eq!(
            std::fs::metadata(&img).unwrap().len(),
            len_before,
            "{fmt}: file length changed"
        );
        common::assert_same(
            &read_through_library(dir, &name),
            &model,
            &format!("{fmt}: library"),
        );
        common::assert_same(
            &common::qemu_raw(&img, fmt),
            &model,
            &format!("{fmt}: qemu-img"),
        );
        vhd_util::assert_clean(fmt, &img);
    }
}

#[test]
fn fixed_images_punch_holes_with_the_option() {
    fixed_image(true);
}

#[test]
fn fixed_images_keep_their_space_by_default() {
    fixed_image(false);
}

/// A dynamic VHD and VHDX with 2 MiB blocks: discards of parts of allocated
/// blocks (the format cannot unmap them) punch the pages inside the range.
#[test]
fn parts_of_dynamic_blocks_punch_holes_with_the_option() {
    let dynamic: &[(&str, &str, &str)] = &[
        ("vpc", "subformat=dynamic,force_size=on", "vhd"),
        ("vhdx", "subformat=dynamic,block_size=2M", "vhdx"),
        ("vdi", "static=off", "vdi"),
    ];
    for &(fmt, opts, ext) in dynamic {
        for punch in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let mut model = common::nonzero_data(13, SIZE);
            let name = format!("d.{ext}");
            let img = common::qemu_image_from(&model, dir, &name, fmt, opts);
            let before = allocated(&img);
            // 1 MiB + 512 bytes inside the block at 4 MiB (no whole block).
            let (off, len) = (4 * MIB + 3584, MIB + 512);
            let args = ["-p", "-o", &off.to_string(), "-l", &len.to_string(), &name];
            run(dir, punch, "fallocate", &args);
            model[off as usize..(off + len) as usize].fill(0);
            let after = allocated(&img);
            if punch {
                assert!(
                    after + len - 64 * 1024 <= before,
                    "{fmt}: with the option {before} -> {after} bytes allocated"
                );
            } else {
                assert!(
                    after >= before,
                    "{fmt}: {before} -> {after} without the option"
                );
            }
            common::assert_same(
                &read_through_library(dir, &name),
                &model,
                &format!("{fmt} punch={punch}: library"),
            );
            common::assert_same(
                &common::qemu_raw(&img, fmt),
                &model,
                &format!("{fmt} punch={punch}: qemu-img"),
            );
            vhd_util::assert_clean(fmt, &img);
        }
    }
}

/// BLKZEROOUT keeps space (the kernel's BLKDEV_ZERO_NOUNMAP): no hole even
/// with the option, and the range reads zeros.
#[test]
fn zeroout_keeps_the_space_even_with_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut model = common::nonzero_data(17, SIZE);
    let img = common::qemu_image_from(&model, dir, "d.vhdx", "vhdx", "subformat=fixed");
    let before = allocated(&img);
    run(
        dir,
        true,
        "blkdiscard",
        &[
            "-f",
            "-z",
            "-o",
            &MIB.to_string(),
            "-l",
            &(4 * MIB).to_string(),
            "d.vhdx",
        ],
    );
    model[MIB as usize..5 * MIB as usize].fill(0);
    assert!(allocated(&img) >= before, "BLKZEROOUT punched holes");
    common::assert_same(&read_through_library(dir, "d.vhdx"), &model, "library");
    vhd_util::assert_clean("vhdx", &img);
}
