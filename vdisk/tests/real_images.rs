//! The third-party VHDs in ../shared/images, read through vdisk and compared
//! with their published digests (computed by libvhdi, agreeing with qemu).

mod common;

use std::path::{Path, PathBuf};

use common::sha256_hex;
use vdisk::{Error, OpenOptions, StdParentOpener, open_disk};

fn shared_images() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/images");
    if dir.join("README.md").exists() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: ../shared/images is absent; the real-image tests did not run");
        None
    }
}

/// Copies an image to a temporary folder (the shared files are never touched).
fn copy(dir: &Path, names: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for n in names {
        std::fs::copy(dir.join(n), tmp.path().join(n)).unwrap();
    }
    tmp
}

fn digest(path: &Path) -> vdisk::Result<(u64, String)> {
    let file = std::fs::File::open(path).unwrap();
    let disk = open_disk(
        Box::new((file, false)),
        path,
        OpenOptions::default(),
        &StdParentOpener,
    )?;
    let mut data = vec![0u8; disk.size() as usize];
    // Odd-sized pieces, to cross block and sector boundaries unaligned.
    let mut off = 0usize;
    let mut step = 1usize;
    while off < data.len() {
        let n = step.min(data.len() - off);
        disk.read_at(&mut data[off..off + n], off as u64)?;
        off += n;
        step = step * 7 % 300_007 + 1;
    }
    Ok((disk.size(), sha256_hex(&data)))
}

#[test]
fn ext2_vhd() {
    let Some(dir) = shared_images() else { return };
    let tmp = copy(&dir, &["ext2.vhd"]);
    let (size, sha) = digest(&tmp.path().join("ext2.vhd")).unwrap();
    assert_eq!(size, 4212736);
    assert_eq!(
        sha,
        "870be7ae16c1fa8faab05c6eb9205dc9a7ae35c5f552c5cf8a267c0bc6a5cb99"
    );
}

#[test]
fn image_vhd_with_bad_checksum() {
    let Some(dir) = shared_images() else { return };
    let tmp = copy(&dir, &["image.vhd"]);
    let (size, sha) = digest(&tmp.path().join("image.vhd")).unwrap();
    assert_eq!(size, 104448);
    assert_eq!(
        sha,
        "c6db12a7db548e193c29420c1b4533e4708b20c5033db5cc29ef075d48316d25"
    );
}

#[test]
fn differential_found_by_parent_name() {
    let Some(dir) = shared_images() else { return };
    let tmp = copy(&dir, &["image.vhd", "image-differential.vhd"]);
    let (size, sha) = digest(&tmp.path().join("image-differential.vhd")).unwrap();
    assert_eq!(size, 104448);
    assert_eq!(
        sha,
        "c6db12a7db548e193c29420c1b4533e4708b20c5033db5cc29ef075d48316d25"
    );
}

#[test]
fn missing_parent_is_a_clear_error() {
    let Some(dir) = shared_images() else { return };
    let tmp = copy(&dir, &["fat-differential.vhd"]);
    match digest(&tmp.path().join("fat-differential.vhd")) {
        Err(Error::ParentNotFound(msg)) => {
            assert!(msg.contains("fat-parent.vhd"), "{msg}");
        }
        other => panic!("expected ParentNotFound, got {other:?}"),
    }
}
