//! qcow2 reads: images made by qemu-img (every variant it writes), chains
//! over qcow2, raw and VHDX, read through vdisk and compared with what
//! qemu-img reads; refusals (encryption, unknown features).

mod common;
#[path = "qcow2_util/mod.rs"]
mod qcow2_util;

use common::{open, pattern, qemu_child, qemu_image_from, qemu_raw, read_all, run};
use qcow2_util::*;

#[test]
fn qemu_variants_read_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 9 * MIB + 4096;
    let variants = [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "lazy_refcounts=on",
        "refcount_bits=1",
        "refcount_bits=64",
        "preallocation=metadata",
        "compat=0.10,cluster_size=4k",
    ];
    for (i, opts) in variants.iter().enumerate() {
        let (data, _) = pattern(i as u64 + 1, size);
        let img = qemu_image_from(&data, tmp.path(), &format!("v{i}.qcow2"), "qcow2", opts);
        assert_reads_like_qemu(&img, opts);
        // Zero clusters (v3 flag or subcluster bits), discards, partial writes.
        scribble(&img, "qcow2", size, i as u64 + 7, 40);
        assert_reads_like_qemu(&img, &format!("{opts} after qemu-io writes"));
    }
}

#[test]
fn compressed_images_read_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 6 * MIB;
    let (mut data, _) = pattern(11, size);
    // Compressible stretches too.
    for (i, b) in data[MIB..2 * MIB].iter_mut().enumerate() {
        *b = (i / 1000) as u8;
    }
    let raw = tmp.path().join("c.raw");
    std::fs::write(&raw, &data).unwrap();
    for (i, opts) in [
        "compression_type=zlib",
        "compression_type=zstd",
        "compression_type=zlib,cluster_size=512",
        "compression_type=zstd,cluster_size=2M",
        "compat=0.10",
        "compression_type=zstd,extended_l2=on",
    ]
    .iter()
    .enumerate()
    {
        let img = tmp.path().join(format!("c{i}.qcow2"));
        compressed_copy(&raw, &img, opts);
        assert_reads_like_qemu(&img, opts);
        assert_eq!(qemu_raw(&img, "qcow2"), data, "{opts}: qemu-img itself");
        // Partial overwrites of compressed clusters, by qemu.
        scribble(&img, "qcow2", size, i as u64 + 3, 20);
        assert_reads_like_qemu(&img, &format!("{opts} after qemu-io writes"));
    }
}

/// qcow2 over qcow2 over raw, with a larger top; qcow2 over VHDX; extended
/// L2 over a backing file (partly allocated clusters).
#[test]
fn chains_read_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size = 8 * MIB;
    let (data, _) = pattern(5, size);
    let (_, _, top) = qcow2_qcow2_raw_chain(d, &data, 12, (21, 22));
    assert_reads_like_qemu(&top, "qcow2/qcow2/raw");
    let disk = open(&top, false).unwrap();
    assert_eq!(disk.layers().len(), 3);

    let vhdx = d.join("base.vhdx");
    run("qemu-img", &["create", "-f", "vhdx", s(&vhdx), "8M"]);
    scribble(&vhdx, "vhdx", size, 23, 20);
    let over = d.join("over vhdx.qcow2");
    qemu_child(&over, "qcow2", "", "base.vhdx", "vhdx", None);
    scribble(&over, "qcow2", size, 24, 20);
    assert_reads_like_qemu(&over, "qcow2 over vhdx");

    // No backing format recorded: probed (vhdx), or raw if not an image.
    let probed = d.join("probed.qcow2");
    qemu_child(&probed, "qcow2", "", "base.raw", "raw", None);
    // qemu-img no longer writes images without one: hide the extension.
    let mut bytes = std::fs::read(&probed).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    bytes[at] = 0x12;
    std::fs::write(&probed, &bytes).unwrap();
    let disk = open(&probed, false).unwrap();
    assert!(read_all(&disk) == data, "raw backing without a format");
}

#[test]
fn data_file_and_internal_snapshots_read_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size = 4 * MIB;
    let img = d.join("df.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", s(&d.join("df.data"))),
            s(&img),
            "4M",
        ],
    );
    scribble(&img, "qcow2", size, 31, 30);
    assert_reads_like_qemu(&img, "external data file");

    let (data, _) = pattern(9, size);
    let snap = qemu_image_from(&data, d, "snap.qcow2", "qcow2", "");
    run("qemu-img", &["snapshot", "-c", "s1", s(&snap)]);
    scribble(&snap, "qcow2", size, 32, 30);
    run("qemu-img", &["snapshot", "-c", "s2", s(&snap)]);
    scribble(&snap, "qcow2", size, 33, 30);
    assert_reads_like_qemu(&snap, "internal snapshots");
}

#[test]
fn encrypted_and_unknown_features_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let luks = d.join("luks.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "--object",
            "secret,id=sec0,data=pw",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            s(&luks),
            "4M",
        ],
    );
    let e = open(&luks, false).unwrap_err().to_string();
    assert!(e.contains("encryption") && e.contains("LUKS"), "{e}");

    let img = qemu_image_from(&vec![1u8; MIB], d, "f.qcow2", "qcow2", "");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[72 + 7] |= 1 << 6; // incompatible bit 6: unknown
    std::fs::write(&img, &bytes).unwrap();
    let e = open(&img, false).unwrap_err().to_string();
    assert!(e.contains("incompatible") && e.contains("bit 6"), "{e}");
}
