//! Partitions of a differencing image whose partition table lives in its
//! parent: listed by vhdpartx, opened by name through the library, written in
//! the child only.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::path::Path;
use std::process::Command;

use common::qemu_image_from;

fn vhdpartx() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "vhdpartx", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .status()
        .unwrap();
    assert!(status.success());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("release/vhdpartx")
}

#[test]
fn partition_table_in_the_parent() {
    let vhdpartx = vhdpartx();
    for (fmt, ext) in [
        ("vpc", "vhd"),
        ("vhdx", "vhdx"),
        ("vdi", "vdi"),
        ("vmdk", "vmdk"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let raw = dir.join("base.raw");
        std::fs::write(&raw, vec![0u8; 32 << 20]).unwrap();
        let mut sfdisk = Command::new("sfdisk")
            .arg(&raw)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        sfdisk
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"label: dos\n,8M,L\n,,E\n,4M,L\n,,L\n")
            .unwrap();
        drop(sfdisk.stdin.take());
        assert!(sfdisk.wait().unwrap().success());
        let opts = if fmt == "vpc" {
            "subformat=dynamic,force_size=on"
        } else {
            ""
        };
        let base = qemu_image_from(
            &std::fs::read(&raw).unwrap(),
            dir,
            &format!("base.{ext}"),
            fmt,
            opts,
        );
        let child = dir.join(format!("child.{ext}"));
        {
            let parent = std::fs::File::open(&base).unwrap();
            let c = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&child)
                .unwrap();
            vdisk::snapshot(&base, &(parent, false), &(c, true), &child).unwrap();
        }
        let before = std::fs::read(&base).unwrap();
        let list = Command::new(&vhdpartx)
            .arg("-l")
            .arg(&child)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&list.stdout);
        assert!(
            list.status.success(),
            "{ext}: {}",
            String::from_utf8_lossy(&list.stderr)
        );
        for n in [1, 2, 5, 6] {
            assert!(
                text.contains(&format!("child.{ext}{n} ")),
                "{ext}: partition {n} missing in:\n{text}"
            );
        }
        assert!(
            Command::new(&vhdpartx)
                .arg("-a")
                .arg(&child)
                .status()
                .unwrap()
                .success()
        );
        let name = format!("child.{ext}5");
        preload::run(dir, "mkfs.ext4", &["-q", &name]);
        preload::run(dir, "e2fsck", &["-fn", &name]);
        let size = preload::run(dir, "blockdev", &["--getsize64", &name]);
        assert_eq!(
            String::from_utf8_lossy(&size.stdout).trim(),
            (4u64 << 20).to_string()
        );
        assert!(
            std::fs::read(&base).unwrap() == before,
            "{ext}: the parent changed"
        );
        assert!(
            Command::new(&vhdpartx)
                .arg("-d")
                .arg(&child)
                .status()
                .unwrap()
                .success()
        );
        assert!(!dir.join(&name).exists());
    }
}
