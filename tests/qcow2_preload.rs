//! qcow2 through the library: random unaligned pwrites (python) into images
//! qemu-img made, compressed ones and chains included, equal the same writes
//! on a raw copy as qemu-img reads them back, with `qemu-img check` clean;
//! mkfs.ext4 + e2fsck on a qcow2 over a VHDX base; a partition symlink.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::path::Path;

use common::{pattern, qemu_child, qemu_create, qemu_raw, run as tool};
use vhd_util::{apply_writes, random_writes};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn check_clean(img: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", s(img)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors"),
        "qemu-img check {}: {text}{}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes through the library into `img` (content `model` before).
fn writes_equal_model(dir: &Path, img: &Path, mut model: Vec<u8>, seed: u64, what: &str) {
    let ops = random_writes(seed, model.len() as u64, 64 << 10, 14);
    apply_writes(&mut model, &ops);
    preload::pwrite_through_library(dir, img, &ops);
    let back = qemu_raw(img, "qcow2");
    if back != model {
        let at = back.iter().zip(&model).position(|(a, b)| a != b);
        panic!("{what}: qemu-img reads different data (from byte {at:?})");
    }
    check_clean(img);
    let name = img.file_name().unwrap().to_str().unwrap();
    let cat = preload::run(dir, "cat", &[name]);
    assert!(
        cat.stdout == model,
        "{what}: the library reads different data"
    );
}

#[test]
fn pwrites_into_qemu_images_compressed_and_chains() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size = 12 * MIB + 1024;
    let (data, _) = pattern(7, size as usize);
    let raw = d.join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    for (i, (c, opts)) in [
        (false, "cluster_size=512"),
        (false, "extended_l2=on"),
        (false, "compat=0.10"),
        (false, "refcount_bits=1"),
        (true, "compression_type=zlib"),
        (true, "compression_type=zstd"),
    ]
    .iter()
    .enumerate()
    {
        let img = d.join(format!("i{i}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
        if *c {
            args.push("-c");
        }
        args.extend([s(&raw), s(&img)]);
        tool("qemu-img", &args);
        writes_equal_model(d, &img, data.clone(), 10 + i as u64, opts);
    }
    // qcow2 over qcow2 over raw; the backing files keep every byte.
    let mid = d.join("mid.qcow2");
    qemu_child(&mid, "qcow2", "", "src.raw", "raw", None);
    let top = d.join("top.qcow2");
    qemu_child(&top, "qcow2", "", "mid.qcow2", "qcow2", None);
    let before = (std::fs::read(&raw).unwrap(), std::fs::read(&mid).unwrap());
    writes_equal_model(d, &top, data.clone(), 20, "qcow2/qcow2/raw");
    assert!(
        (std::fs::read(&raw).unwrap(), std::fs::read(&mid).unwrap()) == before,
        "a backing file changed"
    );
}

#[test]
fn mkfs_ext4_on_qcow2_over_vhdx_and_partition_link() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = d.join("base.vhdx");
    qemu_create(&base, "vhdx", "", "64M");
    let img = d.join("disk.qcow2");
    qemu_child(&img, "qcow2", "cluster_size=4k", "base.vhdx", "vhdx", None);
    let base_before = std::fs::read(&base).unwrap();
    preload::run(d, "mkfs.ext4", &["-q", "disk.qcow2"]);
    preload::run(d, "e2fsck", &["-fn", "disk.qcow2"]);
    check_clean(&img);
    let raw = d.join("disk.raw");
    tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&raw)],
    );
    tool("e2fsck", &["-fn", s(&raw)]);
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the VHDX base changed"
    );

    // `disk.qcow21 -> disk.qcow2` is partition 1 of a dos label.
    let p = d.join("p.qcow2");
    qemu_create(&p, "qcow2", "", "16M");
    preload::sh(
        d,
        "printf 'label: dos\\n,4M,83\\n,,83\\n' | sfdisk -q p.qcow2",
    );
    std::os::unix::fs::symlink("p.qcow2", d.join("p.qcow22")).unwrap();
    let out = preload::run(d, "blockdev", &["--getsize64", "p.qcow22"]);
    let want = 16 * MIB - 4 * MIB - MIB;
    assert_eq!(preload::first_word(&out), want.to_string());
}
