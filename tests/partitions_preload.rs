//! Partitions through the library (issue 7): every partition of an MBR disk
//! (three primaries, an extended partition, two logicals) and of a GPT disk
//! (entries 1, 2, 3, 5, 7, 12), stored as VHD, VHDX and VDI, reads through its
//! `vhdpartx -a` link exactly as the raw slice; writes stay inside their
//! partition; and the original libvhdio README's examples work as written.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{qemu_image_from, qemu_raw};

fn vhdpartx() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "vhdpartx", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .status()
        .unwrap();
    assert!(status.success());
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release/vhdpartx")
}

/// A raw disk of `mib` MiB partitioned by sfdisk with `script`, with a
/// distinct pattern in every sector so slices are recognisable.
fn partitioned_raw(path: &Path, mib: usize, script: &str) -> Vec<u8> {
    let mut data = vec![0u8; mib << 20];
    for (i, s) in data.chunks_mut(512).enumerate() {
        s[..8].copy_from_slice(&(i as u64).to_le_bytes());
        s[8] = 0xC7;
    }
    std::fs::write(path, &data).unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    sfdisk
        .stdin
        .as_mut()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    drop(sfdisk.stdin.take());
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    std::fs::read(path).unwrap()
}

/// (number, start, size) in bytes, as `sfdisk -d` reports them for the raw
/// disk (lines like `src.raw5 : start=  14336, size=  10240, type=83`).
fn sfdisk_partitions(raw: &Path) -> Vec<(u32, u64, u64)> {
    let out = Command::new("sfdisk").arg("-d").arg(raw).output().unwrap();
    let dump = String::from_utf8_lossy(&out.stdout).to_string();
    let prefix = raw.to_str().unwrap();
    dump.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| {
            let (n, rest) = l.split_once(" : ").unwrap();
            let field = |k: &str| -> u64 {
                let v = rest
                    .split(',')
                    .find_map(|f| f.trim().strip_prefix(&format!("{k}=")))
                    .unwrap();
                v.trim().parse().unwrap()
            };
            (
                n.trim().parse().unwrap(),
                field("start") * 512,
                field("size") * 512,
            )
        })
        .collect()
}

fn check_disk(vhdpartx: &Path, fmt: &str, ext: &str, script: &str, expect: &[u32]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let raw_path = dir.join("src.raw");
    let raw = partitioned_raw(&raw_path, 40, script);
    let parts = sfdisk_partitions(&raw_path);
    assert_eq!(
        parts.iter().map(|p| p.0).collect::<Vec<_>>(),
        expect,
        "sfdisk numbering"
    );
    let opts = if fmt == "vpc" {
        "subformat=dynamic,force_size=on"
    } else {
        ""
    };
    let name = format!("disk.{ext}");
    let img = qemu_image_from(&raw, dir, &name, fmt, opts);
    std::fs::write(dir.join(format!("{name}99")), b"not a link").unwrap();

    let list = Command::new(vhdpartx).arg("-l").arg(&img).output().unwrap();
    assert!(list.status.success());
    let text = String::from_utf8_lossy(&list.stdout).to_string();
    // NAME NR START SECTORS TYPE, by number.
    let listed: Vec<(u32, u64, u64, String)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (
                c[1].parse().unwrap(),
                c[2].parse().unwrap(),
                c[3].parse().unwrap(),
                c[4..].join(" "),
            )
        })
        .collect();
    assert_eq!(
        listed.len(),
        parts.len(),
        "{name}: vhdpartx -l lists\n{text}"
    );
    for (&(n, start, size), l) in parts.iter().zip(&listed) {
        assert_eq!(
            (l.0, l.1, l.2),
            (n, start / 512, size / 512),
            "{name}{n} in\n{text}"
        );
    }
    assert!(
        Command::new(vhdpartx)
            .arg("-a")
            .arg(&img)
            .status()
            .unwrap()
            .success()
    );

    let mut expected = raw.clone();
    for &(n, start, size) in &parts {
        let link = format!("{name}{n}");
        let extended = listed.iter().any(|l| l.0 == n && l.3 == "0x05");
        let window = if extended {
            // The extended partition: Linux exposes 1 KiB of it.
            1024
        } else {
            size
        };
        let got = preload::run(dir, "cat", &[&link]).stdout;
        assert!(
            got.len() as u64 == window && got[..] == raw[start as usize..(start + window) as usize],
            "{link}: cat differs from the raw slice"
        );
        if window < 8192 {
            continue;
        }
        // The last 4 KiB of the partition, then one byte past its end.
        let tail = vec![n as u8 ^ 0x5A; 4096];
        std::fs::write(dir.join("tail.bin"), &tail).unwrap();
        preload::run(
            dir,
            "dd",
            &[
                "if=tail.bin",
                &format!("of={link}"),
                "bs=4096",
                &format!("seek={}", window / 4096 - 1),
                "conv=notrunc",
                "status=none",
            ],
        );
        expected[(start + window - 4096) as usize..(start + window) as usize]
            .copy_from_slice(&tail);
        let past = preload::command(
            dir,
            "dd",
            &[
                "if=tail.bin",
                &format!("of={link}"),
                "bs=512",
                "count=1",
                &format!("seek={}", window / 512),
                "conv=notrunc",
                "status=none",
            ],
        )
        .output()
        .unwrap();
        assert!(
            !past.status.success()
                && String::from_utf8_lossy(&past.stderr).contains("No space left"),
            "{link}: a write past the end was not refused"
        );
    }
    assert!(
        qemu_raw(&img, fmt)[..raw.len()] == expected[..],
        "{name}: writes did not land exactly in their partitions"
    );

    assert!(
        Command::new(vhdpartx)
            .arg("-d")
            .arg(&img)
            .status()
            .unwrap()
            .success()
    );
    for &(n, _, _) in &parts {
        assert!(
            !dir.join(format!("{name}{n}")).exists(),
            "{name}{n} not removed"
        );
    }
    assert_eq!(
        std::fs::read(dir.join(format!("{name}99"))).unwrap(),
        b"not a link"
    );
}

