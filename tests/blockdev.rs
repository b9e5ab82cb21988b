//! The block-device ioctls `blockdev` asks, on each format and on partition
//! windows, and the refusal to back a loop device with a dummy.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::os::unix::fs::symlink;
use std::path::Path;

const FORMATS: &[(&str, &str, &str)] = &[
    ("vpc", "subformat=dynamic", "vhd"),
    ("vhdx", "", "vhdx"),
    ("vdi", "", "vdi"),
    ("vmdk", "", "vmdk"),
];

fn lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// Every query of `blockdev` that a kernel disk answers, and --setra, on
/// the whole disk and on partition 2 (a symlink), for VHD, VHDX and VDI.
#[test]
fn blockdev_queries_on_each_format_and_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let raw = common::sfdisk_raw(dir, "src.raw", 16 << 20, "label: dos\n,4M,83\n,,83\n");
    let data = std::fs::read(&raw).unwrap();
    for &(fmt, opts, ext) in FORMATS {
        let name = format!("d.{ext}");
        let img = common::qemu_image_from(&data, dir, &name, fmt, opts);
        let size = common::qemu_raw(&img, fmt).len() as u64;
        let part = format!("{name}2");
        symlink(&name, dir.join(&part)).unwrap();
        let p2_size = data.len() as u64 - (2048 + 8192) * 512;
        for (dev, bytes) in [(name.as_str(), size), (part.as_str(), p2_size)] {
            let out = preload::run(
                dir,
                "blockdev",
                &[
                    "--getra",
                    "--getfra",
                    "--getmaxsect",
                    "--getiomin",
                    "--getioopt",
                    "--getalignoff",
                    "--getpbsz",
                    "--getss",
                    "--getbsz",
                    "--getdiscardzeroes",
                    "--getsize64",
                    "--setra",
                    "512",
                    "--getra",
                    "--setra",
                    "255",
                    "--getra",
                    "--setra",
                    "256",
                    dev,
                ],
            );
            let want: Vec<String> = [
                "256", "256", "2048", "512", "0", "0", "512", "512", "4096", "0",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([bytes.to_string(), "512".into(), "248".into()])
            .collect();
            assert_eq!(lines(&out), want, "blockdev queries on {dev} ({fmt})");
            let report = preload::run(dir, "blockdev", &["--report", dev]);
            assert_eq!(
                lines(&report),
                [
                    "RO RA SSZ BSZ StartSec Size Device".to_string(),
                    format!("rw 256 512 4096 0 {bytes} {dev}"),
                ],
                "blockdev --report on {dev} ({fmt})"
            );
        }
    }
}

/// A VHDX with 4 KiB physical sectors: a partition starting at sector 63 is
/// 512 bytes short of the next physical boundary (BLKALIGNOFF), as Linux
/// says for such a partition; one at 16384 is aligned.
#[test]
fn alignment_offset_of_a_partition_window() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("d.vhdx");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    vdisk::vhdx::create(
        &(file, true),
        &vdisk::vhdx::CreateOptions::dynamic(16 << 20),
    )
    .unwrap();
    let mut mbr = [0u8; 512];
    for (i, (start, count)) in [(63u32, 8192u32), (16384, 8192)].iter().enumerate() {
        let e = &mut mbr[0x1BE + 16 * i..0x1BE + 16 * (i + 1)];
        e[4] = 0x83;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&count.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    let disk = common::open(&path, true).unwrap();
    disk.write_at(&mbr, 0).unwrap();
    disk.flush().unwrap();
    drop(disk);
    for (dev, want) in [("d.vhdx", "0"), ("d.vhdx1", "512"), ("d.vhdx2", "0")] {
        if dev != "d.vhdx" {
            symlink("d.vhdx", dir.join(dev)).unwrap();
        }
        let out = preload::run(
            dir,
            "blockdev",
            &["--getalignoff", "--getpbsz", "--getiomin", dev],
        );
        assert_eq!(lines(&out), [want, "4096", "4096"], "{dev}");
    }
    let p1 = preload::run(dir, "blockdev", &["--getsize64", "d.vhdx1"]);
    assert_eq!(lines(&p1), [(8192 * 512).to_string()]);
}

/// Loop devices attached to our dummies, by their backing-file name.
fn our_loops(dir: &Path) -> Vec<String> {
    let out = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .expect("losetup");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .map(str::to_string)
        .collect()
}

/// `losetup -f --show disk.vhdx` would attach the dummy memfd: a 0-byte
/// device. Refused with one warning naming the way to a kernel device.
#[test]
fn losetup_refuses_an_image() {
    if !Path::new("/dev/loop-control").exists() {
        println!("SKIPPED: /dev/loop-control is absent (no loop driver)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = vec![0x5Au8; 4 << 20];
    common::qemu_image_from(&data, dir, "d.vhdx", "vhdx", "");
    assert_eq!(our_loops(dir), Vec::<String>::new());
    let out = preload::command(dir, "losetup", &["-f", "--show", "d.vhdx"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        // The old behaviour: detach what it attached before failing.
        std::process::Command::new("losetup")
            .args(["-d", &stdout])
            .status()
            .ok();
        panic!("losetup attached the image's dummy as {stdout}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("libvhdio[")).collect();
    assert_eq!(warnings.len(), 1, "one warning line: {err}");
    assert!(
        warnings[0].contains("vhdio serve") && warnings[0].contains("nbd-client"),
        "{err}"
    );
    assert!(err.contains("Operation not supported"), "{err}");
    assert_eq!(
        our_loops(dir),
        Vec::<String>::new(),
        "a loop device is left"
    );
    // mount -o loop sets up its loop device the same way (libmount): refused
    // before anything is attached or mounted.
    std::fs::create_dir(dir.join("mnt")).unwrap();
    let out = preload::command(dir, "mount", &["-o", "loop,ro", "d.vhdx", "mnt"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        std::process::Command::new("umount")
            .arg(dir.join("mnt"))
            .status()
            .ok();
        panic!("mount -o loop mounted the image's dummy");
    }
    if err.contains("must be superuser") || err.contains("ermission denied") {
        println!("SKIPPED mount -o loop: needs root ({err})");
    } else {
        assert!(err.contains("vhdio serve"), "mount -o loop: {err}");
    }
    assert_eq!(
        our_loops(dir),
        Vec::<String>::new(),
        "a loop device is left"
    );
}
