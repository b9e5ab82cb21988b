//! A VHDX with 4096-byte logical sectors, which qemu refuses: programs see a
//! 4Kn disk (BLKSSZGET 4096), sgdisk writes a GPT in 4 KiB LBAs through the
//! library, partitions open by name and hold a clean ext4.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::os::unix::fs::symlink;

#[test]
fn four_k_vhdx_gpt_partitions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("d.vhdx");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let mut opts = vdisk::CreateOptions::new(vdisk::Format::Vhdx, 64 << 20);
    opts.logical_sector_size = 4096;
    vdisk::create(&(file, true), opts).unwrap();

    let ss = preload::run(dir, "blockdev", &["--getss", "--getsize64", "d.vhdx"]);
    assert_eq!(
        String::from_utf8_lossy(&ss.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["4096", "67108864"]
    );
    preload::run(
        dir,
        "sgdisk",
        &["-o", "-n", "1:0:+20M", "-n", "2:0:0", "d.vhdx"],
    );
    // The GPT header is at LBA 1 = byte 4096 of the virtual disk.
    let disk = common::open(&path, false).unwrap();
    let mut lba1 = [0u8; 8];
    disk.read_at(&mut lba1, 4096).unwrap();
    assert_eq!(&lba1, b"EFI PART");
    let parts = vdisk::part::partitions(&disk).unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].start, 256 * 4096);
    assert_eq!(parts[0].size, 20 << 20);
    drop(disk);

    symlink("d.vhdx", dir.join("d.vhdx2")).unwrap();
    let size = preload::run(dir, "blockdev", &["--getsize64", "d.vhdx2"]);
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        parts[1].size.to_string()
    );
    preload::run(dir, "mkfs.ext4", &["-q", "d.vhdx2"]);
    let fsck = preload::run(dir, "e2fsck", &["-fn", "d.vhdx2"]);
    assert!(String::from_utf8_lossy(&fsck.stdout).contains("clean") || fsck.status.success());
    // Partition 1 was not touched by mkfs on partition 2.
    let disk = common::open(&path, false).unwrap();
    let mut p1 = vec![0u8; parts[0].size as usize];
    disk.read_at(&mut p1, parts[0].start).unwrap();
    assert!(p1.iter().all(|&b| b == 0));
    // A partition number the table lacks is ENOENT, not the whole disk.
    symlink("d.vhdx", dir.join("d.vhdx7")).unwrap();
    let out = preload::command(dir, "blockdev", &["--getsize64", "d.vhdx7"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