#[test]
fn mbr_and_gpt_partitions_in_every_format() {
    let vhdpartx = vhdpartx();
    let mbr = "label: dos\n,6M,L\n,6M,L\n,6M,L\n,,E\n,5M,L\n,,L\n";
    let gpt = "label: gpt\n1: start=2048, size=8192\n2: size=8192\n3: size=8192\n5: size=8192\n7: size=8192\n12: size=4096\n";
    for (fmt, ext) in [
        ("vpc", "vhd"),
        ("vhdx", "vhdx"),
        ("vdi", "vdi"),
        ("vmdk", "vmdk"),
    ] {
        check_disk(&vhdpartx, fmt, ext, mbr, &[1, 2, 3, 4, 5, 6]);
        check_disk(&vhdpartx, fmt, ext, gpt, &[1, 2, 3, 5, 7, 12]);
    }
}

/// The examples of the original libvhdio README, as written.
#[test]
fn the_original_examples() {
    let vhdpartx = vhdpartx();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let raw = partitioned_raw(&dir.join("src.raw"), 48, "label: dos\n,20M,L\n,,7\n");
    qemu_image_from(
        &raw,
        dir,
        "file.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    let run = |args: &[&str]| {
        assert!(
            Command::new(&vhdpartx)
                .current_dir(dir)
                .args(args)
                .status()
                .unwrap()
                .success()
        )
    };
    // vhdpartx -a file.vhd; LD_PRELOAD=./libvhdio.so mkfs.ext3 file.vhd1; vhdpartx -d file.vhd
    run(&["-a", "file.vhd"]);
    preload::run(dir, "mkfs.ext3", &["-q", "file.vhd1"]);
    run(&["-d", "file.vhd"]);
    // vhdpartx -a file.vhd; LD_PRELOAD=./libvhdio.so ntfsls file.vhd2; vhdpartx -d file.vhd
    run(&["-a", "file.vhd"]);
    preload::run(dir, "mkntfs", &["-Q", "-q", "file.vhd2"]);
    let out = preload::command(
        dir,
        "sh",
        &[
            "-c",
            "echo hello > hello.txt && ntfscp file.vhd2 hello.txt hello.txt && ntfsls file.vhd2",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello.txt"));
    run(&["-d", "file.vhd"]);
    // Checked without the library, on the raw disk qemu extracts.
    let raw = qemu_raw(&dir.join("file.vhd"), "vpc");
    std::fs::write(dir.join("back.raw"), &raw).unwrap();
    let p1 = &raw[1 << 20..21 << 20];
    std::fs::write(dir.join("p1.raw"), p1).unwrap();
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(dir.join("p1.raw"))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    std::fs::write(dir.join("p2.raw"), &raw[21 << 20..]).unwrap();
    let ls = Command::new("ntfsls")
        .arg(dir.join("p2.raw"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains("hello.txt"));
}
