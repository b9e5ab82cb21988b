//! Issue 4's "done when", through the preload library: random unaligned
//! pwrites from python into VHDs made by qemu-img equal the same writes on a
//! raw copy (read back by qemu-img convert) and leave a structurally valid
//! file; a differencing chain written through the library changes only the
//! child; mkfs.ext4 + debugfs through the library give a clean file system
//! that e2fsck and debugfs accept on qemu-img's conversion.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{pattern, qemu_image_from, qemu_raw, run as tool};
use vhd_util::*;

const MIB: u64 = 1 << 20;

#[test]
fn random_pwrites_through_the_library_match_a_raw_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Odd size: not whole 2 MiB blocks, and not a CHS product (qemu rounds
    // the non-forced flavours up to one: the tail must be writable too).
    let size = 9 * MIB + 7 * 512;
    for (i, (name, opts, disk_type)) in [
        ("dynamic.vhd", "subformat=dynamic", 3),
        ("forced.vhd", "subformat=dynamic,force_size=on", 3),
        ("fixed.vhd", "subformat=fixed", 2),
        ("forced-fixed.vhd", "subformat=fixed,force_size=on", 2),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut data, _) = pattern(10 + i as u64, size as usize);
        data[..3000].fill(0x42);
        let img = qemu_image_from(&data, dir, name, "vpc", opts);
        fs::remove_file(dir.join(format!("{name}.src.raw"))).ok();
        let mut model = qemu_raw(&img, "vpc");
        assert!(model[..data.len()] == data[..]);
        check_file(&img).unwrap();
        let ops = random_writes(20 + i as u64, model.len() as u64, 2 * MIB, 24);
        preload::pwrite_through_library(dir, &img, &ops);
        apply_writes(&mut model, &ops);
        let got = qemu_raw(&img, "vpc");
        assert_eq!(got.len(), model.len(), "{name}: size changed");
        if let Some(at) = (0..got.len()).find(|&k| got[k] != model[k]) {
            panic!(
                "{name}: qemu-img reads {:#x} at {at}, the raw copy has {:#x}",
                got[at], model[at]
            );
        }
        let layout = check_file(&img).unwrap();
        assert_eq!(layout.disk_type, disk_type, "{name}");
        if disk_type == 3 {
            // Every block holding data is allocated (the checker saw no overlaps).
            for (b, chunk) in model.chunks(2 << 20).enumerate() {
                let allocated = layout.blocks.iter().any(|&(i, _)| i == b);
                assert!(
                    allocated || chunk.iter().all(|&x| x == 0),
                    "{name}: block {b} has data but no BAT entry"
                );
            }
        } else {
            assert_eq!(
                fs::metadata(&img).unwrap().len(),
                model.len() as u64 + 512,
                "{name}: fixed file grew"
            );
        }
        // And the library reads back what it wrote.
        let cat = preload::run(dir, "cat", &[name]);
        assert!(
            cat.stdout == model,
            "{name}: reading through the library differs"
        );
    }
}

#[test]
fn differencing_child_written_through_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 6 * MIB + 512;
    fs::create_dir(dir.join("parents")).unwrap();
    let (mut data, _) = pattern(30, size as usize);
    data[..MIB as usize].fill(0x5C);
    let basep = qemu_image_from(
        &data,
        &dir.join("parents"),
        "base.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    fs::remove_file(dir.join("parents/base.vhd.src.raw")).ok();
    // Depth 2 of children: mid (W2ru into parents/), top (MacX relative).
    let mut mid = Child::new(parent_info(&basep), 31);
    mid.locators = vec![w2ru(r".\base.vhd", Space::Bytes)];
    mid.parent_name = "base.vhd".into();
    mid.data = vec![(4096, vec![0x61; 8192]), (3 * MIB - 512, vec![0x62; 1024])];
    let midp = dir.join("parents/mid.vhd");
    fs::write(&midp, mid.build()).unwrap();
    let mut top = Child::new(parent_info(&midp), 32);
    top.locators = vec![macx("file://./parents/mid.vhd", Space::Sectors)];
    top.parent_name = "nowhere.vhd".into();
    top.creator = *b"tap\0";
    top.block_size = MIB as u32;
    top.data = vec![(8192, vec![0x71; 512])];
    let topp = dir.join("top.vhd");
    fs::write(&topp, top.build()).unwrap();
    let mut model = data;
    apply(&mut model, &mid.data);
    apply(&mut model, &top.data);
    let before = [snapshot(&basep), snapshot(&midp)];
    let cat = preload::run(dir, "cat", &["top.vhd"]);
    assert!(
        cat.stdout == model,
        "the chain reads differently through the library"
    );
    let ops = random_writes(33, size, 2 * MIB, 16);
    preload::pwrite_through_library(dir, &topp, &ops);
    apply_writes(&mut model, &ops);
    let cat = preload::run(dir, "cat", &["top.vhd"]);
    assert!(
        cat.stdout == model,
        "after writes, the chain reads differently through the library"
    );
    // vdisk, in this process, agrees.
    let disk = common::open(&topp, false).unwrap();
    assert!(common::read_all(&disk) == model);
    check_file(&topp).unwrap();
    assert_unchanged(&basep, &before[0]);
    assert_unchanged(&midp, &before[1]);
}

fn e2fsck_clean(dir: &Path, image: &str, preloaded: bool) {
    let out = if preloaded {
        preload::command(dir, "e2fsck", &["-fn", image])
            .output()
            .unwrap()
    } else {
        Command::new("e2fsck")
            .args(["-fn", image])
            .current_dir(dir)
            .output()
            .unwrap()
    };
    assert!(
        out.status.success(),
        "e2fsck -fn {image} (library: {preloaded}) is not clean ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mkfs_ext4_through_the_library_is_clean_for_qemu_and_e2fsck() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img: PathBuf = dir.join("fs.vhd");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            img.to_str().unwrap(),
            "96M",
        ],
    );
    preload::run(dir, "mkfs.ext4", &["-q", "-F", "-L", "vhdtest", "fs.vhd"]);
    e2fsck_clean(dir, "fs.vhd", true);
    let (payload, _) = pattern(40, 3 * MIB as usize + 1234);
    fs::write(dir.join("payload.bin"), &payload).unwrap();
    preload::run(
        dir,
        "debugfs",
        &["-w", "-R", "write payload.bin payload.bin", "fs.vhd"],
    );
    preload::run(dir, "debugfs", &["-w", "-R", "mkdir dir", "fs.vhd"]);
    e2fsck_clean(dir, "fs.vhd", true);
    check_file(&img).unwrap();
    // qemu-img's view of the same file.
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            img.to_str().unwrap(),
            dir.join("fs.raw").to_str().unwrap(),
        ],
    );
    e2fsck_clean(dir, "fs.raw", false);
    let out = Command::new("debugfs")
        .args(["-R", "cat payload.bin", "fs.raw"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.stdout == payload,
        "debugfs cat on qemu-img's conversion differs ({} bytes)",
        out.stdout.len()
    );
    let ls = tool(
        "debugfs",
        &["-R", "ls -l /", dir.join("fs.raw").to_str().unwrap()],
    );
    assert!(ls.contains("dir") && ls.contains("lost+found"), "{ls}");
    // And through the library, the same bytes.
    let out = preload::run(dir, "debugfs", &["-R", "cat payload.bin", "fs.vhd"]);
    assert!(out.stdout == payload);
    let raw = fs::read(dir.join("fs.raw")).unwrap();
    let cat = preload::run(dir, "cat", &["fs.vhd"]);
    assert!(
        cat.stdout == raw,
        "library and qemu-img disagree on the whole disk"
    );
}
